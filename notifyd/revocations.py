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
import logging
import time
from collections.abc import Callable
from typing import Any, Final

from aio_pika.abc import AbstractConnection
from aiormq.abc import AbstractChannel as RawChannel

from .amqp import CONTROL_ROUTING_KEY, EXCHANGE, REVOCATION_STREAM, Delivery, Revoke, decode_control
from .auth import TokenVerifier
from .broker import declare_queue, read_to_marker, scratch_channel
from .errors import InvalidMessage

log = logging.getLogger(__name__)

#: Seconds one read of the stream may take before the connection attempt is retried.
READ_TIMEOUT: Final = 30.0
#: Deliveries a read may hold unacknowledged (streams grant credit on acks).
_PREFETCH: Final = 1000


def stream_arguments(max_age: float) -> dict[str, Any]:
    """The stream's queue arguments: a stream that keeps ``max_age`` seconds."""
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

    async def on_connected(self, connection: AbstractConnection) -> None:
        """Declare and bind the stream (idempotent), then read it (a Broker hook).

        Raises TimeoutError past :data:`READ_TIMEOUT`, ConnectionError and aio-pika's
        errors when it cannot be read (the broker then connects again).
        """
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
        async with scratch_channel(connection) as channel:
            raw = await channel.get_underlay_channel()
            await raw.queue_bind(REVOCATION_STREAM, EXCHANGE, routing_key=CONTROL_ROUTING_KEY)
            started = time.monotonic()
            revoked, read = await asyncio.wait_for(self._read(raw), READ_TIMEOUT)
        self.verifier.revocations_read()
        log.info(
            "revocations: %d token ids in force, from %d control messages read in %.2fs",
            len(revoked),
            read,
            time.monotonic() - started,
        )
        if revoked:
            self.on_revoked(revoked)

    async def _read(self, raw: RawChannel) -> tuple[set[str], int]:
        """Apply every revocation in the stream; returns the ids in force and the count read."""
        revoked: set[str] = set()
        read = 0

        def handle(delivery: Delivery) -> None:
            nonlocal read
            read += 1
            self._apply(delivery, revoked)

        await read_to_marker(raw, REVOCATION_STREAM, "first", handle, _PREFETCH)
        now = time.time()
        return {t for t in revoked if self.verifier.is_revoked(t, now)}, read

    def _apply(self, delivery: Delivery, revoked: set[str]) -> None:
        try:
            # Without its own ``until``, a revocation lasts from when it was published.
            command = decode_control(delivery.body, delivery.published_at or time.time())
        except InvalidMessage:
            return  # dead-lettered when it was consumed live
        # Disconnects are not kept: they concern the sockets open at the time.
        if isinstance(command, Revoke) and self.verifier.revoke(command.token_ids, command.until):
            revoked.update(command.token_ids)
