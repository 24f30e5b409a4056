"""totalVI reference mapping with missing proteins: atlasmap vs scvi-tools 1.4.2 on the same split.

Data: ``../shared/data/pbmc_citeseq_5k10k_tiny`` (10x CITE-seq PBMC, two runs x 200 cells, 14 proteins).
The reference is the 10k run; the query is the 5k run, mapped by scArches surgery

* with half of the proteins removed (both complementary halves: every other protein, then the others),
  scoring the imputed values of the held-out half against their measured counts;
* with all proteins removed (an RNA-only query), scoring all 14 imputed proteins.

Score: Pearson r between log1p(imputed) and log1p(measured) across query cells, per protein, averaged.
Both tools get the same genes (highly variable genes of the whole file), the same architecture
(scvi-tools' totalVI defaults with layer norm instead of batch norm, the scArches recommendation), the
same optimisation (Adam lr 4e-3, batch 256, 90 % training split, KL warm-up over 0.75 n_cells steps,
no early stopping, no LR schedule) and the same posterior averaging (25 samples). scvi-tools runs in its
own interpreter (``/work/scvi_venv/bin/python benchmarks/peer_totalvi.py``); when that is absent its rows
are skipped with a message.

Usage::

    python benchmarks/bench_totalvi.py [--epochs-ref 200] [--epochs-query 200] [--n-top-genes 2000]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "pbmc_citeseq_5k10k_tiny" / "pbmc_citeseq_5k10k_tiny.h5ad"
PEER_PYTHON = Path("/work/scvi_venv/bin/python")
REF_BATCH = "pbmc_10k_protein_v3"
KEY = "protein_expression"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=Path(os.environ.get("ATLASMAP_CITESEQ", DATA)))
    p.add_argument("--peer-python", type=Path, default=PEER_PYTHON)
    p.add_argument("--epochs-ref", type=int, default=200)
    p.add_argument("--epochs-query", type=int, default=200)
    p.add_argument("--n-top-genes", type=int, default=2000)
    p.add_argument("--n-samples", type=int, default=25)
    p.add_argument("--threads", type=int, default=1, help="torch threads of each tool (the same for both)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-peer", action="store_true")
    p.add_argument("--json", type=Path, default=None, help="also write both records here")
    return p.parse_args(argv)


def prepare(path: Path, n_top_genes: int) -> object:
    """The file restricted to highly variable genes (Seurat flavour on log-normalised counts)."""
    import anndata as ad
    import scanpy as sc

    adata = ad.read_h5ad(path)
    log = adata.copy()
    sc.pp.normalize_total(log, target_sum=1e4)
    sc.pp.log1p(log)
    sc.pp.highly_variable_genes(log, n_top_genes=n_top_genes, flavor="seurat")
    return adata[:, log.var["highly_variable"].to_numpy()].copy()


def scenarios(proteins: list[str]) -> dict[str, list[str]]:
    return {"half_a": proteins[1::2], "half_b": proteins[0::2], "rna_only": list(proteins)}


def protein_correlation(imputed: np.ndarray, measured: np.ndarray) -> np.ndarray:
    """Pearson r per protein between log1p(imputed) and log1p(measured) across cells."""
    a, b = np.log1p(imputed.astype(np.float64)), np.log1p(measured.astype(np.float64))
    a, b = a - a.mean(0), b - b.mean(0)
    return (a * b).sum(0) / np.sqrt((a**2).sum(0) * (b**2).sum(0))


def run_atlasmap(adata: object, args: argparse.Namespace) -> dict:
    import torch

    import atlasmap
    from atlasmap import TOTALVI

    torch.set_num_threads(args.threads)
    is_ref = (adata.obs["batch"].astype(str) == REF_BATCH).to_numpy()
    ref, query = adata[is_ref].copy(), adata[~is_ref].copy()
    measured = query.obsm[KEY]
    train = {"progress_bar": False, "seed": args.seed}
    t0 = time.perf_counter()
    reference = TOTALVI(ref, protein_expression_obsm_key=KEY, batch_key="batch", seed=args.seed)
    reference.train(args.epochs_ref, **train)
    record = {"tool": f"atlasmap {atlasmap.__version__}", "ref_train_seconds": time.perf_counter() - t0,
              "scenarios": {}}
    z_ref = reference.get_latent_representation(ref)
    for name, held_out in scenarios(list(measured.columns)).items():
        q = query.copy()
        kept = [p for p in measured.columns if p not in held_out]
        if kept:
            q.obsm[KEY] = measured[kept].copy()
        else:
            del q.obsm[KEY]
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            model = TOTALVI.load_query_data(q, reference, seed=args.seed)
            model.train(args.epochs_query, **train)
            map_seconds = time.perf_counter() - t0
            _, imputed = model.get_normalized_expression(q, n_samples=args.n_samples, seed=args.seed)
            drift = float(np.abs(model.get_latent_representation(ref) - z_ref).max())
        r = protein_correlation(imputed[held_out].to_numpy(), measured[held_out].to_numpy())
        record["scenarios"][name] = {"map_seconds": map_seconds, "held_out": list(held_out),
                                     "r_per_protein": [float(v) for v in r], "mean_r": float(np.mean(r)),
                                     "ref_latent_max_abs_change": drift}
    return record


def run_peer(data_file: Path, proteins: list[str], args: argparse.Namespace) -> dict | None:
    if args.skip_peer:
        print("scvi-tools: skipped (--skip-peer)")
        return None
    if not args.peer_python.is_file():
        print(f"scvi-tools: skipped ({args.peer_python} not found; point --peer-python at an interpreter with "
              "scvi-tools 1.4.2)")
        return None
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "peer.json"
        cmd = [str(args.peer_python), str(Path(__file__).with_name("peer_totalvi.py")), "--data", str(data_file),
               "--protein-key", KEY, "--ref-batch", REF_BATCH, "--scenarios", json.dumps(scenarios(proteins)),
               "--epochs-ref", str(args.epochs_ref), "--epochs-query", str(args.epochs_query),
               "--n-samples", str(args.n_samples), "--seed", str(args.seed), "--threads", str(args.threads),
               "--out", str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"scvi-tools: failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
            return None
        return json.loads(out.read_text())


def print_table(records: list[dict], proteins: list[str]) -> None:
    header = (f"{'tool':<18} {'ref train s':>11} {'map s/query':>11} {'r half (held-out)':>17} "
              f"{'r RNA-only':>10} {'ref latent max|dz|':>18}")
    print(header)
    print("-" * len(header))
    for rec in records:
        sc = rec["scenarios"]
        half = np.mean([sc["half_a"]["mean_r"], sc["half_b"]["mean_r"]])
        map_s = np.mean([s["map_seconds"] for s in sc.values()])
        drift = max(s["ref_latent_max_abs_change"] for s in sc.values())
        print(f"{rec['tool']:<18} {rec['ref_train_seconds']:>11.1f} {map_s:>11.1f} {half:>17.3f} "
              f"{sc['rna_only']['mean_r']:>10.3f} {drift:>18.3g}")
    print()
    print("per protein, r of imputed vs measured (half: from the query run that held it out | RNA-only):")
    print(f"{'protein':<18}" + "".join(f" {rec['tool'].split()[0] + ' ' + k:>21}" for rec in records
                                       for k in ("half", "RNA-only")))
    for i, protein in enumerate(proteins):
        row = f"{protein:<18}"
        for rec in records:
            sc = rec["scenarios"]
            half_run = "half_a" if protein in sc["half_a"]["held_out"] else "half_b"
            r_half = sc[half_run]["r_per_protein"][sc[half_run]["held_out"].index(protein)]
            row += f" {r_half:>21.3f} {sc['rna_only']['r_per_protein'][i]:>21.3f}"
        print(row)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.data.is_file():
        print(f"data file {args.data} is absent; set ATLASMAP_CITESEQ or --data")
        return 1
    adata = prepare(args.data, args.n_top_genes)
    proteins = [str(p) for p in adata.obsm[KEY].columns]
    print(f"{adata.n_obs} cells x {adata.n_vars} HVGs, {len(proteins)} proteins; reference {REF_BATCH}, "
          f"query the other run; {args.epochs_ref}/{args.epochs_query} epochs, {args.threads} torch thread(s)\n")
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        data_file = Path(tmp) / "citeseq_hvg.h5ad"
        adata.write_h5ad(data_file)
        peer = run_peer(data_file, proteins, args)
    records.append(run_atlasmap(adata, args))
    if peer is not None:
        records.append(peer)
    print()
    print_table(records, proteins)
    if args.json:
        args.json.write_text(json.dumps(records, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
