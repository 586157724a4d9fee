"""Why notifyd ends a socket: one table from each reason to what everyone sees of it.

Each :class:`CloseReason` fixes, once, the close code and the close frame's
reason text the client reads, the ``outcome`` counted in
``notifyd_connection_attempts_total`` when the socket is refused before it was
accepted (``None`` for a socket that was accepted, or for which no attempt is
counted), and the seconds the peer has to answer the close frame (``None``: the
session's ``close_grace``). ``notifyd_closes_total{code}`` counts the code.

Every close notifyd starts names its reason here (the session, the connection,
the hub, the gateway); no other module picks a close code or a reason text.
The one close it does not start is the echo of a client's own close frame.

Pure, with no I/O. It lives apart from :mod:`notifyd.errors` because
:mod:`notifyd.protocol`, where :class:`~notifyd.protocol.CloseCode` is, imports
the exceptions: the table in ``errors`` would make an import cycle.
"""

from __future__ import annotations

import enum
from typing import Final

from .protocol import CloseCode
from .websocket import INVALID_DATA, PROTOCOL_ERROR

#: Seconds a socket refused before it was accepted has to answer the close frame.
REFUSAL_GRACE: Final = 2.0
#: The longest reason text taken from a refusal's own message.
MAX_DETAIL: Final = 100


@enum.unique
class CloseReason(enum.Enum):
    """Why a socket is closed: ``(code, text, outcome, grace)``.

    An empty ``text`` means the reason's message comes with the cause (an
    :class:`~notifyd.errors.AuthError`, a :class:`~notifyd.errors.ProtocolError`
    or a :class:`~notifyd.errors.WebSocketError`, all made of fixed text); see
    :meth:`text_for`.
    """

    # --- refused before it was accepted: counted as a connection attempt's outcome ---
    SERVER_FULL = (CloseCode.TRY_AGAIN_LATER, "server full", "overloaded", REFUSAL_GRACE)
    NOT_ACCEPTING = (CloseCode.GOING_AWAY, "server going away", "overloaded", REFUSAL_GRACE)
    TOO_MANY_CONNECTIONS = (CloseCode.FORBIDDEN, "too many connections", "forbidden", REFUSAL_GRACE)
    AUTH_TIMEOUT = (CloseCode.AUTH_TIMEOUT, "auth timeout", "timeout", REFUSAL_GRACE)
    AUTH_EXPIRED = (CloseCode.TOKEN_EXPIRED, "token expired", "expired", REFUSAL_GRACE)
    #: Any other refused token; the text is the AuthError's message.
    UNAUTHORIZED = (CloseCode.UNAUTHORIZED, "", "unauthorized", REFUSAL_GRACE)
    NOT_TEXT_FIRST = (
        CloseCode.PROTOCOL_ERROR,
        "first message must be a JSON text frame",
        "protocol_error",
        REFUSAL_GRACE,
    )
    #: A bad first message or upgrade query; the text is the ProtocolError's message.
    BAD_FIRST_MESSAGE = (CloseCode.PROTOCOL_ERROR, "", "protocol_error", REFUSAL_GRACE)

    # --- an accepted socket (or one not yet accepted, but not counted as refused) ---
    TOKEN_EXPIRED = (CloseCode.TOKEN_EXPIRED, "token expired", None, None)
    TOKEN_REVOKED = (CloseCode.UNAUTHORIZED, "token revoked", None, None)
    REFRESH_FOR_ANOTHER_USER = (
        CloseCode.FORBIDDEN,
        "refresh token is for another user",
        None,
        None,
    )
    DISCONNECTED = (CloseCode.FORBIDDEN, "disconnected by the backend", None, None)
    #: Past ``max_connections_per_user`` over the cluster: the newest sockets go.
    OVER_USER_LIMIT = (CloseCode.FORBIDDEN, "too many connections", None, None)
    RATE_LIMITED = (CloseCode.RATE_LIMITED, "too many messages", None, None)
    SLOW_CONSUMER = (CloseCode.SLOW_CONSUMER, "send buffer overflow", None, 2.0)
    SHUTDOWN = (CloseCode.GOING_AWAY, "server going away", None, 2.0)
    BROKER_OUTAGE = (CloseCode.GOING_AWAY, "no broker connection", None, None)
    INTERNAL_ERROR = (CloseCode.INTERNAL_ERROR, "internal error", None, None)
    #: The client broke RFC 6455; the text is the WebSocketError's reason.
    BAD_FRAMING = (PROTOCOL_ERROR, "", None, None)
    BAD_UTF8 = (INVALID_DATA, "", None, None)
    TOO_BIG = (CloseCode.MESSAGE_TOO_BIG, "", None, None)

    def __init__(self, code: int, text: str, outcome: str | None, grace: float | None) -> None:
        self.code = code
        #: The fixed reason text ('' when the cause brings its own).
        self.text = text
        self.outcome = outcome
        self.grace = grace

    def text_for(self, detail: str = "") -> str:
        """The close frame's reason: the fixed text, else the cause's ``detail``."""
        return self.text or detail[:MAX_DETAIL]

    @classmethod
    def for_auth_failure(cls, reason: str) -> CloseReason:
        """What a new socket whose token was refused for ``reason`` is closed with
        (``reason``: the :class:`~notifyd.errors.AuthError`'s metric label)."""
        return _AUTH_FAILURES.get(reason, cls.UNAUTHORIZED)

    @classmethod
    def for_violation(cls, code: int) -> CloseReason:
        """What a client that broke RFC 6455 is closed with
        (``code``: the :class:`~notifyd.errors.WebSocketError`'s)."""
        return _VIOLATIONS.get(code, cls.BAD_FRAMING)


_AUTH_FAILURES: Final = {
    "expired": CloseReason.AUTH_EXPIRED,
    "timeout": CloseReason.AUTH_TIMEOUT,
}
_VIOLATIONS: Final = {
    PROTOCOL_ERROR: CloseReason.BAD_FRAMING,
    INVALID_DATA: CloseReason.BAD_UTF8,
    CloseCode.MESSAGE_TOO_BIG: CloseReason.TOO_BIG,
}
