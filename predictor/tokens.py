"""The one character-based token estimator: importers use it where a source has no counts, and the gateway's
predictor uses it at serving time on every request, so both sides see the same numbers.

No tokenizer is loaded (none is needed, nothing is downloaded, and it is the same for every model). The
estimate is a small linear model over four counts that C-level ``bytes`` operations give without a Python loop::

    tokens ~= 0.069 * chars + 0.865 * ascii_punctuation + 0.627 * words + 0.45 * extra_utf8_bytes
    then at least chars / 6

- ``chars``: ``len(text)``; ``words``: runs of non-whitespace (``len(b.split())``);
- ``ascii_punctuation``: ASCII bytes that are not letters, digits, ``_`` or whitespace (BPE vocabularies
  split these off, so punctuation-dense text such as code, JSON and URLs has fewer characters per token);
- ``extra_utf8_bytes``: UTF-8 bytes beyond one per character, the CJK / non-Latin correction: a CJK character
  (3 bytes) adds ~0.9 token, a Cyrillic or accented one (2 bytes) ~0.45;
- the ``chars / 6`` floor keeps long unbroken identifiers, hashes and base64 from being estimated at one token.

Calibration (``tests/test_importers.py`` re-checks it on the data when present): fitted by least squares on
relative error to the 1,025 ChatDev calls of ``chatdev-warehouse-llm-calls`` that have both an output text and
the ``completion_tokens`` the OpenAI API returned (GPT-3.5/4, cl100k_base). Their output runs 4.58 characters
per token (median; README: p5 3.97, p95 5.24), mostly code plus prose manuals and reviews. Results on those calls:

=====================================  ==========  =============  =========
estimator                              mean |err|  median |err|   p95 |err|
=====================================  ==========  =============  =========
``chars / 4.0`` (the usual rule)          14.9 %        14.7 %          -
``chars / 4.58`` (median ratio)            8.7 %         5.2 %        29 %
this estimator                             2.5 %         1.5 %         8 %
=====================================  ==========  =============  =========

(5 random 500/525 splits: held-out mean error 2.9-3.1 %, coefficients stable to +-0.01.) The median ratio
estimate/real is ~1.0 in every ChatDev phase, 1.00 on the prose ``Manual`` phase, except ``LanguageChoose``
(one-line replies like ``<INFO> Python``, 0.85). Prompt side: on the 714 ChatDev calls whose API prompt was just
system message + input message (first turn of a phase), ``estimate_message_tokens`` is off by 2.5 % on average
against the real ``prompt_tokens``. Speed (one AMD EPYC VM, 2026-12-04): 0.12 ms per 100 kB of ASCII text and
0.18 ms with some non-ASCII characters (0.31 and 0.38 ms before words were counted by numpy in long texts), ~0.9 us
for a short string.
It is a cl100k-style estimate; other BPE vocabularies of similar size (Llama-3, Qwen) should be close, but that
is not checked here (no tokenizer is available offline).

Messages follow OpenAI's accounting (``num_tokens_from_messages``): ~4 tokens per message (role and framing),
1 more for a ``name``, 3 to prime the reply; tool calls count their function name and JSON arguments plus 3.
"""

from __future__ import annotations

import string
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import orjson

# Fitted coefficients (see the module docstring).
CHAR_WEIGHT = 0.069
PUNCT_WEIGHT = 0.865
WORD_WEIGHT = 0.627
EXTRA_BYTE_WEIGHT = 0.45
MIN_CHARS_PER_TOKEN = 6.0

# OpenAI chat framing.
MESSAGE_OVERHEAD = 4     # <|start|>{role}\n ... <|end|>
NAME_OVERHEAD = 1
REPLY_PRIMING = 3        # <|start|>assistant<|message|>
TOOL_CALL_OVERHEAD = 3   # per function call: framing around name and arguments
IMAGE_PART_TOKENS = 85   # an image part counts as a low-detail image (OpenAI's base cost)

# One translate gives the byte classes: ASCII whitespace (what ``bytes.split()`` splits on) becomes b" ", ASCII
# punctuation b"p", and everything else (letters, digits, "_", bytes of non-ASCII characters) b"x". A word is a
# run of non-space, so the words are the non-space bytes that follow a space, plus one if the text starts with one.
_WHITESPACE = b" \t\n\r\x0b\x0c"
_WORD_BYTES = (string.ascii_letters + string.digits + "_").encode("ascii")
_CLASSES = bytes(32 if i in _WHITESPACE else 120 if i in _WORD_BYTES or i >= 128 else 112 for i in range(256))
# ... and a second translate of those classes to b" " / b"x", so that a word start is one two-byte pattern: one
# more pass over the bytes, but one count of b" x" instead of counting b" x" and b" p" (a fifth less time).
_SPACE_OR_NOT = bytes(32 if i == 32 else 120 for i in range(256))
# From this many bytes on, numpy counts the words instead (whitespace followed by non-whitespace, all positions
# compared at once). ``bytes.count`` scans for a two-byte pattern at about 1.5 us per kilobyte and numpy's calls
# cost a few us, so numpy wins above about 2 kB: the whole estimate of a 10 kB message fell from 34 to 16 us.
# Long messages are common in agents' prompts, which carry their conversation so far.
NUMPY_WORD_COUNT_BYTES = 2048


# At most this many values (containers and scalars) are read from a value too deeply nested for ``str()`` (see
# text_of): a bound on the work, which also ends the walk of a cyclic value (only a body built in code has one).
FLAT_TEXT_MAX_ITEMS = 100_000


# Past this many content parts or tool calls in one message, the ones read stand for the rest (the sum read,
# scaled by the count): 65,514 one-letter parts in a 256 KiB body cost 75 ms on the gateway's event loop, 87,334
# empty tool calls 69-150 ms. No message of the traces comes near it, so their estimates are unchanged.
ITEMS_READ = 1024


def _scaled(total: int, read: int, count: int) -> int:
    """``total`` over ``read`` of ``count`` items, scaled to all of them."""
    return total if read >= count else int(total * count / read + 0.5)


def unread_floor(items: list) -> int:
    """The fewest tokens the items not read may hold: their JSON bytes at the most characters a token takes
    (the estimate's own floor). Without it, bulk hidden past the bound (one 3 MB part after 1,024 one-letter
    ones) was read as the items read: 1,025 tokens for 550,000, a tiny reservation and a place in the queue's
    front. Written by orjson, in C: a few milliseconds for megabytes."""
    try:
        return int(len(orjson.dumps(items)) / MIN_CHARS_PER_TOKEN)
    except TypeError:  # not JSON (a body built in code): the scaled estimate alone
        return 0


def bounded_sum(total: int, read: int, unread: list) -> int:
    """The estimate of ``read`` items that sum to ``total`` and the ``unread`` ones: the sum scaled to all of
    them, and at least ``total`` plus the unread's floor."""
    if not unread:
        return total
    return max(_scaled(total, read, read + len(unread)), total + unread_floor(unread))


def text_of(value: Any) -> str:
    """``str(value)``: the text a token estimate reads from a value that is not text where a request may carry
    one (tool-call arguments as an object, a number as content). A body may nest up to 1024 levels (orjson's
    limit, which the gateway's parser keeps), and ``str()`` recurses once a level, so past Python's recursion
    limit it raises: such a value is read as its keys and scalars instead, gathered without recursion (from at
    most ``FLAT_TEXT_MAX_ITEMS`` values), so that a prediction never fails on a body the gateway accepted."""
    try:
        return str(value)
    except RecursionError:
        return _flat_text(value)


def _flat_text(value: Any) -> str:
    """The keys and scalars of a nested value, space-separated, read with a stack instead of recursion."""
    parts: list[str] = []
    stack = [value]
    for _ in range(FLAT_TEXT_MAX_ITEMS):
        if not stack:
            break
        item = stack.pop()
        if isinstance(item, Mapping):
            for key, child in item.items():
                parts.append(key if isinstance(key, str) else repr(key))
                stack.append(child)
        elif isinstance(item, (list, tuple)):
            stack.extend(reversed(item))
        else:
            parts.append(item if isinstance(item, str) else repr(item))
    return " ".join(parts)


def estimate_tokens(text: str) -> int:
    """Estimated token count of ``text`` (0 for the empty string, at least 1 otherwise)."""
    if not text:
        return 0
    if not isinstance(text, str):
        text = text_of(text)
    chars = len(text)
    data = text.encode("utf-8", "surrogatepass")
    extra = len(data) - chars
    classes = data.translate(_CLASSES)
    punct = classes.count(b"p")
    words = classes[0] != 32  # a word start without a space before it
    if len(classes) < NUMPY_WORD_COUNT_BYTES:
        words += classes.translate(_SPACE_OR_NOT).count(b" x")
    else:
        space = np.frombuffer(classes, dtype=np.uint8) == 32
        words += int(np.count_nonzero(space[:-1] > space[1:]))
    estimate = CHAR_WEIGHT * chars + PUNCT_WEIGHT * punct + WORD_WEIGHT * words + EXTRA_BYTE_WEIGHT * extra
    estimate = max(estimate, chars / MIN_CHARS_PER_TOKEN)
    return max(1, int(estimate + 0.5))


def content_tokens(content: Any) -> int:
    """Tokens of a message ``content``: a string, or a list of parts: text parts (and ``refusal`` parts, whose
    text vLLM's chat parser puts in the prompt like a text part's) counted, images flat. Audio, video and file
    parts count nothing: their cost depends on the model's own encoder, and a text model refuses them."""
    if content is None:
        return 0
    if isinstance(content, str):
        return estimate_tokens(content)
    if isinstance(content, list):
        total = 0
        parts = content if len(content) <= ITEMS_READ else content[:ITEMS_READ]
        for part in parts:
            if isinstance(part, str):
                total += estimate_tokens(part)
            elif isinstance(part, Mapping):
                kind = part.get("type")
                if kind in ("image_url", "image", "input_image"):
                    total += IMAGE_PART_TOKENS
                elif isinstance(part.get("text"), str):
                    total += estimate_tokens(part["text"])
                elif kind == "refusal" and isinstance(part.get("refusal"), str):
                    total += estimate_tokens(part["refusal"])
                elif isinstance(part.get("content"), str):
                    total += estimate_tokens(part["content"])
        return total if parts is content else bounded_sum(total, len(parts), content[len(parts):])
    return estimate_tokens(text_of(content))


def _function_tokens(function: Any) -> int:
    if not isinstance(function, Mapping):
        return 0
    arguments = function.get("arguments")
    if arguments is not None and not isinstance(arguments, str):
        arguments = text_of(arguments)
    return TOOL_CALL_OVERHEAD + estimate_tokens(function.get("name") or "") + estimate_tokens(arguments or "")


def tool_call_tokens(message: Mapping[str, Any]) -> int:
    """Tokens of a message's ``tool_calls`` (and the legacy ``function_call``)."""
    total = 0
    calls = message.get("tool_calls")
    if calls and isinstance(calls, list):
        read = calls if len(calls) <= ITEMS_READ else calls[:ITEMS_READ]
        for call in read:
            if isinstance(call, Mapping):
                total += _function_tokens(call.get("function"))
        if read is not calls:
            total = bounded_sum(total, len(read), calls[len(read):])
    function_call = message.get("function_call")
    if function_call is not None:
        total += _function_tokens(function_call)
    return total


def estimate_single_message_tokens(message: Mapping[str, Any]) -> int:
    """One message inside a prompt: framing + content + name + tool calls (no reply priming)."""
    if not isinstance(message, dict) and not isinstance(message, Mapping):  # dict first: an ABC check is slower
        return MESSAGE_OVERHEAD + estimate_tokens(text_of(message))
    content = message.get("content")
    total = MESSAGE_OVERHEAD + (estimate_tokens(content) if type(content) is str else content_tokens(content))
    total += tool_call_tokens(message)
    name = message.get("name")
    if isinstance(name, str) and name:
        total += NAME_OVERHEAD + estimate_tokens(name)
    return total


def estimate_message_tokens(messages: Iterable[Mapping[str, Any]]) -> int:
    """Estimated ``prompt_tokens`` of a chat request's ``messages`` (tool definitions not included)."""
    return REPLY_PRIMING + sum(estimate_single_message_tokens(message) for message in messages)


def estimate_completion_tokens(message: Mapping[str, Any]) -> int:
    """Estimated ``completion_tokens`` of an assistant output message (text and/or tool calls, no framing)."""
    return content_tokens(message.get("content")) + tool_call_tokens(message)
