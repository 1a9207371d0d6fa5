"""Forced tool calls (``tool_choice`` "required" or a named function) as a vLLM with a tool parser answers them.

vLLM forces them with structured outputs: for a named function the model writes the arguments as a JSON object
(the function's ``parameters`` schema), for "required" a JSON list of ``{"name": ..., "parameters": ...}``
(vLLM 0.32, ``parser/abstract_parser.py`` ``_extract_tool_calls``). The simulated engine writes the smallest
such call its schema allows: the first tool for "required", every required property with a placeholder of its
type (strings a few filler words), and counts the text as tokens of four characters, plus the end-of-sequence
token. The answer then takes vLLM's shape: ``message.tool_calls`` with ``content: ""`` and ``finish_reason``
"tool_calls" ("required") or "stop" (named); streamed, the arguments come as ``delta.tool_calls`` pieces
(the first with the call's id, type and name) and a last chunk without text. Cut short by ``max_tokens``, a
"required" answer has no tool call (its JSON does not parse) and a named one the arguments written so far, as
vLLM gives them.

"auto" stays text: the model chooses not to call a tool, which a real model may do too.
"""

from __future__ import annotations

import json
import math
import uuid
from dataclasses import dataclass
from typing import Any

CHARS_PER_TOKEN = 4  # the simulated tokenizer of a tool call's JSON text
_MAX_DEPTH = 8  # schemas nest no deeper than this in an example (a recursive $ref would not end)
_MAX_VALUES = 256  # nor grow past this many values (nested minItems multiply: 16 per level was 16**8 values)
_PLACEHOLDER_TEXT = "lorem ipsum"


def example_value(schema: Any, depth: int = 0, budget: list[int] | None = None) -> Any:
    """The smallest value of a JSON schema the simulated model writes: a ``const`` or the first ``enum`` member,
    else by ``type`` (the first that is not "null"): an object with its required properties, a list of its
    ``minItems`` examples, a number at its ``minimum``, ``false``, a few words (within ``minLength`` /
    ``maxLength``; a ``format`` or ``pattern`` is not followed); the first ``anyOf`` / ``oneOf`` member; an empty
    object for what it cannot read (a ``$ref``); past :data:`_MAX_DEPTH` levels or :data:`_MAX_VALUES` values, an
    empty object or list stands for the rest."""
    budget = [_MAX_VALUES] if budget is None else budget
    budget[0] -= 1
    if not isinstance(schema, dict) or depth > _MAX_DEPTH or budget[0] < 0:
        return {}
    if "const" in schema:
        return schema["const"]
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return enum[0]
    for key in ("anyOf", "oneOf", "allOf"):
        members = schema.get(key)
        if isinstance(members, list) and members:
            return example_value(members[0], depth + 1, budget)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind is None and isinstance(schema.get("properties"), dict):
        kind = "object"
    if kind == "object":
        properties = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
        required = schema.get("required") if isinstance(schema.get("required"), list) else []
        return {name: example_value(properties.get(name), depth + 1, budget) for name in required
                if isinstance(name, str)}
    if kind == "array":
        count = schema.get("minItems")
        count = count if isinstance(count, int) and 0 < count <= 16 else 0
        return [example_value(schema.get("items"), depth + 1, budget) for _ in range(min(count, max(budget[0], 0)))]
    if kind in ("integer", "number"):
        low = schema.get("minimum", schema.get("exclusiveMinimum"))
        value = low if isinstance(low, (int, float)) and not isinstance(low, bool) and math.isfinite(low) else 0
        if "exclusiveMinimum" in schema and value == schema.get("exclusiveMinimum"):
            value += 1
        return math.ceil(value) if kind == "integer" else value
    if kind == "boolean":
        return False
    if kind == "null":
        return None
    if kind == "string":  # within minLength / maxLength (a format or pattern is not followed)
        shortest, longest = schema.get("minLength"), schema.get("maxLength")
        text = _PLACEHOLDER_TEXT
        if isinstance(shortest, int) and 0 < shortest <= 4096:
            text = (text + " ") * (shortest // (len(text) + 1) + 1)
            text = text[:max(shortest, len(_PLACEHOLDER_TEXT))]
        return text[:longest] if isinstance(longest, int) and longest >= 0 else text
    return {}


@dataclass(frozen=True, slots=True)
class ToolCallPlan:
    """One answer's forced tool call: the model's text, where its arguments lie in it, and how it is shown."""

    name: str
    required: bool  # tool_choice "required" (else a named function)
    text: str  # what the model writes
    args_start: int  # the arguments' span in ``text``
    args_end: int

    @property
    def tokens(self) -> int:
        """The answer's tokens when it is not cut short: its text's, and the end-of-sequence token."""
        return -(-len(self.text) // CHARS_PER_TOKEN) + 1

    def text_after(self, sent: int, count: int) -> str:
        """The text written by tokens ``sent .. sent+count-1`` (a token is four characters of it)."""
        return self.text[sent * CHARS_PER_TOKEN:(sent + count) * CHARS_PER_TOKEN]

    def arguments_after(self, sent: int, count: int) -> str:
        """The arguments' text written by tokens ``sent .. sent+count-1`` (what a stream's chunk carries)."""
        begin = max(sent * CHARS_PER_TOKEN, self.args_start)
        end = min((sent + count) * CHARS_PER_TOKEN, self.args_end)
        return self.text[begin:end] if end > begin else ""

    @property
    def finish_reason(self) -> str:
        """vLLM's for a call that ended by itself: "tool_calls" for a "required" one, "stop" for a named one (one
        cut short keeps the engine's "length")."""
        return "tool_calls" if self.required else "stop"

    def whole_calls(self, generated: int, cut: bool) -> list[dict] | None:
        """The answer's ``message.tool_calls`` (None: the message has none), from the ``generated`` tokens."""
        if not cut:  # (json.dumps wrote them, as vLLM re-writes a "required" call's parsed parameters)
            arguments = self.text[self.args_start:self.args_end]
        elif self.required:
            return None  # its JSON list does not parse: no call
        else:
            arguments = self.text[:generated * CHARS_PER_TOKEN]
            if not arguments.strip():
                return None
        return [{"id": new_tool_call_id(), "type": "function", "function": {"name": self.name,
                                                                             "arguments": arguments}}]


def new_tool_call_id() -> str:
    """vLLM's ``make_tool_call_id``: ``chatcmpl-tool-`` and 16 random hex digits."""
    return f"chatcmpl-tool-{uuid.uuid4().hex[:16]}"


def plan_tool_call(tools: Any, tool_choice: Any) -> ToolCallPlan | None:
    """The forced call a request asks for (None: no forced call; "auto" and "none" are no forced calls). The
    request's ``tools`` and named choice were validated (a named function is one of the tools)."""
    if not isinstance(tools, list) or not tools:
        return None
    functions = {t["function"]["name"]: t["function"] for t in tools
                 if isinstance(t, dict) and isinstance(t.get("function"), dict)}
    if tool_choice == "required":
        name = next(iter(functions), None)
        if name is None:
            return None
        arguments = json.dumps(example_value(functions[name].get("parameters") or {}), ensure_ascii=False)
        head = '[{"name": ' + json.dumps(name, ensure_ascii=False) + ', "parameters": '  # as json.dumps writes it
        return ToolCallPlan(name, True, head + arguments + "}]", len(head), len(head) + len(arguments))
    if isinstance(tool_choice, dict) and isinstance(tool_choice.get("function"), dict):
        name = tool_choice["function"].get("name")
        if name not in functions:
            return None
        arguments = json.dumps(example_value(functions[name].get("parameters") or {}), ensure_ascii=False)
        return ToolCallPlan(name, False, arguments, 0, len(arguments))
    return None


__all__ = ["CHARS_PER_TOKEN", "ToolCallPlan", "example_value", "new_tool_call_id", "plan_tool_call"]
