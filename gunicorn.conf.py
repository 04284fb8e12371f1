"""Gunicorn settings, from the environment (through Settings) so Heroku, ECS and compose set them the same way."""

import os
import shutil
import sys
import tempfile
import traceback
from datetime import timedelta
from glob import glob

from gunicorn.glogging import Logger

# The project root is on sys.path here: gunicorn changes to it before reading this file.
from common.config import Settings, SettingsError
from common.logging_setup import configure_logging, decorate
from service.auth import require_token_or_opt_out
from service.registration import registration_for
from service.request_log import SUMMARY_ENVIRON_KEY, log_summary, summary_by_access_log

# Every value below comes from Settings (common/config.py, documented in .env.example), as the
# app's and the workers' do. A bad one stops the server here with one line per variable:
# gunicorn would print its own traceback around any other exception.
try:
    _settings = Settings.from_env()
    registration_for(_settings)  # a bad REGISTRATION_FILE is a bad setting too
    # No token and no opt-out: exit here, once, rather than let every worker fail to boot.
    require_token_or_opt_out(_settings)
except SettingsError as error:
    sys.exit(f"gunicorn.conf.py: {error}")

bind = f"0.0.0.0:{_settings.port}"
workers = _settings.web_concurrency
# By default service/gunicorn_worker.py: gthread whose poller reads each request whole (within
# REQUEST_DEADLINE_SECONDS) before a thread runs it, so clients dripping bytes hold no thread,
# and whose workers take new connections in turn, so keep-alive clients spread over them all.
# Every deployment (Procfile, compose, ECS, make up) runs this file, so they all get it.
worker_class = _settings.gunicorn_worker_class
threads = _settings.gunicorn_threads
# mParticle holds connections open between batches; a keep-alive longer than its idle gap saves handshakes.
keepalive = _settings.gunicorn_keepalive
timeout = _settings.gunicorn_timeout
# On SIGTERM, finish in-flight requests before exiting.
graceful_timeout = _settings.gunicorn_graceful_timeout
accesslog = "-"
errorlog = "-"
loglevel = _settings.log_level
# Gunicorn's control socket defaults to one path under $HOME: two servers on one host (tests,
# a dev stack) would fight over it, and nothing here uses it.
control_socket_disable = True

# --- Logs: JSON lines, redacted (common/logging_setup.py) ------------------------------------


class RelayLogger(Logger):
    """Gunicorn's error and access logs in the app's format and redaction; the root logger too.

    The access line is built from chosen fields only: the path without its query string,
    and no request header but the user agent, so no token or Authorization value can reach it.
    For a Firehose request it is the request's one `firehose_request` line, with the fields the
    app left in the environ (service/request_log.py); for anything else, `http_access`.
    """

    def setup(self, cfg: object) -> None:
        super().setup(cfg)
        secrets = _settings.auth_tokens
        for log in (self.error_log, self.access_log):
            for handler in log.handlers:
                decorate(handler, "web", secrets, _settings.log_format)
        configure_logging("web", self.loglevel, secrets, _settings.log_format)

    def access(self, resp: object, req: object, environ: dict, request_time: timedelta) -> None:
        if not self.access_log_enabled:
            return
        try:
            status = getattr(resp, "status_code", None)
            headers = getattr(resp, "headers", None) or []
            method = environ.get("REQUEST_METHOD", "-")
            path = environ.get("PATH_INFO", "-")
            fields = {
                "method": method,
                "path": path,
                "duration_ms": round(request_time.total_seconds() * 1000, 3),
                "bytes": getattr(resp, "sent", None),
                "remote_addr": environ.get("REMOTE_ADDR"),
                "user_agent": (environ.get("HTTP_USER_AGENT") or "")[:200] or None,
                "request_id": next((v for k, v in headers if k.lower() == "x-request-id"), None),
            }
            summary = environ.get(SUMMARY_ENVIRON_KEY)
            if summary is not None and isinstance(status, int):
                log_summary(self.access_log, status, summary, fields)
                return
            self.access_log.info(
                "%s %s %s", method, path, status, extra={"event": "http_access", "status": status, **fields}
            )
        except Exception:  # noqa: BLE001 - a log line must never fail a request
            self.error(traceback.format_exc())


logger_class = RelayLogger


def post_fork(server: object, worker: object) -> None:
    # One line per Firehose request, written after the answer has left: the access line.
    if server.log.access_log_enabled:
        summary_by_access_log()


# --- Garbage collector: tuned for requests that each build thousands of short-lived containers ---
# A 100-profile membership change parses into ~2,200 dicts and lists; with the default gen-0
# threshold (700) every such request ran a few collections mid-parse, promoted the live message
# (and those of the worker's other threads) towards gen 2, and so set off a full collection of
# the whole app every ~50 requests (~35 ms each): ~40% of the web's CPU per request. Parsed
# messages hold no cycles, so reference counting frees them; the collector only needs to run
# for the rare cycle, and a full collection need not walk what the app built at start (frozen).
GC_GEN0_THRESHOLD = 20_000


def post_worker_init(worker: object) -> None:
    import gc

    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_GEN0_THRESHOLD, *gc.get_threshold()[1:])


# --- Metrics: prometheus_client multi-process mode (service/metrics.py) ----------------------
# Each worker process writes its metrics to files in PROMETHEUS_MULTIPROC_DIR and a scrape
# sums them all. prometheus_client reads the variable when it is imported, so it is settled
# when the server starts, before any worker loads the app (never at config load: `gunicorn
# --check-config` must not leave directories behind). Unset, or inherited from an older
# master during a USR2 upgrade, this master makes a private directory and removes it at exit.
# These stay environment reads, not Settings: this is plumbing between this master and its
# workers (prometheus_client reads the variable from the environment, and the hooks below set
# it), and Settings is read once at config load, before on_starting has settled it.
_MULTIPROC = "PROMETHEUS_MULTIPROC_DIR"
_PRIVATE = "FIREHOSE_PRIVATE_METRICS_DIR"


def on_starting(server: object) -> None:
    owner = os.environ.get(_PRIVATE, "").partition(":")[0]
    if not os.environ.get(_MULTIPROC) or (owner and owner != str(os.getpid())):
        os.environ[_MULTIPROC] = tempfile.mkdtemp(prefix="firehose-metrics-")
        os.environ[_PRIVATE] = f"{os.getpid()}:{os.environ[_MULTIPROC]}"
    directory = os.environ[_MULTIPROC]
    os.makedirs(directory, exist_ok=True)
    # Files a previous server left behind would be added to this one's counters.
    for stale in glob(os.path.join(directory, "*.db")):
        os.remove(stale)
    if "prometheus_client" in sys.modules:
        # preload_app imported the app before this hook: each worker would count alone.
        server.log.warning("prometheus_client was imported before on_starting; /metrics will not sum workers")


def child_exit(server: object, worker: object) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server: object) -> None:
    owner, _, directory = os.environ.get(_PRIVATE, "").partition(":")
    if owner == str(os.getpid()) and directory == os.environ.get(_MULTIPROC):
        shutil.rmtree(directory, ignore_errors=True)


# Errors gunicorn answers before Flask sees the request speak the service's JSON error shape too.
from service.gunicorn_errors import install as _install_json_errors  # noqa: E402

_install_json_errors()
