"""Relay one request to an engine: pick, send, retry before the first byte, relay bytes, account.

Retry rule (why it is safe): a request is tried on another engine only when nothing has reached the client
yet and the engine either could not be reached (connect failure, connection dropped before any answer) or
refused with 503 (vLLM's back-pressure: queue full or paused; when vLLM refuses at add_request, the 503 comes
as the first event of a 200 stream, so a stream's first event is read before the client's response starts), or
failed in that first event (a 5xx error event: nothing was generated). A 4xx first event is answered with its
status, as vLLM would have answered before streaming. An answer that is no valid HTTP is not retried: the engine
had the request. Once a byte is relayed, a failure ends the stream with an OpenAI-style error event, never a
silent retry that would duplicate text.

Streams: the gateway always asks the engine for ``stream_options.include_usage`` (it needs the actual token
counts) and removes the usage-only chunk again when the client did not ask for it, so the client sees what
OpenAI would send (with the usage chunk's ``system_fingerprint`` moved to the answers' last chunks, where vLLM
puts it then). Events are relayed as the engine's bytes, never re-encoded.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from gateway import sse
from gateway.api.errors import SERVER_ERROR, APIError, error_body
from gateway.config import Config
from gateway.metrics import GatewayMetrics
from gateway.registry import EngineRegistry
from gateway.state.base import MAX_EXACT_INTEGER

# ConnectionTimeoutError (sock_connect passed) is a TimeoutError but no ClientConnectorError: named here, or it
# would be taken for an engine that is too slow to answer (a 504) instead of one that could not be reached
_RETRYABLE_CONNECT_ERRORS = (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError,
                             aiohttp.ClientOSError, aiohttp.ConnectionTimeoutError)
log = logging.getLogger(__name__)

# X-Accel-Buffering: an nginx in front of the gateway would otherwise hold a stream's events back in its buffer.
# The media type is vLLM's (and OpenAI's), charset included.
_STREAM_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache",
                   "X-Accel-Buffering": "no"}
_DONE = b"data: [DONE]\n\n"
UNUSABLE_WARN_EVERY_S = 60.0  # an engine's unusable answers (a wrong key...) are logged at most this often
_WATCH_SLACK_S = 0.5  # a stream's watchdog is re-armed at most this often (a timer per event would cost more)
_ERROR_EVENT_WRITE_S = 5.0  # the longest a stream's closing error event may wait for the client to read


class _BodyStalled(Exception):
    """A whole answer's body stopped coming for ``stream_idle_s`` after its headers."""


class ClientStalled(Exception):
    """The client stopped reading a stream: its connection is dropped, and the engine's request with it."""


@dataclass(slots=True)
class RelayJob:
    """What the route handler decided; everything the proxy needs to serve one request."""

    route: str  # metric label, e.g. "chat"
    path: str  # upstream path, e.g. "/v1/chat/completions"
    kind: str  # engine kind: "vllm" or "vllm-omni"
    model: str
    body: bytes
    stream: bool
    strip_usage: bool
    request_id: str
    headers: dict[str, str]
    started: float  # perf_counter() once its body was read and checked (timeouts.total_s counts from here)
    upstream_s: float = -1.0  # time spent waiting on the engine (non-streaming), for the overhead metric
    arrived: float = 0.0  # perf_counter() when the request arrived, before its body (time to first byte)
    queued_s: float = 0.0  # time in the scheduler's queue before admission (not the gateway's own overhead)
    status: int = 0  # the request's outcome for the metrics when its stream was cut after its 200 (502, 504, 499)
    engine_id: str | None = None  # the engine the scheduler admitted it to (first attempt), None: route here
    pool_engines: frozenset[str] | None = None  # first attempt only among these (the pool cluster routing chose)
    ticket: Any = None  # gateway.scheduling.Ticket once admitted (moved on a retry, its KV grown while streaming)
    # the answer did not end as a whole one: a stream that broke or carried an error event, the client gone, or the
    # engine cut it (finish_reason "abort" when an engine is put to sleep, "error"): no finished step, no record
    incomplete: bool = False
    # a stream's end ([DONE]) went to the client: it has the whole answer, so a client that closes at once, before
    # the engine's connection ends (loadgen's and many SDKs' habit), is served (200, usage counted), not a 499
    answered: bool = False
    usage: dict[str, Any] | None = None  # the engine's usage once known
    trace_body: dict[str, Any] | None = None  # the client's own body, for online learning (None: not recorded)


def usage_tokens(usage: Any, key: str) -> int:
    """``usage[key]`` where it is a count of tokens (an int from 0 to ``MAX_EXACT_INTEGER``), else 0. The usage is
    the engine's: text, a negative number or a list there failed the request after its answer had come (a 500 for
    an answer the engine gave, or the step's end lost in the store), and a vast number went into the counters."""
    value = usage.get(key) if isinstance(usage, dict) else None
    if type(value) is int and 0 <= value <= MAX_EXACT_INTEGER:  # noqa: E721 - not bool, which is an int
        return value
    return 0


def _engine_message(data: bytes) -> str:
    """The ``error.message`` of an engine's error body, or a readable slice of it."""
    try:
        payload = orjson.loads(data)
        message = payload.get("error", {}).get("message") if isinstance(payload, dict) else None
        if isinstance(message, str):
            return message
        if isinstance(payload, dict) and isinstance(payload.get("detail"), str):
            return payload["detail"]
    except (orjson.JSONDecodeError, AttributeError):
        pass
    return data[:300].decode("utf-8", "replace") or "(empty body)"


def _unusable_answer(upstream: aiohttp.ClientResponse) -> tuple[str, str] | None:
    """(metric reason, problem) when an engine's answer is none the gateway can relay, whatever its body says.

    401 / 403: the engine wants credentials the gateway did not send (vLLM's ``--api-key``; the engine's
    ``api_key`` in the config). Relayed, they would tell the client its own key is wrong. A redirect: vLLM sends
    none, and following one would send the request and its headers wherever the answer points. A compressed
    body: the gateway asks for ``identity`` and relays bytes as they come, so gzip from a proxy in front of an
    engine would reach the client as a corrupt body, unlabelled."""
    status = upstream.status
    if not 200 <= status <= 599:  # 1xx as a final answer, or no HTTP status at all ("042", 999)
        return "status", f"answered HTTP {status}, which is no final answer to a request"
    if status in (401, 403):
        return "auth", (f"refused the gateway's credentials (HTTP {status}): set the engine's api_key in the "
                        "config to its vLLM --api-key")
    if 300 <= status < 400:
        return "redirect", f"answered a redirect (HTTP {status}), which the gateway does not follow"
    encoding = upstream.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        return "encoded", f"answered with Content-Encoding {encoding[:40]!r}; the gateway asks for identity"
    return None


_CONTROL_CHARACTERS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def _header_value(value: str | None) -> str | None:
    """An engine's header value the gateway can copy into its own answer, else None: one with a control character
    (which aiohttp refuses to write, as a header injection) failed the answer after it was counted 200, with a
    traceback and the client's connection dropped."""
    if value is None or _CONTROL_CHARACTERS.search(value):
        return None
    return value


def _total_timeout_message(engine_id: str, total_s: float) -> str:
    return (f"The request did not finish within timeouts.total_s ({total_s:g} s, time in the gateway's queue "
            f"included); engine {engine_id} was still working on it.")


class _Deadline:
    """A wait's deadline on the loop's clock: an idle limit from now, or what is left of the request's ``total_s``,
    whichever comes first. ``idle`` says which one is armed, so that a wait that fires is named by the limit it
    met (uvloop's timers fire up to a millisecond early: comparing the clock to the total's deadline afterwards
    named some ``total_s`` timeouts idle ones, with the wrong message and metric)."""

    __slots__ = ("at", "idle", "total_at")

    def __init__(self, idle_s: float, remaining_s: float) -> None:
        now = asyncio.get_running_loop().time()
        self.total_at = now + remaining_s
        self.at = self.arm(now, idle_s)

    def arm(self, now: float, idle_s: float) -> float:
        """The deadline ``idle_s`` after ``now``, or the total's where that comes first."""
        idle_at = now + idle_s
        self.idle = idle_at < self.total_at
        self.at = idle_at if self.idle else self.total_at
        return self.at


class Proxy:
    def __init__(self, config: Config, registry: EngineRegistry, metrics: GatewayMetrics) -> None:
        timeouts = config.timeouts
        self.registry = registry
        self.metrics = metrics
        self._warned_unusable: dict[tuple[str, str], float] = {}  # (engine, reason) -> when last logged
        self.max_retries = config.routing.max_retries
        self.total_timeout_s = timeouts.total_s
        self.stream_idle_s = timeouts.stream_idle_s
        self.connect_s = timeouts.connect_s
        self.shutting_down = False  # set by the gateway's stop when it ends the requests still in flight

    async def serve(self, request: web.Request, job: RelayJob) -> web.StreamResponse:
        """Send ``job`` to an engine (retrying before the first byte) and relay its answer."""
        registry = self.registry
        tried: set[str] = set()
        busy_seen = False
        failed_seen = False
        last_problem = ""
        sock_read = self.stream_idle_s if job.stream else None
        for attempt in range(self.max_retries + 1):
            engine = None
            if attempt == 0 and (job.engine_id is not None or job.pool_engines is not None):
                engine = registry.pick_first(job.model, job.kind, job.engine_id, job.pool_engines)
            if engine is None:
                engine = registry.pick(job.model, job.kind, tried, job.ticket.fits if job.ticket is not None else None)
            if engine is None:
                break
            if attempt:
                self.metrics.retried()
            engine_id = engine.engine_id
            tried.add(engine_id)
            if job.ticket is not None and job.ticket.engine_id != engine_id:
                await job.ticket.move(engine_id)  # the reservation follows the request to its engine
            client = registry.clients[engine_id]
            # timeouts.total_s bounds the whole request: its time in the gateway's queue and earlier tries count
            # (ceil_threshold: aiohttp otherwise rounds a deadline of 5 s or more up to the next whole second)
            remaining = self._remaining_s(job)
            timeout = aiohttp.ClientTimeout(total=max(remaining, 0.001), sock_connect=self.connect_s,
                                            sock_read=sock_read, ceil_threshold=math.inf)
            registry.inflight[engine_id] += 1
            # until something is relayed, the engine's going down (the monitor) ends this wait: tried elsewhere
            waiting = asyncio.timeout(None)
            upstream = None
            try:
                sent_at = time.perf_counter()
                # a stream's headers and first event come within stream_idle_s of the send, on the gateway's own
                # clock (aiohttp's read timer restarts at every byte: headers written a byte a second held the
                # client for total_s)
                first_by = _Deadline(self.stream_idle_s + _WATCH_SLACK_S, remaining) if job.stream else None
                try:
                    async with waiting:
                        registry.waiting[engine_id].add(waiting)
                        try:
                            async with asyncio.timeout_at(first_by.at if first_by is not None else None) as watch:
                                upstream = await client.session.post(client.url(job.path), data=job.body,
                                                                     headers=job.headers, timeout=timeout,
                                                                     allow_redirects=False)
                        except _RETRYABLE_CONNECT_ERRORS as exc:
                            self.metrics.upstream_error(engine_id, "connect")
                            last_problem = f"engine {engine_id} could not be reached ({exc.__class__.__name__})"
                            continue
                        except asyncio.TimeoutError as exc:
                            idle = first_by is not None and first_by.idle and watch.expired()
                            raise self._timed_out(exc, engine_id, job, idle=idle) from None
                        except aiohttp.ClientError as exc:  # an answer that is no valid HTTP (a bad header line):
                            self.metrics.upstream_error(engine_id, "malformed")  # the engine had the request, so
                            raise APIError(502, f"Engine {engine_id} answered with malformed HTTP "  # not sent again
                                                f"({exc.__class__.__name__}).", SERVER_ERROR,
                                           code="upstream_error") from None
                        if upstream.status == 503:
                            data = await self._read_small(upstream, job)
                            self.metrics.upstream_error(engine_id, "busy")
                            busy_seen = True
                            last_problem = f"engine {engine_id} is busy: {_engine_message(data)}"
                            continue
                        refusal = _unusable_answer(upstream)
                        if refusal is not None:  # not the engine's answer to this request: another may give one
                            reason, problem = refusal
                            upstream.close()
                            self.metrics.upstream_error(engine_id, reason)
                            failed_seen = True
                            last_problem = f"engine {engine_id} {problem}"
                            self._warn_unusable(engine_id, reason, problem)
                            continue
                        head = b""
                        if job.stream and upstream.status == 200:
                            head, problem = await self._first_event(upstream, job, engine_id,
                                                                    first_by)  # type: ignore[arg-type]
                            if head is None:  # refused or dropped before anything reached the client: try another
                                busy_seen = busy_seen or problem.startswith("is busy")
                                failed_seen = failed_seen or problem.startswith("failed")
                                last_problem = f"engine {engine_id} {problem}"
                                continue
                            if isinstance(head, web.Response):  # the engine refused it (4xx) in its first event
                                return head
                except TimeoutError:
                    if not waiting.expired():
                        raise
                    if upstream is not None:
                        upstream.close()
                    self.metrics.upstream_error(engine_id, "down")
                    last_problem = f"engine {engine_id} went down before it answered"
                    continue
                registry.waiting[engine_id].discard(waiting)
                if job.stream and upstream.status == 200:
                    return await self._relay_stream(request, job, upstream, engine_id, sent_at, head)
                return await self._relay_whole(job, upstream, engine_id, sent_at)
            finally:
                registry.waiting[engine_id].discard(waiting)
                registry.inflight[engine_id] -= 1
        if busy_seen:
            raise APIError(503, f"All engines for model {job.model!r} are busy; retry shortly. Last: {last_problem}.",
                           SERVER_ERROR, code="engines_busy", headers={"Retry-After": "1"})
        if failed_seen:
            raise APIError(502, f"Every engine tried for model {job.model!r} failed. Last: {last_problem}.",
                           SERVER_ERROR, code="upstream_error")
        if last_problem:  # no engine got the request, so a retry is safe: by then the monitor may have moved on
            raise APIError(502, f"No engine for model {job.model!r} could be reached: {last_problem}.",
                           SERVER_ERROR, code="upstream_unreachable", headers={"Retry-After": "1"})
        raise APIError(503, f"No engine is available for model {job.model!r} right now (all are down or asleep).",
                       SERVER_ERROR, code="no_engine_available", headers={"Retry-After": "1"})

    def _warn_unusable(self, engine_id: str, reason: str, problem: str) -> None:
        """Log an engine's unusable answer once a minute per engine and kind (a wrong key fails every request
        sent to that engine; the metric counts each)."""
        now = time.monotonic()
        if now - self._warned_unusable.get((engine_id, reason), -UNUSABLE_WARN_EVERY_S) >= UNUSABLE_WARN_EVERY_S:
            self._warned_unusable[(engine_id, reason)] = now
            log.warning("engine %s %s (tried elsewhere; said once a minute, counted in "
                        "maestro_upstream_errors_total{reason=%r})", engine_id, problem, reason)

    async def _read_small(self, upstream: aiohttp.ClientResponse, job: RelayJob) -> bytes:
        """A refusal's body (a busy engine's 503), for its message: b"" where it does not come."""
        try:
            return await self._read_body(upstream, job)
        except (aiohttp.ClientError, asyncio.TimeoutError, _BodyStalled):
            return b""
        finally:
            upstream.release()

    async def _relay_whole(self, job: RelayJob, upstream: aiohttp.ClientResponse, engine_id: str,
                           sent_at: float) -> web.Response:
        """Relay a complete (non-streamed) answer, or an engine error before any byte was sent."""
        try:
            data = await self._read_body(upstream, job)
        except _BodyStalled:
            self.metrics.upstream_error(engine_id, "stream_idle")
            raise APIError(504, f"Engine {engine_id} sent nothing of its answer's body for {self.stream_idle_s:g} s "
                                "after its headers.", SERVER_ERROR, code="upstream_timeout") from None
        except asyncio.TimeoutError as exc:
            raise self._timed_out(exc, engine_id, job) from None
        except aiohttp.ClientError as exc:
            self.metrics.upstream_error(engine_id, "disconnect")
            raise APIError(502, f"Engine {engine_id} dropped the connection mid-answer "
                                f"({exc.__class__.__name__}).", SERVER_ERROR, code="upstream_disconnected") from None
        finally:
            upstream.release()
        status = upstream.status
        received_at = time.perf_counter()
        if status >= 500:
            self.metrics.upstream_error(engine_id, f"http_{status}")
            raise APIError(502, f"Engine {engine_id} failed (HTTP {status}): {_engine_message(data)}",
                           SERVER_ERROR, code="upstream_error")
        if status == 200 and job.kind == "vllm":
            job.usage = self._count_usage(job, data)
        job.upstream_s = received_at - sent_at
        headers = {"Content-Type": _header_value(upstream.headers.get("Content-Type")) or "application/json",
                   "X-Request-Id": job.request_id}
        disposition = _header_value(upstream.headers.get("Content-Disposition"))
        if disposition is not None:  # vLLM-Omni's response_format "file": the image (or a zip) as an attachment
            headers["Content-Disposition"] = disposition
        return web.Response(body=data, status=status, headers=headers)

    async def _read_body(self, upstream: aiohttp.ClientResponse, job: RelayJob) -> bytes:
        """A whole answer's body, each wait for more of it bounded by ``stream_idle_s`` (to within
        ``_WATCH_SLACK_S``): an engine writes a whole answer at once after its headers, the gateway's calls set no
        read timeout (a non-streamed generation may take minutes before its headers), and a body aiohttp could not
        parse (a chunk size that is no number) never ended: the request waited out ``total_s`` (15 min by
        default) holding its engine and its KV reservation. A body already here (the common small answer) is
        taken as it is."""
        if upstream.content.is_eof():
            return await upstream.read()
        loop = asyncio.get_running_loop()
        idle = self.stream_idle_s + _WATCH_SLACK_S
        deadline = _Deadline(idle, self._remaining_s(job))
        parts = []
        watch = asyncio.timeout_at(deadline.at)
        try:
            async with watch:
                armed = loop.time()
                async for chunk in upstream.content.iter_any():
                    parts.append(chunk)
                    now = loop.time()
                    if now - armed >= _WATCH_SLACK_S:
                        armed = now
                        watch.reschedule(deadline.arm(now, idle))
        except asyncio.TimeoutError:
            if watch.expired() and deadline.idle:
                raise _BodyStalled from None
            raise  # the whole request's limit (the watch's, or aiohttp's own)
        return b"".join(parts)

    def _count_usage(self, job: RelayJob, data: bytes) -> dict[str, Any] | None:
        try:
            answer = orjson.loads(data)
            usage = answer.get("usage")
        except (orjson.JSONDecodeError, AttributeError):
            return None
        choices = answer.get("choices")
        if isinstance(choices, list) and any(isinstance(c, dict) and c.get("finish_reason") in sse.CUT_REASONS
                                             for c in choices):
            job.incomplete = True
        if isinstance(usage, dict):
            self.metrics.tokens(job.model, usage_tokens(usage, "prompt_tokens"),
                                usage_tokens(usage, "completion_tokens"))
            return usage
        return None

    def _remaining_s(self, job: RelayJob) -> float:
        """What is left of ``timeouts.total_s`` for ``job`` (its queue time and earlier tries count)."""
        return self.total_timeout_s - (time.perf_counter() - job.started)

    def _timed_out(self, exc: BaseException, engine_id: str, job: RelayJob, idle: bool = False) -> APIError:
        """The 504 for a timeout before any byte reached the client, counted: a wait of stream_idle_s (aiohttp's
        ServerTimeoutError, only streams set one; or ``idle``: the gateway's own watch of a stream's first event),
        else the whole request's total_s."""
        self.metrics.upstream_error(engine_id, "timeout")
        if idle or isinstance(exc, aiohttp.ServerTimeoutError):
            message = f"Engine {engine_id} did not answer model {job.model!r} within {self.stream_idle_s:g} s."
        else:
            message = _total_timeout_message(engine_id, self.total_timeout_s)
        return APIError(504, message, SERVER_ERROR, code="upstream_timeout")

    async def _first_event(self, upstream: aiohttp.ClientResponse, job: RelayJob, engine_id: str,
                           first_by: _Deadline) -> tuple[bytes | web.Response | None, str]:
        """The engine's bytes up to the end of its first SSE event, read before the client's response starts,
        while a failure can still be retried or answered with a status. vLLM sends its 200 at once and refuses a
        request it has no room for with an error event when the refusal comes late (at add_request: 503 in the
        event, not the status), and an engine that queues a request sends nothing until it runs it.

        (head, "") to relay; (None, why) where another engine should be tried (the upstream closed, refused
        as busy, or failed with a 5xx event); (response, "") for a 4xx event, answered with its status and
        body as vLLM would have answered before streaming; raises the 504s. ``first_by`` is the deadline set at the
        send, which the headers' wait shared."""
        head = bytearray()
        watchdog: asyncio.Timeout | None = None
        try:
            # aiohttp's read timer stops at a chunk it cannot parse: the gateway's own clock bounds the wait too
            async with asyncio.timeout_at(first_by.at) as watchdog:
                while True:
                    chunk = await upstream.content.readany()
                    if not chunk:
                        break
                    start = max(len(head) - 3, 0)  # only the new bytes are searched (a large first event)
                    head += chunk
                    # a whole first event, a comment too: an engine that sends comments while it queues a request
                    # keeps its client's stream alive (a refusal in the same read after it is still read as first)
                    if any(head.find(end, start) >= 0 for end in sse.EVENT_ENDS):
                        break
                    if len(head) > sse.MAX_SSE_EVENT_BYTES:
                        upstream.close()
                        self.metrics.upstream_error(engine_id, "event_too_large")
                        return None, (f"failed: its first event passed {sse.MAX_SSE_EVENT_BYTES // 2**20} MiB before "
                                      "its end")
        except asyncio.TimeoutError as exc:
            upstream.close()
            idle = watchdog is not None and watchdog.expired() and first_by.idle
            raise self._timed_out(exc, engine_id, job, idle=idle) from None
        except aiohttp.ClientError as exc:  # dropped, or an answer that is no valid HTTP (a bad chunk size)
            upstream.close()
            self.metrics.upstream_error(engine_id, "disconnect")
            return None, f"dropped the stream before its first event ({exc.__class__.__name__})"
        except asyncio.CancelledError:  # the client left (or the gateway stops): the engine must abort it
            upstream.close()
            raise
        if not head:
            upstream.close()
            self.metrics.upstream_error(engine_id, "disconnect")
            return None, "ended the stream before its first event"
        failure = sse.first_event_error(head)
        if failure is None:
            return bytes(head), ""
        status, message, body = failure
        upstream.close()
        if status == 503:
            self.metrics.upstream_error(engine_id, "busy")
            return None, f"is busy: {message}"
        if status >= 500:
            self.metrics.upstream_error(engine_id, f"http_{status}")
            return None, f"failed before its first token (HTTP {status}): {message}"
        return web.Response(body=body, status=status, content_type="application/json",
                            headers={"X-Request-Id": job.request_id}), ""

    async def _relay_stream(self, request: web.Request, job: RelayJob, upstream: aiohttp.ClientResponse,
                            engine_id: str, sent_at: float, head: bytes = b"") -> web.StreamResponse:
        """Relay SSE bytes as they come. The client's disconnect cancels this handler (handler_cancellation)
        or fails a write; either way the upstream connection is closed so the engine aborts the request."""
        response = web.StreamResponse(status=200, headers={**_STREAM_HEADERS, "X-Request-Id": job.request_id})
        usage_filter = sse.SSEUsageFilter(strip=job.strip_usage)
        completed = False
        try:
            await response.prepare(request)
            completed = await self._pump(job, upstream, engine_id, response, usage_filter, head)
            self._count_stream_usage(job, usage_filter)
            try:  # write_eof waits for a client that reads nothing: the last events filled its socket
                async with asyncio.timeout(self.stream_idle_s):
                    await response.write_eof()
            except TimeoutError:
                raise ClientStalled(f"the client read nothing of the stream's end for {self.stream_idle_s:g} s") \
                    from None
        except ConnectionResetError:
            if job.answered:
                self._count_stream_usage(job, usage_filter)
            else:
                job.status = 499  # the client went away mid-stream; the finally below makes the engine abort
        except ClientStalled as stalled:
            log.warning("request %s: %s; its connection is closed and engine %s's request ended",
                        job.request_id, stalled, engine_id)
            self.metrics.client_stalled()
            job.status = 499  # as a client that left: it took nothing more
            job.incomplete = True  # (it may not have read the end): no finished step, no record
            if request.transport is not None:
                request.transport.abort()  # close() would wait to flush what the client does not read
        except asyncio.CancelledError:
            if job.answered:  # the client (or the stop) left after the end, as the engine closed: served
                asyncio.current_task().uncancel()  # type: ignore[union-attr]
                self._count_stream_usage(job, usage_filter)
                return response
            if not (self.shutting_down and response.prepared):
                raise  # the client left (handler cancellation)
            # the gateway's stop ends it: say so and end the stream properly, rather than cut it mute
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
            job.status = 503  # counted as the requests the stop answered 503
            try:
                async with asyncio.timeout(1.0):
                    await self._end_stream_with_error(response, "The gateway is shutting down; the stream was cut. "
                                                                "Retry the request.", "gateway_shutting_down",
                                                      before=usage_filter.release())
                    await response.write_eof()
            except (TimeoutError, ConnectionError, ClientStalled):
                pass
        finally:
            if completed:
                upstream.release()
            else:
                if not job.answered:
                    job.incomplete = True
                upstream.close()  # client gone or engine failed: drop the connection so the engine aborts
        return response

    def _count_stream_usage(self, job: RelayJob, usage_filter: "sse.SSEUsageFilter") -> None:
        """The engine's usage of a stream that ended (or was answered), once: for the request, the metrics and
        online learning."""
        if job.usage is None and usage_filter.usage:
            job.usage = usage_filter.usage
            self.metrics.tokens(job.model, usage_tokens(job.usage, "prompt_tokens"),
                                usage_tokens(job.usage, "completion_tokens"))

    async def _pump(self, job: RelayJob, upstream: aiohttp.ClientResponse, engine_id: str,
                    response: web.StreamResponse, usage_filter: sse.SSEUsageFilter, head: bytes = b"") -> bool:
        """Copy events until the engine ends the stream with ``[DONE]`` (True) or fails mid-stream (False,
        error event sent). ``head`` is what :meth:`_first_event` already read.

        A watchdog bounds the stream by the gateway's own clock: ``stream_idle_s`` without progress either way
        (re-armed at most every ``_WATCH_SLACK_S``, so the limit holds to within that) and ``total_s``.
        aiohttp's read timeouts see neither a client that stopped reading (the write waits, and the request
        held its place, its engine and its KV reservation until the client's TCP connection died) nor an answer
        it could not parse (it stopped its read timer, and the client waited for ``total_s``)."""
        first = True
        ticket = job.ticket
        loop = asyncio.get_running_loop()
        idle = self.stream_idle_s + _WATCH_SLACK_S
        deadline = _Deadline(idle, self._remaining_s(job))
        writing = False
        last = b""
        watchdog: asyncio.Timeout | None = None
        try:
            async with asyncio.timeout_at(deadline.at) as watchdog:
                armed = loop.time()
                chunk = head
                chunks = upstream.content.iter_any()
                while True:
                    # what an engine writes after its [DONE] is no part of the answer: not read into events
                    out = usage_filter.feed(chunk) if chunk and not job.answered else b""
                    if out:
                        done = b"[DONE]" in out and sse.through_done(out)
                        if done:  # [DONE] and more after it in one read: the answer ends at it
                            out = done
                        if ticket is not None:
                            ticket.on_stream(out)  # counts events; grows the KV reservation when outgrown
                        if (b'"abort"' in out or b'"error"' in out) and sse.cut_short(out):
                            job.incomplete = True  # relayed as the engine sent it, but no whole answer
                            failure = sse.stream_failure(out)
                            if failure is not None and not job.status:  # counted as failed, not as a 200
                                job.status = failure[0]
                                self.metrics.upstream_error(engine_id, failure[1])
                        writing = True
                        await response.write(out)
                        writing = False
                        last = out
                        if done or sse.ends_stream(out):
                            job.answered = True
                        if first:
                            first = False
                            self.metrics.first_byte(job.route, time.perf_counter() - (job.arrived or job.started))
                        # progress is an event relayed: bytes that complete none (an engine trickling a byte a
                        # second) do not keep the stream alive past stream_idle_s
                        now = loop.time()
                        if now - armed >= _WATCH_SLACK_S:
                            armed = now
                            watchdog.reschedule(deadline.arm(now, idle))
                    chunk = await anext(chunks, None)
                    if chunk is None:
                        break
                tail = usage_filter.flush().strip()  # what came after the last whole event
                held = usage_filter.release()  # answers' last chunks that waited for a usage chunk not sent
                if held:
                    writing = True
                    await response.write(held)
                    writing = False
                    last = held
                if tail in sse.DONE_LINES and not job.answered:  # the end, without its blank line
                    writing = True
                    await response.write(_DONE)
                    writing = False
                    last = _DONE
                    job.answered = True
                # any other tail is part of an event the engine cut: no use to a client, and the error event
                # below written onto it would make a line no client can parse
        except asyncio.TimeoutError as exc:
            fired = watchdog is not None and watchdog.expired()
            if fired and writing:
                raise ClientStalled(f"the client read nothing for {self.stream_idle_s:g} s") from None
            if job.answered:
                return False  # the engine kept its connection open after the end: the answer is whole
            job.status = 504
            if isinstance(exc, aiohttp.ServerTimeoutError) or (fired and deadline.idle):
                self.metrics.upstream_error(engine_id, "stream_idle")  # nothing came for stream_idle_s
                await self._end_stream_with_error(response, f"Engine {engine_id} sent no event for "
                                                            f"{self.stream_idle_s:g} s; the stream was cut.",
                                                  before=usage_filter.release())
            else:  # the whole request's limit
                self.metrics.upstream_error(engine_id, "timeout")
                await self._end_stream_with_error(response, _total_timeout_message(engine_id, self.total_timeout_s)
                                                  + " The stream was cut.", before=usage_filter.release())
            return False
        except sse.EventTooLarge as exc:
            if job.answered:
                return False
            job.status = 502
            self.metrics.upstream_error(engine_id, "event_too_large")
            await self._end_stream_with_error(response, f"Engine {engine_id} sent {exc}; the stream was cut.",
                                              before=usage_filter.release())
            return False
        except ConnectionResetError:  # a write to the client, whose connection is closing (aiohttp's
            raise                      # ClientConnectionResetError is also a ClientError): not the engine's doing
        except aiohttp.ClientError:  # dropped mid-stream, or bytes that are no valid HTTP (a bad chunk size)
            if job.answered:
                return False  # dropped after the end: the answer is whole
            job.status = 502
            self.metrics.upstream_error(engine_id, "disconnect")
            await self._end_stream_with_error(response, f"Engine {engine_id} dropped the stream.",
                                              before=usage_filter.release())
            return False
        if not sse.ends_stream(last):  # closed without its end: no whole answer
            job.status = 502
            self.metrics.upstream_error(engine_id, "disconnect")
            await self._end_stream_with_error(response, f"Engine {engine_id} ended the stream before its end "
                                                        "(no [DONE]).")
            return False
        return True

    async def _end_stream_with_error(self, response: web.StreamResponse, message: str,
                                     code: str = "upstream_stream_error", before: bytes = b"") -> None:
        """End a stream with an OpenAI-style error event and ``[DONE]``, after ``before`` (events of the answer
        the gateway still held)."""
        event = b"data: " + error_body(message, SERVER_ERROR, None, code) + b"\n\n"
        try:
            async with asyncio.timeout(_ERROR_EVENT_WRITE_S):
                await response.write(before + event + _DONE)
        except TimeoutError:
            raise ClientStalled("the client did not take the stream's error event") from None
