"""Regression tests for loadgen's figures and its handling of bad input (one test per audited bug).

Small fixtures and short runs; nothing here needs the third-party data.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import contextlib
import json
import math
from pathlib import Path

import numpy as np
import orjson
import pytest
from aiohttp import web

from loadgen.des import ClusterSpec, EngineSpec, PoolSpec, SimConfig, simulate
from loadgen.experiments import (add_experiment_arguments, add_simulate_arguments, experiment_main, simulate_main)
from loadgen.live import LiveOptions, LiveRunner, add_live_arguments, live_main
from loadgen.report import (ReportError, _sum_series, add_report_arguments, kv_figures, load_run, report_main,
                            write_report)
from loadgen.report import summarize as report_row
from loadgen.results import RequestResult, RunResult, WorkflowResult, quantile
from loadgen.workload import Step, Workflow, Workload, WorkloadError, arrival_rate, load_workload, parse_workload
from loadgen.workloads import SpecError, WorkloadSpec, add_workload_arguments, generate_arrivals, workload_main
from loadgen.workloads.arrivals import constant_arrivals, servegen_arrivals
from loadgen.workloads.replay import replay_requests

ENGINE = EngineSpec(max_num_seqs=8, kv_blocks=2048, block_size=16, max_num_batched_tokens=2048, max_model_len=8192)


def _parse(add, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add(parser)
    return parser.parse_args(argv)


def _chain(wf_id: str, arrival: float) -> Workflow:
    return Workflow(wf_id, arrival, [Step("a", "coder", 200, prompt_tokens=500),
                                     Step("b", "reviewer", 100, prompt_tokens=800, depends_on=("a",))])


def _config(sample_interval_s: float = 0.05, **options) -> SimConfig:
    return SimConfig(clusters=[ClusterSpec("c0", 0.001, (PoolSpec("llm", 1, ENGINE),))],
                     sample_interval_s=sample_interval_s, **options)


# ------------------------------------------------------------------------------------------ simulator KV figures

def test_reserved_kv_mean_when_every_workflow_arrives_at_t0():
    """An empty arrival window ([0, 0]) must not turn the reserved-KV mean into 0: it is the whole run's."""
    workload = Workload([_chain(f"w{i}", 0.0) for i in range(3)])
    run = simulate(workload, _config(0.01, admission="max_tokens"))
    kv = run.meta["kv"]
    assert kv["reserved_mean_tokens"] > 0
    assert kv["reserved_mean_tokens"] == kv["reserved_mean_tokens_run"]
    assert kv["window_s"] == run.meta["simulated_s"]
    # the exact time average agrees with the finely sampled reserved series
    assert kv["reserved_mean_tokens"] == pytest.approx(kv["reserved_sampled_mean_tokens"], rel=0.05)


def test_no_samples_means_unknown_used_kv_and_a_negative_interval_is_rejected(tmp_path, capsys):
    workload = Workload([_chain("w0", 0.0), _chain("w1", 0.5)])
    kv = simulate(workload, _config(0.0)).meta["kv"]
    assert kv["used_mean_tokens"] is None and kv["used_mean_bytes"] is None and kv["used_peak_tokens"] is None
    assert kv["reserved_sampled_mean_tokens"] is None and kv["reserved_mean_tokens"] > 0
    path = tmp_path / "w.json"
    workload.save(path)
    assert simulate_main(_parse(add_simulate_arguments, ["--workload", str(path), "--clusters", "c0:1:1",
                                                         "--sample-interval", "0"])) == 0
    out = capsys.readouterr().out
    used_kv_column = out.splitlines()[-1].split("|")[3].strip()  # | reserved mean | reserved peak | used mean |
    assert used_kv_column == "-"
    with pytest.raises(ValueError, match="sample_interval_s"):
        _config(-1.0).validate()
    assert simulate_main(_parse(add_simulate_arguments, ["--workload", str(path), "--clusters", "c0:1:1",
                                                         "--sample-interval", "-1"])) == 2
    assert "error: sample_interval_s must be" in capsys.readouterr().err


@pytest.mark.parametrize("layout", ["c0:0:2", "c0:0:2,c1:2:2"])
def test_a_cluster_without_engines_is_rejected(layout, tmp_path, capsys):
    with pytest.raises(ValueError, match="engines must be >= 1"):
        SimConfig(clusters=[ClusterSpec("c0", 0.0, (PoolSpec("llm", 0, ENGINE),))]).validate()
    path = tmp_path / "w.json"
    Workload([_chain("w0", 0.0)]).save(path)
    assert simulate_main(_parse(add_simulate_arguments, ["--workload", str(path), "--clusters", layout])) == 2
    err = capsys.readouterr().err
    assert "error: cluster c0 pool llm: engines must be >= 1" in err and "Traceback" not in err


def test_e2_without_workflows(tmp_path, capsys):
    """``--interactive-share 1``: no workflow attainment (None) on either side; E2 still compares the rest."""
    out = tmp_path / "E2.json"
    args = _parse(add_experiment_arguments, ["E2", "--rates", "1", "--duration", "10", "--interactive-share", "1",
                                             "--out", str(out)])
    assert experiment_main(args) == 0
    data = json.loads(out.read_text())
    assert all(r["summary"]["workflow_attainment"] is None for r in data["runs"])
    assert data["verdicts"][0]["equal_or_better_attainment"] in (True, False)
    assert "E2: KV reservation" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ offered load

def test_simulated_and_live_runs_record_the_offered_load_of_the_workload(tmp_path, capsys):
    workload = Workload([_chain(f"w{i}", 0.25 * i) for i in range(5)], meta={"spec": {"rate": 99.0}})
    assert workload.offered_load() == 4.0 == arrival_rate([0.0, 0.25, 0.5, 0.75, 1.0])
    assert simulate(workload, _config()).meta["load"] == 4.0
    path = tmp_path / "w.json"
    workload.save(path)
    # a workload file: simulate sets the load too (it used to leave it out)
    assert simulate_main(_parse(add_simulate_arguments, ["--workload", str(path), "--clusters", "c0:1:1",
                                                         "--out", str(tmp_path / "r.json")])) == 0
    assert load_run(tmp_path / "r.json").meta["load"] == 4.0
    # a generated one: what was generated, with the nominal rate beside it
    assert simulate_main(_parse(add_simulate_arguments, ["--rate", "2", "--duration", "20", "--clusters", "c0:2:1",
                                                         "--out", str(tmp_path / "g.json")])) == 0
    generated = load_run(tmp_path / "g.json")
    assert generated.meta["rate"] == 2.0
    assert generated.meta["load"] == arrival_rate([w.arrival for w in generated.workflows])


# ------------------------------------------------------------------------------------------ report

def _run_with_series(series: dict, meta: dict | None = None, mode: str = "simulate") -> RunResult:
    return RunResult(mode=mode, policy={"label": mode}, series=series, meta=meta or {})


def test_report_kv_figures_are_the_same_for_live_and_simulated_runs():
    workload = Workload([_chain(f"w{i}", 0.2 * i) for i in range(4)])
    sim = simulate(workload, _config(0.01))
    kv = sim.meta["kv"]
    # the arrival window (0.6 s) is much shorter than the run: its mean is a different figure
    assert kv["window_s"] < 0.5 * sim.meta["simulated_s"]
    live = _run_with_series({"reserved_kv_tokens": sim.series["reserved_kv_tokens"]}, mode="live")
    sim_row, live_row = report_row(sim, "sim"), report_row(live, "live")
    # the same figure: the time average over the whole run, exact for the simulator, sampled for a live run
    assert (sim_row.reserved_mean, sim_row.reserved_peak) == (kv["reserved_mean_tokens_run"], kv["reserved_peak_tokens"])
    assert live_row.reserved_mean == pytest.approx(sim_row.reserved_mean, rel=0.05)
    assert sim_row.reserved_mean != pytest.approx(kv["reserved_mean_tokens"], rel=0.05)
    # without a series: the exact whole-run figures, not the arrival-window mean
    bare = _run_with_series({}, meta={"kv": kv})
    assert kv_figures(bare) == (kv["reserved_mean_tokens_run"], kv["reserved_peak_tokens"])


def test_simulate_prints_the_exact_kv_figures_and_labels_each_table(tmp_path, capsys):
    """A 1 s series misses most of a short run's reservations: the report row must show the simulator's exact
    whole-run figures, and the two tables of `simulate` must say which span and unit each mean is."""
    path = tmp_path / "w.json"
    Workload([_chain("w0", 0.0), _chain("w1", 0.3)]).save(path)
    assert simulate_main(_parse(add_simulate_arguments, ["--workload", str(path), "--clusters", "c0:1:1",
                                                         "--out", str(tmp_path / "r.json")])) == 0
    out = capsys.readouterr().out
    kv = load_run(tmp_path / "r.json").meta["kv"]
    header, _, row = out.splitlines()[:3]
    cells = dict(zip([c.strip() for c in header.split("|")], [c.strip() for c in row.split("|")]))
    assert cells["reserved KV mean tokens (whole run)"] == f"{kv['reserved_mean_tokens_run']:,.0f}"
    assert cells["reserved KV peak tokens"] == f"{kv['reserved_peak_tokens']:,.0f}"
    assert "reserved KV mean GiB (arrival window)" in out


def test_report_sums_series_aligned_by_time_and_never_adds_a_total_to_its_parts():
    a = [(0.0, 10.0), (2.0, 20.0), (4.0, 30.0)]
    b = [(1.0, 1.0), (3.0, 2.0)]
    # step functions on the union of times, from the latest first sample (1.0) on
    assert _sum_series({"reserved/e0": a, "reserved/e1": b}) == [(1.0, 11.0), (2.0, 21.0), (3.0, 22.0),
                                                                 (4.0, 32.0)]
    total = [(0.0, 100.0), (1.0, 200.0)]
    parts = {"used_kv_tokens/engine-0": [(0.0, 40.0), (1.0, 90.0)],
             "used_kv_tokens/engine-1": [(0.0, 60.0), (1.0, 110.0)]}
    assert _sum_series({"used_kv_tokens": total, **parts}) == total
    assert _sum_series(parts) == total
    run = _run_with_series({"reserved_kv_tokens": total, "reserved_kv_tokens/engine-0": [(0.0, 5.0), (1.0, 5.0)]})
    assert kv_figures(run) == (100.0, 200.0)


@pytest.mark.parametrize("document, message", [
    ({"requests": [1, 2]}, "requests[0] must be an object"),
    ({"requests": "abc"}, "'requests' must be a list"),
    ({"requests": [{"request_id": "r"}]}, "requests[0] lacks"),
    ({"requests": [], "workflows": [{"workflow_id": "w", "kind": "workflow", "slo_class": "batch",
                                     "arrival": "soon", "deadline_s": None}]}, "workflows[0].arrival must be"),
    ({"requests": [], "series": {"reserved": [[1]]}}, "series['reserved'][0] must be a [time_s, value] pair"),
    ({"requests": [], "series": {"reserved": 5}}, "series['reserved'] must be a list"),
    ({"requests": [], "series": [1]}, "'series' must be an object"),
    ({"requests": [], "meta": {"kv": {"reserved_peak_tokens": "x"}}}, "meta.kv.reserved_peak_tokens must be"),
    ({"requests": [], "meta": {"load": "fast"}}, "meta.load must be"),
    ({"requests": [], "policy": 5}, "'policy' must be an object"),
])
def test_malformed_result_files_are_report_errors(document, message, tmp_path, capsys):
    path = tmp_path / "bad.json"
    path.write_bytes(orjson.dumps(document))
    with pytest.raises(ReportError, match=f"^{path}: ") as caught:
        load_run(path)
    assert message in str(caught.value)
    assert report_main(_parse(add_report_arguments, [str(path), "--out", str(tmp_path / "out")])) == 2
    assert capsys.readouterr().err.startswith("error: ")


# ------------------------------------------------------------------------------------------ SLO classes

_GATEWAY_YAML = """
clusters:
  - name: c
    pools:
      - name: p
        models: [m]
        simulated: {count: 1}
slo_classes:
  interactive: {ttft_s: 0.5}
  urgent: {ttft_s: 1.0, tpot_s: 0.05, workflow_deadline_s: 120}
"""


def _urgent_workload() -> Workload:
    return Workload([Workflow("u", 0.0, [Step("a", "coder", 3, prompt_tokens=40),
                                         Step("b", "reviewer", 3, prompt_tokens=40, depends_on=("a",))],
                              slo_class="urgent"), *_calls(1).workflows], model="m")


def _check_targets(run: RunResult) -> None:
    targets = {r.slo_class: (r.ttft_target_s, r.tpot_target_s) for r in run.requests}
    assert targets == {"urgent": (1.0, 0.05), "interactive": (0.5, 0.1)}
    assert next(w for w in run.workflows if w.workflow_id == "u").deadline_s == 120.0


def test_an_event_split_over_several_data_lines_is_one_event():
    """Valid SSE that neither vLLM nor the gateway sends: an event's JSON over two ``data:`` lines, CRLF line ends,
    comments and ``event:`` lines. Each line had been taken for an event of its own: error:bad_stream."""
    async def main() -> RunResult:
        chunk = orjson.dumps({"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "m",
                              "choices": [{"index": 0, "delta": {"content": "tok "}, "finish_reason": None}]})
        cut = chunk.index(b",") + 1  # between two members, where the newline joining the lines is whitespace
        head, tail = chunk[:cut], chunk[cut:]
        split = b"event: message\r\ndata: " + head + b"\r\ndata:" + tail + b"\r\n\r\n"
        events = (b": keep-alive\n\n", split, _chunk("tok "), _chunk(finish="stop"), _usage(40, 2), _DONE)
        server, url = await _serve(_sse(*events))
        try:
            return await LiveRunner(_calls(1), LiveOptions(url=url, client="aiohttp", progress=False)).run()
        finally:
            await server.cleanup()

    request = asyncio.run(main()).requests[0]
    assert request.status == "ok" and request.output_tokens == 2


def test_a_live_run_whose_requests_fail_says_why(tmp_path, capsys):
    """Nothing listening at --url: the run printed only "0/1 requests ok", the reason in the result file alone."""
    path = tmp_path / "w.json"
    _calls(1).save(path)
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    args = _parse(add_live_arguments, ["--url", f"http://127.0.0.1:{port}/v1", "--workload", str(path),
                                       "--no-progress", "--out", str(tmp_path / "live.json")])
    assert live_main(args) == 1
    err = capsys.readouterr().err
    assert "0/1 requests ok" in err and "failed: error:connection 1; first error: " in err
    assert "Cannot connect" in err


def test_live_and_simulate_judge_by_the_gateway_configs_slo_classes(tmp_path, capsys):
    """A class the gateway config defines (``urgent``) gets its targets and deadline in both modes; without the
    config it is unknown and refused (it used to get no targets at all: met by construction)."""
    config, path = tmp_path / "gw.yaml", tmp_path / "w.json"
    config.write_text(_GATEWAY_YAML)
    _urgent_workload().save(path)

    def live(*extra: str) -> int:
        return _live_against(tmp_path, _urgent_workload(), None, *extra)

    assert live() == 2
    assert "error: workflow u: unknown SLO class 'urgent'" in capsys.readouterr().err
    assert live("--gateway-config", str(config)) == 0, capsys.readouterr().err
    _check_targets(load_run(tmp_path / "live.json"))

    def sim(*extra: str) -> int:
        return simulate_main(_parse(add_simulate_arguments, ["--workload", str(path), "--clusters", "c0:1:1",
                                                             "--out", str(tmp_path / "sim.json"), *extra]))

    assert sim() == 2
    assert "error: workflow u: unknown SLO class 'urgent'" in capsys.readouterr().err
    assert sim("--gateway-config", str(config)) == 0
    _check_targets(load_run(tmp_path / "sim.json"))
    capsys.readouterr()
    bad = tmp_path / "bad.yaml"
    bad.write_text(_GATEWAY_YAML.replace("ttft_s: 1.0", "ttft_s: -1"))
    assert sim("--gateway-config", str(bad)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --gateway-config {bad}: config error at slo_classes.urgent.ttft_s")


def test_unknown_slo_classes_are_refused(tmp_path, capsys):
    workload = Workload([Workflow("c", 0.0, [Step("call", "assistant", 3, prompt_tokens=40)],
                                  kind="interactive", slo_class="nosuch")])
    with pytest.raises(WorkloadError, match="workflow c: unknown SLO class 'nosuch'"):
        simulate(workload, _config())
    with pytest.raises(WorkloadError, match="unknown SLO class 'nosuch'"):
        LiveRunner(workload, LiveOptions(url="http://127.0.0.1:1/v1", progress=False))
    out = tmp_path / "w.json"
    assert workload_main(_parse(add_workload_arguments, ["--workflow-slo-class", "nosuch", "--out", str(out)])) == 2
    assert capsys.readouterr().err.startswith("error: workflow_slo_class (--workflow-slo-class): unknown SLO class")
    assert not out.exists()
    config = tmp_path / "gw.yaml"
    config.write_text(_GATEWAY_YAML)
    assert workload_main(_parse(add_workload_arguments, ["--workflow-slo-class", "urgent", "--gateway-config",
                                                         str(config), "--duration", "20", "--out", str(out)])) == 0
    assert {w.slo_class for w in load_workload(out).workflows} == {"urgent"}


# ------------------------------------------------------------------------------------------ bad arguments

@pytest.mark.parametrize("command, argv, message", [
    ("simulate", ["--queue-options", '{"bogus": 1}'], "do not fit the maestro policy"),
    ("simulate", ["--declared-max-tokens", "0"], "declared max tokens must be >= 1"),
    ("experiment", ["E1", "--rates", "1", "--policies", "fcfs", "--duration", "5", "--declared-max-tokens", "0"],
     "declared max tokens must be >= 1"),
    ("workload", ["--rate", "1e9", "--duration", "1"], "rate x duration asks for about 1,000,000,000 arrivals"),
    ("live", ["--time-scale", "inf"], "time_scale must be a finite number > 0"),
    ("report", [], "it is a file, not a folder"),
])
def test_bad_arguments_are_clear_errors(command, argv, message, tmp_path, capsys):
    existing = tmp_path / "existing.txt"
    existing.write_text("a file")
    workload = tmp_path / "w.json"
    Workload([_chain("w0", 0.0)]).save(workload)
    if command == "simulate":
        code = simulate_main(_parse(add_simulate_arguments, ["--duration", "5", "--rate", "1", *argv]))
    elif command == "experiment":
        code = experiment_main(_parse(add_experiment_arguments, [*argv, "--out", str(tmp_path / "e.json")]))
    elif command == "workload":
        code = workload_main(_parse(add_workload_arguments, [*argv, "--out", str(tmp_path / "out.json")]))
    elif command == "live":
        code = live_main(_parse(add_live_arguments, ["--url", "http://127.0.0.1:1/v1", "--workload", str(workload),
                                                     "--out", str(tmp_path / "r.json"), "--no-progress", *argv]))
    else:
        run = tmp_path / "r.json"
        run.write_bytes(orjson.dumps(simulate(Workload([_chain("w0", 0.0)]), _config()).to_json()))
        code = report_main(_parse(add_report_arguments, [str(run), "--out", str(existing)]))
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert any(line.startswith("error: ") and message in line for line in err.splitlines()), err
    assert existing.read_text() == "a file"


def test_simulate_has_no_jobs_flag_and_deadline_scale_0_is_the_class_default(tmp_path, capsys):
    """``--jobs`` did nothing in simulate (one simulation, one process): it is only E1-E3's now. ``--deadline-scale
    0`` means the SLO class default in simulate and experiment too, as in ``loadgen workload``."""
    with pytest.raises(SystemExit):
        _parse(add_simulate_arguments, ["--jobs", "2"])
    capsys.readouterr()
    assert _parse(add_experiment_arguments, ["E1", "--jobs", "2"]).jobs == 2
    assert simulate_main(_parse(add_simulate_arguments, ["--rate", "1", "--duration", "10", "--clusters", "c0:1:1",
                                                         "--deadline-scale", "0", "--interactive-share", "0",
                                                         "--out", str(tmp_path / "r.json")])) == 0
    workflows = load_run(tmp_path / "r.json").workflows
    assert workflows and {w.deadline_s for w in workflows} == {600.0}  # batch's workflow_deadline_s
    assert simulate_main(_parse(add_simulate_arguments, ["--rate", "1", "--duration", "10",
                                                         "--deadline-scale", "-1"])) == 2
    assert "deadline scale must be >= 0" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ live runner

async def _serve(handler) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    return runner, f"http://127.0.0.1:{port}/v1"


def _chunk(content: str | None = None, finish: str | None = None) -> bytes:
    choice = {"index": 0, "delta": {"content": content} if content else {}, "finish_reason": finish}
    return b"data: " + orjson.dumps({"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "m",
                                     "choices": [choice]}) + b"\n\n"


def _streamer(complete: bool):
    async def chat(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for _ in range(3):
            await response.write(_chunk("tok "))
        if complete:
            await response.write(_chunk(finish="length") + b"data: [DONE]\n\n")
        await response.write_eof()  # clean end of the HTTP response either way
        return response
    return chat


_DONE = b"data: [DONE]\n\n"


def _usage(prompt: int, completion: int) -> bytes:
    return b"data: " + orjson.dumps({"id": "x", "choices": [], "usage": {
        "prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}}) + b"\n\n"


def _event(*choices: dict) -> bytes:
    """A chunk of several choices (n > 1), each ``{"index": ..., "delta": ..., "finish_reason": ...}``."""
    return b"data: " + orjson.dumps({"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "m",
                                     "choices": list(choices)}) + b"\n\n"


def _sse(*events: bytes, pause_s: float = 0.0):
    """A chat handler that streams these SSE bytes, ``pause_s`` apart, then ends the response cleanly."""
    async def chat(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for i, event in enumerate(events):
            if i and pause_s:
                await asyncio.sleep(pause_s)
            await response.write(event)
        await response.write_eof()
        return response
    return chat


def _chain_of_two() -> Workload:
    return Workload([Workflow("wf", 0.0, [Step("a", "planner", 3, prompt_tokens=40),
                                          Step("b", "coder", 3, prompt_tokens=40, depends_on=("a",))])], model="m")


def load_run_json(result: RunResult) -> RunResult:
    """``result`` written as a result file and read back as the report reads it."""
    from loadgen.report import run_from_json

    return run_from_json(orjson.loads(orjson.dumps(result.to_json())))


def _calls(count: int, spacing: float = 0.0) -> Workload:
    return Workload([Workflow(f"c{i}", spacing * i, [Step("call", "assistant", 3, prompt_tokens=40)],
                              kind="interactive", slo_class="interactive") for i in range(count)],
                    model="m", meta={"spec": {"rate": 99.0}})


@pytest.mark.parametrize("client", ["aiohttp", "openai"])
async def test_a_stream_cut_short_without_finish_is_truncated(client):
    pytest.importorskip(client)
    server, url = await _serve(_streamer(complete=False))
    good_server, good_url = await _serve(_streamer(complete=True))
    try:
        cut = await LiveRunner(_calls(1), LiveOptions(url=url, client=client, progress=False)).run()
        whole = await LiveRunner(_calls(1), LiveOptions(url=good_url, client=client, progress=False)).run()
    finally:
        await server.cleanup()
        await good_server.cleanup()
    request = cut.requests[0]
    assert request.status == "error:truncated" and request.finish is None and request.first_token is not None
    assert request.output_tokens == 3 and not request.slo_met()
    assert cut.meta["status_counts"] == {"error:truncated": 1} and "finish_reason" in cut.meta["errors"][0]
    assert whole.requests[0].status == "ok" and whole.requests[0].finish is not None


@pytest.mark.parametrize("client", ["aiohttp", "openai"])
async def test_a_stream_that_fails_mid_answer_keeps_the_tokens_that_came(client):
    """An error event after two content chunks: the request counted 0 output tokens, as if nothing had come."""
    pytest.importorskip(client)
    error = b"data: " + orjson.dumps({"error": {"message": "engine died", "type": "server_error",
                                                "code": 502}}) + b"\n\n"
    server, url = await _serve(_sse(_chunk("tok "), _chunk("tok "), error))
    try:
        run = await LiveRunner(_calls(1), LiveOptions(url=url, client=client, progress=False)).run()
    finally:
        await server.cleanup()
    request = run.requests[0]
    assert request.status == "error:stream" and request.output_tokens == 2 and request.first_token is not None


@pytest.mark.parametrize("client", ["aiohttp", "openai"])
@pytest.mark.parametrize("reason", ["abort", "error"])
@pytest.mark.parametrize("n", [1, 2])
async def test_an_answer_the_engine_did_not_finish_is_a_failure(client, reason, n):
    """finish_reason "abort" (vLLM aborted the request, e.g. the engine was put to sleep) or "error": the gateway
    relays the bytes but does not count the answer as finished, and neither does the runner. The step fails (its
    dependent is not sent), the tokens received are kept; with n = 2 one answer so ended is enough."""
    pytest.importorskip(client)
    if n == 1:
        events = (_chunk("tok "), _chunk("tok ", finish=reason), _usage(40, 2), _DONE)
    else:  # answer 0 finishes, answer 1 is aborted
        events = (_event({"index": 0, "delta": {"content": "tok "}, "finish_reason": None},
                         {"index": 1, "delta": {"content": "tok "}, "finish_reason": None}),
                  _event({"index": 0, "delta": {}, "finish_reason": "length"}),
                  _event({"index": 1, "delta": {}, "finish_reason": reason}), _usage(40, 2), _DONE)
    server, url = await _serve(_sse(*events))
    try:
        result = await asyncio.wait_for(
            LiveRunner(_chain_of_two(), LiveOptions(url=url, client=client, progress=False)).run(), 5.0)
    finally:
        await server.cleanup()
    by_step = {r.step_id: r for r in result.requests}
    assert {k: r.status for k, r in by_step.items()} == {"a": f"error:finish_{reason}", "b": "error:dependency"}
    cut = by_step["a"]
    assert cut.output_tokens == 2 and cut.first_token is not None and cut.finish is None and not cut.slo_met()
    assert result.workflows[0].finish is None and result.workflows[0].steps_ok == 0
    assert result.meta["dependency_skipped"] == 1 and f"finish_reason {reason!r}" in result.meta["errors"][0]
    assert result.summary()["requests_ok"] == 0
    from gateway.sse import CUT_REASONS

    from loadgen.live import CUT_FINISH_REASONS

    assert CUT_FINISH_REASONS == CUT_REASONS  # the gateway's unfinished answers


@pytest.mark.parametrize("client", ["aiohttp", "openai"])
@pytest.mark.parametrize("field", ["reasoning", "reasoning_content"])
async def test_a_reasoning_models_first_token_is_its_first_reasoning_token(client, field):
    """vLLM streams a reasoning model's thinking as delta.reasoning (formerly delta.reasoning_content): TTFT is
    the first of those, not the first token of the answer after the thinking (0.3 s later here)."""
    pytest.importorskip(client)
    thinking = [_event({"index": 0, "delta": {field: " think"}, "finish_reason": None}) for _ in range(4)]
    server, url = await _serve(_sse(*thinking, _chunk("answer"), _chunk(finish="stop"), _usage(40, 5), _DONE,
                                    pause_s=0.1))
    try:
        result = await asyncio.wait_for(
            LiveRunner(_calls(1), LiveOptions(url=url, client=client, progress=False)).run(), 5.0)
    finally:
        await server.cleanup()
    request = result.requests[0]
    assert request.status == "ok" and request.output_tokens == 5
    assert request.ttft < 0.2 and request.e2e >= 0.4, (request.ttft, request.e2e)


def _failing(scenario: str):
    """A chat handler that starts a stream and then fails it: stalls, sends an error event or bad data, resets."""
    async def chat(request: web.Request) -> web.StreamResponse:
        await request.read()
        if scenario == "http_429":
            return web.json_response({"error": {"message": "queue full", "code": "queue_full"}}, status=429)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(_chunk("tok "))
        if scenario == "timeout":
            await asyncio.sleep(1.0)  # past the 0.3 s request timeout
        elif scenario == "stream":
            await response.write(b'data: {"error": {"message": "Engine e dropped the stream.", '
                                 b'"type": "server_error", "code": "upstream_stream_error"}}\n\n' + _DONE)
        elif scenario == "bad_stream":
            await response.write(b"data: {not json\n\n")
            await asyncio.sleep(0.05)
        elif scenario == "connection":
            await asyncio.sleep(0.05)
            request.transport.abort()
            return response
        await response.write_eof()
        return response
    return chat


@pytest.mark.parametrize("client", ["aiohttp", "openai"])
@pytest.mark.parametrize("scenario", ["timeout", "stream", "connection", "bad_stream", "http_429"])
async def test_failures_have_the_same_status_with_either_client(client, scenario):
    """A read timeout is error:timeout (it was error:connection), and the SDK client labels its failures as the
    aiohttp client does (it said error:client for all but HTTP errors)."""
    pytest.importorskip(client)
    server, url = await _serve(_failing(scenario))
    options = LiveOptions(url=url, client=client, progress=False, request_timeout_s=0.3)
    try:
        result = await asyncio.wait_for(LiveRunner(_calls(1), options).run(), 10.0)
    finally:
        await server.cleanup()
    request = result.requests[0]
    assert request.status == f"error:{scenario}", result.meta["errors"]
    assert request.finish is None and len(result.meta["errors"]) == 1


@pytest.mark.parametrize("client", ["aiohttp", "openai"])
async def test_keep_alive_comments_do_not_keep_a_request_without_data_alive(client):
    """--request-timeout counts from the latest SSE data event: ": keep-alive" comments every 50 ms used to reset
    the socket read timer, so a server sending nothing else held the request for ever (here 3 s, the handler's
    end). A slow stream whose data events come 0.2 s apart is not cut by a 0.3 s timeout."""
    pytest.importorskip(client)

    async def keep_alive(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(_chunk("tok "))
        try:
            for _ in range(60):
                await asyncio.sleep(0.05)
                await response.write(b": keep-alive\n\n")
        except ConnectionError:  # the client gave up
            return response
        await response.write_eof()
        return response

    slow_events = [_chunk("tok ") for _ in range(5)] + [_chunk(finish="stop"), _usage(40, 5), _DONE]
    stalled, stalled_url = await _serve(keep_alive)
    slow, slow_url = await _serve(_sse(*slow_events, pause_s=0.2))
    loop = asyncio.get_running_loop()
    try:
        started = loop.time()
        result = await asyncio.wait_for(LiveRunner(_calls(1), LiveOptions(
            url=stalled_url, client=client, progress=False, request_timeout_s=0.3)).run(), 10.0)
        took = loop.time() - started
        steady = await asyncio.wait_for(LiveRunner(_calls(1), LiveOptions(
            url=slow_url, client=client, progress=False, request_timeout_s=0.3)).run(), 10.0)
    finally:
        await stalled.cleanup()
        await slow.cleanup()
    request = result.requests[0]
    assert request.status == "error:timeout", (request.status, result.meta["errors"])
    assert took < 1.5 and request.first_token is not None
    assert steady.requests[0].status == "ok" and steady.requests[0].e2e >= 1.0, steady.meta["errors"]


async def test_the_wait_for_a_client_slot_counts_in_ttft_latency_and_slo():
    """No coordinated omission: with --max-concurrency 1, the second call (due at 0.01 s) waits 0.3 s for the
    first to end. Its arrival is when it was due, so its TTFT and e2e hold the wait, and it misses a 0.2 s TTFT
    target; the wait itself is recorded per request and in meta.client_wait_s."""
    server, url = await _serve(_sse(_chunk("tok "), _chunk(finish="stop"), _usage(40, 1), _DONE, pause_s=0.1))
    options = LiveOptions(url=url, max_concurrency=1, progress=False, slo_targets={"interactive": (0.2, None, None)})
    try:
        result = await asyncio.wait_for(LiveRunner(_calls(2, 0.01), options).run(), 5.0)
    finally:
        await server.cleanup()
    first, second = result.requests
    assert first.status == second.status == "ok" and first.slo_met()
    assert second.arrival == pytest.approx(0.01, abs=0.05), second.arrival  # due, not sent, at 0.01 s
    assert second.ttft >= 0.25 and second.e2e >= 0.5 and not second.slo_met()
    assert result.summary()["request_slo_attainment"] == 0.5
    assert first.client_wait_s < 0.05
    assert second.client_wait_s >= 0.25 and second.arrival + second.client_wait_s >= first.finish - 0.01
    assert result.meta["client_wait_s"]["max"] == pytest.approx(second.client_wait_s, abs=0.02)
    assert load_run_json(result).requests[1].client_wait_s == second.client_wait_s  # the result file keeps it


@contextlib.asynccontextmanager
async def _hanging_server():
    """The URL of a server whose every request hangs until the block ends (a run ended while they wait)."""
    released = asyncio.Event()

    async def hang(request: web.Request) -> web.Response:
        await released.wait()
        return web.Response()

    server, url = await _serve(hang)
    try:
        yield url
    finally:
        released.set()
        await server.cleanup()


@pytest.mark.parametrize("end", ["time_limit", "stopped"])
async def test_requests_waiting_for_a_slot_are_recorded_when_the_run_ends(end):
    async with _hanging_server() as url:
        workload = _calls(3, 0.01)
        runner = LiveRunner(workload, LiveOptions(url=url, max_concurrency=1, progress=False, time_scale=2.0,
                                                  time_limit_s=0.4 if end == "time_limit" else None))
        task = asyncio.create_task(runner.run())
        if end == "stopped":
            await asyncio.sleep(0.4)
            runner.stop()
        result = await asyncio.wait_for(task, 5.0)
    assert result.meta["end"] == end
    assert len(result.requests) == 3 and {r.status for r in result.requests} == {f"error:{end}"}
    assert result.meta["not_sent"] == 2 and result.meta["status_counts"] == {f"error:{end}": 3}
    assert sum(result.meta["status_counts"].values()) == len(result.requests)
    # cut by the stop before their 1 s TTFT target passed: undecided, left out of the attainment, counted apart
    summary = result.summary()
    assert summary["request_slo_attainment"] is None and summary["requests_cut"] == 3 and runner.inflight == 0
    assert summary["partial"] == end
    # the offered load on the result's (wall) clock: the workload's 100/s sent twice as fast (not the spec's
    # 99/s); the workload's own beside it
    assert result.meta["load"] == 200.0 and result.meta["workload_load"] == workload.offered_load() == 100.0


@pytest.mark.parametrize("end", ["time_limit", "stopped"])
async def test_steps_not_yet_due_when_the_run_ends_are_counted(end, tmp_path, capsys):
    """The run ends while step a hangs: b (after a) and c (after b) were never due, d was in its think time; they
    are no requests, but meta.not_due counts them, and the summary line says so, so that the result's requests
    (1), the steps not due (3) and those of the workflow not started (2) add up to the workload's 6 steps."""
    steps = [Step("a", "planner", 3, prompt_tokens=40), Step("b", "coder", 3, prompt_tokens=40, depends_on=("a",)),
             Step("c", "reviewer", 3, prompt_tokens=40, depends_on=("b",)),
             Step("d", "tester", 3, prompt_tokens=40, think_time_s=60.0)]
    workload = Workload([Workflow("wf", 0.0, steps), Workflow("later", 60.0, steps[:2])], model="m")
    path, out = tmp_path / "w.json", tmp_path / "r.json"
    workload.save(path)
    async with _hanging_server() as url:
        argv = ["--url", url, "--workload", str(path), "--out", str(out), "--no-progress"]
        args = _parse(add_live_arguments, argv + (["--time-limit", "0.3"] if end == "time_limit" else []))
        if end == "stopped":  # SIGINT in the CLI: the runner's stop(); here the result directly
            runner = LiveRunner(workload, LiveOptions(url=url, progress=False))
            task = asyncio.create_task(runner.run())
            await asyncio.sleep(0.3)
            runner.stop()
            result = await asyncio.wait_for(task, 5.0)
        else:
            assert await asyncio.wait_for(asyncio.to_thread(live_main, args), 10.0) == 1
            result = load_run(out)
    assert result.meta["end"] == end
    assert [(r.step_id, r.status) for r in result.requests] == [("a", f"error:{end}")]
    assert result.meta["not_due"] == 3 and result.meta["not_started"] == 1 and result.meta["not_started_steps"] == 2
    assert len(result.requests) + result.meta["not_due"] + result.meta["not_started_steps"] == 6
    if end == "time_limit":
        err = capsys.readouterr().err
        assert "0/1 requests ok" in err and "3 step(s) of started workflows not yet due" in err, err
        assert "1 workflow(s) not started (2 step(s)), of 6 steps" in err, err


async def test_workflows_and_steps_cut_before_their_first_turn_are_counted_too():
    """Counted where each task was cancelled, a workflow task cancelled before it began and a step task cancelled
    before it waited were missed: runs whose workflows arrive around the time limit came up short."""
    async with _hanging_server() as url:
        for _ in range(10):
            steps = [Step("a", "planner", 3, prompt_tokens=10),
                     Step("b", "coder", 3, prompt_tokens=10, depends_on=("a",))]
            workload = Workload([Workflow(f"w{i}", 0.048 + i * 0.0001, steps) for i in range(40)], model="m")
            result = await LiveRunner(workload, LiveOptions(url=url, progress=False, time_limit_s=0.05)).run()
            meta = result.meta
            assert len(result.requests) + meta["not_due"] + meta["not_started_steps"] == 80, meta
            assert len(result.workflows) + meta["not_started"] == 40


async def test_steps_skipped_after_a_failed_dependency_are_failed_requests():
    """A workflow whose first step gets HTTP 400: its three dependents are never sent, but they are requests of
    the workload all the same (the simulator counts them), so attainment is 1 of 5, not 1 of 2."""
    async def chat(request: web.Request) -> web.StreamResponse:
        if request.headers.get("X-Workflow-Step") == "0":
            return web.Response(status=400, text="bad request")
        return await _streamer(complete=True)(request)

    server, url = await _serve(chat)
    steps = [Step("a", "planner", 3, prompt_tokens=40), Step("b", "coder", 3, prompt_tokens=40, depends_on=("a",)),
             Step("c", "coder", 3, prompt_tokens=40, depends_on=("a",)),
             Step("d", "reviewer", 3, prompt_tokens=40, depends_on=("b", "c"))]
    workload = Workload([Workflow("wf", 0.0, steps), *_calls(1).workflows], model="m")
    try:
        result = await asyncio.wait_for(LiveRunner(workload, LiveOptions(url=url, progress=False)).run(), 5.0)
    finally:
        await server.cleanup()
    status = {r.step_id: r.status for r in result.requests}
    assert status == {"a": "error:http_400", "b": "error:dependency", "c": "error:dependency",
                      "d": "error:dependency", "call": "ok"}
    summary = result.summary()
    assert summary["requests"] == 5 and summary["requests_ok"] == 1
    assert summary["request_slo_attainment"] == pytest.approx(0.2)
    assert result.meta["dependency_skipped"] == 3 and result.meta["end"] == "completed"
    assert sum(result.meta["status_counts"].values()) == 5


async def test_a_runner_bug_is_raised_not_passed_off_as_a_completed_run(monkeypatch):
    async def broken(*args, **kwargs):
        raise NameError("a bug in the runner")

    runner = LiveRunner(_calls(1), LiveOptions(url="http://127.0.0.1:1/v1", progress=False))
    monkeypatch.setattr(runner, "_send", broken)
    with pytest.raises(NameError, match="a bug in the runner"):
        await asyncio.wait_for(runner.run(), 5.0)


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_request_timeout_must_be_positive(value, tmp_path, capsys):
    with pytest.raises(ValueError, match="request_timeout_s"):
        LiveOptions(url="http://127.0.0.1:1/v1", request_timeout_s=float(value)).validate()
    path = tmp_path / "w.json"
    _calls(1).save(path)
    args = _parse(add_live_arguments, ["--url", "http://127.0.0.1:1/v1", "--workload", str(path), "--out",
                                       str(tmp_path / "r.json"), "--request-timeout", value, "--no-progress"])
    assert live_main(args) == 2
    assert "error: request_timeout_s must be" in capsys.readouterr().err


def test_output_folders_are_checked_before_running(tmp_path, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    workload_path = tmp_path / "w.json"
    _calls(1).save(workload_path)
    # live: a bad --out fails before the run (the URL is never contacted), a missing folder is created
    args = _parse(add_live_arguments, ["--url", "http://127.0.0.1:1/v1", "--workload", str(workload_path),
                                       "--out", str(blocker / "r.json"), "--no-progress"])
    assert live_main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot write") and "requests ok" not in err
    nested = tmp_path / "new" / "dir" / "r.json"
    args = _parse(add_live_arguments, ["--url", "http://127.0.0.1:1/v1", "--workload", str(workload_path),
                                       "--out", str(nested), "--no-progress", "--request-timeout", "5"])
    assert live_main(args) == 1 and nested.exists()  # connection refused: written, with the failure
    capsys.readouterr()
    # workload
    assert workload_main(_parse(add_workload_arguments, ["--rate", "1", "--duration", "5",
                                                         "--out", str(blocker / "w.json")])) == 2
    assert capsys.readouterr().err.startswith("error: cannot write")
    target = tmp_path / "a" / "b" / "w.json"
    assert workload_main(_parse(add_workload_arguments, ["--rate", "1", "--duration", "5",
                                                         "--out", str(target)])) == 0 and target.exists()


# ------------------------------------------------------------------------------------------ workload generator

@pytest.mark.parametrize("argv, message", [
    (["--rate", "inf"], "rate must be a finite number"),
    (["--duration", "inf"], "duration_s must be a finite number"),
    (["--rate", "nan"], "rate must be a finite number"),
    (["--arrival", "servegen", "--servegen-clients", "0"], "servegen_clients must be an integer >= 1"),
    (["--arrival", "servegen", "--servegen-clients", "-2"], "servegen_clients must be an integer >= 1"),
    (["--replay", "azure-code", "--replay-max-requests", "-3"], "replay_max_requests must be an integer >= 1"),
    (["--replay", "azure-code", "--replay-start", "-100"], "replay_start_s must be >= 0"),
])
def test_workload_cli_rejects_bad_numbers(argv, message, tmp_path, capsys):
    out = tmp_path / "w.json"
    assert workload_main(_parse(add_workload_arguments, [*argv, "--out", str(out)])) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and "Traceback" not in err and not out.exists()


def test_arrival_and_replay_functions_validate_their_arguments():
    rng = np.random.default_rng(0)
    for rate, duration in ((math.inf, 10.0), (1.0, math.inf), (math.nan, 10.0)):
        with pytest.raises(ValueError, match="finite"):
            generate_arrivals("poisson", rate, duration, rng)
    with pytest.raises(ValueError, match="clients must be an integer >= 1"):
        servegen_arrivals(1.0, 10.0, rng, clients=0)
    with pytest.raises(ValueError, match="start"):
        replay_requests("azure-code", start_s=-100.0)
    with pytest.raises(ValueError, match="max requests"):
        replay_requests("azure-code", max_requests=-3)


@pytest.mark.parametrize("rate, duration, count", [(1.3, 10.0, 13), (1.3, 20.0, 26), (10.0, 0.3, 3), (3.0, 1.0, 3),
                                                   (0.7, 10.0, 7), (2.0, 3.0, 6), (7.0, 2.1, 15), (0.1, 0.3, 1)])
def test_constant_arrivals_are_exactly_those_in_the_window(rate, duration, count):
    times = constant_arrivals(rate, duration)
    expected = [i / rate for i in range(count)]
    assert times.tolist() == pytest.approx(expected) and len(times) == len(expected)
    assert times.max() < duration
    spec_times = [w.arrival_s for w in _constant_workload(rate, duration).workflows]
    assert len(spec_times) == len(expected) and max(spec_times) < duration


def _constant_workload(rate: float, duration: float) -> Workload:
    from loadgen.workloads import build_workload

    return build_workload({"rate": rate, "duration_s": duration, "arrival": "constant", "templates": {"debate": 1}})


# ------------------------------------------------------------------------------------------ malformed files

@pytest.mark.parametrize("spec, message", [
    ({"rate": "0.5"}, "rate must be a number, got '0.5'"),
    ({"rate": True}, "rate must be a number"),
    ({"duration_s": None}, "duration_s must be a number"),
    ({"seed": 1.5}, "seed must be an integer"),
    ({"templates": ["chatdev"]}, "templates must be an object"),
    ({"replay_max_requests": "3"}, "replay_max_requests must be an integer or null"),
])
def test_spec_fields_are_type_checked(spec, message, tmp_path, capsys):
    with pytest.raises(SpecError, match=message.replace("(", r"\(")):
        WorkloadSpec.from_dict(spec)
    path = tmp_path / "spec.json"
    path.write_bytes(orjson.dumps(spec))
    assert workload_main(_parse(add_workload_arguments, ["--spec", str(path), "--out", str(tmp_path / "w.json")])) == 2
    assert capsys.readouterr().err.startswith("error: ")


_STEP = {"id": "s", "role": "x", "prompt_tokens": 10, "output_tokens": 5}


@pytest.mark.parametrize("top, message", [
    ({"seed": None}, "seed must be an integer"),
    ({"seed": "x"}, "seed must be an integer"),
    ({"meta": 5}, "'meta' must be an object"),
    ({"meta": [1, 2]}, "'meta' must be an object"),
    ({"name": ["a"]}, "name must be a string"),
    ({"workflows": [{"id": "a", "steps": [{**_STEP, "depends_on": [["s"]]}]}]}, "depends_on must list ids"),
    ({"workflows": [{"id": "a", "steps": [{**_STEP, "prompt_text": 5}]}]}, "prompt_text must be a string"),
    ({"workflows": [{"id": "a", "slo_class": None, "steps": [_STEP]}]}, "slo_class must be a string"),
])
def test_malformed_workload_files_are_workload_errors(top, message):
    document = {"format": "maestro-workload/1", "workflows": [{"id": "a", "steps": [_STEP]}], **top}
    with pytest.raises(WorkloadError, match=message.replace("(", r"\(")):
        parse_workload(document)


# ------------------------------------------------------------------------------------------ percentiles

def _timed_requests(ttfts: list[float], status: str = "ok") -> list[RequestResult]:
    return [RequestResult(request_id=f"r{i}", workflow_id=None, step_id="call", role="assistant",
                          slo_class="interactive", arrival=0.0, prompt_tokens=10, output_tokens=1,
                          first_token=t, finish=t, status=status) for i, t in enumerate(ttfts)]


def test_percentiles_are_nearest_rank_everywhere():
    """p99 of 1..100 is 99 and p50 is 50 (nearest rank); the summary, the report and the experiments tables
    had read one rank too high (100 and 51)."""
    from loadgen.experiments import summarize as experiment_figures
    from loadgen.fidelity import figures as e4_figures

    values = [float(v) for v in range(1, 101)]
    assert (quantile(values, 0.5), quantile(values, 0.99), quantile(values, 0.9)) == (50.0, 99.0, 90.0)
    assert quantile(reversed(values), 0.99) == 99.0 and quantile([7.0], 0.99) == 7.0 and quantile([], 0.5) is None
    assert (quantile(values, 0.0), quantile(values, 1.0)) == (1.0, 100.0)
    with pytest.raises(ValueError):
        quantile(values, 99)
    run = RunResult(mode="simulate", policy={}, requests=_timed_requests(values))
    summary = run.summary()
    assert (summary["p50_ttft_s"], summary["p99_ttft_s"]) == (50.0, 99.0)
    row = report_row(run, "r")
    assert (row.p99_ttft, row.p99_e2e) == (99.0, 99.0)
    figures = experiment_figures(run)
    assert (figures["p50_ttft_s"], figures["p99_ttft_s"], figures["interactive_p99_ttft_s"]) == (50.0, 99.0, 99.0)
    assert e4_figures(run)["p90_e2e_s"] == 90.0


def test_experiment_ttft_percentiles_are_over_successful_requests_like_the_summary():
    """The experiments' p50/p99 TTFT had taken failed requests with a first token too; the summary and the
    report take only the successful ones, so one run gave two p99s."""
    from loadgen.experiments import summarize as experiment_figures

    run = RunResult(mode="live", policy={}, requests=_timed_requests([float(v) for v in range(1, 101)])
                    + _timed_requests([1000.0] * 5, status="error:truncated"))
    figures, summary = experiment_figures(run), run.summary()
    assert (figures["p50_ttft_s"], figures["p99_ttft_s"]) == (summary["p50_ttft_s"], summary["p99_ttft_s"]) \
        == (50.0, 99.0)
    assert figures["interactive_p99_ttft_s"] == 99.0
    # a live client cannot see preemptions: unknown (None), not 0, in the summary and the experiments' figures
    assert summary["preempted_requests"] is None and figures["preempted_share"] is None
    simulated = RunResult(mode="simulate", policy={}, requests=_timed_requests([1.0, 2.0]))
    assert simulated.summary()["preempted_requests"] == 0 and experiment_figures(simulated)["preempted_share"] == 0


# ------------------------------------------------------------------------------------------ partial runs

def _partial_live_run(end: str = "time_limit") -> RunResult:
    """A live run stopped at 10 s: 8 on-time requests, 2 cut after they had missed their 2 s TTFT target (one
    with a late first token, one with none 9 s after it was due) and 2 cut 0.5 s after they were due (undecided);
    workflows: one met, one failed by its engine, one cut after its deadline passed, one cut in time (undecided)."""
    def request(i: int, arrival: float, first: float | None, status: str, wf: str | None = None) -> RequestResult:
        return RequestResult(request_id=f"r{i}", workflow_id=wf, step_id="s", role="coder", slo_class="interactive",
                             arrival=arrival, prompt_tokens=10, output_tokens=1, first_token=first,
                             finish=first if status == "ok" else None, ttft_target_s=2.0, status=status)

    cut = f"error:{end}"
    requests = [request(i, 0.5 * i, 0.5 * i + 0.1, "ok") for i in range(8)]
    requests += [request(8, 1.0, 4.0, cut), request(9, 1.0, None, cut),
                 request(10, 9.5, None, cut, "w-cut"), request(11, 9.5, None, cut, "w-late"),
                 request(12, 0.0, None, "error:http_500", "w-failed")]
    workflows = [WorkflowResult("w-ok", "workflow", "batch", 0.0, 100.0, finish=5.0, steps=1, steps_ok=1),
                 WorkflowResult("w-failed", "workflow", "batch", 0.0, 100.0, steps=1),
                 WorkflowResult("w-late", "workflow", "batch", 1.0, 2.0, steps=1),
                 WorkflowResult("w-cut", "workflow", "batch", 9.0, 100.0, steps=1)]
    return RunResult(mode="live", policy={"label": "edf"}, requests=requests, workflows=workflows,
                     meta={"end": end, "wall_s": 10.0, "time_base": "wall", "time_scale": 1.0, "load": 3.0,
                           "not_due": 2, "not_started": 1, "not_started_steps": 3})


def test_a_partial_run_leaves_out_what_the_stop_left_undecided():
    """Requests cut off by --time-limit / a stop had counted as SLO misses: the stop charged to the policy. Those
    whose target had not passed at the stop are now left out (and counted); those that had missed stay in."""
    run = _partial_live_run()
    summary = run.summary()
    assert summary["partial"] == "time_limit" and run.stop_time() == 10.0
    assert summary["requests"] == 13 and summary["requests_cut"] == 2
    assert summary["request_slo_attainment"] == pytest.approx(8 / 11)  # not 8 / 13
    assert summary["workflows_cut"] == 1 and summary["workflow_deadline_attainment"] == pytest.approx(1 / 3)
    # time base "workload": the stop is wall_s x time_scale on the result's clock
    run.meta.update(time_base="workload", time_scale=10.0)
    assert run.stop_time() == 100.0
    # a complete run leaves nothing out, whatever its statuses
    complete = _partial_live_run()
    complete.meta["end"] = "completed"
    assert complete.summary()["requests_cut"] == complete.summary()["workflows_cut"] == 0
    assert complete.summary()["request_slo_attainment"] == pytest.approx(8 / 13) and complete.partial is None


def test_the_report_marks_partial_runs_and_keeps_them_off_the_load_plot(tmp_path, capsys):
    from loadgen.report import plot_slo_vs_load

    partial = tmp_path / "stopped.json"
    partial.write_bytes(orjson.dumps(_partial_live_run("stopped").to_json()))
    complete_run = _partial_live_run()
    complete_run.meta["end"] = "completed"
    complete = tmp_path / "complete.json"
    complete.write_bytes(orjson.dumps(complete_run.to_json()))
    written = write_report([partial, complete], tmp_path / "report")
    rows = {row.name: row for row in written["rows"]}
    assert rows["stopped"].partial == "stopped" and rows["complete"].partial is None
    assert "| stopped (partial) | edf |" in written["table"] and "| complete | edf |" in written["table"]
    assert rows["stopped"].request_slo == pytest.approx(8 / 11)
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "- stopped (partial: stopped after 10.0 s): 2 request(s) and 1 workflow(s) cut off" in markdown
    assert "5 step(s) never reached" in markdown and "complete (partial" not in markdown
    # the load plot: the partial run is no point on it (alone, there is nothing to plot)
    assert plot_slo_vs_load([rows["stopped"]], tmp_path / "p.png") is None
    assert plot_slo_vs_load([rows["complete"]], tmp_path / "p.png") is not None
    assert report_main(_parse(add_report_arguments, [str(partial), "--out", str(tmp_path / "r2")])) == 0
    assert "Partial runs" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ simulate output

@pytest.mark.parametrize("options, message", [
    ('{"max_wait_s": Infinity}', "Infinity is not a JSON number"),
    ('{"max_wait_s": 1e400}', "max_wait_s must be a finite number"),
    ('{"weights": [1, NaN]}', "NaN is not a JSON number"),
    ('{"a": {"b": -1e999}}', "a.b must be a finite number"),
    ("[1]", "must be a JSON object"),
    ("{max_wait_s: 1}", "not valid JSON"),
])
def test_queue_options_must_be_a_json_object_of_finite_numbers(options, message, tmp_path, capsys):
    """Infinity / 1e400 in --queue-options went into the run's meta, and simulate --out wrote it as Infinity:
    a file no strict JSON reader (the report's) could read back. Refused at parse time now."""
    with pytest.raises(SystemExit) as exit_info:
        _parse(add_simulate_arguments, ["--queue-options", options, "--out", str(tmp_path / "r.json")])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


def test_result_files_are_strict_json(tmp_path, capsys, monkeypatch):
    """A non-finite figure in a result (here planted in the run's meta) is written as null, never as NaN or
    Infinity; simulate --out and the experiments' JSON both read back with a strict parser."""
    import loadgen.experiments as experiments
    from loadgen.results import json_bytes

    assert orjson.loads(json_bytes({"a": float("inf"), "b": float("nan"), 1.5: np.float64(2.0)})) \
        == {"a": None, "b": None, "1.5": 2.0}
    real = experiments.simulate

    def planted(*args, **kwargs):
        run = real(*args, **kwargs)
        run.meta["planted"] = float("inf")
        return run

    monkeypatch.setattr(experiments, "simulate", planted)
    path = tmp_path / "w.json"
    Workload([_chain("w0", 0.0)]).save(path)
    args = _parse(add_simulate_arguments, ["--workload", str(path), "--clusters", "c0:1:1", "--queue", "maestro",
                                           "--queue-options", '{"max_wait_s": null}',
                                           "--out", str(tmp_path / "r.json")])
    assert simulate_main(args) == 0
    data = orjson.loads((tmp_path / "r.json").read_bytes())  # strict: NaN / Infinity would raise
    assert data["meta"]["planted"] is None and data["meta"]["config"]["queue_options"] == {"max_wait_s": None}
    assert load_run(tmp_path / "r.json").requests
    experiments._write(str(tmp_path / "e.json"), {"saving": float("nan")})
    assert orjson.loads((tmp_path / "e.json").read_bytes()) == {"saving": None}


# ------------------------------------------------------------------------------------------ load and time base

@pytest.mark.parametrize("time_base, load", [("wall", 40.0), ("workload", 10.0)])
async def test_a_live_runs_load_is_on_the_clock_of_its_latencies(time_base, load):
    """--time-scale 4 on the wall clock sends the workload's 10 arrivals/s 4 times as fast and measures latencies
    in wall seconds: its load is 40/s on that clock (it was recorded as 10, a quarter of the load its figures
    belong to); on the workload clock it is the workload's 10/s. The report takes it as recorded."""
    workload = _calls(5, 0.1)
    async with _hanging_server() as url:
        result = await LiveRunner(workload, LiveOptions(url=url, progress=False, time_scale=4.0, time_base=time_base,
                                                        time_limit_s=0.05)).run()
    assert workload.offered_load() == 10.0 == result.meta["workload_load"]
    assert result.meta["load"] == load and report_row(result, "r").load == load
    # an older wall-clock file (no workload_load) recorded the workload's load: the report scales it
    result.meta.pop("workload_load")
    result.meta["load"] = 10.0
    assert report_row(result, "r").load == (40.0 if time_base == "wall" else 10.0)


# ------------------------------------------------------------------------------------------ output files

def test_out_may_not_name_an_input_file(tmp_path, capsys):
    """`live --workload wl.json --out wl.json` replaced the workload with the result; so did simulate, and
    `workload --spec s.json --out s.json` the spec. Refused before anything runs, however the path is spelled."""
    workload_path = tmp_path / "wl.json"
    _calls(1).save(workload_path)
    before = workload_path.read_bytes()
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.json").symlink_to(workload_path)
    for out in (workload_path, tmp_path / "sub" / ".." / "wl.json", tmp_path / "link.json"):
        args = _parse(add_live_arguments, ["--url", "http://127.0.0.1:1/v1", "--workload", str(workload_path),
                                           "--out", str(out), "--no-progress"])
        assert live_main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: cannot write {out}: it is the input file {workload_path}"), err
        assert simulate_main(_parse(add_simulate_arguments, ["--workload", str(workload_path), "--clusters",
                                                             "c0:1:1", "--out", str(out)])) == 2
        assert "it is the input file" in capsys.readouterr().err
    config = tmp_path / "gw.yaml"
    config.write_text(_GATEWAY_YAML)
    assert simulate_main(_parse(add_simulate_arguments, ["--workload", str(workload_path), "--clusters", "c0:1:1",
                                                         "--gateway-config", str(config), "--out", str(config)])) == 2
    assert "it is the input file" in capsys.readouterr().err and config.read_text() == _GATEWAY_YAML
    spec = tmp_path / "spec.json"
    spec.write_text('{"rate": 1, "duration_s": 5}')
    assert workload_main(_parse(add_workload_arguments, ["--spec", str(spec), "--out", str(spec)])) == 2
    assert "it is the input file" in capsys.readouterr().err and spec.read_text() == '{"rate": 1, "duration_s": 5}'
    assert workload_path.read_bytes() == before


def test_results_are_written_atomically_and_replacing_one_is_said(tmp_path, capsys, monkeypatch):
    """A result was written in place ("wb"): a failure in the middle left a truncated file where the previous
    one had been. Now a temporary file is renamed over it; an existing --out is replaced with a notice."""
    import loadgen.experiments as experiments
    from loadgen.results import write_atomically
    from predictor.trace import PLAIN_FILE_MODE

    target = tmp_path / "r.json"
    target.write_bytes(b"previous")
    with pytest.raises(TypeError):
        write_atomically(target, "not bytes")  # fails after the temporary file was created
    assert target.read_bytes() == b"previous" and [p.name for p in tmp_path.iterdir()] == ["r.json"]
    write_atomically(tmp_path / "new.json", b"{}")
    assert (tmp_path / "new.json").stat().st_mode & 0o777 == PLAIN_FILE_MODE
    # simulate: the write goes through it, an earlier result is announced as replaced
    workload_path = tmp_path / "w.json"
    Workload([_chain("w0", 0.0)]).save(workload_path)
    written = []
    monkeypatch.setattr(experiments, "write_atomically", lambda path, data: written.append(Path(path)))
    assert simulate_main(_parse(add_simulate_arguments, ["--workload", str(workload_path), "--clusters", "c0:1:1",
                                                         "--out", str(target)])) == 0
    assert written == [target] and f"replacing {target}" in capsys.readouterr().err
    # live too (a failed write: exit 2, the previous file as it was)
    import loadgen.live as live

    def failing(path, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(live, "write_atomically", failing)
    args = _parse(add_live_arguments, ["--url", "http://127.0.0.1:1/v1", "--workload", str(workload_path),
                                       "--out", str(target), "--no-progress", "--request-timeout", "5"])
    assert live_main(args) == 2
    err = capsys.readouterr().err
    assert f"replacing {target}" in err and "No space left on device" in err and target.read_bytes() == b"previous"



def test_a_reused_report_folder_loses_only_the_stale_plots_of_its_earlier_report(tmp_path):
    def result(name: str) -> Path:
        path = tmp_path / f"{name}.json"
        path.write_bytes(orjson.dumps(_run_with_series({"reserved_kv_tokens": [(0.0, 1.0), (1.0, 2.0)]}).to_json()))
        return path

    out = tmp_path / "report"
    out.mkdir()
    (out / "kv_mine.png").write_bytes(b"a plot of the user's")  # not shown by a report: not the report's
    (out / "notes.txt").write_text("keep")
    first = write_report([result("a"), result("b")], out)
    assert {"kv_a.png", "kv_b.png"} <= {p.name for p in first["images"]}
    second = write_report([result("a")], out)
    names = {p.name for p in out.iterdir()}
    assert "kv_b.png" not in names and "kv_a.png" in names and {p.name for p in second["images"]} <= names
    assert (out / "kv_mine.png").read_bytes() == b"a plot of the user's" and (out / "notes.txt").exists()
    # a result file that is one of the report's own files is refused before anything is written
    (out / "report.md").write_bytes((tmp_path / "a.json").read_bytes())
    with pytest.raises(ReportError, match="is its report.md"):
        write_report([out / "report.md"], out)


def test_report_run_names_are_distinct_after_they_are_made_safe(tmp_path):
    """`report d1/run.json d2/run.json run-1.json` gave two rows named run-1 (a repeat's suffix was not checked
    against the other files' names), and `a b.json` / `a_b.json` shared one kv plot (made safe after)."""
    from loadgen.report import run_names

    paths = []
    for rel in ("d1/run.json", "d2/run.json", "run-1.json", "a b.json", "a_b.json"):
        path = tmp_path / rel
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(orjson.dumps(_run_with_series({"reserved_kv_tokens": [(0.0, 1.0), (1.0, 2.0)]}).to_json()))
        paths.append(path)
    assert run_names(paths) == ["run", "run-2", "run-1", "a_b", "a_b-1"]
    written = write_report(paths, tmp_path / "report")
    assert sorted(row.name for row in written["rows"]) == ["a_b", "a_b-1", "run", "run-1", "run-2"]
    assert sorted(p.name for p in written["images"] if p.name.startswith("kv_")) \
        == ["kv_a_b-1.png", "kv_a_b.png", "kv_run-1.png", "kv_run-2.png", "kv_run.png"]


def test_a_live_runs_preemptions_are_unknown_in_the_report():
    """Live mode never measures preemptions (its records' 0 means unknown): the table said "0 (0)"."""
    from loadgen.report import markdown_table

    live = _partial_live_run()
    live.meta["end"] = "completed"
    simulated = RunResult(mode="simulate", policy={"label": "edf"}, requests=_timed_requests([1.0, 2.0]))
    simulated.requests[0].preemptions = 2
    cells = {row.mode: [c.strip() for c in markdown_table([row]).splitlines()[2].split("|")]
             for row in (report_row(live, "live"), report_row(simulated, "sim"))}
    column = [c.strip() for c in markdown_table([]).splitlines()[0].split("|")].index("preemptions (requests)")
    assert cells["live"][column] == "-" and cells["simulate"][column] == "2 (1)"


def test_the_report_keeps_its_tables_without_matplotlib(tmp_path, capsys, monkeypatch):
    """An ImportError from matplotlib lost the whole report; now report.md has the tables and says why there
    are no plots, with one warning."""
    import sys

    path = tmp_path / "r.json"
    path.write_bytes(orjson.dumps(_run_with_series({"reserved_kv_tokens": [(0.0, 1.0), (1.0, 2.0)]},
                                                   meta={"load": 1.0}).to_json()))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert report_main(_parse(add_report_arguments, [str(path), str(path), "--out", str(tmp_path / "report")])) == 0
    err = capsys.readouterr().err
    assert err.count("warning: no plots: matplotlib cannot be imported") == 1
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "| r |" in markdown and "(no plots: matplotlib cannot be imported" in markdown and "![" not in markdown
    assert not list((tmp_path / "report").glob("*.png"))


def _live_against(tmp_path, workload: Workload, served: list[str] | None, *extra: str, chat=None) -> int:
    """``live_main`` against a streaming server (``chat``, else three tokens and no usage) whose ``GET /v1/models``
    lists ``served`` (None: no such route)."""
    path = tmp_path / "w.json"
    workload.save(path)

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": name, "object": "model"} for name in served]})

    async def main() -> int:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", chat or _streamer(complete=True))
        if served is not None:
            app.router.add_get("/v1/models", models)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/v1"
        try:
            args = _parse(add_live_arguments, ["--url", url, "--workload", str(path), "--no-progress",
                                               "--out", str(tmp_path / "live.json"), *extra])
            return await asyncio.to_thread(live_main, args)
        finally:
            await runner.cleanup()

    return asyncio.run(main())


def test_live_refuses_a_model_the_server_does_not_serve_before_the_run(tmp_path, capsys):
    """A workload written for the simulated engines' model, run against a real engine's: every request was a 404
    and the run went on to the end, the fix (--model) named nowhere. The server's model list is asked first."""
    assert _live_against(tmp_path, _calls(2), ["tiny-llama"]) == 2
    err = capsys.readouterr().err
    assert "error: model 'm' is not served at http://127.0.0.1:" in err and "(it serves: tiny-llama)" in err
    assert "--model NAME" in err and not (tmp_path / "live.json").exists()
    assert _live_against(tmp_path, _calls(2), ["tiny-llama"], "--model", "tiny-llama") == 0
    assert load_run(tmp_path / "live.json").meta["model"] == "tiny-llama"
    assert "warning" not in capsys.readouterr().err
    # a server without the list (a URL that is not the API's base, say) is a doubt: a warning, and the run goes on
    assert _live_against(tmp_path, _calls(1), None) == 0
    assert "warning: GET http://127.0.0.1:" in capsys.readouterr().err


def test_live_warns_when_the_engine_ignored_the_workloads_output_lengths(tmp_path, capsys):
    """The default output control is a hint only the simulated engines read: against a real vLLM every answer ran
    to max_tokens, and only the result file's meta.output_mismatches said so."""
    workload = Workload([Workflow("c", 0.0, [Step("call", "assistant", 5, prompt_tokens=40)], kind="interactive",
                                  slo_class="interactive")], model="m", meta={"spec": {"rate": 99.0}})
    assert _live_against(tmp_path, workload, ["m"]) == 0  # the server streams 3 tokens, not 5
    err = capsys.readouterr().err
    assert ("warning: 1 of 1 requests that succeeded generated another length than the workload's. The "
            "X-Sim-Output-Tokens hint steers only the simulated engines: against a real vLLM use --output-control "
            "ignore-eos.") in err
    assert _live_against(tmp_path, workload, ["m"], "--output-control", "ignore-eos") == 0
    err = capsys.readouterr().err
    assert "warning: 1 of 1" in err and "hint steers" not in err


def test_live_warns_when_the_engine_counts_other_prompt_lengths_than_planned(tmp_path, capsys):
    """loadgen's prompts are words of one token in BPE vocabularies like Llama 3's; a tokenizer that splits them
    (a small vocabulary) made every prompt 1.65 times longer, the load other than planned, and prompts sized near
    the context were refused, with nothing said."""
    def counted_as(prompt_tokens: int):
        async def chat(request: web.Request) -> web.StreamResponse:
            await request.read()
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            await response.write(_chunk("a ") + _chunk("b ") + _chunk("c", finish="length")
                                 + _usage(prompt_tokens, 3) + _DONE)
            await response.write_eof()
            return response
        return chat

    assert _live_against(tmp_path, _calls(2), ["m"], chat=counted_as(66)) == 0  # 40 planned a request
    err = capsys.readouterr().err
    assert ("warning: the engine counted 1.65 times the prompt tokens the workload planned (132 against 80)"
            in err), err
    assert load_run(tmp_path / "live.json").meta["prompt_tokens_counted"] == 132
    assert _live_against(tmp_path, _calls(2), ["m"], chat=counted_as(44)) == 0
    assert "prompt tokens" not in capsys.readouterr().err


def test_the_api_key_goes_to_the_metrics_page_only_on_the_requests_origin(tmp_path):
    """--metrics-url may name another host: the run's key went there too."""
    seen: dict[str, list[str | None]] = {"api": [], "elsewhere": []}
    page = "# TYPE maestro_kv_reserved_tokens gauge\nmaestro_kv_reserved_tokens{engine=\"e\"} 7.0\n"

    def metrics_of(name: str):
        async def metrics(request: web.Request) -> web.Response:
            seen[name].append(request.headers.get("Authorization"))
            return web.Response(text=page)
        return metrics

    async def main(*extra: str) -> int:
        apps = []
        for name in ("api", "elsewhere"):
            app = web.Application()
            app.router.add_get("/metrics", metrics_of(name))
            if name == "api":
                app.router.add_post("/v1/chat/completions", _streamer(complete=True))
            runner = web.AppRunner(app)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            apps.append((runner, f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"))
        (_, api), (_, elsewhere) = apps
        path = tmp_path / "w.json"
        _calls(1).save(path)
        try:
            args = _parse(add_live_arguments, ["--url", api + "/v1", "--workload", str(path), "--no-progress",
                                               "--api-key", "k", "--out", str(tmp_path / "r.json"),
                                               *[a.replace("ELSEWHERE", elsewhere) for a in extra]])
            return await asyncio.to_thread(live_main, args)
        finally:
            for runner, _ in apps:
                await runner.cleanup()

    assert asyncio.run(main()) == 0
    assert seen["api"] and set(seen["api"]) == {"Bearer k"} and not seen["elsewhere"]
    seen["api"].clear()
    assert asyncio.run(main("--metrics-url", "ELSEWHERE/metrics")) == 0
    assert seen["elsewhere"] and set(seen["elsewhere"]) == {None} and not seen["api"]
    assert load_run(tmp_path / "r.json").series["reserved_kv_tokens"][0][1] == 7.0


def test_the_openai_client_without_the_sdk_is_refused_before_the_run(monkeypatch):
    """The SDK is not a dependency of the package itself: --client openai without it ended in a traceback (and an
    unclosed session) after the preflight, where any other bad option is one line and exit 2."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openai" else real(name, *a))
    with pytest.raises(ValueError, match=r"pip install 'openai>=3\.16\.1'"):
        LiveOptions(url="http://127.0.0.1:1/v1", client="openai").validate()
    LiveOptions(url="http://127.0.0.1:1/v1", client="aiohttp").validate()
