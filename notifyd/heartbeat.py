"""Pings for every open socket from one task, spread evenly over the interval.

aiohttp's own heartbeat gives each socket a timer, a task per ping and a timer per
pong. Its timers are rounded to whole seconds, so the sockets opened during one
second of a connect storm all ping in the same event-loop pass: with 10k sockets
that is a 50-100 ms stall every second for a whole heartbeat interval (the p99 of
ordinary traffic at 5k notifications/s went from 2 ms to 60 ms).

:class:`Heartbeat` instead visits each socket once per ``interval``, a small slice
every :data:`TICK` seconds. A visit writes a ping (corked with whatever else is
queued for the socket), unless the ping of the previous visit is still
unanswered: that peer is gone, and its connection is cut. Anything a client sends,
a pong or a message, counts as an answer.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Collection
from typing import Protocol

log = logging.getLogger(__name__)

#: Seconds between two slices of sockets.
TICK = 0.1


class Pingable(Protocol):
    """One socket, as the heartbeat sees it (implemented by :class:`notifyd.connection.Session`)."""

    def heartbeat(self) -> None:
        """Ping, or cut off a peer that did not answer the previous ping."""


class Heartbeat:
    """Visits every socket of ``sockets()`` once per ``interval`` seconds."""

    def __init__(self, interval: float, sockets: Callable[[], Collection[Pingable]]) -> None:
        self.interval = interval
        self.sockets = sockets

    def slices(self, count: int) -> int:
        """How many sockets one tick visits so that ``count`` take one interval."""
        ticks = max(1, round(self.interval / TICK))
        return math.ceil(count / ticks)

    async def run(self) -> None:
        """Until cancelled. A socket that joined during a round waits for the next."""
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            batch = list(self.sockets())
            size = max(1, self.slices(len(batch)))
            while batch:
                # Taken off the round as they are visited: a socket that closes
                # meanwhile is not kept alive until the round ends.
                visiting = batch[-size:]
                del batch[-size:]
                for socket in visiting:
                    try:
                        socket.heartbeat()
                    except Exception:
                        # One socket's failure must not stop the pings of all the others.
                        log.exception("heartbeat failed for %r", socket)
                del visiting, socket
                await asyncio.sleep(TICK)
            await asyncio.sleep(max(TICK, started + self.interval - loop.time()))
