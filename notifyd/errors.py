"""Exceptions notifyd raises across its layers, rooted at :class:`NotifydError`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class NotifydError(Exception):
    """Base of notifyd's own exceptions."""


class BrokerUnavailable(NotifydError):
    """RabbitMQ cannot take a message right now (disconnected, or no confirm)."""


class AuthError(NotifydError):
    """A token was refused; ``reason`` is the metric label, the message is for the log.

    The message is logged and sent as a close reason: it is made of fixed text,
    never of the token's own header or claims, and any control character that
    slips in anyway is escaped so that no token can forge a log line.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(_printable(message))
        self.reason = reason


class ConfigError(NotifydError, ValueError):
    """A setting is missing, unknown or has a bad value; the message names the key."""


class BrokerError(NotifydError, RuntimeError):
    """The node could not be started, stopped or reached."""


class ProtocolError(NotifydError):
    """A client message that is answered with an ``error`` (or closes the socket)."""

    def __init__(self, code: str, message: str, ref: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.ref = ref


class InvalidMessage(NotifydError):
    """An AMQP message notifyd cannot deliver; ``reason`` is the metric label."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class PublishError(NotifydError):
    """RabbitMQ did not confirm the message."""


class HandshakeError(NotifydError):
    """An upgrade request that is answered with an HTTP error instead of ``101``."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})


class WebSocketError(NotifydError):
    """The client broke the protocol; the connection ends with ``code``."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class ServeError(NotifydError):
    """Serving failed in a way the operator must fix (a port taken, a worker that died);
    the message says why in one line."""


def _printable(text: str) -> str:
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")
