"""Figures: the report UMAP, training curves and confusion matrix are written as valid PNGs."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from support import assert_unchanged, snapshot

from atlasmap.workflow.plots import (
    UNKNOWN_COLOR,
    compute_umap,
    label_palette,
    plot_confusion_matrix,
    plot_mapping_umap,
    plot_training_curves,
)
from atlasmap.workflow.report import load_histories, store_histories, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path, min_px: tuple[int, int] = (300, 200)) -> None:
    import matplotlib.image as mpimg

    assert path.is_file(), path
    assert path.read_bytes()[:8] == PNG_MAGIC
    height, width = mpimg.imread(path).shape[:2]
    assert width >= min_px[0] and height >= min_px[1], (width, height)


def joint(n: int = 240, seed: int = 0) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    types = rng.choice(["CD4 T", "B", "CD14 Mono", "NK"], n)
    dataset = np.where(np.arange(n) < n // 2, "reference", "query")
    z = rng.normal(size=(n, 5)).astype(np.float32)
    z[:, 0] += pd.Series(types).map({"CD4 T": 0, "B": 4, "CD14 Mono": 8, "NK": 2}).to_numpy()
    predicted = np.where(rng.random(n) < 0.1, "Unknown", types)
    obs = pd.DataFrame({"batch": np.where(dataset == "reference", "ctrl", "stim"), "cell_type": types,
                        "atlasmap_dataset": pd.Categorical(dataset, categories=["reference", "query"]),
                        "atlasmap_cell_type": predicted,
                        "atlasmap_cell_type_uncertainty": rng.uniform(0, 0.7, n)},
                       index=[f"c{i}" for i in range(n)])
    return ad.AnnData(rng.poisson(3.0, (n, 12)).astype(np.float32), obs=obs, obsm={"X_atlasmap": z})


HISTORIES = {"reference": {"epoch": list(range(30)), "elbo_train": list(800 / np.arange(1, 31) + 300),
                           "elbo_validation": list(810 / np.arange(1, 31) + 305)},
             "query": {"epoch": list(range(20)), "elbo_train": list(np.linspace(380, 360, 20))}}


@pytest.fixture(scope="module")
def coords() -> np.ndarray:
    return compute_umap(joint())


def test_umap_coordinates_leave_input_unchanged() -> None:
    adata = joint()
    snap = snapshot(adata)
    xy = compute_umap(adata)
    assert xy.shape == (adata.n_obs, 2) and np.isfinite(xy).all()
    assert_unchanged(adata, snap)


def test_mapping_umap_all_panels(coords: np.ndarray, tmp_path: Path) -> None:
    path = plot_mapping_umap(coords, joint().obs, tmp_path / "umap.png", batch_key="batch", label_key="cell_type",
                             predicted_key="atlasmap_cell_type", uncertainty_key="atlasmap_cell_type_uncertainty")
    assert_png(path, (1200, 700))  # 3 x 2 panels


def test_mapping_umap_with_missing_columns(coords: np.ndarray, tmp_path: Path) -> None:
    obs = joint().obs[["atlasmap_dataset"]]
    assert_png(plot_mapping_umap(coords, obs, tmp_path / "a.png", label_key="cell_type", batch_key="nope"))
    assert_png(plot_mapping_umap(coords, pd.DataFrame(index=obs.index), tmp_path / "b.png"))


def test_palette_is_consistent_and_unknown_is_black() -> None:
    palette = label_palette(["B", "NK", "Unknown"])
    assert palette["Unknown"] == UNKNOWN_COLOR
    assert palette["B"] != palette["NK"]
    assert label_palette(["B", "NK"])["NK"] == palette["NK"]
    assert len(set(label_palette([f"t{i}" for i in range(40)]).values())) == 41


def test_training_curves(tmp_path: Path) -> None:
    assert_png(plot_training_curves(HISTORIES, tmp_path / "curves.png"), (600, 250))
    assert_png(plot_training_curves({}, tmp_path / "empty.png"), (200, 150))


def test_confusion_matrix(tmp_path: Path) -> None:
    confusion = pd.DataFrame([[50, 2, 3], [4, 30, 1]], index=pd.Index(["B", "T"], name="true"),
                             columns=pd.Index(["B", "T", "Unknown"], name="predicted"))
    assert_png(plot_confusion_matrix(confusion, tmp_path / "cm.png", reference_types=["B"]), (300, 200))
    big = pd.DataFrame(np.random.default_rng(0).integers(0, 20, (16, 17)),
                       index=[f"type {i}" for i in range(16)], columns=[*(f"type {i}" for i in range(16)), "Unknown"])
    assert_png(plot_confusion_matrix(big, tmp_path / "big.png"), (600, 500))


def test_histories_roundtrip_through_h5ad(tmp_path: Path) -> None:
    adata = joint(60)
    store_histories(adata, HISTORIES)
    adata.write_h5ad(tmp_path / "a.h5ad")
    back = load_histories(ad.read_h5ad(tmp_path / "a.h5ad"))
    assert back["reference"]["elbo_train"] == pytest.approx(HISTORIES["reference"]["elbo_train"])
    assert load_histories(joint(30)) == {}


def test_write_report_without_scib(tmp_path: Path) -> None:
    adata = joint()
    store_histories(adata, HISTORIES)
    snap = snapshot(adata)
    files, table = write_report(tmp_path / "report", adata, batch_key="batch", label_key="cell_type", scib="none")
    names = {f.name for f in files}
    assert {"umap.png", "training_curves.png", "confusion_matrix.png", "metrics.csv", "metrics.json"} <= names
    for name in ("umap.png", "training_curves.png", "confusion_matrix.png"):
        assert_png(tmp_path / "report" / name)
    assert table is not None and "accuracy" in set(table["metric"])
    assert_unchanged(adata, snap)
