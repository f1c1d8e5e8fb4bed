"""Execute the book's notebooks with papermill.

The ``py:percent`` files in ``notebooks/`` are the sources; each is paired to
an ``.ipynb`` by jupytext (with the ``python3`` kernelspec papermill needs)
and executed with the chosen profile into ``executed/``, which the book
renders with execution switched off.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional, Sequence

from .data import PROJECT_ROOT

NOTEBOOK_DIR = PROJECT_ROOT / "notebooks"
EXECUTED_DIR = PROJECT_ROOT / "executed"


def notebook_sources(names: Optional[Sequence[str]] = None) -> list:
    """Numbered notebook sources, optionally only those whose name starts with one of ``names``."""
    sources = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.py"))
    if names:
        sources = [p for p in sources if any(p.stem.startswith(n) for n in names)]
    return sources


def execute(profile: str = "cpu", names: Optional[Sequence[str]] = None, out_dir: Path = EXECUTED_DIR,
            parameters: Optional[dict] = None, log=print) -> list:
    """Convert and execute notebooks in order; returns the executed paths.

    ``parameters`` (e.g. ``data_root``, ``results_dir``) are passed, with
    ``profile``, to every notebook whose ``parameters`` cell declares them.
    """
    import jupytext
    import papermill

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    params = {"profile": profile, **{k: v for k, v in (parameters or {}).items() if v is not None}}
    done = []
    for source in notebook_sources(names):
        notebook = jupytext.read(source)
        notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        paired = source.with_suffix(".ipynb")
        jupytext.write(notebook, paired)
        target = out_dir / paired.name
        # Each chapter gets the parameters it declares (not every chapter has, e.g., results_dir).
        declared = papermill.inspect_notebook(str(paired))
        start = time.time()
        papermill.execute_notebook(str(paired), str(target), parameters={k: v for k, v in params.items() if k in declared},
                                   cwd=str(NOTEBOOK_DIR),
                                   kernel_name="python3", progress_bar=False)
        log(f"{source.name}: executed in {time.time() - start:.0f} s -> {target}")
        done.append(target)
    return done
