"""Helpers for tests that run the real processes: stub, web and worker, all on loopback."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from devtools.partner_stub.client import Stub
from devtools.procs import Proc, free_port, wait_for

__all__ = ["BIN", "PYTHON", "ROOT", "SAMPLES", "Proc", "Stub", "free_port", "sample", "wait_for"]

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = Path(os.environ.get("FIREHOSE_SAMPLES_DIR", ROOT.parent / "shared" / "firehose-samples"))
PYTHON = sys.executable
BIN = Path(sys.executable).parent


def sample(version: str, name: str) -> bytes:
    return (SAMPLES / version / name).read_bytes()
