"""Surface-protein counts (CITE-seq ADTs) for totalVI: read, validate, align by name, mask (numpy/pandas).

A protein value is *measured* for a cell when its name is in the data's panel, the value is not NaN, and
the cell's batch measured that protein (a protein with zero counts in every cell of a batch counts as not
measured, as in scvi-tools, unless ``override_missing_proteins``). Unmeasured values are masked: they are
left out of the likelihood and replaced by a fixed constant in the encoder input, so they cannot affect
the loss or the latent.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from atlasmap.errors import InputError

#: Fewer measured proteins than this in a batch: no empirical background prior (too few to fit).
MIN_PROTEINS_FOR_PRIOR = 5
#: Cells sampled per batch for the empirical background prior (scvi-tools uses 100).
PRIOR_CELLS = 100


@dataclass(frozen=True)
class ProteinData:
    """Protein counts of one AnnData aligned to a model's protein list.

    Attributes
    ----------
    values
        Cells x model proteins, float32; unmeasured entries are 0.
    present
        Cells x model proteins, bool: the value is in the data (name in the panel, not NaN). Batch
        masks are applied on top of this by the model.
    n_missing_names
        Model proteins absent from the data's panel.
    """

    values: np.ndarray
    present: np.ndarray
    n_missing_names: int


def read_proteins(adata: Any, obsm_key: str, names_uns_key: str | None) -> tuple[np.ndarray, tuple[str, ...]]:
    """Protein counts (cells x proteins, float32, NaN = not measured) and protein names of ``adata``.

    ``adata.obsm[obsm_key]`` is a DataFrame (names are its columns) or an array/sparse matrix whose
    names are in ``adata.uns[names_uns_key]``. Nothing is modified.

    Raises
    ------
    InputError
        Key absent, names absent, duplicated or of the wrong length, values not non-negative integer
        counts (NaN is allowed and means "not measured").
    """
    if obsm_key not in adata.obsm:
        keys = ", ".join(map(repr, adata.obsm.keys())) or "none"
        raise InputError(
            f"protein key {obsm_key!r} is not in adata.obsm (obsm keys: {keys}); pass "
            "protein_expression_obsm_key= (CLI: --protein-key) naming the protein (ADT) counts."
        )
    raw = adata.obsm[obsm_key]
    where = f"adata.obsm[{obsm_key!r}]"
    if isinstance(raw, pd.DataFrame):
        names = [str(c) for c in raw.columns]
        try:
            values = raw.to_numpy(dtype=np.float64, na_value=np.nan)
        except (TypeError, ValueError) as err:
            raise InputError(f"{where} holds non-numeric columns ({err}); it must hold protein counts.") from None
    else:
        if names_uns_key is None:
            raise InputError(
                f"{where} is an array without protein names; store it as a pandas DataFrame whose columns are "
                "the protein names, or put the names in adata.uns and pass protein_names_uns_key=."
            )
        if names_uns_key not in adata.uns:
            keys = ", ".join(map(repr, adata.uns.keys())) or "none"
            raise InputError(f"protein names key {names_uns_key!r} is not in adata.uns (uns keys: {keys}).")
        names = [str(n) for n in np.asarray(adata.uns[names_uns_key]).ravel()]
        matrix = raw.toarray() if sp.issparse(raw) else np.asarray(raw)
        if matrix.dtype.kind not in "biuf":
            raise InputError(f"{where} has dtype {matrix.dtype}; it must hold numeric protein counts.")
        values = matrix.astype(np.float64)
    if values.ndim != 2 or values.shape[0] != adata.n_obs:
        raise InputError(f"{where} must be a cells x proteins matrix, got shape {values.shape}.")
    if values.shape[1] == 0:
        raise InputError(f"{where} has no proteins (0 columns).")
    if len(names) != values.shape[1]:
        raise InputError(
            f"{len(names)} protein names in adata.uns[{names_uns_key!r}] for {values.shape[1]} columns of {where}."
        )
    index = pd.Index(names)
    if not index.is_unique:
        dup = index[index.duplicated()].unique()[:3]
        raise InputError(f"protein names in {where} are not unique (e.g. {', '.join(map(repr, dup))}); rename them.")
    _check_counts(values, adata, names, where)
    return values.astype(np.float32), tuple(names)


def _check_counts(values: np.ndarray, adata: Any, names: Sequence[str], where: str) -> None:
    finite = ~np.isnan(values)
    for bad, what in (
        (np.isinf(values), "infinite values"),
        (finite & (values < 0), "negative values"),
        (finite & np.isfinite(values) & (values != np.round(values)), "non-integer values"),
        (finite & (values > 2**24), "values above 2^24"),
    ):
        if bad.any():
            row, col = (int(i) for i in np.argwhere(bad)[0])
            raise InputError(
                f"{where} holds {int(bad.sum())} {what} (e.g. {values[row, col]:.4g} at cell "
                f"{adata.obs_names[row]!r}, protein {names[col]!r}); totalVI models raw protein (ADT) counts, "
                "not normalised (e.g. CLR) values. NaN is allowed and marks a value as not measured."
            )


def align_proteins(adata: Any, obsm_key: str, names_uns_key: str | None, model_names: Sequence[str]) -> ProteinData:
    """Read ``adata``'s proteins and put them in ``model_names`` order.

    A missing ``obsm_key`` gives an RNA-only result (nothing present), with a warning. Proteins of the
    model that the data lacks are absent (warned); extra data proteins are dropped.

    Raises
    ------
    InputError
        The data has proteins but none of them is a model protein.
    """
    n_model = len(model_names)
    if obsm_key not in adata.obsm:
        warnings.warn(
            f"adata.obsm has no {obsm_key!r}: the cells are mapped from RNA only (all {n_model} proteins masked "
            f"and imputed). If they have protein counts, store them in adata.obsm[{obsm_key!r}].",
            UserWarning, stacklevel=4,
        )
        shape = (adata.n_obs, n_model)
        return ProteinData(np.zeros(shape, np.float32), np.zeros(shape, bool), n_model)
    values, names = read_proteins(adata, obsm_key, names_uns_key)
    source = pd.Index(names).get_indexer(pd.Index(model_names))
    found = source >= 0
    if not found.any():
        raise InputError(
            f"none of the model's {n_model} proteins are in adata.obsm[{obsm_key!r}] (data proteins look like "
            f"{', '.join(map(repr, names[:3]))}; model proteins like {', '.join(map(repr, model_names[:3]))}). "
            f"Use the same protein names; to map RNA only, drop adata.obsm[{obsm_key!r}] (from a copy)."
        )
    n_missing = int((~found).sum())
    if n_missing:
        missing = [model_names[i] for i in np.flatnonzero(~found)]
        warnings.warn(
            f"{n_missing} of the model's {n_model} proteins are not in the data "
            f"({', '.join(map(repr, missing[:5]))}{', ...' if n_missing > 5 else ''}); they are masked out of the "
            "likelihood and the encoder, and imputed.",
            UserWarning, stacklevel=4,
        )
    aligned = np.full((adata.n_obs, n_model), np.nan, dtype=np.float32)
    aligned[:, found] = values[:, source[found]]
    present = ~np.isnan(aligned)
    return ProteinData(np.where(present, aligned, 0.0).astype(np.float32), present, n_missing)


def batch_measured(values: np.ndarray, present: np.ndarray, codes: np.ndarray, batch: int,
                   *, override_missing_proteins: bool) -> np.ndarray:
    """Proteins measured in batch ``batch``: present in some cell and (unless overridden) not all zero."""
    rows = codes == batch
    measured = present[rows].any(0)
    if not override_missing_proteins:
        measured &= (values[rows] * present[rows]).sum(0) > 0
    return measured


def background_prior(values: np.ndarray, *, seed: int = 0) -> tuple[float, float] | None:
    """Empirical prior (mean, scale) of the log protein background of one batch, as in totalVI.

    For up to :data:`PRIOR_CELLS` random cells, a two-component Gaussian mixture is fitted to the
    cell's log1p counts of the measured proteins; the lower component is the background. The prior mean
    is the average background mean, its scale ``sqrt(sum(sd^2)) / n_cells``. ``None`` when fewer than
    :data:`MIN_PROTEINS_FOR_PRIOR` proteins are measured or no cell has two distinct values.

    Parameters
    ----------
    values
        Cells of the batch x its measured proteins (counts).
    seed
        Seeds the choice of cells.
    """
    if values.shape[1] < MIN_PROTEINS_FOR_PRIOR or values.shape[0] == 0:
        return None
    rng = np.random.default_rng(seed)
    n = min(PRIOR_CELLS, values.shape[0])
    rows = np.sort(rng.choice(values.shape[0], size=n, replace=False))
    mu, sd = _two_component_low(np.log1p(values[rows].astype(np.float64)))
    ok = np.isfinite(mu)
    if not ok.any():
        return None
    return float(mu[ok].mean()), float(np.sqrt(np.sum(sd[ok] ** 2)) / ok.sum())


def _two_component_low(v: np.ndarray, n_iter: int = 100, reg: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``v``: mean and sd of the lower component of a 1-D two-Gaussian mixture (vectorised EM).

    Rows whose values are all equal get NaN.
    """
    lo, hi = v.min(1), v.max(1)
    degenerate = hi - lo < 1e-8
    mu = np.stack([lo + 0.25 * (hi - lo), lo + 0.75 * (hi - lo)], axis=1)  # cells x 2
    var = np.repeat(v.var(1, keepdims=True) + reg, 2, axis=1)
    weight = np.full_like(mu, 0.5)
    x = v[:, :, None]  # cells x proteins x 1
    for _ in range(n_iter):
        log_p = -0.5 * ((x - mu[:, None, :]) ** 2 / var[:, None, :] + np.log(2 * np.pi * var[:, None, :]))
        log_p += np.log(weight[:, None, :])
        log_p -= log_p.max(2, keepdims=True)
        resp = np.exp(log_p)
        resp /= resp.sum(2, keepdims=True)
        nk = resp.sum(1) + 1e-12  # cells x 2
        weight = nk / nk.sum(1, keepdims=True)
        mu = (resp * x).sum(1) / nk
        var = (resp * (x - mu[:, None, :]) ** 2).sum(1) / nk + reg
    low = np.argmin(mu, axis=1)
    rows = np.arange(v.shape[0])
    mu_low, sd_low = mu[rows, low], np.sqrt(var[rows, low])
    mu_low[degenerate] = np.nan
    sd_low[degenerate] = np.nan
    return mu_low, sd_low
