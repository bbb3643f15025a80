# `make demo` and `make test` do all set-up themselves on a fresh machine: they create
# .venv and install the pinned environment (requirements/constraints.txt) when it is
# missing or out of date; a second run reuses it and starts at once.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check -c requirements/constraints.txt
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: setup test demo bench docs lint clean

setup: $(STAMP)

# Order matters: fairseq-fixed compiles against the torch and numpy already in the
# venv (--no-build-isolation) and must not pull its declared torchaudio (--no-deps).
# The compile takes about 4 minutes once; pip caches the wheel for later venvs.
$(STAMP): requirements/constraints.txt setup.py Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) pip setuptools
	$(PIP) torch numpy cython
	$(PIP) --no-deps --no-build-isolation fairseq-fixed
	@# DeepSpeed, for the ZeRO tests (they run it on CPU with DS_ACCELERATOR=cpu): no ops
	@# built ahead (DS_BUILD_OPS=0), and --no-deps so that its torch requirement pulls
	@# nothing; its runtime needs come with the deepspeed extra, pinned like the rest.
	DS_BUILD_OPS=0 $(PIP) --no-deps --no-build-isolation deepspeed
	$(PIP) -e '.[fairseq,hf,deepspeed,experiments,test,dev]'
	DS_ACCELERATOR=cpu $(PY) -c "import torch, fairseq, transformers, datasets, sacrebleu, deepspeed, softadam_nlp; \
	          print('environment ready: torch', torch.__version__, '| fairseq', fairseq.__version__, \
	                '| transformers', transformers.__version__, '| deepspeed', deepspeed.__version__)"
	@# SoftAdam's fused CPU kernel compiles on first use (about a minute, then cached
	@# in ~/.cache/torch_extensions): build it now, so no run pays for it.
	$(PY) -c "from softadam_nlp._fused import fused_cpu_kernel, fused_cpu_unavailable_reason as why; \
	          print('SoftAdam fused CPU kernel:', 'ready' if fused_cpu_kernel() else why())"
	touch $@

test: $(STAMP)
	$(PY) -m pytest tests $(PYTEST_ARGS)

# The documentation site from docs/ (MkDocs, Material theme, API reference from the
# docstrings): `make docs` builds it into site/ (strict: a broken link fails);
# `make docs SERVE=1` serves it at http://127.0.0.1:8000 while you edit.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs $(if $(SERVE),serve,build --strict)

# ruff, configured in pyproject.toml; `make test` runs the same check (tests/test_project.py).
lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

demo: $(STAMP)
	$(PY) scripts/demo.py

bench: $(STAMP)
	$(PY) scripts/bench_optimizer.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build dist site *.egg-info
