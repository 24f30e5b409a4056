"""``atlasmap`` command line: reference | map | evaluate | demo | info | import-scvi.

Errors a user can cause print one line to stderr and exit with status 2; warnings print one line each.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from atlasmap.errors import AtlasmapError, InputError

EXIT_USER_ERROR = 2
#: Model classes `atlasmap reference --model` can train.
REFERENCE_MODELS = ["scvi", "scanvi", "totalvi"]
DEVICE_HELP = "auto (the GPU when CUDA is available, else the CPU; the default), cpu, cuda, cuda:N"


def _add_training_args(p: argparse.ArgumentParser, default_epochs: int | None) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=default_epochs,
                   help="training epochs (default: scvi-tools' heuristic from the number of cells)"
                   if default_epochs is None else f"training epochs (default {default_epochs})")
    g.add_argument("--batch-size", type=int, default=128)
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--weight-decay", type=float, default=1e-6)
    g.add_argument("--early-stopping", action="store_true", help="stop when the validation ELBO stalls")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", help=DEVICE_HELP)
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads for PyTorch (default: PyTorch's choice, one per core); on a shared machine "
                        "fewer threads than busy cores avoids slow, contended OpenMP")
    b = p.add_argument_group("streaming (data larger than memory; see docs/SCALING_SECTION.md)")
    b.add_argument("--backed", action="store_true",
                   help="leave the counts on disk and stream them in chunks (the input's counts must be CSR)")
    b.add_argument("--chunk-size", type=int, default=None, metavar="N",
                   help="--backed: cells per read (default 8192)")
    b.add_argument("--shuffle-chunks", type=int, default=None, metavar="N",
                   help="--backed: chunks mixed in the training shuffle buffer (default 4)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="atlasmap",
        description="Map single-cell queries onto reference atlases by scArches surgery of scVI models.",
    )
    from atlasmap import __version__

    parser.add_argument("--version", action="version", version=f"atlasmap {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    ref = sub.add_parser("reference", help="train a reference model on REF.h5ad",
                         description="Train an scVI reference model and save it to a directory.")
    ref.add_argument("adata", metavar="REF.h5ad")
    ref.add_argument("-o", "--output", required=True, metavar="MODEL_DIR")
    ref.add_argument("--batch-key", help="obs column of the batch (omit for a single batch)")
    ref.add_argument("--layer", help="layer holding raw counts (default .X)")
    ref.add_argument("--categorical-covariate-keys", nargs="+", default=None, metavar="KEY")
    ref.add_argument("--continuous-covariate-keys", nargs="+", default=None, metavar="KEY")
    mg = ref.add_argument_group("model")
    mg.add_argument("--model", choices=REFERENCE_MODELS, default="scvi",
                    help="scvi (unsupervised), scanvi (semi-supervised: `atlasmap map` then predicts labels) or "
                         "totalvi (RNA + surface proteins, CITE-seq: needs --protein-key)")
    mg.add_argument("--protein-key", metavar="KEY",
                    help="totalvi: obsm key of the protein (ADT) counts, a DataFrame named by protein")
    mg.add_argument("--protein-names-key", metavar="KEY",
                    help="totalvi: uns key of the protein names when obsm[--protein-key] is an array")
    mg.add_argument("--labels-key", metavar="KEY", help="scanvi: obs column of the cell labels")
    mg.add_argument("--unlabeled-category", default="Unknown", metavar="NAME",
                    help="scanvi: the label value of unlabelled cells (default Unknown; it need not occur)")
    mg.add_argument("--scvi-epochs", type=int, default=None, metavar="N",
                    help="scanvi: epochs of scVI pre-training before scANVI fine-tuning for --epochs (default: "
                         "scvi-tools' heuristic; 0: train scANVI from scratch). Without --epochs the fine-tuning "
                         "runs scvi-tools' short schedule (2-10 epochs)")
    a = ref.add_argument_group("architecture")
    a.add_argument("--n-latent", type=int, default=10)
    a.add_argument("--n-layers", type=int, default=1)
    a.add_argument("--n-hidden", type=int, default=128)
    a.add_argument("--dropout-rate", type=float, default=0.1)
    a.add_argument("--gene-likelihood", choices=["zinb", "nb", "poisson"], default="zinb")
    a.add_argument("--dispersion", choices=["gene", "gene-batch"], default="gene")
    a.add_argument("--no-deep-injection", action="store_true", help="covariates into the first layer only")
    a.add_argument("--use-batch-norm", choices=["none", "encoder", "decoder", "both"], default="none")
    a.add_argument("--use-layer-norm", choices=["none", "encoder", "decoder", "both"], default="both")
    _add_training_args(ref, None)
    ref.add_argument("--overwrite", action="store_true", help="replace MODEL_DIR if it exists")

    mp = sub.add_parser("map", help="map QUERY.h5ad onto a reference model",
                        description="Surgery on a saved reference, query training, latent in .obsm['X_atlasmap'].")
    mp.add_argument("adata", metavar="QUERY.h5ad")
    mp.add_argument("--reference", required=True, metavar="MODEL_DIR")
    mp.add_argument("-o", "--output", required=True, metavar="OUT.h5ad")
    mp.add_argument("--batch-key", help="query obs column of the batch, if named differently from the reference's")
    mp.add_argument("--model-out", metavar="DIR", help="also save the query model here")
    mp.add_argument("--with-reference", metavar="REF.h5ad",
                    help="include these reference cells in OUT.h5ad (obs['atlasmap_dataset'])")
    mp.add_argument("--knn-labels", metavar="KEY", help="transfer obs[KEY] from --with-reference cells by kNN")
    mp.add_argument("--knn-k", type=int, default=15, help="neighbours voting in the kNN transfer (default 15)")
    mp.add_argument("--knn-threshold", type=float, default=0.5, metavar="U",
                    help="kNN cells with uncertainty above U are labelled Unknown (default 0.5; 1: never)")
    mp.add_argument("--min-gene-overlap", type=float, default=None, help="minimum fraction of reference genes (default 0.5)")
    mp.add_argument("--unfrozen", action="store_true", help="fine-tune all weights (reference latent changes)")
    mp.add_argument("--report", metavar="DIR",
                    help="write a report to DIR: UMAP, training curves and, with labels (--knn-labels or a "
                         "scANVI reference), metrics (scIB + accuracy) and the confusion matrix")
    mp.add_argument("--scib", choices=["full", "fast", "none"], default="full",
                    help="scIB metrics in the --report: full (scib-metrics' default set), fast (without kBET "
                         "and BRAS), none")
    mp.add_argument("--key-added", default="atlasmap", metavar="PREFIX",
                    help="scANVI references: predictions go to obs['PREFIX_label'], obs['PREFIX_label_uncertainty'] "
                         "and obsm['PREFIX_label_proba'] (default atlasmap)")
    mp.add_argument("--ignore-query-labels", action="store_true",
                    help="scANVI references: do not train on the query's own labels (under the reference's "
                         "labels key); they stay in OUT.h5ad for comparison")
    _add_training_args(mp, None)
    mp.add_argument("--overwrite", action="store_true", help="replace outputs that exist")

    demo = sub.add_parser("demo", help="map the embedded Kang 2018 stimulated PBMCs onto their controls")
    demo.add_argument("-o", "--output", default="atlasmap_demo", metavar="DIR")
    demo.add_argument("--epochs", type=int, default=100)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quiet", action="store_true")
    demo.add_argument("--threads", type=int, default=None, metavar="N", help="CPU threads for PyTorch")
    demo.add_argument("--device", default="auto", help=DEVICE_HELP)
    demo.add_argument("--scib", choices=["full", "fast", "none"], default="fast",
                      help="scIB metrics in the report: fast (default; without the slow kBET and BRAS), full "
                           "(scib-metrics' default set), none")

    ev = sub.add_parser("evaluate", help="scIB metrics, label-transfer accuracy and figures of a mapped .h5ad",
                        description="Evaluate MAPPED.h5ad (from `atlasmap map --with-reference`): scIB metrics "
                                    "of the joint latent (scib-metrics), accuracy / balanced accuracy / macro-F1 "
                                    "of predicted labels, confusion matrix; tables and figures go to DIR.")
    ev.add_argument("adata", metavar="MAPPED.h5ad")
    ev.add_argument("-o", "--output", required=True, metavar="DIR")
    ev.add_argument("--batch-key", required=True, help="obs column of the batch")
    ev.add_argument("--label-key", required=True, help="obs column of the true cell types")
    ev.add_argument("--predicted-key", default=None,
                    help="obs column of the predictions (default atlasmap_<label-key>, else atlasmap_label)")
    ev.add_argument("--use-rep", default="X_atlasmap", help="obsm key of the latent (default X_atlasmap)")
    ev.add_argument("--dataset-key", default="atlasmap_dataset",
                    help="obs column saying reference/query (default atlasmap_dataset)")
    ev.add_argument("--scib", choices=["full", "fast", "none"], default="full",
                    help="full (scib-metrics' default set), fast (without kBET and BRAS), none")
    ev.add_argument("--no-plots", action="store_true", help="tables only")
    ev.add_argument("--device", default="auto",
                    help="where scib-metrics' JAX computations run: auto (JAX's default), cpu, cuda, cuda:N")

    info = sub.add_parser("info", help="describe a saved model directory")
    info.add_argument("model", metavar="MODEL_DIR")

    imp = sub.add_parser("import-scvi", help="convert a scvi-tools model directory (model.pt) to an atlasmap model",
                         description="Import a reference saved by scvi-tools without executing code from its "
                                     "model.pt; architectures atlasmap cannot represent are refused.")
    imp.add_argument("scvi_dir", metavar="DIR", help="directory written by scvi-tools' model.save")
    imp.add_argument("-o", "--output", required=True, metavar="MODEL_DIR")
    imp.add_argument("--prefix", default=None, help="file-name prefix given to scvi-tools' save, if any")
    imp.add_argument("--overwrite", action="store_true", help="replace MODEL_DIR if it exists")
    return parser


def _train_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {"max_epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
            "weight_decay": args.weight_decay, "early_stopping": args.early_stopping, "seed": args.seed,
            "device": args.device, "progress_bar": not args.quiet}


def cmd_reference(args: argparse.Namespace) -> None:
    from atlasmap.models.scvi import SCVI

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
    if args.model != "totalvi" and (args.protein_key or args.protein_names_key):
        raise AtlasmapError("--protein-key and --protein-names-key apply to --model totalvi only.")
    if args.model == "scanvi":
        model = _train_scanvi_reference(adata, arch, args)
    elif args.model == "totalvi":
        model = _train_totalvi_reference(adata, arch, args)
    else:
        if args.labels_key or args.scvi_epochs is not None:
            raise AtlasmapError("--labels-key and --scvi-epochs apply to --model scanvi only.")
        model = SCVI(adata, **arch)
        model.train(**_train_kwargs(args))
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


def _train_scanvi_reference(adata: Any, arch: dict[str, Any], args: argparse.Namespace) -> Any:
    """scANVI reference: scVI pre-training (unless --scvi-epochs 0), then scANVI fine-tuning."""
    from atlasmap.models.scanvi import SCANVI, label_categories
    from atlasmap.models.scvi import SCVI

    if not args.labels_key:
        raise AtlasmapError("--model scanvi needs --labels-key KEY (the obs column of the cell labels).")
    labels = {"labels_key": args.labels_key, "unlabeled_category": args.unlabeled_category}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        label_categories(adata, **labels)  # bad labels fail now, before any training
    if args.scvi_epochs == 0:
        model = SCANVI(adata, **labels, **arch)
    else:
        scvi_model = SCVI(adata, **arch)
        scvi_model.train(**{**_train_kwargs(args), "max_epochs": args.scvi_epochs})
        model = SCANVI.from_scvi_model(scvi_model, **labels, seed=args.seed)
    model.train(**_train_kwargs(args))
    return model


def _train_totalvi_reference(adata: Any, arch: dict[str, Any], args: argparse.Namespace) -> Any:
    """totalVI reference; the architecture flags mean the same as for scVI (both decoder and encoder depth)."""
    from atlasmap.models.totalvi import TOTALVI

    if not args.protein_key:
        raise AtlasmapError("--model totalvi needs --protein-key KEY (the obsm key of the protein counts).")
    if args.labels_key or args.scvi_epochs is not None:
        raise AtlasmapError("--labels-key and --scvi-epochs apply to --model scanvi only.")
    if arch["gene_likelihood"] == "poisson":
        raise AtlasmapError("--model totalvi supports --gene-likelihood nb or zinb, not poisson.")
    arch = dict(arch)
    n_layers, dropout = arch.pop("n_layers"), arch.pop("dropout_rate")
    model = TOTALVI(adata, protein_expression_obsm_key=args.protein_key, protein_names_uns_key=args.protein_names_key,
                    n_layers_encoder=n_layers, n_layers_decoder=n_layers, dropout_rate_encoder=dropout,
                    dropout_rate_decoder=dropout, gene_dispersion=arch.pop("dispersion"), **arch)
    model.train(**_train_kwargs(args))
    return model


def _query_for_training(reference: Any, query: Any, args: argparse.Namespace) -> Any:
    """The query as given, or (--ignore-query-labels, scANVI) the same data without its labels column."""
    from atlasmap.models.scanvi import SCANVI

    if not (args.ignore_query_labels and isinstance(reference, SCANVI) and reference.labels_key in query.obs):
        return query
    import anndata as ad

    return ad.AnnData(X=query.X, obs=query.obs.drop(columns=[reference.labels_key]), var=query.var,
                      layers=dict(query.layers))


def _predict_labels(model: Any, joint: Any, query: Any, ref_adata: Any, args: argparse.Namespace
                    ) -> dict[str, Any] | None:
    """scANVI models: write predicted labels of every cell of ``joint`` into it; return a summary."""
    import numpy as np

    from atlasmap.mapping import DATASET_KEY
    from atlasmap.models.scanvi import SCANVI, store_predictions

    if not isinstance(model, SCANVI):
        return None
    is_ref = (joint.obs[DATASET_KEY] == "reference").to_numpy()
    proba = np.empty((joint.n_obs, len(model.labels)), dtype=np.float32)
    proba[~is_ref] = model.predict(query, soft=True).to_numpy()
    if ref_adata is not None:
        proba[is_ref] = model.predict(ref_adata, soft=True).to_numpy()
    store_predictions(joint, proba, list(model.labels), key_added=args.key_added)
    summary: dict[str, Any] = {
        "labels_key": model.labels_key, "key": f"{args.key_added}_label",
        "query_cells_labelled_in_training": int((model._cells().fields["y"] >= 0).sum()),
        "mean_uncertainty": float(joint.obs.loc[~is_ref, f"{args.key_added}_label_uncertainty"].mean()),
    }
    if model.labels_key in query.obs:
        truth = query.obs[model.labels_key]
        known = (truth.notna() & (truth.astype(str) != model.unlabeled_category)).to_numpy()
        if known.any():
            predicted = joint.obs.loc[~is_ref, f"{args.key_added}_label"].astype(str).to_numpy()
            summary["accuracy"] = float(np.mean(predicted[known] == truth.astype(str).to_numpy()[known]))
    return summary


def _read_input(args: argparse.Namespace, what: str) -> Any:
    """The input AnnData: in memory, or with ``--backed`` its counts left on disk (streamed in chunks)."""
    from atlasmap.mapping import read_h5ad

    if not args.backed:
        return read_h5ad(args.adata, what=what)
    from atlasmap.data.backed import read_backed, set_backed_options

    set_backed_options(chunk_size=args.chunk_size, shuffle_chunks=args.shuffle_chunks)
    return read_backed(args.adata, what=what)


def _cmd_map_backed(args: argparse.Namespace) -> None:
    """``atlasmap map --backed``: streams the query; OUT holds obs + obsm latent, no genes (or a .npy)."""
    from atlasmap.io import load_model
    from atlasmap.streaming import write_latent

    unsupported = [flag for flag, value in (("--with-reference", args.with_reference), ("--knn-labels", args.knn_labels),
                                            ("--report", args.report)) if value]
    if unsupported:
        raise AtlasmapError(f"{', '.join(unsupported)} cannot be combined with --backed (they need all cells in "
                            "memory); map with --backed, then run them on the mapped output.")
    reference = load_model(args.reference)
    query = _read_input(args, "query")
    t0 = time.perf_counter()
    model = type(reference).load_query_data(query, reference, batch_key=args.batch_key,
                                            min_gene_overlap=args.min_gene_overlap, unfrozen=args.unfrozen)
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
    from atlasmap.io import load_model
    from atlasmap.mapping import joint_embedding, knn_transfer, read_h5ad, write_h5ad_atomic

    out = Path(args.output)
    for path in (out, Path(args.model_out) if args.model_out else None):
        if path is not None and path.exists() and not args.overwrite:
            raise AtlasmapError(f"{path} already exists; pass --overwrite to replace it.")
    if args.knn_labels and not args.with_reference:
        raise AtlasmapError("--knn-labels needs --with-reference REF.h5ad (the labelled reference cells).")
    if args.backed:
        return _cmd_map_backed(args)
    reference = load_model(args.reference)
    query = read_h5ad(args.adata, what="query")
    ref_adata = read_h5ad(args.with_reference, what="reference") if args.with_reference else None
    t0 = time.perf_counter()
    model = type(reference).load_query_data(_query_for_training(reference, query, args), reference,
                                            batch_key=args.batch_key,
                                            min_gene_overlap=args.min_gene_overlap, unfrozen=args.unfrozen)
    model.train(**_train_kwargs(args))
    t_train = time.perf_counter() - t0
    joint = joint_embedding(model, query, ref_adata)
    summary: dict[str, Any] = {"query_cells": int(query.n_obs), "train_seconds": round(t_train, 2),
                               "new_categories": model.surgery["new_categories"]}
    if args.knn_labels:
        summary["knn"] = knn_transfer(joint, args.knn_labels, k=args.knn_k, uncertainty_threshold=args.knn_threshold)
    labels_summary = _predict_labels(model, joint, query, ref_adata, args)
    if labels_summary is not None:
        summary["scanvi_labels"] = labels_summary
    joint.uns["atlasmap"] = {"reference": str(args.reference), "model": type(model).__name__,
                             "summary": json.dumps(summary)}
    _store_histories(joint, {"reference": reference.history, "query": model.history})
    batch_key = _joint_batch_column(joint, ref_adata, query, reference.registry.batch_key, args.batch_key)
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
    if hasattr(model, "protein_names"):
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


def _knn_accuracy_text(knn: dict[str, Any]) -> str:
    return (f"accuracy {knn['accuracy']:.3f} (most-voted label; {knn['accuracy_with_unknown']:.3f} counting the "
            f"{100 * knn['fraction_unknown']:.1f}% Unknown calls as wrong)")


def _joint_batch_column(joint: Any, ref_adata: Any, query: Any, ref_key: str | None, query_key: str | None
                        ) -> str | None:
    """The batch column of the joint cells. The joint AnnData keeps only obs columns both inputs share, so
    when the query names its batch column differently (--batch-key), the two are combined into
    ``obs['atlasmap_batch']`` (written to OUT.h5ad too)."""
    import numpy as np
    import pandas as pd

    query_key = query_key or ref_key
    if ref_key in joint.obs.columns and query_key == ref_key:
        return ref_key
    if ref_adata is None or ref_key not in ref_adata.obs or query_key not in query.obs:
        return query_key if query_key in joint.obs.columns else None
    values = np.concatenate([ref_adata.obs[ref_key].astype(str).to_numpy(), query.obs[query_key].astype(str).to_numpy()])
    joint.obs["atlasmap_batch"] = pd.Categorical(values)
    return "atlasmap_batch"


def _store_histories(joint: Any, histories: dict[str, dict]) -> None:
    from atlasmap.report import store_histories

    store_histories(joint, histories)


def _write_report(report: Path, joint: Any, *, batch_key: str | None, label_key: str | None, scib: str,
                  predicted_key: str | None = None) -> list[Path]:
    """Figures and (with a label key) metric tables of ``joint`` into ``report``; prints the metrics."""
    from atlasmap.metrics import format_table
    from atlasmap.report import write_report

    batch_key = batch_key if batch_key in joint.obs.columns else None
    label_key = label_key if label_key in joint.obs.columns else None
    files, table = write_report(report, joint, batch_key=batch_key, label_key=label_key,
                                predicted_key=predicted_key if predicted_key in joint.obs.columns else None,
                                scib=scib)
    if table is not None and not table.empty:
        print(format_table(table))
    return files


def _device_text(model: Any) -> str:
    from atlasmap.runtime import describe_device

    return describe_device(model.device)


def cmd_evaluate(args: argparse.Namespace) -> None:
    from atlasmap.mapping import read_h5ad
    from atlasmap.metrics import evaluate, format_table, jax_device
    from atlasmap.report import write_report

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
    from atlasmap import datasets
    from atlasmap.mapping import joint_embedding, knn_transfer, write_h5ad_atomic
    from atlasmap.models.scvi import SCVI

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
    _store_histories(joint, {"reference": reference.history, "query": model.history})
    reference.save(out / "reference_model", overwrite=True)
    model.save(out / "query_model", overwrite=True)
    write_h5ad_atomic(joint, out / "mapped.h5ad", overwrite=True)
    print(f"reference training: {args.epochs} epochs in {t_ref:.1f} s; query mapping: {args.epochs} epochs "
          f"in {t_query:.1f} s")
    print(f"kNN (k=15) transfer of cell_type from control to stimulated cells: {_knn_accuracy_text(knn)}")
    figures = _write_report(out, joint, batch_key="batch", label_key="cell_type", scib=args.scib)
    print(f"wrote {out / 'mapped.h5ad'}, {', '.join(str(f) for f in figures)}, and the models in {out}/")


def cmd_import_scvi(args: argparse.Namespace) -> None:
    from atlasmap.interop import from_scvi_tools

    out = Path(args.output)
    if out.exists() and not args.overwrite:
        raise AtlasmapError(f"{out} already exists; pass --overwrite to replace it.")
    model = from_scvi_tools(args.scvi_dir, prefix=args.prefix)
    model.save(out, overwrite=args.overwrite)
    cats = ", ".join(f"{k}: {len(v)}" for k, v in model.registry.categories.items())
    print(f"imported scvi-tools {type(model).__name__} ({model.registry.n_vars} genes, "
          f"n_latent={model.module.config.n_latent}; categories {cats}) -> {out}")


def cmd_info(args: argparse.Namespace) -> None:
    from atlasmap.io import read_config

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


def _one_line_warnings(message: Any, category: type, filename: str, lineno: int, line: str | None = None) -> str:
    return f"atlasmap: warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    warnings.formatwarning = _one_line_warnings  # type: ignore[assignment]
    commands = {"reference": cmd_reference, "map": cmd_map, "demo": cmd_demo, "evaluate": cmd_evaluate,
                "info": cmd_info,
                "import-scvi": cmd_import_scvi}
    try:
        threads = getattr(args, "threads", None)
        if threads is not None:
            if threads < 1:
                raise InputError(f"--threads must be at least 1, got {threads}.")
            import torch

            torch.set_num_threads(threads)
        commands[args.command](args)
    except AtlasmapError as err:
        print(f"atlasmap: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("atlasmap: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
