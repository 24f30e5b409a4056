"""The user-facing :class:`SCVI` model."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch

from atlasmap.data.loader import CellData, minibatches
from atlasmap.data.registry import build_registry
from atlasmap.errors import InputError
from atlasmap.models.base import NORM_CHOICES, BaseModel, check_choice
from atlasmap.models.registry import register_model
from atlasmap.modules.scvi import NormWhere, SCVIConfig, SCVIModule


def library_log_priors(cells: CellData, n_batch: int, batches: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of log library size of each batch in ``batches`` (scvi-tools' library prior)."""
    log_lib = np.log(cells.library_sizes())
    codes = cells.fields["cat"][:, 0].numpy()
    means, variances = [], []
    for b in batches:
        values = log_lib[codes == b]
        means.append(values.mean() if values.size else 0.0)
        variances.append(values.var() if values.size > 1 else 1.0)
    return torch.tensor(means, dtype=torch.float32), torch.tensor(variances, dtype=torch.float32)


@register_model
class SCVI(BaseModel):
    """single-cell Variational Inference (Lopez et al. 2018) built for reference mapping.

    Parameters
    ----------
    adata
        AnnData with raw counts in ``.X`` or in ``layers[layer]``. Never modified.
    batch_key
        ``.obs`` column of the batch (``None``: one batch, which still gets its own covariate column).
    categorical_covariate_keys, continuous_covariate_keys
        Further ``.obs`` columns injected like the batch (categorical) or linearly (continuous).
    layer
        Layer with the raw counts; ``None`` reads ``.X``.
    n_hidden, n_latent, n_layers, dropout_rate
        Architecture of the encoder and decoder.
    gene_likelihood
        ``"zinb"``, ``"nb"`` or ``"poisson"``.
    dispersion
        ``"gene"`` (one per gene) or ``"gene-batch"`` (one per gene and batch).
    encode_covariates
        Feed covariates to the encoder too. Default True (unlike scvi-tools): without it surgery can only
        adapt the decoder and cannot move query cells in the latent space.
    deeply_inject_covariates
        Inject covariates into every hidden layer, not only the first.
    use_layer_norm, use_batch_norm
        Where to normalise hidden layers: ``"none"``, ``"encoder"``, ``"decoder"`` or ``"both"``.
        Default layer norm, no batch norm (the scArches recommendation for reference mapping).
    use_observed_lib_size
        Use the observed log library size; otherwise learn it with a per-batch log-normal prior.
    seed
        Seeds the weight initialisation.

    Examples
    --------
    >>> ref = atlasmap.SCVI(adata_ref, batch_key="batch").train(max_epochs=100)
    >>> query = atlasmap.SCVI.load_query_data(adata_query, ref).train(max_epochs=100)
    >>> adata_query.obsm["X_atlasmap"] = query.get_latent_representation()
    """

    _module_cls = SCVIModule
    _config_cls = SCVIConfig

    def __init__(
        self,
        adata: Any,
        *,
        batch_key: str | None = None,
        categorical_covariate_keys: list[str] | None = None,
        continuous_covariate_keys: list[str] | None = None,
        layer: str | None = None,
        n_hidden: int = 128,
        n_latent: int = 10,
        n_layers: int = 1,
        dropout_rate: float = 0.1,
        gene_likelihood: Literal["zinb", "nb", "poisson"] = "zinb",
        dispersion: Literal["gene", "gene-batch"] = "gene",
        encode_covariates: bool = True,
        deeply_inject_covariates: bool = True,
        use_layer_norm: NormWhere = "both",
        use_batch_norm: NormWhere = "none",
        use_observed_lib_size: bool = True,
        seed: int = 0,
    ) -> None:
        check_choice("gene_likelihood", gene_likelihood, ("zinb", "nb", "poisson"))
        check_choice("dispersion", dispersion, ("gene", "gene-batch"))
        check_choice("use_layer_norm", use_layer_norm, NORM_CHOICES)
        check_choice("use_batch_norm", use_batch_norm, NORM_CHOICES)
        for name, value in (("n_hidden", n_hidden), ("n_latent", n_latent), ("n_layers", n_layers)):
            if int(value) < 1:
                raise InputError(f"{name} must be a positive integer, got {value}.")
        if not 0.0 <= dropout_rate < 1.0:
            raise InputError(f"dropout_rate must be in [0, 1), got {dropout_rate}.")
        registry = build_registry(
            adata, batch_key=batch_key, categorical_covariate_keys=categorical_covariate_keys,
            continuous_covariate_keys=continuous_covariate_keys, layer=layer,
        )
        config = self._config_cls(
            n_genes=registry.n_vars, n_categories=tuple(registry.n_categories),
            n_continuous=len(registry.continuous_keys), n_hidden=int(n_hidden), n_latent=int(n_latent),
            n_layers=int(n_layers), dropout_rate=float(dropout_rate), gene_likelihood=gene_likelihood,
            dispersion=dispersion, encode_covariates=encode_covariates,
            deeply_inject_covariates=deeply_inject_covariates, use_layer_norm=use_layer_norm,
            use_batch_norm=use_batch_norm, use_observed_lib_size=use_observed_lib_size,
            **self._config_extras(),
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            module = self._module_cls(config)
        self._init_parts(adata=adata, registry=registry, module=module)
        if not use_observed_lib_size:
            cells = self._cells()
            means, variances = library_log_priors(cells, registry.n_batch, range(registry.n_batch))
            module.library_log_means.copy_(means)
            module.library_log_vars.copy_(variances)

    def _config_extras(self) -> dict[str, Any]:
        """Extra module hyper-parameters of subclasses (fields of their ``_config_cls``)."""
        return {}

    def _init_new_batches(self, cells: CellData, added: dict[str, tuple[str, ...]]) -> None:
        n_new = len(added[self.registry.batch_key])
        if n_new and not self.module.config.use_observed_lib_size:
            n_batch = self.registry.n_batch
            means, variances = library_log_priors(cells, n_batch, range(n_batch - n_new, n_batch))
            self.module.extend_batch_buffers(means, variances)

    # ------------------------------------------------------------------ outputs
    @torch.inference_mode()
    def get_normalized_expression(
        self,
        adata: Any = None,
        *,
        transform_batch: str | Sequence[str] | None = None,
        library_size: float | Literal["latent"] = 1.0,
        n_samples: int = 1,
        gene_list: Sequence[str] | None = None,
        batch_size: int = 2048,
        return_numpy: bool = False,
        seed: int = 0,
    ) -> pd.DataFrame | np.ndarray:
        """Denoised expression of each cell, optionally as if measured in other batches.

        Parameters
        ----------
        transform_batch
            Batch category (or list, averaged) to decode every cell in: batch-corrected expression.
            ``None`` decodes each cell in its own batch.
        library_size
            Scale of the output: a number (default 1: frequencies) or ``"latent"`` (the cell's own library).
        n_samples
            Latent samples averaged; with 1 the posterior mean is used (deterministic).
        gene_list
            Subset of genes to return.
        """
        self._check_trained()
        cells = self._cells(adata, what="normalised expression")
        device = self._device()
        batch_codes = self._batch_codes(transform_batch)
        gene_idx = self._gene_indices(gene_list)
        out = np.empty((cells.n_cells, len(gene_idx)), dtype=np.float32)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        gene_idx_t = torch.as_tensor(gene_idx, device=device)
        self.module.eval()
        for rows in minibatches(cells.n_cells, batch_size, shuffle=False):
            batch = cells.batch(rows, device)
            inf = self.module.inference(batch, sample=False)
            if n_samples == 1 and len(batch_codes) == 1 and batch_codes[0] is None:  # the common case: one pass
                px = self.module.generative(inf["qz_m"], inf["library"], batch["cat"], batch["cont"],
                                            with_dropout=False, logits_only=True)
                values = torch.softmax(px["px_scale_logits"], dim=-1)
                if library_size == "latent":
                    values.mul_(torch.exp(inf["library"]))
                elif float(library_size) != 1.0:
                    values.mul_(float(library_size))
                if len(gene_idx) != self.registry.n_vars:
                    values = values.index_select(1, gene_idx_t)
                torch.from_numpy(out[rows[0]:rows[-1] + 1]).copy_(values)  # rows are contiguous (no shuffle)
                continue
            acc = torch.zeros(len(rows), len(gene_idx), device=device)
            for _ in range(n_samples):
                z = inf["qz_m"]
                if n_samples > 1:
                    z = z + inf["qz_v"].sqrt() * torch.randn(z.shape, generator=gen).to(device)
                for code in batch_codes:
                    cat = batch["cat"].clone()
                    if code is not None:
                        cat[:, 0] = code
                    px = self.module.generative(z, inf["library"], cat, batch["cont"], with_dropout=False)
                    values = px["px_rate"] if library_size == "latent" else px["px_scale"] * float(library_size)
                    acc += values.index_select(1, gene_idx_t)
            out[rows] = (acc / (n_samples * len(batch_codes))).cpu().numpy()
        if return_numpy:
            return out
        obs_names = (self.adata if adata is None else adata).obs_names
        return pd.DataFrame(out, index=obs_names, columns=[self.registry.var_names[i] for i in gene_idx])
