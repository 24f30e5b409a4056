"""Error types, and the words errors use for arguments.

Every error a user can cause is an :class:`AtlasmapError` whose message says what is wrong and how to fix
it; the CLI prints it on one line and exits with status 2. A fix names an argument, and the same message
may reach a Python user or a command-line user: :func:`arg` spells the argument the way the caller does
(``layer='counts'`` in Python, ``--layer counts`` while an ``atlasmap`` command runs, see :func:`vocabulary`).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any, Literal


class AtlasmapError(Exception):
    """Base class of all errors atlasmap raises on purpose."""


class InputError(AtlasmapError, ValueError):
    """The AnnData, a key, an argument or a path given by the user is unusable."""


class ModelFileError(AtlasmapError):
    """A model directory is missing, corrupt, or incompatible with this atlasmap."""


class NotTrainedError(AtlasmapError, RuntimeError):
    """A method needs a trained model."""


Vocabulary = Literal["python", "cli"]
_VOCABULARY: contextvars.ContextVar[Vocabulary] = contextvars.ContextVar("atlasmap_vocabulary", default="python")
#: Python argument -> command-line flag where they are not simply ``--`` + the name with hyphens.
_FLAGS = {"max_epochs": "--epochs", "adata_reference": "--with-reference", "reference": "--reference"}
_UNSET = object()


@contextlib.contextmanager
def vocabulary(words: Vocabulary) -> Iterator[None]:
    """``with vocabulary("cli"):`` — messages raised inside spell arguments as command-line flags."""
    token = _VOCABULARY.set(words)
    try:
        yield
    finally:
        _VOCABULARY.reset(token)


def arg(name: str, value: Any = _UNSET) -> str:
    """An argument as the caller writes it: ``arg("layer", "counts")`` is ``layer='counts'`` in Python and
    ``--layer counts`` on the command line; ``arg("unfrozen", True)`` is ``unfrozen=True`` / ``--unfrozen``;
    without a value just the name (``layer=`` / ``--layer``)."""
    if _VOCABULARY.get() == "python":
        return f"{name}=" if value is _UNSET else f"{name}={value!r}"
    flag = _FLAGS.get(name, "--" + name.replace("_", "-"))
    if value is _UNSET:
        return flag
    if value is None or value is False:
        return f"no {flag}"
    if value is True:
        return flag
    return f"{flag} {value}"
