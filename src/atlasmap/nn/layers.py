"""Covariate-injected layers.

A categorical covariate's contribution to a layer is a row lookup in a table of shape
(n_categories, n_out), added to ``W_x x + b`` — never a one-hot concatenated into the matmul. Each
table is a list of **blocks** (``nn.Parameter``): the reference categories in block 0, each surgery's
new categories in a block of its own. Hence:

* freezing the reference is ``requires_grad=False`` on whole tensors (no hooks, no masks);
* a reference cell reads only block 0 and goes through exactly the same operations as before
  surgery, so its output is bit-identical;
* every category, including the single category of a one-batch reference, has its own row.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from atlasmap import ops


def standard_normal(*shape: int) -> torch.Tensor:
    """N(0, 1) initial values (the same draws as ``torch.randn``). On the meta device (the size check of
    :func:`atlasmap.io.load_model`) an uninitialised tensor: PyTorch's meta ``randn`` imports sympy, 0.2 s
    of every process that loads a model."""
    values = torch.empty(*shape)
    return values if values.is_meta else values.normal_()


class CovariateTable(nn.Module):
    """Rows of per-category parameters for one categorical covariate, stored as blocks."""

    def __init__(self, n_categories: int, n_out: int, init_bound: float | None) -> None:
        """``init_bound=None`` initialises rows from N(0, 1) (used for per-batch dispersions)."""
        super().__init__()
        self.n_out = n_out
        self.init_bound = init_bound
        self.blocks = nn.ParameterList([self._new_block(n_categories)])

    def _new_block(self, n: int, like: torch.Tensor | None = None) -> nn.Parameter:
        """``n`` new rows, drawn on the CPU with PyTorch's default generator (so a seed gives the same values
        whatever device the table lives on), moved to the device and dtype of ``like``, and only then made
        a parameter: off the CPU, ``.to()`` returns a new tensor, not the parameter it was called on."""
        if self.init_bound is None:
            values = standard_normal(n, self.n_out)
        else:
            values = torch.empty(n, self.n_out).uniform_(-self.init_bound, self.init_bound)
        if like is not None:
            values = values.to(device=like.device, dtype=like.dtype)
        return nn.Parameter(values)

    @property
    def n_categories(self) -> int:
        return sum(b.shape[0] for b in self.blocks)

    @property
    def block_sizes(self) -> list[int]:
        return [int(b.shape[0]) for b in self.blocks]

    def add_block(self, n_new: int) -> nn.Parameter:
        """Append ``n_new`` randomly initialised rows as a new parameter block, on the device of the table,
        and return it: the very parameter the module holds (what surgery marks trainable and the optimizer
        updates)."""
        self.blocks.append(self._new_block(n_new, like=self.blocks[0]))
        return self.blocks[-1]

    def table(self) -> torch.Tensor:
        return self.blocks[0] if len(self.blocks) == 1 else torch.cat(list(self.blocks), dim=0)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        if codes.is_cuda:
            return _TableRows.apply(self.table(), codes)
        return self.table().index_select(0, codes)


class _TableRows(torch.autograd.Function):
    """``table[codes]`` whose backward sums each category's gradient rows as a matmul with the one-hot codes.
    The default backward (``index_add_``) adds with atomics on CUDA, in an order that varies from run to
    run, so two trainings with the same seed would differ in the last bits; a matmul does not. On the CPU
    ``index_add_`` is deterministic and faster, and is kept."""

    @staticmethod
    def forward(ctx: Any, table: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(codes)
        ctx.n_rows = table.shape[0]
        return table.index_select(0, codes)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        (codes,) = ctx.saved_tensors
        # scatter_ (not one_hot: its range check reads values back to the host) writes each row's single 1
        onehot = torch.zeros(codes.shape[0], ctx.n_rows, dtype=grad.dtype, device=grad.device)
        onehot.scatter_(1, codes.unsqueeze(1), 1.0)
        return onehot.t().mm(grad), None


class InjectedLinear(nn.Module):
    """``y = W x + b + sum_j T_j[c_j] + W_c u``: a linear layer with categorical codes ``c`` injected
    through :class:`CovariateTable` lookups and continuous covariates ``u`` through a bias-free linear map.

    Initialisation matches ``nn.Linear`` on the concatenated input ``[x, onehot(c), u]`` (uniform with
    bound ``1/sqrt(fan_in)``), so the model starts where a one-hot cVAE would.
    """

    def __init__(self, n_in: int, n_out: int, n_categories: Sequence[int] = (), n_continuous: int = 0) -> None:
        super().__init__()
        fan_in = n_in + sum(n_categories) + n_continuous
        bound = 1.0 / math.sqrt(max(fan_in, 1))
        self.linear = nn.Linear(n_in, n_out)
        nn.init.uniform_(self.linear.weight, -bound, bound)
        nn.init.uniform_(self.linear.bias, -bound, bound)
        self.covariates = nn.ModuleList(CovariateTable(n, n_out, bound) for n in n_categories)
        self.continuous = nn.Linear(n_continuous, n_out, bias=False) if n_continuous else None
        if self.continuous is not None:
            nn.init.uniform_(self.continuous.weight, -bound, bound)

    def forward(
        self, x: torch.Tensor, cat: torch.Tensor | None = None, cont: torch.Tensor | None = None,
        *, precomputed: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``precomputed`` replaces ``self.linear(x)`` (used when the expression weights are frozen and
        ``W x + b`` of each cell was computed once)."""
        out = self.linear(x) if precomputed is None else precomputed
        for j, table in enumerate(self.covariates):
            out = out + table(cat[:, j])
        if self.continuous is not None:
            out = out + self.continuous(cont)
        return out


def dropout_uniforms(x: torch.Tensor) -> torch.Tensor:
    """Uniform draws for a dropout mask of ``x``. 2-D CPU float32: :func:`atlasmap.ops.uniform`, the
    counter-based generator that the fused training step also uses, so both draw the same masks. Elsewhere
    ``rand_like`` on ``x``'s device: no host round trip for a seed, and CUDA-graph capturable."""
    if x.dim() == 2 and x.dtype == torch.float32 and x.device.type == "cpu" and not torch.compiler.is_compiling():
        return ops.uniform(*x.shape)
    return torch.rand_like(x)


class Dropout(nn.Dropout):
    """``nn.Dropout`` with the mask drawn from uniforms in one vectorised pass (:func:`dropout_uniforms`)
    instead of ``bernoulli_``, several times slower on CPU for hidden-layer sizes. Same distribution, same
    eval behaviour."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.p == 1.0:
            return x * 0.0
        keep = dropout_uniforms(x) >= self.p
        return x * keep.to(x.dtype).mul_(1.0 / (1.0 - self.p))


class FCStack(nn.Module):
    """``n_layers`` x [InjectedLinear → norm → ReLU → dropout], covariates injected into the first layer
    or, with ``deep_injection``, into every layer."""

    def __init__(
        self,
        n_in: int,
        n_hidden: int,
        n_layers: int,
        *,
        n_categories: Sequence[int] = (),
        n_continuous: int = 0,
        deep_injection: bool = True,
        dropout_rate: float = 0.1,
        use_batch_norm: bool = False,
        use_layer_norm: bool = True,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList()
        self.norms = nn.ModuleList()
        self.injects = []
        for i in range(n_layers):
            inject = i == 0 or deep_injection
            self.injects.append(inject)
            self.layers.append(
                InjectedLinear(
                    n_in if i == 0 else n_hidden,
                    n_hidden,
                    n_categories if inject else (),
                    n_continuous if inject else 0,
                )
            )
            if use_batch_norm:
                # scvi-tools' batch-norm settings, so the same architecture trains the same way
                self.norms.append(nn.BatchNorm1d(n_hidden, momentum=0.01, eps=1e-3))
            elif use_layer_norm:
                self.norms.append(nn.LayerNorm(n_hidden, elementwise_affine=False))
            else:
                self.norms.append(nn.Identity())
        self.dropout = Dropout(dropout_rate) if dropout_rate > 0 else nn.Identity()

    def forward(
        self, x: torch.Tensor, cat: torch.Tensor | None, cont: torch.Tensor | None,
        *, first_precomputed: torch.Tensor | None = None,
    ) -> torch.Tensor:
        h = x
        for i, (layer, norm, inject) in enumerate(zip(self.layers, self.norms, self.injects, strict=True)):
            pre = first_precomputed if i == 0 else None
            h = layer(h, cat, cont, precomputed=pre) if inject else layer(h, precomputed=pre)
            h = self.dropout(torch.relu(norm(h)))
        return h

    def covariate_tables(self) -> list[CovariateTable]:
        return [t for layer in self.layers for t in layer.covariates]
