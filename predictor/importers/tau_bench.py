"""tau-bench historical trajectories (``tau-bench-historical-trajectories``) -> trace records.

The input is one JSON list (``gpt-4o-airline.json(.gz)``: 200 trajectories, 50 tasks x 4 trials). Every
``assistant`` message of a trajectory is one GPT-4o call of the customer-service agent; its prompt is the
message prefix before it (the airline policy system prompt, the simulated customer's turns, earlier tool calls
and tool results), already in OpenAI format. The agent's tool schemas are not in the file, so the request has
no ``tools`` and the estimated prompt tokens do not count them. Role: roles.yaml (``tool_caller`` for every call:
the same agent decides between a tool call and a reply from the same prompt; ``meta.output_kind`` says which it
produced). No token counts: estimated, ``"estimated": true``. Workflow = file/task/trial, step = call index.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from predictor.importers import (MALFORMED_ROW_ERRORS, ImportStats, InputFormatError, load_json, load_role_map,
                                 make_record, resolve_input)
from predictor.tokens import REPLY_PRIMING, estimate_completion_tokens, estimate_single_message_tokens

SOURCE = "tau-bench"
FILES = ("gpt-4o-airline.json.gz", "gpt-4o-airline.json", "gpt-4o-retail.json.gz", "gpt-4o-retail.json")
_KEYS = ("role", "content", "name", "tool_calls", "tool_call_id", "function_call")
_DOMAINS = ("airline", "retail")


def _clean(message: dict[str, Any]) -> dict[str, Any]:
    return {key: message[key] for key in _KEYS if key in message and message[key] is not None
            or (key == "content" and key in message)}


def _well_formed(message: dict[str, Any]) -> bool:
    """Whether a (cleaned) message has the OpenAI shape the records and token estimates rely on: ``content`` null,
    a string or a list of parts; ``tool_calls`` a list of objects whose ``function``, where given, is an object."""
    if not (message.get("content") is None or isinstance(message["content"], (str, list))):
        return False
    calls = message.get("tool_calls")
    if calls is None:
        return True
    return isinstance(calls, list) and all(
        isinstance(call, dict) and isinstance(call.get("function", {}), dict) for call in calls)


def _model_and_domain(path: Path, default_model: str) -> tuple[str, str | None]:
    stem = path.name.split(".json", 1)[0]
    head, _, tail = stem.rpartition("-")
    if tail in _DOMAINS and head:
        return head, tail
    return default_model, None


def input_files(in_path: str | Path) -> list[Path]:
    """The one file this importer reads from ``in_path`` (``refuse_output_over_input`` keeps OUT off it)."""
    return [resolve_input(in_path, FILES)]


def iter_records(in_path: str | Path, stats: ImportStats) -> Iterator[dict[str, Any]]:
    [path] = input_files(in_path)
    role_map = load_role_map(SOURCE)
    data = load_json(path)
    if not isinstance(data, list):
        raise InputFormatError(f"{path}: expected a JSON list of trajectories")
    model, domain = _model_and_domain(path, role_map.model or "gpt-4o")
    stem = path.name.split(".json", 1)[0]
    for row_number, trajectory in enumerate(data):
        stats.read += 1
        if not isinstance(trajectory, dict) or not isinstance(trajectory.get("traj"), list):
            stats.skip("malformed_row")
            continue
        task_id, trial = trajectory.get("task_id"), trajectory.get("trial")
        run_id = f"{stem}/task-{task_id}/trial-{trial}" if task_id is not None else f"{stem}/row-{row_number}"
        prompt: list[dict[str, Any]] = []
        prompt_tokens = REPLY_PRIMING
        step = 0
        for index, message in enumerate(trajectory["traj"]):
            stats.messages += 1
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                stats.skip("malformed_message")
                continue
            message = _clean(message)
            # A malformed message is skipped, and left out of the prompts of the calls after it as well.
            if not _well_formed(message):
                stats.skip("malformed_message")
                continue
            record = None
            try:
                if message["role"] == "assistant":
                    decision = role_map.resolve("assistant", None)
                    calls = message.get("tool_calls") or []
                    has_text = bool(message.get("content"))
                    kind = ("tool_call+text" if has_text else "tool_call") if calls else "text"
                    meta: dict[str, Any] = {
                        "dataset": "tau-bench-historical-trajectories", "file": path.name, "domain": domain,
                        "task_id": task_id, "trial": trial, "reward": trajectory.get("reward"),
                        "traj_index": index, "n_traj": len(trajectory["traj"]), "output_kind": kind,
                        "tool_names": [c.get("function", {}).get("name") for c in calls],
                        "output_chars": len(message.get("content") or ""),
                        "role_rule": decision.rule,
                    }
                    record = make_record(
                        source=SOURCE, model=model, messages=list(prompt), prompt_tokens=prompt_tokens,
                        completion_tokens=estimate_completion_tokens(message), role=decision.role,
                        workflow={"id": run_id, "step": step}, estimated=True, meta=meta)
                tokens = estimate_single_message_tokens(message)
            except MALFORMED_ROW_ERRORS:
                stats.skip("malformed_message")
                continue
            if record is not None:
                yield stats.emit(record)
                step += 1
            else:
                stats.skip(f"not_a_call_{message['role']}")
            prompt.append(message)
            prompt_tokens += tokens
