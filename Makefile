# The two set-up commands of README.md: `make demo` and `make test`.
# Both create .venv on first use (torch from the local wheel cache when present).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell sha256sum pyproject.toml | cut -c1-12)

.PHONY: install demo test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $@

demo: install
	PATH="$(CURDIR)/$(BIN):$$PATH" bash pipelines/demo.sh

test: install
	$(BIN)/python -m pytest

bench: install
	$(BIN)/python benchmarks/build_shards.py --quick
	$(BIN)/python benchmarks/tokenizer.py
	$(BIN)/python benchmarks/loader.py

clean:
	rm -rf demo_out .pytest_cache
