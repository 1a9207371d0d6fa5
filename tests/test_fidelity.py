"""E4 (simulator fidelity): the setup both sides share, the comparison, and one tiny live-vs-simulated run.

The live run starts real helper processes (simulated engines, gateway) and takes a few seconds; it checks
behaviour (every request completes on both sides, the same requests, comparable result files), never how close
the numbers are: timing on a loaded CI machine is not something a test can promise.
"""

from __future__ import annotations

import orjson
import pytest

from gateway.cli import main as maestro_main
from gateway.config import parse_config
from loadgen.des import ClusterSpec, PoolSpec, SimConfig, simulate
from loadgen.fidelity import (COMPARED, FidelitySetup, compare, fidelity_table, figures, perturbed,
                              prompt_estimate_ratio, request_key, run_simulated)
from loadgen.report import load_run
from loadgen.results import RequestResult
from loadgen.workload import Step, Workflow, Workload

TINY = dict(rate=0.3, window_s=15.0, seed=2, templates=("debate", "react-tools"), time_scale=20.0)


def test_gateway_config_mirrors_the_simulator_on_the_compressed_clock():
    setup = FidelitySetup(time_scale=10.0, engines=3, max_num_seqs=32, kv_blocks=2048, queue_per_engine=4,
                          policy="edf", admission="max_tokens")
    urls = [f"http://127.0.0.1:{9000 + i}" for i in range(3)]
    config = parse_config(setup.gateway_config(urls, "m", mean_step_s=4.0))  # a valid gateway config
    sim = setup.sim_config()
    spec = sim.clusters[0].pools[0].engine
    assert sim.clusters[0].pools[0].engines == 3 and spec.max_num_seqs == 32 and spec.kv_blocks == 2048
    assert config.scheduling.queue_policy == sim.queue_policy == "edf"
    assert config.scheduling.admission == sim.admission == "max_tokens"
    assert config.scheduling.max_outstanding_per_engine == spec.max_num_seqs + sim.queue_per_engine
    pool = config.clusters[0].pools[0]
    assert [e.url for e in pool.engines] == urls and pool.kv_capacity_tokens == 2048 * spec.block_size
    # every time constant of the gateway runs on the compressed clock, the engines' by the same factor
    classes = {c.name: c for c in config.slo_classes}
    assert classes["interactive"].ttft_s == pytest.approx(sim.slo_classes["interactive"].ttft_s / 10)
    assert classes["batch"].workflow_deadline_s == pytest.approx(sim.slo_classes["batch"].workflow_deadline_s / 10)
    assert config.scheduling.mean_step_s == pytest.approx(0.4)
    options = setup.engine_options("m")
    assert options["time_scale"] == 10.0 and options["cost_scale"] == spec.cost_scale
    assert options["scheduling_policy"] == "fcfs"  # the simulator's engines do not model vLLM priorities


def test_compare_judges_attainment_in_points_and_latency_relative():
    live = {"workflow_attainment": 0.70, "request_attainment": 0.80, "mean_e2e_s": 44.0, "mean_ttft_s": 3.0}
    sim = {"workflow_attainment": 0.76, "request_attainment": 0.82, "mean_e2e_s": 40.0, "mean_ttft_s": 2.0}
    rows = {r["key"]: r for r in compare(live, sim, {"workflow_attainment": (0.6, 0.76, 0.8)})}
    assert rows["workflow_attainment"]["difference"] == pytest.approx(-6.0)
    assert rows["workflow_attainment"]["met"] is False and rows["workflow_attainment"]["live_in_spread"] is True
    # the estimate is the simulations' median, not the one unperturbed run (live and it are both single draws)
    spread = {"workflow_attainment": (0.6, 0.72, 0.8)}
    row = {r["key"]: r for r in compare(live, sim, spread)}["workflow_attainment"]
    assert row["simulated"] == 0.72 and row["simulated_single"] == 0.76 and row["met"] is True
    assert rows["request_attainment"]["met"] is True
    assert rows["mean_e2e_s"]["difference"] == pytest.approx(0.10) and rows["mean_e2e_s"]["met"] is True
    assert rows["mean_ttft_s"]["met"] is None  # information only
    assert rows["p90_e2e_s"]["difference"] is None  # missing on both sides: no verdict
    assert {r["key"] for r in compare(live, sim)} == {key for _, key, _ in COMPARED}


def test_request_keys_match_live_and_simulated_ids():
    def request(rid: str, workflow: str | None, step: str) -> RequestResult:
        return RequestResult(rid, workflow, step, "r", "batch", 0.0, 1, 1)

    assert request_key(request("lgab12cd-chat-00003-call", None, "call")) == ("chat-00003", "call")
    assert request_key(request("chat-00003/call", None, "call")) == ("chat-00003", "call")
    assert request_key(request("lgab12cd-debate-00001-judge", "debate-00001", "judge")) == ("debate-00001", "judge")


def test_perturbed_moves_start_times_by_at_most_the_jitter_and_is_seeded():
    workload = FidelitySetup(**TINY).workload()
    a, b = perturbed(workload, 0.01, seed=3), perturbed(workload, 0.01, seed=3)
    assert [w.arrival_s for w in a.workflows] == [w.arrival_s for w in b.workflows]
    assert a.to_json() != workload.to_json()
    for before, after in zip(workload.workflows, a.workflows):
        assert abs(before.arrival_s - after.arrival_s) <= 0.01 and after.arrival_s >= 0
        for old, new in zip(before.steps, after.steps):
            assert 0 <= new.think_time_s - old.think_time_s <= 0.01
            assert new.think_time_s == old.think_time_s or old.depends_on  # first steps start with the workflow


def test_gateway_prompt_estimate_is_modelled_in_the_simulator():
    """The live gateway estimates the runner's synthetic prompts at ~0.9 of the engines' count; the simulator
    reserves (and grows) against the same estimate when told the ratio, while its engines keep the true count."""
    workload = Workload([Workflow(f"chat-{i}", 0.5 * i, [Step("call", "assistant", 40, 3000, max_tokens=400)],
                                  kind="interactive", slo_class="interactive") for i in range(6)])
    ratio = prompt_estimate_ratio(workload)
    assert 0.85 < ratio < 0.95
    config = dict(clusters=[ClusterSpec("c0", pools=(PoolSpec("llm", 1),))], queue_policy="edf",
                  admission="predicted", sample_interval_s=0)
    exact = simulate(workload, SimConfig(**config))
    estimated = simulate(workload, SimConfig(**config, prompt_estimate_ratio=ratio))
    assert all(r.status == "ok" for r in estimated.requests)
    assert all(r.prompt_tokens == 3000 for r in estimated.requests)  # the engines' count
    assert sum(r.reserved_tokens for r in estimated.requests) < sum(r.reserved_tokens for r in exact.requests)
    with pytest.raises(ValueError, match="prompt_estimate_ratio"):
        SimConfig(**config, prompt_estimate_ratio=0).validate()


def test_simulated_side_is_deterministic():
    setup = FidelitySetup(**TINY)
    workload = setup.workload()
    first, second = run_simulated(setup, workload, 0.9), run_simulated(setup, workload, 0.9)
    assert [r.to_json() for r in first.requests] == [r.to_json() for r in second.requests]
    assert figures(first)["requests_ok"] == figures(first)["requests"] > 0


def test_e4_tiny_live_and_simulated(tmp_path, capsys):
    """`maestro loadgen experiment E4` end to end on a tiny workload (a few seconds of wall time)."""
    out = tmp_path / "E4.json"
    code = maestro_main(["loadgen", "experiment", "E4", "--rates", "0.3", "--window", "15", "--seed", "2",
                         "--templates", "debate,react-tools", "--time-scale", "20", "--spread-runs", "2",
                         "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "## E4: simulator fidelity" in printed and "| 0.3 | request SLOs met |" in printed
    data = orjson.loads(out.read_bytes())
    point = data["points"][0]
    assert point["live"]["requests"] == point["simulated"]["requests"] > 0
    assert point["live"]["requests_ok"] == point["live"]["requests"]  # every request completed live
    assert point["simulated"]["requests_ok"] == point["simulated"]["requests"]
    assert point["live"]["workflows"] == point["simulated"]["workflows"] > 0
    assert point["live_meta"]["end"] == "completed" and not point["live_meta"]["errors"]
    assert point["live_meta"]["engine_stats"]["finished"] >= point["live"]["requests"]  # plus the warm-up calls
    # both result files load with the report code and describe the same requests in the same (workload) seconds
    live, simulated = load_run(point["files"]["live"]), load_run(point["files"]["simulated"])
    assert live.mode == "live" and simulated.mode == "simulate" and live.meta["time_base"] == "workload"
    assert {request_key(r) for r in live.requests} == {request_key(r) for r in simulated.requests}
    assert set(point["offset"]) == {"matched", "median_ttft_s", "median_e2e_s"}
    rows = {row["key"]: row for row in point["comparison"]}
    assert isinstance(rows["mean_e2e_s"]["difference"], float) and rows["mean_e2e_s"]["met"] in (True, False)
    assert rows["mean_reserved_kv_tokens"]["live"] > 0 and rows["mean_reserved_kv_tokens"]["simulated"] > 0
    assert live.series["reserved_kv_tokens"] and live.series["used_kv_tokens"]  # sampled in the helpers
    assert fidelity_table(data["points"]).count("\n") == len(COMPARED) + 1
