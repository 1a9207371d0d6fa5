"""CORS, as vLLM's OpenAI server answers it (``--allowed-origins``, every origin by default), so that a browser
application (``openai-node`` with ``dangerouslyAllowBrowser``) that works against vLLM works through the gateway.

Preflights (``OPTIONS`` with ``Access-Control-Request-Method``) are answered here, before authentication: a
browser sends no ``Authorization`` header on them. Every other response from an allowed origin carries
``Access-Control-Allow-Origin``, added as its headers are sent (``on_response_prepare``), so streamed answers
get it too. No credentials are allowed (an API key is a bearer header, not a cookie), as in vLLM's default.
"""

from __future__ import annotations

from aiohttp import web

from gateway.api.admin_routes import not_found
from gateway.api.errors import error_response

PREFLIGHT_MAX_AGE_S = 600  # how long a browser may reuse a preflight's answer
ALLOWED_METHODS = "GET, POST, OPTIONS"


def add_cors(app: web.Application, allowed_origins: tuple[str, ...]) -> None:
    """Answer preflights and mark responses for ``allowed_origins`` ("*": any); nothing when it is empty. Call it
    before the catch-all route, which would answer the preflights 404."""
    if not allowed_origins:
        return
    any_origin = "*" in allowed_origins
    allowed = frozenset(allowed_origins)

    def allow_origin(request: web.BaseRequest) -> str | None:
        origin = request.headers.get("Origin")
        if origin is None:
            return None
        return "*" if any_origin else (origin if origin in allowed else None)

    async def preflight(request: web.Request) -> web.Response:
        if "Origin" not in request.headers or "Access-Control-Request-Method" not in request.headers:
            return await not_found(request)  # not a preflight: as before, an unknown route
        origin = allow_origin(request)
        if origin is None:  # as Starlette's CORSMiddleware (vLLM's) answers one
            return error_response(400, f"Disallowed CORS origin {request.headers['Origin']!r}.",
                                  code="cors_origin_not_allowed")
        headers = {"Access-Control-Allow-Origin": origin, "Access-Control-Allow-Methods": ALLOWED_METHODS,
                   "Access-Control-Max-Age": str(PREFLIGHT_MAX_AGE_S)}
        asked = request.headers.get("Access-Control-Request-Headers")
        if asked:  # any header (the SDK's x-stainless-*, a workflow's X-Workflow-Id), as vLLM allows
            headers["Access-Control-Allow-Headers"] = asked
        if not any_origin:
            headers["Vary"] = "Origin"
        return web.Response(status=204, headers=headers)

    async def mark(request: web.BaseRequest, response: web.StreamResponse) -> None:
        if request.method == "OPTIONS":
            return
        if request.path.startswith("/admin/"):  # only origins listed by name (see admin_routes._admin)
            named = request.headers.get("Origin")
            origin = named if named is not None and named in allowed else None
        else:
            origin = allow_origin(request)
        if origin is not None:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Expose-Headers"] = "X-Request-Id, Retry-After"
            if origin != "*":
                response.headers["Vary"] = "Origin"

    app.router.add_route("OPTIONS", "/{tail:.*}", preflight)
    app.on_response_prepare.append(mark)
