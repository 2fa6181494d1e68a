# Every target creates or refreshes .venv itself: `make figures`, `make test` and `make demo` work on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: figures demo test lint notebooks peers bench clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,viz,fast]'
	touch $(STAMP)

# The main job: train the toy models and redraw the README's gallery (a few minutes on 2 cores).
figures: $(STAMP)
	$(PY) -m attention_ref figures --out figures

demo: $(STAMP)
	$(PY) -m attention_ref demo

lint: $(STAMP)
	$(PY) -m ruff check .

test: $(STAMP) lint
	$(PY) -m pytest
	$(MAKE) notebooks

# Every notebook, run top to bottom in a fresh kernel (nbmake); the committed copies keep their outputs.
notebooks: $(STAMP)
	$(PY) -m pytest --nbmake notebooks

# The optional cross-check peers: CPU torch (pinned to the build on the machine's disk) and diffusers.
peers: $(STAMP)
	$(PY) -m pip install -q 'torch==2.13.0' 'diffusers>=0.30'

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
