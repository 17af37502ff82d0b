"""Fault handlers for tests and benchmarks; loaded only with ``--handlers pyherd_worker.testing``."""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from typing import Any, AsyncIterator, Dict, Iterator, List

from .handlers import Context, handler

_leaked: List[bytearray] = []


@handler
def sleep(args: Dict[str, Any]) -> Dict[str, Any]:
    """Sleep ``seconds`` (a handler that hangs when given a long time)."""
    time.sleep(float(args.get("seconds", 1.0)))
    return {"slept": args.get("seconds", 1.0)}


@handler
def crash(args: Dict[str, Any]) -> None:
    """Exit the worker process at once with ``code`` (default 1)."""
    sys.stderr.write("testing.crash: exiting on purpose\n")
    sys.stderr.flush()
    os._exit(int(args.get("code", 1)))


@handler
def kill_self(args: Dict[str, Any]) -> None:
    """SIGKILL the worker process from inside a call."""
    os.kill(os.getpid(), signal.SIGKILL)


@handler
def spam_stdout(args: Dict[str, Any], ctx: Context) -> Dict[str, Any]:
    """Print ``lines`` lines with print() and os.write(1, ...), then answer normally."""
    lines = int(args.get("lines", 1000))
    for i in range(lines):
        print(f"spam {i} from {ctx.worker_id}")
        os.write(1, b"raw spam line\n")
    os.write(1, b"\x00\x00\x00\x10not a frame at all")
    return {"printed": lines}


@handler
def log_lines(args: Dict[str, Any], ctx: Context) -> Dict[str, Any]:
    """Log ``lines`` lines (default 1) through ``ctx.log``, then one through the root logger."""
    lines = int(args.get("lines", 1))
    for i in range(lines):
        ctx.log.info("handler line %d of %d", i, lines)
    logging.getLogger().warning("root logger line")
    return {"logged": lines + 1}


@handler
def not_json(args: Dict[str, Any]) -> Any:
    """Return a value JSON cannot represent."""
    return {"a set": {1, 2, 3}}


@handler
def deep_result(args: Dict[str, Any]) -> Any:
    """Return lists nested ``depth`` deep (default 100 000: deeper than any encoder goes)."""
    value: Any = []
    for _ in range(int(args.get("depth", 100_000))):
        value = [value]
    return value


@handler
def raise_error(args: Dict[str, Any]) -> None:
    """Raise ValueError with ``message``."""
    raise ValueError(args.get("message", "raised on purpose"))


@handler
def garbage_frame(args: Dict[str, Any]) -> None:
    """Write bytes that are not a valid frame straight onto the reply pipe, then hang."""
    os.write(4, b"\x00\x00\x00\x0cnot json!!!!")
    time.sleep(3600)


@handler
def big_result(args: Dict[str, Any]) -> str:
    """Return a string of ``bytes`` characters."""
    return "x" * int(args.get("bytes", 1024))


@handler
def cpu(args: Dict[str, Any]) -> int:
    """CPU-bound work: sum(i*i for i in range(n)), n defaults to 20000."""
    return sum(i * i for i in range(int(args.get("n", 20000))))


@handler
async def async_echo(args: Any) -> Any:
    """An async handler: yields to the event loop once, then returns its args."""
    import asyncio

    await asyncio.sleep(0)
    return args


@handler
def ctx_info(args: Any, ctx: Context) -> Dict[str, Any]:
    """Return what the call context holds."""
    return {
        "worker_id": ctx.worker_id,
        "session_id": ctx.session_id,
        "request_id": ctx.request_id,
        "deadline": ctx.deadline,
        "remaining": ctx.remaining(),
        "pid": os.getpid(),
    }


@handler
def spawn_child(args: Dict[str, Any]) -> Dict[str, int]:
    """Start a long ``sleep`` child process (a grandchild of the host) and return its pid.

    ``close_fds: false`` lets it inherit every inheritable fd (as ``os.system`` does);
    ``hold_pipes: true`` hands it the worker's protocol pipes on purpose;
    ``new_session: true`` starts it in a session (and process group) of its own."""
    import subprocess

    child = subprocess.Popen(
        ["sleep", str(args.get("seconds", 600))],
        close_fds=bool(args.get("close_fds", True)),
        pass_fds=(3, 4) if args.get("hold_pipes") else (),
        start_new_session=bool(args.get("new_session")),
    )
    return {"pid": child.pid}


@handler
def leak(args: Dict[str, Any]) -> Dict[str, int]:
    """Keep ``mb`` MiB more (default 50) in a module-level list, resident, on every call."""
    _leaked.append(bytearray(b"\x01") * (int(args.get("mb", 50)) << 20))
    return {"held_mb": sum(len(block) for block in _leaked) >> 20}


def _note(path: Any, text: str) -> None:
    """Write ``text`` to the file ``path`` (when given), replacing what it held."""
    if path:
        with open(path, "w") as f:
            f.write(text)


@handler
def count(args: Dict[str, Any]) -> Iterator[Dict[str, Any]]:
    """Stream ``{"i": 0}`` … up to ``to`` (default 3), each padded with ``pad`` bytes,
    ``delay`` seconds apart; the number produced so far is written to the file
    ``progress`` before each chunk, and ``closed`` is written when the generator ends."""
    pad = "x" * int(args.get("pad", 0))
    delay = float(args.get("delay", 0))
    produced = 0
    try:
        for i in range(int(args.get("to", 3))):
            if delay:
                time.sleep(delay)
            produced += 1
            _note(args.get("progress"), str(produced))
            yield {"i": i, "pad": pad} if pad else {"i": i}
    finally:
        _note(args.get("closed"), f"closed after {produced}")


@handler
async def acount(args: Dict[str, Any]) -> AsyncIterator[Dict[str, Any]]:
    """``count`` as an async generator (awaits between chunks)."""
    import asyncio

    for i in range(int(args.get("to", 3))):
        await asyncio.sleep(float(args.get("delay", 0)))
        yield {"i": i}


@handler
def count_then_fail(args: Dict[str, Any]) -> Iterator[int]:
    """Stream 0 … ``n`` - 1, then raise ValueError."""
    yield from range(int(args.get("n", 2)))
    raise ValueError("the stream broke")


@handler
def count_then_object(args: Dict[str, Any]) -> Iterator[Any]:
    """Stream 1, then something JSON cannot hold."""
    yield 1
    yield object()


@handler
def stubborn_stream(args: Dict[str, Any], ctx: Context) -> Iterator[Any]:
    """Stream one chunk (with the pid), then hang in it: a cancel is never seen. The file
    ``hanging`` (when given) is written as the hang begins, once the worker has looked
    for a cancel after the chunk."""
    yield {"pid": os.getpid(), "request_id": ctx.request_id}
    _note(args.get("hanging"), "hanging")
    time.sleep(3600)
    yield None
