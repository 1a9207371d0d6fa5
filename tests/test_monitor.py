"""The engine monitor: marks engines down after consecutive failures and up again; publishes to the store."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess

import aiohttp
import openai
import pytest

from tests.conftest import gateway_config, running_gateway
from tests.fault_engine import FaultEngine



async def wait_for(predicate, timeout_s: float = 3.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


async def test_engine_goes_down_and_comes_back():
    engine = FaultEngine()
    url = await engine.start()
    port = int(url.rsplit(":", 1)[1])
    async with running_gateway(gateway_config([url], monitor={"interval_s": 0.05, "down_after_failures": 3})) as gw:
        assert gw.registry.states["local/p/0"].up  # the first probe round ran before the listener opened
        await engine.stop()
        await wait_for(lambda: not gw.registry.states["local/p/0"].up)
        state = gw.registry.states["local/p/0"]
        assert state.consecutive_failures >= 3 and "failed" in state.last_error
        await engine.start(port)
        await wait_for(lambda: gw.registry.states["local/p/0"].up)
        # the monitor writes engine state in the background (a hung store must not slow its probes)
        for _ in range(150):
            stored = await gw.store.get_engine("local/p/0")
            if stored["up"]:
                break
            await asyncio.sleep(0.02)
        assert stored["up"] is True
        assert gw.metrics.engines_up._value.get() == 1
    await engine.stop()


async def test_an_engine_not_up_at_start_is_named_in_the_log_with_why(caplog):
    """The log named an engine only when it went up or down; one down from the start (a mistyped URL) was
    only "0/1 engines up" in the banner, and every request for it a 503 with nothing saying which or why."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    healthy = FaultEngine()  # answers, but needs a second success to be up: on its way, not said
    try:
        config = gateway_config([url, await healthy.start()], monitor={"interval_s": 60, "up_after_successes": 2})
        with caplog.at_level("WARNING", logger="maestro.monitor"):
            async with running_gateway(config) as gw:
                assert not gw.registry.states["local/p/0"].up and not gw.registry.states["local/p/1"].up
        said = [r.getMessage() for r in caplog.records if "is not up" in r.getMessage()]
        assert len(said) == 1 and "local/p/0" in said[0] and url in said[0], said
        assert gw.registry.states["local/p/0"].last_error in said[0]
    finally:
        listener.close()
        await healthy.stop()


async def test_an_engine_that_does_not_serve_its_pools_model_is_said_in_the_log(caplog):
    """A pool's model name that differed from the engine's --served-model-name failed every request for it there
    (vLLM answers 404, vLLM-Omni 400), and nothing said why."""
    right, wrong = FaultEngine(), FaultEngine(served_models=["meta-llama/Llama-3.1-8B-Instruct"])
    urls = [await right.start(), await wrong.start()]
    try:
        with caplog.at_level("WARNING", logger="maestro.monitor"):
            async with running_gateway(gateway_config(urls)) as gw:
                await wait_for(lambda: len(gw.monitor.models_missing) == 2
                               and None not in gw.monitor.models_missing.values())
                assert gw.monitor.models_missing == {"local/p/0": [], "local/p/1": ["fault-model"]}
                async with aiohttp.ClientSession() as session:
                    async with session.get(gw.base_url + "/admin/engines") as response:
                        listed = {e["engine_id"]: e["models_not_served"] for e in (await response.json())["data"]}
                assert listed == {"local/p/0": [], "local/p/1": ["fault-model"]}
        said = [r.getMessage() for r in caplog.records if "does not serve" in r.getMessage()]
        assert len(said) == 1 and "local/p/1" in said[0] and "'meta-llama/Llama-3.1-8B-Instruct'" in said[0]
    finally:
        await right.stop()
        await wrong.stop()


async def test_a_config_context_longer_than_the_engines_is_said_in_the_log(caplog):
    """The config's max_model_len (4096 where a models entry leaves it out) above the engine's: the gateway let
    through requests the engine refused, and its model card told clients a context they could not use."""
    short, long_enough = FaultEngine(max_model_len=1024), FaultEngine(max_model_len=2048)
    urls = [await short.start(), await long_enough.start()]
    try:
        with caplog.at_level("WARNING", logger="maestro.monitor"):
            async with running_gateway(gateway_config(urls)) as gw:  # the config says 2048
                await wait_for(lambda: gw.monitor.models_missing == {"local/p/0": [], "local/p/1": []})
        said = [r.getMessage() for r in caplog.records if "context" in r.getMessage()]
        assert len(said) == 1 and said[0].startswith("engine local/p/0 serves 'fault-model' with a context of "
                                                     "1024 tokens, but the config's models entry says max_model_len "
                                                     "2048") and said[0].endswith("set max_model_len: 1024")
    finally:
        await short.stop()
        await long_enough.stop()


async def test_an_engine_back_up_while_its_models_were_being_checked_is_checked_again():
    """Down and up again while the first check of its models still waited: the second came up unchecked, and the
    first's answer (from before the restart) stayed in the log and in /admin/engines."""
    engine = FaultEngine()
    url = await engine.start()
    async with running_gateway(gateway_config([url])) as gw:
        await wait_for(lambda: gw.monitor.models_missing.get("local/p/0") == [])
        client = gw.registry.clients["local/p/0"]
        answers = [(0.5, ["old-name"]), (0.0, ["fault-model"])]  # before the restart (slow), after it

        async def models():
            delay, names = answers.pop(0)
            await asyncio.sleep(delay)
            return names

        client.models = models
        gw.monitor._check_models_soon("local/p/0")  # it came up...
        await asyncio.sleep(0.05)
        gw.monitor._check_models_soon("local/p/0")  # ...and up again, restarted, while the first still waits
        await asyncio.sleep(0.8)
        assert gw.monitor.models_missing["local/p/0"] == []
    await engine.stop()


async def test_one_failed_probe_does_not_take_an_engine_down():
    engine = FaultEngine()
    url = await engine.start()
    port = int(url.rsplit(":", 1)[1])
    async with running_gateway(gateway_config([url], monitor={"interval_s": 0.2, "down_after_failures": 3})) as gw:
        await engine.stop()
        await asyncio.sleep(0.25)  # about one failed probe
        await engine.start(port)
        await asyncio.sleep(0.5)
        assert gw.registry.states["local/p/0"].up
    await engine.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis(port: int) -> subprocess.Popen:
    server = shutil.which("redis-server")
    if server is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is not installed: CI must install it")
        pytest.skip("redis-server is not installed")
    return subprocess.Popen([server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.mark.redis
async def test_redis_going_away_and_coming_back():
    """A private redis-server is killed under a running gateway: serving goes on, state is re-published."""
    from gateway.state.redis import RedisStateStore

    port = free_port()
    redis_url = f"redis://127.0.0.1:{port}/0"
    server = start_redis(port)
    engine = FaultEngine()
    url = await engine.start()
    reader = RedisStateStore(redis_url, timeout_s=0.5)
    try:
        await wait_for_async(reader.ping)
        raw = gateway_config([url], state={"backend": "redis", "redis_url": redis_url, "redis_timeout_s": 0.3,
                                           "heartbeat_interval_s": 0.1})
        async with running_gateway(raw) as gw:
            await wait_for_async(lambda: reader.get_engine("local/p/0"))
            record = await reader.get_engine("local/p/0")
            assert record["up"] is True and record["url"] == url
            await wait_for_async(reader.gateways)
            assert gw.gateway_id in await reader.gateways()

            server.kill()
            server.wait(timeout=10)
            await wait_for(lambda: not gw.monitor.store_ok)
            async with openai.AsyncOpenAI(base_url=gw.base_url + "/v1", api_key="x", max_retries=0) as client:
                reply = await client.chat.completions.create(model="fault-model",
                                                             messages=[{"role": "user", "content": "hi"}])
            assert reply.choices[0].message.content == "hello world"
            assert gw.registry.states["local/p/0"].up

            server = start_redis(port)  # empty: everything must be written again
            await wait_for(lambda: gw.monitor.store_ok, timeout_s=5)
            await wait_for_async(lambda: reader.get_engine("local/p/0"))
            await wait_for_async(reader.gateways)
    finally:
        await reader.close()
        await engine.stop()
        server.kill()
        server.wait(timeout=10)


async def wait_for_async(fetch, timeout_s: float = 3.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    from gateway.state import StateUnavailable

    while True:
        try:
            if await fetch():
                return
        except StateUnavailable:
            pass  # a reader's pooled connection from before a restart fails once
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


def test_cache_config_labels_that_are_not_ascii_numbers_read_as_unknown():
    """vLLM's ``vllm:cache_config_info`` carries its KV size as label strings; a label we cannot read as a plain
    number means "capacity not known yet" (0), never an exception in the scrape loop."""
    from backends.vllm_metrics import kv_capacity_of

    line = 'vllm:cache_config_info{block_size="16",cpu_block_size="99",num_gpu_blocks="%s"} 1.0'
    assert kv_capacity_of(line % "256") == 256 * 16
    for label in ("¹", "٢", "", "-3", "2.5"):  # "¹" and "٢" pass str.isdigit
        assert kv_capacity_of(line % label) == 0


class _OddEngine(FaultEngine):
    """A FaultEngine whose /metrics answers ``metrics_body`` (another server at the address, a runaway exporter)."""

    metrics_body: bytes = b""

    async def metrics(self, request):
        from aiohttp import web

        return web.Response(body=self.metrics_body, content_type="text/plain")


async def _state_behind(metrics_body: bytes):
    """The engine's state once a gateway has probed an engine whose /metrics answers ``metrics_body``."""
    engine = _OddEngine()
    engine.metrics_body = metrics_body
    url = await engine.start()
    try:
        async with running_gateway(gateway_config([url])) as gw:
            return gw.registry.states["local/p/0"]
    finally:
        await engine.stop()


@pytest.mark.parametrize("body", [b"<html><body>502 Bad Gateway</body></html>", b"", b"\x00\xff" * 100])
async def test_a_metrics_answer_that_is_no_vllm_s_is_a_failed_probe(body):
    """Any 200 counted as a live engine: a proxy's error page or a reused port got traffic."""
    state = await _state_behind(body)
    assert not state.up and "no Prometheus metrics" in state.last_error


async def test_a_vllm_without_its_own_stats_is_up():
    """vLLM started with --disable-log-stats answers /metrics with Python's own series only: still an engine."""
    state = await _state_behind(b"# HELP python_gc_objects_collected_total Objects collected during gc\n"
                                b"# TYPE python_gc_objects_collected_total counter\n"
                                b'python_gc_objects_collected_total{generation="0"} 1234.0\n')
    assert state.up


async def test_a_metrics_answer_past_the_size_bound_is_a_failed_probe(monkeypatch):
    """The whole body was read into memory on every probe (400 MB took the gateway to 500 MB)."""
    monkeypatch.setattr("backends.vllm.SCRAPE_MAX_BYTES", 4096)
    state = await _state_behind(b'vllm:num_requests_running{engine="0"} 0.0\n' * 200)  # 8.6 kB
    assert not state.up and "more than 4096" in state.last_error


def test_values_no_count_or_gauge_can_take_are_left_out():
    """A NaN waiting count broke the routing's min(): every request went to that engine."""
    from backends.vllm_metrics import parse_vllm_metrics

    text = "\n".join(['vllm:num_requests_waiting{engine="0"} NaN', 'vllm:num_requests_waiting{engine="1"} -5',
                      'vllm:num_requests_waiting{engine="2"} +Inf', 'vllm:num_requests_waiting{engine="3"} 2.0',
                      'vllm:num_requests_running{engine="0"} 1.0'])
    metrics = parse_vllm_metrics(text)
    assert (metrics.waiting, metrics.running) == (2.0, 1.0)


def test_values_past_what_an_engine_can_count_are_left_out():
    """1e308 requests running and waiting summed to infinity, and every request for the model was a 500 where
    the gateway made a pool's load an integer; a KV capacity past 2**64 failed every write of the engine's state
    to the store. Past 2**53 (what a double holds exactly) a value is no engine's."""
    from backends.vllm_metrics import MAX_VALUE, parse_vllm_metrics

    text = "\n".join(['vllm:num_requests_waiting{engine="0"} 1e308', 'vllm:num_requests_running{engine="0"} 1e308',
                      'vllm:num_requests_running{engine="1"} 3.0',
                      f'vllm:num_requests_waiting{{engine="1"}} {MAX_VALUE}'])
    metrics = parse_vllm_metrics(text)
    assert (metrics.waiting, metrics.running) == (MAX_VALUE, 3.0)
    info = 'vllm:cache_config_info{block_size="%s",engine="0",num_gpu_blocks="%s"} 1.0'
    assert parse_vllm_metrics(info % (16, 2**62)).kv_capacity_tokens == 0
    assert parse_vllm_metrics(info % (16, "9" * 5000)).kv_capacity_tokens == 0
    assert parse_vllm_metrics(info % (2**60, 4)).kv_block_size == 0
    huge_blocks = parse_vllm_metrics(info % (10**9, 4))  # a reservation would round up to the whole engine
    assert huge_blocks.kv_block_size == huge_blocks.kv_capacity_tokens == 0
    assert parse_vllm_metrics(info % (2048, 4)).kv_block_size == 2048  # a hybrid model's padded block
    assert parse_vllm_metrics("\n".join([info % (16, 2**48)] * 64)).kv_capacity_tokens == 0  # summed past it
    assert parse_vllm_metrics(info % (16, 1000)).kv_capacity_tokens == 16_000
    assert parse_vllm_metrics(info % (16, "0" * 30 + "1000")).kv_capacity_tokens == 16_000  # zero-padded



def test_sleep_state_and_kv_usage_read_as_vllm_032_exports_them():
    """vLLM 0.32's record_sleep_state: a level-0 pause sets only ``awake`` to 0 (the engine holds new requests);
    its aggregate logger averages KV usage over engine cores, where a sum read two cores at 0.6 as 1.2."""
    from backends.vllm_metrics import parse_vllm_metrics

    def sleep_state(awake: int, offloaded: int, discarded: int) -> list[str]:
        series = 'vllm:engine_sleep_state{engine="0",model_name="m",sleep_state="%s"} %d.0'
        return [series % ("awake", awake), series % ("weights_offloaded", offloaded),
                series % ("discard_all", discarded)]

    assert not parse_vllm_metrics("\n".join(sleep_state(1, 0, 0))).sleeping
    assert parse_vllm_metrics("\n".join(sleep_state(0, 0, 0))).sleeping  # sleep?level=0
    assert parse_vllm_metrics("\n".join(sleep_state(0, 1, 0))).sleeping
    assert parse_vllm_metrics("\n".join(sleep_state(0, 0, 1))).sleeping
    usage = ['vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.6',
             'vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.4',
             'vllm:num_requests_running{engine="0",model_name="m"} 3.0',
             'vllm:num_requests_running{engine="1",model_name="m"} 2.0']
    metrics = parse_vllm_metrics("\n".join(usage))
    assert (metrics.kv_usage, metrics.running) == (pytest.approx(0.5), 5.0)
    assert parse_vllm_metrics(usage[0]).kv_usage == pytest.approx(0.6)


async def test_an_engine_put_to_sleep_takes_no_new_request_while_it_drains_or_after():
    """A sleep with mode=wait returns when the engine's requests have finished; meanwhile (and for vLLM-Omni,
    whose /health never says it sleeps, afterwards too) it was still routed to. A sleep that outlasts
    timeouts.admin_s is a 504 that says the engine may still be draining, not a "refused" 502."""
    first, second = FaultEngine(sleep_routes=True), FaultEngine(sleep_routes=True)
    urls = [await first.start(), await second.start()]
    try:
        raw = gateway_config(urls, timeouts={"admin_s": 0.5})
        async with running_gateway(raw) as gw, openai.AsyncOpenAI(base_url=gw.base_url + "/v1", api_key="x",
                                                                    max_retries=0) as client:
            import aiohttp

            first.sleep_delay_s = 1.5  # draining: longer than admin_s
            async with aiohttp.ClientSession() as session:
                sleeping = asyncio.create_task(session.post(gw.base_url + "/admin/engines/local/p/0/sleep?mode=wait"))
                await asyncio.sleep(0.1)
                for _ in range(4):  # round robin would alternate: all go to the other engine
                    await client.chat.completions.create(model="fault-model",
                                                         messages=[{"role": "user", "content": "hi"}])
                assert (first.hits, second.hits) == (0, 4)
                answer = await sleeping
                assert answer.status == 504
                error = (await answer.json())["error"]
                assert error["code"] == "engine_admin_timeout" and "may still go to sleep" in error["message"]
                assert gw.registry.states["local/p/0"].sleeping  # still no new requests
                async with session.post(gw.base_url + "/admin/engines/local/p/0/wake_up") as woken:
                    assert woken.status == 200
                assert not gw.registry.states["local/p/0"].sleeping
    finally:
        await first.stop()
        await second.stop()


async def test_a_vllm_omni_engine_put_to_sleep_stays_asleep_for_the_probes_until_woken():
    """vLLM-Omni is probed on /health, which never says it sleeps: every probe marked it awake again, and images
    kept going to a DiT engine the operator had put to sleep."""
    from backends.vllm import EngineClient

    engine = FaultEngine(sleep_routes=True)
    client = EngineClient(await engine.start(), kind="vllm-omni")
    try:
        assert not (await client.probe()).sleeping
        await client.sleep()
        assert (await client.probe()).sleeping and (await client.probe()).sleeping
        await client.wake_up()
        assert not (await client.probe()).sleeping
    finally:
        await client.close()
        await engine.stop()


async def test_a_sleep_whose_drain_outlasts_its_call_holds_the_engine_while_vllm_says_it_pauses():
    """vLLM's /metrics says it sleeps only once a mode=wait drain ends, while new requests are held from the pause
    on: after admin_s more the probes took it for awake and sent requests into the pause. /is_sleeping is true
    from the pause on, so the probes ask it until a sleep or the end of the pause settles it."""
    from backends.vllm import EngineClient, EngineTimedOut

    engine = FaultEngine(sleep_routes=True, is_sleeping_route=True)
    client = EngineClient(await engine.start(), admin_timeout_s=0.2)
    try:
        engine.sleep_delay_s = 1.0
        with pytest.raises(EngineTimedOut):
            await client.sleep(mode="wait")
        await asyncio.sleep(0.3)  # past the admin_s hold
        assert (await client.probe()).sleeping  # still pausing, says /is_sleeping
        engine.paused = False  # the pause ended without a sleep
        assert not (await client.probe()).sleeping
        assert not (await client.probe()).sleeping
        # /is_sleeping stops answering while it said "paused": the hold ends admin_s later, not never
        with pytest.raises(EngineTimedOut):
            await client.sleep(mode="wait")
        engine.paused = True
        assert (await client.probe()).sleeping
        engine.mode = "error_500"
        assert (await client.probe()).sleeping  # for admin_s more
        await asyncio.sleep(0.3)
        assert not (await client.probe()).sleeping
    finally:
        await client.close()
        await engine.stop()


async def test_a_sleep_that_never_happened_does_not_keep_an_engine_out_for_good():
    """The hold on a sleeping engine ends: a vLLM sleep call that timed out holds it one more admin_s (its drain
    may end in sleep, which its /metrics then says); a call cut short (the admin's client left) or refused at
    once; a vLLM-Omni wake that timed out, at once."""
    from backends.vllm import EngineClient, EngineTimedOut

    engine = FaultEngine(sleep_routes=True)
    url = await engine.start()
    clients = [EngineClient(url, admin_timeout_s=0.2), EngineClient(url, kind="vllm-omni", admin_timeout_s=0.2)]
    try:
        engine.sleep_delay_s = 1.0
        vllm, omni = clients
        with pytest.raises(EngineTimedOut):
            await vllm.sleep(mode="wait")
        assert (await vllm.probe()).sleeping  # still draining, maybe
        await asyncio.sleep(0.4)  # the hold ends admin_s (0.2 s) after the timeout; the drain, 1 s after the call
        assert not (await vllm.probe()).sleeping  # its /metrics never said it sleeps: taken back
        call = asyncio.create_task(vllm.sleep())
        await asyncio.sleep(0.05)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert not vllm.held_asleep
        engine.sleep_delay_s = 0.0
        await omni.sleep()
        assert (await omni.probe()).sleeping
        engine.wake_delay_s = 1.0  # the wake answers after admin_s
        with pytest.raises(EngineTimedOut):
            await omni.wake_up()
        assert not omni.held_asleep
    finally:
        for client in clients:
            await client.close()
        await engine.stop()


async def test_a_store_that_hangs_does_not_slow_the_probes():
    """The probe loop awaited each engine's state write: while Redis hung, every write took its whole timeout
    and probes ran 4 times slower, so an engine that died was seen down seconds late."""
    engine = FaultEngine()
    url = await engine.start()
    try:
        async with running_gateway(gateway_config([url], monitor={"interval_s": 0.05})) as gw:
            writes = []
            put_engine = gw.store.put_engine

            async def hung_put_engine(*args, **kwargs):
                writes.append(args[0])
                await asyncio.sleep(0.5)
                return await put_engine(*args, **kwargs)

            gw.store.put_engine = hung_put_engine
            before = gw.registry.states["local/p/0"].consecutive_successes
            await asyncio.sleep(1.0)
            assert gw.registry.states["local/p/0"].consecutive_successes - before >= 10  # hung: 2
            assert 1 <= len(writes) <= 3  # one write at a time, of the latest state
    finally:
        await engine.stop()


async def test_a_probe_follows_no_redirect():
    """The monitor's probes followed redirects (the proxy follows none): an engine whose /metrics pointed at
    another server was marked up on that server's figures."""
    from tests.fault_engine import RawEngine

    async with RawEngine() as elsewhere:
        moved = (b"HTTP/1.1 302 Found\r\nLocation: " + elsewhere.url.encode() + b"/metrics\r\n"
                 b"Content-Length: 0\r\nConnection: close\r\n\r\n")
        async with RawEngine(metrics_answer=moved) as engine, running_gateway(gateway_config([engine.url])) as gw:
            await asyncio.sleep(0.5)  # several probes
            assert not any(state.up for state in gw.registry.states.values())
