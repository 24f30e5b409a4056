"""The compiled NB / ZINB likelihood kernel (``_nbkernel.c``), loaded with :mod:`ctypes`.

The C file is compiled when the package is installed (``setup.py``; optional: without a C compiler the
install still succeeds and :mod:`atlasmap.nn.likelihoods` uses its PyTorch implementation). The kernel
takes float32 CPU tensors; callers check :func:`usable` first. ``ATLASMAP_KERNEL=0`` in the environment
turns it off (the tests compare both implementations).

ctypes releases the GIL during a call, so large minibatches are split into row ranges that run on
``torch.get_num_threads()`` Python threads at once (the rows are independent).
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import torch

#: Below this many matrix entries a minibatch runs on one thread (thread hand-off costs ~20 us).
PARALLEL_MIN_ENTRIES = 1 << 16

_P = ctypes.c_void_p
_I = ctypes.c_int64


def load_library(path: str) -> ctypes.CDLL:
    """Load a build of ``_nbkernel.c`` from ``path`` and declare its two functions' signatures."""
    lib = ctypes.CDLL(path)
    lib.atlasmap_nb_nll.argtypes = [_I, _I, _I, _P, _P, _P, _I, _P, _P, _P, _P, _P, _P, _P]
    lib.atlasmap_nb_nll.restype = ctypes.c_int
    lib.atlasmap_lgamma_theta_sum.argtypes = [_I, _I, _I, _P, _P, _I, _P]
    lib.atlasmap_lgamma_theta_sum.restype = ctypes.c_int
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


@lru_cache(maxsize=1)
def _pool(n: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=n, thread_name_prefix="atlasmap-kernel")


def _run(call, n_rows: int, n_genes: int) -> None:  # noqa: ANN001
    """``call(begin, end)`` over all rows, split across threads when the minibatch is large enough."""
    n_threads = min(torch.get_num_threads(), n_rows)
    if n_threads <= 1 or n_rows * n_genes < PARALLEL_MIN_ENTRIES:
        status = [call(0, n_rows)]
    else:
        bounds = [n_rows * i // n_threads for i in range(n_threads + 1)]
        futures = [_pool(n_threads).submit(call, lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]
        status = [f.result() for f in futures]
    if any(s != 0 for s in status):
        raise MemoryError("atlasmap's likelihood kernel could not allocate its scratch memory")


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def nb_nll(x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor, pi_logits: torch.Tensor | None,
           const: torch.Tensor | None, lgamma_cell: torch.Tensor | None,
           need: tuple[bool, bool, bool] = (False, False, False), lib: ctypes.CDLL | None = None,
           ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Per-cell NLL (``const - sum_g f``) and, as ``need`` asks, d NLL / d ``mu``, ``theta`` (per entry)
    and ``pi_logits``. See ``_nbkernel.c`` for the formulas; callers check :func:`usable`. ``lib`` is
    another build of the kernel (tests)."""
    lib = lib or _library()
    n, g = x.shape
    stride = theta_stride(x, theta)
    need_mu, need_theta, need_pi = need
    if lgamma_cell is not None and need_theta:
        raise ValueError("lgamma_cell can only be given when theta needs no gradient")
    nll = torch.empty(n, dtype=torch.float32)
    g_mu = torch.empty_like(x) if need_mu else None
    g_theta = torch.empty_like(x) if need_theta else None
    g_pi = torch.empty_like(x) if need_pi and pi_logits is not None else None
    fixed = (g, x.data_ptr(), mu.data_ptr(), theta.data_ptr(), stride, _ptr(pi_logits), _ptr(const),
             _ptr(lgamma_cell), nll.data_ptr(), _ptr(g_mu), _ptr(g_theta), _ptr(g_pi))
    _run(lambda lo, hi: lib.atlasmap_nb_nll(lo, hi, *fixed), n, g)
    return nll, g_mu, g_theta, g_pi


def lgamma_theta_sum(x: torch.Tensor, theta: torch.Tensor, lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """Per-cell ``sum_g lgamma(x + theta) - lgamma(theta)``; callers check :func:`usable`."""
    lib = lib or _library()
    n, g = x.shape
    out = torch.empty(n, dtype=torch.float32)
    fixed = (g, x.data_ptr(), theta.data_ptr(), theta_stride(x, theta), out.data_ptr())
    _run(lambda lo, hi: lib.atlasmap_lgamma_theta_sum(lo, hi, *fixed), n, g)
    return out
