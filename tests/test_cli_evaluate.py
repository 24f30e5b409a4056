"""`atlasmap evaluate` and the `map --report` report: tables, figures, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from atlasmap import cli
from atlasmap.datasets import simulate_counts

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _fast_layout(adata: ad.AnnData, *, use_rep: str = "X_atlasmap", **_: object) -> np.ndarray:
    """Stand-in for UMAP (its numba compilation costs tens of seconds per process; test_plots covers it)."""
    return np.asarray(adata.obsm[use_rep])[:, :2].astype(float)


@pytest.fixture(scope="module", autouse=True)
def no_umap_compilation() -> object:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("atlasmap.workflow.plots.compute_umap", _fast_layout)
        yield


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, no_umap_compilation: object) -> dict[str, Path]:
    """A tiny reference model, then `map --with-reference --knn-labels --report` (query batch column named
    differently from the reference's, as users' data often is)."""
    root = tmp_path_factory.mktemp("cli_eval")
    adata = simulate_counts(300, 40, n_batches=3, n_cell_types=3, seed=5)
    ref = adata[adata.obs["batch"] != "batch2"].copy()
    query = adata[adata.obs["batch"] == "batch2"].copy()
    query.obs = query.obs.rename(columns={"batch": "sample"})
    paths = {"ref": root / "ref.h5ad", "query": root / "query.h5ad", "root": root, "model": root / "model",
             "mapped": root / "mapped.h5ad", "report": root / "map_report"}
    ref.write_h5ad(paths["ref"])
    query.write_h5ad(paths["query"])
    assert cli.main(["reference", str(paths["ref"]), "--batch-key", "batch", "-o", str(paths["model"]),
                     "--epochs", "3", "--n-latent", "4", "--quiet"]) == 0
    assert cli.main(["map", str(paths["query"]), "--reference", str(paths["model"]), "-o", str(paths["mapped"]),
                     "--batch-key", "sample", "--epochs", "3", "--quiet", "--with-reference", str(paths["ref"]),
                     "--knn-labels", "cell_type", "--knn-threshold", "0.4", "--report", str(paths["report"]),
                     "--scib", "none"]) == 0
    return paths


def test_map_report_files(files: dict[str, Path]) -> None:
    report = files["report"]
    for name in ("umap.png", "training_curves.png", "confusion_matrix.png"):
        assert (report / name).read_bytes()[:8] == PNG_MAGIC, name
    for name in ("metrics.csv", "metrics.json", "confusion_matrix.csv", "per_cell_type.csv"):
        assert (report / name).is_file(), name
    table = pd.read_csv(report / "metrics.csv")
    assert {"accuracy", "balanced_accuracy", "macro_f1"} <= set(table["metric"])


def test_mapped_file_has_predictions_histories_and_one_batch_column(files: dict[str, Path]) -> None:
    mapped = ad.read_h5ad(files["mapped"])
    for key in ("atlasmap_cell_type", "atlasmap_cell_type_uncertainty"):
        assert key in mapped.obs
    assert mapped.obsm["atlasmap_cell_type_proba"].shape[0] == mapped.n_obs
    assert mapped.uns["atlasmap_label_transfer"]["uncertainty_threshold"] == 0.4
    history = json.loads(mapped.uns["atlasmap"]["history"])
    assert set(history) == {"reference", "query"} and len(history["query"]["elbo_train"]) == 3
    # reference 'batch' and query 'sample' combined, so batch metrics see every cell
    assert mapped.obs["atlasmap_batch"].notna().all()
    assert set(mapped.obs["atlasmap_batch"]) == {"batch0", "batch1", "batch2"}


@pytest.mark.slow  # scib-metrics' JAX import and compilation: 20-60 s
def test_evaluate_with_scib(files: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    out = files["root"] / "eval"
    assert cli.main(["evaluate", str(files["mapped"]), "--batch-key", "atlasmap_batch", "--label-key", "cell_type",
                     "-o", str(out), "--scib", "fast"]) == 0
    text = capsys.readouterr().out
    for word in ("Batch correction", "Bio conservation", "Total", "accuracy", "macro_f1",
                 "obs['atlasmap_cell_type']"):
        assert word in text, word
    payload = json.loads((out / "metrics.json").read_text())
    metrics = {m["metric"]: m["value"] for m in payload["metrics"]}
    assert 0 <= metrics["Total"] <= 1
    assert metrics["Total"] == pytest.approx(0.4 * metrics["Batch correction"] + 0.6 * metrics["Bio conservation"])
    for name in ("umap.png", "training_curves.png", "confusion_matrix.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC, name


def test_evaluate_without_scib_writes_figures(files: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    out = files["root"] / "eval_noscib"
    assert cli.main(["evaluate", str(files["mapped"]), "--batch-key", "atlasmap_batch", "--label-key", "cell_type",
                     "-o", str(out), "--scib", "none"]) == 0
    assert "accuracy" in capsys.readouterr().out
    for name in ("umap.png", "training_curves.png", "confusion_matrix.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC, name


def test_evaluate_tables_only(files: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    out = files["root"] / "eval_tables"
    assert cli.main(["evaluate", str(files["mapped"]), "--batch-key", "atlasmap_batch", "--label-key", "cell_type",
                     "--predicted-key", "atlasmap_cell_type", "-o", str(out), "--scib", "none", "--no-plots"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["confusion_matrix.csv", "metrics.csv", "metrics.json",
                                                     "per_cell_type.csv"]
    assert "accuracy" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["evaluate", "{root}/missing.h5ad", "--batch-key", "atlasmap_batch", "--label-key", "cell_type", "-o", "{root}/e"],
         "does not exist"),
        (["evaluate", "{mapped}", "--batch-key", "atlasmap_batch", "--label-key", "nope", "-o", "{root}/e"],
         "label key 'nope'"),
        (["evaluate", "{mapped}", "--batch-key", "nope", "--label-key", "cell_type", "-o", "{root}/e"],
         "batch key 'nope'"),
        (["evaluate", "{mapped}", "--batch-key", "atlasmap_batch", "--label-key", "cell_type", "--predicted-key", "zz",
          "-o", "{root}/e", "--scib", "none"], "predicted key 'zz'"),
        (["evaluate", "{mapped}", "--batch-key", "atlasmap_batch", "--label-key", "cell_type", "--use-rep", "X_umap",
          "-o", "{root}/e"], "obsm['X_umap']"),
        (["map", "{query}", "--reference", "{model}", "-o", "{root}/z.h5ad", "--batch-key", "sample",
          "--with-reference", "{ref}", "--knn-labels", "nope", "--epochs", "1", "--quiet"], "'nope'"),
    ],
)
def test_user_errors_exit_2_with_one_line(files: dict[str, Path], capsys: pytest.CaptureFixture,
                                          args: list[str], message: str) -> None:
    argv = [a.format(**{k: str(v) for k, v in files.items()}) for a in args]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("atlasmap: error:") and message in err[-1]
    assert "Traceback" not in "\n".join(err)
