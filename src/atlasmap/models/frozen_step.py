"""scVI's query-training step with a hand-written backward, for when only covariate blocks train.

After surgery (default options) every weight of an scVI module is frozen except the new covariate-table
blocks. One training step is then a handful of matmuls with frozen weights, forward and input-gradient,
between ~250 small PyTorch operations (table lookups, layer norm, ReLU, dropout and their autograd nodes)
that cost more in dispatch than in arithmetic on 128-cell minibatches. :class:`FrozenStep` does the same
step as ``module.loss(batch).backward()`` with the matmuls in PyTorch, each layer's elementwise forward
and backward in one call of the compiled ``_stack.c``, the likelihood in the NB kernel reading both
decoder heads from one matmul, and writes the gradients of the trainable blocks into their ``.grad``.

It draws the same random numbers in the same order as the autograd path (dropout, then the latent sample),
and its loss and gradients equal the autograd path's to float32 rounding (``tests/test_frozen_step.py``).
:func:`frozen_step` returns ``None`` whenever the module is not one it covers; training then uses autograd.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch
from torch import nn

from atlasmap.models.scvi_module import (
    _VAR_EPS,
    ENCODER_FIRST,
    LGAMMA_THETA,
    LOG_LIBRARY,
    LOG_X_FACT,
    LossTerms,
    SCVIModule,
)
from atlasmap.nn import kernel
from atlasmap.nn.layers import FCStack


def _address_array(ctype: type, values: list) -> ctypes.Array:
    return (ctype * max(len(values), 1))(*values)


@dataclass
class _Layer:
    """One layer of a frozen stack as the C functions read it (pointer arrays built once per training call)."""

    weight: torch.Tensor | None  # H_out x H_in; None for the precomputed first encoder layer
    weight_t: torch.Tensor | None
    bias: torch.Tensor | None
    n_out: int
    layer_norm: bool
    ln_eps: float
    n_cov: int
    arrays: tuple  # ctypes arrays kept alive: n_blocks, block_rows, block_ptr, block_grad
    addresses: tuple[int, int, int, int]

    @classmethod
    def build(cls, stack: FCStack, i: int, grads: dict[int, torch.Tensor], precomputed: bool = False) -> _Layer:
        """Layer ``i`` of ``stack``; ``grads`` maps trainable blocks (by id) to their gradient buffers;
        ``precomputed``: the layer's ``W x + b`` comes with the batch (the frozen first encoder layer)."""
        layer, norm = stack.layers[i], stack.norms[i]
        tables = layer.covariates if stack.injects[i] else []
        blocks = [b for t in tables for b in t.blocks]
        n_blocks = _address_array(ctypes.c_int64, [len(t.blocks) for t in tables])
        block_rows = _address_array(ctypes.c_int64, [int(b.shape[0]) for b in blocks])
        block_ptr = _address_array(ctypes.c_void_p, [b.data_ptr() for b in blocks])
        block_grad = _address_array(ctypes.c_void_p, [grads[id(b)].data_ptr() if id(b) in grads else None
                                                      for b in blocks])
        arrays = (n_blocks, block_rows, block_ptr, block_grad)
        weight = None if precomputed else layer.linear.weight
        return cls(
            weight=weight, weight_t=None if weight is None else weight.t(),
            bias=None if weight is None else layer.linear.bias, n_out=layer.linear.out_features,
            layer_norm=isinstance(norm, nn.LayerNorm), ln_eps=float(getattr(norm, "eps", 0.0)), n_cov=len(tables),
            arrays=arrays, addresses=tuple(ctypes.addressof(a) for a in arrays),
        )


def _stack_supported(stack: FCStack) -> bool:
    norms_ok = all(isinstance(n, nn.Identity) or (isinstance(n, nn.LayerNorm) and not n.elementwise_affine)
                   for n in stack.norms)
    return norms_ok and all(layer.continuous is None for layer in stack.layers)


def frozen_step(module: nn.Module, cells: object) -> FrozenStep | None:
    """The hand-written step for ``module`` trained on ``cells``, or ``None`` when it does not apply.

    It applies to a plain :class:`SCVIModule` on CPU float32 whose trainable parameters are all
    covariate-table blocks of the encoder and decoder (what surgery leaves by default), with layer norm
    (no affine) or no norm, the observed library size, an NB or ZINB likelihood with per-gene dispersion,
    no continuous covariates, the compiled kernels installed, and the encoder's first layer precomputed
    (``frozen_fields``). Anything else (reference training, scANVI, batch norm, ...) returns ``None``.
    """
    if type(module) is not SCVIModule or not kernel.available():
        return None
    cfg = module.config
    if (not cfg.use_observed_lib_size or cfg.gene_likelihood not in ("nb", "zinb") or cfg.dispersion != "gene"
            or cfg.n_continuous or not (_stack_supported(module.encoder) and _stack_supported(module.decoder))):
        return None
    fields = getattr(cells, "fields", {})
    if not all(k in fields for k in (ENCODER_FIRST, LGAMMA_THETA)):
        return None
    params = list(module.parameters())
    if any(p.device.type != "cpu" or p.dtype != torch.float32 for p in params):
        return None
    block_ids = {id(b) for stack in (module.encoder, module.decoder) for layer in stack.layers
                 for t in layer.covariates for b in t.blocks}
    trainable = [p for p in params if p.requires_grad]
    if not trainable or any(id(p) not in block_ids for p in trainable):
        return None
    return FrozenStep(module, trainable)


class FrozenStep:
    """Callable ``step(batch, kl_weight) -> LossTerms`` that also fills ``.grad`` of the trainable blocks.

    Built once per training call: weights and block pointers are read then (frozen weights do not change;
    the optimizer updates the trainable blocks in place).
    """

    def __init__(self, module: SCVIModule, trainable: list[nn.Parameter]) -> None:
        self.module = module
        self.lib = kernel._library()
        self.params = trainable
        self.grads = [torch.zeros_like(p) for p in trainable]
        by_id = {id(p): g for p, g in zip(trainable, self.grads, strict=True)}
        self.encoder = [_Layer.build(module.encoder, i, by_id, precomputed=i == 0)
                        for i in range(len(module.encoder.layers))]
        self.decoder = [_Layer.build(module.decoder, i, by_id) for i in range(len(module.decoder.layers))]
        z_w = torch.cat([module.z_mean.weight, module.z_var.weight]).detach()
        self.z_w, self.z_w_t, self.z_b = z_w, z_w.t(), torch.cat([module.z_mean.bias, module.z_var.bias]).detach()
        heads = [module.px_scale] + ([module.px_dropout] if module.px_dropout is not None else [])
        head_w = torch.cat([h.weight for h in heads]).detach()
        self.head_w, self.head_w_t = head_w, head_w.t()
        self.head_b = torch.cat([h.bias for h in heads]).detach()
        self.zero_inflated = module.px_dropout is not None
        self.theta = torch.exp(module.px_r).detach()
        self.n_latent = module.config.n_latent

    def _dropout_p(self) -> float:
        drop = self.module.encoder.dropout
        return float(drop.p) if isinstance(drop, nn.Dropout) and drop.training else 0.0

    def _forward(self, layer: _Layer, pre: torch.Tensor, cat: torch.Tensor, p: float) -> tuple:
        n, h = pre.shape
        factor = kernel.uniform(n, h) if p > 0 else None  # as the autograd path's Dropout draws them
        y, out = torch.empty(n, h), torch.empty(n, h)
        rstd = torch.empty(n)
        n_blocks, block_rows, block_ptr, _ = layer.addresses
        self.lib.atlasmap_layer_forward(n, h, pre.data_ptr(), layer.n_cov, cat.data_ptr(), cat.stride(0), n_blocks,
                                        block_ptr, block_rows, layer.layer_norm, layer.ln_eps, p,
                                        None if factor is None else factor.data_ptr(), y.data_ptr(),
                                        rstd.data_ptr(), out.data_ptr())
        return (y, rstd, factor), out

    def _backward(self, layer: _Layer, grad: torch.Tensor, saved: tuple, cat: torch.Tensor) -> torch.Tensor:
        """``grad`` (d loss / d layer output) becomes d loss / d pre-activation, in place; returns it."""
        y, rstd, factor = saved
        n, h = grad.shape
        n_blocks, block_rows, _, block_grad = layer.addresses
        self.lib.atlasmap_layer_backward(n, h, grad.data_ptr(), y.data_ptr(), rstd.data_ptr(),
                                         None if factor is None else factor.data_ptr(), layer.layer_norm,
                                         layer.n_cov, cat.data_ptr(), cat.stride(0), n_blocks, block_rows, block_grad)
        return grad

    def __call__(self, batch: dict[str, torch.Tensor], kl_weight: float) -> LossTerms:
        x, cat = batch["x"], batch["cat"].contiguous()
        n = x.shape[0]
        p = self._dropout_p()
        # forward: encoder (first layer's W x + b precomputed), latent sample, decoder, both heads at once
        h, enc_saved = batch[ENCODER_FIRST], []
        for layer in self.encoder:
            pre = h if layer.weight is None else torch.addmm(layer.bias, h, layer.weight_t)
            saved, h = self._forward(layer, pre.contiguous(), cat, p)
            enc_saved.append(saved)
        mv = torch.addmm(self.z_b, h, self.z_w_t)
        noise = torch.randn(n, self.n_latent)  # the autograd path's randn_like(qz_m)
        z, var, kl = torch.empty(n, self.n_latent), torch.empty(n, self.n_latent), torch.empty(n)
        self.lib.atlasmap_latent_forward(n, self.n_latent, mv.data_ptr(), noise.data_ptr(), _VAR_EPS, z.data_ptr(),
                                         var.data_ptr(), kl.data_ptr())
        h, dec_saved = z, []
        for layer in self.decoder:
            saved, h = self._forward(layer, torch.addmm(layer.bias, h, layer.weight_t), cat, 0.0)
            dec_saved.append(saved)
        heads = torch.addmm(self.head_b, h, self.head_w_t)
        nll, grad_heads = kernel.nb_nll_heads(x, heads, batch[LOG_LIBRARY], self.theta, self.zero_inflated,
                                              batch.get(LOG_X_FACT), batch[LGAMMA_THETA])
        # backward of mean(nll + kl_weight * kl), written out
        grad = grad_heads.mm(self.head_w).mul_(1.0 / n)
        for layer, saved in zip(reversed(self.decoder), reversed(dec_saved), strict=True):
            grad = self._backward(layer, grad, saved, cat).mm(layer.weight)
        grad_mv = torch.empty_like(mv)
        self.lib.atlasmap_latent_backward(n, self.n_latent, grad.data_ptr(), mv.data_ptr(), var.data_ptr(),
                                          noise.data_ptr(), _VAR_EPS, kl_weight / n, grad_mv.data_ptr())
        grad = grad_mv.mm(self.z_w)
        for layer, saved in zip(reversed(self.encoder), reversed(enc_saved), strict=True):
            grad = self._backward(layer, grad, saved, cat)
            if layer.weight is not None:
                grad = grad.mm(layer.weight)
        for param, g in zip(self.params, self.grads, strict=True):
            param.grad = g
        loss = (nll + kl_weight * kl).mean()
        return LossTerms(loss=loss, reconstruction=nll, kl=kl)


__all__ = ["FrozenStep", "frozen_step"]
