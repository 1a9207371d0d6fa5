"""Operational routes: liveness, Prometheus metrics, engine view and engine sleep/wake, the predictor's state and
an online refit on demand.

``/health`` and ``/metrics`` are open (probes and scrapers rarely carry keys); ``/admin/*`` needs an API key
whenever keys are configured, because it can put engines to sleep.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import orjson
from aiohttp import web

from dataclasses import replace

from backends.vllm import EngineTimedOut, EngineUnreachable
from gateway.api.errors import SERVER_ERROR, APIError, error_response
from gateway.api.openai_routes import GATEWAY_KEY, check_api_key
from gateway.metrics import CONTENT_TYPE_LATEST

if TYPE_CHECKING:
    from gateway.app import Gateway


async def health(request: web.Request) -> web.Response:
    """200 ``ok``; 503 ``draining`` once the gateway is stopping (it answers new requests 503), so that a load
    balancer or readiness probe stops sending it traffic during the stop's grace."""
    gateway = request.app[GATEWAY_KEY]
    registry = gateway.registry
    body = {"status": "draining" if gateway.draining else "ok", "gateway_id": gateway.gateway_id,
            "engines_up": registry.up_count(), "engines_sleeping": registry.sleeping_count(),
            "engines_total": len(registry.states), "state_store": gateway.store_status}
    return web.Response(body=orjson.dumps(body), status=503 if gateway.draining else 200,
                        content_type="application/json")


async def metrics(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY_KEY]
    return web.Response(body=gateway.metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})


def _admin(request: web.Request) -> "Gateway":
    """The gateway, for a caller allowed to administer it: the API key when keys are set, and no web page. A
    browser sends a cross-site POST without asking first (a text/plain body needs no preflight), so any page a
    user of a keyless gateway opened could put its engines to sleep; a page's origin must be listed by name in
    ``server.cors_allowed_origins`` ("*" opens the API to pages, not the admin routes)."""
    gateway = request.app[GATEWAY_KEY]
    check_api_key(request, gateway.api_keys)
    origin = request.headers.get("Origin")
    if origin is not None and origin not in gateway.config.server.cors_allowed_origins:
        raise APIError(403, f"Admin routes do not answer web pages (Origin {origin[:200]!r}); list the origin "
                            "in server.cors_allowed_origins to allow one.", code="cross_origin_admin")
    return gateway


async def list_engines(request: web.Request) -> web.Response:
    try:
        gateway = _admin(request)
    except APIError as error:
        return error.response()
    missing = gateway.monitor.models_missing if gateway.monitor is not None else {}
    data = [dict(state.to_dict(), inflight=gateway.registry.inflight.get(engine_id, 0),
                 models_not_served=missing.get(engine_id))
            for engine_id, state in sorted(gateway.registry.states.items())]
    return web.Response(body=orjson.dumps({"object": "list", "data": data}), content_type="application/json")


async def scheduling_state(request: web.Request) -> web.Response:
    try:
        gateway = _admin(request)
    except APIError as error:
        return error.response()
    return web.Response(body=orjson.dumps(gateway.scheduling.snapshot()), content_type="application/json")


async def predictor_state(request: web.Request) -> web.Response:
    try:
        gateway = _admin(request)
    except APIError as error:
        return error.response()
    return web.Response(body=orjson.dumps(gateway.scheduling.predictor.status()), content_type="application/json")


async def refit_predictor(request: web.Request) -> web.Response:
    """Start a refit now (the model swaps when it is done; ``GET /admin/predictor`` says how it went)."""
    try:
        gateway = _admin(request)
        if not gateway.scheduling.predictor.refit_now():
            raise APIError(409, "Online learning is off; set predictor.online.enabled in the gateway's config.",
                           code="online_learning_off")
    except APIError as error:
        return error.response()
    return web.Response(status=202, body=orjson.dumps(gateway.scheduling.predictor.status()),
                        content_type="application/json")


async def get_workflow(request: web.Request) -> web.Response:
    from gateway.state import StateUnavailable

    try:
        gateway = _admin(request)
        workflow_id = request.match_info["workflow_id"]
        try:
            record = await gateway.scheduling.workflows.get(workflow_id)
        except StateUnavailable as exc:
            raise APIError(503, f"The state store is unavailable: {exc}", SERVER_ERROR,
                           code="state_unavailable") from None
        if record is None:
            raise APIError(404, f"No workflow with id {workflow_id!r} (unknown or expired).", param="workflow_id",
                           code="workflow_not_found")
    except APIError as error:
        return error.response()
    return web.Response(body=orjson.dumps(record), content_type="application/json")


# vLLM's sleep modes: "abort" (its default) ends the requests in flight (finish_reason "abort"), "wait" lets them
# finish first (the call returns when they have, within the engine client's admin timeout)
SLEEP_MODES = ("abort", "wait")


async def _engine_action(request: web.Request, action: str) -> web.Response:
    try:
        gateway = _admin(request)
        engine_id = request.match_info["engine_id"]
        client = gateway.registry.clients.get(engine_id)
        if client is None:
            raise APIError(404, f"No engine with id {engine_id!r}.", param="engine_id", code="engine_not_found")
        if action == "sleep":
            level_text = request.query.get("level", "1")
            if level_text not in ("1", "2"):
                raise APIError(400, "'level' must be 1 or 2.", param="level")
            mode = request.query.get("mode", "abort")
            if mode not in SLEEP_MODES:
                raise APIError(400, f"'mode' must be one of {', '.join(SLEEP_MODES)}.", param="mode")
            # from here it takes no new request: a draining engine (mode=wait) is not one to send work to, and
            # vLLM-Omni's /health never says it sleeps (the client's held_asleep keeps the probes saying so)
            state = gateway.registry.states[engine_id]
            gateway.registry.states[engine_id] = replace(state, sleeping=True)
            result = await client.sleep(int(level_text), mode)
        else:
            result = await client.wake_up()
    except APIError as error:
        return error.response()
    except EngineTimedOut as exc:
        drain = (" With mode=wait it sleeps once its requests have finished, which took longer: it may still "
                 "go to sleep (it takes no new requests meanwhile); GET /admin/engines shows its state."
                 if action == "sleep" else "")
        await gateway.monitor.probe_now(engine_id)
        return error_response(504, f"Engine {engine_id}: {action} did not finish in time: {exc}.{drain}",
                              SERVER_ERROR, code="engine_admin_timeout")
    except EngineUnreachable as exc:
        await gateway.monitor.probe_now(engine_id)  # a refused sleep: it takes requests again
        return error_response(502, f"Engine {engine_id} refused {action}: {exc}", SERVER_ERROR,
                              code="engine_admin_failed")
    await gateway.monitor.probe_now(engine_id)
    return web.Response(body=orjson.dumps({"engine_id": engine_id, "result": result}),
                        content_type="application/json")


async def _stop_answers(request: web.Request, action: str) -> web.Response:
    """An engine action, which waits on its engine (up to ``timeouts.admin_s``, 30 s by default), as the gateway's
    stop treats a request in flight: waited for during its grace, then ended with a 503 its caller reads, not a
    connection cut without a word when the server closes."""
    gateway = request.app[GATEWAY_KEY]
    if gateway.draining:  # as a new request gets: a sleep (mode=abort) would also end the requests being drained
        try:
            _admin(request)
        except APIError as error:
            return error.response()
        return error_response(503, "The gateway is shutting down; retry on a running one.", SERVER_ERROR,
                              code="gateway_shutting_down", headers={"Retry-After": "1"})
    task = asyncio.current_task()
    gateway.admin_calls.add(task)
    try:
        return await _engine_action(request, action)
    except asyncio.CancelledError:
        if not gateway.cutting:
            raise  # the caller left
        task.uncancel()  # type: ignore[union-attr]
        return error_response(503, f"The gateway shut down before it could answer this {action} call; GET "
                                   "/admin/engines on a running gateway shows the engine's state.", SERVER_ERROR,
                              code="gateway_shutting_down", headers={"Retry-After": "1"})
    finally:
        gateway.admin_calls.discard(task)


async def sleep_engine(request: web.Request) -> web.Response:
    return await _stop_answers(request, "sleep")


async def wake_engine(request: web.Request) -> web.Response:
    return await _stop_answers(request, "wake_up")


async def not_found(request: web.Request) -> web.Response:
    # counted under one fixed route label (a label per path would be a series per scanner's guess): a client
    # calling a wrong path or method shows in the request metrics, not only in its own errors
    request.app[GATEWAY_KEY].metrics.unknown_route()
    # the path as sent (still quoted), as the router matched it: "/v1/chat%2Fcompletions" is not a route served,
    # though its decoded form would name one
    return error_response(404, f"Unknown route {request.method} {request.rel_url.raw_path[:200]}.",
                          code="unknown_route")


def add_admin_routes(app: web.Application) -> None:
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/admin/engines", list_engines)
    app.router.add_get("/admin/scheduling", scheduling_state)
    app.router.add_get("/admin/workflows/{workflow_id}", get_workflow)
    app.router.add_get("/admin/predictor", predictor_state)
    app.router.add_post("/admin/predictor/refit", refit_predictor)
    app.router.add_post("/admin/engines/{engine_id:.+}/sleep", sleep_engine)
    app.router.add_post("/admin/engines/{engine_id:.+}/wake_up", wake_engine)
