"""Settings: defaults, TOML, environment and flag overrides, errors that name the key."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import yaml

from notifyd.config import Settings, load, redacted, require_token_keys, to_dict
from notifyd.errors import ConfigError

STRONG = "4f9c2e8a1b7d6053e9a4c1f2b8d7e6a5"  # 32 bytes: enough for HS256
BASE_ENV = {"NOTIFYD_AUTH_SECRET": STRONG}
EXAMPLE = Path(__file__).parent.parent / "config.example.toml"
K8S_SECRET = Path(__file__).parent.parent / "deploy" / "k8s" / "secret.yaml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "notifyd.toml"
    path.write_text(text)
    return path


def test_defaults_need_only_a_secret() -> None:
    settings = load(environ=BASE_ENV)
    assert settings.server.port == 8080 and settings.auth.algorithms == ("HS256",)
    assert settings.auth.user_claim == "sub" and settings.auth.query_token is False
    require_token_keys(settings)


def test_only_serving_needs_a_key() -> None:
    """publish, upstream and check-config load settings without any key (issue 13.15)."""
    settings = load(EXAMPLE, environ={})
    with pytest.raises(ConfigError, match=r"\[auth\] secret: required for HS\*"):
        require_token_keys(settings)
    asymmetric = load(environ={"NOTIFYD_AUTH_ALGORITHMS": "RS256"})
    with pytest.raises(ConfigError, match=r"\[auth\] public_key: set public_key or jwks_url"):
        require_token_keys(asymmetric)


@pytest.mark.parametrize(
    ("algorithms", "secret", "message"),
    [
        ("HS256", "Zq", "[auth] secret: 2 bytes is too short for HS256: it needs at least 32"),
        ("HS256", "a" * 31, "too short for HS256"),
        ("HS384", STRONG, "32 bytes is too short for HS384: it needs at least 48"),
        ("HS256,HS512", STRONG + "0" * 16, "48 bytes is too short for HS512: it needs at least 64"),
        ("HS256", "change-me-to-a-long-random-secret-of-at-least-32-bytes",
         "[auth] secret: looks like a placeholder (contains 'changeme')"),
        ("HS256", "Replace_Me_With_A_Real_Secret_Key_0123", "contains 'replaceme'"),
        ("HS256", "compose-secret-change-me-compose-secret-change-me", "contains 'changeme'"),
        ("HS256", "secret" * 6, "looks like a placeholder (one phrase repeated)"),
        ("HS256", "dev-secret-dev-secret-dev-secret-dev-secret", "one phrase repeated"),
    ],
)  # fmt: skip
def test_weak_hs_secrets_are_refused_naming_the_key(
    algorithms: str, secret: str, message: str
) -> None:
    """RFC 7518 §3.2 key sizes, and placeholders copied from examples (issue 13.10)."""
    with pytest.raises(ConfigError) as refused:
        load(environ={"NOTIFYD_AUTH_ALGORITHMS": algorithms, "NOTIFYD_AUTH_SECRET": secret})
    assert message in str(refused.value)
    assert secret not in str(refused.value)


def test_the_kubernetes_placeholders_are_refused() -> None:
    stored = yaml.safe_load(K8S_SECRET.read_text())["stringData"]
    with pytest.raises(ConfigError, match=r"\[auth\] secret: looks like a placeholder"):
        load(environ={"NOTIFYD_AUTH_SECRET": stored["jwt-secret"]})
    with pytest.raises(ConfigError, match=r"\[api\] service_keys: a key looks like a placeholder"):
        load(environ={**BASE_ENV, "NOTIFYD_API_SERVICE_KEYS": stored["service-keys"]})


@pytest.mark.parametrize(
    ("algorithms", "secret"),
    [("HS256", STRONG), ("HS384", STRONG + "7d1e0c9b4a3f2e18"), ("HS512", STRONG + STRONG[::-1])],
)
def test_long_enough_random_secrets_are_accepted(algorithms: str, secret: str) -> None:
    settings = load(environ={"NOTIFYD_AUTH_ALGORITHMS": algorithms, "NOTIFYD_AUTH_SECRET": secret})
    assert settings.auth.secret == secret


def test_redacted_settings_hide_every_credential() -> None:
    """What check-config prints (issue 13.11)."""
    settings = load(
        environ={
            **BASE_ENV,
            "NOTIFYD_AMQP_URL": "amqps://notifyd:amqp-pa55word@mq.example:5671/prod",
            "NOTIFYD_API_SERVICE_KEYS": "service-key-one-1234,service-key-two-5678",
            "NOTIFYD_AUTH_ALGORITHMS": "HS256",
        }
    )
    shown = redacted(settings)
    text = repr(shown)
    for credential in (STRONG, "amqp-pa55word", "service-key-one-1234", "service-key-two-5678"):
        assert credential not in text
    assert shown["amqp"]["url"] == "amqps://notifyd:***@mq.example:5671/prod"
    assert shown["auth"]["secret"] == "***"
    assert shown["api"]["service_keys"] == ("***", "***")
    assert shown["server"] == to_dict(settings)["server"]
    empty = redacted(load(environ={}))
    assert empty["auth"]["secret"] == "" and empty["api"]["service_keys"] == ()


def test_errors_never_quote_a_credential() -> None:
    key = "a-real-service-key-0123456789"
    with pytest.raises(ConfigError) as refused:
        load(environ={**BASE_ENV, "NOTIFYD_API_SERVICE_KEYS": f'["{key}", 1'})
    assert "[api] service_keys: expected a JSON list" in str(refused.value)
    assert key not in str(refused.value)
    with pytest.raises(ConfigError) as refused:
        load(Path("/dev/null"), overrides={"amqp": {"url": 5672}})
    assert "[amqp] url: expected a string, got 5672" in str(refused.value)


def test_precedence_file_then_env_then_flags(tmp_path: Path) -> None:
    path = write(
        tmp_path, f'[server]\nport = 9000\nhost = "0.0.0.0"\n[auth]\nsecret = "{STRONG}"\n'
    )
    assert load(path, environ={}).server.port == 9000
    settings = load(path, environ={"NOTIFYD_SERVER_PORT": "9100"})
    assert (settings.server.port, settings.server.host, settings.auth.secret) == (
        9100,
        "0.0.0.0",
        STRONG,
    )
    flagged = load(
        path, environ={"NOTIFYD_SERVER_PORT": "9100"}, overrides={"server": {"port": 9200}}
    )
    assert flagged.server.port == 9200


@pytest.mark.parametrize(
    ("name", "value", "section", "key", "expected"),
    [
        ("NOTIFYD_WS_ALLOWED_ORIGINS", '["https://a.example", "https://b.example"]', "ws", "allowed_origins",
         ("https://a.example", "https://b.example")),
        ("NOTIFYD_WS_ALLOWED_ORIGINS", "https://a.example, https://b.example", "ws", "allowed_origins",
         ("https://a.example", "https://b.example")),
        ("NOTIFYD_AUTH_QUERY_TOKEN", "true", "auth", "query_token", True),
        ("NOTIFYD_AUTH_QUERY_TOKEN", "0", "auth", "query_token", False),
        ("NOTIFYD_AUTH_LEEWAY", "2.5", "auth", "leeway", 2.5),
        ("NOTIFYD_AMQP_URL", "amqps://u:p@mq:5671/vh", "amqp", "url", "amqps://u:p@mq:5671/vh"),
        ("NOTIFYD_HISTORY_BACKEND", "stream", "history", "backend", "stream"),
        ("NOTIFYD_API_SERVICE_KEYS", "key-one-1234,key-two-5678", "api", "service_keys",
         ("key-one-1234", "key-two-5678")),
    ],
)  # fmt: skip
def test_environment_values(
    name: str, value: str, section: str, key: str, expected: object
) -> None:
    settings = load(environ={**BASE_ENV, name: value})
    assert getattr(getattr(settings, section), key) == expected


@pytest.mark.parametrize(
    ("environ", "file", "message"),
    [
        ({"NOTIFYD_SERVER_PORT": "abc"}, "", "[server] port: expected an integer, got 'abc' (from NOTIFYD_SERVER_PORT)"),
        ({"NOTIFYD_SERVER_PROT": "1"}, "", "NOTIFYD_SERVER_PROT: no such setting"),
        ({"NOTIFYD_AUTH_QUERY_TOKEN": "maybe"}, "", "[auth] query_token: expected true or false"),
        ({}, "[server]\nport = 'x'\n", "[server] port: expected an integer, got 'x' (from "),
        ({}, "[serverr]\nport = 1\n", "[serverr]: unknown section"),
        ({}, "[server]\nprot = 1\n", "[server] prot: unknown key"),
        ({}, "[ws]\nallowed_origins = 'x'\n", "[ws] allowed_origins: expected a list of strings"),
        ({}, "[server\n", "not valid TOML"),
        ({"NOTIFYD_AUTH_ALGORITHMS": "HS256,RS256"}, "", "do not mix HS*"),
        ({"NOTIFYD_AUTH_ALGORITHMS": "none"}, "", "[auth] algorithms: unsupported algorithm 'none'"),
        ({"NOTIFYD_AUTH_ALGORITHMS": "RS256", "NOTIFYD_AUTH_PUBLIC_KEY": "k",
          "NOTIFYD_AUTH_JWKS_URL": "https://idp/jwks"}, "", "[auth] public_key: set only one"),
        ({"NOTIFYD_SERVER_DRAIN_SECONDS": "30"}, "", "[server] shutdown_timeout: must be larger"),
        ({"NOTIFYD_HISTORY_BACKEND": "redis"}, "", "[history] backend"),
        ({"NOTIFYD_WS_ALLOWED_ORIGINS": "example.com"}, "", "[ws] allowed_origins"),
        ({"NOTIFYD_AMQP_URL": "http://x"}, "", "[amqp] url"),
        ({"NOTIFYD_API_SERVICE_KEYS": "short"}, "", "[api] service_keys"),
    ],
)  # fmt: skip
def test_bad_config_names_the_key(
    tmp_path: Path, environ: dict[str, str], file: str, message: str
) -> None:
    path = write(tmp_path, file) if file else None
    with pytest.raises(ConfigError) as refused:
        load(path, environ={**BASE_ENV, **environ})
    assert message in str(refused.value)


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load(tmp_path / "absent.toml", environ=BASE_ENV)


def test_replace_validates_again() -> None:
    settings = load(environ=BASE_ENV)
    assert settings.replace("server", port=9999).server.port == 9999
    with pytest.raises(ConfigError):
        settings.replace("server", port=0)


def test_example_file_documents_every_key_with_its_default() -> None:
    example = tomllib.loads(EXAMPLE.read_text())
    defaults = to_dict(Settings())
    assert set(example) == set(defaults)
    for section, keys in defaults.items():
        assert set(example[section]) == set(keys), section
        for key, value in keys.items():
            expected = list(value) if isinstance(value, tuple) else value
            assert example[section][key] == expected, f"[{section}] {key}"
