"""The Celery app, wired into Flask the way Flask's own docs show (celery_init_app)."""

from __future__ import annotations

from typing import Any

from celery import Celery, Task
from flask import Flask

from common.config import Settings
from common.redis_conn import tls_options

# Delivery tasks, by stable name: renaming one strands the messages already queued under it.
DELIVER_TASK = "firehose.deliver"
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
            # An unacknowledged message comes back after this long; every retry countdown
            # is kept well under it so a delayed task is not also redelivered.
            "visibility_timeout": settings.broker_visibility_timeout,
        },
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
