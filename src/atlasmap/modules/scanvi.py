"""The scANVI torch module (Xu et al. 2021): scVI plus labels, semi-supervised.

Generative model: ``y ~ Cat(prior)``, ``z2 ~ N(0, I)``, ``z1 ~ N(mu(z2, y), sigma(z2, y))``,
``x ~ p(x | z1, s, l)`` (the scVI decoder). Inference: ``q(z1 | x, s)`` is the scVI encoder,
``q(y | z1)`` a classifier, ``q(z2 | z1, y)`` a small encoder with the label injected.

Everything from scVI (encoder for ``z1``, decoder, dispersions, library) is inherited unchanged from
:class:`~atlasmap.modules.scvi.SCVIModule`, so surgery adds batch blocks to exactly the same stacks
and the latent ``z1`` of reference cells stays bit-identical. The label stacks (classifier, ``z2``
encoder, ``z1`` decoder) have no batch covariate; surgery never extends them.

Loss of a minibatch (negative ELBO, per cell, then averaged):

* labelled cells (``y >= 0``): the ELBO with their observed label,
  ``-log p(x|z1) + log q(z1|x) - log p(z1|z2,y) + KL(q(z2|z1,y) || N(0,I))``;
* unlabelled cells (``y == -1``): the label is marginalised with ``q(y|z1)``,
  ``sum_y q(y|z1) [-log p(z1|z2,y) + KL(z2)] + KL(q(y|z1) || prior)``;
* plus ``classification_ratio`` x the cross-entropy of ``q(y | E[z1])`` on the labelled cells of the
  minibatch.

As in scvi-tools, the KL warm-up weight multiplies the ``z2`` and ``y`` KL terms only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from atlasmap.modules.scvi import (
    _VAR_EPS,
    SCVIConfig,
    SCVIModule,
    _norm_flags,
    kl_normal_normal,
    kl_normal_standard,
)
from atlasmap.nn.layers import FCStack
from atlasmap.protocols import LossTerms

_LOG_2PI = math.log(2.0 * math.pi)


@dataclass(frozen=True)
class SCANVIConfig(SCVIConfig):
    """Hyper-parameters of :class:`SCANVIModule`: those of scVI plus the label model."""

    n_labels: int = 1
    linear_classifier: bool = False
    classification_ratio: float = 50.0
    label_prior: Literal["uniform", "empirical"] = "uniform"
    #: added to the variance of p(z1 | z2, y); scvi-tools' ``Decoder`` adds none (imported models: 0)
    z1_var_eps: float = _VAR_EPS


def normal_log_prob(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, var) summed over the last dimension."""
    return -0.5 * (_LOG_2PI + torch.log(var) + (x - mean).pow(2) / var).sum(-1)


class LabelClassifier(nn.Module):
    """q(y | z1): an MLP (scvi-tools' default: ``n_layers`` x ``n_hidden``) or a single linear layer."""

    def __init__(self, cfg: SCANVIConfig) -> None:
        super().__init__()
        if cfg.linear_classifier:
            self.body: FCStack | None = None
            n_in = cfg.n_latent
        else:
            self.body = FCStack(cfg.n_latent, cfg.n_hidden, cfg.n_layers, dropout_rate=cfg.dropout_rate,
                                **_norm_flags(cfg, "encoder"))
            n_in = cfg.n_hidden
        self.out = nn.Linear(n_in, cfg.n_labels)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Logits (cells x labels)."""
        h = z if self.body is None else self.body(z, None, None)
        return self.out(h)


class SCANVIModule(SCVIModule):
    """scANVI as a torch module. Batch = dict with ``x``, ``cat``, ``cont`` and ``y`` (label code, -1 = none)."""

    config: SCANVIConfig

    def __init__(self, config: SCANVIConfig) -> None:
        super().__init__(config)
        cfg = config
        if cfg.n_labels < 1:
            raise ValueError(f"n_labels must be at least 1, got {cfg.n_labels}")
        labels = (cfg.n_labels,)
        self.classifier = LabelClassifier(cfg)
        self.encoder_z2_z1 = FCStack(cfg.n_latent, cfg.n_hidden, cfg.n_layers, n_categories=labels,
                                     deep_injection=True, dropout_rate=cfg.dropout_rate,
                                     **_norm_flags(cfg, "encoder"))
        self.z2_mean = nn.Linear(cfg.n_hidden, cfg.n_latent)
        self.z2_var = nn.Linear(cfg.n_hidden, cfg.n_latent)
        self.decoder_z1_z2 = FCStack(cfg.n_latent, cfg.n_hidden, cfg.n_layers, n_categories=labels,
                                     deep_injection=True, dropout_rate=0.0, **_norm_flags(cfg, "decoder"))
        self.z1_mean = nn.Linear(cfg.n_hidden, cfg.n_latent)
        self.z1_var = nn.Linear(cfg.n_hidden, cfg.n_latent)
        # p(y): uniform unless the model class fills in label frequencies (label_prior="empirical")
        self.register_buffer("y_prior", torch.full((cfg.n_labels,), 1.0 / cfg.n_labels))

    # ------------------------------------------------------------------ structure for surgery
    def label_parts(self, freeze_classifier: bool) -> list[nn.Module]:
        """Label stacks that keep their reference state during query training (batch-norm statistics
        included): the ``z2`` encoder and ``z1`` decoder always, the classifier when it is frozen."""
        modules: list[nn.Module] = [self.encoder_z2_z1, self.decoder_z1_z2]
        if freeze_classifier:
            modules.append(self.classifier)
        return modules

    def classifier_parts(self) -> list[nn.Module]:
        """The classifier q(y | z1): what ``freeze_classifier=False`` lets train."""
        return [self.classifier]

    # ------------------------------------------------------------------ model
    def classify(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Label logits of q(y | z1) at the posterior mean of z1 (cells x labels)."""
        return self.classifier(self.inference(batch, sample=False)["qz_m"])

    def z2_terms(self, z1: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row: ``-log p(z1 | z2, y)`` with ``z2 ~ q(z2 | z1, y)``, and ``KL(q(z2 | z1, y) || N(0, I))``."""
        codes = y.unsqueeze(1)
        h = self.encoder_z2_z1(z1, codes, None)
        qz2_m = self.z2_mean(h)
        qz2_v = torch.exp(self.z2_var(h)) + _VAR_EPS
        z2 = qz2_m + qz2_v.sqrt() * torch.randn_like(qz2_m)
        h = self.decoder_z1_z2(z2, codes, None)
        pz1_m = self.z1_mean(h)
        pz1_v = torch.exp(self.z1_var(h)) + self.config.z1_var_eps
        return -normal_log_prob(z1, pz1_m, pz1_v), kl_normal_standard(qz2_m, qz2_v)

    def loss(self, batch: dict[str, torch.Tensor], kl_weight: float = 1.0) -> LossTerms:
        inf = self.inference(batch)
        px = self.generative(inf["z"], inf["library"], batch["cat"], batch["cont"], logits_only=True)
        reconst = self.reconstruction_loss(batch["x"], px, batch)
        kl_l = torch.zeros_like(reconst)
        if not self.config.use_observed_lib_size:
            b = batch["cat"][:, 0]
            kl_l = kl_normal_normal(inf["ql_m"], inf["ql_v"], self.library_log_means[b].unsqueeze(-1),
                                    self.library_log_vars[b].unsqueeze(-1))

        z1, y = inf["z"], batch["y"]
        n_labels = self.config.n_labels
        lab = torch.nonzero(y >= 0).squeeze(1)
        unl = torch.nonzero(y < 0).squeeze(1)
        n_lab, n_unl = lab.numel(), unl.numel()
        # one pass of the z2 stacks over: labelled cells with their label, unlabelled cells x every label
        rows = torch.cat([z1.index_select(0, lab), z1.index_select(0, unl).repeat(n_labels, 1)])
        labels = torch.cat([y.index_select(0, lab),
                            torch.arange(n_labels, device=y.device).repeat_interleave(n_unl)])
        nll_z1, kl_z2 = self.z2_terms(rows, labels)

        z1_term = torch.zeros_like(reconst)
        kl_latent = torch.zeros_like(reconst)
        kl_y = torch.zeros_like(reconst)
        if n_lab:
            z1_term = z1_term.index_put((lab,), nll_z1[:n_lab])
            kl_latent = kl_latent.index_put((lab,), kl_z2[:n_lab])
        if n_unl:
            # classifier on the whole minibatch (batch-norm needs more than one row), then select
            probs = F.softmax(self.classifier(z1), dim=-1).index_select(0, unl)
            nll_u = nll_z1[n_lab:].view(n_labels, n_unl).t()
            kl_u = kl_z2[n_lab:].view(n_labels, n_unl).t()
            z1_term = z1_term.index_put((unl,), (probs * nll_u).sum(-1))
            kl_latent = kl_latent.index_put((unl,), (probs * kl_u).sum(-1))
            log_ratio = torch.log(probs + 1e-8) - torch.log(self.y_prior)
            kl_y = kl_y.index_put((unl,), (probs * log_ratio).sum(-1))
        log_qz1 = normal_log_prob(z1, inf["qz_m"], inf["qz_v"])
        z1_term = z1_term + log_qz1

        loss = torch.mean(reconst + z1_term + kl_weight * (kl_latent + kl_y) + kl_l)
        classification = torch.zeros((), device=reconst.device)
        if n_lab:
            logits = self.classifier(inf["qz_m"]).index_select(0, lab)
            classification = F.cross_entropy(logits, y.index_select(0, lab))
            loss = loss + self.config.classification_ratio * classification
        return LossTerms(loss=loss, reconstruction=reconst, kl=z1_term + kl_latent + kl_y + kl_l,
                         extra={"classification_loss": classification})
