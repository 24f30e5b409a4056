"""Helpers shared by the test modules (data simulation, small models, AnnData snapshots).

Fixtures live in ``conftest.py``; this module holds the plain functions so tests can import them.
"""

from __future__ import annotations

import copy
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

import atlasmap
from atlasmap.datasets import simulate_counts

N_GENES = 48
REF_BATCHES = ("batch0", "batch1")
QUERY_BATCHES = ("batch2", "batch3")
#: Small architecture used across the suite (two layers, so "every injected layer" means something).
SMALL: dict[str, Any] = {"n_hidden": 32, "n_latent": 6, "n_layers": 2}
REF_EPOCHS = 8
QUERY_EPOCHS = 8


# ------------------------------------------------------------------------------------------ data
def simulate(n_cells: int = 640, seed: int = 7) -> ad.AnnData:
    """Four batches of simulated counts with an extra categorical covariate ``donor`` (reference batches
    use donors d0/d1, query batches d1/d2: one shared, one new) and a continuous covariate ``score``."""
    adata = simulate_counts(
        n_cells=n_cells, n_genes=N_GENES, n_batches=4, n_cell_types=4, batch_effect=0.5,
        mean_library=1000.0, seed=seed,
    )
    rng = np.random.default_rng(seed + 100)
    is_ref = adata.obs["batch"].isin(REF_BATCHES).to_numpy()
    first = rng.random(adata.n_obs) < 0.5
    donor = np.where(is_ref, np.where(first, "d0", "d1"), np.where(first, "d1", "d2"))
    adata.obs["donor"] = pd.Categorical(donor, categories=["d0", "d1", "d2"])
    adata.obs["score"] = rng.normal(0.0, 1.0, adata.n_obs).astype(np.float64)
    adata.uns["note"] = {"source": "simulate_counts", "seed": seed, "array": np.arange(3)}
    adata.layers["counts"] = adata.X.copy()
    assert np.asarray(adata.X.sum(axis=1)).min() > 0, "simulated cells must all have counts"
    return adata


def split_by_batch(adata: ad.AnnData, ref_batches: tuple[str, ...] = REF_BATCHES) -> tuple[ad.AnnData, ad.AnnData]:
    """Reference = cells of ``ref_batches``, query = the rest (copies; unused categories dropped)."""
    is_ref = adata.obs["batch"].isin(ref_batches).to_numpy()
    ref, query = adata[is_ref].copy(), adata[~is_ref].copy()
    for part in (ref, query):
        for key in ("batch", "donor"):
            part.obs[key] = part.obs[key].cat.remove_unused_categories()
    return ref, query


# ------------------------------------------------------------------------------------------ models
def train_reference(adata: ad.AnnData, *, epochs: int = REF_EPOCHS, train_kwargs: dict | None = None,
                    **model_kwargs: Any) -> atlasmap.SCVI:
    """A small SCVI (``SMALL`` architecture, batch key ``batch`` unless overridden) trained a few epochs."""
    kwargs = {"batch_key": "batch", **SMALL, **model_kwargs}
    model = atlasmap.SCVI(adata, **kwargs)
    return model.train(epochs, progress_bar=False, **(train_kwargs or {}))


def train_query(adata: ad.AnnData, reference: Any, *, epochs: int = QUERY_EPOCHS, train_kwargs: dict | None = None,
                **surgery_kwargs: Any) -> atlasmap.SCVI:
    """``SCVI.load_query_data(adata, reference, **surgery_kwargs)`` trained a few epochs."""
    query = atlasmap.SCVI.load_query_data(adata, reference, **surgery_kwargs)
    return query.train(epochs, progress_bar=False, **(train_kwargs or {}))


def parameters(model: Any) -> dict[str, Any]:
    """Detached copies of every parameter of ``model.module`` by name."""
    return {name: p.detach().clone() for name, p in model.module.named_parameters()}


# ------------------------------------------------------------------------------------------ AnnData snapshots
def snapshot(adata: ad.AnnData) -> dict[str, Any]:
    """A deep, independent copy of everything a caller could notice changing in an AnnData."""
    return {
        "X": _copy_matrix(adata.X),
        "obs": adata.obs.copy(deep=True),
        "var": adata.var.copy(deep=True),
        "obs_names": list(adata.obs_names),
        "var_names": list(adata.var_names),
        "layers": {k: _copy_matrix(v) for k, v in adata.layers.items()},
        "obsm": {k: np.array(v, copy=True) for k, v in adata.obsm.items()},
        "uns": copy.deepcopy(dict(adata.uns)),
        "shape": adata.shape,
    }


def _copy_matrix(m: Any) -> Any:
    return m.copy() if sp.issparse(m) else np.array(m, copy=True)


def _assert_same_matrix(a: Any, b: Any, what: str) -> None:
    assert type(a) is type(b), f"{what}: type changed from {type(b).__name__} to {type(a).__name__}"
    assert a.dtype == b.dtype, f"{what}: dtype changed from {b.dtype} to {a.dtype}"
    assert a.shape == b.shape, f"{what}: shape changed"
    if sp.issparse(a):
        for attr in ("data", "indices", "indptr"):
            x, y = getattr(a, attr), getattr(b, attr)
            assert x.dtype == y.dtype and np.array_equal(x, y), f"{what}.{attr} changed"
    else:
        assert np.array_equal(a, b, equal_nan=a.dtype.kind == "f"), f"{what} values changed"


def _assert_same_uns(a: Any, b: Any, path: str = "uns") -> None:
    assert type(a) is type(b), f"{path}: type changed"
    if isinstance(a, dict):
        assert set(a) == set(b), f"{path}: keys changed ({sorted(set(a) ^ set(b))})"
        for k in a:
            _assert_same_uns(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b), f"{path} changed"
    else:
        assert a == b, f"{path} changed"


def assert_unchanged(adata: ad.AnnData, snap: dict[str, Any]) -> None:
    """Fail if ``adata`` differs in any way from ``snap`` (taken with :func:`snapshot`)."""
    assert adata.shape == snap["shape"]
    assert list(adata.obs_names) == snap["obs_names"], "obs_names changed"
    assert list(adata.var_names) == snap["var_names"], "var_names changed"
    _assert_same_matrix(adata.X, snap["X"], "X")
    pd.testing.assert_frame_equal(adata.obs, snap["obs"], check_exact=True, check_categorical=True)
    pd.testing.assert_frame_equal(adata.var, snap["var"], check_exact=True)
    assert set(adata.layers.keys()) == set(snap["layers"]), "layers were added or removed"
    for k, v in snap["layers"].items():
        _assert_same_matrix(adata.layers[k], v, f"layers[{k!r}]")
    assert set(adata.obsm.keys()) == set(snap["obsm"]), "obsm entries were added or removed"
    for k, v in snap["obsm"].items():
        assert np.array_equal(np.asarray(adata.obsm[k]), v), f"obsm[{k!r}] changed"
    _assert_same_uns(dict(adata.uns), snap["uns"])
