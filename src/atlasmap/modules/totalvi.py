"""The totalVI torch module (Gayoso et al. 2021): joint RNA + surface-protein VAE.

* **Encoder** q(z | x, y, s): an :class:`~atlasmap.nn.layers.FCStack` on ``[log1p(x / (1 + mean x)),
  log1p(y / (1 + mean y))]`` with the covariates injected. Proteins that are not measured for a cell
  (``y_mask`` False) enter as a fixed per-protein constant (``protein_fill``, the reference average), and
  the protein mean is taken over measured proteins only, so unmeasured values cannot reach the latent.
* **Decoder** p(x, y | z, s): four covariate-injected bodies (RNA, protein background, protein
  foreground, mixing) and covariate-injected heads on ``[h, z]`` as in scvi-tools:
  RNA ~ NB (or ZINB) with mean ``library * softmax(.)``; protein ~ mixture of NB(background rate
  ``beta``) and NB(``beta * alpha``), ``alpha >= 1`` the foreground scaling, with mixing logits ``pi``
  (probability of background). ``log beta`` has an amortised Gaussian posterior whose prior
  N(mu_s, sigma_s) is **per batch**, stored as covariate tables so surgery adds blocks for new batches.
* **Loss**: as scvi-tools' TOTALVAE (protein reconstruction and KL terms warmed up by ``kl_weight``);
  every protein term is multiplied out by ``y_mask``, so unmeasured proteins are not in the likelihood.

Every covariate enters through :class:`~atlasmap.nn.layers.CovariateTable` blocks (hidden layers, heads,
per-batch dispersions, per-batch background priors): surgery extends them all in one generic pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from atlasmap.modules.base import CVAEModule
from atlasmap.modules.scvi import (
    NormWhere,
    SCVIConfig,
    _norm_flags,
    kl_normal_standard,
)
from atlasmap.nn.layers import CovariateTable, FCStack, InjectedLinear, standard_normal
from atlasmap.nn.likelihoods import nb_nll
from atlasmap.protocols import LossTerms

_VAR_EPS = 1e-4
#: Weight of scvi-tools' prior nudging each protein towards background (``-1e-3 log sigmoid(pi)``).
_MIXING_PRIOR_WEIGHT = 1e-3
#: Initial background prior when no empirical estimate is possible (scvi-tools' default: mean 3, scale 1).
DEFAULT_BACKGROUND_MEAN = 3.0


@dataclass(frozen=True)
class TOTALVIConfig:
    """Hyper-parameters of :class:`TOTALVIModule` (all JSON-able; defaults follow scvi-tools)."""

    n_genes: int
    n_proteins: int
    n_categories: tuple[int, ...]  # per categorical covariate (batch first), reference sizes
    n_continuous: int = 0
    n_hidden: int = 256
    n_latent: int = 20
    n_layers_encoder: int = 2
    n_layers_decoder: int = 1
    dropout_rate_encoder: float = 0.2
    dropout_rate_decoder: float = 0.2
    gene_likelihood: Literal["nb", "zinb"] = "nb"
    gene_dispersion: Literal["gene", "gene-batch"] = "gene"
    protein_dispersion: Literal["protein", "protein-batch"] = "protein"
    encode_covariates: bool = True
    deeply_inject_covariates: bool = True
    use_layer_norm: NormWhere = "both"
    use_batch_norm: NormWhere = "none"
    #: learn the RNA library size (an encoder and a per-batch log-normal prior, as scvi-tools'
    #: ``use_observed_lib_size=False``) instead of using the observed count total
    use_observed_lib_size: bool = True
    #: a per-batch, per-protein capture efficiency multiplying both protein rates in the likelihood, with a
    #: LogNormal(0, 1) prior (scvi-tools' ``log_per_batch_efficiency``)
    protein_batch_efficiency: bool = False
    #: how unmeasured proteins enter the encoder: ``"masked"`` (a fixed per-protein fill value; the per-cell
    #: protein mean over measured proteins; excluded from every protein term of the loss) or ``"zero"``
    #: (scvi-tools: zero counts, included in the protein mean and in the mixing prior; excluded from the
    #: likelihood and the background KL)
    unmeasured_proteins: Literal["masked", "zero"] = "masked"

    @property
    def n_layers(self) -> int:
        """Encoder depth (the summary shown by ``repr`` and ``atlasmap info``)."""
        return self.n_layers_encoder

    to_dict = SCVIConfig.to_dict
    from_dict = classmethod(SCVIConfig.from_dict.__func__)



def kl_normal_elementwise(mean: torch.Tensor, var: torch.Tensor, p_mean: torch.Tensor, p_var: torch.Tensor
                          ) -> torch.Tensor:
    """KL(N(mean, var) || N(p_mean, p_var)) per element (no reduction)."""
    return 0.5 * (torch.log(p_var / var) + (var + (mean - p_mean).pow(2)) / p_var - 1.0)


def log_nb_mixture(
    x: torch.Tensor, mu_1: torch.Tensor, mu_2: torch.Tensor, theta: torch.Tensor, pi_logits: torch.Tensor,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Log-probability of a two-component NB mixture sharing ``theta`` (totalVI's protein likelihood), per element.

    ``pi_logits`` are the logits of the first component (the background, mean ``mu_1``); parametrised like
    :func:`atlasmap.nn.likelihoods.log_nb`.
    """
    log_theta_eps = torch.log(theta + eps)
    log_theta_mu_1 = torch.log(theta + mu_1 + eps)
    log_theta_mu_2 = torch.log(theta + mu_2 + eps)
    shared = torch.lgamma(x + theta) - torch.lgamma(theta) - torch.lgamma(x + 1)
    log_nb_1 = theta * (log_theta_eps - log_theta_mu_1) + x * (torch.log(mu_1 + eps) - log_theta_mu_1) + shared
    log_nb_2 = theta * (log_theta_eps - log_theta_mu_2) + x * (torch.log(mu_2 + eps) - log_theta_mu_2) + shared
    return torch.logaddexp(log_nb_1 - F.softplus(-pi_logits), log_nb_2 - F.softplus(pi_logits))


class TOTALVIModule(CVAEModule):
    """totalVI as a torch module.

    A batch is a dict with ``x`` (RNA counts), ``y`` (protein counts), ``y_mask`` (bool, measured),
    ``cat`` (category codes, batch first) and ``cont`` (continuous covariates).
    """

    def __init__(self, config: TOTALVIConfig) -> None:
        super().__init__()
        self.config = cfg = config
        cats = cfg.n_categories
        enc_cats, enc_cont = (cats, cfg.n_continuous) if cfg.encode_covariates else ((), 0)
        self.encoder = FCStack(
            cfg.n_genes + cfg.n_proteins, cfg.n_hidden, cfg.n_layers_encoder,
            n_categories=enc_cats, n_continuous=enc_cont, deep_injection=cfg.deeply_inject_covariates,
            dropout_rate=cfg.dropout_rate_encoder, **_norm_flags(cfg, "encoder"),
        )
        self.z_mean = nn.Linear(cfg.n_hidden, cfg.n_latent)
        self.z_var = nn.Linear(cfg.n_hidden, cfg.n_latent)
        if cfg.unmeasured_proteins not in ("masked", "zero"):
            raise ValueError(f"unknown unmeasured_proteins {cfg.unmeasured_proteins!r}")
        if not cfg.use_observed_lib_size:
            # one layer on the encoder's input, as scvi-tools' EncoderTOTALVI.l_gene_encoder
            self.l_encoder = FCStack(
                cfg.n_genes + cfg.n_proteins, cfg.n_hidden, 1, n_categories=enc_cats, n_continuous=enc_cont,
                deep_injection=cfg.deeply_inject_covariates, dropout_rate=cfg.dropout_rate_encoder,
                **_norm_flags(cfg, "encoder"),
            )
            self.l_mean = nn.Linear(cfg.n_hidden, 1)
            self.l_var = nn.Linear(cfg.n_hidden, 1)
            # log-normal library prior per batch, filled from data by the model class
            self.register_buffer("library_log_means", torch.zeros(cats[0]))
            self.register_buffer("library_log_vars", torch.ones(cats[0]))

        def body() -> FCStack:
            return FCStack(
                cfg.n_latent, cfg.n_hidden, cfg.n_layers_decoder, n_categories=cats,
                n_continuous=cfg.n_continuous, deep_injection=cfg.deeply_inject_covariates,
                dropout_rate=cfg.dropout_rate_decoder, **_norm_flags(cfg, "decoder"),
            )

        def head(n_out: int) -> InjectedLinear:
            return InjectedLinear(cfg.n_hidden + cfg.n_latent, n_out, cats, cfg.n_continuous)

        # ``decoder`` is the RNA body (the name generic code looks for); the protein bodies follow
        self.decoder = body()
        self.background_decoder = body()
        self.foreground_decoder = body()
        self.mixing_decoder = body()
        self.px_scale = head(cfg.n_genes)
        self.px_dropout = head(cfg.n_genes) if cfg.gene_likelihood == "zinb" else None
        self.back_mean = head(cfg.n_proteins)
        self.back_scale = head(cfg.n_proteins)
        self.fore_scale = head(cfg.n_proteins)
        self.mixing = head(cfg.n_proteins)

        if cfg.gene_dispersion == "gene":
            self.px_r = nn.Parameter(standard_normal(cfg.n_genes))
        elif cfg.gene_dispersion == "gene-batch":
            self.px_r_batch = CovariateTable(cats[0], cfg.n_genes, init_bound=None)
        else:
            raise ValueError(f"unknown gene_dispersion {cfg.gene_dispersion!r}")
        if cfg.protein_dispersion == "protein":
            self.py_r = nn.Parameter(2.0 * torch.rand(cfg.n_proteins))
        elif cfg.protein_dispersion == "protein-batch":
            self.py_r_batch = CovariateTable(cats[0], cfg.n_proteins, init_bound=None)
            with torch.no_grad():
                self.py_r_batch.blocks[0].uniform_(0.0, 2.0)
        else:
            raise ValueError(f"unknown protein_dispersion {cfg.protein_dispersion!r}")
        # per-batch prior of the log protein background: mean and log scale (set from data by the model)
        self.prior_back_mean = CovariateTable(cats[0], cfg.n_proteins, init_bound=None)
        self.prior_back_log_scale = CovariateTable(cats[0], cfg.n_proteins, init_bound=None)
        with torch.no_grad():
            self.prior_back_mean.blocks[0].fill_(DEFAULT_BACKGROUND_MEAN)
            self.prior_back_log_scale.blocks[0].zero_()
        if cfg.protein_batch_efficiency:
            self.log_efficiency = CovariateTable(cats[0], cfg.n_proteins, init_bound=None)
            with torch.no_grad():
                self.log_efficiency.blocks[0].zero_()
        # encoder input of unmeasured proteins (the reference average, set by the model)
        self.register_buffer("protein_fill", torch.zeros(cfg.n_proteins))

    # ------------------------------------------------------------------ structure for surgery
    def covariate_tables(self, covariate: int) -> list[CovariateTable]:
        """Every table of categorical covariate ``covariate``: hidden layers and heads of encoder and
        decoders, and for the batch also the per-batch dispersions and protein background priors."""
        layers = [layer for stack in self.surgery_stacks()["encoder"] + self.surgery_stacks()["decoder"]
                  for layer in stack.layers] + self._heads()
        tables = [layer.covariates[covariate] for layer in layers if len(layer.covariates) > covariate]
        if covariate == 0:
            tables += self.batch_tables()
        return tables

    def batch_tables(self) -> list[CovariateTable]:
        """The per-batch parameter tables that are not layer weights (priors, dispersions, efficiency)."""
        tables = [self.prior_back_mean, self.prior_back_log_scale, *self.dispersion_tables()]
        if self.config.protein_batch_efficiency:
            tables.append(self.log_efficiency)
        return tables

    def dispersion_tables(self) -> list[CovariateTable]:
        """The per-batch dispersion tables (``gene-batch`` / ``protein-batch``)."""
        tables = []
        if self.config.gene_dispersion == "gene-batch":
            tables.append(self.px_r_batch)
        if self.config.protein_dispersion == "protein-batch":
            tables.append(self.py_r_batch)
        return tables

    def surgery_stacks(self) -> dict[str, list[FCStack]]:
        """The encoder and decoder stacks, for surgery options that act on first layers and norms."""
        encoders = [self.encoder] if self.config.use_observed_lib_size else [self.encoder, self.l_encoder]
        return {"encoder": encoders,
                "decoder": [self.decoder, self.background_decoder, self.foreground_decoder, self.mixing_decoder]}

    def extend_batch_buffers(self, log_means: torch.Tensor, log_vars: torch.Tensor) -> None:
        """Append library priors of new batches (``use_observed_lib_size=False`` only)."""
        if not self.config.use_observed_lib_size:
            self.library_log_means = torch.cat([self.library_log_means, log_means.to(self.library_log_means)])
            self.library_log_vars = torch.cat([self.library_log_vars, log_vars.to(self.library_log_vars)])

    def _heads(self) -> list[InjectedLinear]:
        heads = [self.px_scale, self.px_dropout, self.back_mean, self.back_scale, self.fore_scale, self.mixing]
        return [h for h in heads if h is not None]

    # ------------------------------------------------------------------ model
    def encoder_input(self, x: torch.Tensor, y: torch.Tensor, y_mask: torch.Tensor) -> torch.Tensor:
        """``[log1p(x / (1 + mean x)), log1p(y / (1 + mean y))]``; unmeasured proteins -> ``protein_fill``.

        Masked entries of ``y`` are never read arithmetically (``torch.where`` selects them away before any
        sum), so their values (even NaN or inf) cannot change the result.
        """
        x_in = torch.log1p(x / (1.0 + x.mean(1, keepdim=True)))
        y_obs = torch.where(y_mask, y, torch.zeros_like(y))
        if self.config.unmeasured_proteins == "zero":  # scvi-tools: zero counts, in the mean like the others
            return torch.cat([x_in, torch.log1p(y_obs / (1.0 + y_obs.mean(1, keepdim=True)))], dim=-1)
        n_obs = y_mask.sum(1, keepdim=True).clamp(min=1).to(y.dtype)
        y_in = torch.log1p(y_obs / (1.0 + y_obs.sum(1, keepdim=True) / n_obs))
        y_in = torch.where(y_mask, y_in, self.protein_fill.expand_as(y_in))
        return torch.cat([x_in, y_in], dim=-1)

    def inference(self, batch: dict[str, torch.Tensor], *, sample: bool = True) -> dict[str, torch.Tensor]:
        x, cat, cont = batch["x"], batch["cat"], batch["cont"]
        enc_in = self.encoder_input(x, batch["y"], batch["y_mask"])
        h = self.encoder(enc_in, cat, cont)
        qz_m = self.z_mean(h)
        qz_v = torch.exp(self.z_var(h)) + _VAR_EPS
        z = qz_m + qz_v.sqrt() * torch.randn_like(qz_m) if sample else qz_m
        out = {"qz_m": qz_m, "qz_v": qz_v, "z": z}
        if self.config.use_observed_lib_size:
            out["library"] = torch.log(x.sum(1, keepdim=True))
        else:  # log library ~ q(l | x, y, s), clamped at 15 as in scvi-tools
            hl = self.l_encoder(enc_in, cat, cont)
            ql_m, ql_v = self.l_mean(hl), torch.exp(self.l_var(hl)) + _VAR_EPS
            log_l = ql_m + ql_v.sqrt() * torch.randn_like(ql_m) if sample else ql_m
            out.update(ql_m=ql_m, ql_v=ql_v, library=torch.clamp(log_l, max=15.0))
        return out

    def generative(
        self, z: torch.Tensor, library: torch.Tensor, cat: torch.Tensor, cont: torch.Tensor, *, sample: bool = True
    ) -> dict[str, torch.Tensor]:
        """Decoder outputs. ``sample=False`` uses the posterior mean of the log background (deterministic)."""
        def hidden(stack: FCStack) -> torch.Tensor:
            return torch.cat([stack(z, cat, cont), z], dim=-1)

        h_rna = hidden(self.decoder)
        px_scale = F.softmax(self.px_scale(h_rna, cat, cont), dim=-1)
        out = {"px_scale": px_scale, "px_rate": torch.exp(library) * px_scale}
        h_back = hidden(self.background_decoder)
        back_mean = self.back_mean(h_back, cat, cont)
        back_scale = F.softplus(self.back_scale(h_back, cat, cont)) + 1e-8
        log_back = back_mean + back_scale * torch.randn_like(back_mean) if sample else back_mean
        rate_back = torch.exp(log_back)
        h_fore = hidden(self.foreground_decoder)
        fore_scale = torch.relu(self.fore_scale(h_fore, cat, cont)) + 1.0 + 1e-8
        h_mix = hidden(self.mixing_decoder)
        out.update(back_mean=back_mean, back_scale=back_scale, rate_back=rate_back,
                   rate_fore=rate_back * fore_scale, fore_scale=fore_scale, mixing=self.mixing(h_mix, cat, cont))
        if self.px_dropout is not None:
            out["px_dropout"] = self.px_dropout(h_mix, cat, cont)
        b = cat[:, 0]
        out["theta"] = torch.exp(self.px_r if self.config.gene_dispersion == "gene" else self.px_r_batch(b))
        out["py_theta"] = torch.exp(self.py_r if self.config.protein_dispersion == "protein" else self.py_r_batch(b))
        return out

    def loss(self, batch: dict[str, torch.Tensor], kl_weight: float = 1.0) -> LossTerms:
        x, cat, mask = batch["x"], batch["cat"], batch["y_mask"]
        y = torch.where(mask, batch["y"], torch.zeros_like(batch["y"]))
        inf = self.inference(batch)
        gen = self.generative(inf["z"], inf["library"], cat, batch["cont"])
        # the RNA term through the fused NB/ZINB likelihood (compiled kernel on CPU), as scVI's
        pi = gen["px_dropout"] if self.config.gene_likelihood == "zinb" else None
        rec_rna = nb_nll(x, gen["px_rate"], gen["theta"], pi, log_x_fact=batch.get("log_x_fact"))
        rate_back, rate_fore = gen["rate_back"], gen["rate_fore"]
        if self.config.protein_batch_efficiency:
            efficiency = torch.exp(self.log_efficiency(cat[:, 0]))
            rate_back, rate_fore = efficiency * rate_back, efficiency * rate_fore
        logp_pro = log_nb_mixture(y, rate_back, rate_fore, gen["py_theta"], gen["mixing"])
        rec_pro = -self._masked_sum(logp_pro, mask)
        kl_z = kl_normal_standard(inf["qz_m"], inf["qz_v"])
        b = cat[:, 0]
        prior_var = torch.exp(2.0 * self.prior_back_log_scale(b))
        kl_back = self._masked_sum(
            kl_normal_elementwise(gen["back_mean"], gen["back_scale"].pow(2), self.prior_back_mean(b), prior_var),
            mask,
        )
        log_sig = F.logsigmoid(gen["mixing"])
        mixing_prior = -_MIXING_PRIOR_WEIGHT * (log_sig.sum(-1) if self.config.unmeasured_proteins == "zero"
                                                else self._masked_sum(log_sig, mask))
        prior_terms = kl_back + mixing_prior
        if self.config.protein_batch_efficiency:  # -log LogNormal(exp(e); 0, 1) = e + e^2 / 2 + log(2 pi) / 2
            log_eff = self.log_efficiency(b)
            prior_terms = prior_terms + (log_eff + 0.5 * log_eff.pow(2) + 0.5 * math.log(2.0 * math.pi)).sum(-1)
        kl_l = torch.zeros_like(kl_z)
        if not self.config.use_observed_lib_size:
            kl_l = kl_normal_elementwise(inf["ql_m"], inf["ql_v"], self.library_log_means[b].unsqueeze(-1),
                                         self.library_log_vars[b].unsqueeze(-1)).sum(-1)
        loss = torch.mean(rec_rna + kl_weight * (rec_pro + kl_z + prior_terms) + kl_l)
        return LossTerms(loss=loss, reconstruction=rec_rna + rec_pro, kl=kl_z + kl_back + kl_l,
                         extra={"reconstruction_rna": rec_rna, "reconstruction_protein": rec_pro,
                                "kl_z": kl_z, "kl_background": kl_back})

    @staticmethod
    def _masked_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Sum over proteins of the measured entries (``where``, not multiply: masked NaN/inf stay out)."""
        return torch.where(mask, values, torch.zeros_like(values)).sum(-1)
