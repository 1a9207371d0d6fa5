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
from predictor.trace import write_records
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
