"""The core CLI: reference, map, info, demo, and one-line error exits (status 2, no traceback)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

from atlasmap import cli
from atlasmap.datasets import simulate_counts


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    adata = simulate_counts(300, 40, n_batches=3, n_cell_types=3, seed=3)
    ref = adata[adata.obs["batch"] != "batch2"].copy()
    query = adata[adata.obs["batch"] == "batch2"].copy()
    query.obs = query.obs.rename(columns={"batch": "sample"})
    paths = {"ref": root / "ref.h5ad", "query": root / "query.h5ad", "root": root}
    ref.write_h5ad(paths["ref"])
    query.write_h5ad(paths["query"])
    model = root / "model"
    assert cli.main(["reference", str(paths["ref"]), "--batch-key", "batch", "-o", str(model),
                     "--epochs", "3", "--n-latent", "4", "--quiet"]) == 0
    paths["model"] = model
    return paths


def test_reference_writes_model(files: dict[str, Path]) -> None:
    assert sorted(p.name for p in files["model"].iterdir()) == ["config.json", "weights.safetensors"]


def test_map_query_only_and_with_reference(files: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    out = files["root"] / "mapped.h5ad"
    code = cli.main(["map", str(files["query"]), "--reference", str(files["model"]), "-o", str(out),
                     "--batch-key", "sample", "--epochs", "2", "--quiet"])
    assert code == 0
    mapped = ad.read_h5ad(out)
    query = ad.read_h5ad(files["query"])
    assert mapped.n_obs == query.n_obs
    assert mapped.obsm["X_atlasmap"].shape == (query.n_obs, 4)
    assert set(mapped.obs["atlasmap_dataset"]) == {"query"}

    out2 = files["root"] / "joint.h5ad"
    model_out = files["root"] / "query_model"
    code = cli.main(["map", str(files["query"]), "--reference", str(files["model"]), "-o", str(out2),
                     "--batch-key", "sample", "--epochs", "2", "--quiet", "--with-reference", str(files["ref"]),
                     "--knn-labels", "cell_type", "--model-out", str(model_out)])
    assert code == 0
    joint = ad.read_h5ad(out2)
    ref = ad.read_h5ad(files["ref"])
    assert (joint.obs["atlasmap_dataset"] == "reference").sum() == ref.n_obs
    assert (joint.obs["atlasmap_dataset"] == "query").sum() == query.n_obs
    assert "atlasmap_cell_type" in joint.obs and "atlasmap_cell_type_uncertainty" in joint.obs
    assert (model_out / "config.json").is_file()
    assert "accuracy" in capsys.readouterr().out


def test_threads_option_sets_torch_threads(files: dict[str, Path]) -> None:
    import torch

    before = torch.get_num_threads()
    try:
        assert cli.main(["reference", str(files["ref"]), "--batch-key", "batch", "-o", str(files["root"] / "m1t"),
                         "--epochs", "1", "--n-latent", "4", "--quiet", "--threads", "2"]) == 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_info(files: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["info", str(files["model"])]) == 0
    out = capsys.readouterr().out
    assert "SCVI model" in out and "batch: 2 categories" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["map", "{query}", "--reference", "{root}/nope", "-o", "{root}/x.h5ad"], "does not exist"),
        (["map", "{root}/missing.h5ad", "--reference", "{model}", "-o", "{root}/x.h5ad"], "query file"),
        (["map", "{query}", "--reference", "{model}", "-o", "{query}"], "already exists"),
        (["reference", "{ref}", "--batch-key", "nokey", "-o", "{root}/m2", "--epochs", "1"], "'nokey'"),
        (["reference", "{ref}", "--batch-key", "batch", "-o", "{model}"], "already exists"),
        (["map", "{query}", "--reference", "{model}", "-o", "{root}/y.h5ad", "--knn-labels", "cell_type"],
         "--with-reference"),
        (["reference", "{ref}", "--batch-key", "batch", "-o", "{root}/m3", "--threads", "0"],
         "--threads must be at least 1"),
    ],
)
def test_user_errors_exit_2_with_one_line(files: dict[str, Path], capsys: pytest.CaptureFixture,
                                          args: list[str], message: str) -> None:
    argv = [a.format(**{k: str(v) for k, v in files.items()}) for a in args]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("atlasmap: error:")
    assert message in err[-1]
    assert "Traceback" not in "\n".join(err)


def test_non_count_input_error_in_subprocess(files: dict[str, Path]) -> None:
    adata = ad.read_h5ad(files["ref"])
    adata.X = adata.X.astype(np.float32)
    adata.X.data = np.log1p(adata.X.data)
    bad = files["root"] / "lognorm.h5ad"
    adata.write_h5ad(bad)
    proc = subprocess.run([sys.executable, "-m", "atlasmap.cli", "reference", str(bad), "--batch-key", "batch",
                           "-o", str(files["root"] / "m3")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "non-integer" in proc.stderr and "--layer counts" in proc.stderr and "layer=" not in proc.stderr
    assert not (files["root"] / "m3").exists()


@pytest.mark.slow
def test_demo(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["demo", "-o", str(tmp_path / "demo"), "--epochs", "20", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out
    for name in ("mapped.h5ad", "umap.png", "training_curves.png"):
        assert (tmp_path / "demo" / name).is_file()
    assert (tmp_path / "demo" / "umap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_reference_model_choices_are_those_the_library_trains() -> None:
    from atlasmap.workflow.reference import REFERENCE_MODELS

    assert tuple(cli.REFERENCE_MODELS) == REFERENCE_MODELS


def test_warning_format_is_one_line_only_while_a_command_runs(files: dict[str, Path],
                                                              capsys: pytest.CaptureFixture) -> None:
    import warnings

    before = warnings.formatwarning
    assert cli.main(["info", str(files["model"])]) == 0
    assert warnings.formatwarning is before, "the CLI left its warning format behind"
    with cli.one_line_warnings():
        assert warnings.formatwarning("careful", UserWarning, "f.py", 1) == "atlasmap: warning: careful\n"
    assert warnings.formatwarning is before
