"""Serving on a socket, for the gateway and the simulated engines alike: opening it, and running until stopped.

A bind that fails (the port is taken, the address is not this machine's, a host name that does not resolve, a
privileged port) is the operator's to fix, so it becomes one :class:`CannotListen` that names the address; the
CLI prints it in one line. Other start-up errors keep their own types.

A server stops cleanly on SIGINT or SIGTERM (:func:`stop_signals`). SIGTERM is what ``docker compose stop``
sends to PID 1, for which the kernel has no default action: without a handler it would be ignored and the
container killed after its grace period.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Iterator

from aiohttp import web

MAX_PORT = 65535


class CannotListen(OSError):
    """The listener could not be opened on ``host:port``; ``strerror`` says where and why."""


async def start_site(site: web.TCPSite, host: str, port: int) -> None:
    try:
        await site.start()
    except OSError as exc:  # socket.gaierror (a host name that does not resolve) is an OSError too
        raise CannotListen(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc


@contextlib.contextmanager
def stop_signals() -> Iterator[asyncio.Event]:
    """An event set by SIGINT or SIGTERM while the block runs (inside the running loop; where signals cannot be
    handled, off the main thread, it is only ever set by the caller)."""
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    handled = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stopping.set)
            handled.append(sig)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or no signals here
            pass
    try:
        yield stopping
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)
