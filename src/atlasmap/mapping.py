"""The mapping workflow in a few plain functions (used by the CLI, handy in notebooks too)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from atlasmap.errors import InputError

LATENT_KEY = "X_atlasmap"
DATASET_KEY = "atlasmap_dataset"


def read_h5ad(path: str | Path, *, what: str = "input") -> Any:
    """Read an .h5ad with a clear error for a missing or unreadable file."""
    import anndata as ad

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} file {path} does not exist.")
    try:
        return ad.read_h5ad(path)
    except Exception as err:  # h5py/anndata raise many types for a damaged file
        raise InputError(f"{what} file {path} is not a readable .h5ad file ({type(err).__name__}: {err}).") from None


def write_h5ad_atomic(adata: Any, path: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``adata`` to a temporary sibling, then rename: a crash never leaves a half-written file."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise InputError(f"output {path} already exists; pass --overwrite (overwrite=True) to replace it.")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp.h5ad", dir=path.parent)
    os.close(fd)
    try:
        adata.write_h5ad(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def map_query(
    adata_query: Any,
    reference: Any,
    *,
    batch_key: str | None = None,
    max_epochs: int | None = None,
    adata_reference: Any = None,
    key_added: str = LATENT_KEY,
    surgery_kwargs: dict[str, Any] | None = None,
    train_kwargs: dict[str, Any] | None = None,
) -> tuple[Any, Any]:
    """Surgery + query training + embedding in one call.

    Parameters
    ----------
    adata_query
        Query AnnData (raw counts). Not modified.
    reference
        A trained model of any atlasmap class, or its saved directory.
    batch_key
        Query batch column, if named differently from the reference's.
    max_epochs
        Query training epochs (default: scvi-tools' heuristic).
    adata_reference
        Reference cells to embed alongside the query (optional).
    surgery_kwargs, train_kwargs
        Passed to ``load_query_data`` (e.g. ``unfrozen=True``) and ``train`` (e.g. ``lr=``).

    Returns
    -------
    ``(query_model, mapped)`` where ``mapped`` is a new AnnData with the latent in ``obsm[key_added]``.
    """
    from atlasmap.io import load_model

    if isinstance(reference, str | Path):
        reference = load_model(reference)
    model = type(reference).load_query_data(adata_query, reference, batch_key=batch_key, **(surgery_kwargs or {}))
    model.train(max_epochs, **(train_kwargs or {}))
    return model, joint_embedding(model, adata_query, adata_reference, key_added=key_added)


def joint_embedding(model: Any, adata_query: Any, adata_reference: Any = None, *, key_added: str = LATENT_KEY
                    ) -> Any:
    """A new AnnData of the query (and, if given, the reference) cells with the latent in ``obsm[key_added]``.

    The inputs are not modified. With a reference, ``obs['atlasmap_dataset']`` is ``reference``/``query``
    and only the genes both share are kept in ``X``.
    """
    import anndata as ad

    query = adata_query.copy()
    query.obsm[key_added] = model.get_latent_representation(adata_query)
    if adata_reference is None:
        query.obs[DATASET_KEY] = pd.Categorical(["query"] * query.n_obs, categories=["reference", "query"])
        return query
    reference = adata_reference.copy()
    reference.obsm[key_added] = model.get_latent_representation(adata_reference)
    for a in (reference, query):
        a.obsm = {key_added: a.obsm[key_added]}  # other embeddings are not comparable across the two
        a.varm = {}
        a.obsp = {}
    overlap = reference.obs_names.intersection(query.obs_names)
    joint = ad.concat({"reference": reference, "query": query}, join="inner", label=DATASET_KEY,
                      index_unique="-" if len(overlap) else None, merge="same")
    joint.obs[DATASET_KEY] = pd.Categorical(joint.obs[DATASET_KEY], categories=["reference", "query"])
    return joint


def knn_transfer(joint: Any, labels_key: str, *, k: int = 15, uncertainty_threshold: float = 0.5,
                 key_added: str = "atlasmap", use_rep: str = LATENT_KEY) -> dict[str, float]:
    """Transfer ``obs[labels_key]`` from reference to query cells of ``joint`` (in place) by kNN.

    Writes ``obs[f"{key_added}_{labels_key}"]`` and ``obs[f"{key_added}_{labels_key}_uncertainty"]``
    for the query cells (reference cells keep their own label, uncertainty 0). Returns a summary with the
    accuracy when the query has labels of its own.
    """
    from atlasmap.knn import KNNLabelTransfer

    if labels_key not in joint.obs.columns:
        raise InputError(f"labels key {labels_key!r} is not a column of the reference's .obs.")
    is_ref = (joint.obs[DATASET_KEY] == "reference").to_numpy()
    ref_labels = joint.obs.loc[is_ref, labels_key]
    if ref_labels.isna().all():
        raise InputError(f"the reference has no values in obs[{labels_key!r}] to transfer.")
    keep = ref_labels.notna().to_numpy()
    latent = np.asarray(joint.obsm[use_rep])
    index = KNNLabelTransfer(latent[is_ref][keep], ref_labels[keep], k=k)
    result = index.predict(latent[~is_ref], uncertainty_threshold=uncertainty_threshold,
                           index=joint.obs_names[~is_ref])[labels_key]
    pred_key, unc_key = f"{key_added}_{labels_key}", f"{key_added}_{labels_key}_uncertainty"
    predicted = joint.obs[labels_key].astype(object).copy()
    predicted[~is_ref] = result.labels.to_numpy()
    joint.obs[pred_key] = pd.Categorical(predicted.astype(str))
    uncertainty = np.zeros(joint.n_obs)
    uncertainty[~is_ref] = result.uncertainty.to_numpy()
    joint.obs[unc_key] = uncertainty
    summary = {"k": float(k), "n_query": float((~is_ref).sum()),
               "fraction_unknown": float((result.labels == "Unknown").mean())}
    truth = joint.obs.loc[~is_ref, labels_key]
    if truth.notna().any():
        mask = truth.notna().to_numpy()
        raw_best = result.probabilities.idxmax(axis=1).to_numpy()
        summary["accuracy"] = float(np.mean(raw_best[mask] == truth.astype(str).to_numpy()[mask]))
    return summary
