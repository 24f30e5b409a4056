"""Plot training throughput (cells/s) against the number of cells, atlasmap vs scvi-tools.

Reads the JSON written by ``bench_mapping.py`` in ``benchmarks/results/`` (any workload: scaling,
synthetic, kang) and writes ``docs/perf_cells_per_s.png``::

    python benchmarks/plot_perf.py [--results benchmarks/results] [--out docs/perf_cells_per_s.png]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
COLORS = {"atlasmap": "#1f77b4", "scvi-tools": "#d62728"}


def collect(results: Path) -> list[dict]:
    """One point per (workload run, tool, phase): cells, genes, cells/s."""
    points = []
    for path in sorted(results.glob("*.json")):
        if path.name.startswith(("raw_", "profile")):
            continue
        try:
            report = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        for run in report.get("runs", []):
            for tool in ("atlasmap", "scvi-tools"):
                r = run.get(tool)
                if not r:
                    continue
                for phase, n_key, rate_key in (("reference", "n_ref", "ref_train_epoch_median"),
                                               ("query", "n_query", "query_train_epoch_median")):
                    points.append({"tool": tool, "phase": phase, "workload": report.get("workload", path.stem),
                                   "cells": r[n_key], "genes": r["n_genes"], "rate": r["cells_per_s"][rate_key]})
    return points


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default=str(HERE / "results"))
    p.add_argument("--out", default=str(HERE.parent / "docs" / "perf_cells_per_s.png"))
    args = p.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = collect(Path(args.results))
    if not points:
        raise SystemExit(f"no benchmark results in {args.results}; run benchmarks/bench_mapping.py first")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    markers = {}
    for ax, phase in zip(axes, ("reference", "query"), strict=True):
        for tool in ("atlasmap", "scvi-tools"):
            by_genes: dict[int, list[tuple[int, float]]] = {}
            for pt in points:
                if pt["tool"] == tool and pt["phase"] == phase:
                    by_genes.setdefault(pt["genes"], []).append((pt["cells"], pt["rate"]))
            for genes, xy in sorted(by_genes.items()):
                xy.sort()
                marker = markers.setdefault(genes, "osD^v<>"[len(markers) % 7])
                ax.plot([c for c, _ in xy], [r for _, r in xy], marker=marker, color=COLORS[tool],
                        linestyle="-" if len(xy) > 1 else "none", label=f"{tool}, {genes:,} genes")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(f"{phase} cells")
        ax.set_title(f"{phase} training throughput (epoch median)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("cells / s (higher is better)")
    handles, labels = axes[0].get_legend_handles_labels()
    uniq = dict(zip(labels, handles, strict=True))
    fig.legend(uniq.values(), uniq.keys(), loc="lower center", ncol=min(4, len(uniq)), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
