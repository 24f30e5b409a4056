"""Import reference models saved by scvi-tools (``model.pt``), without executing code from the file.

* :mod:`~atlasmap.io.scvi_tools.reader` reads the pickle with ``torch.load(weights_only=True)`` and a
  load-scoped allow-list, and turns scvi-tools' registry into atlasmap's;
* :mod:`~atlasmap.io.scvi_tools.weights` moves tensors into atlasmap modules, name by name, checked;
* one module per supported scvi-tools model converts its architecture (:mod:`~atlasmap.io.scvi_tools.scvi`,
  :mod:`~atlasmap.io.scvi_tools.scanvi`, :mod:`~atlasmap.io.scvi_tools.totalvi`) and registers itself in
  :data:`~atlasmap.io.scvi_tools.imported.CONVERTERS`;
* :mod:`~atlasmap.io.scvi_tools.hub` reads the scvi-hub layout (metadata JSON, ``adata.h5ad``, minification).

:func:`read_scvi_tools_model` returns a class-free :class:`~atlasmap.io.scvi_tools.imported.ImportedModel`;
``atlasmap.SCVI.from_scvi_tools`` (:mod:`atlasmap.models.interop`) makes it a model.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from atlasmap.errors import ModelFileError
from atlasmap.io.scvi_tools import scanvi as _scanvi  # noqa: F401 - registers the SCANVI converter
from atlasmap.io.scvi_tools import scvi as _scvi  # noqa: F401 - registers the SCVI converter
from atlasmap.io.scvi_tools import totalvi as _totalvi  # noqa: F401 - registers the TOTALVI converter
from atlasmap.io.scvi_tools.hub import (
    HUB_ADATA_FILE,
    HUB_METADATA_FILE,
    HubDirectory,
    check_hub_metadata,
    hub_directory,
    is_scvi_tools_save,
    read_hub_adata,
    stored_latent_fields,
)
from atlasmap.io.scvi_tools.imported import CONVERTERS, ImportedModel, register_converter
from atlasmap.io.scvi_tools.reader import (
    SCVI_TOOLS_MODEL_FILE,
    ScviToolsCheckpoint,
    read_scvi_tools_checkpoint,
    registry_from_scvi_tools,
    scvi_tools_model_path,
)

#: scvi-tools versions whose ``model.pt`` layout atlasmap reads: 0.15 (the single-file format) up to 1.x
SUPPORTED_SCVI_TOOLS = ((0, 15), (2, 0))


def check_scvi_tools_version(ckpt: ScviToolsCheckpoint) -> None:
    """Refuse a save of a scvi-tools version whose format atlasmap does not know (one-line :class:`ModelFileError`)."""
    text = ckpt.scvi_version
    match = re.match(r"(\d+)\.(\d+)", text)
    low, high = SUPPORTED_SCVI_TOOLS
    if match is None or not low <= (int(match.group(1)), int(match.group(2))) < high:
        raise ModelFileError(f"{ckpt.path} was saved by scvi-tools {text}; atlasmap imports saves of scvi-tools "
                             f"{low[0]}.{low[1]} to {high[0] - 1}.x. Re-save the model with a scvi-tools version in "
                             "that range (load it there, then model.save), or upgrade atlasmap.")


def read_scvi_tools_model(dir_path: str | Path, *, prefix: str | None = None) -> ImportedModel:
    """Read a scvi-tools save (plain ``model.save`` or scvi-hub layout) and convert it to atlasmap's parts.

    The result records where a minified AnnData keeps the model's latent (``stored_latent``) and the
    ``adata.h5ad`` saved beside ``model.pt`` (``adata_path``), if any.

    Raises
    ------
    ModelFileError
        When the file is unreadable, unsafe, of a model type or setup atlasmap does not import, holds an
        architecture atlasmap cannot represent, or the scvi-hub directory is incomplete.
    """
    hub = hub_directory(dir_path, prefix=prefix)
    ckpt = read_scvi_tools_checkpoint(dir_path, prefix=prefix)
    name = ckpt.model_name
    convert = CONVERTERS.get(name)
    if convert is None:
        raise ModelFileError(f"{ckpt.path} holds a scvi-tools {name} model (scvi-tools {ckpt.scvi_version}); "
                             f"atlasmap imports scvi-tools {', '.join(sorted(CONVERTERS))} models.")
    check_scvi_tools_version(ckpt)
    check_hub_metadata(hub, ckpt)
    if ckpt.registry.get("setup_method_name", "setup_anndata") != "setup_anndata":
        raise ModelFileError(f"{ckpt.path} was set up with scvi-tools' {ckpt.registry['setup_method_name']}; "
                             "atlasmap imports models set up with setup_anndata.")
    imported = convert(ckpt)
    return dataclasses.replace(imported, stored_latent=stored_latent_fields(ckpt), adata_path=hub.adata_path)


__all__ = ["CONVERTERS", "HUB_ADATA_FILE", "HUB_METADATA_FILE", "SCVI_TOOLS_MODEL_FILE", "HubDirectory", "ImportedModel",
           "ScviToolsCheckpoint", "hub_directory", "is_scvi_tools_save", "read_hub_adata", "read_scvi_tools_checkpoint",
           "read_scvi_tools_model", "register_converter", "registry_from_scvi_tools", "scvi_tools_model_path"]
