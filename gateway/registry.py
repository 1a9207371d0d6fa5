"""The gateway's live view of its engines: state per engine, one client per engine, in-flight counts.

The monitor writes states here (and to the shared store); the request path reads only this local view, so
serving never waits on Redis. Choosing among eligible engines is delegated to a routing plugin from
``gateway.core.routing``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import Callable

from backends.vllm import EngineClient
from gateway.config import Config
from gateway.core.engines import EngineSpec, EngineState
from gateway.core.routing import RoutingPolicy, eligible, make_routing_policy


class EngineRegistry:
    def __init__(self, config: Config, specs: list[EngineSpec]) -> None:
        self.config = config
        self.states: dict[str, EngineState] = {}
        self.clients: dict[str, EngineClient] = {}
        self.inflight: dict[str, int] = defaultdict(int)
        # engine id -> the waits of the requests sent to it that have relayed nothing yet (the proxy's; each an
        # asyncio.timeout without a deadline, which abandon_waiting makes fire)
        self.waiting: dict[str, set[asyncio.Timeout]] = defaultdict(set)
        self._by_model: dict[tuple[str, str], list[str]] = defaultdict(list)  # (kind, model) -> engine ids
        self._policy: RoutingPolicy = make_routing_policy(config.routing.policy)
        timeouts = config.timeouts
        # engines' API keys by URL (a URL is listed once): kept with the clients, not in the engine state that
        # /admin/engines shows and Redis shares
        api_keys = {engine.url: engine.api_key for _, pool in config.pools() for engine in pool.engines}
        for spec in specs:
            self.states[spec.engine_id] = EngineState.of(spec)
            self.clients[spec.engine_id] = EngineClient(spec.url, spec.kind, connect_timeout_s=timeouts.connect_s,
                                                        scrape_timeout_s=timeouts.scrape_s,
                                                        admin_timeout_s=timeouts.admin_s,
                                                        api_key=api_keys.get(spec.url, ""))
            for model in spec.models:
                self._by_model[(spec.kind, model)].append(spec.engine_id)

    def serves(self, model: str, kind: str) -> bool:
        return (kind, model) in self._by_model

    def models(self, kind: str | None = None) -> list[str]:
        return sorted({m for (k, m) in self._by_model if kind is None or k == kind})

    def pick(self, model: str, kind: str, exclude: set[str],
             fits: Callable[[str], bool] | None = None) -> EngineState | None:
        """An engine for ``model`` that is up, awake and not in ``exclude``, or None; among them those that
        ``fits`` (a retried request's reservation has room there) when any does."""
        candidates = eligible([self.states[i] for i in self._by_model.get((kind, model), ())], model, exclude)
        if not candidates:
            return None
        if fits is not None and len(candidates) > 1:
            roomy = [c for c in candidates if fits(c.engine_id)]
            candidates = roomy or candidates
        return self._policy.choose(candidates, self.inflight)

    def pick_first(self, model: str, kind: str, engine_id: str | None,
                   pool_engines: frozenset[str] | None) -> EngineState | None:
        """First attempt of a scheduled request: the admitted engine if it can still take it, else the routing
        policy's choice within the chosen pool; None to fall back to :meth:`pick`."""
        if engine_id is not None:
            state = self.states.get(engine_id)
            if state is not None and state.up and not state.sleeping and model in state.models:
                return state
        if pool_engines is not None:
            candidates = eligible([self.states[i] for i in self._by_model.get((kind, model), ())
                                   if i in pool_engines], model, set())
            if candidates:
                return self._policy.choose(candidates, self.inflight)
        return None

    def abandon_waiting(self, engine_id: str) -> int:
        """The engine was marked down: end at once the waits of the requests sent to it that have relayed nothing
        to their clients yet, so that the proxy tries them on another engine. A hung engine (its probes time out)
        held a non-streamed request for the whole of timeouts.total_s (15 min by default), and a stream waiting
        for its first event for stream_idle_s, while other engines were free. Returns how many."""
        waits = self.waiting.pop(engine_id, set())
        if waits:
            now = asyncio.get_running_loop().time()
            for wait in waits:
                with contextlib.suppress(RuntimeError):  # (one already left: nothing to end)
                    wait.reschedule(now)
        return len(waits)

    def up_count(self) -> int:
        return sum(1 for s in self.states.values() if s.up)

    def sleeping_count(self) -> int:
        """Engines up but asleep (or held asleep while they drain): counted up, they take no request."""
        return sum(1 for s in self.states.values() if s.up and s.sleeping)

    async def close(self) -> None:
        for client in self.clients.values():
            await client.close()
