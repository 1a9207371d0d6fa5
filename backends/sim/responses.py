"""What a simulated engine answers that is no generation, in vLLM 0.32's shapes (shared by the LLM and DiT servers).

JSON answers as FastAPI writes them; error bodies through vLLM's ``sanitize_message``; pydantic's
RequestValidationError (``"N validation errors:"`` and the errors' dicts, ``param`` the first one's ``loc``), also
for a body that is no JSON or no object; vLLM's 400 for a body not declared JSON; FastAPI's own bodies for unknown
routes and wrong methods; a :class:`Refusal` (what vLLM refuses outside pydantic's field errors) as its 400 or 500;
and a failure inside the engine, which a stream has already answered 200 to, as the stream's one error event.
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable

import orjson
from aiohttp import web

from backends.sim.request_fields import Refusal


# vLLM 0.32's QueueOverflowError and MaxQueuedTokensError, by the rejection reason (EngineBusy.reason)
BUSY_MESSAGES = {"max_num_queued_reqs": "The engine is currently busy and cannot accept new requests. Please try "
                                        "again later or on a different instance.",
                 "max_num_queued_tokens": "The engine has reached its prefill token backlog limit. Please try again "
                                          "later or on a different instance."}

# vLLM's sanitize_message (serve/exception_handling/utils.py), which every error message it sends goes through:
# memory addresses, traceback lines and file paths are taken out (a request's own text among them)
_SANITIZERS = ((re.compile(r" at 0x[0-9a-fA-F]+>"), ">"),
               (re.compile(r'\n?\s*File "[^"]+", line \d+, in \S+(\n\s+.*)?'), ""),
               (re.compile(r"/(?:home|usr|opt|var|tmp|root|lib|mnt|srv)(?:/[\w.\-]+)+"), "<path>"),
               (re.compile(r"(?:/[\w\-]+)+/[\w\-]+\.\w+"), "<path>"))


def sanitized(message: str) -> str:
    """An error message as vLLM sends it (its ``sanitize_message``)."""
    if "/" in message or " at 0x" in message or "File " in message:
        for pattern, replacement in _SANITIZERS:
            message = pattern.sub(replacement, message)
    return message.strip()


def utf8_failure(text: str) -> str | None:
    """Python's words for a text no UTF-8 can hold (a lone surrogate, JSON's ``"\\ud800"``), else None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return str(exc)
    return None


def answer_response(body: dict, status: int = 200) -> web.Response:
    """vLLM's JSON answer. One that holds a lone surrogate from the request (a forced tool call's name, an error
    message quoting the request) cannot be written as UTF-8: Starlette's encoding of it fails, and vLLM's
    ValueError handler answers 400 with that failure."""
    try:
        return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")
    except orjson.JSONEncodeError:  # str is not valid UTF-8; Starlette's JSONResponse.render, for the failure's words
        failure = utf8_failure(json.dumps(body, ensure_ascii=False, allow_nan=False, separators=(",", ":")))
        if failure is None:
            raise
        return bad_request(failure)


def error_response(message: str, err_type: str, status: int, param: str | None = None) -> web.Response:
    """vLLM's error answer (:func:`answer_response`)."""
    return answer_response({"error": {"message": sanitized(message), "type": err_type, "param": param,
                                       "code": status}}, status)


def bad_request(message: str, param: str | None = None) -> web.Response:
    return error_response(message, "BadRequestError", 400, param)


def validation_message(message: str, parameter: str | None, value: Any) -> str:
    """``str(VLLMValidationError)``: the message plus ``(parameter=..., value=...)``."""
    extras = []
    if parameter is not None:
        extras.append(f"parameter={parameter}")
    if value is not None:
        extras.append(f"value={value}")
    return f"{message} ({', '.join(extras)})" if extras else message


def _summarize_input(value: Any) -> str:
    if isinstance(value, (list, tuple, dict)):
        return f"<{type(value).__name__} of {len(value)} items>"
    text = str(value)
    return text if len(text) <= 200 else text[:200] + "...[truncated]"


def pydantic_error_response(errors: list[dict]) -> web.Response:
    """vLLM's RequestValidationError handler: 400, type "Bad Request", param = first error's loc."""
    count = len(errors)
    label = "error" if count == 1 else "errors"
    lines = [f"{count} validation {label}:"]
    for err in errors[:10]:
        shown = dict(err)
        if "input" in shown:
            shown["input"] = _summarize_input(shown["input"])
        text = str(shown)  # each error at most 1000 characters (a loc can hold an object's key)
        lines.append(f"  {text[:1000]}...[truncated]" if len(text) > 1000 else f"  {text}")
    if count > 10:
        lines.append(f"  ...and {count - 10} more {label}")
    return error_response("\n".join(lines), "Bad Request", 400, errors[0]["loc"] if errors else None)


MISSING = object()


def field_error(kind: str, loc: str, msg: str, value: Any) -> dict:
    err = {"type": kind, "loc": loc, "msg": msg}
    if value is not MISSING:
        err["input"] = value
    return err


def invalid_json_response(exc: json.JSONDecodeError) -> web.Response:
    """FastAPI's 400 for a body that is not JSON; one builder because the LLM and DiT servers both mimic it."""
    return pydantic_error_response([{"type": "json_invalid", "loc": "body." + str(exc.pos), "msg": "JSON decode error",
                                     "input": {}, "ctx": {"error": exc.msg}}])


def unsupported_media_type_response() -> web.Response:
    """vLLM's 400 for a body not declared JSON: a RequestValidationError whose one error is a plain string (so
    no ``param``)."""
    return error_response("1 validation error:\n  Unsupported Media Type: Only 'application/json' is allowed",
                          "Bad Request", 400)


def not_an_object_response(body: Any) -> web.Response:
    """Pydantic's 400 for a JSON body that is not an object (shared with the DiT server, like
    :func:`invalid_json_response`)."""
    return pydantic_error_response([field_error("model_attributes_type", "body", "Input should be a valid dictionary "
                                                "or object to extract fields from", body)])


def busy_response(reason: str) -> web.Response:
    return error_response(BUSY_MESSAGES[reason], "Service Unavailable", 503)


def engine_failure(*, stream: bool) -> web.Response:
    """vLLM's EngineGenerateError (its engine client failed on the request, which has no message of its own): a
    500; a stream has already answered 200 and carries it as its one event."""
    if not stream:
        return error_response("", "InternalServerError", 500)
    return stream_error("", "InternalServerError", 500, None)


def engine_refusal(message: str, param: str | None, *, stream: bool) -> web.Response:
    """A failure in vLLM's engine surfaces where the serving layer first reads the engine's output: a whole
    answer is a 400, a stream has already answered 200 and carries the error as its one event, then [DONE]
    (``create_streaming_error_response``: ``json.dumps``, hence the spaces)."""
    if not stream:
        return bad_request(message, param)
    return stream_error(message, "BadRequestError", 400, param)


def stream_error(message: str, err_type: str, code: int, param: str | None) -> web.Response:
    """A stream that has answered 200 and then fails: the error as its one event, then [DONE]."""
    event = json.dumps({"error": {"message": sanitized(message), "type": err_type, "param": param, "code": code}})
    return web.Response(body=f"data: {event}\n\ndata: [DONE]\n\n".encode(),
                        headers={"Content-Type": "text/event-stream; charset=utf-8"})


def refused_by(check: Callable[..., None], *args: Any) -> web.Response | None:
    """vLLM's answer to what ``check`` refuses (:class:`Refusal`), None where it passes."""
    try:
        check(*args)
    except Refusal as refusal:
        return refusal_response(refusal)
    return None


def refusal_response(refusal: Refusal) -> web.Response:
    """vLLM's answer to a :class:`Refusal` (what it refuses outside pydantic's field errors): a 400, or the 500 of
    its own code's failure."""
    if refusal.status == 500:
        return error_response(refusal.message, "InternalServerError", 500)
    return bad_request(validation_message(refusal.message, refusal.param, refusal.value), refusal.param)


def json_answer(obj: Any) -> web.Response:
    """A 200 JSON answer as FastAPI's JSONResponse writes it: compact, ``Content-Type: application/json`` (no
    charset parameter, which aiohttp's json_response adds)."""
    return web.Response(body=orjson.dumps(obj), content_type="application/json")


@web.middleware
async def json_not_found(request: web.Request, handler):
    """FastAPI's bodies for unknown routes and wrong methods."""
    try:
        return await handler(request)
    except web.HTTPNotFound:
        return web.Response(body=b'{"detail":"Not Found"}', status=404, content_type="application/json")
    except web.HTTPMethodNotAllowed:
        return web.Response(body=b'{"detail":"Method Not Allowed"}', status=405, content_type="application/json")
