"""Seeded negative-binomial simulator with cell types, batch effects and library-size variation.

Used by tests and benchmarks. Counts follow ``NB(mean = library * softmax-like profile, theta)``
where the profile is a cell-type program multiplied by a per-batch gene-wise effect.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp


def simulate_counts(
    n_cells: int = 2000,
    n_genes: int = 200,
    *,
    n_batches: int = 2,
    n_cell_types: int = 5,
    batch_effect: float = 0.5,
    mean_library: float = 2000.0,
    theta: float = 5.0,
    seed: int = 0,
    start_cell: int = 0,
    programs: dict[str, np.ndarray] | None = None,
    batches: Sequence[int] | None = None,
) -> Any:
    """Simulate a counts AnnData (CSR float32 ``.X``; ``obs``: ``batch``, ``cell_type``, ``library``).

    Parameters
    ----------
    n_cells, n_genes, n_batches, n_cell_types
        Shape and structure.
    batch_effect
        Standard deviation of the per-batch log fold change of each gene.
    mean_library
        Mean total counts per cell (log-normal spread of about 0.4).
    theta
        NB inverse dispersion.
    seed
        Seeds everything; the same arguments give the same data.
    start_cell, programs
        For chunked simulation: the index of the first cell (cell names continue) and the
        gene programs of an earlier chunk (from :func:`simulation_programs`) so chunks share biology.
    batches
        Draw cells only from these of the ``n_batches`` batches (default all), e.g. to simulate a
        reference and a query that share the batch programs but not the batches.
    """
    import anndata as ad

    programs = programs or simulation_programs(n_genes, n_batches, n_cell_types, batch_effect, seed)
    rng = np.random.default_rng([seed, start_cell])
    types = rng.integers(0, n_cell_types, n_cells)
    if batches is None:
        batches = rng.integers(0, n_batches, n_cells)
    else:
        batches = np.asarray(batches, dtype=np.int64)[rng.integers(0, len(batches), n_cells)]
    library = mean_library * np.exp(rng.normal(0.0, 0.4, n_cells))
    profile = programs["type_profiles"][types] * programs["batch_effects"][batches]
    profile /= profile.sum(1, keepdims=True)
    mean = profile * library[:, None]
    counts = rng.negative_binomial(theta, theta / (theta + mean)).astype(np.float32)
    obs = pd.DataFrame(
        {
            "batch": pd.Categorical([f"batch{b}" for b in batches], categories=[f"batch{b}" for b in range(n_batches)]),
            "cell_type": pd.Categorical([f"type{t}" for t in types], categories=[f"type{t}" for t in range(n_cell_types)]),
            "library": counts.sum(1),
        },
        index=[f"cell{start_cell + i}" for i in range(n_cells)],
    )
    var = pd.DataFrame(index=[f"gene{i}" for i in range(n_genes)])
    return ad.AnnData(sp.csr_matrix(counts), obs=obs, var=var)


def simulation_programs(n_genes: int, n_batches: int, n_cell_types: int, batch_effect: float, seed: int
                        ) -> dict[str, np.ndarray]:
    """The shared gene programs of a simulation: cell-type profiles and per-batch fold changes."""
    rng = np.random.default_rng([seed, 7919])
    base = rng.gamma(0.6, 1.0, n_genes) + 1e-3
    type_fc = np.exp(rng.normal(0.0, 1.0, (n_cell_types, n_genes)) * (rng.random((n_cell_types, n_genes)) < 0.2))
    batch_fc = np.exp(rng.normal(0.0, batch_effect, (n_batches, n_genes)))
    return {"type_profiles": base * type_fc, "batch_effects": batch_fc}


def write_simulated_h5ad(
    path: str | Path,
    n_cells: int,
    n_genes: int = 2000,
    *,
    n_batches: int = 4,
    n_cell_types: int = 10,
    batch_effect: float = 0.5,
    mean_library: float = 1500.0,
    theta: float = 5.0,
    seed: int = 0,
    batches: Sequence[int] | None = None,
    chunk_size: int = 10_000,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Simulate ``n_cells`` cells with :func:`simulate_counts` chunk by chunk, straight into an ``.h5ad``.

    ``X`` is written as CSR (anndata's on-disk layout) one chunk at a time, so memory holds one chunk
    (``chunk_size`` x ``n_genes`` dense draws) whatever ``n_cells`` is. Chunks share the gene programs
    and continue the cell names; the file appears (by rename) only once complete. The result depends on
    all arguments including ``chunk_size``: the same arguments give the same file contents.

    Parameters
    ----------
    path
        Output ``.h5ad``.
    n_cells, n_genes, n_batches, n_cell_types, batch_effect, mean_library, theta, seed, batches
        As in :func:`simulate_counts`.
    chunk_size
        Cells simulated and written per step.
    overwrite
        Replace ``path`` if it exists.
    progress
        Print a progress line per chunk to stderr.

    Returns
    -------
    The path written.
    """
    import sys

    from atlasmap.data.backed import CSRWriter

    programs = simulation_programs(n_genes, n_batches, n_cell_types, batch_effect, seed)
    obs_parts: list[pd.DataFrame] = []
    var = None
    with CSRWriter(path, n_genes, overwrite=overwrite) as writer:
        for start in range(0, n_cells, chunk_size):
            chunk = simulate_counts(
                min(chunk_size, n_cells - start), n_genes, n_batches=n_batches, n_cell_types=n_cell_types,
                batch_effect=batch_effect, mean_library=mean_library, theta=theta, seed=seed, start_cell=start,
                programs=programs, batches=batches,
            )
            writer.append(chunk.X)
            obs_parts.append(chunk.obs)
            var = chunk.var
            if progress:
                print(f"simulated {start + chunk.n_obs:,} / {n_cells:,} cells", file=sys.stderr, flush=True)
        obs = pd.concat(obs_parts)
        for key in ("batch", "cell_type"):  # concat keeps categoricals only when all chunks agree
            obs[key] = pd.Categorical(obs[key].astype(str), categories=obs_parts[0][key].cat.categories)
        uns = {"simulation": {"n_cells": n_cells, "n_genes": n_genes, "n_batches": n_batches,
                              "n_cell_types": n_cell_types, "batch_effect": batch_effect,
                              "mean_library": mean_library, "theta": theta, "seed": seed,
                              "chunk_size": chunk_size}}
        return writer.finish(obs, var, uns=uns)


def main(argv: list[str] | None = None) -> int:
    """``python -m atlasmap.datasets.simulate --cells 1000000 --genes 2000 -o big.h5ad``."""
    import argparse
    import sys
    import time

    from atlasmap.errors import AtlasmapError

    parser = argparse.ArgumentParser(
        prog="python -m atlasmap.datasets.simulate",
        description="Write a seeded negative-binomial single-cell dataset (CSR .h5ad) chunk by chunk.")
    parser.add_argument("--cells", type=int, required=True)
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--batches", type=int, default=4, help="number of batch programs")
    parser.add_argument("--use-batches", type=int, nargs="+", default=None, metavar="I",
                        help="draw cells only from these batch indices (e.g. a query: --use-batches 2 3)")
    parser.add_argument("--cell-types", type=int, default=10)
    parser.add_argument("--batch-effect", type=float, default=0.5)
    parser.add_argument("--mean-library", type=float, default=1500.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chunk-size", type=int, default=10_000)
    parser.add_argument("-o", "--output", required=True, metavar="OUT.h5ad")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    try:
        out = write_simulated_h5ad(
            args.output, args.cells, args.genes, n_batches=args.batches, n_cell_types=args.cell_types,
            batch_effect=args.batch_effect, mean_library=args.mean_library, seed=args.seed,
            batches=args.use_batches, chunk_size=args.chunk_size, overwrite=args.overwrite,
            progress=not args.quiet,
        )
    except AtlasmapError as err:
        print(f"atlasmap: error: {err}", file=sys.stderr)
        return 2
    size = Path(out).stat().st_size / 1e9
    print(f"wrote {out}: {args.cells:,} cells x {args.genes:,} genes, {size:.2f} GB in "
          f"{time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
