"""The user-facing :class:`SCANVI` model: semi-supervised scVI with a label classifier.

Labels
------
The labels live in ``adata.obs[labels_key]``; cells whose label is ``unlabeled_category`` are unlabelled.
The model's label list is the set of the other values present in the reference (in category order for a
categorical column, sorted otherwise) and is saved with the model. Documented behaviour for edge cases:

* ``labels_key`` missing, or NaN in the reference's labels: :class:`~atlasmap.errors.InputError` (fill
  NaN with the unlabelled category to mark those cells unlabelled).
* ``unlabeled_category`` that never occurs: allowed (as in scvi-tools) — every cell is labelled.
* ``unlabeled_category`` covering every cell: :class:`~atlasmap.errors.InputError` — there is nothing to
  learn labels from; use :class:`~atlasmap.SCVI`.
* A single label: allowed, with a warning; the model then predicts that label for every cell with
  probability 1 (a classifier cannot say "none of these"; use kNN transfer uncertainty for that).
* Query labels (surgery): cells whose label is a known reference label are labelled (partly labelled
  queries); NaN, the unlabelled category and labels the reference lacks count as unlabelled. Unknown
  labels are reported in a warning and left untouched in the AnnData; scANVI cannot add labels.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch

from atlasmap.data.loader import CellData, minibatches
from atlasmap.data.minified import is_minified
from atlasmap.data.registry import obs_column
from atlasmap.errors import InputError, ModelFileError
from atlasmap.models.base import check_choice
from atlasmap.models.registry import register_model
from atlasmap.models.scvi import SCVI
from atlasmap.modules.scanvi import SCANVIConfig, SCANVIModule
from atlasmap.modules.scvi import NormWhere
from atlasmap.training import default_max_epochs

UNLABELED = -1


def label_categories(adata: Any, labels_key: str, unlabeled_category: str) -> tuple[str, ...]:
    """The labels of a reference: values of ``adata.obs[labels_key]`` other than ``unlabeled_category``.

    Raises
    ------
    InputError
        If the column is missing, holds NaN, or every cell is unlabelled.
    """
    col = obs_column(adata, labels_key, kind="labels")
    values = col.astype(str)
    unlabeled = str(unlabeled_category)
    if isinstance(col.dtype, pd.CategoricalDtype):
        present = set(values.unique())
        labels = [str(c) for c in col.cat.categories if str(c) in present and str(c) != unlabeled]
    else:
        labels = sorted(v for v in values.unique() if v != unlabeled)
    if not labels:
        raise InputError(
            f"every cell of adata.obs[{labels_key!r}] is the unlabeled category {unlabeled!r}: scANVI has no "
            "labels to learn from. Label some cells, or use atlasmap.SCVI (CLI: --model scvi) for an "
            "unsupervised reference."
        )
    if len(labels) == 1:
        warnings.warn(
            f"adata.obs[{labels_key!r}] has a single label ({labels[0]!r}): the model will predict it for "
            "every cell with probability 1.", UserWarning, stacklevel=3,
        )
    return tuple(labels)


@register_model
class SCANVI(SCVI):
    """single-cell ANnotation using Variational Inference (Xu et al. 2021) built for reference mapping.

    scVI with a label classifier q(y | z1) and a label-conditioned prior on the latent ``z1``; trained
    semi-supervised on labelled and unlabelled cells. The usual recipe pre-trains scVI and fine-tunes
    scANVI (:meth:`from_scvi_model`). Query cells are mapped with :meth:`load_query_data` exactly like
    scVI (the classifier stays frozen by default), then labelled with :meth:`predict`.

    Parameters
    ----------
    adata
        AnnData with raw counts in ``.X`` or ``layers[layer]``. Never modified.
    batch_key
        ``.obs`` column of the batch (``None``: one batch).
    labels_key
        ``.obs`` column of the cell labels.
    unlabeled_category
        The value of ``labels_key`` that marks unlabelled cells (it need not occur).
    linear_classifier
        Classify with one linear layer instead of an MLP of ``n_layers`` x ``n_hidden`` (scvi-tools' default).
    classification_ratio
        Weight of the classification loss of labelled cells (scvi-tools' default 50).
    label_prior
        Prior p(y): ``"uniform"`` (scvi-tools) or ``"empirical"`` (label frequencies of the labelled cells).
    categorical_covariate_keys, continuous_covariate_keys, layer, n_hidden, n_latent, n_layers, dropout_rate,
    gene_likelihood, dispersion, encode_covariates, deeply_inject_covariates, use_layer_norm,
    use_batch_norm, use_observed_lib_size, seed
        As in :class:`~atlasmap.SCVI`.

    Examples
    --------
    >>> scvi_ref = atlasmap.SCVI(adata_ref, batch_key="batch").train(max_epochs=100)
    >>> ref = atlasmap.SCANVI.from_scvi_model(scvi_ref, labels_key="cell_type",
    ...                                      unlabeled_category="Unknown").train(max_epochs=20)
    >>> query = atlasmap.SCANVI.load_query_data(adata_query, ref).train(max_epochs=100)
    >>> adata_query.obs["predicted"] = query.predict()
    """

    _module_cls = SCANVIModule
    _config_cls = SCANVIConfig
    module: SCANVIModule

    labels_key: str
    unlabeled_category: str
    labels: tuple[str, ...]
    pretrained: bool

    def __init__(
        self,
        adata: Any,
        *,
        batch_key: str | None = None,
        labels_key: str,
        unlabeled_category: str = "Unknown",
        linear_classifier: bool = False,
        classification_ratio: float = 50.0,
        label_prior: Literal["uniform", "empirical"] = "uniform",
        categorical_covariate_keys: list[str] | None = None,
        continuous_covariate_keys: list[str] | None = None,
        layer: str | None = None,
        n_hidden: int = 128,
        n_latent: int = 10,
        n_layers: int = 1,
        dropout_rate: float = 0.1,
        gene_likelihood: Literal["zinb", "nb", "poisson"] = "zinb",
        dispersion: Literal["gene", "gene-batch"] = "gene",
        encode_covariates: bool = True,
        deeply_inject_covariates: bool = True,
        use_layer_norm: NormWhere = "both",
        use_batch_norm: NormWhere = "none",
        use_observed_lib_size: bool = True,
        seed: int = 0,
    ) -> None:
        _check_label_options(classification_ratio, label_prior)
        self._set_labels(labels_key, unlabeled_category, label_categories(adata, labels_key, unlabeled_category))
        self.pretrained = False
        self._label_options = {"linear_classifier": bool(linear_classifier),
                               "classification_ratio": float(classification_ratio), "label_prior": label_prior}
        super().__init__(
            adata, batch_key=batch_key, categorical_covariate_keys=categorical_covariate_keys,
            continuous_covariate_keys=continuous_covariate_keys, layer=layer, n_hidden=n_hidden,
            n_latent=n_latent, n_layers=n_layers, dropout_rate=dropout_rate, gene_likelihood=gene_likelihood,
            dispersion=dispersion, encode_covariates=encode_covariates,
            deeply_inject_covariates=deeply_inject_covariates, use_layer_norm=use_layer_norm,
            use_batch_norm=use_batch_norm, use_observed_lib_size=use_observed_lib_size, seed=seed,
        )
        self._init_label_prior()

    @classmethod
    def from_scvi_model(
        cls,
        scvi_model: SCVI,
        *,
        labels_key: str,
        unlabeled_category: str = "Unknown",
        adata: Any = None,
        linear_classifier: bool = False,
        classification_ratio: float = 50.0,
        label_prior: Literal["uniform", "empirical"] = "uniform",
        seed: int = 0,
    ) -> SCANVI:
        """A scANVI model initialised with the weights of a trained scVI reference (then call ``train``).

        The scVI encoder, decoder, dispersions and library priors are copied exactly; the classifier and
        the label stacks start random. Without ``max_epochs``, ``train()`` then runs scvi-tools' short
        fine-tuning schedule (a third of the usual heuristic, between 2 and 10 epochs).

        Parameters
        ----------
        scvi_model
            A trained :class:`~atlasmap.SCVI` reference (not a query model from ``load_query_data``).
        labels_key, unlabeled_category
            As in :class:`SCANVI`.
        adata
            The cells to train on (default: the scVI model's AnnData); must have the model's genes and
            categories, and the labels column.
        linear_classifier, classification_ratio, label_prior
            As in :class:`SCANVI`.
        seed
            Seeds the initialisation of the classifier and label stacks.
        """
        if not isinstance(scvi_model, SCVI) or isinstance(scvi_model, SCANVI):
            raise InputError(f"from_scvi_model needs an atlasmap.SCVI model, got {type(scvi_model).__name__}.")
        scvi_model._check_trained()
        if scvi_model.surgery:
            raise InputError("from_scvi_model needs a reference scVI model; this one is a query model made by "
                             "load_query_data. Build scANVI on the reference, then map the query with "
                             "SCANVI.load_query_data.")
        adata = scvi_model.adata if adata is None else adata
        if adata is None:
            raise InputError("the scVI model was loaded without data; pass adata= (the labelled reference cells).")
        _check_label_options(classification_ratio, label_prior)
        labels = label_categories(adata, labels_key, unlabeled_category)
        config = SCANVIConfig(**{**asdict(scvi_model.module.config), "n_labels": len(labels),
                                 "linear_classifier": bool(linear_classifier),
                                 "classification_ratio": float(classification_ratio),
                                 "label_prior": label_prior})
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            module = SCANVIModule(config)
        result = module.load_state_dict(scvi_model.module.state_dict(), strict=False)
        own = {name for name in module.state_dict() if name.split(".")[0] in _LABEL_PARTS}
        if result.unexpected_keys or set(result.missing_keys) != own:
            raise InputError(f"the scVI model's weights do not fit a scANVI module (unexpected "
                             f"{result.unexpected_keys[:3]}, missing {sorted(set(result.missing_keys) - own)[:3]}).")
        module.to(scvi_model._device())
        model = cls._from_parts(
            adata=adata, registry=scvi_model.registry, module=module, key_map=scvi_model.key_map,
            extra={"labels_key": labels_key, "unlabeled_category": str(unlabeled_category),
                   "labels": list(labels), "pretrained": True},
        )
        model._init_label_prior()
        return model

    # ------------------------------------------------------------------ label state
    def _set_labels(self, labels_key: str, unlabeled_category: str, labels: tuple[str, ...]) -> None:
        self.labels_key = str(labels_key)
        self.unlabeled_category = str(unlabeled_category)
        self.labels = tuple(labels)

    def _config_extras(self) -> dict[str, Any]:
        return {"n_labels": len(self.labels), **self._label_options}

    def _extra_state(self) -> dict[str, Any]:
        return {"labels_key": self.labels_key, "unlabeled_category": self.unlabeled_category,
                "labels": list(self.labels), "pretrained": self.pretrained}

    def _restore_extra(self, extra: dict[str, Any]) -> None:
        if not extra:  # constructor: the labels were set before the base class initialised
            return
        try:
            self._set_labels(extra["labels_key"], extra["unlabeled_category"], tuple(map(str, extra["labels"])))
        except (KeyError, TypeError) as err:
            raise ModelFileError(f"scANVI label state is incomplete ({err!r}); the model directory is corrupt.") from None
        self.pretrained = bool(extra.get("pretrained", False))
        n_labels = self.module.config.n_labels
        if len(self.labels) != n_labels:
            raise ModelFileError(f"scANVI state lists {len(self.labels)} labels but the module has {n_labels}; "
                             "the model directory is corrupt.")

    def _init_label_prior(self) -> None:
        if self.module.config.label_prior != "empirical":
            return
        codes = self._cells().fields["y"].numpy()
        counts = np.bincount(codes[codes >= 0], minlength=len(self.labels)).astype(np.float64)
        prior = (counts + 1.0) / (counts.sum() + len(self.labels))  # add-one: no label gets zero mass
        self.module.y_prior.copy_(torch.as_tensor(prior, dtype=torch.float32))

    def _label_codes(self, adata: Any, *, training: bool) -> np.ndarray:
        """Label code of each cell of ``adata`` (``-1``: unlabelled), with the documented rules."""
        n = adata.n_obs
        is_query = bool(self.surgery)
        if self.labels_key not in adata.obs.columns:
            if training and not is_query:
                obs_column(adata, self.labels_key, kind="labels")  # raises the standard error
            return np.full(n, UNLABELED, dtype=np.int64)
        col = adata.obs[self.labels_key]
        missing = col.isna().to_numpy()
        if missing.any() and training and not is_query:
            obs_column(adata, self.labels_key, kind="labels")  # raises: NaN in the reference's labels
        values = col.astype(str).to_numpy()
        codes = pd.Index(self.labels).get_indexer(values).astype(np.int64)
        unknown = (codes < 0) & ~missing & (values != self.unlabeled_category)
        if training and unknown.any():
            names = sorted(set(values[unknown]))
            shown = ", ".join(map(repr, names[:5])) + (", ..." if len(names) > 5 else "")
            warnings.warn(
                f"{int(unknown.sum())} cells have labels in adata.obs[{self.labels_key!r}] that the reference "
                f"does not know ({shown}); they are treated as unlabelled (scANVI cannot add labels) and kept "
                "as they are in the AnnData. Their predictions will be one of the reference labels — compare "
                "with kNN transfer uncertainty to spot new cell types.",
                UserWarning, stacklevel=5,
            )
        if training and is_query and (codes >= 0).any():
            warnings.warn(
                f"{int((codes >= 0).sum())} of {n} query cells carry reference labels in "
                f"adata.obs[{self.labels_key!r}] and train as labelled cells. To map the query without its "
                f"labels (e.g. to evaluate predictions against them), set that column to "
                f"{self.unlabeled_category!r} or remove it (CLI: --ignore-query-labels).",
                UserWarning, stacklevel=5,
            )
        return np.where(codes >= 0, codes, UNLABELED)

    def _add_fields(self, cells: CellData, adata: Any, *, training: bool) -> CellData:
        if training or adata is self.adata:
            codes = self._label_codes(adata, training=training)
        else:  # labels are not needed for inference on other data
            codes = np.full(adata.n_obs, UNLABELED, dtype=np.int64)
        cells.fields["y"] = torch.from_numpy(codes)
        return cells

    def _default_max_epochs(self, n_cells: int) -> int:
        epochs = default_max_epochs(n_cells)
        if self.pretrained and not self.surgery:
            return int(min(10, max(2, round(epochs / 3.0))))
        return epochs

    # ------------------------------------------------------------------ outputs
    @torch.inference_mode()
    def predict(
        self, adata: Any = None, *, soft: bool = False, batch_size: int = 4096
    ) -> pd.Series | pd.DataFrame:
        """Predicted label of each cell, from the classifier q(y | z1) at the posterior mean of z1.

        Parameters
        ----------
        adata
            Cells to label (default: the model's AnnData). Its batches must be known to the model (map new
            batches with ``load_query_data`` first). A minified AnnData (scvi-hub) is labelled from its stored
            latent. Never modified.
        soft
            Return the probability of every label instead of the most probable one.
        batch_size
            Cells per forward pass.

        Returns
        -------
        A categorical Series of labels indexed by cell (``soft=False``), or a cells x labels DataFrame of
        probabilities whose rows sum to 1 (``soft=True``).
        """
        self._check_trained()
        source = self.adata if adata is None else adata
        device = self._device()
        self.module.eval()
        if source is not None and is_minified(source):  # classify the stored posterior mean (scvi-hub)
            latent = torch.from_numpy(self._stored_latent(source)[0])
            probs = np.empty((latent.shape[0], len(self.labels)), dtype=np.float32)
            for rows in minibatches(latent.shape[0], batch_size, shuffle=False):
                logits = self.module.classifier(latent[rows].to(device))
                probs[rows] = torch.softmax(logits, dim=-1).cpu().numpy()
        else:
            cells = self._cells(adata)
            probs = np.empty((cells.n_cells, len(self.labels)), dtype=np.float32)
            for rows in minibatches(cells.n_cells, batch_size, shuffle=False):
                logits = self.module.classify(cells.batch(rows, device))
                probs[rows] = torch.softmax(logits, dim=-1).cpu().numpy()
        obs_names = source.obs_names
        if soft:
            return pd.DataFrame(probs, index=obs_names, columns=list(self.labels))
        best = probs.argmax(axis=1)
        return pd.Series(pd.Categorical.from_codes(best, categories=list(self.labels)), index=obs_names,
                         name=self.labels_key)

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]}; {len(self.labels)} labels from obs[{self.labels_key!r}])"


#: Top-level submodules that scANVI adds to scVI (not in a scVI state dict).
_LABEL_PARTS = frozenset({"classifier", "encoder_z2_z1", "z2_mean", "z2_var", "decoder_z1_z2", "z1_mean", "z1_var",
                          "y_prior"})


def _check_label_options(classification_ratio: float, label_prior: str) -> None:
    check_choice("label_prior", label_prior, ("uniform", "empirical"))
    if not float(classification_ratio) >= 0.0:
        raise InputError(f"classification_ratio must be non-negative, got {classification_ratio}.")


def store_predictions(adata: Any, proba: pd.DataFrame | np.ndarray, labels: list[str] | tuple[str, ...] | None = None,
                      *, key_added: str = "atlasmap") -> None:
    """Write label predictions into ``adata`` (in place) following scanpy conventions.

    Writes ``obs[f"{key_added}_label"]`` (categorical, most probable label),
    ``obs[f"{key_added}_label_uncertainty"]`` (1 - its probability), ``obsm[f"{key_added}_label_proba"]``
    (cells x labels float32 array) and its column names in ``uns[f"{key_added}_label_proba_columns"]``.

    Parameters
    ----------
    adata
        The AnnData to annotate; rows of ``proba`` are its cells, in order.
    proba
        Probabilities, e.g. ``SCANVI.predict(soft=True)`` (a DataFrame gives the label names).
    labels
        Label names for an array ``proba``.
    key_added
        Prefix of the keys written.
    """
    if isinstance(proba, pd.DataFrame):
        labels = [str(c) for c in proba.columns]
        values = proba.to_numpy(dtype=np.float32)
    else:
        values = np.asarray(proba, dtype=np.float32)
    if labels is None or len(labels) != values.shape[1]:
        raise InputError("store_predictions needs one label name per probability column.")
    if values.shape[0] != adata.n_obs:
        raise InputError(f"store_predictions got {values.shape[0]} rows of probabilities for {adata.n_obs} cells.")
    best = values.argmax(axis=1)
    adata.obs[f"{key_added}_label"] = pd.Categorical.from_codes(best, categories=list(labels))
    adata.obs[f"{key_added}_label_uncertainty"] = 1.0 - values[np.arange(values.shape[0]), best]
    adata.obsm[f"{key_added}_label_proba"] = values
    adata.uns[f"{key_added}_label_proba_columns"] = np.asarray(list(labels), dtype=object)


__all__ = ["SCANVI", "label_categories", "store_predictions"]
