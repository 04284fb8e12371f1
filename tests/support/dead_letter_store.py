"""What the dead-letter store's unit tests share (tests/unit/test_dead_letters.py and
tests/unit/test_dead_letter_store.py): letters to add, `flask dlq` through Flask's CLI runner, and
one delivery attempt through the real path to a scripted partner. Their fixtures (a key prefix of
the test's own: settings, keys, client, app) are in tests/unit/conftest.py."""

from __future__ import annotations

import uuid
from typing import Any

import orjson
import redis as redis_lib
from click.testing import Result
from flask import Flask

from common import dead_letters
from common.config import Settings
from common.keys import Keys
from tests.support import sample
from tests.support.loopback import Answer, ScriptedServer, serve
from workers.delivery import Decision
from workers.partner.reference import ReferencePartnerClient
from workers.runtime import build_runtime
from workers.tasks import run_attempt


def letter_message(
    account_id: int | None = None, message_id: str | None = None, api_key: str | None = None
) -> dict[str, Any]:
    """The iOS event batch with a fresh id unless given one; the fixture's account and apiKey unless given others."""
    message = orjson.loads(sample("3.2.0", "EventProcessingRequest_ios.json"))
    message["id"] = message_id or str(uuid.uuid4())
    if account_id is not None:
        message["account"]["account_id"] = account_id
    if api_key is not None:
        message["account"]["account_settings"]["apiKey"] = api_key
    return message


def add_letter(client: redis_lib.Redis, keys: Keys, message: dict[str, Any], **changes: Any) -> dead_letters.DeadLetter:
    """`message` dead-lettered as a partner's 400 leaves it, but for `changes`."""
    values: dict[str, Any] = {
        "reason": "partner_rejected",
        "message_id": message["id"],
        "account_id": message["account"]["account_id"],
        "message_type": message["type"],
        "last_status": 400,
        "attempts": 1,
    }
    return dead_letters.add(client, keys, orjson.dumps(message).decode(), **(values | changes))


def dlq(app: Flask, *args: str, stdin: str | None = None) -> Result:
    """`flask dlq ARGS` of `app`, with `stdin` as what the operator types."""
    return app.test_cli_runner().invoke(args=["dlq", *args], input=stdin)


def attempt_against(
    settings: Settings, answer: Answer, message: dict[str, Any], attempt: int
) -> tuple[Decision | None, ScriptedServer]:
    """One delivery attempt of `message` through the reference client to a partner on loopback that
    gives `answer`: what the worker decided, and the partner (what it received)."""
    server = ScriptedServer(answer)
    with serve(server.app) as url:
        rt = build_runtime(
            Settings(**(settings.model_dump() | {"partner_rate_limit": "none"})),
            partner=ReferencePartnerClient(url, 2.0),
        )
        try:
            decision = run_attempt([orjson.dumps(message).decode()], attempt, None, grouped=False, rt=rt)
        finally:
            rt.redis.close()
    return decision, server
