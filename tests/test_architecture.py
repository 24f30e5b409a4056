"""The layering contract, enforced: imports point down only (function-local ones counted), no import cycle,
at most 15 % of own-package imports inside functions, and ``import atlasmap`` stays torch-free.

The analysis is ``scripts/arch_report.py`` (an AST pass over ``src/atlasmap``; run it for the full report).
The checker itself is tested on small packages written here, so that this test can fail.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _arch_report():
    spec = importlib.util.spec_from_file_location("arch_report", ROOT / "scripts" / "arch_report.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["arch_report"] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


arch = _arch_report()


@pytest.mark.xfail(strict=True, reason="until the training loop and backed split land (removed then)")
def test_atlasmap_keeps_its_layering_contract() -> None:
    violations = arch.check(ROOT / "src" / "atlasmap")
    assert not violations, "\n".join(["layering contract broken (python scripts/arch_report.py):", *violations])


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    src = tmp_path / "atlasmap"
    for name, text in {"__init__.py": "", **files}.items():
        path = src / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return src


@pytest.mark.parametrize("files, expected", [
    # an upward import hidden inside a function
    ({"errors.py": "def f():\n    from atlasmap import ops\n", "ops/__init__.py": ""}, "upward import"),
    # a cycle inside one layer
    ({"data/__init__.py": "", "data/a.py": "from atlasmap.data import b\n", "data/b.py": "from atlasmap.data import a\n"},
     "import cycle"),
    # a module no layer covers
    ({"stray.py": ""}, "unmapped module"),
], ids=["upward-local", "cycle", "unmapped"])
def test_the_checker_catches_violations(tmp_path: Path, files: dict[str, str], expected: str) -> None:
    violations = arch.check(_package(tmp_path, files))
    assert any(expected in v for v in violations), violations


def test_the_checker_limits_function_local_imports(tmp_path: Path) -> None:
    body = "".join(f"def f{i}():\n    from atlasmap import errors\n" for i in range(3))
    src = _package(tmp_path, {"errors.py": "", "ops/__init__.py": "from atlasmap import errors\n" + body})
    assert any("function-local" in v for v in arch.check(src)), arch.check(src)
    assert not arch.check(src, max_local_share=1.0)


def test_import_atlasmap_is_torch_free() -> None:
    code = "import sys, atlasmap; print('torch' in sys.modules, 'anndata' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"], out
