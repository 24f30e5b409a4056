"""atlasmap's compiled operations behind one typed boundary.

Each operation has a typed entry point here, with two implementations:

* the compiled kernel (``atlasmap.ops._native``, a CPython extension module built by ``setup.py`` from
  ``_native.c`` and ``kernels/*.c``), which checks every argument it is given (dtype, shape, layout,
  writability, index ranges) and raises ``TypeError`` / ``ValueError`` instead of reading or writing out of
  bounds. It runs for CPU float32 inputs;
* the pure-PyTorch reference (:mod:`atlasmap.ops.reference`), which runs on every device (CPU, CUDA, the
  ``meta`` device) and dtype, and is what the kernels are tested against.

The entry points choose: CPU float32 (contiguous) inputs with the compiled module installed go to the
kernel; anything else (other devices, float64, an install without a C compiler, ``ATLASMAP_KERNEL=0`` in
the environment) goes to the reference. Callers never check the device themselves.

Per-call cost matters (a CPU training step is a few milliseconds and ~15 of these calls): arrays are
handed to the kernels as ``tensor.numpy()`` views (no copies), and tensors that are passed again and again
(parameters, optimizer moments, covariate blocks) can be wrapped once in :class:`TensorGroup` /
:class:`CovariateBlocks`, which keep their views. Kernels split large inputs over
``torch.get_num_threads()`` threads of PyTorch's own OpenMP pool.

This package imports only torch, numpy, the standard library and :mod:`atlasmap.errors`.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence
from types import ModuleType

import numpy as np
import torch

from atlasmap.errors import InputError
from atlasmap.ops import reference

try:
    from atlasmap.ops import _native as _NATIVE
except ImportError:  # built without a C compiler: the reference implementations run
    _NATIVE = None

#: Below this many matrix entries a minibatch runs on one thread.
PARALLEL_MIN_ENTRIES = 1 << 16

_F32 = torch.float32
_I64 = torch.int64

# ``ATLASMAP_KERNEL=0`` is read at every call (the tests switch it); os.environ.get costs ~1 us when the
# variable is unset (it raises and catches KeyError), so the mapping behind os.environ is read directly.
_ENV_DATA = getattr(os.environ, "_data", None)
try:
    _ENV_KEY, _ENV_OFF = os.environ.encodekey("ATLASMAP_KERNEL"), os.environ.encodevalue("0")
except AttributeError:  # not CPython's os._Environ
    _ENV_DATA = None


def _disabled() -> bool:
    if _ENV_DATA is not None:
        return _ENV_DATA.get(_ENV_KEY) == _ENV_OFF
    return os.environ.get("ATLASMAP_KERNEL") == "0"


def _lib() -> ModuleType | None:
    """The compiled module, ``None`` when it is not built, ``ATLASMAP_KERNEL=0``, or while ``torch.compile``
    traces (the kernels are opaque to it; the reference's torch operations compile and fuse)."""
    return None if _NATIVE is None or _disabled() or torch.compiler.is_compiling() else _NATIVE


def available() -> bool:
    """Whether the compiled kernels are installed and not turned off with ``ATLASMAP_KERNEL=0``."""
    return _lib() is not None


def native_module() -> ModuleType | None:
    """The compiled extension module if it was built (whether or not ``ATLASMAP_KERNEL=0``), else ``None``."""
    return _NATIVE


# ---------------------------------------------------------------------------------------------- helpers
def _plain(t: torch.Tensor | None) -> bool:
    """CPU float32 and C-contiguous (or ``None``): what the kernels read."""
    return t is None or (t.is_cpu and t.dtype is _F32 and t.is_contiguous())


def _rows(t: torch.Tensor | None) -> bool:
    """CPU float32, 2-D with contiguous rows (e.g. a column range of a wider matrix), or ``None``."""
    return t is None or (t.is_cpu and t.dtype is _F32 and t.dim() == 2 and (t.stride(1) == 1 or t.shape[1] <= 1))


def _view(t: torch.Tensor | None) -> np.ndarray | None:
    """The array the kernels read: a view of ``t``'s memory (``None`` stays ``None``)."""
    if t is None:
        return None
    return (t.detach() if t.requires_grad else t).numpy()


def _tensor(a: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A tensor sharing ``a``'s memory (read-only arrays included: the reference never writes inputs)."""
    if isinstance(a, torch.Tensor):
        return a
    a = np.asarray(a)
    if a.flags.writeable:
        return torch.from_numpy(a)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "The given NumPy array is not writable"
        return torch.from_numpy(a)


_TORCH_DTYPE = {np.int64: torch.int64, np.int32: torch.int32, np.float32: torch.float32}


def _host_array(a: np.ndarray | torch.Tensor, dtype: type) -> np.ndarray | None:
    """``a`` as a C-contiguous host array of ``dtype`` without a copy, or ``None`` when that is impossible."""
    if isinstance(a, torch.Tensor):
        if not a.is_cpu or a.dtype != _TORCH_DTYPE[dtype] or not a.is_contiguous():
            return None
        return _view(a)
    a = np.asarray(a)
    return a if a.dtype == dtype and a.flags.c_contiguous else None


def _empty(*shape: int) -> tuple[torch.Tensor, np.ndarray]:
    """A new float32 CPU tensor and its array view. Per-cell vectors are allocated by numpy (half the cost
    of ``torch.empty`` followed by ``.numpy()``); matrices by PyTorch, whose 64-byte alignment the matmuls
    that read them next may prefer (numpy aligns to 16 bytes)."""
    if len(shape) == 1:
        view = np.empty(shape, np.float32)
        return torch.from_numpy(view), view
    t = torch.empty(shape, dtype=_F32)
    return t, t.numpy()


def _threads(n_rows: int, n_cols: int) -> int:
    return 1 if n_rows * n_cols < PARALLEL_MIN_ENTRIES else max(1, min(torch.get_num_threads(), n_rows))


def theta_stride(x: torch.Tensor, theta: torch.Tensor) -> int | None:
    """Row stride of ``theta`` as the kernel reads it (0: per gene, ``G``: per cell and gene), or ``None``
    when its shape is one the kernel does not handle (the reference broadcasts any shape)."""
    if theta.shape == x.shape:
        return x.shape[1]
    if theta.shape in ((x.shape[1],), (1, x.shape[1])):
        return 0
    return None


class TensorGroup(Sequence):
    """A fixed sequence of tensors (``None`` entries allowed) handed to the ops again and again, e.g. the
    parameters and moments of an optimizer: whether the kernels can read them, and their array views, are
    worked out once instead of at every call. The tensors must keep their storage (update them in place,
    do not assign ``.data``)."""

    __slots__ = ("_plain", "_views", "tensors")

    def __init__(self, tensors: Sequence[torch.Tensor | None]) -> None:
        self.tensors: tuple[torch.Tensor | None, ...] = tuple(tensors)
        self._plain = all(_plain(t) for t in self.tensors)
        self._views: tuple[np.ndarray | None, ...] | None = None

    def __len__(self) -> int:
        return len(self.tensors)

    def __getitem__(self, i: int) -> torch.Tensor | None:  # type: ignore[override]
        return self.tensors[i]

    def __iter__(self) -> Iterator[torch.Tensor | None]:
        return iter(self.tensors)

    @property
    def plain(self) -> bool:
        """Whether every tensor is CPU float32 and contiguous (what the kernels read)."""
        return self._plain

    def views(self) -> tuple[np.ndarray | None, ...]:
        """Array views of the tensors (made at the first call, kept)."""
        if self._views is None:
            self._views = tuple(_view(t) for t in self.tensors)
        return self._views


def _group(tensors: Sequence[torch.Tensor | None]) -> TensorGroup:
    return tensors if isinstance(tensors, TensorGroup) else TensorGroup(tensors)


# ---------------------------------------------------------------------------------------------- likelihood
def nb_native_applies(x: torch.Tensor, mean: torch.Tensor, theta: torch.Tensor, pi_logits: torch.Tensor | None,
                      *per_cell: torch.Tensor | None) -> bool:
    """Whether the NB / ZINB functions below run the compiled kernel for these inputs: the kernel is
    available, all are CPU float32 contiguous, ``mean`` (``mu`` or ``logits``) and ``pi_logits`` have the
    shape of the 2-D ``x``, ``theta`` is per gene or per entry, per-cell vectors have ``n`` entries."""
    if x.dim() != 2 or mean.shape != x.shape or (pi_logits is not None and pi_logits.shape != x.shape):
        return False
    if theta_stride(x, theta) is None or any(c is not None and c.shape != x.shape[:1] for c in per_cell):
        return False
    return all(_plain(t) for t in (x, mean, theta, pi_logits, *per_cell)) and available()


def _check_lgamma_cell(lgamma_cell: torch.Tensor | None, need_theta: bool) -> None:
    if lgamma_cell is not None and need_theta:
        raise ValueError("lgamma_cell can only be given when theta needs no gradient")


def nb_nll(x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor, pi_logits: torch.Tensor | None,
           const: torch.Tensor | None, lgamma_cell: torch.Tensor | None,
           need: tuple[bool, bool, bool] = (False, False, False),
           ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Per-cell negative log-likelihood of the (zero-inflated, with ``pi_logits``) negative binomial and,
    as ``need`` asks, its gradients.

    Parameters
    ----------
    x
        Counts, n x g.
    mu, theta, pi_logits
        Mean (n x g), inverse dispersion (per gene ``(g,)``, or any shape broadcasting to ``x``), zero-inflation
        logits (n x g, or ``None`` for the NB).
    const
        Per-cell constant added to the NLL (``sum_g lgamma(x + 1)``, see
        :func:`atlasmap.ops.reference.log_factorial_sum`), or ``None`` for 0.
    lgamma_cell
        Per-cell ``sum_g lgamma(x + theta) - lgamma(theta)`` if already known (constant while ``theta`` is
        frozen); then ``theta`` gets no gradient.
    need
        Which of d NLL / d ``mu``, ``theta``, ``pi_logits`` to compute.

    Returns
    -------
    tuple
        ``(nll, grad_mu, grad_theta, grad_pi)``: the NLL (n) and the gradients asked for, per entry (n x g;
        ``grad_theta`` is not summed over cells), ``None`` for the others.
    """
    need_mu, need_theta, need_pi = need
    _check_lgamma_cell(lgamma_cell, need_theta)
    lib = _lib()
    if lib is None or not nb_native_applies(x, mu, theta, pi_logits, const, lgamma_cell):
        return reference.nb_nll(x, mu, theta, pi_logits, const, lgamma_cell, need)
    n, g = x.shape
    nll, nll_v = _empty(n)
    g_mu = torch.empty_like(x) if need_mu else None
    g_theta = torch.empty_like(x) if need_theta else None
    g_pi = torch.empty_like(x) if need_pi and pi_logits is not None else None
    lib.nb_nll(x=_view(x), theta=_view(theta), nll=nll_v, mu=_view(mu), pi=_view(pi_logits),
               const=_view(const), lgamma_cell=_view(lgamma_cell), grad_mu=_view(g_mu), grad_theta=_view(g_theta),
               grad_pi=_view(g_pi), n_threads=_threads(n, g))
    return nll, g_mu, g_theta, g_pi


def nb_nll_logits(x: torch.Tensor, logits: torch.Tensor, log_library: torch.Tensor, theta: torch.Tensor,
                  pi_logits: torch.Tensor | None, const: torch.Tensor | None, lgamma_cell: torch.Tensor | None,
                  need: tuple[bool, bool, bool, bool] = (False, False, False, False),
                  ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None,
                             torch.Tensor | None]:
    """:func:`nb_nll` with the mean given as scVI's decoder gives it, ``mu = exp(log_library) *
    softmax(logits)`` (``log_library`` one value per cell, shape ``(n,)``); in the kernel the softmax, the
    scaling and their backward are part of the likelihood's pass (``mu`` is never materialised).

    Returns
    -------
    tuple
        ``(nll, grad_logits, grad_log_library, grad_theta, grad_pi)`` as ``need`` asks (the same order), the
        others ``None``; ``grad_log_library`` per cell, ``grad_theta`` per entry.
    """
    need_logits, need_lib, need_theta, need_pi = need
    _check_lgamma_cell(lgamma_cell, need_theta)
    lib = _lib()
    if lib is None or not nb_native_applies(x, logits, theta, pi_logits, const, lgamma_cell, log_library):
        return reference.nb_nll_logits(x, logits, log_library, theta, pi_logits, const, lgamma_cell, need)
    n, g = x.shape
    nll, nll_v = _empty(n)
    g_logits = torch.empty_like(x) if need_logits else None
    g_lib = torch.empty(n, dtype=_F32) if need_lib else None
    g_theta = torch.empty_like(x) if need_theta else None
    g_pi = torch.empty_like(x) if need_pi and pi_logits is not None else None
    lib.nb_nll(x=_view(x), theta=_view(theta), nll=nll_v, logits=_view(logits), log_library=_view(log_library),
               pi=_view(pi_logits), const=_view(const), lgamma_cell=_view(lgamma_cell), grad_logits=_view(g_logits),
               grad_log_library=_view(g_lib), grad_theta=_view(g_theta), grad_pi=_view(g_pi), n_threads=_threads(n, g))
    return nll, g_logits, g_lib, g_theta, g_pi


def nb_nll_heads(x: torch.Tensor, heads: torch.Tensor, log_library: torch.Tensor, theta: torch.Tensor,
                 zero_inflated: bool, const: torch.Tensor | None, lgamma_cell: torch.Tensor | None,
                 need_theta: bool = False, out: tuple[torch.Tensor, torch.Tensor | None] | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """:func:`nb_nll_logits` on both decoder heads' output in one matrix, with the gradients training needs.

    Parameters
    ----------
    x
        Counts, n x g.
    heads
        n x 2g (expression logits, then zero-inflation logits) or n x g (NB), as one matmul with the heads'
        stacked weights gives it. The kernel reads the two column ranges in place (row stride ``2g``).
    log_library, theta, const, lgamma_cell
        As in :func:`nb_nll_logits` (``theta`` per gene or per entry).
    zero_inflated
        Whether ``heads`` holds the zero-inflation logits.
    need_theta
        Also compute d NLL / d ``theta`` per entry (``lgamma_cell`` must then be ``None``).
    out
        Buffers for the two gradients (shapes as returned), e.g. kept across training steps.

    Returns
    -------
    tuple
        ``(nll, grad_heads, grad_theta)``: the per-cell NLL, d NLL / d ``heads`` (same layout) and d NLL /
        d ``theta`` per entry (n x g; ``None`` without ``need_theta``).
    """
    _check_lgamma_cell(lgamma_cell, need_theta)
    g = x.shape[1]
    grad, g_theta = out if out is not None else (None, None)
    lib = _lib()
    native = (lib is not None and x.dim() == 2 and heads.shape == (x.shape[0], 2 * g if zero_inflated else g)
              and _plain(x) and _plain(heads) and _plain(log_library) and log_library.shape == x.shape[:1]
              and theta_stride(x, theta) is not None and _plain(theta) and _plain(const) and _plain(lgamma_cell)
              and (const is None or const.shape == x.shape[:1])
              and (lgamma_cell is None or lgamma_cell.shape == x.shape[:1])
              and (grad is None or (_plain(grad) and grad.shape == heads.shape))
              and (g_theta is None or (_plain(g_theta) and g_theta.shape == x.shape)))
    if not native:
        pi = heads[:, g:2 * g] if zero_inflated else None
        nll, g_logits, _, g_th, g_pi = reference.nb_nll_logits(
            x, heads[:, :g], log_library, theta, pi, const, lgamma_cell, (True, False, need_theta, zero_inflated))
        if grad is None:
            grad = torch.empty_like(heads)
        grad[:, :g] = g_logits
        if zero_inflated:
            grad[:, g:2 * g] = g_pi
        if need_theta:
            g_theta = g_th if g_theta is None else g_theta.copy_(g_th)
        return nll, grad, g_theta if need_theta else None
    n = x.shape[0]
    nll, nll_v = _empty(n)
    if grad is None:
        grad = torch.empty_like(heads)
    if need_theta and g_theta is None:
        g_theta = torch.empty_like(x)
    h, d = _view(heads), grad.numpy()
    lib.nb_nll(x=_view(x), theta=_view(theta), nll=nll_v, logits=h[:, :g], log_library=_view(log_library),
               pi=h[:, g:] if zero_inflated else None, const=_view(const), lgamma_cell=_view(lgamma_cell),
               grad_logits=d[:, :g], grad_theta=_view(g_theta) if need_theta else None,
               grad_pi=d[:, g:] if zero_inflated else None, n_threads=_threads(n, g))
    return nll, grad, g_theta if need_theta else None


def lgamma_theta_sum(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Per-cell ``sum_g lgamma(x_g + theta_g) - lgamma(theta_g)`` (the NB term that needs no mean; constant
    while ``theta`` is frozen). ``theta`` per gene or per entry (any broadcastable shape in the reference)."""
    lib = _lib()
    if lib is None or not nb_native_applies(x, x, theta, None):
        return reference.lgamma_theta_sum(x, theta)
    n, g = x.shape
    out = torch.empty(n, dtype=_F32)
    lib.lgamma_theta_sum(x=_view(x), theta=_view(theta), out=out.numpy(), n_threads=_threads(n, g))
    return out


# ---------------------------------------------------------------------------------------------- CSR counts
ArrayLike = np.ndarray | torch.Tensor


def lgamma_theta_sum_csr(indptr: ArrayLike, indices: ArrayLike, data: ArrayLike, theta: torch.Tensor) -> torch.Tensor:
    """:func:`lgamma_theta_sum` of CSR counts over their stored nonzeros (no dense rows).

    Parameters
    ----------
    indptr, indices, data
        The CSR matrix (n + 1 row offsets, column indices, values). The kernel reads int64 / int32 /
        float32 C-contiguous host arrays; other dtypes go to the reference.
    theta
        One inverse dispersion per column (g).

    Returns
    -------
    torch.Tensor
        Per row, float32 (on ``theta``'s device; explicit zeros and empty rows give 0).
    """
    lib = _lib()
    ip, ind, dat = _host_array(indptr, np.int64), _host_array(indices, np.int32), _host_array(data, np.float32)
    if lib is None or ip is None or ind is None or dat is None or not _plain(theta) or theta.dim() != 1:
        return reference.lgamma_theta_sum_csr(_tensor(indptr), _tensor(indices), _tensor(data), theta)
    n = ip.size - 1
    out = torch.empty(max(n, 0), dtype=_F32)
    n_threads = 1 if dat.size < PARALLEL_MIN_ENTRIES else max(1, min(torch.get_num_threads(), max(n, 1)))
    lib.lgamma_theta_sum_csr(indptr=ip, indices=ind, data=dat, theta=_view(theta), out=out.numpy(),
                             n_threads=n_threads)
    return out


def gather_rows(indptr: ArrayLike, indices: ArrayLike, data: ArrayLike, n_cols: int, rows: ArrayLike, *,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """Dense float32 tensor of CSR ``rows`` (any order, repeats allowed): the data loader's minibatch gather,
    one pass over the selected nonzeros (~10x faster than a vectorised scatter).

    Parameters
    ----------
    indptr, indices, data
        The CSR matrix (the kernel reads int64 / int32 / float32 C-contiguous host arrays; anything else
        goes to the reference, which keeps ``data``'s dtype and device).
    n_cols
        Number of columns of the matrix.
    rows
        Rows to gather, each in ``[0, n)``.
    out
        Optional ``len(rows) x n_cols`` float32 host tensor to write into (e.g. a pinned staging buffer);
        returned.
    """
    lib = _lib()
    ip, ind, dat = _host_array(indptr, np.int64), _host_array(indices, np.int32), _host_array(data, np.float32)
    if out is not None and (not _plain(out) or tuple(out.shape) != (len(rows), n_cols)):
        raise ValueError(f"out must be a contiguous float32 host tensor of shape {(len(rows), n_cols)}, "
                         f"got {tuple(out.shape)} {out.dtype} on {out.device}.")
    if lib is None or ip is None or ind is None or dat is None or (isinstance(rows, torch.Tensor) and not rows.is_cpu):
        got = reference.gather_rows(_tensor(indptr), _tensor(indices), _tensor(data), n_cols, _tensor(rows))
        return got if out is None else out.copy_(got)
    r = np.ascontiguousarray(rows.numpy() if isinstance(rows, torch.Tensor) else rows, dtype=np.int64)
    # allocated by numpy, then shared: the gather needs no torch dispatch (also under a fake-tensor mode)
    target = np.empty((r.size, n_cols), dtype=np.float32) if out is None else _view(out)
    lib.gather_rows(indptr=ip, indices=ind, data=dat, rows=r, out=target, n_threads=_threads(r.size, n_cols))
    return torch.from_numpy(target) if out is None else out


def count_flags(values: ArrayLike) -> int:
    """One pass over ``values`` (any shape and order): bit 1 NaN/inf, 2 negative, 4 non-integer, 8 above 2^24;
    0 when all are counts (the data loader's validation; the caller names an offending entry)."""
    lib = _lib()
    if isinstance(values, torch.Tensor):
        arr = _view(values) if values.is_cpu and not values.is_conj() else None
    else:
        arr = values = np.ravel(np.asarray(values), order="K")  # a view for C- or Fortran-ordered input
    if lib is not None and arr is not None and arr.dtype == np.float32:
        flat = np.ascontiguousarray(np.ravel(arr, order="K"))
        return lib.count_flags(values=flat, n_threads=max(1, min(torch.get_num_threads(), flat.size >> 20)))
    return reference.count_flags(_tensor(values))


def log_factorial_rows(indptr: ArrayLike, data: ArrayLike, chunk: int = reference.CSR_CHUNK) -> torch.Tensor:
    """``sum_g lgamma(x_g + 1)`` of each row of CSR counts (``indptr`` n + 1 row offsets, ``data`` the stored
    values; the kernel reads int64 / float32 C-contiguous host arrays), as float32. ``chunk``: nonzeros per
    block of the reference (bounded temporary memory)."""
    lib = _lib()
    ip, dat = _host_array(indptr, np.int64), _host_array(data, np.float32)
    if lib is None or ip is None or dat is None:
        return reference.log_factorial_rows(_tensor(indptr), _tensor(data), chunk)
    n = ip.size - 1
    out = torch.empty(max(n, 0), dtype=_F32)
    lib.log_factorial_rows(indptr=ip, data=dat, out=out.numpy(),
                           n_threads=max(1, min(torch.get_num_threads(), dat.size >> 16)))
    return out


# ---------------------------------------------------------------------------------------------- random
def uniform(n_rows: int, n_cols: int, *, device: torch.device | str | None = None) -> torch.Tensor:
    """``n_rows x n_cols`` float32 uniforms in [0, 1) for dropout masks: a counter-based generator
    (splitmix64, 24 random bits per value, ~4x faster than ``torch.rand`` on CPU) seeded with one draw from
    PyTorch's default generator, so ``torch.manual_seed`` fixes the result, and the same seed gives the same
    values on every device, compiled or not."""
    seed = int(torch.randint(-(2**63), 2**63 - 1, (1,), dtype=_I64))
    device = torch.device("cpu") if device is None else torch.device(device)
    lib = _lib()
    if lib is None or device.type != "cpu":
        return reference.uniform(n_rows, n_cols, seed, device)
    out = torch.empty(n_rows, n_cols, dtype=_F32)
    lib.uniform(out=out.numpy(), seed=seed)
    return out


# ---------------------------------------------------------------------------------------------- optimizer
def adam_step(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None],
              exp_avg: Sequence[torch.Tensor], exp_avg_sq: Sequence[torch.Tensor], *,
              step_size: Sequence[float] | np.ndarray, bias2_sqrt: Sequence[float] | np.ndarray,
              beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """Adam update of each tensor whose gradient is not ``None``, in place (torch.optim.Adam's rule, amsgrad
    off; see :func:`atlasmap.ops.reference.adam_step`): one compiled pass per tensor on CPU float32,
    PyTorch's multi-tensor ``_foreach`` arithmetic elsewhere.

    Parameters
    ----------
    params, grads, exp_avg, exp_avg_sq
        Parallel sequences: parameters, their gradients (``None``: skipped), first and second moments (same
        shapes). Pass :class:`TensorGroup` objects for the ones that stay the same across steps.
    step_size, bias2_sqrt
        Per tensor, ``lr / (1 - beta1^steps)`` and ``sqrt(1 - beta2^steps)`` (each tensor counts its steps).
    beta1, beta2, eps, weight_decay
        As in ``torch.optim.Adam``.
    """
    lib = _lib()
    p, g, m, v = _group(params), _group(grads), _group(exp_avg), _group(exp_avg_sq)
    if lib is None or not (p.plain and g.plain and m.plain and v.plain):
        reference.adam_step(p, g, m, v, step_size, bias2_sqrt, beta1, beta2, eps, weight_decay)
        return
    lib.adam(params=p.views(), grads=g.views(), exp_avg=m.views(), exp_avg_sq=v.views(),
             step_size=np.ascontiguousarray(step_size, dtype=np.float32),
             bias2_sqrt=np.ascontiguousarray(bias2_sqrt, dtype=np.float32), beta1=beta1, beta2=beta2, eps=eps,
             weight_decay=weight_decay, n_threads=max(1, torch.get_num_threads()))


# ---------------------------------------------------------------------------------------------- stack
class CovariateBlocks:
    """The covariate tables a stack layer adds to its pre-activation, as the layer ops read them.

    Parameters
    ----------
    tables
        Per categorical covariate, its table as a list of row blocks (the reference categories, then each
        surgery's new ones); a code indexes the blocks' concatenation. All blocks of a layer have its width.
    grads
        Optional, the same structure: the gradient buffer of each block, ``None`` for blocks that do not
        train (:func:`layer_backward` overwrites the buffers).

    Built once per training call (the blocks train in place): the kernels' views of the blocks are kept,
    and so are those of the codes and of the last forward's outputs, which the backward through the same
    object then does not convert again.
    """

    __slots__ = ("_last", "_native", "grads", "tables")

    def __init__(self, tables: Sequence[Sequence[torch.Tensor]],
                 grads: Sequence[Sequence[torch.Tensor | None]] | None = None) -> None:
        self.tables = tuple(tuple(blocks) for blocks in tables)
        self.grads = None if grads is None else tuple(tuple(g) for g in grads)
        if self.grads is not None and [len(g) for g in self.grads] != [len(b) for b in self.tables]:
            raise ValueError("grads must have one entry per block of tables")
        self._native: tuple | None = None
        self._last: tuple = ()  # (y, rstd, factor) of the last forward through these blocks and their views

    @property
    def n_cov(self) -> int:
        return len(self.tables)

    def native(self) -> tuple | None:
        """``(block views, gradient views)`` for the kernels, ``None`` when a block is not CPU float32."""
        if self._native is None:
            flat = [b for blocks in self.tables for b in blocks]
            flat_grads = [g for grads in self.grads or () for g in grads]
            ok = all(_plain(t) for t in flat + flat_grads)
            self._native = ((tuple(tuple(_view(b) for b in blocks) for blocks in self.tables),
                             None if self.grads is None else
                             tuple(tuple(_view(g) for g in grads) for grads in self.grads)) if ok else ())
        return self._native or None



# The codes of the current minibatch go through every layer of a step, forward and backward: their view is
# kept for the last codes tensor seen (a tuple swapped whole, so concurrent callers never mix two entries;
# it holds the tensor, so identity means the same tensor).
_LAST_CODES: tuple = (None, None)


def _codes_view(codes: torch.Tensor | None) -> np.ndarray | None:
    global _LAST_CODES
    if codes is None:
        return None
    last = _LAST_CODES
    if last[0] is codes:
        return last[1]
    view = _view(codes)
    _LAST_CODES = (codes, view)
    return view


def _blocks(blocks: CovariateBlocks | Sequence[Sequence[torch.Tensor]]) -> CovariateBlocks:
    return blocks if isinstance(blocks, CovariateBlocks) else CovariateBlocks(blocks)


_CODE_ERROR = ("a category code lies outside its covariate table (the model does not know that category); "
               "map new categories with load_query_data.")


def _codes_plain(codes: torch.Tensor | None, n_cov: int) -> bool:
    return (codes is None and n_cov == 0) or (codes is not None and codes.is_cpu and codes.dtype is _I64
                                              and codes.is_contiguous())


def layer_forward(pre: torch.Tensor, codes: torch.Tensor | None, blocks: CovariateBlocks | Sequence[Sequence[torch.Tensor]],
                  *, layer_norm: bool, ln_eps: float, p: float, factor: torch.Tensor | None = None,
                  out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One stack layer's elementwise forward (covariate lookup, layer norm without affine, ReLU, dropout).

    Parameters
    ----------
    pre
        Pre-activation ``W h + b``, n x h.
    codes
        Category codes, n x (>= number of covariates), int64 (``None`` without covariates).
    blocks
        The layer's covariate tables (:class:`CovariateBlocks`).
    layer_norm, ln_eps
        Layer norm without affine parameters, and its ``eps``.
    p, factor
        Dropout probability; ``factor`` (n x h) holds uniform draws u in [0, 1) and is overwritten with the
        dropout factor ``(u >= p) / (1 - p)``; ``None``: no dropout.
    out
        Buffers ``(y, rstd, out)`` to write into.

    Returns
    -------
    tuple
        ``(y, rstd, out)``: the normalised pre-activation (n x h), the per-cell ``1 / std`` (undefined
        without layer norm) and the layer output ``relu(y) * factor`` (n x h).

    Raises
    ------
    InputError
        A code lies outside its table.
    """
    blocks = _blocks(blocks)
    lib = _lib()
    views = blocks.native() if lib is not None else None
    if (views is None or not (_plain(pre) and pre.dim() == 2 and _plain(factor) and _codes_plain(codes, blocks.n_cov))
            or (out is not None and not all(_plain(t) for t in out))):
        try:
            return reference.layer_forward(pre, codes, blocks.tables, layer_norm, ln_eps, p, factor, out)
        except IndexError as err:
            raise InputError(_CODE_ERROR) from err
    n, width = pre.shape
    if out is None:
        (y, y_v), (rstd, rstd_v), (act, act_v) = _empty(n, width), _empty(n), _empty(n, width)
    else:
        y, rstd, act = out
        y_v, rstd_v, act_v = _view(y), _view(rstd), _view(act)
    factor_v = _view(factor)
    try:
        lib.layer_forward(pre=_view(pre), codes=_codes_view(codes), blocks=views[0], layer_norm=layer_norm,
                          ln_eps=ln_eps, p=p, factor=factor_v, y=y_v, rstd=rstd_v, out=act_v)
    except IndexError as err:
        raise InputError(_CODE_ERROR) from err
    blocks._last = (y, rstd, factor, y_v, rstd_v, factor_v)
    return y, rstd, act


def layer_backward(grad: torch.Tensor, y: torch.Tensor, rstd: torch.Tensor | None, factor: torch.Tensor | None,
                   codes: torch.Tensor | None, blocks: CovariateBlocks | Sequence[Sequence[torch.Tensor]], *,
                   layer_norm: bool) -> torch.Tensor:
    """Backward of :func:`layer_forward`.

    ``grad`` (d loss / d out, n x h) is overwritten with d loss / d pre and returned; each gradient buffer of
    ``blocks`` (:class:`CovariateBlocks` built with ``grads``) is overwritten with the sum of d pre over the
    cells whose code falls in that block. ``y``, ``rstd``, ``factor`` are what the forward returned / wrote.
    """
    blocks = _blocks(blocks)
    lib = _lib()
    views = blocks.native() if lib is not None else None
    last = blocks._last
    if last and last[0] is y and last[1] is rstd and last[2] is factor:  # the last forward's (checked) outputs
        saved = last[3:]
        native = views is not None
    else:
        saved = None
        native = views is not None and _plain(y) and _plain(rstd) and _plain(factor)
    if not (native and _plain(grad) and grad.dim() == 2 and _codes_plain(codes, blocks.n_cov)):
        try:
            return reference.layer_backward(grad, y, rstd, factor, layer_norm, codes, blocks.tables, blocks.grads)
        except IndexError as err:
            raise InputError(_CODE_ERROR) from err
    y_v, rstd_v, factor_v = saved if saved is not None else (_view(y), _view(rstd), _view(factor))
    try:
        lib.layer_backward(grad=_view(grad), y=y_v, rstd=rstd_v, factor=factor_v, layer_norm=layer_norm,
                           codes=_codes_view(codes), blocks=views[0], block_grads=views[1])
    except IndexError as err:
        raise InputError(_CODE_ERROR) from err
    return grad


def latent_forward(mv: torch.Tensor, noise: torch.Tensor, var_eps: float,
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The latent sample and its KL term from ``mv`` (n x 2l: mean, then log-variance pre-activation) and
    standard normal ``noise`` (n x l): ``var = exp(v) + var_eps``, ``z = mean + sqrt(var) noise``,
    ``kl = 0.5 sum (var + mean^2 - 1 - log var)``. Returns ``(z, var, kl)``."""
    lib = _lib()
    if lib is None or not (_plain(mv) and _plain(noise) and mv.dim() == 2):
        return reference.latent_forward(mv, noise, var_eps)
    n, n_latent = noise.shape
    (z, z_v), (var, var_v), (kl, kl_v) = _empty(n, n_latent), _empty(n, n_latent), _empty(n)
    lib.latent_forward(mv=_view(mv), noise=_view(noise), var_eps=var_eps, z=z_v, var=var_v, kl=kl_v)
    return z, var, kl


def latent_backward(dz: torch.Tensor, mv: torch.Tensor, var: torch.Tensor, noise: torch.Tensor, var_eps: float,
                    kl_scale: float) -> torch.Tensor:
    """d loss / d ``mv`` of :func:`latent_forward` from d loss / d ``z`` (``dz``, already scaled as the loss
    scales it) and the KL weight ``kl_scale`` (loss = ... + kl_scale * sum kl)."""
    lib = _lib()
    if lib is None or not (_plain(dz) and _plain(mv) and _plain(var) and _plain(noise) and mv.dim() == 2):
        return reference.latent_backward(dz, mv, var, noise, var_eps, kl_scale)
    dmv, dmv_v = _empty(*mv.shape)
    lib.latent_backward(dz=_view(dz), mv=_view(mv), var=_view(var), noise=_view(noise), var_eps=var_eps,
                        kl_scale=kl_scale, dmv=dmv_v)
    return dmv


__all__ = [
    "PARALLEL_MIN_ENTRIES", "CovariateBlocks", "TensorGroup", "adam_step", "available", "count_flags",
    "gather_rows", "latent_backward", "latent_forward", "layer_backward", "layer_forward", "lgamma_theta_sum",
    "lgamma_theta_sum_csr", "log_factorial_rows", "native_module", "nb_native_applies", "nb_nll",
    "nb_nll_heads", "nb_nll_logits", "reference", "theta_stride", "uniform",
]
