"""create_app is a real factory: each app owns its settings, its Ingest and its worker runtime.

And the worker side is set up only by the worker entry, with the partner client PARTNER_CLIENT names.
"""

from __future__ import annotations

import logging
import socket

import pytest
from celery import signals

from common.config import Settings
from service import create_app
from tests.support import MAIN_DB, redis_db
from tests.support.partner_clients import RecordingPartnerClient
from workers.celery_app import celery_init_app
from workers.partner.reference import ReferencePartnerClient
from workers.pump import PumpStep
from workers.runtime import (
    PartnerClientError,
    build_runtime,
    partner_client_class,
    runtime,
)

RECORDING = "tests.support.partner_clients:RecordingPartnerClient"


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _settings(redis_url: str, **changes: object) -> Settings:
    return Settings(redis_url=redis_url, broker_url=redis_url, **changes)


def test_apps_in_one_process_answer_readiness_independently(monkeypatch: pytest.MonkeyPatch) -> None:
    up_url, down_url = redis_db(MAIN_DB), f"redis://127.0.0.1:{_closed_port()}/0"
    # create_app() with no argument reads the environment at each call, for that app only.
    monkeypatch.setenv("REDIS_URL", up_url)
    up = create_app()
    monkeypatch.setenv("REDIS_URL", down_url)
    down = create_app()

    assert up.test_client().get("/readyz").status_code == 200
    assert down.test_client().get("/readyz").status_code == 503
    assert up.config["SETTINGS"].redis_url == up_url
    assert down.config["SETTINGS"].redis_url == down_url
    assert up.extensions["ingest"] is not down.extensions["ingest"]

    monkeypatch.setenv("REDIS_URL", up_url)
    create_app()
    assert up.test_client().get("/readyz").status_code == 200
    assert down.test_client().get("/readyz").status_code == 503
    assert up.config["SETTINGS"].redis_url == up_url
    assert down.config["SETTINGS"].redis_url == down_url


def test_the_web_app_builds_no_celery() -> None:
    app = create_app(_settings(redis_db(MAIN_DB)))
    assert "celery" not in app.extensions
    assert {"dlq", "firehose"} <= set(app.cli.commands)


def test_runtime_belongs_to_the_current_app_and_process() -> None:
    first = create_app(_settings(redis_db(MAIN_DB), key_prefix="one"))
    second = create_app(_settings(redis_db(MAIN_DB), key_prefix="two"))
    with first.app_context():
        rt = runtime()
        assert runtime() is rt
        assert rt.keys.prefix == "one"
    with second.app_context():
        assert runtime().keys.prefix == "two"
    with first.app_context():
        assert runtime() is rt
    # A forked child must not reuse the parent's connections: the runtime is keyed by pid.
    pid, held = first.extensions["firehose_runtime"]
    first.extensions["firehose_runtime"] = (pid + 1, held)
    with first.app_context():
        assert runtime() is not rt


def test_celery_is_set_up_per_flask_app() -> None:
    flask_app = create_app(_settings(redis_db(MAIN_DB)))
    celery_app = celery_init_app(flask_app)
    assert flask_app.extensions["celery"] is celery_app
    assert celery_app.flask_app is flask_app
    assert PumpStep in celery_app.steps["worker"]
    assert celery_app.conf.broker_url == redis_db(MAIN_DB)
    celery_app.loader.import_default_modules()
    celery_app.finalize()
    assert {"firehose.deliver", "firehose.deliver_events"} <= set(celery_app.tasks)


def test_worker_logging_redacts_the_apps_own_tokens(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.delenv("FIREHOSE_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("LOG_FORMAT", "json")
    secret = "app-only-token-123456"
    celery_init_app(create_app(_settings(redis_db(MAIN_DB), auth_tokens=(secret,))))
    root = logging.getLogger()
    before = list(root.handlers)
    try:
        signals.setup_logging.send(sender=None, loglevel="INFO", logfile=None, format="", colorize=False)
        logging.getLogger("test.worker").warning("token %s", secret)
    finally:
        for handler in [h for h in root.handlers if h not in before]:
            root.removeHandler(handler)
    out = capsys.readouterr().out
    assert "test.worker" in out and secret not in out


def test_the_default_partner_client_is_the_reference_client() -> None:
    assert partner_client_class(Settings().partner_client) is ReferencePartnerClient
    rt = build_runtime(_settings(redis_db(MAIN_DB)))
    assert isinstance(rt.partner, ReferencePartnerClient)


def test_a_given_partner_client_wins() -> None:
    given = RecordingPartnerClient(_settings(redis_db(MAIN_DB)))
    assert build_runtime(_settings(redis_db(MAIN_DB)), partner=given).partner is given


def test_the_partner_client_setting_picks_the_class(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PARTNER_CLIENT", RECORDING)
    assert Settings.from_env().partner_client == RECORDING
    settings = _settings(redis_db(MAIN_DB), partner_client=RECORDING)
    rt = build_runtime(settings)
    assert isinstance(rt.partner, RecordingPartnerClient)
    assert rt.partner.settings is settings


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("tests.support.partner_clients.RecordingPartnerClient", "package.module:Class"),
        ("tests.support.no_such_module:Client", "cannot import"),
        ("tests.support.partner_clients:Missing", "has no 'Missing'"),
        ("tests.support.partner_clients:NoFactoryPartnerClient", "from_settings"),
    ],
)
def test_a_bad_partner_client_is_a_clear_error(spec: str, says: str) -> None:
    with pytest.raises(PartnerClientError, match=says):
        partner_client_class(spec)


def test_the_worker_refuses_to_start_with_a_bad_partner_client() -> None:
    app = create_app(_settings(redis_db(MAIN_DB), partner_client="tests.support.partner_clients:Missing"))
    with pytest.raises(PartnerClientError):
        celery_init_app(app)
