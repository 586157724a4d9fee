"""The socket's life as tables of event -> expected output and actions (no I/O).

Each case is a list of steps ``(event, frames the session writes, actions it asks
for)``, in the manner of python-websockets' protocol tests. Frames written are
shown decoded: a JSON text frame as its object, other frames as ``("close", code)``,
``("ping", payload)`` or ``("pong", payload)``.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from collections.abc import Callable
from typing import Any
from unittest.mock import ANY

import pytest

from notifyd.auth import NO_GRANTS, Grants, Identity
from notifyd.protocol import (
    Channel,
    Notification,
    Publish,
    ResumePoint,
    Send,
    format_id,
    notification,
)
from notifyd.session import (
    ABORT,
    ALL_SO_FAR,
    CLOSE_TRANSPORT,
    JOIN,
    LEAVE,
    SKIP_WINDOW,
    Acked,
    Action,
    Replay,
    Session,
    SessionConfig,
    State,
    Subscribe_,
    Unsubscribe_,
    Upstream,
    Verify,
)
from notifyd.websocket import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONTINUATION,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    text_frame,
)

NOW = 1_700_000_000.0
CONFIG = SessionConfig(
    max_message_size=1024,
    send_buffer_bytes=4096,
    auth_timeout=10.0,
    leeway=0.0,
    refresh_before=30.0,
    heartbeat=25.0,
    rate_limit=10.0,
    rate_burst=5,
    max_connections_per_user=3,
    close_grace=5.0,
)

# --- building events ---------------------------------------------------------------------


def grants(*names: str) -> Grants:
    return Grants.parse(list(names), "topics")


def ident(
    user: str = "alice",
    expires_in: float = 3600.0,
    topics: Grants = NO_GRANTS,
    publish: Grants = NO_GRANTS,
) -> Identity:
    return Identity(user, NOW + expires_in, topics, publish)


def client(opcode: int, payload: bytes = b"", fin: bool = True, rsv: int = 0) -> bytes:
    """A masked client frame."""
    mask = b"\x0f\xf0\xaa\x55"
    first = (0x80 if fin else 0) | rsv << 4 | opcode
    size = len(payload)
    if size < 126:
        head = struct.pack("!BB", first, 0x80 | size)
    elif size < 1 << 16:
        head = struct.pack("!BBH", first, 0x80 | 126, size)
    else:
        head = struct.pack("!BBQ", first, 0x80 | 127, size)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def msg(**fields: Any) -> bytes:
    """A client message: a JSON text frame."""
    return client(OP_TEXT, json.dumps(fields).encode())


def close_msg(code: int | None, reason: str = "") -> bytes:
    payload = b"" if code is None else code.to_bytes(2, "big") + reason.encode()
    return client(OP_CLOSE, payload)


def note(notification_id: str, user: str = "alice") -> Notification:
    payload = notification(notification_id, f"user:{user}", "e", {"n": notification_id}, 1)
    return Notification(notification_id, Channel("user", user), text_frame(payload), 1)


def shown(n: Notification) -> dict[str, Any]:
    """A notification as the client reads it."""
    return {
        "type": "notification",
        "id": n.id,
        "channel": "user:alice",
        "event": "e",
        "data": {"n": n.id},
        "ts": 1,
    }


Event = Callable[[Session], object]


def receive(data: bytes, at: float = 0.0) -> Event:
    return lambda s: s.receive_data(data, NOW + at)


def verified(identity: Identity | None = None, sockets: int = 0, accepting: bool = True) -> Event:
    return lambda s: s.verified(identity or ident(), NOW, sockets, accepting)


def refused(reason: str, message: str = "refused") -> Event:
    return lambda s: s.refused(reason, message, NOW)


def joined() -> Event:
    return lambda s: s.joined(NOW)


def replayed(missed: list[Notification] | None) -> Event:
    return lambda s: s.replayed(missed, NOW)


def done(result: str | None = None) -> Event:
    return lambda s: s.done(result, NOW)


def failed(code: str, message: str) -> Event:
    return lambda s: s.failed(code, message, NOW)


def live(n: Notification, seq: int, buffered: int = 0, queued: bool = True) -> Event:
    def event(s: Session) -> None:
        assert s.live(n.frame, seq, buffered, NOW) is queued

    return event


def burst(n: Notification, count: int) -> Event:
    """``count`` live frames in one event-loop pass (nothing written in between),
    the last of which does not fit."""

    def event(s: Session) -> None:
        results = [s.live(n.frame, seq, 0, NOW) for seq in range(1, count + 1)]
        assert results == [True] * (count - 1) + [False]

    return event


def tick(at: float) -> Event:
    return lambda s: s.tick(NOW + at)


def wake(at: float) -> Event:
    return lambda s: s.wake(NOW + at)


def close(code: int, grace: float | None = None) -> Event:
    return lambda s: s.close(code, "bye", NOW, grace)


def lost() -> Event:
    return lambda s: s.lost()


# --- reading what the session did ----------------------------------------------------------


def written(session: Session) -> list[Any]:
    data = session.take_output() or b""
    frames: list[Any] = []
    pos = 0
    while pos < len(data):
        first, length = data[pos], data[pos + 1]
        assert not length & 0x80, "server frames are not masked"
        pos += 2
        if length == 126:
            (length,) = struct.unpack_from("!H", data, pos)
            pos += 2
        elif length == 127:
            (length,) = struct.unpack_from("!Q", data, pos)
            pos += 8
        payload, pos = data[pos : pos + length], pos + length
        assert first & 0x80, "server frames are whole"
        opcode = first & 0x0F
        if opcode == OP_TEXT:
            frames.append(json.loads(payload))
        elif opcode == OP_CLOSE:
            frames.append(("close", int.from_bytes(payload[:2], "big") if payload else None))
        elif opcode == OP_PING:
            frames.append(("ping", payload))
        elif opcode == OP_PONG:
            frames.append(("pong", payload))
        else:
            raise AssertionError(f"unexpected frame {first:#x}")
    return frames


Step = tuple[Event, list[Any], list[Action]]


def run(session: Session, steps: list[Step]) -> Session:
    for number, (event, output, actions) in enumerate(steps, 1):
        event(session)
        assert written(session) == output, f"step {number}: output"
        assert (session.take_actions() or []) == actions, f"step {number}: actions"
    return session


def new(token: str | None = None, since: ResumePoint | None = None, **config: Any) -> Session:
    return Session(dataclasses.replace(CONFIG, **config), NOW, token, since)


def opened(identity: Identity | None = None, **config: Any) -> Session:
    """A session past welcome (header token, no resume), output and actions taken."""
    session = new("T", **config)
    run(session, [(lambda s: None, [], [Verify("T")]), (verified(identity), [], [JOIN])])
    joined()(session)
    assert written(session)[0]["type"] == "welcome"
    assert session.take_actions() is None
    assert session.state is State.OPEN
    return session


def welcome(resumed: bool | None = None, expires_in: float = 3600.0) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "type": "welcome",
        "user": "alice",
        "session": ANY,
        "expires_at": int(NOW + expires_in),
        "heartbeat": CONFIG.heartbeat,
    }
    if resumed is not None:
        payload["resumed"] = resumed
    return payload


def CLOSE(code: int | None) -> tuple[str, int | None]:  # reads as the frame it stands for
    return ("close", code)


AUTH = msg(type="auth", token="T")
PING = msg(type="ping")

# --- before welcome -------------------------------------------------------------------------


def test_a_header_token_is_verified_at_once() -> None:
    session = new("T")
    assert session.take_actions() == [Verify("T")]
    assert session.state is State.VERIFYING and session.busy
    assert session.wake_at == float("inf")  # no auth timeout while the token is checked


AUTH_CASES: dict[str, list[Step]] = {
    "auth message -> Verify": [
        (receive(AUTH), [], [Verify("T")]),
    ],
    "verified -> Join, joined -> welcome": [
        (receive(AUTH), [], [Verify("T")]),
        (verified(), [], [JOIN]),
        (joined(), [welcome()], []),
    ],
    "messages after auth wait for the answer": [
        (receive(AUTH + msg(type="ping", ref=1)), [], [Verify("T")]),
        (verified(), [], [JOIN]),
        (joined(), [welcome(), {"type": "pong", "ref": 1}], []),
    ],
    "auth with since -> Replay, then welcome resumed": [
        (receive(msg(type="auth", token="T", since="N1")), [], [Verify("T")]),
        (verified(), [], [JOIN]),
        (joined(), [], [Replay(ResumePoint("N1"), None)]),
        (
            replayed([note("N2"), note("N3")]),
            [welcome(True), shown(note("N2")), shown(note("N3"))],
            [],
        ),
    ],
    "auth with since, gap too old -> welcome resumed false": [
        (receive(msg(type="auth", token="T", since="N1", since_ts=5)), [], [Verify("T")]),
        (verified(), [], [JOIN]),
        (joined(), [], [Replay(ResumePoint("N1", 5), None)]),
        (replayed(None), [welcome(False)], []),
    ],
    "non-auth first message -> 4001": [
        (receive(PING), [CLOSE(4001)], []),
    ],
    "subscribe first -> 4001": [
        (receive(msg(type="subscribe", channel="topic:x")), [CLOSE(4001)], []),
    ],
    "binary first -> 4000": [
        (receive(client(OP_BINARY, AUTH)), [CLOSE(4000)], []),
    ],
    "garbage first -> 4000": [
        (receive(client(OP_TEXT, b"hello?")), [CLOSE(4000)], []),
    ],
    "auth without a token -> 4000": [
        (receive(msg(type="auth")), [CLOSE(4000)], []),
    ],
    "a ping frame before auth is answered": [
        (receive(client(OP_PING, b"hi")), [("pong", b"hi")], []),
        (receive(AUTH), [], [Verify("T")]),
    ],
    "auth timeout -> 4008 via wake": [
        (wake(CONFIG.auth_timeout - 0.01), [], []),
        (wake(CONFIG.auth_timeout), [CLOSE(4008)], []),
    ],
    "per-user connection limit -> 4003": [
        (receive(AUTH), [], [Verify("T")]),
        (verified(sockets=CONFIG.max_connections_per_user), [CLOSE(4003)], []),
    ],
    "under the per-user limit -> Join": [
        (receive(AUTH), [], [Verify("T")]),
        (verified(sockets=CONFIG.max_connections_per_user - 1), [], [JOIN]),
    ],
    "draining -> 1001": [
        (receive(AUTH), [], [Verify("T")]),
        (verified(accepting=False), [CLOSE(1001)], []),
    ],
    "refused: expired -> 4010": [
        (receive(AUTH), [], [Verify("T")]),
        (refused("expired", "token has expired"), [CLOSE(4010)], []),
    ],
    "refused: bad signature -> 4001": [
        (receive(AUTH), [], [Verify("T")]),
        (refused("signature", "token signature does not verify"), [CLOSE(4001)], []),
    ],
    "refused before a message -> 4001": [
        (refused("malformed", "bad Authorization header"), [CLOSE(4001)], []),
    ],
}


@pytest.mark.parametrize("steps", AUTH_CASES.values(), ids=AUTH_CASES.keys())
def test_authentication(steps: list[Step]) -> None:
    run(new(), steps)


def test_auth_timeout_is_the_sessions_first_deadline() -> None:
    session = new()
    assert session.wake_at == NOW + CONFIG.auth_timeout
    receive(AUTH)(session)
    assert session.wake_at == float("inf")


def test_a_refused_socket_is_cut_off_if_it_does_not_answer_the_close() -> None:
    run(
        new(),
        [
            (receive(PING), [CLOSE(4001)], []),
            (wake(1.9), [], []),
            (wake(2.0), [], [ABORT]),
        ],
    )


def test_a_refused_socket_that_answers_the_close_is_closed() -> None:
    run(
        new(),
        [(receive(PING), [CLOSE(4001)], []), (receive(close_msg(4001)), [], [CLOSE_TRANSPORT])],
    )


def test_a_header_token_with_since_replays() -> None:
    run(
        new("T", ResumePoint("N1")),
        [
            (lambda s: None, [], [Verify("T")]),
            (verified(), [], [JOIN]),
            (joined(), [], [Replay(ResumePoint("N1"), None)]),
            (replayed([]), [welcome(True)], []),
        ],
    )


# --- open: messages -----------------------------------------------------------------------

NEWS = grants("news", "chat.*")
ROOM = grants("room1")

OPEN_CASES: dict[str, tuple[Identity, list[Step]]] = {
    "ping -> pong with ref": (
        ident(),
        [(receive(msg(type="ping", ref="r1")), [{"type": "pong", "ref": "r1"}], [])],
    ),
    "ping frame -> pong frame": (
        ident(),
        [(receive(client(OP_PING, b"abc")), [("pong", b"abc")], [])],
    ),
    "pong frame -> nothing": (ident(), [(receive(client(OP_PONG, b"")), [], [])]),
    "binary -> error": (
        ident(),
        [
            (
                receive(client(OP_BINARY, b"{}")),
                [{"type": "error", "code": "bad_message", "message": ANY}],
                [],
            )
        ],
    ),
    "bad json -> error": (
        ident(),
        [
            (
                receive(client(OP_TEXT, b"{")),
                [{"type": "error", "code": "bad_json", "message": ANY}],
                [],
            )
        ],
    ),
    "unknown type -> error with ref": (
        ident(),
        [
            (
                receive(msg(type="nope", ref=3)),
                [{"type": "error", "code": "unknown_type", "message": ANY, "ref": 3}],
                [],
            )
        ],
    ),
    "auth again -> error": (
        ident(),
        [(receive(AUTH), [{"type": "error", "code": "already_authenticated", "message": ANY}], [])],
    ),
    "fragmented message -> handled whole": (
        ident(),
        [
            (receive(client(OP_TEXT, b'{"type":', fin=False)), [], []),
            (receive(client(OP_CONTINUATION, b'"ping"}')), [{"type": "pong"}], []),
        ],
    ),
    "ack -> Acked": (ident(), [(receive(msg(type="ack", id="N9")), [], [Acked("N9")])]),
    "subscribe forbidden -> error": (
        ident(),
        [
            (
                receive(msg(type="subscribe", channel="topic:news", ref=1)),
                [{"type": "error", "code": "forbidden", "message": ANY, "ref": 1}],
                [],
            )
        ],
    ),
    "subscribe to a user channel -> error": (
        ident(topics=NEWS),
        [
            (
                receive(msg(type="subscribe", channel="user:bob")),
                [{"type": "error", "code": "invalid_channel", "message": ANY}],
                [],
            )
        ],
    ),
    "subscribe allowed -> Subscribe_, done -> subscribed": (
        ident(topics=NEWS),
        [
            (
                receive(msg(type="subscribe", channel="topic:chat.room", ref=2)),
                [],
                [Subscribe_("chat.room")],
            ),
            (done(), [{"type": "subscribed", "channel": "topic:chat.room", "ref": 2}], []),
        ],
    ),
    "messages wait while a subscribe is answered": (
        ident(topics=NEWS),
        [
            (
                receive(msg(type="subscribe", channel="topic:chat.a") + PING),
                [],
                [Subscribe_("chat.a")],
            ),
            (done(), [{"type": "subscribed", "channel": "topic:chat.a"}, {"type": "pong"}], []),
        ],
    ),
    "unsubscribe a topic not joined -> error": (
        ident(topics=NEWS),
        [
            (
                receive(msg(type="unsubscribe", channel="topic:chat.a")),
                [{"type": "error", "code": "not_subscribed", "message": ANY}],
                [],
            )
        ],
    ),
    "unsubscribe a granted topic -> Unsubscribe_ and unsubscribed": (
        ident(topics=NEWS),
        [
            (
                receive(msg(type="unsubscribe", channel="topic:news", ref=4)),
                [{"type": "unsubscribed", "channel": "topic:news", "ref": 4}],
                [Unsubscribe_("news")],
            )
        ],
    ),
    "publish forbidden -> error": (
        ident(publish=ROOM),
        [
            (
                receive(msg(type="publish", channel="topic:room2", data=1, ref=5)),
                [{"type": "error", "code": "forbidden", "message": ANY, "ref": 5}],
                [],
            )
        ],
    ),
    "publish -> Upstream, done -> published": (
        ident(publish=ROOM),
        [
            (
                receive(
                    msg(
                        type="publish", channel="topic:room1", event="chat", data={"t": "hi"}, ref=6
                    )
                ),
                [],
                [Upstream(Publish(Channel("topic", "room1"), {"t": "hi"}, "chat", 6))],
            ),
            (
                done("N42"),
                [{"type": "published", "id": "N42", "channel": "topic:room1", "ref": 6}],
                [],
            ),
        ],
    ),
    "publish, failed -> error broker_unavailable": (
        ident(publish=ROOM),
        [
            (
                receive(msg(type="publish", channel="topic:room1", data=1, ref=7)),
                [],
                [Upstream(Publish(Channel("topic", "room1"), 1, None, 7))],
            ),
            (
                failed("broker_unavailable", "cannot publish right now; retry"),
                [{"type": "error", "code": "broker_unavailable", "message": ANY, "ref": 7}],
                [],
            ),
        ],
    ),
    "send -> Upstream, done -> sent": (
        ident(),
        [
            (
                receive(msg(type="send", event="position", data=[1, 2])),
                [],
                [Upstream(Send("position", [1, 2]))],
            ),
            (done(), [{"type": "sent"}], []),
        ],
    ),
    "send, failed -> error, then the next message": (
        ident(),
        [
            (
                receive(msg(type="send", event="position", data=0) + PING),
                [],
                [Upstream(Send("position", 0))],
            ),
            (
                failed("broker_unavailable", "retry"),
                [
                    {"type": "error", "code": "broker_unavailable", "message": "retry"},
                    {"type": "pong"},
                ],
                [],
            ),
        ],
    ),
    "refresh -> Verify, verified -> refreshed": (
        ident(),
        [
            (receive(msg(type="refresh", token="T2")), [], [Verify("T2")]),
            (
                verified(ident(expires_in=7200)),
                [{"type": "refreshed", "expires_at": int(NOW + 7200)}],
                [],
            ),
        ],
    ),
    "refresh refused -> error invalid_token, socket stays open": (
        ident(),
        [
            (receive(msg(type="refresh", token="T2", ref=8)), [], [Verify("T2")]),
            (
                refused("signature", "token signature does not verify"),
                [{"type": "error", "code": "invalid_token", "message": ANY, "ref": 8}],
                [],
            ),
            (receive(PING), [{"type": "pong"}], []),
        ],
    ),
    "refresh for another user -> 4003": (
        ident(),
        [
            (receive(msg(type="refresh", token="T2")), [], [Verify("T2")]),
            (verified(ident(user="mallory")), [CLOSE(4003)], [LEAVE]),
        ],
    ),
    "refresh that drops a topic -> Unsubscribe_": (
        ident(topics=grants("news")),
        [
            (receive(msg(type="refresh", token="T2")), [], [Verify("T2")]),
            (
                verified(ident(topics=grants("sport"))),
                [{"type": "refreshed", "expires_at": int(NOW + 3600)}],
                [Unsubscribe_("news"), Subscribe_("sport", answer=False)],
            ),
        ],
    ),
    "resume -> Replay of what came before, replayed -> resumed": (
        ident(),
        [
            (
                receive(msg(type="resume", since="N1", ref=9)),
                [],
                [Replay(ResumePoint("N1"), ALL_SO_FAR)],
            ),
            (
                replayed([note("N2")]),
                [{"type": "resumed", "resumed": True, "count": 1, "ref": 9}, shown(note("N2"))],
                [],
            ),
        ],
    ),
    "resume of a gap too old -> resumed false": (
        ident(),
        [
            (receive(msg(type="resume", since="N1")), [], [Replay(ResumePoint("N1"), ALL_SO_FAR)]),
            (replayed(None), [{"type": "resumed", "resumed": False, "count": 0}], []),
        ],
    ),
    "resume after live traffic -> Replay bounded by the first live seq": (
        ident(),
        [
            (live(note("N5"), seq=17), [shown(note("N5"))], []),
            (receive(msg(type="resume", since="N1")), [], [Replay(ResumePoint("N1"), 17)]),
        ],
    ),
}


@pytest.mark.parametrize(("identity", "steps"), OPEN_CASES.values(), ids=OPEN_CASES.keys())
def test_open_session(identity: Identity, steps: list[Step]) -> None:
    run(opened(identity), steps)


# --- rate limit --------------------------------------------------------------------------

RATE_CASES: dict[str, list[Step]] = {
    "the burst passes": [
        (receive(PING * CONFIG.rate_burst), [{"type": "pong"}] * CONFIG.rate_burst, []),
    ],
    "over the burst -> 4029": [
        (
            receive(PING * (CONFIG.rate_burst + 1)),
            [{"type": "pong"}] * CONFIG.rate_burst + [CLOSE(4029)],
            [LEAVE],
        ),
    ],
    "ping frames count too": [
        (
            receive(client(OP_PING) * CONFIG.rate_burst + PING),
            [("pong", b"")] * CONFIG.rate_burst + [CLOSE(4029)],
            [LEAVE],
        ),
    ],
    "the bucket refills at rate_limit per second": [
        (receive(PING * CONFIG.rate_burst), [{"type": "pong"}] * CONFIG.rate_burst, []),
        (receive(PING, at=0.15), [{"type": "pong"}], []),
        (receive(PING, at=0.15), [CLOSE(4029)], [LEAVE]),
    ],
    "nothing is answered after the close": [
        (
            receive(PING * (CONFIG.rate_burst + 3)),
            [{"type": "pong"}] * CONFIG.rate_burst + [CLOSE(4029)],
            [LEAVE],
        ),
        (receive(PING + client(OP_PING), at=5), [], []),
    ],
}


@pytest.mark.parametrize("steps", RATE_CASES.values(), ids=RATE_CASES.keys())
def test_rate_limit(steps: list[Step]) -> None:
    run(opened(), steps)


# --- live notifications ------------------------------------------------------------------


def test_live_frames_during_a_resume_are_held_and_released_after_the_replay_minus_duplicates() -> (
    None
):
    n1, n2, n3, n4 = note("N1"), note("N2"), note("N3"), note("N4")
    run(
        new("T", ResumePoint("N0")),
        [
            (lambda s: None, [], [Verify("T")]),
            (verified(), [], [JOIN]),
            (live(n2, seq=1), [], []),  # routed here already: held back
            (joined(), [], [Replay(ResumePoint("N0"), None)]),
            (live(n3, seq=2), [], []),
            (live(n4, seq=3), [], []),
            # The replay read N1..N3 from the history: N2 and N3 came live too.
            (
                replayed([n1, n2, n3]),
                [welcome(True), shown(n1), shown(n2), shown(n3), shown(n4)],
                [],
            ),
            (live(n3, seq=4), [], []),  # a late live copy of a replayed id: dropped
            (live(note("N5"), seq=5), [shown(note("N5"))], []),
        ],
    )


def test_a_message_without_message_id_held_live_and_replayed_is_shown_once() -> None:
    """Its live copy and the stream's have content ids with one digest but two time
    parts: the replayed one cancels one held copy; later live copies are new messages."""
    digest_a, digest_b = 0xA1, 0xB2
    held_a, replayed_a = note(format_id(1000, digest_a)), note(format_id(990, digest_a))
    held_b, again_a = note(format_id(1001, digest_b)), note(format_id(1005, digest_a))
    run(
        new("T", ResumePoint("N0")),
        [
            (lambda s: None, [], [Verify("T")]),
            (verified(), [], [JOIN]),
            (joined(), [], [Replay(ResumePoint("N0"), None)]),
            (live(held_a, seq=1), [], []),
            (live(held_b, seq=2), [], []),
            (
                replayed([note("N1"), replayed_a]),
                [welcome(True), shown(note("N1")), shown(replayed_a), shown(held_b)],
                [],
            ),
            (live(again_a, seq=3), [shown(again_a)], []),
        ],
    )


def test_a_live_copy_of_a_replayed_id_is_dropped_only_within_the_skip_window() -> None:
    session = new("T", ResumePoint("N0"))
    run(
        session,
        [
            (lambda s: None, [], [Verify("T")]),
            (verified(), [], [JOIN]),
            (joined(), [], [Replay(ResumePoint("N0"), None)]),
        ],
    )
    run(session, [(replayed([note("N1")]), [welcome(True), shown(note("N1"))], [])])
    assert session.wake_at == NOW + SKIP_WINDOW
    run(session, [(wake(SKIP_WINDOW), [], []), (live(note("N1"), seq=9), [shown(note("N1"))], [])])


def test_nothing_live_before_welcome_without_resume_is_lost() -> None:
    run(
        new("T"),
        [
            (lambda s: None, [], [Verify("T")]),
            (verified(), [], [JOIN]),
            (live(note("N1"), seq=1), [], []),
            (joined(), [welcome(), shown(note("N1"))], []),
        ],
    )


def test_live_frames_are_refused_before_join_and_after_close() -> None:
    session = new("T")
    session.take_actions()
    assert not session.live(note("N1").frame, 1, 0, NOW)
    session = opened()
    close(1001)(session)
    assert not session.live(note("N1").frame, 1, 0, NOW)


BIG = note("N" + "x" * 10)  # ~100 bytes
FITS = CONFIG.send_buffer_bytes // len(BIG.frame)
OVERFLOW_CASES: dict[str, list[Step]] = {
    "send buffer overflow -> 4009 after what was queued": [
        (burst(BIG, FITS + 1), [shown(BIG)] * FITS + [CLOSE(4009)], [LEAVE]),
    ],
    "bytes the transport holds count -> 4009": [
        (live(BIG, seq=1, buffered=CONFIG.send_buffer_bytes - len(BIG.frame)), [shown(BIG)], []),
        (
            live(BIG, seq=2, buffered=CONFIG.send_buffer_bytes - len(BIG.frame) + 1, queued=False),
            [CLOSE(4009)],
            [LEAVE],
        ),
    ],
    "4009 is cut off 2 s later if not answered": [
        (live(BIG, seq=1, buffered=CONFIG.send_buffer_bytes, queued=False), [CLOSE(4009)], [LEAVE]),
        (wake(1.9), [], []),
        (wake(2.0), [], [ABORT]),
    ],
}


@pytest.mark.parametrize("steps", OVERFLOW_CASES.values(), ids=OVERFLOW_CASES.keys())
def test_send_buffer(steps: list[Step]) -> None:
    run(opened(), steps)


def test_held_frames_that_overflow_during_a_resume_close_4009() -> None:
    run(
        opened(),
        [
            (receive(msg(type="resume", since="N0")), [], [Replay(ResumePoint("N0"), ALL_SO_FAR)]),
            *[(live(BIG, seq=i + 1), [], []) for i in range(FITS)],
            (live(BIG, seq=99, queued=False), [CLOSE(4009)], [LEAVE]),
            (replayed([note("N1")]), [], []),
        ],
    )


# --- token expiry --------------------------------------------------------------------------


def test_refresh_required_then_4010_at_the_deadline() -> None:
    session = opened(ident(expires_in=100))
    assert session.wake_at == NOW + 70
    run(
        session,
        [
            (wake(69.9), [], []),
            (wake(70), [{"type": "refresh_required", "expires_at": int(NOW + 100)}], []),
        ],
    )
    assert session.wake_at == NOW + 100
    run(session, [(wake(99.9), [], []), (wake(100), [CLOSE(4010)], [LEAVE])])


def test_the_deadline_includes_the_leeway() -> None:
    session = opened(ident(expires_in=100), leeway=5.0)
    run(session, [(wake(70), [{"type": "refresh_required", "expires_at": int(NOW + 100)}], [])])
    run(session, [(wake(104.9), [], []), (wake(105), [CLOSE(4010)], [LEAVE])])


def test_a_refresh_in_time_moves_the_deadline() -> None:
    session = opened(ident(expires_in=100))
    run(
        session,
        [
            (wake(70), [{"type": "refresh_required", "expires_at": int(NOW + 100)}], []),
            (receive(msg(type="refresh", token="T2"), at=71), [], [Verify("T2")]),
            (
                lambda s: s.verified(ident(expires_in=3600), NOW + 71, 1, True),
                [{"type": "refreshed", "expires_at": int(NOW + 3600)}],
                [],
            ),
            (wake(100), [], []),
        ],
    )
    assert session.wake_at == NOW + 3570


def test_a_token_close_to_expiry_gets_refresh_required_with_welcome() -> None:
    session = new("T")
    run(
        session, [(lambda s: None, [], [Verify("T")]), (verified(ident(expires_in=20)), [], [JOIN])]
    )
    run(
        session,
        [
            (
                joined(),
                [welcome(expires_in=20), {"type": "refresh_required", "expires_at": int(NOW + 20)}],
                [],
            )
        ],
    )
    assert session.wake_at == NOW + 20


# --- the close handshake ----------------------------------------------------------------------

CLOSE_CASES: dict[str, list[Step]] = {
    "client close -> echoed close, Leave, CloseTransport": [
        (receive(close_msg(1000, "bye")), [CLOSE(1000)], [LEAVE, CLOSE_TRANSPORT]),
    ],
    "client close without a code -> empty close": [
        (receive(close_msg(None)), [CLOSE(None)], [LEAVE, CLOSE_TRANSPORT]),
    ],
    "client close after a message -> both answered": [
        (
            receive(PING + close_msg(1001)),
            [{"type": "pong"}, CLOSE(1001)],
            [LEAVE, CLOSE_TRANSPORT],
        ),
    ],
    "nothing is read after the client's close": [
        (receive(close_msg(1000) + PING), [CLOSE(1000)], [LEAVE, CLOSE_TRANSPORT]),
        (receive(PING), [], []),
    ],
    "server close, then the client's answer -> CloseTransport": [
        (close(1001), [CLOSE(1001)], [LEAVE]),
        (receive(close_msg(1001)), [], [CLOSE_TRANSPORT]),
    ],
    "messages before the client's answer are not answered": [
        (close(1001), [CLOSE(1001)], [LEAVE]),
        (receive(PING + client(OP_PING) + close_msg(1000)), [], [CLOSE_TRANSPORT]),
    ],
    "close is idempotent": [
        (close(1001), [CLOSE(1001)], [LEAVE]),
        (close(4003), [], []),
    ],
    "close grace passes -> Abort": [
        (close(1001), [CLOSE(1001)], [LEAVE]),
        (wake(CONFIG.close_grace - 0.1), [], []),
        (wake(CONFIG.close_grace), [], [ABORT]),
    ],
    "a shorter grace": [
        (close(1001, grace=2.0), [CLOSE(1001)], [LEAVE]),
        (wake(2.0), [], [ABORT]),
    ],
    "connection lost -> Leave": [
        (lost(), [], [LEAVE]),
        (receive(PING), [], []),
    ],
}


@pytest.mark.parametrize("steps", CLOSE_CASES.values(), ids=CLOSE_CASES.keys())
def test_close_handshake(steps: list[Step]) -> None:
    run(opened(), steps)


def test_the_close_frame_follows_what_was_queued() -> None:
    session = opened()
    run(session, [(live(note("N1"), seq=1), [shown(note("N1"))], [])])
    live(note("N2"), seq=2)(session)
    close(1001)(session)
    assert written(session) == [shown(note("N2")), CLOSE(1001)]


PROTOCOL_ERRORS = {
    "reserved bits": (client(OP_TEXT, b"{}", rsv=4), 1002),
    "reserved opcode": (client(0x3, b""), 1002),
    "continuation without a message": (client(OP_CONTINUATION, b"x"), 1002),
    "bad close code": (close_msg(999), 1002),
    "not UTF-8": (client(OP_TEXT, b"\xff"), 1007),
    "close reason not UTF-8": (client(OP_CLOSE, b"\x03\xe8\xff"), 1007),
    "too big": (client(OP_BINARY, b"x" * (CONFIG.max_message_size + 1)), 1009),
}


@pytest.mark.parametrize(("data", "code"), PROTOCOL_ERRORS.values(), ids=PROTOCOL_ERRORS.keys())
def test_a_protocol_error_fails_the_connection(data: bytes, code: int) -> None:
    """RFC 6455 7.1.7: a close frame with the code, then the TCP connection is closed
    (the server closes first, 7.1.1). Whether it waits for the client's close frame or
    not, that close frame must not leave the connection open until the close grace
    runs out: the bad frame must not be parsed again instead of it."""
    session = opened()
    session.receive_data(data, NOW)
    assert written(session) == [CLOSE(code)]
    actions = session.take_actions() or []
    if data[0] & 0x0F != OP_CLOSE:  # a client whose close frame was the bad one sends no other
        session.receive_data(close_msg(code), NOW + 0.1)
        assert written(session) == []
        actions += session.take_actions() or []
    assert actions == [LEAVE, CLOSE_TRANSPORT]
    assert session.state is State.CLOSED


def test_a_protocol_error_before_auth_fails_the_connection() -> None:
    session = new()
    session.receive_data(client(OP_TEXT, b"{}", rsv=4), NOW)
    assert written(session) == [CLOSE(1002)]
    session.receive_data(close_msg(1002), NOW + 0.1)
    actions = session.take_actions() or []
    assert actions == [CLOSE_TRANSPORT]


# --- heartbeat -------------------------------------------------------------------------------

HEARTBEAT_CASES: dict[str, list[Step]] = {
    "tick -> ping": [
        (tick(25), [("ping", b"")], []),
    ],
    "two ticks without data -> Abort and Leave": [
        (tick(25), [("ping", b"")], []),
        (tick(50), [], [LEAVE, ABORT]),
    ],
    "a pong between ticks keeps the socket": [
        (tick(25), [("ping", b"")], []),
        (receive(client(OP_PONG), at=26), [], []),
        (tick(50), [("ping", b"")], []),
    ],
    "any message between ticks keeps the socket": [
        (tick(25), [("ping", b"")], []),
        (receive(msg(type="ack", id="N1"), at=26), [], [Acked("N1")]),
        (tick(50), [("ping", b"")], []),
    ],
    "no ping while closing": [
        (close(1001), [CLOSE(1001)], [LEAVE]),
        (tick(25), [], []),
        (tick(50), [], []),
    ],
}


@pytest.mark.parametrize("steps", HEARTBEAT_CASES.values(), ids=HEARTBEAT_CASES.keys())
def test_heartbeat(steps: list[Step]) -> None:
    run(opened(), steps)


def test_heartbeat_before_auth_drops_a_silent_socket_without_leave() -> None:
    run(new(), [(tick(1), [("ping", b"")], []), (tick(2), [], [ABORT])])


def test_session_keeps_its_state_in_slots() -> None:
    session: Any = new()
    assert not hasattr(session, "__dict__")
