"""Per-call time of atlasmap.ops' entry points as the training step calls them (one thread).

Each operation is timed at the training-step size (NB/ZINB likelihood of both decoder heads at 128 x 2000,
a layer at 128 x 128, the latent sample at 128 x 30, Adam over a reference model's 21 tensors) and at a
1 x 1 size, where the time is the boundary's own cost (argument checks, ``tensor.numpy()`` views, the
call), and by the raw compiled function with the arrays already converted. CPU time (process_time),
the best of 15 repeats (robust to other processes on the machine)::

    python benchmarks/bench_ops_overhead.py
"""

from __future__ import annotations

import time
import timeit

import numpy as np
import torch

from atlasmap import ops


def per_call_us(fn, number: int) -> float:  # noqa: ANN001
    fn()
    return min(timeit.repeat(fn, number=number, repeat=15, timer=time.process_time)) / number * 1e6


def nb_case(n: int, g: int) -> tuple:
    gen = torch.Generator().manual_seed(0)
    x = torch.poisson(torch.rand(n, g, generator=gen))
    heads = torch.randn(n, 2 * g, generator=gen)
    log_lib = torch.log(x.sum(1) + 10)
    theta, const, cell = torch.rand(g, generator=gen) + 0.5, torch.rand(n), torch.rand(n)
    out = (torch.empty_like(heads), None)

    def entry() -> None:
        ops.nb_nll_heads(x, heads, log_lib, theta, True, const, cell, need_theta=False, out=out)

    lib = ops.native_module()
    h, d, nll = heads.numpy(), out[0].numpy(), np.empty(n, np.float32)
    xa, la, ta, ca, cc = x.numpy(), log_lib.numpy(), theta.numpy(), const.numpy(), cell.numpy()

    def raw() -> None:
        lib.nb_nll(x=xa, theta=ta, nll=nll, logits=h[:, :g], log_library=la, pi=h[:, g:], const=ca, lgamma_cell=cc,
                   grad_logits=d[:, :g], grad_pi=d[:, g:])

    return entry, raw


def layer_case(n: int, h: int) -> tuple:
    pre, cat, block = torch.randn(n, h), torch.randint(0, 3, (n, 1)), torch.randn(3, h)
    blocks = ops.CovariateBlocks([[block]], [[torch.empty(3, h)]])
    factor = torch.rand(n, h)

    def forward() -> None:
        ops.layer_forward(pre, cat, blocks, layer_norm=True, ln_eps=1e-5, p=0.1, factor=factor)

    grad = torch.randn(n, h)
    saved = []

    def backward() -> None:
        if not saved:  # as in the training step: the backward follows its layer's forward
            saved.extend(ops.layer_forward(pre, cat, blocks, layer_norm=True, ln_eps=1e-5, p=0.1, factor=factor)[:2])
        ops.layer_backward(grad, saved[0], saved[1], factor, cat, blocks, layer_norm=True)

    lib = ops.native_module()
    views = blocks.native()[0]
    pa, ca, fa = pre.numpy(), cat.numpy(), factor.numpy()
    ya, ra, oa = np.empty((n, h), np.float32), np.empty(n, np.float32), np.empty((n, h), np.float32)

    def raw() -> None:
        lib.layer_forward(pre=pa, codes=ca, blocks=views, layer_norm=True, ln_eps=1e-5, p=0.1, factor=fa, y=ya, rstd=ra,
                          out=oa)

    return forward, backward, raw


def main() -> None:
    torch.set_num_threads(1)
    if not ops.available():
        raise SystemExit("the compiled kernels are not available")
    rows = []
    for n, g in ((128, 2000), (1, 1)):
        entry, raw = nb_case(n, g)
        rows.append((f"nb_nll_heads {n} x {g} (ZINB)", per_call_us(entry, 300 if n > 1 else 20000),
                     per_call_us(raw, 300 if n > 1 else 20000)))
    for n, h in ((128, 128), (1, 1)):
        fwd, bwd, raw = layer_case(n, h)
        number = 3000 if n > 1 else 20000
        rows.append((f"layer_forward {n} x {h}", per_call_us(fwd, number), per_call_us(raw, number)))
        rows.append((f"layer_backward {n} x {h}", per_call_us(bwd, number), float("nan")))
    mv, noise = torch.randn(128, 60), torch.randn(128, 30)
    rows.append(("latent_forward 128 x 30", per_call_us(lambda: ops.latent_forward(mv, noise, 1e-4), 20000),
                 float("nan")))
    shapes = [(128, 2000), (128,), (3, 128), (128, 128), (128,), (4, 128)] * 3 + [(2000, 128), (2000,), (2000,)]
    params = ops.TensorGroup([torch.randn(s) for s in shapes])
    grads = ops.TensorGroup([torch.randn(s) for s in shapes])
    m, v = ops.TensorGroup([torch.zeros(s) for s in shapes]), ops.TensorGroup([torch.zeros(s) for s in shapes])
    ss, b2 = np.full(len(shapes), 1e-3, np.float32), np.ones(len(shapes), np.float32)
    rows.append((f"adam_step, {len(shapes)} tensors", per_call_us(lambda: ops.adam_step(
        params, grads, m, v, step_size=ss, bias2_sqrt=b2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0), 1000),
        float("nan")))
    from atlasmap.training.optim import Adam

    trained = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    for p in trained:
        p.grad = torch.randn(p.shape)
    rows.append((f"Adam.step (whole: bookkeeping + adam_step), {len(shapes)} tensors",
                 per_call_us(Adam(trained).step, 1000), float("nan")))
    rows.append(("uniform 128 x 128", per_call_us(lambda: ops.uniform(128, 128), 5000), float("nan")))
    print("| operation | entry point, us/call | compiled function alone, us/call |\n|---|---:|---:|")
    for name, entry_us, raw_us in rows:
        print(f"| {name} | {entry_us:.2f} | {'' if raw_us != raw_us else f'{raw_us:.2f}'} |")


if __name__ == "__main__":
    main()
