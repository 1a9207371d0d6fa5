"""Stopping background tasks for certain.

A plain ``task.cancel(); await task`` can wait forever: a library that catches ``CancelledError`` and raises
its own error instead (or a cancel that lands just as an ``asyncio.timeout`` expires and comes out as
``TimeoutError``) turns the cancel into an ordinary exception, which a loop built to survive errors then
swallows. Both were seen as a rare hang of a gateway's shutdown while Redis was down. :func:`cancel_and_wait`
cancels again until the task is done, within a bound, and says so in the log if it had to.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

log = logging.getLogger("maestro.tasks")


async def cancel_and_wait(tasks: asyncio.Task | Iterable[asyncio.Task | None] | None, *, grace_s: float = 10.0,
                          retry_s: float = 0.5) -> None:
    """Cancel ``tasks`` and wait until every one is done, re-cancelling every ``retry_s`` for ``grace_s``.

    Never raises for the tasks' own exceptions; a task still running after ``grace_s`` is logged and left.
    """
    if tasks is None:
        return
    pending = {tasks} if isinstance(tasks, asyncio.Task) else {t for t in tasks if t is not None}
    pending = {t for t in pending if not t.done()}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace_s
    attempts = 0
    while pending:
        for task in pending:
            task.cancel()
        attempts += 1
        _, pending = await asyncio.wait(pending, timeout=max(0.0, min(retry_s, deadline - loop.time())))
        if pending and loop.time() >= deadline:
            log.error("tasks still running %.0f s after cancel: %s", grace_s,
                      ", ".join(sorted(t.get_name() for t in pending)))
            return
    if attempts > 1:
        log.warning("a background task ignored a cancel; it stopped after %d", attempts)
