"""Engine choice inside a pool (gateway/core/routing.py)."""

from __future__ import annotations

import random

from gateway.core.engines import EngineMetrics, EngineState
from gateway.core.routing import LeastLoaded, RoundRobin


def _engine(index: int, waiting: float = 0.0, kv_usage: float = 0.0) -> EngineState:
    return EngineState(engine_id=f"local/dit/{index}", url=f"http://127.0.0.1:{9000 + index}", cluster="local",
                       pool="dit", kind="vllm-omni", models=("m",), up=True,
                       metrics=EngineMetrics(waiting=waiting, kv_usage=kv_usage))


def test_least_loaded_takes_the_engine_with_the_fewest_requests_then_the_least_kv():
    engines = [_engine(0), _engine(1), _engine(2)]
    policy = LeastLoaded(random.Random(1))
    for _ in range(20):
        assert policy.choose(engines, {"local/dit/0": 2, "local/dit/1": 1, "local/dit/2": 3}).engine_id \
            == "local/dit/1"
    busy = [_engine(0, waiting=1), _engine(1, waiting=0, kv_usage=0.5), _engine(2, kv_usage=0.2)]
    assert {policy.choose(busy, {}).engine_id for _ in range(20)} == {"local/dit/2"}


def test_least_loaded_spreads_ties_so_that_gateways_do_not_all_pick_the_same_engine():
    """Each gateway counts only its own requests, and a DiT engine shows no queue: with a fixed tie-break
    every gateway sent its next image to the same engine (two gateways, two engines: one engine did all six
    requests of three rounds while the other sat idle)."""
    idle = [_engine(0), _engine(1)]
    first_picks = {LeastLoaded().choose(idle, {}).engine_id for _ in range(64)}  # 64 gateways' first requests
    assert first_picks == {"local/dit/0", "local/dit/1"}
    policy = LeastLoaded(random.Random(7))
    picks = [policy.choose(idle, {}).engine_id for _ in range(400)]
    assert 120 < picks.count("local/dit/0") < 280  # about half each


def test_one_candidate_is_the_choice_of_every_policy():
    only = [_engine(3, waiting=9)]
    assert LeastLoaded().choose(only, {"local/dit/3": 5}) is only[0]
    assert RoundRobin().choose(only, {}) is only[0]
