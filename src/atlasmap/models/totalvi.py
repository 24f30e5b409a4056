"""The user-facing :class:`TOTALVI` model: RNA + surface protein (CITE-seq), mapping queries with missing
proteins."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch

from atlasmap.data.loader import CellData, minibatches
from atlasmap.data.proteins import align_proteins, background_prior, batch_measured, read_proteins
from atlasmap.data.registry import build_registry
from atlasmap.errors import InputError
from atlasmap.models.base import NORM_CHOICES, BaseModel, check_choice
from atlasmap.models.registry import register_model
from atlasmap.models.scvi import library_log_priors
from atlasmap.modules.scvi import NormWhere
from atlasmap.modules.totalvi import DEFAULT_BACKGROUND_MEAN, TOTALVIConfig, TOTALVIModule

#: ``.obsm`` keys written by :meth:`TOTALVI.annotate` and the mapping workflow.
LATENT_KEY = "X_atlasmap"
PROTEIN_DENOISED_KEY = "atlasmap_protein_denoised"
PROTEIN_FOREGROUND_KEY = "atlasmap_protein_foreground_prob"
PROTEIN_MEASURED_KEY = "atlasmap_protein_measured"


@register_model
class TOTALVI(BaseModel):
    """total Variational Inference (Gayoso et al. 2021) for CITE-seq, built for reference mapping.

    A joint model of RNA counts (NB) and surface-protein counts (a background/foreground NB mixture with a
    per-batch prior on the protein background). Queries may measure fewer proteins than the reference, or
    none: proteins are aligned by name, unmeasured ones are masked out of the likelihood and the encoder,
    and imputed.

    Parameters
    ----------
    adata
        AnnData with raw RNA counts in ``.X`` (or ``layers[layer]``) and raw protein counts in
        ``.obsm[protein_expression_obsm_key]``. Never modified.
    protein_expression_obsm_key
        ``.obsm`` key of the protein counts: a DataFrame (protein names = its columns) or an array whose
        names are in ``.uns[protein_names_uns_key]``. NaN marks a value as not measured.
    protein_names_uns_key
        ``.uns`` key of the protein names when the protein counts are an array.
    batch_key, categorical_covariate_keys, continuous_covariate_keys, layer
        As in :class:`~atlasmap.SCVI`.
    n_hidden, n_latent, n_layers_encoder, n_layers_decoder, dropout_rate_encoder, dropout_rate_decoder
        Architecture (scvi-tools' totalVI defaults).
    gene_likelihood
        ``"nb"`` (default) or ``"zinb"``.
    gene_dispersion, protein_dispersion
        ``"gene"`` / ``"gene-batch"`` and ``"protein"`` / ``"protein-batch"``.
    encode_covariates, deeply_inject_covariates, use_layer_norm, use_batch_norm
        As in :class:`~atlasmap.SCVI` (layer norm, no batch norm by default: the scArches recommendation).
    override_missing_proteins
        By default (as in scvi-tools) a protein with zero counts in every cell of a batch is taken as not
        measured in that batch and masked, with a warning. True treats such zeros as data.
    seed
        Seeds the weight initialisation.

    Notes
    -----
    The library size is the observed RNA total. A batch in which no protein is measured is modelled from
    RNA alone (all its proteins masked), with a warning; a reference in which no protein is measured at
    all is refused (use :class:`~atlasmap.SCVI`).

    Examples
    --------
    >>> ref = atlasmap.TOTALVI(adata_ref, protein_expression_obsm_key="protein_expression",
    ...                        batch_key="batch").train(max_epochs=200)
    >>> query = atlasmap.TOTALVI.load_query_data(adata_query, ref).train(max_epochs=200)
    >>> mapped = query.annotate(adata_query)  # a copy with the latent, denoised/imputed proteins
    """

    _module_cls = TOTALVIModule
    _config_cls = TOTALVIConfig

    protein_names: tuple[str, ...]
    protein_expression_obsm_key: str
    protein_names_uns_key: str | None
    override_missing_proteins: bool
    batch_protein_mask: dict[str, list[bool]]

    def __init__(
        self,
        adata: Any,
        *,
        protein_expression_obsm_key: str,
        protein_names_uns_key: str | None = None,
        batch_key: str | None = None,
        categorical_covariate_keys: list[str] | None = None,
        continuous_covariate_keys: list[str] | None = None,
        layer: str | None = None,
        n_hidden: int = 256,
        n_latent: int = 20,
        n_layers_encoder: int = 2,
        n_layers_decoder: int = 1,
        dropout_rate_encoder: float = 0.2,
        dropout_rate_decoder: float = 0.2,
        gene_likelihood: Literal["nb", "zinb"] = "nb",
        gene_dispersion: Literal["gene", "gene-batch"] = "gene",
        protein_dispersion: Literal["protein", "protein-batch"] = "protein",
        encode_covariates: bool = True,
        deeply_inject_covariates: bool = True,
        use_layer_norm: NormWhere = "both",
        use_batch_norm: NormWhere = "none",
        override_missing_proteins: bool = False,
        seed: int = 0,
    ) -> None:
        check_choice("gene_likelihood", gene_likelihood, ("nb", "zinb"))
        check_choice("gene_dispersion", gene_dispersion, ("gene", "gene-batch"))
        check_choice("protein_dispersion", protein_dispersion, ("protein", "protein-batch"))
        check_choice("use_layer_norm", use_layer_norm, NORM_CHOICES)
        check_choice("use_batch_norm", use_batch_norm, NORM_CHOICES)
        for name, value in (("n_hidden", n_hidden), ("n_latent", n_latent), ("n_layers_encoder", n_layers_encoder),
                            ("n_layers_decoder", n_layers_decoder)):
            if int(value) < 1:
                raise InputError(f"{name} must be a positive integer, got {value}.")
        for name, value in (("dropout_rate_encoder", dropout_rate_encoder),
                            ("dropout_rate_decoder", dropout_rate_decoder)):
            if not 0.0 <= value < 1.0:
                raise InputError(f"{name} must be in [0, 1), got {value}.")
        if not isinstance(protein_expression_obsm_key, str):
            raise InputError("protein_expression_obsm_key must name the .obsm entry holding the protein counts.")
        registry = build_registry(
            adata, batch_key=batch_key, categorical_covariate_keys=categorical_covariate_keys,
            continuous_covariate_keys=continuous_covariate_keys, layer=layer,
        )
        _, names = read_proteins(adata, protein_expression_obsm_key, protein_names_uns_key)
        config = TOTALVIConfig(
            n_genes=registry.n_vars, n_proteins=len(names), n_categories=tuple(registry.n_categories),
            n_continuous=len(registry.continuous_keys), n_hidden=int(n_hidden), n_latent=int(n_latent),
            n_layers_encoder=int(n_layers_encoder), n_layers_decoder=int(n_layers_decoder),
            dropout_rate_encoder=float(dropout_rate_encoder), dropout_rate_decoder=float(dropout_rate_decoder),
            gene_likelihood=gene_likelihood, gene_dispersion=gene_dispersion,
            protein_dispersion=protein_dispersion, encode_covariates=encode_covariates,
            deeply_inject_covariates=deeply_inject_covariates, use_layer_norm=use_layer_norm,
            use_batch_norm=use_batch_norm,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            module = self._module_cls(config)
        extra = {"protein_names": list(names), "protein_expression_obsm_key": protein_expression_obsm_key,
                 "protein_names_uns_key": protein_names_uns_key,
                 "override_missing_proteins": bool(override_missing_proteins), "batch_protein_mask": {}}
        self._init_parts(adata=adata, registry=registry, module=module, extra=extra)
        cells = self._cells(training=True)  # records which proteins each batch measured
        self._check_reference_proteins(cells)
        self._init_protein_fill(cells)
        self._init_background_priors(cells, range(registry.n_batch), fallback=None)

    # ------------------------------------------------------------------ protein state
    def _extra_state(self) -> dict[str, Any]:
        return {
            "protein_names": list(self.protein_names),
            "protein_expression_obsm_key": self.protein_expression_obsm_key,
            "protein_names_uns_key": self.protein_names_uns_key,
            "override_missing_proteins": self.override_missing_proteins,
            "batch_protein_mask": {k: list(v) for k, v in self.batch_protein_mask.items()},
        }

    def _restore_extra(self, extra: dict[str, Any]) -> None:
        try:
            self.protein_names = tuple(str(n) for n in extra["protein_names"])
            self.protein_expression_obsm_key = str(extra["protein_expression_obsm_key"])
            uns_key = extra.get("protein_names_uns_key")
            self.protein_names_uns_key = None if uns_key is None else str(uns_key)
            self.override_missing_proteins = bool(extra.get("override_missing_proteins", False))
            self.batch_protein_mask = {str(k): [bool(b) for b in v]
                                       for k, v in (extra.get("batch_protein_mask") or {}).items()}
        except (KeyError, TypeError) as err:
            from atlasmap.errors import ModelFileError

            raise ModelFileError(f"the TOTALVI configuration lacks its protein description ({err!r}).") from None
        if len(self.protein_names) != self.module.config.n_proteins:
            from atlasmap.errors import ModelFileError

            raise ModelFileError(f"{len(self.protein_names)} protein names for a module of "
                                 f"{self.module.config.n_proteins} proteins.")

    def _add_fields(self, cells: CellData, adata: Any, *, training: bool) -> CellData:
        """Add ``y`` (protein counts, model order, 0 where unmeasured) and ``y_mask`` (measured)."""
        data = align_proteins(adata, self.protein_expression_obsm_key, self.protein_names_uns_key,
                              self.protein_names)
        codes = cells.fields["cat"][:, 0].numpy()
        batches = self.registry.categories[self.registry.batch_key]
        mask = data.present.copy()
        for b in np.unique(codes):
            measured = self.batch_protein_mask.get(batches[b])
            if measured is None:
                measured = batch_measured(data.values, data.present, codes, b,
                                          override_missing_proteins=self.override_missing_proteins)
                if training:
                    self._record_batch(batches[b], measured, data.present[codes == b].any(0),
                                       warn_empty=self.protein_expression_obsm_key in adata.obsm)
            mask[codes == b] &= np.asarray(measured, dtype=bool)
        cells.fields["y"] = torch.from_numpy(np.where(mask, data.values, 0.0).astype(np.float32))
        cells.fields["y_mask"] = torch.from_numpy(mask)
        return cells

    def _record_batch(self, batch: str, measured: np.ndarray, present: np.ndarray, *, warn_empty: bool) -> None:
        self.batch_protein_mask[batch] = [bool(v) for v in measured]
        if not measured.any():
            if warn_empty:  # (a missing obsm key was already warned about, once for all batches)
                warnings.warn(f"batch {batch!r} has no protein measurements (all zero or NaN): its cells are modelled "
                              "from RNA only and their proteins are imputed.", UserWarning, stacklevel=5)
            return
        zero = np.flatnonzero(present & ~measured)
        if zero.size:
            names = [self.protein_names[i] for i in zero]
            warnings.warn(
                f"{zero.size} protein(s) have zero counts in every cell of batch {batch!r} "
                f"({', '.join(map(repr, names[:5]))}{', ...' if zero.size > 5 else ''}) and are treated as not "
                "measured there (masked and imputed); pass override_missing_proteins=True to treat the zeros as "
                "data.", UserWarning, stacklevel=5,
            )

    def _check_reference_proteins(self, cells: CellData) -> None:
        mask = cells.fields["y_mask"].numpy()
        if not mask.any():
            raise InputError(
                f"no protein is measured in any cell of adata.obsm[{self.protein_expression_obsm_key!r}] (all NaN "
                "or all zero); totalVI needs protein counts in the reference. Use atlasmap.SCVI for RNA alone."
            )
        never = np.flatnonzero(~mask.any(0))
        if never.size:
            names = [self.protein_names[i] for i in never]
            raise InputError(
                f"protein(s) {', '.join(map(repr, names[:5]))} have no counts in any reference cell; a protein the "
                f"reference never measured cannot be modelled. Remove them from "
                f"adata.obsm[{self.protein_expression_obsm_key!r}] (on a copy)."
            )

    @torch.no_grad()
    def _init_protein_fill(self, cells: CellData) -> None:
        """Encoder input of unmeasured proteins: the reference average of the measured encoder input."""
        n_pro = self.module.config.n_proteins
        device = self._device()
        total = torch.zeros(n_pro, dtype=torch.float64, device=device)
        for rows in minibatches(cells.n_cells, 4096, shuffle=False):  # chunks: the counts may be large
            batch = cells.batch(rows, device)
            y_in = self.module.encoder_input(batch["x"], batch["y"], batch["y_mask"])[:, -n_pro:]
            total += torch.where(batch["y_mask"], y_in, torch.zeros_like(y_in)).sum(0).double()
        fill = total / cells.fields["y_mask"].sum(0).clamp(min=1).to(device)
        self.module.protein_fill.copy_(fill.float())

    @torch.no_grad()
    def _init_background_priors(self, cells: CellData, batches: Sequence[int],
                                fallback: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        """Set the background prior rows of ``batches`` from their protein counts (totalVI's empirical prior);
        batches with too few measured proteins get ``fallback`` (default: scvi-tools' mean 3, scale 1)."""
        mean_table, scale_table = self.module.prior_back_mean, self.module.prior_back_log_scale
        names = self.registry.categories[self.registry.batch_key]
        codes = cells.fields["cat"][:, 0].numpy()
        y, mask = cells.fields["y"].numpy(), cells.fields["y_mask"].numpy()
        n_pro = y.shape[1]
        for b in batches:
            measured = np.asarray(self.batch_protein_mask.get(names[b], [False] * n_pro), dtype=bool)
            rows = (codes == b) & mask[:, measured].all(1)  # cells with every measured protein present
            prior = background_prior(y[rows][:, measured], seed=int(b))
            if prior is not None:
                mean = torch.full((n_pro,), prior[0])
                log_scale = torch.full((n_pro,), math.log(max(prior[1], 1e-3)))
            elif fallback is not None:
                mean, log_scale = fallback
            else:
                mean, log_scale = torch.full((n_pro,), DEFAULT_BACKGROUND_MEAN), torch.zeros(n_pro)
            _set_row(mean_table, b, mean)
            _set_row(scale_table, b, log_scale)

    def _init_new_batches(self, cells: CellData, added: dict[str, tuple[str, ...]]) -> None:
        """After surgery: background priors of new batches from the query's protein counts (or the reference
        average when a batch measures too few proteins); per-batch dispersions from the reference average."""
        n_new = len(added[self.registry.batch_key])
        if not n_new:
            return
        n_batch = self.registry.n_batch
        new = range(n_batch - n_new, n_batch)
        with torch.no_grad():
            ref_rows = n_batch - n_new
            fallback = (self.module.prior_back_mean.table()[:ref_rows].mean(0),
                        self.module.prior_back_log_scale.table()[:ref_rows].mean(0))
            for table in self.module.dispersion_tables():
                average = table.table()[:ref_rows].mean(0)
                for b in new:
                    _set_row(table, b, average)
            if self.module.config.protein_batch_efficiency:  # new batches start at efficiency 1 (scvi-tools)
                for b in new:
                    _set_row(self.module.log_efficiency, b, torch.zeros(self.module.config.n_proteins))
        self._init_background_priors(cells, new, fallback=fallback)
        if not self.module.config.use_observed_lib_size:
            means, variances = library_log_priors(cells, n_batch, new)
            self.module.extend_batch_buffers(means, variances)

    # ------------------------------------------------------------------ training
    def train(
        self,
        max_epochs: int | None = None,
        *,
        batch_size: int = 256,
        lr: float = 4e-3,
        weight_decay: float = 1e-6,
        n_epochs_kl_warmup: int | Literal["auto"] | None = "auto",
        train_size: float = 0.9,
        early_stopping: bool = False,
        early_stopping_patience: int = 45,
        seed: int = 0,
        device: str = "auto",
        progress_bar: bool = True,
        check_val_every_n_epoch: int = 1,
        deterministic: bool = False,
    ) -> TOTALVI:
        """Train on the model's AnnData (see :meth:`atlasmap.SCVI.train`); defaults follow scvi-tools' totalVI.

        ``lr=4e-3`` and ``batch_size=256`` as in scvi-tools. ``n_epochs_kl_warmup="auto"`` warms the KL
        weight (which in totalVI also scales the protein reconstruction) up over the epochs that make
        scvi-tools' ``0.75 * n_cells`` minibatch steps, at least one epoch.
        """
        if n_epochs_kl_warmup == "auto":
            n_cells = self._cells(training=True).n_cells
            steps_per_epoch = max(1, math.ceil(math.ceil(train_size * n_cells) / batch_size))
            n_epochs_kl_warmup = max(1, round(0.75 * n_cells / steps_per_epoch))
        super().train(
            max_epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
            n_epochs_kl_warmup=n_epochs_kl_warmup, train_size=train_size, early_stopping=early_stopping,
            early_stopping_patience=early_stopping_patience, seed=seed, device=device, progress_bar=progress_bar,
            check_val_every_n_epoch=check_val_every_n_epoch, deterministic=deterministic,
        )
        return self

    # ------------------------------------------------------------------ outputs
    @torch.inference_mode()
    def _posterior(
        self, adata: Any, *, transform_batch: str | Sequence[str] | None, n_samples: int, rna: bool,
        library_size: float | Literal["latent"] = 1.0, include_protein_background: bool = False,
        batch_size: int = 1024, seed: int = 0,
    ) -> dict[str, np.ndarray]:
        """Decoded RNA (optional), protein and foreground probability, averaged over samples and batches.

        With ``transform_batch=None`` each cell is decoded in its own batch, except proteins it did not
        measure: those are decoded in the batches that measured them (averaged), i.e. imputed.
        """
        self._check_trained()
        if n_samples < 1:
            raise InputError(f"n_samples must be at least 1, got {n_samples}.")
        if library_size != "latent" and not isinstance(library_size, int | float):
            raise InputError(f"library_size must be a number or 'latent', got {library_size!r}.")
        cells = self._cells(adata, what="totalVI's denoised / imputed outputs")
        device = self._device()
        codes = self._batch_codes(transform_batch)
        batch_masks = self._batch_mask_matrix().to(device)  # batches x proteins
        measuring = [int(b) for b in torch.nonzero(batch_masks.any(1)).flatten()]
        gen_cpu = torch.Generator(device="cpu").manual_seed(seed)
        n_pro = self.module.config.n_proteins
        out = {"protein": np.empty((cells.n_cells, n_pro), np.float32),
               "foreground": np.empty((cells.n_cells, n_pro), np.float32),
               "mask": cells.fields["y_mask"].numpy().copy()}
        if rna:
            out["rna"] = np.empty((cells.n_cells, self.registry.n_vars), np.float32)
        self.module.eval()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for rows in minibatches(cells.n_cells, batch_size, shuffle=False):
                batch = cells.batch(rows, device)
                inf = self.module.inference(batch, sample=False)
                acc = {k: 0.0 for k in ("rna", "protein", "foreground")}
                impute = transform_batch is None and not bool(batch["y_mask"].all())
                for _ in range(n_samples):
                    z = inf["qz_m"]
                    if n_samples > 1:
                        z = z + inf["qz_v"].sqrt() * torch.randn(z.shape, generator=gen_cpu).to(device)
                    own = self._decode(z, inf["library"], batch, codes, n_samples > 1, rna, library_size,
                                       include_protein_background)
                    if impute:
                        other = self._decode_measuring(z, inf["library"], batch, measuring, batch_masks,
                                                       n_samples > 1, include_protein_background)
                        keep = batch["y_mask"] | ~other["covered"]
                        for key in ("protein", "foreground"):
                            own[key] = torch.where(keep, own[key], other[key])
                    for key, value in own.items():
                        acc[key] = acc[key] + value
                for key in acc:
                    if key in out:
                        out[key][rows] = (acc[key] / n_samples).cpu().numpy()
        return out

    def _decode(self, z: torch.Tensor, library: torch.Tensor, batch: dict[str, torch.Tensor],
                codes: list[int | None], sample: bool, rna: bool, library_size: float | str,
                include_background: bool) -> dict[str, torch.Tensor]:
        acc: dict[str, torch.Tensor] = {}
        for code in codes:
            cat = batch["cat"]
            if code is not None:
                cat = cat.clone()
                cat[:, 0] = code
            gen = self.module.generative(z, library, cat, batch["cont"], sample=sample)
            values = {"protein": _protein_values(gen, include_background),
                      "foreground": 1.0 - torch.sigmoid(gen["mixing"])}
            if rna:
                values["rna"] = gen["px_rate"] if library_size == "latent" else gen["px_scale"] * float(library_size)
            for key, value in values.items():
                acc[key] = acc[key] + value if key in acc else value
        return {k: v / len(codes) for k, v in acc.items()}

    def _decode_measuring(self, z: torch.Tensor, library: torch.Tensor, batch: dict[str, torch.Tensor],
                          measuring: list[int], batch_masks: torch.Tensor, sample: bool,
                          include_background: bool) -> dict[str, torch.Tensor]:
        """Per protein, the decode averaged over the batches that measured it."""
        protein = torch.zeros_like(batch["y"])
        foreground = torch.zeros_like(batch["y"])
        count = torch.zeros(batch["y"].shape[1], device=z.device)
        for b in measuring:
            cat = batch["cat"].clone()
            cat[:, 0] = b
            gen = self.module.generative(z, library, cat, batch["cont"], sample=sample)
            weight = batch_masks[b].to(z.dtype)
            protein = protein + weight * _protein_values(gen, include_background)
            foreground = foreground + weight * (1.0 - torch.sigmoid(gen["mixing"]))
            count = count + weight
        covered = (count > 0).expand_as(protein)
        denom = count.clamp(min=1)
        return {"protein": protein / denom, "foreground": foreground / denom, "covered": covered}

    def _batch_mask_matrix(self) -> torch.Tensor:
        batches = self.registry.categories[self.registry.batch_key]
        rows = [self.batch_protein_mask.get(b, [False] * len(self.protein_names)) for b in batches]
        return torch.tensor(rows, dtype=torch.bool)

    def get_normalized_expression(
        self,
        adata: Any = None,
        *,
        transform_batch: str | Sequence[str] | None = None,
        library_size: float | Literal["latent"] = 1.0,
        n_samples: int = 1,
        gene_list: Sequence[str] | None = None,
        protein_list: Sequence[str] | None = None,
        include_protein_background: bool = False,
        scale_protein: bool = False,
        batch_size: int = 1024,
        return_numpy: bool = False,
        seed: int = 0,
    ) -> tuple[pd.DataFrame, pd.DataFrame] | tuple[np.ndarray, np.ndarray]:
        """Denoised RNA and protein expression of each cell (proteins it did not measure are imputed).

        Parameters
        ----------
        adata
            Cells to decode (default: the model's AnnData); proteins aligned by name, missing ones masked.
        transform_batch
            Batch (or list, averaged) to decode every cell in: batch-corrected expression. ``None`` decodes
            each cell in its own batch, and each protein its batch did not measure in the batches that did.
        library_size
            RNA scale: a number (default 1: frequencies) or ``"latent"`` (the cell's own library).
        n_samples
            Posterior samples averaged; with 1 the posterior means are used (deterministic).
        gene_list, protein_list
            Subsets to return.
        include_protein_background
            Add the background component to the protein values (default: foreground only, as scvi-tools).
        scale_protein
            Scale each cell's protein values to sum to 1.

        Returns
        -------
        ``(rna, protein)``: DataFrames (cells x genes, cells x proteins), or arrays with ``return_numpy``.
        """
        gene_idx = _indices(self.registry.var_names, gene_list, "genes")
        pro_idx = _indices(self.protein_names, protein_list, "proteins")
        out = self._posterior(adata, transform_batch=transform_batch, n_samples=n_samples, rna=True,
                              library_size=library_size, include_protein_background=include_protein_background,
                              batch_size=batch_size, seed=seed)
        protein = out["protein"]
        if scale_protein:
            protein = protein / np.maximum(protein.sum(1, keepdims=True), 1e-12)
        rna, protein = out["rna"][:, gene_idx], protein[:, pro_idx]
        if return_numpy:
            return rna, protein
        obs_names = (self.adata if adata is None else adata).obs_names
        return (pd.DataFrame(rna, index=obs_names, columns=[self.registry.var_names[i] for i in gene_idx]),
                pd.DataFrame(protein, index=obs_names, columns=[self.protein_names[i] for i in pro_idx]))

    def get_protein_foreground_probability(
        self,
        adata: Any = None,
        *,
        transform_batch: str | Sequence[str] | None = None,
        protein_list: Sequence[str] | None = None,
        n_samples: int = 1,
        batch_size: int = 1024,
        return_numpy: bool = False,
        seed: int = 0,
    ) -> pd.DataFrame | np.ndarray:
        """Probability that each protein's counts come from the foreground, ``1 - pi`` (cells x proteins).

        ``transform_batch`` as in :meth:`get_normalized_expression` (unmeasured proteins: imputed).
        """
        pro_idx = _indices(self.protein_names, protein_list, "proteins")
        out = self._posterior(adata, transform_batch=transform_batch, n_samples=n_samples, rna=False,
                              batch_size=batch_size, seed=seed)
        values = out["foreground"][:, pro_idx]
        if return_numpy:
            return values
        obs_names = (self.adata if adata is None else adata).obs_names
        return pd.DataFrame(values, index=obs_names, columns=[self.protein_names[i] for i in pro_idx])

    def get_protein_mask(self, adata: Any = None) -> pd.DataFrame:
        """Which protein values the model treats as measured (True) for each cell; the rest are masked."""
        mask = self._cells(adata).fields["y_mask"].numpy()
        obs_names = (self.adata if adata is None else adata).obs_names
        return pd.DataFrame(mask.copy(), index=obs_names, columns=list(self.protein_names))

    def obsm_outputs(self, adata: Any = None, *, n_samples: int = 1, seed: int = 0) -> dict[str, pd.DataFrame]:
        """Per-cell protein outputs keyed by their ``.obsm`` slot: denoised (imputed where unmeasured)
        protein expression, foreground probability, and the measured mask."""
        out = self._posterior(adata, transform_batch=None, n_samples=n_samples, rna=False, seed=seed)
        obs_names = (self.adata if adata is None else adata).obs_names
        cols = list(self.protein_names)
        return {PROTEIN_DENOISED_KEY: pd.DataFrame(out["protein"], index=obs_names, columns=cols),
                PROTEIN_FOREGROUND_KEY: pd.DataFrame(out["foreground"], index=obs_names, columns=cols),
                PROTEIN_MEASURED_KEY: pd.DataFrame(out["mask"], index=obs_names, columns=cols)}

    def annotate(self, adata: Any = None, *, inplace: bool = False, n_samples: int = 1, seed: int = 0) -> Any:
        """Write the model's outputs for ``adata``'s cells into AnnData slots.

        ``.obsm["X_atlasmap"]`` (latent mean), ``.obsm["atlasmap_protein_denoised"]``,
        ``.obsm["atlasmap_protein_foreground_prob"]`` and ``.obsm["atlasmap_protein_measured"]``
        (DataFrames with the model's protein names; unmeasured proteins imputed), and
        ``.uns["atlasmap"]["protein_names"]``.

        Returns a new AnnData (default), or ``None`` after writing into ``adata`` with ``inplace=True``.
        """
        source = self.adata if adata is None else adata
        latent = self.get_latent_representation(source)
        outputs = self.obsm_outputs(source, n_samples=n_samples, seed=seed)
        target = source if inplace else source.copy()
        target.obsm[LATENT_KEY] = latent
        for key, frame in outputs.items():
            target.obsm[key] = frame
        uns = dict(target.uns.get("atlasmap", {}))
        uns.update(model="TOTALVI", protein_names=list(self.protein_names))
        target.uns["atlasmap"] = uns
        return None if inplace else target

    def __repr__(self) -> str:
        cfg = self.module.config
        status = "trained" if self.is_trained else "untrained"
        cats = ", ".join(f"{k}: {len(v)}" for k, v in self.registry.categories.items())
        kind = "query" if self.surgery else "reference"
        return (f"TOTALVI({kind}, {status}; {self.registry.n_vars} genes, {cfg.n_proteins} proteins, "
                f"n_latent={cfg.n_latent}, layers={cfg.n_layers_encoder}/{cfg.n_layers_decoder}, "
                f"n_hidden={cfg.n_hidden}; categories {cats})")


def _protein_values(gen: dict[str, torch.Tensor], include_background: bool) -> torch.Tensor:
    background_prob = torch.sigmoid(gen["mixing"])
    values = gen["rate_fore"] * (1.0 - background_prob)
    if include_background:
        values = values + gen["rate_back"] * background_prob
    return values


def _set_row(table: Any, row: int, values: torch.Tensor) -> None:
    """Write ``values`` into row ``row`` of a :class:`~atlasmap.nn.layers.CovariateTable` (whichever block)."""
    for block in table.blocks:
        if row < block.shape[0]:
            block.data[row] = values.to(block.device, block.dtype)
            return
        row -= block.shape[0]
    raise IndexError("row beyond the table")


def _indices(names: Sequence[str], subset: Sequence[str] | None, what: str) -> np.ndarray:
    if subset is None:
        return np.arange(len(names))
    if isinstance(subset, str):
        subset = [subset]
    idx = pd.Index(list(names)).get_indexer(list(subset))
    if (idx < 0).any():
        missing = [g for g, i in zip(subset, idx, strict=True) if i < 0][:5]
        raise InputError(f"{what} not in the model: {', '.join(map(repr, missing))}.")
    return idx
