"""Dedupe and durable enqueue of an accepted message, in one Redis round trip.

This is the only place where the request path touches the queue. The message goes into a
Redis stream (the inbox) exactly as it arrived; workers move it on to Celery (workers/pump.py).
"""

from __future__ import annotations

import hashlib

import redis
from flask import Flask
from redis.commands.core import Script
from redis.exceptions import NoScriptError

from common.config import Settings
from common.keys import Keys, partner_key
from common.redis_conn import ingest_client

# SET NX marks the id as seen and XADD stores the body: both or neither, atomically, so a
# retry of a message we stored is recognised, and a message we did not store is not.
_ACCEPT = """
if redis.call('SET', KEYS[1], '1', 'NX', 'EX', tonumber(ARGV[1])) then
  redis.call('XADD', KEYS[2], '*', 'body', ARGV[2], 'type', ARGV[3], 'id', ARGV[4])
  return 1
end
return 0
"""


# Answers whether the partner refused this account's current API key for audiences. A flag
# set for another key means the customer has since changed it: clear it and try again.
_SUSPENDED = """
local flag = redis.call('GET', KEYS[1])
if not flag then return 0 end
if flag == ARGV[1] then return 1 end
redis.call('DEL', KEYS[1])
return 0
"""


class IngestUnavailable(Exception):
    """Redis did not store the message within the budget; mParticle must retry."""


class Ingest:
    """Flask extension, bound in the app factory."""

    def __init__(self, app: Flask | None = None) -> None:
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        settings: Settings = app.config["SETTINGS"]
        self.keys = Keys(settings.key_prefix)
        self.ttl = settings.dedup_ttl_seconds
        self.client = ingest_client(settings.redis_url, settings.ingest_redis_timeout_ms)
        self._accept = self.client.register_script(_ACCEPT)
        self._suspended = self.client.register_script(_SUSPENDED)
        app.extensions["ingest"] = self

    def accept(self, message_id: str | None, kind: str, body: bytes) -> bool:
        """Store the message unless its id was accepted before; True when stored now."""
        dedupe_id = message_id or "sha256-" + hashlib.sha256(body).hexdigest()
        try:
            stored = self._run(
                self._accept, (self.keys.seen(dedupe_id), self.keys.inbox), (self.ttl, body, kind, dedupe_id)
            )
        except redis.RedisError as exc:
            raise IngestUnavailable(type(exc).__name__) from exc
        return bool(stored)

    def suspended(self, account_id: int, api_key: str | None) -> bool:
        """True when the partner answered 401/403 to this account's audience calls with this key."""
        try:
            flag = self._run(
                self._suspended, (self.keys.suspended(account_id),), (partner_key(api_key) if api_key else "",)
            )
        except redis.RedisError:
            # Not worth failing the answer over: the flag is asked for again on the next message.
            return False
        return bool(flag)

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


ingest = Ingest()
