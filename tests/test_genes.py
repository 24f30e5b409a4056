"""Gene identifiers matched for the user: a better ``.var`` column found automatically, Ensembl version
suffixes ignored, case-insensitive matching as a warned last resort, collisions refused, input untouched.

Every mapping through other identifiers must give *exactly* the latent the same query gives with the
reference's own identifiers in ``var_names`` (same genes, same order after alignment).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from support import assert_unchanged, snapshot

import atlasmap
from atlasmap.cli import main as cli_main
from atlasmap.data.align import align_genes, gene_keys
from atlasmap.errors import InputError

EPOCHS = 2


def _ensembl(i: int, version: int | None = None) -> str:
    return f"ENSG{i:011d}" + ("" if version is None else f".{version}")


def _with_ids(query: ad.AnnData, *, version: int | None = None) -> ad.AnnData:
    """The query with Ensembl-like IDs as var_names and the reference's symbols in var['gene_symbols']."""
    out = query.copy()
    out.var["gene_symbols"] = list(out.var_names)
    out.var_names = [_ensembl(i, version) for i in range(out.n_vars)]
    return out


def _latent(query: ad.AnnData, reference: Any, **kwargs: Any) -> np.ndarray:
    model = atlasmap.SCVI.load_query_data(query, reference, **kwargs)
    model.train(EPOCHS, progress_bar=False, device="cpu")
    return model.get_latent_representation()


@pytest.fixture(scope="module")
def expected(ref_model: Any, query_adata_module: ad.AnnData) -> np.ndarray:
    return _latent(query_adata_module, ref_model)


@pytest.fixture(scope="module")
def query_adata_module(sim: ad.AnnData) -> ad.AnnData:
    from support import split_by_batch

    return split_by_batch(sim)[1]


def test_var_column_found_when_it_matches_better(ref_model: Any, query_adata_module: ad.AnnData,
                                                 expected: np.ndarray) -> None:
    query = _with_ids(query_adata_module)
    snap = snapshot(query)
    with pytest.warns(UserWarning, match=r"only 0 of the model's 48 genes .* adata\.var\['gene_symbols'\] holds 48 "
                                         r"of them \(100\.0%\).*var_names_column='gene_symbols'"):
        latent = _latent(query, ref_model)
    assert np.array_equal(latent, expected)
    assert_unchanged(query, snap)
    explicit = _latent(query, ref_model, var_names_column="gene_symbols")
    assert np.array_equal(explicit, expected)


def test_ensembl_version_suffixes_are_ignored() -> None:
    model_names = tuple(_ensembl(i, 3) for i in range(5))
    data = pd.Index([_ensembl(i, 7) for i in (4, 0, 1, 2, 3)])
    alignment = align_genes(data, model_names)
    assert list(alignment.source_index) == [1, 2, 3, 4, 0] and alignment.n_missing == 0
    assert list(gene_keys(["ENSMUSG00000000001.4", "CD3E", "ENSG00000141510"])) == [
        "ENSMUSG00000000001", "CD3E", "ENSG00000141510"]


def test_case_insensitive_match_warns_before_it_is_used(ref_model: Any, query_adata_module: ad.AnnData,
                                                        expected: np.ndarray) -> None:
    query = query_adata_module.copy()
    query.var_names = [g.upper() for g in query.var_names]  # GENE0 vs the model's gene0
    with pytest.warns(UserWarning, match=r"matches 0 of the model's 48 genes exactly but 48 ignoring case"):
        latent = _latent(query, ref_model)
    assert np.array_equal(latent, expected)


def test_identifiers_colliding_after_the_mapping_are_refused(ref_model: Any, query_adata_module: ad.AnnData) -> None:
    query = _with_ids(query_adata_module)
    query.var.iloc[5, query.var.columns.get_loc("gene_symbols")] = "gene4"  # two IDs -> one model gene
    snap = snapshot(query)
    with pytest.raises(InputError, match=r"maps several of the data's genes to the same model gene .*'gene4' <- "
                                         r"'ENSG00000000004', 'ENSG00000000005'.*does not guess"):
        atlasmap.SCVI.load_query_data(query, ref_model, var_names_column="gene_symbols")
    assert_unchanged(query, snap)


def test_unknown_var_names_column_is_refused(ref_model: Any, query_adata_module: ad.AnnData) -> None:
    query = _with_ids(query_adata_module)
    with pytest.raises(InputError, match=r"var_names_column 'symbol' is not a column of adata.var \(text columns: "
                                         r"'gene_symbols'\)"):
        atlasmap.SCVI.load_query_data(query, ref_model, var_names_column="symbol")


def test_no_overlap_names_the_columns_that_could_hold_the_genes(ref_model: Any,
                                                                query_adata_module: ad.AnnData) -> None:
    query = _with_ids(query_adata_module)
    query.var["gene_symbols"] = [f"other{i}" for i in range(query.n_vars)]
    with pytest.raises(InputError, match=r"none of the model's 48 genes are in the data.*'gene_symbols' "
                                         r"\(var_names_column='gene_symbols'\)"):
        atlasmap.SCVI.load_query_data(query, ref_model)


def test_cli_var_names_column_and_errors_in_flag_spelling(ref_model: Any, query_adata_module: ad.AnnData,
                                                          tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ref_model.save(tmp_path / "ref")
    query = _with_ids(query_adata_module)
    query.write_h5ad(tmp_path / "q.h5ad")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cli_main(["map", str(tmp_path / "q.h5ad"), "--reference", str(tmp_path / "ref"), "-o",
                         str(tmp_path / "out.h5ad"), "--epochs", "1", "--quiet", "--var-names-column",
                         "gene_symbols", "--device", "cpu"]) == 0
    assert ad.read_h5ad(tmp_path / "out.h5ad").obsm["X_atlasmap"].shape == (query.n_obs, 6)
    capsys.readouterr()
    assert cli_main(["map", str(tmp_path / "q.h5ad"), "--reference", str(tmp_path / "ref"), "-o",
                     str(tmp_path / "out2.h5ad"), "--quiet", "--var-names-column", "symbol"]) == 2
    err = capsys.readouterr().err
    assert "no --var-names-column" in err and "var_names_column=" not in err, err
    assert not (tmp_path / "out2.h5ad").exists()
