"""What every atlasmap torch module shares: the surgery interface and the frozen state.

:class:`CVAEModule` implements :class:`~atlasmap.protocols.SurgeryTarget` and
:class:`~atlasmap.protocols.TrainableModule` for the conditional VAEs (scVI, scANVI, totalVI): surgery
asks a module for its covariate tables and stacks and hands it a :class:`~atlasmap.protocols.FrozenState`
(:meth:`set_frozen_state`) instead of setting attributes on it, and :meth:`train` keeps that state.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn

from atlasmap.nn.layers import CovariateTable, FCStack
from atlasmap.protocols import Batch, CellSource, FrozenState, LossTerms


class CVAEModule(nn.Module, ABC):
    """Base of the scVI-family modules (a batch is a dict of tensors; see :mod:`atlasmap.protocols`)."""

    def __init__(self) -> None:
        super().__init__()
        self.frozen_state = FrozenState()

    # ------------------------------------------------------------------ surgery interface
    @abstractmethod
    def covariate_tables(self, covariate: int) -> list[CovariateTable]:
        """Every table of categorical covariate ``covariate`` (layers, heads, per-batch parameters)."""

    @abstractmethod
    def surgery_stacks(self) -> dict[str, list[FCStack]]:
        """The encoder and decoder stacks (keys ``"encoder"``, ``"decoder"``)."""

    def label_parts(self, freeze_classifier: bool) -> list[nn.Module]:
        """Parts besides the stacks that keep their reference state in query training (none here)."""
        return []

    def classifier_parts(self) -> list[nn.Module]:
        """What ``freeze_classifier=False`` releases (none here)."""
        return []

    def set_frozen_state(self, state: FrozenState) -> None:
        """Keep ``state.norms_in_eval`` in eval mode, and dropout off if ``state.dropout_off``, while training."""
        self.frozen_state = state
        if self.training:
            self.train(True)

    def train(self, mode: bool = True) -> CVAEModule:
        super().train(mode)
        if mode:
            for m in self.frozen_state.norms_in_eval:
                m.eval()
            if self.frozen_state.dropout_off:
                for m in self.modules():
                    if isinstance(m, nn.Dropout):
                        m.eval()
        return self

    # ------------------------------------------------------------------ training interface
    @abstractmethod
    def loss(self, batch: Batch, kl_weight: float = 1.0) -> LossTerms:
        """Loss of a minibatch."""

    def precompute(self, cells: CellSource) -> dict[str, torch.Tensor]:
        """Per-cell tensors constant while training the module as it is frozen now (none by default)."""
        return {}
