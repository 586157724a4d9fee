"""The collector policy: its decisions (pure) and their effect on the real collector."""

from __future__ import annotations

import gc
import weakref

from notifyd.gcpolicy import Action, CollectorPolicy, apply


def settled(open_now: int, **options: float) -> CollectorPolicy:
    """A policy that has already seen ``open_now`` sockets open (the storm is over)."""
    policy = CollectorPolicy(**options)  # type: ignore[arg-type]
    policy.decide(open_now=open_now, closed=0, now=0.0)
    return policy


def test_a_connect_storm_is_frozen_without_a_scan_then_young_ones_are_collected() -> None:
    policy = CollectorPolicy(storm_step=200)
    assert policy.decide(open_now=1_000, closed=0, now=0.0) is Action.FREEZE
    assert policy.decide(open_now=1_199, closed=0, now=0.5) is Action.YOUNG  # 199 new
    assert policy.decide(open_now=1_399, closed=0, now=1.0) is Action.FREEZE  # 200 new
    assert policy.decide(open_now=1_399, closed=0, now=1.5) is Action.YOUNG
    # Sockets that replace closed ones count as opened.
    assert policy.decide(open_now=1_399, closed=300, now=2.0) is Action.FREEZE


def test_a_full_collection_follows_enough_closed_sockets() -> None:
    policy = settled(10_000, min_closed=100, closed_fraction=0.25)
    # 2,000 closed of 8,000 still open is under a quarter: not yet.
    assert policy.decide(open_now=10_000, closed=2_000, now=1.0) is not Action.FULL
    assert policy.decide(open_now=10_000, closed=2_500, now=2.0) is Action.FULL
    # Counted from the last full collection on.
    assert policy.decide(open_now=10_000, closed=4_000, now=3.0) is not Action.FULL
    assert policy.decide(open_now=10_000, closed=5_000, now=4.0) is Action.FULL


def test_few_open_sockets_still_wait_for_min_closed() -> None:
    policy = settled(10, min_closed=100, closed_fraction=0.25)
    assert policy.decide(open_now=10, closed=99, now=1.0) is not Action.FULL
    assert policy.decide(open_now=10, closed=100, now=2.0) is Action.FULL


def test_a_trickle_of_closes_is_collected_after_max_full_interval() -> None:
    policy = settled(50, min_closed=100, max_full_interval=60.0)
    assert policy.decide(open_now=50, closed=0, now=100.0) is Action.YOUNG  # nothing closed
    assert policy.decide(open_now=50, closed=1, now=101.0) is Action.FULL
    assert policy.decide(open_now=50, closed=2, now=102.0) is Action.YOUNG


class _Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the cycle collector frees it


def test_young_garbage_is_freed_and_frozen_garbage_waits_for_the_full_collection() -> None:
    try:
        young = _Node()
        young_alive = weakref.ref(young)
        del young
        apply(Action.YOUNG)
        assert young_alive() is None  # garbage among the young is freed, not frozen

        node = _Node()
        alive = weakref.ref(node)
        apply(Action.FREEZE)
        del node
        gc.collect()  # an ordinary collection does not see frozen objects
        assert alive() is not None
        apply(Action.YOUNG)
        assert alive() is not None
        apply(Action.FULL)
        assert alive() is None
        assert gc.get_freeze_count() > 0  # what is alive is frozen again
    finally:
        gc.unfreeze()
