"""One socket's life as a state machine, with no I/O.

A :class:`Session` takes events — bytes from the client, the result of a token
check, "RabbitMQ routes the user here now", a replay, a live notification, a
heartbeat tick, a deadline, a close — and answers with actions: bytes to write
(:attr:`Session.out`) and requests for the I/O layer (:meth:`Session.take_actions`:
verify a token, join the hub, read a replay, publish, close the transport...).
It never awaits, schedules or touches a socket; :mod:`notifyd.connection` does,
and feeds the outcome back as the next event. python-websockets' ``Protocol``
is the model.

The states, in order::

    AWAIT_AUTH -> VERIFYING -> JOINING -> REPLAYING -> OPEN -> CLOSING -> CLOSED
    (no header token)         (hub, bind)  (resume)              (close sent)

While the session waits for the I/O layer (verifying, joining, replaying, or an
answer to a client's publish), it reads no further client messages: they stay
in the frame parser, and are handled in order once the answer is in. Live
notifications that arrive while a resume is read are held back (bounded by the
send buffer) and written after the replay, minus those the replay contained.
"""

from __future__ import annotations

import enum
import logging
import secrets
from dataclasses import dataclass, field
from typing import Any, Final

from .auth import Identity
from .closes import CloseReason
from .errors import ProtocolError, WebSocketError
from .history import may_read
from .metrics import Metrics
from .protocol import (
    Ack,
    Auth,
    Channel,
    ClientMessage,
    CloseCode,
    History,
    Notification,
    Ping,
    Publish,
    Refresh,
    Resume,
    ResumePoint,
    Send,
    Subscribe,
    Unsubscribe,
    answer,
    error,
    id_digest,
    parse_client_message,
    welcome,
)
from .websocket import (
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_TEXT,
    PING_FRAME,
    FrameParser,
    close_frame,
    parse_close,
    pong_frame,
    text_frame,
)

log = logging.getLogger(__name__)

#: Seconds after a resume during which live copies of replayed ids are dropped.
SKIP_WINDOW: Final = 10.0
_NO_IDS: frozenset[str] = frozenset()  # shared: an empty frozenset() is a new object each time
_NEVER: Final = float("inf")

#: Rate-limit tokens a resume costs: each may read the shared history.
RESUME_COST: Final = 5


class State(enum.IntEnum):
    AWAIT_AUTH = 0
    VERIFYING = 1
    JOINING = 2
    REPLAYING = 3
    OPEN = 4
    CLOSING = 5
    CLOSED = 6


@dataclass(frozen=True, slots=True)
class SessionConfig:
    """The limits every session of a server shares (one object per server)."""

    max_message_size: int = 65536
    send_buffer_bytes: int = 1 << 20
    auth_timeout: float = 10.0
    leeway: float = 0.0
    refresh_before: float = 30.0
    heartbeat: float = 25.0
    rate_limit: float = 10.0
    rate_burst: int = 20
    max_connections_per_user: int = 1_000_000
    max_topics: int = 100
    #: Seconds a peer has to answer a close frame before it is cut off.
    close_grace: float = 5.0
    #: Where the sessions count (the server's; by default a registry of its own).
    metrics: Metrics = field(default_factory=Metrics)


# --- actions: what the I/O layer is asked to do ---------------------------------------


@dataclass(frozen=True, slots=True)
class Verify:
    """Check ``token``; answer with :meth:`Session.verified` or :meth:`Session.refused`."""

    token: str


@dataclass(frozen=True, slots=True)
class Join:
    """Add the socket to the hub; answer with :meth:`Session.joined` once RabbitMQ
    routes its channels here."""


@dataclass(frozen=True, slots=True)
class Replay:
    """Read what was missed after ``since``; answer with :meth:`Session.replayed`.

    ``before_seq``: only notifications this replica handled before that sequence
    number (what came later reached the socket live); :data:`ALL_SO_FAR` for
    everything handled until now; None for a new socket (no bound).
    """

    since: ResumePoint
    before_seq: int | None


@dataclass(frozen=True, slots=True)
class Subscribe_:
    """Join ``topic`` in the hub; if ``answer``, call :meth:`Session.done` once
    RabbitMQ routes it here (a client's subscribe waits for that; a refresh does not)."""

    topic: str
    answer: bool = True


@dataclass(frozen=True, slots=True)
class Unsubscribe_:
    """Leave ``topic`` in the hub (no answer needed)."""

    topic: str


@dataclass(frozen=True, slots=True)
class Watch:
    """Send ``user``'s presence transitions to this socket (``presence:<id>``); call
    :meth:`Session.done` once they are routed here."""

    user: str


@dataclass(frozen=True, slots=True)
class Unwatch:
    """Stop sending ``user``'s presence transitions (no answer needed)."""

    user: str


@dataclass(frozen=True, slots=True)
class Upstream:
    """Publish a client's ``publish``/``send`` through RabbitMQ; answer with
    :meth:`Session.done` (the notification id for a publish) or :meth:`Session.failed`."""

    message: Publish | Send


@dataclass(frozen=True, slots=True)
class ReadHistory:
    """Read a page of a channel's history for the client's ``history`` message; answer
    with :meth:`Session.done` (the page: ``channel``, ``notifications``, ``next_before``)
    or :meth:`Session.failed`. The channel is one the session's identity may read."""

    message: History
    identity: Identity


@dataclass(frozen=True, slots=True)
class Acked:
    """The client acknowledged notification ``id`` (for delivery receipts)."""

    id: str


@dataclass(frozen=True, slots=True)
class Leave:
    """Remove the socket from the hub."""


@dataclass(frozen=True, slots=True)
class CloseTransport:
    """Flush what is queued and close the connection (the close handshake is done)."""


@dataclass(frozen=True, slots=True)
class Abort:
    """Drop the connection at once (the peer is gone or did not answer in time)."""


Action = (
    Verify
    | Join
    | Replay
    | Subscribe_
    | Unsubscribe_
    | Watch
    | Unwatch
    | Upstream
    | ReadHistory
    | Acked
    | Leave
    | CloseTransport
    | Abort
)
#: ``Replay.before_seq`` for "up to the last notification this replica handled".
ALL_SO_FAR: Final = -1
JOIN: Final = Join()
LEAVE: Final = Leave()
CLOSE_TRANSPORT: Final = CloseTransport()
ABORT: Final = Abort()


class Session:
    """One WebSocket's protocol state, from the upgrade to the end of the connection.

    Hub-facing attributes (``user``, ``deadline``, ``topics``, :meth:`live`) are
    what :class:`notifyd.hub.Hub` reads on its fan-out path; they are plain
    slots, not properties.
    """

    __slots__ = (
        "_actions",
        "_busy",
        "_held",
        "_held_bytes",
        "_in_hub",
        "_refresh_at",
        "_since",
        "_skip",
        "_skip_until",
        "_stamp",
        "_tokens",
        "close_at",
        "config",
        "deadline",
        "first_live_seq",
        "id",
        "identity",
        "out",
        "out_bytes",
        "parser",
        "ping_outstanding",
        "state",
        "topics",
        "user",
        "watching",
    )

    def __init__(
        self,
        config: SessionConfig,
        now: float,
        token: str | None = None,
        since: ResumePoint | None = None,
    ) -> None:
        self.config = config
        self.parser = FrameParser(config.max_message_size)
        self.state = State.AWAIT_AUTH
        self.identity: Identity | None = None
        self.user = ""
        #: Token expiry plus leeway; nothing is written to the socket after it.
        self.deadline = _NEVER
        self.id = ""
        self.topics: set[str] = set()
        #: Users whose ``presence:<id>`` this socket subscribed to (None: none).
        self.watching: set[str] | None = None
        #: Frames queued for the next write (None: nothing queued).
        self.out: list[bytes] | None = None
        self.out_bytes = 0
        #: A heartbeat ping was sent and nothing has come back since.
        self.ping_outstanding = False
        self.first_live_seq: int | None = None
        #: Wall-clock time of the next auth/close deadline (inf: none).
        self.close_at = now + config.auth_timeout
        self._refresh_at = _NEVER
        self._actions: list[Action] | None = None
        #: The client message waiting for the I/O layer's answer (None: not busy).
        self._busy: ClientMessage | None = None
        self._since = since
        self._in_hub = False
        self._held: list[tuple[bytes, int]] | None = None
        self._held_bytes = 0
        #: Ids just replayed from a shared history; live copies still in flight
        #: to this replica are dropped for a short while after a resume.
        self._skip = _NO_IDS
        self._skip_until = _NEVER
        self._tokens = float(config.rate_burst)
        self._stamp = now
        if token is not None:
            self._verify(token)

    # --- what the I/O layer reads -----------------------------------------------------

    def take_actions(self) -> list[Action] | None:
        """The requests made since the last call, oldest first (None: none)."""
        actions, self._actions = self._actions, None
        return actions

    def take_output(self) -> bytes | None:
        """Everything queued for the socket, as one write."""
        out, self.out = self.out, None
        self.out_bytes = 0
        if not out:
            return None
        return out[0] if len(out) == 1 else b"".join(out)

    @property
    def busy(self) -> bool:
        """Waiting for the I/O layer: client messages are left unread meanwhile."""
        return self._busy is not None or State.VERIFYING <= self.state <= State.REPLAYING

    @property
    def wake_at(self) -> float:
        """When :meth:`wake` is next due (wall clock; inf: never)."""
        return min(self.close_at, self._refresh_at, self._skip_until)

    # --- events: bytes, ticks, deadlines ----------------------------------------------

    def receive_data(self, data: bytes, now: float) -> None:
        """Bytes from the client."""
        if self.state >= State.CLOSED:
            return
        self.ping_outstanding = False  # anything at all shows the peer is alive
        self.parser.feed(data)
        self._read(now)

    def _read(self, now: float) -> None:
        """Handle whole messages until there are none, or until an answer is awaited."""
        parser = self.parser
        try:
            while not self.busy and self.state < State.CLOSED:
                message = parser.next()
                if message is None:
                    return
                self._frame(message[0], message[1], now)
        except WebSocketError as exc:
            log.info("protocol violation (%d) on session %s: %s", exc.code, self.id, exc.reason)
            # RFC 6455 §7.1.7: the connection is failed, not closed with a handshake;
            # the peer's frames can no longer be parsed, so nothing more is read.
            self.close_for(CloseReason.for_violation(exc.code), now, exc.reason)
            self._end(CLOSE_TRANSPORT)

    def _frame(self, opcode: int, payload: bytes, now: float) -> None:
        if opcode == OP_CLOSE:
            self._peer_closed(payload, now)
            return
        if self.state is State.CLOSING or (opcode > OP_CLOSE and opcode != OP_PING):
            return  # a pong, or anything after our close frame
        if not self._take_token(now):
            self._rate_limited(now)
        elif opcode == OP_PING:
            self._queue(pong_frame(payload))
        elif self.state is State.AWAIT_AUTH:
            self._first_message(opcode, payload, now)
        elif opcode == OP_BINARY:
            self._error("bad_message", "binary frames are not supported", None)
        else:
            try:
                message = parse_client_message(payload)
            except ProtocolError as exc:
                self._error(exc.code, exc.message, exc.ref)
                return
            try:
                self._handle(message, now)
            except ProtocolError as exc:
                self._error(exc.code, exc.message, message.ref)

    def _take_token(self, now: float, cost: int = 1) -> bool:
        """Every frame a client sends (pings and binary ones too) takes a token."""
        config = self.config
        elapsed = now - self._stamp
        if elapsed > 0:  # a clock that went back gives no tokens
            self._tokens = min(float(config.rate_burst), self._tokens + elapsed * config.rate_limit)
            self._stamp = now
        if self._tokens >= cost:
            self._tokens -= cost
            return True
        return False

    def _rate_limited(self, now: float) -> None:
        log.info("rate limit: closing user=%s session=%s", self.user, self.id)
        self.config.metrics.rate_limited.inc()
        self.close_for(CloseReason.RATE_LIMITED, now)

    def _error(self, code: str, message: str, ref: Any) -> None:
        self.config.metrics.client_errors.labels(code).inc()
        self._send(error(code, message, ref))

    def tick(self, now: float) -> None:
        """A heartbeat tick: ping, or cut off a peer that did not answer the last ping."""
        if self.state >= State.CLOSING:
            return
        if self.ping_outstanding:
            self.config.metrics.heartbeat_timeouts.inc()
            log.info("no answer to ping: dropping user=%s session=%s", self.user, self.id)
            self._end(ABORT)
            return
        self.ping_outstanding = True
        self._queue(PING_FRAME)

    def wake(self, now: float) -> None:
        """A deadline passed: auth timeout, refresh due, token expiry, close grace."""
        if now >= self._refresh_at and self.state is State.OPEN and self.identity is not None:
            self._send(answer("refresh_required", expires_at=int(self.identity.expires_at)))
            self._refresh_at = _NEVER
            self.close_at = self.deadline
        if now >= self.close_at:
            if self.state is State.AWAIT_AUTH:
                self.refused("timeout", "no auth message in time", now)
            elif self.state >= State.CLOSING:
                self.close_at = _NEVER
                self._end(ABORT)  # the peer did not finish the close handshake in time
            elif self.state is State.OPEN:
                self.close_for(CloseReason.TOKEN_EXPIRED, now)
        if now >= self._skip_until:
            self._skip = _NO_IDS
            self._skip_until = _NEVER

    def lost(self) -> None:
        """The connection is gone (either side): nothing more is read or written."""
        if self._in_hub:
            self._in_hub = False
            self._request(LEAVE)
        self.state = State.CLOSED
        self.out = None
        self._held = None
        self.close_at = self._refresh_at = self._skip_until = _NEVER

    # --- events: answers from the I/O layer ---------------------------------------------

    def verified(self, identity: Identity, now: float, user_sockets: int, accepting: bool) -> None:
        """The token checked out. ``user_sockets``: the user's open sockets on this
        replica; ``accepting``: False while the server drains."""
        if self.state is State.VERIFYING:
            if user_sockets >= self.config.max_connections_per_user:
                self.close_for(CloseReason.TOO_MANY_CONNECTIONS, now)
            elif not accepting:
                self.close_for(CloseReason.NOT_ACCEPTING, now)
            else:
                self._accept(identity, now)
        elif isinstance(self._busy, Refresh) and self.state is State.OPEN:
            self._busy = None
            self._refreshed(identity, now)
            self._read(now)

    def refused(self, reason: str, message: str, now: float) -> None:
        """The token was refused (``reason`` is the auth failure's metric label)."""
        self.config.metrics.auth_failures.labels(reason).inc()
        if self.state <= State.VERIFYING:
            log.info("auth failed on a new socket: %s", message)
            self.close_for(CloseReason.for_auth_failure(reason), now, message)
        elif isinstance(self._busy, Refresh):
            ref = self._answer_ref()
            self._busy = None
            self._error("invalid_token", f"refresh refused: {message}", ref)
            self._read(now)

    def joined(self, now: float) -> None:
        """RabbitMQ now routes the socket's channels here (or the wait gave up)."""
        if self.state is not State.JOINING:
            return
        if self._since is None:
            self._welcome(None, [], now)
        else:
            self.state = State.REPLAYING
            self._request(Replay(self._since, None))

    def replayed(self, missed: list[Notification] | None, now: float) -> None:
        """What was missed (oldest first), or None when the gap is too old to replay."""
        if self.state is State.REPLAYING:
            self._since = None
            self._welcome(missed is not None, missed or [], now)
        elif isinstance(self._busy, Resume) and self.state is State.OPEN:
            ref = self._answer_ref()
            self._busy = None
            count = len(missed or ())
            self._release(
                answer("resumed", ref, resumed=missed is not None, count=count), missed or [], now
            )
            self._read(now)

    def done(self, result: str | dict[str, Any] | None, now: float) -> None:
        """A subscribe, upstream or history message went through; ``result``: a
        published id, or a history page."""
        busy = self._busy
        if busy is None or self.state is not State.OPEN:
            return
        self._busy = None
        if isinstance(busy, Subscribe):
            self._send(answer("subscribed", busy.ref, channel=str(busy.channel)))
        elif isinstance(busy, Publish):
            self.config.metrics.upstream_messages.labels("publish", "accepted").inc()
            self._send(answer("published", busy.ref, id=result, channel=str(busy.channel)))
        elif isinstance(busy, Send):
            self.config.metrics.upstream_messages.labels("send", "accepted").inc()
            self._send(answer("sent", busy.ref))
        elif isinstance(busy, History) and isinstance(result, dict):
            self._send(
                answer(
                    "history",
                    busy.ref,
                    channel=result["channel"],
                    notifications=result["notifications"],
                    next_before=result["next_before"],
                )
            )
        self._read(now)

    def failed(self, code: str, message: str, now: float, outcome: str = "broker_down") -> None:
        """A subscribe or upstream message did not go through; ``code`` goes to the
        client. For a publish/send, ``outcome`` says why: the broker is down
        ("broker_down"), or what would be published was refused ("refused")."""
        busy = self._busy
        if busy is None or self.state is not State.OPEN:
            return
        self._busy = None
        if isinstance(busy, Publish | Send):
            kind = "publish" if isinstance(busy, Publish) else "send"
            self.config.metrics.upstream_messages.labels(kind, outcome).inc()
        self._error(code, message, busy.ref)
        self._read(now)

    # --- events: fan-out and control ---------------------------------------------------

    def live(self, frame: bytes, seq: int, buffered: int, now: float) -> bool:
        """A live notification's frame; ``buffered``: bytes the transport holds.

        False if it was not queued (closing, or the send buffer would overflow:
        then the socket is being closed with 4009).
        """
        if self.state is not State.OPEN and self._held is None:
            return False
        if self._skip and seq and _frame_id(frame) in self._skip:
            return True
        if self._held is not None:
            # Resuming: live traffic waits behind the replay.
            self._held_bytes += len(frame)
            if self._held_bytes > self.config.send_buffer_bytes:
                self._overflow(now)
                return False
            self._held.append((frame, seq))
            return True
        queued = self.out_bytes + len(frame)
        if buffered + queued > self.config.send_buffer_bytes:
            self._overflow(now)
            return False
        out = self.out
        if out is None:
            self.out = [frame]
        else:
            out.append(frame)
        self.out_bytes = queued
        if seq and self.first_live_seq is None:
            self.first_live_seq = seq
        return True

    def close(self, code: int, reason: str, now: float, grace: float | None = None) -> None:
        """Start the close handshake: a close frame after what is queued; the peer
        is cut off if it has not answered within ``grace`` seconds."""
        if self.state >= State.CLOSING:
            return
        self.config.metrics.closes.labels(str(code)).inc()
        self._stop_writing()
        self._queue(close_frame(code, reason))
        self.state = State.CLOSING
        self.close_at = now + (self.config.close_grace if grace is None else grace)
        if self._in_hub:
            self._in_hub = False
            self._request(LEAVE)

    # --- internals ---------------------------------------------------------------------

    def _request(self, action: Action) -> None:
        if self._actions is None:
            self._actions = [action]
        else:
            self._actions.append(action)

    def _queue(self, frame: bytes) -> None:
        out = self.out
        if out is None:
            self.out = [frame]
        else:
            out.append(frame)
        self.out_bytes += len(frame)

    def _send(self, payload: bytes) -> None:
        """A control answer (welcome, pong, error, ...), in order with notifications."""
        if self.state < State.CLOSING:
            self._queue(text_frame(payload))

    def _stop_writing(self) -> None:
        self._held = None
        self._skip = _NO_IDS
        self._refresh_at = self._skip_until = _NEVER

    def _end(self, action: Action) -> None:
        """Stop at once: ``action`` closes or aborts the transport."""
        self._stop_writing()
        if self._in_hub:
            self._in_hub = False
            self._request(LEAVE)
        self.state = State.CLOSED
        self._request(action)

    def _overflow(self, now: float) -> None:
        self.config.metrics.dropped_slow.inc()
        self.config.metrics.slow_consumer_disconnects.inc()
        log.info("closing slow consumer user=%s session=%s (send buffer full)", self.user, self.id)
        self.close_for(CloseReason.SLOW_CONSUMER, now)

    def _peer_closed(self, payload: bytes, now: float) -> None:
        """The client sent a close frame: answer it (unless it answers ours) and end."""
        if self.state is not State.CLOSING:
            code, _ = parse_close(payload)
            self._queue(close_frame(code))
            if code == CloseCode.MESSAGE_TOO_BIG:
                self.config.metrics.closes.labels(str(code)).inc()
        self._end(CLOSE_TRANSPORT)
        # A peer that stops reading could hold a closed transport's buffer forever.
        self.close_at = now + self.config.close_grace

    def close_for(self, why: CloseReason, now: float, detail: str = "") -> None:
        """Close for ``why``: its code, its reason text (else ``detail``, the cause's
        own message) and its grace; a refusal also counts the attempt's outcome."""
        if why.outcome is not None:
            self.config.metrics.connection_attempts.labels(why.outcome).inc()
        self.close(why.code, why.text_for(detail), now, why.grace)

    def _first_message(self, opcode: int, payload: bytes, now: float) -> None:
        if opcode != OP_TEXT:
            self.close_for(CloseReason.NOT_TEXT_FIRST, now)
            return
        try:
            message = parse_client_message(payload)
        except ProtocolError as exc:
            log.info("protocol error on a new socket: %s", exc.message)
            self.close_for(CloseReason.BAD_FIRST_MESSAGE, now, exc.message)
            return
        if not isinstance(message, Auth):
            self.refused("missing", "first message must be {type: auth}", now)
            return
        self._since = message.since
        self._verify(message.token)

    def _verify(self, token: str) -> None:
        self.state = State.VERIFYING
        self.close_at = _NEVER
        self._request(Verify(token))

    def _accept(self, identity: Identity, now: float) -> None:
        self.config.metrics.accepted.inc()
        self.identity = identity
        self.user = identity.user
        self.deadline = identity.expires_at + self.config.leeway
        self.id = secrets.token_urlsafe(12)
        self.topics.update(identity.topics.exact)
        # Join first and hold live frames, so nothing falls between replay and live;
        # welcome only once RabbitMQ routes the user here, so that whatever is
        # published after the client saw welcome reaches it.
        self.state = State.JOINING
        self._held = []
        self._held_bytes = 0
        self._in_hub = True
        self._request(JOIN)

    def _welcome(self, resumed: bool | None, replay: list[Notification], now: float) -> None:
        assert self.identity is not None
        self.state = State.OPEN
        first = welcome(
            self.user, self.id, int(self.identity.expires_at), self.config.heartbeat, resumed
        )
        self._release(first, replay, now)
        self._watch_token(now)
        self._read(now)

    def _watch_token(self, now: float) -> None:
        """Ask for a refresh ahead of expiry; close 4010 at the deadline."""
        assert self.identity is not None
        refresh_at = self.identity.expires_at - self.config.refresh_before
        if refresh_at > now:
            self._refresh_at = refresh_at
            self.close_at = _NEVER
        else:
            self._refresh_at = now  # due at once: the next wake sends it
            self.close_at = self.deadline
            self.wake(now)

    def _release(self, first: bytes, replay: list[Notification], now: float) -> None:
        """Write ``first`` (the answer), the replay, then held frames not replayed."""
        held, self._held = self._held or [], None
        self._send(first)
        for notification in replay:
            self._queue(notification.frame)
        if replay:
            self._skip = frozenset(n.id for n in replay)
            self._skip_until = now + SKIP_WINDOW
            held = _not_replayed(held, replay)
        for frame, seq in held:
            self.live(frame, seq, 0, now)

    def _answer_ref(self) -> Any:
        return self._busy.ref if self._busy is not None else None

    def _handle(self, message: ClientMessage, now: float) -> None:
        match message:
            case Ping(ref=ref):
                self._send(answer("pong", ref))
            case Ack(id=notification_id):
                self.config.metrics.acks.inc()
                self._request(Acked(notification_id))
            case Subscribe(channel=channel):
                self._subscribe(message, channel)
            case Unsubscribe(channel=channel) if channel.kind == "presence":
                if not self.watching or channel.name not in self.watching:
                    raise ProtocolError("not_subscribed", f"not subscribed to {channel}")
                self.watching.discard(channel.name)
                self._request(Unwatch(channel.name))
                self._send(answer("unsubscribed", message.ref, channel=str(channel)))
            case Unsubscribe(channel=channel):
                if channel.kind != "topic" or channel.name not in self.topics:
                    raise ProtocolError("not_subscribed", f"not subscribed to {channel}")
                self._request(Unsubscribe_(channel.name))
                self._send(answer("unsubscribed", message.ref, channel=str(channel)))
            case Refresh(token=token):
                self._busy = message
                self._request(Verify(token))
            case Resume(since=since):
                if not self._take_token(now, RESUME_COST - 1):
                    self._rate_limited(now)
                    return
                # What arrived live since this socket joined is not replayed again.
                self._busy = message
                self._held = []
                self._held_bytes = 0
                before = self.first_live_seq
                self._request(Replay(since, before if before is not None else ALL_SO_FAR))
            case Publish(channel=channel):
                assert self.identity is not None
                if not self.identity.publish.allows(channel.name):
                    self.config.metrics.upstream_messages.labels("publish", "forbidden").inc()
                    raise ProtocolError(
                        "forbidden", f"token does not allow publishing to {channel}"
                    )
                self._busy = message
                self._request(Upstream(message))
            case Send():
                self._busy = message
                self._request(Upstream(message))
            case History(channel=channel):
                assert self.identity is not None
                if not may_read(self.identity, channel):
                    self.config.metrics.history_requests.labels("ws", "forbidden").inc()
                    raise ProtocolError("forbidden", f"token does not allow reading {channel}")
                # Like a resume, a page may read the shared history: it costs as much.
                if not self._take_token(now, RESUME_COST - 1):
                    self._rate_limited(now)
                    return
                self._busy = message
                self._request(ReadHistory(message, self.identity))
            case Auth():
                raise ProtocolError("already_authenticated", "this socket is authenticated")

    def _subscribe(self, message: Subscribe, channel: Channel) -> None:
        assert self.identity is not None
        if channel.kind == "presence":
            self._watch(message, channel)
            return
        if channel.kind != "topic":
            raise ProtocolError(
                "invalid_channel",
                "only topic:<name> can be subscribed; user and broadcast are implicit",
            )
        if not self.identity.topics.allows(channel.name):
            raise ProtocolError("forbidden", f"token does not allow {channel}")
        if len(self.topics) >= self.config.max_topics and channel.name not in self.topics:
            raise ProtocolError(
                "too_many_topics", f"a socket may subscribe to {self.config.max_topics} topics"
            )
        self._busy = message
        self._request(Subscribe_(channel.name))

    def _watch(self, message: Subscribe, channel: Channel) -> None:
        """``presence:<id>``: only for the users the token's ``presence`` claim lists."""
        assert self.identity is not None
        if channel.name not in self.identity.presence:
            raise ProtocolError("forbidden", f"token does not allow {channel}")
        watching = self.watching
        if watching is None:
            watching = self.watching = set()
        if len(watching) >= self.config.max_topics and channel.name not in watching:
            raise ProtocolError(
                "too_many_topics",
                f"a socket may subscribe to the presence of {self.config.max_topics} users",
            )
        watching.add(channel.name)
        self._busy = message
        self._request(Watch(channel.name))

    def _refreshed(self, identity: Identity, now: float) -> None:
        if identity.user != self.user:
            log.warning("refresh for another user on session %s: closing", self.id)
            self.close_for(CloseReason.REFRESH_FOR_ANOTHER_USER, now)
            return
        self.identity = identity
        self.deadline = identity.expires_at + self.config.leeway
        # Topics the new token no longer allows are left; new exact grants are joined.
        for topic in list(self.topics):
            if not identity.topics.allows(topic):
                self._request(Unsubscribe_(topic))
        for topic in identity.topics.exact:
            if topic not in self.topics:
                self._request(Subscribe_(topic, answer=False))
        for user in list(self.watching or ()):
            if user not in identity.presence:
                self.watching.discard(user)  # type: ignore[union-attr]
                self._request(Unwatch(user))
        self._watch_token(now)
        self._send(answer("refreshed", expires_at=int(identity.expires_at)))


def _not_replayed(
    held: list[tuple[bytes, int]], replay: list[Notification]
) -> list[tuple[bytes, int]]:
    """The held frames whose content the replay did not already contain (a held copy
    of a replayed id is dropped by :meth:`Session.live`'s skip set as well).

    A message published without ``message_id`` has a content id (time + digest,
    :meth:`IdGenerator.content`) whose time part differs between the live copy and
    the stream's: during the read, the same message is held live and replayed
    under two ids. Each replayed content digest therefore cancels one held frame
    with that digest. Held frames only (they arrived while the replay was read), not
    later live ones: identical content published again later is a new notification.
    """
    digests: dict[bytes, int] = {}
    for notification in replay:
        digest = id_digest(notification.id)
        if digest is not None:
            digests[digest] = digests.get(digest, 0) + 1
    kept = []
    for frame, seq in held:
        frame_id = _frame_id(frame)
        digest = id_digest(frame_id) if frame_id is not None else None
        if digest is not None and digests.get(digest, 0) > 0:
            digests[digest] -= 1
            continue
        kept.append((frame, seq))
    return kept


def _frame_id(frame: bytes) -> str | None:
    """The notification id inside a pre-built frame (only used at a resume seam)."""
    start = frame.find(b'"id":"')
    if start < 0:
        return None
    start += 6
    end = frame.find(b'"', start)
    return frame[start:end].decode() if end > start else None
