"""The training loop: Adam on the trainable tensors only, KL warm-up, train/validation split,
early stopping, per-epoch history and a progress bar. Works for any module whose
``loss(batch, kl_weight)`` returns :class:`~atlasmap.protocols.LossTerms`."""

from __future__ import annotations

import contextlib
import math
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from atlasmap.data.loader import minibatches
from atlasmap.errors import AtlasmapError, InputError
from atlasmap.optim import Adam
from atlasmap.protocols import CellSource, TrainableModule
from atlasmap.runtime import current_context, deterministic_algorithms, resolve_device


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one :func:`train_module` call (defaults follow scvi-tools 1.x)."""

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


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def make_optimizer(params: list[nn.Parameter], config: TrainConfig, device: torch.device) -> Adam:
    """Adam on ``params`` (the update rule of scvi-tools' default optimizer, torch.optim.Adam; see
    :mod:`atlasmap.optim` for why it is not torch's class)."""
    return Adam(params, lr=config.lr, eps=config.adam_eps, weight_decay=config.weight_decay)


def with_frozen_fields(module: TrainableModule, cells: CellSource) -> CellSource:
    """``cells`` plus the per-cell tensors the module precomputes from its frozen parts (e.g. the encoder's
    first layer after surgery): computed once per ``train`` call, never cached across calls."""
    return cells.with_fields(module.precompute(cells))



def fused_step(module: nn.Module, cells: CellSource) -> Any:
    """A module's hand-written training step for its current frozen state (``module.fused_step``, e.g. scVI
    after surgery), or ``None``: autograd then computes the gradients."""
    build = getattr(module, "fused_step", None)
    return build(cells) if build is not None else None


class EpochLog:
    """Appends each epoch's record to the history, updates the progress bar, and decides early stopping
    on the validation ELBO (the training ELBO when there is no validation set)."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.best = math.inf
        self.since_best = 0

    def close_epoch(self, record: dict[str, float], history: dict[str, list], bar: Any) -> bool:
        """Record the epoch; return True when training should stop."""
        for key, value in record.items():
            history[key].append(value)
        val = record.get("elbo_validation")  # None: no validation set, or not validated this epoch
        monitored = record["elbo_train"] if val is None else val
        bar.set_postfix(elbo_train=f"{record['elbo_train']:.1f}", elbo_val=f"{float('nan') if val is None else val:.1f}")
        if monitored < self.best - self.config.early_stopping_min_delta:
            self.best, self.since_best = monitored, 0
        else:
            self.since_best += 1
        return self.config.early_stopping and self.since_best >= self.config.early_stopping_patience

def train_module(module: nn.Module, cells: CellSource, config: TrainConfig, history: dict[str, list] | None = None
                 ) -> dict[str, list]:
    """Train ``module`` on ``cells``; append per-epoch records to ``history`` and return it.

    Only parameters with ``requires_grad`` enter the optimizer, so weight decay and Adam state never
    touch frozen tensors. Under ``torchrun`` (an active :mod:`atlasmap.distributed` context with several
    ranks) the same training runs data-parallel. ``cells`` may be a streaming source (backed file).
    """
    ctx = current_context()
    if ctx is not None and ctx.world_size > 1:
        from atlasmap.distributed import train_module_distributed

        return train_module_distributed(module, cells, config, history, ctx)
    if not isinstance(cells, CellSource) or not isinstance(module, TrainableModule):
        raise TypeError(f"train_module needs a CellSource and a TrainableModule (atlasmap.protocols), got "
                        f"{type(cells).__name__} and {type(module).__name__}.")
    device = resolve_device(config.device)
    module.to(device)
    params = trainable_parameters(module)
    if not params:
        raise AtlasmapError("the model has no trainable parameters; nothing to train.")
    optimizer = make_optimizer(params, config, device)
    cells = with_frozen_fields(module, cells)
    step = fused_step(module, cells)
    train_idx, val_idx = split_cells(cells.n_cells, config.train_size, config.seed)
    if train_idx.size < 2:  # batch norm cannot compute statistics of a one-cell minibatch
        module.train()
        training_bn = any(isinstance(m, nn.BatchNorm1d) and m.training for m in module.modules())
        module.eval()
        if training_bn:
            raise InputError(
                f"cannot train batch-norm layers on {train_idx.size} cell: batch statistics need at least 2 cells. "
                "Use more cells, a model without batch norm (use_batch_norm='none'), or, for a query, "
                "freeze_batchnorm_decoder=True."
            )
    rng = np.random.default_rng(config.seed + 1)
    history = history if history is not None else defaultdict(list)
    history = defaultdict(list, history)
    start_epoch = len(history.get("epoch", []))
    stopper = EpochLog(config)

    from tqdm.auto import tqdm

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
            deterministic_algorithms(config.deterministic, device):
        torch.manual_seed(config.seed)
        bar = tqdm(range(config.max_epochs), desc="Training", unit="epoch", disable=not config.progress_bar,
                   leave=False, dynamic_ncols=True)
        for epoch in bar:
            t0 = time.perf_counter()
            kl_weight = kl_weight_at(epoch, config.n_epochs_kl_warmup)
            module.train()
            totals = np.zeros(3)
            for batch in cells.iter_batches(train_idx, config.batch_size, shuffle=True, rng=rng, device=device):
                if step is None:
                    terms = module.loss(batch, kl_weight)
                    optimizer.zero_grad(set_to_none=True)
                    terms.loss.backward()
                else:  # same loss and gradients, without autograd (fills .grad itself)
                    terms = step(batch, kl_weight)
                optimizer.step()
                totals += _sums(terms)
            if not np.isfinite(totals).all():
                raise AtlasmapError(
                    f"training diverged at epoch {start_epoch + epoch} (loss is NaN or infinite); "
                    "lower lr (e.g. lr=1e-4) or check the counts for extreme values."
                )
            record = {"epoch": start_epoch + epoch, "kl_weight": kl_weight}
            record.update(_record(totals, train_idx.size, "train"))
            if val_idx.size and config.validates(epoch):
                with validation_rng(config, epoch, device):
                    val = evaluate_loss(module, cells, val_idx, kl_weight, device)
                record.update(_record(val, val_idx.size, "validation"))
            elif val_idx.size:
                record.update(skipped_validation())
            record["epoch_seconds"] = time.perf_counter() - t0
            if stopper.close_epoch(record, history, bar):
                break
        bar.close()
    module.eval()
    return dict(history)


@contextlib.contextmanager
def validation_rng(config: TrainConfig, epoch: int, device: torch.device) -> Iterator[None]:
    """The validation ELBO samples z; seed that from (seed, epoch) on a forked generator, so validating
    (or not, see ``check_val_every_n_epoch``) never changes the training's random stream."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(config.seed + 7919 * (epoch + 1))
        yield


def skipped_validation() -> dict[str, None]:
    """History entries of an epoch that did not compute the validation loss (``None``; NaN in plots)."""
    return {key: None for key in ("validation_loss", "elbo_validation", "reconstruction_loss_validation",
                                  "kl_local_validation")}


def _sums(terms: Any) -> np.ndarray:
    with torch.no_grad():
        n = terms.reconstruction.shape[0]
        return np.array([terms.loss.item() * n, terms.reconstruction.sum().item(), terms.kl.sum().item()])


def _record(totals: np.ndarray, n: int, split: str) -> dict[str, float]:
    loss, rec, kl = (float(v) / n for v in totals)
    return {f"{split}_loss": loss, f"elbo_{split}": rec + kl, f"reconstruction_loss_{split}": rec,
            f"kl_local_{split}": kl}


@torch.no_grad()
def evaluate_loss(module: nn.Module, cells: CellSource, rows: np.ndarray, kl_weight: float,
                  device: torch.device, batch_size: int = 1024) -> np.ndarray:
    """Summed (loss, reconstruction, KL) of ``rows`` in eval mode."""
    module.eval()
    totals = np.zeros(3)
    for chunk in minibatches(rows.size, batch_size, shuffle=False):
        totals += _sums(module.loss(cells.batch(rows[chunk], device), kl_weight))
    return totals
