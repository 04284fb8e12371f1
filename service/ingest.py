"""Dedupe and durable enqueue of an accepted message, in one Redis round trip.

A membership change also needs to know, for its answer, whether the account's audiences are
suspended: that question rides in the same round trip.

This is the only place where the request path touches the queue. The message goes into a
Redis stream (the inbox) exactly as it arrived; workers move it on to Celery (workers/pump.py).
"""

from __future__ import annotations

import hashlib

import redis
from flask import Flask, current_app
from redis.commands.core import Script
from redis.exceptions import NoScriptError

from common.config import Settings
from common.keys import Keys, partner_key
from common.redis_conn import ingest_client

# SET NX marks the id as seen and XADD stores the body: both or neither, atomically, so a
# retry of a message we stored is recognised, and a message we did not store is not.
_STORE = """
local stored = 0
if redis.call('SET', KEYS[1], '1', 'NX', 'EX', tonumber(ARGV[1])) then
  redis.call('XADD', KEYS[2], '*', 'body', ARGV[2], 'type', ARGV[3], 'id', ARGV[4])
  stored = 1
end
"""

# Whether the partner refused this account's current API key for audiences: the flag at
# `suspend_key` holds the refused key's hash. A flag for another key means the customer has
# since changed it: clear it and try again.
_CHECK_SUSPENDED = """
local suspended = 0
local flag = redis.call('GET', suspend_key)
if flag then
  if flag == current_key then suspended = 1 else redis.call('DEL', suspend_key) end
end
"""

_ACCEPT = _STORE + "return stored"
# A membership change's answer says whether to suspend: asked in the same round trip.
_ACCEPT_AND_CHECK = (
    _STORE + "local suspend_key, current_key = KEYS[3], ARGV[5]" + _CHECK_SUSPENDED + "return {stored, suspended}"
)
# Verification traffic stores nothing, but its answer still says whether to suspend.
_SUSPENDED = "local suspend_key, current_key = KEYS[1], ARGV[1]" + _CHECK_SUSPENDED + "return suspended"


class IngestUnavailable(Exception):
    """Redis did not store the message within the budget; mParticle must retry."""


class Ingest:
    """Flask extension: each app built by create_app makes its own and binds it with init_app.

    One instance serves one app (its settings, its Redis pool), kept in app.extensions["ingest"];
    there is no module-level instance, so two apps in one process never share or replace one.
    """

    def __init__(self, app: Flask | None = None) -> None:
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        settings: Settings = app.config["SETTINGS"]
        self.keys = Keys(settings.key_prefix)
        self.ttl = settings.dedup_ttl_seconds
        self.client = ingest_client(settings.redis_url, settings.ingest_redis_timeout_ms, settings.redis_ssl_cert_reqs)
        self._accept = self.client.register_script(_ACCEPT)
        self._accept_and_check = self.client.register_script(_ACCEPT_AND_CHECK)
        self._suspended = self.client.register_script(_SUSPENDED)
        app.extensions["ingest"] = self

    def accept(self, message_id: str | None, kind: str, body: bytes) -> bool:
        """Store the message unless its id was accepted before; True when stored now."""
        dedupe_id = self._dedupe_id(message_id, body)
        try:
            stored = self._run(
                self._accept, (self.keys.seen(dedupe_id), self.keys.inbox), (self.ttl, body, kind, dedupe_id)
            )
        except redis.RedisError as exc:
            raise IngestUnavailable(type(exc).__name__) from exc
        return bool(stored)

    def accept_and_check(
        self, message_id: str | None, kind: str, body: bytes, account_id: int, api_key: str | None
    ) -> tuple[bool, bool]:
        """`accept`, and `suspended` for the account, in one round trip: (stored now, suspended)."""
        dedupe_id = self._dedupe_id(message_id, body)
        keys = (self.keys.seen(dedupe_id), self.keys.inbox, self.keys.suspended(account_id))
        try:
            stored, suspended = self._run(
                self._accept_and_check, keys, (self.ttl, body, kind, dedupe_id, self._flag(api_key))
            )
        except redis.RedisError as exc:
            raise IngestUnavailable(type(exc).__name__) from exc
        return bool(stored), bool(suspended)

    def suspended(self, account_id: int, api_key: str | None) -> bool:
        """True when the partner answered 401/403 to this account's audience calls with this key."""
        try:
            flag = self._run(self._suspended, (self.keys.suspended(account_id),), (self._flag(api_key),))
        except redis.RedisError:
            # Not worth failing the answer over: the flag is asked for again on the next message.
            return False
        return bool(flag)

    @staticmethod
    def _dedupe_id(message_id: str | None, body: bytes) -> str:
        return message_id or "sha256-" + hashlib.sha256(body).hexdigest()

    @staticmethod
    def _flag(api_key: str | None) -> str:
        return partner_key(api_key) if api_key else ""

    def _run(self, script: Script, keys: tuple[str, ...], args: tuple[object, ...]) -> object:
        """EVALSHA of one of our scripts.

        Straight through execute_command: Script.__call__ goes through redis-py's
        deprecated-argument wrapper, which inspects the call every time, on the request path.
        A NOSCRIPT (Redis restarted or its script cache was flushed) loads the script again
        and runs it once more, as Script.__call__ does.
        """
        try:
            return self.client.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
        except NoScriptError:
            script.sha = self.client.script_load(script.script)
            return self.client.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)

    def ping(self) -> bool:
        try:
            return bool(self.client.ping())
        except redis.RedisError:
            return False


def app_ingest(app: Flask | None = None) -> Ingest:
    """The Ingest of `app`, or of the app handling the current request."""
    return (app or current_app).extensions["ingest"]
