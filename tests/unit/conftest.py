"""Fixtures of the fast tier: the worker core on the suite's Redis with an in-process partner."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import redis as redis_lib
from flask import Flask

from common.config import Settings
from common.keys import Keys
from service import create_app
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


# A key prefix of the test's own on the suite's Redis, as the dead-letter tests use it (a module that
# wants other `settings`, `keys`, `client` or `app` defines its own, which pytest takes first).
@pytest.fixture
def settings(redis_url: str) -> Settings:
    return Settings(redis_url=redis_url, broker_url=redis_url, key_prefix=f"t{uuid.uuid4().hex[:8]}")


@pytest.fixture
def keys(settings: Settings) -> Keys:
    return Keys(settings.key_prefix)


@pytest.fixture
def client(settings: Settings) -> Iterator[redis_lib.Redis]:
    """A Redis client on the prefix's database (the keys are the caller's to prefix, through `keys`)."""
    c = redis_lib.Redis.from_url(settings.redis_url)
    yield c
    c.close()


@pytest.fixture
def app(settings: Settings) -> Flask:
    return create_app(settings)
