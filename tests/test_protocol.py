"""The WebSocket wire protocol, without I/O: client messages, channels, ids, server JSON."""

from __future__ import annotations

import json
from typing import Any

import pytest

from notifyd.errors import ProtocolError
from notifyd.protocol import (
    BROADCAST,
    Ack,
    Auth,
    Channel,
    IdGenerator,
    Ping,
    Publish,
    Refresh,
    Resume,
    ResumePoint,
    Send,
    Subscribe,
    Unsubscribe,
    channel_for_routing_key,
    id_digest,
    id_timestamp_ms,
    notification,
    parse_channel,
    parse_client_message,
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


def test_channel_factories_name_user_and_topic_channels() -> None:
    assert Channel.user("42") == Channel("user", "42")
    assert Channel.user("42").routing_key == "user.42"
    assert Channel.topic("sport.tennis") == Channel("topic", "sport.tennis")
    assert str(Channel.topic("sport.tennis")) == "topic:sport.tennis"


@pytest.mark.parametrize("name", ["", "#", "a.*", "a b", "x" * 129, "a..b"])
def test_channel_factories_refuse_names_that_could_widen_a_binding(name: str) -> None:
    with pytest.raises(ValueError, match="invalid user name"):
        Channel.user(name)
    with pytest.raises(ValueError, match="invalid topic name"):
        Channel.topic(name)


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
    assert id_timestamp_ms("8" + "0" * 25) is None  # 130 bits: not a ULID


DIGEST = bytes(range(1, 11))
OTHER = bytes(range(2, 12))


def test_content_ids_are_the_time_then_the_digest_on_any_generator() -> None:
    """Two replicas name the same message with the same 80 bits, each at its own time."""
    on_a = IdGenerator().content(DIGEST, 1_700_000_000_000)
    on_b = IdGenerator().content(DIGEST, 1_700_000_000_250)
    assert len(on_a) == len(on_b) == 26 and on_a[10:] == on_b[10:]
    assert id_digest(on_a) == id_digest(on_b) == DIGEST
    assert id_timestamp_ms(on_a) == 1_700_000_000_000
    assert id_timestamp_ms(on_b) == 1_700_000_000_250
    assert id_digest(IdGenerator().content(OTHER, 1_700_000_000_000)) == OTHER
    # A generated id is a ULID too: its 80 bits are random, never another's.
    generated = IdGenerator().new(1_700_000_000_000)
    assert id_digest(generated) not in (None, DIGEST)
    assert id_digest("order-42") is None and id_digest("u" * 26) is None


def test_the_same_content_in_the_same_millisecond_takes_the_next_one() -> None:
    ids = IdGenerator()
    ms = 1_700_000_000_000
    same = [ids.content(DIGEST, ms) for _ in range(3)]
    assert [id_timestamp_ms(i) for i in same] == [ms, ms + 1, ms + 2]
    assert len(set(same)) == 3 and {id_digest(i) for i in same} == {DIGEST}
    # Other content keeps the clock's time: no id runs ahead of it but the repeats'.
    assert id_timestamp_ms(ids.content(OTHER, ms)) == ms
    # The clock catches up with the repeats: the next one takes the next millisecond.
    assert id_timestamp_ms(ids.content(DIGEST, ms + 1)) == ms + 3
    assert id_timestamp_ms(ids.content(DIGEST, ms + 10)) == ms + 10
    # A clock stepping back does not hand out an id again.
    stepped_back = ids.content(DIGEST, ms)
    assert id_timestamp_ms(stepped_back) == ms + 11 and stepped_back not in same


def test_content_ids_remember_a_bounded_number_of_digests() -> None:
    ids = IdGenerator(memory=8)
    ms = 1_700_000_000_000
    for n in range(100):
        ids.content(n.to_bytes(10, "big"), ms)
        assert len(ids._recent) <= 8
    # Past digests are forgotten as soon as the clock passes them.
    ids.content(DIGEST, ms + 1)
    assert list(ids._recent) == [DIGEST]


def test_notifications_carry_event_and_sender_only_when_there_is_one() -> None:
    assert json.loads(notification("n1", "topic:a", None, [1], 5)) == {
        "type": "notification", "id": "n1", "channel": "topic:a", "data": [1], "ts": 5,
    }  # fmt: skip
    assert json.loads(notification("n2", "user:42", "chat", "hi", 6, sender="bob")) == {
        "type": "notification", "id": "n2", "channel": "user:42", "event": "chat", "data": "hi",
        "ts": 6, "from": "bob",
    }  # fmt: skip
