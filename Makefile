# Two entry points, each usable on a fresh clone: they build (or reuse) .venv with the
# pinned versions in constraints.txt first. torch 2.13.0 is pinned there so that pip never
# pulls a CUDA build through fastai -> torchvision -> torch.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test docs sysdeps bench venv export clean-nbs

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# The project's main job: train a small model with optimizers built from callback lists.
# In a terminal it shows fastai's progress bars; redirected to a log, one line per epoch (ARGS="--progress ...").
demo: $(STAMP)
	$(BIN)/python examples/train_digits.py $(ARGS)

# Debian packages the docs need: Chromium for the browser test, MathJax served by the site itself.
sysdeps:
	@test -x /usr/bin/chromium -a -f /usr/share/javascript/mathjax/MathJax.js || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium libjs-mathjax fonts-mathjax; }

# The documentation site, from the notebooks, into _docs/ (offline; fails on any Sphinx warning).
docs: $(STAMP) sysdeps
	$(BIN)/python tools/build_docs.py

# The whole test suite: library in step with the notebooks, notebook tests, pytest suites (the docs site included).
test: $(STAMP) sysdeps
	$(BIN)/python tools/check_export.py
	$(BIN)/nbdev-test --n-workers 2
	$(BIN)/python -m pytest

# One optimizer step against fastai and torch.optim (benchmarks/bench_step.py; ARGS='--help' for options).
# `make bench ARGS=... > benchmarks/results/cpu.md` refreshes the table of the Performance page.
bench: $(STAMP)
	$(BIN)/python benchmarks/bench_step.py $(ARGS)

# Developer helpers (not needed by the commands above).
export: $(STAMP)
	$(BIN)/nbdev-export
clean-nbs: $(STAMP)
	$(BIN)/nbdev-clean
