"""The simulated engine reads vLLM 0.32's rarer request fields as vLLM does (:mod:`backends.sim.request_fields`):
their types, their validators, the serving's and the engine's checks, several fields' errors in vLLM's order, what
vLLM's engine client cannot encode, an answer it cannot write, and ``stream_interval`` (the real-vLLM stage
compares both engines' answers to the same bodies, byte for byte). Each expected answer was observed on a real
vLLM 0.32."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from backends.sim import SimEngineOptions, start_sim_engines
from backends.sim.request_fields import (CHAT_FIELDS, Refusal, check_cache_salt, check_logprob_token_ids,
                                         check_structured_outputs_count, in_field_order, read_extras)

MODEL = "sim-test"
CHAT = [{"role": "user", "content": "hi"}]
S = "\ud800"  # a lone surrogate: no UTF-8 holds it


@pytest.fixture
async def engine():
    (handle,) = await start_sim_engines(1, SimEngineOptions(model=MODEL, time_scale=200.0, max_model_len=1024))
    yield handle
    await handle.stop()


async def _post(url: str, fields: dict, chat: bool = True, stream: bool = False) -> tuple[int, dict | str]:
    body = {"model": MODEL, "max_tokens": 2, **({"messages": CHAT} if chat else {"prompt": "hi"}), **fields,
            "stream": stream}
    async with aiohttp.ClientSession() as session:
        async with session.post(url + ("/v1/chat/completions" if chat else "/v1/completions"),
                                data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}) as r:
            raw = await r.read()
            if r.status == 200 and stream:
                return r.status, raw.decode()
            return r.status, json.loads(raw)


async def _holds_nothing(handle) -> bool:
    """Whether the engine holds no request once the handler has finished (a stream's client may read its end a
    moment before the handler's last step)."""
    for _ in range(100):
        if handle.engine.num_running == handle.engine.num_waiting == 0:
            return True
        await asyncio.sleep(0.01)
    return False


def _events(text: str) -> list[dict]:
    return [json.loads(event[len("data: "):]) for event in text.split("\n\n") if event.startswith("data: {")]


def test_errors_come_in_vllms_field_order_each_fields_own_in_theirs():
    errors = [{"loc": f"body.{name}"} for name in ("ignore_eos", "max_tokens", "stop.1", "stop", "messages.0.x")]
    assert [e["loc"] for e in in_field_order(errors, chat=True)] == [
        "body.messages.0.x", "body.max_tokens", "body.stop.1", "body.stop", "body.ignore_eos"]
    assert CHAT_FIELDS.index("max_tokens") < CHAT_FIELDS.index("stop") < CHAT_FIELDS.index("ignore_eos")


def test_the_rarer_fields_are_read_only_where_a_body_holds_one():
    errors: list[dict] = []
    assert read_extras({"model": "m", "max_tokens": 3}, True, errors) is None
    extras = read_extras({"bad_words": ["a"], "stream_interval": "3"}, True, errors)
    assert (extras.bad_words, extras.stream_interval, extras.use_beam_search, errors) == (["a"], 3, False, [])
    assert read_extras({"use_beam_search": "x", "documents": 5}, False, errors) is None  # documents: chat's only
    assert [e["loc"] for e in errors] == ["body.use_beam_search"]


def test_a_validator_that_raises_vllms_own_error_escapes_pydantic():
    with pytest.raises(Refusal) as raised:
        read_extras({"thinking_token_budget": "x", "use_beam_search": "y"}, True, [])
    assert (raised.value.param, raised.value.value) == ("thinking_token_budget", "x")
    with pytest.raises(Refusal, match=r"^You must use one kind of structured outputs constraint but none are "
                                      r"specified: \{'json': None, 'regex': None, .*'_backend_was_auto': False\}$"):
        read_extras({"structured_outputs": {"bogus": 1}}, False, [])
    with pytest.raises(Refusal, match="^min_count must be >= 2"):
        read_extras({"repetition_detection": {"max_pattern_size": 5}}, False, [])


def test_the_before_validators_are_vllms():
    with pytest.raises(Refusal) as raised:
        check_structured_outputs_count({"structured_outputs": [1]}, True)
    assert (raised.value.message, raised.value.status) == ("'list' object has no attribute 'get'", 500)
    both = {"structured_outputs": {"regex": "a", "json": {}}}
    for chat, param in ((True, None), (False, "structured_outputs")):
        with pytest.raises(Refusal) as raised:
            check_structured_outputs_count(both, chat)
        assert raised.value.param == param
    with pytest.raises(Refusal, match="or tools, not both"):  # (a null tool choice too)
        check_structured_outputs_count({"structured_outputs": {"regex": "a"}, "tool_choice": None}, True)
    check_structured_outputs_count({"structured_outputs": {"regex": "a"}, "tool_choice": "required"}, True)
    with pytest.raises(Refusal, match="`logprobs` must be set to true"):
        check_logprob_token_ids({"logprob_token_ids": "x"}, True)
    with pytest.raises(Refusal, match="`logprobs` must be set.$"):
        check_logprob_token_ids({"logprob_token_ids": [1]}, False)
    check_logprob_token_ids({"logprob_token_ids": [1], "logprobs": 0}, False)
    for salt in ("", 5, "a/b", "a" * 129):
        with pytest.raises(Refusal):
            check_cache_salt({"cache_salt": salt})
    check_cache_salt({"cache_salt": "a" * 128})


# (fields, chat?, status, type, param, the start of the message)
REFUSED = [
    ({"use_beam_search": "x"}, True, 400, "Bad Request", "body.use_beam_search",
     "1 validation error:\n  {'type': 'bool_parsing', 'loc': 'body.use_beam_search'"),
    ({"vllm_xargs": {"a": None}}, False, 400, "Bad Request", "body.vllm_xargs.a", "4 validation errors:"),
    ({"ignore_eos": "x", "max_tokens": "y"}, True, 400, "Bad Request", "body.max_tokens", "2 validation errors:"),
    ({"cache_salt": "", "max_tokens": "y"}, True, 400, "BadRequestError", "cache_salt",
     "Parameter 'cache_salt' must be a non-empty string if provided. (parameter=cache_salt)"),
    ({"cache_salt": "c" + S}, True, 400, "Bad Request", "body.cache_salt", "1 validation error:\n  {'type': "
     "'string_unicode'"),
    ({"thinking_token_budget": -2, "max_tokens": "y"}, False, 400, "BadRequestError", "thinking_token_budget",
     "`thinking_token_budget` must be a non-negative integer or -1 for unlimited. (parameter=thinking_token_budget, "
     "value=-2)"),
    ({"structured_outputs": "x"}, True, 500, "InternalServerError", None, "'str' object has no attribute 'get'"),
    ({"structured_outputs": {}}, False, 400, "BadRequestError", None, "You must use one kind of structured outputs"),
    ({"logprob_token_ids": [1, 2]}, True, 400, "BadRequestError", "logprob_token_ids",
     "when using `logprob_token_ids`, `logprobs` must be set to true."),
    ({"chat_template": "{{ messages }}"}, True, 400, "BadRequestError", None,
     "Chat template is passed with request, but --trust-request-chat-template is not set."),
    ({"mm_processor_kwargs": {"a": 1}, "media_io_kwargs": {"b": {}}}, True, 400, "BadRequestError",
     "mm_processor_kwargs", "Per-request mm_processor_kwargs are disabled by default"),
    ({"mm_processor_kwargs": {"a": 1}}, False, 400, "BadRequestError", "mm_processor_kwargs", "Per-request"),
    ({"bad_words": ["", "", "a"]}, True, 400, "BadRequestError", None,
     "bad_words cannot contain an empty string. Got bad_words=['', 'a']"),
    ({"kv_transfer_params": {"a": 2**70}}, True, 400, "BadRequestError", "extra_args",
     "extra_args integers must be between -2**63 and 2**64 - 1. (parameter=extra_args)"),
    ({"prompt_embeds": "abc"}, False, 400, "BadRequestError", "prompt_embeds",
     "You must set `--enable-prompt-embeds` to input `prompt_embeds`."),
    ({"suffix": "s", "truncate_prompt_tokens": 5}, False, 400, "BadRequestError", "suffix",
     "suffix is not supported with truncate_prompt_tokens"),
    ({"n": None}, False, 400, "Bad Request", "body.n", "1 validation error:\n  {'type': 'int_type', 'loc': 'body.n'"),
    ({"priority": 2**70}, True, 400, "Bad Request", "body.priority", "1 validation error:\n  {'type': "
     "'less_than_equal', 'loc': 'body.priority'"),
    ({"use_beam_search": True, "n": 0}, True, 400, "BadRequestError", None, "beam_width must be at least 1, got 0."),
    # a named tool looked up in malformed tools as vLLM's loop looks: Python's KeyError is its 500, a TypeError its 400
    ({"tools": [{"type": "x"}], "tool_choice": {"type": "function", "function": {"name": "f"}}}, True, 500,
     "InternalServerError", None, "'function'"),
    ({"tools": "ab", "tool_choice": {"type": "function", "function": {"name": "f"}}}, True, 400, "BadRequestError",
     None, "string indices must be integers"),
    ({"structured_outputs": {"structural_tag": "not json"}}, True, 400, "BadRequestError", "structured_outputs",
     "Invalid structured_outputs structural_tag specification. (parameter=structured_outputs)"),
    ({"response_format": {"type": "structural_tag"}, "max_tokens": "x"}, False, 400, "BadRequestError",
     "response_format", "Invalid response_format structural_tag specification."),
    # a named tool choice's own type, among the other fields' errors; a legacy prompt's errors among the others'
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "user": 1,
      "tool_choice": {"type": "x", "function": {"name": "f"}}}, True, 400, "Bad Request", "body.tool_choice",
     "5 validation errors:\n  {'type': 'literal_error', 'loc': 'body.tool_choice'"),
    ({"prompt": 1, "user": 1}, False, 400, "Bad Request", "body.prompt", "5 validation errors:"),
    # response_format merged into structured_outputs, their dataclass built again
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a"}}}, True, 400, "BadRequestError", None,
     "You must use one kind of structured outputs constraint but none are specified"),
    ({"structured_outputs": {"choice": ["a"]}, "response_format": {"type": "json_object"}}, False, 400,
     "BadRequestError", None, "You can only use one kind of structured outputs constraint but multiple are"),
    # a "required" tool choice's one schema of every tool (the sim's default has a tool parser)
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"$defs": None}}}],
      "tool_choice": "required"}, True, 400, "BadRequestError", "tools",
     "`$defs` in the parameters of tool 'f' must be an object, got NoneType. (parameter=tools)"),
]


async def test_malformed_rarer_fields_are_refused_with_vllms_errors_and_leave_nothing_behind(engine):
    for fields, chat, status, error_type, param, start in REFUSED:
        for stream in (False, True):  # each refused before a stream starts
            answered, answer = await _post(engine.url, fields, chat, stream)
            assert answered == status, (fields, answer)
            error = answer["error"]
            assert error["message"].startswith(start), (fields, error["message"])
            assert (error["type"], error["param"], error["code"]) == (error_type, param, status), fields
    assert await _holds_nothing(engine)


async def test_a_legacy_completions_stream_is_refused_beam_search():
    # (chat's is served, as vLLM's)
    (handle,) = await start_sim_engines(1, SimEngineOptions(model=MODEL, time_scale=200.0))
    try:
        status, answer = await _post(handle.url, {"use_beam_search": True}, chat=False, stream=True)
        assert (status, answer["error"]["message"]) == (400, "Streaming is not currently supported with beam search")
        assert (await _post(handle.url, {"use_beam_search": True}, chat=True, stream=True))[0] == 200
    finally:
        await handle.stop()


async def test_valid_rarer_fields_are_served(engine):
    every = {"reasoning_effort": "low", "thinking_token_budget": -1, "include_reasoning": False,
             "use_beam_search": False, "watermarking": True, "length_penalty": 2.0, "include_stop_str_in_output": True,
             "spaces_between_special_tokens": False, "bad_words": ["x"], "documents": [{"a": "b"}],
             "media_io_kwargs": {}, "mm_processor_kwargs": None, "structured_outputs": {"regex": "a+"},
             "session_id": "s", "routed_experts_prompt_start": 0, "return_token_offsets": True, "mm_payload": "none",
             "return_mm_kwargs": False, "cache_salt": "abc", "kv_transfer_params": {"a": 1},
             "ec_transfer_params": {"b": [1]}, "vllm_xargs": {"a": [1, "x"], "b": 2**64 - 1},
             "repetition_detection": {"max_pattern_size": 2, "min_count": 2}, "stream_interval": 2}
    status, answer = await _post(engine.url, every)
    assert status == 200, answer
    assert answer["usage"]["completion_tokens"] > 0
    legacy = {key: value for key, value in every.items() if key not in (
        "reasoning_effort", "include_reasoning", "documents", "media_io_kwargs", "mm_processor_kwargs")}
    assert (await _post(engine.url, legacy, chat=False))[0] == 200


async def test_an_engine_refusal_is_a_400_or_a_streams_one_event(engine):
    message = ("thinking_token_budget is set but reasoning_config is not configured. Please set --reasoning-parser "
               "and/or --reasoning-config to use thinking_token_budget.")
    status, answer = await _post(engine.url, {"thinking_token_budget": 5})
    assert (status, answer["error"]["message"], answer["error"]["param"]) == (400, message, None)
    status, answer = await _post(engine.url, {"thinking_token_budget": 0}, chat=False, stream=True)
    assert status == 200
    assert answer == ('data: {"error": {"message": "' + message + '", "type": "BadRequestError", "param": null, '
                      '"code": 400}}\n\ndata: [DONE]\n\n')
    assert await _holds_nothing(engine)


async def test_a_data_parallel_rank_other_than_the_one_engines_is_refused_in_the_engine(engine):
    async with aiohttp.ClientSession() as session:
        for rank, refused in (("0", False), ("x", False), ("1", True), ("-1", True)):
            for stream in (False, True):
                async with session.post(engine.url + "/v1/completions", headers={"X-data-parallel-rank": rank},
                                        json={"model": MODEL, "prompt": "hi", "max_tokens": 2,
                                              "stream": stream}) as r:
                    text = await r.text()
                message = f"data_parallel_rank {rank} is out of range [0, 1)."
                assert (message in text) == refused and r.status == (400 if refused and not stream else 200), text
    assert await _holds_nothing(engine)


# engine refusals (a 400, a stream's one event): (fields, chat?, the start of the message)
ENGINE_REFUSED = [
    ({"routed_experts_prompt_start": 2**70}, True, "routed_experts_prompt_start must be between 0 and the prompt "
     "length ("),
    ({"logprobs": 1, "logprob_token_ids": [10**6]}, False, "token_id(s) [1000000] in logprob_token_ids contain "
     "out-of-vocab token ids."),
    ({"logprobs": True, "logprob_token_ids": list(range(129))}, True, "Requested logprob_token_ids of length 129, "
     "which is greater than max allowed: 128"),
    ({"structured_outputs": {"choice": []}}, True, "Choice '[]' cannot be an empty list"),
    ({"structured_outputs": {"json_object": False}}, False, "structured_outputs.json_object must be True if set"),
    ({"structured_outputs": {"regex": "a\u0000"}}, True, "structured_outputs.regex must not contain a NUL"),
    # beam search: the search's own sampling (2n logprobs, the temperature), not the request's SamplingParams
    ({"use_beam_search": True, "n": 11}, True, "Requested sample logprobs of 22, which is greater than max "
     "allowed: 20"),
    ({"use_beam_search": True, "temperature": 5}, True, "temperature must be in [0, 2], got 5.0."),
]


async def test_engine_refusals_of_the_rarer_fields_are_vllms(engine):
    for fields, chat, start in ENGINE_REFUSED:
        status, answer = await _post(engine.url, fields, chat)
        assert status == 400 and answer["error"]["message"].startswith(start), (fields, answer)
        status, text = await _post(engine.url, fields, chat, stream=True)
        assert status == 200 and _events(text)[-1]["error"]["message"].startswith(start), (fields, text)
    assert await _holds_nothing(engine)


async def test_logprob_token_ids_ask_for_no_sample_logprobs_and_beam_search_skips_sampling_checks(engine):
    for fields, chat in (({"logprobs": 21, "logprob_token_ids": [1, 2]}, False),
                         ({"use_beam_search": True, "top_p": 0, "min_tokens": 5, "stop": [""], "bad_words": [""],
                           "n": 2, "temperature": 0, "thinking_token_budget": 5}, True),
                         ({"use_beam_search": True, "max_tokens": 0}, True),
                         # json_object overridden by the response format; a forced call's schema replaces the
                         # request's own structured outputs
                         ({"structured_outputs": {"json_object": False}, "response_format": {"type": "json_object"}},
                          True),
                         ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required",
                           "structured_outputs": {"choice": []}, "max_tokens": 60}, True)):
        status, answer = await _post(engine.url, fields, chat)
        assert status == 200, (fields, answer)


async def test_what_vllms_engine_client_cannot_encode_is_its_500_without_a_message(engine):
    failure = {"error": {"message": "", "type": "InternalServerError", "param": None, "code": 500}}
    event = 'data: {"error": {"message": "", "type": "InternalServerError", "param": null, "code": 500}}\n\n'
    for fields in ({"stop": ["ok", "a" + S]}, {"request_id": "r" + S}, {"bad_words": ["a" + S]},
                   {"vllm_xargs": {S: 1}}, {"kv_transfer_params": {"x": S}}, {"session_id": "s" + S},
                   {"stop": "x" + S, "n": 2}, {"top_k": 2**64}, {"stream_interval": 2**64},
                   {"repetition_detection": {"max_pattern_size": 2**64, "min_pattern_size": 1, "min_count": 2}}):
        for chat in (True, False):
            assert await _post(engine.url, fields, chat) == (500, failure), fields
            assert await _post(engine.url, fields, chat, stream=True) == (200, event + "data: [DONE]\n\n"), fields
    # a beam search's requests carry only the request id and the session id of the request's own (a legacy completion
    # streams none)
    beam = {"use_beam_search": True, "session_id": "s" + S, "stop": ["x" + S], "top_k": 2**64}
    assert await _post(engine.url, beam) == (500, failure)
    assert (await _post(engine.url, {**beam, "session_id": "s"}))[0] == 200
    assert await _holds_nothing(engine)


async def test_an_answer_no_utf8_can_hold_is_a_400_or_a_streams_error_event_after_its_role(engine):
    name = "f" + S
    fields = {"tools": [{"type": "function", "function": {"name": name, "parameters": {"type": "object"}}}],
              "tool_choice": {"type": "function", "function": {"name": name}}}
    status, answer = await _post(engine.url, fields)
    error = answer["error"]
    assert (status, error["type"]) == (400, "BadRequestError")
    # the position is the name's surrogate's in the answer's JSON, as Starlette writes it
    assert error["message"].startswith("'utf-8' codec can't encode character '\\ud800' in position ")
    assert error["message"].endswith(": surrogates not allowed")
    for n in (1, 2):
        status, text = await _post(engine.url, {**fields, "n": n}, stream=True)
        events = _events(text)
        assert status == 200 and text.endswith("data: [DONE]\n\n")
        assert [event["choices"][0]["delta"]["role"] for event in events[:-1]] == ["assistant"] * n
        assert events[-1] == {"error": {
            "message": "Error serializing to JSON: UnicodeEncodeError: 'utf-8' codec can't encode character "
                       "'\\ud800' in position 1: surrogates not allowed",
            "type": "BadRequestError", "param": None, "code": 400}}
    assert await _holds_nothing(engine)


async def test_a_stream_interval_sends_a_chunk_every_so_many_tokens(engine):
    usage = {"include_usage": True, "continuous_usage_stats": True}
    for chat, fields, counts in (
            (True, {"max_tokens": 7, "stream_interval": 3}, [0, 1, 4, 7]),  # (chat's role chunk first)
            (False, {"max_tokens": 8, "stream_interval": 2}, [1, 3, 5, 7, 8]),
            (False, {"max_tokens": 5, "stream_interval": 9}, [1, 5])):
        status, text = await _post(engine.url, {**fields, "ignore_eos": True, "stream_options": usage}, chat,
                                   stream=True)
        assert status == 200, text
        assert [event["usage"]["completion_tokens"] for event in _events(text) if event["choices"]] == counts
