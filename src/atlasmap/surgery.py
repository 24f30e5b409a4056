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

:func:`extend` (steps 1-2) and :func:`freeze` (step 3) act on a module and a registry: no model class, no
file. ``SCVI.load_query_data`` (:meth:`atlasmap.models.base.BaseModel.load_query_data`) calls them, with
the model class's own initialisation of new per-batch state in between.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from atlasmap.data.align import new_categories
from atlasmap.data.registry import Registry, check_anndata
from atlasmap.errors import InputError
from atlasmap.protocols import CellSource, FrozenState, SurgeryTarget


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


def surgery_options(options: dict[str, Any]) -> SurgeryOptions:
    """:class:`SurgeryOptions` from keyword arguments, refusing unknown names."""
    unknown = set(options) - set(SurgeryOptions.__dataclass_fields__)
    if unknown:
        raise InputError(f"unknown surgery option(s) {', '.join(sorted(unknown))}; valid: "
                         f"{', '.join(SurgeryOptions.__dataclass_fields__)}.")
    return SurgeryOptions(**options)


@dataclass
class QuerySurgery:
    """A surgery in progress: the query's registry and a copy of the reference module with new blocks.

    Attributes
    ----------
    module
        The copy (the reference module is never changed), new blocks added, not yet frozen.
    registry, key_map
        The reference's registry with the query's new categories appended per covariate; the query's
        ``.obs`` column names where they differ from the reference's.
    added
        The new categories of each covariate, in order of appearance in the query.
    new_params
        The new blocks, the parameters the module registers (trainable after :func:`freeze`).
    """

    module: nn.Module
    registry: Registry
    key_map: dict[str, str]
    added: dict[str, tuple[str, ...]]
    new_params: list[nn.Parameter]


def extend(module: SurgeryTarget, registry: Registry, adata: Any, *, key_map: dict[str, str],
           batch_key: str | None = None, seed: int = 0) -> QuerySurgery:
    """Steps 1 and 2: extend the registry with the query's new categories and a copy of ``module`` with a
    block per covariate that has new categories, in every table of that covariate (initialised from
    ``seed`` on the CPU generator, whatever the device). ``module`` and ``registry`` are not changed."""
    if not isinstance(module, SurgeryTarget):
        raise TypeError(f"surgery needs a SurgeryTarget module (atlasmap.protocols), got {type(module).__name__}.")
    check_anndata(adata)
    key_map = dict(key_map)
    if batch_key is not None:
        key_map[registry.batch_key] = batch_key
    added = new_categories(adata, registry, key_map)
    query_registry = registry.with_categories({k: tuple(v) + added[k] for k, v in registry.categories.items()})
    if not module.config.encode_covariates:
        warnings.warn(
            "the reference was trained with encode_covariates=False: the encoder never sees the batch, so "
            "surgery only adapts the decoder and query cells keep their uncorrected latent positions.",
            UserWarning, stacklevel=3,
        )
    copy_ = copy.deepcopy(module)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        new_params = add_category_blocks(copy_, [len(added[k]) for k in query_registry.categorical_keys])
    return QuerySurgery(module=copy_, registry=query_registry, key_map=key_map, added=added, new_params=new_params)


def record(plan: QuerySurgery, opts: SurgeryOptions) -> dict[str, Any]:
    """The surgery as saved with the query model: options and new categories (:func:`freeze` adds the names
    of the trainable parameters)."""
    return {"options": asdict(opts), "new_categories": {k: list(v) for k, v in plan.added.items()}}


def freeze(plan: QuerySurgery, opts: SurgeryOptions) -> dict[str, Any]:
    """Step 3: freeze everything but the new blocks (and what ``opts`` release); return the surgery's
    :func:`record` with the trainable parameter names."""
    apply_freezing(plan.module, plan.new_params, opts)
    return {**record(plan, opts),
            "trainable": [name for name, p in plan.module.named_parameters() if p.requires_grad]}


def init_from_closest_batches(module: SurgeryTarget, cells: CellSource, registry: Registry,
                              added: dict[str, tuple[str, ...]], *, max_cells: int = 1000,
                              seed: int = 0) -> dict[str, str]:
    """Start each new batch from the reference batch that explains its cells best, instead of from random
    values: for every new batch, the negative ELBO of (up to ``max_cells`` of) its cells is computed as if
    they belonged to each reference batch in turn, and the rows of the best one are copied into the new
    batch's rows of every table of the batch covariate (all layers, heads, per-batch parameters). This is
    scPoli's idea of initialising new conditions from the closest known one; before any query training the
    query then embeds as well as the closest reference batch allows.

    Returns ``{new batch: reference batch it starts from}``. Needs the new blocks of :func:`extend` and the
    query's cells (with their new codes); the module is changed in place (its new rows only).
    """
    new = added.get(registry.batch_key, ())
    if not new:
        return {}
    names = registry.categories[registry.batch_key]
    n_ref = len(names) - len(new)
    codes = cells.fields["cat"][:, 0].numpy()
    device = next(module.parameters()).device
    rng = np.random.default_rng(seed)
    tables = module.covariate_tables(0)
    chosen: dict[str, str] = {}
    was_training = module.training
    module.eval()
    with torch.no_grad():
        for j, name in enumerate(new):
            code = n_ref + j
            rows = np.flatnonzero(codes == code)
            if rows.size > max_cells:
                rows = np.sort(rng.choice(rows, max_cells, replace=False))
            batch = cells.batch(rows, device)
            scores = []
            for ref_code in range(n_ref):
                as_ref = dict(batch)
                as_ref["cat"] = batch["cat"].clone()
                as_ref["cat"][:, 0] = ref_code
                with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                    torch.manual_seed(seed)  # the same latent noise for every candidate
                    terms = module.loss(as_ref, 1.0)
                scores.append(float((terms.reconstruction + terms.kl).mean()))
            best = int(np.argmin(scores))
            for table in tables:
                _copy_row(table, best, code)
            chosen[name] = names[best]
    module.train(was_training)
    return chosen


def _copy_row(table: nn.Module, source: int, target: int) -> None:
    """Row ``target`` of a :class:`~atlasmap.nn.layers.CovariateTable` := row ``source`` (whichever blocks)."""
    values = table.table()[source].detach().clone()
    offset = 0
    for block in table.blocks:
        if target < offset + block.shape[0]:
            block.data[target - offset] = values
            return
        offset += block.shape[0]
    raise IndexError(f"row {target} is beyond the table")


def add_category_blocks(module: SurgeryTarget, n_new: list[int]) -> list[nn.Parameter]:
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


__all__ = ["QuerySurgery", "SurgeryOptions", "add_category_blocks", "apply_freezing", "extend", "freeze",
           "frozen_state", "init_from_closest_batches", "record", "restore_freezing", "surgery_options"]
