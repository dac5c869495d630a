# banyan-kproxy: `make demo` runs the proxy on loopback; `make test` installs what the
# tests need and runs lint plus the whole suite on the newest and the oldest supported
# dependency sets.

PYTHON ?= python3
VENV := .venv
VENV_OLDEST := .venv-oldest
TRIAL_ARGS ?= tests

.PHONY: all demo test test-newest test-oldest lint venv clean check-tools

all: test

# One virtualenv per dependency set; rebuilt when the package's metadata changes.
$(VENV)/.stamp: setup.cfg pyproject.toml requirements/test.txt
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements/test.txt
	$(VENV)/bin/pip install --quiet --disable-pip-version-check .
	touch $@

$(VENV_OLDEST)/.stamp: setup.cfg pyproject.toml requirements/oldest.txt
	rm -rf $(VENV_OLDEST)
	$(PYTHON) -m venv $(VENV_OLDEST)
	$(VENV_OLDEST)/bin/pip install --quiet --disable-pip-version-check -r requirements/oldest.txt .
	touch $@

venv: $(VENV)/.stamp

# The tests drive real peers: kubectl (on the machine), openssl and curl.
check-tools:
	@command -v openssl >/dev/null && command -v curl >/dev/null || \
	  (apt-get update -qq && apt-get install -y -qq openssl curl >/dev/null)
	@command -v kubectl >/dev/null || { echo "kubectl is not on PATH: the integration tests need it" >&2; exit 1; }

lint: $(VENV)/.stamp
	$(VENV)/bin/ruff check banyan_kproxy tests twisted

# trial's console script is used rather than `python -m twisted.trial`, whose
# Twisted 22.4 entry point goes through pkg_resources and fails to find a
# wheel-installed zope.interface.
# The installed copy is refreshed (without dependencies) so that `twistd banyan-kproxy`
# run by the integration tests is the code under test.
test-newest: $(VENV)/.stamp check-tools
	$(VENV)/bin/pip install --quiet --disable-pip-version-check --no-deps --force-reinstall .
	PYTHONPATH=$(CURDIR) $(VENV)/bin/trial --temp-directory=_trial_temp.newest $(TRIAL_ARGS)

test-oldest: $(VENV_OLDEST)/.stamp check-tools
	$(VENV_OLDEST)/bin/pip install --quiet --disable-pip-version-check --no-deps --force-reinstall .
	PYTHONPATH=$(CURDIR) $(VENV_OLDEST)/bin/trial --temp-directory=_trial_temp.oldest $(TRIAL_ARGS)

test: lint test-newest test-oldest

demo: $(VENV)/.stamp
	$(VENV)/bin/pip install --quiet --disable-pip-version-check --no-deps --force-reinstall .
	$(VENV)/bin/banyan-kproxy demo --dir .demo

clean:
	rm -rf $(VENV) $(VENV_OLDEST) build dist *.egg-info _trial_temp* .demo
