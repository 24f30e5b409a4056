"""Align new data to a model's registry: gene order, category codes, category extension (numpy/pandas)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from atlasmap.data.registry import SINGLE_BATCH, Registry, continuous_values, obs_column
from atlasmap.errors import InputError

#: Below this fraction of the model's genes found in the query, mapping is refused (override with
#: ``min_gene_overlap=``); below :data:`WARN_GENE_OVERLAP` a warning is given.
MIN_GENE_OVERLAP = 0.5
WARN_GENE_OVERLAP = 0.8


@dataclass(frozen=True)
class GeneAlignment:
    """Where each model gene is found in the data (``-1`` = missing, filled with zeros)."""

    source_index: np.ndarray
    n_missing: int
    n_extra: int

    @property
    def is_identity(self) -> bool:
        return self.n_missing == 0 and self.n_extra == 0 and bool(
            np.array_equal(self.source_index, np.arange(self.source_index.size))
        )


def align_genes(
    data_var_names: pd.Index, model_var_names: tuple[str, ...], *, min_overlap: float = MIN_GENE_OVERLAP
) -> GeneAlignment:
    """Match data genes to the model's genes by name.

    Raises
    ------
    InputError
        When fewer than ``min_overlap`` of the model's genes are in the data.
    """
    data_names = pd.Index(data_var_names.astype(str))
    if not data_names.is_unique:
        dup = data_names[data_names.duplicated()].unique()[:3]
        raise InputError(
            f"gene (var) names are not unique (e.g. {', '.join(map(repr, dup))}); "
            "make them unique with adata.var_names_make_unique()."
        )
    source_index = data_names.get_indexer(pd.Index(model_var_names))
    n_model = len(model_var_names)
    n_found = int((source_index >= 0).sum())
    n_missing = n_model - n_found
    fraction = n_found / n_model
    if n_found == 0:
        raise InputError(
            f"none of the model's {n_model} genes are in the data (data genes look like "
            f"{', '.join(map(repr, list(data_names[:3])))}; model genes like "
            f"{', '.join(map(repr, model_var_names[:3]))}). Use the same gene identifiers (symbols vs Ensembl IDs)."
        )
    if fraction < min_overlap:
        raise InputError(
            f"only {n_found} of the model's {n_model} genes ({fraction:.1%}) are in the data, below the "
            f"minimum overlap of {min_overlap:.0%}; the mapping would be meaningless. Check the gene "
            "identifiers, or pass min_gene_overlap= (CLI: --min-gene-overlap) to override."
        )
    if n_missing:
        msg = (
            f"{n_missing} of the model's {n_model} genes ({n_missing / n_model:.1%}) are missing from the "
            "data and are filled with zeros"
        )
        if fraction < WARN_GENE_OVERLAP:
            msg += f"; overlap {fraction:.1%} is below {WARN_GENE_OVERLAP:.0%}, so expect a poorer mapping"
        warnings.warn(msg + ".", UserWarning, stacklevel=3)
    return GeneAlignment(source_index=source_index, n_missing=n_missing, n_extra=len(data_names) - n_found)


def reorder_genes(counts: sp.csr_matrix, alignment: GeneAlignment) -> sp.csr_matrix:
    """Columns of ``counts`` in model order; missing genes become empty (zero) columns."""
    if alignment.is_identity:
        return counts
    present = alignment.source_index >= 0
    target_of_source = np.full(counts.shape[1], -1, dtype=np.int64)
    target_of_source[alignment.source_index[present]] = np.flatnonzero(present)
    coo = counts.tocoo()
    new_cols = target_of_source[coo.col]
    keep = new_cols >= 0
    out = sp.csr_matrix(
        (coo.data[keep], (coo.row[keep], new_cols[keep])),
        shape=(counts.shape[0], alignment.source_index.size),
        dtype=np.float32,
    )
    out.sort_indices()
    return out


def encode_categories(adata: Any, registry: Registry, key_map: dict[str, str] | None = None) -> np.ndarray:
    """Integer codes (cells x covariates) of each categorical covariate in the registry's order.

    ``key_map`` maps registry keys to other ``.obs`` columns (e.g. a query's batch column has another name).
    """
    key_map = key_map or {}
    codes = np.empty((adata.n_obs, len(registry.categorical_keys)), dtype=np.int64)
    for j, key in enumerate(registry.categorical_keys):
        cats = registry.categories[key]
        col_key = key_map.get(key, key)
        if col_key not in adata.obs.columns and key in adata.obs.columns:
            col_key = key  # e.g. reference cells read by a query model whose query batch column is renamed
        if key == SINGLE_BATCH and col_key not in adata.obs.columns:
            codes[:, j] = 0  # cells of the reference trained without a batch key
            continue
        values = obs_column(adata, col_key, kind="categorical covariate").astype(str)
        idx = pd.Index(cats).get_indexer(values)
        if (idx < 0).any():
            unknown = sorted(set(values[idx < 0]))[:5]
            raise InputError(
                f"adata.obs[{col_key!r}] has categories the model was not trained on "
                f"({', '.join(map(repr, unknown))}; model categories: {', '.join(map(repr, cats[:8]))}). "
                "Map new batches with SCVI.load_query_data (CLI: atlasmap map), which adds them by surgery."
            )
        codes[:, j] = idx
    return codes


def new_categories(adata: Any, registry: Registry, key_map: dict[str, str] | None = None) -> dict[str, tuple[str, ...]]:
    """Per covariate, the categories of ``adata`` that the registry lacks, in order of appearance."""
    key_map = key_map or {}
    out: dict[str, tuple[str, ...]] = {}
    for key in registry.categorical_keys:
        if key == SINGLE_BATCH:
            if key_map.get(key) is None:
                raise InputError(
                    "the reference was trained without a batch key; pass the query's batch column "
                    "(batch_key= / --batch-key) so its cells get their own batch."
                )
            col = obs_column(adata, key_map[key], kind="batch")
        else:
            col = obs_column(adata, key_map.get(key, key), kind="categorical covariate")
        seen = pd.unique(col.astype(str))
        known = set(registry.categories[key])
        out[key] = tuple(c for c in seen if c not in known)
    return out


def continuous_matrix(adata: Any, registry: Registry) -> np.ndarray:
    if not registry.continuous_keys:
        return np.zeros((adata.n_obs, 0), dtype=np.float32)
    return np.stack([continuous_values(adata, k) for k in registry.continuous_keys], axis=1)
