"""Adam for atlasmap's training loops, without ``torch.optim``.

The update rule is torch.optim.Adam's (L2 weight decay added to the gradient, bias-corrected moments, ``eps``
outside the square root; amsgrad off), the optimizer scvi-tools trains with. Why not ``torch.optim.Adam``
itself: constructing it imports ``torch._dynamo`` (about 0.8 s per process with torch 2.13 on CPU), which
every ``atlasmap map`` would pay for a mapping that takes a few seconds; and for the handful of small
tensors that train after surgery its per-step bookkeeping costs more than the arithmetic. On CPU float32 the
update is one compiled pass per tensor (``_stack.c``); elsewhere (GPU, no compiled kernels) it is PyTorch's
multi-tensor ``_foreach`` arithmetic.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterable

import numpy as np
import torch

from atlasmap.nn import kernel


class Adam:
    """Adam on ``params`` (the trainable tensors; each keeps its own step count, as in torch.optim.Adam).

    Parameters
    ----------
    params
        Tensors to update (``requires_grad``); tensors whose ``.grad`` is ``None`` at a step are skipped.
    lr, betas, eps, weight_decay
        As in ``torch.optim.Adam``.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], *, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        self.params = list(params)
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.exp_avg = [torch.zeros_like(p, memory_format=torch.contiguous_format) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p, memory_format=torch.contiguous_format) for p in self.params]
        self.steps = np.zeros(len(self.params), dtype=np.int64)
        self._compiled = kernel.available() and all(
            p.device.type == "cpu" and p.dtype == torch.float32 and p.is_contiguous() for p in self.params)
        if self._compiled:
            n = len(self.params)
            self._ptrs = [(ctypes.c_void_p * n)(*[t.data_ptr() for t in ts])
                          for ts in (self.params, self.exp_avg, self.exp_avg_sq)]
            self._sizes = (ctypes.c_int64 * n)(*[p.numel() for p in self.params])

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        """One Adam update of every parameter that has a gradient."""
        has_grad = np.array([p.grad is not None for p in self.params])
        if not has_grad.any():
            return
        self.steps += has_grad
        beta1, beta2 = self.betas
        steps = np.maximum(self.steps, 1).astype(np.float64)
        step_size = (self.lr / (1.0 - beta1**steps)).astype(np.float32)
        bias2_sqrt = np.sqrt(1.0 - beta2**steps).astype(np.float32)
        if self._compiled:
            grads = [None if p.grad is None else p.grad.contiguous() for p in self.params]
            grad_ptrs = (ctypes.c_void_p * len(grads))(*[None if g is None else g.data_ptr() for g in grads])
            threads = max(1, torch.get_num_threads())
            params_ptr, avg_ptr, avg_sq_ptr = (ctypes.addressof(a) for a in self._ptrs)
            kernel._library().atlasmap_adam(len(grads), params_ptr, ctypes.addressof(grad_ptrs), avg_ptr, avg_sq_ptr,
                                           ctypes.addressof(self._sizes), step_size.ctypes.data,
                                           bias2_sqrt.ctypes.data, beta1, beta2, self.eps, self.weight_decay, threads)
            return
        idx = np.flatnonzero(has_grad)
        params = [self.params[i] for i in idx]
        grads = [p.grad for p in params]
        if self.weight_decay:
            grads = torch._foreach_add(grads, params, alpha=self.weight_decay)
        exp_avg = [self.exp_avg[i] for i in idx]
        exp_avg_sq = [self.exp_avg_sq[i] for i in idx]
        torch._foreach_lerp_(exp_avg, grads, 1.0 - beta1)
        torch._foreach_mul_(exp_avg_sq, beta2)
        torch._foreach_addcmul_(exp_avg_sq, grads, grads, 1.0 - beta2)
        denom = torch._foreach_sqrt(exp_avg_sq)
        torch._foreach_div_(denom, [float(b) for b in bias2_sqrt[idx]])
        torch._foreach_add_(denom, self.eps)
        torch._foreach_addcdiv_(params, exp_avg, denom, [-float(s) for s in step_size[idx]])

    def __repr__(self) -> str:
        return (f"Adam(lr={self.lr}, betas={self.betas}, eps={self.eps}, weight_decay={self.weight_decay}, "
                f"{len(self.params)} tensors, {'compiled' if self._compiled else 'foreach'})")


__all__ = ["Adam"]
