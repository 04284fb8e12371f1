"""The operator's view through the running stack (gunicorn, a Celery worker with the pump, the
partner stub): after a burst, /metrics exports the age of the oldest waiting message and the
acceptance -> partner 2xx lag with samples; a DSR's 100 KB subject_request_type adds under 1 KB to a
scrape; and every metric the alert rules and the Grafana dashboard use is one /metrics exports.
(The same in one process, with exact ages: tests/unit/test_operator_metrics.py.)
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import requests
import yaml

from common import dead_letters
from tests.support import POLICY_DB, ROOT, Stub, own_stub, sample, wait_for
from tests.support.metrics import samples, value
from tests.support.stack import KEYS, TOKEN, Stack, make_stack, sha

AUTH = {"Authorization": f"Token {TOKEN}"}
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "firehose-relay.json"


@pytest.fixture(scope="module")
def stub(logs_dir: Path) -> Iterator[Stub]:
    with own_stub(logs_dir, name="operator-stub") as client:
        yield client


@pytest.fixture(scope="module")
def stack(stub: Stub, logs_dir: Path) -> Iterator[Stack]:
    s = make_stack(POLICY_DB, stub, logs_dir, "operator", PARTNER_RATE_LIMIT="1000/second")
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def after_burst(stack: Stack, stub: Stub) -> str:
    """/metrics once a burst of event batches, a DSR and a message the partner refuses went through."""
    # The partner refuses this key's calls for good (a 4xx other than 408/429): a dead letter.
    stub.faults([{"path_prefix": "/v1", "status": 422, "api_key_sha256": sha("refused-key")}])
    try:
        for _ in range(20):
            stack.send("operator-key")
        post(stack, dsr("access"))
        stack.send("refused-key")
        wait_for(stack.drained, 60, what="the burst to be delivered")
        wait_for(lambda: dead_letters.count(stack.redis, KEYS) >= 1, 30, what="the refused message's letter")
    finally:
        stub.faults([])
    return scrape(stack)


def post(stack: Stack, body: bytes) -> None:
    response = requests.post(f"{stack.url}/firehose", data=body, headers=AUTH, timeout=10)
    assert response.status_code in (200, 202), response.text


def dsr(request_type: str) -> bytes:
    message = orjson.loads(sample("3.2.0", "DsrProcessingRequest.json"))
    message["id"] = str(uuid.uuid4())
    message["subject_request_type"] = request_type
    # The door wants an account with an apiKey to send an erasure with: the event batch's.
    account = orjson.loads(sample("3.2.0", "EventProcessingRequest_ios.json"))["account"]
    message["account"] = account | {"account_settings": account["account_settings"] | {"apiKey": "operator-key"}}
    return orjson.dumps(message)


def scrape(stack: Stack) -> str:
    response = requests.get(f"{stack.url}/metrics", timeout=10)
    assert response.status_code == 200
    return response.text


def test_a_burst_exports_the_lag_histogram_and_the_ages(after_burst: str) -> None:
    kind = "event_processing_request"
    assert value(after_burst, "firehose_delivery_lag_seconds_count", type=kind) == 20
    assert value(after_burst, "firehose_delivery_lag_seconds_sum", type=kind) > 0
    assert value(after_burst, "firehose_delivery_lag_seconds_bucket", type=kind, le="+Inf") == 20
    for queue in ("inbox", "celery", "retry"):
        # Drained: nothing waits, and each place still has its series.
        assert value(after_burst, "firehose_oldest_message_age_seconds", queue=queue) == 0
    # The letter stored during the burst has been waiting since.
    assert value(after_burst, "firehose_oldest_message_age_seconds", queue="dead_letters") > 0


def test_a_100_kb_dsr_request_type_grows_metrics_by_under_1_kb(stack: Stack, after_burst: str) -> None:
    before = scrape(stack)
    post(stack, dsr("x" * 100_000))
    wait_for(stack.drained, 60, what="the DSR to be handled")
    wait_for(
        lambda: value(scrape(stack), "firehose_skipped_events_total", reason="unsupported_dsr_type:other") == 1,
        30,
        what="the worker to count the DSR",
    )
    after = scrape(stack)
    assert len(after.encode()) - len(before.encode()) < 1024
    assert b"xxxxxxxxxx" not in b"".join(stack.redis.hkeys(KEYS.skipped_events))


def expressions() -> dict[str, str]:
    """Every PromQL expression of the alert rules and the dashboard, by where it is."""
    found = {f"rule {r['alert']}": r["expr"] for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]}
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel["targets"]:
            found[f"panel {panel['title']!r} {target['refId']}"] = target["expr"]
    return found


def test_every_metric_in_the_rules_and_the_dashboard_is_exported(after_burst: str) -> None:
    exported = {name for name, _labels in samples(after_burst)}
    used = {(where, name) for where, expr in expressions().items() for name in re.findall(r"\bfirehose_\w+", expr)}
    assert len({name for _, name in used}) >= 15  # the parse found the expressions' metrics
    missing = sorted((where, name) for where, name in used if name not in exported)
    assert not missing, missing
