"""Import reference models saved by scvi-tools (``model.pt``), without executing code from the file.

* :mod:`~atlasmap.io.scvi_tools.reader` reads the pickle with ``torch.load(weights_only=True)`` and a
  load-scoped allow-list, and turns scvi-tools' registry into atlasmap's;
* :mod:`~atlasmap.io.scvi_tools.weights` moves tensors into atlasmap modules, name by name, checked;
* one module per supported scvi-tools model converts its architecture (:mod:`~atlasmap.io.scvi_tools.scvi`)
  and registers itself in :data:`~atlasmap.io.scvi_tools.imported.CONVERTERS`.

:func:`read_scvi_tools_model` returns a class-free :class:`~atlasmap.io.scvi_tools.imported.ImportedModel`;
``atlasmap.SCVI.from_scvi_tools`` (:mod:`atlasmap.models.interop`) makes it a model.
"""

from __future__ import annotations

from pathlib import Path

from atlasmap.errors import ModelFileError
from atlasmap.io.scvi_tools import scvi as _scvi  # noqa: F401 - registers the SCVI converter
from atlasmap.io.scvi_tools.imported import CONVERTERS, ImportedModel, register_converter
from atlasmap.io.scvi_tools.reader import (
    SCVI_TOOLS_MODEL_FILE,
    ScviToolsCheckpoint,
    read_scvi_tools_checkpoint,
    registry_from_scvi_tools,
    scvi_tools_model_path,
)


def read_scvi_tools_model(dir_path: str | Path, *, prefix: str | None = None) -> ImportedModel:
    """Read a scvi-tools save and convert it to atlasmap's parts.

    Raises
    ------
    ModelFileError
        When the file is unreadable, unsafe, of a model type or setup atlasmap does not import, or holds an
        architecture atlasmap cannot represent.
    """
    ckpt = read_scvi_tools_checkpoint(dir_path, prefix=prefix)
    name = ckpt.model_name
    convert = CONVERTERS.get(name)
    if convert is None:
        raise ModelFileError(f"{ckpt.path} holds a scvi-tools {name} model (scvi-tools {ckpt.scvi_version}); "
                             f"atlasmap imports scvi-tools {', '.join(sorted(CONVERTERS))} models.")
    if ckpt.registry.get("setup_method_name", "setup_anndata") != "setup_anndata":
        raise ModelFileError(f"{ckpt.path} was set up with scvi-tools' {ckpt.registry['setup_method_name']}; "
                             "atlasmap imports models set up with setup_anndata.")
    return convert(ckpt)


__all__ = ["CONVERTERS", "SCVI_TOOLS_MODEL_FILE", "ImportedModel", "ScviToolsCheckpoint", "read_scvi_tools_checkpoint",
           "read_scvi_tools_model", "register_converter", "registry_from_scvi_tools", "scvi_tools_model_path"]
