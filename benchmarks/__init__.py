"""Benchmarks of notifyd against its baselines; see benchmarks/README.md."""

from __future__ import annotations

import resource


def lift_fd_limit() -> None:
    """Raise this process's open-file limit to the hard limit: it holds many sockets."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
