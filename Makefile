# Quick start targets. `make run` and `make test` work on a fresh clone: they create .venv,
# install the CPU build of torch first (a plain `torch` requirement would pull CUDA wheels), then the package.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
# `phi3v synth` draws with these Debian fonts (chromium is for the web-page test)
FONT_PACKAGES := fonts-dejavu-core fonts-dejavu-extra fonts-liberation
FONT_CHECK := /usr/share/fonts/truetype/dejavu/DejaVuSansCondensed.ttf

.PHONY: setup run test clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test]"
	test -x /usr/bin/chromium -a -f $(FONT_CHECK) || { apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium $(FONT_PACKAGES); }
	touch $@

run: setup
	$(BIN)/phi3v demo

test: setup
	$(BIN)/python -m pytest -n 2 --durations=15 tests

clean:
	rm -rf $(VENV) checkpoints
