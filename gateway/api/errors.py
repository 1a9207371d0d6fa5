"""OpenAI-shaped error responses: ``{"error": {"message", "type", "param", "code"}}``.

The official ``openai`` SDK maps the HTTP status to an exception class (400 BadRequestError, 401
AuthenticationError, 404 NotFoundError, 413/4xx APIStatusError, 429 RateLimitError, 5xx InternalServerError)
and reads ``error.message``, so both the status and this shape matter.
"""

from __future__ import annotations

import orjson
from aiohttp import web

INVALID_REQUEST = "invalid_request_error"
RATE_LIMIT = "rate_limit_error"
SERVER_ERROR = "server_error"


class APIError(Exception):
    """Raised anywhere in request handling; the middleware turns it into an OpenAI-shaped response."""

    def __init__(self, status: int, message: str, error_type: str = INVALID_REQUEST, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None,
                 close_connection: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type
        self.param = param
        self.code = code
        self.headers = headers or {}
        # where the request's body was not read to its end (it stalled, or could not be decoded), what is left of
        # it on the connection is no next request: the answer says "Connection: close" and the connection ends
        self.close_connection = close_connection

    def response(self, request_id: str | None = None) -> web.Response:
        response = error_response(self.status, self.message, self.error_type, self.param, self.code,
                                  headers=self.headers, request_id=request_id)
        if self.close_connection:
            response.force_close()
        return response


def error_body(message: str, error_type: str, param: str | None = None, code: str | None = None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": error_type, "param": param, "code": code}})


def error_response(status: int, message: str, error_type: str = INVALID_REQUEST, param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None,
                   request_id: str | None = None) -> web.Response:
    response = web.Response(status=status, body=error_body(message, error_type, param, code),
                            content_type="application/json", headers=headers)
    if request_id:
        response.headers["X-Request-Id"] = request_id
    return response


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, INVALID_REQUEST, param, code)


MODEL_ECHO_CHARS = 200  # of an unknown model's name, echoed in the 404


def model_not_found(model: str, served_by: str | None = None) -> APIError:
    """404 for a model this endpoint cannot serve; ``served_by`` names the endpoint that does serve it, if any
    (an image model sent to chat, a text model sent to images), so the caller learns what to change."""
    if len(model) > MODEL_ECHO_CHARS:  # the client's own string: an answer need not grow with it
        model = model[:MODEL_ECHO_CHARS] + "..."
    if served_by:
        message = f"The model `{model}` is not served by this endpoint; use {served_by}."
    else:
        message = f"The model `{model}` does not exist or is not served by this gateway."
    return APIError(404, message, INVALID_REQUEST, "model", "model_not_found")
