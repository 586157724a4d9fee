"""The wire protocol, without I/O: client messages, channels, ids, frames, AMQP decoding."""

from __future__ import annotations

import json
import struct
from typing import Any

import pytest

from notifyd.errors import InvalidMessage, ProtocolError
from notifyd.protocol import (
    BROADCAST,
    Ack,
    Auth,
    Channel,
    Disconnect,
    IdGenerator,
    Ping,
    Publish,
    Refresh,
    Resume,
    ResumePoint,
    Revoke,
    Send,
    Subscribe,
    Unsubscribe,
    channel_for_routing_key,
    close_frame,
    decode_control,
    decode_notification,
    id_timestamp_ms,
    parse_channel,
    parse_client_message,
    text_frame,
    valid_name,
)


@pytest.mark.parametrize(
    "name",
    ["42", "alice", "user-1", "a@b.com", "x.y", "A_b:c+d=e~f", "a" * 128, "tenant.user.7"],
)
def test_valid_names(name: str) -> None:
    assert valid_name(name)


@pytest.mark.parametrize(
    "name",
    ["", "#", "*", "a.*", "a.#", "#.a", "a b", " a", "a\n", "a\tb", "a..b", ".a", "a.", "a" * 129,
     "é", "ü.ser", "a/b", "a,b", None, 42, ["a"]],
)  # fmt: skip
def test_names_that_could_widen_a_binding_are_refused(name: Any) -> None:
    assert not valid_name(name)


@pytest.mark.parametrize(
    ("text", "channel", "routing_key"),
    [
        ("user:42", Channel("user", "42"), "user.42"),
        ("topic:news", Channel("topic", "news"), "topic.news"),
        ("topic:sport.tennis", Channel("topic", "sport.tennis"), "topic.sport.tennis"),
        ("broadcast", BROADCAST, "broadcast"),
    ],
)
def test_channels_and_routing_keys_round_trip(
    text: str, channel: Channel, routing_key: str
) -> None:
    assert parse_channel(text) == channel
    assert str(channel) == text
    assert channel.routing_key == routing_key
    assert channel_for_routing_key(routing_key) == channel


@pytest.mark.parametrize(
    "text",
    ["user:", "user:#", "topic:a.*", "group:x", "broadcast:x", "topic", "", None, 3, "user:a b"],
)
def test_bad_channels(text: Any) -> None:
    with pytest.raises(ProtocolError) as refused:
        parse_channel(text)
    assert refused.value.code == "invalid_channel"


@pytest.mark.parametrize(
    "key", ["user", "user.", "user.#", "user.*", "topic.a.*", "control", "x.y", ""]
)
def test_routing_keys_we_do_not_route(key: str) -> None:
    assert channel_for_routing_key(key) is None


@pytest.mark.parametrize(
    ("message", "parsed"),
    [
        ({"type": "ping"}, Ping()),
        ({"type": "ping", "ref": 3}, Ping(3)),
        ({"type": "ack", "id": "n1"}, Ack("n1")),
        ({"type": "auth", "token": "t" * 20}, Auth("t" * 20)),
        (
            {"type": "auth", "token": "tok", "since": "n9", "since_ts": 5},
            Auth("tok", ResumePoint("n9", 5)),
        ),
        ({"type": "refresh", "token": "tok"}, Refresh("tok")),
        ({"type": "subscribe", "channel": "topic:a"}, Subscribe(Channel("topic", "a"))),
        (
            {"type": "unsubscribe", "channel": "topic:a", "ref": "x"},
            Unsubscribe(Channel("topic", "a"), "x"),
        ),
        ({"type": "resume", "since": "n1"}, Resume(ResumePoint("n1"))),
        (
            {
                "type": "publish",
                "channel": "topic:room",
                "event": "chat",
                "data": {"t": 1},
                "ref": 1,
            },
            Publish(Channel("topic", "room"), {"t": 1}, "chat", 1),
        ),
        (
            {"type": "publish", "channel": "topic:room", "data": None},
            Publish(Channel("topic", "room"), None),
        ),
        ({"type": "send", "event": "position", "data": [1, 2]}, Send("position", [1, 2])),
    ],
)
def test_client_messages(message: dict[str, Any], parsed: object) -> None:
    assert parse_client_message(json.dumps(message)) == parsed
    assert parse_client_message(json.dumps(message).encode()) == parsed


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("", "bad_json"),
        ("{", "bad_json"),
        ("nonsense", "bad_json"),
        ("[]", "bad_message"),
        ('"ping"', "bad_message"),
        ("{}", "bad_message"),
        ('{"type": 5}', "bad_message"),
        ('{"type": "dance"}', "unknown_type"),
        ('{"type": "ping", "ref": true}', "bad_message"),
        ('{"type": "ping", "ref": {"a": 1}}', "bad_message"),
        ('{"type": "ack"}', "bad_message"),
        ('{"type": "ack", "id": ""}', "bad_message"),
        ('{"type": "auth"}', "bad_message"),
        ('{"type": "auth", "token": 5}', "bad_message"),
        ('{"type": "auth", "token": "t", "since": 7}', "bad_message"),
        ('{"type": "auth", "token": "t", "since": "a", "since_ts": -1}', "bad_message"),
        ('{"type": "subscribe"}', "invalid_channel"),
        ('{"type": "subscribe", "channel": "topic:#"}', "invalid_channel"),
        ('{"type": "publish", "channel": "user:bob", "data": 1}', "invalid_channel"),
        ('{"type": "publish", "channel": "broadcast", "data": 1}', "invalid_channel"),
        ('{"type": "publish", "channel": "topic:a"}', "bad_message"),
        ('{"type": "publish", "channel": "topic:a", "data": 1, "event": "a b"}', "bad_message"),
        ('{"type": "send", "data": 1}', "bad_message"),
        ('{"type": "send", "event": "e"}', "bad_message"),
        ('{"type": "send", "event": "' + "e" * 65 + '", "data": 1}', "bad_message"),
        ('{"type": "resume"}', "bad_message"),
    ],
)
def test_bad_client_messages(text: str, code: str) -> None:
    with pytest.raises(ProtocolError) as refused:
        parse_client_message(text)
    assert refused.value.code == code


def test_errors_keep_the_clients_ref() -> None:
    with pytest.raises(ProtocolError) as refused:
        parse_client_message('{"type": "subscribe", "channel": "nope", "ref": "r7"}')
    assert refused.value.ref == "r7"


def test_generated_ids_are_monotonic_and_carry_their_time() -> None:
    ids = IdGenerator()
    same_ms = [ids.new(1_700_000_000_000) for _ in range(1000)]
    assert same_ms == sorted(same_ms) and len(set(same_ms)) == 1000
    later = ids.new(1_700_000_000_001)
    assert later > same_ms[-1]
    assert all(len(i) == 26 for i in same_ms)
    assert id_timestamp_ms(same_ms[0]) == 1_700_000_000_000
    assert id_timestamp_ms(later) == 1_700_000_000_001
    assert id_timestamp_ms("order-42") is None
    assert id_timestamp_ms("u" * 26) is None  # not Crockford base32


@pytest.mark.parametrize(
    ("length", "header_size"), [(0, 2), (125, 2), (126, 4), (65535, 4), (65536, 10)]
)
def test_text_frames(length: int, header_size: int) -> None:
    payload = b"x" * length
    frame = text_frame(payload)
    assert frame[0] == 0x81  # FIN + text, unmasked
    assert len(frame) == header_size + length and frame[header_size:] == payload
    if header_size == 2:
        assert frame[1] == length
    elif header_size == 4:
        assert frame[1] == 126 and struct.unpack("!H", frame[2:4])[0] == length
    else:
        assert frame[1] == 127 and struct.unpack("!Q", frame[2:10])[0] == length


def _decode(key: str, body: bytes, **kwargs: Any) -> Any:
    options: dict[str, Any] = {
        "message_id": None, "timestamp": None, "expiration": None, "headers": None,
        "ids": IdGenerator(), "max_body_size": 1000, "now": 1_700_000_000.0,
    }  # fmt: skip
    options.update(kwargs)
    return decode_notification(key, body, **options)


def _frame_json(frame: bytes) -> Any:
    return json.loads(frame[2:] if frame[1] < 126 else frame[4:])


def test_decode_notification() -> None:
    notification = _decode(
        "user.42",
        b'{"event": "order.shipped", "data": {"order": 7}}',
        message_id="m-1",
        headers={"notifyd-published-ms": 1_700_000_000_123, "notifyd-from": "bob"},
        expiration="60000",
    )
    assert notification.id == "m-1" and notification.channel == Channel("user", "42")
    assert notification.ts == 1_700_000_000_123
    assert notification.published_at == pytest.approx(1_700_000_000.123)
    assert notification.expires_at == pytest.approx(1_700_000_060.123)
    assert _frame_json(notification.frame) == {
        "type": "notification", "id": "m-1", "channel": "user:42", "event": "order.shipped",
        "data": {"order": 7}, "ts": 1_700_000_000_123, "from": "bob",
    }  # fmt: skip


def test_decode_without_id_or_time_uses_a_generated_id_and_now() -> None:
    notification = _decode("broadcast", b'{"data": null}')
    assert id_timestamp_ms(notification.id) == 1_700_000_000_000
    assert notification.ts == 1_700_000_000_000
    assert _frame_json(notification.frame) == {
        "type": "notification", "id": notification.id, "channel": "broadcast", "data": None,
        "ts": 1_700_000_000_000,
    }  # fmt: skip
    stamped = _decode("topic.a", b'{"data": 1}', timestamp=1_600_000_000.0)
    assert stamped.ts == 1_600_000_000_000


@pytest.mark.parametrize(
    ("key", "body", "extra", "reason"),
    [
        ("user.#", b'{"data": 1}', {}, "bad_key"),
        ("nonsense", b'{"data": 1}', {}, "bad_key"),
        ("user.42", b"x" * 1001, {}, "too_big"),
        ("user.42", b"\xff\xfe", {}, "not_json"),
        ("user.42", b"not json", {}, "not_json"),
        ("user.42", b"[1, 2]", {}, "bad_body"),
        ("user.42", b'{"event": "x"}', {}, "bad_body"),
        ("user.42", b'{"event": "a b", "data": 1}', {}, "bad_body"),
        ("user.42", b'{"data": 1}', {"expiration": "soon"}, "bad_body"),
        ("user.42", b'{"data": 1}', {"message_id": "m" * 129}, "bad_body"),
    ],
)
def test_undeliverable_messages(key: str, body: bytes, extra: dict[str, Any], reason: str) -> None:
    with pytest.raises(InvalidMessage) as refused:
        _decode(key, body, **extra)
    assert refused.value.reason == reason


def test_control_messages() -> None:
    assert decode_control(b'{"action": "disconnect", "user": "42"}', 0) == Disconnect("42")
    assert decode_control(b'{"action": "revoke", "jti": "t1"}', 100) == Revoke(("t1",), 86_500)
    assert decode_control(b'{"action": "revoke", "jti": ["a", "b"], "until": 5}', 0) == Revoke(
        ("a", "b"), 5
    )
    for bad in [b"nope", b"[]", b'{"action": "disconnect", "user": "#"}', b'{"action": "revoke", "jti": []}',
                b'{"action": "explode"}']:  # fmt: skip
        with pytest.raises(InvalidMessage):
            decode_control(bad, 0)


def test_close_frames_carry_the_code_and_a_reason_that_fits() -> None:
    frame = close_frame(4003, "disconnected by the backend")
    assert frame[0] == 0x88  # FIN + close, unmasked
    assert frame[1] == len(frame) - 2 == 2 + len("disconnected by the backend")
    assert int.from_bytes(frame[2:4], "big") == 4003
    assert frame[4:] == b"disconnected by the backend"
    # A control frame holds 125 bytes: the reason is cut, never in a UTF-8 sequence.
    long = close_frame(1001, "é" * 100)
    assert len(long) - 2 <= 125
    assert long[4:].decode() == "é" * 61
