"""Per-request and per-workflow results: one schema for the live runner and the simulator.

Both modes emit these records, so the same report code (tables, plots, SLO attainment) reads either, and the
fidelity experiment compares like with like. Times are seconds from the start of the run.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from predictor.trace import folder_problem, same_file, write_bytes_atomically


def quantile(values: Iterable[float], q: float) -> float | None:
    """The nearest-rank ``q`` quantile (``q`` in [0, 1]) of ``values``, in any order; None when there are none.

    Nearest rank is the smallest value with at least a share ``q`` of the values at or below it: with the values
    1..100, p50 is 50 and p99 is 99 (numpy's ``inverted_cdf``, i.e. ``sorted(values)[ceil(q * n) - 1]``). It
    always reads an observed value, as a tail latency should, and every loadgen table (summary, report,
    experiments, E4) uses this one rule, so their figures agree: three hand-written copies of an index rule
    (``int(q * n)``) had read one rank too high (p99 of 1..100 was 100, p50 was 51)."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {q!r}")
    data = np.fromiter(values, dtype=float)
    if data.size == 0:
        return None
    return float(np.quantile(data, q, method="inverted_cdf"))


@dataclass(slots=True)
class RequestResult:
    request_id: str
    workflow_id: str | None  # None for interactive calls
    step_id: str
    role: str
    slo_class: str
    # when it was due: its workflow's arrival, or its dependencies' finish plus its think time (the simulator's
    # release); a live client that then waits for a concurrency slot sends it client_wait_s later, and TTFT, e2e
    # and the SLO count that wait (a client limit must not hide queueing: no coordinated omission)
    arrival: float
    prompt_tokens: int
    output_tokens: int  # tokens actually received
    first_token: float | None = None  # None: failed before any token
    finish: float | None = None  # None: failed
    ttft_target_s: float | None = None
    tpot_target_s: float | None = None
    status: str = "ok"  # ok | error:<reason>
    preemptions: int = 0
    reserved_tokens: int = 0  # KV tokens the gateway reserved for it (0 under admission 'none')
    client_wait_s: float = 0.0  # from arrival to the send (a live run's --max-concurrency; 0 in the simulator)

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival

    @property
    def e2e(self) -> float | None:
        return None if self.finish is None else self.finish - self.arrival

    @property
    def tpot(self) -> float | None:
        if self.finish is None or self.first_token is None or self.output_tokens <= 1:
            return None
        return (self.finish - self.first_token) / (self.output_tokens - 1)

    def slo_met(self) -> bool:
        """A request meets its SLO when it succeeded within its TTFT and TPOT targets (absent target = met)."""
        if self.status != "ok" or self.ttft is None:
            return False
        if self.ttft_target_s is not None and self.ttft > self.ttft_target_s:
            return False
        tpot = self.tpot
        return not (self.tpot_target_s is not None and tpot is not None and tpot > self.tpot_target_s)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(slots=True)
class WorkflowResult:
    workflow_id: str
    kind: str  # workflow | interactive
    slo_class: str
    arrival: float
    deadline_s: float | None  # relative to arrival
    finish: float | None = None  # None: some step failed or never ran
    steps: int = 0
    steps_ok: int = 0

    def met(self) -> bool:
        if self.finish is None or self.steps_ok != self.steps:
            return False
        return self.deadline_s is None or self.finish - self.arrival <= self.deadline_s

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# statuses of requests the client cut off when it ended the run early (a live run's --time-limit, Ctrl-C / stop()):
# the stop's doing, not the engine's or the scheduler's
STOP_STATUSES = ("error:stopped", "error:time_limit", "error:cancelled")


@dataclass
class RunResult:
    """Everything one run produced; ``series`` holds time series such as reserved vs used KV tokens."""

    mode: str  # live | simulate
    policy: dict[str, str]  # queue / admission / routing names
    requests: list[RequestResult] = field(default_factory=list)
    workflows: list[WorkflowResult] = field(default_factory=list)
    series: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def partial(self) -> str | None:
        """Why the run ended before its workload did (a live run's ``meta.end``: ``time_limit``, ``stopped``...),
        or None for a complete run (a simulation, or a live run that ``completed``)."""
        end = self.meta.get("end")
        return None if end in (None, "completed") else str(end)

    def stop_time(self) -> float | None:
        """When a partial run was stopped, in the result's time base (None: complete, or not recorded)."""
        if self.partial is None or not isinstance(self.meta.get("wall_s"), (int, float)):
            return None
        scale = self.meta.get("time_scale", 1.0) if self.meta.get("time_base") == "workload" else 1.0
        return float(self.meta["wall_s"]) * float(scale if isinstance(scale, (int, float)) else 1.0)

    def cut_requests(self) -> set[int]:
        """Indexes of the requests the stop cut off before their SLO was decided.

        A request cut by the stop (:data:`STOP_STATUSES`) had not failed: whether it would have met its SLO is
        unknown, and counting it as a miss would charge the stop to the policy (under a time limit the requests
        then in flight are the slowest ones, so leaving them all out would flatter it instead). So one whose
        outcome was already known at the stop stays in, as a miss: its first token came after its TTFT target,
        or none had come when the target passed. The others are left out of the request SLO denominator. A
        complete run (:attr:`partial` None) has none."""
        if self.partial is None:
            return set()
        stop = self.stop_time()
        cut = set()
        for i, r in enumerate(self.requests):
            if r.status not in STOP_STATUSES:
                continue
            target = r.ttft_target_s
            if target is not None and r.first_token is not None and r.first_token - r.arrival > target:
                continue  # its first token was late: missed before the stop
            if target is not None and r.first_token is None and stop is not None and stop - r.arrival > target:
                continue  # no first token by its target, which passed before the stop: missed
            cut.add(i)
        return cut

    def cut_workflows(self) -> set[str]:
        """Ids of the workflows (``kind == "workflow"``) the stop left undecided: not finished, no step failed
        but by the stop, and the deadline (if any) not yet passed at the stop. They are left out of the workflow
        deadline denominator; a workflow that had already failed or missed its deadline stays in, as a miss."""
        if self.partial is None:
            return set()
        stop = self.stop_time()
        failed = {r.workflow_id for r in self.requests if r.status != "ok" and r.status not in STOP_STATUSES}
        return {w.workflow_id for w in self.workflows
                if w.kind == "workflow" and w.finish is None and w.workflow_id not in failed
                and not (w.deadline_s is not None and stop is not None and stop - w.arrival > w.deadline_s)}

    def summary(self) -> dict[str, Any]:
        """Counts, attainments and latencies. In a partial run (:attr:`partial`) the requests and workflows the
        stop left undecided (:meth:`cut_requests`, :meth:`cut_workflows`) are counted (``requests_cut``,
        ``workflows_cut``) but left out of the attainments: the stop is not the policy's miss."""
        requests = self.requests
        workflows = [w for w in self.workflows if w.kind == "workflow"]
        ok = [r for r in requests if r.status == "ok"]
        e2e = [r.e2e for r in ok if r.e2e is not None]
        ttft = [r.ttft for r in ok if r.ttft is not None]
        cut = self.cut_requests()
        judged = [r for i, r in enumerate(requests) if i not in cut]
        cut_workflows = self.cut_workflows()
        judged_workflows = [w for w in workflows if w.workflow_id not in cut_workflows]

        return {
            "requests": len(requests),
            "requests_ok": len(ok),
            "requests_cut": len(cut),
            "request_slo_attainment": (sum(r.slo_met() for r in judged) / len(judged)) if judged else None,
            "workflows": len(workflows),
            "workflows_cut": len(workflows) - len(judged_workflows),
            "workflow_deadline_attainment": ((sum(w.met() for w in judged_workflows) / len(judged_workflows))
                                             if judged_workflows else None),
            "mean_e2e_s": (sum(e2e) / len(e2e)) if e2e else None,
            "p50_ttft_s": quantile(ttft, 0.5),
            "p99_ttft_s": quantile(ttft, 0.99),
            # a live client cannot see the engines' preemptions (its records' 0 means unknown): None, not 0
            "preempted_requests": None if self.mode == "live" else sum(1 for r in requests if r.preemptions > 0),
            "partial": self.partial,
        }

    def to_json(self) -> dict[str, Any]:
        return {"mode": self.mode, "policy": self.policy, "summary": self.summary(), "meta": self.meta,
                "series": self.series, "requests": [r.to_json() for r in self.requests],
                "workflows": [w.to_json() for w in self.workflows]}


def json_bytes(data: Any, indent: bool = True) -> bytes:
    """``data`` as strict JSON (RFC 8259), the way every loadgen result file is written.

    orjson writes a non-finite float as ``null`` (the report's "unknown") where :func:`json.dumps` wrote
    ``Infinity`` / ``NaN``, which no strict JSON reader (orjson, the report's) accepts: a simulation with an
    infinite option wrote a file nothing could read back. numpy scalars and arrays are written as numbers, keys
    that are not strings as strings, anything else orjson does not know as its ``str()``."""
    option = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS | (orjson.OPT_INDENT_2 if indent else 0)
    return orjson.dumps(data, default=str, option=option)


def prepare_output(path: str | Path, inputs: Iterable[str | Path | None] = ()) -> Path:
    """Make sure ``path`` can be written, creating its folder, *before* a run: a bad ``--out`` then costs an
    error message (exit 2) instead of the run it would otherwise lose at the end. Raises ``ValueError``.

    ``inputs`` are the files the command reads (``--workload``, ``--gateway-config``...): ``--out`` naming one of
    them is refused, since the result would replace it (``live --workload wl.json --out wl.json`` lost the
    workload). Any other existing ``path`` will be replaced, as before: :func:`announce_replacing` says so once
    the command's input is checked."""
    target = Path(path)
    problem = folder_problem(target)
    if problem:
        raise ValueError(f"cannot write {path}: {problem}")
    for source in inputs:
        if source is not None and same_file(target, Path(source)):
            raise ValueError(f"cannot write {path}: it is the input file {source}, which the result would replace")
    if target.exists() and not os.access(target, os.W_OK):
        raise ValueError(f"cannot write {path}: permission denied")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"cannot create the folder of {path}: {exc.strerror or exc}") from None
    return target


def announce_replacing(path: str | Path | None) -> None:
    """Say "replacing PATH" on stderr when ``path`` exists: called when a command's input has been checked and
    its run starts, so a mistyped ``--out`` that names an earlier result is noticed while the run can still be
    stopped. The CLI has no ``--force`` convention to refuse it by, and refusing would break scripts that rerun
    into the same file."""
    if path and Path(path).exists():
        print(f"replacing {path}", file=sys.stderr)


def write_atomically(path: str | Path, data: bytes) -> None:
    """Write a result to ``path`` atomically (:func:`~predictor.trace.write_bytes_atomically`). A run's result is
    written once, at its end: written in place, a full disk, a crash or a second Ctrl-C in the middle left a
    truncated file where the previous result (or nothing) had been."""
    write_bytes_atomically(path, (data,))
