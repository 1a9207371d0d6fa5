"""The discrete-event simulator: engine semantics, policy equivalence, conservation, determinism, experiments."""

from __future__ import annotations

import dataclasses
import heapq
import json
import math
import random

import pytest

from backends.sim.cost_model import EngineCostModel
from backends.sim.engine import SimEngine
from backends.sim.options import SimEngineOptions
from gateway.core.cluster_routing import (ClusterLoad, ClusterRequest, estimated_completion_s,
                                          make_cluster_routing)
from gateway.core.queue_policy import LeastSlackFirst, Maestro, PolicyContext, make_queue_policy
from gateway.core.request import SchedRequest, WorkflowState
from gateway.core.scheduler import EngineSlot, PoolScheduler
from loadgen.des import ClusterSpec, EngineSpec, PoolSpec, PriorPredictor, SimConfig, simulate
from loadgen.des_engine import DESEngine, EngineHooks, SimReq
from loadgen.des_pools import FastPool
from loadgen.workload import Step, Workflow, Workload
from predictor.predictor import DEFAULT_PRIORS


@pytest.fixture(scope="module")
def cost() -> EngineCostModel:
    return EngineCostModel()


# ------------------------------------------------------------------------------------------ analytic engine


class _FakeLoop:
    def __init__(self) -> None:
        self.t = 0.0

    def time(self) -> float:
        return self.t


def _stepwise(spec: EngineSpec, cost: EngineCostModel, arrivals: list[tuple[float, str, int, int]]) -> dict:
    """backends.sim.engine.SimEngine stepped one iteration at a time on a virtual clock (the reference)."""
    engine = SimEngine(SimEngineOptions(max_num_seqs=spec.max_num_seqs, kv_blocks=spec.kv_blocks,
                                        block_size=spec.block_size, max_num_batched_tokens=spec.max_num_batched_tokens,
                                        max_model_len=spec.max_model_len), cost)
    loop = _FakeLoop()
    engine._loop = loop
    pending = sorted(arrivals)
    reqs = {}
    i, t = 0, 0.0
    while i < len(pending) or engine.running or engine.num_waiting:
        if not engine.running and not engine.num_waiting:
            t = max(t, pending[i][0])
        loop.t = t
        while i < len(pending) and pending[i][0] <= t:
            _, rid, prompt, out = pending[i]
            reqs[rid] = engine.add_request(rid, prompt, out)
            i += 1
        scheduled = engine._schedule(t)
        assert scheduled
        t += engine._step_seconds(scheduled)
        loop.t = t
        engine._apply(scheduled, t)
    return {rid: (r.first_token_at, r.finished_at, r.preemptions) for rid, r in reqs.items()}


class _Driver(EngineHooks):
    def __init__(self, grow_by: int = 0) -> None:
        self.heap: list = []
        self.seq = 0
        self.grow_by = grow_by
        self.grows = 0

    def schedule_engine(self, engine, t):
        self.seq += 1
        heapq.heappush(self.heap, (t, 1, self.seq, engine, engine.version))

    def on_grow(self, req, generated, t):
        self.grows += 1
        return req.prompt + generated + self.grow_by


def _analytic(spec, cost, arrivals, grow_by: int = 0):
    driver = _Driver(grow_by)
    engine = DESEngine("e", spec, cost, driver, grow=grow_by > 0)
    reqs = {}
    for n, (ta, rid, prompt, out) in enumerate(sorted(arrivals)):
        r = SimReq(rid, prompt, out, n)
        r.reserved = prompt + 1 if grow_by else 0
        reqs[rid] = r
        driver.seq += 1
        heapq.heappush(driver.heap, (ta, 0, driver.seq, r, None))
    events = 0
    while driver.heap:
        t, kind, _, a, version = heapq.heappop(driver.heap)
        if kind == 0:
            engine.add(a, t)
        elif a.version == version:
            events += 1
            a.on_event(t)
    assert engine.free == spec.kv_blocks and not engine.running and not engine.waiting
    return {rid: (r.first_token, r.finish, r.preemptions) for rid, r in reqs.items()}, events, engine, driver


def _random_case(seed: int, n: int = 50):
    rng = random.Random(seed)
    spec = EngineSpec(max_num_seqs=rng.choice([4, 8, 16]), kv_blocks=rng.choice([64, 128, 512]),
                      block_size=rng.choice([4, 16]), max_num_batched_tokens=rng.choice([64, 256, 2048]),
                      max_model_len=256)
    arrivals, t = [], 0.0
    for i in range(n):
        t += rng.expovariate(20.0)
        prompt = rng.randint(1, 180)
        arrivals.append((round(t, 6), f"r{i}", prompt, rng.randint(1, 256 - prompt)))
    return spec, arrivals


def test_analytic_engine_matches_the_simulated_engine_stepped_iteration_by_iteration(cost):
    preempted = chunked = 0
    for seed in range(24):
        spec, arrivals = _random_case(seed)
        ref = _stepwise(spec, cost, arrivals)
        got, events, engine, _ = _analytic(spec, cost, arrivals)
        for rid, (first, finish, preemptions) in ref.items():
            assert got[rid][2] == preemptions, (seed, rid)
            assert got[rid][0] == pytest.approx(first, abs=1e-7), (seed, rid)
            assert got[rid][1] == pytest.approx(finish, abs=1e-7), (seed, rid)
        assert events < engine.iterations  # it jumps over iterations instead of stepping them
        preempted += sum(v[2] for v in ref.values()) > 0
        chunked += spec.max_num_batched_tokens < 180
    assert preempted >= 5 and chunked >= 3  # the cases cover preemption and chunked prefill


def test_reservation_growth_events_do_not_change_engine_timing(cost):
    spec, arrivals = _random_case(3)
    plain, _, _, _ = _analytic(spec, cost, arrivals)
    grown, _, _, driver = _analytic(spec, cost, arrivals, grow_by=5)
    assert driver.grows > 20
    for rid in plain:
        assert grown[rid] == pytest.approx(plain[rid], abs=1e-9)


def test_analytic_engine_decode_stretch_is_one_event(cost):
    spec = EngineSpec(max_num_seqs=8, kv_blocks=4096, block_size=16, max_model_len=2048)
    got, events, engine, _ = _analytic(spec, cost, [(0.0, "a", 100, 1000)])
    # one prefill iteration + 999 decode iterations, in two events (admission wake-up is the first)
    assert engine.iterations == 1000
    assert events <= 3
    d0, d1, d2 = cost.decode_coef
    expected = cost.step_s(0, 0, 100, 100 * 100) + sum(d0 + d1 + d2 * (101 + j) for j in range(999))
    assert got["a"][1] == pytest.approx(expected, rel=1e-9)


# ------------------------------------------------------------------------------------------ FastPool == PoolScheduler


def _random_requests(rng: random.Random, n: int, now: float, workflows: dict) -> list[SchedRequest]:
    out = []
    for i in range(n):
        interactive = rng.random() < 0.4
        arrival = now - rng.uniform(0, 200)
        wf = None if interactive else f"w{rng.randrange(6)}"
        if wf is not None and wf not in workflows:
            workflows[wf] = WorkflowState(wf, arrival - 5, arrival + rng.uniform(-50, 400), expected_steps=rng.randint(1, 8))
        deadline = None if wf is None else workflows[wf].deadline
        p50 = rng.randint(1, 900)
        out.append(SchedRequest(f"q{now:.3f}-{i}", "m", arrival, rng.randint(1, 3000), rng.choice([512, 4096]),
                                p50, p50 + rng.randint(0, 900), workflow_id=wf, step=rng.randint(0, 5),
                                deadline=deadline, ttft_deadline=arrival + 2.0 if interactive else None))
    return out


@pytest.mark.parametrize("policy_name", ["fcfs", "edf", "lsf", "maestro"])
@pytest.mark.parametrize("admission", ["none", "max_tokens", "predicted"])
def test_fastpool_plans_exactly_like_pool_scheduler(policy_name, admission):
    rng = random.Random(hash((policy_name, admission)) & 0xFFFF)
    for case in range(12):
        workflows: dict[str, WorkflowState] = {}
        service: dict[str, float] = {}
        ctx = PolicyContext(service_time=lambda r: service[r.request_id], workflows=workflows,
                            mean_step_s=rng.uniform(1, 20), default_steps=2)
        options = {"max_wait_s": rng.choice([30.0, 120.0])} if policy_name in ("lsf", "maestro") else {}
        ref = PoolScheduler(make_queue_policy(policy_name, **options), admission)
        fast = FastPool(make_queue_policy(policy_name, **options), admission, 16, ctx)
        now = 1000.0
        for step in range(8):
            for r in _random_requests(rng, rng.randint(0, 25), now, workflows):
                service[r.request_id] = rng.choice([0.5, 1.5, 3.0, rng.uniform(0, 60)])
                r2 = SchedRequest(**{f: getattr(r, f) for f in r.__slots__})
                ref.submit(r)
                fast.submit(r2, now)
            if rng.random() < 0.5 and workflows:  # a workflow makes progress: its queued steps re-key
                wf = rng.choice(sorted(workflows))
                workflows[wf].steps_done += 1
                fast.rekey_workflow(wf, now)
            engines = [EngineSlot(f"e{i}", rng.randint(0, 20000), rng.randint(0, 6), rng.randint(1, 8))
                       for i in range(rng.randint(1, 6))]
            want = [(r.request_id, e, t) for r, e, t in ref.plan(now, engines, ctx)]
            got = [(r.request_id, e, t) for r, e, t in fast.plan(now, engines)]
            assert got == want, (policy_name, admission, case, step)
            for rid, eid, _ in want:  # admit about half of the proposals (the rest "lost a race")
                if rng.random() < 0.5:
                    ref.admitted(ref.waiting[rid], eid, now)
                    fast.admitted(fast.waiting[rid], eid, now)
            assert sorted(ref.waiting) == sorted(fast.waiting)
            now += rng.choice([0.5, 10.0, 60.0, 150.0])


# ------------------------------------------------------------------------------------------ the simulator


def _small_workload(seed: int = 1, n: int = 60, rate: float = 2.0) -> Workload:
    rng = random.Random(seed)
    workflows, t = [], 0.0
    for i in range(n):
        t += rng.expovariate(rate)
        if rng.random() < 0.5:
            prompt = rng.randint(50, 1500)
            workflows.append(Workflow(f"chat-{i}", round(t, 4), [Step("call", "assistant", rng.randint(5, 400), prompt,
                                                                       max_tokens=4096)],
                                      kind="interactive", slo_class="interactive"))
        else:
            steps, prev = [], None
            for j, role in enumerate(("planner", "coder", "reviewer", "tester")[: rng.randint(1, 4)]):
                steps.append(Step(f"s{j}", role, rng.randint(5, 900), rng.randint(200, 2500),
                                  depends_on=(prev,) if prev else (), think_time_s=rng.choice([0.0, 0.5]),
                                  max_tokens=4096))
                prev = f"s{j}"
            workflows.append(Workflow(f"wf-{i}", round(t, 4), steps, deadline_s=rng.uniform(20, 200)))
    return Workload(workflows, name="small", seed=seed)


def _config(**options) -> SimConfig:
    engine = options.pop("engine", EngineSpec(max_num_seqs=16, kv_blocks=1024, max_model_len=8192))
    clusters = options.pop("clusters", [ClusterSpec("a", 0.002, (PoolSpec("llm", 2, engine),)),
                                        ClusterSpec("b", 0.04, (PoolSpec("llm", 2, engine),))])
    return SimConfig(clusters=clusters, **options)


def _comparable(run) -> dict:
    data = run.to_json()
    for key in ("wall_s", "predict_s"):
        data["meta"].pop(key)
    return data


def test_same_seed_same_result():
    a = simulate(_small_workload(4), _config(queue_policy="maestro"))
    b = simulate(_small_workload(4), _config(queue_policy="maestro"))
    assert json.dumps(_comparable(a), default=str) == json.dumps(_comparable(b), default=str)


@pytest.mark.parametrize("policy", ["fcfs", "edf", "lsf", "maestro"])
def test_fastpool_simulation_equals_reference_scheduler(policy):
    # light load, and a load with deep queues (where cluster routing reads the work queued ahead in tier order)
    for workload in (_small_workload(2, n=50, rate=3.0), _small_workload(2, n=120, rate=10.0)):
        options = {"max_wait_s": 20.0} if policy in ("lsf", "maestro") else {}
        fast = simulate(workload, _config(queue_policy=policy, queue_options=options))
        slow = simulate(workload, _config(queue_policy=policy, queue_options=options, reference=True))
        assert [r.to_json() for r in fast.requests] == [r.to_json() for r in slow.requests]
        assert fast.meta["dispatches"] == slow.meta["dispatches"]


def test_mean_step_time_is_learned_online_like_the_gateway():
    """A starting mean step time far off (the gateway's configured default, say) is corrected online from the
    completed steps' predicted service, as the live gateway does; the queues are re-keyed on the way and the
    schedule still equals the reference's."""
    workload = _small_workload(3, n=150, rate=12.0)
    options = {"max_wait_s": 20.0}
    fast = simulate(workload, _config(queue_policy="maestro", queue_options=options, mean_step_s=20.0))
    start, learned = fast.meta["mean_step_s"], fast.meta["mean_step_s_learned"]
    assert start == 20.0 and learned < 4.0  # the workload's steps are about 1.5 s of predicted service
    slow = simulate(workload, _config(queue_policy="maestro", queue_options=options, mean_step_s=20.0,
                                      reference=True))
    assert [r.to_json() for r in fast.requests] == [r.to_json() for r in slow.requests]
    fixed = simulate(workload, _config(queue_policy="maestro", queue_options=options, mean_step_s=20.0,
                                       learn_step_time=False))
    assert fixed.meta["mean_step_s_learned"] == fixed.meta["mean_step_s"] == start
    assert [r.to_json() for r in fixed.requests] != [r.to_json() for r in fast.requests]


def test_dropping_stale_queue_timers_changes_no_schedule(monkeypatch):
    """Re-keys leave each queued request's earlier timer in the heap; the heap is rebuilt with only the live ones
    once stale ones pile up (always, here), and the schedule is the reference scheduler's all the same."""
    import loadgen.des_pools as des_pools

    monkeypatch.setattr(des_pools, "TIMER_HEAP_SLACK", 0)
    rebuilt = []
    real = des_pools.FastPool._drop_stale_timers

    def counted(self):
        real(self)
        rebuilt.append(len(self.timers))
        assert len(self.timers) <= len(self.waiting)

    monkeypatch.setattr(des_pools.FastPool, "_drop_stale_timers", counted)
    workload = _small_workload(3, n=150, rate=12.0)
    options = {"max_wait_s": 20.0}
    fast = simulate(workload, _config(queue_policy="maestro", queue_options=options, mean_step_s=20.0))
    slow = simulate(workload, _config(queue_policy="maestro", queue_options=options, mean_step_s=20.0,
                                      reference=True))
    assert rebuilt and [r.to_json() for r in fast.requests] == [r.to_json() for r in slow.requests]


@pytest.mark.parametrize("admission", ["none", "max_tokens", "predicted"])
def test_conservation(admission):
    workload = _small_workload(3, n=80, rate=4.0)
    engine = EngineSpec(max_num_seqs=8, kv_blocks=300, max_model_len=4096, max_num_batched_tokens=2048)
    run = simulate(workload, _config(admission=admission, engine=engine, sample_interval_s=0.5))
    ids = [r.request_id for r in run.requests]
    assert len(ids) == len(set(ids)) == sum(len(w.steps) for w in workload.workflows)
    assert all(r.finish is not None and r.first_token is not None and r.arrival <= r.first_token <= r.finish
               for r in run.requests)
    assert len(run.workflows) == len(workload.workflows)
    assert all(w.steps_ok == w.steps for w in run.workflows)
    assert run.meta["ledger_left"] == 0 and run.meta["free_mirror_ok"]
    kv = run.meta["kv"]
    reserved = [v for _, v in run.series["reserved_kv_tokens"]]
    if admission == "max_tokens":  # worst-case reservations never need to grow past the capacity
        assert kv["reserved_peak_tokens"] <= kv["capacity_tokens"]
        assert max(reserved) <= kv["capacity_tokens"]
        assert kv["growths"] == 0
    if admission == "none":
        assert kv["reserved_peak_tokens"] == 0
        assert run.meta["engine_preemptions"] > 0  # the engines' own KV runs out and they preempt
    used = [v for _, v in run.series["used_kv_tokens"]]
    assert max(used) <= kv["capacity_tokens"]
    # every step ran after its dependencies finished
    finish = {r.request_id: r.finish for r in run.requests}
    for wf in workload.workflows:
        for step in wf.steps:
            for dep in step.depends_on:
                assert finish[f"{wf.id}/{step.id}"] > finish[f"{wf.id}/{dep}"]


def test_predicted_reserves_less_than_max_tokens_and_grows_overruns():
    workload = _small_workload(5, n=60, rate=2.0)
    worst = simulate(workload, _config(admission="max_tokens"))
    pred = simulate(workload, _config(admission="predicted", queue_policy="edf"))
    assert pred.meta["kv"]["reserved_mean_tokens"] < 0.6 * worst.meta["kv"]["reserved_mean_tokens"]
    assert pred.meta["kv"]["growths"] > 0  # some outputs outlive their p90
    by_id = {r.request_id: r for r in pred.requests}
    grown = [r for r in by_id.values() if r.reserved_tokens >= r.prompt_tokens + r.output_tokens]
    assert grown


def _one_engine(**options) -> SimConfig:
    engine = EngineSpec(max_num_seqs=1, kv_blocks=1024, max_model_len=8192)
    return SimConfig(clusters=[ClusterSpec("a", 0.0, (PoolSpec("llm", 1, engine),))], queue_per_engine=0,
                     **options)


def _single(id_, arrival, prompt, output, deadline, role="coder"):
    return Workflow(id_, arrival, [Step("s", role, output, prompt)], deadline_s=deadline)


def test_edf_serves_the_earlier_deadline_first_and_fcfs_the_earlier_arrival():
    workload = Workload([_single("first", 0.0, 100, 200, 1000.0), _single("late-deadline", 0.1, 100, 50, 500.0),
                         _single("early-deadline", 0.2, 100, 50, 100.0)])
    order = {}
    for policy in ("fcfs", "edf"):
        run = simulate(workload, _one_engine(queue_policy=policy, sample_interval_s=0))
        order[policy] = [r.workflow_id for r in sorted(run.requests, key=lambda r: r.finish)]
    assert order["fcfs"] == ["first", "late-deadline", "early-deadline"]
    assert order["edf"] == ["first", "early-deadline", "late-deadline"]


def test_maestro_puts_hopeless_work_last_where_edf_serves_it_first():
    # "doomed" cannot make its deadline (its service alone is longer); EDF still serves it first and makes
    # "feasible" late too; maestro serves "feasible" first, so one deadline is met instead of none
    workload = Workload([_single("busy", 0.0, 100, 300, 1000.0), _single("doomed", 0.1, 100, 2000, 2.0),
                         _single("feasible", 0.2, 100, 300, 8.0)])
    met = {}
    for policy in ("edf", "maestro"):
        run = simulate(workload, _one_engine(queue_policy=policy, sample_interval_s=0))
        met[policy] = sorted(w.workflow_id for w in run.workflows if w.met())
    assert met["edf"] == ["busy"]
    assert met["maestro"] == ["busy", "feasible"]


def test_maestro_key_tiers():
    ctx = PolicyContext(service_time=lambda r: 10.0, workflows={"w": WorkflowState("w", 0.0, 100.0, expected_steps=3)},
                        mean_step_s=5.0)
    policy = Maestro(max_wait_s=None)
    chat = SchedRequest("c", "m", 0.0, 10, 100, 50, 80, ttft_deadline=2.0)
    step = SchedRequest("s", "m", 0.0, 10, 100, 50, 80, workflow_id="w", deadline=100.0)
    assert policy.key(chat, 1.0, ctx)[0] == 0 and policy.key(chat, 3.0, ctx)[0] == 2
    # remaining work 10 + 3 * 5 = 25 -> feasible until 75
    assert policy.order(step, 10.0, ctx) == ((1, 25.0, 0.0, "s"), 75.0)
    assert policy.key(step, 76.0, ctx)[0] == 2
    assert Maestro(max_wait_s=30.0).key(step, 31.0, ctx)[0] == -1
    # hopeless work goes least late first: a step 6 s past its feasibility before one 26 s past it
    later = SchedRequest("t", "m", 0.0, 10, 100, 50, 80, workflow_id="w", deadline=80.0)  # feasible until 55
    assert sorted([step, later], key=lambda r: policy.key(r, 81.0, ctx)) == [step, later]


def test_lsf_protects_short_interactive_calls_only():
    """lsf: an interactive call of at most ``short_s`` of service is tier 0; a longer one competes on slack."""
    short = SchedRequest("short", "m", 0.0, 10, 100, 50, 80, ttft_deadline=2.0)
    long = SchedRequest("long", "m", 0.0, 10, 100, 50, 80, ttft_deadline=2.0)
    ctx = PolicyContext(service_time=lambda r: 1.0 if r.request_id == "short" else 30.0, workflows={},
                        mean_step_s=5.0)
    policy = LeastSlackFirst(max_wait_s=600.0, short_s=2.0)
    assert policy.key(short, 0.5, ctx)[0] == 0 and policy.key(long, 0.5, ctx)[0] != 0


def test_prior_predictor_uses_the_explicit_role_and_caps_by_max_tokens():
    p = PriorPredictor({"coder": (500, 1500), "other": (100, 300)})
    assert (p.predict({"max_tokens": 4096}, {"X-Agent-Role": "coder"}).p90) == 1500
    assert p.predict({"max_tokens": 1000}, {"x-agent-role": "programmer"}).p90 == 1000
    assert p.predict({}, None).role == "other"
    assert p.predict({"max_completion_tokens": 700, "max_tokens": 900}, {"X-Agent-Role": "coder"}).p90 == 700
    # the predictor's own rule: a header that names no role leaves the metadata's label to decide
    assert p.predict({"metadata": {"agent_role": "Programmer"}}, {"X-Agent-Role": "Alice"}).role == "coder"
    assert PriorPredictor().priors == DEFAULT_PRIORS and PriorPredictor({}).priors == {"other": DEFAULT_PRIORS["other"]}


# ------------------------------------------------------------------------------------------ cluster routing


def _load(name, rtt, outstanding=0, queued=0, work=0.0, slots=10, free=None):
    return ClusterLoad(name, rtt, slots, outstanding, queued, work, slots, free, tpot_s=0.05, prefill_tps=10000)


def test_cluster_routing_plugins():
    req = ClusterRequest(1000, 200, 1500)
    rr = make_cluster_routing("round_robin")
    assert [rr.choose(req, [_load("a", 0), _load("b", 0.04)]) for _ in range(4)] == ["a", "b", "a", "b"]
    ll = make_cluster_routing("least_loaded")
    assert ll.choose(req, [_load("a", 0, outstanding=8), _load("b", 0.04, outstanding=3)]) == "b"
    assert ll.choose(req, [_load("a", 0, outstanding=3), _load("b", 0.04, outstanding=3)]) == "a"
    la = make_cluster_routing("latency_aware")
    # both have room: the nearer one wins
    assert la.choose(req, [_load("far", 0.04), _load("near", 0.001)]) == "near"
    # the near one is saturated with a queue: spill to the far one
    assert la.choose(req, [_load("near", 0.001, outstanding=10, queued=20, work=400.0), _load("far", 0.04)]) == "far"
    # not enough free KV for the reservation counts as no room
    assert la.choose(req, [_load("near", 0.001, outstanding=9, free=1000), _load("far", 0.04, free=10**6)]) == "far"
    # a small queue on the near cluster costs less than the round trip plus nothing: stays near
    assert estimated_completion_s(req, _load("near", 0.001)) < estimated_completion_s(req, _load("far", 0.04))
    # a request queued ahead means no room, even with slots free: it would wait behind it
    assert la.choose(req, [_load("near", 0.001, queued=1, work=30.0), _load("far", 0.04)]) == "far"
    # the service estimate counts the prefill: 1000 prompt tokens at 10,000/s and 199 tokens at 0.05 s
    assert estimated_completion_s(req, _load("a", 0.0)) == pytest.approx(0.1 + 199 * 0.05)
    # round robin passes over a cluster with no engine up (no slots), unless none has one
    rr = make_cluster_routing("round_robin")
    assert {rr.choose(req, [_load("up", 0), _load("down", 0, slots=0)]) for _ in range(4)} == {"up"}
    assert rr.choose(req, [_load("down", 0, slots=0)]) == "down"
    with pytest.raises(ValueError):
        make_cluster_routing("nope")


def test_latency_aware_spills_to_the_remote_cluster_under_load():
    workload = _small_workload(6, n=120, rate=12.0)
    engine = EngineSpec(max_num_seqs=4, kv_blocks=1024, max_model_len=8192)
    clusters = [ClusterSpec("local", 0.001, (PoolSpec("llm", 2, engine),)),
                ClusterSpec("remote", 0.04, (PoolSpec("llm", 2, engine),))]
    run = simulate(workload, SimConfig(clusters=clusters, cluster_routing="latency_aware", queue_policy="edf"))
    assert run.meta["requests_per_cluster"]["remote"] > 0
    assert run.meta["requests_per_cluster"]["local"] > run.meta["requests_per_cluster"]["remote"]
    light = simulate(_small_workload(6, n=20, rate=0.05), SimConfig(clusters=clusters, cluster_routing="latency_aware"))
    assert light.meta["requests_per_cluster"]["remote"] == 0
    rr = simulate(_small_workload(6, n=20, rate=0.05), SimConfig(clusters=clusters, cluster_routing="round_robin"))
    counts = rr.meta["requests_per_cluster"]
    assert abs(counts["local"] - counts["remote"]) <= 1


# ------------------------------------------------------------------------------------------ experiments


def test_tiny_experiment_writes_json(tmp_path, capsys):
    import argparse

    from loadgen.experiments import add_experiment_arguments, experiment_main

    parser = argparse.ArgumentParser()
    add_experiment_arguments(parser)
    out = tmp_path / "e1.json"
    args = parser.parse_args(["E1", "--duration", "40", "--rates", "2", "--policies", "edf,maestro",
                              "--out", str(out)])
    assert experiment_main(args) == 0
    data = json.loads(out.read_text())
    assert data["experiment"] == "E1" and len(data["runs"]) == 2
    assert all(0.0 <= r["summary"]["request_attainment"] <= 1.0 for r in data["runs"])
    assert "| edf |" in capsys.readouterr().out or "edf" in data["markdown"]


def test_simulate_cli_writes_a_run_result(tmp_path):
    import argparse

    from loadgen.experiments import add_simulate_arguments, simulate_main
    from loadgen.report import load_run

    parser = argparse.ArgumentParser()
    add_simulate_arguments(parser)
    out = tmp_path / "run.json"
    args = parser.parse_args(["--rate", "1", "--duration", "30", "--clusters", "c0:2:2,c1:2:40", "--out", str(out)])
    assert simulate_main(args) == 0
    run = load_run(out)
    assert run.mode == "simulate" and run.requests and run.series["reserved_kv_tokens"]
    assert not math.isnan(run.meta["load"])


def test_simulate_reports_progress_without_changing_the_run_and_says_where_an_interrupt_stopped_it(
        tmp_path, monkeypatch, capsys):
    """A long ``loadgen simulate`` prints where it has got to (every 2 s of wall time; every sample here), the
    same run comes out with or without it, and Ctrl-C says how far it got and that nothing was written."""
    import argparse

    import loadgen.des as des
    from loadgen.experiments import add_simulate_arguments, simulate_main

    parser = argparse.ArgumentParser()
    add_simulate_arguments(parser)
    argv = ["--rate", "1", "--duration", "30", "--clusters", "c0:2:2"]
    monkeypatch.setattr(des, "PROGRESS_EVERY_S", 0.0)
    assert simulate_main(parser.parse_args([*argv, "--out", str(tmp_path / "with.json")])) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[simulate]")]
    assert len(lines) > 10 and "of 30 s simulated" in lines[0] and "workflows done" in lines[0]
    assert "arrivals ended at 30 s" in lines[-1]
    assert simulate_main(parser.parse_args([*argv, "--no-progress", "--out", str(tmp_path / "without.json")])) == 0
    assert "[simulate]" not in capsys.readouterr().err
    with_progress, without = (json.loads((tmp_path / name).read_text()) for name in ("with.json", "without.json"))
    for run in (with_progress, without):
        run["meta"].pop("wall_s", None), run["meta"].pop("predict_s", None)
    assert with_progress["requests"] == without["requests"] and with_progress["series"] == without["series"]

    calls = []

    def interrupt(report):
        calls.append(report)
        if len(calls) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(des.Simulator, "_report_progress", lambda self, t, events, started: interrupt(t))
    out = tmp_path / "interrupted.json"
    assert simulate_main(parser.parse_args([*argv, "--out", str(out)])) == 130
    assert "maestro: simulation interrupted" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("policy_name", ["fcfs", "edf", "maestro", "lsf"])
def test_the_simulators_policy_is_the_gateways_with_default_settings(policy_name):
    """``loadgen simulate --queue NAME`` (and E1) build the policy with no options: it must order requests as a
    gateway with ``queue_policy: NAME`` and default settings does (lsf aged at 120 s here and 600 s there)."""
    from gateway.config import default_config
    from gateway.metrics import GatewayMetrics
    from gateway.scheduling import Scheduling
    from gateway.state.memory import MemoryStateStore

    base = default_config()
    config = dataclasses.replace(base, scheduling=dataclasses.replace(base.scheduling, queue_policy=policy_name))
    gateway_policy = Scheduling(config, MemoryStateStore(), GatewayMetrics()).policy
    simulator_policy = make_queue_policy(policy_name)
    assert type(simulator_policy) is type(gateway_policy) and vars(simulator_policy) == vars(gateway_policy)
