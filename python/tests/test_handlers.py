"""Registration, calling conventions, module loading and the built-ins.

The registry is global to the process: every handler a test registers has a name
no other test uses.
"""

import logging
import os
import sys
import time
import uuid

import pytest

import pyherd_worker
from pyherd_worker import handler, handlers


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def ctx(**overrides):
    fields = dict(worker_id="w9", session_id=None, request_id=1, deadline=None, log=logging.getLogger("t"))
    fields.update(overrides)
    return handlers.Context(**fields)


def call(name, args=None, c=None):
    return handlers.invoke(handlers.registry()[name], args if args is not None else {}, c or ctx())


@pytest.fixture
def restore_sys_path(monkeypatch):
    """load() puts a handler file's directory on sys.path: undo that after the test."""
    monkeypatch.setattr(sys, "path", list(sys.path))


def test_the_package_exports_the_decorator_and_the_context():
    assert pyherd_worker.handler is handler
    assert pyherd_worker.Context is handlers.Context
    assert pyherd_worker.PROTOCOL_VERSION == 1


def test_a_bare_decorator_registers_under_the_function_name():
    @handler
    def th_bare_decorator_target(args, ctx):
        return ["bare", args, ctx.worker_id]

    registered = handlers.registry()["th_bare_decorator_target"]
    assert registered.name == "th_bare_decorator_target"
    assert registered.func is th_bare_decorator_target  # the decorator returns the function itself
    assert registered.takes_ctx and not registered.is_async
    assert call("th_bare_decorator_target", {"x": 1}) == ["bare", {"x": 1}, "w9"]


def test_a_named_decorator_registers_under_the_given_name():
    name = unique("named")

    @handler(name)
    def th_named_target(args):
        return {"other": args}

    registry = handlers.registry()
    assert registry[name].func is th_named_target
    assert "th_named_target" not in registry  # only under the given name
    assert not registry[name].takes_ctx
    assert call(name, [1, 2]) == {"other": [1, 2]}


def test_a_handler_registered_again_from_elsewhere_replaces_the_first_with_a_warning(caplog):
    name = unique("twice")

    @handler(name)
    def first(args):
        return 1

    @handler(name)
    def second(args):
        return 2

    assert call(name) == 2
    warned = [r.getMessage() for r in caplog.records if r.name == "pyherd.worker"]
    assert warned == [
        f"handler {name!r} from {__name__}.{second.__qualname__} replaces the one from "
        f"{__name__}.{first.__qualname__} (the module loaded last wins)"
    ]


def test_a_callable_object_registered_again_is_named_by_its_type(caplog):
    import functools

    name = unique("partial")

    def scaled(args, factor=1):
        return args * factor

    handlers._register(name, scaled)
    handlers._register(name, functools.partial(scaled, factor=3))
    assert call(name, 2) == 6
    warned = [r.getMessage() for r in caplog.records if r.name == "pyherd.worker"]
    assert warned == [
        f"handler {name!r} from functools.partial replaces the one from "
        f"{__name__}.{scaled.__qualname__} (the module loaded last wins)"
    ]


def test_handlers_get_args_alone_or_args_and_the_context():
    seen = []
    one, two = unique("one"), unique("two")

    @handler(one)
    def takes_args(args):
        seen.append(("one", args))
        return 1

    @handler(two)
    def takes_args_and_ctx(args, ctx):
        seen.append(("two", args, ctx))
        return 2

    c = ctx(worker_id="w4", session_id="s4", request_id=44)
    assert call(one, {"a": 1}, c) == 1
    assert call(two, {"b": 2}, c) == 2
    assert seen == [("one", {"a": 1}), ("two", {"b": 2}, c)]


def test_keyword_only_and_star_parameters_do_not_count():
    name = unique("kwonly")

    @handler(name)
    def with_extras(args, *rest, flag=True, **options):
        return {"args": args, "rest": rest, "flag": flag}

    assert not handlers.registry()[name].takes_ctx
    assert call(name, 5) == {"args": 5, "rest": (), "flag": True}


@pytest.mark.parametrize("params", ["", "a, b, c", "*args", "args, ctx, extra=None"])
def test_a_handler_must_take_args_or_args_and_ctx(params):
    name = unique("bad")
    namespace = {}
    exec(f"def bad({params}):\n    return None", namespace)
    with pytest.raises(TypeError, match="must take"):
        handler(name)(namespace["bad"])
    with pytest.raises(TypeError, match="must take"):
        handler(namespace["bad"])
    assert name not in handlers.registry()


def test_async_handlers_run_to_completion():
    with_ctx, without_ctx = unique("async_ctx"), unique("async")

    @handler(with_ctx)
    async def waits(args, ctx):
        import asyncio

        await asyncio.sleep(0.001)
        return {"got": args, "worker": ctx.worker_id}

    @handler(without_ctx)
    async def waits_less(args):
        return args * 2

    assert handlers.registry()[with_ctx].is_async
    assert call(with_ctx, [1]) == {"got": [1], "worker": "w9"}
    # Several calls in a row reuse the worker's event loop.
    assert [call(without_ctx, i) for i in range(3)] == [0, 2, 4]
    assert call(with_ctx, "again") == {"got": "again", "worker": "w9"}


def test_an_async_handler_failure_raises_its_exception():
    name = unique("async_fail")

    @handler(name)
    async def fails(args):
        raise LookupError("async failure")

    with pytest.raises(LookupError, match="async failure"):
        call(name)
    assert call("echo", "still fine") == "still fine"


def test_remaining_counts_down_to_the_deadline():
    assert ctx().remaining() is None
    left = ctx(deadline=time.time() + 5).remaining()
    assert 4 < left <= 5
    assert ctx(deadline=time.time() - 1).remaining() < 0


def test_a_handler_file_loads_by_path_and_can_import_its_siblings(tmp_path, restore_sys_path):
    name = unique("from_file")
    sibling = unique("sibling_helper")
    (tmp_path / f"{sibling}.py").write_text("VALUE = 'sibling'\n")
    path = tmp_path / f"{name}.py"
    path.write_text(
        "from pyherd_worker import handler\n"
        f"import {sibling}\n"
        f"@handler('{name}')\n"
        "def h(args, ctx):\n"
        f"    return [{sibling}.VALUE, ctx.request_id]\n"
    )
    handlers.load(str(path))
    assert call(name, c=ctx(request_id=12)) == ["sibling", 12]


def test_a_relative_handler_file_path_loads(tmp_path, restore_sys_path, monkeypatch):
    name = unique("relative")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / f"{name}.py").write_text(
        f"from pyherd_worker import handler\n@handler('{name}')\ndef h(args):\n    return 'relative'\n"
    )
    monkeypatch.chdir(tmp_path)
    handlers.load(os.path.join("sub", f"{name}.py"))
    assert call(name) == "relative"


def test_a_handler_module_loads_by_dotted_name(tmp_path, monkeypatch):
    package, module = unique("pkgdir"), unique("dotted_mod")
    (tmp_path / package).mkdir()
    (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / package / f"{module}.py").write_text(
        f"from pyherd_worker import handler\n@handler('{module}')\ndef h(args):\n    return 'dotted'\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    handlers.load(f"{package}.{module}")
    assert call(module) == "dotted"
    assert f"{package}.{module}" in sys.modules


def test_the_testing_module_loads_by_name():
    handlers.load("pyherd_worker.testing")
    assert {"sleep", "crash", "spam_stdout", "async_echo", "ctx_info"} <= set(handlers.registry())
    assert call("async_echo", {"k": 1}) == {"k": 1}


def test_the_leak_handler_keeps_what_it_allocated():
    handlers.load("pyherd_worker.testing")
    first = call("leak", {"mb": 1})["held_mb"]
    assert call("leak", {"mb": 2})["held_mb"] == first + 2


def test_loading_something_missing_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        handlers.load(str(tmp_path / "missing.py"))
    with pytest.raises(FileNotFoundError):
        handlers.load("missing_relative_file.py")
    with pytest.raises(ModuleNotFoundError):
        handlers.load(unique("no_such_module_for_pyherd"))


def test_a_handler_file_that_raises_at_import_raises_from_load(tmp_path, restore_sys_path):
    path = tmp_path / f"{unique('broken')}.py"
    path.write_text("raise RuntimeError('cannot start here')\n")
    with pytest.raises(RuntimeError, match="cannot start here"):
        handlers.load(str(path))


def test_an_empty_handler_name_is_refused():
    with pytest.raises(ValueError, match="empty"):
        handler("")(lambda args: None)


def test_a_handler_file_named_like_an_imported_module_is_refused(tmp_path, restore_sys_path):
    shadow = tmp_path / "json.py"
    shadow.write_text("raise AssertionError('must not run')\n")
    with pytest.raises(ImportError, match="rename the file"):
        handlers.load(str(shadow))
    import json

    assert json.dumps([1]) == "[1]"  # the real module is untouched


def test_ping_answers_pong_with_the_worker_id_and_pid():
    assert call("ping", {}, ctx(worker_id="w3")) == {"pong": True, "worker_id": "w3", "pid": os.getpid()}


@pytest.mark.parametrize("args", [{"a": [1, {"b": None}]}, [], "text", 3.5, None])
def test_echo_returns_its_args(args):
    assert handlers.invoke(handlers.registry()["echo"], args, ctx()) == args


def test_info_describes_the_worker():
    info = call("info", {}, ctx(worker_id="w3"))
    assert {"pid", "rss_bytes", "python", "handlers", "json", "uptime_s"} <= set(info)
    assert info["pid"] == os.getpid() and info["worker_id"] == "w3"
    assert isinstance(info["rss_bytes"], int) and info["rss_bytes"] > 1 << 20
    assert info["python"] == sys.version.split()[0]
    assert info["handlers"] == sorted(handlers.registry())
    assert {"ping", "echo", "info"} <= set(info["handlers"])
    assert info["json"] in ("json", "orjson")
    assert isinstance(info["uptime_s"], (int, float)) and info["uptime_s"] >= 0


def test_declared_adapters_are_listed_once_and_sorted(monkeypatch):
    monkeypatch.setattr(handlers, "_ADAPTERS", set())
    assert handlers.adapters() == []
    handlers.declare_adapter("zeta")
    handlers.declare_adapter("alpha")
    handlers.declare_adapter("zeta")
    assert handlers.adapters() == ["alpha", "zeta"]
