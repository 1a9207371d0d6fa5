"""``maestro predictor ...``: import third-party traces, train, evaluate.

``gateway/cli.py`` calls :func:`add_predictor_commands` with its subparsers; every subcommand sets ``func`` to a
function of ``args`` that returns the exit code (0 success, 1 runtime failure, 2 usage error: unknown source,
missing or unreadable input, an option out of range, a module that is not there yet).

    maestro predictor import --source chatdev ../shared/data/chatdev-warehouse-llm-calls traces/chatdev.jsonl.gz
    maestro predictor train --data traces/*.jsonl.gz --out model.skops      (predictor.train)
    maestro predictor evaluate ...                                          (predictor.evaluate)
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import Any

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


def add_predictor_commands(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``predictor`` command group (``import``, ``train``, ``evaluate``) to ``subparsers``."""
    from predictor.importers import SOURCES

    predictor = subparsers.add_parser("predictor", help="trace import, training and evaluation of the predictor")
    sub = predictor.add_subparsers(dest="predictor_command", required=True)

    imp = sub.add_parser("import", help="convert a third-party trace into trace records (.jsonl / .jsonl.gz)",
                         description="Read a third-party agent trace in place and write Maestro trace records. "
                                     f"Sources: {', '.join(SOURCES)}.")
    imp.add_argument("--source", required=True, metavar="NAME", help=f"one of: {', '.join(SOURCES)}")
    imp.add_argument("input", metavar="IN", help="the source file, or the folder that holds it")
    imp.add_argument("output", metavar="OUT", help="output file, .jsonl or .jsonl.gz")
    imp.add_argument("--limit", type=non_negative_int, default=None, help="stop after this many records (>= 0)")
    imp.add_argument("--quiet", action="store_true", help="print only the summary")
    imp.add_argument("--json", action="store_true", help="print the summary as JSON")
    imp.set_defaults(func=cmd_import)

    train = sub.add_parser("train", help="train the role classifier and output-length model (predictor.train)")
    _attach(train, "predictor.train", cmd_train)
    evaluate = sub.add_parser("evaluate", help="evaluate a trained predictor on held-out traces "
                              "(predictor.evaluate)")
    _attach(evaluate, "predictor.evaluate", cmd_evaluate)
    return predictor


# ---------------------------------------------------------------------------------------------- argparse types
# Range checks of the numeric options, as argparse types: a value out of range is a usage error (exit 2, one
# line naming the option) said before any data is read, not a scikit-learn traceback a minute later.

def positive_int(text: str) -> int:
    """argparse type of a count that must be at least 1 (requests, boosting iterations, tree depth, tokens)."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, not {text!r}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type of a count that may be 0 (warm-up calls, records to import)."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, not {text!r}")
    return value


def split_seed(text: str) -> int:
    """argparse type of a split seed: scikit-learn takes 0 .. 2**32 - 1."""
    value = _int(text)
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"must be a whole number from 0 to {2**32 - 1}, not {text!r}")
    return value


def _float_or_nan(text: str) -> float:
    """``text`` as a float; NaN where it is none, so that every range check below refuses it."""
    try:
        return float(text)
    except ValueError:
        return float("nan")


def strictly_between_0_and_1(text: str, what: str) -> float:
    """A float strictly between 0 and 1, or an argparse error that begins with ``what``."""
    value = _float_or_nan(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"{what} strictly between 0 and 1, not {text!r}")
    return value


def share(text: str) -> float:
    """argparse type of a weight or a confidence: a number from 0 to 1 (NaN and infinity are refused)."""
    value = _float_or_nan(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a number from 0 to 1, not {text!r}")
    return value


def held_out_share(text: str) -> float:
    """argparse type of a held-out share: strictly between 0 and 1 (0 would hold nothing out, 1 train on nothing,
    and scikit-learn reads a number above 1 as a count of workflows)."""
    return strictly_between_0_and_1(text, "must be a share")


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, not {text!r}") from None


# ---------------------------------------------------------------------------------------------- import

def _err(message: str) -> None:
    print(f"maestro predictor: {message}", file=sys.stderr)


def cmd_import(args: argparse.Namespace) -> int:
    from predictor.importers import (SOURCES, InputFormatError, InputNotFoundError, OutputIsInputError,
                                     UnknownSourceError, import_source)
    from predictor.role_labels import RolesFileError
    from predictor.trace import OutputNotWritableError, TraceFormatError

    if args.source not in SOURCES:
        _err(f"unknown source {args.source!r}; known sources: {', '.join(SOURCES)}")
        return EXIT_USAGE
    output = str(args.output)
    if not (output.endswith(".jsonl") or output.endswith(".jsonl.gz")):
        _err(f"OUT must end in .jsonl or .jsonl.gz: {output}")
        return EXIT_USAGE

    def progress(stats) -> None:
        print(f"  {stats.source}: {stats.written} records written, {stats.read} rows read, "
              f"{sum(stats.skipped.values())} skipped", file=sys.stderr, flush=True)

    if not args.quiet:
        print(f"importing {args.source} from {args.input} -> {output}", file=sys.stderr, flush=True)
    try:
        summary = import_source(args.source, args.input, output, limit=args.limit,
                                progress=None if args.quiet else progress)
    except (UnknownSourceError, InputNotFoundError, OutputIsInputError, InputFormatError, RolesFileError,
            OutputNotWritableError) as exc:
        _err(str(exc))  # nothing written: the output only appears once every record is
        return EXIT_USAGE
    except (ValueError, TraceFormatError, OSError) as exc:
        _err(f"import failed: {exc}")
        return EXIT_FAILURE
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary), flush=True)
    return EXIT_OK


def format_summary(summary: dict[str, Any]) -> str:
    lines = [f"{summary['source']}: {summary['written']} records -> {summary['output']} "
             f"({summary['read']} rows read"
             + (f", {summary['messages']} messages" if summary.get("messages") else "")
             + f", {summary['seconds']} s)"]
    if summary["skipped"]:
        lines.append("  skipped: " + ", ".join(f"{reason} {n}" for reason, n in summary["skipped"].items()))
    lines.append("  roles:   " + ", ".join(f"{role} {n}" for role, n in summary["roles"].items()))
    if summary["estimated"]:
        lines.append(f"  estimated token counts: {summary['estimated']} records")
    if summary.get("tool_rendered"):
        lines.append(f"  tool-rendered outputs (meta.tool_rendered_output): {summary['tool_rendered']} records")
    if summary.get("templated"):
        lines.append(f"  templated outputs (meta.templated_output): {summary['templated']} records")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- train / evaluate
# The training and evaluation commands live in predictor/train.py and predictor/evaluate.py, each with
# ``add_arguments(parser)`` and ``main(args: argparse.Namespace) -> int`` (the convention of loadgen.bench).
# When a module fails to import (a broken numpy or scikit-learn install), its subcommand still exists and exits 2
# saying why, and every other maestro command (serve, loadgen) keeps working.

def _attach(parser: argparse.ArgumentParser, module_name: str, fallback) -> None:
    try:
        module = importlib.import_module(module_name)
        module.add_arguments(parser)
        parser.set_defaults(func=module.main)
    except (ImportError, AttributeError) as exc:
        reason = f"{type(exc).__name__}: {exc}"

        def parse_anything(args=None, namespace=None):
            # whatever options follow, the command can only say why it cannot run (a REMAINDER positional
            # would not take them: argparse reads a leading --option as unrecognised)
            namespace = namespace if namespace is not None else argparse.Namespace()
            namespace.func, namespace.unavailable = fallback, reason
            return namespace, []

        parser.parse_known_args = parse_anything  # type: ignore[method-assign]


def _unavailable(module_name: str, args: argparse.Namespace) -> int:
    reason = getattr(args, "unavailable", None) or "not loaded"
    _err(f"'{module_name}' cannot be loaded ({reason}); reinstall maestro with its dependencies "
         "(pip install -e .)")
    return EXIT_USAGE


def cmd_train(args: argparse.Namespace) -> int:
    """``maestro predictor train`` when ``predictor.train`` cannot be imported: says why."""
    return _unavailable("predictor.train", args)


def cmd_evaluate(args: argparse.Namespace) -> int:
    """``maestro predictor evaluate`` when ``predictor.evaluate`` cannot be imported: says why."""
    return _unavailable("predictor.evaluate", args)


def main(argv: list[str] | None = None) -> int:
    """``python -m predictor.cli ...`` (the same commands without the ``maestro predictor`` prefix)."""
    parser = argparse.ArgumentParser(prog="maestro")
    add_predictor_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["predictor", *(sys.argv[1:] if argv is None else argv)])
    return run(args)


def run(args: argparse.Namespace) -> int:
    """``args.func(args)``, with a roles.yaml that cannot be used (read when a command first maps a role) said
    in one line, exit 2, as ``maestro`` says it."""
    from predictor.role_labels import RolesFileError

    try:
        return args.func(args)
    except RolesFileError as exc:
        _err(str(exc))
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
