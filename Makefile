# One-command entry points. Each target builds its own virtual environment on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.nnunet_gmd_installed

# torch and torchvision must come as a matching pair: nnU-Net's trainer discovery imports
# dynamic_network_architectures -> timm -> torchvision, which fails on a mismatched build.
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install test demo bench clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -rs tests

demo: $(STAMP)
	$(VENV)/bin/nnunet-gmd demo $(ARGS)

bench: $(STAMP)
	$(VENV)/bin/nnunet-gmd bench gmd --json

clean:
	rm -rf $(VENV) build dist *.egg-info
