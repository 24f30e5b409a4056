"""Shared fixtures: small seeded simulated AnnData, small trained models, and the shared real data.

Everything is seeded, so a failure reproduces. Models are tiny (a few hundred cells x 48 genes, 32 hidden
units, a few epochs) so the fast suite stays well under a few minutes on two cores. Plain helper
functions live in ``support.py``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import anndata as ad
import pytest
import torch
from support import simulate, split_by_batch, train_query, train_reference

import atlasmap

# Tiny models: one intra-op thread is faster for 32-wide layers and avoids OpenMP spin-wait
# oversubscription when other processes share the machine. Results are deterministic either way.
torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------ data
@pytest.fixture(scope="session")
def sim() -> ad.AnnData:
    """The full simulated dataset (session-wide: never modify it; use the copying fixtures below)."""
    return simulate()


@pytest.fixture
def sim_adata(sim: ad.AnnData) -> ad.AnnData:
    """A fresh copy of the full simulated dataset (640 cells x 48 genes, batches 0-3)."""
    return sim.copy()


@pytest.fixture
def ref_adata(sim: ad.AnnData) -> ad.AnnData:
    """Reference: batches 0 and 1 (about 320 cells), donors d0/d1."""
    return split_by_batch(sim)[0]


@pytest.fixture
def query_adata(sim: ad.AnnData) -> ad.AnnData:
    """Query: batches 2 and 3 (about 320 cells), donors d1/d2."""
    return split_by_batch(sim)[1]


@pytest.fixture
def single_batch_split(sim: ad.AnnData) -> tuple[ad.AnnData, ad.AnnData]:
    """Reference of batch0 only (its batch column has one category); query = batches 2 and 3."""
    ref, _ = split_by_batch(sim, ("batch0",))
    _, query = split_by_batch(sim)
    assert ref.obs["batch"].nunique() == 1
    return ref, query


# ------------------------------------------------------------------------------------------ models
@pytest.fixture(scope="session")
def ref_model(sim: ad.AnnData) -> atlasmap.SCVI:
    """A trained reference (batches 0/1, batch covariate only). Shared: never train it further."""
    ref, _ = split_by_batch(sim)
    return train_reference(ref)


@pytest.fixture(scope="session")
def query_model(sim: ad.AnnData, ref_model: atlasmap.SCVI) -> atlasmap.SCVI:
    """``ref_model`` mapped onto batches 2/3 by surgery and trained. Shared: never train it further."""
    _, query = split_by_batch(sim)
    return train_query(query, ref_model)


# ------------------------------------------------------------------------------------------ real data
def shared_data_root() -> Path:
    """``$ATLASMAP_SHARED_DATA`` if set, else ``../shared/data`` beside the repository."""
    env = os.environ.get("ATLASMAP_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def shared_data() -> Callable[..., Path]:
    """``shared_data("kang2018_ifnb_scgen_valid", "file.h5ad")`` -> its path, or skip saying what is absent."""

    def locate(*parts: str) -> Path:
        root = shared_data_root()
        path = root.joinpath(*parts)
        if not path.is_file():
            pytest.skip(
                f"shared data file {path} is absent (looked under {root}; set ATLASMAP_SHARED_DATA to the "
                "directory that holds kang2018_ifnb_scgen_valid/ to run this test)"
            )
        return path

    return locate
