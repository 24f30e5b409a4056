"""Count log-likelihoods, vectorised, in one place (parametrised like scvi-tools: mean ``mu``,
inverse dispersion ``theta``, zero-inflation logits ``pi_logits``). Each returns cells x genes."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from atlasmap import ops
from atlasmap.ops import reference


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
# inputs that need them, by :mod:`atlasmap.ops` (one pass of the compiled kernel for CPU float32
# minibatches; elsewhere ~45 cheap in-place PyTorch passes instead of autograd's ~70, lgamma / digamma on the
# nonzero counts only, no digamma at all while the dispersion is frozen). No ``lgamma(x + 1)`` either: a
# per-cell constant computed once from the sparse counts. ``benchmarks/profile_step.py`` shows where a
# step's time goes.
# ----------------------------------------------------------------------------------------------------------

#: The fraction of nonzero counts below which the reference evaluates lgamma / digamma on nonzeros only.
SPARSE_DENSITY = reference.SPARSE_DENSITY
log_factorial_sum = reference.log_factorial_sum


def _scaled(grad: torch.Tensor, grad_out: torch.Tensor, needed: bool) -> torch.Tensor | None:
    """A per-entry d NLL / d input times the incoming per-cell gradient (in place: the buffer is the
    operation's own)."""
    return grad.mul_(grad_out.unsqueeze(-1)) if needed else None


def _scaled_theta(grad: torch.Tensor, grad_out: torch.Tensor, theta_shape: torch.Size, needed: bool
                  ) -> torch.Tensor | None:
    """:func:`_scaled` for theta, summed over cells (one GEMV) when theta has one value per gene (autograd
    sums any other broadcast dimensions)."""
    if not needed:
        return None
    if grad.dim() == 2 and grad.shape != theta_shape and theta_shape.numel() == grad.shape[1]:
        return (grad_out @ grad).reshape(theta_shape)  # theta (g,) or (1, g)
    return _scaled(grad, grad_out, True)


class _NLL(torch.autograd.Function):
    """:func:`nb_nll` through :func:`atlasmap.ops.nb_nll`: one pass computes the values and the gradients
    autograd asks for; the backward only scales them by the incoming gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor,  # type: ignore[override]
                pi_logits: torch.Tensor | None, const: torch.Tensor | None,
                lgamma_theta_term: torch.Tensor | None) -> torch.Tensor:
        need = tuple(bool(n) for n in ctx.needs_input_grad[1:4])
        nll, g_mu, g_theta, g_pi = ops.nb_nll(x, mu, theta, pi_logits, const, lgamma_theta_term, need)
        ctx.theta_shape = theta.shape
        ctx.save_for_backward(*(g if g is not None else torch.empty(0) for g in (g_mu, g_theta, g_pi)))
        return nll

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        g_mu, g_theta, g_pi = ctx.saved_tensors
        need = ctx.needs_input_grad
        return (None, _scaled(g_mu, grad_out, need[1]), _scaled_theta(g_theta, grad_out, ctx.theta_shape, need[2]),
                _scaled(g_pi, grad_out, need[3]), None, None)


class _NLLLogits(torch.autograd.Function):
    """:func:`nb_nll_logits` through :func:`atlasmap.ops.nb_nll_logits` (softmax, library scaling and
    likelihood fused)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, logits: torch.Tensor, log_library: torch.Tensor,  # type: ignore[override]
                theta: torch.Tensor, pi_logits: torch.Tensor | None, const: torch.Tensor | None,
                lgamma_theta_term: torch.Tensor | None) -> torch.Tensor:
        need = tuple(bool(n) for n in ctx.needs_input_grad[1:5])
        nll, *grads = ops.nb_nll_logits(x, logits, log_library.reshape(-1), theta, pi_logits, const,
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


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def nb_nll_logits(x: torch.Tensor, logits: torch.Tensor, log_library: torch.Tensor, theta: torch.Tensor,
                  pi_logits: torch.Tensor | None = None, log_x_fact: torch.Tensor | None = None,
                  lgamma_theta_term: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`nb_nll` with the mean ``mu = exp(log_library) * softmax(logits, -1)`` (scVI's decoder; ``log_library``
    has one value per cell, shape ``(n,)`` or ``(n, 1)``). Through the compiled kernel the softmax is never
    materialised."""
    if log_x_fact is None:
        log_x_fact = log_factorial_sum(x)
    if lgamma_theta_term is not None and theta.requires_grad and torch.is_grad_enabled():
        raise ValueError("lgamma_theta_term can only be given when theta needs no gradient")
    if not _needs_grad(logits, log_library, theta, pi_logits):
        return ops.nb_nll_logits(x, logits, log_library.reshape(-1), theta, pi_logits, log_x_fact,
                                 lgamma_theta_term)[0]
    return _NLLLogits.apply(x, logits, log_library, theta, pi_logits, log_x_fact, lgamma_theta_term)


def nb_nll(x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor, pi_logits: torch.Tensor | None = None,
           log_x_fact: torch.Tensor | None = None, lgamma_theta_term: torch.Tensor | None = None) -> torch.Tensor:
    """Per-cell negative log-likelihood ``-sum_g log p(x_g)`` of the (zero-inflated, when ``pi_logits`` is
    given) negative binomial; equals ``-log_zinb(x, mu, theta, pi_logits).sum(-1)`` (or ``log_nb``) up to
    float rounding, with a fused hand-written backward that computes only the gradients autograd needs
    (no digamma when ``theta`` is frozen, e.g. in query training).

    ``log_x_fact`` is :func:`log_factorial_sum` of ``x`` if already known (it depends on data only);
    ``lgamma_theta_term`` is :func:`lgamma_theta_sum` if already known (constant when ``theta`` is frozen).
    Computed by :func:`atlasmap.ops.nb_nll` (the compiled kernel for float32 CPU minibatches).
    """
    if log_x_fact is None:
        log_x_fact = log_factorial_sum(x)
    if lgamma_theta_term is not None and theta.requires_grad and torch.is_grad_enabled():
        raise ValueError("lgamma_theta_term can only be given when theta needs no gradient")
    if not _needs_grad(mu, theta, pi_logits):
        return ops.nb_nll(x, mu, theta, pi_logits, log_x_fact, lgamma_theta_term)[0]
    return _NLL.apply(x, mu, theta, pi_logits, log_x_fact, lgamma_theta_term)


def lgamma_theta_sum(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """``sum_g lgamma(x_g + theta_g) - lgamma(theta_g)`` of each cell (the NB term that needs no ``mu``)."""
    return ops.lgamma_theta_sum(x, theta)
