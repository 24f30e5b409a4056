"""Save / load: config.json + weights.safetensors, atomic writes, identical outputs, and a clear
:class:`ModelFileError` (never code execution, never a raw traceback) for every corrupt directory."""

from __future__ import annotations

import json
import os
import pickle
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file
from support import SMALL, parameters, train_query

import atlasmap
from atlasmap.errors import InputError, ModelFileError
from atlasmap.io.format import CONFIG_FILE, FORMAT, FORMAT_VERSION, WEIGHTS_FILE


def _assert_same_outputs(a: Any, b: Any, adata: Any, transform_batch: str) -> None:
    assert np.array_equal(a.get_latent_representation(adata), b.get_latent_representation(adata))
    assert np.array_equal(a.get_latent_representation(adata, give_mean=False, seed=3),
                          b.get_latent_representation(adata, give_mean=False, seed=3))
    for kwargs in ({}, {"transform_batch": transform_batch, "library_size": 1e4}):
        pd.testing.assert_frame_equal(a.get_normalized_expression(adata, **kwargs),
                                      b.get_normalized_expression(adata, **kwargs), check_exact=True)


def _state_equal(a: Any, b: Any) -> None:
    sa, sb = a.module.state_dict(), b.module.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name].cpu(), sb[name].cpu()), name


# ------------------------------------------------------------------------------------------ round trips
def test_reference_save_load_identical(ref_model: Any, ref_adata: Any, tmp_path: Path) -> None:
    out = ref_model.save(tmp_path / "ref")
    assert out == tmp_path / "ref"
    loaded = atlasmap.SCVI.load(tmp_path / "ref", adata=ref_adata, device=ref_model.device)
    assert type(loaded) is atlasmap.SCVI and loaded.is_trained and loaded.surgery is None
    _state_equal(ref_model, loaded)
    assert loaded.registry == ref_model.registry and loaded.registry.categories == ref_model.registry.categories
    assert loaded.module.config == ref_model.module.config
    assert loaded.history == ref_model.history
    _assert_same_outputs(ref_model, loaded, ref_adata, "batch1")
    assert all(p.requires_grad for p in loaded.module.parameters())
    # the generic loader reads the class from the directory
    assert type(atlasmap.load(tmp_path / "ref")) is atlasmap.SCVI


def test_query_save_load_identical(query_model: Any, ref_model: Any, query_adata: Any, ref_adata: Any,
                                   tmp_path: Path) -> None:
    query_model.save(tmp_path / "query")
    loaded = atlasmap.SCVI.load(tmp_path / "query", adata=query_adata, device=query_model.device)
    _state_equal(query_model, loaded)
    assert loaded.registry.categories == query_model.registry.categories
    assert loaded.surgery == query_model.surgery
    _assert_same_outputs(query_model, loaded, query_adata, "batch2")
    _assert_same_outputs(query_model, loaded, ref_adata, "batch0")
    # the reference latent invariant survives a save/load round trip of the query
    assert np.array_equal(loaded.get_latent_representation(ref_adata), ref_model.get_latent_representation())
    # the frozen/trainable split is restored
    assert {n for n, p in loaded.module.named_parameters() if p.requires_grad} == set(query_model.surgery["trainable"])
    assert {n for n, p in query_model.module.named_parameters() if p.requires_grad} == set(query_model.surgery["trainable"])


def test_loaded_query_keeps_training_with_frozen_reference(query_model: Any, ref_model: Any, query_adata: Any,
                                                           ref_adata: Any, tmp_path: Path) -> None:
    query_model.save(tmp_path / "query")
    loaded = atlasmap.SCVI.load(tmp_path / "query", adata=query_adata, device=query_model.device)
    before = parameters(loaded)
    loaded.train(2, progress_bar=False, weight_decay=0.5)
    moved = {n for n, p in loaded.module.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert moved == set(query_model.surgery["trainable"])
    assert np.array_equal(loaded.get_latent_representation(ref_adata), ref_model.get_latent_representation())
    assert len(loaded.history["epoch"]) == len(query_model.history["epoch"]) + 2


@pytest.mark.parametrize("kwargs", [
    {"categorical_covariate_keys": ["donor"], "continuous_covariate_keys": ["score"], "dispersion": "gene-batch"},
    {"use_observed_lib_size": False, "use_batch_norm": "both", "deeply_inject_covariates": False},
], ids=["covariates_gene_batch", "library_batchnorm_shallow"])
def test_save_load_other_architectures(kwargs: dict, ref_adata: Any, query_adata: Any, tmp_path: Path) -> None:
    ref = atlasmap.SCVI(ref_adata, batch_key="batch", **SMALL, **kwargs).train(2, progress_bar=False)
    query = train_query(query_adata, ref, epochs=2)
    for name, model, adata, batch in (("ref", ref, ref_adata, "batch1"), ("query", query, query_adata, "batch3")):
        model.save(tmp_path / name)
        loaded = atlasmap.SCVI.load(tmp_path / name, adata=adata, device=model.device)
        _state_equal(model, loaded)
        assert {n: b.shape for n, b in loaded.module.named_buffers()} == \
            {n: b.shape for n, b in model.module.named_buffers()}
        _assert_same_outputs(model, loaded, adata, batch)
        assert [type(m) for m in loaded.module.frozen_state.norms_in_eval] == [type(m) for m in model.module.frozen_state.norms_in_eval]


def test_query_from_saved_directory_equals_query_from_model(ref_model: Any, query_adata: Any, tmp_path: Path) -> None:
    ref_model.save(tmp_path / "ref")
    from_dir = train_query(query_adata, tmp_path / "ref", epochs=3)
    from_model = train_query(query_adata, ref_model, epochs=3)
    assert np.array_equal(from_dir.get_latent_representation(), from_model.get_latent_representation())


def test_loaded_without_data_needs_adata(ref_model: Any, ref_adata: Any, tmp_path: Path) -> None:
    ref_model.save(tmp_path / "ref")
    loaded = atlasmap.SCVI.load(tmp_path / "ref")
    with pytest.raises(InputError, match="loaded without data; pass adata="):
        loaded.get_latent_representation()
    assert np.array_equal(loaded.get_latent_representation(ref_adata), ref_model.get_latent_representation())


# ------------------------------------------------------------------------------------------ the format
def test_directory_holds_exactly_json_and_safetensors(query_model: Any, tmp_path: Path) -> None:
    target = query_model.save(tmp_path / "model")
    assert sorted(p.name for p in target.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"], "a temporary directory was left behind"
    config = json.loads((target / CONFIG_FILE).read_text(encoding="utf-8"))
    assert config["format"] == FORMAT and config["format_version"] == FORMAT_VERSION
    assert config["atlasmap_version"] == atlasmap.__version__
    assert config["model"] == "SCVI"
    assert config["hparams"]["n_latent"] == SMALL["n_latent"]
    assert config["registry"]["var_names"] == list(query_model.registry.var_names)
    assert config["registry"]["categories"]["batch"] == list(query_model.registry.categories["batch"])
    assert set(config["history"]) >= {"elbo_train", "elbo_validation"}
    # safetensors: 8-byte little-endian header length, then a JSON header -- no pickle opcodes
    raw = (target / WEIGHTS_FILE).read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + header_len])
    assert set(header) - {"__metadata__"} == set(query_model.module.state_dict())
    assert not raw.startswith(b"\x80") and not raw.startswith(b"PK"), "weights look like a pickle / torch.save zip"
    assert set(load_file(target / WEIGHTS_FILE)) == set(query_model.module.state_dict())


def test_overwrite_false_refuses_existing_directory(ref_model: Any, tmp_path: Path) -> None:
    target = tmp_path / "model"
    target.mkdir()
    (target / "keep.txt").write_text("precious")
    with pytest.raises(InputError, match=r"already exists; pass overwrite=True"):
        ref_model.save(target)
    assert sorted(p.name for p in target.iterdir()) == ["keep.txt"]
    assert (target / "keep.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_overwrite_true_replaces(ref_model: Any, query_model: Any, query_adata: Any, tmp_path: Path) -> None:
    target = tmp_path / "model"
    ref_model.save(target)
    query_model.save(target, overwrite=True)
    assert sorted(p.name for p in target.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"], "old or temporary directories left behind"
    loaded = atlasmap.SCVI.load(target, adata=query_adata, device=query_model.device)
    assert loaded.surgery is not None
    assert np.array_equal(loaded.get_latent_representation(), query_model.get_latent_representation())


def test_overwrite_never_deletes_files_atlasmap_did_not_write(ref_model: Any, query_model: Any,
                                                              tmp_path: Path) -> None:
    """scvi-tools users save into folders that hold other things: such a folder is refused, untouched."""
    folder = tmp_path / "project"
    (folder / "sub").mkdir(parents=True)
    (folder / "notes.txt").write_text("my notes")
    (folder / "sub" / "data.csv").write_text("1,2")
    with pytest.raises(InputError, match=r"not an atlasmap model directory \(it holds notes.txt, sub/\).*never "
                                         r"deletes other files.*project/model"):
        ref_model.save(folder, overwrite=True)
    assert (folder / "notes.txt").read_text() == "my notes" and (folder / "sub" / "data.csv").read_text() == "1,2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["project"], "temporary directories left behind"
    # a model directory someone added a file to is not atlasmap's alone any more: refused as well
    model_dir = tmp_path / "model"
    ref_model.save(model_dir)
    before = {p.name: p.read_bytes() for p in model_dir.iterdir()}
    (model_dir / "README.md").write_text("our reference")
    with pytest.raises(InputError, match=r"it holds README.md"):
        query_model.save(model_dir, overwrite=True)
    assert {p.name: p.read_bytes() for p in model_dir.iterdir() if p.name != "README.md"} == before
    # a config.json of another tool is not ours either
    other = tmp_path / "other"
    other.mkdir()
    (other / CONFIG_FILE).write_text('{"model_type": "bert"}')
    with pytest.raises(InputError, match="not an atlasmap model directory"):
        ref_model.save(other, overwrite=True)
    assert (other / CONFIG_FILE).read_text() == '{"model_type": "bert"}'


def test_overwrite_replaces_an_empty_directory(ref_model: Any, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    ref_model.save(tmp_path / "empty", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "empty").iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


@pytest.mark.parametrize("contents", ["empty", "model"])
def test_saving_over_the_working_directory_is_an_input_error(ref_model: Any, tmp_path: Path, contents: str,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """``save(".", overwrite=True)`` gave a raw ``OSError: Device or resource busy``."""
    cwd = tmp_path / "work"
    if contents == "model":
        ref_model.save(cwd)
    else:
        cwd.mkdir()
    before = sorted(p.name for p in cwd.iterdir())
    monkeypatch.chdir(cwd)
    with pytest.raises(InputError, match=r"current working directory.*model"):
        ref_model.save(".", overwrite=True)
    with pytest.raises(InputError, match="already exists"):
        ref_model.save(".")
    assert sorted(p.name for p in cwd.iterdir()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]
    ref_model.save("model")  # a subdirectory of the working directory is fine
    assert (cwd / "model" / CONFIG_FILE).is_file()


def test_save_over_a_file_is_refused(ref_model: Any, tmp_path: Path) -> None:
    target = tmp_path / "afile"
    target.write_text("x")
    with pytest.raises(InputError, match="not a directory"):
        ref_model.save(target, overwrite=True)
    assert target.read_text() == "x"


def test_failed_save_leaves_existing_directory_intact(ref_model: Any, query_model: Any, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "model"
    ref_model.save(target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def broken_save_file(*args: Any, **kwargs: Any) -> None:
        raise OSError("disk full")

    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save_file)
    with pytest.raises(InputError, match="cannot write the model to .*disk full"):
        query_model.save(target, overwrite=True)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"], "temporary directory left behind"
    with pytest.raises(InputError, match="disk full"):
        query_model.save(tmp_path / "new")
    assert not (tmp_path / "new").exists()


# ------------------------------------------------------------------------------------------ corrupt directories
@pytest.fixture
def saved(ref_model: Any, tmp_path: Path) -> Path:
    return ref_model.save(tmp_path / "model")


def _edit_config(path: Path, edit: Any) -> None:
    config = json.loads((path / CONFIG_FILE).read_text())
    edit(config)
    (path / CONFIG_FILE).write_text(json.dumps(config))


def _edit_weights(path: Path, edit: Any) -> None:
    tensors = load_file(path / WEIGHTS_FILE)
    edit(tensors)
    save_file(tensors, str(path / WEIGHTS_FILE))


def _load_error(path: Path) -> str:
    with pytest.raises(ModelFileError) as err:
        atlasmap.SCVI.load(path)
    message = str(err.value)
    assert "\n" not in message and len(message) < 600
    return message


def test_missing_directory(tmp_path: Path) -> None:
    assert "does not exist" in _load_error(tmp_path / "nope")


def test_missing_config(saved: Path) -> None:
    (saved / CONFIG_FILE).unlink()
    assert "has no config.json" in _load_error(saved)


def test_missing_weights(saved: Path) -> None:
    (saved / WEIGHTS_FILE).unlink()
    assert "has no weights.safetensors" in _load_error(saved)


@pytest.mark.parametrize("content", [b'{"format": "atlasmap-model", "format_', b"", b"\xff\xfe\x00garbage"],
                         ids=["truncated", "empty", "not_utf8"])
def test_corrupt_json(saved: Path, content: bytes) -> None:
    (saved / CONFIG_FILE).write_bytes(content)
    assert "config.json is not valid JSON" in _load_error(saved)


@pytest.mark.parametrize("config", [[1, 2], {"model": "SCVI"}, "atlasmap"], ids=["list", "no_format", "string"])
def test_json_that_is_not_a_model_config(saved: Path, config: Any) -> None:
    (saved / CONFIG_FILE).write_text(json.dumps(config))
    assert "is not an atlasmap model config" in _load_error(saved)


@pytest.mark.parametrize("version", [FORMAT_VERSION + 1, 99, "1", None])
def test_unknown_format_version(saved: Path, version: Any) -> None:
    _edit_config(saved, lambda c: c.update(format_version=version))
    message = _load_error(saved)
    assert f"model format version {version!r}" in message and "Upgrade atlasmap" in message


def test_unknown_model_type(saved: Path) -> None:
    _edit_config(saved, lambda c: c.update(model="SuperVAE"))
    message = _load_error(saved)
    assert "unknown model type 'SuperVAE'" in message and "SCVI" in message


def test_missing_config_entries(saved: Path) -> None:
    _edit_config(saved, lambda c: (c.pop("hparams"), c.pop("registry")))
    assert "lacks required entries: hparams, registry" in _load_error(saved)


@pytest.mark.parametrize(("edit", "expected"), [
    (lambda c: c["hparams"].update(n_hidden="wide"), "does not describe a valid SCVI"),
    (lambda c: c["hparams"].update(unknown_option=1), "does not describe a valid SCVI"),
    (lambda c: c["hparams"].pop("n_genes"), "does not describe a valid SCVI"),
    (lambda c: c["registry"].pop("var_names"), "does not describe a valid SCVI"),
    (lambda c: c["registry"].update(var_names=c["registry"]["var_names"][:-1]), "47 gene names but n_genes=48"),
    (lambda c: c["registry"]["categories"].update(batch=["batch0"]), "'batch' has 1 categories"),
    (lambda c: c.update(block_sizes=[[2], [1]]), "block sizes"),
    (lambda c: c.update(block_sizes=[[3]]), "'batch' has 2 categories"),
], ids=["hparam_type", "unknown_hparam", "missing_hparam", "missing_var_names", "gene_count", "category_count",
        "extra_block", "block_size"])
def test_config_that_does_not_describe_the_model(saved: Path, edit: Any, expected: str) -> None:
    _edit_config(saved, edit)
    assert expected in _load_error(saved)


@pytest.mark.parametrize("keep", [0, 7, 8, 100, 0.5, -1], ids=["0B", "7B", "8B", "100B", "half", "minus1B"])
def test_truncated_safetensors(saved: Path, keep: float) -> None:
    raw = (saved / WEIGHTS_FILE).read_bytes()
    n = int(len(raw) * keep) if isinstance(keep, float) else (len(raw) + keep if keep < 0 else keep)
    (saved / WEIGHTS_FILE).write_bytes(raw[:n])
    message = _load_error(saved)
    assert "weights.safetensors" in message and ("corrupt" in message or "truncated" in message)


def test_wrong_shape_tensor(saved: Path) -> None:
    _edit_weights(saved, lambda t: t.update({"z_mean.weight": torch.zeros(SMALL["n_latent"] + 1, SMALL["n_hidden"])}))
    message = _load_error(saved)
    assert "tensor 'z_mean.weight'" in message
    assert f"shape ({SMALL['n_latent'] + 1}, {SMALL['n_hidden']})" in message
    assert f"expects ({SMALL['n_latent']}, {SMALL['n_hidden']})" in message


def test_wrong_dtype_tensor(saved: Path) -> None:
    _edit_weights(saved, lambda t: t.update({"px_r": t["px_r"].double()}))
    message = _load_error(saved)
    assert "tensor 'px_r'" in message and "torch.float64" in message and "torch.float32" in message


def test_missing_and_extra_tensors(saved: Path) -> None:
    _edit_weights(saved, lambda t: (t.pop("decoder.layers.0.linear.weight"), t.update(rogue=torch.zeros(2))))
    message = _load_error(saved)
    assert "missing tensors ['decoder.layers.0.linear.weight']" in message
    assert "unexpected tensors ['rogue']" in message


def test_weights_of_another_model(saved: Path, query_model: Any, tmp_path: Path) -> None:
    """A query's weights (one more block per table) next to the reference's config."""
    other = query_model.save(tmp_path / "other")
    (saved / WEIGHTS_FILE).write_bytes((other / WEIGHTS_FILE).read_bytes())
    assert "unexpected tensors" in _load_error(saved)


class _Payload:
    """Unpickling this object calls ``open(marker, "w")``, i.e. creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple:
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("how", ["pickle", "torch_save"])
def test_pickle_renamed_to_safetensors_is_not_executed(saved: Path, tmp_path: Path, how: str) -> None:
    # the payload is live: unpickling it really does create a file
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Payload(probe))).close()
    assert probe.exists()

    marker = tmp_path / "PWNED"
    weights = saved / WEIGHTS_FILE
    if how == "pickle":
        weights.write_bytes(pickle.dumps({"z_mean.weight": _Payload(marker)}))
    else:
        torch.save({"z_mean.weight": _Payload(marker)}, weights)
    message = _load_error(saved)
    assert "weights.safetensors" in message
    assert not marker.exists(), "loading a model directory executed code from a pickle"
    with pytest.raises(ModelFileError):
        atlasmap.load(saved)
    assert not marker.exists()


def test_no_pickle_in_saving(ref_model: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Saving must not go through pickle (or torch.save, which pickles)."""
    def forbidden(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("pickle used while saving a model")

    monkeypatch.setattr(pickle, "dump", forbidden)
    monkeypatch.setattr(pickle, "dumps", forbidden)
    monkeypatch.setattr(torch, "save", forbidden)
    target = ref_model.save(tmp_path / "model")
    assert sorted(os.listdir(target)) == [CONFIG_FILE, WEIGHTS_FILE]


def test_load_query_data_from_corrupt_directory(saved: Path, query_adata: Any) -> None:
    (saved / CONFIG_FILE).write_text("{not json")
    with pytest.raises(ModelFileError, match="not valid JSON"):
        atlasmap.SCVI.load_query_data(query_adata, saved)


@pytest.fixture
def saved_query(query_model: Any, tmp_path: Path) -> Path:
    return query_model.save(tmp_path / "query")


@pytest.mark.parametrize("edit", [
    lambda c: c["surgery"]["trainable"].append("bogus.weight"),
    lambda c: c["surgery"]["options"].update(bogus_option=True),
    lambda c: c.update(surgery="yes"),
    lambda c: c.update(history=[1, 2]),
    lambda c: c.update(key_map=["batch"]),
], ids=["unknown_trainable", "unknown_option", "surgery_not_a_dict", "history_not_a_dict", "key_map_not_a_dict"])
def test_corrupt_model_state_in_config(saved_query: Path, edit: Any) -> None:
    _edit_config(saved_query, edit)
    assert "has invalid model state" in _load_error(saved_query)
