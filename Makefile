# The two commands: `make run` and `make test`. Both bootstrap .venv themselves.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.p2p-installed

.PHONY: run test test-plain lint format bench clean lock

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# A plain (non-editable) install, as a user gets it: twistd finds the plugins
# pip copied into twisted/plugins/. Any change to the sources reinstalls; the
# tests' child processes run this checkout (tests/support.py sets PYTHONPATH).
# Every dependency is pinned by constraints.txt, so `make run`, `make test` and
# CI install the same versions; `make lock` refreshes the pins.
SOURCES := pyproject.toml constraints.txt $(shell find p2p twisted -name '*.py' -o -name '*.x' 2>/dev/null)
$(STAMP): $(SOURCES) | $(BIN)/python
	$(BIN)/python -m pip install -q -c constraints.txt '.[test]'
	touch $@

# Resolve the newest versions pyproject.toml allows in a scratch venv and pin
# them (the project itself, pip and setuptools, which the venv brings, are left out).
lock:
	rm -rf .lock-venv
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install -q '.[test]'
	{ echo "# Pinned by 'make lock' from pyproject.toml; 'make run', 'make test' and CI install these."; \
	  .lock-venv/bin/python -m pip freeze --all --exclude p2p --exclude pip --exclude setuptools; } > constraints.txt
	rm -rf .lock-venv

# The terminal shows the services' own lines (addresses, client command, records);
# twistd's log goes to p2p-stack.log. Ctrl-C stops the stack cleanly.
# P2P_DEMO_DIR: the stack fills demo/ (ignored by git: alice's share with
# hello.txt, bob's empty one) and prints a tour to paste, absolute paths only.
DEMO ?= $(CURDIR)/demo
# Prometheus metrics of the whole stack, on loopback (the stack prints the URL).
METRICS ?= tcp:9100:interface=127.0.0.1
run: $(STAMP)
	@echo "p2p-stack: twistd log in p2p-stack.log; options: make run ARGS='--help'"
	P2P_DEMO_DIR='$(DEMO)' $(BIN)/twistd -n --pidfile= --logfile=p2p-stack.log p2p-stack \
	  --metrics $(METRICS) $(ARGS)

# `python -m` puts the checkout first on sys.path: the suite tests this tree.
test: $(STAMP)
	$(BIN)/python -m twisted.trial $(or $(TESTS),tests)

# The same suite with every private Twisted API switched off (p2p/twisted_internals.py).
test-plain: $(STAMP)
	P2P_PLAIN_TWISTED=1 $(BIN)/python -m twisted.trial $(or $(TESTS),tests)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) build dist *.egg-info _trial_temp* demo
