"""Error types. Every error a user can cause is an :class:`AtlasmapError` whose message says
what is wrong and how to fix it; the CLI prints it on one line and exits with status 2."""


class AtlasmapError(Exception):
    """Base class of all errors atlasmap raises on purpose."""


class InputError(AtlasmapError, ValueError):
    """The AnnData, a key, an argument or a path given by the user is unusable."""


class ModelFileError(AtlasmapError):
    """A model directory is missing, corrupt, or incompatible with this atlasmap."""


class NotTrainedError(AtlasmapError, RuntimeError):
    """A method needs a trained model."""
