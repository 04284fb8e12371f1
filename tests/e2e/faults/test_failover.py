"""The Redis primary dies (SIGKILL) under steady traffic and Sentinel promotes a replica.

On loopback: a primary, two replicas and three Sentinels (devtools/redis_server.py), the web
and two workers configured with REDIS_SENTINELS only (REDIS_URL's host is a closed port: they
can reach Redis through Sentinel or not at all), and REDIS_MIN_REPLICAS=1, so a 2xx means a
replica held the message. Two replicas, not one: after the failover the promoted one still has
a replica to confirm WAIT, so the web can answer 2xx again at all.

The issue's bounds, measured from the SIGKILL: the web answers 2xx again within 10 s, workers
deliver again within 30 s, without a restart; and every message answered 2xx reaches the partner.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis as redis_lib

from common.redis_conn import ingest_client, worker_client
from devtools.faults import Results, sha
from devtools.procs import start_web, start_worker
from devtools.redis_server import RedisServer
from tests.support import Stub, base_env, wait_for
from tests.support.redis import ReplicatedRedis
from tests.support.stack import FAULT_SETTINGS, Stack
from tests.support.traffic import Traffic, record_and_check_delivery, wait_all_delivered

needs_sentinel = pytest.mark.skipif(
    shutil.which("redis-sentinel") is None,
    reason="needs redis-sentinel (Debian: apt-get install redis-sentinel; .ci/run installs it)",
)

WEB_BACK_WITHIN_S = 10.0
DELIVERY_BACK_WITHIN_S = 30.0


@pytest.fixture(scope="module")
def failover_stack(
    fault_stub: Stub, logs_dir: Path, tmp_path_factory: pytest.TempPathFactory, fault_token: str
) -> Iterator[tuple[ReplicatedRedis, Stack]]:
    servers = ReplicatedRedis(tmp_path_factory.mktemp("sentinel"), logs_dir, replicas=2, down_after_ms=1000)
    servers.start()
    env = base_env(
        # Port 9 (discard) on loopback: nothing answers there. Only the database number is used.
        "redis://127.0.0.1:9/0",
        REDIS_SENTINELS=servers.addresses,
        REDIS_SENTINEL_MASTER=servers.MASTER,
        REDIS_MIN_REPLICAS="1",
        PARTNER_API_URL=fault_stub.url,
        FIREHOSE_AUTH_TOKEN=fault_token,
        **FAULT_SETTINGS,
        RETRY_BACKOFF_MAX="1",
        PARTNER_TIMEOUT_SECONDS="4",
    )
    client = servers.client()
    procs = []
    try:
        procs = [start_worker(f"failover-worker{i}", env, logs_dir) for i in (1, 2)]
        web, url = start_web(env, logs_dir, name="failover-web")
        procs.append(web)
        yield servers, Stack(url, "", client, env, procs, logs_dir)
    finally:
        for proc in procs:
            proc.stop()
        client.close()
        servers.stop()


@needs_sentinel
@pytest.mark.timeout(300)
def test_primary_killed_sentinel_promotes_a_replica(
    failover_stack: tuple[ReplicatedRedis, Stack],
    fault_stub: Stub,
    fault_token: str,
    sent_secrets: dict[str, str],
    fault_results: Results,
) -> None:
    servers, stack = failover_stack
    fault_stub.faults([])
    old_primary = servers.primary.port
    # Wall-clock stamps: they are compared with the stub's answered_at.
    traffic = Traffic(stack.url, fault_token, sent_secrets, "failover", clock=time.time)

    def delivered_since(moment: float) -> float | None:
        """When the partner first took a call for a message accepted after `moment` (wall clock)."""
        keys = {
            sha(a.message["account"]["account_settings"]["apiKey"])
            for a in list(traffic.answers)
            if a.ok and a.started > moment
        }
        times = [
            c["answered_at"]
            for c in fault_stub.requests("/v1")
            if c["api_key_sha256"] in keys and c["status"] and 200 <= c["status"] < 300
        ]
        return min(times) if times else None

    traffic.start()
    try:
        # Each deadline below only bounds a broken run; the bounds are asserted after.
        wait_for(lambda: traffic.ok_count() >= 20, 60, 0.1, "2xx before the fault")
        wait_for(lambda: delivered_since(0) is not None, 60, 0.2, "deliveries before the fault")
        servers.primary.kill()
        killed_at = time.time()
        web_back = wait_for(
            lambda: next((a.ended for a in list(traffic.answers) if a.ok and a.started > killed_at), None),
            60,
            0.1,
            "a 2xx for a request sent after the kill",
        )
        delivery_back = wait_for(
            lambda: delivered_since(killed_at), 120, 0.2, "a delivery of a message sent after the kill"
        )
        # Traffic goes on a little longer through the new primary before it stops.
        wait_for(lambda: traffic.ok_count(lambda a: a.started > web_back) >= 20, 60, 0.1, "20 more 2xx")
    finally:
        traffic.stop()

    new_primary = wait_for(servers.primary_port, 30, 0.2, "the Sentinels to agree on the new primary")
    traffic.retry_until_accepted()
    accepted = traffic.accepted()
    first_round = traffic.first_round
    wait_all_delivered(fault_stub, accepted, 240)
    wait_for(stack.drained, 90, 0.3, "queues to drain")
    exited = [f"{p.name} (log {p.log_path})" for p in stack.workers if p.popen.poll() is not None]
    after_kill = [a for a in first_round if a.started > killed_at]
    record_and_check_delivery(
        fault_results,
        "Redis primary SIGKILL under traffic, Sentinel failover to a replica (REDIS_MIN_REPLICAS=1)",
        traffic,
        fault_stub,
        stack.redis,
        notes=(
            f"{len(first_round)} messages; web 2xx again {web_back - killed_at:.1f} s after the kill, "
            f"deliveries again {delivery_back - killed_at:.1f} s after; "
            f"503s after the kill: {sum(1 for a in after_kill if a.status == 503)}; "
            f"primary {old_primary} -> {new_primary}; workers exited: {len(exited)}"
        ),
    )
    assert new_primary != old_primary
    assert web_back - killed_at <= WEB_BACK_WITHIN_S, f"web 2xx again only {web_back - killed_at:.1f} s after"
    assert delivery_back - killed_at <= DELIVERY_BACK_WITHIN_S, (
        f"workers delivered again only {delivery_back - killed_at:.1f} s after the kill"
    )
    # Without a restart: both workers are the processes started before the failover.
    assert not exited, f"workers exited: {exited}"


def test_read_only_primary_closes_the_connection(logs_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """A managed endpoint (ElastiCache, Heroku) fails over by DNS, and the old primary, now a
    replica, keeps its connections open answering READONLY. Each client must close such a
    connection, so its next one goes through the endpoint again: the web's at once (its one
    attempt answers 503), the workers' on each of their retries."""
    primary = RedisServer(tmp_path_factory.mktemp("ro-primary"), logs_dir, name="readonly-primary")
    primary.start()
    replica = RedisServer(tmp_path_factory.mktemp("ro-replica"), logs_dir, name="readonly-replica", replica_of=primary)
    replica.start()
    probe = redis_lib.Redis(port=replica.port)
    try:

        def connections() -> int:
            return int(probe.info("stats")["total_connections_received"])

        web = ingest_client(replica.url, 1000)
        before = connections()
        with pytest.raises(redis_lib.ReadOnlyError):
            web.set("k", "1")
        assert all(c._sock is None for c in web.connection_pool._available_connections)
        web.get("k")  # a read is fine on the replica: a new connection
        assert connections() - before == 2

        worker = worker_client(replica.url)
        before = connections()
        with pytest.raises(redis_lib.ReadOnlyError):
            worker.set("k", "1")
        retries = worker.connection_pool.connection_kwargs["retry"].get_retries()
        assert connections() - before == retries + 1
    finally:
        probe.close()
        replica.stop()
        primary.stop()
