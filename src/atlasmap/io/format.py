"""The atlasmap model directory: ``config.json`` + ``weights.safetensors``, written atomically, read without
executing code.

Class-free: this module writes and reads a model's *record* (a JSON-able config and tensors by name) and
checks every tensor's name, shape and dtype against the module the config describes before any weight is
used; which model class a record belongs to is the business of :mod:`atlasmap.models`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from atlasmap._version import __version__
from atlasmap.data.registry import Registry
from atlasmap.errors import InputError, ModelFileError
from atlasmap.runtime import is_main_process

FORMAT = "atlasmap-model"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.safetensors"
#: The files of a model directory: all that atlasmap ever writes there, and all it ever deletes.
MODEL_FILES = (CONFIG_FILE, WEIGHTS_FILE)


def write_model_directory(dir_path: str | Path, record: dict[str, Any], tensors: dict[str, torch.Tensor], *,
                          overwrite: bool = False) -> Path:
    """Write a model's ``record`` (JSON-able; the format keys are added) and ``tensors`` to ``dir_path``
    atomically (temporary sibling directory, then rename).

    An existing directory is replaced only with ``overwrite=True`` and only if it is empty or holds an
    atlasmap model and nothing else: atlasmap never deletes files it did not write.
    """
    from safetensors.torch import save_file

    target = Path(os.path.abspath(dir_path))  # absolute, so that "." has a parent to write beside
    if target.exists() and not overwrite:
        raise InputError(f"{dir_path} already exists; pass overwrite=True (CLI: --overwrite) to replace it.")
    if target.exists():
        _check_replaceable(target, dir_path)
    if not is_main_process():  # under torchrun every rank holds the same model; rank 0 writes it
        return target
    config = {"format": FORMAT, "format_version": FORMAT_VERSION, "atlasmap_version": __version__, **record}
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    except OSError as err:
        raise InputError(f"cannot write the model to {dir_path}: {err.strerror or err} ({target.parent}); "
                         "choose a directory you can write to.") from None
    try:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT})
        with open(tmp / CONFIG_FILE, "w", encoding="utf-8") as fh:
            json.dump(config, fh, indent=1, allow_nan=True)
            fh.flush()
            os.fsync(fh.fileno())
        _fsync_file(tmp / WEIGHTS_FILE)
        if target.exists():
            if _exchange_directories(tmp, target):  # one atomic step: the path always holds a whole model
                _remove_model_directory(tmp)  # tmp now holds the previous model (checked: atlasmap files only)
            else:  # no RENAME_EXCHANGE (not Linux, old kernel, some filesystems): a brief window remains
                old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
                os.rename(target, old / "model")
                os.rename(tmp, target)
                _remove_model_directory(old / "model")
                with contextlib.suppress(OSError):
                    old.rmdir()
        else:
            os.rename(tmp, target)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)  # our own temporary directory
        if isinstance(err, OSError):
            raise InputError(f"cannot write the model to {dir_path}: {err.strerror or err}; nothing was changed "
                             f"there (check free space and permissions of {target.parent}).") from None
        raise
    return target


def _check_replaceable(target: Path, given: str | Path) -> None:
    """Refuse to replace ``target`` unless it is a directory holding an atlasmap model and nothing else,
    or an empty one; also refuse the current working directory (or a directory containing it)."""
    if not target.is_dir():
        raise InputError(f"{given} exists and is not a directory; choose another path.")
    cwd = Path(os.getcwd())
    if target == cwd or target in cwd.parents:
        raise InputError(f"cannot replace {given}: it is the current working directory or contains it. Save the "
                         f"model to a new subdirectory instead, e.g. {Path(given) / 'model'}.")
    try:
        entries = sorted(target.iterdir())
    except OSError as err:
        raise InputError(f"cannot read {given} ({err.strerror or err}); choose another path.") from None
    if not entries:
        return
    foreign = [e for e in entries if e.name not in MODEL_FILES or not e.is_file() or e.is_symlink()]
    is_model = not foreign and (target / CONFIG_FILE).is_file() and _is_atlasmap_config(target / CONFIG_FILE)
    if not is_model:
        shown = foreign or entries
        names = ", ".join(e.name + ("/" if e.is_dir() else "") for e in shown[:4]) + (", ..." if len(shown) > 4 else "")
        raise InputError(
            f"{given} is not an atlasmap model directory (it holds {names}); atlasmap replaces only a directory it "
            f"saved a model to, or an empty one, and never deletes other files. Save to a new directory (e.g. "
            f"{Path(given) / 'model'}) or move those files away first."
        )


def _is_atlasmap_config(path: Path) -> bool:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return False
    return isinstance(config, dict) and config.get("format") == FORMAT


def _remove_model_directory(path: Path) -> None:
    """Delete a model directory atlasmap wrote: its model files, then the directory if nothing else is in it
    (a file someone added since is left where it is, with the directory)."""
    for name in MODEL_FILES:
        with contextlib.suppress(FileNotFoundError):
            (path / name).unlink()
    try:
        path.rmdir()
    except OSError:
        warnings.warn(f"left {path}: files appeared in the replaced model directory while saving; atlasmap did "
                      "not delete them.", UserWarning, stacklevel=3)


def _exchange_directories(a: Path, b: Path) -> bool:
    """Atomically swap two directories with Linux ``renameat2(RENAME_EXCHANGE)``.

    Returns False where that is unavailable (the caller falls back to two renames); other errors raise.
    """
    if not sys.platform.startswith("linux"):
        return False
    import ctypes
    import errno

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # glibc < 2.28, musl without renameat2
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_config(dir_path: str | Path) -> dict[str, Any]:
    """Read and check ``config.json`` of a model directory."""
    path = Path(dir_path)
    if not path.is_dir():
        raise ModelFileError(f"model directory {path} does not exist (or is not a directory).")
    cfg_path = path / CONFIG_FILE
    if not cfg_path.is_file():
        raise ModelFileError(f"{path} has no {CONFIG_FILE}: it is not an atlasmap model directory "
                             "(for scvi-tools models use SCVI.from_scvi_tools).")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:  # RecursionError: nested [[[...
        raise ModelFileError(f"{cfg_path} is not valid JSON ({err}); the model directory is corrupt.") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ModelFileError(f"{cfg_path} is not an atlasmap model config (missing 'format': '{FORMAT}').")
    version = config.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ModelFileError(
            f"{path} uses model format version {version!r}, written by atlasmap "
            f"{config.get('atlasmap_version', '?')}; this atlasmap ({__version__}) reads up to version "
            f"{FORMAT_VERSION}. Upgrade atlasmap."
        )
    missing = [k for k in ("model", "hparams", "registry", "block_sizes") if k not in config]
    if missing:
        raise ModelFileError(f"{cfg_path} lacks required entries: {', '.join(missing)}.")
    return config


def read_weights(path: Path, expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of ``path / weights.safetensors``, checked name by name against ``expected`` (a module's
    ``state_dict()``): the same names, shapes and dtypes, or a :class:`ModelFileError` naming the first
    mismatch. Read into memory, not memory-mapped: a file truncated or rewritten in place while loading
    (``cp``, an in-place download) gives an error instead of killing the process with SIGBUS."""
    from safetensors import SafetensorError
    from safetensors.torch import load as load_safetensors

    weights_path = path / WEIGHTS_FILE
    if not weights_path.is_file():
        raise ModelFileError(f"{path} has no {WEIGHTS_FILE}; the model directory is incomplete.")
    loaded: dict[str, torch.Tensor] = {}
    try:
        in_file = load_safetensors(weights_path.read_bytes())
        names = set(in_file)
        missing = sorted(set(expected) - names)
        extra = sorted(names - set(expected))
        if missing or extra:
            raise ModelFileError(
                f"{weights_path} does not match {CONFIG_FILE}: "
                + (f"missing tensors {missing[:3]}" if missing else "")
                + ("; " if missing and extra else "")
                + (f"unexpected tensors {extra[:3]}" if extra else "")
            )
        for name, ref in expected.items():
            tensor = in_file[name]
            if tensor.shape != ref.shape or tensor.dtype != ref.dtype:
                raise ModelFileError(
                    f"tensor {name!r} in {weights_path} has shape {tuple(tensor.shape)} and dtype "
                    f"{tensor.dtype}; the config expects {tuple(ref.shape)} {ref.dtype}."
                )
            loaded[name] = tensor
    except SafetensorError as err:
        raise ModelFileError(f"{weights_path} is not a readable safetensors file ({err}); it is corrupt "
                             "or truncated.") from None
    except (OSError, ValueError, RuntimeError) as err:
        raise ModelFileError(f"{weights_path} could not be read ({err}); it is corrupt or truncated.") from None
    return loaded


def check_weights_size(path: Path, build: Any) -> None:
    """Refuse a config whose module needs more bytes than ``weights.safetensors`` holds, by building it on
    the meta device (no memory): loading then allocates at most about the size of the weights file."""
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        return  # reported after the config checks
    try:
        with torch.device("meta"):
            meta = build()
    except Exception:  # noqa: BLE001 - a dry run only; the real build reports its own errors
        return
    need = sum(t.numel() * t.element_size() for t in meta.state_dict().values())
    have = weights.stat().st_size
    if need > have:
        raise ModelFileError(f"{path / CONFIG_FILE} describes {need / 1e6:.3g} MB of weights but {WEIGHTS_FILE} "
                             f"holds {have / 1e6:.3g} MB; the model directory is corrupt.")


def check_registry_matches(path: Path, registry: Registry, module_config: Any, block_sizes: list) -> None:
    """The registry (genes, categories, covariates) must describe the same shapes as the hyper-parameters
    (``n_genes``, ``n_continuous``, ``n_categories`` of any module config) and block sizes; otherwise the
    weights would load and fail (or silently misread) at inference."""
    problems = []
    n_genes, n_continuous, n_ref = module_config.n_genes, module_config.n_continuous, module_config.n_categories
    if registry.n_vars != n_genes:
        problems.append(f"{registry.n_vars} gene names but n_genes={n_genes}")
    if len(registry.continuous_keys) != n_continuous:
        problems.append(f"{len(registry.continuous_keys)} continuous covariates but n_continuous={n_continuous}")
    if len(block_sizes) != len(registry.categorical_keys):
        problems.append(f"{len(registry.categorical_keys)} categorical covariates but block sizes for "
                        f"{len(block_sizes)}")
    else:
        for j, (key, sizes) in enumerate(zip(registry.categorical_keys, block_sizes, strict=True)):
            n_cats = len(registry.categories.get(key, ()))
            if sum(int(n) for n in sizes) != n_cats:
                problems.append(f"covariate {key!r} has {n_cats} categories but parameter blocks of sizes {sizes}")
            elif j >= len(n_ref) or not sizes or int(sizes[0]) != n_ref[j]:
                problems.append(f"covariate {key!r}: reference block size {sizes[:1]} does not match the "
                                f"hyper-parameters")
    if problems:
        raise ModelFileError(f"{path / CONFIG_FILE} is inconsistent ({'; '.join(problems)}); the model directory "
                             "is corrupt.")


def resize_buffer(module: torch.nn.Module, name: str, shape: list[int]) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    current = getattr(owner, attr)
    if list(current.shape) != list(shape):
        setattr(owner, attr, torch.zeros(shape, dtype=current.dtype))
