"""A secret is redacted in every encoding a partner or a library may write it in, and a text log line
stays one line whatever a logged value holds (common/redaction.py, common/logging_setup.py).
(Through real gunicorn with LOG_FORMAT=text: tests/e2e/test_text_log_forging.py.)"""

from __future__ import annotations

import base64
import io
import json
import logging
import uuid
from collections.abc import Callable

import orjson
import pytest

from common.logging_setup import RedactionFilter, make_handler, redact_text
from common.redaction import REDACTED, escape_control, message_secrets, redact_secrets, secret_forms

# Characters every encoding treats differently: '/', '+', ' ', '"', '~', non-ASCII.
SECRET = f'sk/live+"{uuid.uuid4().hex[:10]}" é~'
B64: dict[str, Callable[[bytes], bytes]] = {"standard": base64.b64encode, "url-safe": base64.urlsafe_b64encode}


@pytest.mark.parametrize("prefix", [b"", b"a", b"ab", b"abc", b"user:"])
@pytest.mark.parametrize("suffix", [b"", b"z", b"zz"])
@pytest.mark.parametrize("alphabet", B64.keys())
def test_base64_of_the_secret_in_any_alignment_cannot_be_decoded_back(
    prefix: bytes, suffix: bytes, alphabet: str
) -> None:
    encode = B64[alphabet]
    encoded = encode(prefix + SECRET.encode() + suffix).decode()
    redacted = redact_secrets(f"echo: {encoded}.", [SECRET])
    assert REDACTED in redacted and encoded not in redacted
    # Put zero bits where the redaction is and decode what is left: at most a byte or so of
    # the secret at either end can survive, never its middle.
    kept = redacted.removeprefix("echo: ").removesuffix(".")
    filled = kept.replace(REDACTED, "A" * (len(encoded) - len(kept) + len(REDACTED)))
    decoded = base64.b64decode(filled.translate(str.maketrans("-_", "+/")) + "==")
    assert SECRET.encode()[2:-2] not in decoded


@pytest.mark.parametrize(
    "echo",
    [
        json.dumps({"k": SECRET}),  # \" and \u00e9
        orjson.dumps({"k": SECRET}).decode(),  # \" and é as it is
        json.dumps({"k": SECRET}).replace("/", "\\/"),
        json.dumps({"body": json.dumps({"k": SECRET})}),  # JSON in a JSON string
        "https://cb.example/x?k=" + __import__("urllib.parse").parse.quote(SECRET, safe=""),
        "k=" + __import__("urllib.parse").parse.quote_plus(SECRET),
        "k=" + __import__("urllib.parse").parse.quote(SECRET, safe="").lower(),
    ],
    ids=["json ascii", "json utf-8", "json \\/", "json twice", "url %20", "url +", "url lower-case hex"],
)
def test_escaped_and_url_encoded_forms_are_redacted(echo: str) -> None:
    redacted = redact_secrets(echo, [SECRET])
    assert REDACTED in redacted
    for form in secret_forms(SECRET):
        assert form not in redacted


def test_short_values_are_no_secrets_and_ordinary_text_stays() -> None:
    assert secret_forms("abc") == ()
    text = "HTTP 400: invalid batch, see https://docs.example/errors?code=7"
    assert redact_secrets(text, ["abc", SECRET]) == text


def test_every_settings_value_of_a_message_is_a_secret() -> None:
    message = {
        "account": {"account_id": 1, "account_settings": {"apiKey": SECRET, "region": "eu-west-1", "n": 5}},
        "audience_subscription_settings": {"nested": [{"listToken": "list-token-1"}]},
        "events": [{"data": {"custom_attributes": {"apiKey": "not-a-setting"}}}],
    }
    assert message_secrets(message) == {SECRET, "eu-west-1", "list-token-1"}


def test_the_log_filter_redacts_a_token_in_basic_auth_and_url_forms() -> None:
    token = f"tok-{uuid.uuid4().hex}"
    basic = base64.b64encode(f"relay:{token}".encode()).decode()
    stream = io.StringIO()
    logger = logging.getLogger(f"test.enc.{uuid.uuid4().hex}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(make_handler("test", [token], "json", stream))
    logger.warning("upstream said %s", f"Authorisation {basic} for {token.upper()} and {json.dumps(token)}")
    logger.warning("callback", extra={"url": f"https://x.example/cb?t={token}", "echo": basic})
    out = stream.getvalue()
    assert token not in out and basic[4:-4] not in out and out.count(REDACTED) >= 4
    assert redact_text(f"k={base64.urlsafe_b64encode(token.encode()).decode()}", [token]).startswith("k=[redacted]")
    assert RedactionFilter([token]).secrets == (token,)


# ---------------------------------------------------------------- control characters

FORGED = "event_processing_request\n2030-01-01 00:00:00,000 INFO service.requests [firehose_request] forged"


def _text_log(*values: object, exc: bool = False) -> str:
    stream = io.StringIO()
    logger = logging.getLogger(f"test.text.{uuid.uuid4().hex}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(make_handler("test", [], "text", stream))
    if exc:
        try:
            raise ValueError(*values)
        except ValueError:
            logger.exception("failed with %s", values[0], extra={"event": "boom"})
    else:
        logger.info("firehose_request type=%s", *values, extra={"event": "firehose_request"})
    return stream.getvalue()


@pytest.mark.parametrize(
    "value",
    [
        FORGED,
        "a\r\nb",
        "a\rforged",
        "\x1b[2J\x1b[Hclear",
        "nul\x00bell\x07del\x7f",
        "c1\x85\x9b31m",
        "ls\u2028ps\u2029",
    ],
    ids=["LF", "CRLF", "CR", "ESC", "C0 and DEL", "C1", "U+2028/9"],
)
def test_a_text_line_escapes_every_control_character(value: str) -> None:
    out = _text_log(value)
    assert out.endswith("\n") and out.count("\n") == 1
    body = out[:-1]
    assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F or c in "\u2028\u2029" for c in body)
    assert escape_control(value) in body


def test_a_traceback_in_a_text_line_is_one_line_too() -> None:
    out = _text_log(FORGED, exc=True)
    assert out.count("\n") == 1 and "Traceback (most recent call last):\\n" in out and "\\n2030-01-01" in out


def test_json_lines_keep_the_value_exact() -> None:
    stream = io.StringIO()
    logger = logging.getLogger(f"test.json.{uuid.uuid4().hex}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(make_handler("test", [], "json", stream))
    logger.info("x", extra={"event": "e", "message_type": FORGED})
    [line] = stream.getvalue().splitlines()
    assert orjson.loads(line)["message_type"] == FORGED
