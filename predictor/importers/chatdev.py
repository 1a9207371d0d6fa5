"""ChatDev 1.0 WareHouse calls (``chatdev-warehouse-llm-calls``) -> trace records.

One input row is one logged chat-completion call. The record's prompt is the speaking agent's system message plus
the message it replied to (the API prompt also held the earlier turns of the same phase, which the log does not
keep: ``usage.prompt_tokens`` is the real count and covers them). Model from ``model_type``
(GPT_3_5_TURBO -> gpt-3.5-turbo, GPT_3_5_TURBO_NEW -> gpt-3.5-turbo-16k, GPT_4 -> gpt-4, missing ->
gpt-3.5-turbo: mapping in roles.yaml), ``max_tokens`` from ``max_completion_tokens`` where logged, workflow =
project + call index, role = persona, or ``writer`` in the Manual / EnvironmentDoc phases. Rows without usage
(8 of 1,033) get estimated counts and ``"estimated": true``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from predictor.importers import (MALFORMED_ROW_ERRORS, ImportStats, RoleMap, load_role_map, make_record, nonneg_int,
                                 iter_jsonl, resolve_input, text_of)
from predictor.tokens import estimate_message_tokens, estimate_tokens

SOURCE = "chatdev"
FILES = ("chatdev_llm_calls.jsonl.gz", "chatdev_llm_calls.jsonl")


def map_model(model_type: Any, role_map: RoleMap) -> str:
    """``ModelType.GPT_4`` / ``GPT_4`` -> ``gpt-4`` (roles.yaml ``models``); None -> the default model."""
    default = role_map.spec.get("default_model", "gpt-3.5-turbo")
    if not isinstance(model_type, str) or not model_type.strip():
        return default
    key = model_type.strip().rsplit(".", 1)[-1]
    models = role_map.spec.get("models") or {}
    if key in models:
        return models[key]
    return key.lower().replace("_", "-")  # an unknown enum name, kept recognisable


def input_files(in_path: str | Path) -> list[Path]:
    """The one file this importer reads from ``in_path`` (``refuse_output_over_input`` keeps OUT off it)."""
    return [resolve_input(in_path, FILES)]


def iter_records(in_path: str | Path, stats: ImportStats) -> Iterator[dict[str, Any]]:
    [path] = input_files(in_path)
    role_map = load_role_map(SOURCE)
    for row in iter_jsonl(path, stats):
        try:
            record = _record(row, role_map, stats)
        except MALFORMED_ROW_ERRORS:
            stats.skip("malformed_row")
            continue
        if record is not None:
            yield stats.emit(record)


_COUNTS = ("prompt_tokens", "completion_tokens", "max_completion_tokens")


def _record(row: dict[str, Any], role_map: RoleMap, stats: ImportStats) -> dict[str, Any] | None:
    project = row.get("project")
    call_index = nonneg_int(row.get("call_index"))
    persona = row.get("agent_role")
    if not isinstance(project, str) or not project or call_index is None or not isinstance(persona, str):
        stats.skip("malformed_row")
        return None
    # A missing (null) count is estimated below; one that is there but no count (-3, 2.5, 1e300, "12") means the
    # row is not what the log writes, and estimating would hide that.
    if any(row.get(key) is not None and nonneg_int(row.get(key)) is None for key in _COUNTS):
        stats.skip("malformed_row")
        return None
    system_message = text_of(row.get("system_message"))
    input_message = text_of(row.get("input_message"))
    output_text = text_of(row.get("output_text"))
    if not input_message:
        stats.skip("no_input_message")
        return None
    phase = row.get("phase") if isinstance(row.get("phase"), str) else None
    decision = role_map.resolve(persona, output_text, phase)
    if decision.skip:
        stats.skip(decision.skip)
        return None

    messages: list[dict[str, Any]] = []
    if system_message:
        messages.append({"role": "system", "content": system_message})
    messages.append({"role": "user", "content": input_message})

    prompt_tokens = nonneg_int(row.get("prompt_tokens"))
    completion_tokens = nonneg_int(row.get("completion_tokens"))
    estimated = False
    if completion_tokens is None:
        if output_text is None:
            stats.skip("no_usage_no_output")
            return None
        completion_tokens = estimate_tokens(output_text)
        estimated = True
    if prompt_tokens is None:
        prompt_tokens = estimate_message_tokens(messages)
        estimated = True

    max_tokens = nonneg_int(row.get("max_completion_tokens"))
    meta: dict[str, Any] = {
        "dataset": "chatdev-warehouse-llm-calls",
        "project": project,
        "persona": persona,
        "counterpart": row.get("counterpart_role"),
        "phase": phase,
        "turn": row.get("turn"),
        "is_phase_assistant": row.get("is_phase_assistant"),
        "model_type": row.get("model_type"),
        "n_calls_in_project": row.get("n_calls_in_project"),
        "output_chars": len(output_text) if output_text is not None else row.get("output_chars"),
        "send_time": row.get("send_time"),
        "recv_time": row.get("recv_time"),
        "seconds_since_start": row.get("seconds_since_start"),
        "role_rule": decision.rule,
    }
    if system_message is None:
        meta["system_message_missing"] = True
    return make_record(source=SOURCE, model=map_model(row.get("model_type"), role_map), messages=messages,
                       prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, role=decision.role,
                       workflow={"id": project, "step": call_index}, estimated=estimated, meta=meta,
                       max_tokens=max_tokens)
