"""scVI's training step with a hand-written backward: query training after surgery and reference training.

A scVI step on a 128-cell minibatch is a few matmuls (forward, input gradient, weight gradient) between
~300 small PyTorch operations (table lookups, layer norm, ReLU, dropout, sampling, their autograd nodes)
whose dispatch costs more than their arithmetic. :class:`FusedStep` computes what
``module.loss(batch).backward()`` computes, with the matmuls in PyTorch (both decoder heads, and both
latent heads, as one matmul each), each layer's elementwise forward and backward in one call of
:func:`atlasmap.ops.layer_forward` / :func:`~atlasmap.ops.layer_backward` (compiled ``kernels/stack.c``),
the latent sample in one of :func:`~atlasmap.ops.latent_forward` / ``latent_backward``, and the
likelihood in :func:`~atlasmap.ops.nb_nll_heads` reading both heads from one matrix. Gradients
are written into ``.grad`` of the trainable tensors only: after surgery (the default: only new covariate
blocks train) no frozen weight's gradient is ever computed.

It draws the same random numbers in the same order as the autograd path (dropout masks, then the latent
sample), and its loss and gradients equal autograd's to float32 rounding (``tests/test_fused_step.py``) for
the cells :func:`fused_step` accepts (prepared per-cell fields, int64 codes within their tables).
:func:`fused_step` returns ``None`` for modules it does not cover; training then uses autograd.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from atlasmap import ops
from atlasmap.modules.scvi import (
    _VAR_EPS,
    ENCODER_FIRST,
    LGAMMA_THETA,
    LOG_LIBRARY,
    LOG_X_FACT,
    SCVIModule,
    log_counts,
)
from atlasmap.nn.layers import FCStack, dropout_uniforms
from atlasmap.protocols import LossTerms


class _Grads:
    """Gradient buffers of the trainable tensors, filled in place each step and attached as ``.grad``."""

    def __init__(self, trainable: list[nn.Parameter]) -> None:
        self.params = trainable
        self.buffers = [torch.zeros_like(p) for p in trainable]
        self._by_id = {id(p): g for p, g in zip(trainable, self.buffers, strict=True)}

    def of(self, param: nn.Parameter | None) -> torch.Tensor | None:
        """The buffer of ``param``, ``None`` when it does not train."""
        return None if param is None else self._by_id.get(id(param))

    def use(self, param: nn.Parameter, buffer: torch.Tensor) -> None:
        """Make ``buffer`` (e.g. a view into a larger gradient) the gradient buffer of ``param``."""
        i = next(k for k, p in enumerate(self.params) if p is param)
        self.buffers[i] = self._by_id[id(param)] = buffer

    def attach(self) -> None:
        for param, buf in zip(self.params, self.buffers, strict=True):
            param.grad = buf


@dataclass
class _Layer:
    """One stack layer as the layer ops read it; its covariate blocks are prepared once per training call."""

    linear: nn.Linear | None  # None: ``W x + b`` comes precomputed with the batch (frozen first encoder layer)
    grad_weight: torch.Tensor | None
    grad_bias: torch.Tensor | None
    layer_norm: bool
    ln_eps: float
    blocks: ops.CovariateBlocks  # the covariate tables' blocks and the gradient buffers of those that train

    @classmethod
    def build(cls, stack: FCStack, i: int, grads: _Grads, precomputed: bool = False) -> _Layer:
        layer, norm = stack.layers[i], stack.norms[i]
        tables = layer.covariates if stack.injects[i] else []
        blocks = ops.CovariateBlocks([list(t.blocks) for t in tables],
                                     [[grads.of(b) for b in t.blocks] for t in tables])
        linear = None if precomputed else layer.linear
        return cls(
            linear=linear, grad_weight=grads.of(linear and linear.weight), grad_bias=grads.of(linear and linear.bias),
            layer_norm=isinstance(norm, nn.LayerNorm), ln_eps=float(getattr(norm, "eps", 0.0)), blocks=blocks,
        )


class _Scratch:
    """Per-step work tensors kept across steps, by name and shape. Allocating the megabyte-sized ones anew in
    every step costs page faults when the allocator hands their memory back to the system: ~4 ms of a
    16 ms reference step at 7,000 genes. Whatever is taken from here is overwritten by the next step."""

    def __init__(self) -> None:
        self._tensors: dict[tuple, torch.Tensor] = {}

    def get(self, name: str, *shape: int) -> torch.Tensor:
        key = (name, *shape)
        if key not in self._tensors:
            self._tensors[key] = torch.empty(*shape, dtype=torch.float32)
        return self._tensors[key]


class _Heads:
    """Linear maps applied as one matmul with their weights stacked by rows (``[W_1; W_2]``): stacked once
    when frozen, every step (into the same buffer) when they train; their gradients are row ranges of the
    stacked gradient."""

    def __init__(self, linears: list[nn.Linear], grads: _Grads, scratch: _Scratch, name: str) -> None:
        self.linears = linears
        self.scratch, self.name = scratch, name
        self.trains = any(p.requires_grad for lin in linears for p in lin.parameters())
        self.weight, self.bias = self._stack()
        # stacked gradient buffers; each trainable weight's / bias' gradient is a row range of them (no copies)
        self.grad_weight = torch.zeros_like(self.weight) if any(lin.weight.requires_grad for lin in linears) else None
        self.grad_bias = torch.zeros_like(self.bias) if any(lin.bias.requires_grad for lin in linears) else None
        lo = 0
        for lin in linears:
            for param, stacked in ((lin.weight, self.grad_weight), (lin.bias, self.grad_bias)):
                if param.requires_grad:
                    grads.use(param, stacked[lo:lo + lin.out_features])
            lo += lin.out_features

    def _stack(self) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            if len(self.linears) == 1:
                return self.linears[0].weight.detach(), self.linears[0].bias.detach()
            return (torch.cat([lin.weight for lin in self.linears]), torch.cat([lin.bias for lin in self.linears]))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.trains and len(self.linears) > 1:  # (a single map's weight is the parameter itself)
            with torch.no_grad():
                torch.cat([lin.weight for lin in self.linears], out=self.weight)
                torch.cat([lin.bias for lin in self.linears], out=self.bias)
        out = self.scratch.get(self.name, h.shape[0], self.weight.shape[0])
        return torch.addmm(self.bias, h, self.weight.t(), out=out)

    def backward(self, grad: torch.Tensor, h: torch.Tensor, scale: float) -> torch.Tensor:
        """Weight and bias gradients of ``scale * grad`` (d loss / d output, unscaled) into their buffers;
        returns ``scale * grad @ W``, the gradient of the input."""
        if self.grad_weight is not None:
            torch.mm(grad.t(), h, out=self.grad_weight).mul_(scale)
        if self.grad_bias is not None:
            torch.sum(grad, 0, out=self.grad_bias).mul_(scale)
        return grad.mm(self.weight).mul_(scale)


def _stack_supported(stack: FCStack) -> bool:
    norms_ok = all(isinstance(n, nn.Identity) or (isinstance(n, nn.LayerNorm) and not n.elementwise_affine)
                   for n in stack.norms)
    return norms_ok and all(layer.continuous is None for layer in stack.layers)


def fused_step(module: nn.Module, cells: object) -> FusedStep | None:
    """The hand-written step for ``module`` trained on ``cells``, or ``None`` when it does not apply.

    It applies to a plain :class:`SCVIModule` on CPU float32 with layer norm (no affine) or no norm, the
    observed library size, an NB or ZINB likelihood with per-gene dispersion and no continuous covariates,
    with the compiled kernels installed (:func:`atlasmap.ops.available`), whatever trains (reference training, or the new blocks after
    surgery). Anything else (scANVI, batch norm, a learned library size, ...) returns ``None``.
    """
    if type(module) is not SCVIModule or not ops.available():
        return None
    cfg = module.config
    if (not cfg.use_observed_lib_size or cfg.gene_likelihood not in ("nb", "zinb") or cfg.dispersion != "gene"
            or cfg.n_continuous or not (_stack_supported(module.encoder) and _stack_supported(module.decoder))):
        return None
    params = list(module.parameters())
    if any(p.device.type != "cpu" or p.dtype != torch.float32 for p in params):
        return None
    trainable = [p for p in params if p.requires_grad]
    if not trainable:
        return None
    fields = getattr(cells, "fields", {})
    first_frozen = not any(p.requires_grad for p in module.encoder.layers[0].linear.parameters())
    if first_frozen != (ENCODER_FIRST in fields) or module.px_r.requires_grad == (LGAMMA_THETA in fields):
        return None  # the precomputed fields must match what is frozen
    if not (LOG_LIBRARY in fields and LOG_X_FACT in fields and _codes_in_range(module, fields.get("cat"))):
        return None  # autograd computes the missing per-cell terms itself and reports bad codes
    counts = getattr(cells, "counts", None)
    if counts is not None and counts.dtype not in (torch.float32, np.float32):
        return None
    drop = module.encoder.dropout
    if isinstance(drop, nn.Dropout) and drop.p >= 1.0:
        return None  # degenerate: autograd's Dropout draws no random numbers then
    return FusedStep(module, trainable, first_precomputed=first_frozen)


def _codes_in_range(module: SCVIModule, cat: torch.Tensor | None) -> bool:
    """int64 codes, one column per categorical covariate, each within its table (the layer ops index blocks
    with them)."""
    n_categories = [t.n_categories for t in (module.decoder.layers[0].covariates or [])]
    if cat is None or cat.dtype != torch.int64 or cat.dim() != 2 or cat.shape[1] < len(n_categories):
        return False
    if cat.shape[0] == 0 or not n_categories:
        return True
    low, high = cat.min(0).values, cat.max(0).values
    return bool((low >= 0).all()) and all(int(high[j]) < n for j, n in enumerate(n_categories))


class FusedStep:
    """Callable ``step(batch, kl_weight) -> LossTerms`` that also fills ``.grad`` of the trainable tensors.

    Built once per training call: frozen weights are read then; trainable ones are updated in place by the
    optimizer (the layer ops keep views of the covariate blocks). Through :mod:`atlasmap.ops` it also runs
    on the reference implementations (what the tests compare; :func:`fused_step` only uses it compiled).
    """

    def __init__(self, module: SCVIModule, trainable: list[nn.Parameter], first_precomputed: bool) -> None:
        """``first_precomputed``: the batches carry the frozen first encoder layer's ``W x + b``."""
        self.module = module
        self.grads = _Grads(trainable)
        self.encoder = [_Layer.build(module.encoder, i, self.grads, precomputed=i == 0 and first_precomputed)
                        for i in range(len(module.encoder.layers))]
        self.decoder = [_Layer.build(module.decoder, i, self.grads) for i in range(len(module.decoder.layers))]
        self.scratch = _Scratch()
        self.latent = _Heads([module.z_mean, module.z_var], self.grads, self.scratch, "latent")
        self.heads = _Heads([module.px_scale] + ([module.px_dropout] if module.px_dropout is not None else []),
                            self.grads, self.scratch, "heads")
        self.zero_inflated = module.px_dropout is not None
        self.theta_trains = module.px_r.requires_grad
        self.theta = torch.exp(module.px_r).detach()
        self.n_latent = module.config.n_latent

    def _dropout_p(self) -> float:
        drop = self.module.encoder.dropout
        return float(drop.p) if isinstance(drop, nn.Dropout) and drop.training else 0.0

    def _forward(self, layer: _Layer, h: torch.Tensor, cat: torch.Tensor, p: float) -> tuple:
        """Layer output and what its backward needs, from its input ``h`` (``W h + b`` when precomputed)."""
        pre = h if layer.linear is None else torch.addmm(layer.linear.bias, h, layer.linear.weight.t())
        pre = pre.contiguous()
        factor = dropout_uniforms(pre) if p > 0 else None  # the autograd path's Dropout draws the same
        y, rstd, out = ops.layer_forward(pre, cat, layer.blocks, layer_norm=layer.layer_norm, ln_eps=layer.ln_eps,
                                         p=p, factor=factor)
        return (h, y, rstd, factor), out

    def _backward(self, layer: _Layer, grad: torch.Tensor, saved: tuple, cat: torch.Tensor,
                  input_grad: bool = True) -> torch.Tensor | None:
        """From d loss / d layer output: the layer's gradients into their buffers; returns d loss / d input
        (``None`` for a precomputed layer or without ``input_grad``). ``grad`` is overwritten."""
        h, y, rstd, factor = saved
        grad = ops.layer_backward(grad.contiguous(), y, rstd, factor, cat, layer.blocks, layer_norm=layer.layer_norm)
        if layer.linear is None:
            return None
        if layer.grad_weight is not None:
            torch.mm(grad.t(), h, out=layer.grad_weight)
        if layer.grad_bias is not None:
            torch.sum(grad, 0, out=layer.grad_bias)
        return grad.mm(layer.linear.weight) if input_grad else None

    @torch.no_grad()
    def __call__(self, batch: dict[str, torch.Tensor], kl_weight: float) -> LossTerms:
        x, cat = batch["x"].float().contiguous(), batch["cat"].contiguous()
        n = x.shape[0]
        p = self._dropout_p()
        # forward: encoder, latent sample, decoder, both heads at once
        if self.encoder[0].linear is None:
            h = batch[ENCODER_FIRST]
        else:
            h = log_counts(x, out=self.scratch.get("log_x", *x.shape))
        enc_saved = []
        for layer in self.encoder:
            saved, h = self._forward(layer, h, cat, p)
            enc_saved.append(saved)
        h_enc = h
        mv = self.latent.forward(h_enc)
        # as the autograd path's randn_like(qz_m) (the same draws; tests replace torch.randn_like)
        noise = torch.randn_like(mv[:, :self.n_latent], memory_format=torch.contiguous_format)
        z, var, kl = ops.latent_forward(mv, noise, _VAR_EPS)
        h, dec_saved = z, []
        for layer in self.decoder:
            saved, h = self._forward(layer, h, cat, 0.0)
            dec_saved.append(saved)
        theta = torch.exp(self.module.px_r.detach()) if self.theta_trains else self.theta
        heads = self.heads.forward(h)
        nll, grad_heads, grad_theta = ops.nb_nll_heads(
            x, heads, batch[LOG_LIBRARY], theta, self.zero_inflated, batch.get(LOG_X_FACT),
            batch.get(LGAMMA_THETA), need_theta=self.theta_trains,
            out=(self.scratch.get("grad_heads", *heads.shape),
                 self.scratch.get("grad_theta", *x.shape) if self.theta_trains else None))
        # backward of mean(nll + kl_weight * kl), written out
        if grad_theta is not None:
            torch.mul(grad_theta.sum(0), theta, out=self.grads.of(self.module.px_r)).mul_(1.0 / n)
        grad = self.heads.backward(grad_heads, h, 1.0 / n)
        for layer, saved in zip(reversed(self.decoder), reversed(dec_saved), strict=True):
            grad = self._backward(layer, grad, saved, cat)
        grad_mv = ops.latent_backward(grad, mv, var, noise, _VAR_EPS, kl_weight / n)
        grad = self.latent.backward(grad_mv, h_enc, 1.0)
        for i in reversed(range(len(self.encoder))):  # nothing needs d loss / d counts
            grad = self._backward(self.encoder[i], grad, enc_saved[i], cat, input_grad=i > 0)
        self.grads.attach()
        loss = (nll + kl_weight * kl).mean()
        return LossTerms(loss=loss, reconstruction=nll, kl=kl)


__all__ = ["FusedStep", "fused_step"]
