"""The AMQP side of notifyd's outside contract, with no I/O.

What backend services and operators rely on lives here and nowhere else: the
names of exchanges, queues and streams, notifyd's headers, how a delivery's
properties are read (:class:`Delivery`), what a notification and a control
command look like on the wire (:func:`decode_notification`,
:func:`decode_control`) and every message notifyd publishes (notifications,
upstream messages, receipts, dead letters). The broker, the shared history, the
revocation log and the publisher helper all go through this module; the
WebSocket side of the contract is :mod:`notifyd.protocol`.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final

import aio_pika
from pamqp.commands import Basic

from .errors import InvalidMessage, ProtocolError
from .protocol import (
    DIGEST_SIZE,
    MAX_ID_LENGTH,
    IdGenerator,
    JSONDecodeError,
    JSONEncodeError,
    Notification,
    channel_for_routing_key,
    dumps,
    loads,
    notification,
    valid_event,
    valid_name,
)
from .websocket import text_frame

if TYPE_CHECKING:
    from aiormq.abc import DeliveredMessage

# --- names -----------------------------------------------------------------------------

#: The topic exchange backends publish notifications to (``user.<id>``, ``topic.<name>``,
#: ``broadcast``) and control messages (:data:`CONTROL_ROUTING_KEY`).
EXCHANGE: Final = "notifyd"
DEAD_LETTER_EXCHANGE: Final = "notifyd.dlx"
DEAD_LETTER_QUEUE: Final = "notifyd.dead"
#: Clients' ``send`` messages to the backends, routing key ``user.<id>``.
UPSTREAM_EXCHANGE: Final = "notifyd.upstream"
#: Delivery receipts, routing key that of the notification.
RECEIPTS_EXCHANGE: Final = "notifyd.receipts"
#: The stream that keeps what the ``notifyd`` exchange routed (resume on any replica).
HISTORY_STREAM: Final = "notifyd.history"
#: The stream that keeps control messages (revocations are cluster-wide and durable).
REVOCATION_STREAM: Final = "notifyd.revocations"
CONTROL_ROUTING_KEY: Final = "control"
#: Internal topic exchange that ``notifyd`` forwards everything to (exchange-to-exchange
#: binding ``#``). Replica queues bind the keys of the users and topics they hold, and
#: ``broadcast`` and ``control``, here; what it routes to no queue goes to its alternate
#: exchange :data:`UNROUTED_EXCHANGE` (the streams are bound on ``notifyd`` itself, so an
#: alternate exchange there would never fire).
ROUTE_EXCHANGE: Final = "notifyd.route"
#: Internal topic exchange for what :data:`ROUTE_EXCHANGE` routed nowhere; its queue
#: :data:`UNROUTED_QUEUE` (bound ``user.#``) feeds the offline hook; the rest is dropped.
UNROUTED_EXCHANGE: Final = "notifyd.unrouted"
UNROUTED_QUEUE: Final = "notifyd.unrouted"
#: Where the offline hook sends a ``user.<id>`` notification no replica holds (topic,
#: routing key unchanged), and the queue bound to it with ``#`` by default.
OFFLINE_EXCHANGE: Final = "notifyd.offline"
OFFLINE_QUEUE: Final = "notifyd.offline"
#: Routing key :data:`UNROUTED_QUEUE` is bound with: only users' notifications.
OFFLINE_BINDING: Final = "user.#"

# --- cluster-wide presence and queries (notifyd.cluster) -----------------------------

#: Fanout exchange of the replicas' beacons and queries (each replica binds a queue).
CLUSTER_EXCHANGE: Final = "notifyd.cluster"
#: Topic exchange of presence transitions, routing key ``user.<id>``.
PRESENCE_EXCHANGE: Final = "notifyd.presence"
#: Per-replica socket reports for the one aggregating replica (single active consumer).
DELTAS_QUEUE: Final = "notifyd.presence.deltas"
#: A stream bound to ``notifyd.presence`` (``#``): what the aggregators announced, read
#: back by the next one (who was online when the previous one went away).
PRESENCE_LOG: Final = "notifyd.presence.log"

#: The exchanges every replica and publisher declares (idempotently), with their type.
EXCHANGES: Final = (
    (EXCHANGE, aio_pika.ExchangeType.TOPIC),
    (DEAD_LETTER_EXCHANGE, aio_pika.ExchangeType.FANOUT),
    (UPSTREAM_EXCHANGE, aio_pika.ExchangeType.TOPIC),
    (RECEIPTS_EXCHANGE, aio_pika.ExchangeType.TOPIC),
)

# --- headers ---------------------------------------------------------------------------

#: Header carrying the publish time in integer milliseconds, for ``ts`` and the latency
#: histogram (AMQP ``timestamp`` has whole seconds only; AMQP floats may be 32-bit).
PUBLISHED_AT_HEADER: Final = "notifyd-published-ms"
#: Header naming the user who published through a socket (set by notifyd only).
FROM_HEADER: Final = "notifyd-from"
#: Header asking for a delivery receipt on ``notifyd.receipts``.
RECEIPT_HEADER: Final = "notifyd-receipt"
#: Header of the marker a reader appends to a stream to know where its read ends.
MARKER_HEADER: Final = "notifyd-marker"
#: What RabbitMQ puts on each message read from a stream: its position (offset) in it.
STREAM_OFFSET_HEADER: Final = "x-stream-offset"
#: Headers notifyd adds to a dead letter (the original's headers are kept).
REASON_HEADER: Final = "notifyd-reason"
DETAIL_HEADER: Final = "notifyd-detail"
ROUTING_KEY_HEADER: Final = "notifyd-routing-key"
REPLICA_HEADER: Final = "notifyd-replica"
#: Headers of an upstream message: who sent it, from which socket, which event.
USER_HEADER: Final = "notifyd-user"
SESSION_HEADER: Final = "notifyd-session"
EVENT_HEADER: Final = "notifyd-event"
#: Header the offline hook adds (``true``) to what it sends to ``notifyd.offline``.
OFFLINE_HEADER: Final = "notifyd-offline"

_NO_HEADERS: Final[Mapping[str, Any]] = MappingProxyType({})

# --- deliveries ------------------------------------------------------------------------


#: Publish times past this (9999-12-31, in ms) are ignored: ``ts`` must stay an int64.
_MAX_PUBLISHED_MS: Final = 253_402_300_799_999


def published_time(timestamp: float | None, headers: Mapping[str, Any] | None) -> float | None:
    """When a message was published (unix s): header ``notifyd-published-ms`` if it holds
    an integer in range, else the AMQP ``timestamp`` (unix s), else None. Never raises."""
    published_ms = (headers or _NO_HEADERS).get(PUBLISHED_AT_HEADER)
    if (
        isinstance(published_ms, int)
        and not isinstance(published_ms, bool)
        and 0 <= published_ms <= _MAX_PUBLISHED_MS
    ):
        return published_ms / 1000
    return timestamp


# --- content ids -----------------------------------------------------------------------

#: Personalises the digest, so that a content id can be told from a hash of anything else.
_DIGEST_PERSON: Final = b"notifyd-content"


def _broker_header(name: str) -> bool:
    """Whether RabbitMQ may add or change header ``name`` on the way (``x-death``,
    ``x-first-death-*``, ``x-delivery-count``, ``x-stream-offset``, ``x-received-from``,
    ...): one copy of a message (a replica's queue, the stream) may carry it, another
    not, so it is no part of a content digest."""
    return name[:2].lower() == "x-"


def _canonical(value: Any, out: list[bytes]) -> bool:
    """Append an unambiguous encoding of a scalar AMQP field value (a type tag, then
    the value, length-prefixed where it has no fixed end); False, appending nothing,
    for a value that may not reach the stream as sent.

    A stream keeps messages as AMQP 1.0: RabbitMQ 3.10 drops header values that are
    tables or arrays there, and refuses decimals (tests/test_amqp.py checks what
    the test node keeps). Text and bytes are encoded alike: AMQP 1.0 tells strings
    from binary otherwise than 0-9-1 does.
    """
    if value is None:
        out.append(b"N")
    elif isinstance(value, bool):  # before int: bool is an int
        out.append(b"T" if value else b"F")
    elif isinstance(value, int):
        out.append(b"i%d;" % value)
    elif isinstance(value, float):
        out.append(b"f" + value.hex().encode() + b";")
    elif isinstance(value, str | bytes | bytearray):
        raw = value.encode() if isinstance(value, str) else bytes(value)
        out.append(b"s%d:" % len(raw))
        out.append(raw)
    elif isinstance(value, datetime):
        aware = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
        out.append(b"t%d;" % int(aware.timestamp()))  # AMQP 0-9-1 has whole seconds
    else:
        return False
    return True


def content_digest(
    routing_key: str,
    body: bytes,
    *,
    content_type: str | None = None,
    timestamp: float | None = None,
    expiration: str | None = None,
    message_type: str | None = None,
    correlation_id: str | None = None,
    headers: Mapping[str, Any] | None = None,
) -> bytes:
    """The :data:`DIGEST_SIZE`-byte BLAKE2b digest of what a publisher set on a message
    without ``message_id``: identical on every replica's copy and in the stream, so
    its content id (:meth:`IdGenerator.content`) names it everywhere. Left out: headers
    RabbitMQ adds on the way (``x-*``) and header values a stream may not keep as sent
    (tables, arrays, decimals): see :func:`_canonical`. Never raises."""
    out: list[bytes] = []
    fields = (routing_key, body, content_type, timestamp, expiration, message_type, correlation_id)
    for value in fields:
        _canonical(value, out)
    headers = headers or _NO_HEADERS
    for name in sorted(headers):
        if _broker_header(name):
            continue
        mark = len(out)
        _canonical(name, out)
        if not _canonical(headers[name], out):
            del out[mark:]
    return hashlib.blake2b(b"".join(out), digest_size=DIGEST_SIZE, person=_DIGEST_PERSON).digest()


@dataclass(frozen=True, slots=True)
class Delivery:
    """What notifyd reads of one AMQP delivery, its properties decoded once.

    Built with :meth:`of` from what aiormq delivers, or by hand (tests, tools).
    """

    routing_key: str
    body: bytes
    message_id: str | None = None
    #: The AMQP ``timestamp`` property (unix s), if any.
    timestamp: float | None = None
    #: The AMQP ``expiration`` property (milliseconds, as a string), if any.
    expiration: str | None = None
    headers: Mapping[str, Any] = field(default_factory=dict)
    content_type: str | None = None
    #: The delivery tag on the channel it came on (0 when built by hand).
    tag: int = 0
    #: The AMQP ``type`` and ``correlation_id`` properties (part of a content digest).
    message_type: str | None = None
    correlation_id: str | None = None

    @classmethod
    def of(cls, message: DeliveredMessage) -> Delivery:
        """Read a consumed message (a ``basic.deliver``); raises TypeError for any other
        frame (``basic.get``/``basic.return`` results are not consumed through here)."""
        deliver = message.delivery
        if not isinstance(deliver, Basic.Deliver):
            raise TypeError(f"not a consumed delivery: {type(deliver).__name__}")
        properties = message.header.properties
        timestamp = properties.timestamp
        return cls(
            deliver.routing_key or "",
            message.body,
            properties.message_id,
            timestamp.timestamp() if timestamp is not None else None,
            properties.expiration,
            properties.headers or _NO_HEADERS,
            properties.content_type,
            deliver.delivery_tag or 0,
            properties.message_type,
            properties.correlation_id,
        )

    @property
    def published_at(self) -> float | None:
        """When it was published (unix s), if it says: see :func:`published_time`."""
        return published_time(self.timestamp, self.headers)

    def digest(self) -> bytes:
        """Its :func:`content_digest` (whether or not it has a ``message_id``)."""
        return content_digest(
            self.routing_key,
            self.body,
            content_type=self.content_type,
            timestamp=self.timestamp,
            expiration=self.expiration,
            message_type=self.message_type,
            correlation_id=self.correlation_id,
            headers=self.headers,
        )

    def notification(
        self,
        *,
        ids: IdGenerator,
        max_body_size: int,
        now: float,
        id_ms: int | None = None,
        digest: bytes | None = None,
    ) -> Notification:
        """This delivery as a notification: see :func:`decode_notification`.
        ``digest``: its :meth:`digest`, if already computed."""
        return decode_notification(
            self, ids=ids, max_body_size=max_body_size, now=now, id_ms=id_ms, digest=digest
        )


def decode_notification(
    delivery: Delivery,
    *,
    ids: IdGenerator,
    max_body_size: int,
    now: float,
    id_ms: int | None = None,
    digest: bytes | None = None,
) -> Notification:
    """Turn a message on the ``notifyd`` exchange into a :class:`Notification`.

    One without a ``message_id`` is named by ``ids`` with a content id: the time part
    ``id_ms`` (unix ms; default: ``now``, when it was received), then its
    :meth:`Delivery.digest` (``digest`` if already computed, else computed once the
    message is known to be valid). ``now`` (unix s) also stands in for a publish time
    it does not carry. Raises :class:`InvalidMessage`,
    whose ``reason`` is the dead-letter reason: ``bad_key``, ``too_big``, ``not_json``,
    ``bad_body`` or ``too_deep``.
    """
    routing_key, body, message_id = delivery.routing_key, delivery.body, delivery.message_id
    channel = channel_for_routing_key(routing_key)
    if channel is None:
        raise InvalidMessage("bad_key", f"routing key {routing_key[:64]!r} is not routable")
    if len(body) > max_body_size:
        raise InvalidMessage("too_big", f"body of {len(body)} bytes exceeds {max_body_size}")
    try:
        payload = loads(body)
    except JSONDecodeError:
        raise InvalidMessage("not_json", "body is not JSON") from None
    if not isinstance(payload, dict) or "data" not in payload:
        raise InvalidMessage("bad_body", "body must be a JSON object with 'data'")
    event = payload.get("event")
    if event is not None and not valid_event(event):
        raise InvalidMessage("bad_body", "'event' must be a short name")
    if message_id is not None and (not message_id or len(message_id) > MAX_ID_LENGTH):
        raise InvalidMessage("bad_body", "message_id must be 1..128 characters")
    headers = delivery.headers or _NO_HEADERS
    published_at = published_time(delivery.timestamp, headers)
    sent_at = published_at if published_at is not None else now
    ts = int(sent_at * 1000)
    if message_id is None:
        if digest is None:
            digest = delivery.digest()
        notification_id = ids.content(digest, int(now * 1000) if id_ms is None else id_ms)
    else:
        notification_id = message_id
    expires_at = None
    expiration = delivery.expiration
    if expiration:
        try:
            expires_at = sent_at + int(expiration) / 1000
        except ValueError:
            raise InvalidMessage("bad_body", "expiration must be milliseconds") from None
    sender = headers.get(FROM_HEADER)
    try:
        frame = text_frame(
            notification(
                notification_id,
                str(channel),
                event,
                payload["data"],
                ts,
                sender if isinstance(sender, str) else None,
            )
        )
    except JSONEncodeError:
        # Parsed, but nested deeper than the encoder writes: refused like any bad body.
        raise InvalidMessage("too_deep", "'data' is nested too deeply to deliver") from None
    return Notification(
        id=notification_id,
        channel=channel,
        frame=frame,
        ts=ts,
        expires_at=expires_at,
        published_at=published_at,
        receipt=bool(headers.get(RECEIPT_HEADER)),
    )


# --- control messages (routing key ``control``) ----------------------------------------


@dataclass(frozen=True, slots=True)
class Disconnect:
    """Close every socket of ``user`` (on every replica) with 4001/4003."""

    user: str


@dataclass(frozen=True, slots=True)
class Revoke:
    """Refuse token ids from now on and close the sockets that use them."""

    token_ids: tuple[str, ...]
    until: float


ControlCommand = Disconnect | Revoke


#: Revocations without ``until`` last this long after ``now`` (the message's publish time).
DEFAULT_REVOCATION_SECONDS: Final = 86_400.0


def decode_control(body: bytes, now: float) -> ControlCommand:
    """``{"action":"disconnect","user":ID}`` or ``{"action":"revoke","jti":[...],"until":T}``.

    ``now`` is when the message was published, when known: a revocation read again
    later (from ``notifyd.revocations``) must not last longer for being read late.
    Raises :class:`InvalidMessage` (``not_json``, ``bad_body``) for anything else.
    """
    try:
        payload = loads(body)
    except JSONDecodeError:
        raise InvalidMessage("not_json", "control body is not JSON") from None
    if not isinstance(payload, dict):
        raise InvalidMessage("bad_body", "control body must be an object")
    action = payload.get("action")
    if action == "disconnect" and valid_name(payload.get("user")):
        return Disconnect(payload["user"])
    if action == "revoke":
        token_ids = payload.get("jti")
        if isinstance(token_ids, str):
            token_ids = [token_ids]
        until = payload.get("until", now + DEFAULT_REVOCATION_SECONDS)
        if (
            isinstance(token_ids, list)
            and token_ids
            and all(isinstance(t, str) and 0 < len(t) <= MAX_ID_LENGTH for t in token_ids)
            and isinstance(until, int | float)
            and not isinstance(until, bool)
            and math.isfinite(until)
        ):
            return Revoke(tuple(token_ids), float(until))
    raise InvalidMessage("bad_body", "control action must be disconnect{user} or revoke{jti}")


# --- what notifyd publishes ------------------------------------------------------------


def notification_body(data: Any, event: str | None, max_body_size: int | None = None) -> bytes:
    """The AMQP body of a notification, refused as the replicas would refuse it.

    Checked as published, not as received: a client's or an HTTP caller's JSON
    may grow when written again (``1e15`` becomes ``1000000000000000.0``).
    Raises :class:`ProtocolError` ``too_deep`` (``data`` nests deeper than the
    encoder writes) or ``too_big`` (past ``max_body_size`` bytes; None: unchecked).
    """
    payload: dict[str, Any] = {"data": data}
    if event is not None:
        payload["event"] = event
    try:
        body = dumps(payload)
    except JSONEncodeError:
        raise ProtocolError("too_deep", "'data' is nested too deeply") from None
    if max_body_size is not None and len(body) > max_body_size:
        raise ProtocolError(
            "too_big",
            f"the notification is {len(body)} bytes as published; the limit is "
            f"{max_body_size} ([amqp] max_body_size)",
        )
    return body


def _message(
    body: bytes,
    now: float,
    *,
    message_id: str | None = None,
    headers: Mapping[str, Any] | None = None,
    content_type: str | None = "application/json",
    persistent: bool = True,
    expiration: float | None = None,
) -> aio_pika.Message:
    return aio_pika.Message(
        body,
        message_id=message_id,
        content_type=content_type,
        headers=dict(headers) if headers is not None else None,
        timestamp=now,
        expiration=expiration,
        delivery_mode=(
            aio_pika.DeliveryMode.PERSISTENT if persistent else aio_pika.DeliveryMode.NOT_PERSISTENT
        ),
    )


def notification_message(
    data: Any,
    *,
    message_id: str,
    now: float,
    event: str | None = None,
    sender: str | None = None,
    ttl: float | None = None,
    receipt: bool = False,
    max_body_size: int | None = None,
) -> aio_pika.Message:
    """A notification as published to ``notifyd`` (the routing key is the channel's).

    Persistent JSON with ``message_id``, ``timestamp`` and :data:`PUBLISHED_AT_HEADER`
    (``now``, unix s); :data:`FROM_HEADER` with ``sender`` (a user publishing through
    a socket); ``expiration`` from ``ttl`` (seconds; replicas drop it once older);
    :data:`RECEIPT_HEADER` with ``receipt``. Raises :class:`ProtocolError` as
    :func:`notification_body` does.
    """
    body = notification_body(data, event, max_body_size)
    headers: dict[str, Any] = {PUBLISHED_AT_HEADER: int(now * 1000)}
    if sender is not None:
        headers[FROM_HEADER] = sender
    if receipt:
        headers[RECEIPT_HEADER] = True
    return _message(body, now, message_id=message_id, headers=headers, expiration=ttl)


def upstream_message(
    user: str, session: str, event: str, data: Any, *, message_id: str, now: float
) -> aio_pika.Message:
    """A client's ``send`` as published to ``notifyd.upstream`` (key ``user.<id>``).

    The body says who sent it (``user``, ``session``), ``event``, ``data`` and ``ts``
    (``now`` in unix ms); the same in headers, for routing without parsing.
    Raises the JSON encoder's error for data it cannot write (checked on receipt).
    """
    body = dumps(
        {"user": user, "session": session, "event": event, "data": data, "ts": int(now * 1000)}
    )
    headers = {USER_HEADER: user, SESSION_HEADER: session, EVENT_HEADER: event}
    return _message(body, now, message_id=message_id, headers=headers)


def receipt_message(
    notification: Notification, delivered: int, replica: str, now: float
) -> aio_pika.Message:
    """A receipt for ``notification`` (routing key that of its channel): how many of
    this ``replica``'s sockets got it. Transient: it is worth nothing after a restart."""
    body = dumps({
        "id": notification.id,
        "channel": str(notification.channel),
        "delivered": delivered,
        "online": delivered > 0,
        "replica": replica,
        "ts": int(now * 1000),
    })  # fmt: skip
    return _message(body, now, persistent=False)


def dead_letter_message(
    delivery: Delivery, reason: str, detail: str, replica: str, now: float
) -> aio_pika.Message:
    """``delivery`` as published to ``notifyd.dlx``: its body, ``message_id``,
    ``content_type`` and headers, plus why (``reason``, ``detail``), its routing key
    and which ``replica`` refused it."""
    headers = dict(delivery.headers)
    headers.update({
        REASON_HEADER: reason,
        DETAIL_HEADER: detail,
        ROUTING_KEY_HEADER: delivery.routing_key,
        REPLICA_HEADER: replica,
    })  # fmt: skip
    return _message(
        delivery.body,
        now,
        message_id=delivery.message_id,
        headers=headers,
        content_type=delivery.content_type,
    )


def offline_message(delivery: Delivery) -> tuple[bytes, Basic.Properties]:
    """``delivery`` (a notification no replica held) as sent to ``notifyd.offline``:
    its body and properties (``message_id``, ``content_type``, ``timestamp``,
    ``expiration`` as published, so that consumers read the same expiry), persistent,
    its headers plus :data:`OFFLINE_HEADER`."""
    headers = dict(delivery.headers)
    headers[OFFLINE_HEADER] = True
    timestamp = delivery.timestamp
    return delivery.body, Basic.Properties(
        message_id=delivery.message_id,
        content_type=delivery.content_type,
        headers=headers,
        timestamp=(None if timestamp is None else datetime.fromtimestamp(timestamp, tz=UTC)),
        expiration=delivery.expiration,
        delivery_mode=2,
    )


def marker_properties(marker: str) -> Basic.Properties:
    """The properties of a stream reader's end marker (its body is ``{}``)."""
    return Basic.Properties(headers={MARKER_HEADER: marker})
