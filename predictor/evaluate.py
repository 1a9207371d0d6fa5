"""``maestro predictor evaluate``: score a model on held-out trace records, per source, as JSON.

Metrics are pure functions over arrays (tested on hand-checkable sets):

- role: accuracy, macro-F1 over the labels present in the truth, and macro-F1 over truth ∪ predictions
  (scikit-learn's default), on records that carry a role label; the model sees the request without the
  label, as a gateway would;
- output length: MAE of p50; the same MAE for three baselines fitted on the model's own training records
  (global mean, per-role mean, and a per-role histogram in the style of AIBrix's output predictor: log2
  buckets of output tokens per role and log2 input bucket, predicting the bucket median); p90 coverage
  (share of requests whose actual output ≤ p90); p90's quantile (pinball) loss, the score a 0.9 quantile
  minimises, which weighs tokens reserved beyond the output (0.1 each) against tokens of output beyond the
  reservation (0.9 each), so it ranks two p90 predictors on the same requests where coverage alone would prefer
  the one that reserves most; Kendall's tau-b between p50 and the actual length;
- KV reservation: saving = 1 − Σ(prompt + reserved output) / Σ(prompt + max_tokens), where reserved output is
  p90 capped by max_tokens and a record without max_tokens takes ``--default-max-tokens`` (see
  :func:`output_cap` for ``--max-model-len``); the under-reservation rate (share of requests whose actual
  output exceeded the reservation); and, as the bound no predictor can beat, the saving of an oracle that
  reserves exactly each actual output;
- how far those figures could move with another sample of runs: 95% percentile-bootstrap intervals that
  resample whole runs (workflow ids; a record without one is its own run), because the calls of one run are
  alike and a held-out set of a few dozen runs is a small sample even when it holds hundreds of calls.

``--cv K`` replaces ``--model``: group k-fold by workflow over the given files, one model per fold trained
with the default options, every record scored once by a model that never saw its run.

``--priors [FILE]`` replaces ``--model``: scores the per-role priors a gateway serves until it has a model (the
built-in ones, or those of FILE: a JSON object ``{role: {"p50": N, "p90": N}}`` like the config's
``predictor.priors``), so a first trained model can be compared with what it would replace.

``--split all`` scores every record of the given files; where the model was trained on them (its file names
them) the report is in-sample and ``meta.in_sample`` is true. A model trained with ``train --split all`` held
nothing out, so the default ``--split test`` is refused for it. ``--split test`` draws each source's held-out
runs from all of its runs in the files given, so it is also refused where those files hold some of the model's
training files but split a source otherwise (a subset of them, or another file added). A source with a single
run in the files has no held-out part: a note names it (and ``meta.unscored_sources``), and where no source has
two runs the command refuses rather than print empty tables. A model's own training files are recognised by
real path, from any folder, or by size and SHA-256 where they were copied or moved (``trained_on_files``); in a
model file from before those were kept, a relative name matches any file of that name (with a note); for files
it does not name, a note says that ``--split all`` scores all of them.

``--no-workflow-context`` scores every request as a client that sends no workflow context is served: without
the ``X-Workflow-Id`` / ``X-Workflow-Step`` headers the trace's workflow would give (and without their
``metadata`` forms), i.e. ``predict(body)`` from the plain OpenAI request. Roles are not given either way (nor
a ``metadata.agent_role``), unless ``--explicit-roles`` asks for the gateway's view of its own records, whose
``agent_role`` is always one the client sent.

``--max-model-len MODEL=TOKENS`` (repeatable) gives served models' context lengths, so that a request is scored
as the gateway and vLLM bound it: never more output than the context its prompt leaves, and without
``max_tokens`` (and without ``--default-max-tokens``) all of that room, not 4096. The online refit passes the
gateway's models this way, so that a model reserving far too much on a long-context model is charged for it.

Baselines get the true role of each test record (an advantage the model does not have).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from predictor.kv import output_cap as kv_output_cap

DEFAULT_MAX_TOKENS = 4096
BOOTSTRAP_REPS = 2000     # resamples of the runs behind each interval
BOOTSTRAP_SEED = 0        # fixed: the same rows always give the same intervals
BOOTSTRAP_CELLS = 2_000_000  # resamples × runs drawn at once: ~16 MB of counts, whatever the number of runs
HIST_INPUT_BUCKETS = 20   # log2 buckets: up to ~1M prompt tokens
HIST_OUTPUT_BUCKETS = 18  # up to ~256k output tokens


# -------------------------------------------------------------------------------------------- metrics
def role_metrics(y_true: Sequence[str], y_pred: Sequence[str]) -> dict[str, Any]:
    """Accuracy, macro-F1 and per-label F1.

    ``macro_f1`` averages the F1 of the labels present in the truth (a wrong prediction still costs the true
    label's recall and the predicted label's precision); ``macro_f1_all_labels`` averages over the union of
    true and predicted labels (scikit-learn's default), which also counts a label that only ever appears as
    a mistake as F1 = 0 — harsh on a test set with a single true class.
    """
    n = len(y_true)
    if n == 0:
        return {"n": 0, "accuracy": None, "macro_f1": None, "macro_f1_all_labels": None, "f1": {}}
    correct = sum(1 for t, p in zip(y_true, y_pred) if t == p)
    f1 = {}
    for label in sorted(set(y_true) | set(y_pred)):
        tp = sum(1 for t, p in zip(y_true, y_pred) if t == label and p == label)
        fp = sum(1 for t, p in zip(y_true, y_pred) if t != label and p == label)
        fn = sum(1 for t, p in zip(y_true, y_pred) if t == label and p != label)
        f1[label] = 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)
    true_labels = set(y_true)
    return {"n": n, "accuracy": correct / n,
            "macro_f1": sum(f1[label] for label in true_labels) / len(true_labels),
            "macro_f1_all_labels": sum(f1.values()) / len(f1), "f1": f1}


def mae(predicted: Sequence[float], actual: Sequence[float]) -> float:
    predicted, actual = np.asarray(predicted, dtype=float), np.asarray(actual, dtype=float)
    return float(np.mean(np.abs(predicted - actual))) if len(actual) else math.nan


def coverage(upper: Sequence[float], actual: Sequence[float]) -> float:
    """Share of requests whose actual value is at most the predicted upper quantile."""
    upper, actual = np.asarray(upper, dtype=float), np.asarray(actual, dtype=float)
    return float(np.mean(actual <= upper)) if len(actual) else math.nan


def quantile_loss(predicted: Sequence[float], actual: Sequence[float], level: float) -> float:
    """Mean pinball loss of ``predicted`` as the ``level`` quantile of ``actual``: level × (actual − predicted)
    where the prediction is under, (1 − level) × (predicted − actual) where it is over; 0 only for exact
    predictions, and lowest in expectation for the true quantile."""
    predicted, actual = np.asarray(predicted, dtype=float), np.asarray(actual, dtype=float)
    if not len(actual):
        return math.nan
    error = actual - predicted
    return float(np.mean(np.maximum(level * error, (level - 1.0) * error)))


def kendall_tau(predicted: Sequence[float], actual: Sequence[float]) -> float:
    """Kendall's tau-b (ties handled); nan when either side is constant."""
    from scipy.stats import kendalltau

    if len(actual) < 2:
        return math.nan
    tau = kendalltau(predicted, actual).statistic
    return float(tau) if tau == tau else math.nan


def kv_saving(prompt: Sequence[float], reserved: Sequence[float], max_tokens: Sequence[float]) -> float:
    """1 − Σ(prompt + reserved output) / Σ(prompt + max_tokens)."""
    prompt = np.asarray(prompt, dtype=float)
    denominator = float(np.sum(prompt + np.asarray(max_tokens, dtype=float)))
    if denominator <= 0:
        return math.nan
    return 1.0 - float(np.sum(prompt + np.asarray(reserved, dtype=float))) / denominator


def under_reservation(actual: Sequence[float], reserved: Sequence[float]) -> float:
    """Share of requests whose actual output exceeded the reserved output."""
    actual, reserved = np.asarray(actual, dtype=float), np.asarray(reserved, dtype=float)
    return float(np.mean(actual > reserved)) if len(actual) else math.nan


def run_bootstrap_intervals(groups: Sequence[str], sums: Mapping[str, Sequence[float]],
                            ratios: Mapping[str, tuple[str, str, bool]], reps: int = BOOTSTRAP_REPS,
                            level: float = 0.95, seed: int = BOOTSTRAP_SEED) -> dict[str, list[float]]:
    """Percentile-bootstrap intervals of ratio statistics, resampling whole runs.

    ``sums`` holds one value per record for each named column; each statistic in ``ratios`` is
    ``name: (numerator column, denominator column, one_minus)``, i.e. Σnum/Σden (or 1 − Σnum/Σden) over the
    resampled records. Runs are drawn with replacement, as many as there are, ``reps`` times; every metric of
    :func:`summarize` that has a target band is such a ratio, so each resample costs one matrix product.
    """
    names, inverse = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
    n_runs = len(names)
    if n_runs < 2:
        return {}
    per_run = {column: np.bincount(inverse, weights=np.asarray(values, dtype=float), minlength=n_runs)
               for column, values in sums.items()}
    rng = np.random.default_rng(seed)
    draws: dict[str, list[np.ndarray]] = {name: [] for name in ratios}
    uniform = np.full(n_runs, 1.0 / n_runs)
    chunk = max(1, BOOTSTRAP_CELLS // n_runs)
    for start in range(0, reps, chunk):
        counts = rng.multinomial(n_runs, uniform, size=min(chunk, reps - start)).astype(float)
        totals = {column: counts @ values for column, values in per_run.items()}
        for name, (numerator, denominator, one_minus) in ratios.items():
            with np.errstate(divide="ignore", invalid="ignore"):
                value = totals[numerator] / totals[denominator]
            draws[name].append(1.0 - value if one_minus else value)
    tail = (1.0 - level) / 2 * 100
    out = {}
    for name, chunks in draws.items():
        values = np.concatenate(chunks)
        values = values[np.isfinite(values)]
        if len(values):
            low, high = np.percentile(values, [tail, 100 - tail])
            out[name] = [float(low), float(high)]
    return out


# ------------------------------------------------------------------------------------------- baselines
def _bucket(tokens: float, limit: int) -> int:
    return min(limit - 1, int(round(math.log2(tokens)))) if tokens > 0 else 0


def _role(record: Mapping[str, Any]) -> str:
    return record.get("agent_role") or "other"


def fit_baselines(records: Sequence[Mapping[str, Any]], roles: Sequence[str | None] | None = None) -> dict[str, Any]:
    """Training-set statistics of the three baselines (stored in the model file)."""
    roles = [r or "other" for r in roles] if roles is not None else [_role(r) for r in records]
    y = [float(r["usage"]["completion_tokens"]) for r in records]
    by_role: dict[str, list[float]] = defaultdict(list)
    cells: dict[str, list[int]] = {}
    for record, role, value in zip(records, roles, y):
        by_role[role].append(value)
        out_bucket = _bucket(value, HIST_OUTPUT_BUCKETS)
        in_bucket = _bucket(record["usage"]["prompt_tokens"], HIST_INPUT_BUCKETS)
        for key in (f"{role}|{in_bucket}", f"{role}|*", "*|*"):
            cells.setdefault(key, [0] * HIST_OUTPUT_BUCKETS)[out_bucket] += 1
    return {"global_mean": float(np.mean(y)) if y else 0.0,
            "role_mean": {role: float(np.mean(values)) for role, values in by_role.items()},
            "role_histogram": cells}


def _hist_quantile(counts: Sequence[int], q: float) -> float:
    total = sum(counts)
    running = 0
    for bucket, count in enumerate(counts):
        running += count
        if running >= q * total:
            return float(2 ** bucket)
    return float(2 ** (len(counts) - 1))


def baseline_predictions(baselines: Mapping[str, Any], records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """p50 per baseline (and p90 for the histogram) for each record, using its true role."""
    global_mean = baselines["global_mean"]
    role_mean = baselines["role_mean"]
    cells = baselines["role_histogram"]
    out: dict[str, list[float]] = {"global_mean": [], "role_mean": [], "role_histogram": [],
                                   "role_histogram_p90": []}
    for record in records:
        role = _role(record)
        out["global_mean"].append(global_mean)
        out["role_mean"].append(role_mean.get(role, global_mean))
        in_bucket = _bucket(record["usage"]["prompt_tokens"], HIST_INPUT_BUCKETS)
        counts = cells.get(f"{role}|{in_bucket}") or cells.get(f"{role}|*") or cells.get("*|*")
        if counts:
            out["role_histogram"].append(_hist_quantile(counts, 0.5))
            out["role_histogram_p90"].append(_hist_quantile(counts, 0.9))
        else:
            out["role_histogram"].append(global_mean)
            out["role_histogram_p90"].append(global_mean)
    return out


# ------------------------------------------------------------------------------------------ evaluation
def _r(value: float | None, digits: int = 4) -> float | None:
    return None if value is None or value != value else round(float(value), digits)


def without_metadata(body: Mapping[str, Any], keys: Sequence[str]) -> Mapping[str, Any]:
    """``body`` without those ``metadata`` keys (the same object when it has none of them)."""
    metadata = body.get("metadata")
    if not isinstance(metadata, Mapping) or not set(keys) & set(metadata):
        return body
    return {**body, "metadata": {k: v for k, v in metadata.items() if k not in keys}}


def without_workflow_context(body: Mapping[str, Any]) -> Mapping[str, Any]:
    """``body`` as a client without workflow context sends it: no ``metadata.workflow_id`` / ``workflow_step``."""
    from predictor.features import WORKFLOW_ID_METADATA, WORKFLOW_STEP_METADATA

    return without_metadata(body, (WORKFLOW_ID_METADATA, WORKFLOW_STEP_METADATA))


def output_cap(max_tokens: int | None, default_max_tokens: int | None, context: int | None,
               prompt_tokens: int) -> int:
    """The most output a request may have, by the gateway's rule (:func:`predictor.kv.output_cap`), with
    ``DEFAULT_MAX_TOKENS`` where nothing bounds it. This is both the reservation's ceiling and the worst case
    the KV saving is measured against."""
    return kv_output_cap(max_tokens, default_max_tokens, context, prompt_tokens, DEFAULT_MAX_TOKENS)


def collect(predictor, records: Sequence[Mapping[str, Any]], default_max_tokens: int | None = DEFAULT_MAX_TOKENS,
            workflow_context: bool = True, contexts: Mapping[str, int] | None = None,
            explicit_roles: bool = False) -> list[dict[str, Any]]:
    """One row per record: the prediction and the baselines' predictions from the predictor's own training
    statistics. The predictor sees the request as a gateway would, without its role label (not even as
    ``metadata.agent_role``), so that the role figures measure the classifier; with ``workflow_context`` False
    also without the workflow's id and step. With ``explicit_roles`` each record's ``agent_role`` comes as the
    client's ``X-Agent-Role`` instead: that is how the gateway served its own records, whose role is only ever
    one a client sent. ``contexts`` maps served model names to their context lengths (:func:`output_cap`)."""
    from predictor.features import ROLE_HEADER, ROLE_METADATA, max_tokens_of
    from predictor.train import group_of, length_usable, request_of

    baselines = (getattr(predictor, "state", None) or {}).get("baselines")
    contexts = contexts or {}
    rows = []
    for record in records:
        body, headers = request_of(record)
        if not workflow_context:
            body, headers = without_workflow_context(body), {}
        role = record.get("agent_role")
        if explicit_roles and role is not None:
            headers = {**headers, ROLE_HEADER: role}
        else:
            body = without_metadata(body, (ROLE_METADATA,))
        prediction = predictor.predict(body, headers or None)
        model = body.get("model")
        cap = output_cap(max_tokens_of(body), default_max_tokens,
                         contexts.get(model) if isinstance(model, str) else None, record["usage"]["prompt_tokens"])
        row = {"source": record.get("source", ""), "run": group_of(record), "role_true": record.get("agent_role"),
               "role_pred": prediction.role, "usable": length_usable(record),
               "actual": record["usage"]["completion_tokens"], "prompt": record["usage"]["prompt_tokens"],
               "cap": cap, "p50": min(prediction.p50, cap), "p90": min(prediction.p90, cap)}
        if baselines and row["usable"]:
            base = baseline_predictions(baselines, [record])
            row["base"] = {name: min(values[0], cap) for name, values in base.items()}
        rows.append(row)
    return rows


def summarize(rows: Sequence[Mapping[str, Any]], default_max_tokens: int | None = DEFAULT_MAX_TOKENS) -> dict[str, Any]:
    """All metrics over collected rows."""
    labeled = [r for r in rows if r["role_true"] is not None]
    roles = role_metrics([r["role_true"] for r in labeled], [r["role_pred"] for r in labeled])
    usable = [r for r in rows if r["usable"]]
    result: dict[str, Any] = {"n": len(rows), "n_length": len(usable)}
    result["role"] = {"n": roles["n"], "accuracy": _r(roles["accuracy"]), "macro_f1": _r(roles["macro_f1"]),
                      "macro_f1_all_labels": _r(roles["macro_f1_all_labels"]),
                      "f1": {k: _r(v) for k, v in roles["f1"].items()}}
    if not usable:
        return result
    actual = np.array([r["actual"] for r in usable], dtype=float)
    p50 = np.array([r["p50"] for r in usable], dtype=float)
    p90 = np.array([r["p90"] for r in usable], dtype=float)
    prompt = np.array([r["prompt"] for r in usable], dtype=float)
    caps = np.array([r["cap"] for r in usable], dtype=float)
    model_mae = mae(p50, actual)
    length: dict[str, Any] = {"mae_p50": _r(model_mae, 2), "actual_mean": _r(float(np.mean(actual)), 2),
                              "actual_median": _r(float(np.median(actual)), 2),
                              "p90_coverage": _r(coverage(p90, actual)),
                              "p90_quantile_loss": _r(quantile_loss(p90, actual, 0.9), 2),
                              "kendall_tau": _r(kendall_tau(p50, actual))}
    kv: dict[str, Any] = {"default_max_tokens": default_max_tokens,
                          "saving": _r(kv_saving(prompt, p90, caps)),
                          "under_reservation_rate": _r(under_reservation(actual, p90)),
                          # the bound: reserving exactly the actual output of every request
                          "oracle_saving": _r(kv_saving(prompt, np.minimum(actual, caps), caps))}
    role_mean_pred = None
    if all("base" in r for r in usable):
        base = {name: np.array([r["base"][name] for r in usable], dtype=float) for name in usable[0]["base"]}
        length["baselines_mae"] = {name: _r(mae(base[name], actual), 2)
                                   for name in ("global_mean", "role_mean", "role_histogram")}
        role_mean_mae = length["baselines_mae"]["role_mean"]
        length["mae_reduction_vs_role_mean"] = _r(1 - model_mae / role_mean_mae) if role_mean_mae else None
        role_mean_pred = base["role_mean"]
        hist_p90 = base["role_histogram_p90"]
        length["role_histogram_p90_coverage"] = _r(coverage(hist_p90, actual))
        kv["role_histogram"] = {"saving": _r(kv_saving(prompt, hist_p90, caps)),
                                "under_reservation_rate": _r(under_reservation(actual, hist_p90))}
    result["length"] = length
    result["kv"] = kv
    intervals = _intervals(usable, actual, p50, p90, prompt, caps, role_mean_pred)
    if intervals:
        result["intervals_95"] = intervals
    return result


def _intervals(usable: Sequence[Mapping[str, Any]], actual: np.ndarray, p50: np.ndarray, p90: np.ndarray,
               prompt: np.ndarray, caps: np.ndarray, role_mean: np.ndarray | None) -> dict[str, Any]:
    """Run-level bootstrap intervals of the figures that have targets (see :func:`run_bootstrap_intervals`)."""
    sums = {"reserved": prompt + p90, "worst": prompt + caps, "covered": (actual <= p90).astype(float),
            "under": (actual > p90).astype(float), "calls": np.ones(len(actual)),
            "exact": prompt + np.minimum(actual, caps)}
    ratios = {"kv_saving": ("reserved", "worst", True), "p90_coverage": ("covered", "calls", False),
              "under_reservation_rate": ("under", "calls", False), "oracle_saving": ("exact", "worst", True)}
    if role_mean is not None:
        sums.update(model_error=np.abs(p50 - actual), role_mean_error=np.abs(role_mean - actual))
        ratios["mae_reduction_vs_role_mean"] = ("model_error", "role_mean_error", True)
    runs = [r["run"] for r in usable]
    bounds = run_bootstrap_intervals(runs, sums, ratios)
    if not bounds:
        return {}
    return {"method": "percentile bootstrap over runs", "runs": len(set(runs)), "resamples": BOOTSTRAP_REPS,
            **{name: [_r(low), _r(high)] for name, (low, high) in bounds.items()}}


def evaluate_records(predictor, records: Sequence[Mapping[str, Any]],
                     default_max_tokens: int | None = DEFAULT_MAX_TOKENS, workflow_context: bool = True,
                     contexts: Mapping[str, int] | None = None, explicit_roles: bool = False) -> dict[str, Any]:
    """All metrics for ``records`` (the options: :func:`collect`)."""
    return summarize(collect(predictor, records, default_max_tokens, workflow_context, contexts, explicit_roles),
                     default_max_tokens)


def summarize_by_source(rows: Sequence[Mapping[str, Any]],
                        default_max_tokens: int | None = DEFAULT_MAX_TOKENS) -> dict[str, Any]:
    by_source: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for row in rows:
        by_source[row["source"]].append(row)
    return {"all": summarize(rows, default_max_tokens),
            "by_source": {source: summarize(items, default_max_tokens) for source, items in sorted(by_source.items())}}


def evaluate_by_source(predictor, records: Sequence[Mapping[str, Any]],
                       default_max_tokens: int | None = DEFAULT_MAX_TOKENS, workflow_context: bool = True,
                       contexts: Mapping[str, int] | None = None, explicit_roles: bool = False) -> dict[str, Any]:
    return summarize_by_source(collect(predictor, records, default_max_tokens, workflow_context, contexts,
                                       explicit_roles), default_max_tokens)


def cross_validate(records: Sequence[dict[str, Any]], folds: int = 5,
                   default_max_tokens: int | None = DEFAULT_MAX_TOKENS, options=None, log=None,
                   workflow_context: bool = True, contexts: Mapping[str, int] | None = None,
                   explicit_roles: bool = False) -> dict[str, Any]:
    """Group k-fold by workflow over ``records``: train on k-1 folds (default options), predict the held-out
    fold, and report the pooled metrics (every record is scored once, by a model that never saw its run)."""
    from sklearn.model_selection import GroupKFold

    from predictor.predictor import Predictor
    from predictor.train import TrainingDataError, fit_state, group_of

    groups = [group_of(record, i) for i, record in enumerate(records)]
    runs = len(set(groups))
    if runs < folds:
        raise TrainingDataError(f"{folds}-fold cross-validation needs at least {folds} runs (workflows); "
                                f"the data holds {runs}")
    rows: list[dict[str, Any]] = []
    for fold, (train_idx, test_idx) in enumerate(GroupKFold(n_splits=folds).split(records, groups=groups)):
        state = fit_state([records[i] for i in train_idx], options)
        predictor = Predictor.from_state(state, context_kv(contexts), default_max_tokens)
        rows.extend(collect(predictor, [records[i] for i in test_idx], default_max_tokens, workflow_context,
                            contexts, explicit_roles))
        if log:
            log(f"fold {fold + 1}/{folds}: trained on {len(train_idx)}, scored {len(test_idx)}")
    return summarize_by_source(rows, default_max_tokens)


def context_kv(contexts: Mapping[str, int] | None):
    """A KV model that knows the served models' context lengths (so that the predictor caps by them as in the
    gateway), or None (the predictor's default) without any."""
    from predictor.kv import KVModel, KVSpec

    return KVModel({name: KVSpec(max_model_len=tokens) for name, tokens in contexts.items()}) if contexts else None


# ------------------------------------------------------------------------------------------------- CLI
TABLE_COLUMNS = ("source", "n", "role acc", "macro-F1", "p50 MAE", "per-role-mean MAE", "reduction", "p90 coverage",
                 "Kendall tau", "KV saving", "under-reservation", "oracle saving")


def format_table(report: Mapping[str, Any]) -> str:
    """The per-source report as a Markdown table, in docs/benchmarks.md's columns (a blank cell where the
    figure does not exist, e.g. no labelled roles)."""

    def pct(value: float | None) -> str:
        return "" if value is None else f"{100 * value:.1f}%"

    def num(value: float | None, digits: int) -> str:
        return "" if value is None else f"{value:.{digits}f}"

    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    for source, result in [("all", report["all"]), *report["by_source"].items()]:
        role, length, kv = result.get("role", {}), result.get("length", {}), result.get("kv", {})
        labelled = role.get("n", 0) > 0
        role_mean_mae = length.get("baselines_mae", {}).get("role_mean")
        cells = [source, str(result["n"]), num(role.get("accuracy") if labelled else None, 3),
                 num(role.get("macro_f1") if labelled else None, 3), num(length.get("mae_p50"), 1),
                 num(role_mean_mae, 1), pct(length.get("mae_reduction_vs_role_mean")),
                 pct(length.get("p90_coverage")), num(length.get("kendall_tau"), 2), pct(kv.get("saving")),
                 pct(kv.get("under_reservation_rate")), pct(kv.get("oracle_saving"))]
        lines.append("| " + " | ".join(cells) + " |")
    if report.get("meta", {}).get("in_sample"):  # so that a table copied elsewhere keeps the caveat
        lines.append("\nIn-sample: the model was trained on (some of) these runs; these are not held-out figures.")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from predictor.cli import held_out_share, positive_int, split_seed
    from predictor.train import fit_level  # (train imports this module's baselines; keep the import lazy)

    parser.add_argument("--model", help="model file written by `maestro predictor train`")
    parser.add_argument("--cv", type=int, metavar="K",
                        help="instead of --model: group k-fold by workflow (train k models with default "
                             "options or --upper-fit-levels, score each held-out fold, pool the metrics)")
    parser.add_argument("--priors", nargs="?", const="", metavar="FILE",
                        help="instead of --model: score the per-role priors a gateway serves before it has a "
                             "model (the built-in ones, or FILE's: a JSON object {role: {\"p50\": N, \"p90\": N}})")
    parser.add_argument("--data", nargs="+", required=True, metavar="FILE", help="trace files")
    parser.add_argument("--default-max-tokens", type=positive_int,
                        help="max_tokens of a request that sets none (>= 1; default 4096, or with --max-model-len "
                             "the room the prompt leaves in that model's context)")
    parser.add_argument("--max-model-len", type=model_context, action="append", metavar="MODEL=TOKENS",
                        help="a served model's context length (repeatable): its requests never reserve more than "
                             "the room their prompt leaves, as the gateway and vLLM cap them")
    parser.add_argument("--split", choices=("test", "all"),
                        help="score the held-out part of the by-workflow split (default; same seed and size as "
                             "training; refused for a model trained with --split all, which held nothing out) or "
                             "every record (traces the model never saw; on its own training files the report is "
                             "in-sample, and meta.in_sample says so)")
    parser.add_argument("--test-size", type=held_out_share,
                        help="override the model's split size (strictly between 0 and 1)")
    parser.add_argument("--seed", type=split_seed, help="override the model's split seed")
    parser.add_argument("--format", choices=("json", "markdown"), default="json",
                        help="json (default: every figure, with bootstrap intervals and meta) or markdown (one "
                             "table row per source, the columns of docs/benchmarks.md)")
    parser.add_argument("--upper-fit-levels", type=fit_level, nargs="+", metavar="Q",
                        help="with --cv: train the fold models with these p90 fit levels (see `maestro predictor "
                             "train --help`)")
    parser.add_argument("--explicit-roles", action="store_true",
                        help="give each record's agent_role as its client's X-Agent-Role, as the gateway served "
                             "its own records (a live record's role is always one its client sent; the online "
                             "refit's check scores this way); by default the role is hidden, to score the "
                             "classifier")
    parser.add_argument("--no-workflow-context", dest="workflow_context", action="store_false",
                        help="score every request as a client without workflow context is served: no "
                             "X-Workflow-Id / X-Workflow-Step headers (nor their metadata forms), the plain "
                             "OpenAI body only")


def model_context(text: str) -> tuple[str, int]:
    """argparse type of ``--max-model-len``: ``MODEL=TOKENS``, split at the last ``=`` (a model name may hold
    one)."""
    from predictor.cli import positive_int

    name, equals, tokens = text.rpartition("=")
    if not equals or not name:
        raise argparse.ArgumentTypeError(f"expected MODEL=TOKENS (e.g. llama-3-8b=8192), not {text!r}")
    try:
        return name, positive_int(tokens)
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: TOKENS {exc}") from None


def write_report(report: Mapping[str, Any], form: str) -> None:
    """Print ``report`` to stdout as JSON or as the Markdown table (``--format``)."""
    import orjson

    text = format_table(report) if form == "markdown" else orjson.dumps(report, option=orjson.OPT_INDENT_2).decode()
    sys.stdout.write(text + "\n")


class _Refused(Exception):
    """Why ``evaluate`` will not score what it was given (its exit status is 2)."""


def _note(message: str) -> None:
    print(f"maestro predictor evaluate: note: {message}", file=sys.stderr)


def main(args: argparse.Namespace) -> int:
    """``maestro predictor evaluate``: a model's report on held-out (or all) records, a cross-validation, or the
    priors' report; 2 with the reason where it refuses."""
    try:
        return _evaluate(args)
    except _Refused as exc:
        print(f"maestro predictor evaluate: {exc}", file=sys.stderr)
        return 2


def _check_arguments(args: argparse.Namespace) -> None:
    """The option combinations argparse cannot refuse by itself."""
    if sum(given is not None for given in (args.model, args.cv, args.priors)) != 1:
        raise _Refused("give one of --model MODEL, --cv K or --priors [FILE]")
    if args.upper_fit_levels and args.cv is None:
        raise _Refused("--upper-fit-levels only applies to --cv (a model file keeps the levels it was trained with)")
    if args.cv is not None and args.cv < 2:
        raise _Refused("--cv needs K >= 2")
    if args.cv is not None and (args.split, args.test_size, args.seed) != (None, None, None):
        raise _Refused("--split, --test-size and --seed choose a held-out part; --cv scores every run once, by a "
                       "model that never saw it, so they do not apply")


def _evaluate(args: argparse.Namespace) -> int:
    from predictor.model_file import ModelFileError
    from predictor.predictor import Predictor
    from predictor.train import load_records_or_say_why

    _check_arguments(args)
    priors = None
    if args.priors is not None:
        priors = read_priors(args.priors)
        if isinstance(priors, str):
            raise _Refused(priors)
    split_given = args.split is not None
    args.split = args.split or "test"
    records = load_records_or_say_why(args.data, "evaluate")
    if records is None:
        return 2
    if not records:  # a report of empty tables would read as a result
        raise _Refused(f"no trace records in {', '.join(map(str, args.data))}; nothing to score")
    contexts = dict(args.max_model_len or [])  # the last value given for a model wins
    asked = {model for record in records if isinstance(model := record["request"].get("model"), str)}
    for name in sorted(set(contexts) - asked):  # a typo would silently leave that model at 4096
        _note(f"--max-model-len names {name!r}, which no record asks for")
    # Without the served models' contexts a request that sets no max_tokens is scored at 4096 (the issue's
    # default); with them, at the room its prompt leaves, as the gateway and vLLM give it.
    default_max_tokens = args.default_max_tokens or (None if contexts else DEFAULT_MAX_TOKENS)
    # in meta only when given, so that a report without these options reads as it always did
    scored_as = {**({"max_model_len": contexts} if contexts else {}),
                 **({"explicit_roles": True} if args.explicit_roles else {})}
    if args.cv is not None:
        write_report(_cross_validation_report(args, records, default_max_tokens, contexts, scored_as), args.format)
        return 0

    kv = context_kv(contexts)
    started = time.perf_counter()
    try:
        if priors is not None:
            predictor = Predictor.from_priors(priors, kv=kv, default_max_tokens=default_max_tokens)
        else:
            predictor = Predictor.load(args.model, kv=kv, default_max_tokens=default_max_tokens)
    except ModelFileError as exc:
        raise _Refused(str(exc)) from None
    load_s = time.perf_counter() - started
    training = (predictor.state or {}).get("training", {})
    split = training.get("split") or {}
    records, scoring = _scored_records(args, records, training, split_given)
    started = time.perf_counter()
    report = evaluate_by_source(predictor, records, default_max_tokens, args.workflow_context, contexts,
                                args.explicit_roles)
    unscored = scoring["unscored"]
    report["meta"] = {"model": None if priors is not None else str(args.model),
                      "priors": None if priors is None else (args.priors or "built-in"),
                      "data": [str(p) for p in args.data], "split": args.split,
                      "model_split": split.get("part"), "in_sample": scoring["in_sample"],
                      "workflow_context": args.workflow_context, **scored_as,
                      "test_size": scoring["test_size"] if args.split == "test" else None,
                      "seed": scoring["seed"] if args.split == "test" else None,
                      "load_s": round(load_s, 3), "evaluate_s": round(time.perf_counter() - started, 2),
                      "trained_on": training.get("sources"),
                      **({"unscored_sources": unscored} if unscored else {})}
    write_report(report, args.format)
    return 0


def _cross_validation_report(args: argparse.Namespace, records: list[dict[str, Any]], default_max_tokens: int | None,
                             contexts: Mapping[str, int], scored_as: Mapping[str, Any]) -> dict[str, Any]:
    """``--cv K``: every run scored once, by one of K models trained without it."""
    from predictor.train import TrainingDataError, TrainOptions

    started = time.perf_counter()
    options = TrainOptions()
    if args.upper_fit_levels:
        options.upper_fit_levels = tuple(args.upper_fit_levels)
    try:
        report = cross_validate(records, args.cv, default_max_tokens, options,
                                log=lambda message: print(f"[evaluate] {message}", file=sys.stderr, flush=True),
                                workflow_context=args.workflow_context, contexts=contexts,
                                explicit_roles=args.explicit_roles)
    except TrainingDataError as exc:
        raise _Refused(str(exc)) from None
    report["meta"] = {"cv_folds": args.cv, "data": [str(p) for p in args.data],
                      "upper_fit_levels": list(options.upper_fit_levels),
                      "workflow_context": args.workflow_context, **scored_as,
                      "seconds": round(time.perf_counter() - started, 1)}
    return report


def _scored_records(args: argparse.Namespace, records: list[dict[str, Any]], training: Mapping[str, Any],
                    split_given: bool) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The records a model (or the priors) is scored on: the held-out part of the split its training drew
    (``--split test``) or every record (``--split all``), refusing a part that could hold runs it was trained on;
    and how they were chosen (``test_size``, ``seed``, ``unscored`` sources, ``in_sample``)."""
    from predictor.train import DEFAULT_SEED, DEFAULT_TEST_SIZE, split_records

    split = training.get("split") or {}
    if split.get("part") == "all" and args.split == "test":
        # The held-out part is the one training left out; a model trained on every record left none out, and
        # scoring "the test part" would report in-sample figures as held-out ones.
        raise _Refused(f"{args.model} was trained with --split all, so it saw every record of its training data "
                       "and there is no held-out part to score; use --split all (an in-sample report on its own "
                       "training data, an out-of-sample one on other traces), or train with --split train to score "
                       "held-out runs")
    test_size = args.test_size if args.test_size is not None else split.get("test_size", DEFAULT_TEST_SIZE)
    seed = args.seed if args.seed is not None else split.get("seed", DEFAULT_SEED)
    trained_files = trained_on_files(training, args.data, _note)
    if (args.split == "test" and split.get("part") == "train" and trained_files
            and (test_size, seed) != (split.get("test_size", test_size), split.get("seed", seed))):
        # Another split of the model's own training files holds out runs it was trained on.
        raise _Refused(f"{args.model} was trained on the train part of the split with --test-size "
                       f"{split.get('test_size')} --seed {split.get('seed')} of these files; another split's "
                       "held-out part would include runs it trained on. Leave --test-size and --seed out (the "
                       "model's split is used), or train with the split you want to score")
    unscored: list[str] = []
    if args.split == "test":
        given_sources = sorted({record.get("source", "") for record in records})
        train_part, records = split_records(records, test_size, seed)
        # A source with a single run (workflow id) has no held-out part: its records all fall on the train side.
        unscored = sorted(set(given_sources) - {record.get("source", "") for record in records})
        if not records:  # a report of empty tables would read as a result
            raise _Refused(f"the held-out part of {', '.join(map(str, args.data))} is empty: runs (workflow ids; a "
                           "record without one is its own run) are held out per source, and no source here has "
                           "two. Use --split all to score every record (of traces the model never saw)")
        if (split.get("part") == "train" and trained_files
                and (moved := sources_split_otherwise(training, train_part, records))):
            # The held-out part of a source is drawn from all of its runs in the files given: other files with
            # some of its training files (a subset of them, or a new file added to them) draw another part,
            # which can hold runs the model was trained on. (Files it never read: any part of them is unseen.)
            raise _Refused(f"these files do not split {', '.join(moved)} as the files {args.model} was trained on "
                           "did (its train part held other records), so their held-out part could hold runs it was "
                           "trained on. Give every file of those sources it was trained on, or use --split all on "
                           "traces it never saw")
    if unscored:
        _note(f"not scored: {', '.join(unscored)} (a single run in these files, so no held-out part; --split all "
              "scores every record)")
    if (not split_given and split.get("part") == "train"  # a model's split (the priors have none)
            and not trained_files):
        _note(f"{args.model} does not name these files among its training data, so this scores the held-out "
              f"{test_size:.0%} of their runs (the default --split test); for traces it never saw, --split all "
              "scores every record")
    seen = trained_files if args.split == "all" else []
    if seen:
        part = "every run in" if split.get("part") == "all" else "the train part of"
        _note(f"{args.model} was trained on {part} {', '.join(seen)}; this is an in-sample report, not a held-out "
              "one")
    return records, {"test_size": test_size, "seed": seed, "unscored": unscored, "in_sample": bool(seen)}


def read_priors(path: str) -> dict[str, tuple[int, int]] | str:
    """The priors to score: the built-in ones (``path`` empty) with FILE's overrides, or why they cannot be read."""
    import orjson

    from predictor.predictor import normalize_priors

    overrides: Any = {}
    if path:
        try:
            with open(path, "rb") as handle:
                overrides = orjson.loads(handle.read())
        except OSError as exc:
            return f"cannot read --priors {path}: {exc.strerror or exc}"
        except orjson.JSONDecodeError as exc:
            return f"--priors {path} is not JSON: {exc}"
        if not isinstance(overrides, dict):
            return f"--priors {path} must hold a JSON object {{role: {{\"p50\": N, \"p90\": N}}}}"
    try:
        return normalize_priors(overrides)
    except (ValueError, TypeError) as exc:
        return f"--priors {path}: {exc}"


def sources_split_otherwise(training: Mapping[str, Any], train_part: Sequence[Mapping[str, Any]],
                            test_part: Sequence[Mapping[str, Any]]) -> list[str]:
    """The sources of ``test_part`` the model was trained on whose train part here is not the one it was trained
    on (told by the record counts its file keeps per source)."""
    from collections import Counter

    trained = training.get("sources") or {}
    here = Counter(record.get("source", "") for record in train_part)
    return sorted({source for source in (record.get("source", "") for record in test_part)
                   if source in trained and here[source] != trained[source]})


def trained_on_files(training: Mapping[str, Any], data: Sequence[str | Path],
                     note: Callable[[str], None] | None = None) -> list[str]:
    """The files of ``data`` that the model's training read.

    A model file keeps each training file's real path, size and SHA-256 (``training.data_files``,
    :func:`predictor.train.data_files`): a file is one of them at the same real path, from whatever folder
    evaluate runs, or with the same size and bytes, where it was copied or moved (only files of a training
    file's size are hashed). Model files written before keep only ``training.data``, the paths as typed: an
    absolute one is compared as a real path; a relative one was relative to a folder nothing recorded, so any
    file of that name counts as a training file, and ``note`` is told. Counting another file of the same name
    can only label a report in-sample or refuse a split; missing a training file would score training runs as
    held-out, the error this check exists to prevent."""
    from predictor.train import file_sha256

    files = training.get("data_files")
    if isinstance(files, list):
        kept = [file for file in files if isinstance(file, Mapping)]
        paths = {file.get("path") for file in kept}
        contents = {(file.get("bytes"), file.get("sha256")) for file in kept}
        sizes = {size for size, _ in contents}
        seen = []
        for path in data:
            try:
                if os.path.realpath(path) in paths or (
                        (size := os.path.getsize(path)) in sizes and (size, file_sha256(path)) in contents):
                    seen.append(str(path))
            except OSError:  # unreadable here: load_records has said so already
                continue
        return seen
    named = [path for path in training.get("data") or () if isinstance(path, str)]
    absolute = {os.path.realpath(path) for path in named if os.path.isabs(path)}
    relative = {os.path.basename(path) for path in named if not os.path.isabs(path)}
    seen, by_name = [], []
    for path in data:
        if os.path.realpath(path) in absolute:
            seen.append(str(path))
        elif os.path.basename(path) in relative:
            seen.append(str(path))
            by_name.append(str(path))
    if by_name and note is not None:
        note(f"the model file names its training files relative to the folder it was trained in, which it does "
             f"not record (it predates real paths): {', '.join(by_name)} counted as training files by file name; "
             "retrain to record them exactly")
    return seen


if __name__ == "__main__":  # pragma: no cover
    parser = argparse.ArgumentParser(prog="python -m predictor.evaluate")
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
