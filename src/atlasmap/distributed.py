"""Data-parallel training on many processes / GPUs / nodes with ``torch.distributed`` (DDP).

Launch any ``atlasmap`` command under ``torchrun`` through this module; every process runs the same
command, training is data-parallel, and only rank 0 writes outputs::

    # one machine, 4 GPUs (NCCL) — or 4 CPU processes (gloo) when there is no GPU
    torchrun --standalone --nproc-per-node 4 -m atlasmap.distributed reference REF.h5ad --batch-key batch -o ref_model
    # two machines x 8 GPUs: run on each node, with node-rank 0 on the first
    torchrun --nnodes 2 --nproc-per-node 8 --node-rank 0 --master-addr HOST0 --master-port 29500 \\
        -m atlasmap.distributed reference REF.h5ad --batch-key batch -o ref_model --backed
    # query surgery in DDP too
    torchrun --standalone --nproc-per-node 4 -m atlasmap.distributed map QUERY.h5ad --reference ref_model -o out.h5ad

How it works
------------
* Each process is one rank. The backend is NCCL when the rank has a GPU, gloo otherwise.
* Only the trainable tensors get gradients, so DDP synchronises exactly those (after surgery: the new
  category blocks); frozen reference weights are neither reduced nor updated. Rank 0's weights are
  broadcast at the start, so every rank starts from the same model.
* **In-memory data** (the default): every rank loads the AnnData; each *global* minibatch of
  ``batch_size`` cells (the same cells, in the same order, as a single-process run with the same seed) is
  split across ranks — rank ``r`` computes rows ``r::world_size`` — and the loss is weighted so the
  all-reduced gradient equals the single-process gradient of that minibatch.
* **Backed data** (``--backed``): each rank streams only its shard of chunks of the file (chunk order
  reshuffled every epoch with the shared seed); ``batch_size`` is the global batch, ``batch_size //
  world_size`` cells per rank. Ranks that run out of chunks first join the others
  (``torch.distributed.algorithms.Join``).
* Training / validation loss totals are all-reduced, so the history, early stopping and divergence
  checks are identical on every rank. Ranks check at the start that they read the same data version
  and arguments.

In Python: ``with atlasmap.distributed.distributed(): model.train(...)`` inside a script started by
``torchrun``; ``model.train`` then runs data-parallel, and :func:`is_main_process` tells who should save.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from atlasmap.errors import AtlasmapError

__all__ = ["DistributedContext", "current_context", "distributed", "init_distributed", "is_main_process", "main",
           "shutdown_distributed", "train_module_distributed"]


from atlasmap.runtime import (  # the context lives in the runtime leaf; re-exported here for users
    DistributedContext,
    current_context,
    deterministic_algorithms,
    distributed,
    init_distributed,
    is_main_process,
    shutdown_distributed,
)

# ----------------------------------------------------------------------------------------------
# The data-parallel training loop
# ----------------------------------------------------------------------------------------------


class _LossModule(nn.Module):
    """What DDP wraps: forward = the module's loss, scaled for this rank's share of the global batch."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, batch: dict[str, torch.Tensor], kl_weight: float, scale: float
                ) -> tuple[torch.Tensor, torch.Tensor]:
        terms = self.module.loss(batch, kl_weight)
        n = terms.reconstruction.shape[0]
        sums = torch.stack([terms.loss.detach() * n, terms.reconstruction.detach().sum(),
                            terms.kl.detach().sum(), torch.tensor(float(n), device=terms.loss.device)])
        return terms.loss * scale, sums.double()


def _local_batches(cells: Any, rows: np.ndarray, batch_size: int, rng: np.random.Generator,
                   device: torch.device, ctx: DistributedContext) -> Iterator[tuple[dict[str, torch.Tensor], float]]:
    """This rank's minibatches of one epoch with the weight that makes the reduced gradient exact."""
    from atlasmap.data.loader import CellData, minibatches

    world = ctx.world_size
    if not isinstance(cells, CellData):  # streaming: a shard of chunks per rank
        for batch in cells.iter_batches(rows, max(2, batch_size // world), shuffle=True, rng=rng, device=device,
                                        rank=ctx.rank, world_size=world):
            yield batch, 1.0
        return
    for part in minibatches(rows.size, batch_size, shuffle=True, generator=rng):
        mine = part[ctx.rank::world]
        if mine.size:
            # DDP averages gradients over ranks; weight n_local * world / n_global gives the global mean
            yield cells.batch(rows[mine], device), mine.size * world / part.size


def _has_unused_parameters(wrapper: _LossModule, cells: Any, rows: np.ndarray, device: torch.device,
                           ctx: DistributedContext) -> bool:
    """Whether a training step leaves some trainable tensor without a gradient (e.g. a classifier that
    sees no labelled cell). DDP must then search the graph every step (``find_unused_parameters``); the
    answer is agreed by all ranks. The probe step runs outside DDP and changes no weight or RNG state."""
    import torch.distributed as dist

    module = wrapper.module
    params = [p for p in module.parameters() if p.requires_grad]
    saved = [p.grad for p in params]
    for p in params:
        p.grad = None
    was_training = module.training
    buffers = [b.clone() for b in module.buffers()]  # batch-norm statistics must not see the probe
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        module.train()
        probe = rows[: min(rows.size, 64)]
        loss, _ = wrapper(cells.batch(probe, device), 1.0, 1.0)
        loss.backward()
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


def _all_reduce(values: np.ndarray, device: torch.device) -> np.ndarray:
    import torch.distributed as dist

    t = torch.as_tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.cpu().numpy()


def check_same_run(cells: Any, module: nn.Module, config: Any, ctx: DistributedContext) -> None:
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


def train_module_distributed(module: nn.Module, cells: Any, config: Any, history: dict[str, list] | None = None,
                             ctx: DistributedContext | None = None) -> dict[str, list]:
    """:func:`atlasmap.train.train_module`, data-parallel over the ranks of ``ctx`` (default: the active one).

    Same settings, history records and semantics; ``config.batch_size`` is the global minibatch. Returns
    the same history on every rank.
    """
    import torch.distributed as dist
    from torch.distributed.algorithms.join import Join
    from torch.nn.parallel import DistributedDataParallel

    from atlasmap import train as train_mod
    from atlasmap.train import (
        EpochLog,
        kl_weight_at,
        skipped_validation,
        split_cells,
        trainable_parameters,
        validation_rng,
    )

    ctx = ctx or current_context()
    if ctx is None or not dist.is_initialized():
        raise AtlasmapError("no distributed run is active; call atlasmap.distributed.init_distributed() first.")
    device = ctx.device
    module.to(device)
    params = trainable_parameters(module)
    if not params:
        raise AtlasmapError("the model has no trainable parameters; nothing to train.")
    check_same_run(cells, module, config, ctx)
    optimizer = train_mod.make_optimizer(params, config, device)
    cells = train_mod.with_frozen_fields(module, cells)  # per-cell terms of frozen layers, computed once
    train_idx, val_idx = split_cells(cells.n_cells, config.train_size, config.seed)
    wrapper = _LossModule(module)
    ddp = DistributedDataParallel(
        wrapper, device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=_has_unused_parameters(wrapper, cells, train_idx, device, ctx),
    )
    rng = np.random.default_rng(config.seed + 1)  # identical on every rank: same global batches
    history = defaultdict(list, history or {})
    start_epoch = len(history.get("epoch", []))
    stopper = EpochLog(config)
    show = config.progress_bar and ctx.is_main

    from tqdm.auto import tqdm

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
            deterministic_algorithms(config.deterministic, device):
        torch.manual_seed(config.seed + ctx.rank)  # rank-specific sampling noise and dropout
        bar = tqdm(range(config.max_epochs), desc=f"Training ({ctx.world_size} ranks)", unit="epoch",
                   disable=not show, leave=False, dynamic_ncols=True)
        for epoch in bar:
            t0 = time.perf_counter()
            kl_weight = kl_weight_at(epoch, config.n_epochs_kl_warmup)
            ddp.train()
            totals = torch.zeros(4, dtype=torch.float64, device=device)
            with Join([ddp]):
                for batch, scale in _local_batches(cells, train_idx, config.batch_size, rng, device, ctx):
                    loss, sums = ddp(batch, kl_weight, scale)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    totals += sums
            totals = _all_reduce(totals.cpu().numpy(), device)
            if not np.isfinite(totals).all():
                raise AtlasmapError(
                    f"training diverged at epoch {start_epoch + epoch} (loss is NaN or infinite); "
                    "lower lr (e.g. lr=1e-4) or check the counts for extreme values."
                )
            record = {"epoch": start_epoch + epoch, "kl_weight": kl_weight}
            record.update(_record(totals, "train"))
            if val_idx.size and not config.validates(epoch):
                record.update(skipped_validation())
            elif val_idx.size:
                module.eval()
                val = np.zeros(4)
                with torch.no_grad(), validation_rng(config, epoch, device):
                    for batch in cells.iter_batches(val_idx, 1024, shuffle=False, rng=None, device=device,
                                                    rank=ctx.rank, world_size=ctx.world_size):
                        val += wrapper(batch, kl_weight, 1.0)[1].cpu().numpy()
                record.update(_record(_all_reduce(val, device), "validation"))
            record["epoch_seconds"] = time.perf_counter() - t0
            if stopper.close_epoch(record, history, bar):
                break
        bar.close()
    module.eval()
    return dict(history)


def _record(totals: np.ndarray, split: str) -> dict[str, float]:
    loss, rec, kl, n = (float(v) for v in totals)
    n = max(n, 1.0)
    return {f"{split}_loss": loss / n, f"elbo_{split}": (rec + kl) / n, f"reconstruction_loss_{split}": rec / n,
            f"kl_local_{split}": kl / n}


# ----------------------------------------------------------------------------------------------
# torchrun entry point
# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """``torchrun ... -m atlasmap.distributed COMMAND ...``: any ``atlasmap`` command, data-parallel.

    Every rank runs the command; ranks other than 0 print nothing and write nothing.
    """
    from atlasmap import cli

    argv = list(sys.argv[1:] if argv is None else argv)
    args = cli.build_parser().parse_args(argv)  # --help / usage errors before joining the group
    try:
        ctx = init_distributed(device=getattr(args, "device", "auto") or "auto")
    except AtlasmapError as err:
        print(f"atlasmap: error: {err}", file=sys.stderr)
        return cli.EXIT_USER_ERROR
    try:
        if ctx.is_main:
            print(f"atlasmap: distributed run on {ctx.world_size} ranks ({ctx.backend}, {ctx.device.type})",
                  file=sys.stderr)
            return cli.main(argv)
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
            return cli.main([*argv, "--quiet"] if "--quiet" not in argv and hasattr(args, "quiet") else argv)
    finally:
        shutdown_distributed()


if __name__ == "__main__":
    # `python -m atlasmap.distributed` runs this file as __main__; the training code looks up the context
    # in the imported module atlasmap.distributed, so run *its* main (one module state, not two)
    from atlasmap.distributed import main as _main

    sys.exit(_main())
