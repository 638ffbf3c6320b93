# The two commands of the README: `make demo` and `make test`. Both set themselves up from nothing.
PYTHON ?= python3
VENV ?= .venv
# Pinned first: an unpinned torch pulls a multi-GB CUDA build.
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup demo web test lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e '.[test]'
	# spandrel: the reference Real-ESRGAN the export tests compare against. --no-deps: it requires torchvision,
	# which cannot import beside the CPU torch (the tests stand in for the few names it uses).
	$(BIN)/python -m pip install -q --no-deps spandrel==0.4.2 einops==0.8.2
	# mobilesam-mirror: MobileSAM's own code, the reference the vit_t export tests compare against. It declares no
	# required dependencies, but its code imports timm and torchvision names (the tests stand in for them):
	# --no-deps keeps any later release from pulling them in.
	$(BIN)/python -m pip install -q --no-deps mobilesam-mirror==1.0.0
	touch $@

demo: setup
	$(BIN)/isekai demo

# The page on the demo's small checkpoints: the embedded Triton plus `isekai web`, printing the URL (Ctrl-C stops).
web: setup
	$(BIN)/isekai demo --web

# ruff first: it takes seconds and a finding fails the run before the half hour of tests.
test: setup
	./scripts/install-test-deps
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

# The linter and its rules are pinned in pyproject.toml ([tool.ruff]).
lint: setup
	$(BIN)/ruff check .

bench: setup
	$(BIN)/python -m bench

clean:
	rm -rf .demo .pytest_cache
