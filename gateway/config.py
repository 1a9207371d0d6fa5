"""Gateway configuration: one YAML file, validated into frozen dataclasses.

Why a hand-rolled validator instead of pydantic: the config is small, and the contract we promise operators
is "an invalid config exits with status 2 and one message naming the field" — easiest to guarantee when every
check names its dotted path explicitly (``clusters[0].pools[1].engines[0].url``).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml

from gateway.core.queue_policy import ORDERS
from gateway.state.base import MAX_TTL_S, MAX_WORKFLOW_RECORDS
from predictor.kv import known_bytes_per_token

ENGINE_KINDS = ("vllm", "vllm-omni")
STATE_BACKENDS = ("memory", "redis")


class ConfigError(ValueError):
    """A config value is wrong; ``field`` is the dotted path of the offending key."""

    def __init__(self, field_path: str, message: str) -> None:
        super().__init__(f"config error at {field_path}: {message}")
        self.field_path = field_path


@dataclass(frozen=True)
class ModelConfig:
    name: str
    max_model_len: int = 4096
    kv_bytes_per_token: int = 131072


@dataclass(frozen=True)
class SimulatedEngines:
    """Start ``count`` simulated engines in-process for this pool (the embedded default)."""

    count: int = 2
    time_scale: float = 1.0
    max_num_seqs: int = 128
    kv_blocks: int = 8192
    block_size: int = 16
    scheduling_policy: str = "fcfs"
    mean_output_tokens: int = 128
    wake_delay_s: float = 2.0
    tool_calling: bool = True  # accept tool choices (SimEngineOptions.tool_calling)
    vocab_size: int = 128256  # the model's vocabulary, bounding the token ids a request names (SimEngineOptions)
    max_logprobs: int = 20  # vLLM's --max-logprobs (-1: the vocabulary)


@dataclass(frozen=True)
class EngineConfig:
    url: str
    id: str = ""
    # sent as "Authorization: Bearer <key>" on every call to the engine (vLLM's --api-key); kept out of reprs
    api_key: str = field(default="", repr=False)


@dataclass(frozen=True)
class PoolConfig:
    name: str
    kind: str
    models: tuple[str, ...]
    engines: tuple[EngineConfig, ...] = ()
    simulated: SimulatedEngines | None = None
    # KV-cache capacity of each engine in tokens; 0 = take it from the engine's ``vllm:cache_config_info``
    # (num_gpu_blocks x block_size), or from ``simulated`` (kv_blocks x block_size)
    kv_capacity_tokens: int = 0


@dataclass(frozen=True)
class ClusterConfig:
    name: str
    pools: tuple[PoolConfig, ...]
    rtt_ms: float = 0.0


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: tuple[str, ...] = ()
    max_body_bytes: int = 4 * 1024 * 1024
    max_inflight: int = 4096
    # image requests among those: each holds its place for a whole generation (seconds to minutes) at engines
    # that work through one at a time, so without a smaller cap a backlog of images answered chat 429; 0: half
    max_inflight_images: int = 0
    gateway_id: str = ""
    shutdown_grace_s: float = 5.0  # on SIGTERM: how long requests in flight may finish before they are ended
    # browser origins allowed to call the API (CORS), as vLLM's --allowed-origins: "*" any, () none
    cors_allowed_origins: tuple[str, ...] = ("*",)
    # the client's request headers the engine gets (the rest stay at the gateway): W3C trace context for vLLM's
    # tracing, and the simulated engines' load-generator hint (no vLLM reads it)
    forward_headers: tuple[str, ...] = ("traceparent", "tracestate", "X-Sim-Output-Tokens")

    @property
    def image_inflight_limit(self) -> int:
        """Image requests the gateway holds at once (``max_inflight_images``, or half of ``max_inflight``)."""
        return self.max_inflight_images or max(1, self.max_inflight // 2)


@dataclass(frozen=True)
class StateConfig:
    backend: str = "memory"
    redis_url: str = "redis://127.0.0.1:6379/0"
    key_prefix: str = "maestro"
    engine_ttl_s: float = 10.0
    heartbeat_interval_s: float = 2.0
    redis_timeout_s: float = 1.0
    redis_max_connections: int = 64  # per gateway; more concurrent calls wait for one (within redis_timeout_s)
    # how many gateways share the store: the least each assumes when it divides an engine's free KV in an outage
    # (a gateway that starts while Redis is down has counted none, and took every engine whole)
    expected_gateways: int = 1
    # workflow records kept at most (about 1 kB each), the least recently active dropped for a new one: a client
    # sending a new X-Workflow-Id with every request filled memory or Redis for workflow_ttl_s
    max_workflows: int = MAX_WORKFLOW_RECORDS


@dataclass(frozen=True)
class TimeoutConfig:
    connect_s: float = 3.0  # TCP connect to an engine; a failure here is retried on another engine
    stream_idle_s: float = 120.0  # longest silence inside a stream, or a whole answer's body (504 if no byte yet)
    total_s: float = 900.0  # whole request, non-streaming generation included
    scrape_s: float = 2.0  # one /metrics scrape of an engine
    admin_s: float = 30.0  # sleep / wake_up and other admin calls to engines


@dataclass(frozen=True)
class MonitorConfig:
    interval_s: float = 0.25
    down_after_failures: int = 3
    up_after_successes: int = 1


@dataclass(frozen=True)
class RoutingConfig:
    policy: str = "least_loaded"
    max_retries: int = 2
    # how a request picks among clusters that serve its model: latency_aware | least_loaded | round_robin
    cluster_policy: str = "latency_aware"
    spill_margin_s: float = 0.0  # latency_aware: a farther cluster must be estimated faster by this much


@dataclass(frozen=True)
class SLOClassConfig:
    """Targets for one class of traffic: first token within ``ttft_s``, then ``tpot_s`` per output token;
    a workflow of this class that names no deadline gets ``workflow_deadline_s`` from its first request."""

    name: str
    ttft_s: float
    tpot_s: float
    workflow_deadline_s: float | None = None


DEFAULT_SLO_CLASSES = (
    SLOClassConfig("interactive", ttft_s=2.0, tpot_s=0.1),
    SLOClassConfig("batch", ttft_s=30.0, tpot_s=0.2, workflow_deadline_s=600.0),
)
QUEUE_POLICY_NAMES = ("fcfs", "edf", "maestro", "lsf")
ADMISSION_NAMES = ("none", "max_tokens", "predicted")
MAESTRO_ORDERS = ORDERS  # the one list, kept by the policy that reads it


@dataclass(frozen=True)
class SchedulingConfig:
    """The pool queues (gateway.scheduling) and the pure core they drive (gateway.core.scheduler)."""

    queue_policy: str = "fcfs"  # fcfs | edf | maestro | lsf (see gateway/core/queue_policy.py)
    admission: str = "none"  # none | max_tokens | predicted (KV reservation before dispatch)
    default_slo_class: str = "interactive"  # requests without workflow context
    workflow_slo_class: str = "batch"  # workflow requests that name no class
    max_outstanding_per_engine: int = 0  # dispatched and unfinished requests per engine; 0 = no cap
    max_wait_s: float = 600.0  # maestro, lsf: a request waiting longer is served oldest first (no starvation)
    maestro_order: str = "work"  # maestro's order among feasible workflow steps: work | slack | due
    short_s: float = 2.0  # lsf: interactive calls predicted to take at most this are protected
    mean_step_s: float = 5.0  # initial mean service time of one workflow step (then learned online)
    step_time_window_s: float = 60.0  # the learned mean is over about this many seconds of completed steps
    default_steps: int = 0  # remaining steps assumed for a workflow that gives no X-Workflow-Steps hint
    token_time_s: float = 0.02  # predicted service seconds per output token (service-time estimate)
    prefill_token_time_s: float = 0.0002  # ... and per prompt token
    block_size: int = 16  # KV block size reservations are rounded to
    grow_step_tokens: int = 256  # a streaming reservation grows in chunks of this many tokens
    engine_priority: bool = True  # edf/maestro/lsf: send vLLM's ``priority`` (lower first) when the client set none
    tick_s: float = 0.05  # re-plan period while requests wait (aging, releases by other gateways)
    ledger_lease_s: float = 30.0  # a reservation expires this long after its last refresh (dead gateways)
    workflow_ttl_s: float = 3600.0  # a workflow record expires this long after its last activity


@dataclass(frozen=True)
class OnlineLearningConfig:
    """Completed chat requests become trace records in a bounded buffer, and a child process refits the model
    on them (plus ``base_data``) every ``refit_every`` records or ``refit_interval_s`` seconds."""
    enabled: bool = False
    buffer: str = "file"  # memory | file (JSONL, survives restarts) | redis (a stream shared by gateways)
    path: str = "maestro-online/records.jsonl"  # the file buffer; a trace file `maestro predictor train` reads
    # the redis buffer's stream (on state.redis_url); unset: "{state.key_prefix}:predictor:traces", so that
    # gateways kept apart by their key prefix (prod, staging) do not train on each other's traffic
    redis_key: str = "maestro:predictor:traces"
    max_records: int = 50_000  # the buffer keeps the latest this many...
    max_bytes: int = 256 * 1024 * 1024  # ...and no more than this in all (as JSONL); a larger record is not kept
    refit_every: int = 1000  # new records between refits
    refit_interval_s: float = 600.0  # ...or this long, whichever comes first, if any record came
    min_records: int = 200  # buffered records needed before a refit
    base_data: tuple[str, ...] = ()  # trace files every refit also trains on (e.g. imported public traces)
    work_dir: str = "maestro-online"  # the refit's input file and, unless save_path is set, its model
    save_path: str = ""  # where each refit writes its model; point model_path here to start from it
    refit_timeout_s: float = 3600.0  # a refit (fit and check) running longer is killed (the old model serves on)
    holdout_share: float = 0.1  # newest live records left out of a refit to check its model (0: no check)
    min_coverage: float = 0.8  # a new model under this p90 coverage there, and under the serving one's, is refused
    max_loss_increase: float = 0.5  # ...as is one whose p90 quantile loss there exceeds serving's × (1 + this)


ONLINE_BUFFERS = ("memory", "file", "redis")


@dataclass(frozen=True)
class PredictorConfig:
    model_path: str = ""  # a model file from ``maestro predictor train``; empty = per-role priors
    priors: tuple[tuple[str, int, int], ...] = ()  # (role, p50, p90) overrides of the built-in priors
    online: OnlineLearningConfig = field(default_factory=OnlineLearningConfig)


@dataclass(frozen=True)
class Config:
    clusters: tuple[ClusterConfig, ...]
    models: tuple[ModelConfig, ...] = ()
    server: ServerConfig = field(default_factory=ServerConfig)
    state: StateConfig = field(default_factory=StateConfig)
    timeouts: TimeoutConfig = field(default_factory=TimeoutConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    slo_classes: tuple[SLOClassConfig, ...] = DEFAULT_SLO_CLASSES
    scheduling: SchedulingConfig = field(default_factory=SchedulingConfig)
    predictor: PredictorConfig = field(default_factory=PredictorConfig)

    def slo_class(self, name: str) -> SLOClassConfig | None:
        for slo in self.slo_classes:
            if slo.name == name:
                return slo
        return None

    def model(self, name: str) -> ModelConfig | None:
        for model in self.models:
            if model.name == name:
                return model
        return None

    def pools(self) -> list[tuple[ClusterConfig, PoolConfig]]:
        return [(cluster, pool) for cluster in self.clusters for pool in cluster.pools]


# --------------------------------------------------------------------------------------------------------
# validation helpers: each takes the dotted path so errors name the field


def _mapping(value: Any, path: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(path, f"expected a mapping, got {type(value).__name__}")
    return value


def _reject_unknown(section: dict[str, Any], allowed: set[str], path: str) -> None:
    for key in section:
        if key not in allowed:
            where = f"{path}.{key}" if path else str(key)
            raise ConfigError(where, f"unknown key (allowed: {', '.join(sorted(allowed))})")


def _get(section: dict[str, Any], key: str, kind: type | tuple[type, ...], path: str, default: Any) -> Any:
    where = f"{path}.{key}" if path else key
    if key not in section or section[key] is None:
        if default is _REQUIRED:
            raise ConfigError(where, "is required")
        return default
    value = section[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    # bool is an int subclass; never accept it where a number is meant
    if isinstance(value, bool) and bool not in kinds:
        raise ConfigError(where, f"expected {_kind_name(kinds)}, got a boolean")
    if float in kinds and isinstance(value, int):
        value = float(value)
    if not isinstance(value, kinds):
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        hint = " (YAML reads 8e6 as text: write 8000000)" if isinstance(value, str) and int in kinds \
            and re.fullmatch(r"[+-]?[0-9.]+e[+-]?[0-9]+", value, re.IGNORECASE) else ""
        raise ConfigError(where, f"expected {_kind_name(kinds)}, got {type(value).__name__} {shown}{hint}")
    # YAML's .nan and .inf: NaN passes every comparison check (an interval of NaN seconds is a busy loop) and
    # infinity overflows where a duration becomes an integer. A setting that means "off" with .inf says so itself.
    if isinstance(value, float) and not math.isfinite(value) and where not in _INFINITY_ALLOWED:
        raise ConfigError(where, f"must be a finite number, got {value}")
    return value


_INFINITY_ALLOWED = frozenset({"predictor.online.max_loss_increase"})  # .inf: the loss check is off


def _kind_name(kinds: tuple[type, ...]) -> str:
    return " or ".join({int: "an integer", float: "a number", str: "a string", bool: "a boolean",
                        list: "a list", dict: "a mapping"}.get(k, k.__name__) for k in kinds)


def _positive(value: float, path: str, allow_zero: bool = False) -> None:
    if not (value >= 0) or (value == 0 and not allow_zero):  # written so that NaN fails
        raise ConfigError(path, f"must be {'>= 0' if allow_zero else '> 0'}, got {value}")


_REQUIRED = object()


def _parse_url(value: str, path: str) -> str:
    """An engine's base URL: http(s), a host, a valid port if any, nothing after it (the gateway appends the
    API paths to it)."""
    try:
        parsed = urlparse(value)
        parsed.port  # noqa: B018 - raises ValueError on a port that is no number or out of range
    except ValueError as exc:
        raise ConfigError(path, f"is not a valid URL ({exc}): {value!r}") from None
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ConfigError(path, f"must be an http(s) URL with a host, got {value!r}")
    if parsed.path not in ("", "/"):
        raise ConfigError(path, f"give the engine's base URL without a path (no /v1), got {value!r}")
    if parsed.query or parsed.fragment or parsed.username or parsed.password or value.rstrip("/").endswith(("?", "#")):
        raise ConfigError(path, f"give the engine's base URL without a query, fragment or user, got {value!r}")
    return value.rstrip("/")


# Headers server.forward_headers may not name: the gateway sets them itself (the body's framing and type, the
# engine's request id), they describe one hop only (RFC 9110 7.6.1), they carry the client's credentials, or
# the engine would act on them for the client (vLLM's data-parallel rank, and its X-Vllm-Priority, which overrides
# the body's priority the gateway sets; uvicorn's proxy headers).
NEVER_FORWARDED = frozenset({
    "host", "content-length", "content-type", "content-encoding", "transfer-encoding", "accept-encoding",
    "connection", "keep-alive", "proxy-connection", "te", "trailer", "upgrade", "expect",
    "authorization", "proxy-authorization", "cookie", "x-api-key",
    "x-request-id", "x-data-parallel-rank", "x-vllm-priority",
    "forwarded", "x-forwarded-for", "x-forwarded-host", "x-forwarded-proto", "x-forwarded-port", "x-real-ip", "via",
})
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110's token


def _check_forwarded_header(name: object, path: str) -> None:
    if not isinstance(name, str) or not _HEADER_NAME.fullmatch(name):
        raise ConfigError(path, f"must be an HTTP header name such as traceparent, got {name!r}")
    if name.lower() in NEVER_FORWARDED:
        raise ConfigError(path, f"{name} is never forwarded: the gateway sets it, it belongs to one hop, it carries "
                                "the client's credentials, or the engine would act on it for the client")


def _check_redis_url(value: str, path: str) -> None:
    """What redis-py's from_url would refuse at the first call (a bad port, an option that is no number), here,
    so that it is a config error and not a traceback while the gateway starts."""
    from redis.asyncio.connection import parse_url  # local: only parse_config needs them here

    from gateway.state.redis import redact_url

    if urlparse(value).scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(path, f"must be a redis:// URL, got {redact_url(value)!r}")
    try:
        parse_url(value)
    except (ValueError, TypeError) as exc:
        shown = redact_url(value)
        # redis-py's message may quote a piece of a password it misread as the port ("Port could not be cast to
        # integer value as 'Xy7'" for a password with a "/" in it): with a password in the URL, only a hint
        why = exc if shown == value else "a port that is no number, or a password with / ? # not percent-encoded"
        raise ConfigError(path, f"is not a valid Redis URL ({why}): {shown!r}") from None


def _section(raw: dict[str, Any], cls: type, path: str, checks: dict[str, str], key: str | None = None) -> Any:
    """Build a flat dataclass section from ``raw[key or path]``; ``checks`` maps field -> 'positive' | 'nonneg'
    | 'ttl' (a positive TTL the state stores take: at most ``MAX_TTL_S``) | ''."""
    section = _mapping(raw.get(key or path), path)
    defaults = cls()
    allowed = set(cls.__dataclass_fields__)
    _reject_unknown(section, allowed, path)
    values: dict[str, Any] = {}
    for name in allowed:
        default = getattr(defaults, name)
        kind: type | tuple[type, ...] = type(default)
        if isinstance(default, tuple):
            kind = list
        value = _get(section, name, kind, path, default)
        if isinstance(value, list):
            value = tuple(value)
        rule = checks.get(name, "")
        if rule:
            _positive(value, f"{path}.{name}", allow_zero=(rule == "nonneg"))
        if rule == "ttl" and value > MAX_TTL_S:
            raise ConfigError(f"{path}.{name}", f"must be at most {MAX_TTL_S:.0f} (ten years), got {value}")
        values[name] = value
    return cls(**values)


_SIMULATED_DIT_KEYS = ("count", "time_scale")


def _parse_simulated(raw: Any, path: str) -> SimulatedEngines:
    section = _mapping(raw, path)
    defaults = SimulatedEngines()
    _reject_unknown(section, set(SimulatedEngines.__dataclass_fields__), path)
    values = {}
    for name in SimulatedEngines.__dataclass_fields__:
        default = getattr(defaults, name)
        values[name] = _get(section, name, type(default), path, default)
        if isinstance(default, (int, float)) and not isinstance(default, bool) and name not in ("wake_delay_s",
                                                                                                "max_logprobs"):
            _positive(values[name], f"{path}.{name}")
    if values["scheduling_policy"] not in ("fcfs", "priority"):
        raise ConfigError(f"{path}.scheduling_policy", "must be 'fcfs' or 'priority'")
    _positive(values["wake_delay_s"], f"{path}.wake_delay_s", allow_zero=True)
    if values["max_logprobs"] < -1:
        raise ConfigError(f"{path}.max_logprobs", "must be -1 (the vocabulary) or a number >= 0")
    return SimulatedEngines(**values)


def _check_simulated(pool: PoolConfig, models: list[ModelConfig], path: str) -> None:
    """Build the simulated engines' options now, so a bad combination exits 2 at load, not at start-up."""
    from gateway.simulated import sim_options_for  # local import: keeps config free of engine code at import

    max_model_len = next((m.max_model_len for m in models if m.name == pool.models[0]), 4096)
    try:
        sim_options_for(pool, max_model_len).validate()
    except ValueError as exc:
        raise ConfigError(path, str(exc)) from None


def _api_key(section: dict, path: str, default: str) -> str:
    """An engine's API key: ``api_key`` as written, or ``api_key_env``, the environment variable that holds it
    (read now: a key that is not set stops the start, not every request later); else ``default``."""
    if "api_key" in section and "api_key_env" in section:
        raise ConfigError(path, "give api_key or api_key_env, not both")
    if "api_key_env" in section:
        name = _get(section, "api_key_env", str, path, _REQUIRED)
        value = os.environ.get(name, "").strip()  # a key read from a file often ends in a newline
        if not value:
            raise ConfigError(f"{path}.api_key_env", f"the environment variable {name!r} is not set or empty")
        if not _API_KEY.fullmatch(value):
            raise ConfigError(f"{path}.api_key_env", f"the key in {name!r} must be printable ASCII without spaces "
                                                     "(it goes into an HTTP header)")
        return value
    if "api_key" in section:
        value = _get(section, "api_key", str, path, _REQUIRED)
        if not _API_KEY.fullmatch(value):
            raise ConfigError(f"{path}.api_key", "must be a non-empty key of printable ASCII without spaces (it "
                                                 "goes into an HTTP header)")
        return value
    return default


_API_KEY = re.compile(r"[!-~]+")  # visible ASCII: what an Authorization header can carry as it is


def _parse_pool(raw: Any, path: str, model_names: set[str]) -> PoolConfig:
    section = _mapping(raw, path)
    _reject_unknown(section, {"name", "kind", "models", "engines", "simulated", "kv_capacity_tokens", "api_key",
                              "api_key_env"}, path)
    name = _get(section, "name", str, path, _REQUIRED)
    kind = _get(section, "kind", str, path, "vllm")
    if kind not in ENGINE_KINDS:
        raise ConfigError(f"{path}.kind", f"must be one of {', '.join(ENGINE_KINDS)}, got {kind!r}")
    models = _get(section, "models", list, path, _REQUIRED)
    if not models:
        raise ConfigError(f"{path}.models", "must name at least one model")
    for i, model in enumerate(models):
        if not isinstance(model, str) or not model:
            raise ConfigError(f"{path}.models[{i}]", "must be a non-empty string")
        if model_names and model not in model_names:
            raise ConfigError(f"{path}.models[{i}]", f"model {model!r} is not declared under models")
    engines = []
    pool_key = _api_key(section, path, "")
    for i, engine in enumerate(_get(section, "engines", list, path, [])):
        epath = f"{path}.engines[{i}]"
        if isinstance(engine, str):
            engine = {"url": engine}
        engine = _mapping(engine, epath)
        _reject_unknown(engine, {"url", "id", "api_key", "api_key_env"}, epath)
        url = _parse_url(_get(engine, "url", str, epath, _REQUIRED), f"{epath}.url")
        engines.append(EngineConfig(url=url, id=_get(engine, "id", str, epath, ""),
                                    api_key=_api_key(engine, epath, pool_key)))
    simulated = None
    if section.get("simulated") is not None:
        simulated = _parse_simulated(section["simulated"], f"{path}.simulated")
        if kind == "vllm-omni":  # the simulated DiT engine takes these two; the others are an LLM engine's
            for key in section["simulated"]:
                if key not in _SIMULATED_DIT_KEYS:
                    raise ConfigError(f"{path}.simulated.{key}", "a simulated vllm-omni (DiT) engine takes only "
                                                                 f"{' and '.join(_SIMULATED_DIT_KEYS)}")
        if len(models) != 1:
            raise ConfigError(f"{path}.models", "a simulated pool serves exactly one model")
    if kind == "vllm-omni" and len(models) != 1:  # every engine of a pool serves each of its models
        raise ConfigError(f"{path}.models", "a vllm-omni pool serves exactly one model: a vLLM-Omni engine serves "
                                            "one and answers 400 for any other (give each model its own pool)")
    if not engines and simulated is None:
        raise ConfigError(f"{path}.engines", "a pool needs at least one engine (or a 'simulated' block)")
    kv_capacity = _get(section, "kv_capacity_tokens", int, path, 0)
    _positive(kv_capacity, f"{path}.kv_capacity_tokens", allow_zero=True)
    return PoolConfig(name=name, kind=kind, models=tuple(models), engines=tuple(engines), simulated=simulated,
                      kv_capacity_tokens=kv_capacity)


def _parse_slo_classes(raw: Any) -> tuple[SLOClassConfig, ...]:
    """``slo_classes: {name: {ttft_s, tpot_s, workflow_deadline_s}}``; merged over the built-in classes."""
    section = _mapping(raw, "slo_classes")
    classes = {slo.name: slo for slo in DEFAULT_SLO_CLASSES}
    for name, body in section.items():
        path = f"slo_classes.{name}"
        if not isinstance(name, str) or not name or len(name) > 64:
            raise ConfigError(path, "a class name must be a non-empty string of at most 64 characters")
        body = _mapping(body, path)
        _reject_unknown(body, {"ttft_s", "tpot_s", "workflow_deadline_s"}, path)
        base = classes.get(name)
        ttft_s = _get(body, "ttft_s", float, path, base.ttft_s if base else _REQUIRED)
        tpot_s = _get(body, "tpot_s", float, path, base.tpot_s if base else _REQUIRED)
        deadline = _get(body, "workflow_deadline_s", float, path, base.workflow_deadline_s if base else None)
        _positive(ttft_s, f"{path}.ttft_s")
        _positive(tpot_s, f"{path}.tpot_s")
        if deadline is not None:
            _positive(deadline, f"{path}.workflow_deadline_s")
        classes[name] = SLOClassConfig(name, ttft_s, tpot_s, deadline)
    return tuple(classes.values())


def _parse_scheduling(root: dict[str, Any], slo_classes: tuple[SLOClassConfig, ...]) -> SchedulingConfig:
    checks = {name: "positive" for name in ("max_wait_s", "short_s", "mean_step_s", "step_time_window_s",
                                            "token_time_s", "block_size", "grow_step_tokens", "tick_s")}
    checks.update(ledger_lease_s="ttl", workflow_ttl_s="ttl")  # kept in the state store
    checks.update(max_outstanding_per_engine="nonneg", default_steps="nonneg", prefill_token_time_s="nonneg")
    scheduling = _section(root, SchedulingConfig, "scheduling", checks)
    if scheduling.queue_policy not in QUEUE_POLICY_NAMES:
        raise ConfigError("scheduling.queue_policy",
                          f"must be one of {', '.join(QUEUE_POLICY_NAMES)}, got {scheduling.queue_policy!r}")
    if scheduling.maestro_order not in MAESTRO_ORDERS:
        raise ConfigError("scheduling.maestro_order",
                          f"must be one of {', '.join(MAESTRO_ORDERS)}, got {scheduling.maestro_order!r}")
    if scheduling.admission not in ADMISSION_NAMES:
        raise ConfigError("scheduling.admission",
                          f"must be one of {', '.join(ADMISSION_NAMES)}, got {scheduling.admission!r}")
    names = {slo.name for slo in slo_classes}
    for key in ("default_slo_class", "workflow_slo_class"):
        if getattr(scheduling, key) not in names:
            raise ConfigError(f"scheduling.{key}", f"names no class under slo_classes "
                                                   f"(known: {', '.join(sorted(names))})")
    return scheduling


def _parse_predictor(raw: Any) -> PredictorConfig:
    section = _mapping(raw, "predictor")
    _reject_unknown(section, {"model_path", "priors", "online"}, "predictor")
    model_path = _get(section, "model_path", str, "predictor", "")
    priors = []
    for role, value in _mapping(section.get("priors"), "predictor.priors").items():
        path = f"predictor.priors.{role}"
        value = _mapping(value, path)
        _reject_unknown(value, {"p50", "p90"}, path)
        p50 = _get(value, "p50", int, path, _REQUIRED)
        p90 = _get(value, "p90", int, path, _REQUIRED)
        _positive(p50, f"{path}.p50")
        if p90 < p50:
            raise ConfigError(f"{path}.p90", f"must be >= p50 ({p50}), got {p90}")
        priors.append((str(role), p50, p90))
    if priors:
        try:
            from predictor.predictor import normalize_priors  # local import: numpy only when priors are given
        except ImportError:  # pragma: no cover - the predictor package is part of this repository
            normalize_priors = None
        if normalize_priors is not None:
            try:
                normalize_priors({role: {"p50": p50, "p90": p90} for role, p50, p90 in priors})
            except ValueError as exc:
                raise ConfigError("predictor.priors", str(exc)) from None
    return PredictorConfig(model_path=model_path, priors=tuple(priors), online=_parse_online(section))


def _parse_online(predictor: dict[str, Any]) -> OnlineLearningConfig:
    path = "predictor.online"
    checks = {name: "positive" for name in ("max_records", "max_bytes", "refit_every", "refit_interval_s",
                                            "min_records", "refit_timeout_s")}
    online = _section(predictor, OnlineLearningConfig, path, checks, key="online")
    if online.buffer not in ONLINE_BUFFERS:
        raise ConfigError(f"{path}.buffer", f"must be one of {', '.join(ONLINE_BUFFERS)}, got {online.buffer!r}")
    for name in ("path", "work_dir", "redis_key"):
        if not getattr(online, name):
            raise ConfigError(f"{path}.{name}", "must not be empty")
    if not 0.0 <= online.holdout_share < 1.0:
        raise ConfigError(f"{path}.holdout_share", f"must be >= 0 and < 1, got {online.holdout_share}")
    if not 0.0 <= online.min_coverage <= 1.0:
        raise ConfigError(f"{path}.min_coverage", f"must be between 0 and 1, got {online.min_coverage}")
    if not online.max_loss_increase >= 0.0:  # NaN fails too
        raise ConfigError(f"{path}.max_loss_increase", f"must be >= 0, got {online.max_loss_increase}")
    if online.min_records > online.max_records:
        raise ConfigError(f"{path}.min_records", f"must be <= max_records ({online.max_records}): the buffer never "
                                                 f"holds more, so no refit would ever run")
    if online.buffer == "file" and online.path.endswith(".gz"):
        raise ConfigError(f"{path}.path", "the file buffer writes plain JSONL; give a .jsonl path")
    written: set[Path] = set()  # the files each refit writes
    buffer_file: Path | None = None
    if online.enabled:
        buffer_file = Path(online.path).resolve() if online.buffer == "file" else None
        # local import, only when on: the predictor package brings numpy, which a gateway without it never loads
        from predictor.refit_command import HOLDOUT_NAME, INPUT_NAME, PRIORS_NAME, candidate_path, refit_model_path

        model = refit_model_path(online.work_dir, online.save_path).resolve()
        written = {Path(online.work_dir, name).resolve() for name in (INPUT_NAME, HOLDOUT_NAME, PRIORS_NAME)}
        written |= {model, candidate_path(model)}
        if buffer_file in written:
            raise ConfigError(f"{path}.path", f"is a file each refit writes ({online.path}); choose another")
    named: dict[str, int] = {}
    for i, data in enumerate(online.base_data):
        if not isinstance(data, str) or not data:
            raise ConfigError(f"{path}.base_data[{i}]", "must be a trace file's path")
        real = os.path.realpath(data)
        if real in named:  # training refuses a file given twice: every refit would fail
            raise ConfigError(f"{path}.base_data[{i}]", f"names the file of base_data[{named[real]}] again")
        named[real] = i
        if Path(real) in written:  # the first refit's model would replace an operator's traces
            raise ConfigError(f"{path}.base_data[{i}]", f"is a file each refit writes ({data}); choose another")
        if online.enabled and Path(real) == buffer_file:
            raise ConfigError(f"{path}.base_data[{i}]", f"is the buffer's own file ({data}): every refit reads the "
                                                        "live records from it already, and its check would be "
                                                        "trained on the records it holds out")
        if online.enabled and not Path(data).is_file():  # said at load, not an hour later at the first refit
            raise ConfigError(f"{path}.base_data[{i}]", f"no such file: {data}")
    return online


def _parse_models(root: dict[str, Any]) -> list[ModelConfig]:
    """``models``: each served model's name, context and KV bytes per token (none declared: an empty list)."""
    models = []
    for i, model in enumerate(_get(root, "models", list, "", [])):
        path = f"models[{i}]"
        model = _mapping(model, path)
        _reject_unknown(model, {"name", "max_model_len", "kv_bytes_per_token"}, path)
        name = _get(model, "name", str, path, _REQUIRED)
        if not name.strip() or "\x00" in name:  # no client could ask for it by name
            raise ConfigError(f"{path}.name", f"must be a model's name, not {name!r}")
        kv_bytes = _get(model, "kv_bytes_per_token", int, path, None)
        parsed = ModelConfig(
            name=name,
            max_model_len=_get(model, "max_model_len", int, path, 4096),
            # unset: the architecture's figure where the name is a known model (Llama-3-70B: 327680), else 131072
            kv_bytes_per_token=known_bytes_per_token(name) if kv_bytes is None else kv_bytes,
        )
        _positive(parsed.max_model_len, f"{path}.max_model_len")
        _positive(parsed.kv_bytes_per_token, f"{path}.kv_bytes_per_token")
        if any(m.name == parsed.name for m in models):
            raise ConfigError(f"{path}.name", f"model {parsed.name!r} is declared twice")
        models.append(parsed)
    return models


def _parse_clusters(root: dict[str, Any], model_names: set[str]) -> list[ClusterConfig]:
    """``clusters``, their pools and engines; every cluster, pool, engine URL and engine id named once."""
    clusters = []
    raw_clusters = _get(root, "clusters", list, "", _REQUIRED)
    if not raw_clusters:
        raise ConfigError("clusters", "must hold at least one cluster")
    seen_pools: set[str] = set()
    seen_urls: set[str] = set()
    seen_clusters: set[str] = set()
    seen_engine_ids: dict[str, str] = {}  # effective engine id -> where it was given
    for i, cluster in enumerate(raw_clusters):
        path = f"clusters[{i}]"
        cluster = _mapping(cluster, path)
        _reject_unknown(cluster, {"name", "pools", "rtt_ms"}, path)
        name = _get(cluster, "name", str, path, _REQUIRED)
        if name in seen_clusters:
            raise ConfigError(f"{path}.name", f"cluster {name!r} appears twice")
        seen_clusters.add(name)
        rtt_ms = _get(cluster, "rtt_ms", float, path, 0.0)
        _positive(rtt_ms, f"{path}.rtt_ms", allow_zero=True)
        raw_pools = _get(cluster, "pools", list, path, _REQUIRED)
        if not raw_pools:
            raise ConfigError(f"{path}.pools", "must hold at least one pool")
        pools = []
        for j, pool in enumerate(raw_pools):
            ppath = f"{path}.pools[{j}]"
            parsed_pool = _parse_pool(pool, ppath, model_names)
            key = f"{name}/{parsed_pool.name}"
            if key in seen_pools:
                raise ConfigError(f"{ppath}.name", f"pool {parsed_pool.name!r} appears twice in cluster {name!r}")
            seen_pools.add(key)
            for k, engine in enumerate(parsed_pool.engines):
                if engine.url in seen_urls:
                    raise ConfigError(f"{ppath}.engines[{k}].url", f"engine {engine.url} is listed twice")
                seen_urls.add(engine.url)
            # the ids the gateway will know its engines by (gateway.app: the id given, else cluster/pool/index,
            # simulated engines after the listed ones): two alike, and one engine would silently replace the other
            simulated_count = parsed_pool.simulated.count if parsed_pool.simulated is not None else 0
            for k in range(len(parsed_pool.engines) + simulated_count):
                given = parsed_pool.engines[k].id if k < len(parsed_pool.engines) else ""
                engine_id = given or f"{name}/{parsed_pool.name}/{k}"
                where = f"{ppath}.engines[{k}].id" if given else f"{ppath} (engine {k})"
                if engine_id in seen_engine_ids:
                    raise ConfigError(where, f"engine id {engine_id!r} is already the id of "
                                             f"{seen_engine_ids[engine_id]}")
                seen_engine_ids[engine_id] = where
            pools.append(parsed_pool)
        clusters.append(ClusterConfig(name=name, pools=tuple(pools), rtt_ms=rtt_ms))
    return clusters


def _parse_server(root: dict[str, Any]) -> ServerConfig:
    """``server``: where it listens, its limits, API keys, CORS origins and forwarded headers."""
    server = _section(root, ServerConfig, "server", {"port": "nonneg", "max_body_bytes": "positive",
                                                     "max_inflight": "positive", "max_inflight_images": "nonneg",
                                                     "shutdown_grace_s": "nonneg"})
    if server.max_inflight_images > server.max_inflight:
        raise ConfigError("server.max_inflight_images", f"must be at most server.max_inflight "
                                                        f"({server.max_inflight}), got {server.max_inflight_images}")
    if server.port > 65535:
        raise ConfigError("server.port", f"must be <= 65535, got {server.port}")
    if not server.host.strip():  # aiohttp would listen on every interface, at odd ports
        raise ConfigError("server.host", "must not be empty (0.0.0.0 listens on every interface)")
    for i, key in enumerate(server.api_keys):
        if not isinstance(key, str) or not key:
            raise ConfigError(f"server.api_keys[{i}]", "must be a non-empty string")
        if key != key.strip() or not key.isprintable():  # a padded key was accepted, then every request a 401
            raise ConfigError(f"server.api_keys[{i}]", "must not start or end with a space or hold a control "
                                                       "character: a client's key is read without the spaces "
                                                       "around it, so none would match")
    for i, origin in enumerate(server.cors_allowed_origins):
        if not isinstance(origin, str) or not origin or origin != origin.strip():
            raise ConfigError(f"server.cors_allowed_origins[{i}]", "must be an origin such as https://app.example "
                                                                   "or \"*\"")
    for i, name in enumerate(server.forward_headers):
        _check_forwarded_header(name, f"server.forward_headers[{i}]")
    return server


def _parse_state(root: dict[str, Any]) -> StateConfig:
    """``state``: the store's backend (memory or Redis) and its timings."""
    state = _section(root, StateConfig, "state", {"engine_ttl_s": "ttl", "heartbeat_interval_s": "positive",
                                                  "redis_timeout_s": "positive", "redis_max_connections": "positive",
                                                  "expected_gateways": "positive", "max_workflows": "positive"})
    if state.backend not in STATE_BACKENDS:
        raise ConfigError("state.backend", f"must be one of {', '.join(STATE_BACKENDS)}, got {state.backend!r}")
    _check_redis_url(state.redis_url, "state.redis_url")
    return state


def _parse_routing(root: dict[str, Any]) -> RoutingConfig:
    """``routing``: the engine and cluster routing policies (names the core knows) and retries."""
    from gateway.core.cluster_routing import CLUSTER_ROUTING_POLICIES  # local imports: config must not pull
    from gateway.core.routing import ROUTING_POLICIES  # the core at import

    routing = _section(root, RoutingConfig, "routing", {"max_retries": "nonneg", "spill_margin_s": "nonneg"})
    if routing.policy not in ROUTING_POLICIES:
        raise ConfigError("routing.policy", f"must be one of {', '.join(sorted(ROUTING_POLICIES))}")
    if routing.cluster_policy not in CLUSTER_ROUTING_POLICIES:
        raise ConfigError("routing.cluster_policy",
                          f"must be one of {', '.join(sorted(CLUSTER_ROUTING_POLICIES))}")
    return routing


def parse_config(raw: Any) -> Config:
    """Validate a parsed YAML document and build a :class:`Config`; raise :class:`ConfigError`."""
    root = _mapping(raw, "<root>")
    _reject_unknown(root, {"clusters", "models", "server", "state", "timeouts", "monitor", "routing", "slo_classes",
                           "scheduling", "predictor"}, "")
    models = _parse_models(root)
    clusters = _parse_clusters(root, {m.name for m in models})
    server = _parse_server(root)
    state = _parse_state(root)
    timeouts = _section(root, TimeoutConfig, "timeouts", {k: "positive" for k in TimeoutConfig.__dataclass_fields__})
    monitor = _section(root, MonitorConfig, "monitor", {k: "positive" for k in MonitorConfig.__dataclass_fields__})
    routing = _parse_routing(root)
    slo_classes = _parse_slo_classes(root.get("slo_classes"))
    scheduling = _parse_scheduling(root, slo_classes)
    predictor = _parse_predictor(root.get("predictor"))
    online_raw = predictor_raw.get("online") if isinstance(predictor_raw := root.get("predictor"), dict) else None
    if not (isinstance(online_raw, dict) and "redis_key" in online_raw):
        predictor = replace(predictor, online=replace(predictor.online,
                                                      redis_key=f"{state.key_prefix}:predictor:traces"))

    for i, cluster in enumerate(clusters):
        for j, pool in enumerate(cluster.pools):
            if pool.simulated is not None:
                _check_simulated(pool, models, f"clusters[{i}].pools[{j}].simulated")
    if not models:
        # Models may be left implicit: every model a pool names gets defaults.
        names = sorted({m for c in clusters for p in c.pools for m in p.models})
        models = [ModelConfig(name=n, kv_bytes_per_token=known_bytes_per_token(n)) for n in names]  # as declared
    return Config(clusters=tuple(clusters), models=tuple(models), server=server, state=state,
                  timeouts=timeouts, monitor=monitor, routing=routing, slo_classes=slo_classes,
                  scheduling=scheduling, predictor=predictor)


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, except that a key given twice in one mapping is an error: PyYAML keeps the last one
    silently, so a second ``server:`` block would replace the first without a word.

    The check runs where PyYAML flattens merge keys (``<<: *anchor``), once per mapping and before the
    flattening rewrites it: the merged keys then come in front of the mapping's own, which may give them again
    (that is what a merge is for), and a mapping merged into another is checked before it is rewritten."""

    def __init__(self, stream) -> None:
        super().__init__(stream)
        self._checked: set[int] = set()

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        if id(node) not in self._checked:
            self._checked.add(id(node))
            seen: set = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node)
                try:
                    duplicate = key in seen
                    seen.add(key)
                except TypeError:  # an unhashable key: construct_mapping itself says so
                    continue
                if duplicate:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark, f"found the key {key!r} twice",
                        key_node.start_mark)
        super().flatten_mapping(node)


def config_warnings(config: Config) -> list[str]:
    """Settings that are valid but work against each other: said by ``check-config`` and at ``serve``'s start."""
    warnings = []
    scheduling, total_s = config.scheduling, config.timeouts.total_s
    if scheduling.queue_policy in ("maestro", "lsf") and scheduling.max_wait_s >= total_s:
        warnings.append(f"scheduling.max_wait_s ({scheduling.max_wait_s:g} s) is not below timeouts.total_s "
                        f"({total_s:g} s): a request leaves the queue with a 503 queue_timeout before it has waited "
                        f"long enough to be served first, so {scheduling.queue_policy}'s aging never keeps a "
                        "request from starving; set max_wait_s below total_s")
    for i, key in enumerate(config.server.api_keys):
        if not key.isascii():  # the gateway compares its UTF-8 bytes, which a raw HTTP client can send
            warnings.append(f"server.api_keys[{i}] is not ASCII: the OpenAI SDK's HTTP client refuses to send such "
                            "a key in a header, so SDK clients cannot use it")
    return warnings


def load_config(path: str | Path) -> Config:
    """Read and validate a YAML config file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError("<file>", f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError("<file>", f"{path} is not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "<file>"
        raise ConfigError(where, f"invalid YAML: {getattr(exc, 'problem', exc)}") from None
    return parse_config(raw)


DEFAULT_MODEL = "maestro-sim-llama-8b"
DEFAULT_IMAGE_MODEL = "maestro-sim-dit"


def default_config() -> Config:
    """The embedded default: one cluster with a pool of four simulated vLLM engines and one simulated DiT
    (vLLM-Omni) engine, in-memory state."""
    return parse_config({
        "models": [{"name": DEFAULT_MODEL, "max_model_len": 8192, "kv_bytes_per_token": 131072},
                   {"name": DEFAULT_IMAGE_MODEL}],
        "clusters": [{
            "name": "local",
            "pools": [{"name": "sim", "kind": "vllm", "models": [DEFAULT_MODEL], "simulated": {"count": 4}},
                      {"name": "sim-dit", "kind": "vllm-omni", "models": [DEFAULT_IMAGE_MODEL],
                       "simulated": {"count": 1}}],
        }],
    })
