"""The overhead benchmark's tools: fake upstream, load client, and the orchestration (no timing assertions)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os

import aiohttp
import orjson
import pytest

from backends.vllm_metrics import parse_vllm_metrics
from loadgen.bench import fake_upstream, loadclient, overhead


@pytest.fixture
async def upstream():
    server, port = await fake_upstream.start_upstream("127.0.0.1", 0)
    try:
        yield port
    finally:
        server.close()
        await server.wait_closed()


def _sse_events(raw: bytes) -> list[bytes]:
    """Split an SSE body into event payloads (the text after ``data: ``), checking the framing as we go."""
    assert raw.endswith(b"\n\n"), raw[-40:]
    events = []
    for block in raw.split(b"\n\n")[:-1]:
        assert block.startswith(b"data: "), block
        assert b"\n" not in block, block
        events.append(block[len(b"data: "):])
    return events


async def test_fake_upstream_sse_is_parseable(upstream):
    body = loadclient.chat_body(stream=True)
    async with aiohttp.ClientSession() as session:
        async with session.post(f"http://127.0.0.1:{upstream}/v1/chat/completions", data=body,
                                headers={"Content-Type": "application/json"}) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            assert resp.headers.get("Transfer-Encoding") == "chunked"
            raw = await resp.read()
    events = _sse_events(raw)
    assert events[-1] == b"[DONE]"
    chunks = [orjson.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "Hello world"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 9


async def test_fake_upstream_routes(upstream):
    base = f"http://127.0.0.1:{upstream}"
    async with aiohttp.ClientSession() as session:
        async with session.post(base + "/v1/chat/completions", data=loadclient.chat_body()) as resp:
            assert resp.status == 200
            data = await resp.json()
            assert data["object"] == "chat.completion" and data["usage"]["total_tokens"] == 21
            assert data["choices"][0]["message"]["content"]
        # "stream": false, with spaces, is not a stream
        async with session.post(base + "/v1/chat/completions", data=b'{"model":"bench","stream": false}') as resp:
            assert (await resp.json())["object"] == "chat.completion"
        async with session.get(base + "/health") as resp:
            assert resp.status == 200
        async with session.get(base + "/metrics") as resp:
            text = await resp.text()
            for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
                assert f'{name}{{engine="0",model_name="bench"}} 0.0' in text
            metrics = parse_vllm_metrics(text)
            assert metrics.running == 0 and metrics.waiting == 0 and not metrics.sleeping
        async with session.get(base + "/v1/models") as resp:
            assert (await resp.json())["data"][0]["id"] == "bench"
        async with session.get(base + "/nope") as resp:
            assert resp.status == 404 and "error" in await resp.json()


async def test_fake_upstream_pipelining_and_chunked_request_body(upstream):
    reader, writer = await asyncio.open_connection("127.0.0.1", upstream)
    chunked_body = b'{"model":"bench","stream":true}'
    writer.write(
        loadclient.build_request("127.0.0.1", upstream, method="GET", path="/health")
        + b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"%x\r\n%s\r\n0\r\n\r\n" % (len(chunked_body), chunked_body)
    )
    await writer.drain()
    expected = fake_upstream.RESP_HEALTH + fake_upstream.RESP_STREAM
    got = await asyncio.wait_for(reader.readexactly(len(expected)), 5)
    assert got == expected
    writer.close()


class _FakeTransport:
    def __init__(self) -> None:
        self.written = b""
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name, default=None):
        return default


@pytest.mark.parametrize("stream", [False, True])
def test_client_parser_handles_byte_by_byte_delivery(stream):
    response = fake_upstream.RESP_STREAM if stream else fake_upstream.RESP_CHAT
    conn = loadclient.ClientConn()
    conn.connection_made(_FakeTransport())
    done = []
    conn.send(b"GET / HTTP/1.1\r\n\r\n", lambda *a: done.append(a), stream=stream, keep_body=True)
    for i in range(len(response)):
        assert not done, f"finished early at byte {i}"
        conn.data_received(response[i:i + 1])
    assert len(done) == 1
    _, status, t_send, t_first, t_data, t_done, body = done[0]
    assert status == 200 and t_send <= t_first <= t_done
    if stream:
        assert body == b"".join(fake_upstream.SSE_EVENTS)
        assert t_first <= t_data <= t_done
    else:
        assert orjson.loads(body)["object"] == "chat.completion"
    # the connection is reusable: a second response on it parses too
    conn.send(b"GET / HTTP/1.1\r\n\r\n", lambda *a: done.append(a), stream=stream, keep_body=True)
    conn.data_received(response)
    assert len(done) == 2 and done[1][1] == 200


async def test_load_client_fixed_rate_and_closed_loop(upstream):
    r = await loadclient.run_fixed_rate("127.0.0.1", upstream, rate=400, duration=0.5, warmup=0.1)
    assert r.errors == 0 and r.sent > 0 and r.completed == r.sent
    assert abs(r.sent - 200) <= 2
    s = r.summary()["latency_ms"]
    assert 0 < s["p50"] <= s["p99"] <= s["max"]

    r = await loadclient.run_fixed_rate("127.0.0.1", upstream, rate=400, duration=0.3, warmup=0.0, stream=True,
                                        arrival="poisson")
    assert r.errors == 0 and r.completed == r.sent > 0
    assert len(r.ttfb_ns) == r.completed
    assert all(0 < t <= lat for t, lat in zip(r.ttfb_ns, r.latency_ns))

    c = await loadclient.run_closed_loop("127.0.0.1", upstream, connections=4, duration=0.5, warmup=0.1)
    assert c.errors == 0 and c.completed > 100 and c.rps > 0


def test_percentile():
    assert loadclient.percentile([1, 2, 3, 4, 5], 50) == 3
    assert loadclient.percentile([0, 10], 99) == pytest.approx(9.9)
    assert loadclient.percentile([7], 99) == 7


def _args(*extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    overhead.add_arguments(parser)
    return parser.parse_args(list(extra))


def test_overhead_end_to_end_with_bare_proxy(tmp_path, capsys):
    """The whole orchestration (subprocesses, pinning, phases, report, JSON) on tiny durations."""
    out = tmp_path / "result.json"
    affinity = os.sched_getaffinity(0)
    code = overhead.main(_args("--target", "bare", "--rate", "200", "--duration", "0.4", "--warmup", "0.1",
                               "--connections", "4", "--max-duration", "0.4", "--noise-retries", "0",
                               "--json", str(out), "--quiet"))
    assert code in (0, 1)
    assert os.sched_getaffinity(0) == affinity  # restored
    result = json.loads(out.read_text())
    assert result["bench"] == "overhead"
    assert result["target"] == "bare"
    for phase in ("direct_nonstream", "bare_nonstream", "direct_stream", "bare_stream", "bare_max", "direct_max"):
        summary = result["phases"][phase]
        assert summary["completed"] > 0 and summary["errors"] == 0, (phase, summary["status_counts"])
    fig = result["figures"]
    assert fig["gateway_p50_ms"] > 0 and fig["max_rps"] > 0 and "added_ttfb_p50_ms" in fig
    assert set(result["verdicts"]) == {"added_p50_ms", "added_p99_ms", "added_ttfb_p50_ms", "max_rps"}
    printed = capsys.readouterr().out
    assert "non-stream latency p50" in printed and printed.strip().splitlines()[-1].startswith('{"bench"')


def test_overhead_through_the_gateway_smoke(tmp_path):
    """``maestro bench overhead`` against the real gateway (and the bare reference) runs and reports figures."""
    pytest.importorskip("gateway.app")
    out = tmp_path / "result.json"
    code = overhead.main(_args("--rate", "200", "--duration", "0.3", "--warmup", "0.1", "--connections", "4",
                               "--max-duration", "0.3", "--with-bare", "--noise-retries", "0",
                               "--json", str(out), "--quiet"))
    assert code in (0, 1)
    result = json.loads(out.read_text())
    for phase in ("gateway_nonstream", "gateway_stream", "gateway_max", "bare_nonstream", "bare_max"):
        summary = result["phases"][phase]
        # a smoke test on a possibly busy machine: the gateway answers, nearly always with 200
        assert summary["completed"] > 0, (phase, summary)
        assert summary["errors"] <= 0.05 * summary["completed"], (phase, summary["status_counts"])
    assert result["figures"]["max_rps"] > 0
    assert result["reference_bare"]["figures"]["bare_max_rps"] > 0
    if os.path.exists("/proc/self/task"):
        assert result["figures"]["cpu_us_per_request_at_max"] > 0
