# The README's two commands: `make demo` (set up + run the embedded demo) and `make test` (set up + run the tests).
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.mimkit-installed

.PHONY: demo test setup clean

demo: $(STAMP)
	$(BIN)/mimkit pretrain --output_dir runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

setup: $(STAMP)

# torch/torchvision resolve to the builds pinned by the range in pyproject.toml.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -e ".[test,export]" 2>&1 | grep -v "^WARNING: Location" || true
	$(BIN)/python -c "import mimkit, torch, timm, transformers" 
	touch $(STAMP)

clean:
	rm -rf $(VENV) runs
