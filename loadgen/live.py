"""``live`` mode: send a workload through any OpenAI-compatible endpoint over real HTTP and measure it.

For every workflow the runner starts at its arrival time (divided by ``time_scale``), then sends each step as soon
as all its dependencies finished plus its ``think_time_s`` (also divided by ``time_scale``). A step whose dependency
failed is not sent and its workflow fails; the step is still recorded, as a failed request with status
``error:dependency`` (counted in ``meta.dependency_skipped``), so a completed run holds one request per step of the
workload, as a simulation does, and request SLO attainment is over all of them. Every request is a streamed
``POST {url}/chat/completions`` with ``stream_options.include_usage``; per request it records its arrival (the time
it was due: dependencies finished plus think time, as the simulator's release), how long it then waited for a client
concurrency slot before it was sent (``client_wait_s``), the first token (TTFT: the first delta with content,
reasoning text (``reasoning`` or ``reasoning_content``) or tool calls), the end of the stream and ``usage`` into
:class:`~loadgen.results.RequestResult`, and per workflow its arrival, finish and deadline into
:class:`~loadgen.results.WorkflowResult`.

Workflow context (steps of ``kind: workflow`` only; an interactive call goes out as a plain application call):
headers ``X-Workflow-Id``, ``X-Agent-Role``, ``X-Workflow-Step`` (0-based position of the step in the
workflow), ``X-Workflow-Deadline-Ms`` (absolute epoch milliseconds: arrival + deadline), ``X-SLO-Class``, and
with ``steps_hint`` ``X-Workflow-Steps`` (the total). ``context="metadata"`` sends the same facts in the body's
``metadata`` instead (``workflow_id``, ``agent_role``, ``workflow_step``, ``workflow_deadline_ms``,
``slo_class``, ``workflow_steps``; string values, as OpenAI requires); ``"both"`` sends both, ``"none"`` neither.
An interactive call whose SLO class is not ``interactive`` carries ``X-SLO-Class``.

Output length (``output_control``): ``hint`` sends ``X-Sim-Output-Tokens: N`` (the simulated engines' load
generator hint; the body declares the step's ``max_tokens``); ``ignore-eos`` sends ``max_tokens=N`` and
``ignore_eos: true`` (real vLLM; the gateway then sees the exact length as the declared cap, which a length
predictor should not be credited for); ``both``; ``none`` (the engine decides).

Prompts: a step with ``prompt_text`` sends it as the user message; otherwise a system message naming the role
and a user message of common three-letter English words (one token each in cl100k / Llama-3 style BPE
vocabularies, 4 characters each, so the simulated engines' ``chars / 4`` count agrees) sized to the step's
``prompt_tokens``. The words are drawn from a seed of (workload seed, workflow id, step id): prompts never share
a prefix, so engine prefix caches do not flatter the run.

Client: aiohttp with a small SSE parser (default), or the official ``openai`` SDK (``client="openai"``).
aiohttp is the default because the SDK costs about ten times more client CPU per streamed token, enough to make
the client the bottleneck: measured on 2 cores against one simulated engine in another process (256 streamed
requests of 200 tokens, 64 in flight), aiohttp used 1.9 ms of client CPU per request (9 us per token) and ended
in 1.4 s, the SDK (openai 3.57, httpx2) 18.7 ms per request (93 us per token) and needed 8 s. aiohttp is
also already a core dependency; the SDK is only in the ``test`` extra.

Bounded concurrency (``max_concurrency`` requests in flight; a step waits for a slot, and the wait counts in its
TTFT, end-to-end latency and SLO (the request is as late as it would be in a client that had to wait: no coordinated
omission); it is also reported per request, ``client_wait_s`` in the result's time base, and over the run in
``meta.client_wait_s``, mean and max in wall seconds), a hard ``time_limit_s`` (requests still in flight then end as
``error:time_limit``, and so do steps that were due but still waiting for a slot: never sent, they are counted in
``meta.not_sent`` too; steps of started workflows not yet due, waiting for a dependency or their think time, are
left out and counted in ``meta.not_due``; workflows not yet arrived are left out and counted in
``meta.not_started``, their steps in ``meta.not_started_steps``: requests + not_due + not_started_steps is every
step), and clean cancellation (``stop()``, SIGINT/SIGTERM in the CLI: in-flight requests are closed, so the engines
abort them, and the partial result is still written; the statuses are then ``error:stopped``). The attainments
of such a partial run (:meth:`~loadgen.results.RunResult.summary`, and ``maestro loadgen report``, which marks it
``(partial)`` and keeps it off the load plot) leave out the requests and workflows the stop cut off before their
TTFT target or deadline had passed (``summary.requests_cut``, ``summary.workflows_cut``): their outcome is unknown;
those that had already missed stay in as misses.

A stream that closes without a ``finish_reason`` or ``[DONE]`` is an answer cut short, ``error:truncated``; one the
engine ended with ``finish_reason`` ``"abort"`` (e.g. the engine was put to sleep) or ``"error"`` is unfinished too,
``error:finish_abort`` / ``error:finish_error`` (with ``n`` > 1, any answer so ended fails the request; the gateway
relays such an answer but does not count it as finished either): a failure whose workflow dependents are not sent,
its tokens received kept. Other failures, labelled alike by either client: ``error:http_<status>``,
``error:timeout`` (``request_timeout_s`` without an SSE data event; keep-alive comments do not count),
``error:connection`` (refused or reset), ``error:stream`` (an error event in the stream), ``error:bad_stream``
(unparseable data).

``meta.load`` is the offered load on the result's clock, the one its latencies are measured on: arrivals per
second of the result's time base (:func:`~loadgen.workload.arrival_rate` of the arrivals as sent), i.e. ``time_scale``
times the workload's with ``time_base="wall"`` (a run compressed 10x sends its arrivals 10x as fast), and the
workload's own with ``time_base="workload"``. ``meta.workload_load`` is always the workload's
(:meth:`~loadgen.workload.Workload.offered_load`: arrivals per second of workload time), the figure the simulator
records as its ``meta.load`` for the same workload.

SLO targets (TTFT, TPOT) and the default workflow deadlines are the gateway's built-in classes' unless
``slo_targets`` gives others (the CLI's ``--gateway-config FILE``: the classes of that gateway config); a workload
naming a class not among them is refused before the run (the gateway would answer its requests with 400).

Times in the result are seconds from the start of the run, wall clock (``time_base="wall"``; SLO targets and
deadlines are divided by ``time_scale`` so attainment is judged on the compressed clock), or multiplied back by
``time_scale`` (``time_base="workload"``: comparable with a simulator run of the uncompressed workload; use it
when the engines are sped up by the same factor, e.g. simulated engines with the same ``time_scale``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import importlib.util
import math
import random
import re
import signal
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson

from loadgen.results import (RequestResult, RunResult, WorkflowResult, announce_replacing, prepare_output,
                             write_atomically)
from loadgen.slo import add_gateway_config_argument, check_workload_slo_classes, slo_classes_from_args
from loadgen.workload import Step, Workflow, Workload, WorkloadError, arrival_rate, load_workload

HINT_HEADER = "X-Sim-Output-Tokens"
CONTEXTS = ("headers", "metadata", "both", "none")
OUTPUT_CONTROLS = ("hint", "ignore-eos", "both", "none")
CLIENTS = ("aiohttp", "openai")
TIME_BASES = ("wall", "workload")
MAX_ERRORS_KEPT = 20
PREFLIGHT_TIMEOUT_S = 5.0  # the GET {url}/models before a run, and the longest wait for one sample of the metrics
PROMPT_RATIO_OK = (0.8, 1.25)  # the engine's prompt token count against the plan's, beyond which the run warns
_SAMPLED = ("maestro_kv_reserved_tokens", "maestro_queued_requests")  # the gateway's gauges a live run samples
_SAMPLED_PREFIXES = tuple(p + name for name in _SAMPLED for p in ("", "# HELP ", "# TYPE "))
# finish reasons of an answer the engine did not finish (vLLM's "abort": the request was aborted, e.g. the engine
# was put to sleep; "error": it failed): the same as the gateway's (gateway/sse.py CUT_REASONS), which relays
# such an answer but does not count it as finished
CUT_FINISH_REASONS = ("abort", "error")

# SLO targets when the gateway's defaults cannot be imported: (ttft_s, tpot_s, workflow deadline_s)
_FALLBACK_SLO = {"interactive": (2.0, 0.1, None), "batch": (30.0, 0.2, 600.0)}

# Common three-letter English words: one BPE token each (with the leading space) in cl100k and Llama-3.
WORDS = tuple("""the and for are but not you all any can had her was one our out day get has him his how man new now
old see two way who boy did its let put say she too use act add age ago aid aim air art ask bad bag bar bed big bit
box bus buy car cat cup cut dog dry due ear eat egg end eye far fat few fit fly fun gas god gun guy hat hit hot ice
job key kid lab law lay leg lie lot low map mix mom net nor odd off oil own pay pen per pet pop raw red rid row run
sad sea set sex shy sir sit six sky son sun tax tea ten tie tip top toy try van war wet win yes yet zoo""".split())
_REQUEST_ID_BAD = re.compile(r"[^A-Za-z0-9._:\-]")


def _slo_targets() -> dict[str, tuple[float | None, float | None, float | None]]:
    try:
        from gateway.core.request import DEFAULT_SLO_CLASSES
    except Exception:  # pragma: no cover - the gateway package is part of this distribution
        return dict(_FALLBACK_SLO)
    return {name: (c.ttft_s, c.tpot_s, c.workflow_deadline_s) for name, c in DEFAULT_SLO_CLASSES.items()}


def synth_prompt(tokens: int, key: str) -> str:
    """``tokens`` words of filler (about ``tokens`` tokens), deterministic for ``key``."""
    seed = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")
    return " ".join(random.Random(seed).choices(WORDS, k=max(1, tokens)))


def build_messages(step: Step, key: str) -> list[dict[str, str]]:
    if step.prompt_text is not None:
        return [{"role": "user", "content": step.prompt_text}]
    system = f"You are the {step.role} agent."
    # chat framing: 3 (reply priming) + 4 per message + the system text (~7 tokens)
    words = (step.prompt_tokens or 1) - 18
    return [{"role": "system", "content": system}, {"role": "user", "content": synth_prompt(words, key)}]


@dataclass
class LiveOptions:
    url: str  # base URL ending in /v1 (as given to the OpenAI SDK)
    api_key: str | None = None
    model: str | None = None  # None: the workload's model
    time_scale: float = 1.0
    max_concurrency: int = 256
    time_limit_s: float | None = None  # wall seconds; None: until every workflow ends
    context: str = "headers"
    output_control: str = "hint"
    declare_max_tokens: bool = True
    steps_hint: bool = False
    client: str = "aiohttp"
    request_timeout_s: float = 600.0  # a request fails (error:timeout) after this long without an SSE data event
    time_base: str = "wall"
    progress: bool = True
    policy: dict[str, str] = field(default_factory=dict)
    # (ttft_s, tpot_s, workflow deadline_s) per SLO class; None: the gateway's built-in classes
    # (the CLI's --gateway-config gives a config's own, which is what that gateway schedules by)
    slo_targets: dict[str, tuple[float | None, float | None, float | None]] | None = None
    # a Maestro gateway's Prometheus page, sampled every sample_s wall seconds into the result's series
    # reserved_kv_tokens and queued_requests (the report's reserved-KV columns); None: no sampling
    metrics_url: str | None = None
    sample_s: float = 1.0

    def validate(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"url must start with http:// or https://, got {self.url!r}")
        # the SDK is not among the package's own dependencies (the tests' extra has it): a run without it ended
        # in a traceback after the preflight
        if self.client == "openai" and importlib.util.find_spec("openai") is None:
            raise ValueError("--client openai needs the openai package: pip install 'openai>=3.16.1' (or the "
                             "aiohttp client, the default)")
        # inf would put every arrival at t=0 and make every target and deadline 0 (nan: no comparison holds)
        if not (self.time_scale > 0 and math.isfinite(self.time_scale)):
            raise ValueError(f"time_scale must be a finite number > 0, got {self.time_scale!r}")
        if self.max_concurrency < 1:
            raise ValueError("max_concurrency must be >= 1")
        if self.time_limit_s is not None and not self.time_limit_s > 0:
            raise ValueError("time_limit_s must be > 0")
        # 0 would switch aiohttp's read timeout off (and a negative one is meaningless): a request must time out
        if not (self.request_timeout_s > 0 and math.isfinite(self.request_timeout_s)):
            raise ValueError("request_timeout_s must be a finite number of seconds > 0, "
                             f"got {self.request_timeout_s!r}")
        if not (self.sample_s > 0 and math.isfinite(self.sample_s)):
            raise ValueError(f"sample_s must be a finite number of seconds > 0, got {self.sample_s!r}")
        if self.metrics_url is not None and not self.metrics_url.startswith(("http://", "https://")):
            raise ValueError(f"metrics_url must start with http:// or https://, got {self.metrics_url!r}")
        for name, allowed in (("context", CONTEXTS), ("output_control", OUTPUT_CONTROLS), ("client", CLIENTS),
                              ("time_base", TIME_BASES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}")


class _DataTimeout:
    """``async with _DataTimeout(seconds) as timer``: :class:`TimeoutError` when ``seconds`` pass without
    ``timer.touch()``, counted from the start of the block, then from the latest touch.

    The runner touches it on each SSE data event, so comments (``: keep-alive``), which reset a socket read
    timeout, do not keep a request that sends no data alive for ever. A touch only notes the time (rescheduling an
    :func:`asyncio.timeout` on every event would cost 2 us a token); the timer, when due, re-arms itself for the
    latest touch and lets :func:`asyncio.timeout` cancel the block only when none came."""

    __slots__ = ("_seconds", "_loop", "_timeout", "_handle", "last")

    def __init__(self, seconds: float):
        self._seconds = seconds

    async def __aenter__(self) -> _DataTimeout:
        self._loop = asyncio.get_running_loop()
        self.last = self._loop.time()
        self._timeout = asyncio.timeout(None)
        await self._timeout.__aenter__()
        self._handle = self._loop.call_at(self.last + self._seconds, self._check)
        return self

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        self._handle.cancel()
        return await self._timeout.__aexit__(*exc_info)

    def touch(self) -> None:
        self.last = self._loop.time()

    def _check(self) -> None:
        due = self.last + self._seconds
        if due <= self._loop.time():
            self._timeout.reschedule(due)  # in the past: cancels the block now, which then raises TimeoutError
        else:
            self._handle = self._loop.call_at(due, self._check)


class _Progress:
    """tqdm when installed, else one status line on stderr about once a second."""

    def __init__(self, total: int, enabled: bool):
        self.total = total
        self.done = 0
        self.failed = 0
        self.enabled = enabled
        self._bar = None
        self._last = 0.0
        self._started = time.perf_counter()
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self._bar = tqdm(total=total, unit="req", desc="live", dynamic_ncols=True)

    def update(self, ok: bool, inflight: int) -> None:
        self.done += 1
        self.failed += 0 if ok else 1
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(failed=self.failed, inflight=inflight, refresh=False)
            return
        now = time.perf_counter()
        if now - self._last >= 1.0 or self.done == self.total:
            self._last = now
            end = "\n" if not sys.stderr.isatty() else ""
            print(f"\r[live] {self.done}/{self.total} requests, {self.failed} failed, {inflight} in flight, "
                  f"{now - self._started:.1f} s", end=end, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.enabled and sys.stderr.isatty():
            print(file=sys.stderr)


class LiveRunner:
    """One live run of one workload. ``await run()`` once; ``stop()`` ends it early (results are kept)."""

    def __init__(self, workload: Workload, options: LiveOptions):
        options.validate()
        self.workload = workload
        self.options = options
        self.model = options.model or workload.model
        self.targets = options.slo_targets or _slo_targets()
        # a class the gateway does not know is answered with 400; judged here it would have no targets (met)
        check_workload_slo_classes(workload, self.targets)
        self.scale = options.time_scale
        self._time_factor = self.scale if options.time_base == "workload" else 1.0
        self._target_factor = 1.0 if options.time_base == "workload" else 1.0 / self.scale
        self.requests: list[RequestResult] = []
        self.workflows: list[WorkflowResult] = []
        self.errors: list[str] = []
        self.status = Counter()
        self.output_mismatches = 0
        self.prompt_tokens_planned = 0  # over the requests that succeeded
        self.prompt_tokens_counted = 0
        self.inflight = 0
        self.peak_inflight = 0
        self.client_waits: list[float] = []
        self.not_sent = 0  # steps recorded as failed because the run ended while they waited for a slot
        self.dependency_skipped = 0  # steps recorded as failed (error:dependency) because a dependency failed
        self._cancel_reason = "cancelled"  # what ends in-flight and waiting requests: time_limit, stopped, ...
        self._stop = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self._run_tag = hashlib.blake2b(f"{time.time_ns()}".encode(), digest_size=3).hexdigest()
        self._t0 = 0.0
        self._t0_epoch = 0.0
        self._progress: _Progress | None = None
        self.series: dict[str, list[tuple[float, float]]] = {}
        self.metrics_note: str | None = None  # why the gateway's metrics were not (or no longer) sampled

    # ------------------------------------------------------------------------------------------ clock

    def _now(self) -> float:
        """Seconds since the run started, in the result's time base."""
        return (time.perf_counter() - self._t0) * self._time_factor

    def stop(self) -> None:
        self._stop.set()

    # ------------------------------------------------------------------------------------------ run

    async def run(self) -> RunResult:
        opts = self.options
        total = sum(len(w.steps) for w in self.workload.workflows)
        self._progress = _Progress(total, opts.progress)
        self._semaphore = asyncio.Semaphore(opts.max_concurrency)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=opts.request_timeout_s)
        connector = aiohttp.TCPConnector(limit=opts.max_concurrency, limit_per_host=0, force_close=False)
        self._session = aiohttp.ClientSession(connector=connector, timeout=timeout)
        self._openai = None
        if opts.client == "openai":
            import openai

            self._openai = openai.AsyncOpenAI(base_url=opts.url, api_key=opts.api_key or "none", max_retries=0,
                                              timeout=opts.request_timeout_s)
        self._t0 = time.perf_counter()
        self._t0_epoch = time.time()
        reason = "completed"
        dispatcher = asyncio.create_task(self._dispatch())
        finished = asyncio.create_task(self._all_done(dispatcher))
        stopper = asyncio.create_task(self._stop.wait())
        sampler = asyncio.create_task(self._sample_gateway()) if opts.metrics_url else None
        try:
            done, _ = await asyncio.wait({finished, stopper}, timeout=opts.time_limit_s,
                                         return_when=asyncio.FIRST_COMPLETED)
            if finished not in done:
                reason = "stopped" if stopper in done else "time_limit"
            elif finished.exception() is not None:
                raise finished.exception()
        finally:
            wall = time.perf_counter() - self._t0
            self._cancel_reason = reason if reason != "completed" else "cancelled"
            for task in (dispatcher, finished, stopper, *self._tasks):
                task.cancel()
            await asyncio.gather(dispatcher, finished, stopper, *self._tasks, return_exceptions=True)
            if sampler is not None:
                sampler.cancel()
                await asyncio.gather(sampler, return_exceptions=True)
            await self._session.close()
            if self._openai is not None:
                await self._openai.close()
            self._progress.close()
        return self._result(reason, wall)

    async def _sample_gateway(self) -> None:
        """Sample the gateway's reserved KV and queue (each summed over its engines and pools) every ``sample_s``
        wall seconds, on a connection of its own (the run's may all be taken). A page without Maestro's gauges
        (a plain engine at the URL) ends the sampling, noted in ``meta.metrics_note``; a failed sample is skipped."""
        from prometheus_client.parser import text_string_to_metric_families

        opts = self.options
        # the key goes only where the requests go: a --metrics-url elsewhere gets none
        same_origin = urlsplit(opts.metrics_url)[:2] == urlsplit(opts.url)[:2]
        headers = bearer_headers(opts.api_key if same_origin else None)
        reserved = self.series.setdefault("reserved_kv_tokens", [])
        queued = self.series.setdefault("queued_requests", [])
        failures = 0
        timeout = aiohttp.ClientTimeout(total=max(opts.sample_s, PREFLIGHT_TIMEOUT_S))
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                at = self._now()
                try:
                    async with session.get(opts.metrics_url, headers=headers) as response:
                        text = (await response.read()).decode("utf-8", "replace") if response.status == 200 else None
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    text = None
                if text is None:
                    failures += 1
                    self.metrics_note = f"{failures} sample(s) of {opts.metrics_url} failed"
                else:
                    sums: dict[str, float] = {}
                    # only the two families' lines are parsed: a whole page of a gateway with dozens of engines
                    # took 6 ms to parse, on the event loop that times the requests
                    text = "\n".join(line for line in text.splitlines() if line.startswith(_SAMPLED_PREFIXES))
                    try:
                        for family in text_string_to_metric_families(text):
                            if family.name in _SAMPLED:
                                sums[family.name] = sum(sample.value for sample in family.samples)
                    except ValueError:
                        pass  # not Prometheus' text format: as a page without the gauges
                    if "maestro_kv_reserved_tokens" not in sums:
                        self.metrics_note = (f"{opts.metrics_url} has no maestro_kv_reserved_tokens (not a Maestro "
                                             "gateway's metrics): no KV series")
                        return
                    reserved.append((at, sums["maestro_kv_reserved_tokens"]))
                    queued.append((at, sums.get("maestro_queued_requests", 0.0)))
                await asyncio.sleep(opts.sample_s)

    async def _all_done(self, dispatcher: asyncio.Task) -> None:
        await dispatcher
        while self._tasks:
            outcomes = await asyncio.gather(*list(self._tasks), return_exceptions=True)
            for outcome in outcomes:
                # failed requests are recorded, never raised: an exception here is a bug in the runner, and
                # swallowing it would pass off a run with requests missing as "completed"
                if isinstance(outcome, Exception):
                    raise outcome

    async def _dispatch(self) -> None:
        workflows = self.workload.workflows
        for workflow in workflows:  # (cancelled at the run's end: the workflows not begun are counted by _result)
            delay = self._t0 + workflow.arrival_s / self.scale - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(self._workflow(workflow))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------------------------------ workflows

    def _deadline_s(self, workflow: Workflow) -> float | None:
        """Relative deadline in workload seconds (the class default when the workflow has none)."""
        if workflow.interactive:
            return workflow.deadline_s
        if workflow.deadline_s is not None:
            return workflow.deadline_s
        return self.targets.get(workflow.slo_class, (None, None, None))[2]

    async def _workflow(self, workflow: Workflow) -> None:
        arrival = self._now()
        deadline = self._deadline_s(workflow)
        result = WorkflowResult(workflow_id=workflow.id, kind=workflow.kind, slo_class=workflow.slo_class,
                                arrival=arrival, steps=len(workflow.steps),
                                deadline_s=None if deadline is None else deadline * self._target_factor)
        self.workflows.append(result)
        deadline_epoch_ms = None
        if deadline is not None:
            deadline_epoch_ms = int((time.time() + deadline / self.scale) * 1000)
        loop = asyncio.get_running_loop()
        done: dict[str, asyncio.Future] = {s.id: loop.create_future() for s in workflow.steps}
        steps = [asyncio.create_task(self._step(workflow, index, step, done, deadline_epoch_ms, result))
                 for index, step in enumerate(workflow.steps)]
        try:
            await asyncio.gather(*steps)
        finally:
            for task in steps:
                task.cancel()
            await asyncio.gather(*steps, return_exceptions=True)
            for future in done.values():
                if not future.done():
                    future.cancel()
        if result.steps_ok == result.steps:
            result.finish = max(f.result() for f in done.values())

    async def _step(self, workflow: Workflow, index: int, step: Step, done: dict[str, asyncio.Future],
                    deadline_epoch_ms: int | None, result: WorkflowResult) -> None:
        future = done[step.id]
        try:
            # (the run may end here, before the step is due: no request; _result counts it in meta.not_due)
            for dep in step.depends_on:
                if await asyncio.shield(done[dep]) is None:  # shield: a cancelled waiter must not cancel it
                    # a dependency failed: not sent, but recorded as a failed request, so the result holds
                    # every step of the workload (the simulator's denominator) and attainment is not overstated
                    self._record_skipped(workflow, step)
                    future.set_result(None)
                    return
            if step.think_time_s > 0:
                await asyncio.sleep(step.think_time_s / self.scale)
            # the request's arrival: when the workload says it is due, not when a concurrency slot freed up
            waited = time.perf_counter()
            ready = self._now()
            try:
                await self._semaphore.acquire()
            except asyncio.CancelledError:
                # the run ended while the step waited for a concurrency slot: it was due, so it counts (as a
                # failure, like the requests cut in flight) rather than vanishing from the result
                self._record_not_sent(workflow, step, ready)
                raise
            try:
                self.client_waits.append(time.perf_counter() - waited)
                request = await self._send(workflow, index, step, deadline_epoch_ms, ready)
            finally:
                self._semaphore.release()
            ok = request.status == "ok"
            if ok:
                result.steps_ok += 1
            future.set_result(request.finish if ok else None)
        finally:
            if not future.done():
                future.set_result(None)

    # ------------------------------------------------------------------------------------------ one request

    def _request(self, workflow: Workflow, index: int, step: Step,
                 deadline_epoch_ms: int | None) -> tuple[str, dict[str, Any], dict[str, str]]:
        opts = self.options
        request_id = self._request_id(workflow, step)
        body: dict[str, Any] = {"model": self.model,
                                "messages": build_messages(step, f"{self.workload.seed}/{workflow.id}/{step.id}"),
                                "stream": True, "stream_options": {"include_usage": True}}
        headers: dict[str, str] = {"X-Request-Id": request_id}
        if opts.output_control in ("hint", "both"):
            headers[HINT_HEADER] = str(step.output_tokens)
        if opts.output_control in ("ignore-eos", "both"):
            body["max_tokens"] = step.output_tokens
            body["ignore_eos"] = True
        elif opts.declare_max_tokens:
            body["max_tokens"] = step.max_tokens
        context: dict[str, str] = {}
        if not workflow.interactive:
            context = {"X-Workflow-Id": workflow.id, "X-Agent-Role": step.role, "X-Workflow-Step": str(index),
                       "X-SLO-Class": workflow.slo_class}
            if deadline_epoch_ms is not None:
                context["X-Workflow-Deadline-Ms"] = str(deadline_epoch_ms)
            if opts.steps_hint:
                context["X-Workflow-Steps"] = str(len(workflow.steps))
        elif workflow.slo_class != "interactive":
            context = {"X-SLO-Class": workflow.slo_class}
        if context and opts.context in ("headers", "both"):
            headers.update(context)
        if context and opts.context in ("metadata", "both"):
            names = {"X-Workflow-Id": "workflow_id", "X-Agent-Role": "agent_role", "X-Workflow-Step": "workflow_step",
                     "X-Workflow-Deadline-Ms": "workflow_deadline_ms", "X-SLO-Class": "slo_class",
                     "X-Workflow-Steps": "workflow_steps"}
            body["metadata"] = {names[k]: v for k, v in context.items()}
        return request_id, body, headers

    def _request_id(self, workflow: Workflow, step: Step) -> str:
        return _REQUEST_ID_BAD.sub("_", f"lg{self._run_tag}-{workflow.id}-{step.id}")[:128]

    def _new_result(self, workflow: Workflow, step: Step, arrival: float) -> RequestResult:
        ttft_t, tpot_t, _ = self.targets.get(workflow.slo_class, (None, None, None))
        factor = self._target_factor
        return RequestResult(
            request_id=self._request_id(workflow, step), workflow_id=None if workflow.interactive else workflow.id,
            step_id=step.id, role=step.role, slo_class=workflow.slo_class, arrival=arrival,
            prompt_tokens=step.prompt_token_count(), output_tokens=0,
            ttft_target_s=None if ttft_t is None else ttft_t * factor,
            tpot_target_s=None if tpot_t is None else tpot_t * factor)

    def _record_not_sent(self, workflow: Workflow, step: Step, ready: float) -> None:
        """A step that was due at ``ready`` but never got a concurrency slot before the run ended."""
        result = self._new_result(workflow, step, ready)
        result.client_wait_s = self._now() - ready
        result.status = f"error:{self._cancel_reason}"
        self.not_sent += 1
        self._record(result, step, in_flight=False)

    def _record_skipped(self, workflow: Workflow, step: Step) -> None:
        """A step never sent because a step it depends on failed: a failed request (``error:dependency``) at the
        time the failure became known, counted in ``meta.dependency_skipped``."""
        result = self._new_result(workflow, step, self._now())
        result.status = "error:dependency"
        self.dependency_skipped += 1
        self._record(result, step, in_flight=False)

    async def _send(self, workflow: Workflow, index: int, step: Step, deadline_epoch_ms: int | None,
                    arrival: float) -> RequestResult:
        """Send the step due at ``arrival`` (result time base) and record it."""
        _, body, headers = self._request(workflow, index, step, deadline_epoch_ms)
        result = self._new_result(workflow, step, arrival)
        result.client_wait_s = self._now() - arrival
        self.inflight += 1
        self.peak_inflight = max(self.peak_inflight, self.inflight)
        try:
            if self._openai is not None:
                await self._stream_openai(body, headers, result)
            else:
                await self._stream_aiohttp(body, headers, result)
        except asyncio.CancelledError:
            result.status = f"error:{self._cancel_reason}"
            self._record(result, step)
            raise
        except TimeoutError as exc:  # before OSError: aiohttp's read timeout is a ClientError and a TimeoutError
            result.status = "error:timeout"
            self._error(f"{result.request_id}: {type(exc).__name__}: "
                        f"{exc or f'no SSE data event for {self.options.request_timeout_s:g} s'}")
        except (aiohttp.ClientError, OSError) as exc:
            result.status = "error:connection"
            self._error(f"{result.request_id}: {type(exc).__name__}: {exc}")
        except Exception as exc:  # the SDK's own errors (openai.APIError...), malformed streams
            result.status = self._sdk_status(exc)
            self._error(f"{result.request_id}: {type(exc).__name__}: {exc}")
        self._record(result, step)
        return result

    def _sdk_status(self, exc: Exception) -> str:
        """The status of a request the ``openai`` SDK failed with ``exc``, as the aiohttp client labels it."""
        if self._openai is None:
            return "error:client"
        import openai

        if isinstance(exc, openai.APITimeoutError):  # before APIConnectionError, its base class
            return "error:timeout"
        if isinstance(exc, openai.APIConnectionError):  # refused, reset before or during the stream
            return "error:connection"
        if isinstance(exc, openai.APIStatusError):
            return f"error:http_{exc.status_code}"
        if isinstance(exc, (openai.APIResponseValidationError, ValueError)):  # ValueError: unparseable SSE data
            return "error:bad_stream"
        if isinstance(exc, openai.APIError):  # what the SDK raises for an error event in the stream
            return "error:stream"
        return "error:client"

    def _record(self, result: RequestResult, step: Step, in_flight: bool = True) -> None:
        if in_flight:
            self.inflight -= 1
        if result.status == "ok" and self.options.output_control != "none" \
                and result.output_tokens != step.output_tokens:
            self.output_mismatches += 1
        if result.status == "ok":  # the engine's count (its usage) against the workload's plan
            self.prompt_tokens_planned += step.prompt_token_count()
            self.prompt_tokens_counted += result.prompt_tokens
        self.requests.append(result)
        self.status[result.status] += 1
        if self._progress is not None:
            self._progress.update(result.status == "ok", self.inflight)

    def _error(self, message: str) -> None:
        if len(self.errors) < MAX_ERRORS_KEPT:
            self.errors.append(message[:500])

    async def _stream_aiohttp(self, body: dict[str, Any], headers: dict[str, str], result: RequestResult) -> None:
        headers = {**headers, "Content-Type": "application/json", "Accept": "text/event-stream",
                   **bearer_headers(self.options.api_key)}
        url = self.options.url.rstrip("/") + "/chat/completions"
        chunks = 0
        usage = None
        complete = False  # a [DONE] or a finish_reason: the server ended the answer, not just the connection
        cut = None  # the first finish_reason of an answer the engine did not finish ("abort", "error")
        async with _DataTimeout(self.options.request_timeout_s) as timer, \
                self._session.post(url, data=orjson.dumps(body), headers=headers) as response, \
                contextlib.aclosing(_sse_data(response.content)) as events:  # closed here when the loop breaks
            if response.status != 200:
                text = (await response.read())[:400].decode("utf-8", "replace")
                result.status = f"error:http_{response.status}"
                self._error(f"{result.request_id}: HTTP {response.status}: {text}")
                return
            async for payload in events:
                timer.touch()
                if payload.strip() == b"[DONE]":
                    complete = True
                    break
                try:
                    event = orjson.loads(payload)
                except orjson.JSONDecodeError:
                    result.status = "error:bad_stream"
                    self._error(f"{result.request_id}: unparseable SSE data {payload[:200]!r}")
                    return
                if event.get("error") is not None:
                    result.status = "error:stream"
                    self._error(f"{result.request_id}: stream error {orjson.dumps(event['error'])[:300]!r}")
                    return
                for choice in event.get("choices") or ():
                    delta = choice.get("delta") or {}
                    # reasoning text: "reasoning" (current vLLM) or "reasoning_content" (older)
                    if delta.get("content") or delta.get("reasoning") or delta.get("reasoning_content") \
                            or delta.get("tool_calls"):
                        if result.first_token is None:
                            result.first_token = self._now()
                        chunks += 1
                        result.output_tokens = chunks  # so far: kept where the stream then fails
                    reason = choice.get("finish_reason")
                    if reason is not None:
                        complete = True
                        if cut is None and reason in CUT_FINISH_REASONS:
                            cut = reason
                if event.get("usage"):
                    usage = event["usage"]
        self._finish(result, usage, chunks, complete, cut)

    async def _stream_openai(self, body: dict[str, Any], headers: dict[str, str], result: RequestResult) -> None:
        extra = {k: body[k] for k in ("ignore_eos", "metadata") if k in body}
        kwargs: dict[str, Any] = {}
        if "max_tokens" in body:
            kwargs["max_tokens"] = body["max_tokens"]
        chunks = 0
        usage = None
        complete = False  # the SDK hides [DONE]: a finish_reason is the server's end of the answer
        cut = None  # the first finish_reason of an answer the engine did not finish ("abort", "error")
        async with _DataTimeout(self.options.request_timeout_s) as timer:
            stream = await self._openai.chat.completions.create(
                model=body["model"], messages=body["messages"], stream=True, stream_options={"include_usage": True},
                extra_headers=headers, extra_body=extra or None, **kwargs)
            async with stream:  # closes the response when the stream fails, times out or is cancelled
                async for chunk in stream:  # data events only: the SDK skips comments
                    timer.touch()
                    for choice in chunk.choices or ():
                        delta = choice.delta
                        # fields the SDK does not declare (reasoning, reasoning_content) are attributes too
                        if delta is not None and (delta.content or getattr(delta, "tool_calls", None)
                                                  or getattr(delta, "reasoning", None)
                                                  or getattr(delta, "reasoning_content", None)):
                            if result.first_token is None:
                                result.first_token = self._now()
                            chunks += 1
                            result.output_tokens = chunks  # so far: kept where the stream then fails
                        reason = choice.finish_reason
                        if reason is not None:
                            complete = True
                            if cut is None and reason in CUT_FINISH_REASONS:
                                cut = reason
                    if chunk.usage is not None:
                        usage = {"prompt_tokens": chunk.usage.prompt_tokens,
                                 "completion_tokens": chunk.usage.completion_tokens}
        self._finish(result, usage, chunks, complete, cut)

    def _finish(self, result: RequestResult, usage: dict[str, Any] | None, chunks: int, complete: bool,
                cut: str | None = None) -> None:
        if cut is not None:
            # the engine ended an answer without finishing it (with n > 1: any one of them): the bytes came, but
            # the gateway does not count it as a finished answer either; what arrived is kept for diagnosis
            self._count_tokens(result, usage, chunks)
            result.status = f"error:finish_{cut}"
            self._error(f"{result.request_id}: the engine ended the answer with finish_reason {cut!r} "
                        f"after {result.output_tokens} token(s)")
            return
        if not complete:
            # the stream closed cleanly but the answer never ended (no finish_reason, no [DONE]): a server or
            # proxy that gave up mid-answer; what arrived is kept, but it is not a success
            result.output_tokens = chunks
            result.status = "error:truncated"
            self._error(f"{result.request_id}: stream ended without a finish_reason or [DONE] "
                        f"after {chunks} content chunk(s)")
            return
        result.finish = self._now()
        self._count_tokens(result, usage, chunks)
        if result.first_token is None:
            if result.output_tokens > 0:
                result.first_token = result.finish
            else:
                result.status = "error:no_output"

    @staticmethod
    def _count_tokens(result: RequestResult, usage: dict[str, Any] | None, chunks: int) -> None:
        if usage and isinstance(usage.get("completion_tokens"), int):
            result.output_tokens = usage["completion_tokens"]
            if isinstance(usage.get("prompt_tokens"), int):
                result.prompt_tokens = usage["prompt_tokens"]
        else:
            result.output_tokens = chunks  # no usage chunk: content events (>= 1 token each) as a lower bound

    # ------------------------------------------------------------------------------------------ result

    def _not_run(self) -> tuple[int, int, int]:
        """(workflows not begun, their steps, steps of begun workflows with no request): what a run ended early
        (``--time-limit``, Ctrl-C) left out, derived from what it recorded, so that requests + not due + the steps
        of workflows not begun is every step of the workload. (Counted where each task was cancelled, tasks
        cancelled before their first turn were missed: a workflow task before it began, a step task before it
        waited.)"""
        begun = {w.workflow_id for w in self.workflows}
        not_begun = [w for w in self.workload.workflows if w.id not in begun]
        begun_steps = sum(len(w.steps) for w in self.workload.workflows if w.id in begun)
        return len(not_begun), sum(len(w.steps) for w in not_begun), begun_steps - len(self.requests)

    def _result_load(self) -> float | None:
        """The workload's arrivals per second of the result's time base (see the module docstring)."""
        if self.options.time_base == "workload" or self.scale == 1.0:  # the result's clock is the workload's
            return self.workload.offered_load()
        return arrival_rate([w.arrival_s / self.scale for w in self.workload.workflows])

    def _result(self, reason: str, wall: float) -> RunResult:
        waits = self.client_waits
        not_started, not_started_steps, not_due = self._not_run()
        meta = {
            "url": self.options.url, "client": self.options.client, "workload": self.workload.name,
            "workload_seed": self.workload.seed, "model": self.model, "time_scale": self.scale,
            "time_base": self.options.time_base,
            # arrivals per second of the result's clock, where its latencies are (x time_scale on the wall clock:
            # the report's load axis must be in the latencies' time base); workload_load: per second of workload
            # time, as the simulator records it (not the spec's nominal rate: a replay adds calls, a file may
            # have no spec)
            "load": self._result_load(), "workload_load": self.workload.offered_load(),
            "context": self.options.context,
            "output_control": self.options.output_control, "max_concurrency": self.options.max_concurrency,
            "started_at_epoch": self._t0_epoch, "wall_s": round(wall, 3), "end": reason,
            "not_started": not_started, "not_started_steps": not_started_steps, "not_due": not_due,
            "not_sent": self.not_sent,
            "dependency_skipped": self.dependency_skipped, "status_counts": dict(self.status),
            "output_mismatches": self.output_mismatches, "prompt_tokens_planned": self.prompt_tokens_planned,
            "prompt_tokens_counted": self.prompt_tokens_counted, "peak_inflight": self.peak_inflight,
            "client_wait_s": {"mean": sum(waits) / len(waits) if waits else 0.0, "max": max(waits, default=0.0)},
            "errors": self.errors,
        }
        self.requests.sort(key=lambda r: r.arrival)
        self.workflows.sort(key=lambda w: w.arrival)
        meta["metrics_url"] = self.options.metrics_url
        meta["metrics_note"] = self.metrics_note
        return RunResult(mode="live", policy=dict(self.options.policy), requests=self.requests,
                         workflows=self.workflows, meta=meta,
                         series={name: points for name, points in self.series.items() if points})


async def run_live(workload: Workload, options: LiveOptions) -> RunResult:
    """Run ``workload`` against ``options.url``; see the module docstring."""
    return await LiveRunner(workload, options).run()


# ---------------------------------------------------------------------------------------------- CLI

def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def add_live_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--url", required=True, help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    add("--workload", "-w", required=True, help="a maestro-workload/1 file (maestro loadgen workload --out ...)")
    add("--out", "-o", required=True, help="write the RunResult JSON here")
    add("--api-key", help="sent as 'Authorization: Bearer KEY' (default: $OPENAI_API_KEY if set)")
    add("--model", help="override the workload's model name")
    add("--time-scale", type=float, default=1.0,
        help="divide arrivals, pauses and deadlines by this (compress the run), default 1")
    add("--time-base", choices=TIME_BASES, default="wall",
        help="result times in wall seconds (default) or multiplied back by --time-scale (workload seconds)")
    add("--max-concurrency", type=int, default=256, help="requests in flight at most (default 256)")
    add("--time-limit", type=float, help="hard limit in wall seconds; what is in flight then is cancelled")
    add("--context", choices=CONTEXTS, default="headers",
        help="how workflow context is sent: headers (default), body metadata, both, none")
    add("--output-control", choices=OUTPUT_CONTROLS, default="hint",
        help="output length: X-Sim-Output-Tokens hint (default, simulated engines), ignore-eos "
             "(max_tokens=N + ignore_eos, real vLLM), both, none")
    add("--no-max-tokens", action="store_true", help="do not declare the step's max_tokens in the body")
    add("--steps-hint", action="store_true", help="also send X-Workflow-Steps (the workflow's step count)")
    add("--client", choices=CLIENTS, default="aiohttp", help="HTTP client: aiohttp (default) or the openai SDK")
    add("--request-timeout", type=float, default=600.0,
        help="seconds without an SSE data event (from the send, then from the latest event) before a request "
             "fails as error:timeout; ': keep-alive' comments do not count (> 0; default 600)")
    add("--policy", action="append", type=_key_value, metavar="KEY=VALUE",
        help="label the result with the gateway's policy (repeatable, e.g. queue=edf admission=predicted)")
    add("--metrics-url", help="a Maestro gateway's Prometheus page, sampled into the result's reserved_kv_tokens "
                              "and queued_requests series (the report's reserved-KV columns); default: the /metrics "
                              "beside --url where it ends in /v1")
    add("--no-metrics", action="store_true", help="do not sample the gateway's metrics")
    add("--sample-interval", type=float, default=1.0, help="seconds between samples of --metrics-url (default 1)")
    add("--no-progress", action="store_true", help="no progress bar")
    add_gateway_config_argument(parser)


def options_from_args(args: argparse.Namespace) -> LiveOptions:
    """The options the flags describe; ``--gateway-config`` is read here (``ValueError`` when it is bad)."""
    import os

    targets = {name: (c.ttft_s, c.tpot_s, c.workflow_deadline_s) for name, c in slo_classes_from_args(args).items()}
    metrics_url = args.metrics_url
    if metrics_url is None and args.url.rstrip("/").endswith("/v1"):
        metrics_url = args.url.rstrip("/")[:-len("/v1")] + "/metrics"
    return LiveOptions(url=args.url, api_key=args.api_key or os.environ.get("OPENAI_API_KEY"), model=args.model,
                       time_scale=args.time_scale, max_concurrency=args.max_concurrency,
                       time_limit_s=args.time_limit, context=args.context, output_control=args.output_control,
                       declare_max_tokens=not args.no_max_tokens, steps_hint=args.steps_hint, client=args.client,
                       request_timeout_s=args.request_timeout, time_base=args.time_base,
                       progress=not args.no_progress, policy=dict(args.policy or ()), slo_targets=targets,
                       metrics_url=None if args.no_metrics else metrics_url, sample_s=args.sample_interval)


def bearer_headers(api_key: str | None) -> dict[str, str]:
    """The ``Authorization`` header an OpenAI-compatible server reads the key from; none without a key."""
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


async def check_endpoint(url: str, model: str, api_key: str | None) -> tuple[bool, str | None]:
    """What would make every request of a run fail, looked for before the run by one ``GET {url}/models``:
    ``(True, message)`` where the server lists its models and ``model`` is not one of them (a run that can only
    collect 404s); ``(False, message)`` for a doubt worth a warning (no server there, a URL that is not the API's
    base, a key refused: the run goes on and records what fails); ``(False, None)`` where nothing looks wrong."""
    headers = bearer_headers(api_key)
    models_url = url.rstrip("/") + "/models"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=PREFLIGHT_TIMEOUT_S)) as session:
            async with session.get(models_url, headers=headers) as response:
                status = response.status
                raw = await response.read()
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:  # ValueError: a URL aiohttp refuses
        return False, f"cannot reach {models_url}: {str(exc) or exc.__class__.__name__}"
    if status == 404:
        return False, (f"GET {models_url} answered 404; --url should be the API's base URL, the one an OpenAI "
                       "client takes (it ends in /v1 on the gateway and on vLLM)")
    if status in (401, 403):
        return False, (f"GET {models_url} answered {status}: the server refused the key; pass --api-key or set "
                       "$OPENAI_API_KEY")
    if status != 200:
        return False, None
    try:
        served = [card["id"] for card in orjson.loads(raw)["data"]]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return False, None  # not OpenAI's list: the run will tell
    if model not in served:
        shown = ", ".join(map(str, served[:10])) + (", ..." if len(served) > 10 else "")
        return True, (f"model {model!r} is not served at {url} (it serves: {shown or 'nothing'}); pass --model "
                      "NAME, or write the workload with maestro loadgen workload --model NAME")
    return False, None


def live_main(args: argparse.Namespace) -> int:
    """``maestro loadgen live``: 0 when every request succeeded, 1 when some failed, 2 on bad input."""
    try:
        workload = load_workload(args.workload)
        options = options_from_args(args)
        options.validate()
        check_workload_slo_classes(workload, options.slo_targets or _slo_targets())
        # before the run: a bad --out must not cost the whole run, nor replace an input
        prepare_output(args.out, inputs=(args.workload, getattr(args, "gateway_config", None)))
    except (WorkloadError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    fatal, problem = asyncio.run(check_endpoint(options.url, options.model or workload.model, options.api_key))
    if problem is not None:
        print(f"{'error' if fatal else 'warning'}: {problem}", file=sys.stderr)
        if fatal:
            return 2
    announce_replacing(args.out)

    async def main() -> RunResult:
        runner = LiveRunner(workload, options)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, runner.stop)
            except (NotImplementedError, RuntimeError, ValueError):  # non-Unix loops, not the main thread
                pass
        return await runner.run()

    result = asyncio.run(main())
    try:
        write_atomically(args.out, orjson.dumps(result.to_json(), option=orjson.OPT_INDENT_2))
    except OSError as exc:  # the folder changed under the run
        print(f"error: cannot write {args.out}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    summary = result.summary()
    meta = result.meta
    not_run = ""
    if meta["not_due"] or meta["not_started"]:  # the run ended early: say what is missing from the requests
        steps = sum(len(w.steps) for w in workload.workflows)
        not_run = (f"; not run: {meta['not_due']} step(s) of started workflows not yet due, {meta['not_started']} "
                   f"workflow(s) not started ({meta['not_started_steps']} step(s)), of {steps} steps")
    if summary["requests_cut"] or summary["workflows_cut"]:  # undecided at the stop: not the policy's misses
        not_run += (f"; left out of the attainments: {summary['requests_cut']} request(s) and "
                    f"{summary['workflows_cut']} workflow(s) cut off by the stop before their target passed")
    print(f"wrote {args.out}: {summary['requests_ok']}/{summary['requests']} requests ok, "
          f"request SLO attainment {_pct(summary['request_slo_attainment'])}, workflow deadline attainment "
          f"{_pct(summary['workflow_deadline_attainment'])} ({meta['end']}, {meta['wall_s']:.1f} s){not_run}",
          file=sys.stderr)
    if meta["output_mismatches"]:
        hint = (" The X-Sim-Output-Tokens hint steers only the simulated engines: against a real vLLM use "
                "--output-control ignore-eos." if options.output_control == "hint" else "")
        print(f"warning: {meta['output_mismatches']} of {summary['requests_ok']} requests that succeeded generated "
              f"another length than the workload's.{hint}", file=sys.stderr)
    planned, counted = meta["prompt_tokens_planned"], meta["prompt_tokens_counted"]
    if planned and not PROMPT_RATIO_OK[0] <= counted / planned <= PROMPT_RATIO_OK[1]:
        print(f"warning: the engine counted {counted / planned:.2f} times the prompt tokens the workload planned "
              f"({counted:,} against {planned:,}): its tokenizer reads loadgen's prompts otherwise than the "
              "workload assumed, so the load differs from the plan (and prompts sized near the context may be "
              "refused; loadgen workload --max-prompt-tokens bounds them)", file=sys.stderr)
    failed = {status: count for status, count in sorted(meta["status_counts"].items()) if status != "ok"}
    if failed:  # the why, here: a run that failed every request said only "0/55 requests ok"
        print(f"failed: {', '.join(f'{status} {count}' for status, count in failed.items())}"
              + (f"; first error: {meta['errors'][0]}" if meta["errors"] else ""), file=sys.stderr)
    return 0 if summary["requests_ok"] == summary["requests"] and result.meta["end"] == "completed" else 1


async def _sse_data(lines: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The data of each server-sent event, as the SSE standard assembles it: its ``data:`` lines (one leading space
    dropped) joined by newlines, given when the blank line that ends the event arrives (or the stream ends).
    Comments (``: keep-alive``), ``event:``, ``id:`` and ``retry:`` lines carry none. vLLM and the gateway send one
    line an event; a server that splits an event's JSON over several ``data:`` lines is valid SSE too, and its
    every line had been taken for an event of its own (unparseable)."""
    data: list[bytes] = []
    async for raw in lines:
        line = raw.rstrip(b"\r\n")
        if line:
            if line.startswith(b"data:"):
                value = line[5:]
                data.append(value[1:] if value.startswith(b" ") else value)
            continue
        if data:
            yield b"\n".join(data)
            data = []
    if data:  # a stream that ended without the blank line after its last event
        yield b"\n".join(data)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"
