# The two entry points: `make book` (main job) and `make test` (what CI runs).
# Both first set up a virtual environment in $(VENV) (no root needed) and are
# idempotent: the environment is (re)installed only when pyproject.toml changes.
PROFILE ?= cpu
PYTHON ?= python3
VENV ?= .venv
# Reuse what $(PYTHON) already has installed (a torch or CUDA stack is GBs)
# instead of downloading it again; `make setup VENV_FLAGS=` isolates fully.
VENV_FLAGS ?= --system-site-packages
EXTRAS ?= book,dev,segment,siglip
DATA_ROOT ?=
ROOT_ARG = $(if $(DATA_ROOT),--root $(DATA_ROOT),)
BIN = $(VENV)/bin
# Tools are run as modules of the venv's Python: a venv that reuses the base
# packages has no console scripts for them in $(BIN) (only for wbc, installed there).
JUPYTER_BOOK = $(BIN)/python -c 'import sys; from jupyter_book.cli.main import main; sys.exit(main())'
SETUP_DONE = $(VENV)/.setup-done
# Jupyter reads configuration from the venv's etc/jupyter. A venv that reuses the
# base packages does not see the base's, where jupytext enables its contents
# manager (a .py opens as a notebook), so setup writes the same file here, and
# makes double-clicking a chapter .py in JupyterLab open it as a notebook.
JUPYTEXT_SERVER = $(VENV)/etc/jupyter/jupyter_server_config.d/jupytext.json
LAB_DEFAULTS = $(VENV)/etc/jupyter/labconfig/default_setting_overrides.json
# Notebooks opened in JupyterLab run in notebooks/; keep their outputs at the top.
LAB_OUTPUTS = WBC_RESULTS_DIR=$(CURDIR)/results WBC_CACHE_DIR=$(CURDIR)/cache WBC_SPLITS_DIR=$(CURDIR)/splits

.PHONY: setup notebooks book test bench lab publish clean-executed

setup: $(SETUP_DONE)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV_FLAGS) $(VENV)

$(SETUP_DONE): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[$(EXTRAS)]'
	@mkdir -p $(dir $(JUPYTEXT_SERVER)) $(dir $(LAB_DEFAULTS))
	@printf '%s\n' '{"ServerApp": {"jpserver_extensions": {"jupyterlab_jupytext": true}}}' > $(JUPYTEXT_SERVER)
	@printf '%s\n' '{"@jupyterlab/docmanager-extension:plugin": {"defaultViewers": {"python": "Jupytext Notebook"}}}' > $(LAB_DEFAULTS)
	@# Chromium is only for the browser test (tests/test_book.py skips without it).
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) ; } || \
		echo "setup: no chromium (optional): the browser test will be skipped"
	@touch $@

notebooks: setup
	$(BIN)/wbc book execute --profile $(PROFILE) $(ROOT_ARG)

book: notebooks
	$(JUPYTER_BOOK) build . -W -n --keep-going
	@echo "book: $(CURDIR)/_build/html/index.html"

test: setup
	$(BIN)/python -m pytest -q -ra

# Each figure is printed as `NAME ratio X.XX` against its reference timed in the same run.
bench: setup
	$(BIN)/python bench/bench_stain.py $(ROOT_ARG)
	$(BIN)/python bench/bench_stain.py --size 224 --n 64 $(ROOT_ARG)
	$(BIN)/python bench/bench_filters.py $(ROOT_ARG)
	$(BIN)/python bench/bench_throughput.py $(ROOT_ARG)

# Step through the chapters interactively (see README.md).
lab: setup
	$(LAB_OUTPUTS) $(BIN)/python -m jupyterlab

# Push the built book (make book) to the gh-pages branch of the origin remote.
publish: setup
	@test -f _build/html/index.html || { echo "publish: no _build/html; run make book first"; exit 1; }
	$(BIN)/python -m ghp_import --no-jekyll --push --force _build/html

clean-executed:
	rm -rf executed _build
