"""atlasmap: map single-cell queries onto reference atlases by scArches architectural surgery.

>>> import atlasmap
>>> ref = atlasmap.SCVI(adata_ref, batch_key="batch").train(max_epochs=100)
>>> query = atlasmap.SCVI.load_query_data(adata_query, ref).train(max_epochs=100)
>>> adata_query.obsm["X_atlasmap"] = query.get_latent_representation()
"""

from __future__ import annotations

from typing import Any

from atlasmap.errors import AtlasmapError, InputError, ModelFileError, NotTrainedError

__version__ = "0.1.0"

__all__ = ["SCANVI", "SCVI", "TOTALVI", "AtlasmapError", "InputError", "ModelFileError", "NotTrainedError", "__version__",
           "datasets", "evaluate", "load", "transfer_labels"]

_LAZY = {
    "SCVI": ("atlasmap.models.scvi", "SCVI"),
    "SCANVI": ("atlasmap.models.scanvi", "SCANVI"),
    "TOTALVI": ("atlasmap.models.totalvi", "TOTALVI"),
    "evaluate": ("atlasmap.metrics", "evaluate"),
    "map_query": ("atlasmap.mapping", "map_query"),
    "datasets": ("atlasmap.datasets", None),
    "KNNLabelTransfer": ("atlasmap.knn", "KNNLabelTransfer"),
    "transfer_labels": ("atlasmap.knn", "transfer_labels"),
}


def __getattr__(name: str) -> Any:
    # torch and anndata are imported on first use, so `import atlasmap` (and `atlasmap --help`) stay fast
    if name in _LAZY:
        import importlib

        module_name, attr = _LAZY[name]
        module = importlib.import_module(module_name)
        return module if attr is None else getattr(module, attr)
    raise AttributeError(f"module 'atlasmap' has no attribute {name!r}")


def load(dir_path: Any, adata: Any = None, *, device: str = "cpu") -> Any:
    """Load any saved atlasmap model (its class is read from the directory) onto ``device`` (default the CPU,
    whatever device it was trained on)."""
    from atlasmap.io import load_model

    return load_model(dir_path, adata=adata, device=device)
