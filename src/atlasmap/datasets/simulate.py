"""Seeded negative-binomial simulator with cell types, batch effects and library-size variation.

Used by tests and benchmarks. Counts follow ``NB(mean = library * softmax-like profile, theta)``
where the profile is a cell-type program multiplied by a per-batch gene-wise effect.
"""

from __future__ import annotations

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
    """
    import anndata as ad

    programs = programs or simulation_programs(n_genes, n_batches, n_cell_types, batch_effect, seed)
    rng = np.random.default_rng([seed, start_cell])
    types = rng.integers(0, n_cell_types, n_cells)
    batches = rng.integers(0, n_batches, n_cells)
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
