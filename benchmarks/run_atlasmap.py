"""atlasmap's side of the benchmark: the same workload and JSON as ``peer_scvi_tools.py``.

Reference training, save, ``SCVI.load_query_data`` from the saved directory (surgery), query training,
latent and normalised-expression inference, kNN label transfer; wall time per phase, per-epoch
medians, cells/s, peak RSS and the final validation ELBO per cell. Run by ``bench_mapping.py`` in its
own subprocess so that peak RSS is atlasmap's alone; can be run by hand with the same flags as the peer.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time

T_START = time.perf_counter()

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from peer_scvi_tools import device_name, knn_accuracy, parse_args, peak_gpu_mb, peak_rss_mb, split_cells  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    import json

    args = parse_args(argv)
    if args.split_key is None and not args.ref_batches:
        sys.exit("give --ref-batches (with --batch-key) or --split-key")
    times: dict[str, float] = {}

    t = time.perf_counter()
    import atlasmap

    times["import_atlasmap"] = time.perf_counter() - t  # the light top-level import (torch is lazy)
    import anndata as ad
    import numpy as np
    import torch

    atlasmap.SCVI  # noqa: B018 - pulls in torch and the model code
    times["import"] = time.perf_counter() - t
    if args.threads:
        torch.set_num_threads(args.threads)

    t = time.perf_counter()
    adata = ad.read_h5ad(args.data)
    ref, query = split_cells(adata, args)
    del adata
    times["load"] = time.perf_counter() - t

    arch = dict(n_layers=args.n_layers, n_latent=args.n_latent, n_hidden=args.n_hidden, dropout_rate=0.1,
                gene_likelihood="zinb", dispersion="gene", encode_covariates=True, deeply_inject_covariates=True,
                use_layer_norm="both", use_batch_norm="none")
    train_kw = dict(batch_size=args.batch_size, lr=args.lr, train_size=args.train_size, early_stopping=False,
                    seed=args.seed, progress_bar=False, device=args.device)

    t = time.perf_counter()
    model = atlasmap.SCVI(ref, batch_key=args.batch_key, seed=args.seed, **arch)
    times["setup"] = time.perf_counter() - t

    t = time.perf_counter()
    # validation only in the last epoch, as the scvi-tools run (check_val_every_n_epoch=max_epochs)
    model.train(max_epochs=args.epochs_ref, check_val_every_n_epoch=args.epochs_ref, **train_kw)
    times["ref_train_total"] = time.perf_counter() - t
    ref_epochs = list(model.history["epoch_seconds"])
    times["ref_epoch_median"] = statistics.median(ref_epochs)

    t = time.perf_counter()
    ref_latent = model.get_latent_representation()
    times["latent_ref"] = time.perf_counter() - t
    elbo_ref_all = model.get_elbo()  # every reference cell: the same cells for both tools
    elbo_ref = float(model.history["elbo_validation"][-1]) if "elbo_validation" in model.history else None

    with tempfile.TemporaryDirectory() as tmp:
        ref_dir = os.path.join(tmp, "ref")
        t = time.perf_counter()
        model.save(ref_dir)
        times["save_ref"] = time.perf_counter() - t
        del model

        t = time.perf_counter()
        qmodel = atlasmap.SCVI.load_query_data(query, ref_dir, seed=args.seed)
        times["surgery"] = time.perf_counter() - t

    t = time.perf_counter()
    qmodel.train(max_epochs=args.epochs_query, check_val_every_n_epoch=args.epochs_query, **train_kw)
    times["query_train_total"] = time.perf_counter() - t
    query_epochs = list(qmodel.history["epoch_seconds"])
    times["query_epoch_median"] = statistics.median(query_epochs)

    t = time.perf_counter()
    query_latent = qmodel.get_latent_representation()
    times["latent_query"] = time.perf_counter() - t

    n_norm = min(args.normalized_cells, query.n_obs)
    sub = query[:n_norm].copy()
    t = time.perf_counter()
    qmodel.get_normalized_expression(sub, library_size=1.0, return_numpy=True)
    times["normalized_query"] = time.perf_counter() - t

    n_ref, n_query = ref.n_obs, query.n_obs
    result = {
        "tool": "atlasmap",
        "version": atlasmap.__version__,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "data": args.data,
        "n_ref": n_ref,
        "n_query": n_query,
        "n_genes": ref.n_vars,
        "epochs_ref": args.epochs_ref,
        "epochs_query": args.epochs_query,
        "times": times,
        "ref_epoch_seconds": ref_epochs,
        "query_epoch_seconds": query_epochs,
        "cells_per_s": {
            "ref_train": n_ref * args.epochs_ref / times["ref_train_total"],
            "ref_train_epoch_median": n_ref / times["ref_epoch_median"],
            "query_train": n_query * args.epochs_query / times["query_train_total"],
            "query_train_epoch_median": n_query / times["query_epoch_median"],
            "latent": n_ref / times["latent_ref"],
            "normalized": n_norm / times["normalized_query"],
        },
        "query_end_to_end_s": times["surgery"] + times["query_train_total"] + times["latent_query"],
        "elbo_validation_ref": elbo_ref,
        "elbo_validation_query": float(qmodel.history["elbo_validation"][-1]),
        "elbo_all_ref": elbo_ref_all,
        "elbo_all_query": qmodel.get_elbo(),
        "knn_accuracy": None,
        "peak_rss_mb": peak_rss_mb(),
        "peak_gpu_mb": peak_gpu_mb(),
        "device": device_name(args.device),
        "wall_total_s": time.perf_counter() - T_START,
    }
    if args.labels_key:
        result["knn_accuracy"] = knn_accuracy(ref_latent, ref.obs[args.labels_key].astype(str), query_latent,
                                              query.obs[args.labels_key].astype(str))
    np.asarray(query_latent)  # keep alive until here
    text = json.dumps(result, indent=1)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)
    else:
        print(text)
    return result


if __name__ == "__main__":
    main()
