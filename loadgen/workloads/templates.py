"""Built-in workflow templates, shipped as ``maestro-workload/1`` files under ``loadgen/templates/*.json``.

Each file holds one workflow (``arrival_s`` 0) whose DAG follows a public framework's published design
(``meta.framework``, ``meta.structure``, ``meta.reference`` say which); the token counts are round numbers chosen
by hand (``meta.token_counts`` says so), not taken from any trace. Any other workload file can be used as a
template too: give its path (every workflow in it becomes one variant, drawn uniformly).

An instance copies the template's steps and jitters the lengths: each step's output is multiplied by a
mean-one lognormal factor with ``sigma = jitter``, and all prompts of the instance by one shared factor with
``sigma = jitter / 2`` (so prompts still grow along the chain). ``jitter = 0`` gives the template exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from loadgen.workload import Step, Workflow, load_workload

TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "templates"


def builtin_names() -> list[str]:
    return sorted(p.stem for p in TEMPLATE_DIR.glob("*.json"))


@dataclass(frozen=True)
class FileTemplate:
    name: str
    variants: tuple[Workflow, ...]
    meta: dict[str, Any]

    def instantiate(self, rng: np.random.Generator, jitter: float = 0.25) -> list[Step]:
        base = self.variants[int(rng.integers(len(self.variants)))] if len(self.variants) > 1 else self.variants[0]
        prompt_factor = _lognormal_factor(rng, jitter / 2)
        steps = []
        for step in base.steps:
            output = max(1, round(step.output_tokens * _lognormal_factor(rng, jitter)))
            prompt = None if step.prompt_tokens is None else max(1, round(step.prompt_tokens * prompt_factor))
            steps.append(Step(id=step.id, role=step.role, output_tokens=output, prompt_tokens=prompt,
                              prompt_text=step.prompt_text, depends_on=step.depends_on,
                              think_time_s=step.think_time_s, max_tokens=max(step.max_tokens, output)))
        return steps

    def stats(self) -> dict[str, Any]:
        steps = [s for w in self.variants for s in w.steps]
        roles: dict[str, list[Step]] = {}
        for s in steps:
            roles.setdefault(s.role, []).append(s)
        return {
            "variants": len(self.variants),
            "steps_per_workflow": round(len(steps) / len(self.variants), 1),
            "critical_path_steps": max(_depth(w) for w in self.variants),
            "roles": {role: {"calls": len(ss),
                             "mean_prompt_tokens": round(sum(s.prompt_token_count() for s in ss) / len(ss), 1),
                             "mean_output_tokens": round(sum(s.output_tokens for s in ss) / len(ss), 1)}
                      for role, ss in roles.items()},
            "description": self.meta.get("description"),
        }


def _lognormal_factor(rng: np.random.Generator, sigma: float) -> float:
    if sigma <= 0:
        return 1.0
    return math.exp(rng.normal(-sigma * sigma / 2, sigma))


def _depth(workflow: Workflow) -> int:
    depth: dict[str, int] = {}
    for step in workflow.steps:  # parse_workload guarantees dependencies come earlier
        depth[step.id] = 1 + max((depth[d] for d in step.depends_on), default=0)
    return max(depth.values(), default=0)


@lru_cache(maxsize=64)
def load_file_template(name_or_path: str) -> FileTemplate:
    """A built-in template by name (``chatdev``, ``metagpt``...) or any workload file by path."""
    path = Path(name_or_path)
    if not (name_or_path.endswith(".json") or path.is_file()):
        path = TEMPLATE_DIR / f"{name_or_path}.json"
        if not path.is_file():
            raise ValueError(f"unknown template {name_or_path!r}; built-in: {', '.join(builtin_names())}; "
                             "trace-derived: trace:chatdev, trace:ag2, trace:magentic-one, trace:tau-bench; "
                             "or the path of a workload .json file")
    workload = load_workload(path)
    variants = tuple(w for w in workload.workflows if not w.interactive)
    if not variants:
        raise ValueError(f"template {name_or_path!r} has no multi-step workflow")
    return FileTemplate(workload.name if path.parent == TEMPLATE_DIR else str(path), variants, workload.meta)
