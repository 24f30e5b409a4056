"""kNN label transfer in a latent space (the scArches / HLCA recipe), vectorised, with a reusable index.

Every query cell gets distance-weighted votes from its ``k`` nearest reference cells; the probability of a
label is its share of the weight, the uncertainty is ``1 - max probability``, and cells whose uncertainty is
above ``uncertainty_threshold`` are labelled ``unknown_label`` — which is how query cell types missing from
the reference surface. Several label levels (e.g. coarse and fine annotations) are voted with one
neighbour search.

The neighbour index is built once (:class:`KNNLabelTransfer`) and reused for any number of queries:
an exact scikit-learn index for references up to :data:`PYNNDESCENT_MIN_CELLS` cells, an approximate
pynndescent index above that (choose explicitly with ``index=``).

Kernels
-------
``"gaussian"`` (default)
    ``w = exp(-(d / s)^2)`` with ``s`` the root-mean-square distance of the cell's ``k`` neighbours.
    Invariant to the scale of the latent space, so the same ``k`` and threshold mean the same thing for any
    model, latent size or training length; a neighbour at the typical distance weighs ``e`` times less than
    an exact match.
``"scarches"``
    The published scArches / HLCA formula (``weighted_knn_transfer`` of scArches and of the HLCA mapping
    scripts; Lotfollahi et al. 2022, Sikkema et al. 2023): ``w = exp(-d / (2 / sigma)^2)`` with ``sigma``
    the standard deviation of the cell's neighbour distances, reproduced exactly. It is not scale
    invariant: in typical scVI latents (distances around 1, ``sigma`` around 0.2) the exponent is about
    ``d / 100`` and the vote is almost uniform.
``"distance"``
    ``w = 1 / d`` (scikit-learn's ``weights="distance"``; an exact match takes all the weight).
``"uniform"``
    Every neighbour counts the same.

Weights are normalised per cell, so each row of probabilities sums to 1.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd

from atlasmap.errors import InputError

Kernel = Literal["gaussian", "scarches", "distance", "uniform"]
KERNELS: tuple[str, ...] = ("gaussian", "scarches", "distance", "uniform")
#: References at least this large use an approximate pynndescent index under ``index="auto"``.
PYNNDESCENT_MIN_CELLS = 100_000
UNKNOWN = "Unknown"


@dataclass
class LabelTransferResult:
    """Predictions of one label level for the query cells.

    Attributes
    ----------
    labels
        Predicted label; ``unknown_label`` where the uncertainty is above the threshold. Categorical with
        the reference labels (sorted) followed by the unknown label as categories.
    uncertainty
        ``1 - `` the probability of the winning label, in ``[0, 1]``.
    probabilities
        Cells x reference labels; each row sums to 1 (all zeros only for a cell none of whose neighbours has
        a label at this level).
    best
        The winning label before the threshold is applied (never ``unknown_label``).
    """

    labels: pd.Series
    uncertainty: pd.Series
    probabilities: pd.DataFrame
    best: pd.Series


class KNNLabelTransfer:
    """A neighbour index over reference latent coordinates, built once and queried many times.

    Parameters
    ----------
    reference_latent
        Reference cells x latent dimensions.
    reference_labels
        One column per label level (DataFrame), or a single Series / array. Missing values (NaN/None) are
        allowed: such a cell does not vote at that level (a warning says how many); cells with no label at
        any level are left out of the index.
    k
        Number of neighbours (HLCA / scArches use 15 to 50). Larger than the number of labelled reference
        cells: reduced to it, with a warning.
    kernel
        How neighbour distances become vote weights: ``"gaussian"``, ``"scarches"``, ``"distance"`` or
        ``"uniform"`` (see the module docstring).
    index
        ``"auto"`` (exact scikit-learn below :data:`PYNNDESCENT_MIN_CELLS` reference cells, pynndescent at
        or above), ``"exact"`` or ``"pynndescent"``.
    seed
        Seed of the approximate (pynndescent) index.

    Attributes
    ----------
    labels
        The labels of the indexed reference cells (strings; NaN where missing).
    classes
        Per level, the sorted reference labels (the probability columns).
    index_kind
        ``"exact"`` or ``"pynndescent"``.

    Examples
    --------
    >>> transfer = KNNLabelTransfer(z_ref, adata_ref.obs[["cell_type", "cell_type_fine"]], k=15)
    >>> results = transfer.predict(z_query, uncertainty_threshold=0.5)
    >>> results["cell_type"].labels.value_counts()
    """

    def __init__(
        self,
        reference_latent: np.ndarray,
        reference_labels: pd.DataFrame | pd.Series | np.ndarray,
        *,
        k: int = 15,
        kernel: Kernel = "gaussian",
        index: Literal["auto", "exact", "pynndescent"] = "auto",
        seed: int = 0,
    ) -> None:
        latent = _as_latent(reference_latent, "reference")
        labels = _as_frame(reference_labels)
        if latent.shape[0] != len(labels):
            raise InputError(f"the reference latent has {latent.shape[0]} rows but {len(labels)} labels were given.")
        if kernel not in KERNELS:
            raise InputError(f"kernel must be one of {', '.join(KERNELS)}; got {kernel!r}.")
        if index not in ("auto", "exact", "pynndescent"):
            raise InputError(f"index must be 'auto', 'exact' or 'pynndescent'; got {index!r}.")
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
            raise InputError(f"k must be a positive integer; got {k!r}.")

        labels = labels.reset_index(drop=True)
        missing = labels.isna().to_numpy()
        for level, n_missing in zip(labels.columns, missing.sum(0), strict=True):
            if n_missing == len(labels):
                raise InputError(f"the reference has no values in labels {level!r} to transfer.")
            if n_missing:
                warnings.warn(f"{n_missing} of {len(labels)} reference cells have no {level!r} label; they do not "
                              "vote for it.", UserWarning, stacklevel=2)
        keep = ~missing.all(1)
        latent, labels = latent[keep], labels.loc[keep].reset_index(drop=True)
        self.labels = labels.apply(lambda col: col.map(str, na_action="ignore")).astype(object)
        self.classes: dict[str, pd.Index] = {}
        self._codes: dict[str, np.ndarray] = {}
        for level in self.labels.columns:
            codes, classes = pd.factorize(self.labels[level], sort=True)
            self._codes[level], self.classes[level] = codes, pd.Index(classes, dtype=object)
            if len(classes) == 1:
                warnings.warn(f"the reference has a single {level!r} label ({classes[0]!r}): every query cell "
                              "gets it with uncertainty 0, and cell types missing from the reference cannot be "
                              "flagged as unknown.", UserWarning, stacklevel=2)
        n_ref = latent.shape[0]
        if k > n_ref:
            warnings.warn(f"k={k} is more than the {n_ref} labelled reference cells; using k={n_ref}.",
                          UserWarning, stacklevel=2)
            k = n_ref
        self.k = int(k)
        self.kernel = kernel
        self.n_reference = n_ref
        self.n_dims = latent.shape[1]
        if index == "auto":
            index = "pynndescent" if n_ref >= PYNNDESCENT_MIN_CELLS else "exact"
        self.index_kind = index
        if index == "exact":
            from sklearn.neighbors import NearestNeighbors

            self._index: Any = NearestNeighbors(n_neighbors=self.k).fit(latent)
        else:
            from pynndescent import NNDescent

            self._index = NNDescent(latent, n_neighbors=max(self.k, 15), random_state=seed, low_memory=True)
            self._index.prepare()

    # ------------------------------------------------------------------------------------------ search
    def kneighbors(self, query_latent: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Distances and row indices (into the indexed reference cells) of each query cell's ``k`` neighbours,
        nearest first."""
        query = _as_latent(query_latent, "query")
        if query.shape[1] != self.n_dims:
            raise InputError(f"the query latent has {query.shape[1]} dimensions but the reference has "
                             f"{self.n_dims}; embed both with the same model.")
        if query.shape[0] == 0:
            return np.zeros((0, self.k), np.float32), np.zeros((0, self.k), np.int64)
        if self.index_kind == "exact":
            distances, neighbours = self._index.kneighbors(query)
        else:
            neighbours, distances = self._index.query(query, k=self.k)
        return np.asarray(distances, dtype=np.float64), np.asarray(neighbours, dtype=np.int64)

    # ------------------------------------------------------------------------------------------ voting
    def predict(
        self,
        query_latent: np.ndarray,
        *,
        uncertainty_threshold: float = 0.5,
        unknown_label: str = UNKNOWN,
        index: pd.Index | Sequence[str] | None = None,
    ) -> dict[str, LabelTransferResult]:
        """Transfer every label level to the query cells with one neighbour search.

        Parameters
        ----------
        query_latent
            Query cells x latent dimensions (the same latent space as the reference).
        uncertainty_threshold
            Cells whose uncertainty is strictly above this are labelled ``unknown_label`` (1 keeps every
            prediction; 0.5 means "no label has a weighted majority").
        unknown_label
            The label of uncertain cells; must not be a reference label.
        index
            Row names of the returned Series/DataFrames (default 0..n-1).

        Returns
        -------
        One :class:`LabelTransferResult` per label level, in the order of the reference label columns.
        """
        _check_threshold(uncertainty_threshold)
        distances, neighbours = self.kneighbors(query_latent)
        n = distances.shape[0]
        index = pd.RangeIndex(n) if index is None else pd.Index(index)
        if len(index) != n:
            raise InputError(f"index has {len(index)} names for {n} query cells.")
        weights = neighbour_weights(distances, self.kernel)
        out = {}
        for level in self.labels.columns:
            classes = self.classes[level]
            if unknown_label in set(classes):
                raise InputError(f"unknown_label {unknown_label!r} is also a reference {level!r} label; pick "
                                 "another unknown_label.")
            proba = vote(self._codes[level][neighbours], weights, len(classes))
            best = proba.argmax(1) if len(classes) else np.zeros(n, dtype=np.int64)
            p_best = proba[np.arange(n), best] if n else np.zeros(0)
            uncertainty = np.clip(1.0 - p_best, 0.0, 1.0)
            best_labels = np.asarray(classes, dtype=object)[best]
            predicted = best_labels.copy()
            predicted[uncertainty > uncertainty_threshold] = unknown_label
            categories = [*classes, unknown_label]
            out[level] = LabelTransferResult(
                labels=pd.Series(pd.Categorical(predicted, categories=categories), index=index, name=level),
                uncertainty=pd.Series(uncertainty, index=index, name=f"{level}_uncertainty"),
                probabilities=pd.DataFrame(proba, index=index, columns=pd.Index(classes, dtype=object)),
                best=pd.Series(pd.Categorical(best_labels, categories=list(classes)), index=index, name=level),
            )
        return out


def neighbour_weights(distances: np.ndarray, kernel: Kernel = "gaussian") -> np.ndarray:
    """Per-row normalised vote weights of neighbour distances (cells x k), for the given kernel.

    See the module docstring for the kernels. Rows sum to 1; a row of equal distances (including all zero)
    gets uniform weights.
    """
    d = np.asarray(distances, dtype=np.float64)
    if kernel == "uniform":
        kernel_values = np.ones_like(d)
    elif kernel == "gaussian":
        scale = np.sqrt(np.mean(d**2, axis=1, keepdims=True))
        kernel_values = np.exp(-np.square(np.divide(d, scale, out=np.zeros_like(d), where=scale > 0)))
    elif kernel == "scarches":
        # exactly the published formula: exp(-d / (2 / std)^2) = exp(-d * std^2 / 4)
        std = np.std(d, axis=1, keepdims=True)
        kernel_values = np.exp(-d * np.square(std) / 4.0)
    elif kernel == "distance":
        with np.errstate(divide="ignore"):
            inverse = 1.0 / d
        exact = np.isinf(inverse)
        # scikit-learn's rule: a cell with exact matches gives them all the weight
        kernel_values = np.where(exact.any(1, keepdims=True), exact.astype(np.float64), inverse)
    else:
        raise InputError(f"kernel must be one of {', '.join(KERNELS)}; got {kernel!r}.")
    total = kernel_values.sum(1, keepdims=True)
    uniform = np.full_like(d, 1.0 / max(d.shape[1], 1))
    return np.divide(kernel_values, total, out=uniform, where=total > 0)


def vote(neighbour_codes: np.ndarray, weights: np.ndarray, n_classes: int) -> np.ndarray:
    """Weighted votes -> probabilities (cells x classes) in one ``bincount``.

    ``neighbour_codes`` holds each neighbour's class code (``-1``: no label, does not vote); the weights of
    the voting neighbours are renormalised to sum to 1.
    """
    n, k = neighbour_codes.shape
    valid = neighbour_codes >= 0
    w = np.where(valid, weights, 0.0)
    flat = (np.arange(n)[:, None] * n_classes + neighbour_codes)[valid]
    proba = np.bincount(flat, weights=w[valid], minlength=n * n_classes).reshape(n, n_classes).astype(np.float64)
    total = proba.sum(1, keepdims=True)
    return np.divide(proba, total, out=np.zeros_like(proba), where=total > 0)


# ---------------------------------------------------------------------------------------------- AnnData API
def transfer_labels(
    adata_query: Any,
    adata_reference: Any = None,
    *,
    labels_keys: str | Sequence[str],
    use_rep: str = "X_atlasmap",
    k: int = 15,
    uncertainty_threshold: float = 0.5,
    unknown_label: str = UNKNOWN,
    kernel: Kernel = "gaussian",
    index: Literal["auto", "exact", "pynndescent"] = "auto",
    key_added: str = "atlasmap",
    dataset_key: str = "atlasmap_dataset",
    label_alias: bool = True,
    copy: bool = False,
) -> Any:
    """Transfer reference labels to query cells by weighted kNN in a shared latent space (scanpy style).

    Parameters
    ----------
    adata_query
        Query cells with their latent in ``obsm[use_rep]``. Or, when ``adata_reference`` is None, a joint
        AnnData (as written by ``atlasmap map --with-reference``) whose ``obs[dataset_key]`` says which cells
        are ``"reference"`` and which are ``"query"``.
    adata_reference
        Labelled reference cells with their latent (from the same model) in ``obsm[use_rep]``. Not modified.
    labels_keys
        One or several reference ``obs`` columns (label levels), transferred with one neighbour search.
    use_rep
        The ``obsm`` key of the latent.
    k, kernel, index
        See :class:`KNNLabelTransfer`.
    uncertainty_threshold
        Cells with uncertainty strictly above this get ``unknown_label`` (1: never).
    unknown_label
        Label for uncertain cells.
    key_added
        Prefix of the outputs.
    dataset_key
        The ``obs`` column telling reference from query cells in a joint AnnData.
    label_alias
        Also write the first level under the generic ``{key_added}_label`` names (below).
    copy
        Return a modified copy of ``adata_query`` instead of writing into it.

    Returns
    -------
    ``None`` (or the copy when ``copy=True``). Writes into the query AnnData, for every level ``L``:

    - ``obs[f"{key_added}_{L}"]``: predicted label (categorical; ``unknown_label`` above the threshold),
    - ``obs[f"{key_added}_{L}_uncertainty"]``: ``1 -`` probability of the winning label,
    - ``obsm[f"{key_added}_{L}_proba"]``: DataFrame cells x reference labels, rows summing to 1,

    and (``label_alias=True``) the same for the first level under the generic names ``obs[f"{key_added}_label"]``,
    ``obs[f"{key_added}_label_uncertainty"]`` and ``obsm[f"{key_added}_label_proba"]``. The settings go to
    ``uns[f"{key_added}_label_transfer"]``. In a joint AnnData, reference cells get their own label,
    uncertainty 0 and a one-hot probability row.

    Notes
    -----
    Reference cells with a missing label do not vote at that level (with a warning). Query labels, if any,
    are not used. Nothing is written when an error is raised.

    Examples
    --------
    >>> atlasmap.transfer_labels(adata_query, adata_ref, labels_keys=["cell_type"], k=15)
    >>> adata_query.obs[["atlasmap_label", "atlasmap_label_uncertainty"]].head()
    """
    keys = [labels_keys] if isinstance(labels_keys, str) else list(labels_keys)
    if not keys:
        raise InputError("labels_keys is empty; name at least one reference obs column.")
    if len(set(keys)) != len(keys):
        raise InputError(f"labels_keys has duplicates: {keys}.")
    _check_threshold(uncertainty_threshold)
    if adata_reference is None:
        if dataset_key not in adata_query.obs.columns:
            raise InputError(f"without adata_reference, adata_query must be a joint AnnData with "
                             f"obs[{dataset_key!r}] = 'reference'/'query'; that column is missing.")
        is_ref = (adata_query.obs[dataset_key].astype(str) == "reference").to_numpy()
        if not is_ref.any():
            raise InputError(f"no cell has obs[{dataset_key!r}] == 'reference'; nothing to transfer from.")
        ref_obs, ref_latent = adata_query.obs.loc[is_ref], _get_rep(adata_query, use_rep, "joint")[is_ref]
        query_latent = _get_rep(adata_query, use_rep, "joint")[~is_ref]
    else:
        is_ref = np.zeros(adata_query.n_obs, dtype=bool)
        ref_obs, ref_latent = adata_reference.obs, _get_rep(adata_reference, use_rep, "reference")
        query_latent = _get_rep(adata_query, use_rep, "query")
    missing = [key for key in keys if key not in ref_obs.columns]
    if missing:
        raise InputError(f"labels key(s) {missing} not in the reference's .obs (columns: "
                         f"{', '.join(map(str, ref_obs.columns[:20]))}{', ...' if len(ref_obs.columns) > 20 else ''}).")

    transfer = KNNLabelTransfer(ref_latent, ref_obs[keys], k=k, kernel=kernel, index=index)
    query_names = adata_query.obs_names[~is_ref]
    results = transfer.predict(query_latent, uncertainty_threshold=uncertainty_threshold,
                               unknown_label=unknown_label, index=query_names)

    target = adata_query.copy() if copy else adata_query
    for i, key in enumerate(keys):
        result = results[key]
        labels, uncertainty, proba = _full_columns(result, ref_obs[key], is_ref, target.obs_names)
        names = [key, "label"] if i == 0 and label_alias and key != "label" else [key]
        for name in names:
            target.obs[f"{key_added}_{name}"] = labels
            target.obs[f"{key_added}_{name}_uncertainty"] = uncertainty
            target.obsm[f"{key_added}_{name}_proba"] = proba
    target.uns[f"{key_added}_label_transfer"] = {
        "labels_keys": keys, "use_rep": use_rep, "k": transfer.k, "kernel": kernel,
        "uncertainty_threshold": float(uncertainty_threshold), "unknown_label": unknown_label,
        "index": transfer.index_kind, "n_reference": transfer.n_reference,
    }
    return target if copy else None


def _full_columns(result: LabelTransferResult, ref_labels: pd.Series, is_ref: np.ndarray, obs_names: pd.Index
                  ) -> tuple[pd.Categorical, np.ndarray, pd.DataFrame]:
    """Query predictions spread over all cells; reference cells (of a joint AnnData) keep their own label."""
    categories = list(result.labels.cat.categories)
    classes = list(result.probabilities.columns)
    labels = np.empty(len(obs_names), dtype=object)
    labels[~is_ref] = result.labels.astype(object).to_numpy()
    uncertainty = np.zeros(len(obs_names))
    uncertainty[~is_ref] = result.uncertainty.to_numpy()
    proba = np.zeros((len(obs_names), len(classes)))
    proba[~is_ref] = result.probabilities.to_numpy()
    if is_ref.any():
        own = ref_labels.map(str, na_action="ignore").to_numpy(dtype=object)
        labels[is_ref] = own
        codes = pd.Index(classes).get_indexer(own)
        rows = np.flatnonzero(is_ref)
        proba[rows[codes >= 0], codes[codes >= 0]] = 1.0
        uncertainty[rows[codes < 0]] = np.nan  # an unlabelled reference cell has no label to be sure of
    return (pd.Categorical(labels, categories=categories), uncertainty,
            pd.DataFrame(proba, index=obs_names.copy(), columns=[str(c) for c in classes]))


def _get_rep(adata: Any, use_rep: str, what: str) -> np.ndarray:
    if use_rep not in adata.obsm:
        raise InputError(f"the {what} AnnData has no obsm[{use_rep!r}] (obsm keys: {list(adata.obsm.keys())}); "
                         "embed it first, e.g. adata.obsm['X_atlasmap'] = model.get_latent_representation(adata).")
    return _as_latent(adata.obsm[use_rep], what)


def _as_latent(latent: Any, what: str) -> np.ndarray:
    arr = np.asarray(latent.to_numpy() if isinstance(latent, pd.DataFrame) else latent, dtype=np.float64)
    if arr.ndim != 2:
        raise InputError(f"the {what} latent must be a cells x dimensions matrix; got shape {arr.shape}.")
    if arr.size and not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).any(1).sum())
        raise InputError(f"the {what} latent has NaN or infinite values in {bad} cells.")
    if arr.shape[0] == 0 and what == "reference":
        raise InputError("the reference has no cells.")
    return np.ascontiguousarray(arr, dtype=np.float32)


def _as_frame(labels: pd.DataFrame | pd.Series | np.ndarray) -> pd.DataFrame:
    if isinstance(labels, pd.DataFrame):
        if labels.shape[1] == 0:
            raise InputError("no label columns were given.")
        return labels
    if isinstance(labels, pd.Series):
        return labels.to_frame(name=labels.name if labels.name is not None else "label")
    arr = np.asarray(labels, dtype=object)
    if arr.ndim != 1:
        raise InputError(f"labels must be one-dimensional (or a DataFrame of levels); got shape {arr.shape}.")
    return pd.DataFrame({"label": arr})


def _check_threshold(threshold: float) -> None:
    if not 0.0 <= float(threshold) <= 1.0:
        raise InputError(f"uncertainty_threshold must be between 0 and 1; got {threshold}.")
