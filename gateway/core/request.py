"""The scheduler's view of one request and of the workflow it belongs to.

Plain data, no I/O: the live gateway builds these from HTTP headers / ``metadata`` and the predictor, the
discrete-event simulator builds them from workload files, and both hand them to the same policies.
All times are seconds on one clock chosen by the caller (``time.time()`` live, virtual time in the DES).
"""

from __future__ import annotations

from dataclasses import dataclass, field

INTERACTIVE = "interactive"


@dataclass(frozen=True)
class SLOClass:
    """Targets for one class of traffic (config ``slo_classes``)."""

    name: str
    ttft_s: float  # time-to-first-token target
    tpot_s: float  # time-per-output-token target
    workflow_deadline_s: float | None = None  # default end-to-end budget of a workflow of this class


DEFAULT_SLO_CLASSES = {
    INTERACTIVE: SLOClass(INTERACTIVE, ttft_s=2.0, tpot_s=0.1),
    "batch": SLOClass("batch", ttft_s=30.0, tpot_s=0.2, workflow_deadline_s=600.0),
}


@dataclass(slots=True)
class SchedRequest:
    """One generation request as the scheduling core sees it."""

    request_id: str
    model: str
    arrival: float
    prompt_tokens: int
    max_tokens: int  # hard cap on output (explicit, or the model's context minus the prompt), over all answers
    pred_p50: int  # predicted output tokens, median (over all answers)
    pred_p90: int  # predicted output tokens, 90th percentile (what the `predicted` admission reserves)
    role: str = "other"
    slo_class: str = INTERACTIVE
    workflow_id: str | None = None
    step: int = 0
    deadline: float | None = None  # absolute; for a workflow step, the workflow's deadline
    ttft_deadline: float | None = None  # absolute time the first token is due (arrival + class TTFT target)
    prompts: int = 1  # distinct prompts (a legacy completion's batch), prompt_tokens being their sum
    sequences: int = 1  # answers the engine runs: n for each prompt (see admission.kv_footprint)
    # set by the scheduler
    engine_id: str | None = None
    admitted_at: float | None = None
    reserved_tokens: int = 0

    @property
    def interactive(self) -> bool:
        return self.workflow_id is None


@dataclass(slots=True)
class WorkflowState:
    """What the gateway knows about a running multi-agent workflow (kept in the state store)."""

    workflow_id: str
    arrival: float
    deadline: float | None
    slo_class: str = "batch"
    steps_done: int = 0
    tokens_used: int = 0
    expected_steps: int | None = None  # hint from the client (X-Workflow-Steps) or a learned mean
    inflight: set[str] = field(default_factory=set)
    last_activity: float = 0.0

    def remaining_steps(self, default_steps: int) -> int:
        """Steps still to come after those done and in flight (never negative)."""
        total = self.expected_steps if self.expected_steps is not None else default_steps
        return max(0, total - self.steps_done - len(self.inflight))
