"""``atlasmap`` command line: reference | map | evaluate | demo | info | import-scvi.

Errors a user can cause print one line to stderr and exit with status 2; warnings print one line each
(while a command runs; the process's warning format is restored after). Parsing (``--help``, usage errors)
imports neither torch nor the models: the commands are loaded only to run one.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Iterator
from typing import Any

from atlasmap.cli.parser import DEVICE_HELP, REFERENCE_MODELS, build_parser
from atlasmap.errors import AtlasmapError, InputError, vocabulary

EXIT_USER_ERROR = 2

__all__ = ["DEVICE_HELP", "EXIT_USER_ERROR", "REFERENCE_MODELS", "build_parser", "main"]


def _one_line(message: Any, category: type, filename: str, lineno: int, line: str | None = None) -> str:
    return f"atlasmap: warning: {message}\n"


@contextlib.contextmanager
def one_line_warnings() -> Iterator[None]:
    """Print warnings as ``atlasmap: warning: ...`` lines while a command runs (restored afterwards)."""
    saved = warnings.formatwarning
    warnings.formatwarning = _one_line  # type: ignore[assignment]
    try:
        yield
    finally:
        warnings.formatwarning = saved


def main(argv: list[str] | None = None) -> int:
    """Run one ``atlasmap`` command; returns the exit status (0, 2 for a user error, 130 if interrupted)."""
    args = build_parser().parse_args(argv)
    with one_line_warnings(), vocabulary("cli"):  # errors name flags (--layer counts), not arguments
        try:
            threads = getattr(args, "threads", None)
            if threads is not None and threads < 1:
                raise InputError(f"--threads must be at least 1, got {threads}.")
            # the commands import torch and the models: loaded only now, so that --help stays fast
            from atlasmap.cli.commands import COMMANDS, set_threads

            set_threads(threads)
            COMMANDS[args.command](args)
        except AtlasmapError as err:
            print(f"atlasmap: error: {err}", file=sys.stderr)
            return EXIT_USER_ERROR
        except KeyboardInterrupt:
            print("atlasmap: interrupted", file=sys.stderr)
            return 130
    return 0
