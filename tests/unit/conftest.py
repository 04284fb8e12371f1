"""Fixtures of the fast tier: the worker core on the suite's Redis with an in-process partner."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.partner_clients import ScriptedPartnerClient
from tests.support.worker_core import core_runtime
from workers.runtime import Runtime


@pytest.fixture
def partner() -> ScriptedPartnerClient:
    """A partner client in this process that answers 200 unless told otherwise, and records every call."""
    return ScriptedPartnerClient()


@pytest.fixture
def rt(partner: ScriptedPartnerClient) -> Iterator[Runtime]:
    """A worker runtime of the test's own (its own key prefix) on the suite's Redis, with `partner`."""
    runtime = core_runtime(partner)
    yield runtime
    runtime.redis.close()
