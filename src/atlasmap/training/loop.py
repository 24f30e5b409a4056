"""The training loop: Adam on the trainable tensors only, KL warm-up, train/validation split, early
stopping, per-epoch history and a progress bar, for any :class:`~atlasmap.protocols.TrainableModule`.

There is one epoch loop. How it runs is a :class:`~atlasmap.training.strategy.Strategy`: in this process on
the CPU or a GPU (:class:`~atlasmap.training.strategy.SingleProcess`), or data-parallel under ``torchrun``
(:class:`~atlasmap.training.strategy.DataParallel`). The step is autograd on the module's loss (optionally
autocast / compiled, :mod:`atlasmap.training.accel`), or scVI's hand-written step where it applies
(:mod:`atlasmap.training.fused_step`); either way under every strategy. Loss sums accumulate on the device
and are read once per epoch; on a GPU the counts are placed there first when they fit
(:func:`atlasmap.data.resident.place_cells`).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from atlasmap.data.loader import minibatches
from atlasmap.data.resident import memory_budget, place_cells
from atlasmap.errors import AtlasmapError, InputError
from atlasmap.protocols import Batch, CellSource, LossTerms, TrainableModule
from atlasmap.runtime import current_context, deterministic_algorithms, resolve_device
from atlasmap.training import accel, fused_step
from atlasmap.training.config import TrainConfig, kl_weight_at, split_cells
from atlasmap.training.optim import Adam
from atlasmap.training.strategy import DataParallel, SingleProcess, Strategy, sums_dtype

__all__ = ["EpochLog", "evaluate_loss", "make_optimizer", "strategy_for", "train_module", "trainable_parameters",
           "with_frozen_fields"]


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def make_optimizer(params: list[nn.Parameter], config: TrainConfig, device: torch.device | None = None) -> Adam:
    """Adam on ``params`` (the update rule of scvi-tools' default optimizer, torch.optim.Adam; see
    :mod:`atlasmap.training.optim` for why it is not torch's class)."""
    return Adam(params, lr=config.lr, eps=config.adam_eps, weight_decay=config.weight_decay)


def with_frozen_fields(module: TrainableModule, cells: CellSource) -> CellSource:
    """``cells`` plus the per-cell tensors the module precomputes from its frozen parts (e.g. the encoder's
    first layer after surgery): computed once per ``train`` call, never cached across calls."""
    return cells.with_fields(module.precompute(cells))


def strategy_for(config: TrainConfig) -> Strategy:
    """Data-parallel inside an active :func:`atlasmap.distributed.distributed` context with several ranks
    (or one rank: the same code path, and the same numbers as one process); else this process on
    ``config.device``."""
    ctx = current_context()
    if ctx is not None:
        return DataParallel(ctx)
    return SingleProcess(resolve_device(config.device))


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


def _check_batch_norm_cells(module: nn.Module, n_train: int) -> None:
    if n_train >= 2:
        return
    module.train()  # batch norm cannot compute statistics of a one-cell minibatch
    training_bn = any(isinstance(m, nn.BatchNorm1d) and m.training for m in module.modules())
    module.eval()
    if training_bn:
        raise InputError(
            f"cannot train batch-norm layers on {n_train} cell: batch statistics need at least 2 cells. "
            "Use more cells, a model without batch norm (use_batch_norm='none'), or, for a query, "
            "freeze_batchnorm_decoder=True."
        )


StepFn = Callable[[Batch | None, float], torch.Tensor | None]


def make_step(module: TrainableModule, cells: CellSource, params: list[nn.Parameter], optimizer: Adam,
              strategy: Strategy, config: TrainConfig) -> StepFn:
    """``step(batch, kl_weight)``: one optimizer step; returns the minibatch's loss sums on the device
    (``None`` for a step this process takes without cells)."""
    device = strategy.device
    hand_written = (fused_step.fused_step(module, cells) if config.precision == "32" and config.compile == "none"
                    else None)
    loss_of = accel.loss_function(module, device, precision=config.precision, compile=config.compile)

    def step(batch: Batch | None, kl_weight: float) -> torch.Tensor | None:
        terms: LossTerms | None = None
        if batch is None:
            optimizer.zero_grad(set_to_none=True)
        elif hand_written is not None:  # same loss and gradients, without autograd (fills .grad itself)
            terms = hand_written(batch, kl_weight)
        else:
            terms = loss_of(batch, kl_weight)
            optimizer.zero_grad(set_to_none=True)
            terms.loss.backward()
        weight = strategy.step_weight(batch)
        if weight is not None:
            with torch.no_grad():
                for p in params:
                    if p.grad is not None:
                        p.grad.mul_(weight)
        strategy.reduce_gradients(params)
        optimizer.step()
        return None if terms is None else loss_sums(terms)

    return step


def train_module(module: nn.Module, cells: CellSource, config: TrainConfig, history: dict[str, list] | None = None,
                 strategy: Strategy | None = None) -> dict[str, list]:
    """Train ``module`` on ``cells``; append per-epoch records to ``history`` and return it.

    Only parameters with ``requires_grad`` enter the optimizer, so weight decay and Adam state never touch
    frozen tensors. ``strategy`` defaults to :func:`strategy_for` (data-parallel under ``torchrun``, with
    ``config.batch_size`` the global minibatch; every rank returns the same history). ``cells`` may be a
    streaming source (backed file).
    """
    if not isinstance(cells, CellSource) or not isinstance(module, TrainableModule):
        raise TypeError(f"train_module needs a CellSource and a TrainableModule (atlasmap.protocols), got "
                        f"{type(cells).__name__} and {type(module).__name__}.")
    strategy = strategy or strategy_for(config)
    device = strategy.device
    if config.batch_size < strategy.world_size:
        raise InputError(f"batch_size ({config.batch_size}) is the global minibatch of all "
                         f"{strategy.world_size} ranks; use at least one cell per rank.")
    module.to(device)
    params = trainable_parameters(module)
    if not params:
        raise AtlasmapError("the model has no trainable parameters; nothing to train.")
    cells = with_frozen_fields(module, cells)
    if config.counts_on_device:
        cells = place_cells(cells, device, budget_bytes=memory_budget(device, config.memory_fraction))
    train_idx, val_idx = split_cells(cells.n_cells, config.train_size, config.seed)
    _check_batch_norm_cells(module, train_idx.size)
    strategy.prepare(module, cells, config, params, train_idx)
    optimizer = make_optimizer(params, config, device)
    step = make_step(module, cells, params, optimizer, strategy, config)
    rng = np.random.default_rng(config.seed + 1)  # the same on every rank: the same global minibatches
    history = defaultdict(list, history or {})
    start_epoch = len(history.get("epoch", []))
    stopper = EpochLog(config)
    dtype = sums_dtype(device)

    from tqdm.auto import tqdm

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
            deterministic_algorithms(config.deterministic, device):
        torch.manual_seed(config.seed + strategy.rank)  # rank-specific sampling noise and dropout
        bar = tqdm(range(config.max_epochs), desc=strategy.describe(), unit="epoch",
                   disable=not (config.progress_bar and strategy.is_main), leave=False, dynamic_ncols=True)
        try:
            for epoch in bar:
                t0 = time.perf_counter()
                kl_weight = kl_weight_at(epoch, config.n_epochs_kl_warmup)
                module.train()
                totals = torch.zeros(4, dtype=dtype, device=device)
                for batch in strategy.epoch_batches(cells, train_idx, config.batch_size, rng):
                    sums = step(batch, kl_weight)
                    if sums is not None:
                        totals += sums
                totals_host = strategy.reduce(totals)
                if not np.isfinite(totals_host).all():
                    raise AtlasmapError(
                        f"training diverged at epoch {start_epoch + epoch} (loss is NaN or infinite); "
                        "lower lr (e.g. lr=1e-4) or check the counts for extreme values."
                    )
                record: dict[str, Any] = {"epoch": start_epoch + epoch, "kl_weight": kl_weight}
                record.update(_record(totals_host, "train"))
                if val_idx.size and config.validates(epoch):
                    with validation_rng(config, epoch, device):
                        val = _validation_sums(module, cells, val_idx, kl_weight, strategy)
                    record.update(_record(strategy.reduce(val), "validation"))
                elif val_idx.size:
                    record.update(skipped_validation())
                record["epoch_seconds"] = time.perf_counter() - t0
                if stopper.close_epoch(record, history, bar):
                    break
        finally:
            bar.close()
    strategy.finish(module)
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


def loss_sums(terms: LossTerms) -> torch.Tensor:
    """``(loss * n, sum reconstruction, sum KL, n)`` of a minibatch, on its device, without a host sync."""
    with torch.no_grad():
        n = terms.reconstruction.shape[0]
        dtype = sums_dtype(terms.loss.device)
        return torch.stack([terms.loss.detach().to(dtype) * n, terms.reconstruction.sum().to(dtype),
                            terms.kl.sum().to(dtype), torch.tensor(float(n), dtype=dtype, device=terms.loss.device)])


def _record(totals: np.ndarray, split: str) -> dict[str, float]:
    loss, rec, kl, n = (float(v) for v in totals)
    n = max(n, 1.0)
    return {f"{split}_loss": loss / n, f"elbo_{split}": (rec + kl) / n, f"reconstruction_loss_{split}": rec / n,
            f"kl_local_{split}": kl / n}


@torch.no_grad()
def _validation_sums(module: nn.Module, cells: CellSource, rows: np.ndarray, kl_weight: float, strategy: Strategy,
                     batch_size: int = 1024) -> torch.Tensor:
    module.eval()
    totals = torch.zeros(4, dtype=sums_dtype(strategy.device), device=strategy.device)
    for batch in strategy.validation_batches(cells, rows, batch_size):
        totals += loss_sums(module.loss(batch, kl_weight))
    return totals


@torch.no_grad()
def evaluate_loss(module: nn.Module, cells: CellSource, rows: np.ndarray, kl_weight: float,
                  device: torch.device, batch_size: int = 1024) -> np.ndarray:
    """Summed (loss, reconstruction, KL) of ``rows`` in eval mode (read once)."""
    module.eval()
    totals = torch.zeros(4, dtype=sums_dtype(device), device=device)
    for chunk in minibatches(rows.size, batch_size, shuffle=False):
        totals += loss_sums(module.loss(cells.batch(rows[chunk], device), kl_weight))
    return totals[:3].cpu().numpy()
