"""Any request, however malformed, gets a deliberate answer: a success or an OpenAI-shaped 4xx, never a 500
from a bug of ours, and nothing stays held afterwards.

One gateway (simulated text and DiT engines, the ``maestro`` queue, KV admission from predictions) serves every
example; it runs on an event loop in a thread of its own so that hypothesis, which drives plain functions, can
send it requests one after another without starting a gateway per example.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import aiohttp
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import running_gateway

MODEL = "sim-llama"
DIT = "sim-dit"
CHAT, COMPLETIONS, IMAGES = "/v1/chat/completions", "/v1/completions", "/v1/images/generations"

_ODD_TEXT = st.sampled_from(["¹", "٣", "--1", "1e3", "nan", "inf", "-0", "9" * 30, "64x64", "¹x64", MODEL, DIT])
_LEAF = (st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1)  # what orjson can write
         | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20) | _ODD_TEXT)
_JSON = st.recursive(_LEAF, lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)
_NAME = st.text(alphabet="abcdefghij-_.:0123456789", min_size=1, max_size=12)
_METADATA = st.fixed_dictionaries({}, optional={
    "workflow_id": _NAME | _JSON, "agent_role": st.sampled_from(["coder", "planner", "nobody"]) | _JSON,
    "workflow_step": st.integers(0, 20) | _ODD_TEXT | _JSON, "workflow_steps": st.integers(1, 30) | _JSON,
    "workflow_deadline_ms": st.floats(1e12, 3e12) | _JSON,
    "slo_class": st.sampled_from(["interactive", "batch", "gold"]) | _JSON})
_MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]),
                                  "content": st.text(max_size=60)})
_CHAT = st.fixed_dictionaries(
    {"model": st.just(MODEL), "messages": st.lists(_MESSAGE, max_size=3).map(lambda m: m + [
        {"role": "user", "content": "hi"}])},
    optional={"max_tokens": st.integers(1, 64) | _JSON, "stream": st.booleans(), "metadata": _METADATA | _JSON,
              "temperature": st.floats(0, 2) | _JSON, "stream_options": st.just({"include_usage": True}) | _JSON,
              "tools": _JSON, "response_format": _JSON, "priority": st.integers(-5, 5) | _JSON})
_COMPLETION = st.fixed_dictionaries(
    {"model": st.just(MODEL), "prompt": st.text(min_size=1, max_size=60) | _JSON},
    optional={"max_tokens": st.integers(1, 64) | _JSON, "stream": st.booleans(), "metadata": _METADATA})
_IMAGE = st.fixed_dictionaries(
    {"model": st.just(DIT), "prompt": st.text(min_size=1, max_size=30) | _JSON},
    optional={"size": st.sampled_from(["64x64", "128x128", "¹x64", "64x٦٤", "4096x4097"]) | _JSON,
              "n": st.integers(0, 3) | _JSON, "num_inference_steps": st.integers(0, 5) | _JSON,
              "response_format": st.sampled_from(["b64_json", "url"]) | _JSON})
_ANY_BODY = st.dictionaries(st.sampled_from(["model", "messages", "prompt", "max_tokens", "stream", "metadata",
                                             "size", "n", "stream_options", "max_completion_tokens"]),
                            _JSON, max_size=6)
_HEADERS = st.fixed_dictionaries({}, optional={
    "X-Workflow-Id": _NAME | st.sampled_from(["has space", ""]),
    "X-Workflow-Step": st.sampled_from(["0", "3", " 4 ", "+2", "-1", "x", "9" * 20]),
    "X-Workflow-Steps": st.sampled_from(["1", "5", "0", "two"]),
    "X-Agent-Role": st.sampled_from(["coder", "planner", "nobody"]),
    "X-SLO-Class": st.sampled_from(["interactive", "batch", "gold"]),
    "X-Workflow-Deadline-Ms": st.sampled_from(["4102444800000", "1", "nan"]),
    "X-Request-Id": st.sampled_from(["req-1", "bad id"])})
_REQUESTS = (st.tuples(st.just(CHAT), _CHAT, _HEADERS) | st.tuples(st.just(COMPLETIONS), _COMPLETION, _HEADERS)
             | st.tuples(st.just(IMAGES), _IMAGE, _HEADERS)
             | st.tuples(st.sampled_from([CHAT, COMPLETIONS, IMAGES]), _ANY_BODY, _HEADERS))


class GatewayThread:
    """A gateway and a client session on an event loop in a daemon thread; ``call`` runs a coroutine there."""

    def __init__(self, raw_config: dict) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="fuzzed-gateway", daemon=True)
        self._thread.start()
        self._context = running_gateway(raw_config)
        self.gateway = self.call(self._context.__aenter__())
        self.session = self.call(self._open_session())

    @staticmethod
    async def _open_session() -> aiohttp.ClientSession:
        return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))

    def call(self, coroutine, timeout: float = 60.0):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    async def post(self, path: str, data: bytes, headers: dict[str, str]) -> tuple[int, str, bytes]:
        async with self.session.post(self.gateway.base_url + path, data=data, headers=headers) as response:
            return response.status, response.headers.get("Content-Type", ""), await response.read()

    def close(self) -> None:
        try:
            self.call(self.session.close())
            self.call(self._context.__aexit__(None, None, None))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)
            self.loop.close()


@pytest.fixture(scope="module")
def served() -> Iterator[GatewayThread]:
    raw = {
        "models": [{"name": MODEL, "max_model_len": 4096}, {"name": DIT}],
        "clusters": [{"name": "local", "pools": [
            {"name": "text", "kind": "vllm", "models": [MODEL], "simulated": {"count": 2, "time_scale": 2000.0}},
            {"name": "dit", "kind": "vllm-omni", "models": [DIT], "simulated": {"count": 1, "time_scale": 2000.0}},
        ]}],
        "monitor": {"interval_s": 0.05},
        "scheduling": {"queue_policy": "maestro", "admission": "predicted"},
    }
    served = GatewayThread(raw)
    yield served
    served.close()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                    HealthCheck.too_slow])
@given(request=_REQUESTS, truncate=st.sampled_from([False] * 9 + [True]))
def test_any_request_gets_a_success_or_an_openai_4xx(served, request, truncate):
    path, body, headers = request
    data = orjson.dumps(body)
    if truncate:
        data = data[:-2]  # not JSON any more
    status, content_type, answer = served.call(served.post(path, data, {"Content-Type": "application/json",
                                                                        **headers}))
    if status == 200:
        return
    assert content_type.startswith("application/json"), (status, answer[:200])
    error = orjson.loads(answer)["error"]
    assert 400 <= status < 500, (path, body, headers, status, error)
    # the gateway's own refusals are invalid_request_error; an engine's 4xx (its own validation, e.g. vLLM-Omni's
    # pydantic "n": null) is relayed with the engine's type
    assert isinstance(error["message"], str) and error["message"] and error["type"]


def test_the_fuzzed_gateway_holds_nothing_afterwards(served):
    """Runs after the property above (same module, same gateway): every reservation and request is released."""
    gateway = served.gateway

    async def settled() -> bool:
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            if gateway.inflight == 0 and not gateway.scheduling.ledger.held and not any(
                    pool.tickets for pool in gateway.scheduling.pools):
                return True
            await asyncio.sleep(0.05)
        return False

    assert served.call(settled())
    assert gateway.scheduling.predictor._failures == 0
