"""JupyterLab opens a chapter's py:percent source as a notebook (jupytext's
contents manager, configured by jupytext.toml) and saves it back to the same
.py, with no .ipynb beside it."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from wbclib.data import PROJECT_ROOT

pytest.importorskip("jupyterlab")
pytest.importorskip("jupytext")

CHAPTER = "notebooks/02_benchmarks.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A headless JupyterLab on a free localhost port, serving a copy of the
    repository's jupytext.toml and chapter (saves must not touch the checkout)."""
    root = tmp_path_factory.mktemp("lab")
    shutil.copy(PROJECT_ROOT / "jupytext.toml", root)
    (root / "notebooks").mkdir()
    shutil.copy(PROJECT_ROOT / CHAPTER, root / CHAPTER)
    port, token = _free_port(), uuid.uuid4().hex
    log = open(root / "lab.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}", "--ServerApp.port_retries=0",
         *(["--allow-root"] if os.geteuid() == 0 else [])],
        stdout=log, stderr=subprocess.STDOUT, cwd=root,
        # its cookie secret and connection files go to the test's folder, not ~/.local
        env={**os.environ, "JUPYTER_RUNTIME_DIR": str(root / "runtime")})
    base = f"http://127.0.0.1:{port}"

    def call(method: str, path: str, body=None):
        request = urllib.request.Request(
            base + path, method=method, data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"token {token}", "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read() or b"null")

    deadline = time.time() + 60
    while True:
        try:
            call("GET", "/api/status")
            break
        except (urllib.error.URLError, ConnectionError):
            if server.poll() is not None or time.time() > deadline:
                server.kill()
                pytest.fail("JupyterLab did not start:\n" + (root / "lab.log").read_text()[-3000:])
            time.sleep(0.5)
    yield root, call, base, token
    try:
        call("POST", "/api/shutdown")
        server.wait(timeout=30)
    except Exception:
        server.kill()
        server.wait()
    log.close()


def test_lab_is_served_with_a_token(lab):
    root, call, base, token = lab
    with urllib.request.urlopen(f"{base}/lab?token={token}", timeout=30) as response:
        assert response.status == 200 and b"JupyterLab" in response.read()
    with pytest.raises(urllib.error.HTTPError) as denied:
        urllib.request.urlopen(f"{base}/api/contents/notebooks", timeout=30)
    assert denied.value.code == 403


def test_chapter_source_opens_as_a_notebook_and_saves_back_to_py(lab):
    root, call, base, token = lab
    status, model = call("GET", f"/api/contents/{CHAPTER}?type=notebook&content=1")
    assert status == 200 and model["type"] == "notebook" and model["format"] == "json"
    cells = model["content"]["cells"]
    assert cells[0]["cell_type"] == "markdown" and "# Building the benchmarks" in cells[0]["source"]
    assert sum("parameters" in c["metadata"].get("tags", []) for c in cells) == 1
    code = [c["source"] for c in cells if c["cell_type"] == "code"]
    assert len(code) >= 3

    # an edit made in the notebook view lands in the .py, in the percent format
    cells[-1]["source"] += "\n# edited in JupyterLab"
    status, saved = call("PUT", f"/api/contents/{CHAPTER}", {"type": "notebook", "content": model["content"]})
    assert status == 200
    text = (root / CHAPTER).read_text()
    assert text.rstrip().endswith("# edited in JupyterLab") and text.count("# %%") == len(cells)
    assert "formats: py:percent" in text and "jupytext_version" not in text
    assert sorted(p.name for p in (root / "notebooks").iterdir()) == ["02_benchmarks.py"]

    # re-opening gives the same cells, and saving again changes nothing
    status, again = call("GET", f"/api/contents/{CHAPTER}?type=notebook&content=1")
    assert [c["source"] for c in again["content"]["cells"]] == [c["source"] for c in cells]
    call("PUT", f"/api/contents/{CHAPTER}", {"type": "notebook", "content": again["content"]})
    assert (root / CHAPTER).read_text() == text


def test_make_setup_makes_double_click_open_chapters_as_notebooks(lab):
    defaults = Path(sys.prefix) / "etc" / "jupyter" / "labconfig" / "default_setting_overrides.json"
    if not defaults.is_file():
        pytest.skip(f"{defaults} missing: JupyterLab's defaults are written by `make setup` into its venv")
    root, call, base, token = lab
    status, settings = call("GET", "/lab/api/settings/@jupyterlab/docmanager-extension:plugin")
    viewers = settings["schema"]["properties"]["defaultViewers"]["default"]
    assert viewers.get("python") == "Jupytext Notebook"
