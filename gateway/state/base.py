"""The state-store contract both stores implement and the shared test suite checks.

Why records are plain dicts of JSON-able values: the Redis store serialises them with orjson, and the memory
store must behave identically (same copies, same TTL expiry), so callers can never depend on object identity.
Every method may raise :class:`StateUnavailable` (Redis down or slow); callers keep serving from local state.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any


class StateUnavailable(RuntimeError):
    """The store could not be reached in time. Serving must go on from local state."""


class StateStore(ABC):
    """Engine state and gateway heartbeats, each with a TTL so dead writers disappear."""

    @abstractmethod
    async def put_engine(self, engine_id: str, record: dict[str, Any], ttl_s: float) -> None:
        """Store (replace) one engine's state; it expires ``ttl_s`` seconds after this write."""

    @abstractmethod
    async def get_engine(self, engine_id: str) -> dict[str, Any] | None:
        """One engine's last record, or None if absent or expired."""

    @abstractmethod
    async def get_engines(self) -> dict[str, dict[str, Any]]:
        """All unexpired engine records by engine id."""

    @abstractmethod
    async def delete_engine(self, engine_id: str) -> None:
        """Forget an engine now (removed from config, drained)."""

    @abstractmethod
    async def heartbeat(self, gateway_id: str, info: dict[str, Any], ttl_s: float) -> None:
        """Announce that a gateway is alive; the entry expires ``ttl_s`` seconds after this call."""

    @abstractmethod
    async def gateways(self) -> dict[str, dict[str, Any]]:
        """All gateways whose heartbeat has not expired, by gateway id."""

    @abstractmethod
    async def ping(self) -> bool:
        """True when the store answers."""

    async def close(self) -> None:
        """Release connections. Idempotent."""
