"""kNN label transfer: known answers, the Unknown path, held-out cell types, kernels, bad input."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from support import assert_unchanged, snapshot

import atlasmap
from atlasmap.errors import InputError
from atlasmap.workflow.knn import KNNLabelTransfer, neighbour_weights, transfer_labels, vote
from atlasmap.workflow.mapping import joint_embedding, knn_transfer

CENTERS = {"A": (0.0, 0.0), "B": (10.0, 0.0), "C": (5.0, 8.66)}


def blobs(types: str, n: int, seed: int, spread: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` points around each named centre (an equilateral triangle of side 10)."""
    rng = np.random.default_rng(seed)
    points = [np.asarray(CENTERS[t]) + spread * rng.normal(size=(n, 2)) for t in types]
    return np.concatenate(points).astype(np.float32), np.repeat(list(types), n)


def as_adata(latent: np.ndarray, prefix: str, **obs: Any) -> ad.AnnData:
    names = [f"{prefix}{i}" for i in range(latent.shape[0])]
    return ad.AnnData(np.zeros((latent.shape[0], 1), np.float32), obs=pd.DataFrame(obs, index=names),
                      obsm={"X_atlasmap": latent})


# ------------------------------------------------------------------------------------------ known answers
def test_cells_at_reference_centres_get_their_label_with_zero_uncertainty() -> None:
    z_ref, y_ref = blobs("ABC", 60, seed=0)
    z_query, y_query = blobs("ABC", 20, seed=1, spread=0.3)
    result = KNNLabelTransfer(z_ref, y_ref, k=15).predict(z_query)["label"]
    assert list(result.labels.astype(str)) == list(y_query)
    np.testing.assert_allclose(result.uncertainty, 0.0, atol=1e-12)
    np.testing.assert_allclose(result.probabilities.sum(1), 1.0)
    assert list(result.probabilities.columns) == ["A", "B", "C"]


def test_probabilities_match_a_plain_loop_over_cells() -> None:
    """The vectorised vote equals the scArches-style per-cell loop (written out here) for every kernel."""
    z_ref, y_ref = blobs("ABC", 40, seed=2, spread=3.0)  # overlapping: mixed neighbourhoods
    z_query, _ = blobs("ABC", 15, seed=3, spread=3.0)
    for kernel in ("gaussian", "scarches", "distance", "uniform"):
        transfer = KNNLabelTransfer(z_ref, y_ref, k=12, kernel=kernel)
        result = transfer.predict(z_query, uncertainty_threshold=1.0)["label"]
        distances, neighbours = transfer.kneighbors(z_query)
        for i in range(len(z_query)):
            w = neighbour_weights(distances[i : i + 1], kernel)[0]
            expected = {c: w[y_ref[neighbours[i]] == c].sum() for c in "ABC"}
            np.testing.assert_allclose(result.probabilities.iloc[i].to_numpy(), [expected[c] for c in "ABC"],
                                       atol=1e-12)
            best = max("ABC", key=lambda c: expected[c])
            assert result.best.iloc[i] == best
            assert result.uncertainty.iloc[i] == pytest.approx(1 - expected[best])


def test_scarches_kernel_is_the_published_formula() -> None:
    """scArches/HLCA weighted_knn_transfer: std of the k distances s, kernel exp(-d / (2 / s)^2), normalised."""
    rng = np.random.default_rng(4)
    d = np.sort(rng.uniform(0.1, 3.0, size=(7, 15)), axis=1)
    expected = np.empty_like(d)
    for i, row in enumerate(d):
        s = np.std(row)
        tilde = np.exp(-row / (2.0 / s) ** 2)
        expected[i] = tilde / tilde.sum()
    np.testing.assert_allclose(neighbour_weights(d, "scarches"), expected, rtol=1e-12)


def test_kernel_properties() -> None:
    d = np.array([[0.5, 1.0, 2.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [0.0, 1.0, 2.0]])
    for kernel in ("gaussian", "scarches", "distance", "uniform"):
        w = neighbour_weights(d, kernel)
        np.testing.assert_allclose(w.sum(1), 1.0)
        np.testing.assert_allclose(w[1], 1 / 3)  # equal distances: equal weights
        np.testing.assert_allclose(w[2], 1 / 3)  # all exact matches: no division by zero
        assert np.all(np.diff(w[0]) <= 0)  # nearer neighbours never weigh less
    np.testing.assert_allclose(neighbour_weights(d, "distance")[3], [1.0, 0.0, 0.0])
    # the default kernel does not depend on the scale of the latent space
    np.testing.assert_allclose(neighbour_weights(d * 37.0, "gaussian"), neighbour_weights(d, "gaussian"))


def test_vote_ignores_unlabelled_neighbours() -> None:
    codes = np.array([[0, 1, -1], [-1, -1, -1]])
    weights = np.array([[0.5, 0.25, 0.25], [1 / 3, 1 / 3, 1 / 3]])
    proba = vote(codes, weights, 2)
    np.testing.assert_allclose(proba, [[2 / 3, 1 / 3], [0.0, 0.0]])


# ------------------------------------------------------------------------------------------ Unknown
def test_cells_between_two_types_are_unknown() -> None:
    z_ref, y_ref = blobs("AB", 50, seed=5)
    midpoint = np.tile(np.array([[5.0, 0.0]], dtype=np.float32), (4, 1))
    transfer = KNNLabelTransfer(z_ref, y_ref, k=20)
    result = transfer.predict(midpoint, uncertainty_threshold=0.3)["label"]
    assert (result.uncertainty > 0.3).all() and (result.uncertainty <= 0.5 + 1e-9).all()
    assert (result.labels == "Unknown").all()
    assert set(result.best.astype(str)) <= {"A", "B"}  # the argmax is still reported
    kept = transfer.predict(midpoint, uncertainty_threshold=1.0)["label"]
    assert (kept.labels != "Unknown").all()
    assert list(result.labels.cat.categories) == ["A", "B", "Unknown"]


def test_held_out_type_between_reference_types_surfaces_as_unknown() -> None:
    """The reference lacks type C; query C cells sit between A and B and must come out Unknown, while the
    query's A and B cells keep confident labels."""
    z_ref, y_ref = blobs("AB", 80, seed=6, spread=1.5)
    rng = np.random.default_rng(7)
    z_a, _ = blobs("A", 30, seed=8, spread=1.5)
    z_b, _ = blobs("B", 30, seed=9, spread=1.5)
    # on the perpendicular bisector of A and B: equally far from both reference types
    z_c = np.column_stack([5.0 + 0.05 * rng.normal(size=30), 2.0 * rng.normal(size=30)]).astype(np.float32)
    query = as_adata(np.concatenate([z_a, z_b, z_c]), "q", truth=np.repeat(["A", "B", "C"], 30))
    reference = as_adata(z_ref, "r", cell_type=y_ref)
    transfer_labels(query, reference, labels_keys="cell_type", k=30, uncertainty_threshold=0.25)
    pred = query.obs["atlasmap_label"].astype(str).to_numpy()
    unc = query.obs["atlasmap_label_uncertainty"].to_numpy()
    truth = query.obs["truth"].to_numpy()
    assert np.mean(pred[truth == "C"] == "Unknown") >= 0.9
    assert unc[truth == "C"].mean() > 0.35
    assert np.mean(pred[truth != "C"] == truth[truth != "C"]) >= 0.95
    assert unc[truth != "C"].mean() < 0.05


@pytest.mark.slow
def test_held_out_type_in_a_trained_latent() -> None:
    """End to end on the embedded Kang 2018 subset: the control reference is trained without B cells, the
    stimulated query (with B cells) is mapped by surgery. The held-out B cells must come out more uncertain,
    and more often Unknown, than the types the reference knows.

    The vote uncertainty flags a novel type only as far as its cells land among several reference types;
    B cells that land inside the CD4 T cluster get confident CD4 T votes (about 0.24 vs 0.16 mean
    uncertainty here), so the bar is a clear difference, not a clean separation.
    """
    adata = atlasmap.datasets.kang2018()
    held_out = "B"
    is_ctrl = (adata.obs["batch"] == "ctrl").to_numpy()
    ref = adata[is_ctrl & (adata.obs["cell_type"].astype(str) != held_out).to_numpy()].copy()
    query = adata[~is_ctrl].copy()
    reference = atlasmap.SCVI(ref, batch_key="batch", n_layers=2, n_latent=10).train(40, progress_bar=False)
    model = atlasmap.SCVI.load_query_data(query, reference).train(40, progress_bar=False)
    joint = joint_embedding(model, query, ref)
    knn_transfer(joint, "cell_type", k=15, uncertainty_threshold=0.3)
    q = joint[(joint.obs["atlasmap_dataset"] == "query").to_numpy()]
    truth = q.obs["cell_type"].astype(str).to_numpy()
    unc = q.obs["atlasmap_cell_type_uncertainty"].to_numpy()
    pred = q.obs["atlasmap_cell_type"].astype(str).to_numpy()
    novel = truth == held_out
    print(f"\nheld out {held_out}: mean uncertainty {unc[novel].mean():.2f} vs known {unc[~novel].mean():.2f}; "
          f"Unknown {np.mean(pred[novel] == 'Unknown'):.2f} vs {np.mean(pred[~novel] == 'Unknown'):.2f}")
    assert held_out not in set(pred)
    assert unc[novel].mean() > unc[~novel].mean() + 0.03
    assert np.mean(pred[novel] == "Unknown") > np.mean(pred[~novel] == "Unknown")


# ------------------------------------------------------------------------------------------ levels and index
def test_several_levels_with_one_search() -> None:
    z_ref, y_ref = blobs("ABC", 40, seed=10)
    coarse = np.where(y_ref == "C", "myeloid", "lymphoid")
    levels = pd.DataFrame({"fine": y_ref, "coarse": coarse})
    z_query, y_query = blobs("ABC", 10, seed=11, spread=0.3)
    results = KNNLabelTransfer(z_ref, levels, k=10).predict(z_query)
    assert list(results) == ["fine", "coarse"]
    assert list(results["fine"].labels.astype(str)) == list(y_query)
    assert list(results["coarse"].labels.astype(str)) == list(np.where(y_query == "C", "myeloid", "lymphoid"))


def test_index_is_built_once_and_reused() -> None:
    from sklearn.neighbors import NearestNeighbors

    z_ref, y_ref = blobs("ABC", 40, seed=12, spread=2.0)
    transfer = KNNLabelTransfer(z_ref, y_ref, k=7)
    index = transfer._index
    for seed in (13, 14):
        z_query, _ = blobs("ABC", 5, seed=seed, spread=2.0)
        d, i = transfer.kneighbors(z_query)
        d_ref, i_ref = NearestNeighbors(n_neighbors=7, algorithm="brute").fit(z_ref).kneighbors(z_query)
        np.testing.assert_allclose(d, d_ref, rtol=1e-5)
        assert np.array_equal(i, i_ref)
        transfer.predict(z_query)
    assert transfer._index is index and transfer.index_kind == "exact"


@pytest.mark.slow
def test_pynndescent_index_agrees_with_exact() -> None:
    z_ref, y_ref = blobs("ABC", 200, seed=15, spread=1.5)
    z_query, _ = blobs("ABC", 50, seed=16, spread=1.5)
    exact = KNNLabelTransfer(z_ref, y_ref, k=15, index="exact").predict(z_query)["label"]
    approx = KNNLabelTransfer(z_ref, y_ref, k=15, index="pynndescent").predict(z_query)["label"]
    assert np.mean(exact.labels.to_numpy() == approx.labels.to_numpy()) > 0.98


# ------------------------------------------------------------------------------------------ AnnData API
def test_transfer_labels_outputs_and_h5ad_roundtrip(tmp_path: Path) -> None:
    z_ref, y_ref = blobs("ABC", 30, seed=17)
    z_query, _ = blobs("ABC", 8, seed=18, spread=0.5)
    reference = as_adata(z_ref, "r", cell_type=pd.Categorical(y_ref), coarse=np.where(y_ref == "A", "x", "y"))
    query = as_adata(z_query, "q")
    ref_snap = snapshot(reference)
    assert transfer_labels(query, reference, labels_keys=["cell_type", "coarse"], key_added="pred") is None
    for name in ("label", "cell_type", "coarse"):
        assert isinstance(query.obs[f"pred_{name}"].dtype, pd.CategoricalDtype)
        unc = query.obs[f"pred_{name}_uncertainty"].to_numpy()
        assert ((unc >= 0) & (unc <= 1)).all()
        proba = query.obsm[f"pred_{name}_proba"]
        assert isinstance(proba, pd.DataFrame) and list(proba.index) == list(query.obs_names)
        np.testing.assert_allclose(proba.sum(1), 1.0)
    assert query.obs["pred_label"].equals(query.obs["pred_cell_type"])
    assert list(query.obsm["pred_coarse_proba"].columns) == ["x", "y"]
    assert query.uns["pred_label_transfer"]["labels_keys"] == ["cell_type", "coarse"]
    assert_unchanged(reference, ref_snap)
    query.write_h5ad(tmp_path / "q.h5ad")
    back = ad.read_h5ad(tmp_path / "q.h5ad")
    pd.testing.assert_frame_equal(back.obsm["pred_label_proba"], query.obsm["pred_label_proba"])


def test_transfer_labels_copy_leaves_query_unchanged() -> None:
    z_ref, y_ref = blobs("AB", 30, seed=19)
    reference, query = as_adata(z_ref, "r", cell_type=y_ref), as_adata(blobs("AB", 5, seed=20)[0], "q")
    snap = snapshot(query)
    out = transfer_labels(query, reference, labels_keys="cell_type", copy=True)
    assert_unchanged(query, snap)
    assert "atlasmap_label" in out.obs and "atlasmap_label_proba" in out.obsm


def test_joint_anndata_and_knn_transfer_wrapper() -> None:
    z_ref, y_ref = blobs("ABC", 30, seed=21)
    z_query, y_query = blobs("ABC", 10, seed=22, spread=0.5)
    joint = as_adata(np.concatenate([z_ref, z_query]), "c", cell_type=np.concatenate([y_ref, y_query]),
                     atlasmap_dataset=pd.Categorical(["reference"] * len(z_ref) + ["query"] * len(z_query)))
    summary = knn_transfer(joint, "cell_type", k=10)
    assert summary["accuracy"] == 1.0 and summary["accuracy_with_unknown"] == 1.0
    assert summary["n_query"] == len(z_query) and summary["fraction_unknown"] == 0.0
    assert "atlasmap_label" not in joint.obs  # the generic names are left to SCANVI's predictions
    is_ref = (joint.obs["atlasmap_dataset"] == "reference").to_numpy()
    assert (joint.obs["atlasmap_cell_type"].astype(str)[is_ref] == y_ref).all()
    assert (joint.obs["atlasmap_cell_type_uncertainty"][is_ref] == 0).all()
    np.testing.assert_allclose(joint.obsm["atlasmap_cell_type_proba"].sum(1), 1.0)


def test_top_level_api() -> None:
    assert atlasmap.transfer_labels is transfer_labels
    assert atlasmap.KNNLabelTransfer is KNNLabelTransfer


# ------------------------------------------------------------------------------------------ bad input
def test_missing_labels_key_is_an_input_error_and_nothing_is_written() -> None:
    reference = as_adata(blobs("AB", 10, seed=23)[0], "r", cell_type=np.repeat(["A", "B"], 10))
    query = as_adata(blobs("AB", 3, seed=24)[0], "q")
    snaps = snapshot(reference), snapshot(query)
    with pytest.raises(InputError, match="'nope'.*not in the reference"):
        transfer_labels(query, reference, labels_keys=["cell_type", "nope"])
    assert_unchanged(reference, snaps[0])
    assert_unchanged(query, snaps[1])


@pytest.mark.filterwarnings("ignore:the reference has a single")
def test_reference_labels_with_nan_do_not_vote() -> None:
    z_ref, y_ref = blobs("AB", 30, seed=25)
    labels = pd.Series(y_ref, dtype=object)
    labels[:30] = np.nan  # every A cell unlabelled
    z_query = np.array([[0.0, 0.0], [10.0, 0.0]], dtype=np.float32)
    with pytest.warns(UserWarning, match="30 of 60 reference cells have no"):
        transfer = KNNLabelTransfer(z_ref, labels, k=5)
    result = transfer.predict(z_query)["label"]
    assert list(result.probabilities.columns) == ["B"]
    assert list(result.labels.astype(str)) == ["B", "B"]  # only labelled cells are indexed


def test_nan_labels_at_one_level_only() -> None:
    z_ref, y_ref = blobs("AB", 30, seed=26)
    fine = pd.Series(np.where(y_ref == "A", None, "B1"), dtype=object)
    levels = pd.DataFrame({"coarse": y_ref, "fine": fine})
    with pytest.warns(UserWarning, match="'fine' label"):
        transfer = KNNLabelTransfer(z_ref, levels, k=5)
    results = transfer.predict(np.array([[0.0, 0.0]], dtype=np.float32))
    assert results["coarse"].labels.iloc[0] == "A"
    # no neighbour of that cell has a fine label: probability row of zeros, uncertainty 1, Unknown
    assert results["fine"].labels.iloc[0] == "Unknown"
    assert results["fine"].uncertainty.iloc[0] == 1.0


def test_query_with_nan_or_unknown_labels_is_fine() -> None:
    z_ref, y_ref = blobs("AB", 20, seed=27)
    reference = as_adata(z_ref, "r", cell_type=y_ref)
    query = as_adata(blobs("AB", 3, seed=28)[0], "q", cell_type=[np.nan, "zzz", "A", None, "B", np.nan])
    transfer_labels(query, reference, labels_keys="cell_type")
    assert query.obs["atlasmap_label"].notna().all()


def test_single_label_reference_warns_and_predicts_it() -> None:
    z_ref, _ = blobs("A", 20, seed=29)
    with pytest.warns(UserWarning, match="single 'label' label"):
        transfer = KNNLabelTransfer(z_ref, np.repeat("A", 20), k=5)
    result = transfer.predict(np.array([[50.0, 50.0]], dtype=np.float32))["label"]
    assert result.labels.iloc[0] == "A" and result.uncertainty.iloc[0] == 0.0


def test_k_larger_than_reference_is_reduced_with_a_warning() -> None:
    z_ref, y_ref = blobs("AB", 4, seed=30)
    with pytest.warns(UserWarning, match="k=50 is more than the 8"):
        transfer = KNNLabelTransfer(z_ref, y_ref, k=50)
    assert transfer.k == 8
    np.testing.assert_allclose(transfer.predict(z_ref)["label"].probabilities.sum(1), 1.0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"k": 0}, "positive integer"),
        ({"k": 2.5}, "positive integer"),
        ({"kernel": "cosine"}, "kernel must be"),
        ({"index": "faiss"}, "index must be"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    z_ref, y_ref = blobs("AB", 5, seed=31)
    with pytest.raises(InputError, match=match):
        KNNLabelTransfer(z_ref, y_ref, **kwargs)


def test_bad_latents_and_thresholds() -> None:
    z_ref, y_ref = blobs("AB", 5, seed=32)
    transfer = KNNLabelTransfer(z_ref, y_ref, k=3)
    with pytest.raises(InputError, match="3 dimensions but the reference has 2"):
        transfer.predict(np.zeros((2, 3)))
    with pytest.raises(InputError, match="NaN or infinite"):
        transfer.predict(np.array([[np.nan, 0.0]]))
    with pytest.raises(InputError, match="between 0 and 1"):
        transfer.predict(z_ref, uncertainty_threshold=1.5)
    with pytest.raises(InputError, match="also a reference"):
        transfer.predict(z_ref, unknown_label="A")
    with pytest.raises(InputError, match="rows but"):
        KNNLabelTransfer(z_ref, y_ref[:3])
    with pytest.raises(InputError, match="no values"):
        KNNLabelTransfer(z_ref, pd.Series([None] * len(z_ref), dtype=object))
    reference, query = as_adata(z_ref, "r", cell_type=y_ref), as_adata(z_ref, "q")
    del query.obsm["X_atlasmap"]
    with pytest.raises(InputError, match="no obsm\\['X_atlasmap'\\]"):
        transfer_labels(query, reference, labels_keys="cell_type")
    with pytest.raises(InputError, match="atlasmap_dataset"):
        transfer_labels(reference, labels_keys="cell_type")
    assert transfer.predict(np.zeros((0, 2)))["label"].labels.size == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        KNNLabelTransfer(z_ref, y_ref, k=3)  # a clean reference warns about nothing
