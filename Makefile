# The two commands: `make run` and `make test`. Both bootstrap .venv themselves.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.p2p-installed

.PHONY: run test lint format bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Editable in "compat" mode puts the checkout on sys.path, so twistd finds
# twisted/plugins/ here and child processes started by tests run this tree.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[test]' --config-settings editable_mode=compat
	touch $@

# The terminal shows the services' own lines (addresses, client command, records);
# twistd's log goes to p2p-stack.log. Ctrl-C stops the stack cleanly.
run: $(STAMP)
	@echo "p2p-stack: twistd log in p2p-stack.log; options: make run ARGS='--help'"
	$(BIN)/twistd -n --pidfile= --logfile=p2p-stack.log p2p-stack $(ARGS)

test: $(STAMP)
	$(BIN)/trial $(or $(TESTS),tests)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) build dist *.egg-info _trial_temp*
