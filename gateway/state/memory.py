"""In-process state store: the embedded default, and the reference the Redis store is tested against.

Why records go through orjson on the way in and out: the Redis store serialises with orjson, so doing the
same here gives identical semantics (tuples come back as lists, non-JSON values are rejected at write time,
callers get fresh copies and can never mutate stored state or rely on object identity).
"""

from __future__ import annotations

import time
from typing import Any, Callable

import orjson

from gateway.state.base import StateStore

Clock = Callable[[], float]


def _encode(record: dict[str, Any]) -> bytes:
    """Serialise exactly as the Redis store does (raises TypeError for non-JSON values)."""
    return orjson.dumps(record)


def _check_ttl(ttl_s: float) -> None:
    """Both stores reject non-positive TTLs (Redis PX would refuse them anyway)."""
    if not ttl_s > 0:
        raise ValueError(f"ttl_s must be > 0, got {ttl_s!r}")


class _TTLMap:
    """id -> (encoded record, expiry on the store's clock); expired entries are purged lazily on access."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._items: dict[str, tuple[bytes, float]] = {}

    def put(self, key: str, record: dict[str, Any], ttl_s: float) -> None:
        _check_ttl(ttl_s)
        self._items[key] = (_encode(record), self._clock() + ttl_s)

    def get(self, key: str) -> dict[str, Any] | None:
        item = self._items.get(key)
        if item is None:
            return None
        blob, expires_at = item
        if self._clock() >= expires_at:
            del self._items[key]
            return None
        return orjson.loads(blob)

    def all(self) -> dict[str, dict[str, Any]]:
        now = self._clock()
        expired = [k for k, (_, exp) in self._items.items() if now >= exp]
        for k in expired:
            del self._items[k]
        return {k: orjson.loads(blob) for k, (blob, _) in self._items.items()}

    def delete(self, key: str) -> None:
        self._items.pop(key, None)


class MemoryStateStore(StateStore):
    """Single-process store. ``clock`` is injectable so tests can expire entries without sleeping."""

    def __init__(self, clock: Clock = time.monotonic) -> None:
        self._engines = _TTLMap(clock)
        self._gateways = _TTLMap(clock)

    async def put_engine(self, engine_id: str, record: dict[str, Any], ttl_s: float) -> None:
        self._engines.put(engine_id, record, ttl_s)

    async def get_engine(self, engine_id: str) -> dict[str, Any] | None:
        return self._engines.get(engine_id)

    async def get_engines(self) -> dict[str, dict[str, Any]]:
        return self._engines.all()

    async def delete_engine(self, engine_id: str) -> None:
        self._engines.delete(engine_id)

    async def heartbeat(self, gateway_id: str, info: dict[str, Any], ttl_s: float) -> None:
        self._gateways.put(gateway_id, info, ttl_s)

    async def gateways(self) -> dict[str, dict[str, Any]]:
        return self._gateways.all()

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        """Nothing to release; state is kept so a closed-then-reused store behaves like Redis."""
