"""Figures a biologist looks at: UMAP of reference + query, training curves."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def compute_umap(adata: Any, *, use_rep: str = "X_atlasmap", n_neighbors: int = 15, seed: int = 0) -> np.ndarray:
    """UMAP coordinates of ``adata.obsm[use_rep]`` via scanpy (on a light copy; ``adata`` is not changed)."""
    import anndata as ad
    import scanpy as sc

    light = ad.AnnData(obs=adata.obs[[]].copy(), obsm={use_rep: np.asarray(adata.obsm[use_rep])})
    sc.pp.neighbors(light, use_rep=use_rep, n_neighbors=n_neighbors, random_state=seed)
    sc.tl.umap(light, random_state=seed)
    return np.asarray(light.obsm["X_umap"])


def plot_embedding(coords: np.ndarray, obs: Any, colors: Sequence[str], path: str | Path, *,
                   title: str = "atlasmap: reference + query") -> Path:
    """Scatter ``coords`` once per ``obs`` column in ``colors``; categorical or continuous."""
    import pandas as pd

    plt = _pyplot()
    colors = [c for c in colors if c in obs.columns]
    n = max(len(colors), 1)
    fig, axes = plt.subplots(1, n, figsize=(5.2 * n, 4.6), squeeze=False)
    order = np.random.default_rng(0).permutation(coords.shape[0])  # no category hides another
    for ax, key in zip(axes[0], colors, strict=False):
        values = obs[key].iloc[order]
        if isinstance(values.dtype, pd.CategoricalDtype) or values.dtype == object or values.dtype == bool:
            cats = pd.Categorical(values.astype(str))
            cmap = plt.get_cmap("tab20" if len(cats.categories) > 10 else "tab10")
            for i, cat in enumerate(cats.categories):
                mask = cats == cat
                ax.scatter(coords[order][mask, 0], coords[order][mask, 1], s=4, color=cmap(i % cmap.N),
                           label=cat, rasterized=True, linewidths=0)
            ax.legend(markerscale=3, fontsize=7, frameon=False, loc="center left", bbox_to_anchor=(1, 0.5))
        else:
            sca = ax.scatter(coords[order, 0], coords[order, 1], s=4, c=values.to_numpy(dtype=float),
                             cmap="viridis", rasterized=True, linewidths=0)
            fig.colorbar(sca, ax=ax, shrink=0.7)
        ax.set_title(key)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel("UMAP1")
        ax.set_ylabel("UMAP2")
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_training_curves(histories: dict[str, dict[str, list]], path: str | Path) -> Path:
    """ELBO per cell (train and validation) per epoch, one panel per training run (e.g. reference, query)."""
    plt = _pyplot()
    runs = {name: h for name, h in histories.items() if h and h.get("elbo_train")}
    fig, axes = plt.subplots(1, max(len(runs), 1), figsize=(5 * max(len(runs), 1), 3.8), squeeze=False)
    for ax, (name, hist) in zip(axes[0], runs.items(), strict=False):
        epochs = np.arange(len(hist["elbo_train"]))
        ax.plot(epochs, hist["elbo_train"], label="train")
        if hist.get("elbo_validation"):
            ax.plot(epochs, hist["elbo_validation"], label="validation")
        ax.set_title(f"{name} training")
        ax.set_xlabel("epoch")
        ax.set_ylabel("negative ELBO per cell")
        ax.legend(frameon=False)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
