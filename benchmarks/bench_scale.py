"""Scaling benchmark: map simulated queries of growing size, in memory vs backed (streamed from disk).

For each query size the data are simulated chunk by chunk straight to an ``.h5ad`` (CSR), then each mode
maps it in a fresh process (so peak RSS is that run's own): load, surgery (incl. validation), query
training, latent written to an output file. Printed per run: wall time per phase, training cells/s,
end-to-end cells/s and peak RSS; then the backed / in-memory throughput ratio and a plot of peak RSS vs
number of cells.

    python benchmarks/bench_scale.py --cells 30000 100000 300000 --backed-only 1000000 --epochs 1 \\
        --workdir /tmp/atlasmap_scale --plot docs/scale_rss.png

Data files (~5 GB per million cells at 2,000 genes) go to ``--workdir`` and are reused between runs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REF_CELLS = 20_000
ARCH = {"n_layers": 2, "n_latent": 30, "n_hidden": 128}  # the scArches tutorial architecture


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _query_path(workdir: Path, n_cells: int, n_genes: int) -> Path:
    return workdir / f"query_{n_cells}x{n_genes}.h5ad"


def prepare(workdir: Path, sizes: list[int], n_genes: int, ref_epochs: int) -> Path:
    """Simulate the reference (in memory) and train it once; simulate each query file once."""
    import anndata as ad

    import atlasmap
    from atlasmap.datasets import write_simulated_h5ad

    workdir.mkdir(parents=True, exist_ok=True)
    common = {"n_batches": 4, "n_cell_types": 10, "seed": 0}
    ref_dir = workdir / f"reference_{n_genes}"
    if not ref_dir.exists():
        ref_file = write_simulated_h5ad(workdir / f"reference_{n_genes}.h5ad", REF_CELLS, n_genes, batches=[0, 1],
                                        overwrite=True, **common)
        t0 = time.perf_counter()
        model = atlasmap.SCVI(ad.read_h5ad(ref_file), batch_key="batch", **ARCH)
        model.train(ref_epochs, progress_bar=False)
        model.save(ref_dir)
        print(f"# reference: {REF_CELLS} cells, {ref_epochs} epochs in {time.perf_counter() - t0:.0f} s", flush=True)
    for n in sizes:
        path = _query_path(workdir, n, n_genes)
        if not path.exists():
            t0 = time.perf_counter()
            write_simulated_h5ad(path, n, n_genes, batches=[2, 3], chunk_size=20_000, **common)
            print(f"# simulated {n:,} cells -> {path} ({path.stat().st_size / 1e9:.2f} GB) in "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
    return ref_dir


def run_one(mode: str, query: Path, reference: Path, epochs: int, out: Path, chunk_size: int,
            shuffle_chunks: int, prefetch: bool) -> dict[str, Any]:
    """One mapping run (called in a child process): returns timings and peak RSS."""
    t_start = time.perf_counter()
    import anndata as ad
    import torch

    import atlasmap
    from atlasmap.data.backed import read_backed, set_backed_options
    from atlasmap.workflow.streaming import write_latent

    set_backed_options(chunk_size=chunk_size, shuffle_chunks=shuffle_chunks, prefetch=prefetch)
    t_import = time.perf_counter()
    ref = atlasmap.load(reference)
    adata = read_backed(query) if mode == "backed" else ad.read_h5ad(query)
    t_load = time.perf_counter()
    model = type(ref).load_query_data(adata, ref)
    t_setup = time.perf_counter()
    model.train(epochs, progress_bar=False)
    t_train = time.perf_counter()
    write_latent(model, adata, out, overwrite=True)
    t_latent = time.perf_counter()
    hist = model.history
    n = int(adata.n_obs)
    n_train = int(round(n * 0.9))
    epoch_s = sorted(hist["epoch_seconds"])[len(hist["epoch_seconds"]) // 2]
    return {
        "mode": mode, "cells": n, "genes": int(adata.n_vars), "epochs": epochs, "threads": torch.get_num_threads(),
        "import_s": t_import - t_start, "load_s": t_load - t_import, "setup_s": t_setup - t_load,
        "train_s": t_train - t_setup, "epoch_s_median": epoch_s, "latent_write_s": t_latent - t_train,
        "total_s": t_latent - t_import,
        "train_cells_per_s": n_train / epoch_s,  # epoch time includes the validation pass
        "end_to_end_cells_per_s": n * epochs / (t_latent - t_import),
        "latent_cells_per_s": n / (t_latent - t_train),
        "peak_rss_mb": _peak_rss_mb(), "elbo_validation": hist.get("elbo_validation", [float("nan")])[-1],
    }


def _child(args: argparse.Namespace) -> int:
    result = run_one(args.mode, Path(args.query), Path(args.reference), args.epochs, Path(args.out), args.chunk_size,
                     args.shuffle_chunks, not args.no_prefetch)
    print("RESULT " + json.dumps(result), flush=True)
    return 0


def _spawn(mode: str, query: Path, reference: Path, args: argparse.Namespace) -> dict[str, Any] | None:
    out = Path(args.workdir) / f"mapped_{mode}_{query.stem}.h5ad"
    cmd = [sys.executable, __file__, "--child", *(["--threads", str(args.threads)] if args.threads else []),
           "--mode", mode, "--query", str(query), "--reference", str(reference),
           "--epochs", str(args.epochs), "--out", str(out), "--chunk-size", str(args.chunk_size),
           "--shuffle-chunks", str(args.shuffle_chunks)] + (["--no-prefetch"] if args.no_prefetch else [])
    try:
        env = {**os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})}
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    except subprocess.TimeoutExpired:
        print(f"# {mode} {query.name}: timed out after {args.timeout} s", flush=True)
        return None
    finally:
        out.unlink(missing_ok=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    print(f"# {mode} {query.name} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}", flush=True)
    return None


def _table(results: list[dict[str, Any]]) -> str:
    head = (f"{'mode':<7} {'cells':>9} {'load s':>7} {'setup s':>8} {'epoch s':>8} {'latent s':>9} {'total s':>8} "
            f"{'train c/s':>10} {'e2e c/s':>9} {'peak RSS':>9}")
    rows = [head, "-" * len(head)]
    for r in results:
        rows.append(f"{r['mode']:<7} {r['cells']:>9,} {r['load_s']:>7.1f} {r['setup_s']:>8.1f} "
                    f"{r['epoch_s_median']:>8.1f} {r['latent_write_s']:>9.1f} {r['total_s']:>8.1f} "
                    f"{r['train_cells_per_s']:>10,.0f} {r['end_to_end_cells_per_s']:>9,.0f} "
                    f"{r['peak_rss_mb'] / 1024:>7.2f} GB")
    return "\n".join(rows)


def plot(results: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=150)
    for mode, style in (("memory", "o-"), ("backed", "s-")):
        pts = sorted((r["cells"], r["peak_rss_mb"] / 1024) for r in results if r["mode"] == mode)
        if pts:
            ax.plot(*zip(*pts, strict=True), style, label="in memory" if mode == "memory" else "backed (streamed)")
    ax.set_xscale("log")
    ax.set_xlabel("query cells (2,000 genes)")
    ax.set_ylabel("peak RSS (GB)")
    ax.set_title("atlasmap map: peak memory vs query size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", type=int, nargs="+", default=[30_000, 100_000], help="sizes run in both modes")
    p.add_argument("--backed-only", type=int, nargs="*", default=[], help="sizes run backed only (too big for RAM)")
    p.add_argument("--genes", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--ref-epochs", type=int, default=20)
    p.add_argument("--chunk-size", type=int, default=8192)
    p.add_argument("--shuffle-chunks", type=int, default=4)
    p.add_argument("--no-prefetch", action="store_true")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads in every process (default: torch's choice, one per core)")
    p.add_argument("--workdir", default="/tmp/atlasmap_scale")
    p.add_argument("--plot", default=None, metavar="PNG")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results here")
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--query", help=argparse.SUPPRESS)
    p.add_argument("--reference", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        return _child(args)

    import platform

    workdir = Path(args.workdir)
    sizes = sorted(set(args.cells) | set(args.backed_only))
    print(f"# atlasmap scale benchmark: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; genes {args.genes}, "
          f"query epochs {args.epochs}, chunk {args.chunk_size} x {args.shuffle_chunks}", flush=True)
    reference = prepare(workdir, sizes, args.genes, args.ref_epochs)
    results = []
    for n in sizes:
        query = _query_path(workdir, n, args.genes)
        modes = ["backed"] + (["memory"] if n in args.cells else [])
        for mode in modes:
            r = _spawn(mode, query, reference, args)
            if r is not None:
                results.append(r)
                print(_table([r]).splitlines()[-1], flush=True)
    print()
    print(_table(results))
    print()
    for n in args.cells:
        mem = next((r for r in results if r["cells"] == n and r["mode"] == "memory"), None)
        bak = next((r for r in results if r["cells"] == n and r["mode"] == "backed"), None)
        if mem and bak:
            print(f"{n:,} cells: backed / in-memory — training {bak['train_cells_per_s'] / mem['train_cells_per_s']:.2f}x, "
                  f"end to end {bak['end_to_end_cells_per_s'] / mem['end_to_end_cells_per_s']:.2f}x the throughput; "
                  f"peak RSS {bak['peak_rss_mb'] / mem['peak_rss_mb']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    if args.plot:
        print(f"plot: {plot(results, Path(args.plot))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
