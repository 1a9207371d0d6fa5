"""Simulate mode and the experiments E1-E3 (``maestro loadgen simulate`` / ``maestro loadgen experiment``).

Every experiment is one seeded command that writes a JSON result file and prints Markdown tables. Runs are
discrete-event simulations (:mod:`loadgen.des`) of the gateway's own scheduling core.

The setup (all of it can be changed from the command line)
-----------------------------------------------------------
*Engines* (profile ``llama70b-h200``): a 70B-class model on the calibrated cost model. The calibration holds a
Llama-70B-shaped decode step (``llama70b_shape_decode_ms_single_gpu_equiv``: 37.6 ms at batch 1) next to the
8B one the cost model is fitted on (4.47 ms at batch 1), so the engines use ``EngineCostModel(scale=8.4)``
(the ratio), 327,680 KV bytes per token (the calibration's ``llama70b_kv_bytes_per_token``), 8,192 KV blocks of
16 tokens (the simulated engines' default, 40 GiB of KV), ``max_num_seqs`` 128, ``max_num_batched_tokens`` 8,192
and a 16,384-token context. Profile ``llama8b-h200`` is the cost model unscaled (each engine then serves several
times more requests at the same contention, so a simulation takes correspondingly longer).

*Clusters*: E1/E2 two clusters of 16 engines, 2 ms away; E3 one local cluster of 16 engines (1 ms) and a remote
one of 8 engines 40 ms away.

*Workload* (:mod:`loadgen.workloads`): Poisson arrivals; half are interactive single calls (ShareGPT-like
lengths, TTFT target 2 s), half multi-agent workflows drawn evenly from the seven built-in templates (ChatDev,
MetaGPT, AutoGen group chat, Magentic-One, ReAct tool loop, map-reduce research, debate). A workflow's deadline
is ``deadline_scale`` (12) x its reference critical path (10 ms per output token, 10,000 prompt tokens/s:
"one unloaded engine" of an 8B model), i.e. about 1.5-2x what it takes on the 70B-class engines at moderate
load. Clients declare no ``max_tokens`` (ChatDev asks for the whole remaining context, as the OpenAI SDK's
default does), so ``max_tokens`` admission reserves the context window; ``--declared-max-tokens 4096`` changes it.

*Predictor*: ``--predictor PATH`` (a model from ``maestro predictor train``); without it the per-role priors.

The experiments
---------------
E1  SLO attainment under contention (predicted admission, latency_aware routing): the load is swept; "high
    contention" is the swept load where EDF meets 40-60% of workflow deadlines (closest to 50%). Reported per
    queue policy (fcfs, edf, lsf, maestro): workflow deadline attainment, request SLO attainment (all
    requests, and interactive calls alone), p50/p99 TTFT. Target: maestro >= EDF + 25 points.
E2  KV reservation: ``max_tokens`` vs ``predicted`` admission (queue maestro) on the same workload at several
    loads: time-averaged and peak reserved KV bytes, the saving, preemptions, attainment. Target: >= 67% less
    reserved KV at equal (within half a point) or better attainment, preemptions on <= 1% of requests.
E3  Cross-cluster routing: ``round_robin`` vs ``least_loaded`` vs ``latency_aware`` on two unequal clusters
    (queue maestro, predicted admission).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loadgen.des import ClusterSpec, EngineSpec, PoolSpec, SimConfig, SimProgress, load_predictor, simulate
from loadgen.results import RunResult, announce_replacing, json_bytes, prepare_output, quantile, write_atomically
from loadgen.slo import add_gateway_config_argument, check_workload_slo_classes, slo_classes_from_args
from loadgen.workload import Step, Workflow, Workload, load_workload

# --------------------------------------------------------------------------------------------------- setup

# 37.58 ms (Llama-70B-shaped decode step at batch 1, one-GPU equivalent) / 4.47 ms (the 8B fit's base step)
LLAMA70B_COST_SCALE = 8.4

ENGINE_PROFILES: dict[str, EngineSpec] = {
    "llama70b-h200": EngineSpec(max_num_seqs=128, kv_blocks=8192, block_size=16, max_num_batched_tokens=8192,
                                max_model_len=16384, cost_scale=LLAMA70B_COST_SCALE, kv_bytes_per_token=327680),
    "llama8b-h200": EngineSpec(max_num_seqs=128, kv_blocks=8192, block_size=16, max_num_batched_tokens=8192,
                               max_model_len=16384, cost_scale=1.0, kv_bytes_per_token=None),
}
DEFAULT_PROFILE = "llama70b-h200"
DEFAULT_TEMPLATES = ("chatdev", "metagpt", "autogen-groupchat", "magentic-one", "react-tools", "map-reduce",
                     "debate")
POLICIES_E1 = ("fcfs", "edf", "lsf", "maestro")
ATTAINMENT_TOLERANCE = 0.005  # E2: attainments within half a point count as equal


@dataclass
class WorkloadParams:
    rate: float = 8.0  # arrivals per second (workflows and interactive calls together)
    duration_s: float = 3600.0
    seed: int = 7
    interactive_share: float = 0.5
    deadline_scale: float | None = 12.0  # None or 0: no deadline per workflow, the SLO class default applies
    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    context_len: int = 16384
    declared_max_tokens: int | None = None  # None: clients declare none (= the context left)
    arrival: str = "poisson"

    def validate(self) -> None:
        """Raise ``ValueError`` for what the generator would misread: ``declared_max_tokens`` 0 used to mean
        "none declared" without a word (a client cannot declare 0 tokens)."""
        if self.declared_max_tokens is not None and not self.declared_max_tokens >= 1:
            raise ValueError(f"declared max tokens must be >= 1 (leave it out for none declared), "
                             f"got {self.declared_max_tokens!r}")
        if self.deadline_scale is not None and not self.deadline_scale >= 0:
            raise ValueError(f"deadline scale must be >= 0 (0: the SLO class default), got {self.deadline_scale!r}")


def make_workload(params: WorkloadParams) -> Workload:
    """The experiment workload: :mod:`loadgen.workloads`' generator, or a small built-in one without it."""
    params.validate()
    try:
        from loadgen.workloads.builder import WorkloadSpec, build_workload
    except ImportError:  # pragma: no cover - the generator ships with the repo
        return _fallback_workload(params)
    spec = WorkloadSpec(templates={name: 1.0 for name in params.templates}, interactive_share=params.interactive_share,
                        rate=params.rate, duration_s=params.duration_s, arrival=params.arrival, seed=params.seed,
                        # 0 means the SLO class default, as in `loadgen workload` (the spec's None)
                        deadline_scale=params.deadline_scale or None, context_len=params.context_len,
                        max_tokens=params.declared_max_tokens or (1 << 30))
    workload = build_workload(spec)
    workload.meta["params"] = asdict(params)
    return workload


def _fallback_workload(params: WorkloadParams) -> Workload:
    """Chains planner -> coder -> reviewer -> tester plus interactive calls, Poisson arrivals (no data needed)."""
    import random

    rng = random.Random(params.seed)
    chain = (("planner", 900, 150), ("coder", 1500, 550), ("reviewer", 1800, 300), ("coder", 2400, 550),
             ("tester", 2000, 250))
    workflows: list[Workflow] = []
    t = 0.0
    i = 0
    while True:
        t += rng.expovariate(params.rate)
        if t >= params.duration_s:
            break
        if rng.random() < params.interactive_share:
            prompt = max(1, int(rng.lognormvariate(math.log(800) - 0.5, 1.0)))
            output = max(1, int(rng.lognormvariate(math.log(250) - 0.32, 0.8)))
            prompt = min(prompt, params.context_len // 2)
            output = min(output, 4096)
            cap = params.declared_max_tokens or (params.context_len - prompt - 64)
            workflows.append(Workflow(f"chat-{i:05d}", round(t, 6), [Step("call", "assistant", output, prompt,
                                                                          max_tokens=max(output, cap))],
                                      kind="interactive", slo_class="interactive"))
        else:
            steps = []
            ref = 0.0
            for j, (role, prompt, out) in enumerate(chain):
                output = max(1, int(out * rng.lognormvariate(-0.03, 0.25)))
                cap = params.declared_max_tokens or (params.context_len - prompt - 64)
                steps.append(Step(f"s{j}", role, output, prompt, depends_on=(f"s{j - 1}",) if j else (),
                                  max_tokens=max(output, cap)))
                ref += prompt / 10000.0 + output * 0.01
            deadline = round(params.deadline_scale * ref, 3) if params.deadline_scale else None
            workflows.append(Workflow(f"chain-{i:05d}", round(t, 6), steps, deadline_s=deadline))
        i += 1
    return Workload(workflows, name="fallback-chain-mix", seed=params.seed, meta={"params": asdict(params)})


def cluster_specs(layout: str, profile: str = DEFAULT_PROFILE) -> list[ClusterSpec]:
    """``name:engines:rtt_ms[,...]`` (e.g. ``c0:16:2,c1:16:2``), or ``e1`` / ``e3`` for the experiments' setups."""
    engine = ENGINE_PROFILES[profile]
    presets = {"e1": "c0:16:2,c1:16:2", "e3": "local:16:1,remote:8:40"}
    layout = presets.get(layout.lower(), layout)
    clusters = []
    for part in layout.split(","):
        fields = part.strip().split(":")
        if len(fields) != 3:
            raise ValueError(f"cluster {part!r}: expected name:engines:rtt_ms")
        try:
            name, engines, rtt_ms = fields[0], int(fields[1]), float(fields[2])
        except ValueError:
            raise ValueError(f"cluster {part!r}: engines must be an integer and rtt_ms a number") from None
        clusters.append(ClusterSpec(name, rtt_s=rtt_ms / 1000.0, pools=(PoolSpec("llm", engines, engine),)))
    return clusters


@dataclass
class RunSpec:
    """One simulation: what to run, picklable for worker processes."""

    label: str
    workload: WorkloadParams
    queue: str = "maestro"
    admission: str = "predicted"
    routing: str = "latency_aware"
    clusters: str = "e1"
    profile: str = DEFAULT_PROFILE
    predictor: str | None = None
    queue_options: dict[str, Any] = field(default_factory=dict)
    sample_interval_s: float = 1.0
    keep_run: bool = False  # return the whole RunResult (for simulate); else only the summary


_PREDICTORS: dict[str | None, Any] = {}


def _predictor(path: str | None) -> Any:
    if path not in _PREDICTORS:
        _PREDICTORS[path] = load_predictor(path)
    return _PREDICTORS[path]


def execute(spec: RunSpec) -> dict[str, Any]:
    """Build the workload, simulate, summarise (runs in a worker process when ``--jobs`` > 1)."""
    started = time.perf_counter()
    workload = make_workload(spec.workload)
    config = SimConfig(clusters=cluster_specs(spec.clusters, spec.profile), queue_policy=spec.queue,
                       queue_options=dict(spec.queue_options), admission=spec.admission,
                       cluster_routing=spec.routing, sample_interval_s=spec.sample_interval_s)
    run = simulate(workload, config, _predictor(spec.predictor))
    run.meta["rate"] = spec.workload.rate  # the nominal rate swept; meta["load"] is what was generated
    run.meta["label"] = spec.label
    run.policy["label"] = spec.label
    out = {"label": spec.label, "rate": spec.workload.rate, "queue": spec.queue, "admission": spec.admission,
           "routing": spec.routing, "clusters": spec.clusters, "summary": summarize(run),
           "wall_s": time.perf_counter() - started}
    if spec.keep_run:
        out["run"] = run
    return out


def summarize(run: RunResult) -> dict[str, Any]:
    """The figures the experiments report, from one run."""
    base = run.summary()
    requests = run.requests
    interactive = [r for r in requests if r.workflow_id is None]
    steps = [r for r in requests if r.workflow_id is not None]
    # TTFT of the successful requests only, as RunResult.summary and the report take it: a request that failed
    # after its first token is a failure, not a latency sample (the simulator's requests all succeed; a live run
    # read here would otherwise mix the two rules in one table)
    ttft = [r.ttft for r in requests if r.status == "ok" and r.ttft is not None]
    ittft = [r.ttft for r in interactive if r.status == "ok" and r.ttft is not None]

    kv = run.meta.get("kv", {})
    workflows = [w for w in run.workflows if w.kind == "workflow"]
    by_template: dict[str, list[bool]] = {}
    for w in workflows:
        by_template.setdefault(w.workflow_id.rsplit("-", 1)[0], []).append(w.met())
    return {
        "requests": len(requests),
        "workflows": len(workflows),
        "workflow_attainment": base["workflow_deadline_attainment"],
        "request_attainment": base["request_slo_attainment"],
        "interactive_attainment": (sum(r.slo_met() for r in interactive) / len(interactive)) if interactive else None,
        "interactive_ttft_attainment": (sum(1 for r in interactive if r.ttft is not None and r.ttft_target_s is not None
                                            and r.ttft <= r.ttft_target_s) / len(interactive)) if interactive else None,
        "step_attainment": (sum(r.slo_met() for r in steps) / len(steps)) if steps else None,
        "p50_ttft_s": quantile(ttft, 0.5),
        "p99_ttft_s": quantile(ttft, 0.99),
        "interactive_p99_ttft_s": quantile(ittft, 0.99),
        "mean_e2e_s": base["mean_e2e_s"],
        "preempted_requests": base["preempted_requests"],
        "preempted_share": (base["preempted_requests"] / len(requests) if requests else 0.0)
        if base["preempted_requests"] is not None else None,  # None: a live run, which cannot see them
        "preemptions": sum(r.preemptions for r in requests),
        "reserved_mean_bytes": kv.get("reserved_mean_bytes"),
        "reserved_peak_bytes": kv.get("reserved_peak_tokens", 0) * kv.get("kv_bytes_per_token", 0),
        "used_mean_bytes": kv.get("used_mean_bytes"),
        "capacity_bytes": kv.get("capacity_tokens", 0) * kv.get("kv_bytes_per_token", 0),
        "growths": kv.get("growths"),
        "attainment_by_template": {k: sum(v) / len(v) for k, v in sorted(by_template.items())},
        "simulated_s": run.meta.get("simulated_s"),
        "sim_wall_s": run.meta.get("wall_s"),
        "events": run.meta.get("events"),
    }


def run_all(specs: list[RunSpec], jobs: int) -> list[dict[str, Any]]:
    """Run the specs (in ``jobs`` processes), results in the order given."""
    if jobs <= 1 or len(specs) <= 1:
        results = []
        for spec in specs:
            results.append(execute(spec))
            _progress(results[-1])
        return results
    results = []
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        for r in pool.map(execute, specs):
            _progress(r)
            results.append(r)
    return results


def _progress(result: dict[str, Any]) -> None:
    s = result["summary"]
    print(f"  {result['label']:<40} workflows {_pct(s['workflow_attainment'])}  requests "
          f"{_pct(s['request_attainment'])}  ({result['wall_s']:.1f} s)", file=sys.stderr)


# --------------------------------------------------------------------------------------------------- tables


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _sec(value: float | None) -> str:
    return "-" if value is None else (f"{value:.2f}" if value < 100 else f"{value:,.0f}")


def _gib(value: float | None) -> str:
    return "-" if value is None else f"{value / 2 ** 30:,.1f}"


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def attainment_table(results: list[dict[str, Any]], key: str = "queue") -> str:
    rows = []
    for r in results:
        s = r["summary"]
        rows.append([str(r[key]), f"{r['rate']:g}", _pct(s["workflow_attainment"]), _pct(s["request_attainment"]),
                     _pct(s["interactive_attainment"]), _pct(s["interactive_ttft_attainment"]),
                     _sec(s["p50_ttft_s"]), _sec(s["p99_ttft_s"]), _pct(s["preempted_share"])])
    return markdown([key, "load (arrivals/s)", "workflow deadlines met", "request SLOs met", "interactive SLOs met",
                     "interactive TTFT met", "p50 TTFT s", "p99 TTFT s", "preempted requests"], rows)


# --------------------------------------------------------------------------------------------------- common CLI


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--duration", type=float, default=3600.0, help="arrival window, simulated seconds")
    parser.add_argument("--seed", type=int, default=7, help="random seed of the generated workload")
    parser.add_argument("--predictor", help="trained predictor model file (default: per-role priors)")
    parser.add_argument("--profile", default=DEFAULT_PROFILE, choices=sorted(ENGINE_PROFILES),
                        help="the engines' cost model (llama70b-h200: a 70B-class model on H200)")
    parser.add_argument("--interactive-share", type=float, default=0.5,
                        help="share of the generated arrivals that are interactive calls")
    parser.add_argument("--deadline-scale", type=float, default=12.0,
                        help="workflow deadline = this x the reference critical path (12); 0 = the SLO class default")
    parser.add_argument("--declared-max-tokens", type=int, default=None,
                        help="max_tokens every client declares, >= 1 (default: none, i.e. the context left)")
    parser.add_argument("--templates", default=",".join(DEFAULT_TEMPLATES), help="comma-separated template names")


def _workload_params(args: argparse.Namespace, rate: float) -> WorkloadParams:
    params = WorkloadParams(rate=rate, duration_s=args.duration, seed=args.seed,
                            interactive_share=args.interactive_share, deadline_scale=args.deadline_scale,
                            templates=tuple(t for t in args.templates.split(",") if t),
                            declared_max_tokens=args.declared_max_tokens)
    params.validate()  # here, in this process, before any simulation starts
    return params


def queue_options(text: str) -> dict[str, Any]:
    """``--queue-options``: a JSON object whose numbers are all finite (an ``argparse`` type: a bad value is a
    usage error before anything runs).

    ``Infinity``, ``NaN`` (which Python's JSON reader accepts) and ``1e400`` (read as infinity) are refused: the
    policies take ``null`` for "no bound" (e.g. ``max_wait_s``: no aging), and an infinite value in the run's
    metadata could not be written as JSON."""
    def refuse(token: str) -> Any:
        raise ValueError(f"{token} is not a JSON number (use null for none)")

    try:
        options = json.loads(text, parse_constant=refuse)
    except ValueError as exc:  # JSONDecodeError is a ValueError too
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from None
    if not isinstance(options, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {text!r:.60}")

    def check(value: Any, where: str) -> None:
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{where} must be a finite number (null for none), got {value!r}")
        if isinstance(value, dict):
            for key, item in value.items():
                check(item, f"{where}.{key}" if where else key)
        elif isinstance(value, list):
            for i, item in enumerate(value):
                check(item, f"{where}[{i}]")

    check(options, "")
    return options


def _rates(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _write(path: str | None, data: dict[str, Any]) -> None:
    if not path:
        return
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(target, json_bytes(data))
    print(f"wrote {target}", file=sys.stderr)


# --------------------------------------------------------------------------------------------------- simulate


class _DefaultsShown(argparse.HelpFormatter):
    """Help that ends with each option's default, unless it has none or already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text or action.default is None or action.default is False
                or action.default == argparse.SUPPRESS or not action.option_strings):
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


def add_simulate_arguments(parser: argparse.ArgumentParser) -> None:
    """``maestro loadgen simulate``: one discrete-event simulation of a workload file or a generated one."""
    # the defaults are E1's setup, not the embedded gateway's: --help says so, and what each one is
    parser.formatter_class = _DefaultsShown
    parser.description = ("By default this simulates the experiments' setup (E1): 2 clusters x 16 engines of a "
                          "70B-class model, queue 'maestro', admission 'predicted', routing 'latency_aware'. To "
                          "mirror a gateway, give its settings, e.g. for `maestro serve` on its embedded default: "
                          "--profile llama8b-h200 --queue fcfs --admission none --clusters local:4:0")
    parser.add_argument("--workload", help="workload file (maestro-workload/1); default: generate one (--rate)")
    parser.add_argument("--rate", type=float, default=8.0, help="arrivals per second of the generated workload")
    parser.add_argument("--queue", default="maestro", help="queue policy: fcfs | edf | maestro | lsf")
    parser.add_argument("--queue-options", default={}, type=queue_options,
                        help="JSON object of the queue policy's options, e.g. '{\"max_wait_s\": 900}' "
                             "(finite numbers; null for none)")
    parser.add_argument("--admission", default="predicted", choices=("none", "max_tokens", "predicted"),
                        help="KV admission: none | max_tokens (worst case) | predicted")
    parser.add_argument("--routing", default="latency_aware", help="round_robin | least_loaded | latency_aware")
    parser.add_argument("--clusters", default="e1",
                        help="name:engines:rtt_ms[,...] or e1 (2x16, 2 ms) / e3 (16 at 1 ms + 8 at 40 ms)")
    parser.add_argument("--sample-interval", type=float, default=1.0, help="KV time-series period, seconds")
    parser.add_argument("--reference", action="store_true", help="plain PoolScheduler (slow; for checking)")
    parser.add_argument("--out", "-o", help="write the RunResult JSON here")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress line on stderr (one every 2 s of a long run otherwise)")
    add_gateway_config_argument(parser)
    _add_common(parser)  # no --jobs: one simulation runs in one process


class _SimulateProgress:
    """The progress line of ``maestro loadgen simulate`` on stderr: rewritten in place on a terminal, one line
    a report otherwise (a log file)."""

    def __init__(self) -> None:
        self.last: SimProgress | None = None
        self._tty = sys.stderr.isatty()

    def __call__(self, report: SimProgress) -> None:
        self.last = report
        if report.simulated_s <= report.window_s:
            when = f"{report.simulated_s:,.0f} of {report.window_s:,.0f} s simulated"
        else:  # the arrivals are over: what is left runs down
            when = f"{report.simulated_s:,.0f} s simulated (arrivals ended at {report.window_s:,.0f} s)"
        line = (f"[simulate] {when}, {report.workflows_done:,}/{report.workflows:,} workflows done, "
                f"{report.queued:,} queued, {report.events:,} events, {report.wall_s:.0f} s wall")
        print("\r" + line if self._tty else line, end="" if self._tty else "\n", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._tty and self.last is not None:
            print(file=sys.stderr)


def simulate_main(args: argparse.Namespace) -> int:
    progress: _SimulateProgress | None = None
    try:
        if args.out:
            prepare_output(args.out, inputs=(args.workload, args.gateway_config, args.predictor))
        slo_classes = slo_classes_from_args(args)
        if args.workload:
            workload = load_workload(args.workload)
        else:
            workload = make_workload(_workload_params(args, args.rate))
        check_workload_slo_classes(workload, slo_classes)
        config = SimConfig(clusters=cluster_specs(args.clusters, args.profile), queue_policy=args.queue,
                           queue_options=dict(args.queue_options), admission=args.admission,
                           cluster_routing=args.routing, sample_interval_s=args.sample_interval,
                           reference=args.reference, slo_classes=slo_classes)
        announce_replacing(args.out)
        progress = None if args.no_progress else _SimulateProgress()
        try:
            run = simulate(workload, config, load_predictor(args.predictor), progress=progress)
        finally:
            if progress is not None:
                progress.close()
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        where = f" at {progress.last.simulated_s:,.0f} s of simulated time" if progress and progress.last else ""
        kept = f"; {args.out} is left as it was" if args.out and Path(args.out).exists() else ""
        print(f"maestro: simulation interrupted{where}; nothing written{kept}", file=sys.stderr)
        return 130
    if not args.workload:
        run.meta["rate"] = args.rate  # the nominal rate asked for; meta["load"] is what was generated
    run.policy["label"] = f"{args.queue}/{args.admission}/{args.routing}"
    s = summarize(run)
    try:  # the same table as `maestro loadgen report` (live and simulated runs side by side)
        from loadgen.report import markdown_table, summarize as report_row

        print(markdown_table([report_row(run, Path(args.out).stem if args.out else "simulate")]))
    except ImportError:  # pragma: no cover - report.py ships with the repo
        print(attainment_table([{"queue": args.queue, "rate": run.meta.get("load") or float("nan"), "summary": s}]))
    print()
    # arrival-window figures (E2's), in GiB: not the whole-run token figures of the table above
    print(markdown(["reserved KV mean GiB (arrival window)", "reserved KV peak GiB",
                    "used KV mean GiB (arrival window)", "capacity GiB", "simulated s", "wall s", "events"],
                   [[_gib(s["reserved_mean_bytes"]), _gib(s["reserved_peak_bytes"]), _gib(s["used_mean_bytes"]),
                     _gib(s["capacity_bytes"]), _sec(s["simulated_s"]), f"{s['sim_wall_s']:.1f}",
                     f"{s['events']:,}"]]))
    if args.out:
        target = Path(args.out)
        try:
            write_atomically(target, json_bytes(run.to_json()))
        except OSError as exc:
            print(f"error: cannot write {target}: {exc.strerror or exc}", file=sys.stderr)
            return 2
        print(f"wrote {target}", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------------------------------- experiments


def add_experiment_arguments(parser: argparse.ArgumentParser) -> None:
    """``maestro loadgen experiment E1|E2|E3``."""
    parser.add_argument("experiment", choices=("E1", "E2", "E3", "E4", "e1", "e2", "e3", "e4"))
    parser.add_argument("--rates", help="loads to sweep, arrivals/s, comma-separated (default per experiment)")
    parser.add_argument("--policies", help="E1: queue policies (default fcfs,edf,lsf,maestro)")
    parser.add_argument("--queue", default="maestro", help="E2/E3: queue policy")
    parser.add_argument("--out", "-o", help="JSON result file (default: results/<experiment>.json)")
    parser.add_argument("--jobs", type=int, default=1, help="E1-E3: simulations run in parallel processes")
    _add_common(parser)
    from loadgen.fidelity import add_e4_arguments  # E4 (simulator fidelity, live vs simulated) is loadgen.fidelity

    add_e4_arguments(parser)


def experiment_main(args: argparse.Namespace) -> int:
    name = args.experiment.upper()
    out = args.out if args.out is not None else f"results/{name}.json"
    started = time.perf_counter()
    try:
        if out:
            prepare_output(out, inputs=(args.predictor,))  # now, not after the sweep
            announce_replacing(out)
        if name == "E1":
            data = experiment_e1(args)
        elif name == "E2":
            data = experiment_e2(args)
        elif name == "E3":
            data = experiment_e3(args)
        else:
            from loadgen.fidelity import experiment_e4

            data = experiment_e4(args)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    data["wall_s"] = time.perf_counter() - started
    data["command"] = " ".join(["maestro", "loadgen", "experiment"] + sys.argv[sys.argv.index(args.experiment):]
                               if args.experiment in sys.argv else [name])
    print(data["markdown"])
    _write(out, data)
    return 0


def _setup(args: argparse.Namespace) -> dict[str, Any]:
    return {"duration_s": args.duration, "seed": args.seed, "profile": args.profile,
            "engine": asdict(ENGINE_PROFILES[args.profile]), "predictor": args.predictor or "per-role priors",
            "interactive_share": args.interactive_share, "deadline_scale": args.deadline_scale,
            "declared_max_tokens": args.declared_max_tokens, "templates": args.templates}


def experiment_e1(args: argparse.Namespace) -> dict[str, Any]:
    rates = _rates(args.rates or "5,6,6.5,7,8,9")
    policies = [p for p in (args.policies or ",".join(POLICIES_E1)).split(",") if p]
    print(f"E1: {len(rates)} loads x {len(policies)} policies, {args.duration:g} s each", file=sys.stderr)
    specs = [RunSpec(f"{policy}@{rate:g}", _workload_params(args, rate), queue=policy, clusters="e1",
                     profile=args.profile, predictor=args.predictor, sample_interval_s=0.0)
             for rate in rates for policy in policies]
    results = run_all(specs, args.jobs)
    by_rate: dict[float, dict[str, dict[str, Any]]] = {}
    for r in results:
        by_rate.setdefault(r["rate"], {})[r["queue"]] = r
    # high contention: the swept load where EDF meets 40-60% of workflow deadlines (closest to 50%)
    high = None
    if "edf" in policies:
        candidates = [(abs(v["edf"]["summary"]["workflow_attainment"] - 0.5), rate) for rate, v in by_rate.items()
                      if v["edf"]["summary"]["workflow_attainment"] is not None
                      and 0.4 <= v["edf"]["summary"]["workflow_attainment"] <= 0.6]
        if candidates:
            high = min(candidates)[1]
    sweep_rows = []
    for rate in rates:
        row = [f"{rate:g}"]
        for policy in policies:
            s = by_rate[rate][policy]["summary"]
            row.append(f"{_pct(s['workflow_attainment'])} / {_pct(s['request_attainment'])}")
        sweep_rows.append(row)
    text = ["## E1: SLO attainment vs load (workflow deadlines met / request SLOs met)", "",
            markdown(["load (arrivals/s)"] + policies, sweep_rows), ""]
    targets: dict[str, Any] = {"high_contention_rate": high}
    if high is not None:
        at = [by_rate[high][p] for p in policies]
        text += [f"## E1 at high contention (load {high:g}/s: EDF meets "
                 f"{_pct(by_rate[high]['edf']['summary']['workflow_attainment'])} of workflow deadlines)", "",
                 attainment_table(at), ""]
        edf = by_rate[high]["edf"]["summary"]["workflow_attainment"]
        for p in policies:
            if p.startswith("maestro"):
                gain = by_rate[high][p]["summary"]["workflow_attainment"] - edf
                targets[f"{p}_minus_edf_points"] = round(100 * gain, 1)
                targets[f"{p}_meets_target"] = gain >= 0.25
        text.append("Target: maestro >= EDF + 25 points. " + ", ".join(
            f"{p}: {targets[f'{p}_minus_edf_points']:+.1f} points ({'met' if targets[f'{p}_meets_target'] else 'missed'})"
            for p in policies if p.startswith("maestro")))
    else:
        text.append("No swept load has EDF at 40-60% workflow deadline attainment; widen --rates.")
    return {"experiment": "E1", "setup": _setup(args), "rates": rates, "policies": policies,
            "runs": [_strip(r) for r in results], "targets": targets, "markdown": "\n".join(text)}


def experiment_e2(args: argparse.Namespace) -> dict[str, Any]:
    rates = _rates(args.rates or "1,2,4,7")
    admissions = ("max_tokens", "predicted")
    print(f"E2: {len(rates)} loads x {admissions}, queue {args.queue}", file=sys.stderr)
    specs = [RunSpec(f"{adm}@{rate:g}", _workload_params(args, rate), queue=args.queue, admission=adm,
                     clusters="e1", profile=args.profile, predictor=args.predictor)
             for rate in rates for adm in admissions]
    results = run_all(specs, args.jobs)
    by = {(r["rate"], r["admission"]): r["summary"] for r in results}
    rows = []
    verdicts = []
    for rate in rates:
        mt, pr = by[(rate, "max_tokens")], by[(rate, "predicted")]
        saving = 1 - pr["reserved_mean_bytes"] / mt["reserved_mean_bytes"] if mt["reserved_mean_bytes"] else None
        peak_saving = 1 - pr["reserved_peak_bytes"] / mt["reserved_peak_bytes"] if mt["reserved_peak_bytes"] else None
        # "equal": within ATTAINMENT_TOLERANCE (a handful of requests out of tens of thousands)
        equal_or_better = (_not_worse(pr["workflow_attainment"], mt["workflow_attainment"])
                           and _not_worse(pr["request_attainment"], mt["request_attainment"]))
        ok = saving is not None and saving >= 0.67 and equal_or_better and pr["preempted_share"] <= 0.01
        verdicts.append({"rate": rate, "saving": saving, "peak_saving": peak_saving,
                         "equal_or_better_attainment": equal_or_better, "preempted_share": pr["preempted_share"],
                         "meets_target": ok})
        for adm, s in (("max_tokens", mt), ("predicted", pr)):
            rows.append([f"{rate:g}", adm, _gib(s["reserved_mean_bytes"]), _gib(s["reserved_peak_bytes"]),
                         _gib(s["used_mean_bytes"]), _pct(s["workflow_attainment"]), _pct(s["request_attainment"]),
                         f"{s['preemptions']} ({_pct(s['preempted_share'])})",
                         _pct(saving) if adm == "predicted" else "", "yes" if (ok and adm == "predicted") else ""])
    capacity = results[0]["summary"]["capacity_bytes"] if results else 0
    text = [f"## E2: KV reservation, max_tokens vs predicted admission (queue {args.queue}; KV capacity "
            f"{_gib(capacity)} GiB over 32 engines)", "",
            markdown(["load (arrivals/s)", "admission", "reserved KV mean GiB", "reserved KV peak GiB",
                      "used KV mean GiB", "workflow deadlines met", "request SLOs met", "preemptions (requests)",
                      "reserved saving", "target met"], rows), "",
            "Target: >= 67% less reserved KV (time-averaged over the arrival window) at equal (within "
            f"{100 * ATTAINMENT_TOLERANCE:g} points) or better attainment, preemptions on <= 1% of requests."]
    return {"experiment": "E2", "setup": _setup(args), "rates": rates, "queue": args.queue,
            "runs": [_strip(r) for r in results], "verdicts": verdicts, "markdown": "\n".join(text)}


def _not_worse(value: float | None, baseline: float | None) -> bool:
    """``value`` within ATTAINMENT_TOLERANCE of ``baseline`` or better. None is an attainment over nothing (no
    workflows, e.g. ``--interactive-share 1``): both None compare equal, and one None alone cannot be judged."""
    if value is None or baseline is None:
        return value is None and baseline is None
    return value >= baseline - ATTAINMENT_TOLERANCE


def experiment_e3(args: argparse.Namespace) -> dict[str, Any]:
    rates = _rates(args.rates or "3,4,5")
    routings = ("round_robin", "least_loaded", "latency_aware")
    print(f"E3: {len(rates)} loads x {routings}, queue {args.queue}", file=sys.stderr)
    specs = [RunSpec(f"{routing}@{rate:g}", _workload_params(args, rate), queue=args.queue, routing=routing,
                     clusters="e3", profile=args.profile, predictor=args.predictor, sample_interval_s=0.0)
             for rate in rates for routing in routings]
    results = run_all(specs, args.jobs)
    text = ["## E3: cross-cluster routing (local: 16 engines, 1 ms; remote: 8 engines, 40 ms; queue "
            f"{args.queue}, predicted admission)", "", attainment_table(results, key="routing")]
    return {"experiment": "E3", "setup": _setup(args), "rates": rates, "queue": args.queue,
            "runs": [_strip(r) for r in results], "markdown": "\n".join(text)}


def _strip(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k != "run"}


def main(argv: list[str] | None = None) -> int:  # python -m loadgen.experiments {simulate|experiment} ...
    parser = argparse.ArgumentParser(prog="python -m loadgen.experiments")
    sub = parser.add_subparsers(dest="command", required=True)
    add_simulate_arguments(sub.add_parser("simulate"))
    add_experiment_arguments(sub.add_parser("experiment"))
    args = parser.parse_args(argv)
    return simulate_main(args) if args.command == "simulate" else experiment_main(args)


if __name__ == "__main__":
    sys.exit(main())
