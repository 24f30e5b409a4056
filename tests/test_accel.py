"""Opt-in step accelerations (atlasmap.training.accel): bf16 autocast keeps the ELBO within 1 %, the compiled
loss traces without graph breaks and computes the eager loss and gradients (checked on the CPU with the
``aot_eager`` backend: the same graph Inductor / CUDA graphs would take, without a C++ build)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from support import SMALL, simulate, split_by_batch

import atlasmap
from atlasmap.errors import InputError
from atlasmap.training.accel import loss_function


@pytest.fixture(scope="module")
def module_and_batch():
    ref, _ = split_by_batch(simulate(n_cells=240))
    model = atlasmap.SCVI(ref, batch_key="batch", dropout_rate=0.0, **SMALL)
    batch = model._cells(training=True).batch(np.arange(96))
    return model.module, batch


def _loss_and_grads(fn, module, batch, kl_weight: float) -> tuple[float, list[torch.Tensor]]:
    module.zero_grad(set_to_none=True)
    torch.manual_seed(3)
    terms = fn(batch, kl_weight)
    terms.loss.backward()
    return float(terms.loss.detach()), [p.grad.clone() for p in module.parameters() if p.grad is not None]


def test_default_options_are_the_modules_own_loss(module_and_batch) -> None:
    module, _ = module_and_batch
    assert loss_function(module, torch.device("cpu")) == module.loss


def test_bf16_autocast_keeps_the_elbo(module_and_batch) -> None:
    module, batch = module_and_batch
    module.train()
    torch.manual_seed(1)
    full = module.loss(batch, 1.0)
    torch.manual_seed(1)
    half = loss_function(module, torch.device("cpu"), precision="bf16")(batch, 1.0)
    assert half.reconstruction.dtype == torch.float32
    elbo_full = float((full.reconstruction + full.kl).mean())
    elbo_half = float((half.reconstruction + half.kl).mean())
    assert abs(elbo_half / elbo_full - 1) < 0.01, (elbo_full, elbo_half)


@pytest.mark.parametrize("precision", ["32", "bf16"])
def test_compiled_loss_equals_eager(module_and_batch, precision: str) -> None:
    import torch._dynamo

    module, batch = module_and_batch
    module.train()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    eager = loss_function(module, torch.device("cpu"), precision=precision)
    compiled = loss_function(module, torch.device("cpu"), precision=precision, compile="default",
                             backend="aot_eager")
    for kl_weight in (0.5, 0.25):  # a new KL weight is a new tensor value, not a recompilation
        want, want_grads = _loss_and_grads(eager, module, batch, kl_weight)
        got, got_grads = _loss_and_grads(compiled, module, batch, kl_weight)
        assert got == pytest.approx(want, rel=1e-5)
        assert len(got_grads) == len(want_grads) > 0
        for g, w in zip(got_grads, want_grads, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    counters = torch._dynamo.utils.counters
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


def test_unknown_options_are_refused(module_and_batch) -> None:
    module, _ = module_and_batch
    with pytest.raises(InputError, match="precision must be one of"):
        loss_function(module, torch.device("cpu"), precision="fp8")
    with pytest.raises(InputError, match="compile must be one of"):
        loss_function(module, torch.device("cpu"), compile="fast")
