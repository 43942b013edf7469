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

# MONAI Label 0.8.5 in its OWN venv (never $(VENV)): its pins (numpy<2, jsonschema<4 via pydicom-seg, pydicom<3)
# clash with the project's, and its torchvision needs the matching torch pair. The project goes in --no-deps
# because it asks for jsonschema>=4, which only the bundle schema check uses; its other dependencies come with
# monailabel's, plus SimpleITK and matplotlib named here. sam2 (a monailabel dependency) is an sdist that builds
# against torch: --no-build-isolation builds it against the torch installed first instead of installing a second
# torch (and its CUDA wheels) into a throw-away build environment. Idempotent: the stamp file.
LABEL_VENV  ?= .venv-label
LABEL_TORCH ?= torch==2.14.1 torchvision==0.29.1
LABEL_PY     = $(LABEL_VENV)/bin/python

.PHONY: label-env

$(LABEL_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(LABEL_VENV)
	$(LABEL_PY) -m pip install -q $(LABEL_TORCH) "setuptools>=64" wheel
	$(LABEL_PY) -m pip install -q --no-build-isolation monailabel==0.8.5 "pydicom<3" "pynetdicom<3" \
		"dicomweb-client<0.60" SimpleITK matplotlib $(LABEL_TORCH)
	$(LABEL_PY) -m pip install -q --no-build-isolation --no-deps -e .
	$(LABEL_PY) -c "import monailabel, torchvision, monai, networks, pipeline"
	touch $@

label-env: $(LABEL_VENV)/.installed
