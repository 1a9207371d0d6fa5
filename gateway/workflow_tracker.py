"""Workflow records as a gateway keeps them (:class:`WorkflowTracker`): each step's begin and end written to the
state store, so that every gateway's queue policy sees a workflow's progress, deadline and steps in flight.

While the store is unreachable the records go to a local memory store, and the steps that ended meanwhile are
kept (up to ``UNSENT_STEPS_LIMIT``) and sent once it answers, each counted once. A local cache of the records,
as :class:`gateway.core.request.WorkflowState`, serves the queue policies' lookups on the hot path.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Coroutine
from typing import Any

from gateway.api.workflow import WorkflowContext
from gateway.config import Config
from gateway.core.request import WorkflowState
from gateway.state import StateStore, StateUnavailable
from gateway.state.memory import MemoryStateStore

STORE_RETRY_S = 2.0  # workflow records: after a store failure, use the local store this long before retrying
_TRY, _PROBE = 1, 2  # WorkflowTracker._use_store: try the store (up), or find out whether it is back
UNSENT_STEPS_LIMIT = 10_000  # workflow steps ended while the store was unreachable, kept to send it (oldest go)
UNSENT_STEPS_PER_TICK = 200  # sent per tick of the scheduling loop, which also keeps the ledger's leases alive
# A workflow record's request id in flight longer than this many times timeouts.total_s (which bounds every
# request, its queue time included) is taken as abandoned: its end will never come (the gateway that ran it
# died, or the end was among the unsent dropped). Twice, so that the end of a step that ran its whole total_s
# and then waited out a store outage of as long still counts.
INFLIGHT_TOTALS = 2.0


def _spawn(tasks: set[asyncio.Task], coro: Coroutine) -> asyncio.Task:
    """Run ``coro`` in the background, held in ``tasks`` until it is done (the loop keeps only weak references)."""
    task = asyncio.get_running_loop().create_task(coro)
    tasks.add(task)
    task.add_done_callback(tasks.discard)
    return task


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
        return _spawn(self._tasks, self.begin(context, request_id, now, predicted_remaining_s))

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
