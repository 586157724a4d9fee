"""Where a stall of notifyd's event loop goes: ``notifyd serve`` with its callbacks timed.

    STALLWATCH_OUT=/tmp/stalls.jsonl python -m benchmarks.stallwatch --log-level WARNING serve

(``run.py --stallwatch FILE`` runs notifyd this way.) A timer every millisecond
notes when the loop got round to it; a gap over ``STALLWATCH_MS`` (default 20) is a
stall, written as one JSON line: when it ended (``time.perf_counter()``, the clock
the load generator's samples use), how long it was, the CPU time the process had in
it (on a shared machine, a gap with little CPU time is another process's, not a
stall of the server's own making), and the Python time spent in it
by entry point — each task step by its coroutine, the protocol callbacks of
notifyd's ``Connection`` and aiohttp's ``RequestHandler``, the reaper, the admission
gate, the outbox, collections by generation — with how many calls. What is left of
the gap is the event loop's own work in C (uvloop/libuv and the kernel: polling,
accepting, reading, closing) and anything not listed.

A measuring tool: it costs a little CPU (a thousand timer wake-ups per second and a
clock read per callback), so compare it only with itself.
"""

from __future__ import annotations

import asyncio
import collections.abc
import gc
import json
import os
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Generator
from typing import Any

OUT = os.environ.get("STALLWATCH_OUT", "stalls.jsonl")
THRESHOLD = float(os.environ.get("STALLWATCH_MS", "20")) / 1000
TICK = 0.001

perf = time.perf_counter
#: Entry point -> [calls, seconds] since the last tick.
spent: defaultdict[str, list[float]] = defaultdict(lambda: [0, 0.0])


class _State:
    #: Instrumented calls under way (only the outermost is timed).
    depth = 0
    gc_started = 0.0
    new_event_loop: Callable[[], asyncio.AbstractEventLoop] | None = None


state = _State()


def timed(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        entry = spent[name]
        entry[0] += 1
        if state.depth:
            return function(*args, **kwargs)
        state.depth += 1
        started = perf()
        try:
            return function(*args, **kwargs)
        finally:
            entry[1] += perf() - started
            state.depth -= 1

    return wrapper


class Timed(collections.abc.Coroutine):  # type: ignore[type-arg]
    """A task's coroutine, each step timed under the coroutine's name."""

    __slots__ = ("coro", "name")

    def __init__(self, coro: Any) -> None:
        self.coro = coro
        self.name = "task " + getattr(coro, "__qualname__", type(coro).__name__)

    def _step(self, method: Callable[..., Any], *args: Any) -> Any:
        entry = spent[self.name]
        entry[0] += 1
        state.depth += 1
        started = perf()
        try:
            return method(*args)
        finally:
            entry[1] += perf() - started
            state.depth -= 1

    def send(self, value: Any) -> Any:
        return self._step(self.coro.send, value)

    def throw(self, *args: Any) -> Any:
        return self._step(self.coro.throw, *args)

    def close(self) -> None:
        self.coro.close()

    def __await__(self) -> Generator[Any, None, Any]:
        return self.coro.__await__()  # type: ignore[no-any-return]


def _on_gc(phase: str, info: dict[str, Any]) -> None:
    if phase == "start":
        state.gc_started = perf()
        # The objects the collection is to scan, as the interpreter counts them: too
        # few once frozen objects were freed (see notifyd.gcpolicy.CollectorPolicy).
        entry = spent[f"gc gen{info['generation']} young objects"]
        entry[0] = max(entry[0], gc.get_count()[0])
    else:
        entry = spent[f"gc gen{info['generation']}"]
        entry[0] += 1
        entry[1] += perf() - state.gc_started
        spent[f"gc gen{info['generation']} objects freed"][0] += info["collected"]


def instrument() -> None:
    from aiohttp import web_protocol

    from notifyd import connection, lifecycle

    for name in ("data_received", "eof_received", "connection_lost", "_wake", "flush"):
        method = getattr(connection.Connection, name)
        setattr(connection.Connection, name, timed(f"Connection.{name}", method))
    take_over = connection.SocketServer._take_over
    connection.SocketServer._take_over = timed("SocketServer._take_over", take_over)  # type: ignore[method-assign]
    # The reaper and the wake-ups after a binding batch; the turns of the upgrades and
    # of new connections' first bytes.
    batch = lifecycle.PerPass._next_batch
    lifecycle.PerPass._next_batch = timed("PerPass._next_batch", batch)  # type: ignore[method-assign]
    lifecycle.Turns._next_pass = timed("Turns._next_pass", lifecycle.Turns._next_pass)  # type: ignore[method-assign]
    connection.Outbox.flush = timed("Outbox.flush", connection.Outbox.flush)  # type: ignore[method-assign]
    handler = web_protocol.RequestHandler
    for name in ("connection_made", "data_received", "connection_lost"):
        setattr(handler, name, timed(f"aiohttp.{name}", getattr(handler, name)))
    gc.callbacks.append(_on_gc)


def _write(record: dict[str, Any]) -> None:
    with open(OUT, "a") as out:
        out.write(json.dumps(record) + "\n")


def _tick(loop: asyncio.AbstractEventLoop, last: float, last_cpu: float) -> None:
    now, cpu = perf(), time.process_time()
    gap = now - last
    if gap > THRESHOLD:
        python = {name: [int(c), round(s * 1000, 2)] for name, (c, s) in spent.items() if c}
        _write(
            {
                "at": now,
                "gap_ms": round(gap * 1000, 2),
                # CPU time the process had in the gap: well under ``gap_ms``, the
                # process was not running (another process had the core).
                "cpu_ms": round((cpu - last_cpu) * 1000, 2),
                "python_ms": round(sum(s for _, s in python.values()), 2),
                "entries": dict(sorted(python.items(), key=lambda kv: -kv[1][1])),
            }
        )
    spent.clear()
    loop.call_later(TICK, _tick, loop, perf(), time.process_time())


def _task(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
    return asyncio.Task(Timed(coro), loop=loop, **kwargs)


def _loop_with_watch() -> asyncio.AbstractEventLoop:
    assert state.new_event_loop is not None
    loop = state.new_event_loop()
    loop.set_task_factory(_task)
    loop.call_soon(_tick, loop, perf(), time.process_time())
    return loop


def main() -> int:
    from notifyd import app
    from notifyd.cli import main as cli_main

    instrument()
    installed = app.install_uvloop

    def install() -> None:
        installed()
        policy = asyncio.get_event_loop_policy()
        state.new_event_loop = policy.new_event_loop
        policy.new_event_loop = _loop_with_watch  # type: ignore[method-assign]

    app.install_uvloop = install
    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
