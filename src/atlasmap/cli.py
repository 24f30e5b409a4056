"""``atlasmap`` command line: reference | map | demo | info.

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

from atlasmap.errors import AtlasmapError

EXIT_USER_ERROR = 2


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
    g.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1, ...")
    g.add_argument("--quiet", action="store_true", help="no progress bar")


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
    mp.add_argument("--knn-k", type=int, default=15)
    mp.add_argument("--min-gene-overlap", type=float, default=None, help="minimum fraction of reference genes (default 0.5)")
    mp.add_argument("--unfrozen", action="store_true", help="fine-tune all weights (reference latent changes)")
    mp.add_argument("--report", metavar="DIR", help="write figures (UMAP, training curves) to DIR")
    _add_training_args(mp, None)
    mp.add_argument("--overwrite", action="store_true", help="replace outputs that exist")

    demo = sub.add_parser("demo", help="map the embedded Kang 2018 stimulated PBMCs onto their controls")
    demo.add_argument("-o", "--output", default="atlasmap_demo", metavar="DIR")
    demo.add_argument("--epochs", type=int, default=100)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quiet", action="store_true")

    info = sub.add_parser("info", help="describe a saved model directory")
    info.add_argument("model", metavar="MODEL_DIR")
    return parser


def _train_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {"max_epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
            "weight_decay": args.weight_decay, "early_stopping": args.early_stopping, "seed": args.seed,
            "device": args.device, "progress_bar": not args.quiet}


def cmd_reference(args: argparse.Namespace) -> None:
    from atlasmap.mapping import read_h5ad
    from atlasmap.models.scvi import SCVI

    out = Path(args.output)
    if out.exists() and not args.overwrite:
        raise AtlasmapError(f"{out} already exists; pass --overwrite to replace it.")
    adata = read_h5ad(args.adata, what="reference")
    t0 = time.perf_counter()
    model = SCVI(
        adata, batch_key=args.batch_key, layer=args.layer,
        categorical_covariate_keys=args.categorical_covariate_keys,
        continuous_covariate_keys=args.continuous_covariate_keys, n_latent=args.n_latent,
        n_layers=args.n_layers, n_hidden=args.n_hidden, dropout_rate=args.dropout_rate,
        gene_likelihood=args.gene_likelihood, dispersion=args.dispersion,
        deeply_inject_covariates=not args.no_deep_injection, use_batch_norm=args.use_batch_norm,
        use_layer_norm=args.use_layer_norm, seed=args.seed,
    )
    model.train(**_train_kwargs(args))
    model.save(out, overwrite=args.overwrite)
    hist = model.history
    print(f"reference model: {adata.n_obs} cells x {model.registry.n_vars} genes, "
          f"{len(hist['epoch'])} epochs in {time.perf_counter() - t0:.1f} s, final validation ELBO "
          f"{hist.get('elbo_validation', hist['elbo_train'])[-1]:.2f} per cell -> {out}")


def cmd_map(args: argparse.Namespace) -> None:
    from atlasmap.io import load_model
    from atlasmap.mapping import joint_embedding, knn_transfer, read_h5ad, write_h5ad_atomic

    out = Path(args.output)
    for path in (out, Path(args.model_out) if args.model_out else None):
        if path is not None and path.exists() and not args.overwrite:
            raise AtlasmapError(f"{path} already exists; pass --overwrite to replace it.")
    if args.knn_labels and not args.with_reference:
        raise AtlasmapError("--knn-labels needs --with-reference REF.h5ad (the labelled reference cells).")
    reference = load_model(args.reference)
    query = read_h5ad(args.adata, what="query")
    ref_adata = read_h5ad(args.with_reference, what="reference") if args.with_reference else None
    t0 = time.perf_counter()
    model = type(reference).load_query_data(query, reference, batch_key=args.batch_key,
                                            min_gene_overlap=args.min_gene_overlap, unfrozen=args.unfrozen)
    model.train(**_train_kwargs(args))
    t_train = time.perf_counter() - t0
    joint = joint_embedding(model, query, ref_adata)
    summary: dict[str, Any] = {"query_cells": int(query.n_obs), "train_seconds": round(t_train, 2),
                               "new_categories": model.surgery["new_categories"]}
    if args.knn_labels:
        summary["knn"] = knn_transfer(joint, args.knn_labels, k=args.knn_k)
    joint.uns["atlasmap"] = {"reference": str(args.reference), "model": type(model).__name__,
                             "summary": json.dumps(summary)}
    if args.report:
        _write_report(Path(args.report), joint, {"reference": reference.history, "query": model.history},
                      colors=_report_colors(joint, reference.registry.batch_key, args))
    write_h5ad_atomic(joint, out, overwrite=args.overwrite)
    if args.model_out:
        model.save(args.model_out, overwrite=args.overwrite)
    print(f"mapped {query.n_obs} query cells in {t_train:.1f} s -> {out}")
    if "knn" in summary and "accuracy" in summary["knn"]:
        print(f"kNN label transfer of {args.knn_labels!r}: accuracy {summary['knn']['accuracy']:.3f}")


def _report_colors(joint: Any, batch_key: str, args: argparse.Namespace) -> list[str]:
    colors = ["atlasmap_dataset", args.batch_key or batch_key]
    if args.knn_labels:
        colors += [args.knn_labels, f"atlasmap_{args.knn_labels}", f"atlasmap_{args.knn_labels}_uncertainty"]
    return [c for c in colors if c in joint.obs.columns]


def _write_report(report: Path, joint: Any, histories: dict[str, dict], colors: list[str]) -> list[Path]:
    from atlasmap.plots import compute_umap, plot_embedding, plot_training_curves

    coords = compute_umap(joint)
    return [plot_embedding(coords, joint.obs, colors, report / "umap.png"),
            plot_training_curves(histories, report / "training_curves.png")]


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
    reference.train(max_epochs=args.epochs, seed=args.seed, progress_bar=not args.quiet)
    t_ref = time.perf_counter() - t0
    t1 = time.perf_counter()
    model = SCVI.load_query_data(query, reference)
    model.train(max_epochs=args.epochs, seed=args.seed, progress_bar=not args.quiet)
    t_query = time.perf_counter() - t1
    joint = joint_embedding(model, query, ref)
    knn = knn_transfer(joint, "cell_type", k=15)
    reference.save(out / "reference_model", overwrite=True)
    model.save(out / "query_model", overwrite=True)
    write_h5ad_atomic(joint, out / "mapped.h5ad", overwrite=True)
    figures = _write_report(out, joint, {"reference": reference.history, "query": model.history},
                            colors=["atlasmap_dataset", "cell_type", "atlasmap_cell_type",
                                    "atlasmap_cell_type_uncertainty"])
    print(f"reference training: {args.epochs} epochs in {t_ref:.1f} s; query mapping: {args.epochs} epochs "
          f"in {t_query:.1f} s")
    print(f"kNN (k=15) transfer of cell_type from control to stimulated cells: accuracy {knn['accuracy']:.3f}")
    print(f"wrote {out / 'mapped.h5ad'}, {', '.join(str(f) for f in figures)}, and the models in {out}/")


def cmd_info(args: argparse.Namespace) -> None:
    from atlasmap.io import read_config

    cfg = read_config(args.model)
    reg = cfg["registry"]
    print(f"{cfg['model']} model (format {cfg['format_version']}, atlasmap {cfg.get('atlasmap_version')})")
    print(f"  genes: {len(reg['var_names'])}; latent: {cfg['hparams'].get('n_latent')}; "
          f"layers: {cfg['hparams'].get('n_layers')} x {cfg['hparams'].get('n_hidden')}")
    for key, cats in reg["categories"].items():
        print(f"  {key}: {len(cats)} categories ({', '.join(cats[:6])}{', ...' if len(cats) > 6 else ''})")
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
    commands = {"reference": cmd_reference, "map": cmd_map, "demo": cmd_demo, "info": cmd_info}
    try:
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
