"""Answers in JSON (``response_format`` ``json_object`` or ``json_schema``), as a vLLM's structured outputs force.

vLLM constrains the model's tokens with a grammar, so the text parses (unless ``max_tokens`` cuts it) and the
answer ends with the end-of-sequence token, whose chunk carries no text. The simulated engine writes:

* ``json_object``: ``{"text": "<filler words>"}``, one token for each of ``{"text": "`` and ``"}``, one a word,
  one for the end: an answer keeps the length the engine drew for it (its load-generator hint, ``max_tokens``,
  ``ignore_eos``), so a JSON-mode agent costs what a text one does; two tokens or fewer (at least two) are ``{}``
  and the end.
* ``json_schema``: the smallest value its schema allows (:func:`backends.sim.tool_calls.example_value`), four
  characters a token, and the end: as long as the JSON is.

A structural tag stays text.
"""

from __future__ import annotations

import json
from typing import Any

from backends.sim.tool_calls import CHARS_PER_TOKEN, example_value

_OPEN, _CLOSE = '{"text": "', '"}'


class JsonObjectText:
    """``{"text": "..."}`` around an answer's words, sized by the answer's length (one plan for all answers)."""

    fixed_tokens: int | None = None  # the engine's drawn length decides
    min_tokens = 2  # "{}" and the end-of-sequence token

    def __init__(self, filler_text) -> None:
        self._filler = filler_text

    def text(self, target: int, natural_end: bool, start: int, count: int) -> str:
        """Tokens ``start .. start+count-1`` of an answer that generates ``target`` tokens, the last its end where
        ``natural_end`` (else ``max_tokens`` cut it, and the words go on past it)."""
        if natural_end and target <= self.min_tokens:
            return "{}" if start == 0 and count > 0 else ""
        words = target - 3 if natural_end else target  # (cut: more words than tokens, never the close)
        end = start + count
        parts = []
        if start == 0 and count > 0:
            parts.append(_OPEN)
        first, last = max(start, 1), min(end, words + 1)  # word tokens are 1 .. words
        if last > first:
            parts.append(self._filler(first - 1, last - first))
        if natural_end and start <= words + 1 < end:
            parts.append(_CLOSE)  # (the end-of-sequence token after it writes nothing)
        return "".join(parts)


class JsonSchemaText:
    """The smallest value of a JSON schema, written once; every answer of the request writes the same."""

    min_tokens = 0  # (its length is fixed)

    def __init__(self, schema: Any) -> None:
        self._text = json.dumps(example_value(schema), ensure_ascii=False)
        self.fixed_tokens = -(-len(self._text) // CHARS_PER_TOKEN) + 1  # and its end-of-sequence token

    def text(self, target: int, natural_end: bool, start: int, count: int) -> str:
        return self._text[start * CHARS_PER_TOKEN:(start + count) * CHARS_PER_TOKEN]


def plan_json_text(response_format: Any, filler_text) -> JsonObjectText | JsonSchemaText | None:
    """The JSON an answer to ``response_format`` is written as (None: text). The format was validated."""
    if not isinstance(response_format, dict):
        return None
    kind = response_format.get("type")
    if kind == "json_object":
        return JsonObjectText(filler_text)
    if kind == "json_schema" and isinstance(response_format.get("json_schema"), dict):
        return JsonSchemaText(response_format["json_schema"].get("schema"))
    return None


__all__ = ["JsonObjectText", "JsonSchemaText", "plan_json_text"]
