"""Execute the book's notebooks with papermill.

The ``py:percent`` files in ``notebooks/`` are the sources. Each is converted
by jupytext to an ``.ipynb`` in a temporary folder (with the ``python3``
kernelspec papermill needs) and executed with the chosen profile into
``executed/``, which the book renders with execution switched off. Nothing
is written beside the sources, so a notebook a user keeps in ``notebooks/``
(for example one paired by JupyterLab) is never overwritten.

Where things are, so that ``wbc`` runs from any folder, installed or not:

* sources: the ``notebooks_dir`` argument (``wbc book execute --notebooks``),
  else ``./notebooks`` when it holds numbered chapters, else the copy shipped
  inside the package (``wbclib/notebooks`` in a wheel), else the checkout's
  ``notebooks/`` (editable install);
* outputs: ``executed/``, ``results/``, ``cache/`` and ``splits/`` in the
  current working directory unless given (argument, ``WBC_<KIND>_DIR``).
  Notebooks run with that folder as their working directory and are passed
  the resolved ``results_dir``, ``cache_dir`` and ``splits_dir``.
"""
from __future__ import annotations

import os
import re
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

from .data import PROJECT_ROOT, PathLike

#: Numbered chapter sources, e.g. ``02_benchmarks.py``.
SOURCE_PATTERN = "[0-9][0-9]_*.py"
#: Where a wheel ships the chapter sources (``[tool.setuptools.package-dir]`` in pyproject.toml).
PACKAGED_NOTEBOOK_DIR = Path(__file__).resolve().parent / "notebooks"
#: The checkout's sources (an editable install, or running from the repository).
CHECKOUT_NOTEBOOK_DIR = PROJECT_ROOT / "notebooks"
#: Output folders the runbook hands to every notebook that declares the parameter.
OUTPUT_PARAMETERS = {"results_dir": "results", "cache_dir": "cache", "splits_dir": "splits"}


class NotebooksNotFound(FileNotFoundError):
    """No chapter source matched: a wrong ``--only`` prefix or ``--notebooks`` folder."""


def _has_sources(folder: Path) -> bool:
    return folder.is_dir() and any(folder.glob(SOURCE_PATTERN))


def notebook_dir(notebooks_dir: Optional[PathLike] = None) -> Path:
    """The folder the chapter sources are read from (see the module docstring for the order)."""
    if notebooks_dir is not None:
        return Path(notebooks_dir).expanduser().resolve()
    for candidate in (Path.cwd() / "notebooks", PACKAGED_NOTEBOOK_DIR, CHECKOUT_NOTEBOOK_DIR):
        if _has_sources(candidate):
            return candidate.resolve()
    raise NotebooksNotFound(
        f"no chapter sources ({SOURCE_PATTERN}) in ./notebooks, {PACKAGED_NOTEBOOK_DIR} or "
        f"{CHECKOUT_NOTEBOOK_DIR}; pass the folder with --notebooks")


def executed_dir(path: Optional[PathLike] = None) -> Path:
    """Where executed notebooks go: ``path``, else ``$WBC_EXECUTED_DIR``, else ``./executed``."""
    return Path(path or os.environ.get("WBC_EXECUTED_DIR") or Path.cwd() / "executed").expanduser().resolve()


def notebook_sources(names: Optional[Sequence[str]] = None, notebooks_dir: Optional[PathLike] = None) -> list:
    """Numbered notebook sources, optionally only those whose name starts with one of ``names``.

    Raises :class:`NotebooksNotFound` when nothing matches, so a typo in
    ``--only`` fails loudly instead of "executing" zero notebooks.
    """
    folder = notebook_dir(notebooks_dir)
    sources = sorted(folder.glob(SOURCE_PATTERN))
    if names:
        sources = [p for p in sources if any(p.stem.startswith(n) for n in names)]
    if not sources:
        wanted = f" starting with {', '.join(names)}" if names else ""
        raise NotebooksNotFound(f"no chapter sources ({SOURCE_PATTERN}){wanted} in {folder}")
    return sources


def _progress(iterable, **kwargs):
    """tqdm.auto: a widget bar in Jupyter (ipywidgets), a text bar on a terminal or in a log."""
    from tqdm.auto import tqdm

    return tqdm(iterable, **kwargs)


#: A tqdm bar's text: "desc:  42%|####      | 5/12 [00:01<00:02, 3.1it/s]".
_BAR_LINE = re.compile(r"^.*\d+%\|.*\|.*$")


def strip_progress_bars(path: PathLike) -> int:
    """Remove the cells' progress bars from an executed notebook: in a batch
    run each bar is saved as a frozen widget or a "0%" stderr line, which the
    rendered book would show by the hundred. Widget outputs are dropped,
    tqdm lines are cut from stderr streams, every other output is kept.
    Returns how many outputs were removed or shortened (the file is
    rewritten only when something changed)."""
    import nbformat

    notebook = nbformat.read(str(path), as_version=4)
    changed = 0
    for cell in notebook.cells:
        if cell.cell_type != "code":
            continue
        kept = []
        for output in cell.get("outputs", []):
            if output.get("output_type") == "display_data" and \
                    "application/vnd.jupyter.widget-view+json" in output.get("data", {}):
                changed += 1
                continue
            if output.get("output_type") == "stream" and output.get("name") == "stderr":
                lines = re.split(r"(?<=\n)|\r", output.get("text", ""))
                text = "".join(line for line in lines if not _BAR_LINE.match(line.strip()))
                if text != output.get("text", ""):
                    changed += 1
                    if not text.strip():
                        continue
                    output["text"] = text
            kept.append(output)
        cell["outputs"] = kept
    if changed:
        notebook.metadata.pop("widgets", None)
        from . import _io

        with _io.atomic_path(Path(path)) as tmp:
            nbformat.write(notebook, str(tmp))
    return changed


def execute(profile: str = "cpu", names: Optional[Sequence[str]] = None, out_dir: Optional[PathLike] = None,
            parameters: Optional[dict] = None, notebooks_dir: Optional[PathLike] = None,
            progress: bool = True, log_output: bool = False, log=print) -> list:
    """Convert and execute notebooks in order; returns the executed paths.

    ``parameters`` (e.g. ``data_root``, ``results_dir``) are passed, with
    ``profile``, to every notebook whose ``parameters`` cell declares them;
    ``results_dir``, ``cache_dir`` and ``splits_dir`` default to folders in
    the current working directory (or ``$WBC_<KIND>_DIR``). ``progress``
    shows a bar over notebooks and papermill's bar over each notebook's
    cells; ``log_output`` also forwards the cells' own output to the log.
    """
    import jupytext
    import papermill

    from .profiles import output_dir

    sources = notebook_sources(names, notebooks_dir)
    out_dir = executed_dir(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    work_dir = Path.cwd()
    given = {k: v for k, v in (parameters or {}).items() if v is not None}
    # Resolve the output folders here, once: the kernel's working directory is
    # the caller's, but an absolute path leaves no doubt about where runs land.
    for name, kind in OUTPUT_PARAMETERS.items():
        given[name] = str(output_dir(kind, given.get(name)))
    params = {"profile": profile, **given}
    done = []
    with tempfile.TemporaryDirectory(prefix="wbc-notebooks-") as scratch:
        bar = _progress(sources, desc=f"notebooks ({profile})", unit="notebook", disable=not progress)
        for source in bar:
            bar.set_postfix_str(source.stem)
            notebook = jupytext.read(source)
            notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
            converted = Path(scratch) / f"{source.stem}.ipynb"
            jupytext.write(notebook, converted)
            target = out_dir / converted.name
            # Each chapter gets the parameters it declares (not every chapter has, e.g., results_dir).
            declared = papermill.inspect_notebook(str(converted))
            start = time.time()
            try:
                papermill.execute_notebook(str(converted), str(target),
                                           parameters={k: v for k, v in params.items() if k in declared},
                                           cwd=str(work_dir), kernel_name="python3",
                                           progress_bar=progress and {"desc": source.stem, "unit": "cell",
                                                                      "leave": False},
                                           log_output=log_output)
            except papermill.PapermillExecutionError as exc:
                exc.notebook = target  # the executed copy, with the traceback, for the caller's message
                raise
            strip_progress_bars(target)
            message = f"{source.name}: executed in {time.time() - start:.0f} s -> {target}"
            if progress:
                bar.write(message)
            else:
                log(message)
            done.append(target)
    return done
