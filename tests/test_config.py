"""Settings: defaults, TOML, environment and flag overrides, errors that name the key."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from notifyd.config import ConfigError, Settings, load, to_dict

BASE_ENV = {"NOTIFYD_AUTH_SECRET": "s"}
EXAMPLE = Path(__file__).parent.parent / "config.example.toml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "notifyd.toml"
    path.write_text(text)
    return path


def test_defaults_need_only_a_secret() -> None:
    settings = load(environ=BASE_ENV)
    assert settings.server.port == 8080 and settings.auth.algorithms == ("HS256",)
    assert settings.auth.user_claim == "sub" and settings.auth.query_token is False


def test_precedence_file_then_env_then_flags(tmp_path: Path) -> None:
    path = write(tmp_path, '[server]\nport = 9000\nhost = "0.0.0.0"\n[auth]\nsecret = "file"\n')
    assert load(path, environ={}).server.port == 9000
    settings = load(path, environ={"NOTIFYD_SERVER_PORT": "9100"})
    assert (settings.server.port, settings.server.host, settings.auth.secret) == (
        9100,
        "0.0.0.0",
        "file",
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
        ({"NOTIFYD_AUTH_SECRET": ""}, "", "[auth] secret: required for HS*"),
        ({"NOTIFYD_AUTH_ALGORITHMS": "HS256,RS256"}, "", "do not mix HS*"),
        ({"NOTIFYD_AUTH_ALGORITHMS": "none"}, "", "[auth] algorithms: unsupported algorithm 'none'"),
        ({"NOTIFYD_AUTH_ALGORITHMS": "RS256"}, "", "[auth] public_key: set exactly one"),
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
