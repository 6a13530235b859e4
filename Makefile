# llmctl: `make demo` runs the quickstart, `make test` the tests. Both set themselves up.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The CPU wheel is installed first where there is no GPU, so the rest resolves to it
# instead of pulling a multi-GB CUDA build. Override TORCH_SPEC / TORCH_PIP_ARGS to choose.
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
EXTRAS ?= dev
CONFIG ?= configs/quickstart.yaml
export HF_HUB_DISABLE_PROGRESS_BARS := 1

.PHONY: install browser test test-all demo demo-vision bench lint docs screenshots clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PIP) install -q "$(TORCH_SPEC)" $(TORCH_PIP_ARGS); fi
	$(PIP) install -q -e ".[$(EXTRAS)]"
	touch $@

# The browser tests (report page, playground) drive Debian's chromium through Playwright
# (executable_path: no browser download). It is not on a new machine: installed here where
# missing, as root (or with passwordless sudo); elsewhere those tests skip and say why.
CHROMIUM ?= /usr/bin/chromium
APT_CHROMIUM = apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium

browser:
	@if [ -x $(CHROMIUM) ]; then :; \
	elif ! command -v apt-get >/dev/null 2>&1; then echo "make browser: no $(CHROMIUM) and no apt-get: the browser tests will skip"; \
	elif [ "$$(id -u)" = 0 ]; then $(APT_CHROMIUM); \
	elif sudo -n true 2>/dev/null; then sudo sh -c '$(APT_CHROMIUM)'; \
	else echo "make browser: no $(CHROMIUM) and not root: the browser tests will skip (sudo apt-get install chromium)"; fi

# Two tiers. `make test`: everything not marked slow (under 8 minutes on 2 quiet cores).
# `make test-all`: both tiers in one run (the slow one adds end-to-end pipelines, torchrun,
# llama.cpp), so its closing line counts every test. pytest's exit code 5 (no test selected)
# is not a failure.
PYTEST = HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -q --durations=10 $(PYTEST_ARGS)

test: install browser
	$(PYTEST) -m "not slow" || [ $$? -eq 5 ]

test-all: install browser
	$(PYTEST) || [ $$? -eq 5 ]

demo: install
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(VENV)/bin/llmctl run $(CONFIG)

# The vision quickstart (configs/vision-quickstart.yaml): a LLaVA-style model on synthetic shapes, offline.
demo-vision: install
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(VENV)/bin/llmctl run configs/vision-quickstart.yaml

bench: install
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) bench/run_all.py

docs: install
	$(PY) -c "import pathlib; from llmctl.config import readme_with_reference as r; p = pathlib.Path('README.md'); p.write_text(r(p.read_text()))"

# README images: the report of RUN (default: the quickstart's) and the playground serving its model.
RUN ?= runs/quickstart
screenshots: install browser
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) docs/screenshots.py $(RUN)

lint: install
	$(PY) -m ruff check llmctl tests bench

clean:
	rm -rf $(VENV) runs bench/results .pytest_cache
