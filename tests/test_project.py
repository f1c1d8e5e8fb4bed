"""Project-level consistency: environment.yml vs pyproject, notebooks, book table of contents."""
import re
import tomllib
from pathlib import Path

import yaml

from wbclib.data import PROJECT_ROOT


def _requirements():
    project = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        reqs += extra
    return {re.split(r"[<>=!~ ]", r, 1)[0].lower(): r.replace(" ", "") for r in reqs}


def test_environment_yml_matches_pyproject():
    env = yaml.safe_load((PROJECT_ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    listed = {re.split(r"[<>=!~ ]", r, 1)[0].lower(): r.replace(" ", "") for r in pip if not r.startswith("-e")}
    assert listed == _requirements()
    assert "-e ." in pip


def test_every_notebook_has_one_parameters_cell_with_a_profile():
    sources = sorted((PROJECT_ROOT / "notebooks").glob("[0-9][0-9]_*.py"))
    assert len(sources) >= 4
    for src in sources:
        text = src.read_text()
        assert text.count('tags=["parameters"]') == 1, src.name
        cell = text.split('tags=["parameters"]', 1)[1].split("# %%", 1)[0]
        assert re.search(r'^profile = "cpu"$', cell, re.M), src.name


def test_toc_lists_every_notebook_and_existing_pages():
    toc = yaml.safe_load((PROJECT_ROOT / "_toc.yml").read_text())
    files = [toc["root"]] + [c["file"] for part in toc["parts"] for c in part["chapters"]]
    notebooks = {Path(p).stem for p in (PROJECT_ROOT / "notebooks").glob("[0-9][0-9]_*.py")}
    assert {Path(f).name for f in files if f.startswith("executed/")} == notebooks
    for f in files:
        if not f.startswith("executed/"):
            assert (PROJECT_ROOT / f"{f}.md").is_file(), f


def test_book_config_renders_without_executing():
    config = yaml.safe_load((PROJECT_ROOT / "_config.yml").read_text())
    assert config["execute"]["execute_notebooks"] == "off"
    assert (PROJECT_ROOT / config["bibtex_bibfiles"][0]).is_file()
