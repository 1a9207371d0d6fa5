"""The gateway in front of a REAL vLLM engine (CPU build), driven by the official ``openai`` SDK.

One engine per model per test run: the tests of a model live in one class and share its class-scoped stack
(see conftest.py). tiny-llama has random weights, so its tests control lengths with ``ignore_eos`` and
``max_tokens`` instead of looking at text; SmolLM2-135M-Instruct checks that real answers come through.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator

import openai
import pytest

pytestmark = pytest.mark.real_vllm

MESSAGES = [{"role": "user", "content": "Write a long story about a gateway that schedules requests."}]


def _first_text(record: dict) -> str:
    """A trace record's first message's text: "" where it has none (the stage also sends messages without content
    or with parts, and online learning records every one)."""
    content = record["request"]["messages"][0].get("content")
    return content if isinstance(content, str) else ""


EXACT = {"ignore_eos": True}


def _poll(predicate, timeout: float, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


async def _apoll(predicate, timeout: float, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = await asyncio.to_thread(predicate)
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(interval)


async def _chat_answer(session, url: str, body: dict):
    """POST a chat body (200 expected): its JSON, or a stream's chunks (its data events but [DONE])."""
    import orjson

    async with session.post(url + "/v1/chat/completions", json=body) as r:
        assert r.status == 200, await r.text()
        raw = await r.read()
    if not body.get("stream"):
        return orjson.loads(raw)
    return [orjson.loads(e[len(b"data: "):]) for e in raw.split(b"\n\n") if e.startswith(b"data: {")]


def _shape_runs(chunks: list) -> list:
    """The shapes of a stream's chunks, a run of like chunks counted once (engines may cut the same tokens into a
    different number of chunks)."""
    shapes: list = []
    for chunk in chunks:
        if not shapes or shapes[-1] != _shape(chunk):
            shapes.append(_shape(chunk))
    return shapes


def _token_maps_counted(value):
    """An answer with its maps keyed by tokens or token ids (which differ from engine to engine) made comparable: a
    legacy completion's ``top_logprobs`` ({token: logprob} per token) by their sizes, ``prompt_logprobs`` by its first
    entry and the keys of its second's values."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if key == "prompt_logprobs" and isinstance(item, list):
                out[key] = [item[0], sorted(next(iter(item[1].values())))]
            elif key == "top_logprobs" and "text_offset" in value:
                out[key] = [None if top is None else len(top) for top in item]
            else:
                out[key] = _token_maps_counted(item)
        return out
    if isinstance(value, list):
        return [_token_maps_counted(item) for item in value]
    return value


def _shape(value):
    """Every key of a JSON value and the JSON type of every leaf (the first element of a list stands for the rest):
    what two engines' answers to the same request must share, whatever the generated text."""
    if isinstance(value, dict):
        return {key: _shape(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_shape(item) for item in value[:1]]
    return type(value).__name__


def _answered(status: int, text: str, stream: bool) -> tuple[int, str]:
    """An answer as the engine-to-engine comparisons see it: served (the texts differ, but a stream ends), or the
    error exactly: the body, or a stream's error event after any chunks (pydantic's own errors name its version's
    documentation, each engine's pydantic: normalised)."""
    import re

    if status == 200:
        if not stream:
            return status, "served"
        errors = [event for event in text.split("\n\n") if event.startswith('data: {"error"')]
        if errors:
            return status, errors[0]
        return status, "served" if text.rstrip().endswith("data: [DONE]") else text
    return status, re.sub(r"errors\.pydantic\.dev/[0-9.]+/", "errors.pydantic.dev/V/", text)


async def _both_answers(session, stack, sim, path: str, body: dict,
                        headers: dict | None = None) -> list[tuple[int, str]]:
    """One body sent to ``stack``'s real vLLM and to the simulated engine beside it, each answer as
    :func:`_answered` sees it. Sent as ``json.dumps`` writes it, so that lone surrogates and integers past 64 bits
    go as they are."""
    import json

    answers = []
    for base in (stack.engine.url, sim.url):
        async with session.post(base + path, data=json.dumps(body).encode(),
                                headers={"Content-Type": "application/json", **(headers or {})}) as r:
            answers.append(_answered(r.status, await r.text(), bool(body.get("stream"))))
    return answers


@contextlib.asynccontextmanager
async def _sim_beside(stack, **options) -> AsyncIterator:
    """A simulated engine beside ``stack``'s real one (its model and context, and ``options``), for the
    engine-to-engine comparisons; stopped after."""
    from backends.sim import SimEngineOptions, start_sim_engines

    [sim] = await start_sim_engines(1, SimEngineOptions(model=stack.model, max_model_len=stack.max_model_len,
                                                        **options))
    try:
        yield sim
    finally:
        await sim.stop()


_CALL = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
_IMAGE = {"type": "image_url", "image_url": {"url": "http://127.0.0.1:1/x.png"}}
# chat messages, the malformed and the unusual, that a differential audit sent to vLLM 0.32 and the simulated
# engine: each kind of error its request model, validators, message parser and chat template give, and their order
MESSAGE_CASES = [
    # not a list of messages; messages that are not objects; an empty conversation
    5, None, True, 2.5, "x", {"role": "user", "content": "hi"}, [], [5], [None], [[{"role": "user", "content": "hi"}]],
    # the union of message types: every member's errors, in order (more than ten: "...and N more errors")
    [{"content": "hi"}], [{"role": 5, "content": "hi"}], [{"role": "user", "content": 5}],
    [{"role": "user", "content": None}], [{"role": "user", "content": "hi", "name": 5}],
    [{"role": "nobody", "content": 5}], [{"role": "x" * 300, "content": 5}],
    [{"role": "user", "content": "a"}, {"role": "user", "content": 5}, {"content": "b"}],
    [{"role": "assistant", "content": None, "function_call": {"name": "f"}}],
    [{"role": "assistant", "content": None, "audio": {"id": 5}}], [{"role": "tool", "content": "x", "tool_call_id": 5}],
    [{"author": {"role": "nobody"}}], [{"author": {"role": "nobody"}, "content": []}],
    [{"role": {"k" * 1200: 1}, "content": "x"}],
    [{"role": "nobody", "content": [{"type": "image_embeds", "image_url": 5, "image_pil": 5, "audio_url": 5,
                                     "video_url": 5, "image_embeds": {"k" * 1200: 5}}]}],
    [{"author": {"role": "user"}, "content": []}], [{"author": {"role": "user"}, "content": [5]}],
    # what vLLM's custom message takes (any role, no content, no tool_call_id)
    [{"role": "user"}], [{"role": "function", "content": "x"}], [{"role": "tool", "content": "x"}],
    [{"role": "nobody", "content": "hi"}], [{"role": "user", "content": "hi", "name": "bob"}],
    [{"role": "user", "content": []}], [{"role": "system", "content": []}],
    [{"role": "nobody", "content": "x", "reasoning_content": 5}],
    [{"role": "nobody", "content": "x", "reasoning": "r", "reasoning_content": 5}],
    [{"role": "user", "content": "hi", "reasoning_content": 5}], [{"role": "developer", "content": "x", "tools": 5}],
    [{"role": "developer", "content": [{"type": "text", "text": "x"}], "tools": [5]}],
    # tool calls: made a list before validation, read lazily after it, functions only
    [{"role": "assistant", "tool_calls": 5}], [{"role": "assistant", "tool_calls": True}],
    [{"role": "assistant", "tool_calls": 1.5}], [{"role": "assistant", "tool_calls": "ab"}],
    [{"role": "assistant", "tool_calls": {"id": "a"}}], [{"role": "assistant", "tool_calls": [5]}],
    [{"role": "assistant", "tool_calls": [{"id": "a"}]}], [{"role": "assistant", "tool_calls": [_CALL, {"id": "b"}]}],
    [{"role": "assistant", "content": [{"type": "text", "text": "a"}], "tool_calls": [{"id": "a"}]}],
    [{"role": "assistant", "tool_calls": [{"id": "a", "type": "custom", "custom": {"input": "x", "name": "f"}}]}],
    [{"role": "assistant", "tool_calls": [{**_CALL, "function": {"name": "f", "arguments": "{"}}]}],
    [{"role": "assistant", "content": None, "tool_calls": [{**_CALL, "function": {"name": "f", "arguments": 5}}]}],
    [{"role": "assistant", "tool_calls": []}, {"role": "user", "content": "hi"}],
    [{"role": "assistant", "content": "x", "tool_calls": None}],
    [{"role": "assistant", "content": "x", "tool_calls": [_CALL]},
     {"role": "tool", "content": "r", "tool_call_id": "c1"}],
    [{"role": "nobody", "content": "x", "tool_calls": [_CALL]}],
    [{"role": "nobody", "content": "x", "tool_calls": [{"id": "a", "type": "custom", "custom": {"name": "f",
                                                                                             "input": "{}"}}]}],
    # content parts: validated as they are read (the SDK types' Iterable), then read by their type
    [{"role": "user", "content": [{"type": "text"}]}], [{"role": "user", "content": [5]}],
    [{"role": "user", "content": {"type": "text", "text": "a"}}], [{"role": "user", "content": [{"text": "y"}]}],
    [{"role": "user", "content": [{"type": "text", "text": 5}]}], [{"role": "user", "content": [{"type": "foo",
                                                                                             "text": "a"}]}],
    [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "foo"}]}],
    [{"role": "user", "content": [{"type": "text", "text": "a"}, "b"]}],
    [{"role": "user", "content": [{"type": "text", "text": "a", "uuid": "x"}]}],
    [{"role": "system", "content": [{"type": "text", "text": "x"}]}, {"role": "user", "content": [{"text": "y"}]}],
    [{"role": "system", "content": [{"type": "text", "text": "x-anthropic-billing-header: cch=1\nhello"}]}],
    [{"role": "tool", "content": [{"type": "text", "text": "a"}, {"type": "image_url"}]}],
    [{"role": "assistant", "content": [{"type": "refusal", "refusal": "no"}]}],
    [{"role": "nobody", "content": [{"type": "text"}]}], [{"role": "nobody", "content": [{"type": "foo"}]}],
    [{"role": "nobody", "content": [{"type": 5}]}], [{"role": "nobody", "content": [{"name": "x"}]}],
    [{"role": "nobody", "content": [{"uuid": "u"}]}], [{"role": "nobody", "content": [{"type": "text", "text": 5}]}],
    [{"role": "nobody", "content": [{"type": "thinking", "thinking": 5}]}],
    [{"role": "nobody", "content": ["a", {"type": "thinking", "thinking": "x"}]}],
    [{"role": "nobody", "content": [{"type": "input_text", "text": "a"}, {"type": "output_text", "text": "b"}]}],
    [{"role": "nobody", "content": [{"type": "refusal", "refusal": "no"}]}], [{"role": "nobody", "content": [
        {"type": "refusal"}]}],
    [{"role": "nobody", "content": [{"type": "tool_reference", "name": "x"}]}],
    [{"role": "nobody", "content": [{"type": "tool_reference"}]}], [{"role": "nobody", "content": [
        {"tool_reference": "x"}]}],
    [{"role": "nobody", "content": [{"type": "prompt_embeds", "data": "x"}]}],
    [{"role": "nobody", "content": [{"type": "prompt_embeds", "data": ""}]}],
    # media, which a text model refuses as the parser meets them (after the parts before them)
    [{"role": "user", "content": [_IMAGE, {"type": "text"}]}], [{"role": "user", "content": [{"type": "text"}]},
                                                              {"role": "user", "content": [_IMAGE]}],
    [{"role": "system", "content": [_IMAGE, {"type": "text"}]}],
    [{"role": "user", "content": [{"type": "text", "text": "a"}] * 3 + [{"type": "input_audio"}]}],
    [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]}],
    [{"role": "nobody", "content": [{"type": "image_url", "image_url": "http://127.0.0.1:1/x.png"}]}],
    [{"role": "nobody", "content": [{"image_url": "http://127.0.0.1:1/x.png"}]}],
    [{"role": "nobody", "content": [{"uuid": "u", "image_url": {"url": "x"}}]}],
    [{"role": "nobody", "content": [{"type": "input_image", "image_url": "x"}]}],
    [{"role": "nobody", "content": [{"type": "input_image", "detail": "auto", "image_url": "x"}]}],
    [{"role": "nobody", "content": [{"type": "image_pil", "image_pil": {"image_pil": "x"}}]}],
    [{"role": "nobody", "content": [{"type": "image_pil"}]}],
    [{"role": "nobody", "content": [{"type": "audio_url", "audio_url": {"url": "x"}}]}],
    [{"role": "nobody", "content": [{"type": "video_url", "video_url": {"url": "x"}}]}],
    [{"role": "nobody", "content": [{"type": "video_url", "video_url": "x"}]}],
    [{"role": "nobody", "content": [{"type": "image_embeds", "image_embeds": "x"}]}],
    [{"role": "nobody", "content": [{"type": "image_embeds", "image_embeds": "x", "uuid": "u"}]}],
    # a differential fuzz's finds: a system part's type logged through a cache (a list is unhashable), audio that
    # is no object (vLLM's 500), Claude Code's billing header dropped from system text, texts the tokenizer cannot
    # take (lone surrogates), paths and addresses taken out of error messages, the parts vLLM's chat serving reads
    # for a default LoRA (a string holding "type", a type that is no string: its 500), string parts' length
    [{"role": "system", "content": [{"type": ["a"]}]}], [{"role": "system", "content": [{"type": {"a": 1}}]}],
    [{"role": "user", "content": "a"}, {"role": "system", "content": ["b", {"type": ["a"]}]}],
    [{"role": "nobody", "content": [{"input_audio": 5}]}], [{"role": "nobody", "content": [{"type": "input_audio",
                                                                                           "input_audio": "x"}]}],
    [{"role": "nobody", "content": [{"input_audio": ""}]}],
    [{"role": "system", "content": [{"type": "text", "text": "x-anthropic-billing-header", "uuid": "u"}]}],
    [{"role": "system", "content": [{"type": "text", "text": "x-anthropic-billing-header: a\nrest", "uuid": "u"}]}],
    [{"role": "system", "content": ["x-anthropic-billing-header", {"type": "text", "text": 5}]}],
    [{"role": "system", "content": "x-anthropic-billing-header: a\nhello"}, {"role": "user", "content": "hi"}],
    [{"role": "user", "content": "\ud800"}], [{"role": "\ud800", "content": "x"}],
    [{"role": "user", "content": "x", "name": "\ud800"}], [{"role": "user", "content": [{"type": "text",
                                                                                         "text": "a\ud800"}]}],
    [{"role": "nobody", "content": [{"type": "/home/me/x"}]}], [{"role": "nobody", "content": [{"type": "a/b/c.png"}]}],
    [{"role": "nobody", "content": [{"type": "<object at 0xdeadbeef>"}]}],
    [{"role": "nobody", "content": [{"type": "File \"a\", line 3, in f"}]}], [{"role": "/tmp/x", "content": 5}],
    [{"role": "nobody", "content": ["my type"]}], [{"role": "nobody", "content": [{"type": None,
                                                                                  "tool_reference": "x"}]}],
    [{"role": "nobody", "content": [{"type": 5, "uuid": "u", "tool_reference": "x"}]}],
    [{"role": "user", "content": ["my type"]}], [{"role": "nobody", "content": ["hello " * 3000]}],
    [{"role": "nobody", "content": [{"type": "thinking", "thinking": "hello " * 3000}]}],
]
# ... and with other fields: which of two refusals comes first
MESSAGE_BODIES = [
    {"messages": [{"role": "user", "content": [_IMAGE]}], "max_tokens": 99999},
    {"messages": [], "max_tokens": 99999},
    {"messages": [{"role": "user", "content": "hi"}], "continue_final_message": True, "add_generation_prompt": True,
     "max_tokens": 99999},
    {"messages": [{"role": "user", "content": "\ud800"}], "continue_final_message": True},
    {"messages": [{"role": "nobody", "content": ["my type"]}], "max_tokens": 0},
    {"messages": [{"role": "nobody", "content": ["my type"]}], "n": 0},
    {"messages": [{"role": "nobody", "content": ["my type " * 3000]}]},
    {"messages": [{"role": "system", "content": [{"type": ["a"]}]}], "model": "nope"},
    {"messages": [{"role": "system", "content": [{"type": ["a"]}]}], "continue_final_message": True,
     "add_generation_prompt": True},
    {"messages": [{"role": "user", "content": "hi"}], "model": "/tmp/m"},
    # an error message that no UTF-8 holds (a lone surrogate from the request), from the route, a validator, the
    # renderer, pydantic (whose errors show a value's repr)
    {"messages": [{"role": "user", "content": "hi"}], "model": "\ud800"},
    {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function", "function": {"name": "\ud800"}}],
     "tool_choice": {"type": "function", "function": {"name": "\ud800"}}},
    {"messages": [{"role": "nobody", "content": [{"type": "\ud800"}]}]},
    {"messages": [{"role": "\ud800x", "content": 5}]}, {"messages": [{"role": "user", "content": "hi"}], "n": "\ud800"},
    {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function", "function": {"name": "f"}}],
     "tool_choice": {"type": "function", "function": {"name": "\ud800"}}},
    {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function", "function": {"name": "f"}}],
     "tool_choice": "\ud800"},
    {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function", "function": {"name": "f"}}],
     "tool_choice": {"type": "function", "function": "\ud800"}},
    {"messages": [{"role": "system", "content": "x-anthropic-billing-header: cch=\ud800\nYou help"},
                  {"role": "user", "content": "hi"}]},
]


_S = "\ud800"  # a lone surrogate: no UTF-8 holds it
# the rarer request fields, engine to engine: a valid and a malformed value of each (both endpoints where both
# have it): their types, their validators (some escape pydantic and answer alone), the request models' "before"
# validators, the serving's and the engine's checks, and what its engine client cannot encode
_CHAT_ONLY = {"reasoning_effort": ["low", "x"], "include_reasoning": [False, None],
              "documents": [[{"a": "b"}], [{"a": 1}]], "chat_template": [None, 5, "{{ messages }}"],
              "media_io_kwargs": [None, {"image": 5}, {"image": {}}], "mm_processor_kwargs": [{}, "x", {"a": 1}]}
_BOTH = {"bad_words": [["x"], "x", [1], [""], ["a", "", ""], ["a" + _S]],
         "cache_salt": ["abc", "", "a" * 129, "a/b", 5, "a" * 1025, "c" + _S],
         "include_stop_str_in_output": [True, "x"], "length_penalty": [2.0, None],
         "logprob_token_ids": [[1, 2], "x"], "mm_payload": ["none", None],
         "repetition_detection": [{"max_pattern_size": 2, "min_count": 2}, {"max_pattern_size": 5}, "x",
                                  {"max_pattern_size": -1}],
         "return_mm_kwargs": [False, "x"], "return_token_offsets": [True, "x"],
         "routed_experts_prompt_start": [0, -1], "session_id": ["s", 5, "s" + _S],
         "spaces_between_special_tokens": [False, None], "stream_interval": [3, 0, "x"],
         "structured_outputs": [{"regex": "a+"}, {}, "x", [1], {"regex": "a", "choice": ["b"]},
                                {"regex": "a", "grammar": "b"}, {"regex": 5}],
         "thinking_token_budget": [-1, 5, "x", -2, True], "use_beam_search": [False, None],
         "vllm_xargs": [{"a": [1, "x"]}, {"a": {"b": 1}}, "x", {"a": 2**70}, {"a": "b" + _S}, {_S: 1}],
         "watermarking": [True, "x"], "kv_transfer_params": [{"a": 1}, "x", {"a": 2**70}, {"a": _S}],
         "ec_transfer_params": [{"a": 1}, "x", {_S: 1}],
         "stop": ["x" + _S], "request_id": ["r" + _S]}
_NAMED = {"type": "function", "function": {"name": "f"}}
_TOOLS = [{"type": "function", "function": {"name": "f"}}]
FIELD_CASES = [(path, {name: value})
               for path, table in (("chat", _CHAT_ONLY), ("chat", _BOTH), ("completion", _BOTH))
               for name, values in table.items() for value in values] + [
    # one before-validator or check against another, and pydantic's order of several fields' errors
    ("chat", {"structured_outputs": {"regex": "a"}, "tools": _TOOLS, "tool_choice": _NAMED}),
    ("chat", {"structured_outputs": {"regex": "a"}, "tool_choice": None}),
    ("chat", {"logprob_token_ids": [1], "use_beam_search": True}),
    ("chat", {"logprob_token_ids": [1], "logprobs": True}),
    ("completion", {"logprob_token_ids": [1], "logprobs": 0}),
    ("completion", {"use_beam_search": True, "echo": True, "logprobs": 1}),
    ("completion", {"logprob_token_ids": [1], "echo": True, "max_tokens": 0, "logprobs": 1}),
    ("chat", {"thinking_token_budget": "x", "max_tokens": "y", "bad_words": "z"}),
    ("chat", {"thinking_token_budget": "x", "structured_outputs": {}}),
    ("completion", {"thinking_token_budget": "x", "structured_outputs": {}}),
    ("chat", {"cache_salt": "", "max_tokens": "x"}), ("chat", {"cache_salt": "", "top_logprobs": "x"}),
    ("completion", {"cache_salt": "", "response_format": {"type": "json_schema"}}),
    ("chat", {"chat_template": "x", "max_tokens": 99999}),
    ("chat", {"mm_processor_kwargs": {"a": 1}, "chat_template": "x"}),
    ("chat", {"media_io_kwargs": {"b": {}}, "max_tokens": 99999}),
    ("chat", {"chat_template_kwargs": {"chat_template": "x"}}),
    ("completion", {"mm_processor_kwargs": {"a": 1}, "max_tokens": 99999}),
    ("completion", {"mm_processor_kwargs": "x", "suffix": "s"}),
    ("completion", {"suffix": "s", "truncate_prompt_tokens": 5}),
    ("completion", {"suffix": "s", "prompt_embeds": "abc"}),
    ("completion", {"prompt_embeds": "abc"}), ("completion", {"prompt_embeds": 5}),
    ("completion", {"echo": True, "prompt_embeds": "abc"}),
    ("completion", {"prompt_logprobs": 1, "prompt_embeds": "abc"}),
    ("completion", {"use_beam_search": True, "n": 2}),
    ("chat", {"thinking_token_budget": 5, "logprobs": True, "top_logprobs": 50}),
    ("chat", {"bad_words": [""], "stop": [""]}), ("chat", {"stop": "x" + _S, "n": 2}),
    ("completion", {"stop": "x" + _S, "prompt": ["a", "b"]}),
    ("chat", {"ignore_eos": "x", "max_tokens": "y", "user": 5, "top_k": "k", "watermarking": "w"}),
    ("completion", {"logit_bias": "b", "top_k": "k", "prompt_logprobs": None, "session_id": 5, "echo": "e"}),
    ("chat", {"truncation_side": "m", "add_special_tokens": "a", "stream_interval": 0, "n": "n"}),
    ("completion", {"seed": "s", "suffix": 5, "priority": "p", "stop_token_ids": "s", "request_id": 5}),
    ("completion", {"n": None}), ("chat", {"priority": 2**70}), ("completion", {"priority": -2**63 - 1}),
    # beam search: SamplingParams' checks skipped, the search's own (2n logprobs, the temperature) in its generator
    ("chat", {"use_beam_search": True, "top_p": 0, "min_tokens": 5, "stop": [""]}),
    ("chat", {"use_beam_search": True, "n": 2, "temperature": 0}), ("completion", {"use_beam_search": True, "n": 11}),
    ("chat", {"use_beam_search": True, "temperature": 5}), ("completion", {"use_beam_search": True, "n": 0}),
    ("chat", {"use_beam_search": True, "stop": ["a" + _S], "thinking_token_budget": 5}),
    ("chat", {"use_beam_search": True, "request_id": "r" + _S}), ("chat", {"use_beam_search": True, "max_tokens": 0}),
    # the engine's checks of logprob_token_ids (which ask for no sample logprobs), MessagePack's integers
    ("completion", {"logprobs": 1, "logprob_token_ids": [10**6]}),
    ("chat", {"logprobs": True, "logprob_token_ids": list(range(129))}),
    ("completion", {"logprobs": 21, "logprob_token_ids": [1, 2]}), ("chat", {"top_k": 2**64}),
    ("completion", {"stream_interval": 2**64}),
    ("chat", {"repetition_detection": {"max_pattern_size": 3, "min_pattern_size": 1, "min_count": 2**64}}),
    # a named tool looked up in malformed tools, as vLLM's loop looks
    ("chat", {"tools": [{"type": "x"}], "tool_choice": _NAMED}), ("chat", {"tools": True, "tool_choice": _NAMED}),
    ("chat", {"tools": "ab", "tool_choice": _NAMED}),
    ("chat", {"tools": [{"type": "function", "function": {}}], "tool_choice": _NAMED}),
    # structural tags that need no grammar backend to refuse, and structured outputs' content checks
    ("chat", {"structured_outputs": {"structural_tag": "x"}}),
    ("completion", {"structured_outputs": {"structural_tag": ""}, "stop": 2}),
    ("chat", {"response_format": {"type": "structural_tag"}}), ("chat", {"structured_outputs": {"choice": []}}),
    ("completion", {"structured_outputs": {"json_object": False}}),
    ("chat", {"structured_outputs": {"regex": "a\u0000"}}), ("chat", {"structured_outputs": {"grammar": " "}}),
    # a named tool choice's own type (pydantic's union, among the fields' errors); response_format merged into the
    # structured outputs (a schema format without its schema, two kinds of constraint, json_object overridden);
    # a legacy completion's prompt errors among the other fields'
    ("chat", {"tools": _TOOLS, "tool_choice": {"type": "x", "function": {"name": "f"}}, "n": "x", "user": 1}),
    ("chat", {"response_format": {"type": "json_schema", "json_schema": {"name": "a"}}}),
    ("completion", {"structured_outputs": {"choice": ["a"]}, "response_format": {"type": "json_object"}}),
    ("chat", {"structured_outputs": {"json_object": False}, "response_format": {"type": "json_object"}}),
    ("completion", {"prompt": 1, "user": 1}), ("completion", {"prompt": [[1, -5]], "max_tokens": "x", "n": None}),
]


class TestTinyLlama:
    """tiny-llama: engine started with ``--scheduling-policy priority --max-num-seqs 4``."""

    def test_models_list(self, tiny_stack) -> None:
        ids = [model.id for model in tiny_stack.client().models.list()]
        assert tiny_stack.model in ids

    def test_chat_exact_usage(self, tiny_stack) -> None:
        client = tiny_stack.client()
        response = client.chat.completions.create(
            model=tiny_stack.model, messages=MESSAGES, max_tokens=32,
            extra_body={"ignore_eos": True, "min_tokens": 8})
        assert response.model == tiny_stack.model
        assert response.choices[0].finish_reason == "length"
        assert isinstance(response.choices[0].message.content, str)
        usage = response.usage
        assert usage is not None
        assert usage.completion_tokens == 32
        assert usage.prompt_tokens > 0
        assert usage.total_tokens == usage.prompt_tokens + 32

    def test_a_body_request_id_names_the_answer(self, tiny_stack) -> None:
        """vLLM names its answer by the body's ``request_id`` where no X-Request-Id header names it; the gateway,
        which always sends the engine a header, sends that id in it (with its random suffix, as a header's)."""
        tiny_stack.require_gateway()
        response = tiny_stack.client().chat.completions.create(
            model=tiny_stack.model, messages=MESSAGES, max_tokens=1, extra_body={"request_id": "mine-2"})
        assert response.id.startswith("chatcmpl-mine-2~"), response.id

    def test_min_tokens_respected(self, tiny_stack) -> None:
        # min_tokens makes vLLM ignore EOS and stop strings until that many tokens exist.
        response = tiny_stack.client().chat.completions.create(
            model=tiny_stack.model, messages=MESSAGES, max_tokens=40, extra_body={"min_tokens": 24})
        assert response.usage is not None
        assert 24 <= response.usage.completion_tokens <= 40

    def test_stream_with_include_usage(self, tiny_stack) -> None:
        stream = tiny_stack.client().chat.completions.create(
            model=tiny_stack.model, messages=MESSAGES, max_tokens=24, stream=True,
            stream_options={"include_usage": True}, extra_body=EXACT)
        chunks = list(stream)
        assert len(chunks) >= 2
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert finish == ["length"]
        final = chunks[-1]
        assert final.choices == [], "the usage chunk must come last and carry no choices"
        assert final.usage is not None and final.usage.completion_tokens == 24
        assert final.usage.total_tokens == final.usage.prompt_tokens + 24
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text, "streamed no content"

    def test_stream_without_include_usage_has_no_usage_chunk(self, tiny_stack) -> None:
        stream = tiny_stack.client().chat.completions.create(
            model=tiny_stack.model, messages=MESSAGES, max_tokens=16, stream=True, extra_body=EXACT)
        chunks = list(stream)
        assert chunks
        for chunk in chunks:
            assert chunk.usage is None, f"usage leaked to a client that did not ask for it: {chunk}"
            assert chunk.choices, f"usage-only (empty choices) chunk reached the client: {chunk}"
        assert chunks[-1].choices[0].finish_reason == "length"
        # vLLM stamps its fingerprint on the answer's last chunk for a client that did not ask for usage (on the
        # usage chunk, which the gateway asked for and dropped, otherwise): the client gets it where vLLM puts it
        whole = tiny_stack.client().chat.completions.create(model=tiny_stack.model, messages=MESSAGES, max_tokens=1)
        assert whole.system_fingerprint and chunks[-1].system_fingerprint == whole.system_fingerprint
        assert all(chunk.system_fingerprint is None for chunk in chunks[:-1])

    def test_continuous_usage_stats_come_only_with_include_usage(self, tiny_stack) -> None:
        client = tiny_stack.client()
        chunks = list(client.chat.completions.create(
            model=tiny_stack.model, messages=MESSAGES, max_tokens=12, stream=True, extra_body=EXACT,
            stream_options={"include_usage": True, "continuous_usage_stats": True}))
        *content, final = chunks
        assert final.choices == [] and final.usage.completion_tokens == 12
        running = [c.usage.completion_tokens for c in content]
        assert running[0] == 0 and running == sorted(running) and running[-1] == 12
        for options in ({"include_usage": False, "continuous_usage_stats": True}, {"continuous_usage_stats": True}):
            chunks = list(client.chat.completions.create(
                model=tiny_stack.model, messages=MESSAGES, max_tokens=12, stream=True, extra_body=EXACT,
                stream_options=options))
            assert chunks and all(c.usage is None and c.choices for c in chunks), options

    async def test_async_concurrent_streams(self, tiny_stack) -> None:
        client = tiny_stack.async_client()

        async def one(n: int) -> int:
            stream = await client.chat.completions.create(
                model=tiny_stack.model, messages=MESSAGES, max_tokens=n, stream=True,
                stream_options={"include_usage": True}, extra_body=EXACT)
            usage = None
            async for chunk in stream:
                if chunk.usage is not None:
                    usage = chunk.usage
            assert usage is not None
            return usage.completion_tokens

        try:
            assert await asyncio.gather(*(one(8 + i) for i in range(6))) == [8 + i for i in range(6)]
        finally:
            await client.close()

    async def test_the_sims_answers_to_bad_requests_are_this_engines(self, tiny_stack) -> None:
        """A differential check of the simulated engine against this real vLLM, engine to engine (no gateway):
        the same bad requests get the same status and the same error body (a stream refused in the engine: the
        same events), and legacy completions without max_tokens the same length."""
        import aiohttp
        import orjson

        model, chat = tiny_stack.model, [{"role": "user", "content": "hi"}]
        vocab = tiny_stack.vocab_size
        tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
        named = {"type": "function", "function": {"name": "f"}}
        cases = [
            ("/v1/chat/completions", {"model": "nope", "messages": chat}),
            ("/v1/chat/completions", {"model": model, "messages": chat, "stream_options": {"include_usage": True}}),
            ("/v1/completions", {"model": model, "prompt": ""}),
            ("/v1/chat/completions", {"model": model, "messages": chat, "max_tokens": "ten"}),
            ("/v1/chat/completions", {"model": model, "messages": chat,
                                      "max_tokens": tiny_stack.max_model_len + 1}),
            ("/v1/chat/completions", {"model": model, "messages": chat, "n": 0}),
            ("/v1/chat/completions", {"model": model, "messages": chat, "n": 2, "temperature": 0}),
            ("/v1/completions", {"model": model, "prompt": "once", "n": 20000}),
            # sampling parameters: pydantic's lax types, then SamplingParams' ranges in vLLM's order
            ("/v1/chat/completions", {"model": model, "messages": chat, "temperature": "hot"}),
            # pydantic's lax mode refuses digits that are not ASCII, fractions, words and big whole floats
            ("/v1/chat/completions", {"model": model, "messages": chat, "max_tokens": "\u0664"}),
            ("/v1/chat/completions", {"model": model, "messages": chat, "temperature": "\uff11"}),
            ("/v1/chat/completions", {"model": model, "messages": chat, "n": "2.5"}),
            ("/v1/chat/completions", {"model": model, "messages": chat, "stream": "maybe"}),
            ("/v1/chat/completions", {"model": model, "messages": chat, "ignore_eos": 1e19}),
            ("/v1/chat/completions", {"model": model, "messages": chat, "temperature": -1}),
            ("/v1/chat/completions", {"model": model, "messages": chat, "temperature": 3, "top_p": 0}),
            ("/v1/chat/completions", {"model": model, "messages": chat, "top_p": 0, "presence_penalty": 5}),
            ("/v1/chat/completions", {"model": model, "messages": chat, "top_k": -5}),
            ("/v1/chat/completions", {"model": model, "messages": chat, "max_tokens": 5, "min_tokens": 10}),
            ("/v1/chat/completions", {"model": model, "messages": chat, "stop": 5}),
            ("/v1/chat/completions", {"model": model, "messages": chat, "stop": [""]}),
            ("/v1/chat/completions", {"model": model, "messages": chat, "seed": "abc"}),
            ("/v1/chat/completions", {"model": model, "messages": chat, "response_format": 5}),
            ("/v1/chat/completions", {"model": model, "messages": chat, "request_id": 5}),
            # the chat request's validators, last-defined first
            ("/v1/chat/completions", {"model": model, "messages": chat, "tool_choice": "required",
                                      "top_logprobs": 3}),
            ("/v1/chat/completions", {"model": model, "messages": chat, "top_logprobs": 3,
                                      "stream_options": {"include_usage": True}}),
            ("/v1/completions", {"model": model, "prompt": [3, -2, -4]}),
            ("/v1/completions", {"model": model, "prompt": "once", "top_p": 1.5}),
            # the context: a prompt alone longer (token ids are counted whole), a prompt that fills it
            ("/v1/completions", {"model": model, "prompt": [5] * (tiny_stack.max_model_len + 4)}),
            ("/v1/completions", {"model": model, "prompt": [5] * tiny_stack.max_model_len}),
            # the default server has no tool parser: every tool choice but "none" is refused, "auto" by default
            ("/v1/chat/completions", {"model": model, "messages": chat, "tools": tools}),
            ("/v1/chat/completions", {"model": model, "messages": chat, "tools": tools, "tool_choice": "auto",
                                      "max_tokens": tiny_stack.max_model_len + 1}),
            ("/v1/chat/completions", {"model": model, "messages": chat, "tools": tools, "tool_choice": "required"}),
            ("/v1/chat/completions", {"model": model, "messages": chat, "tools": tools, "tool_choice": named}),
            ("/v1/chat/completions", {"model": model, "messages": chat, "tools": tools,
                                      "tool_choice": {"type": "function", "function": {"name": "g"}}}),
            ("/v1/chat/completions", {"model": model, "messages": chat, "tools": tools,
                                      "tool_choice": {"type": "function", "function": {}}}),
            # logprobs beyond max_logprobs (20; -1 is the vocabulary), after SamplingParams' own checks
            ("/v1/chat/completions", {"model": model, "messages": chat, "logprobs": True, "top_logprobs": 21}),
            ("/v1/chat/completions", {"model": model, "messages": chat, "logprobs": True, "top_logprobs": -1}),
            ("/v1/chat/completions", {"model": model, "messages": chat, "logprobs": True, "top_logprobs": 21.5}),
            ("/v1/chat/completions", {"model": model, "messages": chat, "prompt_logprobs": 21,
                                      "logit_bias": {str(vocab): 1}}),
            ("/v1/completions", {"model": model, "prompt": "once", "logprobs": 21}),
            ("/v1/completions", {"model": model, "prompt": "once", "logprobs": -1, "prompt_logprobs": 3}),
            ("/v1/completions", {"model": model, "prompt": "once", "logprobs": -2}),
            ("/v1/completions", {"model": model, "prompt": "once", "logprobs": "x"}),
            ("/v1/completions", {"model": model, "prompt": "", "stream_options": {"include_usage": True}}),
            # token ids outside the vocabulary
            ("/v1/chat/completions", {"model": model, "messages": chat, "logit_bias": {str(vocab): 1, "05": 1,
                                                                                     " -1 ": 2}}),
            ("/v1/chat/completions", {"model": model, "messages": chat, "logit_bias": {"abc": 1}, "top_p": 0}),
            ("/v1/chat/completions", {"model": model, "messages": chat, "logit_bias": {"5": None}}),
            # an error's text is cut at 1000 characters (its loc holds the object's key)
            ("/v1/chat/completions", {"model": model, "messages": chat, "logit_bias": {"k" * 1200: "x"}}),
            ("/v1/completions", {"model": model, "prompt": "once", "stop_token_ids": [vocab, -1],
                                 "allowed_token_ids": []}),
            ("/v1/completions", {"model": model, "prompt": "once", "allowed_token_ids": []}),
            ("/v1/completions", {"model": model, "prompt": "once", "allowed_token_ids": [1, vocab + 5]}),
            ("/v1/completions", {"model": model, "prompt": "once", "allowed_token_ids": [1.5]}),
            # a whole float past an int64 is pydantic's int_parsing_size, not an id outside the vocabulary
            ("/v1/completions", {"model": model, "prompt": "once", "stop_token_ids": [1e20], "seed": 1e19}),
            ("/v1/completions", {"model": model, "prompt": [1, 1e20]}),
            ("/v1/chat/completions", {"model": model, "messages": chat, "max_tokens": -1e20}),
            # ... and an integer literal past it stays an integer (its own range checks, the vocabulary)
            ("/v1/completions", {"model": model, "prompt": "once", "stop_token_ids": [10 ** 20], "seed": 2 ** 70}),
            ("/v1/completions", {"model": model, "prompt": "once", "stop_token_ids": [-(10 ** 20)]}),
            ("/v1/completions", {"model": model, "prompt": [[1, 10 ** 20]]}),
            ("/v1/completions", {"model": model, "prompt": [1, vocab + 7, vocab]}),
            ("/v1/completions", {"model": model, "prompt": [[1, vocab]], "logit_bias": {"-3": 1}}),
            ("/v1/completions", {"model": model, "prompt": [[]]}),  # an empty prompt, before the ids
            ("/v1/completions", {"model": model, "prompt": [[1], []]}),
            # ... which a stream learns from its one event, after its 200
            ("/v1/chat/completions", {"model": model, "messages": chat, "logprobs": True, "top_logprobs": 21,
                                      "stream": True, "n": 2}),
            ("/v1/completions", {"model": model, "prompt": [1, vocab], "stream": True,
                                 "stream_options": {"include_usage": True}}),
            ("/v1/completions", {"model": model, "prompt": [[]], "stream": True}),
            # the prompt union: nested token ids with a negative one, lists no member takes
            ("/v1/completions", {"model": model, "prompt": [[1, -5]]}),
            ("/v1/completions", {"model": model, "prompt": [[1, 5], [2, -1]]}),
            ("/v1/completions", {"model": model, "prompt": [[1, -5], 3]}),
            ("/v1/completions", {"model": model, "prompt": ["a", [1]]}),
            ("/v1/completions", {"model": model, "prompt": [[1, "x"], [2.5]]}),
            ("/v1/completions", {"model": model, "prompt": ["x"] * 1025}),
            # a batch is checked prompt by prompt, the first that fails answering (where token ids fail in more
            # than one prompt, vLLM answers any one's error, so these cases have one)
            ("/v1/completions", {"model": model, "prompt": [[5] * (tiny_stack.max_model_len + 3), [1],
                                                            [5] * (tiny_stack.max_model_len + 5)]}),
            ("/v1/completions", {"model": model, "prompt": ["a", "b" * 9000, "c" * 12000]}),
            ("/v1/completions", {"model": model, "prompt": ["a", "b"], "max_tokens": tiny_stack.max_model_len + 1}),
            ("/v1/completions", {"model": model, "prompt": [[1, 2], [5] * tiny_stack.max_model_len]}),
            ("/v1/completions", {"model": model, "prompt": [[1, 2], [5] * (tiny_stack.max_model_len - 2)],
                                 "min_tokens": 5, "max_tokens": 10}),
            ("/v1/completions", {"model": model, "prompt": [[1, 2], [1, vocab + 3], [7]]}),
            ("/v1/completions", {"model": model, "prompt": [[1, 2], [1, vocab + 3]], "stream": True, "n": 2}),
            ("/v1/completions", {"model": model, "prompt": ["a", "b"], "logprobs": 21}),
            # echo is read (max_tokens 0 with it is served: the prompt back), and without it 0 is refused
            ("/v1/completions", {"model": model, "prompt": "once", "echo": "maybe"}),
            ("/v1/completions", {"model": model, "prompt": "once", "max_tokens": 0, "echo": False}),
            # fields the sim did not read (a differential audit): their types, vLLM's models of tools and
            # response formats (pydantic's errors, in its order), stop's length, the renderer's refusals
            *[("/v1/chat/completions", {"model": model, "messages": chat, **fields}) for fields in (
                {"user": 5}, {"skip_special_tokens": "x"}, {"parallel_tool_calls": "x"}, {"echo": "x"},
                {"add_generation_prompt": "x"}, {"chat_template_kwargs": "x"}, {"continue_final_message": True},
                {"continue_final_message": True, "add_generation_prompt": True}, {"stop": ["a", "b", "c", "d", "e"]},
                {"response_format": {"type": "foo"}}, {"response_format": {}}, {"response_format": {"type": 5}},
                {"response_format": {"type": "json_schema"}}, {"response_format": {"type": "json_schema",
                                                                                   "json_schema": "x"}},
                {"tools": {}}, {"tools": [5]}, {"tools": [{"type": "function"}]},
                {"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]},
                {"stream": True, "stream_options": "x"})],
            # media sent to this text model (well-formed parts; the address is never fetched)
            *[("/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": [
                {"type": "text", "text": "what is this?"}, part]}]}) for part in (
                {"type": "image_url", "image_url": {"url": "http://127.0.0.1:1/x.png"}},
                {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
                {"type": "audio_url", "audio_url": {"url": "http://127.0.0.1:1/x.wav"}},
                {"type": "video_url", "video_url": {"url": "http://127.0.0.1:1/x.mp4"}})],
            *[("/v1/completions", {"model": model, "prompt": "once", **fields}) for fields in (
                {"suffix": "x"}, {"suffix": 5}, {"suffix": "x", "echo": True}, {"suffix": "x", "prompt": [1, 2]},
                {"suffix": "x", "prompt": []}, {"prompt": []}, {"user": 5}, {"add_special_tokens": "x"},
                {"response_format": {}}, {"prompt": 5}, {"prompt": {"a": 1}}, {"prompt": [1, [2]]},
                {"prompt": [[1.5, "x"]]}, {"prompt": [None]})],
            # truncate_prompt_tokens: its type and range, more than the context, a prompt truncated to nothing,
            # the ids kept (the last ten, vLLM's default side, hold one out of the vocabulary, the first ten not)
            *[("/v1/completions", {"model": model, "prompt": [1] * 20 + [vocab + 3], "max_tokens": 3, **fields})
              for fields in ({"truncate_prompt_tokens": -2}, {"truncate_prompt_tokens": "x"},
                             {"truncate_prompt_tokens": tiny_stack.max_model_len + 1}, {"truncation_side": "middle"},
                             {"truncate_prompt_tokens": 0}, {"truncate_prompt_tokens": 0, "stream": True},
                             {"truncate_prompt_tokens": 10},
                             {"truncate_prompt_tokens": 10, "truncation_side": "left"})],
            ("/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": "word " * 3000}],
                                      "truncate_prompt_tokens": -1}),
        ]
        async with _sim_beside(tiny_stack, vocab_size=vocab, tool_calling=False) as sim:
            async with aiohttp.ClientSession() as session:
                async def answer(base: str, path: str, body: dict) -> tuple[int, dict | str]:
                    async with session.post(base + path, json=body) as r:
                        if r.content_type == "text/event-stream":
                            return r.status, await r.text()
                        return r.status, await r.json()

                for path, body in cases:
                    real, simulated = await answer(tiny_stack.engine.url, path, body), await answer(sim.url, path,
                                                                                                     body)
                    assert simulated == real, (path, body)
                body = {"model": model, "prompt": "once", "ignore_eos": True}
                real, simulated = await answer(tiny_stack.engine.url, "/v1/completions", body), await answer(
                    sim.url, "/v1/completions", body)
                assert real[1]["usage"]["completion_tokens"] == simulated[1]["usage"]["completion_tokens"] == 16
                body = {"model": model, "prompt": "once", "max_tokens": 0, "echo": True}
                real, simulated = await answer(tiny_stack.engine.url, "/v1/completions", body), await answer(
                    sim.url, "/v1/completions", body)
                assert real[1]["usage"]["completion_tokens"] == simulated[1]["usage"]["completion_tokens"] == 1
                # a max_tokens the context cannot hold after the prompt is lowered to the room left, not refused
                body = {"model": model, "prompt": [5] * (tiny_stack.max_model_len - 6), "max_tokens": 50,
                        "ignore_eos": True}
                real, simulated = await answer(tiny_stack.engine.url, "/v1/completions", body), await answer(
                    sim.url, "/v1/completions", body)
                assert real[0] == simulated[0] == 200, (real, simulated)
                for _, answered in (real, simulated):
                    assert answered["usage"]["completion_tokens"] == 6
                    assert answered["choices"][0]["finish_reason"] == "length"
                # truncate_prompt_tokens keeps that many of each prompt's tokens (-1: the context, less one for
                # the output) before the prompt's length is checked: a prompt longer than the context is served
                long_chat = [{"role": "user", "content": "word " * 3000}]
                for path, fields, prompt_tokens in (
                        ("/v1/completions", {"prompt": [5] * 3000, "truncate_prompt_tokens": 100}, 100),
                        ("/v1/completions", {"prompt": [5] * 3000, "truncate_prompt_tokens": -1},
                         tiny_stack.max_model_len - 1),
                        ("/v1/completions", {"prompt": [[5] * 3000, [6] * 5], "truncate_prompt_tokens": 10}, 15),
                        ("/v1/completions", {"prompt": [1] * 20 + [vocab + 3], "truncate_prompt_tokens": 10,
                                             "truncation_side": "right"}, 10),
                        ("/v1/chat/completions", {"messages": long_chat, "truncate_prompt_tokens": 100}, 100)):
                    body = {"model": model, "max_tokens": 3, "ignore_eos": True, **fields}
                    real, simulated = await answer(tiny_stack.engine.url, path, body), await answer(sim.url, path,
                                                                                                     body)
                    assert real[0] == simulated[0] == 200, (fields, real, simulated)
                    assert real[1]["usage"]["prompt_tokens"] == simulated[1]["usage"]["prompt_tokens"] == prompt_tokens
                # without a generation prompt the answer continues the last message: its role is that message's
                for stream in (False, True):
                    body = {"model": model, "messages": chat, "max_tokens": 2, "add_generation_prompt": False,
                            "stream": stream}
                    roles = []
                    for base in (tiny_stack.engine.url, sim.url):
                        status, answered = await answer(base, "/v1/chat/completions", body)
                        assert status == 200, answered
                        roles.append(orjson.loads(answered.split("\n\n")[0][len("data: "):])["choices"][0]["delta"]
                                     ["role"] if stream else answered["choices"][0]["message"]["role"])
                    assert roles == ["user", "user"], stream
                # ids: the body's request_id, else 16 hex digits (vLLM's random_uuid)
                body = {"model": model, "messages": chat, "max_tokens": 1, "request_id": "mine-1"}
                real, simulated = await answer(tiny_stack.engine.url, "/v1/chat/completions", body), await answer(
                    sim.url, "/v1/chat/completions", body)
                assert real[1]["id"] == simulated[1]["id"] == "chatcmpl-mine-1"
                del body["request_id"]
                real, simulated = await answer(tiny_stack.engine.url, "/v1/chat/completions", body), await answer(
                    sim.url, "/v1/chat/completions", body)
                assert len(real[1]["id"]) == len(simulated[1]["id"]) == len("chatcmpl-") + 16
                # a body not declared JSON (vLLM's validate_json_request), and what still is JSON
                for path in ("/v1/chat/completions", "/v1/completions"):
                    body = orjson.dumps({"model": model, "messages": chat, "prompt": "once", "max_tokens": 1})
                    for content_type in (None, "text/plain", "application/json ; charset=utf-8",
                                         "APPLICATION/json;charset=latin-1"):
                        answers = []
                        for base in (tiny_stack.engine.url, sim.url):
                            headers = {"Content-Type": content_type} if content_type else {}
                            async with aiohttp.ClientSession(skip_auto_headers=("Content-Type",)) as plain, \
                                    plain.post(base + path, data=body, headers=headers) as r:
                                answered = await r.json()
                                answers.append((r.status, answered if r.status != 200 else None))
                        assert answers[0] == answers[1], (path, content_type, answers)
                # bodies as FastAPI reads them (json.loads of the bytes): what orjson alone would refuse, and the
                # order of its answers (a JSON body is parsed before the media type is checked)
                good = orjson.dumps({"model": model, "messages": chat, "max_tokens": 1})
                for data, content_type in (
                        (b"", "application/json"), (b"null", "application/json"), (b"  \n ", "application/json"),
                        (b"\xef\xbb\xbf" + good, "application/json"),
                        (good.decode().encode("utf-16"), "application/json"),
                        (good[:-1] + b', "x": [NaN, Infinity, -Infinity]}', "application/json"),
                        (good[:-1] + b', "user": "\\ud800"}', "application/json"),
                        (good[:-1] + b', "user": "\xff\xfe"}', "application/json"),
                        (b'{"model": tru', "application/vnd.api+json"), (b'{"model": tru', "text/plain"),
                        (good + b" x", "application/json")):
                    answers = []
                    for base in (tiny_stack.engine.url, sim.url):
                        async with aiohttp.ClientSession(skip_auto_headers=("Content-Type",)) as plain, \
                                plain.post(base + "/v1/chat/completions", data=data,
                                           headers={"Content-Type": content_type}) as r:
                            answered = await r.json()
                            answers.append((r.status, answered if r.status != 200 else None))
                    assert answers[0] == answers[1], (data[:40], content_type, answers)

    async def test_the_sims_answers_to_chat_messages_are_this_engines(self, tiny_stack) -> None:
        """Engine to engine, whole and streamed: the messages this real vLLM refuses the simulated engine refuses
        with the same status and error body, and what it serves the sim serves (:data:`MESSAGE_CASES`: the
        request model's union of message types, its validators, the message parser's reading of content parts,
        media and tool calls, the chat template's empty conversation)."""
        import aiohttp

        async with _sim_beside(tiny_stack, vocab_size=tiny_stack.vocab_size, tool_calling=False) as sim:
            # a connection each: after a 500 (its exception handler's) vLLM's server closes the connection
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
                for fields in [{"messages": messages} for messages in MESSAGE_CASES] + MESSAGE_BODIES:
                    for stream in (False, True):
                        body = {"model": tiny_stack.model, "max_tokens": 2, **fields, "stream": stream}
                        answers = await _both_answers(session, tiny_stack, sim, "/v1/chat/completions", body)
                        assert answers[0] == answers[1], (fields, stream, answers)

    async def test_the_sims_answers_to_request_fields_are_this_engines(self, tiny_stack) -> None:
        """Engine to engine, both endpoints, whole and streamed: the rarer request fields (:data:`FIELD_CASES`),
        valid and malformed, are served or refused by the simulated engine as by this real vLLM, with the same
        status and error body (a stream's error event), and several fields' errors come in this vLLM's order."""
        import aiohttp

        paths = {"chat": "/v1/chat/completions", "completion": "/v1/completions"}
        async with _sim_beside(tiny_stack, vocab_size=tiny_stack.vocab_size, tool_calling=False) as sim:
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
                for kind, fields in FIELD_CASES:
                    prompt = {"messages": [{"role": "user", "content": "hi"}]} if kind == "chat" else {"prompt": "hi"}
                    for stream in (False, True):
                        body = {"model": tiny_stack.model, "max_tokens": 2, **prompt, **fields, "stream": stream}
                        answers = await _both_answers(session, tiny_stack, sim, paths[kind], body)
                        assert answers[0] == answers[1], (kind, fields, stream, answers)
                # the headers vLLM reads for the engine: a data-parallel rank (one engine here: 0), a priority
                for headers in ({"X-data-parallel-rank": "1"}, {"X-data-parallel-rank": "x"},
                                {"X-data-parallel-rank": "-1", "X-Vllm-Priority": "x"}, {"X-Vllm-Priority": "3"},
                                {"X-Vllm-Priority": str(2**64)}):
                    for stream in (False, True):
                        body = {"model": tiny_stack.model, "max_tokens": 2, "prompt": "hi", "stream": stream}
                        answers = await _both_answers(session, tiny_stack, sim, paths["completion"], body, headers)
                        assert answers[0] == answers[1], (headers, stream, answers)

    def test_the_sims_request_fields_are_in_this_vllms_order(self, tiny_stack) -> None:
        """The request models' fields as the installed vLLM defines them, in its order (the simulated engine reports
        several fields' errors in that order, and copies the types of those in its EXTRA_FIELDS)."""
        import json
        import subprocess

        from backends.sim.request_fields import CHAT_FIELDS, COMPLETION_FIELDS, EXTRA_FIELDS

        script = ("import json\n"
                  "from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest\n"
                  "from vllm.entrypoints.openai.completion.protocol import CompletionRequest\n"
                  "print(json.dumps([list(ChatCompletionRequest.model_fields), list(CompletionRequest.model_fields)]))")
        done = subprocess.run([str(tiny_stack.python), "-c", script], capture_output=True, text=True, timeout=300,
                              check=True)
        chat, completion = json.loads(done.stdout.strip().splitlines()[-1])
        assert (tuple(chat), tuple(completion)) == (CHAT_FIELDS, COMPLETION_FIELDS)
        assert set(EXTRA_FIELDS) <= set(chat) | set(completion)

    async def test_the_sims_stream_interval_is_this_engines(self, tiny_stack) -> None:
        """``stream_interval``: a stream's chunks, engine to engine (the first token's at once, then one every so
        many tokens, the last with what is left), counted by their continuous usage."""
        import json

        import aiohttp

        async def chunks(session, base: str, path: str, body: dict) -> list:
            async with session.post(base + path, json=body) as r:
                assert r.status == 200, await r.text()
                events = [json.loads(line[len("data: "):]) for line in (await r.text()).split("\n\n")
                          if line.startswith("data: {")]
            return [(tuple((choice["index"], choice["finish_reason"]) for choice in event["choices"]),
                     event["usage"]["completion_tokens"]) for event in events]

        usage = {"include_usage": True, "continuous_usage_stats": True}
        async with _sim_beside(tiny_stack, vocab_size=tiny_stack.vocab_size, tool_calling=False) as sim:
            async with aiohttp.ClientSession() as session:
                for path, fields in (("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                               "max_tokens": 7, "stream_interval": 3}),
                                     ("/v1/completions", {"prompt": "hi", "max_tokens": 8, "stream_interval": 2}),
                                     ("/v1/completions", {"prompt": "hi", "max_tokens": 7, "stream_interval": 3,
                                                          "n": 2})):
                    body = {"model": tiny_stack.model, "stream": True, "ignore_eos": True, "stream_options": usage,
                            **fields}
                    real, simulated = await chunks(session, tiny_stack.engine.url, path, body), await chunks(
                        session, sim.url, path, body)
                    assert real == simulated, (fields, real, simulated)

    async def test_the_sims_answers_have_this_engines_shape(self, tiny_stack) -> None:
        """Engine to engine: the same requests get answers of the same shape (every key, and the JSON type of
        every value) from the simulated engine and from this real vLLM, whole and streamed, chat and legacy."""
        import aiohttp
        import orjson

        model, chat = tiny_stack.model, [{"role": "user", "content": "hi"}]
        usage = {"include_usage": True}
        cases = [
            ("/v1/chat/completions", {"model": model, "messages": chat, "max_tokens": 3, "ignore_eos": True}),
            ("/v1/completions", {"model": model, "prompt": "once", "max_tokens": 3, "ignore_eos": True}),
            ("/v1/chat/completions", {"model": model, "messages": chat, "max_tokens": 3, "ignore_eos": True,
                                      "stream": True, "stream_options": usage}),
            ("/v1/chat/completions", {"model": model, "messages": chat, "max_tokens": 3, "ignore_eos": True,
                                      "stream": True}),
            ("/v1/completions", {"model": model, "prompt": "once", "max_tokens": 3, "ignore_eos": True,
                                 "stream": True, "stream_options": usage}),
            ("/v1/completions", {"model": model, "prompt": "once", "max_tokens": 3, "ignore_eos": True,
                                 "stream": True}),
            ("/v1/chat/completions", {"model": model, "messages": chat, "max_tokens": 3, "ignore_eos": True,
                                      "stream": True, "stream_options": {**usage, "continuous_usage_stats": True}}),
            ("/v1/completions", {"model": model, "prompt": "once", "max_tokens": 3, "ignore_eos": True,
                                 "stream": True, "stream_options": {**usage, "continuous_usage_stats": True}}),
            # several answers (n): listed whole, interleaved in a stream, each with its index
            ("/v1/chat/completions", {"model": model, "messages": chat, "max_tokens": 3, "ignore_eos": True,
                                      "n": 2}),
            ("/v1/completions", {"model": model, "prompt": "once", "max_tokens": 3, "ignore_eos": True, "n": 2}),
            ("/v1/chat/completions", {"model": model, "messages": chat, "max_tokens": 3, "ignore_eos": True,
                                      "n": 2, "stream": True}),
            ("/v1/chat/completions", {"model": model, "messages": chat, "max_tokens": 3, "ignore_eos": True,
                                      "n": 2, "stream": True,
                                      "stream_options": {**usage, "continuous_usage_stats": True}}),
            ("/v1/completions", {"model": model, "prompt": "once", "max_tokens": 3, "ignore_eos": True, "n": 2,
                                 "stream": True, "stream_options": usage}),
            # a batch of prompts: strings and token ids, n 1 and 2, whole and streamed (index prompt * n + answer)
            ("/v1/completions", {"model": model, "prompt": ["once", "upon a time"], "max_tokens": 3,
                                 "ignore_eos": True}),
            ("/v1/completions", {"model": model, "prompt": [[1, 2, 3], [4]], "max_tokens": 3, "ignore_eos": True,
                                 "n": 2}),
            ("/v1/completions", {"model": model, "prompt": ["once", "upon a time"], "max_tokens": 3,
                                 "ignore_eos": True, "stream": True}),
            ("/v1/completions", {"model": model, "prompt": [[1, 2, 3], [4]], "max_tokens": 3, "ignore_eos": True,
                                 "stream": True, "stream_options": usage}),
            ("/v1/completions", {"model": model, "prompt": ["once", "upon a time"], "max_tokens": 3,
                                 "ignore_eos": True, "n": 2, "stream": True,
                                 "stream_options": {**usage, "continuous_usage_stats": True}}),
            ("/v1/completions", {"model": model, "prompt": [[1, 2, 3], [4]], "max_tokens": 3, "ignore_eos": True,
                                 "n": 2, "stream": True}),
        ]
        async with _sim_beside(tiny_stack) as sim:
            async with aiohttp.ClientSession() as session:
                async def answer(base: str, path: str, body: dict):
                    async with session.post(base + path, json=body) as r:
                        raw = await r.read()
                    if not body.get("stream"):
                        return _shape(orjson.loads(raw))
                    events = [e[len(b"data: "):] for e in raw.split(b"\n\n") if e.startswith(b"data: ")]
                    assert events[-1] == b"[DONE]", (base, path, body)
                    # Each answer's chunks apart (answers interleave as the engine happens to schedule them),
                    # and the chunks of no answer (the usage chunk) apart; in each, a run of like chunks counts
                    # once, since the engines may cut the same tokens into a different number of them.
                    chunks = [orjson.loads(event) for event in events[:-1]]
                    with_choices = [bool(chunk["choices"]) for chunk in chunks]
                    assert with_choices == sorted(with_choices, reverse=True), (base, path, body)  # usage last
                    by_answer: dict = {}
                    for chunk in chunks:
                        shapes = by_answer.setdefault(chunk["choices"][0]["index"] if chunk["choices"] else None, [])
                        if not shapes or shapes[-1] != _shape(chunk):
                            shapes.append(_shape(chunk))
                    return by_answer

                for path, body in cases:
                    real = await answer(tiny_stack.engine.url, path, body)
                    simulated = await answer(sim.url, path, body)
                    assert simulated == real, (path, body)
                # a batch of token ids: the same indexes in the same order and the same usage (each prompt once)
                body = {"model": model, "prompt": [[1, 2, 3], [4]], "max_tokens": 3, "ignore_eos": True, "n": 2}
                for stream in (False, True):
                    seen = []
                    for base in (tiny_stack.engine.url, sim.url):
                        async with session.post(base + "/v1/completions", json={
                                **body, "stream": stream, **({"stream_options": usage} if stream else {})}) as r:
                            raw = await r.read()
                        if stream:
                            chunks = [orjson.loads(e[len(b"data: "):]) for e in raw.split(b"\n\n")
                                      if e.startswith(b"data: {")]
                            seen.append((sorted({c["choices"][0]["index"] for c in chunks if c["choices"]}),
                                         chunks[-1]["usage"]))
                        else:
                            whole = orjson.loads(raw)
                            seen.append(([c["index"] for c in whole["choices"]], whole["usage"]))
                    assert seen[0] == seen[1] == ([0, 1, 2, 3], {**seen[0][1], "prompt_tokens": 4,
                                                                 "completion_tokens": 12, "total_tokens": 16})

    async def test_the_sims_logprobs_have_this_engines_shape(self, tiny_stack) -> None:
        """``logprobs`` engine to engine, whole and streamed, chat and legacy: the same shape (a legacy
        completion's ``top_logprobs`` maps tokens, which differ, so its keys are compared by count), one entry a
        token, as many alternatives, and ``return_tokens_as_token_ids``' placeholders."""
        import aiohttp
        import orjson

        model, chat = tiny_stack.model, [{"role": "user", "content": "hi"}]

        cases = [("/v1/chat/completions", {"messages": chat, "logprobs": True, "top_logprobs": 2}),
                 ("/v1/chat/completions", {"messages": chat, "logprobs": True}),
                 ("/v1/chat/completions", {"messages": chat, "logprobs": True, "top_logprobs": 1,
                                           "return_tokens_as_token_ids": True}),
                 ("/v1/completions", {"prompt": "once", "logprobs": 2}),
                 ("/v1/completions", {"prompt": "once", "logprobs": 0}),
                 ("/v1/completions", {"prompt": "once", "logprobs": 1, "return_tokens_as_token_ids": True})]
        async with _sim_beside(tiny_stack, vocab_size=tiny_stack.vocab_size, tool_calling=False) as sim:
            async with aiohttp.ClientSession() as session:
                async def answer(base: str, path: str, body: dict):
                    async with session.post(base + path, json=body) as r:
                        assert r.status == 200, await r.text()
                        raw = await r.read()
                    if not body["stream"]:
                        whole = orjson.loads(raw)
                        [choice] = whole["choices"]
                        return _shape(_token_maps_counted(whole)), choice["logprobs"]
                    chunks = [orjson.loads(e[len(b"data: "):]) for e in raw.split(b"\n\n")
                              if e.startswith(b"data: {")]
                    return [_shape(_token_maps_counted(chunk)) for chunk in chunks], [c["choices"][0]["logprobs"] for c in chunks]

                for path, fields in cases:
                    for stream in (False, True):
                        body = {"model": model, "max_tokens": 3, "ignore_eos": True, "temperature": 0,
                                "stream": stream, **fields}
                        (real_shape, real), (sim_shape, simulated) = (
                            await answer(tiny_stack.engine.url, path, body), await answer(sim.url, path, body))
                        if stream:  # the engines may cut the same tokens into a different number of chunks
                            real_shape, sim_shape = real_shape[:2] + real_shape[-1:], sim_shape[:2] + sim_shape[-1:]
                        assert sim_shape == real_shape, (path, fields, stream, real_shape, sim_shape)
                        blocks = [b for b in (real if stream else [real]) if b is not None]
                        sim_blocks = [b for b in (simulated if stream else [simulated]) if b is not None]
                        if path == "/v1/chat/completions":
                            count = [len([e for b in bs for e in b["content"]]) for bs in (blocks, sim_blocks)]
                            tops = [{len(e["top_logprobs"]) for b in bs for e in b["content"]}
                                    for bs in (blocks, sim_blocks)]
                            tokens = [e["token"] for b in sim_blocks for e in b["content"]]
                        else:
                            count = [len([t for b in bs for t in b["tokens"]]) for bs in (blocks, sim_blocks)]
                            tops = [{len(top) for b in bs for top in b["top_logprobs"]} for bs in (blocks, sim_blocks)]
                            tokens = [t for b in sim_blocks for t in b["tokens"]]
                        assert count == [3, 3] and tops[0] == tops[1], (path, fields, stream, count, tops)
                        if fields.get("return_tokens_as_token_ids"):
                            assert all(token.startswith("token_id:") for token in tokens)

    async def test_the_sims_prompt_returns_have_this_engines_shape(self, tiny_stack) -> None:
        """What an answer sends back of its prompt, engine to engine, whole and streamed: ``echo`` (a legacy
        completion's prompt before its text, and its ids on a stream's first chunk; chat's last message of the
        answer's role, a chunk of its own after the role's), ``prompt_logprobs`` (also what an echo asks for),
        ``return_token_ids``, ``return_prompt_text``. The same shape (token-keyed maps compared by their count and
        their values' keys), and in both engines as many prompt entries and ids as ``usage.prompt_tokens``."""
        import aiohttp
        import orjson

        model = tiny_stack.model
        chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Well,"}]

        cases = [("/v1/completions", {"prompt": "once upon", "echo": True}),
                 ("/v1/completions", {"prompt": "once upon", "echo": True, "logprobs": 1}),
                 ("/v1/completions", {"prompt": "once upon", "echo": True, "logprobs": 2, "max_tokens": 0}),
                 ("/v1/completions", {"prompt": "once upon", "prompt_logprobs": 1}),
                 ("/v1/completions", {"prompt": "once upon", "return_token_ids": True}),
                 ("/v1/completions", {"prompt": "once upon", "echo": True, "return_token_ids": True}),
                 ("/v1/completions", {"prompt": ["once", "upon a"], "echo": True, "max_tokens": 1}),
                 ("/v1/completions", {"prompt": [5, 6, 7], "echo": True, "logprobs": 0}),
                 ("/v1/chat/completions", {"messages": chat, "echo": True}),
                 ("/v1/chat/completions", {"messages": chat, "echo": True, "n": 2, "temperature": 1}),
                 ("/v1/chat/completions", {"messages": chat, "return_token_ids": True, "return_prompt_text": True}),
                 ("/v1/chat/completions", {"messages": chat, "prompt_logprobs": 2})]
        async with _sim_beside(tiny_stack, vocab_size=tiny_stack.vocab_size, tool_calling=False) as sim:
            async with aiohttp.ClientSession() as session:
                async def answer(base: str, path: str, body: dict):
                    async with session.post(base + path, json=body) as r:
                        raw = await r.read()
                        assert r.status == 200, raw
                    if not body["stream"]:
                        whole = orjson.loads(raw)
                        prompt_tokens = whole["usage"]["prompt_tokens"]
                        for choice in whole["choices"]:  # as many prompt entries and ids as prompt tokens
                            entries = choice.get("prompt_logprobs", whole.get("prompt_logprobs"))
                            ids = choice.get("prompt_token_ids", whole.get("prompt_token_ids"))
                            assert entries is None or len(entries) == prompt_tokens, (base, body)
                            assert ids is None or len(ids) == prompt_tokens, (base, body)
                        return _shape(_token_maps_counted(whole))
                    chunks = [orjson.loads(e[len(b"data: "):]) for e in raw.split(b"\n\n")
                              if e.startswith(b"data: {")]
                    by_answer: dict = {}  # each answer's run of chunk shapes (see the answers' shape test)
                    for chunk in chunks:
                        shapes = by_answer.setdefault(chunk["choices"][0]["index"] if chunk["choices"] else None, [])
                        if not shapes or shapes[-1] != _shape(_token_maps_counted(chunk)):
                            shapes.append(_shape(_token_maps_counted(chunk)))
                    return by_answer

                for path, fields in cases:
                    for stream in (False, True):
                        if stream and "prompt_logprobs" in fields:
                            continue  # refused in a stream (the bad-request test)
                        body = {"model": model, "max_tokens": 3, "ignore_eos": True, "temperature": 0,
                                "stream": stream, **fields}
                        real = await answer(tiny_stack.engine.url, path, body)
                        simulated = await answer(sim.url, path, body)
                        assert simulated == real, (path, fields, stream, real, simulated)

    async def test_the_sims_sleep_is_this_engines(self, tiny_stack) -> None:
        """Engine to engine, vLLM's dev-mode sleep routes: the same 400s for bad query parameters; asleep, both
        say so on /is_sleeping and in vllm:engine_sleep_state, hold a request (not counted as waiting, not
        refused) and serve it after /wake_up."""
        import aiohttp

        from backends.vllm_metrics import parse_vllm_metrics

        async with _sim_beside(tiny_stack) as sim:
            bases = (tiny_stack.engine.url, sim.url)
            async with aiohttp.ClientSession() as session:
                async def call(method: str, url: str):
                    async with session.request(method, url) as r:
                        return r.status, await (r.text() if url.endswith("/metrics") else r.json())

                async def complete(base: str):
                    body = {"model": tiny_stack.model, "prompt": "once", "max_tokens": 2, "ignore_eos": True}
                    async with session.post(base + "/v1/completions", json=body) as r:
                        return r.status, await r.json()

                for query in ("level=3", "level=-1", "level=abc", "mode=bogus", "level=9&mode=nap"):
                    real, simulated = [await call("POST", f"{base}/sleep?{query}") for base in bases]
                    assert simulated == real, query
                for base in bases:
                    try:
                        assert await call("POST", base + "/sleep?level=1") == (200, {"status": "sleeping", "level": 1})
                        assert await call("GET", base + "/is_sleeping") == (200, {"is_sleeping": True})
                        held = asyncio.create_task(complete(base))
                        await asyncio.sleep(1.0)
                        assert not held.done(), base  # held, not refused
                        metrics = parse_vllm_metrics((await call("GET", base + "/metrics"))[1])
                        assert metrics.sleeping and metrics.waiting == 0, (base, metrics)
                    finally:
                        woken = await call("POST", base + "/wake_up")
                    assert woken == (200, {"status": "awake", "tags": None}), base
                    status, answer = await asyncio.wait_for(held, timeout=60)
                    assert status == 200 and answer["usage"]["completion_tokens"] == 2, (base, answer)

    async def test_the_sims_metrics_and_models_are_this_engines(self, tiny_stack) -> None:
        """Engine to engine: every metric family the simulated engine exports exists on this real vLLM with the
        same type and label names (the gateway scrapes by those names), and /v1/models has the same shape."""
        import aiohttp
        from prometheus_client.parser import text_string_to_metric_families

        def families(text: str) -> dict[str, tuple[str, frozenset]]:
            return {family.name: (family.type, frozenset(frozenset(sample.labels) for sample in family.samples))
                    for family in text_string_to_metric_families(text) if family.name.startswith("vllm:")}

        def buckets(text: str, name: str) -> list[float]:
            [family] = [f for f in text_string_to_metric_families(text) if f.name == name]
            return sorted({float(s.labels["le"]) for s in family.samples if s.name.endswith("_bucket")})

        async with _sim_beside(tiny_stack) as sim:
            async with aiohttp.ClientSession() as session:
                async def get(base: str, path: str):
                    async with session.get(base + path) as r:
                        return r.status, await (r.text() if path == "/metrics" else r.json())

                real_status, real_text = await get(tiny_stack.engine.url, "/metrics")
                sim_status, sim_text = await get(sim.url, "/metrics")
                real, simulated = families(real_text), families(sim_text)
                assert real_status == sim_status == 200 and simulated
                from backends.vllm_metrics import parse_vllm_metrics  # what the gateway reads of it

                engine_metrics = parse_vllm_metrics(real_text)  # reservations round to the block size it exports
                assert engine_metrics.kv_block_size > 0 and engine_metrics.kv_capacity_tokens > 0, engine_metrics
                assert engine_metrics.kv_capacity_tokens % engine_metrics.kv_block_size == 0
                for name, (kind, label_sets) in simulated.items():
                    assert name in real, name
                    real_kind, real_label_sets = real[name]
                    assert kind == real_kind, name
                    # the same label names (values differ: engine index, model, and the cache config's fields)
                    if name != "vllm:cache_config_info":
                        assert {frozenset(ls) for ls in label_sets} <= {frozenset(ls) for ls in real_label_sets}, name
                # a histogram's buckets too: a dashboard's quantiles over both must mean the same
                for name in (name for name, (kind, _) in simulated.items() if kind == "histogram"):
                    assert buckets(sim_text, name) == buckets(real_text, name), name
                _, real_models = await get(tiny_stack.engine.url, "/v1/models")
                _, sim_models = await get(sim.url, "/v1/models")

                assert _shape(sim_models) == _shape(real_models)
                assert [m["id"] for m in sim_models["data"]] == [m["id"] for m in real_models["data"]]

    def test_several_answers_share_only_the_prompts_full_blocks(self, tiny_stack) -> None:
        """What the ledger reserves for ``n`` answers (predictor.kv.kv_footprint) rests on this engine sharing a
        prompt's full blocks among them through its prefix cache, and nothing more: three more answers to a fresh
        prompt hit the cache for exactly three times the prompt's full blocks short of its last token."""
        import secrets
        import urllib.request

        from backends.vllm_metrics import parse_vllm_metrics

        with urllib.request.urlopen(tiny_stack.engine.url + "/metrics", timeout=5.0) as metrics:
            block = parse_vllm_metrics(metrics.read().decode()).kv_block_size
        before = tiny_stack.wait_engine_idle()
        fresh = " ".join(secrets.token_hex(4) for _ in range(70))  # in no earlier prompt: nothing cached yet
        response = tiny_stack.client().chat.completions.create(
            model=tiny_stack.model, messages=[{"role": "user", "content": fresh}], max_tokens=4, n=4,
            extra_body=EXACT)
        prompt = response.usage.prompt_tokens
        assert len(response.choices) == 4 and prompt > 2 * block, (prompt, block)
        hits = tiny_stack.engine.metrics()["vllm:prefix_cache_hits_total"] - before["vllm:prefix_cache_hits_total"]
        assert hits == 3 * ((prompt - 1) // block * block), (hits, prompt, block)

    async def test_fields_in_lax_forms_are_served_through_the_gateway(self, tiny_stack) -> None:
        """vLLM reads its request fields in pydantic's lax mode: ``"max_tokens": "5"``, ``"n": 2.0``, ``"stream":
        "true"`` are served. Through the gateway too, scheduled or not, with the answers and usage they ask for;
        and what this engine refuses in those forms the gateway refuses as well."""
        import aiohttp
        import orjson

        body = {"model": tiny_stack.model, "messages": MESSAGES, "max_tokens": "5", "n": 2.0, "stream": "true",
                "stream_options": {"include_usage": 1}, "ignore_eos": "yes", "temperature": "0.5"}
        async with aiohttp.ClientSession(headers={"Authorization": "Bearer test-key"}) as session:
            for headers in ({}, {"X-Workflow-Id": f"lax-{time.monotonic_ns()}"}):
                async with session.post(tiny_stack.base_url + "/chat/completions", json=body,
                                        headers=headers) as r:
                    assert r.status == 200 and r.content_type == "text/event-stream", await r.text()
                    events = [orjson.loads(line[6:]) for line in (await r.text()).splitlines()
                              if line.startswith("data: {")]
                assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 10, events[-1]
            whole = {"model": tiny_stack.model, "messages": MESSAGES, "max_tokens": 4.0, "stream": 0,
                     "ignore_eos": 1}
            async with session.post(tiny_stack.base_url + "/chat/completions", json=whole) as r:
                answer = await r.json()
                assert r.status == 200 and answer["usage"]["completion_tokens"] == 4, answer
            for bad in ({"max_tokens": "\u0664"}, {"max_tokens": 4.5}, {"stream": "maybe"}, {"n": "two"}):
                refused = {"model": tiny_stack.model, "messages": MESSAGES, **bad}
                async with session.post(tiny_stack.engine.url + "/v1/chat/completions", json=refused) as r:
                    assert r.status == 400, (bad, await r.text())
                async with session.post(tiny_stack.base_url + "/chat/completions", json=refused) as r:
                    assert r.status == 400 and (await r.json())["error"]["param"] == next(iter(bad)), bad
            # a prompt's token ids too; strings stay strings (two prompts), an empty one in a batch is refused
            for prompt, answers in (([1.0, "2", True], 1), ([[1.0], ["2", 3]], 2), (["1", "2"], 2)):
                ids = {"model": tiny_stack.model, "prompt": prompt, "max_tokens": 2}
                async with session.post(tiny_stack.base_url + "/completions", json=ids) as r:
                    answer = await r.json()
                    assert r.status == 200 and len(answer["choices"]) == answers, (prompt, answer)
            for prompt in ([-1], [1.5], [[1], []]):
                refused = {"model": tiny_stack.model, "prompt": prompt, "max_tokens": 2}
                async with session.post(tiny_stack.engine.url + "/v1/completions", json=refused) as r:
                    assert r.status == 400, (prompt, await r.text())
                async with session.post(tiny_stack.base_url + "/completions", json=refused) as r:
                    assert r.status == 400 and (await r.json())["error"]["param"] == "prompt", prompt

    async def test_bodies_this_engine_serves_are_served_through_the_gateway(self, tiny_stack) -> None:
        """A differential audit found bodies vLLM serves that the gateway refused: messages without content, an
        assistant's null content, a role of "", stream options a stream of "false" or none comes with (vLLM tests
        the values as sent), and on legacy completions ``max_completion_tokens`` (no field of theirs) and
        ``max_tokens: 0`` with ``echo``. Each is served by the engine and through the gateway, with the same
        usage; what this engine refuses in their neighbourhood the gateway refuses too."""
        import aiohttp

        model, hi = tiny_stack.model, {"role": "user", "content": "hi"}
        served = [
            ("/chat/completions", {"messages": [{"role": "user"}]}),
            ("/chat/completions", {"messages": [{"role": "system"}, {"role": "developer"}, hi]}),
            ("/chat/completions", {"messages": [hi, {"role": "assistant", "content": None}]}),
            ("/chat/completions", {"messages": [hi, {"role": "assistant", "content": None, "tool_calls": []}]}),
            ("/chat/completions", {"messages": [hi, {"role": "tool", "tool_call_id": "c"}]}),
            ("/chat/completions", {"messages": [{"role": "", "content": "hi"}]}),
            ("/chat/completions", {"messages": [hi], "stream_options": {}}),
            ("/chat/completions", {"messages": [hi], "stream": "false", "stream_options": {"include_usage": True}}),
            ("/completions", {"prompt": "once", "max_completion_tokens": 0}),
            ("/completions", {"prompt": "once", "max_tokens": 0, "echo": True}),
            ("/completions", {"prompt": "once", "max_tokens": "0", "echo": "yes", "stream": True,
                              "stream_options": {"include_usage": True}}),
        ]
        refused = [
            ("/chat/completions", {"messages": [{"role": "user", "content": None}]}),
            ("/chat/completions", {"messages": [hi, {"role": "tool", "content": None, "tool_call_id": "c"}]}),
            ("/chat/completions", {"messages": [hi], "stream": False, "stream_options": {"include_usage": False}}),
            ("/completions", {"prompt": "once", "max_tokens": 0}),
            ("/completions", {"prompt": "once", "max_tokens": 0, "echo": "maybe"}),
        ]

        def usage_of(text: str) -> dict:
            import orjson

            if text.startswith("data: "):  # a stream: its usage chunk
                return next(orjson.loads(line[6:])["usage"] for line in text.splitlines()
                            if line.startswith("data: {") and orjson.loads(line[6:]).get("usage"))
            return orjson.loads(text)["usage"]

        async with aiohttp.ClientSession(headers={"Authorization": "Bearer test-key"}) as session:
            for path, fields in served + refused:
                body = {"model": model, "max_tokens": 3, "ignore_eos": True, **fields}
                answers = []
                for base in (tiny_stack.engine.url + "/v1", tiny_stack.base_url):
                    async with session.post(base + path, json=body) as r:
                        answers.append((r.status, await r.text()))
                (direct, direct_text), (through, through_text) = answers
                if (path, fields) in refused:
                    assert direct == through == 400, (fields, answers)
                    continue
                assert direct == through == 200, (fields, answers)
                assert usage_of(direct_text) == usage_of(through_text), (fields, answers)

    def test_completions_endpoint(self, tiny_stack) -> None:
        response = tiny_stack.client().completions.create(
            model=tiny_stack.model, prompt="def schedule(requests):", max_tokens=16, extra_body=EXACT)
        assert response.choices[0].finish_reason == "length"
        assert isinstance(response.choices[0].text, str) and response.choices[0].text
        assert response.usage is not None and response.usage.completion_tokens == 16

    def test_completions_stream(self, tiny_stack) -> None:
        stream = tiny_stack.client().completions.create(
            model=tiny_stack.model, prompt="import asyncio\n", max_tokens=12, stream=True,
            stream_options={"include_usage": True}, extra_body=EXACT)
        chunks = list(stream)
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12

    def test_unknown_model_is_404(self, tiny_stack) -> None:
        with pytest.raises(openai.NotFoundError):
            tiny_stack.client().chat.completions.create(
                model="no-such-model", messages=MESSAGES, max_tokens=4)

    def test_max_tokens_too_big_is_400(self, tiny_stack) -> None:
        with pytest.raises(openai.BadRequestError) as excinfo:
            tiny_stack.client().chat.completions.create(
                model=tiny_stack.model, messages=MESSAGES, max_tokens=2 * tiny_stack.max_model_len)
        assert "max_tokens" in str(excinfo.value) or "max_model_len" in str(excinfo.value) or \
            "context" in str(excinfo.value).lower()

    def test_client_disconnect_aborts_engine_request(self, tiny_stack) -> None:
        before = tiny_stack.wait_engine_idle()
        tokens_before = before.get("vllm:generation_tokens_total", 0.0)
        stream = tiny_stack.client().chat.completions.create(
            model=tiny_stack.model, messages=MESSAGES, max_tokens=1500, stream=True, extra_body=EXACT)
        received = 0
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                received += 1
            if received >= 5:
                break
        assert received >= 5
        running = tiny_stack.engine.metrics().get("vllm:num_requests_running", 0)
        stream.close()
        closed_at = time.monotonic()
        _poll(lambda: tiny_stack.engine.metrics().get("vllm:num_requests_running", 0) == 0, timeout=2.0,
              what="vllm:num_requests_running to return to 0 after the client disconnected "
                   f"(it was {running} while streaming)")
        released_in = time.monotonic() - closed_at
        time.sleep(0.3)  # let the counter settle: an aborted request adds no more tokens
        generated = tiny_stack.engine.metrics().get("vllm:generation_tokens_total", 0.0) - tokens_before
        assert generated < 750, (f"engine generated {generated:.0f} of 1500 tokens after the client went away "
                                 f"(slot released after {released_in:.2f} s): the abort did not reach vLLM")

    async def test_priority_lower_value_first(self, tiny_stack) -> None:
        """Fill every sequence slot, queue requests with priorities, check they finish lowest value first.

        The engine has ``--max-num-seqs 4``. Three long requests and one shorter "slot freer" occupy the
        four slots; the five prioritised requests queue behind them. When the freer finishes, its slot is
        the only free one, so the queued requests run one after another through it, in the order the
        priority scheduler picks them. Running requests are never preempted by priority (only under KV
        pressure), so the long ones keep their slots until the test cancels them.
        """
        engine = tiny_stack.engine
        tiny_stack.wait_engine_idle()
        client = tiny_stack.async_client(timeout=120)
        long_tasks: list[asyncio.Task] = []
        short_tasks: list[asyncio.Task] = []
        finished: list[int] = []

        async def request(max_tokens: int, priority: int | None = None) -> int:
            body = dict(EXACT)
            if priority is not None:
                body["priority"] = priority
            response = await client.chat.completions.create(
                model=tiny_stack.model, messages=MESSAGES, max_tokens=max_tokens, extra_body=body)
            return response.usage.completion_tokens

        async def short(priority: int) -> None:
            assert await request(6, priority) == 6
            finished.append(priority)

        try:
            long_tasks.append(asyncio.create_task(request(900)))  # the slot freer
            for _ in range(tiny_stack.max_num_seqs - 1):
                long_tasks.append(asyncio.create_task(request(tiny_stack.max_model_len - 200)))
            await _apoll(lambda: engine.metrics().get("vllm:num_requests_running", 0) == tiny_stack.max_num_seqs,
                         timeout=15, what=f"{tiny_stack.max_num_seqs} long requests running")
            priorities = [10, 3, 7, 0, -5]
            for priority in priorities:
                short_tasks.append(asyncio.create_task(short(priority)))
            await _apoll(lambda: engine.metrics().get("vllm:num_requests_waiting", 0) == len(priorities),
                         timeout=10, what="the prioritised requests to queue in the engine")
            assert not long_tasks[0].done(), "the slot freer finished before all requests were queued; " \
                                             "the engine is faster than this test assumes"
            await asyncio.wait_for(asyncio.gather(*short_tasks), timeout=90)
            assert finished == sorted(priorities), f"finish order {finished}, expected lowest value first"
        finally:
            for task in long_tasks + short_tasks:
                task.cancel()
            await asyncio.gather(*long_tasks, *short_tasks, return_exceptions=True)
            await client.close()
        tiny_stack.wait_engine_idle(timeout=5)

    def test_online_learning_records_the_engines_usage(self, tiny_stack) -> None:
        """A real vLLM's token counts reach the trace records, for a stream whose client did not ask for usage
        too (the gateway asked the engine for it); the stored body is the client's."""
        gateway = tiny_stack.require_gateway()
        marker = f"online-{time.monotonic_ns()}"
        messages = [{"role": "user", "content": f"Say something about {marker}."}]
        client = tiny_stack.client()
        reply = client.chat.completions.create(model=tiny_stack.model, messages=messages, max_tokens=12,
                                               extra_body=EXACT, extra_headers={"X-Agent-Role": "writer"})
        stream = client.chat.completions.create(model=tiny_stack.model, messages=messages, max_tokens=9,
                                                stream=True, extra_body=EXACT)
        assert all(chunk.usage is None for chunk in stream)

        def ours():
            found = [r for r in gateway.online_records() if marker in _first_text(r)]
            return found if len(found) == 2 else None

        plain, streamed = _poll(ours, timeout=10.0, what="two online-learning records in the trace file")
        assert plain["usage"] == {"prompt_tokens": reply.usage.prompt_tokens, "completion_tokens": 12}
        assert plain["agent_role"] == "writer" and "stream" not in plain["request"]
        assert streamed["usage"] == {"prompt_tokens": reply.usage.prompt_tokens, "completion_tokens": 9}
        assert streamed["request"]["stream"] is True and "stream_options" not in streamed["request"]
        assert streamed["agent_role"] is None and streamed["source"] == "gateway"

    def test_several_choices_come_through_and_are_not_recorded(self, tiny_stack) -> None:
        """``n`` = 2 end to end: both answers and their summed usage reach the client, streamed and not, and
        online learning records neither (their usage is two answers', the predictor learns one answer's)."""
        gateway = tiny_stack.require_gateway()
        marker = f"choices-{time.monotonic_ns()}"
        messages = [{"role": "user", "content": f"Say something about {marker}."}]
        client = tiny_stack.client()
        reply = client.chat.completions.create(model=tiny_stack.model, messages=messages, max_tokens=10, n=2,
                                               extra_body=EXACT)
        assert sorted(choice.index for choice in reply.choices) == [0, 1]
        assert all(choice.finish_reason == "length" for choice in reply.choices)
        assert reply.usage is not None and reply.usage.completion_tokens == 20
        stream = client.chat.completions.create(model=tiny_stack.model, messages=messages, max_tokens=7, n=2,
                                                stream=True, stream_options={"include_usage": True},
                                                extra_body=EXACT)
        chunks = list(stream)
        finished = {c.choices[0].index: c.choices[0].finish_reason
                    for c in chunks if c.choices and c.choices[0].finish_reason}
        assert finished == {0: "length", 1: "length"}
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 14
        # One answer, sent last: once its record is written, the two above would have been written before it.
        single = client.chat.completions.create(model=tiny_stack.model, messages=messages, max_tokens=5,
                                                extra_body=EXACT)

        def ours():
            found = [r for r in gateway.online_records() if marker in _first_text(r)]
            return found if any(r["request"].get("n") is None for r in found) else None

        records = _poll(ours, timeout=10.0, what="the single answer's online-learning record")
        assert [r["usage"]["completion_tokens"] for r in records] == [single.usage.completion_tokens] == [5]

    def test_admin_engines_reports_scraped_metrics(self, tiny_stack) -> None:
        gateway = tiny_stack.require_gateway()
        tiny_stack.wait_engine_idle()
        client = tiny_stack.client(timeout=120)
        stop = threading.Event()
        errors: list[BaseException] = []

        def long_stream() -> None:
            try:
                stream = client.chat.completions.create(
                    model=tiny_stack.model, messages=MESSAGES, max_tokens=tiny_stack.max_model_len - 200, stream=True,
                    extra_body=EXACT)
                for _ in stream:
                    if stop.is_set():
                        break
                stream.close()
            except BaseException as error:  # surfaced below
                errors.append(error)

        worker = threading.Thread(target=long_stream, daemon=True)
        worker.start()
        try:
            def busy_engine():
                for engine in gateway.engines():
                    if engine.get("up") and (engine.get("metrics") or {}).get("running", 0) > 0:
                        return engine
                return None

            engine = _poll(busy_engine, timeout=5.0, what="GET /admin/engines to show running > 0")
            assert engine["url"].rstrip("/") == tiny_stack.engine.url
            assert engine.get("sleeping") in (False, None)
            assert "engine_id" in engine
            metrics = gateway.metrics()
            assert metrics.get("maestro_engines_up", 0) >= 1, "maestro_engines_up missing or 0"
        finally:
            stop.set()
            worker.join(timeout=10)
        assert not errors, errors
        tiny_stack.wait_engine_idle(timeout=5)
        # After the request ends the monitor sees the engine idle again and the token counter moved.
        engine = _poll(lambda: next((e for e in gateway.engines()
                                     if (e.get("metrics") or {}).get("running", 1) == 0), None),
                       timeout=3.0, what="GET /admin/engines to show running == 0 again")
        total = (engine.get("metrics") or {}).get("generation_tokens_total")
        if total is not None:
            assert total > 0


class TestSmolLM2:
    """SmolLM2-135M-Instruct: a real (tiny) instruction-tuned model."""

    def test_models_list(self, smol_stack) -> None:
        assert [model.id for model in smol_stack.client().models.list()] == [smol_stack.model]

    def test_capital_of_france(self, smol_stack) -> None:
        response = smol_stack.client().chat.completions.create(
            model=smol_stack.model, messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=64, temperature=0)
        choice = response.choices[0]
        assert "Paris" in (choice.message.content or ""), choice.message.content
        assert choice.finish_reason == "stop"
        assert response.usage is not None and response.usage.completion_tokens < 64

    async def test_the_sims_forced_tool_calls_have_this_engines_shape(self, smol_stack) -> None:
        """``tool_choice`` "required" and a named function, whole and streamed, engine to engine: the simulated
        engine's tool call has this vLLM's shape (every key and the JSON type of every value; a stream's chunks per
        answer, a run of like chunks counted once), finish_reason and function, and arguments that are a JSON
        object with the keys the schema requires."""
        import aiohttp
        import orjson

        model = smol_stack.model
        weather = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                                    "parameters": {"type": "object", "required": ["city"],
                                                                   "properties": {"city": {"type": "string"}},
                                                                   "additionalProperties": False}}}
        clock = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object",
                                                                                    "properties": {}}}}
        messages = [{"role": "user", "content": "What is the weather in Paris?"}]
        async with _sim_beside(smol_stack) as sim:
            async with aiohttp.ClientSession() as session:
                async def answer(base: str, body: dict):
                    got = await _chat_answer(session, base, body)
                    if not body["stream"]:
                        [choice] = got["choices"]
                        [call] = choice["message"]["tool_calls"]
                        return _shape(got), choice["finish_reason"], call["function"]["name"], \
                            sorted(orjson.loads(call["function"]["arguments"]))
                    arguments, name = "", None
                    for chunk in got:
                        for piece in chunk["choices"][0]["delta"].get("tool_calls", ()):
                            name = name or piece["function"].get("name")
                            arguments += piece["function"]["arguments"]
                    # with the tokens' ids or logprobs, every token has a chunk: the kinds of chunks (the JSON around
                    # a "required" call's arguments is cut into tokens differently), and every token's id
                    shapes = sorted({orjson.dumps(_shape(chunk)) for chunk in got}) if body.get(
                        "return_token_ids") or body.get("logprobs") else _shape_runs(got)
                    if body.get("return_token_ids"):
                        assert sum(len(chunk["choices"][0].get("token_ids") or ()) for chunk in got) == \
                            (await _chat_answer(session, base, {**body, "stream": False}))["usage"]["completion_tokens"]
                    return shapes, got[-1]["choices"][0]["finish_reason"], name, sorted(orjson.loads(arguments))

                # ("required" with one tool: a model may choose any of several, the sim the first; get_time's "{}"
                # not streamed: this model writes it in two tokens, the sim in one, one chunk fewer)
                for choice, tools, name, streams in (
                        ("required", [weather], "get_weather", (False, True)),
                        ({"type": "function", "function": {"name": "get_weather"}}, [weather, clock], "get_weather",
                         (False, True)),
                        ({"type": "function", "function": {"name": "get_time"}}, [weather, clock], "get_time",
                         (False,))):
                    # (and with the tokens' ids or logprobs: a stream then has a chunk for the tokens that write no
                    # arguments)
                    logprobs = {"logprobs": True, "top_logprobs": 2}
                    for stream, extra in [(stream, {}) for stream in streams] + [
                            (True, {"return_token_ids": True}), (False, logprobs), (True, logprobs)]:
                        body = {"model": model, "messages": messages, "tools": tools, "tool_choice": choice,
                                "max_tokens": 100, "temperature": 0, "stream": stream, **extra}
                        if stream not in streams:
                            continue
                        real, simulated = await answer(smol_stack.engine.url, body), await answer(sim.url, body)
                        assert simulated == real, (choice, stream, extra, real, simulated)
                        assert real[1:] == ("tool_calls" if choice == "required" else "stop", name,
                                            ["city"] if name == "get_weather" else [])

    async def test_the_sims_unwritable_tool_call_is_this_engines(self, smol_stack) -> None:
        """A forced tool call whose name no UTF-8 can hold (a lone surrogate), whole and streamed, one answer or two,
        engine to engine: neither engine can serialize its answer (a 400 naming where the name's surrogate lies in
        it, or a stream's error event after the role chunk), and neither crashes."""
        import aiohttp

        name = "f" + _S
        tool = {"type": "function", "function": {"name": name, "parameters": {
            "type": "object", "properties": {"a": {"type": "string"}}}}}
        async with _sim_beside(smol_stack) as sim:
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
                for stream, n in ((False, 1), (True, 1), (False, 2), (True, 2)):
                    body = {"model": smol_stack.model, "messages": [{"role": "user", "content": "hi"}],
                            "tools": [tool], "tool_choice": {"type": "function", "function": {"name": name}},
                            "max_tokens": 20, "temperature": 1.0, "n": n, "stream": stream}
                    answers = await _both_answers(session, smol_stack, sim, "/v1/chat/completions", body)
                    assert answers[0] == answers[1], (stream, n, answers)
                    assert "surrogates not allowed" in answers[0][1], answers

    async def test_the_sims_refusals_around_forced_tool_calls_are_this_engines(self, smol_stack) -> None:
        """Behind this tool parser, engine to engine: a "required" tool choice's one JSON schema of every tool (its
        ``$defs`` an object, one schema to a name) refused as this vLLM refuses it, and a forced call's schema in
        place of the request's own structured outputs (whose content checks then do not apply)."""
        import aiohttp

        def tool(name: str, parameters: dict) -> dict:
            return {"type": "function", "function": {"name": name, "parameters": parameters}}

        named = {"type": "function", "function": {"name": "f"}}
        string, integer = {"A": {"type": "string"}}, {"A": {"type": "integer"}}
        cases = [
            {"tools": [tool("f", {"$defs": 1})], "tool_choice": "required"},
            {"tools": [tool("f", {"type": "object", "$defs": string}), tool("g", {"type": "object", "$defs": integer})],
             "tool_choice": "required"},
            {"tools": [tool("f", {"$defs": 1})], "tool_choice": named},
            {"tools": [tool("f", {"$defs": 1})], "tool_choice": "required", "max_tokens": 3000},
            {"tools": [tool("f", {"type": "object"})], "tool_choice": "required", "structured_outputs": {"choice": []}},
            {"tools": [tool("f", {"type": "object"})], "tool_choice": named, "structured_outputs": {"json": ""}},
            {"tools": [tool("f", {"type": "object"})], "tool_choice": "auto", "structured_outputs": {"choice": []}},
        ]
        async with _sim_beside(smol_stack, vocab_size=smol_stack.vocab_size) as sim:
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
                for fields in cases:
                    for stream in (False, True):
                        body = {"model": smol_stack.model, "messages": [{"role": "user", "content": "hi"}],
                                "max_tokens": 60, **fields, "stream": stream}
                        answers = await _both_answers(session, smol_stack, sim, "/v1/chat/completions", body)
                        assert answers[0] == answers[1], (fields, stream, answers)

    async def test_the_sims_json_mode_answers_have_this_engines_shape(self, smol_stack) -> None:
        """``response_format`` json_object and json_schema, whole and streamed, engine to engine: the same shape
        (keys and JSON types; a stream's chunks, a run of like chunks counted once), finish_reason "stop", and
        text that parses as a JSON object (with the keys the schema requires)."""
        import aiohttp
        import orjson

        model = smol_stack.model
        messages = [{"role": "user", "content": "What is the capital of France? Answer in JSON."}]
        schema = {"type": "json_schema", "json_schema": {"name": "answer", "schema": {
            "type": "object", "properties": {"capital": {"type": "string"}}, "required": ["capital"],
            "additionalProperties": False}}}
        async with _sim_beside(smol_stack) as sim:
            async with aiohttp.ClientSession() as session:
                async def answer(base: str, body: dict):
                    got = await _chat_answer(session, base, body)
                    if not body["stream"]:
                        [choice] = got["choices"]
                        return _shape(got), choice["finish_reason"], orjson.loads(choice["message"]["content"])
                    text = "".join(chunk["choices"][0]["delta"].get("content") or "" for chunk in got)
                    return _shape_runs(got), got[-1]["choices"][0]["finish_reason"], orjson.loads(text)

                for fmt in ({"type": "json_object"}, schema):
                    for stream in (False, True):
                        body = {"model": model, "messages": messages, "response_format": fmt, "max_tokens": 100,
                                "temperature": 0, "stream": stream}
                        (real_shape, real_finish, real_json), (sim_shape, sim_finish, sim_json) = (
                            await answer(smol_stack.engine.url, body), await answer(sim.url, body))
                        assert sim_shape == real_shape, (fmt, stream, real_shape, sim_shape)
                        assert real_finish == sim_finish == "stop", (fmt, stream)
                        assert isinstance(real_json, dict) and isinstance(sim_json, dict), (real_json, sim_json)
                        if fmt is schema:
                            assert list(real_json) == list(sim_json) == ["capital"], (real_json, sim_json)

    def test_capital_of_france_streamed(self, smol_stack) -> None:
        stream = smol_stack.client().chat.completions.create(
            model=smol_stack.model, messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=64, temperature=0, stream=True)
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert "Paris" in text, text
        assert chunks[-1].choices[0].finish_reason == "stop"

