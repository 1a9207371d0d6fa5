"""cancel_and_wait: background tasks stop even when something turns the first cancel into an ordinary error."""

from __future__ import annotations

import asyncio
import logging

from gateway.tasks import cancel_and_wait


async def _swallows_cancels(times: int, log: list[str]) -> None:
    """A loop built to survive errors, around a call that turns a cancel into its own error (as some client
    libraries do): the first ``times`` cancels are lost."""
    while True:
        try:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                if len(log) < times:
                    log.append("swallowed")
                    raise ConnectionError("connection closed by cancel") from None
                raise
        except ConnectionError:
            continue


async def test_a_task_that_loses_cancels_still_stops(caplog):
    log: list[str] = []
    task = asyncio.create_task(_swallows_cancels(2, log), name="stubborn")
    await asyncio.sleep(0)
    with caplog.at_level(logging.WARNING, logger="maestro.tasks"):
        await asyncio.wait_for(cancel_and_wait(task, retry_s=0.05), timeout=5)
    assert task.cancelled() and log == ["swallowed", "swallowed"]
    assert "ignored a cancel" in caplog.text


async def test_plain_tasks_none_and_done_tasks():
    done = asyncio.create_task(asyncio.sleep(0))
    await done
    sleeper = asyncio.create_task(asyncio.sleep(3600))
    await cancel_and_wait([done, None, sleeper])
    await cancel_and_wait(None)
    assert sleeper.cancelled()


async def test_a_task_that_never_stops_is_left_after_the_grace(caplog):
    stop = asyncio.Event()

    async def immortal() -> None:
        while not stop.is_set():
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                pass

    task = asyncio.create_task(immortal(), name="immortal")
    await asyncio.sleep(0)
    with caplog.at_level(logging.ERROR, logger="maestro.tasks"):
        await cancel_and_wait(task, grace_s=0.2, retry_s=0.05)
    assert not task.done() and "immortal" in caplog.text
    stop.set()
    task.cancel()
    await asyncio.wait({task}, timeout=1)
