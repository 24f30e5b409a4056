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

The same code runs on the CPU (``place_cells(..., force=True)``), which is how it is tested without a GPU.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from atlasmap.data.loader import CellData, minibatches, shard
from atlasmap.protocols import Batch, CellSource

__all__ = ["DEFAULT_MEMORY_FRACTION", "DeviceCells", "memory_budget", "place_cells"]

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
    """``cells`` resident on ``device`` when that pays and fits, else ``cells`` unchanged.

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
        dense and the ELL layout is taken if it fits, otherwise the cells stay on the host.
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
        return cells
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


def _dense_to_csr(counts: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    csr = sp.csr_matrix(counts.numpy())
    return csr.indptr.astype(np.int64), csr.indices.astype(np.int32), csr.data.astype(np.float32)
