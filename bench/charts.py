"""PNG charts of the benchmark's figures, next to the tables they come from.

    .venv/bin/python -m bench.charts     # redraw from bench/RESULTS.md and bench/ISOLATION.md

`bench.perf` and `bench.isolation` call `draw_results` / `draw_isolation` once they have written
their tables. The charts are drawn from those Markdown tables, not from the runs' objects: a
chart then can never show other numbers than the table beside it, and an old run's table can be
drawn again without running it.

Charts (bench/*.png): ingest throughput against bare Flask (`throughput.png`), p99 answer
time against bare Flask and mParticle's 100 ms budget (`p99.png`), end-to-end and backlog-drain
rates (`drain.png`), and key B's lag in each isolation scenario (`isolation.png`).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on a CI machine or a server

import matplotlib.pyplot as plt

HERE = Path(__file__).parent
OUT = HERE
BUDGET_MS = 100.0
# The isolation goal: key B's p95 lag at most 1 s.
ISOLATION_GOAL_S = 1.0

Table = list[dict[str, str]]


def tables(markdown: str) -> dict[str, Table]:
    """Each table of a Markdown file under the `## ` heading it follows (the first one: the title)."""
    found: dict[str, Table] = {}
    heading = ""
    lines = markdown.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        elif line.startswith("|") and i + 1 < len(lines) and re.fullmatch(r"\|[\s:|-]+\|", lines[i + 1].strip()):
            header = _cells(line)
            rows: Table = []
            i += 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(_row(header, _cells(lines[i])))
                i += 1
            found.setdefault(heading, rows)
            continue
        i += 1
    return found


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def _row(header: list[str], cells: list[str]) -> dict[str, str]:
    # Repeated column names ("p99 ms" for the service, then for bare) get the side's prefix.
    row: dict[str, str] = {}
    for name, cell in zip(header, cells, strict=False):
        key = name if name not in row else f"bare {name}"
        row[key] = cell
    return row


def number(cell: str) -> float:
    """12.5 from '12.5', '**0.29**', '3,014', '84%', '30/30' (30)."""
    match = re.search(r"-?[\d,]*\.?\d+", cell.replace("*", ""))
    if match is None:
        raise ValueError(f"no number in {cell!r}")
    return float(match.group().replace(",", ""))


def _short(label: str, width: int = 28) -> str:
    label = re.sub(r"`", "", label)
    return label if len(label) <= width else label[: width - 1] + "…"


def _save(fig: plt.Figure, name: str, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _section(found: dict[str, Table], start: str) -> Table:
    for heading, rows in found.items():
        if heading.startswith(start):
            return rows
    raise KeyError(f"no table under a heading starting {start!r}")


def draw_results(results: Path = HERE / "RESULTS.md", out: Path = OUT) -> list[Path]:
    """throughput.png, p99.png and drain.png from bench.perf's RESULTS.md."""
    found = tables(results.read_text())
    ingest = _section(found, "Ingest")
    labels = [_short(row["body"]) for row in ingest]
    x = range(len(ingest))
    drawn = []

    fig, ax = plt.subplots(figsize=(9, 4.5))
    bare = [number(row["bare req/s"]) for row in ingest]
    service = [number(row["service req/s"]) for row in ingest]
    ax.bar([i - 0.2 for i in x], bare, 0.4, label="bare Flask (202, nothing stored)", color="#9aa5b1")
    bars = ax.bar([i + 0.2 for i in x], service, 0.4, label="relay /firehose", color="#2f6fdf")
    for bar, row in zip(bars, ingest, strict=True):
        ax.annotate(f"x{number(row['ratio']):.2f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center")
    ax.set_xticks(list(x), labels, rotation=15, ha="right", fontsize=8)
    ax.set_ylabel("requests / s (median of rounds)")
    ax.set_title("Ingest throughput against a bare Flask app (ratio above the bars)")
    ax.legend()
    drawn.append(_save(fig, "throughput.png", out))

    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.bar([i - 0.2 for i in x], [number(r["bare p99 ms"]) for r in ingest], 0.4, label="bare p99", color="#9aa5b1")
    ax.bar([i + 0.2 for i in x], [number(r["p99 ms"]) for r in ingest], 0.4, label="relay p99", color="#2f6fdf")
    ax.axhline(BUDGET_MS, color="#d33", linestyle="--", label="mParticle's 100 ms budget")
    ax.set_xticks(list(x), labels, rotation=15, ha="right", fontsize=8)
    ax.set_ylabel("ms")
    ax.set_title("p99 answer time at saturation (16 connections)")
    ax.legend()
    drawn.append(_save(fig, "p99.png", out))

    end_to_end = _section(found, "End to end")
    fig, ax = plt.subplots(figsize=(8, 3.5))
    names = ["posted through /firehose", "backlog drain"][: len(end_to_end)]
    rates = [number(row["events/s"]) for row in end_to_end]
    bars = ax.barh(names, rates, color=["#2f6fdf", "#1a9e6a"][: len(end_to_end)])
    for bar, row in zip(bars, end_to_end, strict=True):
        ax.annotate(
            f" {number(row['events']):,.0f} events in {number(row['seconds']):.1f} s",
            (bar.get_width(), bar.get_y() + bar.get_height() / 2),
            va="center",
        )
    ax.set_xlabel("events / s delivered to the partner stub")
    ax.set_xlim(0, max(rates) * 1.6)
    ax.set_title("End to end: POST to arrival at the partner")
    drawn.append(_save(fig, "drain.png", out))
    return drawn


def draw_isolation(isolation: Path = HERE / "ISOLATION.md", out: Path = OUT) -> list[Path]:
    """isolation.png from bench.isolation's ISOLATION.md: key B's lag in each scenario."""
    [rows] = tables(isolation.read_text()).values()
    labels = [_short(row["Scenario"], 34) for row in rows]
    y = list(range(len(rows)))
    fig, ax = plt.subplots(figsize=(9, 0.7 * len(rows) + 1.8))
    for offset, column, color in (
        (-0.25, "B lag p50 (s)", "#9ec5fe"),
        (0, "p95 (s)", "#2f6fdf"),
        (0.25, "max (s)", "#123"),
    ):
        ax.barh(
            [i + offset for i in y], [number(r[column]) for r in rows], 0.25, label=column.split(" (")[0], color=color
        )
    ax.axvline(ISOLATION_GOAL_S, color="#d33", linestyle="--", label="goal: p95 ≤ 1 s")
    ax.set_yticks(y, labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("key B's lag, s (POST to arrival at the partner)")
    ax.set_title("One customer never slows another: B's lag while A misbehaves")
    ax.legend(loc="lower right")
    return [_save(fig, "isolation.png", out)]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    for path in draw_results() + draw_isolation():
        print(path.relative_to(HERE.parent))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
