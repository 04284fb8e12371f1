"""Moves accepted messages from the Redis inbox stream to Celery delivery tasks, in fair turns.

The request path stores each message with one Redis call and never pays Celery's publish
cost; a thread in each worker does the rest, in two steps:

- **Sort.** It reads the inbox through a consumer group and, in one Lua call per batch, moves
  each entry into its lane (`fr:lane:<lane>`, one stream per API key's hash or per the entry's
  own `lane` field, workers/grouping.py `lane_of`), registering the lane in `fr:lanes`. The
  inbox entry is acknowledged and deleted in the same call, so an entry is in exactly one place.
- **Dispatch.** While Celery's queue is shorter than PUMP_MAX_QUEUED, a round reads every lane
  with one multi-stream XREADGROUP (at most one turn's worth of entries each), plans the jobs
  lane by lane and publishes them interleaved, one job from each lane in turn. So 10,000
  messages waiting for one key never stand in front of one message for another: that message
  is published in the next round, near its front. Celery's queue stays short, so the waiting
  happens in the lanes, where turns are fair, and not in Celery's one FIFO list.

An entry leaves a stream only after it moved on (into a lane, or into a published task).
Entries a dead worker had read are claimed by another after PUMP_CLAIM_IDLE_MS, in the inbox
and in every lane, so a crash at any point loses nothing (it may publish twice, which the
delivered-markers in workers/delivery.py absorb). Each pump reads under a consumer name of its
own (host, pid, random suffix): two workers started alike on one host never take each other's
pending entries for their own.
"""

from __future__ import annotations

import bisect
import logging
import os
import re
import secrets
import socket
import threading
import time
import uuid
from collections.abc import Iterable
from typing import Any

import orjson
import redis
from celery import Celery, bootsteps

from common.config import Settings
from common.keys import Keys
from common.names import DELIVER_EVENTS_TASK, DELIVER_TASK, DELIVERY_QUEUE, INBOX_GROUP
from common.redis_conn import worker_redis
from workers import units
from workers.grouping import GROUP, Job, lane_of, plan_jobs
from workers.scheduler import RetrySchedule

log = logging.getLogger(__name__)

Entry = tuple[bytes, dict[bytes, bytes] | None]

# Lanes read by one XREADGROUP (and claimed by one pipeline): bounds one reply, not a round.
LANES_PER_READ = 100
# How long one turn may keep sorting a full inbox before dispatching: long enough to move a
# backlog of thousands into the lanes in one go (a sort is cheap, no Celery: some 15,000 5 KB
# messages a second), short enough that Celery's queue does not run dry meanwhile.
SORT_BUDGET_S = 1.0
# While Celery's queue is at PUMP_MAX_QUEUED, or a lane waits for its tasks to finish, the pump
# looks again this often (it keeps sorting).
HOLD_POLL_MS = 20
# A consumer name idle this long with nothing pending is a pump that is gone: forgotten, so
# restarts (each a new name) do not pile up names in the groups.
STALE_CONSUMER_MS = 3_600_000

# Moves inbox entries into their lanes. KEYS: inbox, lanes set, the lane streams.
# ARGV: group, then (entry id, index of its lane's key in KEYS, lane name) per entry.
# An entry already gone (another pump claimed and sorted it) is only acknowledged, so every
# entry lands in exactly one lane once. Entries without first_seen get the inbox id's time:
# the lane gives them a new id, and a message's maximum age counts from its acceptance.
_SORT = """
local inbox, group = KEYS[1], ARGV[1]
local ready = {}
local moved = 0
for i = 2, #ARGV, 3 do
  local id, key, lane = ARGV[i], KEYS[tonumber(ARGV[i + 1])], ARGV[i + 2]
  local found = redis.call('XRANGE', inbox, id, id)
  if #found == 1 then
    if not ready[key] then
      -- The group comes with the stream; BUSYGROUP (it exists) is the usual answer.
      redis.pcall('XGROUP', 'CREATE', key, group, '0', 'MKSTREAM')
      redis.call('SADD', KEYS[2], lane)
      ready[key] = true
    end
    local fields = found[1][2]
    local has_first_seen = false
    for j = 1, #fields, 2 do
      if fields[j] == 'first_seen' then has_first_seen = true end
    end
    if not has_first_seen then
      table.insert(fields, 'first_seen')
      table.insert(fields, string.match(id, '^(%d+)'))
    end
    redis.call('XADD', key, '*', unpack(fields))
    moved = moved + 1
  end
  redis.call('XACK', inbox, group, id)
  redis.call('XDEL', inbox, id)
end
return moved
"""

# Reads lanes, and removes the empty ones. KEYS: lane streams; ARGV: group, consumer, count,
# start id ('>' new, '0' own pending), lanes set, then the lanes' names in KEYS order.
# A lane with no entry left (entries leave only once published, so none is pending either) is
# deleted and unregistered here, atomically with respect to the sort: a sort that adds to it
# afterwards creates it again. Lanes that vanished are skipped, so the XREADGROUP of the
# remaining ones never meets a missing group.
_READ_LANES = """
local group, consumer, count, start, lanes = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local live = {}
for i, key in ipairs(KEYS) do
  if redis.call('XLEN', key) > 0 then
    table.insert(live, key)
  else
    local pending = 0
    local summary = redis.pcall('XPENDING', key, group)
    if type(summary) == 'table' and summary[1] then pending = tonumber(summary[1]) end
    if pending == 0 then
      redis.call('DEL', key)
      redis.call('SREM', lanes, ARGV[5 + i])
    end
  end
end
if #live == 0 then return {} end
local args = {'XREADGROUP', 'GROUP', group, consumer, 'COUNT', count, 'STREAMS'}
for _, key in ipairs(live) do table.insert(args, key) end
for _ = 1, #live do table.insert(args, start) end
return redis.call(unpack(args)) or {}
"""

# Forgets consumer names long idle with nothing pending. KEYS: streams; ARGV: group, idle ms.
# In one script, so a consumer cannot read an entry between the check and the deletion.
_FORGET_STALE = """
local forgotten = 0
for _, key in ipairs(KEYS) do
  local consumers = redis.pcall('XINFO', 'CONSUMERS', key, ARGV[1])
  if type(consumers) == 'table' and not consumers.err then
    for _, consumer in ipairs(consumers) do
      local info = {}
      for j = 1, #consumer, 2 do info[consumer[j]] = consumer[j + 1] end
      if tonumber(info['pending']) == 0 and tonumber(info['idle']) > tonumber(ARGV[2]) then
        redis.call('XGROUP', 'DELCONSUMER', key, ARGV[1], info['name'])
        forgotten = forgotten + 1
      end
    end
  end
end
return forgotten
"""


# Jobs one round publishes at most. Publishing a task costs the pump real time when the worker's
# delivery threads are busy (measured: about 7 ms a task on 2 loaded cores), and a message that
# arrives for another key mid-round waits for the round to end: short rounds keep that wait short.
JOBS_PER_ROUND = 16

# Each lane's free task slots: expired slots (a task that died without saying so) are dropped
# first. On Redis's clock, like every other deadline here.
_LANE_ROOM = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rooms = {}
for i, key in ipairs(KEYS) do
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  rooms[i] = tonumber(ARGV[1]) - redis.call('ZCARD', key)
end
return rooms
"""

# KEYS: the lane's slots, the published set. ARGV: task id, slot TTL ms, published deadline ms.
_TAKE_SLOT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[1])
return 1
"""

# Published jobs whose task never ended by their deadline go back into their lane, from the
# copy kept at publish. KEYS: published set, lanes set. ARGV: copy key prefix, lane key prefix,
# group, the group entry type, how many at most. A copy already gone (its task ended as the
# deadline passed) only leaves the set. Atomic, so two pumps never put one job back twice.
_REQUEUE_LOST = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lost = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[5]))
local requeued = 0
for _, task_id in ipairs(lost) do
  local copy_key = ARGV[1] .. task_id
  local raw = redis.call('HGETALL', copy_key)
  if #raw > 0 then
    local job = {}
    for j = 1, #raw, 2 do job[raw[j]] = raw[j + 1] end
    local kind = ''
    if job['kind'] == 'events' then kind = ARGV[4] end
    local lane = ARGV[2] .. job['lane']
    redis.pcall('XGROUP', 'CREATE', lane, ARGV[3], '0', 'MKSTREAM')
    redis.call('SADD', KEYS[2], job['lane'])
    redis.call('XADD', lane, '*', 'body', job['body'], 'type', kind, 'id', job['id'],
               'attempt', job['attempt'], 'first_seen', job['first_seen'], 'lane', job['lane'])
    redis.call('DEL', copy_key)
    requeued = requeued + 1
  end
  redis.call('ZREM', KEYS[1], task_id)
end
return requeued
"""

# A task slot is taken when its job is published and given back when the task ends; one whose
# task never ends (its worker died) lapses after the longest call plus this margin, so a dead
# worker holds its lanes back for seconds, not minutes. A slot that lapses while its task still
# waits in Celery's queue only lets the lane publish a little early: the gate's in-flight cap
# still holds the calls.
SLOT_TTL_MARGIN_S = 10

# kombu's Redis transport takes a task off its queue (BRPOP) before it records it as unacked (a
# second write): a connection or a Redis that dies between the two loses the task, with no copy
# anywhere (kombu#305; seen in tests/e2e/faults/test_redis_restart.py). So a copy of what each
# published task carries stays in Redis until the task ends, and a task that has not ended by
# BROKER_VISIBILITY_TIMEOUT plus this margin after it was published (when Celery itself would have
# handed a held task to another worker) goes back into its lane. Its task may still run late:
# a second copy, which the claims and delivered marks of workers/gate.py absorb.
PUBLISHED_MARGIN_S = 10
# Lost jobs put back by one claim pass at most.
REQUEUE_PER_PASS = 500


def task_ended(client: redis.Redis, keys: Keys, lane: str, task_id: str, work_moved_on: bool = True) -> None:
    """Called by the task as it ends: gives back its lane slot, and, once its work has moved on
    (delivered, rescheduled or dead-lettered, not handed back to the broker), drops the copy."""
    pipe = client.pipeline(transaction=False)
    pipe.zrem(keys.lane_slots(lane), task_id)
    if work_moved_on:
        pipe.delete(keys.published_job(task_id))
        pipe.zrem(keys.published, task_id)
    pipe.execute()


# How a task's messages are named where Celery shows its arguments: ids and types as mParticle
# and the relay write them pass (a UUID, a unit id `<uuid>:<key prefix>`, a type name); anything
# else, which could only come from a hand-written letter, is shown as "?".
_SHOWN_ID = re.compile(r"[0-9A-Za-z][0-9A-Za-z:._-]{0,99}")
_SHOWN_TYPE = re.compile(r"[a-z][a-z_]{0,63}")
# A group's members shown one by one, then counted: an argument summary stays a line, not pages.
SUMMARY_MAX_MEMBERS = 10


def _shown(value: Any, pattern: re.Pattern[str]) -> str:
    return value if isinstance(value, str) and pattern.fullmatch(value) else "?"


def message_summary(body: str) -> dict[str, Any]:
    """What may be shown of one message body: its id, type, account and event count.

    Never a value from the body's settings, identities or events: those hold apiKeys, emails and
    device ids, and Celery sends task arguments to every event subscriber.
    """
    try:
        message: Any = orjson.loads(body)
    except (orjson.JSONDecodeError, TypeError):
        return {"unreadable": True}
    if not isinstance(message, dict):
        return {"unreadable": True}
    account = message.get("account")
    account_id = account.get("account_id") if isinstance(account, dict) else None
    summary: dict[str, Any] = {}
    if units.is_unit_body(body):
        # A unit names the message it came from (workers/units.py).
        summary["unit_of"] = _shown(message.get("message_id"), _SHOWN_ID)
        summary["type"] = _shown(message.get("message_type"), _SHOWN_TYPE)
    else:
        summary["id"] = _shown(message.get("id"), _SHOWN_ID)
        summary["type"] = _shown(message.get("type"), _SHOWN_TYPE)
    summary["account_id"] = account_id if isinstance(account_id, int) and not isinstance(account_id, bool) else None
    events = message.get("events")
    if isinstance(events, list):
        summary["events"] = len(events)
    return summary


def args_summary(job: Job) -> str:
    """The task's arguments as Celery shows them: a summary of each message, never a body."""
    if job.task == "single":
        return repr([message_summary(job.bodies[0])])
    shown: list[Any] = [message_summary(body) for body in job.bodies[:SUMMARY_MAX_MEMBERS]]
    if len(job.bodies) > SUMMARY_MAX_MEMBERS:
        shown.append(f"+{len(job.bodies) - SUMMARY_MAX_MEMBERS} more")
    return repr([shown])


def pump_identity(hostname: str) -> str:
    """A consumer name of this process's own: Celery's node name is the same for two workers
    started from one command line on one host, and a shared name would make each take the
    other's pending entries for its own."""
    return f"{hostname}:{os.getpid()}:{secrets.token_hex(3)}"


def _chunks(items: list[str], size: int) -> Iterable[list[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def interleave(per_lane: dict[str, list[Job]]) -> list[tuple[str, Job]]:
    """One job from each lane in turn: a lane's first job never waits for another's last."""
    jobs: list[tuple[str, Job]] = []
    for depth in range(max((len(lane) for lane in per_lane.values()), default=0)):
        jobs.extend((name, lane[depth]) for name, lane in per_lane.items() if depth < len(lane))
    return jobs


class InboxPump:
    def __init__(self, app: Celery, settings: Settings, consumer: str) -> None:
        self.app = app
        self.settings = settings
        self.consumer = consumer
        self.keys = Keys(settings.key_prefix)
        # Blocking reads need a socket timeout longer than the block.
        self.redis = worker_redis(settings, timeout_s=settings.pump_block_ms / 1000 + 5)
        # Backpressure reads Celery's list where Celery keeps it (CELERY_BROKER_URL may differ).
        self.broker = (
            self.redis
            if settings.broker_url in ("", settings.redis_url)
            else worker_redis(settings, url=settings.broker_url)
        )
        self.queue = DELIVERY_QUEUE
        # Start by re-reading what this consumer name read but never finished (the pump thread
        # restarting after an error; a new process has a new name and claims instead).
        self._own_pending = True
        self._next_claim = 0.0
        # The last lane served: the next round starts after it, so when Celery's queue fills
        # before a round has visited every lane, the lanes left out go first next time.
        self._cursor = ""
        # What the last dispatch did: "busy" (published), "held" (Celery's queue full) or "idle";
        # only an idle pump blocks on the inbox for long.
        self._state = "idle"
        # Jobs a round planned but had no room for, by lane: their entries stay in this
        # consumer's pending lists, and the lane takes its next turn with them instead of with
        # new entries. Without this a round would publish every lane's whole turn (a 750-unit
        # membership change: hundreds of tasks) and Celery's FIFO would again hold one key's
        # backlog in front of another key's next message.
        self._carry: dict[str, list[Job]] = {}
        self.retries = RetrySchedule(self.redis, self.keys)
        self._sort = self.redis.register_script(_SORT)
        self._read_lanes_script = self.redis.register_script(_READ_LANES)
        self._forget_stale = self.redis.register_script(_FORGET_STALE)
        self._lane_room = self.redis.register_script(_LANE_ROOM)
        self.slot_ttl_ms = int((settings.partner_timeout_seconds + SLOT_TTL_MARGIN_S) * 1000)
        self.published_ttl_ms = int((settings.broker_visibility_timeout + PUBLISHED_MARGIN_S) * 1000)
        self._requeue_lost = self.redis.register_script(_REQUEUE_LOST)

    def ensure_group(self) -> None:
        try:
            self.redis.xgroup_create(self.keys.inbox, INBOX_GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    # ------------------------------------------------------------------------------- sort

    def _read_inbox(self, block: int | None, claim: bool) -> list[Entry]:
        count = self.settings.pump_batch_size
        if self._own_pending:
            entries = self._read_group("0", count, block=None)
            if entries:
                return entries
        if claim:
            _, claimed, *_ = self.redis.xautoclaim(
                self.keys.inbox, INBOX_GROUP, self.consumer, self.settings.pump_claim_idle_ms, "0-0", count=count
            )
            if claimed:
                return list(claimed)
        return self._read_group(">", count, block=block)

    def _read_group(self, start: str, count: int, block: int | None) -> list[Entry]:
        reply = self.redis.xreadgroup(INBOX_GROUP, self.consumer, {self.keys.inbox: start}, count=count, block=block)
        return [entry for _, entries in reply or [] for entry in entries if entry[0] is not None]

    def sort_entries(self, entries: list[Entry]) -> int:
        """Move inbox entries into their lanes, in one Lua call; returns how many moved."""
        if not entries:
            return 0
        keys = [self.keys.inbox, self.keys.lanes]
        index: dict[str, int] = {}
        args: list[bytes | str | int] = [INBOX_GROUP]
        for entry_id, fields in entries:
            # An entry deleted while pending reads back without fields: the script only acknowledges it.
            lane = lane_of(fields or {})
            key = self.keys.lane(lane)
            if key not in index:
                keys.append(key)
                index[key] = len(keys)  # Lua counts from 1
            args += [entry_id, index[key], lane]
        return int(self._sort(keys=keys, args=args))

    def sort(self, block: int | None, claim: bool = False) -> int:
        """Read the inbox and sort what it holds into lanes: a full inbox in several batches,
        up to SORT_BUDGET_S, so what waits behind a key's backlog reaches its own lane at once."""
        count = self.settings.pump_batch_size
        entries = self._read_inbox(block, claim)
        moved = self.sort_entries(entries)
        deadline = time.monotonic() + SORT_BUDGET_S
        while len(entries) >= count and time.monotonic() < deadline:
            entries = self._read_inbox(None, claim=False)
            moved += self.sort_entries(entries)
        return moved

    # --------------------------------------------------------------------------- dispatch

    def queued(self) -> int:
        """Tasks waiting in Celery's queue (not those a worker already holds)."""
        return int(self.broker.llen(self.queue))

    def _lanes(self) -> list[str]:
        """Every registered lane, starting after the last one served."""
        lanes = sorted(name.decode() for name in self.redis.smembers(self.keys.lanes))
        start = bisect.bisect_right(lanes, self._cursor)
        return lanes[start:] + lanes[:start]

    def read_lanes(self, lanes: list[str], start: str, count: int) -> dict[str, list[Entry]]:
        """At most `count` entries from each lane (new ones with '>', own pending with '0')."""
        keys = [self.keys.lane(lane) for lane in lanes]
        reply = self._read_lanes_script(
            keys=keys, args=[INBOX_GROUP, self.consumer, count, start, self.keys.lanes, *lanes]
        )
        return self._parse(reply)

    def _parse(self, reply: Any) -> dict[str, list[Entry]]:
        prefix = len(self.keys.lane_prefix)
        by_lane: dict[str, list[Entry]] = {}
        for key, raw_entries in reply or []:
            entries: list[Entry] = []
            for entry_id, flat in raw_entries or []:
                # A pending entry deleted meanwhile comes back without fields (Lua false/nil).
                fields = dict(zip(flat[::2], flat[1::2], strict=True)) if flat else None
                entries.append((entry_id, fields))
            if entries:
                by_lane[key.decode()[prefix:]] = entries
        return by_lane

    def lane_rooms(self, lanes: list[str]) -> dict[str, int]:
        """How many more tasks each lane may have out (published, not yet finished)."""
        rooms: dict[str, int] = {}
        for chunk in _chunks(lanes, LANES_PER_READ):
            free = self._lane_room(
                keys=[self.keys.lane_slots(lane) for lane in chunk], args=[self.settings.partner_max_in_flight_per_key]
            )
            rooms.update(zip(chunk, (int(n) for n in free), strict=True))
        return rooms

    def publish(
        self, by_lane: dict[str, list[Entry]], budget: int | None = None, rooms: dict[str, int] | None = None
    ) -> tuple[int, int]:
        """Publish the lanes' entries (and the jobs carried from the last round) as tasks,
        interleaved across lanes, at most `budget` jobs and each lane's room; acknowledge and
        delete what went out, carry the rest. Returns (jobs, entries) published."""
        settings = self.settings
        per_lane: dict[str, list[Job]] = {lane: jobs for lane, jobs in self._carry.items() if jobs}
        gone: dict[str, list[bytes]] = {}
        for lane, entries in by_lane.items():
            per_lane.setdefault(lane, []).extend(
                plan_jobs(
                    [(entry_id, fields) for entry_id, fields in entries if fields],
                    settings.delivery_batch_max_messages,
                    settings.delivery_batch_max_events,
                )
            )
            # Deleted while pending: nothing to publish, only to acknowledge.
            gone[lane] = [entry_id for entry_id, fields in entries if not fields]
        if rooms is not None:
            # A lane's tasks beyond its room would only be held by the gate's in-flight cap and
            # come back through the retry schedule, crowding Celery's queue for every other key.
            held = {lane: jobs[max(0, rooms.get(lane, 0)) :] for lane, jobs in per_lane.items()}
            per_lane = {lane: jobs[: max(0, rooms.get(lane, 0))] for lane, jobs in per_lane.items()}
        else:
            held = {}
        ordered = interleave(per_lane)
        now, later = (ordered, []) if budget is None else (ordered[:budget], ordered[budget:])
        later = [(lane, job) for lane, job in later] + [(lane, job) for lane, jobs in held.items() for job in jobs]
        if now:
            self._take_slots(now)
            with self.app.producer_or_acquire() as producer:
                for _, job in now:
                    kwargs = {"attempt": job.attempt, "first_seen_ms": job.first_seen_ms}
                    if job.task == "single":
                        name, args = DELIVER_TASK, [job.bodies[0]]
                    else:
                        name, args = DELIVER_EVENTS_TASK, [job.bodies]
                    self.app.send_task(
                        name,
                        args=args,
                        kwargs=kwargs,
                        task_id=job.task_id,
                        queue=DELIVERY_QUEUE,
                        producer=producer,
                        # What Celery's events, Flower and `celery inspect` show in place of the
                        # bodies, which carry apiKeys and personal data (workers/tasks.py SafeRequest).
                        argsrepr=args_summary(job),
                        kwargsrepr=repr(kwargs),
                    )
        self._carry = {}
        for lane, job in later:  # each lane's jobs stay in their order
            self._carry.setdefault(lane, []).append(job)
        done: dict[str, list[bytes]] = {lane: list(ids) for lane, ids in gone.items() if ids}
        for lane, job in now:
            done.setdefault(lane, []).extend(job.entry_ids)
        if done:
            pipe = self.redis.pipeline(transaction=True)
            for lane, ids in done.items():
                pipe.xack(self.keys.lane(lane), INBOX_GROUP, *ids)
                pipe.xdel(self.keys.lane(lane), *ids)
            pipe.execute()
        return len(now), sum(len(job.entry_ids) for _, job in now)

    def _take_slots(self, jobs: list[tuple[str, Job]]) -> None:
        """Each job's task slot in its lane and the copy of what it carries, written before it
        is published (a task that ends first must find both to give back). The task id names
        both."""
        pipe = self.redis.pipeline(transaction=False)
        for lane, job in jobs:
            if job.task_id is None:
                job.task_id = uuid.uuid4().hex
            pipe.hset(
                self.keys.published_job(job.task_id),
                mapping={
                    "lane": lane,
                    "kind": job.task,
                    "body": job.bodies[0] if job.task == "single" else orjson.dumps(job.bodies),
                    "attempt": job.attempt,
                    "first_seen": job.first_seen_ms,
                    "id": job.task_id,
                },
            )
            pipe.execute_command(
                "EVAL",
                _TAKE_SLOT,
                2,
                self.keys.lane_slots(lane),
                self.keys.published,
                job.task_id,
                self.slot_ttl_ms,
                self.published_ttl_ms,
            )
        pipe.execute()

    def requeue_lost(self) -> int:
        """Published jobs whose task never ended by their deadline, back into their lanes."""
        return int(
            self._requeue_lost(
                keys=[self.keys.published, self.keys.lanes],
                args=[self.keys.published_job(""), self.keys.lane_prefix, INBOX_GROUP, GROUP, REQUEUE_PER_PASS],
            )
        )

    def _claim_lanes(self, lanes: list[str]) -> dict[str, list[Entry]]:
        """Entries of the lanes a dead consumer read and never published."""
        pipe = self.redis.pipeline(transaction=False)
        for lane in lanes:
            pipe.xautoclaim(
                self.keys.lane(lane),
                INBOX_GROUP,
                self.consumer,
                self.settings.pump_claim_idle_ms,
                "0-0",
                count=self.settings.pump_batch_size,
            )
        by_lane: dict[str, list[Entry]] = {}
        for lane, result in zip(lanes, pipe.execute(raise_on_error=False), strict=True):
            # A lane removed meanwhile answers NOGROUP: nothing to claim there.
            if isinstance(result, Exception):
                continue
            claimed = [entry for entry in result[1] if entry[0] is not None]
            if claimed:
                by_lane[lane] = claimed
        return by_lane

    def dispatch(self, claim: bool = False) -> int:
        """One round: every lane's turn, while Celery's queue has room; returns entries published."""
        settings = self.settings
        room = settings.pump_max_queued - self.queued()
        if room <= 0:
            self._state = "held"
            return 0
        lanes = self._lanes()
        entries_published = jobs_published = 0
        if self._own_pending:
            # Own pending first (a restart of this thread): it was read before anything new.
            found = False
            for chunk in _chunks(lanes, LANES_PER_READ):
                by_lane = self.read_lanes(chunk, "0", settings.pump_batch_size)
                found = found or bool(by_lane)
                jobs, entries = self.publish(by_lane)
                jobs_published, entries_published = jobs_published + jobs, entries_published + entries
            if not found:
                self._own_pending = False
        if claim:
            if requeued := self.requeue_lost():
                log.warning(
                    "published_tasks_requeued %d",
                    requeued,
                    extra={"event": "published_tasks_requeued", "jobs": requeued},
                )
                lanes = self._lanes()
            for chunk in _chunks(lanes, LANES_PER_READ):
                jobs, entries = self.publish(self._claim_lanes(chunk))
                jobs_published, entries_published = jobs_published + jobs, entries_published + entries
                self._forget_stale(keys=[self.keys.lane(lane) for lane in chunk], args=[INBOX_GROUP, STALE_CONSUMER_MS])
        # The round proper: lanes in rotation, each a turn's worth (a full partner call, more
        # when few lanes share the batch), at most the room's worth of jobs in all. A lane that
        # still holds jobs from the last round takes its turn with those.
        budget = min(room, JOBS_PER_ROUND) - jobs_published
        waiting = False
        if budget > 0:
            rooms = self.lane_rooms(lanes)
            # A lane whose tasks are all still out waits (its backlog stays in its stream), and
            # the pump looks again soon: such a lane is served as fast as its tasks finish.
            waiting = any(free <= 0 for free in rooms.values())
            by_lane: dict[str, list[Entry]] = {}
            # Only what can go now counts against the round: jobs a lane carries beyond its room
            # must not keep other lanes from being read.
            planned = sum(min(len(jobs), max(0, rooms.get(lane, 0))) for lane, jobs in self._carry.items())
            fresh = [lane for lane in lanes if not self._carry.get(lane) and rooms.get(lane, 0) > 0]
            for chunk in _chunks(fresh, LANES_PER_READ):
                if planned >= budget:
                    break
                turn = max(settings.delivery_batch_max_messages, settings.pump_batch_size // len(chunk))
                read = self.read_lanes(chunk, ">", turn)
                by_lane.update(read)
                planned += sum(len(entries) for entries in read.values())
                self._cursor = chunk[-1]
            jobs, entries = self.publish(by_lane, budget, rooms)
            jobs_published, entries_published = jobs_published + jobs, entries_published + entries
            waiting = waiting or bool(self._carry)
        self._state = "busy" if entries_published else ("held" if waiting else "idle")
        return entries_published

    # ------------------------------------------------------------------------------- turn

    def run_once(self) -> int:
        """One turn: due retries into the inbox, the inbox into lanes, a round of the lanes
        into Celery; returns how many entries were published."""
        settings = self.settings
        now = time.monotonic()
        claim = now >= self._next_claim
        if claim:
            self._next_claim = now + max(1.0, settings.pump_claim_idle_ms / 2000)
            self._forget_stale(keys=[self.keys.inbox], args=[INBOX_GROUP, STALE_CONSUMER_MS])
        self.retries.move_due(settings.pump_batch_size)
        # Block on the inbox only when there is nothing else to do; while Celery's queue is
        # full, only briefly, so a free slot is seen soon.
        block = {"idle": settings.pump_block_ms, "held": HOLD_POLL_MS}.get(self._state)
        was_pending = self._own_pending
        moved = self.sort(block, claim)
        if 0 < moved < settings.pump_batch_size and settings.delivery_batch_wait_ms > 0 and not was_pending:
            # Light traffic: give a partner call a moment to fill before sending it half empty.
            time.sleep(settings.delivery_batch_wait_ms / 1000)
            self.sort(None)
        return self.dispatch(claim)

    def run(self, stop: threading.Event) -> None:
        backoff = 0.5
        while not stop.is_set():
            try:
                self.ensure_group()
                while not stop.is_set():
                    self.run_once()
                    backoff = 0.5
            except Exception as exc:  # noqa: BLE001 - the pump must outlive any outage
                log.warning(
                    "pump_error %s", type(exc).__name__, extra={"event": "pump_error", "error": type(exc).__name__}
                )
                # Whatever was read but not acknowledged is read again from our pending lists
                # (the carried jobs' entries among them).
                self._own_pending = True
                self._carry = {}
                self._state = "idle"
                stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)


class PumpStep(bootsteps.StartStopStep):
    """Runs the inbox pump in a thread of every worker's main process.

    Added by workers.celery_app.celery_init_app, which keeps the Flask app on the Celery app:
    the pump reads that app's settings, the same the tasks run with.
    """

    requires = {"celery.worker.components:Pool"}

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self.thread: threading.Thread | None = None
        self.stop_event = threading.Event()

    def start(self, worker: Any) -> None:
        settings: Settings = worker.app.flask_app.config["SETTINGS"]
        consumer = pump_identity(worker.hostname or socket.gethostname())
        pump = InboxPump(worker.app, settings, consumer=consumer)
        self.thread = threading.Thread(target=pump.run, args=(self.stop_event,), name="inbox-pump", daemon=True)
        self.thread.start()
        log.info("pump_started consumer=%s", consumer, extra={"event": "pump_started"})

    def stop(self, worker: Any) -> None:
        self.stop_event.set()
        if self.thread is not None:
            self.thread.join(timeout=10)
