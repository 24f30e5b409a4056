"""Saving a model and loading it back: a model's record, and the model a record describes.

The directory format itself (atomic writes, JSON + safetensors, every tensor checked before use) is
:mod:`atlasmap.io.format`; this module knows what a model consists of (class, hyper-parameters, registry,
covariate blocks, surgery state, history) and rebuilds it from the registered class of
:mod:`atlasmap.models.registry`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from atlasmap.data.minified import StoredLatent
from atlasmap.data.registry import Registry
from atlasmap.errors import InputError, ModelFileError
from atlasmap.io.format import (
    CONFIG_FILE,
    check_registry_matches,
    check_weights_size,
    read_config,
    read_weights,
    resize_buffer,
    write_model_directory,
)
from atlasmap.models.registry import model_class
from atlasmap.runtime import resolve_device
from atlasmap.surgery import add_category_blocks, restore_freezing

if TYPE_CHECKING:
    from atlasmap.models.base import BaseModel


def model_record(model: BaseModel) -> dict[str, Any]:
    """Everything but the weights, as JSON-able data (``config.json`` without the format keys)."""
    module = model.module
    return {
        "model": type(model).__name__,
        "hparams": module.config.to_dict(),
        "registry": model.registry.to_dict(),
        "block_sizes": [_block_sizes(module, j) for j in range(len(model.registry.categorical_keys))],
        "buffers": {name: list(buf.shape) for name, buf in module.named_buffers()},
        "key_map": model.key_map,
        "surgery": model.surgery,
        "is_trained": model.is_trained,
        "extra": model._extra_state(),
        "history": model.history,
        "stored_latent": None if model.stored_latent is None else model.stored_latent.to_dict(),
    }


def _block_sizes(module: Any, covariate: int) -> list[int]:
    tables = module.covariate_tables(covariate)
    return tables[0].block_sizes if tables else []


def save_model(model: BaseModel, dir_path: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``model`` to ``dir_path`` (see :func:`atlasmap.io.format.write_model_directory`)."""
    return write_model_directory(dir_path, model_record(model), model.module.state_dict(), overwrite=overwrite)


def load_model(dir_path: str | Path, adata: Any = None, *, expected: type | None = None,
               device: str | torch.device = "cpu") -> BaseModel:
    """Load a model directory written by :func:`save_model` onto ``device`` (default the CPU, whatever device
    the model was trained on: the files hold CPU tensors; ``"auto"`` picks CUDA when available).

    ``adata``: cells to attach (optional). ``expected``: the class the caller asked for (``SCVI.load``); a
    directory of another class is refused. Only JSON and safetensors are read; the class comes from the
    fixed list of :mod:`atlasmap.models.registry`.
    """
    target_device = resolve_device(str(device))  # before reading: a bad device is the caller's error
    path = Path(dir_path)
    config = read_config(path)
    cls = model_class(config["model"], where=path)
    if expected is not None and not issubclass(cls, expected):
        raise ModelFileError(f"{path} holds a {cls.__name__} model; load it with {cls.__name__}.load.")
    try:
        registry = Registry.from_dict(config["registry"])
        module_config = cls._config_cls.from_dict(config["hparams"])
        check_registry_matches(path, registry, module_config, config["block_sizes"])

        def build() -> torch.nn.Module:
            module = cls._module_cls(module_config)
            for covariate, sizes in enumerate(config["block_sizes"]):
                for n in sizes[1:]:
                    add_category_blocks(module, [0] * covariate + [int(n)])
            for name, shape in config.get("buffers", {}).items():
                resize_buffer(module, name, shape)
            return module

        check_weights_size(path, build)  # before allocating: a crafted config cannot request huge tensors
        module = build()
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as err:
        raise ModelFileError(f"{path / CONFIG_FILE} does not describe a valid {cls.__name__} ({err!r}).") from None
    module.load_state_dict(read_weights(path, module.state_dict()), strict=True)
    module.to(target_device)
    try:
        model = cls._from_parts(
            adata=adata, registry=registry, module=module, history=config.get("history") or {},
            is_trained=bool(config.get("is_trained", True)), key_map=config.get("key_map") or {},
            surgery=config.get("surgery"), extra=config.get("extra") or {},
            stored_latent=StoredLatent.from_dict(config.get("stored_latent")),
        )
        if model.surgery:
            restore_freezing(module, model.surgery)
        else:
            for p in module.parameters():
                p.requires_grad_(True)
    except (InputError, KeyError, TypeError, ValueError, AttributeError) as err:
        raise ModelFileError(f"{path / CONFIG_FILE} has invalid model state ({err}); the model directory is "
                             "corrupt.") from None
    return model


__all__ = ["load_model", "model_record", "save_model"]
