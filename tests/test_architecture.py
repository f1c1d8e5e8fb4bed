"""Layering rules of the library, checked on its source (no imports run).

* no import cycle between ``wbclib`` modules (function-level imports count);
* no private name (``_x``) imported from another module, by the library or
  by a notebook (``_`` modules such as ``_io`` are machinery and may be imported);
* algorithm modules know nothing of profiles, protocols, result folders or the book.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "wbclib"
NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"

#: Algorithms: pure methods on arrays, tensors and tables.
ALGORITHMS = {"augment", "cellcrop", "cluster", "degrade", "gradcam", "heads", "infer", "losses", "method_base",
              "methods", "metrics", "morphology", "precision", "registry", "sada", "samplers", "scale", "segment",
              "stain", "swad", "verdicts"}
#: What algorithms must not import: profiles, protocols, run folders and the book's machinery.
ABOVE_ALGORITHMS = {"profiles", "protocols", "crosslab", "runs", "runbook", "cli", "rescue"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    return ".".join(rel.parts).removesuffix(".__init__")


def _imports(path: Path):
    """(module imported, names imported) for every relative import of ``path``, resolved to package modules."""
    own = _module_name(path).split(".")
    package = own if path.name == "__init__.py" else own[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            base = package[: len(package) - (node.level - 1)]
            if node.module:
                target = ".".join(base + node.module.split("."))
                yield target, [a.name for a in node.names]
            else:
                for alias in node.names:
                    yield ".".join(base + [alias.name]), []


def _graph():
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges = {}
    for name, path in modules.items():
        targets = set()
        for target, _ in _imports(path):
            while target and target not in modules:  # "protocols.segmentation.x" -> the module that exists
                target = target.rpartition(".")[0]
            if target and target != name:
                targets.add(target)
        edges[name] = targets
    return modules, edges


def test_no_import_cycle():
    _, edges = _graph()
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert not cycles, f"import cycles: {cycles}"


def test_no_private_names_cross_modules():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        for target, names in _imports(path):
            offenders += [f"{_module_name(path)} imports {n} from {target}" for n in names
                          if n.startswith("_") and not n.startswith("__")]
    for path in NOTEBOOKS.glob("[0-9][0-9]_*.py"):
        tree = ast.parse(path.read_text())
        aliases = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("wbclib"):
                aliases |= {a.asname or a.name for a in node.names}
                offenders += [f"{path.name} imports {a.name}" for a in node.names
                              if a.name.startswith("_") and not a.name.startswith("__")]
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                offenders.append(f"{path.name} uses {node.value.id}.{node.attr}")
    assert not offenders, "\n".join(offenders)


@pytest.mark.parametrize("module", sorted(ALGORITHMS))
def test_algorithms_know_nothing_of_profiles_protocols_or_result_folders(module):
    modules, edges = _graph()
    if module not in modules:
        pytest.skip(f"wbclib.{module} does not exist")
    above = {t for t in edges[module] if t.split(".")[0] in ABOVE_ALGORITHMS}
    assert not above, f"wbclib.{module} imports {sorted(above)}"


def test_the_rules_catch_a_cycle_and_a_private_import(tmp_path, monkeypatch):
    fake = tmp_path / "wbclib"
    fake.mkdir()
    (fake / "a.py").write_text("from .b import _secret\n")
    (fake / "b.py").write_text("def f():\n    from . import a\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    with pytest.raises(AssertionError, match="cycles"):
        test_no_import_cycle()
    with pytest.raises(AssertionError, match="_secret"):
        test_no_private_names_cross_modules()
