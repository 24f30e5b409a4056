"""Streaming (backed) data: on-disk CSR reading, chunked validation, shuffling, the chunked simulator,
incremental latent output, and the errors for bad or changing files."""

from __future__ import annotations

import os
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from support import SMALL, simulate, split_by_batch

import atlasmap
from atlasmap.data.backed import (
    CSRWriter,
    DataChangedError,
    backed_options,
    convert_to_csr,
    is_backed,
    prepare_backed_cells,
    read_backed,
)
from atlasmap.data.loader import prepare_cells
from atlasmap.data.registry import build_registry
from atlasmap.datasets import simulate_counts, write_simulated_h5ad
from atlasmap.errors import InputError
from atlasmap.workflow.streaming import map_query_backed, write_latent

CHUNK = 50  # small chunks so a few hundred cells span many of them


@pytest.fixture
def small_chunks():
    with backed_options(chunk_size=CHUNK, shuffle_chunks=2):
        yield


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The suite's simulated data (reference / query split) written as .h5ad files with CSR X."""
    root = tmp_path_factory.mktemp("backed")
    ref, query = split_by_batch(simulate())
    paths = {"ref": root / "ref.h5ad", "query": root / "query.h5ad"}
    ref.write_h5ad(paths["ref"])
    query.write_h5ad(paths["query"])
    return paths


def _dense(x: torch.Tensor | sp.csr_matrix) -> np.ndarray:
    return x.numpy() if isinstance(x, torch.Tensor) else x.toarray()


# ------------------------------------------------------------------------------------------ reading
def test_read_backed_keeps_counts_on_disk(files: dict[str, Path]) -> None:
    adata = read_backed(files["query"])
    assert is_backed(adata) and adata.isbacked
    assert dict(adata.layers) == {}, "layers must not be loaded into memory"
    memory = ad.read_h5ad(files["query"])
    pd.testing.assert_frame_equal(adata.obs, memory.obs)
    assert list(adata.var_names) == list(memory.var_names)


def test_backed_cells_equal_in_memory_cells(files: dict[str, Path], small_chunks: None) -> None:
    memory = ad.read_h5ad(files["query"])
    registry = build_registry(memory, batch_key="batch", continuous_covariate_keys=["score"])
    # a model whose gene order differs from the file's and which has a gene the file lacks
    genes = list(memory.var_names[::-1][:-3]) + ["not_in_file"]
    registry = type(registry)(**{**registry.__dict__, "var_names": tuple(genes)})
    with pytest.warns(UserWarning, match="missing"):
        expected = prepare_cells(memory, registry)
    with pytest.warns(UserWarning, match="missing"):
        cells = prepare_backed_cells(read_backed(files["query"]), registry)
    assert cells.n_cells == expected.n_cells
    rows = np.array([5, 0, 301, 77, 76, 200, 3])
    got, want = cells.batch(rows), expected.batch(rows)
    assert set(got) >= {"x", "cat", "cont"}
    for key in want:
        np.testing.assert_array_equal(got[key].numpy(), want[key].numpy(), err_msg=key)
    np.testing.assert_array_equal(cells.library, _dense(expected.counts).sum(1))


def test_iter_batches_covers_each_row_once_shuffled(files: dict[str, Path], small_chunks: None) -> None:
    adata = read_backed(files["query"])
    cells = prepare_backed_cells(adata, build_registry(adata, batch_key="batch"))
    rows = np.sort(np.random.default_rng(0).choice(cells.n_cells, 250, replace=False))
    seen, sizes = [], []
    for batch in cells.iter_batches(rows, 32, shuffle=True, rng=np.random.default_rng(1)):
        seen.append(batch["x"].sum(1).numpy())
        sizes.append(batch["x"].shape[0])
    assert sum(sizes) == rows.size and all(s == 32 for s in sizes[:-1]) and sizes[-1] >= 2
    order = np.concatenate(seen)
    np.testing.assert_array_equal(np.sort(order), np.sort(cells.library[rows]))
    assert not np.array_equal(order, cells.library[rows]), "rows came in file order: no shuffling"
    again = np.concatenate([b["x"].sum(1).numpy() for b in cells.iter_batches(rows, 32, shuffle=True, rng=np.random.default_rng(1))])
    np.testing.assert_array_equal(order, again)  # same seed, same order


def test_iter_batches_shards_chunks_across_ranks(files: dict[str, Path], small_chunks: None) -> None:
    adata = read_backed(files["query"])
    cells = prepare_backed_cells(adata, build_registry(adata, batch_key="batch"))
    rows = np.arange(cells.n_cells)
    reads: list[tuple[int, int]] = []
    original = cells.source.read
    cells.source.read = lambda lo, hi: reads.append((lo, hi)) or original(lo, hi)  # type: ignore[method-assign]
    per_rank = []
    for rank in range(3):
        # each rank's generator is in the same state, as in a distributed run
        got = [b["x"].sum(1).numpy() for b in cells.iter_batches(rows, 16, shuffle=True,
                                                                   rng=np.random.default_rng(5), rank=rank,
                                                                   world_size=3)]
        per_rank.append(np.concatenate(got))
    np.testing.assert_array_equal(np.sort(np.concatenate(per_rank)), np.sort(cells.library))
    n_chunks = -(-cells.n_cells // CHUNK)
    assert len(reads) == n_chunks, "each chunk must be read once, by exactly one rank"


def test_in_memory_epoch_batches_split_global_batches(sim_adata: ad.AnnData) -> None:
    cells = prepare_cells(sim_adata, build_registry(sim_adata, batch_key="batch"))
    rows = np.arange(cells.n_cells)
    single = [b["x"] for b in cells.iter_batches(rows, 64, shuffle=True, rng=np.random.default_rng(3))]
    ranks = [[b["x"] for b in cells.iter_batches(rows, 64, shuffle=True, rng=np.random.default_rng(3), rank=r, world_size=2)]
             for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(single)
    for whole, a, b in zip(single, *ranks, strict=True):
        torch.testing.assert_close(whole[0::2], a, rtol=0, atol=0)
        torch.testing.assert_close(whole[1::2], b, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ validation
def _write_with(path: Path, adata: ad.AnnData, row: int, col: int, value: float) -> None:
    bad = adata.copy()
    x = bad.X.toarray()
    x[row, col] = value
    bad.X = sp.csr_matrix(x)
    bad.write_h5ad(path)


@pytest.mark.parametrize(("value", "match"), [(np.nan, "NaN or infinite"), (-1.0, "negative"),
                                              (0.5, "non-integer")])
def test_chunk_validation_names_the_cell(tmp_path: Path, files: dict[str, Path], small_chunks: None,
                                         value: float, match: str) -> None:
    memory = ad.read_h5ad(files["query"])
    path = tmp_path / "bad.h5ad"
    row = 3 * CHUNK + 7  # in a later chunk: the message must still name the right cell
    _write_with(path, memory, row, 2, value)
    with pytest.raises(InputError, match=match) as err:
        build_registry(read_backed(path), batch_key="batch")
    assert repr(memory.obs_names[row]) in str(err.value)
    assert repr(memory.var_names[2]) in str(err.value)


def test_empty_cell_in_later_chunk_is_refused(tmp_path: Path, files: dict[str, Path], small_chunks: None) -> None:
    memory = ad.read_h5ad(files["query"])
    registry = build_registry(memory, batch_key="batch")
    x = memory.X.toarray()
    x[2 * CHUNK + 1] = 0
    memory.X = sp.csr_matrix(x)
    memory.write_h5ad(tmp_path / "empty.h5ad")
    with pytest.raises(InputError, match=f"no counts.*{memory.obs_names[2 * CHUNK + 1]}"):
        prepare_backed_cells(read_backed(tmp_path / "empty.h5ad"), registry)


def test_dense_and_csc_files_are_refused_with_the_fix(tmp_path: Path, files: dict[str, Path]) -> None:
    memory = ad.read_h5ad(files["query"])
    dense, csc = memory.copy(), memory.copy()
    dense.X = memory.X.toarray()
    csc.X = sp.csc_matrix(memory.X)
    dense.write_h5ad(tmp_path / "dense.h5ad")
    csc.write_h5ad(tmp_path / "csc.h5ad")
    with pytest.raises(InputError, match="dense array.*to-csr"):
        build_registry(read_backed(tmp_path / "dense.h5ad"), batch_key="batch")
    with pytest.raises(InputError, match="CSC.*tocsr"):
        build_registry(read_backed(tmp_path / "csc.h5ad"), batch_key="batch")
    # the suggested conversion works chunk by chunk and gives the same counts
    out = convert_to_csr(tmp_path / "dense.h5ad", tmp_path / "csr.h5ad", chunk_size=37)
    back = ad.read_h5ad(out)
    assert sp.issparse(back.X) and np.array_equal(back.X.toarray(), memory.X.toarray())
    pd.testing.assert_frame_equal(back.obs, memory.obs)


def test_counts_layer_is_streamed(tmp_path: Path, files: dict[str, Path]) -> None:
    memory = ad.read_h5ad(files["query"])
    memory.X = sp.csr_matrix(np.log1p(memory.X.toarray()))
    memory.write_h5ad(tmp_path / "layer.h5ad")
    adata = read_backed(tmp_path / "layer.h5ad")
    with pytest.raises(InputError, match="non-integer.*layer="):
        build_registry(adata, batch_key="batch")
    registry = build_registry(adata, batch_key="batch", layer="counts")
    cells = prepare_backed_cells(adata, registry)
    np.testing.assert_array_equal(cells.batch(np.arange(10))["x"].numpy(), memory.layers["counts"][:10].toarray())


def test_missing_or_damaged_file(tmp_path: Path, files: dict[str, Path]) -> None:
    with pytest.raises(InputError, match="does not exist"):
        read_backed(tmp_path / "nope.h5ad")
    (tmp_path / "junk.h5ad").write_bytes(b"not hdf5 at all")
    with pytest.raises(InputError, match="not a readable"):
        read_backed(tmp_path / "junk.h5ad")
    # truncated: the header survives, the data does not
    data = files["query"].read_bytes()
    (tmp_path / "cut.h5ad").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError):
        cells = read_backed(tmp_path / "cut.h5ad")
        build_registry(cells, batch_key="batch")


def test_file_changed_or_deleted_mid_run(tmp_path: Path, files: dict[str, Path], small_chunks: None) -> None:
    path = tmp_path / "q.h5ad"
    path.write_bytes(files["query"].read_bytes())
    adata = read_backed(path)
    cells = prepare_backed_cells(adata, build_registry(adata, batch_key="batch"))
    batches = cells.iter_batches(np.arange(cells.n_cells), 16, shuffle=True, rng=np.random.default_rng(0))
    next(batches)
    with open(path, "r+b") as fh:  # truncate (size changes)
        fh.truncate(os.path.getsize(path) - 1000)
    with pytest.raises(DataChangedError, match="modified or truncated"):
        list(batches)
    path.unlink()
    with pytest.raises(DataChangedError, match="disappeared"):
        cells.batch(np.arange(5))


# ------------------------------------------------------------------------------------------ writing
def test_csr_writer_round_trip_and_abort(tmp_path: Path) -> None:
    adata = simulate_counts(300, 25, seed=4)
    with CSRWriter(tmp_path / "w.h5ad", 25) as w:
        for lo in range(0, 300, 70):
            w.append(adata.X[lo:lo + 70])
        w.finish(adata.obs, adata.var, uns={"a": 1})
    back = ad.read_h5ad(tmp_path / "w.h5ad")
    assert np.array_equal(back.X.toarray(), adata.X.toarray()) and back.uns["a"] == 1
    pd.testing.assert_frame_equal(back.obs, adata.obs)
    with pytest.raises(RuntimeError, match="boom"), CSRWriter(tmp_path / "x.h5ad", 25) as w:
        w.append(adata.X[:10])
        raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.h5ad"], "an aborted write must leave nothing"
    with pytest.raises(InputError, match="exists"):
        CSRWriter(tmp_path / "w.h5ad", 25)


def test_chunked_simulator_is_seeded_and_structured(tmp_path: Path) -> None:
    kwargs = {"n_batches": 4, "n_cell_types": 3, "seed": 2, "chunk_size": 120, "batches": [2, 3]}
    a = write_simulated_h5ad(tmp_path / "a.h5ad", 500, 30, **kwargs)
    b = write_simulated_h5ad(tmp_path / "b.h5ad", 500, 30, **kwargs)
    x, y = ad.read_h5ad(a), ad.read_h5ad(b)
    assert np.array_equal(x.X.toarray(), y.X.toarray())
    assert x.obs_names.is_unique and x.obs_names[-1] == "cell499"
    assert set(x.obs["batch"].astype(str)) == {"batch2", "batch3"}
    assert list(x.obs["batch"].cat.categories) == [f"batch{i}" for i in range(4)]
    np.testing.assert_array_equal(x.obs["library"].to_numpy(), x.X.sum(1).A1)
    with h5py.File(a) as f:
        assert f["X"].attrs["encoding-type"] == "csr_matrix"
    # the first chunk is exactly simulate_counts with the same programs
    first = simulate_counts(120, 30, n_batches=4, n_cell_types=3, seed=2, batches=[2, 3], mean_library=1500.0)
    assert np.array_equal(first.X.toarray(), x.X[:120].toarray())


# ------------------------------------------------------------------------------------------ models
@pytest.fixture(scope="module")
def reference(files: dict[str, Path]) -> atlasmap.SCVI:
    model = atlasmap.SCVI(ad.read_h5ad(files["ref"]), batch_key="batch", **SMALL)
    return model.train(3, progress_bar=False)


def test_backed_reference_training_and_latent(files: dict[str, Path], small_chunks: None) -> None:
    backed = read_backed(files["ref"])
    model = atlasmap.SCVI(backed, batch_key="batch", **SMALL).train(3, progress_bar=False)
    assert np.isfinite(model.history["elbo_train"]).all() and model.history["elbo_validation"]
    memory = ad.read_h5ad(files["ref"])
    # the same model embeds the same cells identically from disk and from memory
    np.testing.assert_array_equal(model.get_latent_representation(backed), model.get_latent_representation(memory))


def test_backed_query_surgery_keeps_reference_frozen(files: dict[str, Path], reference: atlasmap.SCVI,
                                                     small_chunks: None) -> None:
    before = {n: p.detach().clone() for n, p in reference.module.named_parameters()}
    query = atlasmap.SCVI.load_query_data(read_backed(files["query"]), reference).train(3, progress_bar=False)
    after = dict(query.module.named_parameters())
    for name, value in before.items():
        assert torch.equal(after[name].detach(), value), f"{name} moved"
    ref_cells = ad.read_h5ad(files["ref"])
    np.testing.assert_array_equal(query.get_latent_representation(ref_cells),
                                  reference.get_latent_representation(ref_cells))


def test_write_latent_outputs(tmp_path: Path, files: dict[str, Path], reference: atlasmap.SCVI,
                              small_chunks: None) -> None:
    backed = read_backed(files["query"])
    model, out = map_query_backed(files["query"], reference, tmp_path / "mapped.h5ad", max_epochs=2,
                                  train_kwargs={"progress_bar": False})
    mapped = ad.read_h5ad(out)
    assert mapped.n_vars == 0 and mapped.n_obs == backed.n_obs
    assert list(mapped.obs_names) == list(backed.obs_names)
    assert (mapped.obs["atlasmap_dataset"] == "query").all()
    expected = model.get_latent_representation(backed)
    np.testing.assert_array_equal(mapped.obsm["X_atlasmap"], expected)
    npy = write_latent(model, backed, tmp_path / "z.npy", batch_size=33)
    np.testing.assert_array_equal(np.load(npy), expected)
    with pytest.raises(InputError, match="exists"):
        write_latent(model, backed, out)
    with pytest.raises(InputError, match=r"\.h5ad or \.npy"):
        write_latent(model, backed, tmp_path / "z.csv")


def test_interrupted_latent_write_leaves_no_output(tmp_path: Path, files: dict[str, Path],
                                                   reference: atlasmap.SCVI, monkeypatch: pytest.MonkeyPatch) -> None:
    import atlasmap.workflow.streaming as streaming

    query = atlasmap.SCVI.load_query_data(read_backed(files["query"]), reference).train(1, progress_bar=False)
    out = tmp_path / "mapped.h5ad"
    out.write_bytes(b"previous result")

    def failing(*args, **kwargs):
        yield slice(0, 1), np.zeros((1, SMALL["n_latent"]), dtype=np.float32)
        raise KeyboardInterrupt

    monkeypatch.setattr(streaming, "iter_latent", failing)
    with pytest.raises(KeyboardInterrupt):
        write_latent(query, read_backed(files["query"]), out, overwrite=True)
    assert out.read_bytes() == b"previous result", "the old output must survive an interrupted run"
    assert [p.name for p in tmp_path.iterdir()] == ["mapped.h5ad"], "temporary files must be removed"


def test_cli_map_backed(tmp_path: Path, files: dict[str, Path], reference: atlasmap.SCVI,
                        capsys: pytest.CaptureFixture[str]) -> None:
    from atlasmap.cli import main

    reference.save(tmp_path / "ref")
    out = tmp_path / "out.h5ad"
    args = ["map", str(files["query"]), "--reference", str(tmp_path / "ref"), "-o", str(out), "--backed",
            "--epochs", "2", "--quiet", "--chunk-size", "64"]
    assert main(args) == 0
    mapped = ad.read_h5ad(out)
    assert mapped.n_vars == 0 and mapped.obsm["X_atlasmap"].shape == (mapped.n_obs, SMALL["n_latent"])
    assert main(args) == 2 and "exists" in capsys.readouterr().err
    memory = ad.read_h5ad(files["query"])
    memory.X = memory.X.toarray()
    memory.write_h5ad(tmp_path / "dense.h5ad")
    assert main(["map", str(tmp_path / "dense.h5ad"), "--reference", str(tmp_path / "ref"), "-o",
                 str(tmp_path / "o2.h5ad"), "--backed", "--quiet"]) == 2
    assert "dense" in capsys.readouterr().err
    assert not (tmp_path / "o2.h5ad").exists()


def test_cli_reference_backed_and_joint_embedding_guard(tmp_path: Path, files: dict[str, Path]) -> None:
    from atlasmap.cli import main
    from atlasmap.workflow.mapping import joint_embedding

    assert main(["reference", str(files["ref"]), "--batch-key", "batch", "-o", str(tmp_path / "m"), "--backed",
                 "--epochs", "2", "--quiet", "--n-hidden", "16", "--chunk-size", "64"]) == 0
    backed = read_backed(files["ref"])
    model = atlasmap.SCVI.load(tmp_path / "m", backed)
    assert model.get_latent_representation().shape == (backed.n_obs, 10)
    with pytest.raises(InputError, match="write_latent"):
        joint_embedding(model, backed)
