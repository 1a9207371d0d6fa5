"""The discrete-event simulator's engine (:class:`DESEngine`): a continuous-batching vLLM engine advanced
analytically between events, not one decode iteration at a time.

Between two events the batch of an engine does not change, so the engine is not stepped one decode iteration at a
time. After each scheduling decision it is in one of three modes:

* ``MIXED``: the iteration computes prompt chunks (new or re-admitted requests) besides decodes: one event at its
  end, whose length is :meth:`EngineCostModel.step_s` of exactly what the iteration holds.
* ``DECODE``: B sequences decode one token per iteration over a context that grows by B tokens per iteration, so
  iteration j costs ``A + d2*B*j`` and n iterations cost ``n*A + d2*B*n(n-1)/2``. The engine jumps straight to
  the first iteration boundary where something happens: the earliest completion (a heap keyed by the iteration
  at which each request reaches its length), the earliest reservation overrun (same), the KV cache running out
  (each sequence needs a new block every ``block_size`` tokens at a fixed residue of the iteration counter, so
  the count of new blocks per iteration is a table of ``block_size`` entries and the exhausting iteration is
  found in O(block_size)), or the boundary at which a newly arrived request can be admitted.
* ``IDLE``.

At such a boundary the engine does exactly what :meth:`backends.sim.engine.SimEngine._schedule` does (the rare
preemption and token-budget cases run a literal per-request replica of it); ``tests/test_des.py`` checks the
analytic engine against that class stepped one iteration at a time.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from typing import TYPE_CHECKING

from backends.sim.cost_model import EngineCostModel
from gateway.core.request import SchedRequest
from loadgen.des_config import EngineSpec

if TYPE_CHECKING:
    from loadgen.des import PoolRun, WorkflowRun

INF = math.inf

IDLE, MIXED, DECODE = 0, 1, 2
R_WAITING, R_PREFILL, R_DECODE, R_DONE = 0, 1, 2, 3


class SimReq:
    """One request inside the simulator (engine-side state plus the gateway's bookkeeping)."""

    __slots__ = ("rid", "prompt", "target", "g", "k0", "base", "res", "computed", "blocks", "state", "kdone",
                 "kgrow", "preemptions", "first_token", "finish", "seq", "sched", "reserved", "max_reserved",
                 "engine", "pool", "run", "step_index", "release", "service", "gw_prompt")

    def __init__(self, rid: str, prompt: int, target: int, seq: int) -> None:
        self.rid = rid
        self.prompt = max(1, prompt)
        self.gw_prompt = self.prompt  # the gateway's estimate of the prompt (its reservation grows against it)
        self.target = max(1, target)
        self.g = 0  # generated tokens (for a decoding request: at iteration k0)
        self.k0 = 0
        self.base = 0  # prompt + g - k0: tokens held at iteration K are base + K
        self.res = 0  # iteration residue at which it needs a new KV block
        self.computed = 0  # tokens in KV (prefill/waiting states only)
        self.blocks = 0  # blocks held (prefill/waiting states only)
        self.state = R_WAITING
        self.kdone = 0
        self.kgrow = 0
        self.preemptions = 0
        self.first_token: float | None = None  # engine time
        self.finish: float | None = None  # engine time
        self.seq = seq
        self.sched: SchedRequest | None = None
        self.reserved = 0  # tokens the ledger holds for it
        self.max_reserved = 0
        self.engine: DESEngine | None = None
        self.pool: PoolRun | None = None
        self.run: WorkflowRun | None = None
        self.step_index = 0
        self.release = 0.0
        self.service = 0.0


class EngineHooks:
    """What an engine tells its owner. The simulator implements these; tests may use this no-op default."""

    def on_first_token(self, req: SimReq, t: float) -> None: ...

    def on_finish(self, reqs: list[SimReq], t: float) -> None: ...

    def on_grow(self, req: SimReq, generated: int, t: float) -> int:  # -> new reserved tokens
        return req.reserved

    def schedule_engine(self, engine: DESEngine, t: float) -> None: ...


class DESEngine:
    """A continuous-batching engine advanced analytically between events (see the module docstring)."""

    def __init__(self, engine_id: str, spec: EngineSpec, cost: EngineCostModel, hooks: EngineHooks,
                 grow: bool = False) -> None:
        self.engine_id = engine_id
        self.spec = spec
        self.cost = cost
        self.hooks = hooks
        self.grow = grow
        self.bs = spec.block_size
        self.total_blocks = spec.kv_blocks
        self.free = spec.kv_blocks  # free blocks after the allocations of iteration ks
        self.max_seqs = spec.max_num_seqs
        self.budget = spec.max_num_batched_tokens
        self.d0, self.d1, self.d2 = cost.decode_coef
        self.K = 0  # iterations completed at the last processed boundary
        self.t = 0.0
        self.running: dict[SimReq, None] = {}  # admission order
        self.waiting: deque[SimReq] = deque()
        self.prefill: list[SimReq] = []  # running requests still computing their prompt (running order)
        self.nd = 0  # decoding requests
        self.base_sum = 0
        self.cnt = [0] * self.bs
        self.done_heap: list[tuple[int, int, SimReq]] = []
        self.grow_heap: list[tuple[int, int, SimReq]] = []
        self.mode = IDLE
        self.ks = 0  # iteration scheduled at the start of the current stretch
        self.ts = 0.0
        self.A = 0.0  # time of iteration ks (decode stretch)
        self.inc = 0.0  # increase of the iteration time per iteration
        self.kend = 0  # boundary of the pending event
        self.event_t = INF
        self.version = 0
        self.chunks: list[tuple[SimReq, int]] = []  # prefill chunks of the current mixed iteration
        self.iterations = 0
        self.preemptions = 0
        self.busy_s = 0.0

    # -- stretch arithmetic -----------------------------------------------------------------------------------
    def _T(self, n: int) -> float:
        return n * self.A + self.inc * (n * (n - 1) * 0.5)

    def _crossings(self, k_from: int, k_to: int) -> int:
        """New blocks the decoding requests need over iterations k_from+1 .. k_to."""
        m = k_to - k_from
        if m <= 0 or self.nd == 0:
            return 0
        bs = self.bs
        full, rem = divmod(m, bs)
        total = full * self.nd
        cnt = self.cnt
        for j in range(1, rem + 1):
            total += cnt[(k_from + j) % bs]
        return total

    def _exhaust_k(self, k: int, free: int) -> int:
        """First iteration after k whose block needs exceed ``free`` (INF when nothing decodes)."""
        nd = self.nd
        if nd == 0:
            return 1 << 62
        bs = self.bs
        full, left = divmod(free, nd)
        cnt = self.cnt
        acc = 0
        for j in range(1, bs + 1):
            acc += cnt[(k + j) % bs]
            if acc > left:
                return k + full * bs + j
        raise AssertionError("unreachable: every sequence needs a block each block_size iterations")

    def boundary_at_or_after(self, now: float) -> tuple[int, float]:
        """(iteration index, time) of the first boundary of the current decode stretch at or after ``now``."""
        dt = now - self.ts
        A, inc = self.A, self.inc
        if inc > 0:
            b = A - inc * 0.5
            n = int(math.ceil((-b + math.sqrt(b * b + 2.0 * inc * max(dt, 0.0))) / inc))
        else:
            n = int(math.ceil(dt / A)) if A > 0 else 1
        n = max(n, 1)
        while n > 1 and self.ts + self._T(n - 1) >= now:
            n -= 1
        while self.ts + self._T(n) < now:
            n += 1
        return self.ks + n, self.ts + self._T(n)

    def iterations_done(self, now: float) -> int:
        """Iterations of the current stretch completed by ``now`` (for sampling)."""
        if self.mode != DECODE:
            return 0
        k, t = self.boundary_at_or_after(now)
        return k - self.ks - (1 if t > now else 0)

    # -- requests in and out ----------------------------------------------------------------------------------
    def add(self, req: SimReq, now: float) -> None:
        """A request arrives from the gateway at ``now``; it is admitted at the next iteration boundary."""
        req.engine = self
        req.state = R_WAITING
        was_empty = not self.waiting
        self.waiting.append(req)
        if not was_empty or len(self.running) >= self.max_seqs:
            return  # the head of the queue is blocked (or already has a wake-up): head-of-line, like vLLM
        if self.mode == IDLE:
            if self.event_t > now:
                self._set_event(self.K, now)
        elif self.mode == DECODE:
            k, t = self.boundary_at_or_after(now)
            if k < self.kend:
                self._set_event(k, t)

    def _set_event(self, k: int, t: float) -> None:
        self.kend = k
        self.event_t = t
        self.version += 1
        self.hooks.schedule_engine(self, t)

    def _to_decode(self, req: SimReq, k: int) -> None:
        req.state = R_DECODE
        req.k0 = k
        base = req.prompt + req.g - k
        req.base = base
        r = (1 - base) % self.bs
        req.res = r
        self.cnt[r] += 1
        self.nd += 1
        self.base_sum += base
        req.kdone = k + req.target - req.g
        heapq.heappush(self.done_heap, (req.kdone, req.seq, req))
        self._push_grow(req, k)

    def _push_grow(self, req: SimReq, k: int) -> None:
        # the gateway grows a reservation once its own prompt estimate plus the tokens streamed outgrow it
        if not self.grow or req.reserved >= req.gw_prompt + req.target:
            req.kgrow = -1
            return
        kg = max(k, req.reserved - req.gw_prompt - req.g + req.k0 + 1)
        if kg >= req.kdone:
            req.kgrow = -1
            return
        req.kgrow = kg
        heapq.heappush(self.grow_heap, (kg, req.seq, req))

    def _drop_decode(self, req: SimReq, k: int) -> None:
        """Take a decoding request out of the counters at boundary k (before iteration k is scheduled)."""
        self.nd -= 1
        self.base_sum -= req.base
        self.cnt[req.res] -= 1
        held = req.base + k - 1  # tokens whose blocks it holds
        self.free += -(-held // self.bs)
        req.g = req.g + k - req.k0
        req.k0 = k

    # -- one boundary -----------------------------------------------------------------------------------------
    def on_event(self, t: float) -> None:
        k = self.kend
        mode = self.mode
        if mode == DECODE and k - 1 > self.ks:
            self.free -= self._crossings(self.ks, k - 1)
        if mode != IDLE:
            self.iterations += k - self.ks
            self.busy_s += t - self.ts
        self.K = k
        self.t = t
        first: list[SimReq] = []
        if mode == MIXED:
            for req, n in self.chunks:
                req.computed += n
                if req.computed >= req.prompt + req.g:
                    req.g += 1
                    self.prefill.remove(req)
                    self._to_decode(req, k)
                    if req.first_token is None:
                        req.first_token = t
                        first.append(req)
            self.chunks = []
        finished: list[SimReq] = []
        heap = self.done_heap
        while heap and heap[0][0] <= k:
            kd, _, req = heapq.heappop(heap)
            if req.state != R_DECODE or req.kdone != kd:
                continue
            self._drop_decode(req, k)
            del self.running[req]
            req.state = R_DONE
            req.finish = t
            finished.append(req)
        gheap = self.grow_heap
        while gheap and gheap[0][0] <= k:
            kg, _, req = heapq.heappop(gheap)
            if req.state != R_DECODE or req.kgrow != kg:
                continue
            req.reserved = self.hooks.on_grow(req, req.g + k - req.k0, t)
            self._push_grow(req, k)
        self._schedule(k, t)
        for req in first:
            self.hooks.on_first_token(req, t)
        if finished:
            self.hooks.on_finish(finished, t)

    def _schedule(self, k: int, t: float) -> None:
        """Schedule iteration k (vLLM V1 / backends.sim.engine rules) and plan the next event."""
        bs = self.bs
        need = self.cnt[k % bs] if self.nd else 0
        budget = self.budget - self.nd
        chunks: list[tuple[SimReq, int]] = []
        slow = need > self.free or budget < 0
        if not slow and self.prefill:
            extra = 0
            for req in self.prefill:
                n = req.prompt + req.g - req.computed
                budget -= n
                extra += -(-(req.computed + n) // bs) - req.blocks
            slow = budget < 0 or need + extra > self.free
            if not slow:
                for req in self.prefill:
                    n = req.prompt + req.g - req.computed
                    nb = -(-(req.computed + n) // bs) - req.blocks
                    req.blocks += nb
                    self.free -= nb
                    chunks.append((req, n))
        if slow:
            self._schedule_slow(k, t)
            return
        self.free -= need
        # admission (no preemption happened)
        if self.waiting and len(self.running) < self.max_seqs:
            running = self.running
            waiting = self.waiting
            max_seqs = self.max_seqs
            while budget > 0 and len(running) < max_seqs and waiting:
                req = waiting[0]
                n = min(req.prompt + req.g - req.computed, budget)
                nb = -(-(req.computed + n) // bs) - req.blocks
                if nb > self.free:
                    break
                waiting.popleft()
                req.state = R_PREFILL
                running[req] = None
                self.prefill.append(req)
                req.blocks += nb
                self.free -= nb
                chunks.append((req, n))
                budget -= n
        self._plan_next(k, t, chunks, None)

    def _plan_next(self, k: int, t: float, chunks: list[tuple[SimReq, int]], decode_set: list[SimReq] | None,
                   retry_admission: bool = False) -> None:
        self.ks = k
        self.ts = t
        if not self.running:
            self.mode = IDLE
            self.event_t = INF
            self.version += 1
            if self.waiting:
                raise RuntimeError(f"engine {self.engine_id}: a request does not fit in an empty KV cache")
            return
        if chunks:
            self.mode = MIXED
            self.chunks = chunks
            if decode_set is None:
                num_decode, context = self.nd, self.base_sum + self.nd * k
            else:
                num_decode = len(decode_set)
                context = sum(r.base + k for r in decode_set)
            prefill = attn = 0
            for req, n in chunks:
                if n == 1 and req.g > 0 and req.computed >= req.prompt:  # counted as a decode by the engine
                    num_decode += 1
                    context += req.computed + 1
                else:
                    prefill += n
                    attn += n * (req.computed + n)
            self._set_event(k + 1, t + self.cost.step_s(num_decode, context, prefill, attn))
            return
        self.mode = DECODE
        nd = self.nd
        self.A = self.d0 + self.d1 * nd + self.d2 * (self.base_sum + nd * k)
        self.inc = self.d2 * nd
        kend = self._exhaust_k(k, self.free)
        heap = self.done_heap
        while heap and (heap[0][2].state != R_DECODE or heap[0][2].kdone != heap[0][0]):
            heapq.heappop(heap)
        if heap and heap[0][0] < kend:
            kend = heap[0][0]
        gheap = self.grow_heap
        while gheap and (gheap[0][2].state != R_DECODE or gheap[0][2].kgrow != gheap[0][0]):
            heapq.heappop(gheap)
        if gheap and gheap[0][0] < kend:
            kend = gheap[0][0]
        if kend <= k or (retry_admission and self.waiting and len(self.running) < self.max_seqs):
            # an overrun noticed while scheduling k is handled at the next boundary; after a preemption the
            # engine admits nothing in that iteration and tries again at the next one
            kend = k + 1
        self._set_event(kend, t + self._T(kend - k))

    def _schedule_slow(self, k: int, t: float) -> None:
        """Literal replica of SimEngine._schedule for preemption and token-budget cases (rare)."""
        bs = self.bs
        # materialize every running request into (g, computed, blocks)
        running = list(self.running)
        for req in running:
            if req.state == R_DECODE:
                g = req.g + k - req.k0
                req.g = g
                req.computed = req.prompt + g - 1
                req.blocks = -(-req.computed // bs)
        # allocations of the decodes at iteration k are done below, explicitly
        budget = self.budget
        scheduled: dict[SimReq, int] = {}
        preempted = False
        i = 0
        while i < len(running) and budget > 0:
            req = running[i]
            n = min(req.prompt + req.g - req.computed, budget)
            need = -(-(req.computed + n) // bs) - req.blocks
            while need > self.free:
                victim = running.pop()
                self.free += victim.blocks
                victim.blocks = 0
                victim.computed = 0
                victim.preemptions += 1
                victim.state = R_WAITING
                self.waiting.appendleft(victim)
                self.preemptions += 1
                preempted = True
                if victim in scheduled:
                    budget += scheduled.pop(victim)
                if victim is req:
                    break
            if req.state == R_WAITING:
                break
            req.blocks += need
            self.free -= need
            scheduled[req] = n
            budget -= n
            i += 1
        if not preempted:
            max_seqs = self.max_seqs
            while budget > 0 and len(running) < max_seqs and self.waiting:
                req = self.waiting[0]
                n = min(req.prompt + req.g - req.computed, budget)
                need = -(-(req.computed + n) // bs) - req.blocks
                if need > self.free:
                    break
                self.waiting.popleft()
                req.state = R_PREFILL
                running.append(req)
                req.blocks += need
                self.free -= need
                scheduled[req] = n
                budget -= n
        # rebuild the analytic state
        self.running = dict.fromkeys(running)
        self.prefill = []
        self.nd = 0
        self.base_sum = 0
        self.cnt = [0] * bs
        self.done_heap = []
        self.grow_heap = []
        chunks: list[tuple[SimReq, int]] = []
        decodes: list[SimReq] = []
        skipped = False
        for req in running:
            in_decode = req.g > 0 and req.computed >= req.prompt + req.g - 1 and req.state != R_PREFILL
            if req.state == R_PREFILL or not in_decode:
                req.state = R_PREFILL
                self.prefill.append(req)
                n = scheduled.get(req)
                if n is not None:
                    chunks.append((req, n))
                continue
            # a decoding request; its block for iteration k is allocated when scheduled
            if req in scheduled:
                self._to_decode(req, k)
                decodes.append(req)
            else:  # left out by the token budget: it does not advance in iteration k
                self._to_decode(req, k + 1)
                skipped = True
        # a decoding request's blocks are implicit: ceil((base + K - 1)/bs) at boundary K; check consistency
        # (held blocks = ceil(computed_after_alloc / bs) with computed+n for scheduled ones)
        if chunks or skipped:
            self._plan_next(k, t, chunks, decodes, preempted)
        else:
            self._plan_next(k, t, [], None, preempted)

    # -- observation ------------------------------------------------------------------------------------------
    def used_blocks(self, now: float) -> int:
        used = self.total_blocks - self.free
        if self.mode == DECODE:
            done = self.iterations_done(now)
            if done > 0:
                used += self._crossings(self.ks, self.ks + min(done, self.kend - self.ks - 1))
        return used

    def outstanding(self) -> int:
        return len(self.running) + len(self.waiting)
