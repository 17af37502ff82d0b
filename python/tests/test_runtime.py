"""The worker loop over in-memory streams: replies, errors, and the worker surviving them.

Every test runs with both codecs.
"""

import copy
import io
import json
import os
import pickle
import sys
import time

import pytest

from pyherd_worker import PROTOCOL_VERSION, HandlerError, handler, handlers, protocol, runtime
from worker_pipe import Pipe

CODECS = ["stdlib", "orjson"]


class CustomError(Exception):
    pass


class UnprintableError(Exception):
    def __str__(self):
        raise RuntimeError("__str__ is broken too")


@handler("rt_fail")
def _fail(args):
    raise KeyError("missing thing")


@handler("rt_custom_fail")
def _custom_fail(args):
    raise CustomError("custom failure")


@handler("rt_empty_fail")
def _empty_fail(args):
    raise ValueError()


@handler("rt_long_fail")
def _long_fail(args):
    raise ValueError("start " + "m" * 50_000 + " end-of-message")


@handler("rt_surrogate_fail")
def _surrogate_fail(args):
    # What a surrogateescape'd file name from os.listdir() looks like in a message.
    raise ValueError("cannot read b'\udcff.txt'")


@handler("rt_unprintable_fail")
def _unprintable_fail(args):
    raise UnprintableError()


class Halt(BaseException):
    pass


class ExitingStrError(Exception):
    def __str__(self):
        raise SystemExit(3)


BASE_EXCEPTIONS = {
    "system_exit": SystemExit(0),
    "keyboard_interrupt": KeyboardInterrupt(),
    "generator_exit": GeneratorExit(),
    "custom": Halt("halted"),
}


@handler("rt_base_fail")
def _base_fail(args):
    raise BASE_EXCEPTIONS[args["which"]]


@handler("rt_exiting_str_fail")
def _exiting_str_fail(args):
    raise ExitingStrError()


@handler("rt_retryable_fail")
def _retryable_fail(args):
    raise HandlerError("connection", "upstream_away", "the upstream is restarting", retryable=True)


@handler("rt_typed_fail")
def _typed_fail(args):
    raise HandlerError("invalid_request", "invalid_signature", "no '->' in 'q a'")


@handler("rt_ctx")
def _ctx(args, ctx):
    return {
        "worker": ctx.worker_id,
        "session": ctx.session_id,
        "request": ctx.request_id,
        "deadline": ctx.deadline,
        "has_log": hasattr(ctx.log, "info"),
    }


@handler("rt_set")
def _set(args):
    return {1, 2}


@handler("rt_surrogate_result")
def _surrogate_result(args):
    return "\udcff"


@handler("rt_cycle")
def _cycle(args):
    cycle = []
    cycle.append(cycle)
    return cycle


@handler("rt_deep")
def _deep(args):
    value = []
    for _ in range(100_000):
        value = [value]
    return value


SHARED = {"inner": [1, 2], "bad": None}


@handler("rt_shared")
def _shared(args):
    """Returns the same object every time; with args["bad"], one that cannot be encoded."""
    SHARED["bad"] = {1} if args.get("bad") else None
    return SHARED


@handler("rt_big")
def _big(args):
    return "x" * args["n"]


@handler("rt_args")
def _args(args):
    return {"args": args}


LIMIT = 4096


@pytest.fixture(params=CODECS)
def codec(request):
    return protocol.select_codec(request.param)


@pytest.fixture
def worker(codec):
    return runtime.Worker(io.BytesIO(), io.BytesIO(), "w1", LIMIT, codec)


def call(worker, cmd, args=None, request_id=7, **extra):
    msg = {"t": "call", "id": request_id, "cmd": cmd, "args": args if args is not None else {}}
    msg.update(extra)
    body = worker.reply_body(msg)
    assert isinstance(body, bytes)
    return json.loads(body.decode("utf-8"))


def assert_alive(worker):
    assert call(worker, "echo", {"still": "alive"}, request_id=99) == {"t": "ok", "id": 99, "result": {"still": "alive"}}


# --- ok ---------------------------------------------------------------------


def test_a_call_is_answered_with_ok_and_its_id(worker):
    assert call(worker, "echo", {"a": "é"}) == {"t": "ok", "id": 7, "result": {"a": "é"}}
    assert call(worker, "echo", [1], request_id=2**53) == {"t": "ok", "id": 2**53, "result": [1]}


def test_the_reply_body_is_compact_utf8(worker):
    assert worker.reply_body({"t": "call", "id": 1, "cmd": "echo", "args": {"k": "漢"}}) == (
        '{"t":"ok","id":1,"result":{"k":"漢"}}'.encode("utf-8")
    )


def test_a_call_without_args_gets_none(worker):
    body = worker.reply_body({"t": "call", "id": 4, "cmd": "rt_args"})
    assert json.loads(body) == {"t": "ok", "id": 4, "result": {"args": None}}


def test_a_success_never_carries_an_error(worker):
    reply = call(worker, "echo", {"category": "x"})
    assert set(reply) == {"t", "id", "result"}


# --- errors -----------------------------------------------------------------


@pytest.mark.parametrize("cmd", ["nope", "", None, 12, ["echo"]])
def test_an_unknown_command_is_an_invalid_request(worker, cmd):
    reply = call(worker, cmd, request_id=8)
    assert (reply["t"], reply["id"], reply["category"], reply["kind"]) == (
        "err", 8, "invalid_request", "unknown_command")
    assert repr(cmd) in reply["message"]
    assert "echo" in reply["message"] and "ping" in reply["message"]  # the known handlers
    assert_alive(worker)


def test_an_exception_carries_type_message_and_traceback(worker):
    reply = call(worker, "rt_fail", request_id=11)
    assert (reply["t"], reply["id"], reply["category"], reply["kind"]) == ("err", 11, "python", "python_exception")
    assert reply["python_type"] == "KeyError"
    assert "missing thing" in reply["message"]
    tb = reply["traceback"]
    assert tb.startswith("Traceback (most recent call last)")
    assert "_fail" in tb and 'raise KeyError("missing thing")' in tb
    assert tb.rstrip().endswith("KeyError: 'missing thing'")
    assert "result" not in reply
    assert_alive(worker)


def test_a_handler_error_carries_its_own_category_and_kind(worker):
    reply = call(worker, "rt_typed_fail", request_id=12)
    assert (reply["t"], reply["id"], reply["category"], reply["kind"]) == (
        "err", 12, "invalid_request", "invalid_signature")
    assert reply["message"] == "no '->' in 'q a'"
    assert reply["python_type"] == "pyherd_worker.handlers.HandlerError"
    assert "_typed_fail" in reply["traceback"]
    assert reply["retryable"] is False
    assert_alive(worker)


def test_a_handler_error_can_say_it_is_retryable(worker):
    reply = call(worker, "rt_retryable_fail", request_id=13)
    assert (reply["category"], reply["kind"], reply["retryable"]) == ("connection", "upstream_away", True)
    reply = call(worker, "rt_fail", request_id=14)
    assert reply["retryable"] is False
    assert_alive(worker)


@pytest.mark.parametrize("retryable", [1, "yes", None])
def test_retryable_must_be_a_bool(retryable):
    with pytest.raises(ValueError):
        HandlerError("connection", "upstream_away", "message", retryable)


@pytest.mark.parametrize(
    "category, kind",
    [
        ("nonsense", "x"),
        ("Python", "x"),
        (None, "x"),
        (["python"], "x"),
        ("python", ""),
        ("python", "Not Snake"),
        ("python", "CamelCase"),
        ("python", "a-b"),
        ("python", "_leading"),
        ("python", "trailing_"),
        ("python", "double__underscore"),
        ("python", "9lives"),
        ("python", "caf\u00e9"),
        ("python", None),
    ],
)
def test_a_handler_error_must_name_a_known_category_and_a_snake_case_kind(category, kind):
    with pytest.raises(ValueError):
        HandlerError(category, kind, "message")


@pytest.mark.parametrize("category", sorted(handlers.CATEGORIES))
def test_every_host_category_is_accepted(category):
    e = HandlerError(category, "kind_2", "message")
    assert (e.category, e.kind, str(e)) == (category, "kind_2", "message")


def test_a_handler_error_survives_pickle_and_copy():
    e = HandlerError("python", "lm_error", "the LM failed", retryable=True)
    for twin in (pickle.loads(pickle.dumps(e)), copy.copy(e), copy.deepcopy(e)):
        assert type(twin) is HandlerError
        assert (twin.category, twin.kind, str(twin), twin.retryable) == ("python", "lm_error", "the LM failed", True)


def test_the_python_type_of_a_non_builtin_exception_names_its_module(worker):
    reply = call(worker, "rt_custom_fail")
    assert reply["python_type"] == f"{CustomError.__module__}.CustomError"
    assert reply["message"] == "custom failure"


def test_an_exception_without_a_message_is_named_by_its_type(worker):
    reply = call(worker, "rt_empty_fail")
    assert (reply["kind"], reply["message"], reply["python_type"]) == ("python_exception", "ValueError", "ValueError")


def test_a_long_message_and_traceback_are_cut(codec):
    worker = runtime.Worker(io.BytesIO(), io.BytesIO(), "w1", 1 << 20, codec)
    reply = call(worker, "rt_long_fail")
    tb = reply["traceback"]
    assert len(tb) <= runtime.TRACEBACK_LIMIT + 1
    assert tb.startswith("…") and tb.rstrip().endswith("end-of-message")
    message = reply["message"]
    assert message.startswith("start mmm")
    assert message.endswith(f"… ({50_000 + 21 - runtime.MESSAGE_LIMIT} more characters)")
    assert len(message) < runtime.MESSAGE_LIMIT + 40
    assert_alive(worker)


def test_an_error_too_large_for_a_frame_is_cut_to_fit_and_the_worker_goes_on(worker):
    # LIMIT is 4 KiB: the 16 KiB message and its traceback cannot both fit.
    body = worker.reply_body({"t": "call", "id": 7, "cmd": "rt_long_fail", "args": {}})
    assert len(body) <= LIMIT
    reply = json.loads(body)
    assert (reply["t"], reply["kind"], reply["python_type"]) == ("err", "python_exception", "ValueError")
    assert "traceback" not in reply
    assert reply["message"].startswith("start mmm")
    assert reply["message"].endswith("… (cut to fit the frame limit)")
    assert_alive(worker)


@pytest.mark.parametrize("limit", [1024, 1500, 4096])
def test_an_error_frame_always_fits_the_smallest_frame_limit(codec, limit):
    worker = runtime.Worker(io.BytesIO(), io.BytesIO(), "w1", limit, codec)
    body = worker.error_body(runtime.error_frame(7, "python", "python_exception", "ü" * 100_000, traceback="t" * 10))
    assert len(body) <= limit
    assert json.loads(body)["message"].endswith("… (cut to fit the frame limit)")


@pytest.mark.parametrize("which", sorted(BASE_EXCEPTIONS))
def test_a_base_exception_from_a_handler_fails_only_the_call(worker, which):
    reply = call(worker, "rt_base_fail", {"which": which})
    exc = BASE_EXCEPTIONS[which]
    assert (reply["t"], reply["category"], reply["kind"]) == ("err", "python", "python_exception")
    assert reply["python_type"] == runtime._python_type(exc)
    assert reply["message"] == (str(exc) or type(exc).__name__)
    assert_alive(worker)


def test_an_exception_whose_str_exits_is_still_reported(worker):
    reply = call(worker, "rt_exiting_str_fail")
    assert (reply["kind"], reply["message"]) == ("python_exception", "ExitingStrError")
    assert_alive(worker)


def test_an_exception_message_with_a_lone_surrogate_is_still_reported(worker):
    reply = call(worker, "rt_surrogate_fail")
    assert (reply["t"], reply["category"], reply["kind"]) == ("err", "python", "python_exception")
    assert reply["message"] == "cannot read b'\\udcff.txt'"
    assert "\\udcff.txt" in reply["traceback"]
    assert_alive(worker)


def test_an_exception_whose_str_fails_is_still_reported(worker):
    reply = call(worker, "rt_unprintable_fail")
    assert (reply["kind"], reply["python_type"]) == ("python_exception", f"{__name__}.UnprintableError")
    assert reply["message"] == "UnprintableError"
    assert "_unprintable_fail" in reply["traceback"]
    assert_alive(worker)


@pytest.mark.parametrize("cmd", ["rt_set", "rt_cycle", "rt_deep", "rt_surrogate_result"])
def test_an_unserialisable_result_is_an_error_and_the_worker_goes_on(worker, cmd):
    reply = call(worker, cmd, request_id=12)
    assert (reply["t"], reply["id"], reply["category"], reply["kind"]) == (
        "err", 12, "python", "result_not_serializable")
    assert cmd in reply["message"] and reply["python_type"]
    assert "result" not in reply
    assert_alive(worker)


def test_a_failed_encoding_does_not_poison_the_next_reply_with_the_same_object(worker):
    assert call(worker, "rt_shared", {"bad": True})["kind"] == "result_not_serializable"
    for _ in range(2):
        assert call(worker, "rt_shared", {"bad": False}) == {
            "t": "ok", "id": 7, "result": {"inner": [1, 2], "bad": None}}


def test_a_result_over_the_frame_limit_is_refused_and_the_worker_goes_on(worker):
    reply = call(worker, "rt_big", {"n": 10_000}, request_id=13)
    assert (reply["t"], reply["id"], reply["category"], reply["kind"]) == (
        "err", 13, "resource", "result_too_large")
    assert str(LIMIT) in reply["message"]
    assert call(worker, "rt_big", {"n": 100})["result"] == "x" * 100


def test_the_frame_limit_is_inclusive(codec):
    overhead = len(b'{"t":"ok","id":7,"result":""}')
    worker = runtime.Worker(io.BytesIO(), io.BytesIO(), "w1", 1000, codec)
    assert call(worker, "rt_big", {"n": 1000 - overhead})["t"] == "ok"
    assert call(worker, "rt_big", {"n": 1001 - overhead})["kind"] == "result_too_large"


# --- context ----------------------------------------------------------------


def test_the_context_reaches_the_handler(worker):
    reply = call(worker, "rt_ctx", request_id=21, rid="req-21", session_id="s1", deadline_ms=1_700_000_000_500)
    assert reply["result"] == {
        "worker": "w1", "session": "s1", "request": "req-21", "deadline": 1_700_000_000.5, "has_log": True}
    # Without the host's request id, the frame id stands in for it (as text).
    bare = call(worker, "rt_ctx", request_id=22)["result"]
    assert (bare["session"], bare["deadline"], bare["request"]) == (None, None, "22")


def test_remaining_reflects_the_deadline_sent_by_the_host(worker):
    import time

    handlers.load("pyherd_worker.testing")
    deadline_ms = int(time.time() * 1000) + 10_000
    result = call(worker, "ctx_info", deadline_ms=deadline_ms)["result"]
    assert result["deadline"] == deadline_ms / 1000
    assert 5 < result["remaining"] <= 10


# --- hello and serve --------------------------------------------------------


def read_all(stream):
    stream.seek(0)
    frames = []
    while (body := protocol.read_frame(stream)) is not None:
        frames.append(json.loads(body))
    return frames


def requests_of(codec, *messages):
    _, dumps, _ = codec
    stream = io.BytesIO()
    for msg in messages:
        protocol.write_frame(stream, dumps(msg))
    stream.seek(0)
    return stream


def test_hello_introduces_the_worker(codec):
    replies = io.BytesIO()
    runtime.Worker(io.BytesIO(), replies, "w-hello", 1 << 20, codec).hello()
    [hello] = read_all(replies)
    assert hello == {
        "t": "hello",
        "id": 0,
        "protocol": PROTOCOL_VERSION,
        "pid": os.getpid(),
        "worker_id": "w-hello",
        "handlers": sorted(handlers.registry()),
        "adapters": handlers.adapters(),
        "python": sys.version.split()[0],
        "json": codec[0],
    }
    assert runtime.codec_name() == codec[0]


@pytest.mark.parametrize("declared, announced", [([], []), (["zeta", "dspy", "zeta"], ["dspy", "zeta"])])
def test_hello_announces_the_declared_adapters(codec, monkeypatch, declared, announced):
    monkeypatch.setattr(handlers, "_ADAPTERS", set())
    for name in declared:
        handlers.declare_adapter(name)
    replies = io.BytesIO()
    runtime.Worker(io.BytesIO(), replies, "w-hello", 1 << 20, codec).hello()
    [hello] = read_all(replies)
    assert hello["adapters"] == announced


def test_serve_answers_frames_in_order_and_returns_at_end_of_stream(codec):
    requests = requests_of(codec, *({"t": "call", "id": i, "cmd": "echo", "args": {"n": i}} for i in range(1, 6)))
    replies = io.BytesIO()
    assert runtime.Worker(requests, replies, "w1", 1 << 20, codec).serve() is None
    assert read_all(replies) == [{"t": "ok", "id": i, "result": {"n": i}} for i in range(1, 6)]


def test_serve_goes_on_after_failing_calls(codec):
    requests = requests_of(
        codec,
        {"t": "call", "id": 1, "cmd": "rt_fail", "args": {}},
        {"t": "call", "id": 2, "cmd": "no_such_cmd", "args": {}},
        {"t": "call", "id": 3, "cmd": "rt_set", "args": {}},
        {"t": "call", "id": 4, "cmd": "rt_surrogate_fail", "args": {}},
        {"t": "call", "id": 5, "cmd": "ping", "args": {}},
    )
    replies = io.BytesIO()
    runtime.Worker(requests, replies, "w1", 1 << 20, codec).serve()
    frames = read_all(replies)
    assert [(f["id"], f["t"], f.get("kind")) for f in frames] == [
        (1, "err", "python_exception"),
        (2, "err", "unknown_command"),
        (3, "err", "result_not_serializable"),
        (4, "err", "python_exception"),
        (5, "ok", None),
    ]
    assert frames[-1]["result"] == {"pong": True, "worker_id": "w1", "pid": os.getpid()}


@pytest.mark.parametrize("kind", ["surprise", "ok", "ping", None])
def test_serve_refuses_messages_that_are_not_calls(codec, kind):
    msg = {"id": 1, "cmd": "echo", "args": {}}
    if kind is not None:
        msg["t"] = kind
    requests = requests_of(codec, {"t": "call", "id": 1, "cmd": "echo", "args": 1}, msg)
    replies = io.BytesIO()
    with pytest.raises(protocol.ProtocolError, match=repr(kind)):
        runtime.Worker(requests, replies, "w1", 1 << 20, codec).serve()
    assert read_all(replies) == [{"t": "ok", "id": 1, "result": 1}]  # the call before it was answered


@pytest.mark.parametrize("body", [b"[]", b"7", b"not json", b"\xff\xfe"])
def test_serve_refuses_frames_that_are_not_json_objects(codec, body):
    requests = io.BytesIO()
    protocol.write_frame(requests, body)
    requests.seek(0)
    with pytest.raises(protocol.ProtocolError):
        runtime.Worker(requests, io.BytesIO(), "w1", 1 << 20, codec).serve()


def test_serve_raises_on_a_truncated_request(codec):
    requests = requests_of(codec, {"t": "call", "id": 1, "cmd": "echo", "args": 1})
    requests.seek(0, io.SEEK_END)
    requests.write(b"\x00\x00\x01\x00{")
    requests.seek(0)
    replies = io.BytesIO()
    with pytest.raises(protocol.ProtocolError):
        runtime.Worker(requests, replies, "w1", 1 << 20, codec).serve()
    assert read_all(replies) == [{"t": "ok", "id": 1, "result": 1}]


def test_worker_options_are_parsed_strictly():
    assert runtime._parse_args([]) == {
        "worker_id": "w0", "handlers": [], "max_frame_bytes": 64 * 1024 * 1024, "idle_spin_us": 0, "parent_pid": None,
        "run_id": None}
    opts = runtime._parse_args(
        ["--worker-id", "w5", "--handlers", "a", "--handlers", "b.py", "--max-frame-bytes", "2048", "--parent-pid", "42",
         "--run-id", "0123456789abcdef", "--idle-spin-us", "250"]
    )
    assert opts == {"worker_id": "w5", "handlers": ["a", "b.py"], "max_frame_bytes": 2048, "idle_spin_us": 250,
                    "parent_pid": 42, "run_id": "0123456789abcdef"}
    with pytest.raises(SystemExit):
        runtime._parse_args(["--bogus", "1"])
    with pytest.raises(SystemExit):
        runtime._parse_args(["--worker-id"])


@pytest.mark.parametrize("spin", ["-1", "10001", "1e3", ""])
def test_an_idle_spin_out_of_range_is_refused(spin):
    with pytest.raises((SystemExit, ValueError)):
        runtime._parse_args(["--idle-spin-us", spin])


# --- the idle spin ----------------------------------------------------------


@pytest.fixture
def spinning(codec, monkeypatch):
    """Makes a worker on a real pipe with an idle spin (the longest by default), and the
    count of the CPU yields its spins make (each calls `on_yield(count)` first, when
    given)."""
    made = []

    def make(spin_us=runtime.MAX_IDLE_SPIN_US, on_yield=None):
        yields = []

        def pause():
            yields.append(1)
            if on_yield is not None:
                on_yield(len(yields))

        monkeypatch.setattr(runtime.os, "sched_yield", pause)
        made.append(Pipe(codec, LIMIT, idle_spin_us=spin_us))
        return made[-1], yields

    yield make
    for pipe in made:
        pipe.close()


def test_a_frame_already_read_ahead_ends_the_spin_at_once(spinning):
    pipe, yields = spinning()
    pipe.send({"t": "call", "id": 1, "cmd": "echo"}, {"t": "call", "id": 2, "cmd": "echo"})
    assert json.loads(protocol.read_frame(pipe.requests))["id"] == 1  # the second is now in the reader's buffer
    pipe.worker.await_call()
    assert yields == []
    assert json.loads(protocol.read_frame(pipe.requests))["id"] == 2
    assert os.get_blocking(pipe.requests.fileno())


def test_a_frame_that_comes_during_the_spin_ends_it(spinning):
    pipe, yields = spinning(on_yield=lambda n: n == 3 and pipe.send({"t": "call", "id": 5}))
    pipe.worker.await_call()
    assert len(yields) == 3
    assert json.loads(protocol.read_frame(pipe.requests))["id"] == 5
    assert os.get_blocking(pipe.requests.fileno())


def test_with_nothing_to_read_the_spin_lasts_its_time_then_the_read_blocks(spinning):
    pipe, yields = spinning(spin_us=2000)
    started = time.perf_counter()
    pipe.worker.await_call()
    assert time.perf_counter() - started >= 0.002
    assert yields  # it gave the CPU away while it waited
    assert os.get_blocking(pipe.requests.fileno())


def test_a_closed_pipe_ends_the_spin_and_the_serve_loop(spinning):
    pipe, _ = spinning()
    pipe.send({"t": "call", "id": 1, "cmd": "echo", "args": "x"})
    pipe.close_writer()
    assert pipe.worker.serve() is None
    assert pipe.frames() == [{"t": "ok", "id": 1, "result": "x"}]


def test_without_a_spin_the_worker_never_polls(spinning):
    pipe, yields = spinning(spin_us=0)
    pipe.send({"t": "call", "id": 1, "cmd": "echo", "args": 1})
    pipe.close_writer()
    pipe.worker.serve()
    assert yields == []
    assert pipe.frames() == [{"t": "ok", "id": 1, "result": 1}]
