"""Reading a scvi-tools ``model.pt`` without executing code from it, and its registry.

Most published references (HLCA, CELLxGENE Census scVI models, scvi-hub) were trained with scvi-tools,
whose ``model.pt`` is a torch pickle. Unpickling runs whatever the file says, so atlasmap never unpickles
it freely: :func:`read_scvi_tools_checkpoint` uses ``torch.load(weights_only=True)`` with an explicit,
load-scoped allow-list (:func:`_safe_globals`): plain containers, tensors, and numpy arrays / dtypes /
scalars. The pandas objects scvi-tools stores for its training history are mapped to an inert
placeholder that ignores its arguments, so no pandas code runs either. Anything else in the file is
refused with :class:`~atlasmap.errors.ModelFileError`.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from atlasmap.data.registry import SINGLE_BATCH, Registry
from atlasmap.errors import ModelFileError

#: File name scvi-tools gives the model inside its save directory (after an optional prefix).
SCVI_TOOLS_MODEL_FILE = "model.pt"

# scvi-tools' REGISTRY_KEYS (fields of the AnnData setup) and save keys
X_FIELD, BATCH_FIELD, LABELS_FIELD = "X", "batch", "labels"
CAT_COVS_FIELD, CONT_COVS_FIELD = "extra_categorical_covs", "extra_continuous_covs"
_SCVI_BATCH_COLUMN = "_scvi_batch"  # obs column scvi-tools creates when setup had no batch_key

# ----------------------------------------------------------------------------------------------
# Reading model.pt without executing code
# ----------------------------------------------------------------------------------------------


class _Inert:
    """Stands in for objects atlasmap does not need (pandas frames of the training history).

    Constructing, calling or restoring it ignores every argument: no code of the named class runs.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> _Inert:
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __repr__(self) -> str:
        return "<not loaded>"


def _plain_dict(*args: Any) -> dict:
    """``collections.defaultdict(factory)`` read as a plain dict (the factory is never kept)."""
    return {}


def _safe_globals() -> list[Any]:
    """The allow-list for ``torch.load(weights_only=True)``: (object, name in the pickle) pairs.

    Only types whose construction from pickle data cannot run arbitrary code: numpy arrays, dtypes
    and scalars (data, no callables), ``dict``/``bytes``, and inert stand-ins for pandas objects.
    """
    try:
        from numpy._core import multiarray  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray  # type: ignore[no-redef]

    allowed: list[Any] = [(dict, "builtins.dict"), (bytes, "builtins.bytes"), (_plain_dict, "collections.defaultdict")]
    for core in ("numpy._core", "numpy.core"):  # numpy 2 and numpy 1 spell the module differently
        allowed += [
            (multiarray._reconstruct, f"{core}.multiarray._reconstruct"),
            (multiarray.scalar, f"{core}.multiarray.scalar"),
        ]
    allowed += [(np.ndarray, "numpy.ndarray"), (np.dtype, "numpy.dtype")]
    # BUILD of a dtype checks the *instance's* class (numpy.dtypes.Float32DType, ...)
    allowed += sorted({type(np.dtype(code)) for code in "?bBhHiIlLqQefdgFDGOSUV"}, key=str)
    for name in (
        "pandas.core.frame.DataFrame", "pandas.core.series.Series",
        "pandas.core.internals.managers.BlockManager", "pandas.core.internals.managers.SingleBlockManager",
        "pandas._libs.internals._unpickle_block", "pandas.core.internals.blocks.new_block",
        "pandas.core.indexes.base._new_Index", "pandas.core.indexes.base.Index",
        "pandas.core.indexes.range.RangeIndex", "builtins.slice",
    ):
        allowed.append((_Inert, name))
    return allowed


def _restricted_torch_load(path: Path) -> Any:
    """``torch.load(path, weights_only=True)`` with :func:`_safe_globals` allowed for this load only."""
    import pickle

    safe_globals = getattr(torch.serialization, "safe_globals", None)
    if safe_globals is None:  # pragma: no cover - torch < 2.5
        raise ModelFileError(
            f"reading scvi-tools models safely needs torch >= 2.5 (torch.serialization.safe_globals); "
            f"this is torch {torch.__version__}."
        )
    try:
        with safe_globals(_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        detail = str(err).split("WeightsUnpickler error:")[-1].strip().splitlines()[0]
        raise ModelFileError(
            f"{path} needs Python objects that atlasmap does not load ({detail}). atlasmap only reads "
            "tensors, numbers, strings and numpy arrays from scvi-tools files, so that loading cannot run "
            "code. Re-save the model with scvi-tools 1.x (model.save) or load it in scvi-tools, if you "
            "trust its source."
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, TypeError, IndexError, AttributeError,
            zipfile.BadZipFile, MemoryError, OverflowError) as err:
        raise ModelFileError(
            f"{path} is not a readable scvi-tools model file ({type(err).__name__}: {_first_line(err)}); "
            "it is corrupt, truncated or of another format."
        ) from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else "no details"


@dataclass(frozen=True)
class ScviToolsCheckpoint:
    """The contents of a scvi-tools ``model.pt``, read without executing code.

    Attributes
    ----------
    path
        The file read.
    state
        The module's ``state_dict`` (tensors only; pyro's parameter store is dropped).
    var_names
        The model's genes, in its order.
    attr
        scvi-tools' ``attr_dict``: ``registry_``, ``init_params_``, ``is_trained_``, ... (the training
        history is not loaded).
    """

    path: Path
    state: dict[str, torch.Tensor]
    var_names: tuple[str, ...]
    attr: dict[str, Any] = field(repr=False)

    @property
    def registry(self) -> dict[str, Any]:
        return self.attr["registry_"]

    @property
    def model_name(self) -> str:
        return str(self.registry.get("model_name", "?"))

    @property
    def scvi_version(self) -> str:
        return str(self.registry.get("scvi_version", "?"))

    def field(self, name: str) -> dict[str, Any]:
        """``field_registries[name]`` (empty dicts when absent)."""
        fields = self.registry.get("field_registries") or {}
        entry = fields.get(name) or {}
        return {k: entry.get(k) or {} for k in ("data_registry", "state_registry", "summary_stats")}

    def init_params(self, defaults: dict[str, Any] | None = None) -> dict[str, Any]:
        """Model constructor arguments (explicit ones override ``defaults``)."""
        raw = self.attr.get("init_params_") or {}
        params = dict(defaults or {})
        if "non_kwargs" in raw:
            params.update(raw.get("non_kwargs") or {})
            for group in (raw.get("kwargs") or {}).values():
                params.update(group or {})
        else:  # scvi-tools < 0.15 layout
            for key, value in raw.items():
                if isinstance(value, dict):
                    params.update(value)
                else:
                    params[key] = value
        return params


def scvi_tools_model_path(dir_path: str | Path, *, prefix: str | None = None) -> Path:
    """The ``model.pt`` of a scvi-tools save directory (``dir_path`` may also be the file itself)."""
    path = Path(dir_path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise ModelFileError(f"scvi-tools model directory {path} does not exist.")
    model_path = path / f"{prefix or ''}{SCVI_TOOLS_MODEL_FILE}"
    if model_path.is_file():
        return model_path
    if (path / f"{prefix or ''}model_params.pt").is_file() or (path / f"{prefix or ''}attr.pkl").is_file():
        raise ModelFileError(
            f"{path} is a scvi-tools model saved before version 0.15 (model_params.pt + attr.pkl). Its "
            "attr.pkl is a plain pickle, which atlasmap never loads; convert it with scvi-tools' "
            "SCVI.convert_legacy_save (in an environment you trust), then import the converted directory."
        )
    if (path / "config.json").is_file():
        raise ModelFileError(f"{path} is an atlasmap model directory; load it with atlasmap.load (or SCVI.load).")
    others = sorted(p.name for p in path.glob("*model.pt"))
    hint = f" (found {', '.join(others)}: pass prefix=)" if others else ""
    raise ModelFileError(f"{path} has no {model_path.name}: it is not a scvi-tools model directory{hint}.")


def read_scvi_tools_checkpoint(dir_path: str | Path, *, prefix: str | None = None) -> ScviToolsCheckpoint:
    """Read a scvi-tools save (``model.pt``) without executing code from it.

    Parameters
    ----------
    dir_path
        Directory written by scvi-tools' ``model.save`` (or the ``model.pt`` file itself).
    prefix
        The ``prefix`` given to ``model.save``, if any.

    Raises
    ------
    ModelFileError
        When the file is missing, corrupt, needs objects outside the allow-list, or lacks the entries
        scvi-tools writes.
    """
    path = scvi_tools_model_path(dir_path, prefix=prefix)
    content = _restricted_torch_load(path)
    if not isinstance(content, dict) or not {"model_state_dict", "attr_dict"} <= set(content):
        raise ModelFileError(f"{path} is not a scvi-tools model file (expected model_state_dict, var_names and "
                             "attr_dict entries).")
    raw_state, attr = content["model_state_dict"], content["attr_dict"]
    if not isinstance(raw_state, dict) or not isinstance(attr, dict) or not isinstance(attr.get("registry_"), dict):
        raise ModelFileError(f"{path}: model_state_dict or attr_dict['registry_'] is malformed.")
    state: dict[str, torch.Tensor] = {}
    for name, value in raw_state.items():
        if name == "pyro_param_store":
            params = value.get("params") if isinstance(value, dict) else None
            if params:
                raise ModelFileError(f"{path} holds pyro parameters ({', '.join(map(str, params))}); "
                                     "atlasmap cannot represent pyro-based models.")
            continue
        if not isinstance(value, torch.Tensor):
            raise ModelFileError(f"{path}: state entry {name!r} is a {type(value).__name__}, not a tensor.")
        state[str(name)] = value
    var_names = content.get("var_names")
    if isinstance(var_names, dict):
        raise ModelFileError(f"{path} is a multi-modal (MuData) scvi-tools model "
                             f"(modalities {', '.join(map(str, var_names))}); atlasmap imports AnnData models.")
    if var_names is None:
        raise ModelFileError(f"{path} has no var_names; the file is incomplete.")
    names = tuple(str(v) for v in np.asarray(var_names, dtype=object).ravel())
    if len(set(names)) != len(names):
        raise ModelFileError(f"{path}: the model's gene names (var_names) are not unique.")
    return ScviToolsCheckpoint(path=path, state=state, var_names=names, attr=attr)


# ----------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------


def as_list(values: Any) -> list[Any]:
    if values is None:
        return []
    return list(np.asarray(values, dtype=object).ravel())


def registry_from_scvi_tools(ckpt: ScviToolsCheckpoint) -> Registry:
    """atlasmap's :class:`~atlasmap.data.registry.Registry` for a scvi-tools model.

    The batch and each extra categorical covariate keep scvi-tools' category order (its integer codes);
    a model set up without ``batch_key`` becomes atlasmap's single-batch registry.
    """
    x_field = ckpt.field(X_FIELD)
    data_reg = x_field["data_registry"]
    if data_reg.get("attr_name") == "layers":
        layer = str(data_reg.get("attr_key"))
    elif data_reg.get("attr_name") in ("X", None):
        layer = None
    else:
        raise ModelFileError(f"{ckpt.path}: the counts were read from adata.{data_reg.get('attr_name')}; "
                             "atlasmap reads counts from .X or a layer.")
    column_names = as_list(x_field["state_registry"].get("column_names"))
    if column_names and [str(c) for c in column_names] != list(ckpt.var_names):
        raise ModelFileError(f"{ckpt.path}: var_names disagree with the registry's gene list; the file is corrupt.")

    batch_state = ckpt.field(BATCH_FIELD)["state_registry"]
    batch_key = str(batch_state.get("original_key", _SCVI_BATCH_COLUMN))
    batch_cats = tuple(str(c) for c in as_list(batch_state.get("categorical_mapping")))
    if batch_key == _SCVI_BATCH_COLUMN:
        batch_key, batch_cats = SINGLE_BATCH, ("0",)
    if not batch_cats:
        raise ModelFileError(f"{ckpt.path}: the registry lists no batch categories.")
    categorical_keys = [batch_key]
    categories = {batch_key: batch_cats}
    cat_state = ckpt.field(CAT_COVS_FIELD)["state_registry"]
    mappings = cat_state.get("mappings") or {}
    for key in as_list(cat_state.get("field_keys")):
        key = str(key)
        if key in categories:
            raise ModelFileError(f"{ckpt.path}: categorical covariate {key!r} appears twice in the registry.")
        cats = tuple(str(c) for c in as_list(mappings.get(key)))
        if not cats:
            raise ModelFileError(f"{ckpt.path}: categorical covariate {key!r} has no categories in the registry.")
        categorical_keys.append(key)
        categories[key] = cats
    for key, cats in categories.items():
        if len(set(cats)) != len(cats):
            raise ModelFileError(f"{ckpt.path}: categories of {key!r} are not unique as text ({cats[:5]}).")
    cont_keys = tuple(str(c) for c in as_list(ckpt.field(CONT_COVS_FIELD)["state_registry"].get("columns")))
    return Registry(var_names=ckpt.var_names, batch_key=batch_key, categorical_keys=tuple(categorical_keys),
                    categories=categories, continuous_keys=cont_keys, layer=layer)
