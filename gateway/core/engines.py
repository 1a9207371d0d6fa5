"""What the gateway knows about one engine, and the pure rule that turns probe results into up/down.

The monitor (``gateway.control.monitor``) does the I/O; this module only decides, so the same rule runs in
the live gateway and in the simulator.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any


@dataclass(frozen=True)
class EngineMetrics:
    """The subset of an engine's Prometheus metrics the scheduler uses (summed over the ``engine`` label)."""

    running: float = 0.0
    waiting: float = 0.0
    kv_usage: float = 0.0  # fraction 0..1 (vLLM's ``kv_cache_usage_perc`` is a fraction despite its name)
    preemptions_total: float = 0.0
    prompt_tokens_total: float = 0.0
    generation_tokens_total: float = 0.0
    sleeping: bool = False
    kv_capacity_tokens: int = 0  # num_gpu_blocks x block_size from ``vllm:cache_config_info`` (0: not exported)
    kv_block_size: int = 0  # block_size from ``vllm:cache_config_info`` (the largest; 0: not exported)


@dataclass(frozen=True)
class EngineSpec:
    """A configured engine: what the config says (with simulated engines' URLs filled in), fixed for its life."""

    engine_id: str
    url: str
    cluster: str
    pool: str
    kind: str
    models: tuple[str, ...]


@dataclass(frozen=True)
class EngineState(EngineSpec):
    """One engine as the gateway sees it: its spec plus what probing has learned. ``up`` starts False until the
    first successful probe."""

    up: bool = False
    sleeping: bool = False
    metrics: EngineMetrics = field(default_factory=EngineMetrics)
    consecutive_failures: int = 0
    consecutive_successes: int = 0
    last_ok: float | None = None
    last_error: str = ""
    updated_at: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        data = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "metrics"}
        data["models"] = list(self.models)
        data["metrics"] = {k: getattr(self.metrics, k) for k in EngineMetrics.__dataclass_fields__}
        return data

    @classmethod
    def of(cls, spec: EngineSpec) -> "EngineState":
        """The state of a just-configured engine (not yet probed)."""
        return cls(**{name: getattr(spec, name) for name in EngineSpec.__dataclass_fields__})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EngineState":
        values = {k: data[k] for k in cls.__dataclass_fields__ if k in data and k != "metrics"}
        values["models"] = tuple(values.get("models", ()))
        metrics = data.get("metrics") or {}
        values["metrics"] = EngineMetrics(**{k: metrics[k] for k in EngineMetrics.__dataclass_fields__
                                              if k in metrics})
        return cls(**values)


def apply_probe_success(state: EngineState, metrics: EngineMetrics, now: float,
                        up_after_successes: int) -> EngineState:
    """A scrape answered: count the success and mark the engine up once enough in a row succeeded."""
    successes = state.consecutive_successes + 1
    up = state.up or successes >= up_after_successes
    return replace(state, up=up, sleeping=metrics.sleeping, metrics=metrics, consecutive_failures=0,
                   consecutive_successes=successes, last_ok=now, last_error="", updated_at=now)


def apply_probe_failure(state: EngineState, error: str, now: float, down_after_failures: int) -> EngineState:
    """A scrape failed: mark the engine down only after ``down_after_failures`` failures in a row,
    so one slow scrape under load does not take a healthy engine out of rotation."""
    failures = state.consecutive_failures + 1
    up = state.up and failures < down_after_failures
    return replace(state, up=up, consecutive_failures=failures, consecutive_successes=0,
                   last_error=error, updated_at=now)
