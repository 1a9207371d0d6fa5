"""Request-body validation for the OpenAI routes.

We check what would otherwise reach an engine as garbage or make the gateway misbehave (types, emptiness,
token limits) and pass every other field through untouched, so vLLM extras (``priority``, ``ignore_eos``,
``min_tokens``…) keep working. Messages name the offending parameter, as OpenAI's do.

The fields the gateway reads to schedule (``stream``, ``max_tokens``, ``n``, the sampling knobs) are read as
vLLM reads them, in pydantic's lax mode (:mod:`backends.lax`): ``"max_tokens": 4.0`` or ``"4"`` and
``"stream": "true"`` are served, as vLLM serves them, and the parsed body holds the value read (``4``,
``True``) for the scheduler and the predictor; the bytes an engine gets keep what the client sent.
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable

import orjson

from backends.exact_json import may_hold_long_integer
from backends.lax import LaxError, lax_bool, lax_float, lax_int, lax_token_ids
from gateway.api.errors import APIError, bad_request
from predictor.kv import MAX_CHOICES

MAX_NESTING = 254  # levels of arrays and objects a body may nest (the most orjson writes)
_SIZE = re.compile(r"([0-9]{1,5})x([0-9]{1,5})")  # "1024x1024"; ASCII digits (str.isdigit admits "¹")


def parse_json_object(body: bytes) -> dict[str, Any]:
    if not body:
        raise bad_request("The request body is empty; send a JSON object.")
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise bad_request(f"The request body is not valid JSON: {exc}.") from None
    if not isinstance(obj, dict):
        raise bad_request("The request body must be a JSON object.")
    try:
        # orjson reads 1,024 levels but writes 254: a deeper body failed (500) where the gateway re-writes one
        # (an engine priority, stream_options), and the predictor's str() of a value 1,000 deep cost 2 ms a
        # value on the event loop. Writing it is the cheap test (18 us for 42 kB, a fifth of reading it).
        orjson.dumps(obj)
    except orjson.JSONEncodeError:
        raise bad_request(f"The request body nests deeper than {MAX_NESTING} levels.") from None
    return obj


_ABSENT = object()


def json_with(raw: bytes, body: dict[str, Any], key: str, value: Any) -> bytes:
    """Set ``body[key] = value`` and return ``raw`` with it, for an engine. Where the client sent no such key the
    member is appended to the client's bytes, which are otherwise sent as they came (the common case: an
    engine priority, ``stream_options`` for a stream); else :func:`rewrite_json`."""
    absent = key not in body
    body[key] = value
    if absent:
        end = raw.rstrip()  # JSON's whitespace after the object; orjson has checked it ends with "}"
        return b"".join((end[:-1], b"," if len(body) > 1 else b"", orjson.dumps(key), b":", orjson.dumps(value),
                         b"}"))
    return rewrite_json(raw, body)


def rewrite_json(raw: bytes, body: dict[str, Any]) -> bytes:
    """``body`` (the gateway's parse of ``raw``, with top-level keys it set, replaced or dropped) as the bytes to
    send an engine. orjson writes it, except where ``raw`` may hold an integer orjson read as a float: a JSON
    schema's ``"enum": [123456789012345678901234567890]`` or a seed past 2**64 reached the engine as
    ``1.2345678901234568e+29``, where vLLM reads the exact integer. There every key the gateway left as it was
    is taken from the standard library's exact parse of ``raw``, and the standard library writes the body."""
    if not may_hold_long_integer(raw):
        return orjson.dumps(body)
    as_read, exact = orjson.loads(raw), json.loads(raw)
    merged = {key: exact[key] if as_read.get(key, _ABSENT) == value else value for key, value in body.items()}
    return json.dumps(merged, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


def _lax(holder: dict[str, Any], key: str, coerce: Callable[[Any], Any], message: str, param: str) -> Any:
    """``holder[key]`` read as vLLM reads it (None where absent or null), kept in ``holder`` where the client
    sent another type (``"4"`` becomes ``4``); a value vLLM refuses is a 400 with ``message``."""
    value = holder.get(key)
    if value is None:
        return None
    try:
        read = coerce(value)
    except LaxError:
        raise bad_request(message, param) from None
    if type(read) is not type(value) and not (type(read) is float and type(value) is int):
        holder[key] = read
    return read


def _check_common(body: dict[str, Any], max_model_len: int | None,
                  token_limits: tuple[tuple[str, str], ...] = (), echo_only_allowed: bool = False) -> None:
    """The fields both routes share. ``token_limits``: the output caps the route has (vLLM's completions have no
    ``max_completion_tokens``: it is an unknown field there, passed on and not read); ``echo_only_allowed``:
    ``max_tokens: 0`` with ``echo`` is served (the prompt alone, as vLLM's completions answer it)."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("'model' is required and must be a non-empty string.", "model")
    raw_stream = body.get("stream")
    _lax(body, "stream", lax_bool, "'stream' must be a boolean.", "stream")
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise bad_request("'stream_options' must be an object.", "stream_options")
        # vLLM's own test, on the values as sent: `{}` goes with any stream, and so does a stream of "false" (a
        # non-empty string); vLLM then reads "false" as no stream, and the options are not used
        if options and not raw_stream:
            raise bad_request("'stream_options' is only allowed when 'stream' is true.", "stream_options")
        _lax(options, "include_usage", lax_bool, "'stream_options.include_usage' must be a boolean.",
             "stream_options.include_usage")
    for name, message in token_limits:
        value = _lax(body, name, lax_int, message, name)
        if value is None:
            continue
        if value < 1 and not (value == 0 and name == "max_tokens" and echo_only_allowed and _echoes(body)):
            raise bad_request(f"'{name}' must be at least 1, got {value}.", name)
        if max_model_len is not None and value > max_model_len:
            raise bad_request(f"'{name}' is {value}, more than the model's context length of {max_model_len} "
                              "tokens.", name)
    n = _lax(body, "n", lax_int, _N_MESSAGE, "n")
    if n is not None and not 1 <= n <= MAX_CHOICES:
        raise bad_request(_N_MESSAGE, "n")
    for name, low, high, message in _SAMPLING_RANGES:
        value = _lax(body, name, lax_float, message, name)
        if value is not None and not low <= value <= high:
            raise bad_request(message, name)


_CHAT_TOKEN_LIMITS = tuple((name, f"'{name}' must be an integer.")
                           for name in ("max_tokens", "max_completion_tokens"))
_COMPLETION_TOKEN_LIMITS = _CHAT_TOKEN_LIMITS[:1]


def _echoes(body: dict[str, Any]) -> bool:
    """Whether a completion asks for its prompt back (``echo``, read as vLLM reads it; a refused value is a 400)."""
    return bool(_lax(body, "echo", lax_bool, "'echo' must be a boolean.", "echo"))


_N_MESSAGE = f"'n' must be an integer between 1 and {MAX_CHOICES}."
_SAMPLING_RANGES = tuple((name, low, high, f"'{name}' must be a number between {low:g} and {high:g}.")
                         for name, low, high in (("temperature", 0.0, 2.0), ("top_p", 0.0, 1.0),
                                                 ("presence_penalty", -2.0, 2.0), ("frequency_penalty", -2.0, 2.0)))


def validate_chat(body: dict[str, Any], max_model_len: int | None) -> None:
    """Raise :class:`APIError` (400) when a chat-completion body is malformed."""
    _check_common(body, max_model_len, _CHAT_TOKEN_LIMITS)
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise bad_request("'messages' is required and must be a list of messages.", "messages")
    if not messages:
        raise bad_request("'messages' must contain at least one message.", "messages")
    for i, message in enumerate(messages):
        param = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad_request(f"'{param}' must be an object with 'role' and 'content'.", param)
        role = message.get("role")
        if not isinstance(role, str):  # vLLM serves any string, "" too (its custom-role message type)
            raise bad_request(f"'{param}.role' is required and must be a string.", f"{param}.role")
        # vLLM serves a message without content (as empty), and a null one from the roles whose types allow it
        content = message.get("content", _ABSENT)
        if content is _ABSENT:
            continue
        if content is None:
            if role in _NULL_CONTENT_ROLES:
                continue
            raise bad_request(f"'{param}.content' must be a string or a list of content parts; only "
                              f"{' and '.join(_NULL_CONTENT_ROLES)} messages may have a null one.", f"{param}.content")
        if not isinstance(content, (str, list)):
            raise bad_request(f"'{param}.content' must be a string or a list of content parts.",
                              f"{param}.content")
    _check_chat_options(body)


_NULL_CONTENT_ROLES = ("assistant", "function")  # OpenAI's (and vLLM's) types of these take content: null


def _check_chat_options(body: dict[str, Any]) -> None:
    """Shapes of the chat options the predictor reads: a malformed one would otherwise be scheduled (and a KV
    reservation sized from it) only for the engine to refuse it. Values are the engine's to judge, so that
    engine-specific formats (vLLM's ``structural_tag``, others' ``regex``) keep working."""
    response_format = body.get("response_format")
    if response_format is not None:
        if not isinstance(response_format, dict):
            raise bad_request("'response_format' must be an object such as {\"type\": \"json_object\"}.",
                              "response_format")
        if not isinstance(response_format.get("type"), str) or not response_format["type"]:
            raise bad_request("'response_format.type' is required and must be a string such as 'text', "
                              "'json_object' or 'json_schema'.", "response_format.type")
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise bad_request("'tools' must be a list of tool objects.", "tools")
        for i, tool in enumerate(tools):
            if not isinstance(tool, dict):
                raise bad_request(f"'tools[{i}]' must be an object such as {{\"type\": \"function\", "
                                  "\"function\": {...}}.", f"tools[{i}]")


_PROMPT_MESSAGE = ("'prompt' must be a string, a list of strings, or a list of token ids (integers >= 0) or of such "
                   "lists.")


def validate_completion(body: dict[str, Any], max_model_len: int | None) -> None:
    """Raise :class:`APIError` (400) when a legacy completion body is malformed."""
    _check_common(body, max_model_len, _COMPLETION_TOKEN_LIMITS, echo_only_allowed=True)
    prompt = body.get("prompt")
    if prompt is None:
        raise bad_request("'prompt' is required.", "prompt")
    if isinstance(prompt, str):
        return
    if not isinstance(prompt, list) or not prompt:
        raise bad_request(_PROMPT_MESSAGE, "prompt")
    # vLLM's union, list[int >= 0] | list[list[int >= 0]] | str | list[str], read as pydantic reads it: strings stay
    # strings (its smart union tries each member strictly first), token ids in lax mode ([1.0, "2"] is [1, 2]); an
    # empty prompt in a batch is refused by vLLM's engine. The parsed body holds the ids read (a prompt's length).
    kinds = set(map(type, prompt))  # made in C: 500,000 ids checked one by one took 77 ms on the loop, 20 now
    if kinds == {str}:
        return
    try:
        if kinds != {list}:
            body["prompt"] = lax_token_ids(prompt, kinds)
        elif all(prompt):
            body["prompt"] = [lax_token_ids(ids) for ids in prompt]
        else:
            raise bad_request(_PROMPT_MESSAGE, "prompt")
    except LaxError:
        raise bad_request(_PROMPT_MESSAGE, "prompt") from None


def validate_image(body: dict[str, Any]) -> None:
    """Raise :class:`APIError` (400) when an image-generation body is malformed."""
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise bad_request("'prompt' is required and must be a non-empty string.", "prompt")
    n = _lax(body, "n", lax_int, "'n' must be an integer between 1 and 10.", "n")
    if n is not None and not 1 <= n <= 10:
        raise bad_request("'n' must be an integer between 1 and 10.", "n")
    size = body.get("size")
    if size is not None and size != "auto":  # OpenAI's "auto" (the SDK lists it): the engine's own default
        match = _SIZE.fullmatch(size) if isinstance(size, str) else None
        if match is None or not all(64 <= int(side) <= 4096 for side in match.groups()):
            raise bad_request("'size' must look like '1024x1024' (each side 64..4096), or be 'auto'.", "size")
    steps_message = f"'num_inference_steps' must be an integer between 1 and {MAX_INFERENCE_STEPS}."
    steps = _lax(body, "num_inference_steps", lax_int, steps_message, "num_inference_steps")
    if steps is not None and not 1 <= steps <= MAX_INFERENCE_STEPS:
        raise bad_request(steps_message, "num_inference_steps")
    response_format = body.get("response_format")
    if response_format is not None and response_format not in IMAGE_RESPONSE_FORMATS:
        raise bad_request("'response_format' must be 'b64_json' (images come back inline; there are no URLs to "
                          "fetch them from) or vLLM-Omni's 'file'.", "response_format")
    stream_message = "Streaming is not supported for image generation; leave 'stream' out."
    if _lax(body, "stream", lax_bool, stream_message, "stream"):  # the engines answer one JSON body
        raise bad_request(stream_message, "stream")


# vLLM-Omni's ImageGenerationRequest: num_inference_steps in 1..200; response_format b64_json, or file (the raw
# image, a zip of them for n > 1), an extension of theirs passed on as it is
MAX_INFERENCE_STEPS = 200
IMAGE_RESPONSE_FORMATS = ("b64_json", "file")


__all__ = ["APIError", "parse_json_object", "validate_chat", "validate_completion", "validate_image"]
