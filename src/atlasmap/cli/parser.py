"""The ``atlasmap`` argument parser: commands, flags and their help (nothing here does any work)."""

from __future__ import annotations

import argparse

from atlasmap._version import __version__

#: ``atlasmap reference --model`` choices: the model classes of :func:`atlasmap.workflow.reference.train_reference`
#: (a test keeps the two equal; importing that module here would load torch for ``atlasmap --help``).
REFERENCE_MODELS = ("scvi", "scanvi", "totalvi")
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
    mg.add_argument("--model", choices=list(REFERENCE_MODELS), default="scvi",
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
    mp.add_argument("--reference", required=True, metavar="MODEL_DIR",
                    help="an atlasmap model directory, or a scvi-tools one (model.pt of SCVI, SCANVI or TOTALVI; "
                         "plain or scvi-hub layout), imported on the fly; a hub directory's adata.h5ad (minified or "
                         "not) is then the reference cells unless --with-reference is given")
    mp.add_argument("-o", "--output", required=True, metavar="OUT.h5ad")
    mp.add_argument("--batch-key", help="query obs column of the batch, if named differently from the reference's")
    mp.add_argument("--layer", help="query layer with the raw counts, if it differs from the reference's (default: the "
                                    "reference's, or the one layer / .raw holding counts, said in a warning)")
    mp.add_argument("--model-out", metavar="DIR", help="also save the query model here")
    mp.add_argument("--with-reference", metavar="REF.h5ad",
                    help="include these reference cells in OUT.h5ad (obs['atlasmap_dataset']); a minified scvi-hub "
                         "AnnData (no counts) contributes its stored latent")
    mp.add_argument("--knn-labels", metavar="KEY", help="transfer obs[KEY] from --with-reference cells by kNN")
    mp.add_argument("--knn-k", type=int, default=15, help="neighbours voting in the kNN transfer (default 15)")
    mp.add_argument("--knn-threshold", type=float, default=0.5, metavar="U",
                    help="kNN cells with uncertainty above U are labelled Unknown (default 0.5; 1: never)")
    mp.add_argument("--min-gene-overlap", type=float, default=None, help="minimum fraction of reference genes (default 0.5)")
    mp.add_argument("--var-names-column", metavar="COL",
                    help="match the query's genes by this .var column (e.g. gene_ids) instead of var_names (default: "
                         "var_names, or a .var column that matches clearly more reference genes, said in a warning; "
                         "Ensembl version suffixes are ignored)")
    mp.add_argument("--unfrozen", action="store_true", help="fine-tune all weights (reference latent changes)")
    mp.add_argument("--batch-init", choices=["random", "closest"], default="random",
                    help="how new batches start: random (scArches) or closest: from the reference batch that explains "
                         "each new batch's cells best (lowest ELBO); useful with --epochs 0")
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
                         description="Import a reference saved by scvi-tools (SCVI, SCANVI, TOTALVI; plain or "
                                     "scvi-hub layout) without executing code from its model.pt; architectures "
                                     "atlasmap cannot represent are refused.")
    imp.add_argument("scvi_dir", metavar="DIR", help="directory written by scvi-tools' model.save (or scvi-hub)")
    imp.add_argument("-o", "--output", required=True, metavar="MODEL_DIR")
    imp.add_argument("--prefix", default=None, help="file-name prefix given to scvi-tools' save, if any")
    imp.add_argument("--overwrite", action="store_true", help="replace MODEL_DIR if it exists")
    return parser
