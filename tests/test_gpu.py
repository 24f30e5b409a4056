"""The contract on a real GPU (``pytest -m gpu``): everything a user does, on CUDA.

Skipped with a reason where no CUDA device is visible; on CPU-only machines the device-placement bugs
these tests guard against are caught by ``test_devices.py`` (meta device and fake CUDA tensors).

* The invariant: after query training on the GPU the query model's latent of reference cells equals the
  reference model's latent on the same device, bit for bit, and no frozen weight changes by one bit —
  for a reference trained on the GPU, loaded from disk onto the GPU, loaded on the CPU and trained on the
  GPU, and imported from scvi-tools.
* Save on the GPU, load on the CPU (and the reverse): the same weights, the same latent to float rounding.
* scANVI and totalVI surgery and outputs (predict, normalised expression, get_elbo) on CUDA; backed
  (streamed) mapping; every CLI command with ``--device cuda``; a one-rank NCCL run under torchrun.
"""

from __future__ import annotations

import copy
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from support import SMALL, simulate, split_by_batch

import atlasmap
from atlasmap.cli import main as cli_main

#: ``ATLASMAP_GPU_TESTS_DEVICE=cpu`` runs these tests on the CPU: a dry run of their logic where no GPU is.
CUDA = os.environ.get("ATLASMAP_GPU_TESTS_DEVICE", "cuda")
KIND = torch.device(CUDA).type
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(KIND == "cuda" and not torch.cuda.is_available(),
                                 reason="no CUDA device visible (torch.cuda.is_available() is False): the GPU contract "
                                        "runs only on a machine with an NVIDIA GPU")]
EPOCHS = 6
FIXTURES = Path(__file__).parent / "fixtures" / "scvi_tools_1.4.2_small"


@pytest.fixture(scope="module")
def split() -> tuple[ad.AnnData, ad.AnnData]:
    return split_by_batch(simulate())


@pytest.fixture(scope="module")
def gpu_reference(split: tuple[ad.AnnData, ad.AnnData]) -> atlasmap.SCVI:
    ref, _ = split
    model = atlasmap.SCVI(ref, batch_key="batch", **SMALL)
    model.train(EPOCHS, device=CUDA, progress_bar=False)
    assert model.device.type == KIND
    return model


def _weights(model: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.module.state_dict().items()}


def _assert_invariant(reference: Any, ref_adata: ad.AnnData, query_adata: ad.AnnData, **surgery: Any) -> Any:
    """Map ``query_adata`` onto ``reference`` on the GPU; the reference latent and frozen weights stay bit-identical."""
    reference.to_device(CUDA)
    z_before = reference.get_latent_representation(ref_adata)
    query = type(reference).load_query_data(query_adata, reference, **surgery)
    before = _weights(query)
    frozen = {n for n, p in query.module.named_parameters() if not p.requires_grad}
    query.train(EPOCHS, device=CUDA, progress_bar=False)
    assert query.device.type == KIND
    after = _weights(query)
    for name in frozen:
        assert torch.equal(before[name], after[name]), f"frozen {name} changed on the GPU"
    assert any(not torch.equal(before[n], after[n]) for n in after if n not in frozen), "nothing trained"
    z_after = query.get_latent_representation(ref_adata)
    assert np.array_equal(z_before, z_after), f"reference latent moved by {np.abs(z_before - z_after).max()}"
    return query


def test_invariant_reference_trained_on_the_gpu(gpu_reference: atlasmap.SCVI, split: Any) -> None:
    ref, query = split
    _assert_invariant(gpu_reference, ref, query)


def test_invariant_reference_loaded_from_disk(gpu_reference: atlasmap.SCVI, split: Any, tmp_path: Path) -> None:
    ref, query = split
    gpu_reference.save(tmp_path / "ref")
    on_cpu = atlasmap.SCVI.load(tmp_path / "ref", adata=ref)
    assert on_cpu.device.type == "cpu"  # loading never needs the device the model was trained on
    _assert_invariant(on_cpu, ref, query)
    on_gpu = atlasmap.load(tmp_path / "ref", adata=ref, device=CUDA)
    assert on_gpu.device.type == KIND
    _assert_invariant(on_gpu, ref, query)


def test_invariant_with_covariates_and_batch_norm(split: Any) -> None:
    ref, query = split
    model = atlasmap.SCVI(ref, batch_key="batch", categorical_covariate_keys=["donor"],
                          continuous_covariate_keys=["score"], use_batch_norm="both", use_layer_norm="none",
                          use_observed_lib_size=False, dispersion="gene-batch", **SMALL)
    model.train(EPOCHS, device=CUDA, progress_bar=False)
    _assert_invariant(model, ref, query)


def test_invariant_scvi_tools_import(tmp_path: Path) -> None:
    adata = ad.read_h5ad(FIXTURES / "adata.h5ad")
    ref = adata[adata.obs["split"] == "reference"].copy()
    query = adata[adata.obs["split"] == "query"].copy()
    imported = atlasmap.SCVI.from_scvi_tools(FIXTURES / "default", adata=ref)
    expected = np.load(FIXTURES / "default" / "latent.npy")
    imported.to_device(CUDA)
    np.testing.assert_allclose(imported.get_latent_representation(ref), expected, atol=1e-5)
    _assert_invariant(imported, ref, query)


def test_save_on_gpu_load_on_cpu_and_back(gpu_reference: atlasmap.SCVI, split: Any, tmp_path: Path) -> None:
    ref, _ = split
    gpu_reference.save(tmp_path / "m")
    cpu = atlasmap.load(tmp_path / "m", adata=ref)
    for name, value in gpu_reference.module.state_dict().items():
        assert torch.equal(value.cpu(), cpu.module.state_dict()[name]), name
    z_gpu, z_cpu = gpu_reference.get_latent_representation(ref), cpu.get_latent_representation(ref)
    np.testing.assert_allclose(z_cpu, z_gpu, atol=1e-4)
    cpu.save(tmp_path / "again")
    back = atlasmap.load(tmp_path / "again", adata=ref, device=CUDA)
    assert back.device.type == KIND
    assert np.array_equal(back.get_latent_representation(ref), z_gpu)


def test_outputs_on_the_gpu(gpu_reference: atlasmap.SCVI, split: Any) -> None:
    ref, query = split
    model = atlasmap.SCVI.load_query_data(query, gpu_reference).train(EPOCHS, device=CUDA, progress_bar=False)
    expr = model.get_normalized_expression(transform_batch="batch0", n_samples=2)
    assert isinstance(expr, pd.DataFrame) and np.isfinite(expr.to_numpy()).all()
    np.testing.assert_allclose(expr.to_numpy().sum(1), 1.0, rtol=1e-4)
    assert np.isfinite(model.get_elbo())
    sample = model.get_latent_representation(give_mean=False, seed=1)
    assert sample.shape == (query.n_obs, SMALL["n_latent"]) and np.isfinite(sample).all()
    _, joint = atlasmap.map_query(query, gpu_reference, max_epochs=2, adata_reference=ref,
                                  train_kwargs={"device": CUDA, "progress_bar": False})
    labelled = atlasmap.transfer_labels(joint, labels_keys="cell_type", copy=True)
    assert labelled.obs["atlasmap_cell_type"].notna().all()


def test_scanvi_surgery_and_predictions_on_the_gpu(gpu_reference: atlasmap.SCVI, split: Any) -> None:
    ref, query = split
    scanvi = atlasmap.SCANVI.from_scvi_model(gpu_reference, labels_key="cell_type")
    scanvi.train(3, device=CUDA, progress_bar=False)
    q = query.copy()
    q.obs["cell_type"] = "Unknown"
    model = _assert_invariant(scanvi, ref, q)
    predicted = model.predict()
    assert len(predicted) == q.n_obs and set(predicted) <= set(scanvi.labels)
    soft = model.predict(soft=True)
    np.testing.assert_allclose(np.asarray(soft).sum(1), 1.0, rtol=1e-5)


def test_totalvi_surgery_on_the_gpu() -> None:
    from test_totalvi import KEY, TINY, simulate_citeseq

    cite = simulate_citeseq()
    is_ref = cite.obs["batch"].isin(["batch0", "batch1"]).to_numpy()
    ref, query = cite[is_ref].copy(), cite[~is_ref].copy()
    model = atlasmap.TOTALVI(ref, batch_key="batch", protein_expression_obsm_key=KEY, **TINY)
    model.train(4, device=CUDA, progress_bar=False)
    mapped = _assert_invariant(model, ref, query)
    rna, protein = mapped.get_normalized_expression(n_samples=1)
    assert np.isfinite(np.asarray(rna)).all() and np.isfinite(np.asarray(protein)).all()


def test_backed_mapping_on_the_gpu(gpu_reference: atlasmap.SCVI, split: Any, tmp_path: Path) -> None:
    from atlasmap.data.backed import read_backed

    ref, query = split
    query.write_h5ad(tmp_path / "q.h5ad")
    backed = read_backed(tmp_path / "q.h5ad")
    in_memory = _assert_invariant(gpu_reference, ref, query)
    streamed = atlasmap.SCVI.load_query_data(backed, gpu_reference).train(EPOCHS, device=CUDA, progress_bar=False)
    assert streamed.device.type == KIND
    z = streamed.get_latent_representation(ref)
    assert np.array_equal(z, gpu_reference.get_latent_representation(ref))
    assert in_memory.get_latent_representation().shape == streamed.get_latent_representation().shape


def test_cli_on_the_gpu(split: Any, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ref, query = split
    ref.write_h5ad(tmp_path / "ref.h5ad")
    query.write_h5ad(tmp_path / "query.h5ad")
    args = ["--epochs", "3", "--quiet", "--device", CUDA]
    assert cli_main(["reference", str(tmp_path / "ref.h5ad"), "--batch-key", "batch", "-o", str(tmp_path / "m"),
                     "--n-layers", "2", *args]) == 0
    assert f"device: {KIND}" in capsys.readouterr().out
    assert cli_main(["map", str(tmp_path / "query.h5ad"), "--reference", str(tmp_path / "m"), "-o",
                     str(tmp_path / "out.h5ad"), "--with-reference", str(tmp_path / "ref.h5ad"), "--knn-labels",
                     "cell_type", *args]) == 0
    assert f"device: {KIND}" in capsys.readouterr().out
    assert cli_main(["map", str(tmp_path / "query.h5ad"), "--reference", str(tmp_path / "m"), "-o",
                     str(tmp_path / "backed.h5ad"), "--backed", *args]) == 0
    assert cli_main(["evaluate", str(tmp_path / "out.h5ad"), "-o", str(tmp_path / "ev"), "--batch-key", "batch",
                     "--label-key", "cell_type", "--scib", "fast", "--no-plots", "--device", "cpu"]) == 0
    assert cli_main(["demo", "-o", str(tmp_path / "demo"), "--epochs", "2", "--quiet", "--scib", "none",
                     "--device", CUDA]) == 0
    assert f"device: {KIND}" in capsys.readouterr().out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_torchrun_one_rank_nccl(split: Any, tmp_path: Path) -> None:
    if KIND != "cuda":
        pytest.skip("NCCL needs a GPU (the CPU dry run has no NCCL)")
    ref, _ = split
    ref.write_h5ad(tmp_path / "ref.h5ad")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "1",
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "-m", "atlasmap.distributed",
           "reference", str(tmp_path / "ref.h5ad"), "--batch-key", "batch", "-o", str(tmp_path / "m"),
           "--epochs", "3", "--quiet", "--device", "cuda"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "nccl" in proc.stderr
    assert atlasmap.load(tmp_path / "m").is_trained


def test_same_seed_trains_bit_identically(split: Any) -> None:
    """No atomics in atlasmap's own backward (the covariate lookups use a one-hot matmul on CUDA), so the
    same seed gives the same weights without deterministic=True (one GPU model, one software stack)."""
    ref, query = split
    runs = []
    for _ in range(2):
        model = atlasmap.SCVI(ref, batch_key="batch", **SMALL).train(3, device=CUDA, progress_bar=False)
        query_model = atlasmap.SCVI.load_query_data(query, model).train(3, device=CUDA, progress_bar=False)
        runs.append({**_weights(model), **{f"q.{k}": v for k, v in _weights(query_model).items()}})
    differ = [k for k in runs[0] if not torch.equal(runs[0][k], runs[1][k])]
    assert not differ, f"two same-seed runs differ in {differ[:5]}"


def test_deterministic_training_repeats_bit_for_bit(split: Any) -> None:
    if KIND == "cuda" and not os.environ.get("CUBLAS_WORKSPACE_CONFIG"):
        pytest.skip("deterministic cuBLAS needs CUBLAS_WORKSPACE_CONFIG=:4096:8 set before the process starts")
    ref, _ = split
    runs = []
    for _ in range(2):
        model = atlasmap.SCVI(ref, batch_key="batch", **SMALL)
        model.train(3, device=CUDA, progress_bar=False, deterministic=True)
        runs.append(_weights(model))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_model_copied_to_the_gpu_keeps_the_cpu_original(split: Any) -> None:
    """``train(device=...)`` moves the model it trains; a deep copy made before stays where it was."""
    ref, _ = split
    model = atlasmap.SCVI(ref, batch_key="batch", **SMALL)
    twin = copy.deepcopy(model)
    model.train(2, device=CUDA, progress_bar=False)
    assert twin.device.type == "cpu" and model.device.type == KIND
