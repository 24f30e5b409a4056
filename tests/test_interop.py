"""Importing scvi-tools references (``atlasmap.io.scvi_tools``): exact latents, query mapping, safe reading.

The fixture ``tests/fixtures/scvi_tools_1.4.2_small`` was written by scvi-tools 1.4.2
(``tests/fixtures/make_scvi_tools_fixture.py``); scvi-tools itself is not needed here. The one test that
builds fresh scvi-tools models skips when scvi-tools is not importable.
"""

from __future__ import annotations

import copy
import importlib.util
import pickle
import warnings
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pytest
import torch

import atlasmap
from atlasmap.cli import main as cli_main
from atlasmap.errors import ModelFileError
from atlasmap.io.scvi_tools.reader import _Inert, read_scvi_tools_checkpoint
from atlasmap.io.scvi_tools.weights import split_injected_weight
from atlasmap.models import from_scvi_tools
from atlasmap.models.base import BaseModel

FIXTURES = Path(__file__).parent / "fixtures"
FIXTURE = FIXTURES / "scvi_tools_1.4.2_small"
MODELS = ("default", "covariates", "single_batch")
TOLERANCE = 1e-5
#: max |atlasmap - scvi-tools| latent difference per fixture model, filled by the tests (for the report)
MAX_LATENT_DIFF: dict[str, float] = {}


@pytest.fixture(scope="module")
def fixture_adata() -> ad.AnnData:
    return ad.read_h5ad(FIXTURE / "adata.h5ad")


def _reference(adata: ad.AnnData, name: str) -> ad.AnnData:
    ref = adata[adata.obs["split"] == "reference"].copy()
    if name == "single_batch":
        del ref.obs["batch"]  # that reference was set up without a batch key: it has no batch column
    return ref


def _query(adata: ad.AnnData) -> ad.AnnData:
    return adata[adata.obs["split"] == "query"].copy()


# ------------------------------------------------------------------------------------------ exactness
def test_fixture_is_small_and_complete() -> None:
    size = sum(p.stat().st_size for p in FIXTURE.rglob("*") if p.is_file())
    assert size < 2 * 1024**2, f"the scvi-tools fixtures are {size / 1024:.0f} KB (committed files: keep them small)"
    for name in MODELS:
        assert (FIXTURE / name / "model.pt").is_file() and (FIXTURE / name / "latent.npy").is_file()


@pytest.mark.parametrize("name", MODELS)
def test_latent_matches_scvi_tools(name: str, fixture_adata: ad.AnnData) -> None:
    model = atlasmap.SCVI.from_scvi_tools(FIXTURE / name)
    assert model.is_trained and model.surgery is None
    latent = model.get_latent_representation(_reference(fixture_adata, name))
    expected = np.load(FIXTURE / name / "latent.npy")
    assert latent.shape == expected.shape
    diff = float(np.abs(latent - expected).max())
    MAX_LATENT_DIFF[name] = diff
    print(f"scvi-tools import {name}: max |latent difference| = {diff:.3g}")
    assert diff <= TOLERANCE


def test_registry_is_mapped(fixture_adata: ad.AnnData) -> None:
    model = atlasmap.SCVI.from_scvi_tools(FIXTURE / "covariates")
    reg = model.registry
    assert reg.var_names == tuple(fixture_adata.var_names)
    assert reg.batch_key == "batch" and reg.categories["batch"] == ("b0", "b1")
    assert reg.categorical_keys == ("batch", "donor", "single")
    assert reg.categories["donor"] == ("d0", "d1", "d2") and reg.categories["single"] == ("s",)
    assert reg.continuous_keys == ("score",) and reg.layer == "counts"
    cfg = model.module.config
    assert (cfg.n_layers, cfg.n_hidden, cfg.n_latent) == (2, 16, 4)
    assert (cfg.gene_likelihood, cfg.dispersion, cfg.use_observed_lib_size) == ("nb", "gene-batch", False)
    assert (cfg.use_layer_norm, cfg.use_batch_norm, cfg.encode_covariates) == ("both", "none", True)
    # the one-category covariate scvi-tools dropped has a zero row in every injected layer
    for stack in (model.module.encoder, model.module.decoder):
        for layer in stack.layers:
            assert torch.count_nonzero(layer.covariates[2].blocks[0]) == 0
    # scvi-tools feeds the continuous covariate to the first layer only: deeper layers get zero weights
    for stack in (model.module.encoder, model.module.decoder):
        assert torch.count_nonzero(stack.layers[0].continuous.weight) > 0
        assert torch.count_nonzero(stack.layers[1].continuous.weight) == 0


def test_single_batch_registry() -> None:
    model = atlasmap.SCVI.from_scvi_tools(FIXTURE / "single_batch")
    assert model.registry.batch_key == atlasmap.data.registry.SINGLE_BATCH  # type: ignore[attr-defined]
    assert model.registry.categories[model.registry.batch_key] == ("0",)
    for layer in model.module.encoder.layers[:1]:
        assert torch.count_nonzero(layer.covariates[0].blocks[0]) == 0  # dropped by scvi-tools: zero row


def test_split_injected_weight_layout() -> None:
    w = torch.arange(2 * 9, dtype=torch.float32).reshape(2, 9)  # x:3, cont:1, cats [2, 1, 3]
    w_x, w_cont, tables = split_injected_weight(w, 3, 1, [2, 1, 3])
    assert torch.equal(w_x, w[:, :3]) and torch.equal(w_cont, w[:, 3:4])
    assert torch.equal(tables[0], w[:, 4:6].T)
    assert torch.equal(tables[1], torch.zeros(1, 2))
    assert torch.equal(tables[2], w[:, 6:9].T)


# ------------------------------------------------------------------------------------------ mapping
@pytest.mark.parametrize("name", ["covariates", "single_batch"])
def test_query_mapping_from_imported_reference(name: str, fixture_adata: ad.AnnData) -> None:
    reference = atlasmap.SCVI.from_scvi_tools(FIXTURE / name)
    ref_cells, query_cells = _reference(fixture_adata, name), _query(fixture_adata)
    before = reference.get_latent_representation(ref_cells)
    batch_key = "batch" if name == "single_batch" else None
    query = atlasmap.SCVI.load_query_data(query_cells, reference, batch_key=batch_key).train(3, progress_bar=False)
    after = query.get_latent_representation(ref_cells)
    assert np.array_equal(before, after), "reference latent changed after mapping an imported reference"
    latent_q = query.get_latent_representation()
    assert latent_q.shape == (query_cells.n_obs, reference.module.config.n_latent) and np.isfinite(latent_q).all()
    new = query.surgery["new_categories"]
    assert new[query.registry.batch_key] == ("b2",) or list(new[query.registry.batch_key]) == ["b2"]
    if name == "covariates":
        assert list(new["donor"]) == ["d3"]
        # the reference category of the dropped covariate keeps its (frozen) zero row
        assert torch.count_nonzero(query.module.encoder.layers[0].covariates[2].blocks[0]) == 0


def test_encode_covariates_false_reference_warns(fixture_adata: ad.AnnData) -> None:
    reference = atlasmap.SCVI.from_scvi_tools(FIXTURE / "default")
    with pytest.warns(UserWarning, match="encode_covariates=False"):
        atlasmap.SCVI.load_query_data(_query(fixture_adata), reference)


def test_imported_model_saves_and_loads(tmp_path: Path, fixture_adata: ad.AnnData) -> None:
    model = atlasmap.SCVI.from_scvi_tools(FIXTURE / "covariates")
    model.save(tmp_path / "imported")
    loaded = atlasmap.SCVI.load(tmp_path / "imported")
    ref = _reference(fixture_adata, "covariates")
    assert np.array_equal(model.get_latent_representation(ref), loaded.get_latent_representation(ref))


def test_adata_is_attached_and_validated(fixture_adata: ad.AnnData) -> None:
    ref = _reference(fixture_adata, "default")
    model = atlasmap.SCVI.from_scvi_tools(FIXTURE / "default", ref)
    assert model.get_latent_representation().shape == (ref.n_obs, 4)
    bad = ref.copy()
    bad.obs["batch"] = bad.obs["batch"].cat.rename_categories({"b0": "other"})
    with pytest.raises(atlasmap.InputError, match="not trained on"):
        atlasmap.SCVI.from_scvi_tools(FIXTURE / "default", bad)


def test_cli_import_scvi(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "model"
    assert cli_main(["import-scvi", str(FIXTURE / "covariates"), "-o", str(out)]) == 0
    assert "imported scvi-tools SCVI" in capsys.readouterr().out
    assert isinstance(atlasmap.load(out), atlasmap.SCVI)
    assert cli_main(["import-scvi", str(FIXTURE / "covariates"), "-o", str(out)]) == 2  # exists
    assert "--overwrite" in capsys.readouterr().err
    assert cli_main(["import-scvi", str(tmp_path / "absent"), "-o", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("atlasmap: error:") and "Traceback" not in err


# ------------------------------------------------------------------------------------------ safety
def test_reading_runs_no_pandas_and_leaks_no_allow_list() -> None:
    from atlasmap.io.scvi_tools.reader import _safe_globals

    def key(entry: object) -> str:
        obj, name = entry if isinstance(entry, tuple) else (entry, None)
        return name or f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', repr(obj))}"

    before = {key(g) for g in torch.serialization.get_safe_globals()}
    ckpt = read_scvi_tools_checkpoint(FIXTURE / "default")
    # torch may register its own globals lazily (e.g. once torch.distributed is imported), so compare only
    # atlasmap's allow-list: none of it may stay registered after the load
    ours = {key(g) for g in _safe_globals()} - before
    after = {key(g) for g in torch.serialization.get_safe_globals()}
    assert ours and not (after & ours), "the allow-list must be scoped to the load"
    history = ckpt.attr["history_"]
    assert history and all(isinstance(v, _Inert) for v in history.values())  # pandas frames never built
    assert ckpt.model_name == "SCVI" and ckpt.scvi_version == "1.4.2"


class _Payload:
    """Unpickling this runs ``exec(code)``: the classic pickle attack."""

    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (self.code,))


def _marker_code(marker: Path) -> str:
    return f"open({str(marker)!r}, 'w').write('code ran')"


def test_malicious_model_pt_executes_nothing(tmp_path: Path) -> None:
    # the payload is live: plain pickle runs it
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Payload(_marker_code(probe))))
    assert probe.exists()
    marker = tmp_path / "marker"
    for i, content in enumerate([
        _Payload(_marker_code(marker)),  # the whole file
        {"model_state_dict": {}, "var_names": [], "attr_dict": {"registry_": _Payload(_marker_code(marker))}},
    ]):
        d = tmp_path / f"evil{i}"
        d.mkdir()
        torch.save(content, d / "model.pt")
        with pytest.raises(ModelFileError, match="does not load"):
            from_scvi_tools(d)
        assert not marker.exists(), "code from model.pt was executed"
    # the same payload as a raw (non-zip) pickle
    d = tmp_path / "evil_raw"
    d.mkdir()
    (d / "model.pt").write_bytes(pickle.dumps(_Payload(_marker_code(marker)), protocol=2))
    with pytest.raises(ModelFileError):
        from_scvi_tools(d)
    assert not marker.exists()


def _raw(name: str) -> dict[str, Any]:
    """A fixture checkpoint as plain data (history dropped), for crafting variants with torch.save."""
    ckpt = read_scvi_tools_checkpoint(FIXTURE / name)
    attr = {k: v for k, v in ckpt.attr.items() if k != "history_"}
    return {"model_state_dict": dict(ckpt.state), "var_names": np.array(ckpt.var_names, dtype=object),
            "attr_dict": copy.deepcopy(attr)}


def _save(tmp_path: Path, content: dict[str, Any], name: str = "m") -> Path:
    d = tmp_path / name
    d.mkdir()
    torch.save(content, d / "model.pt")
    return d


def _set_param(content: dict[str, Any], **params: Any) -> dict[str, Any]:
    content["attr_dict"]["init_params_"]["kwargs"]["kwargs"].update(params)
    return content


def _refusal_cases() -> dict[str, Any]:
    def state_edit(fn: Any) -> Any:
        def make() -> dict[str, Any]:
            content = _raw("default")
            fn(content["model_state_dict"])
            return content
        return make

    def attr_edit(fn: Any, name: str = "default") -> Any:
        def make() -> dict[str, Any]:
            content = _raw(name)
            fn(content)
            return content
        return make

    enc0 = "z_encoder.encoder.fc_layers.Layer 0.0.weight"
    return {
        "latent ln": (attr_edit(lambda c: _set_param(c, latent_distribution="ln")), "latent_distribution"),
        "normal likelihood": (attr_edit(lambda c: _set_param(c, gene_likelihood="normal")), "gene_likelihood"),
        "gene-label dispersion": (attr_edit(lambda c: _set_param(c, dispersion="gene-label")), "dispersion"),
        "gene-cell dispersion": (attr_edit(lambda c: _set_param(c, dispersion="gene-cell")), "dispersion"),
        "batch embedding": (attr_edit(lambda c: _set_param(c, batch_representation="embedding")), "embedding"),
        "no log": (attr_edit(lambda c: _set_param(c, log_variational=False)), "log_variational"),
        "bn and ln": (attr_edit(lambda c: _set_param(c, use_layer_norm="both")), "batch norm and layer norm"),
        "extra kwargs": (attr_edit(lambda c: _set_param(c, extra_encoder_kwargs={"activation_fn": "x"})),
                         "extra_encoder_kwargs"),
        "size factor": (attr_edit(lambda c: c["attr_dict"]["registry_"]["setup_args"].update(size_factor_key="sf")),
                        "size factor"),
        "scanvi": (attr_edit(lambda c: c["attr_dict"]["registry_"].update(model_name="SCANVI")), "SCANVI"),
        "mudata": (attr_edit(lambda c: c.update(var_names={"rna": np.array(["a"], dtype=object)})), "MuData"),
        "duplicate genes": (attr_edit(lambda c: c["var_names"].__setitem__(1, c["var_names"][0])), "not unique"),
        "wrong shape": (state_edit(lambda s: s.__setitem__(enc0, s[enc0][:, :-1])), "shape"),
        "float64": (state_edit(lambda s: s.__setitem__("px_r", s["px_r"].double())), "dtype"),
        "nan weight": (state_edit(lambda s: s["px_r"].__setitem__(0, float("nan"))), "NaN"),
        "missing tensor": (state_edit(lambda s: s.pop("decoder.px_scale_decoder.0.bias")), "lacks tensor"),
        "unknown tensor": (state_edit(lambda s: s.__setitem__("batch_embedding.weight", torch.zeros(2, 3))),
                           "cannot represent"),
        "extra layer": (state_edit(lambda s: s.__setitem__("z_encoder.encoder.fc_layers.Layer 1.0.weight",
                                                           torch.zeros(16, 16))), "n_layers|cannot represent"),
        "n_latent disagrees": (attr_edit(lambda c: c["attr_dict"]["init_params_"]["non_kwargs"].update(n_latent=9)),
                               "n_latent"),
        "no registry": (attr_edit(lambda c: c["attr_dict"].pop("registry_")), "malformed"),
        "state not dict": (attr_edit(lambda c: c.update(model_state_dict=[1, 2])), "malformed"),
        "pyro params": (state_edit(lambda s: s.__setitem__("pyro_param_store", {"params": {"w": torch.ones(1)}})),
                        "pyro"),
    }


REFUSALS = _refusal_cases()


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_unsupported_or_corrupt_checkpoints_are_refused(case: str, tmp_path: Path) -> None:
    make, message = REFUSALS[case]
    d = _save(tmp_path, make())
    with pytest.raises(ModelFileError, match=message):
        atlasmap.SCVI.from_scvi_tools(d)


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage", "json"])
def test_damaged_model_pt(damage: str, tmp_path: Path) -> None:
    d = tmp_path / "m"
    d.mkdir()
    data = (FIXTURE / "default" / "model.pt").read_bytes()
    content = {"truncated": data[: len(data) // 2], "empty": b"", "garbage": bytes(range(256)) * 10,
               "json": b'{"format": "atlasmap-model"}'}[damage]
    (d / "model.pt").write_bytes(content)
    with pytest.raises(ModelFileError, match="model.pt"):
        from_scvi_tools(d)


def test_directory_problems_are_named(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="does not exist"):
        from_scvi_tools(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFileError, match="not a scvi-tools model directory"):
        from_scvi_tools(tmp_path / "empty")
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "model_params.pt").write_bytes(b"")
    (legacy / "attr.pkl").write_bytes(b"")
    with pytest.raises(ModelFileError, match="before version 0.15"):
        from_scvi_tools(legacy)
    prefixed = tmp_path / "prefixed"
    prefixed.mkdir()
    (prefixed / "ref_model.pt").write_bytes((FIXTURE / "default" / "model.pt").read_bytes())
    with pytest.raises(ModelFileError, match="prefix="):
        from_scvi_tools(prefixed)
    assert isinstance(from_scvi_tools(prefixed, prefix="ref_"), atlasmap.SCVI)
    # the model.pt file itself is accepted too
    assert isinstance(from_scvi_tools(FIXTURE / "default" / "model.pt"), atlasmap.SCVI)


def test_other_atlasmap_classes_refuse_an_scvi_model() -> None:
    for name in ("SCANVI", "TOTALVI"):
        cls = getattr(atlasmap, name)
        with pytest.raises(ModelFileError, match=r"scvi-tools SCVI model; import it with atlasmap\.SCVI"):
            cls.from_scvi_tools(FIXTURE / "default")

    class MySCVI(atlasmap.SCVI):
        pass

    assert type(MySCVI.from_scvi_tools(FIXTURE / "default")) is MySCVI
    assert type(BaseModel.from_scvi_tools(FIXTURE / "default")) is atlasmap.SCVI


def test_atlasmap_directory_is_pointed_to_load(tmp_path: Path) -> None:
    atlasmap.SCVI.from_scvi_tools(FIXTURE / "default").save(tmp_path / "m")
    with pytest.raises(ModelFileError, match="atlasmap model directory"):
        from_scvi_tools(tmp_path / "m")


# ------------------------------------------------------------------------------------------ live scvi-tools
@pytest.mark.skipif(importlib.util.find_spec("scvi") is None, reason="scvi-tools is not installed")
def test_fresh_scvi_tools_models_match(tmp_path: Path) -> None:  # pragma: no cover - needs scvi-tools
    """Train fresh models with the installed scvi-tools and compare their latents with the import."""
    spec = importlib.util.spec_from_file_location("make_scvi_tools_fixture", FIXTURES / "make_scvi_tools_fixture.py")
    assert spec is not None and spec.loader is not None
    maker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(maker)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        maker.make_fixture(tmp_path, epochs=2)
    adata = ad.read_h5ad(tmp_path / "adata.h5ad")
    for name in maker.MODELS:
        latent = atlasmap.SCVI.from_scvi_tools(tmp_path / name).get_latent_representation(_reference(adata, name))
        assert np.abs(latent - np.load(tmp_path / name / "latent.npy")).max() <= TOLERANCE
