"""One JSON value read as vLLM's request models read it: pydantic's lax mode, by pydantic itself.

vLLM (FastAPI) parses a body with ``json.loads`` and validates it with pydantic in lax (python) mode, so
``"max_tokens": 4.0``, ``"4"`` and ``"4.0"``, ``"stream": "yes"`` or ``1`` and ``"temperature": "0.5"`` are all
served. The gateway reads those fields to schedule (a stream or not, the tokens to reserve, the answers to
count) and the simulated engines stand in for vLLM, so both must read them as vLLM does. The simulated
engines' hand-written copy of pydantic's rules had drifted: Python's ``int()`` and ``float()`` take non-ASCII
digits ("٤", "１") that pydantic refuses. Adapters are built once; a value already of the type skips pydantic.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field, TypeAdapter, ValidationError

_INT = TypeAdapter(int)
_BOOL = TypeAdapter(bool)
_FLOAT = TypeAdapter(float)
TOKEN_ID = Annotated[int, Field(ge=0)]  # a token id in vLLM's CompletionRequest.prompt
_TOKEN_IDS = TypeAdapter(list[TOKEN_ID])


class LaxError(ValueError):
    """A value pydantic refuses: its error ``type`` (e.g. ``int_parsing``) and message, as vLLM reports them."""

    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(message)
        self.type = error_type
        self.message = message


def _validate(adapter: TypeAdapter, value: Any) -> Any:
    try:
        return adapter.validate_python(value)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        raise LaxError(error["type"], error["msg"]) from None


def lax_int(value: Any) -> int:
    """An ``int`` field: ints, bools, whole finite floats inside int64, and strings of such numbers."""
    if type(value) is int:
        return value
    return _validate(_INT, value)


def lax_bool(value: Any) -> bool:
    """A ``bool`` field: bools, 0 and 1 (also 0.0 and 1.0), and "true"/"yes"/"on"/"1" and their opposites."""
    if type(value) is bool:
        return value
    return _validate(_BOOL, value)


def lax_float(value: Any) -> float:
    """A ``float`` field: numbers (bools too) and numeric strings, "inf" and "nan" included: ranges are checked
    by the caller, as vLLM checks them after parsing."""
    if type(value) is float:
        return value
    return _validate(_FLOAT, value)


def lax_token_ids(value: list, types: set[type] | None = None) -> list[int]:
    """A list of token ids (``list[int >= 0]``): ``value`` itself where it holds only ints, none negative (the
    set of its items' types and the minimum are made in C; ``types`` is that set where the caller made it
    already); else pydantic's reading of it, so ``[1.0, "2", true]`` is ``[1, 2, 1]`` as vLLM reads it."""
    if (types if types is not None else set(map(type, value))) == {int} and min(value) >= 0:
        return value
    return _validate(_TOKEN_IDS, value)


__all__ = ["TOKEN_ID", "LaxError", "lax_bool", "lax_float", "lax_int", "lax_token_ids"]
