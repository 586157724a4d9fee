"""The WebSocket wire protocol, with no I/O: client messages in, server JSON out.

Everything here is pure: parsing and validating what a client sends, naming
channels (and the AMQP routing key each one is), notification ids, and building
the JSON a client receives. The frames that carry it are :mod:`notifyd.websocket`'s;
the AMQP side of the contract is :mod:`notifyd.amqp`.
"""

from __future__ import annotations

import enum
import json
import os
import re
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeGuard

from .errors import ProtocolError

try:  # orjson is an optional speed-up; the stdlib gives the same bytes for our payloads.
    import orjson

    def dumps(obj: Any) -> bytes:
        return orjson.dumps(obj)

    def loads(data: str | bytes) -> Any:
        return orjson.loads(data)

    JSONDecodeError: tuple[type[Exception], ...] = (orjson.JSONDecodeError,)
    #: orjson parses 1,024 levels of nesting but writes only ~254.
    JSONEncodeError: tuple[type[Exception], ...] = (orjson.JSONEncodeError,)
except ImportError:  # pragma: no cover - exercised only without the extra

    def dumps(obj: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()

    def loads(data: str | bytes) -> Any:
        return json.loads(data)

    JSONDecodeError = (json.JSONDecodeError, UnicodeDecodeError, RecursionError)
    JSONEncodeError = (ValueError, TypeError, RecursionError)


SUBPROTOCOL: Final = "notifyd.v1"


class CloseCode(enum.IntEnum):
    """WebSocket close codes; clients decide whether to reconnect from these."""

    GOING_AWAY = 1001  # drain or shutdown: reconnect (elsewhere)
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    TRY_AGAIN_LATER = 1013  # overloaded / connection limit
    PROTOCOL_ERROR = 4000
    UNAUTHORIZED = 4001  # missing or invalid token
    FORBIDDEN = 4003  # e.g. per-user connection limit, refresh for another user
    AUTH_TIMEOUT = 4008
    SLOW_CONSUMER = 4009  # bounded send buffer overflowed
    TOKEN_EXPIRED = 4010
    RATE_LIMITED = 4029


# --- identifiers and channels ------------------------------------------------------

#: User ids and topic names: dot-separated words of a safe ASCII set. No ``*``, ``#``
#: or whitespace, so that a value can never widen an AMQP topic binding.
_NAME = re.compile(r"[A-Za-z0-9_@:+=~-]+(?:\.[A-Za-z0-9_@:+=~-]+)*")
MAX_NAME_LENGTH: Final = 128


def valid_name(value: object) -> TypeGuard[str]:
    """Whether ``value`` may be a user id or topic name (and so part of a routing key)."""
    return (
        isinstance(value, str)
        and 0 < len(value) <= MAX_NAME_LENGTH
        and _NAME.fullmatch(value) is not None
    )


#: ``presence`` only as what a socket subscribes to (``presence:<id>``, issue 16.3): it
#: is never published to, and has no routing key on ``notifyd``.
ChannelKind = Literal["user", "topic", "broadcast", "presence"]


@dataclass(frozen=True, slots=True)
class Channel:
    """``user:<id>``, ``topic:<name>`` or ``broadcast``.

    Make one with :meth:`user`, :meth:`topic` or :data:`BROADCAST` (which check the
    name), or from text with :func:`parse_channel` / :func:`channel_for_routing_key`.
    """

    kind: ChannelKind
    name: str = ""

    @classmethod
    def user(cls, user_id: str) -> Channel:
        """The channel of user ``user_id``; raises ValueError unless :func:`valid_name`."""
        return cls._named("user", user_id)

    @classmethod
    def topic(cls, name: str) -> Channel:
        """The channel of topic ``name``; raises ValueError unless :func:`valid_name`."""
        return cls._named("topic", name)

    @classmethod
    def _named(cls, kind: Literal["user", "topic"], name: str) -> Channel:
        if not valid_name(name):
            raise ValueError(
                f"invalid {kind} name {name!r}: no '*', '#', spaces; at most "
                f"{MAX_NAME_LENGTH} characters"
            )
        return cls(kind, name)

    def __str__(self) -> str:
        return "broadcast" if self.kind == "broadcast" else f"{self.kind}:{self.name}"

    @property
    def routing_key(self) -> str:
        """Its AMQP routing key on ``notifyd``: ``user.<id>``, ``topic.<name>``, ``broadcast``."""
        return "broadcast" if self.kind == "broadcast" else f"{self.kind}.{self.name}"


BROADCAST: Final = Channel("broadcast")


def _named_channel(kind: str, name: str) -> Channel | None:
    if kind == "user" and valid_name(name):
        return Channel("user", name)
    if kind == "topic" and valid_name(name):
        return Channel("topic", name)
    return None


def parse_channel(text: object, presence: bool = False) -> Channel:
    """Parse a client-facing channel name (``user:<id>``, ``topic:<name>``,
    ``broadcast``, and with ``presence`` also ``presence:<id>``); raises
    ProtocolError ``invalid_channel`` for anything else."""
    if text == "broadcast":
        return BROADCAST
    if isinstance(text, str):
        kind, sep, name = text.partition(":")
        channel = _named_channel(kind, name) if sep else None
        if presence and channel is None and kind == "presence" and valid_name(name):
            channel = Channel("presence", name)
        if channel is not None:
            return channel
    raise ProtocolError("invalid_channel", "channel must be user:<id>, topic:<name> or broadcast")


def channel_for_routing_key(key: str) -> Channel | None:
    """The channel an AMQP routing key addresses, or None for a key we do not route."""
    if key == "broadcast":
        return BROADCAST
    kind, sep, name = key.partition(".")
    return _named_channel(kind, name) if sep else None


# --- notification ids -----------------------------------------------------------------

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_CROCKFORD_VALUES: Final = {char: value for value, char in enumerate(_CROCKFORD)}
#: Bits of an id after its time part: random in a generated id, a content digest's in
#: a content id (:meth:`IdGenerator.content`).
ID_RANDOM_BITS: Final = 80
#: Bytes of a content digest, all of which go into a content id.
DIGEST_SIZE: Final = ID_RANDOM_BITS // 8
_RANDOM_MASK: Final = (1 << ID_RANDOM_BITS) - 1
_MAX_MS: Final = (1 << 48) - 1
#: Digests whose content id took a millisecond not yet past, at most (see
#: :meth:`IdGenerator.content`); older entries no longer matter and are dropped.
CONTENT_MEMORY: Final = 65_536


def format_id(ms: int, bits: int) -> str:
    """The 26-character ULID of ``ms`` (48 bits) and ``bits`` (80 bits)."""
    value = ((ms & _MAX_MS) << ID_RANDOM_BITS) | (bits & _RANDOM_MASK)
    chars = []
    for _ in range(26):
        chars.append(_CROCKFORD[value & 31])
        value >>= 5
    return "".join(reversed(chars))


def _parse_id(notification_id: str) -> int | None:
    """The 128-bit value of a ULID, or None if ``notification_id`` is not one."""
    if len(notification_id) != 26:
        return None
    value = 0
    for char in notification_id:
        digit = _CROCKFORD_VALUES.get(char)
        if digit is None:
            return None
        value = value * 32 + digit
    # 26 characters hold 130 bits; in a ULID the top 2 are zero.
    return value if value >> 128 == 0 else None


class IdGenerator:
    """ULID-style ids: 48-bit milliseconds + 80 more bits.

    :meth:`new`: 80 random bits, strictly increasing in-process. :meth:`content`: the
    bits of a content digest, so that every replica (and a reader of the shared
    stream) names the same message without ``message_id`` with the same 80 bits.
    """

    def __init__(self, memory: int = CONTENT_MEMORY) -> None:
        self._last_ms = -1
        self._last_rand = 0
        self._memory = memory
        #: Never decreases: a clock stepping back must not hand out an id again.
        self._content_ms = -1
        #: digest -> the millisecond its last content id took (updated entries last).
        self._recent: OrderedDict[bytes, int] = OrderedDict()

    def new(self, now_ms: int | None = None) -> str:
        """A new id for ``now_ms`` (unix ms; default: now), greater than every earlier one."""
        ms = int(time.time() * 1000) if now_ms is None else now_ms
        if ms <= self._last_ms:
            ms = self._last_ms
            rand = self._last_rand + 1
        else:
            rand = int.from_bytes(os.urandom(10), "big") >> 1  # leave room to increment
        self._last_ms, self._last_rand = ms, rand
        return format_id(ms, rand)

    def content(self, digest: bytes, now_ms: int | None = None) -> str:
        """The content id of a message without ``message_id``: time part ``now_ms``
        (unix ms; default: now), then the first 80 bits of ``digest``.

        Clients drop a notification whose id they already got, so the same content
        twice in one millisecond takes the next millisecond (per digest only: other
        content keeps the clock's time). Remembers at most ``memory`` digests, those
        whose last id is not yet in the past.
        """
        ms = max(int(time.time() * 1000) if now_ms is None else now_ms, self._content_ms)
        self._content_ms = ms
        recent = self._recent
        while recent:
            oldest, oldest_ms = next(iter(recent.items()))
            if oldest_ms >= ms and len(recent) < self._memory:
                break
            del recent[oldest]
        last = recent.pop(digest, None)
        if last is not None and last >= ms:  # this content took ``ms`` already
            ms = last + 1
        recent[digest] = ms  # last: entries go in the order they were last used
        return format_id(ms, int.from_bytes(digest[:DIGEST_SIZE], "big"))


def id_timestamp_ms(notification_id: str) -> int | None:
    """Milliseconds encoded in a ULID (generated or content id), or None if it is not one."""
    value = _parse_id(notification_id)
    return None if value is None else value >> ID_RANDOM_BITS


def id_digest(notification_id: str) -> bytes | None:
    """The 80 bits after the time part of a ULID, as :data:`DIGEST_SIZE` bytes (a content
    id's digest: see :meth:`IdGenerator.content`), or None if it is not a ULID."""
    value = _parse_id(notification_id)
    return None if value is None else (value & _RANDOM_MASK).to_bytes(DIGEST_SIZE, "big")


# --- client -> server -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ResumePoint:
    """The last notification a client saw: its id, and optionally its ``ts``.

    ``ts`` (unix ms, from the notification) lets a shared history start reading
    near the gap even when the id carries no time (a publisher's own message_id).
    """

    id: str
    ts: int | None = None


@dataclass(frozen=True, slots=True)
class Auth:
    token: str
    since: ResumePoint | None = None
    ref: Any = None


@dataclass(frozen=True, slots=True)
class Refresh:
    token: str
    ref: Any = None


@dataclass(frozen=True, slots=True)
class Subscribe:
    channel: Channel
    ref: Any = None


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    channel: Channel
    ref: Any = None


@dataclass(frozen=True, slots=True)
class Resume:
    since: ResumePoint
    ref: Any = None


@dataclass(frozen=True, slots=True)
class Ping:
    ref: Any = None


@dataclass(frozen=True, slots=True)
class Ack:
    id: str
    ref: Any = None


@dataclass(frozen=True, slots=True)
class Publish:
    channel: Channel
    data: Any
    event: str | None = None
    ref: Any = None


@dataclass(frozen=True, slots=True)
class Send:
    event: str
    data: Any
    ref: Any = None


@dataclass(frozen=True, slots=True)
class History:
    """A page of ``channel``'s history: ``limit`` (None: the default) notifications
    strictly older than ``before`` (None: from the newest), newest first."""

    channel: Channel
    limit: int | None = None
    before: str | None = None
    ref: Any = None


ClientMessage = (
    Auth | Refresh | Subscribe | Unsubscribe | Resume | Ping | Ack | Publish | Send | History
)

MAX_EVENT_LENGTH: Final = 64
MAX_ID_LENGTH: Final = 128
_EVENT = re.compile(r"[A-Za-z0-9_.:/-]+")


def _string(msg: dict[str, Any], key: str, limit: int, ref: Any) -> str:
    value = msg.get(key)
    if not isinstance(value, str) or not value or len(value) > limit:
        raise ProtocolError("bad_message", f"'{key}' must be a non-empty string", ref)
    return value


def _event(msg: dict[str, Any], ref: Any, required: bool) -> str | None:
    value = msg.get("event")
    if value is None and not required:
        return None
    if not isinstance(value, str) or not valid_event(value):
        raise ProtocolError(
            "bad_message", f"'event' must match {_EVENT.pattern} (max {MAX_EVENT_LENGTH})", ref
        )
    return value


def valid_event(value: object) -> bool:
    """Whether ``value`` may be an event name (1..64 of ``A-Za-z0-9_.:/-``)."""
    return (
        isinstance(value, str)
        and 0 < len(value) <= MAX_EVENT_LENGTH
        and _EVENT.fullmatch(value) is not None
    )


def resume_point(since: object, since_ts: object = None) -> ResumePoint | None:
    """Validate ``since`` (a notification id) and ``since_ts`` (its ts, unix ms)."""
    if since is None:
        return None
    if not isinstance(since, str) or not since or len(since) > MAX_ID_LENGTH:
        raise ProtocolError("bad_message", "'since' must be a notification id")
    if isinstance(since_ts, str) and since_ts.isdigit():
        since_ts = int(since_ts)
    if since_ts is not None and (
        not isinstance(since_ts, int) or isinstance(since_ts, bool) or since_ts < 0
    ):
        raise ProtocolError("bad_message", "'since_ts' must be the notification's ts (unix ms)")
    return ResumePoint(since, since_ts)


def _data(msg: dict[str, Any], ref: Any) -> Any:
    """A publish/send ``data``, refused here if it could not be written out again.

    JSON may nest deeper than notifyd's encoder writes (orjson reads 1,024 levels,
    writes ~254); such data would only fail later, on the way to RabbitMQ.
    Everything notifyd writes holds ``data`` one level down, as this check does.
    """
    if "data" not in msg:
        raise ProtocolError("bad_message", "'data' is required", ref)
    data = msg["data"]
    if isinstance(data, dict | list):
        try:
            dumps({"data": data})
        except JSONEncodeError:
            raise ProtocolError("too_deep", "'data' is nested too deeply", ref) from None
    return data


def _since(msg: dict[str, Any], ref: Any) -> ResumePoint | None:
    try:
        return resume_point(msg.get("since"), msg.get("since_ts"))
    except ProtocolError as exc:
        exc.ref = ref
        raise


def parse_client_message(text: str | bytes) -> ClientMessage:
    """Parse one client frame; raises ProtocolError with a code the client can act on."""
    try:
        msg = loads(text)
    except JSONDecodeError:
        raise ProtocolError("bad_json", "message is not valid JSON") from None
    if not isinstance(msg, dict):
        raise ProtocolError("bad_message", "message must be a JSON object")
    kind = msg.get("type")
    ref = msg.get("ref")
    if ref is not None and (not isinstance(ref, str | int) or isinstance(ref, bool)):
        raise ProtocolError("bad_message", "'ref' must be a string or an integer")
    if isinstance(ref, str) and len(ref) > MAX_ID_LENGTH:
        raise ProtocolError("bad_message", "'ref' is too long")
    if kind == "ping":
        return Ping(ref)
    if kind == "ack":
        return Ack(_string(msg, "id", MAX_ID_LENGTH, ref), ref)
    if kind == "subscribe":
        return Subscribe(_channel(msg, ref, presence=True), ref)
    if kind == "unsubscribe":
        return Unsubscribe(_channel(msg, ref, presence=True), ref)
    if kind == "publish":
        channel = _channel(msg, ref)
        if channel.kind != "topic":
            raise ProtocolError("invalid_channel", "clients may publish to topic:<name> only", ref)
        data = _data(msg, ref)
        return Publish(channel, data, _event(msg, ref, required=False), ref)
    if kind == "send":
        data = _data(msg, ref)
        event = _event(msg, ref, required=True)
        assert event is not None
        return Send(event, data, ref)
    if kind == "history":
        return history_request(msg.get("channel"), msg.get("limit"), msg.get("before"), ref)
    if kind == "auth":
        return Auth(_string(msg, "token", 8192, ref), _since(msg, ref), ref)
    if kind == "refresh":
        return Refresh(_string(msg, "token", 8192, ref), ref)
    if kind == "resume":
        since = _since(msg, ref)
        if since is None:
            raise ProtocolError("bad_message", "'since' is required", ref)
        return Resume(since, ref)
    if not isinstance(kind, str):
        raise ProtocolError("bad_message", "message needs a string 'type'", ref)
    raise ProtocolError("unknown_type", f"unknown message type {kind[:32]!r}", ref)


def history_request(channel: object, limit: object, before: object, ref: Any = None) -> History:
    """Validate a history request's fields (a ``history`` message's, or the query of
    ``GET /api/history``, whose ``limit`` is text); raises ProtocolError. The upper
    bound of ``limit`` (``[history] page_max``) is checked by whoever reads the page."""
    if isinstance(limit, str) and limit.isdigit() and len(limit) <= 9:
        limit = int(limit)
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise ProtocolError("bad_message", "'limit' must be a positive integer", ref)
    if before is not None and (
        not isinstance(before, str) or not before or len(before) > MAX_ID_LENGTH
    ):
        raise ProtocolError("bad_message", "'before' must be a notification id", ref)
    return History(_channel({"channel": channel}, ref), limit, before, ref)


def _channel(msg: dict[str, Any], ref: Any, presence: bool = False) -> Channel:
    try:
        return parse_channel(msg.get("channel"), presence)
    except ProtocolError as exc:
        exc.ref = ref
        raise


# --- server -> client -----------------------------------------------------------------


@dataclass(slots=True)
class Notification:
    """One notification, decoded once and ready to be written to many sockets."""

    id: str
    channel: Channel
    frame: bytes
    ts: int
    expires_at: float | None = None
    published_at: float | None = None
    receipt: bool = False


def _with_ref(payload: dict[str, Any], ref: Any) -> dict[str, Any]:
    if ref is not None:
        payload["ref"] = ref
    return payload


def welcome(
    user: str, session: str, expires_at: int, heartbeat: float, resumed: bool | None
) -> bytes:
    """The ``welcome`` message (JSON bytes); ``resumed`` None leaves the field out."""
    payload: dict[str, Any] = {
        "type": "welcome",
        "user": user,
        "session": session,
        "expires_at": expires_at,
        "heartbeat": heartbeat,
    }
    if resumed is not None:
        payload["resumed"] = resumed
    return dumps(payload)


def error(code: str, message: str, ref: Any = None, channel: str | None = None) -> bytes:
    """An ``error`` message (JSON bytes), with the client's ``ref`` when it gave one,
    and the ``channel`` it is about where no ``ref`` can say (an SSE stream's
    ``subscribe`` query)."""
    body: dict[str, Any] = {"type": "error", "code": code, "message": message}
    if channel is not None:
        body["channel"] = channel
    return dumps(_with_ref(body, ref))


def answer(kind: str, ref: Any = None, **fields: Any) -> bytes:
    """Small replies: pong, subscribed, unsubscribed, published, sent, resumed, ..."""
    return dumps(_with_ref({"type": kind, **fields}, ref))


def notification(
    notification_id: str,
    channel: str,
    event: str | None,
    data: Any,
    ts: int,
    sender: str | None = None,
) -> bytes:
    """A ``notification`` message (JSON bytes): ``event`` and ``from`` (``sender``)
    only when given. Raises the JSON encoder's error for ``data`` it cannot write."""
    payload: dict[str, Any] = {"type": "notification", "id": notification_id, "channel": channel}
    if event is not None:
        payload["event"] = event
    payload["data"] = data
    payload["ts"] = ts
    if sender is not None:
        payload["from"] = sender
    return dumps(payload)
