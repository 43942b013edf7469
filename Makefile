# Two entry points do all the set-up on a fresh machine with Python >= 3.10 and make:
#   make demo   phantom cohort -> prepare -> (train -> evaluate, as those land) on data it generates
#   make test   the test suite
# torch is installed before the project so that pip never pulls a CUDA build you did not ask for.
# On a GPU machine:  make TORCH="torch" demo   (or any torch spec matching your CUDA).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
TORCH  ?= torch==2.13.0
PY      = $(VENV)/bin/python
DEMO_OUT ?= demo_out

.PHONY: venv demo test lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) -m pipeline demo --out $(DEMO_OUT)

test: venv
	$(PY) -m pytest -q

lint: venv
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(DEMO_OUT) .pytest_cache
