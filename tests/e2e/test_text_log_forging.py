"""With LOG_FORMAT=text, nothing a client sends can print a line of its own: real gunicorn, a
message whose `type` (and `id`, and request path) carry line breaks and terminal escapes."""

from __future__ import annotations

import uuid
from pathlib import Path

import orjson
import requests

from devtools.procs import start_web
from tests.support import base_env, sample

TOKEN = f"tok-{uuid.uuid4().hex}"
MARK = uuid.uuid4().hex[:10]
# What an attacker would like a reader (or a log shipper splitting on lines) to believe.
FORGED = f"2030-01-01 00:00:00,000 INFO x [firehose_request] forged-{MARK}"


def test_control_characters_in_a_message_cannot_forge_a_text_log_line(redis_url: str, logs_dir: Path) -> None:
    env = base_env(redis_url, FIREHOSE_AUTH_TOKEN=TOKEN, LOG_FORMAT="text", REDIS_KEY_PREFIX=f"forge{MARK}")
    web, url = start_web(env, logs_dir, name="web-text-log")
    try:
        hostile = orjson.loads(sample("3.2.0", "EventProcessingRequest_ios.json"))
        # The web keeps the first 100 characters of a type: all of this.
        hostile["type"] = f"x\x1b[1A\x1b[2K\x85\r\n{FORGED}"
        for headers in ({"Authorization": f"Token {TOKEN}"}, {}):  # accepted or not, it is logged
            answer = requests.post(f"{url}/firehose", data=orjson.dumps(hostile), headers=headers, timeout=10)
            assert 400 <= answer.status_code < 500 and answer.headers["Content-Type"].startswith("application/json")
        path = requests.post(f"{url}/firehose/a%0A{FORGED.replace(' ', '%20')}", data=b"{", timeout=10)
        assert 400 <= path.status_code < 500
        fine = orjson.loads(sample("3.2.0", "EventProcessingRequest_ios.json"))
        fine["id"] = str(uuid.uuid4())
        ok = requests.post(f"{url}/firehose", data=orjson.dumps(fine), headers={"Authorization": f"Token {TOKEN}"})
        assert ok.status_code == 202
    finally:
        web.stop()
    lines = web.output().splitlines()
    # Every line a process printed is a record of its own: it starts with a timestamp.
    assert lines and all(line[:2] == "20" and line[4] == "-" for line in lines if line.strip()), lines[-20:]
    assert not any(line.startswith("2030-") or "\x1b" in line or "\r" in line or "\x85" in line for line in lines)
    carrying = [line for line in lines if f"forged-{MARK}" in line]
    # The hostile type and the hostile path were logged, escaped in place.
    assert len(carrying) >= 2, carrying
    assert all("[firehose_request]" in line or "[http_access]" in line for line in carrying), carrying
    assert any(f"type=x\\x1b[1A\\x1b[2K\\x85\\r\\n{FORGED} status=" in line for line in carrying), carrying
    assert any(f"/firehose/a\\n{FORGED}" in line for line in carrying), carrying
    assert any(f"status=202 error=None message_id={fine['id']}" in line for line in lines)
