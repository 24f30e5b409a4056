"""Messy queries get the fix in the user's own words (issue: "map onto the references people already have").

The table of the issue, row by row, through the command line (errors in flag spelling) and Python:
log-normalised ``.X`` with the counts in a layer or in ``.raw`` (found, named, used), a batch column
named otherwise (the plausible columns listed), a query of known batches only (a way forward that
works). Gene identifiers have their own tests (``test_genes.py``).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
from support import assert_unchanged, snapshot

import atlasmap
from atlasmap.cli import main as cli_main
from atlasmap.errors import InputError


def _log_normalised(query: ad.AnnData) -> ad.AnnData:
    """.X log-normalised as scanpy leaves it; the counts kept in layers['counts']."""
    out = query.copy()
    counts = sp.csr_matrix(out.X)
    out.layers["counts"] = counts.copy()
    norm = counts.multiply(1e4 / np.asarray(counts.sum(1))).tocsr()
    norm.data = np.log1p(norm.data)
    out.X = norm.astype(np.float32)
    return out


@pytest.fixture
def saved_reference(ref_model: Any, tmp_path: Path) -> Path:
    ref_model.save(tmp_path / "ref")
    return tmp_path / "ref"


def _map(query: ad.AnnData, saved_reference: Path, tmp_path: Path, *flags: str) -> int:
    query.write_h5ad(tmp_path / "q.h5ad")
    return cli_main(["map", str(tmp_path / "q.h5ad"), "--reference", str(saved_reference), "-o",
                     str(tmp_path / "out.h5ad"), "--epochs", "1", "--quiet", "--device", "cpu", *flags])


def test_counts_in_a_layer_are_found_named_and_used(ref_model: Any, query_adata: ad.AnnData) -> None:
    expected = atlasmap.SCVI.load_query_data(query_adata, ref_model).get_latent_representation()
    messy = _log_normalised(query_adata)
    snap = snapshot(messy)
    with pytest.warns(UserWarning, match=r"adata\.X does not hold raw counts; reading the raw counts from "
                                         r"adata\.layers\['counts'\].*layer='counts' to choose it explicitly"):
        model = atlasmap.SCVI.load_query_data(messy, ref_model)
    assert np.array_equal(model.get_latent_representation(), expected)
    assert_unchanged(messy, snap)


def test_counts_in_raw_are_found_named_and_used(ref_model: Any, query_adata: ad.AnnData) -> None:
    expected = atlasmap.SCVI.load_query_data(query_adata, ref_model).get_latent_representation()
    messy = query_adata.copy()
    messy.raw = messy  # the counts, all genes
    messy = messy[:, messy.var_names[::2]].copy()  # .X: a gene subset, normalised
    messy.X = np.log1p(messy.X.toarray() / 7.0).astype(np.float32)
    del messy.layers["counts"]
    with pytest.warns(UserWarning, match=r"reading the raw counts from adata\.raw\.X"):
        model = atlasmap.SCVI.load_query_data(messy, ref_model)
    assert np.array_equal(model.get_latent_representation(), expected)  # .raw's genes, not .X's subset


def test_cli_error_names_the_layer_flag_and_where_the_counts_are(saved_reference: Path, query_adata: ad.AnnData,
                                                                 tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    messy = _log_normalised(query_adata)
    messy.layers["raw_counts"] = messy.layers["counts"].copy()  # two candidates: nothing is guessed
    assert _map(messy, saved_reference, tmp_path) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--layer counts" in err and "layer=" not in err, err
    assert "adata.layers['counts'] and adata.layers['raw_counts']" in err, err
    assert not (tmp_path / "out.h5ad").exists()
    assert _map(messy, saved_reference, tmp_path, "--layer", "counts") == 0  # the fix it names works


def test_missing_batch_column_suggests_the_plausible_ones(saved_reference: Path, query_adata: ad.AnnData,
                                                          tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    messy = query_adata.copy()
    messy.obs = messy.obs.rename(columns={"batch": "sample"})
    assert _map(messy, saved_reference, tmp_path) == 2
    err = capsys.readouterr().err
    assert "'batch' is not a column of adata.obs" in err and "pass --batch-key sample" in err, err
    assert "'sample' (2 values)" in err
    assert _map(messy, saved_reference, tmp_path, "--batch-key", "sample") == 0
    with pytest.raises(InputError, match=r"pass batch_key='sample'"):
        atlasmap.SCVI.load_query_data(messy, atlasmap.load(saved_reference))


def test_known_batches_only_has_a_working_way_forward_on_the_cli(saved_reference: Path, ref_adata: ad.AnnData,
                                                                 tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert _map(ref_adata, saved_reference, tmp_path) == 2
    err = capsys.readouterr().err
    assert "--epochs 0" in err and "--unfrozen" in err and "max_epochs" not in err, err
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert _map(ref_adata, saved_reference, tmp_path, "--epochs", "0", "--overwrite") == 0
    mapped = ad.read_h5ad(tmp_path / "out.h5ad")
    reference = atlasmap.load(saved_reference, ref_adata)
    assert np.array_equal(mapped.obsm["X_atlasmap"], reference.get_latent_representation())
