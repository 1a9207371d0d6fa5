"""The workload model and its JSON file format (``maestro-workload/1``): what loadgen sends, live or simulated.

A workload is a list of workflow *instances*, each with an arrival time. A workflow is a DAG of steps; each step
is one LLM call by one agent role. An interactive call is a workflow of one step with ``kind: "interactive"``
(it is sent without workflow headers, as an application's plain call would be).

File format (JSON)::

    {"format": "maestro-workload/1",
     "name": "chatdev-mix", "model": "maestro-sim-llama-8b", "seed": 7,
     "workflows": [
       {"id": "wf-0", "kind": "workflow", "arrival_s": 0.0, "deadline_s": 120.0, "slo_class": "batch",
        "steps": [
          {"id": "plan", "role": "planner", "prompt_tokens": 900, "output_tokens": 220},
          {"id": "code", "role": "coder", "prompt_text": "Write the module...", "output_tokens": 800,
           "depends_on": ["plan"], "think_time_s": 0.5},
          {"id": "review", "role": "reviewer", "prompt_tokens": 1800, "output_tokens": 150,
           "depends_on": ["code"], "max_tokens": 4096}]},
       {"id": "chat-0", "kind": "interactive", "arrival_s": 0.4, "slo_class": "interactive",
        "steps": [{"id": "s", "role": "assistant", "prompt_tokens": 120, "output_tokens": 60}]}]}

Per step: ``role``; ``prompt_tokens`` or ``prompt_text`` (one is required; with text the token count is
estimated the same way the predictor does); ``output_tokens`` (how many the engine is told to produce, via
``max_tokens``+``ignore_eos`` on real engines or the ``X-Sim-Output-Tokens`` hint on simulated ones);
``depends_on`` (ids of steps that must finish first; default: none); ``think_time_s`` (pause after the last
dependency finishes, e.g. tool execution); ``max_tokens`` (what the client declares; default 4096).
``deadline_s`` is relative to the workflow's arrival; omitted = the SLO class's default. Optional per workflow:
``template`` (the name of the generator template that produced it; informational, e.g. for per-template reports).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from loadgen.results import write_atomically

FORMAT = "maestro-workload/1"
DEFAULT_MAX_TOKENS = 4096


class WorkloadError(ValueError):
    """The workload file is invalid; the message names the element."""


@dataclass(slots=True)
class Step:
    id: str
    role: str
    output_tokens: int
    prompt_tokens: int | None = None
    prompt_text: str | None = None
    depends_on: tuple[str, ...] = ()
    think_time_s: float = 0.0
    max_tokens: int = DEFAULT_MAX_TOKENS

    def prompt_token_count(self) -> int:
        if self.prompt_tokens is not None:
            return self.prompt_tokens
        from predictor.tokens import estimate_tokens

        return estimate_tokens(self.prompt_text or "")


@dataclass(slots=True)
class Workflow:
    id: str
    arrival_s: float
    steps: list[Step]
    kind: str = "workflow"  # "workflow" | "interactive"
    deadline_s: float | None = None
    slo_class: str = "batch"
    template: str | None = None  # which generator template produced it (optional, informational)

    @property
    def interactive(self) -> bool:
        return self.kind == "interactive"


@dataclass
class Workload:
    workflows: list[Workflow]
    name: str = "workload"
    model: str = "maestro-sim-llama-8b"
    seed: int = 0
    meta: dict[str, Any] = field(default_factory=dict)

    def duration_s(self) -> float:
        return max((w.arrival_s for w in self.workflows), default=0.0)

    def offered_load(self) -> float | None:
        """Arrivals per second of workload time, from the workload's own arrivals (see :func:`arrival_rate`).

        A simulation records this as ``meta["load"]``, a live run as ``meta["workload_load"]`` (its ``meta["load"]``
        is on the result's clock: ``time_scale`` times this on the wall clock): the spec's nominal rate is not what
        was generated (a replay adds its own calls, a random process deviates from its mean, a file has no
        spec)."""
        return arrival_rate([w.arrival_s for w in self.workflows])

    def to_json(self) -> dict[str, Any]:
        def step(s: Step) -> dict[str, Any]:
            out: dict[str, Any] = {"id": s.id, "role": s.role, "output_tokens": s.output_tokens}
            if s.prompt_tokens is not None:
                out["prompt_tokens"] = s.prompt_tokens
            if s.prompt_text is not None:
                out["prompt_text"] = s.prompt_text
            if s.depends_on:
                out["depends_on"] = list(s.depends_on)
            if s.think_time_s:
                out["think_time_s"] = s.think_time_s
            if s.max_tokens != DEFAULT_MAX_TOKENS:
                out["max_tokens"] = s.max_tokens
            return out

        def workflow(w: Workflow) -> dict[str, Any]:
            out: dict[str, Any] = {"id": w.id, "kind": w.kind, "arrival_s": w.arrival_s, "deadline_s": w.deadline_s,
                                   "slo_class": w.slo_class, "steps": [step(s) for s in w.steps]}
            if w.template is not None:
                out["template"] = w.template
            return out

        return {"format": FORMAT, "name": self.name, "model": self.model, "seed": self.seed, "meta": self.meta,
                "workflows": [workflow(w) for w in self.workflows]}

    def save(self, path: str | Path) -> None:
        """Write the workload file (atomically: a failed write leaves what was there)."""
        write_atomically(path, orjson.dumps(self.to_json(), option=orjson.OPT_INDENT_2))


def arrival_rate(arrivals: Sequence[float]) -> float | None:
    """Arrivals per second over their span: (n - 1) arrivals in (first, last]; None below two distinct times.

    One rule for workloads (:meth:`Workload.offered_load`) and result files (``loadgen.report.run_load``), so a
    figure recorded by a run and one recomputed from its records agree; an evenly spaced process gives its rate
    exactly."""
    times = sorted(arrivals)
    if len(times) >= 2 and times[-1] > times[0]:
        return round((len(times) - 1) / (times[-1] - times[0]), 4)
    return None


def _number(value: Any, where: str, minimum: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < minimum:
        raise WorkloadError(f"{where} must be a number >= {minimum:g}")
    return float(value)


def _integer(value: Any, where: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise WorkloadError(f"{where} must be an integer >= {minimum}")
    return value


def parse_workload(data: Any) -> Workload:
    """Validate a parsed JSON document; raise :class:`WorkloadError` naming the bad element."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise WorkloadError(f"not a workload file: 'format' must be {FORMAT!r}")
    raw_workflows = data.get("workflows")
    if not isinstance(raw_workflows, list):
        raise WorkloadError("'workflows' must be a list")
    workflows = []
    seen: set[str] = set()
    for i, raw in enumerate(raw_workflows):
        where = f"workflows[{i}]"
        if not isinstance(raw, dict):
            raise WorkloadError(f"{where} must be an object")
        wf_id = raw.get("id")
        if not isinstance(wf_id, str) or not wf_id or wf_id in seen:
            raise WorkloadError(f"{where}.id must be a unique non-empty string")
        seen.add(wf_id)
        kind = raw.get("kind", "workflow")
        if kind not in ("workflow", "interactive"):
            raise WorkloadError(f"{where}.kind must be 'workflow' or 'interactive'")
        raw_steps = raw.get("steps")
        if not isinstance(raw_steps, list) or not raw_steps:
            raise WorkloadError(f"{where}.steps must be a non-empty list")
        if kind == "interactive" and len(raw_steps) != 1:
            raise WorkloadError(f"{where}: an interactive call has exactly one step")
        steps: list[Step] = []
        step_ids: set[str] = set()
        for j, rs in enumerate(raw_steps):
            sw = f"{where}.steps[{j}]"
            if not isinstance(rs, dict):
                raise WorkloadError(f"{sw} must be an object")
            sid = rs.get("id", str(j))
            if not isinstance(sid, str) or sid in step_ids:
                raise WorkloadError(f"{sw}.id must be a unique string within the workflow")
            depends = rs.get("depends_on", [])
            if not isinstance(depends, list) or any(not isinstance(d, str) or d not in step_ids for d in depends):
                raise WorkloadError(f"{sw}.depends_on must list ids of earlier steps")
            if rs.get("prompt_tokens") is None and not isinstance(rs.get("prompt_text"), str):
                raise WorkloadError(f"{sw} needs prompt_tokens or prompt_text")
            if rs.get("prompt_text") is not None and not isinstance(rs["prompt_text"], str):
                raise WorkloadError(f"{sw}.prompt_text must be a string")
            role = rs.get("role", "other")
            if not isinstance(role, str):
                raise WorkloadError(f"{sw}.role must be a string")
            step_ids.add(sid)
            steps.append(Step(
                id=sid, role=role,
                output_tokens=_integer(rs.get("output_tokens"), f"{sw}.output_tokens", 1),
                prompt_tokens=None if rs.get("prompt_tokens") is None
                else _integer(rs["prompt_tokens"], f"{sw}.prompt_tokens", 1),
                prompt_text=rs.get("prompt_text"),
                depends_on=tuple(depends),
                think_time_s=_number(rs.get("think_time_s", 0.0), f"{sw}.think_time_s"),
                max_tokens=_integer(rs.get("max_tokens", DEFAULT_MAX_TOKENS), f"{sw}.max_tokens", 1),
            ))
            if steps[-1].output_tokens > steps[-1].max_tokens:
                raise WorkloadError(f"{sw}.output_tokens exceeds its max_tokens")
        deadline = raw.get("deadline_s")
        template = raw.get("template")
        if template is not None and not isinstance(template, str):
            raise WorkloadError(f"{where}.template must be a string")
        workflows.append(Workflow(
            id=wf_id, kind=kind, steps=steps,
            arrival_s=_number(raw.get("arrival_s", 0.0), f"{where}.arrival_s"),
            deadline_s=None if deadline is None else _number(deadline, f"{where}.deadline_s"),
            slo_class=_string(raw.get("slo_class", "interactive" if kind == "interactive" else "batch"),
                              f"{where}.slo_class"),
            template=template,
        ))
    workflows.sort(key=lambda w: (w.arrival_s, w.id))
    meta = data.get("meta")
    if meta is not None and not isinstance(meta, dict):
        raise WorkloadError("'meta' must be an object")
    return Workload(workflows=workflows, name=_string(data.get("name", "workload"), "name"),
                    model=_string(data.get("model", "maestro-sim-llama-8b"), "model"),
                    seed=_integer(data.get("seed", 0), "seed"), meta=dict(meta or {}))


def _string(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise WorkloadError(f"{where} must be a string")
    return value


def load_workload(path: str | Path) -> Workload:
    try:
        data = orjson.loads(Path(path).read_bytes())
    except OSError as exc:
        raise WorkloadError(f"cannot read {path}: {exc.strerror or exc}") from None
    except orjson.JSONDecodeError as exc:
        raise WorkloadError(f"{path} is not valid JSON: {exc}") from None
    return parse_workload(data)
