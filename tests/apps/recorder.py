"""Test handlers: record every message id they see to the file named by SG_RECORD.

Bodies are JSON objects with an "id" and optional instructions: "fail" (raise),
"exit" (os._exit mid-message), "hang" (sleep for an hour), "sleep" (seconds), "sleep_first"
(seconds, unless redelivered), "reject",
"leak" (keep 5 MB per message), "retry" (raise Retry on the first attempt), "retry_delay"
(raise Retry(delay=...) on the first attempt), "fail_attempts" (raise on attempts up to
that number, after a "fail" record with the time), "corrupt"
("outcome" or "huge": on the first attempt, write a bad frame to the master ourselves). Messages
that exit or hang first write a "start" record, so a test can count deliveries that
never finish.
One line per handled message, written with O_APPEND so workers never interleave.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time

from speed_gevent import Reject, Retry

_RECORD = os.environ.get("SG_RECORD", "/dev/null")
_LEAKED: list[bytes] = []


def _write(entry: dict) -> None:
    fd = os.open(_RECORD, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(entry) + "\n").encode())
    finally:
        os.close(fd)


def handle(message) -> None:
    data = message.json()
    started = time.time()
    if data.get("exit") or data.get("hang"):
        _write({"id": data["id"], "pid": os.getpid(), "event": "start", "attempt": message.attempt})
    if data.get("sleep"):
        time.sleep(data["sleep"])
    if data.get("sleep_first") and not message.redelivered:
        time.sleep(data["sleep_first"])
    if data.get("hang"):
        time.sleep(3600)
    if data.get("exit"):
        os._exit(9)
    if data.get("leak"):
        _LEAKED.append(b"x" * (5 * 2**20))  # written, so the pages count as unique memory
    if data.get("corrupt") and message.attempt == 1:
        _write_bad_frame(data["corrupt"])
        time.sleep(30)  # the master kills us for it
    _fail_if_asked(data, message.attempt)
    _write(
        {
            "id": data["id"],
            "pid": os.getpid(),
            "start": started,
            "end": time.time(),
            "attempt": message.attempt,
            "delivery_count": message.delivery_count,
            "queue": message.queue,
            "headers": sorted(message.headers),
        }
    )


def _fail_if_asked(data: dict, attempt: int) -> None:
    if data.get("retry") and attempt == 1:
        raise Retry()
    if data.get("retry_delay") and attempt == 1:
        _write({"id": data["id"], "event": "fail", "attempt": 1, "at": time.time()})
        raise Retry(delay=data["retry_delay"])
    if attempt <= data.get("fail_attempts", 0):
        _write({"id": data["id"], "event": "fail", "attempt": attempt, "at": time.time()})
        raise ValueError(f"failing attempt {attempt} of {data['id']}")
    if data.get("reject"):
        raise Reject("asked to reject")
    if data.get("fail"):
        raise ValueError(f"boom {data['id']}")


def _write_bad_frame(kind: str) -> None:
    """Write to our own link to the master, as a buggy worker would."""
    import msgpack

    from speed_gevent.protocol import HEADER, FrameType

    (fd,) = [fd for fd in map(int, os.listdir("/proc/self/fd")) if _is_socket(fd)]
    if kind == "outcome":  # decodes, but its outcome is not one we know
        meta = msgpack.packb([0, 99, "", "", "", None])
        os.write(fd, HEADER.pack(b"SG", 1, FrameType.RESULT, len(meta), 0) + meta)
    elif kind == "truncated":  # half a result, then the worker is gone
        meta = msgpack.packb([0, 0, "", "", "", None])
        os.write(fd, HEADER.pack(b"SG", 1, FrameType.RESULT, len(meta), 0) + meta[: len(meta) // 2])
        os._exit(0)
    else:  # a header that claims a 100 MiB result
        os.write(fd, HEADER.pack(b"SG", 1, FrameType.RESULT, 100 * 2**20, 0))


def _is_socket(fd: int) -> bool:
    try:  # the listing's own fd is gone by now
        return os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
    except OSError:
        return False


def decode(message) -> None:
    """Read the body as its message_id says ("text..." or "json..."), record what came of
    it, and let a decode error fail the attempt as it would in any handler."""
    how = message.properties["message_id"]
    entry = {"id": how, "attempt": message.attempt, "size": len(message.body), "error": None}
    try:
        message.text if how.startswith("text") else message.json()
    except Exception as exc:
        entry["error"] = type(exc).__name__
        raise
    finally:
        _write(entry)


def echo(message) -> None:
    """Record the exact body bytes, keyed by the message_id property."""
    _write({"id": message.properties.get("message_id"), "body": message.body.hex(), "pid": os.getpid()})


def inspect(message) -> None:
    """Report what a handler sees of its process: plain sockets, real threads, open fds."""
    seen = {}
    thread = threading.Thread(target=lambda: seen.setdefault("thread", threading.get_ident()))
    thread.start()
    thread.join()
    _write(
        {
            "id": message.json()["id"],
            "pid": os.getpid(),
            "socket_module": socket.socket.__module__,
            "real_thread": seen["thread"] != threading.get_ident(),
            "fds": sorted(int(fd) for fd in os.listdir("/proc/self/fd")),
            "headers": repr(message.headers),
            "properties": repr(sorted(message.properties)),
        }
    )


def environment(message) -> None:
    """Record the id and every value of the handler's os.environ (a secrets test)."""
    _write({"id": message.json()["id"], "pid": os.getpid(), "environ": sorted(os.environ.values())})
