"""A near-zero-cost, vLLM-shaped upstream for overhead benchmarks.

A raw asyncio ``Protocol`` HTTP/1.1 keep-alive server (uvloop when available). It must be far cheaper than the
gateway it sits behind, so it never bottlenecks a measurement: no framework, no JSON encoding per request, every
response is a precomputed ``bytes`` object.

Routes:
- ``POST /v1/chat/completions`` (and ``/v1/completions``): a fixed ``chat.completion`` JSON with usage, or, when the
  body has ``"stream": true``, a short SSE stream in chunked transfer-encoding: a role chunk, two content chunks,
  a finish chunk, a usage chunk with ``"choices": []`` and ``data: [DONE]``.
- ``GET /health`` 200, ``GET /metrics`` a minimal vLLM-style exposition, ``GET /v1/models``.
- anything else: 404 with vLLM's error JSON shape.

Standalone: ``python -m loadgen.bench.fake_upstream --port 0 --cpu 1`` prints ``LISTENING <port>`` once ready.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import sys

import orjson

from loadgen.bench.http1 import header_value
from loadgen.bench.sockets import disable_nagle

MODEL = "bench"
CREATED = 1764300000
_STREAM_RE = re.compile(rb'"stream"\s*:\s*true')
_MAX_HEADER = 64 * 1024


def _json(obj: object) -> bytes:
    return orjson.dumps(obj)


def _response(status: str, body: bytes, content_type: bytes = b"application/json") -> bytes:
    return (
        b"HTTP/1.1 " + status.encode() + b"\r\n"
        b"server: fake-upstream\r\n"
        b"content-type: " + content_type + b"\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )


USAGE = {"prompt_tokens": 12, "total_tokens": 21, "completion_tokens": 9, "prompt_tokens_details": None}

CHAT_COMPLETION = {
    "id": "chatcmpl-bench",
    "object": "chat.completion",
    "created": CREATED,
    "model": MODEL,
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": "Hello! How can I help you today?",
                "refusal": None,
                "annotations": None,
                "audio": None,
                "function_call": None,
                "tool_calls": [],
                "reasoning_content": None,
            },
            "logprobs": None,
            "finish_reason": "stop",
            "stop_reason": None,
        }
    ],
    "service_tier": None,
    "system_fingerprint": None,
    "usage": USAGE,
    "prompt_logprobs": None,
    "kv_transfer_params": None,
}


def _chunk(delta: dict | None, finish: str | None = None, *, usage: dict | None = None) -> dict:
    out: dict = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": CREATED, "model": MODEL}
    if usage is not None:
        out["choices"] = []
        out["usage"] = usage
    else:
        out["choices"] = [
            {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish,
             **({"stop_reason": None} if finish else {})}
        ]
    return out


SSE_EVENTS: tuple[bytes, ...] = tuple(
    b"data: " + _json(c) + b"\n\n"
    for c in (
        _chunk({"role": "assistant", "content": ""}),
        _chunk({"content": "Hello"}),
        _chunk({"content": " world"}),
        _chunk({"content": ""}, "stop"),
        _chunk(None, usage=USAGE),
    )
) + (b"data: [DONE]\n\n",)


def _chunked(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


RESP_CHAT = _response("200 OK", _json(CHAT_COMPLETION))
RESP_STREAM = (
    b"HTTP/1.1 200 OK\r\n"
    b"server: fake-upstream\r\n"
    b"content-type: text/event-stream; charset=utf-8\r\n"
    b"cache-control: no-cache\r\n"
    b"transfer-encoding: chunked\r\n\r\n"
    + b"".join(_chunked(e) for e in SSE_EVENTS)
    + b"0\r\n\r\n"
)
RESP_HEALTH = _response("200 OK", b"")
RESP_MODELS = _response("200 OK", _json({
    "object": "list",
    "data": [{"id": MODEL, "object": "model", "created": CREATED, "owned_by": "vllm", "root": MODEL,
              "parent": None, "max_model_len": 4096, "permission": []}],
}))
_LBL = b'{engine="0",model_name="' + MODEL.encode() + b'"}'
METRICS_TEXT = b"".join([
    b"# HELP vllm:num_requests_running Number of requests in model execution batches.\n",
    b"# TYPE vllm:num_requests_running gauge\n",
    b"vllm:num_requests_running" + _LBL + b" 0.0\n",
    b"# HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n",
    b"# TYPE vllm:num_requests_waiting gauge\n",
    b"vllm:num_requests_waiting" + _LBL + b" 0.0\n",
    b"# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.\n",
    b"# TYPE vllm:kv_cache_usage_perc gauge\n",
    b"vllm:kv_cache_usage_perc" + _LBL + b" 0.0\n",
])
RESP_METRICS = _response("200 OK", METRICS_TEXT, b"text/plain; version=0.0.4; charset=utf-8")
RESP_404 = _response("404 Not Found", _json(
    {"error": {"message": "Not Found", "type": "NotFoundError", "param": None, "code": 404}}))
RESP_405 = _response("405 Method Not Allowed", _json(
    {"error": {"message": "Method Not Allowed", "type": "BadRequestError", "param": None, "code": 405}}))
RESP_400 = _response("400 Bad Request", _json(
    {"error": {"message": "Bad Request", "type": "BadRequestError", "param": None, "code": 400}}))

_GET_ROUTES = {
    b"/health": RESP_HEALTH,
    b"/metrics": RESP_METRICS,
    b"/v1/models": RESP_MODELS,
    b"/ping": RESP_HEALTH,
}
_POST_ROUTES = (b"/v1/chat/completions", b"/v1/completions")


def _dechunk(buf: bytearray, pos: int) -> tuple[bytes, int] | None:
    """Decode a chunked body starting at ``pos``; return (body, end) or None when incomplete."""
    parts = []
    while True:
        nl = buf.find(b"\r\n", pos)
        if nl < 0:
            return None
        size = int(bytes(buf[pos:nl]).split(b";", 1)[0], 16)
        pos = nl + 2
        if size == 0:
            end = buf.find(b"\r\n\r\n", pos - 2)  # no trailers: "0\r\n\r\n"
            if end < 0:
                return None
            return b"".join(parts), end + 4
        if len(buf) < pos + size + 2:
            return None
        parts.append(bytes(buf[pos:pos + size]))
        pos += size + 2


class UpstreamProtocol(asyncio.Protocol):
    """One keep-alive connection; handles pipelined requests in order."""

    __slots__ = ("transport", "buf")

    requests_served = 0

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        disable_nagle(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        out = []
        close = False
        while True:
            hend = buf.find(b"\r\n\r\n")
            if hend < 0:
                if len(buf) > _MAX_HEADER:
                    out.append(RESP_400)
                    close = True
                break
            head = bytes(buf[:hend + 2])
            sp1 = head.find(b" ")
            sp2 = head.find(b" ", sp1 + 1)
            if sp1 <= 0 or sp2 <= 0:
                out.append(RESP_400)
                close = True
                break
            method = head[:sp1]
            path = head[sp1 + 1:sp2]
            q = path.find(b"?")
            if q >= 0:
                path = path[:q]
            lower = head.lower()
            body_start = hend + 4
            cl = header_value(lower, b"content-length:")
            if cl is not None:
                end = body_start + int(cl)
                if len(buf) < end:
                    break
                body = bytes(buf[body_start:end])
            elif header_value(lower, b"transfer-encoding:") == b"chunked":
                got = _dechunk(buf, body_start)
                if got is None:
                    break
                body, end = got
            else:
                body, end = b"", body_start
            del buf[:end]
            conn = header_value(lower, b"connection:")
            if conn == b"close" or (head[sp2 + 1:sp2 + 9] == b"HTTP/1.0" and conn != b"keep-alive"):
                close = True
            UpstreamProtocol.requests_served += 1
            if method == b"POST":
                if path in _POST_ROUTES:
                    out.append(RESP_STREAM if _STREAM_RE.search(body) else RESP_CHAT)
                else:
                    out.append(RESP_404)
            elif method == b"GET" or method == b"HEAD":
                resp = _GET_ROUTES.get(path, RESP_404)
                if method == b"HEAD":
                    resp = resp[:resp.find(b"\r\n\r\n") + 4]
                out.append(resp)
            else:
                out.append(RESP_405)
            if close:
                break
        if out and self.transport is not None:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))
            if close:
                self.transport.close()


def install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def start_upstream(host: str = "127.0.0.1", port: int = 0) -> tuple[asyncio.AbstractServer, int]:
    """Start the server in the running loop; return (server, bound port)."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(UpstreamProtocol, host, port, reuse_address=True, backlog=1024)
    bound = server.sockets[0].getsockname()[1]
    return server, bound


async def _serve(host: str, port: int) -> None:
    server, bound = await start_upstream(host, port)
    print(f"LISTENING {bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # pragma: no cover
            pass
    try:
        await stop.wait()
    finally:
        server.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadgen.bench.fake_upstream", description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port (printed as 'LISTENING <port>')")
    p.add_argument("--cpu", type=int, default=None, help="pin this process to one CPU core")
    args = p.parse_args(argv)
    if args.cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {args.cpu})
    install_uvloop()
    try:
        asyncio.run(_serve(args.host, args.port))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
