"""Web Push cryptography, without I/O: VAPID keys and tokens, payload encryption.

- RFC 8292 (VAPID): the application server's P-256 key signs a short-lived ES256 JWT
  per push service origin; a request carries ``Authorization: vapid t=<jwt>, k=<key>``.
  The browser subscribed with the public key (``applicationServerKey``), so its push
  service accepts messages only from the holder of the private key.
- RFC 8291 (Message Encryption for Web Push) over RFC 8188 ``aes128gcm``: an ephemeral
  ECDH key agreed with the subscription's ``p256dh`` key and mixed with its ``auth``
  secret; the push service only ever sees ciphertext. ``http_ece`` does the record
  layer (it is what pywebpush uses underneath).
"""

from __future__ import annotations

import base64
import binascii
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import http_ece
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from .errors import ConfigError

#: RFC 8291 §4: a push message body is at most 4096 octets, so its plaintext is at
#: most 4096 - 86 (header) - 16 (tag) - 1 (padding delimiter) = 3993 octets.
MAX_PLAINTEXT = 3993
#: RFC 8292 §2: a VAPID token must not expire more than 24 hours ahead.
TOKEN_LIFETIME = 12 * 3600
#: A cached token is replaced once less than this is left of its lifetime.
TOKEN_RENEW_BEFORE = 3600


def b64url_decode(text: str) -> bytes:
    """Base64url without padding, as PushSubscription keys are written; raises ValueError."""
    if not isinstance(text, str) or not text.isascii():
        raise ValueError("not base64url")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise ValueError("not base64url") from None


def b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def generate_private_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def private_key_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode("ascii")


def load_private_key(value: str) -> ec.EllipticCurvePrivateKey:
    """``[webpush] vapid_private_key``: PEM text, a path to a PEM file, or the raw
    32-byte key in base64url (what ``web-push generate-vapid-keys`` prints).

    Raises ConfigError naming the key, never quoting its value.
    """
    where = "[webpush] vapid_private_key"
    text = value.strip()
    if not text:
        raise ConfigError(f"{where}: not set (make one: notifyd webpush --generate-vapid-key)")
    raw_key = len(text) == 43 and not Path(text).exists()
    if "-----BEGIN" not in text and not raw_key:
        try:
            text = Path(text).read_text()
        except OSError as exc:
            raise ConfigError(f"{where}: cannot read {value!r}: {exc.strerror}") from None
    key: object
    try:
        if "-----BEGIN" in text:
            key = serialization.load_pem_private_key(text.encode(), password=None)
        else:
            key = ec.derive_private_key(int.from_bytes(b64url_decode(text), "big"), ec.SECP256R1())
    except (ValueError, TypeError):
        raise ConfigError(f"{where}: not a PEM (or base64url) private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise ConfigError(f"{where}: must be a P-256 (prime256v1) EC key")
    return key


def public_key_bytes(key: ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) -> bytes:
    """The uncompressed point (65 bytes): ``applicationServerKey`` and ``p256dh`` form."""
    public = key.public_key() if isinstance(key, ec.EllipticCurvePrivateKey) else key
    return public.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )


def parse_public_key(data: bytes) -> ec.EllipticCurvePublicKey:
    """A P-256 public key from its uncompressed point; ValueError when it is not one."""
    if len(data) != 65 or data[0] != 4:
        raise ValueError("not an uncompressed P-256 point")
    return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), data)


def audience(endpoint: str) -> str:
    """The VAPID ``aud``: the push resource's origin (RFC 8292 §2)."""
    parts = urlsplit(endpoint)
    return f"{parts.scheme}://{parts.netloc}"


@dataclass
class Vapid:
    """Signs VAPID tokens, one per push service origin, reused until near expiry."""

    key: ec.EllipticCurvePrivateKey
    subject: str
    _cache: dict[str, tuple[str, float]] = field(default_factory=dict, repr=False)

    @property
    def public_key(self) -> str:
        """``applicationServerKey`` for ``pushManager.subscribe`` (base64url)."""
        return b64url_encode(public_key_bytes(self.key))

    def authorization(self, endpoint: str, now: float | None = None) -> str:
        """The ``Authorization`` header value for a request to ``endpoint``."""
        now = time.time() if now is None else now
        aud = audience(endpoint)
        cached = self._cache.get(aud)
        if cached is None or cached[1] - now < TOKEN_RENEW_BEFORE:
            expires = int(now) + TOKEN_LIFETIME
            claims: dict[str, object] = {"aud": aud, "exp": expires}
            if self.subject:
                claims["sub"] = self.subject
            token = jwt.encode(claims, self.key, algorithm="ES256", headers={"typ": "JWT"})
            if len(self._cache) > 1000:  # origins are few; never let it grow unbounded
                self._cache.clear()
            cached = self._cache[aud] = (token, expires)
        return f"vapid t={cached[0]}, k={self.public_key}"


def encrypt(plaintext: bytes, p256dh: str, auth: str) -> bytes:
    """The ``aes128gcm`` body (RFC 8291) of ``plaintext`` for one subscription."""
    receiver = b64url_decode(p256dh)
    return bytes(
        http_ece.encrypt(
            plaintext,
            private_key=ec.generate_private_key(ec.SECP256R1()),
            dh=receiver,
            auth_secret=b64url_decode(auth),
            version="aes128gcm",
        )
    )
