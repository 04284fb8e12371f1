"""The compact marks (common/marks.py): found for the whole TTL across buckets, sharded to stay
listpacks, older one-key marks still honoured; and /metrics' memory-high gauge."""

from __future__ import annotations

import uuid

import pytest
import redis as redis_lib

from common.config import Settings
from common.keys import Keys, mark_digest
from common.marks import LUA, MIN_BITS, Marks, span_seconds
from service.metrics import RedisCollector
from tests.support.metrics import prefix, value
from tests.unit.test_metrics import collect_text
from tests.unit.test_partner_gate import PK, _gate
from workers.gate import CallResult

# The service's own mark_add / mark_find, at a time the test chooses (the service uses Redis's TIME).
_ADD_AT = LUA + "for i = 4, #ARGV do mark_add(ARGV[1], ARGV[i], tonumber(ARGV[2]), tonumber(ARGV[3])) end return 1"
_FIND_AT = LUA + "return mark_find(ARGV[1], false, ARGV[4], tonumber(ARGV[2]), tonumber(ARGV[3]))"


@pytest.fixture
def keys() -> Keys:
    return Keys(f"t{uuid.uuid4().hex[:12]}")


def test_a_mark_is_found_for_its_whole_ttl_whatever_bucket_it_fell_in(
    redis_client: redis_lib.Redis, keys: Keys
) -> None:
    ttl = 400
    span = span_seconds(ttl)
    add, find = redis_client.register_script(_ADD_AT), redis_client.register_script(_FIND_AT)
    start = (int(redis_client.time()[0]) // span + 1) * span  # a bucket's first second, ahead of now
    for offset in (0, 1, span // 2, span - 1):  # first, early, middle and last second of a bucket
        written = start + offset
        mark = mark_digest("message", offset)
        add(args=[keys.seen_marks, ttl, written, mark])
        for later in (0, 1, span, ttl - 1, ttl):
            at = find(args=[keys.seen_marks, ttl, written + later, mark])
            assert at, (offset, later)
            # The hash holding it outlives the mark's TTL (it expires with its bucket, never before).
            assert redis_client.expiretime(at) >= written + ttl
        assert not find(args=[keys.seen_marks, ttl, written, mark_digest("another message", offset)])


def test_shards_follow_the_rate_so_hashes_stay_listpacks(redis_client: redis_lib.Redis, keys: Keys) -> None:
    ttl = 400
    span = span_seconds(ttl)
    add = redis_client.register_script(_ADD_AT)
    bucket = int(redis_client.time()[0]) // span + 1
    ns = keys.delivered_marks
    # A busy bucket: far more marks than MIN_BITS shards x 64 hold.
    for start in range(0, 100_000, 5_000):
        add(args=[ns, ttl, bucket * span, *(mark_digest(keys.prefix, n) for n in range(start, start + 5_000))])
    assert int(redis_client.get(f"{ns}{span}:{bucket}")) == MIN_BITS
    # The next bucket is sharded for that size (100,000 / 64 a shard: 2^11 shards) from its first write;
    # at this rate (60,000: about 30 a shard) none of them outgrows a listpack.
    add(args=[ns, ttl, (bucket + 1) * span, *(mark_digest("next", n) for n in range(60_000))])
    assert int(redis_client.get(f"{ns}{span}:{bucket + 1}")) == 11
    shards = [f"{ns}{span}:{bucket + 1}:{n}" for n in range(2048)]
    assert {redis_client.object("encoding", shard) for shard in shards} <= {b"listpack", None}
    redis_client.delete(*redis_client.keys(f"{ns}*"))


def test_gate_writes_and_finds_compact_marks_and_honours_older_one_key_marks(
    redis_client: redis_lib.Redis, keys: Keys
) -> None:
    marks = Marks(redis_client, keys, 60)
    gate = _gate(redis_client, keys)
    ticket = gate.enter(PK, "merged")
    assert ticket.granted
    gate.leave(ticket, CallResult.OK, marks=["member-1", "member-2", "merged"])
    assert marks.delivered(["member-1", "member-2", "merged", "other"]) == [True, True, True, False]
    assert not redis_client.exists(keys.delivered("merged"))  # no one-key mark written any more
    assert gate.enter(PK, "merged").already
    assert marks.forget_delivered(["merged"]) == 1 and gate.enter(PK, "merged").granted
    # A mark written before the upgrade, as a key of its own, still stops a second send.
    redis_client.set(keys.delivered("old"), 1, ex=60)
    assert marks.delivered(["old"]) == [True] and gate.enter(PK, "old").already


def test_memory_high_gauge_follows_the_watermark(redis_url: str, redis_client: redis_lib.Redis) -> None:
    settings = Settings(redis_url=redis_url, broker_url=redis_url, key_prefix=prefix())
    collector = RedisCollector(settings)
    original = redis_client.config_get("maxmemory")["maxmemory"]
    try:
        if original in ("0", b"0"):
            assert value(collect_text(collector), "firehose_redis_memory_high") == 0
        used = redis_client.info("memory")["used_memory"]
        # Above used memory (so nothing is refused) but with used over 0.9 of it.
        redis_client.config_set("maxmemory", int(used / 0.95))
        assert value(collect_text(collector), "firehose_redis_memory_high") == 1
        redis_client.config_set("maxmemory", used * 4)
        assert value(collect_text(collector), "firehose_redis_memory_high") == 0
    finally:
        redis_client.config_set("maxmemory", original)
