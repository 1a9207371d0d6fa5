"""Online learning: completed requests become trace records; the model is refit in the background.

- :func:`make_record` turns a finished request (body, headers, usage) into a trace record. Only an explicit
  role (header or metadata) becomes a label: the classifier's own guess is never fed back as truth.
- A bounded buffer keeps the latest records: :class:`MemoryBuffer`, :class:`FileTraceBuffer` (a JSONL file
  that survives restarts; writes happen in an executor) or :class:`RedisStreamBuffer` (``XADD … MAXLEN ~``,
  shared by several gateways).
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
import concurrent.futures
import glob
import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from concurrent.futures import Executor
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import orjson

from predictor.features import WORKFLOW_ID_HEADER, WORKFLOW_STEP_HEADER, explicit_role_of, header, int_or_none
from predictor.predictor import Prediction, Predictor
from predictor.trace import TraceFormatError, validate_record, write_bytes_atomically

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


# ------------------------------------------------------------------------------------------------ buffers
# Buffers keep each record as its JSONL line (bytes), not as a dict: 50,000 records as dicts are millions of
# objects that every full collection of Python's cyclic garbage collector walks, with the GIL held, tens of
# milliseconds at a time, in the gateway's process while it serves; bytes are not tracked at all. A refit
# hands the lines to the train command as they are; ``snapshot()`` parses them in an executor.

class TraceBuffer(Protocol):
    async def append(self, record: dict[str, Any]) -> bool | None: ...  # False: too large to keep
    async def snapshot(self) -> list[dict[str, Any]]: ...
    async def snapshot_lines(self) -> list[bytes]: ...
    async def close(self) -> None: ...


def write_lines_atomically(path: Path, lines: list[bytes]) -> None:
    """Write JSONL lines to ``path`` atomically (:func:`~predictor.trace.write_bytes_atomically`; blocking: call
    it in an executor); a failed write (a full disk) leaves ``path`` as it was, and its error names ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        write_bytes_atomically(path, lines)
    except OSError as exc:  # "No space left on device" alone does not say which file (the refit's status shows it)
        raise OSError(exc.errno, f"{exc.strerror or exc} (writing {path})") from exc


def _record_of(line: bytes) -> dict[str, Any] | None:
    """The trace record on a JSONL line, or None for a line that is not one."""
    try:
        return validate_record(orjson.loads(line))
    except (orjson.JSONDecodeError, TraceFormatError):
        return None


def _is_record(line: bytes) -> bool:
    return _record_of(line) is not None


def _checked(lines: list[bytes], where: str, parse: bool) -> list[Any]:
    """The records on ``lines`` (``parse``) or the lines themselves, without the ones that are not trace records:
    one (a truncated entry, another writer's data) would fail every refit until it aged out of the buffer. Lines
    are parsed one at a time, so when only the lines are kept nothing accumulates."""
    kept: list[Any] = []
    for line in lines:
        record = _record_of(line)
        if record is not None:
            kept.append(record if parse else line)
    if len(kept) < len(lines):
        log.warning("trace buffer %s: skipped %d entries that are not trace records", where, len(lines) - len(kept))
    return kept


def _parse_records(lines: list[bytes]) -> list[dict[str, Any]]:
    records = []
    for line in lines:
        try:
            records.append(orjson.loads(line))
        except orjson.JSONDecodeError:
            continue
    return records


async def _in_executor(function: Callable[..., Any], *args: Any) -> Any:
    """Parsing or checking 50,000 lines takes tens of milliseconds: not on the event loop."""
    return await asyncio.get_running_loop().run_in_executor(None, function, *args)


class _DaemonWriter:
    """One daemon thread that runs a buffer's file writes, one after another (a buffer never runs two at once).

    A daemon thread, not an executor's: a write the file system never returns (a hung network mount) would
    otherwise keep the process from exiting, as the threads of executors are joined at exit. One thread for the
    buffer's life, not one per write: ``Thread.start()`` waits on the event loop until the new thread runs, and
    with other threads holding the GIL (a refit's parse, an executor's predict; timed with two busy threads on a
    2-core VM) that wait was 19 ms at the median and up to 48 ms, once per batch; handing a write to a running
    thread is a queue put (microseconds). The thread
    starts at the first write and ends at :meth:`stop` (after the writes handed to it before)."""

    _STOP = object()

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue | None = None  # the running thread's own (a stopped one may still be busy)

    def submit(self, function: Callable[..., Any], *args: Any) -> asyncio.Future:
        """``function(*args)`` in the writer thread; its outcome as a future of the running loop."""
        done: concurrent.futures.Future = concurrent.futures.Future()
        if self._jobs is None:
            self._jobs = queue.SimpleQueue()
            threading.Thread(target=self._run, args=(self._jobs,), name="trace-buffer-write", daemon=True).start()
        self._jobs.put((done, function, args))
        return asyncio.wrap_future(done)

    def stop(self) -> None:
        """End the thread once the writes handed to it are done (at once, if it is idle)."""
        if self._jobs is not None:
            self._jobs.put(self._STOP)
            self._jobs = None

    @classmethod
    def _run(cls, jobs: queue.SimpleQueue) -> None:
        while (job := jobs.get()) is not cls._STOP:
            done, function, args = job
            if not done.set_running_or_notify_cancel():
                continue
            try:
                done.set_result(function(*args))
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting side
                done.set_exception(exc)


DEFAULT_MAX_BYTES = 256 * 1024 * 1024  # a buffer's records, as JSONL, at most (multi-agent records run 5-50 kB)
# How long closing a file buffer waits for its last write: a write the file system never returns (a hung network
# mount) must not hold a gateway's shutdown; the records it could not write are said in the log.
CLOSE_WAIT_S = 2.0
# How long an append that filled a batch waits for its write: longer, and the write goes on in the background.
APPEND_WAIT_S = 1.0


class MemoryBuffer:
    """The latest records, in memory (as JSONL lines): at most ``maxlen`` of them and ``max_bytes`` in all. A count
    alone does not bound memory: 50,000 records of a multi-agent framework's long prompts (Magentic-One's average
    47 kB) are over 2 GB, in the gateway's process. A record larger than ``max_bytes`` on its own is not kept."""

    def __init__(self, maxlen: int = 50_000, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.lines: deque[bytes] = deque()
        self.maxlen = maxlen
        self.max_bytes = max_bytes
        self.bytes = 0  # the lines' total size

    def _keep(self, line: bytes) -> bool:
        """Add a line, dropping the oldest while the buffer holds more than its bounds; False (nothing kept, nothing
        dropped) for a line larger than ``max_bytes`` itself."""
        if len(line) > self.max_bytes:
            return False
        self.lines.append(line)
        self.bytes += len(line)
        while len(self.lines) > self.maxlen or self.bytes > self.max_bytes:
            self.bytes -= len(self.lines.popleft())
        return True

    async def append(self, record: dict[str, Any]) -> bool:
        """Keep the record; False when it is larger than the whole buffer may hold (it is not kept)."""
        return self._keep(orjson.dumps(record) + b"\n")

    async def snapshot_lines(self) -> list[bytes]:
        return list(self.lines)

    async def snapshot(self) -> list[dict[str, Any]]:
        return await _in_executor(_parse_records, await self.snapshot_lines())

    async def close(self) -> None:
        return None

    def __len__(self) -> int:
        return len(self.lines)


class FileTraceBuffer(MemoryBuffer):
    """A bounded JSONL file: new records are appended in batches from an executor, every ``flush_every``
    records or ``flush_after_s`` seconds after the first unwritten one (so light traffic is on disk within
    seconds, not after hours); when the file holds twice ``maxlen`` lines or twice ``max_bytes`` it is rewritten
    with the records the buffer holds (atomically, also in an executor). The file's latest records are read back
    at construction (before serving starts).

    A write that fails (a full or read-only disk) loses no record a refit would use: the records stay in memory,
    refits get them, and their lines are written once the file can be written again (retried every
    ``flush_after_s``; only lines older than the ones the buffer holds are given up). Such failures are logged, not
    raised to the caller, which would count the records as lost."""

    def __init__(self, path: str | Path, maxlen: int = 50_000, flush_every: int = 64,
                 executor: Executor | None = None, flush_after_s: float = 1.0,
                 max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        """``executor``: where the writes run (default: a daemon thread of the buffer's own, see
        :class:`_DaemonWriter`)."""
        super().__init__(maxlen, max_bytes)
        self.path = Path(path)
        self.flush_every = flush_every
        self.flush_after_s = flush_after_s
        self.executor = executor
        self._pending: list[bytes] = []
        self._timer: asyncio.Task | None = None
        self._writing: asyncio.Future | None = None  # the executor write in progress
        self._flushing: asyncio.Future | None = None  # the flush a full batch started (kept: a task needs a holder)
        self._lines_on_disk = 0
        self._bytes_on_disk = 0
        self._lock = asyncio.Lock()
        self.write_failures = 0  # failed writes in a row (0: the file is being written)
        self._writer = _DaemonWriter()
        self._remove_leftover_rewrites()
        if self.path.exists():
            self._read_back()

    def _remove_leftover_rewrites(self) -> None:
        """Delete the temporary files of rewrites a process did not finish (it was killed mid-rewrite): each is
        named after its process and no later one reuses it, so they stayed for good. The buffer's file is this
        process's alone (the gateway locks it), so any such file is a dead process's."""
        for leftover in self.path.parent.glob(f"{glob.escape(self.path.name)}.*.tmp"):
            if leftover.name[len(self.path.name) + 1:-4].isdigit():
                try:
                    leftover.unlink()
                except OSError as exc:
                    log.warning("trace buffer %s: could not delete %s, left by an unfinished rewrite: %s",
                                self.path, leftover, exc)
                else:
                    log.warning("trace buffer %s: deleted %s, left by an unfinished rewrite", self.path, leftover)

    def _read_back(self) -> None:
        """Load the file's latest records. A last line without its newline is what a crash mid-write leaves:
        it is cut off, so that the next batch starts on a line of its own (unless it is a whole record that only
        lacked the newline, from a file another tool wrote: the newline is added); and where some lines are not
        trace records (an edit, another program's lines), the file is rewritten with the latest records: it
        stays one that ``maestro predictor train --data`` reads."""
        skipped = 0
        with open(self.path, "r+b") as handle:
            complete = 0
            for line in handle:
                if not line.endswith(b"\n"):
                    if _is_record(line):  # whole, only its newline missing (a file written by another tool)
                        handle.write(b"\n")
                        line += b"\n"
                    else:
                        handle.truncate(complete)
                        log.warning("trace buffer %s: cut off a torn last line (%d bytes)", self.path, len(line))
                        break
                complete += len(line)
                self._lines_on_disk += 1
                if not _is_record(line):
                    skipped += 1
                    continue
                self._keep(line)
        self._bytes_on_disk = complete
        if skipped:
            log.warning("trace buffer %s: skipped %d lines that are not trace records", self.path, skipped)
            try:
                self._rewrite(list(self.lines))
            except OSError as exc:  # the records are in memory; the next rewrite drops those lines
                log.warning("trace buffer %s: could not rewrite it without them: %s", self.path, exc)
            else:
                self._lines_on_disk, self._bytes_on_disk = len(self.lines), self.bytes
                log.warning("trace buffer %s: rewritten with its %d latest records", self.path, len(self.lines))

    async def append(self, record: dict[str, Any]) -> bool:
        line = orjson.dumps(record) + b"\n"
        if not self._keep(line):
            return False
        self._pending.append(line)
        self._trim_pending()  # only while writes fail: the oldest has left memory too
        if len(self._pending) >= self.flush_every and not self.write_failures and not self._write_running():
            # a batch is full: write it now, and wait for that (so the inbox, not this list, takes the back-pressure
            # of a slow disk), but not longer than APPEND_WAIT_S: see _write_running
            self._flushing = asyncio.ensure_future(self._flush_or_log())
            try:
                await asyncio.wait_for(asyncio.shield(self._flushing), APPEND_WAIT_S)
            except TimeoutError:
                pass  # the write goes on in its thread; the lines are in memory for refits either way
        elif self._timer is None or self._timer.done():  # while writes fail, the timer retries
            self._timer = asyncio.get_running_loop().create_task(self._flush_later())
        return True

    def _write_running(self) -> bool:
        """Whether a write is still running in its thread. An append then leaves its lines to the timer rather
        than wait: a write the file system never returns (a hung network mount) held the learner's one drainer
        for good, and the records it had not yet put into the buffer never reached a refit."""
        return self._writing is not None and not self._writing.done()

    def _trim_pending(self) -> None:
        """Keep no more unwritten lines than the buffer holds: they are its newest, so the ones beyond have left it
        (the buffer's bounds), and while the disk stays full or read-only they would otherwise all stay in memory."""
        excess = len(self._pending) - len(self.lines)
        if excess > 0:
            del self._pending[:excess]

    async def _flush_later(self) -> None:
        """Write the pending lines ``flush_after_s`` from now; while writes fail, try again every
        ``flush_after_s`` until one succeeds (``close()`` cancels this). Lines appended while this timer's write
        was running found the timer still alive and started none of their own: they go ``flush_after_s`` later."""
        await asyncio.sleep(self.flush_after_s)
        while not await self._flush_or_log() or self._pending:
            await asyncio.sleep(self.flush_after_s)

    async def _flush_or_log(self) -> bool:
        """flush(); a failure is logged (the first, the 10th, 100th, every 1000th in a row) and the lines stay
        pending for the next try. False if it failed."""
        try:
            await self.flush()
        except Exception as exc:  # noqa: BLE001 - the records are still in memory for refits
            if self.write_failures in (1, 10, 100) or self.write_failures % 1000 == 0:
                log.warning("trace buffer %s: write failed (%d in a row; %d records in memory wait to be "
                            "written, retried every %g s): %s", self.path, self.write_failures,
                            len(self._pending), self.flush_after_s, exc)
            return False
        return True

    async def flush(self) -> None:
        async with self._lock:
            await self._wait_writing()  # before taking the pending lines: a cancel here leaves them pending
            if not self._pending:
                return
            lines, self._pending = self._pending, []
            loop = asyncio.get_running_loop()
            added = sum(map(len, lines))
            if (self._lines_on_disk + len(lines) > 2 * self.maxlen
                    or self._bytes_on_disk + added > 2 * self.max_bytes):
                write, after = partial(self._rewrite, list(self.lines)), (len(self.lines), self.bytes)
            else:
                write, after = (partial(self._append, lines),
                                (self._lines_on_disk + len(lines), self._bytes_on_disk + added))
            self._writing = (self._writer.submit(write) if self.executor is None
                             else loop.run_in_executor(self.executor, write))
            try:
                # shielded: a write in its thread cannot be stopped, so a cancelled flush (shutdown) must not
                # put its lines back to be written a second time; its outcome is settled when it ends, and the
                # next flush waits for that
                await asyncio.shield(self._writing)
            except asyncio.CancelledError:
                self._writing.add_done_callback(partial(self._settle, lines, after))
                raise
            except Exception:
                self._put_back(lines)  # not written (a partial append is taken back): try again next time
                self.write_failures += 1
                raise
            self._lines_on_disk, self._bytes_on_disk = after
            if self.write_failures:
                log.warning("trace buffer %s: written again after %d failed writes", self.path, self.write_failures)
                self.write_failures = 0

    def _put_back(self, lines: list[bytes]) -> None:
        """Keep unwritten ``lines`` for the next flush, but never more than the buffer holds."""
        self._pending[:0] = lines
        self._trim_pending()

    def _settle(self, lines: list[bytes], after: tuple[int, int], write: asyncio.Future) -> None:
        """The end of a write whose flush was cancelled: count it, or keep its lines for the next flush."""
        if write.cancelled() or write.exception() is not None:
            self._put_back(lines)
            log.warning("trace buffer %s: write failed: %s", self.path,
                        "cancelled" if write.cancelled() else write.exception())
        else:
            self._lines_on_disk, self._bytes_on_disk = after

    async def _wait_writing(self) -> None:
        """Wait for a write a cancelled flush left running in its thread (its outcome was logged or raised)."""
        if self._writing is not None and not self._writing.done():
            try:
                await asyncio.shield(self._writing)
            except Exception:  # noqa: BLE001 - that flush's own failure, already handled there
                pass

    def _append(self, lines: list[bytes]) -> None:
        """Append ``lines``, or nothing: a partial write (a full disk) is taken back, so that no torn line is left
        for the next batch to follow. Unbuffered: a buffered file's truncate first flushes what it holds, which
        fails again on the full disk, and the torn line stayed (then the file was no longer one that
        ``maestro predictor train`` reads)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)  # less the umask, as open() does
        try:
            end = os.lseek(fd, 0, os.SEEK_END)
            data = memoryview(b"".join(lines))
            try:
                while data:
                    data = data[os.write(fd, data):]
            except OSError:
                os.ftruncate(fd, end)
                raise
        finally:
            os.close(fd)

    def _rewrite(self, lines: list[bytes]) -> None:
        write_lines_atomically(self.path, lines)

    async def snapshot_lines(self) -> list[bytes]:
        # a refit needs the records, not the file: they are in memory either way, and a refit that waited for a
        # write the file system never returned waited for ever, and no refit ran after it
        return list(self.lines)

    async def close(self) -> None:
        """Write what is pending, waiting at most ``CLOSE_WAIT_S`` (what a hung write keeps unwritten is logged)."""
        if self._timer is not None and not self._timer.done():
            self._timer.cancel()
        try:
            await asyncio.wait_for(self._write_all(), CLOSE_WAIT_S)
        except TimeoutError:
            log.warning("trace buffer %s: a write did not finish within %g s at close (a hung file system?); the "
                        "records it holds and %d more are not on disk", self.path, CLOSE_WAIT_S, len(self._pending))
        finally:
            self._writer.stop()  # after the writes handed to it; a later write (none is expected) starts another

    async def _write_all(self) -> None:
        await self.flush()
        await self._wait_writing()


SNAPSHOT_BATCH = 200  # stream entries per XRANGE: redis-py parses each reply on the event loop


class RedisStreamBuffer:
    """A Redis stream capped at about ``maxlen`` entries (``XADD MAXLEN ~``), shared by several gateways.
    ``client`` is a ``redis.asyncio.Redis``. A stream has no cap in bytes: a record larger than ``max_bytes`` is
    not added, and a snapshot reads the newest entries back to ``maxlen`` of them or ``max_bytes`` in all (Redis's
    own memory is bounded by its ``maxmemory``)."""

    def __init__(self, client: Any, key: str = "maestro:predictor:traces", maxlen: int = 50_000,
                 max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.client = client
        self.key = key
        self.maxlen = maxlen
        self.max_bytes = max_bytes

    async def append(self, record: dict[str, Any]) -> bool:
        data = orjson.dumps(record)
        if len(data) + 1 > self.max_bytes:  # as a snapshot's line, with its newline
            return False
        await self.client.xadd(self.key, {"r": data}, maxlen=self.maxlen, approximate=True)
        return True

    async def snapshot_lines(self) -> list[bytes]:
        return await _in_executor(_checked, await self._fetch(), self.key, False)

    async def snapshot(self) -> list[dict[str, Any]]:
        return await _in_executor(_checked, await self._fetch(), self.key, True)  # checked and parsed in one pass

    async def _fetch(self) -> list[bytes]:
        """The stream's newest entries as JSONL lines, as stored, oldest first: at most ``maxlen`` of them (``MAXLEN
        ~`` leaves a few more in the stream) and ``max_bytes`` in all. Read newest first, so that no more than that
        is ever held."""
        lines: list[bytes] = []
        size, end = 0, "+"
        while len(lines) < self.maxlen:
            wanted = min(SNAPSHOT_BATCH, self.maxlen - len(lines))
            batch = await self.client.xrevrange(self.key, max=end, min="-", count=wanted)
            for entry_id, fields in batch:
                raw = fields.get(b"r", fields.get("r"))
                if raw is None:
                    continue
                line = (raw if isinstance(raw, bytes) else raw.encode()) + b"\n"
                size += len(line)
                if size > self.max_bytes:
                    lines.reverse()
                    return lines
                lines.append(line)
            if len(batch) < wanted:  # the stream's oldest entry was read
                break
            last = batch[-1][0]
            end = "(" + (last.decode() if isinstance(last, bytes) else last)
        lines.reverse()
        return lines

    async def close(self) -> None:
        return None


# ------------------------------------------------------------------------------------------------ learner
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
