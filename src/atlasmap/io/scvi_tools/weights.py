"""Moving scvi-tools tensors into atlasmap modules: one ``FCLayers`` weight into ``W_x``, the continuous
weight and one :class:`~atlasmap.nn.layers.CovariateTable` block per covariate, checked name by name.

* scvi-tools' ``FCLayers`` apply one ``nn.Linear`` to ``[x, cont, onehot(batch), onehot(cat_1), ...]``.
  Its weight matrix is split by columns: the ``x`` columns become atlasmap's ``linear`` weight, the
  continuous-covariate columns its ``continuous`` weight, and each one-hot block, transposed, the
  reference block of that covariate's table.
* scvi-tools drops a covariate with a single category (its one-hot column would be constant). atlasmap
  gives it a **zero row**: ``W x + b + 0`` is what scvi-tools computes, and after surgery the reference
  category keeps that frozen zero row, so reference cells keep their latent exactly (scvi-tools itself
  adds an untrained random column for them).
* scvi-tools concatenates continuous covariates to the input of the *first* layer only; atlasmap injects
  them into every injected layer, so deeper layers get a zero continuous weight (again exact).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from atlasmap.errors import ModelFileError
from atlasmap.nn.layers import FCStack, InjectedLinear


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


def load_linear(writer: ModuleWriter, target: nn.Linear, reader: StateReader, prefix: str) -> None:
    """Copy the ``nn.Linear`` at ``prefix`` (``.weight``, ``.bias``) into ``target`` (shapes checked)."""
    writer.set(target.weight, reader.take(f"{prefix}.weight", tuple(target.weight.shape)))
    writer.set(target.bias, reader.take(f"{prefix}.bias", tuple(target.bias.shape)))


def load_injected_linear(writer: ModuleWriter, target: InjectedLinear, reader: StateReader, prefix: str, *,
                         n_x: int, n_cont: int, n_cat_list: Sequence[int]) -> None:
    """Fill an atlasmap :class:`~atlasmap.nn.layers.InjectedLinear` from a one-layer scvi-tools ``FCLayers``
    without norm (``prefix.fc_layers.Layer 0.0``: a head such as totalVI's ``px_scale_decoder``) whose input is
    ``[x (n_x), cont (n_cont), onehot(cat_1), ...]``."""
    n_out = target.linear.out_features
    base = f"{prefix}.fc_layers.Layer 0"
    n_eff = sum(n for n in n_cat_list if n > 1)
    weight = reader.take(f"{base}.0.weight", (n_out, n_x + n_cont + n_eff))
    w_x, w_cont, tables = split_injected_weight(weight, n_x, n_cont, n_cat_list)
    writer.set(target.linear.weight, w_x)
    writer.set(target.linear.bias, reader.take(f"{base}.0.bias", (n_out,)))
    if target.continuous is not None:
        writer.set(target.continuous.weight, w_cont)
    elif w_cont.shape[1]:
        raise ModelFileError(f"internal: continuous covariates of {base} have no atlasmap target.")
    if len(target.covariates) != len(tables):
        raise ModelFileError(f"internal: {base} injects {len(tables)} covariates, atlasmap {len(target.covariates)}.")
    for table, values in zip(target.covariates, tables, strict=True):
        writer.set(table.blocks[0], values)
    if reader.has(f"{prefix}.fc_layers.Layer 1.0.weight"):
        raise ModelFileError(f"{reader.path}: {prefix} has more than one layer; atlasmap's head has one.")


def count_fc_layers(state: dict[str, torch.Tensor], prefix: str) -> int:
    """Number of layers of the scvi-tools ``FCLayers`` at ``prefix`` (``prefix.fc_layers.Layer i.0.weight``)."""
    n = 0
    while f"{prefix}.fc_layers.Layer {n}.0.weight" in state:
        n += 1
    return n


def norm_where(value: Any, name: str, path: Path) -> str:
    if value in (True, False):  # scvi-tools < 1.0 took booleans for the encoder+decoder
        return "both" if value else "none"
    if value not in ("none", "encoder", "decoder", "both"):
        raise ModelFileError(f"{path}: unknown {name} {value!r}.")
    return str(value)


def refuse(path: Path, what: str) -> ModelFileError:
    return ModelFileError(f"cannot import {path}: the scvi-tools model uses {what}, which atlasmap's model does "
                          "not implement.")
