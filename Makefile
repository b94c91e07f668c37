# Quickstart: `make demo` and `make test` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The environment: every package pinned, resolved by `make lock` for Linux x86_64 and Python 3.11.
# pyproject.toml keeps the library's ranges; an upstream release changes nothing here until the lock
# is re-resolved on purpose.
LOCK := requirements/lock.txt
TORCH_PIN := requirements/torch.in
# torch is installed before the lock so its build can be chosen: the lock pins the version only.
# Where pip would otherwise resolve a CUDA build (plain PyPI on Linux), point TORCH_INDEX at a CPU
# wheel index, e.g. TORCH_INDEX=https://download.pytorch.org/whl/cpu; `make lock` needs it there too.
TORCH_SPEC ?= $(or $(shell sed -n 's/^\(torch==[^ ;]*\).*/\1/p' $(LOCK) 2>/dev/null),torch==2.13.0)
TORCH_INDEX ?=
PIP_SPEC := $(or $(shell sed -n 's/^\(pip==[^ ;]*\).*/\1/p' $(LOCK) 2>/dev/null),pip)
PIP_TOOLS_SPEC := $(or $(shell sed -n 's/^\(pip-tools==[^ ;]*\).*/\1/p' $(LOCK) 2>/dev/null),pip-tools>=7.4)
# make lock resolves in a venv of its own: the project's venv installs from the lock being replaced,
# and its pip check would refuse a pyproject.toml that asks for more than that lock holds.
LOCK_VENV := .venv-lock
STAMP := $(VENV)/.installed
PYTEST := $(BIN)/python -m pytest -n 2 --dist loadfile

.PHONY: install demo serve check test lint docs lock upgrade-lock newest clean

install: $(STAMP)

$(STAMP): pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(PIP_SPEC)"
	$(BIN)/python -m pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -r $(LOCK)
	$(BIN)/python -m pip install -q --no-deps -e .
	$(BIN)/python -m pip check  # a lock that no longer meets pyproject.toml's ranges fails here
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/lightning fit --config experiments/demos/clip4cir.yaml

# The demo's model as a service with a web page: http://127.0.0.1:8000/ (run `make demo` first).
serve: $(STAMP)
	$(BIN)/cir serve --config experiments/demos/clip4cir.yaml --ckpt outputs/clip4cir_demo/checkpoints/last.ckpt

lint: $(STAMP)
	$(BIN)/ruff check .

# The inner loop: lint and the unit tests (about 2 minutes on two cores). `make test` is what CI runs.
# CHECK_ARGS='-m "not slow"' also leaves out the unit tests marked slow (about 1 minute).
CHECK_ARGS ?=
check: $(STAMP)
	$(BIN)/ruff check .
	$(PYTEST) tests/unit $(CHECK_ARGS)

# The documentation site (mkdocs.yml, docs/) into an ignored folder. --strict turns every warning into
# a failure: a broken link or anchor, a page missing from the nav, a nav entry without its page, a
# reference identifier griffe cannot find (it reads the source: nothing is imported). A few seconds.
SITE_DIR := site
DOCS := NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet --site-dir $(SITE_DIR)
docs: $(STAMP)
	$(DOCS)

# The whole suite and the docs. Two workers (pytest-xdist), one file each at a time so module fixtures
# are built once; the docs first, since they fail in seconds.
test: $(STAMP)
	$(BIN)/ruff check .
	$(DOCS)
	$(PYTEST)

# Re-resolve the lock after a change to pyproject.toml or requirements/torch.in, keeping every pin
# that still fits; `make upgrade-lock` moves everything to the newest allowed versions, and
# `make upgrade-lock PACKAGES="transformers kernels"` only those. Review the diff, then `make test`.
LOCK_ARGS ?=
$(LOCK_VENV)/bin/pip-compile:
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install -q "$(PIP_SPEC)" "$(PIP_TOOLS_SPEC)"

lock: $(LOCK_VENV)/bin/pip-compile
	@$(LOCK_VENV)/bin/python -c 'import platform, sys; sys.exit(None if (sys.platform, platform.machine(), sys.version_info[:2]) == ("linux", "x86_64", (3, 11)) else "make lock resolves for Linux x86_64 and Python 3.11; run it there")'
	cp $(LOCK) $(LOCK).new 2>/dev/null || true  # pip-compile keeps the pins it finds in its output file
	CUSTOM_COMPILE_COMMAND="make lock" $(LOCK_VENV)/bin/pip-compile --quiet --extra dev --strip-extras --allow-unsafe \
		--no-emit-index-url --no-emit-find-links $(if $(TORCH_INDEX),--pip-args "--extra-index-url $(TORCH_INDEX)") \
		$(LOCK_ARGS) --output-file $(LOCK).new pyproject.toml $(TORCH_PIN)
	sed -i 's/^torch==\([^+ ;]*\)+[^ ;]*/torch==\1/' $(LOCK).new
	@! grep -nE '^(nvidia-|cuda-|triton==)' $(LOCK).new || { rm $(LOCK).new; echo "not written: the lock would pull CUDA packages (torch resolved from a CUDA build's metadata); set TORCH_INDEX to a CPU wheel index" >&2; exit 1; }
	mv $(LOCK).new $(LOCK)

upgrade-lock: LOCK_ARGS = $(if $(PACKAGES),$(foreach p,$(PACKAGES),--upgrade-package $(p)),--upgrade)
upgrade-lock: lock

# Before upgrading the lock: the newest release of every dependency pyproject.toml allows (the lock
# ignored), in a venv of its own, then the inner loop (ruff and the unit tests) on it. Upstream
# breaks (a transformers internal we rely on, a renamed API) show here before users meet them; a
# green run says `make upgrade-lock` is safe to try. TORCH_INDEX as for install (otherwise pip may
# take a CUDA build of torch: it works on the CPU, only larger).
NEWEST_VENV := .venv-newest
newest:
	rm -rf $(NEWEST_VENV)
	$(PYTHON) -m venv $(NEWEST_VENV)
	$(NEWEST_VENV)/bin/python -m pip install -q --upgrade pip
	$(NEWEST_VENV)/bin/python -m pip install -q --upgrade $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) torch
	$(NEWEST_VENV)/bin/python -m pip install -q --upgrade -e ".[dev]"
	$(NEWEST_VENV)/bin/python -m pip list --format=freeze > $(NEWEST_VENV)/versions.txt
	@echo "versions installed: $(NEWEST_VENV)/versions.txt (compare with $(LOCK))"
	$(NEWEST_VENV)/bin/ruff check .
	NO_MKDOCS_2_WARNING=1 $(NEWEST_VENV)/bin/mkdocs build --strict --quiet --site-dir $(SITE_DIR)
	$(NEWEST_VENV)/bin/python -m pytest -n 2 --dist loadfile tests/unit $(CHECK_ARGS)

clean:
	rm -rf $(VENV) $(LOCK_VENV) $(NEWEST_VENV) data outputs mlflow.db mlartifacts lightning_logs $(LOCK).new $(SITE_DIR)
