"""Engine monitor: probe every engine on a fixed period, mark it down/up, publish to the state store.

One task per engine so a slow engine never delays the others. The up/down rule is the pure
``gateway.core.engines.apply_probe_*``; this loop only does the I/O and the clock. A state store that is
down never stops monitoring: the local view (what serving reads) is always updated first.
"""

from __future__ import annotations

import asyncio
import logging
import time

from backends.vllm import EngineUnreachable
from gateway.config import Config
from gateway.core.engines import apply_probe_failure, apply_probe_success
from gateway.metrics import GatewayMetrics
from gateway.registry import EngineRegistry
from gateway.state import StateStore, StateUnavailable
from gateway.tasks import cancel_and_wait

log = logging.getLogger("maestro.monitor")


class EngineMonitor:
    def __init__(self, config: Config, registry: EngineRegistry, store: StateStore, metrics: GatewayMetrics) -> None:
        self.config = config
        self.registry = registry
        self.store = store
        self.metrics = metrics
        self._tasks: list[asyncio.Task] = []
        self._stopping = False
        self._store_ok = True
        self.store_failures = 0
        # engine id -> its latest state not yet written to the store, and the task writing it (one per engine)
        self._unpublished: dict[str, dict] = {}
        self._publishing: dict[str, asyncio.Task] = {}
        self._checking_models: dict[str, asyncio.Task] = {}
        # engine id -> its pool's models it did not list when it last came up (None: not known, the check failed)
        self.models_missing: dict[str, list[str] | None] = {}

    @property
    def store_ok(self) -> bool:
        return self._store_ok

    def start(self) -> None:
        self._stopping = False
        for engine_id in self.registry.states:
            self._tasks.append(asyncio.create_task(self._run(engine_id), name=f"monitor:{engine_id}"))

    async def stop(self) -> None:
        self._stopping = True
        await cancel_and_wait(self._tasks)
        self._tasks.clear()
        await cancel_and_wait(list(self._publishing.values()))
        self._publishing.clear()
        self._unpublished.clear()
        await cancel_and_wait(list(self._checking_models.values()))

    async def probe_now(self, engine_id: str) -> None:
        """Probe one engine at once (after an admin action), outside the periodic schedule."""
        await self._probe(engine_id)

    async def probe_all(self) -> None:
        """Probe every engine once, and write their states (at start: /health then says whether the store
        answers from the first request on)."""
        await asyncio.gather(*(self._probe(engine_id) for engine_id in self.registry.states))
        if self._publishing:
            await asyncio.wait(list(self._publishing.values()))
        # the log names an engine only when it goes up or down: one that never answers (a mistyped URL) would
        # otherwise be no more than "0/1 engines up" in the banner, and every request for its pool a 503
        # (one that answered but needs more successes, monitor.up_after_successes, is on its way up: not said)
        for engine_id, state in self.registry.states.items():
            if not state.up and state.consecutive_failures:
                log.warning("engine %s (%s) is not up: %s", engine_id, state.url, state.last_error)

    async def _run(self, engine_id: str) -> None:
        interval = self.config.monitor.interval_s
        while not self._stopping:
            started = time.monotonic()
            try:
                await self._probe(engine_id)
            except Exception:  # never let one bad probe kill the loop
                log.exception("monitor probe of %s crashed", engine_id)
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))

    async def _probe(self, engine_id: str) -> None:
        monitor = self.config.monitor
        client = self.registry.clients[engine_id]
        before = self.registry.states[engine_id]
        now = time.time()
        try:
            metrics = await client.probe()
        except EngineUnreachable as exc:
            # the state as it is now: an admin's sleep mark set while this probe waited is kept
            state = apply_probe_failure(self.registry.states[engine_id], str(exc), now, monitor.down_after_failures)
        else:
            state = apply_probe_success(before, metrics, now, monitor.up_after_successes)
        self.registry.states[engine_id] = state
        if state.up != before.up:
            moved = 0 if state.up else self.registry.abandon_waiting(engine_id)
            log.log(logging.INFO if state.up else logging.WARNING, "engine %s is now %s%s%s", engine_id,
                    "UP" if state.up else "DOWN", f" ({state.last_error})" if state.last_error else "",
                    f"; {moved} request(s) waiting for its answer go to another engine" if moved else "")
            self.metrics.engines_up.set(self.registry.up_count())
            if state.up:
                self._check_models_soon(engine_id)
        self.metrics.engine_up(engine_id, state.up)
        self._publish_soon(engine_id, state.to_dict())

    def _check_models_soon(self, engine_id: str) -> None:
        """Say in the log, once each time the engine comes up, which of its pool's models it does not serve (in
        the background: probing goes on). A pool's model name that differs from the engine's
        ``--served-model-name`` failed every request for it there (vLLM answers 404, vLLM-Omni 400), and
        nothing said why."""
        running = self._checking_models.get(engine_id)
        if running is not None:
            running.cancel()  # an engine that went down and came up again (maybe restarted with other names)
        task = asyncio.get_running_loop().create_task(self._check_models(engine_id), name=f"monitor-models:{engine_id}")
        self._checking_models[engine_id] = task
        task.add_done_callback(lambda done: self._checking_models.pop(engine_id, None)
                               if self._checking_models.get(engine_id) is done else None)

    async def _check_models(self, engine_id: str) -> None:
        state = self.registry.states[engine_id]
        self.models_missing[engine_id] = None  # not known until this check answers
        try:
            contexts = await self.registry.clients[engine_id].model_contexts()
        except EngineUnreachable as exc:
            log.info("engine %s: could not list the models it serves: %s", engine_id, exc)
            return
        served = list(contexts)
        if state.kind == "vllm-omni":  # it compares a request's model with its first served name alone
            served = served[:1]
        missing = [model for model in state.models if model not in served]
        if missing:
            log.warning("engine %s does not serve %s, which its pool %s routes to it: those requests fail there "
                        "(unless it loads such a LoRA adapter later). It serves %s; give the pool the engine's "
                        "served model names (vLLM's --served-model-name)", engine_id,
                        ", ".join(map(repr, missing)), state.pool, ", ".join(map(repr, served)) or "none")
        self.models_missing[engine_id] = missing
        self._check_contexts(engine_id, {model: contexts.get(model) for model in state.models if model in served})

    def _check_contexts(self, engine_id: str, contexts: dict[str, int | None]) -> None:
        """Say in the log where the config gives a model a longer context than the engine serves it with: the
        gateway lets through (and its predictions and KV reservations allow for) requests the engine refuses
        (400), and its model card tells clients a context they cannot use."""
        declared = {model.name: model.max_model_len for model in self.config.models}
        for model, context in contexts.items():
            if context is not None and model in declared and declared[model] > context:
                log.warning("engine %s serves %r with a context of %d tokens, but the config's models entry says "
                            "max_model_len %d (4096 where it is not given): requests that need more are refused "
                            "by the engine, and /v1/models tells clients %d; set max_model_len: %d", engine_id,
                            model, context, declared[model], declared[model], context)

    def _publish_soon(self, engine_id: str, record: dict) -> None:
        """Write the engine's latest state to the store in the background: the probe loop awaited the write, and
        while Redis hung each write took its whole timeout, so probes ran 4 times slower (an engine that died
        was seen down after ~3.75 s instead of ~0.75 s, and routing read staler load). One write per engine at a
        time; a state probed meanwhile replaces the one waiting."""
        self._unpublished[engine_id] = record
        if engine_id not in self._publishing:
            task = asyncio.get_running_loop().create_task(self._publish_latest(engine_id),
                                                          name=f"monitor-publish:{engine_id}")
            self._publishing[engine_id] = task

    async def _publish_latest(self, engine_id: str) -> None:
        try:
            while (record := self._unpublished.pop(engine_id, None)) is not None:
                try:
                    await self._publish(engine_id, record)
                except Exception:  # a bug: logged, and the next probe's state is written as usual
                    log.exception("writing engine %s's state to the store failed", engine_id)
        finally:
            self._publishing.pop(engine_id, None)

    async def _publish(self, engine_id: str, record: dict) -> None:
        try:
            await self.store.put_engine(engine_id, record, self.config.state.engine_ttl_s)
        except StateUnavailable as exc:
            self.store_failures += 1
            if self._store_ok:
                log.warning("state store unavailable, serving from local state: %s", exc)
            self._store_ok = False
            return
        if not self._store_ok:
            log.warning("state store reachable again; engine state re-published")
        self._store_ok = True
