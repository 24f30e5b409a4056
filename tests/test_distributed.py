"""Data-parallel training: real 2-process gloo runs on CPU launched with torchrun.

The comparison is meaningful because the distributed run takes the *same* global minibatches as the
single-process run (same seed; each rank computes half of each batch, the loss weighted so the reduced
gradient is the single-process gradient). What differs is only each rank's sampling noise, so the loss
curves agree to a fraction of a percent while the loss itself falls by much more — and they are not
bit-identical, which shows the ranks really did split the work.
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

ARCH = ["--n-hidden", "32", "--n-latent", "6", "--n-layers", "2", "--dropout-rate", "0"]
TRAIN = ["--epochs", "6", "--batch-size", "32", "--lr", "0.01", "--seed", "3", "--quiet"]
#: Largest relative difference of per-epoch ELBOs between the 2-rank and the 1-process run.
TOLERANCE = 0.01


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _torchrun(target: list[str], nproc: int = 2, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), *target]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def _history(model_dir: Path) -> dict[str, list[float]]:
    return json.loads((model_dir / "config.json").read_text())["history"]


def _assert_close_curves(ddp: dict[str, list[float]], single: dict[str, list[float]], tol: float) -> None:
    for key in ("elbo_train", "elbo_validation"):
        a, b = np.asarray(ddp[key]), np.asarray(single[key])
        assert a.shape == b.shape, key
        rel = np.abs(a - b) / np.abs(b)
        assert rel.max() < tol, f"{key}: 2 ranks {a.round(2)} vs 1 process {b.round(2)} (max rel diff {rel.max():.4f})"
    fall = (single["elbo_train"][0] - single["elbo_train"][-1]) / single["elbo_train"][0]
    assert fall > 5 * tol, f"the loss falls only {fall:.3f}: the comparison would not be meaningful"


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
    assert cli_main(["reference", str(data["ref"]), "--batch-key", "batch", "-o", str(out), *ARCH, *TRAIN]) == 0
    return out


def test_two_rank_reference_matches_single_process(data: dict[str, Path], single_reference: Path,
                                                   tmp_path: Path) -> None:
    out = tmp_path / "ref_ddp"
    run = _torchrun(["-m", "atlasmap.distributed", "reference", str(data["ref"]), "--batch-key", "batch",
                     "-o", str(out), *ARCH, *TRAIN])
    assert run.returncode == 0, run.stderr[-3000:]
    assert "distributed run on 2 ranks (gloo, cpu)" in run.stderr
    assert run.stdout.count("reference model:") == 1, "only rank 0 reports"
    ddp, single = _history(out), _history(single_reference)
    _assert_close_curves(ddp, single, TOLERANCE)
    assert ddp["elbo_train"] != single["elbo_train"], "bit-identical to 1 process: the ranks did not split the work"

    # save -> load round trip of the model rank 0 wrote
    adata = ad.read_h5ad(data["ref"])
    model = atlasmap.SCVI.load(out, adata)
    latent = model.get_latent_representation()
    model.save(tmp_path / "again")
    again = atlasmap.SCVI.load(tmp_path / "again", adata)
    np.testing.assert_array_equal(again.get_latent_representation(), latent)
    for (name, p), (_, q) in zip(model.module.named_parameters(), again.module.named_parameters(), strict=True):
        assert torch.equal(p, q), name
    # and it is (nearly) the single-process model
    single_latent = atlasmap.SCVI.load(single_reference, adata).get_latent_representation()
    corr = np.corrcoef(latent.ravel(), single_latent.ravel())[0, 1]
    assert corr > 0.95, corr


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
    # shards of chunks shuffle differently from one process, so the curves agree more loosely
    _assert_close_curves(_history(tmp_path / "q_ddp"), _history(tmp_path / "q_single"), 5 * TOLERANCE)


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
