#!/usr/bin/env python
"""Static architecture report and layering contract for a Python package (stdlib only).

Run it from the repository root::

    python scripts/arch_report.py                 # the target layer map, src/atlasmap
    python scripts/arch_report.py --legacy        # today's module names mapped to the nearest layer
    python scripts/arch_report.py --json          # machine-readable
    python scripts/arch_report.py --layers my_layers.json --strict-typing

or import it (``tests/test_architecture.py`` loads it by path) and call :func:`check`, which returns the
contract violations as human-readable strings (empty list: the contract holds).

What is measured (all with :mod:`ast`; nothing is imported or executed):

* own-package import edges ``module -> module``. Each edge comes from one import *statement* and has a
  ``kind``:

  - ``top``: executed when the importing module is imported (module level, class bodies, ``if``/``try``
    blocks at module level, ``if __name__ == "__main__":`` included);
  - ``local``: inside a function or method body;
  - ``typing``: inside an ``if TYPE_CHECKING:`` block (never executed);
  - ``dynamic``: ``importlib.import_module("pkg.x")`` / ``import_module(...)`` / ``__import__(...)`` with a
    string-literal argument;
  - ``lazy``: a string literal naming an own-package module inside a dict value (a tuple or a plain string),
    e.g. the ``_LAZY = {"SCVI": ("atlasmap.models.scvi", "SCVI")}`` table of a lazy ``__getattr__`` façade.

  ``from pkg.x import y`` resolves to ``pkg.x.y`` when that is a submodule (``x/y.py``, ``x/y/__init__.py``
  or a compiled ``x/y.*.so``/``.pyd``/``.pyi``) and to ``pkg.x`` otherwise; one statement can therefore yield
  several edges (``from pkg.nn import kernel, layers``), each counted once per statement. Relative imports
  are resolved against the importing module's package. Parent-package ``__init__`` modules that Python runs
  implicitly are *not* edges (the usual convention of import-linter, pydeps, ...).

* the runtime graph: ``top`` + ``local`` + ``dynamic`` edges (``typing`` never runs; ``lazy`` entries are
  declarations that run only through the façade's ``__getattr__``, and are reported on their own). A module
  importing itself (``python -m pkg.mod`` re-importing its canonical instance) is a self-import, listed but
  not a cycle. Cycles are the strongly connected components (Tarjan) with more than one module.

* the function-local share: ``local`` (statement, module) pairs / (``top`` + ``local``) pairs.
  ``typing``, ``dynamic`` and ``lazy`` are not import statements that run at import time and are left out of
  both numerator and denominator.

* lines of code: non-blank lines that carry at least one token other than a comment (found with
  :mod:`tokenize`); docstrings and other strings therefore count as code, blank lines inside them do not.

* layering: each module gets the rank of the most specific matching pattern of the layer map; importing a
  module of a higher rank is an *upward* import (``top``, ``local``, ``dynamic`` and ``lazy`` edges; ``typing``
  edges only with ``strict_typing``). Same-rank imports are allowed; the cycle check keeps them acyclic.

* protocol probes: every ``hasattr(...)`` / ``getattr(...)`` call, with its first argument and the attribute
  name when it is a string literal.

The contract (:func:`check`): no import cycle; no upward import; no import of the root package (the lazy
façade) from inside the package; no module without a layer; function-local share at most 15 %.
"""

from __future__ import annotations

import argparse
import ast
import fnmatch
import io
import json
import sys
import tokenize
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

#: A layer map: rank -> module patterns. A pattern matches the module it names and every submodule of it
#: (``"atlasmap.data"`` matches ``atlasmap.data`` and ``atlasmap.data.loader``); a pattern with ``*``, ``?``
#: or ``[`` is an :mod:`fnmatch` glob (``"atlasmap.models.*_module"``), also matching submodules of what it
#: matches; a pattern starting with ``=`` matches only the module it names. The root package's own name
#: (``"atlasmap"``) always matches only the root package: otherwise every module would be mapped. When
#: several patterns match, the most specific (longest, wildcards not counted) wins.
LayerMap = Mapping[int, Sequence[str]]

#: The target layering of the re-architected package (lower ranks may not import higher ones).
TARGET_LAYERS: dict[int, list[str]] = {
    0: ["atlasmap._version", "atlasmap.errors", "atlasmap.protocols", "atlasmap.runtime"],
    1: ["atlasmap.ops"],
    2: ["atlasmap.nn"],
    3: ["atlasmap.data", "atlasmap.datasets"],
    4: ["atlasmap.modules"],
    5: ["atlasmap.training"],
    6: ["atlasmap.surgery"],
    7: ["atlasmap.io"],
    8: ["atlasmap.models"],
    9: ["atlasmap.workflow"],
    10: ["atlasmap.cli", "atlasmap.distributed", "atlasmap.__main__"],
    11: ["atlasmap"],  # the package __init__: the lazy façade; nothing inside the package may import it
}

#: Today's (pre-redesign) modules, each assigned to the nearest target layer, for "before" numbers.
LEGACY_LAYERS: dict[int, list[str]] = {
    0: ["atlasmap.errors"],
    1: ["atlasmap.nn.kernel"],
    2: ["atlasmap.nn"],
    3: ["atlasmap.data", "atlasmap.datasets"],
    4: ["atlasmap.models.*_module", "atlasmap.models.fused_step"],
    5: ["atlasmap.train", "atlasmap.optim", "atlasmap.distributed"],
    6: ["atlasmap.surgery"],
    7: ["atlasmap.io", "atlasmap.interop"],
    8: ["atlasmap.models", "atlasmap.models.base", "atlasmap.models.scvi", "atlasmap.models.scanvi",
        "atlasmap.models.totalvi"],
    9: ["atlasmap.mapping", "atlasmap.streaming", "atlasmap.knn", "atlasmap.metrics", "atlasmap.report",
        "atlasmap.plots"],
    10: ["atlasmap.cli"],
    11: ["atlasmap"],
}

#: Largest allowed share of own-package import statements made inside functions.
MAX_LOCAL_SHARE = 0.15

#: Edge kinds that run when the importer is imported or called (the graph the cycle check uses).
RUNTIME_KINDS = frozenset({"top", "local", "dynamic"})
#: Edge kinds that are import statements executed at runtime (the local-share denominator).
STATEMENT_KINDS = frozenset({"top", "local"})

_DEFAULT_SRC = Path("src") / "atlasmap"
_EXTENSION_SUFFIXES = (".pyi", ".pyd", ".so")


# --------------------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Edge:
    """One own-package import: ``importer`` imports ``target`` at ``file:line``.

    Attributes
    ----------
    importer, target
        Dotted module names (``target`` is the resolved module, see the module docstring).
    kind
        ``top``, ``local``, ``typing``, ``dynamic`` or ``lazy``.
    file, line
        Where the statement is (``file`` relative to the analysed tree's parent).
    stmt
        Index of the statement in the importer (edges of one statement share it).
    name
        What the source spells (``atlasmap.nn.kernel``, ``.registry``, ``atlasmap.models.scvi``).
    function
        Qualified name of the enclosing function for ``local`` (and local ``dynamic``) edges, else ``""``.
    """

    importer: str
    target: str
    kind: str
    file: str
    line: int
    stmt: int
    name: str
    function: str = ""

    @property
    def in_function(self) -> bool:
        """Whether the import runs inside a function body."""
        return bool(self.function)

    @property
    def where(self) -> str:
        """``file:line``."""
        return f"{self.file}:{self.line}"


@dataclass(frozen=True)
class Probe:
    """A ``hasattr``/``getattr`` call (a structural "protocol probe")."""

    module: str
    file: str
    line: int
    func: str
    obj: str
    attr: str | None
    function: str = ""

    @property
    def where(self) -> str:
        """``file:line``."""
        return f"{self.file}:{self.line}"


@dataclass
class ModuleInfo:
    """One module of the analysed tree."""

    name: str
    file: str
    loc: int
    rank: int | None = None


@dataclass
class Analysis:
    """Everything the report prints; :meth:`to_json` gives the ``--json`` form."""

    package: str
    src: str
    layers_name: str
    layers: dict[int, list[str]]
    strict_typing: bool
    modules: dict[str, ModuleInfo]
    edges: list[Edge]
    probes: list[Probe]
    errors: list[str] = field(default_factory=list)
    unresolved: list[str] = field(default_factory=list)

    # ---- derived views

    def edges_of(self, kinds: Iterable[str]) -> list[Edge]:
        """The edges whose kind is in ``kinds``."""
        ks = set(kinds)
        return [e for e in self.edges if e.kind in ks]

    def graph(self) -> dict[str, set[str]]:
        """Runtime adjacency (self-imports dropped), over every module of the tree."""
        adj: dict[str, set[str]] = {m: set() for m in self.modules}
        for e in self.edges_of(RUNTIME_KINDS):
            if e.importer != e.target:
                adj.setdefault(e.importer, set()).add(e.target)
                adj.setdefault(e.target, set())
        return adj

    def cycles(self) -> list[list[str]]:
        """Strongly connected components with more than one module, largest first."""
        sccs = [sorted(c) for c in tarjan_scc(self.graph()) if len(c) > 1]
        return sorted(sccs, key=lambda c: (-len(c), c))

    def cycle_edges(self, members: Iterable[str]) -> list[Edge]:
        """The runtime import statements between members of one SCC."""
        ms = set(members)
        return sorted((e for e in self.edges_of(RUNTIME_KINDS)
                       if e.importer in ms and e.target in ms and e.importer != e.target),
                      key=_edge_key)

    def self_imports(self) -> list[Edge]:
        """Runtime imports of a module by itself."""
        return [e for e in self.edges_of(RUNTIME_KINDS) if e.importer == e.target]

    def local_share(self) -> tuple[int, int]:
        """(function-local, all) own-package (statement, module) pairs of ``top``/``local`` imports."""
        st = self.edges_of(STATEMENT_KINDS)
        return sum(e.kind == "local" for e in st), len(st)

    def local_share_by_module(self) -> dict[str, tuple[int, int]]:
        """:meth:`local_share` per importing module (modules without own-package imports left out)."""
        out: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for e in self.edges_of(STATEMENT_KINDS):
            out[e.importer][1] += 1
            out[e.importer][0] += e.kind == "local"
        return {m: (v[0], v[1]) for m, v in sorted(out.items())}

    def rank(self, module: str) -> int | None:
        """The layer rank of ``module`` (``None``: unmapped)."""
        info = self.modules.get(module)
        if info is not None:
            return info.rank
        return layer_rank(module, self.layers, self.package)

    def layering_kinds(self) -> set[str]:
        """Edge kinds the layering check judges."""
        return {"top", "local", "dynamic", "lazy"} | ({"typing"} if self.strict_typing else set())

    def upward(self) -> list[Edge]:
        """Imports of a higher-ranked module (edges with an unmapped end are not judged here)."""
        out = []
        for e in self.edges_of(self.layering_kinds()):
            r, r2 = self.rank(e.importer), self.rank(e.target)
            if r is not None and r2 is not None and r2 > r:
                out.append(e)
        return sorted(out, key=_edge_key)

    def root_imports(self) -> list[Edge]:
        """Imports of the root package (the façade) from its own submodules."""
        return sorted((e for e in self.edges_of(self.layering_kinds())
                       if e.target == self.package and e.importer != self.package), key=_edge_key)

    def unmapped(self) -> list[str]:
        """Modules of the tree (and import targets outside it) that no layer pattern matches."""
        names = set(self.modules) | {e.target for e in self.edges}
        return sorted(m for m in names if self.rank(m) is None)

    def loc_by_layer(self) -> dict[str, tuple[int, int]]:
        """``{rank or "unmapped": (modules, LOC)}``, by rank."""
        acc: dict[int | None, list[int]] = defaultdict(lambda: [0, 0])
        for info in self.modules.values():
            acc[info.rank][0] += 1
            acc[info.rank][1] += info.loc
        keys = sorted(k for k in acc if k is not None) + ([None] if None in acc else [])
        return {("unmapped" if k is None else str(k)): (acc[k][0], acc[k][1]) for k in keys}

    def violations(self, max_local_share: float = MAX_LOCAL_SHARE) -> list[str]:
        """The contract violations (see :func:`check`)."""
        out: list[str] = []
        for members in self.cycles():
            out.append(f"import cycle of {len(members)} modules: {', '.join(members)}")
        for e in self.upward():
            out.append(f"upward import {e.where}: {e.importer} (rank {self.rank(e.importer)}) -> "
                       f"{e.target} (rank {self.rank(e.target)}) [{e.kind}]")
        for e in self.root_imports():
            out.append(f"import of the package façade {e.where}: {e.importer} -> {e.target} [{e.kind}]")
        for m in self.unmapped():
            out.append(f"unmapped module (no layer): {m}")
        local, total = self.local_share()
        if total and local / total > max_local_share:
            out.append(f"function-local own-package imports {local}/{total} = {100 * local / total:.1f} % "
                       f"> {100 * max_local_share:.0f} %")
        out.extend(f"cannot analyse: {p}" for p in self.errors)
        return out

    def to_json(self, max_local_share: float = MAX_LOCAL_SHARE) -> dict[str, Any]:
        """A JSON-serialisable summary with every list the text report prints."""
        local, total = self.local_share()

        def edge(e: Edge) -> dict[str, Any]:
            return asdict(e)

        edge_counts: dict[tuple[str, str], dict[str, int]] = defaultdict(lambda: defaultdict(int))
        for e in self.edges:
            edge_counts[(e.importer, e.target)][e.kind] += 1
        return {
            "package": self.package,
            "src": self.src,
            "layers_name": self.layers_name,
            "layers": {str(k): v for k, v in sorted(self.layers.items())},
            "strict_typing": self.strict_typing,
            "modules": {m: asdict(i) for m, i in sorted(self.modules.items())},
            "edges": [{"importer": a, "target": b, "kinds": dict(k)} for (a, b), k in sorted(edge_counts.items())],
            "imports": [edge(e) for e in sorted(self.edges, key=_edge_key)],
            "counts": {k: len(self.edges_of([k])) for k in ("top", "local", "typing", "dynamic", "lazy")},
            "cycles": [{"size": len(c), "members": c, "edges": [edge(e) for e in self.cycle_edges(c)]}
                       for c in self.cycles()],
            "self_imports": [edge(e) for e in self.self_imports()],
            "local_share": {"local": local, "total": total, "share": local / total if total else 0.0,
                            "by_module": {m: {"local": a, "total": b, "share": a / b if b else 0.0}
                                          for m, (a, b) in self.local_share_by_module().items()}},
            "loc": {"by_layer": {k: {"modules": n, "loc": c} for k, (n, c) in self.loc_by_layer().items()},
                    "by_file": {i.file: i.loc for i in sorted(self.modules.values(), key=lambda i: i.file)},
                    "total": sum(i.loc for i in self.modules.values()),
                    "note": "non-blank lines with a non-comment token; docstrings count as code"},
            "upward": [edge(e) for e in self.upward()],
            "root_imports": [edge(e) for e in self.root_imports()],
            "unmapped": self.unmapped(),
            "probes": {"total": len(self.probes),
                       "by_module": _count_by(p.module for p in self.probes),
                       "calls": [asdict(p) for p in self.probes]},
            "errors": self.errors,
            "unresolved": self.unresolved,
            "violations": self.violations(max_local_share),
        }


def _edge_key(e: Edge) -> tuple[str, int, str]:
    return (e.file, e.line, e.target)


def _count_by(items: Iterable[str]) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for x in items:
        out[x] += 1
    return dict(sorted(out.items()))


# ------------------------------------------------------------------------------------------ layer maps


def _pattern_specificity(pattern: str) -> int:
    return len(pattern.lstrip("=")) - sum(pattern.count(c) for c in "*?[]")


def _pattern_matches(module: str, pattern: str, package: str) -> bool:
    if pattern.startswith("="):
        return module == pattern[1:]
    if pattern == package:
        return module == package
    if any(c in pattern for c in "*?["):
        parts = module.split(".")
        return any(fnmatch.fnmatchcase(".".join(parts[:i]), pattern) for i in range(1, len(parts) + 1))
    return module == pattern or module.startswith(pattern + ".")


def layer_rank(module: str, layers: LayerMap, package: str) -> int | None:
    """The rank of ``module``: that of the most specific matching pattern (``None``: unmapped)."""
    best: tuple[int, int] | None = None  # (specificity, -rank): ties go to the lower rank
    for rank, patterns in layers.items():
        for p in patterns:
            if _pattern_matches(module, p, package):
                cand = (_pattern_specificity(p), -int(rank))
                if best is None or cand > best:
                    best = cand
    return None if best is None else -best[1]


def load_layers(path: str | Path) -> dict[int, list[str]]:
    """Read a layer map from JSON: ``{"0": ["pkg.errors", ...], "1": [...], ...}``."""
    raw = json.loads(Path(path).read_text())
    if isinstance(raw, dict) and "layers" in raw and isinstance(raw["layers"], dict):
        raw = raw["layers"]
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected an object mapping rank -> list of module patterns")
    out: dict[int, list[str]] = {}
    for k, v in raw.items():
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise ValueError(f"{path}: layer {k!r} must be a list of module patterns")
        out[int(k)] = list(v)
    return out


# ------------------------------------------------------------------------------------------ discovery


def discover_modules(src: Path) -> dict[str, Path]:
    """``{dotted name: file}`` for every ``.py`` file under the package directory ``src``."""
    src = Path(src)
    package = src.name
    out: dict[str, Path] = {}
    for path in sorted(src.rglob("*.py")):
        rel = path.relative_to(src)
        if any(part == "__pycache__" or not part.isidentifier() for part in rel.parts[:-1]):
            continue
        parts = [package, *rel.parts[:-1]]
        if rel.stem != "__init__":
            parts.append(rel.stem)
        out[".".join(parts)] = path
    return out


def count_loc(text: str) -> int:
    """Non-blank lines carrying a token that is not a comment (docstrings count; see module docstring)."""
    lines = text.splitlines()
    code: set[int] = set()
    skip = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
            tokenize.ENCODING, tokenize.ENDMARKER}
    try:
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            if tok.type not in skip:
                code.update(range(tok.start[0], tok.end[0] + 1))
    except (tokenize.TokenError, SyntaxError):
        return sum(1 for ln in lines if ln.strip() and not ln.lstrip().startswith("#"))
    return sum(1 for n in code if 0 < n <= len(lines) and lines[n - 1].strip())


# --------------------------------------------------------------------------------------------- visitor


def _is_type_checking(test: ast.expr) -> bool:
    if isinstance(test, ast.Name):
        return test.id == "TYPE_CHECKING"
    return isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"


class _ModuleVisitor(ast.NodeVisitor):
    """Collects the import statements, dynamic imports, lazy tables and probes of one module."""

    def __init__(self, module: str, is_package: bool, file: str, known: set[str], extensions: set[str],
                 package: str) -> None:
        self.module = module
        self.is_package = is_package
        self.file = file
        self.known = known
        self.extensions = extensions
        self.package = package
        self.edges: list[Edge] = []
        self.probes: list[Probe] = []
        self.errors: list[str] = []
        self.unresolved: list[str] = []
        self._functions: list[str] = []
        self._scopes: list[str] = []
        self._typing = 0
        self._stmt = 0

    # ---- resolution

    def _is_own(self, name: str) -> bool:
        return name == self.package or name.startswith(self.package + ".")

    def _exists(self, name: str) -> bool:
        return name in self.known or name in self.extensions

    def _resolved(self, name: str, line: int, spelled: str) -> str:
        """``name`` itself; a name that is no module of the tree is kept as spelled and listed."""
        if not self._exists(name):
            self.unresolved.append(f"{self.file}:{line}: {spelled!r} -> no module {name!r} in the tree")
        return name

    def _base_package(self, level: int, lineno: int) -> str | None:
        pkg_parts = self.module.split(".") if self.is_package else self.module.split(".")[:-1]
        if level - 1 > len(pkg_parts) - 1:
            self.errors.append(f"{self.file}:{lineno}: relative import beyond the top-level package")
            return None
        return ".".join(pkg_parts[: len(pkg_parts) - (level - 1)])

    # ---- recording

    def _kind(self) -> str:
        if self._typing:
            return "typing"
        return "local" if self._functions else "top"

    def _add(self, target: str, kind: str, line: int, name: str) -> None:
        self.edges.append(Edge(self.module, target, kind, self.file, line, self._stmt, name,
                               ".".join(self._scopes) if self._functions else ""))

    def _add_targets(self, targets: Iterable[tuple[str, str]], kind: str, line: int) -> None:
        seen: set[str] = set()
        for target, name in targets:
            if target not in seen:  # each module once per statement
                seen.add(target)
                self._add(target, kind, line, name)
        self._stmt += 1

    # ---- scopes

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        for d in node.decorator_list:  # decorators and defaults run in the enclosing scope
            self.visit(d)
        self.visit(node.args)
        if node.returns is not None:
            self.visit(node.returns)
        self._functions.append(node.name)
        self._scopes.append(node.name)
        for stmt in node.body:
            self.visit(stmt)
        self._scopes.pop()
        self._functions.pop()

    visit_AsyncFunctionDef = visit_FunctionDef  # noqa: N815 (ast.NodeVisitor naming)

    def visit_Lambda(self, node: ast.Lambda) -> None:
        self.visit(node.args)
        self._functions.append("<lambda>")
        self._scopes.append("<lambda>")
        self.visit(node.body)
        self._scopes.pop()
        self._functions.pop()

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        for d in [*node.decorator_list, *node.bases, *node.keywords]:
            self.visit(d)
        self._scopes.append(node.name)
        for stmt in node.body:
            self.visit(stmt)
        self._scopes.pop()

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):
            self._typing += 1
            for stmt in node.body:
                self.visit(stmt)
            self._typing -= 1
            for stmt in node.orelse:
                self.visit(stmt)
        else:
            self.generic_visit(node)

    # ---- static imports

    def visit_Import(self, node: ast.Import) -> None:
        targets = [(self._resolved(a.name, node.lineno, f"import {a.name}"), a.name)
                   for a in node.names if self._is_own(a.name)]
        if targets:
            self._add_targets(targets, self._kind(), node.lineno)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            base = self._base_package(node.level, node.lineno)
            if base is None:
                return
            mod = f"{base}.{node.module}" if node.module else base
            spelled = "." * node.level + (node.module or "")
        else:
            if node.module is None or not self._is_own(node.module):
                return
            mod, spelled = node.module, node.module
        targets: list[tuple[str, str]] = []
        for alias in node.names:
            sub = f"{mod}.{alias.name}"
            if alias.name != "*" and self._exists(sub):
                targets.append((sub, f"{spelled}.{alias.name}" if spelled.strip(".") else spelled + alias.name))
            else:
                targets.append((self._resolved(mod, node.lineno, f"from {spelled} import {alias.name}"), spelled))
        self._add_targets(targets, self._kind(), node.lineno)

    # ---- dynamic imports, probes

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        fname = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
        if fname in ("import_module", "__import__") and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                name = arg.value
                if name.startswith(".") and fname == "import_module":
                    pkg_kw = next((k.value for k in node.keywords if k.arg == "package"), None)
                    if len(node.args) > 1:
                        pkg_kw = node.args[1]
                    level = len(name) - len(name.lstrip("."))
                    if isinstance(pkg_kw, ast.Constant) and isinstance(pkg_kw.value, str):
                        parts = pkg_kw.value.split(".")
                        base = ".".join(parts[: len(parts) - (level - 1)])
                    else:
                        base = self._base_package(level, node.lineno) or ""
                    rest = name.lstrip(".")
                    name = f"{base}.{rest}" if rest else base
                if self._is_own(name):
                    kind = "typing" if self._typing else "dynamic"
                    target = self._resolved(name, node.lineno, f"{fname}({arg.value!r})")
                    self._add_targets([(target, arg.value)], kind, node.lineno)
        if isinstance(func, ast.Name) and func.id in ("hasattr", "getattr") and node.args:
            attr = node.args[1] if len(node.args) > 1 else None
            self.probes.append(Probe(
                self.module, self.file, node.lineno, func.id, ast.unparse(node.args[0]),
                attr.value if isinstance(attr, ast.Constant) and isinstance(attr.value, str) else None,
                ".".join(self._scopes)))
        self.generic_visit(node)

    def visit_Dict(self, node: ast.Dict) -> None:
        for value in node.values:
            elts = value.elts if isinstance(value, ast.Tuple | ast.List) else [value]
            # heuristic: only strings naming an existing submodule exactly (not the root package)
            names = [e.value for e in elts if isinstance(e, ast.Constant) and isinstance(e.value, str)
                     and e.value != self.package and self._is_own(e.value) and self._exists(e.value)]
            if names:
                self._add_targets([(n, n) for n in names], "lazy", value.lineno)
        self.generic_visit(node)


def _find_extensions(src: Path) -> set[str]:
    """Compiled extension modules and stubs (``x.cpython-311-x86_64-linux-gnu.so``, ``x.pyd``, ``x.pyi``)."""
    out: set[str] = set()
    for path in src.rglob("*"):
        if path.suffix in _EXTENSION_SUFFIXES and "__pycache__" not in path.parts:
            rel = path.relative_to(src)
            stem = path.name.split(".")[0]
            parts = [src.name, *rel.parts[:-1]]
            if stem != "__init__":
                parts.append(stem)
            out.add(".".join(parts))
    return out


# ------------------------------------------------------------------------------------------- analysis


def analyse(src: str | Path = _DEFAULT_SRC, layers: LayerMap | None = None, *, layers_name: str = "",
            strict_typing: bool = False) -> Analysis:
    """Analyse the package directory ``src`` (its name is the package name) against a layer map.

    ``layers`` defaults to :data:`TARGET_LAYERS`; ``strict_typing`` makes ``TYPE_CHECKING`` imports count
    for the layering check.
    """
    src = Path(src).resolve()
    if not (src / "__init__.py").is_file():
        raise FileNotFoundError(f"{src} is not a package directory (no __init__.py)")
    package = src.name
    layer_map = {int(k): list(v) for k, v in (TARGET_LAYERS if layers is None else layers).items()}
    files = discover_modules(src)
    extensions = _find_extensions(src) - set(files)
    known = set(files)
    modules: dict[str, ModuleInfo] = {}
    edges: list[Edge] = []
    probes: list[Probe] = []
    errors: list[str] = []
    unresolved: list[str] = []
    for name, path in files.items():
        rel = path.relative_to(src.parent).as_posix()
        text = path.read_text(encoding="utf-8")
        modules[name] = ModuleInfo(name, rel, count_loc(text), layer_rank(name, layer_map, package))
        try:
            tree = ast.parse(text, filename=str(path))
        except SyntaxError as exc:
            errors.append(f"{rel}:{exc.lineno}: syntax error: {exc.msg}")
            continue
        v = _ModuleVisitor(name, path.name == "__init__.py", rel, known, extensions, package)
        v.visit(tree)
        edges.extend(v.edges)
        probes.extend(v.probes)
        errors.extend(v.errors)
        unresolved.extend(v.unresolved)
    return Analysis(package, str(src), layers_name or ("target" if layers is None else "custom"), layer_map,
                    strict_typing, modules, edges, probes, errors, unresolved)


def check(src: str | Path = _DEFAULT_SRC, layers: LayerMap | None = None, *, strict_typing: bool = False,
          max_local_share: float = MAX_LOCAL_SHARE) -> list[str]:
    """The layering-contract violations of the package at ``src`` (empty: the contract holds).

    Violations: any runtime import cycle; any upward import (function-local and dynamic ones included;
    ``TYPE_CHECKING``-only ones only when ``strict_typing``); any import of the root package (the lazy
    façade) from one of its submodules; any module the layer map does not cover; a share of function-local
    own-package imports above ``max_local_share``; any file that cannot be parsed or import that cannot be
    resolved.
    """
    return analyse(src, layers, strict_typing=strict_typing).violations(max_local_share)


def tarjan_scc(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """Strongly connected components of ``graph`` (Tarjan, iterative; deterministic order)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    adj = {v: sorted(ws) for v, ws in graph.items()}
    for root in sorted(adj):
        if root in index:
            continue
        work: list[tuple[str, int]] = [(root, 0)]
        while work:
            v, i = work.pop()
            if i == 0:
                index[v] = low[v] = counter
                counter += 1
                stack.append(v)
                on_stack.add(v)
            succ = adj.get(v, [])
            if i < len(succ):
                work.append((v, i + 1))
                w = succ[i]
                if w not in index:
                    work.append((w, 0))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                out.append(comp)
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[v])
    return out


# --------------------------------------------------------------------------------------------- report


def _pct(a: int, b: int) -> str:
    return f"{a}/{b} = {100 * a / b:.1f} %" if b else "0/0"


def format_report(a: Analysis, max_local_share: float = MAX_LOCAL_SHARE) -> str:
    """The human-readable report."""
    out: list[str] = []
    w = out.append
    local, total = a.local_share()
    cycles = a.cycles()
    upward = a.upward()
    violations = a.violations(max_local_share)
    counts = {k: len(a.edges_of([k])) for k in ("top", "local", "typing", "dynamic", "lazy")}
    unique_runtime = {(e.importer, e.target) for e in a.edges_of(RUNTIME_KINDS) if e.importer != e.target}
    loc_total = sum(i.loc for i in a.modules.values())

    w(f"Architecture report: package {a.package!r} at {a.src}")
    w(f"layer map: {a.layers_name}; strict typing: {'yes' if a.strict_typing else 'no'}; "
      f"{len(a.modules)} modules, {loc_total} LOC")
    w("")
    w("== Summary")
    w(f"  own-package imports (one per statement and imported module): top-level {counts['top']}, "
      f"function-local {counts['local']}, TYPE_CHECKING-only {counts['typing']}, dynamic {counts['dynamic']}, "
      f"lazy {counts['lazy']}")
    w(f"  distinct runtime edges (module -> module): {len(unique_runtime)}")
    w(f"  import cycles (SCCs > 1 module): {len(cycles)}"
      + (f"; sizes {', '.join(str(len(c)) for c in cycles)}" if cycles else ""))
    w(f"  function-local share of own-package imports: {_pct(local, total)} (limit {100 * max_local_share:.0f} %)")
    by_kind = _count_by(e.kind for e in upward)
    w(f"  upward imports: {len(upward)}"
      + (f" ({', '.join(f'{k} {n}' for k, n in by_kind.items())})" if upward else ""))
    w(f"  imports of the package façade {a.package!r} from inside: {len(a.root_imports())}")
    w(f"  unmapped modules: {len(a.unmapped())}")
    w(f"  hasattr/getattr probes: {len(a.probes)} "
      f"(hasattr {sum(p.func == 'hasattr' for p in a.probes)}, getattr {sum(p.func == 'getattr' for p in a.probes)})")
    w(f"  contract: {'OK' if not violations else f'FAIL, {len(violations)} violations'}")

    w("")
    w("== Import cycles (Tarjan SCCs of the runtime graph: top-level + local + dynamic)")
    if not cycles:
        w("  none")
    for n, members in enumerate(cycles, 1):
        w(f"  SCC {n}: {len(members)} modules")
        for m in members:
            w(f"    {m}  (rank {_rank_str(a.rank(m))})")
        ce = a.cycle_edges(members)
        w(f"    edges inside ({len(ce)} statements, "
          f"{len({(e.importer, e.target) for e in ce})} distinct; local {sum(e.kind == 'local' for e in ce)}):")
        for e in ce:
            w(f"      {e.importer} -> {e.target}  {e.where}  {e.kind}"
              + (f" in {e.function}" if e.function else ""))
    selfs = a.self_imports()
    if selfs:
        w("  self-imports (not cycles):")
        for e in selfs:
            w(f"    {e.importer}  {e.where}  {e.kind}")

    w("")
    w("== Function-local own-package imports (per statement and imported module)")
    w(f"  overall: {_pct(local, total)}")
    w("  per module (local/all):")
    for m, (lo, to) in a.local_share_by_module().items():
        w(f"    {m:<34} {lo:>3}/{to:<3} {100 * lo / to:5.1f} %")
    w("  local imports:")
    for e in sorted(a.edges_of(["local"]), key=_edge_key):
        w(f"    {e.where:<36} {e.importer} -> {e.target}  (in {e.function})")

    w("")
    w("== Lines of code (non-blank lines with a non-comment token; docstrings count as code)")
    w("  per layer:")
    for k, (n, c) in a.loc_by_layer().items():
        w(f"    rank {k:>8}: {c:>6} LOC in {n:>2} modules  {_layer_patterns(a, k)}")
    w(f"    {'total':>13}: {loc_total:>6}")
    w("  per file:")
    for info in sorted(a.modules.values(), key=lambda i: i.file):
        w(f"    {info.file:<40} {info.loc:>6}  rank {_rank_str(info.rank)}")

    w("")
    w("== Layering")
    w("  module ranks:")
    for info in sorted(a.modules.values(), key=lambda i: (i.rank if i.rank is not None else 99, i.name)):
        w(f"    {_rank_str(info.rank):>8}  {info.name}")
    w(f"  upward imports ({len(upward)}; kinds judged: {', '.join(sorted(a.layering_kinds()))}):")
    for e in upward:
        w(f"    {e.where:<36} {e.importer} ({a.rank(e.importer)}) -> {e.target} ({a.rank(e.target)})  {e.kind}")
    roots = a.root_imports()
    if roots:
        w(f"  imports of the package façade {a.package!r}:")
        for e in roots:
            w(f"    {e.where:<36} {e.importer} -> {e.target}  {e.kind}")
    um = a.unmapped()
    w(f"  unmapped modules ({len(um)}): {', '.join(um) if um else 'none'}")

    w("")
    w("== TYPE_CHECKING-only imports (not runtime edges)")
    typ = sorted(a.edges_of(["typing"]), key=_edge_key)
    for e in typ:
        r, r2 = a.rank(e.importer), a.rank(e.target)
        up = "  (upward)" if r is not None and r2 is not None and r2 > r else ""
        w(f"    {e.where:<36} {e.importer} -> {e.target}{up}")
    if not typ:
        w("  none")
    w("== Dynamic (string-literal) and lazy imports")
    dyn = sorted(a.edges_of(["dynamic", "lazy"]), key=_edge_key)
    for e in dyn:
        w(f"    {e.where:<36} {e.importer} -> {e.target}  {e.kind}")
    if not dyn:
        w("  none")

    w("")
    w(f"== hasattr/getattr probes ({len(a.probes)})")
    for m, n in _count_by(p.module for p in a.probes).items():
        w(f"    {m:<34} {n}")
    w("  calls:")
    for p in a.probes:
        attr = repr(p.attr) if p.attr is not None else "<dynamic>"
        w(f"    {p.where:<36} {p.func}({p.obj}, {attr})" + (f"  in {p.function}" if p.function else ""))

    w("")
    w("== Edges (importer -> target: statements by kind)")
    ec: dict[tuple[str, str], dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for e in a.edges:
        ec[(e.importer, e.target)][e.kind] += 1
    for (src, dst), kinds in sorted(ec.items()):
        w(f"    {src} -> {dst}  [{', '.join(f'{k}x{v}' for k, v in sorted(kinds.items()))}]")

    if a.unresolved or a.errors:
        w("")
        w("== Analysis problems (errors are violations; unresolved names are only listed)")
        for p in a.errors:
            w(f"    error: {p}")
        for p in a.unresolved:
            w(f"    unresolved: {p}")
    w("")
    w(f"== Contract violations ({len(violations)})")
    for v in violations:
        w(f"  - {v}")
    if not violations:
        w("  none")
    return "\n".join(out)


def _rank_str(rank: int | None) -> str:
    return "unmapped" if rank is None else str(rank)


def _layer_patterns(a: Analysis, key: str) -> str:
    if key == "unmapped":
        return ""
    return ", ".join(a.layers.get(int(key), []))


# ------------------------------------------------------------------------------------------------ cli


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; prints the report and returns 0 (``--check``: 1 on violations)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--src", default=str(_DEFAULT_SRC), help="package directory (default: src/atlasmap)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--legacy", action="store_true", help="use the built-in map of today's module names")
    g.add_argument("--layers", metavar="FILE.json", help='layer map {"0": ["pkg.errors", ...], ...}')
    p.add_argument("--strict-typing", action="store_true",
                   help="TYPE_CHECKING-only imports count for the layering check")
    p.add_argument("--max-local-share", type=float, default=MAX_LOCAL_SHARE,
                   help=f"contract limit on function-local imports (default {MAX_LOCAL_SHARE})")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--check", action="store_true", help="exit with status 1 when the contract is violated")
    args = p.parse_args(argv)
    if args.legacy:
        layers, name = LEGACY_LAYERS, "legacy (today's modules -> nearest target layer)"
    elif args.layers:
        layers, name = load_layers(args.layers), f"file {args.layers}"
    else:
        layers, name = TARGET_LAYERS, "target"
    a = analyse(args.src, layers, layers_name=name, strict_typing=args.strict_typing)
    if args.json:
        print(json.dumps(a.to_json(args.max_local_share), indent=2))
    else:
        print(format_report(a, args.max_local_share))
    return 1 if args.check and a.violations(args.max_local_share) else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # `... | head`
        sys.exit(0)
