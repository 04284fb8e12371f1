"""The fault suite's figures as a markdown table.

tests/e2e/faults/ writes one JSON line per fault or fuzz run (devtools.faults.Results) to the
file named by FAULT_RESULTS, or to pytest's temporary directory; this prints them:

    .venv/bin/python -m devtools.fault_table RESULTS.jsonl
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import orjson

COLUMNS = [
    ("fault", "Fault or input"),
    ("inputs", "Inputs tried"),
    ("status_5xx", "5xx answers"),
    ("accepted", "Accepted (2xx)"),
    ("delivered", "Delivered"),
    ("applied_twice", "Applied twice"),
    ("repeats", "Repeats dropped by Idempotency-Key"),
    ("dead_lettered", "Dead-lettered"),
    ("notes", "Notes"),
]


def load(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            rows.append(orjson.loads(line))
    return rows


def _cell(value: object) -> str:
    if value is None:
        return "-"
    return str(value).replace("|", "\\|").replace("\n", " ")


def render(rows: list[dict]) -> str:
    lines = [
        "| " + " | ".join(title for _, title in COLUMNS) + " |",
        "| " + " | ".join("---" if key in ("fault", "notes") else "---:" for key, _ in COLUMNS) + " |",
    ]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(key)) for key, _ in COLUMNS) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, help="the JSON-lines file the suite wrote")
    args = parser.parse_args(argv)
    if not args.results.exists():
        print(f"no results at {args.results}", file=sys.stderr)
        return 1
    print(render(load(args.results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
