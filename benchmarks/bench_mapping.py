"""atlasmap vs scvi-tools, side by side: reference training, scArches query mapping, inference, memory.

Each tool runs the same workload in its own subprocess (so peak RSS is per tool):
``run_atlasmap.py`` with this interpreter, ``peer_scvi_tools.py`` with ``--peer-python`` (default
``/work/scvi_venv/bin/python`` when it exists; scvi-tools is never a dependency of atlasmap). Without a
peer interpreter only atlasmap runs and the table says so.

Workloads::

    python benchmarks/bench_mapping.py --workload kang        # shared Kang split: ref=ctrl, query=stim, 100+100 epochs
    python benchmarks/bench_mapping.py --workload synthetic   # 20,000 cells x 2,000 genes x 4 batches, ref = 3 batches
    python benchmarks/bench_mapping.py --workload scaling     # 100,000-cell set: cells 5k..100k, genes 2k/5k/20k
    python benchmarks/bench_mapping.py --workload kang --device cuda   # both tools on the same GPU
                                                                       # (scvi-tools: accelerator="gpu")

Settings shared by both tools: scArches-tutorial architecture (n_layers=2, n_latent=30, n_hidden=128,
layer norm, no batch norm, covariates encoded and deeply injected), ZINB, gene dispersion, batch size
128, train_size 0.9, Adam lr 1e-3, no early stopping, seed 0. Results go to ``benchmarks/results/``
as JSON, and markdown tables are printed. Per-epoch numbers are medians (the machine is noisy).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DATA_DIR = RESULTS / "data"
KANG = Path(os.environ.get("ATLASMAP_SHARED_DATA", HERE.parent.parent / "shared" / "data")) / \
    "kang2018_ifnb_scgen_valid" / "kang2018_ifnb_scgen_valid_counts.h5ad"
DEFAULT_PEER = "/work/scvi_venv/bin/python"

TARGETS = {
    "ref_speed": 3.0,     # reference training cells/s, atlasmap / scvi-tools
    "query_speed": 5.0,   # query mapping end to end, scvi-tools time / atlasmap time
    "memory": 1.0,        # peak RSS atlasmap / scvi-tools, at most
    "import_s": 2.0,      # `import atlasmap`
    "inference": 50_000,  # latent / normalised expression cells/s
    "elbo_rel": 0.01,     # |ELBO_atlasmap / ELBO_scvi - 1|
}


# ---------------------------------------------------------------------------------------------- data
def synthetic_file(n_cells: int, n_genes: int, *, chunk: int = 5_000) -> Path:
    """Seeded NB set with 4 batches and 8 cell types (atlasmap.datasets.simulate_counts), cached as h5ad."""
    path = DATA_DIR / f"synthetic_{n_cells}x{n_genes}_seed0.h5ad"
    if path.exists():
        return path
    import anndata as ad
    import scipy.sparse as sp

    from atlasmap.datasets import simulate_counts, simulation_programs

    DATA_DIR.mkdir(parents=True, exist_ok=True)
    programs = simulation_programs(n_genes, 4, 8, 0.5, 0)
    parts = [simulate_counts(min(chunk, n_cells - lo), n_genes, n_batches=4, n_cell_types=8, seed=0,
                             start_cell=lo, programs=programs) for lo in range(0, n_cells, chunk)]
    adata = parts[0] if len(parts) == 1 else ad.AnnData(
        sp.vstack([p.X for p in parts], format="csr"),
        obs=__import__("pandas").concat([p.obs for p in parts]), var=parts[0].var)
    tmp = path.with_suffix(".tmp.h5ad")
    adata.write_h5ad(tmp)
    tmp.rename(path)
    return path


# ---------------------------------------------------------------------------------------------- running
def run_tool(tool: str, python: str, data: Path, args: argparse.Namespace, extra: list[str], tag: str) -> dict | None:
    script = HERE / ("run_atlasmap.py" if tool == "atlasmap" else "peer_scvi_tools.py")
    out = RESULTS / f"raw_{tag}_{tool}.json"
    log = RESULTS / f"raw_{tag}_{tool}.log"
    cmd = [python, str(script), "--data", str(data), "--out", str(out), *extra]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    cmd += ["--device", args.device]
    print(f"  running {tool}: {' '.join(cmd)}", file=sys.stderr, flush=True)
    t = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, check=False)
    if proc.returncode != 0:
        print(f"  {tool} FAILED (exit {proc.returncode}); see {log}", file=sys.stderr)
        return None
    print(f"  {tool} done in {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
    return json.loads(out.read_text())


def import_times(python: str, module: str, repeats: int = 3) -> float:
    code = f"import time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"
    values = []
    for _ in range(repeats):
        res = subprocess.run([python, "-c", code], capture_output=True, text=True, check=False)
        if res.returncode == 0:
            values.append(float(res.stdout.strip().splitlines()[-1]))
    return statistics.median(values) if values else float("nan")


def machine() -> dict:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "?"
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem = f"{int(Path('/proc/meminfo').read_text().split()[1]) / 1024**2:.0f} GB"
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "memory": mem, "load_average_at_start": os.getloadavg(),
            "python": platform.python_version(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(), "gpu": gpu, "cuda": torch.version.cuda}


# ---------------------------------------------------------------------------------------------- tables
def _fmt(v: float | None, digits: int = 2) -> str:
    if v is None:
        return "–"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.{digits}f}"


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def comparison_table(a: dict, s: dict | None, imports: dict) -> str:
    """Markdown: one row per metric, atlasmap | scvi-tools | ratio | target."""
    s = s or {}
    at, st = a["times"], s.get("times", {})
    ac, sc = a["cells_per_s"], s.get("cells_per_s", {})
    rows = []

    def row(name: str, av: float | None, sv: float | None, ratio: float | None, target: str = "", d: int = 2) -> None:
        rows.append(f"| {name} | {_fmt(av, d)} | {_fmt(sv, d)} | {_fmt(ratio) + 'x' if ratio else '–'} | {target} |")

    row("reference training, cells/s (epoch median)", ac["ref_train_epoch_median"], sc.get("ref_train_epoch_median"),
        _ratio(ac["ref_train_epoch_median"], sc.get("ref_train_epoch_median")), "≥ 3x")
    row("reference training, cells/s (total incl. setup of loop)", ac["ref_train"], sc.get("ref_train"),
        _ratio(ac["ref_train"], sc.get("ref_train")), "≥ 3x")
    row("reference epoch, s (median)", at["ref_epoch_median"], st.get("ref_epoch_median"),
        _ratio(st.get("ref_epoch_median"), at["ref_epoch_median"]), "", 3)
    row("reference training total, s", at["ref_train_total"], st.get("ref_train_total"),
        _ratio(st.get("ref_train_total"), at["ref_train_total"]))
    row("query mapping end to end, s (load ref + surgery + train + latent)", a["query_end_to_end_s"],
        s.get("query_end_to_end_s"), _ratio(s.get("query_end_to_end_s"), a["query_end_to_end_s"]), "≥ 5x faster")
    row("  load reference + surgery, s", at["surgery"], st.get("surgery"), _ratio(st.get("surgery"), at["surgery"]),
        "", 3)
    row("  query training, cells/s (epoch median)", ac["query_train_epoch_median"],
        sc.get("query_train_epoch_median"), _ratio(ac["query_train_epoch_median"], sc.get("query_train_epoch_median")))
    row("  query epoch, s (median)", at["query_epoch_median"], st.get("query_epoch_median"),
        _ratio(st.get("query_epoch_median"), at["query_epoch_median"]), "", 3)
    row("  query latent, s", at["latent_query"], st.get("latent_query"),
        _ratio(st.get("latent_query"), at["latent_query"]), "", 3)
    row("load data, s", at["load"], st.get("load"), None, "", 3)
    row("setup, s", at["setup"], st.get("setup"), None, "", 3)
    row("latent inference, cells/s", ac["latent"], sc.get("latent"), _ratio(ac["latent"], sc.get("latent")),
        "≥ 50,000")
    row("normalised expression, cells/s", ac["normalized"], sc.get("normalized"),
        _ratio(ac["normalized"], sc.get("normalized")), "≥ 50,000")
    row("peak RSS, MB", a["peak_rss_mb"], s.get("peak_rss_mb"), _ratio(a["peak_rss_mb"], s.get("peak_rss_mb")),
        "≤ 1x", 0)
    if a.get("peak_gpu_mb") is not None:
        row("peak GPU memory (allocated by PyTorch), MB", a["peak_gpu_mb"], s.get("peak_gpu_mb"),
            _ratio(a["peak_gpu_mb"], s.get("peak_gpu_mb")), "", 0)
    row("import, s (`import atlasmap` / `import scvi`)", imports.get("atlasmap"), imports.get("scvi"), None, "< 2 s")
    row("import with torch + model code, s", imports.get("atlasmap_full"), None, None, "", 2)
    for key, label in (("elbo_validation_ref", "validation ELBO / cell, reference (each tool's own split)"),
                       ("elbo_validation_query", "validation ELBO / cell, query (each tool's own split)"),
                       ("elbo_all_ref", "ELBO / cell, all reference cells (same cells)"),
                       ("elbo_all_query", "ELBO / cell, all query cells (same cells)")):
        av, sv = a.get(key), s.get(key)
        rel = None if av is None or sv is None else av / sv
        rows.append(f"| {label} | {_fmt(av, 2)} | {_fmt(sv, 2)} | {_fmt(rel, 4) + 'x' if rel else '–'} | "
                    f"within 1% (lower is better) |")
    if a.get("knn_accuracy") is not None:
        rows.append(f"| kNN label transfer accuracy (k=15) | {a['knn_accuracy']:.4f} | "
                    f"{_fmt(s.get('knn_accuracy'), 4)} | – | no worse |")
    head = "| metric | atlasmap | scvi-tools | ratio | target |\n|---|---:|---:|---:|---|\n"
    return head + "\n".join(rows)


def scaling_table(runs: list[dict]) -> str:
    head = ("| cells | genes | atlasmap ref cells/s | scvi-tools ref cells/s | speed ratio | atlasmap query e2e s | "
            "scvi-tools query e2e s | query ratio | atlasmap peak MB | scvi-tools peak MB | memory ratio |\n"
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
    rows = []
    for r in runs:
        a, s = r.get("atlasmap"), r.get("scvi-tools") or {}
        if not a:
            continue
        ar, sr = a["cells_per_s"]["ref_train_epoch_median"], s.get("cells_per_s", {}).get("ref_train_epoch_median")
        rows.append(
            f"| {r['n_cells']:,} | {r['n_genes']:,} | {_fmt(ar)} | {_fmt(sr)} | {_fmt(_ratio(ar, sr))} | "
            f"{_fmt(a['query_end_to_end_s'])} | {_fmt(s.get('query_end_to_end_s'))} | "
            f"{_fmt(_ratio(s.get('query_end_to_end_s'), a['query_end_to_end_s']))} | {_fmt(a['peak_rss_mb'], 0)} | "
            f"{_fmt(s.get('peak_rss_mb'), 0)} | {_fmt(_ratio(a['peak_rss_mb'], s.get('peak_rss_mb')))} |")
    return head + "\n".join(rows)


# ---------------------------------------------------------------------------------------------- main
def default_peer() -> str | None:
    """scvi-tools' interpreter: this one when scvi-tools is importable here (the ``bench`` extra), else the
    separate virtualenv used on the development machine, else none (the peer is then skipped)."""
    import importlib.util

    if importlib.util.find_spec("scvi") is not None:
        return sys.executable
    return DEFAULT_PEER if os.path.exists(DEFAULT_PEER) else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", choices=["kang", "synthetic", "scaling"], required=True)
    p.add_argument("--peer-python", default=default_peer(),
                   help="interpreter with scvi-tools (default: this one if `pip install -e .[bench]` put scvi-tools "
                        "here, else /work/scvi_venv/bin/python when it exists)")
    p.add_argument("--tools", nargs="+", default=["atlasmap", "scvi-tools"], choices=["atlasmap", "scvi-tools"])
    p.add_argument("--epochs-ref", type=int, default=None)
    p.add_argument("--epochs-query", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda: both tools train and infer there "
                                                   "(scvi-tools with accelerator='gpu')")
    p.add_argument("--seed", type=int, default=0, help="seed of both tools' training (run several for quality)")
    p.add_argument("--scaling", nargs="+", default=["100000x2000", "20000x5000", "20000x20000", "100000x5000"],
                   help="CELLSxGENES configurations of --workload scaling")
    p.add_argument("--batch-size", type=int, default=128, help="minibatch size of both tools (default 128)")
    p.add_argument("--sizes", nargs="+", default=None,
                   help="cells x genes of the synthetic workload (default 20000x2000), e.g. 100000x2000")
    p.add_argument("--tag", default=None, help="suffix of the result files (default: the workload)")
    args = p.parse_args()

    RESULTS.mkdir(parents=True, exist_ok=True)
    tag = args.tag or args.workload
    peer = args.peer_python
    tools = list(args.tools)
    if "scvi-tools" in tools and (not peer or not os.path.exists(peer)):
        print(f"scvi-tools peer skipped: no interpreter with scvi-tools at {peer!r} "
              "(pass --peer-python /path/to/python of an environment with scvi-tools installed).", file=sys.stderr)
        tools.remove("scvi-tools")

    imports = {"atlasmap": import_times(sys.executable, "atlasmap"),
               "atlasmap_full": import_times(sys.executable, "atlasmap.models.scvi")}
    if "scvi-tools" in tools:
        imports["scvi"] = import_times(peer, "scvi")

    arch = ["--n-layers", "2", "--n-latent", "30", "--n-hidden", "128", "--batch-size", str(args.batch_size), "--seed", str(args.seed)]
    configs = []
    if args.workload == "kang":
        if not KANG.exists():
            sys.exit(f"Kang data not found at {KANG}; set ATLASMAP_SHARED_DATA to the shared data folder.")
        configs.append(dict(data=KANG, n_cells=None, n_genes=None, epochs=(100, 100),
                            extra=["--batch-key", "batch", "--ref-batches", "ctrl", "--query-batches", "stim",
                                   "--labels-key", "cell_type"]))
    else:
        sizes = (args.sizes or ["20000x2000"]) if args.workload == "synthetic" else args.scaling
        epochs = (20, 20) if args.workload == "synthetic" else (2, 2)
        for size in sizes:
            n_cells, n_genes = (int(v) for v in size.split("x"))
            configs.append(dict(data=None, n_cells=n_cells, n_genes=n_genes, epochs=epochs,
                                extra=["--batch-key", "batch", "--ref-batches", "batch0", "batch1", "batch2",
                                       "--query-batches", "batch3", "--labels-key", "cell_type"]))

    report = {"workload": args.workload, "device": args.device, "machine": machine(), "imports": imports, "runs": []}
    for cfg in configs:
        data = cfg["data"] or synthetic_file(cfg["n_cells"], cfg["n_genes"])
        e_ref = args.epochs_ref or cfg["epochs"][0]
        e_query = args.epochs_query or cfg["epochs"][1]
        extra = [*cfg["extra"], *arch, "--epochs-ref", str(e_ref), "--epochs-query", str(e_query)]
        run_tag = f"{tag}_{cfg['n_cells']}x{cfg['n_genes']}" if cfg["n_cells"] else tag
        print(f"[{run_tag}] {data}", file=sys.stderr, flush=True)
        run = {"data": str(data), "n_cells": cfg["n_cells"], "n_genes": cfg["n_genes"], "epochs_ref": e_ref,
               "epochs_query": e_query}
        for tool in tools:  # sequentially: never two heavy runs at once
            run[tool] = run_tool(tool, sys.executable if tool == "atlasmap" else peer, data, args, extra, run_tag)
        if run.get("atlasmap"):
            run["n_cells"] = run["atlasmap"]["n_ref"] + run["atlasmap"]["n_query"]
            run["n_genes"] = run["atlasmap"]["n_genes"]
        report["runs"].append(run)
        out = RESULTS / f"{tag}.json"
        out.write_text(json.dumps(report, indent=1))

    m = report["machine"]
    print(f"\n## {args.workload}: atlasmap vs scvi-tools\n")
    print(f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory']}; Python {m['python']}, torch {m['torch']} "
          f"({m['torch_threads']} threads); device {args.device}"
          f"{' (' + m['gpu'] + ', CUDA ' + str(m['cuda']) + ')' if m.get('gpu') else ''}.\n")
    for run in report["runs"]:
        a = run.get("atlasmap")
        if not a:
            print(f"atlasmap run failed for {run['data']}")
            continue
        print(f"### {a['n_ref']:,} reference + {a['n_query']:,} query cells x {a['n_genes']:,} genes; "
              f"{run['epochs_ref']} + {run['epochs_query']} epochs\n")
        if "scvi-tools" not in tools:
            print("(scvi-tools not run: no peer interpreter)\n")
        print(comparison_table(a, run.get("scvi-tools"), imports))
        print()
    if args.workload == "scaling":
        print("### scaling\n")
        print(scaling_table(report["runs"]))
    print(f"\nResults: {RESULTS / (tag + '.json')}")


if __name__ == "__main__":
    main()
