"""Assemble and run one gateway: config -> (simulated engines) -> registry, store, monitor, proxy, HTTP app.

``Gateway`` is usable in-process (tests, the overhead benchmark) and from ``maestro serve``. Startup order
matters: simulated engines first (their URLs become engine specs), then one probe round so the gateway does
not answer 503 for its first quarter second, then the HTTP listener.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import socket
import time

from aiohttp import web

from gateway.api.admin_routes import add_admin_routes, not_found
from gateway.api.cors import add_cors
from gateway.api.openai_routes import GATEWAY_KEY, add_openai_routes
from gateway.config import Config
from gateway.control.monitor import EngineMonitor
from gateway.core.engines import EngineSpec
from gateway.listen import start_site
from gateway.metrics import GatewayMetrics
from gateway.proxy import Proxy
from gateway.registry import EngineRegistry
from gateway.scheduling import Scheduling
from gateway.state import StateUnavailable, make_state_store
from gateway.state.base import MAX_TTL_S
from gateway.tasks import cancel_and_wait

log = logging.getLogger("maestro.gateway")
# At stop, the removal of this gateway's heartbeat entry waits this long at most (else the entry expires by TTL).
REMOVE_GATEWAY_S = 0.5


class Gateway:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.gateway_id = config.server.gateway_id or f"{socket.gethostname()}-{os.getpid()}"
        self.api_keys = tuple(key.encode() for key in config.server.api_keys)  # as check_api_key compares them
        # each key's scope for workflow ids (its SHA-256's first 8 hex digits): tenants share no workflow state
        self.api_key_scopes = tuple(hashlib.sha256(key).hexdigest()[:8] for key in self.api_keys)
        # the client headers engines get, each once (a header named twice in the list would be sent twice)
        self.forward_headers = tuple({name.lower(): name for name in config.server.forward_headers}.values())
        self.metrics = GatewayMetrics()
        self.store = make_state_store(config.state)
        self.handlers: set[asyncio.Task] = set()  # the OpenAI routes' requests in flight (a graceful stop ends them)
        self.metrics.inflight.set_function(lambda: len(self.handlers))  # maestro_inflight_requests, read at scrape
        self.admin_calls: set[asyncio.Task] = set()  # engine sleeps and wake-ups in flight (the stop ends them too)
        self.images_inflight = 0  # image requests among them (server.max_inflight_images)
        self.draining = False  # stopping: new requests get 503, those in flight get server.shutdown_grace_s
        self.cutting = False  # the grace is over: the stop cancels the requests still in flight
        self._hurry = asyncio.Event()  # a second stop signal: end the grace now
        self.started_at = time.time()
        self.registry: EngineRegistry | None = None
        self.proxy: Proxy | None = None
        self.monitor: EngineMonitor | None = None
        self.scheduling = Scheduling(config, self.store, self.metrics)
        self.scheduling.gateway_id = self.gateway_id
        self._sim_handles: list = []
        self._runner: web.AppRunner | None = None
        self._heartbeat_task: asyncio.Task | None = None
        self._stopping = False
        self._stopped = False
        self.base_url = ""

    @property
    def inflight(self) -> int:
        """Requests inside the gateway now (the OpenAI routes' handlers in flight)."""
        return len(self.handlers)

    @property
    def store_status(self) -> str:
        return "ok" if self.monitor is None or self.monitor.store_ok else "unavailable"

    async def _engine_specs(self) -> list[EngineSpec]:
        specs: list[EngineSpec] = []
        for cluster, pool in self.config.pools():
            urls = [(engine.id, engine.url) for engine in pool.engines]
            if pool.simulated is not None:
                from gateway.simulated import start_simulated_pool

                model = self.config.model(pool.models[0])
                handles = await start_simulated_pool(pool, model.max_model_len if model else 4096)
                self._sim_handles.extend(handles)
                urls.extend(("", handle.url) for handle in handles)
            for index, (engine_id, url) in enumerate(urls):
                specs.append(EngineSpec(engine_id=engine_id or f"{cluster.name}/{pool.name}/{index}", url=url,
                                        cluster=cluster.name, pool=pool.name, kind=pool.kind, models=pool.models))
        return specs

    def build_app(self) -> web.Application:
        app = web.Application(client_max_size=self.config.server.max_body_bytes)
        app[GATEWAY_KEY] = self
        add_openai_routes(app)
        add_admin_routes(app)
        add_cors(app, self.config.server.cors_allowed_origins)
        app.router.add_route("*", "/{tail:.*}", not_found)
        return app

    async def start(self, host: str | None = None, port: int | None = None) -> str:
        """Start engines, monitor and listener; return the base URL (``http://host:port``). If a step fails (a
        model file that is not there, a port in use), what was started is stopped before the error is raised."""
        try:
            return await self._start(host, port)
        except BaseException:
            await self.stop()
            raise

    async def _start(self, host: str | None, port: int | None) -> str:
        self.registry = EngineRegistry(self.config, await self._engine_specs())
        self.proxy = Proxy(self.config, self.registry, self.metrics)
        self.monitor = EngineMonitor(self.config, self.registry, self.store, self.metrics)
        await self.monitor.probe_all()
        self.metrics.engines_up.set(self.registry.up_count())
        self.metrics.engines_sleeping.set_function(self.registry.sleeping_count)  # read at scrape
        await self.scheduling.start(self.registry, self.proxy)  # after the first probes: capacities are known
        self.monitor.start()
        self._heartbeat_task = asyncio.create_task(self._heartbeat_loop(), name="heartbeat")

        # handler_cancellation: a client that disconnects cancels its handler, which closes the upstream
        # request, so the engine aborts generation within a scheduler step.
        # shutdown_timeout: aiohttp's own wait for handlers, after _drain has ended every request it knows
        self._runner = web.AppRunner(self.build_app(), access_log=None, handler_cancellation=True,
                                     shutdown_timeout=1.0)
        await self._runner.setup()
        host = host or self.config.server.host
        port = self.config.server.port if port is None else port
        site = web.TCPSite(self._runner, host, port, backlog=4096, reuse_address=True)
        await start_site(site, host, port)
        bound_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        # an IPv6 literal in a URL takes brackets ("http://::1:8000" is no URL the SDK can use)
        self.base_url = f"http://[{host}]:{bound_port}" if ":" in host else f"http://{host}:{bound_port}"
        return self.base_url

    async def _heartbeat_loop(self) -> None:
        """Announce this gateway until its stop has ended its requests and released their reservations (the
        others share an engine by the gateways they see during an outage); the stop then removes the entry."""
        interval = self.config.state.heartbeat_interval_s
        while not self._stopping:  # a flag as well as the cancel: see gateway/tasks.py
            info = {"base_url": self.base_url, "started_at": self.started_at, "inflight": self.inflight,
                    "engines_up": self.registry.up_count() if self.registry else 0}
            try:
                await self.store.heartbeat(self.gateway_id, info, ttl_s=min(interval * 3, MAX_TTL_S))
            except StateUnavailable:
                pass  # the monitor logs store outages once; serving does not depend on the store
            await asyncio.sleep(interval)

    async def _drain(self) -> None:
        """Let the requests in flight finish for up to ``server.shutdown_grace_s`` (new ones get 503), then end
        the rest, each with an answer: a stream with an error event and ``[DONE]``, a request not yet answered
        with 503 and Retry-After. Bounded, so that the whole stop stays inside an orchestrator's grace period
        (Docker's default is 10 s) instead of cutting connections without a word at its SIGKILL."""
        self.draining = True
        if not self.handlers and not self.admin_calls:
            return
        loop = asyncio.get_running_loop()
        grace = self.config.server.shutdown_grace_s
        log.info("stopping: waiting up to %g s for %d requests in flight", grace,
                 len(self.handlers) + len(self.admin_calls))
        deadline = loop.time() + grace
        while (self.handlers or self.admin_calls) and loop.time() < deadline and not self._hurry.is_set():
            await asyncio.sleep(0.05)
        if not self.handlers and not self.admin_calls:
            return
        log.warning("stopping: ending %d requests still in flight after %.1f s (streams with an error event, the "
                    "others with 503)", len(self.handlers) + len(self.admin_calls),
                    grace - max(0.0, deadline - loop.time()))
        self.cutting = True
        if self.proxy is not None:
            self.proxy.shutting_down = True
        pending = list(self.handlers) + list(self.admin_calls)
        for task in pending:
            task.cancel()
        await asyncio.wait(pending, timeout=2.0)

    def hurry(self) -> None:
        """A second stop signal: end the requests still in flight now, not at the end of the grace."""
        if not self._hurry.is_set():
            if self.draining:
                log.warning("stopping: signalled again; ending the %d requests still in flight now",
                            len(self.handlers) + len(self.admin_calls))
            else:
                log.warning("signalled again while starting: the stop will not wait for requests in flight")
        self._hurry.set()

    async def stop(self) -> None:
        """Stop everything; safe to call again (a failed start stops, and then so does its caller)."""
        if self._stopped:
            return
        self._stopped = True
        await self._drain()
        if self._runner is not None:
            await self._runner.cleanup()
        await self.scheduling.stop()
        self._stopping = True
        await cancel_and_wait(self._heartbeat_task)
        if self._heartbeat_task is not None and self.store_status == "ok":  # a store known down is not waited for
            try:  # briefly: the stop must stay inside an orchestrator's grace period (see _drain)
                async with asyncio.timeout(REMOVE_GATEWAY_S):
                    await self.store.remove_gateway(self.gateway_id)
            except (StateUnavailable, TimeoutError):
                pass  # its entry expires with its heartbeat's TTL
        if self.monitor is not None:
            await self.monitor.stop()
        if self.registry is not None:
            await self.registry.close()
        for handle in self._sim_handles:
            await handle.stop()
        self._sim_handles.clear()
        await self.store.close()
        if self.base_url:  # a start that failed (a port in use) is said by its error, not as a clean stop
            log.info("stopped")  # the last line of a clean stop: without it a log could not tell one from a crash
