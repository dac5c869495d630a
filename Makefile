# banyan-kproxy: `make demo` runs the proxy on loopback; `make test` installs what the
# tests need and runs lint plus the whole suite on the newest and the oldest supported
# dependency sets.

PYTHON ?= python3
VENV := .venv
VENV_OLDEST := .venv-oldest
TRIAL_ARGS ?= tests

.PHONY: all demo test test-newest test-oldest lint venv clean check-tools bench bench-tools

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

# The tests drive real peers: kubectl (on the machine), openssl, curl and tinyproxy
# (a real CONNECT proxy as the connect service's next hop).
check-tools:
	@command -v openssl >/dev/null && command -v curl >/dev/null || \
	  (apt-get update -qq && apt-get install -y -qq openssl curl >/dev/null)
	@command -v tinyproxy >/dev/null || \
	  (apt-get update -qq && apt-get install -y -qq tinyproxy >/dev/null)
	@command -v kubectl >/dev/null || { echo "kubectl is not on PATH: the integration tests need it" >&2; exit 1; }

lint: $(VENV)/.stamp
	$(VENV)/bin/ruff check banyan_kproxy tests twisted benchmarks

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

# `make bench` measures the proxy side by side with direct access and HAProxy on
# loopback and prints the table (benchmarks/bench.py; `make bench BENCH_ARGS=--quick`
# for a short run, `BENCH_ARGS="--only small-get"` for one scenario).  nginx plays the
# apiserver, HAProxy is the comparison, wrk and curl load it (all Debian packages).
BENCH_TOOLS := nginx haproxy wrk curl
BENCH_ARGS ?=

bench-tools:
	@missing=""; for tool in $(BENCH_TOOLS); do \
	  PATH="$$PATH:/usr/sbin:/sbin" command -v $$tool >/dev/null || missing="$$missing $$tool"; done; \
	  if [ -n "$$missing" ]; then \
	    $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; fi

bench: $(VENV)/.stamp bench-tools
	$(VENV)/bin/pip install --quiet --disable-pip-version-check --no-deps --force-reinstall .
	PYTHONPATH=$(CURDIR) $(VENV)/bin/python benchmarks/bench.py $(BENCH_ARGS)

# `make load` runs 500 concurrent connections for 60 s (twice, after a warm-up)
# through the daemon, mixing GETs, watches and exec tunnels, and fails on any error
# or on descriptors or memory not back to their baseline (benchmarks/load.py; the
# report also goes to build/load.json, the daemon's log to build/load/).
# `make load LOAD_ARGS=--short` is the form CI runs (tests/test_load.py).
LOAD_ARGS ?=

.PHONY: load
load: $(VENV)/.stamp
	$(VENV)/bin/pip install --quiet --disable-pip-version-check --no-deps --force-reinstall .
	rm -rf build/load && mkdir -p build
	PYTHONPATH=$(CURDIR) $(VENV)/bin/python benchmarks/load.py --dir build/load --json build/load.json $(LOAD_ARGS)

clean:
	rm -rf $(VENV) $(VENV_OLDEST) build dist *.egg-info _trial_temp* .demo

# --- Debian package ----------------------------------------------------------------
# `make deb` builds banyan-kproxy_<version>_all.deb (plus the native source package
# and .changes) in build/deb/, on Debian's own python3-* packages, and runs lintian.
# Debian's tools run with a clean environment: no pyenv shims or virtualenv on PATH.
# The build runs the whole trial suite under Debian's python3 (DEB_BUILD_OPTIONS=nocheck
# skips it).  `make deb-test` installs the .deb with apt-get, runs the installed daemon
# as the banyan-kproxy user with twistd3 and drives it with kubectl, then purges the
# package and checks nothing is left (tests/test_deb_package.py).
DEB_DIR := build/deb
DEB_SRC := $(DEB_DIR)/banyan-kproxy
DEB_PATH := /usr/sbin:/usr/bin:/sbin:/bin
DEB_ENV = env -i PATH=$(DEB_PATH) HOME=$(CURDIR)/$(DEB_DIR) LANG=C.UTF-8 \
	DEB_BUILD_OPTIONS="$(DEB_BUILD_OPTIONS)" DEBIAN_FRONTEND=noninteractive
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
DEB_TEST_TIMEOUT ?= 600

.PHONY: deb deb-test

deb:
	rm -rf $(DEB_DIR)
	mkdir -p $(DEB_SRC)
	@# Only what git tracks or would track (no virtualenvs, _trial_temp, caches).
	git ls-files -z --cached --others --exclude-standard \
	  | grep -zvE '(^|/)(_trial_temp[^/]*|\.hypothesis|dropin\.cache)(/|$$)' \
	  | tar --null --ignore-failed-read -cf - -T - | tar -xf - -C $(DEB_SRC)
	cd $(DEB_SRC) && $(DEB_ENV) dpkg-checkbuilddeps 2>/dev/null || \
	  { $(SUDO) $(DEB_ENV) apt-get update -qq && \
	    $(SUDO) $(DEB_ENV) apt-get build-dep -y -qq $(CURDIR)/$(DEB_SRC) >/dev/null; }
	command -v lintian >/dev/null || $(SUDO) $(DEB_ENV) apt-get install -y -qq lintian >/dev/null
	cd $(DEB_SRC) && $(DEB_ENV) dpkg-buildpackage -us -uc
	$(DEB_ENV) lintian --fail-on error,warning --display-info $(DEB_DIR)/*.changes
	ls -l $(DEB_DIR)/*.deb

deb-test: $(VENV)/.stamp check-tools
	test -n "$$(ls $(DEB_DIR)/banyan-kproxy_*_all.deb 2>/dev/null)" || $(MAKE) deb
	$(SUDO) $(DEB_ENV) apt-get install -y -qq ./$$(ls $(DEB_DIR)/banyan-kproxy_*_all.deb | tail -1)
	BANYAN_KPROXY_DEB_TEST=installed PYTHONPATH=$(CURDIR) timeout $(DEB_TEST_TIMEOUT) \
	  $(VENV)/bin/trial --temp-directory=_trial_temp.deb tests.test_deb_package
	$(SUDO) $(DEB_ENV) apt-get purge -y -qq banyan-kproxy
	BANYAN_KPROXY_DEB_TEST=purged PYTHONPATH=$(CURDIR) timeout $(DEB_TEST_TIMEOUT) \
	  $(VENV)/bin/trial --temp-directory=_trial_temp.deb tests.test_deb_package
