"""Keeping tokens out of the log when aiohttp reports a request it cannot parse.

aiohttp logs such a request (a raw space or control byte in the target, LF-only
line endings, ``HTTP/1.l``, a NUL in a header, an over-long line, ...) at ERROR
with the parser's exception, whose text quotes the offending line or up to ~100
bytes of it: with ``?token=`` or ``Authorization: Bearer`` that is a token in the
log. :func:`install` puts a filter on aiohttp's server-side loggers that replaces
each such record with one line naming the kind of fault and nothing the client
sent, and lets each kind through at most once a minute, so a flood of garbage
costs neither log volume nor secrets. :func:`server_log`, handed to aiohttp's
request handlers (:func:`notifyd.app.runner_options`), counts every one in
``notifyd_malformed_requests_total{kind}``, whatever the log level: aiohttp
reports the commonest kind (a bad method on a connection's first request, e.g.
TLS sent to the HTTP port) at DEBUG, which a logger filter never sees.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Any, Final

from aiohttp.http_exceptions import (
    BadHttpMessage,
    BadHttpMethod,
    BadStatusLine,
    HttpProcessingError,
    InvalidHeader,
    InvalidURLError,
    LineTooLong,
    PayloadEncodingError,
)

from .logs import Throttle

if TYPE_CHECKING:
    from .metrics import Metrics

#: aiohttp's parser errors, most specific first, and the ``kind`` label of each.
KINDS: Final[tuple[tuple[type[HttpProcessingError], str], ...]] = (
    (LineTooLong, "too_long"),
    (BadHttpMethod, "bad_method"),
    (BadStatusLine, "bad_request_line"),
    (InvalidURLError, "bad_target"),
    (InvalidHeader, "bad_header"),
    (PayloadEncodingError, "bad_body"),
    (BadHttpMessage, "bad_message"),
    (HttpProcessingError, "bad_request"),
)
#: The loggers aiohttp's server side writes client-supplied text to.
LOGGERS: Final = ("aiohttp.server", "aiohttp.websocket")
#: aiohttp.websocket's warning that quotes the client's Sec-WebSocket-Protocol values
#: (where some clients put their token).
_SUBPROTOCOLS_MESSAGE: Final = "Client protocols"
_ADDRESS = re.compile(r"[0-9A-Fa-f.:]{1,64}")


def _parser_error(exc: object) -> HttpProcessingError | None:
    """The parser error in ``exc`` (an exception or exc_info), also when wrapped."""
    if isinstance(exc, tuple):
        exc = exc[1] if len(exc) > 1 else None
    if not isinstance(exc, BaseException):
        return None
    for _ in range(4):  # a short chain: __cause__ / __context__ of a handler's error
        if exc is None or isinstance(exc, HttpProcessingError):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


class CountingLog(logging.LoggerAdapter[logging.Logger]):
    """``aiohttp.server`` as aiohttp's request handlers see it: every malformed
    request is counted (in ``metrics``) before the level check that may drop its record."""

    def __init__(self, logger: logging.Logger, metrics: Metrics) -> None:
        super().__init__(logger)
        self.metrics = metrics

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        exc = _parser_error(kwargs.get("exc_info"))
        if exc is not None:
            self.metrics.malformed_requests.labels(_kind(exc)).inc()
        super().log(level, msg, *args, **kwargs)


def _kind(exc: HttpProcessingError) -> str:
    return next(kind for cls, kind in KINDS if isinstance(exc, cls))


def _peer(record: logging.LogRecord) -> str:
    """The client's address when the record carries one (aiohttp's first argument)."""
    args = record.args
    if (
        isinstance(args, tuple)
        and args
        and isinstance(args[0], str)
        and _ADDRESS.fullmatch(args[0])
    ):
        return args[0]
    return "?"


class RedactRequests(logging.Filter):
    """Rewrites aiohttp's records that would quote a client's request bytes."""

    def __init__(self) -> None:
        super().__init__()
        self._logged = Throttle()

    def filter(self, record: logging.LogRecord) -> bool:
        exc = _parser_error(record.exc_info)
        if exc is not None:
            kind = _kind(exc)
            if not self._logged.due(kind):
                return False
            _rewrite(
                record,
                "malformed HTTP request from %s refused (%s); its text is not logged, "
                "and further ones of this kind are counted in "
                "notifyd_malformed_requests_total and logged once a minute",
                (_peer(record), kind),
            )
            return True
        if isinstance(record.msg, str) and _SUBPROTOCOLS_MESSAGE in record.msg:
            if not self._logged.due("subprotocols"):
                return False
            _rewrite(
                record,
                "%s: none of the client's WebSocket subprotocols is known (values not logged)",
                (_peer(record),),
            )
        return True


def _rewrite(record: logging.LogRecord, message: str, args: tuple[str, ...]) -> None:
    record.msg, record.args = message, args
    record.exc_info = record.exc_text = record.stack_info = None
    # Garbage from a client is worth a warning at most, not an ERROR with a traceback.
    if record.levelno > logging.WARNING:
        record.levelno, record.levelname = logging.WARNING, logging.getLevelName(logging.WARNING)


def install() -> None:
    """Put the filter on aiohttp's server-side loggers (once per process)."""
    for name in LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactRequests) for f in logger.filters):
            logger.addFilter(_FILTER)


_FILTER: Final = RedactRequests()


def server_log(metrics: Metrics) -> CountingLog:
    """The logger for aiohttp's request handlers (its ``logger`` option)."""
    return CountingLog(logging.getLogger("aiohttp.server"), metrics)
