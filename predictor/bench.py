"""``maestro bench predictor``: the cost of one ``Predictor.predict()`` call, single-threaded.

Loads a model (timing the load in this process), takes requests from trace files (sources in turn, random
records within each), and times ``predict()`` on each, one at a time, after a short warm-up. Prints JSON:
p50/p90/p99/mean µs per call (wall clock, and the calling thread's CPU time, which other processes on a busy
machine do not inflate), the model file size and load time, and a machine yardstick (a fixed pure-Python loop
timed the same way, with the p50 expressed in it) to compare runs on a shared VM whose speed varies by day.
By default the system-prompt memo of the text encoder is on (agents resend the same system prompt, so this is
the steady state); ``--no-cache`` measures every request as if it were the first of its agent.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from predictor.cli import non_negative_int, positive_int

    parser.add_argument("--model", required=True, help="model file written by `maestro predictor train`")
    parser.add_argument("--data", nargs="+", required=True, metavar="FILE",
                        help="trace files whose requests are replayed (.jsonl / .jsonl.gz)")
    parser.add_argument("--requests", type=positive_int, default=3000, help="requests to time (>= 1, default 3000)")
    parser.add_argument("--warmup", type=non_negative_int, default=200, help="untimed calls first (default 200)")
    parser.add_argument("--no-cache", action="store_true", help="disable the system-prompt memo")
    parser.add_argument("--seed", type=int, default=0, help="request sampling seed")


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, int(round(q * (len(sorted_values) - 1)))))
    return sorted_values[index]


def machine_reference_us(repeats: int = 200) -> float:
    """Median µs of a fixed pure-Python loop, timed like ``predict()``: a yardstick for the machine's speed at the
    time of the run, so readings taken on a shared VM on different days can be compared (predict / reference)."""
    timings = []
    for _ in range(repeats):
        t0 = time.perf_counter_ns()
        sum(i * i for i in range(2000))
        timings.append((time.perf_counter_ns() - t0) / 1000.0)
    timings.sort()
    return round(_percentile(timings, 0.5), 1)


def run(model: str, data: list[str], requests: int = 3000, warmup: int = 200, cache: bool = True,
        seed: int = 0) -> dict[str, Any]:
    if requests < 1 or warmup < 0:  # no timings to take percentiles and a mean of
        raise ValueError(f"need requests >= 1 and warmup >= 0, got requests={requests}, warmup={warmup}")
    started = time.perf_counter()
    from predictor.predictor import Predictor

    predictor = Predictor.load(model)
    load_s = time.perf_counter() - started
    if not cache and predictor.text_model is not None:
        predictor.text_model.encoder.cache_size = 0

    from predictor.train import load_records, request_of

    records = load_records(data)
    if not records:
        raise ValueError("no records in --data")
    # Sources take turns, so one large single-turn source does not make up the whole sample.
    by_source: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        by_source.setdefault(record.get("source", ""), []).append(record)
    pools = [by_source[name] for name in sorted(by_source)]
    rng = random.Random(seed)
    picked = [rng.choice(pools[i % len(pools)]) for i in range(requests)]
    calls = [request_of(record) for record in picked]
    for body, headers in calls[:warmup]:
        predictor.predict(body, headers)
    if not cache and predictor.text_model is not None:
        predictor.text_model.encoder._cache.clear()
    timings, cpu = [], []
    clock, thread_clock = time.perf_counter_ns, time.thread_time_ns
    for body, headers in calls:
        c0 = thread_clock()
        t0 = clock()
        predictor.predict(body, headers)
        t1 = clock()
        c1 = thread_clock()
        timings.append((t1 - t0) / 1000.0)
        cpu.append((c1 - c0) / 1000.0)
    timings.sort()
    cpu.sort()
    reference = machine_reference_us()
    return {
        "model": model,
        "model_bytes": os.path.getsize(model),
        "load_s": round(load_s, 4),
        "requests": len(timings),
        "sources": {name: len(items) for name, items in sorted(by_source.items())},
        "cache": cache,
        "predict_us": {"p50": round(_percentile(timings, 0.5), 1), "p90": round(_percentile(timings, 0.9), 1),
                       "p99": round(_percentile(timings, 0.99), 1), "mean": round(sum(timings) / len(timings), 1),
                       "max": round(timings[-1], 1)},
        # CPU time of this thread per call: what the call costs, unaffected by other processes on the machine
        "predict_cpu_us": {"p50": round(_percentile(cpu, 0.5), 1), "p90": round(_percentile(cpu, 0.9), 1),
                           "p99": round(_percentile(cpu, 0.99), 1), "mean": round(sum(cpu) / len(cpu), 1)},
        "machine_reference_us": reference,
        "p50_in_references": round(_percentile(timings, 0.5) / reference, 2),
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
    }


def main(args: argparse.Namespace) -> int:
    import orjson

    from predictor.model_file import ModelFileError

    try:
        result = run(args.model, args.data, args.requests, args.warmup, not args.no_cache, args.seed)
    except (ModelFileError, ValueError, OSError) as exc:
        print(f"maestro bench predictor: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode() + "\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    parser = argparse.ArgumentParser(prog="python -m predictor.bench")
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
