# event-backfill — `make help` lists the targets.
SHELL := /bin/bash
CACHE ?= $(HOME)/.cache/event-backfill
# The target dir lives outside the clone so that a fresh clone (CI) reuses
# the warm build of the previous one: a cold DataFusion build is ~7 minutes.
export CARGO_TARGET_DIR ?= $(CACHE)/target
export BACKFILL_CACHE := $(CACHE)
BIN_DEBUG := $(CARGO_TARGET_DIR)/debug/backfill
BIN_RELEASE := $(CARGO_TARGET_DIR)/release/backfill
DEMO ?= demo

.PHONY: help build demo test test-unit test-sql test-it lint fmt tools services services-stop bench minio-demo clean

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN{FS=":.*?## "}{printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}'

build: ## release build of the backfill binary
	scripts/install-tools.sh system
	cargo build --release --bin backfill
	@echo "built $(BIN_RELEASE)"

# `--all-targets` resolves dependency features as the test suite does, so the
# demo and the tests share one build of DataFusion instead of two.
demo: ## build, generate a sample archive, run the job over it, print the report
	scripts/install-tools.sh system
	cargo build --all-targets
	rm -rf $(DEMO)
	$(BIN_DEBUG) generate --out $(DEMO)/archive --events 200000 --keys 500 --seed 7 --days 3
	$(BIN_DEBUG) run --job jobs/demo.toml --report $(DEMO)/report.json
	@echo
	@echo "report:   $(DEMO)/report.json"
	@echo "replays:  $(DEMO)/out/replay/   dead letters: $(DEMO)/out/dlq/   gaps: $(DEMO)/out/gaps/"
	@echo "try:      $(BIN_DEBUG) sql --job jobs/demo.toml -f sql/examples/failures_by_error.sql"
	@echo
	@echo "silences and volume anomalies, on five seasonal weeks with injected outages:"
	$(BIN_DEBUG) generate --out $(DEMO)/seasonal --events 300000 --keys 60 --days 35 --sources 3 --seasonal --outages --seed 7
	$(BIN_DEBUG) silences --source $(DEMO)/seasonal --by source --threshold 45m
	$(BIN_DEBUG) anomalies --source $(DEMO)/seasonal --by source

tools: ## install the test servers (tansu, s3s-fs, redis-server) and Airflow into $(CACHE), once
	scripts/install-tools.sh all
	scripts/install-tools.sh airflow

# The test suite's binary has the crash points of src/failpoint.rs compiled
# in; every cargo call of the suite passes the same features so that the
# build is shared.
TEST_FEATURES := --features failpoints

test: tools ## every test: unit, sqllogictest, integration against real servers, crash harness
	cargo test $(TEST_FEATURES) --all-targets --no-fail-fast -- --test-threads=4

test-unit: ## unit tests only
	cargo test $(TEST_FEATURES) --lib --bins

test-sql: ## sqllogictest files in tests/sql
	cargo test $(TEST_FEATURES) --test sqllogictests

test-it: tools ## the integration test binary
	cargo test $(TEST_FEATURES) --test it

lint: ## rustfmt check and clippy with warnings as errors
	cargo fmt --check
	cargo clippy $(TEST_FEATURES) --all-targets -- -D warnings

fmt: ## format the code
	cargo fmt

services: tools ## start tansu and s3s-fs in the background for manual use
	scripts/services.sh start

services-stop: ## stop them
	scripts/services.sh stop

bench: tools ## benchmarks against DuckDB and confluent-kafka (writes bench/results/)
	scripts/bench.sh

minio-demo: ## the demo against MinIO started by docker compose (needs Docker)
	scripts/minio-demo.sh

clean: ## remove the demo output (the build cache stays in $(CACHE))
	rm -rf $(DEMO)
