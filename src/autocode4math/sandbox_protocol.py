"""The messages between a sandbox pool and its session processes, and their validation.

Frames are JSON objects sent as single SOCK_SEQPACKET messages of at most MAX_FRAME bytes. The pool
writes blocks to a session and reads its frames; because the code runs inside the session process and
can reach its socket, every frame the pool reads is untrusted input: `parse_frame` bounds its size,
catches every parse failure (deep nesting, huge numbers, invalid UTF-8) and checks the type and range
of each field, raising ProtocolError for anything else. Reads and writes never block past a deadline.
"""

from __future__ import annotations

import contextlib
import errno
import json
import select
import socket
import time

MAX_FRAME = 1 << 20
"""Largest message either side reads; a longer one is a protocol violation."""


def send(sock: socket.socket, obj: dict, block: bool = True) -> None:
    """Send one JSON message; errors (the peer is gone, or its buffer is full when not blocking) are dropped."""
    with contextlib.suppress(OSError):
        sock.send(json.dumps(obj).encode()[:MAX_FRAME], 0 if block else socket.MSG_DONTWAIT)


class ProtocolError(Exception):
    """A session sent something that is not a valid frame (it is killed; the block ends in sandbox_error)."""


FRAME_FIELDS: dict[str, dict[str, type]] = {
    "ready": {"layers": list},
    "fatal": {"error": str},
    "out": {"n": int, "s": str},
    "done": {"n": int, "status": str, "error": str, "tail": str, "dropped": int, "stderr": str},
}
DONE_STATUSES = {"ok", "error", "memory", "exited"}


def parse_frame(data: bytes, truncated: bool) -> dict:
    """Parse and validate one frame from a session (untrusted): a dict of one known type with typed fields."""
    if truncated:
        raise ProtocolError(f"a frame longer than {MAX_FRAME} bytes")
    try:
        msg = json.loads(data)
    except (ValueError, RecursionError) as e:
        raise ProtocolError(f"a frame that is not valid JSON ({type(e).__name__})") from None
    fields = FRAME_FIELDS.get(msg.get("t")) if isinstance(msg, dict) and isinstance(msg.get("t"), str) else None
    if fields is None or set(msg) != {"t", *fields}:
        raise ProtocolError("a frame of unknown type or with unexpected fields")
    for name, kind in fields.items():
        value = msg[name]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ProtocolError(f"field {name!r} of a {msg['t']!r} frame is not a {kind.__name__}")
        if kind is int and not 0 <= value < 2**53:
            raise ProtocolError(f"field {name!r} of a {msg['t']!r} frame is out of range")
    if msg["t"] == "done" and msg["status"] not in DONE_STATUSES:
        raise ProtocolError(f"a result with status {msg['status'][:40]!r}")
    if msg["t"] == "ready" and not (
        len(msg["layers"]) <= 64 and all(isinstance(x, str) and len(x) <= 40 for x in msg["layers"])
    ):
        raise ProtocolError("a malformed list of layers")
    return msg


def poll(socks: list[socket.socket], timeout: float) -> list[socket.socket]:
    """The sockets among `socks` that are readable (or closed) within `timeout` seconds."""
    poller = select.poll()
    by_fd = {}
    for sock in socks:
        if sock.fileno() >= 0:
            poller.register(sock, select.POLLIN)
            by_fd[sock.fileno()] = sock
    if not by_fd:
        return []
    return [by_fd[fd] for fd, _ in poller.poll(max(0.0, timeout) * 1000)]


def recv(sock: socket.socket, timeout: float) -> tuple[bytes, bool] | None:
    """One message and whether it was truncated, or None on timeout / end of file (an empty message is b"")."""
    if timeout > 0 and not poll([sock], timeout):
        return None
    try:
        data, _anc, flags, _addr = sock.recvmsg(MAX_FRAME, 0, socket.MSG_DONTWAIT)
    except OSError:
        return None
    if not data and hung_up(sock):
        return None
    return data, bool(flags & socket.MSG_TRUNC)


def hung_up(sock: socket.socket) -> bool:
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return any(events & (select.POLLHUP | select.POLLERR) for _fd, events in poller.poll(0))


def send_before(sock: socket.socket, payload: bytes, deadline: float) -> bool | None:
    """Send one message without blocking past `deadline` (a session that stops reading cannot hang us).

    False when the session is gone or stopped reading; None when the message is too long for the socket.
    """
    while True:
        try:
            sock.send(payload, socket.MSG_DONTWAIT)
            return True
        except BlockingIOError:
            poller = select.poll()
            poller.register(sock, select.POLLOUT)
            if not poller.poll(max(0.0, deadline - time.monotonic()) * 1000):
                return False
        except OSError as e:
            return None if e.errno == errno.EMSGSIZE else False
