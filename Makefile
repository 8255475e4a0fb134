# One-command set-up: `make test` (tests) and `make demo` (condense real FashionMNIST on the CPU).
# Both create .venv from requirements.txt when it is missing or older than requirements.txt, and
# install Debian's FashionMNIST when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FASHION_DIR ?= /usr/share/datasets/fashion-mnist

.PHONY: test demo venv fashion bench clean-venv

venv: $(STAMP)

$(STAMP): requirements.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	@touch $(STAMP)

fashion:
	@if [ -f $(FASHION_DIR)/train-images-idx3-ubyte.gz ] || [ -f $(FASHION_DIR)/train-images-idx3-ubyte ]; then \
	  echo "FashionMNIST: $(FASHION_DIR)"; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	  (apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null) || \
	  { echo "apt-get could not install dataset-fashion-mnist"; exit 1; }; \
	  echo "FashionMNIST installed in $(FASHION_DIR)"; \
	else \
	  echo "FashionMNIST is missing from $(FASHION_DIR). On Debian/Ubuntu run:"; \
	  echo "  sudo apt-get install dataset-fashion-mnist"; \
	  echo "elsewhere put the four IDX files (train/t10k images/labels, .gz or not) in a folder"; \
	  echo "and run: make test FASHION_DIR=/that/folder"; exit 1; \
	fi

test: $(STAMP) fashion
	IDC_FASHION_DIR=$(FASHION_DIR) $(PY) -m pytest -q tests

demo: $(STAMP) fashion
	FASHION_DIR=$(FASHION_DIR) PY=$(PY) bash misc/demo.sh

bench: $(STAMP) fashion
	$(PY) misc/benchmark.py --data_dir $(FASHION_DIR)

clean-venv:
	rm -rf $(VENV)
