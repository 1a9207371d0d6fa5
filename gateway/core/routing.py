"""Engine choice inside a pool, as named plugins.

A policy gets the candidate engines (already filtered to those that are up, awake and serve the model, and
not yet tried for this request) plus the gateway's own in-flight counts, and returns one engine id.
Baselines are first-class plugins so every claim is a comparison with them.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Protocol

from gateway.core.engines import EngineState


class RoutingPolicy(Protocol):
    name: str

    def choose(self, candidates: Sequence[EngineState], inflight: Mapping[str, int]) -> EngineState: ...


class RoundRobin:
    """Cycle through the candidates; ignores load (baseline)."""

    name = "round_robin"

    def __init__(self) -> None:
        self._counter = 0

    def choose(self, candidates: Sequence[EngineState], inflight: Mapping[str, int]) -> EngineState:
        self._counter += 1
        return candidates[self._counter % len(candidates)]


class LeastLoaded:
    """Fewest requests on the engine: the gateway's own in-flight count (exact, current) plus the engine's
    last scraped waiting queue (covers load from other gateways), then KV usage; ties broken at random.

    Why at random and not by id: each gateway counts only its own requests, and a DiT engine (``/health``
    only) or a vLLM engine between two scrapes shows none of the others'. With a fixed order, every gateway
    sent its next request to the same first engine, and a burst through two gateways queued on one engine
    while the other sat idle."""

    name = "least_loaded"

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def choose(self, candidates: Sequence[EngineState], inflight: Mapping[str, int]) -> EngineState:
        if len(candidates) == 1:
            return candidates[0]
        loads = [(inflight.get(e.engine_id, 0) + e.metrics.waiting, e.metrics.kv_usage) for e in candidates]
        lowest = min(loads)
        tied = [e for e, load in zip(candidates, loads) if load == lowest]
        return tied[0] if len(tied) == 1 else self._rng.choice(tied)


ROUTING_POLICIES: dict[str, type] = {RoundRobin.name: RoundRobin, LeastLoaded.name: LeastLoaded}


def make_routing_policy(name: str) -> RoutingPolicy:
    try:
        return ROUTING_POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown routing policy {name!r}; known: {', '.join(sorted(ROUTING_POLICIES))}") from None


def eligible(engines: Sequence[EngineState], model: str, exclude: set[str]) -> list[EngineState]:
    """Engines that can take a request for ``model`` now: up, awake, serving it, not already tried."""
    return [e for e in engines if e.up and not e.sleeping and model in e.models and e.engine_id not in exclude]
