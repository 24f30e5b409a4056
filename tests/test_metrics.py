"""atlasmap.evaluate: scIB metrics reproduce scib-metrics called directly; label-transfer metrics; bad input."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from support import assert_unchanged, snapshot

from atlasmap.errors import InputError
from atlasmap.workflow.metrics import (
    BATCH_METRICS,
    BIO_METRICS,
    SLOW_METRICS,
    _pca_of_counts,
    confusion_matrix,
    evaluate,
    scib_neighbors,
)

N = 300


def make_mapped(seed: int = 0, n: int = N) -> ad.AnnData:
    """A small joint 'mapped' AnnData: counts, a latent where types separate and batches partly mix,
    reference/query split, true labels and imperfect predictions with some Unknown."""
    rng = np.random.default_rng(seed)
    types = rng.choice(["T", "B", "Mono", "NK"], n, p=[0.4, 0.25, 0.25, 0.1])
    batch = rng.choice(["ctrl", "stim", "donor3"], n)
    dataset = np.where(batch == "ctrl", "reference", "query")
    centre = {"T": 0.0, "B": 3.0, "Mono": 6.0, "NK": 1.5}
    z = rng.normal(size=(n, 6)).astype(np.float32)
    z[:, 0] += [centre[t] for t in types]
    z[:, 1] += 0.7 * (batch == "stim")
    genes = rng.poisson(5.0, size=(n, 30)).astype(np.float32)
    genes[:, :10] += 20 * np.array([[t == "B"] for t in types], dtype=np.float32)
    predicted = types.astype(object).copy()
    flip = rng.random(n) < 0.15
    predicted[flip] = rng.choice(["T", "B", "Mono", "NK", "Unknown"], flip.sum())
    predicted[dataset == "reference"] = types[dataset == "reference"]
    obs = pd.DataFrame({"batch": pd.Categorical(batch), "cell_type": pd.Categorical(types),
                        "atlasmap_dataset": pd.Categorical(dataset, categories=["reference", "query"]),
                        "atlasmap_cell_type": pd.Categorical(predicted)},
                       index=[f"cell{i}" for i in range(n)])
    return ad.AnnData(sp.csr_matrix(genes), obs=obs, obsm={"X_atlasmap": z})


@pytest.fixture(scope="module")
def mapped() -> ad.AnnData:
    return make_mapped()


@pytest.fixture(scope="module")
def fast_table(mapped: ad.AnnData) -> pd.DataFrame:
    return evaluate(mapped, batch_key="batch", label_key="cell_type", scib="fast")


def values(table: pd.DataFrame, group: str) -> dict[str, float]:
    part = table[table["group"] == group]
    return dict(zip(part["metric"], part["value"], strict=True))


def benchmarker_results(adata: ad.AnnData, *, slow: bool) -> pd.Series:
    """scib-metrics' own pipeline on the same inputs (exact neighbours, the same unintegrated PCA)."""
    from scib_metrics.benchmark import BatchCorrection, Benchmarker, BioConservation

    light = ad.AnnData(obs=adata.obs.copy(), obsm={"X_atlasmap": adata.obsm["X_atlasmap"],
                                                   "X_pre": _pca_of_counts(adata, np.ones(adata.n_obs, bool))})
    batch = BatchCorrection() if slow else BatchCorrection(**{m: False for m in SLOW_METRICS})
    bm = Benchmarker(light, batch_key="batch", label_key="cell_type", embedding_obsm_keys=["X_atlasmap"],
                     pre_integrated_embedding_obsm_key="X_pre", bio_conservation_metrics=BioConservation(),
                     batch_correction_metrics=batch, progress_bar=False)
    bm.prepare(neighbor_computer=lambda X, k: scib_neighbors(np.asarray(X), k))
    bm.benchmark()
    return bm.get_results(min_max_scale=False, clean_names=True).loc["X_atlasmap"]


# ------------------------------------------------------------------------------------------ scIB
def test_scib_metrics_reproduce_scib_metrics_benchmarker(mapped: ad.AnnData, fast_table: pd.DataFrame) -> None:
    expected = benchmarker_results(mapped, slow=False)
    ours = {**values(fast_table, "Bio conservation"), **values(fast_table, "Batch correction"),
            **values(fast_table, "Aggregate score")}
    assert set(ours) == {"Isolated labels", "KMeans NMI", "KMeans ARI", "Silhouette label", "cLISI", "iLISI",
                         "Graph connectivity", "PCR comparison", "Batch correction", "Bio conservation", "Total"}
    for name, value in ours.items():
        assert value == pytest.approx(float(expected[name]), abs=1e-6), name
    assert ours["Total"] == pytest.approx(0.4 * ours["Batch correction"] + 0.6 * ours["Bio conservation"])


def test_individual_metrics_match_direct_calls(mapped: ad.AnnData, fast_table: pd.DataFrame) -> None:
    import scib_metrics

    z = mapped.obsm["X_atlasmap"]
    labels = mapped.obs["cell_type"].astype(str).to_numpy()
    batches = mapped.obs["batch"].astype(str).to_numpy()
    got = values(fast_table, "Bio conservation")
    assert got["Silhouette label"] == pytest.approx(float(scib_metrics.silhouette_label(z, labels)), abs=1e-6)
    assert got["Isolated labels"] == pytest.approx(float(scib_metrics.isolated_labels(z, labels, batches)), abs=1e-6)
    nn = scib_neighbors(z, 90)
    got = values(fast_table, "Batch correction")
    assert got["iLISI"] == pytest.approx(float(scib_metrics.ilisi_knn(nn, batches)), abs=1e-6)


@pytest.mark.slow
def test_full_metric_set_reproduces_benchmarker_defaults(mapped: ad.AnnData) -> None:
    table = evaluate(mapped, batch_key="batch", label_key="cell_type", scib="full")
    expected = benchmarker_results(mapped, slow=True)
    ours = {**values(table, "Bio conservation"), **values(table, "Batch correction"),
            **values(table, "Aggregate score")}
    assert {"KBET", "BRAS"} <= set(ours)
    for name, value in ours.items():
        assert value == pytest.approx(float(expected[name]), abs=1e-6), name


def test_metric_presets() -> None:
    from atlasmap.workflow.metrics import _metric_set

    assert _metric_set("full") == [*BIO_METRICS, *BATCH_METRICS]
    assert not set(SLOW_METRICS) & set(_metric_set("fast"))
    assert _metric_set("none") == []
    assert _metric_set(["silhouette_label"]) == ["silhouette_label"]
    with pytest.raises(InputError, match="unknown scIB metric"):
        _metric_set(["silhouette"])
    with pytest.raises(InputError, match="'full', 'fast', 'none'"):
        _metric_set("quick")


# ------------------------------------------------------------------------------------------ label transfer
def test_label_transfer_metrics_match_sklearn(mapped: ad.AnnData, fast_table: pd.DataFrame) -> None:
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

    q = mapped.obs[mapped.obs["atlasmap_dataset"] == "query"]
    truth, pred = q["cell_type"].astype(str), q["atlasmap_cell_type"].astype(str)
    got = values(fast_table, "Label transfer")
    assert got["n_query_labelled"] == len(q)
    assert got["accuracy"] == pytest.approx(accuracy_score(truth, pred))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert got["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(truth, pred))
    assert got["macro_f1"] == pytest.approx(f1_score(truth, pred, labels=sorted(set(truth)), average="macro"))
    assert got["fraction_unknown"] == pytest.approx(np.mean(pred == "Unknown"))
    assert fast_table.attrs["predicted_key"] == "atlasmap_cell_type"
    confusion = fast_table.attrs["confusion_matrix"]
    assert confusion.to_numpy().sum() == len(q)
    assert list(confusion.columns)[-1] == "Unknown"
    assert np.trace(confusion.loc[:, list(confusion.index)].to_numpy()) == (truth == pred).sum()
    per_type = fast_table.attrs["per_cell_type"]
    assert per_type["n_cells"].sum() == len(q) and per_type["in_reference"].all()
    pd.testing.assert_frame_equal(confusion_matrix(mapped, label_key="cell_type"), confusion)


def test_novel_query_types_are_reported() -> None:
    adata = make_mapped(seed=1)
    labels = adata.obs["cell_type"].astype(str).to_numpy()
    is_query = (adata.obs["atlasmap_dataset"] == "query").to_numpy()
    labels[is_query & (labels == "NK")] = "Platelet"  # a query type the reference does not have
    predicted = adata.obs["atlasmap_cell_type"].astype(object).to_numpy()
    predicted[labels == "Platelet"] = "Unknown"
    adata.obs["cell_type"], adata.obs["atlasmap_cell_type"] = labels, predicted
    table = evaluate(adata, batch_key="batch", label_key="cell_type", scib="none")
    got = values(table, "Label transfer")
    assert got["unknown_rate_novel_types"] == 1.0
    assert got["accuracy_known_types"] > got["accuracy"]
    assert not table.attrs["per_cell_type"].loc["Platelet", "in_reference"]
    assert table.attrs["confusion_matrix"].loc["Platelet", "Unknown"] == (labels == "Platelet").sum()


def test_predicted_key_detection_and_unlabelled_query(mapped: ad.AnnData) -> None:
    adata = mapped.copy()
    adata.obs["atlasmap_label"] = adata.obs.pop("atlasmap_cell_type")
    table = evaluate(adata, batch_key="batch", label_key="cell_type", scib="none")
    assert table.attrs["predicted_key"] == "atlasmap_label"
    del adata.obs["atlasmap_label"]
    table = evaluate(adata, batch_key="batch", label_key="cell_type", scib="none")
    assert table.attrs["predicted_key"] is None and "accuracy" not in set(table["metric"])
    adata.obs["pred"] = mapped.obs["atlasmap_cell_type"].to_numpy()
    adata.obs["cell_type"] = adata.obs["cell_type"].astype(object).where(
        adata.obs["atlasmap_dataset"] == "reference", None)
    with pytest.warns(UserWarning, match="no query cell has a 'cell_type' label"):
        table = evaluate(adata, batch_key="batch", label_key="cell_type", predicted_key="pred", scib="none")
    assert "confusion_matrix" not in table.attrs


# ------------------------------------------------------------------------------------------ outputs
def test_tidy_table_and_files(mapped: ad.AnnData, fast_table: pd.DataFrame, tmp_path: Path) -> None:
    from atlasmap.workflow.metrics import format_table, write_tables

    assert list(fast_table.columns) == ["metric", "value", "group"]
    assert fast_table["value"].dtype == float
    files = write_tables(fast_table, tmp_path / "out")
    assert {f.name for f in files} == {"metrics.csv", "metrics.json", "confusion_matrix.csv", "per_cell_type.csv"}
    back = pd.read_csv(tmp_path / "out" / "metrics.csv")
    pd.testing.assert_frame_equal(back, fast_table, check_exact=False)
    payload = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert {"metrics", "confusion_matrix", "per_cell_type", "predicted_key"} <= set(payload)
    assert payload["metrics"][0] == {"metric": "n_cells", "value": float(N), "group": "Data"}
    text = format_table(fast_table)
    assert "Total" in text and "accuracy" in text


def test_output_dir_argument(mapped: ad.AnnData, tmp_path: Path) -> None:
    evaluate(mapped, batch_key="batch", label_key="cell_type", scib="none", output_dir=tmp_path / "r")
    assert (tmp_path / "r" / "metrics.json").is_file() and (tmp_path / "r" / "confusion_matrix.csv").is_file()


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_key": "nope"}, "batch key 'nope'"),
        ({"label_key": "nope"}, "label key 'nope'"),
        ({"use_rep": "X_pca"}, "obsm\\['X_pca'\\] is missing"),
        ({"predicted_key": "nope"}, "predicted key 'nope'"),
        ({"predicted_key": "cell_type"}, "same column"),
        ({"pre_integrated_key": "X_nope"}, "pre_integrated_key"),
        ({"scib": "some"}, "scib must be"),
    ],
)
def test_bad_arguments(mapped: ad.AnnData, kwargs: dict, match: str) -> None:
    args = {"batch_key": "batch", "label_key": "cell_type", "scib": "none", **kwargs}
    with pytest.raises(InputError, match=match):
        evaluate(mapped, **args)


def test_nan_labels_single_batch_and_input_unchanged() -> None:
    adata = make_mapped(seed=2)
    adata.obs["cell_type"] = adata.obs["cell_type"].astype(object)
    adata.obs.iloc[:10, adata.obs.columns.get_loc("cell_type")] = np.nan
    adata.obs["one_batch"] = "b"
    snap = snapshot(adata)
    with pytest.warns(UserWarning) as record:
        table = evaluate(adata, batch_key="one_batch", label_key="cell_type", scib=["silhouette_label", "ilisi_knn"])
    messages = " ".join(str(w.message) for w in record)
    assert "10 of 300 cells have no 'cell_type'" in messages and "single 'one_batch' value" in messages
    assert "Silhouette label" in set(table["metric"]) and "iLISI" not in set(table["metric"])
    assert "Total" not in set(table["metric"])  # no batch score: no total
    assert_unchanged(adata, snap)


def test_missing_scib_metrics_is_a_clear_error(mapped: ad.AnnData, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "scib_metrics", None)  # import scib_metrics -> ImportError
    with pytest.raises(InputError, match=r"pip install 'atlasmap\[metrics\]'"):
        evaluate(mapped, batch_key="batch", label_key="cell_type")
    evaluate(mapped, batch_key="batch", label_key="cell_type", scib="none")  # still fine without scIB


def test_jax_is_imported_lazily() -> None:
    code = ("import sys, atlasmap, atlasmap.workflow.metrics, atlasmap.workflow.knn, atlasmap.workflow.plots, atlasmap.workflow.report, atlasmap.cli; "
            "assert atlasmap.evaluate is atlasmap.workflow.metrics.evaluate; "
            "bad = [m for m in ('jax', 'scib_metrics') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
