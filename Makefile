# The README's two commands: `make demo` (set up + run the embedded demo) and `make test` (set up + run the tests).
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.mimkit-installed

.PHONY: demo test setup clean docs docs-serve docs-reference figures

demo: $(STAMP)
	$(BIN)/mimkit pretrain --output_dir runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=20

setup: $(STAMP)

# torch/torchvision resolve to the builds pinned by the range in pyproject.toml.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -e ".[test,export,docs,openmmlab]" 2>&1 | grep -v "^WARNING: Location" || true
	$(BIN)/python -c "import mimkit, torch, timm, transformers, mkdocs, mkdocstrings"
	touch $(STAMP)

# The documentation site (mkdocs.yml): built strictly, so a broken link or a page missing from the nav fails.
# tests/test_docs.py builds it too (in `make test`) and fails when the generated CLI reference is stale.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/python -m mkdocs build --strict

docs-serve: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/python -m mkdocs serve

# Regenerate the CLI reference (docs/reference/cli/*.md) from the parsers and config schemas.
docs-reference: $(STAMP)
	$(BIN)/python docs/gen_reference.py

# Regenerate every picture the docs show, from short runs on built-in data (minutes on a CPU).
figures: $(STAMP)
	$(BIN)/python docs/figures/make_figures.py

clean:
	rm -rf $(VENV) runs site
