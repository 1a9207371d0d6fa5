"""loadgen: workload generation (templates, traces, replay, arrivals), the live runner, and reports."""

from __future__ import annotations

import argparse
import asyncio

import numpy as np
import orjson
import pytest

from loadgen.live import (LiveOptions, LiveRunner, add_live_arguments, build_messages, live_main, options_from_args,
                          run_live,
                          synth_prompt)
from loadgen.report import add_report_arguments, load_run, report_main, write_report
from loadgen.results import RequestResult, RunResult, WorkflowResult
from loadgen.workload import Step, Workflow, Workload, WorkloadError, arrival_rate, load_workload, parse_workload
from loadgen.workloads import (SpecError, WorkloadSpec, add_workload_arguments, build_workload, builtin_names,
                               reference_path_s, template_stats, workload_main)
from loadgen.workloads.arrivals import (constant_arrivals, gamma_arrivals, generate_arrivals, poisson_arrivals,
                                        servegen_arrivals, servegen_gamma_cv)
from loadgen.workloads.data import (AZURE_2023, CHATDEV, MOONCAKE, SERVEGEN, TAU_BENCH, WHO_AND_WHEN, available,
                                    data_dir)
from loadgen.workloads.replay import load_trace_rows, replay_requests
from loadgen.workloads.templates import TEMPLATE_DIR, load_file_template
from loadgen.workloads.traces import TRACE_SOURCES, load_trace_template
from predictor.trace import ROLES


def needs(*datasets: str):
    missing = [d for d in datasets if not available(d)]
    return pytest.mark.skipif(bool(missing), reason=f"third-party data not available: {', '.join(missing)} not "
                                                    f"under {data_dir()} (set MAESTRO_DATA_DIR)")


# ---------------------------------------------------------------------------------------------- workload files

def test_workload_file_round_trip(tmp_path):
    workload = build_workload({"templates": {"metagpt": 1, "debate": 2}, "interactive_share": 0.3, "rate": 2.0,
                               "duration_s": 20, "seed": 5})
    assert {w.template for w in workload.workflows} <= {"metagpt", "debate", "interactive"}
    path = tmp_path / "w.json"
    workload.save(path)
    again = load_workload(path)
    assert again.to_json() == workload.to_json()
    assert again.meta["spec"]["seed"] == 5 and again.meta["counts"]
    kinds = {w.kind for w in again.workflows}
    assert kinds == {"workflow", "interactive"}
    for workflow in again.workflows:
        assert workflow.steps and all(s.output_tokens <= s.max_tokens for s in workflow.steps)


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.update(format="other"), "format"),
    (lambda d: d["workflows"].append(dict(d["workflows"][0])), "unique"),
    (lambda d: d["workflows"][0]["steps"][1].update(depends_on=["nope"]), "depends_on"),
    (lambda d: d["workflows"][0]["steps"][0].pop("prompt_tokens"), "prompt_tokens or prompt_text"),
    (lambda d: d["workflows"][0]["steps"][0].update(output_tokens=0), "output_tokens"),
    (lambda d: d["workflows"][0]["steps"][0].update(output_tokens=10, max_tokens=5), "exceeds"),
    (lambda d: d["workflows"][0].update(template=3), "template"),
    (lambda d: d["workflows"][0].update(kind="batch"), "kind"),
])
def test_workload_validation_errors(mutate, message):
    data = orjson.loads((TEMPLATE_DIR / "chatdev.json").read_bytes())
    parse_workload(data)  # valid as is
    mutate(data)
    with pytest.raises(WorkloadError, match=message):
        parse_workload(data)


@pytest.mark.parametrize("spec, message", [
    ({"arrival": "weird"}, "arrival"),
    ({"interactive_share": 1.5}, "interactive_share"),
    ({"rate": 0}, "rate"),
    ({"bogus": 1}, "unknown spec field"),
    ({"templates": {"chatdev": -1}}, "weights"),
    ({"replay": "nope", "rate": 0}, "replay"),
    ({"deadline_scale": -1}, "deadline_scale"),
    ({"context_len": 10}, "context_len"),
])
def test_spec_validation_errors(spec, message):
    with pytest.raises(SpecError, match=message):
        build_workload(spec)


def test_unknown_template_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown template 'nope'.*built-in"):
        build_workload({"templates": {"nope": 1}})


def test_generation_is_deterministic_and_seeded():
    spec = {"templates": {"chatdev": 1, "map-reduce": 1}, "interactive_share": 0.5, "rate": 1.0, "duration_s": 30,
            "arrival": "gamma", "cv": 2.0, "seed": 11}
    first, second = build_workload(spec), build_workload(dict(spec))
    assert first.to_json() == second.to_json()
    other = build_workload({**spec, "seed": 12})
    assert other.to_json() != first.to_json()
    # changing the mix does not move the arrivals (independent random streams)
    mixed = build_workload({**spec, "interactive_share": 0.0})
    assert [w.arrival_s for w in mixed.workflows] == [w.arrival_s for w in first.workflows]


def test_builtin_templates_are_valid_documented_and_exact_without_jitter():
    names = builtin_names()
    assert {"chatdev", "metagpt", "autogen-groupchat", "magentic-one", "react-tools", "map-reduce",
            "debate"} <= set(names)
    rng = np.random.default_rng(0)
    for name in names:
        template = load_file_template(name)
        assert "not taken from" in template.meta["token_counts"]
        assert template.meta["framework"] and template.meta["structure"]
        steps = template.instantiate(rng, jitter=0.0)
        base = template.variants[0].steps
        assert [(s.id, s.prompt_tokens, s.output_tokens, s.depends_on) for s in steps] == \
               [(s.id, s.prompt_tokens, s.output_tokens, s.depends_on) for s in base]
        assert all(s.role in ROLES for s in steps)
    assert template_stats("metagpt")["critical_path_steps"] == 7
    assert template_stats("debate")["critical_path_steps"] == 3


def test_deadlines_follow_the_reference_critical_path():
    spec = WorkloadSpec(templates={"debate": 1}, rate=1.0, duration_s=10, jitter=0.0, deadline_scale=2.0)
    workload = build_workload(spec)
    for workflow in workload.workflows:
        assert workflow.deadline_s == pytest.approx(reference_path_s(workflow.steps, spec, 2.0), abs=1e-3)
    # debate at jitter 0: 3 calls on the critical path, 450 / 450 / 200 output tokens
    expected = 2.0 * (400 / 1e4 + 4.5 + 1600 / 1e4 + 4.5 + 2200 / 1e4 + 2.0)
    assert workload.workflows[0].deadline_s == pytest.approx(expected, abs=1e-3)
    no_deadline = build_workload({"templates": {"debate": 1}, "rate": 1.0, "duration_s": 10, "deadline_scale": None})
    assert all(w.deadline_s is None for w in no_deadline.workflows)


def test_lengths_are_fitted_into_the_context():
    workload = build_workload({"templates": {"map-reduce": 1}, "interactive_share": 0.5, "rate": 2.0,
                               "duration_s": 20, "context_len": 2048, "max_output_tokens": 512, "seed": 3})
    assert workload.meta["clipped"]["prompts"] > 0
    for workflow in workload.workflows:
        for step in workflow.steps:
            assert step.output_tokens <= 512
            assert step.prompt_tokens + step.max_tokens <= 2048
            assert step.max_tokens >= step.output_tokens


# ---------------------------------------------------------------------------------------------- arrivals

def test_poisson_and_gamma_rates_and_burstiness():
    rng = np.random.default_rng(42)
    times = poisson_arrivals(2.0, 2000.0, rng)
    assert len(times) / 2000.0 == pytest.approx(2.0, rel=0.05)
    gaps = np.diff(times)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.05)
    assert np.all(np.diff(times) >= 0) and times[0] >= 0 and times[-1] < 2000.0

    times = gamma_arrivals(2.0, 2000.0, np.random.default_rng(43), cv=2.5)
    assert len(times) / 2000.0 == pytest.approx(2.0, rel=0.12)
    gaps = np.diff(times)
    assert gaps.std() / gaps.mean() == pytest.approx(2.5, rel=0.12)

    assert len(constant_arrivals(4.0, 10.0)) == 40
    again, _ = generate_arrivals("gamma", 2.0, 2000.0, np.random.default_rng(43), cv=2.5)
    assert np.array_equal(again, times)
    with pytest.raises(ValueError, match="unknown arrival"):
        generate_arrivals("nope", 1.0, 1.0, rng)


@needs(SERVEGEN)
def test_servegen_arrivals_keep_the_rate_and_the_data_cv():
    cv = servegen_gamma_cv("language", quantile=0.9)
    assert cv > 1.5  # the bursty tail of the Gamma-fitted client windows
    assert servegen_gamma_cv("language", quantile=0.5) == pytest.approx(1.14, abs=0.05)
    _, info = generate_arrivals("gamma", 1.0, 100.0, np.random.default_rng(0))
    assert info["cv"] == pytest.approx(cv) and info["cv_source"].startswith("servegen")
    counts = []
    for seed in range(6):
        times, info = servegen_arrivals(1.0, 600.0, np.random.default_rng(seed), category="reason")
        assert info["clients"] > 1 and info["time_stretch"] > 0
        assert np.all(np.diff(times) >= 0) and times[-1] < 600.0
        counts.append(len(times))
    assert np.mean(counts) / 600.0 == pytest.approx(1.0, rel=0.25)
    first, _ = servegen_arrivals(1.0, 100.0, np.random.default_rng(9), category="reason", window_start_s=72000.0)
    second, _ = servegen_arrivals(1.0, 100.0, np.random.default_rng(9), category="reason", window_start_s=72000.0)
    assert np.array_equal(first, second)


@needs(SERVEGEN)
@pytest.mark.parametrize("category", ["reason", "multimodal"])
def test_servegen_arrivals_keep_the_rate_over_a_short_run(category):
    """Each client starts a segment at its forward recurrence time (a uniform fraction of a length-biased gap):
    with a plain gap instead, 60 s runs had 1.4-1.6x the rate asked for (bursty clients started too early)."""
    counts = [len(servegen_arrivals(1.0, 60.0, np.random.default_rng(seed), category=category)[0])
              for seed in range(400)]
    assert np.mean(counts) / 60.0 == pytest.approx(1.0, rel=0.04)


# ---------------------------------------------------------------------------------------------- trace templates

@needs(CHATDEV, WHO_AND_WHEN, TAU_BENCH)
@pytest.mark.parametrize("name", list(TRACE_SOURCES))
def test_trace_derived_templates(name):
    template = load_trace_template(name)
    stats = template.stats()
    assert stats["runs"] == {"chatdev": 46, "ag2": 126, "magentic-one": 58, "tau-bench": 200}[name]
    rng = np.random.default_rng(1)
    for _ in range(5):
        steps = template.instantiate(rng)
        assert steps and all(s.role in ROLES for s in steps)
        assert all(s.depends_on == (steps[i - 1].id,) for i, s in enumerate(steps) if i)  # a chain
        assert all(s.output_tokens >= 1 and s.prompt_tokens >= 1 for s in steps)
    # lengths="trace" reproduces one real run exactly
    steps = template.instantiate(np.random.default_rng(2), lengths="trace")
    runs = [[(c.prompt_tokens, c.output_tokens) for c in run.calls] for run in template.runs]
    assert [(s.prompt_tokens, s.output_tokens) for s in steps] in runs
    # resampled outputs come from the group pools
    pooled = {int(v) for pool in template.pools.values() for v in pool}
    assert all(max(1, s.output_tokens) in pooled | {1} for s in template.instantiate(rng))


@needs(CHATDEV)
def test_chatdev_template_shape():
    stats = template_stats("trace:chatdev")
    assert stats["steps_per_workflow"]["median"] == 18
    roles = stats["roles"]
    assert roles["coder"]["mean_output_tokens"] > roles["reviewer"]["mean_output_tokens"] > \
        roles["planner"]["mean_output_tokens"]
    workload = build_workload({"templates": {"trace:chatdev": 1}, "rate": 0.5, "duration_s": 60, "seed": 4})
    assert workload.workflows and all(w.template == "trace:chatdev" and w.deadline_s for w in workload.workflows)
    phases = {s.id.split("-", 1)[1] for w in workload.workflows for s in w.steps}
    assert {"DemandAnalysis", "Coding", "CodeReviewComment"} <= phases


@needs(TAU_BENCH)
def test_tau_bench_pauses_alternate_tool_and_user_turns():
    workload = build_workload({"templates": {"trace:tau-bench": 1}, "rate": 1.0, "duration_s": 20,
                               "tool_time_s": 0.5, "user_time_s": 4.0, "trace_lengths": "trace"})
    pauses = {s.think_time_s for w in workload.workflows for s in w.steps}
    assert pauses <= {0.0, 0.5, 4.0} and {0.5, 4.0} <= pauses


# ---------------------------------------------------------------------------------------------- replay

@needs(AZURE_2023, MOONCAKE)
@pytest.mark.parametrize("name", ["azure-code", "azure-conv", "mooncake-conversation", "mooncake-synthetic"])
def test_replay_time_scaling(name):
    rows = load_trace_rows(name)
    assert len(rows.times_s) > 1000 and rows.times_s[0] == 0.0
    slow, slow_p, slow_o = replay_requests(name, time_scale=1.0, duration_s=300.0)
    fast, fast_p, fast_o = replay_requests(name, time_scale=10.0, duration_s=30.0)
    assert len(fast) == len(slow) > 0  # the same rows, ten times faster
    assert np.allclose(fast, slow / 10.0)
    assert np.array_equal(fast_p, slow_p) and np.array_equal(fast_o, slow_o)
    later, *_ = replay_requests(name, time_scale=1.0, start_s=600.0, duration_s=60.0)
    assert len(later) and later[0] >= 0.0 and later[-1] < 60.0
    workload = build_workload({"rate": 0, "replay": name, "replay_time_scale": 10.0, "duration_s": 30.0,
                               "context_len": 32768, "max_output_tokens": 4096})
    assert len(workload.workflows) == len(fast)
    assert all(w.interactive and w.template == f"replay:{name}" for w in workload.workflows)
    arrivals = [w.arrival_s for w in workload.workflows]
    assert arrivals == sorted(arrivals) and arrivals[-1] < 30.0


@needs(AZURE_2023)
def test_replay_mixes_with_workflows_and_interactive_lengths_from_a_trace():
    workload = build_workload({"templates": {"debate": 1}, "rate": 0.5, "duration_s": 20, "replay": "azure-conv",
                               "replay_time_scale": 5.0, "interactive_share": 0.5,
                               "interactive_lengths": "azure-code"})
    counts = workload.meta["counts"]
    assert counts["debate"] > 0 and counts["replay:azure-conv"] > 0 and counts["interactive"] > 0


# ---------------------------------------------------------------------------------------------- CLI

def _parse(add, argv):
    parser = argparse.ArgumentParser()
    add(parser)
    return parser.parse_args(argv)


def test_workload_cli_writes_a_file(tmp_path, capsys):
    out = tmp_path / "w.json"
    code = workload_main(_parse(add_workload_arguments, [
        "-t", "react-tools=2", "-t", "debate", "--interactive-share", "0.25", "--rate", "1", "--duration", "20",
        "--arrival", "gamma", "--cv", "2", "--deadline-scale", "0", "--seed", "9", "--model", "m", "--out", str(out)]))
    assert code == 0
    workload = load_workload(out)
    assert workload.model == "m" and workload.seed == 9
    assert workload.meta["spec"]["templates"] == {"react-tools": 2.0, "debate": 1.0}
    assert all(w.deadline_s is None for w in workload.workflows)
    assert "wrote" in capsys.readouterr().err
    assert workload_main(_parse(add_workload_arguments, ["--rate", "-1", "--out", str(out)])) == 2
    assert workload_main(_parse(add_workload_arguments, ["--rate", "1"])) == 2  # no --out
    capsys.readouterr()
    # a rate x duration too small for one arrival: written, and said (it wrote "0 arrivals" without a word)
    assert workload_main(_parse(add_workload_arguments, ["--rate", "0.01", "--duration", "10", "--out", str(out)])) == 0
    assert "warning: the workload is empty" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- report

def _fake_run(policy: str, load: float, seed: int) -> RunResult:
    rng = np.random.default_rng(seed)
    requests, workflows = [], []
    for i in range(40):
        arrival = float(i)
        ttft = float(rng.exponential(0.3 * load))
        finish = arrival + ttft + float(rng.exponential(2.0))
        requests.append(RequestResult(f"r{i}", f"wf{i // 4}", f"s{i % 4}", "coder", "batch", arrival, 100, 50,
                                      first_token=arrival + ttft, finish=finish, ttft_target_s=0.5,
                                      preemptions=int(rng.random() < 0.1)))
    for w in range(10):
        workflows.append(WorkflowResult(f"wf{w}", "workflow", "batch", float(4 * w), 6.0, finish=4 * w + 5.0 + load,
                                        steps=4, steps_ok=4))
    series = {"kv_reserved_tokens": [(t, 1000.0 + 10 * t) for t in range(20)],
              "kv_used_tokens": [(t, 600.0 + 8 * t) for t in range(20)]}
    return RunResult(mode="simulate", policy={"queue": policy, "admission": "predicted"}, requests=requests,
                     workflows=workflows, series=series, meta={"load": load})


def test_report_writes_a_table_and_plots(tmp_path, capsys):
    paths = []
    for policy in ("fcfs", "maestro"):
        for load in (0.5, 2.0):
            path = tmp_path / f"{policy}-{load}.json"
            path.write_bytes(orjson.dumps(_fake_run(policy, load, int(load * 10)).to_json()))
            paths.append(str(path))
    run = load_run(paths[0])
    assert len(run.requests) == 40 and run.series["kv_used_tokens"][0] == (0.0, 600.0)
    written = write_report(paths, tmp_path / "report")
    table = written["table"]
    assert table.count("\n") == 2 + 4 - 1
    assert "| request SLO |" in table and "admission=predicted queue=fcfs" in table
    assert "1,090" in table  # time-weighted reserved KV mean of the step function 1000 + 10 t over [0, 19]
    names = {p.name for p in written["images"]}
    assert {"slo_vs_load.png", "latency_cdf.png"} <= names and sum(n.startswith("kv_") for n in names) == 4
    for image in written["images"]:
        assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and image.stat().st_size > 5000
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "![slo_vs_load](slo_vs_load.png)" in markdown
    # the CLI entry point
    assert report_main(_parse(add_report_arguments, [*paths[:2], "--out", str(tmp_path / "r2")])) == 0
    assert "| run |" in capsys.readouterr().out
    assert report_main(_parse(add_report_arguments, [str(tmp_path / "missing.json"), "--out", str(tmp_path)])) == 2


def test_report_without_series_or_load(tmp_path):
    run = _fake_run("fcfs", 1.0, 1)
    run.series, run.meta, run.policy = {}, {}, {}
    path = tmp_path / "plain.json"
    path.write_bytes(orjson.dumps(run.to_json()))
    written = write_report([path], tmp_path / "out")
    # no meta load: arrivals over their span (10 workflows, 4 s apart); no KV figures
    assert "| plain | plain | 0.25 |" in written["table"] and written["table"].endswith("| - | - |")
    assert {p.name for p in written["images"]} == {"slo_vs_load.png", "latency_cdf.png"}
    # without a reserved series: the simulator's exact whole-run figures (not its arrival-window mean)
    run.meta["kv"] = {"reserved_mean_tokens": 1234.0, "reserved_mean_tokens_run": 4321.0,
                      "reserved_peak_tokens": 9876.0}
    path.write_bytes(orjson.dumps(run.to_json()))
    assert write_report([path], tmp_path / "out")["table"].endswith("| 4,321 | 9,876 |")


# ---------------------------------------------------------------------------------------------- live

def test_synthesized_prompts_match_the_requested_size():
    from predictor.tokens import estimate_message_tokens

    step = Step(id="s", role="coder", output_tokens=5, prompt_tokens=1500)
    messages = build_messages(step, "k")
    assert messages == build_messages(step, "k") and messages != build_messages(step, "other")
    # the sim engines count 4 + ceil(chars / 4) per message + 2; the gateway's estimator is within 15 %
    sim_count = sum(4 + -(-len(m["content"]) // 4) for m in messages) + 2
    assert sim_count == pytest.approx(1500, rel=0.02)
    assert estimate_message_tokens(messages) == pytest.approx(1500, rel=0.15)
    assert len(synth_prompt(10, "x").split()) == 10


MODEL = "sim-model"


def _tiny_workload() -> Workload:
    def wf(i: int, arrival: float) -> Workflow:
        return Workflow(id=f"wf-{i}", arrival_s=arrival, deadline_s=120.0, slo_class="batch", template="tiny", steps=[
            Step(id="plan", role="planner", prompt_tokens=300, output_tokens=12),
            Step(id="code-a", role="coder", prompt_tokens=500, output_tokens=30, depends_on=("plan",)),
            Step(id="code-b", role="coder", prompt_tokens=520, output_tokens=25, depends_on=("plan",),
                 think_time_s=0.5),
            Step(id="review", role="reviewer", prompt_text="Review both modules, please.", output_tokens=8,
                 depends_on=("code-a", "code-b"), max_tokens=256)])

    calls = [Workflow(id=f"chat-{i}", arrival_s=0.2 * i, kind="interactive", slo_class="interactive",
                      steps=[Step(id="call", role="assistant", prompt_tokens=80, output_tokens=15 + i)])
             for i in range(4)]
    return Workload(workflows=sorted([wf(0, 0.0), wf(1, 0.3), wf(2, 0.6), *calls], key=lambda w: w.arrival_s),
                    name="tiny", model=MODEL, seed=3)


@pytest.fixture
async def sim_gateway():
    from backends.sim import SimEngineOptions, start_sim_engines
    from tests.conftest import gateway_config, running_gateway

    engines = await start_sim_engines(2, SimEngineOptions(model=MODEL, time_scale=50.0, max_model_len=8192))
    try:
        config = gateway_config([e.url for e in engines], model=MODEL,
                                models=[{"name": MODEL, "max_model_len": 8192}])
        async with running_gateway(config) as gateway:
            yield gateway, engines
    finally:
        for engine in engines:
            await engine.stop()


async def test_a_live_run_samples_the_gateways_reserved_kv_for_the_report(tmp_path):
    """A live run's report had no KV figures: nothing sampled the gateway. The CLI samples its /metrics beside
    --url (reserved KV and queue, summed over engines and pools) into the series the report reads. (The gateway
    publishes its reserved-KV gauge at most once a second, every ledger_lease_s / 3: 0.2 s here, on a real-time
    engine.)"""
    from backends.sim import SimEngineOptions, start_sim_engines
    from loadgen.report import summarize as report_row
    from tests.conftest import gateway_config, running_gateway

    engines = await start_sim_engines(1, SimEngineOptions(model=MODEL, time_scale=1.0, max_model_len=8192))
    try:
        config = gateway_config([engines[0].url], model=MODEL, models=[{"name": MODEL, "max_model_len": 8192}],
                                scheduling={"admission": "max_tokens", "ledger_lease_s": 0.6})  # gauge: 5 Hz
        async with running_gateway(config) as gateway:
            args = _parse(add_live_arguments, ["--url", gateway.base_url + "/v1/", "--workload", "w.json",
                                               "--out", "r.json", "--sample-interval", "0.05"])
            options = options_from_args(args)
            assert options.metrics_url == gateway.base_url + "/metrics"
            result = await run_live(_tiny_workload(), options.__class__(**{**options.__dict__, "progress": False,
                                                                          "time_scale": 1.0}))
            plain = await run_live(_tiny_workload(), LiveOptions(url=gateway.base_url + "/v1", time_scale=10.0,
                                                                 progress=False,
                                                                 metrics_url=engines[0].url + "/metrics"))
    finally:
        await engines[0].stop()
    assert all(r.status == "ok" for r in result.requests), result.meta["errors"]
    reserved = result.series["reserved_kv_tokens"]
    assert len(reserved) >= 5 and max(value for _, value in reserved) > 0 and "queued_requests" in result.series
    assert all(0 <= at <= result.meta["wall_s"] + 0.5 for at, _ in reserved)
    row = report_row(result, "live")
    assert row.reserved_mean is not None and row.reserved_peak == max(v for _, v in reserved)
    assert result.meta["metrics_url"] == gateway.base_url + "/metrics" and result.meta["metrics_note"] is None
    # an engine's own page has no gateway gauges: no series, and the result says why
    assert plain.series == {} and "has no maestro_kv_reserved_tokens" in plain.meta["metrics_note"]
    assert _parse(add_live_arguments, ["--url", "http://h/v1", "--workload", "w", "--out", "r", "--no-metrics"]) \
        and options_from_args(_parse(add_live_arguments, ["--url", "http://h/v1", "--workload", "w", "--out", "r",
                                                          "--no-metrics"])).metrics_url is None


async def test_live_run_through_the_gateway_end_to_end(sim_gateway, tmp_path):
    gateway, _ = sim_gateway
    workload = _tiny_workload()
    result = await run_live(workload, LiveOptions(url=gateway.base_url + "/v1", time_scale=10.0, progress=False,
                                                  policy={"label": "round_robin"}))
    expected = {(w.id, s.id): s for w in workload.workflows for s in w.steps}
    assert len(result.requests) == len(expected) == 16
    for request in result.requests:
        key = (request.workflow_id or request.request_id.split("-", 1)[1].rsplit("-call", 1)[0], request.step_id)
        step = expected[key]
        assert request.status == "ok", result.meta["errors"]
        assert request.ttft is not None and request.ttft >= 0 and request.e2e >= request.ttft
        assert request.output_tokens == step.output_tokens
        assert request.prompt_tokens > 0
        assert request.tpot is not None
    assert result.meta["end"] == "completed" and result.meta["output_mismatches"] == 0
    # dependencies and pauses were respected (pause 0.5 s / time scale 10)
    by_key = {(r.workflow_id, r.step_id): r for r in result.requests if r.workflow_id}
    for i in range(3):
        plan, code_b, review = (by_key[(f"wf-{i}", s)] for s in ("plan", "code-b", "review"))
        assert code_b.arrival >= plan.finish + 0.05 - 0.01
        assert review.arrival >= max(by_key[(f"wf-{i}", "code-a")].finish, code_b.finish)
    assert len(result.workflows) == 7
    for workflow in result.workflows:
        assert workflow.finish is not None and workflow.steps_ok == workflow.steps
    workflow = next(w for w in result.workflows if w.workflow_id == "wf-0")
    assert workflow.deadline_s == pytest.approx(12.0)  # 120 s compressed ten times (wall time base)
    # the result file round-trips through the report
    path = tmp_path / "live.json"
    path.write_bytes(orjson.dumps(result.to_json()))
    assert len(load_run(path).requests) == 16
    assert write_report([path], tmp_path / "report")["rows"][0].policy == "round_robin"


async def test_live_metadata_context_and_ignore_eos_against_an_engine(sim_gateway):
    """Straight to one engine (no gateway): context in metadata, exact length via max_tokens + ignore_eos."""
    _, engines = sim_gateway
    workload = _tiny_workload()
    runner = LiveRunner(workload, LiveOptions(url=engines[0].url + "/v1", time_scale=10.0, progress=False,
                                              context="metadata", output_control="ignore-eos", steps_hint=True,
                                              time_base="workload"))
    _, body, headers = runner._request(workload.workflows[0], 1, workload.workflows[0].steps[1], 1234)
    assert body["metadata"] == {"workflow_id": "wf-0", "agent_role": "coder", "workflow_step": "1",
                                "workflow_deadline_ms": "1234", "slo_class": "batch", "workflow_steps": "4"}
    assert body["max_tokens"] == 30 and body["ignore_eos"] is True
    assert "X-Workflow-Id" not in headers and "X-Sim-Output-Tokens" not in headers
    result = await runner.run()
    assert all(r.status == "ok" for r in result.requests), result.meta["errors"]
    assert result.meta["output_mismatches"] == 0
    wf0 = next(w for w in result.workflows if w.workflow_id == "wf-0")
    assert wf0.deadline_s == 120.0  # workload time base: unchanged


async def test_live_headers_for_workflows_and_plain_interactive_calls():
    workload = _tiny_workload()
    runner = LiveRunner(workload, LiveOptions(url="http://127.0.0.1:1/v1", progress=False))
    workflow = workload.workflows[0]
    _, body, headers = runner._request(workflow, 0, workflow.steps[0], 99)
    assert headers["X-Workflow-Id"] == workflow.id and headers["X-Agent-Role"] == "planner"
    assert headers["X-Workflow-Step"] == "0" and headers["X-Workflow-Deadline-Ms"] == "99"
    assert headers["X-SLO-Class"] == "batch" and headers["X-Sim-Output-Tokens"] == "12"
    assert body["max_tokens"] == workflow.steps[0].max_tokens and "metadata" not in body
    chat = next(w for w in workload.workflows if w.interactive)
    _, body, headers = runner._request(chat, 0, chat.steps[0], None)
    assert not any(h.startswith("X-Workflow") or h in ("X-Agent-Role", "X-SLO-Class") for h in headers)


@pytest.fixture
async def slow_engine():
    """One simulated engine in real time (time_scale 1): a 3,000-token answer takes about 15 s."""
    from backends.sim import SimEngineOptions, start_sim_engines

    engines = await start_sim_engines(1, SimEngineOptions(model=MODEL, time_scale=1.0, max_model_len=4096))
    try:
        yield engines[0]
    finally:
        await engines[0].stop()


def _long_calls(count: int, spacing: float) -> Workload:
    return Workload(workflows=[Workflow(id=f"long-{i}", arrival_s=spacing * i, steps=[
        Step(id="s", role="writer", prompt_tokens=50, output_tokens=3000, max_tokens=3500)]) for i in range(count)],
        model=MODEL)


async def test_live_failures_stop_the_workflow(sim_gateway):
    gateway, _ = sim_gateway
    bad = _tiny_workload()
    bad.model = "no-such-model"
    result = await run_live(bad, LiveOptions(url=gateway.base_url + "/v1", time_scale=10.0, progress=False))
    status = {(r.workflow_id, r.step_id): r.status for r in result.requests}
    assert len(result.requests) == 16  # every step is in the result, sent or not
    assert status[("wf-0", "plan")].startswith("error:http_4")
    # dependents are not sent: recorded as failed requests
    assert status[("wf-0", "code-a")] == status[("wf-0", "review")] == "error:dependency"
    assert result.meta["dependency_skipped"] == 9
    assert all(w.finish is None and not w.met() for w in result.workflows)
    assert result.meta["errors"]


async def test_live_time_limit_cancels_in_flight_requests(slow_engine):
    loop = asyncio.get_running_loop()
    started = loop.time()
    result = await run_live(_long_calls(4, 0.5), LiveOptions(url=slow_engine.url + "/v1", time_limit_s=0.7,
                                                             progress=False))
    assert loop.time() - started < 3.0
    assert result.meta["end"] == "time_limit"
    assert result.meta["not_started"] == 2 and len(result.workflows) == 2
    assert {r.status for r in result.requests} == {"error:time_limit"}
    assert result.requests[0].first_token is not None  # it was streaming when cut
    assert all(w.finish is None for w in result.workflows)


async def test_live_stop_is_clean(slow_engine):
    runner = LiveRunner(_long_calls(1, 0.0), LiveOptions(url=slow_engine.url + "/v1", progress=False))
    task = asyncio.create_task(runner.run())
    await asyncio.sleep(0.3)
    runner.stop()
    result = await asyncio.wait_for(task, 3.0)
    assert result.meta["end"] == "stopped" and result.requests[0].status == "error:stopped"
    await asyncio.sleep(0.1)
    assert slow_engine.engine.num_running == 0  # the closed connection aborted it in the engine


def test_live_cli_runs_a_generated_workload(tmp_path, capsys):
    """``workload_main`` then ``live_main`` (in a worker thread: it runs its own event loop) against one engine."""
    from backends.sim import SimEngineOptions, start_sim_engines

    workload_path, result_path = tmp_path / "w.json", tmp_path / "r.json"
    assert workload_main(_parse(add_workload_arguments, [
        "-t", "debate", "--interactive-share", "0.5", "--rate", "2", "--duration", "3", "--seed", "2",
        "--max-output-tokens", "40", "--model", MODEL, "--out", str(workload_path)])) == 0
    workload = load_workload(workload_path)

    async def main() -> int:
        engines = await start_sim_engines(1, SimEngineOptions(model=MODEL, time_scale=50.0))
        try:
            args = _parse(add_live_arguments, ["--url", engines[0].url + "/v1", "--workload", str(workload_path),
                                               "--out", str(result_path), "--time-scale", "5", "--no-progress",
                                               "--policy", "queue=fcfs", "--time-limit", "60"])
            return await asyncio.to_thread(live_main, args)
        finally:
            await engines[0].stop()

    assert asyncio.run(main()) == 0, capsys.readouterr().err
    run = load_run(result_path)
    assert run.mode == "live" and run.policy == {"queue": "fcfs"}
    assert len(run.requests) == sum(len(w.steps) for w in workload.workflows)
    assert all(r.status == "ok" and r.output_tokens <= 40 for r in run.requests)
    # the offered load of the workload as generated (not the spec's rate), on the result's wall clock: arrivals
    # went out 5 times as fast; per workload second beside it
    assert run.meta["workload_load"] == workload.offered_load() \
        == arrival_rate([w.arrival_s for w in workload.workflows])
    assert run.meta["load"] == arrival_rate([w.arrival_s / 5 for w in workload.workflows])
    assert run.meta["load"] == pytest.approx(5 * run.meta["workload_load"], rel=1e-3)
    assert run.meta["time_scale"] == 5.0
    err = capsys.readouterr().err
    assert "requests ok" in err and "warning" not in err  # the simulated engine counts prompts as planned
    assert 0.9 <= run.meta["prompt_tokens_counted"] / run.meta["prompt_tokens_planned"] <= 1.1
