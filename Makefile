# Development entry points. `make test` provisions everything on a fresh machine (venv, ComfyUI, tiny
# models) and then lints and tests; a second run reuses the cache and starts testing within seconds.
# COMFYUI_PATH=/path/to/ComfyUI make test  tests against an existing ComfyUI tree instead.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
CACHE ?= .cache
PYTEST_ARGS ?=
DEMO_ARGS ?=

.PHONY: setup test lint unit clean demo

setup:
	@COMFYUI_PATH="$(COMFYUI_PATH)" VENV="$(abspath $(VENV))" CACHE="$(abspath $(CACHE))" bash flowdps_dev/setup.sh

lint: setup
	$(VENV)/bin/ruff check .

test: setup lint
	source $(CACHE)/env.sh && FLOWDPS_REQUIRE_COMFY=1 $(PY) -m pytest $(PYTEST_ARGS)

# FlowDPS SR x4 of a real photo through workflows/flowdps_sd3_superres_x4.json (tiny random models unless
# DEMO_ARGS="--ckpt /path/to/sd3_medium_incl_clips.safetensors"); writes out/demo/. Options: --help.
demo: setup
	source $(CACHE)/env.sh && $(PY) flowdps_dev/demo.py $(DEMO_ARGS)

clean:
	rm -rf $(CACHE)/models $(CACHE)/env.sh .pytest_cache .ruff_cache
