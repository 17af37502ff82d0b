"""Handler registration, the call context, built-in handlers and module loading."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
import os
import re
import sys
import time
import types
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Set, Union

Func = Callable[..., Any]


@dataclass(frozen=True)
class Handler:
    """A registered handler: the function and how to call it."""

    name: str
    func: Func
    takes_ctx: bool
    is_async: bool


class Context:
    """What a handler knows about its call."""

    __slots__ = ("worker_id", "session_id", "request_id", "deadline", "log")

    def __init__(
        self,
        worker_id: str,
        session_id: Optional[str],
        request_id: str,
        deadline: Optional[float],
        log: logging.Logger,
    ) -> None:
        self.worker_id = worker_id
        self.session_id = session_id
        #: The caller's request id (``X-Request-Id`` over HTTP, or one the host made).
        self.request_id = request_id
        #: Wall-clock time (``time.time()`` seconds) at which the host gives up on this call.
        self.deadline = deadline
        self.log = log

    def remaining(self) -> Optional[float]:
        """Seconds left before the deadline (negative once passed), or None without one."""
        if self.deadline is None:
            return None
        return self.deadline - time.time()


#: The error categories of the host (DESIGN §7); a HandlerError must name one of them.
CATEGORIES = frozenset(
    {
        "initialization",
        "connection",
        "communication",
        "timeout",
        "resource",
        "health_check",
        "session",
        "python",
        "system",
        "invalid_request",
    }
)


#: What an error kind looks like: snake_case ASCII, e.g. ``invalid_signature``.
_KIND = re.compile(r"[a-z][a-z0-9]*(?:_[a-z0-9]+)*")


class HandlerError(Exception):
    """An error a handler raises on purpose, with the category and kind the caller sees
    (instead of ``python/python_exception``)::

        raise HandlerError("invalid_request", "invalid_signature", "no '->' in 'q a'")

    The category must be one of the host's (`CATEGORIES`) and the kind snake_case;
    anything else is a ValueError here, where the mistake is made. ``retryable=True``
    says trying again can succeed (an upstream that is briefly away, say): the host then
    retries idempotent calls, on another worker when there is one.
    """

    def __init__(self, category: str, kind: str, message: str, retryable: bool = False) -> None:
        if not isinstance(category, str) or category not in CATEGORIES:
            raise ValueError(f"unknown error category {category!r} (one of {', '.join(sorted(CATEGORIES))})")
        if not isinstance(kind, str) or not _KIND.fullmatch(kind):
            raise ValueError(f"an error kind is snake_case, like 'invalid_signature', not {kind!r}")
        if not isinstance(retryable, bool):
            raise ValueError(f"retryable is True or False, not {retryable!r}")
        super().__init__(message)
        self.category = category
        self.kind = kind
        self.retryable = retryable

    def __reduce__(self) -> Any:
        # Exception pickles as cls(*self.args), which would lose the category and kind.
        return (type(self), (self.category, self.kind, str(self), self.retryable))


_REGISTRY: Dict[str, Handler] = {}
_ADAPTERS: Set[str] = set()


def declare_adapter(name: str) -> None:
    """Announce an adapter (e.g. ``dspy``) in the worker's hello, so the host serves its
    session commands."""
    _ADAPTERS.add(name)


def adapters() -> List[str]:
    """The adapters declared so far, sorted."""
    return sorted(_ADAPTERS)


def _register(name: str, func: Func) -> Func:
    if not name:
        raise ValueError("a handler name must not be empty")
    params = [
        p
        for p in inspect.signature(func).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    if not 1 <= len(params) <= 2:
        raise TypeError(f"handler {name!r} must take (args) or (args, ctx), not {len(params)} parameters")
    before = _REGISTRY.get(name)
    if before is not None and _origin(before.func) != _origin(func):
        logging.getLogger("pyherd.worker").warning(
            "handler %r from %s replaces the one from %s (the module loaded last wins)",
            name,
            _origin(func),
            _origin(before.func),
        )
    _REGISTRY[name] = Handler(name, func, len(params) == 2, inspect.iscoroutinefunction(func))
    return func


def _origin(func: Func) -> str:
    """Where a handler comes from; a callable object (a partial, an instance) may lack
    the names a function has."""
    module = getattr(func, "__module__", None) or type(func).__module__
    name = getattr(func, "__qualname__", None) or type(func).__qualname__
    return f"{module}.{name}"


def handler(arg: Union[Func, str, None] = None) -> Any:
    """Register a handler, under the function's name (``@handler``) or a given one (``@handler("name")``)."""
    if callable(arg):
        return _register(arg.__name__, arg)

    def decorate(func: Func) -> Func:
        return _register(func.__name__ if arg is None else arg, func)

    return decorate


def registry() -> Dict[str, Handler]:
    """The handlers registered so far, by name."""
    return _REGISTRY


def load(spec: str) -> None:
    """Import a handler module given as ``pkg.module`` or as a path to a ``.py`` file."""
    if spec.endswith(".py") or os.sep in spec:
        path = os.path.abspath(spec)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"handler file not found: {spec}")
        directory = os.path.dirname(path)
        if directory not in sys.path:
            sys.path.insert(0, directory)
        name = os.path.splitext(os.path.basename(path))[0]
        already = sys.modules.get(name)
        if already is not None and os.path.abspath(getattr(already, "__file__", "") or "") != path:
            raise ImportError(
                f"handler file {spec} is named like the module {name!r}, which is already imported; rename the file"
            )
        module_spec = importlib.util.spec_from_file_location(name, path)
        if module_spec is None or module_spec.loader is None:
            raise ImportError(f"cannot load handler file {spec}")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        module_spec.loader.exec_module(module)
    else:
        importlib.import_module(spec)


_loop: Any = None


def _event_loop() -> Any:
    """The worker's one event loop; asyncio is imported on first use only: it costs
    ~30 ms of every start."""
    global _loop
    if _loop is None:
        import asyncio

        _loop = asyncio.new_event_loop()
    return _loop


def invoke(h: Handler, args: Any, ctx: Context) -> Any:
    """Run a handler and return its result (async handlers run on one event loop per
    worker). A generator handler's generator (sync or async) is returned unstarted: see
    `is_stream` and `chunks`."""
    result = h.func(args, ctx) if h.takes_ctx else h.func(args)
    if h.is_async:
        result = _event_loop().run_until_complete(result)
    return result


#: The types of a generator handler's result (sync or async): its items are chunks.
STREAM_TYPES = frozenset({types.GeneratorType, types.AsyncGeneratorType})


def is_stream(result: Any) -> bool:
    """Whether a handler's result is a generator (sync or async) whose items are chunks."""
    return type(result) in STREAM_TYPES


def chunks(gen: Any) -> Iterator[Any]:
    """The items of a sync or async generator, one at a time; closing this iterator
    (or finishing it) closes the generator, so its ``finally`` blocks run."""
    if inspect.isasyncgen(gen):
        loop = _event_loop()
        try:
            while True:
                try:
                    yield loop.run_until_complete(gen.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            loop.run_until_complete(gen.aclose())
    else:
        try:
            yield from gen
        finally:
            gen.close()


def _rss_bytes() -> Optional[int]:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


_STARTED = time.time()


@handler("ping")
def _ping(args: Any, ctx: Context) -> Dict[str, Any]:
    return {"pong": True, "worker_id": ctx.worker_id, "pid": os.getpid()}


@handler("echo")
def _echo(args: Any) -> Any:
    return args


@handler("info")
def _info(args: Any, ctx: Context) -> Dict[str, Any]:
    from . import runtime

    handlers: List[str] = sorted(_REGISTRY)
    return {
        "worker_id": ctx.worker_id,
        "pid": os.getpid(),
        "rss_bytes": _rss_bytes(),
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "json": runtime.codec_name(),
        "idle_spin_us": runtime.idle_spin_us(),
        "handlers": handlers,
        "uptime_s": round(time.time() - _STARTED, 3),
    }
