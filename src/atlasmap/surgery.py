"""scArches architectural surgery (Lotfollahi et al. 2021), whole and in one place.

Mapping a query onto a reference:

1. **Registry**: query genes are aligned to the reference's by name (``prepare_cells`` reorders,
   zero-fills missing genes, drops extra ones); each categorical covariate's new query categories are
   appended to *that covariate's* list, so no existing category ever changes its index.
2. **Module**: a copy of the reference module gets, for every covariate with new categories, a new
   parameter block in every covariate table (encoder and decoder, every injected layer; per-batch
   dispersions). Reference blocks are untouched, so reference cells compute exactly what they did.
3. **Freezing**: everything is ``requires_grad=False`` except the new blocks (and what the options
   release). The optimizer only ever sees trainable tensors, so weight decay cannot move frozen ones,
   and autograd never computes their gradients. Model-specific parts (scANVI's classifier and label
   stacks) are frozen the same way; a module lists them (``label_parts``, ``classifier_parts`` of
   :class:`~atlasmap.protocols.SurgeryTarget`) so their batch-norm statistics stay fixed too. The module
   receives its :class:`~atlasmap.protocols.FrozenState` through ``set_frozen_state``; the same rule
   (:func:`frozen_state`) serves a new surgery and a saved one restored.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from atlasmap.data.align import new_categories
from atlasmap.data.registry import check_anndata
from atlasmap.errors import InputError
from atlasmap.protocols import FrozenState, SurgeryTarget

if TYPE_CHECKING:
    from atlasmap.models.base import BaseModel


@dataclass(frozen=True)
class SurgeryOptions:
    """What trains on the query (defaults: only the new category blocks; scvi-tools' names).

    Attributes
    ----------
    freeze_dropout
        Switch dropout off during query training.
    freeze_expression
        Keep the encoder's first-layer expression weights frozen (False lets them train: the
        reference latent then changes).
    freeze_decoder_first_layer
        Keep the decoder's first-layer latent weights frozen.
    freeze_batchnorm_encoder, freeze_batchnorm_decoder
        Keep batch-norm statistics and affine parameters of the encoder / decoder fixed.
    freeze_classifier
        Keep a label classifier fixed (models that have one).
    unfrozen
        Train every parameter (fine-tuning; the reference latent is no longer preserved).
    """

    freeze_dropout: bool = False
    freeze_expression: bool = True
    freeze_decoder_first_layer: bool = True
    freeze_batchnorm_encoder: bool = True
    freeze_batchnorm_decoder: bool = False
    freeze_classifier: bool = True
    unfrozen: bool = False


def load_query_data(
    adata: Any,
    reference: BaseModel | str | Path,
    *,
    expected: type | None = None,
    batch_key: str | None = None,
    min_gene_overlap: float | None = None,
    seed: int = 0,
    **options: Any,
) -> BaseModel:
    """Build a query model from ``reference`` by architectural surgery.

    Parameters
    ----------
    adata
        Query AnnData with raw counts (same layer as the reference). Never modified.
    reference
        A trained model, or the directory of a saved one.
    batch_key
        Query ``.obs`` column holding the batch, when it is named differently from the reference's
        batch key (required when the reference was set up without a batch key).
    min_gene_overlap
        Fraction of reference genes the query must have (default 0.5).
    seed
        Seeds the initialisation of the new blocks.
    **options
        :class:`SurgeryOptions` fields (``freeze_expression``, ``unfrozen``, ...).

    Returns
    -------
    A model of the reference's class on the query, ready for ``.train()``.
    """
    from atlasmap.io import load_model

    unknown = set(options) - set(SurgeryOptions.__dataclass_fields__)
    if unknown:
        raise InputError(f"unknown surgery option(s) {', '.join(sorted(unknown))}; valid: "
                         f"{', '.join(SurgeryOptions.__dataclass_fields__)}.")
    opts = SurgeryOptions(**options)
    if isinstance(reference, str | Path):
        reference = load_model(reference)
    if expected is not None and not isinstance(reference, expected):
        raise InputError(f"the reference is a {type(reference).__name__} model; use "
                         f"{type(reference).__name__}.load_query_data (or atlasmap.map_query).")
    reference._check_trained()
    check_anndata(adata)

    key_map = dict(reference.key_map)
    if batch_key is not None:
        key_map[reference.registry.batch_key] = batch_key
    added = new_categories(adata, reference.registry, key_map)
    categories = {k: tuple(v) + added[k] for k, v in reference.registry.categories.items()}
    registry = reference.registry.with_categories(categories)
    if not reference.module.config.encode_covariates:
        warnings.warn(
            "the reference was trained with encode_covariates=False: the encoder never sees the batch, so "
            "surgery only adapts the decoder and query cells keep their uncorrected latent positions.",
            UserWarning, stacklevel=2,
        )

    module = copy.deepcopy(reference.module)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        new_params = add_category_blocks(module, [len(added[k]) for k in registry.categorical_keys])
    surgery = {"options": asdict(opts), "new_categories": {k: list(v) for k, v in added.items()}}
    query = type(reference)._from_parts(
        adata=adata, registry=registry, module=module, history={}, is_trained=False, key_map=key_map,
        surgery=surgery, extra=reference._extra_state(),
    )
    query.min_gene_overlap = min_gene_overlap
    cells = query._cells(training=True)  # validates the query now, before any training
    query._init_new_batches(cells, added)
    apply_freezing(module, new_params, opts)
    surgery["trainable"] = [name for name, p in module.named_parameters() if p.requires_grad]
    query.is_trained = reference.is_trained  # reference weights are trained; new blocks start random
    return query


def add_category_blocks(module: nn.Module, n_new: list[int]) -> list[nn.Parameter]:
    """Add a block of ``n_new[j]`` rows to every table of covariate ``j``; return the new parameters."""
    new_params: list[nn.Parameter] = []
    for covariate, n in enumerate(n_new):
        if n == 0:
            continue
        for table in module.covariate_tables(covariate):
            new_params.append(table.add_block(n))
    return new_params


def apply_freezing(module: SurgeryTarget, new_params: list[nn.Parameter], opts: SurgeryOptions) -> None:
    """Freeze everything but ``new_params`` and what the options release; hand the module its frozen state."""
    released = set() if opts.unfrozen else {id(p) for p in new_params} | {id(p) for p in _released(module, opts)}
    for p in module.parameters():
        p.requires_grad_(opts.unfrozen or id(p) in released)
    module.set_frozen_state(frozen_state(module, opts))


def restore_freezing(module: SurgeryTarget, surgery: dict[str, Any]) -> None:
    """Re-apply a saved surgery to a freshly loaded module: its trainable set by name, its frozen state from
    its options (the same rule as :func:`apply_freezing`)."""
    trainable = set(surgery.get("trainable", []))
    names = {name for name, _ in module.named_parameters()}
    if not trainable <= names:
        raise InputError(f"saved trainable parameters {sorted(trainable - names)[:3]} are not in the model.")
    for name, p in module.named_parameters():
        p.requires_grad_(name in trainable)
    module.set_frozen_state(frozen_state(module, SurgeryOptions(**surgery.get("options", {}))))


def frozen_state(module: SurgeryTarget, opts: SurgeryOptions) -> FrozenState:
    """What ``opts`` keep fixed besides ``requires_grad``: frozen batch norms (encoder / decoder as asked, and
    those of the label parts) held in eval mode, and dropout off with ``freeze_dropout``."""
    if opts.unfrozen:
        return FrozenState(dropout_off=opts.freeze_dropout)
    stacks = module.surgery_stacks()
    norms = [norm for part, freeze in (("encoder", opts.freeze_batchnorm_encoder),
                                       ("decoder", opts.freeze_batchnorm_decoder)) if freeze
             for stack in stacks[part] for norm in stack.norms if isinstance(norm, nn.BatchNorm1d)]
    norms += [m for part in module.label_parts(opts.freeze_classifier) for m in part.modules()
              if isinstance(m, nn.BatchNorm1d)]
    return FrozenState(norms_in_eval=tuple(norms), dropout_off=opts.freeze_dropout)


def _released(module: SurgeryTarget, opts: SurgeryOptions) -> list[nn.Parameter]:
    """Reference parameters the options let train: first-layer expression weights, unfrozen batch norms,
    the classifier."""
    stacks = module.surgery_stacks()
    params: list[nn.Parameter] = []
    if not opts.freeze_expression:
        params += [p for stack in stacks["encoder"] for p in stack.layers[0].linear.parameters()]
    if not opts.freeze_decoder_first_layer:
        params += [p for stack in stacks["decoder"] for p in stack.layers[0].linear.parameters()]
    for part, freeze in (("encoder", opts.freeze_batchnorm_encoder), ("decoder", opts.freeze_batchnorm_decoder)):
        if not freeze:
            params += [p for stack in stacks[part] for norm in stack.norms if isinstance(norm, nn.BatchNorm1d)
                       for p in norm.parameters()]
    if not opts.freeze_classifier:
        params += [p for part in module.classifier_parts() for p in part.parameters()]
    return params


__all__ = ["SurgeryOptions", "add_category_blocks", "apply_freezing", "frozen_state", "load_query_data",
           "restore_freezing"]
