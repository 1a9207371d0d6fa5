"""One StateStore suite, run against the memory store and a real Redis (DESIGN: "One state interface, two stores").

Time is abstracted by ``Harness.elapse``: the memory store runs on a fake clock (instant, exact), the Redis store
on real short TTLs and sleeps. Redis cases use a unique key prefix per test and delete their keys afterwards.
Without Redis they skip locally, but fail under CI (``CI`` set), where the pipeline must start a Redis service.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest

from gateway.state import StateStore, StateUnavailable, make_state_store
from gateway.state.memory import MemoryStateStore
from gateway.state.redis import RedisStateStore

REDIS_URL = os.environ.get("MAESTRO_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
CLOSED_PORT_URL = "redis://127.0.0.1:1/0"

# Short TTLs so the Redis cases stay fast; margins are >= 0.2 s so a loaded machine does not flake.
SHORT_TTL = 0.3
LONG_TTL = 30.0


class FakeClock:
    """Monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Harness:
    store: StateStore
    elapse: Callable[[float], Awaitable[None]]
    kind: str


_redis_reachable: dict[str, bool] = {}


def _redis_up(url: str) -> bool:
    """Probe once per session with a plain sync client (no event loop involved)."""
    if url not in _redis_reachable:
        import redis

        client = redis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
        try:
            _redis_reachable[url] = bool(client.ping())
        except (redis.RedisError, OSError):
            _redis_reachable[url] = False
        finally:
            client.close()
    return _redis_reachable[url]


def _require_redis() -> None:
    if _redis_up(REDIS_URL):
        return
    if os.environ.get("CI"):
        pytest.fail(
            f"no Redis at {REDIS_URL}: CI must start a Redis service (or set MAESTRO_TEST_REDIS_URL)",
            pytrace=False,
        )
    pytest.skip(f"no Redis at {REDIS_URL}")


def _delete_prefix(prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_timeout=2.0, socket_connect_timeout=2.0)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=500))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture
def redis_prefix() -> Any:
    """A fresh key namespace on the test Redis, wiped afterwards."""
    _require_redis()
    prefix = f"maestro-test-{uuid.uuid4().hex}"
    yield prefix
    _delete_prefix(prefix)


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    if request.param == "memory":
        clock = FakeClock()

        async def advance(seconds: float) -> None:
            clock.advance(seconds)

        store: StateStore = MemoryStateStore(clock=clock)
        yield Harness(store, advance, "memory")
        await store.close()
        return

    prefix = request.getfixturevalue("redis_prefix")
    store = RedisStateStore(REDIS_URL, key_prefix=prefix, timeout_s=2.0)
    yield Harness(store, asyncio.sleep, "redis")
    await store.close()


# ---------------------------------------------------------------------------------------------- engines


async def test_put_then_get_engine(harness: Harness) -> None:
    record = {"url": "http://e1:8000", "load": 0.5, "models": ["llama", "qwen"], "healthy": True, "note": None}
    await harness.store.put_engine("e1", record, LONG_TTL)
    assert await harness.store.get_engine("e1") == record


async def test_get_missing_engine_is_none(harness: Harness) -> None:
    assert await harness.store.get_engine("nope") is None
    assert await harness.store.get_engines() == {}


async def test_put_replaces_record(harness: Harness) -> None:
    await harness.store.put_engine("e1", {"load": 1, "old_field": "x"}, LONG_TTL)
    await harness.store.put_engine("e1", {"load": 2}, LONG_TTL)
    assert await harness.store.get_engine("e1") == {"load": 2}
    assert await harness.store.get_engines() == {"e1": {"load": 2}}


async def test_delete_engine(harness: Harness) -> None:
    await harness.store.put_engine("e1", {"n": 1}, LONG_TTL)
    await harness.store.put_engine("e2", {"n": 2}, LONG_TTL)
    await harness.store.delete_engine("e1")
    assert await harness.store.get_engine("e1") is None
    assert await harness.store.get_engines() == {"e2": {"n": 2}}
    await harness.store.delete_engine("e1")  # absent: no error
    await harness.store.delete_engine("never-existed")


async def test_get_engines_lists_all(harness: Harness) -> None:
    records = {f"engine:{i}": {"i": i, "tags": {"gpu": "h100"}} for i in range(5)}
    for engine_id, record in records.items():
        await harness.store.put_engine(engine_id, record, LONG_TTL)
    assert await harness.store.get_engines() == records


async def test_records_are_copies(harness: Harness) -> None:
    record = {"load": 1, "nested": {"queue": [1, 2]}}
    await harness.store.put_engine("e1", record, LONG_TTL)
    record["load"] = 99
    record["nested"]["queue"].append(3)

    got = await harness.store.get_engine("e1")
    assert got == {"load": 1, "nested": {"queue": [1, 2]}}
    got["nested"]["queue"].clear()
    listed = await harness.store.get_engines()
    listed["e1"]["load"] = -1

    assert await harness.store.get_engine("e1") == {"load": 1, "nested": {"queue": [1, 2]}}
    assert await harness.store.get_engines() == {"e1": {"load": 1, "nested": {"queue": [1, 2]}}}


async def test_records_roundtrip_as_json(harness: Harness) -> None:
    """Both stores serialise with orjson, so tuples come back as lists in both."""
    await harness.store.put_engine("e1", {"shape": (1, 2), "pi": 3.25, "name": "é✓"}, LONG_TTL)
    assert await harness.store.get_engine("e1") == {"shape": [1, 2], "pi": 3.25, "name": "é✓"}


async def test_non_json_record_rejected(harness: Harness) -> None:
    with pytest.raises(TypeError):
        await harness.store.put_engine("e1", {"bad": object()}, LONG_TTL)
    assert await harness.store.get_engine("e1") is None


@pytest.mark.parametrize("ttl", [0, -1.0, float("nan"), float("inf"), 1e20])
async def test_non_positive_ttl_rejected(harness: Harness, ttl: float) -> None:
    """Also past MAX_TTL_S: Redis keeps expiries in 64-bit milliseconds, and a 1e20 s TTL there was an error that
    read as Redis being down (StateUnavailable), where the memory store took it."""
    with pytest.raises(ValueError):
        await harness.store.put_engine("e1", {}, ttl)
    with pytest.raises(ValueError):
        await harness.store.heartbeat("g1", {}, ttl)


async def test_engine_ttl_expiry(harness: Harness) -> None:
    await harness.store.put_engine("short", {"n": 1}, SHORT_TTL)
    await harness.store.put_engine("long", {"n": 2}, LONG_TTL)
    assert set(await harness.store.get_engines()) == {"short", "long"}
    await harness.elapse(SHORT_TTL + 0.2)
    assert await harness.store.get_engine("short") is None
    assert await harness.store.get_engines() == {"long": {"n": 2}}


async def test_put_refreshes_ttl(harness: Harness) -> None:
    ttl = 0.6
    await harness.store.put_engine("e1", {"v": 1}, ttl)
    await harness.elapse(0.4)
    await harness.store.put_engine("e1", {"v": 2}, ttl)
    await harness.elapse(0.4)  # 0.8 s after the first write, 0.4 s after the second
    assert await harness.store.get_engine("e1") == {"v": 2}
    await harness.elapse(0.4)
    assert await harness.store.get_engine("e1") is None
    assert await harness.store.get_engines() == {}


async def test_expired_engine_can_be_written_again(harness: Harness) -> None:
    await harness.store.put_engine("e1", {"v": 1}, SHORT_TTL)
    await harness.elapse(SHORT_TTL + 0.2)
    assert await harness.store.get_engines() == {}
    await harness.store.put_engine("e1", {"v": 2}, LONG_TTL)
    assert await harness.store.get_engines() == {"e1": {"v": 2}}


# ---------------------------------------------------------------------------------------------- gateways


async def test_heartbeat_and_gateways(harness: Harness) -> None:
    assert await harness.store.gateways() == {}
    await harness.store.heartbeat("gw-a", {"host": "a", "port": 8080}, LONG_TTL)
    await harness.store.heartbeat("gw-b", {"host": "b", "port": 8080}, LONG_TTL)
    await harness.store.heartbeat("gw-a", {"host": "a", "port": 9090}, LONG_TTL)  # replaces
    assert await harness.store.gateways() == {
        "gw-a": {"host": "a", "port": 9090},
        "gw-b": {"host": "b", "port": 8080},
    }


async def test_a_gateway_removed_is_gone_at_once(harness: Harness) -> None:
    """A gateway that stopped stayed listed until its heartbeat expired (the others count the gateways they see
    when they share engines during an outage)."""
    await harness.store.heartbeat("stopped", {"host": "s"}, LONG_TTL)
    await harness.store.heartbeat("alive", {"host": "a"}, LONG_TTL)
    await harness.store.remove_gateway("stopped")
    await harness.store.remove_gateway("never-there")  # nothing to do
    assert await harness.store.gateways() == {"alive": {"host": "a"}}


async def test_gateways_expire(harness: Harness) -> None:
    await harness.store.heartbeat("dead", {"host": "d"}, SHORT_TTL)
    await harness.store.heartbeat("alive", {"host": "a"}, LONG_TTL)
    await harness.elapse(SHORT_TTL + 0.2)
    assert await harness.store.gateways() == {"alive": {"host": "a"}}


async def test_gateways_and_engines_are_separate(harness: Harness) -> None:
    await harness.store.heartbeat("x", {"kind": "gateway"}, LONG_TTL)
    await harness.store.put_engine("x", {"kind": "engine"}, LONG_TTL)
    assert await harness.store.gateways() == {"x": {"kind": "gateway"}}
    assert await harness.store.get_engines() == {"x": {"kind": "engine"}}
    await harness.store.delete_engine("x")
    assert await harness.store.gateways() == {"x": {"kind": "gateway"}}


async def test_gateway_info_is_a_copy(harness: Harness) -> None:
    info = {"models": ["a"]}
    await harness.store.heartbeat("g", info, LONG_TTL)
    info["models"].append("b")
    listed = await harness.store.gateways()
    listed["g"]["models"].append("c")
    assert await harness.store.gateways() == {"g": {"models": ["a"]}}


# ---------------------------------------------------------------------------------------------- lifecycle


async def test_ping(harness: Harness) -> None:
    assert await harness.store.ping() is True


async def test_close_is_idempotent(harness: Harness) -> None:
    await harness.store.put_engine("e1", {}, LONG_TTL)
    await harness.store.close()
    await harness.store.close()


# ---------------------------------------------------------------------------------------------- Redis only


@pytest.mark.redis
async def test_redis_stores_sharing_a_prefix_share_state(redis_prefix: str) -> None:
    """The point of Redis: two gateways see each other's engines and heartbeats."""
    a = RedisStateStore(REDIS_URL, key_prefix=redis_prefix)
    b = RedisStateStore(REDIS_URL, key_prefix=redis_prefix)
    other = RedisStateStore(REDIS_URL, key_prefix=redis_prefix + "-other")
    try:
        await a.put_engine("e1", {"by": "a"}, LONG_TTL)
        await a.heartbeat("gw-a", {"n": 1}, LONG_TTL)
        assert await b.get_engines() == {"e1": {"by": "a"}}
        assert await b.gateways() == {"gw-a": {"n": 1}}
        assert await other.get_engines() == {}
        await b.delete_engine("e1")
        assert await a.get_engine("e1") is None
    finally:
        for store in (a, b, other):
            await store.close()
        _delete_prefix(redis_prefix + "-other")


@pytest.mark.redis
async def test_a_burst_of_calls_waits_for_connections_instead_of_failing(redis_prefix: str) -> None:
    """redis-py's default pool refused the 101st concurrent call at once (MaxConnectionsError): a gateway under
    load read a healthy Redis as down about once a second. Calls wait for one of a bounded set of connections."""
    store = RedisStateStore(REDIS_URL, key_prefix=redis_prefix, max_connections=8)
    try:
        await store.ledger_set_capacity("e1", 1_000_000)
        results = await asyncio.gather(*(store.ledger_reserve(f"r{i}", "e1", 10, LONG_TTL) for i in range(300)),
                                       return_exceptions=True)
        assert results == [True] * 300
        assert (await store.ledger_usage(["e1"]))["e1"] == (3000, 1_000_000)
        default = RedisStateStore(REDIS_URL, key_prefix=redis_prefix)
        try:
            assert all(r == {"e1": (3000, 1_000_000)} for r in await asyncio.gather(
                *(default.ledger_usage(["e1"]) for _ in range(300))))
        finally:
            await default.close()
    finally:
        await store.close()


@pytest.mark.redis
async def test_redis_keys_carry_ttls_and_index_is_pruned(redis_prefix: str) -> None:
    """Keys expire server-side and listing prunes long-dead index entries (no KEYS scan needed)."""
    import redis.asyncio as aioredis

    store = RedisStateStore(REDIS_URL, key_prefix=redis_prefix)
    raw = aioredis.Redis.from_url(REDIS_URL)
    try:
        await store.put_engine("e1", {}, LONG_TTL)
        await store.heartbeat("g1", {}, LONG_TTL)
        assert 0 < await raw.pttl(f"{redis_prefix}:engine:e1") <= LONG_TTL * 1000
        assert 0 < await raw.pttl(f"{redis_prefix}:gateway:g1") <= LONG_TTL * 1000
        # An index entry long past its expiry (e.g. a writer that died an hour ago) is pruned on listing.
        stale_ms = int(time.time() * 1000) - 3_600_000
        await raw.zadd(f"{redis_prefix}:engines", {"ghost": stale_ms})
        assert await store.get_engines() == {"e1": {}}
        assert await raw.zscore(f"{redis_prefix}:engines", "ghost") is None
    finally:
        await raw.aclose()
        await store.close()


def test_redis_store_construction_does_no_io() -> None:
    """Building the store (at config load) must not connect, even to a dead address."""
    RedisStateStore(CLOSED_PORT_URL, timeout_s=0.5)


async def test_redis_store_unreachable_raises_state_unavailable() -> None:
    store = RedisStateStore(CLOSED_PORT_URL, key_prefix="maestro-test-closed", timeout_s=0.5)
    calls: list[tuple[str, Callable[[], Awaitable[Any]]]] = [
        ("put_engine", lambda: store.put_engine("e1", {"a": 1}, 5.0)),
        ("get_engine", lambda: store.get_engine("e1")),
        ("get_engines", store.get_engines),
        ("delete_engine", lambda: store.delete_engine("e1")),
        ("heartbeat", lambda: store.heartbeat("g1", {}, 5.0)),
        ("gateways", store.gateways),
    ]
    try:
        for name, call in calls:
            started = time.monotonic()
            with pytest.raises(StateUnavailable, match=name):
                await call()
            assert time.monotonic() - started < 1.5, f"{name} took too long to fail"
        started = time.monotonic()
        assert await store.ping() is False
        assert time.monotonic() - started < 1.5
    finally:
        await store.close()
        await store.close()


@pytest.mark.parametrize("url, shown", [
    # a "/", "?" or "#" in the password (base64) ends a URL parser's host part early: it was shown whole
    ("redis://:s3/cret@h:6379/0", "redis://:***@h:6379/0"), ("redis://ops:a?b#c@h/0", "redis://ops:***@h/0"),
    ("redis://:p@ss@h/0", "redis://:***@h/0"),
    ("unix:///tmp/r.sock?db=0&password=p", "unix:///tmp/r.sock?db=0&password=***"),
    ("redis://ops@h/0", "redis://ops@h/0"), ("redis://[::1]:6379/0?db=1", "redis://[::1]:6379/0?db=1"),
])
def test_a_redis_url_is_shown_without_its_password(url: str, shown: str) -> None:
    from gateway.state.redis import redact_url

    assert redact_url(url) == shown


@pytest.mark.parametrize("url, shown", [
    ("redis://:s3cret@127.0.0.1:1/0", "redis://:***@127.0.0.1:1/0"),
    ("redis://ops:s3cret@127.0.0.1:1/0", "redis://ops:***@127.0.0.1:1/0"),
    ("rediss://ops:s3cret@127.0.0.1:1", "rediss://ops:***@127.0.0.1:1"),
    # redis-py's password query option (the URL's query was shown as written)
    ("redis://127.0.0.1:1/0?password=s3cret", "redis://127.0.0.1:1/0?password=***"),
    ("redis://127.0.0.1:1/0?db=2&password=s3cret&socket_timeout=1", "redis://127.0.0.1:1/0?db=2&password=***&"),
])
async def test_an_unreachable_redis_is_named_without_its_password(url: str, shown: str) -> None:
    """The error (which reaches logs, /health's callers and admin answers) names the store but not its secret."""
    store = RedisStateStore(url, timeout_s=0.5)
    try:
        with pytest.raises(StateUnavailable) as caught:
            await store.get_engines()
        assert shown in str(caught.value) and "s3cret" not in str(caught.value)
    finally:
        await store.close()


async def test_redis_store_unresponsive_server_bounded_by_timeout() -> None:
    """A server that accepts but never answers (hung Redis) must not hang callers past timeout_s."""
    accepted: list[asyncio.StreamWriter] = []

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # keep the socket open, never reply

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    store = RedisStateStore(f"redis://127.0.0.1:{port}/0", key_prefix="maestro-test-hung", timeout_s=0.3)
    try:
        for call in (lambda: store.put_engine("e1", {}, 5.0), store.get_engines, lambda: store.get_engine("e1")):
            started = time.monotonic()
            with pytest.raises(StateUnavailable, match="timed out|Timeout"):
                await call()
            assert time.monotonic() - started < 1.0
        started = time.monotonic()
        assert await store.ping() is False
        assert time.monotonic() - started < 1.0
    finally:
        await store.close()
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()


def test_make_state_store_picks_backend() -> None:
    memory_store = make_state_store(SimpleNamespace(backend="memory", max_workflows=7))
    assert isinstance(memory_store, MemoryStateStore) and memory_store._workflows.max_items == 7
    config = SimpleNamespace(backend="redis", redis_url=CLOSED_PORT_URL, key_prefix="p", redis_timeout_s=0.5,
                             redis_max_connections=16, max_workflows=9)
    store = make_state_store(config)
    assert isinstance(store, RedisStateStore) and store._max_connections == 16 and store.max_workflows == 9


# ---------------------------------------------------------------------------------------------- workflows


async def test_a_workflows_arrival_is_its_earliest_steps_even_when_that_begin_comes_late(harness: Harness) -> None:
    """After a store outage, gateways replay the steps they began meanwhile in any order: a later step's begin
    that reached the store first made its time the workflow's arrival, and the default deadline (arrival + the
    class's workflow_deadline_s) moved later by the gap (seen with two gateways on one Redis)."""
    store = harness.store
    await store.workflow_begin("wf", "step-1", now=103.0, ttl_s=LONG_TTL, step=1)
    record = await store.workflow_begin("wf", "step-0", now=100.0, ttl_s=LONG_TTL, step=0)
    assert record["arrival"] == 100.0 and record["last_activity"] == 103.0
    record = await store.workflow_begin("wf", "step-2", now=105.0, ttl_s=LONG_TTL, step=2)
    assert record["arrival"] == 100.0 and record["last_activity"] == 105.0


async def test_workflow_begin_creates_and_end_counts_once(harness: Harness) -> None:
    store = harness.store
    assert await store.get_workflow("wf") is None
    record = await store.workflow_begin("wf", "r1", now=100.0, ttl_s=LONG_TTL, step=0, deadline=160.5,
                                        slo_class="batch", expected_steps=4, predicted_remaining_s=12.5)
    assert record == {"workflow_id": "wf", "arrival": 100.0, "deadline": 160.5, "slo_class": "batch",
                      "steps_done": 0, "tokens_used": 0, "expected_steps": 4, "last_step": 0,
                      "predicted_remaining_s": 12.5, "inflight": ["r1"], "last_activity": 100.0}
    # a second step: arrival kept, given fields overwritten, absent ones kept, last_step only rises
    record = await store.workflow_begin("wf", "r2", now=101.0, ttl_s=LONG_TTL, step=2, predicted_remaining_s=9.0)
    assert record["arrival"] == 100.0 and record["deadline"] == 160.5 and record["slo_class"] == "batch"
    assert record["last_step"] == 2 and record["inflight"] == ["r1", "r2"] and record["predicted_remaining_s"] == 9.0
    record = await store.workflow_begin("wf", "r3", now=101.5, ttl_s=LONG_TTL, step=1)
    assert record["last_step"] == 2
    # begin is idempotent by request id
    again = await store.workflow_begin("wf", "r1", now=102.0, ttl_s=LONG_TTL)
    assert again["inflight"] == ["r1", "r2", "r3"]
    done = await store.workflow_end("wf", "r1", now=103.0, ttl_s=LONG_TTL, tokens=120)
    assert done["steps_done"] == 1 and done["tokens_used"] == 120 and done["inflight"] == ["r2", "r3"]
    assert done["last_activity"] == 103.0
    # ending the same request again changes nothing (exactly once)
    assert await store.workflow_end("wf", "r1", now=104.0, ttl_s=LONG_TTL, tokens=120) == done
    failed = await store.workflow_end("wf", "r2", now=105.0, ttl_s=LONG_TTL, tokens=7, completed=False)
    assert failed["steps_done"] == 1 and failed["tokens_used"] == 127 and failed["inflight"] == ["r3"]
    assert await store.get_workflow("wf") == failed
    assert await store.workflow_end("nope", "r1", now=1.0, ttl_s=LONG_TTL) is None


async def test_a_workflows_last_activity_never_moves_back(harness: Harness) -> None:
    """A step ended during a store outage is sent later with the time it ended: it must not set the record's
    activity back before what later steps did (its expiry and the next replays read it)."""
    store = harness.store
    await store.workflow_begin("wf", "early", now=100.0, ttl_s=LONG_TTL)
    await store.workflow_begin("wf", "later", now=300.0, ttl_s=LONG_TTL)
    record = await store.workflow_end("wf", "early", now=200.0, ttl_s=LONG_TTL, tokens=1)
    assert record["last_activity"] == 300.0 and record["steps_done"] == 1
    record = await store.workflow_begin("wf", "replayed", now=150.0, ttl_s=LONG_TTL)
    assert record["last_activity"] == 300.0 and record["inflight"] == ["later", "replayed"]


async def test_workflow_ids_with_colons_are_workflows_apart(harness: Harness) -> None:
    """A workflow id may hold a colon: workflow "job:inflight" must not share a key with workflow "job"'s
    in-flight set (in Redis that was a WRONGTYPE error, taken for an outage of the whole store)."""
    store = harness.store
    await store.workflow_begin("job", "r1", now=1.0, ttl_s=LONG_TTL)
    await store.workflow_begin("job:inflight", "r2", now=2.0, ttl_s=LONG_TTL)
    job, other = await store.get_workflow("job"), await store.get_workflow("job:inflight")
    assert (job["inflight"], other["inflight"]) == (["r1"], ["r2"])
    assert (await store.workflow_end("job", "r1", now=3.0, ttl_s=LONG_TTL, tokens=5))["steps_done"] == 1


async def test_workflow_records_expire_and_activity_refreshes(harness: Harness) -> None:
    store = harness.store
    await store.workflow_begin("wf", "r1", now=1.0, ttl_s=0.6)
    await harness.elapse(0.4)
    await store.workflow_end("wf", "r1", now=2.0, ttl_s=0.6, tokens=5)  # activity: TTL starts again
    await harness.elapse(0.4)
    assert (await store.get_workflow("wf"))["steps_done"] == 1
    await harness.elapse(0.4)
    assert await store.get_workflow("wf") is None
    record = await store.workflow_begin("wf", "r9", now=3.0, ttl_s=LONG_TTL)
    assert record["arrival"] == 3.0 and record["steps_done"] == 0  # a new workflow under the old id


async def test_a_request_in_flight_past_inflight_s_is_taken_as_abandoned(harness: Harness) -> None:
    """A request whose end never comes (its gateway died) left its id in ``inflight`` for as long as the
    workflow went on, every step renewing the record: the scheduler counted it as a step still running."""
    store, inflight_s = harness.store, 0.5
    await store.workflow_begin("wf", "lost", now=1.0, ttl_s=LONG_TTL, inflight_s=inflight_s)
    await harness.elapse(0.3)
    await store.workflow_begin("wf", "lost", now=1.5, ttl_s=LONG_TTL, inflight_s=inflight_s)  # keeps its begin
    await store.workflow_begin("wf", "live", now=2.0, ttl_s=LONG_TTL, inflight_s=inflight_s)
    await harness.elapse(0.3)
    # read only: left out where inflight_s is given, kept where it is not
    assert (await store.get_workflow("wf", inflight_s))["inflight"] == ["live"]
    assert (await store.get_workflow("wf"))["inflight"] == ["live", "lost"]
    record = await store.workflow_begin("wf", "next", now=3.0, ttl_s=LONG_TTL, inflight_s=inflight_s)
    assert record["inflight"] == ["live", "next"]
    assert (await store.get_workflow("wf"))["inflight"] == ["live", "next"]  # dropped from the record
    # the end of an abandoned id counts nothing, as a repeated end; the others count as ever
    late = await store.workflow_end("wf", "lost", now=4.0, ttl_s=LONG_TTL, tokens=50, inflight_s=inflight_s)
    assert late["steps_done"] == 0 and late["tokens_used"] == 0 and late["last_activity"] == 3.0
    done = await store.workflow_end("wf", "live", now=5.0, ttl_s=LONG_TTL, tokens=7, inflight_s=inflight_s)
    assert done["steps_done"] == 1 and done["tokens_used"] == 7 and done["inflight"] == ["next"]
    # an end drops abandoned ids too, its own among them
    await harness.elapse(0.6)
    gone = await store.workflow_end("wf", "next", now=6.0, ttl_s=LONG_TTL, tokens=9, inflight_s=inflight_s)
    assert gone["inflight"] == [] and gone["steps_done"] == 1 and gone["tokens_used"] == 7
    assert (await store.get_workflow("wf"))["inflight"] == []


async def test_inflight_s_rejected_when_not_positive(harness: Harness) -> None:
    store = harness.store
    for call in (lambda: store.workflow_begin("wf", "r1", now=1.0, ttl_s=LONG_TTL, inflight_s=0),
                 lambda: store.workflow_end("wf", "r1", now=1.0, ttl_s=LONG_TTL, inflight_s=-1.0),
                 lambda: store.get_workflow("wf", 0.0), lambda: store.get_workflow("wf", float("inf")),
                 lambda: store.get_workflow("wf", float("nan"))):
        with pytest.raises(ValueError, match="inflight_s"):
            await call()
    assert await store.get_workflow("wf") is None


async def test_workflow_ttl_rejected_when_not_positive(harness: Harness) -> None:
    from gateway.state.base import MAX_TTL_S

    for ttl in (0, float("inf"), MAX_TTL_S * 2):
        with pytest.raises(ValueError):
            await harness.store.workflow_begin("wf", "r1", now=1.0, ttl_s=ttl)
        with pytest.raises(ValueError):
            await harness.store.ledger_reserve("r1", "e1", 1, ttl, force=True)
    assert await harness.store.get_workflow("wf") is None
    assert await harness.store.ledger_usage(["e1"]) == {"e1": (0, 0)}
    await harness.store.workflow_begin("wf", "r1", now=1.0, ttl_s=MAX_TTL_S)  # the longest is taken
    assert (await harness.store.get_workflow("wf"))["inflight"] == ["r1"]


async def test_a_workflows_last_activity_is_set_whatever_its_clock_reads(harness: Harness) -> None:
    """Times are whatever clock the caller passes: the Redis store compared a first ``now`` of 0 (or below) with a
    missing field read as 0 and never set ``last_activity`` (None, where the scheduler compares it)."""
    begun = await harness.store.workflow_begin("wf", "r1", now=0.0, ttl_s=LONG_TTL)
    assert begun["last_activity"] == 0.0
    await harness.store.workflow_begin("wf2", "r1", now=-5.0, ttl_s=LONG_TTL)
    ended = await harness.store.workflow_end("wf2", "r1", now=-7.0, ttl_s=LONG_TTL)
    assert ended["last_activity"] == -5.0 and ended["arrival"] == -5.0


# ---------------------------------------------------------------------------------------------- KV ledger


async def test_ledger_reserve_grow_release(harness: Harness) -> None:
    store = harness.store
    await store.ledger_set_capacity("e1", 100)
    assert await store.ledger_reserve("a", "e1", 60, LONG_TTL)
    assert not await store.ledger_reserve("b", "e1", 50, LONG_TTL)  # does not fit
    assert await store.ledger_reserve("b", "e1", 40, LONG_TTL)
    assert await store.ledger_reserve("a", "e1", 999, LONG_TTL)  # idempotent: already held, nothing changes
    assert await store.ledger_usage(["e1"]) == {"e1": (100, 100)}
    assert not await store.ledger_grow("a", 70, LONG_TTL)  # full
    assert await store.ledger_grow("a", 30, LONG_TTL)  # never lowers
    assert await store.ledger_reserved("e1") == 100
    assert await store.ledger_grow("a", 80, LONG_TTL, force=True)  # overshoot recorded (engine uses it)
    assert await store.ledger_reserved("e1") == 120 and await store.ledger_capacity("e1") == 100
    assert not await store.ledger_grow("zzz", 10, LONG_TTL)
    assert await store.ledger_release("a") == 80
    assert await store.ledger_release("a") == 0  # exactly once
    assert await store.ledger_release("never") == 0
    assert await store.ledger_usage(["e1", "unknown"]) == {"e1": (40, 100), "unknown": (0, 0)}
    assert not await store.ledger_reserve("c", "unknown", 1, LONG_TTL)  # capacity unknown: refused
    assert not await store.ledger_reserve("c", "unknown", 1, LONG_TTL, force=True)
    assert await store.ledger_reserve("c", "e1", 90, LONG_TTL, force=True)  # re-adoption over capacity
    assert await store.ledger_reserved("e1") == 130


async def test_ledger_capacity_change_and_zero_token_reservations(harness: Harness) -> None:
    store = harness.store
    await store.ledger_set_capacity("e1", 10)
    assert await store.ledger_reserve("a", "e1", 0, LONG_TTL)
    assert await store.ledger_reserve("b", "e1", 10, LONG_TTL)
    await store.ledger_set_capacity("e1", 5)  # shrinks below what is reserved: nothing new fits
    assert not await store.ledger_reserve("c", "e1", 1, LONG_TTL)
    assert await store.ledger_usage(["e1"]) == {"e1": (10, 5)}
    assert await store.ledger_release("a") == 0 and await store.ledger_release("b") == 10
    assert await store.ledger_reserve("c", "e1", 5, LONG_TTL)


async def test_ledger_lease_expiry_and_refresh(harness: Harness) -> None:
    """A reservation whose lease is not refreshed disappears (a dead gateway's do); refreshed ones stay."""
    store = harness.store
    await store.ledger_set_capacity("e1", 100)
    assert await store.ledger_reserve("dead", "e1", 50, 0.6)
    assert await store.ledger_reserve("alive", "e1", 30, 0.6)
    await harness.elapse(0.4)
    assert await store.ledger_refresh(["alive", "unknown"], 0.6) == 1
    await harness.elapse(0.4)  # 'dead' is past its lease, 'alive' was refreshed 0.4 s ago
    assert await store.ledger_usage(["e1"]) == {"e1": (30, 100)}
    assert await store.ledger_release("dead") == 0
    assert await store.ledger_reserve("new", "e1", 70, 0.6)
    assert await store.ledger_grow("alive", 30, 0.6)  # a grow refreshes the lease too
    await harness.elapse(0.4)
    assert await store.ledger_reserved("e1") == 100
    await harness.elapse(0.4)
    assert await store.ledger_usage(["e1"]) == {"e1": (0, 100)}
    assert await store.ledger_release("alive") == 0 and await store.ledger_release("new") == 0


async def test_ledger_non_positive_lease_rejected(harness: Harness) -> None:
    await harness.store.ledger_set_capacity("e1", 100)
    with pytest.raises(ValueError):
        await harness.store.ledger_reserve("a", "e1", 1, 0)
    assert await harness.store.ledger_reserved("e1") == 0


@pytest.mark.redis
async def test_redis_ledger_is_shared_and_keys_carry_ttls(redis_prefix: str) -> None:
    """Two gateways' stores on one Redis see one ledger; every ledger key expires on its own."""
    import redis.asyncio as aioredis

    a = RedisStateStore(REDIS_URL, key_prefix=redis_prefix)
    b = RedisStateStore(REDIS_URL, key_prefix=redis_prefix)
    raw = aioredis.Redis.from_url(REDIS_URL)
    try:
        await a.ledger_set_capacity("e1", 100)
        assert await a.ledger_reserve("r1", "e1", 70, LONG_TTL)
        assert not await b.ledger_reserve("r2", "e1", 40, LONG_TTL)
        assert await b.ledger_reserve_detail("r2", "e1", 30, LONG_TTL) == (True, 100, 100)
        assert await b.ledger_release("r1") == 70  # by request id, from any gateway
        assert await a.ledger_usage(["e1"]) == {"e1": (30, 100)}
        for key in ("kv:cap:e1", "kv:res:e1", "kv:exp:e1", "kv:sum:e1", "kv:req:r2"):
            assert await raw.pttl(f"{redis_prefix}:{key}") > 0, key
        await a.workflow_begin("wf", "r", now=1.0, ttl_s=LONG_TTL)
        for key in ("wf:wf", "wfr:wf"):
            assert 0 < await raw.pttl(f"{redis_prefix}:{key}") <= LONG_TTL * 1000
    finally:
        await raw.aclose()
        await a.close()
        await b.close()


async def test_redis_ledger_and_workflows_unreachable_raise_state_unavailable() -> None:
    store = RedisStateStore(CLOSED_PORT_URL, key_prefix="maestro-test-closed", timeout_s=0.5)
    calls = [
        ("ledger_set_capacity", lambda: store.ledger_set_capacity("e1", 5)),
        ("ledger_reserve", lambda: store.ledger_reserve("r", "e1", 1, 5.0)),
        ("ledger_grow", lambda: store.ledger_grow("r", 2, 5.0)),
        ("ledger_release", lambda: store.ledger_release("r")),
        ("ledger_refresh", lambda: store.ledger_refresh(["r"], 5.0)),
        ("ledger_usage", lambda: store.ledger_usage(["e1"])),
        ("workflow_begin", lambda: store.workflow_begin("w", "r", now=1.0, ttl_s=5.0)),
        ("workflow_end", lambda: store.workflow_end("w", "r", now=1.0, ttl_s=5.0)),
        ("get_workflow", lambda: store.get_workflow("w")),
    ]
    try:
        for name, call in calls:
            with pytest.raises(StateUnavailable, match=name):
                await call()
    finally:
        await store.close()


async def test_the_memory_store_lets_go_of_workflows_past_their_ttl() -> None:
    """A finished workflow's id is never read again, and its record was only dropped when read: in the embedded
    default every workflow ever served stayed in memory (4 KB each), and after a Redis outage so did every record
    the gateway kept locally meanwhile."""
    from gateway.state.memory import SWEEP_MIN_PUTS, MemoryStateStore

    now = [0.0]
    store = MemoryStateStore(clock=lambda: now[0])
    for i in range(3 * SWEEP_MIN_PUTS):
        await store.workflow_begin(f"done-{i}", "r", now=float(i), ttl_s=10.0)
        await store.workflow_end(f"done-{i}", "r", now=float(i), ttl_s=10.0)
    now[0] = 100.0  # all past their TTL
    for _ in range(5):  # a sweep comes within as many puts as the map holds (4,096 here)
        for i in range(SWEEP_MIN_PUTS):
            await store.workflow_begin(f"live-{i}", f"r{_}", now=100.0, ttl_s=10.0)
    assert len(store._workflows._items) == SWEEP_MIN_PUTS  # the live ones only
    assert await store.get_workflow("live-0") is not None and await store.get_workflow("done-0") is None
    blob, _ = store._workflows._items["live-0"]
    import tracemalloc
    tracemalloc.start()
    copies = [bytes(blob) for _ in range(100)]  # what one kept record costs: its own size, not orjson's buffer
    assert tracemalloc.get_traced_memory()[0] < 100 * (len(blob) + 200) and copies
    tracemalloc.stop()


async def test_the_memory_store_keeps_at_most_max_workflow_records(monkeypatch) -> None:
    """A client sending a new X-Workflow-Id with every request added a record per request for an hour (about
    1 kB each); past the bound, the oldest recorded gives way, and a record updated in place takes no new room."""
    from gateway.state import memory

    monkeypatch.setattr(memory, "MAX_WORKFLOW_RECORDS", 3)
    store = memory.MemoryStateStore()
    for i in range(5):
        await store.workflow_begin(f"w{i}", "r", now=float(i), ttl_s=3600.0)
    await store.workflow_end("w4", "r", now=5.0, ttl_s=3600.0)  # an update: nothing dropped
    assert [await store.get_workflow(f"w{i}") is not None for i in range(5)] == [False, False, True, True, True]
    assert store._workflows.dropped == 2
    # the least recently active without a step in flight gives way, not the first recorded: w2's step ends after
    # w4's, and w3's runs on, so w4 is dropped for w5
    await store.workflow_end("w2", "r", now=6.0, ttl_s=3600.0)
    await store.workflow_begin("w5", "r", now=7.0, ttl_s=3600.0)
    assert [await store.get_workflow(f"w{i}") is not None for i in range(2, 6)] == [True, True, False, True]


async def test_the_workflow_cache_keeps_at_most_max_cached_workflows(monkeypatch) -> None:
    from gateway.config import parse_config
    from gateway.workflow_tracker import WorkflowTracker
    from gateway.state.memory import MemoryStateStore

    raw = {"clusters": [{"name": "c", "pools": [{"name": "p", "models": ["m"], "engines": ["http://127.0.0.1:9"]}]}],
           "state": {"max_workflows": 2}}
    tracker = WorkflowTracker(MemoryStateStore(), parse_config(raw))
    def remember(workflow_id: str, at: float) -> None:
        tracker._remember({"workflow_id": workflow_id, "arrival": 0.0, "steps_done": 0, "tokens_used": 0,
                           "inflight": [], "last_activity": at})

    for i in range(4):
        remember(f"w{i}", 0.0)
    assert list(tracker.cache) == ["w2", "w3"]
    remember("w2", 5.0)  # a step of w2: the least recently remembered is w3 now
    remember("w4", 6.0)
    assert list(tracker.cache) == ["w2", "w4"]
    # the prune drops what has been idle past workflow_ttl_s, from the least recently remembered on
    tracker.prune(tracker.ttl_s + 5.5)
    assert list(tracker.cache) == ["w4"]


@pytest.mark.parametrize("kind", ["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def test_a_store_keeps_at_most_max_workflows_dropping_the_least_recently_active(kind, request) -> None:
    """A client sending a new X-Workflow-Id with every request added a ~1 kB record per request for an hour: the
    Redis store had no bound (110 MB in 5 minutes of a soak, until a noeviction Redis would refuse writes). Both
    stores keep max_workflows: the least recently active gives way, but not one with a step in flight while one
    without can (its step's end would find no record); Redis keeps none of a dropped one's keys."""
    def store_of(cap: int) -> StateStore:
        if kind == "memory":
            return MemoryStateStore(max_workflows=cap)
        return RedisStateStore(REDIS_URL, key_prefix=prefix, timeout_s=2.0, max_workflows=cap)

    prefix = request.getfixturevalue("redis_prefix") if kind == "redis" else ""
    store = store_of(3)
    clock = iter(range(100))

    async def step(workflow_id: str, ends: bool = True) -> None:
        await store.workflow_begin(workflow_id, "r", now=float(next(clock)), ttl_s=LONG_TTL)
        await asyncio.sleep(0.003)  # Redis orders by its own clock in ms
        if ends:
            await store.workflow_end(workflow_id, "r", now=float(next(clock)), ttl_s=LONG_TTL)
            await asyncio.sleep(0.003)

    async def kept(*ids: str) -> list[str]:
        return [w for w in ids if await store.get_workflow(w) is not None]

    names = ("w0", "busy", "w1", "w2", "w3", "w4")
    try:
        await step("w0")
        await step("busy", ends=False)  # its step runs on
        await step("w1")
        await step("w2")  # the fourth: the least recently active, w0, goes
        assert await kept(*names) == ["busy", "w1", "w2"]
        await step("w3")  # busy is the least recently active, but its step is in flight: w1 goes
        assert await kept(*names) == ["busy", "w2", "w3"]
        await store.workflow_end("busy", "r", now=50.0, ttl_s=LONG_TTL)  # its step ends: it is found and counted
        assert (await store.get_workflow("busy"))["steps_done"] == 1
        await asyncio.sleep(0.003)
        await step("w4")
        assert await kept(*names) == ["busy", "w3", "w4"]
        await step("w3")  # a step of a kept workflow takes no room
        assert await kept(*names) == ["busy", "w3", "w4"]
        if kind == "redis":
            import redis.asyncio as aioredis

            client = aioredis.Redis.from_url(REDIS_URL)
            try:
                assert not await client.exists(f"{prefix}:wf:w1", f"{prefix}:wfr:w1", f"{prefix}:wf:w0")
                assert await client.zcard(f"{prefix}:wfx") == 3 and await client.pttl(f"{prefix}:wfx") > 0
                await client.delete(*[key async for key in client.scan_iter(match=f"{prefix}:*")])
            finally:
                await client.aclose()
        await store.close()
        # where every record has a step in flight, the least recently active goes all the same
        store = store_of(2)
        for workflow_id in ("a", "b", "c"):
            await step(workflow_id, ends=False)
        assert await kept("a", "b", "c") == ["b", "c"]
    finally:
        await store.close()


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def capped(request: pytest.FixtureRequest) -> AsyncIterator[Callable[[int], Harness]]:
    """Stores with a bound on their workflow records: ``capped(n)`` one that keeps ``n`` (the memory store on a
    fake clock, Redis on real time)."""
    made: list[StateStore] = []
    prefix = request.getfixturevalue("redis_prefix") if request.param == "redis" else ""

    def make(cap: int) -> Harness:
        if request.param == "memory":
            clock = FakeClock()

            async def advance(seconds: float) -> None:
                clock.advance(seconds)

            store: StateStore = MemoryStateStore(clock=clock, max_workflows=cap)
            made.append(store)
            return Harness(store, advance, "memory")
        store = RedisStateStore(REDIS_URL, key_prefix=f"{prefix}:{len(made)}", timeout_s=2.0, max_workflows=cap)
        made.append(store)
        return Harness(store, asyncio.sleep, "redis")

    yield make
    for store in made:
        await store.close()


async def _kept(store: StateStore, *ids: str) -> list[str]:
    return [w for w in ids if await store.get_workflow(w) is not None]


async def test_a_record_whose_steps_only_end_still_counts_against_the_bound(capped) -> None:
    """The Redis index of records took its TTL from begins alone: with steps only ending for a TTL (one long
    answer, nothing new), the index expired while its records lived on, and those were never counted again."""
    h = capped(1)
    await h.store.workflow_begin("A", "r", now=1.0, ttl_s=SHORT_TTL * 2)
    await h.elapse(SHORT_TTL * 1.2)
    await h.store.workflow_end("A", "r", now=2.0, ttl_s=SHORT_TTL * 2)  # activity: A lives another TTL
    await h.elapse(SHORT_TTL * 1.2)  # past the begin's TTL, within the end's
    await h.store.workflow_begin("B", "r", now=3.0, ttl_s=SHORT_TTL * 2)
    assert await _kept(h.store, "A", "B") == ["B"]


async def test_an_expired_record_makes_room_before_a_live_one_gives_way(capped) -> None:
    """The memory store counted expired records at its bound, and a step in flight kept an expired one: a live
    record was dropped for a new one while the dead one stayed."""
    h = capped(2)
    await h.store.workflow_begin("A", "r", now=1.0, ttl_s=SHORT_TTL * 2)  # its step never ends
    await h.elapse(SHORT_TTL * 1.2)
    await h.store.workflow_begin("B", "r", now=2.0, ttl_s=SHORT_TTL * 4)
    await h.store.workflow_end("B", "r", now=2.0, ttl_s=SHORT_TTL * 4)
    await h.elapse(SHORT_TTL * 1.2)  # A has expired, B has not (0.84 s of its TTL left on Redis's clock)
    await h.store.workflow_begin("C", "r", now=3.0, ttl_s=SHORT_TTL * 4)
    assert await _kept(h.store, "A", "B", "C") == ["B", "C"]


def test_a_memory_map_of_several_ttls_lets_an_expired_record_go_before_a_live_one():
    """With one TTL a map's expired entries are its front; with several, an expired one may sit behind a live
    one, which was dropped for a new record while the dead one stayed."""
    from gateway.state.memory import _TTLMap

    clock = FakeClock()
    records = _TTLMap(clock, max_items=2)
    records.put("long", {}, 100.0)
    records.put("short", {}, 1.0)
    clock.advance(5.0)
    records.put("new", {}, 1.0)
    assert records.get("long") is not None and records.get("short") is None and records.dropped == 0


async def test_records_touched_within_one_millisecond_keep_their_order(capped) -> None:
    """Redis scored its index in whole milliseconds and orders equal scores by name: of two workflows active in
    one millisecond, it dropped the later one about half the time ("a" sorts before "b")."""
    h = capped(2)
    for i in range(6):
        for workflow_id in (f"b{i}", f"a{i}"):  # b first, then a: a is the more recent
            await h.store.workflow_begin(workflow_id, "r", now=float(i), ttl_s=LONG_TTL)
            await h.store.workflow_end(workflow_id, "r", now=float(i), ttl_s=LONG_TTL)
        await h.elapse(0.003)
        await h.store.workflow_begin(f"c{i}", "r", now=float(i), ttl_s=LONG_TTL)
        assert await _kept(h.store, f"a{i}", f"b{i}", f"c{i}") == [f"a{i}", f"c{i}"], i
        await h.store.workflow_end(f"c{i}", "r", now=float(i), ttl_s=LONG_TTL)  # free, as the others


async def test_the_lookahead_for_a_record_without_a_step_in_flight_is_exact(capped) -> None:
    """EVICT_LOOKAHEAD records are looked at, least recently active first: Redis looked at one or two more."""
    from gateway.state.base import EVICT_LOOKAHEAD

    h = capped(EVICT_LOOKAHEAD + 1)
    ids = [f"w{i:03d}" for i in range(EVICT_LOOKAHEAD + 1)]
    for workflow_id in ids:  # every step runs on
        await h.store.workflow_begin(workflow_id, "r", now=1.0, ttl_s=LONG_TTL)
    await h.store.workflow_end(ids[-1], "r", now=2.0, ttl_s=LONG_TTL)  # but the last's: the most recent, and free
    await h.store.workflow_begin("new", "r", now=3.0, ttl_s=LONG_TTL)
    # none of the first EVICT_LOOKAHEAD is free (the free one is the next): the least recently active goes
    assert await _kept(h.store, ids[0], ids[-1], "new") == [ids[-1], "new"]


@pytest.mark.redis
async def test_a_shorter_ttl_from_another_gateway_takes_no_record_out_of_the_bound(redis_prefix) -> None:
    """Gateways with different workflow TTLs share one Redis: a begin pruned the index by its own TTL, and took
    a longer-lived record out of it, never to be counted or dropped again."""
    store = RedisStateStore(REDIS_URL, key_prefix=redis_prefix, timeout_s=2.0, max_workflows=1)
    try:
        await store.workflow_begin("A", "r", now=1.0, ttl_s=LONG_TTL)
        await store.workflow_end("A", "r", now=1.0, ttl_s=LONG_TTL)
        await asyncio.sleep(SHORT_TTL * 1.2)
        await store.workflow_begin("B", "r", now=2.0, ttl_s=SHORT_TTL)
        assert await _kept(store, "A", "B") == ["B"]
    finally:
        await store.close()


@pytest.mark.parametrize("cap", [0, -1])
def test_a_workflow_bound_below_one_is_refused(cap: int) -> None:
    """The memory store read 0 as the default and failed its first begin on -1 (Redis refused both)."""
    for make in (lambda: MemoryStateStore(max_workflows=cap),
                 lambda: RedisStateStore(REDIS_URL, max_workflows=cap)):
        with pytest.raises(ValueError, match="max_workflows"):
            make()


@pytest.mark.redis
async def test_a_dead_gateways_index_entry_goes_without_a_listing(redis_prefix, monkeypatch) -> None:
    """Only a listing pruned the gateway index, and a gateway lists only with admission on: every gateway that
    ever died uncleanly stayed in it. A heartbeat prunes it too."""
    import redis.asyncio as aioredis

    from gateway.state import redis as redis_store

    monkeypatch.setattr(redis_store, "_SKEW_GRACE_MS", 0)
    store = RedisStateStore(REDIS_URL, key_prefix=redis_prefix, timeout_s=2.0)
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        await store.heartbeat("dead", {"n": 1}, ttl_s=0.05)
        await asyncio.sleep(0.1)
        await store.heartbeat("alive", {"n": 2}, ttl_s=LONG_TTL)
        assert [m.decode() for m in await client.zrange(f"{redis_prefix}:gateways", 0, -1)] == ["alive"]
    finally:
        await client.aclose()
        await store.close()
