"""Redis-backed state store, shared by several gateways (or clusters of them).

Layout under ``key_prefix`` (default ``maestro``):

* ``{prefix}:engine:{engine_id}``   orjson record, with a PX TTL (the authority on liveness)
* ``{prefix}:engines``              sorted set of engine ids scored by expiry (epoch ms)
* ``{prefix}:gateway:{gateway_id}`` / ``{prefix}:gateways``  the same for heartbeats

Why a sorted-set index: listing must not use KEYS/SCAN (O(keyspace), blocks a shared Redis). The key's own TTL
decides liveness; the index only has to be a superset, so listing reads ids scored a little in the past (to
tolerate clock skew between writers and readers), MGETs them, and drops ids whose key has already expired.

Why the hard timeouts and zero retries: callers keep serving from local state when Redis is slow or down, so
every call is bounded by ``timeout_s`` in total and failures surface at once as :class:`StateUnavailable`.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Callable
from urllib.parse import urlsplit, urlunsplit

import orjson
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from gateway.state.base import StateStore, StateUnavailable

# How far behind "now" listing still reads the index. Covers clock skew between gateways: an index entry is
# only pruned once it is this much past its expiry, and the key TTL filters anything already dead.
_SKEW_GRACE_MS = 30_000


def _check_ttl(ttl_s: float) -> int:
    """TTL in ms for PX; non-positive TTLs are a caller bug in both stores."""
    if not ttl_s > 0:
        raise ValueError(f"ttl_s must be > 0, got {ttl_s!r}")
    return max(1, round(ttl_s * 1000))


def _redact(url: str) -> str:
    """The URL for error messages, without any password."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        host = parts.hostname or ""
        if parts.port is not None:
            host = f"{host}:{parts.port}"
        user = f"{parts.username}:***@" if parts.username else ":***@"
        return urlunsplit(parts._replace(netloc=user + host))
    except ValueError:
        return "<unparseable redis url>"


class RedisStateStore(StateStore):
    """StateStore on Redis via redis-py asyncio. Constructing does no I/O; the client connects on first use."""

    def __init__(self, url: str, key_prefix: str = "maestro", timeout_s: float = 1.0) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
        self._url = url
        self._prefix = key_prefix
        self._timeout_s = timeout_s
        self._client: aioredis.Redis | None = None
        self._engines_idx = f"{key_prefix}:engines"
        self._gateways_idx = f"{key_prefix}:gateways"

    # ------------------------------------------------------------------ plumbing

    def _redis(self) -> aioredis.Redis:
        """Create the client lazily, so building the store (e.g. at config load) never touches the network."""
        if self._client is None:
            self._client = aioredis.Redis.from_url(
                self._url,
                socket_timeout=self._timeout_s,
                socket_connect_timeout=self._timeout_s,
                # redis-py retries 10 times by default, which would multiply the bound; fail fast instead.
                retry=Retry(NoBackoff(), 0),
            )
        return self._client

    def _unavailable(self, op: str, exc: BaseException) -> StateUnavailable:
        detail = "timed out" if isinstance(exc, TimeoutError) else f"{type(exc).__name__}: {exc}"
        return StateUnavailable(
            f"Redis state store at {_redact(self._url)} unavailable during {op} "
            f"(timeout {self._timeout_s:g}s): {detail}"
        )

    def _engine_key(self, engine_id: str) -> str:
        return f"{self._prefix}:engine:{engine_id}"

    def _gateway_key(self, gateway_id: str) -> str:
        return f"{self._prefix}:gateway:{gateway_id}"

    async def _put(self, op: str, key: str, index: str, member: str, record: dict[str, Any], ttl_s: float) -> None:
        """SET key PX ttl + ZADD index, in one MULTI so the index never misses a live key."""
        ttl_ms = _check_ttl(ttl_s)
        blob = orjson.dumps(record)  # TypeError for non-JSON values, before any I/O
        expires_ms = int(time.time() * 1000) + ttl_ms
        try:
            async with asyncio.timeout(self._timeout_s):
                async with self._redis().pipeline(transaction=True) as pipe:
                    pipe.set(key, blob, px=ttl_ms)
                    pipe.zadd(index, {member: expires_ms})
                    await pipe.execute()
        except (RedisError, OSError) as exc:  # builtin TimeoutError is an OSError
            raise self._unavailable(op, exc) from exc

    async def _list(self, op: str, index: str, key_of: Callable[[str], str]) -> dict[str, dict[str, Any]]:
        """Prune long-dead index entries, read the rest, keep those whose key still exists."""
        floor_ms = int(time.time() * 1000) - _SKEW_GRACE_MS
        try:
            async with asyncio.timeout(self._timeout_s):
                client = self._redis()
                async with client.pipeline(transaction=False) as pipe:
                    pipe.zremrangebyscore(index, "-inf", f"({floor_ms}")
                    pipe.zrangebyscore(index, floor_ms, "+inf")
                    _, raw_ids = await pipe.execute()
                if not raw_ids:
                    return {}
                ids = [m.decode() if isinstance(m, bytes) else m for m in raw_ids]
                blobs = await client.mget([key_of(i) for i in ids])
        except (RedisError, OSError) as exc:
            raise self._unavailable(op, exc) from exc
        return {i: orjson.loads(b) for i, b in zip(ids, blobs) if b is not None}

    # ------------------------------------------------------------------ StateStore

    async def put_engine(self, engine_id: str, record: dict[str, Any], ttl_s: float) -> None:
        await self._put("put_engine", self._engine_key(engine_id), self._engines_idx, engine_id, record, ttl_s)

    async def get_engine(self, engine_id: str) -> dict[str, Any] | None:
        try:
            async with asyncio.timeout(self._timeout_s):
                blob = await self._redis().get(self._engine_key(engine_id))
        except (RedisError, OSError) as exc:
            raise self._unavailable("get_engine", exc) from exc
        return None if blob is None else orjson.loads(blob)

    async def get_engines(self) -> dict[str, dict[str, Any]]:
        return await self._list("get_engines", self._engines_idx, self._engine_key)

    async def delete_engine(self, engine_id: str) -> None:
        try:
            async with asyncio.timeout(self._timeout_s):
                async with self._redis().pipeline(transaction=True) as pipe:
                    pipe.delete(self._engine_key(engine_id))
                    pipe.zrem(self._engines_idx, engine_id)
                    await pipe.execute()
        except (RedisError, OSError) as exc:
            raise self._unavailable("delete_engine", exc) from exc

    async def heartbeat(self, gateway_id: str, info: dict[str, Any], ttl_s: float) -> None:
        await self._put("heartbeat", self._gateway_key(gateway_id), self._gateways_idx, gateway_id, info, ttl_s)

    async def gateways(self) -> dict[str, dict[str, Any]]:
        return await self._list("gateways", self._gateways_idx, self._gateway_key)

    async def ping(self) -> bool:
        """Health probe: never raises, False on any failure within ``timeout_s``."""
        try:
            async with asyncio.timeout(self._timeout_s):
                return bool(await self._redis().ping())
        except (RedisError, OSError):
            return False

    async def close(self) -> None:
        """Drop the client and its pool. Idempotent; a later call reconnects lazily."""
        client, self._client = self._client, None
        if client is None:
            return
        closer = getattr(client, "aclose", None) or client.close
        try:
            await closer()
        except (RedisError, OSError):
            pass  # closing a connection to a dead server is not an error worth surfacing
