"""A prompt as the simulated engine's made-up tokenizer splits it: what vLLM sends back of a prompt.

vLLM returns a prompt's tokens where a request asks for them: ``echo`` (a legacy completion's text starts with its
prompt, a stream's first chunk carries the prompt's token ids), ``prompt_logprobs`` (one entry a prompt token),
``return_token_ids``. The simulated engine has no tokenizer; it counts a prompt's tokens by a deterministic
estimate (:func:`estimate_chat_prompt_tokens`, :func:`estimate_completion_prompt_tokens`), and this module splits
the prompt into exactly that many tokens, so that what it sends back agrees with its ``usage.prompt_tokens``:

* a legacy completion's text prompt: the model's begin-of-text token, then the text in pieces of four characters
  (``ceil(len / 4) + 1`` tokens); its token ids: the ids as given, each written as a filler word (what the sim's
  "detokenizer" makes of an id);
* a chat prompt: for every message ``<|start_header_id|>``, its role, ``<|end_header_id|>``, its text in pieces of
  four characters, ``<|eot_id|>``; then the generation prompt, ``<|start_header_id|>`` and ``assistant`` (the
  default model is a Llama 3; the template is abridged to the estimate's four tokens a message).

Only requests that ask for a prompt's tokens pay for the split; every other request keeps the cheap estimate.
"""

from __future__ import annotations

import math
import zlib
from typing import Any, Sequence

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|eot_id|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
CHARS_PER_TOKEN = 4
# Llama 3's ids of its special tokens (the default simulated model's); within a smaller vocabulary they get a
# stable id like any other token
SPECIAL_TOKEN_IDS = {BOS_TOKEN: 128000, START_HEADER: 128006, END_HEADER: 128007, EOS_TOKEN: 128009}


def token_id(token: str, vocab_size: int) -> int:
    """A stable id for a simulated token, within the vocabulary (what ``return_token_ids`` and
    ``return_tokens_as_token_ids`` show): a special token's Llama 3 id, another's a hash of its text."""
    special = SPECIAL_TOKEN_IDS.get(token)
    if special is not None and special < vocab_size:
        return special
    return zlib.crc32(token.encode()) % vocab_size


def text_pieces(text: str) -> list[str]:
    """``text`` in pieces of four characters: ``ceil(len / 4)`` tokens, the estimate's count."""
    return [text[start:start + CHARS_PER_TOKEN] for start in range(0, len(text), CHARS_PER_TOKEN)]


class PromptTokens:
    """One prompt's tokens: their texts and ids, and the text an ``echo`` sends back (the prompt as sent, or
    for token ids their "detokenized" text)."""

    __slots__ = ("texts", "ids", "echo_text")

    def __init__(self, texts: list[str], ids: list[int], echo_text: str) -> None:
        self.texts = texts
        self.ids = ids
        self.echo_text = echo_text

    def kept(self, keep: int, side: str | None) -> PromptTokens:
        """After ``truncate_prompt_tokens``: the last ``keep`` tokens, or the first with ``side`` "right". An
        echo still sends the prompt as it was sent (vLLM echoes the request's text, not the truncated tokens)."""
        if keep >= len(self.ids):
            return self
        cut = slice(None, keep) if side == "right" else slice(len(self.ids) - keep, None)
        return PromptTokens(self.texts[cut], self.ids[cut], self.echo_text)


def completion_prompt_tokens(prompt: str | list[int], vocab_size: int, words: Sequence[str]) -> PromptTokens:
    """A legacy completion's prompt (one of a batch): its text, or its token ids."""
    if isinstance(prompt, str):
        texts = [BOS_TOKEN, *text_pieces(prompt)]
        return PromptTokens(texts, [token_id(text, vocab_size) for text in texts], prompt)
    texts = [words[tid % len(words)] for tid in prompt]
    return PromptTokens(texts, list(prompt), "".join(texts))


# the field that holds the text of a content part of each type vLLM's parser reads as text (a chat template that
# takes text, vLLM's "string" content format: a tool reference is its name)
_TEXT_FIELDS = {"text": "text", "input_text": "text", "output_text": "text", "refusal": "refusal",
                "thinking": "thinking", "tool_reference": "name"}


def part_text(part: Any) -> str:
    """A content part's text as vLLM's message parser reads it: a string part, or a text part's field (a part
    without a type but with a ``tool_reference``: its name); "" for other parts and for a text that is no string."""
    if isinstance(part, str):
        return part
    if not isinstance(part, dict):
        return ""
    kind = part.get("type")
    field = _TEXT_FIELDS.get(kind) if isinstance(kind, str) else "name" if kind is None and "tool_reference" in part \
        else None
    text = part.get(field) if field is not None else None
    return text if isinstance(text, str) else ""


def message_text(content: Any) -> str:
    """A message's text as vLLM renders it: the string, or its parts' texts (:func:`part_text`, those not empty)
    joined by new lines."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(text for text in map(part_text, content) if text)
    return ""


def chat_prompt_tokens(messages: list, vocab_size: int) -> PromptTokens:
    """A chat request's rendered prompt (the module docstring's abridged template), as many tokens as the
    estimate counts."""
    texts: list[str] = []
    for message in messages:
        role = message.get("role") if isinstance(message, dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        texts += [START_HEADER, role if isinstance(role, str) else "", END_HEADER, *text_pieces(message_text(content)),
                  EOS_TOKEN]
    texts += [START_HEADER, "assistant"]
    return PromptTokens(texts, [token_id(text, vocab_size) for text in texts], "")


def echo_prefix(messages: Any, role: str) -> str:
    """What a chat ``echo`` writes before the answer: the last message's text (:func:`message_text`) where that
    message is the answer's role (vLLM's chat serving: the answer continues it)."""
    last = messages[-1] if isinstance(messages, list) and messages else None
    if not isinstance(last, dict) or last.get("role") != role:
        return ""
    return message_text(last.get("content"))


class PromptReturn:
    """What a request asks its answers to send back of its prompt(s), where it asks for anything (nearly no
    request does; the answer then pays nothing for it):

    * ``prompts``: each prompt's tokens (a batch's in order; one for chat);
    * ``echo_texts``: what each prompt's answers start with (a legacy completion's ``echo``: the prompt as sent,
      none with ``return_token_ids``; chat's ``echo``: the last message where it is the answer's role);
    * ``echo_only``: a legacy completion's ``echo`` with ``max_tokens: 0`` (the prompt back, no generated text);
    * ``echo_logprobs``: a legacy completion's ``echo`` with ``logprobs`` (the prompt's tokens lead them);
    * ``prompt_logprobs``: the alternatives a whole answer's ``prompt_logprobs`` lists per token, or None;
    * ``token_ids``: ``return_token_ids`` (the prompt's and each answer's ids);
    * ``stream_prompt_ids``: a stream's first chunk carries the prompt's ids (``return_token_ids``, and a legacy
      completion's ``echo``, which vLLM's stream sends them with);
    * ``prompt_text``: chat's ``return_prompt_text``, the rendered prompt, or None;
    * ``vocab_size``: the vocabulary the ids are drawn from.
    """

    __slots__ = ("prompts", "echo_texts", "vocab_size", "echo_only", "echo_logprobs", "prompt_logprobs", "token_ids",
                 "stream_prompt_ids", "prompt_text")

    def __init__(self, prompts: list[PromptTokens], echo_texts: list[str], vocab_size: int, *, echo_only: bool = False,
                 echo_logprobs: bool = False, prompt_logprobs: int | None = None, token_ids: bool = False,
                 stream_prompt_ids: bool = False, prompt_text: str | None = None) -> None:
        self.prompts = prompts
        self.echo_texts = echo_texts
        self.vocab_size = vocab_size
        self.echo_only = echo_only
        self.echo_logprobs = echo_logprobs
        self.prompt_logprobs = prompt_logprobs
        self.token_ids = token_ids
        self.stream_prompt_ids = stream_prompt_ids
        self.prompt_text = prompt_text

    def kept(self, keep: int, side: str | None) -> None:
        """Every prompt after ``truncate_prompt_tokens`` (see :meth:`PromptTokens.kept`)."""
        self.prompts = [prompt.kept(keep, side) for prompt in self.prompts]


def _text_len(content: Any) -> int:
    return len(message_text(content))


def estimate_chat_prompt_tokens(messages: list) -> int:
    """4 per message + ceil(chars/4) of its text + 2 for the generation prompt (the rule in
    :mod:`backends.sim.server`'s docstring)."""
    total = 2
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        total += 4 + math.ceil(_text_len(content) / 4)
    return max(1, total)


def estimate_completion_prompt_tokens(prompt: Any) -> int:
    if isinstance(prompt, list):
        if len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            return estimate_completion_prompt_tokens(prompt[0])
        return max(1, len(prompt))  # token ids
    return max(1, math.ceil(len(prompt) / 4) + 1)


__all__ = ["BOS_TOKEN", "EOS_TOKEN", "PromptReturn", "PromptTokens", "chat_prompt_tokens", "completion_prompt_tokens",
           "echo_prefix", "estimate_chat_prompt_tokens",
           "estimate_completion_prompt_tokens", "message_text", "part_text", "text_pieces", "token_id"]
