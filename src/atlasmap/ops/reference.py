"""Pure-PyTorch implementations of every operation of :mod:`atlasmap.ops`.

They are the specification the compiled kernels are tested against (``tests/test_ops.py``) and the path
that runs wherever the kernels do not: other devices (CUDA, ``meta``), other dtypes, an install without a
C compiler, ``ATLASMAP_KERNEL=0``. Everything is written with PyTorch operations on the inputs' device and
dtype (no ``.numpy()``, no host round trips where the result does not need one), so the same code runs on
the CPU, on a GPU and on the ``meta`` device (shapes only).

Conventions are those of the kernels: gradients are d NLL / d input per entry (the NB functions), the
layer backward overwrites its incoming gradient with d loss / d pre-activation, dropout uniforms are
overwritten with the dropout factor. Callers normally use the typed entry points of :mod:`atlasmap.ops`,
which choose between this module and the compiled one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

#: The ``eps`` of the NB log-likelihood (as scvi-tools' ``log_nb_positive``).
EPS = 1e-8

#: Below this fraction of nonzero counts in a CPU minibatch, the lgamma / digamma terms (zero wherever
#: x == 0) are evaluated on the nonzero entries only; single-cell minibatches are typically 2-20% nonzero.
SPARSE_DENSITY = 0.25

#: Nonzeros per chunk of the CSR reductions (bounded temporary memory for host-resident matrices).
CSR_CHUNK = 1 << 22


# ---------------------------------------------------------------------------------------------- likelihood
def log_factorial_sum(x: torch.Tensor) -> torch.Tensor:
    """``sum_g lgamma(x_g + 1)`` of each cell: the part of the count likelihood that only depends on data."""
    return torch.lgamma(x + 1).sum(-1)


class CountGammas:
    """``lgamma(x + theta) - lgamma(theta)`` and ``digamma(x + theta) - digamma(theta)``: the two most
    expensive elementwise functions of the NB likelihood. Both are exactly zero where ``x == 0``, so on
    sparse CPU minibatches they run on the nonzero entries only (found once, shared by forward and gradient;
    elsewhere the dense form keeps shapes static: no host synchronisation, fine on ``meta``). Both are
    differences of two large numbers when ``theta`` or ``x`` is large, so they are evaluated in float64 and
    returned in the dtype of ``x``."""

    def __init__(self, x: torch.Tensor, theta: torch.Tensor) -> None:
        self.x, self.theta = x, theta
        n_genes = x.shape[-1]
        self.sparse = False
        if x.dim() == 2 and x.is_contiguous() and x.device.type == "cpu" and x.numel() \
                and not torch.compiler.is_compiling():  # data-dependent shapes do not compile
            probe = x[: min(8, x.shape[0])]
            self.sparse = float((probe > 0).float().mean()) < SPARSE_DENSITY
        if self.sparse:
            flat = x.reshape(-1)
            self.idx = torch.nonzero(flat).squeeze(1)
            if theta.shape == x.shape:
                th = theta.reshape(-1).take(self.idx)
            elif theta.dim() == 1:
                th = theta.take(self.idx % n_genes)
            else:
                th = theta.expand_as(x).reshape(-1).take(self.idx)
            self.theta_nz = th.double()
            self.y = flat.take(self.idx).double().add_(self.theta_nz)
        else:
            self.y = x.double() + theta.double()

    def lgamma_cell_sum(self) -> torch.Tensor:
        """Per-cell ``sum_g lgamma(x + theta) - lgamma(theta)``."""
        if self.sparse:
            values = torch.lgamma(self.y).sub_(torch.lgamma(self.theta_nz))
            out = torch.zeros(self.x.shape[0], dtype=values.dtype, device=values.device)
            out.index_add_(0, torch.div(self.idx, self.x.shape[-1], rounding_mode="floor"), values)
            return out.to(self.x.dtype)
        return (torch.lgamma(self.y) - torch.lgamma(self.theta.double())).sum(-1).to(self.x.dtype)

    def add_digamma_(self, out: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
        """``out += alpha * (digamma(x + theta) - digamma(theta))`` (``out`` has the shape of ``x``)."""
        if self.sparse:
            diff = torch.digamma(self.y).sub_(torch.digamma(self.theta_nz))
            out.view(-1).index_add_(0, self.idx, diff.to(out.dtype), alpha=alpha)
            return out
        return out.add_((torch.digamma(self.y) - torch.digamma(self.theta.double())).to(out.dtype), alpha=alpha)


def nll_terms(x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor, pi_logits: torch.Tensor | None,
              need: tuple[bool, bool, bool] = (False, False, False), lgamma_cell: torch.Tensor | None = None,
              ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor | None]]:
    """The NB / ZINB log-likelihood without ``-lgamma(x + 1)``, as elementwise terms ``f`` (shape of the
    broadcast inputs) and the per-cell ``sum_g lgamma(x + theta) - lgamma(theta)``, plus the derivatives of
    the NLL ``-sum f - cell`` with respect to ``mu``, ``theta`` and ``pi_logits`` that ``need`` asks for, per
    entry (``None`` for the others).

    With ``a = log(theta + mu + eps)`` (``log(theta + eps) - a`` computed as ``-log1p(mu / (theta + eps))``,
    accurate when theta >> mu)::

        f_nb   = theta (log(theta + eps) - a) + x (log(mu + eps) - a)
        f_zinb = x == 0 : softplus(ptl) - softplus(-pi)          ptl = theta (log(theta + eps) - a) - pi
                 x >  0 : ptl - softplus(-pi) + x (log(mu + eps) - a)

    ``lgamma_cell``, when given, is the per-cell sum already computed (constant while ``theta`` is frozen,
    e.g. in query training); it cannot be combined with the gradient of ``theta``.
    """
    need_mu, need_theta, need_pi = need
    need_pi = need_pi and pi_logits is not None
    if lgamma_cell is not None and need_theta:
        raise ValueError("lgamma_cell can only be given when theta needs no gradient")
    gammas = CountGammas(x, theta) if lgamma_cell is None or need_theta else None
    cell = lgamma_cell if lgamma_cell is not None else gammas.lgamma_cell_sum()
    tme = mu + theta
    tme.add_(EPS)  # theta + mu + eps
    # la = log(theta + eps) - log(theta + mu + eps) as -log1p(mu / (theta + eps)): theta * la stays accurate
    # for the large inverse dispersions of Poisson-like genes (a difference of two logs would not)
    l1p = torch.log1p(mu / (theta + EPS))
    a = torch.log(theta + EPS) + l1p  # log(theta + mu + eps)
    la = l1p.neg_()
    u = la * theta  # theta * (log theta - log(theta + mu)): log P(x = 0) under the NB
    f = torch.log(mu + EPS).sub_(a).mul_(x)  # x * (log mu - log(theta + mu))
    d = None
    if pi_logits is None:
        f.add_(u)
    else:
        zero = (x < EPS).to(x.dtype)
        ptl = u.sub_(pi_logits)  # u - pi (u is not used after this)
        # x == 0: softplus(ptl) - softplus(-pi); x > 0: ptl - softplus(-pi) + (terms in f)
        f.add_(F.softplus(ptl).sub_(ptl).mul_(zero).add_(ptl)).sub_(F.softplus(-pi_logits))
        if need_mu or need_theta or need_pi:
            d = torch.sigmoid(ptl).sub_(1).mul_(zero).add_(1)  # d f / d ptl
    grads: list[torch.Tensor | None] = [None, None, None]
    if need_pi:
        grads[2] = torch.sub(d, torch.sigmoid(-pi_logits))  # d nll / d pi = D - sigmoid(-pi)
    if not (need_mu or need_theta):
        return f, cell, grads
    r = torch.reciprocal(tme)  # 1 / (theta + mu + eps)
    theta_r = r * theta
    if d is not None:
        theta_r.mul_(d)  # D theta r
    if need_theta:
        # d nll / d theta = D theta r + x r - D (la + theta / (theta + eps)) - (digamma(x + theta) - digamma(theta))
        part = la.add_(theta / (theta + EPS))
        if d is not None:
            part.mul_(d)
        grads[1] = gammas.add_digamma_(torch.mul(r, x).add_(theta_r).sub_(part), alpha=-1.0)
    if need_mu:
        # d nll / d mu = D theta r - x (1 / (mu + eps) - 1 / (theta + mu + eps))
        grads[0] = torch.sub(r, torch.reciprocal(mu + EPS)).mul_(x).add_(theta_r)
    return f, cell, grads


def nb_nll(x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor, pi_logits: torch.Tensor | None,
           const: torch.Tensor | None, lgamma_cell: torch.Tensor | None,
           need: tuple[bool, bool, bool] = (False, False, False),
           ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Per-cell NLL ``const - sum_g f - cell`` (see :func:`nll_terms`; ``const`` is usually
    :func:`log_factorial_sum`, ``None`` for 0) and, as ``need`` asks, d NLL / d ``mu``, ``theta`` and
    ``pi_logits`` per entry. Any broadcastable shapes and any floating dtype."""
    f, cell, (g_mu, g_theta, g_pi) = nll_terms(x, mu, theta, pi_logits, need, lgamma_cell)
    total = f.sum(-1)
    nll = total.neg_().sub_(cell) if const is None else (const - total).sub_(cell)
    return nll, g_mu, g_theta, g_pi


def nb_nll_logits(x: torch.Tensor, logits: torch.Tensor, log_library: torch.Tensor, theta: torch.Tensor,
                  pi_logits: torch.Tensor | None, const: torch.Tensor | None, lgamma_cell: torch.Tensor | None,
                  need: tuple[bool, bool, bool, bool] = (False, False, False, False),
                  ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None,
                             torch.Tensor | None]:
    """:func:`nb_nll` with ``mu = exp(log_library) * softmax(logits, -1)`` (``log_library`` one value per
    cell, shape ``(n,)``). Returns the NLL and, as ``need`` asks, d NLL / d ``logits``, ``log_library``,
    ``theta`` (per entry) and ``pi_logits``."""
    need_logits, need_lib, need_theta, need_pi = need
    p = torch.softmax(logits, dim=-1)
    mu = p * torch.exp(log_library).unsqueeze(-1)
    want_mu = need_logits or need_lib
    nll, g_mu, g_theta, g_pi = nb_nll(x, mu, theta, pi_logits, const, lgamma_cell, (want_mu, need_theta, need_pi))
    g_logits = g_lib = None
    if want_mu:
        # d nll / d s_j = mu_j gm_j - p_j sum_k mu_k gm_k; d nll / d log_library = sum_k mu_k gm_k
        mg = g_mu.mul_(mu)
        q = mg.sum(-1)
        g_lib = q if need_lib else None
        g_logits = mg.sub_(p.mul_(q.unsqueeze(-1))) if need_logits else None
    return nll, g_logits, g_lib, g_theta, g_pi


def lgamma_theta_sum(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """``sum_g lgamma(x_g + theta_g) - lgamma(theta_g)`` of each cell (the NB term that needs no ``mu``)."""
    return CountGammas(x, theta).lgamma_cell_sum()


# ---------------------------------------------------------------------------------------------- CSR counts
def _chunks(indptr: torch.Tensor, chunk: int) -> list[tuple[int, int]]:
    """Row ranges of about ``chunk`` stored entries each (rows are never split). Only for a host-resident
    ``indptr``; elsewhere one range (reading its values would mean a device round trip)."""
    n = indptr.numel() - 1
    if indptr.device.type != "cpu" or n <= 0:
        return [(0, max(n, 0))]
    ptr = indptr.numpy()
    bounds, lo = [], 0
    while lo < n:
        hi = int(np.searchsorted(ptr, ptr[lo] + chunk, side="right")) - 1
        hi = min(max(hi, lo + 1), n)
        bounds.append((lo, hi))
        lo = hi
    return bounds


def _csr_row_sums(indptr: torch.Tensor, data: torch.Tensor, chunk: int,
                  entry_values: Callable[[torch.Tensor, slice], torch.Tensor]) -> torch.Tensor:
    """Per-row sums of ``entry_values(stored values, column slice)`` over CSR rows, in float64: on the host
    chunk by chunk of rows (only the chunk's entries are read), elsewhere in one pass over ``data``."""
    n = max(indptr.numel() - 1, 0)
    parts = []
    for lo, hi in _chunks(indptr, chunk):
        ptr = indptr[lo:hi + 1]
        if indptr.device.type == "cpu":
            first, last = int(ptr[0]), int(ptr[-1])
            span = slice(first, last)
        else:
            first, span = 0, slice(None)
        values = entry_values(data[span], span)
        if hi == lo:
            parts.append(torch.zeros(0, dtype=torch.float64, device=values.device))
            continue
        ptr = ptr.to(values.device)
        pos = torch.arange(values.numel(), device=values.device) + first
        row = torch.searchsorted(ptr, pos, right=True) - 1
        inside = (row >= 0) & (row < hi - lo)  # entries outside the rows' ranges are not read
        values = torch.where(inside, values, torch.zeros((), dtype=values.dtype, device=values.device))
        out = torch.zeros(hi - lo, dtype=values.dtype, device=values.device)
        parts.append(out.index_add_(0, row.clamp_(0, hi - lo - 1), values))
    return torch.cat(parts) if len(parts) > 1 else parts[0] if parts else torch.zeros(n, dtype=torch.float64)


def log_factorial_rows(indptr: torch.Tensor, data: torch.Tensor, chunk: int = CSR_CHUNK) -> torch.Tensor:
    """``sum_g lgamma(x_g + 1)`` of each row of CSR counts (``indptr``: n + 1 row offsets into ``data``, the
    stored values), accumulated in float64 and returned as float32 on ``data``'s device; on the host, rows of
    about ``chunk`` stored entries at a time (bounded temporary memory)."""
    return _csr_row_sums(indptr, data, chunk, lambda x, _: torch.lgamma(x.double() + 1.0)).to(torch.float32)


def lgamma_theta_sum_csr(indptr: torch.Tensor, indices: torch.Tensor, data: torch.Tensor, theta: torch.Tensor,
                         chunk: int = CSR_CHUNK) -> torch.Tensor:
    """:func:`lgamma_theta_sum` of CSR counts (``theta`` one value per column) over the stored positive
    entries (explicit zeros contribute nothing), computed on ``theta``'s device and returned in its dtype."""
    theta = theta.reshape(-1)
    dev = theta.device

    def values(x: torch.Tensor, span: slice) -> torch.Tensor:
        x = x.to(dev, torch.float64)
        t = theta.index_select(0, indices[span].to(dev, torch.int64)).double()
        return torch.where(x > 0, torch.lgamma(x + t) - torch.lgamma(t), torch.zeros((), dtype=x.dtype, device=dev))

    return _csr_row_sums(indptr, data, chunk, values).to(dev, theta.dtype)


def gather_rows(indptr: torch.Tensor, indices: torch.Tensor, data: torch.Tensor, n_cols: int,
                rows: torch.Tensor) -> torch.Tensor:
    """Dense ``len(rows) x n_cols`` block of CSR ``rows`` (any order, repeats allowed), in ``data``'s dtype
    and on its device, by one vectorised scatter of the selected entries. (Its size depends on the data:
    on ``meta`` only the shape is produced.)"""
    rows = rows.to(data.device, torch.int64)
    out = torch.zeros((rows.numel(), n_cols), dtype=data.dtype, device=data.device)
    if data.is_meta or rows.is_meta:
        return out
    indptr = indptr.to(data.device, torch.int64)
    starts = indptr.index_select(0, rows)
    lengths = indptr.index_select(0, rows + 1) - starts
    total = int(lengths.sum())
    if total == 0:
        return out
    offsets = torch.cumsum(lengths, 0) - lengths
    pos = torch.arange(total, device=data.device) - torch.repeat_interleave(offsets - starts, lengths,
                                                                           output_size=total)
    which = torch.repeat_interleave(torch.arange(rows.numel(), device=data.device), lengths, output_size=total)
    out[which, indices.to(data.device).index_select(0, pos).long()] = data.index_select(0, pos)
    return out


def count_flags(values: torch.Tensor, chunk: int = CSR_CHUNK) -> int:
    """One pass over ``values``: bit 1 NaN/inf, 2 negative, 4 non-integer, 8 above 2^24 (0: all are counts).
    The comparisons are those of float32 counts: integers up to 2^24 are exact."""
    flat = values.reshape(-1)
    flags = torch.zeros(4, dtype=torch.bool, device=flat.device)
    for lo in range(0, flat.numel(), chunk):
        v = flat[lo:lo + chunk]
        flags |= torch.stack([(~torch.isfinite(v)).any(), (v < 0).any(),
                              ((v < 2**24) & (v != torch.trunc(v))).any(), (v > 2**24).any()])
    bits = flags.tolist()
    return sum(1 << i for i, b in enumerate(bits) if b)


# ---------------------------------------------------------------------------------------------- random
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)  # the splitmix64 constants as signed int64
_MIX1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_MIX2 = 0x94D049BB133111EB - (1 << 64)


def _shift_right(z: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (``>>`` on int64 is arithmetic)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def uniform(n_rows: int, n_cols: int, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``n_rows x n_cols`` float32 uniforms in [0, 1) with 24 random bits each: splitmix64 of
    ``seed + i * golden`` (``seed`` an int64 bit pattern), the counter-based generator of the compiled
    kernel, bit for bit, on any device."""
    z = torch.arange(n_rows * n_cols, dtype=torch.int64, device=device).mul_(_GOLDEN).add_(seed)
    z = (z ^ _shift_right(z, 30)).mul_(_MIX1)
    z = (z ^ _shift_right(z, 27)).mul_(_MIX2)
    z = z ^ _shift_right(z, 31)
    return _shift_right(z, 40).to(torch.float32).mul_(2.0**-24).reshape(n_rows, n_cols)


# ---------------------------------------------------------------------------------------------- optimizer
def adam_step(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None],
              exp_avg: Sequence[torch.Tensor], exp_avg_sq: Sequence[torch.Tensor], step_size: Sequence[float],
              bias2_sqrt: Sequence[float], beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """torch.optim.Adam's update (L2 weight decay added to the gradient, amsgrad off) of the tensors whose
    gradient is not ``None``, in place, with PyTorch's multi-tensor ``_foreach`` arithmetic::

        g += wd p;  m = lerp(m, g, 1 - beta1);  v = beta2 v + (1 - beta2) g^2
        p -= step_size * m / (sqrt(v) / bias2_sqrt + eps)

    ``step_size[t] = lr / (1 - beta1^steps_t)`` and ``bias2_sqrt[t] = sqrt(1 - beta2^steps_t)`` per tensor."""
    idx = [i for i, g in enumerate(grads) if g is not None]
    if not idx:
        return
    ps = [params[i] for i in idx]
    gs = [grads[i] for i in idx]
    if weight_decay:
        gs = torch._foreach_add(gs, ps, alpha=weight_decay)
    ms = [exp_avg[i] for i in idx]
    vs = [exp_avg_sq[i] for i in idx]
    torch._foreach_lerp_(ms, gs, 1.0 - beta1)
    torch._foreach_mul_(vs, beta2)
    torch._foreach_addcmul_(vs, gs, gs, 1.0 - beta2)
    denom = torch._foreach_sqrt(vs)
    torch._foreach_div_(denom, [float(bias2_sqrt[i]) for i in idx])
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(ps, ms, denom, [-float(step_size[i]) for i in idx])


# ---------------------------------------------------------------------------------------------- stack
def _table(blocks: Sequence[torch.Tensor]) -> torch.Tensor:
    return blocks[0] if len(blocks) == 1 else torch.cat(list(blocks), dim=0)


def _check_codes(codes: torch.Tensor | None, tables: Sequence[Sequence[torch.Tensor]]) -> None:
    """IndexError for a code outside its table (host codes only: elsewhere that check would be a device
    round trip, and an out-of-range index is the device's own error)."""
    if not tables or codes is None or not codes.is_cpu or codes.shape[0] == 0:
        return
    n_rows = [sum(int(b.shape[0]) for b in blocks) for blocks in tables]
    used = codes[:, :len(tables)]
    if bool((used < 0).any()) or bool((used >= torch.tensor(n_rows, dtype=used.dtype)).any()):
        raise IndexError("codes: a category code lies outside its covariate table")


def _float32(value: float) -> float:
    """``value`` rounded to float32, as the kernels receive it."""
    return float(np.float32(value))


def dropout_scale(p: float) -> float:
    """``1 / (1 - p)`` in float32 arithmetic (the kernels' ``1.0f / (1.0f - p)``), 1 for ``p = 0``."""
    p32 = np.float32(p)
    return float(np.float32(1.0) / (np.float32(1.0) - p32)) if p32 > 0 else 1.0


def layer_forward(pre: torch.Tensor, codes: torch.Tensor | None, tables: Sequence[Sequence[torch.Tensor]],
                  layer_norm: bool, ln_eps: float, p: float, factor: torch.Tensor | None,
                  out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One stack layer's elementwise forward, from its pre-activation ``pre`` (n x h, ``W h + b``)::

        y = pre + sum_j T_j[codes[:, j]]     T_j: the concatenation of covariate j's blocks ``tables[j]``
        y = (y - mean(y)) * rstd             layer norm without affine parameters (``layer_norm``)
        out = relu(y) * factor               factor = (u >= p) / (1 - p) from uniform draws u (dropout)

    ``factor``, when given, holds the uniform draws u and is overwritten with the dropout factor. Returns
    ``(y, rstd, out)`` (``rstd`` per cell, undefined without layer norm), written into ``out`` when given."""
    _check_codes(codes, tables)
    y_buf, rstd_buf, out_buf = out if out is not None else (None, None, None)
    y = pre.clone() if y_buf is None else y_buf.copy_(pre)
    for j, blocks in enumerate(tables):
        y.add_(_table(blocks).index_select(0, codes[:, j]))
    n = pre.shape[0]
    rstd = torch.empty(n, dtype=pre.dtype, device=pre.device) if rstd_buf is None else rstd_buf
    if layer_norm:
        y.sub_(y.mean(-1, keepdim=True))  # two passes, as PyTorch's layer norm
        torch.rsqrt((y * y).mean(-1).add_(_float32(ln_eps)), out=rstd)
        y.mul_(rstd.unsqueeze(-1))
    act = torch.relu(y) if out_buf is None else torch.clamp(y, min=0.0, out=out_buf)
    if factor is not None:
        torch.mul((factor >= _float32(p)).to(factor.dtype), dropout_scale(p), out=factor)
        act.mul_(factor)
    return y, rstd, act


def layer_backward(grad: torch.Tensor, y: torch.Tensor, rstd: torch.Tensor | None, factor: torch.Tensor | None,
                   layer_norm: bool, codes: torch.Tensor | None, tables: Sequence[Sequence[torch.Tensor]],
                   grads: Sequence[Sequence[torch.Tensor | None]] | None) -> torch.Tensor:
    """Backward of :func:`layer_forward`: ``grad`` (d loss / d out) is overwritten with d loss / d pre::

        d y = d out * factor * [y > 0]
        d pre = rstd (d y - mean(d y) - y mean(d y y))      (with layer norm; else d y)

    and each gradient buffer ``grads[j][b]`` (of block ``tables[j][b]``; ``None``: the block does not train)
    is overwritten with the sum of d pre over the cells whose code falls in that block. Returns ``grad``."""
    _check_codes(codes, tables)
    g = grad * factor if factor is not None else grad.clone()
    g = torch.where(y > 0, g, torch.zeros((), dtype=g.dtype, device=g.device))
    if layer_norm:
        mg = g.mean(-1, keepdim=True)
        mgy = (g * y).mean(-1, keepdim=True)
        g = (g - mg - y * mgy).mul_(rstd.unsqueeze(-1))
    grad.copy_(g)
    for j, blocks in enumerate(tables):
        block_grads = grads[j] if grads is not None else [None] * len(blocks)
        if all(b is None for b in block_grads):
            continue
        total = sum(int(b.shape[0]) for b in blocks)
        full = torch.zeros(total, grad.shape[1], dtype=grad.dtype, device=grad.device)
        full.index_add_(0, codes[:, j], grad)
        lo = 0
        for block, block_grad in zip(blocks, block_grads, strict=True):
            hi = lo + int(block.shape[0])
            if block_grad is not None:
                block_grad.copy_(full[lo:hi])
            lo = hi
    return grad


def latent_forward(mv: torch.Tensor, noise: torch.Tensor, var_eps: float,
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The latent sample and its KL term from ``mv`` (n x 2l: the mean, then the log-variance
    pre-activation) and standard normal ``noise`` (n x l)::

        var = exp(v) + var_eps,  z = mean + sqrt(var) noise,  kl = 0.5 sum (var + mean^2 - 1 - log var)

    Returns ``(z, var, kl)``; the KL is accumulated in float64, as the kernel does."""
    n_latent = noise.shape[-1]
    mean, v = mv[:, :n_latent], mv[:, n_latent:]
    var = torch.exp(v).add_(_float32(var_eps))
    z = torch.sqrt(var).mul_(noise).add_(mean)
    vd, md = var.double(), mean.double()
    kl = (vd + md * md - 1.0 - torch.log(vd)).sum(-1).mul_(0.5).to(mv.dtype)
    return z, var, kl


def latent_backward(dz: torch.Tensor, mv: torch.Tensor, var: torch.Tensor, noise: torch.Tensor,
                    var_eps: float, kl_scale: float) -> torch.Tensor:
    """d loss / d ``mv`` of :func:`latent_forward`, from d loss / d z (``dz``) and the KL weight
    ``kl_scale`` (loss = ... + kl_scale * sum kl)::

        d mean = dz + kl_scale mean
        d v = (dz noise / (2 sqrt(var)) + kl_scale (1 - 1 / var) / 2) exp(v)"""
    n_latent = noise.shape[-1]
    mean, v = mv[:, :n_latent], mv[:, n_latent:]
    scale = _float32(kl_scale)
    d_mean = mean * scale + dz
    d_var = (dz * noise).mul_(0.5).div_(torch.sqrt(var)).add_(torch.reciprocal(var).neg_().add_(1.0).mul_(scale * 0.5))
    return torch.cat([d_mean, d_var.mul_(torch.exp(v))], dim=1)


__all__ = [
    "CSR_CHUNK", "EPS", "SPARSE_DENSITY", "CountGammas", "adam_step", "count_flags", "dropout_scale",
    "gather_rows", "latent_backward", "latent_forward", "layer_backward", "layer_forward", "lgamma_theta_sum",
    "lgamma_theta_sum_csr", "log_factorial_rows", "log_factorial_sum", "nb_nll", "nb_nll_logits", "nll_terms",
    "uniform",
]
