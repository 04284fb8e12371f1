"""The deploy files, read and checked without a Docker engine or any process: the Dockerfile's
shape, .dockerignore, compose, the Procfile and the ECS task definitions, and that every command
they give uses what the image has. (Linting, running those commands and the healthchecks against
real processes: tests/e2e/test_deploy_files.py.)
"""

from __future__ import annotations

import json
import re
import shlex
from typing import Any

import pytest

from common.config import Settings
from devtools import check_deploy
from tests.support import ROOT
from tests.support.deploy import all_commands, dockerfile_instructions, final_stage

# --- Dockerfile -----------------------------------------------------------------------------


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


def test_compose_services(compose: dict[str, Any]) -> None:
    services = compose["services"]
    # The stack `docker compose up` starts; opt-in profiles (monitoring) add to it.
    default = {name for name, service in services.items() if "profiles" not in service}
    assert default == {"redis", "web", "worker", "flower", "partner-stub"}
    assert {name for name in services if name not in default} == {"prometheus", "grafana"}
    assert all(services[name]["profiles"] == ["monitoring"] for name in ("prometheus", "grafana"))

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
