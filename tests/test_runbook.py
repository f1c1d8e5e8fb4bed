"""The runbook executes chapter sources without writing beside them, runs them
from the caller's folder, and fails loudly when nothing matches."""
import json

import nbformat
import pytest

from wbclib import cli, runbook

CHAPTER = '''# %% [markdown]
# # A tiny chapter

# %% tags=["parameters"]
profile = "cpu"
results_dir = None

# %%
from pathlib import Path
print(json.dumps({"cwd": str(Path.cwd()), "profile": profile, "results_dir": results_dir}))
'''


@pytest.fixture
def chapter_dir(tmp_path):
    sources = tmp_path / "sources"
    sources.mkdir()
    (sources / "01_tiny.py").write_text("import json\n" + CHAPTER)
    # a user's own notebook beside the source (e.g. paired in JupyterLab): must survive untouched
    (sources / "01_tiny.ipynb").write_text("my notebook")
    return sources


def test_execute_writes_only_to_executed_and_runs_in_the_callers_folder(chapter_dir, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for kind in ["RESULTS", "CACHE", "SPLITS", "EXECUTED"]:
        monkeypatch.delenv(f"WBC_{kind}_DIR", raising=False)
    done = runbook.execute("smoke", notebooks_dir=chapter_dir, progress=False, log=lambda _: None)
    assert done == [work / "executed" / "01_tiny.ipynb"]
    assert sorted(p.name for p in chapter_dir.iterdir()) == ["01_tiny.ipynb", "01_tiny.py"]
    assert (chapter_dir / "01_tiny.ipynb").read_text() == "my notebook"
    executed = nbformat.read(done[0], as_version=4)
    printed = json.loads(next(o["text"] for c in executed.cells if c.cell_type == "code"
                              for o in c.get("outputs", []) if o.get("name") == "stdout"))
    # outputs default to the caller's folder; only declared parameters are passed (no cache_dir here)
    assert printed == {"cwd": str(work), "profile": "smoke", "results_dir": str(work / "results")}
    assert (work / "results").is_dir()


def test_zero_matching_notebooks_is_an_error(chapter_dir, tmp_path, monkeypatch, capsys):
    with pytest.raises(runbook.NotebooksNotFound, match="starting with 99"):
        runbook.notebook_sources(["99"], chapter_dir)
    with pytest.raises(runbook.NotebooksNotFound, match="no chapter sources"):
        runbook.notebook_sources(None, tmp_path / "empty")
    monkeypatch.chdir(tmp_path)
    assert cli.main(["book", "execute", "--profile", "smoke", "--only", "99", "--notebooks", str(chapter_dir)]) == 2
    assert "no chapter sources ([0-9][0-9]_*.py) starting with 99" in capsys.readouterr().err
    assert not (tmp_path / "executed").exists()


def test_sources_are_found_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ./notebooks here: the shipped (or checkout) copy is used
    sources = runbook.notebook_sources(["02"])
    assert [p.name for p in sources] == ["02_benchmarks.py"]
    assert sources[0].parent in {runbook.PACKAGED_NOTEBOOK_DIR, runbook.CHECKOUT_NOTEBOOK_DIR.resolve()}


def test_batch_runs_keep_cell_progress_bars_out_of_the_executed_notebook(tmp_path, monkeypatch):
    sources = tmp_path / "sources"
    sources.mkdir()
    (sources / "01_bars.py").write_text('# %% tags=["parameters"]\nprofile = "cpu"\n\n'
                                        '# %%\nfrom tqdm.auto import tqdm\nfor _ in tqdm(range(3), desc="loop"):\n'
                                        '    pass\nprint("looped")\n')
    monkeypatch.chdir(tmp_path)
    done = runbook.execute("smoke", notebooks_dir=sources, progress=False, log=lambda _: None)
    outputs = [o for c in nbformat.read(done[0], as_version=4).cells if c.cell_type == "code"
               for o in c.get("outputs", [])]
    assert [o.get("text") for o in outputs] == ["looped\n"]  # the bar (a widget or stderr text) is gone


def test_strip_progress_bars_keeps_every_other_output(tmp_path):
    cell = nbformat.v4.new_code_cell("x")
    cell.outputs = [
        nbformat.v4.new_output("stream", name="stderr",
                               text="epoch 1/2:   0%|          | 0/18 [00:00<?, ?it/s]\rUserWarning: kept\n"),
        nbformat.v4.new_output("stream", name="stderr", text="val:  33%|###3      | 1/3 [00:01<00:02, 1.0it/s]\n"),
        nbformat.v4.new_output("stream", name="stdout", text="a table\n"),
        nbformat.v4.new_output("display_data", data={"text/plain": "50%|#####     |"}),  # not a widget: kept
        nbformat.v4.new_output("display_data", data={"text/plain": "bar",
                                                    "application/vnd.jupyter.widget-view+json": {"model_id": "x"}}),
    ]
    path = tmp_path / "nb.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[cell]), str(path))
    assert runbook.strip_progress_bars(path) == 3
    outputs = nbformat.read(str(path), as_version=4).cells[0].outputs
    assert [o.get("text") for o in outputs] == ["UserWarning: kept\n", "a table\n", None]
    assert outputs[2].data == {"text/plain": "50%|#####     |"}
    before = path.read_bytes()
    assert runbook.strip_progress_bars(path) == 0 and path.read_bytes() == before
