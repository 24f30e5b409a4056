"""totalVI: joint RNA + protein model, surgery with new per-batch protein priors, missing-protein masking.

* The reference latent is bit-identical after query training, whatever the query's protein panel
  (full, half, none).
* Exactly the new covariate blocks train, including the new batches' protein background prior, which
  starts from the query's protein counts (or the reference average when the batch measured none).
* A masked protein value changes neither the loss (nor its gradients) nor the latent: proven at module
  level with garbage (huge, NaN, inf) in masked entries, and at model level (dropped column == NaN column
  == all-zero-in-batch column).
* Save -> load gives identical outputs; the CLI trains and maps totalVI; bad input gives one clear error
  and the input AnnData is never modified.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from support import assert_unchanged, snapshot

import atlasmap
from atlasmap import cli
from atlasmap.data.proteins import background_prior
from atlasmap.datasets import simulate_counts
from atlasmap.errors import InputError
from atlasmap.models.totalvi import (
    PROTEIN_DENOISED_KEY,
    PROTEIN_FOREGROUND_KEY,
    PROTEIN_MEASURED_KEY,
    TOTALVI,
)

# the expected "proteins missing / RNA only" warnings of partial-panel queries (asserted where they matter)
pytestmark = [pytest.mark.filterwarnings("ignore:.*proteins are not in the data:UserWarning"),
              pytest.mark.filterwarnings("ignore:adata.obsm has no:UserWarning")]

KEY = "protein_expression"
N_PROTEINS = 10
PROTEINS = [f"prot{i}" for i in range(N_PROTEINS)]
HALF = PROTEINS[::2]  # the half a "small panel" query keeps
TINY: dict[str, Any] = {"n_hidden": 32, "n_latent": 6, "n_layers_encoder": 2, "n_layers_decoder": 2}
EPOCHS = 6


# ------------------------------------------------------------------------------------------ data
def simulate_citeseq(n_cells: int = 330, n_genes: int = 40, seed: int = 0) -> ad.AnnData:
    """Simulated CITE-seq: NB RNA counts (3 batches, 4 cell types) and NB protein counts with a per-batch
    background plus a cell-type foreground, as a DataFrame in ``obsm['protein_expression']``."""
    adata = simulate_counts(n_cells=n_cells, n_genes=n_genes, n_batches=3, n_cell_types=4,
                            mean_library=800.0, seed=seed)
    rng = np.random.default_rng(seed + 1)
    types = adata.obs["cell_type"].cat.codes.to_numpy()
    batches = adata.obs["batch"].cat.codes.to_numpy()
    foreground = np.exp(rng.normal(3.0, 1.0, (4, N_PROTEINS))) * (rng.random((4, N_PROTEINS)) < 0.5)
    background = np.exp(rng.normal(2.0, 0.3, (3, 1)))
    mean = background[batches] + foreground[types]
    counts = rng.negative_binomial(5.0, 5.0 / (5.0 + mean)).astype(np.float32)
    adata.obsm[KEY] = pd.DataFrame(counts, index=adata.obs_names, columns=PROTEINS)
    return adata


def split(adata: ad.AnnData) -> tuple[ad.AnnData, ad.AnnData]:
    is_ref = adata.obs["batch"].isin(["batch0", "batch1"]).to_numpy()
    ref, query = adata[is_ref].copy(), adata[~is_ref].copy()
    for part in (ref, query):
        part.obs["batch"] = part.obs["batch"].cat.remove_unused_categories()
    return ref, query


def panel(query: ad.AnnData, proteins: list[str] | None) -> ad.AnnData:
    """A copy of ``query`` measuring only ``proteins`` (None: RNA only, no protein obsm at all)."""
    out = query.copy()
    if proteins is None:
        del out.obsm[KEY]
    else:
        out.obsm[KEY] = out.obsm[KEY][proteins].copy()
    return out


def quiet_query(adata: ad.AnnData, reference: TOTALVI, **kwargs: Any) -> TOTALVI:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return TOTALVI.load_query_data(adata, reference, **kwargs)


@pytest.fixture(scope="module")
def cite() -> ad.AnnData:
    return simulate_citeseq()


@pytest.fixture(scope="module")
def ref_model(cite: ad.AnnData) -> TOTALVI:
    ref, _ = split(cite)
    return TOTALVI(ref, protein_expression_obsm_key=KEY, batch_key="batch", **TINY).train(EPOCHS, progress_bar=False)


@pytest.fixture(scope="module", params=["full", "half", "rna_only"])
def mapped(request: pytest.FixtureRequest, cite: ad.AnnData, ref_model: TOTALVI) -> dict[str, Any]:
    """The reference mapped onto a query measuring all, half, or none of the proteins, and trained."""
    ref, query = split(cite)
    proteins = {"full": PROTEINS, "half": HALF, "rna_only": None}[request.param]
    adata = panel(query, proteins)
    model = quiet_query(adata, ref_model)
    init = {n: p.detach().clone() for n, p in model.module.named_parameters()}
    model.train(EPOCHS, progress_bar=False)
    return {"kind": request.param, "ref": ref, "query": adata, "model": model, "init": init}


# ------------------------------------------------------------------------------------------ invariants
def test_reference_latent_bit_identical(mapped: dict[str, Any], ref_model: TOTALVI) -> None:
    z_ref = ref_model.get_latent_representation(mapped["ref"])
    z_by_query = mapped["model"].get_latent_representation(mapped["ref"])
    assert np.isfinite(z_ref).all()
    assert np.array_equal(z_ref, z_by_query), f"max |diff| {np.abs(z_ref - z_by_query).max():.3g}"
    # and the reference model's own decoder outputs for its cells are untouched too
    _, pro_ref = ref_model.get_normalized_expression(mapped["ref"], return_numpy=True)
    _, pro_query = mapped["model"].get_normalized_expression(mapped["ref"], return_numpy=True)
    assert np.array_equal(pro_ref, pro_query)


def test_only_new_blocks_train(mapped: dict[str, Any], ref_model: TOTALVI) -> None:
    model = mapped["model"]
    trainable = {n for n, p in model.module.named_parameters() if p.requires_grad}
    tables = model.module.covariate_tables(0)
    expected = {n for n, p in model.module.named_parameters() if any(p is t.blocks[1] for t in tables)}
    assert trainable == expected
    assert {"prior_back_mean.blocks.1", "prior_back_log_scale.blocks.1"} <= trainable
    # every injected layer of the encoder and the four decoder bodies, and every head, got a new block
    stacks = model.module.surgery_stacks()
    for stack in stacks["encoder"] + stacks["decoder"]:
        for layer in stack.layers:
            assert layer.covariates[0].block_sizes == [2, 1]
    assert len(stacks["decoder"]) == 4
    ref_params = dict(ref_model.module.named_parameters())
    for name, p in model.module.named_parameters():
        if name in trainable:
            if mapped["kind"] == "rna_only" and name.startswith("prior_back"):
                continue  # no measured protein: the prior of the new batch gets no gradient
            assert not torch.equal(p, mapped["init"][name]), f"{name} did not train"
        else:
            assert torch.equal(p, ref_params[name]), f"frozen {name} moved"
    assert torch.equal(model.module.protein_fill, ref_model.module.protein_fill)


def test_new_background_prior_initialised_from_query(cite: ad.AnnData, ref_model: TOTALVI) -> None:
    _, query = split(cite)
    model = quiet_query(query, ref_model)
    prior = background_prior(query.obsm[KEY].to_numpy(), seed=2)
    assert prior is not None
    new_mean = model.module.prior_back_mean.blocks[1].detach()
    new_scale = model.module.prior_back_log_scale.blocks[1].detach()
    np.testing.assert_allclose(new_mean.numpy(), prior[0], rtol=1e-6)
    np.testing.assert_allclose(new_scale.numpy(), np.log(max(prior[1], 1e-3)), rtol=1e-5)
    # a query batch measuring no protein starts from the reference batches' average
    rna_only = quiet_query(panel(query, None), ref_model)
    ref_table = ref_model.module.prior_back_mean.table().detach()
    assert torch.equal(rna_only.module.prior_back_mean.blocks[1].detach()[0], ref_table.mean(0))


def test_invariant_other_architecture(cite: ad.AnnData) -> None:
    """Batch norm, no deep injection, ZINB, per-batch dispersions, an extra categorical covariate extended
    together with the batch, and a continuous covariate: reference latent still bit-identical."""
    adata = cite.copy()
    rng = np.random.default_rng(5)
    is_ref = adata.obs["batch"].isin(["batch0", "batch1"]).to_numpy()
    adata.obs["donor"] = np.where(is_ref, rng.choice(["d0", "d1"], adata.n_obs), rng.choice(["d1", "d2"], adata.n_obs))
    adata.obs["score"] = rng.normal(size=adata.n_obs)
    ref, query = split(adata)
    kwargs = {**TINY, "deeply_inject_covariates": False, "gene_likelihood": "zinb", "gene_dispersion": "gene-batch",
              "protein_dispersion": "protein-batch", "use_batch_norm": "both", "use_layer_norm": "none"}
    reference = TOTALVI(ref, protein_expression_obsm_key=KEY, batch_key="batch", categorical_covariate_keys=["donor"],
                        continuous_covariate_keys=["score"], **kwargs).train(3, progress_bar=False)
    z_ref = reference.get_latent_representation()
    model = quiet_query(panel(query, HALF), reference)
    assert model.surgery["new_categories"] == {"batch": ["batch2"], "donor": ["d2"]}
    trainable = {n for n, p in model.module.named_parameters() if p.requires_grad}
    assert {"px_r_batch.blocks.1", "py_r_batch.blocks.1", "mixing.covariates.1.blocks.1"} <= trainable
    # new per-batch dispersions start from the reference batches' average, not at random
    assert torch.equal(model.module.py_r_batch.blocks[1].detach()[0],
                       reference.module.py_r_batch.table().detach().mean(0))
    # decoder batch norms train (freeze_batchnorm_decoder=False), the encoder's are frozen in eval mode
    for stack in model.module.surgery_stacks()["decoder"]:
        assert all(p.requires_grad for p in stack.norms.parameters())
    assert all(not p.requires_grad for p in model.module.encoder.norms.parameters())
    model.train(3, progress_bar=False, weight_decay=1e-2)
    assert np.array_equal(model.get_latent_representation(ref), z_ref)


def test_surgery_options_reach_every_decoder_body(cite: ad.AnnData, ref_model: TOTALVI) -> None:
    _, query = split(cite)
    model = quiet_query(query, ref_model, freeze_decoder_first_layer=False)
    for stack in model.module.surgery_stacks()["decoder"]:
        assert stack.layers[0].linear.weight.requires_grad
    assert not model.module.encoder.layers[0].linear.weight.requires_grad
    unfrozen = quiet_query(query, ref_model, unfrozen=True)
    assert all(p.requires_grad for p in unfrozen.module.parameters())


# ------------------------------------------------------------------------------------------ masking
def _module_batch(model: TOTALVI, adata: ad.AnnData) -> dict[str, torch.Tensor]:
    cells = model._cells(adata)
    return cells.batch(np.arange(cells.n_cells), model.device)


def test_masked_values_change_neither_loss_nor_latent(cite: ad.AnnData, ref_model: TOTALVI) -> None:
    """Module level: garbage (huge counts, NaN, inf) in masked entries changes no loss term, no gradient,
    and no latent coordinate; a change in a *measured* value does change the loss."""
    ref, _ = split(cite)
    module = ref_model.module
    batch = _module_batch(ref_model, ref)
    rng = np.random.default_rng(0)
    mask = torch.from_numpy(rng.random(batch["y"].shape) < 0.7)
    mask[:5] = False  # some cells with no protein at all
    clean = {**batch, "y_mask": mask, "y": torch.where(mask, batch["y"], torch.zeros_like(batch["y"]))}
    garbage = torch.from_numpy(rng.integers(0, 10**6, batch["y"].shape).astype(np.float32))
    garbage[:3, :3] = float("nan")
    garbage[3:6, :2] = float("inf")
    dirty = {**clean, "y": torch.where(mask, clean["y"], garbage)}

    def run(b: dict[str, torch.Tensor]) -> tuple[Any, dict[str, torch.Tensor], torch.Tensor]:
        module.train()
        module.zero_grad(set_to_none=True)
        torch.manual_seed(123)
        terms = module.loss(b, kl_weight=0.7)
        terms.loss.backward()
        grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
        module.eval()
        with torch.no_grad():
            qz_m = module.inference(b, sample=False)["qz_m"]
        return terms, grads, qz_m

    try:
        t_clean, g_clean, z_clean = run(clean)
        t_dirty, g_dirty, z_dirty = run(dirty)
    finally:
        module.zero_grad(set_to_none=True)
        module.eval()
    assert torch.isfinite(t_clean.loss)
    assert torch.equal(t_clean.loss, t_dirty.loss)
    for key in ("reconstruction_rna", "reconstruction_protein", "kl_z", "kl_background"):
        assert torch.equal(t_clean.extra[key], t_dirty.extra[key]), key
    assert g_clean.keys() == g_dirty.keys() and all(torch.equal(g_clean[k], g_dirty[k]) for k in g_clean)
    assert torch.equal(z_clean, z_dirty)
    # sanity: measured values do matter
    changed = {**clean, "y": torch.where(mask, clean["y"] * 3 + 1, clean["y"])}
    with torch.no_grad():
        losses = []
        for b in (changed, clean):
            torch.manual_seed(123)
            losses.append(module.loss(b).loss)
        assert not torch.equal(losses[0], losses[1])
        assert not torch.equal(module.inference(changed, sample=False)["qz_m"], z_clean)


def test_dropped_nan_and_all_zero_columns_are_the_same_mask(cite: ad.AnnData, ref_model: TOTALVI) -> None:
    """Model level: a protein absent from the panel, NaN for every cell, or zero in every cell of the batch
    is the same missing measurement: same mask, same latent, same loss after the same training."""
    _, query = split(cite)
    missing = [p for p in PROTEINS if p not in HALF]
    dropped = panel(query, HALF)
    as_nan, as_zero = query.copy(), query.copy()
    frame = as_nan.obsm[KEY].copy()
    frame[missing] = np.nan
    as_nan.obsm[KEY] = frame
    frame = as_zero.obsm[KEY].copy()
    frame[missing] = 0.0
    as_zero.obsm[KEY] = frame
    with pytest.warns(UserWarning, match="zero counts in every cell of batch 'batch2'"):
        TOTALVI.load_query_data(as_zero.copy(), ref_model)
    models = [quiet_query(a, ref_model) for a in (dropped, as_nan, as_zero)]
    masks = [m.get_protein_mask() for m in models]
    for m in masks:
        assert m.columns.tolist() == PROTEINS
        assert not m[missing].to_numpy().any() and m[HALF].to_numpy().all()
    latents = []
    for model in models:
        model.train(3, progress_bar=False)
        latents.append(model.get_latent_representation())
    assert np.array_equal(latents[0], latents[1]) and np.array_equal(latents[0], latents[2])
    assert models[0].history["elbo_train"] == models[1].history["elbo_train"] == models[2].history["elbo_train"]


def test_per_cell_nan_masks_only_that_value(cite: ad.AnnData, ref_model: TOTALVI) -> None:
    ref, _ = split(cite)
    holed = ref.copy()
    frame = holed.obsm[KEY].copy()
    frame.iloc[0, 1] = np.nan
    holed.obsm[KEY] = frame
    mask = ref_model.get_protein_mask(holed).to_numpy()
    assert not mask[0, 1] and mask.sum() == mask.size - 1
    z_full = ref_model.get_latent_representation(ref)
    z_holed = ref_model.get_latent_representation(holed)
    assert np.array_equal(z_full[1:], z_holed[1:]) and not np.array_equal(z_full[0], z_holed[0])


def test_imputation_decodes_in_batches_that_measured(mapped: dict[str, Any]) -> None:
    model, query = mapped["model"], mapped["query"]
    mask = model.get_protein_mask(query).to_numpy()
    _, own = model.get_normalized_expression(query, return_numpy=True)
    _, in_query_batch = model.get_normalized_expression(query, transform_batch="batch2", return_numpy=True)
    _, in_reference = model.get_normalized_expression(query, transform_batch=["batch0", "batch1"],
                                                      return_numpy=True)
    assert np.isfinite(own).all() and (own > 0).all()
    np.testing.assert_allclose(own[mask], in_query_batch[mask], rtol=1e-5)
    np.testing.assert_allclose(own[~mask], in_reference[~mask], rtol=1e-5)
    fg = model.get_protein_foreground_probability(query)
    assert fg.shape == (query.n_obs, N_PROTEINS) and ((fg >= 0) & (fg <= 1)).all().all()


# ------------------------------------------------------------------------------------------ outputs
def test_outputs_and_annotate(mapped: dict[str, Any]) -> None:
    model, query = mapped["model"], mapped["query"]
    snap = snapshot(query)
    rna, pro = model.get_normalized_expression(query, gene_list=["gene1", "gene3"], protein_list=["prot2"])
    assert rna.shape == (query.n_obs, 2) and pro.columns.tolist() == ["prot2"]
    full_rna, _ = model.get_normalized_expression(query)
    np.testing.assert_allclose(full_rna.sum(1), 1.0, rtol=1e-5)
    _, scaled = model.get_normalized_expression(query, scale_protein=True)
    np.testing.assert_allclose(scaled.sum(1), 1.0, rtol=1e-5)
    sampled = model.get_normalized_expression(query, n_samples=3, return_numpy=True)
    assert all(np.isfinite(s).all() for s in sampled)
    out = model.annotate(query)
    assert out is not query
    assert out.obsm["X_atlasmap"].shape == (query.n_obs, TINY["n_latent"])
    for key in (PROTEIN_DENOISED_KEY, PROTEIN_FOREGROUND_KEY, PROTEIN_MEASURED_KEY):
        assert out.obsm[key].columns.tolist() == PROTEINS and out.obsm[key].index.equals(query.obs_names)
    assert out.uns["atlasmap"]["protein_names"] == PROTEINS
    assert_unchanged(query, snap)
    with pytest.raises(InputError, match="transform_batch"):
        model.get_normalized_expression(query, transform_batch="nope")
    with pytest.raises(InputError, match="proteins not in the model"):
        model.get_protein_foreground_probability(query, protein_list=["CD999"])


@pytest.mark.parametrize("mapped", ["rna_only"], indirect=True)
def test_rna_only_query_imputes_every_protein(mapped: dict[str, Any]) -> None:
    model, query = mapped["model"], mapped["query"]
    assert KEY not in query.obsm
    assert not model.get_protein_mask().to_numpy().any()
    assert model.batch_protein_mask["batch2"] == [False] * N_PROTEINS
    _, pro = model.get_normalized_expression()
    assert np.isfinite(pro.to_numpy()).all() and (pro.to_numpy() > 0).all()
    assert (pro.to_numpy().std(0) > 0).all()  # per-cell values from the latent, not one constant
    fg = model.get_protein_foreground_probability()
    assert np.isfinite(fg.to_numpy()).all()


def test_joint_embedding_carries_protein_outputs(mapped: dict[str, Any]) -> None:
    from atlasmap.workflow.mapping import joint_embedding

    joint = joint_embedding(mapped["model"], mapped["query"], mapped["ref"])
    assert joint.n_obs == mapped["query"].n_obs + mapped["ref"].n_obs
    assert joint.obsm[PROTEIN_DENOISED_KEY].shape == (joint.n_obs, N_PROTEINS)
    measured = joint.obsm[PROTEIN_MEASURED_KEY].to_numpy()
    assert measured[: mapped["ref"].n_obs].all()


# ------------------------------------------------------------------------------------------ save / load
def test_save_load_round_trip(mapped: dict[str, Any], ref_model: TOTALVI, tmp_path: Path) -> None:
    model, query = mapped["model"], mapped["query"]
    for m, adata, name in ((ref_model, mapped["ref"], "ref"), (model, query, "query")):
        path = m.save(tmp_path / name)
        config = json.loads((path / "config.json").read_text())
        assert config["model"] == "TOTALVI" and config["extra"]["protein_names"] == PROTEINS
        loaded = atlasmap.load(path, device=m.device)
        assert isinstance(loaded, TOTALVI)
        assert loaded.batch_protein_mask == m.batch_protein_mask
        assert np.array_equal(loaded.get_latent_representation(adata), m.get_latent_representation(adata))
        for a, b in zip(loaded.get_normalized_expression(adata, return_numpy=True),
                        m.get_normalized_expression(adata, return_numpy=True), strict=True):
            assert np.array_equal(a, b)
        assert np.array_equal(loaded.get_protein_foreground_probability(adata, return_numpy=True),
                              m.get_protein_foreground_probability(adata, return_numpy=True))
        assert ({n for n, p in loaded.module.named_parameters() if p.requires_grad}
                == {n for n, p in m.module.named_parameters() if p.requires_grad})
    # a saved reference maps a query directly from its directory
    again = quiet_query(query, tmp_path / "ref")
    assert again.surgery["new_categories"] == {"batch": ["batch2"]}
    with pytest.raises(atlasmap.ModelFileError, match="TOTALVI"):
        atlasmap.SCVI.load(tmp_path / "ref")


def test_same_seed_same_model(cite: ad.AnnData) -> None:
    ref, _ = split(cite)
    small = ref[:80].copy()
    runs = [TOTALVI(small, protein_expression_obsm_key=KEY, batch_key="batch", seed=1, **TINY)
            .train(2, progress_bar=False).get_latent_representation() for _ in range(2)]
    assert np.array_equal(runs[0], runs[1])


# ------------------------------------------------------------------------------------------ bad input
def _with(adata: ad.AnnData, **changes: Any) -> ad.AnnData:
    out = adata.copy()
    for key, value in changes.items():
        if key == "obsm":
            out.obsm[KEY] = value
        elif key == "uns":
            out.uns.update(value)
    return out


def _bad_references(ref: ad.AnnData) -> dict[str, tuple[ad.AnnData, dict[str, Any], str]]:
    frame = ref.obsm[KEY]
    values = frame.to_numpy()
    dup = frame.copy()
    dup.columns = PROTEINS[:-1] + [PROTEINS[0]]
    negative, fractional, infinite, never = (frame.copy() for _ in range(4))
    negative.iloc[2, 3] = -1.0
    fractional.iloc[4, 1] = 0.5
    infinite.iloc[0, 0] = np.inf
    never["prot9"] = 0.0
    text = frame.astype(object)
    text.iloc[0, 0] = "high"
    return {
        "missing key": (ref, {"protein_expression_obsm_key": "adt"}, "'adt' is not in adata.obsm"),
        "array without names": (_with(ref, obsm=values), {}, "array without protein names"),
        "names key absent": (_with(ref, obsm=values), {"protein_names_uns_key": "names"}, "'names' is not in adata.uns"),
        "names wrong length": (_with(ref, obsm=values, uns={"names": PROTEINS[:3]}),
                               {"protein_names_uns_key": "names"}, "3 protein names"),
        "duplicated names": (_with(ref, obsm=dup), {}, "not unique"),
        "duplicated uns names": (_with(ref, obsm=values, uns={"names": PROTEINS[:-1] + ["prot0"]}),
                                 {"protein_names_uns_key": "names"}, "not unique"),
        "negative": (_with(ref, obsm=negative), {}, "negative values"),
        "fractional": (_with(ref, obsm=fractional), {}, "non-integer values"),
        "infinite": (_with(ref, obsm=infinite), {}, "infinite values"),
        "text": (_with(ref, obsm=text), {}, "non-numeric|numeric"),
        "all nan": (_with(ref, obsm=frame * np.nan), {}, "no protein is measured"),
        "never measured": (_with(ref, obsm=never), {}, "'prot9' have no counts in any reference cell"),
        "no columns": (_with(ref, obsm=frame.iloc[:, :0]), {}, "no proteins"),
    }


@pytest.mark.parametrize("case", list(_bad_references(split(simulate_citeseq(60))[0])))
def test_bad_reference_input(case: str) -> None:
    ref, _ = split(simulate_citeseq(60))
    adata, kwargs, message = _bad_references(ref)[case]
    frame_before = adata.obsm[KEY].copy() if isinstance(adata.obsm[KEY], pd.DataFrame) else adata.obsm[KEY].copy()
    snap = snapshot(adata) if case not in ("all nan", "text") else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with pytest.raises(InputError, match=message):
            TOTALVI(adata, **{"protein_expression_obsm_key": KEY, "batch_key": "batch", **TINY, **kwargs})
    if snap is not None:
        assert_unchanged(adata, snap)
    after = adata.obsm[KEY]
    if isinstance(frame_before, pd.DataFrame):
        pd.testing.assert_frame_equal(after, frame_before)
    else:
        assert np.array_equal(after, frame_before)


def test_array_with_names_equals_dataframe(cite: ad.AnnData) -> None:
    ref, _ = split(cite)
    small = ref[:80].copy()
    as_array = small.copy()
    as_array.obsm[KEY] = small.obsm[KEY].to_numpy()
    as_array.uns["protein_names"] = np.array(PROTEINS)
    a = TOTALVI(small, protein_expression_obsm_key=KEY, batch_key="batch", **TINY).train(2, progress_bar=False)
    b = TOTALVI(as_array, protein_expression_obsm_key=KEY, protein_names_uns_key="protein_names", batch_key="batch",
                **TINY).train(2, progress_bar=False)
    assert b.protein_names == tuple(PROTEINS)
    assert np.array_equal(a.get_latent_representation(), b.get_latent_representation())


def test_query_without_shared_proteins_is_refused(cite: ad.AnnData, ref_model: TOTALVI) -> None:
    _, query = split(cite)
    renamed = query.copy()
    renamed.obsm[KEY] = query.obsm[KEY].rename(columns=lambda c: f"CD_{c}")
    snap = snapshot(renamed)
    with pytest.raises(InputError, match="none of the model's 10 proteins"):
        TOTALVI.load_query_data(renamed, ref_model)
    assert_unchanged(renamed, snap)
    with pytest.raises(InputError, match="the reference is a TOTALVI model"):
        atlasmap.SCVI.load_query_data(query, ref_model)


def test_query_batch_without_proteins_is_documented_behaviour(cite: ad.AnnData, ref_model: TOTALVI) -> None:
    """A query of two batches, one with proteins and one whose proteins are all zero: the second is mapped
    from RNA alone (warned), the first keeps its measurements."""
    _, query = split(cite)
    two = query.copy()
    half = np.arange(two.n_obs) % 2 == 0
    two.obs["batch"] = pd.Categorical(np.where(half, "q_with", "q_without"))
    frame = two.obsm[KEY].copy()
    frame.loc[~half, :] = 0.0
    two.obsm[KEY] = frame
    snap = snapshot(two)
    with pytest.warns(UserWarning, match="batch 'q_without' has no protein measurements"):
        model = TOTALVI.load_query_data(two, ref_model)
    mask = model.get_protein_mask().to_numpy()
    assert mask[half].all() and not mask[~half].any()
    model.train(2, progress_bar=False)
    assert np.isfinite(model.get_normalized_expression()[1].to_numpy()).all()
    assert_unchanged(two, snap)


# ------------------------------------------------------------------------------------------ CLI
@pytest.fixture(scope="module")
def cli_files(tmp_path_factory: pytest.TempPathFactory, cite: ad.AnnData) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("totalvi_cli")
    ref, query = split(cite)
    paths = {"root": root, "ref": root / "ref.h5ad", "query": root / "query.h5ad", "rna": root / "rna.h5ad"}
    ref.write_h5ad(paths["ref"])
    panel(query, HALF).write_h5ad(paths["query"])
    panel(query, None).write_h5ad(paths["rna"])
    return paths


def test_cli_reference_and_map(cli_files: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    model_dir = cli_files["root"] / "model"
    assert cli.main(["reference", str(cli_files["ref"]), "--model", "totalvi", "--protein-key", KEY,
                     "--batch-key", "batch", "-o", str(model_dir), "--epochs", "2", "--n-latent", "4",
                     "--n-hidden", "16", "--quiet"]) == 0
    assert "proteins (10)" in capsys.readouterr().out
    assert isinstance(atlasmap.load(model_dir), TOTALVI)
    for name in ("query", "rna"):
        out = cli_files["root"] / f"mapped_{name}.h5ad"
        assert cli.main(["map", str(cli_files[name]), "--reference", str(model_dir), "-o", str(out),
                         "--epochs", "2", "--quiet", "--with-reference", str(cli_files["ref"])]) == 0
        joint = ad.read_h5ad(out)
        assert joint.obsm["X_atlasmap"].shape[1] == 4
        assert joint.obsm[PROTEIN_DENOISED_KEY].shape == (joint.n_obs, N_PROTEINS)
        is_query = (joint.obs["atlasmap_dataset"] == "query").to_numpy()
        measured = joint.obsm[PROTEIN_MEASURED_KEY].to_numpy().astype(bool)
        assert measured[~is_query].all()
        assert measured[is_query].sum() == (is_query.sum() * len(HALF) if name == "query" else 0)
    assert cli.main(["info", str(model_dir)]) == 0
    assert "proteins (10)" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--model", "totalvi"], "needs --protein-key"),
    (["--model", "totalvi", "--protein-key", "adt"], "'adt' is not in adata.obsm"),
    (["--protein-key", KEY], "apply to --model totalvi only"),
    (["--model", "totalvi", "--protein-key", KEY, "--gene-likelihood", "poisson"], "not poisson"),
])
def test_cli_errors(cli_files: dict[str, Path], capsys: pytest.CaptureFixture, args: list[str], message: str) -> None:
    out = cli_files["root"] / "never"
    code = cli.main(["reference", str(cli_files["ref"]), "--batch-key", "batch", "-o", str(out), "--epochs", "1",
                     "--quiet", *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_cli_error_has_no_traceback_in_a_real_process(cli_files: dict[str, Path]) -> None:
    proc = subprocess.run([sys.executable, "-m", "atlasmap.cli", "reference", str(cli_files["ref"]), "--model",
                           "totalvi", "--protein-key", "adt", "-o", str(cli_files["root"] / "x")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "'adt' is not in adata.obsm" in proc.stderr


# ------------------------------------------------------------------------------------------ real data (slow)
CITE = ("pbmc_citeseq_5k10k_tiny", "pbmc_citeseq_5k10k_tiny.h5ad")


def protein_correlation(imputed: np.ndarray, measured: np.ndarray) -> np.ndarray:
    """Pearson r per protein between log1p(imputed) and log1p(measured) across cells."""
    a, b = np.log1p(imputed), np.log1p(measured)
    a, b = a - a.mean(0), b - b.mean(0)
    return (a * b).sum(0) / np.sqrt((a**2).sum(0) * (b**2).sum(0))


@pytest.mark.slow
def test_end_to_end_shared_citeseq(shared_data: Any) -> None:
    """Reference on pbmc_10k, query pbmc_5k with all / half / no proteins; imputed vs held-out measured."""
    import scanpy as sc

    adata = ad.read_h5ad(shared_data(*CITE))
    snap_obsm = adata.obsm[KEY].copy()
    log = adata.copy()
    sc.pp.normalize_total(log, target_sum=1e4)
    sc.pp.log1p(log)
    sc.pp.highly_variable_genes(log, n_top_genes=1000, flavor="seurat")
    adata = adata[:, log.var["highly_variable"].to_numpy()].copy()
    is_ref = (adata.obs["batch"] == "pbmc_10k_protein_v3").to_numpy()
    ref, query = adata[is_ref].copy(), adata[~is_ref].copy()
    proteins = list(adata.obsm[KEY].columns)
    held_out = proteins[1::2]
    kept = [p for p in proteins if p not in held_out]
    arch = {"n_latent": 10, "n_hidden": 128}
    train = {"progress_bar": False, "seed": 0}
    reference = TOTALVI(ref, protein_expression_obsm_key=KEY, batch_key="batch", **arch).train(150, **train)
    z_ref = reference.get_latent_representation()

    results = {}
    for name, proteins_kept in (("half", kept), ("rna_only", None)):
        q = panel(query, proteins_kept)
        model = quiet_query(q, reference).train(150, **train)
        assert np.array_equal(model.get_latent_representation(ref), z_ref)
        _, imputed = model.get_normalized_expression(q)
        targets = held_out if name == "half" else proteins
        r = protein_correlation(imputed[targets].to_numpy(), query.obsm[KEY][targets].to_numpy())
        results[name] = float(np.mean(r))
    print(f"\ntotalVI imputation, mean Pearson r (log1p) over held-out proteins: {results}")
    assert results["half"] > 0.3 and results["rna_only"] > 0.3
    pd.testing.assert_frame_equal(adata.obsm[KEY], snap_obsm.loc[adata.obs_names])
