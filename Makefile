# The two commands: `make run` and `make test`. Both bootstrap .venv themselves.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.p2p-installed

.PHONY: run test lint format bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# A plain (non-editable) install, as a user gets it: twistd finds the plugins
# pip copied into twisted/plugins/. Any change to the sources reinstalls; the
# tests' child processes run this checkout (tests/support.py sets PYTHONPATH).
SOURCES := pyproject.toml $(shell find p2p twisted -name '*.py' -o -name '*.x' 2>/dev/null)
$(STAMP): $(SOURCES) | $(BIN)/python
	$(BIN)/python -m pip install -q '.[test]'
	touch $@

# The terminal shows the services' own lines (addresses, client command, records);
# twistd's log goes to p2p-stack.log. Ctrl-C stops the stack cleanly.
run: $(STAMP)
	@echo "p2p-stack: twistd log in p2p-stack.log; options: make run ARGS='--help'"
	$(BIN)/twistd -n --pidfile= --logfile=p2p-stack.log p2p-stack $(ARGS)

# `python -m` puts the checkout first on sys.path: the suite tests this tree.
test: $(STAMP)
	$(BIN)/python -m twisted.trial $(or $(TESTS),tests)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) build dist *.egg-info _trial_temp*
