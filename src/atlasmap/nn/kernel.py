"""The compiled NB / ZINB likelihood kernel (``_nbkernel.c``), loaded with :mod:`ctypes`.

The C file is compiled when the package is installed (``setup.py``; optional: without a C compiler the
install still succeeds and :mod:`atlasmap.nn.likelihoods` uses its PyTorch implementation). The kernel
takes float32 CPU tensors; callers check :func:`usable` first. ``ATLASMAP_KERNEL=0`` in the environment
turns it off (the tests compare both implementations).

Large minibatches are split into row ranges that run on ``torch.get_num_threads()`` threads of PyTorch's
own OpenMP pool (the C file is built with ``-fopenmp`` and binds to the libgomp PyTorch has loaded; a
second thread pool would compete with PyTorch's spinning threads for the same cores).
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
from functools import lru_cache

import numpy as np
import torch

#: Below this many matrix entries a minibatch runs on one thread.
PARALLEL_MIN_ENTRIES = 1 << 16

_P = ctypes.c_void_p
_I = ctypes.c_int64


def load_library(path: str) -> ctypes.CDLL:
    """Load a build of ``_nbkernel.c`` + ``_stack.c`` from ``path`` and declare its functions' signatures."""
    lib = ctypes.CDLL(path)
    lib.atlasmap_nb_nll.argtypes = [_I, _I, _I, _P, _P, _P, _P, _P, _I, _P, _P, _P, _P, _P, _P, _P, _P, _P,
                                    ctypes.c_int]
    lib.atlasmap_nb_nll.restype = ctypes.c_int
    lib.atlasmap_lgamma_theta_sum.argtypes = [_I, _I, _P, _P, _I, _P, ctypes.c_int]
    lib.atlasmap_lgamma_theta_sum.restype = ctypes.c_int
    lib.atlasmap_gather_rows.argtypes = [_I, _P, _P, _P, _P, _I, _P, ctypes.c_int]
    lib.atlasmap_gather_rows.restype = ctypes.c_int
    _F, _C = ctypes.c_float, ctypes.c_int
    lib.atlasmap_layer_forward.argtypes = [_I, _I, _P, _I, _P, _I, _P, _P, _P, _C, _F, _F, _P, _P, _P, _P]
    lib.atlasmap_layer_backward.argtypes = [_I, _I, _P, _P, _P, _P, _C, _I, _P, _I, _P, _P, _P]
    lib.atlasmap_latent_forward.argtypes = [_I, _I, _P, _P, _F, _P, _P, _P]
    lib.atlasmap_latent_backward.argtypes = [_I, _I, _P, _P, _P, _P, _F, _F, _P]
    lib.atlasmap_lgamma_theta_sum_csr.argtypes = [_I, _I, _P, _P, _P, _P, _P, ctypes.c_int]
    lib.atlasmap_lgamma_theta_sum_csr.restype = ctypes.c_int
    lib.atlasmap_uniform.argtypes = [_I, ctypes.c_uint64, _P]
    lib.atlasmap_adam.argtypes = [_I, _P, _P, _P, _P, _P, _P, _P, ctypes.c_float, ctypes.c_float, ctypes.c_float,
                                  ctypes.c_float, ctypes.c_int]
    lib.atlasmap_check_counts.argtypes = [_I, _P, ctypes.c_int]
    lib.atlasmap_log_factorial_rows.argtypes = [_I, _P, _P, _P, ctypes.c_int]
    for name in ("atlasmap_adam", "atlasmap_uniform", "atlasmap_check_counts", "atlasmap_log_factorial_rows",
                 "atlasmap_layer_forward", "atlasmap_layer_backward", "atlasmap_latent_forward",
                 "atlasmap_latent_backward"):
        getattr(lib, name).restype = ctypes.c_int
    return lib


@lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    spec = importlib.util.find_spec("atlasmap.nn._nbkernel")
    if spec is None or not spec.origin or not os.path.exists(spec.origin):
        return None
    try:
        return load_library(spec.origin)
    except OSError:
        return None


def available() -> bool:
    """Whether the compiled kernel is installed and not turned off with ``ATLASMAP_KERNEL=0``."""
    return os.environ.get("ATLASMAP_KERNEL", "1") != "0" and _library() is not None


def _is_plain(t: torch.Tensor | None) -> bool:
    return t is None or (t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous())


def theta_stride(x: torch.Tensor, theta: torch.Tensor) -> int | None:
    """Row stride of ``theta`` as the kernel reads it (0: per gene, ``G``: per cell and gene), or ``None``
    when its shape is one the kernel does not handle."""
    if theta.shape == x.shape:
        return x.shape[1]
    if theta.shape in ((x.shape[1],), (1, x.shape[1])):
        return 0
    return None


def usable(x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor, pi_logits: torch.Tensor | None,
           *per_cell: torch.Tensor | None) -> bool:
    """Whether the kernel can evaluate this likelihood (2-D float32 contiguous CPU tensors, ``mu`` and
    ``pi_logits`` of the shape of ``x``, ``theta`` per gene or per entry, per-cell vectors of ``n``)."""
    if x.dim() != 2 or mu.shape != x.shape or (pi_logits is not None and pi_logits.shape != x.shape):
        return False
    if theta_stride(x, theta) is None or any(c is not None and c.shape != x.shape[:1] for c in per_cell):
        return False
    return all(_is_plain(t) for t in (x, mu, theta, pi_logits, *per_cell)) and available()


def _threads(n_rows: int, n_genes: int) -> int:
    return 1 if n_rows * n_genes < PARALLEL_MIN_ENTRIES else max(1, min(torch.get_num_threads(), n_rows))


def _check(status: int) -> None:
    if status != 0:
        raise MemoryError("atlasmap's likelihood kernel could not allocate its scratch memory")


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _nll(x: torch.Tensor, theta: torch.Tensor, pi_logits: torch.Tensor | None, const: torch.Tensor | None,
         lgamma_cell: torch.Tensor | None, lib: ctypes.CDLL | None, *, mu: torch.Tensor | None = None,
         logits: torch.Tensor | None = None, log_library: torch.Tensor | None = None,
         need_mu: bool = False, need_logits: bool = False, need_log_library: bool = False,
         need_theta: bool = False, need_pi: bool = False, ld: int | None = None,
         out: dict[str, torch.Tensor | None] | None = None) -> tuple[torch.Tensor, ...]:
    """One call of ``atlasmap_nb_nll``: the NLL and the gradient buffers asked for (``None`` otherwise), in
    the order mu, logits, log_library, theta, pi. The mean is ``mu`` or ``exp(log_library) * softmax(logits)``.
    ``ld``: row stride of ``logits``, ``pi_logits`` and their gradients (default G; larger when they are column
    ranges of one wider matrix, see :func:`nb_nll_heads`). ``out``: gradient buffers to write into, by name
    (``"logits"``, ``"pi"``, ``"theta"``), instead of new ones."""
    lib = lib or _library()
    n, g = x.shape
    if lgamma_cell is not None and need_theta:
        raise ValueError("lgamma_cell can only be given when theta needs no gradient")
    out = out or {}

    def buffer(name: str, needed: bool) -> torch.Tensor | None:
        given = out.get(name)
        return None if not needed else given if given is not None else torch.empty_like(x)

    nll = torch.empty(n, dtype=torch.float32)
    g_mu = buffer("mu", need_mu)
    g_logits = buffer("logits", need_logits)
    g_log_lib = torch.empty(n, dtype=torch.float32) if need_log_library else None
    g_theta = buffer("theta", need_theta)
    g_pi = buffer("pi", need_pi and pi_logits is not None)
    _check(lib.atlasmap_nb_nll(n, g, g if ld is None else ld, x.data_ptr(), _ptr(mu), _ptr(logits), _ptr(log_library), theta.data_ptr(),
                               theta_stride(x, theta), _ptr(pi_logits), _ptr(const), _ptr(lgamma_cell),
                               nll.data_ptr(), _ptr(g_mu), _ptr(g_logits), _ptr(g_log_lib), _ptr(g_theta),
                               _ptr(g_pi), _threads(n, g)))
    return nll, g_mu, g_logits, g_log_lib, g_theta, g_pi


def nb_nll(x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor, pi_logits: torch.Tensor | None,
           const: torch.Tensor | None, lgamma_cell: torch.Tensor | None,
           need: tuple[bool, bool, bool] = (False, False, False), lib: ctypes.CDLL | None = None,
           ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Per-cell NLL (``const - sum_g f``) and, as ``need`` asks, d NLL / d ``mu``, ``theta`` (per entry)
    and ``pi_logits``. See ``_nbkernel.c`` for the formulas; callers check :func:`usable`. ``lib`` is
    another build of the kernel (tests)."""
    nll, g_mu, _, _, g_theta, g_pi = _nll(x, theta, pi_logits, const, lgamma_cell, lib, mu=mu, need_mu=need[0],
                                          need_theta=need[1], need_pi=need[2])
    return nll, g_mu, g_theta, g_pi


def nb_nll_logits(x: torch.Tensor, logits: torch.Tensor, log_library: torch.Tensor, theta: torch.Tensor,
                  pi_logits: torch.Tensor | None, const: torch.Tensor | None, lgamma_cell: torch.Tensor | None,
                  need: tuple[bool, bool, bool, bool] = (False, False, False, False), lib: ctypes.CDLL | None = None,
                  ) -> tuple[torch.Tensor, ...]:
    """:func:`nb_nll` with the mean given as scVI's decoder gives it, ``mu = exp(log_library) *
    softmax(logits)`` (``log_library`` one value per cell), never materialised: the softmax, the scaling
    and their backward are part of the kernel's pass. Returns the NLL and, as ``need`` asks, d NLL / d
    ``logits``, ``log_library`` (per cell), ``theta`` (per entry) and ``pi_logits``."""
    nll, _, *grads = _nll(x, theta, pi_logits, const, lgamma_cell, lib, logits=logits, log_library=log_library,
                          need_logits=need[0], need_log_library=need[1], need_theta=need[2], need_pi=need[3])
    return (nll, *grads)


def nb_nll_heads(x: torch.Tensor, heads: torch.Tensor, log_library: torch.Tensor, theta: torch.Tensor,
                 zero_inflated: bool, const: torch.Tensor | None, lgamma_cell: torch.Tensor | None,
                 need_theta: bool = False, out: tuple[torch.Tensor, torch.Tensor | None] | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """:func:`nb_nll_logits` on both decoder heads' output in one matrix: ``heads`` is n x 2G (expression
    logits, then zero-inflation logits) or n x G (NB), as one matmul with the heads' stacked weights gives
    it. Returns the per-cell NLL, d NLL / d ``heads`` (same layout) and, with ``need_theta`` (then
    ``lgamma_cell`` must be ``None``), d NLL / d ``theta`` per entry (n x G). ``out``: buffers for the two
    gradients (shapes as returned), e.g. kept across training steps."""
    g = x.shape[1]
    grad, g_theta = out if out is not None else (torch.empty_like(heads), None)
    pi = heads[:, g:2 * g] if zero_inflated else None
    buffers = {"logits": grad[:, :g], "pi": grad[:, g:2 * g] if zero_inflated else None, "theta": g_theta}
    nll, _, _, _, g_theta, _ = _nll(x, theta, pi, const, lgamma_cell, None, logits=heads[:, :g],
                                    log_library=log_library, need_logits=True, need_theta=need_theta,
                                    need_pi=zero_inflated, ld=heads.shape[1], out=buffers)
    return nll, grad, g_theta


def lgamma_theta_sum_csr(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, theta: torch.Tensor,
                         ) -> torch.Tensor:
    """:func:`lgamma_theta_sum` of CSR counts (``indptr`` int64, ``indices`` int32, ``data`` float32, contiguous)
    with ``theta`` per gene, over the stored nonzeros only (no dense rows). Callers check :func:`available`."""
    n = indptr.size - 1
    out = torch.empty(n, dtype=torch.float32)
    n_threads = 1 if data.size < PARALLEL_MIN_ENTRIES else max(1, min(torch.get_num_threads(), n))
    _check(_library().atlasmap_lgamma_theta_sum_csr(n, theta.numel(), indptr.ctypes.data, indices.ctypes.data,
                                                    data.ctypes.data, theta.data_ptr(), out.data_ptr(), n_threads))
    return out


def uniform(n_rows: int, n_cols: int) -> torch.Tensor:
    """``torch.rand(n_rows, n_cols)``-like uniform floats in [0, 1) for dropout masks, ~4x faster on CPU: the
    compiled counter-based generator, seeded from PyTorch's default generator (``torch.manual_seed`` fixes
    the result). Falls back to ``torch.rand`` without the compiled kernels."""
    if not available():
        return torch.rand(n_rows, n_cols)
    seed = int(torch.randint(-(2**63), 2**63 - 1, (1,), dtype=torch.int64)) & 0xFFFFFFFFFFFFFFFF
    out = torch.empty(n_rows, n_cols, dtype=torch.float32)
    _library().atlasmap_uniform(n_rows * n_cols, seed, out.data_ptr())
    return out


def lgamma_theta_sum(x: torch.Tensor, theta: torch.Tensor, lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """Per-cell ``sum_g lgamma(x + theta) - lgamma(theta)``; callers check :func:`usable`."""
    lib = lib or _library()
    n, g = x.shape
    out = torch.empty(n, dtype=torch.float32)
    _check(lib.atlasmap_lgamma_theta_sum(n, g, x.data_ptr(), theta.data_ptr(), theta_stride(x, theta),
                                         out.data_ptr(), _threads(n, g)))
    return out


def count_flags(values: np.ndarray) -> int:
    """One pass over float32 ``values``: bit 1 NaN/inf, 2 negative, 4 non-integer, 8 above 2^24 (0: all are
    counts). Callers check :func:`available`."""
    values = np.ascontiguousarray(np.ravel(values, order="K"))  # a view for C- or Fortran-ordered input
    n_threads = max(1, min(torch.get_num_threads(), values.size >> 20))
    return int(_library().atlasmap_check_counts(values.size, values.ctypes.data, n_threads))


def log_factorial_rows(indptr: np.ndarray, data: np.ndarray) -> np.ndarray:
    """``sum_g lgamma(x_g + 1)`` per row of CSR counts (``indptr`` int64, ``data`` float32, contiguous).
    Callers check :func:`available`."""
    n_rows = indptr.size - 1
    out = np.empty(n_rows, dtype=np.float32)
    n_threads = max(1, min(torch.get_num_threads(), data.size >> 16))
    _library().atlasmap_log_factorial_rows(n_rows, indptr.ctypes.data, data.ctypes.data, out.ctypes.data, n_threads)
    return out


def gather_rows(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, n_cols: int, rows: np.ndarray,
                lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """Dense float32 tensor of CSR ``rows`` (``indptr`` int64, ``indices`` int32, ``data`` float32, all
    C-contiguous; ``rows`` int64 in range): the data loader's minibatch gather, ~10x faster than numpy's
    vectorised scatter. Callers check :func:`available`."""
    lib = lib or _library()
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    out = torch.empty((rows.size, n_cols), dtype=torch.float32)
    lib.atlasmap_gather_rows(rows.size, rows.ctypes.data, indptr.ctypes.data, indices.ctypes.data,
                             data.ctypes.data, n_cols, out.data_ptr(), _threads(rows.size, n_cols))
    return out
