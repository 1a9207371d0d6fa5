"""The generator API: ``build_workload(spec) -> Workload``.

A :class:`WorkloadSpec` says what to mix and how fast:

- ``templates``: name -> weight. Names: the built-ins under ``loadgen/templates`` (``chatdev``, ``metagpt``,
  ``autogen-groupchat``, ``magentic-one``, ``react-tools``, ``map-reduce``, ``debate``), the trace-derived ones
  (``trace:chatdev``, ``trace:ag2``, ``trace:magentic-one``, ``trace:tau-bench``; need the data), or the path of
  any workload file.
- ``rate`` (arrivals per second, workflows and interactive calls together), ``duration_s``, ``arrival``
  (``poisson`` | ``gamma`` | ``servegen`` | ``constant``, see :mod:`loadgen.workloads.arrivals`) and
  ``interactive_share``: each arrival is an interactive single call with that probability, else a workflow
  drawn from ``templates`` by weight.
- ``replay``: optionally add the single calls of a real trace (``azure-code``, ``azure-conv``,
  ``mooncake-conversation``, ``mooncake-synthetic``) with its own timestamps, ``replay_time_scale`` times
  faster, over the same ``duration_s``. With ``rate = 0`` the workload is the replay alone.
- ``deadline_scale``: a workflow's ``deadline_s`` is its critical path (pauses + ``deadline_scale`` x a
  reference service time per call: ``prompt / ref_prefill_tps + output * ref_tpot_s``); ``None`` leaves it to
  the SLO class default. The reference numbers (10,000 prompt tokens/s, 10 ms per output token) are round,
  chosen values for "one unloaded engine", not measurements.
- lengths: ``context_len`` (prompt + output must fit), ``max_output_tokens``, ``max_prompt_tokens``; every step
  declares ``max_tokens = min(spec.max_tokens, what the context leaves)`` and at least its output.
- ``seed``: everything is drawn from it (arrivals, mix, lengths use independent streams, so changing the mix
  does not move the arrivals).

Interactive single calls get lengths from a lognormal with means ``interactive_prompt_tokens`` /
``interactive_output_tokens`` (sigma 1.0 / 0.8; chosen values), or, with ``interactive_lengths`` set to a replay
name, from that trace's (prompt, output) pairs.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

from loadgen.workload import Step, Workflow, Workload
from loadgen.workloads.arrivals import ARRIVALS, generate_arrivals
from loadgen.workloads.replay import REPLAYS, length_pairs, replay_requests, trace_span_s
from loadgen.workloads.templates import builtin_names, load_file_template
from loadgen.workloads.traces import LENGTH_MODES, TRACE_SOURCES, ThinkTimes, load_trace_template

TRACE_PREFIX = "trace:"
_ID_BAD = re.compile(r"[^A-Za-z0-9._\-]")  # workflow ids stay valid X-Workflow-Id values
CONTEXT_MARGIN = 64  # tokens kept free of prompt + max_tokens (estimation slack between tokenizers)
INTERACTIVE_PROMPT_SIGMA = 1.0
INTERACTIVE_OUTPUT_SIGMA = 0.8


class SpecError(ValueError):
    """The spec is invalid; the message names the field."""


@dataclass
class WorkloadSpec:
    templates: dict[str, float] = field(default_factory=lambda: {"chatdev": 1.0})
    interactive_share: float = 0.0
    rate: float = 0.2
    duration_s: float = 300.0
    arrival: str = "poisson"
    cv: float | None = None
    cv_quantile: float = 0.9
    servegen_category: str = "language"
    servegen_model: str | None = None
    servegen_window_s: float | None = None
    servegen_clients: int | None = None
    deadline_scale: float | None = 3.0
    seed: int = 0
    model: str = "maestro-sim-llama-8b"
    name: str | None = None
    trace_lengths: str = "resample"
    jitter: float = 0.25
    interactive_lengths: str = "synthetic"
    interactive_prompt_tokens: int = 800
    interactive_output_tokens: int = 250
    workflow_slo_class: str = "batch"
    interactive_slo_class: str = "interactive"
    replay: str | None = None
    replay_time_scale: float = 1.0
    replay_start_s: float = 0.0
    replay_max_requests: int | None = None
    replay_slo_class: str = "interactive"
    context_len: int = 8192
    max_prompt_tokens: int | None = None
    max_output_tokens: int = 2048
    max_tokens: int = 4096
    tool_time_s: float = 1.0
    user_time_s: float = 3.0
    ref_prefill_tps: float = 10000.0
    ref_tpot_s: float = 0.01

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WorkloadSpec:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SpecError(f"unknown spec field(s): {', '.join(unknown)}")
        for f in fields(cls):
            if f.name in data:
                _check_type(f.name, data[f.name], f.type)
        spec = cls(**data)
        spec.validate()
        return spec

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if "float" in str(f.type) and isinstance(value, float) and not math.isfinite(value):
                # inf would ask for endless arrivals (numpy cannot size them); nan passes every comparison below
                raise SpecError(f"{f.name} must be a finite number, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise SpecError("seed must be an integer >= 0")
        if not isinstance(self.templates, dict) or any(
                not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0
                for k, v in self.templates.items()):
            raise SpecError("templates must map template names to weights >= 0")
        if self.rate > 0 and self.interactive_share < 1 and not any(v > 0 for v in self.templates.values()):
            raise SpecError("templates: at least one template needs a weight > 0")
        if not 0.0 <= self.interactive_share <= 1.0:
            raise SpecError("interactive_share must be in [0, 1]")
        if self.rate < 0 or (self.rate == 0 and self.replay is None):
            raise SpecError("rate must be > 0 (or 0 with a replay)")
        if not self.duration_s > 0:
            raise SpecError("duration_s must be > 0")
        if self.arrival not in ARRIVALS:
            raise SpecError(f"arrival must be one of {', '.join(ARRIVALS)}")
        if self.cv is not None and not self.cv > 0:
            raise SpecError("cv must be > 0")
        if self.deadline_scale is not None and not self.deadline_scale > 0:
            raise SpecError("deadline_scale must be > 0 (or null for the SLO class default)")
        if self.trace_lengths not in LENGTH_MODES:
            raise SpecError(f"trace_lengths must be one of {', '.join(LENGTH_MODES)}")
        if self.jitter < 0:
            raise SpecError("jitter must be >= 0")
        if self.interactive_lengths != "synthetic" and self.interactive_lengths not in REPLAYS:
            raise SpecError(f"interactive_lengths must be 'synthetic' or one of {', '.join(REPLAYS)}")
        if self.replay is not None and self.replay not in REPLAYS:
            raise SpecError(f"replay must be one of {', '.join(REPLAYS)}")
        if not self.replay_time_scale > 0:
            raise SpecError("replay_time_scale must be > 0")
        if self.replay_start_s < 0:
            raise SpecError("replay_start_s must be >= 0 (trace seconds after its first call)")
        if self.replay_max_requests is not None and (isinstance(self.replay_max_requests, bool) or not isinstance(
                self.replay_max_requests, int) or self.replay_max_requests < 1):
            raise SpecError("replay_max_requests must be an integer >= 1 (or null for all)")
        if self.servegen_clients is not None and (isinstance(self.servegen_clients, bool) or not isinstance(
                self.servegen_clients, int) or self.servegen_clients < 1):
            raise SpecError("servegen_clients must be an integer >= 1 (or null for all)")
        for name in ("context_len", "max_output_tokens", "max_tokens", "interactive_prompt_tokens",
                     "interactive_output_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SpecError(f"{name} must be an integer >= 1")
        if self.context_len < 2 * CONTEXT_MARGIN + 2:
            raise SpecError(f"context_len must be at least {2 * CONTEXT_MARGIN + 2}")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise SpecError("max_prompt_tokens must be >= 1")
        if self.ref_prefill_tps <= 0 or self.ref_tpot_s <= 0:
            raise SpecError("ref_prefill_tps and ref_tpot_s must be > 0")
        if self.tool_time_s < 0 or self.user_time_s < 0:
            raise SpecError("tool_time_s and user_time_s must be >= 0")


# annotation word -> (accepted types, how a message names it)
_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "float": ((int, float), "a number"), "int": ((int,), "an integer"), "str": ((str,), "a string"),
    "None": ((type(None),), "null"), "dict": ((dict,), "an object")}


def _check_type(name: str, value: Any, annotation: Any) -> None:
    """A spec file's value against the field's annotation (``float``, ``int | None``, ``dict[str, float]``...).

    The dataclass takes anything; checked here so that ``{"rate": "0.5"}`` is a :class:`SpecError` naming the
    field, not a TypeError deep in the generator. Booleans are not numbers here."""
    accepted: tuple[type, ...] = ()
    names = []
    for part in str(annotation).split("|"):
        types, label = _TYPES.get(part.strip().split("[")[0], ((object,), "any value"))
        accepted += types
        names.append(label)
    if isinstance(value, bool) or not isinstance(value, accepted):
        raise SpecError(f"{name} must be {' or '.join(names)}, got {value!r}")


def template_names() -> list[str]:
    return builtin_names() + [TRACE_PREFIX + name for name in TRACE_SOURCES]


def template_stats(name: str, spec: WorkloadSpec | None = None) -> dict[str, Any]:
    """Steps per workflow and mean lengths per role of one template (trace-derived: over the data's runs)."""
    spec = spec or WorkloadSpec()
    if name.startswith(TRACE_PREFIX):
        return load_trace_template(name[len(TRACE_PREFIX):], _think(spec)).stats()
    return load_file_template(name).stats()


def _think(spec: WorkloadSpec) -> ThinkTimes:
    return ThinkTimes(tool_s=spec.tool_time_s, user_s=spec.user_time_s)


class _Limits:
    def __init__(self, spec: WorkloadSpec):
        self.spec = spec
        self.clipped_prompts = 0
        self.clipped_outputs = 0

    def fit(self, prompt: int | None, output: int) -> tuple[int | None, int, int]:
        """(prompt, output, declared max_tokens) fitted into the context."""
        spec = self.spec
        cap = min(spec.max_output_tokens, spec.context_len // 2)
        if output > cap:
            output = cap
            self.clipped_outputs += 1
        if prompt is not None:
            limit = spec.context_len - output - CONTEXT_MARGIN
            if spec.max_prompt_tokens is not None:
                limit = min(limit, spec.max_prompt_tokens)
            if prompt > limit:
                prompt = max(1, limit)
                self.clipped_prompts += 1
            room = spec.context_len - prompt - CONTEXT_MARGIN
        else:
            room = spec.context_len - CONTEXT_MARGIN
        return prompt, output, max(output, min(spec.max_tokens, room))

    def steps(self, steps: list[Step]) -> list[Step]:
        for step in steps:
            step.prompt_tokens, step.output_tokens, step.max_tokens = self.fit(step.prompt_tokens,
                                                                               step.output_tokens)
        return steps


def reference_path_s(steps: list[Step], spec: WorkloadSpec, scale: float = 1.0) -> float:
    """The workflow's critical path: pauses plus ``scale`` x the reference service time of each call."""
    finish: dict[str, float] = {}
    for step in steps:
        service = step.prompt_token_count() / spec.ref_prefill_tps + step.output_tokens * spec.ref_tpot_s
        start = max((finish[d] for d in step.depends_on), default=0.0) + step.think_time_s
        finish[step.id] = start + scale * service
    return max(finish.values(), default=0.0)


def _lognormal(rng: np.random.Generator, mean: float, sigma: float) -> int:
    return max(1, int(round(mean * math.exp(rng.normal(-sigma * sigma / 2, sigma)))))


def build_workload(spec: WorkloadSpec | dict[str, Any]) -> Workload:
    """Generate the workload ``spec`` describes (deterministic for a given spec, seed included)."""
    if isinstance(spec, dict):
        spec = WorkloadSpec.from_dict(spec)
    else:
        spec.validate()
    arrival_rng, mix_rng, length_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(spec.seed).spawn(3))
    limits = _Limits(spec)
    workflows: list[Workflow] = []
    counts: dict[str, int] = {}
    meta: dict[str, Any] = {"generator": "loadgen.workloads", "spec": spec.to_json()}

    if spec.rate > 0:
        names = [n for n, w in spec.templates.items() if w > 0]
        weights = np.array([spec.templates[n] for n in names], dtype=float)
        weights = weights / weights.sum() if len(names) else weights
        makers = {name: _maker(name, spec) for name in names} if spec.interactive_share < 1 else {}
        pairs = length_pairs(spec.interactive_lengths) if (spec.interactive_share > 0 and
                                                            spec.interactive_lengths != "synthetic") else None
        times, meta["arrival"] = generate_arrivals(
            spec.arrival, spec.rate, spec.duration_s, arrival_rng, cv=spec.cv, cv_quantile=spec.cv_quantile,
            servegen_category=spec.servegen_category, servegen_model=spec.servegen_model,
            servegen_window_s=spec.servegen_window_s, servegen_clients=spec.servegen_clients)
        for index, arrival in enumerate(times):
            arrival = round(float(arrival), 6)
            if mix_rng.random() < spec.interactive_share:
                if pairs is not None:
                    row = int(length_rng.integers(len(pairs[0])))
                    prompt, output = int(pairs[0][row]), int(pairs[1][row])
                else:
                    prompt = _lognormal(length_rng, spec.interactive_prompt_tokens, INTERACTIVE_PROMPT_SIGMA)
                    output = _lognormal(length_rng, spec.interactive_output_tokens, INTERACTIVE_OUTPUT_SIGMA)
                prompt, output, max_tokens = limits.fit(prompt, output)
                workflows.append(Workflow(
                    id=f"chat-{index:05d}", arrival_s=arrival, kind="interactive", slo_class=spec.interactive_slo_class,
                    template="interactive",
                    steps=[Step(id="call", role="assistant", output_tokens=output, prompt_tokens=prompt,
                                max_tokens=max_tokens)]))
                counts["interactive"] = counts.get("interactive", 0) + 1
                continue
            name = names[int(mix_rng.choice(len(names), p=weights))]
            steps = limits.steps(makers[name](length_rng))
            deadline = None
            if spec.deadline_scale is not None:
                deadline = round(reference_path_s(steps, spec, spec.deadline_scale), 3)
            short = _ID_BAD.sub("_", name.rsplit("/", 1)[-1].removesuffix(".json").replace(":", "-"))[:100]
            workflows.append(Workflow(id=f"{short}-{index:05d}", arrival_s=arrival, steps=steps, kind="workflow",
                                      deadline_s=deadline, slo_class=spec.workflow_slo_class, template=name))
            counts[name] = counts.get(name, 0) + 1

    if spec.replay is not None:
        arrivals, prompts, outputs = replay_requests(spec.replay, time_scale=spec.replay_time_scale,
                                                     start_s=spec.replay_start_s, duration_s=spec.duration_s,
                                                     max_requests=spec.replay_max_requests)
        if not len(arrivals):
            raise SpecError(f"replay {spec.replay}: no calls from {spec.replay_start_s:g} trace seconds in over "
                            f"{spec.duration_s:g} s at time scale {spec.replay_time_scale:g} (the trace spans "
                            f"{trace_span_s(spec.replay):,.0f} s)")
        for index, (arrival, prompt, output) in enumerate(zip(arrivals, prompts, outputs)):
            prompt, output, max_tokens = limits.fit(int(prompt), int(output))
            workflows.append(Workflow(
                id=f"{spec.replay}-{index:05d}", arrival_s=round(float(arrival), 6), kind="interactive",
                slo_class=spec.replay_slo_class, template=f"replay:{spec.replay}",
                steps=[Step(id="call", role="assistant", output_tokens=output, prompt_tokens=prompt,
                            max_tokens=max_tokens)]))
        counts[f"replay:{spec.replay}"] = len(arrivals)
        meta["replay"] = {"trace": spec.replay, "time_scale": spec.replay_time_scale,
                          "start_s": spec.replay_start_s, "requests": len(arrivals)}

    workflows.sort(key=lambda w: (w.arrival_s, w.id))
    meta["counts"] = counts
    meta["requests"] = sum(len(w.steps) for w in workflows)
    meta["clipped"] = {"prompts": limits.clipped_prompts, "outputs": limits.clipped_outputs}
    name = spec.name or "+".join(sorted(counts)) or "empty"
    return Workload(workflows=workflows, name=name, model=spec.model, seed=spec.seed, meta=meta)


def _maker(name: str, spec: WorkloadSpec):
    if name.startswith(TRACE_PREFIX):
        template = load_trace_template(name[len(TRACE_PREFIX):], _think(spec))
        return lambda rng: template.instantiate(rng, spec.trace_lengths)
    file_template = load_file_template(name)
    return lambda rng: file_template.instantiate(rng, spec.jitter)
