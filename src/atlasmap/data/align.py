"""Align new data to a model's registry: gene order, category codes, category extension (numpy/pandas)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from atlasmap.data.registry import SINGLE_BATCH, Registry, continuous_values, obs_column
from atlasmap.errors import InputError, arg

#: Below this fraction of the model's genes found in the query, mapping is refused (override with
#: ``min_gene_overlap=``); below :data:`WARN_GENE_OVERLAP` a warning is given.
MIN_GENE_OVERLAP = 0.5
WARN_GENE_OVERLAP = 0.8


@dataclass(frozen=True)
class GeneAlignment:
    """Where each model gene is found in the data (``-1`` = missing, filled with zeros).

    ``source`` names the identifiers that matched (``"adata.var_names"`` or ``"adata.var['gene_ids']"``),
    ``ignore_case`` whether they matched only ignoring case.
    """

    source_index: np.ndarray
    n_missing: int
    n_extra: int
    source: str = "adata.var_names"
    ignore_case: bool = False

    @property
    def is_identity(self) -> bool:
        return self.n_missing == 0 and self.n_extra == 0 and bool(
            np.array_equal(self.source_index, np.arange(self.source_index.size))
        )


#: An Ensembl identifier with its version suffix: ``ENSG00000141510.17`` (genes, transcripts, proteins, any
#: species prefix). The version is ignored when matching: references and queries often differ in it.
_ENSEMBL_VERSION = r"^(ENS[A-Z]*[0-9]{6,})\.[0-9]+$"
#: A ``.var`` column (or the case-insensitive match) replaces ``var_names`` only when it matches at least
#: this many more of the model's genes (as a fraction of them).
_BETTER_BY = 0.2


def gene_keys(names: Any) -> pd.Index:
    """Identifiers as matched: strings, Ensembl version suffixes removed (``ENSG0000012345.7`` -> ``ENSG0000012345``)."""
    return pd.Index(pd.Index(names).astype(str).str.replace(_ENSEMBL_VERSION, r"\1", regex=True))


def _overlap(data_keys: pd.Index, model_keys: pd.Index) -> int:
    return int(model_keys.isin(data_keys).sum())


def _candidate_columns(var: pd.DataFrame) -> list[str]:
    """``.var`` columns that could hold gene identifiers: text or categorical."""
    return [str(c) for c in var.columns
            if isinstance(var[c].dtype, pd.CategoricalDtype) or pd.api.types.is_string_dtype(var[c].dtype)
            or var[c].dtype == object]


def choose_gene_identifiers(var: pd.DataFrame, model_var_names: tuple[str, ...], *,
                            var_names_column: str | None = None) -> tuple[pd.Index, str, bool]:
    """The data's gene identifiers to match against the model's: ``var_names``, or the ``.var`` column that
    matches clearly better, or (as a last resort, with a warning) the same ignoring case.

    Returns ``(keys, source, ignore_case)``. ``var_names_column`` forces a column (``None``: automatic).
    """
    model_keys = gene_keys(model_var_names)
    n_model = len(model_keys)
    if var_names_column is not None:
        if var_names_column not in var.columns:
            cols = ", ".join(map(repr, _candidate_columns(var)[:10])) or "none"
            raise InputError(f"var_names_column {var_names_column!r} is not a column of adata.var (text columns: "
                             f"{cols}); pass one of them, or {arg('var_names_column', None)} to match by "
                             "adata.var_names.")
        keys, source = gene_keys(var[var_names_column]), f"adata.var[{var_names_column!r}]"
    else:
        keys, source = gene_keys(var.index), "adata.var_names"
        found = _overlap(keys, model_keys)
        best = max(((_overlap(gene_keys(var[c]), model_keys), c) for c in _candidate_columns(var)), default=(0, ""))
        if best[0] >= found + _BETTER_BY * n_model:
            warnings.warn(
                f"only {found} of the model's {n_model} genes ({found / n_model:.1%}) are in adata.var_names; "
                f"adata.var[{best[1]!r}] holds {best[0]} of them ({best[0] / n_model:.1%}), so genes are matched by "
                f"that column ({arg('var_names_column', best[1])} chooses it explicitly).", UserWarning, stacklevel=4)
            keys, source = gene_keys(var[best[1]]), f"adata.var[{best[1]!r}]"
    found = _overlap(keys, model_keys)
    folded = pd.Index(keys.str.casefold())
    found_folded = _overlap(folded, pd.Index(model_keys.str.casefold()))
    if found_folded >= found + _BETTER_BY * n_model:
        warnings.warn(
            f"{source} matches {found} of the model's {n_model} genes exactly but {found_folded} ignoring case "
            f"(e.g. {keys[~keys.isin(model_keys)][0]!r}); genes are matched ignoring case. Check that the query "
            "uses the reference's gene nomenclature (species, symbols vs IDs).", UserWarning, stacklevel=4)
        return folded, source, True
    return keys, source, False


def align_genes(
    var: pd.DataFrame | pd.Index, model_var_names: tuple[str, ...], *, min_overlap: float = MIN_GENE_OVERLAP,
    var_names_column: str | None = None,
) -> GeneAlignment:
    """Match data genes to the model's genes: by ``var_names`` or a better-matching ``.var`` column
    (:func:`choose_gene_identifiers`), ignoring Ensembl version suffixes.

    Parameters
    ----------
    var
        The data's ``adata.var`` (its index are the var_names); a plain index of names also works.
    model_var_names
        The model's genes, in model order.
    min_overlap
        Refuse below this fraction of the model's genes found.
    var_names_column
        Match by this ``.var`` column instead of choosing automatically.

    Raises
    ------
    InputError
        Fewer than ``min_overlap`` of the model's genes in the data; the identifiers used are not unique
        where they match a model gene (several data genes for one model gene: atlasmap does not guess
        which one to use); an unknown ``var_names_column``.
    """
    if not isinstance(var, pd.DataFrame):
        var = pd.DataFrame(index=pd.Index(var))
    if var_names_column is None and not var.index.is_unique:
        dup = var.index[var.index.duplicated()].unique()[:3]
        raise InputError(
            f"gene (var) names are not unique (e.g. {', '.join(map(repr, dup))}); "
            "make them unique with adata.var_names_make_unique()."
        )
    keys, source, ignore_case = choose_gene_identifiers(var, model_var_names, var_names_column=var_names_column)
    model_keys = gene_keys(model_var_names)
    if ignore_case:
        model_keys = pd.Index(model_keys.str.casefold())
    hits = keys.isin(model_keys)
    if pd.Index(keys[hits]).has_duplicates:
        dup = pd.Index(keys[hits])[pd.Index(keys[hits]).duplicated()].unique()
        names = [list(var.index[np.flatnonzero(keys == d)][:3].astype(str)) for d in dup[:2]]
        shown = "; ".join(f"{d!r} <- {', '.join(map(repr, n))}" for d, n in zip(dup[:2], names, strict=True))
        raise InputError(
            f"{source} maps several of the data's genes to the same model gene ({len(dup)} such genes, e.g. "
            f"{shown}); atlasmap does not guess which one holds the counts. Make those identifiers unique first "
            f"(e.g. keep one gene each, or add their counts), or match by other identifiers "
            f"({arg('var_names_column', None)} for adata.var_names, or another column)."
        )
    source_index = keys.get_indexer(model_keys)
    n_model = len(model_var_names)
    n_found = int((source_index >= 0).sum())
    n_missing = n_model - n_found
    fraction = n_found / n_model
    if n_found == 0:
        cols = _candidate_columns(var)
        hint = (f"; adata.var columns that could hold them: {', '.join(map(repr, cols[:6]))} "
                f"({arg('var_names_column', cols[0])})" if cols else "")
        raise InputError(
            f"none of the model's {n_model} genes are in the data (data genes look like "
            f"{', '.join(map(repr, list(var.index[:3].astype(str))))}; model genes like "
            f"{', '.join(map(repr, model_var_names[:3]))}). Use the same gene identifiers (symbols vs Ensembl "
            f"IDs){hint}."
        )
    if fraction < min_overlap:
        raise InputError(
            f"only {n_found} of the model's {n_model} genes ({fraction:.1%}) are in the data ({source}), below the "
            f"minimum overlap of {min_overlap:.0%}; the mapping would be meaningless. Check the gene "
            f"identifiers ({arg('var_names_column', 'COLUMN')} matches by a .var column), or pass "
            f"{arg('min_gene_overlap', round(fraction, 2))} to override."
        )
    if n_missing:
        msg = (
            f"{n_missing} of the model's {n_model} genes ({n_missing / n_model:.1%}) are missing from the "
            "data and are filled with zeros"
        )
        if fraction < WARN_GENE_OVERLAP:
            msg += f"; overlap {fraction:.1%} is below {WARN_GENE_OVERLAP:.0%}, so expect a poorer mapping"
        warnings.warn(msg + ".", UserWarning, stacklevel=3)
    return GeneAlignment(source_index=source_index, n_missing=n_missing, n_extra=len(keys) - n_found,
                         source=source, ignore_case=ignore_case)


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
            kind = "batch" if key == registry.batch_key else "categorical covariate"
            col = obs_column(adata, key_map.get(key, key), kind=kind)
        seen = pd.unique(col.astype(str))
        known = set(registry.categories[key])
        out[key] = tuple(c for c in seen if c not in known)
    return out


def continuous_matrix(adata: Any, registry: Registry) -> np.ndarray:
    if not registry.continuous_keys:
        return np.zeros((adata.n_obs, 0), dtype=np.float32)
    return np.stack([continuous_values(adata, k) for k in registry.continuous_keys], axis=1)
