"""The Celery app, wired into Flask the way Flask's own docs show (celery_init_app)."""

from __future__ import annotations

import logging
import os
from typing import Any

from celery import Celery, Task, signals
from flask import Flask

from common.config import Settings
from common.logging_setup import JSON, configure_logging, log_format
from common.redis_conn import tls_options

# Delivery tasks, by stable name: renaming one strands the messages already queued under it.
DELIVER_TASK = "firehose.deliver"
DELIVER_EVENTS_TASK = "firehose.deliver_events"
DELIVERY_QUEUE = "firehose"


def celery_config(settings: Settings) -> dict[str, Any]:
    broker_tls = tls_options(settings.broker_url)
    return {
        "broker_url": settings.broker_url,
        "broker_connection_retry_on_startup": True,
        "broker_use_ssl": broker_tls or None,
        # A delivery is acknowledged only when it finished, and a worker that dies mid-call
        # gives its message back, so nothing accepted is lost to a crash or a deploy.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_ignore_result": True,
        "task_default_queue": DELIVERY_QUEUE,
        "task_serializer": "json",
        "accept_content": ["json"],
        "broker_transport_options": {
            # A task a dead worker held comes back after this long. No task here uses a
            # countdown or an ETA (retries wait in the retry schedule), so it is safe to keep short.
            "visibility_timeout": settings.broker_visibility_timeout,
            # kombu sweeps for such tasks every interval * throttle seconds: make it the interval.
            "unacked_restore_interval": settings.broker_restore_interval_seconds,
            "unacked_restore_throttle": 1,
        },
        # On a cold shutdown (Heroku sends SIGTERM to every process in the dyno; app.json maps it
        # to SIGQUIT) give running deliveries this long to finish before their tasks go back.
        "worker_soft_shutdown_timeout": 20,
        # Flower shows queued and running work from these events.
        "worker_send_task_events": True,
        "task_send_sent_event": True,
    }


def celery_init_app(app: Flask) -> Celery:
    class FlaskTask(Task):
        def __call__(self, *args: object, **kwargs: object) -> object:
            with app.app_context():
                return self.run(*args, **kwargs)

    settings: Settings = app.config["SETTINGS"]
    # Only worker processes import the tasks module; the web never calls a task directly.
    celery_app = Celery(app.name, task_cls=FlaskTask, include=["workers.tasks"])
    celery_app.config_from_object(celery_config(settings))
    celery_app.set_default()

    from workers.pump import PumpStep

    celery_app.steps["worker"].add(PumpStep)
    app.extensions["celery"] = celery_app
    return celery_app


@signals.setup_logging.connect
def _worker_logging(loglevel: int | str | None = None, **_: object) -> None:
    """Workers log like the web: JSON lines through the same redaction (common/logging_setup.py).

    A receiver on this signal makes Celery leave logging to us, so none of its own handlers
    can print a record unredacted. Runs again in each pool process; that is harmless.
    LOG_LEVEL, when set, wins over `--loglevel`: one setting for web and workers alike.
    """
    configure_logging("worker", os.environ.get("LOG_LEVEL") or loglevel, Settings.from_env().auth_tokens)


@signals.celeryd_init.connect
def _early_worker_logging(instance: Any = None, **_: object) -> None:
    # The worker warns (running as root, say) before Celery sets up logging, and prints a
    # banner rather than logging it: route warnings through logging from the start and drop
    # the banner, so every line is JSON. The broker and readiness are logged as records anyway.
    configure_logging("worker", None, Settings.from_env().auth_tokens)
    logging.captureWarnings(True)
    if instance is not None and log_format() == JSON:
        instance.quiet = True
