"""No token, no web, through real processes: the Procfile's web line with a clean environment stops
at once naming the missing setting; the explicit opt-out serves open and says so; the worker entry
and the CLIs run without a token."""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

import pytest
import requests

from devtools import check_deploy
from devtools.procs import free_port, start_web
from tests.support import BIN, ROOT, base_env, sample


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    """What a fresh dyno or container has: a PATH and a HOME, no relay setting at all."""
    return {"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(home), **extra}


def run_web_line(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    # As Heroku runs it: the Procfile's line, read from the Procfile, through a shell. The 15 s
    # bound is the issue's; TimeoutExpired fails the test when it is not met.
    return subprocess.run(
        ["/bin/bash", "-c", check_deploy.procfile()["web"]],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=15,
        check=False,
    )


@pytest.mark.parametrize("token", [None, ",", " , "])
def test_procfile_web_without_a_token_exits_at_once_naming_the_setting(tmp_path: Path, token: str | None) -> None:
    env = clean_env(tmp_path, PORT=str(free_port()))
    if token is not None:
        env["FIREHOSE_AUTH_TOKEN"] = token
    done = run_web_line(env)
    assert done.returncode != 0, done.stdout + done.stderr
    assert "FIREHOSE_AUTH_TOKEN: not set" in done.stderr, done.stderr
    # One message, not a boot loop: nothing of gunicorn's own startup got printed.
    assert "Booting worker" not in done.stdout + done.stderr


def test_gunicorn_without_the_config_file_also_refuses(tmp_path: Path) -> None:
    # Run from elsewhere, so gunicorn does not pick up ./gunicorn.conf.py: the app factory refuses.
    argv = [str(BIN / "gunicorn"), "--chdir", str(ROOT), "--bind", f"127.0.0.1:{free_port()}", "service:create_app()"]
    done = subprocess.run(
        argv, cwd=tmp_path, env=clean_env(tmp_path), capture_output=True, text=True, timeout=15, check=False
    )
    assert done.returncode != 0 and "FIREHOSE_AUTH_TOKEN: not set" in done.stderr, done.stderr


def test_the_opt_out_serves_open_and_warns(redis_url: str, logs_dir: Path) -> None:
    # A prefix of its own: no worker runs here, and the queued message must not wait for another test's.
    env = base_env(redis_url, FIREHOSE_AUTH_DISABLED="true", REDIS_KEY_PREFIX=f"opendoor-{uuid.uuid4().hex[:8]}")
    proc, url = start_web(env, logs_dir, name="web-open")
    try:
        body = sample("3.2.0", "EventProcessingRequest_ios.json")
        assert requests.post(f"{url}/firehose", data=body, timeout=10).status_code == 202
        assert '"event":"auth_disabled"' in proc.output().replace(" ", "")
    finally:
        proc.stop()


def test_worker_entry_and_clis_need_no_token(redis_url: str, tmp_path: Path) -> None:
    env = clean_env(tmp_path, REDIS_URL=redis_url, REDIS_KEY_PREFIX=f"opendoor-{uuid.uuid4().hex[:8]}")
    worker = subprocess.run(
        [str(BIN / "python"), "-c", "import workers.worker"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert worker.returncode == 0, worker.stderr
    dlq = subprocess.run(
        [str(BIN / "flask"), "--app", "service:create_app", "dlq", "list"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert dlq.returncode == 0, dlq.stderr
