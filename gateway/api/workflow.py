"""Workflow context of one request: which multi-agent workflow it belongs to, its role, step, deadline, SLO class.

Where it comes from: HTTP headers, or the same keys in the body's OpenAI ``metadata`` object.

=====================  ============================  ==========================================================
header                 ``metadata`` key              value
=====================  ============================  ==========================================================
X-Workflow-Id          workflow_id                   1-128 chars of ``A-Za-z0-9._:-``
X-Agent-Role           agent_role                    free text up to 64 chars (the predictor normalises it)
X-Workflow-Step        workflow_step                 integer >= 0
X-Workflow-Steps       workflow_steps                integer >= 1: expected steps in the whole workflow (hint)
X-Workflow-Deadline-Ms workflow_deadline_ms          absolute deadline, epoch milliseconds (number > 0)
X-SLO-Class            slo_class                     a class named under ``slo_classes`` in the config
=====================  ============================  ==========================================================

Precedence: **a header wins over ``metadata``**, key by key (a proxy or SDK wrapper in front of an agent
framework can then override what the framework wrote into the body without re-encoding it). Metadata values may
be strings (OpenAI's ``metadata`` is string-valued) or JSON numbers. A malformed value is a 400 with OpenAI's
error shape naming the header or ``metadata.<key>``; nothing is recorded for such a request.
A request with none of these is an interactive call of the default SLO class.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gateway.api.errors import bad_request
from gateway.state.base import MAX_EXACT_INTEGER

_ID_OK = re.compile(r"[A-Za-z0-9._:\-]{1,128}")

# (field, header, metadata key)
FIELDS = (
    ("workflow_id", "X-Workflow-Id", "workflow_id"),
    ("role", "X-Agent-Role", "agent_role"),
    ("step", "X-Workflow-Step", "workflow_step"),
    ("expected_steps", "X-Workflow-Steps", "workflow_steps"),
    ("deadline_ms", "X-Workflow-Deadline-Ms", "workflow_deadline_ms"),
    ("slo_class", "X-SLO-Class", "slo_class"),
)
HEADER_NAMES = tuple(header for _, header, _ in FIELDS)


@dataclass(frozen=True, slots=True)
class WorkflowContext:
    workflow_id: str | None = None
    role: str | None = None
    step: int | None = None
    expected_steps: int | None = None
    deadline: float | None = None  # absolute, epoch seconds
    slo_class: str | None = None

    @property
    def empty(self) -> bool:
        return (self.workflow_id is None and self.role is None and self.step is None and self.deadline is None
                and self.slo_class is None and self.expected_steps is None)


# The largest step or step count: the stores' (the Redis store's scripts compare steps as Lua numbers: 2**53 + 1
# read as 2**53, and a higher step as not higher), within the 64-bit integers orjson writes into a workflow's
# record (a JSON number past 2**64 is read as a float, and 1e20 is an integer float).
MAX_INTEGER = MAX_EXACT_INTEGER


def _integer(value: Any, where: str, minimum: int) -> int:
    if isinstance(value, bool):
        raise bad_request(f"'{where}' must be an integer, got a boolean.", where, "invalid_workflow_context")
    if isinstance(value, int):
        number = value
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    elif isinstance(value, str) and re.fullmatch(r"\s*[+-]?[0-9]{1,18}\s*", value):  # ASCII digits only
        number = int(value)
    else:
        raise bad_request(f"'{where}' must be an integer, got {str(value)[:40]!r}.", where,
                          "invalid_workflow_context")
    if number < minimum:
        raise bad_request(f"'{where}' must be at least {minimum}, got {number}.", where, "invalid_workflow_context")
    if number > MAX_INTEGER:
        raise bad_request(f"'{where}' must be at most {MAX_INTEGER}, got {str(number)[:40]}.", where,
                          "invalid_workflow_context")
    return number


def _deadline(value: Any, where: str) -> float:
    number: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            number = None
    if number is None or not math.isfinite(number) or number <= 0:
        raise bad_request(f"'{where}' must be a positive number of epoch milliseconds, got {str(value)[:40]!r}.",
                          where, "invalid_workflow_context")
    return number / 1000.0


def _text(value: Any, where: str, limit: int) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > limit:
        raise bad_request(f"'{where}' must be a non-empty string of at most {limit} characters.", where,
                          "invalid_workflow_context")
    return value.strip()


def parse_workflow_context(headers: Mapping[str, str], body: Mapping[str, Any],
                           slo_classes: Mapping[str, Any] | frozenset[str]) -> WorkflowContext | None:
    """The request's workflow context (None when it carries none). Raises a 400 :class:`APIError`."""
    metadata = body.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise bad_request("'metadata' must be an object.", "metadata", "invalid_workflow_context")
    values: dict[str, Any] = {}
    for name, header, key in FIELDS:
        value = headers.get(header)
        where = header
        if value is None and metadata:
            value = metadata.get(key)
            where = f"metadata.{key}"
        if value is None:
            continue
        if name == "workflow_id":
            if not isinstance(value, str) or not _ID_OK.fullmatch(value):
                raise bad_request(f"'{where}' must be 1-128 characters of letters, digits and . _ : -", where,
                                  "invalid_workflow_context")
            values[name] = value
        elif name == "role":
            values[name] = _text(value, where, 64)
        elif name == "step":
            values[name] = _integer(value, where, 0)
        elif name == "expected_steps":
            values[name] = _integer(value, where, 1)
        elif name == "deadline_ms":
            values["deadline"] = _deadline(value, where)
        else:
            slo = _text(value, where, 64)
            if slo not in slo_classes:
                raise bad_request(f"'{where}' names an unknown SLO class {slo!r}; known: "
                                  f"{', '.join(sorted(slo_classes))}.", where, "invalid_workflow_context")
            values[name] = slo
    if not values:
        return None
    return WorkflowContext(**values)
