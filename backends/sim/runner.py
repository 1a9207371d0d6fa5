"""Start simulated engines in-process: many engines, one port each, one event loop."""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Generic, TypeVar

from aiohttp import web

from backends.sim.cost_model import EngineCostModel
from backends.sim.dit import SimDiTEngine, SimDiTServer
from backends.sim.engine import SimEngine
from backends.sim.options import DEFAULT_SIM_DIT_MODEL, SimDiTOptions, SimEngineOptions
from backends.sim.server import SimServer
from gateway.listen import MAX_PORT, start_site, stop_signals

EngineT = TypeVar("EngineT", SimEngine, SimDiTEngine)
HandleT = TypeVar("HandleT", bound="SimHandle")


@dataclass
class SimHandle(Generic[EngineT]):
    """A running simulated engine of either kind: ``url`` is the base URL without ``/v1``.

    One base for both kinds so that callers (the gateway's in-process pools, the CLI) can hold, print and stop
    a mixed list without caring which engine is behind each URL; the subclasses only fix ``kind`` and add what
    stopping their engine needs.
    """

    url: str
    engine: EngineT
    runner: web.AppRunner
    kind: str

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    async def stop(self) -> None:
        """Close the HTTP server (its open connections included)."""
        await self.runner.cleanup()


@dataclass
class SimEngineHandle(SimHandle[SimEngine]):
    """A running simulated vLLM engine; ``engine`` is the scheduler."""

    kind: str = "vllm"

    async def stop(self) -> None:
        """Stop the scheduler's loop first, so no request is still stepping when the server goes away."""
        await self.engine.stop()
        await super().stop()


@dataclass
class SimDiTHandle(SimHandle[SimDiTEngine]):
    """A running simulated vLLM-Omni image engine; its engine has no loop of its own to stop."""

    kind: str = "vllm-omni"


async def _serve(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await start_site(site, host, port)
    except BaseException:
        await runner.cleanup()
        raise
    bound_host, bound_port = runner.addresses[0][:2]
    shown = host if host not in ("0.0.0.0", "::", "") else "127.0.0.1"
    if ":" in shown:
        shown = f"[{shown}]"
    return runner, f"http://{shown}:{bound_port}"


async def _start_each(count: int, start_one: Callable[[int], Awaitable[HandleT]]) -> list[HandleT]:
    """Start engines ``0 .. count-1`` in turn; if one fails, stop the ones already up so no port or task leaks."""
    handles: list[HandleT] = []
    try:
        for i in range(count):
            handles.append(await start_one(i))
    except BaseException:
        for handle in handles:
            await handle.stop()
        raise
    return handles


def _port(base_port: int, i: int) -> int:
    """Engine ``i``'s port: ``base_port + i``, or 0 (ephemeral) for every engine when ``base_port`` is 0."""
    return base_port + i if base_port else 0


async def start_sim_engines(count: int, options: SimEngineOptions, host: str = "127.0.0.1",
                            base_port: int = 0) -> list[SimEngineHandle]:
    """Start ``count`` simulated vLLM engines on ``base_port + i`` (``base_port=0``: ephemeral ports).

    Engine ``i`` uses ``seed + i``. The cost model is fitted once and shared.
    """
    options.validate()
    cost = EngineCostModel(options.calibration_dir, scale=options.cost_scale)

    async def start_one(i: int) -> SimEngineHandle:
        engine = SimEngine(replace(options, seed=options.seed + i), cost)
        engine.start()
        try:
            runner, url = await _serve(SimServer(engine).build_app(), host, _port(base_port, i))
        except BaseException:
            await engine.stop()
            raise
        return SimEngineHandle(url, engine, runner)

    return await _start_each(count, start_one)


async def start_sim_dit_engines(count: int, options: SimDiTOptions | None = None, host: str = "127.0.0.1",
                                base_port: int = 0) -> list[SimDiTHandle]:
    """Start ``count`` simulated vLLM-Omni image engines (``base_port=0``: ephemeral ports)."""
    options = options or SimDiTOptions()
    options.validate()
    cost = EngineCostModel(options.calibration_dir, scale=options.cost_scale)

    async def start_one(i: int) -> SimDiTHandle:
        engine = SimDiTEngine(replace(options, seed=options.seed + i), cost)
        runner, url = await _serve(SimDiTServer(engine).build_app(), host, _port(base_port, i))
        return SimDiTHandle(url, engine, runner)

    return await _start_each(count, start_one)


def check_serve_counts(count: int, dit_count: int, base_port: int) -> None:
    """ValueError unless the engine counts and ports can be served: counts and port not negative, at least one
    engine, and with a ``base_port`` every engine's port at most 65535 (uvloop would wrap a larger one). Both
    command lines that serve simulated engines (``maestro sim-engines``, ``python -m backends.sim``) call it."""
    for name, value in (("count", count), ("dit-count", dit_count), ("base-port", base_port)):
        if value < 0:
            raise ValueError(f"--{name} must be >= 0, got {value}")
    if count + dit_count == 0:
        raise ValueError("nothing to serve: --count and --dit-count are both 0")
    if base_port and base_port + count + dit_count - 1 > MAX_PORT:
        raise ValueError(f"--base-port {base_port} leaves no room for {count + dit_count} engines below port "
                         f"{MAX_PORT + 1}")


def dit_options_like(options: SimEngineOptions, model: str = DEFAULT_SIM_DIT_MODEL) -> SimDiTOptions:
    """The DiT engines served beside LLM engines run on their clock, seed and calibration."""
    return SimDiTOptions(model=model, time_scale=options.time_scale, seed=options.seed,
                         calibration_dir=options.calibration_dir)


async def serve_sim_engines_forever(count: int, options: SimEngineOptions, host: str = "127.0.0.1",
                                    base_port: int = 0, dit_count: int = 0,
                                    dit_options: SimDiTOptions | None = None) -> None:
    """Start the engines, print one line per engine (``<kind> <url> <model>``), run until cancelled or until
    SIGINT or SIGTERM (:func:`gateway.listen.stop_signals`), then stop them.

    DiT engines take the ports after the LLM engines when ``base_port`` is given.
    """
    handles: list[SimHandle] = []
    with stop_signals() as stopping:
        try:
            handles.extend(await start_sim_engines(count, options, host, base_port))
            dit_base = base_port + count if base_port else 0
            dit_options = dit_options or dit_options_like(options)
            handles.extend(await start_sim_dit_engines(dit_count, dit_options, host, dit_base))
            for handle in handles:
                print(f"{handle.kind} {handle.url} {handle.engine.options.model}", flush=True)
            sys.stdout.flush()
            await stopping.wait()
        finally:
            for handle in handles:
                await handle.stop()
