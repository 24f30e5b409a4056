"""The scVI torch module (Lopez et al. 2018): encoder q(z|x,s), decoder p(x|z,s,l), ELBO.

Split like scvi-tools into ``inference`` / ``generative`` / ``loss``; every covariate enters through
:class:`~atlasmap.nn.layers.CovariateTable` blocks so that surgery can add categories exactly.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from atlasmap import ops
from atlasmap.modules.base import CVAEModule
from atlasmap.nn.layers import CovariateTable, FCStack, standard_normal
from atlasmap.nn.likelihoods import lgamma_theta_sum, log_poisson, nb_nll, nb_nll_logits
from atlasmap.protocols import LossTerms

NormWhere = Literal["none", "encoder", "decoder", "both"]
_VAR_EPS = 1e-4
#: Optional per-cell batch fields: see :meth:`SCVIModule.precompute` and :func:`atlasmap.data.loader.prepare_cells`.
ENCODER_FIRST = "encoder_first"
LGAMMA_THETA = "lgamma_theta"
LOG_X_FACT = "log_x_fact"
LOG_LIBRARY = "log_library"


@dataclass(frozen=True)
class SCVIConfig:
    """Hyper-parameters of :class:`SCVIModule` (all JSON-able)."""

    n_genes: int
    n_categories: tuple[int, ...]  # per categorical covariate (batch first), reference sizes
    n_continuous: int = 0
    n_hidden: int = 128
    n_latent: int = 10
    n_layers: int = 1
    dropout_rate: float = 0.1
    gene_likelihood: Literal["zinb", "nb", "poisson"] = "zinb"
    dispersion: Literal["gene", "gene-batch"] = "gene"
    encode_covariates: bool = True
    deeply_inject_covariates: bool = True
    use_layer_norm: NormWhere = "both"
    use_batch_norm: NormWhere = "none"
    use_observed_lib_size: bool = True

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["n_categories"] = list(self.n_categories)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SCVIConfig:
        d = dict(d)
        d["n_categories"] = tuple(d["n_categories"])
        return cls(**d)


def _norm_flags(cfg: SCVIConfig, part: str) -> dict[str, bool]:
    return {
        "use_batch_norm": cfg.use_batch_norm in (part, "both"),
        "use_layer_norm": cfg.use_layer_norm in (part, "both"),
    }


def kl_normal_standard(mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, var) || N(0, 1)) summed over the last dimension."""
    return 0.5 * (var + mean.pow(2) - 1.0 - torch.log(var)).sum(-1)


def kl_normal_normal(mean: torch.Tensor, var: torch.Tensor, p_mean: torch.Tensor, p_var: torch.Tensor) -> torch.Tensor:
    return 0.5 * (torch.log(p_var / var) + (var + (mean - p_mean).pow(2)) / p_var - 1.0).sum(-1)



def log_counts(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """The encoder's input ``log(1 + x)`` (into ``out`` when given). Computed as ``log(x + 1)``: the same for
    counts (no tiny ``x``), and about twice as fast as ``torch.log1p`` on CPU."""
    return torch.add(x, 1.0, out=out).log_()




class SCVIModule(CVAEModule):
    """scVI as a torch module. Batch = dict with ``x`` (counts), ``cat`` (codes), ``cont``."""

    def __init__(self, config: SCVIConfig) -> None:
        super().__init__()
        self.config = cfg = config
        cats = cfg.n_categories
        enc_cats, enc_cont = (cats, cfg.n_continuous) if cfg.encode_covariates else ((), 0)
        self.encoder = FCStack(
            cfg.n_genes, cfg.n_hidden, cfg.n_layers,
            n_categories=enc_cats, n_continuous=enc_cont,
            deep_injection=cfg.deeply_inject_covariates, dropout_rate=cfg.dropout_rate,
            **_norm_flags(cfg, "encoder"),
        )
        self.z_mean = nn.Linear(cfg.n_hidden, cfg.n_latent)
        self.z_var = nn.Linear(cfg.n_hidden, cfg.n_latent)
        if not cfg.use_observed_lib_size:
            self.l_encoder = FCStack(
                cfg.n_genes, cfg.n_hidden, 1, n_categories=enc_cats, n_continuous=enc_cont,
                deep_injection=cfg.deeply_inject_covariates, dropout_rate=cfg.dropout_rate,
                **_norm_flags(cfg, "encoder"),
            )
            self.l_mean = nn.Linear(cfg.n_hidden, 1)
            self.l_var = nn.Linear(cfg.n_hidden, 1)
            # log-normal library prior per batch, filled from data by the model class
            self.register_buffer("library_log_means", torch.zeros(cats[0]))
            self.register_buffer("library_log_vars", torch.ones(cats[0]))
        self.decoder = FCStack(
            cfg.n_latent, cfg.n_hidden, cfg.n_layers,
            n_categories=cats, n_continuous=cfg.n_continuous,
            deep_injection=cfg.deeply_inject_covariates, dropout_rate=0.0,
            **_norm_flags(cfg, "decoder"),
        )
        self.px_scale = nn.Linear(cfg.n_hidden, cfg.n_genes)
        self.px_dropout = nn.Linear(cfg.n_hidden, cfg.n_genes) if cfg.gene_likelihood == "zinb" else None
        if cfg.dispersion == "gene":
            self.px_r = nn.Parameter(standard_normal(cfg.n_genes))
        elif cfg.dispersion == "gene-batch":
            self.px_r_batch = CovariateTable(cats[0], cfg.n_genes, init_bound=None)
        else:
            raise ValueError(f"unknown dispersion {cfg.dispersion!r}")

    # ------------------------------------------------------------------ structure for surgery
    def covariate_tables(self, covariate: int) -> list[CovariateTable]:
        """Every table of categorical covariate ``covariate`` (encoder, decoder, dispersion)."""
        stacks = self.surgery_stacks()
        tables = [layer.covariates[covariate] for stack in stacks["encoder"] + stacks["decoder"]
                  for layer in stack.layers if len(layer.covariates) > covariate]
        if covariate == 0 and self.config.dispersion == "gene-batch":
            tables.append(self.px_r_batch)
        return tables

    def surgery_stacks(self) -> dict[str, list[FCStack]]:
        """The encoder stacks (``z`` and, with a learned library size, ``l``) and the decoder."""
        encoders = [self.encoder] if self.config.use_observed_lib_size else [self.encoder, self.l_encoder]
        return {"encoder": encoders, "decoder": [self.decoder]}

    def extend_batch_buffers(self, log_means: torch.Tensor, log_vars: torch.Tensor) -> None:
        """Append library priors of new batches (``use_observed_lib_size=False`` only)."""
        if not self.config.use_observed_lib_size:
            self.library_log_means = torch.cat([self.library_log_means, log_means.to(self.library_log_means)])
            self.library_log_vars = torch.cat([self.library_log_vars, log_vars.to(self.library_log_vars)])

    # ------------------------------------------------------------------ model
    def inference(self, batch: dict[str, torch.Tensor], *, sample: bool = True) -> dict[str, torch.Tensor]:
        x, cat, cont = batch["x"], batch["cat"], batch["cont"]
        first = batch.get(ENCODER_FIRST)  # W_x log1p(x) + b, precomputed while that layer is frozen
        x_log = log_counts(x) if first is None or not self.config.use_observed_lib_size else None
        h = self.encoder(x_log, cat, cont, first_precomputed=first)
        qz_m = self.z_mean(h)
        qz_v = torch.exp(self.z_var(h)) + _VAR_EPS
        z = qz_m + qz_v.sqrt() * torch.randn_like(qz_m) if sample else qz_m
        out = {"qz_m": qz_m, "qz_v": qz_v, "z": z}
        if self.config.use_observed_lib_size:
            log_library = batch.get(LOG_LIBRARY)  # per-cell field computed once with the data
            out["library"] = (log_library.unsqueeze(1) if log_library is not None
                              else torch.log(x.sum(1, keepdim=True)))
        else:
            hl = self.l_encoder(x_log, cat, cont)
            ql_m, ql_v = self.l_mean(hl), torch.exp(self.l_var(hl)) + _VAR_EPS
            out.update(ql_m=ql_m, ql_v=ql_v,
                       library=ql_m + ql_v.sqrt() * torch.randn_like(ql_m) if sample else ql_m)
        return out

    def generative(
        self, z: torch.Tensor, library: torch.Tensor, cat: torch.Tensor, cont: torch.Tensor,
        *, with_dropout: bool = True, logits_only: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Decoder outputs; ``with_dropout=False`` skips the zero-inflation head (not needed for
        normalised expression: one cells x genes matmul less). ``logits_only=True`` returns the expression
        logits and the log library instead of ``px_scale`` / ``px_rate`` (the training loss fuses the
        softmax into the likelihood)."""
        h = self.decoder(z, cat, cont)
        logits = self.px_scale(h)
        if self.config.dispersion == "gene":
            theta = torch.exp(self.px_r)
        else:
            theta = torch.exp(self.px_r_batch(cat[:, 0]))
        if logits_only:
            out = {"px_scale_logits": logits, "library": library, "theta": theta}
        else:
            px_scale = F.softmax(logits, dim=-1)
            out = {"px_scale": px_scale, "px_rate": torch.exp(library) * px_scale, "theta": theta}
        if self.px_dropout is not None and with_dropout:
            out["px_dropout"] = self.px_dropout(h)
        return out

    def reconstruction_loss(self, x: torch.Tensor, px: dict[str, torch.Tensor],
                            batch: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Per-cell negative log-likelihood of the counts. ``batch`` may carry per-cell constants computed
        once (``log_x_fact``; ``lgamma_theta`` while the dispersion is frozen), which skip their per-step work."""
        lik = self.config.gene_likelihood
        batch = batch or {}
        log_x_fact = batch.get(LOG_X_FACT)
        pi = px.get("px_dropout") if lik == "zinb" else None
        if "px_rate" not in px:  # logits_only decoder output
            if lik != "poisson":
                return nb_nll_logits(x, px["px_scale_logits"], px["library"], px["theta"], pi,
                                     log_x_fact=log_x_fact, lgamma_theta_term=batch.get(LGAMMA_THETA))
            px = {**px, "px_rate": torch.exp(px["library"]) * F.softmax(px["px_scale_logits"], dim=-1)}
        if lik == "poisson":
            return -log_poisson(x, px["px_rate"]).sum(-1)
        return nb_nll(x, px["px_rate"], px["theta"], pi, log_x_fact=log_x_fact,
                      lgamma_theta_term=batch.get(LGAMMA_THETA))

    @torch.no_grad()
    def precompute(self, cells: Any, batch_size: int = 4096) -> dict[str, torch.Tensor]:
        """Per-cell tensors that stay constant while training this module as it is frozen now: the
        encoder's first-layer expression term ``W_x log1p(x) + b`` (the largest matmul of a step: one
        ``H``-vector per cell instead of ``G`` genes) and, with a frozen per-gene dispersion, the NB term
        ``sum_g lgamma(x + theta) - lgamma(theta)``. Used by :func:`atlasmap.training.train_module` for query
        training after surgery; empty when everything trains (reference training).
        """
        first = self.encoder.layers[0].linear
        want_first = not any(p.requires_grad for p in first.parameters())
        want_lgamma = (self.config.gene_likelihood != "poisson" and self.config.dispersion == "gene"
                       and not self.px_r.requires_grad)
        if not (want_first or want_lgamma):
            return {}
        device = next(self.parameters()).device
        out: dict[str, list[torch.Tensor]] = {ENCODER_FIRST: [], LGAMMA_THETA: []}
        theta = torch.exp(self.px_r) if want_lgamma else None
        # straight from the stored nonzeros of in-memory CSR counts, when theta is on their (host) device
        csr = cells.csr_arrays() if want_lgamma and theta.device.type == "cpu" else None
        if csr is not None:
            out[LGAMMA_THETA].append(ops.lgamma_theta_sum_csr(*csr, theta.contiguous()))
            want_lgamma = False
        for lo in range(0, cells.n_cells, batch_size) if want_first or want_lgamma else ():
            x = cells.batch(np.arange(lo, min(lo + batch_size, cells.n_cells)), device)["x"]
            if want_first:
                out[ENCODER_FIRST].append(first(log_counts(x)))
            if want_lgamma:
                out[LGAMMA_THETA].append(lgamma_theta_sum(x, theta))
        return {k: torch.cat(v).cpu() for k, v in out.items() if v}

    def loss(self, batch: dict[str, torch.Tensor], kl_weight: float = 1.0) -> LossTerms:
        inf = self.inference(batch)
        px = self.generative(inf["z"], inf["library"], batch["cat"], batch["cont"], logits_only=True)
        reconst = self.reconstruction_loss(batch["x"], px, batch)
        kl_z = kl_normal_standard(inf["qz_m"], inf["qz_v"])
        kl_l = torch.zeros_like(kl_z)
        if not self.config.use_observed_lib_size:
            b = batch["cat"][:, 0]
            kl_l = kl_normal_normal(inf["ql_m"], inf["ql_v"], self.library_log_means[b].unsqueeze(-1),
                                    self.library_log_vars[b].unsqueeze(-1))
        loss = torch.mean(reconst + kl_weight * kl_z + kl_l)
        return LossTerms(loss=loss, reconstruction=reconst, kl=kl_z + kl_l)
