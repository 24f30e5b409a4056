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
* The training itself is the one loop of :mod:`atlasmap.training` with its
  :class:`~atlasmap.training.strategy.DataParallel` strategy; this module is only the ``torchrun`` entry.

In Python: ``with atlasmap.distributed.distributed(): model.train(...)`` inside a script started by
``torchrun``; ``model.train`` then runs data-parallel, and :func:`is_main_process` tells who should save.
"""

from __future__ import annotations

import contextlib
import os
import sys

from atlasmap.errors import AtlasmapError

__all__ = ["DistributedContext", "current_context", "distributed", "init_distributed", "is_main_process", "main",
           "shutdown_distributed"]


from atlasmap.runtime import (  # the context lives in the runtime leaf; re-exported here for users
    DistributedContext,
    current_context,
    distributed,
    init_distributed,
    is_main_process,
    shutdown_distributed,
)

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
