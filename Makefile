# `make test` and `make run` set up a virtual environment on a fresh machine first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch 2.14.1 / torchvision 0.29.1 are the releases this project's CI machines hold on disk;
# any torch >= 2.11 works (override: make test TORCH_SPEC="torch==2.11.0 torchvision==0.26.0").
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

# The oldest releases we support (the GPU machines' torch and triton): `make test-oldest` runs the
# whole suite on them in a second environment (not in CI: it downloads torch 2.11 from the registry).
# triton 3.6's interpreter needs numpy < 2.4.
OLDEST_SPEC ?= torch==2.11.0 torchvision==0.26.0 triton==3.6.0 'numpy<2.4'

.PHONY: install test test-oldest run clean

$(BIN)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e '.[test]'
	# The benchmark's peer, SpikingJelly 2.0, so its tests run: --no-deps because its metadata asks for
	# torchaudio (which would replace the torch pin) and more that the LIF modules never import.
	$(BIN)/python -m pip install -q --no-deps 'spikingjelly==2.0.0' 'loguru>=0.7,<1'
	touch $@

install: $(BIN)/.installed

test: install
	$(BIN)/python -m pytest -q

test-oldest:
	$(MAKE) test VENV=.venv-oldest TORCH_SPEC="$(OLDEST_SPEC)"

run: install
	$(BIN)/python -m train.run

clean:
	rm -rf $(VENV) .venv-oldest .pytest_cache .hypothesis
