"""OpenAI-compatible routes: chat/completions, completions, models, images/generations.

Each handler parses and validates the body, builds a :class:`~gateway.proxy.RelayJob` and hands it to the
proxy. Everything the handlers share (request id, auth, size limit, queue limit, error shaping, metrics) lives
in :func:`openai_endpoint` so the handlers stay a few lines each.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import TYPE_CHECKING

import orjson
from aiohttp import web
from multidict import istr

from gateway.api.errors import RATE_LIMIT, SERVER_ERROR, APIError, model_not_found
from gateway.api.validation import (json_with, parse_json_object, rewrite_json, validate_chat, validate_completion,
                                    validate_image)
from gateway.api.workflow import HEADER_NAMES as _CONTEXT_HEADERS
from gateway.api.workflow import parse_workflow_context
from gateway.proxy import RelayJob

if TYPE_CHECKING:
    from gateway.app import Gateway

GATEWAY_KEY: web.AppKey["Gateway"] = web.AppKey("gateway")
# Set on a request once its response's status line is on the wire (aiohttp's on_response_prepare): after that
# an error can no longer become an error response, only a dropped connection.
_RESPONSE_STARTED: web.RequestKey[bool] = web.RequestKey("response_started", bool)
# The request's model once the gateway knows it serves it: the label of the request's metrics, errors included.
# (Not the name a client sent for a model that is not served: every such name would become a series of its own.)
_MODEL_LABEL: web.RequestKey[str] = web.RequestKey("model_label", str)
# perf_counter() when the request arrived, before its body was read (a stream's time to first byte counts from it).
_ARRIVED: web.RequestKey[float] = web.RequestKey("arrived", float)
# perf_counter() once the request's body was read: the start of the gateway's own time (its overhead figure).
_BODY_READ: web.RequestKey[float] = web.RequestKey("body_read", float)
# The scope of the API key the request came with (its workflow ids are kept apart from other keys').
_KEY_SCOPE: web.RequestKey[str] = web.RequestKey("key_scope", str)
log = logging.getLogger(__name__)
_REQUEST_ID_OK = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
# The endpoints that serve each engine kind, named in a 404 for a model sent to the other kind's endpoint.
_ENDPOINTS_OF_KIND = {"vllm": "/v1/chat/completions or /v1/completions", "vllm-omni": "/v1/images/generations"}

BODY_READ_TIMEOUT_S = 30.0  # the longest a request's body may take to arrive
CLIENT_CLOSED = 499  # the request metrics' status for a client that left before its answer ended (nginx's code)
SHUTDOWN_CUT = 503  # ...and for a stream the gateway's stop ended (with an error event: gateway_shutting_down)

Handler = Callable[[web.Request, "Gateway", str], Awaitable[tuple[web.StreamResponse, str, RelayJob | None]]]


def request_id_of(request: web.Request) -> str:
    """The client's ``X-Request-Id`` when it is a sane token, else a fresh one."""
    given = request.headers.get("X-Request-Id")
    if given and _REQUEST_ID_OK.fullmatch(given):
        return given
    return uuid.uuid4().hex


def engine_request_id(request: web.Request, request_id: str, body_request_id: object = None) -> str:
    """The ``X-Request-Id`` the engine gets: unique to this request, with the client's id readable in it.

    vLLM takes the header as its own request id (``chatcmpl-<id>``), and two requests under one id at once
    collide there: one vLLM refuses the second as "already running", another aborts both by it. A client's id
    may repeat (one client that reuses it, two clients, or two API keys, that pick the same), so it gets a random
    suffix, as in :func:`gateway.scheduling.scheduling_key`; the gateway's own ids are fresh UUIDs already.
    Without the header, vLLM takes the body's ``request_id`` (its own field), which the engine would no longer
    see behind the gateway's header: a sane one is sent the same way, so that the answer's id still holds it."""
    if request_id == request.headers.get("X-Request-Id"):
        return f"{request_id}~{secrets.token_hex(6)}"
    if isinstance(body_request_id, str) and _REQUEST_ID_OK.fullmatch(body_request_id):
        return f"{body_request_id}~{secrets.token_hex(6)}"
    return request_id


def check_api_key(request: web.Request, keys: tuple[bytes, ...]) -> int | None:
    """The index of the key the request carries (None when the gateway has no keys); 401 otherwise."""
    if not keys:
        return None
    header = request.headers.get("Authorization", "")
    if not header:
        raise APIError(401, "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.",
                       code="missing_api_key")  # OpenAI's type for both 401s: invalid_request_error
    scheme, _, key = header.partition(" ")
    # compared in constant time, against every key: a set lookup's time depends on the key's hash and contents
    given = key.strip().encode("utf-8", "surrogateescape")  # header bytes that are no UTF-8 come as surrogates
    matches = [hmac.compare_digest(given, k) for k in keys]
    if scheme.lower() != "bearer" or not any(matches):
        raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")
    return matches.index(True)


def check_json_media_type(request: web.Request) -> None:
    """Refuse a body that is not declared ``application/json``, as vLLM does (``validate_json_request``, 400)
    before it reads the body (a space before the parameters, which vLLM refuses, is let through: the engine gets
    the gateway's own Content-Type). Beyond vLLM's answer it keeps the CORS origin list whole: a browser sends a
    page's ``text/plain`` or form POST to any origin without asking first, and the gateway would have run it."""
    declared = request.headers.get("Content-Type", "")
    if declared.split(";", 1)[0].strip().lower() != "application/json":
        got = f"Content-Type {declared[:100]!r}" if declared else "no Content-Type"
        raise APIError(400, f"Unsupported Media Type: only 'application/json' is allowed (the request has {got}).",
                       code="unsupported_media_type")


_UTF8_BOM = b"\xef\xbb\xbf"


async def read_body(request: web.Request, limit: int) -> bytes:
    """The body, within ``limit`` bytes and ``BODY_READ_TIMEOUT_S``: the request holds one of the gateway's
    ``max_inflight`` places while it is read, and a client that sends its headers and then goes quiet would
    hold it for good (a few thousand such connections answered every other client 429)."""
    check_json_media_type(request)
    if request.content_length is not None and request.content_length > limit:
        raise APIError(413, f"The request body is {request.content_length} bytes; the limit is {limit}.",
                       code="request_too_large")
    try:
        async with asyncio.timeout(BODY_READ_TIMEOUT_S):
            body = await request.read()
        request[_BODY_READ] = time.perf_counter()  # the gateway's own time (its overhead figure) starts here
        if body.startswith(_UTF8_BOM):  # JSON's RFC lets a reader ignore one, as vLLM's does; orjson refuses it
            body = body[len(_UTF8_BOM):]
        return body
    except TimeoutError:
        raise APIError(408, f"The request body did not arrive within {BODY_READ_TIMEOUT_S:g} s.",
                       code="request_timeout", close_connection=True) from None
    except web.HTTPRequestEntityTooLarge:
        raise APIError(413, f"The request body is larger than the limit of {limit} bytes.",
                       code="request_too_large") from None
    except web.RequestPayloadError as exc:  # a Content-Encoding the body is not in, or a broken chunked body
        raise APIError(400, f"The request body could not be read: {exc}.", code="invalid_request_body",
                       close_connection=True) from None


def forwarded_headers(request: web.Request, request_id: str, forward: tuple[str, ...],
                      body_request_id: object = None) -> dict[str, str]:
    """The headers of the engine's request: built here, with only the ``forward`` ones (``server.forward_headers``)
    taken from the client's. vLLM acts on headers a client must not set (``X-data-parallel-rank`` picks its
    data-parallel rank, ``X-Request-Id`` its request id, ``X-Forwarded-*`` what uvicorn believes of the
    connection), and a client's other headers (its SDK's, its own keys and tokens) are none of the engine's."""
    headers = {"Content-Type": "application/json",
               "X-Request-Id": engine_request_id(request, request_id, body_request_id)}
    client = request.headers
    connection = client.get("Connection")
    hop_by_hop = {token.strip().lower() for token in connection.split(",")} if connection else ()
    for name in forward:
        values = client.getall(name, None)
        if values is not None and name.lower() not in hop_by_hop:
            # several lines of a list-valued header (tracestate) are one list (RFC 9110 5.3)
            headers[name] = values[0] if len(values) == 1 else ", ".join(values)
    return headers


def openai_endpoint(route: str, handler: Handler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """Wrap a handler with what every OpenAI route shares, and record the request's metrics."""

    async def endpoint(request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        gateway = request.app[GATEWAY_KEY]
        request_id = request_id_of(request)
        model = "-"
        job: RelayJob | None = None
        admitted = False
        task = asyncio.current_task()
        try:
            key_index = check_api_key(request, gateway.api_keys)
            if key_index is not None:
                request[_KEY_SCOPE] = gateway.api_key_scopes[key_index]
            if gateway.draining:
                raise APIError(503, "The gateway is shutting down; retry shortly.", SERVER_ERROR,
                               code="gateway_shutting_down", headers={"Retry-After": "1"})
            if gateway.inflight >= gateway.config.server.max_inflight:
                raise APIError(429, "The gateway's queue is full; retry shortly.", RATE_LIMIT,
                               code="queue_full", headers={"Retry-After": "1"})
            gateway.handlers.add(task)  # type: ignore[arg-type]
            admitted = True
            request[_ARRIVED] = started
            response, model, job = await handler(request, gateway, request_id)
        except APIError as error:
            model = request.get(_MODEL_LABEL, model)
            response = error.response(request_id)
        except asyncio.CancelledError:
            # a client that left, or a stream that already ended with the shutdown's error event: nothing to send
            # (during the stop's grace a cancel is still the client's: only its end cuts requests)
            if not gateway.cutting or request.get(_RESPONSE_STARTED):
                # counted as nginx does (499: the client closed the connection), or abandoned traffic (a client's
                # own timeout, a user who gave up) would be invisible in the request metrics; a stream the
                # gateway's stop cut (it ended with the shutdown's error event) as the 503 the others get
                status = SHUTDOWN_CUT if gateway.cutting else CLIENT_CLOSED
                gateway.metrics.request_done(route, request.get(_MODEL_LABEL, model), status,
                                             time.perf_counter() - started, -1.0)
                raise
            task.uncancel()  # type: ignore[union-attr]  # the gateway's stop cut it: the client is still there
            model = request.get(_MODEL_LABEL, model)
            response = APIError(503, "The gateway shut down before this request finished; retry it.", SERVER_ERROR,
                                code="gateway_shutting_down", headers={"Retry-After": "1"}).response(request_id)
        except Exception:  # a bug of ours: the client still gets OpenAI's shape, and the traceback goes to the log
            log.exception("%s request %s failed inside the gateway", route, request_id)
            model = request.get(_MODEL_LABEL, model)
            if request.get(_RESPONSE_STARTED):
                gateway.metrics.request_done(route, model, 500, time.perf_counter() - started, -1.0)
                raise  # mid-stream: aiohttp closes the connection, the only signal left
            response = APIError(500, f"The gateway failed on this request (request id {request_id}); the error "
                                     "is in its log.", SERVER_ERROR, code="internal_error").response(request_id)
        finally:
            if admitted:
                gateway.handlers.discard(task)  # type: ignore[arg-type]
        ended = time.perf_counter()
        duration = ended - started
        if job is not None and job.trace_body is not None and job.usage and response.status == 200 \
                and not job.incomplete:  # an answer the engine cut short is no output length to learn
            gateway.scheduling.predictor.record(job.trace_body, job.usage, request.headers, len(job.body))
        # the gateway's own time: from the body read (the client's upload is not ours) to the end, less the
        # engine's answer and the wait in the scheduler's queue
        overhead = ended - request.get(_BODY_READ, job.started) - job.upstream_s - job.queued_s \
            if job is not None and job.upstream_s >= 0 else -1.0
        # a stream the gateway cut after its 200 counts as what it would have answered before it (502, 504, 499)
        status = job.status if job is not None and job.status else response.status
        gateway.metrics.request_done(route, model, status, duration, overhead)
        return response

    return endpoint


def _not_served(gateway: "Gateway", model: str, kind: str) -> APIError:
    """404 for a model this endpoint's engine ``kind`` does not serve, naming the endpoint that does if any."""
    served_by = next((endpoint for other, endpoint in _ENDPOINTS_OF_KIND.items()
                      if other != kind and gateway.registry.serves(model, other)), None)
    return model_not_found(model, served_by)


def _model_config_len(gateway: "Gateway", model: str) -> int:
    model_config = gateway.config.model(model)
    return model_config.max_model_len if model_config else None  # type: ignore[return-value]


async def _text_generation(request: web.Request, gateway: "Gateway", request_id: str, *, route: str, path: str,
                           validate: Callable) -> tuple[web.StreamResponse, str, RelayJob]:
    raw = await read_body(request, gateway.config.server.max_body_bytes)
    body = parse_json_object(raw)
    model = body.get("model")
    if isinstance(model, str) and model:
        if not gateway.registry.serves(model, "vllm"):
            raise _not_served(gateway, model, "vllm")
        request[_MODEL_LABEL] = model
    validate(body, _model_config_len(gateway, model) if isinstance(model, str) else None)
    scheduling = gateway.scheduling
    context = None
    if "metadata" in body or _has_context_header(request.headers):
        context = parse_workflow_context(request.headers, body, scheduling.slo_names)
        scope = request.get(_KEY_SCOPE)
        if scope is not None and context is not None and context.workflow_id is not None:
            # one key's "wf-1" is not another's: ids are kept per key, as <scope>~<id> ("~" is no id character)
            context = replace(context, workflow_id=f"{scope}~{context.workflow_id}")
    # online learning records the body as the client sent it: a shallow copy taken before the gateway adds
    # stream_options here or an engine priority while scheduling (both replace top-level keys)
    trace_body = dict(body) if route == "chat" and scheduling.predictor.learner is not None else None
    stream = bool(body.get("stream"))
    strip_usage = False
    if stream:
        options = body.get("stream_options") or {}
        # OpenAI and vLLM (0.32: include_usage defaults to false) send usage only for include_usage: true, and
        # vLLM its running usage on every chunk (continuous_usage_stats) only with it
        if not options.get("include_usage"):
            strip_usage = True
            options = {**options, "include_usage": True}
            if options.get("continuous_usage_stats"):  # not asked for with include_usage off: keep it off
                options["continuous_usage_stats"] = False
            raw = json_with(raw, body, "stream_options", options)
    job = RelayJob(route=route, path=path, kind="vllm", model=model, body=raw, stream=stream,
                   strip_usage=strip_usage, request_id=request_id,
                   headers=forwarded_headers(request, request_id, gateway.forward_headers, body.get("request_id")),
                   started=time.perf_counter(), arrived=request.get(_ARRIVED, 0.0), trace_body=trace_body)
    if context is None and model in scheduling.direct_models:
        return await gateway.proxy.serve(request, job), model, job  # nothing to schedule: route as it comes
    return await scheduling.serve(request, job, body, context), model, job


_CONTEXT_HEADER_KEYS = tuple(istr(name) for name in _CONTEXT_HEADERS)  # istr: no case-folding per lookup


def _has_context_header(headers) -> bool:
    for name in _CONTEXT_HEADER_KEYS:
        if name in headers:
            return True
    return False


async def chat_completions(request: web.Request, gateway: "Gateway", request_id: str):
    return await _text_generation(request, gateway, request_id, route="chat", path="/v1/chat/completions",
                                  validate=validate_chat)


async def completions(request: web.Request, gateway: "Gateway", request_id: str):
    return await _text_generation(request, gateway, request_id, route="completions", path="/v1/completions",
                                  validate=validate_completion)


async def image_generations(request: web.Request, gateway: "Gateway", request_id: str):
    """Image requests hold at most ``server.max_inflight_images`` of the gateway's places: one holds its place
    for a whole generation, at engines that work through one request at a time, and a backlog of them had
    answered every chat request 429 (16 images waiting at one engine filled a gateway of 16 places)."""
    limit = gateway.config.server.image_inflight_limit
    if gateway.images_inflight >= limit:
        raise APIError(429, f"The gateway holds as many image requests as it takes at once ({limit}); retry "
                            "shortly.", RATE_LIMIT, code="queue_full", headers={"Retry-After": "1"})
    gateway.images_inflight += 1
    try:
        return await _image_generation(request, gateway, request_id)
    finally:
        gateway.images_inflight -= 1


async def _image_generation(request: web.Request, gateway: "Gateway", request_id: str):
    raw = await read_body(request, gateway.config.server.max_body_bytes)
    body = parse_json_object(raw)
    validate_image(body)
    rewrite = False
    if None in body.values() or body.get("size") == "auto":
        # OpenAI reads a null field as its default (the SDK sends null for a parameter passed as None), and size
        # "auto" as the model's choice; vLLM-Omni's request model types `n` and others as plain values and
        # parses `size` as WIDTHxHEIGHT: both are left out, for the engine's defaults
        body = {key: value for key, value in body.items()
                if value is not None and not (key == "size" and value == "auto")}
        rewrite = True
    model = body.get("model")
    dit_models = gateway.registry.models("vllm-omni")
    if model is None and len(dit_models) == 1:
        model = body["model"] = dit_models[0]  # OpenAI's model field is optional; one DiT model is unambiguous
        rewrite = True
    if rewrite:
        raw = rewrite_json(raw, body)
    if model is None:
        served = (f"this gateway serves several image models: {', '.join(dit_models)}" if dit_models
                  else "this gateway serves no image model")
        raise APIError(400, f"'model' is required ({served}).", param="model")
    if not isinstance(model, str) or not model:
        raise APIError(400, "'model' must be a non-empty string.", param="model")
    if not gateway.registry.serves(model, "vllm-omni"):
        raise _not_served(gateway, model, "vllm-omni")
    request[_MODEL_LABEL] = model
    job = RelayJob(route="images", path="/v1/images/generations", kind="vllm-omni", model=model, body=raw,
                   stream=False, strip_usage=False, request_id=request_id,
                   headers=forwarded_headers(request, request_id, gateway.forward_headers), started=time.perf_counter(),
                   arrived=request.get(_ARRIVED, 0.0))
    return await gateway.proxy.serve(request, job), model, job


def _model_object(gateway: "Gateway", name: str) -> dict:
    """OpenAI's model object, with vLLM's ``max_model_len`` where the config declares the model's context (clients
    written for vLLM read it to size their prompts; the SDK keeps it as an extra field)."""
    card: dict = {"id": name, "object": "model", "created": int(gateway.started_at), "owned_by": "maestro"}
    context = _model_config_len(gateway, name)
    if context:
        card["max_model_len"] = context
    return card


async def list_models(request: web.Request, gateway: "Gateway", request_id: str):
    data = [_model_object(gateway, name) for name in gateway.registry.models()]
    response = web.Response(body=orjson.dumps({"object": "list", "data": data}), content_type="application/json",
                            headers={"X-Request-Id": request_id})
    return response, "-", None


async def retrieve_model(request: web.Request, gateway: "Gateway", request_id: str):
    """``GET /v1/models/{model}`` (the SDK's ``models.retrieve``): the model's object, or 404 model_not_found.
    Model names may hold slashes (``meta-llama/Llama-3.1-8B``): the route takes the rest of the path."""
    name = request.match_info["model"]
    if name not in gateway.registry.models():
        raise model_not_found(name)
    response = web.Response(body=orjson.dumps(_model_object(gateway, name)), content_type="application/json",
                            headers={"X-Request-Id": request_id})
    return response, name, None


async def _mark_response_started(request: web.Request, response: web.StreamResponse) -> None:
    request[_RESPONSE_STARTED] = True
    response.headers["Server"] = "maestro"  # not aiohttp's default, which names its and Python's versions


def add_openai_routes(app: web.Application) -> None:
    app.on_response_prepare.append(_mark_response_started)
    app.router.add_post("/v1/chat/completions", openai_endpoint("chat", chat_completions))
    app.router.add_post("/v1/completions", openai_endpoint("completions", completions))
    app.router.add_post("/v1/images/generations", openai_endpoint("images", image_generations))
    app.router.add_get("/v1/models", openai_endpoint("models", list_models))
    app.router.add_get("/v1/models/{model:.+}", openai_endpoint("models", retrieve_model))
