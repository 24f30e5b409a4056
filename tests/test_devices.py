"""Device placement, proven on every machine (no GPU needed).

The class of bug these tests catch: code that is only ever run on the CPU, where ``Parameter.to("cpu")``
returns the parameter itself and every tensor lives on one device. On a GPU (and on the ``meta`` device)
``.to()`` returns a *new, plain* tensor, so a block created on the CPU and then moved is not the parameter
the module registers; and a tensor created without ``device=`` next to CUDA parameters breaks the step.

* On ``meta``: surgery leaves every new block a registered, trainable parameter, the very object the
  optimizer updates (``is``), for every model type.
* On a fake CUDA device (``fake_cuda.py``: no data, CUDA's device checks): after ``.to("cuda")`` the loss
  and an optimizer step of every model type, including surgery on a module that already lives on the
  device, the per-cell tensors of frozen layers and the loader's minibatches, touch no CPU tensor. The
  backward runs on ``meta`` (autograd needs a CUDA runtime even for fake CUDA tensors).
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from fake_cuda import CUDA, devices_of, fake_cuda
from support import SMALL, simulate, split_by_batch
from torch import nn

import atlasmap
from atlasmap import ops
from atlasmap.data.loader import CellData
from atlasmap.modules.scanvi import SCANVIConfig, SCANVIModule
from atlasmap.modules.scvi import SCVIConfig, SCVIModule
from atlasmap.modules.totalvi import TOTALVIConfig, TOTALVIModule
from atlasmap.surgery import SurgeryOptions, add_category_blocks, apply_freezing
from atlasmap.training import TrainConfig
from atlasmap.training.loop import make_optimizer, trainable_parameters, with_frozen_fields

N_GENES, N_PROTEINS = 12, 4


@pytest.fixture(autouse=True)
def _pure_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fake tensors have no memory: the compiled CPU kernels must not be handed one (the CPU paths they
    serve are tested elsewhere; here every operation takes the pure-torch path a GPU takes)."""
    monkeypatch.setenv("ATLASMAP_KERNEL", "0")

#: module builders: every kind of covariate table surgery extends
MODULES: dict[str, Any] = {
    "scvi": lambda: SCVIModule(SCVIConfig(n_genes=N_GENES, n_categories=(2,), n_hidden=8, n_latent=3, n_layers=2)),
    "scvi-covariates": lambda: SCVIModule(SCVIConfig(
        n_genes=N_GENES, n_categories=(2, 3), n_continuous=1, n_hidden=8, n_latent=3, n_layers=2,
        dispersion="gene-batch", use_observed_lib_size=False, use_batch_norm="both", use_layer_norm="none")),
    "scanvi": lambda: SCANVIModule(SCANVIConfig(n_genes=N_GENES, n_categories=(2,), n_hidden=8, n_latent=3,
                                                n_layers=2, n_labels=3)),
    "totalvi": lambda: TOTALVIModule(TOTALVIConfig(
        n_genes=N_GENES, n_proteins=N_PROTEINS, n_categories=(2,), n_hidden=8, n_latent=3,
        protein_dispersion="protein-batch", gene_dispersion="gene-batch")),
}


def _new_rows(module: nn.Module) -> list[int]:
    """One new category per covariate."""
    return [1] * len(module.config.n_categories)


def _registered(module: nn.Module) -> dict[int, str]:
    return {id(p): name for name, p in module.named_parameters()}


def _released_by_default(module: nn.Module) -> set[str]:
    """Parameters the default surgery options train besides the new blocks: decoder batch norms."""
    return {name for name, p in module.named_parameters() if name.startswith("decoder.norms.")}


@pytest.mark.parametrize("kind", sorted(MODULES))
def test_surgery_on_meta_registers_trainable_new_blocks(kind: str) -> None:
    """The meta device returns new tensors from ``.to()`` exactly as CUDA does (CPU returns the same one)."""
    module = MODULES[kind]().to("meta")
    new = add_category_blocks(module, _new_rows(module))
    apply_freezing(module, new, SurgeryOptions())
    registered = _registered(module)
    assert new, "surgery added no blocks"
    for block in new:
        assert id(block) in registered, "a new block is not a parameter of the module"
        assert isinstance(block, nn.Parameter) and block.requires_grad and block.device.type == "meta"
    trainable = trainable_parameters(module)
    released = _released_by_default(module)
    assert {_registered(module)[id(p)] for p in trainable} == {_registered(module)[id(p)] for p in new} | released
    optimizer = make_optimizer(trainable, TrainConfig(max_epochs=1), torch.device("meta"))
    assert [id(p) for p in optimizer.params] == [id(p) for p in trainable]  # the objects the module holds


@pytest.mark.parametrize("kind", sorted(MODULES))
def test_surgery_of_a_module_moved_to_meta_keeps_every_block_on_its_device(kind: str) -> None:
    module = MODULES[kind]()
    add_category_blocks(module, _new_rows(module))  # a first surgery on the CPU ...
    module.to("meta")
    new = add_category_blocks(module, _new_rows(module))  # ... a second one where the module now lives
    assert {p.device.type for p in module.parameters()} == {"meta"}
    assert {b.device.type for b in module.buffers()} <= {"meta"}
    assert all(id(b) in _registered(module) for b in new)


# ------------------------------------------------------------------------------------------ fake CUDA
def _batch(module: nn.Module, n: int = 6, device: torch.device = CUDA) -> dict[str, torch.Tensor]:
    cfg = module.config
    cats = [torch.zeros(n, dtype=torch.long, device=device) for _ in cfg.n_categories]
    batch = {"x": torch.ones(n, cfg.n_genes, device=device), "cat": torch.stack(cats, 1),
             "cont": torch.zeros(n, cfg.n_continuous, device=device)}
    if isinstance(module, TOTALVIModule):
        batch["y"] = torch.ones(n, cfg.n_proteins, device=device)
        batch["y_mask"] = torch.ones(n, cfg.n_proteins, dtype=torch.bool, device=device)
    return batch


@pytest.mark.parametrize("kind", ["scvi", "scvi-covariates", "totalvi"])
@pytest.mark.parametrize("where", ["surgery on the CPU, then .to(cuda)", "surgery on the device"])
def test_query_step_on_fake_cuda_touches_no_cpu_tensor(kind: str, where: str) -> None:
    torch.manual_seed(0)
    module = MODULES[kind]()
    on_cpu = where.startswith("surgery on the CPU")
    if on_cpu:  # real CPU tensors (fake ones created in the mode could not be moved by nn.Module.to)
        names = {_registered(module)[id(b)] for b in add_category_blocks(module, _new_rows(module))}
    with fake_cuda():
        if on_cpu:
            module.to("cuda")
        else:
            module.to("cuda")
            new = add_category_blocks(module, _new_rows(module))
            names = {_registered(module)[id(b)] for b in new}
        params = dict(module.named_parameters())
        # .to() may replace parameter objects: freeze by what the module holds now
        apply_freezing(module, [params[n] for n in names], SurgeryOptions())
        trainable = trainable_parameters(module)
        assert trainable and {_registered(module)[id(p)] for p in trainable} == names | _released_by_default(module)
        optimizer = make_optimizer(trainable, TrainConfig(max_epochs=1), CUDA)
        # training-mode batch norm needs a CUDA runtime under fake tensors: eval mode checks the same tensors
        module.train(not any(isinstance(m, nn.BatchNorm1d) for m in module.modules()))
        with torch.no_grad():  # (autograd itself needs a real CUDA runtime: the backward runs on meta below)
            terms = module.loss(_batch(module), kl_weight=0.5)
            for p in trainable:
                p.grad = torch.ones_like(p)
        optimizer.step()
        assert terms.loss.device == CUDA and devices_of(terms.extra or {}) <= {CUDA}
        assert devices_of([p for p in module.parameters()] + list(module.buffers())) == {CUDA}
        assert devices_of(optimizer.exp_avg + optimizer.exp_avg_sq) == {CUDA}


@pytest.mark.parametrize("kind", ["scvi", "scvi-covariates", "totalvi"])
def test_query_step_with_backward_on_meta(kind: str) -> None:
    """Loss, backward and optimizer step where the module lives (meta: tensors without data, with autograd)."""
    module = MODULES[kind]().to("meta")
    new = add_category_blocks(module, _new_rows(module))
    apply_freezing(module, new, SurgeryOptions())
    optimizer = make_optimizer(trainable_parameters(module), TrainConfig(max_epochs=1), torch.device("meta"))
    module.train()
    terms = module.loss(_batch(module, device=torch.device("meta")), kl_weight=0.5)
    terms.loss.backward()
    optimizer.step()
    assert all(p.grad is not None and p.grad.device.type == "meta" for p in new)
    assert all(p.grad is None for p in module.parameters() if not p.requires_grad)


def test_reference_step_on_fake_cuda_for_scanvi_classifier() -> None:
    """scANVI's loss selects labelled cells with data-dependent shapes (no fake tensor can), so its surgery
    and its classifier / label stacks are checked here; its full step runs in the ``gpu`` tests."""
    module = MODULES["scanvi"]()
    with fake_cuda():
        module.to("cuda")
        new = add_category_blocks(module, _new_rows(module))
        apply_freezing(module, new, SurgeryOptions(freeze_classifier=False))
        batch = _batch(module)
        with torch.no_grad():
            logits = module.classify(batch)
            nll, kl = module.z2_terms(module.inference(batch)["z"], torch.zeros(6, dtype=torch.long, device=CUDA))
        assert devices_of([logits, nll, kl]) == {CUDA}


def test_loader_minibatches_and_frozen_fields_on_fake_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """Everything a minibatch carries — counts, codes, library sizes, the frozen first layer's output —
    arrives on the training device, whether the cells are CSR or dense and the rows contiguous or not.
    Host-held CSR rows are gathered on the host (the compiled gather, which allocates with numpy and so
    works under the fake mode; the pure-torch gather's output size depends on the data)."""
    if ops.native_module() is None:
        pytest.skip("the host-side CSR gather under a fake-tensor mode needs the compiled kernels")
    monkeypatch.delenv("ATLASMAP_KERNEL", raising=False)
    ref, query = split_by_batch(simulate(n_cells=160))
    reference = atlasmap.SCVI(ref, batch_key="batch", **SMALL)
    reference.is_trained = True
    model = atlasmap.SCVI.load_query_data(query, reference)
    cells = model._cells(training=True)
    csr = cells.counts if sp.issparse(cells.counts) else sp.csr_matrix(cells.counts.numpy())
    for counts in (csr, torch.from_numpy(csr.toarray())):
        source = CellData(counts, dict(cells.fields))
        module = copy.deepcopy(model.module)
        with fake_cuda():
            module.to("cuda")
            with_fields = with_frozen_fields(module, source)
            assert set(with_fields.fields) > set(source.fields)  # the frozen first layer, the lgamma term
            for rows in (np.arange(5, 25), np.array([3, 1, 40, 7])):
                batch = with_fields.batch(rows, CUDA)
                assert devices_of(batch) == {CUDA}, {k: v.device for k, v in batch.items()}


def test_table_lookup_backward_for_cuda_equals_index_add() -> None:
    """On CUDA the covariate lookup's gradient is a one-hot matmul (``index_add_`` adds with atomics in a
    run-dependent order there); it must be the same gradient, exactly for these small integer-valued sums."""
    from atlasmap.nn.layers import _TableRows

    torch.manual_seed(0)
    table = torch.randn(7, 5, requires_grad=True)
    codes = torch.tensor([0, 3, 3, 6, 0, 1, 3, 3])
    grad = torch.randint(-4, 5, (8, 5)).float()
    _TableRows.apply(table, codes).backward(grad)
    via_matmul, table.grad = table.grad.clone(), None
    table.index_select(0, codes).backward(grad)
    assert torch.equal(via_matmul, table.grad)
    assert torch.equal(_TableRows.apply(table, codes), table.index_select(0, codes))
