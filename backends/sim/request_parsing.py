"""A generation request's body read as vLLM 0.32's request models read it (chat and legacy completions).

:func:`read_json_body` reads the bytes as FastAPI does; :func:`parse_body` checks the fields in pydantic's lax
mode, runs the request models' validators in vLLM's order, and returns a :class:`Parsed` request or vLLM's answer
instead (a 400; a 500 where vLLM's own code fails on the request), by the rules in :mod:`backends.sim.server`'s
docstring ("Request handling"). What vLLM refuses later, in its renderer,
SamplingParams and engine, is :mod:`backends.sim.request_checks`'.
"""

from __future__ import annotations

import json
from typing import Any, Callable

import orjson
from aiohttp import web

from backends.exact_json import may_hold_long_integer
from backends.lax import LaxError, lax_bool, lax_float, lax_int
from backends.sim.chat_messages import (MessageRefusal, has_lone_surrogate, messages_type_error, normalized_messages,
                                        plain_messages, tool_call_errors, validated_messages)
from backends.sim.filler import filler_text
from backends.sim.json_answers import plan_json_text
from backends.sim.prompt_tokens import estimate_chat_prompt_tokens, estimate_completion_prompt_tokens
from backends.sim.request_fields import (Refusal, check_cache_salt, check_logprob_token_ids,
                                         check_structural_tag_format, check_structured_outputs_count, in_field_order,
                                         read_extras)
from backends.sim.request_models import PROMPT, RESPONSE_FORMAT, TOOL_CHOICE, TOOLS, errors_of, validated
from backends.sim.responses import (MISSING, bad_request, error_response, field_error, invalid_json_response,
                                    not_an_object_response, pydantic_error_response, refusal_response, refused_by,
                                    unsupported_media_type_response, validation_message)
from backends.sim.tool_calls import plan_tool_call


LEGACY_COMPLETION_MAX_TOKENS = 16  # /v1/completions without max_tokens (vLLM and OpenAI)

GREEDY_TEMPERATURE = 1e-5  # vLLM's _SAMPLING_EPS: below it sampling is greedy, and n must be 1


def load_request_json(raw: bytes) -> Any:
    """The body as vLLM's FastAPI reads it (Starlette's ``json.loads`` of the bytes): orjson for speed, but the
    standard library's parse where the text may hold an integer orjson cannot keep (19 digits or more in a row),
    which keeps it a Python int as vLLM's does (``"seed": 2**70`` is pydantic's less_than_equal there, ``1e20`` a
    float's int_parsing_size), and where orjson refuses the text: ``json.loads`` takes a UTF-8 BOM, UTF-16 and
    UTF-32, ``NaN`` and ``Infinity`` and lone surrogates, as vLLM does, and words its errors as vLLM does."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return json.loads(raw)
    if may_hold_long_integer(raw):
        body = json.loads(raw)
    return body


async def read_json_body(request: web.Request) -> Any:
    """The body of a vLLM (FastAPI) generation route, or the 400 it answers instead, in FastAPI's order: the
    body is parsed first where it is declared JSON (``application/json`` or ``application/*+json``: a broken one
    answers ``json_invalid`` before the route's media-type check, ``validate_json_request``), bytes it cannot
    decode answer ``{"detail": "There was an error parsing the body"}``, then the media type is checked, then an
    empty body (or ``null``) is a missing one (pydantic's ``Field required``)."""
    raw = await request.read()
    media = request.headers.get("Content-Type", "").lower().split(";", 1)[0].strip()
    body = None
    if raw and (media == "application/json" or (media.startswith("application/") and media.endswith("+json"))):
        try:
            body = load_request_json(raw)
        except json.JSONDecodeError as exc:  # orjson's error is one too, but orjson's are re-read by json
            return invalid_json_response(exc)
        except (ValueError, RecursionError):  # bytes no UTF is, or nesting past the interpreter's recursion:
            # FastAPI's own HTTPException, which reaches the client in FastAPI's shape, not vLLM's (observed)
            return web.Response(body=b'{"detail":"There was an error parsing the body"}', status=400,
                                content_type="application/json")
    if not is_json_request(request):
        return unsupported_media_type_response()
    if body is None:
        return pydantic_error_response([field_error("missing", "body", "Field required", None)])
    return body


def is_json_request(request: web.Request) -> bool:
    """vLLM's ``validate_json_request`` (a dependency of its generation routes, which FastAPI runs once it has
    read the body): the media type, lower-cased and without parameters, must be application/json."""
    return request.headers.get("Content-Type", "").lower().split(";", 1)[0] == "application/json"


def _absent_or_null(body: dict, key: str, loc: str, errors: list[dict], *, optional: bool, default: Any,
                    error_type: str, message: str) -> tuple[bool, Any]:
    """The start every lax field check shares: (True, result) where the field is absent (its default) or null
    (None where the field is optional, else an error and the default); (False, value) where there is a value
    left to check."""
    value = body.get(key, MISSING)
    if value is MISSING:
        return True, default
    if value is None:
        if optional:
            return True, None
        errors.append(field_error(error_type, loc, message, value))
        return True, default
    return False, value


def check_int(body: dict, key: str, errors: list[dict], *, optional: bool, default: int | None,
              loc_prefix: str = "body") -> int | None:
    """Pydantic-v2 lax int: ints, bools, whole floats and numeric strings pass; the rest is an error."""
    return _check_lax(lax_int, body, key, errors, optional=optional, default=default, loc_prefix=loc_prefix,
                      error_type="int_type", message="Input should be a valid integer")


def check_bool(body: dict, key: str, errors: list[dict], *, optional: bool, default: bool | None,
               loc_prefix: str = "body") -> bool | None:
    """Pydantic-v2 lax bool: bools, 0/1 and the usual yes/no strings pass; the rest is an error."""
    return _check_lax(lax_bool, body, key, errors, optional=optional, default=default, loc_prefix=loc_prefix,
                      error_type="bool_type", message="Input should be a valid boolean")


def check_float(body: dict, key: str, errors: list[dict], loc_prefix: str = "body") -> float | None:
    """Pydantic-v2 lax optional float: numbers, bools and numeric strings ("0.5", "inf") pass; null is None."""
    return _check_lax(lax_float, body, key, errors, optional=True, default=None, loc_prefix=loc_prefix,
                      error_type="float_type", message="Input should be a valid number")


def _check_lax(coerce: Callable[[Any], Any], body: dict, key: str, errors: list[dict], *, optional: bool,
               default: Any, loc_prefix: str, error_type: str, message: str) -> Any:
    loc = f"{loc_prefix}.{key}"
    settled, value = _absent_or_null(body, key, loc, errors, optional=optional, default=default,
                                     error_type=error_type, message=message)
    if settled:
        return value
    try:
        return coerce(value)
    except LaxError as exc:
        errors.append(field_error(exc.type, loc, exc.message, value))
        return default


INT64_MIN, INT64_MAX = -2**63, 2**63 - 1  # vLLM's bounds of ``seed``


def check_seed(body: dict, errors: list[dict]) -> None:
    seed = check_int(body, "seed", errors, optional=True, default=None)
    check_range(errors, "seed", seed, seed, INT64_MIN, INT64_MAX)


def _bound(value: float) -> str:
    """A bound as pydantic writes it in a message: 20.0 as "20", 9223372036854775807 in full."""
    return str(int(value)) if float(value).is_integer() else str(value)


def check_range(errors: list[dict], key: str, value: float | None, shown: Any, low: float, high: float) -> None:
    """Pydantic's ``ge``/``le`` on a field's parsed ``value`` (None: nothing to check; NaN fails ``le``, as in
    pydantic); ``shown`` is the input the error quotes."""
    if value is None:
        return
    if value < low:
        errors.append({**field_error("greater_than_equal", f"body.{key}", f"Input should be greater than or equal "
                                     f"to {_bound(low)}", shown), "ctx": {"ge": low}})
    elif not value <= high:
        errors.append({**field_error("less_than_equal", f"body.{key}", f"Input should be less than or equal to "
                                     f"{_bound(high)}", shown), "ctx": {"le": high}})


def check_str(body: dict, key: str, errors: list[dict]) -> str | None:
    """An optional string field: its value, or None where it is absent, null or (an error) no string."""
    value = body.get(key)
    if value is None or isinstance(value, str):
        return value
    errors.append(field_error("string_type", f"body.{key}", "Input should be a valid string", value))
    return None


def check_stop(body: dict, errors: list[dict]) -> list[str]:
    """``stop``: a string, a list of strings or null (vLLM's StopParam); the strings."""
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    if not isinstance(stop, list):
        errors.append(field_error("string_type", "body.stop", "Input should be a valid string", stop))
        errors.append(field_error("list_type", "body.stop", "Input should be a valid list", stop))
        return []
    wrong = [i for i, item in enumerate(stop) if not isinstance(item, str)]
    if wrong:
        errors.append(field_error("string_type", "body.stop", "Input should be a valid string", stop))
        errors.extend(field_error("string_type", f"body.stop.{i}", "Input should be a valid string", stop[i])
                      for i in wrong)
        return []
    if len(stop) > MAX_STOP_STRINGS:  # a list's length is checked after its items
        errors.append(field_error("string_type", "body.stop", "Input should be a valid string", stop))
        errors.append({**field_error("too_long", "body.stop", f"List should have at most {MAX_STOP_STRINGS} items "
                                     f"after validation, not {len(stop)}", stop),
                       "ctx": {"field_type": "List", "max_length": MAX_STOP_STRINGS, "actual_length": len(stop)}})
        return []
    return stop


MAX_STOP_STRINGS = 4  # vLLM 0.32's VLLM_MAX_STOP_STRINGS default (StopParam's max_length)


def prompt_taken_as_is(prompt: Any) -> bool:
    """Whether a legacy completion's prompt is read as it is sent (a string, token ids >= 0, one string in a list:
    nearly every prompt), without pydantic."""
    return type(prompt) is str or type(prompt) is list and (all(type(t) is int and t >= 0 for t in prompt) or (
        len(prompt) == 1 and type(prompt[0]) is str))


def resolve_prompt(prompt: Any, errors: list[dict]) -> list[str | list[int]] | None:
    """vLLM 0.32's CompletionRequest.prompt union (``list[int>=0] | list[list[int>=0]] | str | list[str]``), read by
    pydantic (:data:`backends.sim.request_models.PROMPT`), then prompt_to_seq: the prompts it holds (one for token
    ids or a string, each member of a batch), or pydantic's 400 where no member takes it, every member's errors in
    the union's order (``[[1, -5]]``: four; appended to ``errors``, None returned). Pydantic's smart union tries the
    members strictly first, so a list of strings stays strings even where they read as integers, and ``[1.0, "2"]``
    is the ids ``[1, 2]``. None (beside ``prompt_embeds``) holds none."""
    if type(prompt) is list and all(type(item) is str for item in prompt):
        return list(prompt)  # what pydantic reads it as (its strict pass takes it as strings), at a tenth of the cost
    value, prompt_errors = validated(PROMPT, prompt, "prompt")
    if prompt_errors:
        errors += prompt_errors
        return None
    if value is None:
        return []
    if type(value) is str or all(type(item) is int for item in value):
        return [value]
    return list(value)


MAX_COMPLETION_PROMPTS = 1024  # vLLM's VLLM_MAX_COMPLETION_PROMPTS default

# The largest id of a token-id prompt that has none: vLLM's engine refuses an empty decoder prompt
# (input_processor._validate_prompt_len) where it would check the ids against the vocabulary
EMPTY_PROMPT = -1


def largest_id(ids: list[int]) -> int:
    return max(ids) if ids else EMPTY_PROMPT


class BatchPrompt:
    """One prompt of a batched legacy completion: what the checks and the engine request need of it."""

    __slots__ = ("tokens", "token_ids", "max_id", "ids")

    def __init__(self, prompt: str | list[int]) -> None:
        self.tokens = estimate_completion_prompt_tokens(prompt)
        self.token_ids = isinstance(prompt, list)
        self.ids = prompt if self.token_ids else None  # (read again only where truncate_prompt_tokens cuts it)
        self.max_id = largest_id(prompt) if self.token_ids else None  # type: ignore[arg-type]


_NAMED_TOOL_USAGE = 'Correct usage: `{"type": "function", "function": {"name": "my_function"}}`'


def check_tool_usage(body: dict) -> web.Response | None:
    """vLLM 0.32's ChatCompletionRequest.check_tool_usage (chat_completion/protocol.py), before pydantic reads
    ``tools``: a named tool is looked up in the raw tools as vLLM looks it up, so a malformed one fails as there."""
    if body.get("tools") == []:
        return bad_request(validation_message("`tools` must not be an empty array. Either provide at least one tool "
                                              "or omit the field entirely.", "tools", None), "tools")
    choice = body.get("tool_choice")
    if choice is None or choice == "none":
        return None
    if body.get("tools") is None:
        return bad_request(validation_message("When using `tool_choice`, `tools` must be set.", "tool_choice",
                                              None), "tool_choice")
    if choice not in ("auto", "required") and not isinstance(choice, dict):
        return bad_request(validation_message(f"Invalid value for `tool_choice`: {choice}! Only named tools, "
                                              '"none", "auto" or "required" are supported.', "tool_choice", None),
                           "tool_choice")
    if isinstance(choice, dict):
        function = choice.get("function")
        if not isinstance(function, dict):
            return bad_request(validation_message(f"Invalid value for `function`: `{function}` in `tool_choice`! "
                                                  f"{_NAMED_TOOL_USAGE}", "tool_choice.function", None),
                               "tool_choice.function")
        if "name" not in function:
            return bad_request(validation_message(f"Expected field `name` in `function` in `tool_choice`! "
                                                  f"{_NAMED_TOOL_USAGE}", "tool_choice.function.name", None),
                               "tool_choice.function.name")
        name = function["name"]
        if not isinstance(name, str) or not name:
            return bad_request(validation_message(f"Invalid `name` in `function`: `{name}` in `tool_choice`! "
                                                  f"{_NAMED_TOOL_USAGE}", "tool_choice.function.name", None),
                               "tool_choice.function.name")
        try:  # vLLM's loop over the raw tools, to the first match: Python's own errors where a tool is malformed
            found = any(tool["function"]["name"] == name for tool in body["tools"])
        except KeyError as exc:  # vLLM's 500
            return error_response(str(exc), "InternalServerError", 500)
        except TypeError as exc:  # (not iterable, not subscriptable...): vLLM's 400
            return bad_request(str(exc))
        if not found:
            return bad_request(validation_message("The tool specified in `tool_choice` does not match any of the "
                                                  "specified `tools`", "tool_choice", None), "tool_choice")
    return None


def effective_tool_choice(body: dict) -> Any:
    """The tool choice vLLM 0.32 acts on: the request's, else "auto" where it lists tools (check_tool_usage sets
    that default); None where no tool may be called."""
    choice = body.get("tool_choice", "auto" if body.get("tools") else None)
    return None if choice == "none" else choice


def check_logprobs(body: dict, chat: bool = True) -> web.Response | None:
    """vLLM 0.32's ChatCompletionRequest.check_logprobs (``top_logprobs`` needs ``logprobs``) or, for legacy
    completions, CompletionRequest.check_logprobs (an integer ``logprobs``); ``logprob_token_ids`` first."""
    refused = (refused_by(check_logprob_token_ids, body, chat)
               or _check_logprob_counts(body, "top_logprobs" if chat else "logprobs"))
    if refused is not None or not chat:
        return refused
    top_logprobs = body.get("top_logprobs")
    if top_logprobs is not None and (top_logprobs == -1 or top_logprobs > 0) and not body.get("logprobs"):
        return bad_request(validation_message("when using `top_logprobs`, `logprobs` must be set to true.",
                                              "top_logprobs", None), "top_logprobs")
    return None


def _check_logprob_counts(body: dict, sample_name: str) -> web.Response | None:
    """The checks both request models share: ``prompt_logprobs`` and the sample count (chat's ``top_logprobs``, a
    legacy completion's ``logprobs``) are numbers, >= 0 or -1; no prompt logprobs on a stream."""
    for name in ("prompt_logprobs", sample_name):
        value = body.get(name)
        if value is not None and not isinstance(value, (int, float)):
            return bad_request(validation_message(f"`{name}` must be an integer.", name, value), name)
    prompt_logprobs = body.get("prompt_logprobs")
    if prompt_logprobs is not None:
        if body.get("stream") and (prompt_logprobs > 0 or prompt_logprobs == -1):
            return bad_request(validation_message("`prompt_logprobs` are not available when `stream=True`.",
                                                  "prompt_logprobs", None), "prompt_logprobs")
        if prompt_logprobs < 0 and prompt_logprobs != -1:
            return bad_request(validation_message("`prompt_logprobs` must be a positive value or -1.",
                                                  "prompt_logprobs", prompt_logprobs), "prompt_logprobs")
    sample = body.get(sample_name)
    if sample is not None and sample < 0 and sample != -1:
        return bad_request(validation_message(f"`{sample_name}` must be a positive value or -1.", sample_name,
                                              sample), sample_name)
    return None


class Parsed:
    __slots__ = ("chat", "model", "stream", "include_usage", "continuous_usage", "max_tokens", "max_tokens_param",
                 "min_tokens", "ignore_eos", "priority", "prompt_tokens", "n", "greedy", "request_id", "sampling",
                 "stop", "prompt_is_token_ids", "tool_choice", "engine_inputs", "max_prompt_id", "prompts", "suffix",
                 "echo", "template_conflict", "messages", "plain", "unencodable", "truncate", "truncation_side",
                 "output_budget", "prompt_ids", "role", "tool_plan", "json_text", "as_token_ids", "logprobs",
                 "echo_asked", "return_ids", "return_text", "returned", "extras", "structured")


class EngineInputs:
    """The fields vLLM 0.32 checks only in its engine (SamplingParams.verify, called from the input processor), kept
    apart so that a request without any of them (nearly every one) parses and passes none of these checks."""

    __slots__ = ("sample_logprobs", "top_logprobs", "prompt_logprobs", "logit_bias", "stop_token_ids",
                 "allowed_token_ids")


# the request fields EngineInputs holds; a body with none of them skips their parsing and checks
_ENGINE_CHECKED = frozenset(("logprobs", "top_logprobs", "prompt_logprobs", "logit_bias", "stop_token_ids",
                             "allowed_token_ids"))


def parse_engine_inputs(body: dict, chat: bool, errors: list[dict]) -> EngineInputs:
    """Pydantic's lax types of the fields in :data:`_ENGINE_CHECKED` (errors appended), and what the engine will
    check: chat asks for ``top_logprobs`` sample logprobs where ``logprobs`` is true, a legacy completion for
    ``logprobs`` of them; ``logit_bias`` keeps its raw keys (converted later, in vLLM's order)."""
    inputs = EngineInputs()
    if chat:
        wanted = check_bool(body, "logprobs", errors, optional=True, default=False)
        top = check_int(body, "top_logprobs", errors, optional=True, default=0)  # null is 0 (TopLogprobsParam)
        inputs.sample_logprobs = top if wanted else None
        inputs.top_logprobs = top  # (what chat's echo asks of the prompt, whether or not logprobs is true)
    else:
        inputs.sample_logprobs = inputs.top_logprobs = check_int(body, "logprobs", errors, optional=True,
                                                                 default=None)
    inputs.prompt_logprobs = check_int(body, "prompt_logprobs", errors, optional=True, default=None)
    inputs.logit_bias = None
    bias = body.get("logit_bias")
    if bias is not None:
        if not isinstance(bias, dict):
            errors.append(field_error("dict_type", "body.logit_bias", "Input should be a valid dictionary", bias))
        else:
            before = len(errors)
            for key, value in bias.items():
                if value is None:  # dict[str, float]: a null bias is no float
                    errors.append(field_error("float_type", f"body.logit_bias.{key}", "Input should be a valid number",
                                              value))
                else:
                    check_float(bias, key, errors, loc_prefix="body.logit_bias")
            if len(errors) == before:
                inputs.logit_bias = bias
    inputs.stop_token_ids = _check_int_list(body, "stop_token_ids", errors)
    inputs.allowed_token_ids = _check_int_list(body, "allowed_token_ids", errors)
    return inputs


def _check_int_list(body: dict, key: str, errors: list[dict]) -> list[int] | None:
    """An optional ``list[int]`` field: its lax ints, or None where it is absent, null or wrong (an error)."""
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, list):
        errors.append(field_error("list_type", f"body.{key}", "Input should be a valid list", value))
        return None
    before = len(errors)
    items = dict(enumerate(value))
    ids = [check_int(items, i, errors, optional=False, default=None, loc_prefix=f"body.{key}") for i in items]
    return ids if len(errors) == before else None


# SamplingParams' defaults where a request leaves a field out or null (temperature: the model's default, 1.0 here)
SAMPLING_DEFAULTS = {"presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0,
                     "temperature": 1.0, "top_p": 1.0, "min_p": 0.0}


def parse_body(body: Any, chat: bool) -> Parsed | web.Response:
    if not isinstance(body, dict):
        return not_an_object_response(body)
    # vLLM 0.32's "before" model validators raise VLLMValidationError, which is no ValueError: it escapes
    # pydantic and comes back as a BadRequestError naming the parameter, ahead of any field's type error. They
    # run last-defined first: tool usage, structured outputs, logprobs, stream options, the response format, the
    # messages' normalization, the cache salt. A legacy completion's run: the prompt, stream options, logprobs,
    # structured outputs, the response format, the cache salt.
    if chat:
        refused = messages_type_error(body)  # check_system_message_content_type
        if refused is not None:
            return bad_request(refused)
        if body.get("continue_final_message") and body.get("add_generation_prompt"):  # check_generation_prompt
            return bad_request("Cannot set both `continue_final_message` and `add_generation_prompt` to True.")
        refused = (check_tool_usage(body) or refused_by(check_structured_outputs_count, body, chat)
                   or check_logprobs(body))
        if refused is not None:
            return refused
    elif (isinstance(body.get("prompt"), list) and len(body["prompt"]) > MAX_COMPLETION_PROMPTS
          and not isinstance(body["prompt"][0], int)):
        return bad_request(validation_message(
            f"prompt list length {len(body['prompt'])} exceeds the maximum allowed count of "
            f"{MAX_COMPLETION_PROMPTS}. To increase this limit, set the VLLM_MAX_COMPLETION_PROMPTS environment "
            "variable.", "prompt", None), "prompt")
    elif body.get("prompt") in (None, "") and not body.get("prompt_embeds"):
        return bad_request(validation_message("Either prompt or prompt_embeds must be provided and non-empty.",
                                              "prompt", None), "prompt")
    if body.get("stream_options") and not body.get("stream"):
        return bad_request(validation_message("Stream options can only be defined when `stream=True`.",
                                              "stream_options", None), "stream_options")
    if not chat:
        refused = check_logprobs(body, chat=False) or refused_by(check_structured_outputs_count, body, chat)
        if refused is not None:
            return refused
    response_format = body.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type") == "json_schema" and (
            response_format.get("json_schema") is None):  # validate_response_format
        return bad_request(validation_message("When response_format type is 'json_schema', the 'json_schema' field "
                                              "must be provided.", "response_format", None), "response_format")
    refused = refused_by(check_structural_tag_format, body)
    if refused is not None:
        return refused
    errors: list[dict] = []
    p = Parsed()
    p.chat = chat
    p.messages = None
    p.plain = False
    if chat:  # the request model's first field
        if "messages" not in body:
            errors.append(field_error("missing", "body.messages", "Field required", body))
        elif plain_messages(body["messages"]):  # nearly every request's: taken as they are
            p.messages, p.plain = body["messages"], True
        else:
            try:
                p.messages, message_errors = validated_messages(normalized_messages(body["messages"]))
            except MessageRefusal as refusal:  # _normalize_messages_before
                return bad_request(refusal.message)
            errors += message_errors
    refused = refused_by(check_cache_salt, body)  # the request model's first "before" validator
    if refused is not None:
        return refused
    p.model = check_str(body, "model", errors)
    p.stream = bool(check_bool(body, "stream", errors, optional=True, default=False))
    p.ignore_eos = bool(check_bool(body, "ignore_eos", errors, optional=False, default=False))
    p.include_usage = False
    p.continuous_usage = False
    stream_options = body.get("stream_options")
    if stream_options is not None:
        if not isinstance(stream_options, dict):
            errors.append(field_error("model_attributes_type", "body.stream_options", "Input should be a valid "
                                      "dictionary or object to extract fields from", stream_options))
        else:
            # vLLM 0.32's StreamOptions: include_usage defaults to false (as OpenAI); older vLLM defaulted to true
            include = check_bool(stream_options, "include_usage", errors, optional=True, default=False,
                                 loc_prefix="body.stream_options")
            cont = check_bool(stream_options, "continuous_usage_stats", errors, optional=True, default=False,
                              loc_prefix="body.stream_options")
            p.include_usage = bool(include)
            p.continuous_usage = bool(include) and bool(cont)
    max_tokens = check_int(body, "max_tokens", errors, optional=True, default=None)
    if max_tokens is None and not chat:
        max_tokens = LEGACY_COMPLETION_MAX_TOKENS  # vLLM 0.32's CompletionRequest: 16, also for an explicit null
    p.max_tokens_param = "max_tokens"
    if chat:
        max_completion = check_int(body, "max_completion_tokens", errors, optional=True, default=None)
        if max_completion is not None:
            max_tokens = max_completion
            p.max_tokens_param = "max_completion_tokens"
    # echo: chat's a bool (null refused), a legacy completion's optional; only the latter's changes the length
    p.echo_asked = bool(check_bool(body, "echo", errors, optional=not chat, default=False))
    p.echo = p.echo_asked and not chat
    p.output_budget = bool(max_tokens)  # TokenizeParams.max_output_tokens (``max_tokens or 0``) is not 0
    if p.echo and max_tokens == 0:
        max_tokens = 1  # vLLM 0.32's echo without generation: its engine computes one token (the prompt is sent)
    p.max_tokens = max_tokens
    p.min_tokens = check_int(body, "min_tokens", errors, optional=False, default=0) or 0
    p.priority = check_int(body, "priority", errors, optional=False, default=0) or 0
    check_range(errors, "priority", p.priority, body.get("priority"), INT64_MIN, INT64_MAX)
    n = check_int(body, "n", errors, optional=chat, default=1)  # (a legacy completion's is no Optional)
    p.n = 1 if n is None else n
    p.sampling = {key: check_float(body, key, errors) for key in SAMPLING_DEFAULTS}
    for key, value in p.sampling.items():
        if value is None:
            p.sampling[key] = SAMPLING_DEFAULTS[key]
    top_k = check_int(body, "top_k", errors, optional=True, default=None)
    p.sampling["top_k"] = 0 if top_k is None else top_k
    p.greedy = p.sampling["temperature"] < GREEDY_TEMPERATURE
    check_seed(body, errors)
    p.stop = check_stop(body, errors)
    if not (isinstance(response_format, dict) and response_format.get("type") == "structural_tag"):
        errors += errors_of(RESPONSE_FORMAT, response_format, "response_format")  # a structural tag: not checked
    check_str(body, "user", errors)
    for key in ("skip_special_tokens", "add_special_tokens"):
        check_bool(body, key, errors, optional=False, default=True)
    p.truncate = check_int(body, "truncate_prompt_tokens", errors, optional=True, default=None)
    check_range(errors, "truncate_prompt_tokens", p.truncate, p.truncate, -1, INT64_MAX)
    p.truncation_side = body.get("truncation_side")
    if p.truncation_side is not None and p.truncation_side not in ("left", "right"):
        errors.append({**field_error("literal_error", "body.truncation_side", "Input should be 'left' or 'right'",
                                     p.truncation_side), "ctx": {"expected": "'left' or 'right'"}})
    p.suffix = None
    p.template_conflict = False
    p.role = ANSWER_ROLE
    if chat:
        if "tools" in body:
            errors += errors_of(TOOLS, body["tools"], "tools")
        if body.get("tool_choice") not in (None, "none", "auto", "required"):  # (the plain choices pass)
            errors += errors_of(TOOL_CHOICE, body["tool_choice"], "tool_choice")
        check_bool(body, "parallel_tool_calls", errors, optional=True, default=True)
        add_generation_prompt = check_bool(body, "add_generation_prompt", errors, optional=False, default=True)
        continue_final = check_bool(body, "continue_final_message", errors, optional=False, default=False)
        p.template_conflict = bool(continue_final) and bool(add_generation_prompt)  # the chat template refuses
        p.role = answer_role(body.get("messages"), add_generation_prompt)
        kwargs = body.get("chat_template_kwargs")
        if kwargs is not None and not isinstance(kwargs, dict):
            errors.append(field_error("dict_type", "body.chat_template_kwargs", "Input should be a valid dictionary",
                                      kwargs))
    else:
        p.suffix = check_str(body, "suffix", errors)
        prompt = body.get("prompt")
        # the request model's second field: its errors among the others' (token ids in lax forms or with a negative
        # one, nested token ids, a batch, or what the union refuses)
        resolved = None if prompt == [] or prompt_taken_as_is(prompt) else resolve_prompt(prompt, errors)
        p.unencodable = has_lone_surrogate((prompt,) if isinstance(prompt, str) else (
            text for text in prompt if isinstance(text, str)) if isinstance(prompt, list) else ())
    p.as_token_ids = bool(check_bool(body, "return_tokens_as_token_ids", errors, optional=True, default=False))
    p.return_ids = bool(check_bool(body, "return_token_ids", errors, optional=True, default=False))
    p.return_text = chat and bool(check_bool(body, "return_prompt_text", errors, optional=True, default=False))
    p.returned = None  # (set by the server where an answer sends back any of its prompt)
    p.logprobs = None  # (the engine's vocabulary decides its token ids: set by the server)
    p.request_id = body.get("request_id")
    if "request_id" in body and not isinstance(p.request_id, str):
        errors.append(field_error("string_type", "body.request_id", "Input should be a valid string", p.request_id))
    p.engine_inputs = None if _ENGINE_CHECKED.isdisjoint(body) else parse_engine_inputs(body, chat, errors)
    p.structured = None  # (the engine's structured outputs: set where SamplingParams are built)
    try:
        p.extras = read_extras(body, chat, errors)
    except Refusal as refusal:  # a field's validator: it escapes pydantic, ahead of every type error
        return refusal_response(refusal)
    if p.extras is not None and p.extras.logprob_token_ids and p.engine_inputs is not None:
        p.engine_inputs.sample_logprobs = None  # the ids' logprobs are asked for instead
    if errors:
        return pydantic_error_response(in_field_order(errors, chat))
    if p.messages is not None and not p.plain:
        errors = tool_call_errors(p.messages)  # the request model's "after" validator
        if errors:
            return pydantic_error_response(errors)
    p.tool_choice = effective_tool_choice(body) if chat else None
    # a forced call ("required", a named function) is written as one (where the engine has a tool parser)
    p.tool_plan = plan_tool_call(body.get("tools"), p.tool_choice) if chat and p.tool_choice not in (
        None, "auto") else None
    # an answer in JSON mode is written as JSON (structured outputs force it)
    p.json_text = plan_json_text(body.get("response_format"), filler_text) if p.tool_plan is None else None
    p.prompt_is_token_ids = False
    p.max_prompt_id = None
    p.prompt_ids = None
    p.prompts = None
    if chat:
        p.prompt_tokens = estimate_chat_prompt_tokens(body["messages"])
    else:
        prompt = body.get("prompt")
        if prompt == []:  # no prompt to render: refused as vLLM's renderer refuses it (render_refusal)
            p.prompts = []
            p.prompt_tokens = 0
            return p
        if not prompt_taken_as_is(prompt):
            prompts: list = resolved  # type: ignore[assignment]  # (read with the fields)
            if not prompts:  # (no prompt beside prompt_embeds: refused with them)
                p.prompts = []
                p.prompt_tokens = 0
                return p
            if len(prompts) > 1:  # a batch: each prompt its own engine request(s), checked on its own
                p.prompts = [BatchPrompt(one) for one in prompts]
                p.prompt_tokens = p.prompts[0].tokens
                p.prompt_is_token_ids = p.prompts[0].token_ids
                return p
            prompt = prompts[0]
        p.prompt_tokens = estimate_completion_prompt_tokens(prompt)
        p.prompt_is_token_ids = is_token_ids(prompt)
        if p.prompt_is_token_ids:
            ids = prompt[0] if len(prompt) == 1 and isinstance(prompt[0], list) else prompt
            p.max_prompt_id = largest_id(ids)
            p.prompt_ids = ids
    return p


ANSWER_ROLE = "assistant"  # vLLM's response_role (--response-role)


def answer_role(messages: Any, add_generation_prompt: bool | None) -> str:
    """The role of a chat answer: vLLM's get_chat_request_role, its response role where a generation prompt is
    added (the default), else the last message's role (the answer continues that message's turn)."""
    if add_generation_prompt is not False:
        return ANSWER_ROLE
    last = messages[-1] if isinstance(messages, list) and messages else None
    role = last.get("role") if isinstance(last, dict) else None
    return role if isinstance(role, str) else ANSWER_ROLE


def is_token_ids(prompt: Any) -> bool:
    """A completions prompt given as token ids (a list of ints, or a one-element list holding one): vLLM counts
    it whole, where it tokenizes text only up to the context plus one."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], list):
        prompt = prompt[0]
    return isinstance(prompt, list) and all(type(t) is int for t in prompt)
