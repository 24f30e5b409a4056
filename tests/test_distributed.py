"""Data-parallel training: real 2-process gloo runs on CPU launched with torchrun.

The comparison with a single process is made exact: the 2-rank run takes the *same* global minibatches
as the 1-process run (same seed; rank r computes rows r::2 of each batch, its loss weighted so the
all-reduced gradient is the 1-process gradient of the whole batch). The only other difference is each
rank's sampling noise, which the deterministic test switches off (z = posterior mean) — the two loss
curves must then agree to float rounding. The end-to-end CLI test keeps the noise and checks a looser
agreement, plus the surgery invariants, for query training streamed from disk in shards.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch
import torch.distributed as dist
from support import simulate, split_by_batch

import atlasmap
from atlasmap.cli import main as cli_main

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is not available")

TRAIN = ["--epochs", "6", "--batch-size", "32", "--lr", "0.01", "--seed", "3", "--quiet"]
#: Reference training script run both by torchrun (1 or 2 ranks) and as one plain process; ``noise=0`` as
#: third argument switches sampling noise off (z = posterior mean), so 2 ranks can match 1 process.
DETERMINISTIC_SCRIPT = """
    import contextlib, os, sys
    import torch
    if sys.argv[3] == "noise=0":
        torch.randn_like = lambda t, **kw: torch.zeros_like(t)
    import anndata as ad
    import atlasmap
    from atlasmap.distributed import distributed

    adata = ad.read_h5ad(sys.argv[1])
    with distributed() if "RANK" in os.environ else contextlib.nullcontext():
        model = atlasmap.SCVI(adata, batch_key="batch", n_hidden=32, n_latent=6, n_layers=2, dropout_rate=0.0)
        model.train(6, batch_size=32, lr=0.01, seed=3, progress_bar=False)
        model.save(sys.argv[2])  # only rank 0 writes
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _torchrun(target: list[str], nproc: int = 2, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), *target]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env())


def _run_in_this_process(script: Path, args: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Run ``script`` as one plain process (here: no torchrun environment, so no data parallelism)."""
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(sys, "argv", [str(script), *args])
    with monkeypatch.context() as m:
        m.setattr(torch, "randn_like", torch.randn_like)  # the script may replace it; restored on leaving
        exec(compile(script.read_text(), str(script), "exec"), {"__name__": "__main__"})
    assert torch.randn_like(torch.ones(3)).ne(0).all()


def _history(model_dir: Path) -> dict[str, list[float]]:
    return json.loads((model_dir / "config.json").read_text())["history"]


def _max_rel_diff(a: dict[str, list[float]], b: dict[str, list[float]]) -> float:
    worst = 0.0
    for key in ("elbo_train", "elbo_validation"):
        x, y = np.asarray(a[key]), np.asarray(b[key])
        assert x.shape == y.shape, key
        worst = max(worst, float(np.max(np.abs(x - y) / np.abs(y))))
    return worst


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ddp")
    ref, query = split_by_batch(simulate())
    paths = {"root": root, "ref": root / "ref.h5ad", "query": root / "query.h5ad"}
    ref.write_h5ad(paths["ref"])
    query.write_h5ad(paths["query"])
    return paths


@pytest.fixture(scope="module")
def single_reference(data: dict[str, Path]) -> Path:
    out = data["root"] / "ref_single"
    arch = ["--n-hidden", "32", "--n-latent", "6", "--n-layers", "2", "--dropout-rate", "0"]
    assert cli_main(["reference", str(data["ref"]), "--batch-key", "batch", "-o", str(out), *arch, *TRAIN]) == 0
    return out


def test_two_rank_training_matches_single_process(data: dict[str, Path], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    script = tmp_path / "train_ref.py"
    script.write_text(textwrap.dedent(DETERMINISTIC_SCRIPT))
    run = _torchrun([str(script), str(data["ref"]), str(tmp_path / "ddp"), "noise=0"])
    assert run.returncode == 0, run.stderr[-3000:]
    _run_in_this_process(script, [str(data["ref"]), str(tmp_path / "single"), "noise=0"], monkeypatch)

    ddp_hist, single_hist = _history(tmp_path / "ddp"), _history(tmp_path / "single")
    diff = _max_rel_diff(ddp_hist, single_hist)
    fall = 1 - single_hist["elbo_train"][-1] / single_hist["elbo_train"][0]
    assert diff < 1e-5, f"2 ranks vs 1 process: per-epoch ELBOs differ by up to {diff:.2e} (relative)"
    assert fall > 0.1, f"the loss falls only {fall:.3f}: the comparison would not be meaningful"

    adata = ad.read_h5ad(data["ref"])
    model = atlasmap.SCVI.load(tmp_path / "ddp", adata)
    single_model = atlasmap.SCVI.load(tmp_path / "single", adata)
    for (name, p), (_, q) in zip(model.module.named_parameters(), single_model.module.named_parameters(),
                                 strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)
    # save -> load round trip of the model rank 0 wrote
    latent = model.get_latent_representation()
    model.save(tmp_path / "again")
    again = atlasmap.SCVI.load(tmp_path / "again", adata)
    np.testing.assert_array_equal(again.get_latent_representation(), latent)
    for (name, p), (_, q) in zip(model.module.named_parameters(), again.module.named_parameters(), strict=True):
        assert torch.equal(p, q), name


def test_one_rank_run_is_the_single_process_run(data: dict[str, Path], tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """torchrun with one rank takes the data-parallel strategy, but computes exactly what one process does
    (sampling noise on, the hand-written step where it applies): same history and weights, bit for bit."""
    script = tmp_path / "train_ref.py"
    script.write_text(textwrap.dedent(DETERMINISTIC_SCRIPT))
    run = _torchrun([str(script), str(data["ref"]), str(tmp_path / "ddp1"), "noise=1"], nproc=1)
    assert run.returncode == 0, run.stderr[-3000:]
    _run_in_this_process(script, [str(data["ref"]), str(tmp_path / "single"), "noise=1"], monkeypatch)
    ddp_hist, single_hist = _history(tmp_path / "ddp1"), _history(tmp_path / "single")
    timing = {"epoch_seconds"}
    assert {k: v for k, v in ddp_hist.items() if k not in timing} == \
        {k: v for k, v in single_hist.items() if k not in timing}
    assert len(ddp_hist["elbo_train"]) == 6 and ddp_hist["elbo_train"][-1] < ddp_hist["elbo_train"][0]
    adata = ad.read_h5ad(data["ref"])
    one_rank, single = atlasmap.SCVI.load(tmp_path / "ddp1", adata), atlasmap.SCVI.load(tmp_path / "single", adata)
    for (name, p), (_, q) in zip(one_rank.module.named_parameters(), single.module.named_parameters(), strict=True):
        assert torch.equal(p, q), name
    for (name, b), (_, c) in zip(one_rank.module.named_buffers(), single.module.named_buffers(), strict=True):
        assert torch.equal(b, c), name


def test_two_rank_backed_query_surgery(data: dict[str, Path], single_reference: Path, tmp_path: Path) -> None:
    """Query surgery in DDP, each rank streaming its shard of chunks of the on-disk query."""
    common = ["map", str(data["query"]), "--reference", str(single_reference), "--backed", "--chunk-size", "40",
              *TRAIN]
    run = _torchrun(["-m", "atlasmap.distributed", *common, "-o", str(tmp_path / "ddp.h5ad"),
                     "--model-out", str(tmp_path / "q_ddp")])
    assert run.returncode == 0, run.stderr[-3000:]
    assert cli_main([*common, "-o", str(tmp_path / "single.h5ad"), "--model-out", str(tmp_path / "q_single")]) == 0

    mapped = ad.read_h5ad(tmp_path / "ddp.h5ad")
    assert mapped.n_vars == 0 and mapped.obsm["X_atlasmap"].shape == (mapped.n_obs, 6)
    reference = atlasmap.SCVI.load(single_reference)
    query = atlasmap.SCVI.load(tmp_path / "q_ddp")
    ref_params = dict(reference.module.named_parameters())
    trainable = set(query.surgery["trainable"])
    assert trainable and all(".blocks.1" in name for name in trainable)
    for name, p in query.module.named_parameters():
        if name in ref_params:  # every reference tensor is bit-identical after DDP query training
            assert torch.equal(p, ref_params[name]), name
    # with sampling noise, and shards of chunks shuffled differently from one process, the curves agree
    # only approximately — but they must not be identical (the ranks really split the work)
    ddp_hist, single_hist = _history(tmp_path / "q_ddp"), _history(tmp_path / "q_single")
    assert _max_rel_diff(ddp_hist, single_hist) < 0.03
    assert ddp_hist["elbo_train"] != single_hist["elbo_train"]


def test_ranks_with_different_data_fail_clearly(data: dict[str, Path], tmp_path: Path) -> None:
    adata = ad.read_h5ad(data["ref"])
    other = adata.copy()
    other.X = other.X.copy()
    other.X[0, 0] += 1  # a different version of the same file
    adata.write_h5ad(tmp_path / "rank0.h5ad")
    other.write_h5ad(tmp_path / "rank1.h5ad")
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent("""
        import os, sys
        import anndata as ad
        import atlasmap
        from atlasmap.distributed import distributed

        with distributed():
            adata = ad.read_h5ad(sys.argv[1 + int(os.environ["RANK"])])
            model = atlasmap.SCVI(adata, batch_key="batch", n_hidden=16)
            try:
                model.train(2, progress_bar=False)
            except atlasmap.AtlasmapError as err:
                print("ERROR", err)
                sys.exit(3)
    """))
    run = _torchrun([str(script), str(tmp_path / "rank0.h5ad"), str(tmp_path / "rank1.h5ad")])
    assert run.returncode != 0
    assert "distributed ranks disagree on the data" in run.stdout, run.stdout + run.stderr[-2000:]


def test_not_under_torchrun_is_a_clear_error(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                                             data: dict[str, Path], tmp_path: Path) -> None:
    from atlasmap.distributed import main

    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    assert main(["reference", str(data["ref"]), "-o", str(tmp_path / "m")]) == 2
    assert "torchrun" in capsys.readouterr().err
