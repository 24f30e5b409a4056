"""kNN label transfer in a latent space (the scArches / HLCA recipe), vectorised, with a reusable index.

Each query cell gets distance-weighted votes from its ``k`` nearest reference cells (Gaussian kernel
scaled per cell by the RMS of its neighbour distances). The probability of a label is its share of the
weight; uncertainty is ``1 - max probability``; cells above ``uncertainty_threshold`` are labelled
``unknown_label`` — which is how query cell types missing from the reference surface.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from atlasmap.errors import InputError


@dataclass
class LabelTransferResult:
    """Predictions for one label level."""

    labels: pd.Series  # predicted label, or the unknown label
    uncertainty: pd.Series  # 1 - probability of the winning label
    probabilities: pd.DataFrame  # cells x reference labels, rows sum to 1


class KNNLabelTransfer:
    """A neighbour index over reference latent coordinates, built once and queried many times.

    Parameters
    ----------
    reference_latent
        Reference cells x latent dimensions.
    reference_labels
        One label column per level (DataFrame), or a single Series/array.
    k
        Number of neighbours (HLCA / scArches use 15 to 50).
    """

    def __init__(self, reference_latent: np.ndarray, reference_labels: pd.DataFrame | pd.Series | np.ndarray,
                 *, k: int = 15) -> None:
        from sklearn.neighbors import NearestNeighbors

        latent = np.asarray(reference_latent, dtype=np.float32)
        labels = _as_frame(reference_labels)
        if latent.ndim != 2 or latent.shape[0] != len(labels):
            raise InputError(f"reference latent has {latent.shape[0]} rows but {len(labels)} labels were given.")
        for col in labels.columns:
            if labels[col].isna().any():
                raise InputError(f"reference labels {col!r} contain missing values; fill or drop those cells.")
        if not 1 <= k <= latent.shape[0]:
            raise InputError(f"k must be between 1 and the number of reference cells ({latent.shape[0]}); got {k}.")
        self.k = k
        self.labels = labels.astype(str).reset_index(drop=True)
        self._index = NearestNeighbors(n_neighbors=k).fit(latent)

    def predict(self, query_latent: np.ndarray, *, uncertainty_threshold: float = 0.5,
                unknown_label: str = "Unknown", index: pd.Index | None = None) -> dict[str, LabelTransferResult]:
        """Transfer every label level to the query cells."""
        query = np.asarray(query_latent, dtype=np.float32)
        distances, neighbours = self._index.kneighbors(query)
        weights = neighbour_weights(distances)
        index = pd.RangeIndex(query.shape[0]) if index is None else index
        out = {}
        for level in self.labels.columns:
            codes, classes = pd.factorize(self.labels[level], sort=True)
            proba = np.zeros((query.shape[0], len(classes)), dtype=np.float64)
            rows = np.repeat(np.arange(query.shape[0]), self.k)
            np.add.at(proba, (rows, codes[neighbours].ravel()), weights.ravel())
            best = proba.argmax(1)
            uncertainty = 1.0 - proba[np.arange(len(best)), best]
            predicted = np.asarray(classes, dtype=object)[best]
            predicted[uncertainty > uncertainty_threshold] = unknown_label
            out[level] = LabelTransferResult(
                labels=pd.Series(predicted, index=index, name=level),
                uncertainty=pd.Series(uncertainty, index=index, name=f"{level}_uncertainty"),
                probabilities=pd.DataFrame(proba, index=index, columns=list(classes)),
            )
        return out


def neighbour_weights(distances: np.ndarray) -> np.ndarray:
    """Normalised Gaussian-kernel weights of each row of neighbour distances."""
    scale = np.sqrt(np.mean(distances**2, axis=1, keepdims=True)) + 1e-12
    kernel = np.exp(-((distances / scale) ** 2))
    return kernel / kernel.sum(1, keepdims=True)


def _as_frame(labels: pd.DataFrame | pd.Series | np.ndarray) -> pd.DataFrame:
    if isinstance(labels, pd.DataFrame):
        return labels
    if isinstance(labels, pd.Series):
        return labels.to_frame(name=labels.name if labels.name is not None else "label")
    return pd.DataFrame({"label": np.asarray(labels)})
