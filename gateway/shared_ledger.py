"""The KV ledger as a gateway uses it (:class:`SharedLedger`): reservations of predicted KV tokens per engine,
kept in the state store so that every gateway admits against the same room.

The ledger is the state store's: in-process for the memory store, shared and atomic (Lua) in Redis, so two
gateways never over-commit one engine. While Redis is unreachable a gateway keeps serving from a **local ledger
holding a conservative part of each engine: the room of its own running requests plus the engine's free room at
its last view / (gateways alive at the last heartbeat listing, or ``state.expected_gateways`` where that is
more)**, pre-loaded with its own reservations; when Redis answers again it re-sets capacities, replays the
releases it could not send, re-adopts (force) the reservations it holds, and switches back. Reservations carry a
lease (``scheduling.ledger_lease_s``, 30 s by default): each gateway refreshes the leases of its running
requests every lease/3, so a long request keeps its reservation and a dead gateway's reservations disappear
within one lease. 30 s is long enough that a Redis blip or a GC pause never drops a live reservation, and short
enough that a crashed gateway blocks an engine's KV only briefly.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Coroutine
from typing import Any

from gateway.core.ledger import KVLedger
from gateway.metrics import GatewayMetrics
from gateway.state import StateStore, StateUnavailable
from gateway.state.memory import MemoryStateStore

log = logging.getLogger("maestro.scheduling")

UNLIMITED_KV = 1 << 40  # capacity of an engine whose KV size is neither configured nor exported
CLOSE_RELEASE_S = 1.0  # at stop, the releases an outage left get this long to reach the store...
CLOSE_PING_S = 0.25  # ...once it answers a ping within this (a stop must stay inside Docker's 10 s)


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
