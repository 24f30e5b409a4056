"""Label transfer and scIB metrics on the shared Kang split, atlasmap beside scvi-tools, evaluated identically.

Both tools train the same scVI architecture (2 x 128 hidden, 10 latent, layer norm, no batch norm,
covariates injected into every layer) on the control cells, map the stimulated cells by scArches surgery
(frozen reference weights), and embed reference + query. Each joint latent then goes through the same
atlasmap code: kNN label transfer (:func:`atlasmap.workflow.knn.transfer_labels`, k=15) and
:func:`atlasmap.evaluate` (scib-metrics). Only the latent differs.

Each tool also runs the scArches scANVI recipe on the same split: the scVI reference above is fine-tuned
as scANVI on the reference labels (``--scanvi-epochs``, unlabelled category "Unknown"), the query is
mapped with ``SCANVI.load_query_data`` with its label column set to "Unknown" (no query label reaches
training), trained ``--epochs`` epochs, and its ``predict()`` is scored against the held-back labels.
Both sides run with ``torch.set_num_threads(1)``.

    python benchmarks/kang_evaluation.py --data ../shared/data/kang2018_ifnb_scgen_valid/kang2018_ifnb_scgen_valid_counts.h5ad \\
        --epochs 100 --out /tmp/kang_eval --peer-python /work/scvi_venv/bin/python

The scvi-tools half runs in its own interpreter (``--peer-python``: a virtualenv with scvi-tools 1.4.2),
through this same file with ``--peer-only``, which imports nothing from atlasmap.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ARCH = {"n_hidden": 128, "n_latent": 10, "n_layers": 2, "dropout_rate": 0.1}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--epochs", type=int, default=100, help="reference and query epochs each")
    p.add_argument("--scanvi-epochs", type=int, default=20, help="scANVI fine-tuning epochs on the reference")
    p.add_argument("--unlabeled-category", default="Unknown")
    p.add_argument("--batch-key", default="batch")
    p.add_argument("--labels-key", default="cell_type")
    p.add_argument("--reference-batch", default="ctrl")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--k", type=int, default=15)
    p.add_argument("--scib", default="full", choices=["full", "fast", "none"])
    p.add_argument("--peer-python", default=None, help="python of a scvi-tools environment (omit: atlasmap only)")
    p.add_argument("--peer-only", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def split(adata, args):  # noqa: ANN001, ANN201
    is_ref = (adata.obs[args.batch_key].astype(str) == args.reference_batch).to_numpy()
    return adata[is_ref].copy(), adata[~is_ref].copy()


def unlabelled(query, args):  # noqa: ANN001, ANN201
    """A copy of the query whose label column holds only the unlabelled category (no label leaks)."""
    import pandas as pd

    q = query.copy()
    q.obs[args.labels_key] = pd.Categorical([args.unlabeled_category] * q.n_obs)
    return q


def scanvi_result(pred, query, args, t_ref: float, t_query: float, version: str) -> dict:  # noqa: ANN001
    import numpy as np

    truth = query.obs[args.labels_key].astype(str).to_numpy()
    pred = np.asarray(pred).astype(str)
    return {"accuracy": float((pred == truth).mean()), "reference_s": t_ref, "query_s": t_query,
            "version": version}


def joint_h5ad(ref, query, z_ref, z_query, args, path: Path) -> None:  # noqa: ANN001
    """Reference + query cells with the latent in obsm['X_latent'] and only the obs the evaluation needs."""
    import anndata as ad
    import numpy as np
    import pandas as pd

    obs = pd.concat([ref.obs[[args.batch_key, args.labels_key]], query.obs[[args.batch_key, args.labels_key]]])
    obs["atlasmap_dataset"] = pd.Categorical(["reference"] * ref.n_obs + ["query"] * query.n_obs,
                                             categories=["reference", "query"])
    obs = obs.astype({args.batch_key: str, args.labels_key: str})
    X = ad.concat([ref, query], join="inner").X
    ad.AnnData(X, obs=obs, obsm={"X_latent": np.concatenate([z_ref, z_query]).astype(np.float32)}).write_h5ad(path)


def write_scvi_outputs(name: str, ref, query, qmodel, t_ref: float, t_query: float, version: str,  # noqa: ANN001
                       args: argparse.Namespace) -> None:
    """``{name}_joint.h5ad`` (both latents of the query model) and ``{name}_times.json`` of one tool's scVI run."""
    out = Path(args.out)
    joint_h5ad(ref, query, qmodel.get_latent_representation(ref), qmodel.get_latent_representation(query), args,
               out / f"{name}_joint.h5ad")
    (out / f"{name}_times.json").write_text(json.dumps({"reference_s": t_ref, "query_s": t_query,
                                                        "version": version}))


def run_peer(args: argparse.Namespace) -> None:
    """scvi-tools SCVI reference + scArches query (the scvi-tools tutorial recipe)."""
    import anndata as ad
    import scvi
    import torch

    torch.set_num_threads(1)
    scvi.settings.seed = args.seed
    ref, query = split(ad.read_h5ad(args.data), args)
    t0 = time.perf_counter()
    scvi.model.SCVI.setup_anndata(ref, batch_key=args.batch_key)
    model = scvi.model.SCVI(ref, use_layer_norm="both", use_batch_norm="none", encode_covariates=True, **ARCH)
    model.train(max_epochs=args.epochs, enable_progress_bar=False)
    t_ref = time.perf_counter() - t0
    t0 = time.perf_counter()
    qmodel = scvi.model.SCVI.load_query_data(query, model)
    qmodel.train(max_epochs=args.epochs, plan_kwargs={"weight_decay": 0.0}, enable_progress_bar=False)
    t_query = time.perf_counter() - t0
    out = Path(args.out)
    write_scvi_outputs("scvi_tools", ref, query, qmodel, t_ref, t_query, scvi.__version__, args)

    # scArches scANVI: fine-tune on the labelled reference, map the query with its labels hidden.
    t0 = time.perf_counter()
    sref = scvi.model.SCANVI.from_scvi_model(model, labels_key=args.labels_key,
                                             unlabeled_category=args.unlabeled_category)
    sref.train(max_epochs=args.scanvi_epochs, enable_progress_bar=False)
    t_sref = time.perf_counter() - t0
    t0 = time.perf_counter()
    q_unl = unlabelled(query, args)
    squery = scvi.model.SCANVI.load_query_data(q_unl, sref)
    squery.train(max_epochs=args.epochs, plan_kwargs={"weight_decay": 0.0}, enable_progress_bar=False)
    t_squery = time.perf_counter() - t0
    result = scanvi_result(squery.predict(), query, args, t_sref, t_squery, scvi.__version__)
    (out / "scvi_tools_scanvi.json").write_text(json.dumps(result))


def run_atlasmap(args: argparse.Namespace) -> None:
    import anndata as ad
    import torch

    import atlasmap

    torch.set_num_threads(1)
    ref, query = split(ad.read_h5ad(args.data), args)
    t0 = time.perf_counter()
    model = atlasmap.SCVI(ref, batch_key=args.batch_key, seed=args.seed, **ARCH)
    model.train(args.epochs, seed=args.seed, progress_bar=False)
    t_ref = time.perf_counter() - t0
    t0 = time.perf_counter()
    qmodel = atlasmap.SCVI.load_query_data(query, model).train(args.epochs, seed=args.seed, progress_bar=False)
    t_query = time.perf_counter() - t0
    out = Path(args.out)
    write_scvi_outputs("atlasmap", ref, query, qmodel, t_ref, t_query, atlasmap.__version__, args)

    # scArches scANVI: fine-tune on the labelled reference, map the query with its labels hidden.
    t0 = time.perf_counter()
    sref = atlasmap.SCANVI.from_scvi_model(model, labels_key=args.labels_key,
                                           unlabeled_category=args.unlabeled_category, seed=args.seed)
    sref.train(args.scanvi_epochs, seed=args.seed, progress_bar=False)
    t_sref = time.perf_counter() - t0
    t0 = time.perf_counter()
    squery = atlasmap.SCANVI.load_query_data(unlabelled(query, args), sref)
    squery.train(args.epochs, weight_decay=0.0, seed=args.seed, progress_bar=False)
    t_squery = time.perf_counter() - t0
    result = scanvi_result(squery.predict(), query, args, t_sref, t_squery, atlasmap.__version__)
    (out / "atlasmap_scanvi.json").write_text(json.dumps(result))


def evaluate_all(args: argparse.Namespace, names: list[str]) -> None:
    import anndata as ad
    import pandas as pd

    from atlasmap.workflow.mapping import knn_transfer
    from atlasmap.workflow.metrics import evaluate

    out = Path(args.out)
    columns = {}
    for name in names:
        joint = ad.read_h5ad(out / f"{name}_joint.h5ad")
        knn = knn_transfer(joint, args.labels_key, k=args.k, use_rep="X_latent")
        table = evaluate(joint, batch_key=args.batch_key, label_key=args.labels_key, use_rep="X_latent",
                         scib=args.scib, output_dir=out / name)
        values = dict(zip(table["metric"], table["value"], strict=True))
        values["knn accuracy (most-voted label)"] = knn["accuracy"]
        times = json.loads((out / f"{name}_times.json").read_text())
        values["reference training (s)"], values["query training (s)"] = times["reference_s"], times["query_s"]
        scanvi = json.loads((out / f"{name}_scanvi.json").read_text())
        values["scanvi accuracy (query predict)"] = scanvi["accuracy"]
        values["scanvi reference fine-tune (s)"] = scanvi["reference_s"]
        values["scanvi query training (s)"] = scanvi["query_s"]
        columns[f"{name} {times['version']}"] = values
    frame = pd.DataFrame(columns)
    frame.to_csv(out / "comparison.csv")
    print(markdown(frame))


def markdown(frame) -> str:  # noqa: ANN001
    """A pipe table of ``frame`` (no tabulate dependency); floats to 3 decimals."""
    def cell(v) -> str:  # noqa: ANN001
        if isinstance(v, float):
            return str(int(v)) if v.is_integer() and abs(v) >= 1 else f"{v:.3f}"  # counts as integers
        return str(v)

    rows = [["metric", *map(str, frame.columns)], ["---"] + ["---:"] * len(frame.columns)]
    rows += [[str(idx), *map(cell, row)] for idx, row in zip(frame.index, frame.to_numpy().tolist(), strict=True)]
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.peer_only:
        run_peer(args)
        return
    names = ["atlasmap"]
    peer = None
    if args.peer_python and not os.path.exists(args.peer_python):
        print(f"scvi-tools peer skipped: no interpreter at {args.peer_python!r}", file=sys.stderr)
    elif args.peer_python:
        peer = subprocess.Popen([args.peer_python, __file__, *(argv if argv is not None else sys.argv[1:]),
                                 "--peer-only"])
        names.append("scvi_tools")
    run_atlasmap(args)
    if peer is not None and peer.wait() != 0:
        sys.exit("the scvi-tools run failed")
    evaluate_all(args, names)


if __name__ == "__main__":
    main()
