"""``maestro predictor train``: fit the role classifier and the output-length model from trace records.

Records are split by workflow (no run is both in train and test): per source, a seeded
``GroupShuffleSplit`` over workflow ids; records without a workflow are their own group. ``--split train``
(the default) trains on the train part only so that ``maestro predictor evaluate`` can score the held-out
part of the same files; ``--split all`` trains on everything (for a model to deploy).
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from predictor.classifier import TextParams, fit_text_model
from predictor.features import (WORKFLOW_ID_HEADER, WORKFLOW_STEP_HEADER, FeatureAssembler, content_text,
                                parse_request)
from predictor.length_model import QUANTILES, LengthParams, fit_length_model
from predictor.trace import ROLES, TraceFormatError, read_records

DEFAULT_TEST_SIZE = 0.2
DEFAULT_SEED = 0


@dataclass
class TrainOptions:
    text: TextParams = field(default_factory=TextParams)
    length: LengthParams = field(default_factory=LengthParams)
    quantiles: tuple[float, ...] = QUANTILES
    model_min_count: int = 20        # a model name gets its own feature column from this many records
    model_vocab_max: int = 32
    source_balance: float = 0.5      # 0: every record weighs the same; 1: every source weighs the same
    calibrate: bool = True           # conformal offsets from out-of-fold predictions
    calibration_folds: int = 5       # group k-fold folds of those predictions
    calibrate_by_model: bool = True  # offsets per (role, model) cell, not only per role (Mondrian conformal)
    # Levels the top quantile's trees may be fitted at before its offsets lift it to its target (0.9);
    # training keeps the one whose calibrated out-of-fold reservation is smallest (see choose_upper_level).
    # Opt-in, e.g. (0.7, 0.8, 0.9): it reserves a little less on traffic like the training data's, but its p90
    # covers less of an unseen framework's requests (docs/benchmarks.md), and each level adds a fit per fold.
    upper_fit_levels: tuple[float, ...] = (0.9,)


class TrainingDataError(ValueError):
    """The records cannot train what was asked: no records, none with a usable output length, or fewer runs
    than cross-validation folds. The CLIs report it in one line (exit 2); the online learner keeps its model."""


@dataclass
class Calibration:
    """What cross-conformal calibration decided: the offsets, and the levels the final trees are fitted at."""

    offsets: np.ndarray                     # (context blocks × strata) × quantiles, tokens
    fit_levels: tuple[float, ...]           # one per quantile; the top one chosen from upper_fit_levels
    upper_reservation: dict[float, float]   # candidate top level -> weighted mean calibrated top quantile, OOF
    context_blocks: int = 1                 # 2: a second block of offsets for requests without a workflow step


# ------------------------------------------------------------------------------------------------ records
def load_records(paths: Iterable[str | Path], skipped: list[int] | None = None) -> list[dict[str, Any]]:
    """The records of trace files, less those of requests for several answers (:func:`single_answer`), whose
    number is added to ``skipped[0]`` when given. A file named twice (by any path) is refused: its records
    would count twice in training and in every figure of an evaluation, and its runs would seem to be more."""
    records: list[dict[str, Any]] = []
    seen: dict[str, str] = {}
    for path in paths:
        real = os.path.realpath(path)
        if real in seen:
            same = "" if str(path) == seen[real] else f" (as {seen[real]})"
            raise TraceFormatError(f"{path}: this file is given twice{same}; give each file once")
        seen[real] = str(path)
        for record in read_records(path):
            if single_answer(record):
                records.append(record)
            elif skipped is not None:
                skipped[0] += 1
    return records


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes (as stored: a ``.gz`` file's compressed bytes), read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def data_files(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """What a model file keeps of its training files (``training.data_files``): each one's real path, size and
    SHA-256, so that ``evaluate`` knows its own training data whatever folder it runs in and however the files
    are named there (the paths as typed, relative to a folder nothing recorded, made training runs read as
    held-out ones when evaluated from another folder), and also where a file was copied or moved. Each file is
    read once more to hash it, which costs far less than the training it belongs to."""
    return [{"path": os.path.realpath(path), "bytes": os.path.getsize(path), "sha256": file_sha256(path)}
            for path in paths]


def single_answer(record: Mapping[str, Any]) -> bool:
    """Whether a record's request asked for one answer: with ``n`` > 1, ``usage.completion_tokens`` sums the n
    answers, so one answer's length (what the model learns and is scored on) is not known. The gateway's own
    recorder never writes such a record (:func:`predictor.online.make_record`); in other traces it is left out."""
    return record["request"].get("n") in (None, 1)


def load_records_or_say_why(paths: Iterable[str | Path], command: str) -> list[dict[str, Any]] | None:
    """:func:`load_records` for a CLI: None, after one line on stderr naming the file and the problem (missing,
    unreadable, not a trace record, named twice), where the data cannot be read; a note on stderr counts the
    records left out as requests for several answers."""
    skipped = [0]
    try:
        records = load_records(paths, skipped)
    except (TraceFormatError, OSError) as exc:
        print(f"maestro predictor {command}: {exc}", file=sys.stderr)
        return None
    if skipped[0]:
        print(f"maestro predictor {command}: note: left out {skipped[0]} record(s) of requests with n > 1 (their "
              "usage sums the n answers, so one answer's length is not known)", file=sys.stderr)
    return records


def group_of(record: Mapping[str, Any], index: int = 0) -> str:
    """The split group of a record: its workflow id; without one, its prompt text (so the same prompt
    answered by several models, or sent twice, never lands on both sides of a split)."""
    workflow = record.get("workflow")
    source = record.get("source", "")
    if isinstance(workflow, Mapping) and isinstance(workflow.get("id"), str) and workflow["id"]:
        return f"{source}\x00{workflow['id']}"
    messages = record.get("request", {}).get("messages") or []
    digest = hashlib.blake2b(digest_size=12)
    for message in messages:
        if isinstance(message, Mapping):
            digest.update(str(message.get("role")).encode() + b"\x00")
            digest.update(content_text(message.get("content")).encode("utf-8", "surrogatepass") + b"\x01")
    return f"{source}\x00prompt:{digest.hexdigest()}"


def canonical_order(records: Iterable[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """The records sorted by split group (:func:`group_of`, which begins with the source), each group's records
    in their given order, and the group of each.

    Fitting sums over rows in order, and 600 boosted trees amplify last-bit differences in those sums into
    different splits: the same six trace files listed in another order gave a model whose ChatDev held-out
    p90 coverage differed by 1.4 points. In this order the model depends on which records it is given, not on
    the order of the files (or of an online buffer) they came from, as long as each run's records are in one
    file: the records of one group keep the order they come in, so a run split across two files (two days of
    logs) trains a model that differs in its last bits with the order of those two files."""
    records = list(records)
    groups = [group_of(record, i) for i, record in enumerate(records)]
    order = sorted(range(len(records)), key=groups.__getitem__)
    return [records[i] for i in order], [groups[i] for i in order]


def split_records(records: Sequence[dict[str, Any]], test_size: float = DEFAULT_TEST_SIZE,
                  seed: int = DEFAULT_SEED) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, test): per source, a seeded GroupShuffleSplit over workflow ids."""
    from sklearn.model_selection import GroupShuffleSplit

    by_source: dict[str, list[int]] = defaultdict(list)
    for index, record in enumerate(records):
        by_source[record.get("source", "")].append(index)
    train_idx: list[int] = []
    test_idx: list[int] = []
    for source in sorted(by_source):
        indices = by_source[source]
        groups = [group_of(records[i], i) for i in indices]
        if len(set(groups)) < 2 or test_size <= 0:
            train_idx.extend(indices)
            continue
        runs = len(set(groups))
        # A share that would hold out every run (0.6 of 2 runs rounds up to both) holds out all but one instead:
        # scikit-learn refuses an empty train part.
        held = test_size if math.ceil(test_size * runs) < runs else runs - 1
        splitter = GroupShuffleSplit(n_splits=1, test_size=held, random_state=seed)
        tr, te = next(splitter.split(indices, groups=groups))
        train_idx.extend(indices[i] for i in tr)
        test_idx.extend(indices[i] for i in te)
    return [records[i] for i in sorted(train_idx)], [records[i] for i in sorted(test_idx)]


def request_of(record: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """The (body, headers) a gateway would have seen for this record: workflow context, never the role."""
    headers: dict[str, str] = {}
    workflow = record.get("workflow")
    if isinstance(workflow, Mapping):
        if isinstance(workflow.get("id"), str):
            headers[WORKFLOW_ID_HEADER] = workflow["id"]
        if isinstance(workflow.get("step"), int):
            headers[WORKFLOW_STEP_HEADER] = str(workflow["step"])
    return record["request"], headers


def length_usable(record: Mapping[str, Any]) -> bool:
    """False for records whose logged output length is not the LLM's: a tool-rendered page dump, or a template
    with copied text around what the model wrote (``meta.tool_rendered_output`` / ``meta.templated_output``)."""
    meta = record.get("meta")
    return not (isinstance(meta, Mapping) and (meta.get("tool_rendered_output") or meta.get("templated_output")))


def source_weights(records: Sequence[Mapping[str, Any]], balance: float) -> np.ndarray:
    counts = Counter(record.get("source", "") for record in records)
    n, k = len(records), len(counts)
    weights = np.array([(n / (k * counts[record.get("source", "")])) ** balance for record in records])
    return weights / weights.mean()


# ---------------------------------------------------------------------------------------------- fitting
def fit_state(records: Sequence[dict[str, Any]], options: TrainOptions | None = None,
              meta: Mapping[str, Any] | None = None, log=None) -> dict[str, Any]:
    """Fit everything from ``records`` and return the model-file state (see :mod:`predictor.model_file`).

    BLAS runs on one thread here. With several, the order of floating-point sums in the linear heads depends on
    the machine's core count, and those last-bit differences reach the trees through the text length score:
    the same data trained on 1 and 2 cores moved ChatDev's held-out KV saving by 0.7 points. One thread, the
    ridge head solved exactly and without BLAS (``TextParams.ridge_tol`` and
    :func:`predictor.classifier.solve_ridge`: scipy's solver depended on the CPU's BLAS kernels, by a lot at a
    loose tolerance and in the last bits at any), a vocabulary cut that does not depend on numpy's SIMD sort
    (:func:`predictor.classifier.fit_vocabulary`) and the C library's log and expm1 where numpy has AVX-512
    kernels (:func:`predictor.classifier.smooth_idf`) make a model depend only on its data, options and
    library versions, up to the last bits of the role head's weights: scipy's L-BFGS takes its dot products
    from BLAS, whose kernels OpenBLAS picks by CPU. Those bits do not reach the length model (its role feature
    is the label, or the classifier's most likely role): with OpenBLAS's SkylakeX and Haswell kernels, the five
    CV folds' length models and length heads were identical to the bit. (A refit also never competes with
    serving for more than one core.)"""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        return _fit_state(records, options, meta, log)


def _fit_state(records: Sequence[dict[str, Any]], options: TrainOptions | None,
               meta: Mapping[str, Any] | None, log) -> dict[str, Any]:
    import sklearn

    from predictor.evaluate import fit_baselines
    from predictor.model_file import FORMAT, FORMAT_VERSION, feature_spec

    options = options or TrainOptions()
    log = log or (lambda message: None)
    records, group_list = canonical_order(records)
    if not records:
        raise TrainingDataError("no training records")
    started = time.perf_counter()
    views = [parse_request(*request_of(r)) for r in records]
    labels = [r.get("agent_role") for r in records]
    usable = np.array([length_usable(r) for r in records])
    if not usable.any():
        raise TrainingDataError("no training record has a usable output length")
    y = np.array([r["usage"]["completion_tokens"] for r in records], dtype=np.float64)
    # math.log1p, not np.log1p: numpy's AVX-512 kernel differs in the last bit (see classifier.smooth_idf)
    log_y = np.array([math.log1p(tokens) if ok else math.nan for tokens, ok in zip(y.tolist(), usable)])
    groups = np.array(group_list)
    weights = source_weights(records, options.source_balance)
    log(f"parsed {len(records)} records ({int(usable.sum())} with a usable output length) "
        f"in {time.perf_counter() - started:.1f}s")

    started = time.perf_counter()
    text_model, oof_score, X_text = fit_text_model(views, labels, log_y, weights, groups, options.text)
    log(f"text model: {text_model.encoder.width} features, classes {text_model.classes} "
        f"({time.perf_counter() - started:.1f}s)")

    # Role feature: the label where there is one, else what the classifier says.
    roles = [label if label is not None else text_model.classify(view)[0] for label, view in zip(labels, views)]
    model_counts = Counter(view.model for view, ok in zip(views, usable) if ok)
    vocab = sorted(name for name, count in model_counts.most_common(options.model_vocab_max)
                   if count >= options.model_min_count and name)
    assembler = FeatureAssembler(vocab)
    index = np.flatnonzero(usable)
    X = np.vstack([assembler.row(views[i], roles[i], oof_score[i]) for i in index])

    started = time.perf_counter()
    strata = np.array([ROLES.index(roles[i]) if roles[i] in ROLES else ROLES.index("other") for i in index])
    model_slots = assembler.model_slots if options.calibrate_by_model else 1
    models = np.array([assembler.model_slot(views[i].model) for i in index]) if model_slots > 1 else None
    calibration = None
    if options.calibrate:
        calibration = cross_conformal_offsets(X_text, views, roles, assembler, index, log_y, weights, groups,
                                              strata, options, models, model_slots)
    # Without calibration there are no offsets, so the trees must be fitted at the target levels themselves.
    fit_levels = calibration.fit_levels if calibration else tuple(options.quantiles)
    length_model = fit_length_model(X, log_y[index], weights[index], options.quantiles, options.length,
                                    calibration.offsets if calibration else None, model_slots, fit_levels,
                                    calibration.context_blocks if calibration else 1)
    role_offsets = length_model.offsets_of(np.array([length_model.stratum(r, 0) for r in range(len(ROLES))]))[:, -1]
    p90_offsets = {role: round(float(offset), 1) for role, offset in zip(ROLES, role_offsets)}
    if calibration and len(calibration.upper_reservation) > 1:
        tried = ", ".join(f"{level:g}: {tokens:.1f}" for level, tokens in calibration.upper_reservation.items())
        log(f"top quantile fitted at {fit_levels[-1]:g} (calibrated out-of-fold mean reservation by level, "
            f"tokens: {tried})")
    log(f"length model: {len(length_model.forest.roots)} trees, {len(length_model.offsets)} calibration cells, "
        f"p90 offsets in tokens by role (first model) {p90_offsets} ({time.perf_counter() - started:.1f}s)")

    priors = {}
    by_role: dict[str, list[float]] = defaultdict(list)
    for i in index:
        by_role[roles[i]].append(y[i])
    for role, values in by_role.items():
        if len(values) >= 5:
            p50, p90 = np.quantile(values, 0.5), np.quantile(values, 0.9)
            priors[role] = [max(1, int(p50)), max(1, int(p50), int(np.ceil(p90)))]

    try:
        import skops

        skops_version = skops.__version__
    except ImportError:  # pragma: no cover
        skops_version = None
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "feature_spec": feature_spec(),
        "features": assembler.names,
        "model_vocab": vocab,
        "text_model": text_model.to_state(),
        "length_model": length_model.to_state(),
        "priors": priors,
        "baselines": fit_baselines([records[i] for i in index], roles=[labels[i] for i in index]),
        "training": {
            "n_records": len(records), "n_length_records": int(usable.sum()),
            "sources": dict(Counter(r.get("source", "") for r in records)),
            "roles": dict(Counter(label or "null" for label in labels)),
            "text_params": asdict(options.text), "length_params": asdict(options.length),
            "quantiles": list(options.quantiles), "fit_levels": list(fit_levels),
            "upper_reservation": ({str(level): round(tokens, 2) for level, tokens in
                                   calibration.upper_reservation.items()} if calibration else None),
            "source_balance": options.source_balance,
            "sklearn_version": sklearn.__version__, "skops_version": skops_version,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **dict(meta or {}),
        },
    }


def cross_conformal_offsets(X_text, views, roles, assembler: FeatureAssembler, index: np.ndarray,
                            log_y: np.ndarray, weights: np.ndarray, groups: np.ndarray, strata: np.ndarray,
                            options: TrainOptions, models: np.ndarray | None = None,
                            model_slots: int = 1) -> Calibration | None:
    """Per-(role, model) conformal offsets (tokens) from group-k-fold predictions made the way serving makes them,
    and the level the top quantile's trees are fitted at.

    For each fold, the length head (ridge) and the quantile GBMs are refit on the other folds (the GBMs on
    out-of-fold ridge scores, as in the final fit), and the held-out rows are scored with that fold's ridge
    fitted on all its training rows, which is what a request sees at serving time. Calibrating on the GBM's
    own out-of-fold rows instead would pair a model trained on noisy out-of-fold scores with those same noisy
    scores, and over-cover at serving time. The TF-IDF vocabulary is shared (fit without labels).

    The top quantile's trees are fitted at each level of ``options.upper_fit_levels`` (conformalized quantile
    regression only needs trees that rank requests well; the offsets set the level), and the level whose
    calibrated predictions reserve least is kept (:func:`choose_upper_level`).

    Where some training rows give a workflow step, the held-out rows are also scored with the step removed, as
    a client without workflow context is served, and those predictions get their own block of offsets (see
    :class:`predictor.length_model.LengthModel`); the level is chosen on the predictions with the step.
    """
    from sklearn.model_selection import GroupKFold

    from predictor.classifier import fit_length_head, oof_length_scores
    from predictor.length_model import FlatForest, expm1, fit_quantile_estimators, mondrian_offsets

    group_index = groups[index]
    n_groups = len(np.unique(group_index))
    if n_groups < 3 or len(index) < 30:
        return None
    lower = tuple(options.quantiles[:-1])
    candidates = tuple(dict.fromkeys(options.upper_fit_levels or options.quantiles[-1:]))
    levels = lower + candidates
    step_column = assembler.names.index("workflow_step")
    has_step = bool(np.any([views[i].workflow_step is not None for i in index]))
    predictions = np.zeros((len(index), len(levels)))
    stepless = np.zeros((len(index), len(levels))) if has_step else None
    for train_pos, test_pos in GroupKFold(n_splits=min(options.calibration_folds, n_groups)).split(
            index, groups=group_index):
        train_idx, test_idx = index[train_pos], index[test_pos]
        fold_weights = weights[train_idx]
        coef, bias = fit_length_head(X_text[train_idx], log_y[train_idx], fold_weights, options.text)
        fold_scores = oof_length_scores(X_text[train_idx], log_y[train_idx], fold_weights, groups[train_idx],
                                        options.text, coef, bias)
        X_train = np.vstack([assembler.row(views[i], roles[i], score) for i, score in zip(train_idx, fold_scores)])
        forest = FlatForest.from_estimators(fit_quantile_estimators(
            X_train, log_y[train_idx], fold_weights, levels, options.length))
        test_scores = X_text[test_idx] @ coef + bias
        X_test = np.vstack([assembler.row(views[i], roles[i], score) for i, score in zip(test_idx, test_scores)])
        predictions[test_pos] = forest.predict(X_test)
        if stepless is not None:
            X_test[:, step_column] = np.nan
            stepless[test_pos] = forest.predict(X_test)
    if models is None:
        models, model_slots = np.zeros(len(index), dtype=np.intp), 1
    caps = np.array([views[i].max_tokens or np.inf for i in index], dtype=np.float64)

    def at_level(log_predictions: np.ndarray, k: int) -> np.ndarray:
        """The lower quantiles and the k-th top candidate, in tokens (the unit a reservation is paid in)."""
        tokens = expm1(log_predictions)
        return np.column_stack([tokens[:, :len(lower)], tokens[:, len(lower) + k]])

    actual = expm1(log_y[index])
    by_level = {level: at_level(predictions, k) for k, level in enumerate(candidates)}
    level, offsets, reservation = choose_upper_level(actual, by_level, options.quantiles, strata,
                                                     models, model_slots, weights[index], caps)
    if stepless is None:
        return Calibration(offsets, lower + (level,), reservation)
    stepless_offsets = mondrian_offsets(actual, at_level(stepless, candidates.index(level)), options.quantiles,
                                        strata, len(ROLES), models, model_slots)
    return Calibration(np.vstack([offsets, stepless_offsets]), lower + (level,), reservation, context_blocks=2)


def choose_upper_level(actual: np.ndarray, oof_by_level: Mapping[float, np.ndarray], quantiles: Sequence[float],
                       strata: np.ndarray, models: np.ndarray, model_slots: int, weights: np.ndarray,
                       caps: np.ndarray) -> tuple[float, np.ndarray, dict[float, float]]:
    """(level, its offsets, weighted mean calibrated reservation per level): the fit level of the top quantile
    whose out-of-fold predictions, once calibrated, reserve the fewest tokens.

    Every candidate is calibrated to the same target coverage per (role, model) cell, so this compares
    reservations at equal coverage, which is what the KV memory pays for. Trees fitted at the target level
    itself (0.9) are not the best at this: with 20 records a leaf, a leaf's 90th percentile rests on its two
    largest outputs, and its noise becomes reservation after calibration. On the six trace sources' training
    runs (ten seeded splits) 0.9 reserved the most on nine, and the best of 0.7 and 0.8 0.7-2.0 % less.
    The price is adaptivity: a lower level leaves more of the spread to the offsets, which are constant per
    (role, model) cell, so coverage holds less well where the spread differs from the training data's (a
    ChatDev-only model's p90 covered 80.7 % of AlpacaEval's requests fitted at 0.7, 89.4 % at 0.9). That is
    why it is opt-in (``TrainOptions.upper_fit_levels``). Ties keep the higher (nearer the target) level."""
    from predictor.length_model import mondrian_offsets, strata_of

    cells = strata_of(strata, models, model_slots)
    best: tuple[float, float, np.ndarray] | None = None
    reservation: dict[float, float] = {}
    for level in sorted(oof_by_level, reverse=True):
        offsets = mondrian_offsets(actual, oof_by_level[level], quantiles, strata, len(ROLES), models, model_slots)
        top = np.clip(oof_by_level[level][:, -1] + offsets[cells, -1], 1.0, caps)
        reservation[level] = float(np.average(top, weights=weights))
        if best is None or reservation[level] < best[1]:
            best = (level, reservation[level], offsets)
    assert best is not None
    return best[0], best[2], dict(sorted(reservation.items()))


def fit_predictor(records: Sequence[dict[str, Any]], options: TrainOptions | None = None, **predictor_kwargs):
    """Fit and return a ready :class:`~predictor.predictor.Predictor` (used by the online learner too)."""
    from predictor.predictor import Predictor

    return Predictor.from_state(fit_state(records, options), **predictor_kwargs)


# -------------------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    from predictor.cli import held_out_share, positive_int, share, split_seed

    parser.add_argument("--data", nargs="+", required=True, metavar="FILE",
                        help="trace files (.jsonl / .jsonl.gz), see predictor/trace.py")
    parser.add_argument("--out", required=True, metavar="MODEL", help="model file to write (skops)")
    parser.add_argument("--split", choices=("train", "all"), default="train",
                        help="train on the train part of a by-workflow split (default) or on all records")
    parser.add_argument("--test-size", type=held_out_share, default=DEFAULT_TEST_SIZE,
                        help="share of workflows held out per source, strictly between 0 and 1 (default 0.2)")
    parser.add_argument("--seed", type=split_seed, default=DEFAULT_SEED, help="split seed (default 0)")
    parser.add_argument("--max-iter", type=positive_int, default=LengthParams.max_iter,
                        help="boosting iterations (>= 1)")
    parser.add_argument("--max-depth", type=positive_int, default=LengthParams.max_depth, help="tree depth (>= 1)")
    parser.add_argument("--threads", type=positive_int, default=LengthParams.threads,
                        help="OpenMP threads per boosting fit (default 1)")
    parser.add_argument("--source-balance", type=share, default=TrainOptions.source_balance,
                        help="0 = weigh records equally, 1 = weigh sources equally (default 0.5)")
    parser.add_argument("--threshold", type=share, default=TextParams.threshold,
                        help="classifier confidence (0 to 1) below which the role is 'other' (default "
                             f"{TextParams.threshold:g})")
    parser.add_argument("--upper-fit-levels", type=fit_level, nargs="+", default=TrainOptions.upper_fit_levels,
                        metavar="Q", help="levels the p90 trees may be fitted at before calibration, e.g. "
                                          "0.7 0.8 0.9; the one that reserves least out of fold is kept "
                                          "(default 0.9; lower levels cover unseen frameworks less well)")
    parser.add_argument("--quiet", action="store_true", help="print only errors (no progress lines, no summary)")


def fit_level(text: str) -> float:
    """argparse type of a quantile level: a float strictly between 0 and 1."""
    from predictor.cli import strictly_between_0_and_1

    return strictly_between_0_and_1(text, "a fit level is a quantile")


def output_problem(out: Path, data: Sequence[str | Path] = ()) -> str | None:
    """Why the model cannot be written to ``out`` (a folder there, one of the ``data`` files it would replace, or
    a folder that cannot be made or written), or None. It creates nothing: the folder of a new ``--out`` is made
    when the model is written (``save_state``), so a run that fails before (missing data) leaves none behind."""
    from predictor.trace import folder_problem, same_file

    if out.is_dir():
        return f"--out {out} is a folder; give a file name such as {out / 'model.skops'}"
    if out.exists():
        for path in data:
            if same_file(path, out):
                return f"--out {out} is one of the --data files; give the model another name"
    problem = folder_problem(out)
    return f"cannot write --out {out}: {problem}" if problem else None


def main(args: argparse.Namespace) -> int:
    from predictor.model_file import save_state

    def log(message: str) -> None:
        if not args.quiet:
            print(f"[train] {message}", file=sys.stderr, flush=True)

    problem = output_problem(Path(args.out), args.data)
    if problem:  # said now, not after a minute of training
        print(f"maestro predictor train: {problem}", file=sys.stderr)
        return 2
    records = load_records_or_say_why(args.data, "train")
    if records is None:
        return 2
    if args.split == "train":
        train, test = split_records(records, args.test_size, args.seed)
        log(f"{len(records)} records: {len(train)} train, {len(test)} held out (by workflow)")
    else:
        train = records
    options = TrainOptions(length=LengthParams(max_iter=args.max_iter, max_depth=args.max_depth,
                                               threads=args.threads),
                           text=TextParams(threshold=args.threshold), source_balance=args.source_balance,
                           upper_fit_levels=tuple(args.upper_fit_levels))
    try:
        files = data_files(args.data)
    except OSError as exc:
        print(f"maestro predictor train: cannot read {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 2
    meta = {"data": [file["path"] for file in files], "data_files": files,
            "split": {"method": "group_shuffle_by_source_workflow", "part": args.split,
                      "test_size": args.test_size, "seed": args.seed}}
    try:
        state = fit_state(train, options, meta, log)
    except TrainingDataError as exc:
        print(f"maestro predictor train: {exc} (of {len(records)} records read from {len(args.data)} file(s))",
              file=sys.stderr)
        return 2
    try:
        path = save_state(state, args.out)
    except OSError as exc:
        print(f"maestro predictor train: cannot write the model: {exc}", file=sys.stderr)
        return 1
    log(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":  # pragma: no cover
    parser = argparse.ArgumentParser(prog="python -m predictor.train")
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
