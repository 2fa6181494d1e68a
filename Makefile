# Every target creates or refreshes .venv itself: `make figures`, `make test` and `make demo` work on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LAB_STAMP := $(VENV)/.lab-installed

.PHONY: figures demo test lint notebooks notebooks-outputs lab peers bench clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,viz,fast]'
	touch $(STAMP)

# The main job: train the toy models and redraw the README's gallery (a few minutes on 2 cores).
# It REWRITES the committed figures/*.png and figures/complexity.json: look at them before committing.
figures: $(STAMP)
	$(PY) -m attention_ref figures --out figures

demo: $(STAMP)
	$(PY) -m attention_ref demo

lint: $(STAMP)
	$(PY) -m ruff check .

# Needs nothing but Python and make. The optional peers (torch, diffusers, transformers: `make peers`) are not
# installed by it: their tests and the notebook that needs them are skipped, and pytest's summary says so.
test: $(STAMP) lint
	$(PY) -m pytest
	$(MAKE) notebooks

# Every notebook, run top to bottom in a fresh kernel (nbmake; notebooks/conftest.py skips one whose peers are
# missing, saying which); the committed copies keep their outputs.
notebooks: $(STAMP)
	$(PY) -m pytest --nbmake notebooks

# The `notebooks` extra (JupyterLab, nbconvert) on top of the rest, in .venv.
$(LAB_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[notebooks]'
	touch $(LAB_STAMP)

# JupyterLab on the notebooks, with this checkout's attention_ref; `make lab LAB_ARGS=--no-browser` on a
# machine without a browser (then open the URL with the token that it prints).
LAB_ARGS ?=
lab: $(LAB_STAMP)
	$(VENV)/bin/jupyter lab --notebook-dir=notebooks $(LAB_ARGS)

# Re-execute every notebook and save its outputs in place (what the committed copies hold).
notebooks-outputs: $(LAB_STAMP)
	$(VENV)/bin/jupyter nbconvert --to notebook --execute --inplace notebooks/*.ipynb

# The optional cross-check peers, the `oracle` extra: torch, diffusers, transformers. torch is pinned here (and
# only here) to the CPU build that lies on the development and CI machines' disk: a bare "torch" from PyPI
# brings several GB of CUDA libraries.
peers: $(STAMP)
	$(PY) -m pip install -q 'torch==2.13.0' -e '.[oracle]'

# Time and peak memory of the attention paths and the small blocks against the machine's limit (peak GEMM
# rate + exp rate, measured in the same run on the same threads), torch SDPA and the bare GEMMs (several
# minutes; `make bench BENCH_ARGS=--quick` for N = 1024 and 4096 only, BENCH_ARGS=--breakdown for where
# the tiled path's time goes, BENCH_ARGS="--threads 1" on a busy machine). Writes bench-results.json.
# See docs/performance.md.
BENCH_ARGS ?=
bench: peers
	$(PY) -m attention_ref bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .hypothesis
