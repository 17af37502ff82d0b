"""Frames and codec: 4-byte big-endian length + JSON body.

orjson is used when importable (and not disabled with PYHERD_JSON=stdlib),
the standard library's json otherwise. Both produce strict JSON: NaN and
infinities are never written (orjson writes null, stdlib json refuses them).
"""

from __future__ import annotations

import json
import os
from typing import Any, BinaryIO, Callable, Optional, Tuple

HEADER_BYTES = 4


class ProtocolError(Exception):
    """The peer sent something that is not a valid frame."""


def _stdlib_codec() -> Tuple[str, Callable[[Any], bytes], Callable[[bytes], Any]]:
    from json import encoder as json_encoder

    settings = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    decoder = json.JSONDecoder()
    c_make_encoder = getattr(json_encoder, "c_make_encoder", None)
    if c_make_encoder is None:
        def dumps(obj: Any) -> bytes:
            return settings.encode(obj).encode("utf-8")
    else:
        # One C encoder for the worker's life (JSONEncoder.encode builds one per call).
        # No circular-reference table: a table shared across calls could keep stale
        # entries after a failed call; a cycle ends in RecursionError instead.
        encode_chunks = c_make_encoder(
            None, settings.default, json_encoder.encode_basestring, None, ":", ",", False, False, False
        )

        def dumps(obj: Any) -> bytes:
            return "".join(encode_chunks(obj, 0)).encode("utf-8")

    def loads(body: bytes) -> Any:
        return decoder.decode(body.decode("utf-8"))

    return "json", dumps, loads


def _orjson_codec() -> Optional[Tuple[str, Callable[[Any], bytes], Callable[[bytes], Any]]]:
    try:
        import orjson  # type: ignore[import-not-found]
    except ImportError:
        return None
    option = orjson.OPT_NON_STR_KEYS
    orjson_dumps = orjson.dumps

    def dumps(obj: Any) -> bytes:
        return orjson_dumps(obj, option=option)

    return "orjson", dumps, orjson.loads


def select_codec(preference: Optional[str] = None) -> Tuple[str, Callable[[Any], bytes], Callable[[bytes], Any]]:
    """Return (name, dumps, loads). `preference` is "auto", "orjson" or "stdlib"."""
    preference = preference or os.environ.get("PYHERD_JSON", "auto")
    if preference not in ("auto", "orjson", "stdlib"):
        raise ValueError(f"PYHERD_JSON must be auto, orjson or stdlib, not {preference!r}")
    if preference != "stdlib":
        codec = _orjson_codec()
        if codec is not None:
            return codec
        if preference == "orjson":
            raise ImportError("PYHERD_JSON=orjson but orjson is not installed")
    return _stdlib_codec()


def read_frame(stream: BinaryIO) -> Optional[bytes]:
    """Read one frame body; None on a clean end of stream between frames."""
    header = stream.read(HEADER_BYTES)
    if not header:
        return None
    if len(header) < HEADER_BYTES:
        raise ProtocolError("stream ended inside a frame header")
    length = int.from_bytes(header, "big")
    body = stream.read(length)
    if len(body) < length:
        raise ProtocolError(f"stream ended inside a frame body ({len(body)} of {length} bytes)")
    return body


def write_frame(stream: BinaryIO, body: bytes) -> None:
    """Write one frame and flush it."""
    header = len(body).to_bytes(HEADER_BYTES, "big")
    if len(body) < 65536:
        stream.write(header + body)
    else:
        stream.write(header)
        stream.write(body)
    stream.flush()
