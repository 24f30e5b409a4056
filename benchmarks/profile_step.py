"""Where the time of one training step goes: reference and query training of atlasmap's SCVI, profiled.

Runs a few epochs of reference training and of query training (after surgery) on the synthetic
20,000 cells x 2,000 genes x 4 batches set under ``torch.profiler`` and prints, per training step,
the CPU time of the top operators and of operator groups (matmul, lgamma/digamma, optimizer, ...).
CPU time (not wall time) is reported so that other processes on a shared machine disturb it less;
run with ``--threads 1`` for the most stable numbers.

To compare with another checkout (e.g. before a change), point ``PYTHONPATH`` at its ``src``::

    python benchmarks/profile_step.py --threads 1 --json benchmarks/results/profile_after.json
    PYTHONPATH=/path/to/old/src python benchmarks/profile_step.py --threads 1 --json .../profile_before.json
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict

GROUPS = {
    "matmul (addmm/mm)": ("aten::addmm", "aten::mm", "aten::bmm", "aten::linear", "aten::matmul"),
    "lgamma/digamma": ("aten::lgamma", "aten::digamma", "aten::polygamma"),
    "optimizer (Adam)": ("aten::_foreach", "aten::lerp_", "aten::addcdiv_", "aten::addcmul_", "aten::_fused_adam"),
    "softplus/sigmoid/where": ("aten::softplus", "aten::sigmoid", "aten::where", "aten::softplus_backward",
                               "aten::sigmoid_backward"),
    "norm/softmax": ("aten::native_layer_norm", "aten::native_layer_norm_backward", "aten::_softmax",
                     "aten::_softmax_backward_data"),
    "gather/scatter": ("aten::index_select", "aten::scatter_add_", "aten::index_add_", "aten::index"),
}


def group_of(name: str) -> str:
    for group, prefixes in GROUPS.items():
        if name.startswith(prefixes):
            return group
    return "other elementwise/overhead"


def profile_phase(fn, n_steps: int, top: int) -> dict:  # noqa: ANN001
    from torch.profiler import ProfilerActivity, profile

    cpu0, wall0 = time.process_time(), time.perf_counter()
    fn()
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    rows = [(e.key, e.self_cpu_time_total / 1e3 / n_steps, e.count / n_steps) for e in prof.key_averages()]
    rows.sort(key=lambda r: -r[1])
    groups: dict[str, float] = defaultdict(float)
    for name, ms, _ in rows:
        groups[group_of(name)] += ms
    return {
        "steps": n_steps,
        "cpu_ms_per_step": cpu * 1e3 / n_steps,
        "wall_ms_per_step": wall * 1e3 / n_steps,
        "profiled_ms_per_step": sum(ms for _, ms, _ in rows),
        "groups_ms_per_step": dict(sorted(groups.items(), key=lambda kv: -kv[1])),
        "top_ops": [{"op": n, "ms_per_step": round(ms, 4), "calls_per_step": round(c, 2)} for n, ms, c in rows[:top]],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--n-cells", type=int, default=20_000)
    p.add_argument("--n-genes", type=int, default=2_000)
    p.add_argument("--epochs", type=int, default=1, help="epochs per timed phase")
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--json", default=None)
    args = p.parse_args()

    import numpy as np
    import torch

    import atlasmap
    from atlasmap.datasets import simulate_counts

    if args.threads:
        torch.set_num_threads(args.threads)
    adata = simulate_counts(args.n_cells, args.n_genes, n_batches=4, n_cell_types=8, seed=0)
    ref = adata[adata.obs["batch"] != "batch3"].copy()
    query = adata[adata.obs["batch"] == "batch3"].copy()
    arch = dict(n_layers=2, n_latent=30, n_hidden=128, use_layer_norm="both", use_batch_norm="none")
    model = atlasmap.SCVI(ref, batch_key="batch", **arch)
    model.train(max_epochs=1, progress_bar=False)  # warm-up, data preparation cached

    def steps(n: int) -> int:
        n_train = int(np.ceil(0.9 * n))
        return args.epochs * max(1, n_train // 128)

    out = {"atlasmap": getattr(atlasmap, "__file__", "?"), "threads": torch.get_num_threads(),
           "n_genes": args.n_genes, "n_ref": ref.n_obs, "n_query": query.n_obs}
    out["reference"] = profile_phase(lambda: model.train(max_epochs=args.epochs, progress_bar=False),
                                     steps(ref.n_obs), args.top)
    qmodel = atlasmap.SCVI.load_query_data(query, model)
    qmodel.train(max_epochs=1, progress_bar=False)
    out["query"] = profile_phase(lambda: qmodel.train(max_epochs=args.epochs, progress_bar=False),
                                 steps(query.n_obs), args.top)
    for phase in ("reference", "query"):
        r = out[phase]
        print(f"\n### {phase} training: {r['cpu_ms_per_step']:.2f} ms CPU / step "
              f"({r['wall_ms_per_step']:.2f} ms wall, threads={out['threads']}; includes validation and data)")
        print("\n| group | ms/step |\n|---|---:|")
        for g, ms in r["groups_ms_per_step"].items():
            print(f"| {g} | {ms:.2f} |")
        # calls of the compiled kernels (atlasmap.ops._native) and Python between operators are not PyTorch operators
        print(f"| not seen by the profiler (compiled kernels, Python) | "
              f"{r['cpu_ms_per_step'] - r['profiled_ms_per_step']:.2f} |")
        print("\n| top operator | ms/step | calls/step |\n|---|---:|---:|")
        for row in r["top_ops"]:
            print(f"| {row['op']} | {row['ms_per_step']:.3f} | {row['calls_per_step']:.1f} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
