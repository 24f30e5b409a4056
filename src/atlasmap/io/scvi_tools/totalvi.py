"""scvi-tools ``TOTALVI`` (its ``TOTALVAE`` module) -> atlasmap's :class:`~atlasmap.modules.totalvi.TOTALVIModule`.

The two modules compute the same model once atlasmap's module is configured with scvi-tools' conventions:

* encoder input ``[log(1 + x / (1 + mean x)), log(1 + y / (1 + mean y)), cont]`` with unmeasured proteins
  as zero counts inside the protein mean (``unmeasured_proteins="zero"``); the batch and categorical
  covariates injected into every layer;
* RNA library: the observed count total, or (``use_observed_lib_size=False``) scvi-tools' one-layer library
  encoder with its per-batch log-normal prior (``library_log_means`` / ``library_log_vars``);
* decoder: four hidden stacks on ``[z, cont]`` and seven heads on ``[h, z, cont]``, covariates in every layer
  and head; ``px_r`` / ``py_r`` per gene/protein or per batch (``gene-batch``, ``protein-batch``; the
  degenerate ``-label`` variants of a one-label setup as per gene/protein);
* protein background prior ``background_pro_alpha`` / ``background_pro_log_beta`` (proteins x batches) ->
  atlasmap's per-batch ``prior_back_mean`` / ``prior_back_log_scale`` tables (batches x proteins);
* ``log_per_batch_efficiency`` -> atlasmap's ``log_efficiency`` table (``protein_batch_efficiency=True``);
* ``protein_batch_mask`` (``str(batch code)`` -> measured) -> atlasmap's ``batch_protein_mask`` (batch name ->
  measured; every reference batch listed, all measured when scvi-tools recorded no mask).

Refused with a message naming them: ``panel_key``, size factors, ``log_variational=False``,
``latent_distribution="ln"``, ``gene-cell`` / ``protein-cell`` dispersion, ``-label`` dispersions with more
than one label, batch norm with layer norm, ``extra_encoder_kwargs`` / ``extra_decoder_kwargs``
(e.g. ``activation_function_bg="exp"``), MuData setups.
"""

from __future__ import annotations

from typing import Any

import torch

from atlasmap.data.registry import Registry
from atlasmap.errors import ModelFileError
from atlasmap.io.scvi_tools.imported import ImportedModel, register_converter
from atlasmap.io.scvi_tools.reader import ScviToolsCheckpoint, as_list, registry_from_scvi_tools
from atlasmap.io.scvi_tools.weights import (
    ModuleWriter,
    StateReader,
    count_fc_layers,
    load_fc_stack,
    load_injected_linear,
    load_linear,
    norm_where,
    refuse,
)
from atlasmap.modules.totalvi import TOTALVIConfig, TOTALVIModule

PROTEINS_FIELD = "proteins"

#: scvi-tools TOTALVI / TOTALVAE defaults (1.x) for arguments ``init_params_`` does not record
TOTALVI_DEFAULTS: dict[str, Any] = {
    "n_latent": 20, "gene_dispersion": "gene", "protein_dispersion": "protein", "gene_likelihood": "nb",
    "latent_distribution": "normal", "empirical_protein_background_prior": None, "override_missing_proteins": False,
    "n_hidden": 256, "n_layers_encoder": 2, "n_layers_decoder": 1, "dropout_rate_encoder": 0.2,
    "dropout_rate_decoder": 0.2, "log_variational": True, "encode_covariates": True, "use_observed_lib_size": True,
    "use_batch_norm": "both", "use_layer_norm": "none", "use_size_factor_key": False, "extra_encoder_kwargs": None,
    "extra_decoder_kwargs": None,
}

#: decoder hidden stacks and heads: scvi-tools name -> atlasmap attribute
_BODIES = {"px_decoder": "decoder", "py_back_decoder": "background_decoder", "py_fore_decoder": "foreground_decoder",
           "sigmoid_decoder": "mixing_decoder"}
_HEADS = {"px_scale_decoder": "px_scale", "px_dropout_decoder_gene": "px_dropout",
          "py_back_mean_log_alpha": "back_mean", "py_back_mean_log_beta": "back_scale",
          "py_fore_scale_decoder": "fore_scale", "py_background_decoder": "mixing"}


def _dispersion(value: Any, kind: str, state_shape: tuple[int, ...], path: Any) -> str:
    """atlasmap's dispersion variant for scvi-tools' ``gene_dispersion`` / ``protein_dispersion``."""
    per_feature, per_batch, per_label = kind, f"{kind}-batch", f"{kind}-label"
    if value in (per_feature, per_batch):
        return str(value)
    if value == per_label and len(state_shape) == 2 and state_shape[1] == 1:
        return per_feature  # totalVI's labels are a one-category dummy: one value per feature, exactly
    raise refuse(path, f"{kind}_dispersion={value!r} (atlasmap: {per_feature}, {per_batch})")


def totalvi_config_from_checkpoint(ckpt: ScviToolsCheckpoint, registry: Registry, n_proteins: int) -> TOTALVIConfig:
    """atlasmap :class:`TOTALVIConfig` of a scvi-tools ``TOTALVAE``, or a clear refusal."""
    path, state = ckpt.path, ckpt.state
    p = ckpt.init_params(TOTALVI_DEFAULTS)
    setup_args = ckpt.registry.get("setup_args") or {}
    if setup_args.get("panel_key") or "panel" in (ckpt.registry.get("field_registries") or {}):
        raise refuse(path, "panel_key (protein background priors per panel instead of per batch)")
    if p.get("latent_distribution") != "normal":
        raise refuse(path, f"latent_distribution={p.get('latent_distribution')!r} (atlasmap: 'normal')")
    if not p.get("log_variational", True):
        raise refuse(path, "log_variational=False (atlasmap encodes log-scaled counts)")
    if setup_args.get("size_factor_key") or p.get("use_size_factor_key"):
        raise refuse(path, "size factors (size_factor_key) instead of library sizes")
    for key in ("extra_encoder_kwargs", "extra_decoder_kwargs"):
        if p.get(key):
            raise refuse(path, f"{key}={p[key]!r}")
    if p.get("gene_likelihood") not in ("nb", "zinb"):
        raise refuse(path, f"gene_likelihood={p.get('gene_likelihood')!r} (atlasmap: nb, zinb)")
    gene_dispersion = _dispersion(p.get("gene_dispersion"), "gene", tuple(state.get("px_r", torch.empty(0)).shape), path)
    protein_dispersion = _dispersion(p.get("protein_dispersion"), "protein",
                                     tuple(state.get("py_r", torch.empty(0)).shape), path)
    batch_norm = norm_where(p.get("use_batch_norm"), "use_batch_norm", path)
    layer_norm = norm_where(p.get("use_layer_norm"), "use_layer_norm", path)
    for part in ("encoder", "decoder"):
        if batch_norm in (part, "both") and layer_norm in (part, "both"):
            raise refuse(path, f"batch norm and layer norm together in the {part} (atlasmap: one of them)")
    try:
        n_latent, n_hidden = (int(d) for d in state["encoder.z_mean_encoder.weight"].shape)
    except (KeyError, ValueError):
        raise ModelFileError(f"{path} lacks the totalVI encoder (encoder.z_mean_encoder); it is not a TOTALVI model "
                             "or is corrupt.") from None
    n_enc = count_fc_layers(state, "encoder.encoder")
    n_dec = count_fc_layers(state, "decoder.px_decoder")
    explicit = ckpt.init_params()
    for name, value in (("n_latent", n_latent), ("n_hidden", n_hidden), ("n_layers_encoder", n_enc),
                        ("n_layers_decoder", n_dec)):
        if name in explicit and explicit[name] != value:
            raise ModelFileError(f"{path}: init_params_ say {name}={explicit[name]!r} but the weights have {value}.")
    return TOTALVIConfig(
        n_genes=registry.n_vars, n_proteins=n_proteins, n_categories=tuple(registry.n_categories),
        n_continuous=len(registry.continuous_keys), n_hidden=n_hidden, n_latent=n_latent, n_layers_encoder=n_enc,
        n_layers_decoder=n_dec, dropout_rate_encoder=float(p["dropout_rate_encoder"]),
        dropout_rate_decoder=float(p["dropout_rate_decoder"]), gene_likelihood=p["gene_likelihood"],
        gene_dispersion=gene_dispersion, protein_dispersion=protein_dispersion,
        encode_covariates=bool(p.get("encode_covariates")), deeply_inject_covariates=True,
        use_layer_norm=layer_norm, use_batch_norm=batch_norm,
        use_observed_lib_size=bool(p.get("use_observed_lib_size", True)),
        protein_batch_efficiency="log_per_batch_efficiency" in state, unmeasured_proteins="zero",
    )


def totalvi_module_from_checkpoint(ckpt: ScviToolsCheckpoint, registry: Registry, config: TOTALVIConfig
                                   ) -> TOTALVIModule:
    """Build an atlasmap totalVI module holding exactly the weights of the scvi-tools ``TOTALVAE``."""
    module = TOTALVIModule(config)
    reader, writer = StateReader(ckpt.state, ckpt.path), ModuleWriter(module)
    cats, n_cont = registry.n_categories, len(registry.continuous_keys)
    n_batch, n_genes, n_pro = registry.n_batch, config.n_genes, config.n_proteins
    n_latent, n_hidden = config.n_latent, config.n_hidden
    bn = {part: config.use_batch_norm in (part, "both") for part in ("encoder", "decoder")}
    enc_cats, enc_cont = (cats, n_cont) if config.encode_covariates else ([], 0)
    common = {"n_hidden": n_hidden, "deep_injection": True}
    load_fc_stack(writer, module.encoder, reader, "encoder.encoder", n_x=n_genes + n_pro, n_cont=enc_cont,
                  n_cat_list=enc_cats, batch_norm=bn["encoder"], **common)
    load_linear(writer, module.z_mean, reader, "encoder.z_mean_encoder")
    load_linear(writer, module.z_var, reader, "encoder.z_var_encoder")
    if config.use_observed_lib_size:
        reader.ignore("encoder.l_gene_")  # scvi-tools always builds it; unused with the observed library size
    else:
        load_fc_stack(writer, module.l_encoder, reader, "encoder.l_gene_encoder", n_x=n_genes + n_pro,
                      n_cont=enc_cont, n_cat_list=enc_cats, batch_norm=bn["encoder"], **common)
        if reader.has("encoder.l_gene_encoder.fc_layers.Layer 1.0.weight"):
            raise ModelFileError(f"{ckpt.path}: the library encoder has more than one layer.")
        load_linear(writer, module.l_mean, reader, "encoder.l_gene_mean_encoder")
        load_linear(writer, module.l_var, reader, "encoder.l_gene_var_encoder")
        for name in ("library_log_means", "library_log_vars"):
            writer.set(getattr(module, name), reader.take(name, (1, n_batch)).reshape(n_batch))
    for src, dst in _BODIES.items():
        load_fc_stack(writer, getattr(module, dst), reader, f"decoder.{src}", n_x=n_latent, n_cont=n_cont,
                      n_cat_list=cats, batch_norm=bn["decoder"], **common)
    for src, dst in _HEADS.items():
        head = getattr(module, dst)
        if head is None:  # px_dropout with the nb likelihood: scvi-tools builds it anyway
            reader.ignore(f"decoder.{src}.")
            continue
        load_injected_linear(writer, head, reader, f"decoder.{src}", n_x=n_hidden + n_latent, n_cont=n_cont,
                             n_cat_list=cats)
    for name, kind, dst in (("px_r", config.gene_dispersion, "px_r"), ("py_r", config.protein_dispersion, "py_r")):
        n = n_genes if name == "px_r" else n_pro
        if kind.endswith("-batch"):
            writer.set(getattr(module, f"{dst}_batch").blocks[0], reader.take(name, (n, n_batch)).T)
        else:
            value = reader.take(name)
            if tuple(value.shape) not in ((n,), (n, 1)):
                raise ModelFileError(f"tensor {name!r} in {ckpt.path} has shape {tuple(value.shape)}; expected ({n},).")
            writer.set(getattr(module, dst), value.reshape(n))
    for src, table in (("background_pro_alpha", module.prior_back_mean),
                       ("background_pro_log_beta", module.prior_back_log_scale)):
        writer.set(table.blocks[0], reader.take(src, (n_pro, n_batch)).T)
    if config.protein_batch_efficiency:
        writer.set(module.log_efficiency.blocks[0], reader.take("log_per_batch_efficiency", (n_pro, n_batch)).T)
    writer.set(module.protein_fill, torch.zeros(n_pro))  # unused: unmeasured proteins enter as zeros
    reader.check_all_used()
    writer.check_all_written()
    return module


def totalvi_proteins(ckpt: ScviToolsCheckpoint, registry: Registry) -> dict[str, Any]:
    """The protein part of atlasmap's TOTALVI state: names, obsm key, batch protein mask."""
    field = ckpt.field(PROTEINS_FIELD)
    data_reg, state = field["data_registry"], field["state_registry"]
    names = [str(n) for n in as_list(state.get("column_names"))]
    setup_args = ckpt.registry.get("setup_args") or {}
    obsm_key = data_reg.get("attr_key") or setup_args.get("protein_expression_obsm_key")
    if not names or data_reg.get("attr_name", "obsm") != "obsm" or not obsm_key:
        raise ModelFileError(f"{ckpt.path} is a scvi-tools TOTALVI model without its protein field "
                             "(field_registries['proteins'] with column_names, read from .obsm); the file is "
                             "incomplete, or the model was set up on a MuData (setup_mudata), which atlasmap does not "
                             "import.")
    if len(set(names)) != len(names):
        raise ModelFileError(f"{ckpt.path}: the protein names are not unique ({names[:6]}).")
    p = ckpt.init_params(TOTALVI_DEFAULTS)
    override = bool(p.get("override_missing_proteins"))
    batches = registry.categories[registry.batch_key]
    raw_mask = state.get("protein_batch_mask") or {}
    mask: dict[str, list[bool]] = {}
    for code, batch in enumerate(batches):
        values = raw_mask.get(str(code)) if not override else None
        measured = [True] * len(names) if values is None else [bool(v) for v in as_list(values)]
        if len(measured) != len(names):
            raise ModelFileError(f"{ckpt.path}: protein_batch_mask of batch {batch!r} has {len(measured)} entries for "
                                 f"{len(names)} proteins.")
        mask[batch] = measured
    unknown = sorted(set(map(str, raw_mask)) - {str(i) for i in range(len(batches))})
    if unknown:
        raise ModelFileError(f"{ckpt.path}: protein_batch_mask names batch codes {unknown[:4]} the model does not have.")
    return {"protein_names": names, "protein_expression_obsm_key": str(obsm_key),
            "protein_names_uns_key": setup_args.get("protein_names_uns_key"), "override_missing_proteins": override,
            "batch_protein_mask": mask}


@register_converter("TOTALVI")
def import_totalvi(ckpt: ScviToolsCheckpoint) -> ImportedModel:
    """A scvi-tools ``TOTALVI`` as an atlasmap ``TOTALVI`` record."""
    registry = registry_from_scvi_tools(ckpt)
    extra = totalvi_proteins(ckpt, registry)
    config = totalvi_config_from_checkpoint(ckpt, registry, len(extra["protein_names"]))
    module = totalvi_module_from_checkpoint(ckpt, registry, config)
    return ImportedModel(model="TOTALVI", registry=registry, module=module, extra=extra,
                         is_trained=bool(ckpt.attr.get("is_trained_", True)), source=ckpt.path)


__all__ = ["TOTALVI_DEFAULTS", "import_totalvi", "totalvi_config_from_checkpoint", "totalvi_module_from_checkpoint",
           "totalvi_proteins"]
