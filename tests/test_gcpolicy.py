"""The collector policy: its decisions (pure) and their effect on the real collector."""

from __future__ import annotations

import gc
import weakref

from notifyd.gcpolicy import Action, CollectorPolicy, TrackedObjects, apply
from notifyd.metrics import Metrics


def settled(admissions: int, **options: float) -> CollectorPolicy:
    """A policy that has already seen ``admissions`` turns asked for (the storm is over)."""
    policy = CollectorPolicy(**options)  # type: ignore[arg-type]
    policy.decide(admissions=admissions, now=0.0)
    return policy


def test_a_connect_storm_is_frozen_without_a_scan_then_young_ones_are_collected() -> None:
    policy = CollectorPolicy(storm_step=200)
    assert policy.decide(admissions=1_000, now=0.0) is Action.FREEZE
    assert policy.decide(admissions=1_199, now=0.5) is Action.YOUNG  # 199 new
    assert policy.decide(admissions=1_399, now=1.0) is Action.FREEZE  # 200 new
    assert policy.decide(admissions=1_399, now=1.5) is Action.YOUNG


def test_a_large_young_generation_is_frozen_without_a_scan() -> None:
    policy = settled(1_000, young_limit=20_000)
    assert policy.decide(admissions=1_000, now=0.5, young=19_999) is Action.YOUNG
    assert policy.decide(admissions=1_000, now=1.0, young=20_000) is Action.FREEZE
    assert policy.decide(admissions=1_000, now=1.5, young=100) is Action.YOUNG


def test_churn_alone_never_triggers_a_full_collection() -> None:
    # Closed sockets are freed by reference counting: no full collection is needed.
    policy = settled(10_000)
    assert all(
        policy.decide(admissions=10_000 + new, now=new / 1000) is not Action.FULL
        for new in range(0, 100_000, 500)
    )


def test_a_full_collection_runs_only_as_a_safety_net_every_max_full_interval() -> None:
    policy = settled(50, max_full_interval=60.0)
    assert policy.decide(admissions=50, now=59.0) is Action.YOUNG
    assert policy.decide(admissions=50, now=60.0) is Action.FULL
    assert policy.decide(admissions=50, now=61.0) is Action.YOUNG
    assert policy.decide(admissions=50, now=120.0) is Action.FULL


def test_the_young_count_misses_objects_once_frozen_ones_are_freed() -> None:
    # Why a storm is told by sockets asking to be admitted: in a reconnect wave the sockets
    # that close (frozen long ago) are freed while the new ones' objects pile up,
    # and each free lowers the interpreter's count of young objects.
    enabled = gc.isenabled()
    gc.disable()  # no automatic collection moves the young objects on meanwhile
    old: list[list[int]] = [[] for _ in range(30_000)]
    gc.freeze()
    try:
        young: list[list[int]] = [[] for _ in range(10_000)]
        del old
        assert len(gc.get_objects(0)) >= len(young)
        assert gc.get_count()[0] < 1_000
    finally:
        gc.unfreeze()
        if enabled:
            gc.enable()


class _Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the cycle collector frees it


def test_young_garbage_is_freed_and_frozen_garbage_waits_for_the_full_collection() -> None:
    metrics = Metrics()
    try:
        young = _Node()
        young_alive = weakref.ref(young)
        del young
        apply(Action.YOUNG, metrics)
        assert young_alive() is None  # garbage among the young is freed, not frozen

        node = _Node()
        alive = weakref.ref(node)
        apply(Action.FREEZE, metrics)
        del node
        gc.collect()  # an ordinary collection does not see frozen objects
        assert alive() is not None
        apply(Action.YOUNG, metrics)
        assert alive() is not None
        apply(Action.FULL, metrics)
        assert alive() is None
        assert gc.get_freeze_count() > 0  # what is alive is frozen again
    finally:
        gc.unfreeze()
    pauses = metrics.registry.get_sample_value
    assert pauses("notifyd_gc_pause_seconds_count", {"action": "young"}) == 2
    assert pauses("notifyd_gc_pause_seconds_count", {"action": "freeze"}) == 1
    assert pauses("notifyd_gc_pause_seconds_count", {"action": "full"}) == 1


def test_tracked_objects_are_counted_again_only_once_the_count_is_old() -> None:
    metrics = Metrics()
    tracked = TrackedObjects(max_age=3600)
    metrics.gc_tracked.set_function(tracked)
    first = metrics.registry.get_sample_value("notifyd_gc_tracked_objects")
    assert first is not None and first > 0
    garbage: list[list[int]] = [[] for _ in range(10_000)]  # 10k more tracked objects
    assert metrics.registry.get_sample_value("notifyd_gc_tracked_objects") == first
    tracked.max_age = 0
    again = metrics.registry.get_sample_value("notifyd_gc_tracked_objects")
    assert again is not None and again > first + 5_000  # (some of the others are gone)
    del garbage
