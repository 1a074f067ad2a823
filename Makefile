# napari-instseg: two commands do everything (see README.md).
#   make demo   napari with the plugin docked and sample worms loaded (demo.png when headless)
#   make test   the whole suite: ruff, import contract, npe2 manifest, pytest (napari under Xvfb)
# Both create .venv on first use (torch pinned to the local CPU wheel) and are safe to re-run.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test lint setup system-deps clean-venv weights

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned: a bare 'torch' would pull several GB of CUDA wheels
	$(BIN)/python -m pip install -q "torch==$(TORCH_VERSION)"
	$(BIN)/python -m pip install -q -e ".[testing]"
	@touch $(STAMP)

setup: system-deps $(STAMP)

# Xvfb (and the X/GL libraries Qt needs) from apt when missing; no-op when present.
system-deps:
	@if ! command -v Xvfb >/dev/null 2>&1; then \
	  SUDO=""; [ "$$(id -u)" -ne 0 ] && SUDO="sudo"; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq \
	    xvfb xauth libgl1 libegl1 libxkbcommon-x11-0 libxcb-icccm4 libxcb-image0 \
	    libxcb-keysyms1 libxcb-randr0 libxcb-render-util0 libxcb-xinerama0 libxcb-xfixes0 \
	    libxcb-shape0 libxcb-cursor0 libdbus-1-3 libfontconfig1 >/dev/null; \
	fi

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/npe2 validate napari-instseg

test: setup lint
	$(BIN)/python -m pytest -ra -q

demo: setup
	@if [ -n "$$DISPLAY" ]; then \
	  $(BIN)/python -m napari_instseg.demo; \
	else \
	  xvfb-run -a -s "-screen 0 1600x1000x24" $(BIN)/python -m napari_instseg.demo --screenshot demo.png; \
	fi

clean-venv:
	rm -rf $(VENV)
