"""Property-based input validation: generated malformed AnnData either works correctly or gives a clear error.

Each generated AnnData goes through three pipelines:

* ``setup``: ``SCVI(adata, ...)`` → ``train(1 epoch)`` → ``get_latent_representation()``;
* ``embed``: a trained reference's ``get_latent_representation(adata)``;
* ``query``: ``SCVI.load_query_data(adata, reference)`` → ``train(1 epoch)`` → latent.

The oracle is computed from the data itself (:func:`expected_problems`): if the AnnData has a problem the
pipeline must refuse (NaN, negative or non-integer counts, a non-numeric dtype, duplicate names, cells
without counts, NaN covariates, ...), the pipeline must raise an :class:`~atlasmap.errors.AtlasmapError`
whose message names one of those problems; otherwise it must succeed and give **bit-identically** the
latent of the same values as a plain dense float32 matrix (so dtype, sparse format and index width make no
difference). In every case the AnnData is deep-compared before and after: it is never modified.

Outcomes are counted in :data:`COUNTS` and printed by the last test (run ``pytest -s`` to see them; set
``ATLASMAP_FUZZ_REPORT=path.json`` to also write them, ``ATLASMAP_FUZZ_EXAMPLES=N`` for longer runs and
``ATLASMAP_FUZZ_RANDOM=1`` for new, non-reproducible examples).
"""

from __future__ import annotations

import copy
import json
import os
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import atlasmap
from atlasmap.data.registry import get_counts
from atlasmap.errors import AtlasmapError

N_GENES = 8
GENES = tuple(f"g{i}" for i in range(N_GENES))
REF_BATCHES = ("b0", "b1")
REF_DONORS = ("d0", "d1")
ARCH: dict[str, Any] = {"n_hidden": 8, "n_latent": 2}
MAX_EXAMPLES = int(os.environ.get("ATLASMAP_FUZZ_EXAMPLES", "150"))
# reproducible by default; ATLASMAP_FUZZ_RANDOM=1 explores new examples on every run
FUZZ = settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=not os.environ.get("ATLASMAP_FUZZ_RANDOM"),
                database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

#: outcome counters: inputs tried, and per pipeline run "works" / "clear error" / failures
COUNTS: Counter[str] = Counter()
FAILURES: list[str] = []

# the problems the oracle knows, each with the words (regex) an error message must contain to name it
PROBLEMS: dict[str, str] = {
    "empty": r"empty",
    "x_none": r"None",
    "dup_obs": r"cell \(obs\) names are not unique",
    "dup_var": r"gene \(var\) names are not unique",
    "dtype": r"dtype",
    "nonfinite": r"NaN or infinite",
    "negative": r"negative",
    "non_integer": r"non-integer",
    "huge": r"2\^24",
    "no_counts": r"no counts",
    "missing_key": r"not a column of adata\.obs",
    "nan_category": r"missing \(NaN\)",
    "bad_continuous": r"NaN or infinite|not numeric|missing \(NaN\) values .*fill them with numbers",
    "missing_layer": r"not in adata\.layers",
    "unknown_category": r"not trained on",
    "nothing_to_train": r"no trainable parameters",
    "one_cell_batch_norm": r"batch-norm layers on 1 cell",
}


# ------------------------------------------------------------------------------------------ cases
@dataclass
class Case:
    """A generated AnnData and what was done to it (for messages)."""

    adata: ad.AnnData
    values: np.ndarray  # float64 numeric content of the counts matrix (before any dtype cast)
    dtype: str
    fmt: str
    layer_mode: str  # "X" | "layer" (log-normalised X, counts in layers["counts"]) | "layer_missing" | "x_none"
    setup_kwargs: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        return (f"{self.adata.n_obs}x{self.adata.n_vars} dtype={self.dtype} fmt={self.fmt} layer={self.layer_mode} "
                f"mutations={self.notes} setup={self.setup_kwargs}")


def _cast(values: np.ndarray, dtype: str, imag: bool) -> np.ndarray:
    if dtype == "str":
        return values.astype(str)
    if dtype == "object":
        return values.astype(object)
    if dtype.startswith("complex"):
        out = values.astype(dtype)
        return out + 1j if imag else out
    return values.astype(dtype)


def _to_format(matrix: np.ndarray, fmt: str, index64: bool) -> Any:
    if fmt == "dense":
        return matrix
    cls = {"csr": sp.csr_matrix, "csc": sp.csc_matrix, "csr_array": sp.csr_array, "csc_array": sp.csc_array}[fmt]
    out = cls(matrix)
    if index64:
        out.indices = out.indices.astype(np.int64)
        out.indptr = out.indptr.astype(np.int64)
    return out


@st.composite
def cases(draw: st.DrawFn) -> Case:
    """A small AnnData with a random combination of malformations (or none)."""
    # hypothesis favours the first / smallest choices: those are the ordinary ones here
    n = draw(st.integers(6, 20) if draw(st.booleans()) else st.sampled_from([12, 17, 5, 9, 3, 2, 1, 0]))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    values = rng.poisson(rng.uniform(0.5, 6.0, N_GENES), (n, N_GENES)).astype(np.float64)
    values[:, 0] += 1  # every cell has counts unless a mutation removes them
    genes = list(GENES)
    notes: list[str] = []
    # per-mutation probability rate/16; rate 0 (40% of cases) gives inputs that must work, in any
    # numeric dtype and matrix format
    rate = draw(st.sampled_from([0, 0, 1, 2, 4]))

    def mutate(name: str, hits: int = 1) -> bool:
        hit = rate > 0 and all(draw(st.integers(0, 15)) >= 16 - rate for _ in range(hits))
        if hit:
            notes.append(name)
        return hit

    def pick(valid: list[str], invalid: list[str]) -> str:
        return draw(st.sampled_from(valid if rate == 0 else valid + invalid))

    # ---- values
    if n and mutate("non_integer"):
        values[rng.integers(n), rng.integers(N_GENES)] += draw(st.sampled_from([0.5, 1e-3, 0.999]))
    if n and mutate("negative"):
        values[rng.integers(n), rng.integers(N_GENES)] = -draw(st.sampled_from([1.0, 3.0]))
    if n and mutate("nonfinite"):
        values[rng.integers(n), rng.integers(N_GENES)] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    if n and mutate("huge"):
        values[rng.integers(n), rng.integers(N_GENES)] = draw(st.sampled_from([2.0**25, 1e30, 2.0**24]))
    if n and mutate("zero_cell"):
        values[rng.integers(n)] = 0
    if n and mutate("zero_gene"):
        values[:, rng.integers(N_GENES)] = 0
    if mutate("all_zero", hits=2):
        values[:] = 0
    if mutate("no_genes", hits=2):
        values, genes = values[:, :0], []
    if genes and mutate("shuffle_genes"):
        order = rng.permutation(N_GENES)
        values, genes = values[:, order], [genes[i] for i in order]
    if genes and mutate("drop_genes"):
        values, genes = values[:, 2:], genes[2:]
    if genes and mutate("extra_gene"):
        values = np.concatenate([values, rng.poisson(2.0, (n, 1)).astype(np.float64)], axis=1)
        genes = [*genes, "x0"]
    if len(genes) > 1 and mutate("dup_var"):
        genes[1] = genes[0]

    # ---- dtype and format, restricted to those that can hold the values
    finite = bool(np.isfinite(values).all())
    integer = finite and bool((values == np.round(values)).all())
    nonneg = bool((values[~np.isnan(values)] >= 0).all())
    vmax = float(np.nanmax(np.abs(values[np.isfinite(values)]), initial=0.0))
    dtypes = ["float32", "float64"] + ([] if rate == 0 else ["object", "str", "complex64", "complex128"])
    if integer:
        dtypes += (["int64"] if vmax < 2**62 else []) + (["int32"] if vmax < 2**31 else [])
        if nonneg and vmax < 2**16:
            dtypes += ["uint16"]
        if nonneg and vmax <= 1:
            dtypes += ["bool"]
    if (integer and vmax <= 2048) or not finite and vmax <= 2048:
        dtypes += ["float16"]
    dtype = draw(st.sampled_from(dtypes))
    imag = dtype.startswith("complex") and draw(st.booleans())
    if imag:
        notes.append("imaginary")
    matrix = _cast(values, dtype, imag)
    numeric = dtype not in ("object", "str") and not dtype.startswith("complex")
    numeric_values = matrix.astype(np.float64) if numeric else values  # what the cast made of the values
    fmt = draw(st.sampled_from(["dense", "csr", "csc", "csr_array", "csc_array"])) if dtype not in (
        "object", "str", "float16") else "dense"
    index64 = fmt != "dense" and draw(st.booleans())
    if index64:
        notes.append("int64_indices")
    stored = _to_format(matrix, fmt, index64)

    # ---- obs
    obs_names = [f"c{i}" for i in range(n)]
    if n > 1 and mutate("dup_obs"):
        obs_names[1] = obs_names[0]
    obs = pd.DataFrame(index=pd.Index(obs_names, dtype=object))
    batch = rng.choice(REF_BATCHES, n)
    kind = pick(["categorical", "object", "int", "bool", "single", "unused", "new"], ["with_nan", "missing"])
    notes.append(f"batch:{kind}")
    if kind == "categorical":
        obs["batch"] = pd.Categorical(batch)
    elif kind == "object":
        obs["batch"] = batch.astype(object)
    elif kind == "int":
        obs["batch"] = np.where(batch == "b0", 0, 1)
    elif kind == "bool":
        obs["batch"] = batch == "b0"
    elif kind == "single":
        obs["batch"] = pd.Categorical(["b1"] * n)
    elif kind == "with_nan":
        obs["batch"] = pd.Categorical(np.where(np.arange(n) == 0, None, batch))
    elif kind == "unused":
        obs["batch"] = pd.Categorical(batch, categories=["b0", "b1", "b9"])
    elif kind == "new":
        obs["batch"] = pd.Categorical(np.where(np.arange(n) % 2 == 0, "b2", batch))
    donor_kind = pick(["ok", "ok", "single", "new"], ["with_nan", "missing"])
    notes.append(f"donor:{donor_kind}")
    donor = rng.choice(REF_DONORS, n)
    if donor_kind in ("ok", "single", "with_nan", "new"):
        if donor_kind == "single":
            donor = np.full(n, "d0")
        elif donor_kind == "new":
            donor = np.where(np.arange(n) % 3 == 0, "d7", donor)
        obs["donor"] = pd.Categorical(np.where(np.arange(n) == 0, None, donor) if donor_kind == "with_nan" else donor)
    score_kind = pick(["float", "float", "int", "numeric_text"], ["nan", "inf", "text", "missing"])
    notes.append(f"score:{score_kind}")
    score = rng.normal(0.0, 1.0, n)
    if score_kind == "float":
        obs["score"] = score
    elif score_kind == "int":
        obs["score"] = np.arange(n)
    elif score_kind in ("nan", "inf"):
        obs["score"] = np.where(np.arange(n) == n - 1, np.nan if score_kind == "nan" else np.inf, score)
    elif score_kind == "text":
        obs["score"] = np.array(["high", "low"] * n, dtype=object)[:n]
    elif score_kind == "numeric_text":
        obs["score"] = score.astype(str).astype(object)

    # ---- where the counts are
    layer_mode = pick(["X", "X", "X", "layer"], ["layer_missing", "x_none"])
    var = pd.DataFrame(index=pd.Index(genes, dtype=object))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if layer_mode == "x_none":
            adata = ad.AnnData(obs=obs, var=var, layers={"counts": stored})
        elif layer_mode == "layer":
            with np.errstate(all="ignore"):
                totals = np.nansum(np.abs(values), axis=1, keepdims=True)
                lognorm = np.log1p(np.abs(values) / np.where(totals > 0, totals, 1) * 1e4).astype(np.float32)
            adata = ad.AnnData(X=lognorm, obs=obs, var=var, layers={"counts": stored})
        else:
            adata = ad.AnnData(X=stored, obs=obs, var=var)
    adata.uns["meta"] = {"note": "fuzz", "arr": np.arange(3)}
    adata.obsm["emb"] = rng.normal(size=(n, 2))
    setup_kwargs: dict[str, Any] = {"layer": "counts" if layer_mode in ("layer", "layer_missing", "x_none") else None,
                                    "n_layers": draw(st.sampled_from([1, 2])),
                                    "use_batch_norm": draw(st.sampled_from(["none", "both"]))}
    setup_kwargs["use_layer_norm"] = "none" if setup_kwargs["use_batch_norm"] == "both" else "both"
    case = Case(adata=adata, values=numeric_values, dtype=dtype, fmt=fmt, layer_mode=layer_mode,
                setup_kwargs=setup_kwargs, notes=notes)
    case.notes.append(f"seed:{seed}")
    return case


# ------------------------------------------------------------------------------------------ oracle
def _matrix_problems(values: np.ndarray, dtype: str) -> set[str]:
    """Problems of a counts matrix of ``dtype`` whose numeric content is ``values``."""
    found: set[str] = set()
    if dtype in ("object", "str") or dtype.startswith("complex"):
        found.add("dtype")
        return found  # non-numeric matrices are refused before their values are read
    finite = np.isfinite(values)
    if not finite.all():
        found.add("nonfinite")
    v = values[finite]
    if (v < 0).any():
        found.add("negative")
    if (v != np.round(v)).any():
        found.add("non_integer")
    if (v > 2**24).any():
        found.add("huge")
    return found


def expected_problems(case: Case, pipeline: str, reference: Any) -> set[str]:
    """The problems ``pipeline`` must report for ``case`` (empty: it must work)."""
    adata = case.adata
    problems: set[str] = set()
    if adata.n_obs == 0 or adata.n_vars == 0:
        return {"empty"}
    if not adata.obs_names.is_unique:
        problems.add("dup_obs")
    if not adata.var_names.is_unique:
        problems.add("dup_var")
    # which matrix does this pipeline read?
    reads_layer = pipeline == "setup" and case.setup_kwargs["layer"] is not None
    if reads_layer and case.layer_mode == "layer_missing":
        problems.add("missing_layer")
        counts: np.ndarray | None = None
    elif not reads_layer and case.layer_mode == "x_none":
        layer_problems = _matrix_problems(case.values, case.dtype)
        if pipeline != "setup" and not (layer_problems - {"huge"}):  # no X: the layer holding counts is used
            counts = case.values
            problems |= layer_problems
        else:
            problems.add("x_none")
            counts = None
    elif not reads_layer and case.layer_mode == "layer":  # X is log-normalised, the counts are in the layer
        layer_problems = _matrix_problems(case.values, case.dtype)
        if pipeline != "setup" and not (layer_problems - {"huge"}):
            # a query / new data: X holds transformed values, the layer is the one place holding counts, so it
            # is used (with a warning); a reference (setup) is strict: the layer must be named
            counts = case.values
            problems |= layer_problems
        else:
            counts = np.asarray(adata.X, dtype=np.float64)
            problems |= _matrix_problems(counts, "float32")
    else:
        counts = case.values
        problems |= _matrix_problems(counts, case.dtype)
    if counts is not None and not (problems & {"dtype", "nonfinite", "negative", "non_integer", "huge"}):
        if pipeline == "setup":
            used = counts
        else:  # only the model's genes count
            idx = [i for i, g in enumerate(adata.var_names) if g in GENES]
            used = counts[:, idx]
        if (used.sum(axis=1) <= 0).any():
            problems.add("no_counts")
    for key, kind in (("batch", "cat"), ("donor", "cat"), ("score", "cont")):
        if key not in adata.obs.columns:
            problems.add("missing_key")
            continue
        col = adata.obs[key]
        if kind == "cat" and col.isna().any():
            problems.add("nan_category")
        if kind == "cont":
            try:
                v = col.to_numpy(dtype=np.float32)
                if not np.isfinite(v).all():
                    problems.add("bad_continuous")
            except (TypeError, ValueError):
                problems.add("bad_continuous")
    trains_batch_norm = (pipeline == "setup" and case.setup_kwargs["use_batch_norm"] != "none") or (
        pipeline == "query" and reference.module.config.use_batch_norm in ("decoder", "both"))
    if adata.n_obs == 1 and trains_batch_norm:
        problems.add("one_cell_batch_norm")
    if pipeline in ("embed", "query"):
        usable = [k for k in ("batch", "donor") if k in adata.obs.columns and not adata.obs[k].isna().any()]
        new = {k: set(adata.obs[k].astype(str)) - set(reference.registry.categories[k]) for k in usable}
        if pipeline == "embed" and any(new.values()):
            problems.add("unknown_category")
        if pipeline == "query" and len(usable) == 2 and not any(new.values()):
            problems.add("nothing_to_train")  # allowed, not required: see _classify
    return problems


# ------------------------------------------------------------------------------------------ running
def fingerprint(adata: ad.AnnData) -> dict[str, Any]:
    """A deep, independent copy of everything observable in an AnnData."""

    def matrix(m: Any) -> Any:
        if m is None:
            return None
        if sp.issparse(m):
            arrays = {a: getattr(m, a).copy() for a in ("data", "indices", "indptr") if hasattr(m, a)}
            return (type(m), m.dtype, m.shape, arrays)
        return (type(m), m.dtype, m.shape, np.array(m, copy=True))

    return {
        "X": matrix(adata.X), "layers": {k: matrix(v) for k, v in adata.layers.items()},
        "obs": adata.obs.copy(deep=True), "var": adata.var.copy(deep=True),
        "obs_names": list(adata.obs_names), "var_names": list(adata.var_names),
        "obsm": {k: np.array(v, copy=True) for k, v in adata.obsm.items()},
        "varm": {k: np.array(v, copy=True) for k, v in adata.varm.items()},
        "obsp": {k: matrix(v) for k, v in adata.obsp.items()}, "uns": copy.deepcopy(dict(adata.uns)),
    }


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, pd.DataFrame):
        try:
            pd.testing.assert_frame_equal(a, b, check_exact=True, check_categorical=True)
        except AssertionError:
            return False
        return True
    if isinstance(a, np.ndarray):
        if not (isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape):
            return False
        if a.dtype == object:  # NaN-aware for object arrays too (NaN != NaN)
            return bool(np.array_equal(a.astype(str), b.astype(str)))
        return bool(np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b if not isinstance(a, type) else a is b


def run_pipeline(pipeline: str, adata: ad.AnnData, reference: Any, setup_kwargs: dict[str, Any]) -> np.ndarray:
    """Run one pipeline on ``adata`` and return the latent it produces."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # gene-overlap and encode-covariates warnings are expected
        if pipeline == "setup":
            model = atlasmap.SCVI(adata, batch_key="batch", categorical_covariate_keys=["donor"],
                                  continuous_covariate_keys=["score"], **ARCH, **setup_kwargs)
            model.train(1, batch_size=8, progress_bar=False)
            return model.get_latent_representation()
        if pipeline == "embed":
            return reference.get_latent_representation(adata)
        query = atlasmap.SCVI.load_query_data(adata, reference)
        query.train(1, batch_size=8, progress_bar=False)
        return query.get_latent_representation()


def canonical(case: Case, pipeline: str) -> ad.AnnData:
    """The same AnnData with the counts this pipeline reads as a plain dense float32 array."""
    out = case.adata.copy()
    dense = case.values.astype(np.float32)
    if pipeline == "setup" and case.setup_kwargs["layer"] is not None:
        out.layers["counts"] = dense
    else:
        out.X = dense
    return out


def _classify(case: Case, pipeline: str, reference: Any) -> str:
    expected = expected_problems(case, pipeline, reference)
    optional = expected & {"nothing_to_train"}
    required = expected - optional
    before = fingerprint(case.adata)
    try:
        latent: np.ndarray | None = run_pipeline(pipeline, case.adata, reference, case.setup_kwargs)
        error: BaseException | None = None
    except AtlasmapError as err:
        latent, error = None, err
    except Exception as err:  # noqa: BLE001 - a crash is what this test looks for
        latent, error = None, err
    after = fingerprint(case.adata)
    changed = [k for k in before if not _same(before[k], after[k])]
    where = f"[{pipeline}] {case.describe()}"
    if changed:
        return _fail("modified_input", f"{where}: the AnnData was modified ({changed})")
    if error is not None and not isinstance(error, AtlasmapError):
        return _fail("crash", f"{where}: crashed with {type(error).__name__}: {error}")
    if error is not None:
        message = str(error)
        allowed = required | optional
        if not allowed:
            return _fail("unexpected_error", f"{where}: unexpected {type(error).__name__}: {message}")
        if not any(re.search(PROBLEMS[p], message) for p in allowed):
            return _fail("unclear_error", f"{where}: error does not name any of {sorted(allowed)}: {message}")
        named = next(p for p in sorted(allowed) if re.search(PROBLEMS[p], message))
        COUNTS[f"named:{named}"] += 1
        if "\n" in message or len(message) < 20:
            return _fail("unclear_error", f"{where}: error message is not one informative line: {message!r}")
        return "clear_error"
    if required:
        return _fail("silently_accepted", f"{where}: should have refused ({sorted(required)}) but worked")
    assert latent is not None
    n_latent = ARCH["n_latent"]
    if latent.shape != (case.adata.n_obs, n_latent) or not np.isfinite(latent).all():
        return _fail("wrong_result", f"{where}: latent of shape {latent.shape} / non-finite")
    expected_latent = run_pipeline(pipeline, canonical(case, pipeline), reference, case.setup_kwargs)
    if not np.array_equal(latent, expected_latent):
        diff = float(np.abs(latent - expected_latent).max())
        return _fail("wrong_result", f"{where}: latent differs from the dense float32 version by {diff:.3g}")
    return "works"


def _fail(kind: str, message: str) -> str:
    FAILURES.append(message)
    return kind


@pytest.fixture(scope="module")
def reference() -> atlasmap.SCVI:
    """A trained reference on clean data: genes g0..g7, batches b0/b1, donors d0/d1, score."""
    rng = np.random.default_rng(1)
    n = 60
    adata = ad.AnnData(rng.poisson(3.0, (n, N_GENES)).astype(np.float32) + np.eye(1, N_GENES, dtype=np.float32),
                       obs=pd.DataFrame({"batch": pd.Categorical(rng.choice(REF_BATCHES, n)),
                                         "donor": pd.Categorical(rng.choice(REF_DONORS, n)),
                                         "score": rng.normal(size=n)},
                                        index=[f"r{i}" for i in range(n)]),
                       var=pd.DataFrame(index=list(GENES)))
    model = atlasmap.SCVI(adata, batch_key="batch", categorical_covariate_keys=["donor"],
                          continuous_covariate_keys=["score"], use_batch_norm="both", use_layer_norm="none", **ARCH)
    return model.train(2, batch_size=16, progress_bar=False)


# ------------------------------------------------------------------------------------------ tests
@FUZZ
@given(case=cases())
def test_malformed_anndata_works_or_fails_clearly(case: Case, reference: atlasmap.SCVI) -> None:
    COUNTS["inputs"] += 1
    outcomes = {p: _classify(case, p, reference) for p in ("setup", "embed", "query")}
    for pipeline, outcome in outcomes.items():
        COUNTS[f"runs:{outcome}"] += 1
        COUNTS[f"{pipeline}:{outcome}"] += 1
    bad = {p: o for p, o in outcomes.items() if o not in ("works", "clear_error")}
    assert not bad, "\n".join(FAILURES[-len(bad):])


_DTYPES = st.sampled_from([np.float16, np.float32, np.float64, np.int8, np.int16, np.int32, np.int64, np.uint8,
                           np.uint16, np.uint32, np.uint64, np.bool_, np.complex64, np.complex128])
_FORMATS = ("dense", "csr", "csc", "coo", "csr_array", "csc_array", "coo_array", "lil", "dok", "bsr")


@FUZZ
@given(values=hnp.arrays(_DTYPES, hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=6),
                         elements={"allow_subnormal": True}),
       fmt=st.sampled_from(_FORMATS), index64=st.booleans())
def test_get_counts_on_arbitrary_arrays(values: np.ndarray, fmt: str, index64: bool) -> None:
    """Any numeric array in any scipy format: exact float32 CSR of the values, or a clear InputError."""
    COUNTS["get_counts:inputs"] += 1
    if fmt == "dense":
        matrix: Any = values
    else:
        if values.dtype == np.float16:
            values = values.astype(np.float32)  # scipy.sparse has no float16
        matrix = getattr(sp, f"{fmt}_matrix" if not fmt.endswith("_array") else fmt)(values)
        if index64 and hasattr(matrix, "indices"):
            matrix.indices, matrix.indptr = matrix.indices.astype(np.int64), matrix.indptr.astype(np.int64)
    stand_in = SimpleNamespace(X=matrix, layers={}, obs_names=pd.Index([f"c{i}" for i in range(values.shape[0])]),
                               var_names=pd.Index([f"g{j}" for j in range(values.shape[1])]))
    arrays = {a: getattr(matrix, a).copy() for a in ("data", "indices", "indptr", "row", "col", "coords")
              if isinstance(getattr(matrix, a, None), np.ndarray) and getattr(matrix, a).dtype != object}
    before = (matrix.copy(), values.copy(), arrays)
    problems = {"dtype"} if values.dtype.kind == "c" else _matrix_problems(values.astype(np.float64),
                                                                           values.dtype.name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # e.g. a ComplexWarning would mean data is silently discarded
            csr = get_counts(stand_in, None)
        outcome = "works"
    except AtlasmapError as err:
        outcome = "clear_error"
        assert problems, f"{fmt} {values.dtype}: unexpected error {err}"
        assert any(re.search(PROBLEMS[p], str(err)) for p in problems), f"{fmt} {values.dtype}: {err}"
    except Exception as err:  # noqa: BLE001
        COUNTS["get_counts:crash"] += 1
        FAILURES.append(f"get_counts {fmt} {values.dtype}: {type(err).__name__}: {err}")
        raise
    COUNTS[f"get_counts:{outcome}"] += 1
    if outcome == "works":
        assert not problems, f"{fmt} {values.dtype}: should have refused {problems}"
        assert isinstance(csr, sp.csr_matrix) and csr.dtype == np.float32
        assert np.array_equal(csr.toarray(), values.astype(np.float32))
        assert csr.has_canonical_format
    # the input matrix is untouched
    if sp.issparse(matrix):
        assert type(matrix) is type(before[0])
        assert matrix.dtype == before[0].dtype
        assert np.array_equal(matrix.toarray(), before[0].toarray(), equal_nan=True)
        for attr, saved in before[2].items():
            now = getattr(matrix, attr)
            assert now.dtype == saved.dtype, f"{attr} dtype changed"
            assert np.array_equal(now, saved, equal_nan=attr == "data" and saved.dtype.kind in "fc"), f"{attr} changed"
    else:
        assert np.array_equal(matrix, before[0], equal_nan=True)
    assert np.array_equal(values, before[1], equal_nan=True)


def test_zz_report_counts() -> None:
    """Print (and optionally write) the outcome counts of the property tests above; 0 failures required."""
    inputs = COUNTS["inputs"]
    runs = sum(v for k, v in COUNTS.items() if k.startswith("runs:"))
    clear = COUNTS["runs:clear_error"]
    works = COUNTS["runs:works"]
    failures = runs - clear - works
    report = {
        "anndata_inputs": inputs, "pipeline_runs": runs, "works_verified": works, "clear_errors": clear,
        "failures": failures, "crashes": COUNTS["runs:crash"],
        "per_pipeline": {k: v for k, v in sorted(COUNTS.items())
                     if ":" in k and not k.startswith(("runs:", "get_", "named:"))},
    "errors_naming": {k[6:]: v for k, v in sorted(COUNTS.items()) if k.startswith("named:")},
        "get_counts_inputs": COUNTS["get_counts:inputs"], "get_counts_works": COUNTS["get_counts:works"],
        "get_counts_clear_errors": COUNTS["get_counts:clear_error"], "get_counts_crashes": COUNTS["get_counts:crash"],
    }
    print("\nfuzz report:", json.dumps(report, indent=1))
    if os.environ.get("ATLASMAP_FUZZ_REPORT"):
        with open(os.environ["ATLASMAP_FUZZ_REPORT"], "w", encoding="utf-8") as fh:
            json.dump({**report, "failure_messages": FAILURES[:200]}, fh, indent=1)
    if inputs:  # the property tests ran in this session
        assert failures == 0 and COUNTS["get_counts:crash"] == 0, "\n".join(FAILURES[:10])
