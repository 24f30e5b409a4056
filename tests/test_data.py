"""Input validation (registry), gene / category alignment and the minibatch loader."""

from __future__ import annotations

import functools
import re
import warnings
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from support import N_GENES, SMALL, train_reference

import atlasmap
from atlasmap.data import loader
from atlasmap.data.align import align_genes, reorder_genes
from atlasmap.data.loader import gather_csr_rows, minibatches, prepare_cells
from atlasmap.data.registry import SINGLE_BATCH, Registry, build_registry, get_counts
from atlasmap.errors import InputError


def _tiny(x: Any, **obs: Any) -> ad.AnnData:
    x = x if sp.issparse(x) else np.asarray(x)
    n, g = x.shape
    adata = ad.AnnData(x, obs=pd.DataFrame(obs, index=[f"c{i}" for i in range(n)]),
                       var=pd.DataFrame(index=[f"g{j}" for j in range(g)]))
    return adata


# ------------------------------------------------------------------------------------------ counts validation
def test_log_normalised_x_suggests_layer(ref_adata: Any) -> None:
    ref_adata.X = sp.csr_matrix(np.log1p(ref_adata.layers["counts"].toarray()))
    with pytest.raises(InputError, match=r"non-integer values.*layer='counts'") as err:
        atlasmap.SCVI(ref_adata, batch_key="batch")
    # the message shows the offending value and where it is
    first = ref_adata.X.tocoo()
    assert f"cell {ref_adata.obs_names[first.row[0]]!r}" in str(err.value)
    assert re.search(r"e\.g\. \d\.\d+ at cell", str(err.value))


def test_counts_in_a_layer_work_and_match_counts_in_x(ref_adata: Any) -> None:
    logged = ref_adata.copy()
    logged.X = sp.csr_matrix(np.log1p(logged.layers["counts"].toarray()))
    from_layer = train_reference(logged, layer="counts", epochs=2)
    from_x = train_reference(ref_adata, epochs=2)
    assert from_layer.registry.layer == "counts"
    assert np.array_equal(from_layer.get_latent_representation(), from_x.get_latent_representation())


def test_missing_layer_is_named(ref_adata: Any) -> None:
    with pytest.raises(InputError, match=r"layer 'raw' is not in adata.layers \(layers: 'counts'\)"):
        atlasmap.SCVI(ref_adata, batch_key="batch", layer="raw")


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "csr"])
@pytest.mark.parametrize(("bad", "message"), [
    (-1.0, r"1 negative values \(e\.g\. at cell 'c1', gene 'g2'\)"),
    (np.nan, r"1 NaN or infinite values \(e\.g\. at cell 'c1', gene 'g2'\)"),
    (np.inf, r"1 NaN or infinite values \(e\.g\. at cell 'c1', gene 'g2'\)"),
    (-np.inf, r"1 NaN or infinite values"),
    (2.0**25, r"above 2\^24"),
], ids=["negative", "nan", "inf", "-inf", "huge"])
def test_bad_values_are_refused(bad: float, message: str, sparse: bool) -> None:
    x = np.arange(1, 13, dtype=np.float32).reshape(3, 4)
    x[1, 2] = bad
    adata = _tiny(sp.csr_matrix(x) if sparse else x)
    with pytest.raises(InputError, match=message):
        atlasmap.SCVI(adata)


def test_negative_integer_counts_are_refused() -> None:
    x = np.arange(12, dtype=np.int32).reshape(3, 4)
    x[2, 0] = -3
    with pytest.raises(InputError, match="negative values .*cell 'c2', gene 'g0'"):
        atlasmap.SCVI(_tiny(x))


def test_non_numeric_x_is_refused() -> None:
    adata = _tiny(np.ones((2, 2)))
    adata.layers["text"] = np.array([["a", "b"], ["c", "d"]], dtype=object)
    with pytest.raises(InputError, match=r"adata\.layers\['text'\] has dtype object; atlasmap needs numeric raw counts"):
        get_counts(adata, "text")


def test_missing_batch_key_lists_columns(ref_adata: Any) -> None:
    with pytest.raises(InputError, match=r"batch key 'sample' is not a column of adata\.obs .*'batch'") as err:
        atlasmap.SCVI(ref_adata, batch_key="sample")
    assert "columns: 'batch', 'cell_type'" in str(err.value)


def test_missing_categorical_covariate_key(ref_adata: Any) -> None:
    with pytest.raises(InputError, match=r"categorical covariate key 'site' is not a column of adata\.obs"):
        atlasmap.SCVI(ref_adata, batch_key="batch", categorical_covariate_keys=["site"])


def test_nan_in_batch_key(ref_adata: Any) -> None:
    batch = ref_adata.obs["batch"].astype(object)
    batch.iloc[[3, 7]] = np.nan
    ref_adata.obs["batch"] = batch
    with pytest.raises(InputError, match=rf"2 missing \(NaN\) values \(e\.g\. cell '{ref_adata.obs_names[3]}'\)"):
        atlasmap.SCVI(ref_adata, batch_key="batch")


def test_nan_in_categorical_covariate(ref_adata: Any) -> None:
    ref_adata.obs["donor"] = ref_adata.obs["donor"].cat.add_categories("x")
    ref_adata.obs.loc[ref_adata.obs_names[0], "donor"] = np.nan
    with pytest.raises(InputError, match=r"adata\.obs\['donor'\] has 1 missing"):
        atlasmap.SCVI(ref_adata, batch_key="batch", categorical_covariate_keys=["donor"])


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_bad_continuous_covariate(ref_adata: Any, value: float) -> None:
    ref_adata.obs["score"] = ref_adata.obs["score"].astype(float)
    ref_adata.obs.loc[ref_adata.obs_names[5], "score"] = value
    with pytest.raises(InputError, match="score"):
        atlasmap.SCVI(ref_adata, batch_key="batch", continuous_covariate_keys=["score"])


def test_non_numeric_continuous_covariate(ref_adata: Any) -> None:
    with pytest.raises(InputError, match=r"continuous covariate adata\.obs\['donor'\] is not numeric"):
        atlasmap.SCVI(ref_adata, batch_key="batch", continuous_covariate_keys=["donor"])


def test_covariate_given_twice(ref_adata: Any) -> None:
    with pytest.raises(InputError, match="given twice"):
        atlasmap.SCVI(ref_adata, batch_key="batch", categorical_covariate_keys=["batch"])


@pytest.mark.parametrize("shape", [(0, 5), (4, 0), (0, 0)])
def test_empty_anndata(shape: tuple[int, int]) -> None:
    adata = ad.AnnData(np.zeros(shape, dtype=np.float32))
    with pytest.raises(InputError, match=rf"empty \({shape[0]} cells x {shape[1]} genes\)"):
        atlasmap.SCVI(adata)


def test_not_an_anndata() -> None:
    with pytest.raises(InputError, match="expected an AnnData, got ndarray"):
        atlasmap.SCVI(np.ones((3, 3)))


def test_duplicate_gene_names(ref_adata: Any) -> None:
    names = list(ref_adata.var_names)
    names[5] = names[2]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anndata warns about non-unique names itself
        ref_adata.var_names = names
    with pytest.raises(InputError, match=rf"gene \(var\) names are not unique \(e\.g\. '{names[2]}'\).*var_names_make_unique"):
        atlasmap.SCVI(ref_adata, batch_key="batch")


def test_duplicate_gene_names_in_query(ref_model: Any, query_adata: Any) -> None:
    names = list(query_adata.var_names)
    names[1] = names[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        query_adata.var_names = names
    with pytest.raises(InputError, match="not unique"):
        atlasmap.SCVI.load_query_data(query_adata, ref_model)


def test_duplicate_cell_names(ref_adata: Any) -> None:
    names = list(ref_adata.obs_names)
    names[9] = names[4]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_adata.obs_names = names
    with pytest.raises(InputError, match=rf"cell \(obs\) names are not unique \(e\.g\. '{names[4]}'\).*obs_names_make_unique"):
        atlasmap.SCVI(ref_adata, batch_key="batch")


def test_zero_count_cells_are_refused(ref_adata: Any) -> None:
    x = ref_adata.X.toarray()
    x[[4, 10]] = 0
    ref_adata.X = sp.csr_matrix(x)
    model = atlasmap.SCVI(ref_adata, batch_key="batch", **SMALL)
    with pytest.raises(InputError, match=rf"2 cells have no counts .*'{ref_adata.obs_names[4]}'.*filter_cells"):
        model.train(1, progress_bar=False)


def test_zero_count_cells_refused_at_setup_with_learned_library(ref_adata: Any) -> None:
    x = ref_adata.X.toarray()
    x[0] = 0
    ref_adata.X = sp.csr_matrix(x)
    with pytest.raises(InputError, match="no counts"):
        atlasmap.SCVI(ref_adata, batch_key="batch", use_observed_lib_size=False)


MATRIX_KINDS = {
    "csr_float32": lambda x: sp.csr_matrix(x.astype(np.float32)),
    "csc_float32": lambda x: sp.csc_matrix(x.astype(np.float32)),
    "csr_float64": lambda x: sp.csr_matrix(x.astype(np.float64)),
    "csr_int64": lambda x: sp.csr_matrix(x.astype(np.int64)),
    "dense_float64": lambda x: x.astype(np.float64),
    "dense_int32": lambda x: x.astype(np.int32),
    "dense_uint16": lambda x: x.astype(np.uint16),
}


def test_matrix_formats_and_dtypes_give_the_same_counts(ref_adata: Any) -> None:
    dense = ref_adata.X.toarray()
    results = {}
    for name, make in MATRIX_KINDS.items():
        adata = ref_adata.copy()
        adata.X = make(dense)
        csr = get_counts(adata, None)
        assert isinstance(csr, sp.csr_matrix) and csr.dtype == np.float32, name
        assert csr.has_canonical_format, name
        results[name] = csr
    ref = results["csr_float32"]
    for name, csr in results.items():
        for attr in ("indptr", "indices", "data"):
            assert np.array_equal(getattr(csr, attr), getattr(ref, attr)), f"{name}.{attr}"
    assert np.array_equal(ref.toarray(), dense)


@pytest.mark.parametrize("kind", ["csc_float32", "dense_float64", "dense_int32", "csr_int64"])
def test_matrix_formats_give_bit_identical_models(kind: str, ref_adata: Any) -> None:
    variant = ref_adata.copy()
    variant.X = MATRIX_KINDS[kind](ref_adata.X.toarray())
    a = train_reference(ref_adata, epochs=2)
    b = train_reference(variant, epochs=2)
    assert np.array_equal(a.get_latent_representation(), b.get_latent_representation())
    assert a.history["elbo_train"] == b.history["elbo_train"]


def test_get_counts_never_lets_a_write_reach_the_input(ref_adata: Any) -> None:
    """Canonical float32 CSR input is shared read-only (no copy: memory); anything else is copied.
    Either way a write to the result cannot change the caller's matrix."""
    before = ref_adata.X.copy()
    assert ref_adata.X.dtype == np.float32 and ref_adata.X.has_canonical_format
    csr = get_counts(ref_adata, None)
    assert np.shares_memory(csr.data, ref_adata.X.data)
    with pytest.raises(ValueError, match="read-only"):
        csr.data[:] = -5
    other = ref_adata.copy()
    other.X = other.X.astype(np.float64)
    copied = get_counts(other, None)
    assert copied.dtype == np.float32 and not np.shares_memory(copied.data, other.X.data)
    copied.data[:] = -5
    assert np.array_equal(ref_adata.X.data, before.data) and (other.X.data >= 0).all()


# ------------------------------------------------------------------------------------------ registry
def test_registry_category_order_and_round_trip(ref_adata: Any) -> None:
    adata = ref_adata.copy()
    # categorical: category order, unused categories dropped; strings: sorted
    adata.obs["batch"] = adata.obs["batch"].cat.set_categories(["batch1", "unused", "batch0"])
    adata.obs["donor"] = adata.obs["donor"].astype(str)
    reg = build_registry(adata, batch_key="batch", categorical_covariate_keys=["donor"],
                         continuous_covariate_keys=["score"], layer="counts")
    assert reg.categories == {"batch": ("batch1", "batch0"), "donor": ("d0", "d1")}
    assert reg.categorical_keys == ("batch", "donor") and reg.batch_key == "batch"
    assert reg.n_categories == [2, 2] and reg.n_batch == 2 and reg.n_vars == N_GENES
    assert reg.var_names == tuple(adata.var_names)
    assert Registry.from_dict(reg.to_dict()) == reg
    assert Registry.from_dict(reg.to_dict()).categories == reg.categories


def test_registry_without_batch_key_has_one_batch(ref_adata: Any) -> None:
    reg = build_registry(ref_adata, batch_key=None, categorical_covariate_keys=["donor"])
    assert reg.batch_key == SINGLE_BATCH
    assert reg.categorical_keys == (SINGLE_BATCH, "donor")
    assert reg.categories[SINGLE_BATCH] == ("0",)
    model = atlasmap.SCVI(ref_adata, batch_key=None, **SMALL)
    # the single batch still has its own covariate row in every injected layer
    assert [len(layer.covariates) for layer in model.module.encoder.layers] == [1] * SMALL["n_layers"]
    assert model.module.encoder.layers[0].covariates[0].block_sizes == [1]


# ------------------------------------------------------------------------------------------ gene alignment
def test_reordered_genes_give_identical_latent(ref_model: Any, ref_adata: Any) -> None:
    perm = np.random.default_rng(0).permutation(ref_adata.n_vars)
    shuffled = ref_adata[:, perm].copy()
    assert list(shuffled.var_names) != list(ref_adata.var_names)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a pure reordering is silent
        z = ref_model.get_latent_representation(shuffled)
    assert np.array_equal(z, ref_model.get_latent_representation(ref_adata))


def test_missing_genes_zero_filled_with_warning(ref_model: Any, ref_adata: Any) -> None:
    drop = [ref_adata.var_names[i] for i in (1, 7, 20, 33, 40)]
    subset = ref_adata[:, ~ref_adata.var_names.isin(drop)].copy()
    zeroed = ref_adata.copy()
    x = zeroed.X.toarray()
    x[:, zeroed.var_names.isin(drop)] = 0
    zeroed.X = sp.csr_matrix(x)
    with pytest.warns(UserWarning, match=r"^5 of the model's 48 genes \(10\.4%\) are missing from the data and are filled with zeros\.$"):
        z = ref_model.get_latent_representation(subset)
    assert np.array_equal(z, ref_model.get_latent_representation(zeroed))


def test_low_overlap_warning_mentions_80_percent(ref_model: Any, ref_adata: Any) -> None:
    keep = ref_adata.var_names[:30]  # 62.5%: allowed, but below the 80% warning level
    with pytest.warns(UserWarning, match=r"18 of the model's 48 genes \(37\.5%\).*overlap 62\.5% is below 80%"):
        ref_model.get_latent_representation(ref_adata[:, keep].copy())


def test_extra_genes_are_dropped(ref_model: Any, ref_adata: Any) -> None:
    rng = np.random.default_rng(1)
    extra = ad.AnnData(sp.csr_matrix(rng.poisson(3.0, (ref_adata.n_obs, 6)).astype(np.float32)),
                       obs=ref_adata.obs[[]], var=pd.DataFrame(index=[f"extra{i}" for i in range(6)]))
    wider = ad.concat([extra, ref_adata], axis=1, merge="first")
    wider.obs = ref_adata.obs.copy()
    assert wider.n_vars == N_GENES + 6
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        z = ref_model.get_latent_representation(wider)
    assert np.array_equal(z, ref_model.get_latent_representation(ref_adata))


def test_too_small_overlap_errors_and_says_how_to_override(ref_model: Any, query_adata: Any) -> None:
    small = query_adata[:, :20].copy()  # 20 / 48 = 41.7% < 50%
    with pytest.raises(InputError, match=r"only 20 of the model's 48 genes \(41\.7%\).*minimum overlap of 50%.*min_gene_overlap="):
        atlasmap.SCVI.load_query_data(small, ref_model)
    with pytest.warns(UserWarning, match="28 of the model's 48 genes"):
        query = atlasmap.SCVI.load_query_data(small, ref_model, min_gene_overlap=0.4)
    query.train(1, progress_bar=False)
    assert query.get_latent_representation().shape == (small.n_obs, SMALL["n_latent"])


@pytest.mark.parametrize("min_gene_overlap", [None, 0.0])
def test_zero_gene_overlap_errors(ref_model: Any, query_adata: Any, min_gene_overlap: float | None) -> None:
    renamed = query_adata.copy()
    renamed.var_names = [f"ENSG{i:011d}" for i in range(renamed.n_vars)]
    with pytest.raises(InputError, match=r"none of the model's 48 genes are in the data .*'ENSG00000000000'.*Ensembl"):
        atlasmap.SCVI.load_query_data(renamed, ref_model, min_gene_overlap=min_gene_overlap)


def test_query_with_no_genes_at_all(ref_model: Any, query_adata: Any) -> None:
    empty = query_adata[:, []].copy()
    with pytest.raises(InputError, match="empty"):
        atlasmap.SCVI.load_query_data(empty, ref_model)


def test_query_whose_model_genes_are_all_zero(ref_model: Any, query_adata: Any) -> None:
    """The model's genes are there but hold no counts (e.g. a different gene panel zero-padded)."""
    zeros = query_adata.copy()
    zeros.X = sp.csr_matrix(zeros.X.shape, dtype=np.float32)
    with pytest.raises(InputError, match=rf"{zeros.n_obs} cells have no counts in the model's genes"):
        atlasmap.SCVI.load_query_data(zeros, ref_model)


def test_align_and_reorder_genes_directly() -> None:
    model_genes = ("a", "b", "c", "d")
    data_genes = pd.Index(["d", "x", "b", "a"])
    with pytest.warns(UserWarning, match="1 of the model's 4 genes"):
        alignment = align_genes(data_genes, model_genes)
    assert alignment.source_index.tolist() == [3, 2, -1, 0]
    assert (alignment.n_missing, alignment.n_extra, alignment.is_identity) == (1, 1, False)
    counts = sp.csr_matrix(np.array([[1, 2, 3, 4], [5, 0, 7, 0]], dtype=np.float32))
    out = reorder_genes(counts, alignment)
    assert np.array_equal(out.toarray(), np.array([[4, 3, 0, 1], [0, 7, 0, 5]], dtype=np.float32))
    identity = align_genes(pd.Index(list(model_genes)), model_genes)
    assert identity.is_identity and reorder_genes(counts, identity) is counts


# ------------------------------------------------------------------------------------------ loader
def _random_csr(rng: np.random.Generator, n: int, g: int, density: float) -> sp.csr_matrix:
    x = rng.poisson(2.0, (n, g)).astype(np.float32) * (rng.random((n, g)) < density)
    x[rng.random(n) < 0.2] = 0  # some empty rows
    return sp.csr_matrix(x)


@pytest.mark.parametrize("seed", range(5))
def test_gather_csr_rows_equals_scipy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    csr = _random_csr(rng, 50, 17, density=[0.05, 0.3, 0.9, 0.0, 1.0][seed])
    for rows in (np.arange(50), rng.permutation(50)[:13], rng.integers(0, 50, 40), np.array([7]),
                 np.flatnonzero(np.diff(csr.indptr) == 0)):
        got = gather_csr_rows(csr, rows)
        assert got.dtype == np.float32 and got.shape == (rows.size, 17)
        assert np.array_equal(got, csr[rows].toarray())


def test_gather_csr_rows_int64_indptr() -> None:
    rng = np.random.default_rng(9)
    csr = _random_csr(rng, 30, 11, 0.4)
    big = sp.csr_matrix((csr.data, csr.indices.astype(np.int64), csr.indptr.astype(np.int64)), shape=csr.shape)
    rows = rng.integers(0, 30, 25)
    assert np.array_equal(gather_csr_rows(big, rows), csr[rows].toarray())


@pytest.mark.parametrize("index_dtype", [np.int32, np.int64])
def test_compiled_row_gather_matches_numpy(index_dtype: type, monkeypatch: pytest.MonkeyPatch) -> None:
    from atlasmap import ops

    if not ops.available():
        pytest.skip("compiled kernel not built")
    rng = np.random.default_rng(4)
    csr = _random_csr(rng, 300, 517, 0.2)
    csr = sp.csr_matrix((csr.data, csr.indices.astype(index_dtype), csr.indptr.astype(index_dtype)), shape=csr.shape)
    cells = loader.CellData(csr, {})
    rows = rng.integers(0, 300, 257)  # repeats, any order, large enough to use both threads
    fast = cells.batch(rows)["x"]
    monkeypatch.setenv("ATLASMAP_KERNEL", "0")
    slow = loader.CellData(csr, {}).batch(rows)["x"]
    assert torch.equal(fast, slow)
    assert torch.equal(fast, torch.from_numpy(csr[rows].toarray().astype(np.float32)))


def test_layout_rule_prefers_the_smaller_copy() -> None:
    from atlasmap import ops

    sparse_data = sp.random(1000, 1000, density=0.05, format="csr", dtype=np.float32, random_state=0)
    dense_data = sp.random(1000, 1000, density=0.9, format="csr", dtype=np.float32, random_state=0)
    assert loader.use_dense(dense_data)
    assert loader.use_dense(sparse_data) is not ops.available()
    assert not loader.use_dense(dense_data, dense_budget_bytes=1000)


def test_dense_and_sparse_loader_paths_agree(ref_adata: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    model = atlasmap.SCVI(ref_adata, batch_key="batch", **SMALL)
    dense = prepare_cells(ref_adata, model.registry, dense=True)
    sparse = prepare_cells(ref_adata, model.registry, dense_budget_bytes=0)
    assert isinstance(dense.counts, torch.Tensor) and sp.issparse(sparse.counts)
    rows = np.random.default_rng(0).permutation(ref_adata.n_obs)[:50]
    a, b = dense.batch(rows), sparse.batch(rows)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert torch.equal(a["x"], torch.from_numpy(ref_adata.X[rows].toarray()))
    # a whole model trained through the sparse path is bit-identical to the dense one
    import atlasmap.models.base as base

    monkeypatch.setattr(base, "prepare_cells", functools.partial(loader.prepare_cells, dense=True))
    dense_model = train_reference(ref_adata, epochs=2)
    assert isinstance(dense_model._cells().counts, torch.Tensor)
    z_dense = dense_model.get_latent_representation()
    monkeypatch.setattr(base, "prepare_cells", functools.partial(loader.prepare_cells, dense_budget_bytes=0))
    sparse_model = train_reference(ref_adata, epochs=2)
    assert sp.issparse(sparse_model._cells().counts)
    assert np.array_equal(sparse_model.get_latent_representation(), z_dense)


def test_category_codes_and_continuous_fields(ref_adata: Any) -> None:
    model = atlasmap.SCVI(ref_adata, batch_key="batch", categorical_covariate_keys=["donor"],
                          continuous_covariate_keys=["score"], **SMALL)
    cells = prepare_cells(ref_adata, model.registry)
    cat = cells.fields["cat"].numpy()
    assert cat.dtype == np.int64 and cat.shape == (ref_adata.n_obs, 2)
    assert np.array_equal(cat[:, 0], ref_adata.obs["batch"].cat.codes.to_numpy())
    assert np.array_equal(cat[:, 1], ref_adata.obs["donor"].cat.codes.to_numpy())
    assert np.array_equal(cells.fields["cont"].numpy()[:, 0], ref_adata.obs["score"].to_numpy(np.float32))


@pytest.mark.parametrize(("n", "size"), [(10, 3), (10, 5), (10, 9), (1, 4), (301, 100), (7, 128)])
def test_minibatches_cover_every_cell_once(n: int, size: int) -> None:
    for shuffle in (False, True):
        batches = list(minibatches(n, size, shuffle=shuffle, generator=np.random.default_rng(0)))
        assert np.array_equal(np.sort(np.concatenate(batches)), np.arange(n))
        if n > size:
            assert all(b.size >= 2 for b in batches), "a one-cell minibatch was produced"
        assert not shuffle or n < 3 or not np.array_equal(np.concatenate(batches), np.arange(n))
