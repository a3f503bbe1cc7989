# Development entry points. `make test` provisions everything on a fresh machine (venv, ComfyUI, tiny
# models) and then lints and tests; a second run reuses the cache and starts testing within seconds.
# COMFYUI_PATH=/path/to/ComfyUI make test  tests against an existing ComfyUI tree instead.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
CACHE ?= .cache
PYTEST_ARGS ?=
DEMO_ARGS ?=

.PHONY: setup test lint unit clean demo bench eval

setup:
	@COMFYUI_PATH="$(COMFYUI_PATH)" VENV="$(abspath $(VENV))" CACHE="$(abspath $(CACHE))" bash flowdps_dev/setup.sh

# ruff over the whole tree, then mypy (strict) over operators/ and samplers/ ([tool.mypy] in pyproject.toml)
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

test: setup lint
	source $(CACHE)/env.sh && FLOWDPS_REQUIRE_COMFY=1 $(PY) -m pytest $(PYTEST_ARGS)

# FlowDPS SR x4 of a real photo through "example_workflows/1 - Upscale a photo 4x (SD3).json" (tiny random models unless
# DEMO_ARGS="--ckpt /path/to/sd3_medium_incl_clips.safetensors"); writes out/demo/. Options: --help.
demo: setup
	source $(CACHE)/env.sh && $(PY) flowdps_dev/demo.py $(DEMO_ARGS)

# Benchmarks (benchmarks/bench.py): cost split per step, bare-loop floor, memory vs particles, decoder-gradient
# options; writes benchmarks/results.json and the summary in benchmarks/README.md. BENCH_ARGS="--quick" checks it.
BENCH_ARGS ?=
bench: setup
	source $(CACHE)/env.sh && FLOWDPS_BENCH_MAKE=1 $(PY) benchmarks/bench.py $(BENCH_ARGS)

# The paper's protocol on a folder of clean images through ComfyUI servers (evaluation/, python -m evaluation):
#   make eval DATA=path/to/images MODEL=sd3_medium_incl_clips.safetensors EVAL_ARGS="--server http://gpu1:8188"
# Without --server it starts a local server; MODEL may then be a checkpoint file. Options: --help.
DATA ?=
MODEL ?=
EVAL_ARGS ?=
eval: setup
	@if [ -z "$(DATA)" ] || [ -z "$(MODEL)" ]; then echo "make eval needs DATA=<folder of clean images> and MODEL=<SD3 checkpoint name or file>" >&2; exit 2; fi
	source $(CACHE)/env.sh && $(PY) -m evaluation --data "$(DATA)" --model "$(MODEL)" $(EVAL_ARGS)

clean:
	rm -rf $(CACHE)/models $(CACHE)/env.sh .cache/mypy .pytest_cache .ruff_cache
