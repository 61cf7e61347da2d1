"""The layer contract: export -> engines -> runtime -> benchmarks, one way. A module may import its own layer and
those below it, never one above (imports inside functions included: they run too, only later).

Every .py file under the four source roots is read with ``ast``, so the check needs nothing installed and sees
every import statement, whichever branch or function it sits in.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Lowest first. Each source root holds its part of the `ccld_trt` namespace package.
LAYERS = ("export", "engines", "runtime", "benchmarks")
# Subpackages with a layer of their own; the rest of `ccld_trt` (the runtime/ folder) is the runtime layer.
SUBPACKAGE_LAYERS = {"export": "export", "engines": "engines", "benchmarks": "benchmarks"}


def layer_of(module: str) -> str | None:
    """The layer of an absolute module name; None outside ccld_trt and for the bare namespace ``ccld_trt``
    (it has no code of its own)."""
    parts = module.split(".")
    if parts[0] != "ccld_trt" or len(parts) == 1:
        return None
    return SUBPACKAGE_LAYERS.get(parts[1], "runtime")


def imported_modules(tree: ast.AST, package: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``tree``; ``from P import name`` counts as P.name too,
    since ``name`` may be a submodule (``from ccld_trt import benchmarks``). ``package``: the file's package,
    to resolve relative imports."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names if alias.name != "*"]
    return found


def source_files() -> list[tuple[str, Path]]:
    return [(layer, path) for layer in LAYERS for path in sorted((ROOT / layer / "ccld_trt").rglob("*.py"))]


def violations(layer: str, path: Path, root: Path = ROOT) -> list[str]:
    """One line per import statement in ``path`` (a file of ``layer``'s source root under ``root``) that
    reaches a higher layer."""
    rank = LAYERS.index(layer)
    package = ".".join(path.relative_to(root / layer).with_suffix("").parts[:-1])
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    upward = {}  # per line, the first module named (`from P import a, b` names P, P.a and P.b)
    for line, module in sorted(imported_modules(tree, package)):
        target = layer_of(module)
        if target is not None and LAYERS.index(target) > rank:
            upward.setdefault(line, f"{path.relative_to(root)}:{line}: {layer} imports {module} ({target})")
    return list(upward.values())


def test_the_source_roots_hold_their_layers() -> None:
    files = source_files()
    assert {layer for layer, _ in files} == set(LAYERS)
    for layer, path in files:  # a file in the wrong folder would be judged by the wrong layer
        module = ".".join(path.relative_to(ROOT / layer).with_suffix("").parts)
        assert layer_of(module) == layer, path


@pytest.mark.parametrize("layer", LAYERS)
def test_no_layer_imports_a_higher_one(layer: str) -> None:
    found = [v for lay, path in source_files() if lay == layer for v in violations(lay, path)]
    assert not found, "\n".join(found)


def test_the_checker_sees_every_kind_of_upward_import(tmp_path: Path) -> None:
    """The oracle: hand-written files with known upward imports, each of which must be reported."""
    source = tmp_path / "export" / "ccld_trt" / "export" / "bad.py"
    source.parent.mkdir(parents=True)
    source.write_text(
        "import ccld_trt.engines.engine\n"             # 1: engines
        "from ccld_trt import cli\n"                    # 2: runtime (a submodule named in the import list)
        "from ccld_trt.export import errors\n"          # 3: fine
        "def f():\n"
        "    from ccld_trt.benchmarks.suite import x\n"  # 5: benchmarks, inside a function
        "from .. import pipeline\n"                     # 6: runtime, relative
        "import numpy\n")
    found = violations("export", source, root=tmp_path)
    assert [v.split(":")[1] for v in found] == ["1", "2", "5", "6"], found
