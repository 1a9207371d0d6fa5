"""The official openai SDK (sync, async, streaming) through the gateway to simulated vLLM engines."""

from __future__ import annotations

import asyncio
import threading

import aiohttp
import openai
import pytest

from tests.conftest import running_gateway

MODEL = "sim-model"


def sim_config(count: int = 2, **sim) -> dict:
    return {
        "models": [{"name": MODEL, "max_model_len": 4096}],
        "clusters": [{"name": "local", "pools": [{"name": "sim", "kind": "vllm", "models": [MODEL],
                                                   "simulated": {"count": count, "time_scale": 50.0, **sim}}]}],
        "monitor": {"interval_s": 0.05},
    }


@pytest.fixture
async def gw():
    async with running_gateway(sim_config()) as gateway:
        yield gateway


async def test_async_sdk_chat_completions_and_models(gw):
    async with openai.AsyncOpenAI(base_url=gw.base_url + "/v1", api_key="x", max_retries=0) as client:
        models = await client.models.list()
        assert [m.id for m in models.data] == [MODEL]
        reply = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "plan the work"}], max_tokens=12,
            extra_body={"ignore_eos": True})
        assert reply.choices[0].finish_reason == "length"
        assert reply.usage.completion_tokens == 12
        assert len(reply.choices[0].message.content.split()) == 12
        completion = await client.completions.create(model=MODEL, prompt="once upon a time", max_tokens=5,
                                                     extra_body={"ignore_eos": True})
        assert completion.usage.completion_tokens == 5


async def test_the_sdk_retrieves_a_served_model_and_gets_404_for_another(gw):
    """``client.models.retrieve`` calls ``GET /v1/models/{model}``, which was an unknown route (404 for every model);
    a name with slashes (``meta-llama/...``) is one model id, not a path."""
    async with openai.AsyncOpenAI(base_url=gw.base_url + "/v1", api_key="x", max_retries=0) as client:
        model = await client.models.retrieve(MODEL)
        assert (model.id, model.object, model.owned_by) == (MODEL, "model", "maestro")
        # vLLM's card field for the context, which clients written for vLLM read: the config's figure
        assert model.model_extra["max_model_len"] == gw.config.model(MODEL).max_model_len
        listed = {card.id: card for card in (await client.models.list()).data}
        assert listed[MODEL].model_extra["max_model_len"] == model.model_extra["max_model_len"]
        with pytest.raises(openai.NotFoundError) as raised:
            await client.models.retrieve("meta-llama/not-served")
        assert raised.value.code == "model_not_found" and "meta-llama/not-served" in raised.value.message


async def test_async_sdk_streaming_with_and_without_usage(gw):
    async with openai.AsyncOpenAI(base_url=gw.base_url + "/v1", api_key="x", max_retries=0) as client:
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=8, stream=True,
            extra_body={"ignore_eos": True})
        chunks = [c async for c in stream]
        assert all(c.choices for c in chunks)
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        assert len(text.split()) == 8
        assert chunks[-1].choices[0].finish_reason == "length"

        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=8, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        chunks = [c async for c in stream]
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8


async def test_streams_carry_the_usage_the_engine_would_have_sent_the_client(gw):
    """The gateway asks the engine for usage on every stream; that must not change what the client receives:
    usage only for ``include_usage: true`` (OpenAI's rule and vLLM 0.32's), vLLM's ``continuous_usage_stats``
    only with it (without, no usage at all: not usage on every chunk and no usage chunk)."""
    async def chunks(**stream_options) -> list:
        async with openai.AsyncOpenAI(base_url=gw.base_url + "/v1", api_key="x", max_retries=0) as client:
            stream = await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4, stream=True,
                stream_options=stream_options or None, extra_body={"ignore_eos": True})
            return [c async for c in stream]

    got = await chunks(include_usage=True)
    assert all(c.usage is None for c in got[:-1]) and got[-1].usage.completion_tokens == 4
    # on the usage chunk alone, as vLLM writes it for include_usage (each engine has its own: vllm-<version>-<hash>)
    assert got[-1].system_fingerprint.startswith("vllm-") and all(c.system_fingerprint is None for c in got[:-1])
    for options in ({}, {"include_usage": False}, {"include_usage": False, "continuous_usage_stats": True},
                    {"continuous_usage_stats": True}):
        got = await chunks(**options)
        assert got and all(c.usage is None and c.choices for c in got), options
        # the usage chunk the gateway asked for is gone, and its fingerprint is on the answer's last chunk, as
        # vLLM puts it for a client that did not ask for usage
        assert got[-1].choices[0].finish_reason and got[-1].system_fingerprint.startswith("vllm-"), options
        assert all(c.system_fingerprint is None for c in got[:-1]), options
    got = await chunks(include_usage=True, continuous_usage_stats=True)
    assert all(c.usage is not None for c in got)
    assert got[-1].choices == [] and got[-1].usage.completion_tokens == 4


async def test_several_answers_through_the_gateway(gw):
    """``n`` = 2 end to end on the simulated engines, as on a real vLLM: both answers and their summed usage reach
    the client, whole and streamed (with and without the usage the gateway always asks the engine for), and a
    client that leaves a stream of two answers frees both engine requests."""
    messages = [{"role": "user", "content": "two drafts, please"}]
    async with openai.AsyncOpenAI(base_url=gw.base_url + "/v1", api_key="x", max_retries=0) as client:
        reply = await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, n=2,
                                                     extra_body={"ignore_eos": True})
        assert [c.index for c in reply.choices] == [0, 1] and reply.usage.completion_tokens == 10
        for options in (None, {"include_usage": True}, {"include_usage": True, "continuous_usage_stats": True}):
            stream = await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, n=2,
                                                          stream=True, stream_options=options,
                                                          extra_body={"ignore_eos": True})
            chunks = [c async for c in stream]
            texts = {0: "", 1: ""}
            for chunk in chunks:
                for choice in chunk.choices:
                    texts[choice.index] += choice.delta.content or ""
            assert [len(text.split()) for text in texts.values()] == [4, 4], options
            if options is None:
                assert all(c.usage is None for c in chunks)
                # both answers end in the engine's last step: each last chunk gets the fingerprint
                assert sorted(c.choices[0].index for c in chunks if c.system_fingerprint) == [0, 1]
            else:
                assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8, options
        stream = await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3000, n=2,
                                                      stream=True, extra_body={"ignore_eos": True})
        async for _ in stream:
            break
        await stream.close()
    engines = [handle.engine for handle in gw._sim_handles]
    for _ in range(100):
        if gw.inflight == 0 and not any(e.num_running or e.num_waiting for e in engines):
            break
        await asyncio.sleep(0.01)
    assert gw.inflight == 0 and not any(e.num_running or e.num_waiting for e in engines)
    assert all(e.kv_usage() == 0.0 for e in engines)


def test_sync_sdk_in_a_thread():
    """The sync client needs its own thread here because the gateway runs on this test's event loop."""

    async def main():
        async with running_gateway(sim_config(count=1)) as gateway:
            result: dict = {}

            def call():
                with openai.OpenAI(base_url=gateway.base_url + "/v1", api_key="x", max_retries=0) as client:
                    reply = client.chat.completions.create(model=MODEL, max_tokens=4,
                                                           messages=[{"role": "user", "content": "hi"}],
                                                           extra_body={"ignore_eos": True})
                    result["tokens"] = reply.usage.completion_tokens
                    stream = client.chat.completions.create(model=MODEL, max_tokens=3, stream=True,
                                                            messages=[{"role": "user", "content": "hi"}],
                                                            extra_body={"ignore_eos": True})
                    result["chunks"] = sum(1 for c in stream if c.choices and c.choices[0].delta.content)

            thread = threading.Thread(target=call)
            thread.start()
            while thread.is_alive():
                await asyncio.sleep(0.01)
            return result

    assert asyncio.run(main()) == {"tokens": 4, "chunks": 3}


async def test_disconnect_mid_stream_aborts_engine_request():
    async with running_gateway(sim_config(count=1, time_scale=1.0)) as gw:
        engine = gw._sim_handles[0].engine
        async with openai.AsyncOpenAI(base_url=gw.base_url + "/v1", api_key="x", max_retries=0) as client:
            stream = await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "write a novel"}], max_tokens=3000,
                stream=True, extra_body={"ignore_eos": True})
            received = 0
            async for chunk in stream:
                received += 1
                if received == 5:
                    break
            assert engine.num_running == 1
            await stream.close()
        for _ in range(100):  # the issue asks for "within a second"
            if engine.num_running == 0:
                break
            await asyncio.sleep(0.01)
        assert engine.num_running == 0
        assert gw.inflight == 0
        # the abandoned request is counted (499, nginx's code for a client that closed the connection)
        assert b'maestro_requests_total{model="sim-model",route="chat",status="499"} 1.0' in gw.metrics.render()


async def test_engine_metrics_flow_into_admin_view(gw):
    async with openai.AsyncOpenAI(base_url=gw.base_url + "/v1", api_key="x", max_retries=0) as client:
        await asyncio.gather(*(client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4) for _ in range(6)))
    await asyncio.sleep(0.15)  # a few probe periods
    async with aiohttp.ClientSession() as session:
        async with session.get(gw.base_url + "/admin/engines") as r:
            engines = (await r.json())["data"]
        async with session.get(gw.base_url + "/metrics") as r:
            metrics = await r.text()
    assert len(engines) == 2 and all(e["up"] for e in engines)
    assert sum(e["metrics"]["generation_tokens_total"] for e in engines) > 0
    assert "maestro_engines_up 2.0" in metrics
    assert 'maestro_requests_total{model="sim-model",route="chat",status="200"} 6.0' in metrics


async def test_sleeping_engine_is_avoided_and_woken(gw):
    async with aiohttp.ClientSession() as session:
        async with session.post(gw.base_url + "/admin/engines/local/sim/0/sleep?level=1") as r:
            assert r.status == 200, await r.text()
        assert gw.registry.states["local/sim/0"].sleeping
        async with session.get(gw.base_url + "/health") as r:  # up, but taking no request: said apart
            assert (await r.json())["engines_sleeping"] == 1
        assert b"maestro_engines_sleeping 1.0" in gw.metrics.render()
        async with openai.AsyncOpenAI(base_url=gw.base_url + "/v1", api_key="x", max_retries=0) as client:
            for _ in range(4):
                await client.chat.completions.create(model=MODEL, max_tokens=2,
                                                     messages=[{"role": "user", "content": "hi"}])
        assert gw._sim_handles[0].engine.is_sleeping
        async with session.post(gw.base_url + "/admin/engines/local/sim/0/wake_up") as r:
            assert r.status == 200
        assert not gw.registry.states["local/sim/0"].sleeping
        assert b"maestro_engines_sleeping 0.0" in gw.metrics.render()
        async with session.post(gw.base_url + "/admin/engines/nope/sleep") as r:
            assert r.status == 404
        async with session.post(gw.base_url + "/admin/engines/local/sim/0/sleep?mode=later") as r:
            assert r.status == 400 and (await r.json())["error"]["param"] == "mode"
        async with session.post(gw.base_url + "/admin/engines/local/sim/0/sleep?level=2&mode=wait") as r:
            assert r.status == 200  # vLLM's mode=wait: in-flight requests finish first
        assert gw._sim_handles[0].engine.is_sleeping


async def _image_error(gw, body: dict) -> str:
    async with aiohttp.ClientSession() as session:
        async with session.post(gw.base_url + "/v1/images/generations", json=body) as response:
            assert response.status == 400
            return (await response.json())["error"]["message"]


async def test_images_through_gateway_to_simulated_dit():
    raw = sim_config(count=1)
    raw["models"].append({"name": "sim-dit"})
    raw["clusters"][0]["pools"].append({"name": "dit", "kind": "vllm-omni", "models": ["sim-dit"],
                                         "simulated": {"count": 1, "time_scale": 1000.0}})
    async with running_gateway(raw) as gw:
        async with openai.AsyncOpenAI(base_url=gw.base_url + "/v1", api_key="x", max_retries=0) as client:
            image = await client.images.generate(model="sim-dit", prompt="a lighthouse", size="256x256",
                                                 response_format="b64_json")
            import base64

            png = base64.b64decode(image.data[0].b64_json)
            assert png[:8] == b"\x89PNG\r\n\x1a\n"
            # None is sent as null, which OpenAI reads as the default; the DiT engine's request model does not
            image = await client.images.generate(model="sim-dit", prompt="a lighthouse", size="256x256", n=None,
                                                 response_format=None)
            assert len(image.data) == 1
            # "auto" (the SDK's and gpt-image's default) is the engine's default size; vLLM-Omni parses WxH only
            image = await client.images.generate(model="sim-dit", prompt="a lighthouse", size="auto")
            assert len(image.data) == 1 and image.size == "1024x1024"
            with pytest.raises(openai.NotFoundError) as caught:
                await client.images.generate(model=MODEL, prompt="text models do not draw")
            assert "/v1/chat/completions" in caught.value.body["message"]  # where that model is served
            with pytest.raises(openai.NotFoundError) as caught:
                await client.chat.completions.create(model="sim-dit", messages=[{"role": "user", "content": "x"}])
            assert caught.value.body["code"] == "model_not_found"
            assert "/v1/images/generations" in caught.value.body["message"]
            with pytest.raises(openai.BadRequestError):
                await client.images.generate(model="sim-dit", prompt="")
            for size in ("¹x64", "٢٥٦x٢٥٦", "256x", "32x32"):  # str.isdigit's superscripts and other scripts' digits
                with pytest.raises(openai.BadRequestError) as caught:
                    await client.images.generate(model="sim-dit", prompt="x", size=size)  # type: ignore[arg-type]
                assert caught.value.body["param"] == "size"
            # the gateway's own clear 400s, not an empty stream or the engine's validation dump
            for extra, param in (({"stream": True}, "stream"), ({"response_format": "url"}, "response_format"),
                                 ({"extra_body": {"num_inference_steps": 300}}, "num_inference_steps"),
                                 ({"model": ""}, "model")):
                with pytest.raises(openai.BadRequestError) as caught:
                    await client.images.generate(**{"model": "sim-dit", "prompt": "x", **extra})
                assert caught.value.body["param"] == param and caught.value.body["type"] == "invalid_request_error"
            assert "must be a non-empty string" in (await _image_error(gw, {"prompt": "x", "model": 123}))
            assert sorted(m.id for m in (await client.models.list()).data) == ["sim-dit", MODEL]
        async with aiohttp.ClientSession() as session:  # vLLM-Omni's "file": the zip relayed as an attachment
            async with session.post(gw.base_url + "/v1/images/generations", json={
                    "model": "sim-dit", "prompt": "x", "size": "64x64", "n": 2, "response_format": "file"}) as r:
                assert r.status == 200 and r.content_type == "application/zip"
                assert r.headers["Content-Disposition"].startswith('attachment; filename="images_')
                assert (await r.read())[:2] == b"PK"


async def test_a_backlog_of_images_leaves_chat_its_room():
    """Images hold at most ``server.max_inflight_images`` places: 16 images waiting at one DiT engine had
    filled a gateway of 16 places and every chat request got 429."""
    raw = sim_config(count=1)
    raw["server"] = {"max_inflight": 4, "max_inflight_images": 2}
    raw["models"].append({"name": "sim-dit"})
    raw["clusters"][0]["pools"].append({"name": "dit", "kind": "vllm-omni", "models": ["sim-dit"],
                                         "simulated": {"count": 1, "time_scale": 1.0}})  # seconds per image
    async with running_gateway(raw) as gw, \
            openai.AsyncOpenAI(base_url=gw.base_url + "/v1", api_key="x", max_retries=0) as client:
        images = [asyncio.create_task(client.images.generate(model="sim-dit", prompt="x", size="1024x1024"))
                  for _ in range(2)]
        while gw.images_inflight < 2:
            await asyncio.sleep(0.01)
        with pytest.raises(openai.RateLimitError) as caught:
            await client.images.generate(model="sim-dit", prompt="a third", size="64x64")
        assert caught.value.code == "queue_full" and "image requests" in caught.value.message
        replies = await asyncio.gather(*(client.chat.completions.create(
            model=MODEL, max_tokens=4, messages=[{"role": "user", "content": "room for me?"}]) for _ in range(2)))
        assert all(reply.choices[0].message.content for reply in replies)
        assert gw.images_inflight == 2  # the chats were answered while both images still held their places
        for task in images:
            task.cancel()
        await asyncio.gather(*images, return_exceptions=True)
        while gw.images_inflight:
            await asyncio.sleep(0.01)
        image = await client.images.generate(model="sim-dit", prompt="after", size="64x64")  # places given back
        assert len(image.data) == 1


async def test_an_ipv6_listen_address_gives_a_base_url_the_sdk_can_use():
    """``--host ::1`` printed ``http://::1:PORT``, which the SDK refuses (``Invalid port``)."""
    import socket

    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("this machine has no IPv6 loopback")
    from gateway.app import Gateway
    from gateway.config import parse_config

    gw = Gateway(parse_config(sim_config(count=1)))
    await gw.start("::1", 0)
    try:
        assert gw.base_url.startswith("http://[::1]:")
        async with openai.AsyncOpenAI(base_url=gw.base_url + "/v1", api_key="x", max_retries=0) as client:
            assert [m.id for m in (await client.models.list()).data] == [MODEL]
    finally:
        await gw.stop()
