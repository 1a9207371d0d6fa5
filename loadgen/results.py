"""Per-request and per-workflow results: one schema for the live runner and the simulator.

Both modes emit these records, so the same report code (tables, plots, SLO attainment) reads either, and the
fidelity experiment compares like with like. Times are seconds from the start of the run.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


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


@dataclass
class RunResult:
    """Everything one run produced; ``series`` holds time series such as reserved vs used KV tokens."""

    mode: str  # live | simulate
    policy: dict[str, str]  # queue / admission / routing names
    requests: list[RequestResult] = field(default_factory=list)
    workflows: list[WorkflowResult] = field(default_factory=list)
    series: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        requests = self.requests
        workflows = [w for w in self.workflows if w.kind == "workflow"]
        ok = [r for r in requests if r.status == "ok"]
        e2e = [r.e2e for r in ok if r.e2e is not None]
        ttft = [r.ttft for r in ok if r.ttft is not None]

        return {
            "requests": len(requests),
            "requests_ok": len(ok),
            "request_slo_attainment": (sum(r.slo_met() for r in requests) / len(requests)) if requests else None,
            "workflows": len(workflows),
            "workflow_deadline_attainment": (sum(w.met() for w in workflows) / len(workflows)) if workflows else None,
            "mean_e2e_s": (sum(e2e) / len(e2e)) if e2e else None,
            "p50_ttft_s": quantile(ttft, 0.5),
            "p99_ttft_s": quantile(ttft, 0.99),
            "preempted_requests": sum(1 for r in requests if r.preemptions > 0),
        }

    def to_json(self) -> dict[str, Any]:
        return {"mode": self.mode, "policy": self.policy, "summary": self.summary(), "meta": self.meta,
                "series": self.series, "requests": [r.to_json() for r in self.requests],
                "workflows": [w.to_json() for w in self.workflows]}


def prepare_output(path: str | Path) -> Path:
    """Make sure ``path`` can be written, creating its folder, *before* a run: a bad ``--out`` then costs an
    error message (exit 2) instead of the run it would otherwise lose at the end. Raises ``ValueError``."""
    target = Path(path)
    if target.is_dir():
        raise ValueError(f"cannot write {path}: it is a folder")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ValueError(f"cannot write {path}: {target.parent} is not a folder") from None
    except OSError as exc:
        raise ValueError(f"cannot create the folder of {path}: {exc.strerror or exc}") from None
    if not os.access(target.parent, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise ValueError(f"cannot write {path}: permission denied")
    return target
