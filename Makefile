# make setup: install what the project needs (idempotent); make test: the whole suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup prosody venv test lint demo bench bench-quick clean

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

bench: setup
	$(PY) -m bench

bench-quick: setup
	$(PY) -m bench --quick

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis .dev .demo
