"""The engine monitor: marks engines down after consecutive failures and up again; publishes to the store."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess

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
        stored = await gw.store.get_engine("local/p/0")
        assert stored["up"] is True
        assert gw.metrics.engines_up._value.get() == 1
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
