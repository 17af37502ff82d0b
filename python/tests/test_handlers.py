"""Registration, calling conventions, module loading and the built-ins."""

import os
import sys
import uuid

import pytest

from pyherd_worker import handler, handlers


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def ctx(**overrides):
    fields = dict(worker_id="w9", session_id=None, request_id=1, deadline=None, log=None)
    fields.update(overrides)
    return handlers.Context(**fields)


def test_a_handler_registers_under_its_name_or_a_given_one():
    name = unique("named")

    @handler
    def plain(args, ctx):
        return "plain"

    @handler(name)
    def other(args):
        return "other"

    registry = handlers.registry()
    assert registry["plain"].func is plain
    assert registry[name].func is other
    assert registry["plain"].takes_ctx and not registry[name].takes_ctx
    assert handlers.invoke(registry[name], {}, ctx()) == "other"


@pytest.mark.parametrize("params", ["", "a, b, c"])
def test_a_handler_must_take_args_or_args_and_ctx(params):
    namespace = {}
    exec(f"def bad({params}):\n    return None", namespace)
    with pytest.raises(TypeError, match="must take"):
        handler(unique("bad"))(namespace["bad"])


def test_async_handlers_run_to_completion():
    name = unique("async")

    @handler(name)
    async def waits(args, ctx):
        import asyncio

        await asyncio.sleep(0)
        return {"got": args, "worker": ctx.worker_id}

    assert handlers.invoke(handlers.registry()[name], [1], ctx()) == {"got": [1], "worker": "w9"}


def test_remaining_counts_down_to_the_deadline():
    import time

    assert ctx().remaining() is None
    left = ctx(deadline=time.time() + 5).remaining()
    assert 4 < left <= 5


def test_handler_files_and_modules_load(tmp_path):
    name = unique("from_file")
    path = tmp_path / f"{name}.py"
    helper = tmp_path / "sibling_helper.py"
    helper.write_text("VALUE = 'sibling'\n")
    path.write_text(
        "from pyherd_worker import handler\n"
        "import sibling_helper\n"
        f"@handler('{name}')\n"
        "def h(args):\n"
        "    return sibling_helper.VALUE\n"
    )
    handlers.load(str(path))
    assert handlers.invoke(handlers.registry()[name], {}, ctx()) == "sibling"

    module = unique("dotted_mod")
    pkg = tmp_path / "pkgdir"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / f"{module}.py").write_text(
        f"from pyherd_worker import handler\n@handler('{module}')\ndef h(args):\n    return 'dotted'\n"
    )
    sys.path.insert(0, str(tmp_path))
    try:
        handlers.load(f"pkgdir.{module}")
    finally:
        sys.path.remove(str(tmp_path))
    assert handlers.invoke(handlers.registry()[module], {}, ctx()) == "dotted"


def test_loading_something_missing_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        handlers.load(str(tmp_path / "missing.py"))
    with pytest.raises(ModuleNotFoundError):
        handlers.load("no_such_module_for_pyherd")


def test_builtins_answer_with_their_documented_shapes():
    registry = handlers.registry()
    c = ctx(worker_id="w3")
    assert handlers.invoke(registry["ping"], {}, c) == {"pong": True, "worker_id": "w3", "pid": os.getpid()}
    assert handlers.invoke(registry["echo"], {"a": [1]}, c) == {"a": [1]}
    info = handlers.invoke(registry["info"], {}, c)
    assert info["pid"] == os.getpid() and info["worker_id"] == "w3"
    assert info["rss_bytes"] > 1 << 20
    assert info["python"] == sys.version.split()[0]
    assert {"ping", "echo", "info"} <= set(info["handlers"])
    assert info["json"] in ("json", "orjson") and info["uptime_s"] >= 0
