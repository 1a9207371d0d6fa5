"""Failure modes through the gateway: retry before the first byte, never after; errors in OpenAI's shape."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time

import aiohttp
import openai
import orjson
import pytest

from tests.conftest import gateway_config, running_gateway
from tests.fault_engine import FaultEngine, RawEngine, raw_answer


@pytest.fixture
async def engines():
    started = [FaultEngine(), FaultEngine()]
    for engine in started:
        await engine.start()
    yield started
    for engine in started:
        await engine.stop()


_clients: list[openai.AsyncOpenAI] = []


def client_for(base_url: str, **kwargs) -> openai.AsyncOpenAI:
    client = openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="x", max_retries=0, **kwargs)
    _clients.append(client)
    return client


@pytest.fixture(autouse=True)
async def close_clients():
    yield
    while _clients:
        await _clients.pop().close()


async def test_busy_engine_is_retried_on_another(engines):
    busy, ok = engines
    busy.mode = "busy"
    async with running_gateway(gateway_config([busy.url, ok.url])) as gw:
        client = client_for(gw.base_url)
        for _ in range(4):
            reply = await client.chat.completions.create(model="fault-model",
                                                         messages=[{"role": "user", "content": "hi"}])
            assert reply.choices[0].message.content == "hello world"
        assert ok.hits == 4
        assert busy.hits >= 1  # round robin sent some first attempts to the busy engine
        async with aiohttp.ClientSession() as session:
            async with session.get(gw.base_url + "/metrics") as r:
                text = await r.text()
        assert 'maestro_upstream_errors_total{engine="local/p/0",reason="busy"}' in text
        assert "maestro_retries_total" in text


async def test_all_busy_gives_503_with_retry_after(engines):
    for engine in engines:
        engine.mode = "busy"
    async with running_gateway(gateway_config([e.url for e in engines])) as gw:
        async with aiohttp.ClientSession() as session:
            async with session.post(gw.base_url + "/v1/chat/completions",
                                    json={"model": "fault-model", "messages": [{"role": "user", "content": "x"}]}) as r:
                body = await r.json()
                assert r.status == 503
                assert r.headers["Retry-After"] == "1"
                assert body["error"]["code"] == "engines_busy"
                assert set(body["error"]) == {"message", "type", "param", "code"}
        assert sum(e.hits for e in engines) == 2  # one attempt each, no engine tried twice


async def test_connection_refused_is_retried(engines):
    dead_url = "http://127.0.0.1:9"  # discard port: nothing listens
    ok = engines[0]
    raw = gateway_config([dead_url, ok.url], monitor={"interval_s": 30})  # monitor will not take it down
    async with running_gateway(raw) as gw:
        # force the dead engine to look up so the proxy tries it
        from dataclasses import replace
        gw.registry.states["local/p/0"] = replace(gw.registry.states["local/p/0"], up=True)
        client = client_for(gw.base_url)
        for _ in range(3):
            reply = await client.chat.completions.create(model="fault-model",
                                                         messages=[{"role": "user", "content": "hi"}])
            assert reply.choices[0].message.content == "hello world"
        assert ok.hits == 3


async def _one_waiting(gw, engine_id: str) -> None:
    """Show one request waiting at this engine, so that least_loaded (ties at random) picks another: the
    monitor is stopped first (both engines were probed up at start), so that no probe takes the mark away."""
    from dataclasses import replace
    await gw.monitor.stop()
    state = gw.registry.states[engine_id]
    gw.registry.states[engine_id] = replace(state, metrics=replace(state.metrics, waiting=1))


@pytest.mark.parametrize("mode", ["drop_after_first", "reset_after_first"])
async def test_no_retry_after_first_byte(engines, mode, caplog):
    """An engine that goes away mid-stream, by an orderly close or a TCP reset: the client gets an error event
    and the end of the stream, not a replay elsewhere and not a dropped connection (a gateway bug's fate)."""
    broken, other = engines
    broken.mode = mode
    async with running_gateway(gateway_config([broken.url, other.url], routing={"policy": "least_loaded"})) as gw:
        await _one_waiting(gw, "local/p/1")  # least_loaded then picks local/p/0 == broken
        client = client_for(gw.base_url)
        stream = await client.chat.completions.create(model="fault-model", stream=True,
                                                      messages=[{"role": "user", "content": "hi"}])
        events = []
        with pytest.raises(openai.APIError) as caught:
            async for chunk in stream:
                events.append(chunk)
        assert "dropped the stream" in str(caught.value)
        assert broken.hits == 1 and other.hits == 0  # the stream was not replayed elsewhere
    assert not [r for r in caplog.records if "failed inside the gateway" in r.getMessage()]


async def _chat_fails_with_502(gw, code: str, says: str) -> openai.InternalServerError:
    """One chat through the SDK ends in a 502 with this error code and these words."""
    with pytest.raises(openai.InternalServerError) as caught:
        await client_for(gw.base_url).chat.completions.create(
            model="fault-model", messages=[{"role": "user", "content": "hi"}])
    assert (caught.value.status_code, caught.value.code) == (502, code)
    assert says in caught.value.message
    return caught.value


async def test_every_engine_refusing_connections_gives_502(engines):
    """Engines the monitor still counts as up but that refuse connections: each is tried once, then an OpenAI
    502 that names the last one tried (the monitor has not yet marked them down, so not the 503 for none up)."""
    from dataclasses import replace
    raw = gateway_config(["http://127.0.0.1:9", "http://127.0.0.1:1"], monitor={"interval_s": 30})
    async with running_gateway(raw) as gw:
        for engine_id in list(gw.registry.states):
            gw.registry.states[engine_id] = replace(gw.registry.states[engine_id], up=True)
        refused = await _chat_fails_with_502(gw, "upstream_unreachable", "could not be reached")
        assert refused.response.headers.get("Retry-After") == "1"  # no engine got it: safe to send again
        assert gw.inflight == 0 and all(v == 0 for v in gw.registry.inflight.values())


async def test_whole_answer_dropped_midway_is_502_and_not_replayed(engines):
    broken, other = engines
    broken.mode = "drop_mid_body"
    async with running_gateway(gateway_config([broken.url, other.url], routing={"policy": "least_loaded"})) as gw:
        await _one_waiting(gw, "local/p/1")  # least_loaded then picks local/p/0 == broken
        dropped = await _chat_fails_with_502(gw, "upstream_disconnected", "dropped the connection mid-answer")
        assert "Retry-After" not in dropped.response.headers  # the engine had it: a retry may run it twice
        assert broken.hits == 1 and other.hits == 0  # the engine had the request: it is not sent twice
        assert gw.inflight == 0 and all(v == 0 for v in gw.registry.inflight.values())


async def test_admin_sleep_errors(engines):
    """An engine without the sleep endpoints (vLLM started without ``VLLM_SERVER_DEV_MODE=1`` answers 404) is a
    502 that says so; a bad level is a 400 and reaches no engine; an unknown engine id is a 404."""
    async with running_gateway(gateway_config([e.url for e in engines])) as gw, aiohttp.ClientSession() as session:
        async with session.post(gw.base_url + "/admin/engines/local/p/0/sleep") as r:
            body = await r.json()
            assert r.status == 502 and body["error"]["code"] == "engine_admin_failed"
            assert "HTTP 404" in body["error"]["message"]
        async with session.post(gw.base_url + "/admin/engines/local/p/0/wake_up") as r:
            assert r.status == 502 and (await r.json())["error"]["code"] == "engine_admin_failed"
        async with session.post(gw.base_url + "/admin/engines/local/p/0/sleep?level=3") as r:
            body = await r.json()
            assert r.status == 400 and body["error"]["param"] == "level"
        async with session.post(gw.base_url + "/admin/engines/local/p/9/sleep") as r:
            body = await r.json()
            assert r.status == 404 and body["error"]["code"] == "engine_not_found"
        assert not any(e.hits for e in engines)
        assert all(state.up and not state.sleeping for state in gw.registry.states.values())


async def test_engine_500_becomes_502(engines):
    for engine in engines:
        engine.mode = "error_500"
    async with running_gateway(gateway_config([e.url for e in engines])) as gw:
        with pytest.raises(openai.InternalServerError) as caught:
            await client_for(gw.base_url).chat.completions.create(
                model="fault-model", messages=[{"role": "user", "content": "hi"}])
        assert caught.value.status_code == 502
        assert "engine exploded" in caught.value.message


async def test_timeout_gives_504(engines):
    for engine in engines:
        engine.mode, engine.delay_s = "stall", 5
    async with running_gateway(gateway_config([e.url for e in engines], timeouts={"total_s": 0.5})) as gw:
        with pytest.raises(openai.APIStatusError) as caught:
            await client_for(gw.base_url).chat.completions.create(
                model="fault-model", messages=[{"role": "user", "content": "hi"}])
        assert caught.value.status_code == 504


def _requests_with_status(gw, status: int) -> float:
    """``maestro_requests_total`` of chat requests counted with this status."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(gw.metrics.render().decode()):
        if family.name == "maestro_requests":
            return sum(sample.value for sample in family.samples if sample.name == "maestro_requests_total"
                       and sample.labels["route"] == "chat" and sample.labels["status"] == str(status))
    return 0.0


async def test_stream_idle_timeout_ends_stream_with_error_event(engines):
    for engine in engines:
        engine.mode, engine.delay_s = "slow", 2
    async with running_gateway(gateway_config([e.url for e in engines], timeouts={"stream_idle_s": 0.3})) as gw:
        stream = await client_for(gw.base_url).chat.completions.create(
            model="fault-model", stream=True, messages=[{"role": "user", "content": "hi"}])
        with pytest.raises(openai.APIError) as caught:
            async for _ in stream:
                pass
        assert "sent no event" in str(caught.value)
        # counted as the 504 it would have been before the stream began, not as the 200 that went out
        assert (_requests_with_status(gw, 504), _requests_with_status(gw, 200)) == (1, 0)


async def test_a_stream_past_the_total_limit_says_so(engines):
    """Events keep coming (never idle for stream_idle_s), but the request outlasts timeouts.total_s."""
    for engine in engines:
        engine.mode, engine.delay_s = "slow", 0.6
    async with running_gateway(gateway_config([e.url for e in engines],
                                              timeouts={"total_s": 1.0, "stream_idle_s": 10.0})) as gw:
        stream = await client_for(gw.base_url).chat.completions.create(
            model="fault-model", stream=True, messages=[{"role": "user", "content": "hi"}])
        with pytest.raises(openai.APIError) as caught:
            async for _ in stream:
                pass
        assert "did not finish within timeouts.total_s (1 s" in str(caught.value)


class _Unanswering:
    """A listener that answers /metrics (so the monitor sees the engine up) until ``stop_accepting()``; then its
    accept queue is filled, so that the kernel drops further SYNs and a connect hangs until its timeout."""

    METRICS = b'vllm:num_requests_running{engine="0",model_name="fault-model"} 0.0\n'

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1)
        self.sock.settimeout(0.05)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.accepting, self.closed, self._fillers = True, False, []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self.closed:
            if not self.accepting:
                time.sleep(0.05)
                continue
            try:
                connection, _ = self.sock.accept()
            except OSError:
                continue
            with connection:
                try:
                    connection.settimeout(1)
                    connection.recv(65536)
                    connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n"
                                       b"Content-Length: %d\r\n\r\n%s" % (len(self.METRICS), self.METRICS))
                except OSError:
                    pass

    def stop_accepting(self) -> None:
        self.accepting = False
        time.sleep(0.2)  # the serving loop has left accept()
        for _ in range(4):
            filler = socket.socket()
            filler.setblocking(False)
            try:
                filler.connect(self.sock.getsockname())
            except BlockingIOError:
                pass
            self._fillers.append(filler)

    def close(self) -> None:
        self.closed = True
        for filler in self._fillers:
            filler.close()
        self.sock.close()


async def test_a_connect_timeout_is_retried_on_another_engine(engines):
    """A connect that times out (aiohttp's ConnectionTimeoutError, a TimeoutError but no ClientConnectorError)
    is an engine that could not be reached, retried elsewhere: not a 504 for an engine slow to answer."""
    unanswering = _Unanswering()
    ok = engines[0]
    config = gateway_config([unanswering.url, ok.url], timeouts={"connect_s": 0.5})
    try:
        async with running_gateway(config) as gw:
            await asyncio.get_running_loop().run_in_executor(None, unanswering.stop_accepting)
            client = client_for(gw.base_url)
            for _ in range(2):  # round robin: one of the two tries the unanswering engine first
                reply = await client.chat.completions.create(model="fault-model",
                                                             messages=[{"role": "user", "content": "hi"}])
                assert reply.choices[0].message.content == "hello world"
            assert ok.hits == 2
            assert 'reason="connect"' in gw.metrics.render().decode()
    finally:
        unanswering.close()


async def test_an_engine_behind_a_compressing_proxy_answers_in_plain_json(engines):
    """The gateway relays the engine's bytes as they are, so it must ask for them uncompressed."""
    engine = engines[0]
    engine.mode = "compressing"
    async with running_gateway(gateway_config([engine.url])) as gw:
        async with aiohttp.ClientSession(auto_decompress=False) as session:
            async with session.post(gw.base_url + "/v1/chat/completions",
                                    json={"model": "fault-model", "messages": [{"role": "user", "content": "hi"}]},
                                    headers={"Accept-Encoding": "identity"}) as response:
                assert response.status == 200 and "Content-Encoding" not in response.headers
                assert orjson.loads(await response.read())["choices"][0]["message"]["content"] == "hello world"
    assert engine.seen_headers[-1]["Accept-Encoding"] == "identity"


async def test_a_stop_lets_requests_finish_then_ends_the_rest_with_an_answer(engines):
    """SIGTERM (Gateway.stop): requests in flight get server.shutdown_grace_s to finish; after it a stream ends
    with an error event and [DONE], a request not yet answered gets 503 with Retry-After, and a new request during
    the grace gets 503 at once. The whole stop stays well inside Docker's 10 s."""
    streaming, stalling = engines
    streaming.mode, streaming.delay_s = "slow", 5.0  # one token, then a 5 s pause
    stalling.mode, stalling.delay_s = "stall", 5.0
    config = gateway_config([streaming.url, stalling.url], server={"shutdown_grace_s": 0.5})
    config["clusters"][0]["pools"][0]["engines"] = [{"url": streaming.url}]
    config["clusters"].append({"name": "other", "pools": [{"name": "q", "kind": "vllm", "models": ["stall-model"],
                                                           "engines": [{"url": stalling.url}]}]})
    config["models"].append({"name": "stall-model", "max_model_len": 2048})
    stalling.model = "stall-model"
    async with running_gateway(config) as gw, aiohttp.ClientSession() as session:
        body = {"model": "fault-model", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
        async with session.post(gw.base_url + "/v1/chat/completions", json=body) as stream:
            await stream.content.readline()  # the stream is under way
            whole = asyncio.create_task(session.post(gw.base_url + "/v1/chat/completions", json={
                "model": "stall-model", "messages": [{"role": "user", "content": "hi"}]}))
            while not stalling.hits:
                await asyncio.sleep(0.01)
            started = time.monotonic()
            stopping = asyncio.create_task(gw.stop())
            await asyncio.sleep(0.1)
            async with session.post(gw.base_url + "/v1/chat/completions", json=body) as late:
                assert late.status == 503 and (await late.json())["error"]["code"] == "gateway_shutting_down"
            rest = (await stream.read()).decode()
            assert '"code":"gateway_shutting_down"' in rest and rest.rstrip().endswith("data: [DONE]")
            answer = await whole
            assert answer.status == 503 and answer.headers["Retry-After"] == "1"
            assert (await answer.json())["error"]["code"] == "gateway_shutting_down"
            await stopping
            assert 0.5 <= time.monotonic() - started < 4.0
        # no request counted as one whose client left (499): the stop ended them, the clients were there
        metrics = gw.metrics.render().decode()
        assert 'status="503"} 1.0' in metrics and 'status="499"' not in metrics
        # the stream the stop cut as well: it is no 200 (the client got the shutdown's error event)
        assert 'route="chat",status="200"' not in metrics


async def test_during_the_stop_health_says_draining_a_second_signal_ends_the_grace_and_leavers_are_499(engines):
    """From a shutdown audit: /health answered 200 "ok" through the whole grace, so a load balancer went on sending
    traffic; an operator's second Ctrl-C was not heard (the full grace ran); a client that left during the grace
    was counted as a 503 the stop answered, not a 499; and the stopped gateway stayed in the store's gateway
    list until its heartbeat expired, counted by the others when they share engines in an outage."""
    streaming, stalling = engines
    streaming.mode, streaming.delay_s = "slow", 30.0  # one token, then a long pause
    config = gateway_config([streaming.url], server={"shutdown_grace_s": 30.0})
    async with running_gateway(config) as gw, aiohttp.ClientSession() as session:
        assert gw.gateway_id in await gw.store.gateways()
        body = {"model": "fault-model", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
        leaving = await session.post(gw.base_url + "/v1/chat/completions", json=body)
        await leaving.content.readline()
        async with session.post(gw.base_url + "/v1/chat/completions", json=body) as stream:
            await stream.content.readline()  # two streams under way
            stopping = asyncio.create_task(gw.stop())
            await asyncio.sleep(0.1)
            async with session.get(gw.base_url + "/health") as health:
                assert health.status == 503 and (await health.json())["status"] == "draining"
            leaving.close()  # this client leaves during the grace
            await asyncio.sleep(0.2)
            started = time.monotonic()
            gw.hurry()  # the second signal
            rest = (await stream.read()).decode()
            assert '"code":"gateway_shutting_down"' in rest
            await stopping
            assert time.monotonic() - started < 4.0  # not the 30 s grace
        metrics = gw.metrics.render().decode()
        assert 'route="chat",status="499"} 1.0' in metrics  # the one that left
        assert 'route="chat",status="503"} 1.0' in metrics  # the one the stop cut
        assert await gw.store.gateways() == {}  # gone from the list at once


async def test_a_refusal_inside_a_200_stream_is_retried_like_a_503(engines):
    """vLLM refuses a request it has no room for with an error event (code 503) on a 200 stream when the refusal
    comes at add_request: nothing has reached the client yet, so it is back-pressure, retried elsewhere."""
    refusing, ok = engines
    refusing.mode = "busy_in_stream"
    async with running_gateway(gateway_config([refusing.url, ok.url])) as gw:
        client = client_for(gw.base_url)
        for _ in range(4):  # round robin: some first tries go to the refusing engine
            stream = await client.chat.completions.create(model="fault-model", stream=True,
                                                          messages=[{"role": "user", "content": "hi"}])
            assert "".join([c.choices[0].delta.content or "" async for c in stream if c.choices]) == "hello world"
        assert refusing.hits >= 1 and ok.hits == 4
        assert 'reason="busy"' in gw.metrics.render().decode()
        ok.mode = "busy_in_stream"
        with pytest.raises(openai.APIStatusError) as caught:
            await client.chat.completions.create(model="fault-model", stream=True,
                                                 messages=[{"role": "user", "content": "hi"}])
        assert caught.value.status_code == 503 and caught.value.body["code"] == "engines_busy"


async def test_a_stream_whose_first_event_takes_stream_idle_s_is_a_504(engines):
    """vLLM sends its 200 at once, then nothing while it queues the request: still a 504 before any byte."""
    for engine in engines:
        engine.mode, engine.delay_s = "slow_start", 2.0
    async with running_gateway(gateway_config([e.url for e in engines], timeouts={"stream_idle_s": 0.3})) as gw:
        with pytest.raises(openai.APIStatusError) as caught:
            await client_for(gw.base_url).chat.completions.create(
                model="fault-model", stream=True, messages=[{"role": "user", "content": "hi"}])
        assert caught.value.status_code == 504 and "within 0.3 s" in caught.value.body["message"]


async def test_a_first_event_whose_end_comes_in_a_later_packet_is_relayed_at_once(engines):
    """The blank line that ends the first event can arrive alone: the event is whole then, and the client gets it
    before the engine's next words (2 s later here), not with them."""
    for engine in engines:
        engine.mode, engine.delay_s = "split_first_event", 2.0
    async with running_gateway(gateway_config([e.url for e in engines])) as gw:
        started = time.monotonic()
        stream = await client_for(gw.base_url).chat.completions.create(
            model="fault-model", stream=True, messages=[{"role": "user", "content": "hi"}])
        first = await stream.__anext__()
        assert first.choices[0].delta.role == "assistant" and time.monotonic() - started < 1.5
        assert [chunk async for chunk in stream]  # and the rest follows


async def test_all_engines_down_gives_503(engines):
    async with running_gateway(gateway_config([e.url for e in engines])) as gw:
        for engine in engines:
            await engine.stop()
        await asyncio.sleep(0.6)  # two failed probes at 0.1 s each mark them down
        assert gw.registry.up_count() == 0
        with pytest.raises(openai.APIStatusError) as caught:
            await client_for(gw.base_url).chat.completions.create(
                model="fault-model", messages=[{"role": "user", "content": "hi"}])
        assert caught.value.status_code == 503
        assert "No engine is available" in caught.value.message


async def test_a_client_that_leaves_before_the_first_event_aborts_the_engines_work(engines):
    for engine in engines:
        engine.mode, engine.delay_s = "slow_start", 10
    async with running_gateway(gateway_config([e.url for e in engines])) as gw:
        async with aiohttp.ClientSession() as session:
            with pytest.raises(asyncio.TimeoutError):
                async with session.post(gw.base_url + "/v1/chat/completions", timeout=aiohttp.ClientTimeout(total=0.3),
                                        json={"model": "fault-model", "stream": True,
                                              "messages": [{"role": "user", "content": "x"}]}) as response:
                    await response.read()
        for _ in range(40):
            if sum(e.aborted for e in engines) == 1:
                break
            await asyncio.sleep(0.05)
        assert sum(e.aborted for e in engines) == 1
        assert gw.inflight == 0 and all(v == 0 for v in gw.registry.inflight.values())


async def test_client_disconnect_cancels_upstream(engines):
    for engine in engines:
        engine.mode, engine.delay_s = "stall", 10
    async with running_gateway(gateway_config([e.url for e in engines])) as gw:
        async with aiohttp.ClientSession() as session:
            with pytest.raises(asyncio.TimeoutError):
                await session.post(gw.base_url + "/v1/chat/completions",
                                   json={"model": "fault-model", "messages": [{"role": "user", "content": "x"}]},
                                   timeout=aiohttp.ClientTimeout(total=0.3))
        for _ in range(20):
            if sum(e.aborted for e in engines) == 1:
                break
            await asyncio.sleep(0.05)
        assert sum(e.aborted for e in engines) == 1
        assert gw.inflight == 0 and all(v == 0 for v in gw.registry.inflight.values())


async def _stream_error(gw, **create) -> str:
    """The message of the error event that ends a streamed chat through the SDK."""
    stream = await client_for(gw.base_url).chat.completions.create(
        model="fault-model", stream=True, messages=[{"role": "user", "content": "hi"}], **create)
    with pytest.raises(openai.APIError) as caught:
        async for _ in stream:
            pass
    return str(caught.value)


@contextlib.contextmanager
def _silent_client(gw):
    """A client that sends a streamed chat and then reads nothing, its connection open."""
    body = orjson.dumps({"model": "fault-model", "stream": True, "messages": [{"role": "user", "content": "hi"}]})
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", int(gw.base_url.rsplit(":", 1)[1])))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    try:
        yield sock
    finally:
        sock.close()


async def test_a_client_that_stops_reading_a_stream_is_cut_off(engines):
    """A client that reads nothing more: the write to it waits, which no upstream read timeout sees. It held
    its place in the gateway, its engine's request and its KV reservation until its TCP connection died (two
    such clients answered everyone else 429). Now the stream is cut after stream_idle_s."""
    engine = engines[0]
    engine.mode = "firehose"
    raw = gateway_config([engine.url], timeouts={"stream_idle_s": 0.5})
    async with running_gateway(raw) as gw:
        with _silent_client(gw):
            deadline = time.monotonic() + 10
            while (gw.inflight or engine.hits == 0) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert gw.inflight == 0, "the stalled stream still holds its place"
            for _ in range(100):
                if engine.aborted:
                    break
                await asyncio.sleep(0.05)
            assert engine.aborted == 1  # the engine's request ended with it
            assert all(v == 0 for v in gw.registry.inflight.values())
            assert b"maestro_client_stalled_total 1.0" in gw.metrics.render()
            assert (_requests_with_status(gw, 499), _requests_with_status(gw, 200)) == (1, 0)
            reply = await client_for(gw.base_url).chat.completions.create(  # the gateway serves on
                model="fault-model", messages=[{"role": "user", "content": "hi"}],
                extra_headers={"X-Fault-Mode": "ok"})
            assert reply.choices[0].message.content == "hello world"


async def test_an_error_as_the_first_event_is_answered_with_its_status_or_retried(engines):
    """vLLM sends its 200 at once and reports a late refusal (400) or a failure (500) as the first event. The
    gateway holds that event before the client's answer starts: a 400 becomes the HTTP 400 (the SDK's
    BadRequestError), and a 500 is tried on another engine, as a 503 is."""
    first, second = engines
    first.mode = "error_event_400"
    async with running_gateway(gateway_config([first.url, second.url], routing={"policy": "least_loaded"})) as gw:
        await _one_waiting(gw, "local/p/1")
        with pytest.raises(openai.BadRequestError) as caught:
            await client_for(gw.base_url).chat.completions.create(
                model="fault-model", stream=True, messages=[{"role": "user", "content": "hi"}])
        assert "error 400 from the engine" in caught.value.message
        assert (first.hits, second.hits) == (1, 0)  # a refusal is not tried again elsewhere
        first.mode = "error_event_500"
        stream = await client_for(gw.base_url).chat.completions.create(
            model="fault-model", stream=True, messages=[{"role": "user", "content": "hi"}])
        assert "".join([c.choices[0].delta.content or "" async for c in stream if c.choices]) == "hello world"
        assert (first.hits, second.hits) == (2, 1)
        second.mode = "error_event_500"
        with pytest.raises(openai.InternalServerError) as caught:
            await client_for(gw.base_url).chat.completions.create(
                model="fault-model", stream=True, messages=[{"role": "user", "content": "hi"}])
        assert caught.value.status_code == 502 and caught.value.code == "upstream_error"
        assert "error 500 from the engine" in caught.value.message
        assert gw.inflight == 0 and all(v == 0 for v in gw.registry.inflight.values())


async def test_a_stream_closed_without_done_is_no_whole_answer(engines):
    """A stream whose connection ends after its last chunk but before ``[DONE]`` counted as a whole answer; one
    that ends inside an event had that part relayed, and the error event written onto it was no JSON."""
    for engine in engines:
        engine.mode = "no_done"
    async with running_gateway(gateway_config([e.url for e in engines])) as gw:
        assert "before its end (no [DONE])" in await _stream_error(gw)
        for engine in engines:
            engine.mode = "cut_mid_event"
        assert "before its end (no [DONE])" in await _stream_error(gw)
        assert (_requests_with_status(gw, 502), _requests_with_status(gw, 200)) == (2, 0)
        # the answer's last chunk, held for the usage chunk's fingerprint, still reaches the client before the
        # error event when the engine closes (or drops) without a usage chunk
        for mode, error in (("cut_after_finish", r"before its end \(no \[DONE\]\)"),
                            ("reset_after_finish", "dropped the stream")):
            for engine in engines:
                engine.mode = mode
            got = []
            stream = await client_for(gw.base_url).chat.completions.create(
                model="fault-model", stream=True, messages=[{"role": "user", "content": "hi"}])
            with pytest.raises(openai.APIError, match=error):
                async for chunk in stream:
                    got.append(chunk.choices[0].finish_reason)
            assert got == [None, None, None, "stop"], mode
        assert _requests_with_status(gw, 502) == 4


async def test_a_client_that_takes_not_the_streams_end_is_cut_off(engines, monkeypatch):
    """The end of a stream (``write_eof``) waits for a client whose socket is full, as any write does: it
    held the request's place, engine and reservation as long as the client's TCP connection lived."""
    from aiohttp import web

    write_eof = web.StreamResponse.write_eof

    async def stuck_for_the_gateways_answers(self, data=b""):
        if "X-Request-Id" in self.headers:  # the gateway's answers; the fault engines' own go on
            await asyncio.sleep(3600)
        return await write_eof(self, data)

    monkeypatch.setattr(web.StreamResponse, "write_eof", stuck_for_the_gateways_answers)
    raw = gateway_config([e.url for e in engines], timeouts={"stream_idle_s": 0.5})
    async with running_gateway(raw) as gw:
        with _silent_client(gw):  # connected, reading nothing: every event fits its socket, only the end waits
            deadline = time.monotonic() + 10
            while (gw.inflight or not any(e.hits for e in engines)) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert gw.inflight == 0
            assert b"maestro_client_stalled_total 1.0" in gw.metrics.render()


async def test_malformed_http_from_an_engine_is_an_upstream_error_not_ours(engines, caplog):
    """A bad header line was a 500 internal_error with a traceback, as if the gateway had failed; a bad chunk
    after the first event made aiohttp stop its read timer, and the client waited for total_s (900 s)."""
    for engine in engines:
        engine.mode = "bad_header"
    raw = gateway_config([e.url for e in engines], timeouts={"stream_idle_s": 0.5, "total_s": 60})
    async with running_gateway(raw) as gw:
        with pytest.raises(openai.InternalServerError) as caught:
            await client_for(gw.base_url).chat.completions.create(
                model="fault-model", messages=[{"role": "user", "content": "hi"}])
        assert caught.value.status_code == 502 and "malformed HTTP" in caught.value.message
        for engine in engines:
            engine.mode = "bad_chunk_after_first"
        started = time.monotonic()
        message = await _stream_error(gw)
        assert time.monotonic() - started < 5
        assert "sent no event for 0.5 s" in message or "dropped the stream" in message
        for engine in engines:
            engine.mode = "bad_chunk_first"  # before the first event: a 504 after stream_idle_s, not total_s
        started = time.monotonic()
        with pytest.raises(openai.APIStatusError) as caught:
            await client_for(gw.base_url).chat.completions.create(
                model="fault-model", stream=True, messages=[{"role": "user", "content": "hi"}])
        assert time.monotonic() - started < 5
        assert caught.value.status_code == 504 and "within 0.5 s" in caught.value.message
    assert not [r for r in caplog.records if "failed inside the gateway" in r.getMessage()]


@pytest.mark.parametrize("mode, says", [
    ("unauthorized", "refused the gateway's credentials (HTTP 401)"),
    ("forbidden", "refused the gateway's credentials (HTTP 403)"),
    ("redirect", "answered a redirect (HTTP 307)"),
    ("gzip", "Content-Encoding 'gzip'"),
])
async def test_an_answer_the_gateway_cannot_relay_is_tried_elsewhere_then_a_502(engines, mode, says, caplog):
    """An engine's 401 (its --api-key, unknown to the gateway) reached the client as if the client's own key were
    wrong; a redirect was followed with the request's body and headers; gzip bytes reached the client as a
    corrupt, unlabelled body. Each is the engine's fault: another engine is tried, and at the end it is a 502."""
    bad, good = engines
    bad.mode = mode
    async with running_gateway(gateway_config([bad.url, good.url])) as gw:
        client = client_for(gw.base_url)
        for _ in range(2):  # round robin: one of the two goes to the bad engine first
            reply = await client.chat.completions.create(model="fault-model",
                                                         messages=[{"role": "user", "content": "hi"}])
            assert reply.choices[0].message.content == "hello world"
        assert bad.hits >= 1 and good.hits == 2
        good.mode = mode
        with pytest.raises(openai.APIStatusError) as caught:
            await client.chat.completions.create(model="fault-model", messages=[{"role": "user", "content": "hi"}])
        assert caught.value.status_code == 502 and says in caught.value.message
        assert caught.value.body["code"] == "upstream_error"
        async with aiohttp.ClientSession() as session:
            async with session.get(gw.base_url + "/metrics") as r:
                text = await r.text()
        reason = {"unauthorized": "auth", "forbidden": "auth", "redirect": "redirect", "gzip": "encoded"}[mode]
        assert f'maestro_upstream_errors_total{{engine="local/p/0",reason="{reason}"}}' in text
        warned = [r.getMessage() for r in caplog.records if "tried elsewhere" in r.getMessage()]
        assert len(warned) == 2 and bad.hits >= 2  # once per engine, not once per request (a wrong key floods)


async def test_an_engines_api_key_goes_with_every_call_to_it(engines, monkeypatch):
    """vLLM's --api-key: the engine's key from the config (as written, or from the environment) is sent on every
    call to that engine, probes included, and never the client's key; it is not shown by /admin/engines."""
    keyed, plain = engines
    monkeypatch.setenv("MAESTRO_TEST_ENGINE_KEY", "engine-secret\n")
    raw = gateway_config([keyed.url, plain.url], server={"api_keys": ["client-key"]})
    raw["clusters"][0]["pools"][0]["engines"][0]["api_key_env"] = "MAESTRO_TEST_ENGINE_KEY"
    async with running_gateway(raw) as gw:
        client = openai.AsyncOpenAI(base_url=gw.base_url + "/v1", api_key="client-key", max_retries=0)
        try:
            for _ in range(2):
                await client.chat.completions.create(model="fault-model", messages=[{"role": "user", "content": "x"}])
        finally:
            await client.close()
        async with aiohttp.ClientSession() as session:
            async with session.get(gw.base_url + "/admin/engines",
                                   headers={"Authorization": "Bearer client-key"}) as r:
                assert r.status == 200 and "engine-secret" not in await r.text()
    assert [h.get("Authorization") for h in keyed.seen_headers] == ["Bearer engine-secret"]
    assert [h.get("Authorization") for h in plain.seen_headers] == [None]
    assert keyed.seen_metrics_headers and all(h.get("Authorization") == "Bearer engine-secret"
                                              for h in keyed.seen_metrics_headers)
    assert all("Authorization" not in h for h in plain.seen_metrics_headers)


async def test_a_client_that_closes_right_after_done_was_served(engines):
    """A client that closes its connection as soon as it reads ``[DONE]`` (loadgen's aiohttp client, many SDKs'
    iterators) has the whole answer. The gateway still waited for the engine's body to end and was cancelled
    there: the request counted as a 499, its tokens were lost, its workflow step was not finished and online
    learning kept no record. It is served: a 200, the usage counted, the step finished."""
    engine = engines[0]
    engine.mode = "linger_after_done"
    engine.delay_s = 1.0
    async with running_gateway(gateway_config([engine.url])) as gw:
        body = {"model": "fault-model", "messages": [{"role": "user", "content": "hi"}], "stream": True}
        events = []
        async with aiohttp.ClientSession() as session:
            async with session.post(gw.base_url + "/v1/chat/completions", json=body,
                                    headers={"X-Workflow-Id": "wf-done", "X-Agent-Role": "coder"}) as response:
                assert response.status == 200
                async for line in response.content:
                    events.append(line.strip())
                    if line.strip() == b"data: [DONE]":
                        break  # and close, before the engine's body (and so the gateway's) has ended
        assert events[-1] == b"data: [DONE]"
        assert not any(b'"usage"' in event for event in events)  # the gateway's own usage request: stripped
        deadline = time.monotonic() + 5
        while gw.inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)  # the workflow step's end is written by a task of its own
        assert (_requests_with_status(gw, 499), _requests_with_status(gw, 200)) == (0, 1)
        rendered = gw.metrics.render().decode()
        assert 'maestro_tokens_total{kind="completion",model="fault-model"} 2.0' in rendered
        assert gw.scheduling.workflows.cache["wf-done"].steps_done == 1


async def test_a_stream_the_engine_ends_with_an_error_event_counts_as_failed(engines):
    """vLLM's API server answers the streams in flight with an error event (code 500) and [DONE] when its
    EngineCore dies: the gateway relayed it, and counted the request a 200 with no upstream error, where the same
    failure of a whole answer counted 502. It counts 502 and http_500 now; an answer the engine aborted (an
    engine put to sleep) stays a 200, relayed as it came."""
    engine = engines[0]
    engine.mode = "error_mid_stream"
    async with running_gateway(gateway_config([engine.url])) as gw:
        client = client_for(gw.base_url)
        stream = await client.chat.completions.create(model="fault-model", messages=[{"role": "user", "content": "hi"}],
                                                      stream=True, extra_headers={"X-Workflow-Id": "wf-err"})
        with pytest.raises(openai.APIError, match="EngineCore encountered an issue"):
            async for _ in stream:
                pass
        deadline = time.monotonic() + 5
        while gw.inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)
        assert (_requests_with_status(gw, 502), _requests_with_status(gw, 200)) == (1, 0)
        rendered = gw.metrics.render().decode()
        assert 'maestro_upstream_errors_total{engine="local/p/0",reason="http_500"} 1.0' in rendered
        assert gw.scheduling.workflows.cache["wf-err"].steps_done == 0
        engine.mode = "abort"
        stream = await client.chat.completions.create(model="fault-model", messages=[{"role": "user", "content": "hi"}],
                                                      stream=True)
        assert [chunk.choices[0].finish_reason async for chunk in stream if chunk.choices][-1] == "abort"
        await asyncio.sleep(0.1)
        assert _requests_with_status(gw, 200) == 1


async def test_requests_waiting_on_an_engine_that_hangs_go_to_another_once_it_is_marked_down(engines):
    """A hung engine (SIGSTOP on a real vLLM): its probes time out and the monitor marks it down in seconds, but a
    non-streamed request sent to it waited the whole timeouts.total_s (15 min by default), and a stream waiting
    for its first event stream_idle_s, while another engine was free. Those that have relayed nothing are tried on
    another engine as soon as it is marked down."""
    hung, healthy = engines
    hung.mode, hung.delay_s = "stall", 30.0
    config = gateway_config([hung.url, healthy.url], monitor={"interval_s": 0.05, "down_after_failures": 2},
                            timeouts={"scrape_s": 0.2})
    async with running_gateway(config) as gw:
        client = client_for(gw.base_url)
        messages = [{"role": "user", "content": "hi"}]

        async def whole() -> str:
            reply = await client.chat.completions.create(model="fault-model", messages=messages)
            return reply.choices[0].message.content

        async def streamed() -> str:
            stream = await client.chat.completions.create(model="fault-model", messages=messages, stream=True)
            return "".join([chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices])

        started = time.monotonic()
        calls = [asyncio.create_task(call()) for call in (whole, whole, streamed, streamed)]
        deadline = time.monotonic() + 5
        while hung.hits < 2 and time.monotonic() < deadline:  # round robin: half of them wait on the hung one
            await asyncio.sleep(0.01)
        assert hung.hits == 2
        hung.metrics_hang = True
        assert await asyncio.wait_for(asyncio.gather(*calls), 10.0) == ["hello world"] * 4
        assert time.monotonic() - started < 5.0  # not the hung engine's 30 s
        state = gw.registry.states["local/p/0"]
        assert not state.up and state.last_error == "GET /metrics failed: TimeoutError: no answer within 0.2 s"
        rendered = gw.metrics.render().decode()
        assert 'maestro_upstream_errors_total{engine="local/p/0",reason="down"} 2.0' in rendered
        assert _requests_with_status(gw, 200) == 4
        for _ in range(100):  # the hung engine's requests were dropped (their connections closed)
            if hung.aborted == 2:
                break
            await asyncio.sleep(0.02)
        assert hung.aborted == 2


_WHOLE = b'{"choices":[{"index":0,"message":{"content":"hi"},"finish_reason":"stop"}],"usage":{"total_tokens":5}}'
_CHAT_BODY = {"model": "fault-model", "messages": [{"role": "user", "content": "hi"}]}


def _requests_counted(gw) -> dict[str, float]:
    """maestro_requests_total's chat samples by status."""
    counted = {}
    for line in gw.metrics.render().decode().splitlines():
        if line.startswith("maestro_requests_total{") and 'route="chat"' in line:
            counted[line.split('status="')[1].split('"')[0]] = float(line.rsplit(" ", 1)[1])
    return counted


@pytest.mark.parametrize("status", [b"042", b"101", b"999"])
async def test_an_engine_status_that_is_no_final_answer_is_a_502(status):
    """An engine's status line outside 200-599 was relayed: "HTTP/1.1 42 " no client can parse, or a bare 101
    without a body, each counted under its code."""
    async def answer(headers, body):
        return [raw_answer(status, b"Content-Type: application/json\r\n", _WHOLE)]

    async with RawEngine(answer) as engine, running_gateway(gateway_config([engine.url])) as gw, \
            aiohttp.ClientSession() as session:
        async with session.post(gw.base_url + "/v1/chat/completions", json=_CHAT_BODY) as r:
            assert r.status == 502 and (await r.json())["error"]["code"] == "upstream_error"
            assert f"HTTP {int(status)}" in (await r.json())["error"]["message"]
        assert _requests_counted(gw) == {"502": 1.0} and gw.inflight == 0


@pytest.mark.parametrize("header", [b"Content-Type: application/json\x7f\r\n",
                                    b"Content-Type: application/json\r\nContent-Disposition: a\x01b\r\n"])
async def test_an_engine_header_with_a_control_character_is_not_copied(header, caplog):
    """aiohttp refuses to write a header value with a control character (header injection): an engine's
    Content-Type or Content-Disposition holding one dropped the client's connection after the answer was counted
    200, with a traceback."""
    import logging

    async def answer(headers, body):
        return [raw_answer(b"200", header, _WHOLE)]

    caplog.set_level(logging.INFO)
    async with RawEngine(answer) as engine, running_gateway(gateway_config([engine.url])) as gw, \
            aiohttp.ClientSession() as session:
        async with session.post(gw.base_url + "/v1/chat/completions", json=_CHAT_BODY) as r:
            assert r.status == 200 and await r.read() == _WHOLE
            assert r.headers["Content-Type"] == "application/json" and "Content-Disposition" not in r.headers
    assert not [record for record in caplog.records if record.exc_info]


@contextlib.asynccontextmanager
async def _gateway_over(answer, **timeouts):
    """A gateway (with these ``timeouts``) over one raw engine that gives ``answer``, and a client session."""
    raw = gateway_config([], timeouts=timeouts)
    async with RawEngine(answer) as engine:
        raw["clusters"][0]["pools"][0]["engines"] = [{"url": engine.url}]
        async with running_gateway(raw) as gw, aiohttp.ClientSession() as session:
            yield gw, session


@pytest.mark.parametrize("stream", [False, True])
async def test_a_whole_answer_whose_body_stops_coming_is_cut_after_stream_idle_s(stream):
    """aiohttp stops its read timer on a body it cannot parse (a chunk size that is no number), even once the
    engine has closed: a whole answer's request (or a stream's answered with an error status) waited out
    total_s, 15 minutes by default, holding its engine and its KV reservation."""
    async def answer(headers, body):
        return [b"HTTP/1.1 %s X\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                % (b"400" if stream else b"200") + b'5\r\n{"cho\r\n', 0.1, b"zz\r\nnot a chunk\r\n", 0.1]

    async with _gateway_over(answer, total_s=30, stream_idle_s=0.5) as (gw, session):
        started = time.monotonic()
        async with session.post(gw.base_url + "/v1/chat/completions", json={**_CHAT_BODY, "stream": stream}) as r:
            assert r.status == 504 and (await r.json())["error"]["code"] == "upstream_timeout"
        assert time.monotonic() - started < 5
        assert gw.inflight == 0 and all(v == 0 for v in gw.registry.inflight.values())


_SSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n"
_CHUNK = b'data: {"choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":null}]}'
_ENGINE_DIED = b'{"error": {"message": "EngineCore encountered an issue.", "type": "InternalServerError", "code": 500}}'


async def _stream_through(events: list, engines: int = 1, **overrides) -> tuple[int, bytes, dict, list[RawEngine]]:
    """One streamed chat through a gateway over ``engines`` raw engines that each answer ``events`` (bytes, or
    pauses) after a 200 event-stream head: (status, body, requests counted by status, the engines)."""
    async def answer(headers, body):
        return [_SSE_HEAD, *events]

    async with contextlib.AsyncExitStack() as stack:
        raws = [await stack.enter_async_context(RawEngine(answer)) for _ in range(engines)]
        gw = await stack.enter_async_context(running_gateway(gateway_config([e.url for e in raws], **overrides)))
        session = await stack.enter_async_context(aiohttp.ClientSession())
        async with session.post(gw.base_url + "/v1/chat/completions", json={**_CHAT_BODY, "stream": True}) as r:
            status, body = r.status, await r.read()
        await asyncio.sleep(0.05)
        assert gw.inflight == 0
        return status, body, _requests_counted(gw), raws


@pytest.mark.parametrize("framing", ["crlf", "cr", "event-field"])
async def test_an_engines_error_event_is_read_in_any_framing_sse_allows(framing):
    """A mid-stream error event (vLLM's EngineCore dying) counted as a failure only with LF framing and the event
    starting with its data line: with CRLF, or an ``event: error`` line first, the request was counted 200."""
    events = [_CHUNK + b"\n\n", b"data: " + _ENGINE_DIED + b"\n\ndata: [DONE]\n\n"]
    if framing == "event-field":
        events[1] = b"event: error\n" + events[1]
    elif framing == "crlf":
        events = [e.replace(b"\n", b"\r\n") for e in events]
    else:
        events = [e.replace(b"\n", b"\r") for e in events]
    status, body, counted, _ = await _stream_through(events)
    assert status == 200 and b"EngineCore" in body and counted == {"502": 1.0}


async def test_a_mid_stream_error_event_counts_as_its_own_4xx_and_the_first_failure_stands():
    """vLLM reports a request it refuses late (a ValueError in its stream generator) as an error event with code
    400 on the 200 stream: the request counts as that 400, the client's fault, not as an engine failure (502).
    A second error event after it (the engine then dying) does not re-count it."""
    late = b'data: {"error": {"message": "bad", "type": "BadRequestError", "code": 400}}\n\n'
    status, body, counted, _ = await _stream_through([_CHUNK + b"\n\n", late + b"data: [DONE]\n\n"])
    assert status == 200 and b"BadRequestError" in body and counted == {"400": 1.0}
    died = b"data: " + _ENGINE_DIED + b"\n\ndata: [DONE]\n\n"
    status, body, counted, _ = await _stream_through([_CHUNK + b"\n\n", late, 0.05, died])
    assert status == 200 and b"EngineCore" in body and counted == {"400": 1.0}


async def test_a_first_error_event_after_an_event_line_is_tried_elsewhere():
    """vLLM's back-pressure refusal as the first event (503 in the event) is retried on another engine; with an
    ``event:`` line before its data it was relayed to the client as a 200 stream."""
    busy = b'event: error\ndata: {"error": {"message": "busy", "type": "ServiceUnavailable", "code": 503}}\n\n'
    status, body, counted, engines = await _stream_through([busy], engines=2)
    assert sum(e.posts for e in engines) == 2 and status == 503 and counted == {"503": 1.0}


@pytest.mark.parametrize("done", [b"data: [DONE]\n\n", b"data:[DONE]\n\n", b"data:[DONE]"])
async def test_a_stream_ends_with_done_however_sse_writes_it(done):
    """SSE takes the space after ``data:`` as optional: a stream ending ``data:[DONE]`` was taken as cut before
    its end, an error event and a second [DONE] appended, and counted 502."""
    status, body, counted, _ = await _stream_through([_CHUNK + b"\n\n", done])
    assert status == 200 and counted == {"200": 1.0}
    assert b"upstream_stream_error" not in body and body.count(b"[DONE]") == 1


async def test_an_event_past_the_bound_cuts_the_stream(monkeypatch):
    """An event was held whole however large until its end came: 300 MB without a blank line grew the gateway
    by 600 MB. Past MAX_SSE_EVENT_BYTES the stream is cut (502), and a first event that large is an engine's
    failure (tried elsewhere)."""
    monkeypatch.setattr("gateway.sse.MAX_SSE_EVENT_BYTES", 64 * 1024)
    runaway = b"data: " + b"x" * 200_000
    status, body, counted, _ = await _stream_through([_CHUNK + b"\n\n", runaway, 0.2, b"\n\ndata: [DONE]\n\n"])
    assert status == 200 and b"larger than" in body and counted == {"502": 1.0}
    assert len(body) < 64 * 1024
    status, body, counted, engines = await _stream_through([runaway], engines=2)
    assert status == 502 and sum(e.posts for e in engines) == 2 and b"passed" in body


@pytest.mark.parametrize("one_read", [False, True])
async def test_what_an_engine_writes_after_its_done_is_not_relayed(one_read, monkeypatch):
    """Events after [DONE] were relayed, and the stream then counted 502 for an answer the client had whole; in
    the same read as [DONE] too, and an event after it past the bound cut the finished stream."""
    monkeypatch.setattr("gateway.sse.MAX_SSE_EVENT_BYTES", 64 * 1024)
    after = [_CHUNK + b"\n\n", b"data: {\"half" + b"x" * 100_000]
    done = b"data: [DONE]\n\n"
    events = [_CHUNK + b"\n\n" + done + b"".join(after)] if one_read else [_CHUNK + b"\n\n", done, 0.05, *after]
    status, body, counted, _ = await _stream_through(events)
    assert status == 200 and counted == {"200": 1.0}
    assert body.endswith(b"data: [DONE]\n\n") and body.count(b"[DONE]") == 1 and body.count(b'"hi"') == 1


async def test_a_busy_refusal_after_a_comment_in_the_same_read_is_still_the_first_event():
    """A comment (": ping") before the refusal made it part of a 200 stream, not tried on another engine. (A
    comment in a read of its own starts the stream, as before: an engine that pings while it queues a request
    keeps its client's stream alive.)"""
    busy = b'data: {"error": {"message": "busy", "type": "ServiceUnavailable", "code": 503}}\n\n'
    status, body, counted, engines = await _stream_through([b": ping\n\n" + busy], engines=2)
    assert sum(e.posts for e in engines) == 2 and status == 503 and counted == {"503": 1.0}


async def test_the_usage_event_is_read_after_an_event_line():
    """The usage event was read only where its data line came first: with an ``event:`` line before it, its
    tokens were not counted and the chunk a client had not asked for was not taken out."""
    usage = b'event: usage\ndata: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}'
    status, body, counted, _ = await _stream_through([_CHUNK + b"\n\n", usage + b"\n\n", b"data: [DONE]\n\n"])
    assert status == 200 and b'"usage"' not in body and counted == {"200": 1.0}


async def test_a_busy_answer_whose_body_stops_coming_is_not_waited_for():
    """A busy engine's 503 body was read without a bound: one that stopped coming held the request until
    total_s before the next engine was tried."""
    async def answer(headers, body):
        return [b"HTTP/1.1 503 X\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{", 3.0]

    raw = gateway_config([], timeouts={"total_s": 30, "stream_idle_s": 0.3})
    async with RawEngine(answer) as engine:
        raw["clusters"][0]["pools"][0]["engines"] = [{"url": engine.url}]
        async with running_gateway(raw) as gw, aiohttp.ClientSession() as session:
            started = time.monotonic()
            async with session.post(gw.base_url + "/v1/chat/completions", json=_CHAT_BODY) as r:
                assert r.status == 503 and (await r.json())["error"]["code"] == "engines_busy"
            assert time.monotonic() - started < 2.5


def _trickle(piece: bytes, every_s: float, for_s: float) -> list:
    """An engine's bytes a piece at a time, ``every_s`` apart, for ``for_s`` seconds."""
    return [part for _ in range(int(for_s / every_s)) for part in (piece, every_s)]


async def test_a_stream_whose_headers_trickle_is_a_504_after_stream_idle_s():
    """aiohttp's read timer restarts at every byte: an engine writing its headers a byte every 0.1 s held a
    stream's client for total_s (15 minutes by default). The headers and the first event now come within
    stream_idle_s of the send, on the gateway's own clock."""
    async def answer(headers, body):
        return [b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nX-Slow: ", *_trickle(b"a", 0.1, 20.0)]

    async with _gateway_over(answer, total_s=20, stream_idle_s=0.5) as (gw, session):
        started = time.monotonic()
        async with session.post(gw.base_url + "/v1/chat/completions", json={**_CHAT_BODY, "stream": True}) as r:
            error = (await r.json())["error"]
        assert r.status == 504 and error["code"] == "upstream_timeout" and "within 0.5 s" in error["message"]
        assert time.monotonic() - started < 5
        assert gw.inflight == 0 and all(v == 0 for v in gw.registry.inflight.values())


async def test_a_stream_whose_bytes_complete_no_event_is_cut_after_stream_idle_s():
    """After the first event, an engine sending a byte every 0.1 s that never ends an event relays nothing: it
    kept the stream alive until total_s. Only an event relayed is progress now."""
    status, body, counted, _ = await _stream_through([_CHUNK + b"\n\n", *_trickle(b"x", 0.1, 20.0)],
                                                     timeouts={"total_s": 20, "stream_idle_s": 0.5})
    text = body.decode()
    assert status == 200 and text.startswith(_CHUNK.decode()) and text.rstrip().endswith("data: [DONE]")
    assert "sent no event for 0.5 s" in text and counted == {"504": 1.0}, (text, counted)


async def test_a_total_timeout_is_named_as_one_while_bytes_keep_coming():
    """A whole answer trickled until total_s: its 504 names total_s, counted as a timeout, never as the idle
    limit it did not meet (uvloop's timers fire up to a millisecond early, and the test of the clock against the
    total's deadline after the fact named some total timeouts idle ones)."""
    async def answer(headers, body):
        return [b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n",
                *_trickle(b" ", 0.05, 10.0)]

    async with _gateway_over(answer, total_s=1.0, stream_idle_s=0.5) as (gw, session):
        for _ in range(6):
            async with session.post(gw.base_url + "/v1/chat/completions", json=_CHAT_BODY) as r:
                error = (await r.json())["error"]
            assert r.status == 504 and "timeouts.total_s" in error["message"], error
        metrics = gw.metrics.render().decode()
        assert 'reason="stream_idle"' not in metrics and 'reason="timeout"} 6.0' in metrics, metrics
    # the deadline names the limit it armed, whatever the clock reads when it fires
    from gateway.proxy import _Deadline

    deadline = _Deadline(0.5, 1.0)
    assert deadline.idle and deadline.at == pytest.approx(deadline.total_at - 0.5)
    assert deadline.arm(deadline.total_at - 0.2, 0.5) == deadline.total_at and not deadline.idle
    assert deadline.arm(deadline.total_at - 0.6, 0.5) == pytest.approx(deadline.total_at - 0.1) and deadline.idle


async def test_an_engine_sleep_cut_by_the_stop_is_answered_503():
    """An admin sleep waits on its engine (up to timeouts.admin_s); the gateway's stop cut it without a word (the
    caller saw the connection drop). It is waited for during the grace, then answered 503 like a request."""
    engine = FaultEngine(sleep_routes=True, sleep_delay_s=30.0)
    await engine.start()
    try:
        config = gateway_config([engine.url], server={"shutdown_grace_s": 0.3})
        async with running_gateway(config) as gw, aiohttp.ClientSession() as session:
            [engine_id] = list(gw.registry.clients)
            call = asyncio.create_task(session.post(gw.base_url + f"/admin/engines/{engine_id}/sleep"))
            while not engine.paused:
                await asyncio.sleep(0.01)
            started = time.monotonic()
            stopping = asyncio.create_task(gw.stop())
            await asyncio.sleep(0.1)
            # a new one during the grace is refused, as a new request is (a sleep would end those being drained)
            async with session.post(gw.base_url + f"/admin/engines/{engine_id}/wake_up") as late:
                assert late.status == 503 and (await late.json())["error"]["code"] == "gateway_shutting_down"
            await stopping
            answer = await call
            assert answer.status == 503 and (await answer.json())["error"]["code"] == "gateway_shutting_down"
            assert 0.3 <= time.monotonic() - started < 4.0
    finally:
        await engine.stop()
