"""Figures a biologist looks at: UMAP of reference + query, training curves, the confusion matrix.

All functions write a PNG and return its path; matplotlib runs headless (Agg) and is imported lazily.
Colours are consistent across panels: a cell type has the same colour as a reference label, a predicted
label and a true query label; ``Unknown`` is black; cells outside a panel's subset are light grey.
"""

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


REFERENCE_COLOR, QUERY_COLOR, BACKGROUND_COLOR, UNKNOWN_COLOR = "#4c72b0", "#dd8452", "#dcdcdc", "#111111"


def label_palette(categories: Sequence[str], unknown_label: str | None = "Unknown") -> dict[str, Any]:
    """A colour per label (scanpy's 20- or 102-colour palettes), ``unknown_label`` (if any) in black."""
    from scanpy.plotting.palettes import default_20, default_102

    cats = [c for c in categories if c != unknown_label]
    colors = default_20 if len(cats) <= 20 else default_102
    palette: dict[str, Any] = {c: colors[i % len(colors)] for i, c in enumerate(cats)}
    if unknown_label is not None:
        palette[unknown_label] = UNKNOWN_COLOR
    return palette


def _point_size(n: int) -> float:
    return float(np.clip(12000.0 / max(n, 1), 0.5, 20.0))


def _scatter_categories(ax: Any, coords: np.ndarray, values: Any, palette: dict[str, Any], *, size: float,
                        mask: np.ndarray | None = None, legend_title: str | None = None) -> None:
    """Cells of ``mask`` coloured by category (random draw order so none hides another); others grey."""
    import pandas as pd

    n = coords.shape[0]
    mask = np.ones(n, dtype=bool) if mask is None else mask
    if (~mask).any():
        ax.scatter(coords[~mask, 0], coords[~mask, 1], s=size, color=BACKGROUND_COLOR, linewidths=0,
                   rasterized=True)
    order = np.random.default_rng(0).permutation(np.flatnonzero(mask))
    vals = pd.Series(values).astype(object).to_numpy()[order]
    vals = np.where(pd.isna(vals), "NA", vals).astype(str)
    colors = [palette.get(v, BACKGROUND_COLOR) for v in vals]
    ax.scatter(coords[order, 0], coords[order, 1], s=size, c=colors, linewidths=0, rasterized=True)
    present = [c for c in palette if c in set(vals)] + sorted(set(vals) - set(palette))
    handles = [ax.scatter([], [], s=30, color=palette.get(c, BACKGROUND_COLOR), label=c) for c in present]
    if (~mask).any():
        handles.append(ax.scatter([], [], s=30, color=BACKGROUND_COLOR, label="(other cells)"))
    ax.legend(handles=handles, fontsize=8, frameon=False, loc="center left", bbox_to_anchor=(1.0, 0.5),
              title=legend_title, title_fontsize=8, ncol=1 if len(handles) <= 16 else 2, handletextpad=0.2)


def _scatter_continuous(fig: Any, ax: Any, coords: np.ndarray, values: np.ndarray, *, size: float,
                        mask: np.ndarray, label: str, cmap: str = "viridis", vmin: float = 0.0,
                        vmax: float = 1.0) -> None:
    if (~mask).any():
        ax.scatter(coords[~mask, 0], coords[~mask, 1], s=size, color=BACKGROUND_COLOR, linewidths=0,
                   rasterized=True)
    idx = np.flatnonzero(mask)
    idx = idx[np.argsort(values[idx], kind="stable")]  # most uncertain on top
    sca = ax.scatter(coords[idx, 0], coords[idx, 1], s=size, c=values[idx], cmap=cmap, vmin=vmin, vmax=vmax,
                     linewidths=0, rasterized=True)
    bar = fig.colorbar(sca, ax=ax, shrink=0.75, pad=0.02)
    bar.set_label(label, fontsize=8)
    bar.ax.tick_params(labelsize=8)


def plot_mapping_umap(
    coords: np.ndarray,
    obs: Any,
    path: str | Path,
    *,
    dataset_key: str = "atlasmap_dataset",
    batch_key: str | None = None,
    label_key: str | None = None,
    predicted_key: str | None = None,
    uncertainty_key: str | None = None,
    unknown_label: str = "Unknown",
    title: str = "atlasmap: query mapped onto the reference",
) -> Path:
    """The report UMAP: one panel each for dataset, batch, reference labels, predicted labels, prediction
    uncertainty and (when the query has them) true query labels. Panels whose column is missing are skipped.

    Parameters
    ----------
    coords
        Cells x 2 UMAP coordinates (e.g. from :func:`compute_umap`).
    obs
        The cells' ``obs`` DataFrame.
    path
        PNG to write.
    dataset_key, batch_key, label_key, predicted_key, uncertainty_key
        ``obs`` columns; ``None`` or absent: that panel is left out.
    unknown_label
        Drawn in black in the prediction panel.
    """
    import pandas as pd

    plt = _pyplot()
    n = coords.shape[0]
    size = _point_size(n)
    has = lambda key: key is not None and key in obs.columns  # noqa: E731
    is_ref = (obs[dataset_key].astype(str) == "reference").to_numpy() if has(dataset_key) else np.zeros(n, bool)
    is_query = ~is_ref
    label_cats: list[str] = []
    for key, mask in ((label_key, is_ref), (label_key, is_query), (predicted_key, is_query)):
        if has(key):
            values = obs[key].to_numpy()[mask]
            label_cats += sorted(set(pd.Series(values).dropna().astype(str)) - set(label_cats) - {unknown_label})
    palette = label_palette(label_cats, unknown_label)

    panels: list[tuple[str, Any]] = []
    if has(dataset_key):
        panels.append(("reference and query", lambda ax: _scatter_categories(
            ax, coords, obs[dataset_key].astype(str), {"reference": REFERENCE_COLOR, "query": QUERY_COLOR},
            size=size)))
    if has(batch_key) and batch_key != dataset_key:
        batches = sorted(set(obs[batch_key].dropna().astype(str)))
        batch_palette = label_palette(batches, unknown_label=None)
        panels.append((f"batch ({batch_key})", lambda ax: _scatter_categories(
            ax, coords, obs[batch_key], batch_palette, size=size)))
    if has(label_key) and is_ref.any():
        panels.append((f"reference: {label_key}", lambda ax: _scatter_categories(
            ax, coords, obs[label_key], palette, size=size, mask=is_ref)))
    if has(predicted_key):
        panels.append((f"query: predicted ({predicted_key})", lambda ax: _scatter_categories(
            ax, coords, obs[predicted_key], palette, size=size, mask=is_query)))
    if has(uncertainty_key):
        values = pd.to_numeric(obs[uncertainty_key], errors="coerce").to_numpy(dtype=float)
        unc_mask = is_query & np.isfinite(values)
        panels.append(("query: prediction uncertainty", lambda ax: _scatter_continuous(
            fig, ax, coords, values, size=size, mask=unc_mask, label="1 - P(predicted label)")))
    if has(label_key) and is_query.any() and obs[label_key][is_query].notna().any():
        truth_mask = is_query & obs[label_key].notna().to_numpy()
        panels.append((f"query: true {label_key}", lambda ax: _scatter_categories(
            ax, coords, obs[label_key], palette, size=size, mask=truth_mask)))
    if not panels:
        panels.append(("cells", lambda ax: ax.scatter(coords[:, 0], coords[:, 1], s=size, color=QUERY_COLOR,
                                                      linewidths=0, rasterized=True)))

    ncols = min(3, len(panels))
    nrows = int(np.ceil(len(panels) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.4 * ncols, 5.0 * nrows), squeeze=False)
    for ax, (name, draw) in zip(axes.ravel(), panels, strict=False):
        draw(ax)
        ax.set_title(name, fontsize=11)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel("UMAP1", fontsize=9)
        ax.set_ylabel("UMAP2", fontsize=9)
        ax.set_aspect("equal", adjustable="datalim")
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    for ax in axes.ravel()[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(f"{title} ({int(is_ref.sum())} reference, {int(is_query.sum())} query cells)"
                 if has(dataset_key) else title, fontsize=13)
    fig.tight_layout()
    return _save(fig, path)


def plot_training_curves(histories: dict[str, dict[str, list]], path: str | Path) -> Path:
    """Negative ELBO per cell (train and validation) per epoch, one panel per training run (e.g. reference and
    query). The first epochs, often far above the rest, are cut off the y-axis so the convergence shows."""
    plt = _pyplot()
    runs = {name: h for name, h in histories.items() if h and h.get("elbo_train")}
    n = max(len(runs), 1)
    fig, axes = plt.subplots(1, n, figsize=(5.2 * n, 3.8), squeeze=False)
    for ax, (name, hist) in zip(axes[0], runs.items(), strict=False):
        train = np.asarray(hist["elbo_train"], dtype=float)
        epochs = np.arange(1, len(train) + 1)
        ax.plot(epochs, train, label=f"train (last {train[-1]:.1f})", color=REFERENCE_COLOR, lw=1.6)
        curves = [train]
        if hist.get("elbo_validation"):
            val = np.asarray(hist["elbo_validation"], dtype=float)  # None (not validated that epoch) -> NaN
            seen = np.isfinite(val)
            if seen.any():
                sparse = not seen.all()  # check_val_every_n_epoch > 1: join the validated epochs, mark them
                ax.plot(epochs[: len(val)][seen], val[seen], label=f"validation (last {val[seen][-1]:.1f})",
                        color=QUERY_COLOR, lw=1.6, marker="o" if sparse else None, ms=3)
                curves.append(val[seen])
        values = np.concatenate([c[min(len(c) - 1, max(2, len(c) // 20)):] for c in curves])
        values = values[np.isfinite(values)]
        if values.size:
            low, high = float(values.min()), float(values.max())
            pad = 0.08 * (high - low) if high > low else 1.0
            ax.set_ylim(low - pad, high + pad)
        ax.set_title(f"{name} training ({len(train)} epochs)", fontsize=11)
        ax.set_xlabel("epoch")
        ax.set_ylabel("negative ELBO per cell")
        ax.grid(alpha=0.3)
        ax.legend(frameon=False, fontsize=9)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    if not runs:
        axes[0, 0].text(0.5, 0.5, "no training history", ha="center", va="center")
        axes[0, 0].set_axis_off()
    fig.tight_layout()
    return _save(fig, path)


def plot_confusion_matrix(confusion: Any, path: str | Path, *, title: str = "label transfer: query cells",
                          unknown_label: str = "Unknown", reference_types: Sequence[str] | None = None) -> Path:
    """Heatmap of a confusion matrix (true type rows x predicted label columns, counts): colour = fraction
    of the true type (row), text = count. True types not in ``reference_types`` (when given) are marked
    ``(not in reference)``: for them ``unknown_label`` is the right call."""
    plt = _pyplot()
    counts = np.asarray(confusion, dtype=float)
    rows, cols = [str(r) for r in confusion.index], [str(c) for c in confusion.columns]
    totals = counts.sum(1, keepdims=True)
    frac = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    fig_w = min(3.0 + 0.62 * len(cols), 22.0)
    fig_h = min(2.2 + 0.48 * len(rows), 18.0)
    fig, ax = plt.subplots(figsize=(fig_w, fig_h))
    im = ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto")
    font = 9 if max(len(rows), len(cols)) <= 15 else 7
    for i in range(len(rows)):
        for j in range(len(cols)):
            if counts[i, j] > 0:
                ax.text(j, i, f"{int(counts[i, j])}", ha="center", va="center", fontsize=font,
                        color="white" if frac[i, j] > 0.55 else "#222222")
    correct = sum(counts[i, cols.index(r)] for i, r in enumerate(rows) if r in cols)
    accuracy = correct / counts.sum() if counts.sum() else float("nan")
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right", fontsize=font)
    novel = set(rows) - set(reference_types) if reference_types is not None else set()
    ax.set_yticks(range(len(rows)), [f"{r}{' (not in reference)' if r in novel else ''} (n={int(t)})"
                                     for r, t in zip(rows, totals[:, 0], strict=True)], fontsize=font)
    ax.set_xlabel("predicted label")
    ax.set_ylabel("true label")
    ax.set_title(f"{title} — accuracy {accuracy:.3f}", fontsize=11)
    if unknown_label in cols:
        ax.axvline(cols.index(unknown_label) - 0.5, color="#888888", lw=1)
    bar = fig.colorbar(im, ax=ax, shrink=0.8, pad=0.02)
    bar.set_label("fraction of true type", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig: Any, path: str | Path) -> Path:
    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight", facecolor="white")
    plt.close(fig)
    return path
