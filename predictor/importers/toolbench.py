"""ToolBench DFS example traces (``toolbench-data-example``) -> trace records.

One input row is one logged ChatGPT call: ``prompt_messages`` (the AutoGPT-style system prompt with the tool list,
the user query, earlier function calls and results, legacy ``function_call`` / ``function`` format) and
``output_message``. Non-OpenAI keys (``valid``) are dropped; the function schemas are not in the data, so the
request has no ``functions``/``tools``. No per-call token counts (only per-episode totals, kept in ``meta``):
estimated, ``"estimated": true``. Role: roles.yaml (``tool_caller``). Workflow = source file, step = call index.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from predictor.importers import (MALFORMED_ROW_ERRORS, ImportStats, RoleMap, iter_jsonl, load_role_map, make_record,
                                 nonneg_int, resolve_input)
from predictor.tokens import estimate_completion_tokens, estimate_message_tokens

SOURCE = "toolbench"
FILES = ("toolbench_dfs_llm_calls.jsonl.gz", "toolbench_dfs_llm_calls.jsonl")
_KEYS = ("role", "content", "name", "function_call", "tool_calls", "tool_call_id")


def _clean(message: Any) -> dict[str, Any] | None:
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        return None
    return {key: message[key] for key in _KEYS if key in message}


def input_files(in_path: str | Path) -> list[Path]:
    """The one file this importer reads from ``in_path`` (``refuse_output_over_input`` keeps OUT off it)."""
    return [resolve_input(in_path, FILES)]


def iter_records(in_path: str | Path, stats: ImportStats) -> Iterator[dict[str, Any]]:
    [path] = input_files(in_path)
    role_map = load_role_map(SOURCE)
    model = role_map.model or "gpt-3.5-turbo"
    for row in iter_jsonl(path, stats):
        try:
            record = _record(row, role_map, model)
        except MALFORMED_ROW_ERRORS:
            record = None
        if record is None:
            stats.skip("malformed_row")
            continue
        yield stats.emit(record)


def _record(row: dict[str, Any], role_map: RoleMap, model: str) -> dict[str, Any] | None:
    """The record of one logged call, or None for a malformed row."""
    prompt = row.get("prompt_messages")
    output = _clean(row.get("output_message"))
    call_index = nonneg_int(row.get("call_index"))
    source_file = row.get("source_file")
    if not isinstance(prompt, list) or output is None or call_index is None or not isinstance(source_file, str):
        return None
    messages = [_clean(m) for m in prompt]
    if any(m is None for m in messages) or not messages:
        return None
    decision = role_map.resolve(output["role"], None)
    run_id = source_file[:-5] if source_file.endswith(".json") else source_file
    function_call = output.get("function_call") if isinstance(output.get("function_call"), dict) else None
    meta: dict[str, Any] = {
        "dataset": "toolbench-data-example", "source_file": source_file, "group": row.get("group"),
        "n_calls": row.get("n_calls"), "finish_type": row.get("finish_type"),
        "episode_query_count": row.get("episode_query_count"),
        "episode_total_tokens": row.get("episode_total_tokens"),
        "output_kind": "tool_call" if function_call or output.get("tool_calls") else "text",
        "tool_name": function_call.get("name") if function_call else None,
        "invalid_messages": sum(1 for m in prompt if isinstance(m, dict) and m.get("valid") is False),
        "role_rule": decision.rule,
    }
    return make_record(
        source=SOURCE, model=model, messages=messages, prompt_tokens=estimate_message_tokens(messages),
        completion_tokens=estimate_completion_tokens(output), role=decision.role,
        workflow={"id": run_id, "step": call_index}, estimated=True, meta=meta)
