"""Experiment E4, simulator fidelity: one workload run live over HTTP and in the discrete-event simulator.

Every figure of E1-E3 is a simulation. They are results about the gateway only if the simulator (:mod:`loadgen.des`)
behaves like the real thing, so E4 runs one small seeded workload both ways and compares what a user would see:

* **live**: simulated vLLM engines (:mod:`backends.sim`: the calibrated cost model, a real asyncio step loop and
  vLLM's HTTP/SSE surface) in one process, the gateway (:class:`gateway.app.Gateway`: the configured queue policy
  and admission, in-memory state) in a second one, and the live runner (:class:`loadgen.live.LiveRunner`, aiohttp
  streaming client) in this one: three processes, two hops of real HTTP per request, as deployed. With two or
  more CPUs the engines' process gets one of its own (its step loop is the timing the simulator models).
* **simulated**: ``simulate()`` of the same workload with the same engine count, engine options, policies,
  per-engine dispatch cap and predictor.

Time scale. A live run in real time would take ten minutes or more, so everything runs ``time_scale`` times faster:
the engines divide every step by it (``SimEngineOptions.time_scale``), the runner divides arrivals, think times and
deadlines by it and multiplies measured times back (``time_base="workload"``), and the gateway's own time constants
(SLO classes, whose TTFT targets order interactive calls under EDF; the service-time estimate per token, aging,
maestro's mean step) are divided by it in its config. Every figure is therefore in workload seconds on both sides.
What is *not* scaled is the wall-clock cost of the software itself (HTTP hops, SSE relay, event-loop wake-ups):
at time scale 10 each millisecond of it reads as ten. E4 measures it as the median per-request TTFT difference of
requests sent at the same moment on both sides (about 2.5 ms of wall time per request here, whatever the scale).

What must match, and does by construction: the engine spec (the profile with E4's ``max_num_seqs`` and
``kv_blocks``) becomes both ``SimEngineOptions`` and the simulator's engines; the gateway's
``max_outstanding_per_engine`` is the simulator's ``max_num_seqs + queue_per_engine``; its pool's
``kv_capacity_tokens`` is the engines' KV; its service-time estimate per token is the simulator's (the cost model's
decode step at the nominal batch); both predict with the per-role priors; the engines schedule ``fcfs`` (the
simulator's engines do not model vLLM's priority scheduling); one cluster, no network delay in the simulator.
And one thing the simulator had to learn (``SimConfig.prompt_estimate_ratio``): the gateway does not know a
prompt's token count, it estimates it from the text, and on the runner's synthetic prompts its estimator says 0.90
of what the engines count (:func:`prompt_estimate_ratio`), so the live gateway reserves less KV per request than a
simulator that used the exact count (before: 6 % less KV in use and 9.5 points more workflows met live at load 0.5).

Reading the difference. Under contention the schedule is chaotic: a step that starts a fraction of an engine
iteration earlier or later changes who gets the KV freed next, and everything after it. A live run is one
perturbed sample of that, so E4 also simulates ``spread_runs`` copies of the workload with start times moved by
about a millisecond of wall time (:func:`perturbed`). The simulator's estimate of a figure is the median over
those runs and the unperturbed one, and the targets are judged against it: the live run and any single simulation
are each one draw from the same chaotic spread, so comparing two draws would double the noise and judge the luck
of one seed (with 42 workflows one workflow is 2.4 points). The unperturbed run and the range are printed too.

Targets (issue 4): workflow-deadline attainment and request-SLO attainment within 5 points of each other, mean
end-to-end latency within 10 %. The other rows (TTFT, p90 latency, makespan, and the time averages of KV reserved
in the gateway's ledger, KV in use on the engines and requests queued in the gateway, sampled once per workload
second on both sides) are for information and diagnosis.

The helper processes are ``python -m loadgen.fidelity engines|gateway JSON``: each prints one JSON line when it
is ready, samples its state, and exits when its standard input closes (so it never outlives this process) or on
SIGTERM, printing its statistics as a last JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import orjson

from loadgen.des import ClusterSpec, EngineSpec, PoolSpec, SimConfig, load_predictor, simulate
from loadgen.experiments import (DEFAULT_PROFILE, DEFAULT_TEMPLATES, ENGINE_PROFILES, WorkloadParams, make_workload,
                                 markdown)
from loadgen.results import RequestResult, RunResult, quantile, write_atomically
from loadgen.workload import Workload

TARGET_POINTS = 5.0  # attainment: |live - simulated| in percentage points
TARGET_LATENCY = 0.10  # mean end-to-end latency: |live - simulated| / simulated
AGING_S = 600.0  # aging bound given to policies that age (maestro, lsf), workload seconds, both sides
SHORT_S = 2.0  # lsf's protected interactive service time, workload seconds, both sides
NOMINAL_CONTEXT = 2048  # the DES's nominal context per sequence for service-time estimates (SimConfig default)
DEFAULT_RATES = "0.25,0.5"
READY_TIMEOUT_S = 120.0  # a helper process must be serving by then (imports plus start-up on a busy machine)
WARM_UP_TIMEOUT_S = 60.0  # each warm-up request is one token from a local simulated engine


# --------------------------------------------------------------------------------------------------- the setup


@dataclass
class FidelitySetup:
    """One E4 point: the workload, the engines, the gateway policies and the time scale (both sides share it)."""

    rate: float = 0.5  # arrivals per second (workflows and interactive calls together)
    window_s: float = 240.0  # arrival window, workload seconds
    seed: int = 7
    engines: int = 2
    profile: str = DEFAULT_PROFILE
    max_num_seqs: int = 128
    kv_blocks: int = 1024
    queue_per_engine: int = 8  # dispatch slots per engine beyond max_num_seqs (the DES's; live: the cap)
    policy: str = "edf"
    admission: str = "predicted"
    time_scale: float = 10.0
    interactive_share: float = 0.5
    deadline_scale: float = 12.0
    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    declared_max_tokens: int | None = None
    pin_cpus: bool = True  # engines on the last CPU, gateway and client on the others (when there are >= 2)

    def validate(self) -> None:
        if self.profile not in ENGINE_PROFILES:
            raise ValueError(f"unknown profile {self.profile!r}; known: {', '.join(sorted(ENGINE_PROFILES))}")
        if not self.time_scale > 0:
            raise ValueError("time_scale must be > 0")
        if self.engines < 1:
            raise ValueError("engines must be >= 1")
        if not self.rate > 0 or not self.window_s > 0:
            raise ValueError("rate and window must be > 0")
        self.engine().validate()

    def engine(self) -> EngineSpec:
        """The engine both sides run: the profile with E4's batch and KV size."""
        return replace(ENGINE_PROFILES[self.profile], max_num_seqs=self.max_num_seqs, kv_blocks=self.kv_blocks)

    def workload(self) -> Workload:
        """The seeded workload (the experiments' generator: built-in templates plus interactive calls)."""
        params = WorkloadParams(rate=self.rate, duration_s=self.window_s, seed=self.seed,
                                interactive_share=self.interactive_share, deadline_scale=self.deadline_scale,
                                templates=tuple(self.templates), context_len=self.engine().max_model_len,
                                declared_max_tokens=self.declared_max_tokens)
        return make_workload(params)

    def queue_options(self) -> dict[str, Any]:
        """Options of the queue policy, as the gateway passes them (workload seconds)."""
        if self.policy == "maestro":
            return {"max_wait_s": AGING_S}
        if self.policy == "lsf":
            return {"max_wait_s": AGING_S, "short_s": SHORT_S}
        return {}

    def sim_config(self, prompt_estimate_ratio: float = 1.0) -> SimConfig:
        """The simulator's setup: one cluster of ``engines`` engines, no network delay, KV series every second."""
        spec = self.engine()
        return SimConfig(clusters=[ClusterSpec("c0", rtt_s=0.0, pools=(PoolSpec("llm", self.engines, spec),))],
                         queue_policy=self.policy, queue_options=self.queue_options(), admission=self.admission,
                         queue_per_engine=self.queue_per_engine, sample_interval_s=1.0, step_hint=True,
                         nominal_context=NOMINAL_CONTEXT, prompt_estimate_ratio=prompt_estimate_ratio)

    def engine_options(self, model: str) -> dict[str, Any]:
        """``SimEngineOptions`` fields of the live engines (JSON for the helper process)."""
        spec = self.engine()
        return {"model": model, "max_model_len": spec.max_model_len, "time_scale": self.time_scale,
                "max_num_seqs": spec.max_num_seqs, "kv_blocks": spec.kv_blocks, "block_size": spec.block_size,
                "max_num_batched_tokens": spec.max_num_batched_tokens, "cost_scale": spec.cost_scale,
                "scheduling_policy": "fcfs", "seed": self.seed}

    def gateway_config(self, engine_urls: list[str], model: str, mean_step_s: float) -> dict[str, Any]:
        """The gateway's config: the DES's setup with every time constant divided by the time scale."""
        from backends.sim.cost_model import EngineCostModel
        from gateway.core.request import DEFAULT_SLO_CLASSES

        ts = self.time_scale
        spec = self.engine()
        cost = EngineCostModel(scale=spec.cost_scale)
        batch = max(1, spec.max_num_seqs // 2)  # the DES's nominal batch
        token_time = cost.decode_s(batch, batch * NOMINAL_CONTEXT)
        classes: dict[str, dict[str, float]] = {}
        for name, slo in DEFAULT_SLO_CLASSES.items():
            classes[name] = {"ttft_s": slo.ttft_s / ts, "tpot_s": slo.tpot_s / ts}
            if slo.workflow_deadline_s is not None:
                classes[name]["workflow_deadline_s"] = slo.workflow_deadline_s / ts
        return {
            "models": [{"name": model, "max_model_len": spec.max_model_len,
                        "kv_bytes_per_token": spec.kv_bytes_per_token or cost.kv_bytes_per_token}],
            "clusters": [{"name": "c0", "pools": [{
                "name": "llm", "kind": "vllm", "models": [model],
                "engines": [{"url": url, "id": f"c0/llm/{i}"} for i, url in enumerate(engine_urls)],
                "kv_capacity_tokens": spec.kv_blocks * spec.block_size}]}],
            "slo_classes": classes,
            "scheduling": {
                "queue_policy": self.policy, "admission": self.admission,
                "max_outstanding_per_engine": spec.max_num_seqs + self.queue_per_engine,
                "block_size": spec.block_size, "grow_step_tokens": SimConfig.growth_step_tokens,
                "token_time_s": token_time / ts, "prefill_token_time_s": cost.prefill_coef[1] / ts,
                "mean_step_s": max(mean_step_s, 1e-3) / ts, "max_wait_s": AGING_S / ts, "short_s": SHORT_S / ts,
                "step_time_window_s": SimConfig.step_time_window_s / ts,
            },
            "server": {"max_inflight": 1 << 16},
            "state": {"backend": "memory"},
        }

    def label(self) -> str:
        return f"{self.policy}/{self.admission}"


# --------------------------------------------------------------------------------------------------- helpers


class Helper:
    """A helper process (``python -m loadgen.fidelity ROLE JSON``) that prints one JSON line when it is ready."""

    def __init__(self, role: str, process: asyncio.subprocess.Process, log_path: Path) -> None:
        self.role = role
        self.process = process
        self.log_path = log_path
        self.ready: dict[str, Any] = {}
        self.final: dict[str, Any] = {}

    @classmethod
    async def start(cls, role: str, payload: dict[str, Any], log_dir: Path, cpus: set[int] | None) -> Helper:
        log_path = log_dir / f"{role}.log"
        with open(log_path, "wb") as log:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "loadgen.fidelity", role, orjson.dumps(payload).decode(),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=log)
        helper = cls(role, process, log_path)
        if cpus:
            _pin(process.pid, cpus)
        try:
            line = await asyncio.wait_for(process.stdout.readline(), READY_TIMEOUT_S)  # type: ignore[union-attr]
            if not line:
                raise RuntimeError(f"{role} helper exited before it was ready:\n{helper.log_tail()}")
            helper.ready = orjson.loads(line)
        except BaseException:
            await helper.stop()
            raise
        return helper

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    async def stop(self, timeout_s: float = 15.0) -> None:
        """Close its stdin (it shuts down and prints its final line), then wait; kill it if it hangs."""
        process = self.process
        if process.stdin is not None and not process.stdin.is_closing():
            process.stdin.close()
        try:
            out = await asyncio.wait_for(process.stdout.read(), timeout_s)  # type: ignore[union-attr]
            await asyncio.wait_for(process.wait(), timeout_s)
            for line in out.splitlines():
                if line.strip():
                    self.final = orjson.loads(line)
        except (TimeoutError, asyncio.TimeoutError, orjson.JSONDecodeError):
            if process.returncode is None:
                process.kill()
                await process.wait()


def _pin(pid: int, cpus: set[int]) -> None:
    try:
        os.sched_setaffinity(pid, cpus)
    except (AttributeError, OSError):  # not Linux, or not allowed: run unpinned
        pass


def _cpu_plan(pin: bool) -> tuple[set[int] | None, set[int] | None]:
    """(engines' CPUs, gateway's and client's CPUs): the engines' step loop gets a core of its own, because its
    timing is what the simulator models; with fewer than two CPUs (or ``pin`` off) nothing is pinned."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:
        return None, None
    if not pin or len(cpus) < 2:
        return None, None
    return {cpus[-1]}, set(cpus[:-1])


# --------------------------------------------------------------------------------------------------- the two runs


def prompt_estimate_ratio(workload: Workload) -> float:
    """How the gateway's prompt estimate compares with the engines' count on the prompts the live runner sends.

    The runner's synthetic prompts are three-letter words, one token each for the engines (and for real BPE
    tokenizers); the gateway's character-based estimator (:mod:`predictor.tokens`), calibrated on real text,
    counts about 0.9 token per such word, so the live gateway reserves that much less for the prompt. The
    simulator is given the same ratio (``SimConfig.prompt_estimate_ratio``), measured here with the gateway's
    own predictor on the runner's own messages."""
    from backends.sim.prompt_tokens import estimate_chat_prompt_tokens
    from loadgen.live import build_messages
    from predictor.predictor import Predictor

    predictor = Predictor.from_priors()
    estimated = counted = 0
    for workflow in workload.workflows:
        for step in workflow.steps:
            messages = build_messages(step, f"{workload.seed}/{workflow.id}/{step.id}")
            estimated += predictor.predict({"model": workload.model, "messages": messages}).prompt_tokens
            counted += estimate_chat_prompt_tokens(messages)
    return estimated / counted if counted else 1.0


def run_simulated(setup: FidelitySetup, workload: Workload, prompt_ratio: float = 1.0) -> RunResult:
    """The DES side (per-role priors, as the gateway has without a trained model)."""
    run = simulate(workload, setup.sim_config(prompt_ratio), load_predictor(None))
    run.policy["label"] = setup.label()
    run.meta["rate"] = setup.rate  # nominal; meta["load"] is the offered load of the workload as generated
    return run


async def run_live(setup: FidelitySetup, workload: Workload, mean_step_s: float, log_dir: Path,
                   progress: bool = False) -> RunResult:
    """The live side: engines and gateway in helper processes, the runner here; times in workload seconds.

    The helpers sample their state once per second of workload time; the samples become the result's series
    ``reserved_kv_tokens`` and ``queued_requests`` (gateway) and ``used_kv_tokens`` (engines), as the simulator
    names them, and ``engine_requests`` (running plus waiting on the engines)."""
    from loadgen.live import LiveOptions, LiveRunner

    sample_s = 1.0 / setup.time_scale
    engine_cpus, front_cpus = _cpu_plan(setup.pin_cpus)
    own_cpus = os.sched_getaffinity(0) if front_cpus else None
    engines = await Helper.start("engines", {"count": setup.engines, "options": setup.engine_options(workload.model),
                                             "sample_s": sample_s}, log_dir, engine_cpus)
    try:
        config = setup.gateway_config(engines.ready["urls"], workload.model, mean_step_s)
        gateway = await Helper.start("gateway", {"config": config, "sample_s": sample_s}, log_dir, front_cpus)
        try:
            if front_cpus:
                _pin(os.getpid(), front_cpus)
            await warm_up(gateway.ready["url"], workload.model, setup.engines)
            options = LiveOptions(url=gateway.ready["url"] + "/v1", time_scale=setup.time_scale,
                                  time_base="workload", steps_hint=True, max_concurrency=1 << 14,
                                  progress=progress, policy={"queue": setup.policy, "admission": setup.admission,
                                                             "label": setup.label()})
            run = await LiveRunner(workload, options).run()
        finally:
            await gateway.stop()
    finally:
        await engines.stop()
        if own_cpus:
            _pin(os.getpid(), own_cpus)
    run.meta["rate"] = setup.rate  # nominal; meta["load"] is the offered load of the workload as generated
    engine_stats = dict(engines.final.get("stats") or {})
    gateway_stats = dict(gateway.final.get("stats") or {})
    start, end = run.meta["started_at_epoch"], run.meta["started_at_epoch"] + run.meta["wall_s"]
    for stats, names in ((gateway_stats, ("reserved_kv_tokens", "queued_requests")),
                         (engine_stats, ("used_kv_tokens", "engine_requests"))):
        samples = [row for row in stats.pop("samples", []) if start <= row[0] <= end]
        for i, name in enumerate(names, start=1):
            run.series[name] = [((row[0] - start) * setup.time_scale, float(row[i])) for row in samples]
    run.meta["engine_stats"] = engine_stats
    run.meta["gateway_stats"] = gateway_stats
    return run


async def warm_up(base_url: str, model: str, engines: int) -> None:
    """One one-token request per engine before the measured run: the first request through a fresh gateway pays
    for connection set-up and lazy initialisation (about 30 ms of wall time here, 0.3 s of workload time at time
    scale 10), which is start-up cost, not the steady state the simulator models."""
    import aiohttp

    body = orjson.dumps({"model": model, "messages": [{"role": "user", "content": "warm up"}], "max_tokens": 1})
    headers = {"Content-Type": "application/json", "X-Sim-Output-Tokens": "1"}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WARM_UP_TIMEOUT_S)) as session:
        async def one(i: int) -> None:
            async with session.post(f"{base_url}/v1/chat/completions", data=body,
                                    headers={**headers, "X-Request-Id": f"e4-warm-up-{i}"}) as response:
                await response.read()
                if response.status != 200:
                    raise RuntimeError(f"warm-up request failed: HTTP {response.status}")

        await asyncio.gather(*(one(i) for i in range(engines)))
    await asyncio.sleep(0.2)  # let the engines and the gateway settle (releases, metrics probes)


# --------------------------------------------------------------------------------------------------- comparison


def figures(run: RunResult) -> dict[str, Any]:
    """What E4 compares, from one run (times in workload seconds)."""
    summary = run.summary()
    ok = [r for r in run.requests if r.status == "ok"]
    ttft = [r.ttft for r in ok if r.ttft is not None]
    e2e = [r.e2e for r in ok if r.e2e is not None]
    interactive = [r for r in run.requests if r.workflow_id is None]
    finishes = [r.finish for r in ok if r.finish is not None]
    return {
        "requests": summary["requests"],
        "requests_ok": summary["requests_ok"],
        "workflows": summary["workflows"],
        "workflow_attainment": summary["workflow_deadline_attainment"],
        "request_attainment": summary["request_slo_attainment"],
        "interactive_attainment": (sum(r.slo_met() for r in interactive) / len(interactive)) if interactive else None,
        "mean_e2e_s": summary["mean_e2e_s"],
        "p90_e2e_s": quantile(e2e, 0.9),
        "mean_ttft_s": (sum(ttft) / len(ttft)) if ttft else None,
        "p50_ttft_s": summary["p50_ttft_s"],
        "makespan_s": max(finishes) if finishes else None,
        "mean_reserved_kv_tokens": _series_mean(run, "reserved_kv_tokens"),
        "mean_used_kv_tokens": _series_mean(run, "used_kv_tokens"),
        "mean_queued_requests": _series_mean(run, "queued_requests"),
    }


def _series_mean(run: RunResult, name: str) -> float | None:
    """Mean of a sampled series up to the last finish (samples are once per workload second on both sides)."""
    finishes = [r.finish for r in run.requests if r.finish is not None]
    end = max(finishes, default=0.0)
    values = [v for t, v in run.series.get(name, ()) if t <= end]
    return sum(values) / len(values) if values else None


# (label, key, kind): "points" (attainment, target in points), "relative" (target as a share), "info-*": no target
COMPARED = (
    ("workflow deadlines met", "workflow_attainment", "points"),
    ("request SLOs met", "request_attainment", "points"),
    ("interactive SLOs met", "interactive_attainment", "info-points"),
    ("mean end-to-end latency s", "mean_e2e_s", "relative"),
    ("p90 end-to-end latency s", "p90_e2e_s", "info-relative"),
    ("mean TTFT s", "mean_ttft_s", "info-relative"),
    ("p50 TTFT s", "p50_ttft_s", "info-relative"),
    ("makespan s", "makespan_s", "info-relative"),
    ("mean KV tokens reserved (gateway)", "mean_reserved_kv_tokens", "info-relative"),
    ("mean KV tokens in use (engines)", "mean_used_kv_tokens", "info-relative"),
    ("mean requests queued in the gateway", "mean_queued_requests", "info-relative"),
)


def compare(live: dict[str, Any], simulated: dict[str, Any],
            spread: dict[str, tuple[float, float, float]] | None = None) -> list[dict[str, Any]]:
    """One row per compared figure: both values, the difference, for the targets whether it is met, and whether
    the live value lies inside the simulations' range (``spread``: key -> (min, median, max)).

    The simulated value is the median of ``spread`` where there is one (see the module docstring), else the
    single simulation in ``simulated``; ``simulated_single`` keeps the latter."""
    rows = []
    for label, key, kind in COMPARED:
        low_high = (spread or {}).get(key)
        single = simulated.get(key)
        a, b = live.get(key), (low_high[1] if low_high is not None else single)
        row: dict[str, Any] = {"figure": label, "key": key, "kind": kind, "live": a, "simulated": b,
                               "simulated_single": single, "difference": None, "target": None, "met": None,
                               "spread": low_high, "live_in_spread": None}
        if a is not None and b is not None:
            if kind.endswith("points"):
                row["difference"] = 100.0 * (a - b)
                if kind == "points":
                    row["target"] = TARGET_POINTS
                    row["met"] = abs(row["difference"]) <= TARGET_POINTS + 1e-9
            else:
                row["difference"] = (a - b) / b if b else None
                if kind == "relative":
                    row["target"] = TARGET_LATENCY
                    row["met"] = row["difference"] is not None and abs(row["difference"]) <= TARGET_LATENCY
        if a is not None and low_high is not None:
            row["live_in_spread"] = low_high[0] - 1e-9 <= a <= low_high[-1] + 1e-9
        rows.append(row)
    return rows


def perturbed(workload: Workload, jitter_s: float, seed: int) -> Workload:
    """The workload with every workflow arrival moved by U(-jitter_s, +jitter_s) (never before 0) and every step
    that waits for another one released U(0, jitter_s) later (the live path only ever adds latency)."""
    rng = random.Random(seed)
    workflows = []
    for w in workload.workflows:
        steps = [replace(s, think_time_s=s.think_time_s + rng.uniform(0.0, jitter_s)) if s.depends_on else s
                 for s in w.steps]
        workflows.append(replace(w, arrival_s=max(0.0, w.arrival_s + rng.uniform(-jitter_s, jitter_s)), steps=steps))
    return replace(workload, workflows=workflows)


def simulated_spread(setup: FidelitySetup, workload: Workload, prompt_ratio: float, runs: int,
                     jitter_s: float,
                     unperturbed: dict[str, Any] | None = None) -> dict[str, tuple[float, float, float]]:
    """(min, median, max) of every compared figure over ``runs`` simulations of slightly perturbed start times
    and, if given, the figures of the unperturbed simulation.

    Under contention the outcome is chaotic: a step that starts a fraction of an engine iteration earlier or later
    changes which request gets the KV that frees next, and the whole schedule after it. A live run is one such
    perturbed sample (its timers are off by about a millisecond of wall time, and its software path adds a few
    more, i.e. ``time_scale`` times that in workload time), so this range is the simulator's own noise band to
    read the live-simulated difference against."""
    values: dict[str, list[float]] = {key: [] for _, key, _ in COMPARED}
    for key, found in values.items():
        if unperturbed is not None and unperturbed.get(key) is not None:
            found.append(unperturbed[key])
    for seed in range(runs):
        fig = figures(run_simulated(setup, perturbed(workload, jitter_s, seed), prompt_ratio))
        for key, found in values.items():
            if fig.get(key) is not None:
                found.append(fig[key])
    return {key: (min(found), statistics.median(found), max(found)) for key, found in values.items() if found}


def request_key(request: RequestResult) -> tuple[str, str]:
    """(workflow or interactive call id, step id): the same request in a live and a simulated result."""
    if request.workflow_id is not None:
        return request.workflow_id, request.step_id
    rid = request.request_id
    if "/" in rid:  # simulated: "<workflow id>/<step id>"
        return rid.rsplit("/", 1)[0], request.step_id
    # live: "lg<run tag>-<workflow id>-<step id>"
    return rid.split("-", 1)[1].removesuffix("-" + request.step_id), request.step_id


def fixed_offset(live: RunResult, simulated: RunResult, within_s: float = 0.05) -> dict[str, Any]:
    """Median per-request difference (live - simulated) of TTFT and end-to-end latency over the requests due
    at the same time on both sides (``arrival`` within ``within_s``): the constant cost of the live software path
    (HTTP hops, SSE relay, event-loop wake-ups) times the time scale, apart from the chaotic part."""
    simulated_by_key = {request_key(r): r for r in simulated.requests}
    ttft: list[float] = []
    e2e: list[float] = []
    for r in live.requests:
        other = simulated_by_key.get(request_key(r))
        if other is None or r.ttft is None or other.ttft is None or abs(r.arrival - other.arrival) > within_s:
            continue
        ttft.append(r.ttft - other.ttft)
        e2e.append(r.e2e - other.e2e)  # type: ignore[operator]
    return {"matched": len(ttft), "median_ttft_s": statistics.median(ttft) if ttft else None,
            "median_e2e_s": statistics.median(e2e) if e2e else None}


def _value(value: Any, kind: str) -> str:
    if value is None:
        return "-"
    if kind.endswith("points"):
        return f"{100 * value:.1f}%"
    return f"{value:.2f}" if value < 100 else f"{value:,.0f}"


def _difference(row: dict[str, Any]) -> str:
    d = row["difference"]
    if d is None:
        return "-"
    return f"{d:+.1f} points" if row["kind"].endswith("points") else f"{100 * d:+.1f}%"


def _target(row: dict[str, Any]) -> str:
    if row["kind"] == "points":
        return f"within {TARGET_POINTS:g} points"
    if row["kind"] == "relative":
        return f"within {100 * TARGET_LATENCY:g}%"
    return "(info)"


def _spread(row: dict[str, Any]) -> str:
    if row["spread"] is None:
        return "-"
    low, _, high = row["spread"]
    kind = row["kind"]
    outside = ", live outside" if row["live_in_spread"] is False else ""
    return f"{_value(low, kind)} - {_value(high, kind)}{outside}"


def fidelity_table(points: list[dict[str, Any]]) -> str:
    runs = points[0]["spread_runs"] if points else 0
    rows = []
    for point in points:
        for row in point["comparison"]:
            result = "" if row["met"] is None else ("PASS" if row["met"] else "MISS")
            rows.append([f"{point['rate']:g}", row["figure"], _value(row["live"], row["kind"]),
                         _value(row["simulated"], row["kind"]), _difference(row), _target(row), result,
                         _value(row["simulated_single"], row["kind"]), _spread(row)])
    median = f"simulated (median of {runs + 1} runs)" if runs else "simulated"
    return markdown(["load (arrivals/s)", "figure", "live", median, "live - simulated", "target", "result",
                     "unperturbed simulation", "simulated range"], rows)


def volume_table(points: list[dict[str, Any]]) -> str:
    rows = []
    for point in points:
        live, sim, offset = point["live"], point["simulated"], point["offset"]
        engines = point["live_meta"].get("engine_stats") or {}
        rows.append([f"{point['rate']:g}", str(sim["workflows"]), str(sim["requests"]),
                     f"{live['requests_ok']}/{live['requests']}", f"{sim['requests_ok']}/{sim['requests']}",
                     f"{engines.get('preemptions', '-')} / {point['sim_engine_preemptions']}",
                     _signed_ms(offset["median_ttft_s"]), f"{engines.get('loop_lag_p99_ms', float('nan')):.1f}",
                     f"{point['live_wall_s']:.0f}", f"{point['sim_wall_s']:.2f}"])
    return markdown(["load (arrivals/s)", "workflows", "requests", "live ok", "simulated ok",
                     "engine preemptions (live / sim)", "per-request TTFT offset ms", "engine loop lag p99 ms (wall)",
                     "live wall s", "simulated wall s"], rows)


def _signed_ms(value: float | None) -> str:
    return "-" if value is None else f"{1000 * value:+.0f}"


# --------------------------------------------------------------------------------------------------- one point


def run_point(setup: FidelitySetup, out_dir: Path | None = None, progress: bool = False,
              spread_runs: int = 20, jitter_s: float | None = None) -> dict[str, Any]:
    """Both runs of one setup and their comparison; the two RunResults are written to ``out_dir`` if given.

    ``jitter_s`` (default: one millisecond of wall time, in workload seconds) perturbs the arrivals of the
    ``spread_runs`` extra simulations that give the simulator's own noise band."""
    setup.validate()
    workload = setup.workload()
    ratio = prompt_estimate_ratio(workload)
    started = time.perf_counter()
    simulated = run_simulated(setup, workload, ratio)
    sim_wall = time.perf_counter() - started
    jitter = 0.001 * setup.time_scale if jitter_s is None else jitter_s
    sim_fig = figures(simulated)
    spread = simulated_spread(setup, workload, ratio, spread_runs, jitter, sim_fig) if spread_runs > 0 else {}
    with tempfile.TemporaryDirectory(prefix="maestro-e4-") as tmp:
        started = time.perf_counter()
        try:
            live = _run_async(run_live(setup, workload, simulated.meta.get("mean_step_s") or 5.0, Path(tmp),
                                       progress))
        except BaseException:
            for name in ("engines", "gateway"):
                log = Path(tmp) / f"{name}.log"
                if log.exists():
                    print(f"--- {name} log (tail) ---\n{log.read_text(errors='replace')[-3000:]}", file=sys.stderr)
            raise
        live_wall = time.perf_counter() - started
    files = {}
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        for mode, run in (("live", live), ("simulated", simulated)):
            path = out_dir / f"E4-{mode}-{setup.rate:g}.json"
            write_atomically(path, orjson.dumps(run.to_json(), option=orjson.OPT_SERIALIZE_NUMPY))
            files[mode] = str(path)
    live_fig = figures(live)
    comparison = compare(live_fig, sim_fig, spread)
    return {"rate": setup.rate, "setup": asdict(setup), "live": live_fig, "simulated": sim_fig,
            "comparison": comparison, "met": all(r["met"] for r in comparison if r["met"] is not None),
            "spread_runs": spread_runs, "jitter_s": jitter, "prompt_estimate_ratio": ratio,
            "offset": fixed_offset(live, simulated), "sim_engine_preemptions": simulated.meta.get("engine_preemptions"),
            "live_wall_s": live_wall, "sim_wall_s": sim_wall, "live_meta": _live_meta(live), "files": files}


def _live_meta(run: RunResult) -> dict[str, Any]:
    keep = ("wall_s", "end", "status_counts", "output_mismatches", "peak_inflight", "client_wait_s", "errors",
            "engine_stats", "gateway_stats", "not_started", "not_started_steps", "not_due")
    return {k: run.meta.get(k) for k in keep}


def _run_async(coro: Any) -> Any:
    """uvloop when installed (what ``maestro serve`` uses), else asyncio."""
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:  # pragma: no cover - uvloop is a dependency
        return asyncio.run(coro)


# --------------------------------------------------------------------------------------------------- the experiment


def add_e4_arguments(parser: argparse.ArgumentParser) -> None:
    """E4's own options of ``maestro loadgen experiment`` (it also reads --rates, --seed, --profile, --out,
    --interactive-share, --deadline-scale, --templates, --declared-max-tokens)."""
    add = parser.add_argument
    add("--time-scale", type=float, default=10.0, help="E4: live run this many times faster than real time (10)")
    add("--policy", default="edf", help="E4: queue policy of both sides (fcfs | edf | maestro | lsf; default edf)")
    add("--admission", default="predicted", choices=("none", "max_tokens", "predicted"),
        help="E4: admission of both sides (default predicted)")
    add("--engines", type=int, default=2, help="E4: engines (default 2)")
    add("--max-num-seqs", type=int, default=128, help="E4: engine max_num_seqs (default 128)")
    add("--kv-blocks", type=int, default=1024, help="E4: engine KV blocks of 16 tokens (default 1024)")
    add("--queue-per-engine", type=int, default=8, help="E4: dispatch slots per engine beyond max_num_seqs (8)")
    add("--window", type=float, default=240.0, help="E4: arrival window, workload seconds (default 240; "
                                                    "--duration is E1-E3's)")
    add("--spread-runs", type=int, default=20, help="E4: perturbed simulations for the noise band (20; 0: none)")
    add("--jitter-ms", type=float, help="E4: arrival perturbation of those, workload ms (default: time scale x 1)")
    add("--no-pin", action="store_true", help="E4: do not pin the engines' process to a CPU of its own")
    add("--progress", action="store_true", help="E4: progress bar of the live runs")


def setup_from_args(args: argparse.Namespace, rate: float) -> FidelitySetup:
    return FidelitySetup(rate=rate, window_s=args.window, seed=args.seed, engines=args.engines, profile=args.profile,
                         max_num_seqs=args.max_num_seqs, kv_blocks=args.kv_blocks,
                         queue_per_engine=args.queue_per_engine, policy=args.policy, admission=args.admission,
                         time_scale=args.time_scale, interactive_share=args.interactive_share,
                         deadline_scale=args.deadline_scale,
                         templates=tuple(t for t in args.templates.split(",") if t),
                         declared_max_tokens=args.declared_max_tokens, pin_cpus=not args.no_pin)


def experiment_e4(args: argparse.Namespace) -> dict[str, Any]:
    """``maestro loadgen experiment E4``: every load of ``--rates`` live and simulated, one table."""
    rates = [float(x) for x in (args.rates or DEFAULT_RATES).split(",") if x.strip()]
    out = Path(args.out if args.out is not None else "results/E4.json")
    points = []
    for rate in rates:
        setup = setup_from_args(args, rate)
        print(f"E4: load {rate:g}/s, {setup.engines} engines, {setup.label()}, time scale {setup.time_scale:g}",
              file=sys.stderr)
        jitter = None if args.jitter_ms is None else args.jitter_ms / 1000.0
        point = run_point(setup, out.parent, args.progress, args.spread_runs, jitter)
        print(f"  live {point['live_wall_s']:.0f} s wall, simulated {point['sim_wall_s']:.2f} s: "
              f"{'all targets met' if point['met'] else 'a target missed'}", file=sys.stderr)
        points.append(point)
    first = setup_from_args(args, rates[0]) if rates else FidelitySetup()
    spec = first.engine()
    text = [f"## E4: simulator fidelity, live over HTTP (time scale {first.time_scale:g}) vs simulated "
            f"(queue {first.policy}, admission {first.admission}; {first.engines} engines of {first.profile}, "
            f"{spec.kv_blocks * spec.block_size:,} KV tokens each)", "",
            fidelity_table(points), "", volume_table(points), "",
            f"Simulated: the median of {args.spread_runs + 1} simulations, the unperturbed one and "
            f"{args.spread_runs} with start times moved by about a millisecond of wall time (the schedule under "
            "contention is chaotic; the live run is one draw from that spread). "
            f"Targets: attainment within {TARGET_POINTS:g} points, mean end-to-end latency within "
            f"{100 * TARGET_LATENCY:g}%. " + ", ".join(
                f"load {p['rate']:g}: {'met' if p['met'] else 'missed'}" for p in points) + "."]
    return {"experiment": "E4", "setup": {"rates": rates, "engine": asdict(spec), **asdict(first)},
            "points": points, "met": all(p["met"] for p in points), "markdown": "\n".join(text)}


# --------------------------------------------------------------------------------------------------- helper processes


def _watch_stdin(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    """Set ``stop`` when standard input closes: the parent is done (or gone)."""
    def watch() -> None:
        try:
            while sys.stdin.buffer.read(65536):
                pass
        finally:
            loop.call_soon_threadsafe(stop.set)

    threading.Thread(target=watch, name="stdin-watch", daemon=True).start()


class Sampler:
    """Samples ``probe()`` (a tuple of numbers) every ``period_s`` of wall time, stamped with the epoch time, so
    the live run gets the time series the simulator writes (reserved and used KV tokens, queued requests)."""

    def __init__(self, probe: Any, period_s: float) -> None:
        self.probe = probe
        self.period_s = period_s
        self.samples: list[tuple[float, ...]] = []
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self.period_s > 0:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            self.samples.append((time.time(), *self.probe()))
            await asyncio.sleep(self.period_s)

    async def stop(self) -> list[tuple[float, ...]]:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        return self.samples


async def _serve_engines(payload: dict[str, Any], stop: asyncio.Event) -> dict[str, Any]:
    from backends.sim import SimEngineOptions, start_sim_engines

    handles = await start_sim_engines(int(payload["count"]), SimEngineOptions(**payload["options"]))
    engines = [h.engine for h in handles]
    block_size = engines[0].block_size if engines else 0
    # KV tokens in use on all engines (the simulator's used_kv_tokens), and requests the engines hold
    sampler = Sampler(lambda: (sum((e.total_blocks - e.free_blocks) * block_size for e in engines),
                               sum(e.num_running + e.num_waiting for e in engines)), payload.get("sample_s", 0.0))
    try:
        print(orjson.dumps({"urls": [h.url for h in handles]}).decode(), flush=True)
        sampler.start()
        await stop.wait()
        return {"iterations": sum(e.iterations for e in engines),
                "preemptions": sum(e.num_preemptions for e in engines),
                "generation_tokens": sum(e.generation_tokens_total for e in engines),
                "prompt_tokens": sum(e.prompt_tokens_total for e in engines),
                "finished": sum(sum(e.finished_by_reason.values()) for e in engines),
                "samples": await sampler.stop()}
    finally:
        for handle in handles:
            await handle.stop()


async def _serve_gateway(payload: dict[str, Any], stop: asyncio.Event) -> dict[str, Any]:
    from gateway.app import Gateway
    from gateway.config import parse_config

    gateway = Gateway(parse_config(payload["config"]))
    url = await gateway.start("127.0.0.1", 0)

    def probe() -> tuple[int, int]:  # KV tokens reserved in the ledger, requests queued in the gateway
        snapshot = gateway.scheduling.snapshot()
        reserved = sum(e["reserved"] for e in snapshot["ledger"]["engines"].values())
        return reserved, sum(pool["waiting"] for pool in snapshot["pools"].values())

    sampler = Sampler(probe, payload.get("sample_s", 0.0))
    try:
        print(orjson.dumps({"url": url}).decode(), flush=True)
        sampler.start()
        await stop.wait()
        return {"mean_step_s": gateway.scheduling.ctx.mean_step_s, "samples": await sampler.stop()}
    finally:
        await gateway.stop()


class LagProbe:
    """How late this process's event loop wakes up (a 5 ms timer, over the whole run): the engines' step loop is
    late by as much, which the simulator does not model; CPU seconds used alongside."""

    PERIOD_S = 0.005

    def __init__(self) -> None:
        self.lags: list[float] = []
        self._task: asyncio.Task | None = None
        self._cpu0 = time.process_time()
        self._wall0 = time.perf_counter()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            before = time.perf_counter()
            await asyncio.sleep(self.PERIOD_S)
            self.lags.append(time.perf_counter() - before - self.PERIOD_S)

    async def stop(self) -> dict[str, float]:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        lags = sorted(self.lags) or [0.0]
        wall = time.perf_counter() - self._wall0
        return {"loop_lag_mean_ms": 1000 * sum(lags) / len(lags),
                "loop_lag_p99_ms": 1000 * quantile(lags, 0.99), "loop_lag_max_ms": 1000 * lags[-1],
                "cpu_s": time.process_time() - self._cpu0, "wall_s": wall}


async def _helper(role: str, payload: dict[str, Any]) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    _watch_stdin(loop, stop)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    serve = _serve_engines if role == "engines" else _serve_gateway
    probe = LagProbe()
    probe.start()
    stats = await serve(payload, stop)
    stats.update(await probe.stop())
    print(orjson.dumps({"stats": stats}).decode(), flush=True)


def main(argv: list[str] | None = None) -> int:
    """``python -m loadgen.fidelity engines|gateway JSON``: a helper process of the live side."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] not in ("engines", "gateway"):
        print("usage: python -m loadgen.fidelity engines|gateway JSON  (E4: maestro loadgen experiment E4)",
              file=sys.stderr)
        return 2
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _run_async(_helper(argv[0], orjson.loads(argv[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
