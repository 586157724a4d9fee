"""Garbage collection for a process that holds thousands of long-lived sockets.

CPython's cycle collector re-scans every tracked object of the generations it
collects. Open sockets are most of this process's objects, they live for
minutes to days, and scanning them again finds nothing: with aiohttp's own
WebSocket (~90 tracked objects per socket) a full collection at 10k sockets
stopped the event loop for ~1 s, a middle-generation one for 30-70 ms.

So every :data:`INTERVAL` seconds the young generations are collected (cheap:
they hold only what the last interval allocated) and the survivors are frozen
(``gc.freeze()``), out of the collector's reach. Steady traffic then only ever
pays for young objects. During a connect storm (``storm_step`` or more new
sockets asking to be admitted in an interval) even that one scan of each new
socket's objects finds nothing to free (opening a socket leaves no cyclic
garbage): new objects are then frozen without it.

Freezing hides cyclic garbage that frozen objects become later. A closed socket
leaves none (:mod:`notifyd.connection` breaks every reference cycle when a
connection is lost, and the tests check it for every way a socket can end), so
churn needs no full collection: reference counting frees closed sockets even
while they are frozen. A full collection (unfreeze, collect, freeze) runs only
as a safety net, every ``max_full_interval`` seconds, for garbage from anything
else; its pause is measured (``notifyd_gc_pause_seconds{action="full"}``).

The decisions are pure (:class:`CollectorPolicy`); :func:`run` applies them.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import gc
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .metrics import GC_TRACKED_MAX_AGE

if TYPE_CHECKING:
    from .metrics import Metrics

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
    """When to collect young objects, freeze them unscanned, or collect everything.

    ``admissions`` is a running total of turns asked for at the server's
    admission gate (``SocketServer.admit``: a new socket's upgrade or SSE stream,
    and its welcome). A full collection is due ``max_full_interval`` seconds
    after the last one. Otherwise the young generations are collected, unless
    ``storm_step`` or more turns were asked for since the last decision, or
    ``young`` (the objects a young collection would scan, as far as the
    interpreter's count knows) is ``young_limit`` or more. Asked for, not
    sockets opened: in a reconnect wave hundreds of upgrades wait for their turn
    and for their binding before any socket counts as opened, and scanning them
    (1-2 µs per object on a slow machine, with the event loop stopped: 20k
    objects were a 20-40 ms stall, 6k one of 6-15 ms) freed nothing in the churn
    benchmark. Nor can ``young`` see them then: the interpreter's count drops
    with every frozen object freed, and a wave frees thousands (the sockets it
    closes, each upgrade's request once its socket is taken over). Plain HTTP
    requests (``/api/*``, ``/metrics``) never ask: their garbage is collected
    young, however many come.
    """

    max_full_interval: float = 3600.0
    storm_step: int = 50
    young_limit: int = 2_000
    _last_full: float | None = None
    _admissions_seen: int = 0

    def decide(self, admissions: int, now: float, young: int = 0) -> Action:
        if self._last_full is None:
            self._last_full = now
        storm = admissions - self._admissions_seen >= self.storm_step or young >= self.young_limit
        self._admissions_seen = admissions
        if now - self._last_full >= self.max_full_interval:
            self._last_full = now
            return Action.FULL
        return Action.FREEZE if storm else Action.YOUNG


def apply(action: Action, metrics: Metrics) -> int:
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
    metrics.gc_pause.labels(action.value).observe(seconds)
    if action is Action.FULL:
        log.info("full collection: %d objects freed in %.0f ms", collected, seconds * 1000)
    return collected


def tracked_objects() -> int:
    """Objects the collector tracks: the frozen ones plus those of every generation.

    Cheap while the policy runs (the generations then hold only what the last
    :data:`INTERVAL` allocated); a full walk of the heap otherwise.
    """
    return gc.get_freeze_count() + len(gc.get_objects())


class TrackedObjects:
    """:func:`tracked_objects`, counted again only once it is ``max_age`` seconds old.

    ``gc.get_freeze_count()`` walks every frozen object (~110 ms with the event loop
    stopped at 15k sockets): the gauge ``notifyd_gc_tracked_objects`` calls this at
    each scrape, and so pays for it at most once per :data:`GC_TRACKED_MAX_AGE`.
    """

    __slots__ = ("_at", "_value", "max_age")

    def __init__(self, max_age: float = GC_TRACKED_MAX_AGE) -> None:
        self.max_age = max_age
        self._value = 0
        self._at = -float("inf")

    def __call__(self) -> int:
        now = time.monotonic()
        if now - self._at >= self.max_age:
            self._value = tracked_objects()
            self._at = now
        return self._value


def install() -> None:
    """Process start-up: freeze what start-up allocated, set the thresholds."""
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)


@contextlib.contextmanager
def installed() -> Iterator[None]:
    """:func:`install` for the block; then the thresholds it found are set again and
    nothing stays frozen."""
    thresholds = gc.get_threshold()
    install()
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()


async def run(
    admissions: Callable[[], int],
    metrics: Metrics,
    policy: CollectorPolicy | None = None,
) -> None:
    """Apply ``policy`` every :data:`INTERVAL` until cancelled.

    ``admissions()`` returns how many turns the server's admission gate was asked for
    so far.
    """
    policy = policy or CollectorPolicy()
    try:
        while True:
            await asyncio.sleep(INTERVAL)
            # The interpreter's count: low while frozen objects are freed (see
            # CollectorPolicy), which is why admissions tell a storm.
            young = gc.get_count()[0]
            apply(policy.decide(admissions(), time.monotonic(), young), metrics)
    finally:
        # The sockets are going away: let the ordinary collector see everything again.
        gc.unfreeze()
