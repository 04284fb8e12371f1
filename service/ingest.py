"""Dedupe and durable enqueue of an accepted message, in one Redis round trip.

A membership change also needs to know, for its answer, whether the account's audiences are
suspended: that question rides in the same round trip.

This is the only place where the request path touches the queue. The message goes into a
Redis stream (the inbox) exactly as it arrived; workers move it on to Celery (workers/pump.py).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time

import redis
from flask import Flask, current_app
from redis.commands.core import Script
from redis.connection import Connection
from redis.exceptions import NoScriptError, ReadOnlyError

from common.config import Settings, SettingsError
from common.keys import Keys, mark_digest, partner_key
from common.marks import LUA as MARKS_LUA
from common.redis_conn import ingest_redis

log = logging.getLogger(__name__)

# Both storing scripts start here: is this account's message id marked as seen (common/marks.py)?
# ARGV[1] is the marks' TTL, ARGV[6] the mark's digest, ARGV[7] its namespace.
_FIND_MARK = (
    MARKS_LUA
    + """
local now = mark_now()
local found = mark_find(ARGV[7], false, ARGV[6], tonumber(ARGV[1]), now)
"""
)
# The seen mark and XADD of the body into KEYS[1], the inbox: both or neither, atomically, so a
# retry of a message we stored is recognised, and a message we did not store is not.
_STORE = (
    _FIND_MARK
    + """
local stored = 0
if not found then
  mark_add(ARGV[7], ARGV[6], tonumber(ARGV[1]), now)
  redis.call('XADD', KEYS[1], '*', 'body', ARGV[2], 'type', ARGV[3], 'id', ARGV[4])
  stored = 1
end
"""
)
# A body of BIG_BODY_BYTES or more is not passed to the script: Redis copied it into a Lua string
# and out again, which cost Redis more CPU than all the rest of the store (a 130 KB membership
# change: about 400 against 155 us, a 56 KB event batch 195 against 95). Its own XADD goes first,
# with the script after it in one MULTI/EXEC, so nothing runs between the two and the inbox's last
# entry is the one just written. A message already seen has that entry deleted again: the inbox
# ends as `_STORE` leaves it. ARGV as for `_STORE`, with ARGV[2] (the body) empty.
BIG_BODY_BYTES = 16 * 1024
_STORE_AFTER_XADD = (
    _FIND_MARK
    + """
local stored = 1
if found then
  local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)[1]
  redis.call('XDEL', KEYS[1], last[1])
  stored = 0
else
  mark_add(ARGV[7], ARGV[6], tonumber(ARGV[1]), now)
end
"""
)
# Under REDIS_MIN_REPLICAS a retry of a message whose 2xx WAIT could not confirm finds its mark:
# the mark must not answer 2xx by itself. Writing it again makes this call a write, so the WAIT
# that follows covers everything before it in the replication stream, the first copy included:
# 2xx once a replica holds that copy, 503 again until then. After a failover that lost the copy
# the mark is gone too, and the retry stores the message anew.
_TOUCH = """
if found then redis.call('HSET', found, ARGV[6], 1) end
"""

# Whether the partner refused this account's current API key for audiences: the flag at
# `suspend_key` holds the refused key's hash. A message without a key proves nothing about the
# refused one, so it is answered "suspended" and leaves the flag. Only a message stored now
# (`may_clear`) with a different, non-empty key lifts it: the customer changed the key in
# mParticle. Verification traffic stores nothing and never lifts it.
_CHECK_SUSPENDED = """
local suspended = 0
local flag = redis.call('GET', suspend_key)
if flag then
  if flag == current_key or current_key == '' then
    suspended = 1
  elseif may_clear then
    redis.call('DEL', suspend_key)
  end
end
"""


def _accept_script(confirm: bool, after_xadd: bool = False) -> str:
    return (_STORE_AFTER_XADD if after_xadd else _STORE) + (_TOUCH if confirm else "") + "return stored"


def _accept_and_check_script(confirm: bool, after_xadd: bool = False) -> str:
    # A membership change's answer says whether to suspend: asked in the same round trip.
    return (
        (_STORE_AFTER_XADD if after_xadd else _STORE)
        + (_TOUCH if confirm else "")
        + "local suspend_key, current_key, may_clear = KEYS[2], ARGV[5], stored == 1\n"
        + _CHECK_SUSPENDED
        + "return {stored, suspended}"
    )


_ACCEPT = _accept_script(False)
# Verification traffic stores nothing, but its answer still says whether to suspend.
_SUSPENDED = (
    "local suspend_key, current_key, may_clear = KEYS[1], ARGV[1], false" + _CHECK_SUSPENDED + "return suspended"
)

# maxmemory-policy values that let Redis delete keys to make room: queued messages and dedupe
# marks among them, answered 2xx and then gone.
_EVICTING = ("allkeys-", "volatile-")
# How often one process reads INFO memory for the high-watermark check: never per request.
MEMORY_CHECK_INTERVAL_S = 1.0


class RedisPolicyError(SettingsError):
    """Redis would evict keys under memory pressure: refused at start, with how to fix it."""

    def __init__(self, policy: str) -> None:
        problem = (
            f"Redis's maxmemory-policy is {policy!r}: when Redis fills up it would delete queued messages "
            "and dedupe marks that were already answered 2xx. Set it to noeviction (redis.conf "
            "`maxmemory-policy noeviction`, `CONFIG SET maxmemory-policy noeviction`, or the managed "
            "service's parameter group / plan setting) and start again."
        )
        self.problems = [problem]
        ValueError.__init__(self, problem)


def check_eviction_policy(client: redis.Redis) -> str | None:
    """Raise RedisPolicyError on an evicting maxmemory-policy; the policy read, or None when it
    could not be read (a managed Redis may forbid CONFIG, or Redis is not up yet): a warning then."""
    try:
        policy = client.config_get("maxmemory-policy").get("maxmemory-policy")
    except redis.RedisError as exc:
        log.warning(
            "redis_policy_unchecked error=%s",
            type(exc).__name__,
            extra={"event": "redis_policy_unchecked", "error": type(exc).__name__},
        )
        return None
    if isinstance(policy, bytes):
        policy = policy.decode()
    if policy and policy.startswith(_EVICTING):
        raise RedisPolicyError(policy)
    return policy


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
        # Through Sentinel when REDIS_SENTINELS is set (common/redis_conn.py), else REDIS_URL as it is.
        self.client = ingest_redis(settings, settings.ingest_redis_timeout_ms)
        self._local = threading.local()  # each thread's own connection (_connection)
        self.min_replicas = settings.redis_min_replicas
        # WAIT must answer within the request's Redis budget, with room for the reply to arrive
        # before the socket timeout (the same budget) gives up on it. WAIT 0 would block forever.
        budget = settings.ingest_redis_timeout_ms
        self.wait_ms = max(1, budget - max(5, budget // 5))
        self.watermark = settings.redis_memory_high_watermark
        self._memory_high = False
        self._memory_next_check = 0.0
        self._memory_checkable = True
        confirm = self.min_replicas > 0
        self._accept = self.client.register_script(_accept_script(confirm))
        self._accept_and_check = self.client.register_script(_accept_and_check_script(confirm))
        # Sent whole (EVAL) inside the MULTI: an EVALSHA there that met NOSCRIPT would leave the
        # XADD before it done and the mark not written.
        self._accept_big = _accept_script(confirm, after_xadd=True)
        self._accept_and_check_big = _accept_and_check_script(confirm, after_xadd=True)
        self._suspended = self.client.register_script(_SUSPENDED)
        # Web and workers both build their app through here (workers/worker.py): one check for both.
        check_eviction_policy(self.client)
        self._load_scripts()
        app.extensions["ingest"] = self

    def _load_scripts(self) -> None:
        """Load the EVALSHA scripts now, so that the first requests do not each meet NOSCRIPT and
        run again (under REDIS_MIN_REPLICAS, WAIT too: twice the budget). A Redis not up yet
        loads them on first use instead."""
        for script in (self._accept, self._accept_and_check, self._suspended):
            try:
                script.sha = self.client.script_load(script.script)
            except redis.RedisError:
                return

    def accept(self, message_id: str | None, kind: str, body: bytes, account_id: int | str | None = None) -> bool:
        """Store the message unless this account's message id was accepted before; True when stored now."""
        dedupe_id = self._dedupe_id(message_id, body)
        self._check_memory()
        try:
            stored = self._store(
                self._accept_big if len(body) >= BIG_BODY_BYTES else self._accept,
                (self.keys.inbox,),
                (self.ttl, body, kind, dedupe_id, "", *self._mark(dedupe_id, account_id)),
            )
        except redis.RedisError as exc:
            raise IngestUnavailable(type(exc).__name__) from exc
        return bool(stored)

    def accept_and_check(
        self, message_id: str | None, kind: str, body: bytes, account_id: int, api_key: str | None
    ) -> tuple[bool, bool]:
        """`accept`, and `suspended` for the account, in one round trip: (stored now, suspended)."""
        dedupe_id = self._dedupe_id(message_id, body)
        self._check_memory()
        keys = (self.keys.inbox, self.keys.suspended(account_id))
        try:
            stored, suspended = self._store(
                self._accept_and_check_big if len(body) >= BIG_BODY_BYTES else self._accept_and_check,
                keys,
                (self.ttl, body, kind, dedupe_id, self._flag(api_key), *self._mark(dedupe_id, account_id)),
            )
        except redis.RedisError as exc:
            raise IngestUnavailable(type(exc).__name__) from exc
        return bool(stored), bool(suspended)

    def suspended(self, account_id: int, api_key: str | None) -> bool:
        """True when the partner answered 401/403 to this account's audience calls with this key
        (or the message has no key while such a refusal stands). Never changes the flag."""
        try:
            flag = self._run(self._suspended, (self.keys.suspended(account_id),), (self._flag(api_key),))
        except redis.RedisError:
            # Not worth failing the answer over: the flag is asked for again on the next message.
            return False
        return bool(flag)

    def memory_high(self) -> bool:
        """Whether Redis's used memory was above REDIS_MEMORY_HIGH_WATERMARK x maxmemory when last
        read (at most once a second per process, so no request pays a round trip for it)."""
        now = time.monotonic()
        if not self._memory_checkable or now < self._memory_next_check:
            return self._memory_high
        self._memory_next_check = now + MEMORY_CHECK_INTERVAL_S
        try:
            memory = self.client.info("memory")
        except redis.ResponseError:
            # A managed Redis may rename or forbid INFO: then Redis's own OOM refusal is the limit.
            self._memory_checkable = False
            log.warning("redis_memory_unchecked", extra={"event": "redis_memory_unchecked"})
            return False
        except redis.RedisError:
            return self._memory_high  # slow or away now: the store itself will tell
        maxmemory = int(memory.get("maxmemory") or 0)
        used = int(memory.get("used_memory") or 0)
        high = bool(maxmemory) and used >= self.watermark * maxmemory
        if high != self._memory_high:
            log.warning(
                "redis_memory_high" if high else "redis_memory_ok",
                extra={"event": "redis_memory_high" if high else "redis_memory_ok", "used": used, "max": maxmemory},
            )
        self._memory_high = high
        return high

    def _check_memory(self) -> None:
        # Before writing: near maxmemory, new messages wait (503) so the workers have room to drain.
        if self.memory_high():
            raise IngestUnavailable("memory_high")

    def _store(self, script: Script | str, keys: tuple[str, ...], args: tuple[object, ...]) -> object:
        """Run a storing script (ARGV[2] the body); a script given as source is `_STORE_AFTER_XADD`'s:
        the body goes in its own XADD first, both in one MULTI/EXEC. Under REDIS_MIN_REPLICAS, WAIT
        for the replicas in the same round trip and raise IngestUnavailable when too few confirmed
        in time."""
        wait = [("WAIT", self.min_replicas, self.wait_ms)] if self.min_replicas else []
        if isinstance(script, Script):
            replies = self._evalsha(script, keys, args, wait)
            result = replies[0]
        else:
            ttl, body, kind, dedupe_id, *rest = args
            replies = self._round_trip(
                [
                    ("MULTI",),
                    ("XADD", keys[0], "*", "body", body, "type", kind, "id", dedupe_id),
                    ("EVAL", script, len(keys), *keys, ttl, "", kind, dedupe_id, *rest),
                    ("EXEC",),
                    *wait,
                ]
            )
            # An error before EXEC (Redis out of memory) aborts the whole transaction; one in
            # EXEC's own reply is the script's, after the XADD ran: a retry of the message then
            # stores it again, and the delivered marks send it once.
            failed = next((r for r in replies[:4] if isinstance(r, Exception)), None)
            if failed is not None:
                raise failed
            result = replies[3][1]
        if isinstance(result, Exception):
            raise result
        if wait:
            confirmed = replies[-1]
            if isinstance(confirmed, Exception):
                raise confirmed
            if int(confirmed) < self.min_replicas:
                raise IngestUnavailable(f"replicas_confirmed={int(confirmed)}")
        return result

    def _evalsha(
        self, script: Script, keys: tuple[str, ...], args: tuple[object, ...], after: list[tuple[object, ...]]
    ) -> list[object]:
        """EVALSHA of one of our scripts, and `after`, in one round trip: every reply. A NOSCRIPT
        (Redis restarted or its script cache was flushed) loads the script and runs it all again."""
        commands = [("EVALSHA", script.sha, len(keys), *keys, *args), *after]
        replies = self._round_trip(commands)
        if isinstance(replies[0], NoScriptError):
            script.sha = self.client.script_load(script.script)
            commands[0] = ("EVALSHA", script.sha, len(keys), *keys, *args)
            replies = self._round_trip(commands)
        return replies

    @staticmethod
    def _dedupe_id(message_id: str | None, body: bytes) -> str:
        return message_id or "sha256-" + hashlib.sha256(body).hexdigest()

    def _mark(self, dedupe_id: str, account_id: int | str | None) -> tuple[bytes, str]:
        """The seen mark's digest and namespace (ARGV[6], ARGV[7] of the storing scripts)."""
        return mark_digest(account_id, dedupe_id), self.keys.seen_marks

    @staticmethod
    def _flag(api_key: str | None) -> str:
        return partner_key(api_key) if api_key else ""

    def _run(self, script: Script, keys: tuple[str, ...], args: tuple[object, ...]) -> object:
        """EVALSHA of one of our scripts: its reply, or its error raised."""
        result = self._evalsha(script, keys, args, [])[0]
        if isinstance(result, Exception):
            raise result
        return result

    def _connection(self) -> Connection:
        """This thread's own connection to Redis, opened on its first command and after a failure.

        Through redis-py's client every command took a connection from the pool and gave it back:
        a lock, a deprecated-argument check that inspects the call, a poll() of the socket, a
        retry wrapper with no retry to make, four observability hooks. A web thread serves one
        request at a time, so it keeps a connection of its own (one per thread; a process forked
        from this one makes its own) made by the same pool: the same address, Sentinel lookup,
        TLS and timeouts.
        """
        local = self._local
        if getattr(local, "pid", None) != os.getpid():
            local.conn = self.client.connection_pool.make_connection()
            local.pid = os.getpid()
        return local.conn

    def _round_trip(self, commands: list[tuple[object, ...]]) -> list[object]:
        """Send `commands` in one write and read every reply, an error reply in its place.

        A connection that fails is closed by redis-py as it raises (the next command reconnects,
        under Sentinel to whichever primary it names now); so is one that meets READONLY, an old
        primary demoted by a failover, whose refused write was not applied.
        """
        conn = self._connection()
        # Connected here, not by the send: under Sentinel only connect() asks for the primary's
        # address (a send would open the connection to the address it was made with).
        if not conn.is_connected:
            conn.connect()
        conn.send_packed_command(conn.pack_commands(commands), check_health=False)
        replies: list[object] = []
        try:
            for _ in commands:
                try:
                    replies.append(conn.read_response())
                except redis.ResponseError as exc:
                    if isinstance(exc, ReadOnlyError):
                        raise
                    replies.append(exc)
        except BaseException:
            # Replies left unread would answer the thread's next request: never reuse it.
            conn.disconnect()
            raise
        return replies

    def ping(self) -> bool:
        try:
            return bool(self.client.ping())
        except redis.RedisError:
            return False


def app_ingest(app: Flask | None = None) -> Ingest:
    """The Ingest of `app`, or of the app handling the current request."""
    return (app or current_app).extensions["ingest"]
