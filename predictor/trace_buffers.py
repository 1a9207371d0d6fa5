"""The bounded buffers online learning keeps its latest trace records in (:class:`TraceBuffer`).

:class:`MemoryBuffer` (in the process), :class:`FileTraceBuffer` (a JSONL file that survives restarts; its writes
go to one thread of its own, never the event loop) and :class:`RedisStreamBuffer` (``XADD … MAXLEN ~``, shared by
several gateways), each bounded by a count of records and by bytes.

Buffers keep each record as its JSONL line (bytes), not as a dict: 50,000 records as dicts are millions of
objects that every full collection of Python's cyclic garbage collector walks, with the GIL held, tens of
milliseconds at a time, in the gateway's process while it serves; bytes are not tracked at all. A refit
hands the lines to the train command as they are; ``snapshot()`` parses them in an executor.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import glob
import logging
import os
import queue
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import orjson

from predictor.trace import TraceFormatError, validate_record, write_bytes_atomically

log = logging.getLogger(__name__)


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
