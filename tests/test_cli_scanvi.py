"""The CLI with scANVI: `atlasmap reference --model scanvi`, label predictions from `atlasmap map`, errors."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

from atlasmap import cli
from atlasmap.datasets import simulate_counts

SMALL_ARGS = ["--n-latent", "4", "--n-hidden", "32", "--quiet"]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli_scanvi")
    adata = simulate_counts(300, 40, n_batches=3, n_cell_types=3, seed=5)
    ref = adata[adata.obs["batch"] != "batch2"].copy()
    query = adata[adata.obs["batch"] == "batch2"].copy()
    paths = {"root": root, "ref": root / "ref.h5ad", "query": root / "query.h5ad", "model": root / "scanvi"}
    ref.write_h5ad(paths["ref"])
    query.write_h5ad(paths["query"])
    code = cli.main(["reference", str(paths["ref"]), "--batch-key", "batch", "-o", str(paths["model"]),
                     "--model", "scanvi", "--labels-key", "cell_type", "--scvi-epochs", "3", "--epochs", "3",
                     *SMALL_ARGS])
    assert code == 0
    return paths


def test_reference_scanvi_model_dir(files: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    config = json.loads((files["model"] / "config.json").read_text())
    assert config["model"] == "SCANVI"
    assert config["extra"]["labels"] == ["type0", "type1", "type2"]
    assert config["extra"]["labels_key"] == "cell_type" and config["extra"]["unlabeled_category"] == "Unknown"
    assert len(config["history"]["epoch"]) == 3
    assert cli.main(["info", str(files["model"])]) == 0
    assert "labels (3) from obs['cell_type']" in capsys.readouterr().out


def test_reference_scanvi_from_scratch(files: dict[str, Path]) -> None:
    out = files["root"] / "scratch"
    assert cli.main(["reference", str(files["ref"]), "--batch-key", "batch", "-o", str(out), "--model", "scanvi",
                     "--labels-key", "cell_type", "--scvi-epochs", "0", "--epochs", "2", *SMALL_ARGS]) == 0
    assert json.loads((out / "config.json").read_text())["model"] == "SCANVI"


def test_map_predicts_labels(files: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    out = files["root"] / "joint.h5ad"
    code = cli.main(["map", str(files["query"]), "--reference", str(files["model"]), "-o", str(out), "--epochs", "2",
                     "--with-reference", str(files["ref"]), "--ignore-query-labels", "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "scANVI labels in obs['atlasmap_label']" in printed and "accuracy vs the query's" in printed
    joint = ad.read_h5ad(out)
    proba = joint.obsm["atlasmap_label_proba"]
    assert proba.shape == (joint.n_obs, 3)
    np.testing.assert_allclose(proba.sum(1), 1.0, atol=1e-5)
    assert list(joint.uns["atlasmap_label_proba_columns"]) == ["type0", "type1", "type2"]
    labels = np.asarray(joint.uns["atlasmap_label_proba_columns"])[proba.argmax(1)]
    assert (joint.obs["atlasmap_label"].astype(str).to_numpy() == labels).all()
    np.testing.assert_allclose(joint.obs["atlasmap_label_uncertainty"], 1 - proba.max(1), atol=1e-6)
    assert set(joint.obs["atlasmap_dataset"]) == {"reference", "query"}
    # the query's own labels stay in the output, untouched, and (--ignore-query-labels) did not train
    query = ad.read_h5ad(files["query"])
    is_query = (joint.obs["atlasmap_dataset"] == "query").to_numpy()
    assert (joint.obs.loc[is_query, "cell_type"].astype(str).to_numpy() == query.obs["cell_type"].astype(str)).all()
    summary = json.loads(joint.uns["atlasmap"]["summary"])["scanvi_labels"]
    assert summary["query_cells_labelled_in_training"] == 0
    assert 0.0 <= summary["accuracy"] <= 1.0


def test_map_key_added_and_query_labels_used(files: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    out = files["root"] / "query_only.h5ad"
    with pytest.warns(UserWarning, match="carry reference labels"):  # the query's labels train; the user is told
        code = cli.main(["map", str(files["query"]), "--reference", str(files["model"]), "-o", str(out),
                         "--epochs", "1", "--key-added", "scanvi", "--quiet"])
    assert code == 0
    assert "used in training" in capsys.readouterr().out
    mapped = ad.read_h5ad(out)
    assert {"scanvi_label", "scanvi_label_uncertainty"} <= set(mapped.obs.columns)
    assert "scanvi_label_proba" in mapped.obsm and "atlasmap_label" not in mapped.obs
    summary = json.loads(mapped.uns["atlasmap"]["summary"])["scanvi_labels"]
    assert summary["query_cells_labelled_in_training"] == mapped.n_obs


def test_scvi_reference_map_has_no_label_predictions(tmp_path: Path, files: dict[str, Path]) -> None:
    model, out = tmp_path / "scvi", tmp_path / "mapped.h5ad"
    assert cli.main(["reference", str(files["ref"]), "--batch-key", "batch", "-o", str(model), "--epochs", "1",
                     *SMALL_ARGS]) == 0
    assert cli.main(["map", str(files["query"]), "--reference", str(model), "-o", str(out), "--epochs", "1",
                     "--quiet"]) == 0
    assert "atlasmap_label" not in ad.read_h5ad(out).obs


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--model", "scanvi"], "needs --labels-key"),
        (["--model", "scanvi", "--labels-key", "nope"], "labels key 'nope' is not a column"),
        (["--model", "scanvi", "--labels-key", "cell_type", "--unlabeled-category", "ALL"], "use atlasmap.SCVI"),
        (["--labels-key", "cell_type"], "apply to --model scanvi only"),
    ],
    ids=["no_labels_key", "missing_labels_column", "all_unlabelled", "labels_key_with_scvi"],
)
def test_reference_errors_exit_2(extra: list[str], message: str, files: dict[str, Path], tmp_path: Path,
                                 capsys: pytest.CaptureFixture) -> None:
    source = files["ref"]
    if "ALL" in extra:
        adata = ad.read_h5ad(files["ref"])
        adata.obs["cell_type"] = "ALL"
        source = tmp_path / "all_unlabelled.h5ad"
        adata.write_h5ad(source)
    code = cli.main(["reference", str(source), "--batch-key", "batch", "-o", str(tmp_path / "m"), "--epochs", "1",
                     *extra, *SMALL_ARGS])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "m").exists()
