"""Adapter for one vLLM (or vLLM-Omni) engine: its HTTP session, probes and admin calls.

One ``aiohttp.ClientSession`` per engine (connection pool and keep-alive per upstream, as the brief asks);
the proxy borrows :attr:`EngineClient.session` to relay requests, so bytes flow without extra copies.
Sleep/wake endpoints exist only with ``VLLM_SERVER_DEV_MODE=1`` and are not protected by ``--api-key``.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import replace

import aiohttp
import orjson

from backends.vllm_metrics import parse_vllm_metrics
from gateway.core.engines import EngineMetrics

SCRAPE_MAX_BYTES = 8 * 1024 * 1024  # a /metrics or /health answer larger than this is no engine's (vLLM's: ~100 kB)


class EngineUnreachable(RuntimeError):
    """A probe or admin call failed: connection refused, timeout, or a non-2xx answer."""


class EngineTimedOut(EngineUnreachable):
    """An admin call the engine did not answer in time (it may still be doing what it was asked)."""


class EngineClient:
    """HTTP client for one engine. ``kind`` is ``vllm`` or ``vllm-omni``."""

    def __init__(self, base_url: str, kind: str = "vllm", *, connect_timeout_s: float = 3.0,
                 scrape_timeout_s: float = 2.0, admin_timeout_s: float = 30.0, api_key: str = "") -> None:
        self.base_url = base_url.rstrip("/")
        # vLLM's --api-key guards its /v1 routes (not /metrics, /health or the sleep routes); sent on every call
        self._auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.kind = kind
        self._scrape_timeout = aiohttp.ClientTimeout(total=scrape_timeout_s, sock_connect=connect_timeout_s)
        self._admin_timeout = aiohttp.ClientTimeout(total=admin_timeout_s, sock_connect=connect_timeout_s)
        self._connect_timeout_s = connect_timeout_s
        self._admin_timeout_s = admin_timeout_s
        self._session: aiohttp.ClientSession | None = None
        # Until when it counts as asleep whatever its probe says (monotonic; 0: not held). From a sleep call's
        # start: a draining engine takes no new requests (vLLM's /metrics says it sleeps only once it does), and
        # vLLM-Omni's /health never says it (so for it this holds until a wake). After a vLLM sleep that timed
        # out, while its /is_sleeping says it pauses (else for one more admin_s): the drain may still end in
        # sleep, and its /metrics says so then.
        self._held_until = 0.0
        # A vLLM sleep whose call timed out and whose /metrics does not say it sleeps yet: vLLM's /metrics says so
        # only once the drain ends, but its /is_sleeping is true from the pause on (and new requests are held, not
        # refused), so the probes ask that until one of the two settles it (a sleep, or no pause any more).
        self._sleep_unsettled = False

    @property
    def session(self) -> aiohttp.ClientSession:
        """Created lazily so the client can be built outside a running loop."""
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, enable_cleanup_closed=True)
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self._connect_timeout_s),
                auto_decompress=False,  # relay bytes as the engine sent them
                # ...so ask for them uncompressed: aiohttp would otherwise send "Accept-Encoding: gzip, deflate",
                # and an engine behind a compressing proxy would send gzip bytes the client never asked for
                headers={"Accept-Encoding": "identity", **self._auth},
                skip_auto_headers=("User-Agent",),
            )
        return self._session

    def url(self, path: str) -> str:
        return self.base_url + path

    async def _get(self, path: str, timeout: aiohttp.ClientTimeout) -> bytes:
        try:
            # no redirect is followed, as the proxy follows none: a /metrics sent elsewhere marked the engine up
            # on another server's figures
            async with self.session.get(self.url(path), timeout=timeout, allow_redirects=False) as response:
                if response.status >= 300:
                    raise EngineUnreachable(f"GET {path} answered HTTP {response.status}")
                return await _read_capped(response, SCRAPE_MAX_BYTES, f"GET {path}")
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            # the whole call's timeout has no text of its own: "failed: TimeoutError: " said nothing
            detail = str(exc) or (f"no answer within {timeout.total:g} s" if isinstance(exc, asyncio.TimeoutError)
                                  and timeout.total is not None else "")
            raise EngineUnreachable(f"GET {path} failed: {exc.__class__.__name__}: {detail}") from None

    async def _post(self, path: str) -> dict:
        try:
            async with self.session.post(self.url(path), timeout=self._admin_timeout,
                                         allow_redirects=False) as response:
                body = await _read_capped(response, SCRAPE_MAX_BYTES, f"POST {path}")
                if response.status >= 300:
                    raise EngineUnreachable(f"POST {path} answered HTTP {response.status}: {body[:200]!r}")
                return orjson.loads(body) if body else {}
        except aiohttp.ConnectionTimeoutError as exc:  # never reached it: nothing it could still be doing
            raise EngineUnreachable(f"POST {path} failed: {exc.__class__.__name__}: {exc}") from None
        except asyncio.TimeoutError:
            raise EngineTimedOut(f"POST {path} got no answer within {self._admin_timeout_s:g} s "
                                 "(timeouts.admin_s)") from None
        except (aiohttp.ClientError, OSError, orjson.JSONDecodeError) as exc:
            raise EngineUnreachable(f"POST {path} failed: {exc.__class__.__name__}: {exc}") from None

    async def probe(self) -> EngineMetrics:
        """One health probe. vLLM: scrape ``/metrics`` (an answer proves the server is alive and gives load); an
        answer without a single ``vllm:`` series is some other server at that address (a proxy's error page, a
        port reused), not an engine to send requests to. vLLM-Omni: ``/health`` only, so whether it sleeps is
        what the gateway asked of it."""
        if self.kind == "vllm":
            text = await self._get("/metrics", self._scrape_timeout)
            if b"vllm:" not in text and b"# TYPE " not in text:  # (vLLM with --disable-log-stats: only
                raise EngineUnreachable(                                # Python's own series, still Prometheus)
                    f"GET /metrics answered no Prometheus metrics ({len(text)} bytes): not a vLLM server?")
            metrics = parse_vllm_metrics(text.decode("utf-8", "replace"))
            if metrics.sleeping:
                self._sleep_unsettled = False
                if self.held_asleep:
                    self._held_until = 0.0  # it says it sleeps (a sleep whose call timed out ended): it says from here
                return metrics
            if self._sleep_unsettled:
                paused = await self._paused()
                if paused is None:  # it cannot say (no such route, no answer): an admin_s hold from now decides
                    self._sleep_unsettled = False
                    self._held_until = min(self._held_until, time.monotonic() + self._admin_timeout_s)
                else:  # it says: hold while it pauses, let go once it does not
                    self._held_until = math.inf if paused else 0.0
                    self._sleep_unsettled = paused
            if self.held_asleep:  # draining for a sleep: no new requests
                return replace(metrics, sleeping=True)
            return metrics
        await self._get("/health", self._scrape_timeout)
        return EngineMetrics(sleeping=self.held_asleep)

    async def health(self) -> bool:
        try:
            await self._get("/health", self._scrape_timeout)
            return True
        except EngineUnreachable:
            return False

    async def models(self) -> list[str]:
        """The model names the engine serves (``GET /v1/models``); EngineUnreachable where it cannot say."""
        return list(await self.model_contexts())

    async def model_contexts(self) -> dict[str, int | None]:
        """The model names the engine serves (``GET /v1/models``), each with its context length (vLLM's card's
        ``max_model_len``; None where the card has none); EngineUnreachable where it cannot say."""
        body = await self._get("/v1/models", self._scrape_timeout)
        try:
            cards = orjson.loads(body).get("data")
            contexts: dict[str, int | None] = {}
            for card in cards:
                if isinstance(card, dict) and isinstance(card.get("id"), str):
                    context = card.get("max_model_len")
                    ok = isinstance(context, int) and not isinstance(context, bool) and context > 0
                    contexts[card["id"]] = context if ok else None
            return contexts
        except (orjson.JSONDecodeError, AttributeError, TypeError) as exc:
            raise EngineUnreachable(f"GET /v1/models answered no model list ({exc})") from None

    @property
    def held_asleep(self) -> bool:
        return time.monotonic() < self._held_until

    async def sleep(self, level: int = 1, mode: str = "abort") -> dict:
        """Put the engine to sleep; from the call's start it counts as sleeping (see ``_held_until``). A refusal
        or a call cut short takes that back; a timeout does not at once (with ``mode=wait`` the engine may still
        be draining, then sleep)."""
        if level not in (1, 2):
            raise ValueError("sleep level must be 1 or 2")
        self._held_until = math.inf
        try:
            result = await self._post(f"/sleep?level={level}&mode={mode}")
        except EngineTimedOut:
            if self.kind == "vllm":
                self._held_until = time.monotonic() + self._admin_timeout_s  # where /is_sleeping cannot say
                self._sleep_unsettled = True
            raise
        except BaseException:  # refused, or the admin's call cancelled: its probes say what it is
            self._held_until = 0.0
            self._sleep_unsettled = False
            raise
        if self.kind == "vllm":
            self._held_until = 0.0  # from here its /metrics says whether it sleeps
        self._sleep_unsettled = False
        return result

    async def _paused(self) -> bool | None:
        """vLLM's ``GET /is_sleeping`` (true from a sleep's pause on, through its drain); None where it cannot say
        (no such route, or no answer in time)."""
        try:
            return await self.is_sleeping(self._scrape_timeout)
        except EngineUnreachable:
            return None

    async def wake_up(self) -> dict:
        self._sleep_unsettled = False
        try:
            result = await self._post("/wake_up")
        except EngineTimedOut:
            self._held_until = 0.0  # asked to wake, and maybe awake: its requests say if not
            raise
        self._held_until = 0.0
        return result

    async def is_sleeping(self, timeout: aiohttp.ClientTimeout | None = None) -> bool:
        body = await self._get("/is_sleeping", timeout or self._admin_timeout)
        try:
            return bool(orjson.loads(body)["is_sleeping"])
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            raise EngineUnreachable(f"GET /is_sleeping answered no sleep state ({exc!r})") from None

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()


async def _read_capped(response: aiohttp.ClientResponse, limit: int, what: str) -> bytes:
    """The body, refused once it passes ``limit`` bytes: an unbounded read of whatever answers at an engine's
    address (a misrouted download, a runaway exporter) would be held whole in the gateway's memory, every probe."""
    if response.content_length is not None and response.content_length > limit:
        raise EngineUnreachable(f"{what} answered {response.content_length} bytes (more than {limit})")
    chunks, size = [], 0
    async for chunk in response.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > limit:
            raise EngineUnreachable(f"{what} answered more than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
