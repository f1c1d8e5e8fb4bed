"""End to end: every notebook runs with papermill on the smoke profile, the
book builds with warnings as errors, and its pages and figures load in
headless Chromium."""
import json
import shutil
import subprocess
import sys

import pytest

from wbclib import runbook, runs
from wbclib.data import PROJECT_ROOT

pytestmark = pytest.mark.slow

#: jupyter-book run by this interpreter: in a venv that reuses the base
#: packages there is no jupyter-book script on PATH or beside sys.executable.
JUPYTER_BOOK = [sys.executable, "-c", "import sys; from jupyter_book.cli.main import main; sys.exit(main())"]


@pytest.fixture(scope="module")
def executed(tmp_path_factory, root):
    work = tmp_path_factory.mktemp("book")
    params = {"data_root": str(root), "results_dir": str(work / "results"), "cache_dir": str(work / "cache"),
              "splits_dir": str(work / "splits")}
    notebooks = runbook.execute("smoke", out_dir=work / "executed", parameters=params)
    assert [p.stem for p in notebooks] == [p.stem for p in runbook.notebook_sources()]
    return work


def test_notebooks_write_results(executed):
    results = executed / "results" / "smoke"
    probe = runs.find_one(results, "pbc_lt/probe", rho=100, fold=0)
    assert probe.path("predictions_test_degraded.csv").is_file()
    assert runs.find_one(results, "pbc_lt/finetune", method="erm", rho=100, fold=0).metrics()["test"]
    assert runs.find_one(results, "crosslab/finetune", setting="pbc_to_others", augmentation="dihedral_jitter", seed=0).path("predictions_zheng1.csv").is_file()
    sada = runs.find(results, "crosslab_dg", variant="main", method="sada", setting="LOLO_zheng1", seed=0)
    assert len(sada) and (sada.run_dir.iloc[0] / "predictions_zheng1.csv").is_file()


def test_every_result_folder_knows_what_made_it(executed):
    results = executed / "results" / "smoke"
    with_metrics = [p.parent for p in results.rglob("metrics.json")]
    assert with_metrics
    for folder in with_metrics:
        assert (folder / "config.json").is_file() and (folder / "done").is_file(), folder
    identities = [json.loads((f / "config.json").read_text())["identity"] for f in with_metrics]
    assert all({"protocol", "config", "inputs", "code"} <= set(i) for i in identities)


@pytest.fixture(scope="module")
def html(executed):
    site = executed / "site"
    site.mkdir()
    for name in ["_config.yml", "_toc.yml", "book"]:
        src = PROJECT_ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, site / name)
    shutil.copytree(executed / "executed", site / "executed")
    build = subprocess.run([*JUPYTER_BOOK, "build", str(site), "-W", "-n", "--keep-going"],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stdout[-4000:] + build.stderr[-4000:]
    return site / "_build" / "html"


def test_pages_and_figures_load_in_chromium(html):
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (the dev extra)")
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("chromium is not on PATH: the browser check is optional (as root, make setup installs "
                    "Debian's chromium; otherwise apt-get install chromium)")
    pages = {"book/intro.html": 0, "executed/01_data_eda.html": 3, "executed/03_erm_baseline.html": 3,
             "executed/04_crosslab_erm.html": 2, "executed/07_crosslab_dg.html": 5,
             "executed/09_segmentation_morphology.html": 6}
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"])
        page = browser.new_page()
        # index.html is a meta-refresh to the root chapter
        page.goto((html / "index.html").as_uri())
        page.wait_for_url("**/book/intro.html")
        for name, min_figures in pages.items():
            page.goto((html / name).as_uri())
            page.wait_for_load_state("load")
            assert page.title(), name
            images = page.evaluate(
                "Array.from(document.querySelectorAll('main img')).map(i => [i.src, i.complete && i.naturalWidth > 0])")
            assert len(images) >= min_figures, (name, images)
            broken = [src for src, ok in images if not ok]
            assert not broken, (name, broken)
        browser.close()
