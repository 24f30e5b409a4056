"""The user-facing SCVI model: outputs, training history, early stopping, errors."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from support import N_GENES, QUERY_BATCHES, REF_BATCHES, SMALL, train_reference

import atlasmap
from atlasmap.errors import InputError, NotTrainedError

HISTORY_KEYS = {
    "epoch", "kl_weight", "epoch_seconds",
    "train_loss", "elbo_train", "reconstruction_loss_train", "kl_local_train",
    "validation_loss", "elbo_validation", "reconstruction_loss_validation", "kl_local_validation",
}


# ------------------------------------------------------------------------------------------ latent
def test_latent_shape_and_dtype(ref_model: Any, ref_adata: Any) -> None:
    z = ref_model.get_latent_representation()
    assert z.shape == (ref_adata.n_obs, SMALL["n_latent"]) and z.dtype == np.float32
    assert np.isfinite(z).all() and z.std(0).min() > 0
    # a subset of cells gets exactly its rows of the full latent (no cross-cell dependence at inference)
    sub = ref_adata[::3].copy()
    assert np.array_equal(ref_model.get_latent_representation(sub), z[::3])
    # small inference minibatches give the same result
    assert np.allclose(ref_model.get_latent_representation(batch_size=17), z, atol=1e-6)


def test_latent_separates_cell_types(ref_model: Any, ref_adata: Any) -> None:
    """A sanity check that training learns something: nearest-centroid cell-type accuracy in the latent."""
    z = ref_model.get_latent_representation()
    types = ref_adata.obs["cell_type"].astype(str).to_numpy()
    labels = np.unique(types)
    centroids = np.stack([z[types == t].mean(0) for t in labels])
    pred = labels[np.argmin(((z[:, None, :] - centroids[None]) ** 2).sum(-1), axis=1)]
    assert (pred == types).mean() > 0.5


# ------------------------------------------------------------------------------------------ normalized expression
def test_normalized_expression_frame(ref_model: Any, ref_adata: Any) -> None:
    expr = ref_model.get_normalized_expression()
    assert isinstance(expr, pd.DataFrame)
    assert expr.shape == (ref_adata.n_obs, N_GENES)
    assert list(expr.index) == list(ref_adata.obs_names)
    assert list(expr.columns) == list(ref_adata.var_names)
    assert (expr.to_numpy() > 0).all()
    np.testing.assert_allclose(expr.sum(1), 1.0, rtol=1e-5)
    as_numpy = ref_model.get_normalized_expression(return_numpy=True)
    assert isinstance(as_numpy, np.ndarray) and np.array_equal(as_numpy, expr.to_numpy())


@pytest.mark.parametrize("library_size", [1.0, 1e4, 123.5])
def test_normalized_expression_rows_sum_to_library_size(ref_model: Any, library_size: float) -> None:
    expr = ref_model.get_normalized_expression(library_size=library_size, return_numpy=True)
    np.testing.assert_allclose(expr.sum(1), library_size, rtol=1e-4)


def test_normalized_expression_latent_library(ref_model: Any, ref_adata: Any) -> None:
    """``library_size="latent"`` scales each cell by its own (observed) library size."""
    expr = ref_model.get_normalized_expression(library_size="latent", return_numpy=True)
    observed = np.asarray(ref_adata.X.sum(1)).ravel()
    np.testing.assert_allclose(expr.sum(1), observed, rtol=1e-4)


def test_transform_batch_changes_output(ref_model: Any, ref_adata: Any) -> None:
    own = ref_model.get_normalized_expression(return_numpy=True)
    as_b0 = ref_model.get_normalized_expression(transform_batch="batch0", return_numpy=True)
    as_b1 = ref_model.get_normalized_expression(transform_batch="batch1", return_numpy=True)
    assert not np.allclose(as_b0, as_b1)
    in_b0 = (ref_adata.obs["batch"] == "batch0").to_numpy()
    # decoding a cell in its own batch is what transform_batch=None does
    np.testing.assert_allclose(as_b0[in_b0], own[in_b0], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(as_b1[~in_b0], own[~in_b0], rtol=1e-5, atol=1e-7)
    assert not np.allclose(as_b0[~in_b0], own[~in_b0])
    # a list of batches averages them
    both = ref_model.get_normalized_expression(transform_batch=list(REF_BATCHES), return_numpy=True)
    np.testing.assert_allclose(both, (as_b0 + as_b1) / 2, rtol=1e-5, atol=1e-7)


def test_transform_batch_unknown_errors(ref_model: Any) -> None:
    with pytest.raises(InputError, match=r"transform_batch 'batch9' is not a batch of this model \(batches: batch0, batch1\)"):
        ref_model.get_normalized_expression(transform_batch="batch9")


def test_query_model_transforms_into_reference_batch(query_model: Any) -> None:
    as_ref = query_model.get_normalized_expression(transform_batch="batch0", return_numpy=True)
    own = query_model.get_normalized_expression(return_numpy=True)
    assert as_ref.shape == own.shape and not np.allclose(as_ref, own)
    for batch in QUERY_BATCHES:
        query_model.get_normalized_expression(transform_batch=batch)


def test_gene_list(ref_model: Any) -> None:
    genes = ["gene5", "gene0", "gene17"]
    full = ref_model.get_normalized_expression()
    sub = ref_model.get_normalized_expression(gene_list=genes)
    assert list(sub.columns) == genes
    pd.testing.assert_frame_equal(sub, full[genes], check_exact=True)
    with pytest.raises(InputError, match="genes not in the model: 'nope'"):
        ref_model.get_normalized_expression(gene_list=["gene1", "nope"])


def test_normalized_expression_with_samples_is_seeded(ref_model: Any) -> None:
    a = ref_model.get_normalized_expression(n_samples=3, seed=1, return_numpy=True)
    b = ref_model.get_normalized_expression(n_samples=3, seed=1, return_numpy=True)
    c = ref_model.get_normalized_expression(n_samples=3, seed=2, return_numpy=True)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


# ------------------------------------------------------------------------------------------ training
def test_history_keys_and_lengths(ref_adata: Any) -> None:
    model = train_reference(ref_adata, epochs=4)
    assert set(model.history) == HISTORY_KEYS
    assert all(len(v) == 4 for v in model.history.values())
    assert model.history["epoch"] == [0, 1, 2, 3]
    assert model.history["kl_weight"] == [0.0, 1 / 400, 2 / 400, 3 / 400]
    for key in HISTORY_KEYS - {"epoch"}:
        assert np.isfinite(model.history[key]).all(), key
    # elbo = reconstruction + kl, per split
    for split in ("train", "validation"):
        np.testing.assert_allclose(
            model.history[f"elbo_{split}"],
            np.add(model.history[f"reconstruction_loss_{split}"], model.history[f"kl_local_{split}"]), rtol=1e-6)
    # training more appends to the history, and the epoch count continues
    model.train(3, progress_bar=False)
    assert all(len(v) == 7 for v in model.history.values())
    assert model.history["epoch"] == list(range(7))


def test_training_reduces_the_loss(ref_adata: Any) -> None:
    model = train_reference(ref_adata, epochs=30, train_kwargs={"n_epochs_kl_warmup": None, "lr": 5e-3})
    elbo = model.history["elbo_train"]
    assert model.history["kl_weight"] == [1.0] * 30
    assert elbo[-1] < elbo[0] * 0.9


def test_train_size_one_has_no_validation(ref_adata: Any) -> None:
    model = train_reference(ref_adata, epochs=2, train_kwargs={"train_size": 1.0})
    assert not any("validation" in k for k in model.history)
    assert len(model.history["elbo_train"]) == 2


def test_validation_every_n_epochs(ref_adata: Any, tmp_path: Any) -> None:
    """check_val_every_n_epoch=3 over 7 epochs validates epochs 3, 6 and the last; the others hold None,
    which survives save/load and plots; the training path is unchanged (same weights as validating always)."""
    sparse = train_reference(ref_adata, epochs=7, train_kwargs={"check_val_every_n_epoch": 3})
    dense = train_reference(ref_adata, epochs=7)
    seen = [v is not None for v in sparse.history["elbo_validation"]]
    assert seen == [False, False, True, False, False, True, True]
    for i, ok in enumerate(seen):
        if ok:
            assert sparse.history["elbo_validation"][i] == dense.history["elbo_validation"][i]
    assert sparse.history["elbo_train"] == dense.history["elbo_train"]
    sparse.save(tmp_path / "m")
    assert atlasmap.SCVI.load(tmp_path / "m").history["elbo_validation"] == sparse.history["elbo_validation"]
    from atlasmap.workflow.plots import plot_training_curves

    plot_training_curves({"reference": sparse.history}, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_query_history_starts_fresh(query_model: Any, ref_model: Any) -> None:
    assert query_model.history["epoch"] == list(range(8))
    assert len(ref_model.history["epoch"]) == 8


def test_early_stopping_stops_early(ref_adata: Any) -> None:
    patience = 3
    model = train_reference(ref_adata, epochs=300, train_kwargs={
        "early_stopping": True, "early_stopping_patience": patience, "lr": 0.05, "n_epochs_kl_warmup": None})
    val = model.history["elbo_validation"]
    n = len(val)
    assert n < 300, "early stopping never triggered"
    # it stopped exactly `patience` epochs after the best validation ELBO, which was never beaten since
    best = int(np.argmin(val))
    assert n == best + patience + 1
    assert all(v >= val[best] for v in val[best + 1:])


def test_no_early_stopping_runs_all_epochs(ref_adata: Any) -> None:
    model = train_reference(ref_adata, epochs=12, train_kwargs={"lr": 0.05, "n_epochs_kl_warmup": None})
    assert len(model.history["epoch"]) == 12


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"max_epochs": 0}, "max_epochs=0 trains nothing, and a reference model must be trained"),
    ({"max_epochs": -1}, "max_epochs must be at least 1"),
    ({"batch_size": 1}, "batch_size must be at least 2"),
    ({"train_size": 0.0}, r"train_size must be in \(0, 1\]"),
    ({"lr": -1.0}, "lr must be positive"),
    ({"check_val_every_n_epoch": 0}, "check_val_every_n_epoch must be at least 1"),
    ({"device": "tpu:7"}, "unknown device"),
])
def test_bad_train_arguments(ref_adata: Any, kwargs: dict, match: str) -> None:
    model = atlasmap.SCVI(ref_adata, batch_key="batch", **SMALL)
    kwargs = {"max_epochs": 1, **kwargs}
    with pytest.raises(InputError, match=match):
        model.train(progress_bar=False, **kwargs)
    assert not model.is_trained


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_cuda_requested_without_cuda(ref_adata: Any) -> None:
    with pytest.raises(InputError, match="CUDA is not available"):
        atlasmap.SCVI(ref_adata, batch_key="batch", **SMALL).train(1, device="cuda", progress_bar=False)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"gene_likelihood": "gaussian"}, "gene_likelihood must be one of 'zinb', 'nb', 'poisson'"),
    ({"dispersion": "gene-cell"}, "dispersion must be one of"),
    ({"use_batch_norm": "yes"}, "use_batch_norm must be one of"),
    ({"n_latent": 0}, "n_latent must be a positive integer"),
    ({"dropout_rate": 1.0}, r"dropout_rate must be in \[0, 1\)"),
])
def test_bad_model_arguments(ref_adata: Any, kwargs: dict, match: str) -> None:
    with pytest.raises(InputError, match=match):
        atlasmap.SCVI(ref_adata, batch_key="batch", **kwargs)


# ------------------------------------------------------------------------------------------ errors
def test_not_trained_errors(ref_adata: Any, tmp_path: Any) -> None:
    model = atlasmap.SCVI(ref_adata, batch_key="batch", **SMALL)
    assert not model.is_trained
    for call in (model.get_latent_representation, model.get_normalized_expression):
        with pytest.raises(NotTrainedError, match=r"not trained yet; call \.train\(\) first"):
            call()
    assert "untrained" in repr(model)


def test_reference_model_refuses_unseen_categories(ref_model: Any, query_adata: Any) -> None:
    with pytest.raises(InputError, match=r"adata\.obs\['batch'\] has categories the model was not trained on "
                                         r"\('batch2', 'batch3'.*load_query_data"):
        ref_model.get_latent_representation(query_adata)
    with pytest.raises(InputError, match="load_query_data"):
        ref_model.get_normalized_expression(query_adata)


def test_reference_model_refuses_unseen_covariate_category(ref_adata: Any, query_adata: Any) -> None:
    model = train_reference(ref_adata, epochs=1, categorical_covariate_keys=["donor"])
    cells = query_adata.copy()
    cells.obs["batch"] = pd.Categorical(["batch0"] * cells.n_obs)  # known batch, but donor d2 is new
    with pytest.raises(InputError, match=r"adata\.obs\['donor'\] has categories .*'d2'.*load_query_data"):
        model.get_latent_representation(cells)


def test_query_model_embeds_reference_and_query_cells(query_model: Any, ref_adata: Any, sim: Any) -> None:
    z_all = query_model.get_latent_representation(sim)
    assert z_all.shape == (sim.n_obs, SMALL["n_latent"])
    is_ref = sim.obs["batch"].isin(REF_BATCHES).to_numpy()
    # (bit-identity is promised for the same cells in the same minibatches; mixed with query cells the
    # matmul shapes differ, so only numerical equality is asserted here)
    np.testing.assert_allclose(z_all[is_ref], query_model.get_latent_representation(ref_adata), rtol=1e-5, atol=1e-6)


def test_repr(ref_model: Any, query_model: Any) -> None:
    assert repr(ref_model).startswith("SCVI(reference, trained; 48 genes")
    assert repr(query_model).startswith("SCVI(query, trained")
    assert "batch: 4" in repr(query_model)


def test_get_elbo_is_the_validation_elbo_on_the_same_cells() -> None:
    """get_elbo on a model's own validation cells, with the validation pass's seed, is exactly the last epoch's
    elbo_validation (same quantity, same eval-mode pass); it is seeded and refuses an untrained model."""
    from support import simulate

    from atlasmap.training import split_cells

    adata = simulate(320, seed=5)
    model = atlasmap.SCVI(adata, batch_key="batch", **SMALL)
    with pytest.raises(NotTrainedError):
        model.get_elbo()
    model.train(max_epochs=3, progress_bar=False, seed=2, n_epochs_kl_warmup=None)
    _, val_idx = split_cells(adata.n_obs, 0.9, 2)
    val = adata[val_idx].copy()
    validation_seed = 2 + 7919 * 3  # train.validation_rng of the last epoch (index 2)
    elbo = model.get_elbo(val, seed=validation_seed)
    assert elbo == pytest.approx(model.history["elbo_validation"][-1], rel=1e-6)
    assert model.get_elbo(val, seed=validation_seed) == elbo
    assert model.get_elbo(val, seed=1) != elbo  # other latent samples
