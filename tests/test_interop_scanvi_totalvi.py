"""Importing scvi-tools scANVI and totalVI references, and the scvi-hub (minified) layout.

Fixtures: ``tests/fixtures/scvi_tools_1.4.2_small/`` (``make_scvi_tools_more_fixtures.py``, scvi-tools 1.4.2).
Every model was trained on the 90 reference cells (``obs["split"] == "reference"``); the saved outputs
(``latent.npy``, ``predict*.npy``, ``normalized_at_mean.npy``, ``decoder_at_mean.npz``) are for those cells.
scvi-tools itself is not needed here.
"""

from __future__ import annotations

import copy
import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pytest
import torch

import atlasmap
from atlasmap.cli import main as cli_main
from atlasmap.data.minified import MINIFY_TYPE_KEY, StoredLatent
from atlasmap.errors import InputError, ModelFileError
from atlasmap.io.scvi_tools import read_scvi_tools_checkpoint
from atlasmap.models import from_scvi_tools
from atlasmap.workflow.mapping import joint_embedding, knn_transfer, map_query

FIXTURE = Path(__file__).parent / "fixtures" / "scvi_tools_1.4.2_small"
HUBS = ("scanvi_hub_minified", "scanvi_hub_minified_from_scvi", "scanvi_hub_minified_covariates")
SCANVI_MODELS = ("scanvi", "scanvi_covariates", *HUBS)
TOTALVI_MODELS = ("totalvi", "totalvi_protein_batch")
TOLERANCE = 1e-5
LABEL_ORDER = ("type2", "type0", "type1")  # scvi-tools swapped "Unknown" with the last label


@pytest.fixture(scope="module")
def rna() -> ad.AnnData:
    return ad.read_h5ad(FIXTURE / "adata.h5ad")


@pytest.fixture(scope="module")
def cite() -> ad.AnnData:
    return ad.read_h5ad(FIXTURE / "adata_protein.h5ad")


def _split(adata: ad.AnnData, part: str) -> ad.AnnData:
    return adata[adata.obs["split"] == part].copy()


def _unlabelled_query(adata: ad.AnnData) -> ad.AnnData:
    query = _split(adata, "query")
    query.obs["cell_type"] = "Unknown"  # map without the query's labels
    return query


# ------------------------------------------------------------------------------------------ scANVI
@pytest.mark.parametrize("name", SCANVI_MODELS)
def test_scanvi_matches_scvi_tools(name: str, rna: ad.AnnData) -> None:
    ref = _split(rna, "reference")
    model = atlasmap.SCANVI.from_scvi_tools(FIXTURE / name, ref)
    assert isinstance(model, atlasmap.SCANVI) and model.is_trained and model.surgery is None
    assert model.labels == LABEL_ORDER and model.unlabeled_category == "Unknown" and model.labels_key == "cell_type"
    latent = model.get_latent_representation(ref)
    diff = float(np.abs(latent - np.load(FIXTURE / name / "latent.npy")).max())
    print(f"scvi-tools SCANVI import {name}: max |latent difference| = {diff:.3g}")
    assert diff <= TOLERANCE
    soft = model.predict(ref, soft=True)
    assert list(soft.columns) == list(LABEL_ORDER)
    soft_diff = float(np.abs(soft.to_numpy() - np.load(FIXTURE / name / "predict_soft.npy")).max())
    hard = model.predict(ref).astype(str).to_numpy()
    expected = np.load(FIXTURE / name / "predict.npy")
    print(f"  predictions: {int((hard == expected).sum())}/{len(hard)} equal, max |soft difference| = {soft_diff:.3g}")
    assert np.array_equal(hard, expected) and soft_diff <= TOLERANCE
    norm = model.get_normalized_expression(ref, return_numpy=True)
    assert np.abs(norm - np.load(FIXTURE / name / "normalized_at_mean.npy")).max() <= 1e-6


def test_scanvi_architectures_are_mapped() -> None:
    mlp = atlasmap.SCANVI.from_scvi_tools(FIXTURE / "scanvi").module
    assert not mlp.config.linear_classifier and mlp.config.use_batch_norm == "both"
    assert isinstance(mlp.classifier.body.norms[0], torch.nn.BatchNorm1d) and mlp.config.z1_var_eps == 0.0
    linear = atlasmap.SCANVI.from_scvi_tools(FIXTURE / "scanvi_covariates")
    cfg = linear.module.config
    assert cfg.linear_classifier and linear.module.classifier.body is None
    assert (cfg.use_layer_norm, cfg.use_batch_norm, cfg.dispersion, cfg.use_observed_lib_size) == (
        "both", "none", "gene-batch", False)
    assert linear.registry.layer == "counts" and linear.registry.continuous_keys == ("score",)
    assert linear.registry.categories["single"] == ("s",)  # the one-category covariate: zero rows
    assert all(torch.count_nonzero(layer.covariates[2].blocks[0]) == 0 for layer in linear.module.encoder.layers)
    hub = atlasmap.SCANVI.from_scvi_tools(FIXTURE / "scanvi_hub_minified").module  # LN encoder, BN decoder
    assert isinstance(hub.classifier.body.norms[0], torch.nn.LayerNorm)
    assert isinstance(hub.decoder_z1_z2.norms[0], torch.nn.BatchNorm1d)
    assert torch.allclose(hub.y_prior, torch.full((3,), 1 / 3))


@pytest.mark.parametrize("name", ["scanvi", "scanvi_covariates"])
def test_scanvi_surgery_keeps_reference_latent(name: str, rna: ad.AnnData) -> None:
    ref = _split(rna, "reference")
    reference = atlasmap.SCANVI.from_scvi_tools(FIXTURE / name)
    before = reference.get_latent_representation(ref)
    soft_before = reference.predict(ref, soft=True).to_numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scanvi/ has encode_covariates=False (warned)
        query = atlasmap.SCANVI.load_query_data(_unlabelled_query(rna), reference).train(3, progress_bar=False)
    assert np.array_equal(before, query.get_latent_representation(ref))
    assert np.array_equal(soft_before, query.predict(ref, soft=True).to_numpy())  # frozen classifier
    predicted = query.predict()
    assert set(predicted.cat.categories) == set(LABEL_ORDER) and len(predicted) == 30


def test_imported_scanvi_saves_and_loads(tmp_path: Path, rna: ad.AnnData) -> None:
    ref = _split(rna, "reference")
    model = atlasmap.SCANVI.from_scvi_tools(FIXTURE / "scanvi_covariates")
    model.save(tmp_path / "m")
    loaded = atlasmap.load(tmp_path / "m")
    assert isinstance(loaded, atlasmap.SCANVI) and loaded.labels == LABEL_ORDER
    assert np.array_equal(model.predict(ref, soft=True).to_numpy(), loaded.predict(ref, soft=True).to_numpy())


# ------------------------------------------------------------------------------------------ totalVI
@pytest.mark.parametrize("name", TOTALVI_MODELS)
def test_totalvi_matches_scvi_tools(name: str, cite: ad.AnnData) -> None:
    ref = _split(cite, "reference")
    model = atlasmap.TOTALVI.from_scvi_tools(FIXTURE / name)
    assert isinstance(model, atlasmap.TOTALVI) and model.is_trained
    assert model.protein_names == ("CD3", "CD4", "CD8", "CD14", "CD19", "CD56", "CD16", "HLA-DR")
    latent = model.get_latent_representation(ref)
    diff = float(np.abs(latent - np.load(FIXTURE / name / "latent.npy")).max())
    print(f"scvi-tools TOTALVI import {name}: max |latent difference| = {diff:.3g}")
    assert diff <= TOLERANCE
    expected = np.load(FIXTURE / name / "decoder_at_mean.npz")
    cells = model._cells(ref)
    batch = cells.batch(np.arange(cells.n_cells))
    with torch.no_grad():
        inf = model.module.inference(batch, sample=False)
        gen = model.module.generative(inf["qz_m"], inf["library"], batch["cat"], batch["cont"], sample=False)
    ours = {"px_scale": gen["px_scale"], "px_dropout": gen.get("px_dropout"), "px_r": gen["theta"],
            "py_back_alpha": gen["back_mean"], "py_back_beta": gen["back_scale"], "py_fore_scale": gen["fore_scale"],
            "py_mixing": gen["mixing"], "py_r": gen["py_theta"]}
    for key in expected.files:
        if ours[key] is None:  # zero-inflation logits of an nb model (scvi-tools computes them anyway)
            assert model.module.config.gene_likelihood == "nb"
            continue
        value = ours[key].expand(expected[key].shape).numpy()
        assert np.abs(value - expected[key]).max() <= 1e-5 * max(1.0, float(np.abs(expected[key]).max())), key
    # normalised expression at the posterior mean: RNA (library size 1) and protein foreground at the median
    # background exp(alpha), where measured (atlasmap imputes the proteins a batch did not measure)
    rna_out, protein = model.get_normalized_expression(ref, return_numpy=True)
    assert np.abs(rna_out - expected["px_scale"]).max() <= 1e-6
    scvi_protein = (np.exp(expected["py_back_alpha"]) * expected["py_fore_scale"]
                    / (1.0 + np.exp(expected["py_mixing"])))
    measured = model.get_protein_mask(ref).to_numpy()
    assert np.allclose(protein[measured], scvi_protein[measured], rtol=1e-5, atol=1e-5)


def test_totalvi_variants_are_mapped() -> None:
    plain = atlasmap.TOTALVI.from_scvi_tools(FIXTURE / "totalvi")
    cfg = plain.module.config
    assert (cfg.use_batch_norm, cfg.use_layer_norm, cfg.gene_likelihood, cfg.use_observed_lib_size) == (
        "both", "none", "nb", True)
    assert cfg.unmeasured_proteins == "zero" and cfg.protein_batch_efficiency
    assert plain.batch_protein_mask == {"b0": [True] * 8, "b1": [True] * 8}
    masked = atlasmap.TOTALVI.from_scvi_tools(FIXTURE / "totalvi_protein_batch")
    cfg = masked.module.config
    assert (cfg.gene_dispersion, cfg.protein_dispersion, cfg.gene_likelihood) == ("gene-batch", "protein-batch", "zinb")
    assert (cfg.n_layers_encoder, cfg.n_layers_decoder, cfg.use_observed_lib_size) == (1, 2, False)
    assert masked.batch_protein_mask["b1"] == [True] * 6 + [False, False]
    assert masked.protein_expression_obsm_key == "protein_expression_missing"
    state = read_scvi_tools_checkpoint(FIXTURE / "totalvi_protein_batch").state
    assert torch.equal(masked.module.prior_back_mean.blocks[0], state["background_pro_alpha"].T)
    assert torch.equal(masked.module.prior_back_log_scale.blocks[0], state["background_pro_log_beta"].T)
    assert torch.equal(masked.module.log_efficiency.blocks[0], state["log_per_batch_efficiency"].T)
    assert torch.equal(masked.module.library_log_means, state["library_log_means"].ravel())


@pytest.mark.parametrize("name", TOTALVI_MODELS)
def test_totalvi_surgery_keeps_reference_latent(name: str, cite: ad.AnnData) -> None:
    ref = _split(cite, "reference")
    reference = atlasmap.TOTALVI.from_scvi_tools(FIXTURE / name)
    before = reference.get_latent_representation(ref)
    query = atlasmap.TOTALVI.load_query_data(_split(cite, "query"), reference)
    new_efficiency = query.module.log_efficiency.blocks[1]
    assert torch.count_nonzero(new_efficiency.detach()) == 0 and new_efficiency.requires_grad  # starts at 1
    if not reference.module.config.use_observed_lib_size:  # the new batch's library prior from its counts
        assert query.module.library_log_means.shape == (3,)
    query.train(3, progress_bar=False)
    assert np.array_equal(before, query.get_latent_representation(ref))
    latent = query.get_latent_representation()
    assert latent.shape == (30, 4) and np.isfinite(latent).all()


def test_totalvi_loss_runs_with_scvi_tools_conventions(cite: ad.AnnData) -> None:
    model = atlasmap.TOTALVI.from_scvi_tools(FIXTURE / "totalvi_protein_batch")
    ref = _split(cite, "reference")
    assert np.isfinite(model.get_elbo(ref))


# ------------------------------------------------------------------------------------------ scvi-hub / minified
@pytest.mark.parametrize("name", HUBS)
def test_hub_directory_imports_with_its_minified_adata(name: str) -> None:
    model = atlasmap.SCANVI.from_scvi_tools(FIXTURE / name)  # no adata given: the hub's adata.h5ad is attached
    assert model.adata is not None and model.adata.uns[MINIFY_TYPE_KEY] == "latent_posterior_parameters"
    assert model.stored_latent is not None and model.stored_latent.qzm_key == "scanvi_latent_qzm"
    latent = model.get_latent_representation()
    assert np.array_equal(latent, model.adata.obsm["scanvi_latent_qzm"])
    assert np.abs(latent - np.load(FIXTURE / name / "latent.npy")).max() <= TOLERANCE
    assert np.array_equal(model.predict().astype(str).to_numpy(), np.load(FIXTURE / name / "predict.npy"))
    assert np.abs(model.predict(soft=True).to_numpy() - np.load(FIXTURE / name / "predict_soft.npy")).max() <= 1e-6
    sample = model.get_latent_representation(give_mean=False, seed=1)
    assert sample.shape == latent.shape and not np.array_equal(sample, latent)


@pytest.mark.parametrize("call", ["normalized", "train", "elbo"])
def test_minified_reference_refuses_what_needs_counts(call: str) -> None:
    model = atlasmap.SCANVI.from_scvi_tools(FIXTURE / "scanvi_hub_minified")
    run = {"normalized": model.get_normalized_expression, "train": lambda: model.train(1, progress_bar=False),
           "elbo": model.get_elbo}[call]
    with pytest.raises(InputError, match="reference AnnData is minified") as info:
        run()
    assert "\n" not in str(info.value) and "full reference AnnData" in str(info.value)


def test_minified_adata_of_another_model_is_refused(tmp_path: Path) -> None:
    hub = atlasmap.SCANVI.from_scvi_tools(FIXTURE / "scanvi_hub_minified")
    other = ad.read_h5ad(FIXTURE / "scanvi_hub_minified_from_scvi" / "adata.h5ad")
    with pytest.raises(InputError, match="another scvi-tools model"):
        hub.get_latent_representation(other)
    broken = hub.adata.copy()
    del broken.obsm["scanvi_latent_qzm"]
    with pytest.raises(InputError, match="scanvi_latent_qzm"):
        hub.get_latent_representation(broken)
    # a model saved without minification fields cannot vouch for a stored latent
    plain = atlasmap.SCANVI.from_scvi_tools(FIXTURE / "scanvi")
    with pytest.raises(InputError, match="minified"):
        plain.get_latent_representation(hub.adata)
    with pytest.raises(InputError, match="minified"):
        atlasmap.SCANVI.from_scvi_tools(FIXTURE / "scanvi", hub.adata)


@pytest.mark.parametrize("name", ["scanvi_hub_minified", "scanvi_hub_minified_covariates"])
def test_query_onto_minified_reference_with_labels(name: str, rna: ad.AnnData) -> None:
    reference = atlasmap.SCANVI.from_scvi_tools(FIXTURE / name)
    hub_adata = reference.adata
    ref_cells = _split(rna, "reference")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        query, joint = map_query(_unlabelled_query(rna), reference, max_epochs=5, adata_reference=hub_adata,
                                 train_kwargs={"progress_bar": False})
    # the reference cells keep their stored latent; the counts-based latent of the full reference is unchanged
    is_ref = (joint.obs["atlasmap_dataset"] == "reference").to_numpy()
    assert np.array_equal(joint.obsm["X_atlasmap"][is_ref], hub_adata.obsm["scanvi_latent_qzm"])
    assert np.array_equal(reference.get_latent_representation(ref_cells), query.get_latent_representation(ref_cells))
    # scANVI predictions of the minified reference cells from their stored latent: scvi-tools' own
    assert np.array_equal(query.predict(hub_adata).astype(str).to_numpy(), np.load(FIXTURE / name / "predict.npy"))
    truth = _split(rna, "query").obs["cell_type"].astype(str).to_numpy()
    accuracy = float(np.mean(query.predict().astype(str).to_numpy() == truth))
    # kNN label transfer from the stored latent; unlabelled ("Unknown") reference cells do not vote
    joint.obs["cell_type"] = np.concatenate([hub_adata.obs["cell_type"].astype(str).to_numpy(), truth])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary = knn_transfer(joint, "cell_type", k=10, unlabeled_category="Unknown")
    print(f"minified hub reference {name}: scANVI query accuracy {accuracy:.3f}, kNN accuracy "
          f"{summary['accuracy']:.3f}")
    if name.endswith("covariates"):
        assert list(query.surgery["new_categories"]["donor"]) == ["d3"]
    assert summary["n_query"] == 30 and accuracy >= 0.8 and summary["accuracy"] >= 0.8
    assert "Unknown" not in joint.obsm["atlasmap_cell_type_proba"].columns


def test_unfrozen_query_cannot_use_the_stored_latent(rna: ad.AnnData) -> None:
    reference = atlasmap.SCANVI.from_scvi_tools(FIXTURE / "scanvi_hub_minified")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        query = atlasmap.SCANVI.load_query_data(_unlabelled_query(rna), reference, unfrozen=True)
    with pytest.raises(InputError, match="unfrozen=True"):
        query.get_latent_representation(reference.adata)


def test_stored_latent_survives_save_and_load(tmp_path: Path, rna: ad.AnnData) -> None:
    reference = atlasmap.SCANVI.from_scvi_tools(FIXTURE / "scanvi_hub_minified")
    reference.save(tmp_path / "m")
    loaded = atlasmap.load(tmp_path / "m", reference.adata)
    assert loaded.stored_latent == reference.stored_latent
    assert np.array_equal(loaded.get_latent_representation(), reference.adata.obsm["scanvi_latent_qzm"])
    # training the reference on full data changes its weights: the stored latent is not trusted any more
    full = _split(rna, "reference")
    full.obs["cell_type"] = reference.adata.obs["cell_type"].to_numpy()
    retrained = atlasmap.load(tmp_path / "m", full).train(1, progress_bar=False)
    assert retrained.stored_latent is None


def _copy_hub(tmp_path: Path, name: str = "scanvi_hub_minified") -> Path:
    target = tmp_path / name
    shutil.copytree(FIXTURE / name, target)
    return target


def test_hub_directory_problems_are_named(tmp_path: Path) -> None:
    hub = _copy_hub(tmp_path)
    (hub / "model.pt").unlink()
    with pytest.raises(ModelFileError, match="lacks model.pt"):
        from_scvi_tools(hub)
    hub = _copy_hub(tmp_path / "b")
    meta = json.loads((hub / "_scvi_required_metadata.json").read_text())
    (hub / "_scvi_required_metadata.json").write_text(json.dumps({**meta, "model_cls_name": "TOTALVI"}))
    with pytest.raises(ModelFileError, match="names a TOTALVI model"):
        from_scvi_tools(hub)
    (hub / "_scvi_required_metadata.json").write_text("{not json")
    with pytest.raises(ModelFileError, match="not readable JSON"):
        from_scvi_tools(hub)
    hub = _copy_hub(tmp_path / "c")
    (hub / "adata.h5ad").unlink()
    model = from_scvi_tools(hub)  # the model imports; only what needs the reference cells asks for them
    assert model.adata is None and model.stored_latent is not None


# ------------------------------------------------------------------------------------------ refusals
def _raw(name: str) -> dict[str, Any]:
    ckpt = read_scvi_tools_checkpoint(FIXTURE / name)
    attr = {k: v for k, v in ckpt.attr.items() if k != "history_"}
    return {"model_state_dict": dict(ckpt.state), "var_names": np.array(ckpt.var_names, dtype=object),
            "attr_dict": copy.deepcopy(attr)}


def _kwargs(content: dict[str, Any]) -> dict[str, Any]:
    return content["attr_dict"]["init_params_"]["kwargs"]["model_kwargs"]


def _refusals() -> dict[str, tuple[str, Any, str]]:
    def edit(name: str, fn: Any) -> Any:
        def make() -> dict[str, Any]:
            content = _raw(name)
            fn(content)
            return content
        return make

    def setup(**args: Any) -> Any:
        return lambda c: c["attr_dict"]["registry_"]["setup_args"].update(args)

    return {
        "labels groups": ("scanvi", edit("scanvi", lambda c: _kwargs(c).update(use_labels_groups=True,
                                                                                labels_groups=[0, 0, 1])),
                          "use_labels_groups"),
        "classifier architecture": ("scanvi", edit("scanvi", lambda c: _kwargs(c).update(
            classifier_parameters={"activation_fn": "x"})), "classifier_parameters"),
        "classifier width": ("scanvi", edit("scanvi", lambda c: _kwargs(c).update(
            classifier_parameters={"n_hidden": 8})), "classifier_parameters"),
        "scanvi gene-label": ("scanvi", edit("scanvi", lambda c: c["attr_dict"]["init_params_"]["non_kwargs"].update(
            dispersion="gene-label")), "dispersion"),
        "scanvi batch embedding": ("scanvi", edit("scanvi", lambda c: _kwargs(c).update(
            batch_representation="embedding")), "embedding"),
        "scanvi no labels": ("scanvi", edit("scanvi", lambda c: c["attr_dict"]["registry_"]["field_registries"].pop(
            "labels")), "without its labels"),
        "scanvi no classifier": ("scanvi", edit("scanvi", lambda c: [c["model_state_dict"].pop(k) for k in list(
            c["model_state_dict"]) if k.startswith("classifier.")]), "without its classifier"),
        "totalvi panel": ("totalvi", edit("totalvi", setup(panel_key="panel")), "panel_key"),
        "totalvi size factor": ("totalvi", edit("totalvi", setup(size_factor_key="sf")), "size factor"),
        "totalvi gene-cell": ("totalvi", edit("totalvi", lambda c: c["attr_dict"]["init_params_"]["non_kwargs"].update(
            gene_dispersion="gene-cell")), "gene_dispersion"),
        "totalvi ln": ("totalvi", edit("totalvi", lambda c: c["attr_dict"]["init_params_"]["non_kwargs"].update(
            latent_distribution="ln")), "latent_distribution"),
        "totalvi exp background": ("totalvi", edit("totalvi", lambda c: _kwargs(c).update(
            extra_decoder_kwargs={"activation_function_bg": "exp"})), "extra_decoder_kwargs"),
        "totalvi bn and ln": ("totalvi", edit("totalvi", lambda c: _kwargs(c).update(use_layer_norm="both")),
                              "batch norm and layer norm"),
        "totalvi no proteins": ("totalvi", edit("totalvi", lambda c: c["attr_dict"]["registry_"][
            "field_registries"].pop("proteins")), "protein field"),
        "other class": ("totalvi", edit("totalvi", lambda c: c["attr_dict"]["registry_"].update(model_name="PEAKVI")),
                        "PEAKVI model"),
        "newer version": ("scanvi", edit("scanvi", lambda c: c["attr_dict"]["registry_"].update(scvi_version="2.1.0")),
                          "scvi-tools 2.1.0; atlasmap imports saves of scvi-tools 0.15 to 1.x"),
        "no version": ("totalvi", edit("totalvi", lambda c: c["attr_dict"]["registry_"].pop("scvi_version")),
                       r"scvi-tools \?"),
        "pyro": ("scanvi", edit("scanvi", lambda c: c["model_state_dict"].__setitem__(
            "pyro_param_store", {"params": {"w": torch.ones(1)}})), "pyro"),
        "mudata": ("totalvi", edit("totalvi", lambda c: c.update(var_names={"rna": np.array(["a"], dtype=object)})),
                   "MuData"),
    }


REFUSALS = _refusals()


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_unsupported_variants_are_refused(case: str, tmp_path: Path) -> None:
    _, make, message = REFUSALS[case]
    d = tmp_path / "m"
    d.mkdir()
    torch.save(make(), d / "model.pt")
    with pytest.raises(ModelFileError, match=message) as info:
        from_scvi_tools(d)
    assert "\n" not in str(info.value)


def test_an_unsafe_pickle_is_refused_and_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "marker"

    class Payload:
        def __reduce__(self) -> tuple[Any, ...]:
            return (exec, (f"open({str(marker)!r}, 'w').write('ran')",))

    hub = _copy_hub(tmp_path)
    content = _raw("scanvi_hub_minified")
    content["attr_dict"]["labels_"] = Payload()
    torch.save(content, hub / "model.pt")
    with pytest.raises(ModelFileError, match="does not load"):
        atlasmap.SCANVI.from_scvi_tools(hub)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------ CLI
def test_cli_import_scvi_scanvi_and_totalvi(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["import-scvi", str(FIXTURE / "scanvi_hub_minified"), "-o", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert "imported scvi-tools SCANVI (30 genes" in out and "labels (3) from obs['cell_type']: type2, type0, type1" in out
    assert "unlabeled category 'Unknown'" in out and "minified" in out and "batch: 2 (b0, b1)" in out
    assert isinstance(atlasmap.load(tmp_path / "s"), atlasmap.SCANVI)
    assert cli_main(["import-scvi", str(FIXTURE / "totalvi_protein_batch"), "-o", str(tmp_path / "t")]) == 0
    out = capsys.readouterr().out
    assert "imported scvi-tools TOTALVI" in out and "proteins (8) from obsm['protein_expression_missing']" in out
    assert "not measured: {'b1': ['CD16', 'HLA-DR']}" in out and "donor: 3" in out
    bad = tmp_path / "bad"
    shutil.copytree(FIXTURE / "scanvi_hub_minified", bad)
    (bad / "model.pt").unlink()
    assert cli_main(["import-scvi", str(bad), "-o", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "lacks model.pt" in err and "Traceback" not in err and not (tmp_path / "x").exists()


def test_cli_map_onto_a_minified_hub_reference(tmp_path: Path, rna: ad.AnnData,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    query_path = tmp_path / "query.h5ad"
    _split(rna, "query").write_h5ad(query_path)
    hub = FIXTURE / "scanvi_hub_minified"
    out = tmp_path / "mapped.h5ad"
    args = ["map", str(query_path), "--reference", str(hub), "-o", str(out), "--epochs", "5", "--quiet",
            "--knn-labels", "cell_type", "--knn-k", "10", "--ignore-query-labels"]
    assert cli_main(args) == 0
    text = capsys.readouterr().out
    assert f"imported scvi-tools SCANVI model from {hub}" in text
    assert "reference cells: 90 from" in text and "minified" in text
    assert "kNN label transfer of 'cell_type': accuracy" in text and "scANVI labels in obs['atlasmap_label']" in text
    joint = ad.read_h5ad(out)
    assert (joint.obs["atlasmap_dataset"] == "reference").sum() == 90 and joint.n_obs == 120
    is_ref = (joint.obs["atlasmap_dataset"] == "reference").to_numpy()
    hub_adata = ad.read_h5ad(hub / "adata.h5ad")
    assert np.array_equal(joint.obsm["X_atlasmap"][is_ref], hub_adata.obsm["scanvi_latent_qzm"])
    assert np.array_equal(joint.obs["atlasmap_label"].astype(str).to_numpy()[is_ref],
                          np.load(hub / "predict.npy"))
    # the same with the hub's adata.h5ad given explicitly, and from an atlasmap copy of the imported model
    model_dir = tmp_path / "imported"
    assert cli_main(["import-scvi", str(hub), "-o", str(model_dir)]) == 0
    capsys.readouterr()
    out2 = tmp_path / "mapped2.h5ad"
    assert cli_main(["map", str(query_path), "--reference", str(model_dir), "-o", str(out2), "--epochs", "5",
                     "--quiet", "--with-reference", str(hub / "adata.h5ad"), "--knn-labels", "cell_type",
                     "--ignore-query-labels"]) == 0
    assert "imported scvi-tools" not in capsys.readouterr().out
    joint2 = ad.read_h5ad(out2)
    assert np.array_equal(joint2.obsm["X_atlasmap"][is_ref], joint.obsm["X_atlasmap"][is_ref])


def test_cli_map_onto_an_imported_totalvi(tmp_path: Path, cite: ad.AnnData,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    query_path = tmp_path / "query.h5ad"
    _split(cite, "query").write_h5ad(query_path)
    out = tmp_path / "mapped.h5ad"
    assert cli_main(["map", str(query_path), "--reference", str(FIXTURE / "totalvi_protein_batch"), "-o", str(out),
                     "--epochs", "3", "--quiet"]) == 0
    assert "imported scvi-tools TOTALVI model from" in capsys.readouterr().out
    mapped = ad.read_h5ad(out)
    assert mapped.obsm["X_atlasmap"].shape == (30, 4) and "atlasmap_protein_denoised" in mapped.obsm


def test_joint_embedding_of_a_minified_totalvi_like_reference_fills_missing_outputs(cite: ad.AnnData) -> None:
    """A minified reference has no counts: decoded per-cell outputs are NaN (False for masks) for its cells."""
    model = atlasmap.TOTALVI.from_scvi_tools(FIXTURE / "totalvi")
    ref = _split(cite, "reference")
    minified = ref.copy()
    minified.uns[MINIFY_TYPE_KEY] = "latent_posterior_parameters"
    minified.obsm["totalvi_latent_qzm"] = model.get_latent_representation(ref)
    minified.obsm["totalvi_latent_qzv"] = np.ones_like(minified.obsm["totalvi_latent_qzm"])
    model.stored_latent = StoredLatent("totalvi_latent_qzm", "totalvi_latent_qzv")
    joint = joint_embedding(model, _split(cite, "reference")[:10].copy(), minified)
    is_ref = (joint.obs["atlasmap_dataset"] == "reference").to_numpy()
    assert np.isnan(np.asarray(joint.obsm["atlasmap_protein_denoised"])[is_ref]).all()
    assert not np.asarray(joint.obsm["atlasmap_protein_measured"])[is_ref].any()
    assert np.array_equal(joint.obsm["X_atlasmap"][is_ref], minified.obsm["totalvi_latent_qzm"])
