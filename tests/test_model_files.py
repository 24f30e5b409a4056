"""Adversarial model directories and crash-safe saving.

``tests/test_io.py`` covers the ordinary corrupt cases (missing files, bad JSON, truncation, wrong shapes,
...). Here: files crafted to attack the loader (pickles whose ``__reduce__`` runs code, safetensors headers
that claim huge sizes or overlapping data, configs that request huge tensors or nest JSON deeply, special
files), byte-level fuzzing of both files, and ``kill -9`` during saves. Every case must end in a model
that works or in :class:`~atlasmap.errors.ModelFileError` naming the problem; nothing in a model directory
is ever executed. Counts are printed by the last test (``pytest -s``).
"""

from __future__ import annotations

import json
import os
import pickle
import resource
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file
from support import simulate, split_by_batch, train_reference

import atlasmap
from atlasmap.errors import AtlasmapError, ModelFileError
from atlasmap.io.format import CONFIG_FILE, WEIGHTS_FILE

COUNTS: Counter[str] = Counter()
FUZZ = settings(max_examples=int(os.environ.get("ATLASMAP_MODEL_FUZZ_EXAMPLES", "60")), deadline=None,
                derandomize=not os.environ.get("ATLASMAP_FUZZ_RANDOM"), database=None,
                suppress_health_check=list(HealthCheck))
KILL_TRIALS = int(os.environ.get("ATLASMAP_KILL_TRIALS", "2"))  # per kind of kill


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def data() -> Any:
    return split_by_batch(simulate(n_cells=200))[0]


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory, data: Any) -> Path:
    """A saved, trained small reference (copy it before damaging it)."""
    path = tmp_path_factory.mktemp("template") / "model"
    train_reference(data, epochs=1).save(path)
    return path


@pytest.fixture
def saved(template: Path, tmp_path: Path) -> Path:
    path = tmp_path / "model"
    shutil.copytree(template, path)
    return path


def _load_and_use(path: Path, data: Any) -> str:
    """Load ``path`` and embed ``data``: ``"works"`` or ``"clear_error"``; anything else propagates."""
    try:
        model = atlasmap.load(path)
        latent = model.get_latent_representation(data)
        assert latent.shape[0] == data.n_obs
    except ModelFileError as err:
        assert "\n" not in str(err) and len(str(err)) > 20
        return "clear_error"
    return "works"


def _header(path: Path) -> tuple[int, dict[str, Any], bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return n, json.loads(raw[8:8 + n]), raw[8 + n:]


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a model directory as private copies (``load_file`` memory-maps the file, and writing
    over a mapped file would crash this process with SIGBUS)."""
    return load_safetensors((path / WEIGHTS_FILE).read_bytes())


def _write_safetensors(path: Path, header: dict[str, Any] | bytes, body: bytes, length: int | None = None) -> None:
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob) if length is None else length) + blob + body)


# ------------------------------------------------------------------------------------------ crafted files
def _edit_config(fn: Callable[[dict[str, Any]], Any]) -> Callable[[Path], None]:
    def apply(path: Path) -> None:
        config = json.loads((path / CONFIG_FILE).read_text())
        fn(config)
        (path / CONFIG_FILE).write_text(json.dumps(config))
    return apply


def _edit_header(fn: Callable[[dict[str, Any], bytes], tuple[Any, bytes] | tuple[Any, bytes, int]]
                 ) -> Callable[[Path], None]:
    def apply(path: Path) -> None:
        _, header, body = _header(path / WEIGHTS_FILE)
        _write_safetensors(path / WEIGHTS_FILE, *fn(header, body))
    return apply


def _first_tensor(header: dict[str, Any]) -> str:
    return next(k for k in sorted(header) if k != "__metadata__")


def _shift_offsets(h: dict[str, Any], b: bytes) -> tuple[dict[str, Any], bytes]:
    name = _first_tensor(h)
    h[name]["data_offsets"] = [h[name]["data_offsets"][0] + 4, h[name]["data_offsets"][1] + 4]
    return h, b


def _set_tensor(**fields: Any) -> Callable[[dict[str, Any], bytes], tuple[dict[str, Any], bytes]]:
    def fn(h: dict[str, Any], b: bytes) -> tuple[dict[str, Any], bytes]:
        h["encoder.layers.0.linear.weight"].update(fields)
        return h, b
    return fn


def _transpose_first_weight(h: dict[str, Any], b: bytes) -> tuple[dict[str, Any], bytes]:
    shape = h["encoder.layers.0.linear.weight"]["shape"]
    h["encoder.layers.0.linear.weight"]["shape"] = shape[::-1]  # same number of bytes, wrong shape
    return h, b


def _nested(depth: int) -> Callable[[Path], None]:
    def apply(path: Path) -> None:
        (path / CONFIG_FILE).write_text("[" * depth + "]" * depth)
    return apply


def _write(name: str, content: bytes) -> Callable[[Path], None]:
    def apply(path: Path) -> None:
        (path / name).write_bytes(content)
    return apply


def _replace_with_dir(name: str) -> Callable[[Path], None]:
    def apply(path: Path) -> None:
        (path / name).unlink()
        (path / name).mkdir()
    return apply


def _symlink(name: str, target: str) -> Callable[[Path], None]:
    def apply(path: Path) -> None:
        (path / name).unlink()
        (path / name).symlink_to(target)
    return apply


def _fifo(name: str) -> Callable[[Path], None]:
    def apply(path: Path) -> None:
        (path / name).unlink()
        os.mkfifo(path / name)
    return apply


def _hparam(key: str, value: Any) -> Callable[[Path], None]:
    return _edit_config(lambda c: c["hparams"].__setitem__(key, value))


#: name -> (damage, regex the ModelFileError must match)
CRAFTED: dict[str, tuple[Callable[[Path], None], str]] = {
    # safetensors headers
    "header length 2^62": (_edit_header(lambda h, b: (h, b, 2**62)), "safetensors"),
    "header length beyond file": (_edit_header(lambda h, b: (h, b[:16], 10**6)), "safetensors"),
    "header length zero": (_edit_header(lambda h, b: (h, b, 0)), "safetensors"),
    "header not json": (_edit_header(lambda h, b: (b"\xff\xfe{not json" + b" " * 40, b)), "safetensors"),
    "header a json list": (_edit_header(lambda h, b: (b"[1, 2, 3]", b)), "safetensors"),
    "offsets overlap": (_edit_header(_shift_offsets), "safetensors"),
    "offsets past the end": (_edit_header(_set_tensor(data_offsets=[0, 2**40])), "safetensors"),
    "shape overflows": (_edit_header(_set_tensor(shape=[2**40, 2**40])), "safetensors"),
    "unknown dtype": (_edit_header(_set_tensor(dtype="Q99")), "safetensors"),
    "dtype F64 declared": (_edit_header(_set_tensor(dtype="F64")), "safetensors|dtype"),
    "same bytes other shape": (_edit_header(_transpose_first_weight), "shape"),
    "trailing garbage": (_edit_header(lambda h, b: (h, b + b"\0" * 64)), "safetensors"),
    "huge metadata": (_edit_header(lambda h, b: ({**h, "__metadata__": {"x": "y" * 2_000_000}}, b)), "works"),
    # config.json
    "json nested 100000 deep": (_nested(100_000), "not valid JSON"),
    "n_hidden 10^6 (80 GB)": (_hparam("n_hidden", 10**6), "MB of weights"),
    "n_hidden negative": (_hparam("n_hidden", -3), "valid SCVI|MB"),
    "n_hidden a string": (_hparam("n_hidden", "32"), "valid SCVI|MB"),
    "n_hidden NaN": (_hparam("n_hidden", float("nan")), "valid SCVI|MB"),
    "dropout 7": (_hparam("dropout_rate", 7.0), "valid SCVI"),
    "unknown hparam": (_hparam("exec", "import os"), "valid SCVI"),
    "model is a dotted path": (_edit_config(lambda c: c.__setitem__("model", "atlasmap.cli.main")), "unknown model type"),
    "model is __class__": (_edit_config(lambda c: c.__setitem__("model", "__class__")), "unknown model type"),
    "buffer names an attribute": (_edit_config(lambda c: c.__setitem__("buffers", {"train": [1]})), "valid SCVI"),
    "buffer names a weight": (_edit_config(lambda c: c.__setitem__("buffers", {"z_mean.weight": [3, 3]})),
                              "valid SCVI|does not match|shape"),
    "buffer escapes the module": (_edit_config(lambda c: c.__setitem__("buffers", {"__class__.__init__": [1]})),
                                  "valid SCVI"),
    "block sizes negative": (_edit_config(lambda c: c.__setitem__("block_sizes", [[2, -2]])), "inconsistent|valid"),
    "genes do not match n_genes": (_edit_config(lambda c: c["registry"]["var_names"].pop()), "inconsistent"),
    "history not a dict": (_edit_config(lambda c: c.__setitem__("history", "x")), "invalid model state"),
    "trainable names unknown": (_edit_config(lambda c: c.__setitem__("surgery", {"trainable": ["os.system"]})),
                                "invalid model state|not in the model"),
    "format version 2 from atlasmap 9.0": (_edit_config(lambda c: c.update(format_version=2, atlasmap_version="9.0")),
                                           r"9\.0.*Upgrade atlasmap"),
    "format version 1.5": (_edit_config(lambda c: c.update(format_version=1.5)), "format version"),
    "format version true": (_edit_config(lambda c: c.update(format_version=True)), "format version|works"),
    "newer atlasmap, same format": (_edit_config(lambda c: c.update(atlasmap_version="99.1")), "works"),
    # files replaced by other things
    "weights replaced by torch pickle": (lambda p: torch.save(_read_weights(p), p / WEIGHTS_FILE), "safetensors"),
    "config replaced by pickle": (_write(CONFIG_FILE, pickle.dumps({"format": "atlasmap-model"})), "not valid JSON"),
    "weights is a directory": (_replace_with_dir(WEIGHTS_FILE), "no weights.safetensors"),
    "config is a directory": (_replace_with_dir(CONFIG_FILE), "no config.json"),
    "weights -> /dev/zero": (_symlink(WEIGHTS_FILE, "/dev/zero"), "no weights.safetensors"),
    "config -> /dev/zero": (_symlink(CONFIG_FILE, "/dev/zero"), "no config.json"),
    "weights -> dangling": (_symlink(WEIGHTS_FILE, "/nonexistent/x"), "no weights.safetensors"),
    "weights is a fifo": (_fifo(WEIGHTS_FILE), "no weights.safetensors"),
    "config is a fifo": (_fifo(CONFIG_FILE), "no config.json"),
    "config empty": (_write(CONFIG_FILE, b""), "not valid JSON"),
    "config utf-16": (lambda p: (p / CONFIG_FILE).write_bytes((p / CONFIG_FILE).read_text().encode("utf-16")),
                      "not valid JSON"),
}


@pytest.mark.parametrize("case", list(CRAFTED))
def test_crafted_model_directories(case: str, saved: Path, data: Any) -> None:
    damage, expected = CRAFTED[case]
    damage(saved)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    if expected == "works":
        outcome = _load_and_use(saved, data)
        assert outcome == "works"
    else:
        try:
            outcome = _load_and_use(saved, data)
        except ModelFileError as err:  # pragma: no cover - _load_and_use catches it
            raise AssertionError from err
        if outcome == "works":
            assert "works" in expected, f"{case}: loaded although it should be refused"
        else:
            with pytest.raises(ModelFileError, match=expected):
                atlasmap.load(saved)
    COUNTS[f"crafted:{outcome}"] += 1
    # crafted sizes never make atlasmap allocate or spin (maxrss is in KiB on Linux)
    assert time.perf_counter() - t0 < 20
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 300 * 1024


# ------------------------------------------------------------------------------------------ byte fuzzing
@FUZZ
@given(which=st.sampled_from([WEIGHTS_FILE, CONFIG_FILE]), edits=st.lists(
    st.tuples(st.floats(0.0, 1.0, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=4),
    truncate=st.none() | st.floats(0.0, 1.0))
def test_byte_level_damage(which: str, edits: list[tuple[float, int]], truncate: float | None, template: Path,
                           data: Any, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Random bytes overwritten (and maybe a truncation) anywhere in either file: works or ModelFileError."""
    path = tmp_path_factory.mktemp("fuzz") / "model"
    shutil.copytree(template, path)
    raw = bytearray((path / which).read_bytes())
    for position, value in edits:
        raw[int(position * len(raw))] = value
    if truncate is not None:
        raw = raw[: int(truncate * len(raw))]
    (path / which).write_bytes(bytes(raw))
    try:
        outcome = _load_and_use(path, data)
    except AtlasmapError as err:  # e.g. a flipped gene name no longer matches the data: a clear error too
        outcome = "clear_error"
        assert "\n" not in str(err)
    COUNTS[f"byte_fuzz:{outcome}"] += 1
    shutil.rmtree(path.parent)


# ------------------------------------------------------------------------------------------ no code execution
class _Payload:
    """Unpickling this runs ``exec(code)``."""

    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (self.code,))


def test_malicious_pickles_execute_nothing(saved: Path, data: Any, tmp_path: Path) -> None:
    """Pickles with a code-running ``__reduce__`` in every place a loader might look: nothing runs."""
    marker = tmp_path / "marker"
    code = f"open({str(marker)!r}, 'w').write('code ran')"
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Payload(f"open({str(probe)!r}, 'w').write('x')")))
    assert probe.exists(), "the payload must be live for this test to mean anything"
    payload = pickle.dumps(_Payload(code))
    zipped = tmp_path / "zipped.pt"
    torch.save({"state": _Payload(code)}, zipped)
    # extra files next to a valid model are ignored
    for name in ("model.pt", "weights.pt", "pytorch_model.bin", "config.pkl", "__init__.py", "weights.safetensors.pkl"):
        (saved / name).write_bytes(payload if name != "__init__.py" else code.encode())
    assert _load_and_use(saved, data) == "works"
    # safetensors metadata is text and stays text
    tensors = _read_weights(saved)
    save_file(tensors, str(saved / WEIGHTS_FILE), metadata={"format": "atlasmap-model", "pickle": payload.hex()})
    assert _load_and_use(saved, data) == "works"
    # the model's own files replaced by payloads (raw pickle and torch's zip pickle)
    cases = 0
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        for content in (payload, zipped.read_bytes()):
            broken = tmp_path / f"broken{cases}"
            shutil.copytree(saved, broken)
            (broken / name).write_bytes(content)
            with pytest.raises(ModelFileError):
                atlasmap.load(broken)
            with pytest.raises(ModelFileError):
                atlasmap.SCVI.load_query_data(data, broken)
            cases += 1
    COUNTS["malicious:works (payload ignored)"] += 2
    COUNTS["malicious:clear_error"] += cases
    assert not marker.exists(), "code from a model directory was executed"


def test_loading_never_unpickles(saved: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading does not call pickle or torch.load at all."""

    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("model loading must not unpickle")

    for module, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(module, name, forbidden)
    atlasmap.load(saved)


# ------------------------------------------------------------------------------------------ kill -9
_SAVER = textwrap.dedent("""
    import os, sys, time
    import torch
    torch.set_num_threads(1)
    import atlasmap

    mode, target, *sources = sys.argv[1:]
    models = [atlasmap.load(s) for s in sources]
    if mode == "slow-rename":  # widen any window between directory renames, and announce each one
        def slow(fn):
            def wrapper(*args, **kwargs):
                time.sleep(0.02)
                out = fn(*args, **kwargs)
                print("renamed", flush=True)
                time.sleep(0.05)
                return out
            return wrapper
        os.rename, os.replace = slow(os.rename), slow(os.replace)
    print("ready", flush=True)
    i = 0
    while True:
        print(f"saving {i % len(models)}", flush=True)
        models[i % len(models)].save(target, overwrite=True)
        print(f"saved {i % len(models)}", flush=True)
        i += 1
""")


@pytest.fixture(scope="module")
def big_models(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two models of ~10 MB with different weights (a save takes tens of milliseconds)."""
    from atlasmap.datasets import simulate_counts

    adata = simulate_counts(n_cells=40, n_genes=3000, n_batches=2, seed=0)
    root = tmp_path_factory.mktemp("big")
    paths = []
    for seed in (1, 2):
        path = root / f"model{seed}"
        atlasmap.SCVI(adata, batch_key="batch", n_hidden=256, n_layers=2, seed=seed).save(path)
        paths.append(path)
    return paths


def _weights_identity(path: Path, sources: list[Path]) -> int:
    """Index of the source model whose weights ``path`` holds bit for bit (AssertionError if none)."""
    model = atlasmap.load(path)  # a complete, consistent model directory
    state = model.module.state_dict()
    for i, source in enumerate(sources):
        ref = _read_weights(source)
        if ref.keys() == state.keys() and all(torch.equal(ref[k], state[k]) for k in ref):
            return i
    raise AssertionError(f"{path} holds weights of none of the saved models")


def _spawn_saver(tmp_path: Path, mode: str, sources: list[Path], trial: int, preexisting: bool
                 ) -> tuple[subprocess.Popen[str], Path]:
    target = tmp_path / f"target-{mode}-{trial}"
    if preexisting:
        shutil.copytree(sources[1], target)
    script = tmp_path / "saver.py"
    if not script.exists():
        script.write_text(_SAVER)
    proc = subprocess.Popen([sys.executable, str(script), mode, str(target), *map(str, sources)],
                            stdout=subprocess.PIPE, text=True, bufsize=1)
    return proc, target


def _kill_and_check(proc: subprocess.Popen[str], target: Path, mode: str, sources: list[Path], trial: int,
                    preexisting: bool) -> dict[str, Any]:
    """Wait for the right moment, SIGKILL the saver, and check what the path holds."""
    rng = np.random.default_rng(trial)
    assert proc.stdout is not None
    saves, killed_at = 0, "while starting"
    for line in proc.stdout:
        line = line.strip()
        if line.startswith("saved"):
            saves += 1
        if mode == "slow-rename" and line == "renamed" and saves >= 1:
            # right after a rename of an overwriting save: with remove-then-rename the path is empty now
            killed_at = "between renames" if not target.exists() else "after a rename"
            break
        if line.startswith("saving") and (saves >= (2 if preexisting else 0)):
            time.sleep(float(rng.uniform(0.0, 0.12)))  # somewhere inside this save
            killed_at = "during a save"
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    leftovers = sorted(p.name for p in target.parent.iterdir() if p.name.startswith(f".{target.name}."))
    result: dict[str, Any] = {"mode": mode if preexisting else "first save", "killed": killed_at, "saves": saves,
                              "leftovers": len(leftovers)}
    if target.exists():
        result["holds"] = f"model {_weights_identity(target, sources)}"  # the path started with model 1
    else:
        assert not preexisting and saves == 0, f"{target} vanished after kill -9 ({result})"
        with pytest.raises(ModelFileError, match="does not exist"):
            atlasmap.load(target)
        result["holds"] = "nothing (never saved)"
    # hidden temporary siblings are never mistaken for the model, and a later save still works
    assert all(name.startswith(".") for name in leftovers)
    atlasmap.load(sources[0]).save(target, overwrite=True)
    assert _weights_identity(target, sources) == 0
    return result


KILL_RESULTS: list[dict[str, Any]] = []


def test_kill_9_during_saves_keeps_a_complete_model(big_models: list[Path], tmp_path: Path) -> None:
    """SIGKILL processes that save over an existing model again and again: the path always holds one of the
    two complete models, bit for bit, never a partial or missing one.

    * ``plain``: killed at a random moment inside a save;
    * ``slow-rename``: every directory rename the saver makes is slowed down and announced, and the kill
      lands right after one, where a remove-then-rename scheme leaves no model at the path;
    * ``first save``: killed during the first save to a new path, which must then be absent or complete.

    The savers run concurrently (each starts a fresh interpreter)."""
    plan = [(mode, trial, True) for mode in ("plain", "slow-rename") for trial in range(KILL_TRIALS)]
    plan += [("plain", 100 + trial, False) for trial in range(KILL_TRIALS)]
    running = [(_spawn_saver(tmp_path, mode, big_models, trial, pre), mode, trial, pre) for mode, trial, pre in plan]
    try:
        for (proc, target), mode, trial, pre in running:
            result = _kill_and_check(proc, target, mode, big_models, trial, pre)
            KILL_RESULTS.append(result)
    finally:
        for (proc, _), *_ in running:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert len(KILL_RESULTS) == len(plan)


_REWRITER = textwrap.dedent("""
    import os, sys, threading, time
    import torch
    torch.set_num_threads(1)
    import atlasmap
    from atlasmap.errors import ModelFileError

    path, seconds = sys.argv[1], float(sys.argv[2])
    weights = os.path.join(path, "weights.safetensors")
    good = open(weights, "rb").read()
    stop = False

    def rewrite_in_place():  # like cp over the file or an in-place download: same inode, truncated first
        while not stop:
            with open(weights, "r+b") as fh:
                fh.truncate(len(good) // 3)
                fh.seek(0)
                fh.write(good)
                fh.flush()
            time.sleep(0.03)

    threading.Thread(target=rewrite_in_place, daemon=True).start()
    ok = errors = 0
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            atlasmap.load(path)
            ok += 1
        except ModelFileError:
            errors += 1
    stop = True
    print(ok, errors)
""")


def test_weights_rewritten_in_place_while_loading(big_models: list[Path], tmp_path: Path) -> None:
    """Loading while another writer truncates and rewrites weights.safetensors in place: each load works or
    raises ModelFileError. (A memory-mapped read dies with SIGBUS here, taking the whole process down.)"""
    path = tmp_path / "model"
    shutil.copytree(big_models[0], path)
    script = tmp_path / "rewriter.py"
    script.write_text(_REWRITER)
    proc = subprocess.run([sys.executable, str(script), str(path), "3"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"loader died (return code {proc.returncode}; -7 is SIGBUS): {proc.stderr[-500:]}"
    ok, errors = map(int, proc.stdout.split())
    COUNTS["rewritten_while_loading:works"] += ok
    COUNTS["rewritten_while_loading:clear_error"] += errors
    assert ok + errors > 0


def test_zz_report(capsys: pytest.CaptureFixture[str]) -> None:
    with capsys.disabled():
        print(f"\nmodel-file report: {sum(COUNTS.values())} damaged/crafted directories loaded: {dict(sorted(COUNTS.items()))}")
        print(f"kill -9 trials: {len(KILL_RESULTS)}: {KILL_RESULTS}")
