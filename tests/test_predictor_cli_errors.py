"""The predictor commands on bad input: out-of-range options, corrupt files, malformed rows, model files that
cannot be used for what is asked. Each case gets one clear line (exit 2 for a usage error) and no traceback,
and leaves no half-written output behind.

All inputs are small hand-written fixtures made in ``tmp_path``; no third-party data.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from predictor import Predictor
from predictor.cli import main as predictor_main
from predictor.train import split_records
from predictor.trace import read_records, write_records
from tests.test_predictor import chat, synthetic_records


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """``maestro predictor ARGV``: (exit code, stdout, stderr), whether argparse or the command exits."""
    try:
        code = predictor_main(argv)
    except SystemExit as exit_info:
        code = exit_info.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def traces(tmp_path_factory) -> Path:
    """A small synthetic trace file (twelve workflows of six calls)."""
    path = tmp_path_factory.mktemp("traces") / "synthetic.jsonl"
    write_records(path, synthetic_records(n_workflows=12, seed=5))
    return path


@pytest.fixture(scope="module")
def model_all(traces, tmp_path_factory) -> Path:
    """A model trained with ``train --split all`` on :func:`traces` (a model to deploy: it saw every record)."""
    path = tmp_path_factory.mktemp("models") / "all.skops"
    assert predictor_main(["train", "--data", str(traces), "--out", str(path), "--split", "all",
                           "--max-iter", "10", "--quiet"]) == 0
    return path


def assert_usage_error(argv: list[str], capsys, says: str) -> str:
    code, _, err = run_cli(argv, capsys)
    assert code == 2, (argv, err)
    assert says in err and "Traceback" not in err, (argv, err)
    return err


# ------------------------------------------------------------------------------------- numeric option ranges
@pytest.mark.parametrize("option, value", [
    ("--test-size", "0"), ("--test-size", "1"), ("--test-size", "1.5"), ("--test-size", "-0.2"),
    ("--test-size", "nan"), ("--max-iter", "0"), ("--max-iter", "-3"), ("--max-depth", "0"), ("--seed", "-1"),
    ("--source-balance", "inf"), ("--source-balance", "nan"), ("--source-balance", "-0.1"),
    ("--source-balance", "1.5"), ("--threshold", "nan"), ("--threshold", "2"), ("--threshold", "-1"),
])
def test_train_refuses_out_of_range_options_before_reading_data(tmp_path, capsys, option, value):
    missing = tmp_path / "missing.jsonl"  # never opened: the option is refused first
    err = assert_usage_error(["train", "--data", str(missing), "--out", str(tmp_path / "m.skops"), option, value],
                             capsys, f"argument {option}")
    assert "No such file" not in err
    assert not (tmp_path / "m.skops").exists()


@pytest.mark.parametrize("option, value", [("--test-size", "0"), ("--test-size", "2"), ("--seed", "-5")])
def test_evaluate_refuses_out_of_range_options_before_reading_data(tmp_path, capsys, option, value):
    missing = tmp_path / "missing.jsonl"
    err = assert_usage_error(["evaluate", "--model", str(tmp_path / "m.skops"), "--data", str(missing),
                              option, value], capsys, f"argument {option}")
    assert "No such file" not in err


def test_in_range_options_still_parse():
    import argparse

    from predictor import evaluate, train

    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    args = parser.parse_args(["--data", "x", "--out", "y", "--test-size", "0.3", "--max-iter", "1",
                              "--max-depth", "1", "--seed", "0"])
    assert (args.test_size, args.max_iter, args.max_depth, args.seed) == (0.3, 1, 1, 0)
    parser = argparse.ArgumentParser()
    evaluate.add_arguments(parser)
    args = parser.parse_args(["--data", "x", "--model", "m"])
    assert args.test_size is None and args.seed is None  # still "the model's own"


@pytest.mark.parametrize("option, value", [("--requests", "0"), ("--requests", "-4"), ("--warmup", "-1")])
def test_bench_predictor_refuses_no_requests(tmp_path, capsys, option, value):
    from gateway.cli import main as maestro_main

    with pytest.raises(SystemExit) as exit_info:
        maestro_main(["bench", "predictor", "--model", str(tmp_path / "m.skops"), "--data",
                      str(tmp_path / "missing.jsonl"), option, value])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"argument {option}" in err and "Traceback" not in err, err


def test_bench_run_refuses_no_requests_before_loading(tmp_path):
    from predictor.bench import run

    with pytest.raises(ValueError, match="requests >= 1"):
        run(str(tmp_path / "never-read.skops"), [str(tmp_path / "never-read.jsonl")], requests=0)


# ------------------------------------------------------------------------------------------ default max_tokens
@pytest.mark.parametrize("value", ["0", "-5", "many"])
def test_evaluate_refuses_a_default_max_tokens_below_one(tmp_path, capsys, value):
    assert_usage_error(["evaluate", "--model", str(tmp_path / "m.skops"), "--data", str(tmp_path / "x.jsonl"),
                        "--default-max-tokens", value], capsys, "argument --default-max-tokens")


@pytest.mark.parametrize("value", [0, -5, True, 2.5, "4096"])
def test_predictor_refuses_a_default_max_tokens_below_one(model_all, value):
    with pytest.raises(ValueError, match="default_max_tokens"):
        Predictor.from_priors(default_max_tokens=value)
    with pytest.raises(ValueError, match="default_max_tokens"):
        Predictor(default_max_tokens=value)
    with pytest.raises(ValueError, match="default_max_tokens"):
        Predictor.load(model_all, default_max_tokens=value)
    with pytest.raises(ValueError, match="default_max_tokens"):
        Predictor.from_priors().with_kv(Predictor.from_priors().kv, default_max_tokens=value)


@pytest.mark.parametrize("value", [0, -1, True, 1.5, "10"])
def test_a_bad_default_max_tokens_is_blamed_on_the_argument_not_the_model_file(model_all, value):
    from predictor.model_file import ModelFileError

    with pytest.raises(ValueError) as raised:
        Predictor.load(model_all, default_max_tokens=value)
    assert not isinstance(raised.value, ModelFileError)
    assert "default_max_tokens" in str(raised.value) and "retrain" not in str(raised.value)
    assert str(model_all) not in str(raised.value)


def test_a_valid_default_max_tokens_caps_predictions(model_all):
    import numpy as np

    predictor = Predictor.load(model_all, default_max_tokens=np.int64(3))
    assert predictor.default_max_tokens == 3
    p = predictor.predict(chat("You are a careful software engineer.", "Implement a todo app."))
    assert 1 <= p.p50 <= p.p90 <= 3
    assert Predictor.from_priors(default_max_tokens=None).default_max_tokens is None


# ------------------------------------------------------------------------------------------------ model files
@pytest.mark.parametrize("schema, says", [
    ([1, 2], "JSON list, not an object"), ("x", "JSON string, not an object"), (7, "JSON number, not an object"),
    (None, "JSON null, not an object"),
    ({"protocol": 2, "__loader__": "DictNode", "__class__": "dict", "key_types": {"content": []}, "content": [1]},
     "malformed node"),
])
def test_a_schema_that_is_not_skops_shaped_is_a_model_file_error(traces, tmp_path, capsys, schema, says):
    import json
    import zipfile

    from predictor.model_file import ModelFileError

    path = tmp_path / "odd.skops"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("schema.json", json.dumps(schema))
    with pytest.raises(ModelFileError, match=says):
        Predictor.load(path)
    err = assert_usage_error(["evaluate", "--model", str(path), "--data", str(traces)], capsys,
                             "not a skops model file")
    assert len(err.strip().splitlines()) == 1, err


def test_a_schema_nested_past_the_recursion_limit_is_a_model_file_error(traces, tmp_path, capsys):
    import zipfile

    path = tmp_path / "deep.skops"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("schema.json", "[" * 100_000 + "]" * 100_000)
    err = assert_usage_error(["evaluate", "--model", str(path), "--data", str(traces)], capsys,
                             "not a skops model file")
    assert len(err.strip().splitlines()) == 1, err


def test_a_model_file_that_unpacks_past_any_model_is_refused_before_it_is_read(tmp_path, monkeypatch):
    """A small file whose members unpack to far more than any model (a zip bomb) is refused from the sizes its
    entries declare (zipfile reads no member past its declared size), before a byte of it is unpacked."""
    import zipfile

    from predictor import model_file
    from predictor.model_file import ModelFileError

    path = tmp_path / "bomb.skops"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("schema.json", '{"protocol": 2}')
        archive.writestr("a.npy", b"\0" * 3_000_000)
    assert path.stat().st_size < 10_000
    monkeypatch.setattr(model_file, "MAX_UNPACKED_BYTES", 2_000_000)
    with pytest.raises(ModelFileError, match="unpack to more than any model's 2,000,000 bytes"):
        Predictor.load(path)


def test_a_member_named_again_and_again_counts_each_time_it_is_read(tmp_path, monkeypatch):
    """A schema naming one small-on-disk member many times unpacked it once per node (a 4.5 KB file grew the
    process by 401 MB): every read counts against the bound."""
    import io
    import json
    import zipfile

    import numpy as np

    from predictor import model_file
    from predictor.model_file import ModelFileError

    array = io.BytesIO()
    np.save(array, np.zeros(100_000))  # 800 kB of zeros: a few kB compressed
    node = {"__loader__": "NdArrayNode", "type": "numpy", "file": "a.npy"}
    schema = {"protocol": 2, "__loader__": "ListNode", "__class__": "list", "content": [node] * 10}
    path = tmp_path / "reread.skops"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("schema.json", json.dumps(schema))
        archive.writestr("a.npy", array.getvalue())
    monkeypatch.setattr(model_file, "MAX_UNPACKED_BYTES", 5_000_000)  # the member once is well inside it
    with pytest.raises(ModelFileError, match="unpack to more than any model's 5,000,000 bytes"):
        Predictor.load(path)


@pytest.mark.parametrize("damage", ["deflate", "method"])
def test_a_damaged_archive_member_is_a_model_file_error(traces, tmp_path, capsys, damage):
    """A damaged compressed member (zlib's error) or a compression method zipfile does not know: one line."""
    import zipfile

    path = tmp_path / "damaged.skops"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("schema.json", '{"protocol": 2, "content": "' + "x" * 4000 + '"}')
    data = bytearray(path.read_bytes())
    info = zipfile.ZipFile(path).getinfo("schema.json")
    start = info.header_offset + 30 + len(info.filename.encode())  # the member's data (no extra field written)
    if damage == "deflate":
        data[start:start + 8] = b"\xff" * 8  # an invalid deflate block type
    else:
        data[info.header_offset + 8] = 99  # the local header's compression method
        central = data.rindex(b"PK\x01\x02")
        data[central + 10] = 99  # and the central directory's
    path.write_bytes(bytes(data))
    err = assert_usage_error(["evaluate", "--model", str(path), "--data", str(traces)], capsys,
                             "not a skops model file")
    assert len(err.strip().splitlines()) == 1, err


def test_a_held_out_share_that_would_take_every_run_of_a_source_keeps_one(tmp_path, capsys):
    two_runs = tmp_path / "two.jsonl"  # 0.6 of 2 runs rounds up to both: scikit-learn refuses an empty train part
    write_records(two_runs, synthetic_records(n_workflows=2, seed=1, source="small"))
    train, test = split_records(list(read_records(two_runs)), 0.6, 0)
    assert len({r["workflow"]["id"] for r in train}) == 1 and len({r["workflow"]["id"] for r in test}) == 1
    code, _, err = run_cli(["evaluate", "--priors", "--data", str(two_runs), "--test-size", "0.6"], capsys)
    assert code == 0, err


def test_evaluate_cv_refuses_the_options_of_a_held_out_split(tmp_path, capsys):
    for option, value in (("--split", "test"), ("--test-size", "0.3"), ("--seed", "4")):
        assert_usage_error(["evaluate", "--cv", "3", "--data", str(tmp_path / "x.jsonl"), option, value], capsys,
                           "--cv scores every run once")


# ------------------------------------------------------------------------------------------ import: bad input
def chatdev_row(index: int, **fields) -> dict:
    """One ChatDev call row as the chatdev importer reads it (made up)."""
    row = {"project": f"P{index // 10}", "call_index": index % 10, "phase": "Coding", "agent_role": "Programmer",
           "model_type": "ModelType.GPT_4", "system_message": "You are a programmer.",
           "input_message": f"Write function number {index} of the module.",
           "output_text": f"def f{index}(x):\n    return x + {index}\n", "prompt_tokens": 30 + index,
           "completion_tokens": 12, "max_completion_tokens": None}
    row.update(fields)
    return row


def write_jsonl(path: Path, rows: list) -> Path:
    import gzip
    import json

    text = "".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows)
    path.write_bytes(gzip.compress(text.encode()) if path.suffix == ".gz" else text.encode())
    return path


@pytest.mark.parametrize("out_name", ["out.jsonl", "out.jsonl.gz"])
def test_import_of_a_truncated_gz_says_so_and_writes_nothing(tmp_path, capsys, out_name):
    whole = write_jsonl(tmp_path / "whole.jsonl.gz", [chatdev_row(i) for i in range(300)])
    cut = tmp_path / "in" / "chatdev_llm_calls.jsonl.gz"
    cut.parent.mkdir()
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size * 3 // 4])  # the first rows still decode
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    err = assert_usage_error(["import", "--source", "chatdev", str(cut), str(out_dir / out_name)], capsys,
                             "chatdev_llm_calls.jsonl.gz: not a readable gzip file")
    assert err.count("maestro predictor:") == 1
    assert list(out_dir.iterdir()) == []  # neither a partial output nor a temporary file


def test_import_of_a_file_that_is_not_gzip_says_so(tmp_path, capsys):
    bad = tmp_path / "chatdev_llm_calls.jsonl.gz"
    bad.write_text("hello\n")
    assert_usage_error(["import", "--source", "chatdev", str(bad), str(tmp_path / "o.jsonl")], capsys,
                       "not a readable gzip file")
    assert not (tmp_path / "o.jsonl").exists()


def test_import_of_a_tau_bench_file_that_is_not_json_says_so(tmp_path, capsys):
    bad = tmp_path / "gpt-4o-airline.json"
    bad.write_text('[{"task_id": 1, "traj": [')
    assert_usage_error(["import", "--source", "tau-bench", str(bad), str(tmp_path / "o.jsonl")], capsys,
                       "gpt-4o-airline.json: not valid JSON")
    bad.write_text('{"task_id": 1}')
    assert_usage_error(["import", "--source", "tau-bench", str(bad), str(tmp_path / "o.jsonl")], capsys,
                       "expected a JSON list of trajectories")
    assert not (tmp_path / "o.jsonl").exists()


def test_a_failed_import_leaves_an_existing_output_as_it_was(tmp_path, capsys):
    out = tmp_path / "chatdev.jsonl"
    out.write_text("the previous import\n")
    whole = write_jsonl(tmp_path / "whole.jsonl.gz", [chatdev_row(i) for i in range(300)])
    cut = tmp_path / "chatdev_llm_calls.jsonl.gz"
    cut.write_bytes(whole.read_bytes()[:-40])
    assert_usage_error(["import", "--source", "chatdev", str(cut), str(out)], capsys, "not a readable gzip file")
    assert out.read_text() == "the previous import\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chatdev.jsonl", "chatdev_llm_calls.jsonl.gz",
                                                           "whole.jsonl.gz"]


def _out_naming(target: Path, given: str, tmp_path: Path) -> Path:
    """The OUT a test gives for ``target``: the path itself, or (``given`` "link") a symlink to it."""
    if given != "link":
        return target
    link = tmp_path / "link.jsonl"
    link.symlink_to(target)
    return link


@pytest.mark.parametrize("given", ["file", "folder", "link"])
def test_import_refuses_to_write_over_the_file_it_reads(tmp_path, capsys, given):
    source = write_jsonl(tmp_path / "chatdev_llm_calls.jsonl", [chatdev_row(i) for i in range(3)])
    before = source.read_bytes()
    out = _out_naming(source, given, tmp_path)
    in_path = tmp_path if given == "folder" else source
    assert_usage_error(["import", "--source", "chatdev", str(in_path), str(out)], capsys, "is the input file")
    assert source.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({source.name, out.name})  # no temporary file
    other = tmp_path / "chatdev.jsonl"  # another name in the same folder is fine
    assert run_cli(["import", "--source", "chatdev", str(in_path), str(other)], capsys)[0] == 0


@pytest.mark.parametrize("given", ["file", "folder", "link"])
def test_import_refuses_to_write_over_any_file_it_reads(tmp_path, capsys, given):
    """AlpacaEval reads two files (the model outputs and the instructions beside them); OUT may be neither."""
    instructions = write_jsonl(tmp_path / "instructions.jsonl",
                               [{"instruction_idx": 0, "instruction": "Name a prime.", "dataset": "x"}])
    outputs = write_jsonl(tmp_path / "selected_models_outputs.jsonl",
                          [{"instruction_idx": 0, "generator": "gpt-4", "output": "Seven."}])
    before = instructions.read_bytes()
    out = _out_naming(instructions, given, tmp_path)
    in_path = tmp_path if given == "folder" else outputs
    err = assert_usage_error(["import", "--source", "alpaca-eval", str(in_path), str(out)], capsys,
                             "is the input file")
    assert str(instructions) in err.strip().splitlines()[-1]
    assert instructions.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({instructions.name, outputs.name, out.name})
    assert run_cli(["import", "--source", "alpaca-eval", str(in_path), str(tmp_path / "alpaca.jsonl")],
                   capsys)[0] == 0


def test_every_importer_declares_the_files_it_reads(tmp_path):
    """What refuse_output_over_input checks OUT against: every source's module says which files it reads."""
    from predictor.importers import SOURCES, input_files

    (tmp_path / "instructions.jsonl").write_text("")
    for name in ("chatdev_llm_calls.jsonl", "who_and_when_tasks.jsonl", "gpt-4o-airline.json",
                 "toolbench_dfs_llm_calls.jsonl", "selected_models_outputs.jsonl"):
        (tmp_path / name).write_text("")
    read = {source: sorted(path.name for path in input_files(source, tmp_path)) for source in SOURCES}
    assert read["alpaca-eval"] == ["instructions.jsonl", "selected_models_outputs.jsonl"]
    assert read["chatdev"] == ["chatdev_llm_calls.jsonl"] and read["tau-bench"] == ["gpt-4o-airline.json"]
    assert all(len(files) >= 1 for files in read.values())


@pytest.mark.parametrize("source, rows", [
    ("toolbench", [chatdev_row(i) for i in range(4)]),  # a ChatDev file imported as ToolBench
    ("chatdev", ["not json", "{}"]),
])
def test_import_that_finds_no_record_of_its_source_says_so_and_writes_nothing(tmp_path, capsys, source, rows):
    path = write_jsonl(tmp_path / "calls.jsonl", rows)
    out = tmp_path / "out.jsonl"
    out.write_text("the previous import\n")
    err = assert_usage_error(["import", "--source", source, str(path), str(out)], capsys, f"no {source} records")
    assert f"{len(rows)} rows read" in err and "malformed_row" in err and f"Is it a {source} trace?" in err
    assert out.read_text() == "the previous import\n"


def test_train_refuses_to_write_the_model_over_a_data_file(traces, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_bytes(traces.read_bytes())
    assert_usage_error(["train", "--data", str(data), "--out", str(data)], capsys, "is one of the --data files")
    assert data.read_bytes() == traces.read_bytes()


@pytest.mark.parametrize("value", ["0", "-3"])
def test_train_refuses_threads_below_one(tmp_path, capsys, value):
    assert_usage_error(["train", "--data", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "m.skops"),
                        "--threads", value], capsys, "argument --threads")


def test_evaluate_refuses_files_with_no_records(model_all, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    for source in (["--model", str(model_all), "--split", "all"], ["--priors"], ["--cv", "2"]):
        assert_usage_error(["evaluate", *source, "--data", str(empty)], capsys, "no trace records in")


def test_evaluate_of_a_folder_as_model_says_so(traces, tmp_path, capsys):
    assert_usage_error(["evaluate", "--model", str(tmp_path), "--data", str(traces)], capsys,
                       "is a folder, not a model file")


@pytest.mark.parametrize("name", ["records.jsonl", "records.jsonl.gz"])
def test_write_records_is_all_or_nothing(tmp_path, name):
    from predictor.trace import PLAIN_FILE_MODE, TraceFormatError, read_records

    good = synthetic_records(n_workflows=1)
    path = tmp_path / name

    def stream_that_fails():
        yield from good
        raise OSError("the input went away")

    with pytest.raises(OSError, match="went away"):
        write_records(path, stream_that_fails())
    with pytest.raises(TraceFormatError):
        write_records(path, [*good, {"request": {}}])
    assert list(tmp_path.iterdir()) == []
    assert write_records(path, good) == len(good)
    assert list(read_records(path)) == good
    assert path.stat().st_mode & 0o777 == PLAIN_FILE_MODE  # as open() makes a file, not mkstemp's 0600
    assert [p.name for p in tmp_path.iterdir()] == [name]


@pytest.mark.parametrize("case", ["parent is a file", "out is a folder", "folder not writable"])
def test_import_to_an_out_that_cannot_be_written_names_out(tmp_path, capsys, monkeypatch, case):
    """Not the temporary file the write goes through (nor a folder): OUT, as the user typed it."""
    import tempfile

    data = write_jsonl(tmp_path / "chatdev_llm_calls.jsonl", [chatdev_row(i) for i in range(3)])
    out = tmp_path / "out" / "chatdev.jsonl"
    if case == "parent is a file":
        out.parent.write_text("a file, not a folder")
        says = f"{out.parent} is not a folder"
    elif case == "out is a folder":
        out.mkdir(parents=True)
        says = "it is a folder"
    else:  # as root, a read-only folder can still be written: the failure is simulated where it happens
        def refused(prefix: str = "", suffix: str = "", dir: str | None = None):
            raise PermissionError(13, "Permission denied", f"{dir}/{prefix}k2j3h4{suffix}")

        monkeypatch.setattr(tempfile, "mkstemp", refused)
        says = "Permission denied"
    err = assert_usage_error(["import", "--source", "chatdev", "--quiet", str(data), str(out)], capsys,
                             f"cannot write {out}: {says}")
    assert ".tmp" not in err and len(err.strip().splitlines()) == 1


def test_train_to_a_new_folder_makes_it_only_when_it_writes_the_model(traces, tmp_path, capsys):
    out = tmp_path / "new" / "deeper" / "m.skops"
    assert_usage_error(["train", "--data", str(tmp_path / "missing.jsonl"), "--out", str(out)], capsys,
                       "missing.jsonl")
    assert not (tmp_path / "new").exists()
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    assert_usage_error(["train", "--data", str(traces), "--out", str(blocker / "m.skops")], capsys,
                       f"{blocker} is not a folder")
    assert predictor_main(["train", "--data", str(traces), "--out", str(out), "--max-iter", "5", "--quiet"]) == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.skops"]


# ------------------------------------------------------------------------------------- import: malformed rows
def import_rows(source: str, path: Path, tmp_path: Path) -> tuple[dict, list[dict]]:
    """(summary, records) of importing ``path`` as ``source``."""
    from predictor.importers import import_source
    from predictor.trace import read_records

    out = tmp_path / f"{source}-out.jsonl"
    summary = import_source(source, path, out)
    return summary, list(read_records(out))


def tau_trajectory(assistant: dict, task_id: int = 1) -> dict:
    return {"task_id": task_id, "trial": 0, "reward": 1,
            "traj": [{"role": "system", "content": "You are an airline agent."},
                     {"role": "user", "content": "Change my flight."}, assistant,
                     {"role": "user", "content": "Thanks."},
                     {"role": "assistant", "content": "You're welcome."}]}


@pytest.mark.parametrize("bad", [
    {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "function": None}]},
    {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "function": "get_reservation"}]},
    {"role": "assistant", "content": None, "tool_calls": "get_reservation"},
    {"role": "assistant", "content": None, "tool_calls": ["get_reservation"]},
    {"role": "assistant", "content": 5},
    {"role": "assistant", "content": {"text": "hi"}},
])
def test_tau_bench_skips_and_counts_a_malformed_assistant_message(tmp_path, bad):
    import json

    good = {"role": "assistant", "content": None,
            "tool_calls": [{"id": "c1", "type": "function",
                            "function": {"name": "get_reservation", "arguments": "{}"}}]}
    path = tmp_path / "gpt-4o-airline.json"
    path.write_text(json.dumps([tau_trajectory(good, 1), tau_trajectory(bad, 2)]))
    summary, records = import_rows("tau-bench", path, tmp_path)
    assert summary["read"] == 2 and summary["skipped"]["malformed_message"] == 1
    assert summary["written"] == len(records) == 3  # two calls of the good run, the later one of the other
    assert records[0]["meta"]["tool_names"] == ["get_reservation"]
    later = records[2]
    assert later["workflow"] == {"id": "gpt-4o-airline/task-2/trial-0", "step": 0}
    assert bad not in later["request"]["messages"]  # nor in the prompts after it


@pytest.mark.parametrize("subset", [["Algorithm-Generated"], {"a": 1}, 3])
def test_who_and_when_skips_and_counts_a_row_whose_subset_is_not_a_string(tmp_path, subset):
    row = {"subset": "Algorithm-Generated", "source_file": "a.json", "system_prompt": {"Expert": "You are an expert."},
           "history": [{"name": "Expert", "role": "assistant", "content": "The answer is 4."}]}
    path = write_jsonl(tmp_path / "who_and_when_tasks.jsonl", [row, dict(row, subset=subset, source_file="b.json")])
    summary, records = import_rows("who-and-when", path, tmp_path)
    assert summary["read"] == 2 and summary["skipped"] == {"malformed_row": 1}
    assert [r["workflow"]["id"] for r in records] == ["a"]


@pytest.mark.parametrize("fields", [{"completion_tokens": 1e300}, {"prompt_tokens": 1e300},
                                    {"completion_tokens": 2**53 + 1}, {"max_completion_tokens": 1e300},
                                    {"completion_tokens": -3}, {"completion_tokens": 2.5},
                                    {"completion_tokens": "12"}, {"call_index": 1e300}])
def test_chatdev_skips_and_counts_a_row_whose_counts_are_no_counts(tmp_path, fields):
    path = write_jsonl(tmp_path / "chatdev_llm_calls.jsonl",
                       [chatdev_row(0), chatdev_row(1, **fields), chatdev_row(2, completion_tokens=None)])
    summary, records = import_rows("chatdev", path, tmp_path)
    assert summary["skipped"] == {"malformed_row": 1}
    # a missing count is still estimated (the log has rows without usage), and an integral float still counts
    assert [r["workflow"]["step"] for r in records] == [0, 2] and records[1]["estimated"] is True
    integral = write_jsonl(tmp_path / "f.jsonl", [chatdev_row(3, completion_tokens=7.0)])
    summary, records = import_rows("chatdev", integral, tmp_path)
    assert summary["skipped"] == {} and records[0]["usage"]["completion_tokens"] == 7


def test_toolbench_skips_and_counts_a_call_index_past_two_to_the_53(tmp_path):
    row = {"prompt_messages": [{"role": "system", "content": "You can call tools."},
                               {"role": "user", "content": "Find a hotel."}],
           "output_message": {"role": "assistant", "content": "Calling search."}, "call_index": 0,
           "source_file": "run.json"}
    path = write_jsonl(tmp_path / "toolbench_dfs_llm_calls.jsonl",
                       [row, dict(row, call_index=1e300), dict(row, call_index=2**53 + 2), dict(row, call_index=1)])
    summary, records = import_rows("toolbench", path, tmp_path)
    assert summary["skipped"] == {"malformed_row": 2}
    assert [r["workflow"]["step"] for r in records] == [0, 1]


def test_nonneg_int_is_bounded():
    from predictor.importers import COUNT_LIMIT, nonneg_int

    assert COUNT_LIMIT == 2**53
    assert [nonneg_int(v) for v in (0, 7, 7.0, 2**53, float(2**53))] == [0, 7, 7, 2**53, 2**53]
    assert [nonneg_int(v) for v in (-1, 2**53 + 1, 1e300, 2.5, True, "3", None, float("inf"))] == [None] * 8


@pytest.mark.parametrize("source, module, name, path_name, rows", [
    ("chatdev", "predictor.importers.chatdev", "map_model", "chatdev_llm_calls.jsonl",
     [chatdev_row(0), chatdev_row(1, model_type="BOOM"), chatdev_row(2)]),
    ("toolbench", "predictor.importers.toolbench", "estimate_message_tokens", "toolbench_dfs_llm_calls.jsonl",
     [{"prompt_messages": [{"role": "user", "content": text}], "output_message": {"role": "assistant", "content": "a"},
       "call_index": i, "source_file": "run.json"} for i, text in enumerate(["q", "BOOM", "r"])]),
])
def test_a_row_whose_conversion_fails_is_skipped_and_counted(tmp_path, monkeypatch, source, module, name,
                                                             path_name, rows):
    """The general guard: whatever a row of an unexpected shape makes a conversion raise (TypeError, ValueError,
    AttributeError), that row is counted as malformed and the import goes on."""
    import importlib
    import json

    target = importlib.import_module(module)
    original = getattr(target, name)

    def fails_on_boom(value, *args):
        if "BOOM" in json.dumps(value):
            raise AttributeError("'int' object has no attribute 'get'")
        return original(value, *args)

    monkeypatch.setattr(target, name, fails_on_boom)
    summary, records = import_rows(source, write_jsonl(tmp_path / path_name, rows), tmp_path)
    assert summary["skipped"] == {"malformed_row": 1} and summary["written"] == len(records) == 2


def test_cli_import_of_malformed_rows_exits_0_and_reports_the_skips(tmp_path, capsys):
    path = write_jsonl(tmp_path / "chatdev_llm_calls.jsonl", [chatdev_row(0), chatdev_row(1, completion_tokens=1e300)])
    code, out, err = run_cli(["import", "--source", "chatdev", str(path), str(tmp_path / "o.jsonl")], capsys)
    assert code == 0 and "Traceback" not in err
    assert "chatdev: 1 records" in out and "malformed_row 1" in out


# ------------------------------------------------------------------------------------------------ import --limit
def test_import_limit_zero_writes_and_counts_nothing(tmp_path, capsys):
    import json

    from predictor.importers import import_source
    from predictor.trace import read_records

    path = write_jsonl(tmp_path / "chatdev_llm_calls.jsonl", [chatdev_row(i) for i in range(5)])
    out = tmp_path / "zero.jsonl"
    code, printed, _ = run_cli(["import", "--source", "chatdev", "--json", "--limit", "0", str(path), str(out)],
                               capsys)
    summary = json.loads(printed)
    assert code == 0 and summary["written"] == 0 and summary["roles"] == {} and summary["estimated"] == 0
    assert list(read_records(out)) == []
    assert import_source("chatdev", path, tmp_path / "two.jsonl", limit=2)["written"] == 2
    assert len(list(read_records(tmp_path / "two.jsonl"))) == 2
    # a missing input is still an error with a limit of 0
    assert_usage_error(["import", "--source", "chatdev", "--limit", "0", str(tmp_path / "missing"),
                        str(tmp_path / "m.jsonl")], capsys, "no such file or folder")
    assert not (tmp_path / "m.jsonl").exists()


def test_import_refuses_a_negative_limit(tmp_path, capsys):
    from predictor.importers import import_source

    path = write_jsonl(tmp_path / "chatdev_llm_calls.jsonl", [chatdev_row(0)])
    assert_usage_error(["import", "--source", "chatdev", "--limit", "-1", str(path), str(tmp_path / "o.jsonl")],
                       capsys, "argument --limit")
    with pytest.raises(ValueError, match="limit must be >= 0"):
        import_source("chatdev", path, tmp_path / "o.jsonl", limit=-1)
    assert not (tmp_path / "o.jsonl").exists()


# ------------------------------------------------------------------------------------------------ Ctrl-C
def run_maestro(argv: list[str], capsys) -> tuple[int, str, str]:
    """``maestro ARGV`` through the real entry point (gateway.cli.main): (exit code, stdout, stderr)."""
    from gateway.cli import main as maestro_main

    code = maestro_main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_ctrl_c_during_an_import_is_one_line_exit_130_and_leaves_out_as_it_was(tmp_path, capsys, monkeypatch):
    import predictor.importers.chatdev as chatdev

    real = chatdev.iter_records

    def interrupted(in_path, stats, **kwargs):
        for number, record in enumerate(real(in_path, stats, **kwargs)):
            if number == 5:
                raise KeyboardInterrupt
            yield record

    monkeypatch.setattr(chatdev, "iter_records", interrupted)
    data = write_jsonl(tmp_path / "chatdev_llm_calls.jsonl", [chatdev_row(i) for i in range(20)])
    out = tmp_path / "chatdev.jsonl"
    out.write_text("the previous import\n")
    code, _, err = run_maestro(["predictor", "import", "--source", "chatdev", "--quiet", str(data), str(out)],
                               capsys)
    assert code == 130 and err == "maestro: interrupted\n"
    assert out.read_text() == "the previous import\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name, data.name]  # no temporary file


@pytest.mark.parametrize("where", ["fitting", "writing"])
def test_ctrl_c_during_training_is_one_line_exit_130_and_writes_no_model(traces, tmp_path, capsys, monkeypatch,
                                                                         where):
    import skops.io

    import predictor.train as train

    def interrupt(*args, **kwargs):
        if where == "writing":  # part of the archive is written, then Ctrl-C
            target = args[1]
            if hasattr(target, "write"):
                target.write(b"PK half an archive")
            else:
                with open(target, "wb") as handle:
                    handle.write(b"PK half an archive")
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "fit_state", interrupt) if where == "fitting" else monkeypatch.setattr(
        skops.io, "dump", interrupt)
    out = tmp_path / "models" / "m.skops"
    code, _, err = run_maestro(["predictor", "train", "--data", str(traces), "--out", str(out), "--max-iter", "5",
                                "--quiet"], capsys)
    assert code == 130 and err == "maestro: interrupted\n"
    assert not out.exists() and (not out.parent.exists() or not any(out.parent.iterdir()))


# ------------------------------------------------------------------------------------------ a bad roles.yaml
def run_maestro_with_roles_yaml(roles_yaml: Path, argv: list[str]):
    """``maestro ARGV`` in a fresh interpreter whose role map is ``roles_yaml``: set before any other module is
    imported, so that a module reading the file at import time would read this one."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    code = ("import sys; from pathlib import Path; import predictor.role_labels as labels; "
            "labels.ROLES_YAML = Path(sys.argv[1]); from gateway.cli import main; sys.exit(main(sys.argv[2:]))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-c", code, str(roles_yaml), *argv], capture_output=True, text=True,
                          env=env, timeout=120)


BAD_ROLES_YAML = {
    "missing": (None, "cannot read"),
    "not yaml": ("sources:\n  chatdev: {names: {a: coder}\nlabels: [\n", "line "),
    "no sources": ("labels: {}\n", "'sources'"),
    "bad label role": ("sources: {chatdev: {default: other}}\nlabels:\n  synonyms: {Alice: wizard}\n",
                       "labels.synonyms.Alice"),
    "labels not a mapping": ("sources: {chatdev: {default: other}}\nlabels: [1, 2]\n", "labels"),
}


@pytest.mark.parametrize("case", BAD_ROLES_YAML)
def test_a_bad_roles_yaml_is_one_line_naming_the_file_not_a_traceback(tmp_path, case):
    content, says = BAD_ROLES_YAML[case]
    roles = tmp_path / "roles.yaml"
    if content is not None:
        roles.write_text(content)
    # every command that does not map roles works regardless, --help included
    done = run_maestro_with_roles_yaml(roles, ["--help"])
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    # the import maps roles by the file's sources (labels are the gateway's): one line naming the file, exit 2,
    # nothing written
    data = write_jsonl(tmp_path / "chatdev_llm_calls.jsonl", [chatdev_row(i) for i in range(3)])
    out = tmp_path / "out.jsonl"
    done = run_maestro_with_roles_yaml(roles, ["predictor", "import", "--source", "chatdev", "--quiet", str(data),
                                               str(out)])
    if not case.startswith(("bad label", "labels")):
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1 and str(roles) in done.stderr and says in done.stderr
        assert not out.exists()
    # a predictor (here: the priors a gateway serves first) reads the role labels when it is made
    traces = tmp_path / "traces.jsonl"
    write_records(traces, synthetic_records(n_workflows=2, seed=3))
    done = run_maestro_with_roles_yaml(roles, ["predictor", "evaluate", "--priors", "--data", str(traces),
                                               "--split", "all"])
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and str(roles) in done.stderr and says in done.stderr


# --------------------------------------------------------------------------------- evaluate: in-sample reports
def test_evaluate_refuses_the_held_out_part_of_a_model_trained_on_everything(model_all, traces, capsys):
    code, out, err = run_cli(["evaluate", "--model", str(model_all), "--data", str(traces)], capsys)
    assert code == 2 and out == "" and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert "trained with --split all" in err and "--split all" in err and "--split train" in err


def test_evaluate_split_all_on_the_training_files_is_labelled_in_sample(model_all, traces, capsys, monkeypatch):
    import json

    code, out, err = run_cli(["evaluate", "--model", str(model_all), "--data", str(traces), "--split", "all"], capsys)
    report = json.loads(out)
    assert code == 0 and report["meta"]["in_sample"] is True and report["meta"]["model_split"] == "all"
    assert report["all"]["n"] == 12 * 6 and "in-sample report" in err
    code, out, _ = run_cli(["evaluate", "--model", str(model_all), "--data", str(traces), "--split", "all",
                            "--format", "markdown"], capsys)
    assert code == 0 and out.splitlines()[0].startswith("| source |") and "In-sample" in out
    # the same file named another way (relative to the working folder) is still the training file
    monkeypatch.chdir(traces.parent)
    code, out, _ = run_cli(["evaluate", "--model", str(model_all), "--data", traces.name, "--split", "all"], capsys)
    assert code == 0 and json.loads(out)["meta"]["in_sample"] is True


def test_training_files_are_recognised_from_any_folder_and_by_content(traces, tmp_path, capsys, monkeypatch):
    """train keeps its files' real paths and fingerprints: evaluating from another folder, or a copy of a training
    file, is in-sample; another file that happens to have the name a training file was typed as is not."""
    import hashlib
    import json
    import shutil

    from predictor.model_file import load_state

    model = tmp_path / "m.skops"
    monkeypatch.chdir(traces.parent)
    assert predictor_main(["train", "--data", traces.name, "--out", str(model), "--split", "all", "--max-iter", "5",
                           "--quiet"]) == 0
    training = load_state(model)["training"]
    assert training["data"] == [str(traces.resolve())]
    assert training["data_files"] == [{"path": str(traces.resolve()), "bytes": traces.stat().st_size,
                                       "sha256": hashlib.sha256(traces.read_bytes()).hexdigest()}]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    def in_sample(path: Path | str) -> bool:
        code, out, err = run_cli(["evaluate", "--model", str(model), "--data", str(path), "--split", "all"], capsys)
        assert code == 0, err
        return json.loads(out)["meta"]["in_sample"]

    assert in_sample(traces)  # the training file, from another folder
    assert in_sample(shutil.copy(traces, elsewhere / "copied.jsonl"))  # the same bytes under another name
    write_records(elsewhere / traces.name, synthetic_records(n_workflows=3, seed=11))
    assert not in_sample(traces.name)  # the name it was typed as, here another file


def test_a_model_file_naming_its_training_files_relatively_matches_them_by_name(traces, tmp_path, capsys,
                                                                                   monkeypatch):
    """Model files from before real paths were kept name their files as typed, relative to a folder they do not
    record: such a name counts its file as training data, with a note, rather than scoring it as held-out."""
    import json

    from predictor.model_file import load_state, save_state

    model = tmp_path / "m.skops"
    assert predictor_main(["train", "--data", str(traces), "--out", str(model), "--split", "all", "--max-iter", "5",
                           "--quiet"]) == 0
    state = load_state(model)
    state["training"]["data"] = [f"traces/{traces.name}"]
    state["training"].pop("data_files", None)
    old = save_state(state, tmp_path / "old.skops")
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(["evaluate", "--model", str(old), "--data", str(traces), "--split", "all"], capsys)
    assert code == 0 and json.loads(out)["meta"]["in_sample"] is True, err
    assert "by file name" in err and "Traceback" not in err
    other = tmp_path / "other.jsonl"
    write_records(other, synthetic_records(n_workflows=3, seed=11))
    code, out, err = run_cli(["evaluate", "--model", str(old), "--data", str(other), "--split", "all"], capsys)
    assert code == 0 and json.loads(out)["meta"]["in_sample"] is False and "by file name" not in err


def test_evaluate_split_all_on_other_traces_is_not_in_sample(model_all, tmp_path, capsys):
    import json

    other = tmp_path / "other.jsonl"
    write_records(other, synthetic_records(n_workflows=3, seed=11))
    code, out, err = run_cli(["evaluate", "--model", str(model_all), "--data", str(other), "--split", "all"], capsys)
    report = json.loads(out)
    assert code == 0 and report["meta"]["in_sample"] is False and "in-sample" not in err
    code, out, _ = run_cli(["evaluate", "--model", str(model_all), "--data", str(other), "--split", "all",
                            "--format", "markdown"], capsys)
    assert "In-sample" not in out


def test_evaluate_of_a_train_split_model_is_held_out_by_default(traces, tmp_path, capsys):
    import json

    model = tmp_path / "train.skops"
    assert predictor_main(["train", "--data", str(traces), "--out", str(model), "--max-iter", "10", "--quiet"]) == 0
    code, out, _ = run_cli(["evaluate", "--model", str(model), "--data", str(traces)], capsys)
    meta = json.loads(out)["meta"]
    assert code == 0 and (meta["split"], meta["model_split"], meta["in_sample"]) == ("test", "train", False)
    # every record of the training files includes the train part: in-sample (partly), and labelled so
    code, out, err = run_cli(["evaluate", "--model", str(model), "--data", str(traces), "--split", "all"], capsys)
    assert code == 0 and json.loads(out)["meta"]["in_sample"] is True and "the train part of" in err


def test_evaluate_refuses_files_that_split_a_source_otherwise(tmp_path, capsys):
    """A source's held-out part is drawn from all its runs in the files given: a subset of the files it was
    trained on, or those files plus another, would draw another part, holding runs the model trained on."""
    first, second, third = (tmp_path / f"runs{i}.jsonl" for i in (1, 2, 3))
    for seed, path in enumerate((first, second, third), start=1):
        write_records(path, synthetic_records(n_workflows=10, seed=seed))
    model = tmp_path / "m.skops"
    assert predictor_main(["train", "--data", str(first), str(second), "--out", str(model), "--max-iter", "5",
                           "--quiet"]) == 0
    for data in ([first], [first, second, third]):
        assert_usage_error(["evaluate", "--model", str(model), "--data", *map(str, data)], capsys,
                           "do not split synthetic as the files")
    code, _, err = run_cli(["evaluate", "--model", str(model), "--data", str(second), str(first)], capsys)
    assert code == 0, err  # the same files, in any order: the same held-out part
    code, _, err = run_cli(["evaluate", "--model", str(model), "--data", str(third), "--split", "all"], capsys)
    assert code == 0, err  # runs it never saw


def test_evaluate_refuses_another_split_of_the_models_own_files(traces, tmp_path, capsys):
    """A model trained on seed 0's train part, scored on seed 1's held-out part of the same files, would be
    scored partly on runs it trained on."""
    model = tmp_path / "train.skops"
    assert predictor_main(["train", "--data", str(traces), "--out", str(model), "--max-iter", "10", "--quiet"]) == 0
    for override in (["--seed", "1"], ["--test-size", "0.3"]):
        err = assert_usage_error(["evaluate", "--model", str(model), "--data", str(traces), *override], capsys,
                                 "would include runs it trained on")
        assert len(err.strip().splitlines()) == 1
    code, _, _ = run_cli(["evaluate", "--model", str(model), "--data", str(traces), "--seed", "0"], capsys)
    assert code == 0  # the model's own split, said explicitly
    other = tmp_path / "other.jsonl"  # files it never saw: any split of them is unseen
    write_records(other, synthetic_records(n_workflows=6, seed=11))
    code, _, _ = run_cli(["evaluate", "--model", str(model), "--data", str(other), "--seed", "3"], capsys)
    assert code == 0


# ------------------------------------------------------------------------------------------ evaluate --priors
def test_evaluate_scores_the_priors_a_gateway_serves_before_it_has_a_model(traces, tmp_path, capsys):
    import orjson

    code, out, err = run_cli(["evaluate", "--priors", "--data", str(traces), "--split", "all"], capsys)
    assert code == 0, err
    built_in = orjson.loads(out)
    assert built_in["meta"]["priors"] == "built-in" and built_in["meta"]["model"] is None
    assert 0.0 <= built_in["all"]["length"]["p90_coverage"] <= 1.0
    overrides = tmp_path / "priors.json"  # every request answered with p90 = 1: almost nothing is covered
    overrides.write_text('{"other": {"p50": 1, "p90": 1}, "coder": [1, 1], "planner": [1, 1], "reviewer": [1, 1]}')
    code, out, err = run_cli(["evaluate", "--priors", str(overrides), "--data", str(traces), "--split", "all"],
                             capsys)
    assert code == 0, err
    tiny = orjson.loads(out)
    assert tiny["meta"]["priors"] == str(overrides)
    assert tiny["all"]["length"]["p90_coverage"] < built_in["all"]["length"]["p90_coverage"]


@pytest.mark.parametrize("content, says", [
    (None, "cannot read --priors"),
    ("{not json", "is not JSON"),
    ("[1, 2]", "must hold a JSON object"),
    ('{"coder": [5, 1]}', "need 0 < p50 <= p90"),
    ('{"astronaut": [5, 10]}', "unknown role"),
    ('{"coder": 5}', "--priors"),
])
def test_evaluate_refuses_priors_it_cannot_use_before_reading_data(tmp_path, capsys, content, says):
    path = tmp_path / "priors.json"
    if content is not None:
        path.write_text(content)
    err = assert_usage_error(["evaluate", "--priors", str(path), "--data", str(tmp_path / "never-read.jsonl")],
                             capsys, says)
    assert "never-read" not in err


def test_evaluate_takes_exactly_one_of_model_cv_priors(tmp_path, capsys):
    for extra in (["--priors", "--model", "m.skops"], ["--priors", "--cv", "3"], []):
        assert_usage_error(["evaluate", *extra, "--data", str(tmp_path / "x.jsonl")], capsys,
                           "give one of --model MODEL, --cv K or --priors [FILE]")


# ------------------------------------------------------------------------------------- evaluate --max-model-len
def test_evaluate_caps_requests_at_the_served_models_contexts(traces, capsys):
    import orjson

    base = ["evaluate", "--priors", "--data", str(traces), "--split", "all"]
    code, out, err = run_cli(base, capsys)
    assert code == 0, err
    plain = orjson.loads(out)
    # short contexts: every reservation (and every worst case) is at most the room the prompt leaves
    code, out, err = run_cli([*base, "--max-model-len", "model-a=120", "--max-model-len=model-b=120"], capsys)
    assert code == 0, err
    short = orjson.loads(out)
    assert short["meta"]["max_model_len"] == {"model-a": 120, "model-b": 120}
    assert "max_model_len" not in plain["meta"] and plain["all"]["kv"]["default_max_tokens"] == 4096
    assert short["all"]["kv"]["default_max_tokens"] is None
    assert short["all"]["length"]["p90_coverage"] < plain["all"]["length"]["p90_coverage"]
    # an explicit --default-max-tokens still applies, within the context
    code, out, err = run_cli([*base, "--max-model-len", "model-a=120", "--default-max-tokens", "50"], capsys)
    assert code == 0, err
    assert orjson.loads(out)["all"]["kv"]["default_max_tokens"] == 50
    # a name no record asks for (a typo would leave that model at 4096) is pointed out
    code, out, err = run_cli([*base, "--max-model-len", "model-a =120"], capsys)
    assert code == 0 and "--max-model-len names 'model-a ', which no record asks for" in err
    typo = orjson.loads(out)["all"]
    assert typo["length"] == plain["all"]["length"] and typo["kv"]["saving"] == plain["all"]["kv"]["saving"]


@pytest.mark.parametrize("value", ["model-a", "=120", "model-a=", "model-a=0", "model-a=-5", "model-a=1.5",
                                   "model-a=lots"])
def test_evaluate_refuses_a_max_model_len_it_cannot_use_before_reading_data(tmp_path, capsys, value):
    err = assert_usage_error(["evaluate", "--priors", "--data", str(tmp_path / "never-read.jsonl"),
                              "--max-model-len", value], capsys, "argument --max-model-len")
    assert "never-read" not in err


def test_a_predictor_module_that_cannot_be_imported_is_named_and_the_rest_works(monkeypatch, capsys):
    """A broken scientific stack must not take ``maestro serve`` down with it: the train command says what failed
    (exit 2, no traceback), and the other commands' parsers still build."""
    import importlib

    import predictor.cli as cli
    from gateway.cli import build_parser

    real_import = importlib.import_module

    def broken(name, *args, **kwargs):
        if name == "predictor.train":
            raise ImportError("numpy.core.multiarray failed to import")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(cli.importlib, "import_module", broken)
    code, out, err = run_cli(["train", "--data", "x.jsonl", "--out", "m.skops"], capsys)
    assert code == 2 and out == "" and "Traceback" not in err
    assert "'predictor.train' cannot be loaded (ImportError: numpy.core.multiarray failed to import)" in err
    assert build_parser().parse_args(["serve"]).func is not None
    code, _, err = run_cli(["evaluate", "--help"], capsys)
    assert code == 0


# ------------------------------------------------------------------------------ what evaluate and train score
def test_evaluate_refuses_a_held_out_part_that_is_empty(tmp_path, capsys):
    """Runs are held out per source, and a source of one run has none to hold out: where no source has two,
    the default split scored nothing and printed a table of zeros with exit 0."""
    import json

    model = tmp_path / "m.skops"
    many = tmp_path / "many.jsonl"
    write_records(many, synthetic_records(n_workflows=10, seed=3))
    assert predictor_main(["train", "--data", str(many), "--out", str(model), "--max-iter", "5", "--quiet"]) == 0
    one_run = [dict(record, workflow={"id": "only", "step": i}, source="one-run")
               for i, record in enumerate(synthetic_records(n_workflows=2, seed=4))]
    single = write_records(tmp_path / "single.jsonl", one_run) and tmp_path / "single.jsonl"
    assert_usage_error(["evaluate", "--model", str(model), "--data", str(single)], capsys, "--split all")
    # an empty workflow id is no id: each such record is its own run, as the gateway's recorder logs it
    blank = write_records(tmp_path / "blank.jsonl", [dict(r, workflow={"id": "", "step": r["workflow"]["step"]})
                                                     for r in one_run]) and tmp_path / "blank.jsonl"
    code, out, err = run_cli(["evaluate", "--model", str(model), "--data", str(blank)], capsys)
    assert code == 0 and json.loads(out)["by_source"]["one-run"]["n"] > 0, err
    # beside a source that has a held-out part, the one-run source is named as not scored
    code, out, err = run_cli(["evaluate", "--model", str(model), "--data", str(many), str(single)], capsys)
    report = json.loads(out)
    assert code == 0 and "one-run" not in report["by_source"] and report["meta"]["unscored_sources"] == ["one-run"]
    assert "not scored: one-run" in err
    # traces the model's file does not name: a note says the default scores only their held-out part
    code, out, err = run_cli(["evaluate", "--model", str(model), "--data", str(blank)], capsys)
    assert code == 0 and "--split all scores every record" in err
    code, out, err = run_cli(["evaluate", "--model", str(model), "--data", str(many)], capsys)
    assert code == 0 and "note" not in err


def test_records_of_requests_for_several_answers_are_left_out_and_counted(tmp_path, capsys):
    """``usage.completion_tokens`` of a request with n > 1 sums its answers: trained on or scored as one answer's
    length, it inflated the targets (and the MAE) n times."""
    import json

    from predictor.train import load_records

    plain = synthetic_records(n_workflows=6, seed=7)
    several = [dict(r, request=dict(r["request"], n=4),
                    usage=dict(r["usage"], completion_tokens=4 * r["usage"]["completion_tokens"])) for r in plain]
    mixed = write_records(tmp_path / "mixed.jsonl", plain + several) and tmp_path / "mixed.jsonl"
    skipped = [0]
    assert len(load_records([mixed], skipped)) == len(plain) and skipped == [len(several)]
    model = tmp_path / "m.skops"
    assert predictor_main(["train", "--data", str(mixed), "--out", str(model), "--split", "all", "--max-iter", "5",
                           "--quiet"]) == 0
    assert Predictor.load(model).state["training"]["n_records"] == len(plain)
    code, out, err = run_cli(["evaluate", "--model", str(model), "--data", str(mixed), "--split", "all"], capsys)
    assert code == 0 and json.loads(out)["all"]["n"] == len(plain) and f"left out {len(several)}" in err


def test_a_file_given_twice_is_refused(traces, model_all, tmp_path, capsys):
    """Its records would count twice: twice the n, and bootstrap intervals that look tighter than they are."""
    alias = tmp_path / "alias.jsonl"
    alias.symlink_to(traces)
    for data in ([traces, traces], [traces, alias]):
        assert_usage_error(["evaluate", "--model", str(model_all), "--split", "all", "--data", *map(str, data)],
                           capsys, "given twice")
    assert_usage_error(["train", "--data", str(traces), str(traces), "--out", str(tmp_path / "m.skops")], capsys,
                       "given twice")


def test_a_last_line_being_written_is_left_out_with_a_warning(tmp_path, caplog):
    """The online buffer file is a trace file to train on while the gateway appends to it: a read that met a
    record half written refused the whole file. A broken line that is not the last is still refused."""
    import logging

    records = synthetic_records(n_workflows=1, seed=2)
    path = write_records(tmp_path / "live.jsonl", records) and tmp_path / "live.jsonl"
    with path.open("ab") as handle:
        handle.write(b'{"request": {"model": "m", "messages": [{"role": "us')
    with caplog.at_level(logging.WARNING):
        assert len(list(read_records(path))) == len(records)
    assert "cut short" in caplog.text
    with path.open("ab") as handle:
        handle.write(b"\n")
    with pytest.raises(ValueError, match=f"{path.name}:{len(records) + 1}: invalid JSON"):
        list(read_records(path))
