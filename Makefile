# make setup: install what the project needs (idempotent); make test: the whole suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup prosody venv test lint demo etcd bench-deps bench bench-quick clean

setup: prosody venv

# openssl makes the dev cluster's TLS certificate.
prosody:
	@{ command -v prosody && command -v openssl; } >/dev/null 2>&1 || { \
		echo "installing Debian's prosody and openssl"; \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
			prosody openssl \
		|| { $(SUDO) apt-get update && $(SUDO) env DEBIAN_FRONTEND=noninteractive \
			apt-get install -y --no-install-recommends prosody openssl; }; }
	@# Debian's package may start a system-wide Prosody; the project never uses it.

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

test: setup
	$(PY) -m ruff check protocol kvstore agent bench tests
	$(PY) -m pytest -q

lint: venv
	$(PY) -m ruff check protocol kvstore agent bench tests

demo: setup
	$(PY) -m kvstore.demo

# The benchmark also needs what it compares against: Debian's etcd-server (the
# binary only; the benchmark runs its own etcd on free loopback ports) and the
# bench extra (the etcd3 client). Neither is needed by setup or test.
etcd:
	@command -v etcd >/dev/null 2>&1 || { \
		echo "installing Debian's etcd-server"; \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
			etcd-server \
		|| { $(SUDO) apt-get update && $(SUDO) env DEBIAN_FRONTEND=noninteractive \
			apt-get install -y --no-install-recommends etcd-server; }; }
	@# Debian's package may start a system-wide etcd on port 2379; the benchmark never uses it.

bench-deps: setup etcd $(VENV)/.bench-installed

$(VENV)/.bench-installed: pyproject.toml $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[bench]'
	touch $@

bench: bench-deps
	$(PY) -m bench

bench-quick: bench-deps
	$(PY) -m bench --quick

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis .dev .demo
