"""Training a reference of any model class in one call, as ``atlasmap reference`` does."""

from __future__ import annotations

import warnings
from typing import Any, Literal

from atlasmap.errors import InputError
from atlasmap.models.base import BaseModel
from atlasmap.models.scanvi import SCANVI, label_categories
from atlasmap.models.scvi import SCVI
from atlasmap.models.totalvi import TOTALVI

ReferenceModel = Literal["scvi", "scanvi", "totalvi"]
#: Model classes :func:`train_reference` (and ``atlasmap reference --model``) can train.
REFERENCE_MODELS: tuple[str, ...] = ("scvi", "scanvi", "totalvi")


def train_reference(
    adata: Any,
    *,
    model: ReferenceModel = "scvi",
    labels_key: str | None = None,
    unlabeled_category: str = "Unknown",
    scvi_epochs: int | None = None,
    protein_key: str | None = None,
    protein_names_key: str | None = None,
    train_kwargs: dict[str, Any] | None = None,
    **arch: Any,
) -> BaseModel:
    """Build and train a reference model.

    Parameters
    ----------
    adata
        Reference cells with raw counts. Never modified.
    model
        ``"scvi"``, ``"scanvi"`` (semi-supervised: scVI pre-training for ``scvi_epochs``, then scANVI
        fine-tuning; ``scvi_epochs=0`` trains scANVI from scratch) or ``"totalvi"`` (RNA + proteins).
    labels_key, unlabeled_category
        scANVI: the ``.obs`` column of the cell labels and the value of unlabelled cells.
    protein_key, protein_names_key
        totalVI: the ``.obsm`` key of the protein counts, and the ``.uns`` key of their names when that
        entry is an array.
    train_kwargs
        Passed to ``train`` (``max_epochs``, ``batch_size``, ``lr``, ``device``, ...).
    **arch
        Architecture and setup arguments as for :class:`~atlasmap.SCVI` (``batch_key``, ``layer``,
        ``n_layers``, ``n_latent``, ...); for totalVI ``n_layers`` and ``dropout_rate`` set both its encoder
        and decoder.

    Returns
    -------
    The trained model.
    """
    if model not in REFERENCE_MODELS:
        raise InputError(f"model must be one of {', '.join(map(repr, REFERENCE_MODELS))}; got {model!r}.")
    train_kwargs = dict(train_kwargs or {})
    if model != "totalvi" and (protein_key or protein_names_key):
        raise InputError("protein_key and protein_names_key apply to model='totalvi' only.")
    if model != "scanvi" and (labels_key or scvi_epochs is not None):
        raise InputError("labels_key and scvi_epochs apply to model='scanvi' only.")
    if model == "scanvi":
        return _scanvi(adata, arch, train_kwargs, labels_key, unlabeled_category, scvi_epochs)
    if model == "totalvi":
        return _totalvi(adata, arch, train_kwargs, protein_key, protein_names_key)
    reference = SCVI(adata, **arch)
    reference.train(**train_kwargs)
    return reference


def _scanvi(adata: Any, arch: dict[str, Any], train_kwargs: dict[str, Any], labels_key: str | None,
            unlabeled_category: str, scvi_epochs: int | None) -> SCANVI:
    if not labels_key:
        raise InputError("model='scanvi' needs labels_key (the .obs column of the cell labels).")
    labels = {"labels_key": labels_key, "unlabeled_category": unlabeled_category}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        label_categories(adata, **labels)  # bad labels fail now, before any training
    if scvi_epochs == 0:
        reference = SCANVI(adata, **labels, **arch)
    else:
        pretrained = SCVI(adata, **arch)
        pretrained.train(**{**train_kwargs, "max_epochs": scvi_epochs})
        reference = SCANVI.from_scvi_model(pretrained, **labels, seed=arch.get("seed", 0))
    reference.train(**train_kwargs)
    return reference


def _totalvi(adata: Any, arch: dict[str, Any], train_kwargs: dict[str, Any], protein_key: str | None,
             protein_names_key: str | None) -> TOTALVI:
    """The architecture arguments mean the same as for scVI (``n_layers``/``dropout_rate``: both depths)."""
    if not protein_key:
        raise InputError("model='totalvi' needs protein_key (the .obsm key of the protein counts).")
    if arch.get("gene_likelihood") == "poisson":
        raise InputError("model='totalvi' supports gene_likelihood 'nb' or 'zinb', not 'poisson'.")
    arch = dict(arch)
    n_layers, dropout = arch.pop("n_layers", 1), arch.pop("dropout_rate", 0.2)
    if "dispersion" in arch:
        arch["gene_dispersion"] = arch.pop("dispersion")
    reference = TOTALVI(adata, protein_expression_obsm_key=protein_key, protein_names_uns_key=protein_names_key,
                        n_layers_encoder=n_layers, n_layers_decoder=n_layers, dropout_rate_encoder=dropout,
                        dropout_rate_decoder=dropout, **arch)
    reference.train(**train_kwargs)
    return reference


__all__ = ["REFERENCE_MODELS", "train_reference"]
