"""What an import of a scvi-tools model produces, and the table of converters by scvi-tools model name."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from atlasmap.data.minified import StoredLatent
from atlasmap.data.registry import Registry
from atlasmap.io.scvi_tools.reader import ScviToolsCheckpoint


@dataclass(frozen=True)
class ImportedModel:
    """An atlasmap model's parts converted from a scvi-tools save (class-free; :mod:`atlasmap.models` wraps it).

    Attributes
    ----------
    model
        The atlasmap class it becomes (``"SCVI"``, ...).
    registry, module
        How it reads an AnnData, and the torch module holding scvi-tools' weights.
    extra
        Class-specific state (labels, proteins, ...), as the class's ``_restore_extra`` reads it.
    is_trained
        scvi-tools' ``is_trained_``.
    source
        The ``model.pt`` read.
    stored_latent
        Where the model's minified AnnData keeps the latent posterior (``None``: not saved minified).
    adata_path
        The ``adata.h5ad`` saved beside ``model.pt`` (scvi-hub layout, ``save_anndata=True``), if any.
    """

    model: str
    registry: Registry
    module: nn.Module
    extra: dict[str, Any] = field(default_factory=dict)
    is_trained: bool = True
    source: Path | None = None
    stored_latent: StoredLatent | None = None
    adata_path: Path | None = None


Converter = Callable[[ScviToolsCheckpoint], ImportedModel]

#: scvi-tools model name (``registry_['model_name']``) -> converter
CONVERTERS: dict[str, Converter] = {}


def register_converter(scvi_tools_model: str) -> Callable[[Converter], Converter]:
    """Decorator registering ``convert(ckpt) -> ImportedModel`` for a scvi-tools model type."""

    def decorate(convert: Converter) -> Converter:
        CONVERTERS[scvi_tools_model] = convert
        return convert

    return decorate


__all__ = ["CONVERTERS", "Converter", "ImportedModel", "register_converter"]
