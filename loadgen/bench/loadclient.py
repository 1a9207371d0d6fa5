"""A lean HTTP/1.1 load client for overhead benchmarks (raw asyncio ``Protocol``, uvloop when available).

Why not aiohttp's client: at 5,000+ requests per second its own per-request cost is of the same order as the
gateway's, so the client would be what gets measured. Here a request is one precomputed ``bytes`` write, and a
response is parsed just enough to know where it ends (``Content-Length`` or chunked up to the ``0`` chunk).

Two modes:
- :func:`run_fixed_rate`: open loop at a fixed rate (uniform or Poisson spacing); per request it records the
  latency (send to last byte), the time to the first response byte, and for SSE streams the time to the first
  ``data:`` event byte (TTFB). A request is never held back waiting for a busy connection: the pool grows.
- :func:`run_closed_loop`: C keep-alive connections, each sending its next request as soon as the last one
  completes, for D seconds; reports completions per second.

All clocks are ``time.perf_counter_ns``; each ``data_received`` is stamped on entry.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field
from time import perf_counter, perf_counter_ns
from typing import Callable

import orjson

from loadgen.bench.http1 import header_value
from loadgen.bench.sockets import disable_nagle

ProgressFn = Callable[[str], None]

CHAT_PATH = "/v1/chat/completions"


def chat_body(model: str = "bench", *, stream: bool = False, max_tokens: int = 16) -> bytes:
    body: dict = {
        "model": model,
        "messages": [{"role": "user", "content": "Say hello to the benchmark."}],
        "max_tokens": max_tokens,
    }
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return orjson.dumps(body)


def build_request(host: str, port: int, *, method: str = "POST", path: str = CHAT_PATH, body: bytes = b"",
                  headers: dict[str, str] | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}"]
    if method != "GET" or body:
        lines.append("Content-Type: application/json")
        lines.append(f"Content-Length: {len(body)}")
    for k, v in (headers or {}).items():
        lines.append(f"{k}: {v}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


# on_done(conn, status, t_send, t_first_byte, t_first_data, t_done, body) ; status 0 = transport error
DoneFn = Callable[["ClientConn", int, int, int, int, int, "bytes | None"], None]


class ClientConn(asyncio.Protocol):
    """One keep-alive connection carrying one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.closed = False
        self.busy = False
        self.tag: object = None  # free for the runner (e.g. "count this one")
        self.on_done: DoneFn | None = None
        self._reset()

    def _reset(self) -> None:
        self.stream = False
        self.keep_body = False
        self.t_send = 0
        self.t_first = 0
        self.t_data = 0
        self.hend = -1
        self.status = 0
        self.clen = -1
        self.chunked = False
        self.until_close = False
        self.conn_close = False
        self.pos = 0
        self.parts: list[bytes] = []
        self.sse_probe = b""

    # -- asyncio.Protocol ---------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        disable_nagle(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.transport = None
        if self.busy:
            now = perf_counter_ns()
            if self.until_close and self.hend >= 0:
                body = bytes(self.buf[self.hend:]) if self.keep_body else None
                if self.stream and not self.t_data and b"data:" in self.buf[self.hend:]:
                    self.t_data = now
                self._finish(now, body)
            else:
                self.status = 0
                self._finish(now, None)

    def send(self, request: bytes, on_done: DoneFn, *, stream: bool = False, keep_body: bool = False) -> None:
        self._reset()
        self.busy = True
        self.on_done = on_done
        self.stream = stream
        self.keep_body = keep_body
        if self.transport is None or self.closed:
            self.status = 0
            self._finish(perf_counter_ns(), None)
            return
        self.t_send = perf_counter_ns()
        self.transport.write(request)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _finish(self, now: int, body: bytes | None) -> None:
        self.busy = False
        self.buf.clear()
        cb = self.on_done
        if self.conn_close and self.transport is not None:
            self.closed = True
            self.transport.close()
        if cb is not None:
            cb(self, self.status, self.t_send, self.t_first, self.t_data, now, body)

    def _probe(self, data: bytes, now: int) -> None:
        """Stamp the first ``data:`` byte of an SSE body (robust to the marker being split across reads)."""
        probe = self.sse_probe + data
        if b"data:" in probe:
            self.t_data = now
            self.sse_probe = b""
        else:
            self.sse_probe = probe[-4:]

    def data_received(self, data: bytes) -> None:
        now = perf_counter_ns()
        if not self.busy:
            return  # unsolicited bytes; ignore
        if not self.t_first:
            self.t_first = now
        buf = self.buf
        buf += data
        if self.hend < 0:
            i = buf.find(b"\r\n\r\n")
            if i < 0:
                return
            head = bytes(buf[:i + 2]).lower()
            try:
                self.status = int(head[9:12])
            except ValueError:
                self.status = 0
            cl = header_value(head, b"content-length:")
            if cl is not None:
                self.clen = int(cl)
            elif header_value(head, b"transfer-encoding:") == b"chunked":
                self.chunked = True
            elif self.status in (204, 304) or 100 <= self.status < 200:
                self.clen = 0
            else:
                self.until_close = True
            self.conn_close = header_value(head, b"connection:") == b"close"
            self.hend = self.pos = i + 4
        if self.clen >= 0:
            end = self.hend + self.clen
            have = len(buf) >= end
            if self.stream and not self.t_data:
                self._probe(bytes(buf[self.pos:end]), now)
                self.pos = min(len(buf), end)
            if have:
                self._finish(now, bytes(buf[self.hend:end]) if self.keep_body else None)
            return
        if not self.chunked:
            return  # read until close
        pos = self.pos
        n = len(buf)
        while True:
            nl = buf.find(b"\r\n", pos)
            if nl < 0:
                break
            size = int(bytes(buf[pos:nl]).split(b";", 1)[0], 16)
            if size == 0:
                end = buf.find(b"\r\n\r\n", nl)
                if end < 0:
                    break
                body = b"".join(self.parts) if self.keep_body else None
                self._finish(now, body)
                return
            start = nl + 2
            if self.stream and not self.t_data:
                self._probe(bytes(buf[start:min(n, start + size)]), now)
            if n < start + size + 2:
                break
            if self.keep_body:
                self.parts.append(bytes(buf[start:start + size]))
            pos = start + size + 2
        if pos:
            del buf[:pos]
            pos = 0
        self.pos = pos


async def open_conn(host: str, port: int) -> ClientConn:
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_connection(ClientConn, host, port)
    return proto  # type: ignore[return-value]


async def request_once(host: str, port: int, request: bytes, *, stream: bool = False,
                       timeout: float = 10.0) -> tuple[int, bytes, dict[str, int]]:
    """One request on a fresh connection; returns (status, body, timings in ns)."""
    conn = await open_conn(host, port)
    fut: asyncio.Future = asyncio.get_running_loop().create_future()

    def done(c, status, t_send, t_first, t_data, t_done, body):
        if not fut.done():
            fut.set_result((status, body or b"", {"send": t_send, "first_byte": t_first, "first_data": t_data,
                                                  "done": t_done}))

    conn.send(request, done, stream=stream, keep_body=True)
    try:
        return await asyncio.wait_for(fut, timeout)
    finally:
        conn.close()


# ------------------------------------------------------------------------------------------------------
def percentile(sorted_values: list[float] | list[int], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100) of an already sorted list; nan when empty."""
    n = len(sorted_values)
    if n == 0:
        return float("nan")
    if n == 1:
        return float(sorted_values[0])
    k = (n - 1) * q / 100.0
    f = int(k)
    c = min(f + 1, n - 1)
    return sorted_values[f] + (sorted_values[c] - sorted_values[f]) * (k - f)


def summarize_ns(values_ns: list[int]) -> dict[str, float]:
    """p50/p90/p99/p99.9/max/mean in milliseconds."""
    v = sorted(values_ns)
    if not v:
        return {"n": 0}
    ms = 1e-6
    return {
        "n": len(v),
        "p50": percentile(v, 50) * ms,
        "p90": percentile(v, 90) * ms,
        "p99": percentile(v, 99) * ms,
        "p999": percentile(v, 99.9) * ms,
        "max": v[-1] * ms,
        "mean": sum(v) / len(v) * ms,
    }


@dataclass
class RateResult:
    rate: float
    duration_s: float
    stream: bool
    sent: int = 0
    completed: int = 0
    errors: int = 0
    timeouts: int = 0
    total_sent: int = 0  # warm-up included
    status_counts: dict[int, int] = field(default_factory=dict)
    latency_ns: list[int] = field(default_factory=list)
    first_byte_ns: list[int] = field(default_factory=list)
    ttfb_ns: list[int] = field(default_factory=list)  # first `data:` byte (streams only)
    send_lag_ns: list[int] = field(default_factory=list)  # actual send - scheduled send
    connections_opened: int = 0
    achieved_rate: float = 0.0

    def summary(self) -> dict:
        out = {
            "rate": self.rate, "duration_s": self.duration_s, "stream": self.stream, "sent": self.sent,
            "total_sent": self.total_sent,
            "completed": self.completed, "errors": self.errors, "timeouts": self.timeouts,
            "status_counts": {str(k): v for k, v in sorted(self.status_counts.items())},
            "achieved_rate": round(self.achieved_rate, 1), "connections_opened": self.connections_opened,
            "latency_ms": summarize_ns(self.latency_ns),
            "first_byte_ms": summarize_ns(self.first_byte_ns),
            "send_lag_ms": summarize_ns(self.send_lag_ns),
        }
        if self.stream:
            out["ttfb_ms"] = summarize_ns(self.ttfb_ns)
        return out


async def run_fixed_rate(host: str, port: int, *, rate: float, duration: float, warmup: float = 0.0,
                         stream: bool = False, arrival: str = "uniform", seed: int = 1,
                         request: bytes | None = None, initial_conns: int = 4, max_conns: int = 1024,
                         drain_timeout: float = 5.0, progress: ProgressFn | None = None,
                         label: str = "") -> RateResult:
    """Open-loop load at ``rate`` req/s for ``warmup + duration`` seconds; only post-warm-up requests count."""
    if rate <= 0:
        raise ValueError("rate must be > 0")
    if arrival not in ("uniform", "poisson"):
        raise ValueError("arrival must be 'uniform' or 'poisson'")
    if request is None:
        request = build_request(host, port, body=chat_body(stream=stream))
    res = RateResult(rate=rate, duration_s=duration, stream=stream)
    idle: list[ClientConn] = []
    inflight = 0
    all_done = asyncio.Event()
    finished = False
    rng = random.Random(seed)
    status_counts = res.status_counts
    lat, fb, ttfb = res.latency_ns, res.first_byte_ns, res.ttfb_ns

    def on_done(conn: ClientConn, status: int, t_send: int, t_first: int, t_data: int, t_done: int, body) -> None:
        nonlocal inflight
        inflight -= 1
        if conn.tag:
            status_counts[status] = status_counts.get(status, 0) + 1
            if status == 200:
                res.completed += 1
                lat.append(t_done - t_send)
                fb.append(t_first - t_send)
                if stream:
                    if t_data:
                        ttfb.append(t_data - t_send)
                    else:
                        res.errors += 1  # a stream without any data: event
            else:
                res.errors += 1
        if not conn.closed:
            idle.append(conn)
        if finished and inflight == 0:
            all_done.set()

    async def connect() -> ClientConn | None:
        try:
            c = await open_conn(host, port)
        except OSError:
            return None
        res.connections_opened += 1
        return c

    for c in await asyncio.gather(*(connect() for _ in range(initial_conns))):
        if c is not None:
            idle.append(c)
    if not idle:
        raise ConnectionError(f"cannot connect to {host}:{port}")
    all_conns: list[ClientConn] = list(idle)

    async def send_on_new(measured: bool, sched: int) -> None:
        nonlocal inflight
        c = await connect()
        if c is None:
            inflight -= 1
            if measured:
                res.errors += 1
                status_counts[0] = status_counts.get(0, 0) + 1
            return
        all_conns.append(c)
        c.tag = measured
        c.send(request, on_done, stream=stream)
        if measured:
            res.send_lag_ns.append(c.t_send - sched)

    interval_ns = 1e9 / rate
    t0 = perf_counter_ns() + 20_000_000
    t_measure = t0 + int(warmup * 1e9)
    t_end = t_measure + int(duration * 1e9)
    next_t = float(t0)
    last_progress = perf_counter()
    pending_tasks: set[asyncio.Task] = set()
    while next_t < t_end:
        now = perf_counter_ns()
        while next_t <= now and next_t < t_end:
            sched = int(next_t)
            measured = sched >= t_measure
            inflight += 1
            res.total_sent += 1
            if measured:
                res.sent += 1
            if idle:
                c = idle.pop()
                c.tag = measured
                c.send(request, on_done, stream=stream)
                if measured:
                    res.send_lag_ns.append(c.t_send - sched)
            elif len(all_conns) + len(pending_tasks) < max_conns:
                t = asyncio.ensure_future(send_on_new(measured, sched))
                pending_tasks.add(t)
                t.add_done_callback(pending_tasks.discard)
            else:
                inflight -= 1
                if measured:
                    res.errors += 1
                    status_counts[-1] = status_counts.get(-1, 0) + 1  # dropped: no connection available
            next_t += rng.expovariate(1.0) * interval_ns if arrival == "poisson" else interval_ns
        if progress is not None and perf_counter() - last_progress >= 2.0:
            last_progress = perf_counter()
            phase = "warm-up" if now < t_measure else f"{(now - t_measure) / 1e9:4.1f}s/{duration:g}s"
            p50 = percentile(sorted(lat[-2000:]), 50) / 1e6 if lat else float("nan")
            progress(f"  {label} {phase}: sent {res.sent}, ok {res.completed}, errors {res.errors}, "
                     f"recent p50 {p50:.3f} ms")
        delay = (next_t - perf_counter_ns()) / 1e9
        await asyncio.sleep(delay if delay > 0 else 0)
    finished = True
    if inflight > 0:
        try:
            await asyncio.wait_for(all_done.wait(), drain_timeout)
        except asyncio.TimeoutError:
            res.timeouts = inflight
            res.errors += inflight
    res.achieved_rate = res.completed / duration if duration > 0 else 0.0
    for c in all_conns:
        c.close()
    return res


@dataclass
class LoopResult:
    connections: int
    duration_s: float
    stream: bool
    completed: int = 0
    errors: int = 0
    total_completed: int = 0  # warm-up and drain included
    elapsed_s: float = 0.0
    rps: float = 0.0
    latency_ns: list[int] = field(default_factory=list)
    status_counts: dict[int, int] = field(default_factory=dict)

    def summary(self) -> dict:
        return {
            "connections": self.connections, "duration_s": self.duration_s, "stream": self.stream,
            "completed": self.completed, "total_completed": self.total_completed, "errors": self.errors,
            "elapsed_s": round(self.elapsed_s, 3),
            "rps": round(self.rps, 1), "latency_ms": summarize_ns(self.latency_ns),
            "status_counts": {str(k): v for k, v in sorted(self.status_counts.items())},
        }


async def run_closed_loop(host: str, port: int, *, connections: int, duration: float, warmup: float = 0.0,
                          stream: bool = False, request: bytes | None = None,
                          progress: ProgressFn | None = None, label: str = "") -> LoopResult:
    """``connections`` back-to-back request loops; counts completions in the ``duration`` window after warm-up."""
    if request is None:
        request = build_request(host, port, body=chat_body(stream=stream))
    res = LoopResult(connections=connections, duration_s=duration, stream=stream)
    running = True
    measuring = False
    count = 0
    errors = 0
    inflight = 0
    drained = asyncio.Event()
    lat = res.latency_ns
    status_counts = res.status_counts
    reconnects: set[asyncio.Task] = set()

    def on_done(conn: ClientConn, status: int, t_send: int, t_first: int, t_data: int, t_done: int, body) -> None:
        nonlocal count, errors, inflight
        if status == 200:
            count += 1
            if measuring:
                lat.append(t_done - t_send)
        else:
            errors += 1
        if measuring:
            status_counts[status] = status_counts.get(status, 0) + 1
        if running:
            if not conn.closed:
                conn.send(request, on_done, stream=stream)
                return
            t = asyncio.ensure_future(reconnect())
            reconnects.add(t)
            t.add_done_callback(reconnects.discard)
            return
        inflight -= 1
        if inflight == 0:
            drained.set()

    conns: list[ClientConn] = []

    async def reconnect() -> None:
        nonlocal inflight, errors
        while running:
            try:
                c = await open_conn(host, port)
            except OSError:
                errors += 1
                await asyncio.sleep(0.05)
                continue
            conns.append(c)
            c.send(request, on_done, stream=stream)
            return
        inflight -= 1
        if inflight == 0:
            drained.set()

    opened = await asyncio.gather(*(open_conn(host, port) for _ in range(connections)), return_exceptions=True)
    for c in opened:
        if isinstance(c, ClientConn):
            conns.append(c)
    if not conns:
        raise ConnectionError(f"cannot connect to {host}:{port}")
    inflight = len(conns)
    for c in list(conns):
        c.send(request, on_done, stream=stream)

    if warmup > 0:
        await asyncio.sleep(warmup)
    c0, e0, t0 = count, errors, perf_counter()
    measuring = True
    end = t0 + duration
    while True:
        left = end - perf_counter()
        if left <= 0.001:
            break
        await asyncio.sleep(min(left, 2.0))
        if progress is not None and end - perf_counter() > 0.5:
            el = perf_counter() - t0
            progress(f"  {label} {el:4.1f}s/{duration:g}s: {count - c0} ok ({(count - c0) / el:,.0f} req/s), "
                     f"errors {errors - e0}")
    c1, e1, t1 = count, errors, perf_counter()
    measuring = False
    running = False
    try:
        await asyncio.wait_for(drained.wait(), 5.0)
    except asyncio.TimeoutError:
        pass
    for t in list(reconnects):
        t.cancel()
    for c in conns:
        c.close()
    res.completed = c1 - c0
    res.total_completed = count
    res.errors = e1 - e0
    res.elapsed_s = t1 - t0
    res.rps = res.completed / res.elapsed_s if res.elapsed_s > 0 else 0.0
    return res
