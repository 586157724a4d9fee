"""Log lines an operator can act on, without a flood of them.

A broken publisher, a refusing broker or a hostile client can make the same
problem happen thousands of times a second; its metric counts every one, the log
says it once a minute (:class:`Throttle`).
"""

from __future__ import annotations

import time
from typing import Final

#: Seconds between two log lines about the same problem.
LOG_INTERVAL: Final = 60.0


class Throttle:
    """Says whether a line about a problem is due: at most once per ``interval``."""

    __slots__ = ("_interval", "_last")

    def __init__(self, interval: float = LOG_INTERVAL) -> None:
        self._interval = interval
        self._last: dict[str, float] = {}

    def due(self, problem: str = "") -> bool:
        """True (and the clock for ``problem`` restarts) if no line about ``problem``
        was due within the interval."""
        now = time.monotonic()
        if now - self._last.get(problem, float("-inf")) < self._interval:
            return False
        self._last[problem] = now
        return True
