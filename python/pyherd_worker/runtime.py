"""The worker loop: read a call, run its handler, write the reply; exit on EOF or parent death."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import traceback
from typing import Any, BinaryIO, Dict, List, Optional, Tuple

from . import PROTOCOL_VERSION, handlers, logs, protocol
from .options import flag_pairs

REQUEST_FD = 3
REPLY_FD = 4
TRACEBACK_LIMIT = 16 * 1024
MESSAGE_LIMIT = 16 * 1024
PARENT_CHECK_INTERVAL_S = 0.25
#: The longest idle spin the worker accepts (``--idle-spin-us``), as the host does.
MAX_IDLE_SPIN_US = 10_000

_codec_name = "json"
_idle_spin_us = 0
log = logging.getLogger("pyherd.worker")


def codec_name() -> str:
    """The JSON library this worker encodes with ("orjson" or "json")."""
    return _codec_name


def idle_spin_us() -> int:
    """How long this worker polls for its next call after a reply before it sleeps, µs."""
    return _idle_spin_us


def _python_type(exc: BaseException) -> str:
    cls = type(exc)
    module = cls.__module__
    return cls.__qualname__ if module == "builtins" else f"{module}.{cls.__qualname__}"


def error_frame(request_id: int, category: str, kind: str, message: str, **extra: Any) -> Dict[str, Any]:
    frame: Dict[str, Any] = {"t": "err", "id": request_id, "category": category, "kind": kind, "message": message}
    frame.update(extra)
    return frame


def _text(value: str) -> str:
    """`value` as text both codecs can write: a lone surrogate (from surrogateescape'd
    bytes, say) becomes a visible \\udcxx escape instead of failing the encoding."""
    return value.encode("utf-8", "backslashreplace").decode("utf-8")


def _message(exc: BaseException) -> str:
    try:
        text = str(exc)
    except BaseException:  # an exception class whose __str__ itself fails
        text = ""
    text = _text(text)
    if len(text) > MESSAGE_LIMIT:
        text = f"{text[:MESSAGE_LIMIT]}… ({len(text) - MESSAGE_LIMIT} more characters)"
    return text or type(exc).__name__


def exception_frame(
    request_id: int,
    exc: BaseException,
    category: str = "python",
    kind: str = "python_exception",
    retryable: bool = False,
) -> Dict[str, Any]:
    tb = _text("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    if len(tb) > TRACEBACK_LIMIT:
        tb = "…" + tb[-TRACEBACK_LIMIT:]
    return error_frame(
        request_id,
        category,
        kind,
        _message(exc),
        python_type=_python_type(exc),
        traceback=tb,
        retryable=retryable,
    )


def failure_frame(request_id: int, exc: BaseException) -> Dict[str, Any]:
    """The answer to a call whose handler raised `exc` (any exception, SystemExit too: a
    handler's failure is its caller's answer, not the worker's end): a HandlerError's own
    category and kind, else ``python/python_exception``."""
    if isinstance(exc, handlers.HandlerError):
        return exception_frame(request_id, exc, exc.category, exc.kind, exc.retryable)
    return exception_frame(request_id, exc)


class Worker:
    """One worker's state: its streams, codec, limits and handlers."""

    def __init__(
        self,
        requests: BinaryIO,
        replies: BinaryIO,
        worker_id: str,
        max_frame_bytes: int,
        codec: Optional[tuple] = None,
        idle_spin_us: int = 0,
    ) -> None:
        global _codec_name, _idle_spin_us
        _idle_spin_us = idle_spin_us
        self.idle_spin_s = idle_spin_us / 1e6
        self.requests = requests
        self.replies = replies
        self.worker_id = worker_id
        self.max_frame_bytes = max_frame_bytes
        _codec_name, self.dumps, self.loads = codec or protocol.select_codec()
        self.handler_log = logging.getLogger("pyherd.handler")
        self.handlers = handlers.registry()

    def send(self, frame: Dict[str, Any]) -> None:
        protocol.write_frame(self.replies, self.dumps(frame))

    def error_body(self, frame: Dict[str, Any]) -> bytes:
        """Error `frame` encoded within the frame limit: without its traceback, then with
        its message cut, if it would not fit whole (the host refuses a larger frame)."""
        body = self.dumps(frame)
        if len(body) <= self.max_frame_bytes:
            return body
        frame = {key: value for key, value in frame.items() if key != "traceback"}
        message = frame["message"]
        while True:
            body = self.dumps(frame)
            if len(body) <= self.max_frame_bytes or not message:
                return body
            message = message[: len(message) // 2]
            frame["message"] = f"{message}… (cut to fit the frame limit)"

    def send_error(self, frame: Dict[str, Any]) -> None:
        protocol.write_frame(self.replies, self.error_body(frame))

    def hello(self) -> None:
        self.send(
            {
                "t": "hello",
                "id": 0,
                "protocol": PROTOCOL_VERSION,
                "pid": os.getpid(),
                "worker_id": self.worker_id,
                "handlers": sorted(handlers.registry()),
                "adapters": handlers.adapters(),
                "python": sys.version.split()[0],
                "json": _codec_name,
            }
        )

    def _start(self, msg: Dict[str, Any]) -> Any:
        """Look up and invoke the call's handler: ("ok", result) or ("err", frame)."""
        request_id = msg.get("id", 0)
        name = msg.get("cmd")
        h = self.handlers.get(name) if isinstance(name, str) else None
        if h is None:
            known = ", ".join(sorted(self.handlers))
            return "err", error_frame(request_id, "invalid_request", "unknown_command", f"no handler named {name!r} (known: {known})")
        deadline_ms = msg.get("deadline_ms")
        rid = msg.get("rid")
        ctx = handlers.Context(
            self.worker_id,
            msg.get("session_id"),
            rid if isinstance(rid, str) else str(request_id),
            deadline_ms / 1000.0 if deadline_ms is not None else None,
            self.handler_log,
        )
        try:
            return "ok", handlers.invoke(h, msg.get("args"), ctx)
        except BaseException as exc:
            return "err", failure_frame(request_id, exc)

    def _encode(self, frame: Dict[str, Any], what: str, name: Any) -> Tuple[bool, bytes]:
        """(True, `frame` encoded), or (False, the encoded error frame saying why it
        cannot be sent)."""
        request_id = frame["id"]
        try:
            body = self.dumps(frame)
        except Exception as exc:  # TypeError, ValueError, RecursionError (too deep), ...
            return False, self.error_body(
                error_frame(
                    request_id,
                    "python",
                    "result_not_serializable",
                    f"handler {name!r} {what} that is not JSON-serialisable: {exc}",
                    python_type=_python_type(exc),
                )
            )
        if len(body) > self.max_frame_bytes:
            return False, self.error_body(
                error_frame(
                    request_id,
                    "resource",
                    "result_too_large",
                    f"handler {name!r} {what} of {len(body)} bytes, over the frame limit of {self.max_frame_bytes}",
                )
            )
        return True, body

    def reply_body(self, msg: Dict[str, Any]) -> bytes:
        """Run one call and return the encoded reply (never raises for handler faults).

        A generator handler called this way answers the list of everything it yields."""
        request_id = msg.get("id", 0)
        status, result = self._start(msg)
        if status == "err":
            return self.error_body(result)
        if type(result) in handlers.STREAM_TYPES:
            try:
                result = list(handlers.chunks(result))
            except BaseException as exc:
                return self.error_body(failure_frame(request_id, exc))
        return self._encode({"t": "ok", "id": request_id, "result": result}, "returned a value", msg.get("cmd"))[1]

    def cancel_pending(self, request_id: int) -> bool:
        """Whether the host asked to cancel call `request_id`; never blocks."""
        fd = self.requests.fileno()
        os.set_blocking(fd, False)
        try:
            waiting = self.requests.peek(1)
        finally:
            os.set_blocking(fd, True)
        if not waiting:
            return False
        body = protocol.read_frame(self.requests)
        if body is None:
            return True  # the host is gone: stop as well
        msg = self.loads(body)
        if not isinstance(msg, dict) or msg.get("t") != "cancel":
            raise protocol.ProtocolError(f"unexpected message during a stream: {msg!r:.80}")
        return msg.get("id") == request_id

    def stream(self, msg: Dict[str, Any]) -> None:
        """Run one streaming call: `chunk` frames then `end`, or `err` (after the chunks
        sent). A handler that is not a generator sends its result as the one chunk. A
        `cancel` from the host, checked between chunks, closes the generator and answers
        `err` `invalid_request/cancelled`."""
        request_id = msg.get("id", 0)
        name = msg.get("cmd")
        status, result = self._start(msg)
        if status == "err":
            self.send_error(result)
            return
        items = handlers.chunks(result) if handlers.is_stream(result) else (x for x in (result,))
        try:
            for item in items:
                sendable, body = self._encode({"t": "chunk", "id": request_id, "data": item}, "yielded a chunk", name)
                protocol.write_frame(self.replies, body)
                if not sendable:
                    return
                if self.cancel_pending(request_id):
                    items.close()
                    self.send(error_frame(request_id, "invalid_request", "cancelled", "the call was cancelled"))
                    return
        except BaseException as exc:
            self.send_error(failure_frame(request_id, exc))
            return
        finally:
            items.close()
        self.send({"t": "end", "id": request_id})

    def await_call(self) -> None:
        """Poll the request pipe for up to the idle spin before the blocking read of the
        next frame, giving the CPU to anything else runnable between polls. A worker that
        sleeps as soon as it answers lets its CPU idle, and on a virtual machine the next
        call then runs a good deal slower (see the README's "Idle spin"); a call that comes
        within the spin finds the worker awake. Returns at once when a frame (or the end of
        the pipe, after the spin) is there; consumes nothing from the pipe."""
        spin = self.idle_spin_s
        if not spin:
            return
        fd, peek, clock, pause = self.requests.fileno(), self.requests.peek, time.perf_counter, os.sched_yield
        os.set_blocking(fd, False)
        try:
            until = clock() + spin
            while not peek(1) and clock() < until:
                pause()
        finally:
            os.set_blocking(fd, True)

    def serve(self) -> None:
        """Answer calls until the request stream ends."""
        read_frame, write_frame = protocol.read_frame, protocol.write_frame
        loads, requests, replies = self.loads, self.requests, self.replies
        running, await_call = logs.running, self.await_call
        while True:
            await_call()
            body = read_frame(requests)
            if body is None:
                return
            try:
                msg = loads(body)
            except ValueError as exc:
                raise protocol.ProtocolError(f"a frame that is not JSON: {exc}") from exc
            kind = msg.get("t") if isinstance(msg, dict) else type(msg).__name__
            if kind == "cancel":
                continue  # for a call that has already ended
            if kind != "call":
                raise protocol.ProtocolError(f"unexpected message type {kind!r}")
            # Log lines name the call while it runs, a stream's generator included.
            outer = running(msg.get("rid") or msg.get("id"))
            try:
                if msg.get("stream"):
                    self.stream(msg)
                else:
                    write_frame(replies, self.reply_body(msg))
            finally:
                running(outer)


def watch_parent(parent: Optional[int], interval: float = PARENT_CHECK_INTERVAL_S) -> None:
    """Exit the process as soon as the parent that started it is gone.

    `parent` is the pid the host says it has: if the host died before this process got
    here, the parent is already someone else (a reaper) and the worker exits at once.
    """
    if parent is None:
        parent = os.getppid()
    if os.getppid() != parent:
        os._exit(0)

    def check() -> None:
        while True:
            time.sleep(interval)
            if os.getppid() != parent:
                os._exit(0)

    threading.Thread(target=check, name="pyherd-parent-watch", daemon=True).start()


def _parse_args(argv: List[str]) -> Dict[str, Any]:
    opts: Dict[str, Any] = {
        "worker_id": "w0",
        "max_frame_bytes": 64 * 1024 * 1024,
        "idle_spin_us": 0,
        "handlers": [],
        "parent_pid": None,
        "run_id": None,
    }
    for flag, value in flag_pairs(argv, "pyherd_worker"):
        if flag == "--worker-id":
            opts["worker_id"] = value
        elif flag == "--max-frame-bytes":
            opts["max_frame_bytes"] = int(value)
        elif flag == "--idle-spin-us":
            spin = int(value)
            if not 0 <= spin <= MAX_IDLE_SPIN_US:
                raise SystemExit(f"pyherd_worker: --idle-spin-us must be 0..={MAX_IDLE_SPIN_US}, not {spin}")
            opts["idle_spin_us"] = spin
        elif flag == "--handlers":
            opts["handlers"].append(value)
        elif flag == "--parent-pid":
            opts["parent_pid"] = int(value)
        elif flag == "--run-id":
            # The host's run: a marker on the command line that its sweeps look for.
            opts["run_id"] = value
        else:
            raise SystemExit(f"pyherd_worker: unknown option {flag}")
    return opts


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``python -m pyherd_worker`` (run by the host with fds 3 and 4 open)."""
    opts = _parse_args(sys.argv[1:] if argv is None else argv)
    os.dup2(2, 1)  # print() and os.write(1, ...) land in the captured stderr, never in a frame
    logs.install(opts["worker_id"])
    watch_parent(opts["parent_pid"])
    try:
        requests = os.fdopen(REQUEST_FD, "rb", buffering=1 << 16)
        replies = os.fdopen(REPLY_FD, "wb", buffering=1 << 16)
    except OSError as exc:
        print(f"pyherd_worker: fds 3 and 4 must be the host's pipes: {exc}", file=sys.stderr)
        return 2
    # Processes a handler starts do not get the pipes: the host sees the worker's end
    # as the pipes' end, and only the worker may write a frame.
    os.set_inheritable(REQUEST_FD, False)
    os.set_inheritable(REPLY_FD, False)
    worker = Worker(requests, replies, opts["worker_id"], opts["max_frame_bytes"], idle_spin_us=opts["idle_spin_us"])
    for spec in opts["handlers"]:
        try:
            handlers.load(spec)
        except BaseException as exc:  # includes SystemExit raised by a module at import
            traceback.print_exc()
            frame = exception_frame(0, exc, "initialization", "handler_import_failed")
            frame["message"] = f"loading handlers {spec!r} failed: {type(exc).__name__}: {frame['message']}"
            try:
                worker.send_error(frame)
            except OSError:
                pass
            return 3
    worker.hello()
    try:
        worker.serve()
    except (BrokenPipeError, ConnectionResetError):
        return 0
    except protocol.ProtocolError as exc:
        print(f"pyherd_worker: {exc}", file=sys.stderr)
        return 4
    return 0
