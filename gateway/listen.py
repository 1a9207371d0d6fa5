"""Opening a listening socket, for the gateway and the simulated engines alike.

A bind that fails (the port is taken, the address is not this machine's, a host name that does not resolve, a
privileged port) is the operator's to fix, so it becomes one :class:`CannotListen` that names the address; the
CLI prints it in one line. Other start-up errors keep their own types.
"""

from __future__ import annotations

from aiohttp import web


class CannotListen(OSError):
    """The listener could not be opened on ``host:port``; ``strerror`` says where and why."""


async def start_site(site: web.TCPSite, host: str, port: int) -> None:
    try:
        await site.start()
    except OSError as exc:  # socket.gaierror (a host name that does not resolve) is an OSError too
        raise CannotListen(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
