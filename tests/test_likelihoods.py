"""The NB / ZINB training likelihood: the compiled kernel and the PyTorch implementation against a
float64 autograd reference, every path of the kernel (small / large / non-integer counts, tiny / huge
inverse dispersions, per-gene / per-cell dispersion, the query-time precomputed term), determinism across
thread counts, special values, and the portable (non-libmvec) math of the C file."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from atlasmap import ops
from atlasmap.nn import likelihoods as L

needs_kernel = pytest.mark.skipif(not ops.available(), reason="compiled likelihood kernel not built / disabled")
IMPLEMENTATIONS = ["kernel", "torch"]


@pytest.fixture(params=IMPLEMENTATIONS)
def implementation(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "kernel" and not ops.available():
        pytest.skip("compiled likelihood kernel not built / disabled")
    if request.param == "torch":
        monkeypatch.setenv("ATLASMAP_KERNEL", "0")
    return request.param


def make_inputs(n: int = 48, g: int = 257, seed: int = 0, theta_per_cell: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Counts covering every kernel path: zeros, 1..8 (vector path), 9..16 (finite sums), large, and
    non-integer values; inverse dispersions from 1e-3 to 1e6 (g odd: vector loops have a remainder)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.distributions.NegativeBinomial(1.5, probs=torch.rand(n, g, generator=gen) * 0.8).sample()
    x[0, :8] = torch.tensor([1.0, 8.0, 9.0, 16.0, 17.0, 250.0, 2.5, 0.5])
    x[1, :4] = torch.tensor([3000.0, 1.0, 7.0, 12.0])
    mu = torch.rand(n, g, generator=gen) * 30 + 1e-3
    if theta_per_cell:
        theta = torch.rand(n, g, generator=gen) * 8 + 0.01
    else:
        theta = torch.rand(g, generator=gen) * 8 + 0.01
        theta[:6] = torch.tensor([1e-3, 0.05, 1e3, 1e6, 30.0, 2.0])
    pi = torch.randn(n, g, generator=gen) * 2
    return x, mu, theta, pi


def reference(x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor, pi: torch.Tensor | None,
              weights: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """Per-cell NLL and gradients of sum(weights * NLL), float64 autograd through log_zinb / log_nb."""
    leaves = [t.double().clone().requires_grad_(True) if t is not None else None for t in (mu, theta, pi)]
    xd = x.double()
    logp = L.log_zinb(xd, *leaves) if pi is not None else L.log_nb(xd, leaves[0], leaves[1])
    nll = -logp.sum(-1)
    (nll * weights.double()).sum().backward()
    return nll.detach(), [t.grad if t is not None else None for t in leaves]


def close(actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    """Relative to the largest magnitude (float32 arithmetic over hundreds of genes)."""
    err = (actual.double() - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert err <= rtol * scale, f"max abs error {err:.3g} vs scale {scale:.3g}"


@pytest.mark.parametrize("zero_inflated", [True, False])
@pytest.mark.parametrize("theta_per_cell", [False, True])
def test_values_and_gradients_match_float64_autograd(implementation: str, zero_inflated: bool,
                                                     theta_per_cell: bool) -> None:
    x, mu, theta, pi = make_inputs(theta_per_cell=theta_per_cell)
    pi = pi if zero_inflated else None
    weights = torch.rand(x.shape[0]) + 0.5
    want, want_grads = reference(x, mu, theta, pi, weights)
    leaves = [t.clone().requires_grad_(True) if t is not None else None for t in (mu, theta, pi)]
    nll = L.nb_nll(x, *leaves)
    (nll * weights).sum().backward()
    assert nll.dtype == torch.float32
    close(nll, want, 1e-5)
    for leaf, expected in zip(leaves, want_grads, strict=True):
        if leaf is not None:
            close(leaf.grad, expected, 2e-5)


def test_only_requested_gradients_are_computed(implementation: str) -> None:
    x, mu, theta, pi = make_inputs()
    mu = mu.clone().requires_grad_(True)
    out = L.nb_nll(x, mu, theta, pi)
    out.sum().backward()
    assert mu.grad is not None and theta.grad is None and pi.grad is None


def test_frozen_dispersion_term_precomputed_gives_the_same_loss(implementation: str) -> None:
    x, mu, theta, pi = make_inputs()
    full = L.nb_nll(x, mu, theta, pi)
    pre = L.nb_nll(x, mu, theta, pi, lgamma_theta_term=L.lgamma_theta_sum(x, theta))
    close(pre, full.double(), 1e-5)
    with pytest.raises(ValueError, match="theta needs no gradient"):
        L.nb_nll(x, mu, theta.clone().requires_grad_(True), pi, lgamma_theta_term=L.lgamma_theta_sum(x, theta))


def test_lgamma_theta_sum_matches_float64(implementation: str) -> None:
    x, _, theta, _ = make_inputs()
    xd, td = x.double(), theta.double()
    want = (torch.lgamma(xd + td) - torch.lgamma(td)).sum(-1)
    close(L.lgamma_theta_sum(x, theta), want, 1e-6)


@needs_kernel
def test_kernel_and_torch_agree_on_a_realistic_minibatch(monkeypatch: pytest.MonkeyPatch) -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.distributions.NegativeBinomial(0.4, probs=torch.rand(128, 2000, generator=gen) * 0.6).sample()
    mu = torch.rand(128, 2000, generator=gen) * 3 + 1e-3
    theta, pi = torch.exp(torch.randn(2000, generator=gen)), torch.randn(128, 2000, generator=gen) - 1

    def run() -> list[torch.Tensor]:
        leaves = [t.clone().requires_grad_(True) for t in (mu, theta, pi)]
        out = L.nb_nll(x, *leaves)
        out.mean().backward()
        return [out.detach()] + [t.grad for t in leaves]

    fast = run()
    monkeypatch.setenv("ATLASMAP_KERNEL", "0")
    slow = run()
    for a, b in zip(fast, slow, strict=True):
        close(a, b.double(), 1e-5)


@needs_kernel
def test_kernel_is_deterministic_and_independent_of_the_thread_count() -> None:
    x, mu, theta, pi = make_inputs(n=256, g=1000)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 1):
            torch.set_num_threads(threads)
            results.append(ops.nb_nll(x, mu, theta, pi, None, None, (True, True, True)))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert torch.equal(a, b)


@needs_kernel
def test_kernel_propagates_nan_and_inf() -> None:
    x, mu, theta, pi = make_inputs(n=4, g=16)
    mu[0, 3] = float("nan")
    pi[1, 5] = float("nan")
    mu[2, 0] = float("inf")
    out = L.nb_nll(x, mu, theta, pi)
    assert torch.isnan(out[0]) and torch.isnan(out[1]) and not torch.isfinite(out[2])
    assert torch.isfinite(out[3])


@needs_kernel
def test_kernel_is_used_only_where_it_applies() -> None:
    x, mu, theta, pi = make_inputs(n=4, g=16)
    assert ops.nb_native_applies(x, mu, theta, pi)
    assert ops.nb_native_applies(x, mu, theta[None, :], pi)
    assert not ops.nb_native_applies(x.double(), mu.double(), theta.double(), pi.double())  # float64: PyTorch path
    assert not ops.nb_native_applies(x, mu.t().contiguous().t(), theta, pi)  # not C-contiguous
    assert not ops.nb_native_applies(x, mu, theta[:3], pi)
    # the PyTorch path still works for what the kernel does not take
    x64, mu64, th64, pi64 = (t.double() for t in (x, mu, theta, pi))
    close(L.nb_nll(x64, mu64, th64, pi64), -L.log_zinb(x64, mu64, th64, pi64).sum(-1), 1e-10)


def test_kernel_is_built_in_this_environment() -> None:
    """The install compiles the kernel (setup.py); a silent fallback would lose the speed unnoticed."""
    if os.environ.get("ATLASMAP_KERNEL") == "0":
        pytest.skip("kernel turned off with ATLASMAP_KERNEL=0")
    assert ops.available(), "atlasmap.ops._native was not compiled: check that a C compiler is installed"


@pytest.fixture(scope="module")
def portable_build(tmp_path_factory: pytest.TempPathFactory) -> object:
    """The extension module compiled with the kernels' inline logf / expf (what non-glibc platforms get)."""
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler to build the portable variant")
    source = Path(ops.__file__).with_name("_native.c")
    if not source.exists():
        pytest.skip("the C sources are not installed next to atlasmap.ops")
    kernels = source.parent / "kernels"
    out = tmp_path_factory.mktemp("kernel") / f"_native{sysconfig.get_config_var('EXT_SUFFIX')}"
    cmd = [cc, "-O3", "-fno-math-errno", "-fno-trapping-math", "-fopenmp-simd", "-DATLASMAP_INLINE_MATH",
           "-shared", "-fPIC", f"-I{sysconfig.get_paths()['include']}", str(source), str(kernels / "nbkernel.c"),
           str(kernels / "stack.c"), "-o", str(out), "-lm"]
    subprocess.run(cmd, check=True, capture_output=True)
    spec = importlib.util.spec_from_file_location("_native", out)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.INLINE_MATH == 1
    return module


@pytest.fixture
def portable(portable_build: object, monkeypatch: pytest.MonkeyPatch) -> object:
    """atlasmap.ops running the portable build."""
    monkeypatch.delenv("ATLASMAP_KERNEL", raising=False)
    monkeypatch.setattr(ops, "_NATIVE", portable_build)
    return portable_build


@pytest.mark.parametrize("zero_inflated", [True, False])
def test_portable_math_build_matches_float64(portable: object, zero_inflated: bool) -> None:
    x, mu, theta, pi = make_inputs()
    pi = pi if zero_inflated else None
    weights = torch.ones(x.shape[0])
    want, want_grads = reference(x, mu, theta, pi, weights)
    assert ops.nb_native_applies(x, mu, theta, pi)
    nll, g_mu, g_theta, g_pi = ops.nb_nll(x, mu, theta, pi, L.log_factorial_sum(x), None, (True, True, True))
    close(nll, want, 1e-5)
    close(g_mu, want_grads[0], 2e-5)
    close(g_theta.sum(0), want_grads[1], 2e-5)
    if zero_inflated:
        close(g_pi, want_grads[2], 2e-5)
    close(ops.lgamma_theta_sum(x, theta),
          (torch.lgamma(x.double() + theta.double()) - torch.lgamma(theta.double())).sum(-1), 1e-6)


def test_log_factorial_sum_is_the_data_constant() -> None:
    x = torch.tensor([[0.0, 1.0, 2.0, 5.0]])
    assert np.isclose(L.log_factorial_sum(x).item(), np.log(2) + np.log(120))


@pytest.mark.parametrize("zero_inflated", [True, False])
def test_softmax_fused_likelihood_matches_float64_autograd(implementation: str, zero_inflated: bool) -> None:
    """nb_nll_logits (mean = exp(library) * softmax(logits), scVI's decoder) against float64 autograd
    through the softmax: values and the gradients of logits, library, theta and pi."""
    x, _, theta, pi = make_inputs()
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(x.shape, generator=gen) * 2
    log_lib = torch.log(x.sum(1, keepdim=True) + 50)
    pi = pi if zero_inflated else None
    weights = torch.rand(x.shape[0], generator=gen) + 0.5
    leaves64 = [t.double().clone().requires_grad_(True) if t is not None else None
                for t in (logits, log_lib, theta, pi)]
    mu64 = torch.exp(leaves64[1]) * torch.softmax(leaves64[0], dim=-1)
    xd = x.double()
    logp = L.log_zinb(xd, mu64, leaves64[2], leaves64[3]) if zero_inflated else L.log_nb(xd, mu64, leaves64[2])
    want = -logp.sum(-1)
    (want * weights.double()).sum().backward()
    leaves = [t.clone().requires_grad_(True) if t is not None else None for t in (logits, log_lib, theta, pi)]
    got = L.nb_nll_logits(x, *leaves)
    (got * weights).sum().backward()
    close(got, want.detach(), 1e-5)
    for leaf, ref in zip(leaves, leaves64, strict=True):
        if leaf is not None:
            assert leaf.grad.shape == leaf.shape
            close(leaf.grad, ref.grad, 5e-5)


def test_softmax_fused_likelihood_without_gradients_and_with_frozen_theta(implementation: str) -> None:
    x, _, theta, pi = make_inputs()
    logits = torch.randn(x.shape, generator=torch.Generator().manual_seed(6))
    log_lib = torch.log(x.sum(1) + 50)
    plain = L.nb_nll(x, torch.exp(log_lib)[:, None] * torch.softmax(logits, -1), theta, pi)
    with torch.no_grad():
        close(L.nb_nll_logits(x, logits, log_lib, theta, pi), plain.double(), 1e-5)
    pre = L.nb_nll_logits(x, logits.clone().requires_grad_(True), log_lib, theta, pi,
                          lgamma_theta_term=L.lgamma_theta_sum(x, theta))
    close(pre, plain.double(), 1e-5)


@pytest.mark.parametrize("compiled", [True, False])
def test_log_factorial_rows_table_and_gammaln_paths(compiled: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The per-cell sum log x! of the data: table lookup for small integers, gammaln for the rest (the
    compiled kernel and the numpy chunks)."""
    if compiled and not ops.available():
        pytest.skip("the compiled kernel is not installed")
    if not compiled:
        monkeypatch.setenv("ATLASMAP_KERNEL", "0")
    import scipy.sparse as sp
    from scipy.special import gammaln

    from atlasmap.data.loader import log_factorial_rows

    dense = np.array([[0, 1, 2, 1023, 1024], [5000, 0.5, 0, 0, 3], [0, 0, 0, 0, 0]], dtype=np.float32)
    got = log_factorial_rows(sp.csr_matrix(dense))
    want = gammaln(dense.astype(np.float64) + 1).sum(1)
    np.testing.assert_allclose(got, want.astype(np.float32), rtol=1e-6)
    # empty rows between others and chunks of a few nonzeros (rows never split across chunks)
    rng = np.random.default_rng(0)
    many = rng.poisson(0.7, size=(40, 9)).astype(np.float32)
    many[[0, 7, 8, 39]] = 0.0
    want = gammaln(many.astype(np.float64) + 1).sum(1).astype(np.float32)
    for chunk in (1, 5, 17, 1 << 22):
        np.testing.assert_allclose(log_factorial_rows(sp.csr_matrix(many), chunk=chunk), want, rtol=1e-6)


@pytest.mark.skipif(not ops.available(), reason="the compiled kernel is not installed")
def test_count_flags_each_kind_anywhere() -> None:
    """The one-pass count check flags each kind of bad value wherever it is (vector body, tail, later chunk)."""
    for size in (7, 1000, (1 << 16) * 3 + 5):
        ok = np.random.default_rng(size).poisson(3.0, size).astype(np.float32)
        ok[0] = -0.0  # a zero
        ok[-1] = 2.0**24  # the largest exact count is allowed
        assert ops.count_flags(ok) == 0
        for bad, flag in ((np.nan, 1), (np.inf, 1 | 8), (-np.inf, 1 | 2), (-1.0, 2), (0.5, 4), (1e-40, 4), (3.0000002, 4),
                          (2.0**24 + 2, 8)):
            for pos in (0, size // 2, size - 2):
                values = ok.copy()
                values[pos] = bad
                assert ops.count_flags(values) == flag, (size, bad, pos)


@pytest.mark.skipif(not ops.available(), reason="the compiled kernel is not installed")
def test_lgamma_theta_sum_from_csr_equals_dense() -> None:
    """The CSR variant reads only stored nonzeros (explicit zeros skipped, empty rows 0) and gives the dense
    kernel's bits; both agree with float64 lgamma differences."""
    import scipy.sparse as sp

    rng = np.random.default_rng(1)
    dense = rng.poisson(1.5, (300, 500)).astype(np.float32)
    dense[5] = 0.0
    dense[7, :4] = [20.0, 0.5, 3000.0, 9.0]
    csr = sp.csr_matrix(dense)
    csr.data[0] = 0.0  # an explicit zero stays a zero
    theta = torch.exp(torch.randn(500, generator=torch.Generator().manual_seed(0)) * 2)
    got = ops.lgamma_theta_sum_csr(csr.indptr.astype(np.int64), csr.indices.astype(np.int32), csr.data, theta)
    x = torch.from_numpy(csr.toarray())
    assert torch.equal(got, ops.lgamma_theta_sum(x, theta))
    assert got[5] == 0.0
    want = (torch.lgamma(x.double() + theta.double()) - torch.lgamma(theta.double())).sum(1)
    close(got, want, 1e-6)
