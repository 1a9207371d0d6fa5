"""A refit that runs ``maestro predictor train`` in a child process, checks the model it writes on the newest
records (``maestro predictor evaluate``, also a child) and loads it.

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
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import orjson

try:
    import ctypes
except ImportError:  # a Python built without it: refits run, without the parent-death signal
    ctypes = None  # type: ignore[assignment]

from predictor.kv import KVModel
from predictor.online import RefitRejected
from predictor.trace_buffers import write_lines_atomically
from predictor.predictor import Predictor, normalize_priors

log = logging.getLogger(__name__)

REFIT_NICENESS = 10  # the child's scheduling priority (Unix nice value; higher = yields to the gateway)
STDERR_TAIL = 2000  # characters of the child's error output kept for the log and ``last_error``
_PR_SET_PDEATHSIG = 1  # Linux prctl(2)
try:  # looked up here, once: the child between fork and exec should do as little as it can
    _PRCTL: Any = ctypes.CDLL(None, use_errno=True).prctl if ctypes and sys.platform.startswith("linux") else None
except (OSError, AttributeError):  # no C library to call, or no prctl in it
    _PRCTL = None


def _die_with_parent(parent: int) -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the kernel kill the child when the gateway dies (Linux): a gateway killed with
    ``kill -9`` left its fit running for a minute, writing a candidate into the work_dir of the gateway started
    after it. (A parent already gone by then: the child ends at once.)"""
    if _PRCTL is None:
        return None

    def arrange() -> None:  # in the child, between fork and exec
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:
            os._exit(1)

    return arrange
INPUT_NAME = "refit-input.jsonl"  # in work_dir: the live records of the latest refit, as the child read them
MODEL_NAME = "online-model.skops"  # in work_dir, unless save_path is given
LOCK_NAME = "lock"  # in work_dir: held by the one gateway that uses it
HOLDOUT_NAME = "refit-holdout.jsonl"  # in work_dir: the newest live records, left out to check the new model
MIN_HOLDOUT = 50  # fewer newest records than this say too little about coverage: no check
# added to the serving model's quantile loss before the max_loss_increase comparison: a serving model whose loss
# is near zero (outputs that always end at max_tokens) would otherwise refuse every refit for a token's noise
LOSS_ALLOWANCE_TOKENS = 1.0
PRIORS_NAME = "serving-priors.json"  # in work_dir: the priors a gateway without a model serves, for the check
SERVING_WORDS = {"model": ("the serving model's", "the serving model stays"),
                 "priors": ("the serving priors'", "the priors keep serving")}


def refit_model_path(work_dir: str | Path, save_path: str | Path | None) -> Path:
    """Where a refit writes its model: ``save_path``, or ``MODEL_NAME`` in ``work_dir``."""
    return Path(save_path) if save_path else Path(work_dir, MODEL_NAME)


def candidate_path(model_path: Path) -> Path:
    """Where a refit writes its new model until the check passes: beside ``model_path``, as ``NAME.candidate``."""
    return model_path.with_name(model_path.name + ".candidate")


@dataclass(frozen=True)
class HoldoutScore:
    """A model's figures on the newest records: p90 coverage (share) and p90 quantile loss (tokens per request)."""
    coverage: float
    loss: float


class RefitError(RuntimeError):
    """A refit's child (the train or the evaluate command) failed; the message ends with what it printed."""


class WorkDirInUse(RuntimeError):
    """Another gateway holds the refit's work_dir, its save_path or the file buffer (``field`` says which
    config key)."""

    def __init__(self, message: str, field: str = "predictor.online.work_dir") -> None:
        super().__init__(message)
        self.field = field


class UnusablePath(OSError):
    """The refit's work_dir or save_path cannot be made or locked (a path through a file, a folder where the
    lock file goes); ``field`` says which config key, as only :meth:`TrainCommandRefit.lock` knows."""

    def __init__(self, field: str, error: OSError) -> None:
        if error.strerror:  # the error's own parts, so that its text reads "[Errno 2] ...: 'path'" once
            super().__init__(error.errno, error.strerror, *([error.filename] if error.filename else []))
        else:
            super().__init__(str(error))
        self.field = field


def claim(lock_path: Path, what: str, field: str = "predictor.online.work_dir") -> IO[str]:
    """An exclusive advisory lock on ``lock_path``, held until the returned file is closed, or
    :class:`WorkDirInUse` naming ``what`` when another process (or another gateway in this one) holds it."""
    import fcntl

    handle = open(lock_path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise WorkDirInUse(f"{what} is in use by another gateway; give each gateway its own work_dir, save_path "
                           "and file buffer path", field) from None
    return handle


class TrainCommandRefit:
    """Fits a model on ``base_data`` files plus the live records with ``python -m predictor.train`` in a child
    process, checks it on the newest records, then loads it (in an executor) with the gateway's KV model, output
    cap and priors.

    The check: the newest ``holdout_share`` of the live records (when that is at least ``MIN_HOLDOUT``) are
    left out of the fit, and ``python -m predictor.evaluate`` measures the new model's p90 coverage and p90
    quantile loss on them, and those of what serves now: the model file ``current_path``, or, where there is no
    such file (a gateway that starts without a model), the per-role priors (``evaluate --priors``), so that even
    the first model is checked against what it would replace. The new model is not
    put into service (:class:`~predictor.online.RefitRejected`) when it reserves too little: below
    ``min_coverage`` and below the serving model's coverage; or when its quantile loss is more than
    ``serving loss × (1 + max_loss_increase) + LOSS_ALLOWANCE_TOKENS`` (it reserves too much, or too little,
    for the newest traffic). A model at least as good on both counts always serves. Coverage alone cannot see a
    model that reserves far too much (one that reserves every ``max_tokens`` covers everything and saves
    nothing); the quantile loss, the score a p90 minimises, charges each token reserved beyond the output and
    each token of output beyond the reservation. A refit on broken traffic must not replace a working model.
    Held-out records are trained on at the next refit.

    ``work_dir`` holds the input files and, unless ``save_path`` is given, the model. ``timeout_s`` bounds the
    whole refit (each child gets what is left of it); on timeout or cancellation the child is killed.
    ``train_args`` are extra arguments for the train command (for example ``["--max-iter", "100"]``).
    """

    def __init__(self, work_dir: str | Path, *, base_data: Sequence[str | Path] = (),
                 save_path: str | Path | None = None, kv: KVModel | None = None,
                 default_max_tokens: int | None = None, priors: Mapping[str, Any] | None = None,
                 timeout_s: float = 3600.0, train_args: Sequence[str] = (), holdout_share: float = 0.1,
                 min_coverage: float = 0.8, max_loss_increase: float = 0.5,
                 current_path: str | Path | None = None) -> None:
        self.work_dir = Path(work_dir)
        self.base_data = [Path(p) for p in base_data]
        self.model_path = refit_model_path(self.work_dir, save_path)
        self.input_path = self.work_dir / INPUT_NAME
        self.holdout_path = self.work_dir / HOLDOUT_NAME
        # beside the model, so that putting it into service is a rename within one file system
        self.candidate_path = candidate_path(self.model_path)
        self.current_path = Path(current_path) if current_path else None  # the serving model's file, if any
        self._locks: list[IO[str]] = []
        self.kv = kv
        self.default_max_tokens = default_max_tokens
        self.priors = normalize_priors(priors) if priors else None
        self.timeout_s = timeout_s
        self.train_args = list(train_args)
        self.holdout_share = holdout_share
        self.min_coverage = min_coverage
        self.max_loss_increase = max_loss_increase
        self.last_check: dict[str, Any] | None = None  # the latest check's figures (GET /admin/predictor)
        self._deadline: float | None = None  # the running refit's end (event loop time)

    def lock(self) -> None:
        """Claim ``work_dir``, and ``save_path`` where it lies elsewhere, for this process, or raise
        :class:`WorkDirInUse`: two gateways refitting in one folder would overwrite each other's input and model
        files, and two writing one ``save_path`` would each check its candidate against the other's model
        (and rename each other's candidates). :class:`UnusablePath` where either cannot be made or locked."""
        field = "predictor.online.work_dir"
        try:
            self.work_dir.mkdir(parents=True, exist_ok=True)
            self._locks.append(claim(self.work_dir / LOCK_NAME, f"{self.work_dir} ({field})"))
            folder = self.model_path.parent
            if folder.resolve() != self.work_dir.resolve():
                field = "predictor.online.save_path"
                folder.mkdir(parents=True, exist_ok=True)
                self._locks.append(claim(self.model_path.with_name(self.model_path.name + ".lock"),
                                         f"{self.model_path} ({field})", field))
        except OSError as exc:
            self.unlock()
            raise UnusablePath(field, exc) from exc
        except BaseException:
            self.unlock()
            raise

    def unlock(self) -> None:
        while self._locks:
            self._locks.pop().close()  # closing the file releases the lock

    def command(self, live: Path, out: Path | None = None) -> list[str]:
        data = [str(p) for p in self.base_data] + [str(live)]
        return [sys.executable, "-m", "predictor.train", "--split", "all", "--quiet", "--data", *data,
                "--out", str(out or self.model_path), *self.train_args]

    def holdout_size(self, live: int) -> int:
        held = int(live * self.holdout_share)
        return held if held >= MIN_HOLDOUT else 0

    async def __call__(self, lines: list[bytes]) -> Predictor:
        """Fit on the base data and ``lines`` (the live records, JSONL, oldest first), check, load, and only then
        put the model at ``model_path``. ``timeout_s`` bounds the whole refit, each child getting what is left."""
        self._deadline = asyncio.get_running_loop().time() + self.timeout_s
        self.last_check = None  # the figures shown are this refit's, or none
        try:
            return await self._fit_check_load(lines)
        finally:
            self._deadline = None

    async def _fit_check_load(self, lines: list[bytes]) -> Predictor:
        loop = asyncio.get_running_loop()
        held = self.holdout_size(len(lines))
        train, holdout = (lines[:-held], lines[-held:]) if held else (lines, [])
        await loop.run_in_executor(None, write_lines_atomically, self.input_path, train)
        started = time.perf_counter()
        await self._run("predictor.train", self.command(self.input_path, self.candidate_path))
        log.info("predictor.train on %d live records and %d base data file(s): %.1f s", len(train),
                 len(self.base_data), time.perf_counter() - started)
        if holdout:
            await loop.run_in_executor(None, write_lines_atomically, self.holdout_path, holdout)
            await self._check(len(holdout))
        # loaded before it replaces the serving model's file: a candidate that does not load (or a shutdown
        # meanwhile) leaves the file and the model the next check compares against the one that serves
        predictor = await loop.run_in_executor(
            None, lambda: Predictor.load(self.candidate_path, kv=self.kv, default_max_tokens=self.default_max_tokens))
        os.replace(self.candidate_path, self.model_path)
        self.current_path = self.model_path
        if self.priors is not None:
            predictor.priors = self.priors
        return predictor

    async def _check(self, held: int) -> None:
        new = await self._score(self.candidate_path)
        if self.current_path is not None and self.current_path.is_file():
            serving, old = "model", await self._score(self.current_path)
        else:
            serving, old = "priors", await self._score(None)
        self.last_check = {"newest_records": held, "serving": serving, "new_p90_coverage": new.coverage,
                           "serving_p90_coverage": old.coverage, "new_p90_quantile_loss": new.loss,
                           "serving_p90_quantile_loss": old.loss, "min_coverage": self.min_coverage,
                           "max_loss_increase": self.max_loss_increase}
        log.info("refit check on the newest %d records: p90 coverage %.1f%%, quantile loss %.1f (serving %s: "
                 "%.1f%%, %.1f)", held, 100 * new.coverage, new.loss, serving, 100 * old.coverage, old.loss)
        theirs, stays = SERVING_WORDS[serving]
        if new.coverage < self.min_coverage and new.coverage < old.coverage:
            raise RefitRejected(f"the new model covers {new.coverage:.1%} of the newest {held} records at p90, below "
                                f"predictor.online.min_coverage ({self.min_coverage:.0%}) and below {theirs} "
                                f"{old.coverage:.1%}; {stays}")
        if new.loss > old.loss * (1.0 + self.max_loss_increase) + LOSS_ALLOWANCE_TOKENS:
            raise RefitRejected(f"the new model's p90 quantile loss on the newest {held} records is {new.loss:.1f} "
                                f"tokens, more than predictor.online.max_loss_increase ({self.max_loss_increase:.0%}) "
                                f"above {theirs} {old.loss:.1f} tokens (p90 coverage {new.coverage:.1%} against "
                                f"{old.coverage:.1%}); {stays}")

    async def _score(self, model: Path | None) -> HoldoutScore:
        """``model``'s p90 coverage and quantile loss on the newest records; with None, the priors'."""
        # --explicit-roles: a live record's role is one its client sent, and the gateway served it with that role
        command = [sys.executable, "-m", "predictor.evaluate", "--data", str(self.holdout_path), "--split", "all",
                   "--format", "json", "--explicit-roles"]
        if model is None:
            priors = self.work_dir / PRIORS_NAME
            serving = self.priors if self.priors is not None else normalize_priors(None)
            await asyncio.get_running_loop().run_in_executor(
                None, priors.write_bytes, orjson.dumps(serving))  # {role: [p50, p90]}: tuples are JSON arrays
            command += ["--priors", str(priors)]
        else:
            command += ["--model", str(model)]
        out = await self._run("predictor.evaluate", command + self.cap_arguments())
        try:
            length = orjson.loads(out)["all"]["length"]
            return HoldoutScore(float(length["p90_coverage"]), float(length["p90_quantile_loss"]))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise RefitError(f"`python -m predictor.evaluate` printed no p90 coverage and quantile loss: {exc!r}") \
                from None

    def cap_arguments(self) -> list[str]:
        """evaluate's arguments that bound each held-out request's reservation as the gateway bounds it: the
        served models' contexts (a request never reserves more than the room its prompt leaves, and one without
        max_tokens may reserve all of it) and ``default_max_tokens`` where the caller set one. Without them
        evaluate would cap every request without max_tokens at 4096, and a model that reserves far too much on
        a long-context model would be charged only up to 4096."""
        arguments = []
        if self.kv is not None:
            for name, spec in sorted(self.kv.specs.items()):
                # A name no command line can carry (empty, or with a NUL) is left out, so that its requests are
                # capped at 4096 rather than every check failing; one word, so that a name starting with "-" is
                # not read as an option.
                if spec.max_model_len and name and "\x00" not in name:
                    arguments.append(f"--max-model-len={name}={spec.max_model_len}")
        if self.default_max_tokens is not None:
            arguments += ["--default-max-tokens", str(self.default_max_tokens)]
        return arguments

    async def _run(self, module: str, command: list[str]) -> bytes:
        """Run a child at a lower CPU priority and return its output; RefitError if it fails or runs too long."""
        child = await asyncio.create_subprocess_exec(*command, stdin=asyncio.subprocess.DEVNULL,
                                                     stdout=asyncio.subprocess.PIPE,
                                                     stderr=asyncio.subprocess.PIPE,
                                                     preexec_fn=_die_with_parent(os.getpid()))
        try:  # serving comes first: the fit gets the CPU the gateway leaves
            os.setpriority(os.PRIO_PROCESS, child.pid, REFIT_NICENESS)
        except (AttributeError, OSError):  # not on this platform, or the child is already gone
            pass
        left = self._deadline - asyncio.get_running_loop().time() if self._deadline is not None else self.timeout_s
        try:
            stdout, stderr = await asyncio.wait_for(child.communicate(), max(left, 0.0))
        except BaseException as exc:  # timeout, or the gateway is shutting down: do not leave a fit running
            if child.returncode is None:
                child.kill()
                await child.wait()
            if isinstance(exc, TimeoutError):
                raise RefitError(f"the refit ran longer than predictor.online.refit_timeout_s ({self.timeout_s:g} s): "
                                 f"`python -m {module}` was stopped") from None
            raise
        if child.returncode != 0:
            said = stderr.decode("utf-8", "replace").strip()[-STDERR_TAIL:]
            raise RefitError(f"`python -m {module}` exited with {child.returncode}: {said}")
        return stdout
