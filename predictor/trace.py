"""The trace record: the one format every importer writes, training reads, and the gateway logs.

One JSON object per line, ``.jsonl`` or ``.jsonl.gz``::

    {"request": {OpenAI chat-completion body: "model", "messages", optional "max_tokens", any other fields},
     "usage": {"prompt_tokens": int, "completion_tokens": int},
     "agent_role": "planner|coder|reviewer|tester|tool_caller|researcher|writer|assistant|other" or null,
     "workflow": {"id": str, "step": int} or null,
     "source": str}

Optional extra keys: ``"estimated": true`` when token counts were estimated from characters (the source had
none), and ``"meta": {...}`` for source-specific provenance (never used as a feature).

A request for several answers (``n`` > 1) is a valid record, but training and evaluation leave it out (and say
how many): its ``usage.completion_tokens`` sums the n answers, so one answer's length is not known
(:func:`predictor.train.single_answer`). The gateway does not log such requests.

The gateway's records of live traffic may hold half a workflow: a client that sends ``X-Workflow-Id`` without
``X-Workflow-Step`` is logged as ``{"id": str, "step": null}``, and one that sends only a step as
``{"id": null, "step": int}`` (training then sees each request exactly as the gateway served it). Importers
always write both.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import logging
import os
import tempfile
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import orjson

log = logging.getLogger(__name__)

ROLES = ("planner", "coder", "reviewer", "tester", "tool_caller", "researcher", "writer", "assistant", "other")


def _plain_file_mode() -> int:
    """0666 less the process umask (read once at import: os.umask is process-wide and not thread-safe)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


# The mode open() gives a new file: what a file written through mkstemp (0600) is given before it is renamed into
# place, since trace and model files are read by other users (a gateway container, CI).
PLAIN_FILE_MODE = _plain_file_mode()


def write_bytes_atomically(path: str | Path, chunks: Iterable[bytes]) -> None:
    """Write ``chunks`` to ``path`` through a temporary file beside it (``NAME.*.tmp``), flushed to disk and then
    renamed over it: ``path`` holds its old content or all of the new, never a torn file (a full disk, a crash,
    a second Ctrl-C, a power cut), and a failed write leaves no temporary file behind. The file gets the mode a
    plain ``open()`` would give it (:data:`PLAIN_FILE_MODE`). Blocking: call it off the event loop."""
    target = Path(path)
    handle, tmp = tempfile.mkstemp(prefix=f"{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with open(handle, "wb") as out:
            os.fchmod(out.fileno(), PLAIN_FILE_MODE)
            out.writelines(chunks)
            out.flush()
            os.fsync(out.fileno())  # on disk before the rename: a power cut must not leave an empty file
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class TraceFormatError(ValueError):
    """A line is not a valid trace record; the message names the file and line."""


class OutputNotWritableError(OSError):
    """No file can be written at the path asked for. The message names that path (and why), not the temporary
    file beside it that the write goes through, which the user never typed; the CLIs report it as a usage error
    (exit 2)."""


def folder_problem(path: str | Path) -> str | None:
    """Why no file can be created at ``path`` (it is a folder, the nearest existing folder above it is a file, or
    cannot be written), or None. It makes no folder: a command checks this before its work and creates the
    folder only when it writes."""
    path = Path(path)
    if path.is_dir():
        return "it is a folder"
    folder = path.parent
    while not os.path.lexists(folder) and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        return f"{folder} is not a folder"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"no permission to write in {folder}"
    return None


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether ``a`` and ``b`` are one file: the same inode when both exist (hard links, symlinks, ``./x``),
    else the same resolved path. What every command asks before it writes over a path it may also read."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return Path(a).resolve() == Path(b).resolve()


def validate_record(record: Any, where: str = "record") -> dict[str, Any]:
    if not isinstance(record, dict):
        raise TraceFormatError(f"{where}: not a JSON object")
    request = record.get("request")
    if not isinstance(request, dict) or not isinstance(request.get("messages"), list):
        raise TraceFormatError(f"{where}: 'request.messages' must be a list")
    usage = record.get("usage")
    if not isinstance(usage, dict):
        raise TraceFormatError(f"{where}: 'usage' must be an object")
    for key in ("prompt_tokens", "completion_tokens"):
        value = usage.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise TraceFormatError(f"{where}: 'usage.{key}' must be a non-negative integer")
    role = record.get("agent_role")
    if role is not None and role not in ROLES:
        raise TraceFormatError(f"{where}: 'agent_role' {role!r} is not one of {', '.join(ROLES)}")
    workflow = record.get("workflow")
    if workflow is not None and (not isinstance(workflow, dict) or not _workflow_part(workflow.get("id"), str)
                                 or not _workflow_part(workflow.get("step"), int)
                                 or workflow.get("id") is None and workflow.get("step") is None):
        raise TraceFormatError(f"{where}: 'workflow' must be null or {{'id': str, 'step': int}} (one of them may "
                               "be null)")
    if not isinstance(record.get("source"), str):
        raise TraceFormatError(f"{where}: 'source' must be a string")
    return record


def _workflow_part(value: Any, kind: type) -> bool:
    return value is None or (isinstance(value, kind) and not isinstance(value, bool))


def _open(path: Path, mode: str):
    if path.suffix == ".gz":
        return gzip.open(path, mode + "b")
    return open(path, mode + "b")


def read_records(path: str | Path, validate: bool = True) -> Iterator[dict[str, Any]]:
    """Yield the records of one ``.jsonl`` / ``.jsonl.gz`` file.

    A last line that is cut short (no newline, not whole JSON) is left out with a warning rather than refused:
    it is a record being written, as in the gateway's online buffer file, which is a trace file to train on
    while the gateway appends to it."""
    path = Path(path)
    with _open(path, "r") as handle:
        try:
            for number, raw in enumerate(io.BufferedReader(handle), start=1):
                line = raw.strip()
                if not line:
                    continue
                try:
                    record = orjson.loads(line)
                except orjson.JSONDecodeError as exc:
                    if not raw.endswith(b"\n"):
                        log.warning("%s:%d: the last line is cut short (a record being written?); left out",
                                    path, number)
                        return
                    raise TraceFormatError(f"{path}:{number}: invalid JSON ({exc})") from None
                yield validate_record(record, f"{path}:{number}") if validate else record
        # a truncated or corrupt .gz (a log copied while it was written) says so with its name, not a traceback
        except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
            raise TraceFormatError(f"{path}: not a readable gzip file ({exc})") from None


def write_records(path: str | Path, records: Iterable[dict[str, Any]]) -> int:
    """Write records (validated) to ``path``; return how many were written.

    Atomically: into a temporary file beside ``path``, renamed over it once the last record is written. The
    records are often a stream from an importer reading a third-party file, and when that fails halfway (a
    truncated .gz, an invalid record) no partial file is left at ``path`` to be trained on as if it were whole,
    and a file already there stays as it was. Where ``path`` cannot be written, :class:`OutputNotWritableError`
    names it (not the temporary file)."""
    path = Path(path)
    problem = folder_problem(path)
    if problem:
        raise OutputNotWritableError(f"cannot write {path}: {problem}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    except OSError as exc:  # what the check cannot see: a read-only file system, a folder root may not write
        raise OutputNotWritableError(f"cannot write {path}: {exc.strerror or exc}") from None
    count = 0
    try:
        with open(handle, "wb") as raw:
            os.fchmod(raw.fileno(), PLAIN_FILE_MODE)
            # compressed by the target's name (the header keeps that name too, as gzip.open(path) writes it)
            with (gzip.GzipFile(str(path), "wb", fileobj=raw) if path.suffix == ".gz"
                  else contextlib.nullcontext(raw)) as out:
                for record in records:
                    out.write(orjson.dumps(validate_record(record, f"record {count}")) + b"\n")
                    count += 1
            raw.flush()
            os.fsync(raw.fileno())  # on disk before the rename, as write_bytes_atomically does
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return count
