"""Moves accepted messages from the Redis inbox stream to Celery delivery tasks.

The request path stores each message with one Redis call and never pays Celery's publish
cost; a thread in each worker reads the stream through a consumer group and publishes the
tasks, with one broker connection for a whole batch. An entry leaves the stream only after
its task is published, and entries a dead worker had read are claimed by another after
PUMP_CLAIM_IDLE_MS, so a crash at any point loses nothing (it may publish twice, which
the delivered-markers in workers/delivery.py absorb).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import redis
from celery import Celery, bootsteps

from common.config import Settings
from common.keys import Keys
from common.names import DELIVER_EVENTS_TASK, DELIVER_TASK, DELIVERY_QUEUE, INBOX_GROUP
from common.redis_conn import worker_client
from workers.grouping import plan_jobs
from workers.scheduler import RetrySchedule

log = logging.getLogger(__name__)

Entry = tuple[bytes, dict[bytes, bytes]]


class InboxPump:
    def __init__(self, app: Celery, settings: Settings, consumer: str) -> None:
        self.app = app
        self.settings = settings
        self.consumer = consumer
        self.keys = Keys(settings.key_prefix)
        # Blocking reads need a socket timeout longer than the block.
        self.redis = worker_client(
            settings.redis_url, timeout_s=settings.pump_block_ms / 1000 + 5, ssl_cert_reqs=settings.redis_ssl_cert_reqs
        )
        # Start by re-reading what this consumer name read but never finished (a restart).
        self._own_pending = True
        self._next_claim = 0.0
        self.retries = RetrySchedule(self.redis, self.keys)

    def ensure_group(self) -> None:
        try:
            self.redis.xgroup_create(self.keys.inbox, INBOX_GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def _read(self) -> list[Entry]:
        count = self.settings.pump_batch_size
        if self._own_pending:
            entries = self._read_group("0", count, block=None)
            if entries:
                return entries
            self._own_pending = False
        now = time.monotonic()
        if now >= self._next_claim:
            self._next_claim = now + max(1.0, self.settings.pump_claim_idle_ms / 2000)
            _, claimed, *_ = self.redis.xautoclaim(
                self.keys.inbox, INBOX_GROUP, self.consumer, self.settings.pump_claim_idle_ms, "0-0", count=count
            )
            claimed = [entry for entry in claimed if entry[1]]
            if claimed:
                return claimed
        return self._read_group(">", count, block=self.settings.pump_block_ms)

    def _read_group(self, start: str, count: int, block: int | None) -> list[Entry]:
        reply = self.redis.xreadgroup(INBOX_GROUP, self.consumer, {self.keys.inbox: start}, count=count, block=block)
        return [entry for _, entries in reply or [] for entry in entries if entry[1]]

    def run_once(self) -> int:
        """Publish one batch of inbox entries; returns how many."""
        settings = self.settings
        self.retries.move_due(settings.pump_batch_size)
        entries = self._read()
        if not entries:
            return 0
        if len(entries) < settings.pump_batch_size and settings.delivery_batch_wait_ms > 0 and not self._own_pending:
            # Light traffic: give a partner call a moment to fill before sending it half empty.
            time.sleep(settings.delivery_batch_wait_ms / 1000)
            entries += self._read_group(">", settings.pump_batch_size - len(entries), block=None)
        jobs = plan_jobs(entries, settings.delivery_batch_max_messages, settings.delivery_batch_max_events)
        with self.app.producer_or_acquire() as producer:
            for job in jobs:
                kwargs = {"attempt": job.attempt, "first_seen_ms": job.first_seen_ms}
                if job.task == "single":
                    name, args = DELIVER_TASK, [job.bodies[0]]
                else:
                    name, args = DELIVER_EVENTS_TASK, [job.bodies]
                self.app.send_task(
                    name, args=args, kwargs=kwargs, task_id=job.task_id, queue=DELIVERY_QUEUE, producer=producer
                )
        ids = [entry_id for entry_id, _ in entries]
        pipe = self.redis.pipeline(transaction=True)
        pipe.xack(self.keys.inbox, INBOX_GROUP, *ids)
        pipe.xdel(self.keys.inbox, *ids)
        pipe.execute()
        return len(entries)

    def run(self, stop: threading.Event) -> None:
        backoff = 0.5
        while not stop.is_set():
            try:
                self.ensure_group()
                while not stop.is_set():
                    self.run_once()
                    backoff = 0.5
            except Exception as exc:  # noqa: BLE001 - the pump must outlive any outage
                log.warning(
                    "pump_error %s", type(exc).__name__, extra={"event": "pump_error", "error": type(exc).__name__}
                )
                # Whatever was read but not acknowledged is read again from our pending list.
                self._own_pending = True
                stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)


class PumpStep(bootsteps.StartStopStep):
    """Runs the inbox pump in a thread of every worker's main process.

    Added by workers.celery_app.celery_init_app, which keeps the Flask app on the Celery app:
    the pump reads that app's settings, the same the tasks run with.
    """

    requires = {"celery.worker.components:Pool"}

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self.thread: threading.Thread | None = None
        self.stop_event = threading.Event()

    def start(self, worker: Any) -> None:
        settings: Settings = worker.app.flask_app.config["SETTINGS"]
        pump = InboxPump(worker.app, settings, consumer=worker.hostname)
        self.thread = threading.Thread(target=pump.run, args=(self.stop_event,), name="inbox-pump", daemon=True)
        self.thread.start()
        log.info("pump_started consumer=%s", worker.hostname, extra={"event": "pump_started"})

    def stop(self, worker: Any) -> None:
        self.stop_event.set()
        if self.thread is not None:
            self.thread.join(timeout=10)
