"""Where computation runs: devices, the distributed context, determinism and process-wide settings.

A leaf of the package (it imports nothing of atlasmap's but the errors): every layer may ask it which
device a user meant, whether this process is rank 0 of a ``torchrun`` job, or apply an explicit
process-wide setting. Nothing here changes process-wide state unless called to.

* :func:`resolve_device` turns ``"auto"`` / ``"cpu"`` / ``"cuda"`` / ``"cuda:N"`` into a torch device, with
  the error a user can act on;
* :class:`DistributedContext` and :func:`init_distributed` / :func:`shutdown_distributed` /
  :func:`distributed` describe and manage this process's place in a ``torch.distributed`` run;
* :func:`deterministic_algorithms` scopes ``torch.use_deterministic_algorithms`` to one training call;
* :class:`BackedOptions` say how on-disk data is streamed (:func:`backed_options` scopes a change);
* :func:`release_large_allocations` is the one process-wide memory setting (glibc ``mallopt``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

from atlasmap.errors import InputError

if TYPE_CHECKING:
    import torch

__all__ = ["BackedOptions", "DistributedContext", "backed_options", "current_context", "describe_device",
           "deterministic_algorithms", "distributed", "get_backed_options", "init_distributed", "is_main_process",
           "release_large_allocations", "resolve_device", "set_backed_options", "shutdown_distributed"]


# ---------------------------------------------------------------------------------------------- devices
def resolve_device(device: str | torch.device) -> torch.device:
    """The torch device for a user's ``device`` argument: ``"auto"`` (the current CUDA device when CUDA is
    available, else the CPU), ``"cpu"``, ``"cuda"``, ``"cuda:N"`` (also ``"meta"``, for shape-only checks).

    Raises
    ------
    InputError
        An unknown device, CUDA asked for where there is none, or a GPU index beyond the GPUs present.
    """
    import torch

    if isinstance(device, str) and device == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise InputError(f"unknown device {device!r} ({err}); use 'auto', 'cpu', 'cuda' or 'cuda:N'.") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "no CUDA build" if torch.version.cuda is None else "no GPU visible"
            raise InputError(f"device {str(device)!r} requested but CUDA is not available (PyTorch "
                             f"{torch.__version__}, {why}); use device='cpu' or 'auto' (CLI: --device cpu).")
        n = torch.cuda.device_count()
        index = torch.cuda.current_device() if dev.index is None else dev.index
        if index >= n:
            raise InputError(f"device {str(device)!r} requested but only {n} GPU(s) are visible "
                             f"(cuda:0 .. cuda:{n - 1}).")
        return torch.device("cuda", index)
    if dev.type not in ("cpu", "meta", "mps"):
        raise InputError(f"device {str(device)!r} is not supported; use 'auto', 'cpu', 'cuda' or 'cuda:N'.")
    return dev


def describe_device(device: torch.device) -> str:
    """``"cuda:0 (NVIDIA H200)"`` or ``"cpu (2 threads)"``: what the CLI prints as the device used."""
    import torch

    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        return f"cpu ({torch.get_num_threads()} threads)"
    return str(device)


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool, device: torch.device) -> Iterator[None]:
    """``torch.use_deterministic_algorithms(True)`` for the duration of a call (restored after), so that on
    CUDA two runs with the same seed give the same bits also where PyTorch would pick a nondeterministic
    kernel. atlasmap's own operations avoid atomics anyway; CPU training is deterministic without it."""
    if not enabled:
        yield
        return
    import torch

    if device.type == "cuda" and not os.environ.get("CUBLAS_WORKSPACE_CONFIG"):
        raise InputError("deterministic=True on CUDA needs CUBLAS_WORKSPACE_CONFIG=:4096:8 (or :16:8) in the "
                         "environment before the process starts (cuBLAS reads it when it starts), e.g. "
                         "`CUBLAS_WORKSPACE_CONFIG=:4096:8 python script.py`.")
    was, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was, warn_only=warn_only)


# ---------------------------------------------------------------------------------------------- distributed
@dataclass(frozen=True)
class DistributedContext:
    """This process's place in a distributed run.

    Attributes
    ----------
    rank, world_size, local_rank
        Global rank, number of ranks, rank on this node (``torchrun``'s ``RANK``, ``WORLD_SIZE``,
        ``LOCAL_RANK``).
    backend
        ``"nccl"`` or ``"gloo"``.
    device
        The device this rank trains on (``cuda:LOCAL_RANK`` or ``cpu``).
    """

    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_CONTEXT: DistributedContext | None = None


def current_context() -> DistributedContext | None:
    """The active :class:`DistributedContext`, or ``None`` outside a distributed run."""
    return _CONTEXT


def is_main_process() -> bool:
    """True on rank 0 of a distributed run and in any ordinary (single-process) run."""
    return _CONTEXT is None or _CONTEXT.is_main


def init_distributed(*, backend: str = "auto", device: str = "auto", timeout_minutes: float = 30.0
                     ) -> DistributedContext:
    """Join the process group described by ``torchrun``'s environment variables.

    Parameters
    ----------
    backend
        ``"auto"`` (NCCL on GPU ranks, gloo on CPU), ``"nccl"`` or ``"gloo"``.
    device
        ``"auto"`` (``cuda:LOCAL_RANK`` when CUDA is available, else CPU), ``"cpu"`` or ``"cuda"``.
    timeout_minutes
        How long a collective may wait for a slow or dead rank before failing.

    Raises
    ------
    InputError
        Not started by ``torchrun`` (no ``RANK``/``WORLD_SIZE``), or a GPU backend without GPUs.
    """
    global _CONTEXT
    import torch
    import torch.distributed as dist

    if _CONTEXT is not None:
        return _CONTEXT
    missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise InputError(
            f"not started by torchrun (environment variable(s) {', '.join(missing)} unset); launch with e.g. "
            "torchrun --standalone --nproc-per-node 2 -m atlasmap.distributed reference REF.h5ad ..."
        )
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"device {device!r} requested but CUDA is not available; use --device cpu (gloo).")
    use_cuda = torch.cuda.is_available() and device != "cpu" and backend != "gloo"
    if backend == "auto":
        backend = "nccl" if use_cuda else "gloo"
    if backend == "nccl" and not use_cuda:
        raise InputError("the nccl backend needs GPUs; use the gloo backend (--device cpu) on CPU.")
    if use_cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        dev = torch.device("cuda", torch.cuda.current_device())
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        kwargs = {"device_id": dev} if backend == "nccl" else {}
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(minutes=timeout_minutes),
                                **kwargs)
    _CONTEXT = DistributedContext(rank=rank, world_size=world, local_rank=local_rank, backend=backend, device=dev)
    return _CONTEXT


def shutdown_distributed() -> None:
    """Wait for every rank, then leave the process group."""
    global _CONTEXT
    import torch.distributed as dist

    if dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.barrier()
        dist.destroy_process_group()
    _CONTEXT = None


@contextlib.contextmanager
def distributed(*, backend: str = "auto", device: str = "auto") -> Iterator[DistributedContext]:
    """``with distributed() as ctx:`` — training inside runs data-parallel; the group is left at exit."""
    ctx = init_distributed(backend=backend, device=device)
    try:
        yield ctx
    finally:
        shutdown_distributed()


# ---------------------------------------------------------------------------------------------- backed data
@dataclass(frozen=True)
class BackedOptions:
    """How backed (on-disk) data is streamed.

    Attributes
    ----------
    chunk_size
        Rows per read (one contiguous read of ``data``/``indices`` each).
    shuffle_chunks
        Chunks whose rows are mixed in the shuffle buffer during training. Peak memory for counts is about
        ``chunk_size * shuffle_chunks * (nonzeros per cell) * 8`` bytes (plus the prefetched chunks).
    prefetch
        Read the next chunks in a background thread while the model trains on the current buffer.
    release_memory
        Call :func:`release_large_allocations` when backed data is opened for streaming (glibc only;
        process-wide). ``False`` leaves the allocator alone.
    """

    chunk_size: int = 8192
    shuffle_chunks: int = 4
    prefetch: bool = True
    release_memory: bool = True

    def __post_init__(self) -> None:
        if self.chunk_size < 2:
            raise InputError(f"chunk_size must be at least 2 cells, got {self.chunk_size}.")
        if self.shuffle_chunks < 1:
            raise InputError(f"shuffle_chunks must be at least 1, got {self.shuffle_chunks}.")


_BACKED_OPTIONS = BackedOptions()


def get_backed_options() -> BackedOptions:
    """The options that backed data opened from now on uses."""
    return _BACKED_OPTIONS


def set_backed_options(**kwargs: int | bool | None) -> BackedOptions:
    """Change the streaming options (``chunk_size``, ``shuffle_chunks``, ``prefetch``, ``release_memory``) for
    later reads; ``None`` values keep the current setting."""
    global _BACKED_OPTIONS
    from dataclasses import replace

    unknown = set(kwargs) - set(BackedOptions.__dataclass_fields__)
    if unknown:
        raise InputError(f"unknown backed option(s) {', '.join(sorted(unknown))}; valid: "
                         f"{', '.join(BackedOptions.__dataclass_fields__)}.")
    _BACKED_OPTIONS = replace(_BACKED_OPTIONS, **{k: v for k, v in kwargs.items() if v is not None})
    return _BACKED_OPTIONS


@contextlib.contextmanager
def backed_options(**kwargs: int | bool | None) -> Iterator[BackedOptions]:
    """Temporarily change the streaming options: ``with backed_options(chunk_size=16384): model.train()``."""
    global _BACKED_OPTIONS
    saved = _BACKED_OPTIONS
    try:
        yield set_backed_options(**kwargs)
    finally:
        _BACKED_OPTIONS = saved


# ---------------------------------------------------------------------------------------------- memory
_MMAP_THRESHOLD = 4 * 1024**2
_released = False


def release_large_allocations() -> bool:
    """On glibc, serve allocations above 4 MB with ``mmap`` (``mallopt(M_MMAP_THRESHOLD)``), so that big
    temporaries go back to the operating system when freed instead of fragmenting the heap (without it the
    resident memory of a long streaming run creeps up by several KB per cell). Process-wide: atlasmap calls
    it only where asked to (``BackedOptions(release_memory=True)``, the default of ``--backed``). Returns
    whether it is in effect (a no-op returning False elsewhere)."""
    global _released
    if _released:
        return True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        _released = bool(libc.mallopt(-3, _MMAP_THRESHOLD))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False
    return _released
