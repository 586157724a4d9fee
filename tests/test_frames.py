"""The frames :mod:`notifyd.frames` encodes are byte for byte what pamqp (through
aiormq) writes for the same method and properties, and decode back to them."""

from __future__ import annotations

import pytest
from pamqp import frame
from pamqp.body import ContentBody
from pamqp.commands import Basic, Queue
from pamqp.header import ContentHeader

from notifyd import frames
from notifyd.amqp import PUBLISHED_AT_HEADER

NAMES = [
    ("notifyd.replica.host-1", "notifyd.route", "user.alice"),
    ("q", "notifyd", "topic.ünïcode-ключ"),
    ("", "", ""),
    ("x" * 255, "e" * 127, "k" * 255),
]


def pamqp_bytes(channel: int, *methods: object) -> bytes:
    return b"".join(frame.marshal(method, channel) for method in methods)  # type: ignore[arg-type]


@pytest.mark.parametrize(("queue", "exchange", "key"), NAMES)
@pytest.mark.parametrize("channel", [1, 2047])
def test_bind_and_unbind(channel: int, queue: str, exchange: str, key: str) -> None:
    bind = Queue.Bind(queue=queue, exchange=exchange, routing_key=key, nowait=True)
    assert frames.bind(channel, queue, exchange, key) == pamqp_bytes(channel, bind)
    unbind = Queue.Unbind(queue=queue, exchange=exchange, routing_key=key)
    assert frames.unbind(channel, queue, exchange, key) == pamqp_bytes(channel, unbind)


@pytest.mark.parametrize(
    "body",
    [b"", b'{"user":"alice","online":true,"ts":1764160000.123}', b"x" * 10_000],
)
@pytest.mark.parametrize("published_ms", [1_764_160_000_123, 2**40])
def test_publish(body: bytes, published_ms: int) -> None:
    size = 4088
    properties = Basic.Properties(
        content_type="application/json",
        headers={PUBLISHED_AT_HEADER: published_ms},
        delivery_mode=1,
        message_id="01JDXQ3V6W8YB2C4D5E6F7G8H9",
    )
    expected = pamqp_bytes(
        7,
        Basic.Publish(exchange="notifyd.presence", routing_key="user.alice"),
        ContentHeader(properties=properties, body_size=len(body)),
        *(ContentBody(body[i : i + size]) for i in range(0, len(body), size)),
    )
    encoded = frames.publish(
        7,
        "notifyd.presence",
        "user.alice",
        body,
        message_id="01JDXQ3V6W8YB2C4D5E6F7G8H9",
        published_ms=published_ms,
        max_content_size=size,
    )
    assert encoded == expected


def test_a_small_timestamp_decodes_to_the_same_value() -> None:
    """pamqp writes a small integer header as a 32-bit value; these frames always use
    64 bits (valid AMQP, and read back the same)."""
    encoded = frames.publish(
        1, "", "q", b"{}", message_id="m", published_ms=5, max_content_size=4088
    )
    offset, _, _ = frame.unmarshal(encoded)
    _, _, header = frame.unmarshal(encoded[offset:])
    assert isinstance(header, ContentHeader)
    assert header.properties.headers == {PUBLISHED_AT_HEADER: 5}
    assert header.properties.message_id == "m"
    assert header.body_size == 2


def test_a_name_too_long_for_amqp_is_refused() -> None:
    with pytest.raises(ValueError, match="short string"):
        frames.bind(1, "q", "notifyd", "user." + "é" * 126)
