"""Opt-in accelerations of the training step: bf16 autocast and a compiled (graph-captured) loss.

Both are off by default and change nothing then. They matter on a GPU, where a small scVI step is bound by
kernel launches and Python, not arithmetic:

* ``precision="bf16"`` runs the step's matmuls and elementwise work under ``torch.autocast`` in bfloat16
  (weights, optimizer state and the loss sums stay float32). Check the ELBO against a float32 run on the
  same cells before relying on it (``benchmarks/bench_mapping.py`` prints both).
* ``compile="reduce-overhead"`` compiles the module's loss with ``torch.compile``: Inductor fuses the
  likelihood's elementwise work, and on CUDA the forward and backward are replayed as CUDA graphs (one
  launch instead of hundreds). ``"default"`` fuses without graphs. Compilation is paid once per minibatch
  shape (the full batch and the last one) and is counted in the run's wall time. Importing
  ``torch._dynamo`` costs about a second, so nothing here touches it unless asked.

The KL weight changes every epoch of the warm-up; it enters the compiled loss as a 0-d tensor, so it does not
trigger a recompilation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Literal

import torch

from atlasmap.errors import InputError
from atlasmap.protocols import Batch, LossTerms, TrainableModule
from atlasmap.training.config import COMPILE_MODES, PRECISIONS

Precision = Literal["32", "bf16"]
CompileMode = Literal["none", "default", "reduce-overhead", "max-autotune"]

__all__ = ["COMPILE_MODES", "PRECISIONS", "CompileMode", "Precision", "autocast", "check_options", "loss_function"]


def check_options(precision: str, compile: str) -> None:
    """Raise :class:`~atlasmap.errors.InputError` for an unknown ``precision`` or ``compile`` value."""
    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {', '.join(map(repr, PRECISIONS))}, got {precision!r}.")
    if compile not in COMPILE_MODES:
        raise InputError(f"compile must be one of {', '.join(map(repr, COMPILE_MODES))}, got {compile!r}.")


@contextlib.contextmanager
def autocast(device: torch.device, precision: str) -> Iterator[None]:
    """bfloat16 autocast on ``device`` when ``precision == "bf16"``, else nothing."""
    if precision != "bf16":
        yield
        return
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
        yield


def _as_float32(terms: LossTerms) -> LossTerms:
    """Loss terms in float32 (under autocast the per-cell sums may come out in bfloat16)."""
    return LossTerms(loss=terms.loss.float(), reconstruction=terms.reconstruction.float(), kl=terms.kl.float(),
                     extra=terms.extra)


def loss_function(module: TrainableModule, device: torch.device, *, precision: str = "32", compile: str = "none",
                  backend: str | None = None) -> Callable[[Batch, float], LossTerms]:
    """``(batch, kl_weight) -> LossTerms`` of ``module``: its ``loss`` as it is, or under autocast, or compiled.

    Parameters
    ----------
    module
        The module being trained.
    device
        The training device (autocast's device type; the KL weight's tensor lives there).
    precision
        ``"32"`` (default) or ``"bf16"`` (autocast).
    compile
        ``"none"`` (default), or a ``torch.compile`` mode.
    backend
        ``torch.compile`` backend (default Inductor); tests use ``"aot_eager"`` to check the plumbing fast.
    """
    check_options(precision, compile)
    if precision == "32" and compile == "none":
        return module.loss

    if compile == "none":
        def step(batch: Batch, kl_weight: float) -> LossTerms:
            with autocast(device, precision):
                return _as_float32(module.loss(batch, kl_weight))

        return step

    def parts(batch: Batch, kl_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with autocast(device, precision):
            terms = module.loss(batch, kl_weight)
        return terms.loss.float(), terms.reconstruction.float(), terms.kl.float()

    kwargs = {"mode": compile} if backend is None else {"backend": backend}
    compiled = torch.compile(parts, dynamic=False, **kwargs)
    weights: dict[float, torch.Tensor] = {}

    def compiled_step(batch: Batch, kl_weight: float) -> LossTerms:
        w = weights.get(kl_weight)
        if w is None:  # one small copy per epoch (the weight changes once per epoch)
            weights.clear()
            w = weights[kl_weight] = torch.tensor(kl_weight, dtype=torch.float32, device=device)
        loss, rec, kl = compiled(batch, w)
        return LossTerms(loss=loss, reconstruction=rec, kl=kl)

    return compiled_step
