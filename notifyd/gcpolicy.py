"""Garbage collection for a process that holds thousands of long-lived sockets.

CPython's cycle collector re-scans every tracked object of the generations it
collects. An open socket keeps ~90 tracked objects alive (aiohttp's request,
protocol, reader and writer, notifyd's session, their tasks, futures and timers),
and replaces ~15 of them on every heartbeat. With 10k sockets open a full
collection scans ~900k objects and stops the event loop for ~1 s, and each
collection of the middle generation takes 30-70 ms: the latency tail of
ordinary traffic.

Almost everything that survives half a second in this process belongs to an
open socket, and scanning it again finds nothing. So every :data:`INTERVAL`
seconds the young generations are collected (cheap: they hold only what the last
interval allocated) and the survivors are frozen (``gc.freeze()``), out of the
collector's reach. Steady traffic then only ever pays for young objects. During
a connect storm (at least ``storm_step`` new sockets in an interval) even that
one scan of each new socket's objects is ~15 % of the storm's CPU, and finds
nothing to free (opening a socket leaves no cyclic garbage): new objects are then
frozen without it.

Freezing also hides cyclic garbage that frozen objects become later, mostly the
sockets that close. A full collection (unfreeze, collect, freeze) reclaims it
once enough sockets have closed since the last one, or after
``max_full_interval`` seconds at the latest: its cost is paid after churn, not
on an allocation count in the middle of traffic.

The decisions are pure (:class:`CollectorPolicy`); :func:`run` applies them.
"""

from __future__ import annotations

import asyncio
import enum
import gc
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from . import metrics

log = logging.getLogger(__name__)

#: Seconds between collections of the young generations.
INTERVAL = 0.5
#: Thresholds for automatic collections: high enough that between two intervals
#: only a burst of more than 100k new objects triggers one, so what a connect
#: storm allocates is scanned once, by the policy, before it is frozen.
THRESHOLDS = (100_000, 10, 10)


class Action(enum.Enum):
    #: Collect the young generations, then freeze what survived.
    YOUNG = "young"
    #: Freeze the young generations as they are (during a connect storm).
    FREEZE = "freeze"
    #: Unfreeze, collect everything, freeze again.
    FULL = "full"


@dataclass(slots=True)
class CollectorPolicy:
    """When to reclaim the garbage hidden among frozen objects.

    ``closed`` is a running total of sockets closed. A full collection is due
    once the sockets closed since the last one reach both ``min_closed`` and
    ``closed_fraction`` of those open (so the frozen garbage stays a bounded
    share of memory), or ``max_full_interval`` seconds after the last one if
    any socket closed at all. Otherwise the young generations are collected,
    unless ``storm_step`` or more sockets opened since the last decision.
    """

    min_closed: int = 1000
    closed_fraction: float = 0.25
    max_full_interval: float = 900.0
    storm_step: int = 200
    _closed_at_full: int = 0
    _last_full: float | None = None
    _opened_seen: int = 0

    def decide(self, open_now: int, closed: int, now: float) -> Action:
        if self._last_full is None:
            self._last_full = now
        opened = open_now + closed  # running total of sockets opened
        storm = opened - self._opened_seen >= self.storm_step
        self._opened_seen = opened
        closed_since = closed - self._closed_at_full
        churned = closed_since >= max(self.min_closed, self.closed_fraction * open_now)
        stale = closed_since > 0 and now - self._last_full >= self.max_full_interval
        if churned or stale:
            self._closed_at_full = closed
            self._last_full = now
            return Action.FULL
        return Action.FREEZE if storm else Action.YOUNG


def apply(action: Action) -> int:
    """Carry out one decision on this process's collector; returns objects freed."""
    started = time.perf_counter()
    collected = 0
    if action is Action.FULL:
        gc.unfreeze()
        collected = gc.collect()
    elif action is Action.YOUNG:
        collected = gc.collect(1)
    gc.freeze()
    seconds = time.perf_counter() - started
    metrics.GC_PAUSE.labels(action.value).observe(seconds)
    if action is Action.FULL:
        log.info("full collection: %d objects freed in %.0f ms", collected, seconds * 1000)
    return collected


def install() -> None:
    """Process start-up: freeze what start-up allocated, set the thresholds."""
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)


async def run(
    sockets: Callable[[], tuple[int, int]], policy: CollectorPolicy | None = None
) -> None:
    """Apply ``policy`` every :data:`INTERVAL` until cancelled.

    ``sockets()`` returns (open now, closed so far).
    """
    policy = policy or CollectorPolicy()
    try:
        while True:
            await asyncio.sleep(INTERVAL)
            apply(policy.decide(*sockets(), time.monotonic()))
    finally:
        # The sockets are going away: let the ordinary collector see everything again.
        gc.unfreeze()
