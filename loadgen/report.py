"""Reports from RunResult JSON files (live or simulated): a Markdown table and PNG plots.

``write_report(paths, out_dir)`` reads every file, and writes into ``out_dir``:

- ``report.md``: one row per run (sorted by policy, then load): policy, load, requests, request SLO attainment,
  workflow deadline attainment, mean and p99 end-to-end latency, p99 TTFT, preemptions (total, and requests
  preempted at least once; ``-`` for a live run, which cannot see them), reserved KV tokens mean / peak over the
  whole run (see below);
- ``slo_vs_load.png``: request SLO attainment and workflow deadline attainment against load, one line per policy
  (complete runs only: see partial runs below);
- ``latency_cdf.png``: CDFs of end-to-end latency and TTFT of the successful requests, one curve per run;
- ``kv_<run>.png``: reserved vs used KV over time, for each run whose ``series`` has them.

Without a working matplotlib the plots are left out (one warning on stderr, a line in ``report.md``) and the
tables are written all the same.

Conventions read from a RunResult: the policy label is ``policy["label"]`` when given, else ``key=value`` pairs of
``policy`` (else the file name); the load is ``meta["load"]`` (offered arrivals per second of the result's clock,
the time base its latencies are in: the simulator writes :meth:`~loadgen.workload.Workload.offered_load`, a live
run the same on its time base, i.e. ``time_scale`` times it on the wall clock; a live file from before
``meta["workload_load"]`` was recorded held the workload-time figure there, which is scaled here), else
``meta["rate"]``, else the arrivals of the run's workflow records over their time span (the same rule); a
series whose name contains ``reserved`` is reserved KV and one whose name contains ``used`` is used KV (e.g. the
simulator's ``reserved_kv_tokens`` / ``used_kv_tokens``, or per engine ``used_kv_tokens/engine-0``), each a list
of ``[time_s, value]`` points. Reserved KV mean / peak are defined alike for live and simulated runs
(:func:`kv_figures`): the time-weighted mean and the peak of the reserved KV tokens over the whole run. A
simulated run has them exactly in ``meta["kv"]`` (``reserved_mean_tokens_run``, ``reserved_peak_tokens``), which
are used; otherwise (a live run) they come from the reserved series (several series are aligned by time and
added, a total never to its parts: :func:`_sum_series`), an approximation at its sampling period.

Partial runs: a live run that ended before its workload (``meta["end"]`` ``time_limit`` or ``stopped``) is marked
``(partial)`` in the table, explained in a note under it, labelled so in the CDF legend, and left off the load
plot. Its attainments are over what was decided when it stopped (:meth:`~loadgen.results.RunResult.summary`):
requests and workflows the stop cut off (``error:stopped`` / ``error:time_limit``) before their TTFT target or
deadline had passed are left out of the denominators and counted in the note; those that had already missed stay
in, as misses. Steps never reached (``meta.not_due``, ``meta.not_started_steps``) are in no denominator.
"""

from __future__ import annotations

import argparse
import bisect
import re
import sys
from collections.abc import Callable
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

import orjson

from loadgen.results import RequestResult, RunResult, WorkflowResult, quantile, write_atomically
from loadgen.workload import arrival_rate
from predictor.trace import same_file

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


class ReportError(ValueError):
    """A result file cannot be read; the message names it."""


def run_from_json(data: dict[str, Any]) -> RunResult:
    """Rebuild a :class:`RunResult` from its ``to_json()`` form (unknown keys are ignored).

    Everything read is type-checked, so a malformed file is a :class:`ReportError` naming the element rather
    than a TypeError somewhere in the tables."""
    requests = [RequestResult(**_record(r, f"requests[{i}]", _REQUEST_TYPES))
                for i, r in enumerate(_list(data.get("requests"), "requests"))]
    workflows = [WorkflowResult(**_record(w, f"workflows[{i}]", _WORKFLOW_TYPES))
                 for i, w in enumerate(_list(data.get("workflows"), "workflows"))]
    series = {str(name): _points(points, f"series[{name!r}]")
              for name, points in _object(data.get("series"), "series").items()}
    meta = _object(data.get("meta"), "meta")
    _check_meta(meta)
    return RunResult(mode=str(data.get("mode", "?")), policy=_object(data.get("policy"), "policy"),
                     requests=requests, workflows=workflows, series=series, meta=meta)


def _check_meta(meta: dict[str, Any]) -> None:
    """The meta figures the report reads: numbers or null."""
    for key in ("load", "rate"):
        if meta.get(key) is not None and not _is_number(meta[key]):
            raise ReportError(f"meta.{key} must be a number or null, got {meta[key]!r:.60}")
    kv = _object(meta.get("kv"), "meta.kv")
    for key in ("reserved_mean_tokens_run", "reserved_peak_tokens"):
        if kv.get(key) is not None and not _is_number(kv[key]):
            raise ReportError(f"meta.kv.{key} must be a number or null, got {kv[key]!r:.60}")


def _list(value: Any, where: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ReportError(f"'{where}' must be a list")
    return value


def _object(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ReportError(f"'{where}' must be an object")
    return dict(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class _Field:
    nullable: bool
    required: bool
    check: Callable[[Any], bool]
    label: str  # what a message calls the expected type


def _field_types(cls: type) -> dict[str, _Field]:
    """What each field of a record dataclass accepts, from its annotation (``str``, ``float | None``...)."""
    checks: dict[str, tuple[Callable[[Any], bool], str]] = {
        "str": (lambda v: isinstance(v, str), "a string"), "float": (_is_number, "a number"),
        "int": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer")}
    out = {}
    for f in fields(cls):
        parts = [p.strip() for p in str(f.type).split("|")]
        check, label = checks[next(p for p in parts if p != "None")]
        out[f.name] = _Field("None" in parts, f.default is MISSING and f.default_factory is MISSING, check, label)
    return out


_REQUEST_TYPES = _field_types(RequestResult)
_WORKFLOW_TYPES = _field_types(WorkflowResult)


def _record(raw: Any, where: str, types: dict[str, _Field]) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ReportError(f"{where} must be an object, got {raw!r:.60}")
    out = {}
    for key, value in raw.items():
        spec = types.get(key)
        if spec is None:
            continue
        if not ((value is None and spec.nullable) or spec.check(value)):
            raise ReportError(f"{where}.{key} must be {spec.label}{' or null' if spec.nullable else ''}, "
                              f"got {value!r:.60}")
        out[key] = value
    missing = [name for name, spec in types.items() if spec.required and name not in out]
    if missing:
        raise ReportError(f"{where} lacks {', '.join(missing)}")
    return out


def _points(raw: Any, where: str) -> list[tuple[float, float]]:
    if not isinstance(raw, list):
        raise ReportError(f"{where} must be a list of [time_s, value] points")
    points = []
    for i, point in enumerate(raw):
        if not (isinstance(point, (list, tuple)) and len(point) == 2 and all(map(_is_number, point))):
            raise ReportError(f"{where}[{i}] must be a [time_s, value] pair of numbers, got {point!r:.60}")
        points.append((float(point[0]), float(point[1])))
    return points


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
    """Offered load on the result's clock: ``meta["load"]`` / ``meta["rate"]``, else arrivals over their time span
    (all kinds).

    A live file written before ``meta["workload_load"]`` existed recorded the workload-time load as ``load`` even
    on the wall clock (``time_base`` wall, ``time_scale`` K: arrivals went out K times as fast), which put it on
    the load axis K times too low; its load is multiplied by K here."""
    meta = run.meta
    for key in ("load", "rate"):
        value = meta.get(key)
        if value is not None:
            scale = meta.get("time_scale")
            if (key == "load" and run.mode == "live" and "workload_load" not in meta
                    and meta.get("time_base", "wall") == "wall" and _is_number(scale) and scale > 0):
                return float(value) * float(scale)
            return float(value)
    return arrival_rate([w.arrival for w in run.workflows])


def _kv_series(run: RunResult, word: str) -> dict[str, list[tuple[float, float]]]:
    return {name: points for name, points in run.series.items() if word in name.lower() and points}


def kv_figures(run: RunResult) -> tuple[float | None, float | None]:
    """Reserved KV (mean, peak) in tokens over the whole run, defined alike for live and simulated runs.

    Each figure is the simulator's exact one from ``meta["kv"]`` when the run has it (``reserved_mean_tokens_run``,
    ``reserved_peak_tokens``): a series sampled every second can miss short reservations altogether (a tiny
    run showed a mean of 971 tokens sampled against 113 exact, a peak of 1,056 against 1,808). Otherwise (a live
    run) it is the time-weighted mean / the peak of the reserved series over the span it covers, each sample
    holding until the next. (The simulator's ``reserved_mean_tokens`` is over the arrival window, a different
    span: not used here.)"""
    kv = run.meta.get("kv") or {}
    mean, peak = kv.get("reserved_mean_tokens_run"), kv.get("reserved_peak_tokens")
    if (mean is None or peak is None) and (reserved := _kv_series(run, "reserved")):
        points = _sum_series(reserved)
        mean = _time_mean(points) if mean is None else mean
        peak = max(v for _, v in points) if peak is None else peak
    return (None if mean is None else float(mean)), (None if peak is None else float(peak))


def _time_mean(points: list[tuple[float, float]]) -> float:
    """Mean of a step function over [first, last sample] (one sample: its value)."""
    span = points[-1][0] - points[0][0]
    if span <= 0:
        return sum(v for _, v in points) / len(points)
    return sum(v * (points[i + 1][0] - t) for i, (t, v) in enumerate(points[:-1])) / span


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
    preemptions: int | None  # None: not measured (a live run: the client cannot see the engines' preemptions)
    preempted_requests: int | None
    reserved_mean: float | None
    reserved_peak: float | None
    partial: str | None = None  # why a run ended early (meta.end: time_limit, stopped); None: complete
    requests_cut: int = 0  # requests the stop cut off undecided: out of request_slo
    workflows_cut: int = 0  # workflows the stop left undecided: out of workflow_deadline
    not_run_steps: int = 0  # steps a partial run never reached (meta.not_due + meta.not_started_steps)
    wall_s: float | None = None


def summarize(run: RunResult, name: str) -> RunRow:
    summary = run.summary()
    ok = [r for r in run.requests if r.status == "ok"]
    e2e = [r.e2e for r in ok if r.e2e is not None]
    ttft = [r.ttft for r in ok if r.ttft is not None]
    reserved_mean, reserved_peak = kv_figures(run)
    return RunRow(
        name=name, policy=policy_label(run, name), load=run_load(run), mode=run.mode,
        requests=summary["requests"], requests_ok=summary["requests_ok"],
        request_slo=summary["request_slo_attainment"], workflows=summary["workflows"],
        workflow_deadline=summary["workflow_deadline_attainment"], mean_e2e=summary["mean_e2e_s"],
        p99_e2e=quantile(e2e, 0.99), p99_ttft=quantile(ttft, 0.99),
        # a live run never measures preemptions (its records' 0 means unknown): "-", as the KV columns say it
        preemptions=None if run.mode == "live" else sum(r.preemptions for r in run.requests),
        preempted_requests=summary["preempted_requests"],  # None for a live run
        reserved_mean=reserved_mean, reserved_peak=reserved_peak, partial=run.partial,
        requests_cut=summary["requests_cut"], workflows_cut=summary["workflows_cut"],
        not_run_steps=_count(run.meta.get("not_due")) + _count(run.meta.get("not_started_steps")),
        wall_s=run.meta.get("wall_s") if _is_number(run.meta.get("wall_s")) else None)


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _sum_series(series: dict[str, list[tuple[float, float]]]) -> list[tuple[float, float]]:
    """One series from several of the same quantity.

    ``<name>/<part>`` series are parts of ``<name>`` (e.g. ``used_kv_tokens/engine-0``): they are added up,
    unless the total ``<name>`` is there too, which is then used alone (a total is never added to its parts).
    Series with different names are added up. Series sampled at different times are aligned as step functions
    (each value holds until the series' next sample) on the union of their sample times, from the latest first
    sample on (before it some series has no value yet)."""
    groups: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for name, points in series.items():
        groups.setdefault(name.split("/", 1)[0], {})[name] = sorted(points)
    chosen = []
    for base, members in groups.items():
        chosen += [members[base]] if base in members else list(members.values())
    if len(chosen) == 1:
        return chosen[0]
    start = max(points[0][0] for points in chosen)
    times = sorted({t for points in chosen for t, _ in points if t >= start})
    columns = [([t for t, _ in points], [v for _, v in points]) for points in chosen]
    return [(t, sum(values[bisect.bisect_right(ts, t) - 1] for ts, values in columns)) for t in times]


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


# the KV columns say their unit and span: simulate prints a second table of arrival-window means in GiB
TABLE_HEADER = ("| run | policy | load | requests (ok) | request SLO | workflow deadline | mean latency s | "
                "p99 latency s | p99 TTFT s | preemptions (requests) | reserved KV mean tokens (whole run) | "
                "reserved KV peak tokens |")


def markdown_table(rows: list[RunRow]) -> str:
    lines = [TABLE_HEADER, "|" + "---|" * TABLE_HEADER.count(" | ") + "---|"]
    for row in rows:
        name = f"{row.name} (partial)" if row.partial else row.name
        lines.append(
            f"| {name} | {row.policy} | {_fmt(row.load, 'load')} | {row.requests} ({row.requests_ok}) | "
            f"{_fmt(row.request_slo, '%')} | {_fmt(row.workflow_deadline, '%')} | {_fmt(row.mean_e2e)} | "
            f"{_fmt(row.p99_e2e)} | {_fmt(row.p99_ttft)} | {_preemptions(row)} | "
            f"{_fmt(row.reserved_mean, 'n')} | {_fmt(row.reserved_peak, 'n')} |")
    return "\n".join(lines)


def _preemptions(row: RunRow) -> str:
    if row.preemptions is None or row.preempted_requests is None:
        return "-"
    return f"{row.preemptions} ({row.preempted_requests})"


def partial_notes(rows: list[RunRow]) -> list[str]:
    """One line per partial run (a live run ended by ``--time-limit`` or a stop): what it left out and why."""
    notes = []
    for row in rows:
        if not row.partial:
            continue
        ended = row.partial + ("" if row.wall_s is None else f" after {row.wall_s:.1f} s")
        notes.append(f"- {row.name} (partial: {ended}): {row.requests_cut} request(s) and {row.workflows_cut} "
                     f"workflow(s) cut off by the stop before their SLO / deadline was decided are left out of its "
                     f"attainments (those that had already missed stay in as misses); {row.not_run_steps} step(s) "
                     "never reached; not on the load plot")
    if notes:
        notes.insert(0, "Partial runs (ended before their workload; the rows marked (partial) are over what was "
                        "decided by the stop):")
    return notes


# ---------------------------------------------------------------------------------------------- plots

def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_slo_vs_load(rows: list[RunRow], path: Path) -> Path | None:
    """Attainment against load, one line per policy. Partial runs are left off: a run stopped early did not
    carry its load through to the end, so its point is not on the policy's curve (the table and its note list
    it)."""
    points = [r for r in rows if r.load is not None and not r.partial]
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
        label = (policy if load is None else f"{policy} @ {_fmt(load, 'load')}") + (" (partial)" if run.partial else "")
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

def run_names(paths: list[str | Path]) -> list[str]:
    """One distinct name per result file: its file name without the extension, characters other than letters,
    digits, ``.``, ``_`` and ``-`` made ``_`` (the name is a table cell and part of a plot's file name), and a
    repeated name given ``-1``, ``-2``... skipping every name taken, or that another file has.

    Names were made unique before they were made safe, and a repeat's suffix was not checked against the other
    files' names: ``d1/run.json d2/run.json run-1.json`` gave two rows named ``run-1``, and ``a b.json`` and
    ``a_b.json`` one ``kv_a_b.png`` (one run's plot lost)."""
    bases = [_SAFE.sub("_", Path(path).stem) or "run" for path in paths]
    reserved, used, names = set(bases), set(), []
    for base in bases:
        name, k = base, 0
        while name in used or (k and name in reserved):  # a suffixed name may not be another file's own
            k += 1
            name = f"{base}-{k}"
        used.add(name)
        names.append(name)
    return names


def write_report(paths: list[str | Path], out_dir: str | Path, title: str = "Maestro load report") -> dict[str, Any]:
    """Read the RunResult files, write ``report.md`` and the PNGs into ``out_dir``; return what was written.

    ``out_dir`` is a folder (created when missing); an existing file there, or one that cannot be created, is a
    :class:`ReportError` before any result is read, and so is a result file that is one of the files the report
    writes. A folder that holds an earlier report is reused: the plots that report wrote (the images its
    ``report.md`` shows, of the names this function gives) and this one does not are removed, so no stale plot
    of a run no longer reported lingers beside the new ones; nothing else in the folder is touched."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ReportError(f"cannot write the report into {out_dir}: it is a file, not a folder")
    for path in paths:
        for written in ("report.md", "slo_vs_load.png", "latency_cdf.png"):
            if same_file(Path(path), out / written):
                raise ReportError(f"cannot write the report into {out_dir}: {path} is its {written}")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a parent that is a file, no permission...
        raise ReportError(f"cannot create the folder {out_dir}: {exc.strerror or exc}") from None
    runs = [(name, load_run(path)) for name, path in zip(run_names(paths), paths)]
    rows = sorted((summarize(run, name) for name, run in runs),
                  key=lambda r: (r.policy, r.load if r.load is not None else -1.0, r.name))
    table = markdown_table(rows)
    images: list[Path] = []
    no_plots = None
    try:
        for image in (plot_slo_vs_load(rows, out / "slo_vs_load.png"),
                      plot_latency_cdfs(runs, out / "latency_cdf.png")):
            if image is not None:
                images.append(image)
        for name, run in runs:
            image = plot_kv(run, name, out / f"kv_{name}.png")
            if image is not None:
                images.append(image)
    except ImportError as exc:  # matplotlib missing or broken: the tables are the report; they must not be lost
        no_plots = f"no plots: matplotlib cannot be imported ({exc})"
        print(f"warning: {no_plots}; writing report.md with the tables only", file=sys.stderr)
    notes = partial_notes(rows)
    body = [f"# {title}", "", table, ""] + (notes + [""] if notes else [])
    body += [f"({no_plots})", ""] if no_plots else []
    body += [f"![{p.stem}]({p.name})" for p in images]
    stale = _report_images(out / "report.md") - {p.name for p in images}
    write_atomically(out / "report.md", ("\n".join(body) + "\n").encode("utf-8"))
    for name in stale:
        (out / name).unlink(missing_ok=True)
    return {"markdown": out / "report.md", "table": table, "notes": notes, "images": images, "rows": rows}


_OWN_IMAGE = re.compile(r"!\[[^\]]*\]\(((?:slo_vs_load|latency_cdf|kv_[A-Za-z0-9._-]+)\.png)\)")


def _report_images(markdown: Path) -> set[str]:
    """The plots an earlier ``report.md`` in the folder shows, of the names :func:`write_report` gives (an image
    the user added by hand, or any other file, is not the report's)."""
    try:
        text = markdown.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    return {m.group(1) for m in _OWN_IMAGE.finditer(text) if (markdown.parent / m.group(1)).is_file()}


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
    except OSError as exc:  # the folder changed while the report was written
        print(f"error: cannot write the report into {args.out}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    print(written["table"])
    if written["notes"]:
        print("\n" + "\n".join(written["notes"]))
    print(f"wrote {written['markdown']} and {len(written['images'])} plot(s) in {args.out}", file=sys.stderr)
    return 0
