"""What one part of atlasmap offers another, declared once.

The layers talk through these protocols instead of probing objects with ``hasattr``: the training loop
takes a :class:`CellSource` and a :class:`TrainableModule`, surgery takes a :class:`SurgeryTarget`, and
each checks its argument once, at its entry, with ``isinstance`` (the protocols are runtime-checkable).
The implementations live lower or higher in the package: :class:`~atlasmap.data.cells.CellData` and
:class:`~atlasmap.data.backed.BackedCells` are cell sources, the modules of :mod:`atlasmap.modules` are
trainable surgery targets.

A leaf module: torch, numpy and the classes named in annotations are imported for type checking only, so
importing it costs nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import nn

#: A minibatch: tensors by field name (``"x"`` counts, ``"cat"`` codes, ``"cont"``, and model fields).
Batch = dict[str, "torch.Tensor"]

__all__ = ["Batch", "CellSource", "FrozenState", "LossTerms", "SurgeryTarget", "TrainableModule"]


@dataclass
class LossTerms:
    """Loss of one minibatch: the scalar to minimise and per-cell terms for the history.

    Attributes
    ----------
    loss
        The scalar the optimizer minimises (mean over the minibatch, KL warm-up applied).
    reconstruction, kl
        Per-cell negative log-likelihood and KL terms (their sum is the negative ELBO of each cell).
    extra
        Model-specific terms (e.g. scANVI's classification loss), for inspection.
    """

    loss: torch.Tensor
    reconstruction: torch.Tensor
    kl: torch.Tensor
    extra: dict[str, torch.Tensor] | None = None


@dataclass(frozen=True)
class FrozenState:
    """What surgery keeps fixed besides ``requires_grad``: modules held in eval mode while the rest trains
    (frozen batch norms keep their statistics) and whether dropout is switched off."""

    norms_in_eval: tuple[nn.Module, ...] = field(default=())
    dropout_off: bool = False


@runtime_checkable
class CellSource(Protocol):
    """Validated, aligned cells, cut into minibatches of tensors: in memory or streamed from disk.

    ``fields`` holds per-cell tensors (``"cat"`` codes, ``"cont"`` covariates, library sizes and what a
    model adds); the counts are read by :meth:`batch` / :meth:`iter_batches`.
    """

    fields: dict[str, torch.Tensor]

    @property
    def n_cells(self) -> int: ...

    def batch(self, rows: np.ndarray, device: torch.device | str = "cpu") -> Batch:
        """The minibatch of ``rows`` (any order) on ``device``."""
        ...

    def iter_batches(self, rows: np.ndarray, batch_size: int, *, shuffle: bool, rng: np.random.Generator | None,
                     device: torch.device | str = "cpu", rank: int = 0, world_size: int = 1) -> Iterator[Batch]:
        """One epoch of minibatches of ``rows``; with ``world_size > 1`` this rank's share of each step,
        ``batch_size`` being the global minibatch of all ranks together."""
        ...

    def iter_ordered(self, batch_size: int, device: torch.device | str = "cpu"
                     ) -> Iterator[tuple[slice, Batch]]:
        """``(rows, batch)`` over all cells in order (inference, outputs)."""
        ...

    def with_fields(self, extra: dict[str, torch.Tensor]) -> CellSource:
        """The same cells with more per-cell fields (a new source; this one is unchanged)."""
        ...

    def library_sizes(self) -> np.ndarray:
        """Total counts of each cell over the model's genes."""
        ...

    def csr_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """``(indptr, indices, data)`` of counts held in memory as CSR, else ``None``."""
        ...

    def fingerprint(self) -> str:
        """A digest that differs between data versions (ranks of a distributed run compare it)."""
        ...


@runtime_checkable
class TrainableModule(Protocol):
    """What the training loop needs of a torch module besides ``nn.Module`` itself."""

    def loss(self, batch: Batch, kl_weight: float = 1.0) -> LossTerms:
        """Loss of a minibatch (autograd computes the gradients of ``loss.loss``)."""
        ...

    def precompute(self, cells: CellSource) -> dict[str, torch.Tensor]:
        """Per-cell tensors that stay constant while the module trains as it is frozen now (e.g. the frozen
        first layer's output after surgery); empty when nothing is frozen."""
        ...


@runtime_checkable
class SurgeryTarget(Protocol):
    """What architectural surgery needs of a module."""

    def covariate_tables(self, covariate: int) -> list[nn.Module]:
        """Every :class:`~atlasmap.nn.layers.CovariateTable` of categorical covariate ``covariate``."""
        ...

    def surgery_stacks(self) -> dict[str, list[nn.Module]]:
        """The encoder and decoder :class:`~atlasmap.nn.layers.FCStack` s (keys ``"encoder"``, ``"decoder"``),
        on which the options act (first layers, norms)."""
        ...

    def label_parts(self, freeze_classifier: bool) -> list[nn.Module]:
        """Other parts that keep their reference state during query training (e.g. scANVI's label stacks,
        and its classifier when ``freeze_classifier``); empty for models without labels."""
        ...

    def classifier_parts(self) -> list[nn.Module]:
        """What ``freeze_classifier=False`` lets train (empty for models without a classifier)."""
        ...

    def set_frozen_state(self, state: FrozenState) -> None:
        """Hold ``state.norms_in_eval`` in eval mode (and dropout off) whenever the module trains."""
        ...
