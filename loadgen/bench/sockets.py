"""Socket settings shared by the benchmark's raw asyncio protocols (the fake upstream and the load client)."""

from __future__ import annotations

import asyncio
import socket


def disable_nagle(transport: asyncio.BaseTransport) -> None:
    """Send small writes at once: with Nagle's algorithm on, a request or a short SSE event can wait up to
    40 ms for the peer's delayed ACK, which would swamp the sub-millisecond overheads the benchmark measures."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:  # not a TCP socket (a Unix socket) or already closed
            pass
