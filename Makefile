# The two commands of the README's quick start, and the environment they share.
#   make demo   set up, then run the main job (ask a question about a video) on the built-in tiny default
#   make test   set up, then run the whole test suite
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch (any torch in setup.cfg's range works; this pin keeps CPU-only machines off CUDA wheels).
TORCH ?= torch==2.13.0
EXTRAS ?= test,video,train,quant,kernels,deepspeed,app

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet "$(TORCH)"
	$(VENV)/bin/pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

.PHONY: setup demo test
setup: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/vica2 demo

test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest tests -q
