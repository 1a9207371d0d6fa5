"""AlpacaEval model outputs (``alpaca-eval-model-outputs``) -> trace records.

``selected_models_outputs.jsonl.gz`` holds 20 models' answers to the same 805 instructions; the instruction texts
are in ``instructions.jsonl.gz`` beside it (IN may be the folder or the outputs file). One record per
(instruction, model): a single-turn request (one ``user`` message, no system prompt), ``model`` = the generator's
name as AlpacaEval writes it, role from roles.yaml (``assistant``), ``workflow`` null. No token counts: estimated
from the characters, ``"estimated": true``. ``meta.instruction_idx`` allows held-out-by-instruction splits.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from predictor.importers import ImportStats, InputNotFoundError, iter_jsonl, load_role_map, make_record, \
    nonneg_int, resolve_input
from predictor.tokens import estimate_message_tokens, estimate_tokens

SOURCE = "alpaca-eval"
FILES = ("selected_models_outputs.jsonl.gz", "selected_models_outputs.jsonl")
INSTRUCTIONS = ("instructions.jsonl.gz", "instructions.jsonl")


def input_files(in_path: str | Path) -> list[Path]:
    """The two files this importer reads: the model outputs, and the instructions file beside them (the first of
    :data:`INSTRUCTIONS` there). ``refuse_output_over_input`` keeps OUT off both, and :func:`iter_records` reads
    exactly these, so the check cannot miss a file the import reads."""
    outputs = resolve_input(in_path, FILES)
    for name in INSTRUCTIONS:
        if (outputs.parent / name).is_file():
            return [outputs, outputs.parent / name]
    raise InputNotFoundError(f"{outputs.parent}: none of {', '.join(INSTRUCTIONS)} beside the model outputs")


def _instructions(path: Path) -> dict[int, dict[str, Any]]:
    scratch = ImportStats(SOURCE)
    out: dict[int, dict[str, Any]] = {}
    for row in iter_jsonl(path, scratch):
        index = nonneg_int(row.get("instruction_idx"))
        if index is not None and isinstance(row.get("instruction"), str):
            out[index] = row
    return out


def iter_records(in_path: str | Path, stats: ImportStats) -> Iterator[dict[str, Any]]:
    path, instructions_path = input_files(in_path)
    instructions = _instructions(instructions_path)
    role = load_role_map(SOURCE).resolve("assistant", None)
    prompt_cache: dict[int, tuple[list[dict[str, Any]], int]] = {}
    for row in iter_jsonl(path, stats):
        index = nonneg_int(row.get("instruction_idx"))
        generator, output = row.get("generator"), row.get("output")
        if index is None or not isinstance(generator, str) or not generator or not isinstance(output, str):
            stats.skip("malformed_row")
            continue
        instruction = instructions.get(index)
        if instruction is None:
            stats.skip("unknown_instruction")
            continue
        if index not in prompt_cache:
            messages = [{"role": "user", "content": instruction["instruction"]}]
            prompt_cache[index] = (messages, estimate_message_tokens(messages))
        messages, prompt_tokens = prompt_cache[index]
        meta = {"dataset": "alpaca-eval-model-outputs", "instruction_idx": index,
                "instruction_set": instruction.get("dataset"), "generator": generator,
                "output_chars": len(output), "role_rule": role.rule}
        yield stats.emit(make_record(
            source=SOURCE, model=generator, messages=messages, prompt_tokens=prompt_tokens,
            completion_tokens=estimate_tokens(output), role=role.role, workflow=None, estimated=True, meta=meta))
