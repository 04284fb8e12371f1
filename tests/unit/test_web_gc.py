"""The web worker's garbage-collector tuning (gunicorn.conf.py, post_worker_init).

Under gunicorn the collector cost a 100-profile membership change more CPU than everything
else the relay does for it (bench/RESULTS.md, profile section): each request's ~2,200 parsed
containers set off gen-0 collections mid-parse, and the promoted messages a full collection of
the whole app every few dozen requests. These tests hold the hook to what fixes that.
"""

from __future__ import annotations

import gc
import os
import runpy
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import orjson
import pytest

from bench import perf

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def conf() -> Iterator[dict[str, Any]]:
    with mock.patch.dict(os.environ):
        os.environ.setdefault("FIREHOSE_AUTH_TOKEN", "gc-test-token")  # the file stops without one
        yield runpy.run_path(str(ROOT / "gunicorn.conf.py"))


@pytest.fixture
def restored_gc() -> Iterator[None]:
    # The hook changes the collector of the whole process: give the rest of the run its own back.
    threshold = gc.get_threshold()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)


def _collections_while_parsing(bodies: list[bytes]) -> int:
    """Collections run while the messages are parsed and held at once, as a worker's threads do."""
    runs = []

    def count(phase: str, _info: dict[str, Any]) -> None:
        if phase == "start":
            runs.append(1)

    gc.collect()
    gc.callbacks.append(count)
    try:
        held = [orjson.loads(body) for body in bodies]
        assert all(message["type"] == "audience_membership_change_request" for message in held)
        del held
    finally:
        gc.callbacks.remove(count)
    return len(runs)


def test_worker_freezes_the_app_and_raises_the_gen0_threshold(conf: dict[str, Any], restored_gc: None) -> None:
    gc.unfreeze()
    conf["post_worker_init"](object())
    assert gc.get_freeze_count() > 0  # what the app built at start is out of every collection
    assert gc.get_threshold()[0] == conf["GC_GEN0_THRESHOLD"]


def test_membership_changes_in_flight_on_every_thread_run_no_collection(
    conf: dict[str, Any], restored_gc: None
) -> None:
    # One 100-profile change per thread of a worker (gunicorn.conf.py's default threads: 4).
    bodies = [perf.membership_body(100)] * conf["threads"]
    gc.set_threshold(700, 10, 10)  # CPython's default, for the contrast
    assert _collections_while_parsing(bodies) > 0
    conf["post_worker_init"](object())
    assert _collections_while_parsing(bodies) == 0
