# Two commands on a fresh machine with Python 3.11 and pip:
#   make demo   set up .venv and run the demo (dataset, training, export, explanations, report)
#   make test   set up .venv and run the test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python

.PHONY: demo test bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[train,dev]'
	touch $@

demo: $(VENV)/.installed
	$(PY) cli.py demo

# What only the tests need on top of [train,dev]: torch (CPU) to make ONNX files the PyTorch
# way, and torchvision's architectures (its compiled ops do not match the CPU torch here; the
# tests use only its Python model code: see _torchvision() in tests/test_autodiff.py).
$(VENV)/.installed-tests: $(VENV)/.installed
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet --no-deps torchvision==0.28.0
	touch $@

test: $(VENV)/.installed $(VENV)/.installed-tests
	@# Headless Chromium renders the live view and the report in a few tests; install it
	@# where we may (root with apt), otherwise those tests say they were skipped.
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1; } || true
	$(PY) -m pytest -q

bench: $(VENV)/.installed
	$(PY) cli.py bench

clean:
	rm -rf $(VENV) runs data out report
