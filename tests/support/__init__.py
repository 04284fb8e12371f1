"""What the tests share: paths, the suite's Redis, environments for the real processes, sample
messages. Test modules import from here, never from each other or from a conftest."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from devtools import samples
from devtools.partner_stub.client import Stub
from devtools.procs import Proc, free_port, wait_for

__all__ = [
    "BIN",
    "PYTHON",
    "ROOT",
    "SAMPLES",
    "Proc",
    "Stub",
    "base_env",
    "every_sample",
    "extra_corpus",
    "free_port",
    "own_stub",
    "redis_db",
    "sample",
    "sample_id",
    "wait_for",
]

ROOT = Path(__file__).resolve().parents[2]
# The project's own sample messages (devtools/make_fixtures.py writes them): always there.
SAMPLES = samples.FIXTURES
PYTHON = sys.executable
BIN = Path(sys.executable).parent

# The suite's databases, one per stack so stacks never see each other's keys. On the private
# redis-server (tests/support/redis.py) every one of them is the suite's own.
MAIN_DB = 11
FAULTS_DB = 5
FUZZ_DB = 6
POLICY_DB = 12
BATCHING_DB = 13
AUDIENCES_DB = 15
# tests/e2e/test_isolation.py: one customer's failing partner endpoint next to another's.
ISOLATION_DB = 14
# The worker core's unit tests (tests/unit): in-process, each test under its own key prefix.
WORKER_CORE_DB = 7
# tests/e2e/test_account_scope.py: the same message id from two accounts.
SCOPE_DB = 9
DATABASES = (MAIN_DB, FAULTS_DB, FUZZ_DB, POLICY_DB, BATCHING_DB, AUDIENCES_DB, WORKER_CORE_DB, ISOLATION_DB, SCOPE_DB)


def sample(version: str, name: str) -> bytes:
    """One fixture message, byte for byte: sample("3.2.0", "EventProcessingRequest_ios.json")."""
    return (SAMPLES / version / name).read_bytes()


def extra_corpus() -> Path | None:
    """The SDK's sample corpus when this machine has one (FIREHOSE_SAMPLES_DIR, else
    ../shared/firehose-samples), else None. Only ever extra cases: no test may need it."""
    return samples.shared_corpus()


def every_sample() -> list[Path]:
    """Every fixture message file, then every file of the extra corpus when it is present."""
    return samples.all_files()


def sample_id(path: Path) -> str:
    """A test id for a sample file: fixtures/<version>/<File>.json or shared/<version>/<File>.json."""
    return samples.label(path)


def redis_db(db: int) -> str:
    """The URL of one database of the suite's Redis (set up once per run by tests/conftest.py)."""
    from tests.support import redis as suite_redis

    return f"{suite_redis.base_url()}/{db}"


# The token of every process base_env builds unless the test set its own: known to the tests,
# nowhere else.
SUITE_TOKEN = "suite-token"


def base_env(redis_url: str, **extra: str) -> dict[str, str]:
    """The environment of a web or worker process under test: short waits through configuration,
    never a mocked clock, and none of the developer's own relay settings.

    A web refuses to start without a token or the explicit opt-out: unless the test chose one
    (FIREHOSE_AUTH_TOKEN or FIREHOSE_AUTH_DISABLED in `extra`), the process gets SUITE_TOKEN."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FIREHOSE_", "PARTNER_", "RETRY_"))}
    if "FIREHOSE_AUTH_DISABLED" not in extra:
        env["FIREHOSE_AUTH_TOKEN"] = SUITE_TOKEN
    env.update(
        {
            "REDIS_URL": redis_url,
            "PYTHONUNBUFFERED": "1",
            "RETRY_BACKOFF_BASE": "0.2",
            "RETRY_BACKOFF_MAX": "2",
            "PUMP_BLOCK_MS": "100",
            "PUMP_CLAIM_IDLE_MS": "3000",
            "BROKER_VISIBILITY_TIMEOUT": "30",
            "BROKER_RESTORE_INTERVAL_SECONDS": "2",
            # The production budget (60 ms) answers 503 to a Redis round trip a loaded test machine
            # happens to stall; tests that want a 2xx would then fail on the machine, not the code.
            "INGEST_REDIS_TIMEOUT_MS": "1000",
        }
    )
    env.update(extra)
    return env


@contextmanager
def own_stub(logs_dir: Path, name: str = "partner-stub", **env: str) -> Iterator[Stub]:
    """A partner stub process of its own (a stack whose faults must not reach other tests), stopped for sure."""
    from devtools.procs import start_stub

    proc, client = start_stub(dict(os.environ, **env), logs_dir, name=name)
    try:
        yield client
    finally:
        proc.stop()
