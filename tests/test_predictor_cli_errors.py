"""The predictor commands on bad input: out-of-range options, corrupt files, malformed rows, model files that
cannot be used for what is asked. Each case gets one clear line (exit 2 for a usage error) and no traceback,
and leaves no half-written output behind.

All inputs are small hand-written fixtures made in ``tmp_path``; no third-party data.
"""

from __future__ import annotations

import pytest

from predictor.cli import main as predictor_main


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """``maestro predictor ARGV``: (exit code, stdout, stderr), whether argparse or the command exits."""
    try:
        code = predictor_main(argv)
    except SystemExit as exit_info:
        code = exit_info.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


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
