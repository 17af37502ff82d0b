"""Streaming calls in the worker loop: generator handlers (sync and async) send chunk
frames then end; errors mid-stream, unserialisable or oversized chunks, a cancel from
the host between chunks, and a generator called without streaming.

The request pipe is a real pipe: the worker checks it for a cancel without blocking.
"""

import io
import json

import pytest

from pyherd_worker import HandlerError, handler, protocol, runtime
from worker_pipe import Pipe

CODECS = ["stdlib", "orjson"]
LIMIT = 4096
CLOSED = []


@handler("st_count")
def _count(args):
    try:
        for i in range(args.get("to", 3)):
            yield {"i": i}
    finally:
        CLOSED.append(args.get("tag"))


@handler("st_acount")
async def _acount(args):
    try:
        for i in range(args.get("to", 3)):
            yield i
    finally:
        CLOSED.append(args.get("tag"))


@handler("st_fail")
def _fail(args):
    yield 1
    raise KeyError("gone")


@handler("st_exit")
def _exit(args):
    yield 1
    raise SystemExit(2)


@handler("st_long_fail")
def _long_fail(args):
    yield 1
    raise ValueError("m" * (4 * LIMIT))


@handler("st_typed_fail")
def _typed_fail(args):
    yield 1
    raise HandlerError("connection", "upstream_away", "the upstream left", retryable=True)


@handler("st_bad_chunk")
def _bad_chunk(args):
    try:
        yield 1
        yield {1, 2}
        yield 3
    finally:
        CLOSED.append("bad_chunk")


@handler("st_big_chunk")
def _big_chunk(args):
    yield "x" * 10
    yield "x" * (2 * LIMIT)


@handler("st_plain")
def _plain(args):
    return {"plain": args}


@handler("st_ctx")
def _ctx(args, ctx):
    yield ctx.request_id


@pytest.fixture(params=CODECS)
def codec(request):
    return protocol.select_codec(request.param)


@pytest.fixture
def pipe(codec):
    p = Pipe(codec, LIMIT)
    yield p
    p.close()


def stream(pipe, cmd, args=None, request_id=5, **extra):
    msg = {"t": "call", "id": request_id, "cmd": cmd, "args": args if args is not None else {}, "stream": True}
    msg.update(extra)
    pipe.worker.stream(msg)
    return pipe.frames()


@pytest.mark.parametrize("cmd", ["st_count", "st_acount"])
def test_a_generator_streams_chunks_then_end(pipe, cmd):
    CLOSED.clear()
    frames = stream(pipe, cmd, {"to": 3, "tag": cmd})
    data = [f["data"] for f in frames if f["t"] == "chunk"]
    assert data == ([{"i": 0}, {"i": 1}, {"i": 2}] if cmd == "st_count" else [0, 1, 2])
    assert frames[-1] == {"t": "end", "id": 5}
    assert all(f["id"] == 5 for f in frames)
    assert CLOSED == [cmd]


def test_an_empty_generator_ends_at_once(pipe):
    assert stream(pipe, "st_count", {"to": 0}) == [{"t": "end", "id": 5}]


def test_a_plain_handler_streams_its_result_as_one_chunk(pipe):
    assert stream(pipe, "st_plain", [1]) == [
        {"t": "chunk", "id": 5, "data": {"plain": [1]}},
        {"t": "end", "id": 5},
    ]


def test_the_request_id_reaches_a_streaming_handler(pipe):
    assert stream(pipe, "st_ctx", rid="abc.1")[0]["data"] == "abc.1"


def test_an_exception_mid_stream_is_an_err_after_the_chunks_sent(pipe):
    frames = stream(pipe, "st_fail")
    assert [f["t"] for f in frames] == ["chunk", "err"]
    err = frames[1]
    assert (err["category"], err["kind"], err["python_type"]) == ("python", "python_exception", "KeyError")
    assert "gone" in err["message"] and "Traceback" in err["traceback"]


def test_a_system_exit_mid_stream_is_an_err_and_the_worker_goes_on(pipe):
    frames = stream(pipe, "st_exit")
    assert [f["t"] for f in frames] == ["chunk", "err"]
    assert (frames[1]["kind"], frames[1]["python_type"]) == ("python_exception", "SystemExit")
    assert stream(pipe, "st_plain", 1)[-1] == {"t": "end", "id": 5}
    reply = json.loads(pipe.worker.reply_body({"t": "call", "id": 8, "cmd": "st_exit", "args": {}}))
    assert (reply["t"], reply["python_type"]) == ("err", "SystemExit")


def test_an_error_mid_stream_too_large_for_a_frame_is_cut_to_fit(pipe):
    pipe.worker.stream({"t": "call", "id": 5, "cmd": "st_long_fail", "args": {}, "stream": True})
    pipe.replies.seek(0)
    protocol.read_frame(pipe.replies)
    body = protocol.read_frame(pipe.replies)
    assert len(body) <= LIMIT
    err = json.loads(body)
    assert (err["t"], err["kind"]) == ("err", "python_exception")
    assert err["message"].endswith("… (cut to fit the frame limit)")


def test_a_handler_error_mid_stream_keeps_its_kind(pipe):
    err = stream(pipe, "st_typed_fail")[-1]
    assert (err["t"], err["category"], err["kind"], err["retryable"]) == ("err", "connection", "upstream_away", True)


def test_an_unserialisable_chunk_ends_the_stream_with_an_error_and_closes_it(pipe):
    CLOSED.clear()
    frames = stream(pipe, "st_bad_chunk")
    assert [f["t"] for f in frames] == ["chunk", "err"]
    assert (frames[1]["category"], frames[1]["kind"]) == ("python", "result_not_serializable")
    assert "yielded a chunk" in frames[1]["message"]
    assert CLOSED == ["bad_chunk"]


def test_a_chunk_over_the_frame_limit_is_refused(pipe):
    frames = stream(pipe, "st_big_chunk")
    assert [f["t"] for f in frames] == ["chunk", "err"]
    assert (frames[1]["category"], frames[1]["kind"]) == ("resource", "result_too_large")


def test_an_unknown_command_streams_an_error(pipe):
    frames = stream(pipe, "st_nope")
    assert [(f["t"], f.get("kind")) for f in frames] == [("err", "unknown_command")]


def test_a_cancel_between_chunks_closes_the_generator(pipe):
    CLOSED.clear()
    pipe.send({"t": "cancel", "id": 5})
    frames = stream(pipe, "st_count", {"to": 1000, "tag": "cancelled"})
    assert [f["t"] for f in frames] == ["chunk", "err"]
    assert (frames[1]["category"], frames[1]["kind"]) == ("invalid_request", "cancelled")
    assert CLOSED == ["cancelled"]


def test_an_async_generator_is_closed_on_cancel(pipe):
    CLOSED.clear()
    pipe.send({"t": "cancel", "id": 5})
    frames = stream(pipe, "st_acount", {"to": 1000, "tag": "acancelled"})
    assert [f["t"] for f in frames] == ["chunk", "err"]
    assert CLOSED == ["acancelled"]


def test_a_stale_cancel_is_skipped_by_the_loop(codec):
    _, dumps, _ = codec
    requests = io.BytesIO()
    for msg in [{"t": "cancel", "id": 3}, {"t": "call", "id": 4, "cmd": "echo", "args": 1}]:
        protocol.write_frame(requests, dumps(msg))
    requests.seek(0)
    replies = io.BytesIO()
    runtime.Worker(requests, replies, "w1", LIMIT, codec).serve()
    replies.seek(0)
    assert json.loads(protocol.read_frame(replies)) == {"t": "ok", "id": 4, "result": 1}


def test_a_cancel_for_another_call_is_not_this_streams(pipe):
    pipe.send({"t": "cancel", "id": 99})
    assert pipe.worker.cancel_pending(5) is False
    assert pipe.worker.cancel_pending(5) is False


def test_a_call_frame_mid_stream_is_a_protocol_error(pipe):
    pipe.send({"t": "call", "id": 6, "cmd": "echo", "args": 1})
    with pytest.raises(protocol.ProtocolError):
        pipe.worker.cancel_pending(5)


@pytest.mark.parametrize("cmd", ["st_count", "st_acount"])
def test_a_generator_called_without_streaming_answers_the_list_of_its_items(codec, cmd):
    worker = runtime.Worker(io.BytesIO(), io.BytesIO(), "w1", LIMIT, codec)
    reply = json.loads(worker.reply_body({"t": "call", "id": 8, "cmd": cmd, "args": {"to": 2}}))
    assert reply == {"t": "ok", "id": 8, "result": [{"i": 0}, {"i": 1}] if cmd == "st_count" else [0, 1]}


def test_a_generator_failing_without_streaming_is_an_error(codec):
    worker = runtime.Worker(io.BytesIO(), io.BytesIO(), "w1", LIMIT, codec)
    reply = json.loads(worker.reply_body({"t": "call", "id": 8, "cmd": "st_fail", "args": {}}))
    assert (reply["t"], reply["kind"], reply["python_type"]) == ("err", "python_exception", "KeyError")
    reply = json.loads(worker.reply_body({"t": "call", "id": 9, "cmd": "st_typed_fail", "args": {}}))
    assert (reply["t"], reply["kind"]) == ("err", "upstream_away")
