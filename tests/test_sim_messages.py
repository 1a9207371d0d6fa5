"""The simulated engine reads a chat request's messages as vLLM 0.32 does (:mod:`backends.sim.chat_messages`): it
refuses what vLLM refuses, with vLLM's errors, and serves what vLLM serves (the real-vLLM stage compares both
engines' answers to the same messages, byte for byte)."""

from __future__ import annotations

import json

import aiohttp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backends.sim import SimEngineOptions, start_sim_engines
from backends.sim.chat_messages import (check_parsed_messages, normalized_messages, plain_messages, tool_call_errors,
                                        validated_messages)
from backends.sim.responses import sanitized

MODEL = "sim-test"
CALL = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}


@pytest.fixture
async def engine():
    (handle,) = await start_sim_engines(1, SimEngineOptions(model=MODEL, time_scale=200.0, max_model_len=1024))
    yield handle
    await handle.stop()


async def _post(url: str, messages, stream: bool = False) -> tuple[int, dict | str]:
    async with aiohttp.ClientSession() as session:
        async with session.post(url + "/v1/chat/completions", json={
                "model": MODEL, "messages": messages, "max_tokens": 2, "stream": stream}) as r:
            raw = await r.read()
            if r.status == 200 and stream:
                return r.status, raw.decode()
            return r.status, json.loads(raw)


# messages vLLM 0.32 refuses, each with the start of its message, its error type and param (observed on a real one)
REFUSED = [
    (5, "'int' object is not iterable", "BadRequestError", None),
    (None, "'NoneType' object is not iterable", "BadRequestError", None),
    ("x", "1 validation error:\n  {'type': 'list_type', 'loc': 'body.messages'", "Bad Request", "body.messages"),
    ([], "Cannot apply chat template to an empty conversation.", "BadRequestError", None),
    ([5], "8 validation errors:\n  {'type': 'dict_type', 'loc': 'body.messages.0.ChatCompletionDeveloperMessageParam'",
     "Bad Request", "body.messages.0.ChatCompletionDeveloperMessageParam"),
    ([{"content": "hi"}], "11 validation errors:\n  {'type': 'missing', 'loc': "
     "'body.messages.0.ChatCompletionDeveloperMessageParam.role'", "Bad Request",
     "body.messages.0.ChatCompletionDeveloperMessageParam.role"),
    ([{"role": "user", "content": None}], "19 validation errors:", "Bad Request",
     "body.messages.0.ChatCompletionDeveloperMessageParam.content"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": 5}, {"content": "b"}], "33 validation errors:\n  "
     "{'type': 'string_type', 'loc': 'body.messages.1.", "Bad Request",
     "body.messages.1.ChatCompletionDeveloperMessageParam.content"),
    ([{"role": "user", "content": [{"type": "text"}]}], "7 validation errors for ValidatorIterator\n"
     "0.ChatCompletionContentPartTextParam.text\n  Field required", "BadRequestError", None),
    ([{"role": "assistant", "tool_calls": 5}], "'int' object is not iterable", "BadRequestError", None),
    ([{"role": "assistant", "tool_calls": [CALL, {"id": "b"}]}], "4 validation errors:\n  {'type': 'missing', 'loc': "
     "'body.1.ChatCompletionMessageFunctionToolCallParam.function'", "Bad Request",
     "body.1.ChatCompletionMessageFunctionToolCallParam.function"),
    ([{"role": "assistant", "tool_calls": [{"id": "a", "type": "custom", "custom": {"input": "x", "name": "f"}}]}],
     "chat completions only support assistant tool_calls of type 'function'. (parameter=tool_calls)",
     "BadRequestError", "tool_calls"),
    ([{"role": "nobody", "content": [{"type": "foo"}]}], "Unsupported chat content part type: 'foo'. Supported types: "
     "audio_embeds, audio_url,", "BadRequestError", "type"),
    ([{"role": "nobody", "content": [{"name": "x"}]}], "Missing 'type' field in multimodal part. (parameter=type)",
     "BadRequestError", "type"),
    ([{"role": "nobody", "content": [{"type": "image_url", "image_url": "x"}]}],
     "1 validation error for ChatCompletionContentPartImageParam\nimage_url\n  Input should be a valid dictionary",
     "BadRequestError", None),
    ([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "x"}},
                                   {"type": "text"}]}], f"{MODEL} is not a multimodal model", "BadRequestError", None),
    ([{"role": "nobody", "content": [{"type": "image_embeds", "image_embeds": "x"}]}], "The model is not multimodal.",
     "BadRequestError", None),
    ([{"role": "nobody", "content": [{"type": "text", "text": 5}]}], "sequence item 0: expected str instance, int "
     "found", "BadRequestError", None),
    ([{"author": {"role": "user"}, "content": []}], "'Message' object is not subscriptable", "BadRequestError", None),
    # a system part's type is logged through a cache, which cannot hold a list (the first validator to run)
    ([{"role": "system", "content": [{"type": ["a"]}]}], "unhashable type: 'list'", "BadRequestError", None),
    # what the tokenizer cannot take: a lone surrogate in a role or a text
    ([{"role": "user", "content": "a\ud800"}], "TextEncodeInput must be Union[TextInputSequence, Tuple[InputSequence, "
     "InputSequence]]", "BadRequestError", None),
    ([{"role": "nobody", "content": [{"type": "text", "text": "\ud800"}]}], "TextEncodeInput", "BadRequestError",
     None),
    # paths and addresses are taken out of every error message (vLLM's sanitize_message)
    ([{"role": "nobody", "content": [{"type": "/home/me/x"}]}], "Unsupported chat content part type: '<path>'.",
     "BadRequestError", "type"),
    # the parts vLLM's chat serving reads after rendering (for a default LoRA): a string part holding "type"
    ([{"role": "nobody", "content": ["my type"]}], "string indices must be integers, not 'str'", "BadRequestError",
     None),
]

# messages vLLM 0.32 serves though they are not the OpenAI API's (its custom message takes any role)
SERVED = [
    [{"role": "user"}], [{"role": "tool", "content": "x"}], [{"role": "nobody", "content": "hi"}],
    [{"role": "user", "content": []}], [{"role": "nobody", "content": [{"type": "text"}]}],
    [{"role": "user", "content": [{"type": "text", "text": "a"}, "b"]}],
    [{"role": "nobody", "content": ["a", {"type": "thinking", "thinking": "x"}, {"type": "tool_reference",
                                                                               "name": "t"}]}],
    [{"role": "assistant", "content": None, "tool_calls": [CALL]}, {"role": "tool", "content": "r",
                                                                     "tool_call_id": "c1"}],
    [{"role": "assistant", "tool_calls": [{**CALL, "function": {"name": "f", "arguments": "{"}}]}],
    [{"role": "assistant", "tool_calls": []}, {"role": "user", "content": "hi"}],
    [{"role": "user", "content": "hi", "reasoning_content": 5}], [{"role": "developer", "content": "x", "tools": 5}],
    [{"role": "system", "content": [{"type": "text", "text": "x-anthropic-billing-header: cch=1\nhello"}]}],
    # Claude Code's billing header is dropped from a system message's text (a part that holds only it, uuid and all)
    [{"role": "system", "content": [{"type": "text", "text": "x-anthropic-billing-header", "uuid": "u"}]}],
    [{"role": "user", "content": "x", "name": "\ud800"}],  # a name is not rendered
    # ... and so is a line of it that holds what the tokenizer cannot take, in a message taken as it is
    [{"role": "system", "content": "x-anthropic-billing-header: cch=\ud800\nYou help"}, {"role": "user",
                                                                                         "content": "hi"}],
]


async def test_messages_vllm_refuses_are_refused_with_its_errors_and_leave_nothing_behind(engine):
    for messages, start, error_type, param in REFUSED:
        for stream in (False, True):  # a stream is refused before it starts
            status, answer = await _post(engine.url, messages, stream)
            assert status == 400, (messages, answer)
            error = answer["error"]
            assert error["message"].startswith(start), (messages, error["message"])
            assert (error["type"], error["param"]) == (error_type, param), messages
    assert engine.engine.num_running == engine.engine.num_waiting == 0


async def test_messages_vllm_serves_are_served(engine):
    for messages in SERVED:
        status, answer = await _post(engine.url, messages)
        assert status == 200, (messages, answer)
        assert answer["usage"]["prompt_tokens"] > 0
    status, answer = await _post(engine.url, SERVED[7], stream=True)
    assert status == 200 and answer.endswith("data: [DONE]\n\n")


async def test_where_vllms_own_code_fails_on_a_value_the_answer_is_its_500(engine):
    for messages, message in (
            ([{"role": "nobody", "content": [{"input_audio": 5}]}], "'int' object has no attribute 'get'"),
            ([{"role": "nobody", "content": [{"type": None, "tool_reference": "x"}]}],
             "'NoneType' object has no attribute 'split'")):
        status, answer = await _post(engine.url, messages)
        assert status == 500 and answer["error"] == {"message": message, "type": "InternalServerError",
                                                     "param": None, "code": 500}, answer
    assert engine.engine.num_running == engine.engine.num_waiting == 0


async def test_an_error_message_no_utf8_holds_is_answered_as_vllms_server_answers_it(engine):
    """A lone surrogate from the request in an error message: Starlette's encoding of the error fails, and vLLM's
    ValueError handler answers 400 with that failure (pydantic's errors show a value's repr, which escapes it)."""
    chat = [{"role": "user", "content": "hi"}]
    tools = [{"type": "function", "function": {"name": "f"}}]
    async with aiohttp.ClientSession() as session:
        for body, position in (({"model": "\ud800", "messages": chat}, 32),  # the route's 404
                               ({"model": MODEL, "messages": chat, "tools": tools, "tool_choice": "\ud800"}, 54),
                               ({"model": MODEL, "messages": [{"role": "nobody", "content": [{"type": "\ud800"}]}]},
                                301)):  # a validator's, the renderer's
            async with session.post(engine.url + "/v1/chat/completions", json=body) as r:
                assert r.status == 400
                assert (await r.json())["error"]["message"] == (
                    f"'utf-8' codec can't encode character '\\ud800' in position {position}: surrogates not allowed")
    assert engine.engine.num_running == engine.engine.num_waiting == 0


async def test_of_two_refusals_the_one_vllm_gives_first_is_given(engine):
    async with aiohttp.ClientSession() as session:
        async def error(path: str, body: dict) -> str:
            async with session.post(engine.url + path, json={"model": MODEL, **body}) as r:
                assert r.status == 400
                return (await r.json())["error"]["message"]

        # the chat renderer reads its TokenizeParams (max_tokens within the context) before the messages
        image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
        for messages in (image, []):
            assert (await error("/v1/chat/completions", {"messages": messages, "max_tokens": 99999})).startswith(
                "max_tokens=99999 cannot be greater than max_model_len=1024.")
        # the template refuses before the tokenizer; the parts read for a LoRA, after the length, before sampling
        assert (await error("/v1/chat/completions", {"messages": [{"role": "user", "content": "\ud800"}],
                                                     "continue_final_message": True})).startswith(
            "continue_final_message and add_generation_prompt are not compatible.")
        assert "maximum context length" in await error("/v1/chat/completions", {
            "messages": [{"role": "nobody", "content": ["my type " * 1500]}]})
        assert (await error("/v1/chat/completions", {"messages": [{"role": "nobody", "content": ["my type"]}],
                                                     "n": 0})).startswith("string indices")
        # a legacy completion: suffix, then TokenizeParams, then no prompt or one the tokenizer cannot take
        assert (await error("/v1/completions", {"prompt": "once", "suffix": "x", "max_tokens": 99999})).startswith(
            "suffix is only supported")
        assert (await error("/v1/completions", {"prompt": [], "max_tokens": 99999})).startswith("max_tokens=99999")
        for prompt in ("\ud800", ["a", "b\ud800"]):
            assert (await error("/v1/completions", {"prompt": prompt})).startswith("TextEncodeInput"), prompt


def test_error_messages_lose_paths_addresses_and_traceback_lines_as_vllms_do():
    assert sanitized("see /tmp/a/b and /usr/lib/x.so") == "see <path> and <path>"
    assert sanitized("a/b/c.png and ./d/e.txt") == "a<path> and .<path>"
    assert sanitized("<object at 0xdeadbeef> x") == "<object> x"
    assert sanitized('oops\n  File "a.py", line 3, in f\n    raise X\nend') == "oops\nend"
    assert sanitized("  plain text, https://errors.pydantic.dev/2.14/v/missing  ") == (
        "plain text, https://errors.pydantic.dev/2.14/v/missing")


def test_the_request_stays_as_sent():
    """The messages are read from a copy: the body the engine keeps (its prompt's tokens, an echo) is the client's."""
    messages = [{"role": "assistant", "tool_calls": "ab", "reasoning_content": "r"}]
    normalized = normalized_messages(messages)
    assert normalized == [{"role": "assistant", "tool_calls": ["a", "b"], "reasoning": "r"}]
    assert messages == [{"role": "assistant", "tool_calls": "ab", "reasoning_content": "r"}]
    read, errors = validated_messages([{"role": "assistant", "tool_calls": [CALL]}])
    assert errors == [] and tool_call_errors(read) == [] and read[0]["tool_calls"] == [CALL]


_TEXT = st.text(max_size=20)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.fixed_dictionaries({"role": st.one_of(st.sampled_from(
    ["system", "user", "assistant", "tool", "developer", "function"]), _TEXT), "content": _TEXT},
    optional={"name": _TEXT}), min_size=1, max_size=6))
def test_messages_read_without_pydantic_are_ones_pydantic_takes(messages):
    """Plain messages (a role, a text, perhaps a name) skip pydantic: only where vLLM's reading serves them."""
    assert plain_messages(messages)
    read, errors = validated_messages(normalized_messages(messages))
    assert errors == [] and tool_call_errors(read) == []
    check_parsed_messages(read, MODEL)  # raises MessageRefusal where vLLM's parser would refuse


def test_what_is_not_plain_is_read_with_pydantic():
    for messages in ([], [{"role": "user", "content": "a", "tool_calls": []}], [{"role": 5, "content": "a"}],
                     [{"role": "user", "content": "a", "name": None}], [{"role": "user", "content": ["a"]}], ["a"],
                     ({"role": "user", "content": "a"},)):
        assert not plain_messages(messages), messages
