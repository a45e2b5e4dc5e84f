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

test: $(VENV)/.installed
	@# Headless Chromium renders the live view and the report in a few tests; install it
	@# where we may (root with apt), otherwise those tests say they were skipped.
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1; } || true
	$(PY) -m pytest -q

bench: $(VENV)/.installed
	$(PY) cli.py bench

clean:
	rm -rf $(VENV) runs data out report
