"""Cells resident on the training device: the counts go to the accelerator once, and every minibatch is
gathered (and every epoch shuffled) there.

On a GPU a scVI step at batch 128 x 2,000 genes is microseconds of arithmetic; what costs is the host:
gathering each minibatch on the CPU and copying it over, with a synchronisation per step. When the cells
fit a memory budget, :func:`place_cells` moves them to the device once, in the cheaper of two layouts:

* **dense**: a ``cells x genes`` float32 matrix; a minibatch is one ``index_select``;
* **ELL** (padded CSR): each cell's stored entries padded to ``w``, the most nonzeros of any cell, with
  column indices padded by a spare column ``genes``; a minibatch is two ``index_select`` s and one
  ``scatter_`` into a fixed-shape ``batch x (genes + 1)`` block whose spare column is cut off.

Both gathers have shapes fixed by the batch size alone: no data-dependent sizes, no host round trip, so a
training step can be captured in a CUDA graph. The epoch's shuffled order is drawn on the host by the same
numpy generator as the host path (the same minibatches, so a run on the device path computes what the host
path computes) and uploaded once per epoch; each step then slices it on the device.

When the counts do not fit, :class:`StagedCells` keeps them on the host and feeds the device through a ring
of pinned staging buffers: the host gathers minibatch ``i + 1`` into one buffer while the copy of minibatch
``i`` (asynchronous, from pinned memory) and its step run on the device; a buffer is reused only after the
event recorded behind its copy has passed. The per-cell fields (codes, library sizes, precomputed terms:
small next to the counts) still go to the device once.

The same code runs on the CPU (``place_cells(..., force=True)``), which is how it is tested without a GPU.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from atlasmap import ops
from atlasmap.data.loader import CellData, minibatches, shard
from atlasmap.protocols import Batch, CellSource

__all__ = ["DEFAULT_MEMORY_FRACTION", "DeviceCells", "StagedCells", "memory_budget", "place_cells"]

#: Share of the device's free memory the resident counts may take by default.
DEFAULT_MEMORY_FRACTION = 0.5


def memory_budget(device: torch.device, fraction: float = DEFAULT_MEMORY_FRACTION) -> int | None:
    """Bytes the resident cells may take on ``device``: ``fraction`` of its free memory on CUDA, ``None``
    (no limit known) elsewhere."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * fraction)
    return None


@dataclass
class _Layout:
    """The counts on the device: ``dense`` (cells x genes), or ``ell_cols`` / ``ell_vals`` (cells x w)."""

    n_vars: int
    dense: torch.Tensor | None = None
    ell_cols: torch.Tensor | None = None
    ell_vals: torch.Tensor | None = None

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.dense, self.ell_cols, self.ell_vals) if t is not None)

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        if self.dense is not None:
            return self.dense.index_select(0, rows)
        cols, vals = self.ell_cols.index_select(0, rows), self.ell_vals.index_select(0, rows)
        out = torch.zeros((rows.numel(), self.n_vars + 1), dtype=vals.dtype, device=vals.device)
        # contiguous, as a dense gather's: the likelihood kernels and their reference then see the same input
        return out.scatter_(1, cols, vals)[:, : self.n_vars].contiguous()


def _ell_arrays(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, n_vars: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """Padded per-row column indices (int64, padding ``n_vars``) and values (float32, padding 0) of CSR."""
    n = indptr.size - 1
    lengths = np.diff(indptr)
    width = max(int(lengths.max(initial=0)), 1)
    cols = np.full((n, width), n_vars, dtype=np.int64)
    vals = np.zeros((n, width), dtype=np.float32)
    row = np.repeat(np.arange(n), lengths)
    pos = np.arange(indices.size) - np.repeat(indptr[:-1], lengths)
    cols[row, pos] = indices
    vals[row, pos] = data
    return cols, vals


def _layout_bytes(cells: CellData) -> tuple[int, int]:
    """Bytes of the dense and of the ELL layout of ``cells``' counts."""
    n, g = cells.n_cells, int(cells.counts.shape[1])
    csr = cells.csr_arrays()
    if csr is None:
        return n * g * 4, n * g * 12
    width = max(int(np.diff(csr[0]).max(initial=0)), 1)
    return n * g * 4, n * width * 12


def place_cells(cells: CellSource, device: torch.device | str, *, budget_bytes: int | None = None,
                force: bool = False) -> CellSource:
    """``cells`` resident on ``device`` when that pays and fits; on CUDA otherwise streamed through pinned
    staging buffers (:class:`StagedCells`); else ``cells`` unchanged.

    Parameters
    ----------
    cells
        The training cells. Only in-memory :class:`~atlasmap.data.loader.CellData` are moved; streamed
        (backed) sources stay as they are.
    device
        The training device. On the CPU the host path is already resident (the compiled gather reads the
        CSR in place), so nothing moves unless ``force``.
    budget_bytes
        Most bytes the counts may take on the device (default :func:`memory_budget`): the smaller of the
        dense and the ELL layout is taken if it fits, otherwise the counts stay on the host.
    force
        Move even to the CPU (tests, and to compare the two paths).
    """
    device = torch.device(device)
    if not isinstance(cells, CellData) or (device.type == "cpu" and not force):
        return cells
    budget = memory_budget(device) if budget_bytes is None else budget_bytes
    dense_bytes, ell_bytes = _layout_bytes(cells)
    field_bytes = sum(t.numel() * t.element_size() for t in cells.fields.values())
    use_dense = dense_bytes <= ell_bytes
    need = (dense_bytes if use_dense else ell_bytes) + field_bytes
    if budget is not None and need > budget:
        return StagedCells(cells, device) if device.type == "cuda" else cells
    return DeviceCells.from_cells(cells, device, dense=use_dense)


class DeviceCells:
    """A :class:`~atlasmap.protocols.CellSource` whose counts and per-cell fields live on one device.

    Built by :func:`place_cells`; minibatches come out on that device whatever ``device`` a caller passes
    (the training loop passes the same one). ``host`` is the in-memory source it was made from: it answers
    what needs the host copy (library sizes, fingerprint, the CSR arrays).
    """

    def __init__(self, layout: _Layout, fields: dict[str, torch.Tensor], host: CellData,
                 device: torch.device) -> None:
        self._layout = layout
        self.fields = fields
        self.host = host
        self.device = device

    @classmethod
    def from_cells(cls, cells: CellData, device: torch.device, *, dense: bool) -> DeviceCells:
        """Copy ``cells`` to ``device`` in the dense (``dense=True``) or the ELL layout."""
        n_vars = int(cells.counts.shape[1])
        csr = cells.csr_arrays()
        if dense:
            x = cells.counts if csr is None else torch.from_numpy(cells.counts.toarray().astype(np.float32))
            layout = _Layout(n_vars, dense=x.to(device, torch.float32))
        else:
            if csr is None:  # dense host counts (place_cells never picks ELL for them; correct anyway)
                csr = _dense_to_csr(cells.counts)
            cols, vals = _ell_arrays(*csr, n_vars)
            layout = _Layout(n_vars, ell_cols=torch.from_numpy(cols).to(device),
                             ell_vals=torch.from_numpy(vals).to(device))
        fields = {k: v.to(device) for k, v in cells.fields.items()}
        return cls(layout, fields, cells, device)

    # --------------------------------------------------------------------------------- CellSource
    @property
    def n_cells(self) -> int:
        return self.host.n_cells

    @property
    def layout(self) -> str:
        """``"dense"`` or ``"ell"``."""
        return "dense" if self._layout.dense is not None else "ell"

    def nbytes(self) -> int:
        """Device bytes held by the counts and fields."""
        return self._layout.nbytes() + sum(t.numel() * t.element_size() for t in self.fields.values())

    def _rows_on_device(self, rows: np.ndarray | torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(rows, dtype=torch.long).to(self.device, non_blocking=True)

    def _batch_of(self, rows: torch.Tensor) -> Batch:
        out = {"x": self._layout.gather(rows)}
        for name, tensor in self.fields.items():
            out[name] = tensor.index_select(0, rows)
        return out

    def batch(self, rows: np.ndarray | torch.Tensor, device: torch.device | str | None = None) -> Batch:
        """The minibatch of ``rows`` (any order), gathered on the resident device."""
        return self._batch_of(self._rows_on_device(rows))

    def iter_batches(self, rows: np.ndarray, batch_size: int, *, shuffle: bool, rng: np.random.Generator | None,
                     device: torch.device | str | None = None, rank: int = 0, world_size: int = 1
                     ) -> Iterator[Batch]:
        """One epoch of minibatches of ``rows``: the host path's order (same generator draws, same
        :func:`~atlasmap.data.loader.shard` rule), uploaded once and sliced on the device per step."""
        parts = [rows[shard(part, rank, world_size)] for part in
                 minibatches(len(rows), batch_size, shuffle=shuffle, generator=rng)]
        parts = [p for p in parts if p.size]
        if not parts:
            return
        order = self._rows_on_device(np.concatenate(parts))
        lo = 0
        for part in parts:
            yield self._batch_of(order[lo:lo + part.size])
            lo += part.size

    def iter_ordered(self, batch_size: int, device: torch.device | str | None = None
                     ) -> Iterator[tuple[slice, Batch]]:
        """``(rows, batch)`` over all cells in order."""
        every = torch.arange(self.n_cells, device=self.device)
        for lo in range(0, self.n_cells, max(batch_size, 1)):
            hi = min(lo + batch_size, self.n_cells)
            yield slice(lo, hi), self._batch_of(every[lo:hi])

    def with_fields(self, extra: dict[str, torch.Tensor]) -> DeviceCells:
        """The same resident cells with ``extra`` per-cell fields (moved to the device)."""
        if not extra:
            return self
        moved = {k: v.to(self.device) for k, v in extra.items()}
        return DeviceCells(self._layout, {**self.fields, **moved}, self.host.with_fields(extra), self.device)

    def library_sizes(self) -> np.ndarray:
        return self.host.library_sizes()

    def csr_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        return self.host.csr_arrays()

    def fingerprint(self) -> str:
        return self.host.fingerprint()


class StagedCells:
    """A :class:`~atlasmap.protocols.CellSource` of host-held counts fed to ``device`` through a ring of
    ``depth`` pinned staging buffers (asynchronous copies overlapping the device's work), with the per-cell
    fields resident on the device. Built by :func:`place_cells` when the counts do not fit.

    A batch's ``"x"`` is valid until ``depth - 1`` further batches have been drawn (the training loop
    consumes each before the next; keep ``depth >= 2``).
    """

    def __init__(self, host: CellData, device: torch.device | str, *, depth: int = 3,
                 moved: dict[str, torch.Tensor] | None = None) -> None:
        self.host = host
        self.device = torch.device(device)
        moved = moved or {}  # fields already on the device (with_fields does not copy them again)
        self.fields = {k: moved[k] if k in moved else v.to(self.device) for k, v in host.fields.items()}
        self._depth = max(depth, 2)
        self._slots: list[torch.Tensor] = []
        self._events: list[torch.cuda.Event | None] = []
        self._next = 0

    @property
    def n_cells(self) -> int:
        return self.host.n_cells

    def _slot(self, n_rows: int) -> torch.Tensor:
        """The next free staging buffer's first ``n_rows`` rows (waits for the copy that last read it)."""
        n_vars = int(self.host.counts.shape[1])
        k = self._next
        self._next = (k + 1) % self._depth
        if k >= len(self._slots) or self._slots[k].shape[0] < n_rows:
            pin = self.device.type == "cuda"
            buffer = torch.empty((n_rows, n_vars), dtype=torch.float32, pin_memory=pin)
            if k >= len(self._slots):
                self._slots.append(buffer)
                self._events.append(None)
            else:
                self._slots[k] = buffer
        event = self._events[k]
        if event is not None:
            event.synchronize()
        return self._slots[k][:n_rows]

    def _counts(self, rows: np.ndarray) -> torch.Tensor:
        k = self._next
        slot = self._slot(rows.size)
        csr = self.host.csr_arrays()
        if csr is None:
            torch.index_select(self.host.counts, 0, torch.from_numpy(rows), out=slot)
        else:
            ops.gather_rows(*csr, slot.shape[1], rows, out=slot)
        if self.device.type == "cpu":  # no copy to overlap: hand out the rows themselves
            return slot.clone()
        x = slot.to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
            self._events[k] = event
        return x

    def batch(self, rows: np.ndarray | torch.Tensor, device: torch.device | str | None = None) -> Batch:
        """The minibatch of ``rows``: counts staged and copied, fields gathered on the device."""
        rows = np.asarray(rows.cpu() if isinstance(rows, torch.Tensor) else rows, dtype=np.int64)
        index = torch.from_numpy(rows).to(self.device, non_blocking=True)
        out = {"x": self._counts(rows)}
        for name, tensor in self.fields.items():
            out[name] = tensor.index_select(0, index)
        return out

    def iter_batches(self, rows: np.ndarray, batch_size: int, *, shuffle: bool, rng: np.random.Generator | None,
                     device: torch.device | str | None = None, rank: int = 0, world_size: int = 1
                     ) -> Iterator[Batch]:
        """One epoch of minibatches of ``rows`` (the host path's order and shards)."""
        for part in minibatches(len(rows), batch_size, shuffle=shuffle, generator=rng):
            mine = shard(part, rank, world_size)
            if mine.size:
                yield self.batch(rows[mine])

    def iter_ordered(self, batch_size: int, device: torch.device | str | None = None
                     ) -> Iterator[tuple[slice, Batch]]:
        for lo in range(0, self.n_cells, max(batch_size, 1)):
            hi = min(lo + batch_size, self.n_cells)
            yield slice(lo, hi), self.batch(np.arange(lo, hi))

    def with_fields(self, extra: dict[str, torch.Tensor]) -> StagedCells:
        if not extra:
            return self
        return StagedCells(self.host.with_fields(extra), self.device, depth=self._depth, moved=self.fields)

    def library_sizes(self) -> np.ndarray:
        return self.host.library_sizes()

    def csr_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        return self.host.csr_arrays()

    def fingerprint(self) -> str:
        return self.host.fingerprint()


def _dense_to_csr(counts: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    csr = sp.csr_matrix(counts.numpy())
    return csr.indptr.astype(np.int64), csr.indices.astype(np.int32), csr.data.astype(np.float32)
