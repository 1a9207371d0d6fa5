"""A fault-injecting upstream for the gateway's failure-mode tests.

It answers like vLLM (same JSON and SSE shapes) but can be told to refuse with 503, drop the connection
before or after the first byte, or stall — failures the simulated engines do not produce on demand.
It is a test tool, not a stand-in for an engine: behaviour under normal operation is tested against the
simulated engines and a real vLLM.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from dataclasses import dataclass, field

import orjson
from aiohttp import web
from multidict import CIMultiDict

from backends.lax import lax_bool

VLLM_BUSY = {"error": {"message": "The engine is currently busy and cannot accept new requests. Please try again "
                                  "later or on a different instance.", "type": "Service Unavailable",
                       "param": None, "code": 503}}


@dataclass
class FaultEngine:
    model: str = "fault-model"
    mode: str = "ok"  # ok | busy | drop_before | drop_after_first | reset_after_first | drop_mid_body | stall
    #                   | error_500 | slow | firehose | error_event_400 | error_event_500 | no_done
    #                   | bad_chunk_after_first | bad_header | bad_chunk_first | cut_mid_event
    #                   | unauthorized | redirect | gzip | linger_after_done | error_mid_stream | cut_after_finish
    #                   | reset_after_finish
    delay_s: float = 0.0
    hits: int = 0
    seen_bodies: list = field(default_factory=list)
    seen_raw: list = field(default_factory=list)  # the bytes as they came (orjson reads a long integer as a float)
    seen_headers: list = field(default_factory=list)
    aborted: int = 0
    runner: web.AppRunner | None = None
    url: str = ""
    kv_blocks: int = 0  # > 0: export vllm:cache_config_info with this many blocks of block_size tokens
    block_size: int = 16
    sleep_routes: bool = False  # serve POST /sleep and /wake_up (vLLM with VLLM_SERVER_DEV_MODE=1)
    sleep_delay_s: float = 0.0  # how long POST /sleep takes to answer (a mode=wait drain)
    is_sleeping_route: bool = False  # also GET /is_sleeping: true from a sleep call's start to a wake-up (vLLM)
    paused: bool = False
    wake_delay_s: float = 0.0  # ...and POST /wake_up
    served_models: list[str] | None = None  # the names GET /v1/models lists (None: the one model)
    metrics_hang: bool = False  # GET /metrics never answers
    max_model_len: int | None = None  # the context its model cards say (vLLM's max_model_len; None: no field)
    usage: dict = field(default_factory=lambda: {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5})

    async def models(self, request: web.Request) -> web.Response:
        names = self.served_models if self.served_models is not None else [self.model]
        extra = {"max_model_len": self.max_model_len} if self.max_model_len is not None else {}
        return web.json_response({"object": "list", "data": [{"id": name, "object": "model", "owned_by": "vllm",
                                                              **extra} for name in names]})

    async def start(self, port: int = 0) -> str:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.chat)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.models)
        if self.sleep_routes:
            app.router.add_post("/sleep", self.sleep)  # vLLM answers both with an empty 200
            app.router.add_post("/wake_up", self.wake_up)
            if self.is_sleeping_route:
                app.router.add_get("/is_sleeping", self.is_sleeping)
        self.runner = web.AppRunner(app, handler_cancellation=True)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", port, reuse_address=True)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
        return self.url

    async def stop(self) -> None:
        if self.runner:
            await self.runner.cleanup()
            self.runner = None

    async def health(self, request: web.Request) -> web.Response:
        return web.Response()

    async def sleep(self, request: web.Request) -> web.Response:
        self.paused = True
        await asyncio.sleep(self.sleep_delay_s)
        return web.Response()

    async def wake_up(self, request: web.Request) -> web.Response:
        await asyncio.sleep(self.wake_delay_s)
        self.paused = False
        return web.Response()

    async def is_sleeping(self, request: web.Request) -> web.Response:
        if self.mode == "error_500":
            return web.Response(status=500)
        return web.json_response({"is_sleeping": self.paused})

    seen_metrics_headers: list = field(default_factory=list)

    async def metrics(self, request: web.Request) -> web.Response:
        self.seen_metrics_headers.append(CIMultiDict(request.headers))
        if self.metrics_hang:  # a hung engine (SIGSTOP, a stuck GPU): its probes time out
            await asyncio.Event().wait()
        text = (f'vllm:num_requests_running{{engine="0",model_name="{self.model}"}} 0.0\n'
                f'vllm:num_requests_waiting{{engine="0",model_name="{self.model}"}} 0.0\n'
                f'vllm:kv_cache_usage_perc{{engine="0",model_name="{self.model}"}} 0.0\n')
        if self.kv_blocks:
            text += (f'vllm:cache_config_info{{block_size="{self.block_size}",engine="0",'
                     f'num_gpu_blocks="{self.kv_blocks}"}} 1.0\n')
        return web.Response(text=text, content_type="text/plain")

    def _completion(self) -> dict:
        return {"id": "chatcmpl-fault", "object": "chat.completion", "created": int(time.time()),
                "model": self.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello world"},
                             "logprobs": None, "finish_reason": "stop"}],
                "usage": self.usage}

    async def chat(self, request: web.Request) -> web.StreamResponse:
        self.hits += 1
        raw = await request.read()
        self.seen_raw.append(raw)
        body = orjson.loads(raw)
        self.seen_bodies.append(body)
        self.seen_headers.append(CIMultiDict(request.headers))
        mode = request.headers.get("X-Fault-Mode", self.mode)  # one request can fail differently
        return await self._answer(request, body, mode)

    async def _bad_chunk_then_silence(self, request: web.Request) -> None:
        """A chunk size that is no hex number (no valid HTTP), then nothing until the gateway gives up."""
        await asyncio.sleep(0.05)
        request.transport.write(b"zz\r\nnot a chunk\r\n")  # type: ignore[union-attr]
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            self.aborted += 1
            raise

    async def _answer(self, request: web.Request, body: dict, mode: str) -> web.StreamResponse:
        if mode == "busy":
            return web.Response(status=503, body=orjson.dumps(VLLM_BUSY), content_type="application/json")
        if mode == "unauthorized":  # vLLM's --api-key answer to a request without its key
            return web.Response(status=401, body=orjson.dumps({"error": "Unauthorized"}),
                                content_type="application/json")
        if mode == "forbidden":  # a proxy in front of the engine that refuses the gateway's credentials
            return web.Response(status=403, body=b'{"error": "Forbidden"}', content_type="application/json")
        if mode == "redirect":
            return web.Response(status=307, headers={"Location": self.url + "/elsewhere"})
        if mode == "gzip":  # an engine behind a compressing proxy that ignores Accept-Encoding: identity
            import gzip
            return web.Response(body=gzip.compress(orjson.dumps(self._completion())),
                                headers={"Content-Type": "application/json", "Content-Encoding": "gzip"})
        if mode == "error_500":
            return web.Response(status=500, body=orjson.dumps({"error": {"message": "engine exploded",
                                "type": "InternalServerError", "param": None, "code": 500}}),
                                content_type="application/json")
        if mode == "drop_before":
            request.transport.close()  # type: ignore[union-attr]
            await asyncio.sleep(1)
            return web.Response()
        if mode == "stall":
            try:
                await asyncio.sleep(self.delay_s)
            except asyncio.CancelledError:
                self.aborted += 1
                raise
        if mode == "bad_header":  # an answer that is no valid HTTP: a header line without a colon
            request.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"  # type: ignore
                                    b"this line is no header\r\n\r\n")
            await asyncio.sleep(0.05)
            request.transport.close()  # type: ignore[union-attr]
            return web.Response()
        if mode == "drop_mid_body":  # headers and part of a whole (non-streamed) answer, then the connection goes
            response = web.StreamResponse(headers={"Content-Type": "application/json", "Content-Length": "1000"})
            await response.prepare(request)
            await response.write(b'{"id": "chatcmpl-fault", ')
            await asyncio.sleep(0.05)
            request.transport.close()  # type: ignore[union-attr]
            return response
        if not lax_bool(body.get("stream") or False):  # as vLLM reads it: "false" is no stream
            completion = self._completion()
            if mode in ("abort", "finish_error"):  # finish_error: vLLM's "error" (the engine failed the answer)
                completion["choices"][0]["finish_reason"] = "abort" if mode == "abort" else "error"
            response = web.Response(body=orjson.dumps(completion), content_type="application/json")
            if mode == "compressing":  # behind a proxy that compresses what the client's Accept-Encoding allows
                response.enable_compression()
            return response
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        if mode == "busy_in_stream":  # vLLM's late back-pressure: its 200 is sent, then the refusal as an event
            await response.write(b"data: " + orjson.dumps({"error": VLLM_BUSY["error"]}) + b"\n\ndata: [DONE]\n\n")
            return response
        for code in (400, 500):  # vLLM's error event as the stream's first: a late refusal, or a failure
            if mode == f"error_event_{code}":
                error = {"error": {"message": f"error {code} from the engine", "type": "BadRequestError"
                                   if code == 400 else "InternalServerError", "param": None, "code": code}}
                await response.write(b"data: " + orjson.dumps(error) + b"\n\ndata: [DONE]\n\n")
                return response
        if mode == "bad_chunk_first":  # part of the first event, then a chunk size that is no hex number
            await response.write(b'data: {"id": "chatcmpl-fault"')
            await self._bad_chunk_then_silence(request)
        if mode == "slow_start":  # queued inside the engine: headers at once, the first event delay_s later
            try:
                await asyncio.sleep(self.delay_s)
            except asyncio.CancelledError:
                self.aborted += 1
                raise
        chunk = {"id": "chatcmpl-fault", "object": "chat.completion.chunk", "created": 1, "model": self.model,
                 "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}]}
        if mode == "split_first_event":  # the first event's ending blank line comes in a later packet, then a pause
            await response.write(b"data: " + orjson.dumps(chunk) + b"\n")
            await asyncio.sleep(0.05)
            await response.write(b"\n")
            await asyncio.sleep(self.delay_s)
        else:
            await response.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
        if mode == "drop_after_first":
            await asyncio.sleep(0.05)
            request.transport.close()  # type: ignore[union-attr]
            return response
        if mode == "error_mid_stream":  # vLLM 0.32 when its EngineCore dies: an error event for the streams in flight
            error = {"error": {"message": "EngineCore encountered an issue. See stack trace (above) for the root "
                                          "cause.", "type": "InternalServerError", "param": None, "code": 500}}
            await response.write(b"data: " + orjson.dumps(error) + b"\n\ndata: [DONE]\n\n")
            await response.write_eof()
            return response
        if mode == "firehose":  # 64 KiB events as fast as the connection takes them, until the request ends
            big = dict(chunk, choices=[{"index": 0, "delta": {"content": "x" * 65536}, "finish_reason": None}])
            event = b"data: " + orjson.dumps(big) + b"\n\n"
            try:
                while True:
                    await response.write(event)
            except (asyncio.CancelledError, ConnectionError):
                self.aborted += 1
                raise
        if mode == "bad_chunk_after_first":
            await self._bad_chunk_then_silence(request)
        if mode == "cut_mid_event":  # an orderly end of the stream in the middle of its second event
            await response.write(b'data: {"id": "chatcmpl-fault", "object": "chat.completion.chunk", "crea')
            await response.write_eof()
            return response
        if mode == "reset_after_first":  # a TCP reset (an engine process that died), not an orderly close
            await asyncio.sleep(0.05)
            sock = request.transport.get_extra_info("socket")  # type: ignore[union-attr]
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            request.transport.abort()  # type: ignore[union-attr]
            return response
        try:
            for word in ("hello", " world"):
                chunk["choices"][0]["delta"] = {"content": word}
                await response.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
                await asyncio.sleep(self.delay_s if mode == "slow" else 0)
        except asyncio.CancelledError:
            self.aborted += 1
            raise
        chunk["choices"][0]["delta"] = {}
        chunk["choices"][0]["finish_reason"] = {"abort": "abort", "finish_error": "error"}.get(mode, "stop")
        await response.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
        if mode == "cut_after_finish":  # the answer's last chunk, then an orderly close: no usage chunk, no [DONE]
            await response.write_eof()
            return response
        if mode == "reset_after_finish":  # the answer's last chunk, then a TCP reset (the engine process died)
            await asyncio.sleep(0.05)
            sock = request.transport.get_extra_info("socket")  # type: ignore[union-attr]
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            request.transport.abort()  # type: ignore[union-attr]
            return response
        if (body.get("stream_options") or {}).get("include_usage"):
            usage = {**chunk, "choices": [], "usage": self.usage}
            await response.write(b"data: " + orjson.dumps(usage) + b"\n\n")
        if mode != "no_done":  # no_done: the stream closes after its last chunk, without [DONE]
            await response.write(b"data: [DONE]\n\n")
        if mode == "linger_after_done":  # the body's end comes delay_s after [DONE] (a busy engine's event loop)
            await asyncio.sleep(self.delay_s)
        await response.write_eof()
        return response


class RawEngine:
    """An engine that writes whatever bytes it is given: answers aiohttp's own server would refuse to write (a
    status line "042", a header with a control character, an SSE body with its own separators). ``answer(head,
    body)`` returns the bytes of the answer to a POST (``head`` the request's line and headers, lower-cased
    names; a float among the parts is a pause between writes); GET /metrics answers an idle engine, other GETs
    404. Each connection is closed after its answer."""

    METRICS = b'vllm:num_requests_running{engine="0",model_name="fault-model"} 0.0\n'

    def __init__(self, answer=None, metrics_answer: bytes | None = None) -> None:
        self.answer = answer
        self.metrics_answer = metrics_answer  # the whole answer to GET /metrics (None: an idle engine's page)
        self.posts = 0
        self.server: asyncio.base_events.Server | None = None
        self.url = ""

    async def __aenter__(self) -> "RawEngine":
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc) -> None:
        assert self.server is not None
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await reader.readline()
            headers = {}
            while (header := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = header.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
            body = await reader.readexactly(int(headers.get("content-length", 0)))
            if line.startswith(b"GET /metrics") and self.metrics_answer is not None:
                writer.write(self.metrics_answer)
            elif line.startswith(b"GET"):
                page = self.METRICS if line.startswith(b"GET /metrics") else b""
                writer.write(b"HTTP/1.1 %d X\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                             % (200 if page else 404, len(page)) + page)
            else:
                self.posts += 1
                for part in await self.answer(headers, body):
                    if isinstance(part, float):  # a pause between writes
                        await asyncio.sleep(part)
                        continue
                    writer.write(part)
                    await writer.drain()
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


def raw_answer(status: bytes, headers: bytes, body: bytes) -> bytes:
    """An HTTP/1.1 answer with this status line's code, these header lines and a Content-Length body."""
    return (b"HTTP/1.1 " + status + b" X\r\n" + headers + b"Content-Length: %d\r\nConnection: close\r\n\r\n"
            % len(body) + body)
