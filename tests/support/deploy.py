"""Reading the deploy files (Dockerfile, compose, Procfile, ECS), for the deploy tests of both tiers."""

from __future__ import annotations

from typing import Any

from devtools import check_deploy
from tests.support import ROOT


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


def all_commands(compose: dict[str, Any]) -> dict[str, list[str]]:
    commands = {f"Procfile {k}": check_deploy.argv_of(v) for k, v in check_deploy.procfile().items()}
    commands |= {f"compose {k}": v for k, v in check_deploy.compose_commands(compose).items()}
    for name, doc in check_deploy.ecs_task_definitions().items():
        for container in doc["containerDefinitions"]:
            commands[f"ecs {name} {container['name']}"] = container["command"]
    return commands
