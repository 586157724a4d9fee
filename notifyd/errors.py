"""Exceptions notifyd raises across its layers, rooted at :class:`NotifydError`."""

from __future__ import annotations


class NotifydError(Exception):
    """Base of notifyd's own exceptions."""


class BrokerUnavailable(NotifydError):
    """RabbitMQ cannot take a message right now (disconnected, or no confirm)."""
