"""Queue-order policies as named plugins: ``fcfs``, ``edf``, ``maestro``.

A policy maps a waiting request to a sort key at time ``now``; the scheduler dispatches the smallest key first.
Keys are tuples so ties break deterministically (arrival, then request id).

``maestro`` (workflow-aware least slack first):
    slack = due − now − predicted remaining work on the workflow's critical path
where ``due`` is the workflow's deadline (or, for an interactive call, its first-token deadline) and the
remaining work is this step's predicted service time plus the workflow's remaining steps at the mean step time
(steps of one agent pipeline run one after another, so they add up). Tiers, best first:
    -1  aged: waited longer than ``max_wait_s`` — oldest first. This bounds every wait: no starvation.
     0  short interactive calls (predicted service ≤ ``short_s``), by due time — protected from long batch work.
     1  feasible work (slack ≥ 0), least slack first.
     2  hopeless work (slack < 0, its deadline cannot be met any more), least-late first: it still runs,
        but never ahead of work that can still make its deadline. EDF's weakness under contention is exactly
        that it spends capacity on such requests and makes the feasible ones late too.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from gateway.core.request import SchedRequest, WorkflowState


@dataclass
class PolicyContext:
    """What a policy may consult besides the request itself (all pure lookups)."""

    service_time: Callable[[SchedRequest], float]  # predicted seconds to serve this request on an engine
    workflows: dict[str, WorkflowState] = field(default_factory=dict)
    mean_step_s: float = 5.0  # mean service time of one workflow step (learned online or configured)
    default_steps: int = 0  # remaining-steps guess for workflows without a hint


class QueuePolicy(Protocol):
    name: str

    def key(self, request: SchedRequest, now: float, ctx: PolicyContext) -> tuple: ...


def _due(request: SchedRequest) -> float:
    if request.deadline is not None:
        return request.deadline
    if request.ttft_deadline is not None:
        return request.ttft_deadline
    return math.inf


class FCFS:
    name = "fcfs"

    def key(self, request: SchedRequest, now: float, ctx: PolicyContext) -> tuple:
        return (request.arrival, request.request_id)


class EDF:
    """Earliest deadline first: the workflow deadline, else the first-token deadline."""

    name = "edf"

    def key(self, request: SchedRequest, now: float, ctx: PolicyContext) -> tuple:
        return (_due(request), request.arrival, request.request_id)


class Maestro:
    name = "maestro"

    def __init__(self, max_wait_s: float = 120.0, short_s: float = 2.0) -> None:
        self.max_wait_s = max_wait_s
        self.short_s = short_s

    def remaining_work(self, request: SchedRequest, ctx: PolicyContext) -> float:
        work = ctx.service_time(request)
        if request.workflow_id is not None:
            workflow = ctx.workflows.get(request.workflow_id)
            if workflow is not None:
                # remaining_steps() excludes steps in flight, this one included: they are counted once
                work += workflow.remaining_steps(ctx.default_steps) * ctx.mean_step_s
        return work

    def slack(self, request: SchedRequest, now: float, ctx: PolicyContext) -> float:
        return _due(request) - now - self.remaining_work(request, ctx)

    def key(self, request: SchedRequest, now: float, ctx: PolicyContext) -> tuple:
        if now - request.arrival > self.max_wait_s:
            return (-1, request.arrival, request.request_id)
        if request.interactive and ctx.service_time(request) <= self.short_s:
            return (0, _due(request), request.arrival, request.request_id)
        slack = self.slack(request, now, ctx)
        if slack >= 0:
            return (1, slack, request.arrival, request.request_id)
        return (2, -slack, request.arrival, request.request_id)


QUEUE_POLICIES: dict[str, type] = {FCFS.name: FCFS, EDF.name: EDF, Maestro.name: Maestro}


def make_queue_policy(name: str, **options) -> QueuePolicy:
    try:
        cls = QUEUE_POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown queue policy {name!r}; known: {', '.join(sorted(QUEUE_POLICIES))}") from None
    return cls(**options) if options else cls()


# ``maestro2`` lives in its own module (it imports this one); importing it here registers it wherever the
# queue policies are used, live or simulated.
from gateway.core import workflow_policy as _workflow_policy  # noqa: E402,F401
