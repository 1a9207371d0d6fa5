"""``maestro2``: a workflow-aware queue policy for contention, registered next to fcfs / edf / maestro.

Importing this module adds ``"maestro2"`` to :data:`gateway.core.queue_policy.QUEUE_POLICIES`.

Why another policy
------------------
The simulator (``maestro loadgen experiment E1``) showed three problems of ``maestro`` under contention:

1. **Aging turns into FCFS with head-of-line blocking.** Under sustained overload many requests wait longer than
   ``max_wait_s``; they all move to tier -1, which is served oldest first and stops the dispatch walk when its head
   does not fit. The queue then behaves like FCFS, and deadline attainment falls below EDF's.
2. **Interactive calls are compared with their whole service time.** An interactive call's due time is its
   *first-token* deadline (arrival + TTFT target, 2 s by default) but its "remaining work" is the whole predicted
   service time. Any call predicted to take longer than ``short_s`` (most answers of a few hundred tokens) gets a
   negative slack at once and lands in the hopeless tier, behind all batch work.
3. **Least slack first favours the work closest to failing.** Service-time predictions are optimistic under load
   (batching and prefill interference slow every step down), so the steps with the least predicted slack are
   the ones most likely to miss anyway; serving them first spends capacity on misses.

What maestro2 does
------------------
Tiers, best first (ties: arrival, then request id, as everywhere):

    0  interactive calls whose first token is still due in the future, earliest first-token deadline first;
    1  workflow steps whose workflow can still meet its deadline (slack >= 0), shortest remaining work first;
    2  hopeless work (the deadline, or the first-token deadline, has become unreachable), least late first.

``slack = due - now - remaining work`` and the remaining work are maestro's (this step's predicted service plus
the workflow's remaining steps at the mean step time). Ordering feasible workflows by remaining work
(shortest-remaining-processing-time among the feasible ones) is the classic way to maximise the number of jobs
that finish on time when not all can: a workflow close to done frees its capacity soon and meets its deadline;
one that is far from done and can no longer make it drops to tier 2 instead of dragging others late with it
(EDF's domino effect). Without contention every tier is served at once and the order barely matters.
``order_by="slack"`` (maestro's least-slack order inside tier 1) and ``"due"`` (EDF inside tier 1) are kept for
comparison.

The key inside a tier never changes while a request waits (``due - work``, ``work`` and ``due`` are fixed until the
workflow's state changes); only the tier does, at times :meth:`Maestro2.order` returns, so a scheduler may keep the
queue sorted instead of re-sorting it (``loadgen.des.FastPool`` does).

Aging is optional (``max_wait_s``, off by default): when set, a request that waited longer goes to tier -1 as in
``maestro`` (served first, oldest first, and the dispatch walk waits for it). Under sustained overload a bound on
every wait and deadline attainment conflict; maestro2 chooses attainment by default and still runs hopeless work
whenever feasible work leaves room.
"""

from __future__ import annotations

import math

from gateway.core.queue_policy import QUEUE_POLICIES, Maestro, PolicyContext, _due
from gateway.core.request import SchedRequest

ORDERS = ("work", "slack", "due")


class Maestro2:
    name = "maestro2"

    def __init__(self, max_wait_s: float | None = None, order_by: str = "work") -> None:
        if max_wait_s is not None and not max_wait_s > 0:
            raise ValueError("max_wait_s must be > 0 (or None: no aging)")
        if order_by not in ORDERS:
            raise ValueError(f"order_by must be one of {', '.join(ORDERS)}")
        self.max_wait_s = max_wait_s
        self.order_by = order_by

    remaining_work = Maestro.remaining_work  # the same critical-path estimate as maestro

    def order(self, request: SchedRequest, now: float, ctx: PolicyContext) -> tuple[tuple, float]:
        """``(key, valid_until)``: the sort key, and the time after which its tier may change (``inf``: never,
        unless the workflow's state changes first)."""
        aging = math.inf if self.max_wait_s is None else request.arrival + self.max_wait_s
        if now > aging:
            return (-1, request.arrival, request.request_id), math.inf
        due = _due(request)
        if request.workflow_id is None:
            if now <= due:
                return (0, due, request.arrival, request.request_id), min(aging, due)
            return (2, -due, request.arrival, request.request_id), aging
        work = self.remaining_work(request, ctx)
        x = due - work  # slack = x - now
        if now <= x:
            sort = work if self.order_by == "work" else (x if self.order_by == "slack" else due)
            return (1, sort, request.arrival, request.request_id), min(aging, x)
        return (2, -x, request.arrival, request.request_id), aging

    def key(self, request: SchedRequest, now: float, ctx: PolicyContext) -> tuple:
        return self.order(request, now, ctx)[0]


QUEUE_POLICIES.setdefault(Maestro2.name, Maestro2)
