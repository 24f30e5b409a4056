"""atlasmap.training.optim.Adam against torch.optim.Adam, and what it spares a process."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from atlasmap import ops
from atlasmap.training.optim import Adam


def make_params(seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=g)) for shape in ((3, 70_001), (1, 5), (17,))]


@pytest.mark.parametrize("compiled", [True, False])
def test_adam_matches_torch_adam(compiled: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Same trajectory as torch.optim.Adam over several steps (weight decay on; one tensor without a gradient
    in some steps keeps its own step count), through the compiled kernel and through the foreach fallback."""
    if compiled and not ops.available():
        pytest.skip("the compiled kernels are not installed")
    if not compiled:
        monkeypatch.setenv("ATLASMAP_KERNEL", "0")
    ours, theirs = make_params(0), make_params(0)
    kwargs = dict(lr=3e-3, eps=0.01, weight_decay=1e-2)
    opt = Adam(ours, **kwargs)
    assert opt._compiled == compiled
    ref = torch.optim.Adam(theirs, **kwargs)
    g = torch.Generator().manual_seed(1)
    for step in range(6):
        grads = [torch.randn(p.shape, generator=g) * 10 ** (i - 1) for i, p in enumerate(ours)]
        for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
            skip = i == 1 and step in (1, 2)
            a.grad = None if skip else grads[i].clone()
            b.grad = None if skip else grads[i].clone()
        opt.step()
        ref.step()
        opt.zero_grad()
        ref.zero_grad()
    for a, b, start in zip(ours, theirs, make_params(0), strict=True):
        assert not torch.equal(a, start)  # it moved
        torch.testing.assert_close(a.detach(), b.detach(), rtol=2e-6, atol=2e-7)
    assert opt.steps.tolist() == [6, 4, 6]


def test_training_and_mapping_do_not_import_torch_dynamo_or_sympy() -> None:
    """torch.optim.Adam's constructor imports torch._dynamo (~0.8 s) and a meta-device randn imports sympy
    (~0.2 s, load_model's size check): training, saving and mapping a query must import neither."""
    code = (
        "import sys, tempfile, atlasmap\n"
        "from atlasmap.datasets import simulate_counts\n"
        "a = simulate_counts(300, 50, n_batches=3, n_cell_types=2, seed=0)\n"
        "ref, query = a[a.obs['batch'] != 'batch2'].copy(), a[a.obs['batch'] == 'batch2'].copy()\n"
        "m = atlasmap.SCVI(ref, batch_key='batch', n_hidden=16, n_latent=4)\n"
        "m.train(max_epochs=1, progress_bar=False)\n"
        "d = tempfile.mkdtemp() + '/ref'\n"
        "m.save(d)\n"
        "atlasmap.SCVI.load_query_data(query, d).train(max_epochs=1, progress_bar=False)\n"
        "print('torch._dynamo' in sys.modules, 'sympy' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False False"
