# The two entry points: `make book` (main job) and `make test` (what CI runs).
PROFILE ?= cpu
PYTHON ?= python3
DATA_ROOT ?=
ROOT_ARG = $(if $(DATA_ROOT),--root $(DATA_ROOT),)

.PHONY: setup notebooks book test bench clean-executed

# Idempotent: pip skips what is already satisfied; Chromium is for the HTML test.
setup:
	$(PYTHON) -m pip install -q -e '.[book,dev,segment,siglip]'
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)

notebooks: setup
	wbc book execute --profile $(PROFILE) $(ROOT_ARG)

book: notebooks
	jupyter-book build . -W -n --keep-going
	@echo "book: $(CURDIR)/_build/html/index.html"

test: setup
	$(PYTHON) -m pytest -q -ra

bench: setup
	$(PYTHON) bench/bench_throughput.py $(ROOT_ARG)
	$(PYTHON) bench/bench_stain.py --size 128 $(ROOT_ARG)
	$(PYTHON) bench/bench_stain.py --size 224 $(ROOT_ARG)

clean-executed:
	rm -rf executed _build
