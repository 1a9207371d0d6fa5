"""Workflow templates derived at run time from real multi-agent traces (read in place through the importers).

Each template is a set of *runs* taken from one dataset via :func:`predictor.importers.iter_source` (the same
records the predictor trains on): a run is the ordered list of the LLM calls of one real workflow execution,
each with its agent role, a *group* (what its length distribution is pooled by), its prompt tokens, its output
tokens and the pause before it. A workflow instance is one run drawn at random; the calls form a chain (every
framework here is sequential: one agent speaks at a time). Lengths:

- ``lengths="resample"`` (default): the run's structure and prompt sizes (the history growth is structure),
  with every output length drawn from the empirical distribution of its group over all runs;
- ``lengths="trace"``: the run's own counts, unchanged.

==============  ==================================  ==========================  ==============================
template        dataset (importer source)           group (length pool)         pause before a call
==============  ==================================  ==========================  ==============================
chatdev         chatdev-warehouse-llm-calls          ChatDev phase / persona     the logged gap: this call's
                (``chatdev``)                                                   send time - previous receive
                                                                                time (1 s resolution), <= max
ag2             who-and-when-mas-logs (``ag2``)      agent role                  ``tool_s`` when non-LLM turns
                                                                                (code execution output, user
                                                                                input) came in between
magentic-one    who-and-when-mas-logs                agent (Orchestrator,        ``tool_s`` after WebSurfer,
                (``magentic-one``)                   WebSurfer, FileSurfer,      FileSurfer or Assistant (their
                                                     Assistant)                  browser/file/code action)
tau-bench       tau-bench-historical-trajectories    output kind (tool call /    ``tool_s`` after a tool call,
                (``tau-bench``)                      text reply)                 ``user_s`` after a reply (the
                                                                                customer's turn)
==============  ==================================  ==========================  ==============================

Token counts: ChatDev's are the OpenAI API's; the others are estimates (:mod:`predictor.tokens`). WebSurfer and
FileSurfer messages in Magentic-One are mostly the page or file text the tool rendered, not LLM output (the
importer marks them ``tool_rendered_output``): their output length is capped at ``TOOL_RENDERED_OUTPUT_TOKENS``
(the size of a tool call), while the rendered text still grows later prompts as it did in the run.
``tool_s`` / ``user_s`` have no source in the data (no timestamps): they are chosen defaults (:class:`ThinkTimes`).
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any

import numpy as np

from loadgen.workload import Step
from loadgen.workloads.data import CHATDEV, TAU_BENCH, WHO_AND_WHEN, dataset_path

TOOL_RENDERED_OUTPUT_TOKENS = 64  # chosen: about one tool call (action name + JSON arguments)
LENGTH_MODES = ("resample", "trace")

# template name -> (importer source, dataset folder)
TRACE_SOURCES: dict[str, tuple[str, str]] = {
    "chatdev": ("chatdev", CHATDEV),
    "ag2": ("ag2", WHO_AND_WHEN),
    "magentic-one": ("magentic-one", WHO_AND_WHEN),
    "tau-bench": ("tau-bench", TAU_BENCH),
}
_TOOL_AGENTS_M1 = frozenset({"WebSurfer", "FileSurfer", "Assistant"})
_LABEL = re.compile(r"[^A-Za-z0-9]+")


@dataclass(frozen=True)
class ThinkTimes:
    """Pauses with no source in the data (chosen): a tool / code execution, a (simulated) user's turn."""

    tool_s: float = 1.0
    user_s: float = 3.0
    max_s: float = 30.0  # cap on the gaps measured in ChatDev's logs (human review phases wait minutes)


@dataclass(frozen=True, slots=True)
class TraceCall:
    role: str
    group: str
    label: str
    prompt_tokens: int
    output_tokens: int
    think_s: float


@dataclass(frozen=True)
class TraceRun:
    id: str
    calls: tuple[TraceCall, ...]


class TraceTemplate:
    """The runs of one trace source and the per-group output-length pools."""

    def __init__(self, name: str, runs: list[TraceRun]):
        if not runs:
            raise ValueError(f"trace template {name!r}: no runs in the data")
        self.name = name
        self.runs = runs
        pools: dict[str, list[int]] = defaultdict(list)
        for run in runs:
            for call in run.calls:
                pools[call.group].append(call.output_tokens)
        self.pools = {group: np.asarray(values) for group, values in pools.items()}

    def instantiate(self, rng: np.random.Generator, lengths: str = "resample") -> list[Step]:
        """The steps of one workflow instance: one run drawn at random, as a chain."""
        if lengths not in LENGTH_MODES:
            raise ValueError(f"lengths must be one of {', '.join(LENGTH_MODES)}, got {lengths!r}")
        run = self.runs[int(rng.integers(len(self.runs)))]
        steps: list[Step] = []
        for index, call in enumerate(run.calls):
            output = call.output_tokens
            if lengths == "resample":
                pool = self.pools[call.group]
                output = int(pool[int(rng.integers(len(pool)))])
            step_id = f"{index:02d}-{call.label}"
            steps.append(Step(id=step_id, role=call.role, output_tokens=max(1, output),
                              prompt_tokens=max(1, call.prompt_tokens),
                              depends_on=(steps[-1].id,) if steps else (), think_time_s=round(call.think_s, 3)))
        return steps

    def stats(self) -> dict[str, Any]:
        """What a generated instance looks like: steps per workflow and mean lengths per role (from the runs)."""
        sizes = np.array([len(run.calls) for run in self.runs])
        by_role: dict[str, list[TraceCall]] = defaultdict(list)
        for run in self.runs:
            for call in run.calls:
                by_role[call.role].append(call)
        return {
            "runs": len(self.runs),
            "steps_per_workflow": {"mean": round(float(sizes.mean()), 1), "median": float(np.median(sizes)),
                                   "min": int(sizes.min()), "max": int(sizes.max())},
            "think_s_per_workflow": round(float(np.mean([sum(c.think_s for c in r.calls) for r in self.runs])), 1),
            "roles": {role: {"calls": len(calls),
                             "mean_prompt_tokens": round(float(np.mean([c.prompt_tokens for c in calls])), 1),
                             "mean_output_tokens": round(float(np.mean([c.output_tokens for c in calls])), 1)}
                      for role, calls in sorted(by_role.items(), key=lambda kv: -len(kv[1]))},
            "groups": len(self.pools),
        }


# ---------------------------------------------------------------------------------------------- loaders

def _label(text: Any) -> str:
    return _LABEL.sub("", str(text or "call"))[:32] or "call"


def _time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


def _chatdev_calls(records: list[dict[str, Any]], think: ThinkTimes) -> list[TraceCall]:
    calls = []
    previous_recv: datetime | None = None
    for record in records:
        meta = record.get("meta") or {}
        sent = _time(meta.get("send_time"))
        gap = 0.0
        if calls and sent is not None and previous_recv is not None:
            gap = min(max(0.0, (sent - previous_recv).total_seconds()), think.max_s)
        previous_recv = _time(meta.get("recv_time"))
        phase, persona = meta.get("phase") or "phase", meta.get("persona") or "agent"
        calls.append(TraceCall(record["agent_role"] or "other", f"{phase}/{persona}", _label(phase),
                               record["usage"]["prompt_tokens"], record["usage"]["completion_tokens"], gap))
    return calls


def _ag2_calls(records: list[dict[str, Any]], think: ThinkTimes) -> list[TraceCall]:
    calls = []
    previous_index: int | None = None
    for record in records:
        meta = record.get("meta") or {}
        index = meta.get("history_index")
        gap = think.tool_s if (calls and isinstance(index, int) and previous_index is not None
                               and index - previous_index > 1) else 0.0
        previous_index = index if isinstance(index, int) else previous_index
        role = record["agent_role"] or "other"
        calls.append(TraceCall(role, role, _label(meta.get("agent")), record["usage"]["prompt_tokens"],
                               record["usage"]["completion_tokens"], gap))
    return calls


def _magentic_calls(records: list[dict[str, Any]], think: ThinkTimes) -> list[TraceCall]:
    calls = []
    previous_agent: str | None = None
    for record in records:
        meta = record.get("meta") or {}
        agent = str(meta.get("agent") or "agent")
        output = record["usage"]["completion_tokens"]
        if meta.get("tool_rendered_output"):
            output = min(output, TOOL_RENDERED_OUTPUT_TOKENS)
        gap = think.tool_s if previous_agent in _TOOL_AGENTS_M1 else 0.0
        previous_agent = agent
        calls.append(TraceCall(record["agent_role"] or "other", agent, _label(agent),
                               record["usage"]["prompt_tokens"], output, gap))
    return calls


def _tau_calls(records: list[dict[str, Any]], think: ThinkTimes) -> list[TraceCall]:
    calls = []
    previous_kind: str | None = None
    for record in records:
        meta = record.get("meta") or {}
        kind = str(meta.get("output_kind") or "text")
        gap = 0.0 if previous_kind is None else (think.tool_s if "tool_call" in previous_kind else think.user_s)
        previous_kind = kind
        calls.append(TraceCall(record["agent_role"] or "tool_caller", kind, _label(kind),
                               record["usage"]["prompt_tokens"], record["usage"]["completion_tokens"], gap))
    return calls


_CONVERTERS = {"chatdev": _chatdev_calls, "ag2": _ag2_calls, "magentic-one": _magentic_calls,
               "tau-bench": _tau_calls}


@lru_cache(maxsize=16)
def load_trace_template(name: str, think: ThinkTimes = ThinkTimes()) -> TraceTemplate:
    """Read the runs of trace template ``name`` (one of :data:`TRACE_SOURCES`) from the data, in place."""
    if name not in TRACE_SOURCES:
        raise ValueError(f"unknown trace template {name!r}; known: {', '.join(TRACE_SOURCES)}")
    from predictor.importers import iter_source  # the importers are heavy-ish; load on first use

    source, dataset = TRACE_SOURCES[name]
    folder = dataset_path(dataset)
    by_run: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in iter_source(source, folder):
        workflow = record.get("workflow") or {}
        if isinstance(workflow.get("id"), str):
            by_run[workflow["id"]].append(record)
    runs = []
    for run_id, records in sorted(by_run.items()):
        records.sort(key=lambda r: r["workflow"]["step"])
        runs.append(TraceRun(run_id, tuple(_CONVERTERS[name](records, think))))
    return TraceTemplate(name, runs)
