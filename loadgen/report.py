"""Reports from RunResult JSON files (live or simulated): a Markdown table and PNG plots.

``write_report(paths, out_dir)`` reads every file, and writes into ``out_dir``:

- ``report.md``: one row per run (sorted by policy, then load): policy, load, requests, request SLO attainment,
  workflow deadline attainment, mean and p99 end-to-end latency, p99 TTFT, preemptions (total, and requests
  preempted at least once), reserved KV tokens mean / peak (from the run's ``series``, when present);
- ``slo_vs_load.png``: request SLO attainment and workflow deadline attainment against load, one line per policy;
- ``latency_cdf.png``: CDFs of end-to-end latency and TTFT of the successful requests, one curve per run;
- ``kv_<run>.png``: reserved vs used KV over time, for each run whose ``series`` has them.

Conventions read from a RunResult: the policy label is ``policy["label"]`` when given, else ``key=value`` pairs of
``policy`` (else the file name); the load is ``meta["load"]`` (offered arrivals per second; the live runner
writes it from the workload spec's rate), else ``meta["rate"]``, else the arrivals of the run's workflow records
over their time span; reserved KV mean / peak come from ``meta["kv"]["reserved_mean_tokens"]`` /
``["reserved_peak_tokens"]`` when present (the simulator's figures), else from the series; a series whose name
contains ``reserved`` is reserved KV and one whose name contains ``used`` is used KV (e.g. the simulator's
``reserved_kv_tokens`` / ``used_kv_tokens``, or per engine ``used_kv_tokens/engine-0``), each a list of
``[time_s, value]`` points.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import orjson

from loadgen.results import RequestResult, RunResult, WorkflowResult

_REQUEST_FIELDS = {f.name for f in fields(RequestResult)}
_WORKFLOW_FIELDS = {f.name for f in fields(WorkflowResult)}
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


class ReportError(ValueError):
    """A result file cannot be read; the message names it."""


def run_from_json(data: dict[str, Any]) -> RunResult:
    """Rebuild a :class:`RunResult` from its ``to_json()`` form (unknown keys are ignored)."""
    try:
        requests = [RequestResult(**{k: v for k, v in r.items() if k in _REQUEST_FIELDS})
                    for r in data.get("requests") or ()]
        workflows = [WorkflowResult(**{k: v for k, v in w.items() if k in _WORKFLOW_FIELDS})
                     for w in data.get("workflows") or ()]
    except TypeError as exc:
        raise ReportError(f"malformed request or workflow record: {exc}") from None
    series = {str(k): [(float(p[0]), float(p[1])) for p in v] for k, v in (data.get("series") or {}).items()}
    return RunResult(mode=str(data.get("mode", "?")), policy=dict(data.get("policy") or {}), requests=requests,
                     workflows=workflows, series=series, meta=dict(data.get("meta") or {}))


def load_run(path: str | Path) -> RunResult:
    try:
        data = orjson.loads(Path(path).read_bytes())
    except OSError as exc:
        raise ReportError(f"cannot read {path}: {exc.strerror or exc}") from None
    except orjson.JSONDecodeError as exc:
        raise ReportError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or "requests" not in data:
        raise ReportError(f"{path} is not a RunResult file (no 'requests')")
    try:
        return run_from_json(data)
    except ReportError as exc:
        raise ReportError(f"{path}: {exc}") from None


def policy_label(run: RunResult, fallback: str = "run") -> str:
    if run.policy.get("label"):
        return str(run.policy["label"])
    if run.policy:
        return " ".join(f"{k}={v}" for k, v in sorted(run.policy.items()))
    return fallback


def run_load(run: RunResult) -> float | None:
    """Offered load: ``meta["load"]`` / ``meta["rate"]``, else arrivals over their time span (all kinds)."""
    for key in ("load", "rate"):
        value = run.meta.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    arrivals = sorted(w.arrival for w in run.workflows)
    if len(arrivals) >= 2 and arrivals[-1] > arrivals[0]:
        return round((len(arrivals) - 1) / (arrivals[-1] - arrivals[0]), 4)
    return None


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]  # the same rule as RunResult.summary


def _kv_series(run: RunResult, word: str) -> dict[str, list[tuple[float, float]]]:
    return {name: points for name, points in run.series.items() if word in name.lower() and points}


@dataclass
class RunRow:
    name: str
    policy: str
    load: float | None
    mode: str
    requests: int
    requests_ok: int
    request_slo: float | None
    workflows: int
    workflow_deadline: float | None
    mean_e2e: float | None
    p99_e2e: float | None
    p99_ttft: float | None
    preemptions: int
    preempted_requests: int
    reserved_mean: float | None
    reserved_peak: float | None


def summarize(run: RunResult, name: str) -> RunRow:
    summary = run.summary()
    ok = [r for r in run.requests if r.status == "ok"]
    e2e = [r.e2e for r in ok if r.e2e is not None]
    ttft = [r.ttft for r in ok if r.ttft is not None]
    reserved_mean = reserved_peak = None
    kv = run.meta.get("kv") if isinstance(run.meta.get("kv"), dict) else {}
    if isinstance(kv.get("reserved_mean_tokens"), (int, float)):  # the simulator's time-weighted figures
        reserved_mean, reserved_peak = float(kv["reserved_mean_tokens"]), kv.get("reserved_peak_tokens")
    elif reserved := _kv_series(run, "reserved"):
        # several series (e.g. per engine) are added up when they share their sample times
        values = [v for _, v in _sum_series(list(reserved.values()))]
        reserved_mean, reserved_peak = sum(values) / len(values), max(values)
    return RunRow(
        name=name, policy=policy_label(run, name), load=run_load(run), mode=run.mode,
        requests=summary["requests"], requests_ok=summary["requests_ok"],
        request_slo=summary["request_slo_attainment"], workflows=summary["workflows"],
        workflow_deadline=summary["workflow_deadline_attainment"], mean_e2e=summary["mean_e2e_s"],
        p99_e2e=_pct(e2e, 0.99), p99_ttft=_pct(ttft, 0.99),
        preemptions=sum(r.preemptions for r in run.requests), preempted_requests=summary["preempted_requests"],
        reserved_mean=reserved_mean, reserved_peak=reserved_peak)


def _sum_series(series: list[list[tuple[float, float]]]) -> list[tuple[float, float]]:
    if len(series) == 1:
        return series[0]
    times = [t for t, _ in series[0]]
    if all([t for t, _ in s] == times for s in series[1:]):
        return [(t, sum(s[i][1] for s in series)) for i, t in enumerate(times)]
    return series[0]


def _fmt(value: float | None, kind: str = "s") -> str:
    if value is None:
        return "-"
    if kind == "%":
        return f"{100 * value:.1f}%"
    if kind == "n":
        return f"{value:,.0f}"
    if kind == "load":
        return f"{value:g}"
    return f"{value:.3f}"


TABLE_HEADER = ("| run | policy | load | requests (ok) | request SLO | workflow deadline | mean latency s | "
                "p99 latency s | p99 TTFT s | preemptions (requests) | reserved KV mean | reserved KV peak |")


def markdown_table(rows: list[RunRow]) -> str:
    lines = [TABLE_HEADER, "|" + "---|" * TABLE_HEADER.count(" | ") + "---|"]
    for row in rows:
        lines.append(
            f"| {row.name} | {row.policy} | {_fmt(row.load, 'load')} | {row.requests} ({row.requests_ok}) | "
            f"{_fmt(row.request_slo, '%')} | {_fmt(row.workflow_deadline, '%')} | {_fmt(row.mean_e2e)} | "
            f"{_fmt(row.p99_e2e)} | {_fmt(row.p99_ttft)} | {row.preemptions} ({row.preempted_requests}) | "
            f"{_fmt(row.reserved_mean, 'n')} | {_fmt(row.reserved_peak, 'n')} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- plots

def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_slo_vs_load(rows: list[RunRow], path: Path) -> Path | None:
    points = [r for r in rows if r.load is not None]
    if not points:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    policies = sorted({r.policy for r in points})
    for policy in policies:
        mine = sorted((r for r in points if r.policy == policy), key=lambda r: r.load)
        loads = [r.load for r in mine]
        for ax, attr in zip(axes, ("request_slo", "workflow_deadline")):
            values = [getattr(r, attr) for r in mine]
            xs = [x for x, v in zip(loads, values) if v is not None]
            ys = [100 * v for v in values if v is not None]
            if xs:
                ax.plot(xs, ys, marker="o", label=policy)
    for ax, title in zip(axes, ("Request SLO attainment", "Workflow deadline attainment")):
        ax.set_title(title)
        ax.set_xlabel("load (arrivals / s)")
        ax.set_ylabel("%")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_latency_cdfs(runs: list[tuple[str, RunResult]], path: Path) -> Path | None:
    """One curve per run: colour by policy, line style by load (in increasing order)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    policies = sorted({policy_label(run, name) for name, run in runs})
    loads = sorted({run_load(run) for _, run in runs if run_load(run) is not None})
    styles = ("-", "--", ":", "-.")
    colors = plt.rcParams["axes.prop_cycle"].by_key().get("color") or ["C0"]
    drawn = False
    for name, run in runs:
        ok = [r for r in run.requests if r.status == "ok"]
        policy, load = policy_label(run, name), run_load(run)
        label = policy if load is None else f"{policy} @ {_fmt(load, 'load')}"
        color = colors[policies.index(policy) % len(colors)]
        style = styles[loads.index(load) % len(styles)] if load is not None else "-"
        for ax, values in zip(axes, (sorted(r.e2e for r in ok if r.e2e is not None),
                                     sorted(r.ttft for r in ok if r.ttft is not None))):
            if values:
                ys = [(i + 1) / len(values) for i in range(len(values))]
                ax.step(values, ys, where="post", label=label, color=color, linestyle=style, linewidth=1.3)
                drawn = True
    if not drawn:
        plt.close(fig)
        return None
    for ax, title in zip(axes, ("End-to-end latency (successful requests)", "Time to first token")):
        ax.set_title(title)
        ax.set_xlabel("seconds")
        ax.set_ylabel("CDF")
        ax.set_xscale("symlog", linthresh=0.01)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_kv(run: RunResult, name: str, path: Path) -> Path | None:
    reserved, used = _kv_series(run, "reserved"), _kv_series(run, "used")
    if not reserved and not used:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4))
    for series, style in ((reserved, "-"), (used, "--")):
        for key, points in sorted(series.items()):
            ax.plot([p[0] for p in points], [p[1] for p in points], style, label=key, linewidth=1.2)
    load = run_load(run)
    ax.set_title(f"Reserved vs used KV: {policy_label(run, name)}" + ("" if load is None else f" @ load {load:g}"))
    ax.set_xlabel("time (s)")
    ax.set_ylabel("KV tokens")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------- entry points

def write_report(paths: list[str | Path], out_dir: str | Path, title: str = "Maestro load report") -> dict[str, Any]:
    """Read the RunResult files, write ``report.md`` and the PNGs into ``out_dir``; return what was written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs: list[tuple[str, RunResult]] = []
    seen: dict[str, int] = {}
    for path in paths:
        name = Path(path).stem
        if name in seen:
            seen[name] += 1
            name = f"{name}-{seen[name]}"
        else:
            seen[name] = 0
        runs.append((name, load_run(path)))
    rows = sorted((summarize(run, name) for name, run in runs),
                  key=lambda r: (r.policy, r.load if r.load is not None else -1.0, r.name))
    table = markdown_table(rows)
    images: list[Path] = []
    for image in (plot_slo_vs_load(rows, out / "slo_vs_load.png"), plot_latency_cdfs(runs, out / "latency_cdf.png")):
        if image is not None:
            images.append(image)
    for name, run in runs:
        image = plot_kv(run, name, out / f"kv_{_SAFE.sub('_', name)}.png")
        if image is not None:
            images.append(image)
    body = [f"# {title}", "", table, ""]
    body += [f"![{p.stem}]({p.name})" for p in images]
    (out / "report.md").write_text("\n".join(body) + "\n", encoding="utf-8")
    return {"markdown": out / "report.md", "table": table, "images": images, "rows": rows}


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("results", nargs="+", help="RunResult JSON files (from live or simulate)")
    parser.add_argument("--out", "-o", required=True, help="folder for report.md and the PNG plots")
    parser.add_argument("--title", default="Maestro load report", help="heading of report.md")


def report_main(args: argparse.Namespace) -> int:
    try:
        written = write_report(args.results, args.out, args.title)
    except ReportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(written["table"])
    print(f"wrote {written['markdown']} and {len(written['images'])} plot(s) in {args.out}", file=sys.stderr)
    return 0
