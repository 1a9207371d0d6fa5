"""Output-length model: one quantile ``HistGradientBoostingRegressor`` per quantile (p50, p90).

Targets are ``log1p(completion_tokens)``: a quantile of the log is the log of the quantile, and trees fit the
multiplicative spread of output lengths better in log space. Each quantile is then shifted by a conformal
offset per (role, model), measured on out-of-fold predictions (split by workflow, see
:func:`predictor.train.fit_state`), so p90 covers about 90% of unseen requests rather than the (optimistic)
in-sample 90%. The offsets are in tokens, not in log space: a reservation is paid in tokens, and at the same
coverage a shift in tokens reserves less than a multiplicative one, because a log-space shift gives the
longest predictions, which dominate the memory, the largest slack (ChatDev's KV saving +0.4 points on average
over eight held-out splits, every other source unchanged; docs/benchmarks.md). Because the offsets set the
level, p90's trees need not be fitted at 0.9: training can fit them at a lower level where that reserves less
once calibrated (conformalized quantile regression; opt-in, see :func:`predictor.train.choose_upper_level`).

Serving does not call scikit-learn: the fitted trees of all quantiles are compiled into flat numpy arrays
(:class:`FlatForest`) and walked level by level for every tree at once, which on one row is several times
faster than ``HistGradientBoostingRegressor.predict`` and gives the same numbers (a test checks it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

QUANTILES = (0.5, 0.9)


@dataclass
class LengthParams:
    # 300 trees of up to 31 leaves: on the six trace sources (three seeded splits by run) this made p90 sharper
    # than 150 trees of 15 leaves (ChatDev p50 MAE -1.5 points, coverage closer to 90 %) at < 0.5 ms a predict.
    # Learning rate, tree count, leaves, L2 and feature subsampling were screened since: all within 0.3 points
    # of ChatDev's KV saving on three splits and in 5-fold CV (docs/benchmarks.md, eleventh session)
    max_iter: int = 300
    learning_rate: float = 0.06
    max_depth: int = 6
    max_leaf_nodes: int = 31
    min_samples_leaf: int = 20
    l2_regularization: float = 1.0
    max_features: float = 1.0
    seed: int = 0
    threads: int = 1  # OpenMP threads per fit: small fits gain nothing from more, and a refit must not starve
                      # the gateway's event loop (or spin on a busy machine)


class FlatForest:
    """The trees of several HistGradientBoostingRegressors as flat arrays, walked all at once."""

    def __init__(self, feature: np.ndarray, threshold: np.ndarray, missing_left: np.ndarray, left: np.ndarray,
                 right: np.ndarray, value: np.ndarray, roots: np.ndarray, tree_model: np.ndarray,
                 baselines: np.ndarray, depth: int) -> None:
        left, right, roots = (np.asarray(a, dtype=np.intp) for a in (left, right, roots))
        _check_nodes(feature, threshold, missing_left, left, right, value, roots, tree_model, baselines)
        # Nodes are stored level by level (all roots, then every tree's depth-1 nodes, ...) rather than tree by
        # tree: the walk reads one node per tree per level, and this way each level's reads fall in one compact
        # block of memory. Measured on whole cold predict() calls (paired, alternating with the tree-by-tree
        # layout): about 40 us less per call, the forest's reads having been cache misses after the text stage.
        order, levels = _level_major_order(left, right, roots)
        if int(depth) != levels:  # fewer steps stop inside the trees, more cost time for nothing
            raise ValueError(f"trees {levels} levels deep, but a walk of depth {depth}")
        new_index = np.empty_like(order)
        new_index[order] = np.arange(len(order))
        self.feature = np.ascontiguousarray(np.asarray(feature, dtype=np.intp)[order])
        self.threshold = np.ascontiguousarray(np.asarray(threshold, dtype=np.float64)[order])
        self.missing_left = np.ascontiguousarray(np.asarray(missing_left, dtype=bool)[order])
        self.left = np.ascontiguousarray(new_index[left[order]])
        self.right = np.ascontiguousarray(new_index[right[order]])
        self.value = np.ascontiguousarray(np.asarray(value, dtype=np.float64)[order])
        self.roots = np.ascontiguousarray(new_index[roots])
        self.tree_model = np.ascontiguousarray(tree_model, dtype=np.intp)
        self.baselines = np.ascontiguousarray(baselines, dtype=np.float64)
        self.depth = int(depth)
        self.n_models = len(self.baselines)
        # Trees are stored model after model: the sum of one model's trees is a reduceat over these starts.
        starts = np.searchsorted(self.tree_model, np.arange(self.n_models))
        self._starts = starts.astype(np.intp)
        self._has_trees = np.bincount(self.tree_model, minlength=self.n_models) > 0
        # One-row walk with fewer numpy calls per level: a row is widened to [x0, x0, x1, x1, ...] with a missing
        # value as -inf in the first copy (-inf <= threshold: left) and NaN in the second (NaN <= threshold is
        # false: right), and each node reads the copy that sends a missing value its way, so there is no separate
        # missing-value step. (NaN rather than +inf: a split of missing values alone has threshold +inf.) The
        # children are interleaved so that the next node is children[2 * node + went_left].
        self._split_column = self.feature * 2 + (~self.missing_left).astype(np.intp)
        self._children = np.ascontiguousarray(np.stack([self.right, self.left], axis=1).ravel())

    @classmethod
    def from_estimators(cls, estimators: Sequence[Any]) -> "FlatForest":
        feature, threshold, missing_left, left, right, value, roots, tree_model = [], [], [], [], [], [], [], []
        baselines, depth, offset = [], 0, 0
        for model_index, estimator in enumerate(estimators):
            baselines.append(float(np.ravel(estimator._baseline_prediction)[0]))
            for iteration in estimator._predictors:
                for predictor in iteration:
                    nodes = predictor.nodes
                    if np.any(nodes["is_categorical"]):
                        raise ValueError("categorical splits are not supported by FlatForest")
                    is_leaf = nodes["is_leaf"].astype(bool)
                    index = np.arange(len(nodes)) + offset
                    feature.append(np.where(is_leaf, 0, nodes["feature_idx"]))
                    threshold.append(np.where(is_leaf, 0.0, nodes["num_threshold"]))
                    missing_left.append(nodes["missing_go_to_left"].astype(bool))
                    left.append(np.where(is_leaf, index, nodes["left"].astype(np.int64) + offset))
                    right.append(np.where(is_leaf, index, nodes["right"].astype(np.int64) + offset))
                    value.append(np.where(is_leaf, nodes["value"], 0.0))
                    roots.append(offset)
                    tree_model.append(model_index)
                    depth = max(depth, int(nodes["depth"].max()))
                    offset += len(nodes)
        if not roots:
            empty_i, empty_f = np.zeros(0, np.intp), np.zeros(0)
            return cls(empty_i, empty_f, np.zeros(0, bool), empty_i, empty_i, empty_f, empty_i, empty_i,
                       np.array(baselines), 0)
        return cls(np.concatenate(feature), np.concatenate(threshold), np.concatenate(missing_left),
                   np.concatenate(left), np.concatenate(right), np.concatenate(value), np.array(roots),
                   np.array(tree_model), np.array(baselines), depth)

    def predict_row(self, x: np.ndarray) -> np.ndarray:
        """Raw predictions of every model for one feature row."""
        if not len(self.roots):
            return self.baselines.copy()
        wide = np.repeat(np.asarray(x, dtype=np.float64), 2)
        left_copy = wide[0::2]
        left_copy[left_copy != left_copy] = -np.inf  # a view: writes into wide
        node = self.roots
        split_column, threshold, children = self._split_column, self.threshold, self._children
        for _ in range(self.depth):
            node = children[(node << 1) + (wide[split_column[node]] <= threshold[node])]
        sums = np.add.reduceat(self.value[node], self._starts) if self._has_trees.all() else self._sums(node)
        return self.baselines + sums

    def _sums(self, node: np.ndarray) -> np.ndarray:
        return np.bincount(self.tree_model, weights=self.value[node], minlength=self.n_models)

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Raw predictions for many rows, shape (n_rows, n_models)."""
        X = np.asarray(X, dtype=np.float64)
        n = X.shape[0]
        if not len(self.roots):
            return np.tile(self.baselines, (n, 1))
        node = np.broadcast_to(self.roots, (n, len(self.roots))).copy()
        rows = np.arange(n)[:, None]
        for _ in range(self.depth):
            xv = X[rows, self.feature[node]]
            go_left = np.where(np.isnan(xv), self.missing_left[node], xv <= self.threshold[node])
            node = np.where(go_left, self.left[node], self.right[node])
        values = self.value[node]
        out = np.zeros((n, self.n_models))
        for model in range(self.n_models):
            out[:, model] = values[:, self.tree_model == model].sum(axis=1)
        return out + self.baselines

    def to_state(self) -> dict[str, Any]:
        return {"feature": self.feature.astype(np.int32), "threshold": self.threshold,
                "missing_left": self.missing_left.astype(np.uint8), "left": self.left.astype(np.int32),
                "right": self.right.astype(np.int32), "value": self.value, "roots": self.roots.astype(np.int32),
                "tree_model": self.tree_model.astype(np.int32), "baselines": self.baselines, "depth": self.depth}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "FlatForest":
        return cls(state["feature"], state["threshold"], state["missing_left"], state["left"], state["right"],
                   state["value"], state["roots"], state["tree_model"], state["baselines"], state["depth"])


def _check_nodes(feature, threshold, missing_left, left, right, value, roots, tree_model, baselines) -> None:
    """Raise ValueError unless the node arrays describe trees this class can walk: one entry per node in each,
    children and roots that are nodes, one model index per tree naming a model. (A damaged model file would
    otherwise load and fail with an IndexError, or read another tree's node, at some later request.)"""
    nodes = len(left)
    shapes = {name: np.shape(array) for name, array in (("feature", feature), ("threshold", threshold),
              ("missing_left", missing_left), ("right", right), ("value", value))}
    if any(shape != (nodes,) for shape in shapes.values()) or np.ndim(left) != 1:
        raise ValueError(f"tree node arrays of different shapes ({nodes} left children; {shapes})")
    n_models = len(np.atleast_1d(baselines))
    if np.shape(tree_model) != np.shape(roots) or np.ndim(roots) != 1:
        raise ValueError(f"{np.shape(roots)} tree roots and {np.shape(tree_model)} tree model indices")
    for name, index, bound in (("child", left, nodes), ("child", right, nodes), ("root", roots, nodes),
                               ("tree model", np.asarray(tree_model), n_models)):
        if index.size and (index.min() < 0 or index.max() >= bound):
            raise ValueError(f"a {name} index out of range (0..{bound - 1})")
    if nodes and np.min(feature) < 0:  # numpy would read a negative one from the row's end (the row's width is
        raise ValueError("a negative feature index")  # checked where it is known, Predictor.from_state)
    # a leaf's threshold is infinite; a NaN one, or a value that is not finite, would make every quantile NaN
    if np.isnan(threshold).any() or not (np.isfinite(value).all() and np.isfinite(baselines).all()):
        raise ValueError("tree thresholds that are NaN, or leaf values or baselines that are not finite")


def _level_major_order(left: np.ndarray, right: np.ndarray, roots: np.ndarray) -> tuple[np.ndarray, int]:
    """(Node indices ordered by depth, then by tree; the trees' depth). A leaf is its own child, and is placed
    once, at its depth. Raise ValueError where the children do not make trees: a node reached twice (a child
    that is a root, an ancestor or another branch's node), or one with only one child that is itself."""
    if np.any((left == np.arange(len(left))) != (right == np.arange(len(right)))):
        raise ValueError("a tree node that is half a leaf (one child is the node itself)")
    placed = np.zeros(len(left), dtype=bool)
    levels = []
    frontier = roots
    reached = 0
    while frontier.size:
        reached += len(frontier)
        if placed[frontier].any():
            raise ValueError("a tree node reached twice: the node arrays do not describe trees")
        placed[frontier] = True
        levels.append(frontier)
        internal = frontier[left[frontier] != frontier]
        frontier = np.stack([left[internal], right[internal]], axis=1).ravel()  # tree order kept
    if reached != int(placed.sum()):  # the same node twice in one level
        raise ValueError("a tree node reached twice: the node arrays do not describe trees")
    order = np.concatenate(levels) if levels else np.zeros(0, dtype=np.intp)
    if len(order) != len(left):  # nodes no root reaches (not written by from_estimators): keep them at the end
        order = np.concatenate([order, np.flatnonzero(~placed)])
    return order, max(len(levels) - 1, 0)


def _estimator(quantile: float, params: LengthParams):
    from sklearn.ensemble import HistGradientBoostingRegressor

    return HistGradientBoostingRegressor(
        loss="quantile", quantile=quantile, max_iter=params.max_iter, learning_rate=params.learning_rate,
        max_depth=params.max_depth, max_leaf_nodes=params.max_leaf_nodes, min_samples_leaf=params.min_samples_leaf,
        l2_regularization=params.l2_regularization, max_features=params.max_features, early_stopping=False,
        random_state=params.seed)


def fit_quantile_estimators(X: np.ndarray, log_y: np.ndarray, weights: np.ndarray | None,
                            quantiles: Sequence[float], params: LengthParams) -> list[Any]:
    all_nan = np.isnan(X).all(axis=0)
    if all_nan.any():  # scikit-learn cannot bin an all-missing column; a constant one is never split on
        X = X.copy()
        X[:, all_nan] = 0.0
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=params.threads, user_api="openmp"):
        return [_estimator(q, params).fit(X, log_y, sample_weight=weights) for q in quantiles]


_EXPM1_MAX = 700.0  # e**700 is about 1e304: a finite float, where 710 overflows


def expm1(values: np.ndarray) -> np.ndarray:
    """``np.expm1`` with the C library's ``math.expm1``: numpy's AVX-512 kernel rounds some inputs differently, so
    the conformal offsets, and the quantiles served, would depend on whether the CPU has AVX-512 (see
    :func:`predictor.classifier.smooth_idf`). Arrays here are small (two values per request; a few per training
    row when calibrating)."""
    values = np.asarray(values, dtype=np.float64)
    # past _EXPM1_MAX math.expm1 raises OverflowError where numpy gives inf: a forest's sum of leaves that far out
    # (only an edited model file) reads as a length far past any cap, which the caller's cap then bounds
    return np.array([math.expm1(min(v, _EXPM1_MAX)) for v in values.ravel().tolist()],
                    dtype=np.float64).reshape(values.shape)


def weighted_quantile(values: np.ndarray, q: float, weights: np.ndarray | None = None) -> float:
    values = np.asarray(values, dtype=np.float64)
    if weights is None:
        return float(np.quantile(values, q))
    order = np.argsort(values, kind="stable")  # ties in a fixed order: the sums below do not depend on the CPU
    cumulative = np.cumsum(np.asarray(weights, dtype=np.float64)[order])
    position = np.searchsorted(cumulative, q * cumulative[-1], side="left")
    return float(values[order][min(position, len(values) - 1)])


@dataclass
class LengthModel:
    """Quantile predictions of output tokens: the flat forest's log1p quantiles, back in tokens, + conformal offsets.

    ``offsets`` has one row per stratum and one column per quantile: split-conformal shifts in tokens, measured per
    (role, served model) — Mondrian conformal prediction — each shrunk towards its role's shift, and that
    towards the global shift, where a cell has few out-of-fold samples. Calibrating per cell is what makes p90
    cover about 90% for every kind of traffic rather than only on average: different frameworks use one role
    name for different work, and different models are differently verbose. A stratum is
    ``role_index * model_slots + model_slot`` (:meth:`stratum`); ``model_slots == 1`` is per role only.

    With ``context_blocks == 2`` the offsets have a second block of as many rows, for requests that give no
    workflow step (no ``X-Workflow-Step`` header or ``metadata.workflow_step``). The trees were trained on
    multi-agent traces that all had one, and without it they route the request down other branches, so the
    offsets measured with the step would not make p90 cover 90 % of such requests (Magentic-One's fell to 82 %
    on the seed-0 split). Whether a client sends workflow context is known before the request runs, so it is
    one more Mondrian dimension: the second block is calibrated on the same out-of-fold predictions made
    without the step (:func:`predictor.train.cross_conformal_offsets`). Models saved before it have one block,
    which every request reads.
    """

    forest: FlatForest
    quantiles: tuple[float, ...] = QUANTILES
    offsets: np.ndarray = field(default_factory=lambda: np.zeros((1, len(QUANTILES))))
    model_slots: int = 1
    context_blocks: int = 1

    def stratum(self, role_index: int, model_slot: int, has_step: bool = True) -> int:
        cell = role_index * self.model_slots + (model_slot if self.model_slots > 1 else 0)
        if has_step or self.context_blocks == 1:
            return cell
        return cell + len(self.offsets) // self.context_blocks

    def offsets_of(self, strata: int | np.ndarray) -> np.ndarray:
        """The offsets (tokens, one per quantile) of a calibration cell, or of an array of cells. An uncalibrated
        model has a single all-zero row, which every cell reads. (Python's min for one cell: predict's hot path.)"""
        last = len(self.offsets) - 1
        return self.offsets[min(strata, last) if isinstance(strata, int) else np.minimum(strata, last)]

    def predict_tokens(self, row: np.ndarray, stratum: int = 0) -> np.ndarray:
        """The quantiles (in output tokens, not yet capped or rounded) for one feature row."""
        return expm1(self.forest.predict_row(row)) + self.offsets_of(stratum)

    def predict_tokens_many(self, X: np.ndarray, strata: np.ndarray | None = None) -> np.ndarray:
        strata = np.zeros(len(X), dtype=np.intp) if strata is None else strata
        return expm1(self.forest.predict(X)) + self.offsets_of(strata)

    def to_state(self) -> dict[str, Any]:
        return {"forest": self.forest.to_state(), "quantiles": [float(q) for q in self.quantiles],
                "offsets": np.asarray(self.offsets, dtype=np.float64), "model_slots": int(self.model_slots),
                "context_blocks": int(self.context_blocks)}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "LengthModel":
        offsets = np.atleast_2d(np.asarray(state["offsets"], dtype=np.float64))
        forest = FlatForest.from_state(state["forest"])
        if not (len(state["quantiles"]) == forest.n_models == offsets.shape[1]) or offsets.ndim != 2:
            raise ValueError(f"{len(state['quantiles'])} quantiles, {forest.n_models} boosted models and offsets "
                             f"of shape {offsets.shape}")
        if not np.isfinite(offsets).all():
            raise ValueError("calibration offsets that are not finite")
        return cls(forest, tuple(state["quantiles"]), offsets,
                   int(state.get("model_slots", 1)), int(state.get("context_blocks", 1)))


def conformal_offsets(actual: np.ndarray, oof_pred: np.ndarray, quantiles: Sequence[float],
                      weights: np.ndarray | None = None) -> np.ndarray:
    """Per-quantile shift so that out-of-fold predictions reach their nominal level (split conformal), in the
    units of ``actual`` and ``oof_pred`` (tokens, for :class:`LengthModel`)."""
    offsets = []
    for column, q in enumerate(quantiles):
        offsets.append(weighted_quantile(actual - oof_pred[:, column], q, weights))
    return np.array(offsets)


def stratified_offsets(actual: np.ndarray, oof_pred: np.ndarray, quantiles: Sequence[float],
                       strata: np.ndarray, n_strata: int, shrink: float = 50.0,
                       parent: np.ndarray | None = None) -> np.ndarray:
    """Conformal offsets per stratum, each pulled towards its parent's by ``shrink`` pseudo-samples.

    ``parent`` (one row per stratum) is the shift to shrink towards; by default the global shift."""
    overall = conformal_offsets(actual, oof_pred, quantiles)
    parent = np.tile(overall, (n_strata, 1)) if parent is None else np.asarray(parent, dtype=np.float64)
    offsets = parent.copy()
    for stratum in range(n_strata):
        mask = strata == stratum
        n = int(mask.sum())
        if n >= 10:
            own = conformal_offsets(actual[mask], oof_pred[mask], quantiles)
            offsets[stratum] = (n * own + shrink * parent[stratum]) / (n + shrink)
    return offsets


def strata_of(roles: np.ndarray, models: np.ndarray, model_slots: int) -> np.ndarray:
    """The calibration cell of each row, numbered as :meth:`LengthModel.stratum` numbers one."""
    return roles * model_slots + models if model_slots > 1 else np.asarray(roles)


def mondrian_offsets(actual: np.ndarray, oof_pred: np.ndarray, quantiles: Sequence[float],
                     roles: np.ndarray, n_roles: int, models: np.ndarray, model_slots: int,
                     shrink: float = 50.0) -> np.ndarray:
    """Offsets per (role, model slot): per-role offsets (shrunk to the global one), then per cell (shrunk to
    its role's). Rows are ordered as :meth:`LengthModel.stratum` indexes them."""
    by_role = stratified_offsets(actual, oof_pred, quantiles, roles, n_roles, shrink)
    if model_slots <= 1:
        return by_role
    cells = strata_of(roles, models, model_slots)
    parent = np.repeat(by_role, model_slots, axis=0)
    return stratified_offsets(actual, oof_pred, quantiles, cells, n_roles * model_slots, shrink, parent)


def fit_length_model(X: np.ndarray, log_y: np.ndarray, weights: np.ndarray | None,
                     quantiles: Sequence[float] = QUANTILES, params: LengthParams | None = None,
                     offsets: np.ndarray | None = None, model_slots: int = 1,
                     fit_levels: Sequence[float] | None = None, context_blocks: int = 1) -> LengthModel:
    """Fit one quantile GBM per quantile and compile them; ``offsets`` (strata × quantiles, ``context_blocks``
    blocks of them, see :class:`LengthModel`) default to zero.

    ``fit_levels`` (default: ``quantiles``) are the levels the trees are fitted at, one per quantile; the
    offsets then shift each to its target level in ``quantiles``. They may differ because the offsets were
    measured on trees fitted at these levels (see :func:`predictor.train.cross_conformal_offsets`), and
    without offsets they must not. Calibration is done by the caller through the whole serving path, see
    :func:`predictor.train.fit_state`."""
    params = params or LengthParams()
    fit_levels = tuple(quantiles if fit_levels is None else fit_levels)
    if len(fit_levels) != len(quantiles):
        raise ValueError(f"{len(fit_levels)} fit levels for {len(quantiles)} quantiles")
    if offsets is None and fit_levels != tuple(quantiles):
        raise ValueError("trees fitted at other levels than their quantiles need conformal offsets")
    estimators = fit_quantile_estimators(X, log_y, weights, fit_levels, params)
    if offsets is None:
        offsets, model_slots, context_blocks = np.zeros((1, len(quantiles))), 1, 1
    return LengthModel(FlatForest.from_estimators(estimators), tuple(quantiles), np.atleast_2d(offsets),
                       model_slots, context_blocks)
