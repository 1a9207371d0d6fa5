"""vLLM 0.32's request models for the nested fields the simulated engine checks with pydantic itself.

The scalar fields are read one by one (:mod:`backends.lax`); a field whose type has several members or
nested models, and so several errors (a tool's ``function``, ``response_format``'s union of three formats, a
legacy completion's ``prompt`` union), is validated here by pydantic against a copy of vLLM 0.32's type
(``entrypoints/generate/base/protocol.py``, ``chat_completion/protocol.py``, ``completion/protocol.py``), so that
a malformed one gets the errors vLLM gives, in its order, and a valid one is read as vLLM reads it. The copies
keep only what validation sees: the field names, types and defaults. Each was compared with vLLM's own models
on malformed values (the real-vLLM stage compares the answers of both engines).

vLLM's error handler drops pydantic's own segments from an error's ``loc`` (``clean_loc_for_param``: a union
member's tag such as ``list[constrained-int]``, a wrapper's name), and its models wrap each member in a
validator (``__log_extra_fields__``) whose name stands where pydantic would put a model member's class name:
:func:`validated` drops both.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from backends.lax import TOKEN_ID


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow")  # vLLM's OpenAIBaseModel: the API allows extra fields


class FunctionDefinition(_Model):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None
    defer_loading: bool | None = None


class ChatCompletionToolsParam(_Model):
    type: Literal["function"] = "function"
    function: FunctionDefinition
    defer_loading: bool | None = None


class JsonSchemaResponseFormat(_Model):
    name: str
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class LegacyStructuralTag(_Model):
    begin: str
    structural_tag_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    end: str


class LegacyStructuralTagResponseFormat(_Model):
    type: Literal["structural_tag"]
    structures: list[LegacyStructuralTag]
    triggers: list[str]


class StructuralTagResponseFormat(_Model):
    type: Literal["structural_tag"]
    format: Any


class ResponseFormat(_Model):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaResponseFormat | None = None


class ChatCompletionNamedFunction(_Model):
    name: str


class ChatCompletionNamedToolChoiceParam(_Model):
    function: ChatCompletionNamedFunction
    type: Literal["function"] = "function"


TOOLS = TypeAdapter(list[ChatCompletionToolsParam] | None)
TOOL_CHOICE = TypeAdapter(Literal["none"] | Literal["auto"] | Literal["required"] | ChatCompletionNamedToolChoiceParam
                          | None)
# CompletionRequest.prompt: token ids, a batch of them, a string, a batch of strings (pydantic's smart union: a list
# of numeric strings stays strings, [1.0, "2"] is token ids)
PROMPT = TypeAdapter(list[TOKEN_ID] | list[list[TOKEN_ID]] | str | list[str] | None)
RESPONSE_FORMAT = TypeAdapter(ResponseFormat | StructuralTagResponseFormat | LegacyStructuralTagResponseFormat | None)
STRUCTURAL_TAG_FORMAT = TypeAdapter(LegacyStructuralTagResponseFormat | StructuralTagResponseFormat)
_MEMBER_NAMES = frozenset(model.__name__ for model in (ResponseFormat, StructuralTagResponseFormat,
                                                        LegacyStructuralTagResponseFormat,
                                                        ChatCompletionNamedToolChoiceParam))
# vLLM's clean_loc_for_param (serve/exception_handling/handlers/validation.py) drops pydantic's own segments of a
# loc: a union member's tag ("list[constrained-int]", "str") or a wrapper's; these are the ones its list names
_INTERNAL_SEGMENTS = frozenset({
    "function-wrap", "function-after", "function-before", "function-plain", "json-or-python", "lax-or-strict",
    "chain", "default", "nullable", "tagged-union", "union", "call", "arguments", "is-instance", "is-subclass",
    "callable", "str", "int", "float", "bool", "bytes", "bytearray", "list", "tuple", "dict", "set", "frozenset",
    "complex", "none", "nonetype"})
_BRACKETS = frozenset("[]{}()")


def _is_internal(part: Any) -> bool:
    return isinstance(part, str) and (part in _MEMBER_NAMES or not _BRACKETS.isdisjoint(part)
                                      or part.lower() in _INTERNAL_SEGMENTS)


def validated(adapter: TypeAdapter, value: Any, field: str) -> tuple[Any, list[dict]]:
    """``value`` as body field ``field`` read by pydantic, and its errors as vLLM reports them (``loc`` a dotted
    string from ``body``): (the value read, []) where it validates, else (None, the errors)."""
    try:
        return adapter.validate_python(value, from_attributes=True), []  # as FastAPI validates a body
    except ValidationError as exc:
        return None, reported_errors(exc, ("body", field))


def reported_errors(exc: ValidationError, prefix: tuple[str, ...]) -> list[dict]:
    """``exc``'s errors as vLLM reports them: each ``loc`` a dotted string after ``prefix``, without pydantic's own
    segments."""
    errors = []
    for error in exc.errors(include_url=False):
        loc = ".".join(str(part) for part in (*prefix, *error["loc"]) if not _is_internal(part))
        shown = {"type": error["type"], "loc": loc, "msg": error["msg"], "input": error["input"]}
        if "ctx" in error:
            shown["ctx"] = error["ctx"]
        errors.append(shown)
    return errors


def errors_of(adapter: TypeAdapter, value: Any, field: str) -> list[dict]:
    """The errors of :func:`validated` alone."""
    return validated(adapter, value, field)[1]


__all__ = ["PROMPT", "RESPONSE_FORMAT", "STRUCTURAL_TAG_FORMAT", "TOOLS", "TOOL_CHOICE", "errors_of", "reported_errors", "validated"]
