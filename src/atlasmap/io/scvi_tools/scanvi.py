"""scvi-tools ``SCANVI`` (its ``SCANVAE`` module) -> atlasmap's :class:`~atlasmap.modules.scanvi.SCANVIModule`.

``SCANVAE`` is scvi-tools' ``VAE`` (imported exactly as for SCVI: :func:`~atlasmap.io.scvi_tools.scvi.load_vae_weights`)
plus the label model, which maps one to one onto atlasmap's:

* labels: scvi-tools' ``categorical_mapping`` order (the classifier's output order, in which the unlabeled
  category was *swapped* with the last label, so it is always last); atlasmap's labels are that mapping
  without its last entry, and the unlabeled category is that entry;
* ``classifier.classifier``: a linear layer (``linear_classifier=True``) or ``FCLayers`` + linear (the
  encoder's batch / layer norm flags, ``n_layers`` x ``n_hidden``), returning logits; before scvi-tools 1.1 it
  ended with a softmax, which gives the same probabilities (atlasmap applies the softmax in ``predict``);
* ``encoder_z2_z1`` / ``decoder_z1_z2`` (the label stacks: z1 and the label injected into every layer) and
  ``y_prior``; scvi-tools' p(z1 | z2, y) variance has no epsilon (``z1_var_eps=0``).

Refused with a message naming them: ``use_labels_groups``, ``classifier_parameters`` that change the
classifier's architecture, ``gene-label`` dispersion, and everything the SCVI import refuses.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import torch

from atlasmap.errors import ModelFileError
from atlasmap.io.scvi_tools.imported import ImportedModel, register_converter
from atlasmap.io.scvi_tools.reader import LABELS_FIELD, ScviToolsCheckpoint, as_list, registry_from_scvi_tools
from atlasmap.io.scvi_tools.scvi import VAE_DEFAULTS, load_vae_weights, scvi_config_from_checkpoint
from atlasmap.io.scvi_tools.weights import (
    ModuleWriter,
    StateReader,
    count_fc_layers,
    load_fc_stack,
    load_linear,
    refuse,
)
from atlasmap.modules.scanvi import SCANVIConfig, SCANVIModule

#: scvi-tools SCANVI / SCANVAE defaults (1.x) for arguments ``init_params_`` does not record
SCANVI_DEFAULTS: dict[str, Any] = {
    **VAE_DEFAULTS, "linear_classifier": False, "y_prior": None, "labels_groups": None, "use_labels_groups": False,
    "classifier_parameters": None,
}
#: ``classifier_parameters`` keys whose values atlasmap's classifier represents (anything else is refused)
_CLASSIFIER_KEYS = frozenset({"n_layers", "n_hidden", "dropout_rate", "logits"})


def scanvi_labels(ckpt: ScviToolsCheckpoint) -> tuple[str, str, tuple[str, ...]]:
    """``(labels_key, unlabeled_category, labels)`` of a scvi-tools SCANVI, labels in the classifier's order."""
    field = ckpt.field(LABELS_FIELD)
    state = field["state_registry"]
    mapping = [str(c) for c in as_list(state.get("categorical_mapping"))]
    setup_args = ckpt.registry.get("setup_args") or {}
    labels_key = state.get("original_key", setup_args.get("labels_key"))
    unlabeled = state.get("unlabeled_category", setup_args.get("unlabeled_category"))
    if not mapping or labels_key is None or unlabeled is None:
        raise ModelFileError(f"{ckpt.path} is a scvi-tools SCANVI model without its labels field "
                             "(field_registries['labels'] with categorical_mapping and unlabeled_category); the file "
                             "is incomplete.")
    unlabeled = str(unlabeled)
    if mapping[-1] != unlabeled or unlabeled in mapping[:-1]:
        raise ModelFileError(f"{ckpt.path}: the SCANVI label order {mapping[:6]} does not end with the unlabeled "
                             f"category {unlabeled!r}, as scvi-tools writes it; the file is corrupt.")
    labels = tuple(mapping[:-1])
    if len(set(labels)) != len(labels) or not labels:
        raise ModelFileError(f"{ckpt.path}: the SCANVI labels {labels[:6]} are empty or not unique as text.")
    return str(labels_key), unlabeled, labels


def scanvi_config_from_checkpoint(ckpt: ScviToolsCheckpoint, registry: Any, n_labels: int) -> SCANVIConfig:
    """atlasmap :class:`SCANVIConfig` of a scvi-tools ``SCANVAE``, or a clear refusal."""
    path = ckpt.path
    p = ckpt.init_params(SCANVI_DEFAULTS)
    if p.get("use_labels_groups") or p.get("labels_groups") is not None or any(
            n.startswith(("classifier_groups.", "groups_index.")) for n in ckpt.state):
        raise refuse(path, "use_labels_groups (a hierarchical label classifier)")
    state = ckpt.state
    vae = scvi_config_from_checkpoint(ckpt, registry)
    linear = bool(p.get("linear_classifier"))
    extra = dict(p.get("classifier_parameters") or {})
    unknown = sorted(set(extra) - _CLASSIFIER_KEYS)
    if unknown:
        raise refuse(path, f"classifier_parameters with {', '.join(unknown)} (atlasmap's classifier: the model's "
                           "layers, ReLU, the encoder's norm)")
    expect_layers = 0 if linear else vae.n_layers
    expect_hidden = 0 if linear else vae.n_hidden
    n_layers = int(extra.get("n_layers", expect_layers))
    n_hidden = int(extra.get("n_hidden", expect_hidden))
    if n_layers == 0 or n_hidden == 0:
        linear, n_layers, n_hidden = True, 0, 0
    found = count_fc_layers(state, "classifier.classifier.0")
    if "classifier.classifier.0.weight" not in state and not found:
        raise ModelFileError(f"{path} is a scvi-tools SCANVI model without its classifier (classifier.classifier.*); "
                             "the file is incomplete or not a SCANVI model.")
    if linear != (found == 0) or (not linear and found != n_layers):
        raise ModelFileError(f"{path}: the classifier's weights ({found} hidden layers) disagree with its "
                             f"hyper-parameters (linear_classifier={linear}, n_layers={n_layers}).")
    if not linear and (n_layers != vae.n_layers or n_hidden != vae.n_hidden):
        raise refuse(path, f"a classifier of {n_layers} x {n_hidden} hidden units set by classifier_parameters "
                           f"(atlasmap's MLP classifier has the model's {vae.n_layers} x {vae.n_hidden})")
    if not linear and float(extra.get("dropout_rate", vae.dropout_rate)) != vae.dropout_rate:
        raise refuse(path, "a classifier dropout rate other than the model's (classifier_parameters)")
    prior = state.get("y_prior")
    uniform = prior is not None and bool(torch.allclose(prior, torch.full_like(prior, 1.0 / max(n_labels, 1))))
    return SCANVIConfig(**{**asdict(vae), "n_labels": n_labels, "linear_classifier": linear,
                           "classification_ratio": 50.0, "label_prior": "uniform" if uniform else "empirical",
                           "z1_var_eps": 0.0})


def scanvi_module_from_checkpoint(ckpt: ScviToolsCheckpoint, registry: Any, config: SCANVIConfig) -> SCANVIModule:
    """Build an atlasmap scANVI module holding exactly the weights of the scvi-tools ``SCANVAE``."""
    module = SCANVIModule(config)
    reader, writer = StateReader(ckpt.state, ckpt.path), ModuleWriter(module)
    load_vae_weights(module, reader, writer, registry, config)
    n_latent, n_hidden, n_labels = config.n_latent, config.n_hidden, config.n_labels
    bn = {part: config.use_batch_norm in (part, "both") for part in ("encoder", "decoder")}
    if config.linear_classifier:
        load_linear(writer, module.classifier.out, reader, "classifier.classifier.0")
    else:
        load_fc_stack(writer, module.classifier.body, reader, "classifier.classifier.0", n_x=n_latent,
                      n_hidden=n_hidden, n_cont=0, n_cat_list=[], deep_injection=True, batch_norm=bn["encoder"])
        load_linear(writer, module.classifier.out, reader, "classifier.classifier.1")
    labels = [n_labels]
    load_fc_stack(writer, module.encoder_z2_z1, reader, "encoder_z2_z1.encoder", n_x=n_latent, n_hidden=n_hidden,
                  n_cont=0, n_cat_list=labels, deep_injection=True, batch_norm=bn["encoder"])
    load_linear(writer, module.z2_mean, reader, "encoder_z2_z1.mean_encoder")
    load_linear(writer, module.z2_var, reader, "encoder_z2_z1.var_encoder")
    load_fc_stack(writer, module.decoder_z1_z2, reader, "decoder_z1_z2.decoder", n_x=n_latent, n_hidden=n_hidden,
                  n_cont=0, n_cat_list=labels, deep_injection=True, batch_norm=bn["decoder"])
    load_linear(writer, module.z1_mean, reader, "decoder_z1_z2.mean_decoder")
    load_linear(writer, module.z1_var, reader, "decoder_z1_z2.var_decoder")
    prior = reader.take("y_prior", (1, n_labels)).reshape(n_labels)
    if bool((prior <= 0).any()):
        raise ModelFileError(f"{ckpt.path}: y_prior has non-positive entries; the label prior must be a distribution.")
    writer.set(module.y_prior, prior)
    reader.check_all_used()
    writer.check_all_written()
    return module


@register_converter("SCANVI")
def import_scanvi(ckpt: ScviToolsCheckpoint) -> ImportedModel:
    """A scvi-tools ``SCANVI`` as an atlasmap ``SCANVI`` record."""
    labels_key, unlabeled, labels = scanvi_labels(ckpt)
    if "y_prior" in ckpt.state and tuple(ckpt.state["y_prior"].shape) != (1, len(labels)):
        raise ModelFileError(f"{ckpt.path}: y_prior has shape {tuple(ckpt.state['y_prior'].shape)} for "
                             f"{len(labels)} labels; the file is corrupt.")
    registry = registry_from_scvi_tools(ckpt)
    config = scanvi_config_from_checkpoint(ckpt, registry, len(labels))
    module = scanvi_module_from_checkpoint(ckpt, registry, config)
    extra = {"labels_key": labels_key, "unlabeled_category": unlabeled, "labels": list(labels), "pretrained": False}
    return ImportedModel(model="SCANVI", registry=registry, module=module, extra=extra,
                         is_trained=bool(ckpt.attr.get("is_trained_", True)), source=ckpt.path)


__all__ = ["SCANVI_DEFAULTS", "import_scanvi", "scanvi_config_from_checkpoint", "scanvi_labels",
           "scanvi_module_from_checkpoint"]
