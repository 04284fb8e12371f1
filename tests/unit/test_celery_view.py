"""What Celery is told about a task, in-process: the pump's argument summary (`argsrepr`) and the
text a task ends with. The running worker's events and `celery inspect` are checked end to end in
tests/e2e/test_celery_view.py."""

from __future__ import annotations

import ast
from collections import Counter

import orjson

from devtools.faults import fresh_message, new_secret
from schemas.messages import EVENTS, MEMBERSHIP
from workers import units
from workers.delivery import RETRY_REASON, Action, Decision
from workers.grouping import Job
from workers.mapping import plan_message
from workers.pump import SUMMARY_MAX_MEMBERS, args_summary, message_summary
from workers.tasks import AttemptReport, _tell_celery


def _secret_message(kind: str = EVENTS) -> tuple[dict, list[str]]:
    api_key, email = new_secret("ak"), f"{new_secret('mail')}@example.com"
    message = fresh_message(kind, api_key)
    message["user_identities"] = [{"type": "email", "encoding": "raw", "value": email}]
    return message, [api_key, email]


def test_a_summary_names_the_message_and_holds_none_of_its_values() -> None:
    message, secrets = _secret_message()
    job = Job("single", [orjson.dumps(message).decode()], 1, 0)
    shown = args_summary(job)
    assert ast.literal_eval(shown) == [
        {"id": message["id"], "type": "event_processing_request", "account_id": 40018, "events": 2}
    ]
    assert not [secret for secret in secrets if secret in shown]


def test_a_unit_is_shown_as_the_message_it_came_from() -> None:
    message, secrets = _secret_message(MEMBERSHIP)
    operation = plan_message(message).operations[0]
    body = units.encode(operation, account_id=message["account"]["account_id"], message_type=MEMBERSHIP)
    summary = message_summary(body)
    assert (summary["unit_of"], summary["type"]) == (message["id"], MEMBERSHIP)
    assert not [secret for secret in secrets if secret in repr(summary)]


def test_a_group_shows_its_first_members_then_a_count_and_odd_values_as_unknown() -> None:
    bodies = [orjson.dumps(_secret_message()[0]).decode() for _ in range(SUMMARY_MAX_MEMBERS + 3)]
    [shown] = ast.literal_eval(args_summary(Job("events", bodies, 2, 0)))
    assert len(shown) == SUMMARY_MAX_MEMBERS + 1 and shown[-1] == "+3 more"
    # An id no protocol writes (here an email in a hand-written letter) is never echoed.
    odd = {"id": "someone@example.com", "type": "x\ny", "account": {"account_id": True}}
    assert message_summary(orjson.dumps(odd).decode()) == {"id": "?", "type": "?", "account_id": None}
    assert message_summary("not json") == {"unreadable": True}


def test_the_end_text_says_what_became_of_the_work() -> None:
    """Called directly (no worker reading the state) the text is returned; a worker gets it as
    the Retry's or the failure's message (tests/e2e/test_celery_view.py)."""
    retry = AttemptReport(Decision(Action.RETRY, 2, 1.5, RETRY_REASON), pending=1, last_status=503)
    text = _tell_celery(retry)
    assert (
        text.startswith("retry (partner_transient, last status 503): 1 to attempt 2, due ") and "(in 1.500 s)" in text
    )
    dead = AttemptReport(Decision(Action.DELIVERED, 1), delivered=2, dead=Counter({"invalid_message": 1}))
    assert _tell_celery(dead) == "dead-lettered (invalid_message x1); delivered 2"
    assert _tell_celery(AttemptReport(Decision(Action.DELIVERED, 1), delivered=3)) == "delivered 3"
