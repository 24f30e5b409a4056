"""Cells resident on the training device (atlasmap.data.resident): the same minibatches as the host path,
in both layouts, and the same training. Run on the CPU with ``force=True`` (the code a GPU runs)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from support import SMALL, simulate, split_by_batch

import atlasmap
from atlasmap.data.loader import CellData
from atlasmap.data.resident import DeviceCells, place_cells
from atlasmap.protocols import CellSource


def _cells(density: float = 0.3, n: int = 90, g: int = 40, seed: int = 0) -> CellData:
    rng = np.random.default_rng(seed)
    x = sp.random(n, g, density=density, format="csr", dtype=np.float32, random_state=seed)
    x.data = np.ceil(x.data * 9)
    x = x + sp.csr_matrix((np.ones(n, np.float32), (np.arange(n), rng.integers(0, g, n))), shape=(n, g))  # no empty cell
    fields = {"cat": torch.from_numpy(rng.integers(0, 3, (n, 1))), "log_library": torch.randn(n)}
    return CellData(x.tocsr(), fields)


@pytest.mark.parametrize("dense", [True, False], ids=["dense", "ell"])
@pytest.mark.parametrize("host_dense", [False, True], ids=["host-csr", "host-dense"])
def test_device_batches_equal_host_batches(dense: bool, host_dense: bool) -> None:
    host = _cells()
    if host_dense:
        host = CellData(torch.from_numpy(host.counts.toarray()), host.fields)
    resident = DeviceCells.from_cells(host, torch.device("cpu"), dense=dense)
    assert isinstance(resident, CellSource)
    assert resident.layout == ("dense" if dense else "ell")
    for rows in (np.arange(10, 30), np.array([5, 5, 0, 89, 17])):
        got, want = resident.batch(rows), host.batch(rows)
        assert set(got) == set(want)
        for key in want:
            assert torch.equal(got[key], want[key]), key
        assert got["x"].is_contiguous()
    for (s1, b1), (s2, b2) in zip(resident.iter_ordered(32), host.iter_ordered(32), strict=True):
        assert s1 == s2 and torch.equal(b1["x"], b2["x"])


@pytest.mark.parametrize("world_size", [1, 3])
def test_epoch_order_is_the_host_paths(world_size: int) -> None:
    """Same generator, same minibatches (and the same shard of each on every rank)."""
    host = _cells()
    resident = place_cells(host, "cpu", force=True)
    rows = np.arange(3, 87)
    for rank in range(world_size):
        a = list(host.iter_batches(rows, 16, shuffle=True, rng=np.random.default_rng(5), rank=rank,
                                   world_size=world_size))
        b = list(resident.iter_batches(rows, 16, shuffle=True, rng=np.random.default_rng(5), rank=rank,
                                       world_size=world_size))
        assert len(a) == len(b) > 0
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x["x"], y["x"]) and torch.equal(x["cat"], y["cat"])


def test_placement_picks_the_smaller_layout_and_respects_the_budget() -> None:
    sparse, dense_like = _cells(density=0.05, g=400), _cells(density=0.9)
    assert place_cells(sparse, "cpu") is sparse  # the CPU path is already resident: nothing moves
    assert place_cells(sparse, "cpu", force=True).layout == "ell"
    assert place_cells(dense_like, "cpu", force=True).layout == "dense"
    assert place_cells(sparse, "cpu", force=True, budget_bytes=100) is sparse  # too big: stays on the host
    resident = place_cells(sparse, "cpu", force=True)
    assert place_cells(resident, "cpu", force=True) is resident  # only in-memory host sources move


def test_with_fields_keeps_the_resident_counts() -> None:
    resident = place_cells(_cells(), "cpu", force=True)
    extra = {"h": torch.arange(90, dtype=torch.float32)[:, None]}
    more = resident.with_fields(extra)
    assert isinstance(more, DeviceCells) and "h" not in resident.fields
    assert torch.equal(more.batch(np.array([4, 2]))["h"], torch.tensor([[4.0], [2.0]]))
    assert more.host.fields["h"] is extra["h"]


@pytest.mark.parametrize("unfrozen", [False, True], ids=["surgery", "unfrozen"])
def test_training_on_resident_cells_equals_the_host_path(unfrozen: bool) -> None:
    """Query training (frozen-first-layer precompute included) computes the same bits either way."""
    from atlasmap.training import TrainConfig, train_module

    ref, query = split_by_batch(simulate(n_cells=200))
    reference = atlasmap.SCVI(ref, batch_key="batch", **SMALL)
    reference.is_trained = True
    model = atlasmap.SCVI.load_query_data(query, reference, unfrozen=unfrozen)
    host = model._cells(training=True)
    config = TrainConfig(max_epochs=3, batch_size=32, progress_bar=False, device="cpu")
    results = []
    for cells in (host, place_cells(host, "cpu", force=True)):
        module = copy.deepcopy(model.module)
        history = train_module(module, cells, config)
        results.append((history, {k: v.clone() for k, v in module.state_dict().items()}))
    (h1, p1), (h2, p2) = results
    assert h1["elbo_train"] == h2["elbo_train"] and h1["elbo_validation"] == h2["elbo_validation"]
    for key in p1:
        assert torch.equal(p1[key], p2[key]), key


@pytest.mark.parametrize("dense", [True, False], ids=["dense", "ell"])
def test_resident_batches_on_fake_cuda(dense: bool) -> None:
    """Placed on a (fake) CUDA device, every minibatch tensor — shuffled, ordered, with added fields — is
    gathered there: nothing comes from the host per step."""
    from fake_cuda import CUDA, devices_of, fake_cuda

    host = _cells()
    with fake_cuda():
        resident = DeviceCells.from_cells(host, CUDA, dense=dense)
        batches = list(resident.iter_batches(np.arange(90), 32, shuffle=True, rng=np.random.default_rng(0)))
        batches += [b for _, b in resident.iter_ordered(40)]
        batches.append(resident.with_fields({"h": torch.zeros(90, 4)}).batch(np.array([1, 2])))
        for batch in batches:
            assert devices_of(batch) == {CUDA}


@pytest.mark.parametrize("host_dense", [False, True], ids=["host-csr", "host-dense"])
def test_staged_cells_give_the_host_batches(host_dense: bool) -> None:
    """Counts that do not fit stream through the staging ring: the same minibatches, every ring slot reused
    (more batches than slots), fields gathered from their device copy."""
    from atlasmap.data.resident import StagedCells

    host = _cells()
    if host_dense:
        host = CellData(torch.from_numpy(host.counts.toarray()), host.fields)
    staged = StagedCells(host, "cpu", depth=2)
    assert isinstance(staged, CellSource)
    got = list(staged.iter_batches(np.arange(90), 16, shuffle=True, rng=np.random.default_rng(2)))
    want = list(host.iter_batches(np.arange(90), 16, shuffle=True, rng=np.random.default_rng(2)))
    assert len(got) == len(want) == 6 and len(staged._slots) == 2
    for a, b in zip(got, want, strict=True):
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in b)
    more = staged.with_fields({"h": torch.ones(90, 2)})
    assert more.fields["cat"] is staged.fields["cat"] and more.batch(np.array([0, 3]))["h"].shape == (2, 2)

