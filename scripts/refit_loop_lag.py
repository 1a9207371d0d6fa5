"""How much an online refit delays the gateway's event loop: a child process (the gateway's way) against a
thread of the gateway (the library's default executor).

A heartbeat sleeps 10 ms at a time on the loop and records how late it wakes; any lateness is added to every
request the gateway handles at that moment. Run from the repository root:

    python scripts/refit_loop_lag.py --data /tmp/maestro-traces/*.jsonl.gz

Prints one JSON line per mode: the fit's wall time and the heartbeat's lateness (p50, p99, max, in ms).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from predictor.online import OnlineLearner  # noqa: E402
from predictor.trace_buffers import MemoryBuffer  # noqa: E402
from predictor.refit_command import TrainCommandRefit  # noqa: E402
from predictor.trace import read_records  # noqa: E402


async def measure(learner: OnlineLearner, seconds_idle: float = 3.0) -> dict:
    lateness: list[float] = []
    stop = asyncio.Event()

    async def heartbeat():
        while not stop.is_set():
            started = time.perf_counter()
            await asyncio.sleep(0.01)
            lateness.append(time.perf_counter() - started - 0.01)

    beat = asyncio.create_task(heartbeat())
    started = time.perf_counter()
    await learner.trigger()
    fit_s = time.perf_counter() - started
    stop.set()
    await beat
    if learner.last_error is not None:
        raise SystemExit(f"refit failed: {learner.last_error}")
    ms = np.array(lateness) * 1000
    return {"fit_s": round(fit_s, 1), "beats": len(ms), "late_ms_p50": round(float(np.percentile(ms, 50)), 2),
            "late_ms_p99": round(float(np.percentile(ms, 99)), 2), "late_ms_max": round(float(ms.max()), 1)}


async def idle() -> dict:
    lateness = []
    end = time.perf_counter() + 5
    while time.perf_counter() < end:
        started = time.perf_counter()
        await asyncio.sleep(0.01)
        lateness.append(time.perf_counter() - started - 0.01)
    ms = np.array(lateness) * 1000
    return {"beats": len(ms), "late_ms_p50": round(float(np.percentile(ms, 50)), 2),
            "late_ms_p99": round(float(np.percentile(ms, 99)), 2), "late_ms_max": round(float(ms.max()), 1)}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs="+", required=True, help="trace files the refit trains on")
    parser.add_argument("--modes", nargs="+", default=["idle", "child", "thread"],
                        choices=["idle", "child", "thread"])
    args = parser.parse_args()
    for mode in args.modes:
        if mode == "idle":
            print(orjson.dumps({"mode": "idle (no refit)", **await idle()}).decode(), flush=True)
            continue
        with tempfile.TemporaryDirectory() as work:
            if mode == "child":  # the gateway's refit: base data read by the child, nothing live
                learner = OnlineLearner(buffer=MemoryBuffer(), min_records=0,
                                        refit=TrainCommandRefit(work, base_data=args.data))
            else:  # the same records fitted in a thread of this process
                records = [r for path in args.data for r in read_records(Path(path))]
                learner = OnlineLearner(buffer=MemoryBuffer(), min_records=0, base_records=records)
            result = await measure(learner)
            print(orjson.dumps({"mode": f"{mode} refit", **result}).decode(), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
