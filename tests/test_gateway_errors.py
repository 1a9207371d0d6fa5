"""Every client error the gateway answers itself: status, OpenAI error shape, and nothing reaching an engine."""

from __future__ import annotations

import asyncio

import aiohttp
import openai
import orjson
import pytest
from multidict import CIMultiDict
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import gateway_config, running_gateway
from tests.fault_engine import FaultEngine

CHAT = "/v1/chat/completions"
GOOD = {"model": "fault-model", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
async def engine():
    e = FaultEngine()
    await e.start()
    yield e
    await e.stop()


@pytest.fixture
async def gw(engine):
    async with running_gateway(gateway_config([engine.url], server={"max_body_bytes": 4096})) as gateway:
        yield gateway


async def post(url: str, data: bytes | None = None, headers: dict | None = None) -> tuple[int, dict, dict]:
    async with aiohttp.ClientSession() as session:
        async with session.post(url, data=data, headers=headers or {"Content-Type": "application/json"}) as r:
            return r.status, orjson.loads(await r.read()), CIMultiDict(r.headers)


def assert_openai_error(body: dict, param: str | None = None) -> None:
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param


@pytest.mark.parametrize("payload, param", [
    (b"{not json", None),
    (b"[1, 2]", None),
    (b"", None),
    (orjson.dumps({"messages": [{"role": "user", "content": "x"}]}), "model"),
    (orjson.dumps({"model": 7, "messages": [{"role": "user", "content": "x"}]}), "model"),
    (orjson.dumps({"model": "fault-model", "messages": []}), "messages"),
    (orjson.dumps({"model": "fault-model", "messages": "hi"}), "messages"),
    (orjson.dumps({"model": "fault-model", "messages": [{"content": "x"}]}), "messages[0].role"),
    (orjson.dumps({"model": "fault-model", "messages": [{"role": "user", "content": 5}]}), "messages[0].content"),
    (orjson.dumps({"model": "fault-model", "messages": [{"role": "user", "content": {"type": "text", "text": "x"}}]}),
     "messages[0].content"),  # a content part not in its list: vLLM refuses it
    (orjson.dumps({"model": "fault-model", "messages": ["hi"]}), "messages[0]"),
    (orjson.dumps({"model": "fault-model", "messages": [{"role": 5, "content": "x"}]}), "messages[0].role"),
    # null content only where OpenAI's message types take it (assistant, function); vLLM refuses the others
    (orjson.dumps({"model": "fault-model", "messages": [{"role": "user", "content": None}]}), "messages[0].content"),
    (orjson.dumps({"model": "fault-model", "messages": [{"role": "user", "content": "x"},
                                                        {"role": "tool", "content": None, "tool_call_id": "c"}]}),
     "messages[1].content"),
    (orjson.dumps({**GOOD, "max_tokens": -1}), "max_tokens"),
    (orjson.dumps({**GOOD, "max_tokens": 0}), "max_tokens"),
    (orjson.dumps({**GOOD, "max_tokens": "ten"}), "max_tokens"),
    (orjson.dumps({**GOOD, "max_tokens": 10**12}), "max_tokens"),
    (orjson.dumps({**GOOD, "max_tokens": 2049}), "max_tokens"),  # beyond max_model_len 2048
    # what pydantic's lax mode refuses, as vLLM does (a fraction, a digit that is not ASCII, a word)
    (orjson.dumps({**GOOD, "max_completion_tokens": 4.5}), "max_completion_tokens"),
    (orjson.dumps({**GOOD, "max_tokens": "\u0664"}), "max_tokens"),
    (orjson.dumps({**GOOD, "stream": "maybe"}), "stream"),
    (orjson.dumps({**GOOD, "stream": 2}), "stream"),
    (orjson.dumps({**GOOD, "stream_options": {"include_usage": True}}), "stream_options"),
    (orjson.dumps({**GOOD, "stream": False, "stream_options": {"include_usage": False}}), "stream_options"),
    (orjson.dumps({**GOOD, "stream": True, "stream_options": "yes"}), "stream_options"),
    (orjson.dumps({**GOOD, "stream": True, "stream_options": {"include_usage": "maybe"}}),
     "stream_options.include_usage"),
    (orjson.dumps({**GOOD, "temperature": 9}), "temperature"),
    (orjson.dumps({**GOOD, "temperature": "hot"}), "temperature"),
    (orjson.dumps({**GOOD, "temperature": "nan"}), "temperature"),
    (orjson.dumps({**GOOD, "n": 0}), "n"),
    (orjson.dumps({**GOOD, "n": 129}), "n"),  # OpenAI's limit, 128
    (orjson.dumps({**GOOD, "n": 1.5}), "n"),
    (orjson.dumps({**GOOD, "response_format": "json_object"}), "response_format"),
    (orjson.dumps({**GOOD, "response_format": {"type": 5}}), "response_format.type"),
    (orjson.dumps({**GOOD, "response_format": {"type": ["json_object"]}}), "response_format.type"),
    (orjson.dumps({**GOOD, "response_format": {}}), "response_format.type"),
    (orjson.dumps({**GOOD, "tools": {"type": "function"}}), "tools"),
    (orjson.dumps({**GOOD, "tools": [{"type": "function", "function": {"name": "f"}}, "f"]}), "tools[1]"),
    # 300 levels: orjson reads it, but writes at most 254 (a 500 where the gateway re-wrote such a body)
    (orjson.dumps(GOOD)[:-1] + b', "x": ' + b"[" * 299 + b"]" * 299 + b"}", None),
    # an integer past a double's range (documented: vLLM's parser takes it, up to 4,300 digits)
    (orjson.dumps(GOOD)[:-1] + b', "seed": ' + b"9" * 400 + b"}", None),
])
async def test_bad_chat_bodies_get_400_and_reach_no_engine(gw, engine, payload, param):
    status, body, headers = await post(gw.base_url + CHAT, payload)
    assert status == 400, body
    assert_openai_error(body, param)
    assert body["error"]["type"] == "invalid_request_error"
    assert headers.get("X-Request-Id")
    assert engine.hits == 0
    assert gw.inflight == 0


async def test_fields_in_vllms_lax_forms_are_served_and_read_as_vllm_reads_them(gw, engine):
    """vLLM reads its request fields in pydantic's lax mode (``"max_tokens": "4"`` or ``4.0``, ``"stream":
    "true"``...) and serves them; so does the gateway, reading them the same way where it acts on them (a
    stream is relayed as one, scheduled or not), and the engine gets the client's bytes with only what the
    gateway adds."""
    lax = {"max_tokens": "4", "max_completion_tokens": 4.0, "n": "1", "temperature": "0.5", "top_p": True,
           "presence_penalty": "-1", "frequency_penalty": 0}
    sent = orjson.dumps({**GOOD, **lax})
    status, body, _ = await post(gw.base_url + CHAT, sent)
    assert status == 200, body
    assert engine.seen_raw[-1] == sent
    for headers in ({}, {"X-Workflow-Id": "lax-1"}):  # straight to the engine, and through the scheduler
        sent = orjson.dumps({**GOOD, **lax, "stream": "true", "stream_options": {"include_usage": "yes"}})
        async with aiohttp.ClientSession() as session:
            async with session.post(gw.base_url + CHAT, data=sent,
                                    headers={"Content-Type": "application/json", **headers}) as r:
                assert r.status == 200 and r.content_type == "text/event-stream", await r.text()
                assert r.headers["Content-Type"] == "text/event-stream; charset=utf-8"  # as vLLM's and OpenAI's
                text = await r.text()
        assert text.rstrip().endswith("data: [DONE]"), text
        assert orjson.loads(engine.seen_raw[-1])["stream"] == "true"
    sent = orjson.dumps({**GOOD, "max_tokens": 2048, "n": 128})  # the context exactly, OpenAI's most answers
    status, body, _ = await post(gw.base_url + CHAT, sent)
    assert status == 200, body
    sent = orjson.dumps({**GOOD, "stream": 0, "stream_options": None})
    status, body, _ = await post(gw.base_url + CHAT, sent)
    assert status == 200 and body["object"] == "chat.completion", body
    assert gw.inflight == 0


async def test_a_utf8_byte_order_mark_is_ignored(gw, engine):
    """JSON's RFC lets a reader ignore a BOM (some .NET and PowerShell clients send one) and vLLM does; the
    engine gets the body without it."""
    status, body, _ = await post(gw.base_url + CHAT, b"\xef\xbb\xbf" + orjson.dumps(GOOD))
    assert status == 200, body
    assert engine.seen_raw[-1] == orjson.dumps(GOOD)


def test_validation_keeps_the_value_it_read_for_the_scheduler():
    """The parsed body holds what vLLM would read (the scheduler and the predictor compute with it); types the
    client already sent right are left as they are, an int temperature included."""
    from gateway.api.validation import validate_chat, validate_image

    body = {**GOOD, "max_tokens": " 7 ", "max_completion_tokens": "7.0", "n": 2.0, "stream": "yes",
            "stream_options": {"include_usage": 0}, "temperature": 1, "top_p": "0.5", "presence_penalty": True}
    validate_chat(body, 2048)
    assert body == {**GOOD, "max_tokens": 7, "max_completion_tokens": 7, "n": 2, "stream": True,
                    "stream_options": {"include_usage": False}, "temperature": 1, "top_p": 0.5,
                    "presence_penalty": 1.0}
    assert type(body["temperature"]) is int
    image = {"prompt": "a fox", "n": "2", "num_inference_steps": 20.0, "stream": "false"}
    validate_image(image)
    assert image == {"prompt": "a fox", "n": 2, "num_inference_steps": 20, "stream": False}


async def test_bodies_vllm_serves_are_served(gw, engine):
    """A differential audit against vLLM 0.32 found bodies it serves that the gateway refused (the real-vLLM
    stage checks them against the engine): a message without content (vLLM reads it as empty), an assistant's
    null content without tool calls, a role of "", empty stream options without a stream and options with a
    stream of "false" (vLLM tests the values as sent: a non-empty string is true), and on legacy completions
    ``max_completion_tokens`` (no field of theirs: ignored) and ``max_tokens: 0`` with ``echo`` (the prompt back)."""
    chats = [
        {"messages": [{"role": "user"}]},
        {"messages": [{"role": "system"}, {"role": "developer"}, {"role": "user", "content": "x"}]},
        {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": None}]},
        {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": None, "tool_calls": []}]},
        {"messages": [{"role": "user", "content": "x"}, {"role": "function", "name": "f", "content": None}]},
        {"messages": [{"role": "user", "content": "x"}, {"role": "tool", "tool_call_id": "c"}]},
        {"messages": [{"role": "", "content": "x"}]},
        {"stream_options": {}},
        {"stream": False, "stream_options": {}},
        {"stream": "false", "stream_options": {"include_usage": True}},
    ]
    for headers in ({}, {"X-Workflow-Id": "served-1"}):  # straight to the engine, and through the scheduler
        for fields in chats:
            sent = orjson.dumps({**GOOD, **fields})
            status, body, _ = await post(gw.base_url + CHAT, sent, {"Content-Type": "application/json", **headers})
            assert status == 200 and body["object"] == "chat.completion", (fields, body)
            assert engine.seen_raw[-1] == sent
        for fields in ({"max_completion_tokens": 0}, {"max_completion_tokens": "abc"}, {"max_completion_tokens": 10**6},
                       {"max_tokens": 0, "echo": True}, {"max_tokens": "0", "echo": "yes"}):
            sent = orjson.dumps({"model": "fault-model", "prompt": "once", **fields})
            status, body, _ = await post(gw.base_url + "/v1/completions", sent,
                                         {"Content-Type": "application/json", **headers})
            assert status == 200, (fields, body)
    for fields, param in (({"max_tokens": 0}, "max_tokens"), ({"max_tokens": 0, "echo": False}, "max_tokens"),
                          ({"max_tokens": 0, "echo": "maybe"}, "echo"), ({"max_tokens": -1, "echo": True}, "max_tokens")):
        status, body, _ = await post(gw.base_url + "/v1/completions",
                                     orjson.dumps({"model": "fault-model", "prompt": "once", **fields}))
        assert status == 400 and body["error"]["param"] == param, (fields, body)
    assert gw.inflight == 0


def test_the_output_cap_is_read_as_vllm_reads_it():
    """What the scheduler reserves for: chat's max_completion_tokens first; a legacy completion's max_tokens alone
    (16 where absent or null), and one token for ``max_tokens: 0`` with echo, which vLLM's engine computes."""
    from gateway.scheduling import requested_output_cap

    assert requested_output_cap("chat", {"max_completion_tokens": 5, "max_tokens": 9}) == 5
    assert requested_output_cap("chat", {"max_tokens": 9}) == 9
    assert requested_output_cap("chat", {}) is None
    assert requested_output_cap("completions", {"max_completion_tokens": 5, "max_tokens": 9}) == 9
    assert requested_output_cap("completions", {"max_completion_tokens": 5}) == 16
    assert requested_output_cap("completions", {"max_tokens": None}) == 16
    assert requested_output_cap("completions", {"max_tokens": 0, "echo": True}) == 1


def test_the_predictor_does_not_cap_a_completion_at_its_max_completion_tokens():
    """The predictor caps its estimate at ``max_completion_tokens`` before ``max_tokens``, as chat reads them; a
    legacy completion's ``max_completion_tokens`` is ignored by vLLM, and so by the estimate (it under-reserved)."""
    from gateway.config import default_config
    from gateway.prediction import RequestPredictor
    from predictor.predictor import Predictor

    hook = RequestPredictor(default_config())
    hook._predictor = Predictor.from_priors()
    body = {"model": "maestro-sim-llama-8b", "prompt": "hello", "max_tokens": 500, "max_completion_tokens": 1}
    estimate = hook.predict(body, None, 100, 500, None)
    assert estimate.p90 > 1 and body["max_completion_tokens"] == 1  # the client's body is left as it came


async def test_bad_completion_prompt(gw, engine):
    status, body, _ = await post(gw.base_url + "/v1/completions", orjson.dumps({"model": "fault-model",
                                                                                "prompt": [1, "a"]}))
    assert status == 400 and body["error"]["param"] == "prompt"
    status, body, _ = await post(gw.base_url + "/v1/completions", orjson.dumps({"model": "fault-model"}))
    assert status == 400 and body["error"]["param"] == "prompt"
    # an empty prompt in a batch, a negative or fractional token id: vLLM refuses them
    for prompt in ([], [[]], [[1], []], [[1], ["a"]], [[1], 2], [-1], [[1, -2]], [1.5], [1, "a"]):
        status, body, _ = await post(gw.base_url + "/v1/completions", orjson.dumps({"model": "fault-model",
                                                                                    "prompt": prompt}))
        assert status == 400 and body["error"]["param"] == "prompt", (prompt, body)
    assert engine.hits == 0


async def test_token_id_prompts_in_vllms_lax_forms_are_served(gw, engine):
    """vLLM reads a prompt of token ids in pydantic's lax mode (``[1.0, "2", true]`` is ``[1, 2, 1]``) and serves
    it; so does the gateway, which counts the prompt's ids from what it read. A list of strings stays strings,
    numeric or not."""
    from gateway.api.validation import validate_completion

    for prompt in ([1.0, "2", True], [[1.0], ["2", 3]], ["1", "2"]):
        sent = orjson.dumps({"model": "fault-model", "prompt": prompt})
        status, body, _ = await post(gw.base_url + "/v1/completions", sent)
        assert status == 200, (prompt, body)
        assert engine.seen_raw[-1] == sent
    for prompt, read in (([1.0, "2", True], [1, 2, 1]), ([[1.0], ["2", 3]], [[1], [2, 3]]), (["1", "2"], ["1", "2"])):
        body = {"model": "m", "prompt": prompt}
        validate_completion(body, None)
        assert orjson.dumps(body["prompt"]) == orjson.dumps(read)  # ints, not 1.0 or true
    assert gw.inflight == 0


async def test_unknown_model_is_404_via_sdk(gw, engine):
    async with openai.AsyncOpenAI(base_url=gw.base_url + "/v1", api_key="x", max_retries=0) as client:
        with pytest.raises(openai.NotFoundError) as caught:
            await client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert caught.value.body["code"] == "model_not_found"
    assert engine.hits == 0


async def test_body_over_limit_is_413(gw, engine):
    big = orjson.dumps({**GOOD, "messages": [{"role": "user", "content": "x" * 10000}]})
    status, body, _ = await post(gw.base_url + CHAT, big)
    assert status == 413
    assert_openai_error(body)
    assert engine.hits == 0


async def test_unknown_route_is_openai_404(gw):
    status, body, _ = await post(gw.base_url + "/v1/nothing-here", b"{}")
    assert status == 404
    assert_openai_error(body)
    async with aiohttp.ClientSession() as session, session.get(gw.base_url + CHAT) as r:  # a wrong method
        assert r.status == 404
    # counted, under one label whatever the path (no series per path a scanner tries)
    assert b'maestro_requests_total{model="-",route="unknown",status="404"} 2.0' in gw.metrics.render()


async def test_api_keys(engine):
    raw = gateway_config([engine.url], server={"api_keys": ["sekret"]})
    async with running_gateway(raw) as gw:
        async with openai.AsyncOpenAI(base_url=gw.base_url + "/v1", api_key="wrong", max_retries=0) as bad:
            with pytest.raises(openai.AuthenticationError):
                await bad.chat.completions.create(**GOOD)
            with pytest.raises(openai.AuthenticationError):
                await bad.models.list()
        status, body, _ = await post(gw.base_url + CHAT, orjson.dumps(GOOD))  # no Authorization header
        assert status == 401 and body["error"]["code"] == "missing_api_key"
        protected = [("GET", "/admin/engines"), ("GET", "/admin/scheduling"), ("GET", "/admin/predictor"),
                     ("POST", "/admin/predictor/refit"), ("GET", "/admin/workflows/wf-1"),
                     ("POST", "/admin/engines/local/p/0/sleep"), ("POST", "/admin/engines/local/p/0/wake_up"),
                     ("POST", "/v1/completions"), ("POST", "/v1/images/generations")]
        async with aiohttp.ClientSession() as session:
            for method, path in protected:
                for headers, code in (({}, "missing_api_key"), ({"Authorization": "Bearer wrong"}, "invalid_api_key")):
                    async with session.request(method, gw.base_url + path, headers=headers, json={}) as r:
                        body = await r.json()
                        assert (r.status, body["error"]["code"]) == (401, code), path
                        assert body["error"]["type"] == "invalid_request_error"  # as OpenAI answers a bad key
            async with session.get(gw.base_url + "/admin/scheduling", headers={"Authorization": "Bearer sekret"}) as r:
                assert r.status == 200
            for path in ("/health", "/metrics"):  # probes and scrapers carry no key
                async with session.get(gw.base_url + path) as r:
                    assert r.status == 200, path
        async with openai.AsyncOpenAI(base_url=gw.base_url + "/v1", api_key="sekret", max_retries=0) as good:
            reply = await good.chat.completions.create(**GOOD)
            assert reply.choices[0].message.content == "hello world"
        assert engine.hits == 1


async def test_full_queue_is_429_with_retry_after(engine):
    engine.mode, engine.delay_s = "stall", 1.0
    async with running_gateway(gateway_config([engine.url], server={"max_inflight": 1})) as gw:
        async with aiohttp.ClientSession() as session:
            first = asyncio.create_task(session.post(gw.base_url + CHAT, json=GOOD))
            while gw.inflight == 0:
                await asyncio.sleep(0.01)
            async with session.post(gw.base_url + CHAT, json=GOOD) as r:
                assert r.status == 429
                assert r.headers["Retry-After"] == "1"
                assert_openai_error(await r.json())
            (await first).release()
        assert engine.hits == 1


async def test_request_id_is_taken_forwarded_and_returned(gw, engine):
    """The client's id comes back as it sent it; the engine's is unique: vLLM takes the header as its request id,
    and two requests under one id at once collide there (refused as "already running", or aborted together)."""
    for _ in range(2):  # the same id twice
        status, _, headers = await post(gw.base_url + CHAT, orjson.dumps(GOOD),
                                        {"Content-Type": "application/json", "X-Request-Id": "abc-123",
                                         "X-Sim-Output-Tokens": "7"})
        assert status == 200
        assert headers["X-Request-Id"] == "abc-123"
        assert engine.seen_headers[-1]["X-Sim-Output-Tokens"] == "7"  # load-generator hints pass through
    first, second = (h["X-Request-Id"] for h in engine.seen_headers[-2:])
    assert first.startswith("abc-123~") and second.startswith("abc-123~") and first != second
    status, _, headers = await post(gw.base_url + CHAT, orjson.dumps(GOOD))
    assert len(headers["X-Request-Id"]) == 32
    assert engine.seen_headers[-1]["X-Request-Id"] == headers["X-Request-Id"]  # the gateway's own: unique already
    # vLLM's body field request_id (the engine's id where no header names one): sent the way a header's is
    for body_id, sent in (("mine-1", "mine-1~"), ("not a sane id!", None), (5, None)):
        status, _, headers = await post(gw.base_url + CHAT, orjson.dumps({**GOOD, "request_id": body_id}))
        assert status == 200 and len(headers["X-Request-Id"]) == 32
        engine_id = engine.seen_headers[-1]["X-Request-Id"]
        assert engine_id.startswith(sent) if sent else engine_id == headers["X-Request-Id"], (body_id, engine_id)
    status, _, headers = await post(gw.base_url + CHAT, orjson.dumps({**GOOD, "request_id": "mine-1"}),
                                    {"Content-Type": "application/json", "X-Request-Id": "hdr-1"})
    assert engine.seen_headers[-1]["X-Request-Id"].startswith("hdr-1~")  # the header first, as in vLLM


async def test_only_the_forwarded_headers_reach_the_engine(engine):
    """Only server.forward_headers are taken from the client's request. vLLM picks its data-parallel rank by
    X-data-parallel-rank and trusts X-Forwarded-*; keys, tokens, cookies and an SDK's own headers are none of
    the engine's; a header named in Connection is hop-by-hop. The gateway answers as "maestro"; a stream asks an
    nginx in front not to buffer it."""
    sent = {"Content-Type": "application/json", "X-Data-Parallel-Rank": "1", "X-Forwarded-For": "10.0.0.1",
            "X-Forwarded-Proto": "https", "X-Goog-Api-Key": "k", "X-Auth-Token": "t", "Cookie": "a=b",
            "X-Stainless-Lang": "python", "Connection": "keep-alive, X-Hop", "X-Hop": "1",
            "X-Workflow-Id": "wf-1", "X-Agent-Role": "coder", "Authorization": "Bearer x",
            "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", "tracestate": "a=1",
            "X-Custom-Tenant": "t-1"}
    async with running_gateway(gateway_config([engine.url])) as gw:
        status, _, headers = await post(gw.base_url + CHAT, orjson.dumps(GOOD), sent)
        assert status == 200 and headers["Server"] == "maestro"
        seen = engine.seen_headers[-1]
        assert not {name.lower() for name in seen if name.lower().startswith("x-")} - {"x-request-id"}
        assert "Authorization" not in seen and "Cookie" not in seen
        assert seen["traceparent"] == sent["traceparent"] and seen["tracestate"] == "a=1"
        async with aiohttp.ClientSession() as session:
            async with session.post(gw.base_url + CHAT, json={**GOOD, "stream": True}) as r:
                assert r.status == 200 and r.headers["X-Accel-Buffering"] == "no"
                assert r.headers["Server"] == "maestro"
                await r.read()
    listed = {"forward_headers": ["X-Custom-Tenant", "X-Hop", "tracestate"]}
    async with running_gateway(gateway_config([engine.url], server=listed)) as gw:
        status, _, _ = await post(gw.base_url + CHAT, orjson.dumps(GOOD), sent)
        assert status == 200
        seen = engine.seen_headers[-1]
        assert seen["X-Custom-Tenant"] == "t-1" and "traceparent" not in seen and "X-Data-Parallel-Rank" not in seen
        assert "X-Hop" not in seen  # listed, but the client named it hop-by-hop
        twice = CIMultiDict([("Content-Type", "application/json"), ("tracestate", "a=1"), ("tracestate", "b=2")])
        status, _, _ = await post(gw.base_url + CHAT, orjson.dumps(GOOD), twice)
        assert status == 200 and engine.seen_headers[-1].getall("tracestate") == ["a=1, b=2"]


async def test_unknown_fields_pass_through(gw, engine):
    body = {**GOOD, "priority": -3, "ignore_eos": True, "min_tokens": 4, "some_future_field": {"a": 1}}
    status, _, _ = await post(gw.base_url + CHAT, orjson.dumps(body))
    assert status == 200
    assert engine.seen_bodies[-1] == body  # non-streaming bodies are forwarded byte for byte


def test_a_rewritten_body_keeps_the_integers_orjson_cannot_and_the_gateways_changes():
    """rewrite_json: the keys the gateway set, replaced or dropped (as the image route drops nulls and a size of
    "auto", and names the model) are its; every other key is the client's, with integers past 64 bits exact."""
    import json

    from gateway.api.validation import parse_json_object, rewrite_json

    raw = json.dumps({"prompt": "a cat", "seed": 2**70, "size": "auto", "n": None,
                      "extra": {"ids": [-2**63 - 1, 12345678901234567890123]}}).encode()
    body = parse_json_object(raw)
    assert body["seed"] == float(2**70)  # (what orjson makes of it)
    body = {key: value for key, value in body.items() if value is not None and value != "auto"}
    body["model"] = "dit"
    assert json.loads(rewrite_json(raw, body)) == {"prompt": "a cat", "seed": 2**70, "model": "dit",
                                                   "extra": {"ids": [-2**63 - 1, 12345678901234567890123]}}
    # alone, an integer just below int64 (19 digits) is exact too
    raw = b'{"model": "m", "seed": -9223372036854775809}'
    body = parse_json_object(raw)
    body["priority"] = 1
    assert json.loads(rewrite_json(raw, body)) == {"model": "m", "seed": -2**63 - 1, "priority": 1}
    plain = orjson.dumps({"prompt": "é", "seed": 2**63 - 1, "ok": [1.5, True, None]})
    body = parse_json_object(plain)
    body["priority"] = 3
    assert rewrite_json(plain, body) == orjson.dumps(body)  # no long number: orjson writes it, as before


def test_a_member_the_client_did_not_send_is_appended_to_its_bytes_as_they_came():
    """json_with: the common re-write (an engine priority, stream_options for a stream) sends the client's bytes
    with one member appended, nothing of them re-encoded; a key the client sent takes rewrite_json's path."""
    import json

    from gateway.api.validation import json_with, parse_json_object

    raw = b'{"model": "m", "seed": 123456789012345678901234567890, "x": "\\u00e9\\n"}\r\n '
    body = parse_json_object(raw)
    sent = json_with(raw, body, "priority", -3)
    assert sent == b'{"model": "m", "seed": 123456789012345678901234567890, "x": "\\u00e9\\n","priority":-3}'
    assert json.loads(sent)["seed"] == 123456789012345678901234567890 and body["priority"] == -3
    assert json_with(b"{ }", parse_json_object(b"{ }"), "k", {"a": [1]}) == b'{ "k":{"a":[1]}}'
    present = parse_json_object(b'{"model":"m","priority":null,"seed":12345678901234567890123}')
    sent = json_with(b'{"model":"m","priority":null,"seed":12345678901234567890123}', present, "priority", 2)
    assert json.loads(sent) == {"model": "m", "priority": 2, "seed": 12345678901234567890123}  # one key, exact


async def test_a_tool_calling_conversation_passes_as_sent(gw, engine):
    """An agent's history as the OpenAI SDK sends it: the assistant turn that called a tool has ``content: null``
    and ``tool_calls``, the tool's answer has role ``tool``; content may also be a list of parts."""
    body = {**GOOD, "messages": [
        {"role": "system", "content": "You can call functions."},
        {"role": "user", "content": [{"type": "text", "text": "Weather in Oslo?"}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "4 C, rain"},
        {"role": "assistant", "content": None, "function_call": {"name": "weather", "arguments": "{}"}},
        {"role": "function", "name": "weather", "content": "4 C"}],
        "tools": [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]}
    async with openai.AsyncOpenAI(base_url=gw.base_url + "/v1", api_key="x", max_retries=0) as client:
        answer = await client.chat.completions.create(**body)
    assert answer.choices[0].message.content == "hello world"
    sent = engine.seen_bodies[-1]
    assert sent["messages"] == body["messages"] and sent["tools"] == body["tools"]


async def test_health_says_what_an_orchestrator_needs(gw, engine):
    async with aiohttp.ClientSession() as session:
        async with session.get(gw.base_url + "/health") as r:
            assert r.status == 200
            assert await r.json() == {"status": "ok", "gateway_id": gw.gateway_id, "engines_up": 1,
                                      "engines_sleeping": 0, "engines_total": 1, "state_store": "ok"}


async def test_a_chunked_body_over_the_limit_is_413(gw, engine):
    """Without a Content-Length the limit is enforced while reading (max_body_bytes 4096 here)."""
    async def chunks():
        yield b'{"model": "fault-model", "messages": [{"role": "user", "content": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}]}'

    async with aiohttp.ClientSession() as session:
        async with session.post(gw.base_url + CHAT, data=chunks(),
                                headers={"Content-Type": "application/json"}) as r:
            body = await r.json()
            assert r.status == 413 and body["error"]["code"] == "request_too_large"
    assert engine.hits == 0 and gw.inflight == 0


async def test_engine_specific_response_formats_and_tools_pass_through(gw, engine):
    body = {**GOOD, "response_format": {"type": "structural_tag", "structures": [], "triggers": []},
            "tools": [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]}
    status, _, _ = await post(gw.base_url + CHAT, orjson.dumps(body))
    assert status == 200
    assert engine.seen_bodies[-1] == body  # the gateway checks shapes; the values are the engine's to judge


async def test_stream_usage_chunk_stripped_unless_asked(gw, engine):
    async with openai.AsyncOpenAI(base_url=gw.base_url + "/v1", api_key="x", max_retries=0) as client:
        stream = await client.chat.completions.create(**GOOD, stream=True)
        chunks = [c async for c in stream]
        assert all(c.choices for c in chunks)  # no usage-only chunk reached the client
        assert engine.seen_bodies[-1]["stream_options"] == {"include_usage": True}  # but the engine was asked
        stream = await client.chat.completions.create(**GOOD, stream=True, stream_options={"include_usage": True})
        chunks = [c async for c in stream]
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 2
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "hello world"


def _count_of(metrics: str, route: str, status: int) -> float:
    """Requests the gateway answered on ``route`` with ``status``, over all models."""
    return sum(sample.value for family in text_string_to_metric_families(metrics)
               for sample in family.samples if sample.name == "maestro_requests_total"
               and sample.labels.get("route") == route and sample.labels.get("status") == str(status))


async def _metrics_text(gw) -> str:
    async with aiohttp.ClientSession() as session:
        async with session.get(gw.base_url + "/metrics") as r:
            return await r.text()


async def test_a_bug_before_the_answer_starts_is_an_openai_500_and_the_gateway_goes_on(gw, engine, monkeypatch,
                                                                                        caplog):
    """An exception we did not foresee still reaches the SDK as OpenAI's shape (InternalServerError with a code
    and the request id), is logged with its traceback, counts in the metrics, and leaves nothing held."""
    import gateway.api.openai_routes as routes

    def broken_validation(body, context_len):
        raise RuntimeError("a bug in validation")

    monkeypatch.setattr(routes, "validate_chat", broken_validation)
    async with openai.AsyncOpenAI(base_url=gw.base_url + "/v1", api_key="x", max_retries=0) as client:
        with pytest.raises(openai.InternalServerError) as caught:
            await client.chat.completions.create(**GOOD, extra_headers={"X-Request-Id": "req-bug-1"})
        assert caught.value.status_code == 500
        assert caught.value.body["code"] == "internal_error" and "req-bug-1" in caught.value.body["message"]
        assert caught.value.response.headers["X-Request-Id"] == "req-bug-1"
        assert any("req-bug-1" in r.getMessage() and r.exc_info for r in caplog.records)
        assert engine.hits == 0 and gw.inflight == 0
        monkeypatch.undo()
        answer = await client.chat.completions.create(**GOOD)  # the next request is served as usual
        assert answer.choices[0].message.content
    assert _count_of(await _metrics_text(gw), "chat", 500) == 1


async def test_a_bug_mid_stream_drops_the_connection_and_the_gateway_goes_on(gw, engine, monkeypatch):
    """Once the stream's status line is out, an error can no longer become a 500: the connection is dropped (the
    SDK raises), the engine's request is closed, and the gateway's count of requests in flight returns to 0."""
    import gateway.sse as sse

    def broken_feed(self, chunk):
        raise RuntimeError("a bug in the SSE relay")

    monkeypatch.setattr(sse.SSEUsageFilter, "feed", broken_feed)
    async with openai.AsyncOpenAI(base_url=gw.base_url + "/v1", api_key="x", max_retries=0) as client:
        with pytest.raises(openai.APIError):
            stream = await client.chat.completions.create(**GOOD, stream=True)
            async for _ in stream:
                pass
        assert gw.inflight == 0 and _count_of(await _metrics_text(gw), "chat", 500) == 1
        monkeypatch.undo()
        chunks = [c async for c in await client.chat.completions.create(**GOOD, stream=True)]
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "hello world"


async def test_failed_requests_are_counted_under_their_model(gw, engine):
    """A 400 for a served model is that model's; an unknown model's name is the client's choice and must not
    become a series of its own."""
    await post(gw.base_url + CHAT, orjson.dumps({**GOOD, "max_tokens": -1}))
    await post(gw.base_url + CHAT, orjson.dumps({**GOOD, "model": "made-up-1"}))
    samples = {(s.labels["model"], s.labels["status"]) for family in text_string_to_metric_families(
        gw.metrics.render().decode()) if family.name == "maestro_requests" for s in family.samples
        if s.name == "maestro_requests_total"}
    assert ("fault-model", "400") in samples and ("-", "404") in samples
    assert not any(model == "made-up-1" for model, _ in samples)


async def test_the_inflight_gauge_counts_requests_inside_the_gateway(engine):
    engine.mode, engine.delay_s = "stall", 0.5
    async with running_gateway(gateway_config([engine.url])) as gateway:
        waiting = asyncio.create_task(post(gateway.base_url + CHAT, orjson.dumps(GOOD)))
        while not engine.hits:
            await asyncio.sleep(0.01)
        assert "maestro_inflight_requests 1.0" in gateway.metrics.render().decode()
        await waiting
        assert "maestro_inflight_requests 0.0" in gateway.metrics.render().decode()


async def test_browsers_get_cors_answers_as_from_vllm(engine):
    """vLLM allows every origin by default (``--allowed-origins``): a browser app that works against it must work
    through the gateway. A preflight is answered before authentication (browsers send no key on it); answers,
    streamed ones too, carry the allowed origin; a configured list refuses other origins; an empty one is off."""
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type, x-workflow-id"}
    raw = gateway_config([engine.url], server={"api_keys": ["k"]})
    async with running_gateway(raw) as gateway, aiohttp.ClientSession() as session:
        async with session.options(gateway.base_url + CHAT, headers=preflight) as r:
            assert r.status == 204
            assert r.headers["Access-Control-Allow-Origin"] == "*"
            assert r.headers["Access-Control-Allow-Headers"] == preflight["Access-Control-Request-Headers"]
            assert "POST" in r.headers["Access-Control-Allow-Methods"]
        for stream in (False, True):
            async with session.post(gateway.base_url + CHAT, json={**GOOD, "stream": stream},
                                    headers={"Origin": "https://app.example", "Authorization": "Bearer k"}) as r:
                assert r.status == 200 and r.headers["Access-Control-Allow-Origin"] == "*"
                await r.read()
        async with session.post(gateway.base_url + CHAT, json=GOOD, headers={"Origin": "https://app.example"}) as r:
            assert r.status == 401 and r.headers["Access-Control-Allow-Origin"] == "*"  # the page can read why
        async with session.options(gateway.base_url + CHAT) as r:  # not a preflight: an unknown route, as before
            assert r.status == 404
        async with session.get(gateway.base_url + "/v1/models", headers={"Authorization": "Bearer k"}) as r:
            assert "Access-Control-Allow-Origin" not in r.headers  # no Origin, no CORS headers
    listed = gateway_config([engine.url], server={"cors_allowed_origins": ["https://app.example"]})
    async with running_gateway(listed) as gateway, aiohttp.ClientSession() as session:
        async with session.options(gateway.base_url + CHAT, headers=preflight) as r:
            assert r.status == 204 and r.headers["Access-Control-Allow-Origin"] == "https://app.example"
            assert r.headers["Vary"] == "Origin"
        async with session.options(gateway.base_url + CHAT, headers={**preflight, "Origin": "https://evil.example"}) \
                as r:
            assert r.status == 400 and (await r.json())["error"]["code"] == "cors_origin_not_allowed"
        async with session.post(gateway.base_url + CHAT, json=GOOD, headers={"Origin": "https://evil.example"}) as r:
            assert r.status == 200 and "Access-Control-Allow-Origin" not in r.headers
    off = gateway_config([engine.url], server={"cors_allowed_origins": []})
    async with running_gateway(off) as gateway, aiohttp.ClientSession() as session:
        async with session.options(gateway.base_url + CHAT, headers=preflight) as r:
            assert r.status == 404 and "Access-Control-Allow-Origin" not in r.headers


async def test_a_body_that_does_not_arrive_is_a_408_and_frees_its_place(engine, monkeypatch):
    """A client that sends its headers and goes quiet held one of max_inflight places for as long as it kept the
    connection: a few thousand of them answered everyone else 429."""
    monkeypatch.setattr("gateway.api.openai_routes.BODY_READ_TIMEOUT_S", 0.3)
    async with running_gateway(gateway_config([engine.url], server={"max_inflight": 1})) as gateway:
        host, port = gateway.base_url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{")
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(4096), 3.0)
        assert answer.startswith(b"HTTP/1.1 408") and b'"request_timeout"' in answer
        # what is left of the body on the connection is no next request: the answer says the connection ends
        # (RFC 9110 15.5.9), where a pooled client reusing it had got its next request's head read as that body
        assert b"Connection: close" in answer
        writer.close()
        status, _, _ = await post(gateway.base_url + CHAT, orjson.dumps(GOOD))
        assert status == 200 and gateway.inflight == 0


async def test_an_unknown_models_name_is_echoed_cut_short(gw, engine):
    status, body, _ = await post(gw.base_url + CHAT, orjson.dumps({**GOOD, "model": "m" * 3000}))
    assert status == 404 and body["error"]["code"] == "model_not_found"
    assert len(body["error"]["message"]) < 400


async def test_admin_routes_answer_no_web_page_unless_its_origin_is_listed(engine):
    """A keyless gateway's admin routes were open to any page a user opened: a text/plain POST needs no
    preflight, so a page could put engines to sleep (and, with "*", read /admin/engines)."""
    page = {"Origin": "https://evil.example", "Content-Type": "text/plain"}
    async with running_gateway(gateway_config([engine.url])) as gateway, aiohttp.ClientSession() as session:
        async with session.post(gateway.base_url + "/admin/engines/local/p/0/sleep", headers=page) as r:
            assert r.status == 403 and (await r.json())["error"]["code"] == "cross_origin_admin"
            assert "Access-Control-Allow-Origin" not in r.headers
        async with session.get(gateway.base_url + "/admin/engines") as r:  # no Origin: a tool, not a page
            assert r.status == 200
    listed = gateway_config([engine.url], server={"cors_allowed_origins": ["https://ops.example"]})
    async with running_gateway(listed) as gateway, aiohttp.ClientSession() as session:
        async with session.get(gateway.base_url + "/admin/engines", headers={"Origin": "https://ops.example"}) as r:
            assert r.status == 200 and r.headers["Access-Control-Allow-Origin"] == "https://ops.example"


async def test_a_key_that_is_no_utf8_is_a_401_not_a_500(engine):
    async with running_gateway(gateway_config([engine.url], server={"api_keys": ["k"]})) as gateway:
        host, port = gateway.base_url.removeprefix("http://").split(":")
        for path in (b"/v1/models", b"/admin/engines"):
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(b"GET " + path + b" HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\r\n\r\n")
            await writer.drain()
            answer = await asyncio.wait_for(reader.read(4096), 3.0)
            assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
            writer.close()


async def test_a_page_listed_by_name_reads_the_admin_routes_also_beside_a_wildcard(engine):
    raw = gateway_config([engine.url], server={"cors_allowed_origins": ["*", "https://ops.example"]})
    async with running_gateway(raw) as gateway, aiohttp.ClientSession() as session:
        async with session.get(gateway.base_url + "/admin/engines", headers={"Origin": "https://ops.example"}) as r:
            assert r.status == 200 and r.headers["Access-Control-Allow-Origin"] == "https://ops.example"
        async with session.get(gateway.base_url + "/v1/models", headers={"Origin": "https://any.example"}) as r:
            assert r.status == 200 and r.headers["Access-Control-Allow-Origin"] == "*"


async def test_a_request_that_is_no_http_is_one_line_in_the_log_not_a_traceback(gw, caplog):
    """aiohttp logged each unparsable request at ERROR with a whole traceback: anyone could fill the log."""
    import logging

    host, port = gw.base_url.removeprefix("http://").rsplit(":", 1)

    async def send_unparsable() -> None:
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Bad: a\x01b\r\nContent-Length: 2\r\n\r\n{}")
        assert (await reader.read(100)).startswith(b"HTTP/1.0 400")
        writer.close()
        await asyncio.sleep(0.1)

    caplog.set_level(logging.INFO, logger="aiohttp.server")
    await send_unparsable()
    records = [r for r in caplog.records if r.name == "aiohttp.server"]
    assert len(records) == 1 and records[0].levelno == logging.INFO and records[0].exc_info is None
    assert "answered 400" in records[0].getMessage() and "Invalid header value char" in records[0].getMessage()
    caplog.clear()
    server_log = logging.getLogger("aiohttp.server")
    server_log.setLevel(logging.WARNING)  # --log-level WARNING (the handler takes INFO): not even that line
    await send_unparsable()
    server_log.setLevel(logging.NOTSET)
    assert not [r for r in caplog.records if r.name == "aiohttp.server"]


def test_lines_for_unparsable_requests_are_rate_limited_and_count_what_they_left_out(monkeypatch):
    """One INFO line per unparsable request let any client write thousands of lines a second (3,000 in 2.4 s):
    after a burst, one a second, the next saying how many were left out."""
    import logging

    from aiohttp.http_exceptions import BadHttpMessage

    from gateway import listen

    now = [100.0]
    monkeypatch.setattr(listen, "BAD_REQUEST_LINES_BURST", 3)
    lines = listen._OneLineForBadRequests(clock=lambda: now[0])
    monkeypatch.setattr(logging.getLogger("aiohttp.server"), "level", logging.INFO)

    def logged() -> str | None:
        error = BadHttpMessage("Invalid header value char")
        record = logging.LogRecord("aiohttp.server", logging.ERROR, __file__, 1, "Error handling request from %s",
                                   ("127.0.0.1",), (type(error), error, None))
        return record.getMessage() if lines.filter(record) else None

    assert all(logged() for _ in range(3))
    assert [logged() for _ in range(50)] == [None] * 50
    now[0] += 1.0
    message = logged()
    assert message.startswith("Error handling request from 127.0.0.1 (answered 400): Invalid header value char")
    assert message.endswith("(and 50 like it since the last such line, left out)") and logged() is None
    now[0] += 10.0  # the burst refills, up to its size
    refilled = [logged() for _ in range(4)]
    assert refilled[0].endswith("(and 1 like it since the last such line, left out)")
    assert all(refilled[:3]) and refilled[3] is None and "left out" not in refilled[1]
    other = logging.LogRecord("aiohttp.server", logging.ERROR, __file__, 1, "another error", (), None)
    assert lines.filter(other) and other.levelno == logging.ERROR  # other records pass as they are


async def _raw_exchange(gw, raw: bytes) -> bytes:
    """Send raw bytes, read until the gateway closes the connection (or 3 s pass)."""
    host, port = gw.base_url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(raw)
    await writer.drain()
    answer = b""
    try:
        while chunk := await asyncio.wait_for(reader.read(65536), 3.0):
            answer += chunk
    except TimeoutError:
        answer += b"<still open>"
    writer.close()
    return answer


@pytest.mark.parametrize("path", [CHAT, "/v1/completions", "/v1/images/generations"])
@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", "application/vnd.x+json"])
async def test_a_body_not_declared_json_is_refused_as_vllm_refuses_it(gw, engine, path, content_type):
    """vLLM answers 400 to a body not declared application/json; the gateway ran it. That also let any web page
    run generations past the CORS origin list: a page's text/plain or form POST is sent without a preflight."""
    headers = {"Origin": "https://evil.example"} | ({"Content-Type": content_type} if content_type else {})
    async with aiohttp.ClientSession(skip_auto_headers=("Content-Type",)) as session:
        async with session.post(gw.base_url + path, data=orjson.dumps(GOOD), headers=headers) as r:
            status, body = r.status, await r.json(content_type=None)
    assert status == 400 and body["error"]["code"] == "unsupported_media_type"
    assert_openai_error(body)
    assert "application/json" in body["error"]["message"] and engine.hits == 0


@pytest.mark.parametrize("content_type", ["application/json; charset=utf-8", "Application/JSON", "application/json;"])
async def test_json_with_parameters_or_in_capitals_is_json(gw, engine, content_type):
    status, _, _ = await post(gw.base_url + CHAT, orjson.dumps(GOOD), {"Content-Type": content_type})
    assert status == 200


async def test_a_body_in_no_content_encoding_it_names_is_a_400_not_a_500(gw, engine, caplog):
    """A body labelled gzip (or deflate) that is not: aiohttp's payload error fell to the gateway's catch-all (500,
    a traceback) and aiohttp logged a second one while draining the connection, which it then dropped."""
    import gzip
    import logging

    caplog.set_level(logging.INFO)
    for encoding in (b"gzip", b"deflate"):
        body = orjson.dumps(GOOD)
        answer = await _raw_exchange(gw, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                                         b"Content-Type: application/json\r\nContent-Encoding: " + encoding +
                                     b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        head, _, payload = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400") and b"Connection: close" in head, answer[:300]
        assert orjson.loads(payload)["error"]["code"] == "invalid_request_body"
    assert engine.hits == 0 and gw.inflight == 0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]
    status, _, _ = await post(gw.base_url + CHAT, gzip.compress(orjson.dumps(GOOD)),
                              {"Content-Type": "application/json", "Content-Encoding": "gzip"})
    assert status == 200  # a body that is in the encoding it names is read as before


async def test_a_header_the_parser_refuses_is_logged_without_its_bytes(gw, caplog):
    """The one log line of an unparsable request quoted the raw header line it stopped at: a client's
    ``Authorization: Bearer <key>`` with one stray byte went to the log whole."""
    import logging

    caplog.set_level(logging.INFO, logger="aiohttp.server")
    answer = await _raw_exchange(gw, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                                     b"Authorization: Bearer sk-secret-key\x01\r\nContent-Length: 2\r\n\r\n{}")
    assert answer.startswith(b"HTTP/1.0 400")
    lines = [r.getMessage() for r in caplog.records if r.name == "aiohttp.server"]
    assert len(lines) == 1 and "Invalid header value char" in lines[0]
    assert "sk-secret-key" not in lines[0] and "Bearer" not in lines[0]
    caplog.clear()
    await _raw_exchange(gw, b"G\x01T /v1/models?key=sk-secret-key HTTP/1.1\r\nHost: x\r\n\r\n")  # no method
    lines = [r.getMessage() for r in caplog.records if r.name == "aiohttp.server"]
    assert not [line for line in lines if "sk-secret-key" in line]


async def test_an_unknown_route_is_named_as_sent(gw, engine):
    """The router matches the path as sent: the 404 for "/v1/chat%2Fcompletions" named "/v1/chat/completions",
    a route the gateway serves."""
    status, body, _ = await post(gw.base_url + "/v1/chat%2Fcompletions", orjson.dumps(GOOD))
    assert status == 404 and "/v1/chat%2Fcompletions" in body["error"]["message"]
