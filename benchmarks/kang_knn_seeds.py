"""Kang kNN label transfer over several seeds, atlasmap vs scvi-tools, and the cross check that separates
reference training from surgery: atlasmap's surgery + query training on scvi-tools' own reference.

Same settings as ``bench_mapping.py --workload kang`` (scArches architecture, 100 + 100 epochs, batch 128,
validation in the last epoch), kNN (k=15) from reference labels to query cells in the latent::

    python benchmarks/kang_knn_seeds.py --seeds 0 1 2 3 4 5 [--peer-python /path/to/scvi-tools/python]

Each (tool, seed) runs in its own process; scvi-tools runs under ``--peer-python`` (default as in
bench_mapping.py) and saves its reference so atlasmap can import it for the cross check.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_mapping import KANG, default_peer  # noqa: E402
from peer_scvi_tools import knn_accuracy  # noqa: E402

ARCH = dict(n_layers=2, n_latent=30, n_hidden=128, dropout_rate=0.1, gene_likelihood="zinb", dispersion="gene",
            encode_covariates=True, deeply_inject_covariates=True, use_layer_norm="both", use_batch_norm="none")
EPOCHS = 100


def split():  # noqa: ANN201
    import anndata as ad

    adata = ad.read_h5ad(KANG)
    return adata[adata.obs["batch"] == "ctrl"].copy(), adata[adata.obs["batch"] == "stim"].copy()


def labels(adata):  # noqa: ANN001, ANN201
    return adata.obs["cell_type"].astype(str)


def run_atlasmap(seed: int, scvi_reference: str | None) -> dict:
    import atlasmap

    ref, query = split()
    kw = dict(max_epochs=EPOCHS, progress_bar=False, seed=seed, check_val_every_n_epoch=EPOCHS)
    out = {}
    model = atlasmap.SCVI(ref, batch_key="batch", seed=seed, **ARCH)
    model.train(**kw)
    q = atlasmap.SCVI.load_query_data(query, model, seed=seed)
    q.train(**kw)
    out["knn"] = knn_accuracy(model.get_latent_representation(), labels(ref), q.get_latent_representation(),
                              labels(query))
    if scvi_reference:  # surgery + query training of atlasmap on scvi-tools' reference
        imported = atlasmap.SCVI.from_scvi_tools(scvi_reference, ref)
        q = atlasmap.SCVI.load_query_data(query, imported, seed=seed)
        q.train(**kw)
        out["knn_on_scvi_reference"] = knn_accuracy(imported.get_latent_representation(), labels(ref),
                                                    q.get_latent_representation(), labels(query))
    return out


def run_scvi(seed: int, save_reference: str | None) -> dict:
    import scvi

    scvi.settings.seed = seed
    ref, query = split()
    scvi.model.SCVI.setup_anndata(ref, batch_key="batch")
    model = scvi.model.SCVI(ref, **ARCH)
    kw = dict(max_epochs=EPOCHS, train_size=0.9, batch_size=128, early_stopping=False, enable_progress_bar=False,
              enable_checkpointing=False, check_val_every_n_epoch=EPOCHS, accelerator="cpu", devices=1)
    model.train(**kw)
    z_ref = model.get_latent_representation()
    with tempfile.TemporaryDirectory() as tmp:
        path = save_reference or os.path.join(tmp, "ref")
        model.save(path, overwrite=True, save_anndata=False)
        q = scvi.model.SCVI.load_query_data(query, path, accelerator="cpu")
    q.train(**kw)
    return {"knn": knn_accuracy(z_ref, labels(ref), q.get_latent_representation(), labels(query))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--peer-python", default=default_peer())
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--worker", choices=["atlasmap", "scvi-tools"], help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    p.add_argument("--reference-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        run = run_atlasmap if args.worker == "atlasmap" else run_scvi
        print(json.dumps(run(args.seed, args.reference_dir)))
        return
    if not KANG.exists():
        sys.exit(f"Kang data not found at {KANG}; set ATLASMAP_SHARED_DATA to the shared data folder.")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            row = {"seed": seed}
            ref_dir = os.path.join(tmp, f"scvi_ref_{seed}") if args.peer_python else None
            if args.peer_python:
                row["scvi-tools"] = _worker(args.peer_python, "scvi-tools", seed, ref_dir, args.threads)["knn"]
            res = _worker(sys.executable, "atlasmap", seed, ref_dir, args.threads)
            row["atlasmap"] = res["knn"]
            row["atlasmap_on_scvi_reference"] = res.get("knn_on_scvi_reference")
            rows.append(row)
            print(row, flush=True)
    print("\n| seed | atlasmap | scvi-tools | atlasmap surgery on scvi-tools' reference |\n|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['seed']} | {r['atlasmap']:.3f} | {_f(r.get('scvi-tools'))} | {_f(r.get('atlasmap_on_scvi_reference'))} |")
    for key in ("atlasmap", "scvi-tools", "atlasmap_on_scvi_reference"):
        values = [r[key] for r in rows if r.get(key) is not None]
        if values:
            print(f"mean {key}: {sum(values) / len(values):.3f} over {len(values)} seeds")


def _worker(python: str, tool: str, seed: int, ref_dir: str | None, threads: int) -> dict:
    cmd = [python, __file__, "--worker", tool, "--seed", str(seed), "--threads", str(threads)]
    if ref_dir:
        cmd += ["--reference-dir", ref_dir]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _f(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


if __name__ == "__main__":
    main()
