"""Project-level consistency: environment.yml vs pyproject, notebooks, book
table of contents and configuration, licence, citation and API reference."""
import importlib
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from wbclib.data import PROJECT_ROOT

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, from PyPI (the dev extra)
    import tomli as tomllib

#: The repository's address; the one written in _config.yml, pyproject.toml and CITATION.cff.
REPOSITORY = "https://github.com/wbc-book/wbclib"


def _pyproject() -> dict:
    return tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~ ;\[]", requirement, 1)[0].lower()


def _requirements():
    project = _pyproject()["project"]
    reqs = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        reqs += extra
    return {_name(r): r.replace(" ", "") for r in reqs}


def test_environment_yml_matches_pyproject():
    env = yaml.safe_load((PROJECT_ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    listed = {_name(r): r.replace(" ", "") for r in pip if not r.startswith("-e")}
    assert listed == _requirements()
    assert "-e ." in pip


def test_book_extra_has_the_jupyterlab_and_publishing_tools():
    book = {_name(r) for r in _pyproject()["project"]["optional-dependencies"]["book"]}
    assert {"jupyterlab", "ipywidgets", "jupytext", "papermill", "jupyter-book", "ghp-import"} <= book


def test_requires_python_and_the_toml_fallback_agree():
    project = _pyproject()["project"]
    assert project["requires-python"] == ">=3.10"
    # tomllib is 3.11+; this file falls back to tomli, which the dev extra installs on 3.10
    assert "tomli>=2.0;python_version<'3.11'" in _requirements().values()


def test_every_notebook_has_one_parameters_cell_with_a_profile():
    sources = sorted((PROJECT_ROOT / "notebooks").glob("[0-9][0-9]_*.py"))
    assert len(sources) >= 4
    for src in sources:
        text = src.read_text()
        assert text.count('tags=["parameters"]') == 1, src.name
        cell = text.split('tags=["parameters"]', 1)[1].split("# %%", 1)[0]
        assert re.search(r'^profile = "cpu"$', cell, re.M), src.name


def test_notebooks_ship_in_the_wheel():
    setuptools = _pyproject()["tool"]["setuptools"]
    assert "wbclib.notebooks" in setuptools["packages"]
    assert setuptools["package-dir"]["wbclib.notebooks"] == "notebooks"


def test_jupytext_pairs_chapters_as_py_percent():
    config = tomllib.loads((PROJECT_ROOT / "jupytext.toml").read_text())
    assert config["formats"] == "py:percent"
    for src in (PROJECT_ROOT / "notebooks").glob("[0-9][0-9]_*.py"):
        assert "#     formats: py:percent" in src.read_text(), src.name


def test_toc_lists_every_notebook_and_existing_pages():
    toc = yaml.safe_load((PROJECT_ROOT / "_toc.yml").read_text())
    files = [toc["root"]] + [c["file"] for part in toc["parts"] for c in part["chapters"]]
    notebooks = {Path(p).stem for p in (PROJECT_ROOT / "notebooks").glob("[0-9][0-9]_*.py")}
    assert {Path(f).name for f in files if f.startswith("executed/")} == notebooks
    for f in files:
        if not f.startswith("executed/"):
            assert (PROJECT_ROOT / f"{f}.md").is_file(), f
    reference = next(part for part in toc["parts"] if part["caption"] == "Reference")
    assert {"file": "book/api"} in reference["chapters"]


def test_book_config_renders_without_executing():
    config = yaml.safe_load((PROJECT_ROOT / "_config.yml").read_text())
    assert config["execute"]["execute_notebooks"] == "off"
    assert (PROJECT_ROOT / config["bibtex_bibfiles"][0]).is_file()
    assert "sphinx.ext.autodoc" in config["sphinx"]["extra_extensions"]


def _public_modules() -> set:
    """wbclib's modules and packages under version control (a module still being written is not yet
    public), without private ones (``_io``, ``__main__``) and the command line."""
    try:
        listed = subprocess.run(["git", "ls-files", "wbclib"], cwd=PROJECT_ROOT, capture_output=True,
                                text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: every file counts
        listed = [str(p.relative_to(PROJECT_ROOT)) for p in (PROJECT_ROOT / "wbclib").rglob("*.py")]
    modules = set()
    for path in listed:
        parts = Path(path).with_suffix("").parts
        if path.endswith(".py") and parts[-1] == "__init__":
            parts = parts[:-1]
        if path.endswith(".py") and not any(p.startswith("_") for p in parts) and parts != ("wbclib", "cli"):
            modules.add(".".join(parts))
    return modules


def test_api_reference_documents_every_public_module():
    documented = re.findall(r"^\.\. automodule:: (\S+)$", (PROJECT_ROOT / "book" / "api.md").read_text(), re.M)
    missing = _public_modules() - set(documented) - {"wbclib"}
    assert not missing, f"add '.. automodule:: <module>' blocks to book/api.md for: {sorted(missing)}"
    assert len(documented) == len(set(documented))
    for name in documented:
        assert importlib.import_module(name).__doc__, f"{name} has no module docstring"


def test_repository_address_is_the_same_everywhere():
    config = yaml.safe_load((PROJECT_ROOT / "_config.yml").read_text())
    urls = _pyproject()["project"]["urls"]
    citation = yaml.safe_load((PROJECT_ROOT / "CITATION.cff").read_text())
    assert config["repository"]["url"] == urls["Repository"] == citation["repository-code"] == REPOSITORY
    assert urls["Issues"] == f"{REPOSITORY}/issues"
    assert config["html"]["use_repository_button"] is True


def test_licence_is_mit_everywhere():
    assert _pyproject()["project"]["license"] == {"text": "MIT"}
    text = (PROJECT_ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License\n") and "Permission is hereby granted, free of charge" in text
    assert yaml.safe_load((PROJECT_ROOT / "CITATION.cff").read_text())["license"] == "MIT"


#: Top-level keys of the Citation File Format 1.2.0 schema; the first four are required.
CFF_REQUIRED = {"cff-version", "message", "title", "authors"}
CFF_KEYS = CFF_REQUIRED | {
    "abstract", "commit", "contact", "date-released", "doi", "identifiers", "keywords", "license",
    "license-url", "preferred-citation", "references", "repository", "repository-artifact",
    "repository-code", "type", "url", "version"}


def test_citation_cff_is_valid_1_2_0():
    citation = yaml.safe_load((PROJECT_ROOT / "CITATION.cff").read_text())
    assert CFF_REQUIRED <= set(citation) <= CFF_KEYS
    assert citation["cff-version"] == "1.2.0"
    assert citation["type"] in {"software", "dataset"}
    assert isinstance(citation["message"], str) and citation["message"].strip()
    assert citation["authors"] and all(
        isinstance(a, dict) and (a.get("name") or a.get("family-names")) for a in citation["authors"])
    assert str(citation["version"]) == _pyproject()["project"]["version"]
    assert all(isinstance(k, str) for k in citation.get("keywords", []))
    for key in ["repository-code", "url"]:
        assert re.fullmatch(r"https://\S+", citation[key]), key


@pytest.mark.parametrize("target", ["setup", "test", "book", "notebooks", "lab", "publish"])
def test_makefile_targets_run_in_the_virtual_environment(target):
    makefile = (PROJECT_ROOT / "Makefile").read_text()
    assert re.search(rf"^{target}:", makefile, re.M), target
    assert "-m venv" in makefile and "VENV ?= .venv" in makefile
    body = makefile.split(f"\n{target}:", 1)[1].split("\n\n", 1)[0]
    commands = [line.strip() for line in body.splitlines()[1:] if line.startswith("\t")]
    # no bare python/pip/jupyter from PATH: every tool comes from the venv
    for line in commands:
        assert not re.match(r"@?(python3?|pip3?|jupyter(-book)?|wbc|ghp-import|pytest)\b", line), line
