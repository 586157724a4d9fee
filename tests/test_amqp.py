"""The AMQP side of the contract: the codec without I/O, then the broker's settling of
what it consumes (dead letters, receipts) against a real RabbitMQ."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import time
import uuid
from decimal import Decimal
from typing import Any
from unittest import mock

import aio_pika
import pytest
from aiormq.abc import DeliveredMessage
from pamqp.commands import Basic
from pamqp.common import FieldValue
from pamqp.header import ContentHeader

from notifyd.amqp import (
    DEAD_LETTER_EXCHANGE,
    DEAD_LETTER_QUEUE,
    EXCHANGE,
    RECEIPTS_EXCHANGE,
    Delivery,
    Disconnect,
    Revoke,
    content_digest,
    dead_letter_message,
    decode_control,
    decode_notification,
    notification_body,
    notification_message,
    published_time,
    receipt_message,
    upstream_message,
)
from notifyd.broker import Broker
from notifyd.config import HistorySettings
from notifyd.devbroker import RabbitNode
from notifyd.errors import InvalidMessage, ProtocolError
from notifyd.protocol import (
    Channel,
    IdGenerator,
    Notification,
    ResumePoint,
    id_digest,
    id_timestamp_ms,
)
from notifyd.stream import BATCH_WINDOW, StreamHistory, _Request, _Scan

from .conftest import AmqpPublisher, ServerFactory, amqp_publisher, new_user, receive_until

NOW = 1_700_000_000.0

# --- decoding --------------------------------------------------------------------------


def _decode(key: str, body: bytes, **kwargs: Any) -> Notification:
    """Decode a delivery built from ``kwargs`` (its properties) with the decoding
    options among them (``ids``, ``max_body_size``, ``now``, ``id_ms``)."""
    options: dict[str, Any] = {"ids": IdGenerator(), "max_body_size": 1000, "now": NOW}
    for name in ("ids", "max_body_size", "now", "id_ms"):
        if name in kwargs:
            options[name] = kwargs.pop(name)
    return decode_notification(Delivery(key, body, **kwargs), **options)


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
    assert not notification.receipt
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
        ("control", b'{"data": 1}', {}, "bad_key"),
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


@pytest.mark.parametrize(
    ("headers", "published"),
    [
        ({"notifyd-published-ms": 1_500_000_000_250}, 1_500_000_000.25),
        ({"notifyd-published-ms": 10**30}, 1_000.0),  # out of range: the timestamp
        ({"notifyd-published-ms": -1}, 1_000.0),
        ({"notifyd-published-ms": True}, 1_000.0),
        ({"notifyd-published-ms": "1500000000250"}, 1_000.0),
        ({}, 1_000.0),
        (None, 1_000.0),
    ],
)
def test_the_publish_time_header_wins_over_the_timestamp_when_it_is_sane(
    headers: dict[str, Any] | None, published: float
) -> None:
    assert published_time(1_000.0, headers) == published
    assert published_time(None, {}) is None


def _delivered(delivery: Any, properties: Basic.Properties, body: bytes) -> DeliveredMessage:
    """What aiormq hands a consumer (no channel needed to read it)."""
    return DeliveredMessage(delivery, ContentHeader(properties=properties), body, None)  # type: ignore[arg-type]


def test_a_delivery_is_read_once_from_what_aiormq_hands_over() -> None:
    sent = dt.datetime.fromtimestamp(1_600_000_000, tz=dt.UTC)
    message = _delivered(
        Basic.Deliver("ctag", 7, False, "notifyd", "user.42"),
        Basic.Properties(
            content_type="application/json",
            message_id="m-7",
            timestamp=sent,
            expiration="5000",
            headers={"notifyd-receipt": True},
        ),
        b'{"data": 1}',
    )
    delivery = Delivery.of(message)
    assert delivery == Delivery(
        "user.42", b'{"data": 1}', "m-7", 1_600_000_000.0, "5000",
        {"notifyd-receipt": True}, "application/json", 7,
    )  # fmt: skip
    assert delivery.published_at == 1_600_000_000.0
    notification = delivery.notification(ids=IdGenerator(), max_body_size=1000, now=NOW)
    assert (notification.id, notification.ts, notification.receipt) == (
        "m-7",
        1_600_000_000_000,
        True,
    )
    assert notification.expires_at == pytest.approx(1_600_000_005.0)

    bare = Delivery.of(
        _delivered(Basic.Deliver("c", 1, routing_key="broadcast"), Basic.Properties(), b"{}")
    )
    assert (bare.message_id, bare.timestamp, bare.headers, bare.published_at) == (
        None,
        None,
        {},
        None,
    )


def test_only_consumed_deliveries_are_read() -> None:
    with pytest.raises(TypeError):
        Delivery.of(_delivered(Basic.GetOk(1, False, "notifyd", "user.1"), Basic.Properties(), b""))


# --- content ids -----------------------------------------------------------------------

#: What a publisher may set, header values of every type AMQP tables carry.
PLAIN_PROPERTIES: dict[str, Any] = {
    "content_type": "application/json",
    "timestamp": dt.datetime.fromtimestamp(1_600_000_000, tz=dt.UTC),
    "expiration": "60000",
    "message_type": "order",
    "correlation_id": "c-1",
    "headers": {
        "tenant": "acme", "n": 7, "ratio": 0.5, "flag": True, "none": None, "raw": b"\x00\xff",
        "price": Decimal("9.99"), "at": dt.datetime(2024, 1, 2, tzinfo=dt.UTC),
        "nested": {"b": [1, "two", b"3"], "a": {}},
    },
}  # fmt: skip


def _plain_delivery(
    key: str = "user.42", body: bytes = b'{"data": 1}', tag: int = 1, **changes: Any
) -> Delivery:
    """A delivery of a message without message_id, as aiormq hands it over."""
    properties = {**PLAIN_PROPERTIES, **changes}
    return Delivery.of(
        _delivered(Basic.Deliver("c", tag, routing_key=key), Basic.Properties(**properties), body)
    )


def test_a_message_without_id_has_the_same_content_id_bits_on_every_replica() -> None:
    on_a = _plain_delivery(tag=3)
    # The stream's copy: RabbitMQ adds x- headers, may drop tables, arrays and decimals
    # (3.10 does), and the headers may come in another order.
    headers = {
        name: value
        for name, value in reversed(PLAIN_PROPERTIES["headers"].items())
        if not isinstance(value, dict | Decimal)
    }
    headers["x-stream-offset"] = 1234
    headers["x-death"] = [{"count": 1, "queue": "q", "reason": "expired"}]
    in_stream = _plain_delivery(tag=900, headers=headers)
    assert on_a.message_type == "order" and on_a.correlation_id == "c-1"
    assert on_a.digest() == in_stream.digest() and len(on_a.digest()) == 10
    first = on_a.notification(ids=IdGenerator(), max_body_size=1000, now=NOW)
    second = in_stream.notification(ids=IdGenerator(), max_body_size=1000, now=NOW + 0.25)
    assert id_digest(first.id) == id_digest(second.id) == on_a.digest()
    # The time part is when the replica received it, not the publish time (timestamp).
    assert id_timestamp_ms(first.id) == 1_700_000_000_000
    assert id_timestamp_ms(second.id) == 1_700_000_000_250
    assert first.ts == 1_600_000_000_000


@pytest.mark.parametrize(
    ("key", "body", "changes"),
    [
        ("user.43", b'{"data": 1}', {}),
        ("user.42", b'{"data": 2}', {}),
        ("user.42", b'{"data":1}', {}),  # the bytes count, not the JSON they hold
        ("user.42", b'{"data": 1}', {"content_type": "text/plain"}),
        (
            "user.42",
            b'{"data": 1}',
            {"timestamp": dt.datetime.fromtimestamp(1_600_000_001, tz=dt.UTC)},
        ),
        ("user.42", b'{"data": 1}', {"expiration": "60001"}),
        ("user.42", b'{"data": 1}', {"message_type": "refund"}),
        ("user.42", b'{"data": 1}', {"correlation_id": "c-2"}),
        ("user.42", b'{"data": 1}', {"headers": {**PLAIN_PROPERTIES["headers"], "n": 8}}),
        ("user.42", b'{"data": 1}', {"headers": {**PLAIN_PROPERTIES["headers"], "n": "7"}}),
        ("user.42", b'{"data": 1}', {"headers": {**PLAIN_PROPERTIES["headers"], "flag": 1}}),
        (
            "user.42",
            b'{"data": 1}',
            {"headers": {**PLAIN_PROPERTIES["headers"], "raw": b"\x00\xfe"}},
        ),
        (
            "user.42",
            b'{"data": 1}',
            {
                "headers": {
                    **PLAIN_PROPERTIES["headers"],
                    "at": dt.datetime(2024, 1, 3, tzinfo=dt.UTC),
                }
            },
        ),
        ("user.42", b'{"data": 1}', {"headers": None}),
    ],
)
def test_other_content_has_another_digest(key: str, body: bytes, changes: dict[str, Any]) -> None:
    assert _plain_delivery(key, body, **changes).digest() != _plain_delivery().digest()


def test_a_content_id_carries_the_content_digest() -> None:
    notification = _decode("user.42", b'{"data": 1}', headers={"a": 1}, expiration="5")
    digest = content_digest(
        "user.42", b'{"data": 1}', headers={"a": 1, "x-death": []}, expiration="5"
    )
    assert id_digest(notification.id) == digest
    assert Delivery("user.42", b'{"data": 1}', headers={"a": 1}, expiration="5").digest() == digest
    # A message_id is the id: no content id, however the content.
    assert _decode("user.42", b'{"data": 1}', message_id="m-1").id == "m-1"


def test_two_identical_messages_are_two_notifications() -> None:
    ids = IdGenerator()
    twice = [_plain_delivery().notification(ids=ids, max_body_size=1000, now=NOW) for _ in "ab"]
    assert twice[0].id != twice[1].id
    assert id_digest(twice[0].id) == id_digest(twice[1].id)


def test_control_messages() -> None:
    assert decode_control(b'{"action": "disconnect", "user": "42"}', 0) == Disconnect("42")
    assert decode_control(b'{"action": "revoke", "jti": "t1"}', 100) == Revoke(("t1",), 86_500)
    assert decode_control(b'{"action": "revoke", "jti": ["a", "b"], "until": 5}', 0) == Revoke(
        ("a", "b"), 5
    )
    for bad in [b"nope", b"[]", b'{"action": "disconnect", "user": "#"}', b'{"action": "revoke", "jti": []}',
                b'{"action": "revoke", "jti": "t", "until": true}', b'{"action": "explode"}']:  # fmt: skip
        with pytest.raises(InvalidMessage):
            decode_control(bad, 0)


# --- building --------------------------------------------------------------------------


def _as_delivered(message: aio_pika.Message, routing_key: str) -> Delivery:
    """``message`` as a consumer would read it after RabbitMQ routed it."""
    return Delivery.of(
        _delivered(Basic.Deliver("c", 1, routing_key=routing_key), message.properties, message.body)
    )


def test_a_published_notification_decodes_to_what_was_published() -> None:
    message = notification_message(
        {"order": 7}, message_id="n-1", now=NOW + 0.25, event="shipped", sender="bob",
        ttl=30, receipt=True,
    )  # fmt: skip
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert message.content_type == "application/json"
    delivery = _as_delivered(message, Channel.user("42").routing_key)
    notification = delivery.notification(ids=IdGenerator(), max_body_size=1000, now=NOW + 9)
    assert notification.id == "n-1" and notification.channel == Channel.user("42")
    # The header keeps the milliseconds the AMQP timestamp drops.
    assert notification.ts == int((NOW + 0.25) * 1000)
    assert notification.expires_at == pytest.approx(NOW + 30.25)
    assert notification.receipt
    assert _frame_json(notification.frame) == {
        "type": "notification", "id": "n-1", "channel": "user:42", "event": "shipped",
        "data": {"order": 7}, "ts": int((NOW + 0.25) * 1000), "from": "bob",
    }  # fmt: skip


def test_a_plain_notification_has_no_optional_properties() -> None:
    message = notification_message(1, message_id="n-2", now=NOW)
    assert message.expiration is None
    assert message.headers == {"notifyd-published-ms": int(NOW * 1000)}
    assert json.loads(message.body) == {"data": 1}


def test_notification_bodies_are_refused_as_the_replicas_would() -> None:
    assert json.loads(notification_body("x", "e", 100)) == {"data": "x", "event": "e"}
    with pytest.raises(ProtocolError) as refused:
        notification_body("x" * 100, None, 100)
    assert refused.value.code == "too_big"
    notification_body("x" * 100, None)  # no limit given: not checked
    deep: Any = []
    for _ in range(2000):
        deep = [deep]
    with pytest.raises(ProtocolError) as refused:
        notification_body(deep, None)
    assert refused.value.code == "too_deep"


def test_a_dead_letter_keeps_the_message_and_says_why() -> None:
    delivery = Delivery(
        "user.42", b"not json", "m-3", NOW, None, {"x-trace": "t1"}, "text/plain", 9
    )
    message = dead_letter_message(delivery, "not_json", "body is not JSON", "replica-a", NOW + 1)
    assert message.body == b"not json"
    assert (message.message_id, message.content_type) == ("m-3", "text/plain")
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert message.headers == {
        "x-trace": "t1", "notifyd-reason": "not_json", "notifyd-detail": "body is not JSON",
        "notifyd-routing-key": "user.42", "notifyd-replica": "replica-a",
    }  # fmt: skip


def test_receipts_and_upstream_messages() -> None:
    notification = Notification("n-4", Channel.topic("room"), b"", 1)
    receipt = receipt_message(notification, 2, "replica-a", NOW)
    assert receipt.delivery_mode == aio_pika.DeliveryMode.NOT_PERSISTENT
    assert json.loads(receipt.body) == {
        "id": "n-4", "channel": "topic:room", "delivered": 2, "online": True,
        "replica": "replica-a", "ts": int(NOW * 1000),
    }  # fmt: skip
    upstream = upstream_message("42", "s-1", "position", {"lat": 1}, message_id="u-1", now=NOW)
    assert upstream.message_id == "u-1"
    assert json.loads(upstream.body) == {
        "user": "42", "session": "s-1", "event": "position", "data": {"lat": 1},
        "ts": int(NOW * 1000),
    }  # fmt: skip
    assert upstream.headers == {
        "notifyd-user": "42",
        "notifyd-session": "s-1",
        "notifyd-event": "position",
    }


# --- lifecycle -------------------------------------------------------------------------


async def test_closing_the_stream_history_answers_the_reads_it_cancels() -> None:
    """A read in progress when the history closes is cancelled and awaited, and the
    sockets waiting on it are answered (None: not resumed) instead of left waiting."""
    from notifyd.config import AmqpSettings

    # Never connected: the read waits for the broker (up to its READ_TIMEOUT).
    broker = Broker(AmqpSettings(), lambda _: None, lambda _: None)
    history = StreamHistory(HistorySettings(backend="stream"), broker)
    waiting = asyncio.ensure_future(history.replay(ResumePoint("n-1"), [Channel.user("a")]))
    await asyncio.sleep(BATCH_WINDOW * 5)
    assert history._reads and not waiting.done()  # the read has started
    await history.close()
    assert await asyncio.wait_for(waiting, 1) is None
    assert not history._reads


# --- the stream's resume matcher -------------------------------------------------------

START_MS = 1_699_999_995_000


async def _scan(since: str, deliveries: list[Delivery], channels: list[str]) -> _Request:
    """One read of ``deliveries`` for a resume from ``since`` on ``channels``."""
    future: asyncio.Future[list[Notification] | None] = asyncio.get_running_loop().create_future()
    request = _Request(ResumePoint(since), frozenset(map(Channel.user, channels)), future)
    scan = _Scan([request], START_MS, NOW, 1000)
    for delivery in deliveries:
        scan(delivery)
    return request


def _stored(key: str = "user.42", body: bytes = b'{"data": 1}') -> Delivery:
    """A message without message_id as read from the stream (not expired)."""
    return _plain_delivery(key, body, expiration=None)


def _data(notifications: list[Notification]) -> list[Any]:
    return [_frame_json(n.frame)["data"] for n in notifications]


async def test_a_resume_point_without_message_id_is_found_by_its_content_id() -> None:
    stream = [
        _stored(body=b'{"data": 0}'),
        _stored("user.b", b'{"data": 1}'),  # the same content elsewhere
        _stored(body=b'{"data": 1}'),  # the client saw this one last
        _stored(body=b'{"data": 2}'),
        _stored(body=b'{"data": 2}'),  # the same twice: two notifications
        Delivery("user.a", b'{"data": 3}', message_id="m-3"),
        _stored("user.a", b'{"data": 4}'),
    ]
    seen_on_a = IdGenerator().content(stream[2].digest(), 1_700_000_000_000)
    request = await _scan(seen_on_a, stream, ["42", "a"])
    assert request.found
    assert _data(request.missed) == [2, 2, 3, 4]
    ids = [n.id for n in request.missed]
    assert len(set(ids)) == 4 and ids[2] == "m-3"
    # Replayed without message_id: content ids no earlier than the read's start.
    assert [id_timestamp_ms(i) for i in ids if i != "m-3"] == [START_MS, START_MS + 1, START_MS]
    assert id_digest(ids[0]) == id_digest(ids[1]) == stream[3].digest()

    # A later resume from a replayed id finds it (its time part bounds the next read).
    again = await _scan(ids[0], stream, ["42", "a"])
    assert _data(again.missed) == [2, 3, 4]


async def test_the_content_of_a_resume_point_matches_on_the_clients_channels_only() -> None:
    since = IdGenerator().content(_stored("user.b").digest(), 1_700_000_000_000)
    stream = [_stored("user.b"), _stored("user.42", b'{"data": 5}')]
    assert not (await _scan(since, stream, ["42"])).found
    # A message with a message_id is matched by it alone, whatever its content.
    since = IdGenerator().content(_stored().digest(), 1_700_000_000_000)
    with_id = Delivery(**{**_asdict(_stored()), "message_id": "m-1"})
    assert not (await _scan(since, [with_id], ["42"])).found
    assert (await _scan(since, [with_id, _stored()], ["42"])).found


async def test_a_message_id_matches_on_the_clients_channels_before_anywhere_else() -> None:
    """Publishers' ids are their own: another user's notification earlier in the stream
    with the same id is not where the client stopped (it would replay what the client
    had, and more). Found only elsewhere, it stands for a topic the socket joins after
    resuming, and the replay starts there."""
    mine = [Delivery("user.42", f'{{"data": {i}}}'.encode(), message_id=f"m-{i}") for i in range(4)]
    stream = [
        Delivery("user.other", b'{"data": "theirs"}', message_id="m-2"),
        Delivery("topic.lobby", b'{"data": "before"}', message_id="chat-1"),
        *mine,
    ]
    request = await _scan("m-2", stream, ["42"])
    assert request.found and _data(request.missed) == [3]
    elsewhere = await _scan("chat-1", stream, ["42"])
    assert elsewhere.found and _data(elsewhere.missed) == [0, 1, 2, 3]


async def test_identical_content_is_matched_at_its_first_occurrence() -> None:
    """A known limit: a repeat, never a loss."""
    stream = [_stored(body=b'{"data": "x"}'), _stored(body=b'{"data": 1}')]
    stream += [_stored(body=b'{"data": "x"}'), _stored(body=b'{"data": 2}')]
    since = IdGenerator().content(stream[2].digest(), 1_700_000_000_000)  # the second "x"
    assert _data((await _scan(since, stream, ["42"])).missed) == [1, "x", 2]


async def test_digests_are_computed_only_on_the_resuming_sockets_channels() -> None:
    stream = [_stored(f"user.other{n}") for n in range(50)] + [_stored()]
    since = IdGenerator().content(_stored().digest(), 1_700_000_000_000)
    with mock.patch.object(
        Delivery, "digest", autospec=True, side_effect=Delivery.digest
    ) as digest:
        request = await _scan(since, stream, ["42"])
    assert request.found and digest.call_count == 1


async def test_a_content_id_bounds_the_read_without_since_ts() -> None:
    """A resume from a content id costs a read from just before it, not the
    ``scan_without_time`` of an id that carries no time."""
    from notifyd.config import AmqpSettings
    from notifyd.stream import SKEW_MARGIN

    broker = Broker(AmqpSettings(), lambda _: None, lambda _: None)
    history = StreamHistory(HistorySettings(backend="stream", max_age=3600), broker)
    future: asyncio.Future[list[Notification] | None] = asyncio.get_running_loop().create_future()

    def start(since: str, since_ts: int | None = None) -> float:
        request = _Request(ResumePoint(since, since_ts), frozenset(), future)
        return history._start_offset([request], NOW).timestamp()

    content_id = IdGenerator().content(bytes(10), int((NOW - 600) * 1000))
    assert start(content_id) == NOW - 600 - SKEW_MARGIN
    assert start(str(uuid.uuid4())) == NOW - HistorySettings().scan_without_time
    # A replayed notification without publish time has the replay's time as ts: the
    # earlier time of the two counts.
    assert start(content_id, int((NOW - 10) * 1000)) == NOW - 600 - SKEW_MARGIN
    assert start(content_id, int((NOW - 900) * 1000)) == NOW - 900 - SKEW_MARGIN
    assert start(str(uuid.uuid4()), int((NOW - 10) * 1000)) == NOW - 10 - SKEW_MARGIN


def _asdict(delivery: Delivery) -> dict[str, Any]:
    return {name: getattr(delivery, name) for name in Delivery.__dataclass_fields__}


# --- against RabbitMQ ------------------------------------------------------------------


@pytest.fixture
def vhost(rabbit: RabbitNode) -> str:
    """An AMQP URL to a fresh vhost of the test node: a notifyd.dead of its own."""
    name = f"amqp-{uuid.uuid4().hex[:8]}"
    rabbit.ctl("add_vhost", name)
    rabbit.ctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
    return rabbit.amqp_url + name


async def _dead_letter_ids(channel: aio_pika.abc.AbstractChannel) -> list[str | None]:
    """The message ids in notifyd.dead (taken out of it)."""
    queue = await channel.declare_queue(DEAD_LETTER_QUEUE, passive=True)
    ids = []
    while (message := await queue.get(no_ack=True, fail=False)) is not None:
        ids.append(message.message_id)
    return ids


async def test_a_message_is_acked_only_once_its_dead_letter_is_confirmed(
    make_server: ServerFactory, vhost: str, caplog: pytest.LogCaptureFixture
) -> None:
    """RabbitMQ refuses the dead letter (notifyd.dead is full, ``reject-publish``): the
    bad message is not acked, so it is not lost; it comes back until RabbitMQ takes
    its dead letter. Messages after it are delivered meanwhile."""
    caplog.set_level(logging.WARNING)
    async with amqp_publisher(vhost) as amqp:
        channel = amqp.channel
        dlx = await channel.declare_exchange(
            DEAD_LETTER_EXCHANGE, aio_pika.ExchangeType.FANOUT, durable=True
        )
        dead = await channel.declare_queue(
            DEAD_LETTER_QUEUE,
            durable=True,
            arguments={"x-max-length": 1, "x-overflow": "reject-publish"},
        )
        await dead.bind(dlx)
        await dlx.publish(aio_pika.Message(b"{}", message_id="filler"), "")
        server = await make_server(url=vhost)
        user = new_user()
        ws, _ = await server.connect(user)
        before = server.sample("notifyd_dead_lettered_total", {"reason": "not_json"})

        await amqp.send(f"user.{user}", b"not json", message_id="poison")
        await amqp.send(f"user.{user}", {"data": "after"})
        assert (await receive_until(ws, "notification"))["data"] == "after"
        await asyncio.sleep(2.5)  # refused at least twice meanwhile
        assert [
            r for r in caplog.records if "dead letter for message id='poison'" in r.getMessage()
        ]
        assert server.sample("notifyd_dead_lettered_total", {"reason": "not_json"}) == before

        # Room in notifyd.dead (the filler taken out): the next attempt is taken.
        assert await _dead_letter_ids(channel) == ["filler"]
        deadline = time.monotonic() + 10
        found: list[str | None] = []
        while not found and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            found = await _dead_letter_ids(channel)
        assert found == ["poison"]
        assert server.sample("notifyd_dead_lettered_total", {"reason": "not_json"}) == before + 1
        # Settled: nothing more comes back.
        await asyncio.sleep(1.5)
        assert await _dead_letter_ids(channel) == []


async def test_receipts_in_flight_are_bounded(
    make_server: ServerFactory, amqp: AmqpPublisher, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    server = await make_server()
    broker: Broker = server.gateway.broker
    broker.max_receipts_in_flight = 3
    user = new_user()
    receipts = await amqp.channel.declare_exchange(
        RECEIPTS_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
    )
    queue = await amqp.channel.declare_queue(exclusive=True)
    await queue.bind(receipts, f"user.{user}")
    notification = Notification("r-1", Channel.user(user), b"", 1)
    before = server.sample("notifyd_receipts_total", {"outcome": "dropped"})

    # In one pass of the event loop: no confirm can come back in between.
    for _ in range(10):
        broker.send_receipt(notification, 1)
    assert server.sample("notifyd_receipts_total", {"outcome": "dropped"}) == before + 7
    assert len([r for r in caplog.records if "receipts await" in r.getMessage()]) == 1

    deadline = time.monotonic() + 5
    while broker._receipts_in_flight and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    broker.send_receipt(notification, 1)  # room again once confirmed
    got: list[str] = []
    while len(got) < 4 and time.monotonic() < deadline:
        message = await queue.get(no_ack=True, fail=False)
        if message is None:
            await asyncio.sleep(0.05)
        else:
            got.append(json.loads(message.body)["id"])
    assert got == ["r-1"] * 4
    assert server.sample("notifyd_receipts_total", {"outcome": "dropped"}) == before + 7


async def test_the_gateway_publishes_with_a_ttl_and_asks_for_receipts(
    make_server: ServerFactory, amqp: AmqpPublisher
) -> None:
    server = await make_server()
    user = new_user()
    exchange = await amqp.channel.get_exchange(EXCHANGE)
    queue = await amqp.channel.declare_queue(exclusive=True)
    await queue.bind(exchange, f"user.{user}")
    sent = await server.gateway.broker.publish(
        Channel.user(user), "e", {"x": 1}, ttl=60, receipt=True
    )
    deadline = time.monotonic() + 5
    while (message := await queue.get(no_ack=True, fail=False)) is None:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    assert message.message_id == sent
    assert message.expiration == 60
    assert message.headers["notifyd-receipt"] is True
    assert isinstance(message.headers["notifyd-published-ms"], int)


async def test_a_queue_and_a_stream_give_a_message_the_same_content_digest(
    amqp_url: str,
) -> None:
    """What a replica consumes from its queue and what a resume reads from the stream
    must name a message without message_id alike, whatever a publisher sets (on this
    RabbitMQ, a stream drops header tables and arrays; a decimal cannot be stored)."""
    headers = {
        "tenant": "acme", "n": 7, "big": 2**40, "neg": -3, "ratio": 0.5, "flag": True,
        "none": None, "raw": bytearray(b"\x00\xff"), "at": dt.datetime(2024, 1, 2, tzinfo=dt.UTC),
        "nested": {"b": [1, "two"], "a": {}}, "list": [1, 2.5, "x", True], "empty": "",
    }  # fmt: skip
    sent = [
        Basic.Properties(),
        Basic.Properties(**{**PLAIN_PROPERTIES, "headers": headers}),
    ]
    name = f"digest-{uuid.uuid4().hex[:8]}"
    connection = await aio_pika.connect(amqp_url)
    try:
        raw = await (await connection.channel()).get_underlay_channel()
        await raw.exchange_declare(name, exchange_type="topic", auto_delete=True)
        await raw.queue_declare(f"{name}.queue", auto_delete=True)
        await raw.queue_declare(
            f"{name}.stream", durable=True, arguments={"x-queue-type": "stream"}
        )
        got: dict[str, list[Delivery]] = {f"{name}.queue": [], f"{name}.stream": []}
        try:
            for queue in got:
                await raw.queue_bind(queue, name, routing_key="#")
            for n, properties in enumerate(sent):
                await raw.basic_publish(b'{"data": %d}' % n, exchange=name, routing_key="user.42", properties=properties)  # fmt: skip
            await raw.basic_qos(prefetch_count=10)
            for queue, into in got.items():

                async def take(message: DeliveredMessage, into: list[Delivery] = into) -> None:
                    into.append(Delivery.of(message))

                arguments: dict[str, FieldValue] | None = (
                    {"x-stream-offset": "first"} if queue.endswith("stream") else None
                )
                await raw.basic_consume(queue, take, no_ack=False, arguments=arguments)
            deadline = time.monotonic() + 10
            while any(len(d) < len(sent) for d in got.values()) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        finally:
            await raw.queue_delete(f"{name}.stream")
    finally:
        await connection.close()
    from_queue, from_stream = got.values()
    assert len(from_queue) == len(from_stream) == len(sent)
    assert from_stream[1].message_type == "order"  # the properties did reach the stream
    for replica, stream in zip(from_queue, from_stream, strict=True):
        assert replica.digest() == stream.digest()
    assert from_queue[0].digest() != from_queue[1].digest()
