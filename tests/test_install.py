"""Install and run from anywhere: the wheel, installed non-editably into a
fresh virtual environment, executes a chapter from an unrelated folder and
writes every output there."""
import importlib.util
import os
import re
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from wbclib.data import PROJECT_ROOT

pytestmark = pytest.mark.slow


def _run(cmd, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kwargs)


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A fresh venv holding only the built wheel; the test runner's packages
    (torch, papermill, ...) are visible to it read-only, so nothing is downloaded."""
    work = tmp_path_factory.mktemp("install")
    # build from a copy so that setuptools' build/ folder never lands in the checkout
    src = work / "src"
    src.mkdir()
    for name in ["pyproject.toml", "README.md", "LICENSE"]:
        shutil.copy(PROJECT_ROOT / name, src / name)
    for name in ["wbclib", "notebooks"]:
        shutil.copytree(PROJECT_ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.ipynb"))
    # Offline when this interpreter has setuptools; else pip fetches it into an isolated build env.
    offline = ["--no-build-isolation", "--no-index"] if importlib.util.find_spec("setuptools") else []
    build = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", *offline, "-w", work / "dist", src])
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    wheel = next((work / "dist").glob("wbclib-*.whl"))

    env_dir = work / "venv"
    assert _run([sys.executable, "-m", "venv", "--system-site-packages", env_dir]).returncode == 0
    python = env_dir / "bin" / "python"
    purelib = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    # When the tests run inside a venv (make test), its packages are not the
    # base interpreter's: list them after the new venv's own site-packages.
    parents = [p for p in [sysconfig.get_paths()["purelib"], *site.getsitepackages()] if Path(p).is_dir()]
    (purelib / "zz_test_runner_packages.pth").write_text("\n".join(dict.fromkeys(parents)) + "\n")
    install = _run([python, "-m", "pip", "install", "--no-deps", "--no-index", wheel])
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    return env_dir


def _clean_env(env_dir: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WBC_") and k != "PYTHONPATH"}
    env["PATH"] = f"{env_dir / 'bin'}{os.pathsep}{env['PATH']}"
    return env


def test_wheel_ships_the_chapters_and_runs_one_from_any_folder(venv, root, tmp_path):
    env = _clean_env(venv)
    where = _run([venv / "bin" / "python", "-c", "import wbclib, wbclib.runbook as r; "
                  "print(wbclib.__file__); print(r.notebook_dir())"], cwd=tmp_path, env=env)
    package_file, notebooks = where.stdout.split()
    assert Path(package_file).is_relative_to(venv), "wbclib was imported from outside the fresh venv"
    assert Path(notebooks) == Path(package_file).parent / "notebooks"

    before = sorted(p.name for p in (PROJECT_ROOT / "notebooks").iterdir())
    run = _run([venv / "bin" / "wbc", "book", "execute", "--profile", "smoke", "--only", "02", "--root", root],
               cwd=tmp_path, env=env, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "02_benchmarks.py: executed in" in run.stdout + run.stderr
    # progress: a bar over notebooks and papermill's bar over the chapter's cells (tqdm, on stderr)
    assert "notebooks (smoke)" in run.stderr
    assert re.search(r"02_benchmarks: +\d+%.*\d+/\d+ \[.*(cell/s|s/cell)\]", run.stderr), run.stderr[-2000:]
    assert (tmp_path / "executed" / "02_benchmarks.ipynb").is_file()
    assert list((tmp_path / "splits").glob("pbc_lt_seed0*.csv")) and (tmp_path / "cache").is_dir()
    assert sorted(p.name for p in (PROJECT_ROOT / "notebooks").iterdir()) == before
    assert not list(Path(package_file).parent.glob("notebooks/*.ipynb"))


def test_python_m_wbclib_fails_clearly_on_zero_notebooks(venv, tmp_path):
    run = _run([venv / "bin" / "python", "-m", "wbclib", "book", "execute", "--profile", "smoke", "--only", "99"],
               cwd=tmp_path, env=_clean_env(venv))
    assert run.returncode == 2
    assert "no chapter sources ([0-9][0-9]_*.py) starting with 99" in run.stderr
