"""Prometheus metrics of one simulated engine, with vLLM's names, labels and histogram buckets.

Names come from :mod:`backends.vllm_names` (one place for names). Every series carries
``engine="0"`` and ``model_name=<served name>`` like a real single-engine-core vLLM server, except the two that
vLLM does not give an engine label either: ``vllm:cache_config_info`` (no ``model_name``) and the frontend's
``vllm:admission_rejections`` (``model_name`` and ``reason``). Each simulated engine
has its own :class:`prometheus_client.CollectorRegistry`, so many engines can live in one process.

Latency histograms are observed in **wall-clock seconds** (what a client of the simulated engine sees), i.e.
engine time divided by ``time_scale``.
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from backends.vllm_names import (
    ADMISSION_REASONS,
    COUNTER_ADMISSION_REJECTIONS,
    COUNTER_GENERATION_TOKENS,
    COUNTER_PREEMPTIONS,
    COUNTER_PROMPT_TOKENS,
    COUNTER_REQUEST_SUCCESS,
    GAUGE_KV_CACHE_USAGE,
    GAUGE_REQUESTS_RUNNING,
    GAUGE_REQUESTS_WAITING,
    GAUGE_SLEEP_STATE,
    INFO_CACHE_CONFIG,
    HIST_DECODE_TIME,
    HIST_E2E,
    HIST_GENERATION_TOKENS,
    HIST_INTER_TOKEN,
    HIST_PREFILL_TIME,
    HIST_PROMPT_TOKENS,
    HIST_QUEUE_TIME,
    HIST_TTFT,
    LABEL_ENGINE,
    LABEL_MODEL,
)

ENGINE_INDEX = "0"
FINISH_REASONS = ("stop", "length", "abort", "error", "repetition")
SLEEP_STATES = ("awake", "weights_offloaded", "discard_all")  # level 0, 1, 2

# Bucket edges as in vLLM's PrometheusStatLogger (vllm/v1/metrics/loggers.py).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                           120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


def build_1_2_5_buckets(max_value: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to ``max_value`` (vLLM's token-count buckets)."""
    buckets: list[int] = []
    exponent = 0
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * 10 ** exponent
            if value > max_value:
                return buckets
            buckets.append(value)
        exponent += 1


class SimEngineMetrics:
    """The registry and pre-labelled children the engine updates."""

    def __init__(self, model_name: str, max_model_len: int, *, running: Callable[[], float],
                 waiting: Callable[[], float], kv_usage: Callable[[], float], kv_blocks: int | None = None,
                 block_size: int = 16) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        names = (LABEL_ENGINE, LABEL_MODEL)
        values = (ENGINE_INDEX, model_name)
        reg = self.registry

        def gauge(name: str, doc: str, fn: Callable[[], float]) -> None:
            Gauge(name, doc, names, registry=reg).labels(*values).set_function(fn)

        gauge(GAUGE_REQUESTS_RUNNING, "Number of requests in model execution batches.", running)
        gauge(GAUGE_REQUESTS_WAITING, "Number of requests waiting to be processed.", waiting)
        gauge(GAUGE_KV_CACHE_USAGE, "KV-cache usage. 1 means 100 percent usage.", kv_usage)
        if kv_blocks is not None:
            # vLLM exports its CacheConfig as labels of an info gauge (value 1), without model_name
            info = {LABEL_ENGINE: ENGINE_INDEX, "block_size": str(block_size), "cache_dtype": "auto",
                    "enable_prefix_caching": "True", "num_cpu_blocks": "None", "num_gpu_blocks": str(kv_blocks)}
            Gauge(INFO_CACHE_CONFIG, "Information of the LLMEngine CacheConfig", tuple(info),
                  registry=reg).labels(**info).set(1.0)
        sleep = Gauge(GAUGE_SLEEP_STATE, "Engine sleep state; awake = 0 means engine is sleeping; "
                      "awake = 1 means engine is awake; weights_offloaded = 1 means sleep level 1; "
                      "discard_all = 1 means sleep level 2.", names + ("sleep_state",), registry=reg)
        self._sleep = [sleep.labels(*values, state) for state in SLEEP_STATES]
        self.set_sleep_level(None)

        self.preemptions = Counter(COUNTER_PREEMPTIONS, "Cumulative number of preemption from the engine.",
                                   names, registry=reg).labels(*values)
        self.prompt_tokens = Counter(COUNTER_PROMPT_TOKENS, "Number of prefill tokens processed.",
                                     names, registry=reg).labels(*values)
        self.generation_tokens = Counter(COUNTER_GENERATION_TOKENS, "Number of generation tokens processed.",
                                         names, registry=reg).labels(*values)
        success = Counter(COUNTER_REQUEST_SUCCESS, "Count of successfully processed requests.",
                          names + ("finished_reason",), registry=reg)
        self.success = {reason: success.labels(*values, reason) for reason in FINISH_REASONS}
        rejections = Counter(COUNTER_ADMISSION_REJECTIONS, "Number of admission attempts rejected by a queue limit, "
                             "by reason.", (LABEL_MODEL, "reason"), registry=reg)  # the frontend's: no engine label
        self.admission_rejections = {reason: rejections.labels(model_name, reason) for reason in ADMISSION_REASONS}

        def hist(name: str, doc: str, buckets) -> Histogram:
            return Histogram(name, doc, names, buckets=buckets, registry=reg).labels(*values)

        self.ttft = hist(HIST_TTFT, "Histogram of time to first token in seconds.", TTFT_BUCKETS)
        self.itl = hist(HIST_INTER_TOKEN, "Histogram of inter-token latency in seconds.", ITL_BUCKETS)
        self.e2e = hist(HIST_E2E, "Histogram of e2e request latency in seconds.", REQUEST_LATENCY_BUCKETS)
        self.queue_time = hist(HIST_QUEUE_TIME, "Histogram of time spent in WAITING phase for request.",
                               REQUEST_LATENCY_BUCKETS)
        self.prefill_time = hist(HIST_PREFILL_TIME, "Histogram of time spent in PREFILL phase for request.",
                                 REQUEST_LATENCY_BUCKETS)
        self.decode_time = hist(HIST_DECODE_TIME, "Histogram of time spent in DECODE phase for request.",
                                REQUEST_LATENCY_BUCKETS)
        token_buckets = build_1_2_5_buckets(max_model_len)
        self.request_prompt_tokens = hist(HIST_PROMPT_TOKENS, "Number of prefill tokens processed.",
                                          token_buckets)
        self.request_generation_tokens = hist(HIST_GENERATION_TOKENS, "Number of generation tokens processed.",
                                              token_buckets)

    def set_sleep_level(self, level: int | None) -> None:
        """``None``: awake. 0, 1, 2: asleep at that level, as vLLM 0.32's ``record_sleep_state`` sets them:
        ``awake`` 0, and ``weights_offloaded`` (level 1) or ``discard_all`` (level 2) 1; level 0 (a pause that
        frees nothing) sets neither."""
        awake, offloaded, discarded = self._sleep
        awake.set(1.0 if level is None else 0.0)
        offloaded.set(1.0 if level == 1 else 0.0)
        discarded.set(1.0 if level == 2 else 0.0)

    def render(self) -> bytes:
        return generate_latest(self.registry)
