"""Queue-order policies as named plugins: ``fcfs``, ``edf``, ``maestro`` and ``lsf``.

A policy maps a waiting request to a sort key at time ``now``; the scheduler dispatches the smallest key first.
Keys are tuples so ties break deterministically (arrival, then request id).

``maestro`` (workflow-aware; the default for contention)
-------------------------------------------------------
``slack = due - now - remaining work``, where ``due`` is the workflow's deadline (for an interactive call, its
first-token deadline) and the remaining work is this step's predicted service time plus the workflow's
remaining steps at the mean step time (the steps of one agent pipeline run one after another, so they add up).
Tiers, best first (ties: arrival, then request id):

    -1  aged: waited longer than ``max_wait_s`` — oldest first, and the dispatch walk waits for its head.
        This bounds every wait: no starvation (on by default; ``max_wait_s=None`` turns it off).
     0  interactive calls whose first token is still due in the future, earliest first-token deadline first:
        short interactive calls are never stuck behind long batch work.
     1  workflow steps whose workflow can still meet its deadline (slack >= 0), shortest remaining work first
        (``order_by="work"``; ``"slack"`` is least slack first, ``"due"`` EDF inside the tier).
     2  hopeless work (the deadline, or the first-token deadline, has become unreachable), least late first:
        it still runs, but never ahead of work that can still make its deadline.

Why this shape (measured with ``maestro loadgen experiment E1``, see docs/benchmarks.md): EDF's weakness under
contention is that it spends capacity on requests that will miss anyway and makes the feasible ones late too
(a domino effect); separating hopeless work from feasible work fixes that. Inside the feasible tier, shortest
remaining work first (SRPT among the feasible) maximises the number of workflows finishing on time when not all
can: a workflow close to done frees its capacity soon. An interactive call is compared by its first-token
deadline, not its whole service time (which would make most answers "hopeless" at once).

The key inside a tier never changes while a request waits (``due - work``, ``work`` and ``due`` are fixed until
the workflow's state changes); only the tier does, at times :meth:`Maestro.order` returns, so a scheduler may
keep the queue sorted instead of re-sorting it (``loadgen.des.FastPool`` does).

``lsf`` (least slack first, the first specification of maestro; kept for comparison)
-------------------------------------------------------------------------------------
Tiers: -1 aged (as above); 0 interactive calls predicted to take at most ``short_s``, by due time; 1 feasible
work, least slack first, with an interactive call's slack counted against its whole service time; 2 hopeless
work, least late first. Under sustained overload it meets more workflow deadlines than EDF and far fewer than
``maestro``: least slack serves the work closest to missing, which then is work that misses anyway, and it
puts interactive calls' first tokens late (E1). Aged at ``DEFAULT_MAX_WAIT_S`` by default, like ``maestro``
and the gateway's ``scheduling.max_wait_s``; aged at 120 s it turned into FCFS with head-of-line blocking.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from gateway.core.request import SchedRequest, WorkflowState

# maestro's aging bound. Below the gateway's default 900 s request timeout, so aging acts before a queued request
# would time out. A bound on every wait costs some attainment under sustained overload (E1 at high contention:
# 79.5 % of workflow deadlines with 600 s, 82.4 % with 900 s, 85.9 % without aging; EDF 47.6 %).
DEFAULT_MAX_WAIT_S = 600.0
ORDERS = ("work", "slack", "due")
STEP_TIME_WINDOW_S = 60.0  # the mean step time is over about the last minute of completed workflow steps
STEP_TIME_PRIOR_STEPS = 2.0  # the configured starting value counts as this many steps, always


class StepTimeMean:
    """The mean service time of one workflow step, over the steps completed in about the last ``window_s`` seconds.

    maestro and lsf estimate a workflow's remaining work as this step's predicted service plus the steps still to
    come at this mean, so the mean is of the same estimate: the predicted service (predicted tokens at the
    nominal per-token times, ``scheduling.token_time_s`` and ``prefill_token_time_s``) of the workflow steps
    completed lately. Measured admission-to-end times would mix in the batch slowdown of the moment, and actual
    lengths a predictor's bias, that the current step's estimate does not have: under load either made maestro
    count workflows as further from done and give up on them earlier (E1 at load 7: 74.8 % and 76.4 % of
    workflow deadlines met, against 79.3 % with predicted service, before the exact cost-model fit).

    The mean is over time rather than over a count of steps: step lengths spread widely (a coefficient of
    variation of about 0.9 in E2's workload) and traffic rates differ by orders of magnitude, so every step of
    the last window weighs the same (exponentially decayed by age), the noise shrinks as traffic grows, and it
    follows a change of traffic mix within about a window. The configured starting value stays in as
    ``prior_steps`` steps, which only matters when the window holds few steps. The live gateway and the simulator
    (``SimConfig.learn_step_time``) both use this."""

    __slots__ = ("initial_s", "window_s", "prior_steps", "_sum", "_weight", "_last")

    def __init__(self, initial_s: float, window_s: float = STEP_TIME_WINDOW_S,
                 prior_steps: float = STEP_TIME_PRIOR_STEPS) -> None:
        if initial_s <= 0 or window_s <= 0 or prior_steps <= 0:
            raise ValueError("initial_s, window_s and prior_steps must be positive")
        self.initial_s, self.window_s, self.prior_steps = float(initial_s), float(window_s), float(prior_steps)
        self._sum = 0.0  # decayed sum of the steps' service times in the window
        self._weight = 0.0  # decayed count of steps in the window
        self._last: float | None = None

    @property
    def mean_s(self) -> float:
        return (self._sum + self.prior_steps * self.initial_s) / (self._weight + self.prior_steps)

    def add(self, service_s: float, now: float) -> float:
        """Count one step of ``service_s`` that ended at ``now`` (a monotonic clock); returns the new mean."""
        if self._last is not None and now > self._last:
            decay = math.exp((self._last - now) / self.window_s)
            self._sum *= decay
            self._weight *= decay
        if self._last is None or now > self._last:
            self._last = now
        self._sum += max(0.0, service_s)
        self._weight += 1.0
        return self.mean_s


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


def edf_due(request: SchedRequest) -> float:
    """EDF's due time: the request's deadline (a workflow's, or one a call carries), else its first-token one."""
    if request.deadline is not None:
        return request.deadline
    if request.ttft_deadline is not None:
        return request.ttft_deadline
    return math.inf


def slack_due(request: SchedRequest) -> float:
    """The due time slack is measured against: a workflow step's is its workflow's deadline (none: it can always
    make it), never its first-token deadline, which is no deadline for the whole workflow's remaining work (that
    made every step of a workflow without a deadline "hopeless" on arrival); an interactive call's is its
    first-token deadline (a deadline it also carries does not replace it: tier 0 is ordered by first tokens)."""
    if request.workflow_id is not None:
        return request.deadline if request.deadline is not None else math.inf
    if request.ttft_deadline is not None:
        return request.ttft_deadline
    return request.deadline if request.deadline is not None else math.inf


def remaining_work(request: SchedRequest, ctx: PolicyContext) -> float:
    """Predicted seconds of work left on the request's critical path: this step plus the workflow's remaining
    steps (``remaining_steps()`` excludes steps in flight, this one included: they are counted once)."""
    work = ctx.service_time(request)
    if request.workflow_id is not None:
        workflow = ctx.workflows.get(request.workflow_id)
        if workflow is not None:
            work += workflow.remaining_steps(ctx.default_steps) * ctx.mean_step_s
    return work


class FCFS:
    name = "fcfs"

    def key(self, request: SchedRequest, now: float, ctx: PolicyContext) -> tuple:
        return (request.arrival, request.request_id)


class EDF:
    """Earliest deadline first: the workflow deadline, else the first-token deadline."""

    name = "edf"

    def key(self, request: SchedRequest, now: float, ctx: PolicyContext) -> tuple:
        return (edf_due(request), request.arrival, request.request_id)


class _SlackAware:
    """What the workflow-aware policies share: the critical-path work estimate and the slack it leaves."""

    @staticmethod
    def remaining_work(request: SchedRequest, ctx: PolicyContext) -> float:
        return remaining_work(request, ctx)

    def slack(self, request: SchedRequest, now: float, ctx: PolicyContext) -> float:
        return slack_due(request) - now - remaining_work(request, ctx)


class Maestro(_SlackAware):
    """Workflow-aware tiers: aged, on-time interactive, feasible workflow steps, hopeless (module docstring)."""

    name = "maestro"

    def __init__(self, max_wait_s: float | None = DEFAULT_MAX_WAIT_S, order_by: str = "work") -> None:
        if max_wait_s is not None and not max_wait_s > 0:
            raise ValueError("max_wait_s must be > 0 (or None: no aging)")
        if order_by not in ORDERS:
            raise ValueError(f"order_by must be one of {', '.join(ORDERS)}")
        self.max_wait_s = max_wait_s
        self.order_by = order_by

    def order(self, request: SchedRequest, now: float, ctx: PolicyContext) -> tuple[tuple, float]:
        """``(key, valid_until)``: the sort key, and the time after which its tier may change (``inf``: never,
        unless the workflow's state changes first)."""
        aging = math.inf if self.max_wait_s is None else request.arrival + self.max_wait_s
        if now > aging:
            return (-1, request.arrival, request.request_id), math.inf
        due = slack_due(request)
        if request.workflow_id is None:
            if now <= due:
                return (0, due, request.arrival, request.request_id), min(aging, due)
            return (2, -due, request.arrival, request.request_id), aging
        work = remaining_work(request, ctx)
        x = due - work  # slack = x - now
        if now <= x:
            sort = work if self.order_by == "work" else (x if self.order_by == "slack" else due)
            return (1, sort, request.arrival, request.request_id), min(aging, x)
        return (2, -x, request.arrival, request.request_id), aging

    def key(self, request: SchedRequest, now: float, ctx: PolicyContext) -> tuple:
        return self.order(request, now, ctx)[0]


class LeastSlackFirst(_SlackAware):
    """``lsf``: least slack first with protected short interactive calls (module docstring)."""

    name = "lsf"

    def __init__(self, max_wait_s: float = DEFAULT_MAX_WAIT_S, short_s: float = 2.0) -> None:
        self.max_wait_s = max_wait_s
        self.short_s = short_s

    def key(self, request: SchedRequest, now: float, ctx: PolicyContext) -> tuple:
        if now - request.arrival > self.max_wait_s:
            return (-1, request.arrival, request.request_id)
        if request.interactive and ctx.service_time(request) <= self.short_s:
            return (0, slack_due(request), request.arrival, request.request_id)
        slack = self.slack(request, now, ctx)
        if slack >= 0:
            return (1, slack, request.arrival, request.request_id)
        return (2, -slack, request.arrival, request.request_id)


QUEUE_POLICIES: dict[str, type] = {cls.name: cls for cls in (FCFS, EDF, Maestro, LeastSlackFirst)}


def make_queue_policy(name: str, **options) -> QueuePolicy:
    try:
        cls = QUEUE_POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown queue policy {name!r}; known: {', '.join(sorted(QUEUE_POLICIES))}") from None
    return cls(**options) if options else cls()
