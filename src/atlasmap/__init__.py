"""atlasmap: map single-cell queries onto reference atlases by scArches architectural surgery.

>>> import atlasmap
>>> ref = atlasmap.SCVI(adata_ref, batch_key="batch").train(max_epochs=100)
>>> query = atlasmap.SCVI.load_query_data(adata_query, ref).train(max_epochs=100)
>>> adata_query.obsm["X_atlasmap"] = query.get_latent_representation()
"""

from __future__ import annotations

from typing import Any

from atlasmap._version import __version__
from atlasmap.errors import AtlasmapError, InputError, ModelFileError, NotTrainedError

__all__ = ["SCANVI", "SCVI", "TOTALVI", "AtlasmapError", "InputError", "ModelFileError", "NotTrainedError", "__version__",
           "KNNLabelTransfer", "datasets", "evaluate", "load", "map_query", "transfer_labels"]

_LAZY = {
    "SCVI": ("atlasmap.models", "SCVI"),
    "SCANVI": ("atlasmap.models", "SCANVI"),
    "TOTALVI": ("atlasmap.models", "TOTALVI"),
    "load": ("atlasmap.models", "load_model"),
    "evaluate": ("atlasmap.workflow.metrics", "evaluate"),
    "map_query": ("atlasmap.workflow.mapping", "map_query"),
    "datasets": ("atlasmap.datasets", None),
    "KNNLabelTransfer": ("atlasmap.workflow.knn", "KNNLabelTransfer"),
    "transfer_labels": ("atlasmap.workflow.knn", "transfer_labels"),
}


def __getattr__(name: str) -> Any:
    # torch and anndata are imported on first use, so `import atlasmap` (and `atlasmap --help`) stay fast
    if name in _LAZY:
        import importlib

        module_name, attr = _LAZY[name]
        module = importlib.import_module(module_name)
        return module if attr is None else getattr(module, attr)
    raise AttributeError(f"module 'atlasmap' has no attribute {name!r}")
