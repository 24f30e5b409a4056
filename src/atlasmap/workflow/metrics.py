"""Evaluation of a mapping: scIB metrics of the joint latent (scib-metrics) and label-transfer accuracy.

:func:`evaluate` returns one tidy table (``metric``, ``value``, ``group``) with

- the scIB batch-correction and bio-conservation metrics of the joint reference + query latent, computed
  by `scib-metrics <https://scib-metrics.readthedocs.io>`_ exactly as its ``Benchmarker`` does (same metric
  functions, same arguments, 15/50/90-neighbour graphs), and the aggregates ``Batch correction``,
  ``Bio conservation`` (means of their metrics, unscaled) and ``Total = 0.4 * batch + 0.6 * bio``;
- when the query cells have true labels and predictions: accuracy, balanced accuracy, macro-F1 (over the
  true cell types), the fraction of ``Unknown`` calls, and, when some query types are missing from the
  reference, the accuracy on the known types and how often the novel ones were called ``Unknown``.

scib-metrics (and JAX under it) is an optional extra, imported only when scIB metrics are asked for:
``pip install 'atlasmap[metrics]'``.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from atlasmap.errors import InputError

#: scib-metrics 0.5 ``Benchmarker`` defaults (``BioConservation()``, ``BatchCorrection()``).
BIO_METRICS: tuple[str, ...] = ("isolated_labels", "nmi_ari_cluster_labels_kmeans", "silhouette_label", "clisi_knn")
BATCH_METRICS: tuple[str, ...] = ("bras", "ilisi_knn", "kbet_per_label", "graph_connectivity", "pcr_comparison")
#: The slow ones (kBET's per-label diffusion maps, BRAS's per-label silhouettes), left out by ``scib="fast"``.
SLOW_METRICS: tuple[str, ...] = ("kbet_per_label", "bras")
#: Display names, as in scib-metrics' results table.
METRIC_NAMES: dict[str, str] = {
    "isolated_labels": "Isolated labels",
    "nmi_ari_cluster_labels_kmeans_nmi": "KMeans NMI",
    "nmi_ari_cluster_labels_kmeans_ari": "KMeans ARI",
    "silhouette_label": "Silhouette label",
    "clisi_knn": "cLISI",
    "bras": "BRAS",
    "ilisi_knn": "iLISI",
    "kbet_per_label": "KBET",
    "graph_connectivity": "Graph connectivity",
    "pcr_comparison": "PCR comparison",
}
BIO, BATCH, AGGREGATE, TRANSFER, DATA = ("Bio conservation", "Batch correction", "Aggregate score",
                                         "Label transfer", "Data")
NEIGHBOR_VALUES = (15, 50, 90)
#: Above this many cells the scIB neighbour graphs are approximate (pynndescent), as in scib-metrics.
EXACT_NEIGHBORS_MAX_CELLS = 100_000


@contextlib.contextmanager
def jax_device(device: str = "auto") -> Iterator[str]:
    """Run scib-metrics' JAX computations inside on ``device`` (``"auto"``: JAX's default, ``"cpu"``,
    ``"cuda"``/``"cuda:N"``: a GPU JAX sees); yields a description of the device used. JAX is imported only
    when a device is asked for."""
    if device == "auto":
        yield "auto (JAX's default device)"
        return
    kind, _, index = str(device).partition(":")
    if kind not in ("cpu", "cuda"):
        raise InputError(f"device {device!r} is not supported; use auto, cpu, cuda or cuda:N.")
    import jax

    try:
        devices = jax.devices("cpu" if kind == "cpu" else "gpu")
    except RuntimeError:
        raise InputError(f"device {device!r}: JAX (used by scib-metrics) has no GPU backend here; install JAX with "
                         "CUDA support (pip install 'jax[cuda12]') or use --device cpu.") from None
    i = int(index) if index.isdigit() else 0
    if i >= len(devices):
        raise InputError(f"device {device!r}: JAX sees {len(devices)} {kind} device(s).")
    with jax.default_device(devices[i]):
        yield f"{device} ({devices[i]})"


def evaluate(
    adata: Any,
    *,
    batch_key: str,
    label_key: str,
    use_rep: str = "X_atlasmap",
    dataset_key: str = "atlasmap_dataset",
    predicted_key: str | None = None,
    unknown_label: str = "Unknown",
    scib: str | Sequence[str] = "full",
    pre_integrated_key: str | None = None,
    output_dir: str | Path | None = None,
) -> pd.DataFrame:
    """scIB metrics of a joint latent and label-transfer accuracy, as one tidy table.

    Parameters
    ----------
    adata
        Mapped cells (typically reference + query from ``atlasmap map --with-reference``) with the latent in
        ``obsm[use_rep]``. Not modified.
    batch_key
        ``obs`` column of the batch (the scIB batch-correction metrics mix these).
    label_key
        ``obs`` column of the true cell types. Cells without a label are left out of the scIB metrics (with a
        warning); query cells without one are left out of the accuracy.
    use_rep
        ``obsm`` key of the latent.
    dataset_key
        ``obs`` column that says ``reference``/``query``; label-transfer metrics use the query cells only
        (all cells if the column is absent).
    predicted_key
        ``obs`` column of the predicted labels. Default: ``atlasmap_<label_key>`` (kNN transfer) if present,
        else ``atlasmap_label`` (SCANVI or kNN), else no label-transfer metrics.
    unknown_label
        The label of cells the predictor declined to call; counted as wrong.
    scib
        ``"full"`` (scib-metrics' ``Benchmarker`` default set), ``"fast"`` (without kBET and BRAS),
        ``"none"``, or a list of scib-metrics function names from :data:`BIO_METRICS` and
        :data:`BATCH_METRICS`.
    pre_integrated_key
        ``obsm`` key of an unintegrated embedding for the PCR comparison. Default: a 50-component PCA of
        ``log1p(normalize_total(X))``.
    output_dir
        If given, write ``metrics.csv``, ``metrics.json`` and, with predictions, ``confusion_matrix.csv`` and
        ``per_cell_type.csv`` there.

    Returns
    -------
    DataFrame with columns ``metric``, ``value``, ``group`` (``Bio conservation``, ``Batch correction``,
    ``Aggregate score``, ``Label transfer``, ``Data``). With predictions, ``.attrs["confusion_matrix"]``
    (true type x predicted label counts) and ``.attrs["per_cell_type"]`` hold the per-type tables, and
    ``.attrs["predicted_key"]`` the column used.

    Raises
    ------
    InputError
        For a missing key or latent, or when scIB metrics are asked for and scib-metrics is not installed.

    Examples
    --------
    >>> table = atlasmap.evaluate(mapped, batch_key="batch", label_key="cell_type")
    >>> table.pivot_table(index="group", columns="metric", values="value")
    """
    metric_set = _metric_set(scib)
    for key, what in ((batch_key, "batch key"), (label_key, "label key")):
        if key not in adata.obs.columns:
            raise InputError(f"{what} {key!r} is not a column of .obs (columns: {_list(adata.obs.columns)}).")
    if use_rep not in adata.obsm:
        raise InputError(f"obsm[{use_rep!r}] is missing (obsm keys: {list(adata.obsm.keys())}); pass use_rep= "
                         "the latent to evaluate.")
    if pre_integrated_key is not None and pre_integrated_key not in adata.obsm:
        raise InputError(f"obsm[{pre_integrated_key!r}] (pre_integrated_key) is missing.")
    predicted_key = _resolve_predicted_key(adata, label_key, predicted_key)
    latent = np.asarray(adata.obsm[use_rep], dtype=np.float32)
    if not np.isfinite(latent).all():
        raise InputError(f"obsm[{use_rep!r}] has NaN or infinite values.")

    rows: list[tuple[str, float, str]] = [("n_cells", float(adata.n_obs), DATA)]
    is_query = _query_mask(adata, dataset_key)
    if dataset_key in adata.obs.columns:
        rows += [("n_reference", float((~is_query).sum()), DATA), ("n_query", float(is_query.sum()), DATA)]
    if metric_set:
        rows += scib_metrics_table(adata, batch_key=batch_key, label_key=label_key, use_rep=use_rep,
                                   metrics=metric_set, pre_integrated_key=pre_integrated_key)
    confusion = per_type = None
    if predicted_key is not None:
        transfer, confusion, per_type = label_transfer_metrics(
            adata, label_key=label_key, predicted_key=predicted_key, dataset_key=dataset_key,
            unknown_label=unknown_label)
        rows += transfer
    table = pd.DataFrame(rows, columns=["metric", "value", "group"])
    table["value"] = table["value"].astype(float)
    table.attrs["predicted_key"] = predicted_key
    if confusion is not None:
        table.attrs["confusion_matrix"] = confusion
        table.attrs["per_cell_type"] = per_type
    if output_dir is not None:
        write_tables(table, output_dir)
    return table


# ---------------------------------------------------------------------------------------------- scIB
def scib_metrics_table(adata: Any, *, batch_key: str, label_key: str, use_rep: str = "X_atlasmap",
                       metrics: Sequence[str] = BIO_METRICS + BATCH_METRICS, pre_integrated_key: str | None = None
                       ) -> list[tuple[str, float, str]]:
    """The scIB rows of :func:`evaluate`: ``(name, value, group)`` per metric, then the aggregates."""
    scib_metrics, NeighborsResults = _import_scib()
    labels_all = adata.obs[label_key]
    batches_all = adata.obs[batch_key]
    mask = (labels_all.notna() & batches_all.notna()).to_numpy()
    if not mask.all():
        warnings.warn(f"{(~mask).sum()} of {adata.n_obs} cells have no {label_key!r} or {batch_key!r} value; the "
                      "scIB metrics use the other cells.", UserWarning, stacklevel=3)
    n = int(mask.sum())
    if n < 20:
        raise InputError(f"only {n} cells have both a {label_key!r} label and a {batch_key!r} value; scIB metrics "
                         "need more (pass scib='none' to skip them).")
    X = np.ascontiguousarray(np.asarray(adata.obsm[use_rep], dtype=np.float32)[mask])
    labels = labels_all[mask].astype(str).to_numpy()
    batches = batches_all[mask].astype(str).to_numpy()
    bio = [m for m in metrics if m in BIO_METRICS]
    batch = [m for m in metrics if m in BATCH_METRICS]
    if bio and len(np.unique(labels)) < 2:
        warnings.warn(f"a single {label_key!r} label: bio-conservation metrics are undefined and skipped.",
                      UserWarning, stacklevel=3)
        bio = []
    if batch and len(np.unique(batches)) < 2:
        warnings.warn(f"a single {batch_key!r} value: batch-correction metrics are undefined and skipped.",
                      UserWarning, stacklevel=3)
        batch = []

    neighbors = scib_neighbors(X, min(max(NEIGHBOR_VALUES), n - 1), NeighborsResults)
    graphs = {v: neighbors.subset_neighbors(n=min(v, n - 1)) for v in NEIGHBOR_VALUES}
    x_pre = None
    if "pcr_comparison" in batch:
        x_pre = (np.asarray(adata.obsm[pre_integrated_key])[mask] if pre_integrated_key
                 else _pca_of_counts(adata, mask))
        if x_pre is None:
            batch.remove("pcr_comparison")
    calls = {  # the same inputs as scib_metrics.benchmark.MetricAnnDataAPI
        "isolated_labels": lambda f: f(X, labels, batches),
        "nmi_ari_cluster_labels_kmeans": lambda f: f(X, labels),
        "silhouette_label": lambda f: f(X, labels),
        "clisi_knn": lambda f: f(graphs[90], labels),
        "graph_connectivity": lambda f: f(graphs[15], labels),
        "bras": lambda f: f(X, labels, batches),
        "pcr_comparison": lambda f: f(x_pre, X, batches, categorical=True),
        "ilisi_knn": lambda f: f(graphs[90], batches),
        "kbet_per_label": lambda f: f(graphs[50], batches, labels),
    }
    rows: list[tuple[str, float, str]] = []
    for group, names in ((BIO, bio), (BATCH, batch)):
        for name in names:
            try:
                value = calls[name](getattr(scib_metrics, name))
            except Exception as err:  # one failing metric must not lose the others
                warnings.warn(f"scib-metrics {name} failed ({type(err).__name__}: {err}); reported as NaN.",
                              UserWarning, stacklevel=3)
                value = {"nmi": np.nan, "ari": np.nan} if name == "nmi_ari_cluster_labels_kmeans" else np.nan
            if isinstance(value, dict):
                rows += [(METRIC_NAMES[f"{name}_{sub}"], float(v), group) for sub, v in value.items()]
            else:
                rows.append((METRIC_NAMES[name], float(value), group))
    scores = {}
    for group in (BATCH, BIO):
        values = [v for _, v, g in rows if g == group and np.isfinite(v)]
        if values:
            scores[group] = float(np.mean(values))
            rows.append((group, scores[group], AGGREGATE))
    if len(scores) == 2:
        rows.append(("Total", 0.4 * scores[BATCH] + 0.6 * scores[BIO], AGGREGATE))
    return rows


def scib_neighbors(X: np.ndarray, n_neighbors: int, results_cls: Any = None) -> Any:
    """Neighbour graph (each cell's first neighbour is itself) as scib-metrics' ``NeighborsResults``:
    exact (scikit-learn) up to :data:`EXACT_NEIGHBORS_MAX_CELLS` cells, scib-metrics' pynndescent above."""
    if results_cls is None:
        _, results_cls = _import_scib()
    if X.shape[0] > EXACT_NEIGHBORS_MAX_CELLS:
        from scib_metrics.nearest_neighbors import pynndescent

        return pynndescent(X, n_neighbors=n_neighbors, random_state=0, n_jobs=1)
    from sklearn.neighbors import NearestNeighbors

    distances, indices = NearestNeighbors(n_neighbors=n_neighbors).fit(X).kneighbors(X)
    return results_cls(indices=indices, distances=distances)


def _pca_of_counts(adata: Any, mask: np.ndarray) -> np.ndarray | None:
    """50-component PCA of log-normalised ``X`` (the unintegrated view for the PCR comparison)."""
    import anndata as ad
    import scanpy as sc
    import scipy.sparse as sp

    if adata.n_vars < 3 or adata.X is None:
        warnings.warn("no expression matrix to compute the unintegrated PCA from; PCR comparison skipped "
                      "(pass pre_integrated_key=).", UserWarning, stacklevel=4)
        return None
    X = adata.X[mask]
    X = X.astype(np.float32) if sp.issparse(X) else np.asarray(X, dtype=np.float32)
    light = ad.AnnData(X)
    sc.pp.normalize_total(light)
    sc.pp.log1p(light)
    n_comps = int(min(50, light.n_obs - 1, light.n_vars - 1))
    sc.tl.pca(light, n_comps=n_comps, svd_solver="arpack", random_state=0)
    return np.asarray(light.obsm["X_pca"])


def _import_scib() -> tuple[Any, Any]:
    try:
        import scib_metrics
        from scib_metrics.nearest_neighbors import NeighborsResults
    except ImportError as err:
        raise InputError(f"scIB metrics need the optional scib-metrics package ({err}); install it with "
                         "pip install 'atlasmap[metrics]', or skip them with scib='none' (CLI: --scib none)."
                         ) from None
    return scib_metrics, NeighborsResults


def _metric_set(scib: str | Sequence[str]) -> list[str]:
    if isinstance(scib, str):
        presets = {"full": [*BIO_METRICS, *BATCH_METRICS],
                   "fast": [m for m in (*BIO_METRICS, *BATCH_METRICS) if m not in SLOW_METRICS], "none": []}
        if scib not in presets:
            raise InputError(f"scib must be 'full', 'fast', 'none' or a list of metric names; got {scib!r}.")
        return presets[scib]
    unknown = [m for m in scib if m not in BIO_METRICS + BATCH_METRICS]
    if unknown:
        raise InputError(f"unknown scIB metric(s) {unknown}; choose from {', '.join(BIO_METRICS + BATCH_METRICS)}.")
    return list(dict.fromkeys(scib))


# ---------------------------------------------------------------------------------------------- label transfer
def label_transfer_metrics(adata: Any, *, label_key: str, predicted_key: str,
                           dataset_key: str = "atlasmap_dataset", unknown_label: str = "Unknown"
                           ) -> tuple[list[tuple[str, float, str]], pd.DataFrame | None, pd.DataFrame | None]:
    """Accuracy, balanced accuracy and macro-F1 of ``obs[predicted_key]`` against ``obs[label_key]`` on the
    query cells that have a true label; plus the confusion matrix and per-type table (None without labels).

    Macro-F1 and balanced accuracy average over the true cell types; ``Unknown`` calls count as wrong. A
    missing prediction counts as ``Unknown``.
    """
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

    if predicted_key not in adata.obs.columns:
        raise InputError(f"predicted key {predicted_key!r} is not a column of .obs.")
    is_query = _query_mask(adata, dataset_key)
    truth_all = adata.obs[label_key]
    use = is_query & truth_all.notna().to_numpy()
    rows: list[tuple[str, float, str]] = [("n_query_labelled", float(use.sum()), TRANSFER)]
    if not use.any():
        warnings.warn(f"no query cell has a {label_key!r} label: no label-transfer accuracy.", UserWarning,
                      stacklevel=3)
        return rows, None, None
    truth = truth_all[use].astype(str).to_numpy()
    predicted = adata.obs[predicted_key][use].astype(object).where(lambda s: s.notna(), unknown_label)
    predicted = predicted.astype(str).to_numpy()
    types = np.unique(truth)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "y_pred contains classes not in y_true" is expected (Unknown)
        rows += [
            ("accuracy", float(accuracy_score(truth, predicted)), TRANSFER),
            ("balanced_accuracy", float(balanced_accuracy_score(truth, predicted)), TRANSFER),
            ("macro_f1", float(f1_score(truth, predicted, labels=types, average="macro", zero_division=0)),
             TRANSFER),
            ("fraction_unknown", float(np.mean(predicted == unknown_label)), TRANSFER),
        ]
    reference_types = _reference_types(adata, label_key, dataset_key)
    known = np.isin(truth, list(reference_types)) if reference_types is not None else np.ones(len(truth), bool)
    if reference_types is not None and not known.all():
        rows.append(("accuracy_known_types", float(np.mean(predicted[known] == truth[known])) if known.any()
                     else np.nan, TRANSFER))
        rows.append(("unknown_rate_known_types", float(np.mean(predicted[known] == unknown_label)) if known.any()
                     else np.nan, TRANSFER))
        rows.append(("unknown_rate_novel_types", float(np.mean(predicted[~known] == unknown_label)), TRANSFER))
    confusion = confusion_table(truth, predicted, unknown_label=unknown_label, reference_types=reference_types)
    per_type = per_cell_type_table(truth, predicted, unknown_label=unknown_label, reference_types=reference_types)
    return rows, confusion, per_type


def confusion_table(truth: Sequence[str], predicted: Sequence[str], *, unknown_label: str = "Unknown",
                    reference_types: Sequence[str] | None = None) -> pd.DataFrame:
    """Counts of true type (rows) x predicted label (columns); true types first in both orders, then other
    predicted labels, then ``unknown_label`` last."""
    truth, predicted = np.asarray(truth, dtype=str), np.asarray(predicted, dtype=str)
    rows = sorted(set(truth))
    extra = sorted(set(predicted) - set(rows) - {unknown_label})
    if reference_types is not None:
        extra = sorted(set(extra) | (set(reference_types) - set(rows)))
    cols = [*rows, *extra, unknown_label]
    table = pd.crosstab(pd.Categorical(truth, categories=rows), pd.Categorical(predicted, categories=cols),
                        dropna=False)
    table.index.name, table.columns.name = "true", "predicted"
    table.index, table.columns = pd.Index(rows, name="true"), pd.Index(cols, name="predicted")
    return table


def per_cell_type_table(truth: Sequence[str], predicted: Sequence[str], *, unknown_label: str = "Unknown",
                        reference_types: Sequence[str] | None = None) -> pd.DataFrame:
    """Per true type: cells, recall, precision, F1, fraction called Unknown, and whether the reference has it."""
    from sklearn.metrics import precision_recall_fscore_support

    truth, predicted = np.asarray(truth, dtype=str), np.asarray(predicted, dtype=str)
    types = sorted(set(truth))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        precision, recall, f1, support = precision_recall_fscore_support(truth, predicted, labels=types,
                                                                         zero_division=0)
    unknown = [float(np.mean(predicted[truth == t] == unknown_label)) for t in types]
    table = pd.DataFrame({"n_cells": support, "recall": recall, "precision": precision, "f1": f1,
                          "fraction_unknown": unknown}, index=pd.Index(types, name="cell_type"))
    if reference_types is not None:
        table["in_reference"] = [t in set(reference_types) for t in types]
    return table


def confusion_matrix(adata: Any, *, label_key: str, predicted_key: str | None = None,
                     dataset_key: str = "atlasmap_dataset", unknown_label: str = "Unknown") -> pd.DataFrame:
    """Confusion matrix (true type x predicted label, counts) of the labelled query cells of ``adata``."""
    predicted_key = _resolve_predicted_key(adata, label_key, predicted_key)
    if predicted_key is None:
        raise InputError(f"no predicted labels found (atlasmap_{label_key} or atlasmap_label); pass predicted_key=.")
    _, confusion, _ = label_transfer_metrics(adata, label_key=label_key, predicted_key=predicted_key,
                                             dataset_key=dataset_key, unknown_label=unknown_label)
    if confusion is None:
        raise InputError(f"no query cell has a {label_key!r} label to compare the predictions with.")
    return confusion


def _resolve_predicted_key(adata: Any, label_key: str, predicted_key: str | None) -> str | None:
    if predicted_key is not None:
        if predicted_key not in adata.obs.columns:
            raise InputError(f"predicted key {predicted_key!r} is not a column of .obs (columns: "
                             f"{_list(adata.obs.columns)}).")
        if predicted_key == label_key:
            raise InputError("predicted_key and label_key are the same column; the predictions must be separate.")
        return predicted_key
    for candidate in (f"atlasmap_{label_key}", "atlasmap_label"):
        if candidate in adata.obs.columns and candidate != label_key:
            return candidate
    return None


def _query_mask(adata: Any, dataset_key: str) -> np.ndarray:
    if dataset_key not in adata.obs.columns:
        return np.ones(adata.n_obs, dtype=bool)
    return (adata.obs[dataset_key].astype(str) == "query").to_numpy()


def _reference_types(adata: Any, label_key: str, dataset_key: str) -> set[str] | None:
    if dataset_key not in adata.obs.columns:
        return None
    is_ref = (adata.obs[dataset_key].astype(str) == "reference").to_numpy()
    if not is_ref.any():
        return None
    return set(adata.obs[label_key][is_ref].dropna().astype(str))


def _list(columns: Any, n: int = 20) -> str:
    cols = [str(c) for c in columns]
    return ", ".join(cols[:n]) + (", ..." if len(cols) > n else "")


# ---------------------------------------------------------------------------------------------- output
def write_tables(table: pd.DataFrame, output_dir: str | Path) -> list[Path]:
    """Write the evaluation table (CSV + JSON) and, if present, the confusion matrix and per-type table."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "metrics.csv", out / "metrics.json"]
    table.to_csv(written[0], index=False)
    payload: dict[str, Any] = {
        "metrics": [{"metric": m, "value": None if not np.isfinite(v) else v, "group": g}
                    for m, v, g in table[["metric", "value", "group"]].itertuples(index=False)],
        "predicted_key": table.attrs.get("predicted_key"),
    }
    confusion = table.attrs.get("confusion_matrix")
    if confusion is not None:
        confusion.to_csv(out / "confusion_matrix.csv")
        table.attrs["per_cell_type"].to_csv(out / "per_cell_type.csv")
        written += [out / "confusion_matrix.csv", out / "per_cell_type.csv"]
        payload["confusion_matrix"] = {"true": list(confusion.index), "predicted": list(confusion.columns),
                                       "counts": confusion.to_numpy().tolist()}
        payload["per_cell_type"] = json.loads(table.attrs["per_cell_type"].reset_index().to_json(orient="records"))
    written[1].write_text(json.dumps(payload, indent=2) + "\n")
    return written


def format_table(table: pd.DataFrame) -> str:
    """The evaluation table as aligned text, grouped (for the CLI)."""
    lines = []
    for group in (DATA, BATCH, BIO, AGGREGATE, TRANSFER):
        part = table[table["group"] == group]
        if part.empty:
            continue
        lines.append(group)
        for metric, value in zip(part["metric"], part["value"], strict=True):
            shown = f"{int(value)}" if metric.startswith("n_") and np.isfinite(value) else f"{value:.3f}"
            lines.append(f"  {metric:<28}{shown:>8}")
    return "\n".join(lines)
