"""The pool scheduler: one queue per pool, dispatched in policy order under the KV ledger.

Pure and synchronous: ``plan()`` proposes (request, engine, tokens) in policy order from a snapshot of the
engines; the caller performs each reservation (in memory, or atomically in Redis when gateways share engines)
and calls ``admitted()`` for those that succeeded. A proposal that loses a race simply stays queued.
The live gateway and the discrete-event simulator both drive this class, so a simulated result is a result
about the gateway's own code.

Dispatch rule: walk the queue best key first; give each request the engine with the fewest outstanding
requests among those with room (KV tokens free and below ``max_outstanding``). A request that fits nowhere is
skipped so smaller ones behind it can use the space (backfill), except an aged request (tier -1 under
``maestro``): then dispatch stops, so the space it needs is left for it and it cannot starve.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from gateway.core.admission import reservation_tokens
from gateway.core.queue_policy import PolicyContext, QueuePolicy
from gateway.core.request import SchedRequest


@dataclass(slots=True)
class EngineSlot:
    """A snapshot of one engine for dispatch."""

    engine_id: str
    free_tokens: int  # KV tokens not reserved (ignored under admission ``none``)
    outstanding: int  # requests dispatched to it and not finished
    max_outstanding: int = 1 << 30  # cap per engine (e.g. its max_num_seqs plus a small queue)


class PoolScheduler:
    def __init__(self, policy: QueuePolicy, admission: str = "predicted", block_size: int = 16) -> None:
        self.policy = policy
        self.admission = admission
        self.block_size = block_size
        self.waiting: dict[str, SchedRequest] = {}

    def __len__(self) -> int:
        return len(self.waiting)

    def submit(self, request: SchedRequest) -> None:
        request.reserved_tokens = reservation_tokens(self.admission, request, self.block_size)
        self.waiting[request.request_id] = request

    def cancel(self, request_id: str) -> SchedRequest | None:
        """Drop a request that has not been dispatched (client gone). None when it is not waiting."""
        return self.waiting.pop(request_id, None)

    def plan(self, now: float, engines: Sequence[EngineSlot], ctx: PolicyContext
             ) -> list[tuple[SchedRequest, str, int]]:
        """Proposals (request, engine id, tokens to reserve), best first. Does not change the queue."""
        if not self.waiting or not engines:
            return []
        free = {e.engine_id: e.free_tokens for e in engines}
        outstanding = {e.engine_id: e.outstanding for e in engines}
        caps = {e.engine_id: e.max_outstanding for e in engines}
        if all(outstanding[i] >= caps[i] for i in caps):
            return []
        check_kv = self.admission != "none"
        key = self.policy.key
        ordered = sorted(self.waiting.values(), key=lambda r: key(r, now, ctx))
        proposals: list[tuple[SchedRequest, str, int]] = []
        for request in ordered:
            tokens = request.reserved_tokens
            best: str | None = None
            for engine_id in free:
                if outstanding[engine_id] >= caps[engine_id] or (check_kv and free[engine_id] < tokens):
                    continue
                if best is None or (outstanding[engine_id], -free[engine_id]) < (outstanding[best], -free[best]):
                    best = engine_id
            if best is None:
                if key(request, now, ctx)[0] == -1:
                    break  # an aged request waits for room; nothing may overtake it
                continue
            free[best] -= tokens
            outstanding[best] += 1
            proposals.append((request, best, tokens))
        return proposals

    def admitted(self, request: SchedRequest, engine_id: str, now: float) -> None:
        """The reservation for ``request`` on ``engine_id`` succeeded: it leaves the queue."""
        self.waiting.pop(request.request_id, None)
        request.engine_id = engine_id
        request.admitted_at = now
