"""The KV ledger: reserve, grow, settle and release KV-cache memory per engine, exactly once per request.

Model: SGLang gateway's reservation-based limiter. A reservation is taken at admission (from predicted or
worst-case tokens), grown while tokens stream if the request outlives it, and released exactly once on
completion, error or cancellation. Every operation is idempotent by request id, so a retried call (a network
blip to Redis, a cancelled task re-running its cleanup) can never double-count or double-free.

This pure class is the in-memory ledger (embedded default and the simulator). The Redis store implements the
same operations atomically in Lua; the shared test suite holds both to this behaviour.
Units are tokens: bytes are ``tokens * kv_bytes_per_token`` of the engine's model, rounded to blocks by the
caller, so one ledger serves engines of different models.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class Reservation:
    engine_id: str
    tokens: int


class KVLedger:
    def __init__(self) -> None:
        self._capacity: dict[str, int] = {}
        self._reserved: dict[str, int] = {}
        self._by_request: dict[str, Reservation] = {}

    # ---- capacity -------------------------------------------------------------------------------------
    def set_capacity(self, engine_id: str, tokens: int) -> None:
        if tokens < 0:
            raise ValueError("capacity must be >= 0")
        self._capacity[engine_id] = tokens
        self._reserved.setdefault(engine_id, 0)

    def capacity(self, engine_id: str) -> int:
        return self._capacity.get(engine_id, 0)

    def reserved(self, engine_id: str) -> int:
        return self._reserved.get(engine_id, 0)

    def free(self, engine_id: str) -> int:
        return self.capacity(engine_id) - self.reserved(engine_id)

    def total_reserved(self) -> int:
        return sum(self._reserved.values())

    def reservation(self, request_id: str) -> Reservation | None:
        return self._by_request.get(request_id)

    def __len__(self) -> int:
        return len(self._by_request)

    # ---- operations -----------------------------------------------------------------------------------
    def reserve(self, request_id: str, engine_id: str, tokens: int, force: bool = False) -> bool:
        """Reserve ``tokens`` on ``engine_id`` if it fits. Idempotent: a request that already holds a
        reservation gets True and nothing changes (even if the arguments differ). ``force`` records it even
        when it does not fit (re-adopting a request that already runs there, e.g. after a store outage);
        an engine of unknown capacity is refused either way."""
        if tokens < 0:
            raise ValueError("tokens must be >= 0")
        if request_id in self._by_request:
            return True
        if engine_id not in self._capacity:
            return False
        if not force and self._reserved[engine_id] + tokens > self._capacity[engine_id]:
            return False
        self._reserved[engine_id] += tokens
        self._by_request[request_id] = Reservation(engine_id, tokens)
        return True

    def grow(self, request_id: str, tokens: int, force: bool = False) -> bool:
        """Raise a reservation to ``tokens`` (never lowers it). Without ``force`` it fails when the engine is
        full; with ``force`` it records the overshoot anyway (the engine is already using that memory)."""
        held = self._by_request.get(request_id)
        if held is None:
            return False
        extra = tokens - held.tokens
        if extra <= 0:
            return True
        engine = held.engine_id
        if not force and self._reserved[engine] + extra > self._capacity.get(engine, 0):
            return False
        self._reserved[engine] += extra
        held.tokens = tokens
        return True

    def release(self, request_id: str) -> int:
        """Free a request's reservation; return the tokens freed (0 when already released or never held)."""
        held = self._by_request.pop(request_id, None)
        if held is None:
            return 0
        self._reserved[held.engine_id] -= held.tokens
        return held.tokens
