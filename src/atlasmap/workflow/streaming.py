"""The backed (streaming) mapping workflow: map a query larger than memory, write its latent incrementally.

>>> from atlasmap.data.backed import read_backed
>>> query = read_backed("query.h5ad")                       # obs/var in memory, counts on disk
>>> model = atlasmap.SCVI.load_query_data(query, "ref_model").train(max_epochs=10)  # streams chunks
>>> write_latent(model, query, "mapped.h5ad")                # obs + obsm['X_atlasmap'], no X

``map_query_backed`` does the three steps in one call; ``atlasmap map QUERY.h5ad --backed`` runs it.
The output is written to a temporary sibling file and renamed into place at the end, so an interrupted
or failed run never leaves a partial or corrupt output (and never replaces an existing one).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from atlasmap.data.backed import is_backed, make_readable, read_backed
from atlasmap.errors import InputError
from atlasmap.models import load_reference
from atlasmap.runtime import is_main_process

LATENT_KEY = "X_atlasmap"
DATASET_KEY = "atlasmap_dataset"

__all__ = ["LATENT_KEY", "iter_latent", "map_query_backed", "write_latent"]


def iter_latent(model: Any, adata: Any = None, *, batch_size: int = 8192, give_mean: bool = True, seed: int = 0
                ) -> Iterator[tuple[slice | np.ndarray, np.ndarray]]:
    """``(rows, latent_of_rows)`` blocks over the cells of ``adata`` in order, reading counts chunk by chunk.

    Works for in-memory and backed AnnData; ``rows`` is a slice (backed) or an index array.
    """

    model._check_trained()
    cells = model._cells(adata)
    module = model.module
    device = next(module.parameters()).device
    module.eval()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    blocks = cells.iter_ordered(batch_size, device)
    with torch.inference_mode():
        for rows, batch in blocks:
            inf = module.inference(batch, sample=False)
            z = inf["qz_m"]
            if not give_mean:
                z = z + inf["qz_v"].sqrt() * torch.randn(z.shape, generator=gen).to(device)
            yield rows, z.float().cpu().numpy()


def _tmp_sibling(path: Path) -> Path:

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    make_readable(Path(tmp))
    return Path(tmp)


def write_latent(
    model: Any,
    adata: Any,
    path: str | os.PathLike[str],
    *,
    key_added: str = LATENT_KEY,
    batch_size: int = 8192,
    give_mean: bool = True,
    overwrite: bool = False,
    uns: dict[str, Any] | None = None,
) -> Path:
    """Embed every cell of ``adata`` and write the latent to ``path`` block by block.

    Memory holds one block of counts and one block of latent coordinates, whatever the number of cells.

    Parameters
    ----------
    model
        A trained atlasmap model.
    adata
        Cells to embed: a backed AnnData (:func:`atlasmap.data.backed.read_backed`) or an in-memory one.
    path
        ``.h5ad``: an AnnData with the cells' ``obs``, ``obs['atlasmap_dataset'] = 'query'``, the latent in
        ``obsm[key_added]``, ``uns['atlasmap']`` and **no genes** (``n_vars == 0``: the counts stay in the
        input file; join them by ``obs_names`` if needed). ``.npy``: the latent matrix only
        (cells x n_latent float32, input order).
    key_added
        ``.obsm`` key of the latent in an ``.h5ad`` output.
    give_mean
        Posterior mean (default) or one sample.
    overwrite
        Replace an existing ``path``.
    uns
        Extra JSON-able information stored in ``uns['atlasmap']``.

    Returns
    -------
    ``path``. Under a distributed run only rank 0 computes and writes.

    Raises
    ------
    InputError
        ``path`` exists (without ``overwrite``) or has another suffix.
    """

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".h5ad", ".npy"):
        raise InputError(f"latent output {path} must end in .h5ad or .npy.")
    if path.exists() and not overwrite:
        raise InputError(f"output {path} already exists; pass --overwrite (overwrite=True) to replace it.")
    if not is_main_process():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    n_obs, n_latent = int(adata.n_obs), int(model.module.config.n_latent)
    tmp = _tmp_sibling(path)
    try:
        if suffix == ".npy":
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n_obs, n_latent))
            for rows, z in iter_latent(model, adata, batch_size=batch_size, give_mean=give_mean):
                out[rows] = z
            out.flush()
            del out
        else:
            _write_h5ad_latent(model, adata, tmp, key_added, batch_size, give_mean, n_latent, uns)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _write_h5ad_latent(model: Any, adata: Any, tmp: Path, key_added: str, batch_size: int, give_mean: bool,
                       n_latent: int, uns: dict[str, Any] | None) -> None:
    import anndata as ad
    import h5py

    obs = adata.obs.copy()
    obs[DATASET_KEY] = pd.Categorical(["query"] * len(obs), categories=["reference", "query"])
    info = {"model": type(model).__name__, "latent_key": key_added, "n_latent": n_latent,
            "note": "latent only: no genes (n_vars == 0); counts stay in the input file"}
    info.update({k: v if isinstance(v, str | int | float) else json.dumps(v) for k, v in (uns or {}).items()})
    ad.AnnData(obs=obs, uns={"atlasmap": info}).write_h5ad(tmp)
    with h5py.File(tmp, "a") as f:
        ds = f["obsm"].create_dataset(key_added, shape=(len(obs), n_latent), dtype=np.float32,
                                      chunks=(min(len(obs), 65536), n_latent) if len(obs) else None)
        ds.attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
        for rows, z in iter_latent(model, adata, batch_size=batch_size, give_mean=give_mean):
            ds[rows] = z
        f.flush()


def map_query_backed(
    query: Any,
    reference: Any,
    output: str | os.PathLike[str],
    *,
    batch_key: str | None = None,
    max_epochs: int | None = None,
    key_added: str = LATENT_KEY,
    overwrite: bool = False,
    surgery_kwargs: dict[str, Any] | None = None,
    train_kwargs: dict[str, Any] | None = None,
) -> tuple[Any, Path]:
    """Surgery, query training and embedding of an on-disk query, streaming its counts throughout.

    Parameters
    ----------
    query
        Path of the query ``.h5ad`` (CSR counts) or a backed AnnData.
    reference
        A trained model or its saved directory.
    output
        ``.h5ad`` (obs + latent, no genes) or ``.npy``; see :func:`write_latent`.
    batch_key, max_epochs, surgery_kwargs, train_kwargs
        As in :func:`atlasmap.workflow.mapping.map_query`.

    Returns
    -------
    ``(query_model, output_path)``.
    """

    output = Path(output)
    if output.exists() and not overwrite:
        raise InputError(f"output {output} already exists; pass --overwrite (overwrite=True) to replace it.")
    if isinstance(reference, str | os.PathLike):
        reference = load_reference(reference, attach_saved_adata=False)[0]
    adata = query if is_backed(query) else read_backed(query, what="query")
    model = type(reference).load_query_data(adata, reference, batch_key=batch_key, **(surgery_kwargs or {}))
    model.train(max_epochs, **(train_kwargs or {}))
    written = write_latent(model, adata, output, key_added=key_added, overwrite=overwrite,
                           uns={"new_categories": model.surgery["new_categories"]})
    return model, written
