"""Web Push subscriptions: one SQL layer over SQLite or PostgreSQL.

One schema and one set of queries serve both databases. Each query is written once
with numbered parameters ``{1}``, ``{2}``..., rendered as ``?1`` for SQLite and
``$1`` for PostgreSQL (both number their parameters natively, so a query may use one
twice and none are reordered). The drivers differ only below :class:`_Database`:

- SQLite: the standard library's ``sqlite3`` on one connection owned by one thread
  (a single-worker executor), so the event loop never waits on the disk. WAL mode
  and a busy timeout let the gateway and ``notifyd webpush`` share the file.
- PostgreSQL: ``asyncpg``, natively asynchronous, with a small connection pool.

An endpoint URL identifies one browser's subscription: registering it again (the
same browser, maybe another user after a log-out) replaces the row.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import sqlite3
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import redact_url
from .errors import ConfigError

log = logging.getLogger(__name__)

TABLE = "notifyd_push_subscriptions"

SCHEMA = (
    f"""CREATE TABLE IF NOT EXISTS {TABLE} (
        endpoint TEXT PRIMARY KEY,
        user_id TEXT NOT NULL,
        p256dh TEXT NOT NULL,
        auth TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL
    )""",
    f"CREATE INDEX IF NOT EXISTS {TABLE}_user ON {TABLE} (user_id, updated_at)",
)

_UPSERT = f"""INSERT INTO {TABLE} (endpoint, user_id, p256dh, auth, created_at, updated_at)
    VALUES ({{1}}, {{2}}, {{3}}, {{4}}, {{5}}, {{5}})
    ON CONFLICT (endpoint) DO UPDATE SET user_id = excluded.user_id,
        p256dh = excluded.p256dh, auth = excluded.auth, updated_at = excluded.updated_at"""
#: Keeps a user's newest ``{2}`` subscriptions (ties broken by endpoint).
_TRIM = f"""DELETE FROM {TABLE} WHERE user_id = {{1}} AND endpoint NOT IN (
    SELECT endpoint FROM {TABLE} WHERE user_id = {{1}}
    ORDER BY updated_at DESC, endpoint LIMIT {{2}})"""
_FOR_USER = f"""SELECT endpoint, user_id, p256dh, auth FROM {TABLE}
    WHERE user_id = {{1}} ORDER BY updated_at DESC, endpoint"""
_REMOVE = f"DELETE FROM {TABLE} WHERE endpoint = {{1}} AND user_id = {{2}}"
#: Only the row with these keys: one re-registered meanwhile is a new subscription.
_EXPIRE = f"DELETE FROM {TABLE} WHERE endpoint = {{1}} AND p256dh = {{2}}"
_COUNT = f"SELECT COUNT(*) FROM {TABLE}"


@dataclass(frozen=True, slots=True)
class Subscription:
    """A browser's PushSubscription: where to post, and the keys to encrypt for."""

    endpoint: str
    user: str
    p256dh: str
    auth: str


Statement = tuple[str, Sequence[Any]]


class _Database:
    """What the store needs from a driver: statements in one transaction, and reads."""

    placeholder = "?"

    def render(self, sql: str) -> str:
        return re.sub(r"\{(\d+)\}", lambda m: f"{self.placeholder}{m.group(1)}", sql)

    async def open(self) -> None:
        raise NotImplementedError

    async def execute(self, statements: Sequence[Statement]) -> list[int]:
        """Run ``statements`` in one transaction; their row counts."""
        raise NotImplementedError

    async def fetch(self, sql: str, args: Sequence[Any]) -> list[tuple[Any, ...]]:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError


class _Sqlite(_Database):
    placeholder = "?"

    def __init__(self, path: str) -> None:
        self.path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="notifyd-sqlite")
        self._connection: sqlite3.Connection | None = None

    async def _call(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _connect(self) -> None:
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        # Autocommit mode; transactions are explicit (BEGIN IMMEDIATE: take the write
        # lock first, so two processes never deadlock upgrading a read lock).
        connection = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=10
        )
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")
        self._connection = connection

    async def open(self) -> None:
        await self._call(self._connect)

    def _execute(self, statements: Sequence[Statement]) -> list[int]:
        connection = self._connection
        assert connection is not None
        counts = []
        connection.execute("BEGIN IMMEDIATE")
        try:
            for sql, args in statements:
                counts.append(connection.execute(self.render(sql), tuple(args)).rowcount)
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        connection.execute("COMMIT")
        return counts

    async def execute(self, statements: Sequence[Statement]) -> list[int]:
        counts: list[int] = await self._call(self._execute, statements)
        return counts

    def _fetch(self, sql: str, args: Sequence[Any]) -> list[tuple[Any, ...]]:
        assert self._connection is not None
        return list(self._connection.execute(self.render(sql), tuple(args)).fetchall())

    async def fetch(self, sql: str, args: Sequence[Any]) -> list[tuple[Any, ...]]:
        rows: list[tuple[Any, ...]] = await self._call(self._fetch, sql, args)
        return rows

    def _close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    async def close(self) -> None:
        await self._call(self._close)
        self._executor.shutdown(wait=True)


class _Postgres(_Database):
    placeholder = "$"

    def __init__(self, url: str) -> None:
        self.url = url
        self._pool: Any = None

    async def open(self) -> None:
        import asyncpg

        self._pool = await asyncpg.create_pool(self.url, min_size=1, max_size=4, timeout=10)

    async def execute(self, statements: Sequence[Statement]) -> list[int]:
        counts = []
        async with self._pool.acquire() as connection, connection.transaction():
            for sql, args in statements:
                status = await connection.execute(self.render(sql), *args)
                # "DELETE 2", "INSERT 0 1", "CREATE TABLE": the count is the last word.
                last = str(status).rsplit(" ", 1)[-1]
                counts.append(int(last) if last.isdigit() else 0)
        return counts

    async def fetch(self, sql: str, args: Sequence[Any]) -> list[tuple[Any, ...]]:
        rows = await self._pool.fetch(self.render(sql), *args)
        return [tuple(row) for row in rows]

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None


def sqlite_path(url: str) -> str:
    """``sqlite:///relative/path`` or ``sqlite:////absolute/path`` (SQLAlchemy's form)."""
    path = url.removeprefix("sqlite://")
    if not path.startswith("/") or len(path) < 2:
        raise ConfigError(f"[webpush] database_url: expected sqlite:///PATH, got {url!r}")
    return path[1:]


class PushStore:
    """Subscriptions by user, in the database ``[webpush] database_url`` names."""

    def __init__(self, url: str, max_per_user: int = 10) -> None:
        self.url = url
        self.max_per_user = max_per_user
        self.db: _Database
        if url.startswith("sqlite://"):
            self.db = _Sqlite(sqlite_path(url))
        elif url.startswith(("postgresql://", "postgres://")):
            self.db = _Postgres(url)
        else:
            raise ConfigError(f"[webpush] database_url: unsupported {redact_url(url)!r}")

    @property
    def kind(self) -> str:
        return "sqlite" if isinstance(self.db, _Sqlite) else "postgresql"

    async def open(self) -> PushStore:
        """Connect and create the table if it is missing (idempotent)."""
        await self.db.open()
        try:
            try:
                await self.db.execute([(sql, ()) for sql in SCHEMA])
            except Exception:
                # Two processes creating the table at the same moment: PostgreSQL lets
                # one of them fail (a unique violation in its catalog). Once more.
                await asyncio.sleep(0.2)
                await self.db.execute([(sql, ()) for sql in SCHEMA])
        except BaseException:
            await self.db.close()
            raise
        return self

    async def close(self) -> None:
        await self.db.close()

    async def add(self, subscription: Subscription, now: float | None = None) -> None:
        """Store (or replace) ``subscription``; past the per-user cap, the oldest go."""
        now = time.time() if now is None else now
        s = subscription
        await self.db.execute([
            (_UPSERT, (s.endpoint, s.user, s.p256dh, s.auth, now)),
            (_TRIM, (s.user, self.max_per_user)),
        ])  # fmt: skip

    async def remove(self, user: str, endpoint: str) -> bool:
        """Delete ``user``'s subscription at ``endpoint``; whether there was one."""
        (count,) = await self.db.execute([(_REMOVE, (endpoint, user))])
        return count > 0

    async def expire(self, subscription: Subscription) -> bool:
        """Delete a subscription its push service says is gone (404/410)."""
        (count,) = await self.db.execute([(_EXPIRE, (subscription.endpoint, subscription.p256dh))])
        return count > 0

    async def for_user(self, user: str) -> list[Subscription]:
        rows = await self.db.fetch(_FOR_USER, (user,))
        return [Subscription(endpoint=r[0], user=r[1], p256dh=r[2], auth=r[3]) for r in rows]

    async def count(self) -> int:
        ((count,),) = await self.db.fetch(_COUNT, ())
        return int(count)


async def open_until_done(
    url: str, max_per_user: int, stopping: asyncio.Event, retry_max: float = 30.0
) -> PushStore | None:
    """Open the store, retrying with backoff while the database is unreachable (it
    may start after notifyd); None when ``stopping`` is set first. A bad URL raises."""
    delay = 0.5
    while not stopping.is_set():
        store = PushStore(url, max_per_user)
        try:
            return await store.open()
        except (ConfigError, ImportError):
            raise
        except Exception as exc:
            log.warning(
                "push subscriptions database %s unavailable (%s: %s); retrying in %.0fs",
                redact_url(url),
                type(exc).__name__,
                exc,
                delay,
            )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), delay)
        delay = min(retry_max, delay * 2)
    return None


@contextlib.asynccontextmanager
async def open_store(url: str, max_per_user: int = 10) -> AsyncIterator[PushStore]:
    """``async with open_store(url) as store``: opened, and closed at the end."""
    store = await PushStore(url, max_per_user).open()
    try:
        yield store
    finally:
        await store.close()
