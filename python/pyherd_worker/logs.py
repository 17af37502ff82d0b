"""Log lines of a worker name the worker and the call it is running: ``[w1 r=17]``.

Every ``logging`` record made in the worker (``ctx.log``, the root logger, any library's
logger) carries ``worker_id`` and ``request_id`` attributes, set by a record factory, so
any format can use them; the worker's own format puts them before the message. Outside
a call ``request_id`` is ``-``.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Callable

FORMAT = "%(levelname)s %(name)s [%(worker_id)s r=%(request_id)s] %(message)s"

_worker_id = "-"
_request_id: Any = "-"


def install(worker_id: str) -> None:
    """Tag every record with this worker's id and the current call's request id, and log
    to stderr (which the host captures) in ``FORMAT`` unless logging is already set up."""
    global _worker_id
    _worker_id = worker_id
    previous: Callable[..., logging.LogRecord] = logging.getLogRecordFactory()
    if not getattr(previous, "_pyherd", False):

        def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
            record = previous(*args, **kwargs)
            record.worker_id = _worker_id
            record.request_id = _request_id
            return record

        factory._pyherd = True  # type: ignore[attr-defined]
        logging.setLogRecordFactory(factory)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format=FORMAT)


def running(request_id: Any) -> Any:
    """From now on records carry ``request_id`` (the call now running); returns the one
    they carried before, for ``running`` to restore when the call ends."""
    global _request_id
    outer, _request_id = _request_id, request_id
    return outer


class call:
    """Within ``with call(request_id):``, records carry that request id."""

    __slots__ = ("request_id", "outer")

    def __init__(self, request_id: Any) -> None:
        self.request_id = request_id
        self.outer: Any = "-"

    def __enter__(self) -> None:
        self.outer = running(self.request_id)

    def __exit__(self, *exc: Any) -> None:
        running(self.outer)
