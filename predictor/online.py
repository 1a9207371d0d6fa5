"""Online learning: completed requests become trace records; the model is refit in the background.

- :func:`make_record` turns a finished request (body, headers, usage) into a trace record. Only an explicit
  role (header or metadata) becomes a label: the classifier's own guess is never fed back as truth.
- A bounded buffer keeps the latest records (:mod:`predictor.trace_buffers`): in memory, in a JSONL file that
  survives restarts, or in a Redis stream shared by several gateways.
- :class:`OnlineLearner` serves predictions from the current model and starts a refit every
  ``refit_every`` records or ``refit_interval_s`` seconds (whichever comes first, one refit at a time). The
  fit runs in an executor or, as the gateway runs it, in a child process
  (:mod:`predictor.refit_command`), never on the event loop, and the new
  :class:`~predictor.predictor.Predictor` replaces the old one by a single reference assignment, so a
  request sees either the old model or the new one, never a mix. Until the first model exists, per-role
  priors (from config) answer. The request path calls :meth:`OnlineLearner.submit`, which never waits on the
  buffer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from concurrent.futures import Executor
from pathlib import Path
from typing import Any

import orjson

from predictor.features import WORKFLOW_ID_HEADER, WORKFLOW_STEP_HEADER, explicit_role_of, header, int_or_none
from predictor.predictor import Prediction, Predictor
from predictor.trace import TraceFormatError, validate_record
from predictor.trace_buffers import MemoryBuffer, TraceBuffer

log = logging.getLogger(__name__)

MAX_TOKEN_COUNT = 2**53 - 1  # past this a usage count is no engine's (as the gateway reads usage)


def make_record(body: Mapping[str, Any], usage: Mapping[str, Any], headers: Mapping[str, str] | None = None,
                source: str = "gateway") -> dict[str, Any] | None:
    """A trace record for one completed request, or None when ``usage`` lacks token counts, holds counts no
    answer to this request could have (past ``MAX_TOKEN_COUNT``, or more output than its ``max_tokens``: an
    engine's error, which would be a label of the next refit), or the request asked for several choices
    (``n`` > 1)."""
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if not all(type(v) is int and 0 <= v <= MAX_TOKEN_COUNT for v in (prompt, completion)):  # noqa: E721 (bool)
        return None
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    if type(limit) is int and completion > limit:  # noqa: E721
        return None
    if body.get("n") not in (None, 1):  # usage sums every choice; the predictor learns one answer's length
        return None
    metadata = body.get("metadata") if isinstance(body.get("metadata"), dict) else {}
    workflow_id = header(headers, WORKFLOW_ID_HEADER) or metadata.get("workflow_id")
    if not (isinstance(workflow_id, str) and workflow_id):
        workflow_id = None
    step = int_or_none(header(headers, WORKFLOW_STEP_HEADER))
    if step is None:
        step = int_or_none(metadata.get("workflow_step"))
    # Either may come without the other, and each is kept as predict() read it: a step the client did not
    # give is not invented (the model would train on step 0 where it serves without one), and a step without
    # an id is not lost (the model serves with it).
    record = {
        "request": dict(body),
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion},
        "agent_role": explicit_role_of(body, headers),
        "workflow": None if workflow_id is None and step is None else {"id": workflow_id, "step": step},
        "source": source,
    }
    try:
        return validate_record(record)
    except TraceFormatError:
        return None


Refit = Callable[[list[bytes]], Awaitable[Predictor]]
"""Fits a new model on the records, given as JSONL lines, and returns it without blocking the event loop (see
:class:`predictor.refit_command.TrainCommandRefit`, which the gateway uses)."""


class RefitRejected(Exception):
    """A refit whose new model was not put into service (the message says why); the serving model stays."""


INBOX_LIMIT = 10_000  # completed requests waiting for the buffer; beyond this they are dropped and counted
INBOX_MAX_BYTES = 64 * 1024 * 1024  # ...and no more than this of their bodies (a hung Redis: 10,000 bodies of up


#                                     to 4 MiB each, the largest a gateway takes, would be gigabytes)


class OnlineLearner:
    """Serves predictions and refits the model from recent traffic in the background.

    Failures of the buffer (a Redis that went away, a full disk) or of a refit never reach a request: the
    record is counted as failed, or the current model keeps serving, and ``last_error`` says why.
    """

    def __init__(self, predictor: Predictor | None = None, buffer: TraceBuffer | None = None, *,
                 refit_every: int = 1000, refit_interval_s: float = 600.0, min_records: int = 200,
                 base_records: Iterable[dict[str, Any]] = (), fit: Callable[[list[dict[str, Any]]], Predictor]
                 | None = None, refit: Refit | None = None, executor: Executor | None = None,
                 save_path: str | Path | None = None, priors: Mapping[str, Any] | None = None,
                 clock: Callable[[], float] = time.monotonic, inbox_limit: int = INBOX_LIMIT,
                 inbox_max_bytes: int = INBOX_MAX_BYTES) -> None:
        self._predictor = predictor or Predictor.from_priors(priors)
        self.buffer = buffer if buffer is not None else MemoryBuffer()
        self.refit_every = refit_every
        self.refit_interval_s = refit_interval_s
        self.min_records = min_records
        self.base_records = list(base_records)
        self._fit = fit or self._default_fit
        self._refit_with = refit
        self.executor = executor
        self.save_path = Path(save_path) if save_path else None
        self.clock = clock
        self.inbox_limit = inbox_limit
        self.inbox_max_bytes = inbox_max_bytes
        self._inbox: deque[tuple[dict[str, Any], int]] = deque()  # (record, its body's size as the client sent it)
        self._inbox_bytes = 0
        self._drainer: asyncio.Task | None = None
        self._since_refit = 0
        self._last_refit = clock()
        self._task: asyncio.Task | None = None
        self._ticker: asyncio.Task | None = None
        self.refits = 0
        self.refit_failures = 0
        self.refit_rejections = 0  # new models that failed the refit's own check (RefitRejected)
        self.last_error: BaseException | None = None
        self.last_refit: dict[str, Any] | None = None  # outcome (ok, failed, rejected, skipped), records, ...
        # completed requests by what became of them: buffered, unusable (no usage / not a chat body),
        # dropped (the inbox was full), failed (the buffer raised), too_large (larger than the whole buffer)
        self.records = {"buffered": 0, "unusable": 0, "dropped": 0, "failed": 0, "too_large": 0}

    @property
    def predictor(self) -> Predictor:
        return self._predictor

    def predict(self, body: Mapping[str, Any], headers: Mapping[str, str] | None = None) -> Prediction:
        return self._predictor.predict(body, headers)

    def _default_fit(self, records: list[dict[str, Any]]) -> Predictor:
        from predictor.train import fit_predictor

        current = self._predictor
        return fit_predictor(records, kv=current.kv, default_max_tokens=current.default_max_tokens)

    async def observe(self, body: Mapping[str, Any], usage: Mapping[str, Any],
                      headers: Mapping[str, str] | None = None) -> bool:
        """Record one completed request and wait until it is buffered; True when it was usable and stored."""
        record = make_record(body, usage, headers)
        if record is None:
            self.records["unusable"] += 1
            return False
        return await self.add(record)

    def submit(self, body: Mapping[str, Any], usage: Mapping[str, Any],
               headers: Mapping[str, str] | None = None, size: int = 0) -> str:
        """Record one completed request without waiting on the buffer (the request path's call): the record is
        built now and written by a background task. ``size``: the body's size in bytes, as it came (bounds the
        memory the waiting records hold). Returns "queued", "unusable" or "dropped"."""
        record = make_record(body, usage, headers)
        if record is None:
            self.records["unusable"] += 1
            return "unusable"
        if len(self._inbox) >= self.inbox_limit or (
                self._inbox and self._inbox_bytes + size > self.inbox_max_bytes):
            self.records["dropped"] += 1  # the buffer is slower than traffic: keep serving, count it
            return "dropped"
        self._inbox.append((record, size))
        self._inbox_bytes += size
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.get_running_loop().create_task(self._drain())
        return "queued"

    async def _drain(self) -> None:
        while self._inbox:
            record, size = self._inbox.popleft()
            self._inbox_bytes -= size
            await self.add(record)

    async def add(self, record: dict[str, Any]) -> bool:
        """Append a trace record to the buffer and start a refit when one is due; False if the buffer failed."""
        try:
            kept = await self.buffer.append(record)
        except Exception as exc:  # noqa: BLE001 - a lost training record must not fail anything else
            self.records["failed"] += 1
            if self.records["failed"] in (1, 10, 100) or self.records["failed"] % 1000 == 0:
                log.warning("trace buffer failed (%d records lost so far): %s", self.records["failed"], exc)
            self.last_error = exc
            return False
        if kept is False:
            self.records["too_large"] += 1
            if self.records["too_large"] in (1, 10, 100) or self.records["too_large"] % 1000 == 0:
                log.warning("trace buffer: %d records larger than the whole buffer (predictor.online.max_bytes) "
                            "were not kept", self.records["too_large"])
            return False
        self.records["buffered"] += 1
        self._since_refit += 1
        if self._since_refit >= self.refit_every or self.clock() - self._last_refit >= self.refit_interval_s:
            self.trigger()
        return True

    def status(self) -> dict[str, Any]:
        """What an operator asks of online learning (``GET /admin/predictor``)."""
        return {"model": "trained" if self._predictor.trained else "priors", "refits": self.refits,
                "refit_failures": self.refit_failures, "refit_rejections": self.refit_rejections,
                "refitting": self.refitting,
                "last_error": None if self.last_error is None else f"{type(self.last_error).__name__}: "
                                                                     f"{self.last_error}",
                "last_refit": self.last_refit, "records": dict(self.records),
                "records_since_refit": self._since_refit,
                "seconds_since_refit": round(self.clock() - self._last_refit, 1),
                "refit_every": self.refit_every, "refit_interval_s": self.refit_interval_s,
                "min_records": self.min_records}

    @property
    def refitting(self) -> bool:
        return self._task is not None and not self._task.done()

    def trigger(self) -> asyncio.Task | None:
        """Start a refit now unless one is running; returns its task."""
        if self.refitting:
            return self._task
        self._since_refit = 0
        self._last_refit = self.clock()
        self._task = asyncio.get_running_loop().create_task(self._refit())
        return self._task

    async def _refit(self) -> None:
        started = time.perf_counter()
        records: list[Any] = []

        def finished(outcome: str) -> None:
            self.last_refit = {"outcome": outcome, "records": len(records),
                               "seconds": round(time.perf_counter() - started, 1), "at": time.time()}

        try:
            if self._refit_with is not None:  # the lines go to the fit as they are: nothing is parsed here
                records = self._base_lines() + await self.buffer.snapshot_lines()
            else:
                records = self.base_records + await self.buffer.snapshot()
            if len(records) < self.min_records:
                log.info("predictor refit skipped: %d records (< %d)", len(records), self.min_records)
                finished("skipped")
                return
            if self._refit_with is not None:
                new = await self._refit_with(records)
            else:
                loop = asyncio.get_running_loop()
                new = await loop.run_in_executor(self.executor, self._fit_and_save, records)
        except RefitRejected as exc:
            self.last_error = exc
            self.refit_rejections += 1
            finished("rejected")
            log.warning("predictor refit rejected: %s", exc)
            return
        except Exception as exc:  # noqa: BLE001 - keep serving the old model
            self.last_error = exc
            self.refit_failures += 1
            finished("failed")
            log.warning("predictor refit failed, keeping the current model: %s", exc)
            return
        self._predictor = new  # one reference assignment: the swap is atomic for readers
        self.refits += 1
        self.last_error = None  # an earlier failure is past: a refit read the records and its model serves
        finished("ok")
        log.info("predictor refit on %d records in %.1fs: the new model serves", len(records),
                 time.perf_counter() - started)

    def _base_lines(self) -> list[bytes]:
        return [orjson.dumps(record) + b"\n" for record in self.base_records]

    def _fit_and_save(self, records: list[dict[str, Any]]) -> Predictor:
        new = self._fit(records)
        if self.save_path is not None and new.state is not None:
            new.save(self.save_path)
        return new

    async def wait_refit(self) -> None:
        """Wait for the running refit, if any (tests, shutdown)."""
        if self._task is not None:
            await asyncio.shield(self._task)

    async def wait_buffered(self) -> None:
        """Wait until every submitted record has reached the buffer (tests, shutdown)."""
        while self._drainer is not None and not self._drainer.done():
            await asyncio.shield(self._drainer)

    def start(self) -> None:
        """Also refit on the clock when traffic is too light to reach ``refit_every``."""
        if self._ticker is None:
            self._ticker = asyncio.get_running_loop().create_task(self._tick())

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(max(1.0, self.refit_interval_s / 10))
            if self._since_refit and self.clock() - self._last_refit >= self.refit_interval_s:
                self.trigger()

    async def stop(self, cancel_refit: bool = False, drain_timeout_s: float = 10.0) -> None:
        """Stop the clock, store what was submitted (for at most ``drain_timeout_s``: a buffer that went away
        must not hold a shutdown; what is left is counted as dropped), and wait for a running refit (or cancel
        it: a gateway shutting down does not wait a minute for a model it will not serve); then close the
        buffer."""
        if self._ticker is not None:
            self._ticker.cancel()
            try:
                await self._ticker
            except asyncio.CancelledError:
                pass
            self._ticker = None
        try:
            await asyncio.wait_for(self.wait_buffered(), drain_timeout_s)
        except TimeoutError:
            if self._drainer is not None:
                self._drainer.cancel()
            self.records["dropped"] += len(self._inbox)
            log.warning("trace buffer too slow at shutdown: %d waiting records not stored, and the one being "
                        "stored may be lost", len(self._inbox))
            self._inbox.clear()
            self._inbox_bytes = 0
        if self._task is not None and not self._task.done():
            if cancel_refit:
                self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        try:
            await self.buffer.close()
        except Exception as exc:  # noqa: BLE001 - shutting down: say it, do not fail the shutdown
            log.warning("trace buffer did not close cleanly: %s", exc)
