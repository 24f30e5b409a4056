"""atlasmap.ops: every compiled operation against its pure-PyTorch reference, the references against
autograd of a straightforward formula, the argument checks of the extension module, dispatch (reference
for other devices / dtypes and with ATLASMAP_KERNEL=0), and the references on the meta device."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from atlasmap import ops
from atlasmap.errors import InputError
from atlasmap.nn import likelihoods as L
from atlasmap.ops import reference as R

NATIVE = ops.native_module()
needs_native = pytest.mark.skipif(NATIVE is None, reason="atlasmap.ops._native is not built")


@pytest.fixture(autouse=True)
def kernels_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts with the kernels enabled (whatever the environment says); tests switch them off."""
    monkeypatch.delenv("ATLASMAP_KERNEL", raising=False)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    if expected.numel() == 0:
        return 0.0
    scale = float(expected.double().abs().max()) or 1.0
    return float((actual.double() - expected.double()).abs().max()) / scale


def close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5) -> None:
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    err = rel_err(actual, expected)
    assert err <= rtol, f"max error {err:.3g} relative to the largest magnitude"


def counts(n: int, g: int, seed: int = 0, *, empty_rows: tuple[int, ...] = (1,), large: bool = True) -> torch.Tensor:
    """NB counts with zero rows, small (vector path), medium (finite sums), large and non-integer values."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.distributions.NegativeBinomial(1.5, probs=torch.rand(n, g, generator=gen) * 0.8).sample()
    if large and g >= 8:
        x[0, :8] = torch.tensor([1.0, 8.0, 9.0, 16.0, 17.0, 250.0, 2.5, 3000.0])
    for r in empty_rows:
        if r < n:
            x[r] = 0.0
    return x


def nb_inputs(n: int = 37, g: int = 129, seed: int = 0, theta_kind: str = "gene") -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed + 1)
    x = counts(n, g, seed)
    shape = {"gene": (g,), "row": (1, g), "entry": (n, g)}[theta_kind]
    theta = torch.rand(shape, generator=gen) * 8 + 0.01
    if theta_kind == "gene":
        theta[:4] = torch.tensor([1e-3, 1e3, 1e6, 0.05])
    return {
        "x": x, "mu": torch.rand(n, g, generator=gen) * 30 + 1e-3, "theta": theta,
        "pi": torch.randn(n, g, generator=gen) * 2, "logits": torch.randn(n, g, generator=gen) * 2,
        "log_library": torch.log(x.sum(1) + 20), "const": torch.rand(n, generator=gen) * 10,
    }


class Recorder:
    """Stands in for the compiled module: records which functions were called, computes nothing."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)

        def call(**_: Any) -> int:
            self.calls.append(name)
            return 0

        return call


# ---------------------------------------------------------------------------------------------- likelihood
@needs_native
@pytest.mark.parametrize("zero_inflated", [True, False])
@pytest.mark.parametrize("theta_kind", ["gene", "row", "entry"])
def test_nb_nll_native_matches_reference(zero_inflated: bool, theta_kind: str) -> None:
    t = nb_inputs(theta_kind=theta_kind)
    pi = t["pi"] if zero_inflated else None
    for need in ((False, False, False), (True, False, False), (True, True, True), (False, True, False)):
        for const in (t["const"], None):
            got = ops.nb_nll(t["x"], t["mu"], t["theta"], pi, const, None, need)
            want = R.nb_nll(t["x"], t["mu"], t["theta"], pi, const, None, need)
            for a, b in zip(got, want, strict=True):
                assert (a is None) == (b is None)
                if a is not None:
                    close(a, b, 2e-5)
    # the precomputed dispersion term
    cell = R.lgamma_theta_sum(t["x"], t["theta"])
    close(ops.nb_nll(t["x"], t["mu"], t["theta"], pi, t["const"], cell)[0],
          R.nb_nll(t["x"], t["mu"], t["theta"], pi, t["const"], None)[0])


@needs_native
@pytest.mark.parametrize("zero_inflated", [True, False])
@pytest.mark.parametrize("theta_kind", ["gene", "entry"])
def test_nb_nll_logits_native_matches_reference(zero_inflated: bool, theta_kind: str) -> None:
    t = nb_inputs(theta_kind=theta_kind, seed=3)
    pi = t["pi"] if zero_inflated else None
    need = (True, True, True, zero_inflated)
    got = ops.nb_nll_logits(t["x"], t["logits"], t["log_library"], t["theta"], pi, t["const"], None, need)
    want = R.nb_nll_logits(t["x"], t["logits"], t["log_library"], t["theta"], pi, t["const"], None, need)
    for a, b in zip(got, want, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            close(a, b, 5e-5)


@pytest.mark.parametrize("zero_inflated", [True, False])
@pytest.mark.parametrize("need_theta", [True, False])
def test_nb_nll_heads_reads_column_ranges(zero_inflated: bool, need_theta: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """heads n x 2g (row stride 2g > g): the same as nb_nll_logits on the two column ranges, into given
    buffers; native and reference agree."""
    t = nb_inputs(seed=5)
    n, g = t["x"].shape
    heads = torch.cat([t["logits"], t["pi"]], 1) if zero_inflated else t["logits"].clone()
    cell = None if need_theta else R.lgamma_theta_sum(t["x"], t["theta"])
    results = []
    for enabled in ([True] if NATIVE is not None else []) + [False]:
        if not enabled:
            monkeypatch.setenv("ATLASMAP_KERNEL", "0")
        out = (torch.full_like(heads, 7.0), torch.full((n, g), 7.0) if need_theta else None)
        nll, grad, g_theta = ops.nb_nll_heads(t["x"], heads, t["log_library"], t["theta"], zero_inflated,
                                              t["const"], cell, need_theta=need_theta, out=out)
        assert grad is out[0] and (g_theta is out[1] if need_theta else g_theta is None)
        results.append((nll, grad, g_theta))
    pi = t["pi"] if zero_inflated else None
    want = R.nb_nll_logits(t["x"], t["logits"], t["log_library"], t["theta"], pi, t["const"], cell,
                           (True, False, need_theta, zero_inflated))
    for nll, grad, g_theta in results:
        close(nll, want[0], 2e-5)
        close(grad[:, :g], want[1], 5e-5)
        if zero_inflated:
            close(grad[:, g:], want[4], 5e-5)
        if need_theta:
            close(g_theta, want[3], 5e-5)


@needs_native
def test_nb_nll_edge_cases() -> None:
    """All-zero minibatch, one cell, one gene, no genes, no cells: native equals reference (no crash)."""
    for n, g in ((5, 7), (1, 9), (6, 1), (4, 0), (0, 6)):
        x = torch.zeros(n, g) if n != 1 else counts(1, g, empty_rows=())
        mu, theta = torch.rand(n, g) + 0.1, torch.rand(g) + 0.5
        pi, const = torch.randn(n, g), torch.rand(n)
        for p in (pi, None):
            got = ops.nb_nll(x, mu, theta, p, const, None, (True, True, p is not None))
            want = R.nb_nll(x, mu, theta, p, const, None, (True, True, p is not None))
            for a, b in zip(got, want, strict=True):
                if a is not None:
                    close(a, b, 2e-5)
        got = ops.nb_nll_logits(x, mu.log(), torch.zeros(n), theta, None, const, None, (True, True, False, False))
        want = R.nb_nll_logits(x, mu.log(), torch.zeros(n), theta, None, const, None, (True, True, False, False))
        for a, b in zip(got, want, strict=True):
            if a is not None:
                close(a, b, 2e-5)


@pytest.mark.parametrize("zero_inflated", [True, False])
def test_reference_gradients_match_float64_autograd(zero_inflated: bool) -> None:
    """The reference's hand-written gradients against autograd through log_zinb / log_nb (float64)."""
    t = nb_inputs(seed=7)
    pi = t["pi"] if zero_inflated else None
    nll, g_mu, g_theta, g_pi = R.nb_nll(t["x"], t["mu"], t["theta"], pi, None, None, (True, True, zero_inflated))
    leaves = [v.double().requires_grad_(True) if v is not None else None for v in (t["mu"], t["theta"], pi)]
    xd = t["x"].double()
    logp = L.log_zinb(xd, *leaves) if zero_inflated else L.log_nb(xd, leaves[0], leaves[1])
    want = -(logp + torch.lgamma(xd + 1)).sum(-1)
    want.sum().backward()
    close(nll, want.detach(), 1e-5)
    close(g_mu, leaves[0].grad, 2e-5)
    close(g_theta.sum(0), leaves[1].grad, 2e-5)
    if zero_inflated:
        close(g_pi, leaves[2].grad, 2e-5)
    # the softmax form
    logits, lib = t["logits"].double().requires_grad_(True), t["log_library"].double().requires_grad_(True)
    mu = torch.exp(lib)[:, None] * torch.softmax(logits, -1)
    logp = L.log_zinb(xd, mu, t["theta"].double(), None if pi is None else pi.double()) if zero_inflated else \
        L.log_nb(xd, mu, t["theta"].double())
    (-logp.sum()).backward()
    _, g_logits, g_lib, _, _ = R.nb_nll_logits(t["x"], t["logits"], t["log_library"], t["theta"], pi, None, None,
                                              (True, True, False, False))
    close(g_logits, logits.grad, 5e-5)
    close(g_lib, lib.grad, 5e-5)


@needs_native
@pytest.mark.parametrize("theta_kind", ["gene", "entry"])
def test_lgamma_theta_sum_native_matches_reference(theta_kind: str) -> None:
    t = nb_inputs(theta_kind=theta_kind, seed=9)
    close(ops.lgamma_theta_sum(t["x"], t["theta"]), R.lgamma_theta_sum(t["x"], t["theta"]), 1e-6)
    xd, td = t["x"].double(), t["theta"].double()
    close(R.lgamma_theta_sum(t["x"], t["theta"]), (torch.lgamma(xd + td) - torch.lgamma(td)).sum(-1), 1e-6)


# ---------------------------------------------------------------------------------------------- CSR counts
def random_csr(n: int, g: int, seed: int) -> sp.csr_matrix:
    dense = counts(n, g, seed, empty_rows=(0, 3, n - 1)).numpy()
    csr = sp.csr_matrix(dense)
    csr.data[:3] = 0.0  # explicit zeros stay zeros
    return csr


def csr_arrays(csr: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return csr.indptr.astype(np.int64), csr.indices.astype(np.int32), csr.data.astype(np.float32)


@needs_native
def test_csr_ops_native_match_reference() -> None:
    csr = random_csr(90, 211, 0)
    indptr, indices, data = csr_arrays(csr)
    dense = torch.from_numpy(csr.toarray())
    theta = torch.exp(torch.randn(211, generator=torch.Generator().manual_seed(0)) * 2)
    t = [torch.from_numpy(a) for a in (indptr, indices, data)]
    for chunk in (50, 1 << 22):  # reference chunks of a few rows, and one
        close(ops.lgamma_theta_sum_csr(indptr, indices, data, theta), R.lgamma_theta_sum_csr(*t, theta, chunk), 1e-6)
        close(ops.log_factorial_rows(indptr, data), R.log_factorial_rows(t[0], t[2], chunk), 1e-6)
    close(ops.lgamma_theta_sum_csr(indptr, indices, data, theta), R.lgamma_theta_sum(dense, theta), 1e-6)
    close(ops.log_factorial_rows(indptr, data), torch.lgamma(dense.double() + 1).sum(1), 1e-6)
    rows = np.array([5, 0, 3, 89, 5, 17], dtype=np.int64)
    got = ops.gather_rows(indptr, indices, data, 211, rows)
    assert torch.equal(got, R.gather_rows(*t, 211, torch.from_numpy(rows)))
    assert torch.equal(got, dense[rows])
    assert ops.gather_rows(indptr, indices, data, 211, np.zeros(0, dtype=np.int64)).shape == (0, 211)


def test_csr_ops_take_any_index_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    """int32 indptr / int64 indices / float64 data (what the kernels do not read) go to the reference."""
    csr = random_csr(20, 31, 1)
    dense = torch.from_numpy(csr.toarray())
    ip, ind, data = csr.indptr.astype(np.int32), csr.indices.astype(np.int64), csr.data.astype(np.float64)
    rows = np.array([2, 19, 2])
    assert torch.equal(ops.gather_rows(ip, ind, data, 31, rows), dense[rows].double())
    close(ops.log_factorial_rows(ip, data), torch.lgamma(dense.double() + 1).sum(1), 1e-6)


@needs_native
def test_count_flags_native_matches_reference() -> None:
    rng = np.random.default_rng(0)
    for size in (1, 13, (1 << 16) + 3):
        ok = rng.poisson(2.0, size).astype(np.float32)
        assert ops.count_flags(ok) == R.count_flags(torch.from_numpy(ok)) == 0
        for bad in (np.nan, np.inf, -np.inf, -2.0, 0.25, 1e-40, 2.0**24 + 2, 2.0**24):
            v = ok.copy()
            v[size // 2] = bad
            assert ops.count_flags(v) == R.count_flags(torch.from_numpy(v)), bad
    fortran = np.asfortranarray(rng.poisson(2.0, (30, 7)).astype(np.float32))
    fortran[3, 2] = 0.5
    assert ops.count_flags(fortran) == R.count_flags(torch.from_numpy(np.ascontiguousarray(fortran))) == 4


# ---------------------------------------------------------------------------------------------- random, Adam
def test_uniform_reference_is_the_kernel_bit_for_bit(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(5)
    first = ops.uniform(33, 71)
    monkeypatch.setenv("ATLASMAP_KERNEL", "0")
    torch.manual_seed(5)
    assert torch.equal(ops.uniform(33, 71), first)  # compiled or not, the same values for a seed
    assert first.dtype == torch.float32 and first.min() >= 0 and first.max() < 1
    for seed in (0, 1, -(2**63), 2**63 - 1, -12345):
        want = R.uniform(4, 5, seed)
        if NATIVE is not None:
            got = torch.empty(4, 5)
            NATIVE.uniform(out=got.numpy(), seed=seed)
            assert torch.equal(got, want), seed


@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
def test_adam_step_native_and_reference_match_torch_adam(weight_decay: float, monkeypatch: pytest.MonkeyPatch) -> None:
    gen = torch.Generator().manual_seed(0)
    shapes = ((3, 40_001), (5,), (2, 3))
    start = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(4)]
    theirs = [torch.nn.Parameter(p.clone()) for p in start]
    opt = torch.optim.Adam(theirs, lr=1e-2, eps=1e-3, weight_decay=weight_decay)
    for step_grads in grads:
        for p, g in zip(theirs, step_grads, strict=True):
            p.grad = g.clone()
        opt.step()
    for enabled in ([True] if NATIVE is not None else []) + [False]:
        if not enabled:
            monkeypatch.setenv("ATLASMAP_KERNEL", "0")
        params = [p.clone() for p in start]
        m, v = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
        groups = [ops.TensorGroup(ts) for ts in (params, m, v)]
        for k, step_grads in enumerate(grads, start=1):
            step_size = np.full(3, 1e-2 / (1 - 0.9**k), dtype=np.float32)
            bias2 = np.full(3, np.sqrt(1 - 0.999**k), dtype=np.float32)
            ops.adam_step(groups[0], step_grads, groups[1], groups[2], step_size=step_size, bias2_sqrt=bias2,
                          beta1=0.9, beta2=0.999, eps=1e-3, weight_decay=weight_decay)
        for ours, ref in zip(params, theirs, strict=True):
            torch.testing.assert_close(ours, ref.detach(), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- stack
def layer_inputs(n: int = 29, h: int = 40, seed: int = 0) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed)
    tables = [[torch.randn(3, h, generator=gen), torch.randn(2, h, generator=gen)], [torch.randn(4, h, generator=gen)]]
    codes = torch.stack([torch.randint(0, 5, (n,), generator=gen), torch.randint(0, 4, (n,), generator=gen),
                         torch.zeros(n, dtype=torch.int64)], 1)  # a third column no table reads
    return {"pre": torch.randn(n, h, generator=gen), "codes": codes, "tables": tables,
            "u": torch.rand(n, h, generator=gen), "grad": torch.randn(n, h, generator=gen)}


@needs_native
@pytest.mark.parametrize("layer_norm", [True, False])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("n_cov", [0, 1, 2])
def test_layer_ops_native_match_reference(layer_norm: bool, p: float, n_cov: int) -> None:
    t = layer_inputs()
    tables = t["tables"][:n_cov]
    grads = [[torch.full_like(b, 9.0) if (j, i) != (0, 0) else None for i, b in enumerate(blocks)]
             for j, blocks in enumerate(tables)]
    ref_grads = [[None if g is None else g.clone() for g in gs] for gs in grads]
    codes = t["codes"] if n_cov else None
    f1, f2 = (t["u"].clone(), t["u"].clone()) if p > 0 else (None, None)
    blocks = ops.CovariateBlocks(tables, grads)
    y1, r1, o1 = ops.layer_forward(t["pre"], codes, blocks, layer_norm=layer_norm, ln_eps=1e-5, p=p, factor=f1)
    y2, r2, o2 = R.layer_forward(t["pre"], codes, tables, layer_norm, 1e-5, p, f2)
    close(y1, y2, 1e-6)
    close(o1, o2, 1e-6)
    if layer_norm:
        close(r1, r2, 1e-6)
    if p > 0:
        assert torch.equal(f1, f2)
    g1 = ops.layer_backward(t["grad"].clone(), y1, r1, f1, codes, blocks, layer_norm=layer_norm)
    g2 = R.layer_backward(t["grad"].clone(), y2, r2, f2, layer_norm, codes, tables, ref_grads)
    close(g1, g2, 1e-5)
    for a, b in zip([g for gs in grads for g in gs], [g for gs in ref_grads for g in gs], strict=True):
        if a is not None:
            close(a, b, 1e-5)


@pytest.mark.parametrize("layer_norm", [True, False])
@pytest.mark.parametrize("dropout", [True, False])
def test_layer_reference_matches_autograd(layer_norm: bool, dropout: bool) -> None:
    """pre + table lookups -> F.layer_norm -> relu -> * factor, differentiated by autograd (float64)."""
    t = layer_inputs(seed=2)
    p = 0.25
    factor = t["u"].clone() if dropout else None
    y, rstd, out = R.layer_forward(t["pre"], t["codes"], t["tables"], layer_norm, 1e-5, p, factor)
    grads = [[torch.empty_like(b) for b in blocks] for blocks in t["tables"]]
    d_pre = R.layer_backward(t["grad"].clone(), y, rstd, factor, layer_norm, t["codes"], t["tables"], grads)
    pre = t["pre"].double().requires_grad_(True)
    blocks = [[b.double().requires_grad_(True) for b in bs] for bs in t["tables"]]
    z = pre
    for j, bs in enumerate(blocks):
        z = z + torch.cat(bs).index_select(0, t["codes"][:, j])
    if layer_norm:
        z = F.layer_norm(z, (z.shape[1],), eps=1e-5)
    act = torch.relu(z)
    if dropout:
        act = act * ((t["u"] >= p).double() / (1 - p))
        assert torch.equal(factor, ((t["u"] >= p).float() / (1 - p)))
    close(out, act.detach(), 1e-5)
    (act * t["grad"].double()).sum().backward()
    close(d_pre, pre.grad, 1e-5)
    for got, leaf in zip([g for gs in grads for g in gs], [b for bs in blocks for b in bs], strict=True):
        close(got, leaf.grad, 1e-5)


def test_layer_ops_reject_codes_outside_their_table(monkeypatch: pytest.MonkeyPatch) -> None:
    t = layer_inputs()
    codes = t["codes"].clone()
    codes[4, 1] = 4  # covariate 1 has 4 categories
    for enabled in ([True] if NATIVE is not None else []) + [False]:
        if not enabled:
            monkeypatch.setenv("ATLASMAP_KERNEL", "0")
        with pytest.raises(InputError, match="outside its covariate table"):
            ops.layer_forward(t["pre"], codes, t["tables"], layer_norm=True, ln_eps=1e-5, p=0.0)
        y = torch.rand_like(t["pre"])
        blocks = ops.CovariateBlocks(t["tables"], [[torch.empty_like(b) for b in bs] for bs in t["tables"]])
        with pytest.raises(InputError, match="outside its covariate table"):
            ops.layer_backward(t["grad"].clone(), y, torch.ones(len(y)), None, codes, blocks, layer_norm=True)
        codes[4, 1] = -1
        with pytest.raises(InputError, match="outside its covariate table"):
            ops.layer_forward(t["pre"], codes, t["tables"], layer_norm=False, ln_eps=1e-5, p=0.0)
        codes[4, 1] = 4


@needs_native
def test_latent_ops_native_match_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    n, n_latent = 31, 10
    mv, noise, dz = torch.randn(n, 2 * n_latent, generator=gen) * 2, torch.randn(n, n_latent, generator=gen), \
        torch.randn(n, n_latent, generator=gen)
    z1, v1, k1 = ops.latent_forward(mv, noise, 1e-4)
    z2, v2, k2 = R.latent_forward(mv, noise, 1e-4)
    for a, b in ((z1, z2), (v1, v2), (k1, k2)):
        close(a, b, 1e-6)
    close(ops.latent_backward(dz, mv, v1, noise, 1e-4, 0.37), R.latent_backward(dz, mv, v2, noise, 1e-4, 0.37), 1e-6)


def test_latent_reference_matches_autograd() -> None:
    gen = torch.Generator().manual_seed(1)
    n, n_latent, kl_scale = 17, 6, 0.3
    mv, noise, dz = torch.randn(n, 2 * n_latent, generator=gen), torch.randn(n, n_latent, generator=gen), \
        torch.randn(n, n_latent, generator=gen)
    z, var, kl = R.latent_forward(mv, noise, 1e-4)
    dmv = R.latent_backward(dz, mv, var, noise, 1e-4, kl_scale)
    leaf = mv.double().requires_grad_(True)
    mean, v = leaf[:, :n_latent], leaf[:, n_latent:]
    var_d = torch.exp(v) + 1e-4
    z_d = mean + var_d.sqrt() * noise.double()
    kl_d = 0.5 * (var_d + mean**2 - 1 - torch.log(var_d)).sum(-1)
    close(z, z_d.detach(), 1e-6)
    close(kl, kl_d.detach(), 1e-6)
    ((z_d * dz.double()).sum() + kl_scale * kl_d.sum()).backward()
    close(dmv, leaf.grad, 1e-5)


# ---------------------------------------------------------------------------------------------- argument checks
def arrays_for_nb(n: int = 6, g: int = 5) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.poisson(1.0, (n, g)).astype(np.float32)
    return {"x": x, "mu": rng.random((n, g), dtype=np.float32) + 0.1, "theta": np.ones(g, np.float32),
            "nll": np.empty(n, np.float32)}


BAD_NB = [
    ({"x": np.zeros((6, 5))}, TypeError, "x: expected float32"),  # float64
    ({"x": [[0.0] * 5] * 6}, TypeError, "x: expected a float32 array"),  # not a buffer
    ({"x": np.zeros((6, 5), np.float32)[:, ::-1]}, ValueError, "x: expected a C-contiguous"),
    ({"x": np.zeros(30, np.float32)}, ValueError, "x: expected a 2-D array"),
    ({"mu": np.ones((6, 4), np.float32)}, ValueError, "mu: expected a 2-D array of shape"),
    ({"mu": np.ones((5, 6), np.float32).T}, ValueError, "mu: expected a C-contiguous"),
    ({"theta": np.ones(4, np.float32)}, ValueError, "theta: expected shape"),
    ({"theta": np.ones((6, 5), np.int32)}, TypeError, "theta: expected float32"),
    ({"nll": np.empty(5, np.float32)}, ValueError, "nll: expected a 1-D array of length"),
    ({"nll": np.empty(6, np.float32)[::-1].copy().view()}, None, None),  # a fine output
    ({"const": np.ones(7, np.float32)}, ValueError, "const: expected a 1-D array"),
    ({"grad_mu": np.empty((6, 5), np.float64)}, TypeError, "grad_mu: expected float32"),
    ({"pi": np.ones((6, 10), np.float32)[:, :5], "grad_pi": np.ones((6, 5), np.float32)}, ValueError,
     "grad_pi: expected the row stride of pi"),
    ({"pi": np.ones((6, 10), np.float32)[:, ::2]}, ValueError, "pi: expected contiguous rows"),
    ({"grad_pi": np.ones((6, 5), np.float32)}, ValueError, "grad_pi: only with pi"),
    ({"logits": np.ones((6, 5), np.float32)}, ValueError, "give the mean either as mu or as logits"),
    ({"lgamma_cell": np.ones(6, np.float32), "grad_theta": np.ones((6, 5), np.float32)}, ValueError,
     "lgamma_cell: can only be given when theta needs no gradient"),
    ({"n_threads": 0}, ValueError, "n_threads"),
    ({"n_threads": "two"}, TypeError, "n_threads"),
    ({"bogus": 1}, TypeError, "unexpected keyword argument 'bogus'"),
]


@needs_native
@pytest.mark.parametrize(("change", "error", "message"), BAD_NB)
def test_native_nb_nll_checks_its_arguments(change: dict, error: type | None, message: str | None) -> None:
    args = {**arrays_for_nb(), **change}
    if error is None:
        NATIVE.nb_nll(**args)
        return
    with pytest.raises(error, match=message):
        NATIVE.nb_nll(**args)


@needs_native
def test_native_rejects_read_only_outputs_and_missing_arguments() -> None:
    args = arrays_for_nb()
    read_only = np.empty(6, np.float32)
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match="nll: expected a writable array"):
        NATIVE.nb_nll(**{**args, "nll": read_only})
    ro_x = args["x"].copy()
    ro_x.flags.writeable = False
    NATIVE.nb_nll(**{**args, "x": ro_x})  # read-only inputs are fine
    with pytest.raises(TypeError, match="missing required argument 'nll'"):
        NATIVE.nb_nll(x=args["x"], theta=args["theta"])
    with pytest.raises(TypeError, match="multiple values"):
        NATIVE.nb_nll(args["x"], x=args["x"], theta=args["theta"], nll=args["nll"])
    with pytest.raises(ValueError, match="out: expected a writable array"):
        out = np.empty((3, 4), np.float32)
        out.flags.writeable = False
        NATIVE.uniform(out=out, seed=1)
    with pytest.raises(TypeError, match="seed: expected an int"):
        NATIVE.uniform(out=np.empty(3, np.float32), seed=1.5)


@needs_native
def test_native_csr_functions_check_offsets_rows_and_columns() -> None:
    csr = random_csr(10, 8, 2)
    indptr, indices, data = csr_arrays(csr)
    out = np.empty((3, 8), np.float32)
    rows = np.array([0, 4, 9])
    NATIVE.gather_rows(indptr=indptr, indices=indices, data=data, rows=rows, out=out)
    with pytest.raises(ValueError, match="rows: expected rows in"):
        NATIVE.gather_rows(indptr=indptr, indices=indices, data=data, rows=np.array([0, 10, 1]), out=out)
    with pytest.raises(ValueError, match="rows: expected rows in"):
        NATIVE.gather_rows(indptr=indptr, indices=indices, data=data, rows=np.array([0, -1, 1]), out=out)
    with pytest.raises(ValueError, match="out: expected a 2-D array of shape"):
        NATIVE.gather_rows(indptr=indptr, indices=indices, data=data, rows=rows, out=np.empty((2, 8), np.float32))
    with pytest.raises(TypeError, match="rows: expected int64"):
        NATIVE.gather_rows(indptr=indptr, indices=indices, data=data, rows=rows.astype(np.int32), out=out)
    with pytest.raises(TypeError, match="indices: expected int32"):
        NATIVE.gather_rows(indptr=indptr, indices=indices.astype(np.int64), data=data, rows=rows, out=out)
    with pytest.raises(ValueError, match="n_cols of out"):  # columns beyond out's width
        NATIVE.gather_rows(indptr=indptr, indices=indices, data=data, rows=rows, out=np.empty((3, 4), np.float32))
    bad = indptr.copy()
    bad[5] = bad[-1] + 10  # beyond data
    with pytest.raises(ValueError, match="indptr"):
        NATIVE.gather_rows(indptr=bad, indices=indices, data=data, rows=np.array([4]), out=out[:1])
    with pytest.raises(ValueError, match="indptr"):
        NATIVE.log_factorial_rows(indptr=bad, data=data, out=np.empty(10, np.float32))
    theta = np.ones(8, np.float32)
    with pytest.raises(ValueError, match="indptr"):
        NATIVE.lgamma_theta_sum_csr(indptr=bad, indices=indices, data=data, theta=theta, out=np.empty(10, np.float32))
    with pytest.raises(ValueError, match="indices: expected column indices"):
        NATIVE.lgamma_theta_sum_csr(indptr=indptr, indices=indices, data=data, theta=theta[:3],
                                    out=np.empty(10, np.float32))
    with pytest.raises(ValueError, match="indices: expected the length of data"):
        NATIVE.lgamma_theta_sum_csr(indptr=indptr, indices=indices[:-1], data=data, theta=theta,
                                    out=np.empty(10, np.float32))
    with pytest.raises(ValueError, match="out: expected a 1-D array of length"):
        NATIVE.log_factorial_rows(indptr=indptr, data=data, out=np.empty(9, np.float32))


@needs_native
def test_native_stack_functions_check_their_arguments() -> None:
    n, h = 5, 4
    pre, y, out = (np.zeros((n, h), np.float32) for _ in range(3))
    rstd = np.zeros(n, np.float32)
    codes = np.zeros((n, 1), np.int64)
    blocks = [[np.ones((2, h), np.float32)]]
    kw = dict(pre=pre, codes=codes, blocks=blocks, layer_norm=True, ln_eps=1e-5, p=0.0, factor=None, y=y, rstd=rstd,
              out=out)
    NATIVE.layer_forward(**kw)
    for change, error, message in (
        ({"blocks": [[np.ones((2, h + 1), np.float32)]]}, ValueError, r"blocks\[0\]\[0\]: expected a 2-D array"),
        ({"blocks": [[]]}, ValueError, r"blocks\[0\]: expected at least one block"),
        ({"blocks": [np.ones((2, h), np.float32)]}, ValueError, r"blocks\[0\]\[0\]: expected a 2-D"),  # rows
        ({"codes": codes.astype(np.int32)}, TypeError, "codes: expected int64"),
        ({"codes": np.zeros((n, 0), np.int64)}, ValueError, "codes: expected a 2-D array"),
        ({"codes": None}, TypeError, "codes: expected a int64 array, got None"),
        ({"rstd": None}, TypeError, "rstd"),
        ({"p": 1.0}, ValueError, "p: expected a dropout probability"),
        ({"factor": np.zeros((n, h + 1), np.float32)}, ValueError, "factor"),
        ({"y": np.zeros((n, h), np.float32)[:, ::-1]}, ValueError, "y: expected a C-contiguous"),
    ):
        with pytest.raises(error, match=message):
            NATIVE.layer_forward(**{**kw, **change})
    NATIVE.layer_forward(**{**kw, "codes": None, "blocks": [], "layer_norm": False, "rstd": None})
    with pytest.raises(IndexError, match="outside its covariate table"):
        NATIVE.layer_forward(**{**kw, "codes": np.full((n, 1), 2, np.int64)})
    bkw = dict(grad=np.ones((n, h), np.float32), y=y, rstd=rstd, factor=None, layer_norm=True, codes=codes,
               blocks=blocks, block_grads=[[np.zeros((2, h), np.float32)]])
    NATIVE.layer_backward(**bkw)
    NATIVE.layer_backward(**{**bkw, "block_grads": None})
    with pytest.raises(ValueError, match=r"block_grads\[0\]\[0\]: expected a 2-D array of shape"):
        NATIVE.layer_backward(**{**bkw, "block_grads": [[np.zeros((3, h), np.float32)]]})
    with pytest.raises(ValueError, match="block_grads: expected 1 entries"):
        NATIVE.layer_backward(**{**bkw, "block_grads": []})
    ro = np.zeros((2, h), np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="writable"):
        NATIVE.layer_backward(**{**bkw, "block_grads": [[ro]]})
    mv, noise = np.zeros((n, 6), np.float32), np.zeros((n, 3), np.float32)
    NATIVE.latent_forward(mv=mv, noise=noise, var_eps=1e-4, z=np.empty((n, 3), np.float32),
                          var=np.empty((n, 3), np.float32), kl=np.empty(n, np.float32))
    with pytest.raises(ValueError, match="mv: expected a 2-D array of shape"):
        NATIVE.latent_forward(mv=mv[:, :5].copy(), noise=noise, var_eps=1e-4, z=np.empty((n, 3), np.float32),
                              var=np.empty((n, 3), np.float32), kl=np.empty(n, np.float32))
    with pytest.raises(ValueError, match="dmv"):
        NATIVE.latent_backward(dz=noise, mv=mv, var=noise + 1, noise=noise, var_eps=1e-4, kl_scale=1.0,
                               dmv=np.empty((n, 3), np.float32))


@needs_native
def test_native_adam_checks_its_arguments() -> None:
    p, m, v, g = (np.zeros((3, 4), np.float32) for _ in range(4))
    kw = dict(params=[p], grads=[g], exp_avg=[m], exp_avg_sq=[v], step_size=np.ones(1, np.float32),
              bias2_sqrt=np.ones(1, np.float32), beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
    NATIVE.adam(**kw)
    NATIVE.adam(**{**kw, "grads": [None]})
    for change, error, message in (
        ({"grads": [np.zeros((4, 3), np.float32)]}, ValueError, r"grads\[0\]: expected the shape of params\[0\]"),
        ({"exp_avg": [m, m]}, ValueError, "exp_avg: expected 1 arrays"),
        ({"step_size": np.ones(2, np.float32)}, ValueError, "step_size"),
        ({"params": [p.astype(np.float64)]}, TypeError, r"params\[0\]: expected float32"),
        ({"params": p}, ValueError, "grads: expected 3 arrays"),  # a 2-D array is a sequence of 3 rows
        ({"params": 3}, TypeError, "params: expected a list or tuple"),
        ({"beta1": "x"}, TypeError, "beta1: expected a number"),
    ):
        with pytest.raises(error, match=message):
            NATIVE.adam(**{**kw, **change})


def test_entry_points_work_with_non_contiguous_and_read_only_inputs() -> None:
    """What the kernels do not read (non-contiguous, float64) goes to the reference, whatever the build."""
    t = nb_inputs(seed=11)
    mu_t = t["mu"].t().contiguous().t()
    close(ops.nb_nll(t["x"], mu_t, t["theta"], t["pi"], None, None)[0], R.nb_nll(t["x"], t["mu"], t["theta"],
                                                                             t["pi"], None, None)[0], 1e-5)
    assert not ops.nb_native_applies(t["x"], mu_t, t["theta"], t["pi"])
    x64 = {k: v.double() for k, v in t.items()}
    assert ops.nb_nll(x64["x"], x64["mu"], x64["theta"], None, None, None)[0].dtype == torch.float64
    csr = random_csr(12, 9, 3)
    indptr, indices, data = csr_arrays(csr)
    for a in (indptr, indices, data):
        a.flags.writeable = False
    got = ops.gather_rows(indptr, indices, data, 9, np.array([1, 2]))
    assert torch.equal(got, torch.from_numpy(csr[[1, 2]].toarray()))


# ---------------------------------------------------------------------------------------------- dispatch
def test_kernel_switch_and_other_devices_use_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """With ATLASMAP_KERNEL=0, for float64 and off-CPU tensors, no compiled function is called."""
    recorder = Recorder()
    monkeypatch.setattr(ops, "_NATIVE", recorder)
    t = nb_inputs(n=6, g=9)
    assert ops.available()

    def run_all() -> None:
        ops.nb_nll(t["x"], t["mu"], t["theta"], t["pi"], t["const"], None, (True, True, True))
        ops.nb_nll_logits(t["x"], t["logits"], t["log_library"], t["theta"], None, None, None, (True,) * 4)
        ops.lgamma_theta_sum(t["x"], t["theta"])
        ops.uniform(3, 4)
        lt = layer_inputs(n=6, h=5)
        ops.layer_forward(lt["pre"], lt["codes"], lt["tables"], layer_norm=True, ln_eps=1e-5, p=0.1,
                          factor=lt["u"].clone())
        ops.latent_forward(torch.randn(6, 4), torch.randn(6, 2), 1e-4)

    run_all()
    assert {"nb_nll", "lgamma_theta_sum", "uniform", "layer_forward", "latent_forward"} <= set(recorder.calls)
    recorder.calls.clear()
    monkeypatch.setenv("ATLASMAP_KERNEL", "0")
    assert not ops.available()
    run_all()
    assert recorder.calls == []
    monkeypatch.delenv("ATLASMAP_KERNEL")
    x64 = {k: v.double() for k, v in t.items()}
    ops.nb_nll(x64["x"], x64["mu"], x64["theta"], x64["pi"], None, None, (True, True, True))
    ops.lgamma_theta_sum(x64["x"], x64["theta"])
    assert recorder.calls == []


def meta(t: torch.Tensor) -> torch.Tensor:
    return torch.empty(t.shape, dtype=t.dtype, device="meta")


def test_reference_ops_run_on_the_meta_device() -> None:
    """Shapes only: every entry point with meta tensors goes to the reference, which has no host round trips
    (the data-dependent CSR gather returns its shape)."""
    t = {k: meta(v) for k, v in nb_inputs(n=6, g=9).items()}
    nll, g_mu, g_theta, g_pi = ops.nb_nll(t["x"], t["mu"], t["theta"], t["pi"], t["const"], None, (True, True, True))
    assert nll.is_meta and nll.shape == (6,) and g_mu.shape == g_theta.shape == g_pi.shape == (6, 9)
    out = ops.nb_nll_logits(t["x"], t["logits"], t["log_library"], t["theta"], t["pi"], None, None, (True,) * 4)
    assert [o.shape for o in out] == [(6,), (6, 9), (6,), (6, 9), (6, 9)]
    heads = torch.empty(6, 18, device="meta")
    nll, grad, g_theta = ops.nb_nll_heads(t["x"], heads, t["log_library"], t["theta"], True, None, None, True)
    assert grad.shape == (6, 18) and g_theta.shape == (6, 9) and nll.is_meta
    assert ops.lgamma_theta_sum(t["x"], t["theta"]).shape == (6,)
    assert ops.uniform(4, 5, device="meta").shape == (4, 5)
    lt = layer_inputs(n=6, h=5)
    tables = [[meta(b) for b in bs] for bs in lt["tables"]]
    grads = [[meta(b) for b in bs] for bs in lt["tables"]]
    codes, factor = meta(lt["codes"]), meta(lt["u"])
    y, rstd, act = ops.layer_forward(meta(lt["pre"]), codes, tables, layer_norm=True, ln_eps=1e-5, p=0.1, factor=factor)
    assert y.is_meta and y.shape == act.shape == (6, 5) and rstd.shape == (6,)
    d = ops.layer_backward(meta(lt["grad"]), y, rstd, factor, codes, ops.CovariateBlocks(tables, grads),
                           layer_norm=True)
    assert d.shape == (6, 5)
    z, var, kl = ops.latent_forward(torch.empty(6, 8, device="meta"), torch.empty(6, 4, device="meta"), 1e-4)
    assert z.shape == var.shape == (6, 4) and kl.shape == (6,)
    assert ops.latent_backward(z, torch.empty(6, 8, device="meta"), var, z, 1e-4, 0.5).shape == (6, 8)
    params = [torch.empty(3, 2, device="meta")]
    ops.adam_step(params, [torch.empty(3, 2, device="meta")], [torch.empty(3, 2, device="meta")],
                  [torch.empty(3, 2, device="meta")], step_size=[0.1], bias2_sqrt=[0.5], beta1=0.9, beta2=0.999,
                  eps=1e-8, weight_decay=0.1)
    indptr = torch.empty(7, dtype=torch.int64, device="meta")
    indices = torch.empty(20, dtype=torch.int32, device="meta")
    data = torch.empty(20, device="meta")
    assert ops.gather_rows(indptr, indices, data, 9, torch.empty(4, dtype=torch.int64, device="meta")).shape == (4, 9)
    assert ops.log_factorial_rows(indptr, data).shape == (6,)
    assert ops.lgamma_theta_sum_csr(indptr, indices, data, t["theta"]).shape == (6,)


def test_fused_step_through_the_reference_ops_matches_autograd(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fused step's structure on the reference stack ops (no compiled code): the same loss and
    gradients as autograd."""
    from support import SMALL, simulate, split_by_batch

    import atlasmap
    from atlasmap.training import fused_step as fs
    from atlasmap.training.loop import with_frozen_fields

    monkeypatch.setenv("ATLASMAP_KERNEL", "0")
    ref, _ = split_by_batch(simulate(240, seed=3))
    model = atlasmap.SCVI(ref, batch_key="batch", **SMALL)
    module = model.module
    cells = with_frozen_fields(module, model._cells(training=True))
    module.train()
    assert fs.fused_step(module, cells) is None  # only used compiled
    params = [p for p in module.parameters() if p.requires_grad]
    step = fs.FusedStep(module, params, first_precomputed=False)
    batch = cells.batch(np.random.default_rng(0).permutation(cells.n_cells)[:64])
    torch.manual_seed(1)
    want = module.loss(batch, 0.5)
    want.loss.backward()
    want_grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    torch.manual_seed(1)
    got = step(batch, 0.5)
    torch.testing.assert_close(got.loss, want.loss.detach(), rtol=2e-6, atol=1e-4)
    torch.testing.assert_close(got.kl, want.kl.detach(), rtol=1e-5, atol=1e-5)
    for p, w in zip(params, want_grads, strict=True):
        torch.testing.assert_close(p.grad, w, rtol=1e-4, atol=2e-6 * float(w.abs().max()))


def test_ops_is_a_leaf_package() -> None:
    """atlasmap.ops imports only torch, numpy, the standard library and atlasmap.errors."""
    import ast
    import subprocess
    import sys

    code = ("import sys, atlasmap.ops\n"
            "print(sorted(m for m in sys.modules if m.startswith('atlasmap')), 'scipy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    mods, scipy_loaded = out.rsplit(" ", 1)
    assert set(ast.literal_eval(mods)) <= {"atlasmap", "atlasmap._version", "atlasmap.errors", "atlasmap.ops",
                                           "atlasmap.ops._native",
                               "atlasmap.ops.reference"}, mods
    assert scipy_loaded == "False"
