# The everyday commands. `make up` runs the whole stack here; `make test` runs the suite.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install up test test-fast faults bench bench-smoke bench-isolation lint lint-deploy check-monitoring fmt clean

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $(STAMP)

install: $(STAMP)

## Redis (REDIS_URL, or a private redis-server), partner stub, web on :8000 and a worker.
up: $(STAMP)
	./devtools/up.sh

## The whole suite: tests/unit, then tests/e2e (real gunicorn, Celery workers and partner stub).
## It starts a private redis-server on a free loopback port for the run (TEST_REDIS_URL: use another).
test: $(STAMP)
	$(VENV)/bin/pytest

## The fast tier (under 20 s): tests/unit, in-process against the private redis-server; no subprocesses.
test-fast: $(STAMP)
	$(VENV)/bin/pytest tests/unit

## The fault and fuzz suite alone (tests/e2e/faults/, also part of `make test`), then its figures as a table.
faults: $(STAMP)
	@results=$$(mktemp -d)/fault-results.jsonl; \
	FAULT_RESULTS=$$results $(VENV)/bin/pytest tests/e2e/faults; status=$$?; \
	$(PY) -m devtools.fault_table $$results; exit $$status

## The benchmark (under 10 minutes): relay against a bare Flask app side by side, end to end, memory;
## writes bench/RESULTS.md. Needs wrk (installed with apt-get if missing) and redis-server: it starts a
## private one for the run (BENCH_REDIS: use another; databases 8 and 9 are emptied).
bench: $(STAMP)
	$(PY) -m bench.perf

## The same with tiny numbers (about 20 s): a check that the benchmark still runs; writes nothing.
bench-smoke: $(STAMP)
	$(PY) -m bench.perf --smoke

## One customer never slows another (about 10 minutes): key B's lag while key A's partner endpoint fails,
## hangs or is rate limited, and after a big membership change; writes bench/ISOLATION.md. `--quick`: a smoke check.
bench-isolation: $(STAMP)
	$(PY) -m bench.isolation

lint: $(STAMP) lint-deploy
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

## The Dockerfile under hadolint, then the compose, Procfile and ECS commands against what the image holds.
lint-deploy: $(STAMP)
	$(VENV)/bin/hadolint --failure-threshold style Dockerfile
	$(PY) -m devtools.check_deploy

## The alert rules of deploy/prometheus/: promtool's syntax check, then their unit tests (alerts_test.yml).
## Needs promtool (Debian: apt-get install prometheus).
check-monitoring:
	promtool check rules deploy/prometheus/alerts.yml
	promtool check config deploy/prometheus/prometheus.yml
	cd deploy/prometheus && promtool test rules alerts_test.yml

fmt: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
