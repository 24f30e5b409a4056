"""Count log-likelihoods, vectorised, in one place (parametrised like scvi-tools: mean ``mu``,
inverse dispersion ``theta``, zero-inflation logits ``pi_logits``). Each returns cells x genes."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from atlasmap.nn import kernel


def log_nb(x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Negative binomial log-probability."""
    log_theta_mu_eps = torch.log(theta + mu + eps)
    return (
        theta * (torch.log(theta + eps) - log_theta_mu_eps)
        + x * (torch.log(mu + eps) - log_theta_mu_eps)
        + torch.lgamma(x + theta)
        - torch.lgamma(theta)
        - torch.lgamma(x + 1)
    )


def log_zinb(
    x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor, pi_logits: torch.Tensor, eps: float = 1e-8
) -> torch.Tensor:
    """Zero-inflated negative binomial log-probability (zero-inflation as logits)."""
    softplus_pi = F.softplus(-pi_logits)
    log_theta_eps = torch.log(theta + eps)
    log_theta_mu_eps = torch.log(theta + mu + eps)
    pi_theta_log = -pi_logits + theta * (log_theta_eps - log_theta_mu_eps)
    case_zero = F.softplus(pi_theta_log) - softplus_pi
    case_non_zero = (
        -softplus_pi
        + pi_theta_log
        + x * (torch.log(mu + eps) - log_theta_mu_eps)
        + torch.lgamma(x + theta)
        - torch.lgamma(theta)
        - torch.lgamma(x + 1)
    )
    return torch.where(x < eps, case_zero, case_non_zero)


def log_poisson(x: torch.Tensor, mu: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Poisson log-probability."""
    return x * torch.log(mu + eps) - mu - torch.lgamma(x + 1)


# ----------------------------------------------------------------------------------------------------------
# Fused negative log-likelihoods for training: the same values as ``-log_zinb(...).sum(-1)`` /
# ``-log_nb(...).sum(-1)`` but with hand-written gradients computed in the forward pass, only for the
# inputs that need them. Autograd through the functions above records ~70 cells x genes kernels per step
# (forward and backward: where, two softplus, three lgamma, digamma, their backward); here it is ~45 cheap
# in-place passes, no ``lgamma(x + 1)`` (a per-cell constant computed once from the sparse counts), lgamma /
# digamma on the nonzero counts only for sparse minibatches, and no digamma / lgamma at all while the
# dispersion is frozen (query training). ``benchmarks/profile_step.py`` shows where a step's time goes.
# ----------------------------------------------------------------------------------------------------------

_EPS = 1e-8


def log_factorial_sum(x: torch.Tensor) -> torch.Tensor:
    """``sum_g lgamma(x_g + 1)`` of each cell: the part of the count likelihood that only depends on data."""
    return torch.lgamma(x + 1).sum(-1)


#: Below this fraction of nonzero counts in a minibatch, the lgamma / digamma terms (zero wherever x == 0)
#: are evaluated on the nonzero entries only; single-cell minibatches are typically 2-20% nonzero.
SPARSE_DENSITY = 0.25


class _CountGammas:
    """``lgamma(x + theta) - lgamma(theta)`` and ``digamma(x + theta) - digamma(theta)``: the two most
    expensive elementwise functions of the NB likelihood. Both are exactly zero where ``x == 0``, so on
    sparse minibatches they run on the nonzero entries only (found once, shared by forward and gradient).
    Both are differences of two large numbers when ``theta`` or ``x`` is large, so they are evaluated in
    float64 and returned in the dtype of ``x``."""

    def __init__(self, x: torch.Tensor, theta: torch.Tensor) -> None:
        self.x, self.theta = x, theta
        n_genes = x.shape[-1]
        # only on the CPU: the density probe and nonzero() read values back to the host, a synchronisation
        # per step on a GPU, where the dense evaluation costs less than that
        self.sparse = (x.dim() == 2 and x.is_contiguous() and x.device.type == "cpu"
                       and float((x[: min(8, x.shape[0])] > 0).float().mean()) < SPARSE_DENSITY)
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

    def add_digamma_(self, out: torch.Tensor) -> torch.Tensor:
        """``out += digamma(x + theta) - digamma(theta)`` (``out`` has the shape of ``x``)."""
        if self.sparse:
            diff = torch.digamma(self.y).sub_(torch.digamma(self.theta_nz))
            out.view(-1).index_add_(0, self.idx, diff.to(out.dtype))
            return out
        return out.add_((torch.digamma(self.y) - torch.digamma(self.theta.double())).to(out.dtype))


def _nb_terms(x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor, pi_logits: torch.Tensor | None,
              need: tuple[bool, bool, bool] = (False, False, False),
              lgamma_theta_term: torch.Tensor | None = None,
              ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor | None]]:
    """Log-likelihood terms without ``-lgamma(x + 1)``: elementwise ones (cells x genes) and the per-cell
    ``sum_g lgamma(x + theta) - lgamma(theta)``, plus the derivatives with respect to ``mu``, ``theta``
    and ``pi_logits`` that ``need`` asks for (``None`` for the others).

    ``lgamma_theta_term``, when given, is that per-cell sum already computed (constant while ``theta`` is
    frozen, e.g. in query training).
    """
    need_mu, need_theta, need_pi = need
    gammas = _CountGammas(x, theta) if lgamma_theta_term is None or need_theta else None
    cell = lgamma_theta_term if lgamma_theta_term is not None else gammas.lgamma_cell_sum()
    tme = mu + theta
    tme.add_(_EPS)  # theta + mu + eps
    # la = log(theta + eps) - log(theta + mu + eps) as -log1p(mu / (theta + eps)): theta * la stays accurate
    # for the large inverse dispersions of Poisson-like genes (a difference of two logs would not)
    l1p = torch.log1p(mu / (theta + _EPS))
    a = torch.log(theta + _EPS) + l1p  # log(theta + mu + eps)
    la = l1p.neg_()
    u = la * theta  # theta * (log theta - log(theta + mu)): log P(x = 0) under the NB
    f = torch.log(mu + _EPS).sub_(a).mul_(x)  # x * (log mu - log(theta + mu))
    d = None
    if pi_logits is None:
        f.add_(u)
    else:
        zero = (x < _EPS).to(x.dtype)
        ptl = u.sub_(pi_logits)  # u - pi (u is not used after this)
        # x == 0: softplus(ptl) - softplus(-pi); x > 0: ptl - softplus(-pi) + (terms in f)
        f.add_(F.softplus(ptl).sub_(ptl).mul_(zero).add_(ptl)).sub_(F.softplus(-pi_logits))
        if need_mu or need_theta or need_pi:
            d = torch.sigmoid(ptl).sub_(1).mul_(zero).add_(1)  # d f / d ptl
    grads: list[torch.Tensor | None] = [None, None, None]
    if not (need_mu or need_theta):
        if need_pi:
            grads[2] = torch.sigmoid(-pi_logits).sub_(d)
        return f, cell, grads
    r = torch.reciprocal(tme)  # 1 / (theta + mu + eps)
    theta_r = r * theta
    if d is not None:
        theta_r.mul_(d)  # D theta r
    if need_theta:
        # d f / d theta = D (la + theta / (theta + eps)) - D theta r - x r + digamma(x + theta) - digamma(theta)
        g_theta = la.add_(theta / (theta + _EPS))
        if d is not None:
            g_theta.mul_(d)
        grads[1] = gammas.add_digamma_(g_theta.sub_(theta_r).sub_(r * x))
    if need_mu:
        # d f / d mu = x (1 / (mu + eps) - 1 / (theta + mu + eps)) - D theta r
        grads[0] = torch.reciprocal(mu + _EPS).sub_(r).mul_(x).sub_(theta_r)
    if need_pi:
        grads[2] = torch.sigmoid(-pi_logits).sub_(d)
    return f, cell, grads


def _reduce_to(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum a broadcast gradient back to ``shape``."""
    if grad.shape == shape:
        return grad
    extra = grad.dim() - len(shape)
    if extra:
        grad = grad.sum(dim=tuple(range(extra)))
    dims = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    return grad.sum(dim=dims, keepdim=True) if dims else grad


class _FusedNLL(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor,  # type: ignore[override]
                pi_logits: torch.Tensor | None, const: torch.Tensor,
                lgamma_theta_term: torch.Tensor | None) -> torch.Tensor:
        need = tuple(bool(n) for n in ctx.needs_input_grad[1:4])
        f, cell, grads = _nb_terms(x, mu, theta, pi_logits, need, lgamma_theta_term)
        ctx.theta_shape = theta.shape
        ctx.save_for_backward(*(g if g is not None else torch.empty(0) for g in grads))
        return const - f.sum(-1) - cell

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        g_mu, g_theta, g_pi = ctx.saved_tensors
        scale = -grad_out.unsqueeze(-1)  # nll = -sum f
        grad_mu = g_mu * scale if ctx.needs_input_grad[1] else None
        grad_theta = None
        if ctx.needs_input_grad[2]:
            if len(ctx.theta_shape) == 1 and g_theta.dim() == 2:
                grad_theta = (-grad_out) @ g_theta  # one GEMV instead of a broadcast multiply and a sum
            else:
                grad_theta = _reduce_to(g_theta * scale, ctx.theta_shape)
        grad_pi = g_pi * scale if ctx.needs_input_grad[3] else None
        return None, grad_mu, grad_theta, grad_pi, None, None


def _scaled(grad: torch.Tensor, grad_out: torch.Tensor, needed: bool) -> torch.Tensor | None:
    """A kernel's per-entry d NLL / d input times the incoming per-cell gradient (in place: the buffer is
    the kernel's own)."""
    return grad.mul_(grad_out.unsqueeze(-1)) if needed else None


def _scaled_theta(grad: torch.Tensor, grad_out: torch.Tensor, theta_shape: torch.Size, needed: bool
                  ) -> torch.Tensor | None:
    """:func:`_scaled` for theta, summed over cells (one GEMV) when theta has one value per gene."""
    if not needed:
        return None
    if grad.shape != theta_shape:
        return (grad_out @ grad).reshape(theta_shape)
    return _scaled(grad, grad_out, True)


class _KernelNLL(torch.autograd.Function):
    """:func:`nb_nll` through the compiled kernel (:mod:`atlasmap.nn.kernel`): one pass computes the
    values and the gradients autograd asks for; the backward only scales them by the incoming gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor,  # type: ignore[override]
                pi_logits: torch.Tensor | None, const: torch.Tensor | None,
                lgamma_theta_term: torch.Tensor | None) -> torch.Tensor:
        need = tuple(bool(n) for n in ctx.needs_input_grad[1:4])
        nll, g_mu, g_theta, g_pi = kernel.nb_nll(x, mu, theta, pi_logits, const, lgamma_theta_term, need)
        ctx.theta_shape = theta.shape
        ctx.save_for_backward(*(g if g is not None else torch.empty(0) for g in (g_mu, g_theta, g_pi)))
        return nll

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        g_mu, g_theta, g_pi = ctx.saved_tensors
        need = ctx.needs_input_grad
        return (None, _scaled(g_mu, grad_out, need[1]), _scaled_theta(g_theta, grad_out, ctx.theta_shape, need[2]),
                _scaled(g_pi, grad_out, need[3]), None, None)


class _KernelNLLLogits(torch.autograd.Function):
    """:func:`nb_nll_logits` through the compiled kernel (softmax, library scaling and likelihood fused)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, logits: torch.Tensor, log_library: torch.Tensor,  # type: ignore[override]
                theta: torch.Tensor, pi_logits: torch.Tensor | None, const: torch.Tensor | None,
                lgamma_theta_term: torch.Tensor | None) -> torch.Tensor:
        need = tuple(bool(n) for n in ctx.needs_input_grad[1:5])
        nll, *grads = kernel.nb_nll_logits(x, logits, log_library.reshape(-1), theta, pi_logits, const,
                                           lgamma_theta_term, need)
        ctx.theta_shape, ctx.library_shape = theta.shape, log_library.shape
        ctx.save_for_backward(*(g if g is not None else torch.empty(0) for g in grads))
        return nll

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        g_logits, g_lib, g_theta, g_pi = ctx.saved_tensors
        need = ctx.needs_input_grad
        grad_lib = (g_lib * grad_out).reshape(ctx.library_shape) if need[2] else None
        return (None, _scaled(g_logits, grad_out, need[1]), grad_lib,
                _scaled_theta(g_theta, grad_out, ctx.theta_shape, need[3]), _scaled(g_pi, grad_out, need[4]),
                None, None)


def nb_nll_logits(x: torch.Tensor, logits: torch.Tensor, log_library: torch.Tensor, theta: torch.Tensor,
                  pi_logits: torch.Tensor | None = None, log_x_fact: torch.Tensor | None = None,
                  lgamma_theta_term: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`nb_nll` with the mean ``mu = exp(log_library) * softmax(logits, -1)`` (scVI's decoder; ``log_library``
    has one value per cell, shape ``(n,)`` or ``(n, 1)``). Through the compiled kernel the softmax is never
    materialised; otherwise it is computed and :func:`nb_nll` called."""
    if log_x_fact is None:
        log_x_fact = log_factorial_sum(x)
    lib_flat = log_library.reshape(-1)
    if kernel.usable(x, logits, theta, pi_logits, log_x_fact, lgamma_theta_term, lib_flat):
        if lgamma_theta_term is not None and theta.requires_grad and torch.is_grad_enabled():
            raise ValueError("lgamma_theta_term can only be given when theta needs no gradient")
        if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                                for t in (logits, log_library, theta, pi_logits))):
            return kernel.nb_nll_logits(x, logits, lib_flat, theta, pi_logits, log_x_fact, lgamma_theta_term)[0]
        return _KernelNLLLogits.apply(x, logits, log_library, theta, pi_logits, log_x_fact, lgamma_theta_term)
    mu = torch.exp(log_library.reshape(-1, 1)) * torch.softmax(logits, dim=-1)
    return nb_nll(x, mu, theta, pi_logits, log_x_fact, lgamma_theta_term)


def nb_nll(x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor, pi_logits: torch.Tensor | None = None,
           log_x_fact: torch.Tensor | None = None, lgamma_theta_term: torch.Tensor | None = None) -> torch.Tensor:
    """Per-cell negative log-likelihood ``-sum_g log p(x_g)`` of the (zero-inflated, when ``pi_logits`` is
    given) negative binomial; equals ``-log_zinb(x, mu, theta, pi_logits).sum(-1)`` (or ``log_nb``) up to
    float rounding, with a fused hand-written backward that computes only the gradients autograd needs
    (no digamma when ``theta`` is frozen, e.g. in query training).

    ``log_x_fact`` is :func:`log_factorial_sum` of ``x`` if already known (it depends on data only);
    ``lgamma_theta_term`` is :func:`lgamma_theta_sum` if already known (constant when ``theta`` is frozen).
    float32 CPU minibatches go through the compiled kernel (:mod:`atlasmap.nn.kernel`) when it is installed.
    """
    if log_x_fact is None:
        log_x_fact = log_factorial_sum(x)
    if lgamma_theta_term is not None and theta.requires_grad and torch.is_grad_enabled():
        raise ValueError("lgamma_theta_term can only be given when theta needs no gradient")
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (mu, theta, pi_logits))
    if kernel.usable(x, mu, theta, pi_logits, log_x_fact, lgamma_theta_term):
        if not needs_grad:
            return kernel.nb_nll(x, mu, theta, pi_logits, log_x_fact, lgamma_theta_term)[0]
        return _KernelNLL.apply(x, mu, theta, pi_logits, log_x_fact, lgamma_theta_term)
    if not needs_grad:
        f, cell, _ = _nb_terms(x, mu, theta, pi_logits, lgamma_theta_term=lgamma_theta_term)
        return log_x_fact - f.sum(-1) - cell
    return _FusedNLL.apply(x, mu, theta, pi_logits, log_x_fact, lgamma_theta_term)


def lgamma_theta_sum(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """``sum_g lgamma(x_g + theta_g) - lgamma(theta_g)`` of each cell (the NB term that needs no ``mu``)."""
    if kernel.usable(x, x, theta, None):
        return kernel.lgamma_theta_sum(x, theta)
    return _CountGammas(x, theta).lgamma_cell_sum()
