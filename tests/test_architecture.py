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


# --------------------------------------------------------------------------
# Notebooks: narrative, parameters and one call per code cell
# --------------------------------------------------------------------------

#: Calls that show a result rather than compute one.
SHOWN = {"display", "print", "Markdown"}


def _code_cells(path: Path):
    """The code cells of a py:percent notebook (no markdown, no parameters cell), as source strings."""
    cells, current, keep = [], [], False
    for line in path.read_text().splitlines():
        if line.startswith("# %%"):
            if keep:
                cells.append("\n".join(current))
            current, keep = [], "[markdown]" not in line and "parameters" not in line
        elif keep:
            current.append(line)
    if keep:
        cells.append("\n".join(current))
    return cells


def _shows(node) -> bool:
    """A statement that displays: display/print/Markdown calls, any call on
    ``plots``, and an ``if`` whose branches only display."""
    if isinstance(node, ast.If):
        return all(_shows(s) for s in node.body + node.orelse)
    value = node.value if isinstance(node, (ast.Expr, ast.Assign)) else None
    if not isinstance(value, ast.Call):
        return False
    func = value.func
    if isinstance(func, ast.Name):
        return func.id in SHOWN
    return isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id == "plots"


def computing_statements(cell: str) -> int:
    """Statements of a code cell that compute something (not imports, not displays)."""
    return sum(not isinstance(s, (ast.Import, ast.ImportFrom)) and not _shows(s) for s in ast.parse(cell).body)


@pytest.mark.parametrize("notebook", sorted(p.name for p in NOTEBOOKS.glob("[0-9][0-9]_*.py")))
def test_notebook_code_cells_hold_one_call_besides_the_setup_cell(notebook):
    cells = _code_cells(NOTEBOOKS / notebook)
    crowded = [f"cell {i}: {cell.strip().splitlines()[0][:70]!r} ({computing_statements(cell)} statements)"
               for i, cell in enumerate(cells[1:], 2) if computing_statements(cell) > 1]
    assert not crowded, f"{notebook}: move the logic into wbclib:\n" + "\n".join(crowded)


def test_the_cell_rule_counts_computing_statements_only():
    assert computing_statements("import x\nx = f(1)\ndisplay(x)\nplots.bars(x);\nprint(x)") == 1
    assert computing_statements("fig = plots.grid(a)\ny = g(x)\nz = y + 1") == 2
    assert computing_statements("for r in rows:\n    display(r)") == 1
    assert computing_statements("x = f()\nif x.ok:\n    display(x.table)\n    plots.bars(x.scores)") == 1
    assert computing_statements("if x.ok:\n    y = g(x)") == 1
