"""How the one epoch loop (:mod:`atlasmap.training.loop`) runs: in this process, or data-parallel over the
ranks of a ``torch.distributed`` group.

A :class:`Strategy` owns what differs between the two: which cells a rank computes in each step, how the
gradients of a step are combined before the optimizer update, and how the per-epoch loss sums are combined
before they are read. Everything else (the step itself, validation, the history, early stopping, the
divergence check) is the loop's, once.

Data-parallel gradients are combined with one ``all_reduce`` of a flat buffer per step, not with
``torch.nn.parallel.DistributedDataParallel``: the DDP wrapper reduces only gradients that autograd computes
inside its own forward/backward, while atlasmap's hand-written scVI step (:mod:`atlasmap.training.fused_step`)
writes gradients itself. Reducing after the step lets both run under torchrun, so a 1-rank run computes
exactly what a single-process run computes (``tests/test_distributed.py``). For the small networks trained
here (after surgery: a few covariate blocks) one bucket per step is what DDP's bucketing would send anyway.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from atlasmap.errors import AtlasmapError
from atlasmap.protocols import Batch, CellSource
from atlasmap.runtime import DistributedContext

__all__ = ["DataParallel", "SingleProcess", "Strategy", "sums_dtype"]


def sums_dtype(device: torch.device) -> torch.dtype:
    """The dtype of the loop's on-device loss sums: float64, except where the device has none (MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


class Strategy(ABC):
    """What the epoch loop asks of the way it runs (see the module docstring)."""

    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Whether this process shows progress and writes outputs."""
        return self.rank == 0

    def prepare(self, module: nn.Module, cells: CellSource, config: Any, params: list[nn.Parameter],  # noqa: B027 (optional hook)
                rows: np.ndarray) -> None:
        """Called once before the first epoch, with the module on :attr:`device` (an optional hook)."""

    @abstractmethod
    def epoch_batches(self, cells: CellSource, rows: np.ndarray, batch_size: int, rng: np.random.Generator
                      ) -> Iterator[Batch | None]:
        """This process's minibatch of each step of one epoch (``None``: a step it takes without cells)."""

    def step_weight(self, batch: Batch | None) -> torch.Tensor | None:
        """The factor of this process's mean-loss gradient in the step's gradient (``None``: 1)."""
        return None

    def reduce_gradients(self, params: list[nn.Parameter]) -> None:  # noqa: B027 (optional hook)
        """Combine the step's gradients of ``params`` across processes (in place)."""

    def reduce(self, totals: torch.Tensor) -> np.ndarray:
        """Loss sums of an epoch, combined across processes, read on the host (the epoch's one sync)."""
        return totals.cpu().numpy()

    def validation_batches(self, cells: CellSource, rows: np.ndarray, batch_size: int) -> Iterator[Batch]:
        """This process's share of the validation minibatches."""
        return cells.iter_batches(rows, batch_size, shuffle=False, rng=None, device=self.device,
                                  rank=self.rank, world_size=self.world_size)

    def finish(self, module: nn.Module) -> None:  # noqa: B027 (optional hook)
        """Called once after the last epoch."""

    def describe(self) -> str:
        return "Training"


class SingleProcess(Strategy):
    """Training in this process on one device (CPU, a GPU, ...)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def epoch_batches(self, cells: CellSource, rows: np.ndarray, batch_size: int, rng: np.random.Generator
                      ) -> Iterator[Batch | None]:
        return cells.iter_batches(rows, batch_size, shuffle=True, rng=rng, device=self.device)


class DataParallel(Strategy):
    """Data-parallel training over the ranks of an initialised ``torch.distributed`` group (gloo on CPU,
    NCCL on GPUs), started by ``torchrun`` (:mod:`atlasmap.distributed`).

    * Rank 0's weights and buffers are broadcast at the start, so every rank starts from the same model; its
      buffers (batch-norm statistics) again at the end.
    * Every rank draws the same global minibatches (same seed); in memory rank ``r`` computes its
      :func:`~atlasmap.data.loader.shard` of each, streaming sources give each rank a shard of chunks.
    * Each step, the ranks' cell counts are summed first, so each rank weights its mean-loss gradient by
      ``n_rank / n_step`` and the summed gradient is the mean over the step's cells: the gradient one process
      takes on the whole global minibatch. A rank without cells in a step (a streaming rank that ran out of
      chunks, a last minibatch smaller than the world) contributes zeros; the epoch ends when no rank has
      cells left. Reading that is the one host synchronisation per step this strategy adds.
    * Loss sums are all-reduced once per epoch: history, early stopping and the divergence check agree on
      every rank.
    """

    def __init__(self, ctx: DistributedContext) -> None:
        import torch.distributed as dist

        if not dist.is_initialized():
            raise AtlasmapError("no distributed run is active; call atlasmap.distributed.init_distributed() first.")
        self.ctx = ctx
        self.device = ctx.device
        self.rank, self.world_size = ctx.rank, ctx.world_size
        self._unused_possible = False
        self._weight: torch.Tensor | None = None

    def describe(self) -> str:
        return f"Training ({self.world_size} ranks)"

    def prepare(self, module: nn.Module, cells: CellSource, config: Any, params: list[nn.Parameter],
                rows: np.ndarray) -> None:
        import torch.distributed as dist

        check_same_run(cells, module, config, self.ctx)
        with torch.no_grad():
            for tensor in [*module.parameters(), *module.buffers()]:
                dist.broadcast(tensor.data, 0)
        self._unused_possible = _leaves_gradients_unset(module, cells, rows, params, self.device)

    def epoch_batches(self, cells: CellSource, rows: np.ndarray, batch_size: int, rng: np.random.Generator
                      ) -> Iterator[Batch | None]:
        import torch.distributed as dist

        mine = cells.iter_batches(rows, batch_size, shuffle=True, rng=rng, device=self.device,
                                  rank=self.rank, world_size=self.world_size)
        while True:
            batch = next(mine, None)
            n = 0 if batch is None else int(batch["x"].shape[0])
            counts = torch.tensor([float(n), float(batch is not None)], dtype=torch.float64, device=self.device)
            dist.all_reduce(counts)
            n_step, active = counts.tolist()
            if active == 0:
                return
            self._weight = torch.tensor(n / n_step, dtype=torch.float32, device=self.device)
            yield batch

    def step_weight(self, batch: Batch | None) -> torch.Tensor | None:
        return self._weight

    def reduce_gradients(self, params: list[nn.Parameter]) -> None:
        import torch.distributed as dist

        has = [p.grad is not None for p in params]
        grads = [p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), dtype=p.dtype, device=p.device)
                 for p in params]
        if self._unused_possible:
            grads.append(torch.tensor(has, dtype=grads[0].dtype, device=self.device))
        flat = torch.cat(grads)
        dist.all_reduce(flat)
        present = flat[-len(params):].tolist() if self._unused_possible else [1.0] * len(params)
        offset = 0
        for p, used in zip(params, present, strict=True):
            n = p.numel()
            p.grad = flat[offset:offset + n].view_as(p) if used > 0 else None
            offset += n

    def reduce(self, totals: torch.Tensor) -> np.ndarray:
        import torch.distributed as dist

        dist.all_reduce(totals)
        return totals.cpu().numpy()

    def finish(self, module: nn.Module) -> None:
        import torch.distributed as dist

        with torch.no_grad():
            for buffer in module.buffers():
                dist.broadcast(buffer.data, 0)


def _leaves_gradients_unset(module: nn.Module, cells: CellSource, rows: np.ndarray, params: list[nn.Parameter],
                            device: torch.device) -> bool:
    """Whether a training step may leave some trainable tensor without a gradient (e.g. a classifier that
    sees no labelled cell); the ranks then also agree, per step, which tensors got one. Probed on one
    minibatch outside training: no weight, buffer or random state changes; the answer is agreed by all ranks."""
    import torch.distributed as dist

    saved = [p.grad for p in params]
    for p in params:
        p.grad = None
    was_training = module.training
    buffers = [b.clone() for b in module.buffers()]  # batch-norm statistics must not see the probe
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        module.train()
        module.loss(cells.batch(rows[: min(rows.size, 64)], device), 1.0).loss.backward()
    unused = any(p.grad is None for p in params)
    for p, g in zip(params, saved, strict=True):
        p.grad = g
    with torch.no_grad():
        for b, kept in zip(module.buffers(), buffers, strict=True):
            b.copy_(kept)
    module.train(was_training)
    flag = torch.tensor([float(unused)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def check_same_run(cells: CellSource, module: nn.Module, config: Any, ctx: DistributedContext) -> None:
    """Fail on every rank, with a clear message, when ranks hold different data, models or settings."""
    import torch.distributed as dist

    shapes = hashlib.sha1(repr([(n, tuple(p.shape), p.requires_grad) for n, p in module.named_parameters()])
                          .encode()).hexdigest()[:16]
    mine = {"data": cells.fingerprint(), "n_cells": int(cells.n_cells), "model": shapes,
            "settings": repr((config.batch_size, config.seed, config.train_size, config.max_epochs, config.lr))}
    everyone: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(everyone, mine)
    for key, what, fix in (
        ("data", "data", "every rank must read the same file version (same path contents on every node)"),
        ("model", "model architecture / trainable set", "every rank must load the same reference and options"),
        ("settings", "training settings", "start every rank with the same command line"),
    ):
        values = [e[key] for e in everyone]
        if len(set(values)) > 1:
            groups = defaultdict(list)
            for r, v in enumerate(values):
                groups[v].append(r)
            detail = "; ".join(f"ranks {g} -> {v}" for v, g in groups.items())
            raise AtlasmapError(f"distributed ranks disagree on the {what} ({detail}); {fix}.")
