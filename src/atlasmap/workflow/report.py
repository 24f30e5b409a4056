"""The evaluation report of a mapping: figures and metric tables in one directory.

Used by ``atlasmap map --report DIR``, ``atlasmap demo`` and ``atlasmap evaluate``; handy in notebooks too.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from atlasmap.errors import InputError
from atlasmap.workflow.metrics import (
    _reference_types,
    _resolve_predicted_key,
    evaluate,
    label_transfer_metrics,
)
from atlasmap.workflow.plots import (
    compute_umap,
    plot_confusion_matrix,
    plot_mapping_umap,
    plot_training_curves,
)

HISTORY_UNS_KEY = "history"


def write_report(
    report_dir: str | Path,
    adata: Any,
    *,
    histories: dict[str, dict[str, list]] | None = None,
    batch_key: str | None = None,
    label_key: str | None = None,
    predicted_key: str | None = None,
    uncertainty_key: str | None = None,
    dataset_key: str = "atlasmap_dataset",
    use_rep: str = "X_atlasmap",
    scib: str = "full",
    unknown_label: str = "Unknown",
) -> tuple[list[Path], pd.DataFrame | None]:
    """Write ``umap.png``, ``training_curves.png``, ``confusion_matrix.png`` and the metric tables.

    Parameters
    ----------
    report_dir
        Output directory (created).
    adata
        Mapped cells with the latent in ``obsm[use_rep]`` (reference + query for the full report). Not modified.
    histories
        Training histories by run name (e.g. ``{"reference": ref.history, "query": query.history}``);
        default: the ones :func:`store_histories` saved in ``adata.uns["atlasmap"]``, if any.
    batch_key, label_key
        With both, :func:`atlasmap.workflow.metrics.evaluate` runs (``metrics.csv``/``metrics.json``).
    predicted_key, uncertainty_key
        Prediction columns; default ``atlasmap_<label_key>`` or ``atlasmap_label`` and ``<predicted>_uncertainty``.
    scib
        Passed to :func:`~atlasmap.workflow.metrics.evaluate`; when scib-metrics is not installed the report warns
        and keeps the label-transfer metrics only.

    Returns
    -------
    The files written, and the metrics table (``None`` without batch and label keys).
    """

    out = Path(report_dir)
    out.mkdir(parents=True, exist_ok=True)
    if label_key is not None and label_key not in adata.obs.columns:
        raise InputError(f"label key {label_key!r} is not a column of .obs.")
    if batch_key is not None and batch_key not in adata.obs.columns:
        raise InputError(f"batch key {batch_key!r} is not a column of .obs.")
    if use_rep not in adata.obsm:
        raise InputError(f"obsm[{use_rep!r}] is missing (obsm keys: {list(adata.obsm.keys())}).")
    predicted_key = _resolve_predicted_key(adata, label_key, predicted_key) if label_key else predicted_key
    if uncertainty_key is None and predicted_key is not None:
        candidate = f"{predicted_key}_uncertainty"
        uncertainty_key = candidate if candidate in adata.obs.columns else None

    written: list[Path] = []
    table = None
    if batch_key is not None and label_key is not None:
        try:
            table = evaluate(adata, batch_key=batch_key, label_key=label_key, use_rep=use_rep,
                             dataset_key=dataset_key, predicted_key=predicted_key, unknown_label=unknown_label,
                             scib=scib, output_dir=out)
        except InputError as err:
            if "scib-metrics" not in str(err) or scib == "none":
                raise
            warnings.warn(f"{err} The report has the label-transfer metrics only.", UserWarning, stacklevel=2)
            table = evaluate(adata, batch_key=batch_key, label_key=label_key, use_rep=use_rep,
                             dataset_key=dataset_key, predicted_key=predicted_key, unknown_label=unknown_label,
                             scib="none", output_dir=out)
        written += [out / "metrics.csv", out / "metrics.json"]
        if table.attrs.get("confusion_matrix") is not None:
            written += [out / "confusion_matrix.csv", out / "per_cell_type.csv"]
    elif predicted_key is not None and label_key is not None:

        _, confusion, _ = label_transfer_metrics(adata, label_key=label_key, predicted_key=predicted_key,
                                                 dataset_key=dataset_key, unknown_label=unknown_label)
        if confusion is not None:
            table = pd.DataFrame(columns=["metric", "value", "group"])
            table.attrs["confusion_matrix"] = confusion

    coords = compute_umap(adata, use_rep=use_rep)
    written.append(plot_mapping_umap(coords, adata.obs, out / "umap.png", dataset_key=dataset_key,
                                     batch_key=batch_key, label_key=label_key, predicted_key=predicted_key,
                                     uncertainty_key=uncertainty_key, unknown_label=unknown_label))
    histories = histories if histories is not None else load_histories(adata)
    if histories:
        written.append(plot_training_curves(histories, out / "training_curves.png"))
    if table is not None and table.attrs.get("confusion_matrix") is not None:
        ref_types = _reference_types(adata, label_key, dataset_key) if label_key else None
        written.append(plot_confusion_matrix(table.attrs["confusion_matrix"], out / "confusion_matrix.png",
                                             title=f"{label_key}: {predicted_key} on query cells",
                                             unknown_label=unknown_label,
                                             reference_types=sorted(ref_types) if ref_types else None))
    return written, table


def store_histories(adata: Any, histories: dict[str, dict[str, list]]) -> None:
    """Keep training histories in ``adata.uns["atlasmap"]["history"]`` (JSON text, so any .h5ad writer takes
    it) for ``atlasmap evaluate`` to plot later."""
    slim = {name: {key: [float("nan") if v is None else float(v) for v in values] for key, values in hist.items()
                   if key in ("epoch", "elbo_train", "elbo_validation", "kl_weight")}
            for name, hist in histories.items() if hist}
    uns = dict(adata.uns.get("atlasmap", {}))
    uns[HISTORY_UNS_KEY] = json.dumps(slim)
    adata.uns["atlasmap"] = uns


def load_histories(adata: Any) -> dict[str, dict[str, list]]:
    """Training histories saved by :func:`store_histories`, or ``{}``."""
    stored = adata.uns.get("atlasmap", {})
    raw = stored.get(HISTORY_UNS_KEY) if isinstance(stored, Mapping) else None
    if raw is None:
        return {}
    try:
        return json.loads(str(raw))
    except ValueError:
        return {}
