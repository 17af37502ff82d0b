"""Frames and codecs."""

import io
import json
import sys

import pytest

from pyherd_worker import protocol

CODECS = ["stdlib", "orjson"]
CODEC_NAMES = {"stdlib": "json", "orjson": "orjson"}


# --- frames -----------------------------------------------------------------


def test_frames_round_trip_small_and_large_bodies():
    stream = io.BytesIO()
    bodies = [b"", b"{}", "é🐍".encode() * 10, b"x" * 65535, b"y" * 65536, b"z" * 200_000, b"{}"]
    for body in bodies:
        protocol.write_frame(stream, body)
    stream.seek(0)
    assert [protocol.read_frame(stream) for _ in bodies] == bodies
    assert protocol.read_frame(stream) is None  # clean end between frames
    assert protocol.read_frame(stream) is None  # and it stays ended


@pytest.mark.parametrize("size", [3, 65535, 65536, 100_000])
def test_a_frame_is_a_big_endian_length_then_the_body(size):
    # Below and above 64 KiB the body is written differently; the bytes must not differ.
    stream = io.BytesIO()
    body = bytes(range(256)) * (size // 256) + b"a" * (size % 256)
    protocol.write_frame(stream, body)
    assert stream.getvalue() == size.to_bytes(4, "big") + body


def test_write_frame_flushes_its_stream():
    raw = io.BytesIO()
    buffered = io.BufferedWriter(raw, buffer_size=1 << 20)
    protocol.write_frame(buffered, b"abc")
    assert raw.getvalue() == b"\x00\x00\x00\x03abc"  # on the wire, not in a buffer


def test_an_empty_stream_is_a_clean_end():
    assert protocol.read_frame(io.BytesIO(b"")) is None


@pytest.mark.parametrize(
    "data, where",
    [
        (b"\x00", "header"),
        (b"\x00\x00\x00", "header"),
        (b"\x00\x00\x00\x05", "body"),
        (b"\x00\x00\x00\x05ab", "body"),
        (b"\x00\x01\x00\x00" + b"x" * 65535, "body"),
    ],
)
def test_a_stream_ending_inside_a_frame_is_a_protocol_error(data, where):
    with pytest.raises(protocol.ProtocolError, match=where):
        protocol.read_frame(io.BytesIO(data))


def test_a_truncated_frame_after_good_ones_is_still_an_error():
    stream = io.BytesIO()
    protocol.write_frame(stream, b"first")
    stream.write(b"\x00\x00\x00\x09short")
    stream.seek(0)
    assert protocol.read_frame(stream) == b"first"
    with pytest.raises(protocol.ProtocolError):
        protocol.read_frame(stream)


# --- codecs -----------------------------------------------------------------


@pytest.mark.parametrize("preference", CODECS)
def test_codecs_write_compact_utf8_and_read_it_back(preference):
    name, dumps, loads = protocol.select_codec(preference)
    assert name == CODEC_NAMES[preference]
    value = {"text": "héllo 漢字 🦀 \"q\" \\ \n", "list": [1, 2.5, None, True, False], "nested": {"k": []}}
    encoded = dumps(value)
    assert isinstance(encoded, bytes)
    # Compact, UTF-8 (not \\u escapes), keys in order: the same bytes from both codecs.
    assert encoded == json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    assert b" " not in dumps({"a": [1, 2], "b": {"c": 3}})
    assert "漢字".encode("utf-8") in encoded
    assert loads(encoded) == value
    assert json.loads(encoded) == value  # plain JSON either way


@pytest.mark.parametrize("preference", CODECS)
def test_codecs_read_bytes_with_utf8_text(preference):
    _, _, loads = protocol.select_codec(preference)
    assert loads('{"k":"é🐍","n":-1.5e3}'.encode("utf-8")) == {"k": "é🐍", "n": -1500.0}


@pytest.mark.parametrize("preference", CODECS)
def test_codecs_accept_non_string_dict_keys(preference):
    _, dumps, loads = protocol.select_codec(preference)
    encoded = dumps({1: "int", 2.5: "float", None: "none", False: "bool"})
    assert encoded == b'{"1":"int","2.5":"float","null":"none","false":"bool"}'
    assert loads(encoded) == {"1": "int", "2.5": "float", "null": "none", "false": "bool"}


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_stdlib_refuses_nan_and_infinities(value):
    _, dumps, _ = protocol.select_codec("stdlib")
    with pytest.raises(ValueError):
        dumps({"v": value})


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_orjson_writes_nan_and_infinities_as_null(value):
    _, dumps, _ = protocol.select_codec("orjson")
    encoded = dumps({"v": value})
    assert encoded == b'{"v":null}'


@pytest.mark.parametrize("preference", CODECS)
def test_codecs_never_write_invalid_json(preference):
    _, dumps, _ = protocol.select_codec(preference)
    for bad in ({1, 2}, object(), b"bytes", "\ud800"):
        with pytest.raises((TypeError, ValueError)):
            dumps({"v": bad})
    cycle = []
    cycle.append(cycle)
    with pytest.raises((TypeError, ValueError, RecursionError)):
        dumps(cycle)


@pytest.mark.parametrize("preference", CODECS)
def test_a_failed_encoding_leaves_the_codec_usable(preference):
    # The stdlib codec keeps one C encoder for the worker's life: a failure half-way
    # through an object must not poison the next encoding of that same object.
    _, dumps, _ = protocol.select_codec(preference)
    shared = {"inner": [1, 2], "bad": {1}}
    with pytest.raises((TypeError, ValueError)):
        dumps(shared)
    shared["bad"] = None
    assert dumps(shared) == b'{"inner":[1,2],"bad":null}'
    assert dumps(shared) == b'{"inner":[1,2],"bad":null}'


def test_the_codec_follows_pyherd_json(monkeypatch):
    monkeypatch.setenv("PYHERD_JSON", "stdlib")
    assert protocol.select_codec()[0] == "json"
    monkeypatch.setenv("PYHERD_JSON", "orjson")
    assert protocol.select_codec()[0] == "orjson"
    monkeypatch.setenv("PYHERD_JSON", "auto")
    assert protocol.select_codec()[0] == "orjson"  # installed for the tests
    monkeypatch.delenv("PYHERD_JSON")
    assert protocol.select_codec()[0] == "orjson"  # auto is the default


def test_an_explicit_preference_wins_over_the_environment(monkeypatch):
    monkeypatch.setenv("PYHERD_JSON", "orjson")
    assert protocol.select_codec("stdlib")[0] == "json"
    monkeypatch.setenv("PYHERD_JSON", "stdlib")
    assert protocol.select_codec("orjson")[0] == "orjson"


@pytest.mark.parametrize("value", ["fastest", "ORJSON", "ujson", " stdlib"])
def test_an_invalid_pyherd_json_is_refused(monkeypatch, value):
    monkeypatch.setenv("PYHERD_JSON", value)
    with pytest.raises(ValueError, match="PYHERD_JSON"):
        protocol.select_codec()
    with pytest.raises(ValueError, match="PYHERD_JSON"):
        protocol.select_codec(value)


def test_without_orjson_auto_falls_back_to_stdlib_and_orjson_is_an_error(monkeypatch):
    monkeypatch.delenv("PYHERD_JSON", raising=False)
    monkeypatch.setitem(sys.modules, "orjson", None)  # `import orjson` now raises ImportError
    name, dumps, loads = protocol.select_codec("auto")
    assert name == "json" and loads(dumps({"a": 1})) == {"a": 1}
    assert protocol.select_codec()[0] == "json"
    with pytest.raises(ImportError, match="orjson"):
        protocol.select_codec("orjson")
