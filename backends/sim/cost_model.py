"""Engine cost model: how long one continuous-batching iteration (and one DiT denoising step) takes.

Shared by the simulated HTTP engines (:mod:`backends.sim.engine`) and the discrete-event simulator, so it is
plain arithmetic after construction: no asyncio, no I/O, no clock reads. Every method is a pure function of its
arguments and returns **seconds of engine time** (divide by a time scale yourself if you want wall time).

Where the numbers come from
---------------------------
The coefficients are **fitted when the model is constructed** from the "H200 eager calibration" JSON files in
``../shared/data/calibration`` (override with the ``MAESTRO_CALIBRATION_DIR`` environment variable or the
``calibration_dir`` argument). No measured value is copied into this repository (the data has its own
licence); only the functional forms below live here, and the fit is a small non-negative least-squares
problem solved with numpy:

* decode step, ``B`` sequences holding ``C`` context tokens in total::

      decode_ms = d0 + d1 * B + d2 * C

  fitted on ``decode_graph_ms`` (CUDA graphs, the closest to a tuned engine), or on the eager ``decode_ms``
  when the graphs file is absent. ``d1`` is the per-sequence cost (sampling, MLP rows), ``d2`` the KV read.
* prefill of sequences of ``T_i`` new tokens (chunks), each attending to ``T_i + c_i`` tokens
  (``c_i`` = context already in the KV cache)::

      prefill_ms = p0 + p1 * sum(T_i) + p2 * sum(T_i * (T_i + c_i))

  fitted on ``prefill_ms`` (one sequence) and ``prefill_batched_ms`` (n sequences in one step).
* a mixed iteration (decode and prefill in the same step) costs
  ``max(d0, p0) + d1*B + d2*C + p1*sum(T_i) + p2*sum(T_i*(T_i+c_i))``; the ``mixed_ms`` points of the
  calibration are used only to check this (see ``tests/test_sim_engine.py``). A prefill-only step costs at
  least ``d0`` (every forward pass pays the fixed launch cost).
* DiT denoising step of ``b`` images of ``N = (W/16) * (H/16)`` latent tokens (8x VAE, patch 2)::

      step_ms = max(floor, k1 * b * N + k2 * b * N**2)

  fitted per model on ``dit_step_ms.<model>``; ``floor`` is the smallest measured step of that model (the
  launch-bound regime). Video (``frames > 1``) multiplies ``N`` by ``(frames - 1) // 4 + 1`` latent frames
  and uses ``video_dit_1p3b_step_ms`` when present. Sequence parallelism over ``k`` GPUs divides the step by
  ``k * efficiency ** log2(k)``; the efficiency per doubling is a parameter (default 0.9, **not from the
  data**: the calibration has only shard-compute upper bounds).

Fallback when the calibration folder is absent
----------------------------------------------
Round-number defaults, **not from the data**, chosen only to be plausible for an 8B model on one modern GPU:
``d0 = 5 ms, d1 = 0.02 ms/seq, d2 = 2e-5 ms/token``, ``p0 = 5 ms, p1 = 0.02 ms/token, p2 = 2e-6 ms/token^2``,
DiT ``floor = 10 ms, k1 = 3e-3 ms/token, k2 = 3e-7 ms/token^2``, ``kv_bytes_per_token = 131072``.
``source`` says which one is in use.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

log = logging.getLogger("maestro.sim")

ENV_CALIBRATION_DIR = "MAESTRO_CALIBRATION_DIR"

# Round numbers, NOT from the data (used only when no calibration folder exists).
_DEFAULT_DECODE = (5.0, 0.02, 2e-5)  # ms: base, per sequence, per context token
_DEFAULT_PREFILL = (5.0, 0.02, 2e-6)  # ms: base, per token, per token x attended token
_DEFAULT_DIT = (10.0, 3e-3, 3e-7)  # ms: floor, per token, per token^2
_DEFAULT_KV_BYTES_PER_TOKEN = 131072

DIT_PROFILES = ("dit_xl_2", "dit_3b")
VIDEO_PROFILE = "video_dit_1p3b"
_VIDEO_81F_TOKENS = 32_760  # the calibration's 480p 81-frame video, in latent tokens (its README)


_SOURCES_SAID: set[tuple[Path, bool]] = set()


def _say_source_once(folder: Path, found: bool) -> None:
    """Log where the simulated engines' timings come from, once per folder: a silent fallback to round numbers
    would pass a simulation off as calibrated (e.g. in a container without the data)."""
    if (folder, found) in _SOURCES_SAID:
        return
    _SOURCES_SAID.add((folder, found))
    if found:
        log.info("simulated engines: timings calibrated from %s", folder)
    else:
        log.warning("simulated engines: no calibration at %s (set %s to the calibration folder); their timings are "
                    "round-number defaults, not measurements", folder, ENV_CALIBRATION_DIR)


def default_calibration_dir() -> Path:
    """``$MAESTRO_CALIBRATION_DIR`` if set, else ``$MAESTRO_DATA_DIR/calibration`` where that folder exists (the
    shared data folder holds it: a user who pointed that variable at the data got uncalibrated engines, said by one
    log line), else
    ``<repo root>/../shared/data/calibration``."""
    env = os.environ.get(ENV_CALIBRATION_DIR)
    if env:
        return Path(env)
    data = os.environ.get("MAESTRO_DATA_DIR")
    if data and (Path(data) / "calibration").is_dir():  # a data folder of one's own may hold none
        return Path(data) / "calibration"
    repo_root = Path(__file__).resolve().parents[2]
    return repo_root.parent / "shared" / "data" / "calibration"


def _solve_exact(matrix: list[list[Fraction]], vector: list[Fraction]) -> list[Fraction] | None:
    """``matrix @ x = vector`` by Gaussian elimination in rationals; None where ``matrix`` is singular."""
    size = len(vector)
    rows = [row[:] + [value] for row, value in zip(matrix, vector)]
    for col in range(size):
        pivot = next((r for r in range(col, size) if rows[r][col] != 0), None)
        if pivot is None:
            return None
        rows[col], rows[pivot] = rows[pivot], rows[col]
        for r in range(size):
            if r != col and rows[r][col] != 0:
                factor = rows[r][col] / rows[col][col]
                rows[r] = [a - factor * b for a, b in zip(rows[r], rows[col])]
    return [rows[r][size] / rows[r][r] for r in range(size)]


def nnls_small(features: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Exact non-negative least squares for a handful of columns (tries every support set).

    Good for k <= 5 columns: 2**k small solves. Returns the coefficients with the smallest residual among all
    non-negative solutions on a subset of the columns.

    The arithmetic is exact (rationals: every float is one), and the coefficients are the exact solutions
    rounded once. ``np.linalg.lstsq`` gave coefficients whose last bits depended on the BLAS kernels the CPU
    runs (AVX-512 or AVX2), and under contention a simulated schedule follows those bits: the recorded E1
    table moved by up to half a point from one machine to another. A subset whose columns are dependent is
    skipped; a smaller one reaches its residual.
    """
    rows = [[Fraction(float(v)) for v in row] for row in np.asarray(features, dtype=np.float64)]
    values = [Fraction(float(v)) for v in np.asarray(target, dtype=np.float64)]
    n_cols = np.shape(features)[1]
    best = np.zeros(n_cols)
    best_err = sum(v * v for v in values)
    for size in range(1, n_cols + 1):
        for cols in itertools.combinations(range(n_cols), size):
            sub = [[row[c] for c in cols] for row in rows]
            normal = [[sum(row[i] * row[j] for row in sub) for j in range(size)] for i in range(size)]
            moment = [sum(row[i] * v for row, v in zip(sub, values)) for i in range(size)]
            coef = _solve_exact(normal, moment)
            if coef is None or any(c < 0 for c in coef):
                continue
            err = sum((sum(a * c for a, c in zip(row, coef)) - v) ** 2 for row, v in zip(sub, values))
            if err < best_err:
                best_err = err
                best = np.zeros(n_cols)
                best[list(cols)] = [float(c) for c in coef]
    return best


def _parse_bc(key: str) -> tuple[int, int]:
    """``"B32_C1024"`` -> (32, 1024)."""
    b_part, c_part = key.split("_")
    return int(b_part[1:]), int(c_part[1:])


@dataclass(frozen=True)
class _DitFit:
    floor_ms: float
    k1: float  # ms per (image x token)
    k2: float  # ms per (image x token^2)

    def step_ms(self, batch: int, tokens: float, speedup: float = 1.0) -> float:
        """One step's milliseconds: the compute, shared by ``speedup`` GPUs, but never under the floor (the
        smallest step measured, bound by kernel launches, which more GPUs do not shorten)."""
        return max(self.floor_ms, (self.k1 * batch * tokens + self.k2 * batch * tokens * tokens) / speedup)


class EngineCostModel:
    """Per-iteration time of a continuous-batching LLM engine and per-step time of a DiT engine.

    ``scale`` multiplies every time (e.g. 2.0 for a GPU half as fast). Construct once; then every method is a
    pure function. ``source`` is ``"calibration:<dir>"`` or ``"defaults (not from the data)"``.
    """

    def __init__(self, calibration_dir: str | os.PathLike[str] | None = None, *, scale: float = 1.0) -> None:
        if scale <= 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        self.scale = float(scale)
        folder = Path(calibration_dir) if calibration_dir is not None else default_calibration_dir()
        d0, d1, d2 = _DEFAULT_DECODE
        p0, p1, p2 = _DEFAULT_PREFILL
        floor, k1, k2 = _DEFAULT_DIT
        self.kv_bytes_per_token = _DEFAULT_KV_BYTES_PER_TOKEN
        self._dit: dict[str, _DitFit] = {name: _DitFit(floor, k1, k2) for name in DIT_PROFILES}
        self._video: _DitFit | None = None
        self.source = "defaults (not from the data)"

        docs = self._load(folder)
        _say_source_once(folder, bool(docs))
        if docs:
            self.source = f"calibration:{folder}"
            fitted = self._fit_decode(docs)
            if fitted is not None:
                d0, d1, d2 = fitted
            fitted = self._fit_prefill(docs)
            if fitted is not None:
                p0, p1, p2 = fitted
            for name in DIT_PROFILES:
                fit = self._fit_dit(docs, name)
                if fit is not None:
                    self._dit[name] = fit
            self._video = self._fit_video(docs, self._dit["dit_xl_2"].floor_ms)
            for doc in docs.values():
                kv = doc.get("llm", {}).get("kv_bytes_per_token")
                if isinstance(kv, (int, float)) and kv > 0:
                    self.kv_bytes_per_token = int(kv)
        # coefficients in seconds, scaled
        s = self.scale / 1000.0
        self.decode_coef = (d0 * s, d1 * s, d2 * s)
        self.prefill_coef = (p0 * s, p1 * s, p2 * s)
        self._mixed_base = max(d0, p0) * s

    # ------------------------------------------------------------------ loading and fitting (construction only)

    @staticmethod
    def _load(folder: Path) -> dict[str, dict]:
        docs: dict[str, dict] = {}
        if not folder.is_dir():
            return docs
        for path in sorted(folder.glob("*.json")):
            try:
                docs[path.name] = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
        return docs

    @staticmethod
    def _fit_decode(docs: dict[str, dict]) -> tuple[float, float, float] | None:
        points: list[tuple[int, int, float]] = []
        for doc in docs.values():  # CUDA-graph decode is closest to vLLM; prefer it
            for key, ms in doc.get("decode_graph_ms", {}).items():
                b, c = _parse_bc(key)
                points.append((b, c, float(ms)))
        if not points:
            for doc in docs.values():
                for key, ms in doc.get("llm", {}).get("decode_ms", {}).items():
                    b, c = _parse_bc(key)
                    points.append((b, c, float(ms)))
        if len(points) < 3:
            return None
        x = np.array([[1.0, b, b * c] for b, c, _ in points])
        y = np.array([ms for _, _, ms in points])
        coef = nnls_small(x, y)
        return float(coef[0]), float(coef[1]), float(coef[2])

    @staticmethod
    def _fit_prefill(docs: dict[str, dict]) -> tuple[float, float, float] | None:
        rows: list[tuple[float, float, float]] = []  # (tokens, sum T^2, ms)
        for doc in docs.values():
            for key, ms in doc.get("llm", {}).get("prefill_ms", {}).items():
                t = int(key)
                rows.append((t, t * t, float(ms)))
            for key, ms in doc.get("prefill_batched_ms", {}).items():
                n, t = (int(v) for v in key.split("x"))
                rows.append((n * t, n * t * t, float(ms)))
        if len(rows) < 3:
            return None
        x = np.array([[1.0, tok, sq] for tok, sq, _ in rows])
        y = np.array([ms for _, _, ms in rows])
        coef = nnls_small(x, y)
        return float(coef[0]), float(coef[1]), float(coef[2])

    @staticmethod
    def _fit_dit(docs: dict[str, dict], name: str) -> _DitFit | None:
        points: list[tuple[int, float, float]] = []  # (batch, tokens, ms)
        for doc in docs.values():
            for key, ms in doc.get("dit_step_ms", {}).get(name, {}).items():
                px_part, b_part = key.split("_")
                px = int(px_part.removesuffix("px"))
                points.append((int(b_part[1:]), dit_tokens(px, px), float(ms)))
        if len(points) < 2:
            return None
        floor = min(ms for _, _, ms in points)
        # points clearly above the launch-bound floor carry the compute slope
        busy = [p for p in points if p[2] > 1.25 * floor] or points
        x = np.array([[b * n, b * n * n] for b, n, _ in busy])
        y = np.array([ms for _, _, ms in busy])
        k1, k2 = nnls_small(x, y)
        return _DitFit(floor, float(k1), float(k2))

    @staticmethod
    def _fit_video(docs: dict[str, dict], launch_floor_ms: float) -> _DitFit | None:
        """The 1.3B video DiT: its two whole-video steps (480p, 33 and 81 frames) and its steps on 1/k of the
        81-frame tokens (one shard's compute, a measurement of the model on that many tokens all the same).
        Its floor is the launch-bound step of DiT-XL/2 (depth 28, the video model's 30): without a floor, a
        2-frame 64x64 video cost 0.035 ms a step, a 250th of the same tokens as an image."""
        points: list[tuple[float, float]] = []
        for doc in docs.values():
            for key, ms in doc.get("video_dit_1p3b_step_ms", {}).items():
                res, frames = key.split("_")
                height = int(res.removesuffix("p"))
                width = int(round(height * 16 / 9 / 16)) * 16  # 480p -> 848; close enough to 832
                points.append((dit_tokens(width, height, int(frames.removesuffix("f"))), float(ms)))
            for k, ms in doc.get("video_dit_480p_81f_tokens_div_k_ms", {}).items():
                points.append((_VIDEO_81F_TOKENS / int(k), float(ms)))
        if len(points) < 2:
            return None
        x = np.array([[n, n * n] for n, _ in points])
        y = np.array([ms for _, ms in points])
        k1, k2 = nnls_small(x, y)
        return _DitFit(min(launch_floor_ms, min(ms for _, ms in points)), float(k1), float(k2))

    # ------------------------------------------------------------------ pure cost functions (seconds)

    def decode_s(self, batch_size: int, context_tokens: int) -> float:
        """One decode step for ``batch_size`` sequences holding ``context_tokens`` KV tokens in total."""
        if batch_size <= 0:
            return 0.0
        d0, d1, d2 = self.decode_coef
        return d0 + d1 * batch_size + d2 * context_tokens

    def prefill_s(self, prompt_lens: Sequence[int] | Iterable[int]) -> float:
        """One step prefilling whole prompts of the given lengths (no cached context)."""
        tokens = 0
        attn = 0
        for t in prompt_lens:
            tokens += t
            attn += t * t
        if tokens <= 0:
            return 0.0
        p0, p1, p2 = self.prefill_coef
        return max(self.decode_coef[0], p0 + p1 * tokens + p2 * attn)

    def step_s(self, num_decode: int, decode_context_tokens: int, prefill_tokens: int = 0,
               prefill_attn_tokens: int = 0) -> float:
        """One continuous-batching iteration.

        ``num_decode`` sequences decode one token each over ``decode_context_tokens`` KV tokens in total;
        ``prefill_tokens`` new prompt tokens are computed in chunks whose attention work is
        ``prefill_attn_tokens = sum(chunk * (chunk + cached_context))``.
        """
        d0, d1, d2 = self.decode_coef
        p0, p1, p2 = self.prefill_coef
        if prefill_tokens <= 0:
            if num_decode <= 0:
                return 0.0
            return d0 + d1 * num_decode + d2 * decode_context_tokens
        if num_decode <= 0:
            return max(d0, p0 + p1 * prefill_tokens + p2 * prefill_attn_tokens)
        return (self._mixed_base + d1 * num_decode + d2 * decode_context_tokens
                + p1 * prefill_tokens + p2 * prefill_attn_tokens)

    def iteration_s(self, context_lens: Sequence[int], prefill_lens: Sequence[int] = ()) -> float:
        """Convenience form of :meth:`step_s`: per-sequence decode contexts and whole-prompt prefills."""
        return self.step_s(len(context_lens), sum(context_lens), sum(prefill_lens),
                           sum(t * t for t in prefill_lens))

    def request_s(self, prompt_tokens: int, output_tokens: int, batch_size: int = 1) -> float:
        """Rough service time of one request alone-ish: its prefill plus ``output_tokens - 1`` decode steps
        in a batch of ``batch_size`` sequences with about the same context (handy for predictors/DES)."""
        total = self.prefill_s((prompt_tokens,)) if prompt_tokens > 0 else 0.0
        if output_tokens > 1:
            mean_ctx = prompt_tokens + output_tokens / 2.0
            total += (output_tokens - 1) * self.decode_s(batch_size, int(batch_size * mean_ctx))
        return total

    def dit_step_s(self, width: int, height: int, batch: int = 1, *, frames: int = 1, parallel_degree: int = 1,
                   scaling_efficiency: float = 0.9, profile: str = "dit_xl_2") -> float:
        """One denoising step of ``batch`` images (or videos of ``frames`` frames) of ``width`` x ``height``
        on ``parallel_degree`` GPUs with ``scaling_efficiency`` per doubling (not from the data).

        The GPUs share the compute only: a step is never shorter than the profile's smallest measured step.
        Videos (``frames`` > 1) use the one video model the calibration measured, whatever ``profile`` says."""
        if profile not in self._dit:
            raise ValueError(f"unknown DiT profile {profile!r}; known: {', '.join(DIT_PROFILES)}")
        if parallel_degree < 1:
            raise ValueError(f"parallel_degree must be >= 1, got {parallel_degree!r}")
        if batch <= 0:
            return 0.0
        tokens = dit_tokens(width, height, frames)
        speedup = parallel_degree * scaling_efficiency ** math.log2(parallel_degree) if parallel_degree > 1 else 1.0
        fit = self._video if frames > 1 and self._video is not None else self._dit[profile]
        return fit.step_ms(batch, tokens, max(speedup, 1e-9)) * self.scale / 1000.0


def dit_tokens(width: int, height: int, frames: int = 1) -> int:
    """Latent tokens of a DiT input: 8x VAE downsampling, 2x2 patches, 4x temporal compression for video."""
    spatial = max(1, width // 16) * max(1, height // 16)
    latent_frames = 1 if frames <= 1 else (frames - 1) // 4 + 1
    return spatial * latent_frames
