"""Cells → minibatches of tensors, built for throughput.

Counts are validated and aligned once (:func:`prepare_cells`) and kept as CSR (canonical float32 input is
shared read-only, not copied); a minibatch is one pass of the compiled row gather over the selected
nonzeros (a vectorised scatter of :mod:`atlasmap.ops`' reference without the compiled kernel). Only when a dense copy would be no
larger than the CSR one (or, without the kernel, fits the memory budget) is it materialised and a minibatch
is a single ``index_select`` (:func:`use_dense`). No AnnData is touched inside the training loop.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from atlasmap import ops
from atlasmap.data.align import align_genes, continuous_matrix, encode_categories, reorder_genes
from atlasmap.data.registry import Registry, check_anndata, find_counts, get_counts
from atlasmap.errors import InputError

#: Materialise counts densely when they take at most this many bytes as float32.
DENSE_BUDGET_BYTES = 2 * 1024**3

Batch = dict[str, torch.Tensor]


@dataclass
class CellData:
    """Aligned, validated per-cell arrays of one AnnData, ready to be cut into minibatches.

    ``counts`` is a CSR matrix, or a dense float32 tensor when :func:`use_dense` prefers it.
    ``fields`` holds other per-cell tensors (category codes ``"cat"``, continuous covariates ``"cont"``,
    and whatever a model adds, e.g. labels or proteins).
    """

    counts: torch.Tensor | sp.csr_matrix
    fields: dict[str, torch.Tensor] = field(default_factory=dict)
    _csr_arrays: tuple[np.ndarray, np.ndarray, np.ndarray] | None = field(default=None, repr=False, compare=False)

    @property
    def n_cells(self) -> int:
        return int(self.counts.shape[0])

    def batch(self, rows: np.ndarray | torch.Tensor, device: torch.device | str = "cpu") -> Batch:
        """The minibatch of ``rows`` as a dict of tensors on ``device``."""
        span = _contiguous_span(rows)
        if span is not None:  # inference / validation: read-only views, no copy
            lo, hi = span
            x = self.counts[lo:hi] if isinstance(self.counts, torch.Tensor) else self._gather(np.arange(lo, hi))
            out = {"x": x}
            for name, tensor in self.fields.items():
                out[name] = tensor[lo:hi]
        else:
            rows_t = torch.as_tensor(rows, dtype=torch.long)
            if isinstance(self.counts, torch.Tensor):
                x = self.counts.index_select(0, rows_t)
            else:
                x = self._gather(np.asarray(rows))
            out = {"x": x}
            for name, tensor in self.fields.items():
                out[name] = tensor.index_select(0, rows_t)
        if str(device) != "cpu":
            out = {k: v.to(device, non_blocking=True) for k, v in out.items()}
        return out

    def _gather(self, rows: np.ndarray) -> torch.Tensor:
        """Dense minibatch of CSR rows (:func:`atlasmap.ops.gather_rows`: compiled, or its PyTorch reference)."""
        return ops.gather_rows(*self.csr_arrays(), self.counts.shape[1], rows)

    def csr_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """``(indptr int64, indices int32, data float32)`` of CSR counts, as the compiled kernels read them
        (converted once, shared otherwise); ``None`` when the counts are held densely."""
        if isinstance(self.counts, torch.Tensor):
            return None
        if self._csr_arrays is None:
            csr = self.counts
            self._csr_arrays = (np.ascontiguousarray(csr.indptr, dtype=np.int64),
                                np.ascontiguousarray(csr.indices, dtype=np.int32),
                                np.ascontiguousarray(csr.data, dtype=np.float32))
        return self._csr_arrays

    def iter_batches(self, rows: np.ndarray, batch_size: int, *, shuffle: bool, rng: np.random.Generator | None,
                     device: torch.device | str = "cpu", rank: int = 0, world_size: int = 1) -> Iterator[Batch]:
        """One epoch of minibatches of ``rows``, drawn from ``rng`` (the same draws on every rank). With
        ``world_size > 1`` each *global* minibatch of ``batch_size`` cells is split by :func:`shard`, so the
        ranks together take the step one process takes (every rank sees the same number of steps)."""
        for part in minibatches(len(rows), batch_size, shuffle=shuffle, generator=rng):
            mine = shard(part, rank, world_size)
            if mine.size:
                yield self.batch(rows[mine], device)

    def iter_ordered(self, batch_size: int, device: torch.device | str = "cpu") -> Iterator[tuple[slice, Batch]]:
        """``(rows, batch)`` over all cells in order (read-only views of contiguous rows)."""
        for lo in range(0, self.n_cells, max(batch_size, 1)):
            hi = min(lo + batch_size, self.n_cells)
            yield slice(lo, hi), self.batch(np.arange(lo, hi), device)

    def with_fields(self, extra: dict[str, torch.Tensor]) -> CellData:
        """The same cells (counts shared, not copied) with ``extra`` per-cell fields added."""
        return self if not extra else CellData(self.counts, {**self.fields, **extra}, self._csr_arrays)

    def library_sizes(self) -> np.ndarray:
        """Total counts of each cell (over the model's genes)."""
        x = self.counts
        return x.sum(1).numpy() if isinstance(x, torch.Tensor) else np.asarray(x.sum(1)).ravel()

    def fingerprint(self) -> str:
        """A digest of the cells (layout, per-cell totals, per-cell fields) that differs between data versions."""
        counts = self.counts
        if isinstance(counts, torch.Tensor):
            totals = counts.sum(1, dtype=torch.float64).numpy()
        else:
            totals = np.asarray(counts.sum(axis=1, dtype=np.float64)).ravel()
        h = hashlib.sha1(np.asarray(counts.shape, dtype=np.int64).tobytes())
        h.update(totals.tobytes())
        for name in sorted(self.fields):
            h.update(name.encode())
            h.update(self.fields[name].detach().cpu().numpy().tobytes())
        return h.hexdigest()[:16]

    def subset(self, rows: np.ndarray) -> CellData:
        rows = np.asarray(rows)
        rows_t = torch.as_tensor(rows, dtype=torch.long)
        counts = self.counts.index_select(0, rows_t) if isinstance(self.counts, torch.Tensor) else self.counts[rows]
        return CellData(counts, {k: v.index_select(0, rows_t) for k, v in self.fields.items()})


def _contiguous_span(rows: np.ndarray | torch.Tensor) -> tuple[int, int] | None:
    """``(lo, hi)`` when ``rows`` is exactly ``lo, lo + 1, ..., hi - 1`` (as minibatches without shuffling are)."""
    if not isinstance(rows, np.ndarray) or rows.ndim != 1 or rows.size == 0 or rows.dtype.kind not in "iu":
        return None
    lo, hi = int(rows[0]), int(rows[-1]) + 1
    if hi - lo != rows.size or lo < 0 or (rows.size > 1 and not bool((np.diff(rows) == 1).all())):
        return None
    return lo, hi


def gather_csr_rows(csr: sp.csr_matrix, rows: np.ndarray) -> np.ndarray:
    """Dense float32 block of CSR ``rows`` (:func:`atlasmap.ops.gather_rows`: one pass of the compiled
    gather, or one vectorised scatter of the reference; no Python loop over cells)."""
    data = csr.data if csr.data.dtype == np.float32 else csr.data.astype(np.float32)
    return ops.gather_rows(csr.indptr, csr.indices, data, csr.shape[1], np.asarray(rows)).numpy()


def log_library_sizes(totals: np.ndarray) -> torch.Tensor:
    """``log(sum_g x_g)`` of each cell as float32: the observed library size the encoder and decoder use,
    computed once per dataset instead of a cells x genes sum in every step (in-memory and backed data
    share this function, so both give the same bits)."""
    return torch.log(torch.as_tensor(np.asarray(totals, dtype=np.float32)))


def log_factorial_rows(csr: sp.csr_matrix, chunk: int = 1 << 22) -> np.ndarray:
    """``sum_g lgamma(x_g + 1)`` of each row of a CSR count matrix (float32; zeros contribute nothing):
    :func:`atlasmap.ops.log_factorial_rows`, one pass of the compiled kernel, or the reference in blocks of
    about ``chunk`` nonzeros (bounded temporary memory)."""
    return ops.log_factorial_rows(csr.indptr.astype(np.int64, copy=False), csr.data, chunk).numpy()


def prepare_cells(
    adata: Any,
    registry: Registry,
    *,
    key_map: dict[str, str] | None = None,
    min_gene_overlap: float | None = None,
    var_names_column: str | None = None,
    dense_budget_bytes: int = DENSE_BUDGET_BYTES,
    likelihood_constants: bool = True,
    dense: bool | None = None,
) -> CellData:
    """Validate ``adata`` against ``registry`` and build its :class:`CellData` (``adata`` is not modified).

    ``likelihood_constants=False`` skips the per-cell ``sum log x!`` that only the training loss needs
    (inference on new data; the loss computes it itself when it is missing). ``dense`` forces the dense
    (True) or CSR (False) layout of the counts; by default :func:`use_dense` decides."""
    check_anndata(adata)
    kwargs: dict[str, Any] = {"var_names_column": var_names_column}
    if min_gene_overlap is not None:
        kwargs["min_overlap"] = min_gene_overlap
    source = find_counts(adata, registry.layer)  # the model's layer, or the one place holding counts
    alignment = align_genes(source.var(adata), registry.var_names, **kwargs)
    counts = get_counts(adata, registry.layer, source=source)
    counts = reorder_genes(counts, alignment)
    totals = np.asarray(counts.sum(axis=1)).ravel()
    if (totals <= 0).any():
        n = int((totals <= 0).sum())
        example = adata.obs_names[int(np.flatnonzero(totals <= 0)[0])]
        raise InputError(
            f"{n} cells have no counts in the model's genes (e.g. {example!r}); their library size is zero. "
            "Remove them first, e.g. sc.pp.filter_cells(adata, min_counts=1)."
        )
    fields = {
        "cat": torch.from_numpy(encode_categories(adata, registry, key_map)),
        "cont": torch.from_numpy(continuous_matrix(adata, registry)),
        # sum_g log(x_g!): the data-only part of count likelihoods, summed over the nonzeros once here
        # instead of a cells x genes lgamma in every training step
        "log_library": log_library_sizes(totals),
    }
    if likelihood_constants:
        fields["log_x_fact"] = torch.from_numpy(log_factorial_rows(counts))
    if use_dense(counts, dense_budget_bytes) if dense is None else dense:
        counts = torch.from_numpy(counts.toarray())
    return CellData(counts, fields)


def use_dense(csr: sp.csr_matrix, dense_budget_bytes: int = DENSE_BUDGET_BYTES) -> bool:
    """Materialise the counts densely? Within the budget and, when the compiled row gather is installed
    (as fast as a dense ``index_select``), only if the dense copy is no larger than the CSR one (dense
    single-cell data are rare: at 5 % nonzeros a dense copy is 10x the CSR)."""
    dense_bytes = csr.shape[0] * csr.shape[1] * 4
    if dense_bytes > dense_budget_bytes:
        return False
    return not ops.available() or dense_bytes <= csr.nnz * 8 + csr.shape[0] * 8


def shard(items: Any, rank: int, world_size: int) -> Any:
    """Rank ``rank``'s share of ``items`` (an array or a list): every ``world_size``-th item from its rank.
    The one rule of distributed work division: rows of a global minibatch in memory, chunks of a file when
    streaming (:meth:`atlasmap.data.backed.BackedCells.iter_batches`)."""
    return items if world_size == 1 else items[rank::world_size]


def minibatches(
    n_cells: int, batch_size: int, *, shuffle: bool, generator: np.random.Generator | None = None
) -> Iterator[np.ndarray]:
    """Row indices of each minibatch. A last batch of a single cell is merged into the previous one
    (a one-cell batch gives degenerate batch-norm statistics and a noisy step)."""
    order = generator.permutation(n_cells) if shuffle else np.arange(n_cells)
    bounds = list(range(0, n_cells, batch_size)) + [n_cells]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] == 1:
        bounds.pop(-2)
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        yield order[lo:hi]
