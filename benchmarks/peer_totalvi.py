"""The peer: scvi-tools TOTALVI reference training + scArches query mapping with missing proteins.

Runs ONLY under an interpreter that has scvi-tools (e.g. ``/work/scvi_venv/bin/python``); atlasmap never
depends on scvi-tools. ``bench_totalvi.py`` runs it in a subprocess on the same prepared file and split and
runs the same workload with atlasmap; both produce the same JSON record.

Missing proteins are given to scvi-tools the way it documents: the query keeps the reference's protein
columns, with zeros for the proteins it did not measure (a protein that is zero in every cell of a batch
is masked out of scvi-tools' likelihood). Imputed values come from ``get_normalized_expression`` with
``transform_batch`` = the reference batch, as in scvi-tools' totalVI reference-mapping tutorial.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="h5ad with RNA counts in .X and protein counts in obsm")
    p.add_argument("--protein-key", default="protein_expression")
    p.add_argument("--batch-key", default="batch")
    p.add_argument("--ref-batch", required=True)
    p.add_argument("--scenarios", required=True,
                   help='JSON {"name": [held-out protein names]}; held-out proteins are zeroed in the query')
    p.add_argument("--epochs-ref", type=int, default=200)
    p.add_argument("--epochs-query", type=int, default=200)
    p.add_argument("--n-latent", type=int, default=20)
    p.add_argument("--n-hidden", type=int, default=256)
    p.add_argument("--lr", type=float, default=4e-3)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--n-samples", type=int, default=25, help="posterior samples averaged for imputation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def protein_correlation(imputed, measured):  # noqa: ANN001, ANN201
    """Pearson r per protein between log1p(imputed) and log1p(measured) across cells."""
    import numpy as np

    a, b = np.log1p(np.asarray(imputed, dtype=np.float64)), np.log1p(np.asarray(measured, dtype=np.float64))
    a, b = a - a.mean(0), b - b.mean(0)
    return (a * b).sum(0) / np.sqrt((a**2).sum(0) * (b**2).sum(0))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    import anndata as ad
    import numpy as np
    import scvi
    import torch

    torch.set_num_threads(args.threads)
    scvi.settings.seed = args.seed
    scvi.settings.verbosity = 40
    train_kwargs = {"lr": args.lr, "batch_size": args.batch_size, "train_size": 0.9, "early_stopping": False,
                    "reduce_lr_on_plateau": False, "enable_progress_bar": False}

    adata = ad.read_h5ad(args.data)
    is_ref = (adata.obs[args.batch_key].astype(str) == args.ref_batch).to_numpy()
    ref, query = adata[is_ref].copy(), adata[~is_ref].copy()
    measured = query.obsm[args.protein_key].copy()

    scvi.model.TOTALVI.setup_anndata(ref, protein_expression_obsm_key=args.protein_key, batch_key=args.batch_key)
    model = scvi.model.TOTALVI(ref, n_latent=args.n_latent, n_hidden=args.n_hidden, use_layer_norm="both",
                               use_batch_norm="none")
    t0 = time.perf_counter()
    model.train(max_epochs=args.epochs_ref, **train_kwargs)
    ref_seconds = time.perf_counter() - t0
    z_ref = model.get_latent_representation(ref)

    record: dict = {"tool": f"scvi-tools {scvi.__version__}", "ref_train_seconds": ref_seconds,
                    "scenarios": {}}
    for name, held_out in json.loads(args.scenarios).items():
        q = query.copy()
        frame = q.obsm[args.protein_key].copy()
        frame[held_out] = 0.0
        q.obsm[args.protein_key] = frame
        t0 = time.perf_counter()
        qmodel = scvi.model.TOTALVI.load_query_data(q, model)
        qmodel.train(max_epochs=args.epochs_query, **train_kwargs)
        map_seconds = time.perf_counter() - t0
        _, imputed = qmodel.get_normalized_expression(q, n_samples=args.n_samples, return_mean=True,
                                                      transform_batch=[args.ref_batch])
        r = protein_correlation(imputed[held_out].to_numpy(), measured[held_out].to_numpy())
        drift = float(np.abs(qmodel.get_latent_representation(ref) - z_ref).max())
        record["scenarios"][name] = {"map_seconds": map_seconds, "held_out": list(held_out),
                                     "r_per_protein": [float(v) for v in r], "mean_r": float(np.mean(r)),
                                     "ref_latent_max_abs_change": drift}
    text = json.dumps(record, indent=1)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            fh.write(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
