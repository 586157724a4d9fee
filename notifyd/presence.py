"""Cluster-wide presence and per-user socket counts: pure logic, no I/O.

Every replica reports, for each user whose sockets on it changed, the *state* on
that replica (``[sockets, newest socket's open time]``), numbered per replica
(``seq``). One replica at a time (the active consumer of
``notifyd.presence.deltas``) folds those reports into :class:`PresenceAggregator`,
which says when a user's first socket anywhere opened (``online: true``), when
their last one anywhere has been gone for the grace period (``online: false``),
and which sockets to close when a user holds more than the per-user limit over
all replicas together.

Reports are absolute, not increments, so a report applied twice changes nothing,
and a snapshot taken when an aggregator takes over is exact: reports numbered at
or below a replica's snapshot are already in it and are skipped.

:class:`ReplicaTable` (who is alive, from beacons) and the ``merge_*`` functions
(answers of a cluster query into one reply) are here too, for the same reason:
they are tested with tables, without a broker.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

#: One user on one replica: (open sockets, unix time the newest one opened).
UserState = tuple[int, float]


@dataclass(frozen=True, slots=True)
class Transition:
    """A user came online (first socket anywhere) or went offline (last one gone)."""

    user: str
    online: bool
    #: Unix time of the transition.
    ts: float

    def body(self) -> dict[str, Any]:
        """The message body on ``notifyd.presence`` (``ts`` in milliseconds)."""
        return {"user": self.user, "online": self.online, "ts": int(self.ts * 1000)}


@dataclass(frozen=True, slots=True)
class Trim:
    """Close the newest sockets of ``user`` on ``instance`` until it holds ``keep``."""

    user: str
    instance: str
    keep: int


@dataclass
class PresenceAggregator:
    """Cluster-wide presence from per-replica reports (see the module docstring).

    ``grace``: seconds a user with no socket anywhere stays online (a reloading
    tab, a client moving to another replica during a deploy); ``limit``: sockets
    one user may hold over all replicas together.
    """

    grace: float
    limit: int
    #: user -> instance -> state, only users with a socket somewhere.
    _users: dict[str, dict[str, UserState]] = field(default_factory=dict)
    #: instance -> its users (to drop them all when it goes away).
    _by_instance: dict[str, set[str]] = field(default_factory=dict)
    #: Highest report number applied per instance.
    _seq: dict[str, int] = field(default_factory=dict)
    #: Users announced online (a transition went out, or the snapshot said so).
    _announced: set[str] = field(default_factory=set)
    #: Users with no socket left, and when they go offline; due times only grow.
    _leaving: OrderedDict[str, float] = field(default_factory=OrderedDict)

    # --- what it knows ----------------------------------------------------------------

    @property
    def online(self) -> int:
        """Users with at least one socket somewhere."""
        return len(self._users)

    @property
    def announced(self) -> frozenset[str]:
        return frozenset(self._announced)

    def sockets(self, user: str) -> int:
        return sum(n for n, _ in self._users.get(user, {}).values())

    def instances(self) -> set[str]:
        return set(self._seq)

    # --- input ------------------------------------------------------------------------

    def reset(
        self,
        snapshot: Mapping[str, tuple[int, Mapping[str, UserState]]],
        now: float,
        announced: Iterable[str] | None = None,
    ) -> list[Transition]:
        """Start over from every replica's state (``instance -> (seq, users)``), taken
        when this aggregator became the active one.

        ``announced``: the users the previous aggregators said were online last (read
        back from what they published). Those with no socket in the snapshot (their
        replica went away with the previous aggregator, or their grace was running
        there) start their grace now; those with sockets whose coming online was never
        announced are announced now. Without it, whoever is online in the snapshot
        counts as announced and nothing is emitted.
        """
        self._users.clear()
        self._by_instance.clear()
        self._seq.clear()
        self._announced.clear()
        self._leaving.clear()
        for instance, (seq, users) in snapshot.items():
            self._seq[instance] = seq
            for user, (sockets, newest) in users.items():
                if sockets > 0:
                    self._users.setdefault(user, {})[instance] = (sockets, newest)
                    self._by_instance.setdefault(instance, set()).add(user)
        if announced is None:
            self._announced.update(self._users)
            return []
        self._announced.update(announced)
        transitions = [
            Transition(u, True, now) for u in sorted(self._users.keys() - self._announced)
        ]
        self._announced.update(self._users)
        for user in sorted(self._announced - self._users.keys()):
            if self.grace > 0:
                self._leaving[user] = now + self.grace
            else:
                self._announced.discard(user)
                transitions.append(Transition(user, False, now))
        return transitions

    def apply(
        self, instance: str, seq: int, users: Mapping[str, UserState], now: float
    ) -> tuple[list[Transition], list[Trim]]:
        """One replica's report; returns what it changed cluster-wide."""
        if seq <= self._seq.get(instance, 0):
            return [], []  # already applied, or already in the snapshot
        self._seq[instance] = seq
        transitions: list[Transition] = []
        trims: list[Trim] = []
        for user, (sockets, newest) in users.items():
            self._set(instance, user, sockets, newest, now, transitions)
            if sockets > 0:
                trims.extend(self._trims(user))
        return transitions, trims

    def drop_instance(self, instance: str, now: float) -> list[Transition]:
        """A replica is gone (said goodbye, or its beacons stopped): its sockets are.

        Its users stay online for ``grace`` (their clients reconnect elsewhere);
        with no grace, they go offline at once.
        """
        transitions: list[Transition] = []
        for user in sorted(self._by_instance.pop(instance, ())):
            self._set(instance, user, 0, 0.0, now, transitions, forget=False)
        self._seq.pop(instance, None)
        return transitions

    def due(self, now: float, limit: int | None = None) -> list[Transition]:
        """Users whose grace ran out with no socket anywhere: offline now (at most
        ``limit`` of them; the others on the next call)."""
        transitions: list[Transition] = []
        leaving = self._leaving
        while leaving and (limit is None or len(transitions) < limit):
            user, at = next(iter(leaving.items()))
            if at > now:
                break
            leaving.popitem(last=False)
            if user not in self._users and user in self._announced:
                self._announced.discard(user)
                transitions.append(Transition(user, False, now))
        return transitions

    def next_due(self) -> float | None:
        return next(iter(self._leaving.values()), None)

    # --- internals --------------------------------------------------------------------

    def _set(
        self,
        instance: str,
        user: str,
        sockets: int,
        newest: float,
        now: float,
        transitions: list[Transition],
        forget: bool = True,
    ) -> None:
        places = self._users.get(user)
        if sockets > 0:
            if places is None:
                places = self._users[user] = {}
            places[instance] = (sockets, newest)
            self._by_instance.setdefault(instance, set()).add(user)
            self._leaving.pop(user, None)
            if user not in self._announced:
                self._announced.add(user)
                transitions.append(Transition(user, True, now))
            return
        if forget:
            users = self._by_instance.get(instance)
            if users is not None:
                users.discard(user)
        if places is None or places.pop(instance, None) is None or places:
            return
        del self._users[user]
        if user in self._announced:
            if self.grace <= 0:
                self._announced.discard(user)
                transitions.append(Transition(user, False, now))
            else:
                self._leaving.pop(user, None)
                self._leaving[user] = now + self.grace

    def _trims(self, user: str) -> list[Trim]:
        places = self._users.get(user, {})
        excess = sum(n for n, _ in places.values()) - self.limit
        if excess <= 0:
            return []
        trims = []
        # The newest sockets go: the replicas that hold the newest ones first.
        for instance, (sockets, _) in sorted(places.items(), key=lambda p: -p[1][1]):
            close = min(excess, sockets)
            trims.append(Trim(user, instance, sockets - close))
            excess -= close
            if excess <= 0:
                break
        return trims


@dataclass(slots=True)
class Replica:
    """What the last beacon of one replica process said."""

    replica: str
    connections: int
    users: int
    seen: float


@dataclass
class ReplicaTable:
    """Live replica processes (``instance`` ids), from their beacons.

    A replica that sent no beacon for ``expiry`` seconds is presumed gone, so a
    cluster query does not wait for it.
    """

    expiry: float
    replicas: dict[str, Replica] = field(default_factory=dict)

    def seen(self, instance: str, replica: str, connections: int, users: int, now: float) -> bool:
        """Record a beacon; True if the instance is new."""
        new = instance not in self.replicas
        self.replicas[instance] = Replica(replica, connections, users, now)
        return new

    def gone(self, instance: str) -> None:
        self.replicas.pop(instance, None)

    def expire(self, now: float) -> list[str]:
        """Forget the instances not heard from within ``expiry``; returns them."""
        stale = [i for i, r in self.replicas.items() if now - r.seen > self.expiry]
        for instance in stale:
            del self.replicas[instance]
        return stale

    def live(self, now: float) -> dict[str, str]:
        """``instance -> replica id`` of the replicas heard from within ``expiry``."""
        return {i: r.replica for i, r in self.replicas.items() if now - r.seen <= self.expiry}


# --- merging the answers of a cluster query ----------------------------------------------


def merge_presence(
    users: Iterable[str], answers: Iterable[Mapping[str, Any]]
) -> dict[str, dict[str, Any]]:
    """``{user: {"online": true, "sockets": n}}`` or ``{"online": false}``, summed
    over the replicas' answers (each ``{"users": {user: sockets}}``)."""
    totals = dict.fromkeys(users, 0)
    for answer in answers:
        counts = answer.get("users")
        if not isinstance(counts, dict):
            continue
        for user, sockets in counts.items():
            if user in totals and isinstance(sockets, int) and sockets > 0:
                totals[user] += sockets
    return {
        user: {"online": True, "sockets": n} if n else {"online": False}
        for user, n in totals.items()
    }


def merge_stats(answers: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Per-replica and total counts from stats answers (``replica id -> answer``).

    ``users`` in the total counts each user once however many replicas hold them:
    the presence aggregator's count, when it answered (``cluster_users``); the sum
    over replicas otherwise (then ``users_exact`` is false).
    """
    replicas: dict[str, dict[str, int]] = {}
    connections = users = 0
    cluster_users: int | None = None
    for replica, answer in sorted(answers.items()):
        entry = {
            "connections": int(answer.get("connections", 0)),
            "users": int(answer.get("users", 0)),
        }
        replicas[replica] = entry
        connections += entry["connections"]
        users += entry["users"]
        aggregate = answer.get("cluster_users")
        if isinstance(aggregate, int):
            cluster_users = aggregate
    total: dict[str, Any] = {
        "replicas": len(replicas),
        "connections": connections,
        "users": cluster_users if cluster_users is not None else users,
        "users_exact": cluster_users is not None,
    }
    return {"replicas": replicas, "total": total}
