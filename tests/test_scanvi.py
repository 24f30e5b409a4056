"""SCANVI: the surgery invariants of the core (bit-identical reference latent, only new blocks trainable,
classifier frozen), predictions, from_scvi_model, save/load, and the documented behaviour on bad labels."""

from __future__ import annotations

import json
import warnings
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from support import SMALL, assert_unchanged, parameters, snapshot, split_by_batch

import atlasmap
from atlasmap.errors import InputError, ModelFileError, NotTrainedError
from atlasmap.models.scanvi import SCANVI, store_predictions
from atlasmap.modules.scanvi import SCANVIConfig, SCANVIModule
from atlasmap.training import default_max_epochs

LABELS = "cell_type"
REF_EPOCHS = 30
QUERY_EPOCHS = 20


def _unlabelled(adata: ad.AnnData) -> ad.AnnData:
    """A copy whose labels are all the unlabelled category (the truth is kept in obs['truth'])."""
    out = adata.copy()
    out.obs["truth"] = out.obs[LABELS].astype(str)
    out.obs[LABELS] = "Unknown"
    return out


def _scanvi(adata: ad.AnnData, epochs: int = 6, **kwargs: Any) -> SCANVI:
    model = SCANVI(adata, batch_key="batch", labels_key=LABELS, **{**SMALL, **kwargs})
    return model.train(epochs, progress_bar=False)


@pytest.fixture(scope="module")
def split(sim: ad.AnnData) -> tuple[ad.AnnData, ad.AnnData]:
    ref, query = split_by_batch(sim)
    return ref, _unlabelled(query)


@pytest.fixture(scope="module")
def trained(split: tuple[ad.AnnData, ad.AnnData]) -> dict[str, Any]:
    """A reference trained long enough to classify, and its query mapping (shared: do not train further)."""
    ref, query = split
    model = _scanvi(ref, REF_EPOCHS)
    z_ref, p_ref = model.get_latent_representation(), model.predict(soft=True)
    q = SCANVI.load_query_data(query, model).train(QUERY_EPOCHS, progress_bar=False)
    return {"ref": model, "query": q, "z_ref": z_ref, "p_ref": p_ref}


# ------------------------------------------------------------------------------------------ invariants
def _new_block(name: str) -> bool:
    """New batch blocks (and decoder batch norm, which the core's defaults train: freeze_batchnorm_decoder=False)."""
    return (name.split(".")[0] in {"encoder", "l_encoder", "decoder", "px_r_batch"} and name.endswith("blocks.1")) or name.startswith("decoder.norms")


CASES: dict[str, dict[str, Any]] = {
    "multi_batch": {},
    "batch_norm_both": {"use_batch_norm": "both", "use_layer_norm": "none"},
    "learned_library_gene_batch_linear_classifier": {
        "use_observed_lib_size": False, "dispersion": "gene-batch", "linear_classifier": True},
    "covariates_empirical_prior": {"categorical_covariate_keys": ["donor"], "continuous_covariate_keys": ["score"],
                                   "label_prior": "empirical"},
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_reference_latent_and_predictions_bit_identical(case: str, split: tuple[ad.AnnData, ad.AnnData]) -> None:
    ref, query = split
    model = _scanvi(ref, **CASES[case])
    z_ref, p_ref, before = model.get_latent_representation(), model.predict(soft=True), parameters(model)
    q = SCANVI.load_query_data(query, model)
    trainable = [n for n, p in q.module.named_parameters() if p.requires_grad]
    assert trainable and all(_new_block(n) for n in trainable), trainable
    init = {n: p.detach().clone() for n, p in q.module.named_parameters() if p.requires_grad}
    q.train(4, progress_bar=False, weight_decay=0.1)
    assert np.array_equal(q.get_latent_representation(ref), z_ref)
    assert np.array_equal(q.predict(ref, soft=True).to_numpy(), p_ref.to_numpy())
    after = dict(q.module.named_parameters())
    for name, value in init.items():
        assert not torch.equal(value, after[name].detach()), f"{name} did not train"
    for name, p in q.module.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p.detach(), before[name]), f"frozen {name} moved"
    for name, buf in model.module.named_buffers():  # batch-norm statistics of the frozen stacks included
        if not name.startswith("decoder."):
            new = dict(q.module.named_buffers())[name]
            assert torch.equal(new if buf.ndim == 0 else new[: buf.shape[0]], buf), name
    assert parameters(model).keys() == before.keys()
    assert all(torch.equal(p, before[n]) for n, p in parameters(model).items()), "surgery changed the reference"


def test_single_batch_reference(sim: ad.AnnData) -> None:
    ref, _ = split_by_batch(sim, ("batch0",))
    _, query = split_by_batch(sim)
    model = _scanvi(ref)
    z_ref, p_ref = model.get_latent_representation(), model.predict(soft=True)
    q = SCANVI.load_query_data(_unlabelled(query), model).train(3, progress_bar=False)
    assert np.array_equal(q.get_latent_representation(ref), z_ref)
    assert np.array_equal(q.predict(ref, soft=True).to_numpy(), p_ref.to_numpy())


def test_classifier_frozen_by_default_and_released_on_request(trained: dict[str, Any],
                                                                split: tuple[ad.AnnData, ad.AnnData]) -> None:
    ref, query = split
    q = trained["query"]
    assert not any(p.requires_grad for p in q.module.classifier.parameters())
    assert not any(p.requires_grad for n, p in q.module.named_parameters() if n.startswith(("encoder_z2", "decoder_z1")))
    released = SCANVI.load_query_data(query, trained["ref"], freeze_classifier=False)
    assert all(p.requires_grad for p in released.module.classifier.parameters())
    before = {n: p.detach().clone() for n, p in released.module.classifier.named_parameters()}
    released.train(2, progress_bar=False)
    assert any(not torch.equal(v, dict(released.module.classifier.named_parameters())[n]) for n, v in before.items())
    assert np.array_equal(released.get_latent_representation(ref), trained["z_ref"])  # encoder still frozen
    unfrozen = SCANVI.load_query_data(query, trained["ref"], unfrozen=True)
    assert all(p.requires_grad for p in unfrozen.module.parameters())


# ------------------------------------------------------------------------------------------ predictions
def test_predict_probabilities_and_accuracy(trained: dict[str, Any], split: tuple[ad.AnnData, ad.AnnData]) -> None:
    ref, query = split
    q = trained["query"]
    proba = q.predict(soft=True)
    assert isinstance(proba, pd.DataFrame)
    assert list(proba.columns) == list(q.labels) == ["type0", "type1", "type2", "type3"]
    assert proba.index.equals(query.obs_names)
    assert ((proba >= 0) & (proba <= 1)).all().all()
    np.testing.assert_allclose(proba.sum(1), 1.0, rtol=0, atol=1e-5)
    hard = q.predict()
    assert isinstance(hard, pd.Series) and isinstance(hard.dtype, pd.CategoricalDtype)
    assert hard.index.equals(query.obs_names)
    assert (hard.astype(str).to_numpy() == proba.idxmax(axis=1).to_numpy()).all()
    # four balanced types: chance is 0.25
    ref_acc = np.mean(trained["ref"].predict().astype(str).to_numpy() == ref.obs[LABELS].astype(str).to_numpy())
    query_acc = np.mean(hard.astype(str).to_numpy() == query.obs["truth"].to_numpy())
    assert ref_acc > 0.8, ref_acc
    assert query_acc > 0.55, query_acc


def test_store_predictions(trained: dict[str, Any], split: tuple[ad.AnnData, ad.AnnData]) -> None:
    query = split[1].copy()
    proba = trained["query"].predict(query, soft=True)
    store_predictions(query, proba, key_added="pred")
    assert (query.obs["pred_label"].astype(str) == proba.idxmax(axis=1)).all()
    np.testing.assert_allclose(query.obs["pred_label_uncertainty"], 1 - proba.max(axis=1), atol=1e-6)
    assert query.obsm["pred_label_proba"].shape == proba.shape
    assert list(query.uns["pred_label_proba_columns"]) == list(proba.columns)
    with pytest.raises(InputError, match="rows"):
        store_predictions(query[:5].copy(), proba)


def test_latent_is_z1_and_untrained_model_refuses(split: tuple[ad.AnnData, ad.AnnData]) -> None:
    model = SCANVI(split[0], batch_key="batch", labels_key=LABELS, **SMALL)
    with pytest.raises(NotTrainedError):
        model.predict()
    model.train(1, progress_bar=False)
    assert model.get_latent_representation().shape == (split[0].n_obs, SMALL["n_latent"])


# ------------------------------------------------------------------------------------------ from_scvi_model
def test_from_scvi_model_copies_weights_and_fine_tunes_briefly(split: tuple[ad.AnnData, ad.AnnData]) -> None:
    ref, query = split
    scvi = atlasmap.SCVI(ref, batch_key="batch", **SMALL).train(4, progress_bar=False)
    model = SCANVI.from_scvi_model(scvi, labels_key=LABELS, unlabeled_category="Unknown")
    own = model.module.state_dict()
    for name, tensor in scvi.module.state_dict().items():
        assert torch.equal(own[name], tensor), name
    batch = model._cells().batch(np.arange(20), model.device)
    with torch.no_grad():
        scvi.module.eval(), model.module.eval()
        assert torch.equal(model.module.inference(batch, sample=False)["qz_m"],
                           scvi.module.inference(batch, sample=False)["qz_m"])
    model.train(progress_bar=False)  # scvi-tools' short fine-tuning schedule after pre-training
    expected = min(10, max(2, round(default_max_epochs(ref.n_obs) / 3)))
    assert len(model.history["epoch"]) == expected
    assert all(torch.equal(p, q) for p, q in zip(scvi.module.parameters(), parameters(scvi).values(), strict=True))
    q = SCANVI.load_query_data(query, model)
    assert q._default_max_epochs(query.n_obs) == default_max_epochs(query.n_obs)

    with pytest.raises(InputError, match="query model"):
        SCANVI.from_scvi_model(atlasmap.SCVI.load_query_data(query, scvi), labels_key=LABELS)
    with pytest.raises(InputError, match="atlasmap.SCVI"):
        SCANVI.from_scvi_model(model, labels_key=LABELS)
    with pytest.raises(NotTrainedError):
        SCANVI.from_scvi_model(atlasmap.SCVI(ref, batch_key="batch", **SMALL), labels_key=LABELS)
    with pytest.raises(InputError, match="not a column"):
        SCANVI.from_scvi_model(scvi, labels_key="no_such_column")


# ------------------------------------------------------------------------------------------ save / load
def test_save_load_identical_predictions(trained: dict[str, Any], split: tuple[ad.AnnData, ad.AnnData],
                                         tmp_path: Any) -> None:
    ref, query = split
    for name, data in (("ref", [ref]), ("query", [ref, query])):
        model = trained[name]
        model.save(tmp_path / name)
        loaded = atlasmap.load(tmp_path / name, adata=model.adata, device=model.device)
        assert type(loaded) is SCANVI
        assert (loaded.labels, loaded.labels_key, loaded.unlabeled_category) == (
            model.labels, model.labels_key, model.unlabeled_category)
        for adata in data:
            assert np.array_equal(loaded.predict(adata, soft=True).to_numpy(), model.predict(adata, soft=True).to_numpy())
            assert np.array_equal(loaded.get_latent_representation(adata), model.get_latent_representation(adata))
        trainable = [n for n, p in loaded.module.named_parameters() if p.requires_grad]
        assert trainable == [n for n, p in model.module.named_parameters() if p.requires_grad]
    # a saved reference works as a surgery source
    q = SCANVI.load_query_data(query, tmp_path / "ref")
    assert q.labels == trained["ref"].labels
    assert atlasmap.SCANVI is SCANVI


def test_load_checks_class_and_label_state(trained: dict[str, Any], split: tuple[ad.AnnData, ad.AnnData],
                                           tmp_path: Any) -> None:
    scvi = atlasmap.SCVI(split[0], batch_key="batch", **SMALL).train(1, progress_bar=False)
    scvi.save(tmp_path / "scvi")
    with pytest.raises(ModelFileError, match="SCVI.load"):
        SCANVI.load(tmp_path / "scvi")
    trained["ref"].save(tmp_path / "ref")
    config_path = tmp_path / "ref" / "config.json"
    config = json.loads(config_path.read_text())
    config["extra"]["labels"] = config["extra"]["labels"][:2]
    config_path.write_text(json.dumps(config))
    with pytest.raises(ModelFileError, match="corrupt"):
        atlasmap.load(tmp_path / "ref")
    del config["extra"]["labels_key"]
    config_path.write_text(json.dumps(config))
    with pytest.raises(ModelFileError, match="corrupt"):
        atlasmap.load(tmp_path / "ref")


# ------------------------------------------------------------------------------------------ labels: bad input
def test_bad_labels_errors_and_input_unchanged(split: tuple[ad.AnnData, ad.AnnData]) -> None:
    ref = split[0]
    snap = snapshot(ref)
    with pytest.raises(InputError, match="labels key 'nope' is not a column"):
        SCANVI(ref, batch_key="batch", labels_key="nope")
    with_nan = ref.copy()
    with_nan.obs[LABELS] = with_nan.obs[LABELS].astype(object)
    with_nan.obs.iloc[3, with_nan.obs.columns.get_loc(LABELS)] = np.nan
    with pytest.raises(InputError, match="missing \\(NaN\\)"):
        SCANVI(with_nan, batch_key="batch", labels_key=LABELS)
    all_unlabelled = ref.copy()
    all_unlabelled.obs[LABELS] = "Unknown"
    with pytest.raises(InputError, match="atlasmap.SCVI"):
        SCANVI(all_unlabelled, batch_key="batch", labels_key=LABELS)
    for bad in ({"classification_ratio": -1.0}, {"label_prior": "zipf"}):
        with pytest.raises(InputError):
            SCANVI(ref, batch_key="batch", labels_key=LABELS, **bad)
    assert_unchanged(ref, snap)


def test_unlabeled_category_that_never_occurs_means_all_labelled(split: tuple[ad.AnnData, ad.AnnData]) -> None:
    model = SCANVI(split[0], batch_key="batch", labels_key=LABELS, unlabeled_category="not-a-label", **SMALL)
    assert model.labels == ("type0", "type1", "type2", "type3")
    assert bool((model._cells().fields["y"] >= 0).all())


def test_partly_labelled_reference(split: tuple[ad.AnnData, ad.AnnData]) -> None:
    ref = split[0].copy()
    labels = ref.obs[LABELS].astype(str).to_numpy().copy()
    labels[::2] = "Unknown"
    ref.obs[LABELS] = pd.Categorical(labels)
    model = _scanvi(ref, 2)
    assert model.labels == ("type0", "type1", "type2", "type3")  # "Unknown" is not a label
    y = model._cells().fields["y"].numpy()
    assert (y[::2] == -1).all() and (y[1::2] >= 0).all()
    assert np.isfinite(model.history["train_loss"]).all()


def test_single_label_reference_predicts_it(split: tuple[ad.AnnData, ad.AnnData]) -> None:
    ref, query = split
    one = ref.copy()
    one.obs[LABELS] = "T cell"
    with pytest.warns(UserWarning, match="single label"):
        model = _scanvi(one, 2)
    assert model.labels == ("T cell",)
    proba = model.predict(soft=True)
    assert proba.shape == (one.n_obs, 1) and np.allclose(proba.to_numpy(), 1.0)
    q = SCANVI.load_query_data(query, model).train(1, progress_bar=False)
    assert set(q.predict().astype(str)) == {"T cell"}


def test_query_labels_partly_known_unknown_and_nan(trained: dict[str, Any], split: tuple[ad.AnnData, ad.AnnData]
                                                   ) -> None:
    query = split[1].copy()
    values = query.obs["truth"].to_numpy().astype(object)
    values[::3] = "Unknown"
    values[1::3] = "a new type"
    values[2] = np.nan
    query.obs[LABELS] = values
    snap = snapshot(query)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        q = SCANVI.load_query_data(query, trained["ref"])
    messages = " | ".join(str(w.message) for w in caught)
    assert "'a new type'" in messages and "treated as unlabelled" in messages
    assert "carry reference labels" in messages
    y = q._cells().fields["y"].numpy()
    expected = pd.Index(q.labels).get_indexer(query.obs["truth"])
    known = np.array([isinstance(v, str) and v in q.labels for v in values])
    assert (y[known] == expected[known]).all() and (y[~known] == -1).all()
    q.train(2, progress_bar=False)
    assert np.array_equal(q.get_latent_representation(split[0]), trained["z_ref"])
    assert_unchanged(query, snap)


def test_query_without_labels_column(trained: dict[str, Any], split: tuple[ad.AnnData, ad.AnnData]) -> None:
    query = split[1].copy()
    del query.obs[LABELS]
    q = SCANVI.load_query_data(query, trained["ref"])
    assert bool((q._cells().fields["y"] == -1).all())


def test_predict_needs_known_batches(trained: dict[str, Any], split: tuple[ad.AnnData, ad.AnnData]) -> None:
    with pytest.raises(InputError, match="load_query_data"):
        trained["ref"].predict(split[1])


# ------------------------------------------------------------------------------------------ module
def test_module_loss_mixed_minibatch_and_gradients() -> None:
    torch.manual_seed(0)
    cfg = SCANVIConfig(n_genes=12, n_categories=(2,), n_hidden=8, n_latent=3, n_labels=3, n_layers=2,
                       use_batch_norm="both", use_layer_norm="none")
    module = SCANVIModule(cfg)
    x = torch.poisson(torch.full((6, 12), 3.0)) + torch.eye(6, 12)
    batch = {"x": x, "cat": torch.tensor([[0], [1], [0], [1], [0], [1]]), "cont": torch.zeros(6, 0),
             "y": torch.tensor([0, -1, 2, -1, -1, 1])}
    terms = module.loss(batch, kl_weight=0.5)
    assert terms.reconstruction.shape == terms.kl.shape == (6,)
    assert torch.isfinite(terms.loss) and terms.extra["classification_loss"] > 0
    terms.loss.backward()
    for name in ("classifier.out.weight", "encoder_z2_z1.layers.0.covariates.0.blocks.0", "z1_mean.weight",
                 "encoder.layers.0.linear.weight"):
        assert dict(module.named_parameters())[name].grad.abs().sum() > 0, name
    # a minibatch with a single labelled (or unlabelled) cell still works with batch norm
    one = {k: v[:2] for k, v in batch.items()}
    assert torch.isfinite(module.loss(one).loss)
    ratio = SCANVIModule(SCANVIConfig(**{**cfg.to_dict(), "n_categories": (2,), "classification_ratio": 0.0}))
    ratio.load_state_dict(module.state_dict())
    torch.manual_seed(1)
    a = module.loss(batch)
    torch.manual_seed(1)
    b = ratio.loss(batch)
    assert torch.allclose(a.loss - b.loss, 50.0 * a.extra["classification_loss"])
