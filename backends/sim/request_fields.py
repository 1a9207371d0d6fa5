"""vLLM 0.32's request fields in their order, and the rarer fields the simulated engine only checks.

**Order.** vLLM validates a body with pydantic, which reports the errors of a request model's fields in the order
the model defines them, and its 400 names the first one's ``loc`` as the ``param``. The simulated engine reads
its fields in its own order, so :func:`in_field_order` sorts their errors by vLLM's (:data:`CHAT_FIELDS`,
:data:`COMPLETION_FIELDS`: ``model_fields`` of ``ChatCompletionRequest`` and ``CompletionRequest``; the real-vLLM
stage compares them with the installed vLLM's).

**The rarer fields** (:data:`EXTRA_FIELDS`: beam search, structured outputs, reasoning, multimodal and transfer
parameters, ``bad_words``, ``cache_salt``, ``vllm_xargs`` ...) change little in a simulated answer (only
``stream_interval`` and a beam search's checks do), but vLLM refuses malformed ones, so the sim must too. They
are validated by pydantic against copies of vLLM's types (``chat_completion/protocol.py``,
``completion/protocol.py``, ``sampling_params.py``), only where a body holds one of them (nearly none does).
Their validators are copied too: where vLLM's raise its ``VLLMValidationError``, which is no ``ValueError``, the
error escapes pydantic and answers alone, ahead of every field's type error (:class:`Refusal`).

**The "before" validators** vLLM's request models run on the raw body for these fields
(:func:`check_structured_outputs_count`, :func:`check_logprob_token_ids`, :func:`check_cache_salt`,
:func:`check_structural_tag_format`) raise a :class:`Refusal` too; the server calls them in vLLM's order among the
others. So do the serving's checks kept here: a request's own chat template and multimodal kwargs
(:func:`check_request_template`, :func:`check_mm_kwargs`), ``response_format`` merged into the structured outputs
as SamplingParams are built (:func:`merged_structured_outputs`), and a "required" tool choice's one schema of
every tool (:func:`check_required_tool_defs`). None of them needs a grammar backend, which the sim has not.
"""

from __future__ import annotations

import json
from dataclasses import field, replace
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, ValidationError, create_model
from pydantic.dataclasses import dataclass

from backends.sim.request_models import STRUCTURAL_TAG_FORMAT, reported_errors


class Refusal(Exception):
    """What vLLM refuses outside pydantic's field errors: its 400 ``BadRequestError``, with the message, and the
    parameter and value a ``VLLMValidationError`` names; or its 500, where vLLM's own code fails on a value
    (``status`` 500, an ``InternalServerError``)."""

    def __init__(self, message: str, param: str | None = None, value: Any = None, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.value = value
        self.status = status


CHAT_FIELDS = (
    "messages", "model", "frequency_penalty", "logit_bias", "logprobs", "top_logprobs", "max_tokens",
    "max_completion_tokens", "n", "presence_penalty", "response_format", "seed", "stop", "stream", "stream_options",
    "temperature", "top_p", "tools", "tool_choice", "reasoning_effort", "thinking_token_budget", "include_reasoning",
    "parallel_tool_calls", "user", "use_beam_search", "top_k", "min_p", "repetition_penalty", "watermarking",
    "length_penalty", "stop_token_ids", "include_stop_str_in_output", "ignore_eos", "min_tokens",
    "skip_special_tokens", "spaces_between_special_tokens", "truncate_prompt_tokens", "truncation_side",
    "prompt_logprobs", "logprob_token_ids", "allowed_token_ids", "bad_words", "echo", "add_generation_prompt",
    "continue_final_message", "add_special_tokens", "documents", "chat_template", "chat_template_kwargs",
    "media_io_kwargs", "mm_processor_kwargs", "structured_outputs", "priority", "request_id", "session_id",
    "return_tokens_as_token_ids", "return_token_ids", "routed_experts_prompt_start", "return_token_offsets",
    "return_prompt_text", "mm_payload", "return_mm_kwargs", "cache_salt", "kv_transfer_params", "ec_transfer_params",
    "vllm_xargs", "repetition_detection", "stream_interval")
COMPLETION_FIELDS = (
    "model", "prompt", "echo", "frequency_penalty", "logit_bias", "logprobs", "max_tokens", "n", "presence_penalty",
    "seed", "stop", "stream", "stream_options", "suffix", "temperature", "top_p", "user", "use_beam_search", "top_k",
    "min_p", "repetition_penalty", "watermarking", "length_penalty", "stop_token_ids", "include_stop_str_in_output",
    "ignore_eos", "min_tokens", "skip_special_tokens", "spaces_between_special_tokens", "truncate_prompt_tokens",
    "truncation_side", "allowed_token_ids", "prompt_logprobs", "logprob_token_ids", "bad_words", "prompt_embeds",
    "add_special_tokens", "response_format", "structured_outputs", "priority", "request_id", "session_id",
    "return_tokens_as_token_ids", "return_token_ids", "routed_experts_prompt_start", "return_token_offsets",
    "mm_payload", "return_mm_kwargs", "cache_salt", "kv_transfer_params", "ec_transfer_params", "vllm_xargs",
    "repetition_detection", "thinking_token_budget", "stream_interval")
_POSITIONS = ({name: i for i, name in enumerate(COMPLETION_FIELDS)}, {name: i for i, name in enumerate(CHAT_FIELDS)})


def in_field_order(errors: list[dict], chat: bool) -> list[dict]:
    """``errors`` (each ``loc`` a dotted string from ``body``) in the order vLLM's request model reports them: by
    field, each field's own errors in the order they came."""
    if len(errors) < 2:
        return errors
    positions = _POSITIONS[chat]
    last = len(positions)
    return sorted(errors, key=lambda error: positions.get(error["loc"].split(".", 2)[1], last))


# ------------------------------------------------------------------------------------ vLLM's types, copied


_CONSTRAINTS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


@dataclass
class StructuredOutputsParams:
    """vLLM's (a pydantic dataclass): its checks run as pydantic builds it, and its error shows its ``__dict__``."""

    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None
    structural_tag: str | None = None
    _backend: str | None = field(default=None, init=False)
    _backend_was_auto: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        count = sum(getattr(self, name) is not None for name in _CONSTRAINTS)
        if count > 1:
            raise Refusal(f"You can only use one kind of structured outputs constraint but multiple are specified: "
                          f"{self.__dict__}")
        if count < 1:
            raise Refusal(f"You must use one kind of structured outputs constraint but none are specified: "
                          f"{self.__dict__}")


@dataclass
class RepetitionDetectionParams:
    """vLLM's (a pydantic dataclass), with its checks."""

    max_pattern_size: int = 0
    min_pattern_size: int = 0
    min_count: int = 0

    def __post_init__(self) -> None:
        if self.max_pattern_size < 0 or self.min_pattern_size < 0 or self.min_pattern_size > self.max_pattern_size:
            raise Refusal("max_pattern_size, min_pattern_size must be >=0, with min_pattern_size <= "
                          "max_pattern_size. Set both to 0 to disable repetitive pattern detection.")
        if self.max_pattern_size > 0 and self.min_count < 2:
            raise Refusal("min_count must be >= 2 to detect repetitive patterns in engine output. If you do not "
                          "wish to detect repetitive patterns, set max_pattern_size to 0.")


_BUDGET_MESSAGE = "`thinking_token_budget` must be a non-negative integer or -1 for unlimited."


def _thinking_token_budget(value: Any) -> int | None:
    """vLLM's validate_thinking_token_budget (a "before" validator): an int >= 0, or -1 (None) for unlimited."""
    if value is None:
        return None
    if isinstance(value, (bool, float)) or not isinstance(value, int):
        raise Refusal(_BUDGET_MESSAGE, "thinking_token_budget", value)
    if value == -1:
        return None
    if value < 0:
        raise Refusal(_BUDGET_MESSAGE, "thinking_token_budget", value)
    return value


_XARG = str | int | float | list[str | int | float]
# each rarer field's type and default, as vLLM 0.32 declares it
EXTRA_FIELDS: dict[str, tuple[Any, Any]] = {
    "reasoning_effort": (Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None, None),
    "thinking_token_budget": (Annotated[int | None, BeforeValidator(_thinking_token_budget)], None),
    "include_reasoning": (bool, True),
    "use_beam_search": (bool, False),
    "watermarking": (bool | None, None),
    "length_penalty": (float, 1.0),
    "include_stop_str_in_output": (bool, False),
    "spaces_between_special_tokens": (bool, True),
    "logprob_token_ids": (list[int] | None, None),
    "bad_words": (list[str], Field(default_factory=list)),
    "documents": (list[dict[str, str]] | None, None),
    "chat_template": (str | None, None),
    "media_io_kwargs": (dict[str, dict[str, Any]] | None, None),
    "mm_processor_kwargs": (dict[str, Any] | None, None),
    "structured_outputs": (StructuredOutputsParams | None, None),
    "session_id": (str | None, None),
    "routed_experts_prompt_start": (int, Field(default=0, ge=0)),
    "return_token_offsets": (bool | None, False),
    "mm_payload": (Literal["tensors", "none"], "tensors"),
    "return_mm_kwargs": (bool | None, None),
    "cache_salt": (str | None, Field(default=None, min_length=1, max_length=1024)),
    "kv_transfer_params": (dict[str, Any] | None, None),
    "ec_transfer_params": (dict[str, Any] | None, None),
    "vllm_xargs": (dict[str, _XARG] | None, None),
    "repetition_detection": (RepetitionDetectionParams | None, None),
    "prompt_embeds": (bytes | list[bytes] | None, None),
    "stream_interval": (Annotated[int, Field(ge=1)] | None, None),
}
_MODELS = tuple(create_model(name, **{key: EXTRA_FIELDS[key] for key in fields if key in EXTRA_FIELDS})
                for name, fields in (("CompletionExtras", COMPLETION_FIELDS), ("ChatExtras", CHAT_FIELDS)))
_EXTRA_NAMES = (frozenset(_MODELS[0].model_fields), frozenset(_MODELS[1].model_fields))


def read_extras(body: dict, chat: bool, errors: list[dict]) -> Any:
    """The endpoint's rarer fields of ``body`` as vLLM reads them (an object with each as an attribute), None
    where the body holds none of them; their type errors appended to ``errors``. A validator's refusal escapes
    as vLLM's does (:class:`Refusal`, to answer alone)."""
    if _EXTRA_NAMES[chat].isdisjoint(body):
        return None
    try:
        return _MODELS[chat].model_validate(body, from_attributes=True)
    except ValidationError as exc:
        errors += reported_errors(exc, ("body",))
        return None


MAX_JSON_NESTING = 64  # vLLM's MAX_STRUCTURED_OUTPUT_JSON_NESTING
STRUCTURAL_TAG_NESTING = 16  # and the structural tag's wrapper levels beyond it
NESTING_REFUSAL = (f"The JSON schema is nested too deeply: objects and arrays may nest at most {MAX_JSON_NESTING} "
                   "levels")


def exceeds_json_nesting(spec: Any, limit: int) -> bool:
    """vLLM's _exceeds_json_nesting: whether a JSON document (a text is parsed; one that does not parse is left to
    the grammar backend) nests objects and arrays deeper than ``limit``."""
    if not spec:
        return False
    if isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except RecursionError:
            return True
        except ValueError:
            return False
    level = [spec]
    for _ in range(limit):
        level = [child for node in level if isinstance(node, (dict, list))
                 for child in (node.values() if isinstance(node, dict) else node) if isinstance(child, (dict, list))]
        if not level:
            return False
    return True


# -------------------------------------------------------------------- the request models' "before" validators


def check_structured_outputs_count(body: dict, chat: bool) -> None:
    """vLLM 0.32's ``check_structured_outputs_count``: one kind of constraint at most, and (chat) not with a named
    tool. It reads the raw value as a dict, so any other value is its own 500. Then the structural tag's payload
    (:func:`check_structural_tag_payload`)."""
    outputs = body.get("structured_outputs")
    if outputs is None:
        return
    if not isinstance(outputs, dict):
        raise Refusal(f"'{type(outputs).__name__}' object has no attribute 'get'", status=500)
    count = sum(outputs.get(key) is not None for key in ("json", "regex", "choice"))
    if count > 1:
        raise Refusal("You can only use one kind of constraints for structured outputs ('json', 'regex' or "
                      "'choice').", None if chat else "structured_outputs")
    if chat and count > 0 and body.get("tool_choice", "none") not in ("none", "auto", "required"):
        raise Refusal("You can only either use constraints for structured outputs or tools, not both.")
    if outputs.get("structural_tag") is not None:
        check_structural_tag_payload(outputs["structural_tag"], "structured_outputs")


def check_structural_tag_payload(payload: Any, parameter: str) -> None:
    """vLLM 0.32's validate_structural_tag_payload where no grammar backend is needed to refuse: an empty text, one
    nested too deeply, no text (vLLM's StructuredOutputsParams takes only text) or no JSON (which xgrammar cannot
    read). A JSON text is served: whether xgrammar takes it is not checked."""
    invalid = Refusal(f"Invalid {parameter} structural_tag specification.", parameter)
    if not isinstance(payload, str) or not payload:
        raise invalid
    try:
        parsed = json.loads(payload)
    except RecursionError:
        raise Refusal(NESTING_REFUSAL) from None
    except ValueError:
        raise invalid from None
    if exceeds_json_nesting(parsed, MAX_JSON_NESTING + STRUCTURAL_TAG_NESTING):
        raise Refusal(NESTING_REFUSAL)


def check_structural_tag_format(body: dict) -> None:
    """vLLM 0.32's validate_structural_tag_response_format (in ``validate_response_format``): a structural tag's
    ``response_format`` is one of its two forms. (Its payload goes to xgrammar, which is not checked.)"""
    response_format = body.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type") == "structural_tag":
        try:
            STRUCTURAL_TAG_FORMAT.validate_python(response_format)
        except ValidationError:
            raise Refusal("Invalid response_format structural_tag specification.", "response_format") from None


def check_logprob_token_ids(body: dict, chat: bool) -> None:
    """The part of vLLM 0.32's ``check_logprobs`` about ``logprob_token_ids`` and beam search, which comes first
    (chat's and a legacy completion's differ)."""
    token_ids = body.get("logprob_token_ids")
    if token_ids and body.get("use_beam_search"):
        raise Refusal("`logprob_token_ids` is not supported with beam search.", "logprob_token_ids")
    if chat:
        if token_ids and not body.get("logprobs"):
            raise Refusal("when using `logprob_token_ids`, `logprobs` must be set to true.", "logprob_token_ids")
        return
    if body.get("use_beam_search") and body.get("echo") and body.get("logprobs") is not None:
        raise Refusal("`echo` with `logprobs` is not supported with beam search because beam search does not "
                      "compute prompt logprobs.", "echo")
    if token_ids and body.get("echo") and body.get("max_tokens") == 0:
        raise Refusal("`logprob_token_ids` is not supported when `echo=True` and `max_tokens=0` because no output "
                      "tokens are generated.", "logprob_token_ids")
    if token_ids and body.get("logprobs") is None:
        raise Refusal("when using `logprob_token_ids`, `logprobs` must be set.", "logprob_token_ids")


_CACHE_SALT_FORBIDDEN = frozenset("@/\\\x00")
_MAX_CACHE_SALT = 128


def check_cache_salt(body: dict) -> None:
    """vLLM 0.32's ``check_cache_salt_support`` (validate_cache_salt)."""
    salt = body.get("cache_salt")
    if salt is None:
        return
    if not isinstance(salt, str) or not salt:
        raise Refusal("Parameter 'cache_salt' must be a non-empty string if provided.", "cache_salt")
    if len(salt) > _MAX_CACHE_SALT or not _CACHE_SALT_FORBIDDEN.isdisjoint(salt):
        raise Refusal("Parameter 'cache_salt' must be at most 128 characters and must not contain '@', '/', '\\\\', "
                      "or NUL.", "cache_salt")


# ------------------------------------------------------------------------------------- the serving's checks


def check_request_template(body: dict) -> None:
    """vLLM's chat renderer without ``--trust-request-chat-template``: a request's own chat template refused."""
    kwargs = body.get("chat_template_kwargs")
    if body.get("chat_template") is not None or (kwargs and kwargs.get("chat_template") is not None):
        raise Refusal("Chat template is passed with request, but --trust-request-chat-template is not set. Refused "
                      "request with untrusted chat template.")


def check_mm_kwargs(body: dict) -> None:
    """vLLM's validate_request_mm_kwargs without ``--trust-request-mm-kwargs``, as each renderer calls it (also on a
    legacy completion, whose model keeps these as extra fields)."""
    for name, kind in (("mm_processor_kwargs", "multimodal preprocessing"),
                       ("media_io_kwargs", "multimodal media loading")):
        if body.get(name):
            raise Refusal(f"Per-request {name} are disabled by default because they can change {kind} resource "
                          "usage. Start the server with --trust-request-mm-kwargs only when clients are trusted.",
                          name)


def merged_structured_outputs(outputs: StructuredOutputsParams | None,
                              response_format: Any) -> StructuredOutputsParams | None:
    """vLLM 0.32's structured_outputs_from_response_format, as its SamplingParams are built: a ``response_format``
    (validated) overrides ``structured_outputs``, whose dataclass is built again with its checks (one kind of
    constraint: a :class:`Refusal`)."""
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind in (None, "text"):
        return outputs
    if kind == "json_object":
        overrides: dict[str, Any] = {"json_object": True}
    elif kind == "json_schema":
        overrides = {"json": (response_format.get("json_schema") or {}).get("schema")}
    else:  # a structural tag: its format as JSON text
        overrides = {"structural_tag": json.dumps(response_format)}
    return StructuredOutputsParams(**overrides) if outputs is None else replace(outputs, **overrides)


def check_required_tool_defs(tools: list[dict]) -> None:
    """vLLM 0.32's _get_tool_schema_defs, as a tool parser forces a "required" tool choice with one JSON schema
    of every tool: each tool's ``$defs`` an object, one schema to a name across them (``tools`` validated)."""
    definitions: dict[str, Any] = {}
    for tool in tools:
        function = tool["function"]
        parameters = function.get("parameters")
        if parameters is None:
            continue
        defs = parameters.get("$defs", {})
        if not isinstance(defs, dict):
            raise Refusal(f"`$defs` in the parameters of tool '{function['name']}' must be an object, got "
                          f"{type(defs).__name__}.", "tools")
        for name, schema in defs.items():
            if name in definitions and definitions[name] != schema:
                raise Refusal(f"Tool definition '{name}' has multiple schemas, which is not supported.", "tools")
            definitions[name] = schema


def extra_args(extras: Any) -> dict | None:
    """SamplingParams.extra_args as the request builds it: ``vllm_xargs``, with the transfer parameters added (a
    copy: the request's own stays as sent)."""
    if extras is None:
        return None
    args = dict(extras.vllm_xargs or {})
    if extras.kv_transfer_params:
        args["kv_transfer_params"] = extras.kv_transfer_params
    if extras.ec_transfer_params:
        args["ec_transfer_params"] = extras.ec_transfer_params
    return args or None


__all__ = ["CHAT_FIELDS", "COMPLETION_FIELDS", "EXTRA_FIELDS", "MAX_JSON_NESTING", "NESTING_REFUSAL", "Refusal",
           "STRUCTURAL_TAG_NESTING", "check_cache_salt", "check_logprob_token_ids", "check_mm_kwargs",
           "check_request_template", "check_required_tool_defs", "check_structural_tag_format",
           "check_structural_tag_payload", "check_structured_outputs_count", "exceeds_json_nesting", "extra_args",
           "in_field_order", "merged_structured_outputs", "read_extras"]
