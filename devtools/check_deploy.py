"""Static checks of the deploy files, without a Docker engine: `python -m devtools.check_deploy`.

What the image holds is worked out from the files that define it: the build context is what
.dockerignore lets in, the executables are the console scripts of the distributions that
requirements.txt pulls in (not requirements-dev.txt), and each role's command is run in a
copy of that context in a form that loads everything and then exits (`--help`,
`gunicorn --check-config`). tests/e2e/test_deploy_files.py runs the same checks under pytest;
`make lint-deploy` runs hadolint and this. `--wheels` also asks PyPI whether requirements.txt
installs from wheels alone on amd64 and arm64, as the Dockerfile's builder requires.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# Always in the image: the base image's interpreter, which the venv's python is.
BASE_EXECUTABLES = frozenset({"python", "python3", "python3.11"})
# Celery options that take a value, so the subcommand is the first other bare word.
_CELERY_VALUE_OPTIONS = frozenset(
    {"-A", "--app", "-b", "--broker", "--result-backend", "--loader", "--config", "--workdir", "-C"}
)
# The placeholders the ECS task definitions use; deploy/ecs/README.md says how to fill them.
ECS_PLACEHOLDERS = frozenset({"AWS_ACCOUNT_ID", "AWS_REGION", "STACK", "IMAGE", "PARTNER_API_URL"})
_SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|API_?KEY|REDIS_URL|BROKER_URL|BASIC_AUTH", re.I)
_URL_WITH_CREDENTIALS = re.compile(r"^[a-z][a-z0-9+.-]*://[^/@\s]*:[^/@\s]*@", re.I)


# --- the build context ----------------------------------------------------------------------


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """Docker's .dockerignore glob (Go's filepath.Match plus **) as a regex."""
    out = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def dockerignore_rules(root: Path = ROOT) -> list[tuple[bool, re.Pattern[str]]]:
    """(is_exception, regex) per line of .dockerignore, in order."""
    rules = []
    for raw in (root / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line[1:].strip() if negate else line
        pattern = os.path.normpath(pattern.strip("/"))
        rules.append((negate, _pattern_regex(pattern)))
    return rules


def in_context(relpath: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Whether Docker sends this file: the last rule matching it or a parent folder decides."""
    parts = relpath.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    included = True
    for negate, regex in rules:
        if any(regex.match(c) for c in candidates):
            included = negate
    return included


def context_files(root: Path = ROOT) -> list[str]:
    rules = dockerignore_rules(root)
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        # Never descend into the venv or git: they are excluded and large.
        dirnames[:] = [d for d in dirnames if not (rel_dir == Path(".") and d in {".git", ".venv"})]
        for name in filenames:
            rel = (rel_dir / name).as_posix()
            if in_context(rel, rules):
                out.append(rel)
    return sorted(out)


def copy_context(dest: Path, root: Path = ROOT) -> list[str]:
    """Copy what `docker build` would send into dest (the image's /app); returns the files."""
    files = context_files(root)
    for rel in files:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / rel, target)
    return files


# Packages that only tests and benchmarks use.
_NOT_IN_IMAGE = frozenset({"tests", "bench"})


def top_level_packages(root: Path = ROOT) -> list[str]:
    """Folders with an __init__.py at the top: the code the roles may import."""
    return sorted(
        p.name for p in root.iterdir() if p.is_dir() and (p / "__init__.py").exists() and p.name not in _NOT_IN_IMAGE
    )


# --- what requirements.txt installs ---------------------------------------------------------


def _requirements(path: Path) -> Iterator[Requirement]:
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            yield Requirement(line)


@cache
def runtime_distributions(requirements: Path = ROOT / "requirements.txt") -> frozenset[str]:
    """Every distribution requirements.txt installs, dependencies and extras included."""
    seen: set[tuple[str, str]] = set()
    names: set[str] = set()
    todo: list[tuple[Requirement, str]] = [(req, "") for req in _requirements(requirements)]
    while todo:
        req, parent_extra = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": parent_extra}):
            continue
        name = canonicalize_name(req.name)
        for extra in ("", *sorted(req.extras)):
            if (name, extra) in seen:
                continue
            seen.add((name, extra))
            names.add(name)
            try:
                dist = metadata.distribution(name)
            except metadata.PackageNotFoundError:
                continue  # an optional dependency for another platform or Python
            todo.extend((Requirement(r), extra) for r in dist.requires or [])
    return frozenset(names)


def _entry_points(group: str, dists: Iterable[str]) -> dict[str, str]:
    out = {}
    for name in dists:
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        for ep in dist.entry_points:
            if ep.group == group:
                out[ep.name] = name
    return out


def image_executables() -> dict[str, str]:
    """Executable name -> the runtime distribution that installs it."""
    scripts = _entry_points("console_scripts", runtime_distributions())
    return {**{name: "python" for name in BASE_EXECUTABLES}, **scripts}


def celery_plugin_commands() -> dict[str, str]:
    """Celery subcommands that plugins add (flower), by the runtime distribution adding them."""
    return _entry_points("celery.commands", runtime_distributions())


def all_celery_plugin_commands() -> set[str]:
    return {ep.name for ep in metadata.entry_points(group="celery.commands")}


# --- commands -------------------------------------------------------------------------------


def argv_of(command: str | list[str]) -> list[str]:
    return list(command) if isinstance(command, list) else shlex.split(command)


def procfile(path: Path = ROOT / "Procfile") -> dict[str, str]:
    out = {}
    for raw in path.read_text().splitlines():
        if raw.strip() and not raw.lstrip().startswith("#"):
            name, _, command = raw.partition(":")
            out[name.strip()] = command.strip()
    return out


def celery_parts(argv: list[str]) -> tuple[str | None, str | None]:
    """(app module, subcommand) of a celery command line."""
    app = sub = None
    i = 1
    while i < len(argv):
        arg = argv[i]
        if arg in _CELERY_VALUE_OPTIONS:
            if arg in {"-A", "--app"} and i + 1 < len(argv):
                app = argv[i + 1]
            i += 2
            continue
        if arg.startswith("--app="):
            app = arg.split("=", 1)[1]
        elif not arg.startswith("-"):
            sub = arg
            break
        i += 1
    return app, sub


def modules_named(argv: list[str]) -> list[str]:
    """The import paths a command names: gunicorn's app, celery -A, python -m."""
    exe = Path(argv[0]).name
    if exe == "gunicorn":
        apps = [a for a in argv[1:] if not a.startswith("-") and ":" in a]
        return [a.split(":", 1)[0] for a in apps]
    if exe == "celery":
        app, _ = celery_parts(argv)
        return [app.split(":", 1)[0]] if app else []
    if exe in BASE_EXECUTABLES and "-m" in argv:
        return [argv[argv.index("-m") + 1]]
    return []


def check_command(argv: list[str], root: Path = ROOT) -> list[str]:
    """Problems with a command, judged from what the image holds (no process started)."""
    problems = []
    if not argv:
        return ["empty command"]
    exe = argv[0]
    executables = image_executables()
    if exe not in executables:
        problems.append(f"{exe!r} is not in the image: no distribution from requirements.txt installs it")
    elif exe not in BASE_EXECUTABLES and not (BIN / exe).exists():
        problems.append(f"{exe!r} comes from {executables[exe]} but is not in {BIN}: run make install")
    if exe == "celery":
        _, sub = celery_parts(argv)
        if sub is None:
            problems.append("celery command without a subcommand")
        elif sub in all_celery_plugin_commands() and sub not in celery_plugin_commands():
            problems.append(f"'celery {sub}' needs a plugin that requirements.txt does not install")
    if exe == "gunicorn" and "-c" in argv:
        config = argv[argv.index("-c") + 1]
        if not (root / config).is_file():
            problems.append(f"gunicorn config {config} does not exist")
    rules = dockerignore_rules(root)
    for module in modules_named(argv):
        base = root / Path(*module.split("."))
        candidates = [base.with_suffix(".py"), base / "__init__.py"]
        found = [c for c in candidates if c.exists()]
        if not found:
            problems.append(f"module {module} does not exist")
        elif not in_context(found[0].relative_to(root).as_posix(), rules):
            problems.append(f"module {module} exists but .dockerignore keeps it out of the image")
    return problems


def dry_run_argv(argv: list[str]) -> list[str]:
    """The command in a form that loads its app or module and exits without serving."""
    exe = Path(argv[0]).name
    if exe == "gunicorn":
        return [argv[0], "--check-config", *argv[1:]]
    if exe == "celery":
        _, sub = celery_parts(argv)
        head = argv[: argv.index(sub) + 1] if sub else argv
        return [*head, "--help"]
    if exe in BASE_EXECUTABLES and "-m" in argv:
        return [*argv[: argv.index("-m") + 2], "--help"]
    return argv


def dry_run(argv: list[str], context: Path, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run dry_run_argv(argv) in a copy of the build context, with the venv's executables only.

    The environment is the image's (PATH to the venv, no project settings), so a module that
    needs a file .dockerignore leaves out, or a setting with no default, fails here too.
    """
    run = dry_run_argv(argv)
    exe = run[0]
    resolved = str(BIN / exe) if (BIN / exe).exists() else exe
    env = {
        "PATH": f"{BIN}:/usr/bin:/bin",
        "HOME": str(context),
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",
        "PORT": "8000",
        # Nothing here connects; a closed loopback port makes sure nothing could.
        "REDIS_URL": "redis://127.0.0.1:9/0",
        # A web refuses to start without one; every deploy file supplies its own (checked below).
        "FIREHOSE_AUTH_TOKEN": "check-deploy",
    }
    return subprocess.run(
        [resolved, *run[1:]], cwd=context, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


# --- compose, ECS, app.json -----------------------------------------------------------------


def load_compose(path: Path = ROOT / "docker-compose.yml") -> dict[str, Any]:
    import yaml  # a dev dependency; the image does not need it

    return yaml.safe_load(path.read_text())


def compose_commands(compose: dict[str, Any]) -> dict[str, list[str]]:
    """Commands of the services built from this repository (the others run their own image)."""
    out = {}
    for name, service in compose["services"].items():
        if service.get("build") is not None and "command" in service:
            out[name] = argv_of(service["command"])
    return out


def ecs_task_definitions(root: Path = ROOT) -> dict[str, dict[str, Any]]:
    return {p.name: json.loads(p.read_text()) for p in sorted((root / "deploy" / "ecs").glob("*.json"))}


def check_task_definition(doc: dict[str, Any]) -> list[str]:
    problems = []
    for key in ("family", "containerDefinitions", "executionRoleArn", "cpu", "memory", "networkMode"):
        if key not in doc:
            problems.append(f"missing {key}")
    text = json.dumps(doc)
    unknown = set(re.findall(r"\$\{([A-Za-z0-9_]+)\}", text)) - ECS_PLACEHOLDERS
    if unknown:
        problems.append(f"placeholders not documented: {sorted(unknown)}")
    for container in doc.get("containerDefinitions", []):
        name = container.get("name", "?")
        for key in ("image", "command", "healthCheck", "stopTimeout", "logConfiguration", "secrets"):
            if key not in container:
                problems.append(f"{name}: missing {key}")
        for item in container.get("environment", []):
            if _SECRET_NAME.search(item["name"]) or _URL_WITH_CREDENTIALS.match(str(item.get("value", ""))):
                problems.append(f"{name}: {item['name']} is in plain environment; use secrets")
        for item in container.get("secrets", []):
            if not re.match(r"arn:aws:(ssm|secretsmanager):", item.get("valueFrom", "")):
                problems.append(f"{name}: secret {item.get('name')} is not from SSM or Secrets Manager")
        health = container.get("healthCheck", {})
        limits = {"interval": (5, 300), "timeout": (2, 60), "retries": (1, 10), "startPeriod": (0, 300)}
        for key, (low, high) in limits.items():
            if key in health and not low <= health[key] <= high:
                problems.append(f"{name}: healthCheck.{key}={health[key]} is outside ECS's {low}..{high}")
        if not 2 <= container.get("stopTimeout", 0) <= 120:
            problems.append(f"{name}: stopTimeout must be 2..120 seconds")
        logs = container.get("logConfiguration", {})
        if logs.get("logDriver") != "awslogs":
            problems.append(f"{name}: logs do not go to CloudWatch (awslogs)")
        for key in ("awslogs-group", "awslogs-region", "awslogs-stream-prefix"):
            if key not in logs.get("options", {}):
                problems.append(f"{name}: awslogs option {key} missing")
        if "command" in container:
            problems.extend(f"{name}: {p}" for p in check_command(argv_of(container["command"])))
    return problems


def token_problems(compose: dict[str, Any], app_json: dict[str, Any], ecs: dict[str, dict[str, Any]]) -> list[str]:
    """Where each deployment's web gets FIREHOSE_AUTH_TOKEN: never a default anyone could read here.

    The web refuses to start without one (service/auth.py); these make sure every shipped
    deployment supplies its own rather than falling back to a public value.
    """
    problems = []
    web = compose.get("services", {}).get("web", {})
    value = (web.get("environment") or {}).get("FIREHOSE_AUTH_TOKEN")
    loopback = all(str(port).startswith("127.0.0.1:") for port in web.get("ports", []))
    if value is not None and not re.fullmatch(r"\$\{FIREHOSE_AUTH_TOKEN:?\?[^}]*\}", str(value)) and not loopback:
        problems.append(
            "compose web: FIREHOSE_AUTH_TOKEN must come from .env (${FIREHOSE_AUTH_TOKEN:?...}), "
            "not a default, when the web is published beyond loopback"
        )
    heroku = app_json.get("env", {}).get("FIREHOSE_AUTH_TOKEN")
    if not isinstance(heroku, dict) or "value" in heroku or heroku.get("generator") != "secret":
        problems.append("app.json: FIREHOSE_AUTH_TOKEN must be generated (generator: secret), with no value")
    for container in ecs.get("task-web.json", {}).get("containerDefinitions", []):
        if "FIREHOSE_AUTH_TOKEN" not in {item.get("name") for item in container.get("secrets", [])}:
            problems.append(f"deploy/ecs/task-web.json: {container.get('name')} takes no FIREHOSE_AUTH_TOKEN secret")
    return problems


def gunicorn_graceful_timeout() -> int:
    """graceful_timeout as gunicorn.conf.py sets it with the default environment."""
    namespace: dict[str, Any] = {}
    saved = os.environ.pop("GUNICORN_GRACEFUL_TIMEOUT", None)
    # The file refuses to load without a token (or the opt-out); any token does for reading a timeout.
    saved_token = os.environ.get("FIREHOSE_AUTH_TOKEN")
    os.environ["FIREHOSE_AUTH_TOKEN"] = saved_token or "check-deploy"
    try:
        exec(compile((ROOT / "gunicorn.conf.py").read_text(), "gunicorn.conf.py", "exec"), namespace)
    finally:
        if saved is not None:
            os.environ["GUNICORN_GRACEFUL_TIMEOUT"] = saved
        if saved_token is None:
            del os.environ["FIREHOSE_AUTH_TOKEN"]
    return int(namespace["graceful_timeout"])


# --- the CLI --------------------------------------------------------------------------------


def all_problems() -> list[str]:
    problems = []
    commands = {f"Procfile {name}": argv_of(cmd) for name, cmd in procfile().items()}
    commands |= {f"compose {name}": argv for name, argv in compose_commands(load_compose()).items()}
    for where, argv in commands.items():
        problems.extend(f"{where}: {p}" for p in check_command(argv))
    for name, doc in ecs_task_definitions().items():
        problems.extend(f"deploy/ecs/{name}: {p}" for p in check_task_definition(doc))
    app_json = json.loads((ROOT / "app.json").read_text())
    problems.extend(token_problems(load_compose(), app_json, ecs_task_definitions()))
    files = set(context_files())
    for package in top_level_packages():
        if f"{package}/__init__.py" not in files:
            problems.append(f".dockerignore keeps the package {package}/ out of the image")
    with tempfile.TemporaryDirectory(prefix="image-app-") as tmp:
        copy_context(Path(tmp))
        for where, argv in commands.items():
            done = dry_run(argv, Path(tmp))
            if done.returncode != 0:
                problems.append(f"{where}: {shlex.join(dry_run_argv(argv))} failed:\n{done.stderr[-2000:]}")
    return problems


def wheel_problems(platforms: Iterable[str] = ("manylinux2014_x86_64", "manylinux2014_aarch64")) -> list[str]:
    """Whether requirements.txt installs from wheels alone, as the Dockerfile's builder demands.

    Asks PyPI, so it is not part of `make lint-deploy`: run `python -m devtools.check_deploy
    --wheels` after changing requirements.txt.
    """
    problems = []
    for platform in platforms:
        with tempfile.TemporaryDirectory(prefix="wheels-") as tmp:
            args = ["download", "--quiet", "--only-binary=:all:", "--platform", platform, "--python-version", "3.11"]
            args += ["--implementation", "cp", "-r", str(ROOT / "requirements.txt"), "--dest", tmp]
            done = subprocess.run(
                [sys.executable, "-m", "pip", *args],
                capture_output=True,
                text=True,
                timeout=600,
                check=False,
            )
            if done.returncode != 0:
                problems.append(f"requirements.txt has no wheels for {platform}:\n{done.stderr[-2000:]}")
    return problems


def main() -> int:
    problems = all_problems()
    if "--wheels" in sys.argv[1:]:
        problems += wheel_problems()
    for problem in problems:
        print(problem, file=sys.stderr)
    print(f"deploy files: {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
