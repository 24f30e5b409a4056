"""The peer: scvi-tools SCVI reference training + scArches query mapping, timed phase by phase.

Runs ONLY under an interpreter that has scvi-tools (e.g. ``/work/scvi_venv/bin/python``); atlasmap never
depends on scvi-tools. ``bench_mapping.py`` calls this script in its own subprocess (so peak RSS is the
peer's alone) and :mod:`run_atlasmap` runs the same workload with atlasmap; both write the same JSON.

Example::

    /work/scvi_venv/bin/python benchmarks/peer_scvi_tools.py \
        --data /work/shared/data/kang2018_ifnb_scgen_valid/kang2018_ifnb_scgen_valid_counts.h5ad \
        --batch-key batch --ref-batches ctrl --query-batches stim --labels-key cell_type \
        --epochs-ref 100 --epochs-query 100 --out /tmp/peer.json

Settings follow what a user of scvi-tools would write for the scArches tutorial architecture:
``train_size=0.9, batch_size=128``, default Adam (lr 1e-3, weight decay 1e-6, eps 0.01), KL warm-up
400 epochs, no early stopping, no progress bar, no checkpointing. Validation runs once, in the last
epoch (``check_val_every_n_epoch=max_epochs``), so that ``elbo_validation`` exists without paying for
validation every epoch.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time

T_START = time.perf_counter()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="h5ad with raw counts in .X")
    p.add_argument("--batch-key", default="batch")
    p.add_argument("--ref-batches", nargs="*", default=None, help="batches of the reference")
    p.add_argument("--query-batches", nargs="*", default=None, help="batches of the query (default: the others)")
    p.add_argument("--split-key", default=None,
                   help="alternative to --ref-batches: .obs column whose value 'reference' / 'query' splits the cells")
    p.add_argument("--labels-key", default=None, help=".obs column of cell labels for kNN label transfer")
    p.add_argument("--epochs-ref", type=int, default=100)
    p.add_argument("--epochs-query", type=int, default=100)
    p.add_argument("--n-layers", type=int, default=2)
    p.add_argument("--n-latent", type=int, default=30)
    p.add_argument("--n-hidden", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--train-size", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--device", default="cpu", help="cpu or cuda: where both tools train and infer (default cpu)")
    p.add_argument("--normalized-cells", type=int, default=5000,
                   help="query cells used to time normalized-expression inference")
    p.add_argument("--out", default=None, help="write the JSON here (default: stdout)")
    return p.parse_args(argv)


def split_cells(adata, args):  # noqa: ANN001, ANN201
    """Reference and query AnnData (copies) by batch or by a split column."""
    if args.split_key:
        col = adata.obs[args.split_key].astype(str)
        return adata[(col == "reference").to_numpy()].copy(), adata[(col == "query").to_numpy()].copy()
    batches = adata.obs[args.batch_key].astype(str)
    ref_mask = batches.isin(args.ref_batches).to_numpy()
    query_mask = batches.isin(args.query_batches).to_numpy() if args.query_batches else ~ref_mask
    return adata[ref_mask].copy(), adata[query_mask].copy()


def knn_accuracy(ref_latent, ref_labels, query_latent, query_labels, k: int = 15) -> float:  # noqa: ANN001
    """Distance-weighted kNN label transfer (k=15) from reference to query latent; fraction correct."""
    import numpy as np
    from sklearn.neighbors import KNeighborsClassifier

    clf = KNeighborsClassifier(n_neighbors=k, weights="distance").fit(ref_latent, np.asarray(ref_labels))
    return float((clf.predict(query_latent) == np.asarray(query_labels)).mean())


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def peak_gpu_mb() -> float | None:
    """Peak GPU memory PyTorch allocated in this process (None without CUDA)."""
    import torch

    return torch.cuda.max_memory_allocated() / 1024**2 if torch.cuda.is_available() else None


def device_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.split_key is None and not args.ref_batches:
        sys.exit("give --ref-batches (with --batch-key) or --split-key")
    times: dict[str, float] = {}

    t = time.perf_counter()
    import lightning.pytorch as pl
    import numpy as np
    import scvi
    import torch
    times["import"] = time.perf_counter() - t

    if args.threads:
        torch.set_num_threads(args.threads)
    scvi.settings.seed = args.seed
    scvi.settings.progress_bar_style = "tqdm"

    class EpochTimer(pl.Callback):
        """Wall time of each training epoch (validation, when it runs, is inside the epoch)."""

        def __init__(self) -> None:
            self.seconds: list[float] = []
            self._t0 = 0.0

        def on_train_epoch_start(self, trainer, pl_module) -> None:  # noqa: ANN001
            self._t0 = time.perf_counter()

        def on_train_epoch_end(self, trainer, pl_module) -> None:  # noqa: ANN001
            self.seconds.append(time.perf_counter() - self._t0)

    import anndata as ad

    t = time.perf_counter()
    adata = ad.read_h5ad(args.data)
    ref, query = split_cells(adata, args)
    del adata
    times["load"] = time.perf_counter() - t

    arch = dict(n_layers=args.n_layers, n_latent=args.n_latent, n_hidden=args.n_hidden, dropout_rate=0.1,
                gene_likelihood="zinb", dispersion="gene", encode_covariates=True, deeply_inject_covariates=True,
                use_layer_norm="both", use_batch_norm="none")
    t = time.perf_counter()
    scvi.model.SCVI.setup_anndata(ref, batch_key=args.batch_key)
    model = scvi.model.SCVI(ref, **arch)
    times["setup"] = time.perf_counter() - t

    accelerator = "gpu" if args.device.startswith("cuda") else "cpu"

    def fit(m, epochs: int) -> tuple[float, list[float]]:  # noqa: ANN001
        timer = EpochTimer()
        t0 = time.perf_counter()
        m.train(max_epochs=epochs, train_size=args.train_size, batch_size=args.batch_size, early_stopping=False,
                enable_progress_bar=False, enable_checkpointing=False, check_val_every_n_epoch=epochs,
                plan_kwargs={"lr": args.lr}, callbacks=[timer], accelerator=accelerator, devices=1)
        return time.perf_counter() - t0, timer.seconds

    times["ref_train_total"], ref_epochs = fit(model, args.epochs_ref)
    times["ref_epoch_median"] = statistics.median(ref_epochs)

    t = time.perf_counter()
    ref_latent = model.get_latent_representation()
    times["latent_ref"] = time.perf_counter() - t

    with tempfile.TemporaryDirectory() as tmp:
        ref_dir = os.path.join(tmp, "ref")
        t = time.perf_counter()
        model.save(ref_dir, overwrite=True)
        times["save_ref"] = time.perf_counter() - t
        elbo_ref = _last(model.history, "elbo_validation")
        # every reference cell, the same cells for both tools; scvi-tools' get_elbo returns the ELBO itself
        # (negative), atlasmap and the history report its negative (lower is better)
        elbo_ref_all = -float(model.get_elbo())
        del model

        t = time.perf_counter()
        qmodel = scvi.model.SCVI.load_query_data(query, ref_dir, accelerator=accelerator)
        times["surgery"] = time.perf_counter() - t

    times["query_train_total"], query_epochs = fit(qmodel, args.epochs_query)
    times["query_epoch_median"] = statistics.median(query_epochs)

    t = time.perf_counter()
    query_latent = qmodel.get_latent_representation()
    times["latent_query"] = time.perf_counter() - t

    n_norm = min(args.normalized_cells, query.n_obs)
    t = time.perf_counter()
    qmodel.get_normalized_expression(indices=np.arange(n_norm), library_size=1.0)
    times["normalized_query"] = time.perf_counter() - t

    n_ref, n_query = ref.n_obs, query.n_obs
    result = {
        "tool": "scvi-tools",
        "version": scvi.__version__,
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
        "elbo_validation_query": _last(qmodel.history, "elbo_validation"),
        "elbo_all_ref": elbo_ref_all,
        "elbo_all_query": -float(qmodel.get_elbo()),
        "knn_accuracy": None,
        "peak_rss_mb": peak_rss_mb(),
        "peak_gpu_mb": peak_gpu_mb(),
        "device": device_name(args.device),
        "wall_total_s": time.perf_counter() - T_START,
    }
    if args.labels_key:
        result["knn_accuracy"] = knn_accuracy(ref_latent, ref.obs[args.labels_key].astype(str), query_latent,
                                              query.obs[args.labels_key].astype(str))
    text = json.dumps(result, indent=1)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)
    else:
        print(text)
    return result


def _last(history, key: str) -> float | None:  # noqa: ANN001
    if not history or key not in history:
        return None
    values = history[key].to_numpy().ravel()
    return float(values[-1]) if values.size else None


if __name__ == "__main__":
    main()
