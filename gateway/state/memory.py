"""In-process state store: the embedded default, and the reference the Redis store is tested against.

Why records go through orjson on the way in and out: the Redis store serialises with orjson, so doing the
same here gives identical semantics (tuples come back as lists, non-JSON values are rejected at write time,
callers get fresh copies and can never mutate stored state or rely on object identity).
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections import OrderedDict
from typing import Any, Callable

import orjson

from gateway.core.ledger import KVLedger
from gateway.state.base import EVICT_LOOKAHEAD, MAX_WORKFLOW_RECORDS, StateStore, check_inflight_s, check_ttl

Clock = Callable[[], float]


def _encode(record: dict[str, Any]) -> bytes:
    """Serialise exactly as the Redis store does (raises TypeError for non-JSON values). Kept as an exact-size
    copy: the bytes ``orjson.dumps`` returns hold its whole 4 KB write buffer (3.13), 15 times a workflow
    record's ~270 bytes, for as long as the record is kept."""
    return bytes(memoryview(orjson.dumps(record)))


# A map sweeps out its expired entries once it has taken this many puts, or as many as it holds if more.
SWEEP_MIN_PUTS = 1024


class _TTLMap:
    """id -> (encoded record, expiry on the store's clock). An expired entry is dropped when read, and all of
    them by a sweep every so many puts (as many as the map holds, so a sweep costs O(1) a put): a key never read
    again (a finished workflow) would otherwise stay for the life of the process."""

    def __init__(self, clock: Clock, max_items: int | None = None) -> None:
        self._clock = clock
        # in the order of their last put, so of their expiry (one TTL a map): the front is dropped first, in O(1)
        # (a dict's "first key" steps over the slots of every key deleted before it: 31 us a new key at the cap)
        self._items: OrderedDict[str, tuple[bytes, float]] = OrderedDict()
        self._puts_since_sweep = 0
        self.max_items = max_items  # None: no bound but the TTLs
        self.dropped = 0  # live records dropped to stay within max_items
        self._ttl: float | None = None  # the TTL of the map's first put; _mixed once another comes
        self._mixed = False

    def put(self, key: str, record: dict[str, Any], ttl_s: float,
            keep: Callable[[bytes], bool] | None = None) -> None:
        """Store ``record`` for ``ttl_s``. At ``max_items``, a new key first drops the expired entries at the front
        (one TTL a map: those are all the expired ones; a whole sweep here would cost O(n) on every new key), then,
        if still at the bound, the least recently put live one, but one whose encoded record ``keep`` says to keep
        only where none of the next EVICT_LOOKAHEAD may go."""
        check_ttl(ttl_s)
        if self._ttl is None:
            self._ttl = ttl_s
        elif ttl_s != self._ttl:
            self._mixed = True
        if key in self._items:
            self._items.move_to_end(key)
        elif self.max_items is not None and len(self._items) >= self.max_items:
            self._make_room(keep)
        self._items[key] = (_encode(record), self._clock() + ttl_s)
        self._puts_since_sweep += 1
        if self._puts_since_sweep >= max(SWEEP_MIN_PUTS, len(self._items)):
            self.sweep()

    def _make_room(self, keep: Callable[[bytes], bool] | None) -> None:
        if self._mixed:  # expired entries may sit behind live ones: all of them go first (O(n), a rare map)
            self.sweep()
        now = self._clock()
        while self._items and now >= next(iter(self._items.values()))[1]:
            self._items.popitem(last=False)  # expired: gone anyway, and no step in flight keeps it
        if len(self._items) >= self.max_items:  # type: ignore[operator]
            victim = next(iter(self._items))
            if keep is not None:
                victim = next((k for k, (blob, _) in itertools.islice(self._items.items(), EVICT_LOOKAHEAD)
                               if not keep(blob)), victim)
            del self._items[victim]
            self.dropped += 1

    def put_back(self, key: str, record: dict[str, Any]) -> None:
        """Replace a live entry's record and keep its expiry (a change that is not activity)."""
        _, expires_at = self._items[key]
        self._items[key] = (_encode(record), expires_at)

    def sweep(self) -> None:
        now = self._clock()
        for key in [k for k, (_, expires_at) in self._items.items() if now >= expires_at]:
            del self._items[key]
        self._puts_since_sweep = 0

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
        self.sweep()
        return {k: orjson.loads(blob) for k, (blob, _) in self._items.items()}

    def delete(self, key: str) -> None:
        self._items.pop(key, None)


def _has_steps_in_flight(blob: bytes) -> bool:
    """Whether an encoded workflow record has a request in flight (orjson writes an empty map as ``{}``)."""
    return b'"inflight":{}' not in blob


def new_workflow(workflow_id: str, now: float) -> dict[str, Any]:
    """A workflow's stored record. ``inflight`` maps each request id to its begin on the store's clock (callers
    get the ids alone, sorted: :func:`_public`)."""
    return {"workflow_id": workflow_id, "arrival": now, "deadline": None, "slo_class": None, "steps_done": 0,
            "tokens_used": 0, "expected_steps": None, "last_step": None, "predicted_remaining_s": None,
            "inflight": {}, "last_activity": now}


def _abandoned(record: dict[str, Any], now: float, inflight_s: float | None) -> list[str]:
    """The ids in flight for longer than ``inflight_s`` (none where it is None)."""
    if inflight_s is None:
        return []
    return [request_id for request_id, begun in record["inflight"].items() if now - begun > inflight_s]


def _public(record: dict[str, Any], now: float, inflight_s: float | None) -> dict[str, Any]:
    """The record as callers get it: ``inflight`` the ids begun within ``inflight_s``, sorted."""
    left_out = set(_abandoned(record, now, inflight_s))
    return dict(record, inflight=sorted(r for r in record["inflight"] if r not in left_out))


class LeasedLedger:
    """:class:`KVLedger` plus leases on the store's clock: a reservation not refreshed in time is released.

    Expiry is lazy (checked at the start of every operation) through a heap of (expiry, request id); a refresh
    pushes a new entry and the stale one is skipped when it surfaces, so each operation costs O(log n).
    The methods are synchronous: the gateway calls them directly on its fast path when the store is local.
    """

    def __init__(self, clock: Clock) -> None:
        self.ledger = KVLedger()
        self._clock = clock
        self._expiry: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []

    def _purge(self) -> None:
        heap = self._heap
        if not heap:
            return
        now = self._clock()
        while heap and heap[0][0] <= now:
            expiry, request_id = heapq.heappop(heap)
            if self._expiry.get(request_id) == expiry:
                del self._expiry[request_id]
                self.ledger.release(request_id)

    def _lease(self, request_id: str, lease_s: float) -> None:
        check_ttl(lease_s)
        expiry = self._clock() + lease_s
        self._expiry[request_id] = expiry
        heapq.heappush(self._heap, (expiry, request_id))

    def set_capacity(self, engine_id: str, tokens: int) -> None:
        self.ledger.set_capacity(engine_id, tokens)

    def reserve(self, request_id: str, engine_id: str, tokens: int, lease_s: float, force: bool = False) -> bool:
        check_ttl(lease_s)
        self._purge()
        held = self.ledger.reservation(request_id) is not None
        if not self.ledger.reserve(request_id, engine_id, tokens, force=force):
            return False
        if not held:
            self._lease(request_id, lease_s)
        return True

    def grow(self, request_id: str, tokens: int, lease_s: float, force: bool = False) -> bool:
        check_ttl(lease_s)
        self._purge()
        if not self.ledger.grow(request_id, tokens, force=force):
            return False
        self._lease(request_id, lease_s)
        return True

    def release(self, request_id: str) -> int:
        self._purge()
        self._expiry.pop(request_id, None)  # its heap entry becomes stale and is skipped
        return self.ledger.release(request_id)

    def refresh(self, request_ids: list[str], lease_s: float) -> int:
        check_ttl(lease_s)
        self._purge()
        held = 0
        for request_id in request_ids:
            if self.ledger.reservation(request_id) is not None:
                self._lease(request_id, lease_s)
                held += 1
        if len(self._heap) > 4 * len(self._expiry) + 64:  # drop stale entries now and then
            self._heap = [(e, r) for r, e in self._expiry.items()]
            heapq.heapify(self._heap)
        return held

    def usage(self, engine_ids: list[str]) -> dict[str, tuple[int, int]]:
        self._purge()
        return {e: (self.ledger.reserved(e), self.ledger.capacity(e)) for e in engine_ids}


class MemoryStateStore(StateStore):
    """Single-process store. ``clock`` is injectable so tests can expire entries without sleeping."""

    def __init__(self, clock: Clock = time.monotonic, max_workflows: int | None = None) -> None:
        if max_workflows is not None and max_workflows < 1:
            raise ValueError(f"max_workflows must be >= 1, got {max_workflows!r}")
        self._clock = clock
        self._engines = _TTLMap(clock)
        self._gateways = _TTLMap(clock)
        self._workflows = _TTLMap(clock, max_items=MAX_WORKFLOW_RECORDS if max_workflows is None else max_workflows)
        self.ledger = LeasedLedger(clock)  # public: the gateway's synchronous fast path uses it directly

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

    async def remove_gateway(self, gateway_id: str) -> None:
        self._gateways.delete(gateway_id)

    # ---- workflows ---------------------------------------------------------------------------------------
    async def workflow_begin(self, workflow_id: str, request_id: str, *, now: float, ttl_s: float,
                             step: int | None = None, deadline: float | None = None, slo_class: str | None = None,
                             expected_steps: int | None = None, predicted_remaining_s: float | None = None,
                             inflight_s: float | None = None) -> dict[str, Any]:
        check_ttl(ttl_s)
        check_inflight_s(inflight_s)
        now = float(now)
        clock = self._clock()
        record = self._workflows.get(workflow_id) or new_workflow(workflow_id, now)
        for abandoned in _abandoned(record, clock, inflight_s):
            del record["inflight"][abandoned]
        record["inflight"].setdefault(request_id, clock)
        if step is not None and (record["last_step"] is None or step > record["last_step"]):
            record["last_step"] = int(step)
        for key, value in (("deadline", deadline), ("slo_class", slo_class), ("expected_steps", expected_steps),
                           ("predicted_remaining_s", predicted_remaining_s)):
            if value is not None:
                record[key] = value if key == "slo_class" else (int(value) if key == "expected_steps"
                                                                 else float(value))
        record["arrival"] = min(now, record["arrival"])  # an earlier step's begin that came late (a replay)
        record["last_activity"] = max(now, record["last_activity"])  # a step's late replay never moves it back
        self._workflows.put(workflow_id, record, ttl_s, keep=_has_steps_in_flight)
        return _public(record, clock, None)

    async def workflow_end(self, workflow_id: str, request_id: str, *, now: float, ttl_s: float, tokens: int = 0,
                           completed: bool = True, inflight_s: float | None = None) -> dict[str, Any] | None:
        check_ttl(ttl_s)
        check_inflight_s(inflight_s)
        record = self._workflows.get(workflow_id)
        if record is None:
            return None
        clock = self._clock()
        abandoned = _abandoned(record, clock, inflight_s)
        for request in abandoned:
            del record["inflight"][request]
        if record["inflight"].pop(request_id, None) is not None:
            record["tokens_used"] += int(tokens)
            if completed:
                record["steps_done"] += 1
            record["last_activity"] = max(float(now), record["last_activity"])
            self._workflows.put(workflow_id, record, ttl_s)
        elif abandoned:
            self._workflows.put_back(workflow_id, record)
        return _public(record, clock, None)

    async def get_workflow(self, workflow_id: str, inflight_s: float | None = None) -> dict[str, Any] | None:
        check_inflight_s(inflight_s)
        record = self._workflows.get(workflow_id)
        return None if record is None else _public(record, self._clock(), inflight_s)

    def expire(self) -> None:
        """Drop every expired record now (puts also do, every so many)."""
        for records in (self._engines, self._gateways, self._workflows):
            records.sweep()

    # ---- shared KV ledger (here: this process only) ------------------------------------------------------
    async def ledger_set_capacity(self, engine_id: str, tokens: int) -> None:
        self.ledger.set_capacity(engine_id, tokens)

    async def ledger_reserve(self, request_id: str, engine_id: str, tokens: int, lease_s: float,
                             force: bool = False) -> bool:
        return self.ledger.reserve(request_id, engine_id, tokens, lease_s, force)

    async def ledger_grow(self, request_id: str, tokens: int, lease_s: float, force: bool = False) -> bool:
        return self.ledger.grow(request_id, tokens, lease_s, force)

    async def ledger_release(self, request_id: str) -> int:
        return self.ledger.release(request_id)

    async def ledger_refresh(self, request_ids: list[str], lease_s: float) -> int:
        return self.ledger.refresh(request_ids, lease_s)

    async def ledger_usage(self, engine_ids: list[str]) -> dict[str, tuple[int, int]]:
        return self.ledger.usage(engine_ids)

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        """Nothing to release; state is kept so a closed-then-reused store behaves like Redis."""
