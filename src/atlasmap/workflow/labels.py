"""scANVI label predictions for mapped cells, as ``atlasmap map`` writes them."""

from __future__ import annotations

from typing import Any

import anndata as ad
import numpy as np

from atlasmap.models.base import BaseModel
from atlasmap.models.scanvi import SCANVI, store_predictions
from atlasmap.workflow.mapping import DATASET_KEY


def without_query_labels(reference: BaseModel, query: Any) -> Any:
    """``query`` without the column of the scANVI reference's labels key (so that query training does not
    learn from the query's own labels), or ``query`` itself when there is none. ``query`` is not modified."""
    if not (isinstance(reference, SCANVI) and reference.labels_key in query.obs):
        return query
    return ad.AnnData(X=query.X, obs=query.obs.drop(columns=[reference.labels_key]), var=query.var,
                      layers=dict(query.layers))


def predict_labels(model: BaseModel, joint: Any, query: Any, reference_adata: Any = None, *,
                   key_added: str = "atlasmap") -> dict[str, Any] | None:
    """Write a scANVI model's predicted labels of every cell of ``joint`` (from
    :func:`~atlasmap.workflow.mapping.joint_embedding`) into ``joint.obs`` / ``.obsm``; return a summary
    (labels key, mean uncertainty, accuracy against the query's own labels when it has them), or ``None``
    for models without a classifier."""
    if not isinstance(model, SCANVI):
        return None
    is_ref = (joint.obs[DATASET_KEY] == "reference").to_numpy()
    proba = np.empty((joint.n_obs, len(model.labels)), dtype=np.float32)
    proba[~is_ref] = model.predict(query, soft=True).to_numpy()
    if reference_adata is not None:
        proba[is_ref] = model.predict(reference_adata, soft=True).to_numpy()
    store_predictions(joint, proba, list(model.labels), key_added=key_added)
    summary: dict[str, Any] = {
        "labels_key": model.labels_key, "key": f"{key_added}_label",
        "query_cells_labelled_in_training": int((model._cells().fields["y"] >= 0).sum()),
        "mean_uncertainty": float(joint.obs.loc[~is_ref, f"{key_added}_label_uncertainty"].mean()),
    }
    if model.labels_key in query.obs:
        truth = query.obs[model.labels_key]
        known = (truth.notna() & (truth.astype(str) != model.unlabeled_category)).to_numpy()
        if known.any():
            predicted = joint.obs.loc[~is_ref, f"{key_added}_label"].astype(str).to_numpy()
            summary["accuracy"] = float(np.mean(predicted[known] == truth.astype(str).to_numpy()[known]))
    return summary


__all__ = ["predict_labels", "without_query_labels"]
