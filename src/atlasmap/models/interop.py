"""``SCVI.from_scvi_tools`` & co.: an imported scvi-tools model (:mod:`atlasmap.io.scvi_tools`) as an atlasmap
model of the matching class; :func:`load_reference` takes either kind of model directory."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

# the package, not its names: atlasmap.io.scvi_tools imports the module classes (atlasmap.models.*_module), so
# when it is imported first this module runs while it is still initialising (its names are used at call time)
import atlasmap.io.scvi_tools as scvi_tools_io
from atlasmap.data.minified import is_minified
from atlasmap.errors import ModelFileError
from atlasmap.models.persistence import load_model
from atlasmap.models.registry import MODEL_CLASSES, model_class

if TYPE_CHECKING:
    from atlasmap.models.base import BaseModel


def from_scvi_tools(dir_path: str | Path, adata: Any = None, *, prefix: str | None = None,
                    expected: type | None = None, attach_saved_adata: bool = True) -> BaseModel:
    """Import a model saved by scvi-tools as the matching atlasmap model.

    Parameters
    ----------
    dir_path
        Directory written by scvi-tools' ``model.save`` (or its ``model.pt``).
    adata
        AnnData to attach (for training or ``get_latent_representation()`` without arguments). Default: the
        ``adata.h5ad`` saved in the directory (scvi-hub layout), if there is one; a minified one (no counts)
        supplies its stored latent.
    prefix
        The ``prefix`` given to scvi-tools' ``save``.
    expected
        atlasmap class the caller asked for (``SCVI.from_scvi_tools``); another model type is refused.
    attach_saved_adata
        Attach the directory's ``adata.h5ad`` when ``adata`` is not given (False: never read it).

    Returns
    -------
    An atlasmap model (reference, trained if the scvi-tools model was) whose latent equals scvi-tools'.

    Raises
    ------
    ModelFileError
        When the file is unreadable, unsafe, or holds an architecture atlasmap cannot represent.
    """
    imported = scvi_tools_io.read_scvi_tools_model(dir_path, prefix=prefix)
    cls = model_class(imported.model, where=imported.source)
    if expected is not None and expected is not cls:
        another_model = MODEL_CLASSES.get(expected.__name__) is expected  # e.g. SCANVI, a subclass of SCVI
        if another_model or not (issubclass(expected, cls) or issubclass(cls, expected)):
            raise ModelFileError(f"{imported.source} holds a scvi-tools {imported.model} model; import it with "
                                 f"atlasmap.{cls.__name__}.from_scvi_tools.")
        if issubclass(expected, cls):
            cls = expected  # a user's own subclass of the matching class
    if adata is None and attach_saved_adata and imported.adata_path is not None:  # scvi-hub / save_anndata=True
        adata = scvi_tools_io.read_hub_adata(imported.adata_path)
    model = cls._from_parts(adata=adata, registry=imported.registry, module=imported.module, history={},
                            is_trained=imported.is_trained, extra=imported.extra,
                            stored_latent=imported.stored_latent)
    if adata is not None:  # validate the AnnData against the imported registry now (InputError)
        if is_minified(adata):
            model._stored_latent(adata)  # no counts: its stored latent must be this model's and fit it
        else:
            model._cells()
    return model


def load_reference(path: str | Path, *, attach_saved_adata: bool = True) -> tuple[BaseModel, bool]:
    """A reference model from an atlasmap model directory or a scvi-tools save (plain or scvi-hub layout),
    the latter imported on the fly (:func:`from_scvi_tools`).

    Returns
    -------
    ``(model, imported)``: ``imported`` is True for a scvi-tools save; its ``adata.h5ad``, if any, is then
    attached as ``model.adata`` (unless ``attach_saved_adata`` is False).
    """
    if scvi_tools_io.is_scvi_tools_save(path):
        return from_scvi_tools(path, attach_saved_adata=attach_saved_adata), True
    return load_model(path), False


__all__ = ["from_scvi_tools", "load_reference"]
