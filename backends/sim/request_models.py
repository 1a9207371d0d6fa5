"""vLLM 0.32's request models for the nested fields the simulated engine checks with pydantic itself.

The scalar fields are read one by one (:mod:`backends.lax`); a nested field whose model has several members
and several errors (a tool's ``function``, ``response_format``'s union of three formats) is validated here by
pydantic against a copy of vLLM's model (``entrypoints/generate/base/protocol.py``,
``chat_completion/protocol.py``), so that a malformed one gets the errors vLLM gives, in its order. The copies
keep only what validation sees: the field names, types and defaults.

vLLM's models wrap each member in a validator (``__log_extra_fields__``) whose name stands in the error's
``loc`` where pydantic would put the member's class name, and its error handler then drops such names
(``clean_loc_for_param``): a union member's class name is dropped here instead (:func:`errors_of`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError


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


TOOLS = TypeAdapter(list[ChatCompletionToolsParam] | None)
RESPONSE_FORMAT = TypeAdapter(ResponseFormat | StructuralTagResponseFormat | LegacyStructuralTagResponseFormat | None)
_MEMBER_NAMES = frozenset(model.__name__ for model in (ResponseFormat, StructuralTagResponseFormat,
                                                        LegacyStructuralTagResponseFormat))


def errors_of(adapter: TypeAdapter, value: Any, field: str) -> list[dict]:
    """Pydantic's errors for ``value`` as body field ``field``, as vLLM reports them (``loc`` a dotted string
    from ``body``); none where it validates."""
    try:
        adapter.validate_python(value, from_attributes=True)  # as FastAPI validates a body
    except ValidationError as exc:
        errors = []
        for error in exc.errors(include_url=False):
            loc = ".".join(str(part) for part in ("body", field, *error["loc"]) if part not in _MEMBER_NAMES)
            shown = {"type": error["type"], "loc": loc, "msg": error["msg"], "input": error["input"]}
            if "ctx" in error:
                shown["ctx"] = error["ctx"]
            errors.append(shown)
        return errors
    return []


__all__ = ["RESPONSE_FORMAT", "TOOLS", "errors_of"]
