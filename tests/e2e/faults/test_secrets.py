"""Last of the suite: no token or apiKey that any test sent is in any log line of any process
(web, workers, partner stub, at DEBUG) or in any dead-letter listing (`flask dlq list [--json]`,
`flask dlq show`). Run alone, it makes dead letters and failed logins of its own first.
"""

from __future__ import annotations

from pathlib import Path

import orjson
import requests

from common import dead_letters
from common.config import Settings
from common.keys import Keys
from devtools.faults import Results, fresh_message, leaks, new_secret, post, sha
from service import create_app
from tests.support import Stub, wait_for
from tests.support.stack import Stack

KEYS = Keys("fr")


def test_no_sent_secret_in_any_log_or_dead_letter_listing(
    fault_stack: Stack,
    fault_stub: Stub,
    fault_token: str,
    sent_secrets: dict[str, str],
    logs_dir: Path,
    fault_results: Results,
) -> None:
    refused_key, invalid_key, wrong = new_secret("ak_refused"), new_secret("ak_invalid"), new_secret("wrong")
    sent_secrets.update({"apiKey refused": refused_key, "apiKey invalid": invalid_key, "wrong token (last)": wrong})
    fault_stub.faults(
        [
            {"path_prefix": "/v1", "status": 400, "api_key_sha256": sha(refused_key)},
            {"path_prefix": "/v1/audiences", "status": 401, "api_key_sha256": sha(invalid_key)},
        ]
    )
    refused = fresh_message("event_processing_request", refused_key)
    # Refused at the door for its shape: the 400 names the field, never the apiKey beside it.
    malformed = fresh_message("audience_subscription_request", invalid_key)
    malformed["audience_id"] = "not-an-audience-id"
    revoked = fresh_message("audience_subscription_request", invalid_key)
    assert post(fault_stack.url, refused, fault_token).status_code == 202
    answer = post(fault_stack.url, malformed, fault_token)
    assert answer.status_code == 400 and invalid_key not in answer.text
    assert post(fault_stack.url, revoked, fault_token).status_code == 200
    assert post(fault_stack.url, fresh_message("dsr_processing_request", invalid_key), wrong).status_code == 401
    assert requests.post(f"{fault_stack.url}/firehose?token={wrong}", data=b"{}", timeout=5).status_code in (400, 401)
    for message in (refused, revoked):
        wait_for(lambda m=message: dead_letters.get(fault_stack.redis, KEYS, m["id"]), 30, 0.2, "the dead letter")
    fault_stub.faults([])

    app = create_app(Settings(redis_url=fault_stack.redis_url, broker_url=fault_stack.redis_url))
    cli = app.test_cli_runner()
    listings = {"dlq list --json": cli.invoke(args=["dlq", "list", "--json", "--limit", "100000"])}
    listings["dlq list"] = cli.invoke(args=["dlq", "list", "--limit", "100000"])
    letters = [orjson.loads(line) for line in listings["dlq list --json"].output.splitlines() if line.startswith("{")]
    unshowable = 0
    for letter in letters:
        shown = cli.invoke(args=["dlq", "show", letter["id"]])
        if shown.exit_code != 0:
            unshowable += 1  # see test_a_deeply_nested_dead_letter_can_be_shown
        listings[f"dlq show {letter['id']}"] = shown
    # Stop web and workers so every line they had to say is written; the stub logs as it goes.
    for proc in fault_stack.workers:
        proc.stop()
    logs = {path.name: path.read_text(errors="replace") for path in sorted(logs_dir.glob("faults-*.log"))}

    found = {name: leaks(text, sent_secrets) for name, text in logs.items()}
    found |= {name: leaks(result.output, sent_secrets) for name, result in listings.items()}
    found = {name: what for name, what in found.items() if what}
    fault_results.record(
        "Secrets: every token and apiKey sent, searched in every log and dead-letter listing",
        inputs=len(sent_secrets),
        status_5xx=0,
        dead_lettered=len(letters),
        notes=(
            f"{len(sent_secrets)} secrets x {len(logs)} log files ({sum(len(t) for t in logs.values()) // 1024} KiB)"
            f" + {len(listings)} listings; found: {sum(len(v) for v in found.values())}; "
            f"letters `dlq show` could not print: {unshowable}"
        ),
    )
    assert len(letters) >= 2 and {refused["id"], revoked["id"]} <= {letter["id"] for letter in letters}
    assert all(logs.values()), [name for name, text in logs.items() if not text]
    assert not found, found
