"""Trace replay: real request timestamps and token counts from the Azure 2023 and Mooncake FAST'25 traces.

=======================  ==================================================  ================================
name                     file (read in place)                                 rows / span
=======================  ==================================================  ================================
azure-code               azure-llm-inference-2023/AzureLLMInferenceTrace_code  8,819 / ~57 min
azure-conv               azure-llm-inference-2023/AzureLLMInferenceTrace_conv  19,366 / ~58 min
mooncake-conversation    mooncake-fast25-traces/conversation_trace             12,031 / ~59 min
mooncake-synthetic       mooncake-fast25-traces/synthetic_trace                3,993 / ~17 min
=======================  ==================================================  ================================

Each row is one single call (Azure: ``TIMESTAMP``, ``ContextTokens``, ``GeneratedTokens``; Mooncake:
``timestamp`` ms, ``input_length``, ``output_length``). Replay keeps the trace's order and spacing:
``arrival_s = (t - t_start) / time_scale`` where ``t_start`` is the first timestamp plus ``start_s``; rows before
``t_start`` or after ``duration_s`` (in replayed seconds) are dropped. ``time_scale = 10`` plays the trace ten
times faster (10x the rate, same burst shape). Output counts of 0 (a few Azure rows) become 1.
"""

from __future__ import annotations

import csv
import gzip
import io
from dataclasses import dataclass
from datetime import date
from functools import lru_cache

import numpy as np
import orjson

from loadgen.workloads.data import AZURE_2023, MOONCAKE, dataset_path

REPLAYS = ("azure-code", "azure-conv", "mooncake-conversation", "mooncake-synthetic")


@dataclass(frozen=True)
class TraceRows:
    name: str
    times_s: np.ndarray  # seconds from the trace's first row, sorted
    prompt_tokens: np.ndarray
    output_tokens: np.ndarray


def _azure_seconds(stamp: str) -> float:
    day, _, clock = stamp.strip().partition(" ")
    hours, minutes, seconds = clock.split(":")
    return date.fromisoformat(day).toordinal() * 86400.0 + int(hours) * 3600 + int(minutes) * 60 + float(seconds)


@lru_cache(maxsize=8)
def load_trace_rows(name: str) -> TraceRows:
    """All rows of replay trace ``name`` (one of :data:`REPLAYS`)."""
    if name not in REPLAYS:
        raise ValueError(f"unknown replay trace {name!r}; use one of {', '.join(REPLAYS)}")
    times: list[float] = []
    prompts: list[int] = []
    outputs: list[int] = []
    if name.startswith("azure-"):
        kind = name.split("-", 1)[1]
        path = dataset_path(AZURE_2023, f"AzureLLMInferenceTrace_{kind}.csv")
        with open(path, encoding="utf-8", newline="") as handle:
            for row in csv.DictReader(handle):
                try:
                    times.append(_azure_seconds(row["TIMESTAMP"]))
                    prompts.append(int(row["ContextTokens"]))
                    outputs.append(int(row["GeneratedTokens"]))
                except (KeyError, ValueError, AttributeError):
                    continue
    else:
        stem = name.split("-", 1)[1] + "_trace.jsonl"
        path = dataset_path(MOONCAKE, stem + ".gz", stem)
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as raw:
            for line in io.BufferedReader(raw) if path.suffix == ".gz" else raw:
                if not line.strip():
                    continue
                try:
                    row = orjson.loads(line)
                    times.append(float(row["timestamp"]) / 1000.0)
                    prompts.append(int(row["input_length"]))
                    outputs.append(int(row["output_length"]))
                except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                    continue
    if not times:
        raise ValueError(f"replay trace {name!r}: no readable rows in {path}")
    t = np.asarray(times)
    order = np.argsort(t, kind="stable")
    t = t[order]
    return TraceRows(name, t - t[0], np.maximum(1, np.asarray(prompts)[order]),
                     np.maximum(1, np.asarray(outputs)[order]))


def replay_requests(name: str, *, time_scale: float = 1.0, start_s: float = 0.0,
                    duration_s: float | None = None,
                    max_requests: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(arrival_s, prompt_tokens, output_tokens) of the replayed rows, arrival already divided by ``time_scale``."""
    if not time_scale > 0:
        raise ValueError(f"time_scale must be > 0, got {time_scale!r}")
    if not start_s >= 0:  # a negative start would replay an empty stretch before the trace's first call
        raise ValueError(f"replay start must be >= 0 trace seconds, got {start_s!r}")
    if max_requests is not None and max_requests < 1:  # a negative slice bound would drop the last calls
        raise ValueError(f"replay max requests must be >= 1, got {max_requests!r}")
    rows = load_trace_rows(name)
    arrival = (rows.times_s - start_s) / time_scale
    keep = arrival >= 0
    if duration_s is not None:
        keep &= arrival < duration_s
    index = np.flatnonzero(keep)
    if max_requests is not None:
        index = index[:max_requests]
    return arrival[index], rows.prompt_tokens[index], rows.output_tokens[index]


def trace_span_s(name: str) -> float:
    """Seconds from the first to the last call of replay trace ``name``."""
    return float(load_trace_rows(name).times_s[-1])


def length_pairs(name: str) -> tuple[np.ndarray, np.ndarray]:
    """(prompt_tokens, output_tokens) of every row: an empirical joint length distribution."""
    rows = load_trace_rows(name)
    return rows.prompt_tokens, rows.output_tokens
