"""Shared fixtures: an in-process gateway built from a config dict."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest

from gateway.app import Gateway
from gateway.config import ServerConfig, parse_config


def gateway_config(engine_urls: list[str], model: str = "fault-model", **overrides: Any) -> dict:
    """A one-pool config over the given engine URLs, with fast monitoring for tests."""
    raw: dict[str, Any] = {
        "models": [{"name": model, "max_model_len": 2048}],
        "clusters": [{"name": "local", "pools": [{"name": "p", "kind": "vllm", "models": [model],
                                                   "engines": [{"url": u} for u in engine_urls]}]}],
        "monitor": {"interval_s": 0.1, "down_after_failures": 2},
        "routing": {"policy": "round_robin", "max_retries": 2},
        # the fault engine's per-request mode travels as a header, which the gateway forwards only when listed
        "server": {"forward_headers": [*ServerConfig.forward_headers, "X-Fault-Mode"]},
    }
    for key, value in overrides.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return raw


@contextlib.asynccontextmanager
async def running_gateway(raw_config: dict):
    gateway = Gateway(parse_config(raw_config))
    await gateway.start("127.0.0.1", 0)
    try:
        yield gateway
    finally:
        await gateway.stop()


@pytest.fixture
def make_gateway():
    return running_gateway


@pytest.fixture
async def redis_trace_stream():
    """A real Redis client and a stream key of this test's own, deleted afterwards: (client, key)."""
    import uuid

    import redis.asyncio as aioredis

    from tests.test_state_store import REDIS_URL, _require_redis

    _require_redis()
    client = aioredis.Redis.from_url(REDIS_URL)
    key = f"maestro-test-{uuid.uuid4().hex}:traces"
    try:
        yield client, key
    finally:
        await client.delete(key)
        await client.aclose()


@pytest.fixture(autouse=True)
def _bad_request_lines_unspent():
    """Each test starts with the whole burst of log lines for unparsable requests (gateway.listen rate-limits
    them process-wide: a fuzzing test would otherwise leave the next one's line out)."""
    from gateway.listen import _bad_request_filter

    _bad_request_filter.reset()
