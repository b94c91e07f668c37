# Quickstart: `make demo` and `make test` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel of torch. Where pip would otherwise resolve a CUDA build (plain PyPI on Linux),
# point TORCH_INDEX at a CPU wheel index, e.g. TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
STAMP := $(VENV)/.installed

.PHONY: install demo serve test lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/lightning fit --config experiments/demos/clip4cir.yaml

# The demo's model as a service with a web page: http://127.0.0.1:8000/ (run `make demo` first).
serve: $(STAMP)
	$(BIN)/cir serve --config experiments/demos/clip4cir.yaml --ckpt outputs/checkpoints/last.ckpt

lint: $(STAMP)
	$(BIN)/ruff check .

# Two workers (pytest-xdist), one file each at a time so module fixtures are built once.
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -n 2 --dist loadfile

clean:
	rm -rf $(VENV) data outputs mlflow.db mlartifacts lightning_logs
