"""Log records in a worker carry the worker id and the running call's request id."""

import io
import json
import logging
import os

from pyherd_worker import handler, logs, protocol, runtime


@handler("logs_probe")
def _logs_probe(args, ctx):
    ctx.log.warning("from ctx.log")
    logging.getLogger().warning("from the root logger")
    return None


def capture():
    stream = io.StringIO()
    h = logging.StreamHandler(stream)
    h.setFormatter(logging.Formatter(logs.FORMAT))
    root = logging.getLogger()
    root.addHandler(h)
    return stream, lambda: root.removeHandler(h)


def test_records_name_the_worker_and_the_call_only_inside_it():
    logs.install("w7")
    stream, done = capture()
    try:
        log = logging.getLogger("probe")
        log.warning("before")
        with logs.call("r-42"):
            log.warning("inside")
            with logs.call(43):
                log.warning("nested")
            log.warning("back")
        log.warning("after")
    finally:
        done()
    assert stream.getvalue().splitlines() == [
        "WARNING probe [w7 r=-] before",
        "WARNING probe [w7 r=r-42] inside",
        "WARNING probe [w7 r=43] nested",
        "WARNING probe [w7 r=r-42] back",
        "WARNING probe [w7 r=-] after",
    ]


def test_installing_twice_keeps_one_factory():
    logs.install("w1")
    factory = logging.getLogRecordFactory()
    logs.install("w2")
    assert logging.getLogRecordFactory() is factory
    record = logging.getLogger("probe").makeRecord("probe", logging.INFO, __file__, 1, "m", (), None)
    assert record.worker_id == "w2"


@handler("logs_stream_probe")
def _logs_stream_probe(args, ctx):
    for i in range(2):
        ctx.log.warning("chunk %d", i)
        yield i


def test_a_handlers_log_lines_carry_the_request_id_of_its_call():
    logs.install("w3")
    stream, done = capture()
    read_end, write_end = os.pipe()
    with os.fdopen(write_end, "wb") as frames:
        protocol.write_frame(frames, json.dumps({"t": "call", "id": 99, "rid": "job-9", "cmd": "logs_probe", "args": {}}).encode())
        protocol.write_frame(frames, json.dumps({"t": "call", "id": 100, "cmd": "logs_stream_probe", "args": {}, "stream": True}).encode())
    try:
        with os.fdopen(read_end, "rb") as requests:
            runtime.Worker(requests, io.BytesIO(), "w3", 1 << 20).serve()
        logging.getLogger().warning("between calls")
    finally:
        done()
    assert stream.getvalue().splitlines() == [
        "WARNING pyherd.handler [w3 r=job-9] from ctx.log",
        "WARNING root [w3 r=job-9] from the root logger",
        "WARNING pyherd.handler [w3 r=100] chunk 0",
        "WARNING pyherd.handler [w3 r=100] chunk 1",
        "WARNING root [w3 r=-] between calls",
    ]
