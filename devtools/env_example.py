"""Writes .env.example from the Settings class, so it lists every setting with its meaning and default.

    python -m devtools.env_example           # rewrite .env.example
    python -m devtools.env_example --check   # exit 1 if it is out of date

tests/unit/test_settings.py fails when the file is not what this writes: change a setting's
description or default in common/config.py, then run this.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path
from typing import Any

from common.config import OTHER_VARIABLES, Settings

ROOT = Path(__file__).resolve().parent.parent
PATH = ROOT / ".env.example"
# Section rules as wide as before; comments wrap a little wider, as they did by hand.
RULE_WIDTH = 92
WIDTH = 100

HEADER = """\
# Firehose Relay settings. Copy to .env (read by `make up` and docker compose) and adjust.
# Every setting has a default suited to production unless it says otherwise.
# Generated from common/config.py by `python -m devtools.env_example`: edit the descriptions there.
"""


def _comment(text: str) -> list[str]:
    lines: list[str] = []
    for paragraph in text.splitlines():
        lines += textwrap.wrap(paragraph, WIDTH - 2, break_long_words=False, break_on_hyphens=False) or [""]
    return [f"# {line}".rstrip() for line in lines]


def _value(value: Any) -> str:
    if isinstance(value, tuple | list):
        return ",".join(str(item) for item in value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def render() -> str:
    """The text of .env.example."""
    sections: dict[str, list[str]] = {}
    for other in OTHER_VARIABLES:
        sections.setdefault(other.group, []).extend([*_comment(other.description), f"# {other.name}={other.example}"])
    for name, field in Settings.model_fields.items():
        extra = field.json_schema_extra
        assert isinstance(extra, dict), f"{name} is not declared with common.config.setting()"
        lines = sections.setdefault(str(extra["group"]), [])
        lines += _comment(field.description or "")
        value = "" if extra["secret"] else _value(field.default)
        lines.append(f"{'# ' if extra['commented'] else ''}{Settings.env_name(name)}={value}")
    # Sections in the order of the fields; a section of other variables only follows them.
    order = [str(f.json_schema_extra["group"]) for f in Settings.model_fields.values()]  # type: ignore[index]
    out = [HEADER.rstrip("\n")]
    for group in sorted(sections, key=lambda g: order.index(g) if g in order else len(order)):
        out.append("")
        out.append(f"# --- {group} ".ljust(RULE_WIDTH, "-"))
        out.extend(sections[group])
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if .env.example is out of date, write nothing")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if PATH.read_text() != text:
            print(f"{PATH.name} is out of date: run python -m devtools.env_example", file=sys.stderr)
            return 1
        return 0
    PATH.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
