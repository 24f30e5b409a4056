"""Adam for atlasmap's training loops, without ``torch.optim``.

The update rule is torch.optim.Adam's (L2 weight decay added to the gradient, bias-corrected moments, ``eps``
outside the square root; amsgrad off), the optimizer scvi-tools trains with. Why not ``torch.optim.Adam``
itself: constructing it imports ``torch._dynamo`` (about 0.8 s per process with torch 2.13 on CPU), which
every ``atlasmap map`` would pay for a mapping that takes a few seconds; and for the handful of small
tensors that train after surgery its per-step bookkeeping costs more than the arithmetic. The update is
:func:`atlasmap.ops.adam_step`: one compiled pass per tensor on CPU float32; elsewhere (GPU, no compiled
kernels) PyTorch's multi-tensor ``_foreach`` arithmetic.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from atlasmap import ops


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
        # the tensors the update reads every step, with their kernel views made once
        self._params, self._avg, self._avg_sq = (ops.TensorGroup(ts) for ts in
                                                 (self.params, self.exp_avg, self.exp_avg_sq))
        self._grads = ops.TensorGroup([])

    @property
    def _compiled(self) -> bool:
        """Whether steps run the compiled update (CPU float32 tensors, kernels available)."""
        return ops.available() and self._params.plain

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
        grads = [p.grad for p in self.params]
        if len(grads) != len(self._grads) or any(a is not b for a, b in zip(grads, self._grads, strict=True)):
            self._grads = ops.TensorGroup([None if g is None else g.contiguous() for g in grads])
        ops.adam_step(self._params, self._grads, self._avg, self._avg_sq, step_size=step_size, bias2_sqrt=bias2_sqrt,
                      beta1=beta1, beta2=beta2, eps=self.eps, weight_decay=self.weight_decay)

    def __repr__(self) -> str:
        return (f"Adam(lr={self.lr}, betas={self.betas}, eps={self.eps}, weight_decay={self.weight_decay}, "
                f"{len(self.params)} tensors, {'compiled' if self._compiled else 'foreach'})")


__all__ = ["Adam"]
