"""What the simulated engine sends back of a prompt, as vLLM 0.32 does: ``echo``, ``prompt_logprobs``,
``return_token_ids``, ``return_prompt_text`` (the real-vLLM stage compares the shapes engine to engine)."""

from __future__ import annotations

import json

import aiohttp
import pytest

from backends.sim import SimEngineOptions, start_sim_engines
from backends.sim.prompt_tokens import BOS_TOKEN, EOS_TOKEN, chat_prompt_tokens, completion_prompt_tokens, token_id
from backends.sim.filler import WORDS
from backends.sim.prompt_tokens import estimate_chat_prompt_tokens, estimate_completion_prompt_tokens

MODEL = "sim-test"
VOCAB = 128256
CHAT = [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "Well,"}]


@pytest.fixture
async def url():
    (handle,) = await start_sim_engines(1, SimEngineOptions(model=MODEL, time_scale=200.0, max_model_len=1024))
    yield handle.url
    await handle.stop()


async def _answer(url: str, path: str, body: dict) -> dict | list[dict]:
    """A whole answer's JSON, or a stream's chunks (its data events but [DONE])."""
    async with aiohttp.ClientSession() as session:
        async with session.post(url + path, json={"model": MODEL, "temperature": 1.0, **body}) as r:
            raw = await r.read()
            assert r.status == 200, raw
    if not body.get("stream"):
        return json.loads(raw)
    return [json.loads(e[len(b"data: "):]) for e in raw.split(b"\n\n") if e.startswith(b"data: {")]


def test_a_prompt_splits_into_as_many_tokens_as_its_estimate():
    for prompt in ("", "a", "once upon a time", "x" * 4001, [5, 6, 7], [0]):
        tokens = completion_prompt_tokens(prompt, VOCAB, WORDS)
        assert len(tokens.texts) == len(tokens.ids) == estimate_completion_prompt_tokens(prompt), prompt
    text = completion_prompt_tokens("once upon", VOCAB, WORDS)
    assert text.texts == [BOS_TOKEN, "once", " upo", "n"] and text.ids[0] == 128000 and text.echo_text == "once upon"
    ids = completion_prompt_tokens([5, 6, 7], VOCAB, WORDS)
    assert ids.ids == [5, 6, 7] and ids.echo_text == "".join(ids.texts)
    for messages in (CHAT, [{"role": "user", "content": [{"type": "text", "text": "abc"}, {"type": "image_url"}]}],
                     [{"role": "assistant", "content": None, "tool_calls": []}], ["not a message"],
                     [{"role": "nobody", "content": ["abcd" * 10, {"type": "thinking", "thinking": "x" * 8}]}]):
        tokens = chat_prompt_tokens(messages, VOCAB)
        assert len(tokens.texts) == len(tokens.ids) == estimate_chat_prompt_tokens(messages), messages
    # a part that is a string and a thinking part hold text too (a fuzz found them counted as none), the texts
    # joined by new lines
    assert estimate_chat_prompt_tokens([{"role": "nobody", "content": ["abcd" * 10, {"type": "thinking",
                                                                                      "thinking": "x" * 8}]}]) == 19
    assert token_id(EOS_TOKEN, VOCAB) == 128009 and token_id(EOS_TOKEN, 1000) < 1000  # a small vocabulary's own


async def test_a_completions_echo_starts_with_the_prompt_whole_and_streamed(url):
    whole = await _answer(url, "/v1/completions", {"prompt": "once upon", "max_tokens": 3, "echo": True})
    [choice] = whole["choices"]
    assert choice["text"].startswith("once upon ") and len(choice["text"].split()) == 2 + 3
    assert choice["prompt_token_ids"] is None and choice["prompt_logprobs"] is None  # asked for neither
    chunks = await _answer(url, "/v1/completions", {"prompt": "once upon", "max_tokens": 3, "echo": True,
                                                    "stream": True, "ignore_eos": True})
    text = "".join(c["choices"][0]["text"] for c in chunks)
    assert text.startswith("once upon ") and len(text.split()) == 5
    # vLLM's stream names the prompt's ids on its first chunk when it echoes
    assert chunks[0]["choices"][0]["prompt_token_ids"] == completion_prompt_tokens("once upon", VOCAB, WORDS).ids
    assert all(c["choices"][0]["prompt_token_ids"] is None for c in chunks[1:])
    # without generation (max_tokens 0): the prompt alone, one token computed
    for stream in (False, True):
        answer = await _answer(url, "/v1/completions", {"prompt": "once upon", "max_tokens": 0, "echo": True,
                                                        "stream": stream})
        if stream:
            assert [c["choices"][0]["text"] for c in answer] == ["once upon"], answer
        else:
            assert answer["choices"][0]["text"] == "once upon" and answer["usage"]["completion_tokens"] == 1


async def test_a_batch_echoes_each_prompt_in_its_answers(url):
    ids_texts = [completion_prompt_tokens(ids, VOCAB, WORDS).echo_text for ids in ([5, 6], [7])]
    for prompts, echoed in ((["once", "upon a"], ["once", "upon a"]), ([[5, 6], [7]], ids_texts)):
        for stream in (False, True):
            answer = await _answer(url, "/v1/completions", {"prompt": prompts, "max_tokens": 2, "n": 2,
                                                            "echo": True, "ignore_eos": True, "stream": stream})
            texts: dict[int, str] = {}
            for chunk in (answer if stream else [answer]):
                for choice in chunk["choices"]:
                    texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
            assert [texts[i].startswith(echoed[i // 2]) and len(texts[i]) > len(echoed[i // 2])
                    for i in range(4)] == [True] * 4, texts


async def test_an_echo_with_logprobs_lists_the_prompts_tokens_first(url):
    prompt = completion_prompt_tokens("once upon", VOCAB, WORDS)
    for stream in (False, True):
        answer = await _answer(url, "/v1/completions", {"prompt": "once upon", "max_tokens": 2, "echo": True,
                                                        "logprobs": 1, "ignore_eos": True, "stream": stream})
        blocks = [c["choices"][0]["logprobs"] for c in answer] if stream else [answer["choices"][0]["logprobs"]]
        tokens = [t for b in blocks for t in b["tokens"]]
        logprobs = [v for b in blocks for v in b["token_logprobs"]]
        tops = [t for b in blocks for t in b["top_logprobs"]]
        offsets = [o for b in blocks for o in b["text_offset"]]
        assert tokens[:4] == prompt.texts and len(tokens) == 4 + 2, tokens
        assert logprobs[0] is None and tops[0] is None and all(isinstance(v, float) for v in logprobs[1:])
        assert all(len(top) == 2 for top in tops[1:4])  # the prompt's token and one alternative
        assert offsets == [sum(map(len, tokens[:i])) for i in range(len(tokens))]  # on through the chunks
    whole = await _answer(url, "/v1/completions", {"prompt": "once upon", "max_tokens": 0, "echo": True,
                                                   "logprobs": 0})
    assert whole["choices"][0]["logprobs"]["tokens"] == prompt.texts  # the prompt's alone


async def test_prompt_logprobs_name_each_prompt_token_after_the_first(url):
    for path, body, count in (("/v1/completions", {"prompt": "once upon", "prompt_logprobs": 2}, 4),
                              ("/v1/chat/completions", {"messages": CHAT, "prompt_logprobs": 0},
                               estimate_chat_prompt_tokens(CHAT)),
                              # chat's echo asks for top_logprobs (0 by default), a legacy echo for logprobs
                              ("/v1/chat/completions", {"messages": CHAT, "echo": True}, None),
                              ("/v1/completions", {"prompt": "once upon", "echo": True, "logprobs": 1}, 4)):
        answer = await _answer(url, path, {"max_tokens": 2, **body})
        entries = answer["prompt_logprobs"] if "messages" in body else answer["choices"][0]["prompt_logprobs"]
        assert len(entries) == answer["usage"]["prompt_tokens"] == (count or len(entries))
        assert entries[0] is None
        alternatives = body.get("prompt_logprobs", body.get("logprobs", 0))
        for entry in entries[1:]:
            assert len(entry) == alternatives + 1, entry  # the prompt's token and its alternatives
            ranks = sorted(value["rank"] for value in entry.values())
            assert ranks[:alternatives] == list(range(1, alternatives + 1)) and ranks[-1] > alternatives
            assert all(set(value) == {"logprob", "rank", "decoded_token"} for value in entry.values())
    plain = await _answer(url, "/v1/completions", {"prompt": "once upon", "max_tokens": 2, "echo": True})
    assert plain["choices"][0]["prompt_logprobs"] is None  # a legacy echo without logprobs asks for none


async def test_a_chat_echo_starts_with_the_last_message_of_the_answers_role(url):
    whole = await _answer(url, "/v1/chat/completions", {"messages": CHAT, "max_tokens": 2, "echo": True})
    assert whole["choices"][0]["message"]["content"].startswith("Well, ")
    parts = [{"role": "user", "content": "hi"},
             {"role": "assistant", "content": [{"type": "text", "text": "Well,"}, {"type": "text", "text": "so"}]}]
    whole = await _answer(url, "/v1/chat/completions", {"messages": parts, "max_tokens": 2, "echo": True})
    assert whole["choices"][0]["message"]["content"].startswith("Well,\nso ")
    # the message's texts as vLLM's parser reads them: string, text and refusal parts, the empty ones left out
    parts[-1]["content"] = ["abc", {"type": "text", "text": ""}, {"type": "refusal", "refusal": "R"},
                            {"type": "text", "text": "d"}]
    whole = await _answer(url, "/v1/chat/completions", {"messages": parts, "max_tokens": 2, "echo": True})
    assert whole["choices"][0]["message"]["content"].startswith("abc\nR\nd ")
    # the last message is the user's: nothing to echo
    whole = await _answer(url, "/v1/chat/completions", {"messages": CHAT[:1], "max_tokens": 2, "echo": True})
    assert len(whole["choices"][0]["message"]["content"].split()) == 2
    # streamed: every answer's role chunk, then every answer's echo chunk, then the tokens
    chunks = await _answer(url, "/v1/chat/completions", {"messages": CHAT, "max_tokens": 2, "echo": True, "n": 2,
                                                         "stream": True})
    firsts = [(c["choices"][0]["index"], c["choices"][0]["delta"]) for c in chunks[:4]]
    assert firsts == [(0, {"role": "assistant", "content": ""}), (1, {"role": "assistant", "content": ""}),
                      (0, {"content": "Well,"}), (1, {"content": "Well,"})], firsts


async def test_return_token_ids_name_the_prompts_and_each_answers_tokens(url):
    prompt = completion_prompt_tokens("once upon", VOCAB, WORDS)
    whole = await _answer(url, "/v1/completions", {"prompt": "once upon", "max_tokens": 3, "return_token_ids": True,
                                                   "echo": True})
    [choice] = whole["choices"]
    assert choice["prompt_token_ids"] == prompt.ids and len(choice["token_ids"]) == 3
    assert len(choice["text"].split()) == 3  # vLLM echoes no text with return_token_ids
    chunks = await _answer(url, "/v1/completions", {"prompt": "once upon", "max_tokens": 3, "return_token_ids": True,
                                                    "stream": True, "ignore_eos": True})
    assert sum(len(c["choices"][0]["token_ids"]) for c in chunks) == 3
    assert chunks[0]["choices"][0]["prompt_token_ids"] == prompt.ids
    chat = chat_prompt_tokens(CHAT, VOCAB)
    whole = await _answer(url, "/v1/chat/completions", {"messages": CHAT, "max_tokens": 3, "return_token_ids": True,
                                                        "return_prompt_text": True})
    assert whole["prompt_token_ids"] == chat.ids and len(whole["choices"][0]["token_ids"]) == 3
    assert whole["prompt_text"] == "".join(chat.texts)
    chunks = await _answer(url, "/v1/chat/completions", {"messages": CHAT, "max_tokens": 3, "return_token_ids": True,
                                                         "stream": True, "ignore_eos": True})
    assert chunks[0]["prompt_token_ids"] == chat.ids and "token_ids" not in chunks[0]["choices"][0]
    assert sum(len(c["choices"][0]["token_ids"]) for c in chunks[1:]) == 3
    # an answer that ends by itself ends with the end-of-sequence token's id
    for _ in range(20):
        whole = await _answer(url, "/v1/chat/completions", {"messages": CHAT, "max_tokens": 50,
                                                            "return_token_ids": True})
        if whole["choices"][0]["finish_reason"] == "stop":
            assert whole["choices"][0]["token_ids"][-1] == 128009
            break
    else:
        pytest.fail("no answer ended by itself in 20 draws")


async def test_truncation_cuts_the_prompts_tokens_not_its_echo(url):
    whole = await _answer(url, "/v1/completions", {"prompt": "once upon a time", "max_tokens": 1, "echo": True,
                                                   "truncate_prompt_tokens": 2, "logprobs": 0})
    [choice] = whole["choices"]
    kept = completion_prompt_tokens("once upon a time", VOCAB, WORDS).texts[-2:]
    assert choice["text"].startswith("once upon a time") and choice["logprobs"]["tokens"][:2] == kept
    assert len(choice["prompt_logprobs"]) == whole["usage"]["prompt_tokens"] == 2


async def test_a_forced_tool_calls_stream_names_every_tokens_id(url):
    """vLLM sends a chunk for every token of a forced tool call where ``return_token_ids`` asks for them (those that
    write no arguments with an empty delta); without it, none for them."""
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "required": ["city"], "properties": {"city": {"type": "string"}}}}}
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        body = {"messages": CHAT[:1], "tools": [weather], "tool_choice": choice, "max_tokens": 100}
        whole = await _answer(url, "/v1/chat/completions", {**body, "return_token_ids": True})
        ids = whole["choices"][0]["token_ids"]
        assert len(ids) == whole["usage"]["completion_tokens"] and ids[-1] == 128009
        chunks = await _answer(url, "/v1/chat/completions", {**body, "return_token_ids": True, "stream": True})
        assert [i for c in chunks[1:] for i in c["choices"][0]["token_ids"]] == ids, choice
        assert all(len(c["choices"][0]["token_ids"]) >= 1 for c in chunks[1:])
        plain = await _answer(url, "/v1/chat/completions", {**body, "stream": True})
        assert all(c["choices"][0].get("token_ids") is None for c in plain)
        if choice == "required":  # the JSON around the arguments: empty deltas with ids, no chunks without
            assert any(c["choices"][0]["delta"] == {} for c in chunks[1:-1])
            assert len(plain) < len(chunks)
        # logprobs too, as vLLM gives them for a forced call: an entry per token, four characters of its JSON each
        whole = await _answer(url, "/v1/chat/completions", {**body, "logprobs": True, "top_logprobs": 1})
        entries = whole["choices"][0]["logprobs"]["content"]
        assert len(entries) == whole["usage"]["completion_tokens"] and all(len(e["top_logprobs"]) == 1
                                                                          for e in entries)
        written = json.loads("".join(e["token"] for e in entries[:-1]))  # (the last: the end-of-sequence token)
        arguments = json.loads(whole["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"])
        assert (written[0]["parameters"] if choice == "required" else written) == arguments
        chunks = await _answer(url, "/v1/chat/completions", {**body, "logprobs": True, "stream": True})
        assert sum(len((c["choices"][0]["logprobs"] or {}).get("content") or ()) for c in chunks[1:]) == len(entries)
