"""Arrival processes (all seeded through a ``numpy.random.Generator``): when workflow instances start.

``generate_arrivals(kind, rate, duration_s, rng, ...)`` returns sorted arrival times in ``[0, duration_s)``:

- ``poisson``: exponential inter-arrival times, mean ``1 / rate``.
- ``gamma``: Gamma renewal process with mean ``1 / rate`` and coefficient of variation ``cv`` (shape
  ``1 / cv**2``): ``cv > 1`` is bursty, ``cv = 1`` is Poisson. Without ``cv`` the ServeGen value is used: the
  request-weighted ``cv_quantile`` (default 0.9) of the CV over the Gamma-fitted client windows of the chosen
  ServeGen category (:func:`servegen_gamma_cv`; needs the data). On the data (weighted median / p90): language
  (m-small) 1.14 / 2.59, reason (deepseek-r1) 1.00 / 1.52, multimodal (mm-image) 1.00 / 4.77 -- most client
  windows are close to Poisson, the burstiness lives in the upper tail, hence the 0.9 default.
- ``servegen``: multi-tenant production-like arrivals from ServeGen's per-client, per-10-minute fits
  (``../shared/data/servegen-client-arrival-params``): every client active in a chosen window draws from its
  fitted inter-arrival distribution (Gamma or Weibull, shape ``param1``; the scale is set so the mean equals the
  window's ``rate_rps``, which for the Gamma fits is ServeGen's own ``param2`` within rounding), parameters
  switch every 600 s, the clients are superposed, and the time axis is then stretched so the mean rate over
  the run equals ``rate``. This keeps the burstiness (and, for long runs, the shifts between windows) and only
  changes the scale.
- ``constant``: evenly spaced (a deterministic baseline).

ServeGen column meanings (checked on the data): for ``Gamma`` rows ``param1 = shape = 1/cv**2`` and ``param2``
is the scale in seconds (``shape * scale * rate_rps`` has median 1.000); for ``Weibull`` rows ``param1`` is the
shape ``k`` and ``param2`` the scale in seconds.
"""

from __future__ import annotations

import csv
import gzip
import io
import math
from collections import defaultdict
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from loadgen.workloads.data import SERVEGEN, dataset_path

ARRIVALS = ("poisson", "gamma", "servegen", "constant")
SERVEGEN_FILE = "servegen_client_windows.csv.gz"
SERVEGEN_WINDOW_S = 600.0
SERVEGEN_DEFAULT_MODEL = {"language": "m-small", "reason": "deepseek-r1", "multimodal": "mm-image"}
# rate x duration above this is refused: each arrival becomes a workflow of Python objects (several requests),
# and --rate 1e9 --duration 1 was killed for memory instead of being told so; 2 million arrivals is already an
# order of magnitude beyond the experiments' largest (9/s for an hour: 32,400)
MAX_ARRIVALS = 2_000_000


def _renewal(draw, rate: float, duration_s: float, rng: np.random.Generator, start: float = 0.0) -> np.ndarray:
    """Arrival times of a renewal process on ``[start, start + duration_s)`` (``draw(n)`` gives n gaps)."""
    if rate <= 0 or duration_s <= 0:
        return np.empty(0)
    chunks = []
    t = start
    end = start + duration_s
    while t < end:
        n = max(16, int((end - t) * rate * 1.2) + 16)
        times = t + np.cumsum(draw(n))
        chunks.append(times[times < end])
        t = float(times[-1])
    return np.concatenate(chunks) if chunks else np.empty(0)


def poisson_arrivals(rate: float, duration_s: float, rng: np.random.Generator) -> np.ndarray:
    return _renewal(lambda n: rng.exponential(1.0 / rate, n), rate, duration_s, rng)


def gamma_arrivals(rate: float, duration_s: float, rng: np.random.Generator, cv: float) -> np.ndarray:
    if not cv > 0:
        raise ValueError(f"cv must be > 0, got {cv!r}")
    shape = 1.0 / (cv * cv)
    scale = 1.0 / (rate * shape)
    return _renewal(lambda n: rng.gamma(shape, scale, n), rate, duration_s, rng)


def constant_arrivals(rate: float, duration_s: float) -> np.ndarray:
    """``i / rate`` for every i with ``i / rate < duration_s``: exactly ``ceil(rate * duration_s)`` arrivals.

    Not ``np.arange(0, duration_s, 1 / rate)``: with a float step it can give one arrival too many, even one at
    ``duration_s`` itself (rate 1.3 over 10 s gave 14, the last at 10.0)."""
    if rate <= 0 or duration_s <= 0:
        return np.empty(0)
    times = np.arange(math.ceil(rate * duration_s) + 1) / rate
    return times[times < duration_s]


# ---------------------------------------------------------------------------------------------- ServeGen

@dataclass(frozen=True, slots=True)
class ClientWindow:
    client_id: int
    window_start_s: float
    rate_rps: float
    cv: float
    pattern: str  # Gamma | Weibull
    shape: float
    scale: float


@lru_cache(maxsize=1)
def _servegen_rows() -> tuple[ClientWindow | tuple[str, str], ...]:
    """All ServeGen rows with traffic, as ((category, model), ClientWindow) pairs."""
    path = dataset_path(SERVEGEN, SERVEGEN_FILE, SERVEGEN_FILE[:-3])
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    with opener(path, "rb") as raw:
        for row in csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8")):
            pattern = row.get("arrival_pattern") or ""
            if pattern not in ("Gamma", "Weibull"):
                continue
            try:
                window = ClientWindow(int(row["client_id"]), float(row["window_start_s"]), float(row["rate_rps"]),
                                      float(row["cv"]), pattern, float(row["param1"]), float(row["param2"]))
            except (KeyError, ValueError):
                continue
            if window.rate_rps > 0 and window.shape > 0:
                rows.append(((row["category"], row["model"]), window))
    return tuple(rows)


def servegen_windows(category: str = "language", model: str | None = None) -> dict[float, list[ClientWindow]]:
    """Active client windows of one ServeGen model, keyed by window start (seconds)."""
    model = model or SERVEGEN_DEFAULT_MODEL.get(category)
    out: dict[float, list[ClientWindow]] = defaultdict(list)
    for (cat, mod), window in _servegen_rows():
        if cat == category and mod == model:
            out[window.window_start_s].append(window)
    if not out:
        raise ValueError(f"no ServeGen windows for category={category!r} model={model!r}; categories: "
                         f"{', '.join(sorted(SERVEGEN_DEFAULT_MODEL))} (models: "
                         f"{', '.join(sorted(SERVEGEN_DEFAULT_MODEL.values()))})")
    return dict(sorted(out.items()))


def servegen_gamma_cv(category: str = "language", model: str | None = None, quantile: float = 0.9) -> float:
    """The request-weighted ``quantile`` of the CV over ServeGen's Gamma-fitted client windows.

    The default 0.9 picks a bursty but common client window (the weighted median is close to 1, i.e. Poisson).
    """
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {quantile!r}")
    pairs = sorted((w.cv, w.rate_rps) for windows in servegen_windows(category, model).values()
                   for w in windows if w.pattern == "Gamma")
    total = sum(r for _, r in pairs)
    acc = 0.0
    for cv, r in pairs:
        acc += r
        if acc >= total * quantile:
            return cv
    return pairs[-1][0] if pairs else 1.0


def _client_gaps(window: ClientWindow, rng: np.random.Generator):
    if window.pattern == "Gamma":
        scale = 1.0 / (window.rate_rps * window.shape)
        return lambda n: rng.gamma(window.shape, scale, n)
    scale = 1.0 / (window.rate_rps * math.gamma(1.0 + 1.0 / window.shape))
    return lambda n: scale * rng.weibull(window.shape, n)


def _first_arrival(window: ClientWindow, rng: np.random.Generator) -> float:
    """Time from a segment's start to the client's first arrival, for its renewal process in equilibrium.

    That is the forward recurrence time: a uniform fraction of the gap the start falls into, and that gap is
    *length-biased* (density ``x f(x) / mean``: a long gap is more likely to contain a given instant). A plain gap
    times a uniform, as used before, starts the client too early whenever the gaps vary more than exponential
    ones (CV > 1, the usual ServeGen client): a 60 s run had 1.45x the rate asked for. Length-biased draws are
    exact for both fits: Gamma(k, s) -> Gamma(k + 1, s); Weibull(k, s) = s E**(1/k) -> s G**(1/k) with
    G ~ Gamma(1 + 1/k, 1)."""
    if window.pattern == "Gamma":
        gap = rng.gamma(window.shape + 1.0, 1.0 / (window.rate_rps * window.shape))
    else:
        scale = 1.0 / (window.rate_rps * math.gamma(1.0 + 1.0 / window.shape))
        gap = scale * rng.gamma(1.0 + 1.0 / window.shape) ** (1.0 / window.shape)
    return float(gap * rng.random())


def servegen_arrivals(rate: float, duration_s: float, rng: np.random.Generator, *, category: str = "language",
                      model: str | None = None, window_start_s: float | None = None,
                      clients: int | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Superposed ServeGen clients, time-stretched to mean ``rate`` over ``duration_s``; returns (times, info)."""
    if clients is not None and (isinstance(clients, bool) or not isinstance(clients, int) or clients < 1):
        raise ValueError(f"servegen clients must be an integer >= 1 (or None for all), got {clients!r}")
    windows = servegen_windows(category, model)
    starts = list(windows)
    if window_start_s is None:
        window_start_s = starts[int(rng.integers(len(starts)))]
    elif window_start_s not in windows:
        raise ValueError(f"ServeGen {category}: no traffic in the window starting at {window_start_s:g} s")
    first = windows[window_start_s]
    chosen_ids = sorted({w.client_id for w in first})
    if clients is not None and clients < len(chosen_ids):
        chosen_ids = sorted(int(c) for c in rng.choice(chosen_ids, size=clients, replace=False))
    keep = set(chosen_ids)
    aggregate = sum(w.rate_rps for w in first if w.client_id in keep)
    span = duration_s * rate / aggregate  # ServeGen seconds that hold about rate * duration_s arrivals
    times = []
    segment_start = 0.0
    while segment_start < span:
        current = windows.get(window_start_s + segment_start, [])  # absent: no client had traffic then
        segment = min(SERVEGEN_WINDOW_S, span - segment_start)
        for window in current:
            if window.client_id in keep:
                # start each segment in equilibrium (the forward recurrence time), or the rate is overshot
                gaps = _client_gaps(window, rng)
                offset = _first_arrival(window, rng)
                if offset < segment:
                    times.append(segment_start + offset + np.concatenate(
                        ([0.0], _renewal(gaps, window.rate_rps, segment - offset, rng))))
        segment_start += SERVEGEN_WINDOW_S
    merged = np.sort(np.concatenate(times)) if times else np.empty(0)
    stretch = duration_s / span
    merged = merged * stretch
    info = {"category": category, "model": model or SERVEGEN_DEFAULT_MODEL.get(category),
            "window_start_s": window_start_s, "clients": len(keep), "aggregate_rate_rps": round(aggregate, 4),
            "servegen_span_s": round(span, 4), "time_stretch": round(stretch, 4)}
    return merged[merged < duration_s], info


def generate_arrivals(kind: str, rate: float, duration_s: float, rng: np.random.Generator, *,
                      cv: float | None = None, cv_quantile: float = 0.9, servegen_category: str = "language",
                      servegen_model: str | None = None, servegen_window_s: float | None = None,
                      servegen_clients: int | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Arrival times for ``kind`` (one of :data:`ARRIVALS`) and a dict describing the process used."""
    if not (rate > 0 and math.isfinite(rate)):
        raise ValueError(f"rate must be a finite number > 0, got {rate!r}")
    if not (duration_s > 0 and math.isfinite(duration_s)):
        raise ValueError(f"duration must be a finite number > 0, got {duration_s!r}")
    if rate * duration_s > MAX_ARRIVALS:
        raise ValueError(f"rate x duration asks for about {rate * duration_s:,.0f} arrivals; at most "
                         f"{MAX_ARRIVALS:,} can be generated (lower --rate or --duration)")
    if kind == "poisson":
        return poisson_arrivals(rate, duration_s, rng), {"process": "poisson", "rate": rate}
    if kind == "gamma":
        source = "given"
        if cv is None:
            cv = servegen_gamma_cv(servegen_category, servegen_model, cv_quantile)
            source = f"servegen:{servegen_category}:q{cv_quantile:g}"
        return gamma_arrivals(rate, duration_s, rng, cv), {"process": "gamma", "rate": rate, "cv": cv,
                                                           "cv_source": source}
    if kind == "servegen":
        times, info = servegen_arrivals(rate, duration_s, rng, category=servegen_category, model=servegen_model,
                                        window_start_s=servegen_window_s, clients=servegen_clients)
        return times, {"process": "servegen", "rate": rate, **info}
    if kind == "constant":
        return constant_arrivals(rate, duration_s), {"process": "constant", "rate": rate}
    raise ValueError(f"unknown arrival process {kind!r}; use one of {', '.join(ARRIVALS)}")
