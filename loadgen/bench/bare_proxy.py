"""The reference point for the overhead benchmark: a bare aiohttp + uvloop + orjson pass-through.

It does the least any aiohttp gateway must do: parse the JSON body with orjson, forward it to one upstream
through a pooled ``ClientSession``, and relay the answer (the whole body, or SSE bytes as they arrive). The
gap between this and the real gateway is the cost of Maestro's own logic; the gap between this and "direct"
is the floor set by the framework.

``python -m loadgen.bench.bare_proxy --upstream http://127.0.0.1:PORT --port 0 --cpu 0`` prints
``LISTENING <port>``; ``maestro bench overhead --target bare`` uses it in place of the gateway.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys

import aiohttp
import orjson
from aiohttp import web

_HOP = {"content-length", "transfer-encoding", "connection", "keep-alive", "content-encoding"}


def build_app(upstream: str) -> web.Application:
    app = web.Application()
    state: dict = {}

    async def on_startup(_: web.Application) -> None:
        state["session"] = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=None, keepalive_timeout=60),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=5), auto_decompress=False)

    async def on_cleanup(_: web.Application) -> None:
        await state["session"].close()

    async def chat(request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        body = orjson.loads(raw)
        stream = bool(body.get("stream"))
        session: aiohttp.ClientSession = state["session"]
        async with session.post(upstream + request.path, data=orjson.dumps(body),
                                headers={"Content-Type": "application/json"}) as up:
            if not stream:
                data = await up.read()
                return web.Response(status=up.status, body=data, content_type="application/json")
            resp = web.StreamResponse(status=up.status)
            resp.content_type = "text/event-stream"
            await resp.prepare(request)
            async for chunk in up.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
            return resp

    async def health(_: web.Request) -> web.Response:
        return web.Response(body=b'{"status":"ok"}', content_type="application/json")

    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/health", health)
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app


async def _serve(upstream: str, host: str, port: int) -> None:
    runner = web.AppRunner(build_app(upstream), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=4096, reuse_address=True)
    await site.start()
    bound = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    print(f"LISTENING {bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadgen.bench.bare_proxy", description=__doc__.split("\n\n")[0])
    p.add_argument("--upstream", required=True, help="http://host:port of the upstream")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--cpu", type=int, default=None, help="pin this process to one CPU core")
    args = p.parse_args(argv)
    if args.cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {args.cpu})
    import uvloop

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    try:
        asyncio.run(_serve(args.upstream.rstrip("/"), args.host, args.port))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
