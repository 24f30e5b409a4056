"""What one training call is asked to do: :class:`TrainConfig` and the schedule rules it implies (KL warm-up,
train/validation split, scvi-tools' default number of epochs)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from atlasmap.errors import InputError

__all__ = ["TrainConfig", "default_max_epochs", "kl_weight_at", "split_cells"]

PRECISIONS: tuple[str, ...] = ("32", "bf16")
COMPILE_MODES: tuple[str, ...] = ("none", "default", "reduce-overhead", "max-autotune")


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one :func:`~atlasmap.training.train_module` call (defaults follow scvi-tools 1.x).

    ``precision`` (``"32"`` | ``"bf16"``) and ``compile`` (``"none"`` or a ``torch.compile`` mode) are opt-in
    step accelerations (:mod:`atlasmap.training.accel`). ``counts_on_device`` puts the counts on the
    training device before the first epoch when they fit ``memory_fraction`` of its free memory
    (:func:`atlasmap.data.resident.place_cells`; on the CPU nothing moves).
    """

    max_epochs: int
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-6
    adam_eps: float = 0.01
    n_epochs_kl_warmup: int | None = 400
    train_size: float = 0.9
    early_stopping: bool = False
    early_stopping_patience: int = 45
    early_stopping_min_delta: float = 0.0
    seed: int = 0
    device: str = "auto"
    progress_bar: bool = True
    check_val_every_n_epoch: int = 1
    deterministic: bool = False
    precision: str = "32"
    compile: str = "none"
    counts_on_device: bool = True
    memory_fraction: float = 0.5

    def __post_init__(self) -> None:
        if self.max_epochs < 1:
            raise InputError(f"max_epochs must be at least 1, got {self.max_epochs}.")
        if self.batch_size < 2:
            raise InputError(f"batch_size must be at least 2, got {self.batch_size}.")
        if not 0.0 < self.train_size <= 1.0:
            raise InputError(f"train_size must be in (0, 1], got {self.train_size}.")
        if self.lr <= 0:
            raise InputError(f"lr must be positive, got {self.lr}.")
        if self.check_val_every_n_epoch < 1:
            raise InputError(f"check_val_every_n_epoch must be at least 1, got {self.check_val_every_n_epoch}.")
        if self.precision not in PRECISIONS:
            raise InputError(f"precision must be one of {', '.join(map(repr, PRECISIONS))}, got {self.precision!r}.")
        if self.compile not in COMPILE_MODES:
            raise InputError(f"compile must be one of {', '.join(map(repr, COMPILE_MODES))}, got {self.compile!r}.")
        if not 0.0 < self.memory_fraction <= 1.0:
            raise InputError(f"memory_fraction must be in (0, 1], got {self.memory_fraction}.")

    def validates(self, epoch: int) -> bool:
        """Whether epoch ``epoch`` (0-based, of this call) computes the validation loss: every
        ``check_val_every_n_epoch``-th epoch and the last one; every epoch under early stopping, which
        monitors it."""
        return (self.early_stopping or (epoch + 1) % self.check_val_every_n_epoch == 0
                or epoch == self.max_epochs - 1)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def default_max_epochs(n_cells: int) -> int:
    """scvi-tools' heuristic: about 20,000 cells x 400 epochs worth of steps, at most 400 epochs."""
    return int(min(400, max(1, round(20_000 / max(n_cells, 1) * 400))))


def kl_weight_at(epoch: int, n_epochs_kl_warmup: int | None) -> float:
    """The KL weight of epoch ``epoch``: a linear warm-up from 0 to 1 over ``n_epochs_kl_warmup`` epochs."""
    if not n_epochs_kl_warmup:
        return 1.0
    return min(1.0, epoch / n_epochs_kl_warmup)


def split_cells(n_cells: int, train_size: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random train/validation split (scvi-tools' rule: ``ceil(train_size * n)`` training cells)."""
    order = np.random.default_rng(seed).permutation(n_cells)
    n_train = min(n_cells, math.ceil(train_size * n_cells))
    if n_cells - n_train < 1:
        n_train = n_cells
    return np.sort(order[:n_train]), np.sort(order[n_train:])
