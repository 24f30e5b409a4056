"""Validate an AnnData and describe it as a :class:`Registry`.

The registry is everything a model needs to read new data the same way it read its training data:
where the counts are, the gene order, and each covariate's category list. It is plain data (JSON-able)
and immutable; surgery makes an extended copy.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from atlasmap.errors import InputError, arg

_MAX_EXAMPLES = 3
#: Registry key of the batch when a model is set up with ``batch_key=None`` (one batch, category "0").
SINGLE_BATCH = "_atlasmap_single_batch"


@dataclass(frozen=True)
class Registry:
    """How a model reads an AnnData.

    Attributes
    ----------
    var_names
        The model's genes, in the model's order.
    batch_key
        ``.obs`` column of the batch; always the first categorical covariate.
    categorical_keys
        All categorical covariates, ``batch_key`` first.
    categories
        Category list of each categorical covariate. Reference categories come first; surgery appends.
    continuous_keys
        ``.obs`` columns of continuous covariates.
    layer
        Layer holding raw counts, or ``None`` for ``.X``.
    """

    var_names: tuple[str, ...]
    batch_key: str
    categorical_keys: tuple[str, ...]
    categories: dict[str, tuple[str, ...]] = field(hash=False)
    continuous_keys: tuple[str, ...] = ()
    layer: str | None = None

    @property
    def n_vars(self) -> int:
        return len(self.var_names)

    @property
    def n_categories(self) -> list[int]:
        """Number of categories of each categorical covariate, in ``categorical_keys`` order."""
        return [len(self.categories[k]) for k in self.categorical_keys]

    @property
    def n_batch(self) -> int:
        return len(self.categories[self.batch_key])

    def with_categories(self, categories: dict[str, tuple[str, ...]]) -> Registry:
        return replace(self, categories=dict(categories))

    def to_dict(self) -> dict[str, Any]:
        return {
            "var_names": list(self.var_names),
            "batch_key": self.batch_key,
            "categorical_keys": list(self.categorical_keys),
            "categories": {k: list(v) for k, v in self.categories.items()},
            "continuous_keys": list(self.continuous_keys),
            "layer": self.layer,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Registry:
        return cls(
            var_names=tuple(str(v) for v in d["var_names"]),
            batch_key=str(d["batch_key"]),
            categorical_keys=tuple(d["categorical_keys"]),
            categories={k: tuple(str(c) for c in v) for k, v in d["categories"].items()},
            continuous_keys=tuple(d.get("continuous_keys", ())),
            layer=d.get("layer"),
        )


def build_registry(
    adata: Any,
    *,
    batch_key: str | None,
    categorical_covariate_keys: list[str] | None = None,
    continuous_covariate_keys: list[str] | None = None,
    layer: str | None = None,
) -> Registry:
    """Validate ``adata`` for training and describe it.

    ``batch_key=None`` means a single batch: every cell gets the category ``"0"`` (the reference still
    gets its own batch column, so surgery keeps its latent exact).
    """
    check_anndata(adata)
    check_unique_names(adata.var_names, "gene (var) names", fix="adata.var_names_make_unique()")
    check_counts(adata, layer)  # validates (chunk by chunk when backed); the loader rebuilds the counts
    cat_keys = [batch_key] if batch_key is not None else []
    for key in categorical_covariate_keys or []:
        if key in cat_keys:
            raise InputError(f"categorical covariate {key!r} is given twice (or equals batch_key).")
        cat_keys.append(key)
    categories: dict[str, tuple[str, ...]] = {}
    for key in cat_keys:
        kind = "batch" if key == batch_key else "categorical covariate"
        categories[key] = tuple(_categories_in_order(obs_column(adata, key, kind=kind)))
    if batch_key is None:
        batch_key = SINGLE_BATCH
        cat_keys.insert(0, batch_key)
        categories[batch_key] = ("0",)
    cont_keys = tuple(continuous_covariate_keys or ())
    for key in cont_keys:
        continuous_values(adata, key)
    return Registry(
        var_names=tuple(str(v) for v in adata.var_names),
        batch_key=batch_key,
        categorical_keys=tuple(cat_keys),
        categories=categories,
        continuous_keys=cont_keys,
        layer=layer,
    )


# ----------------------------------------------------------------------------------------------
# Checks shared by setup, surgery and inference
# ----------------------------------------------------------------------------------------------


def check_anndata(adata: Any) -> None:
    try:
        import anndata
    except ImportError:  # pragma: no cover - anndata is a dependency
        anndata = None
    if anndata is not None and not isinstance(adata, anndata.AnnData):
        raise InputError(f"expected an AnnData, got {type(adata).__name__}; read files with anndata.read_h5ad.")
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise InputError(
            f"the AnnData is empty ({adata.n_obs} cells x {adata.n_vars} genes); atlasmap needs cells and genes."
        )
    check_unique_names(adata.obs_names, "cell (obs) names", fix="adata.obs_names_make_unique()")


def check_unique_names(names: pd.Index, what: str, *, fix: str) -> None:
    if not names.is_unique:
        dup = names[names.duplicated()].unique()[:_MAX_EXAMPLES]
        raise InputError(
            f"{what} are not unique (e.g. {', '.join(map(repr, dup))}); make them unique with {fix}."
        )


#: Words in ``.obs`` column names that usually hold a batch (for the suggestion when the batch key is missing).
_BATCH_WORDS = ("batch", "sample", "donor", "library", "lane", "run", "plate", "patient", "individual", "ident",
                "dataset", "study", "replicate", "chip", "channel")


def batch_like_columns(adata: Any) -> list[str]:
    """``.obs`` columns that could hold a batch: text or categorical, 2 to half-the-cells values, those whose
    name reads like a batch first (in the order of :data:`_BATCH_WORDS`: ``batch``, ``sample``, ``donor``, ...)."""
    n = adata.n_obs
    found = []
    for col in adata.obs.columns:
        values = adata.obs[col]
        if not (isinstance(values.dtype, pd.CategoricalDtype) or values.dtype == object
                or pd.api.types.is_string_dtype(values.dtype)):
            continue
        n_values = values.nunique(dropna=True)
        if 2 <= n_values <= max(2, n // 2):
            ranks = [i for i, word in enumerate(_BATCH_WORDS) if word in str(col).lower()]
            found.append((min(ranks, default=len(_BATCH_WORDS)), str(col)))
    return [col for _, col in sorted(found)]


def obs_column(adata: Any, key: str, *, kind: str) -> pd.Series:
    if key not in adata.obs.columns:
        cols = ", ".join(map(repr, list(adata.obs.columns)[:10])) or "none"
        hint = ""
        if kind == "batch":
            likely = batch_like_columns(adata)
            if likely:
                shown = ", ".join(f"{c!r} ({adata.obs[c].nunique()} values)" for c in likely[:4])
                hint = (f" Columns that could hold the batch: {shown}; pass {arg('batch_key', likely[0])} if it is "
                        f"{likely[0]!r}.")
        raise InputError(f"{kind} key {key!r} is not a column of adata.obs (columns: {cols}).{hint}")
    col = adata.obs[key]
    if col.isna().any():
        n = int(col.isna().sum())
        example = col.index[col.isna()][0]
        raise InputError(
            f"adata.obs[{key!r}] has {n} missing (NaN) values (e.g. cell {example!r}); "
            + ("fill them with numbers or drop those cells." if kind.startswith("continuous") else
               "fill them with a category such as 'unknown' or drop those cells.")
        )
    return col


def _categories_in_order(col: pd.Series) -> list[str]:
    if isinstance(col.dtype, pd.CategoricalDtype):
        present = set(col.astype(str).unique())
        return [str(c) for c in col.cat.categories if str(c) in present]
    return sorted(col.astype(str).unique())


def continuous_values(adata: Any, key: str) -> np.ndarray:
    col = obs_column(adata, key, kind="continuous covariate")
    try:
        values = col.to_numpy(dtype=np.float32)
    except (TypeError, ValueError) as err:
        raise InputError(f"continuous covariate adata.obs[{key!r}] is not numeric: {err}.") from None
    if not np.isfinite(values).all():
        raise InputError(f"continuous covariate adata.obs[{key!r}] holds NaN or infinite values.")
    return values


@dataclass(frozen=True)
class CountsSource:
    """Where an AnnData's raw counts are: ``.X`` (``kind="X"``), ``.layers[key]`` or ``.raw.X``."""

    kind: str = "X"
    key: str | None = None

    @property
    def where(self) -> str:
        return {"X": "adata.X", "raw": "adata.raw.X"}.get(self.kind, f"adata.layers[{self.key!r}]")

    @property
    def layer(self) -> str | None:
        return self.key if self.kind == "layer" else None

    def matrix(self, adata: Any) -> Any:
        """The matrix (``None`` where ``adata`` has none: no ``.X``, or no such layer)."""
        if self.kind == "raw":
            return adata.raw.X
        return adata.X if self.kind == "X" else adata.layers.get(self.key)

    def var(self, adata: Any) -> pd.DataFrame:
        """The genes of this matrix (``.raw`` has its own)."""
        return adata.raw.var if self.kind == "raw" else adata.var


_COUNTS_PROBE = 1 << 16  # stored values looked at to tell counts from normalised data


def _probe(matrix: Any) -> np.ndarray | None:
    """The first stored values of a matrix (``None`` for what is not a numeric matrix)."""
    if matrix is None:
        return None
    if sp.issparse(matrix):  # the stored values (formats without a data array, dok / lil, via coo)
        values = matrix.data if matrix.format in ("csr", "csc", "coo", "bsr") else sp.coo_matrix(matrix).data
    else:
        values = np.asarray(matrix[: max(1, _COUNTS_PROBE // max(matrix.shape[1], 1))])
    values = np.asarray(values).ravel()[:_COUNTS_PROBE]
    return values if values.dtype.kind in "biuf" else None


def _holds_counts(matrix: Any) -> bool:
    """A quick look: the first stored values are finite, non-negative integers (not a validation)."""
    values = _probe(matrix)
    return values is not None and bool(np.isfinite(values).all() and (values >= 0).all()
                                       and (values == np.round(values)).all())


def _holds_transformed_data(matrix: Any) -> bool:
    """Normalised, log-transformed or scaled values rather than counts with a few bad entries: most of the
    first stored values are not non-negative integers."""
    values = _probe(matrix)
    if values is None or not values.size:
        return False
    finite = values[np.isfinite(values)]
    return float(np.mean((finite != np.round(finite)) | (finite < 0))) > 0.5 if finite.size else True


def count_sources(adata: Any) -> list[CountsSource]:
    """Every place of ``adata`` that looks like raw counts (``.X``, each layer, ``.raw.X``)."""
    sources = [CountsSource("X")] + [CountsSource("layer", str(k)) for k in adata.layers]
    if getattr(adata, "raw", None) is not None:
        sources.append(CountsSource("raw"))
    return [s for s in sources if _holds_counts(s.matrix(adata))]


def find_counts(adata: Any, layer: str | None) -> CountsSource:
    """Where to read ``adata``'s counts for a model that reads ``layer``: there, unless it is missing or holds
    transformed data (normalised / log / scaled values, not counts with a few bad entries); then the one other
    place that holds counts (``.X``, a layer or ``.raw.X``), with a warning naming it. With none or several
    such places, the requested one (whose validation then says what is wrong and where the counts seem to be)."""
    requested = CountsSource("X") if layer is None else CountsSource("layer", layer)
    if (layer is not None and layer not in adata.layers) or (layer is None and adata.X is None):
        found = count_sources(adata)
    else:
        if not _holds_transformed_data(requested.matrix(adata)):
            return requested  # counts (a few bad values there are reported by the validation, naming the cell)
        found = [s for s in count_sources(adata) if s != requested]
    if len(found) == 1:
        if layer is not None and layer not in adata.layers:
            problem = f"has no layer {layer!r}"
        else:
            problem = "has no adata.X (None)" if adata.X is None else f"{requested.where} does not hold raw counts"
        warnings.warn(f"the data {problem}; reading the raw counts from {found[0].where}, the one place that holds "
                      f"them ({arg('layer', found[0].key) if found[0].kind == 'layer' else 'pass them in .X'} to "
                      "choose it explicitly).", UserWarning, stacklevel=4)
        return found[0]
    return requested


def get_counts(adata: Any, layer: str | None, *, source: CountsSource | None = None) -> sp.csr_matrix:
    """Return the raw counts as a float32 CSR matrix, after checking they are counts.

    ``source`` (from :func:`find_counts`) overrides ``layer``. The caller's matrix is never modified: the
    result is a new matrix, or, for input that already is canonical float32 CSR, shares its arrays
    read-only (writes raise instead of reaching the input). A failed check names the places of ``adata``
    that do hold counts.
    """
    if source is None:
        matrix, where = counts_matrix(adata, layer)
        var_names = adata.var_names
    else:
        matrix, where = counts_matrix(adata, source.layer) if source.kind != "raw" else (adata.raw.X, source.where)
        var_names, layer = source.var(adata).index, source.layer
    if hasattr(matrix, "to_memory"):  # backed sparse dataset
        matrix = matrix.to_memory()
    try:
        return validate_counts(matrix, where=where, obs_names=adata.obs_names, var_names=var_names, layer=layer)
    except InputError as err:
        elsewhere = [s for s in count_sources(adata) if s.where != where]
        if not elsewhere:
            raise
        layers = [s for s in elsewhere if s.kind == "layer"]
        fix = f": pass {arg('layer', layers[0].key)}." if layers else "."
        raise InputError(f"{err} Raw counts seem to be in {' and '.join(s.where for s in elsewhere)}{fix}") from None


def check_counts(adata: Any, layer: str | None) -> None:
    """Validate the counts of ``adata`` without keeping them.

    An AnnData opened in backed mode is checked chunk by chunk from disk (memory bounded by the chunk
    size, see :mod:`atlasmap.data.backed`); an in-memory one as in :func:`get_counts`.
    """
    if getattr(adata, "isbacked", False):
        from atlasmap.data.backed import scan_backed_counts

        scan_backed_counts(adata, layer)
    else:
        get_counts(adata, layer)


def counts_matrix(adata: Any, layer: str | None) -> tuple[Any, str]:
    """The counts matrix of ``adata`` (``.X`` or ``layers[layer]``) and how to name it in messages."""
    if layer is None:
        matrix, where = adata.X, "adata.X"
    else:
        if layer not in adata.layers:
            keys = ", ".join(map(repr, adata.layers.keys())) or "none"
            raise InputError(f"layer {layer!r} is not in adata.layers (layers: {keys}); pass {arg('layer')} with the "
                             "layer that holds the raw counts.")
        matrix, where = adata.layers[layer], f"adata.layers[{layer!r}]"
    if matrix is None:
        raise InputError(f"{where} is empty (None); put the raw counts there or pass layer=.")
    return matrix, where


def validate_counts(
    matrix: Any, *, where: str, obs_names: pd.Index, var_names: pd.Index, layer: str | None
) -> sp.csr_matrix:
    """Check that ``matrix`` holds raw counts and return them as a float32 CSR matrix: a new one, or, when
    ``matrix`` already is canonical float32 CSR, one sharing its arrays read-only (no copy of the data).

    Used for a whole AnnData and, by the streaming loader, for each chunk of rows of an on-disk one
    (``obs_names`` are then the chunk's cells, so messages name the offending cell).

    Raises
    ------
    InputError
        On non-numeric, NaN/infinite, negative or non-integer values, or counts above 2^24.
    """
    if sp.issparse(matrix):
        if matrix.dtype.kind not in "biuf":  # a float32 cast would silently drop imaginary parts
            raise InputError(f"{where} has dtype {matrix.dtype}; atlasmap needs numeric raw counts.")
        if matrix.format == "csr" and matrix.dtype == np.float32 and matrix.has_canonical_format:
            # already what atlasmap uses: share the arrays read-only instead of copying (memory); nothing
            # here writes to them, and a read-only view turns any accidental write into an error
            shared = [a.view() for a in (matrix.data, matrix.indices, matrix.indptr)]
            for a in shared:
                a.flags.writeable = False
            csr = sp.csr_matrix(tuple(shared), shape=matrix.shape, copy=False)
            csr.has_canonical_format = True
        else:
            # validate the stored values; casting to float32 first would hide e.g. 0.9999999999 (-> 1.0)
            csr = sp.csr_matrix(matrix, copy=True)
        values = csr.data
    else:
        arr = np.asarray(matrix)
        if arr.dtype.kind not in "biuf":
            raise InputError(f"{where} has dtype {arr.dtype}; atlasmap needs numeric raw counts.")
        values = arr
        csr = None
    names = (obs_names, var_names)
    if _all_counts_compiled(values):
        csr = sp.csr_matrix(values) if csr is None else csr
        return _canonical_float32(csr)
    # each check scans the values in chunks (no full-size temporary mask); the full mask is built only to
    # name the first offending entry
    if values.dtype.kind == "f" and _any_chunked(values, lambda v: ~np.isfinite(v)):
        bad = ~np.isfinite(values)
        raise InputError(
            f"{where} holds {int(bad.sum())} NaN or infinite values{_where_first(names, matrix, bad, csr)}; "
            "atlasmap models raw counts: remove or fix those entries."
        )
    if _any_chunked(values, lambda v: v < 0):
        neg = values < 0
        raise InputError(
            f"{where} holds {int(neg.sum())} negative values{_where_first(names, matrix, neg, csr)}; "
            "atlasmap models raw counts (non-negative integers)."
            + ("" if layer else f" Pass {arg('layer', 'counts')} if the counts are in a layer.")
        )
    if values.dtype.kind == "f" and _any_chunked(values, lambda v: v != np.round(v)):
        frac = values != np.round(values)
        raise InputError(
            f"{where} holds non-integer values{_where_first(names, matrix, frac, csr, show_value=True)}; "
            "atlasmap models raw counts, not normalised or log-transformed data."
            + ("" if layer else f" Pass {arg('layer', 'counts')} if the counts are in a layer.")
        )
    if values.size and float(values.max()) > 2**24:
        raise InputError(
            f"{where} holds counts above 2^24 ({float(values.max()):.0f}); float32 cannot represent them exactly. "
            "These are not UMI counts of one cell."
        )
    csr = sp.csr_matrix(np.asarray(matrix, dtype=np.float32)) if csr is None else csr
    return _canonical_float32(csr)


def _canonical_float32(csr: sp.csr_matrix) -> sp.csr_matrix:
    csr = csr.astype(np.float32, copy=False)
    csr.sum_duplicates()
    csr.sort_indices()
    return csr


def _all_counts_compiled(values: np.ndarray) -> bool:
    """True when one pass over float32 ``values`` (:func:`atlasmap.ops.count_flags`, compiled or its
    reference) finds only counts (no NaN/inf, negative, non-integer or > 2^24 values); False when it finds
    any or the values are not float32 (the numpy checks then name an offending entry)."""
    from atlasmap import ops

    return values.dtype == np.float32 and ops.count_flags(values) == 0


def check_library_sizes(totals: np.ndarray, obs_names: pd.Index) -> None:
    """Refuse cells whose counts in the model's genes sum to zero (their log library size is undefined)."""
    empty = totals <= 0
    if empty.any():
        example = obs_names[int(np.flatnonzero(empty)[0])]
        raise InputError(
            f"{int(empty.sum())} cells have no counts in the model's genes (e.g. {example!r}); their library "
            "size is zero. Remove them first, e.g. sc.pp.filter_cells(adata, min_counts=1)."
        )


_CHECK_CHUNK = 1 << 22  # values per chunk of a validation scan


def _any_chunked(values: np.ndarray, test: Any) -> bool:
    """Whether ``test`` (elementwise, returns a bool array) holds anywhere in ``values``, chunk by chunk."""
    flat = values.reshape(-1)
    return any(bool(test(flat[i:i + _CHECK_CHUNK]).any()) for i in range(0, flat.size, _CHECK_CHUNK))


def _where_first(names: tuple[pd.Index, pd.Index], matrix: Any, mask: np.ndarray, csr: sp.csr_matrix | None,
                 show_value: bool = False) -> str:
    """' (e.g. 0.69 at cell 'c', gene 'g')' for the first offending entry."""
    if csr is not None:
        pos = int(np.flatnonzero(mask)[0])
        row = int(np.searchsorted(csr.indptr, pos, side="right") - 1)
        col = int(csr.indices[pos])
        value = csr.data[pos]
    else:
        row, col = (int(i) for i in np.argwhere(mask)[0])
        value = np.asarray(matrix)[row, col]
    shown = f"{value:.4g} " if show_value else ""
    obs_names, var_names = names
    return f" (e.g. {shown}at cell {obs_names[row]!r}, gene {var_names[col]!r})"
