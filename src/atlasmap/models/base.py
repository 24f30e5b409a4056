"""What every atlasmap model class shares: data preparation, training, latent, save/load, surgery entry.

One small base class; the model classes (SCVI, ...) only say how to build their module and what
extra per-cell fields they need. The surgery itself is :mod:`atlasmap.surgery`, the file formats
:mod:`atlasmap.io`; :mod:`atlasmap.models.persistence` and :mod:`atlasmap.models.interop` join them to
the classes.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
from torch import nn

from atlasmap import surgery
from atlasmap.data.backed import is_backed, prepare_backed_cells
from atlasmap.data.loader import CellData, prepare_cells
from atlasmap.data.minified import StoredLatent, is_minified, minified_error, read_stored_latent
from atlasmap.data.registry import Registry
from atlasmap.data.resident import place_cells
from atlasmap.errors import InputError, NotTrainedError, arg
from atlasmap.models.interop import from_scvi_tools
from atlasmap.models.persistence import load_model, save_model
from atlasmap.runtime import resolve_device
from atlasmap.surgery import surgery_options
from atlasmap.training import TrainConfig, default_max_epochs, evaluate_loss, train_module


class BaseModel:
    """Shared behaviour of the user-facing model classes.

    Attributes
    ----------
    adata
        The AnnData the model was set up on (reference) or mapped (query); never modified.
    registry
        How the model reads an AnnData (genes, covariate categories, counts layer).
    module
        The torch module.
    history
        Per-epoch training records (lists keyed by metric name), appended by every ``train`` call.
    stored_latent
        Where a minified AnnData (scvi-hub) of this model's reference keeps the reference cells' latent
        (``None``: the model has none). Set by ``from_scvi_tools`` for models saved minified; query models
        keep it, because surgery leaves the reference latent unchanged.
    """

    _module_cls: ClassVar[type[nn.Module]]
    _config_cls: ClassVar[type]

    adata: Any
    registry: Registry
    module: nn.Module
    history: dict[str, list]
    is_trained: bool
    key_map: dict[str, str]
    surgery: dict[str, Any] | None
    min_gene_overlap: float | None
    var_names_column: str | None
    stored_latent: StoredLatent | None

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def _from_parts(cls, *, adata: Any, registry: Registry, module: nn.Module, history: dict | None = None,
                    is_trained: bool = False, key_map: dict[str, str] | None = None,
                    surgery: dict[str, Any] | None = None, extra: dict[str, Any] | None = None,
                    stored_latent: StoredLatent | None = None) -> BaseModel:
        self = cls.__new__(cls)
        self._init_parts(adata=adata, registry=registry, module=module, history=history, is_trained=is_trained,
                         key_map=key_map, surgery=surgery, extra=extra, stored_latent=stored_latent)
        return self

    def _init_parts(self, *, adata: Any, registry: Registry, module: nn.Module, history: dict | None = None,
                    is_trained: bool = False, key_map: dict[str, str] | None = None,
                    surgery: dict[str, Any] | None = None, extra: dict[str, Any] | None = None,
                    stored_latent: StoredLatent | None = None) -> None:
        self.adata = adata
        self.stored_latent = stored_latent
        self.registry = registry
        self.module = module
        self.history = dict(history or {})
        self.is_trained = is_trained
        self.key_map = dict(key_map or {})
        self.surgery = surgery
        self.min_gene_overlap = None
        self.var_names_column = None
        self._cells_cache: tuple[int, CellData] | None = None
        self._restore_extra(extra or {})
        module.eval()

    def _extra_state(self) -> dict[str, Any]:
        """Class-specific JSON-able state saved in config.json (override in subclasses)."""
        return {}

    def _restore_extra(self, extra: dict[str, Any]) -> None:
        """Inverse of :meth:`_extra_state`."""

    def _add_fields(self, cells: CellData, adata: Any, *, training: bool) -> CellData:
        """Add model-specific per-cell tensors (labels, proteins, ...) to ``cells``."""
        return cells

    def _init_new_batches(self, cells: CellData, added: dict[str, tuple[str, ...]]) -> None:
        """After surgery: initialise per-batch state of the new batches from the query (override)."""

    def _default_max_epochs(self, n_cells: int) -> int:
        """Epochs of ``train()`` without ``max_epochs`` (override, e.g. short fine-tuning after pre-training)."""
        return default_max_epochs(n_cells)

    # ------------------------------------------------------------------ data
    def _cells(self, adata: Any = None, *, training: bool = False, what: str | None = None) -> CellData:
        """Validated, aligned tensors of ``adata`` (default: the model's own AnnData, cached). ``what`` names the
        computation in the error for a minified AnnData (which has no counts)."""
        own = adata is None or adata is self.adata
        adata = self.adata if adata is None else adata
        if adata is None:
            raise InputError("this model was loaded without data; pass adata= (an AnnData with the model's genes).")
        if is_minified(adata):
            raise minified_error(what or ("training" if training else "this computation"))
        if own and self._cells_cache is not None and self._cells_cache[0] == id(adata):
            return self._cells_cache[1]
        # an AnnData opened backed (read_backed / read_h5ad(backed="r")) is streamed from disk in chunks
        kwargs = dict(key_map=self.key_map, min_gene_overlap=self.min_gene_overlap,
                      var_names_column=self.var_names_column)
        if is_backed(adata):
            cells = prepare_backed_cells(adata, self.registry, **kwargs)
        else:  # the loss's data constants only for data the model may train on
            cells = prepare_cells(adata, self.registry, likelihood_constants=own or training, **kwargs)
        cells = self._add_fields(cells, adata, training=training)
        if own:
            self._cells_cache = (id(adata), cells)
        return cells

    def _device(self) -> torch.device:
        return next(self.module.parameters()).device

    # ------------------------------------------------------------------ training
    def train(
        self,
        max_epochs: int | None = None,
        *,
        batch_size: int = 128,
        lr: float = 1e-3,
        weight_decay: float = 1e-6,
        n_epochs_kl_warmup: int | None = 400,
        train_size: float = 0.9,
        early_stopping: bool = False,
        early_stopping_patience: int = 45,
        seed: int = 0,
        device: str = "auto",
        progress_bar: bool = True,
        check_val_every_n_epoch: int = 1,
        deterministic: bool = False,
    ) -> BaseModel:
        """Train the model on its AnnData.

        Parameters
        ----------
        max_epochs
            Passes over the data; default ``min(400, round(20000 / n_cells * 400))`` as in scvi-tools.
        batch_size, lr, weight_decay
            Minibatch size, Adam learning rate and L2 weight decay (applied to trainable tensors only).
        n_epochs_kl_warmup
            Epochs over which the KL weight rises linearly from 0 to 1 (``None``: no warm-up).
        train_size
            Fraction of cells used for training; the rest is the validation set.
        early_stopping, early_stopping_patience
            Stop when the validation ELBO has not improved for this many epochs.
        seed
            Seeds the split, shuffling and sampling: the same seed gives bit-identical results on CPU.
        device
            ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ... The model
            moves there and stays there (see :attr:`device`, :meth:`to_device`).
        progress_bar
            Show a tqdm progress bar.
        check_val_every_n_epoch
            Compute the validation loss every this many epochs (and in the last one; every epoch under
            early stopping). Epochs without it have ``None`` in the validation entries of :attr:`history`.
        deterministic
            Use PyTorch's deterministic algorithms during this call, so that two runs on CUDA with the same
            seed give the same bits (needs ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` in the environment; CPU
            training is deterministic without it).

        Returns
        -------
        The model itself, with :attr:`history` extended.
        """
        cells = self._cells(training=True, what="training")
        if max_epochs is None:  # not `max_epochs or ...`: max_epochs=0 means no training
            max_epochs = self._default_max_epochs(cells.n_cells)
        if max_epochs == 0 and self.surgery:
            # the Census way: embed the query right after surgery (new blocks as initialised); the model
            # moves to the device asked for, as training would move it
            self.to_device(device)
            return self
        if max_epochs == 0:
            raise InputError(f"{arg('max_epochs', 0)} trains nothing, and a reference model must be trained; "
                             f"give {arg('max_epochs')} at least 1 (0 is for query models: embed right after surgery).")
        if self.surgery and not any(p.requires_grad for p in self.module.parameters()):
            raise InputError(
                "this query model has nothing to train: the query holds only categories the reference knows, so "
                f"surgery added no parameters. Embed it as it is with {arg('max_epochs', 0)} (the reference's "
                f"own latent space), or fine-tune every weight with {arg('unfrozen', True)} in load_query_data "
                "(the reference latent then changes).")
        config = TrainConfig(
            max_epochs=max_epochs, batch_size=batch_size, lr=lr,
            weight_decay=weight_decay, n_epochs_kl_warmup=n_epochs_kl_warmup, train_size=train_size,
            early_stopping=early_stopping, early_stopping_patience=early_stopping_patience, seed=seed,
            device=device, progress_bar=progress_bar, check_val_every_n_epoch=check_val_every_n_epoch,
            deterministic=deterministic,
        )
        self.history = train_module(self.module, cells, config, self.history)
        self.is_trained = True
        if not self.surgery:  # the reference weights changed: a minified AnnData's stored latent is stale now
            self.stored_latent = None
        return self

    # ------------------------------------------------------------------ outputs
    def _check_trained(self) -> None:
        if not self.is_trained:
            raise NotTrainedError("the model is not trained yet; call .train() first.")

    @torch.inference_mode()
    def get_latent_representation(
        self, adata: Any = None, *, give_mean: bool = True, batch_size: int = 4096, seed: int = 0
    ) -> np.ndarray:
        """Latent coordinates of each cell (cells x n_latent, float32).

        Parameters
        ----------
        adata
            Cells to embed (default: the model's AnnData). Genes are aligned to the model by name;
            categories must be known to the model (map new batches with ``load_query_data``).
        give_mean
            Return the posterior mean; otherwise one sample of q(z|x).

        A minified AnnData (scvi-hub reference without counts) gives the posterior stored in its ``.obsm``.
        """
        self._check_trained()
        source = self.adata if adata is None else adata
        if source is not None and is_minified(source):
            qzm, qzv = self._stored_latent(source)
            if give_mean:
                return qzm
            noise = torch.randn(qzm.shape, generator=torch.Generator(device="cpu").manual_seed(seed)).numpy()
            return (qzm + np.sqrt(qzv) * noise).astype(np.float32)
        device = self._device()
        # on an accelerator the cells go over once (when they fit) and the latent comes back once: no
        # host gather, copy or synchronisation per minibatch; on the CPU nothing moves
        cells = place_cells(self._cells(adata), device)
        self.module.eval()
        gen = torch.Generator(device="cpu").manual_seed(seed)
        parts = []
        for _rows, batch in cells.iter_ordered(batch_size, device):
            inf = self.module.inference(batch, sample=False)
            z = inf["qz_m"]
            if not give_mean:
                noise = torch.randn(z.shape, generator=gen).to(device)
                z = z + inf["qz_v"].sqrt() * noise
            parts.append(z)
        if not parts:
            return np.empty((0, self.module.config.n_latent), dtype=np.float32)
        return torch.cat(parts).cpu().numpy().astype(np.float32, copy=False)

    def get_elbo(self, adata: Any = None, *, batch_size: int = 1024, seed: int = 0) -> float:
        """Negative ELBO per cell (reconstruction NLL + KL, averaged over the cells; lower is better): the
        quantity of ``history["elbo_validation"]``, here on any cells, e.g. to compare models on the same
        cells (scvi-tools' ``get_elbo`` computes the same per-cell quantity).

        Parameters
        ----------
        adata
            Cells to evaluate (default: the model's AnnData), with raw counts and known categories.
        seed
            Seeds the latent samples of the reconstruction term.
        """
        self._check_trained()
        cells = self._cells(adata, training=True, what="get_elbo")  # with log x!: the full count likelihood
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            totals = evaluate_loss(self.module, cells, np.arange(cells.n_cells), 1.0, self._device(), batch_size)
        return float(totals[1] + totals[2]) / cells.n_cells

    def _stored_latent(self, adata: Any) -> tuple[np.ndarray, np.ndarray]:
        """Posterior mean and variance stored in a minified ``adata`` of this model's reference cells.

        Refused (:class:`InputError`) when this model cannot vouch for it: it has no record of a stored latent,
        the AnnData belongs to another model, or the model is a query whose surgery let the reference latent
        change (``unfrozen``, ``freeze_expression=False``, unfrozen encoder batch norm).
        """
        opts = (self.surgery or {}).get("options") or {}
        stacks = self.module.surgery_stacks()["encoder"] if self.surgery else []
        encoder_bn = any(isinstance(n, nn.BatchNorm1d) for stack in stacks for n in stack.norms)
        changed = [flag for flag, moved in (("unfrozen=True", opts.get("unfrozen", False)),
                                            ("freeze_expression=False", not opts.get("freeze_expression", True)),
                                            ("freeze_batchnorm_encoder=False",
                                             encoder_bn and not opts.get("freeze_batchnorm_encoder", True)))
                   if moved]
        if changed:
            raise InputError(f"this query model was mapped with {', '.join(changed)}, which changes the reference "
                             "cells' latent: the latent stored in the minified reference AnnData is out of date, and "
                             "recomputing it needs the reference counts. Map with the default surgery options, or "
                             "pass the full reference AnnData.")
        return read_stored_latent(adata, self.stored_latent, self.module.config.n_latent)

    # ------------------------------------------------------------------ persistence
    def save(self, dir_path: str | Path, *, overwrite: bool = False) -> Path:
        """Save to a directory (``config.json`` + ``weights.safetensors``), atomically.

        Raises :class:`~atlasmap.errors.InputError` if the directory exists and ``overwrite`` is False, or
        if it holds anything but an atlasmap model (atlasmap never deletes files it did not write).
        """
        return save_model(self, dir_path, overwrite=overwrite)

    @classmethod
    def load(cls, dir_path: str | Path, adata: Any = None, *, device: str = "cpu") -> BaseModel:
        """Load a saved model; reads JSON and safetensors only (no code is executed).

        ``device``: where the weights go (default the CPU, whatever device the model was trained on;
        ``"auto"``, ``"cuda"``, ``"cuda:1"``, ...).
        """
        return load_model(dir_path, adata=adata, expected=cls, device=device)

    def to_device(self, device: str | torch.device) -> BaseModel:
        """Move the model's weights to ``device`` (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"auto"``); returns the
        model. ``train`` moves the model to its ``device`` argument too, and the model stays there."""
        self.module.to(resolve_device(str(device)))
        return self

    @property
    def device(self) -> torch.device:
        """The device the model's weights are on."""
        return self._device()

    @classmethod
    def load_query_data(cls, adata: Any, reference: BaseModel | str | Path, *, batch_key: str | None = None,
                        layer: str | None = None, min_gene_overlap: float | None = None,
                        var_names_column: str | None = None, batch_init: str = "random", seed: int = 0,
                        **options: Any) -> BaseModel:
        """Map a query onto a reference by scArches architectural surgery (:mod:`atlasmap.surgery`).

        Parameters
        ----------
        adata
            Query AnnData with raw counts (same layer as the reference). Never modified.
        reference
            A trained model of this class (or a subclass), or the directory of a saved one.
        batch_key
            Query ``.obs`` column holding the batch, when it is named differently from the reference's
            batch key (required when the reference was set up without a batch key).
        layer
            Query layer holding the raw counts, when it differs from the reference's (by default the
            reference's; where that does not hold counts, the one layer or ``.raw`` that does, with a warning).
        min_gene_overlap
            Fraction of reference genes the query must have (default 0.5).
        var_names_column
            Match the query's genes to the reference's by this ``.var`` column (e.g. ``"gene_ids"``) instead
            of ``var_names``. By default ``var_names`` are used, or a ``.var`` column that matches clearly
            more of the reference's genes, with a warning naming it; Ensembl version suffixes are ignored.
        batch_init
            How new batches start: ``"random"`` (scArches; default) or ``"closest"``: from the reference batch
            whose parameters explain each new batch's cells best (lowest negative ELBO), see
            :func:`atlasmap.surgery.init_from_closest_batches` — useful when mapping without query training
            (``max_epochs=0``) and as a start of it.
        seed
            Seeds the initialisation of the new blocks.
        **options
            :class:`~atlasmap.surgery.SurgeryOptions` fields (``freeze_expression``, ``unfrozen``, ...).

        Returns
        -------
        A model of the reference's class on the query, ready for ``.train()``.
        """
        opts = surgery_options(options)
        if batch_init not in ("random", "closest"):
            raise InputError(f"batch_init must be 'random' or 'closest'; got {batch_init!r}.")
        if isinstance(reference, str | Path):
            reference = load_model(reference)
        if not isinstance(reference, cls):
            raise InputError(f"the reference is a {type(reference).__name__} model; use "
                             f"{type(reference).__name__}.load_query_data (or atlasmap.map_query).")
        reference._check_trained()
        plan = surgery.extend(reference.module, reference.registry, adata, key_map=reference.key_map,
                              batch_key=batch_key, seed=seed)
        if not any(plan.added.values()) and not opts.unfrozen:
            warnings.warn(
                "the query holds only categories the reference knows: surgery adds no parameters, so there is "
                f"nothing to train by default. Embed the query as it is with {arg('max_epochs', 0)} in train(), "
                f"or fine-tune every weight with {arg('unfrozen', True)} (the reference latent then changes).",
                UserWarning, stacklevel=2)
        registry = plan.registry if layer is None else dataclasses.replace(plan.registry, layer=layer)
        query = type(reference)._from_parts(adata=adata, registry=registry, module=plan.module, history={},
                                            is_trained=False, key_map=plan.key_map,
                                            surgery=surgery.record(plan, opts), extra=reference._extra_state(),
                                            stored_latent=reference.stored_latent)
        query.min_gene_overlap = min_gene_overlap
        query.var_names_column = var_names_column
        cells = query._cells(training=True)  # validates the query now, before any training
        started_from = {}
        if batch_init == "closest":
            started_from = surgery.init_from_closest_batches(plan.module, cells, registry, plan.added, seed=seed)
        query._init_new_batches(cells, plan.added)  # model-specific per-batch state (priors from the query's data)
        query.surgery = surgery.freeze(plan, opts)
        query.surgery["batch_init"] = {"method": batch_init, "started_from": started_from}
        query.is_trained = reference.is_trained  # reference weights are trained; new blocks start random
        return query

    @classmethod
    def from_scvi_tools(cls, dir_path: str | Path, adata: Any = None, *, prefix: str | None = None) -> BaseModel:
        """Import a reference saved by scvi-tools (``model.pt``) without executing code from the file.

        The result gives scvi-tools' latent (to float rounding) and maps queries with
        ``load_query_data``; architectures atlasmap cannot represent are refused with
        :class:`~atlasmap.errors.ModelFileError`. See :mod:`atlasmap.io.scvi_tools`. A scvi-hub directory's
        ``adata.h5ad`` is attached when ``adata`` is not given (a minified one supplies its stored latent).
        """
        return from_scvi_tools(dir_path, adata, prefix=prefix, expected=cls)

    def obsm_outputs(self, adata: Any = None) -> dict[str, Any]:
        """Per-cell outputs beyond the latent, keyed by the ``.obsm`` slot that mapped AnnData get (none here;
        totalVI: denoised proteins, foreground probability, measured mask)."""
        return {}

    # ------------------------------------------------------------------ argument helpers shared by the classes
    def _batch_codes(self, transform_batch: str | Sequence[str] | None) -> list[int | None]:
        """Batch codes of ``transform_batch`` (``[None]``: each cell's own batch)."""
        if transform_batch is None:
            return [None]
        names = [transform_batch] if isinstance(transform_batch, str) else list(transform_batch)
        cats = self.registry.categories[self.registry.batch_key]
        codes: list[int | None] = []
        for name in names:
            if str(name) not in cats:
                raise InputError(f"transform_batch {name!r} is not a batch of this model (batches: {', '.join(cats)}).")
            codes.append(cats.index(str(name)))
        if not codes:
            raise InputError("transform_batch is an empty list; pass None or at least one batch.")
        return codes

    def _gene_indices(self, gene_list: Sequence[str] | None) -> np.ndarray:
        """Positions of ``gene_list`` among the model's genes (all genes for ``None``)."""
        if gene_list is None:
            return np.arange(self.registry.n_vars)
        idx = pd.Index(self.registry.var_names).get_indexer(list(gene_list))
        if (idx < 0).any():
            missing = [g for g, i in zip(gene_list, idx, strict=True) if i < 0][:5]
            raise InputError(f"genes not in the model: {', '.join(map(repr, missing))}.")
        return idx

    def __repr__(self) -> str:
        cfg = self.module.config
        status = "trained" if self.is_trained else "untrained"
        cats = ", ".join(f"{k}: {len(v)}" for k, v in self.registry.categories.items())
        kind = "query" if self.surgery else "reference"
        return (f"{type(self).__name__}({kind}, {status}; {self.registry.n_vars} genes, "
                f"n_latent={cfg.n_latent}, n_layers={cfg.n_layers}, n_hidden={cfg.n_hidden}; categories {cats})")


#: Where a model class may normalise hidden layers (``use_layer_norm`` / ``use_batch_norm``).
NORM_CHOICES = ("none", "encoder", "decoder", "both")


def check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    """An :class:`InputError` naming the argument and its choices unless ``value`` is one of them."""
    if value not in choices:
        raise InputError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}.")
