"""Adapter for one vLLM (or vLLM-Omni) engine: its HTTP session, probes and admin calls.

One ``aiohttp.ClientSession`` per engine (connection pool and keep-alive per upstream, as the brief asks);
the proxy borrows :attr:`EngineClient.session` to relay requests, so bytes flow without extra copies.
Sleep/wake endpoints exist only with ``VLLM_SERVER_DEV_MODE=1`` and are not protected by ``--api-key``.
"""

from __future__ import annotations

import asyncio

import aiohttp
import orjson

from backends.vllm_metrics import parse_vllm_metrics
from gateway.core.engines import EngineMetrics


class EngineUnreachable(RuntimeError):
    """A probe or admin call failed: connection refused, timeout, or a non-2xx answer."""


class EngineClient:
    """HTTP client for one engine. ``kind`` is ``vllm`` or ``vllm-omni``."""

    def __init__(self, base_url: str, kind: str = "vllm", *, connect_timeout_s: float = 3.0,
                 scrape_timeout_s: float = 2.0, admin_timeout_s: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.kind = kind
        self._scrape_timeout = aiohttp.ClientTimeout(total=scrape_timeout_s, sock_connect=connect_timeout_s)
        self._admin_timeout = aiohttp.ClientTimeout(total=admin_timeout_s, sock_connect=connect_timeout_s)
        self._connect_timeout_s = connect_timeout_s
        self._session: aiohttp.ClientSession | None = None

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
                headers={"Accept-Encoding": "identity"},
                skip_auto_headers=("User-Agent",),
            )
        return self._session

    def url(self, path: str) -> str:
        return self.base_url + path

    async def _get(self, path: str, timeout: aiohttp.ClientTimeout) -> bytes:
        try:
            async with self.session.get(self.url(path), timeout=timeout) as response:
                body = await response.read()
                if response.status >= 400:
                    raise EngineUnreachable(f"GET {path} answered HTTP {response.status}")
                return body
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise EngineUnreachable(f"GET {path} failed: {exc.__class__.__name__}: {exc}") from None

    async def _post(self, path: str) -> dict:
        try:
            async with self.session.post(self.url(path), timeout=self._admin_timeout) as response:
                body = await response.read()
                if response.status >= 400:
                    raise EngineUnreachable(f"POST {path} answered HTTP {response.status}: {body[:200]!r}")
                return orjson.loads(body) if body else {}
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, orjson.JSONDecodeError) as exc:
            raise EngineUnreachable(f"POST {path} failed: {exc.__class__.__name__}: {exc}") from None

    async def probe(self) -> EngineMetrics:
        """One health probe. vLLM: scrape ``/metrics`` (an answer proves the server is alive and gives load).
        vLLM-Omni: ``/health`` only."""
        if self.kind == "vllm":
            text = await self._get("/metrics", self._scrape_timeout)
            return parse_vllm_metrics(text.decode("utf-8", "replace"))
        await self._get("/health", self._scrape_timeout)
        return EngineMetrics()

    async def health(self) -> bool:
        try:
            await self._get("/health", self._scrape_timeout)
            return True
        except EngineUnreachable:
            return False

    async def models(self) -> list[str]:
        body = await self._get("/v1/models", self._scrape_timeout)
        return [m["id"] for m in orjson.loads(body).get("data", [])]

    async def sleep(self, level: int = 1, mode: str = "abort") -> dict:
        if level not in (1, 2):
            raise ValueError("sleep level must be 1 or 2")
        return await self._post(f"/sleep?level={level}&mode={mode}")

    async def wake_up(self) -> dict:
        return await self._post("/wake_up")

    async def is_sleeping(self) -> bool:
        body = await self._get("/is_sleeping", self._admin_timeout)
        return bool(orjson.loads(body).get("is_sleeping"))

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
