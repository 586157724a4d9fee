# notifyd: the two commands a newcomer needs are `make run` and `make test`.
# Both install what they need on Debian/Ubuntu (apt as root, or through sudo).

PYTHON ?= python3
LINTED := notifyd tests $(wildcard benchmarks)
VENV := .venv
BIN := $(VENV)/bin
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT_PACKAGES := rabbitmq-server
TEST_APT_PACKAGES := rabbitmq-server chromium prometheus postgresql
# `make run`: a private RabbitMQ node on DEV_AMQP_PORT, notifyd on DEV_PORT, both on
# 127.0.0.1. Its keys are published here and in the README (whose snippets use them):
# for this local demo only, never anywhere else.
DEV_AMQP_PORT ?= 5672
DEV_PORT ?= 8080
DEV_SECRET ?= notifyd-make-run-only-1f0c4e9b2a7d6c35e8
DEV_SERVICE_KEY ?= dev-service-key
# Web Push for `make run` (the demo's "offline -> push" toggle): a VAPID key made once in
# .run/ (kept until `make clean`, as browsers subscribe with its public half) and a
# SQLite store next to it; `make run-push` runs the worker that delivers with them.
DEV_VAPID_KEY := $(CURDIR)/.run/vapid.pem
DEV_PUSH_ENV := NOTIFYD_WEBPUSH_VAPID_PRIVATE_KEY=$(DEV_VAPID_KEY) \
  NOTIFYD_WEBPUSH_DATABASE_URL=sqlite:///$(CURDIR)/.run/push.sqlite3 \
  NOTIFYD_WEBPUSH_VAPID_SUBJECT=mailto:dev@localhost

.PHONY: help setup setup-test run run-push test lint format bench clean

help:
	@echo "make run    - local RabbitMQ + notifyd with the demo at http://127.0.0.1:$(DEV_PORT)/demo"
	@echo "make run-push - next to make run: the Web Push worker for the demo's offline -> push toggle"
	@echo "make test   - ruff, mypy and the whole test suite (real RabbitMQ, headless Chromium)"
	@echo "make bench  - benchmarks against baselines (see benchmarks/README.md)"

# Debian packages, installed only when missing. policy-rc.d keeps the packages from
# starting a system RabbitMQ or PostgreSQL: the tests and `make run` start private ones.
define apt_install
	@missing=""; for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  printf '#!/bin/sh\nexit 101\n' | $(SUDO) tee /usr/sbin/policy-rc.d >/dev/null; \
	  $(SUDO) chmod +x /usr/sbin/policy-rc.d; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  status=$$?; $(SUDO) rm -f /usr/sbin/policy-rc.d; exit $$status; \
	fi
endef

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "notifyd needs Python >= 3.11"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,speedups]'
	touch $@

setup: $(BIN)/.installed
	$(call apt_install,$(APT_PACKAGES))

setup-test: $(BIN)/.installed
	$(call apt_install,$(TEST_APT_PACKAGES))

# dev-broker starts notifyd only once its own node answers AMQP, and stops both when
# either ends; exec makes it make's child, so a SIGTERM to make alone reaches it too.
run: setup $(DEV_VAPID_KEY)
	@echo "starting RabbitMQ, then notifyd: http://127.0.0.1:$(DEV_PORT)/demo (Ctrl-C stops both)"
	@exec env NOTIFYD_AUTH_SECRET=$(DEV_SECRET) NOTIFYD_API_SERVICE_KEYS=$(DEV_SERVICE_KEY) $(DEV_PUSH_ENV) \
	  $(BIN)/notifyd dev-broker --port $(DEV_AMQP_PORT) -- \
	  $(BIN)/notifyd serve --demo --host 127.0.0.1 --port $(DEV_PORT)

$(DEV_VAPID_KEY): | $(BIN)/.installed
	@mkdir -p $(@D)
	@umask 077 && $(BIN)/notifyd webpush --generate-vapid-key > $@.tmp 2>/dev/null && mv $@.tmp $@

# Delivers the demo's notifications for users with no tab open as Web Push (needs the
# RabbitMQ node of a running `make run`, and a browser that reaches its push service).
run-push: $(DEV_VAPID_KEY)
	@exec env NOTIFYD_AMQP_URL=amqp://guest:guest@127.0.0.1:$(DEV_AMQP_PORT)/ $(DEV_PUSH_ENV) \
	  $(BIN)/notifyd webpush

lint: $(BIN)/.installed
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)
	$(BIN)/mypy

test: setup-test lint
	$(BIN)/pytest -q

format: $(BIN)/.installed
	$(BIN)/ruff format $(LINTED)
	$(BIN)/ruff check --fix $(LINTED)

bench: setup
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) .run .mypy_cache .ruff_cache .pytest_cache tests/artifacts
