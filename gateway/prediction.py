"""The gateway's use of the predictor: prompt size, output-length quantiles and role for one request.

A trained model (``predictor.model_path``) is loaded at start-up in an executor (it unpickles scikit-learn
objects); without one, per-role priors (built-in, overridden by ``predictor.priors``) are used. One
``predict()`` costs well under 0.5 ms (character-based token estimate plus, with a model, a small GBM), so it
runs inline on the request path. If the predictor fails on a request, a plain estimate is used instead: a bad
prediction must never fail a request.

With ``predictor.online.enabled``, completed chat requests also become trace records (:meth:`record`, which
never waits on the buffer) and a child process refits the model from them in the background
(:mod:`predictor.online`, :mod:`predictor.refit_command`); predictions come from whichever model is current.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.tasks import cancel_and_wait

from gateway.config import Config, ConfigError

log = logging.getLogger("maestro.prediction")

FALLBACK_OUTPUT = 256  # output tokens assumed when nothing better is known


def model_path_to_load(config: Config) -> str:
    """``predictor.model_path``, or "" where there is nothing to load yet: online learning writes that very file
    at its first refit, and priors serve until then."""
    path = config.predictor.model_path
    online = config.predictor.online
    if path and online.enabled and not Path(path).exists() and Path(path).resolve() == _refit_model_path(config):
        return ""
    return path


def _refit_model_path(config: Config) -> Path:
    from predictor.refit_command import refit_model_path

    online = config.predictor.online
    return refit_model_path(online.work_dir, online.save_path).resolve()


# At shutdown, how long the records waiting for the trace buffer may take to be stored (the rest are counted as
# dropped): the whole stop has to fit Docker's 10 s after server.shutdown_grace_s (5 s), and a Redis buffer that
# stopped answering takes its 5 s socket timeout per record, which made a stop take 15 s.
SHUTDOWN_DRAIN_S = 1.0


def check_predictor_files(config: Config) -> None:
    """Raise :class:`ConfigError` for what ``maestro serve`` would refuse about the predictor's files, without
    locking or leaving anything (``maestro check-config``): the model file must load, and online learning's folders
    must be folders this process can create or write into (tried with a folder made and removed at once)."""
    path = model_path_to_load(config)
    if path:
        from predictor.kv import KVModel
        from predictor.model_file import ModelFileError
        from predictor.predictor import Predictor

        try:
            Predictor.load(path, kv=KVModel.from_models(config.models, block_size=config.scheduling.block_size))
        except ModelFileError as exc:
            raise ConfigError("predictor.model_path", str(exc)) from None
    online = config.predictor.online
    if online.enabled:
        _check_folder(Path(online.work_dir), "predictor.online.work_dir")
        if online.buffer == "file":
            _check_folder(Path(online.path).parent, "predictor.online.path")


def _check_folder(folder: Path, field: str) -> None:
    """``folder`` is a writable folder, or the nearest part of it that exists is one (serve would create it).

    Writable is tried, not asked: a folder made and removed at once in the nearest existing part. ``os.access``
    says yes to root everywhere, /proc included, where serve then fails to make the folder."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(field, f"cannot use {folder}: {existing} is not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".maestro-check-", dir=existing))
    except OSError as exc:
        raise ConfigError(field, f"cannot use {folder}: cannot make a folder in {existing} "
                                 f"({exc.strerror or exc})") from None


def _import_predictor() -> None:
    """The predictor's modules, and roles.yaml read and parsed (kept; 30 ms of YAML on the event loop at the
    first workflow request, where the predictor was built), in an executor."""
    import predictor.kv  # noqa: F401
    import predictor.predictor  # noqa: F401
    import predictor.tokens  # noqa: F401
    from predictor.features import role_label_rules

    role_label_rules()


@dataclass(frozen=True, slots=True)
class Estimate:
    role: str
    prompt_tokens: int
    p50: int
    p90: int


class RequestPredictor:
    def __init__(self, config: Config, metrics: Any = None) -> None:
        self.config = config
        if metrics is not None and config.predictor.online.enabled:  # gateway.metrics.GatewayMetrics
            metrics.watch_online_learning(lambda: self.learner.status() if self.learner is not None else None)
        self._predictor: Any = None
        self._loaded_path: str | None = None  # the model file loaded at start (None: priors serve)
        self._estimate_tokens: Any = None
        self._failures = 0
        self._loading: asyncio.Task | None = None
        self.learner: Any = None  # predictor.online.OnlineLearner when online learning is on
        self._redis: Any = None  # the redis buffer's client
        self._refit: Any = None  # predictor.refit_command.TrainCommandRefit, holding its work_dir's lock
        self._buffer_lock: Any = None  # the file buffer's lock file, held while this gateway writes it

    def load_soon(self) -> None:
        """Load in the background (first use on a gateway that did not need a predictor at start-up): requests
        use the plain estimate until it is there, and the event loop never waits for the imports."""
        if self._predictor is None and self._loading is None:
            self._loading = asyncio.get_running_loop().create_task(self.load())

    async def load(self) -> None:
        """Build the predictor. Imports (numpy) and a model file (file I/O plus unpickling) run in an executor."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, _import_predictor)
        from predictor.kv import KVModel
        from predictor.model_file import ModelFileError
        from predictor.predictor import Predictor
        from predictor.tokens import estimate_tokens

        self._estimate_tokens = estimate_tokens
        kv = KVModel.from_models(self.config.models, block_size=self.config.scheduling.block_size)
        priors = {role: {"p50": p50, "p90": p90} for role, p50, p90 in self.config.predictor.priors}
        path = model_path_to_load(self.config)
        if self.config.predictor.model_path and not path:
            log.info("predictor.model_path %s does not exist yet (online learning writes it): priors until the "
                     "first refit", self.config.predictor.model_path)
        if path:
            try:
                model = await loop.run_in_executor(None, lambda: Predictor.load(path, kv=kv))
            except ModelFileError as exc:
                raise ConfigError("predictor.model_path", str(exc)) from None
            if priors:
                from predictor.predictor import normalize_priors

                model.priors = normalize_priors(priors)
            self._predictor, self._loaded_path = model, path
            log.info("predictor model loaded from %s", path)
        else:
            self._predictor = Predictor.from_priors(priors or None, kv=kv)
        if self.config.predictor.online.enabled:
            await self._start_learning(kv, priors, serving=path or None)

    async def _start_learning(self, kv: Any, priors: dict[str, Any], serving: str | None) -> None:
        from predictor.online import OnlineLearner
        from predictor.trace_buffers import FileTraceBuffer, MemoryBuffer, RedisStreamBuffer
        from predictor.refit_command import TrainCommandRefit, UnusablePath, WorkDirInUse, claim

        online = self.config.predictor.online
        refit = TrainCommandRefit(online.work_dir, base_data=online.base_data, save_path=online.save_path or None,
                                  kv=kv, default_max_tokens=self._predictor.default_max_tokens,
                                  priors=priors or None, timeout_s=online.refit_timeout_s,
                                  holdout_share=online.holdout_share, min_coverage=online.min_coverage,
                                  max_loss_increase=online.max_loss_increase,
                                  current_path=serving)
        try:
            refit.lock()
        except WorkDirInUse as exc:
            raise ConfigError(exc.field, str(exc)) from None
        except UnusablePath as exc:  # a path through a file, a folder that cannot be made
            raise ConfigError(exc.field, f"cannot use it: {exc}") from None
        self._refit = refit
        buffer: Any
        if online.buffer == "file":  # reads the file back: in an executor, it can hold 100,000 lines
            records = Path(online.path)
            try:
                if records.is_dir():
                    raise IsADirectoryError(f"{records} is a folder; give a file name such as "
                                            f"{records / 'records.jsonl'}")
                records.parent.mkdir(parents=True, exist_ok=True)
                self._buffer_lock = claim(records.with_name(records.name + ".lock"),
                                          f"{records} (predictor.online.path)", "predictor.online.path")
                buffer = await asyncio.get_running_loop().run_in_executor(
                    None, lambda: FileTraceBuffer(online.path, maxlen=online.max_records,
                                            max_bytes=online.max_bytes))
            except WorkDirInUse as exc:
                raise ConfigError(exc.field, str(exc)) from None
            except OSError as exc:
                raise ConfigError("predictor.online.path", f"cannot use it: {exc}") from None
        elif online.buffer == "redis":
            import redis.asyncio as aioredis
            from redis.asyncio.retry import Retry  # the asyncio one: redis-py warns about (and converts) the other
            from redis.backoff import NoBackoff

            timeout = max(5.0, self.config.state.redis_timeout_s)  # off the request path: a snapshot is large
            self._redis = aioredis.Redis.from_url(self.config.state.redis_url, socket_timeout=timeout,
                                                  socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0))
            buffer = RedisStreamBuffer(self._redis, online.redis_key, maxlen=online.max_records,
                                       max_bytes=online.max_bytes)
        else:
            buffer = MemoryBuffer(online.max_records, online.max_bytes)
        self.learner = OnlineLearner(self._predictor, buffer, refit_every=online.refit_every,
                                     refit_interval_s=online.refit_interval_s, min_records=online.min_records,
                                     refit=refit)
        self.learner.start()
        log.info("online learning on: %s buffer, refit every %d records or %.0f s", online.buffer,
                 online.refit_every, online.refit_interval_s)

    async def close(self) -> None:
        await cancel_and_wait(self._loading)
        if self.learner is not None:
            await self.learner.stop(cancel_refit=True, drain_timeout_s=SHUTDOWN_DRAIN_S)
            self.learner = None
        if self._refit is not None:
            self._refit.unlock()
            self._refit = None
        if self._buffer_lock is not None:
            self._buffer_lock.close()
            self._buffer_lock = None
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None

    def status(self) -> dict[str, Any]:
        predictor = self.learner.predictor if self.learner is not None else self._predictor
        # the file of the model serving: after a refit, the refit's (predictor.online.save_path), not the configured;
        # none while priors serve (a configured path online learning has not written yet)
        serving = self._refit.current_path if self._refit is not None else None
        model_path = str(serving) if serving is not None else self._loaded_path
        return {"loaded": predictor is not None, "model_path": model_path,
                "trained": bool(predictor is not None and predictor.trained),
                "online": None if self.learner is None else dict(
                    self.learner.status(), check=self._refit.last_check if self._refit is not None else None)}

    def refit_now(self) -> bool:
        """Start a refit unless one runs (``POST /admin/predictor/refit``); False when online learning is off."""
        if self.learner is None:
            return False
        self.learner.trigger()
        return True

    def record(self, body: Mapping[str, Any], usage: Mapping[str, Any], headers: Mapping[str, str] | None,
               size: int = 0) -> None:
        """Hand a completed chat request (the client's body, of ``size`` bytes as sent, and the engine's usage) to
        online learning."""
        learner = self.learner
        if learner is not None:
            try:
                learner.submit(body, usage, headers, size)
            except Exception:  # noqa: BLE001 - training data must never fail a request that succeeded
                log.exception("could not record a completed request for online learning")

    @property
    def loaded(self) -> bool:
        return self._predictor is not None

    def predict(self, body: Mapping[str, Any], headers: Mapping[str, str] | None, raw_size: int,
                max_tokens: int | None, context_len: int | None) -> Estimate:
        predictor = self.learner.predictor if self.learner is not None else self._predictor
        if predictor is not None:
            try:
                legacy = "messages" not in body  # a legacy completion: the predictor reads chat bodies
                if legacy and "max_completion_tokens" in body:
                    # vLLM ignores this chat field on completions, and so must the predictor's output cap
                    body = {key: value for key, value in body.items() if key != "max_completion_tokens"}
                prediction = predictor.predict(body, headers)
                prompt = self._prompt_of_completion(body, raw_size) if legacy else prediction.prompt_tokens
                return Estimate(prediction.role, max(1, prompt), max(1, prediction.p50),
                                max(1, prediction.p90))
            except Exception:  # noqa: BLE001 - a predictor bug must not fail the request
                self._failures += 1
                if self._failures <= 3:
                    log.exception("predictor failed; using a plain estimate")
        prompt = max(1, raw_size // 4)
        cap = max_tokens or (max(1, context_len - prompt) if context_len else FALLBACK_OUTPUT)
        output = min(cap, FALLBACK_OUTPUT)
        return Estimate("other", prompt, output, output)

    def _prompt_of_completion(self, body: Mapping[str, Any], raw_size: int) -> int:
        prompt = body.get("prompt")
        if isinstance(prompt, str) and self._estimate_tokens is not None:
            return int(self._estimate_tokens(prompt))
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            return len(prompt)
        return raw_size // 4
