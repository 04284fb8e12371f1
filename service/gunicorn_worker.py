"""The web's gunicorn worker: gunicorn's gthread worker with a front slow clients cannot hold,
and connections spread over the worker processes whatever the client does.

gthread hands a connection to a thread as soon as its first byte arrives; the thread then reads
headers and body with blocking reads, so a few dozen clients dripping a byte a second hold every
thread, and `/healthz` waits behind them. Here the worker's poller thread (the one that accepts)
reads each request with non-blocking reads into a buffer and gives a thread only a request that
is complete: the thread's parser finds every byte already buffered and never waits on the
client. A request must arrive whole within REQUEST_DEADLINE_SECONDS of its first byte (of the
connection, for a new one); past that the client gets 408 and the connection is closed.

Balance: every worker process's listener is woken for each new connection and whichever gets
there first takes it, so 16 connections opened together can all land on one worker, which keeps
them for as long as they are kept alive. Workers publish how many connections they hold on a
small shared board (an mmap the master creates before it forks), and a worker stops accepting
while another live worker holds fewer: the least loaded one takes the next connection.

Set as `worker_class` by gunicorn.conf.py (GUNICORN_WORKER_CLASS); nothing else imports it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import selectors
import struct
import tempfile
import time
from functools import partial
from typing import Any

import orjson
from gunicorn.workers.gthread import _DEFER, TConn, ThreadWorker

from common.config import Settings
from schemas.errors import error_body
from service.body import bodies_buffered_by_server

# One read takes what loopback or a LAN delivers at once; a 130 KB membership change then
# arrives in a few poller wake-ups instead of dozens.
_READ_SIZE = 256 * 1024
# While another worker holds fewer connections, this one re-checks the board this often
# (it is not woken when the others' counts change).
_REBALANCE_INTERVAL = 0.01
# A worker whose poller has not written to the board for this long is not waited for.
_STALE_SECONDS = 3.0
_SLOTS = 64
_SLOT = struct.Struct("qqd")  # pid, connections held, heartbeat (CLOCK_MONOTONIC: one clock per host)


def _refusal(status: int, reason: str, code: str, message: str) -> bytes:
    body = orjson.dumps(error_body(code, message))
    return (
        f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode("latin-1") + body


_TIMEOUT = _refusal(408, "Request Timeout", "request_timeout", "The request did not arrive in time.")
_TOO_LARGE = _refusal(413, "Payload Too Large", "payload_too_large", "Request body too large.")
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class Board:
    """Each worker's connection count, shared by the processes of one gunicorn master.

    Made at import, in the master (gunicorn imports the worker class before it forks), so
    every worker maps the same pages. Slots are claimed under a POSIX record lock on the
    backing file (per process, unlike flock, which forked children would share). Counts are
    written without a lock: a read that races a write is off by one connection for one turn.
    """

    def __init__(self, slots: int = _SLOTS) -> None:
        self._slots = slots
        # Open for the master's life: every worker it forks maps and locks this file.
        self._file = tempfile.TemporaryFile(prefix="firehose-web-board-")  # noqa: SIM115
        self._file.truncate(_SLOT.size * slots)
        self._map = mmap.mmap(self._file.fileno(), _SLOT.size * slots)

    def claim(self, pid: int) -> int | None:
        fcntl.lockf(self._file, fcntl.LOCK_EX)
        try:
            for slot, (owner, _, _) in enumerate(_SLOT.iter_unpack(self._map)):
                if owner in (0, pid) or not _alive(owner):
                    # No heartbeat yet: the others do not wait for a worker still loading the
                    # app; it counts from its first turn of the poller (publish).
                    _SLOT.pack_into(self._map, slot * _SLOT.size, pid, 0, 0.0)
                    return slot
            return None
        finally:
            fcntl.lockf(self._file, fcntl.LOCK_UN)

    def publish(self, slot: int, pid: int, connections: int) -> None:
        _SLOT.pack_into(self._map, slot * _SLOT.size, pid, connections, time.monotonic())

    def release(self, slot: int, pid: int) -> None:
        if _SLOT.unpack_from(self._map, slot * _SLOT.size)[0] == pid:
            _SLOT.pack_into(self._map, slot * _SLOT.size, 0, 0, 0.0)

    def fewest_elsewhere(self, slot: int, cap: int) -> int | None:
        """The fewest connections a live worker other than `slot`'s holds while it has room."""
        fresh = time.monotonic() - _STALE_SECONDS
        counts = [
            held
            for i, (owner, held, beat) in enumerate(_SLOT.iter_unpack(self._map))
            if i != slot and owner > 0 and beat >= fresh and held < cap
        ]
        return min(counts, default=None)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


BOARD = Board()


class BufferedConn(TConn):
    """A connection plus what the poller has read of its next request."""

    def __init__(self, cfg: Any, sock: Any, client: Any, server: Any) -> None:
        super().__init__(cfg, sock, client, server)
        self.buf = bytearray()
        self.deadline = 0.0
        self.continued = False  # a 100 Continue went out for the request being read
        self._reset_scan()

    def _reset_scan(self) -> None:
        self.head_end = -1  # where the body starts, once the headers are complete
        self.need: int | None = None  # total bytes of a Content-Length request
        self.chunk_at = -1  # next chunk-size line of a chunked body, -1 when not chunked
        self.expects_continue = False

    def take(self) -> bytes:
        data = bytes(self.buf)
        self.buf.clear()
        self._reset_scan()
        return data


# What the poller makes of a connection's buffer.
_MORE, _READY, _TOO_LARGE_BODY = "more", "ready", "too_large"


def scan(conn: BufferedConn, header_cap: int, body_cap: int) -> str:
    """Whether the buffer holds a whole HTTP/1 request yet.

    Only the framing is read here (end of headers, Content-Length, chunked framing, Expect);
    gunicorn's parser still parses and checks the request in the thread. Anything this does
    not understand is READY: the thread's parser answers it (400, 431...) without waiting,
    as its headers are complete or over gunicorn's limits.
    """
    buf = conn.buf
    if conn.head_end < 0:
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            return _READY if len(buf) > header_cap else _MORE
        conn.head_end = end + 4
        lengths: set[bytes] = set()
        coding = None
        lines = bytes(buf[:end]).split(b"\r\n")
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                lengths.add(value.strip())
            elif name == b"transfer-encoding":
                coding = value.strip().lower()
            elif name == b"expect":
                conn.expects_continue = value.strip().lower() == b"100-continue"
        conn.expects_continue = conn.expects_continue and lines[0].endswith(b"HTTP/1.1")
        if coding is not None:
            if lengths or not coding.endswith(b"chunked"):
                return _READY  # gunicorn refuses or handles these framings itself
            conn.chunk_at = conn.head_end
        elif len(lengths) > 1:
            return _READY
        elif lengths:
            (length,) = lengths
            if not length.isdigit():
                return _READY
            if int(length) > body_cap:
                return _TOO_LARGE_BODY
            conn.need = conn.head_end + int(length)
        else:
            conn.need = conn.head_end
    if conn.need is not None:
        return _READY if len(buf) >= conn.need else _MORE
    return _scan_chunks(conn, body_cap)


def _scan_chunks(conn: BufferedConn, body_cap: int) -> str:
    buf = conn.buf
    while True:
        if conn.chunk_at - conn.head_end > body_cap:
            return _TOO_LARGE_BODY
        line_end = buf.find(b"\r\n", conn.chunk_at)
        if line_end < 0:
            return _MORE
        size_text = bytes(buf[conn.chunk_at : line_end]).split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            return _READY  # gunicorn answers the bad framing
        if size == 0:
            # The last chunk, then trailer fields up to an empty line.
            if buf.startswith(b"\r\n", line_end + 2):
                return _READY
            return _READY if buf.find(b"\r\n\r\n", line_end) >= 0 else _MORE
        following = line_end + 2 + size + 2
        if len(buf) < following:
            return _MORE
        conn.chunk_at = following


class RelayWorker(ThreadWorker):
    """gthread whose poller reads whole requests before a thread sees them, and takes its share
    of new connections only (see the module's docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.filling: dict[BufferedConn, None] = {}
        self.slot: int | None = None
        self.deadline_seconds = 10.0
        self.body_cap = 5 * 1024 * 1024
        self.header_cap = 1024 * 1024
        self.buffering = True
        self._published, self._beat = -1, 0.0

    def init_process(self) -> None:
        settings = Settings.from_env()
        self.deadline_seconds = settings.request_deadline_seconds
        self.body_cap = settings.max_body_bytes
        cfg = self.cfg
        # Past this many bytes without the end of the headers, gunicorn's own limits refuse them.
        self.header_cap = (
            (cfg.limit_request_line or 8190)
            + 4
            + (cfg.limit_request_fields or 100) * ((cfg.limit_request_field_size or 8190) + 2)
        )
        # TLS and HTTP/2 read through their own machinery: those connections get stock gthread.
        self.buffering = not cfg.is_ssl and "h2" not in cfg.http_protocols
        if self.buffering:
            bodies_buffered_by_server()
        self.slot = BOARD.claim(os.getpid())
        try:
            super().init_process()
        finally:
            if self.slot is not None:
                BOARD.release(self.slot, os.getpid())

    # --- balance ---------------------------------------------------------------------------

    def _publish(self) -> None:
        if self.slot is not None:
            BOARD.publish(self.slot, os.getpid(), self.nr_conns)

    def _my_turn(self) -> bool:
        if self.slot is None:
            return True
        fewest = BOARD.fewest_elsewhere(self.slot, self.worker_connections)
        return fewest is None or self.nr_conns <= fewest

    def set_accept_enabled(self, enabled: bool) -> None:
        super().set_accept_enabled(enabled and self.alive and self._my_turn())

    def wait_for_and_dispatch_events(self, timeout: float) -> None:
        if self.alive:
            now = time.monotonic()
            # The board is read and written when this worker's count changed, while it waits for
            # its turn, and for the heartbeat; not on every request's two wake-ups.
            if self.nr_conns != self._published or not self._accepting or now - self._beat > 0.5:
                self._published, self._beat = self.nr_conns, now
                self._publish()
                self.set_accept_enabled(self.nr_conns < self.worker_connections)
            if not self._accepting and self.nr_conns < self.worker_connections:
                timeout = min(timeout, _REBALANCE_INTERVAL)
        elif self.slot is not None:
            # Stopping: the others must not leave new connections to this worker.
            BOARD.release(self.slot, os.getpid())
            self.slot = None
        super().wait_for_and_dispatch_events(timeout)

    def accept(self, listener: Any) -> None:
        if not self.buffering:
            super().accept(listener)
        else:
            try:
                client_sock, client_addr = listener.accept()
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                    raise
                return
            self.nr_conns += 1
            conn = BufferedConn(self.cfg, client_sock, client_addr, listener.getsockname())
            self._fill(conn)
        self._publish()
        if not self._my_turn():
            super().set_accept_enabled(False)

    # --- reading requests in the poller -------------------------------------------------------

    def _fill(self, conn: BufferedConn) -> None:
        conn.deadline = time.monotonic() + self.deadline_seconds
        self.filling[conn] = None
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_readable, conn))

    def _unfill(self, conn: BufferedConn) -> None:
        del self.filling[conn]
        self.poller.unregister(conn.sock)

    def _on_readable(self, conn: BufferedConn, _sock: Any = None) -> None:
        try:
            data = conn.sock.recv(_READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._unfill(conn)
            if conn.buf:
                # The client stopped sending (a half-close, maybe waiting for the answer): the
                # thread's parser meets the end at once and answers as it always did (400).
                self._hand_over(conn)
            else:
                self._close(conn)
            return
        conn.buf += data
        self._advance(conn)

    def _advance(self, conn: BufferedConn) -> None:
        state = scan(conn, self.header_cap, self.body_cap)
        if state == _MORE:
            if conn.expects_continue and not conn.continued:
                # The client waits for this before it sends the body; the thread must not send
                # it again (handle_request).
                conn.continued = True
                self._send(conn, _CONTINUE)
            return
        self._unfill(conn)
        if state == _TOO_LARGE_BODY:
            self._refuse(conn, 413, _TOO_LARGE)
            return
        self._hand_over(conn)

    def _hand_over(self, conn: BufferedConn) -> None:
        data = conn.take()
        conn.sock.setblocking(True)
        conn.init()
        conn.parser.unreader.unread(data)
        conn.data_ready = True
        self.enqueue_req(conn)

    def on_client_socket_readable(self, conn: BufferedConn, client: Any) -> None:
        if not self.buffering:
            super().on_client_socket_readable(conn, client)
            return
        # A kept-alive connection's next request: its deadline starts with its first byte.
        self.poller.unregister(client)
        self.keepalived_conns.remove(conn)
        conn.sock.setblocking(False)
        self._fill(conn)
        self._on_readable(conn)

    def handle_request(self, req: Any, conn: Any) -> bool:
        if getattr(conn, "continued", False):
            req._expected_100_continue = False
            conn.continued = False
        return super().handle_request(req, conn)

    def finish_request(self, conn: Any, fs: Any) -> None:
        if self.buffering and not fs.cancelled() and fs.exception() is None:
            result = fs.result()
            if result and result is not _DEFER:
                # Bytes the client sent behind the answered request (pipelining) are the start of
                # the next one: read it to its end in the poller too, not in a thread.
                ahead = conn.parser.unreader.take_buffered()
                if ahead:
                    conn.sock.setblocking(False)
                    conn.buf += ahead
                    self._fill(conn)
                    self._advance(conn)
                    return
        super().finish_request(conn, fs)

    def murder_pending(self) -> None:
        super().murder_pending()
        now = time.monotonic()
        late = [conn for conn in self.filling if conn.deadline <= now]
        for conn in late:
            self._unfill(conn)
            if conn.buf:
                self._refuse(conn, 408, _TIMEOUT)
            else:
                self._close(conn)  # nothing asked, nothing to answer

    def _cap_keepalive(self, deadline: float) -> None:
        super()._cap_keepalive(deadline)
        # Stopping: a connection that has not started a request gets no longer than a kept-alive one.
        for conn in self.filling:
            if not conn.buf:
                conn.deadline = min(conn.deadline, deadline)

    def _refuse(self, conn: BufferedConn, status: int, answer: bytes) -> None:
        self.log.info(
            "request refused before the app: %s",
            status,
            extra={"event": "request_refused", "status": status, "remote_addr": _peer(conn.client)},
        )
        self._send(conn, answer)
        self._close(conn)

    def _send(self, conn: BufferedConn, data: bytes) -> None:
        with contextlib.suppress(OSError):
            conn.sock.send(data)  # small: fits the socket's buffer, never waits

    def _close(self, conn: BufferedConn) -> None:
        self.nr_conns -= 1
        conn.close()


def _peer(client: Any) -> str | None:
    return client[0] if isinstance(client, tuple) and client else None
