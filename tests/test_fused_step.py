"""The hand-written training step (atlasmap.training.fused_step) against autograd.

scVI's training uses :class:`FusedStep` instead of ``module.loss(...).backward()`` (reference training and
query training after surgery). These tests check that it computes the same loss and the same gradients of
the trainable tensors (and none of the frozen ones), draws the same random numbers, and is only used where
it applies.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from support import SMALL, simulate, split_by_batch

import atlasmap
from atlasmap import ops
from atlasmap.training import TrainConfig, train_module
from atlasmap.training import fused_step as fs
from atlasmap.training.loop import with_frozen_fields

pytestmark = pytest.mark.skipif(not ops.available(), reason="the compiled kernels are not installed")


@pytest.fixture(scope="module")
def data() -> tuple[Any, Any]:
    return split_by_batch(simulate(480, seed=3))


def query_module(data: tuple[Any, Any], *, surgery: dict | None = None, **arch: Any) -> tuple[Any, Any]:
    """(query module in training mode, its cells with the frozen fields) after a short reference training."""
    ref, query = data
    kwargs = {**SMALL, **arch}
    model = atlasmap.SCVI(ref, batch_key="batch", **kwargs)
    model.train(max_epochs=2, progress_bar=False, device="cpu")  # the fused step is the CPU one
    qmodel = atlasmap.SCVI.load_query_data(query, model, **(surgery or {}))
    module = qmodel.module
    cells = with_frozen_fields(module, qmodel._cells(training=True))
    module.train()
    return module, cells


def reference_module(data: tuple[Any, Any], **arch: Any) -> tuple[Any, Any]:
    """(untrained reference module in training mode, its cells): every parameter trains."""
    ref, _ = data
    model = atlasmap.SCVI(ref, batch_key="batch", **{**SMALL, **arch})
    module = model.module
    cells = with_frozen_fields(module, model._cells(training=True))
    module.train()
    return module, cells


def autograd_and_fused(module: Any, cells: Any, kl_weight: float = 0.37, seed: int = 11) -> tuple:
    """Loss terms and trainable gradients of one minibatch, by autograd and by the fused step (same RNG)."""
    step = fs.fused_step(module, cells)
    assert step is not None
    rows = np.random.default_rng(seed).permutation(cells.n_cells)[:64]
    batch = cells.batch(rows)
    params = [p for p in module.parameters() if p.requires_grad]
    torch.manual_seed(seed)
    ref_terms = module.loss(batch, kl_weight)
    ref_terms.loss.backward()
    ref_grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    torch.manual_seed(seed)
    terms = step(batch, kl_weight)
    return ref_terms, terms, ref_grads, [p.grad.clone() for p in params]


def assert_same(ref_terms: Any, terms: Any, ref_grads: list, grads: list, all_used: bool = True) -> None:
    """Same loss terms and gradients; ``all_used``: every trainable tensor has a nonzero gradient (else some,
    e.g. reference-batch rows that query cells never read, are exactly zero in both)."""
    torch.testing.assert_close(terms.reconstruction, ref_terms.reconstruction.detach(), rtol=2e-6, atol=1e-3)
    torch.testing.assert_close(terms.kl, ref_terms.kl.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(terms.loss, ref_terms.loss.detach(), rtol=2e-6, atol=1e-4)
    assert len(grads) == len(ref_grads) > 0
    assert all(want.abs().max() > 0 for want in ref_grads) if all_used else any(w.abs().max() > 0 for w in ref_grads)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-6 * float(want.abs().max()))


@pytest.mark.parametrize("arch", [
    {},  # ZINB, deep injection, layer norm in both, dropout on
    {"gene_likelihood": "nb", "deeply_inject_covariates": False},
    {"use_layer_norm": "none", "n_layers": 1},
    {"use_layer_norm": "encoder", "n_layers": 3, "dropout_rate": 0.3},
    pytest.param({"encode_covariates": False},
                 marks=pytest.mark.filterwarnings("ignore:the reference was trained with encode_covariates")),
])
def test_fused_step_matches_autograd(data: tuple, arch: dict) -> None:
    module, cells = query_module(data, **arch)
    assert_same(*autograd_and_fused(module, cells))


@pytest.mark.parametrize("arch", [
    {},
    {"gene_likelihood": "nb", "use_layer_norm": "none"},
    {"n_layers": 1, "deeply_inject_covariates": False},
])
def test_fused_step_matches_autograd_in_reference_training(data: tuple, arch: dict) -> None:
    """Everything trains: weight and bias gradients of every linear map, the blocks, the dispersion."""
    module, cells = reference_module(data, **arch)
    assert_same(*autograd_and_fused(module, cells))


@pytest.mark.parametrize("surgery", [{"unfrozen": True}, {"freeze_expression": False},
                                     {"freeze_decoder_first_layer": False}])
def test_fused_step_matches_autograd_with_surgery_options(data: tuple, surgery: dict) -> None:
    module, cells = query_module(data, surgery=surgery)
    assert_same(*autograd_and_fused(module, cells), all_used=False)


def test_fused_step_with_two_covariates_across_blocks() -> None:
    """``donor`` has a reference category (d1, block 0, frozen) and a new one (d2, block 1) in the query:
    codes must find their block and only the trainable block may receive gradient."""
    ref, query = split_by_batch(simulate(480, seed=4))
    model = atlasmap.SCVI(ref, batch_key="batch", categorical_covariate_keys=["donor"], **SMALL)
    model.train(max_epochs=2, progress_bar=False, device="cpu")  # the fused step is the CPU one
    qmodel = atlasmap.SCVI.load_query_data(query, model)
    module = qmodel.module
    cells = with_frozen_fields(module, qmodel._cells(training=True))
    module.train()
    codes = cells.fields["cat"][:, 1]
    assert {0, 1} <= set(codes.tolist()) or {1, 2} <= set(codes.tolist())  # query donors d1 (old) and d2 (new)
    assert_same(*autograd_and_fused(module, cells))
    frozen_blocks = [b for t in module.covariate_tables(1) for b in t.blocks if not b.requires_grad]
    assert frozen_blocks and all(b.grad is None for b in frozen_blocks)


def test_fused_step_with_dropout_frozen(data: tuple) -> None:
    module, cells = query_module(data, surgery={"freeze_dropout": True})
    step = fs.fused_step(module, cells)
    assert step._dropout_p() == 0.0
    assert_same(*autograd_and_fused(module, cells))


@pytest.mark.parametrize(("arch", "surgery"), [
    ({"use_batch_norm": "both", "use_layer_norm": "none"}, {}),
    ({"use_observed_lib_size": False}, {}),
    ({"dispersion": "gene-batch"}, {}),
    ({"gene_likelihood": "poisson"}, {}),
])
def test_fused_step_only_where_it_applies(data: tuple, arch: dict, surgery: dict) -> None:
    module, cells = query_module(data, surgery=surgery, **arch)
    assert fs.fused_step(module, cells) is None


def test_scanvi_and_disabled_kernel_use_autograd(data: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    ref, _ = data
    scanvi = atlasmap.SCANVI(ref, batch_key="batch", labels_key="cell_type", unlabeled_category="Unknown", **SMALL)
    assert fs.fused_step(scanvi.module, scanvi._cells(training=True)) is None  # another loss
    module, cells = query_module(data)
    assert fs.fused_step(module, cells) is not None
    monkeypatch.setenv("ATLASMAP_KERNEL", "0")
    assert fs.fused_step(module, cells) is None


def test_training_with_fused_step_matches_autograd_training(data: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    """A few epochs of query training: the fused step and autograd reach the same blocks (same random
    numbers; the two differ by float32 rounding only), and the frozen weights do not move."""
    module, cells = query_module(data)
    frozen_before = {n: p.detach().clone() for n, p in module.named_parameters() if not p.requires_grad}
    initial = {n: p.detach().clone() for n, p in module.named_parameters()}
    config = TrainConfig(max_epochs=3, batch_size=32, progress_bar=False, device="cpu")  # the CPU step
    used = []
    real_build = fs.fused_step

    def spy(module_: Any, cells_: Any) -> Any:
        step = real_build(module_, cells_)
        used.append(step is not None)
        return step

    monkeypatch.setattr(fs, "fused_step", spy)
    hist_fused = train_module(module, cells, config)
    fused = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    assert used == [True]
    for name, p in module.named_parameters():
        if name in frozen_before:
            assert torch.equal(p, frozen_before[name]), name
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(initial[name])
    monkeypatch.setattr(fs, "fused_step", lambda *_: None)
    hist_autograd = train_module(module, cells, config)
    for name, p in module.named_parameters():
        if p.requires_grad:
            assert not torch.equal(fused[name], initial[name])  # the blocks trained
            torch.testing.assert_close(fused[name], p.detach(), rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(hist_fused["elbo_train"], hist_autograd["elbo_train"], rtol=1e-4)


def test_dropout_uniforms_seeded_and_uniform() -> None:
    """The compiled dropout generator: fixed by torch.manual_seed, new draws each call, uniform on [0, 1)."""
    from scipy import stats

    torch.manual_seed(3)
    a, b = ops.uniform(300, 700), ops.uniform(300, 700)
    torch.manual_seed(3)
    assert torch.equal(ops.uniform(300, 700), a)
    assert not torch.equal(a, b)
    values = a.flatten().double().numpy()
    assert values.min() >= 0.0 and values.max() < 1.0
    assert stats.kstest(values[:50_000], "uniform").pvalue > 1e-3
    assert abs(float((a < 0.1).double().mean()) - 0.1) < 0.003  # the keep rate of dropout p = 0.1
    # neighbouring entries are not correlated (a counter-based generator's weak point)
    assert abs(np.corrcoef(values[:-1], values[1:])[0, 1]) < 0.01


def test_fused_step_refuses_cells_it_cannot_handle_exactly(data: tuple) -> None:
    """Without the prepared per-cell terms, with codes that are not int64 or outside their tables, or with
    non-float32 counts the fused step does not apply (autograd computes or reports these itself)."""
    import copy

    module, cells = query_module(data)
    assert fs.fused_step(module, cells) is not None

    def variant(**fields: Any) -> Any:
        out = copy.copy(cells)
        out.fields = {k: v for k, v in {**cells.fields, **fields}.items() if v is not None}
        return out

    for name in ("log_x_fact", "log_library"):
        assert fs.fused_step(module, variant(**{name: None})) is None, name
    cat = cells.fields["cat"]
    assert fs.fused_step(module, variant(cat=cat.int())) is None  # int32 codes
    too_big = cat.clone()
    too_big[0, 0] = module.decoder.layers[0].covariates[0].n_categories
    assert fs.fused_step(module, variant(cat=too_big)) is None
    negative = cat.clone()
    negative[3, 0] = -1
    assert fs.fused_step(module, variant(cat=negative)) is None
    dense64 = copy.copy(cells)
    counts = cells.counts
    dense64.counts = torch.as_tensor(counts if isinstance(counts, torch.Tensor) else counts.toarray(),
                                     dtype=torch.float64)
    assert fs.fused_step(module, dense64) is None


def test_fused_step_raises_on_an_unknown_code_in_a_batch(data: tuple) -> None:
    """A code outside its table in a minibatch is refused by the C layer (no read or write past a block)."""
    from atlasmap.errors import InputError

    module, cells = query_module(data)
    step = fs.fused_step(module, cells)
    batch = cells.batch(np.arange(8))
    batch["cat"] = batch["cat"].clone()
    batch["cat"][2, 0] = 10_000
    with pytest.raises(InputError, match="outside its covariate table"):
        step(batch, 0.5)


def test_fused_step_runs_compiled_only(data: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the kernels available every op of the step takes the compiled path: a silent fallback to the
    PyTorch reference (e.g. after a layout change) would be correct but several times slower."""
    from atlasmap.ops import reference
    from atlasmap.training.optim import Adam

    def fail(*_: Any, **__: Any) -> None:
        raise AssertionError("the fused step fell back to atlasmap.ops.reference")

    for name in ("nb_nll", "nb_nll_logits", "layer_forward", "layer_backward", "latent_forward", "latent_backward",
                 "uniform", "adam_step"):
        monkeypatch.setattr(reference, name, fail)
    for module, cells in (query_module(data), reference_module(data)):
        step = fs.fused_step(module, cells)
        params = [p for p in module.parameters() if p.requires_grad]
        optimizer = Adam(params)
        step(cells.batch(np.arange(64)), 0.5)
        optimizer.step()
