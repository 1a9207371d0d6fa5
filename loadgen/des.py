"""The discrete-event simulator (``maestro loadgen simulate``): the gateway's own scheduling core on a virtual clock.

What is real and what is modelled
---------------------------------
*Real* (imported, not copied): the queue policies and the pool scheduler's dispatch rule
(:mod:`gateway.core.queue_policy`, :mod:`gateway.core.scheduler`), the admission policies and reservation growth
(:mod:`gateway.core.admission`), the KV ledger (:mod:`gateway.core.ledger`), the cluster choice
(:mod:`gateway.core.cluster_routing`), the request model (:mod:`gateway.core.request`) and the predictor
(anything with ``predict(body, headers)``; :class:`PriorPredictor` when no trained model is given).
*Modelled*: the network (a fixed round trip per cluster) and the engines, with the engine cost model shared with
the simulated HTTP engines (:class:`backends.sim.cost_model.EngineCostModel`) and the scheduling rules of
:mod:`backends.sim.engine` (vLLM V1's): continuous batching up to ``max_num_seqs`` sequences and
``max_num_batched_tokens`` tokens per iteration, a paged KV cache of ``kv_blocks`` blocks, head-of-line admission,
and preemption by recompute of the last admitted request when a running request cannot get its next block.

The analytic engine
-------------------
Between two events the batch of an engine does not change, so the engine is not stepped one decode iteration at a
time. After each scheduling decision it is in one of three modes:

* ``MIXED``: the iteration computes prompt chunks (new or re-admitted requests) besides decodes: one event at its
  end, whose length is :meth:`EngineCostModel.step_s` of exactly what the iteration holds.
* ``DECODE``: B sequences decode one token per iteration over a context that grows by B tokens per iteration, so
  iteration j costs ``A + d2*B*j`` and n iterations cost ``n*A + d2*B*n(n-1)/2``. The engine jumps straight to
  the first iteration boundary where something happens: the earliest completion (a heap keyed by the iteration
  at which each request reaches its length), the earliest reservation overrun (same), the KV cache running out
  (each sequence needs a new block every ``block_size`` tokens at a fixed residue of the iteration counter, so
  the count of new blocks per iteration is a table of ``block_size`` entries and the exhausting iteration is
  found in O(block_size)), or the boundary at which a newly arrived request can be admitted.
* ``IDLE``.

At such a boundary the engine does exactly what :meth:`backends.sim.engine.SimEngine._schedule` does (the rare
preemption and token-budget cases run a literal per-request replica of it); ``tests/test_des.py`` checks the
analytic engine against that class stepped one iteration at a time.

The gateway side
----------------
Each (cluster, pool) has a pool queue. A step of a workflow is released when its dependencies have finished (as
the client sees it, i.e. one half round trip after the engine) plus its think time; the client's request reaches
the local gateway, which asks the cluster-routing plugin for a cluster; it joins that cluster's pool queue half a
round trip later. Whenever a pool's state changes (a request joins, a request finishes) the pool is dispatched:
the scheduler proposes (request, engine, tokens) from :class:`~gateway.core.scheduler.EngineSlot` snapshots
(``free_tokens`` from the ledger, ``max_outstanding = max_num_seqs + queue_per_engine``); each reservation is
taken in the ledger; the engine gets the request at once (gateway and engines share a cluster). A request that
outlives its reservation grows it with :func:`~gateway.core.admission.grown_reservation` (``force=True``: the
engine already uses that memory); the reservation is released exactly once when the request finishes.

By default the pool queue is :class:`FastPool`, which keeps :class:`~gateway.core.scheduler.PoolScheduler`'s
semantics (same proposals, same order; checked against it on random cases) but does not re-sort the whole queue at
every dispatch: the fcfs and edf keys never change, and the maestro and lsf orders within a tier do not either;
tiers change at times it computes (and re-checks with the policy's own ``key``). ``reference=True``
uses the plain :class:`PoolScheduler` instead (slower; for tests and for policies FastPool does not know).

Cluster choice (``latency_aware``) gets, per cluster, the queued work its queue policy would serve before this
request (:meth:`FastPool.work_ahead`) and the time per output token at the pool's current batch, so it sees that
an interactive call jumps maestro's queue and that a busier cluster decodes slower.

maestro and lsf estimate a workflow's remaining work with a mean step time; like the live gateway, the simulator
learns it online as the mean predicted service of the workflow steps completed lately (``SimConfig.
learn_step_time``, :class:`~gateway.core.queue_policy.StepTimeMean`) and re-keys the queues when it has moved by
:data:`STEP_TIME_REKEY_DRIFT` (5 %).

Predictions are made once per step before the run (they depend on the request only); without a prompt text the
predictor sees a filler text of the step's prompt length, and its role and workflow headers.

Results use :mod:`loadgen.results` (the schema the live runner writes), with series of reserved vs used KV tokens
(``reserved_kv_tokens``, ``used_kv_tokens``: all engines, every ``sample_interval_s``) and ``meta["kv"]`` with
the exact time average (over the arrival window -- the whole run when every workflow arrives at t=0 -- and over
the whole run) and peak of the reserved tokens; the used-KV figures come from the samples (None without them).
``meta["load"]`` is the workload's offered load (:meth:`~loadgen.workload.Workload.offered_load`), as a live
run records it in ``meta["workload_load"]`` (and in ``meta["load"]`` on the workload clock).

Speed: one simulated hour of 2 clusters x 16 engines at E1's high-contention load (134,000 requests, 700,000
events) takes about 9 s of CPU (the plain PoolScheduler: about 140 s, same results). Not modelled: engine
sleep/wake, DiT engines, engine failures, network jitter.
"""

from __future__ import annotations

import bisect
import heapq
import math
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from backends.sim.cost_model import EngineCostModel
from gateway.core.admission import ADMISSION_POLICIES, grown_reservation, reservation_tokens
from gateway.core.cluster_routing import ClusterLoad, ClusterRequest, make_cluster_routing
from gateway.core.ledger import KVLedger
from gateway.core.queue_policy import (EDF, FCFS, STEP_TIME_WINDOW_S, LeastSlackFirst, PolicyContext, StepTimeMean,
                                      edf_due, make_queue_policy, slack_due)
from gateway.core.request import DEFAULT_SLO_CLASSES, INTERACTIVE, SchedRequest, SLOClass, WorkflowState
from gateway.core.scheduler import EngineSlot, PoolScheduler
from loadgen.results import RequestResult, RunResult, WorkflowResult
from loadgen.slo import check_workload_slo_classes
from loadgen.workload import Workload
from predictor.features import explicit_role_of, max_tokens_of
from predictor.predictor import DEFAULT_PRIORS

INF = math.inf
# Re-key the queues when the learned mean step time moved 5 % from the one in use (smaller moves reorder little
# and would cost a re-sort of every queue each time).
STEP_TIME_REKEY_DRIFT = 0.05
TIMER_HEAP_SLACK = 1024  # stale queue timers allowed beyond twice the queued requests before the heap is rebuilt
PROGRESS_EVERY_S = 2.0  # wall seconds between two progress reports of a run that asked for them

# --------------------------------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class EngineSpec:
    """One simulated engine (the knobs of :class:`backends.sim.options.SimEngineOptions` that matter here)."""

    max_num_seqs: int = 128
    kv_blocks: int = 16384
    block_size: int = 16
    max_num_batched_tokens: int = 8192
    max_model_len: int = 8192
    cost_scale: float = 1.0  # multiplies every cost-model time (EngineCostModel's ``scale``)
    kv_bytes_per_token: int | None = None  # None: the cost model's (from the calibration)

    def validate(self) -> None:
        for name in ("max_num_seqs", "kv_blocks", "block_size", "max_num_batched_tokens", "max_model_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"engine.{name} must be a positive integer, got {value!r}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError("engine.max_num_batched_tokens must be >= max_num_seqs (as vLLM requires)")
        if self.kv_blocks * self.block_size < self.max_model_len:
            raise ValueError("engine.kv_blocks * block_size must hold one max_model_len sequence")
        if not self.cost_scale > 0:
            raise ValueError("engine.cost_scale must be > 0")


@dataclass(frozen=True)
class PoolSpec:
    name: str = "llm"
    engines: int = 16
    engine: EngineSpec = field(default_factory=EngineSpec)
    models: tuple[str, ...] = ()  # models it serves; empty: any


@dataclass(frozen=True)
class ClusterSpec:
    name: str
    rtt_s: float = 0.0  # client/gateway <-> cluster round trip
    pools: tuple[PoolSpec, ...] = (PoolSpec(),)


@dataclass
class SimConfig:
    clusters: list[ClusterSpec] = field(default_factory=lambda: [ClusterSpec("c0"), ClusterSpec("c1")])
    queue_policy: str = "maestro"
    queue_options: dict[str, Any] = field(default_factory=dict)
    admission: str = "predicted"
    cluster_routing: str = "latency_aware"
    routing_options: dict[str, Any] = field(default_factory=dict)
    queue_per_engine: int = 8  # dispatch slots beyond max_num_seqs (a small engine-side queue)
    growth_step_tokens: int = 256  # grown_reservation's chunk
    sample_interval_s: float = 1.0  # time-series sampling period (0: no series)
    slo_classes: dict[str, SLOClass] = field(default_factory=lambda: dict(DEFAULT_SLO_CLASSES))
    step_hint: bool = True  # the client tells the gateway how many steps a workflow has (X-Workflow-Steps)
    mean_step_s: float | None = None  # maestro's mean step time; None: mean predicted step service of the workload
    # learn the mean step time online from the predicted service of completed workflow steps, as the live gateway
    # does (queue_policy.StepTimeMean over step_time_window_s); queues are re-keyed once it drifted 5 %
    learn_step_time: bool = True
    step_time_window_s: float = STEP_TIME_WINDOW_S
    nominal_batch: int | None = None  # batch at which service times are predicted (None: max_num_seqs // 2)
    nominal_context: int = 2048  # context per sequence at which service times are predicted
    # the gateway's estimate of a prompt is round(ratio x the engine's count): its character-based estimator
    # (predictor.tokens) is not the engine's tokenizer. 1.0: exact. E4 measures it on the live runner's prompts.
    prompt_estimate_ratio: float = 1.0
    reference: bool = False  # use the plain PoolScheduler (slow) instead of FastPool
    calibration_dir: str | None = None
    max_events: int | None = None  # safety valve for tests

    def validate(self) -> None:
        if not self.clusters:
            raise ValueError("at least one cluster is needed")
        names = [c.name for c in self.clusters]
        if len(set(names)) != len(names):
            raise ValueError("cluster names must be unique")
        for c in self.clusters:
            if c.rtt_s < 0:
                raise ValueError(f"cluster {c.name}: rtt_s must be >= 0")
            if not c.pools:
                raise ValueError(f"cluster {c.name}: needs a pool")
            for p in c.pools:
                # a pool without engines can never serve what is routed to it (the run would stall or end with
                # requests nowhere); leave the cluster out instead
                if isinstance(p.engines, bool) or not isinstance(p.engines, int) or p.engines < 1:
                    raise ValueError(f"cluster {c.name} pool {p.name}: engines must be >= 1, got {p.engines!r}")
                p.engine.validate()
        if self.admission not in ADMISSION_POLICIES:
            raise ValueError(f"unknown admission policy {self.admission!r}")
        if self.queue_per_engine < 0:
            raise ValueError("queue_per_engine must be >= 0")
        if not self.prompt_estimate_ratio > 0:
            raise ValueError("prompt_estimate_ratio must be > 0")
        if not (self.sample_interval_s >= 0 and math.isfinite(self.sample_interval_s)):
            raise ValueError(f"sample_interval_s must be a finite number >= 0 (0: no time series), "
                             f"got {self.sample_interval_s!r}")
        # the options go to the policy's constructor as keywords: checked here so that a list or an unknown
        # name (simulate --queue-options '[1]' / '{"bogus": 1}') is a ValueError, not a TypeError in _build
        if not isinstance(self.queue_options, dict):
            raise ValueError(f"queue_options must be an object of the {self.queue_policy} policy's options, "
                             f"got {self.queue_options!r:.80}")
        try:
            make_queue_policy(self.queue_policy, **self.queue_options)
        except TypeError as exc:
            raise ValueError(f"queue_options {self.queue_options!r:.80} do not fit the {self.queue_policy} "
                             f"policy: {exc}") from None


def two_cluster_config(engines: int = 16, engine: EngineSpec | None = None, rtt_s: tuple[float, float] = (0.002, 0.002),
                       **options: Any) -> SimConfig:
    """The usual setup: two clusters of ``engines`` identical engines each."""
    engine = engine or EngineSpec()
    clusters = [ClusterSpec(f"c{i}", rtt_s=rtt, pools=(PoolSpec("llm", engines, engine),)) for i, rtt in enumerate(rtt_s)]
    return SimConfig(clusters=clusters, **options)


# --------------------------------------------------------------------------------------------------- predictors


@dataclass(frozen=True, slots=True)
class SimProgress:
    """Where a simulation has got to, for a progress line: simulated time against the arrival window, workflows
    finished, requests queued at the gateway's pools, events processed, wall time."""
    simulated_s: float
    window_s: float
    workflows_done: int
    workflows: int
    queued: int
    events: int
    wall_s: float


@dataclass(frozen=True, slots=True)
class SimplePrediction:
    role: str
    confidence: float
    p50: int
    p90: int
    kv_bytes: int = 0


class PriorPredictor:
    """Per-role priors (p50, p90) of output tokens: the predictor to use when no trained model is given.

    The role is the caller's explicit label, read by the predictor's own rule
    (:func:`predictor.features.explicit_role_of`: ``X-Agent-Role``, then ``metadata.agent_role``), else ``other``;
    the cap is the request's, by the same rule (:func:`predictor.features.max_tokens_of`). Priors default to the
    predictor package's ``DEFAULT_PRIORS``."""

    def __init__(self, priors: Mapping[str, tuple[int, int]] | None = None, kv_bytes_per_token: int = 131072) -> None:
        self.priors = {k: (int(v[0]), int(v[1])) for k, v in (DEFAULT_PRIORS if priors is None else priors).items()}
        self.priors.setdefault("other", DEFAULT_PRIORS["other"])
        self.kv_bytes_per_token = kv_bytes_per_token

    def predict(self, body: Mapping[str, Any], headers: Mapping[str, str] | None = None) -> SimplePrediction:
        role = explicit_role_of(body, headers) or "other"
        p50, p90 = self.priors.get(role, self.priors["other"])
        cap = max_tokens_of(body)
        if cap is not None:
            p50, p90 = min(p50, cap), min(p90, cap)
        return SimplePrediction(role, 1.0 if role != "other" else 0.0, p50, max(p50, p90))


def load_predictor(path: str | None) -> Any:
    """``Predictor.load(path)`` when a path is given, else :class:`PriorPredictor`."""
    if not path:
        return PriorPredictor()
    from predictor.predictor import Predictor

    return Predictor.load(path)


# --------------------------------------------------------------------------------------------------- pool queues


def supports_fast(policy: Any) -> bool:
    """FastPool can order this policy: a built-in one, or one with ``order(request, now, ctx) -> (key,
    valid_until)`` whose key does not change before ``valid_until`` unless the workflow's state changes."""
    return type(policy) in (FCFS, EDF, LeastSlackFirst) or callable(getattr(policy, "order", None))


class FastPool:
    """:class:`PoolScheduler`'s ``plan``/``admitted`` semantics for ``fcfs``, ``edf``, ``lsf`` and any policy with
    an ``order`` method (``maestro``), with incrementally ordered queues instead of a full sort per dispatch.

    Order: a sorted list per tier of static keys. fcfs ``(arrival, id)`` and edf ``(due, arrival, id)`` never
    change. ``order`` policies give their key and the time it stays valid. lsf: tier -1 ``(arrival, id)``; tier 0 ``(due, arrival, id)``; tier 1 by slack
    ``due - now - work``, i.e. by ``due - work`` (``now`` is common to all); tier 2 by ``-slack``, i.e. by
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


# --------------------------------------------------------------------------------------------------- engines

IDLE, MIXED, DECODE = 0, 1, 2
R_WAITING, R_PREFILL, R_DECODE, R_DONE = 0, 1, 2, 3


class SimReq:
    """One request inside the simulator (engine-side state plus the gateway's bookkeeping)."""

    __slots__ = ("rid", "prompt", "target", "g", "k0", "base", "res", "computed", "blocks", "state", "kdone",
                 "kgrow", "preemptions", "first_token", "finish", "seq", "sched", "reserved", "max_reserved",
                 "engine", "pool", "run", "step_index", "release", "service", "gw_prompt")

    def __init__(self, rid: str, prompt: int, target: int, seq: int) -> None:
        self.rid = rid
        self.prompt = max(1, prompt)
        self.gw_prompt = self.prompt  # the gateway's estimate of the prompt (its reservation grows against it)
        self.target = max(1, target)
        self.g = 0  # generated tokens (for a decoding request: at iteration k0)
        self.k0 = 0
        self.base = 0  # prompt + g - k0: tokens held at iteration K are base + K
        self.res = 0  # iteration residue at which it needs a new KV block
        self.computed = 0  # tokens in KV (prefill/waiting states only)
        self.blocks = 0  # blocks held (prefill/waiting states only)
        self.state = R_WAITING
        self.kdone = 0
        self.kgrow = 0
        self.preemptions = 0
        self.first_token: float | None = None  # engine time
        self.finish: float | None = None  # engine time
        self.seq = seq
        self.sched: SchedRequest | None = None
        self.reserved = 0  # tokens the ledger holds for it
        self.max_reserved = 0
        self.engine: DESEngine | None = None
        self.pool: _Pool | None = None
        self.run: _WorkflowRun | None = None
        self.step_index = 0
        self.release = 0.0
        self.service = 0.0


class EngineHooks:
    """What an engine tells its owner. The simulator implements these; tests may use this no-op default."""

    def on_first_token(self, req: SimReq, t: float) -> None: ...

    def on_finish(self, reqs: list[SimReq], t: float) -> None: ...

    def on_grow(self, req: SimReq, generated: int, t: float) -> int:  # -> new reserved tokens
        return req.reserved

    def schedule_engine(self, engine: DESEngine, t: float) -> None: ...


class DESEngine:
    """A continuous-batching engine advanced analytically between events (see the module docstring)."""

    def __init__(self, engine_id: str, spec: EngineSpec, cost: EngineCostModel, hooks: EngineHooks,
                 grow: bool = False) -> None:
        self.engine_id = engine_id
        self.spec = spec
        self.cost = cost
        self.hooks = hooks
        self.grow = grow
        self.bs = spec.block_size
        self.total_blocks = spec.kv_blocks
        self.free = spec.kv_blocks  # free blocks after the allocations of iteration ks
        self.max_seqs = spec.max_num_seqs
        self.budget = spec.max_num_batched_tokens
        self.d0, self.d1, self.d2 = cost.decode_coef
        self.K = 0  # iterations completed at the last processed boundary
        self.t = 0.0
        self.running: dict[SimReq, None] = {}  # admission order
        self.waiting: deque[SimReq] = deque()
        self.prefill: list[SimReq] = []  # running requests still computing their prompt (running order)
        self.nd = 0  # decoding requests
        self.base_sum = 0
        self.cnt = [0] * self.bs
        self.done_heap: list[tuple[int, int, SimReq]] = []
        self.grow_heap: list[tuple[int, int, SimReq]] = []
        self.mode = IDLE
        self.ks = 0  # iteration scheduled at the start of the current stretch
        self.ts = 0.0
        self.A = 0.0  # time of iteration ks (decode stretch)
        self.inc = 0.0  # increase of the iteration time per iteration
        self.kend = 0  # boundary of the pending event
        self.event_t = INF
        self.version = 0
        self.chunks: list[tuple[SimReq, int]] = []  # prefill chunks of the current mixed iteration
        self.iterations = 0
        self.preemptions = 0
        self.busy_s = 0.0

    # -- stretch arithmetic -----------------------------------------------------------------------------------
    def _T(self, n: int) -> float:
        return n * self.A + self.inc * (n * (n - 1) * 0.5)

    def _crossings(self, k_from: int, k_to: int) -> int:
        """New blocks the decoding requests need over iterations k_from+1 .. k_to."""
        m = k_to - k_from
        if m <= 0 or self.nd == 0:
            return 0
        bs = self.bs
        full, rem = divmod(m, bs)
        total = full * self.nd
        cnt = self.cnt
        for j in range(1, rem + 1):
            total += cnt[(k_from + j) % bs]
        return total

    def _exhaust_k(self, k: int, free: int) -> int:
        """First iteration after k whose block needs exceed ``free`` (INF when nothing decodes)."""
        nd = self.nd
        if nd == 0:
            return 1 << 62
        bs = self.bs
        full, left = divmod(free, nd)
        cnt = self.cnt
        acc = 0
        for j in range(1, bs + 1):
            acc += cnt[(k + j) % bs]
            if acc > left:
                return k + full * bs + j
        raise AssertionError("unreachable: every sequence needs a block each block_size iterations")

    def boundary_at_or_after(self, now: float) -> tuple[int, float]:
        """(iteration index, time) of the first boundary of the current decode stretch at or after ``now``."""
        dt = now - self.ts
        A, inc = self.A, self.inc
        if inc > 0:
            b = A - inc * 0.5
            n = int(math.ceil((-b + math.sqrt(b * b + 2.0 * inc * max(dt, 0.0))) / inc))
        else:
            n = int(math.ceil(dt / A)) if A > 0 else 1
        n = max(n, 1)
        while n > 1 and self.ts + self._T(n - 1) >= now:
            n -= 1
        while self.ts + self._T(n) < now:
            n += 1
        return self.ks + n, self.ts + self._T(n)

    def iterations_done(self, now: float) -> int:
        """Iterations of the current stretch completed by ``now`` (for sampling)."""
        if self.mode != DECODE:
            return 0
        k, t = self.boundary_at_or_after(now)
        return k - self.ks - (1 if t > now else 0)

    # -- requests in and out ----------------------------------------------------------------------------------
    def add(self, req: SimReq, now: float) -> None:
        """A request arrives from the gateway at ``now``; it is admitted at the next iteration boundary."""
        req.engine = self
        req.state = R_WAITING
        was_empty = not self.waiting
        self.waiting.append(req)
        if not was_empty or len(self.running) >= self.max_seqs:
            return  # the head of the queue is blocked (or already has a wake-up): head-of-line, like vLLM
        if self.mode == IDLE:
            if self.event_t > now:
                self._set_event(self.K, now)
        elif self.mode == DECODE:
            k, t = self.boundary_at_or_after(now)
            if k < self.kend:
                self._set_event(k, t)

    def _set_event(self, k: int, t: float) -> None:
        self.kend = k
        self.event_t = t
        self.version += 1
        self.hooks.schedule_engine(self, t)

    def _to_decode(self, req: SimReq, k: int) -> None:
        req.state = R_DECODE
        req.k0 = k
        base = req.prompt + req.g - k
        req.base = base
        r = (1 - base) % self.bs
        req.res = r
        self.cnt[r] += 1
        self.nd += 1
        self.base_sum += base
        req.kdone = k + req.target - req.g
        heapq.heappush(self.done_heap, (req.kdone, req.seq, req))
        self._push_grow(req, k)

    def _push_grow(self, req: SimReq, k: int) -> None:
        # the gateway grows a reservation once its own prompt estimate plus the tokens streamed outgrow it
        if not self.grow or req.reserved >= req.gw_prompt + req.target:
            req.kgrow = -1
            return
        kg = max(k, req.reserved - req.gw_prompt - req.g + req.k0 + 1)
        if kg >= req.kdone:
            req.kgrow = -1
            return
        req.kgrow = kg
        heapq.heappush(self.grow_heap, (kg, req.seq, req))

    def _drop_decode(self, req: SimReq, k: int) -> None:
        """Take a decoding request out of the counters at boundary k (before iteration k is scheduled)."""
        self.nd -= 1
        self.base_sum -= req.base
        self.cnt[req.res] -= 1
        held = req.base + k - 1  # tokens whose blocks it holds
        self.free += -(-held // self.bs)
        req.g = req.g + k - req.k0
        req.k0 = k

    # -- one boundary -----------------------------------------------------------------------------------------
    def on_event(self, t: float) -> None:
        k = self.kend
        mode = self.mode
        if mode == DECODE and k - 1 > self.ks:
            self.free -= self._crossings(self.ks, k - 1)
        if mode != IDLE:
            self.iterations += k - self.ks
            self.busy_s += t - self.ts
        self.K = k
        self.t = t
        first: list[SimReq] = []
        if mode == MIXED:
            for req, n in self.chunks:
                req.computed += n
                if req.computed >= req.prompt + req.g:
                    req.g += 1
                    self.prefill.remove(req)
                    self._to_decode(req, k)
                    if req.first_token is None:
                        req.first_token = t
                        first.append(req)
            self.chunks = []
        finished: list[SimReq] = []
        heap = self.done_heap
        while heap and heap[0][0] <= k:
            kd, _, req = heapq.heappop(heap)
            if req.state != R_DECODE or req.kdone != kd:
                continue
            self._drop_decode(req, k)
            del self.running[req]
            req.state = R_DONE
            req.finish = t
            finished.append(req)
        gheap = self.grow_heap
        while gheap and gheap[0][0] <= k:
            kg, _, req = heapq.heappop(gheap)
            if req.state != R_DECODE or req.kgrow != kg:
                continue
            req.reserved = self.hooks.on_grow(req, req.g + k - req.k0, t)
            self._push_grow(req, k)
        self._schedule(k, t)
        for req in first:
            self.hooks.on_first_token(req, t)
        if finished:
            self.hooks.on_finish(finished, t)

    def _schedule(self, k: int, t: float) -> None:
        """Schedule iteration k (vLLM V1 / backends.sim.engine rules) and plan the next event."""
        bs = self.bs
        need = self.cnt[k % bs] if self.nd else 0
        budget = self.budget - self.nd
        chunks: list[tuple[SimReq, int]] = []
        slow = need > self.free or budget < 0
        if not slow and self.prefill:
            extra = 0
            for req in self.prefill:
                n = req.prompt + req.g - req.computed
                budget -= n
                extra += -(-(req.computed + n) // bs) - req.blocks
            slow = budget < 0 or need + extra > self.free
            if not slow:
                for req in self.prefill:
                    n = req.prompt + req.g - req.computed
                    nb = -(-(req.computed + n) // bs) - req.blocks
                    req.blocks += nb
                    self.free -= nb
                    chunks.append((req, n))
        if slow:
            self._schedule_slow(k, t)
            return
        self.free -= need
        # admission (no preemption happened)
        if self.waiting and len(self.running) < self.max_seqs:
            running = self.running
            waiting = self.waiting
            max_seqs = self.max_seqs
            while budget > 0 and len(running) < max_seqs and waiting:
                req = waiting[0]
                n = min(req.prompt + req.g - req.computed, budget)
                nb = -(-(req.computed + n) // bs) - req.blocks
                if nb > self.free:
                    break
                waiting.popleft()
                req.state = R_PREFILL
                running[req] = None
                self.prefill.append(req)
                req.blocks += nb
                self.free -= nb
                chunks.append((req, n))
                budget -= n
        self._plan_next(k, t, chunks, None)

    def _plan_next(self, k: int, t: float, chunks: list[tuple[SimReq, int]], decode_set: list[SimReq] | None,
                   retry_admission: bool = False) -> None:
        self.ks = k
        self.ts = t
        if not self.running:
            self.mode = IDLE
            self.event_t = INF
            self.version += 1
            if self.waiting:
                raise RuntimeError(f"engine {self.engine_id}: a request does not fit in an empty KV cache")
            return
        if chunks:
            self.mode = MIXED
            self.chunks = chunks
            if decode_set is None:
                num_decode, context = self.nd, self.base_sum + self.nd * k
            else:
                num_decode = len(decode_set)
                context = sum(r.base + k for r in decode_set)
            prefill = attn = 0
            for req, n in chunks:
                if n == 1 and req.g > 0 and req.computed >= req.prompt:  # counted as a decode by the engine
                    num_decode += 1
                    context += req.computed + 1
                else:
                    prefill += n
                    attn += n * (req.computed + n)
            self._set_event(k + 1, t + self.cost.step_s(num_decode, context, prefill, attn))
            return
        self.mode = DECODE
        nd = self.nd
        self.A = self.d0 + self.d1 * nd + self.d2 * (self.base_sum + nd * k)
        self.inc = self.d2 * nd
        kend = self._exhaust_k(k, self.free)
        heap = self.done_heap
        while heap and (heap[0][2].state != R_DECODE or heap[0][2].kdone != heap[0][0]):
            heapq.heappop(heap)
        if heap and heap[0][0] < kend:
            kend = heap[0][0]
        gheap = self.grow_heap
        while gheap and (gheap[0][2].state != R_DECODE or gheap[0][2].kgrow != gheap[0][0]):
            heapq.heappop(gheap)
        if gheap and gheap[0][0] < kend:
            kend = gheap[0][0]
        if kend <= k or (retry_admission and self.waiting and len(self.running) < self.max_seqs):
            # an overrun noticed while scheduling k is handled at the next boundary; after a preemption the
            # engine admits nothing in that iteration and tries again at the next one
            kend = k + 1
        self._set_event(kend, t + self._T(kend - k))

    def _schedule_slow(self, k: int, t: float) -> None:
        """Literal replica of SimEngine._schedule for preemption and token-budget cases (rare)."""
        bs = self.bs
        # materialize every running request into (g, computed, blocks)
        running = list(self.running)
        for req in running:
            if req.state == R_DECODE:
                g = req.g + k - req.k0
                req.g = g
                req.computed = req.prompt + g - 1
                req.blocks = -(-req.computed // bs)
        # allocations of the decodes at iteration k are done below, explicitly
        budget = self.budget
        scheduled: dict[SimReq, int] = {}
        preempted = False
        i = 0
        while i < len(running) and budget > 0:
            req = running[i]
            n = min(req.prompt + req.g - req.computed, budget)
            need = -(-(req.computed + n) // bs) - req.blocks
            while need > self.free:
                victim = running.pop()
                self.free += victim.blocks
                victim.blocks = 0
                victim.computed = 0
                victim.preemptions += 1
                victim.state = R_WAITING
                self.waiting.appendleft(victim)
                self.preemptions += 1
                preempted = True
                if victim in scheduled:
                    budget += scheduled.pop(victim)
                if victim is req:
                    break
            if req.state == R_WAITING:
                break
            req.blocks += need
            self.free -= need
            scheduled[req] = n
            budget -= n
            i += 1
        if not preempted:
            max_seqs = self.max_seqs
            while budget > 0 and len(running) < max_seqs and self.waiting:
                req = self.waiting[0]
                n = min(req.prompt + req.g - req.computed, budget)
                need = -(-(req.computed + n) // bs) - req.blocks
                if need > self.free:
                    break
                self.waiting.popleft()
                req.state = R_PREFILL
                running.append(req)
                req.blocks += need
                self.free -= need
                scheduled[req] = n
                budget -= n
        # rebuild the analytic state
        self.running = dict.fromkeys(running)
        self.prefill = []
        self.nd = 0
        self.base_sum = 0
        self.cnt = [0] * bs
        self.done_heap = []
        self.grow_heap = []
        chunks: list[tuple[SimReq, int]] = []
        decodes: list[SimReq] = []
        skipped = False
        for req in running:
            in_decode = req.g > 0 and req.computed >= req.prompt + req.g - 1 and req.state != R_PREFILL
            if req.state == R_PREFILL or not in_decode:
                req.state = R_PREFILL
                self.prefill.append(req)
                n = scheduled.get(req)
                if n is not None:
                    chunks.append((req, n))
                continue
            # a decoding request; its block for iteration k is allocated when scheduled
            if req in scheduled:
                self._to_decode(req, k)
                decodes.append(req)
            else:  # left out by the token budget: it does not advance in iteration k
                self._to_decode(req, k + 1)
                skipped = True
        # a decoding request's blocks are implicit: ceil((base + K - 1)/bs) at boundary K; check consistency
        # (held blocks = ceil(computed_after_alloc / bs) with computed+n for scheduled ones)
        if chunks or skipped:
            self._plan_next(k, t, chunks, decodes, preempted)
        else:
            self._plan_next(k, t, [], None, preempted)

    # -- observation ------------------------------------------------------------------------------------------
    def used_blocks(self, now: float) -> int:
        used = self.total_blocks - self.free
        if self.mode == DECODE:
            done = self.iterations_done(now)
            if done > 0:
                used += self._crossings(self.ks, self.ks + min(done, self.kend - self.ks - 1))
        return used

    def outstanding(self) -> int:
        return len(self.running) + len(self.waiting)


# --------------------------------------------------------------------------------------------------- the simulator


class _Pool:
    __slots__ = ("name", "cluster", "spec", "engines", "ids", "caps", "out", "open_count", "queue", "ctx",
                 "queued", "queued_work", "tpot", "prefill_tps", "concurrency", "slots", "rtt", "models",
                 "kv_bytes", "outstanding", "free", "routed", "cost", "transit_work")

    def __init__(self) -> None:
        pass


class _WorkflowRun:
    __slots__ = ("wf", "state", "deps_left", "succ", "dep_finish", "done", "finish", "deadline", "index",
                 "result", "failed")


EV_RELEASE, EV_ENQUEUE, EV_ENGINE, EV_SAMPLE, EV_ARRIVAL = 0, 1, 2, 3, 4


class Simulator(EngineHooks):
    """Runs one workload on one configuration; :meth:`run` returns a :class:`RunResult`."""

    def __init__(self, workload: Workload, config: SimConfig, predictor: Any = None,
                 cost_model: EngineCostModel | None = None) -> None:
        config.validate()
        # an unknown class would fall back to interactive with no targets (met by construction); the gateway
        # answers such a request with 400
        check_workload_slo_classes(workload, config.slo_classes)
        self.workload = workload
        self.cfg = config
        self.predictor = predictor if predictor is not None else PriorPredictor()
        self.ledger = KVLedger()
        self.events: list[tuple] = []
        self._seq = 0
        self.now = 0.0
        self.router = make_cluster_routing(config.cluster_routing, **config.routing_options)
        self.workflows_state: dict[str, WorkflowState] = {}
        self.grow = config.admission == "predicted"
        self._costs: dict[float, EngineCostModel] = {}
        self._base_cost = cost_model
        self.pools: list[_Pool] = []
        self.cluster_pools: list[tuple[ClusterSpec, list[_Pool]]] = []
        self.service: dict[str, float] = {}
        self._reserved_total = 0
        self._reserved_peak = 0
        self._area_t = 0.0
        self._area = 0.0
        self._area_window = 0.0
        self.window = workload.duration_s() if workload.workflows else 0.0
        self._build()
        self.max_model_len = min(p.spec.max_model_len for p in self.pools)
        self.requests: list[RequestResult] = []
        self.wf_results: list[WorkflowResult] = []
        self.series: dict[str, list[tuple[float, float]]] = {"reserved_kv_tokens": [], "used_kv_tokens": [],
                                                             "queued_requests": []}
        self._reqseq = 0
        self._by_rid: dict[str, SimReq] = {}
        self.events_processed = 0
        self.dispatches = 0
        self.growths = 0
        self._pending = 0  # workflows not finished
        self.last_finish = 0.0

    # -- construction -----------------------------------------------------------------------------------------
    def _cost(self, scale: float) -> EngineCostModel:
        cost = self._costs.get(scale)
        if cost is None:
            if self._base_cost is not None and self._base_cost.scale == scale:
                cost = self._base_cost
            else:
                cost = EngineCostModel(self.cfg.calibration_dir, scale=scale)
            self._costs[scale] = cost
        return cost

    def _build(self) -> None:
        cfg = self.cfg
        for cspec in cfg.clusters:
            pools = []
            for pspec in cspec.pools:
                espec = pspec.engine
                cost = self._cost(espec.cost_scale)
                pool = _Pool()
                pool.name = f"{cspec.name}/{pspec.name}"
                pool.cluster = cspec.name
                pool.rtt = cspec.rtt_s
                pool.spec = espec
                pool.models = pspec.models
                pool.engines = []
                pool.ids = []
                for i in range(pspec.engines):
                    eid = f"{cspec.name}/{pspec.name}/{i}"
                    engine = DESEngine(eid, espec, cost, self, grow=self.grow)
                    engine.pool = pool  # type: ignore[attr-defined]
                    engine.index = i  # type: ignore[attr-defined]
                    pool.engines.append(engine)
                    pool.ids.append(eid)
                    self.ledger.set_capacity(eid, espec.kv_blocks * espec.block_size)
                cap = espec.max_num_seqs + cfg.queue_per_engine
                pool.free = [espec.kv_blocks * espec.block_size] * pspec.engines  # mirror of ledger.free()
                pool.cost = cost
                pool.routed = 0
                pool.caps = [cap] * pspec.engines
                pool.out = [0] * pspec.engines
                pool.open_count = pspec.engines
                pool.slots = cap * pspec.engines
                pool.concurrency = espec.max_num_seqs * pspec.engines
                pool.outstanding = 0
                pool.queued = 0
                pool.queued_work = 0.0
                pool.transit_work = 0.0
                batch = cfg.nominal_batch or max(1, espec.max_num_seqs // 2)
                pool.tpot = cost.decode_s(batch, batch * cfg.nominal_context)
                p1 = cost.prefill_coef[1]
                pool.prefill_tps = 1.0 / p1 if p1 > 0 else 1e9
                pool.kv_bytes = espec.kv_bytes_per_token or cost.kv_bytes_per_token
                pool.ctx = PolicyContext(service_time=self._service_of, workflows=self.workflows_state,
                                         mean_step_s=5.0, default_steps=0)
                policy = make_queue_policy(cfg.queue_policy, **cfg.queue_options)
                if cfg.reference or not supports_fast(policy):
                    pool.queue = ReferencePool(policy, cfg.admission, espec.block_size, pool.ctx)
                else:
                    pool.queue = FastPool(policy, cfg.admission, espec.block_size, pool.ctx)
                pools.append(pool)
                self.pools.append(pool)
            self.cluster_pools.append((cspec, pools))

    def _service_of(self, request: SchedRequest) -> float:
        return self.service[request.request_id]

    def service_estimate(self, pool: _Pool, prompt: int, p50: int) -> float:
        return prompt / pool.prefill_tps + max(0, p50 - 1) * pool.tpot

    # -- predictions (made once per step, before the run: they depend on the request only) ------------------
    def _predict_all(self) -> dict[tuple[int, int], tuple[str, int, int]]:
        """Predict every step once (a prediction depends on the request only, never on the simulation).

        Without a prompt text the body carries a filler text of about the step's prompt length; requests that
        look the same to the predictor (role, prompt length, max_tokens, step index) share one prediction.
        A predictor with ``predict_many`` is called in batches."""
        predictor = self.predictor
        prior = isinstance(predictor, PriorPredictor)
        model = self.workload.model
        keys: dict[tuple[int, int], Any] = {}
        todo: dict[Any, tuple[dict, dict, int]] = {}
        for wi, wf in enumerate(self.workload.workflows):
            for si, step in enumerate(wf.steps):
                prompt = step.prompt_token_count()
                headers: dict[str, str] = {}
                if not wf.interactive:
                    headers = {"X-Agent-Role": step.role, "X-Workflow-Id": wf.id, "X-Workflow-Step": str(si)}
                if step.prompt_text is None or prior:
                    key: Any = (step.role if headers else None, prompt, step.max_tokens, si if headers else -1)
                else:
                    key = (wi, si)
                keys[(wi, si)] = key
                if key in todo:
                    continue
                if prior:
                    text = ""
                elif step.prompt_text is not None:
                    text = step.prompt_text
                else:
                    text = "lorem " * max(1, int(prompt / 1.04))
                body = {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": step.max_tokens}
                todo[key] = (body, headers, step.max_tokens)
        results: dict[Any, tuple[str, int, int]] = {}
        items = list(todo.items())
        many = getattr(predictor, "predict_many", None)
        chunk = 2048
        for start in range(0, len(items), chunk):
            part = items[start:start + chunk]
            if many is not None and not prior:
                preds = many([b for _, (b, _, _) in part], [h for _, (_, h, _) in part])
            else:
                preds = [predictor.predict(b, h) for _, (b, h, _) in part]
            for (key, (_, _, cap)), p in zip(part, preds):
                p50 = max(1, min(int(p.p50), cap))
                results[key] = (p.role, p50, max(p50, min(int(p.p90), cap)))
        return {ws: results[key] for ws, key in keys.items()}

    # -- events -------------------------------------------------------------------------------------------------
    def _push(self, t: float, kind: int, a: Any = None, b: Any = None) -> None:
        self._seq += 1
        heapq.heappush(self.events, (t, self._seq, kind, a, b))

    def schedule_engine(self, engine: DESEngine, t: float) -> None:
        self._seq += 1
        heapq.heappush(self.events, (t, self._seq, EV_ENGINE, engine, engine.version))

    def _ledger_changed(self, t: float, delta: int) -> None:
        if delta == 0:
            return
        dt = t - self._area_t
        if dt > 0:
            self._area += self._reserved_total * dt
            if self._area_t < self.window:
                self._area_window += self._reserved_total * (min(t, self.window) - self._area_t)
            self._area_t = t
        self._reserved_total += delta
        if self._reserved_total > self._reserved_peak:
            self._reserved_peak = self._reserved_total

    # -- run ----------------------------------------------------------------------------------------------------
    def run(self, progress: Callable[[SimProgress], None] | None = None) -> RunResult:
        """Simulate the workload. ``progress``, if given, is called about every ``PROGRESS_EVERY_S`` seconds of
        wall time with where the run has got to (from the sample events: nothing is added to the event loop)."""
        started = time.perf_counter()
        self._progress = progress
        self._progress_due = started + PROGRESS_EVERY_S
        wl = self.workload
        cfg = self.cfg
        preds = self._predict_all()
        predict_s = time.perf_counter() - started
        self.preds = preds
        # maestro's mean step time: configured, else the mean predicted service of the workload's workflow steps
        if cfg.mean_step_s is not None:
            mean_step = cfg.mean_step_s
        else:
            pool0 = self.pools[0]
            values = [self.service_estimate(pool0, wf.steps[si].prompt_token_count(), preds[(wi, si)][1])
                      for wi, wf in enumerate(wl.workflows) if not wf.interactive for si in range(len(wf.steps))]
            mean_step = sum(values) / len(values) if values else 5.0
        for pool in self.pools:
            pool.ctx.mean_step_s = mean_step
        self.mean_step_s = mean_step  # the starting value (reported)
        self._step_time = StepTimeMean(mean_step, cfg.step_time_window_s)
        self._step_applied = mean_step
        self.runs: list[_WorkflowRun] = []
        for wi, wf in enumerate(wl.workflows):
            run = _WorkflowRun()
            run.wf = wf
            run.index = wi
            run.deps_left = [len(s.depends_on) for s in wf.steps]
            ids = {s.id: i for i, s in enumerate(wf.steps)}
            run.succ = [[] for _ in wf.steps]
            for i, s in enumerate(wf.steps):
                for d in s.depends_on:
                    run.succ[ids[d]].append(i)
            run.dep_finish = [0.0] * len(wf.steps)
            run.done = 0
            run.finish = 0.0
            run.failed = False
            cls = cfg.slo_classes.get(wf.slo_class)
            rel = wf.deadline_s if wf.deadline_s is not None else (cls.workflow_deadline_s if cls else None)
            run.deadline = None if (wf.interactive or rel is None) else wf.arrival_s + rel
            run.result = WorkflowResult(wf.id, wf.kind, wf.slo_class, wf.arrival_s,
                                        None if wf.interactive else rel, steps=len(wf.steps))
            run.state = None
            self.runs.append(run)
            self._push(wf.arrival_s, EV_ARRIVAL, run)
        self._pending = len(self.runs)
        if cfg.sample_interval_s > 0:
            self._push(0.0, EV_SAMPLE)
        events = self.events
        max_events = cfg.max_events
        pop = heapq.heappop
        count = 0
        while events:
            t, _, kind, a, b = pop(events)
            self.now = t
            count += 1
            if kind == EV_ENGINE:
                if a.version != b:
                    continue
                a.on_event(t)
            elif kind == EV_RELEASE:
                self._release(a, b, t)
            elif kind == EV_ENQUEUE:
                self._enqueue(a, t)
            elif kind == EV_ARRIVAL:
                self._arrival(a, t)
            else:
                self._sample(t)
                if self._progress is not None:
                    self._report_progress(t, count, started)
                if self._pending > 0:
                    if not events:
                        raise RuntimeError(f"simulation stalled at t={t:.3f}s with {self._pending} workflows "
                                           "unfinished (a request that can never be admitted?)")
                    self._push(t + cfg.sample_interval_s, EV_SAMPLE)
            if max_events is not None and count >= max_events:
                raise RuntimeError(f"simulation exceeded {max_events} events")
        self.events_processed = count
        if self._pending > 0:
            raise RuntimeError(f"simulation stalled with {self._pending} workflows unfinished "
                               "(a request that can never be admitted?)")
        end = max(self.last_finish, 0.0)
        self._ledger_changed(end, 0)
        if end > self._area_t:
            self._area += self._reserved_total * (end - self._area_t)
            if self._area_t < self.window:
                self._area_window += self._reserved_total * (min(end, self.window) - self._area_t)
            self._area_t = end
        wall = time.perf_counter() - started
        return self._result(end, wall, predict_s)

    # -- workflow side --------------------------------------------------------------------------------------------
    def _arrival(self, run: _WorkflowRun, t: float) -> None:
        wf = run.wf
        if not wf.interactive:
            state = WorkflowState(wf.id, wf.arrival_s, run.deadline, wf.slo_class,
                                  expected_steps=len(wf.steps) if self.cfg.step_hint else None,
                                  last_activity=t)
            run.state = state
            self.workflows_state[wf.id] = state
        for i, step in enumerate(wf.steps):
            if not step.depends_on:
                if step.think_time_s > 0:
                    self._push(t + step.think_time_s, EV_RELEASE, run, i)
                else:
                    self._release(run, i, t)

    def _release(self, run: _WorkflowRun, si: int, t: float) -> None:
        wf = run.wf
        step = wf.steps[si]
        role, p50, p90 = self.preds[(run.index, si)]
        prompt = step.prompt_token_count()
        # like vLLM: the output is capped by what the context leaves (a longer prompt is an error)
        room = self.max_model_len - prompt
        if room < 1:
            raise ValueError(f"{wf.id}/{step.id}: prompt of {prompt} tokens does not fit the engines' "
                             f"max_model_len {self.max_model_len}")
        max_tokens = min(step.max_tokens, room)
        output = min(step.output_tokens, max_tokens)
        p50, p90 = min(p50, max_tokens), min(p90, max_tokens)
        self._reqseq += 1
        rid = f"{wf.id}/{step.id}"
        cls = self.cfg.slo_classes.get(wf.slo_class) or self.cfg.slo_classes.get(INTERACTIVE)
        ratio = self.cfg.prompt_estimate_ratio  # what the gateway believes (reservation, service estimate)
        estimated = prompt if ratio == 1.0 else max(1, round(prompt * ratio))
        sched = SchedRequest(
            request_id=rid, model=self.workload.model, arrival=t, prompt_tokens=estimated,
            max_tokens=max_tokens, pred_p50=p50, pred_p90=p90, role=role, slo_class=wf.slo_class,
            workflow_id=None if wf.interactive else wf.id, step=si, deadline=run.deadline,
            ttft_deadline=(t + cls.ttft_s) if (wf.interactive and cls is not None) else None)
        req = SimReq(rid, prompt, output, self._reqseq)
        req.gw_prompt = estimated
        req.sched = sched
        req.run = run
        req.step_index = si
        req.release = t
        self._by_rid[rid] = req
        # cluster choice
        pool = self._choose_pool(sched)
        req.pool = pool
        svc = self.service_estimate(pool, estimated, p50)
        req.service = svc
        self.service[rid] = svc
        pool.queued += 1
        pool.queued_work += svc
        pool.transit_work += svc
        state = run.state
        if state is not None:
            state.inflight.add(rid)
            state.last_activity = t
            self._rekey(wf.id, t)  # its queued siblings' remaining work changed
        if pool.rtt > 0:
            self._push(t + pool.rtt / 2, EV_ENQUEUE, req)
        else:
            self._enqueue(req, t)

    def _rekey(self, workflow_id: str, t: float) -> None:
        for p in self.pools:
            if workflow_id in getattr(p.queue, "by_workflow", ()):
                p.queue.rekey_workflow(workflow_id, t)

    def _learn_step_time(self, service_s: float, ended: float, t: float) -> None:
        """Update the mean step time as the live gateway does when a workflow step ends (at the gateway: ``ended``);
        queue keys hold the value in use, so it is applied (and queued workflow steps re-keyed) once it drifted."""
        mean = self._step_time.add(service_s, ended)
        if abs(mean - self._step_applied) <= STEP_TIME_REKEY_DRIFT * self._step_applied:
            return
        self._step_applied = mean
        for pool in self.pools:
            pool.ctx.mean_step_s = self._step_applied
            pool.queue.rekey_all(t)

    def _choose_pool(self, sched: SchedRequest) -> _Pool:
        model = sched.model
        candidates: list[_Pool] = []
        for _, pools in self.cluster_pools:
            for p in pools:
                if (not p.models or model in p.models) and p.engines:
                    candidates.append(p)
                    break
        if not candidates:
            raise RuntimeError(f"no pool serves model {model!r}")
        if len(candidates) == 1:
            candidates[0].routed += 1
            return candidates[0]
        loads = []
        tokens = reservation_tokens(self.cfg.admission, sched, candidates[0].spec.block_size)
        aware = self.cfg.cluster_routing == "latency_aware"
        need_kv = aware and self.cfg.admission != "none"
        rid = sched.request_id
        for p in candidates:
            free_kv = None
            if need_kv:
                free_kv = max(p.free)
            work = p.queued_work
            if aware:
                # the queued work this request would wait behind, in the pool's own queue order
                self.service[rid] = self.service_estimate(p, sched.prompt_tokens, sched.pred_p50)
                work = p.queue.work_ahead(sched, self.now) + p.transit_work
            # time per output token at the pool's current batch (more requests per engine: slower tokens)
            batch = min(p.spec.max_num_seqs, max(1, (p.outstanding + len(p.engines) - 1) // len(p.engines)))
            tpot = p.cost.decode_s(batch, batch * self.cfg.nominal_context)
            loads.append(ClusterLoad(p.cluster, p.rtt, p.slots, p.outstanding, p.queued, work,
                                     p.concurrency, free_kv, tpot, p.prefill_tps))
        name = self.router.choose(ClusterRequest(sched.prompt_tokens, sched.pred_p50, tokens), loads)
        for p in candidates:
            if p.cluster == name:
                p.routed += 1
                return p
        raise RuntimeError(f"cluster routing chose unknown cluster {name!r}")

    def _enqueue(self, req: SimReq, t: float) -> None:
        pool = req.pool
        pool.transit_work -= req.service
        pool.queue.submit(req.sched, t)
        self._dispatch(pool, t)

    def _dispatch(self, pool: _Pool, t: float) -> None:
        if pool.open_count == 0 or not pool.queue.waiting:
            return
        self.dispatches += 1
        ledger = self.ledger
        ids = pool.ids
        proposals = pool.queue.plan_arrays(t, ids, pool.free, pool.out, pool.caps)
        if not proposals:
            return
        index = {e: i for i, e in enumerate(ids)}
        for sched, eid, tokens in proposals:
            if not ledger.reserve(sched.request_id, eid, tokens):
                continue  # cannot happen with one gateway; a proposal that loses a race stays queued
            self._ledger_changed(t, tokens)
            pool.queue.admitted(sched, eid, t)
            i = index[eid]
            pool.free[i] -= tokens
            pool.out[i] += 1
            pool.outstanding += 1
            if pool.out[i] == pool.caps[i]:
                pool.open_count -= 1
            req = self._by_rid.pop(sched.request_id)
            pool.queued -= 1
            pool.queued_work -= req.service
            req.reserved = tokens
            req.max_reserved = tokens
            pool.engines[i].add(req, t)

    # EngineHooks ------------------------------------------------------------------------------------------------
    def on_first_token(self, req: SimReq, t: float) -> None:
        pass

    def on_grow(self, req: SimReq, generated: int, t: float) -> int:
        sched = req.sched
        new = grown_reservation(sched, generated, req.pool.spec.block_size, self.cfg.growth_step_tokens)
        if new is None:
            return req.reserved
        before = req.reserved
        self.ledger.grow(req.rid, new, force=True)
        held = self.ledger.reservation(req.rid)
        after = held.tokens if held is not None else before
        sched.reserved_tokens = after
        self._ledger_changed(t, after - before)
        req.pool.free[req.engine.index] -= after - before  # type: ignore[union-attr]
        if after > req.max_reserved:
            req.max_reserved = after
        self.growths += 1
        return after

    def on_finish(self, reqs: list[SimReq], t: float) -> None:
        pools: list[_Pool] = []
        for req in reqs:
            pool = req.pool
            freed = self.ledger.release(req.rid)
            self._ledger_changed(t, -freed)
            engine = req.engine
            i = engine.index  # type: ignore[attr-defined]
            pool.free[i] += freed
            if pool.out[i] == pool.caps[i]:
                pool.open_count += 1
            pool.out[i] -= 1
            pool.outstanding -= 1
            if pool not in pools:
                pools.append(pool)
            self._complete(req, t)
        for pool in pools:
            self._dispatch(pool, t)

    def _complete(self, req: SimReq, t: float) -> None:
        run = req.run
        wf = run.wf
        step = wf.steps[req.step_index]
        half = req.pool.rtt / 2
        cls = self.cfg.slo_classes.get(wf.slo_class)
        self.requests.append(RequestResult(
            request_id=req.rid, workflow_id=None if wf.interactive else wf.id, step_id=step.id,
            role=step.role, slo_class=wf.slo_class, arrival=req.release, prompt_tokens=req.prompt,
            output_tokens=req.target, first_token=req.first_token + half, finish=t + half,
            ttft_target_s=cls.ttft_s if cls else None, tpot_target_s=cls.tpot_s if cls else None,
            preemptions=req.preemptions, reserved_tokens=req.max_reserved))
        self.service.pop(req.rid, None)  # the queues' service estimate, no longer asked for once it has run
        state = run.state
        if state is not None:
            state.inflight.discard(req.rid)
            state.steps_done += 1
            state.tokens_used += req.prompt + req.target
            state.last_activity = t
            self._rekey(wf.id, t)
            if self.cfg.learn_step_time:
                self._learn_step_time(req.service, t + half, t)
        client_t = t + half
        if client_t > self.last_finish:
            self.last_finish = client_t
        run.done += 1
        if client_t > run.finish:
            run.finish = client_t
        for j in run.succ[req.step_index]:
            run.deps_left[j] -= 1
            if client_t > run.dep_finish[j]:
                run.dep_finish[j] = client_t
            if run.deps_left[j] == 0:
                self._push(run.dep_finish[j] + wf.steps[j].think_time_s, EV_RELEASE, run, j)
        if run.done == len(wf.steps):
            res = run.result
            res.finish = run.finish
            res.steps_ok = run.done
            self.wf_results.append(res)
            self.workflows_state.pop(wf.id, None)
            self._pending -= 1

    # -- sampling and results ---------------------------------------------------------------------------------
    def _report_progress(self, t: float, events: int, started: float) -> None:
        now = time.perf_counter()
        if now < self._progress_due:
            return
        self._progress_due = now + PROGRESS_EVERY_S
        queued = int(self.series["queued_requests"][-1][1])
        self._progress(SimProgress(t, self.window, len(self.runs) - self._pending, len(self.runs), queued, events,
                                   now - started))

    def _sample(self, t: float) -> None:
        used = 0
        for pool in self.pools:
            bs = pool.spec.block_size
            for e in pool.engines:
                if e.mode != IDLE:
                    used += e.used_blocks(t) * bs
        self.series["reserved_kv_tokens"].append((t, float(self._reserved_total)))
        self.series["used_kv_tokens"].append((t, float(used)))
        self.series["queued_requests"].append((t, float(sum(len(p.queue) for p in self.pools))))

    def _result(self, end: float, wall: float, predict_s: float) -> RunResult:
        cfg = self.cfg
        kv_bytes = self.pools[0].kv_bytes
        capacity = sum(self.ledger.capacity(e) for p in self.pools for e in p.ids)
        run_mean = self._area / end if end > 0 else 0.0
        # the arrival window is [0, last arrival]; when every workflow arrives at t=0 it is empty, and the whole
        # run is the only span over which a time average means anything (the area was accumulated over it)
        if self.window > 0:
            window, reserved_mean = self.window, self._area_window / self.window
        else:
            window, reserved_mean = end, run_mean
        used = self.series["used_kv_tokens"]
        used_window = [v for t, v in used if t <= window]
        reserved_window = [v for t, v in self.series["reserved_kv_tokens"] if t <= window]
        kv = {
            "kv_bytes_per_token": kv_bytes,
            "capacity_tokens": capacity,
            "reserved_mean_tokens": reserved_mean,
            "reserved_mean_tokens_run": run_mean,
            "reserved_peak_tokens": self._reserved_peak,
            # used KV is only known from the samples: without any (sample_interval_s 0) it is unknown (None), not 0
            "used_mean_tokens": _mean(used_window),
            "used_peak_tokens": max(v for _, v in used) if used else None,
            "reserved_sampled_mean_tokens": _mean(reserved_window),
            "window_s": window,
            "growths": self.growths,
        }
        for name in ("reserved_mean", "reserved_peak", "used_mean"):
            value = kv[f"{name}_tokens"]
            kv[f"{name}_bytes"] = None if value is None else value * kv_bytes
        engines = [e for p in self.pools for e in p.engines]
        self.requests.sort(key=lambda r: (r.arrival, r.request_id))
        self.wf_results.sort(key=lambda w: (w.arrival, w.workflow_id))
        meta = {
            "load": self.workload.offered_load(),  # a live run of this workload records it as meta.workload_load
            "simulated_s": end,
            "wall_s": wall,
            "predict_s": predict_s,
            "events": self.events_processed,
            "dispatches": self.dispatches,
            "engines": len(engines),
            "iterations": sum(e.iterations for e in engines),
            "engine_preemptions": sum(e.preemptions for e in engines),
            "engine_busy_share": (sum(e.busy_s for e in engines) / (len(engines) * end)) if engines and end > 0 else 0.0,
            "mean_step_s": self.mean_step_s,
            "mean_step_s_learned": self._step_time.mean_s,
            "kv": kv,
            "config": _config_json(cfg),
            "workload": {"name": self.workload.name, "seed": self.workload.seed,
                         "workflows": len(self.workload.workflows),
                         "requests": sum(len(w.steps) for w in self.workload.workflows)},
            "cost_model": self.pools[0].engines[0].cost.source if engines else None,
            "ledger_left": len(self.ledger),
            "requests_per_cluster": {p.cluster: p.routed for p in self.pools},
            "free_mirror_ok": all(p.free[i] == self.ledger.free(e) for p in self.pools for i, e in enumerate(p.ids)),
        }
        return RunResult(mode="simulate",
                         policy={"queue": cfg.queue_policy, "admission": cfg.admission,
                                 "routing": cfg.cluster_routing},
                         requests=self.requests, workflows=self.wf_results, series=self.series, meta=meta)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _config_json(cfg: SimConfig) -> dict[str, Any]:
    out = asdict(cfg)
    out["slo_classes"] = {k: asdict(v) for k, v in cfg.slo_classes.items()}
    return out


def simulate(workload: Workload, config: SimConfig, predictor: Any = None,
             cost_model: EngineCostModel | None = None,
             progress: Callable[[SimProgress], None] | None = None) -> RunResult:
    """Run ``workload`` on ``config`` and return the results (deterministic: same inputs, same result; a
    ``progress`` callback, see :meth:`Simulator.run`, changes nothing of them)."""
    return Simulator(workload, config, predictor, cost_model).run(progress)
