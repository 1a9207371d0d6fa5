"""``maestro loadgen workload ... --out FILE.json``: write a generated ``maestro-workload/1`` file.

Wire with ``add_workload_arguments(subparser)`` and ``subparser.set_defaults(func=workload_main)``;
``workload_main(args)`` returns the exit status (0 ok, 2 bad arguments or missing data).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import orjson

from loadgen.results import announce_replacing, prepare_output
from loadgen.slo import add_gateway_config_argument, check_slo_class_names, slo_classes_from_args
from loadgen.workloads.arrivals import ARRIVALS
from loadgen.workloads.builder import SpecError, WorkloadSpec, build_workload, template_names, template_stats
from loadgen.workloads.data import DataUnavailable
from loadgen.workloads.replay import REPLAYS
from loadgen.workloads.traces import LENGTH_MODES

# CLI flag (dest) -> spec field, for the flags whose names differ
_RENAMES = {"duration": "duration_s", "servegen_window": "servegen_window_s", "replay_start": "replay_start_s",
            "tool_time": "tool_time_s", "user_time": "user_time_s"}


def _template_weight(text: str) -> tuple[str, float]:
    name, sep, weight = text.rpartition("=")
    if not sep:
        return text, 1.0
    try:
        value = float(weight)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad template weight in {text!r} (use NAME or NAME=WEIGHT)") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"template weight must be >= 0 in {text!r}")
    return name, value


def add_workload_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--out", "-o", help="write the workload file here (maestro-workload/1 JSON)")
    add("--spec", help="a JSON file of spec fields (loadgen.workloads.WorkloadSpec); flags given override it")
    add("--list-templates", action="store_true", help="list the templates with their shape, then exit")
    add("--template", "-t", action="append", type=_template_weight, metavar="NAME[=WEIGHT]",
        help="a template in the mix (repeatable): built-in name, trace:chatdev|ag2|magentic-one|tau-bench, "
             "or a workload file path (default: chatdev)")
    add("--interactive-share", type=float, help="fraction of arrivals that are interactive single calls (0)")
    add("--rate", type=float, help="arrivals per second, workflows and interactive calls together (0.2)")
    add("--duration", type=float, help="seconds of arrivals (300)")
    add("--arrival", choices=ARRIVALS, help="arrival process (poisson)")
    add("--cv", type=float, help="gamma: coefficient of variation of inter-arrival times (default: ServeGen's)")
    add("--cv-quantile", type=float, help="gamma without --cv: request-weighted ServeGen CV quantile (0.9)")
    add("--servegen-category", choices=("language", "reason", "multimodal"),
        help="ServeGen category for gamma's CV and the servegen process (language)")
    add("--servegen-model", help="ServeGen model within the category (m-small / deepseek-r1 / mm-image)")
    add("--servegen-window", type=float, help="servegen: window start in seconds (default: a random one)")
    add("--servegen-clients", type=int, help="servegen: superpose only this many clients (default: all)")
    add("--deadline-scale", type=float,
        help="workflow deadline = this x the reference critical path (3); 0 = the SLO class default")
    add("--seed", type=int, help="random seed (0)")
    add("--model", help="model name the requests ask for (maestro-sim-llama-8b)")
    add("--name", help="workload name (default: from the mix)")
    add("--trace-lengths", choices=LENGTH_MODES,
        help="trace templates: resample outputs from the role/phase pools, or keep the run's counts (resample)")
    add("--jitter", type=float, help="built-in templates: lognormal sigma of length jitter (0.25)")
    add("--interactive-lengths", choices=("synthetic",) + REPLAYS,
        help="lengths of interactive calls: synthetic lognormal or a trace's (prompt, output) pairs")
    add("--interactive-prompt-tokens", type=int, help="synthetic interactive calls: mean prompt tokens (800)")
    add("--interactive-output-tokens", type=int, help="synthetic interactive calls: mean output tokens (250)")
    add("--workflow-slo-class", help="SLO class of workflows (batch)")
    add("--interactive-slo-class", help="SLO class of interactive calls (interactive)")
    add("--replay", choices=REPLAYS, help="add the single calls of a real trace with its timestamps")
    add("--replay-time-scale", type=float, help="replay N times faster (1)")
    add("--replay-start", type=float, help="replay from this many trace seconds in (0)")
    add("--replay-max-requests", type=int, help="replay at most this many calls")
    add("--replay-slo-class", help="SLO class of replayed calls (interactive)")
    add("--context-len", type=int, help="model context: prompt + output are fitted into it (8192)")
    add("--max-prompt-tokens", type=int, help="cap on prompt tokens (default: what the context allows)")
    add("--max-output-tokens", type=int, help="cap on output tokens (2048)")
    add("--max-tokens", type=int, help="max_tokens a step declares, fitted to the context (4096)")
    add("--tool-time", type=float, help="trace templates: pause for a tool / code execution, seconds (1)")
    add("--user-time", type=float, help="trace templates: pause for a user's turn, seconds (3)")
    add_gateway_config_argument(parser)  # which SLO class names the three --*-slo-class flags may give


def spec_from_args(args: argparse.Namespace) -> WorkloadSpec:
    data: dict[str, Any] = {}
    if getattr(args, "spec", None):
        with open(args.spec, "rb") as handle:
            try:
                loaded = orjson.loads(handle.read())
            except orjson.JSONDecodeError as exc:
                raise SpecError(f"{args.spec} is not valid JSON: {exc}") from None
        if not isinstance(loaded, dict):
            raise SpecError(f"{args.spec}: a spec file is a JSON object of spec fields")
        data.update(loaded)
    spec_fields = set(WorkloadSpec.__dataclass_fields__)
    for dest, value in vars(args).items():
        if value is None or dest in ("out", "spec", "list_templates", "func", "template"):
            continue
        key = _RENAMES.get(dest, dest)
        if key in spec_fields:
            data[key] = value
    if getattr(args, "template", None):
        mix: dict[str, float] = {}
        for name, weight in args.template:
            mix[name] = mix.get(name, 0.0) + weight
        data["templates"] = mix
    if data.get("deadline_scale") == 0:
        data["deadline_scale"] = None
    return WorkloadSpec.from_dict(data)


def workload_main(args: argparse.Namespace) -> int:
    try:
        if args.list_templates:
            for name in template_names():
                try:
                    stats = template_stats(name)
                except DataUnavailable as exc:
                    print(f"{name:22s} (data not available: {exc})")
                    continue
                print(f"{name:22s} {orjson.dumps(stats).decode()}")
            return 0
        if not args.out:
            print("error: --out FILE.json is required", file=sys.stderr)
            return 2
        prepare_output(args.out, inputs=(getattr(args, "spec", None), getattr(args, "gateway_config", None)))
        spec = spec_from_args(args)
        # a class the gateway does not know is answered with 400: refuse it here, not in the run
        check_slo_class_names(((f"{name} (--{name.replace('_', '-')})", getattr(spec, name))
                               for name in ("workflow_slo_class", "interactive_slo_class", "replay_slo_class")),
                              slo_classes_from_args(args))
        workload = build_workload(spec)
        announce_replacing(args.out)
        workload.save(args.out)
    except (SpecError, DataUnavailable, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {exc.filename or args.out}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    counts = ", ".join(f"{k}: {v}" for k, v in sorted(workload.meta.get("counts", {}).items())) or "nothing"
    print(f"wrote {args.out}: {len(workload.workflows)} arrivals ({counts}), {workload.meta['requests']} requests "
          f"over {workload.duration_s():.1f} s", file=sys.stderr)
    if not workload.workflows:  # a rate x duration too small for one arrival: a run of it would measure nothing
        print("warning: the workload is empty (no arrival fell in the window); raise --rate or --duration",
              file=sys.stderr)
    return 0
