"""scVI's training step with a hand-written backward: query training after surgery and reference training.

A scVI step on a 128-cell minibatch is a few matmuls (forward, input gradient, weight gradient) between
~300 small PyTorch operations (table lookups, layer norm, ReLU, dropout, sampling, their autograd nodes)
whose dispatch costs more than their arithmetic. :class:`FusedStep` computes what
``module.loss(batch).backward()`` computes, with the matmuls in PyTorch (both decoder heads, and both
latent heads, as one matmul each), each layer's elementwise forward and backward in one call of the
compiled ``_stack.c``, and the likelihood in the NB kernel reading both heads from one matrix. Gradients
are written into ``.grad`` of the trainable tensors only: after surgery (the default: only new covariate
blocks train) no frozen weight's gradient is ever computed.

It draws the same random numbers in the same order as the autograd path (dropout masks, then the latent
sample), and its loss and gradients equal autograd's to float32 rounding (``tests/test_fused_step.py``) for
the cells :func:`fused_step` accepts (prepared per-cell fields, int64 codes within their tables).
:func:`fused_step` returns ``None`` for modules it does not cover; training then uses autograd.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from atlasmap.errors import InputError
from atlasmap.models.scvi_module import (
    _VAR_EPS,
    ENCODER_FIRST,
    LGAMMA_THETA,
    LOG_LIBRARY,
    LOG_X_FACT,
    SCVIModule,
    log_counts,
)
from atlasmap.nn import kernel
from atlasmap.nn.layers import FCStack, dropout_uniforms
from atlasmap.protocols import LossTerms


def _address_array(ctype: type, values: list) -> ctypes.Array:
    return (ctype * max(len(values), 1))(*values)


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
    """One stack layer as the C functions read it; pointer arrays are built once per training call."""

    linear: nn.Linear | None  # None: ``W x + b`` comes precomputed with the batch (frozen first encoder layer)
    grad_weight: torch.Tensor | None
    grad_bias: torch.Tensor | None
    layer_norm: bool
    ln_eps: float
    n_cov: int
    arrays: tuple  # ctypes arrays kept alive: n_blocks, block_rows, block_ptr, block_grad
    addresses: tuple[int, int, int, int]

    @classmethod
    def build(cls, stack: FCStack, i: int, grads: _Grads, precomputed: bool = False) -> _Layer:
        layer, norm = stack.layers[i], stack.norms[i]
        tables = layer.covariates if stack.injects[i] else []
        blocks = [b for t in tables for b in t.blocks]
        arrays = (
            _address_array(ctypes.c_int64, [len(t.blocks) for t in tables]),
            _address_array(ctypes.c_int64, [int(b.shape[0]) for b in blocks]),
            _address_array(ctypes.c_void_p, [b.data_ptr() for b in blocks]),
            _address_array(ctypes.c_void_p, [None if grads.of(b) is None else grads.of(b).data_ptr()
                                             for b in blocks]),
        )
        linear = None if precomputed else layer.linear
        return cls(
            linear=linear, grad_weight=grads.of(linear and linear.weight), grad_bias=grads.of(linear and linear.bias),
            layer_norm=isinstance(norm, nn.LayerNorm), ln_eps=float(getattr(norm, "eps", 0.0)), n_cov=len(tables),
            arrays=arrays, addresses=tuple(ctypes.addressof(a) for a in arrays),
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
    with the compiled kernels installed, whatever trains (reference training, or the new blocks after
    surgery). Anything else (scANVI, batch norm, a learned library size, ...) returns ``None``.
    """
    if type(module) is not SCVIModule or not kernel.available():
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
    """int64 codes, one column per categorical covariate, each within its table (the C layers index blocks
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
    optimizer (the C functions keep pointers to the covariate blocks).
    """

    def __init__(self, module: SCVIModule, trainable: list[nn.Parameter], first_precomputed: bool) -> None:
        """``first_precomputed``: the batches carry the frozen first encoder layer's ``W x + b``."""
        self.module = module
        self.lib = kernel._library()
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
        pre = pre.contiguous()  # kept alive across the C call
        n, width = pre.shape
        factor = dropout_uniforms(pre) if p > 0 else None  # the autograd path's Dropout draws the same
        y, out = torch.empty(n, width, dtype=torch.float32), torch.empty(n, width, dtype=torch.float32)
        rstd = torch.empty(n, dtype=torch.float32)
        n_blocks, block_rows, block_ptr, _ = layer.addresses
        _check_codes(self.lib.atlasmap_layer_forward(
            n, width, pre.data_ptr(), layer.n_cov, cat.data_ptr(), cat.stride(0), n_blocks, block_ptr, block_rows,
            layer.layer_norm, layer.ln_eps, p, None if factor is None else factor.data_ptr(), y.data_ptr(),
            rstd.data_ptr(), out.data_ptr()))
        return (h, y, rstd, factor), out

    def _backward(self, layer: _Layer, grad: torch.Tensor, saved: tuple, cat: torch.Tensor,
                  input_grad: bool = True) -> torch.Tensor | None:
        """From d loss / d layer output: the layer's gradients into their buffers; returns d loss / d input
        (``None`` for a precomputed layer or without ``input_grad``). ``grad`` is overwritten."""
        h, y, rstd, factor = saved
        grad = grad.contiguous()
        n, width = grad.shape
        n_blocks, block_rows, _, block_grad = layer.addresses
        _check_codes(self.lib.atlasmap_layer_backward(
            n, width, grad.data_ptr(), y.data_ptr(), rstd.data_ptr(), None if factor is None else factor.data_ptr(),
            layer.layer_norm, layer.n_cov, cat.data_ptr(), cat.stride(0), n_blocks, block_rows, block_grad))
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
        z, var = torch.empty(n, self.n_latent, dtype=torch.float32), torch.empty(n, self.n_latent, dtype=torch.float32)
        kl = torch.empty(n, dtype=torch.float32)
        noise = torch.randn_like(z)  # as the autograd path's randn_like(qz_m)
        self.lib.atlasmap_latent_forward(n, self.n_latent, mv.data_ptr(), noise.data_ptr(), _VAR_EPS, z.data_ptr(),
                                         var.data_ptr(), kl.data_ptr())
        h, dec_saved = z, []
        for layer in self.decoder:
            saved, h = self._forward(layer, h, cat, 0.0)
            dec_saved.append(saved)
        theta = torch.exp(self.module.px_r.detach()) if self.theta_trains else self.theta
        heads = self.heads.forward(h)
        nll, grad_heads, grad_theta = kernel.nb_nll_heads(
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
        grad_mv = torch.empty_like(mv)
        self.lib.atlasmap_latent_backward(n, self.n_latent, grad.data_ptr(), mv.data_ptr(), var.data_ptr(),
                                          noise.data_ptr(), _VAR_EPS, kl_weight / n, grad_mv.data_ptr())
        grad = self.latent.backward(grad_mv, h_enc, 1.0)
        for i in reversed(range(len(self.encoder))):  # nothing needs d loss / d counts
            grad = self._backward(self.encoder[i], grad, enc_saved[i], cat, input_grad=i > 0)
        self.grads.attach()
        loss = (nll + kl_weight * kl).mean()
        return LossTerms(loss=loss, reconstruction=nll, kl=kl)


def _check_codes(status: int) -> None:
    if status != 0:
        raise InputError("a category code lies outside its covariate table (the model does not know that category); "
                         "map new categories with load_query_data.")


__all__ = ["FusedStep", "fused_step"]
