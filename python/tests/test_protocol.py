"""Frames and codecs."""

import io
import json

import pytest

from pyherd_worker import protocol

CODECS = ["stdlib", "orjson"]


def test_frames_round_trip_small_and_large_bodies():
    stream = io.BytesIO()
    bodies = [b"", b"{}", "é🐍".encode() * 10, b"x" * 200_000]
    for body in bodies:
        protocol.write_frame(stream, body)
    stream.seek(0)
    assert [protocol.read_frame(stream) for _ in bodies] == bodies
    assert protocol.read_frame(stream) is None  # clean end between frames


def test_a_frame_is_a_big_endian_length_then_the_body():
    stream = io.BytesIO()
    protocol.write_frame(stream, b"abc")
    assert stream.getvalue() == b"\x00\x00\x00\x03abc"


@pytest.mark.parametrize("data", [b"\x00\x00", b"\x00\x00\x00\x05ab"])
def test_a_stream_ending_inside_a_frame_is_a_protocol_error(data):
    with pytest.raises(protocol.ProtocolError):
        protocol.read_frame(io.BytesIO(data))


@pytest.mark.parametrize("preference", CODECS)
def test_codecs_write_compact_utf8_and_read_it_back(preference):
    name, dumps, loads = protocol.select_codec(preference)
    assert name == {"stdlib": "json", "orjson": "orjson"}[preference]
    value = {"text": "héllo 漢字 🦀", "list": [1, 2.5, None, True], "nested": {"k": []}}
    encoded = dumps(value)
    # Compact, UTF-8 (not \\u escapes), keys in order: the same bytes from both codecs.
    assert encoded == json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()
    assert loads(encoded) == value
    assert json.loads(encoded) == value  # plain JSON either way
    assert loads(dumps({1: "int key"})) == {"1": "int key"}


@pytest.mark.parametrize("preference", CODECS)
def test_codecs_never_write_invalid_json(preference):
    _, dumps, _ = protocol.select_codec(preference)
    try:
        encoded = dumps({"v": float("nan")})
    except ValueError:
        assert preference == "stdlib"  # the standard library refuses NaN
    else:
        assert preference == "orjson" and json.loads(encoded) == {"v": None}
    for bad in ({1, 2}, object(), "\ud800"):
        with pytest.raises((TypeError, ValueError)):
            dumps({"v": bad})
    cycle = []
    cycle.append(cycle)
    with pytest.raises((TypeError, ValueError, RecursionError)):
        dumps(cycle)


def test_the_codec_follows_pyherd_json(monkeypatch):
    monkeypatch.setenv("PYHERD_JSON", "stdlib")
    assert protocol.select_codec()[0] == "json"
    monkeypatch.setenv("PYHERD_JSON", "auto")
    assert protocol.select_codec()[0] == "orjson"  # installed for the tests
    monkeypatch.setenv("PYHERD_JSON", "fastest")
    with pytest.raises(ValueError, match="PYHERD_JSON"):
        protocol.select_codec()
