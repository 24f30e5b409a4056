"""The invariants that make reference mapping trustworthy.

* After query training, the query model embeds reference cells **bit-identically** to the reference
  model (``np.array_equal``, never ``allclose``), in every supported configuration.
* After surgery exactly the new category blocks are trainable (by default), in every injected layer of
  the encoder and the decoder; frozen tensors get no gradient and do not move, whatever the weight decay.
* The surgery options release exactly what they say (``unfrozen``, ``freeze_expression``, batch norm).
* Same seed => bit-identical results; another seed => different results.
* The caller's AnnData is never modified.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from support import (
    QUERY_BATCHES,
    REF_BATCHES,
    SMALL,
    assert_unchanged,
    parameters,
    snapshot,
    split_by_batch,
    train_query,
    train_reference,
)
from torch import nn

import atlasmap
from atlasmap.data.registry import SINGLE_BATCH


def _injected_layers(module: Any) -> list[tuple[str, Any]]:
    """(name, InjectedLinear) of every layer of every stack that has covariate tables."""
    out = []
    for stack_name in ("encoder", "l_encoder", "decoder"):
        stack = getattr(module, stack_name, None)
        if stack is None:
            continue
        for i, layer in enumerate(stack.layers):
            if len(layer.covariates):
                out.append((f"{stack_name}.layers.{i}", layer))
    return out


def _map(ref: Any, query: Any, *, model_kwargs: dict | None = None, surgery: dict | None = None,
         query_train: dict | None = None, ref_latent_adata: Any = None) -> dict[str, Any]:
    """Train a reference, map the query, train it; return everything the invariant checks need."""
    ref_model = train_reference(ref, **(model_kwargs or {}))
    z_ref = ref_model.get_latent_representation()
    ref_params = parameters(ref_model)
    query_model = atlasmap.SCVI.load_query_data(query, ref_model, **(surgery or {}))
    new_blocks_init = {n: p.detach().clone() for n, p in query_model.module.named_parameters() if p.requires_grad}
    z_query_before = query_model.get_latent_representation()
    query_model.train(8, progress_bar=False, **(query_train or {}))
    return {
        "ref_model": ref_model,
        "query_model": query_model,
        "z_ref": z_ref,
        "z_ref_by_query": query_model.get_latent_representation(ref if ref_latent_adata is None else ref_latent_adata),
        "ref_params": ref_params,
        "trainable_init": new_blocks_init,
        "z_query_before": z_query_before,
    }


def _assert_invariant(run: dict[str, Any]) -> None:
    z_ref, z_ref_by_query = run["z_ref"], run["z_ref_by_query"]
    assert z_ref.dtype == z_ref_by_query.dtype == np.float32
    assert np.isfinite(z_ref).all()
    assert np.array_equal(z_ref, z_ref_by_query), (
        f"reference latent moved after query training: max |diff| = {np.abs(z_ref - z_ref_by_query).max():.3g}"
    )
    query_model, ref_model = run["query_model"], run["ref_model"]
    # the query really trained: its new blocks moved, and so did the query cells' latent
    trainable = dict(query_model.module.named_parameters())
    assert run["trainable_init"], "surgery left nothing trainable"
    for name, init in run["trainable_init"].items():
        assert not torch.equal(init, trainable[name].detach()), f"trainable {name} did not train"
    assert not np.array_equal(run["z_query_before"], query_model.get_latent_representation())
    # every frozen tensor of the query model equals the reference's, bit for bit
    for name, p in query_model.module.named_parameters():
        if not p.requires_grad:
            assert name in run["ref_params"], f"frozen parameter {name} is not a reference parameter"
            assert torch.equal(p.detach(), run["ref_params"][name]), f"frozen {name} changed"
    # the reference model itself was left alone by surgery and query training
    for name, p in ref_model.module.named_parameters():
        assert torch.equal(p.detach(), run["ref_params"][name]), f"reference model parameter {name} changed"
        assert p.requires_grad, f"surgery froze the reference model's own {name}"
    assert np.array_equal(ref_model.get_latent_representation(), z_ref)


# ------------------------------------------------------------------------------------------ the invariant
CASES: dict[str, dict[str, Any]] = {
    "multi_batch": {},
    "deep_injection_on_3_layers": {"model_kwargs": {"deeply_inject_covariates": True, "n_layers": 3}},
    "deep_injection_off": {"model_kwargs": {"deeply_inject_covariates": False}},
    "weight_decay_0.5": {"query_train": {"weight_decay": 0.5}},
    "continuous_covariate": {"model_kwargs": {"continuous_covariate_keys": ["score"]}},
    "batch_norm_both_default_options": {"model_kwargs": {"use_batch_norm": "both"}},
    "learned_library_size": {"model_kwargs": {"use_observed_lib_size": False}},
    "dispersion_gene_batch": {"model_kwargs": {"dispersion": "gene-batch"}},
    "nb_likelihood": {"model_kwargs": {"gene_likelihood": "nb"}},
    "poisson_likelihood": {"model_kwargs": {"gene_likelihood": "poisson"}},
    "no_dropout_freeze_dropout": {"model_kwargs": {"dropout_rate": 0.0}, "surgery": {"freeze_dropout": True}},
    "extended_covariate_and_weight_decay": {
        "model_kwargs": {"categorical_covariate_keys": ["donor"], "continuous_covariate_keys": ["score"]},
        "query_train": {"weight_decay": 0.5},
    },
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_reference_latent_bit_identical(case: str, ref_adata: Any, query_adata: Any) -> None:
    _assert_invariant(_map(ref_adata, query_adata, **CASES[case]))


def test_invariant_with_known_categorical_covariate(ref_adata: Any, query_adata: Any) -> None:
    """An extra categorical covariate whose query categories all exist in the reference: only the batch is
    extended, and the covariate's tables keep a single (frozen) block."""
    query_adata.obs["donor"] = query_adata.obs["donor"].map({"d1": "d1", "d2": "d0"}).astype("category")
    run = _map(ref_adata, query_adata, model_kwargs={"categorical_covariate_keys": ["donor"]})
    _assert_invariant(run)
    module = run["query_model"].module
    for name, layer in _injected_layers(module):
        assert len(layer.covariates[0].blocks) == 2, f"{name}: batch table was not extended"
        assert len(layer.covariates[1].blocks) == 1, f"{name}: donor table got a block with no new category"
    assert run["query_model"].registry.categories["donor"] == ("d0", "d1")


def test_invariant_single_batch_reference_with_batch_column(single_batch_split: Any) -> None:
    """A reference whose batch column has one category still gets its own batch column (scvi-tools drops it
    and surgery then adds an untrained column for the reference batch)."""
    ref, query = single_batch_split
    run = _map(ref, query)
    _assert_invariant(run)
    reg = run["query_model"].registry
    # reference categories first, unchanged; new ones appended (in order of appearance in the query)
    assert reg.categories["batch"][0] == "batch0"
    assert sorted(reg.categories["batch"][1:]) == list(QUERY_BATCHES)
    for _, layer in _injected_layers(run["ref_model"].module):
        assert layer.covariates[0].block_sizes == [1]
    for _, layer in _injected_layers(run["query_model"].module):
        assert layer.covariates[0].block_sizes == [1, 2]


def test_invariant_single_batch_reference_without_batch_key(single_batch_split: Any) -> None:
    """``batch_key=None`` for the reference; the query names its batch column with ``batch_key=``."""
    ref, query = single_batch_split
    del ref.obs["batch"]  # a reference that has no batch information at all
    run = _map(ref, query, model_kwargs={"batch_key": None}, surgery={"batch_key": "batch"})
    _assert_invariant(run)
    reg = run["query_model"].registry
    assert reg.batch_key == SINGLE_BATCH
    assert reg.categories[SINGLE_BATCH][0] == "0"
    assert sorted(reg.categories[SINGLE_BATCH][1:]) == list(QUERY_BATCHES)
    # the query cells are coded into the two new batch rows, not into the reference's row 0
    codes = run["query_model"]._cells().fields["cat"][:, 0].numpy()
    assert set(codes.tolist()) == {1, 2}


def test_single_batch_reference_without_batch_key_needs_query_batch_key(single_batch_split: Any) -> None:
    ref, query = single_batch_split
    del ref.obs["batch"]
    ref_model = train_reference(ref, batch_key=None, epochs=1)
    with pytest.raises(atlasmap.InputError, match="batch_key="):
        atlasmap.SCVI.load_query_data(query, ref_model)


def test_encode_covariates_false_warns_and_keeps_invariant(ref_adata: Any, query_adata: Any) -> None:
    ref_model = train_reference(ref_adata, encode_covariates=False)
    z_ref = ref_model.get_latent_representation()
    with pytest.warns(UserWarning, match="only adapts the decoder"):
        query_model = atlasmap.SCVI.load_query_data(query_adata, ref_model)
    # the encoder has no covariate tables, so only decoder layers got new blocks
    trainable = {n for n, p in query_model.module.named_parameters() if p.requires_grad}
    assert trainable == {f"decoder.layers.{i}.covariates.0.blocks.1" for i in range(SMALL["n_layers"])}
    query_model.train(3, progress_bar=False)
    assert np.array_equal(query_model.get_latent_representation(ref_adata), z_ref)


def test_batch_and_covariate_both_extended(ref_adata: Any, query_adata: Any) -> None:
    """Batch and donor both get new categories. Old categories keep their exact rows in every table (the
    scvi-tools layout - all new columns appended to one concatenated matrix - can shift a later covariate's
    old columns onto the wrong categories); new categories live in separate blocks."""
    run = _map(ref_adata, query_adata, model_kwargs={"categorical_covariate_keys": ["donor"]})
    _assert_invariant(run)
    ref_model, query_model = run["ref_model"], run["query_model"]
    assert ref_model.registry.categories == {"batch": REF_BATCHES, "donor": ("d0", "d1")}
    cats = query_model.registry.categories
    assert cats["batch"][:2] == REF_BATCHES and sorted(cats["batch"][2:]) == list(QUERY_BATCHES)
    assert cats["donor"] == ("d0", "d1", "d2")

    ref_layers = dict(_injected_layers(ref_model.module))
    query_layers = dict(_injected_layers(query_model.module))
    assert set(ref_layers) == set(query_layers) == {
        f"{s}.layers.{i}" for s in ("encoder", "decoder") for i in range(SMALL["n_layers"])
    }
    for name, layer in query_layers.items():
        for j, n_ref, n_new in ((0, 2, 2), (1, 2, 1)):
            table, ref_table = layer.covariates[j], ref_layers[name].covariates[j]
            assert table.block_sizes == [n_ref, n_new], f"{name} covariate {j}: blocks {table.block_sizes}"
            assert torch.equal(table.blocks[0], ref_table.blocks[0]), f"{name} covariate {j}: old rows moved"
            assert torch.equal(table.table()[:n_ref], ref_table.table()), f"{name} covariate {j}: lookup rows"
            assert not table.blocks[0].requires_grad and table.blocks[1].requires_grad
            assert table.blocks[0] is not table.blocks[1]

    # query cells of the shared donor d1 are coded to d1's old row; d2 to the new block's row
    cells = query_model._cells()
    donor_codes = cells.fields["cat"][:, 1].numpy()
    donor = query_adata.obs["donor"].astype(str).to_numpy()
    assert np.array_equal(donor_codes, np.where(donor == "d1", 1, 2))

    # Poison the new donor blocks with NaN: cells of the old donor must not read them, cells of d2 must
    # (the blocks are restored afterwards).
    saved = [layer.covariates[1].blocks[1].detach().clone() for layer in query_layers.values()]
    with torch.no_grad():
        for layer in query_layers.values():
            layer.covariates[1].blocks[1].fill_(float("nan"))
    try:
        z = query_model.get_latent_representation()
    finally:
        with torch.no_grad():
            for layer, value in zip(query_layers.values(), saved, strict=True):
                layer.covariates[1].blocks[1].copy_(value)
    assert np.isfinite(z[donor == "d1"]).all(), "cells of an old donor read the new donor block"
    assert np.isnan(z[donor == "d2"]).all(), "cells of the new donor did not read the new donor block"
    # and the reference cells are still exact after restoring
    assert np.array_equal(query_model.get_latent_representation(ref_adata), run["z_ref"])


# ------------------------------------------------------------------------------------------ what trains
def _expected_new_blocks(model_kwargs: dict[str, Any], extended: tuple[int, ...] = (0,)) -> set[str]:
    n_layers = model_kwargs.get("n_layers", SMALL["n_layers"])
    deep = model_kwargs.get("deeply_inject_covariates", True)
    layers = range(n_layers) if deep else [0]
    names = {f"{stack}.layers.{i}.covariates.{j}.blocks.1" for stack in ("encoder", "decoder") for i in layers
             for j in extended}
    if not model_kwargs.get("use_observed_lib_size", True):  # the library encoder has one layer
        names |= {f"l_encoder.layers.0.covariates.{j}.blocks.1" for j in extended}
    if model_kwargs.get("dispersion") == "gene-batch" and 0 in extended:
        names.add("px_r_batch.blocks.1")
    return names


TRAINABLE_CASES: dict[str, tuple[dict[str, Any], tuple[int, ...]]] = {
    "deep_2_layers": ({}, (0,)),
    "deep_3_layers": ({"n_layers": 3}, (0,)),
    "shallow_3_layers": ({"n_layers": 3, "deeply_inject_covariates": False}, (0,)),
    "gene_batch_dispersion": ({"dispersion": "gene-batch"}, (0,)),
    "learned_library_size": ({"use_observed_lib_size": False}, (0,)),
    "batch_and_donor": ({"categorical_covariate_keys": ["donor"], "continuous_covariate_keys": ["score"]}, (0, 1)),
}


@pytest.mark.parametrize("case", list(TRAINABLE_CASES), ids=list(TRAINABLE_CASES))
def test_only_new_blocks_trainable_by_default(case: str, ref_adata: Any, query_adata: Any) -> None:
    model_kwargs, extended = TRAINABLE_CASES[case]
    ref_model = train_reference(ref_adata, epochs=1, **model_kwargs)
    query = atlasmap.SCVI.load_query_data(query_adata, ref_model)
    trainable = {n for n, p in query.module.named_parameters() if p.requires_grad}
    expected = _expected_new_blocks(model_kwargs, extended)
    assert trainable == expected
    assert set(query.surgery["trainable"]) == expected
    # every injected layer of the encoder and the decoder has its new block(s), and nothing else does
    injected = _injected_layers(query.module)
    n_layers = model_kwargs.get("n_layers", SMALL["n_layers"])
    deep = model_kwargs.get("deeply_inject_covariates", True)
    n_per_stack = n_layers if deep else 1
    assert sum(name.startswith("encoder.") for name, _ in injected) == n_per_stack
    assert sum(name.startswith("decoder.") for name, _ in injected) == n_per_stack
    for name, layer in injected:
        for j, table in enumerate(layer.covariates):
            assert len(table.blocks) == (2 if j in extended else 1), name
    for stack in (query.module.encoder, query.module.decoder):
        for i, layer in enumerate(stack.layers):
            assert (len(layer.covariates) > 0) == (deep or i == 0)


def test_frozen_parameters_get_no_gradient_and_do_not_move(ref_model: Any, query_adata: Any) -> None:
    before = parameters(ref_model)
    query = atlasmap.SCVI.load_query_data(query_adata, ref_model)
    query.train(3, progress_bar=False, weight_decay=0.5)
    n_frozen = n_trainable = 0
    for name, p in query.module.named_parameters():
        if p.requires_grad:
            n_trainable += 1
            assert p.grad is not None and torch.count_nonzero(p.grad) > 0, f"trainable {name} got no gradient"
        else:
            n_frozen += 1
            assert p.grad is None, f"frozen {name} received a gradient"
            assert torch.equal(p.detach(), before[name]), f"frozen {name} moved"
    assert n_frozen > 10 and n_trainable == 2 * SMALL["n_layers"]


def test_frozen_parameters_get_no_gradient_in_a_manual_step(ref_model: Any, query_adata: Any) -> None:
    """One explicit forward/backward on a query minibatch: autograd never computes frozen gradients."""
    query = atlasmap.SCVI.load_query_data(query_adata, ref_model)
    cells = query._cells(training=True)
    query.module.train()
    terms = query.module.loss(cells.batch(np.arange(64), query.device), kl_weight=1.0)
    terms.loss.backward()
    grads = {n: p.grad for n, p in query.module.named_parameters()}
    assert {n for n, g in grads.items() if g is not None} == set(query.surgery["trainable"])


def test_reference_model_is_not_modified_by_surgery(ref_model: Any, query_adata: Any) -> None:
    before = parameters(ref_model)
    z_before = ref_model.get_latent_representation()
    query = train_query(query_adata, ref_model, epochs=2)
    assert query.module is not ref_model.module
    for name, p in ref_model.module.named_parameters():
        assert torch.equal(p.detach(), before[name])
        assert p.requires_grad
    assert ref_model.registry.categories["batch"] == REF_BATCHES
    assert ref_model.surgery is None
    assert np.array_equal(ref_model.get_latent_representation(), z_before)


def test_unfrozen_trains_every_weight(ref_adata: Any, query_adata: Any) -> None:
    ref_model = train_reference(ref_adata, categorical_covariate_keys=["donor"], use_batch_norm="both")
    z_ref = ref_model.get_latent_representation()
    before = parameters(ref_model)
    query = atlasmap.SCVI.load_query_data(query_adata, ref_model, unfrozen=True)
    params = dict(query.module.named_parameters())
    assert all(p.requires_grad for p in params.values())
    assert query.module.frozen_state.norms_in_eval == ()
    query.train(3, progress_bar=False)
    unchanged = [n for n, b in before.items() if torch.equal(b, params[n].detach())]
    assert unchanged == [], f"unfrozen=True left these weights unchanged: {unchanged}"
    # fine-tuning everything is allowed to move the reference latent (the invariant is the frozen default)
    assert not np.array_equal(query.get_latent_representation(ref_adata), z_ref)


def test_freeze_expression_false_trains_encoder_first_layer(ref_model: Any, query_adata: Any) -> None:
    before = parameters(ref_model)
    query = atlasmap.SCVI.load_query_data(query_adata, ref_model, freeze_expression=False)
    released = {"encoder.layers.0.linear.weight", "encoder.layers.0.linear.bias"}
    expected = _expected_new_blocks({}) | released
    assert {n for n, p in query.module.named_parameters() if p.requires_grad} == expected
    query.train(3, progress_bar=False)
    params = dict(query.module.named_parameters())
    for name in released:
        assert not torch.equal(params[name].detach(), before[name]), f"{name} did not train"
    for name in before:
        if name not in released:
            assert torch.equal(params[name].detach(), before[name]), f"{name} should have stayed frozen"


def test_freeze_decoder_first_layer_false_trains_decoder_first_layer(ref_model: Any, query_adata: Any) -> None:
    query = atlasmap.SCVI.load_query_data(query_adata, ref_model, freeze_decoder_first_layer=False)
    released = {"decoder.layers.0.linear.weight", "decoder.layers.0.linear.bias"}
    assert {n for n, p in query.module.named_parameters() if p.requires_grad} == _expected_new_blocks({}) | released


@pytest.mark.parametrize("freeze_decoder_bn", [False, True])
def test_batch_norm_surgery_options(ref_adata: Any, query_adata: Any, freeze_decoder_bn: bool) -> None:
    ref_model = train_reference(ref_adata, use_batch_norm="both")
    z_ref = ref_model.get_latent_representation()
    stats = {n: b.clone() for n, b in ref_model.module.named_buffers()}
    assert any(n.startswith("encoder.norms.") for n in stats) and any(n.startswith("decoder.norms.") for n in stats)
    query = train_query(query_adata, ref_model, freeze_batchnorm_decoder=freeze_decoder_bn)
    after = dict(query.module.named_buffers())
    trainable = {n for n, p in query.module.named_parameters() if p.requires_grad}
    dec_bn = {f"decoder.norms.{i}.{w}" for i in range(SMALL["n_layers"]) for w in ("weight", "bias")}
    for name, value in stats.items():
        if name.startswith("encoder.") or (freeze_decoder_bn and name.startswith("decoder.")):
            assert torch.equal(after[name], value), f"frozen batch-norm statistic {name} changed"
        elif name.startswith("decoder.") and name.endswith("running_mean"):
            assert not torch.equal(after[name], value), f"decoder batch-norm statistic {name} did not update"
    if freeze_decoder_bn:
        assert trainable == _expected_new_blocks({})
    else:
        assert trainable == _expected_new_blocks({}) | dec_bn
    assert all(not m.training for m in query.module.frozen_state.norms_in_eval)
    assert np.array_equal(query.get_latent_representation(ref_adata), z_ref)


def test_query_of_known_batches_adds_nothing(ref_model: Any, ref_adata: Any) -> None:
    """A 'query' made only of reference categories gets no new blocks: it embeds exactly like the reference,
    and there is nothing to train — said when it is mapped, with the ways forward: embed without training
    (max_epochs=0) or fine-tune (unfrozen=True), both of which work."""
    with pytest.warns(UserWarning, match=r"only categories the reference knows.*max_epochs=0.*unfrozen=True"):
        query = atlasmap.SCVI.load_query_data(ref_adata[::2].copy(), ref_model)
    assert query.registry.categories == ref_model.registry.categories
    assert query.surgery["trainable"] == [] and query.surgery["new_categories"] == {"batch": []}
    assert all(len(t.blocks) == 1 for _, layer in _injected_layers(query.module) for t in layer.covariates)
    assert np.array_equal(query.get_latent_representation(ref_adata), ref_model.get_latent_representation())
    with pytest.raises(atlasmap.InputError, match=r"nothing to train.*max_epochs=0.*unfrozen=True"):
        query.train(1, progress_bar=False)
    query.train(0)  # embed as it is: no error, nothing changes
    assert np.array_equal(query.get_latent_representation(ref_adata), ref_model.get_latent_representation())
    tuned = atlasmap.SCVI.load_query_data(ref_adata[::2].copy(), ref_model, unfrozen=True)
    tuned.train(1, progress_bar=False)
    assert len(tuned.history["epoch"]) == 1


def test_max_epochs_zero_embeds_the_query_right_after_surgery(ref_model: Any, query_adata: Any) -> None:
    query = atlasmap.SCVI.load_query_data(query_adata, ref_model)
    before = {n: p.detach().clone() for n, p in query.module.named_parameters()}
    query.train(max_epochs=0)
    assert query.history == {} and query.is_trained
    assert all(torch.equal(p.detach(), before[n]) for n, p in query.module.named_parameters())
    assert query.get_latent_representation().shape == (query_adata.n_obs, ref_model.module.config.n_latent)
    with pytest.raises(atlasmap.InputError, match=r"max_epochs=0 trains nothing.*reference"):
        atlasmap.SCVI(query_adata, batch_key="batch", n_latent=4).train(max_epochs=0)


def test_unknown_surgery_option_is_refused(ref_model: Any, query_adata: Any) -> None:
    with pytest.raises(atlasmap.InputError, match="freeze_expresion"):
        atlasmap.SCVI.load_query_data(query_adata, ref_model, freeze_expresion=False)


def test_untrained_reference_is_refused(ref_adata: Any, query_adata: Any) -> None:
    untrained = atlasmap.SCVI(ref_adata, batch_key="batch", **SMALL)
    with pytest.raises(atlasmap.NotTrainedError, match="train"):
        atlasmap.SCVI.load_query_data(query_adata, untrained)


# ------------------------------------------------------------------------------------------ determinism
def test_same_seed_gives_bit_identical_results(ref_adata: Any, query_adata: Any) -> None:
    runs = []
    for _ in range(2):
        ref_model = train_reference(ref_adata.copy(), seed=3, train_kwargs={"seed": 5})
        query = train_query(query_adata.copy(), ref_model, seed=4, train_kwargs={"seed": 6})
        runs.append((ref_model.get_latent_representation(), query.get_latent_representation(),
                     query.get_latent_representation(give_mean=False, seed=1), ref_model.history["elbo_train"]))
    for a, b in zip(*runs, strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("which", ["init_seed", "train_seed", "surgery_seed", "query_train_seed"])
def test_different_seed_gives_different_results(which: str, ref_adata: Any, query_adata: Any) -> None:
    def run(seed: int) -> tuple[np.ndarray, np.ndarray]:
        ref_model = train_reference(ref_adata, epochs=3, seed=seed if which == "init_seed" else 0,
                                    train_kwargs={"seed": seed if which == "train_seed" else 0})
        query = train_query(query_adata, ref_model, epochs=3, seed=seed if which == "surgery_seed" else 0,
                            train_kwargs={"seed": seed if which == "query_train_seed" else 0})
        return ref_model.get_latent_representation(), query.get_latent_representation()

    (ref_a, q_a), (ref_b, q_b) = run(1), run(2)
    assert not np.array_equal(q_a, q_b)
    if which in ("init_seed", "train_seed"):
        assert not np.array_equal(ref_a, ref_b)
    else:  # query-side seeds cannot touch the reference
        assert np.array_equal(ref_a, ref_b)


def test_latent_sample_depends_on_seed_and_mean_does_not(query_model: Any) -> None:
    mean_a = query_model.get_latent_representation(seed=1)
    mean_b = query_model.get_latent_representation(seed=2)
    assert np.array_equal(mean_a, mean_b)
    s1 = query_model.get_latent_representation(give_mean=False, seed=1)
    assert np.array_equal(s1, query_model.get_latent_representation(give_mean=False, seed=1))
    assert not np.array_equal(s1, query_model.get_latent_representation(give_mean=False, seed=2))
    assert not np.array_equal(s1, mean_a)


# ------------------------------------------------------------------------------------------ input never modified
def _variant(adata: Any, kind: str) -> Any:
    adata = adata.copy()
    if kind == "dense_int":
        adata.X = adata.X.toarray().astype(np.int64)
    elif kind == "csc":
        adata.X = sp.csc_matrix(adata.X)
    elif kind == "object_batch":  # plain strings, not categorical: must not be converted in place
        adata.obs["batch"] = adata.obs["batch"].astype(str).astype(object)
        adata.obs["donor"] = adata.obs["donor"].astype(str).astype(object)
    elif kind == "log_X_counts_layer":
        adata.X = sp.csr_matrix(np.log1p(adata.layers["counts"].toarray()).astype(np.float32))
    return adata


@pytest.mark.parametrize("kind", ["csr", "dense_int", "csc", "object_batch", "log_X_counts_layer"])
def test_input_anndata_never_modified(kind: str, sim: Any, tmp_path: Any) -> None:
    ref, query = (_variant(a, kind) for a in split_by_batch(sim))
    layer = "counts" if kind == "log_X_counts_layer" else None
    snaps = {"ref": snapshot(ref), "query": snapshot(query)}
    ref_model = atlasmap.SCVI(ref, batch_key="batch", categorical_covariate_keys=["donor"],
                              continuous_covariate_keys=["score"], layer=layer, **SMALL)
    ref_model.train(2, progress_bar=False)
    ref_model.get_latent_representation()
    ref_model.get_latent_representation(give_mean=False)
    ref_model.get_normalized_expression(transform_batch="batch1", library_size="latent")
    ref_model.save(tmp_path / "ref")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        query_model = atlasmap.SCVI.load_query_data(query, tmp_path / "ref")
    query_model.train(2, progress_bar=False)
    query_model.get_latent_representation()
    query_model.get_latent_representation(ref)
    query_model.get_normalized_expression(transform_batch=["batch0", "batch2"])
    query_model.get_normalized_expression(ref)
    query_model.save(tmp_path / "query")
    atlasmap.SCVI.load(tmp_path / "query", adata=query).get_latent_representation()
    assert_unchanged(ref, snaps["ref"])
    assert_unchanged(query, snaps["query"])
    assert ref_model.adata is ref and query_model.adata is query


def test_failed_calls_do_not_modify_input(ref_model: Any, query_adata: Any) -> None:
    snap = snapshot(query_adata)
    with pytest.raises(atlasmap.InputError):
        ref_model.get_latent_representation(query_adata)  # unseen batches
    with pytest.raises(atlasmap.InputError):
        atlasmap.SCVI.load_query_data(query_adata, ref_model, batch_key="not_a_column")
    assert_unchanged(query_adata, snap)


def test_normalization_module_types(ref_adata: Any) -> None:
    """The norm options build what they say (guards the batch-norm invariant cases above)."""
    bn = atlasmap.SCVI(ref_adata, batch_key="batch", use_batch_norm="both", **SMALL).module
    ln = atlasmap.SCVI(ref_adata, batch_key="batch", **SMALL).module
    assert all(isinstance(n, nn.BatchNorm1d) for n in [*bn.encoder.norms, *bn.decoder.norms])
    assert all(isinstance(n, nn.LayerNorm) for n in [*ln.encoder.norms, *ln.decoder.norms])


def test_closest_batch_init_starts_a_renamed_batch_exactly_where_the_reference_had_it(ref_model: Any,
                                                                                      ref_adata: Any) -> None:
    """A query batch that *is* a reference batch under another name: the closest-batch start finds it and the
    query embeds, before any training, exactly as the reference embeds those cells; a random start does not."""
    cells = ref_adata[ref_adata.obs["batch"] == "batch1"].copy()
    renamed = cells.copy()
    renamed.obs["batch"] = pd.Categorical(["batch1-again"] * renamed.n_obs)
    query = atlasmap.SCVI.load_query_data(renamed, ref_model, batch_init="closest")
    assert query.surgery["batch_init"] == {"method": "closest", "started_from": {"batch1-again": "batch1"}}
    assert np.array_equal(query.get_latent_representation(), ref_model.get_latent_representation(cells))
    assert np.array_equal(query.get_latent_representation(ref_adata), ref_model.get_latent_representation())
    random = atlasmap.SCVI.load_query_data(renamed, ref_model)
    assert not np.allclose(random.get_latent_representation(), ref_model.get_latent_representation(cells))
    assert random.surgery["batch_init"]["method"] == "random"
    with pytest.raises(atlasmap.InputError, match="batch_init must be"):
        atlasmap.SCVI.load_query_data(renamed, ref_model, batch_init="nearest")
