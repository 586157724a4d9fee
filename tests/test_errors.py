"""One exception root, and one table from why a socket ends to what clients and
metrics see (issue 15 part 1). No I/O: sessions are driven directly."""

from __future__ import annotations

import inspect
import json
import re
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

import notifyd
from notifyd import errors
from notifyd.auth import NO_GRANTS, Identity
from notifyd.closes import REFUSAL_GRACE, CloseReason
from notifyd.errors import NotifydError, WebSocketError
from notifyd.protocol import CloseCode
from notifyd.session import Session, SessionConfig
from notifyd.websocket import OP_BINARY, OP_PING, OP_TEXT, FrameParser

ROOT = Path(__file__).parent.parent
NOW = 1_700_000_000.0
CONFIG = SessionConfig(max_message_size=64, rate_burst=3, max_connections_per_user=2)

#: Every close notifyd starts, as the client reads it: (code, reason), and the
#: connection attempt's outcome when the socket is refused before it is accepted.
#: "" for the reason: the cause's own (fixed) message.
EXPECTED = {
    "SERVER_FULL": (1013, "server full", "overloaded"),
    "NOT_ACCEPTING": (1001, "server going away", "overloaded"),
    "TOO_MANY_CONNECTIONS": (4003, "too many connections", "forbidden"),
    "AUTH_TIMEOUT": (4008, "auth timeout", "timeout"),
    "AUTH_EXPIRED": (4010, "token expired", "expired"),
    "UNAUTHORIZED": (4001, "", "unauthorized"),
    "NOT_TEXT_FIRST": (4000, "first message must be a JSON text frame", "protocol_error"),
    "BAD_FIRST_MESSAGE": (4000, "", "protocol_error"),
    "TOKEN_EXPIRED": (4010, "token expired", None),
    "TOKEN_REVOKED": (4001, "token revoked", None),
    "REFRESH_FOR_ANOTHER_USER": (4003, "refresh token is for another user", None),
    "DISCONNECTED": (4003, "disconnected by the backend", None),
    "OVER_USER_LIMIT": (4003, "too many connections", None),
    "RATE_LIMITED": (4029, "too many messages", None),
    "SLOW_CONSUMER": (4009, "send buffer overflow", None),
    "SHUTDOWN": (1001, "server going away", None),
    "BROKER_OUTAGE": (1001, "no broker connection", None),
    "INTERNAL_ERROR": (1011, "internal error", None),
    "BAD_FRAMING": (1002, "", None),
    "BAD_UTF8": (1007, "", None),
    "TOO_BIG": (1009, "", None),
}


# --- the exceptions ----------------------------------------------------------------------


def test_every_notifyd_exception_is_a_notifyd_error() -> None:
    classes = [
        c for _, c in inspect.getmembers(errors, inspect.isclass) if c.__module__ == errors.__name__
    ]
    assert len(classes) >= 10
    assert all(issubclass(c, NotifydError) for c in classes), classes
    assert issubclass(errors.ConfigError, ValueError)
    assert issubclass(errors.BrokerError, RuntimeError)


# --- the table ---------------------------------------------------------------------------


def test_the_table_is_every_code_and_reason_clients_see() -> None:
    table = {r.name: (r.code, r.text, r.outcome) for r in CloseReason}
    assert table == EXPECTED


def test_refusals_count_an_outcome_and_are_cut_off_sooner() -> None:
    for reason in CloseReason:
        if reason.outcome is not None:
            assert reason.grace == REFUSAL_GRACE, reason
    assert CloseReason.SLOW_CONSUMER.grace == CloseReason.SHUTDOWN.grace == 2.0
    assert CloseReason.TOKEN_EXPIRED.grace is None  # the session's close_grace


def test_every_code_and_outcome_is_documented_for_operators() -> None:
    readme = (ROOT / "README.md").read_text()
    codes = readme[readme.index("### Close codes") :]
    codes = codes[: codes.index("\n\n", codes.index("| code |"))]
    documented = {int(c) for c in re.findall(r"`(\d{4})`", codes)}
    assert {r.code for r in CloseReason} <= documented
    assert documented <= {int(c) for c in CloseCode} | {1002, 1007}
    row = next(
        line
        for line in readme.splitlines()
        if "`notifyd_connection_attempts_total`" in line and "outcome" in line
    )
    assert {r.outcome for r in CloseReason if r.outcome} <= set(re.findall(r"\b[a-z_]+\b", row))


def test_the_reason_text_comes_from_the_table_or_the_cause() -> None:
    assert CloseReason.SHUTDOWN.text_for("anything") == "server going away"
    assert CloseReason.UNAUTHORIZED.text_for("token signature does not verify") == (
        "token signature does not verify"
    )
    assert CloseReason.BAD_FIRST_MESSAGE.text_for("x" * 300) == "x" * 100


@pytest.mark.parametrize(
    ("reason", "expected"),
    [
        ("expired", CloseReason.AUTH_EXPIRED),
        ("timeout", CloseReason.AUTH_TIMEOUT),
        ("signature", CloseReason.UNAUTHORIZED),
        ("revoked", CloseReason.UNAUTHORIZED),
        ("missing", CloseReason.UNAUTHORIZED),
    ],
)
def test_auth_failures_map_to_their_close(reason: str, expected: CloseReason) -> None:
    assert CloseReason.for_auth_failure(reason) is expected


def _violation(data: bytes, max_size: int = 64) -> WebSocketError:
    parser = FrameParser(max_size)
    parser.feed(data)
    with pytest.raises(WebSocketError) as caught:
        while parser.next() is not None:
            pass
    return caught.value


def client(opcode: int, payload: bytes = b"", rsv: int = 0, masked: bool = True) -> bytes:
    mask = b"\x0f\xf0\xaa\x55"
    head = struct.pack("!BB", 0x80 | rsv << 4 | opcode, (0x80 if masked else 0) | len(payload))
    if not masked:
        return head + payload
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (client(OP_TEXT, b"x", rsv=4), 1002),
        (client(OP_TEXT, b"x", masked=False), 1002),
        (client(OP_TEXT, b"\xff\xfe"), 1007),
        (client(OP_BINARY, b"x" * 100), 1009),
    ],
    ids=["reserved-bits", "unmasked", "not-utf8", "too-big"],
)
def test_every_websocket_violation_closes_with_its_own_code(frame: bytes, code: int) -> None:
    exc = _violation(frame)
    assert exc.code == code
    assert CloseReason.for_violation(exc.code).code == code


# --- sessions close as the table says ------------------------------------------------------


def identity(user: str = "alice") -> Identity:
    return Identity(user, NOW + 3600, NO_GRANTS, NO_GRANTS)


def closed_with(session: Session) -> tuple[int, str]:
    """The code and reason of the close frame among what the session wrote."""
    data = session.take_output() or b""
    while data:
        opcode, length = data[0] & 0x0F, data[1] & 0x7F
        assert length < 126
        payload, data = data[2 : 2 + length], data[2 + length :]
        if opcode == 0x8:
            return int.from_bytes(payload[:2], "big"), payload[2:].decode()
    raise AssertionError("no close frame")


def opened(user: str = "alice") -> Session:
    session = Session(CONFIG, NOW, token="t")
    session.verified(identity(user), NOW, 0, True)
    session.joined(NOW)
    session.take_output()
    return session


Drive = Callable[[], Session]


def _refused(reason: str, message: str) -> Drive:
    def drive() -> Session:
        session = Session(CONFIG, NOW, token="t")
        session.refused(reason, message, NOW)
        return session

    return drive


def _first(frame: bytes) -> Drive:
    def drive() -> Session:
        session = Session(CONFIG, NOW)
        session.receive_data(frame, NOW)
        return session

    return drive


def _verified(sockets: int, accepting: bool) -> Drive:
    def drive() -> Session:
        session = Session(CONFIG, NOW, token="t")
        session.verified(identity(), NOW, sockets, accepting)
        return session

    return drive


def _timed_out() -> Session:
    session = Session(CONFIG, NOW)
    session.wake(NOW + CONFIG.auth_timeout)
    return session


def _rate_limited() -> Session:
    session = opened()
    session.receive_data(client(OP_PING) * (CONFIG.rate_burst + 1), NOW)
    return session


def _expired() -> Session:
    session = opened()
    session.wake(NOW + 3600)
    return session


def _overflowed() -> Session:
    session = opened()
    session.live(b"x" * (CONFIG.send_buffer_bytes + 1), 1, 0, NOW)
    return session


def _refreshed_as_another_user() -> Session:
    session = opened()
    session.receive_data(
        client(OP_TEXT, json.dumps({"type": "refresh", "token": "u"}).encode()), NOW
    )
    session.verified(identity("mallory"), NOW, 0, True)
    return session


def _too_big() -> Session:
    session = opened()
    session.receive_data(client(OP_TEXT, b"x" * 100), NOW)
    return session


@pytest.mark.parametrize(
    ("drive", "expected", "outcome"),
    [
        (_refused("expired", "token has expired"), (4010, "token expired"), "expired"),
        (
            _refused("signature", "token signature does not verify"),
            (4001, "token signature does not verify"),
            "unauthorized",
        ),
        (_timed_out, (4008, "auth timeout"), "timeout"),
        (
            _first(client(OP_BINARY, b"{}")),
            (4000, "first message must be a JSON text frame"),
            "protocol_error",
        ),
        (_first(client(OP_TEXT, b"not json")), (4000, None), "protocol_error"),
        (
            _first(client(OP_TEXT, b'{"type":"ping"}')),
            (4001, "first message must be {type: auth}"),
            "unauthorized",
        ),
        (_verified(sockets=2, accepting=True), (4003, "too many connections"), "forbidden"),
        (_verified(sockets=0, accepting=False), (1001, "server going away"), "overloaded"),
        (_rate_limited, (4029, "too many messages"), None),
        (_expired, (4010, "token expired"), None),
        (_overflowed, (4009, "send buffer overflow"), None),
        (_refreshed_as_another_user, (4003, "refresh token is for another user"), None),
        (_too_big, (1009, "message larger than 64 bytes"), None),
    ],
    ids=[
        "expired-token",
        "bad-token",
        "no-auth-in-time",
        "binary-first",
        "bad-json-first",
        "not-auth-first",
        "per-user-limit",
        "draining",
        "rate-limited",
        "token-expired",
        "slow-consumer",
        "refresh-for-another-user",
        "too-big",
    ],
)
def test_a_session_closes_and_counts_as_the_table_says(
    drive: Drive, expected: tuple[int, str | None], outcome: str | None
) -> None:
    def count(name: str, labels: dict[str, str]) -> float:
        # CONFIG's metrics: shared by this module's sessions only, hence the differences.
        return CONFIG.metrics.registry.get_sample_value(name, labels) or 0.0

    code = str(expected[0])
    attempts_before = {
        o: count("notifyd_connection_attempts_total", {"outcome": o}) for o in EXPECTED_OUTCOMES
    }
    closes_before = count("notifyd_closes_total", {"code": code})
    session = drive()
    got = closed_with(session)
    assert got[0] == expected[0]
    if expected[1] is not None:
        assert got[1] == expected[1]
    assert count("notifyd_closes_total", {"code": code}) == closes_before + 1
    attempts = {
        o: count("notifyd_connection_attempts_total", {"outcome": o}) - attempts_before[o]
        for o in EXPECTED_OUTCOMES
    }
    assert attempts == {o: float(o == outcome) for o in EXPECTED_OUTCOMES}


EXPECTED_OUTCOMES = sorted({outcome for _, _, outcome in EXPECTED.values() if outcome})


def test_no_module_but_the_table_picks_a_close_code() -> None:
    """A close started anywhere names a CloseReason: no code or reason text by hand."""
    package = Path(notifyd.__file__).parent
    by_hand = re.compile(r"\b(?:close|close_soon|refuse)\(\s*(?:CloseCode\.|\d{4}\b)")
    found = [
        f"{path.name}:{number}: {line.strip()}"
        for path in sorted(package.glob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if by_hand.search(line)
    ]
    assert found == []
