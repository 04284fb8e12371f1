"""No token, no web: the app factory and gunicorn.conf.py refuse to serve without FIREHOSE_AUTH_TOKEN
unless FIREHOSE_AUTH_DISABLED=true, which warns at every start; the worker, CLIs and Lambda need none.
(The door itself, which fails closed whatever built the app: test_firehose_endpoint.py.)"""

from __future__ import annotations

import json
import logging
import runpy

import click
import pytest
from flask.cli import run_command

from common.config import Settings, SettingsError
from devtools import check_deploy
from service import create_app, loaded_to_serve
from tests.support import ROOT


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, redis_url: str) -> pytest.MonkeyPatch:
    """The environment of a fresh deploy: Redis, and no token, opt-out or server of the shell's."""
    for name in ("FIREHOSE_AUTH_TOKEN", "FIREHOSE_AUTH_DISABLED", "SERVER_SOFTWARE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("REDIS_URL", redis_url)
    return monkeypatch


# "," and " , " split into no token at all: they count as unset.
NO_TOKEN = [None, "", ",", " , ", " ,, "]


@pytest.mark.parametrize("token", NO_TOKEN)
def test_a_web_without_a_token_is_refused_naming_the_setting(env: pytest.MonkeyPatch, token: str | None) -> None:
    if token is not None:
        env.setenv("FIREHOSE_AUTH_TOKEN", token)
    with pytest.raises(SettingsError) as caught:
        create_app(web=True)
    assert "FIREHOSE_AUTH_TOKEN" in str(caught.value) and "FIREHOSE_AUTH_DISABLED=true" in str(caught.value)


def test_blank_tokens_given_in_code_count_as_none(redis_url: str) -> None:
    with pytest.raises(SettingsError):
        create_app(Settings(redis_url=redis_url, auth_tokens=("", "  ")), web=True)


@pytest.mark.parametrize("token", NO_TOKEN)
def test_gunicorn_conf_exits_with_one_clear_message(env: pytest.MonkeyPatch, token: str | None) -> None:
    if token is not None:
        env.setenv("FIREHOSE_AUTH_TOKEN", token)
    with pytest.raises(SystemExit) as caught:
        runpy.run_path(str(ROOT / "gunicorn.conf.py"))
    message = str(caught.value.code)
    assert message.startswith("gunicorn.conf.py:") and "FIREHOSE_AUTH_TOKEN: not set" in message


def test_gunicorn_conf_loads_with_the_opt_out(env: pytest.MonkeyPatch) -> None:
    env.setenv("FIREHOSE_AUTH_DISABLED", "true")
    assert "bind" in runpy.run_path(str(ROOT / "gunicorn.conf.py"))


def test_the_opt_out_warns_at_every_start(env: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    env.setenv("FIREHOSE_AUTH_DISABLED", "true")
    caplog.set_level(logging.WARNING, logger="service")
    for _ in range(2):
        create_app(web=True)
    warnings = [r for r in caplog.records if getattr(r, "event", None) == "auth_disabled"]
    assert len(warnings) == 2 and warnings[0].levelno == logging.WARNING


def test_a_token_needs_no_warning_and_wins_over_a_stale_opt_out(
    env: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    env.setenv("FIREHOSE_AUTH_TOKEN", "tok")
    caplog.set_level(logging.WARNING, logger="service")
    create_app(web=True)
    assert not [r for r in caplog.records if getattr(r, "event", "").startswith("auth_disabled")]
    env.setenv("FIREHOSE_AUTH_DISABLED", "true")
    create_app(web=True)
    assert [r.event for r in caplog.records if getattr(r, "event", "").startswith("auth_")] == ["auth_disabled_ignored"]


def test_what_never_serves_needs_no_token(env: pytest.MonkeyPatch) -> None:
    # The worker entry, the Lambda handler and a script build the app outside any server.
    assert not loaded_to_serve()
    create_app()
    # Flask's and Celery's commands (dlq, firehose send, celery worker) load it under click.
    with click.Context(click.Command("dlq")):
        assert not loaded_to_serve()
        create_app()


def test_a_server_loading_the_app_is_a_web(env: pytest.MonkeyPatch) -> None:
    with click.Context(run_command):  # `flask run`
        assert loaded_to_serve()
        with pytest.raises(SettingsError):
            create_app()
    env.setenv("SERVER_SOFTWARE", "gunicorn/27.0.1")  # what gunicorn's arbiter sets before loading
    assert loaded_to_serve()
    with pytest.raises(SettingsError):
        create_app()


def test_every_deployment_supplies_its_own_token() -> None:
    compose, app_json = check_deploy.load_compose(), json.loads((ROOT / "app.json").read_text())
    ecs = check_deploy.ecs_task_definitions()
    assert check_deploy.token_problems(compose, app_json, ecs) == []

    compose["services"]["web"]["environment"]["FIREHOSE_AUTH_TOKEN"] = "${FIREHOSE_AUTH_TOKEN:-dev-token}"
    app_json["env"]["FIREHOSE_AUTH_TOKEN"] = {"description": "x", "value": "dev-token"}
    for container in ecs["task-web.json"]["containerDefinitions"]:
        container["secrets"] = [s for s in container["secrets"] if s["name"] != "FIREHOSE_AUTH_TOKEN"]
    problems = "\n".join(check_deploy.token_problems(compose, app_json, ecs))
    assert "compose web" in problems and "app.json" in problems and "task-web.json" in problems
    # A web published on loopback only may keep a default: nobody else can reach it.
    compose["services"]["web"]["ports"] = ["127.0.0.1:8000:8000"]
    assert "compose web" not in "\n".join(check_deploy.token_problems(compose, app_json, ecs))
