"""Fixtures of the fault and fuzz suite: its own partner stub and stack (Redis database 5),
the figures file, and the register of every secret the suite sent.

Databases 5-7 of the test Redis are the suite's: 5 for the stack under faults, 6 for the
Flask test client's fuzzing, 7 spare. The Redis-restart test runs a private redis-server.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.fault_table import load, render
from devtools.faults import RESULTS_ENV, Results, new_secret
from tests.support import FAULTS_DB, Stub, own_stub, wait_for
from tests.support.stack import FAULT_SETTINGS, TOKEN, Stack, make_stack

_results_path: Path | None = None


@pytest.fixture(scope="session")
def fault_results(tmp_path_factory: pytest.TempPathFactory) -> Results:
    global _results_path
    path = Path(os.environ.get(RESULTS_ENV) or tmp_path_factory.getbasetemp() / "fault-results.jsonl")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")  # this run's figures only
    _results_path = path
    return Results(path)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in item.path.parents:
            item.add_marker(pytest.mark.faults)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _results_path is None or not _results_path.exists():
        return
    rows = load(_results_path)
    if rows:
        terminalreporter.write_sep("=", "fault and fuzz figures")
        terminalreporter.write_line(render(rows))
        terminalreporter.write_line(f"(from {_results_path})")


@pytest.fixture(scope="session")
def sent_secrets() -> dict[str, str]:
    """name -> value of every token and apiKey the suite sent; none may reach a log or a listing."""
    return {"policy token": TOKEN}


@pytest.fixture(scope="session")
def fault_token(sent_secrets: dict[str, str]) -> str:
    token = new_secret("ft")
    sent_secrets["firehose token"] = token
    return token


@pytest.fixture(scope="package")
def fault_stub(logs_dir: Path) -> Iterator[Stub]:
    with own_stub(logs_dir, name="faults-stub", STUB_LOG_LEVEL="DEBUG") as client:
        yield client


@pytest.fixture(scope="package")
def fault_stack(fault_stub: Stub, logs_dir: Path, fault_token: str) -> Iterator[Stack]:
    """Two workers (four deliveries in flight) and gunicorn, logging everything at DEBUG."""
    stack = make_stack(
        FAULTS_DB,
        fault_stub,
        logs_dir,
        "faults",
        workers=2,
        FIREHOSE_AUTH_TOKEN=f"{TOKEN},{fault_token}",
        **FAULT_SETTINGS,
        GUNICORN_TIMEOUT="10",
        LOG_LEVEL="DEBUG",
    )
    try:
        yield stack
    finally:
        for proc in stack.workers:
            proc.stop()


@pytest.fixture
def quiet_partner(fault_stack: Stack, fault_stub: Stub) -> Iterator[Stub]:
    """The stub without faults or records, once earlier work has drained."""
    fault_stub.faults([])
    wait_for(fault_stack.drained, 90, 0.2, "earlier work to drain")
    fault_stub.reset()
    yield fault_stub
    fault_stub.faults([])
