"""``SCVI.from_scvi_tools`` & co.: an imported scvi-tools model (:mod:`atlasmap.io.scvi_tools`) as an atlasmap
model of the matching class."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from atlasmap.errors import ModelFileError
from atlasmap.io.scvi_tools import read_scvi_tools_model
from atlasmap.models.registry import MODEL_CLASSES, model_class

if TYPE_CHECKING:
    from atlasmap.models.base import BaseModel


def from_scvi_tools(dir_path: str | Path, adata: Any = None, *, prefix: str | None = None,
                    expected: type | None = None) -> BaseModel:
    """Import a model saved by scvi-tools as the matching atlasmap model.

    Parameters
    ----------
    dir_path
        Directory written by scvi-tools' ``model.save`` (or its ``model.pt``).
    adata
        AnnData to attach (for training or ``get_latent_representation()`` without arguments).
    prefix
        The ``prefix`` given to scvi-tools' ``save``.
    expected
        atlasmap class the caller asked for (``SCVI.from_scvi_tools``); another model type is refused.

    Returns
    -------
    An atlasmap model (reference, trained if the scvi-tools model was) whose latent equals scvi-tools'.

    Raises
    ------
    ModelFileError
        When the file is unreadable, unsafe, or holds an architecture atlasmap cannot represent.
    """
    imported = read_scvi_tools_model(dir_path, prefix=prefix)
    cls = model_class(imported.model, where=imported.source)
    if expected is not None and expected is not cls:
        another_model = MODEL_CLASSES.get(expected.__name__) is expected  # e.g. SCANVI, a subclass of SCVI
        if another_model or not (issubclass(expected, cls) or issubclass(cls, expected)):
            raise ModelFileError(f"{imported.source} holds a scvi-tools {imported.model} model; import it with "
                                 f"atlasmap.{cls.__name__}.from_scvi_tools.")
        if issubclass(expected, cls):
            cls = expected  # a user's own subclass of the matching class
    model = cls._from_parts(adata=adata, registry=imported.registry, module=imported.module, history={},
                            is_trained=imported.is_trained, extra=imported.extra)
    if adata is not None:
        model._cells()  # validate the AnnData against the imported registry now (InputError)
    return model


__all__ = ["from_scvi_tools"]
