"""Owning tasks: what a component starts, it cancels and awaits when it stops."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Collection, Coroutine, Iterable
from typing import Any, Generic, TypeVar

T = TypeVar("T")

log = logging.getLogger(__name__)


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel ``task`` and wait until it has ended.

    The task's own cancellation is not raised here (a cancel of the caller is);
    an exception it ended with is logged, so that none goes unreported.
    """
    if task is None:
        return
    task.cancel()
    await asyncio.wait((task,))
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("task %s failed", task.get_name(), exc_info=exc)


async def cancel_all(tasks: Collection[asyncio.Task[Any]], what: str, timeout: float = 5.0) -> None:
    """Cancel ``tasks`` and wait (up to ``timeout``) for them to end; a log line names
    how many did not (a task that swallows its cancel)."""
    for task in tasks:
        task.cancel()
    if tasks:
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        if pending:
            log.warning("%d %s still running %.0fs after their cancel", len(pending), what, timeout)


class Drain:
    """Closing every connection of one transport, spread evenly over a window, so the
    load balancer and the other replicas take the reconnects as a stream rather than
    a wave; :meth:`hurry` (a second SIGTERM) closes the rest at once."""

    def __init__(self) -> None:
        self._hurry: asyncio.Future[None] | None = None

    def _hurried(self) -> asyncio.Future[None]:
        if self._hurry is None:
            self._hurry = asyncio.get_running_loop().create_future()
        return self._hurry

    def hurry(self) -> None:
        """Have a drain (under way or to come) close what remains at once."""
        hurry = self._hurried()
        if not hurry.done():
            hurry.set_result(None)

    async def run(
        self, live: Collection[T], close: Callable[[T], None], window: float, what: str
    ) -> None:
        """Call ``close`` on each of ``live`` (a set its members leave when gone) over
        ``window`` seconds, then give them up to 3 s to go."""
        members = list(live)
        if not members:
            return
        loop = asyncio.get_running_loop()
        hurry = self._hurried()
        start = loop.time()
        step = window / len(members)
        log.info("draining %d %s over %.1fs", len(members), what, window)
        for index, member in enumerate(members):
            delay = start + index * step - loop.time()
            if delay > 0 and not hurry.done():
                await asyncio.wait((hurry,), timeout=delay)
            close(member)
        deadline = loop.time() + 3.0
        while live and loop.time() < deadline:
            await asyncio.sleep(0.05)


class PerPass(Generic[T]):
    """Items handed to ``handle`` at most ``batch`` per pass of the event loop, in
    the order they came.

    What a reconnect wave brings by the thousand (ended sockets to close, sockets
    whose binding came into effect), done where it arrives, would all run in one
    pass and stop every other socket for as long; a batch per pass lets their
    traffic through in between.
    """

    __slots__ = ("_batch", "_handle", "_queue")

    def __init__(self, batch: int, handle: Callable[[T], None]) -> None:
        self._batch = batch
        self._handle = handle
        self._queue: deque[T] = deque()

    def __len__(self) -> int:
        return len(self._queue)

    def add(self, item: T) -> None:
        self.extend((item,))

    def extend(self, items: Iterable[T]) -> None:
        queue = self._queue
        idle = not queue
        queue.extend(items)
        if idle and queue:
            asyncio.get_running_loop().call_soon(self._next_batch)

    def _next_batch(self) -> None:
        queue, handle = self._queue, self._handle
        for _ in range(min(self._batch, len(queue))):
            handle(queue.popleft())
        if queue:
            asyncio.get_running_loop().call_soon(self._next_batch)


class _Waiter:
    """A :meth:`Turns.wait` in the queue: its turn wakes the waiting coroutine."""

    __slots__ = ("future",)

    def __init__(self, future: asyncio.Future[None]) -> None:
        self.future = future

    def __call__(self) -> bool:
        if self.future.done():  # cancelled while it waited: the turn goes to the next
            return False
        self.future.set_result(None)
        return True


class Turns:
    """At most ``per_pass`` turns per pass of the event loop, given in the order
    they were asked for.

    Unlike :class:`PerPass`, a turn is taken at once while the pass has one left and
    nobody is waiting: in steady traffic nothing is deferred. Past that, each asker
    waits (:meth:`later`, :meth:`wait`) and a batch is let through in each of the
    following passes.
    """

    __slots__ = ("_per_pass", "_scheduled", "_used", "_waiting")

    def __init__(self, per_pass: int) -> None:
        self._per_pass = per_pass
        self._used = 0
        self._waiting: deque[Callable[[], bool]] = deque()
        self._scheduled = False

    def __len__(self) -> int:
        """Askers waiting for a turn."""
        return len(self._waiting)

    def now(self) -> bool:
        """Take a turn in this pass, if one is left and nobody waits for one."""
        if self._used >= self._per_pass or self._waiting:
            return False
        self._used += 1
        self._next_pass_soon()
        return True

    def later(self, go: Callable[[], bool]) -> None:
        """Call ``go`` at its turn; it returns False if it no longer needed one (the
        turn then goes to the next in line)."""
        self._waiting.append(go)
        self._next_pass_soon()

    async def wait(self) -> None:
        """Return at this coroutine's turn (at once, if :meth:`now` gives one)."""
        if self.now():
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.later(_Waiter(future))
        await future

    def close(self) -> None:
        """Give no more turns: the coroutines in :meth:`wait` are cancelled, the
        other askers dropped."""
        waiting, self._waiting = self._waiting, deque()
        for go in waiting:
            if isinstance(go, _Waiter):
                go.future.cancel()

    def _next_pass_soon(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._next_pass)

    def _next_pass(self) -> None:
        self._scheduled = False
        self._used = 0
        waiting = self._waiting
        try:
            while waiting and self._used < self._per_pass:
                if waiting.popleft()():
                    self._used += 1
        finally:
            # An asker that raised (the loop logs it) does not leave the rest waiting
            # for a pass nobody schedules; and the turns used here count until the
            # next call_soon round, where the count starts again.
            if self._used or waiting:
                self._next_pass_soon()


class OwnedTasks:
    """The tasks a component starts on its sessions' behalf: :meth:`close` cancels and
    awaits them, and from then on nothing more is started."""

    __slots__ = ("_tasks", "_what", "closed")

    def __init__(self, what: str) -> None:
        self._what = what
        self._tasks: set[asyncio.Task[None]] = set()
        self.closed = False

    def spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        """Run ``coroutine`` as an owned task (after :meth:`close`: not at all)."""
        if self.closed:
            coroutine.close()
            return
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def stop_spawning(self) -> None:
        """Start nothing more from now on: before aborting the connections whose
        callbacks would spawn (their close handling), so that :meth:`close` finds
        every task there will be."""
        self.closed = True

    async def close(self) -> None:
        self.stop_spawning()
        await cancel_all(list(self._tasks), self._what)
