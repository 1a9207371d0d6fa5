"""Importers (predictor/importers), the role map (predictor/roles.yaml) and the token estimator (predictor/tokens).

Tests on real traces read the third-party data in place from ``<repo>/../shared/data`` (or ``$MAESTRO_DATA_DIR``)
and skip when it is absent; nothing of that data is copied into the repository. Synthetic rows below are made up.
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import os
from collections import defaultdict
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from predictor.importers import (SOURCES, ImportStats, InputNotFoundError, RoleMap, UnknownSourceError,
                                 import_source, iter_source, load_role_map)
from predictor.importers.chatdev import map_model
from predictor.trace import ROLES, read_records, validate_record
from predictor.train import length_usable
from predictor.tokens import (IMAGE_PART_TOKENS, MESSAGE_OVERHEAD, REPLY_PRIMING, estimate_completion_tokens,
                              estimate_message_tokens, estimate_tokens)

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MAESTRO_DATA_DIR") or REPO.parent / "shared" / "data")

FOLDERS = {
    "chatdev": "chatdev-warehouse-llm-calls",
    "who-and-when": "who-and-when-mas-logs",
    "ag2": "who-and-when-mas-logs",
    "magentic-one": "who-and-when-mas-logs",
    "tau-bench": "tau-bench-historical-trajectories",
    "toolbench": "toolbench-data-example",
    "alpaca-eval": "alpaca-eval-model-outputs",
}


def data_folder(source: str) -> Path:
    folder = DATA / FOLDERS[source]
    if not folder.is_dir():
        pytest.skip(f"third-party data for {source!r} not found at {folder} (set MAESTRO_DATA_DIR to "
                    "the shared/data folder to run this test)")
    return folder


def take(source: str, limit: int | None = 50) -> tuple[list[dict], ImportStats]:
    stats = ImportStats(source)
    records = list(iter_source(source, data_folder(source), stats, limit=limit))
    for number, record in enumerate(records):
        validate_record(record, f"{source} record {number}")
    return records, stats


def assert_workflow_steps(records: list[dict], contiguous: bool = True) -> None:
    steps: dict[str, list[int]] = defaultdict(list)
    for record in records:
        steps[record["workflow"]["id"]].append(record["workflow"]["step"])
    assert steps
    for run, seq in steps.items():
        assert seq == sorted(set(seq)), f"{run}: steps not increasing: {seq}"
        if contiguous:
            assert seq == list(range(seq[0], seq[0] + len(seq))), f"{run}: steps not contiguous: {seq}"


# ------------------------------------------------------------------------------------------- token estimator

def test_estimate_tokens_basics():
    assert estimate_tokens("") == 0
    assert estimate_tokens("a") == 1
    prose = "The quick brown fox jumps over the lazy dog."
    assert 8 <= estimate_tokens(prose) <= 12
    assert estimate_tokens(" ".join([prose] * 10)) == pytest.approx(10 * estimate_tokens(prose), rel=0.05)
    # Punctuation-dense text costs more per character than prose; CJK more than either.
    code = 'if (x[i] != y[j]) { z = f(a, b); }'
    assert estimate_tokens(code) / len(code) > estimate_tokens(prose) / len(prose)
    cjk = "这是一个用于估计的中文句子"
    assert estimate_tokens(cjk) >= len(cjk) * 0.8
    # An unbroken identifier is not one token.
    assert estimate_tokens("x" * 600) >= 100


def _counts_the_plain_way(text: str) -> tuple[int, int]:
    """(ASCII punctuation, words) as the estimator's docstring defines them, computed with str methods."""
    punct = sum(1 for c in text if ord(c) < 128 and not (c.isalnum() or c == "_" or c in " \t\n\r\x0b\x0c"))
    return punct, len(text.encode("utf-8", "surrogatepass").split())


def _estimate_the_plain_way(text: str) -> int:
    from predictor.tokens import CHAR_WEIGHT, EXTRA_BYTE_WEIGHT, MIN_CHARS_PER_TOKEN, PUNCT_WEIGHT, WORD_WEIGHT

    punct, words = _counts_the_plain_way(text)
    extra = len(text.encode("utf-8", "surrogatepass")) - len(text)
    expected = max(CHAR_WEIGHT * len(text) + PUNCT_WEIGHT * punct + WORD_WEIGHT * words + EXTRA_BYTE_WEIGHT * extra,
                   len(text) / MIN_CHARS_PER_TOKEN)
    return max(1, int(expected + 0.5))


_ESTIMATOR_TEXT = st.text(alphabet=st.characters(codec="utf-8") | st.sampled_from(" \t\n\r\x0b\x0c\x1c\x85\xa0,.{}_"),
                          max_size=60)


@given(_ESTIMATOR_TEXT)
@settings(max_examples=300, deadline=None)
def test_estimate_tokens_counts_match_their_definition(text):
    if not text:
        return
    assert estimate_tokens(text) == _estimate_the_plain_way(text)


@given(st.lists(_ESTIMATOR_TEXT, min_size=1, max_size=6), st.booleans())
@settings(max_examples=100, deadline=None)
def test_estimate_tokens_counts_long_texts_the_same_way(pieces, leading_space):
    """Long texts have their words counted by numpy: the same definition above the switch-over."""
    from predictor.tokens import NUMPY_WORD_COUNT_BYTES

    piece = "".join(pieces) or "x"
    copies = NUMPY_WORD_COUNT_BYTES // len(piece.encode("utf-8", "surrogatepass")) + 1
    text = (" " if leading_space else "") + piece * copies
    assert len(text.encode("utf-8", "surrogatepass")) >= NUMPY_WORD_COUNT_BYTES
    assert estimate_tokens(text) == _estimate_the_plain_way(text)


def test_estimate_tokens_counts_a_text_exactly_at_the_switch_over():
    from predictor.tokens import NUMPY_WORD_COUNT_BYTES

    exact = "ab " * (NUMPY_WORD_COUNT_BYTES // 3) + "c" * (NUMPY_WORD_COUNT_BYTES % 3)
    assert len(exact) == NUMPY_WORD_COUNT_BYTES and estimate_tokens(exact) == _estimate_the_plain_way(exact)


def test_estimate_message_tokens_counts_parts_names_and_tool_calls():
    text = "Please summarise the attached report in three bullet points."
    one = estimate_message_tokens([{"role": "user", "content": text}])
    assert one == REPLY_PRIMING + MESSAGE_OVERHEAD + estimate_tokens(text)
    parts = estimate_message_tokens([{"role": "user", "content": [
        {"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": "data:..."}}]}])
    assert parts == one + IMAGE_PART_TOKENS
    named = estimate_message_tokens([{"role": "user", "name": "Planner", "content": text}])
    assert named > one
    call = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_user_details",
                                                       "arguments": '{"user_id": "abc_123"}'}}]}
    assert estimate_completion_tokens(call) > estimate_tokens("get_user_details")
    assert estimate_message_tokens([call]) == REPLY_PRIMING + MESSAGE_OVERHEAD + estimate_completion_tokens(call)
    legacy = {"role": "assistant", "content": None, "function_call": {"name": "Finish", "arguments": "{}"}}
    assert estimate_completion_tokens(legacy) > 0
    assert estimate_message_tokens([]) == REPLY_PRIMING


def test_estimate_tokens_matches_chatdev_completion_counts():
    """Calibration check: the estimator against the API's completion_tokens of every ChatDev call."""
    path = data_folder("chatdev") / "chatdev_llm_calls.jsonl.gz"
    errors, ratios = [], []
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            real, text = row.get("completion_tokens"), row.get("output_text")
            if real and text:
                estimate = estimate_tokens(text)
                errors.append(abs(estimate - real) / real)
                ratios.append(estimate / real)
    assert len(errors) > 900
    mape = sum(errors) / len(errors)
    ratios.sort()
    assert mape < 0.10, f"mean absolute percentage error {mape:.1%}"
    assert 0.9 < ratios[len(ratios) // 2] < 1.1


def test_estimate_message_tokens_matches_chatdev_first_turn_prompts():
    """On calls whose prompt was only system + input (most of them), the message estimate is within ~10 %."""
    path = data_folder("chatdev") / "chatdev_llm_calls.jsonl.gz"
    ratios = []
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            if row.get("prompt_tokens") and row.get("system_message") and row.get("input_message"):
                estimate = estimate_message_tokens([{"role": "system", "content": row["system_message"]},
                                                    {"role": "user", "content": row["input_message"]}])
                ratios.append(estimate / row["prompt_tokens"])
    # Later turns of a phase also carried earlier turns the log does not keep (ratio < 1), never less.
    ratios.sort()
    assert ratios[-1] < 1.25
    assert 0.9 < ratios[len(ratios) // 2] < 1.1


# ------------------------------------------------------------------------------------------------ role map

def test_roles_yaml_covers_every_source_and_is_valid():
    for source in SOURCES:
        if source == "who-and-when":
            continue
        role_map = load_role_map(source)
        for role in [*role_map.names.values(), *role_map.phases.values(), role_map.default]:
            assert role is None or role in ROLES


def test_role_map_order_phase_rules_names_default():
    role_map = RoleMap("test", {
        "phases": {"Manual": "writer"},
        "rules": [
            {"name": "Terminal", "skip": "tool_output"},
            {"glob": "orchestrator (thought)", "content": "^Next speaker", "skip": "templated"},
            {"glob": "*verif*", "role": "reviewer"},
            {"regex": r"^Py", "role": "coder"},
            {"glob": "*_expert", "role": "researcher"},
        ],
        "names": {"Programmer": "coder", "Data_Verification_Expert": "planner"},
        "default": "other",
        "tool_rendered": [{"name": "Surfer"}],
    })
    assert role_map.resolve("Programmer", phase="Manual").role == "writer"
    assert role_map.resolve("Programmer").role == "coder"
    assert role_map.resolve("Terminal").skip == "tool_output"
    assert role_map.resolve("Orchestrator (thought)", "Next speaker WebSurfer").skip == "templated"
    assert role_map.resolve("Orchestrator (thought)", "Updated Ledger: {}").role == "other"
    assert role_map.resolve("Data_Verification_Expert").role == "reviewer"  # rules before names
    assert role_map.resolve("PythonDebugging_Expert").role == "coder"
    assert role_map.resolve("CHESS_EXPERT").role == "researcher"              # globs ignore case
    assert role_map.resolve("Surfer").tool_rendered
    assert role_map.role_of("Terminal") is None
    with pytest.raises(ValueError):
        RoleMap("bad", {"names": {"x": "ceo"}})
    with pytest.raises(ValueError):
        RoleMap("bad", {"rules": [{"glob": "*", "role": "coder", "skip": "x"}]})


@pytest.mark.parametrize("spec, says", [
    ({"rules": [{"regex": "(", "role": "coder"}]}, r"sources\.bad\.rules\[0\]: invalid regex '\('"),
    ({"rules": [{"glob": "*", "content": "[a-", "role": "coder"}]}, r"sources\.bad\.rules\[0\]: invalid content"),
    ({"tool_rendered": [{"regex": "*x"}]}, r"sources\.bad\.tool_rendered\[0\]: invalid regex"),
    ({"rules": ["coder"]}, r"sources\.bad\.rules\[0\]: a rule is a mapping"),
    ({"rules": [{"name": "x", "role": "coder"}, None]}, r"sources\.bad\.rules\[1\]: a rule is a mapping"),
    ({"templated_output": ["Orchestrator"]}, r"sources\.bad\.templated_output\[0\]: a rule is a mapping"),
    ({"rules": {"name": "x", "role": "coder"}}, r"sources\.bad\.rules: expected a list"),
    ({"names": ["Programmer"]}, r"sources\.bad\.names: expected a mapping"),
    ({"phases": "Coding"}, r"sources\.bad\.phases: expected a mapping"),
    ("coder", r"sources\.bad: expected a mapping"),
])
def test_a_role_map_mistake_is_a_value_error_naming_the_entry(spec, says):
    with pytest.raises(ValueError, match=says):
        RoleMap("bad", spec)


def test_a_roles_yaml_without_the_source_is_a_value_error_naming_it(tmp_path):
    path = tmp_path / "roles.yaml"
    path.write_text("sources:\n  toolbench: {default: tool_caller}\n")
    with pytest.raises(ValueError, match=rf"{path}: no entry sources\.chatdev"):
        load_role_map("chatdev", path)


def test_import_with_a_role_map_mistake_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys):
    import predictor.importers as importers
    from predictor.cli import main as predictor_main

    roles = tmp_path / "roles.yaml"
    data = tmp_path / "chatdev_llm_calls.jsonl"
    data.write_text(json.dumps({"project": "P", "call_index": 0, "phase": "Coding", "agent_role": "Programmer",
                                "model_type": "ModelType.GPT_4", "system_message": "s", "input_message": "i",
                                "output_text": "o", "prompt_tokens": 3, "completion_tokens": 1}) + "\n")
    monkeypatch.setattr(importers, "ROLES_YAML", roles)
    for content, says in (("sources: {toolbench: {default: other}}\n", "no entry sources.chatdev"),
                          ("sources: {chatdev: {rules: [{regex: '(', role: coder}]}}\n", "invalid regex"),
                          ("sources: {chatdev: {rules: [Programmer]}}\n", "a rule is a mapping")):
        roles = roles.with_name(f"roles{len(says)}.yaml")  # (a file is read once)
        roles.write_text(content)
        monkeypatch.setattr(importers, "ROLES_YAML", roles)
        out = tmp_path / "out.jsonl"
        assert predictor_main(["import", "--source", "chatdev", "--quiet", str(data), str(out)]) == 2
        err = capsys.readouterr().err
        assert says in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()


def test_chatdev_model_mapping():
    role_map = load_role_map("chatdev")
    assert map_model("ModelType.GPT_3_5_TURBO", role_map) == "gpt-3.5-turbo"
    assert map_model("ModelType.GPT_3_5_TURBO_NEW", role_map) == "gpt-3.5-turbo-16k"
    assert map_model("ModelType.GPT_4", role_map) == "gpt-4"
    assert map_model("GPT_4", role_map) == "gpt-4"
    assert map_model(None, role_map) == "gpt-3.5-turbo"
    assert map_model("", role_map) == "gpt-3.5-turbo"


def test_chatdev_persona_mapping_is_the_issues():
    """The issue's rule for ChatDev, persona by persona: CEO, CPO, CTO, Counselor -> planner; Programmer ->
    coder; Code Reviewer -> reviewer; Software Test Engineer -> tester; any call in Manual or EnvironmentDoc ->
    writer, whoever speaks."""
    role_map = load_role_map("chatdev")
    expected = {"Chief Executive Officer": "planner", "Chief Product Officer": "planner",
                "Chief Technology Officer": "planner", "Counselor": "planner", "Programmer": "coder",
                "Code Reviewer": "reviewer", "Software Test Engineer": "tester"}
    assert {name: role_map.role_of(name, "Coding") for name in expected} == expected
    for phase in ("Manual", "EnvironmentDoc"):
        assert {role_map.role_of(name, phase) for name in expected} == {"writer"}


def test_ag2_and_magentic_one_name_mapping():
    ag2 = load_role_map("ag2")
    assert ag2.resolve("Computer_terminal", "exitcode: 0 (execution succeeded)").skip == "tool_output"
    assert ag2.resolve("Verification_Expert").role == "reviewer"
    assert ag2.resolve("DataVerification_Expert").role == "reviewer"
    assert ag2.resolve("PythonDebugging_Expert").role == "coder"
    assert ag2.resolve("UnitTesting_Expert").role == "tester"
    assert ag2.resolve("BingAPI_Expert").role == "researcher"
    assert ag2.resolve("API_Expert").role == "coder"
    assert ag2.resolve("Chess_Expert").role == "researcher"
    assert ag2.resolve("Narration_Expert").role == "writer"
    mo = load_role_map("magentic-one")
    assert mo.resolve("Orchestrator (thought)", "Updated Ledger:\n{}").role == "planner"
    assert mo.resolve("Orchestrator (thought)", "Next speaker WebSurfer").skip == "templated"
    assert mo.resolve("Orchestrator (-> WebSurfer)", "Please search").skip == "derived_from_ledger"
    assert mo.resolve("WebSurfer", "I clicked 'x'.").role == "researcher"
    assert mo.resolve("WebSurfer", "I clicked 'x'.").tool_rendered
    assert mo.resolve("Assistant", "Let's compute").role == "coder"
    assert mo.resolve("human", "a question").skip == "user_input"
    # a plan is a planner call whose logged text is a template with the task copied in: not a length to learn
    plan = mo.resolve("Orchestrator (thought)", "Initial plan:\n\nWe are working to address the following user request")
    assert plan.role == "planner" and plan.templated and not plan.tool_rendered
    assert mo.resolve("Orchestrator (thought)", "New plan:\n\nWe are working").templated
    assert not mo.resolve("Orchestrator (thought)", "Updated Ledger:\n{}").templated


# -------------------------------------------------------------------------------------- synthetic inputs

def _synthetic_chatdev(path: Path) -> None:
    rows = [
        {"project": "P1", "call_index": 0, "phase": "DemandAnalysis", "agent_role": "Chief Executive Officer",
         "model_type": "ModelType.GPT_4", "system_message": "You are the CEO.", "input_message": "Pick a form.",
         "output_text": "<INFO> Application", "prompt_tokens": 20, "completion_tokens": 4,
         "max_completion_tokens": 4000},
        "not json at all",
        {"project": "P1", "call_index": 1, "phase": "Manual", "agent_role": "Programmer", "model_type": None,
         "system_message": None, "input_message": "Write the manual.", "output_text": "# Manual\nRun main.py.",
         "prompt_tokens": None, "completion_tokens": None, "max_completion_tokens": None},
        {"project": "P1", "phase": "Coding"},                                   # no call_index / persona
        [1, 2, 3],                                                              # not an object
        {"project": "P1", "call_index": 5, "phase": "Coding", "agent_role": "Programmer", "input_message": "",
         "output_text": "x", "prompt_tokens": 3, "completion_tokens": 1},       # nothing was asked
        {"project": "P1", "call_index": 6, "phase": "Coding", "agent_role": "Programmer", "input_message": "Go.",
         "output_text": None, "prompt_tokens": 3, "completion_tokens": None},   # no length to learn from
        {"project": "P1", "call_index": 2, "phase": "Coding", "agent_role": "Programmer",
         "model_type": "ModelType.GPT_3_5_TURBO_NEW", "system_message": "You are a programmer.",
         "input_message": "Write code.", "output_text": "print('hi')", "prompt_tokens": 30,
         "completion_tokens": 5, "max_completion_tokens": 1234},
    ]
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        for row in rows:
            handle.write((row if isinstance(row, str) else json.dumps(row)) + "\n")


def test_chatdev_importer_on_synthetic_rows_skips_malformed(tmp_path):
    source = tmp_path / "calls.jsonl.gz"
    _synthetic_chatdev(source)
    out = tmp_path / "out.jsonl.gz"
    summary = import_source("chatdev", source, out)
    assert summary["read"] == 8 and summary["written"] == 3
    assert summary["skipped"] == {"malformed_json": 2, "malformed_row": 1, "no_input_message": 1,
                                  "no_usage_no_output": 1}
    records = list(read_records(out))
    ceo, manual, coder = records
    assert ceo["agent_role"] == "planner" and ceo["request"]["model"] == "gpt-4"
    assert ceo["request"]["max_tokens"] == 4000 and ceo["usage"] == {"prompt_tokens": 20, "completion_tokens": 4}
    assert "estimated" not in ceo
    assert [m["role"] for m in ceo["request"]["messages"]] == ["system", "user"]
    assert manual["agent_role"] == "writer" and manual["request"]["model"] == "gpt-3.5-turbo"
    assert manual["estimated"] is True and "max_tokens" not in manual["request"]
    assert manual["usage"]["completion_tokens"] == estimate_tokens("# Manual\nRun main.py.")
    assert [m["role"] for m in manual["request"]["messages"]] == ["user"]
    assert coder["agent_role"] == "coder" and coder["request"]["model"] == "gpt-3.5-turbo-16k"
    assert [r["workflow"] for r in records] == [{"id": "P1", "step": i} for i in range(3)]


def test_tau_bench_importer_on_synthetic_trajectories_skips_what_is_malformed(tmp_path):
    """Bad trajectories are counted and skipped; a bad message is skipped and left out of the later prompts;
    the good calls around them are imported with their prompt prefix."""
    good = {"task_id": 7, "trial": 1, "reward": 1.0, "traj": [
        {"role": "system", "content": "You are an airline agent."},
        {"role": "user", "content": "Change my flight."},
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_reservation", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "name": "get_reservation", "content": "{\"id\": 1}"},
        {"content": "a message without a role"},
        {"role": "user", "content": 42},                                       # content neither text nor parts
        {"role": "assistant", "content": "Done: your flight is changed."}]}
    data = [good, "not a trajectory", {"task_id": 8, "traj": "not a list"}]
    path = tmp_path / "gpt-4o-airline.json.gz"
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        json.dump(data, handle)
    out = tmp_path / "out.jsonl.gz"
    summary = import_source("tau-bench", tmp_path, out)
    assert summary["read"] == 3 and summary["written"] == 2
    assert summary["skipped"]["malformed_row"] == 2 and summary["skipped"]["malformed_message"] == 2
    call, reply = read_records(out)
    assert [m["role"] for m in call["request"]["messages"]] == ["system", "user"]
    assert [m["role"] for m in reply["request"]["messages"]] == ["system", "user", "assistant", "tool"]
    assert call["meta"]["output_kind"] == "tool_call" and reply["meta"]["output_kind"] == "text"
    assert [r["workflow"] for r in (call, reply)] == [{"id": "gpt-4o-airline/task-7/trial-1", "step": s}
                                                      for s in (0, 1)]
    assert call["agent_role"] == reply["agent_role"] == "tool_caller" and call["request"]["model"] == "gpt-4o"


def test_who_and_when_importer_on_synthetic_rows_skips_what_is_malformed(tmp_path):
    """An AG2 run with a message that is no object and one without a speaker: both are counted and kept out of
    the later prompts; the terminal's output is not a call but joins the history; rows that are no run skip."""
    run = {"subset": "Algorithm-Generated", "source_file": "42.json", "question_ID": "q-42", "mistake_step": "2",
           "system_prompt": {"Verification_Expert": "You check the answer."},
           "history": [
               {"name": "Python_Expert", "content": "print(6 * 7)"},
               "not a message",
               {"name": "Computer_terminal", "content": "42"},
               {"content": "nobody said this"},
               {"name": "Verification_Expert", "content": "The answer 42 is verified. TERMINATE"}]}
    rows = [run, {"subset": "Algorithm-Generated", "history": "not a list"}, {"history": [], "subset": 5}]
    path = tmp_path / "who_and_when_tasks.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows) + "not json\n")
    out = tmp_path / "out.jsonl.gz"
    summary = import_source("ag2", tmp_path, out)
    assert summary["written"] == 2
    assert summary["skipped"]["malformed_message"] == 2 and summary["skipped"]["malformed_row"] == 2
    assert summary["skipped"]["tool_output"] == 1
    first, verifier = read_records(out)
    assert first["request"]["messages"] == []  # Python_Expert has no system prompt and nothing came before
    assert verifier["agent_role"] == "reviewer"
    assert [(m["role"], m.get("name"), m["content"]) for m in verifier["request"]["messages"]] == [
        ("system", None, "You check the answer."), ("user", "Python_Expert", "print(6 * 7)"),
        ("user", "Computer_terminal", "42")]
    assert [r["workflow"] for r in (first, verifier)] == [{"id": "42", "step": 0}, {"id": "42", "step": 1}]
    assert verifier["meta"]["is_mistake_step"] is False and verifier["meta"]["history_index"] == 4


def test_alpaca_eval_importer_on_synthetic_rows_skips_what_is_malformed(tmp_path):
    (tmp_path / "instructions.jsonl").write_text(
        json.dumps({"instruction_idx": 0, "instruction": "Name a prime.", "dataset": "helpful_base"}) + "\n"
        + json.dumps({"instruction_idx": "x", "instruction": "ignored"}) + "\n")
    outputs = [{"instruction_idx": 0, "generator": "gpt-4", "output": "Seven."},
               {"instruction_idx": 0, "generator": "", "output": "no generator"},
               {"instruction_idx": 0, "generator": "gpt-4", "output": None},
               {"instruction_idx": 3, "generator": "gpt-4", "output": "an unknown instruction"},
               {"instruction_idx": 0, "generator": "claude-2", "output": "Two is the only even prime."}]
    (tmp_path / "selected_models_outputs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in outputs))
    out = tmp_path / "out.jsonl.gz"
    summary = import_source("alpaca-eval", tmp_path, out)
    assert summary["read"] == 5 and summary["written"] == 2
    assert summary["skipped"] == {"malformed_row": 2, "unknown_instruction": 1}
    records = list(read_records(out))
    assert [r["request"]["model"] for r in records] == ["gpt-4", "claude-2"]
    assert all(r["request"]["messages"] == [{"role": "user", "content": "Name a prime."}] for r in records)
    assert all(r["agent_role"] == "assistant" and r["estimated"] and r["workflow"] is None for r in records)


def test_missing_input_and_unknown_source(tmp_path):
    with pytest.raises(InputNotFoundError):
        import_source("chatdev", tmp_path / "nothing-here", tmp_path / "out.jsonl")
    assert not (tmp_path / "out.jsonl").exists()
    with pytest.raises(InputNotFoundError):
        import_source("tau-bench", tmp_path, tmp_path / "out.jsonl")        # a folder without the file
    with pytest.raises(UnknownSourceError):
        import_source("no-such-source", tmp_path, tmp_path / "out.jsonl")


# -------------------------------------------------------------------------------------------- real sources

def test_chatdev_real_records():
    records, stats = take("chatdev", limit=None)
    assert stats.written == len(records) > 1000
    by_persona = defaultdict(set)
    for record in records:
        meta = record["meta"]
        if meta["phase"] in ("Manual", "EnvironmentDoc"):
            assert record["agent_role"] == "writer"
        else:
            by_persona[meta["persona"]].add(record["agent_role"])
        assert record["request"]["messages"][-1]["role"] == "user"
    assert by_persona["Programmer"] == {"coder"}
    assert by_persona["Code Reviewer"] == {"reviewer"}
    assert by_persona["Chief Executive Officer"] == {"planner"}
    assert by_persona["Chief Product Officer"] == {"planner"}
    assert by_persona["Software Test Engineer"] == {"tester"}
    assert any(r["meta"]["phase"] == "Manual" for r in records)
    expected_model = {"ModelType.GPT_3_5_TURBO": "gpt-3.5-turbo", "ModelType.GPT_3_5_TURBO_NEW": "gpt-3.5-turbo-16k",
                      "ModelType.GPT_4": "gpt-4", None: "gpt-3.5-turbo"}
    for record in records:
        assert record["request"]["model"] == expected_model[record["meta"]["model_type"]]
    assert_workflow_steps(records, contiguous=False)  # some calls of a run are in the held-out part

    # max_tokens and usage against the raw rows (read in place).
    raw = {}
    with gzip.open(data_folder("chatdev") / "chatdev_llm_calls.jsonl.gz", "rt", encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            raw[(row["project"], row["call_index"])] = row
    for record in records:
        row = raw[(record["workflow"]["id"], record["workflow"]["step"])]
        assert record["request"].get("max_tokens") == row["max_completion_tokens"]
        if row["completion_tokens"] is None:
            assert record["estimated"] is True
        else:
            assert "estimated" not in record
            assert record["usage"] == {"prompt_tokens": row["prompt_tokens"],
                                       "completion_tokens": row["completion_tokens"]}
    assert any("max_tokens" in r["request"] for r in records)
    assert 0 < stats.estimated < 20


def test_ag2_real_records():
    records, stats = take("ag2", limit=50)
    assert len(records) == 50
    for record in records:
        meta = record["meta"]
        assert record["source"] == "ag2" and record["estimated"] is True
        assert meta["agent"] != "Computer_terminal"
        assert record["agent_role"] == load_role_map("ag2").resolve(meta["agent"]).role
        messages = record["request"]["messages"]
        if not meta.get("system_prompt_missing"):
            assert messages[0]["role"] == "system" and meta["agent"] in messages[0]["content"]
        # The task template opens every prompt as a plain user message.
        task = messages[1] if messages[0]["role"] == "system" else messages[0]
        assert task["role"] == "user" and "name" not in task
        assert task["content"].startswith("You are given: (1) a task")
        # Own earlier messages are 'assistant', the others' are 'user' with their name.
        for message in messages[1:]:
            if "name" in message:
                assert (message["role"] == "assistant") == (message["name"] == meta["agent"])
        assert record["usage"]["prompt_tokens"] >= estimate_message_tokens(messages) - 1
    assert stats.skipped["task_prompt"] >= 1 and stats.skipped["tool_output"] >= 1
    assert_workflow_steps(records)
    assert {r["agent_role"] for r in records} >= {"reviewer", "researcher"}


def test_magentic_one_real_records():
    records, stats = take("magentic-one", limit=60)
    for record in records:
        meta = record["meta"]
        assert record["source"] == "magentic-one"
        assert meta["label"] not in ("human", "ComputerTerminal", "Orchestrator (termination condition)")
        assert not meta["label"].startswith("Orchestrator (->")
        if meta["agent"] == "Orchestrator":
            assert record["agent_role"] == "planner"
            assert length_usable(record) == (meta.get("templated_output") is None)  # the plans are not
        if meta["agent"] == "WebSurfer":
            assert record["agent_role"] == "researcher" and meta["tool_rendered_output"] is True
        messages = record["request"]["messages"]
        assert messages[0] == {"role": "user", "content": messages[0]["content"]}  # the human's task
        if meta["agent"] != "Orchestrator":  # the ledger thoughts are private to the Orchestrator
            assert not any(m.get("name") == "Orchestrator" and m["content"].startswith("Updated Ledger")
                           for m in messages)
        assert record["usage"]["prompt_tokens"] == estimate_message_tokens(messages)
    assert stats.skipped["templated"] >= 1 and stats.skipped["derived_from_ledger"] >= 1
    assert stats.templated >= 1  # every run starts with an initial plan
    assert {r["agent_role"] for r in records} >= {"planner", "researcher"}
    assert_workflow_steps(records)


def test_who_and_when_combined_has_both_frameworks():
    stats = ImportStats("who-and-when")
    sources = {r["source"] for r in itertools.islice(
        iter_source("who-and-when", data_folder("who-and-when"), stats), 5000) if r["meta"]["history_index"] < 3}
    assert sources == {"ag2", "magentic-one"}


def test_tau_bench_real_records():
    records, stats = take("tau-bench", limit=50)
    assert len(records) == 50
    kinds = set()
    for record in records:
        messages = record["request"]["messages"]
        assert record["agent_role"] == "tool_caller" and record["estimated"] is True
        assert record["request"]["model"] == "gpt-4o"
        assert messages[0]["role"] == "system" and messages[-1]["role"] in ("user", "tool")
        assert record["usage"]["prompt_tokens"] == estimate_message_tokens(messages)
        kinds.add(record["meta"]["output_kind"])
    assert {"text", "tool_call"} <= kinds
    assert_workflow_steps(records)
    # Prompts grow along a trajectory.
    first_run = [r for r in records if r["workflow"]["id"] == records[0]["workflow"]["id"]]
    sizes = [r["usage"]["prompt_tokens"] for r in first_run]
    assert sizes == sorted(sizes) and len(sizes) > 1


def test_toolbench_real_records():
    records, _ = take("toolbench", limit=50)
    for record in records:
        assert record["agent_role"] == "tool_caller" and record["estimated"] is True
        assert record["request"]["model"] == "gpt-3.5-turbo"
        assert record["request"]["messages"][0]["content"].startswith("You are AutoGPT")
        assert all("valid" not in m for m in record["request"]["messages"])
        assert record["usage"]["completion_tokens"] > 0
    assert_workflow_steps(records)


def test_alpaca_eval_real_records():
    records, _ = take("alpaca-eval", limit=50)
    assert len(records) == 50
    for record in records:
        assert record["workflow"] is None and record["agent_role"] == "assistant"
        assert record["estimated"] is True
        assert record["request"]["model"] == record["meta"]["generator"]
        assert [m["role"] for m in record["request"]["messages"]] == ["user"]
        assert record["usage"]["completion_tokens"] > 0


# -------------------------------------------------------------------------------------------------- CLI

def _parser() -> argparse.ArgumentParser:
    from predictor.cli import add_predictor_commands

    parser = argparse.ArgumentParser(prog="maestro")
    add_predictor_commands(parser.add_subparsers(dest="command", required=True))
    return parser


def _run(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    return args.func(args)


def test_cli_import_synthetic(tmp_path, capsys):
    source = tmp_path / "calls.jsonl.gz"
    _synthetic_chatdev(source)
    out = tmp_path / "traces" / "chatdev.jsonl"
    assert _run(["predictor", "import", "--source", "chatdev", str(source), str(out)]) == 0
    printed = capsys.readouterr()
    assert "chatdev: 3 records" in printed.out and "malformed_json 2" in printed.out
    assert "importing chatdev" in printed.err
    assert len(list(read_records(out))) == 3
    assert _run(["predictor", "import", "--source", "chatdev", "--json", "--limit", "1", str(source),
                 str(tmp_path / "one.jsonl.gz")]) == 0
    assert json.loads(capsys.readouterr().out)["written"] == 1


def test_cli_import_errors(tmp_path, capsys):
    assert _run(["predictor", "import", "--source", "nope", str(tmp_path), str(tmp_path / "o.jsonl")]) == 2
    assert "unknown source 'nope'" in capsys.readouterr().err
    assert _run(["predictor", "import", "--source", "chatdev", str(tmp_path / "missing"),
                 str(tmp_path / "o.jsonl")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    assert _run(["predictor", "import", "--source", "chatdev", str(tmp_path), str(tmp_path / "o.csv")]) == 2
    assert not (tmp_path / "o.jsonl").exists()


def test_cli_import_real_toolbench(tmp_path, capsys):
    folder = data_folder("toolbench")
    out = tmp_path / "toolbench.jsonl.gz"
    assert _run(["predictor", "import", "--quiet", "--source", "toolbench", str(folder), str(out)]) == 0
    assert "roles:   tool_caller" in capsys.readouterr().out
    assert len(list(read_records(out))) > 40


def test_cli_has_train_and_evaluate():
    parser = _parser()
    for command in ("train", "evaluate"):
        with pytest.raises(SystemExit) as exc:
            parser.parse_args(["predictor", command, "--help"])
        assert exc.value.code == 0
