"""Determinism across processes: the same seed gives bit-identical saved weights and latents on CPU in two
separate Python processes (``test_invariants.py`` checks the same inside one process)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

_RUN = textwrap.dedent("""
    import sys
    from pathlib import Path
    import numpy as np
    import atlasmap
    from atlasmap.datasets import simulate_counts

    out = Path(sys.argv[1])
    adata = simulate_counts(n_cells=300, n_genes=40, n_batches=3, n_cell_types=3, seed=11)
    ref = adata[adata.obs["batch"] != "batch2"].copy()
    query = adata[adata.obs["batch"] == "batch2"].copy()
    model = atlasmap.SCVI(ref, batch_key="batch", n_hidden=32, n_latent=5, n_layers=2, seed=3)
    model.train(4, batch_size=64, seed=3, progress_bar=False)
    model.save(out / "reference")
    np.save(out / "reference_latent.npy", model.get_latent_representation())
    np.save(out / "reference_sample.npy", model.get_latent_representation(give_mean=False, seed=5))
    mapped = atlasmap.SCVI.load_query_data(query, model, seed=3)
    mapped.train(3, batch_size=64, seed=3, progress_bar=False)
    mapped.save(out / "query")
    np.save(out / "query_latent.npy", mapped.get_latent_representation())
""")


def _config_without_timings(path: Path) -> dict:
    config = json.loads((path / "config.json").read_text())
    history = config.get("history") or {}
    history.pop("epoch_seconds", None)  # wall-clock time is the one thing allowed to differ
    return config


def test_same_seed_bit_identical_across_processes(tmp_path: Path) -> None:
    script = tmp_path / "run.py"
    script.write_text(_RUN)
    outs = [tmp_path / "a", tmp_path / "b"]
    procs = [subprocess.Popen([sys.executable, str(script), str(out)], stderr=subprocess.PIPE, text=True)
             for out in outs]
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-2000:]
    a, b = outs
    for name in ("reference", "query"):
        weights_a = (a / name / "weights.safetensors").read_bytes()
        assert weights_a == (b / name / "weights.safetensors").read_bytes(), f"{name} weights differ"
        assert _config_without_timings(a / name) == _config_without_timings(b / name), f"{name} config differs"
    for name in ("reference_latent", "reference_sample", "query_latent"):
        x, y = np.load(a / f"{name}.npy"), np.load(b / f"{name}.npy")
        assert x.dtype == y.dtype == np.float32 and x.tobytes() == y.tobytes(), f"{name} differs"
