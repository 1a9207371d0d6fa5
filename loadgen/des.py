"""The discrete-event simulator (``maestro loadgen simulate``): the gateway's own scheduling core on a virtual clock.

What is real and what is modelled
---------------------------------
*Real* (imported, not copied): the queue policies and the pool scheduler's dispatch rule
(:mod:`gateway.core.queue_policy`, :mod:`gateway.core.scheduler`), the admission policies and reservation growth
(:mod:`gateway.core.admission`), the KV ledger (:mod:`gateway.core.ledger`), the cluster choice
(:mod:`gateway.core.cluster_routing`), the request model (:mod:`gateway.core.request`) and the predictor
(anything with ``predict(body, headers)``; :class:`PriorPredictor` when no trained model is given).
*Modelled*: the network (a fixed round trip per cluster) and the engines (:mod:`loadgen.des_engine`, advanced
analytically between events), with the engine cost model shared with the simulated HTTP engines
(:class:`backends.sim.cost_model.EngineCostModel`) and the scheduling rules of :mod:`backends.sim.engine` (vLLM
V1's): continuous batching up to ``max_num_seqs`` sequences and ``max_num_batched_tokens`` tokens per iteration, a
paged KV cache of ``kv_blocks`` blocks, head-of-line admission, and preemption by recompute of the last admitted
request when a running request cannot get its next block.

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

The pool queue is :class:`loadgen.des_pools.FastPool` by default (``reference=True``: the gateway's own
:class:`~gateway.core.scheduler.PoolScheduler`; see :mod:`loadgen.des_pools`).

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

import heapq
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from backends.sim.cost_model import EngineCostModel
from gateway.core.admission import grown_reservation, reservation_tokens
from gateway.core.cluster_routing import ClusterLoad, ClusterRequest, make_cluster_routing
from gateway.core.ledger import KVLedger
from gateway.core.queue_policy import PolicyContext, StepTimeMean, make_queue_policy
from gateway.core.request import INTERACTIVE, SchedRequest, WorkflowState
from loadgen.des_config import ClusterSpec, EngineSpec, PoolSpec, SimConfig
from loadgen.des_engine import IDLE, DESEngine, EngineHooks, SimReq
from loadgen.des_pools import FastPool, ReferencePool, supports_fast
from loadgen.results import RequestResult, RunResult, WorkflowResult
from loadgen.slo import check_workload_slo_classes
from loadgen.workload import Workload
from predictor.features import explicit_role_of, max_tokens_of
from predictor.predictor import DEFAULT_PRIORS


INF = math.inf

# Re-key the queues when the learned mean step time moved 5 % from the one in use (smaller moves reorder little
# and would cost a re-sort of every queue each time).
STEP_TIME_REKEY_DRIFT = 0.05

PROGRESS_EVERY_S = 2.0  # wall seconds between two progress reports of a run that asked for them


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


class PoolRun:
    __slots__ = ("name", "cluster", "spec", "engines", "ids", "caps", "out", "open_count", "queue", "ctx",
                 "queued", "queued_work", "tpot", "prefill_tps", "concurrency", "slots", "rtt", "models",
                 "kv_bytes", "outstanding", "free", "routed", "cost", "transit_work")

    def __init__(self) -> None:
        pass


class WorkflowRun:
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
        self.pools: list[PoolRun] = []
        self.cluster_pools: list[tuple[ClusterSpec, list[PoolRun]]] = []
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
                pool = PoolRun()
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

    def service_estimate(self, pool: PoolRun, prompt: int, p50: int) -> float:
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
        self.runs: list[WorkflowRun] = []
        for wi, wf in enumerate(wl.workflows):
            run = WorkflowRun()
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
    def _arrival(self, run: WorkflowRun, t: float) -> None:
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

    def _release(self, run: WorkflowRun, si: int, t: float) -> None:
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

    def _choose_pool(self, sched: SchedRequest) -> PoolRun:
        model = sched.model
        candidates: list[PoolRun] = []
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

    def _dispatch(self, pool: PoolRun, t: float) -> None:
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
        pools: list[PoolRun] = []
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
            "engine_busy_share": ((sum(e.busy_s for e in engines) / (len(engines) * end)) if engines and end > 0
                                  else 0.0),
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



# what a user of the simulator imports from here (the configuration's types live in loadgen.des_config)
__all__ = ["ClusterSpec", "EngineSpec", "PoolSpec", "PriorPredictor", "SimConfig", "SimProgress", "Simulator",
           "load_predictor", "simulate"]
