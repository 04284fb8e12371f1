"""The worker's pool: threads by default, sized from Settings, and what the threads share is safe
to share (the reference partner client: one requests.Session per thread)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from common.config import Settings, SettingsError
from tests.support.loopback import Answer, ScriptedServer, serve
from workers.celery_app import celery_config
from workers.partner.base import Operation, OperationKind
from workers.partner.reference import ReferencePartnerClient


@pytest.fixture
def slow_server() -> Iterator[tuple[ScriptedServer, str]]:
    # Every answer waits a little, so calls from several threads overlap at the server.
    server = ScriptedServer(default=Answer(202, {"ok": True}, delay=0.3))
    with serve(server.app) as url:
        yield server, url


def test_threads_by_default_and_celery_reads_the_pool_from_settings() -> None:
    defaults = Settings()
    assert (defaults.worker_pool, defaults.worker_concurrency) == ("threads", 16)
    conf = celery_config(Settings(worker_pool="prefork", worker_concurrency=3))
    assert (conf["worker_pool"], conf["worker_concurrency"]) == ("prefork", 3)
    # What no pool change may lose: a task is acknowledged only once it finished.
    assert conf["task_acks_late"] is True


def test_pool_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKER_POOL", "Solo")
    monkeypatch.setenv("WORKER_CONCURRENCY", "4")
    settings = Settings.from_env()
    assert (settings.worker_pool, settings.worker_concurrency) == ("solo", 4)
    monkeypatch.setenv("WORKER_POOL", "gevent")
    with pytest.raises(SettingsError, match="WORKER_POOL"):
        Settings.from_env()


def test_reference_client_gives_each_thread_its_own_session() -> None:
    client = ReferencePartnerClient("http://127.0.0.1:9", 1.0)
    mine = client.session
    assert client.session is mine  # kept for this thread's next call (keep-alive)
    theirs: list[object] = []
    thread = threading.Thread(target=lambda: theirs.append(client.session))
    thread.start()
    thread.join(5)
    assert theirs and theirs[0] is not mine


def test_reference_client_calls_from_many_threads_overlap(slow_server: tuple[ScriptedServer, str]) -> None:
    server, url = slow_server
    client = ReferencePartnerClient(url, 5.0)
    operations = [
        Operation(OperationKind.EVENTS, {"account_id": 7, "batches": [{"n": i}]}, f"key-{i}", None, f"m-{i}")
        for i in range(8)
    ]
    started = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda op: client.send(op, f"idem-{op.message_id}"), operations))
    elapsed = time.monotonic() - started
    assert [r.status for r in results] == [202] * 8
    # Each call got its own answer with its own key: nothing crossed between threads.
    assert sorted(r.headers["Idempotency-Key"] for r in server.received) == sorted(f"idem-m-{i}" for i in range(8))
    assert {r.headers["Authorization"] for r in server.received} == {f"Bearer key-{i}" for i in range(8)}
    # Eight 0.3 s answers one after another would take 2.4 s; at once, far less.
    assert elapsed < 2.0, elapsed
