"""The Flask web service: the app factory."""

from __future__ import annotations

import logging
import os

import click
from flask import Flask

from common.config import Settings


def create_app(settings: Settings | None = None, *, web: bool | None = None) -> Flask:
    """A new app that owns everything it builds: its settings, its Ingest, its metrics scrape.

    Nothing is kept at module level, so apps built in one process (tests, the worker entry
    beside a CLI) never share or replace each other's Redis clients. The web builds no Celery
    app: it stores messages in the inbox stream, and only the worker entry (workers/worker.py)
    sets up Celery.

    `web` says whether this app will serve HTTP; None works it out (`loaded_to_serve`). A web
    refuses to be built without FIREHOSE_AUTH_TOKEN unless FIREHOSE_AUTH_DISABLED=true
    (SettingsError), and warns at every start when it runs open. The worker entry, the CLIs and
    the Lambda handler build the same app only to reach Redis and the settings, so they need no
    token; whatever built it, the endpoint itself accepts nothing but a registration without a
    token or the opt-out (service/auth.py).
    """
    from service.auth import require_token_or_opt_out, warn_if_open

    settings = settings or Settings.from_env()
    if web if web is not None else loaded_to_serve():
        require_token_or_opt_out(settings)
        warn_if_open(settings, logging.getLogger(__name__))
    app = Flask("firehose_relay")
    app.config["SETTINGS"] = settings
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    # Fail closed on the body size for form parsing too; we never read forms.
    app.config["MAX_FORM_MEMORY_SIZE"] = settings.max_body_bytes

    from service import cookie_sync, endpoint, errors, firehose, health, metrics, openapi, request_log
    from service.dlq_cli import dlq_cli
    from service.ingest import Ingest
    from service.registration import registration_for
    from service.send_cli import firehose_cli

    # Built once, at start: every registration request gets the same document.
    app.extensions["registration"] = registration_for(settings)
    Ingest().init_app(app)
    errors.register_error_handlers(app)
    # Request id and log context first, so every later hook and the view log with them.
    request_log.init_app(app)
    metrics.init_app(app)
    app.register_blueprint(firehose.bp)
    app.register_blueprint(health.bp)
    app.register_blueprint(cookie_sync.bp)
    app.register_blueprint(openapi.bp)
    # Last: POST /firehose is answered in front of everything above (service/endpoint.py).
    endpoint.init_app(app)
    app.cli.add_command(firehose_cli)
    app.cli.add_command(dlq_cli)
    logging.getLogger(__name__).info("app_created", extra={"event": "app_created"})
    return app


def loaded_to_serve() -> bool:
    """Whether a WSGI server is building this app: gunicorn, or `flask run`.

    Gunicorn's arbiter puts SERVER_SOFTWARE in the environment before it loads any app (master
    with preload_app, or each worker); `flask run` builds the app inside its own click command.
    Celery's and Flask's other commands also run under click, but never serve the app.
    """
    if os.environ.get("SERVER_SOFTWARE", "").startswith("gunicorn/"):
        return True
    context = click.get_current_context(silent=True)
    if context is None:
        return False
    from flask.cli import run_command

    return context.command is run_command
