"""The scheduler of one simulated vLLM engine: continuous batching over a paged KV cache, driven by the cost model.

Modelled on vLLM V1's scheduler:

* **Iteration loop.** One asyncio task per engine. Each iteration schedules a batch, asks the
  :class:`~backends.sim.cost_model.EngineCostModel` how long it takes, sleeps that long divided by
  ``time_scale`` (against a running deadline, so event-loop overshoot does not accumulate), then applies it:
  every request that completed its pending tokens samples exactly one new token.
* **Batch.** Running requests first (one decode token each, or the next chunk of a chunked prefill), then
  waiting requests, within ``max_num_seqs`` sequences and ``max_num_batched_tokens`` tokens per iteration.
* **KV cache.** ``kv_blocks`` blocks of ``block_size`` tokens. A request holds ``ceil(computed/block_size)``
  blocks. A waiting request is admitted only when its blocks fit (head-of-line: the queue stops at the first
  that does not fit). When a *running* request cannot get its next block, the engine preempts
  (recompute-style, as vLLM V1): the victim is the last admitted running request (fcfs) or the one with the
  largest ``(priority, arrival)`` (priority policy); its KV is freed, it goes back to the front of the
  waiting queue, and when readmitted it re-prefills its prompt plus the tokens it had already generated.
  Tokens already streamed to the client stay streamed.
* **Admission order.** ``fcfs``: arrival order. ``priority``: lowest ``priority`` value first, ties by
  arrival. Running requests are never preempted because of priority, only by KV pressure.
* **Abort** (client disconnect) frees the request's KV at once and is not counted in
  ``vllm:request_success_total`` (as observed on a real server).
* **Sleep** (vLLM 0.32's ``EngineCore.sleep`` / ``pause_scheduler``). ``sleep(level, mode)`` pauses the
  scheduler: requests in flight are aborted (``mode=abort``, the default), run to their end first
  (``mode=wait``), or kept, to be recomputed after the wake-up (``mode=keep``); level 1 and 2 then free the
  whole KV cache, level 0 frees nothing. New requests are *held* from the pause on, not refused and not counted
  in ``num_requests_waiting`` (as observed on a real server), and run once the engine is fully awake:
  :meth:`wake_up` returns ``wake_delay_s / time_scale`` seconds later (at once where nothing was offloaded),
  and a wake-up of only some ``tags`` leaves it paused.

Token delivery is lean: a request keeps a count of tokens not yet taken by its consumer and one future to wake
it; a slow consumer therefore gets several tokens at once, exactly like vLLM's per-request output collector
merges deltas when the HTTP side lags.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import random
from collections import deque

from backends.sim.cost_model import EngineCostModel
from backends.sim.metrics import SimEngineMetrics
from backends.sim.options import SimEngineOptions

WAITING = 0
RUNNING = 1
DONE = 2
HELD = 3  # added while the scheduler is paused (asleep): waits for the wake-up outside the waiting queue

PAUSE_MODES = ("abort", "wait", "keep")  # vLLM 0.32's PauseMode
SLEEP_TAGS = frozenset({"weights", "kv_cache"})  # what a level 1 or 2 sleep offloads, woken by tag

_DEADLINE_SLACK_S = 0.02  # how far behind schedule the loop may fall before it stops catching up


class EngineBusy(Exception):
    """Back-pressure (HTTP 503): ``max_num_queued_reqs`` unfinished requests already, or ``max_num_queued_tokens``
    prompt tokens still in prefill. Its one argument is the limit reached (vLLM's rejection reason)."""

    @property
    def reason(self) -> str:
        return self.args[0]


class SimRequest:
    """One request inside the simulated engine. The HTTP layer reads it through :meth:`next_tokens`."""

    __slots__ = ("request_id", "prompt_tokens", "target_tokens", "natural_reason", "priority", "seq", "arrival",
                 "generated", "computed", "blocks", "state", "pending", "finish_reason", "preemptions",
                 "scheduled_at", "first_token_at", "last_token_at", "finished_at", "_waiter")

    def __init__(self, request_id: str, prompt_tokens: int, target_tokens: int, natural_reason: str,
                 priority: int, seq: int, arrival: float) -> None:
        self.request_id = request_id
        self.prompt_tokens = prompt_tokens
        self.target_tokens = target_tokens  # output tokens it will generate
        self.natural_reason = natural_reason  # finish_reason when it reaches target_tokens
        self.priority = priority
        self.seq = seq
        self.arrival = arrival
        self.generated = 0
        self.computed = 0  # tokens whose KV is in the cache
        self.blocks = 0
        self.state = WAITING
        self.pending = 0  # generated tokens not yet taken by the consumer
        self.finish_reason: str | None = None
        self.preemptions = 0
        self.scheduled_at: float | None = None
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.finished_at: float | None = None
        self._waiter: asyncio.Future | None = None

    @property
    def finished(self) -> bool:
        return self.state == DONE

    async def next_tokens(self) -> tuple[int, bool]:
        """Wait for new tokens or the end; return ``(new token count, finished)``."""
        while self.pending == 0 and self.state != DONE:
            waiter = asyncio.get_running_loop().create_future()
            self._waiter = waiter
            try:
                await waiter
            finally:
                self._waiter = None
        count = self.pending
        self.pending = 0
        return count, self.state == DONE

    def _notify(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class SimEngine:
    """One simulated engine core. Create it inside a running event loop and call :meth:`start`."""

    def __init__(self, options: SimEngineOptions, cost_model: EngineCostModel | None = None) -> None:
        options.validate()
        self.options = options
        self.cost = cost_model or EngineCostModel(options.calibration_dir, scale=options.cost_scale)
        self.rng = random.Random(options.seed)
        self.time_scale = float(options.time_scale)
        self.block_size = options.block_size
        self.total_blocks = options.kv_blocks
        self.free_blocks = options.kv_blocks
        self.priority_policy = options.scheduling_policy == "priority"
        self.running: list[SimRequest] = []
        self._fcfs: deque[SimRequest] = deque()
        self._heap: list[tuple[int, int, SimRequest]] = []
        self.num_waiting = 0
        self.prefilling_tokens = 0  # prompt tokens of the unfinished requests without a first token yet
        self.sleep_level = 0  # while paused: 0 (nothing freed), 1 weights offloaded, 2 discard all
        self._paused = False  # the scheduler is paused: new requests are held (vLLM's PAUSED_NEW / PAUSED_ALL)
        self._draining = False  # paused with mode=wait: the requests in flight still run to their end
        self._asleep_tags: set[str] = set()  # what a wake-up has to bring back before the scheduler resumes
        self._held: deque[SimRequest] = deque()
        self._epoch = 0  # counts sleeps and wake-ups: a drain that ends finds out whether one came meanwhile
        self._waking: asyncio.Task | None = None
        self._waking_tags: set[str] = set()  # what the wake-up under way brings back (every caller's tags)
        self._seq = itertools.count()
        self._work = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # plain counters (tests and the DES read these; Prometheus mirrors them)
        self.iterations = 0
        self.num_preemptions = 0
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.finished_by_reason: dict[str, int] = {}
        self.metrics = SimEngineMetrics(options.model, options.max_model_len,
                                        running=lambda: float(len(self.running)),
                                        waiting=lambda: float(self.num_waiting),
                                        kv_usage=self.kv_usage, kv_blocks=options.kv_blocks,
                                        block_size=options.block_size)
        mu_sigma = options.output_tokens_sigma
        self._ln_mu = math.log(options.mean_output_tokens) - mu_sigma * mu_sigma / 2.0
        self._ln_sigma = mu_sigma

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        if self._task is None:
            self._loop = asyncio.get_running_loop()
            self._task = self._loop.create_task(self._run(), name=f"sim-engine-{self.options.model}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        if self._waking is not None:
            self._waking.cancel()
        self._abort_all("abort", count=False)
        now = self._now() if self._loop is not None else 0.0
        for req in list(self._held):
            self._finish(req, "abort", now, count=False)

    # ------------------------------------------------------------------ state read by the HTTP layer and tests

    @property
    def num_running(self) -> int:
        return len(self.running)

    def kv_usage(self) -> float:
        """Fraction of KV blocks in use, 0..1 (vLLM's ``kv_cache_usage_perc``)."""
        return (self.total_blocks - self.free_blocks) / self.total_blocks

    @property
    def is_sleeping(self) -> bool:
        """vLLM's ``is_sleeping``: the scheduler is paused (from the sleep call's start, through a drain, until a
        full wake-up) or memory is offloaded."""
        return self._paused

    @property
    def num_held(self) -> int:
        """Requests that arrived while asleep and wait for the wake-up (not in ``num_requests_waiting``)."""
        return len(self._held)

    # ------------------------------------------------------------------ requests

    def output_length(self, cap: int, *, ignore_eos: bool = False, min_tokens: int = 0,
                      hint: int | None = None) -> tuple[int, str]:
        """Decide how many tokens a request generates and its finish_reason.

        ``cap`` is ``max_tokens`` (or what is left of ``max_model_len``). ``ignore_eos``: exactly ``cap``
        ("length"). Otherwise the natural length is ``hint`` (the load generator's ``X-Sim-Output-Tokens``) or
        a seeded lognormal draw with mean ``mean_output_tokens``, raised to ``min_tokens`` (and to 1); it is
        "stop" when below ``cap``, else capped at ``cap`` with "length".
        """
        if ignore_eos:
            return cap, "length"
        natural = hint if hint is not None else int(round(self.rng.lognormvariate(self._ln_mu, self._ln_sigma)))
        natural = max(natural, min_tokens, 1)
        if natural >= cap:
            return cap, "length"
        return natural, "stop"

    def admit(self, count: int = 1, backlog: bool = True) -> None:
        """Raise :class:`EngineBusy` (counted in ``vllm:admission_rejections``) where ``count`` more requests
        would pass ``max_num_queued_reqs`` unfinished ones (held ones count), or where the prompts still in prefill
        already reach ``max_num_queued_tokens`` tokens (vLLM 0.32's ``check_admission``: their whole prompts, held
        ones too, until each one's first token). vLLM's frontend refuses there before it checks a request's
        lengths and sampling parameters, so the server asks this first, for all of a request's answers at once.
        An engine asleep takes requests: it holds them (see :meth:`add_request`). ``backlog=False`` leaves out the
        prefill-backlog check: vLLM makes it once for a request's (or a batched prompt's) answers together, before
        the first is added, so the answers after it must not find their own siblings' prompts in the backlog."""
        limit = self.options.max_num_queued_reqs
        if limit and len(self.running) + self.num_waiting + len(self._held) + count > limit:
            self.metrics.admission_rejections["max_num_queued_reqs"].inc()
            raise EngineBusy("max_num_queued_reqs")
        tokens = self.options.max_num_queued_tokens
        if backlog and tokens and self.prefilling_tokens >= tokens:
            self.metrics.admission_rejections["max_num_queued_tokens"].inc()
            raise EngineBusy("max_num_queued_tokens")

    def add_request(self, request_id: str, prompt_tokens: int, target_tokens: int, finish_reason: str = "length",
                    priority: int = 0) -> SimRequest:
        """Queue a request that will generate ``target_tokens`` tokens and finish with ``finish_reason``; while
        the engine is asleep it is held until the wake-up. Raises :class:`EngineBusy` beyond
        ``max_num_queued_reqs`` unfinished requests (the caller checks the prefill backlog: :meth:`admit`).
        """
        self.admit(1, backlog=False)
        loop = self._loop or asyncio.get_running_loop()
        req = SimRequest(request_id, max(1, prompt_tokens), max(1, target_tokens), finish_reason,
                         priority if self.priority_policy else 0, next(self._seq), loop.time())
        self.prefilling_tokens += req.prompt_tokens
        if self._paused:
            req.state = HELD
            self._held.append(req)
            return req
        self._push_waiting(req, front=False)
        self._work.set()
        return req

    def abort(self, req: SimRequest) -> None:
        """Client went away: drop the request now and free its KV. Not counted as a finished request."""
        if req.state != DONE:
            self._finish(req, "abort", self._now(), count=False)

    # ------------------------------------------------------------------ sleep / wake

    async def sleep(self, level: int = 1, mode: str = "abort") -> None:
        """Pause the scheduler and sleep at ``level`` 0 (pause only), 1 (weights offloaded) or 2 (discard all);
        ``mode`` says what happens to the requests in flight (module docstring). Returns once asleep.

        Everything but a ``mode=wait`` drain happens before the first await, so sleeps and wake-ups take effect
        in the order they are called. The drain goes on when its caller leaves (its timeout), as vLLM's does: a
        task, awaited shielded; a wake-up or another sleep while it drains supersedes it."""
        if level not in (0, 1, 2) or mode not in PAUSE_MODES:
            raise ValueError(f"sleep level must be 0, 1 or 2 and mode one of {PAUSE_MODES}")
        if self._waking is not None:
            self._waking.cancel()
            self._waking = None
            self._waking_tags = set()
        self._epoch += 1
        self._draining = False  # a drain this sleep supersedes
        offloaded = bool(self._asleep_tags)  # asleep already: nothing runs, so there is nothing to drain
        self._paused = True
        if mode == "wait" and not offloaded and (self.running or self.num_waiting):
            self._draining = True
            self._work.set()
            drain = asyncio.get_running_loop().create_task(self._drain_then_sleep(level, self._epoch))
            await asyncio.shield(drain)
            return
        if mode == "abort":
            self._abort_all("abort", count=True)
        self._enter_sleep(level, offloaded)

    async def _drain_then_sleep(self, level: int, epoch: int) -> None:
        try:
            while (self.running or self.num_waiting) and self._epoch == epoch:
                await asyncio.sleep(0.005)
        finally:
            if self._epoch == epoch:
                self._draining = False
        if self._epoch == epoch:  # else a wake-up or another sleep came while it drained
            self._enter_sleep(level, offloaded=False)

    def _enter_sleep(self, level: int, offloaded: bool) -> None:
        if level >= 1:
            self._recompute_all()  # mode=keep: the KV they held is gone; they prefill again after the wake-up
            self.free_blocks = self.total_blocks
            self._asleep_tags = set(SLEEP_TAGS)
        if offloaded:  # a second sleep never brings back what the first offloaded
            level = max(level, self.sleep_level)
        self.sleep_level = level
        self.metrics.set_sleep_level(level)

    async def wake_up(self, tags: list[str] | None = None) -> bool:
        """Bring back what ``tags`` names (all where None; vLLM's "scheduling" tag names nothing to reload) after
        ``wake_delay_s / time_scale`` seconds; concurrent callers share that wait, each one's tags brought back.
        Once nothing is left asleep the scheduler resumes and the held requests queue in their order. Returns
        whether it is fully awake."""
        if tags is not None:
            tags = [tag for tag in tags if tag != "scheduling"]
        waking = set(self._asleep_tags) if tags is None else self._asleep_tags & set(tags)
        if waking:
            self._waking_tags |= waking
            if self._waking is None:
                self._waking = asyncio.get_running_loop().create_task(self._reload())
            task = self._waking
            try:
                await asyncio.shield(task)
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if task.cancelled() and (current is None or not current.cancelling()):
                    return False  # a new sleep() superseded this wake-up
                raise
        elif self._paused and not self._asleep_tags:
            self._resume()  # paused with nothing offloaded (level 0, or a wake-up during a drain)
        return not self._paused

    async def _reload(self) -> None:
        """The wake-up's wait, then its effect, in one task: a sleep that comes once the wait is over finds the
        engine awake and puts it to sleep again (where the caller applied the effect, it could undo that sleep)."""
        try:
            await asyncio.sleep(self.options.wake_delay_s / self.time_scale)
            self._asleep_tags -= self._waking_tags
            if self._paused and not self._asleep_tags:
                self._resume()
        finally:
            if self._waking is asyncio.current_task():
                self._waking = None
                self._waking_tags = set()

    def _resume(self) -> None:
        self._epoch += 1  # supersedes a sleep still draining
        self._paused = False
        self._draining = False
        self.sleep_level = 0
        self.metrics.set_sleep_level(None)
        held, self._held = self._held, deque()
        for req in held:
            if req.state == HELD:
                self._push_waiting(req, front=False)
        self._work.set()

    def _recompute_all(self) -> None:
        """Requests kept through a sleep that frees the KV cache lose it: back to the waiting queue's front, in
        their order, to prefill again (as a preemption does)."""
        for req in reversed(self.running):
            self.free_blocks += req.blocks
            req.blocks = 0
            req.computed = 0
            self._push_waiting(req, front=True)
        self.running.clear()

    # ------------------------------------------------------------------ internals

    def _now(self) -> float:
        return (self._loop or asyncio.get_event_loop()).time()

    def _push_waiting(self, req: SimRequest, front: bool) -> None:
        req.state = WAITING
        if self.priority_policy:
            heapq.heappush(self._heap, (req.priority, req.seq, req))
        elif front:
            self._fcfs.appendleft(req)
        else:
            self._fcfs.append(req)
        self.num_waiting += 1

    def _peek_waiting(self) -> SimRequest | None:
        """Head of the waiting queue, dropping aborted entries (lazy deletion)."""
        if self.priority_policy:
            heap = self._heap
            while heap and heap[0][2].state != WAITING:
                heapq.heappop(heap)
            return heap[0][2] if heap else None
        queue = self._fcfs
        while queue and queue[0].state != WAITING:
            queue.popleft()
        return queue[0] if queue else None

    def _pop_waiting(self) -> None:
        if self.priority_policy:
            heapq.heappop(self._heap)
        else:
            self._fcfs.popleft()
        self.num_waiting -= 1

    def _finish(self, req: SimRequest, reason: str, now: float, count: bool = True) -> None:
        if req.state == WAITING:
            self.num_waiting -= 1
        elif req.state == HELD:
            self._held.remove(req)
        elif req.state == RUNNING:
            try:
                self.running.remove(req)
            except ValueError:
                pass
        self.free_blocks += req.blocks
        req.blocks = 0
        if req.first_token_at is None:
            self.prefilling_tokens -= req.prompt_tokens
        req.state = DONE
        req.finish_reason = reason
        req.finished_at = now
        if count:
            self.finished_by_reason[reason] = self.finished_by_reason.get(reason, 0) + 1
            m = self.metrics
            m.success[reason].inc()
            m.e2e.observe(now - req.arrival)
            m.request_prompt_tokens.observe(req.prompt_tokens)
            m.request_generation_tokens.observe(req.generated)
            if req.first_token_at is not None:
                m.decode_time.observe(now - req.first_token_at)
        req._notify()
        self._work.set()

    def _abort_all(self, reason: str, count: bool) -> None:
        now = self._now() if self._loop is not None else 0.0
        for req in list(self.running):
            self._finish(req, reason, now, count=count)
        for queue in (self._fcfs, [entry[2] for entry in self._heap]):
            for req in list(queue):
                if req.state == WAITING:
                    self._finish(req, reason, now, count=count)
        self._fcfs.clear()
        self._heap.clear()
        self.num_waiting = 0

    def _preempt_victim(self) -> SimRequest:
        if self.priority_policy:
            return max(self.running, key=lambda r: (r.priority, r.seq))
        return self.running[-1]

    def _schedule(self, now: float) -> dict[SimRequest, int]:
        """Pick this iteration's batch: ``{request: new tokens to compute}``; allocates KV, may preempt."""
        budget = self.options.max_num_batched_tokens
        bs = self.block_size
        scheduled: dict[SimRequest, int] = {}
        running = self.running
        preempted = False
        i = 0
        while i < len(running) and budget > 0:
            req = running[i]
            n = min(req.prompt_tokens + req.generated - req.computed, budget)
            need = -(-(req.computed + n) // bs) - req.blocks
            while need > self.free_blocks:
                victim = self._preempt_victim()
                victim_index = running.index(victim)
                running.pop(victim_index)
                self.free_blocks += victim.blocks
                victim.blocks = 0
                victim.computed = 0
                victim.preemptions += 1
                self._push_waiting(victim, front=True)
                self.num_preemptions += 1
                self.metrics.preemptions.inc()
                preempted = True
                if victim in scheduled:
                    budget += scheduled.pop(victim)
                if victim is req:
                    break
                if victim_index < i:
                    i -= 1
            if req.state != RUNNING:
                break
            req.blocks += need
            self.free_blocks -= need
            scheduled[req] = n
            budget -= n
            i += 1

        if not preempted:
            max_seqs = self.options.max_num_seqs
            while budget > 0 and len(running) < max_seqs:
                req = self._peek_waiting()
                if req is None:
                    break
                n = min(req.prompt_tokens + req.generated - req.computed, budget)
                need = -(-(req.computed + n) // bs) - req.blocks
                if need > self.free_blocks:
                    break
                self._pop_waiting()
                req.state = RUNNING
                running.append(req)
                req.blocks += need
                self.free_blocks -= need
                scheduled[req] = n
                budget -= n
                if req.scheduled_at is None:
                    req.scheduled_at = now
                    self.metrics.queue_time.observe(now - req.arrival)
        return scheduled

    def _step_seconds(self, scheduled: dict[SimRequest, int]) -> float:
        num_decode = 0
        context = 0
        prefill = 0
        attn = 0
        for req, n in scheduled.items():
            if n == 1 and req.generated > 0 and req.computed >= req.prompt_tokens:
                num_decode += 1
                context += req.computed + 1
            else:
                prefill += n
                attn += n * (req.computed + n)
        return self.cost.step_s(num_decode, context, prefill, attn)

    def _apply(self, scheduled: dict[SimRequest, int], now: float) -> None:
        m = self.metrics
        new_tokens = 0
        finished: list[SimRequest] = []
        for req, n in scheduled.items():
            if req.state != RUNNING:
                continue  # aborted or put to sleep while the iteration ran
            req.computed += n
            if req.computed < req.prompt_tokens + req.generated:
                continue  # chunked prefill not done yet
            req.generated += 1
            req.pending += 1
            new_tokens += 1
            if req.first_token_at is None:
                req.first_token_at = now
                self.prefilling_tokens -= req.prompt_tokens
                self.prompt_tokens_total += req.prompt_tokens
                m.prompt_tokens.inc(req.prompt_tokens)
                m.ttft.observe(now - req.arrival)
                if req.scheduled_at is not None:
                    m.prefill_time.observe(now - req.scheduled_at)
            else:
                m.itl.observe(now - req.last_token_at)
            req.last_token_at = now
            if req.generated >= req.target_tokens:
                finished.append(req)
            else:
                req._notify()
        if new_tokens:
            self.generation_tokens_total += new_tokens
            m.generation_tokens.inc(new_tokens)
        for req in finished:
            self._finish(req, req.natural_reason, now)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time()
        while True:
            if (self._paused and not self._draining) or (not self.running and self.num_waiting == 0):
                self._work.clear()
                await self._work.wait()
                deadline = loop.time()
                continue
            now = loop.time()
            scheduled = self._schedule(now)
            if not scheduled:
                # nothing fits right now (cannot happen with a valid config, but never spin)
                self._work.clear()
                await self._work.wait()
                deadline = loop.time()
                continue
            step = self._step_seconds(scheduled) / self.time_scale
            deadline = max(deadline, now - _DEADLINE_SLACK_S) + step
            delay = deadline - loop.time()
            await asyncio.sleep(delay if delay > 0 else 0)
            self.iterations += 1
            self._apply(scheduled, loop.time())
