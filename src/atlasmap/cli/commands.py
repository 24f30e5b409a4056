"""The ``atlasmap`` commands: read the inputs, call the library, write the outputs, print a summary.

Each ``cmd_*`` takes the parsed arguments; everything a command does for users is a library function
(:mod:`atlasmap.workflow`, :mod:`atlasmap.models`) callable from Python too.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from atlasmap import datasets
from atlasmap.data.backed import read_backed
from atlasmap.data.minified import is_minified
from atlasmap.errors import AtlasmapError
from atlasmap.io.format import read_config
from atlasmap.io.scvi_tools import HUB_ADATA_FILE, hub_directory, is_scvi_tools_save
from atlasmap.models import from_scvi_tools, load_reference
from atlasmap.models.scanvi import SCANVI
from atlasmap.models.scvi import SCVI
from atlasmap.models.totalvi import TOTALVI
from atlasmap.runtime import describe_device, set_backed_options
from atlasmap.workflow.labels import predict_labels, without_query_labels
from atlasmap.workflow.mapping import (
    joint_batch_column,
    joint_embedding,
    knn_transfer,
    read_h5ad,
    write_h5ad_atomic,
)
from atlasmap.workflow.metrics import evaluate, format_table, jax_device
from atlasmap.workflow.reference import train_reference
from atlasmap.workflow.report import store_histories, write_report
from atlasmap.workflow.streaming import write_latent


def set_threads(threads: int | None) -> None:
    """``--threads N``: PyTorch's CPU threads (None: PyTorch's choice)."""
    if threads is not None:
        torch.set_num_threads(threads)


def _train_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {"max_epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
            "weight_decay": args.weight_decay, "early_stopping": args.early_stopping, "seed": args.seed,
            "device": args.device, "progress_bar": not args.quiet}


def _check_reference_flags(args: argparse.Namespace) -> None:
    """Flag combinations, in the command line's words (train_reference checks the same in Python's)."""
    if args.model != "totalvi" and (args.protein_key or args.protein_names_key):
        raise AtlasmapError("--protein-key and --protein-names-key apply to --model totalvi only.")
    if args.model != "scanvi" and (args.labels_key or args.scvi_epochs is not None):
        raise AtlasmapError("--labels-key and --scvi-epochs apply to --model scanvi only.")
    if args.model == "scanvi" and not args.labels_key:
        raise AtlasmapError("--model scanvi needs --labels-key KEY (the obs column of the cell labels).")
    if args.model == "totalvi" and not args.protein_key:
        raise AtlasmapError("--model totalvi needs --protein-key KEY (the obsm key of the protein counts).")
    if args.model == "totalvi" and args.gene_likelihood == "poisson":
        raise AtlasmapError("--model totalvi supports --gene-likelihood nb or zinb, not poisson.")


def cmd_reference(args: argparse.Namespace) -> None:
    out = Path(args.output)
    if out.exists() and not args.overwrite:
        raise AtlasmapError(f"{out} already exists; pass --overwrite to replace it.")
    adata = _read_input(args, "reference")
    t0 = time.perf_counter()
    arch: dict[str, Any] = dict(
        batch_key=args.batch_key, layer=args.layer,
        categorical_covariate_keys=args.categorical_covariate_keys,
        continuous_covariate_keys=args.continuous_covariate_keys, n_latent=args.n_latent,
        n_layers=args.n_layers, n_hidden=args.n_hidden, dropout_rate=args.dropout_rate,
        gene_likelihood=args.gene_likelihood, dispersion=args.dispersion,
        deeply_inject_covariates=not args.no_deep_injection, use_batch_norm=args.use_batch_norm,
        use_layer_norm=args.use_layer_norm, seed=args.seed,
    )
    _check_reference_flags(args)
    model = train_reference(adata, model=args.model, labels_key=args.labels_key,
                            unlabeled_category=args.unlabeled_category, scvi_epochs=args.scvi_epochs,
                            protein_key=args.protein_key, protein_names_key=args.protein_names_key,
                            train_kwargs=_train_kwargs(args), **arch)
    model.save(out, overwrite=args.overwrite)
    hist = model.history
    print(f"device: {_device_text(model)}")
    print(f"reference model: {adata.n_obs} cells x {model.registry.n_vars} genes, "
          f"{len(hist['epoch'])} epochs in {time.perf_counter() - t0:.1f} s, final validation ELBO "
          f"{hist.get('elbo_validation', hist['elbo_train'])[-1]:.2f} per cell -> {out}")
    if args.model == "totalvi":
        print(f"proteins ({len(model.protein_names)}) from obsm[{args.protein_key!r}]: "
              f"{', '.join(model.protein_names[:10])}{', ...' if len(model.protein_names) > 10 else ''}")
    if args.model == "scanvi":
        print(f"labels ({len(model.labels)}) from obs[{model.labels_key!r}]: {', '.join(model.labels[:10])}"
              f"{', ...' if len(model.labels) > 10 else ''}")


def _read_input(args: argparse.Namespace, what: str) -> Any:
    """The input AnnData: in memory, or with ``--backed`` its counts left on disk (streamed in chunks)."""

    if not args.backed:
        return read_h5ad(args.adata, what=what)

    set_backed_options(chunk_size=args.chunk_size, shuffle_chunks=args.shuffle_chunks)
    return read_backed(args.adata, what=what)


def _cmd_map_backed(args: argparse.Namespace) -> None:
    """``atlasmap map --backed``: streams the query; OUT holds obs + obsm latent, no genes (or a .npy)."""
    unsupported = [flag for flag, value in (("--with-reference", args.with_reference), ("--knn-labels", args.knn_labels),
                                            ("--report", args.report)) if value]
    if unsupported:
        raise AtlasmapError(f"{', '.join(unsupported)} cannot be combined with --backed (they need all cells in "
                            "memory); map with --backed, then run them on the mapped output.")
    reference = _load_reference(args, attach_saved_adata=False)
    query = _read_input(args, "query")
    t0 = time.perf_counter()
    model = type(reference).load_query_data(query, reference, batch_key=args.batch_key,
                                            min_gene_overlap=args.min_gene_overlap, layer=args.layer,
                                            var_names_column=args.var_names_column, batch_init=args.batch_init,
                                            unfrozen=args.unfrozen)
    model.train(**_train_kwargs(args))
    t_train = time.perf_counter() - t0
    write_latent(model, query, args.output, overwrite=args.overwrite,
                 uns={"reference": str(args.reference), "new_categories": model.surgery["new_categories"]})
    if args.model_out:
        model.save(args.model_out, overwrite=args.overwrite)
    print(f"device: {_device_text(model)}")
    print(f"mapped {query.n_obs} query cells (backed) in {t_train:.1f} s, latent written in "
          f"{time.perf_counter() - t0 - t_train:.1f} s -> {args.output}")


def cmd_map(args: argparse.Namespace) -> None:

    out = Path(args.output)
    for path in (out, Path(args.model_out) if args.model_out else None):
        if path is not None and path.exists() and not args.overwrite:
            raise AtlasmapError(f"{path} already exists; pass --overwrite to replace it.")
    if args.backed:
        return _cmd_map_backed(args)
    if args.knn_labels and not args.with_reference and not is_scvi_tools_save(args.reference):
        raise AtlasmapError("--knn-labels needs --with-reference REF.h5ad (the labelled reference cells).")
    reference = _load_reference(args, attach_saved_adata=not args.with_reference)
    query = read_h5ad(args.adata, what="query")
    ref_adata = read_h5ad(args.with_reference, what="reference") if args.with_reference else None
    if ref_adata is None and is_scvi_tools_save(args.reference):
        ref_adata = reference.adata
        if ref_adata is not None:
            kind = ("minified: their latent stored by scvi-tools, no counts" if is_minified(ref_adata)
                    else "with counts")
            print(f"reference cells: {ref_adata.n_obs} from {Path(args.reference) / HUB_ADATA_FILE} ({kind})",
                  flush=True)
    if args.knn_labels and ref_adata is None:
        raise AtlasmapError(f"--knn-labels needs the labelled reference cells: {args.reference} has no "
                            f"{HUB_ADATA_FILE}; pass --with-reference REF.h5ad.")
    if args.unfrozen and ref_adata is not None and is_minified(ref_adata):
        raise AtlasmapError("--unfrozen changes the reference cells' latent, and the reference AnnData is minified (no "
                            "counts to recompute it from): map without --unfrozen, or pass the full reference AnnData "
                            "with --with-reference.")
    t0 = time.perf_counter()
    training_query = without_query_labels(reference, query) if args.ignore_query_labels else query
    model = type(reference).load_query_data(training_query, reference,
                                            batch_key=args.batch_key,
                                            min_gene_overlap=args.min_gene_overlap, layer=args.layer,
                                            var_names_column=args.var_names_column, batch_init=args.batch_init,
                                            unfrozen=args.unfrozen)
    model.train(**_train_kwargs(args))
    t_train = time.perf_counter() - t0
    joint = joint_embedding(model, query, ref_adata)
    summary: dict[str, Any] = {"query_cells": int(query.n_obs), "train_seconds": round(t_train, 2),
                               "new_categories": model.surgery["new_categories"]}
    if ref_adata is not None and is_minified(ref_adata):
        summary["reference_minified"] = True  # reference cells: stored latent, zero counts
    if args.knn_labels:
        unlabeled = (reference.unlabeled_category
                     if isinstance(reference, SCANVI) and args.knn_labels == reference.labels_key else None)
        summary["knn"] = knn_transfer(joint, args.knn_labels, k=args.knn_k, uncertainty_threshold=args.knn_threshold,
                                      unlabeled_category=unlabeled)
    labels_summary = predict_labels(model, joint, query, ref_adata, key_added=args.key_added)
    if labels_summary is not None:
        summary["scanvi_labels"] = labels_summary
    joint.uns["atlasmap"] = {"reference": str(args.reference), "model": type(model).__name__,
                             "summary": json.dumps(summary)}
    store_histories(joint, {"reference": reference.history, "query": model.history})
    batch_key = joint_batch_column(joint, ref_adata, query, reference.registry.batch_key, args.batch_key)
    if args.report:
        label_key = args.knn_labels or (labels_summary or {}).get("labels_key")
        _write_report(Path(args.report), joint, batch_key=batch_key,
                      label_key=label_key, scib=args.scib,
                      predicted_key=f"atlasmap_{args.knn_labels}" if args.knn_labels else None)
    write_h5ad_atomic(joint, out, overwrite=args.overwrite)
    if args.model_out:
        model.save(args.model_out, overwrite=args.overwrite)
    print(f"device: {_device_text(model)}")
    print(f"mapped {query.n_obs} query cells in {t_train:.1f} s -> {out}")
    if isinstance(model, TOTALVI):
        print("totalVI proteins: denoised (imputed where not measured) in obsm['atlasmap_protein_denoised'], "
              "foreground probability in obsm['atlasmap_protein_foreground_prob'], measured mask in "
              "obsm['atlasmap_protein_measured']")
    if "knn" in summary and "accuracy" in summary["knn"]:
        print(f"kNN label transfer of {args.knn_labels!r}: {_knn_accuracy_text(summary['knn'])}")
    if labels_summary is not None:
        key = labels_summary["key"]
        line = f"scANVI labels in obs[{key!r}], uncertainty in obs['{key}_uncertainty']"
        if "accuracy" in labels_summary:
            line += f"; accuracy vs the query's obs[{labels_summary['labels_key']!r}] {labels_summary['accuracy']:.3f}"
            if labels_summary["query_cells_labelled_in_training"]:
                line += " (those labels were used in training; see --ignore-query-labels)"
        print(line)


def _load_reference(args: argparse.Namespace, *, attach_saved_adata: bool) -> Any:
    """``--reference``: an atlasmap model directory, or a scvi-tools one imported on the fly (said on stdout)."""
    reference, imported = load_reference(args.reference, attach_saved_adata=attach_saved_adata)
    if imported:
        print(f"imported scvi-tools {type(reference).__name__} model from {args.reference}", flush=True)
    return reference


def _knn_accuracy_text(knn: dict[str, Any]) -> str:
    return (f"accuracy {knn['accuracy']:.3f} (most-voted label; {knn['accuracy_with_unknown']:.3f} counting the "
            f"{100 * knn['fraction_unknown']:.1f}% Unknown calls as wrong)")


def _write_report(report: Path, joint: Any, *, batch_key: str | None, label_key: str | None, scib: str,
                  predicted_key: str | None = None) -> list[Path]:
    """Figures and (with a label key) metric tables of ``joint`` into ``report``; prints the metrics."""
    batch_key = batch_key if batch_key in joint.obs.columns else None
    label_key = label_key if label_key in joint.obs.columns else None
    files, table = write_report(report, joint, batch_key=batch_key, label_key=label_key,
                                predicted_key=predicted_key if predicted_key in joint.obs.columns else None,
                                scib=scib)
    if table is not None and not table.empty:
        print(format_table(table))
    return files


def _device_text(model: Any) -> str:
    return describe_device(model.device)


def cmd_evaluate(args: argparse.Namespace) -> None:
    adata = read_h5ad(args.adata, what="mapped")
    out = Path(args.output)
    with jax_device(args.device) as used:
        if args.scib != "none":
            print(f"device: {used} (scib-metrics' JAX computations)")
        if args.no_plots:
            table = evaluate(adata, batch_key=args.batch_key, label_key=args.label_key, use_rep=args.use_rep,
                             dataset_key=args.dataset_key, predicted_key=args.predicted_key, scib=args.scib,
                             output_dir=out)
            files = sorted(p for p in out.iterdir() if p.suffix in (".csv", ".json"))
        else:
            files, table = write_report(out, adata, batch_key=args.batch_key, label_key=args.label_key,
                                        predicted_key=args.predicted_key, use_rep=args.use_rep,
                                        dataset_key=args.dataset_key, scib=args.scib)
            assert table is not None
    print(format_table(table))
    predicted = table.attrs.get("predicted_key")
    print(f"predictions: {f'obs[{predicted!r}]' if predicted else 'none found (pass --predicted-key)'}")
    print(f"wrote {', '.join(str(f) for f in files)}")


def cmd_demo(args: argparse.Namespace) -> None:

    out = Path(args.output)
    adata = datasets.kang2018()
    ref = adata[adata.obs["batch"] == "ctrl"].copy()
    query = adata[adata.obs["batch"] == "stim"].copy()
    print(f"atlasmap demo: Kang 2018 IFN-beta PBMCs — reference {ref.n_obs} control cells, "
          f"query {query.n_obs} stimulated cells, {adata.n_vars} genes")
    t0 = time.perf_counter()
    reference = SCVI(ref, batch_key="batch", n_layers=2, n_latent=10, seed=args.seed)
    reference.train(max_epochs=args.epochs, seed=args.seed, progress_bar=not args.quiet, device=args.device)
    t_ref = time.perf_counter() - t0
    print(f"device: {_device_text(reference)}")
    t1 = time.perf_counter()
    model = SCVI.load_query_data(query, reference)
    model.train(max_epochs=args.epochs, seed=args.seed, progress_bar=not args.quiet, device=args.device)
    t_query = time.perf_counter() - t1
    joint = joint_embedding(model, query, ref)
    knn = knn_transfer(joint, "cell_type", k=15)
    store_histories(joint, {"reference": reference.history, "query": model.history})
    reference.save(out / "reference_model", overwrite=True)
    model.save(out / "query_model", overwrite=True)
    write_h5ad_atomic(joint, out / "mapped.h5ad", overwrite=True)
    print(f"reference training: {args.epochs} epochs in {t_ref:.1f} s; query mapping: {args.epochs} epochs "
          f"in {t_query:.1f} s")
    print(f"kNN (k=15) transfer of cell_type from control to stimulated cells: {_knn_accuracy_text(knn)}")
    figures = _write_report(out, joint, batch_key="batch", label_key="cell_type", scib=args.scib)
    print(f"wrote {out / 'mapped.h5ad'}, {', '.join(str(f) for f in figures)}, and the models in {out}/")


def cmd_import_scvi(args: argparse.Namespace) -> None:

    out = Path(args.output)
    if out.exists() and not args.overwrite:
        raise AtlasmapError(f"{out} already exists; pass --overwrite to replace it.")
    model = from_scvi_tools(args.scvi_dir, prefix=args.prefix, attach_saved_adata=False)
    model.save(out, overwrite=args.overwrite)
    cats = "; ".join(f"{k}: {len(v)} ({_first(v)})" for k, v in model.registry.categories.items())
    print(f"imported scvi-tools {type(model).__name__} ({model.registry.n_vars} genes, "
          f"n_latent={model.module.config.n_latent}) -> {out}")
    print(f"  categories: {cats}")
    if isinstance(model, SCANVI):
        print(f"  labels ({len(model.labels)}) from obs[{model.labels_key!r}]: {_first(model.labels)}; unlabeled "
              f"category {model.unlabeled_category!r}")
    if isinstance(model, TOTALVI):
        missing = {b: [p for p, m in zip(model.protein_names, mask, strict=True) if not m]
                   for b, mask in model.batch_protein_mask.items() if not all(mask)}
        print(f"  proteins ({len(model.protein_names)}) from obsm[{model.protein_expression_obsm_key!r}]: "
              f"{_first(model.protein_names)}" + (f"; not measured: {missing}" if missing else ""))
    saved = hub_directory(args.scvi_dir, prefix=args.prefix).adata_path
    if model.stored_latent is not None:
        print(f"  minified: the reference cells' latent is stored in obsm[{model.stored_latent.qzm_key!r}] of "
              f"{saved or 'its adata.h5ad'} (use it as --with-reference, or map with --reference {args.scvi_dir})")
    elif saved is not None:
        print(f"  its reference cells ({saved}) are not copied; use them as --with-reference")


def _first(names: Any, n: int = 6) -> str:
    names = [str(x) for x in names]
    return ", ".join(names[:n]) + (", ..." if len(names) > n else "")


def cmd_info(args: argparse.Namespace) -> None:

    cfg = read_config(args.model)
    reg = cfg["registry"]
    print(f"{cfg['model']} model (format {cfg['format_version']}, atlasmap {cfg.get('atlasmap_version')})")
    print(f"  genes: {len(reg['var_names'])}; latent: {cfg['hparams'].get('n_latent')}; "
          f"layers: {cfg['hparams'].get('n_layers')} x {cfg['hparams'].get('n_hidden')}")
    for key, cats in reg["categories"].items():
        print(f"  {key}: {len(cats)} categories ({', '.join(cats[:6])}{', ...' if len(cats) > 6 else ''})")
    proteins = (cfg.get("extra") or {}).get("protein_names")
    if proteins:
        print(f"  proteins ({len(proteins)}) from obsm[{cfg['extra'].get('protein_expression_obsm_key')!r}]: "
              f"{', '.join(proteins[:6])}{', ...' if len(proteins) > 6 else ''}")
    labels = (cfg.get("extra") or {}).get("labels")
    if labels:
        print(f"  labels ({len(labels)}) from obs[{cfg['extra'].get('labels_key')!r}]: {', '.join(labels[:6])}"
              f"{', ...' if len(labels) > 6 else ''}")
    if cfg.get("surgery"):
        print(f"  query model; new categories: {cfg['surgery']['new_categories']}")
    hist = cfg.get("history") or {}
    if hist.get("epoch"):
        print(f"  trained {len(hist['epoch'])} epochs; last train ELBO {hist['elbo_train'][-1]:.2f}")


COMMANDS = {"reference": cmd_reference, "map": cmd_map, "demo": cmd_demo, "evaluate": cmd_evaluate,
            "info": cmd_info, "import-scvi": cmd_import_scvi}
