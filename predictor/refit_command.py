"""A refit that runs ``maestro predictor train`` in a child process and loads the model it writes.

Why a child process and not a thread: a fit is about a minute of CPU on the public traces, and much of it is
Python that holds the GIL (text features, vocabulary, calibration). In a thread of the gateway it would take
the interpreter from the event loop for up to the switch interval at a time, on every request, for that
minute. A child has its own interpreter and, on a machine with a spare core, costs the gateway nothing.

Why files: the child is the same ``train`` command an operator runs by hand (``--split all``), so a refit is
exactly reproducible offline from the files it read. The live records, which the buffers keep as JSONL lines,
are written to a file in a thread as they are (pickling tens of thousands of records to a child would be one
long call holding the GIL); the base data (for example the imported public traces) is read by the child from
its own files and never held by the gateway.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from predictor.kv import KVModel
from predictor.online import write_lines_atomically
from predictor.predictor import Predictor, normalize_priors

log = logging.getLogger(__name__)

REFIT_NICENESS = 10  # the child's scheduling priority (Unix nice value; higher = yields to the gateway)
STDERR_TAIL = 2000  # characters of the child's error output kept for the log and ``last_error``
INPUT_NAME = "refit-input.jsonl"  # in work_dir: the live records of the latest refit, as the child read them
MODEL_NAME = "online-model.skops"  # in work_dir, unless save_path is given
LOCK_NAME = "lock"  # in work_dir: held by the one gateway that uses it


class RefitError(RuntimeError):
    """The train command failed; the message ends with what it printed."""


class WorkDirInUse(RuntimeError):
    """Another gateway holds the refit's work_dir or the file buffer."""


def claim(lock_path: Path, what: str) -> IO[str]:
    """An exclusive advisory lock on ``lock_path``, held until the returned file is closed, or
    :class:`WorkDirInUse` naming ``what`` when another process (or another gateway in this one) holds it."""
    import fcntl

    handle = open(lock_path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise WorkDirInUse(f"{what} is in use by another gateway; give each gateway its own work_dir and file "
                           "buffer path") from None
    return handle


class TrainCommandRefit:
    """Fits a model on ``base_data`` files plus the live records with ``python -m predictor.train`` in a child
    process, then loads it (in an executor) with the gateway's KV model, output cap and priors.

    ``work_dir`` holds the live records' file and, unless ``save_path`` is given, the model. ``timeout_s``
    bounds one fit; on timeout or cancellation the child is killed. ``train_args`` are extra arguments for the
    train command (for example ``["--max-iter", "100"]``).
    """

    def __init__(self, work_dir: str | Path, *, base_data: Sequence[str | Path] = (),
                 save_path: str | Path | None = None, kv: KVModel | None = None,
                 default_max_tokens: int | None = None, priors: Mapping[str, Any] | None = None,
                 timeout_s: float = 3600.0, train_args: Sequence[str] = ()) -> None:
        self.work_dir = Path(work_dir)
        self.base_data = [Path(p) for p in base_data]
        self.model_path = Path(save_path) if save_path else self.work_dir / MODEL_NAME
        self.input_path = self.work_dir / INPUT_NAME
        self._lock: Any = None
        self.kv = kv
        self.default_max_tokens = default_max_tokens
        self.priors = normalize_priors(priors) if priors else None
        self.timeout_s = timeout_s
        self.train_args = list(train_args)

    def lock(self) -> None:
        """Claim ``work_dir`` for this process, or raise :class:`WorkDirInUse`: two gateways refitting in one
        folder would overwrite each other's input and model files."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._lock = claim(self.work_dir / LOCK_NAME, f"{self.work_dir} (predictor.online.work_dir)")

    def unlock(self) -> None:
        if self._lock is not None:
            self._lock.close()  # closing the file releases the lock
            self._lock = None

    def command(self, live: Path) -> list[str]:
        data = [str(p) for p in self.base_data] + [str(live)]
        return [sys.executable, "-m", "predictor.train", "--split", "all", "--quiet", "--data", *data,
                "--out", str(self.model_path), *self.train_args]

    async def __call__(self, lines: list[bytes]) -> Predictor:
        """Fit on the base data and ``lines`` (the live records, JSONL), then load the model."""
        loop = asyncio.get_running_loop()
        live = self.input_path
        await loop.run_in_executor(None, write_lines_atomically, live, lines)
        started = time.perf_counter()
        await self._train(live)
        log.info("predictor.train on %d live records and %d base data file(s): %.1f s", len(lines),
                 len(self.base_data), time.perf_counter() - started)
        predictor = await loop.run_in_executor(
            None, lambda: Predictor.load(self.model_path, kv=self.kv, default_max_tokens=self.default_max_tokens))
        if self.priors is not None:
            predictor.priors = self.priors
        return predictor

    async def _train(self, live: Path) -> None:
        command = self.command(live)
        child = await asyncio.create_subprocess_exec(*command, stdin=asyncio.subprocess.DEVNULL,
                                                     stdout=asyncio.subprocess.DEVNULL,
                                                     stderr=asyncio.subprocess.PIPE)
        try:  # serving comes first: the fit gets the CPU the gateway leaves
            os.setpriority(os.PRIO_PROCESS, child.pid, REFIT_NICENESS)
        except (AttributeError, OSError):  # not on this platform, or the child is already gone
            pass
        try:
            _, stderr = await asyncio.wait_for(child.communicate(), self.timeout_s)
        except BaseException as exc:  # timeout, or the gateway is shutting down: do not leave a fit running
            if child.returncode is None:
                child.kill()
                await child.wait()
            if isinstance(exc, TimeoutError):
                raise RefitError(f"`python -m predictor.train` ran longer than the refit timeout "
                                 f"({self.timeout_s:g} s, predictor.online.refit_timeout_s) and was stopped") from None
            raise
        if child.returncode != 0:
            said = stderr.decode("utf-8", "replace").strip()[-STDERR_TAIL:]
            raise RefitError(f"`python -m predictor.train` exited with {child.returncode}: {said}")
