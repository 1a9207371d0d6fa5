"""The discrete-event simulator's pool queues: :class:`FastPool` (the default) and :class:`ReferencePool`.

:class:`FastPool` keeps :class:`~gateway.core.scheduler.PoolScheduler`'s semantics (same proposals, same order;
checked against it on random cases) but does not re-sort the whole queue at every dispatch: the fcfs and edf keys
never change, and the maestro and lsf orders within a tier do not either; tiers change at times it computes (and
re-checks with the policy's own ``key``). The simulator's ``reference=True`` uses :class:`ReferencePool`, the plain
:class:`PoolScheduler`, instead (slower; for tests and for policies FastPool does not know).
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections.abc import Sequence
from typing import Any

from gateway.core.admission import reservation_tokens
from gateway.core.queue_policy import EDF, FCFS, LeastSlackFirst, PolicyContext, edf_due, slack_due
from gateway.core.request import SchedRequest
from gateway.core.scheduler import EngineSlot, PoolScheduler

INF = math.inf
TIMER_HEAP_SLACK = 1024  # stale queue timers allowed beyond twice the queued requests before the heap is rebuilt


def supports_fast(policy: Any) -> bool:
    """FastPool can order this policy: a built-in one, or one with ``order(request, now, ctx) -> (key,
    valid_until)`` whose key does not change before ``valid_until`` unless the workflow's state changes."""
    return type(policy) in (FCFS, EDF, LeastSlackFirst) or callable(getattr(policy, "order", None))


class FastPool:
    """:class:`PoolScheduler`'s ``plan``/``admitted`` semantics for ``fcfs``, ``edf``, ``lsf`` and any policy with
    an ``order`` method (``maestro``), with incrementally ordered queues instead of a full sort per dispatch.

    Order: a sorted list per tier of static keys. fcfs ``(arrival, id)`` and edf ``(due, arrival, id)`` never
    change. ``order`` policies give their key and the time it stays valid. lsf: tier -1 ``(arrival, id)``; tier 0
    ``(due, arrival, id)``; tier 1 by slack ``due - now - work``, i.e. by ``due - work`` (``now`` is common to all);
    tier 2 by ``-slack``, i.e. by
    ``-(due - work)``. A request changes tier only at computable times (aging at ``arrival + max_wait_s``,
    infeasibility at ``due - work``): a timer re-classifies it with the policy's own ``key`` then. A workflow's
    remaining work changes when it releases a step: :meth:`rekey_workflow` re-classifies its queued steps.
    The dispatch walk is the same as ``plan``'s; it stops as soon as nothing more can be placed (every engine
    full, or no queued reservation fits the largest free space).
    """

    def __init__(self, policy: Any, admission: str, block_size: int, ctx: PolicyContext) -> None:
        if not supports_fast(policy):
            raise TypeError(f"FastPool does not know policy {getattr(policy, 'name', policy)!r}")
        self.policy = policy
        self.kind = policy.name if type(policy) in (FCFS, EDF, LeastSlackFirst) else "order"
        self.admission = admission
        self.block_size = block_size
        self.ctx = ctx
        self.check_kv = admission != "none"
        self.tiers: dict[int, list[tuple]] = {}
        self._tier_order: list[int] = []
        self.where: dict[str, tuple[int, tuple]] = {}
        self.waiting: dict[str, SchedRequest] = {}
        self.tokens: list[int] = []  # sorted multiset of the queued requests' reservations
        self.timers: list[tuple[float, int, str, int]] = []
        self.version: dict[str, int] = {}
        self.by_workflow: dict[str, set[str]] = {}
        self.tier_work: dict[int, float] = {}  # predicted service seconds queued per tier
        self._seq = 0

    def work_ahead(self, r: SchedRequest, now: float) -> float:
        """Predicted service seconds queued in ``r``'s tier and the better ones (what it would wait behind)."""
        if self.kind in ("fcfs", "edf"):
            return sum(self.tier_work.values())
        self._fire_timers(now)  # queued requests whose tier changed by now count in their new tier
        tier = self._classify(r, now)[0]
        return sum(w for t, w in self.tier_work.items() if t <= tier)

    def __len__(self) -> int:
        return len(self.waiting)

    # -- ordering ---------------------------------------------------------------------------------------------
    def _classify(self, r: SchedRequest, now: float) -> tuple[int, tuple, float]:
        kind = self.kind
        if kind == "fcfs":
            return 0, (r.arrival, r.request_id), INF
        if kind == "edf":
            return 0, (edf_due(r), r.arrival, r.request_id), INF
        policy = self.policy
        if kind == "order":
            key, until = policy.order(r, now, self.ctx)
            return key[0], key[1:], until
        tier = policy.key(r, now, self.ctx)[0]
        aging = r.arrival + policy.max_wait_s
        if tier == -1:
            return -1, (r.arrival, r.request_id), INF
        if tier == 0:
            return 0, (slack_due(r), r.arrival, r.request_id), aging
        x = slack_due(r) - policy.remaining_work(r, self.ctx)
        if tier == 1:
            return 1, (x, r.arrival, r.request_id), min(aging, x)
        return 2, (-x, r.arrival, r.request_id), aging

    def _insert(self, r: SchedRequest, now: float) -> None:
        tier, key, nxt = self._classify(r, now)
        item = (key, r)
        lst = self.tiers.get(tier)
        if lst is None:
            lst = self.tiers[tier] = []
            self._tier_order = sorted(self.tiers)
        bisect.insort(lst, item)
        self.where[r.request_id] = (tier, key)
        self.tier_work[tier] = self.tier_work.get(tier, 0.0) + self.ctx.service_time(r)
        if nxt < INF:
            v = self.version.get(r.request_id, 0) + 1
            self.version[r.request_id] = v
            self._seq += 1
            heapq.heappush(self.timers, (max(nxt, math.nextafter(now, INF)), self._seq, r.request_id, v))
            if len(self.timers) > 2 * len(self.waiting) + TIMER_HEAP_SLACK:
                self._drop_stale_timers()

    def _drop_stale_timers(self) -> None:
        """Keep only the timers that can still fire: each re-key leaves its request's earlier timer in the heap
        until it is due, and under deep overload (queues of thousands, re-keyed as the mean step time drifts) the
        stale ones piled up (the scale audit put them at about a third of a 3-hour overloaded run's 1.4 GB). The
        heap order is (time, sequence), so the timers that fire, and their order, are the same."""
        version, waiting = self.version, self.waiting
        timers = self.timers  # in place: _fire_timers holds this list while it re-keys
        timers[:] = [timer for timer in timers if version.get(timer[2]) == timer[3] and timer[2] in waiting]
        heapq.heapify(timers)

    def _remove(self, r: SchedRequest) -> None:
        tier, key = self.where.pop(r.request_id)
        self.tier_work[tier] -= self.ctx.service_time(r)
        lst = self.tiers[tier]
        i = bisect.bisect_left(lst, (key,))
        del lst[i]

    def _fire_timers(self, now: float) -> None:
        timers = self.timers
        while timers and timers[0][0] <= now:
            _, _, rid, v = heapq.heappop(timers)
            if self.version.get(rid) != v or rid not in self.waiting:
                continue
            r = self.waiting[rid]
            old = self.where[rid]
            tier, key, nxt = self._classify(r, now)
            if tier == old[0] and key == old[1]:  # floating-point edge: not yet; look again just after now
                self._seq += 1
                heapq.heappush(timers, (max(nxt, math.nextafter(now, INF)), self._seq, rid, v))
                continue
            self._remove(r)
            self._insert(r, now)

    # -- PoolScheduler interface ------------------------------------------------------------------------------
    def submit(self, r: SchedRequest, now: float) -> None:
        r.reserved_tokens = reservation_tokens(self.admission, r, self.block_size)
        self.waiting[r.request_id] = r
        bisect.insort(self.tokens, r.reserved_tokens)
        if r.workflow_id is not None:
            self.by_workflow.setdefault(r.workflow_id, set()).add(r.request_id)
        self._insert(r, now)

    def rekey_workflow(self, workflow_id: str, now: float) -> None:
        """The workflow's state changed (a step released or finished): re-classify its queued steps."""
        if self.kind in ("fcfs", "edf"):
            return
        for rid in self.by_workflow.get(workflow_id, ()):
            r = self.waiting[rid]
            self._remove(r)
            self._insert(r, now)

    def rekey_all(self, now: float) -> None:
        """The mean step time changed: re-classify the queued workflow steps whose key depends on it (not aged
        ones: aging is for good). The learned mean moves slowly, so this is rare (under 200 times in an hour of
        E1 at load 9) and a removal and an insertion per request is fast enough."""
        if self.kind in ("fcfs", "edf"):
            return
        for rid in [rid for ids in self.by_workflow.values() for rid in ids if self.where[rid][0] != -1]:
            r = self.waiting[rid]
            self._remove(r)
            self._insert(r, now)

    def admitted(self, r: SchedRequest, engine_id: str, now: float) -> None:
        self.waiting.pop(r.request_id)
        self._remove(r)
        self.version.pop(r.request_id, None)
        del self.tokens[bisect.bisect_left(self.tokens, r.reserved_tokens)]
        if r.workflow_id is not None:
            ids = self.by_workflow.get(r.workflow_id)
            if ids is not None:
                ids.discard(r.request_id)
                if not ids:
                    del self.by_workflow[r.workflow_id]
        r.engine_id = engine_id
        r.admitted_at = now

    def plan_arrays(self, now: float, ids: Sequence[str], free: Sequence[int], outstanding: Sequence[int],
                    caps: Sequence[int]) -> list[tuple[SchedRequest, str, int]]:
        """``PoolScheduler.plan`` over engines given as parallel lists (ids, free tokens, outstanding, caps)."""
        if not self.waiting:
            return []
        open_ = [i for i in range(len(ids)) if outstanding[i] < caps[i]]
        if not open_:
            return []
        if self.timers:
            self._fire_timers(now)
        free = list(free)
        out = list(outstanding)
        check_kv = self.check_kv
        placed: list[int] = []
        proposals: list[tuple[SchedRequest, str, int]] = []
        tokens_sorted = self.tokens
        if check_kv:
            maxfree = max(free[i] for i in open_)
            # queued requests not visited yet that fit in maxfree (those skipped are all larger than it)
            fit_left = bisect.bisect_right(tokens_sorted, maxfree)
            if fit_left == 0:
                return proposals
        else:
            maxfree = fit_left = 0
        for tier in self._tier_order:
            lst = self.tiers[tier]
            if not lst:
                continue
            aged = tier == -1
            for _, r in lst:
                tokens = r.reserved_tokens
                if check_kv and tokens > maxfree:
                    if aged:
                        return proposals
                    continue
                best = -1
                for i in open_:
                    fi = free[i]
                    if check_kv and fi < tokens:
                        continue
                    if best < 0 or out[i] < out[best] or (out[i] == out[best] and fi > free[best]):
                        best = i
                free[best] -= tokens
                out[best] += 1
                placed.append(tokens)
                proposals.append((r, ids[best], tokens))
                if out[best] >= caps[best]:
                    open_.remove(best)
                    if not open_:
                        return proposals
                if check_kv:
                    maxfree = max(free[i] for i in open_)
                    fit_left = bisect.bisect_right(tokens_sorted, maxfree) - sum(1 for t in placed if t <= maxfree)
                    if fit_left <= 0:
                        return proposals
        return proposals

    def plan(self, now: float, engines: Sequence[EngineSlot], ctx: PolicyContext | None = None
             ) -> list[tuple[SchedRequest, str, int]]:
        return self.plan_arrays(now, [e.engine_id for e in engines], [e.free_tokens for e in engines],
                                [e.outstanding for e in engines], [e.max_outstanding for e in engines])


class ReferencePool:
    """The plain :class:`PoolScheduler` behind :class:`FastPool`'s interface."""

    def __init__(self, policy: Any, admission: str, block_size: int, ctx: PolicyContext) -> None:
        self.scheduler = PoolScheduler(policy, admission, block_size)
        self.ctx = ctx
        self.waiting = self.scheduler.waiting

    def __len__(self) -> int:
        return len(self.scheduler)

    def submit(self, r: SchedRequest, now: float) -> None:
        self.scheduler.submit(r)

    def rekey_workflow(self, workflow_id: str, now: float) -> None:
        pass  # the plain scheduler computes every key when it plans

    def rekey_all(self, now: float) -> None:
        pass

    def work_ahead(self, r: SchedRequest, now: float) -> float:
        """:meth:`FastPool.work_ahead` the plain way: the work of the queued requests in ``r``'s tier or better."""
        service, policy, waiting = self.ctx.service_time, self.scheduler.policy, self.scheduler.waiting.values()
        if isinstance(policy, (FCFS, EDF)):
            return sum(service(q) for q in waiting)
        tier = policy.key(r, now, self.ctx)[0]
        return sum(service(q) for q in waiting if policy.key(q, now, self.ctx)[0] <= tier)

    def admitted(self, r: SchedRequest, engine_id: str, now: float) -> None:
        self.scheduler.admitted(r, engine_id, now)

    def plan_arrays(self, now: float, ids: Sequence[str], free: Sequence[int], outstanding: Sequence[int],
                    caps: Sequence[int]) -> list[tuple[SchedRequest, str, int]]:
        slots = [EngineSlot(i, f, o, c) for i, f, o, c in zip(ids, free, outstanding, caps)]
        return self.scheduler.plan(now, slots, self.ctx)
