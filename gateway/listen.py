"""Serving on a socket, for the gateway and the simulated engines alike: opening it, and running until stopped.

A bind that fails (the port is taken, the address is not this machine's, a host name that does not resolve, a
privileged port) is the operator's to fix, so it becomes one :class:`CannotListen` that names the address; the
CLI prints it in one line. Other start-up errors keep their own types.

A server stops cleanly on SIGINT or SIGTERM (:func:`stop_signals`). SIGTERM is what ``docker compose stop``
sends to PID 1, for which the kernel has no default action: without a handler it would be ignored and the
container killed after its grace period. SIGHUP (its terminal closed) stops it cleanly too, where it would
otherwise end the process at once, streams cut without their end (or, as a container's PID 1, be ignored: the
servers have no configuration to reload); under ``nohup``, which ignores SIGHUP, it is left ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import signal
import time
from collections.abc import Callable, Iterator

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, BadStatusLine

MAX_PORT = 65535
BAD_REQUEST_LINES_BURST = 20  # lines for requests aiohttp cannot parse, at once (see _OneLineForBadRequests)
BAD_REQUEST_LINE_EVERY_S = 1.0  # and then at most one a second
log = logging.getLogger("maestro.listen")


# A bytes repr inside a parser's message: the raw request bytes it stopped at
_RAW_BYTES = re.compile(r"b'(?:[^'\\]|\\.)*'" + r'|b"(?:[^"\\]|\\.)*"')


def _parser_detail(exc: BaseException) -> str:
    """A parser error's message as one line, without the raw bytes it quotes: those are the client's header
    lines (``Authorization: Bearer <key>`` among them) or its body, which have no place in a log. A request line
    (quoted as text by aiohttp's pure-Python parser) is left out whole: its query may carry a token."""
    if isinstance(exc, BadStatusLine):
        return f"{type(exc).__name__}: a request line that is no HTTP (left out)"
    message = _RAW_BYTES.sub("<bytes left out>", str(getattr(exc, "message", exc)))
    return " ".join(word for word in message.split() if word.strip("^~"))[:200]  # its lines as one, no pointer


class _OneLineForBadRequests(logging.Filter):
    """aiohttp logs every request it cannot parse (a header with a control byte, a request line that is no HTTP)
    at ERROR with a whole traceback, after answering it 400: anyone who can reach the port could fill the log
    with them. Such a request is the client's error: one line at INFO, as an access log would have it. So is a
    body aiohttp cannot decode (a ``Content-Encoding`` it is not in), which the gateway has answered 400 and
    aiohttp then reads again to drain the connection.

    Even one line each let a client write thousands of lines a second, so they are rate-limited: a burst of
    ``BAD_REQUEST_LINES_BURST``, then one line per ``BAD_REQUEST_LINE_EVERY_S``, the next line saying how many
    were left out."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self._clock = clock
        self.reset()

    def reset(self) -> None:
        self._allowance = float(BAD_REQUEST_LINES_BURST)
        self._checked = self._clock()
        self._left_out = 0

    def _take_line(self) -> bool:
        now = self._clock()
        self._allowance = min(float(BAD_REQUEST_LINES_BURST),
                              self._allowance + (now - self._checked) / BAD_REQUEST_LINE_EVERY_S)
        self._checked = now
        if self._allowance < 1.0:
            self._left_out += 1
            return False
        self._allowance -= 1.0
        return True

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, (BadHttpMessage, web.RequestPayloadError)):
            # (its level was checked as ERROR)
            if not logging.getLogger(record.name).isEnabledFor(logging.INFO) or not self._take_line():
                return False
            record.levelno, record.levelname = logging.INFO, "INFO"
            if isinstance(exc, BadHttpMessage):
                record.msg, record.args = "%s (answered 400): %s", (record.getMessage(), _parser_detail(exc))
            else:  # aiohttp's "Unhandled exception" while it drained a body the gateway had answered 400
                record.msg, record.args = "a request's body could not be read: %s", (_parser_detail(exc),)
            if self._left_out:
                record.msg += " (and %d like it since the last such line, left out)"
                record.args = (*record.args, self._left_out)
                self._left_out = 0
            record.exc_info = record.exc_text = None
        return True


_bad_request_filter = _OneLineForBadRequests()
logging.getLogger("aiohttp.server").addFilter(_bad_request_filter)


class CannotListen(OSError):
    """The listener could not be opened on ``host:port``; ``strerror`` says where and why."""


async def start_site(site: web.TCPSite, host: str, port: int) -> None:
    try:
        await site.start()
    except OSError as exc:  # socket.gaierror (a host name that does not resolve) is an OSError too
        raise CannotListen(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc


@contextlib.contextmanager
def stop_signals(on_repeat: Callable[[], None] | None = None) -> Iterator[asyncio.Event]:
    """An event set by SIGINT, SIGTERM or SIGHUP (unless ignored, as ``nohup`` does) while the block runs
    (inside the running loop; where signals cannot be handled, off the main thread, it is only ever set by the
    caller). A signal after the first calls ``on_repeat`` (the gateway ends its grace: an operator's second
    Ctrl-C had gone unheard), or is logged."""
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    handled = []

    def on_signal(sig: signal.Signals) -> None:
        if not stopping.is_set():
            stopping.set()
        elif on_repeat is not None:
            on_repeat()
        else:
            log.warning("%s again: already stopping", sig.name)

    signals = [signal.SIGINT, signal.SIGTERM]
    hangup = getattr(signal, "SIGHUP", None)  # not on Windows
    if hangup is not None and signal.getsignal(hangup) is not signal.SIG_IGN:
        signals.append(hangup)
    for sig in signals:
        try:
            loop.add_signal_handler(sig, on_signal, sig)
            handled.append(sig)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or no signals here
            pass
    try:
        yield stopping
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)
