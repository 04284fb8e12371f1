"""The worker entry module (workers/worker.py), imported in this process as `celery -A` imports it:
what it builds from the environment, and how it refuses bad settings. No worker is started."""

from __future__ import annotations

import importlib
import os
import sys
import uuid
from collections.abc import Iterator
from types import ModuleType

import pytest

from common.names import DELIVER_EVENTS_TASK, DELIVER_TASK
from workers.partner.reference import ReferencePartnerClient
from workers.pump import PumpStep
from workers.runtime import runtime

ENTRY = "workers.worker"


@pytest.fixture
def environment(monkeypatch: pytest.MonkeyPatch, redis_url: str) -> str:
    """The developer's own relay settings left out; REDIS_URL the suite's; returns the key prefix."""
    for name in list(os.environ):
        if name.startswith(("FIREHOSE_", "PARTNER_", "RETRY_", "REDIS_", "CELERY_")):
            monkeypatch.delenv(name)
    prefix = f"t{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("REDIS_KEY_PREFIX", prefix)
    return prefix


@pytest.fixture
def fresh_entry(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # The module builds its apps at import: only a fresh import reads the environment again.
    monkeypatch.delitem(sys.modules, ENTRY, raising=False)
    yield
    sys.modules.pop(ENTRY, None)


def _import() -> ModuleType:
    return importlib.import_module(ENTRY)


@pytest.mark.usefixtures("fresh_entry")
def test_importing_builds_the_flask_and_celery_apps_from_the_environment(environment: str, redis_url: str) -> None:
    entry = _import()
    flask_app, celery_app = entry.flask_app, entry.celery_app
    settings = flask_app.config["SETTINGS"]
    assert (settings.redis_url, settings.key_prefix) == (redis_url, environment)
    assert flask_app.extensions["celery"] is celery_app and celery_app.flask_app is flask_app
    assert celery_app.conf.broker_url == redis_url
    assert PumpStep in celery_app.steps["worker"]
    celery_app.loader.import_default_modules()
    celery_app.finalize()
    assert {DELIVER_TASK, DELIVER_EVENTS_TASK} <= set(celery_app.tasks)
    with flask_app.app_context():
        assert isinstance(runtime().partner, ReferencePartnerClient)
        assert runtime().keys.prefix == environment


@pytest.mark.usefixtures("fresh_entry")
def test_a_task_runs_in_the_entrys_flask_app(environment: str) -> None:
    entry = _import()
    celery_app = entry.celery_app
    celery_app.loader.import_default_modules()
    celery_app.finalize()
    # Called in process (no broker): an unreadable body is dead-lettered before any partner call,
    # under the key prefix of the entry's own settings.
    celery_app.tasks[DELIVER_TASK]("{not json", attempt=1, first_seen_ms=None)
    with entry.flask_app.app_context():
        rt = runtime()
        assert rt.redis.zcard(rt.keys.dead_letter_index) == 1
        assert rt.keys.prefix == environment


@pytest.mark.usefixtures("fresh_entry", "environment")
def test_a_bad_setting_stops_the_import_with_the_variables_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PARTNER_RATE_LIMIT", "fast")
    monkeypatch.setenv("RETRY_MAX_ATTEMPTS", "many")
    with pytest.raises(SystemExit) as info:
        _import()
    message = str(info.value.code)
    assert "PARTNER_RATE_LIMIT" in message and "RETRY_MAX_ATTEMPTS" in message
    assert "Traceback" not in message and "pydantic" not in message
    # `from None`: nothing chained for Python to print under the message.
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert ENTRY not in sys.modules


@pytest.mark.usefixtures("fresh_entry", "environment")
def test_a_partner_client_that_cannot_be_loaded_stops_the_import_without_a_traceback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PARTNER_CLIENT", "tests.support.partner_clients:Missing")
    with pytest.raises(SystemExit) as info:
        _import()
    assert "PARTNER_CLIENT" in str(info.value.code)
