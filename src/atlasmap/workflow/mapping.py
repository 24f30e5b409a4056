"""The mapping workflow in a few plain functions (used by the CLI, handy in notebooks too)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from atlasmap.data.backed import is_backed
from atlasmap.data.minified import is_minified
from atlasmap.errors import InputError
from atlasmap.models import load_reference
from atlasmap.runtime import is_main_process
from atlasmap.workflow.knn import transfer_labels

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

    if not is_main_process():  # under torchrun only rank 0 writes outputs
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp.h5ad", dir=path.parent)
    os.close(fd)
    try:
        adata.write_h5ad(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
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
        A trained model of any atlasmap class, its saved directory, or a scvi-tools model directory (plain or
        scvi-hub layout: imported on the fly; its ``adata.h5ad``, minified or not, is then the default
        ``adata_reference``).
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

    if isinstance(reference, str | Path):
        reference, imported = load_reference(reference, attach_saved_adata=adata_reference is None)
        if imported and adata_reference is None:
            adata_reference = reference.adata
    model = type(reference).load_query_data(adata_query, reference, batch_key=batch_key, **(surgery_kwargs or {}))
    model.train(max_epochs, **(train_kwargs or {}))
    return model, joint_embedding(model, adata_query, adata_reference, key_added=key_added)


def joint_embedding(model: Any, adata_query: Any, adata_reference: Any = None, *, key_added: str = LATENT_KEY
                    ) -> Any:
    """A new AnnData of the query (and, if given, the reference) cells with the latent in ``obsm[key_added]``.

    The inputs are not modified. With a reference, ``obs['atlasmap_dataset']`` is ``reference``/``query``
    and only the genes both share are kept in ``X``. A minified reference (scvi-hub, no counts) contributes its
    stored latent; model outputs that need counts (totalVI's proteins) are NaN (False for masks) for its cells.
    """
    import anndata as ad


    if is_backed(adata_query) or (adata_reference is not None and is_backed(adata_reference)):
        raise InputError("a backed (on-disk) AnnData cannot be copied with its counts; write its latent with "
                         "atlasmap.workflow.streaming.write_latent (or map it with atlasmap.workflow.streaming.map_query_backed, "
                         "CLI: atlasmap map --backed).")
    query = adata_query.copy()
    query.obsm[key_added] = model.get_latent_representation(adata_query)
    query_extra = _model_obsm_outputs(model, adata_query)
    query.obsm.update(query_extra)
    if adata_reference is None:
        query.obs[DATASET_KEY] = pd.Categorical(["query"] * query.n_obs, categories=["reference", "query"])
        return query
    reference = adata_reference.copy()
    reference.obsm[key_added] = model.get_latent_representation(adata_reference)
    if is_minified(adata_reference):  # no counts: no decoded outputs for its cells
        reference_extra = {key: _missing_like(frame, adata_reference.obs_names) for key, frame in query_extra.items()}
    else:
        reference_extra = _model_obsm_outputs(model, adata_reference)
    for a, extra in ((reference, reference_extra), (query, query_extra)):
        a.obsm = {key_added: a.obsm[key_added], **extra}  # other embeddings are not comparable across the two
        a.varm = {}
        a.obsp = {}
    overlap = reference.obs_names.intersection(query.obs_names)
    joint = ad.concat({"reference": reference, "query": query}, join="inner", label=DATASET_KEY,
                      index_unique="-" if len(overlap) else None, merge="same")
    joint.obs[DATASET_KEY] = pd.Categorical(joint.obs[DATASET_KEY], categories=["reference", "query"])
    return joint


def _model_obsm_outputs(model: Any, adata: Any) -> dict[str, Any]:
    """Further per-cell outputs of models that have them, keyed by ``.obsm`` slot (totalVI: denoised and
    imputed proteins, foreground probability, measured mask)."""
    return dict(model.obsm_outputs(adata))


def _missing_like(frame: Any, obs_names: Any) -> pd.DataFrame:
    """A frame with ``frame``'s columns for cells whose values are unknown: NaN, or False for boolean masks."""
    frame = pd.DataFrame(frame)
    fill = {c: False if frame[c].dtype == bool else np.nan for c in frame.columns}
    return pd.DataFrame({c: np.full(len(obs_names), v) for c, v in fill.items()}, index=obs_names)[list(frame.columns)]


def joint_batch_column(joint: Any, adata_reference: Any, adata_query: Any, reference_key: str | None,
                       query_key: str | None = None) -> str | None:
    """The batch column of joint cells (from :func:`joint_embedding`), for metrics and plots. The joint
    AnnData keeps only ``.obs`` columns both inputs share, so when the query names its batch column
    differently (``query_key``, the ``batch_key=`` of ``load_query_data``), the two are combined into
    ``joint.obs['atlasmap_batch']``. Returns the column's name (``None`` if there is none)."""
    query_key = query_key or reference_key
    if reference_key in joint.obs.columns and query_key == reference_key:
        return reference_key
    if adata_reference is None or reference_key not in adata_reference.obs or query_key not in adata_query.obs:
        return query_key if query_key in joint.obs.columns else None
    values = np.concatenate([adata_reference.obs[reference_key].astype(str).to_numpy(),
                             adata_query.obs[query_key].astype(str).to_numpy()])
    joint.obs["atlasmap_batch"] = pd.Categorical(values)
    return "atlasmap_batch"


def knn_transfer(joint: Any, labels_key: str | list[str], *, k: int = 15, uncertainty_threshold: float = 0.5,
                 key_added: str = "atlasmap", use_rep: str = LATENT_KEY, kernel: str = "gaussian",
                 unknown_label: str = "Unknown", unlabeled_category: str | None = None) -> dict[str, Any]:
    """Transfer ``obs[labels_key]`` from reference to query cells of ``joint`` (in place) by weighted kNN.

    A thin wrapper of :func:`atlasmap.workflow.knn.transfer_labels` on a joint AnnData (``obs['atlasmap_dataset']``
    says which cells are reference and which query); see there for the columns written:
    ``obs[f"{key_added}_{labels_key}"]``, ``obs[f"{key_added}_{labels_key}_uncertainty"]`` and
    ``obsm[f"{key_added}_{labels_key}_proba"]``. The generic ``{key_added}_label`` names are left to the
    model's own predictions (SCANVI). Reference cells keep their own label, uncertainty 0.

    ``unlabeled_category`` (e.g. a scANVI reference's ``"Unknown"``): reference cells with that value of the
    first labels key are unlabelled: they do not vote, and query cells with it have no truth for the accuracy.

    Returns
    -------
    A JSON-able summary of the first level: ``k``, ``n_query``, ``fraction_unknown`` and, when the query
    cells have labels of their own, ``accuracy`` (of the argmax label, threshold not applied: comparable to
    scvi-tools' and scArches' figures) and ``accuracy_with_unknown`` (``Unknown`` counted as wrong).
    """

    keys = [labels_key] if isinstance(labels_key, str) else list(labels_key)
    if DATASET_KEY not in joint.obs.columns:
        raise InputError(f"kNN transfer needs reference cells in the mapped data (obs[{DATASET_KEY!r}]); "
                         "pass --with-reference REF.h5ad / adata_reference=.")
    for key in keys:
        if key not in joint.obs.columns:
            raise InputError(f"labels key {key!r} is not a column of the reference's .obs.")
    is_query = (joint.obs[DATASET_KEY].astype(str) == "query").to_numpy()
    original = joint.obs[keys[0]]
    unlabeled = (original.astype(str) == str(unlabeled_category)).to_numpy() if unlabeled_category is not None \
        else np.zeros(joint.n_obs, dtype=bool)
    if unlabeled.any():  # unlabelled reference cells do not vote (the column is restored below)
        joint.obs[keys[0]] = original.astype(object).where(~unlabeled, np.nan)
    try:
        transfer_labels(joint, labels_keys=keys, use_rep=use_rep, k=k, uncertainty_threshold=uncertainty_threshold,
                        unknown_label=unknown_label, kernel=kernel, key_added=key_added, dataset_key=DATASET_KEY,
                        label_alias=False)
    finally:
        joint.obs[keys[0]] = original
    predicted = joint.obs[f"{key_added}_{keys[0]}"].astype(object).to_numpy()[is_query]
    proba = joint.obsm[f"{key_added}_{keys[0]}_proba"]
    summary: dict[str, Any] = {"labels_key": keys[0], "k": int(joint.uns[f"{key_added}_label_transfer"]["k"]),
                               "kernel": kernel, "n_query": int(is_query.sum()),
                               "fraction_unknown": float(np.mean(predicted == unknown_label)) if is_query.any()
                               else 0.0}
    truth = joint.obs[keys[0]].to_numpy(dtype=object)[is_query]
    has_truth = pd.notna(truth) & ~unlabeled[is_query]
    if has_truth.any():
        truth = truth[has_truth].astype(str)
        argmax = np.asarray(proba.columns, dtype=object)[np.asarray(proba)[is_query].argmax(1)][has_truth]
        summary["accuracy"] = float(np.mean(argmax == truth))
        summary["accuracy_with_unknown"] = float(np.mean(predicted[has_truth] == truth))
    return summary
