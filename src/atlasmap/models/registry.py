"""The fixed list of model classes a saved or imported model may name.

A model directory's ``config.json`` names its class (``"SCVI"``, ...); loading picks the class from this
table by that name, never by importing or evaluating anything the file says. atlasmap's own classes
enter it with :func:`register_model` where they are defined.
"""

from __future__ import annotations

from typing import TypeVar

from atlasmap.errors import ModelFileError

T = TypeVar("T", bound=type)

#: class name -> model class (filled by the class definitions in :mod:`atlasmap.models`)
MODEL_CLASSES: dict[str, type] = {}


def register_model(cls: T) -> T:
    """Class decorator: ``cls`` may be named by saved models (under ``cls.__name__``)."""
    MODEL_CLASSES[cls.__name__] = cls
    return cls


def model_class(name: str, *, where: object = "the model directory") -> type:
    """The registered class called ``name``; :class:`ModelFileError` for any other name."""
    cls = MODEL_CLASSES.get(str(name))
    if cls is None:
        raise ModelFileError(f"{where} holds an unknown model type {name!r} (known: {', '.join(MODEL_CLASSES)}).")
    return cls


__all__ = ["MODEL_CLASSES", "model_class", "register_model"]
