"""A CUDA device without a GPU, for the device-placement tests that must run on every machine.

:class:`fake_cuda` combines PyTorch's ``FakeTensorMode`` (tensors without data whose every operation is
checked for devices exactly as on CUDA: mixing a CUDA tensor with a CPU one raises
``FakeTensorDeviceMismatchError``) with a small function mode that makes ``Tensor.to("cuda")`` and
``Tensor.cuda()`` produce fake CUDA tensors (PyTorch refuses ``.to("cuda")`` and Python indexing of CUDA
tensors in a build without CUDA, even for fake tensors). As on a real GPU, ``Parameter.to("cuda")`` then returns a plain tensor, not the
parameter, and ``nn.Module.to`` may replace parameter objects: code that assumes otherwise fails here as
it would on CUDA.

Nothing computes values: ``.item()``, ``.numpy()`` and data-dependent shapes (``nonzero``) raise, so the
tests drive modules, surgery, loss, backward and optimizer steps, not whole ``train()`` calls (those run
on a real GPU in the tests marked ``gpu``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode

CUDA = torch.device("cuda", 0)


class _ToFakeCuda(TorchFunctionMode):
    """``t.to(<cuda>)`` / ``t.cuda()`` of a non-CUDA tensor -> a fake CUDA tensor of the same shape/dtype."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.Tensor.to or func is torch.Tensor.cuda:
            tensor = args[0]
            if func is torch.Tensor.cuda:
                device, dtype = CUDA, None
            else:
                device, dtype, _, _ = torch._C._nn._parse_to(*args[1:], **kwargs)
            if device is not None and device.type == "cuda" and tensor.device.type != "cuda":
                # a new tensor, not empty_like(tensor): converting the real input would leave a weak
                # reference to it in the fake mode's memo, and nn.Module.to then cannot swap it
                moved = torch.empty(tuple(tensor.shape), dtype=dtype or tensor.dtype, device=CUDA)
                return moved.requires_grad_(tensor.requires_grad and torch.is_grad_enabled())
        if func is torch.Tensor.__getitem__ and args[0].device.type == "cuda":
            return _fake_cuda_getitem(*args)
        return func(*args, **kwargs)


def _as_meta(index: Any) -> Any:
    if isinstance(index, torch.Tensor):
        return torch.empty(tuple(index.shape), dtype=index.dtype, device="meta")
    if isinstance(index, tuple | list):
        return type(index)(_as_meta(i) for i in index)
    return index


def _fake_cuda_getitem(tensor: torch.Tensor, index: Any) -> torch.Tensor:
    """Python indexing of a CUDA tensor takes a CUDA device guard, which a CPU-only PyTorch lacks even for
    fake tensors: the result's shape comes from the same indexing of a ``meta`` tensor (index tensors may
    be on the CPU or the GPU, as CUDA allows), the result is a new fake CUDA tensor of that shape."""
    shape = torch.empty(tuple(tensor.shape), dtype=tensor.dtype, device="meta")[_as_meta(index)].shape
    return torch.empty(tuple(shape), dtype=tensor.dtype, device=tensor.device)


@contextlib.contextmanager
def fake_cuda() -> Iterator[FakeTensorMode]:
    """``with fake_cuda():`` — real CPU tensors may come in (they become fake); ``.to("cuda")`` works."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode, _ToFakeCuda():
        yield mode


def devices_of(tensors: Any) -> set[torch.device]:
    """The devices of every tensor in a (nested) dict / list / tuple."""
    found: set[torch.device] = set()
    if isinstance(tensors, torch.Tensor):
        found.add(tensors.device)
    elif isinstance(tensors, dict):
        for value in tensors.values():
            found |= devices_of(value)
    elif isinstance(tensors, list | tuple):
        for value in tensors:
            found |= devices_of(value)
    return found
