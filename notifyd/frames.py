"""The AMQP 0-9-1 frames notifyd writes by the thousand, encoded directly. No I/O.

A connect storm brings a binding and a presence transition per new user, a
disconnect wave an unbinding and a transition per user who left. aiormq encodes
every frame through pamqp, which handles any method and any property generically:
about 17 µs for a bind and 38 µs for a publish on the machine of the benchmarks,
which made AMQP encoding the largest single cost of a storm after the token
checks. The three shapes below are written here in a few microseconds each, byte
for byte what pamqp writes (``tests/test_frames.py`` compares them). Everything
else, and every method whose reply aiormq must see, still goes through aiormq.

Each function returns complete frames for ``channel``, ready to be written in one
payload with others (:func:`notifyd.broker.send_frames`).
"""

from __future__ import annotations

import struct
from typing import Final

from .amqp import PUBLISHED_AT_HEADER

FRAME_END: Final = b"\xce"
_METHOD, _HEADER, _BODY = 1, 2, 3
_FRAME_HEAD = struct.Struct(">BHI")  # type, channel, payload size
_CONTENT_HEAD = struct.Struct(">HHQH")  # class, weight, body size, property flags

_QUEUE_BIND = b"\x00\x32\x00\x14\x00\x00"  # class 50 method 20, reserved short
_QUEUE_UNBIND = b"\x00\x32\x00\x32\x00\x00"  # class 50 method 50, reserved short
_BASIC_PUBLISH = b"\x00\x3c\x00\x28\x00\x00"  # class 60 method 40, reserved short
_NO_ARGUMENTS = b"\x00\x00\x00\x00"  # an empty field table
_BASIC_CLASS = 60

# Basic properties present in a publish below: content-type, headers, delivery-mode
# and message-id (bits 15, 13, 12 and 7 of the property flags).
_PUBLISH_PROPERTIES = 0x8000 | 0x2000 | 0x1000 | 0x0080
_JSON = b"\x10application/json"
_PUBLISHED_AT = bytes((len(PUBLISHED_AT_HEADER),)) + PUBLISHED_AT_HEADER.encode() + b"l"
_INT64 = struct.Struct(">q")
_HEADERS_SIZE = struct.pack(">I", len(_PUBLISHED_AT) + 8)
_TRANSIENT = b"\x01"  # delivery-mode 1


def shortstr(value: str) -> bytes:
    """An AMQP short string: a length octet, then at most 255 bytes of UTF-8."""
    encoded = value.encode()
    if len(encoded) > 255:
        raise ValueError(f"longer than an AMQP short string: {value[:40]!r}...")
    return bytes((len(encoded),)) + encoded


def _frame(kind: int, channel: int, payload: bytes) -> bytes:
    return _FRAME_HEAD.pack(kind, channel, len(payload)) + payload + FRAME_END


def bind(channel: int, queue: str, exchange: str, routing_key: str) -> bytes:
    """``queue.bind`` with ``nowait`` and no arguments: RabbitMQ sends no reply."""
    names = shortstr(queue) + shortstr(exchange) + shortstr(routing_key)
    return _frame(_METHOD, channel, _QUEUE_BIND + names + b"\x01" + _NO_ARGUMENTS)


def unbind(channel: int, queue: str, exchange: str, routing_key: str) -> bytes:
    """``queue.unbind`` with no arguments: RabbitMQ answers ``queue.unbind-ok``."""
    names = shortstr(queue) + shortstr(exchange) + shortstr(routing_key)
    return _frame(_METHOD, channel, _QUEUE_UNBIND + names + _NO_ARGUMENTS)


def publish(
    channel: int,
    exchange: str,
    routing_key: str,
    body: bytes,
    *,
    message_id: str,
    published_ms: int,
    max_content_size: int,
) -> bytes:
    """A transient JSON message (``basic.publish``, its header, its body in pieces of
    ``max_content_size``) with ``message_id`` and :data:`PUBLISHED_AT_HEADER`."""
    method = _BASIC_PUBLISH + shortstr(exchange) + shortstr(routing_key) + b"\x00"
    properties = (
        _JSON
        + _HEADERS_SIZE
        + _PUBLISHED_AT
        + _INT64.pack(published_ms)
        + _TRANSIENT
        + shortstr(message_id)
    )
    header = _CONTENT_HEAD.pack(_BASIC_CLASS, 0, len(body), _PUBLISH_PROPERTIES) + properties
    parts = [_frame(_METHOD, channel, method), _frame(_HEADER, channel, header)]
    parts.extend(
        _frame(_BODY, channel, body[start : start + max_content_size])
        for start in range(0, len(body), max_content_size)
    )
    return b"".join(parts)
