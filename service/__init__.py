"""The Flask web service: the app factory."""

from __future__ import annotations

import logging

from flask import Flask

from common.config import Settings


def create_app(settings: Settings | None = None) -> Flask:
    """A new app that owns everything it builds: its settings, its Ingest, its metrics scrape.

    Nothing is kept at module level, so apps built in one process (tests, the worker entry
    beside a CLI) never share or replace each other's Redis clients. The web builds no Celery
    app: it stores messages in the inbox stream, and only the worker entry (workers/worker.py)
    sets up Celery.
    """
    settings = settings or Settings.from_env()
    app = Flask("firehose_relay")
    app.config["SETTINGS"] = settings
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    # Fail closed on the body size for form parsing too; we never read forms.
    app.config["MAX_FORM_MEMORY_SIZE"] = settings.max_body_bytes

    from service import cookie_sync, errors, firehose, health, metrics, openapi, request_log
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
    app.cli.add_command(firehose_cli)
    app.cli.add_command(dlq_cli)
    logging.getLogger(__name__).info("app_created", extra={"event": "app_created"})
    return app
