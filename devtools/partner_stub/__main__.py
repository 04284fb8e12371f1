"""Run the partner stub: python -m devtools.partner_stub --host 127.0.0.1 --port 9400 [--faults FILE.json]."""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from werkzeug.serving import WSGIRequestHandler, make_server

from devtools.partner_stub.app import StubConfig, create_stub_app
from devtools.partner_stub.fault_rules import FaultConfigError

logger = logging.getLogger("partner_stub")


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m devtools.partner_stub",
        description="Loopback implementation of the reference partner API, with fault injection.",
    )
    parser.add_argument("--host", default=os.environ.get("STUB_HOST", "127.0.0.1"))
    parser.add_argument(
        "--port",
        type=int,
        default=int(os.environ.get("STUB_PORT", "9400")),
        help="0 picks a free port (the bound port is printed)",
    )
    parser.add_argument(
        "--faults",
        metavar="FILE.json",
        help='fault rules file, {"rules": [...]}; overrides STUB_FAULTS',
    )
    parser.add_argument(
        "--max-requests",
        type=int,
        default=20_000,
        help="how many requests /_stub/requests keeps (oldest dropped first)",
    )
    parser.add_argument("--log-level", default=os.environ.get("STUB_LOG_LEVEL", "INFO"))
    return parser.parse_args(argv)


def _load_faults(path: str | None) -> dict[str, Any] | None:
    if path:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    raw = os.environ.get("STUB_FAULTS", "").strip()
    return json.loads(raw) if raw else None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _PlainLogHandler(WSGIRequestHandler):
    """Access log without ANSI colours (they garble docker logs and files).

    Only the request line and status are logged, never headers or bodies.
    """

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        # Escape control characters so a crafted path cannot forge log lines.
        line = self.requestline.translate(self._control_char_table)
        logger.info('%s "%s" %s', self.address_string(), line, code)


def _raise_exit(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    # Logs go to stderr: stdout carries only the "listening" line tests wait for.
    logging.basicConfig(
        stream=sys.stderr,
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        app = create_stub_app(StubConfig(faults=_load_faults(args.faults), max_requests=args.max_requests))
    except (OSError, ValueError, FaultConfigError) as exc:
        print(f"partner stub: bad fault configuration: {exc}", file=sys.stderr)
        return 2

    if not _is_loopback(args.host):
        # Allowed for containers, but the stub has no real auth and keeps
        # customers' payloads in memory, so say so.
        logger.warning(
            "listening on non-loopback address %s; the stub has no access control",
            args.host,
        )

    server = make_server(args.host, args.port, app, threaded=True, request_handler=_PlainLogHandler)
    port = server.server_port
    shown_host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"partner stub listening on http://{shown_host}:{port}", flush=True)

    # SIGTERM (docker stop, Popen.terminate) should close the socket cleanly.
    signal.signal(signal.SIGTERM, _raise_exit)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
