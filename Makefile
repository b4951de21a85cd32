# cliploom: `make demo` and `make test` set up everything they need on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU path pins torch (an unpinned torch pulls a multi-GB CUDA build). On a GPU machine,
# install your CUDA torch into the venv first, or run `make setup TORCH_SPEC=torch`.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.cliploom-installed

.PHONY: setup test demo bench bench-quality clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

test: setup
	$(BIN)/python -m pytest -q

demo: setup
	$(BIN)/cliploom generate examples/demo.yaml --out out/demo.mp4 --overwrite

bench: setup
	$(BIN)/python benchmarks/bench_engine.py

clean:
	rm -rf out .pytest_cache
