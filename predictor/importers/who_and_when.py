"""Who&When failure-annotated multi-agent logs (``who-and-when-mas-logs``) -> trace records.

Two frameworks, one file (one task per line, ``subset`` says which):

- ``Algorithm-Generated`` -> source ``ag2``: AG2 CaptainAgent group chats. Each message has the speaking expert's
  ``name``; ``system_prompt`` maps each expert to its system prompt.
- ``Hand-Crafted`` -> source ``magentic-one``: Magentic-One runs; the message ``role`` field is the label
  ("WebSurfer", "Orchestrator (thought)", "Orchestrator (-> WebSurfer)", ...); the agent is the label's first word.

Each message that roles.yaml does not mark as ``skip`` (task templates, user input, terminal output, messages
derived from or templated by the Orchestrator) is one LLM call of its agent. Its prompt is that agent's system
prompt (AG2; Magentic-One's are not in the data) followed by the history before the message, seen from the
agent: its own earlier messages as ``assistant``, everyone else's as ``user`` with ``name``, the task as a plain
``user`` message; ``private`` labels (the Orchestrator's ledger thoughts) only in the same agent's prompts.
There are no token counts: prompt and completion tokens are estimated (``"estimated": true``); the logs are
GPT-4o outputs (per the paper). Messages whose text is mostly tool-rendered (browser page dumps) keep their role
and get ``meta.tool_rendered_output = true``; the Orchestrator's plans, whose logged text wraps what the model
wrote in a template with the whole task and the team description copied in, get ``meta.templated_output = true``.
Neither length is the model's output, so training and evaluation leave them out of the length figures
(:func:`predictor.train.length_usable`). Workflow = the task file, step = the call's index in the run.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from predictor.importers import ImportStats, RoleMap, iter_jsonl, load_role_map, make_record, resolve_input, \
    openai_name, text_of
from predictor.tokens import REPLY_PRIMING, estimate_single_message_tokens, estimate_tokens

FILES = ("who_and_when_tasks.jsonl.gz", "who_and_when_tasks.jsonl")
SUBSETS = {"Algorithm-Generated": "ag2", "Hand-Crafted": "magentic-one"}
_USER_SKIPS = frozenset({"task_prompt", "user_input"})  # skipped messages that enter prompts as the task


def input_files(in_path: str | Path) -> list[Path]:
    """The one file this importer reads from ``in_path`` (``refuse_output_over_input`` keeps OUT off it)."""
    return [resolve_input(in_path, FILES)]


def iter_records(in_path: str | Path, stats: ImportStats, subset: str | None = None) -> Iterator[dict[str, Any]]:
    """Records of both subsets, or only ``subset`` (``"ag2"`` / ``"magentic-one"``)."""
    if subset is not None and subset not in SUBSETS.values():
        raise ValueError(f"unknown Who&When subset {subset!r}; use one of {', '.join(SUBSETS.values())}")
    [path] = input_files(in_path)
    role_maps: dict[str, RoleMap] = {}
    for row_number, row in enumerate(iter_jsonl(path, stats)):
        history, subset_name = row.get("history"), row.get("subset")
        if not isinstance(history, list) or not (subset_name is None or isinstance(subset_name, str)):
            stats.skip("malformed_row")
            continue
        source = SUBSETS.get(subset_name) or _guess_source(history)
        if subset is not None and source != subset:
            stats.skip("other_subset")
            continue
        if source not in role_maps:
            role_maps[source] = load_role_map(source)
        yield from _task_records(row, row_number, source, role_maps[source], stats)


def _guess_source(history: list[Any]) -> str:
    return "ag2" if any(isinstance(m, dict) and "name" in m for m in history) else "magentic-one"


def _task_records(row: dict[str, Any], row_number: int, source: str, role_map: RoleMap,
                  stats: ImportStats) -> Iterator[dict[str, Any]]:
    run_id = _run_id(row, row_number)
    system_prompts = row.get("system_prompt") if isinstance(row.get("system_prompt"), dict) else {}
    model = role_map.model or "gpt-4o"
    try:
        mistake_step = int(row.get("mistake_step"))
    except (TypeError, ValueError):
        mistake_step = None

    # History as seen by the agents: (agent, private?, message as its own, message as someone else's, tokens).
    seen: list[tuple[str, bool, dict[str, Any], dict[str, Any], int]] = []
    public_tokens = 0
    private_tokens: dict[str, int] = defaultdict(int)
    system_cache: dict[str, tuple[dict[str, Any] | None, int]] = {}
    step = 0
    for index, message in enumerate(row["history"]):
        stats.messages += 1
        if not isinstance(message, dict):
            stats.skip("malformed_message")
            continue
        content = text_of(message.get("content"))
        label = message.get("name") if source == "ag2" else message.get("role")
        if not isinstance(label, str) or not label or content is None:
            stats.skip("malformed_message")
            continue
        agent = label if source == "ag2" else label.split(" (", 1)[0]
        decision = role_map.resolve(label, content)

        if decision.skip is None:
            if agent not in system_cache:
                system_cache[agent] = _system_message(system_prompts.get(agent))
            system_message, system_tokens = system_cache[agent]
            messages: list[dict[str, Any]] = [system_message] if system_message else []
            for other, private, as_own, as_other, _ in seen:
                if private and other != agent:
                    continue
                messages.append(as_own if other == agent else as_other)
            prompt_tokens = REPLY_PRIMING + system_tokens + public_tokens + private_tokens[agent]
            meta: dict[str, Any] = {
                "dataset": "who-and-when-mas-logs",
                "subset": row.get("subset"),
                "source_file": row.get("source_file"),
                "question_id": row.get("question_ID"),
                "agent": agent,
                "label": label,
                "history_index": index,
                "n_history": len(row["history"]),
                "output_chars": len(content),
                "is_mistake_step": mistake_step == index,
                "role_rule": decision.rule,
            }
            if source == "ag2" and system_message is None:
                meta["system_prompt_missing"] = True
            if decision.tool_rendered:
                meta["tool_rendered_output"] = True
            if decision.templated:
                meta["templated_output"] = True
            yield stats.emit(make_record(
                source=source, model=model, messages=messages, prompt_tokens=prompt_tokens,
                completion_tokens=estimate_tokens(content), role=decision.role,
                workflow={"id": run_id, "step": step}, estimated=True, meta=meta))
            step += 1
        else:
            stats.skip(decision.skip)

        # The message joins the history every later call sees.
        if decision.skip in _USER_SKIPS:
            as_own = as_other = {"role": "user", "content": content}
        else:
            name = openai_name(agent)
            as_own = {"role": "assistant", "name": name, "content": content}
            as_other = {"role": "user", "name": name, "content": content}
        tokens = estimate_single_message_tokens(as_other)
        private = label in role_map.private
        seen.append((agent, private, as_own, as_other, tokens))
        if private:
            private_tokens[agent] += tokens
        else:
            public_tokens += tokens


def _system_message(prompt: Any) -> tuple[dict[str, Any] | None, int]:
    text = text_of(prompt)
    if not text:
        return None, 0
    message = {"role": "system", "content": text}
    return message, estimate_single_message_tokens(message)


def _run_id(row: dict[str, Any], row_number: int) -> str:
    source_file = row.get("source_file")
    if isinstance(source_file, str) and source_file:
        return source_file[:-5] if source_file.endswith(".json") else source_file
    question = row.get("question_ID")
    return f"{row.get('subset') or 'who-and-when'}/{question or 'row'}#{row_number}"
