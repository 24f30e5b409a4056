"""scvi-tools ``SCVI`` (its ``VAE`` module) -> atlasmap's :class:`~atlasmap.modules.scvi.SCVIModule`.

Batch norm statistics, dispersions (``gene`` / ``gene-batch``), zero-inflation logits and the per-batch
library priors are copied; ``gene-label``/``gene-cell`` dispersion, ``normal`` likelihood, logistic-normal
latents, batch embeddings, size factors, non-log inputs, custom activations and batch norm combined with
layer norm in one network are refused with a message saying so.
"""

from __future__ import annotations

from typing import Any

from atlasmap.data.registry import Registry
from atlasmap.errors import ModelFileError
from atlasmap.io.scvi_tools.imported import ImportedModel, register_converter
from atlasmap.io.scvi_tools.reader import ScviToolsCheckpoint, registry_from_scvi_tools
from atlasmap.io.scvi_tools.weights import ModuleWriter, StateReader, load_fc_stack, norm_where, refuse
from atlasmap.modules.scvi import SCVIConfig, SCVIModule

# scvi-tools VAE defaults (1.x) for arguments not recorded explicitly in init_params_ (used by the converters)
VAE_DEFAULTS: dict[str, Any] = {
    "n_hidden": 128, "n_latent": 10, "n_layers": 1, "dropout_rate": 0.1, "dispersion": "gene",
    "gene_likelihood": "zinb", "latent_distribution": "normal", "use_observed_lib_size": True,
    "encode_covariates": False, "deeply_inject_covariates": True, "use_batch_norm": "both",
    "use_layer_norm": "none", "log_variational": True, "batch_representation": "one-hot",
    "var_activation": None, "extra_encoder_kwargs": None, "extra_decoder_kwargs": None,
}


def scvi_config_from_checkpoint(ckpt: ScviToolsCheckpoint, registry: Registry) -> SCVIConfig:
    """atlasmap :class:`~atlasmap.modules.scvi.SCVIConfig` of a scvi-tools ``VAE``, or a clear refusal."""
    path = ckpt.path
    p = ckpt.init_params(VAE_DEFAULTS)
    setup_args = ckpt.registry.get("setup_args") or {}
    if p.get("latent_distribution") != "normal":
        raise refuse(path, f"latent_distribution={p.get('latent_distribution')!r} (atlasmap: 'normal')")
    if not p.get("log_variational", True):
        raise refuse(path, "log_variational=False (atlasmap encodes log1p(counts))")
    if p.get("batch_representation", "one-hot") != "one-hot":
        raise refuse(path, f"batch_representation={p.get('batch_representation')!r} (atlasmap: one-hot)")
    if p.get("var_activation") is not None:
        raise refuse(path, "a custom var_activation (atlasmap: exp)")
    for key in ("extra_encoder_kwargs", "extra_decoder_kwargs"):
        if p.get(key):
            raise refuse(path, f"{key}={p[key]!r}")
    if setup_args.get("size_factor_key") or p.get("use_size_factor_key"):
        raise refuse(path, "size factors (size_factor_key) instead of library sizes")
    if p.get("gene_likelihood") not in ("zinb", "nb", "poisson"):
        raise refuse(path, f"gene_likelihood={p.get('gene_likelihood')!r} (atlasmap: zinb, nb, poisson)")
    if p.get("dispersion") not in ("gene", "gene-batch"):
        raise refuse(path, f"dispersion={p.get('dispersion')!r} (atlasmap: gene, gene-batch)")
    batch_norm = norm_where(p.get("use_batch_norm"), "use_batch_norm", path)
    layer_norm = norm_where(p.get("use_layer_norm"), "use_layer_norm", path)
    for part in ("encoder", "decoder"):
        if batch_norm in (part, "both") and layer_norm in (part, "both"):
            raise refuse(path, f"batch norm and layer norm together in the {part} (atlasmap: one of them)")
    state = ckpt.state
    n_layers = sum(1 for n in state if n.startswith("z_encoder.encoder.fc_layers.Layer ") and n.endswith(".0.bias"))
    try:
        n_hidden = int(state["z_encoder.mean_encoder.weight"].shape[1])
        n_latent = int(state["z_encoder.mean_encoder.weight"].shape[0])
    except (KeyError, IndexError):
        raise ModelFileError(f"{path} lacks the scVI encoder (z_encoder.mean_encoder); it is not an scVI model "
                             "or is corrupt.") from None
    explicit = ckpt.init_params()  # without defaults: only what the file records
    for name, value in (("n_layers", n_layers), ("n_hidden", n_hidden), ("n_latent", n_latent)):
        if name in explicit and explicit[name] != value:
            raise ModelFileError(f"{path}: init_params_ say {name}={explicit[name]!r} but the weights have {value}.")
    return SCVIConfig(
        n_genes=registry.n_vars, n_categories=tuple(registry.n_categories),
        n_continuous=len(registry.continuous_keys), n_hidden=n_hidden, n_latent=n_latent, n_layers=n_layers,
        dropout_rate=float(p.get("dropout_rate", 0.1)), gene_likelihood=p["gene_likelihood"],
        dispersion=p["dispersion"], encode_covariates=bool(p.get("encode_covariates")),
        deeply_inject_covariates=bool(p.get("deeply_inject_covariates")), use_layer_norm=layer_norm,
        use_batch_norm=batch_norm, use_observed_lib_size=bool(p.get("use_observed_lib_size", True)),
    )


def scvi_module_from_checkpoint(ckpt: ScviToolsCheckpoint, registry: Registry, config: SCVIConfig,
                                module_cls: type[SCVIModule] = SCVIModule) -> SCVIModule:
    """Build an atlasmap SCVI module holding exactly the weights of the scvi-tools ``VAE``."""
    module = module_cls(config)
    reader, writer = StateReader(ckpt.state, ckpt.path), ModuleWriter(module)
    load_vae_weights(module, reader, writer, registry, config)
    reader.check_all_used()
    writer.check_all_written()
    return module


def load_vae_weights(module: SCVIModule, reader: StateReader, writer: ModuleWriter, registry: Registry,
                     config: SCVIConfig) -> None:
    """Copy the scvi-tools ``VAE`` part of a state (encoders, decoder, dispersion, library priors) into
    ``module`` (an :class:`SCVIModule` or subclass); the caller checks that nothing is left over."""
    n_cat_list = registry.n_categories
    n_cont = len(registry.continuous_keys)
    bn = {part: config.use_batch_norm in (part, "both") for part in ("encoder", "decoder")}
    enc_cats, enc_cont = (n_cat_list, n_cont) if config.encode_covariates else ([], 0)
    common = {"n_hidden": config.n_hidden, "deep_injection": config.deeply_inject_covariates}
    load_fc_stack(writer, module.encoder, reader, "z_encoder.encoder", n_x=config.n_genes, n_cont=enc_cont,
                  n_cat_list=enc_cats, batch_norm=bn["encoder"], **common)
    for src, dst in (("z_encoder.mean_encoder", module.z_mean), ("z_encoder.var_encoder", module.z_var)):
        writer.set(dst.weight, reader.take(f"{src}.weight", (config.n_latent, config.n_hidden)))
        writer.set(dst.bias, reader.take(f"{src}.bias", (config.n_latent,)))
    if config.use_observed_lib_size:
        reader.ignore("l_encoder.")  # scvi-tools always builds it; unused with the observed library size
    else:
        load_fc_stack(writer, module.l_encoder, reader, "l_encoder.encoder", n_x=config.n_genes, n_cont=enc_cont,
                      n_cat_list=enc_cats, batch_norm=bn["encoder"], **common)
        for src, dst in (("l_encoder.mean_encoder", module.l_mean), ("l_encoder.var_encoder", module.l_var)):
            writer.set(dst.weight, reader.take(f"{src}.weight", (1, config.n_hidden)))
            writer.set(dst.bias, reader.take(f"{src}.bias", (1,)))
        n_batch = registry.n_batch
        for name in ("library_log_means", "library_log_vars"):
            writer.set(getattr(module, name), reader.take(name, (1, n_batch)).reshape(n_batch))
    load_fc_stack(writer, module.decoder, reader, "decoder.px_decoder", n_x=config.n_latent, n_cont=n_cont,
                  n_cat_list=n_cat_list, batch_norm=bn["decoder"], **common)
    writer.set(module.px_scale.weight, reader.take("decoder.px_scale_decoder.0.weight", (config.n_genes, config.n_hidden)))
    writer.set(module.px_scale.bias, reader.take("decoder.px_scale_decoder.0.bias", (config.n_genes,)))
    if module.px_dropout is not None:
        writer.set(module.px_dropout.weight, reader.take("decoder.px_dropout_decoder.weight",
                                                         (config.n_genes, config.n_hidden)))
        writer.set(module.px_dropout.bias, reader.take("decoder.px_dropout_decoder.bias", (config.n_genes,)))
    else:
        reader.ignore("decoder.px_dropout_decoder.")  # built by scvi-tools for every likelihood
    reader.ignore("decoder.px_r_decoder.")  # used only by dispersion="gene-cell"
    if config.dispersion == "gene":
        writer.set(module.px_r, reader.take("px_r", (config.n_genes,)))
    else:
        writer.set(module.px_r_batch.blocks[0], reader.take("px_r", (config.n_genes, registry.n_batch)).T)


@register_converter("SCVI")
def import_scvi(ckpt: ScviToolsCheckpoint) -> ImportedModel:
    """A scvi-tools ``SCVI`` as an atlasmap ``SCVI`` record."""
    registry = registry_from_scvi_tools(ckpt)
    config = scvi_config_from_checkpoint(ckpt, registry)
    module = scvi_module_from_checkpoint(ckpt, registry, config)
    return ImportedModel(model="SCVI", registry=registry, module=module, extra={},
                         is_trained=bool(ckpt.attr.get("is_trained_", True)), source=ckpt.path)


__all__ = ["VAE_DEFAULTS", "import_scvi", "load_vae_weights", "scvi_config_from_checkpoint",
           "scvi_module_from_checkpoint"]
