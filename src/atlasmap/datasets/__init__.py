"""Datasets: the embedded Kang 2018 demo subset and a seeded count simulator."""

from __future__ import annotations

from pathlib import Path
from typing import Any

DATA_DIR = Path(__file__).parent
KANG_FILE = DATA_DIR / "kang2018_demo.h5ad"

__all__ = ["kang2018", "simulate_counts", "simulation_programs", "write_simulated_h5ad"]


def __getattr__(name: str) -> Any:
    # the simulator is imported on first use, so `python -m atlasmap.datasets.simulate` runs it cleanly
    if name in ("simulate_counts", "simulation_programs", "write_simulated_h5ad"):
        from atlasmap.datasets import simulate

        return getattr(simulate, name)
    raise AttributeError(f"module 'atlasmap.datasets' has no attribute {name!r}")


def kang2018() -> Any:
    """Kang et al. 2018 IFN-beta PBMCs (scGen 'valid' split), raw counts, shipped with atlasmap.

    ``obs['batch']`` is ``ctrl`` or ``stim``; ``obs['cell_type']`` holds scGen's labels. See
    ``PROVENANCE.md`` beside this file for origin, processing and citations. Returns a new AnnData
    on every call.
    """
    import anndata as ad

    return ad.read_h5ad(KANG_FILE)
