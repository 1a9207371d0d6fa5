"""Start simulated engines in-process: many engines, one port each, one event loop."""

from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass, replace

from aiohttp import web

from backends.sim.cost_model import EngineCostModel
from backends.sim.dit import SimDiTEngine, SimDiTServer
from backends.sim.engine import SimEngine
from backends.sim.options import SimDiTOptions, SimEngineOptions
from backends.sim.server import SimServer


@dataclass
class SimEngineHandle:
    """A running simulated engine: ``url`` is the base URL without ``/v1``; ``engine`` is the scheduler."""

    url: str
    engine: SimEngine
    runner: web.AppRunner
    kind: str = "vllm"

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    async def stop(self) -> None:
        await self.engine.stop()
        await self.runner.cleanup()


@dataclass
class SimDiTHandle:
    url: str
    engine: SimDiTEngine
    runner: web.AppRunner
    kind: str = "vllm-omni"

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    async def stop(self) -> None:
        await self.runner.cleanup()


async def _serve(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound_host, bound_port = runner.addresses[0][:2]
    shown = host if host not in ("0.0.0.0", "::", "") else "127.0.0.1"
    if ":" in shown:
        shown = f"[{shown}]"
    return runner, f"http://{shown}:{bound_port}"


async def start_sim_engines(count: int, options: SimEngineOptions, host: str = "127.0.0.1",
                            base_port: int = 0) -> list[SimEngineHandle]:
    """Start ``count`` simulated vLLM engines on ``base_port + i`` (``base_port=0``: ephemeral ports).

    Engine ``i`` uses ``seed + i``. The cost model is fitted once and shared.
    """
    options.validate()
    cost = EngineCostModel(options.calibration_dir, scale=options.cost_scale)
    handles: list[SimEngineHandle] = []
    try:
        for i in range(count):
            engine = SimEngine(replace(options, seed=options.seed + i), cost)
            engine.start()
            try:
                runner, url = await _serve(SimServer(engine).build_app(), host, base_port + i if base_port else 0)
            except BaseException:
                await engine.stop()
                raise
            handles.append(SimEngineHandle(url, engine, runner))
    except BaseException:
        for handle in handles:
            await handle.stop()
        raise
    return handles


async def start_sim_dit_engines(count: int, options: SimDiTOptions | None = None, host: str = "127.0.0.1",
                                base_port: int = 0) -> list[SimDiTHandle]:
    """Start ``count`` simulated vLLM-Omni image engines (``base_port=0``: ephemeral ports)."""
    options = options or SimDiTOptions()
    options.validate()
    cost = EngineCostModel(options.calibration_dir, scale=options.cost_scale)
    handles: list[SimDiTHandle] = []
    try:
        for i in range(count):
            engine = SimDiTEngine(replace(options, seed=options.seed + i), cost)
            runner, url = await _serve(SimDiTServer(engine).build_app(), host, base_port + i if base_port else 0)
            handles.append(SimDiTHandle(url, engine, runner))
    except BaseException:
        for handle in handles:
            await handle.stop()
        raise
    return handles


async def serve_sim_engines_forever(count: int, options: SimEngineOptions, host: str = "127.0.0.1",
                                    base_port: int = 0, dit_count: int = 0,
                                    dit_options: SimDiTOptions | None = None) -> None:
    """Start the engines, print one line per engine (``<kind> <url> <model>``), run until cancelled.

    DiT engines take the ports after the LLM engines when ``base_port`` is given.
    """
    handles: list[SimEngineHandle | SimDiTHandle] = []
    try:
        handles.extend(await start_sim_engines(count, options, host, base_port))
        dit_base = base_port + count if base_port else 0
        dit_options = dit_options or SimDiTOptions(time_scale=options.time_scale, seed=options.seed,
                                                   calibration_dir=options.calibration_dir)
        handles.extend(await start_sim_dit_engines(dit_count, dit_options, host, dit_base))
        for handle in handles:
            print(f"{handle.kind} {handle.url} {handle.engine.options.model}", flush=True)
        sys.stdout.flush()
        await asyncio.Event().wait()
    finally:
        for handle in handles:
            await handle.stop()
