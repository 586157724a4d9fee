"""SSE tickets: a verified identity sealed for one ``GET /sse?ticket=...`` (pure, no I/O).

Browsers' ``EventSource`` cannot set an ``Authorization`` header, and a JWT in
a URL ends up in access logs. ``POST /api/sse-ticket`` (with the JWT in the
header) returns a ticket instead: the verified identity the stream needs (user,
grants, token expiry, token id) plus the ticket's own expiry and id, sealed with
AES-GCM. It is opaque to the client and self-contained, so any replica that has
the same key redeems it without asking the one that issued it.

Single use: :class:`Redeemed` remembers the ids redeemed on this replica until
they expire (bounded).
"""

from __future__ import annotations

import base64
import binascii
import os
import secrets
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .auth import Grants, Identity
from .errors import AuthError
from .protocol import dumps, loads

#: Bound into every ticket (AES-GCM associated data): a key shared with anything
#: else cannot be used to forge or read a ticket of another format.
_AAD: Final = b"notifyd-sse-ticket-v1"
_NONCE: Final = 12
#: Longest ticket accepted (a ticket with many grants is a few hundred bytes).
MAX_TICKET_LENGTH: Final = 16_384
#: Redeemed ids remembered at most; past it the oldest are forgotten first.
MAX_REDEEMED: Final = 200_000


def derive_key(material: str, info: bytes = b"notifyd sse ticket key v1") -> bytes:
    """A 256-bit AES key from ``material`` (``[sse] ticket_secret`` or ``[auth] secret``).

    HKDF, with its own ``info``: the HMAC secret that signs JWTs is never used
    as an AES key itself.
    """
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(
        material.encode()
    )


def random_key() -> bytes:
    return os.urandom(32)


def _claim(grants: Grants) -> list[str]:
    """The claim list :meth:`Grants.parse` reads back (prefixes keep their dot)."""
    return sorted(grants.exact) + [prefix + "*" for prefix in grants.prefixes]


@dataclass(frozen=True, slots=True)
class Ticket:
    """A redeemed ticket: the identity, and the ticket's id and expiry."""

    identity: Identity
    id: str
    expires_at: float


class Tickets:
    """Issues and opens tickets with one key (pure: the clock is a parameter)."""

    def __init__(self, key: bytes, ttl: float) -> None:
        self._aead = AESGCM(key)
        self.ttl = ttl

    def issue(self, identity: Identity, now: float) -> str:
        body: dict[str, Any] = {
            "u": identity.user,
            "x": identity.expires_at,
            "t": _claim(identity.topics),
            "p": _claim(identity.publish),
            "r": sorted(identity.presence),
            "j": identity.token_id,
            "e": now + self.ttl,
            "i": secrets.token_urlsafe(12),
        }
        nonce = os.urandom(_NONCE)
        sealed = nonce + self._aead.encrypt(nonce, dumps(body), _AAD)
        return base64.urlsafe_b64encode(sealed).rstrip(b"=").decode()

    def open(self, ticket: str, now: float) -> Ticket:
        """The ticket's content; AuthError ``invalid`` (not ours, tampered, malformed)
        or ``expired`` (the ticket's or the token's time is up)."""
        if not ticket or len(ticket) > MAX_TICKET_LENGTH:
            raise AuthError("invalid", "invalid ticket")
        try:
            sealed = base64.urlsafe_b64decode(ticket + "=" * (-len(ticket) % 4))
            if len(sealed) <= _NONCE:
                raise ValueError("short")
            body = loads(self._aead.decrypt(sealed[:_NONCE], sealed[_NONCE:], _AAD))
            identity = Identity(
                user=body["u"],
                expires_at=float(body["x"]),
                topics=Grants.parse(body["t"] or None, "topics"),
                publish=Grants.parse(body["p"] or None, "publish"),
                token_id=body["j"],
                presence=frozenset(body["r"]),
            )
            opened = Ticket(identity, str(body["i"]), float(body["e"]))
        except (InvalidTag, ValueError, binascii.Error, KeyError, TypeError, AuthError):
            raise AuthError("invalid", "invalid ticket") from None
        if opened.expires_at <= now:
            raise AuthError("expired", "ticket expired")
        if identity.expires_at <= now:
            raise AuthError("expired", "token expired")
        return opened


class Redeemed:
    """Ticket ids redeemed here, each until its ticket expires (single use).

    Bounded: past :data:`MAX_REDEEMED` live ids the oldest are forgotten (a
    ticket lives ``ttl`` seconds, so that takes more than MAX_REDEEMED/ttl
    redemptions per second).
    """

    def __init__(self, limit: int = MAX_REDEEMED) -> None:
        self.limit = limit
        #: id -> expiry, in redemption order (expiries grow with it: one ttl).
        self._ids: OrderedDict[str, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._ids)

    def redeem(self, ticket_id: str, expires_at: float, now: float) -> bool:
        """Mark ``ticket_id`` used; False if it was used already."""
        ids = self._ids
        while ids:
            _, expiry = next(iter(ids.items()))
            if expiry > now and len(ids) < self.limit:
                break
            ids.popitem(last=False)
        if ticket_id in ids:
            return False
        ids[ticket_id] = expires_at
        return True
