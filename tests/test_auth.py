"""Token checks without I/O: a table of tokens that must be refused, and what is accepted."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from notifyd.auth import Grants, TokenVerifier, decode_identity, mint_token
from notifyd.config import AuthSettings
from notifyd.errors import AuthError

NOW = 1_700_000_000.0
SECRET = "unit-test-secret-" * 4  # long enough for HS512
HS = AuthSettings(secret=SECRET, leeway=5)


def b64(value: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()


def hs(claims: dict[str, Any], headers: dict[str, Any] | None = None, key: str = SECRET) -> str:
    return str(
        jwt.encode({"sub": "alice", "exp": NOW + 60, **claims}, key, "HS256", headers=headers)
    )


def public_pem(private: Any) -> str:
    return str(
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)

BAD_TOKENS: list[tuple[str, Callable[[], str], AuthSettings, str]] = [
    ("garbage", lambda: "not.a.token", HS, "malformed"),
    ("empty", lambda: "", HS, "malformed"),
    (
        "alg none",
        lambda: f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64({'sub': 'a', 'exp': NOW + 60})}.",
        HS,
        "algorithm",
    ),
    ("wrong secret", lambda: hs({}, key="another-secret-another-secret-0000"), HS, "signature"),
    ("expired", lambda: hs({"exp": NOW - 6}), HS, "expired"),
    ("no exp", lambda: jwt.encode({"sub": "alice"}, SECRET, "HS256"), HS, "claims"),
    ("exp not a number", lambda: hs({"exp": "tomorrow"}), HS, "malformed"),
    ("nbf in the future", lambda: hs({"nbf": NOW + 60}), HS, "not_yet_valid"),
    ("iat in the future", lambda: hs({"iat": NOW + 60}), HS, "not_yet_valid"),
    ("unknown crit", lambda: hs({}, headers={"crit": ["exp-v2"], "exp-v2": 1}), HS, "claims"),
    (
        "wrong audience",
        lambda: hs({"aud": "other"}),
        AuthSettings(secret=SECRET, audience="notifyd"),
        "audience",
    ),
    ("missing audience", lambda: hs({}), AuthSettings(secret=SECRET, audience="notifyd"), "claims"),
    (
        "wrong issuer",
        lambda: hs({"iss": "evil"}),
        AuthSettings(secret=SECRET, issuer="https://idp"),
        "issuer",
    ),
    (
        "HS384 not allowed",
        lambda: jwt.encode({"sub": "a", "exp": NOW + 60}, SECRET, "HS384"),
        HS,
        "algorithm",
    ),
    ("subject '#'", lambda: hs({"sub": "#"}), HS, "user_id"),
    ("subject 'a.*'", lambda: hs({"sub": "a.*"}), HS, "user_id"),
    ("subject with spaces", lambda: hs({"sub": "a b"}), HS, "user_id"),
    ("no subject", lambda: jwt.encode({"exp": NOW + 60}, SECRET, "HS256"), HS, "user_id"),
    ("subject too long", lambda: hs({"sub": "a" * 129}), HS, "user_id"),
    ("topics not a list", lambda: hs({"topics": "news"}), HS, "claims"),
    ("topic '#'", lambda: hs({"topics": ["#"]}), HS, "claims"),
    ("publish with spaces", lambda: hs({"publish": ["a b"]}), HS, "claims"),
    (
        "HS256 signed with the RSA public key (key confusion)",
        lambda: _hs_with_secret(public_pem(RSA_KEY).encode()),
        AuthSettings(algorithms=("RS256",), public_key=public_pem(RSA_KEY)),
        "algorithm",
    ),
]


def _hs_with_secret(secret: bytes) -> str:
    import hashlib
    import hmac

    signing_input = f"{b64({'alg': 'HS256', 'typ': 'JWT'})}.{b64({'sub': 'a', 'exp': NOW + 60})}"
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{base64.urlsafe_b64encode(signature).rstrip(b'=').decode()}"


@pytest.mark.parametrize(
    ("make", "settings", "reason"), [t[1:] for t in BAD_TOKENS], ids=[t[0] for t in BAD_TOKENS]
)
def test_refused_tokens(make: Callable[[], str], settings: AuthSettings, reason: str) -> None:
    with pytest.raises(AuthError) as refused:
        decode_identity(make(), settings.public_key or settings.secret, settings, now=NOW)
    assert refused.value.reason == reason


def test_accepted_token_carries_identity_and_grants() -> None:
    token = hs({"topics": ["news", "sport.*"], "publish": ["chat"], "jti": "t-1", "aud": "notifyd"})
    identity = decode_identity(
        token, SECRET, AuthSettings(secret=SECRET, audience="notifyd"), now=NOW
    )
    assert (
        identity.user == "alice" and identity.expires_at == NOW + 60 and identity.token_id == "t-1"
    )
    assert identity.topics.allows("news") and identity.topics.allows("sport.tennis")
    assert not identity.topics.allows("sport") and not identity.topics.allows("sportsbook")
    assert identity.publish.allows("chat") and not identity.publish.allows("news")


def test_leeway_accepts_a_just_expired_token() -> None:
    assert decode_identity(hs({"exp": NOW - 3}), SECRET, HS, now=NOW).user == "alice"


def test_custom_user_claim_and_numeric_ids() -> None:
    settings = AuthSettings(secret=SECRET, user_claim="uid")
    assert decode_identity(hs({"uid": "u-9"}), SECRET, settings, now=NOW).user == "u-9"
    assert decode_identity(hs({"uid": 42}), SECRET, settings, now=NOW).user == "42"
    # RFC 7519 makes "sub" a string; PyJWT holds tokens to that.
    with pytest.raises(AuthError):
        decode_identity(hs({"sub": 42}), SECRET, HS, now=NOW)


@pytest.mark.parametrize(
    ("algorithm", "private"),
    [
        ("RS256", RSA_KEY),
        ("ES256", ec.generate_private_key(ec.SECP256R1())),
        ("EdDSA", ed25519.Ed25519PrivateKey.generate()),
    ],
)
def test_asymmetric_algorithms_with_a_pem_key(algorithm: str, private: Any) -> None:
    settings = AuthSettings(algorithms=(algorithm,), public_key=public_pem(private))
    token = jwt.encode({"sub": "bob", "exp": NOW + 60}, private, algorithm)
    assert decode_identity(token, public_pem(private), settings, now=NOW).user == "bob"
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if algorithm == "RS256":
        forged = jwt.encode({"sub": "bob", "exp": NOW + 60}, other, algorithm)
        with pytest.raises(AuthError, match="signature"):
            decode_identity(forged, public_pem(private), settings, now=NOW)


def test_grants_parse() -> None:
    grants = Grants.parse(["a", "b.*"], "topics")
    assert grants.exact == frozenset({"a"}) and grants.prefixes == ("b.",)
    assert Grants.parse(None, "topics").allows("a") is False


async def test_verifier_revocation() -> None:
    verifier = TokenVerifier(AuthSettings(secret=SECRET))
    token = mint_token(SECRET, "carol", 60, jti="j-1")
    assert (await verifier.verify(token)).user == "carol"
    verifier.revoke(["j-1"], until=time.time() + 60)
    assert verifier.is_revoked("j-1") and not verifier.is_revoked(None)
    with pytest.raises(AuthError) as refused:
        await verifier.verify(token)
    assert refused.value.reason == "revoked"
    # Revocations are forgotten once the tokens they name have expired anyway.
    verifier.revoke(["j-2"], until=time.time() - 1)
    verifier.revoke([], until=0)
    assert not verifier.is_revoked("j-2")
    await verifier.close()
