"""The ``notifyd`` command as an operator runs it: keys only where needed, none printed."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from notifyd.cli import main

from .conftest import SECRET, ServerFactory, new_user, receive_until

ROOT = Path(__file__).parent.parent
EXAMPLE = ROOT / "config.example.toml"


def clean_env(**env: str) -> dict[str, str]:
    """This environment without any NOTIFYD_* setting, plus ``env``."""
    kept = {k: v for k, v in os.environ.items() if not k.startswith("NOTIFYD_")}
    return {**kept, **env}


NOTIFYD = (sys.executable, "-m", "notifyd")


def notifyd(*args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*NOTIFYD, *args],
        env=clean_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_check_config_masks_every_credential(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 13.11: the secret, the service keys and the AMQP password were printed."""
    for name in [n for n in os.environ if n.startswith("NOTIFYD_")]:
        monkeypatch.delenv(name)
    credentials = {
        "NOTIFYD_AUTH_SECRET": SECRET,
        "NOTIFYD_API_SERVICE_KEYS": "first-service-key-4242,second-service-key-4343",
        "NOTIFYD_AMQP_URL": "amqp://notifyd:rabbit-password-77@mq.internal:5672/",
    }
    for name, value in credentials.items():
        monkeypatch.setenv(name, value)
    assert main(["check-config"]) == 0
    out, err = capsys.readouterr()
    for secret in (
        SECRET,
        "first-service-key-4242",
        "second-service-key-4343",
        "rabbit-password-77",
    ):
        assert secret not in out + err
    printed = json.loads(out)
    assert printed["amqp"]["url"] == "amqp://notifyd:***@mq.internal:5672/"
    assert printed["auth"]["secret"] == "***"
    assert printed["api"]["service_keys"] == ["***", "***"]
    assert err.strip() == "config OK"


def test_check_config_of_the_example_needs_no_secret() -> None:
    """Issue 13.15: it said "[auth] secret: required"; it now says what serve would need."""
    checked = notifyd("check-config", "--config", str(EXAMPLE))
    assert checked.returncode == 0, checked.stderr
    assert json.loads(checked.stdout)["auth"]["secret"] == ""
    assert "`notifyd serve` also needs: [auth] secret: required" in checked.stderr


def test_serve_still_needs_a_key_and_refuses_a_weak_one() -> None:
    missing = notifyd("serve", "--port", "1")
    assert missing.returncode == 2
    assert "configuration error: [auth] secret: required for HS*" in missing.stderr
    weak = notifyd("serve", NOTIFYD_AUTH_SECRET="hunter2")
    assert weak.returncode == 2
    assert "[auth] secret: 7 bytes is too short for HS256" in weak.stderr
    assert "hunter2" not in weak.stderr and "Traceback" not in weak.stderr


def test_token_refuses_a_secret_serve_would_refuse() -> None:
    refused = notifyd("token", "--user", "alice", "--secret", "short")
    assert refused.returncode == 2
    assert "notifyd token: secret: 5 bytes is too short for HS256" in refused.stderr
    minted = notifyd("token", "--user", "alice", "--secret", SECRET)
    assert minted.returncode == 0 and minted.stdout.count(".") == 2


async def test_publish_needs_no_secret(make_server: ServerFactory, amqp_url: str) -> None:
    """Issue 13.15: ``notifyd publish`` exited with "[auth] secret: required"."""
    server = await make_server()
    user = new_user()
    ws, _ = await server.connect(user)
    published = await asyncio.create_subprocess_exec(
        *NOTIFYD, "publish", "--user", user, "--event", "hello", "--data", '{"n": 1}',
        env=clean_env(NOTIFYD_AMQP_URL=amqp_url),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(published.communicate(), 60)
    assert published.returncode == 0, err.decode()
    notification = await receive_until(ws, "notification")
    assert (notification["id"], notification["data"]) == (out.decode().strip(), {"n": 1})
    await ws.close()


async def test_upstream_needs_no_secret(make_server: ServerFactory, amqp_url: str) -> None:
    """Issue 13.15: ``notifyd upstream`` exited with "[auth] secret: required"."""
    server = await make_server()
    user = new_user()
    consumer = await asyncio.create_subprocess_exec(
        *NOTIFYD, "upstream", "--user", user,
        env=clean_env(NOTIFYD_AMQP_URL=amqp_url),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert consumer.stdout is not None and consumer.stderr is not None
    try:
        ready = await asyncio.wait_for(consumer.stderr.readline(), 30)
        assert b"listening on notifyd.upstream" in ready
        ws, _ = await server.connect(user)
        await ws.send_json({"type": "send", "event": "position", "data": {"lat": 1}, "ref": 1})
        assert (await receive_until(ws, "sent"))["ref"] == 1
        line = json.loads(await asyncio.wait_for(consumer.stdout.readline(), 10))
        assert (line["user"], line["event"], line["data"]) == (user, "position", {"lat": 1})
        await ws.close()
    finally:
        consumer.terminate()
        await asyncio.wait_for(consumer.wait(), 10)
