"""The inbox pump on the suite's Redis, publishing to a recording Celery stand-in (no broker):
entries are sorted into per-key lanes atomically, lanes take fair turns under backpressure,
entries leave a lane only after their tasks are published, and none is lost to a crash."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
import redis
from prometheus_client import generate_latest

from common.config import Settings
from common.keys import BACKLOG_LUA, Keys, partner_key
from common.names import DELIVER_EVENTS_TASK, DELIVER_TASK, DELIVERY_QUEUE, INBOX_GROUP
from service.metrics import RedisCollector
from tests.support.metrics import value
from tests.support.worker_core import SUBSCRIPTION_MESSAGE, body, client, core_settings, message
from workers.grouping import GROUP, NO_KEY_LANE, lane_of
from workers.pump import InboxPump, pump_identity, task_ended


class RecordingApp:
    """What the pump uses of a Celery app: `producer_or_acquire` and `send_task`, recorded.

    `backlog_at_publish` is the entries in the inbox and lanes at each publish: they must still
    be there. With `queue` set, each task is also pushed onto that list, as Celery would. With
    `finish` (the default) each task counts as run and finished at once: its lane slot is given
    back, as the task itself does (workers/tasks.py).
    """

    def __init__(
        self, redis_conn: redis.Redis, keys: Keys, fail: bool = False, queue: str | None = None, finish: bool = True
    ) -> None:
        self.redis = redis_conn
        self.keys = keys
        self.fail = fail
        self.queue = queue
        self.finish = finish
        self.producers = 0
        self.sent: list[dict[str, Any]] = []
        self.backlog_at_publish: list[int] = []
        self._backlog = redis_conn.register_script(BACKLOG_LUA)

    @contextmanager
    def producer_or_acquire(self, producer: Any = None) -> Iterator[str]:
        self.producers += 1
        yield f"producer-{self.producers}"

    def send_task(self, name: str, **options: Any) -> None:
        if self.fail:
            raise ConnectionError("broker down")
        self.backlog_at_publish.append(backlog(self.redis, self.keys)[0])
        self.sent.append({"name": name, **options})
        if self.queue:
            self.redis.rpush(self.queue, name)
        if self.finish:
            for slots in self.redis.scan_iter(match=f"{self.keys.prefix}:laneslots:*"):
                if self.redis.zrem(slots, options["task_id"]):
                    lane = slots.decode().removeprefix(self.keys.lane_slots(""))
                    task_ended(self.redis, self.keys, lane, options["task_id"])

    def ids(self) -> list[str]:
        """The message ids of every task, in publish order (a group's members one by one)."""
        out = []
        for task in self.sent:
            bodies = task["args"][0] if task["name"] == DELIVER_EVENTS_TASK else task["args"]
            out += [orjson.loads(b)["id"] for b in bodies]
        return out


def backlog(c: redis.Redis, keys: Keys) -> tuple[int, int]:
    entries, lanes = c.eval(BACKLOG_LUA, 2, keys.inbox, keys.lanes, keys.lane_prefix)
    return int(entries), int(lanes)


@pytest.fixture
def settings() -> Settings:
    return core_settings(pump_batch_size=50, pump_claim_idle_ms=10, delivery_batch_max_messages=10)


@pytest.fixture
def keys(settings: Settings) -> Keys:
    return Keys(settings.key_prefix)


@pytest.fixture
def redis_conn(settings: Settings) -> Iterator[redis.Redis]:
    c = client(settings)
    yield c
    c.close()


def _pump(app: RecordingApp, settings: Settings, consumer: str) -> InboxPump:
    pump = InboxPump(app, settings, consumer=consumer)  # type: ignore[arg-type]
    # Celery's list of this test's own: the suite's tests share one database.
    pump.queue = f"{settings.key_prefix}:celery"
    pump.ensure_group()
    return pump


def _add(c: redis.Redis, keys: Keys, msg: dict[str, Any], **extra: str) -> bytes:
    return c.xadd(keys.inbox, {"body": body(msg), "type": msg["type"], "id": msg["id"], **extra})


def _lane_pending(c: redis.Redis, keys: Keys, lane: str) -> int:
    return int(c.xpending(keys.lane(lane), INBOX_GROUP)["pending"])


def _quiet(c: redis.Redis, keys: Keys) -> bool:
    return backlog(c, keys)[0] == 0 and int(c.xpending(keys.inbox, INBOX_GROUP)["pending"]) == 0


# ------------------------------------------------------------------------------ sort


def test_entries_become_tasks_and_leave_the_streams_after_publishing(
    settings: Settings, keys: Keys, redis_conn: redis.Redis
) -> None:
    app = RecordingApp(redis_conn, keys)
    pump = _pump(app, settings, "w1")
    events = [message(api_key="a"), message(api_key="a"), message(api_key="b")]
    sub = message(SUBSCRIPTION_MESSAGE, api_key="a")
    for msg in [*events, sub]:
        _add(redis_conn, keys, msg)
    assert pump.run_once() == 4
    assert app.producers == 1 and app.backlog_at_publish == [4, 4, 4]
    assert {(t["name"], t["queue"]) for t in app.sent} == {
        (DELIVER_EVENTS_TASK, DELIVERY_QUEUE),
        (DELIVER_TASK, DELIVERY_QUEUE),
    }
    assert all(t["producer"] == "producer-1" for t in app.sent)
    groups = sorted(
        ([orjson.loads(b)["id"] for b in t["args"][0]] for t in app.sent if t["name"] == DELIVER_EVENTS_TASK), key=len
    )
    assert groups == [[events[2]["id"]], [events[0]["id"], events[1]["id"]]]
    [single] = [t for t in app.sent if t["name"] == DELIVER_TASK]
    assert single["args"] == [body(sub)] and single["task_id"] == sub["id"]
    assert single["kwargs"]["attempt"] == 1 and single["kwargs"]["first_seen_ms"] > 0
    assert _quiet(redis_conn, keys)
    assert pump.run_once() == 0
    # The drained lanes are gone, from the set and as keys.
    assert backlog(redis_conn, keys) == (0, 0) and not redis_conn.keys(f"{keys.lane_prefix}*")


def test_sort_moves_each_entry_into_its_lane_keeping_its_fields(
    settings: Settings, keys: Keys, redis_conn: redis.Redis
) -> None:
    pump = _pump(RecordingApp(redis_conn, keys), settings, "w1")
    a, b, unit = message(api_key="a"), message(api_key="b"), message(SUBSCRIPTION_MESSAGE, api_key="a")
    a_id = _add(redis_conn, keys, a)
    _add(redis_conn, keys, b, attempt="3", first_seen="42")
    _add(redis_conn, keys, unit, lane="a-aud-7")
    group = orjson.dumps([body(message(api_key="b")), body(message(api_key="b"))]).decode()
    redis_conn.xadd(keys.inbox, {"body": group, "type": GROUP, "id": "g"})
    redis_conn.xadd(keys.inbox, {"body": b"not json", "type": "x", "id": "junk"})
    no_key = message(api_key="a")
    del no_key["account"]["account_settings"]
    _add(redis_conn, keys, no_key)

    assert pump.sort(block=None) == 6
    assert redis_conn.xlen(keys.inbox) == 0 and int(redis_conn.xpending(keys.inbox, INBOX_GROUP)["pending"]) == 0
    lanes = {name.decode() for name in redis_conn.smembers(keys.lanes)}
    assert lanes == {partner_key("a"), partner_key("b"), "a-aud-7", NO_KEY_LANE}
    [(_, fa)] = redis_conn.xrange(keys.lane(partner_key("a")))
    # Every field kept; the time it was accepted travels along, as the lane gives it a new id.
    assert fa == {
        b"body": body(a).encode(),
        b"type": a["type"].encode(),
        b"id": a["id"].encode(),
        b"first_seen": a_id.split(b"-")[0],
    }
    fb, fg = (fields for _, fields in redis_conn.xrange(keys.lane(partner_key("b"))))
    assert (fb[b"attempt"], fb[b"first_seen"]) == (b"3", b"42")
    assert fg[b"type"] == GROUP.encode() and fg[b"id"] == b"g"
    [(_, fu)] = redis_conn.xrange(keys.lane("a-aud-7"))
    assert fu[b"lane"] == b"a-aud-7" and fu[b"id"] == unit["id"].encode()
    assert [f[b"id"] for _, f in redis_conn.xrange(keys.lane(NO_KEY_LANE))] == [b"junk", no_key["id"].encode()]
    # Each lane has the consumer group the dispatch reads it with.
    assert all(redis_conn.xinfo_groups(keys.lane(lane))[0]["name"] == INBOX_GROUP.encode() for lane in lanes)


def test_an_entry_sorted_by_another_pump_is_only_acknowledged(
    settings: Settings, keys: Keys, redis_conn: redis.Redis
) -> None:
    """Two pumps holding the same inbox entry (one claimed it from the other) move it once."""
    first = _pump(RecordingApp(redis_conn, keys), settings, "w1")
    second = _pump(RecordingApp(redis_conn, keys), settings, "w2")
    _add(redis_conn, keys, message(api_key="a"))
    entries = first._read_inbox(None, claim=False)
    time.sleep(0.015)
    claimed = second._read_inbox(None, claim=True)
    assert [e[0] for e in claimed] == [e[0] for e in entries]
    assert second.sort_entries(claimed) == 1
    assert first.sort_entries(entries) == 0
    assert redis_conn.xlen(keys.lane(partner_key("a"))) == 1 and redis_conn.xlen(keys.inbox) == 0


def test_lane_of() -> None:
    a = message(api_key="a")
    assert lane_of({b"body": body(a).encode(), b"type": b"x"}) == partner_key("a")
    assert lane_of({b"body": body(a).encode(), b"lane": b"own"}) == "own"
    group = orjson.dumps([body(message(api_key="b")), body(a)])
    assert lane_of({b"body": group, b"type": GROUP.encode()}) == partner_key("b")
    assert lane_of({b"body": b"[]", b"type": GROUP.encode()}) == NO_KEY_LANE
    assert lane_of({b"body": b"\xff"}) == NO_KEY_LANE
    assert lane_of({}) == NO_KEY_LANE


# ------------------------------------------------------------------------- fair turns


def test_one_message_for_b_is_not_behind_ten_thousand_for_a(keys: Keys, redis_conn: redis.Redis) -> None:
    settings = core_settings(pump_batch_size=500, delivery_batch_max_messages=10, key_prefix=keys.prefix)
    app = RecordingApp(redis_conn, keys)
    pump = _pump(app, settings, "w1")
    # A small body: this is about turns, not about moving megabytes (a sort is cheap either way).
    small = body({"type": "event_processing_request", "account": {"account_settings": {"apiKey": "A"}}, "events": []})
    pipe = redis_conn.pipeline(transaction=False)
    for n in range(10_000):
        pipe.xadd(keys.inbox, {"body": small, "type": "event_processing_request", "id": f"a{n}"})
    pipe.execute()
    b = message(api_key="B")
    _add(redis_conn, keys, b)

    published = pump.run_once()
    # The whole inbox went into the lanes at once, and B's one message came out in the first
    # round, among its first jobs; A had one turn (at most 50 jobs of 10), not 10,000 messages.
    assert redis_conn.xlen(keys.inbox) == 0
    assert published < 600
    first_two = [orjson.loads(x).get("id") for task in app.sent[:2] for x in task["args"][0]]
    assert b["id"] in first_two
    assert redis_conn.xlen(keys.lane(partner_key("A"))) == 10_000 - (published - 1)


def test_due_retries_of_a_do_not_block_b(keys: Keys, redis_conn: redis.Redis) -> None:
    settings = core_settings(
        pump_batch_size=50, delivery_batch_max_messages=1, pump_max_queued=100, key_prefix=keys.prefix
    )
    app = RecordingApp(redis_conn, keys)
    pump = _pump(app, settings, "w1")
    for n in range(200):
        pump.retries.schedule(
            body(message(SUBSCRIPTION_MESSAGE, api_key="A")),
            message_id=f"r{n}",
            message_type=SUBSCRIPTION_MESSAGE,
            attempt=2,
            first_seen_ms=42,
            delay=0,
        )
    pump.run_once()  # some of A's retries are already in A's lane, more still due
    app.sent.clear()
    b = message(SUBSCRIPTION_MESSAGE, api_key="B")
    _add(redis_conn, keys, b)
    pump.run_once()
    assert b["id"] in [t["task_id"] for t in app.sent[:2]]


def test_lanes_take_turns_when_the_round_is_cut_short(keys: Keys, redis_conn: redis.Redis) -> None:
    """Celery's room ends a round early: no round publishes more than the room, and every lane's
    first job goes out before any lane's second."""
    settings = core_settings(pump_batch_size=50, pump_max_queued=3, key_prefix=keys.prefix)
    queue = f"{keys.prefix}:celery"
    app = RecordingApp(redis_conn, keys, queue=queue)
    pump = _pump(app, settings, "w1")
    for key in "abcdefghij":
        for _ in range(3):
            _add(redis_conn, keys, message(SUBSCRIPTION_MESSAGE, api_key=key))
    rounds = 0
    while backlog(redis_conn, keys)[0]:
        done = len(app.sent)
        assert pump.run_once() > 0
        assert len(app.sent) - done <= 3  # never more than the room
        redis_conn.delete(queue)  # Celery takes everything queued
        rounds += 1
        assert rounds <= 10
    served = [orjson.loads(t["args"][0])["account"]["account_settings"]["apiKey"] for t in app.sent]
    assert len(served) == 30 and set(served[:10]) == set("abcdefghij")
    assert _quiet(redis_conn, keys)


def test_backpressure_holds_publishing_at_the_limit_and_resumes(keys: Keys, redis_conn: redis.Redis) -> None:
    settings = core_settings(pump_batch_size=50, pump_max_queued=5, key_prefix=keys.prefix)
    queue = f"{keys.prefix}:celery"
    app = RecordingApp(redis_conn, keys, queue=queue)
    pump = _pump(app, settings, "w1")
    redis_conn.rpush(queue, *["t"] * 5)
    for _ in range(3):
        _add(redis_conn, keys, message(SUBSCRIPTION_MESSAGE, api_key="a"))
    assert pump.run_once() == 0 and app.sent == []
    # Held, it still sorts what arrives, so the lanes are ready when the queue has room.
    assert redis_conn.xlen(keys.inbox) == 0 and redis_conn.xlen(keys.lane(partner_key("a"))) == 3
    redis_conn.lpop(queue, 2)
    # Room for two: two go, the third waits in its lane for the next room.
    assert pump.run_once() == 2 and len(app.sent) == 2
    assert redis_conn.llen(queue) <= 5
    redis_conn.lpop(queue, 1)
    assert pump.run_once() == 1 and len(app.sent) == 3
    assert _quiet(redis_conn, keys)


# ------------------------------------------------------------------------------ crashes


def test_a_failed_publish_leaves_the_entries_and_a_restart_reads_its_own(
    settings: Settings, keys: Keys, redis_conn: redis.Redis
) -> None:
    msg = message(SUBSCRIPTION_MESSAGE)
    lane = partner_key("key-a")
    _add(redis_conn, keys, msg)
    with pytest.raises(ConnectionError):
        _pump(RecordingApp(redis_conn, keys, fail=True), settings, "w1").run_once()
    assert redis_conn.xlen(keys.lane(lane)) == 1 and _lane_pending(redis_conn, keys, lane) == 1
    # The pump starts again under the same name: it reads what it had read but not finished.
    app = RecordingApp(redis_conn, keys)
    restarted = _pump(app, _with(settings, pump_claim_idle_ms=60_000), "w1")
    assert restarted.run_once() == 1
    assert [t["task_id"] for t in app.sent] == [msg["id"]]
    assert _quiet(redis_conn, keys)


def test_a_dead_consumers_lane_entries_are_claimed(settings: Settings, keys: Keys, redis_conn: redis.Redis) -> None:
    msg = message(SUBSCRIPTION_MESSAGE)
    _add(redis_conn, keys, msg)
    with pytest.raises(ConnectionError):
        _pump(RecordingApp(redis_conn, keys, fail=True), settings, "dead").run_once()
    assert _lane_pending(redis_conn, keys, partner_key("key-a")) == 1
    time.sleep(0.015)  # longer than PUMP_CLAIM_IDLE_MS
    app = RecordingApp(redis_conn, keys)
    assert _pump(app, settings, "alive").run_once() == 1
    assert [t["task_id"] for t in app.sent] == [msg["id"]]
    assert _quiet(redis_conn, keys)


def test_a_dead_consumers_inbox_entries_are_claimed(settings: Settings, keys: Keys, redis_conn: redis.Redis) -> None:
    msg = message(SUBSCRIPTION_MESSAGE)
    _add(redis_conn, keys, msg)
    _pump(RecordingApp(redis_conn, keys), settings, "dead")._read_inbox(None, claim=False)  # read, never sorted
    time.sleep(0.015)
    app = RecordingApp(redis_conn, keys)
    assert _pump(app, settings, "alive").run_once() == 1
    assert [t["task_id"] for t in app.sent] == [msg["id"]]
    assert _quiet(redis_conn, keys)


def test_two_pumps_never_publish_the_same_entry(keys: Keys, redis_conn: redis.Redis) -> None:
    settings = core_settings(pump_batch_size=20, delivery_batch_max_messages=1, key_prefix=keys.prefix)
    identities = {pump_identity("celery@host") for _ in range(2)}
    assert len(identities) == 2  # same node name, same process even: still two names
    apps = [RecordingApp(redis_conn, keys) for _ in identities]
    pumps = [_pump(app, settings, name) for app, name in zip(apps, identities, strict=True)]
    sent = [message(SUBSCRIPTION_MESSAGE, api_key=f"k{n % 5}") for n in range(300)]
    for msg in sent:
        _add(redis_conn, keys, msg)
    stop = threading.Event()

    def run(pump: InboxPump) -> None:
        while not stop.is_set():
            pump.run_once()

    threads = [threading.Thread(target=run, args=(pump,)) for pump in pumps]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 5
    while not _quiet(redis_conn, keys) and time.monotonic() < deadline:
        time.sleep(0.01)
    stop.set()
    for thread in threads:
        thread.join()
    ids = apps[0].ids() + apps[1].ids()
    assert sorted(ids) == sorted(msg["id"] for msg in sent)
    assert all(app.sent for app in apps)  # both took part


# ------------------------------------------------------------------------------ lanes


def test_an_empty_lane_is_removed_and_a_later_add_is_not_lost(
    settings: Settings, keys: Keys, redis_conn: redis.Redis
) -> None:
    app = RecordingApp(redis_conn, keys)
    pump = _pump(app, settings, "w1")
    lane = partner_key("a")
    _add(redis_conn, keys, message(SUBSCRIPTION_MESSAGE, api_key="a"))
    assert pump.run_once() == 1
    # Drained but not yet removed: the next read of the lanes removes it.
    assert pump.dispatch() == 0
    assert not redis_conn.exists(keys.lane(lane)) and not redis_conn.sismember(keys.lanes, lane)
    # A pump still holding the old lane list reads a lane that is gone: skipped, no error.
    assert pump.read_lanes([lane], ">", 10) == {}
    # The sort creates it again, group and all.
    msg = message(SUBSCRIPTION_MESSAGE, api_key="a")
    _add(redis_conn, keys, msg)
    assert pump.run_once() == 1 and app.sent[-1]["task_id"] == msg["id"]


def test_the_removal_races_no_sort(settings: Settings, keys: Keys, redis_conn: redis.Redis) -> None:
    """A lane emptied while another pump sorts into it: whichever runs first, nothing is lost."""
    pump = _pump(RecordingApp(redis_conn, keys), settings, "w1")
    lane = partner_key("a")
    _add(redis_conn, keys, message(SUBSCRIPTION_MESSAGE, api_key="a"))
    pump.run_once()  # published; the lane is empty but registered
    msg = message(SUBSCRIPTION_MESSAGE, api_key="a")
    _add(redis_conn, keys, msg)
    entries = pump._read_inbox(None, claim=False)
    assert pump.sort_entries(entries) == 1  # lands in the registered, empty lane
    assert pump.read_lanes([lane], ">", 10)[lane][0][1][b"id"] == msg["id"].encode()  # not removed: it has one
    # And a lane that holds a pending entry (read, not yet published) is kept too.
    assert pump.read_lanes([lane], ">", 10) == {}
    assert redis_conn.exists(keys.lane(lane)) and redis_conn.sismember(keys.lanes, lane)


def test_due_retries_are_published_with_their_attempt_and_lane(
    settings: Settings, keys: Keys, redis_conn: redis.Redis
) -> None:
    app = RecordingApp(redis_conn, keys)
    pump = _pump(app, settings, "w1")
    members = [body(message(api_key="a")), body(message(api_key="a"))]
    group = orjson.dumps(members).decode()
    pump.retries.schedule(group, message_id="g", message_type=GROUP, attempt=3, first_seen_ms=42, delay=0)
    pump.retries.schedule("later", message_id="l", message_type="x", attempt=2, first_seen_ms=42, delay=60)
    unit = message(SUBSCRIPTION_MESSAGE, api_key="a")
    pump.retries.schedule(
        body(unit), message_id=unit["id"], message_type=unit["type"], attempt=2, first_seen_ms=7, delay=0, lane="a-7"
    )
    pump.retries.move_due(10)
    # The retry that knows its lane is back in it at once; the one without goes through the sort.
    assert redis_conn.xlen(keys.lane("a-7")) == 1
    assert pump.sort(block=None) == 1
    assert redis_conn.xlen(keys.lane("a-7")) == 1 and redis_conn.xlen(keys.lane(partner_key("a"))) == 1
    assert pump.run_once() == 2
    task = next(t for t in app.sent if t["name"] == DELIVER_EVENTS_TASK)
    assert (task["args"], task["kwargs"]) == ([members], {"attempt": 3, "first_seen_ms": 42})
    single = next(t for t in app.sent if t["name"] == DELIVER_TASK)
    assert (single["task_id"], single["kwargs"]) == (unit["id"], {"attempt": 2, "first_seen_ms": 7})
    assert redis_conn.zcard(keys.retry_schedule) == 1


def test_stale_consumers_are_forgotten_only_with_nothing_pending(
    settings: Settings, keys: Keys, redis_conn: redis.Redis
) -> None:
    pump = _pump(RecordingApp(redis_conn, keys), settings, "w1")
    _add(redis_conn, keys, message())
    redis_conn.xreadgroup(INBOX_GROUP, "holder", {keys.inbox: ">"}, count=1)
    redis_conn.xgroup_createconsumer(keys.inbox, INBOX_GROUP, "idle")
    time.sleep(0.01)
    assert pump._forget_stale(keys=[keys.inbox, keys.lane("missing")], args=[INBOX_GROUP, 5]) == 1
    names = {c["name"] for c in redis_conn.xinfo_consumers(keys.inbox, INBOX_GROUP)}
    assert names == {b"holder"}


def _with(settings: Settings, **changes: Any) -> Settings:
    return Settings(**(settings.model_dump() | changes))


def test_metrics_count_the_lanes_in_the_inbox_depth(settings: Settings, keys: Keys, redis_conn: redis.Redis) -> None:
    pump = _pump(RecordingApp(redis_conn, keys), settings, "w1")
    for key in ("a", "a", "b"):
        _add(redis_conn, keys, message(api_key=key))
    pump.sort(block=None)
    _add(redis_conn, keys, message(api_key="c"))  # not sorted yet
    collector = RedisCollector(_with(settings, broker_url=settings.redis_url))
    text = generate_latest(SimpleNamespace(collect=collector.collect)).decode()  # type: ignore[arg-type]
    assert value(text, "firehose_queue_depth", queue="inbox") == 4
    assert value(text, "firehose_lanes") == 2


# ------------------------------------------------------------------------------ lane slots


def test_a_lane_has_at_most_its_cap_of_tasks_out_and_others_still_go(keys: Keys, redis_conn: redis.Redis) -> None:
    """A key whose tasks are all still running (a slow endpoint) gets no more published; another
    key's message still goes in the same round; a finished task lets the next one out."""
    settings = core_settings(partner_max_in_flight_per_key=2, key_prefix=keys.prefix)
    app = RecordingApp(redis_conn, keys, finish=False)
    pump = _pump(app, settings, "w1")
    for _ in range(5):
        _add(redis_conn, keys, message(SUBSCRIPTION_MESSAGE, api_key="slow"))
    pump.run_once()
    assert [_key(t) for t in app.sent] == ["slow", "slow"]
    _add(redis_conn, keys, message(SUBSCRIPTION_MESSAGE, api_key="other"))
    pump.run_once()
    assert [_key(t) for t in app.sent[2:]] == ["other"]
    slots = keys.lane_slots(partner_key("slow"))
    assert redis_conn.zcard(slots) == 2
    redis_conn.zrem(slots, app.sent[0]["task_id"])  # one task of "slow" finished
    pump.run_once()
    assert [_key(t) for t in app.sent[3:]] == ["slow"]
    assert redis_conn.zcard(slots) == 2


def test_a_slot_whose_task_never_ends_lapses(keys: Keys, redis_conn: redis.Redis) -> None:
    settings = core_settings(partner_max_in_flight_per_key=1, key_prefix=keys.prefix)
    app = RecordingApp(redis_conn, keys, finish=False)
    pump = _pump(app, settings, "w1")
    pump.slot_ttl_ms = 50  # its worker died: the slot is not given back
    for _ in range(2):
        _add(redis_conn, keys, message(SUBSCRIPTION_MESSAGE, api_key="k"))
    pump.run_once()
    assert len(app.sent) == 1
    deadline = time.monotonic() + 5
    while len(app.sent) < 2 and time.monotonic() < deadline:
        pump.run_once()
    assert len(app.sent) == 2


def _key(task: dict[str, Any]) -> str:
    return orjson.loads(task["args"][0])["account"]["account_settings"]["apiKey"]


# ------------------------------------------------------------------- a task the broker loses


def _lose_deadlines(c: redis.Redis, keys: Keys) -> None:
    """As if BROKER_VISIBILITY_TIMEOUT had passed since every task still out was published."""
    if out := c.zrange(keys.published, 0, -1):
        c.zadd(keys.published, dict.fromkeys(out, 0))


def _lane(task: dict[str, Any]) -> str:
    first = task["args"][0][0] if task["name"] == DELIVER_EVENTS_TASK else task["args"][0]
    return lane_of({b"body": first.encode()})


def test_a_task_the_broker_loses_goes_back_into_its_lane_whole(keys: Keys, redis_conn: redis.Redis) -> None:
    """kombu takes a task off its queue before it records it as unacked (kombu#305): a Redis or a
    connection dying between the two loses the task. The copy kept at publish puts each job back
    into its lane once its deadline passes, and it is published again as it was: same task id,
    same bodies, same attempt and first-seen time, a group still a group."""
    settings = core_settings(key_prefix=keys.prefix, delivery_batch_max_messages=10, pump_claim_idle_ms=10)
    app = RecordingApp(redis_conn, keys, finish=False)
    pump = _pump(app, settings, "w1")
    sub = message(SUBSCRIPTION_MESSAGE, api_key="a")
    events = [message(api_key="b"), message(api_key="b")]
    for msg in [sub, *events]:
        _add(redis_conn, keys, msg)
    pump.run_once()
    first = {t["task_id"]: t for t in app.sent}
    assert len(first) == 2 and backlog(redis_conn, keys)[0] == 0
    # Out, not yet ended: each has its copy and its deadline (well past now).
    assert set(redis_conn.zrange(keys.published, 0, -1)) == {i.encode() for i in first}
    assert all(redis_conn.exists(keys.published_job(i)) for i in first)
    pump._next_claim = 0
    pump.run_once()
    assert len(app.sent) == 2, "nothing goes back before its deadline"

    _lose_deadlines(redis_conn, keys)  # the broker lost both tasks: neither ever ends
    pump._next_claim = 0
    pump.run_once()
    again = {t["task_id"]: t for t in app.sent[2:]}
    assert again.keys() == first.keys()
    for task_id, task in again.items():
        before = first[task_id]
        assert (task["name"], task["args"], task["kwargs"]) == (before["name"], before["args"], before["kwargs"])
    assert sorted(app.ids()) == sorted([m["id"] for m in [sub, *events]] * 2)

    # Once the tasks end, nothing of them is left, and nothing goes back again.
    for task in again.values():
        task_ended(redis_conn, keys, _lane(task), task["task_id"])
    assert not redis_conn.zcard(keys.published) and not redis_conn.keys(keys.published_job("*"))
    _lose_deadlines(redis_conn, keys)
    pump._next_claim = 0
    pump.run_once()
    assert len(app.sent) == 4 and _quiet(redis_conn, keys)


def test_a_task_handed_back_to_the_broker_keeps_its_copy(keys: Keys, redis_conn: redis.Redis) -> None:
    """A task that ends by giving its work back to the broker (Reject with requeue, Redis errors)
    has not moved its work on: its copy stays until a run of it ends for real."""
    app = RecordingApp(redis_conn, keys, finish=False)
    pump = _pump(app, core_settings(key_prefix=keys.prefix), "w1")
    _add(redis_conn, keys, message(SUBSCRIPTION_MESSAGE, api_key="a"))
    pump.run_once()
    [task] = app.sent
    lane = partner_key("a")
    task_ended(redis_conn, keys, lane, task["task_id"], work_moved_on=False)
    assert not redis_conn.zscore(keys.lane_slots(lane), task["task_id"])
    assert redis_conn.exists(keys.published_job(task["task_id"]))
    task_ended(redis_conn, keys, lane, task["task_id"])
    assert not redis_conn.exists(keys.published_job(task["task_id"])) and not redis_conn.zcard(keys.published)
