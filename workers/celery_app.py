"""The Celery app, wired into Flask the way Flask's own docs show (celery_init_app).

Only the worker entry (workers/worker.py) calls celery_init_app: the web stores messages in
the inbox stream and publishes no task, so it builds no Celery app at all.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery, Task, signals
from flask import Flask

from common.config import Settings
from common.logging_setup import JSON, configure_logging, log_format
from common.names import DELIVERY_QUEUE
from common.redis_conn import celery_broker, tls_options
from workers import broker_transport
from workers.pump import PumpStep
from workers.runtime import partner_client_class


def celery_config(settings: Settings) -> dict[str, Any]:
    broker_tls = tls_options(settings.broker_url, settings.redis_ssl_cert_reqs)
    # Under REDIS_SENTINELS, kombu's sentinel:// transport: the primary is asked for on each connect.
    broker_url, sentinel_options = celery_broker(settings)
    return {
        "broker_url": broker_url,
        "broker_connection_retry_on_startup": True,
        # A primary demoted to a replica (a failover behind a managed endpoint) answers READONLY,
        # a channel error; without this the consumer ends the worker as "Unrecoverable error"
        # instead of reconnecting (celery/celery#7946). Under Sentinel kombu's connection turns
        # READONLY into a connection error itself.
        "broker_channel_error_retry": True,
        "broker_use_ssl": broker_tls or None,
        # A delivery is acknowledged only when it finished, and a worker that dies mid-call
        # gives its message back, so nothing accepted is lost to a crash or a deploy.
        "task_acks_late": True,
        # Under WORKER_POOL=prefork a killed pool process gives its task back at once. Under
        # threads there is no pool process to lose: a dead worker is one process, and its
        # unacknowledged tasks come back after BROKER_VISIBILITY_TIMEOUT (acks_late).
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        # A delivery is mostly a wait on the partner: threads run WORKER_CONCURRENCY of them at
        # once in one process, so one partner that hangs holds a few threads, not the worker.
        # Read from Settings here (the CLI's --pool/--concurrency fall back to these), so no
        # command line in the Procfile, compose, ECS or Procfile.dev needs pool flags.
        "worker_pool": settings.worker_pool,
        "worker_concurrency": settings.worker_concurrency,
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
            **sentinel_options,
        },
        # On a cold shutdown (Heroku sends SIGTERM to every process in the dyno; app.json maps it
        # to SIGQUIT) give running deliveries this long to finish before their tasks go back.
        "worker_soft_shutdown_timeout": 20,
        # Flower shows queued and running work from these events.
        "worker_send_task_events": True,
        "task_send_sent_event": True,
    }


def celery_init_app(app: Flask) -> Celery:
    """The Celery app for one Flask app: its tasks run in that app's context, with its settings.

    The Flask app is kept on the Celery app as `flask_app`, so what the worker starts (the
    pump, logging) reads the same settings as the tasks rather than the environment again.
    """

    class FlaskTask(Task):
        def __call__(self, *args: object, **kwargs: object) -> object:
            # Tasks find their runtime (workers/runtime.py) through the current app.
            with app.app_context():
                return self.run(*args, **kwargs)

    settings: Settings = app.config["SETTINGS"]
    # A wrong PARTNER_CLIENT stops the worker as it starts, not at its first delivery.
    partner_client_class(settings.partner_client)
    # No set_default(): the tasks are shared_tasks, bound to whichever app finalizes them, and
    # a worker makes its own app the default and current one when it starts.
    # Before any broker connection: a reconnect must not end the worker (workers/broker_transport.py).
    broker_transport.install()
    celery_app = Celery(app.name, task_cls=FlaskTask, include=["workers.tasks"])
    celery_app.config_from_object(celery_config(settings))
    celery_app.flask_app = app  # type: ignore[attr-defined]
    celery_app.steps["worker"].add(PumpStep)
    _connect_logging(settings)
    app.extensions["celery"] = celery_app
    return celery_app


def _connect_logging(settings: Settings) -> None:
    """Workers log like the web: JSON lines through the same redaction (common/logging_setup.py).

    The receivers hold this app's settings (the tokens to redact). Held strongly (weak=False:
    they are closures) under fixed ids, so building another app in the process replaces them
    rather than adding a second pair.
    """

    def worker_logging(loglevel: int | str | None = None, **_: object) -> None:
        # A receiver on this signal makes Celery leave logging to us, so none of its own
        # handlers can print a record unredacted. Runs again in each pool process; harmless.
        # LOG_LEVEL, when set, wins over `--loglevel`: one setting for web and workers alike.
        level = settings.log_level if "log_level" in settings.model_fields_set else loglevel
        configure_logging("worker", level, settings.auth_tokens)

    def early_worker_logging(instance: Any = None, **_: object) -> None:
        # The worker warns (running as root, say) before Celery sets up logging, and prints a
        # banner rather than logging it: route warnings through logging from the start and drop
        # the banner, so every line is JSON. The broker and readiness are logged as records anyway.
        configure_logging("worker", None, settings.auth_tokens)
        logging.captureWarnings(True)
        if instance is not None and log_format() == JSON:
            instance.quiet = True

    for signal, receiver, uid in (
        (signals.setup_logging, worker_logging, "firehose.worker_logging"),
        (signals.celeryd_init, early_worker_logging, "firehose.early_worker_logging"),
    ):
        signal.disconnect(dispatch_uid=uid)
        signal.connect(receiver, weak=False, dispatch_uid=uid)
