"""Import reference models saved by scvi-tools (``model.pt``), without executing code from the file.

Most published references (HLCA, CELLxGENE Census scVI models, scvi-hub) were trained with scvi-tools,
whose ``model.pt`` is a torch pickle. Unpickling runs whatever the file says, so atlasmap never unpickles
it freely: :func:`read_scvi_tools_checkpoint` uses ``torch.load(weights_only=True)`` with an explicit,
load-scoped allow-list (:data:`_SAFE_GLOBALS`): plain containers, tensors, and numpy arrays / dtypes /
scalars. The pandas objects scvi-tools stores for its training history are mapped to an inert
placeholder that ignores its arguments, so no pandas code runs either. Anything else in the file is
refused with :class:`~atlasmap.errors.ModelFileError`.

Mapping a scvi-tools ``VAE`` onto atlasmap's :class:`~atlasmap.models.scvi_module.SCVIModule`:

* scvi-tools' ``FCLayers`` apply one ``nn.Linear`` to ``[x, cont, onehot(batch), onehot(cat_1), ...]``.
  Its weight matrix is split by columns: the ``x`` columns become atlasmap's ``linear`` weight, the
  continuous-covariate columns its ``continuous`` weight, and each one-hot block, transposed, the
  reference block of that covariate's :class:`~atlasmap.nn.layers.CovariateTable`.
* scvi-tools drops a covariate with a single category (its one-hot column would be constant). atlasmap
  gives it a **zero row**: ``W x + b + 0`` is what scvi-tools computes, and after surgery the reference
  category keeps that frozen zero row, so reference cells keep their latent exactly (scvi-tools itself
  adds an untrained random column for them).
* scvi-tools concatenates continuous covariates to the input of the *first* layer only; atlasmap injects
  them into every injected layer, so deeper layers get a zero continuous weight (again exact).
* Batch norm statistics, dispersions (``gene`` / ``gene-batch``), zero-inflation logits and the
  per-batch library priors are copied; ``gene-label``/``gene-cell`` dispersion, ``normal`` likelihood,
  logistic-normal latents, batch embeddings, size factors, non-log inputs, custom activations and
  batch norm combined with layer norm in one network are refused with a message saying so.

Other model types plug in through :func:`register_importer`; :func:`load_fc_stack` and
:func:`registry_from_scvi_tools` are the reusable parts.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from atlasmap.data.registry import SINGLE_BATCH, Registry
from atlasmap.errors import ModelFileError

if TYPE_CHECKING:
    from atlasmap.models.base import BaseModel
    from atlasmap.nn.layers import FCStack

#: File name scvi-tools gives the model inside its save directory (after an optional prefix).
SCVI_TOOLS_MODEL_FILE = "model.pt"

# scvi-tools' REGISTRY_KEYS (fields of the AnnData setup) and save keys
_X, _BATCH, _LABELS = "X", "batch", "labels"
_CAT_COVS, _CONT_COVS, _SIZE_FACTOR = "extra_categorical_covs", "extra_continuous_covs", "size_factor"
_SCVI_BATCH_COLUMN = "_scvi_batch"  # obs column scvi-tools creates when setup had no batch_key

# scvi-tools VAE defaults (1.x) for arguments not recorded explicitly in init_params_
_VAE_DEFAULTS: dict[str, Any] = {
    "n_hidden": 128, "n_latent": 10, "n_layers": 1, "dropout_rate": 0.1, "dispersion": "gene",
    "gene_likelihood": "zinb", "latent_distribution": "normal", "use_observed_lib_size": True,
    "encode_covariates": False, "deeply_inject_covariates": True, "use_batch_norm": "both",
    "use_layer_norm": "none", "log_variational": True, "batch_representation": "one-hot",
    "var_activation": None, "extra_encoder_kwargs": None, "extra_decoder_kwargs": None,
}


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


def _as_list(values: Any) -> list[Any]:
    if values is None:
        return []
    return list(np.asarray(values, dtype=object).ravel())


def registry_from_scvi_tools(ckpt: ScviToolsCheckpoint) -> Registry:
    """atlasmap's :class:`~atlasmap.data.registry.Registry` for a scvi-tools model.

    The batch and each extra categorical covariate keep scvi-tools' category order (its integer codes);
    a model set up without ``batch_key`` becomes atlasmap's single-batch registry.
    """
    x_field = ckpt.field(_X)
    data_reg = x_field["data_registry"]
    if data_reg.get("attr_name") == "layers":
        layer = str(data_reg.get("attr_key"))
    elif data_reg.get("attr_name") in ("X", None):
        layer = None
    else:
        raise ModelFileError(f"{ckpt.path}: the counts were read from adata.{data_reg.get('attr_name')}; "
                             "atlasmap reads counts from .X or a layer.")
    column_names = _as_list(x_field["state_registry"].get("column_names"))
    if column_names and [str(c) for c in column_names] != list(ckpt.var_names):
        raise ModelFileError(f"{ckpt.path}: var_names disagree with the registry's gene list; the file is corrupt.")

    batch_state = ckpt.field(_BATCH)["state_registry"]
    batch_key = str(batch_state.get("original_key", _SCVI_BATCH_COLUMN))
    batch_cats = tuple(str(c) for c in _as_list(batch_state.get("categorical_mapping")))
    if batch_key == _SCVI_BATCH_COLUMN:
        batch_key, batch_cats = SINGLE_BATCH, ("0",)
    if not batch_cats:
        raise ModelFileError(f"{ckpt.path}: the registry lists no batch categories.")
    categorical_keys = [batch_key]
    categories = {batch_key: batch_cats}
    cat_state = ckpt.field(_CAT_COVS)["state_registry"]
    mappings = cat_state.get("mappings") or {}
    for key in _as_list(cat_state.get("field_keys")):
        key = str(key)
        if key in categories:
            raise ModelFileError(f"{ckpt.path}: categorical covariate {key!r} appears twice in the registry.")
        cats = tuple(str(c) for c in _as_list(mappings.get(key)))
        if not cats:
            raise ModelFileError(f"{ckpt.path}: categorical covariate {key!r} has no categories in the registry.")
        categorical_keys.append(key)
        categories[key] = cats
    for key, cats in categories.items():
        if len(set(cats)) != len(cats):
            raise ModelFileError(f"{ckpt.path}: categories of {key!r} are not unique as text ({cats[:5]}).")
    cont_keys = tuple(str(c) for c in _as_list(ckpt.field(_CONT_COVS)["state_registry"].get("columns")))
    return Registry(var_names=ckpt.var_names, batch_key=batch_key, categorical_keys=tuple(categorical_keys),
                    categories=categories, continuous_keys=cont_keys, layer=layer)


# ----------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------


class StateReader:
    """Hands out scvi-tools tensors by name, checking shape and dtype, and remembers what was used.

    Parameters
    ----------
    state
        scvi-tools ``state_dict``.
    path
        File the state came from (for messages).
    """

    def __init__(self, state: dict[str, torch.Tensor], path: Path) -> None:
        self.state = state
        self.path = path
        self.used: set[str] = set()

    def has(self, name: str) -> bool:
        return name in self.state

    def take(self, name: str, shape: Sequence[int] | None = None, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Tensor ``name``; :class:`ModelFileError` if absent or of another shape / dtype."""
        if name not in self.state:
            raise ModelFileError(f"{self.path} lacks tensor {name!r}; the architecture is not the one its "
                                 "hyper-parameters describe.")
        tensor = self.state[name]
        if shape is not None and tuple(tensor.shape) != tuple(shape):
            raise ModelFileError(f"tensor {name!r} in {self.path} has shape {tuple(tensor.shape)}; "
                                 f"expected {tuple(shape)} from the model's hyper-parameters and registry.")
        if tensor.dtype != dtype:
            raise ModelFileError(f"tensor {name!r} in {self.path} has dtype {tensor.dtype}; atlasmap imports "
                                 f"{dtype} models.")
        if dtype.is_floating_point and not bool(torch.isfinite(tensor).all()):
            raise ModelFileError(f"tensor {name!r} in {self.path} holds NaN or infinite values.")
        self.used.add(name)
        return tensor

    def ignore(self, prefix: str) -> None:
        """Mark every tensor whose name starts with ``prefix`` as deliberately unused."""
        self.used.update(n for n in self.state if n.startswith(prefix))

    def check_all_used(self) -> None:
        left = sorted(set(self.state) - self.used)
        if left:
            raise ModelFileError(
                f"{self.path} holds parameters atlasmap cannot represent ({', '.join(left[:4])}"
                f"{', ...' if len(left) > 4 else ''}); this scvi-tools architecture is not supported."
            )


class ModuleWriter:
    """Copies values into a fresh atlasmap module and checks at the end that every tensor was set."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self._names = {id(t): n for n, t in module.state_dict(keep_vars=True).items()}
        self.written: set[str] = set()

    @torch.no_grad()
    def set(self, target: torch.Tensor, value: torch.Tensor) -> None:
        name = self._names.get(id(target), "?")
        if tuple(target.shape) != tuple(value.shape):
            raise ModelFileError(f"internal: atlasmap tensor {name} has shape {tuple(target.shape)}, "
                                 f"the converted scvi-tools tensor {tuple(value.shape)}.")
        target.copy_(value)
        self.written.add(name)

    def check_all_written(self) -> None:
        missing = sorted(set(self._names.values()) - self.written)
        if missing:
            raise ModelFileError(f"internal: the import left atlasmap tensors unset ({', '.join(missing[:4])}).")


def split_injected_weight(weight: torch.Tensor, n_x: int, n_cont: int, n_cat_list: Sequence[int]
                          ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Split a scvi-tools ``FCLayers`` weight over ``[x, cont, onehot(cat_1), ...]`` into blocks.

    Parameters
    ----------
    weight
        ``(n_out, n_x + n_cont + sum(n for n in n_cat_list if n > 1))``.
    n_x, n_cont
        Widths of the layer input and of the continuous covariates concatenated to it.
    n_cat_list
        Categories per categorical covariate; scvi-tools has no columns for a covariate with one category.

    Returns
    -------
    ``(W_x, W_cont, tables)`` where ``tables[j]`` is ``(n_cat_list[j], n_out)`` — the transposed one-hot
    columns, or a zero row for a one-category covariate.
    """
    n_out = weight.shape[0]
    widths = [n if n > 1 else 0 for n in n_cat_list]
    w_x = weight[:, :n_x]
    w_cont = weight[:, n_x:n_x + n_cont]
    tables, offset = [], n_x + n_cont
    for n, width in zip(n_cat_list, widths, strict=True):
        if width:
            tables.append(weight[:, offset:offset + width].T.contiguous())
        else:
            tables.append(torch.zeros(n, n_out, dtype=weight.dtype))
        offset += width
    return w_x.contiguous(), w_cont.contiguous(), tables


def load_fc_stack(writer: ModuleWriter, stack: FCStack, reader: StateReader, prefix: str, *, n_x: int,
                  n_hidden: int, n_cont: int, n_cat_list: Sequence[int], deep_injection: bool,
                  batch_norm: bool) -> None:
    """Fill atlasmap's :class:`~atlasmap.nn.layers.FCStack` from scvi-tools ``FCLayers`` at ``prefix``.

    Parameters
    ----------
    writer, stack
        The target module's writer and the stack (encoder, decoder, ...) to fill.
    reader, prefix
        scvi-tools tensors and the ``FCLayers`` name (e.g. ``"z_encoder.encoder"``).
    n_x, n_hidden
        Width of the stack's input (genes, or latent) and hidden layers.
    n_cont
        Continuous covariates concatenated to the *first* layer's input (0 if none reach this stack).
    n_cat_list
        Categories per categorical covariate injected (empty if none reach this stack).
    deep_injection, batch_norm
        scvi-tools' ``inject_covariates`` and ``use_batch_norm`` of this ``FCLayers``.
    """
    n_eff = sum(n for n in n_cat_list if n > 1)
    for i, layer in enumerate(stack.layers):
        base = f"{prefix}.fc_layers.Layer {i}"
        inject = bool(n_cat_list) and (i == 0 or deep_injection)
        width_x = n_x if i == 0 else n_hidden
        cont_here = n_cont if i == 0 else 0
        cats_here = list(n_cat_list) if inject else []
        weight = reader.take(f"{base}.0.weight", (n_hidden, width_x + cont_here + (n_eff if inject else 0)))
        w_x, w_cont, tables = split_injected_weight(weight, width_x, cont_here, cats_here)
        writer.set(layer.linear.weight, w_x)
        writer.set(layer.linear.bias, reader.take(f"{base}.0.bias", (n_hidden,)))
        if layer.continuous is not None:
            writer.set(layer.continuous.weight, w_cont if i == 0 else torch.zeros_like(layer.continuous.weight))
        elif w_cont.shape[1]:
            raise ModelFileError(f"internal: continuous covariates of {base} have no atlasmap target.")
        if len(layer.covariates) != len(tables):
            raise ModelFileError(f"internal: {base} injects {len(tables)} covariates, atlasmap {len(layer.covariates)}.")
        for table, values in zip(layer.covariates, tables, strict=True):
            writer.set(table.blocks[0], values)
        norm = stack.norms[i]
        if batch_norm:
            if not isinstance(norm, nn.BatchNorm1d):
                raise ModelFileError(f"internal: {base} has batch norm, the atlasmap layer has {type(norm).__name__}.")
            for attr in ("weight", "bias", "running_mean", "running_var"):
                writer.set(getattr(norm, attr), reader.take(f"{base}.1.{attr}", (n_hidden,)))
            writer.set(norm.num_batches_tracked, reader.take(f"{base}.1.num_batches_tracked", (), dtype=torch.int64))
    if reader.has(f"{prefix}.fc_layers.Layer {len(stack.layers)}.0.weight"):
        raise ModelFileError(f"{reader.path}: {prefix} has more layers than n_layers says.")


# ----------------------------------------------------------------------------------------------
# SCVI
# ----------------------------------------------------------------------------------------------


def _norm_where(value: Any, name: str, path: Path) -> str:
    if value in (True, False):  # scvi-tools < 1.0 took booleans for the encoder+decoder
        return "both" if value else "none"
    if value not in ("none", "encoder", "decoder", "both"):
        raise ModelFileError(f"{path}: unknown {name} {value!r}.")
    return str(value)


def _refuse(path: Path, what: str) -> ModelFileError:
    return ModelFileError(f"cannot import {path}: the scvi-tools model uses {what}, which atlasmap's model does "
                          "not implement.")


def scvi_config_from_checkpoint(ckpt: ScviToolsCheckpoint, registry: Registry) -> Any:
    """atlasmap :class:`~atlasmap.models.scvi_module.SCVIConfig` of a scvi-tools ``VAE``, or a clear refusal."""
    from atlasmap.models.scvi_module import SCVIConfig

    path = ckpt.path
    p = ckpt.init_params(_VAE_DEFAULTS)
    setup_args = ckpt.registry.get("setup_args") or {}
    if p.get("latent_distribution") != "normal":
        raise _refuse(path, f"latent_distribution={p.get('latent_distribution')!r} (atlasmap: 'normal')")
    if not p.get("log_variational", True):
        raise _refuse(path, "log_variational=False (atlasmap encodes log1p(counts))")
    if p.get("batch_representation", "one-hot") != "one-hot":
        raise _refuse(path, f"batch_representation={p.get('batch_representation')!r} (atlasmap: one-hot)")
    if p.get("var_activation") is not None:
        raise _refuse(path, "a custom var_activation (atlasmap: exp)")
    for key in ("extra_encoder_kwargs", "extra_decoder_kwargs"):
        if p.get(key):
            raise _refuse(path, f"{key}={p[key]!r}")
    if setup_args.get("size_factor_key") or p.get("use_size_factor_key"):
        raise _refuse(path, "size factors (size_factor_key) instead of library sizes")
    if p.get("gene_likelihood") not in ("zinb", "nb", "poisson"):
        raise _refuse(path, f"gene_likelihood={p.get('gene_likelihood')!r} (atlasmap: zinb, nb, poisson)")
    if p.get("dispersion") not in ("gene", "gene-batch"):
        raise _refuse(path, f"dispersion={p.get('dispersion')!r} (atlasmap: gene, gene-batch)")
    batch_norm = _norm_where(p.get("use_batch_norm"), "use_batch_norm", path)
    layer_norm = _norm_where(p.get("use_layer_norm"), "use_layer_norm", path)
    for part in ("encoder", "decoder"):
        if batch_norm in (part, "both") and layer_norm in (part, "both"):
            raise _refuse(path, f"batch norm and layer norm together in the {part} (atlasmap: one of them)")
    state = ckpt.state
    n_layers = sum(1 for n in state if n.startswith("z_encoder.encoder.fc_layers.Layer ") and n.endswith(".0.bias"))
    try:
        n_hidden = int(state["z_encoder.mean_encoder.weight"].shape[1])
        n_latent = int(state["z_encoder.mean_encoder.weight"].shape[0])
    except (KeyError, IndexError):
        raise ModelFileError(f"{path} lacks the scVI encoder (z_encoder.mean_encoder); it is not an scVI model "
                             "or is corrupt.") from None
    explicit = ckpt.init_params()  # without defaults: only what the file records
    for name, value in (("n_layers", n_layers), ("n_hidden", n_hidden), ("n_latent", n_latent)):
        if name in explicit and explicit[name] != value:
            raise ModelFileError(f"{path}: init_params_ say {name}={explicit[name]!r} but the weights have {value}.")
    return SCVIConfig(
        n_genes=registry.n_vars, n_categories=tuple(registry.n_categories),
        n_continuous=len(registry.continuous_keys), n_hidden=n_hidden, n_latent=n_latent, n_layers=n_layers,
        dropout_rate=float(p.get("dropout_rate", 0.1)), gene_likelihood=p["gene_likelihood"],
        dispersion=p["dispersion"], encode_covariates=bool(p.get("encode_covariates")),
        deeply_inject_covariates=bool(p.get("deeply_inject_covariates")), use_layer_norm=layer_norm,
        use_batch_norm=batch_norm, use_observed_lib_size=bool(p.get("use_observed_lib_size", True)),
    )


def scvi_module_from_checkpoint(ckpt: ScviToolsCheckpoint, registry: Registry, config: Any,
                                module_cls: type[nn.Module] | None = None) -> nn.Module:
    """Build an atlasmap SCVI module holding exactly the weights of the scvi-tools ``VAE``."""
    from atlasmap.models.scvi_module import SCVIModule

    module = (module_cls or SCVIModule)(config)
    reader, writer = StateReader(ckpt.state, ckpt.path), ModuleWriter(module)
    n_cat_list = registry.n_categories
    n_cont = len(registry.continuous_keys)
    bn = {part: config.use_batch_norm in (part, "both") for part in ("encoder", "decoder")}
    enc_cats, enc_cont = (n_cat_list, n_cont) if config.encode_covariates else ([], 0)
    common = {"n_hidden": config.n_hidden, "deep_injection": config.deeply_inject_covariates}
    load_fc_stack(writer, module.encoder, reader, "z_encoder.encoder", n_x=config.n_genes, n_cont=enc_cont,
                  n_cat_list=enc_cats, batch_norm=bn["encoder"], **common)
    for src, dst in (("z_encoder.mean_encoder", module.z_mean), ("z_encoder.var_encoder", module.z_var)):
        writer.set(dst.weight, reader.take(f"{src}.weight", (config.n_latent, config.n_hidden)))
        writer.set(dst.bias, reader.take(f"{src}.bias", (config.n_latent,)))
    if config.use_observed_lib_size:
        reader.ignore("l_encoder.")  # scvi-tools always builds it; unused with the observed library size
    else:
        load_fc_stack(writer, module.l_encoder, reader, "l_encoder.encoder", n_x=config.n_genes, n_cont=enc_cont,
                      n_cat_list=enc_cats, batch_norm=bn["encoder"], **common)
        for src, dst in (("l_encoder.mean_encoder", module.l_mean), ("l_encoder.var_encoder", module.l_var)):
            writer.set(dst.weight, reader.take(f"{src}.weight", (1, config.n_hidden)))
            writer.set(dst.bias, reader.take(f"{src}.bias", (1,)))
        n_batch = registry.n_batch
        for name in ("library_log_means", "library_log_vars"):
            writer.set(getattr(module, name), reader.take(name, (1, n_batch)).reshape(n_batch))
    load_fc_stack(writer, module.decoder, reader, "decoder.px_decoder", n_x=config.n_latent, n_cont=n_cont,
                  n_cat_list=n_cat_list, batch_norm=bn["decoder"], **common)
    writer.set(module.px_scale.weight, reader.take("decoder.px_scale_decoder.0.weight", (config.n_genes, config.n_hidden)))
    writer.set(module.px_scale.bias, reader.take("decoder.px_scale_decoder.0.bias", (config.n_genes,)))
    if module.px_dropout is not None:
        writer.set(module.px_dropout.weight, reader.take("decoder.px_dropout_decoder.weight",
                                                         (config.n_genes, config.n_hidden)))
        writer.set(module.px_dropout.bias, reader.take("decoder.px_dropout_decoder.bias", (config.n_genes,)))
    else:
        reader.ignore("decoder.px_dropout_decoder.")  # built by scvi-tools for every likelihood
    reader.ignore("decoder.px_r_decoder.")  # used only by dispersion="gene-cell"
    if config.dispersion == "gene":
        writer.set(module.px_r, reader.take("px_r", (config.n_genes,)))
    else:
        writer.set(module.px_r_batch.blocks[0], reader.take("px_r", (config.n_genes, registry.n_batch)).T)
    reader.check_all_used()
    writer.check_all_written()
    return module


def _import_scvi(ckpt: ScviToolsCheckpoint, cls: type[BaseModel], adata: Any) -> BaseModel:
    registry = registry_from_scvi_tools(ckpt)
    config = scvi_config_from_checkpoint(ckpt, registry)
    module = scvi_module_from_checkpoint(ckpt, registry, config, cls._module_cls)
    return cls._from_parts(adata=adata, registry=registry, module=module, history={},
                           is_trained=bool(ckpt.attr.get("is_trained_", True)))


# ----------------------------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------------------------

Importer = Callable[[ScviToolsCheckpoint, type, Any], Any]


@dataclass(frozen=True)
class _ImporterEntry:
    atlasmap_class: str
    convert: Importer


#: scvi-tools model name (``registry_['model_name']``) -> atlasmap class name and converter.
_IMPORTERS: dict[str, _ImporterEntry] = {"SCVI": _ImporterEntry("SCVI", _import_scvi)}


def register_importer(scvi_tools_model: str, atlasmap_class: str) -> Callable[[Importer], Importer]:
    """Decorator registering ``convert(ckpt, cls, adata) -> model`` for a scvi-tools model type.

    Example: ``@register_importer("SCANVI", "SCANVI")`` above a function that builds an atlasmap SCANVI
    from a :class:`ScviToolsCheckpoint` (reusing :func:`registry_from_scvi_tools`, :func:`load_fc_stack`).
    """

    def decorate(convert: Importer) -> Importer:
        _IMPORTERS[scvi_tools_model] = _ImporterEntry(atlasmap_class, convert)
        return convert

    return decorate


def _atlasmap_class(name: str) -> type:
    from atlasmap.io import _model_classes

    classes = _model_classes()
    if name not in classes:
        raise ModelFileError(f"importing scvi-tools {name} models needs atlasmap.{name}, which this atlasmap lacks.")
    return classes[name]


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
    ckpt = read_scvi_tools_checkpoint(dir_path, prefix=prefix)
    name = ckpt.model_name
    entry = _IMPORTERS.get(name)
    if entry is None:
        known = ", ".join(sorted(_IMPORTERS))
        raise ModelFileError(f"{ckpt.path} holds a scvi-tools {name} model (scvi-tools {ckpt.scvi_version}); "
                             f"atlasmap imports scvi-tools {known} models.")
    if ckpt.registry.get("setup_method_name", "setup_anndata") != "setup_anndata":
        raise ModelFileError(f"{ckpt.path} was set up with scvi-tools' {ckpt.registry['setup_method_name']}; "
                             "atlasmap imports models set up with setup_anndata.")
    cls = _atlasmap_class(entry.atlasmap_class)
    if expected is not None and expected is not cls:
        from atlasmap.io import _model_classes

        other_model = _model_classes().get(expected.__name__) is expected  # e.g. SCANVI, a subclass of SCVI
        if other_model or not (issubclass(expected, cls) or issubclass(cls, expected)):
            raise ModelFileError(f"{ckpt.path} holds a scvi-tools {name} model; import it with "
                                 f"atlasmap.{cls.__name__}.from_scvi_tools.")
        if issubclass(expected, cls):
            cls = expected  # a user's own subclass of the matching class
    model = entry.convert(ckpt, cls, adata)
    if adata is not None:
        model._cells()  # validate the AnnData against the imported registry now (InputError)
    return model


__all__ = ["SCVI_TOOLS_MODEL_FILE", "ModuleWriter", "ScviToolsCheckpoint", "StateReader", "from_scvi_tools",
           "load_fc_stack", "read_scvi_tools_checkpoint", "register_importer", "registry_from_scvi_tools",
           "scvi_config_from_checkpoint", "scvi_module_from_checkpoint", "split_injected_weight"]
