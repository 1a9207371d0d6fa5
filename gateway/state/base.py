"""The state-store contract both stores implement and the shared test suite checks.

Why records are plain dicts of JSON-able values: the Redis store serialises them with orjson, and the memory
store must behave identically (same copies, same TTL expiry), so callers can never depend on object identity.
Every method may raise :class:`StateUnavailable` (Redis down or slow); callers keep serving from local state.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any


# Workflow records a store keeps at most (state.max_workflows; about 1 kB each, 1.25 kB with ids of the longest
# length): a client sending a new X-Workflow-Id with every request added one per request for workflow_ttl_s
# (1 h), 100 to 125 MB per 100,000. Past
# this, the least recently active is dropped for each new one (its workflow, if it goes on, starts a new record:
# scheduled as a new workflow).
MAX_WORKFLOW_RECORDS = 100_000
# Records looked at, least recently active first, for one without a step in flight to drop (a workflow whose step
# is running keeps its record, unless all of these have one); Redis drops at most this many in one begin.
EVICT_LOOKAHEAD = 100


class StateUnavailable(RuntimeError):
    """The store could not be reached in time. Serving must go on from local state."""


# The largest integer the stores keep exactly: Redis's scripts hold numbers as Lua doubles (a workflow's steps and
# tokens, the ledger's sums), where 2**53 + 1 reads as 2**53.
MAX_EXACT_INTEGER = 2**53 - 1

# The longest TTL or lease a store takes (ten years): Redis keeps expiries as 64-bit milliseconds and its scripts'
# numbers as doubles, and a 1e20 s TTL there was an error that read as Redis being down.
MAX_TTL_S = 10 * 365 * 86400.0


def check_ttl(ttl_s: float) -> None:
    """Both stores refuse a TTL or lease that is not a number of seconds in (0, ``MAX_TTL_S``]."""
    if not 0 < ttl_s <= MAX_TTL_S:  # written so that NaN fails
        raise ValueError(f"ttl_s must be > 0 and at most {MAX_TTL_S:g} s, got {ttl_s!r}")


def check_inflight_s(inflight_s: float | None) -> None:
    """Both stores refuse an ``inflight_s`` (see the workflow calls below) that is not a finite number > 0."""
    if inflight_s is not None and not 0 < inflight_s < math.inf:
        raise ValueError(f"inflight_s must be a finite number > 0, got {inflight_s!r}")


class StateStore(ABC):
    """Engine state, gateway heartbeats, workflow records and the shared KV ledger, each with a TTL so dead
    writers disappear.

    Workflow records (``workflow_*``) are plain dicts::

        {"workflow_id", "arrival", "deadline", "slo_class", "steps_done", "tokens_used", "expected_steps",
         "last_step", "predicted_remaining_s", "inflight": [request ids, sorted], "last_activity"}

    Times are whatever clock the caller passes as ``now`` (the gateway uses epoch seconds, so deadlines in
    epoch ms from clients compare directly); the store only uses its own clock for TTLs. ``begin``/``end`` are
    idempotent by request id, so a step counts once even when a call is retried.

    The ledger (``ledger_*``) has the semantics of :class:`gateway.core.ledger.KVLedger` (reserve only if it
    fits, grow never lowers, release exactly once, all idempotent by request id) plus a *lease*: a reservation
    not refreshed within ``lease_s`` disappears, so a dead gateway's reservations free themselves.
    """

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
    async def remove_gateway(self, gateway_id: str) -> None:
        """Forget a gateway now (it stopped): the others stop counting it at once, not when its heartbeat expires."""

    # ---- workflows --------------------------------------------------------------------------------------
    #
    # ``inflight_s`` (all three calls): a request id in flight longer than this, by the store's own clock since
    # its begin, is taken as abandoned and leaves ``inflight`` (begin and end drop it from the record, get only
    # leaves it out); None keeps every id until its end. Why: an id whose end never comes (its gateway died,
    # or an outage's backlog of ends outgrew its bound) otherwise stays for as long as the workflow goes on,
    # since every step renews the record's TTL, and the scheduler counts it as a step still running. The end
    # of a dropped id counts nothing (as a repeated end), so ``inflight_s`` must exceed any request's life.

    @abstractmethod
    async def workflow_begin(self, workflow_id: str, request_id: str, *, now: float, ttl_s: float,
                             step: int | None = None, deadline: float | None = None, slo_class: str | None = None,
                             expected_steps: int | None = None, predicted_remaining_s: float | None = None,
                             inflight_s: float | None = None) -> dict[str, Any]:
        """A step of ``workflow_id`` starts: create the record on first sight (``arrival = now``), add
        ``request_id`` to ``inflight`` (once: a repeated begin keeps its first begin time), overwrite the fields
        given (not None; ``last_step`` only rises), refresh the TTL; return the record."""

    @abstractmethod
    async def workflow_end(self, workflow_id: str, request_id: str, *, now: float, ttl_s: float, tokens: int = 0,
                           completed: bool = True, inflight_s: float | None = None) -> dict[str, Any] | None:
        """A step ends: if ``request_id`` is in flight, remove it, add ``tokens`` to ``tokens_used`` and, when
        ``completed``, count a step done (a repeated call changes nothing). None if the record is gone."""

    @abstractmethod
    async def get_workflow(self, workflow_id: str, inflight_s: float | None = None) -> dict[str, Any] | None:
        """One workflow's record, or None if absent or expired."""

    # ---- shared KV ledger -------------------------------------------------------------------------------
    @abstractmethod
    async def ledger_set_capacity(self, engine_id: str, tokens: int) -> None:
        """An engine's KV capacity in tokens (re-set periodically by every gateway that serves it)."""

    @abstractmethod
    async def ledger_reserve(self, request_id: str, engine_id: str, tokens: int, lease_s: float,
                             force: bool = False) -> bool:
        """Reserve atomically if it fits (``force``: even if not); True if held afterwards (idempotent)."""

    @abstractmethod
    async def ledger_grow(self, request_id: str, tokens: int, lease_s: float, force: bool = False) -> bool:
        """Raise a held reservation to ``tokens`` (never lowers) and refresh its lease; False if not held, or
        (without ``force``) if the engine is full."""

    @abstractmethod
    async def ledger_release(self, request_id: str) -> int:
        """Free a reservation; the tokens freed, 0 when not held (already released or expired)."""

    @abstractmethod
    async def ledger_refresh(self, request_ids: list[str], lease_s: float) -> int:
        """Extend the leases of the reservations still held; return how many were."""

    async def ledger_refresh_lapsed(self, request_ids: list[str], lease_s: float) -> list[str]:
        """:meth:`ledger_refresh`, returning the ids no longer held (lapsed, or released meanwhile). A store that
        only counts them answers all of them when any lapsed."""
        held = await self.ledger_refresh(request_ids, lease_s)
        return [] if held == len(request_ids) else list(request_ids)

    @abstractmethod
    async def ledger_usage(self, engine_ids: list[str]) -> dict[str, tuple[int, int]]:
        """``{engine: (reserved, capacity)}`` (capacity 0 when unknown), expired leases dropped first."""

    async def ledger_reserved(self, engine_id: str) -> int:
        return (await self.ledger_usage([engine_id]))[engine_id][0]

    async def ledger_capacity(self, engine_id: str) -> int:
        return (await self.ledger_usage([engine_id]))[engine_id][1]

    @abstractmethod
    async def ping(self) -> bool:
        """True when the store answers."""

    async def close(self) -> None:
        """Release connections. Idempotent."""
