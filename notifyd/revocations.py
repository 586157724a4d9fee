"""Revocations that every replica knows, also one started after them: kept by RabbitMQ.

A revocation is a control message (``{"action":"revoke","jti":[...],"until":T}``,
routing key ``control`` on ``notifyd``). Each replica's queue gets it live; the
stream ``notifyd.revocations`` is bound to the same key, so RabbitMQ also keeps
every control message for ``[auth] revocation_max_age`` seconds, whether or not
any replica runs. On each (re)connect, before it consumes or reports ready, a
replica reads that stream from its start up to a marker it appends itself, and
refuses every token id whose ``until`` has not passed: a new replica, a restarted
one and one that was cut off from the broker for a while all know what the others
know. Until the first read, tokens with a ``jti`` wait for it
(:meth:`TokenVerifier.expect_shared_revocations`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any, Final

import aiormq

from .auth import TokenVerifier
from .broker import EXCHANGE, declare_queue
from .errors import InvalidMessage
from .protocol import CONTROL_ROUTING_KEY, Revoke, decode_control, published_time

log = logging.getLogger(__name__)

REVOCATION_STREAM: Final = "notifyd.revocations"
MARKER_HEADER: Final = "notifyd-marker"
#: Seconds one read of the stream may take before the connection attempt is retried.
READ_TIMEOUT: Final = 30.0
#: Deliveries a read may hold unacknowledged (streams grant credit on acks).
_PREFETCH: Final = 1000


def stream_arguments(max_age: float) -> dict[str, Any]:
    return {
        "x-queue-type": "stream",
        "x-max-age": f"{max(1, int(max_age))}s",
        # Retention drops whole segments: small ones, so that a stream this quiet
        # is trimmed to its age bound at all (the default segment is 500 MB).
        "x-stream-max-segment-size-bytes": 1_000_000,
    }


class RevocationLog:
    """Reads ``notifyd.revocations`` into a :class:`TokenVerifier` on each connect."""

    def __init__(
        self,
        verifier: TokenVerifier,
        max_age: float,
        on_revoked: Callable[[set[str]], object],
    ) -> None:
        self.verifier = verifier
        self.max_age = max_age
        #: Called with the token ids in force after a read (to close their sockets).
        self.on_revoked = on_revoked
        self._mismatch_warned = False
        verifier.expect_shared_revocations()

    async def on_connected(self, connection: Any) -> None:
        """Declare and bind the stream (idempotent), then read it (a Broker hook)."""
        refused = await declare_queue(connection, REVOCATION_STREAM, stream_arguments(self.max_age))
        if refused is not None and not self._mismatch_warned:
            self._mismatch_warned = True
            log.warning(
                "stream %s exists with other arguments (%s): it is used as it is; to apply "
                "[auth] revocation_max_age, set a policy or delete the stream (revocations "
                "in it are then forgotten)",
                REVOCATION_STREAM,
                refused,
            )
        channel = await connection.channel()
        try:
            raw = await channel.get_underlay_channel()
            await raw.queue_bind(REVOCATION_STREAM, EXCHANGE, routing_key=CONTROL_ROUTING_KEY)
            started = time.monotonic()
            revoked, read = await asyncio.wait_for(self._read(raw), READ_TIMEOUT)
        finally:
            with contextlib.suppress(Exception):
                await channel.close()
        self.verifier.revocations_read()
        log.info(
            "revocations: %d token ids in force, from %d control messages read in %.2fs",
            len(revoked),
            read,
            time.monotonic() - started,
        )
        if revoked:
            self.on_revoked(revoked)

    async def _read(self, raw: Any) -> tuple[set[str], int]:
        """Apply every revocation in the stream; returns the ids in force and the count read."""
        marker = secrets.token_hex(8)
        done = asyncio.get_running_loop().create_future()
        revoked: set[str] = set()
        read = 0

        async def on_message(message: Any) -> None:
            nonlocal read
            properties = message.header.properties
            headers = properties.headers or {}
            tag = message.delivery.delivery_tag
            if MARKER_HEADER in headers:
                if headers[MARKER_HEADER] == marker and not done.done():
                    done.set_result(None)
            else:
                read += 1
                self._apply(message.body, properties, headers, revoked)
            # Never once the marker is in: the channel is being closed, and an ack
            # racing that close makes RabbitMQ close the whole connection (504).
            if tag % (_PREFETCH // 2) == 0 and not done.done():
                with contextlib.suppress(aiormq.AMQPError, ConnectionError):
                    await raw.basic_ack(tag, multiple=True)

        await raw.basic_qos(prefetch_count=_PREFETCH)
        await raw.basic_consume(
            REVOCATION_STREAM, on_message, arguments={"x-stream-offset": "first"}
        )
        # Appended after everything in the stream now: read up to it, the read is whole.
        await raw.basic_publish(
            b"{}",
            exchange="",
            routing_key=REVOCATION_STREAM,
            properties=aiormq.spec.Basic.Properties(headers={MARKER_HEADER: marker}),
        )
        await done
        now = time.time()
        return {t for t in revoked if self.verifier.is_revoked(t, now)}, read

    def _apply(
        self, body: bytes, properties: Any, headers: dict[str, Any], revoked: set[str]
    ) -> None:
        timestamp = properties.timestamp
        sent_at = published_time(timestamp.timestamp() if timestamp else None, headers)
        try:
            # Without its own ``until``, a revocation lasts from when it was published.
            command = decode_control(body, sent_at or time.time())
        except InvalidMessage:
            return  # dead-lettered when it was consumed live
        # Disconnects are not kept: they concern the sockets open at the time.
        if isinstance(command, Revoke) and self.verifier.revoke(command.token_ids, command.until):
            revoked.update(command.token_ids)
