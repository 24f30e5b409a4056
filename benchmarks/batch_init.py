"""New batches started at random (scArches) vs from the closest reference batch, on the Kang split.

For each seed: one reference (ctrl cells, scArches architecture, 100 epochs), then for each start: query
mapping (stim cells) with 0, 10 and 100 query epochs (fresh surgery each time, so each run has its own KL
warm-up exactly as a user's would), the negative ELBO of all query cells and kNN (k=15) label-transfer
accuracy; plus, from the 100-epoch run's per-epoch validation ELBO, the epochs each start needs to come
within 0.5 % of the random start's final validation ELBO::

    python benchmarks/batch_init.py --seeds 0 1 2 --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_mapping import KANG  # noqa: E402
from peer_scvi_tools import knn_accuracy  # noqa: E402

ARCH = dict(n_layers=2, n_latent=30, n_hidden=128, dropout_rate=0.1, gene_likelihood="zinb", dispersion="gene",
            use_layer_norm="both", use_batch_norm="none")
EPOCHS = (0, 10, 100)


def _epochs_to(history: dict, target: float, tolerance: float = 0.005) -> int | None:
    for epoch, value in zip(history["epoch"], history["elbo_validation"], strict=True):
        if value is not None and value <= target * (1 + tolerance):
            return int(epoch) + 1
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--ref-epochs", type=int, default=100)
    p.add_argument("--out", default=str(HERE / "results" / "batch_init.json"))
    args = p.parse_args()
    import anndata as ad
    import torch

    import atlasmap

    if args.threads:
        torch.set_num_threads(args.threads)
    adata = ad.read_h5ad(KANG)
    ref = adata[adata.obs["batch"] == "ctrl"].copy()
    query = adata[adata.obs["batch"] == "stim"].copy()
    runs = []
    for seed in args.seeds:
        t0 = time.perf_counter()
        reference = atlasmap.SCVI(ref, batch_key="batch", seed=seed, **ARCH)
        reference.train(args.ref_epochs, seed=seed, progress_bar=False, device="cpu")
        z_ref = reference.get_latent_representation()
        for start in ("random", "closest"):
            for epochs in EPOCHS:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    model = atlasmap.SCVI.load_query_data(query, reference, batch_init=start, seed=seed)
                model.train(epochs, seed=seed, progress_bar=False, device="cpu")
                z = model.get_latent_representation()
                runs.append({"seed": seed, "start": start, "epochs": epochs, "elbo_query": model.get_elbo(),
                             "knn_accuracy": knn_accuracy(z_ref, ref.obs["cell_type"].astype(str), z,
                                                          query.obs["cell_type"].astype(str)),
                             "history": {k: list(v) for k, v in model.history.items()} if epochs else {}})
        print(f"seed {seed}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    for seed in args.seeds:
        final = [r for r in runs if r["seed"] == seed and r["epochs"] == EPOCHS[-1]]
        target = next(r for r in final if r["start"] == "random")["history"]["elbo_validation"][-1]
        for r in final:
            r["epochs_to_random_final"] = _epochs_to(r["history"], target)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(runs, indent=1))

    print("\n| start | query epochs | ELBO / cell, all query cells (mean over seeds) | kNN accuracy (per seed) | "
          "epochs to within 0.5 % of random's final validation ELBO |")
    print("|---|---:|---:|---|---|")
    for start in ("random", "closest"):
        for epochs in EPOCHS:
            rs = [r for r in runs if r["start"] == start and r["epochs"] == epochs]
            to = ", ".join(str(r.get("epochs_to_random_final", "–")) for r in rs) if epochs == EPOCHS[-1] else ""
            accuracies = ", ".join(f"{r['knn_accuracy']:.3f}" for r in rs)
            print(f"| {start} | {epochs} | {statistics.mean(r['elbo_query'] for r in rs):.2f} | {accuracies} (mean "
                  f"{statistics.mean(r['knn_accuracy'] for r in rs):.3f}) | {to} |")
    print(f"\nseeds {args.seeds}; reference {ref.n_obs} ctrl cells ({args.ref_epochs} epochs), query {query.n_obs} "
          f"stim cells; results: {args.out}")


if __name__ == "__main__":
    main()
