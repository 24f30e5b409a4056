"""Streaming cells from an on-disk ``.h5ad``: memory bounded by the chunk size, not by the dataset.

The counts stay on disk in anndata's CSR layout (group ``X`` or ``layers/<name>`` holding ``data``,
``indices``, ``indptr``). Only these are held in memory:

* ``obs`` / ``var`` (anndata's backed mode loads them; a few hundred bytes per cell),
* ``indptr`` (8 bytes per cell), per-cell covariate codes and library sizes (a few bytes per cell each),
* the rows currently in use: a shuffle buffer of ``shuffle_chunks`` chunks of ``chunk_size`` rows.

Training reads chunks (contiguous row ranges: one sequential read each) in a shuffled order, mixes the
rows of ``shuffle_chunks`` chunks in a buffer, and cuts shuffled minibatches from it. Inference reads
chunks in order. Every chunk is validated once (counts, NaN, ...) by the same code as in-memory data
(:func:`atlasmap.data.registry.validate_counts`) and aligned to the model's genes by
:mod:`atlasmap.data.align`.

:class:`BackedCells` duck-types :class:`~atlasmap.data.loader.CellData` (``n_cells``, ``fields``,
``batch(rows)``) and adds :meth:`BackedCells.iter_batches`: both implement
:class:`~atlasmap.protocols.CellSource`, which the training loop iterates.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import os
import queue
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from atlasmap.data.align import (
    GeneAlignment,
    align_genes,
    continuous_matrix,
    encode_categories,
    reorder_genes,
)
from atlasmap.data.loader import Batch, log_factorial_rows, log_library_sizes, minibatches, shard
from atlasmap.data.registry import Registry, check_anndata, check_library_sizes, validate_counts
from atlasmap.errors import AtlasmapError, InputError
from atlasmap.runtime import (
    BackedOptions,
    backed_options,
    get_backed_options,
    release_large_allocations,
    set_backed_options,
)

__all__ = [
    "BackedCells", "BackedOptions", "CSRFile", "CSRWriter", "DataChangedError", "backed_options",
    "convert_to_csr", "get_backed_options", "is_backed", "prepare_backed_cells",
    "read_backed", "scan_backed_counts", "set_backed_options",
]


class DataChangedError(AtlasmapError):
    """An on-disk input disappeared, was truncated or was rewritten while atlasmap was reading it."""


# ----------------------------------------------------------------------------------------------
# Opening files
# ----------------------------------------------------------------------------------------------


def is_backed(adata: Any) -> bool:
    """True for an AnnData whose ``X`` stays on disk (``anndata.read_h5ad(path, backed="r")``, :func:`read_backed`)."""
    return bool(getattr(adata, "isbacked", False))


def read_backed(path: str | os.PathLike[str], *, what: str = "input") -> Any:
    """Open an ``.h5ad`` with its counts left on disk.

    Like ``anndata.read_h5ad(path, backed="r")`` (``obs``, ``var``, ``obsm`` and ``uns`` are read into
    memory; ``X`` stays on disk) but layers are not loaded either — anndata's backed mode reads every layer
    into memory — so counts in ``layers["counts"]`` are streamed too.

    Raises
    ------
    InputError
        The file does not exist or is not a readable ``.h5ad``.
    """
    import anndata as ad
    import h5py
    from anndata.io import read_elem

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} file {path} does not exist.")
    try:
        with h5py.File(path, "r") as f:
            parts = {k: read_elem(f[k]) for k in ("obs", "var", "obsm", "uns") if k in f}
    except Exception as err:  # h5py/anndata raise many types for a damaged file
        raise InputError(f"{what} file {path} is not a readable .h5ad file ({type(err).__name__}: {err}).") from None
    if "obs" not in parts or "var" not in parts:
        raise InputError(f"{what} file {path} has no obs/var: it is not an .h5ad file written by anndata.")
    return ad.AnnData(obs=parts["obs"], var=parts["var"], obsm=parts.get("obsm") or None,
                      uns=parts.get("uns") or None, filename=path, filemode="r")


def _counts_key(layer: str | None) -> str:
    return "X" if layer is None else f"layers/{layer}"


def _convert_hint(path: Path, key: str) -> str:
    return (f"python -m atlasmap.data.backed to-csr {path} OUT.h5ad{'' if key == 'X' else f' --key {key}'}  "
            "(or in Python: adata = anndata.read_h5ad(IN); adata.X = scipy.sparse.csr_matrix(adata.X); "
            "adata.write_h5ad(OUT))")


class CSRFile:
    """Rows of a CSR matrix stored in an HDF5 group in anndata's layout, read one range at a time.

    ``indptr`` is read once (8 bytes per row); :meth:`read` fetches ``data``/``indices`` of a row range
    with one contiguous read each. Before each read the file's size and modification time are compared
    with those at opening, so a file rewritten, truncated or deleted mid-run gives a
    :class:`DataChangedError` instead of garbage.

    Raises
    ------
    InputError
        The group is missing, is a dense array or a CSC matrix (backed mode needs CSR), or is inconsistent.
    """

    def __init__(self, path: str | os.PathLike[str], key: str = "X") -> None:
        import h5py

        self.path = Path(path)
        self.key = key
        if not self.path.is_file():
            raise InputError(f"backed file {self.path} does not exist.")
        self._stat = self._file_stat()
        try:
            self._file = h5py.File(self.path, "r")
        except OSError as err:
            raise InputError(f"{self.path} is not a readable HDF5/.h5ad file ({err}).") from None
        try:
            self._open_group()
        except BaseException:
            self._file.close()
            raise

    def _open_group(self) -> None:
        import h5py

        where = f"{self.path}:{self.key}"
        if self.key not in self._file:
            what = "X" if self.key == "X" else f"layer {self.key.split('/', 1)[1]!r}"
            raise InputError(f"{self.path} has no {what} (no HDF5 object {self.key!r}); cannot read counts from it.")
        group = self._file[self.key]
        if isinstance(group, h5py.Dataset):
            raise InputError(
                f"{where} is stored as a dense array; backed (streaming) mode needs a CSR sparse matrix. "
                f"Convert it once with: {_convert_hint(self.path, self.key)}"
            )
        encoding = _attr_str(group.attrs.get("encoding-type", ""))
        if encoding == "csc_matrix":
            raise InputError(
                f"{where} is a CSC (column-compressed) sparse matrix; backed mode reads cells (rows) and needs "
                f"CSR. Convert it once: adata = anndata.read_h5ad(IN); adata.X = adata.X.tocsr(); "
                f"adata.write_h5ad(OUT)"
            )
        if encoding != "csr_matrix":
            raise InputError(f"{where} has encoding {encoding or 'unknown'!r}, not 'csr_matrix'; "
                             "it is not a sparse matrix in anndata's format.")
        try:
            shape = tuple(int(v) for v in group.attrs["shape"])
            self._data, self._indices = group["data"], group["indices"]
            indptr = np.asarray(group["indptr"][...], dtype=np.int64)
        except (KeyError, OSError, ValueError) as err:
            raise InputError(f"{where} is damaged or truncated ({type(err).__name__}: {err}).") from None
        n_rows, n_cols = shape
        nnz = int(indptr[-1]) if indptr.size else -1
        if (indptr.size != n_rows + 1 or indptr[0] != 0 or nnz != self._data.shape[0]
                or nnz != self._indices.shape[0] or (np.diff(indptr) < 0).any()):
            raise InputError(f"{where} is inconsistent (indptr of {indptr.size} entries for {n_rows} rows, "
                             f"{self._data.shape[0]} stored values); the file is damaged or truncated.")
        if self._data.dtype.kind not in "biuf":
            raise InputError(f"{where} has dtype {self._data.dtype}; atlasmap needs numeric raw counts.")
        self.shape = (n_rows, n_cols)
        self.indptr = indptr

    def _file_stat(self) -> tuple[int, int]:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            raise DataChangedError(
                f"backed input {self.path} disappeared while atlasmap was reading it; restore it and run again "
                "(no output was written)."
            ) from None
        return st.st_size, st.st_mtime_ns

    @property
    def nnz(self) -> int:
        return int(self.indptr[-1])

    def read(self, start: int, stop: int) -> sp.csr_matrix:
        """Rows ``start:stop`` as a float32 CSR matrix in the file's column order (no copy of the rest)."""
        if self._file_stat() != self._stat:
            raise DataChangedError(
                f"backed input {self.path} was modified or truncated while atlasmap was reading it; "
                "re-create it and run again (no output was written)."
            )
        lo, hi = int(self.indptr[start]), int(self.indptr[stop])
        try:
            data = self._data[lo:hi]
            indices = self._indices[lo:hi]
        except (OSError, RuntimeError, ValueError) as err:
            raise DataChangedError(
                f"reading rows {start}-{stop} of {self.path}:{self.key} failed ({type(err).__name__}: {err}); "
                "the file is damaged or truncated. Re-create it and run again (no output was written)."
            ) from None
        if data.dtype != np.float32:
            data = data.astype(np.float32)
        if indices.size and (int(indices.max()) >= self.shape[1] or int(indices.min()) < 0):
            raise DataChangedError(f"{self.path}:{self.key} rows {start}-{stop} hold column indices outside "
                                   f"0..{self.shape[1] - 1}; the file is damaged.")
        return sp.csr_matrix((data, indices, self.indptr[start:stop + 1] - lo), shape=(stop - start, self.shape[1]))

    def fingerprint(self) -> str:
        """A short digest of the matrix layout (shape, ``indptr``): equal on ranks reading the same data."""
        h = hashlib.sha1()
        h.update(np.asarray(self.shape, dtype=np.int64).tobytes())
        h.update(self.indptr.tobytes())
        return h.hexdigest()[:16]

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._file.close()

    def __enter__(self) -> CSRFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _attr_str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _backed_path(adata: Any) -> Path:
    filename = getattr(adata, "filename", None)
    if filename is None:
        raise InputError("this AnnData is not backed by a file; open it with atlasmap.data.backed.read_backed(path) "
                         "or anndata.read_h5ad(path, backed='r').")
    return Path(filename)


def _open_counts(adata: Any, layer: str | None) -> CSRFile:
    source = CSRFile(_backed_path(adata), _counts_key(layer))
    if source.shape != (adata.n_obs, adata.n_vars):
        source.close()
        raise InputError(f"{source.path}:{source.key} has shape {source.shape} but the AnnData has "
                         f"{adata.n_obs} cells x {adata.n_vars} genes; the file is inconsistent.")
    return source


def _where(layer: str | None) -> str:
    return "adata.X" if layer is None else f"adata.layers[{layer!r}]"


def make_readable(path: Path) -> None:
    """Give a ``mkstemp`` file (mode 0600) the permissions a normally created file would have."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _row_ranges(n: int, size: int) -> list[tuple[int, int]]:
    return [(lo, min(lo + size, n)) for lo in range(0, n, size)]


def scan_backed_counts(adata: Any, layer: str | None, *, alignment: GeneAlignment | None = None,
                       chunk_size: int | None = None) -> np.ndarray:
    """Validate the on-disk counts of a backed AnnData chunk by chunk; return each cell's library size.

    Each chunk goes through :func:`~atlasmap.data.registry.validate_counts` (the in-memory checks). With
    ``alignment`` the library sizes are over the model's genes and cells with none are refused.
    """
    return _scan(adata, layer, alignment=alignment, chunk_size=chunk_size)["library"]


#: Results of the last few scans, keyed by file identity, counts key, gene alignment and cell names: the
#: registry check and the loader then read a file once, not twice.
_SCANS: dict[tuple[Any, ...], dict[str, np.ndarray]] = {}


def _scan(adata: Any, layer: str | None, *, alignment: GeneAlignment | None, chunk_size: int | None
          ) -> dict[str, np.ndarray]:
    """One validating pass over the counts: per-cell library size and ``sum_g log(x_g!)`` (memoised)."""
    path = _backed_path(adata)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise InputError(f"backed file {path} does not exist.") from None
    aligned = alignment is not None and not alignment.is_identity
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, _counts_key(layer),
           hashlib.sha1(alignment.source_index.tobytes()).hexdigest() if aligned else None,
           hashlib.sha1("\0".join(map(str, adata.obs_names)).encode()).hexdigest())
    out = _SCANS.get(key)
    if out is None:
        out = _scan_file(adata, layer, alignment=alignment if aligned else None, chunk_size=chunk_size)
        while len(_SCANS) >= 4:
            _SCANS.pop(next(iter(_SCANS)))
        _SCANS[key] = out
    if alignment is not None:  # library sizes over the model's genes
        check_library_sizes(out["library"], adata.obs_names)
    return out


def _scan_file(adata: Any, layer: str | None, *, alignment: GeneAlignment | None, chunk_size: int | None
               ) -> dict[str, np.ndarray]:
    chunk_size = chunk_size or get_backed_options().chunk_size
    with _open_counts(adata, layer) as source:
        n = source.shape[0]
        out = {"library": np.empty(n, dtype=np.float32), "log_x_fact": np.empty(n, dtype=np.float32)}
        canonical = True
        for lo, hi in _row_ranges(n, chunk_size):
            raw = source.read(lo, hi)
            csr = validate_counts(raw, where=_where(layer), obs_names=adata.obs_names[lo:hi],
                                  var_names=adata.var_names, layer=layer)
            if alignment is not None:
                csr = reorder_genes(csr, alignment)
            canonical = canonical and bool(raw.has_canonical_format)
            out["library"][lo:hi] = np.asarray(csr.sum(axis=1)).ravel()
            out["log_x_fact"][lo:hi] = log_factorial_rows(csr)
    out["canonical"] = np.array(canonical)  # sorted column indices, no duplicates: rows can be read as stored
    return out


# ----------------------------------------------------------------------------------------------
# The streaming cell source
# ----------------------------------------------------------------------------------------------


class BackedCells:
    """Validated, gene-aligned cells of an on-disk AnnData, read in chunks of rows.

    Built by :func:`prepare_backed_cells`. Per-cell covariates (``fields``) and library sizes are in memory;
    counts are read from disk when a minibatch needs them.

    Attributes
    ----------
    source
        The open :class:`CSRFile`.
    alignment
        Model genes in the file (reordering / zero-filling applied to every chunk).
    fields
        Per-cell tensors (``"cat"``, ``"cont"`` and what a model adds), as in ``CellData``.
    library
        Total counts of each cell over the model's genes (float32).
    options
        Chunk size, shuffle buffer and prefetching.
    """

    def __init__(self, source: CSRFile, alignment: GeneAlignment, fields: dict[str, torch.Tensor],
                 library: np.ndarray, options: BackedOptions | None = None, *, canonical: bool = True) -> None:
        self.source = source
        self.canonical = canonical
        self.alignment = alignment
        self.fields = fields
        self.library = library
        self.options = options or get_backed_options()

    @property
    def n_cells(self) -> int:
        return int(self.source.shape[0])

    @property
    def n_vars(self) -> int:
        return int(self.alignment.source_index.size)

    def fingerprint(self) -> str:
        """Digest of the data layout and covariates; equal on every rank reading the same data version."""
        h = hashlib.sha1(self.source.fingerprint().encode())
        h.update(self.alignment.source_index.tobytes())
        for name in sorted(self.fields):
            h.update(name.encode())
            h.update(self.fields[name].numpy().tobytes())
        h.update(self.library.tobytes())
        return h.hexdigest()[:16]

    def with_fields(self, extra: dict[str, torch.Tensor]) -> BackedCells:
        """The same on-disk cells (same open file) with ``extra`` per-cell fields added."""
        if not extra:
            return self
        out = copy.copy(self)
        out.fields = {**self.fields, **extra}
        return out

    def library_sizes(self) -> np.ndarray:
        """Total counts of each cell over the model's genes (computed while validating the file)."""
        return self.library

    def csr_arrays(self) -> None:
        """Counts on disk are not held in memory: ``None`` (see :class:`~atlasmap.protocols.CellSource`)."""
        return None

    def read_rows(self, start: int, stop: int) -> sp.csr_matrix:
        """Counts of rows ``start:stop`` in the model's gene order (float32 CSR, canonical)."""
        csr = self.source.read(start, stop)
        if not self.canonical:  # duplicate entries are summed, as when validating
            csr.sum_duplicates()
        return reorder_genes(csr, self.alignment)

    def _read_selected(self, rows: np.ndarray) -> sp.csr_matrix:
        """Counts of sorted ``rows`` (all within one chunk): one read of their covering range."""
        lo, hi = int(rows[0]), int(rows[-1]) + 1
        csr = self.read_rows(lo, hi)
        return csr if rows.size == hi - lo else csr[rows - lo]

    def _with_fields(self, x: torch.Tensor, rows: np.ndarray, device: torch.device | str) -> Batch:
        rows_t = torch.from_numpy(rows)
        out = {"x": x}
        for name, tensor in self.fields.items():
            out[name] = tensor.index_select(0, rows_t)
        if str(device) != "cpu":
            out = {k: v.to(device, non_blocking=True) for k, v in out.items()}
        return out

    def batch(self, rows: np.ndarray | torch.Tensor, device: torch.device | str = "cpu") -> Batch:
        """The minibatch of ``rows`` (any order) as a dict of tensors.

        Random access: each chunk the rows touch is read over the range they cover, so this is efficient
        for contiguous or clustered rows (inference, validation) and slow for scattered ones — training
        uses :meth:`iter_batches` instead.
        """
        rows = np.asarray(rows, dtype=np.int64)
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        chunk_of = sorted_rows // self.options.chunk_size
        bounds = np.flatnonzero(np.diff(chunk_of)) + 1
        parts = np.split(sorted_rows, bounds)
        csr, _ = _concat_rows([(self._read_selected(part), part) for part in parts])
        if not np.array_equal(order, np.arange(rows.size)):
            inverse = np.empty_like(order)
            inverse[order] = np.arange(rows.size)
            csr = csr[inverse]  # back to the requested order
        return self._with_fields(_DenseRows(csr).rows(0, rows.size), rows, device)

    def iter_batches(
        self,
        rows: np.ndarray,
        batch_size: int,
        *,
        shuffle: bool,
        rng: np.random.Generator | None = None,
        device: torch.device | str = "cpu",
        rank: int = 0,
        world_size: int = 1,
    ) -> Iterator[Batch]:
        """Minibatches of ``rows`` (sorted cell indices, e.g. the training split) for one epoch.

        Parameters
        ----------
        rows
            Cells to use, sorted ascending.
        batch_size
            Cells per minibatch of all ranks together (the global minibatch, as for in-memory cells): each
            rank cuts ``batch_size // world_size`` cells (at least 2) from its own chunks. A final
            single-cell batch is merged into the one before.
        shuffle
            Shuffle the chunk order and the rows within the buffer of ``options.shuffle_chunks`` chunks.
            Without it, rows come in file order.
        rng
            Source of the shuffling. Ranks of a distributed run must pass generators in the same state:
            the chunk order is drawn from it identically on all ranks; each rank's within-buffer shuffle
            comes from a generator derived from it and the rank.
        rank, world_size
            Distributed sharding: rank ``r`` reads chunks ``r, r + world_size, ...`` of the (shuffled)
            chunk order, so each rank reads only its share of the file. Ranks may get a different number
            of batches (the data-parallel strategy lets a rank that ran out take steps without cells).
        """
        rows = np.asarray(rows, dtype=np.int64)
        chunks = self._chunks_of(rows)
        # the random draws happen here, in the caller, so ranks' generators stay in step
        if shuffle:
            if rng is None:
                raise ValueError("shuffle=True needs rng")
            chunks = [chunks[i] for i in rng.permutation(len(chunks))]
            local_rng = np.random.default_rng([int(rng.integers(2**62)), rank])
        else:
            local_rng = None
        chunks = shard(chunks, rank, world_size)
        group = self.options.shuffle_chunks if shuffle else 1
        groups = [chunks[i:i + group] for i in range(0, len(chunks), group)]
        per_rank = batch_size if world_size == 1 else max(2, batch_size // world_size)
        batches = self._generate(groups, per_rank, local_rng, device)
        if self.options.prefetch:
            # the whole pipeline (read, shuffle buffer, densify) runs one step ahead in a worker thread
            return _prefetch(batches, depth=4)
        return batches

    def _generate(self, groups: list[list[np.ndarray]], batch_size: int, local_rng: np.random.Generator | None,
                  device: torch.device | str) -> Iterator[Batch]:
        carry: list[tuple[sp.csr_matrix, np.ndarray, np.ndarray]] = []
        for i, group in enumerate(groups):
            # whole covering ranges are read; the selected rows are picked by the same single copy that
            # applies the shuffle (one fancy-index pass over the buffer, not two)
            csr, sel, buf_rows = _concat_pieces(carry + [self._read_range(c) for c in group])
            carry = []
            order = local_rng.permutation(sel.size) if local_rng is not None else None
            if order is not None:
                sel, buf_rows = sel[order], buf_rows[order]
            if not (sel.size == csr.shape[0] and np.array_equal(sel, np.arange(sel.size))):
                csr = csr[sel]
            dense = _DenseRows(csr)
            if i == len(groups) - 1:
                for part in minibatches(buf_rows.size, batch_size, shuffle=False):
                    lo, hi = int(part[0]), int(part[-1]) + 1
                    yield self._with_fields(dense.rows(lo, hi), buf_rows[lo:hi], device)
            else:
                n_full = (buf_rows.size // batch_size) * batch_size
                for lo in range(0, n_full, batch_size):
                    yield self._with_fields(dense.rows(lo, lo + batch_size), buf_rows[lo:lo + batch_size], device)
                if n_full < buf_rows.size:
                    rest = csr[n_full:]
                    carry = [(rest, np.arange(rest.shape[0]), buf_rows[n_full:])]

    def _read_range(self, rows: np.ndarray) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
        """The covering range of sorted ``rows`` (one read), the rows' positions in it, and the rows."""
        lo = int(rows[0])
        return self.read_rows(lo, int(rows[-1]) + 1), rows - lo, rows

    def _chunks_of(self, rows: np.ndarray) -> list[np.ndarray]:
        """``rows`` split by chunk (non-empty parts only, in file order)."""
        size = self.options.chunk_size
        edges = np.searchsorted(rows, np.arange(0, self.n_cells + size, size))
        return [rows[a:b] for a, b in zip(edges[:-1], edges[1:], strict=True) if b > a]

    def iter_ordered(self, batch_size: int, device: torch.device | str = "cpu"
                     ) -> Iterator[tuple[slice, Batch]]:
        """``(rows, batch)`` over all cells in file order, ``rows`` a slice; for inference and writing outputs."""
        blocks = ((slice(lo, hi), self._with_fields(_DenseRows(self.read_rows(lo, hi)).rows(0, hi - lo),
                                                     np.arange(lo, hi), device))
                  for lo, hi in _row_ranges(self.n_cells, max(batch_size, 1)))
        return _prefetch(blocks, depth=1) if self.options.prefetch else blocks

    def close(self) -> None:
        self.source.close()


def _concat_pieces(pieces: list[tuple[sp.csr_matrix, np.ndarray, np.ndarray]]
                   ) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
    """Stack ``(matrix, selected local rows, their cell indices)`` pieces into one matrix and selections."""
    csr, _ = _concat_rows([(m, r) for m, _, r in pieces])
    offsets = np.cumsum([0] + [m.shape[0] for m, _, _ in pieces[:-1]])
    sel = np.concatenate([s + o for (_, s, _), o in zip(pieces, offsets, strict=True)])
    return csr, sel, np.concatenate([r for _, _, r in pieces])


def _concat_rows(pieces: list[tuple[sp.csr_matrix, np.ndarray]]) -> tuple[sp.csr_matrix, np.ndarray]:
    """Stack CSR row blocks (and their cell indices) with plain concatenations (no index up-casting)."""
    if len(pieces) == 1:
        return pieces[0]
    mats = [m for m, _ in pieces]
    offsets = np.cumsum([0] + [m.nnz for m in mats[:-1]])
    indptr = np.concatenate([np.zeros(1, dtype=np.int64)]
                            + [m.indptr[1:].astype(np.int64) + o for m, o in zip(mats, offsets, strict=True)])
    csr = sp.csr_matrix((np.concatenate([m.data for m in mats]), np.concatenate([m.indices for m in mats]), indptr),
                        shape=(int(indptr.size - 1), mats[0].shape[1]))
    return csr, np.concatenate([r for _, r in pieces])


class _DenseRows:
    """Dense float32 tensors of row ranges of a CSR matrix, by one ``index_copy_`` per range (torch: no GIL)."""

    def __init__(self, csr: sp.csr_matrix) -> None:
        self.n_cols = int(csr.shape[1])
        self.indptr = csr.indptr.astype(np.int64, copy=False)
        self.indices = csr.indices  # kept as stored (int32): a slice is widened per minibatch
        self.data = torch.from_numpy(np.ascontiguousarray(csr.data, dtype=np.float32))

    def rows(self, lo: int, hi: int) -> torch.Tensor:
        a, b = int(self.indptr[lo]), int(self.indptr[hi])
        flat = torch.zeros((hi - lo) * self.n_cols, dtype=torch.float32)
        if b > a:
            starts = torch.arange(0, (hi - lo) * self.n_cols, self.n_cols, dtype=torch.int64)
            counts = torch.from_numpy(np.diff(self.indptr[lo:hi + 1]))
            cols = torch.from_numpy(self.indices[a:b].astype(np.int64))
            flat.index_copy_(0, torch.repeat_interleave(starts, counts) + cols, self.data[a:b])
        return flat.view(hi - lo, self.n_cols)


def prepare_backed_cells(
    adata: Any,
    registry: Registry,
    *,
    key_map: dict[str, str] | None = None,
    min_gene_overlap: float | None = None,
    var_names_column: str | None = None,
    options: BackedOptions | None = None,
) -> BackedCells:
    """The streaming counterpart of :func:`atlasmap.data.loader.prepare_cells` for a backed AnnData.

    Genes are aligned to ``registry`` and categories coded from ``adata.obs`` as for in-memory data; the
    counts are validated chunk by chunk now (one pass over the file), so bad data fails before training.
    ``adata`` and its file are not modified.
    """
    check_anndata(adata)
    kwargs: dict[str, Any] = {"var_names_column": var_names_column}
    if min_gene_overlap is not None:
        kwargs["min_overlap"] = min_gene_overlap
    alignment = align_genes(adata.var, registry.var_names, **kwargs)
    options = options or get_backed_options()
    if options.release_memory:
        release_large_allocations()
    per_cell = _scan(adata, registry.layer, alignment=alignment, chunk_size=options.chunk_size)
    fields = {  # the same per-cell fields as prepare_cells builds for in-memory data
        "cat": torch.from_numpy(encode_categories(adata, registry, key_map)),
        "cont": torch.from_numpy(continuous_matrix(adata, registry)),
        "log_x_fact": torch.from_numpy(per_cell["log_x_fact"]),
        "log_library": log_library_sizes(per_cell["library"]),
    }
    return BackedCells(_open_counts(adata, registry.layer), alignment, fields, per_cell["library"], options,
                       canonical=bool(per_cell["canonical"]))


# ----------------------------------------------------------------------------------------------
# Prefetching
# ----------------------------------------------------------------------------------------------

_DONE = object()


def _prefetch(items: Iterable[Any], depth: int = 1) -> Iterator[Any]:
    """Iterate ``items`` produced one step ahead in a background thread (exceptions re-raised here)."""
    q: queue.Queue[Any] = queue.Queue()
    stop = threading.Event()
    # the producer may read item k + depth only once the consumer has taken item k, so at most `depth`
    # items wait while the consumer works on one (the buffer's memory stays bounded)
    slots = threading.Semaphore(depth)

    def produce() -> None:
        try:
            iterator = iter(items)
            while True:
                while not slots.acquire(timeout=0.1):
                    if stop.is_set():
                        return
                if stop.is_set():
                    return
                item = next(iterator, _DONE)
                q.put((True, item))
                if item is _DONE:
                    return
        except BaseException as err:  # forwarded to the consumer
            q.put((False, err))

    thread = threading.Thread(target=produce, name="atlasmap-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            ok, item = q.get()
            if not ok:
                raise item
            if item is _DONE:
                return
            slots.release()
            yield item
            del item
    finally:
        stop.set()
        with contextlib.suppress(queue.Empty):
            while True:
                q.get_nowait()
        thread.join(timeout=5)


# ----------------------------------------------------------------------------------------------
# Writing CSR .h5ad files incrementally
# ----------------------------------------------------------------------------------------------


class CSRWriter:
    """Write an ``.h5ad`` whose ``X`` is CSR, appending blocks of rows; the file appears only when finished.

    Rows go to a temporary sibling file, which :meth:`finish` completes (obs, var, ...) and renames into
    place; an exception (or interruption) inside ``with`` deletes it, so ``path`` is never half-written.

    Examples
    --------
    >>> with CSRWriter("big.h5ad", n_vars=2000) as w:
    ...     for block in blocks:
    ...         w.append(block)
    ...     w.finish(obs, var)
    """

    def __init__(self, path: str | os.PathLike[str], n_vars: int, *, overwrite: bool = False,
                 compression: str | None = None, data_dtype: Any = np.float32) -> None:
        import h5py

        self.path = Path(path)
        if self.path.exists() and not overwrite:
            raise InputError(f"output {self.path} already exists; pass overwrite=True (--overwrite) to replace it.")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        os.close(fd)
        self.tmp = Path(tmp)
        make_readable(self.tmp)
        self.n_vars = int(n_vars)
        self._file = h5py.File(self.tmp, "w")
        group = self._file.create_group("X")
        index_dtype = np.int32 if self.n_vars < 2**31 else np.int64
        opts: dict[str, Any] = {"compression": compression} if compression else {}
        self._data = group.create_dataset("data", shape=(0,), maxshape=(None,), dtype=data_dtype,
                                          chunks=(1 << 18,), **opts)
        self._indices = group.create_dataset("indices", shape=(0,), maxshape=(None,), dtype=index_dtype,
                                             chunks=(1 << 18,), **opts)
        self._indptr: list[np.ndarray] = [np.zeros(1, dtype=np.int64)]
        self.n_obs = 0
        self.nnz = 0
        self._done = False

    def append(self, block: Any) -> None:
        """Append rows (any scipy sparse matrix or dense array with ``n_vars`` columns)."""
        csr = sp.csr_matrix(block)
        if csr.shape[1] != self.n_vars:
            raise InputError(f"block has {csr.shape[1]} columns, the file has {self.n_vars}.")
        csr.sort_indices()
        n = csr.nnz
        if n:
            self._data.resize((self.nnz + n,))
            self._indices.resize((self.nnz + n,))
            self._data[self.nnz:] = csr.data.astype(self._data.dtype, copy=False)
            self._indices[self.nnz:] = csr.indices.astype(self._indices.dtype, copy=False)
        self._indptr.append(csr.indptr[1:].astype(np.int64) + self.nnz)
        self.nnz += n
        self.n_obs += csr.shape[0]

    def finish(self, obs: pd.DataFrame, var: pd.DataFrame, *, uns: dict[str, Any] | None = None) -> Path:
        """Write ``obs``/``var`` (and ``uns``), close the file and rename it into place."""
        from anndata.io import write_elem

        if len(obs) != self.n_obs or len(var) != self.n_vars:
            raise InputError(f"obs has {len(obs)} rows and var {len(var)} for a matrix of "
                             f"{self.n_obs} x {self.n_vars}.")
        f = self._file
        group = f["X"]
        group.create_dataset("indptr", data=np.concatenate(self._indptr))
        group.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0",
                            "shape": np.array([self.n_obs, self.n_vars], dtype=np.int64)})
        f.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
        write_elem(f, "obs", obs)
        write_elem(f, "var", var)
        for key in ("layers", "obsm", "varm", "obsp", "varp"):
            write_elem(f, key, {})
        write_elem(f, "uns", dict(uns or {}))
        f.close()
        os.replace(self.tmp, self.path)
        self._done = True
        return self.path

    def abort(self) -> None:
        """Close and delete the temporary file (``path`` is untouched)."""
        with contextlib.suppress(Exception):
            self._file.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> CSRWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if not self._done:
            self.abort()


def convert_to_csr(src: str | os.PathLike[str], dst: str | os.PathLike[str], *, key: str = "X",
                   chunk_size: int = 8192, overwrite: bool = False,
                   progress: Callable[[int, int], None] | None = None) -> Path:
    """Rewrite an ``.h5ad`` whose ``key`` (``X`` or ``layers/NAME``) is dense as one with a CSR ``X``.

    Reads the dense rows chunk by chunk, so it works for files larger than memory. ``obs``, ``var`` and
    ``uns`` are copied; other fields are dropped. The source file is not modified.
    """
    import h5py
    from anndata.io import read_elem

    src = Path(src)
    with h5py.File(src, "r") as f:
        if key not in f:
            raise InputError(f"{src} has no {key!r}.")
        dense = f[key]
        if not isinstance(dense, h5py.Dataset) or dense.ndim != 2:
            raise InputError(f"{src}:{key} is not a dense 2-D array (encoding "
                             f"{_attr_str(dense.attrs.get('encoding-type', '?'))!r}); nothing to convert.")
        obs, var = read_elem(f["obs"]), read_elem(f["var"])
        uns = read_elem(f["uns"]) if "uns" in f else {}
        n_obs, n_vars = dense.shape
        with CSRWriter(dst, n_vars, overwrite=overwrite) as writer:
            for lo, hi in _row_ranges(n_obs, chunk_size):
                writer.append(sp.csr_matrix(dense[lo:hi]))
                if progress is not None:
                    progress(hi, n_obs)
            return writer.finish(obs, var, uns=uns)


def main(argv: list[str] | None = None) -> int:
    """``python -m atlasmap.data.backed to-csr IN.h5ad OUT.h5ad [--key X]``."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m atlasmap.data.backed",
                                     description="Tools for atlasmap's backed (streaming) mode.")
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("to-csr", help="rewrite a dense .h5ad as CSR, chunk by chunk")
    conv.add_argument("src", metavar="IN.h5ad")
    conv.add_argument("dst", metavar="OUT.h5ad")
    conv.add_argument("--key", default="X", help="dense matrix to convert: X (default) or layers/NAME")
    conv.add_argument("--chunk-size", type=int, default=8192)
    conv.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    try:
        out = convert_to_csr(args.src, args.dst, key=args.key, chunk_size=args.chunk_size, overwrite=args.overwrite)
    except AtlasmapError as err:
        print(f"atlasmap: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
