"""The worker loop over in-memory streams: replies, errors, and the worker surviving them."""

import io
import json

import pytest

from pyherd_worker import handler, protocol, runtime


@handler("rt_fail")
def _fail(args):
    raise KeyError("missing thing")


@handler("rt_ctx")
def _ctx(args, ctx):
    return {"worker": ctx.worker_id, "session": ctx.session_id, "request": ctx.request_id, "deadline": ctx.deadline}


@handler("rt_set")
def _set(args):
    return {1, 2}


@handler("rt_big")
def _big(args):
    return "x" * args["n"]


@pytest.fixture(params=["stdlib", "orjson"])
def worker(request):
    codec = protocol.select_codec(request.param)
    return runtime.Worker(io.BytesIO(), io.BytesIO(), "w1", 4096, codec)


def call(worker, cmd, args=None, **extra):
    msg = {"t": "call", "id": 7, "cmd": cmd, "args": args if args is not None else {}}
    msg.update(extra)
    return json.loads(worker.reply_body(msg))


def test_a_call_is_answered_with_ok_and_its_id(worker):
    assert call(worker, "echo", {"a": "é"}) == {"t": "ok", "id": 7, "result": {"a": "é"}}


def test_an_unknown_command_is_an_invalid_request(worker):
    reply = call(worker, "nope")
    assert (reply["t"], reply["category"], reply["kind"]) == ("err", "invalid_request", "unknown_command")
    assert "nope" in reply["message"] and "echo" in reply["message"]


def test_an_exception_carries_type_message_and_traceback(worker):
    reply = call(worker, "rt_fail")
    assert (reply["category"], reply["kind"]) == ("python", "python_exception")
    assert reply["python_type"] == "KeyError"
    assert "missing thing" in reply["message"]
    tb = reply["traceback"]
    assert "Traceback" in tb and "_fail" in tb and "KeyError" in tb


def test_an_unserialisable_or_oversize_result_is_an_error_and_the_worker_goes_on(worker):
    reply = call(worker, "rt_set")
    assert (reply["category"], reply["kind"]) == ("python", "result_not_serializable")
    reply = call(worker, "rt_big", {"n": 10_000})
    assert (reply["category"], reply["kind"]) == ("resource", "result_too_large")
    assert call(worker, "rt_big", {"n": 100})["result"] == "x" * 100


def test_the_context_reaches_the_handler(worker):
    reply = call(worker, "rt_ctx", session_id="s1", deadline_ms=1_700_000_000_500)
    assert reply["result"] == {"worker": "w1", "session": "s1", "request": 7, "deadline": 1_700_000_000.5}
    assert call(worker, "rt_ctx")["result"]["session"] is None


def test_serve_answers_frames_in_order_and_returns_at_end_of_stream():
    _, dumps, _ = codec = protocol.select_codec("stdlib")
    requests = io.BytesIO()
    for i in range(5):
        protocol.write_frame(requests, dumps({"t": "call", "id": i, "cmd": "echo", "args": i}))
    requests.seek(0)
    replies = io.BytesIO()
    runtime.Worker(requests, replies, "w1", 1 << 20, codec).serve()
    replies.seek(0)
    answers = [json.loads(protocol.read_frame(replies)) for _ in range(5)]
    assert [(a["id"], a["result"]) for a in answers] == [(i, i) for i in range(5)]
    assert protocol.read_frame(replies) is None


def test_serve_refuses_messages_that_are_not_calls():
    codec = protocol.select_codec("stdlib")
    requests = io.BytesIO()
    protocol.write_frame(requests, b'{"t":"surprise","id":1}')
    requests.seek(0)
    with pytest.raises(protocol.ProtocolError, match="surprise"):
        runtime.Worker(requests, io.BytesIO(), "w1", 1 << 20, codec).serve()


def test_worker_options_are_parsed_strictly():
    opts = runtime._parse_args(
        ["--worker-id", "w5", "--handlers", "a", "--handlers", "b.py", "--max-frame-bytes", "2048", "--parent-pid", "42"]
    )
    assert opts == {"worker_id": "w5", "handlers": ["a", "b.py"], "max_frame_bytes": 2048, "parent_pid": 42}
    with pytest.raises(SystemExit):
        runtime._parse_args(["--bogus", "1"])
    with pytest.raises(SystemExit):
        runtime._parse_args(["--worker-id"])
