"""What a discrete-event simulation runs on (:class:`SimConfig`): clusters of pools of engines, their network
round trips, and the gateway's scheduling settings (queue policy, admission, cluster routing).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from gateway.core.admission import ADMISSION_POLICIES
from gateway.core.queue_policy import STEP_TIME_WINDOW_S, make_queue_policy
from gateway.core.request import DEFAULT_SLO_CLASSES, SLOClass


@dataclass(frozen=True)
class EngineSpec:
    """One simulated engine (the knobs of :class:`backends.sim.options.SimEngineOptions` that matter here)."""

    max_num_seqs: int = 128
    kv_blocks: int = 16384
    block_size: int = 16
    max_num_batched_tokens: int = 8192
    max_model_len: int = 8192
    cost_scale: float = 1.0  # multiplies every cost-model time (EngineCostModel's ``scale``)
    kv_bytes_per_token: int | None = None  # None: the cost model's (from the calibration)

    def validate(self) -> None:
        for name in ("max_num_seqs", "kv_blocks", "block_size", "max_num_batched_tokens", "max_model_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"engine.{name} must be a positive integer, got {value!r}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError("engine.max_num_batched_tokens must be >= max_num_seqs (as vLLM requires)")
        if self.kv_blocks * self.block_size < self.max_model_len:
            raise ValueError("engine.kv_blocks * block_size must hold one max_model_len sequence")
        if not self.cost_scale > 0:
            raise ValueError("engine.cost_scale must be > 0")


@dataclass(frozen=True)
class PoolSpec:
    name: str = "llm"
    engines: int = 16
    engine: EngineSpec = field(default_factory=EngineSpec)
    models: tuple[str, ...] = ()  # models it serves; empty: any


@dataclass(frozen=True)
class ClusterSpec:
    name: str
    rtt_s: float = 0.0  # client/gateway <-> cluster round trip
    pools: tuple[PoolSpec, ...] = (PoolSpec(),)


@dataclass
class SimConfig:
    clusters: list[ClusterSpec] = field(default_factory=lambda: [ClusterSpec("c0"), ClusterSpec("c1")])
    queue_policy: str = "maestro"
    queue_options: dict[str, Any] = field(default_factory=dict)
    admission: str = "predicted"
    cluster_routing: str = "latency_aware"
    routing_options: dict[str, Any] = field(default_factory=dict)
    queue_per_engine: int = 8  # dispatch slots beyond max_num_seqs (a small engine-side queue)
    growth_step_tokens: int = 256  # grown_reservation's chunk
    sample_interval_s: float = 1.0  # time-series sampling period (0: no series)
    slo_classes: dict[str, SLOClass] = field(default_factory=lambda: dict(DEFAULT_SLO_CLASSES))
    step_hint: bool = True  # the client tells the gateway how many steps a workflow has (X-Workflow-Steps)
    mean_step_s: float | None = None  # maestro's mean step time; None: mean predicted step service of the workload
    # learn the mean step time online from the predicted service of completed workflow steps, as the live gateway
    # does (queue_policy.StepTimeMean over step_time_window_s); queues are re-keyed once it drifted 5 %
    learn_step_time: bool = True
    step_time_window_s: float = STEP_TIME_WINDOW_S
    nominal_batch: int | None = None  # batch at which service times are predicted (None: max_num_seqs // 2)
    nominal_context: int = 2048  # context per sequence at which service times are predicted
    # the gateway's estimate of a prompt is round(ratio x the engine's count): its character-based estimator
    # (predictor.tokens) is not the engine's tokenizer. 1.0: exact. E4 measures it on the live runner's prompts.
    prompt_estimate_ratio: float = 1.0
    reference: bool = False  # use the plain PoolScheduler (slow) instead of FastPool
    calibration_dir: str | None = None
    max_events: int | None = None  # safety valve for tests

    def validate(self) -> None:
        if not self.clusters:
            raise ValueError("at least one cluster is needed")
        names = [c.name for c in self.clusters]
        if len(set(names)) != len(names):
            raise ValueError("cluster names must be unique")
        for c in self.clusters:
            if c.rtt_s < 0:
                raise ValueError(f"cluster {c.name}: rtt_s must be >= 0")
            if not c.pools:
                raise ValueError(f"cluster {c.name}: needs a pool")
            for p in c.pools:
                # a pool without engines can never serve what is routed to it (the run would stall or end with
                # requests nowhere); leave the cluster out instead
                if isinstance(p.engines, bool) or not isinstance(p.engines, int) or p.engines < 1:
                    raise ValueError(f"cluster {c.name} pool {p.name}: engines must be >= 1, got {p.engines!r}")
                p.engine.validate()
        if self.admission not in ADMISSION_POLICIES:
            raise ValueError(f"unknown admission policy {self.admission!r}")
        if self.queue_per_engine < 0:
            raise ValueError("queue_per_engine must be >= 0")
        if not self.prompt_estimate_ratio > 0:
            raise ValueError("prompt_estimate_ratio must be > 0")
        if not (self.sample_interval_s >= 0 and math.isfinite(self.sample_interval_s)):
            raise ValueError(f"sample_interval_s must be a finite number >= 0 (0: no time series), "
                             f"got {self.sample_interval_s!r}")
        # the options go to the policy's constructor as keywords: checked here so that a list or an unknown
        # name (simulate --queue-options '[1]' / '{"bogus": 1}') is a ValueError, not a TypeError in _build
        if not isinstance(self.queue_options, dict):
            raise ValueError(f"queue_options must be an object of the {self.queue_policy} policy's options, "
                             f"got {self.queue_options!r:.80}")
        try:
            make_queue_policy(self.queue_policy, **self.queue_options)
        except TypeError as exc:
            raise ValueError(f"queue_options {self.queue_options!r:.80} do not fit the {self.queue_policy} "
                             f"policy: {exc}") from None


def two_cluster_config(engines: int = 16, engine: EngineSpec | None = None, rtt_s: tuple[float, float] = (0.002, 0.002),
                       **options: Any) -> SimConfig:
    """The usual setup: two clusters of ``engines`` identical engines each."""
    engine = engine or EngineSpec()
    clusters = [ClusterSpec(f"c{i}", rtt_s=rtt, pools=(PoolSpec("llm", engines, engine),))
                for i, rtt in enumerate(rtt_s)]
    return SimConfig(clusters=clusters, **options)
