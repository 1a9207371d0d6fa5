"""Role classifier (and the text length score) over the system prompt and the latest user turn.

An explicit role always wins (header ``X-Agent-Role`` or ``metadata.agent_role``, see
:func:`predictor.features.explicit_role_of`). Otherwise a multinomial logistic regression over TF-IDF blocks
(word 1-2-grams and character 3-4-grams, separately for the system prompt and the user turn) returns a role
and its probability; below ``threshold`` the role is ``other``.

The same TF-IDF features also feed a ridge regression of log output length (the *text length score*), which
the length model takes as one feature: one sparse product serves both heads.

Training fits scikit-learn's ``TfidfVectorizer`` (with our analyzers) and ``LogisticRegression``, and solves
scikit-learn's ``Ridge`` problem with its own conjugate gradients (:func:`solve_ridge`); serving only keeps
their vocabularies, idf weights and coefficients and computes the same numbers with a few numpy operations (a
test checks the equivalence), which is what keeps one prediction well under a millisecond.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from predictor.features import ANALYZERS, TEXT_BLOCKS, RequestView
from predictor.ngram_index import ngram_index

DEFAULT_THRESHOLD = 0.5


@dataclass
class TextParams:
    max_features: int = 20000   # per text block
    min_df: int = 2
    C: float = 4.0              # logistic regression
    alpha: float = 3.0          # ridge
    # Ridge on the sparse TF-IDF matrix is solved by conjugate gradients, which stop at this relative residual.
    # At scikit-learn's default (1e-4) the solution depends on the CPU: OpenBLAS picks its kernels by CPU, the
    # iterations differ in their last bits and stop at different points: the text length scores under two
    # kernel sets differed by up to 7e-4, enough to move the trees' splits (ChatDev's held-out MAE reduction
    # ranged 53.6-55.8 % over three OpenBLAS kernels on one machine). Solved to 1e-10 they agree to 1e-9 and
    # the trees are the same; training takes about 10 s longer (52 s for the six sources). The last 1e-9 came
    # from BLAS's dot products in scipy's solver, and :func:`solve_ridge` now takes them without BLAS.
    ridge_tol: float = 1e-10
    threshold: float = DEFAULT_THRESHOLD
    folds: int = 5


def fit_vocabulary(texts: Sequence[str], analyzer: str, params: TextParams) -> tuple[list[str], np.ndarray]:
    """One block's vocabulary (terms in alphabetical order) and idf weights, as binary ``TfidfVectorizer`` with
    ``min_df`` and ``max_features`` would fit them (the idf to the last bit, see :func:`smooth_idf`), except that
    terms tied in document frequency at the ``max_features`` cut are taken in alphabetical order.

    Why not ``TfidfVectorizer(max_features=...)`` itself: it ranks terms with numpy's default (unstable) sort,
    whose order among equal counts depends on the SIMD instructions of the CPU (numpy sorts with AVX2 or
    AVX-512 kernels where it finds them). Thousands of terms tie at the cut, so the same data gave a different
    vocabulary on different machines, and through it a different model: on one AMD EPYC VM, with and without
    numpy's AVX2 kernels, Magentic-One's held-out p90 coverage was 83.3 % and 89.5 % and ChatDev's KV saving
    58.9 % and 59.0 % (59.2 % on earlier VMs). Raises ``ValueError`` when no term is left (as scikit-learn
    does)."""
    from sklearn.feature_extraction.text import CountVectorizer

    counter = CountVectorizer(analyzer=ANALYZERS[analyzer], min_df=min(params.min_df, len(texts)), binary=True)
    counts = counter.fit_transform(texts)  # columns in alphabetical order of the terms
    keep = np.arange(counts.shape[1])
    if params.max_features is not None and len(keep) > params.max_features:
        document_frequency = counts.getnnz(axis=0)
        keep = np.sort(np.argsort(-document_frequency, kind="stable")[:params.max_features])
        counts = counts[:, keep]
    names = counter.get_feature_names_out()
    return [str(names[i]) for i in keep], smooth_idf(counts.getnnz(axis=0), counts.shape[0])


def smooth_idf(document_frequency: np.ndarray, n_documents: int) -> np.ndarray:
    """``TfidfTransformer``'s smoothed idf, ln((1 + n) / (1 + df)) + 1, taken with Python's ``math.log``.

    numpy's ``np.log``, which scikit-learn uses, has its own AVX-512 kernel, and it differs from the C library's
    log in the last bit for some inputs; the same data then gave different idf weights, TF-IDF rows and trees
    on CPUs with and without AVX-512 (five-fold CV moved by one ChatDev call). ``math.log`` is the C library's
    on every x86-64 CPU, and equals ``np.log`` where numpy has no AVX-512 kernel."""
    n = n_documents + 1
    return np.array([math.log(n / (int(df) + 1)) + 1.0 for df in document_frequency], dtype=np.float64)


class _Block:
    __slots__ = ("name", "field", "analyzer_name", "analyzer", "terms", "index", "idf", "offset")

    def __init__(self, name: str, field: str, analyzer: str, terms: list[str], idf: np.ndarray, offset: int) -> None:
        self.name, self.field, self.analyzer_name = name, field, analyzer
        self.analyzer = ANALYZERS[analyzer]
        self.terms = terms
        self.index = ngram_index(analyzer, terms)
        self.idf = np.asarray(idf, dtype=np.float64)
        self.offset = offset

    @property
    def vocab(self) -> dict[str, int]:
        return {term: i for i, term in enumerate(self.terms)}


class TextEncoder:
    """Binary TF-IDF (term present or not, times idf; l2 per block) over the text fields of a view."""

    def __init__(self, blocks: list[_Block], cache_size: int = 1024) -> None:
        self.blocks = blocks
        self.width = sum(len(b.terms) for b in blocks)
        self._fields: list[str] = []
        self._by_field: dict[str, list[_Block]] = {}
        for block in blocks:
            if block.terms:
                if block.field not in self._by_field:
                    self._fields.append(block.field)
                self._by_field.setdefault(block.field, []).append(block)
        self.cache_size = cache_size
        self._cache: OrderedDict[str, tuple[list[np.ndarray], list[np.ndarray]]] = OrderedDict()

    @classmethod
    def fit(cls, views: Sequence[RequestView], params: TextParams) -> "TextEncoder":
        blocks, offset = [], 0
        for name, field, analyzer in TEXT_BLOCKS:
            texts = [getattr(view, field) for view in views]
            try:
                terms, idf = fit_vocabulary(texts, analyzer, params)
            except ValueError:  # empty vocabulary (e.g. no request has a system prompt)
                terms, idf = [], np.zeros(0)
            blocks.append(_Block(name, field, analyzer, terms, idf, offset))
            offset += len(terms)
        return cls(blocks)

    def _encode_field(self, field: str, text: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
        all_idx, all_val = [], []
        for block in self._by_field[field]:
            idx = block.index.columns(text)  # sorted: rows are reproducible
            if not idx.size:
                continue
            values = block.idf[idx]
            # not ``values @ values``: BLAS's dot sums in an order that depends on the kernel OpenBLAS picks
            # for the CPU, and its last bits moved the trees (see _dot)
            values /= math.sqrt(_dot(values, values))
            all_idx.append(idx + block.offset if block.offset else idx)
            all_val.append(values)
        return all_idx, all_val

    def encode(self, view: RequestView) -> tuple[np.ndarray, np.ndarray]:
        """Sparse TF-IDF row of one view: (column indices, values).

        The system-prompt part is memoised by its text (agents resend the same system prompt on every call).
        The memo keeps the ``cache_size`` prompts used most recently: a busy gateway's many agents' prompts
        stay while one-off prompts pass through. Large bodies are predicted on executor threads while the
        event loop predicts small ones, so a key another thread evicted meanwhile is simply not there.
        """
        all_idx: list[np.ndarray] = []
        all_val: list[np.ndarray] = []
        for field in self._fields:
            text = getattr(view, field)
            if field == "system" and self.cache_size:
                cached = self._cache.get(text)
                if cached is None:
                    cached = self._encode_field(field, text)
                    self._cache[text] = cached
                    while len(self._cache) > self.cache_size:
                        try:
                            self._cache.popitem(last=False)
                        except KeyError:  # another thread emptied it
                            break
                else:
                    try:
                        self._cache.move_to_end(text)
                    except KeyError:  # another thread evicted it meanwhile
                        pass
                all_idx.extend(cached[0])
                all_val.extend(cached[1])
            else:
                idx, val = self._encode_field(field, text)
                all_idx.extend(idx)
                all_val.extend(val)
        if not all_idx:
            return np.zeros(0, dtype=np.intp), np.zeros(0)
        if len(all_idx) == 1:
            return all_idx[0], all_val[0]
        return np.concatenate(all_idx), np.concatenate(all_val)

    def matrix(self, views: Sequence[RequestView]):
        """CSR matrix of many views, computed through :meth:`encode` (the serving path)."""
        from scipy.sparse import csr_matrix

        indptr, indices, data = [0], [], []
        for view in views:
            idx, val = self.encode(view)
            indices.append(idx)
            data.append(val)
            indptr.append(indptr[-1] + len(idx))
        indices_arr = np.concatenate(indices) if indices else np.zeros(0, dtype=np.intp)
        data_arr = np.concatenate(data) if data else np.zeros(0)
        return csr_matrix((data_arr, indices_arr, np.array(indptr)), shape=(len(views), self.width))

    def by_frequency(self) -> tuple["TextEncoder", np.ndarray | None]:
        """This encoder with every block's terms in increasing idf order (the most common terms first), and the
        permutation of feature rows (new row ``i`` is old row ``perm[i]``); ``(self, None)`` if already so.

        Why: a prediction gathers one weight row per term found, and most found terms are common ones; with
        those rows next to each other the gather stays in cache (measured, paired: 25-33 us less per cold call)."""
        if all(np.all(b.idf[1:] >= b.idf[:-1]) for b in self.blocks):
            return self, None
        blocks, rows, offset = [], [], 0
        for b in self.blocks:
            order = np.argsort(b.idf, kind="stable")
            blocks.append(_Block(b.name, b.field, b.analyzer_name, [b.terms[i] for i in order], b.idf[order], offset))
            rows.append(b.offset + order)
            offset += len(order)
        return TextEncoder(blocks, self.cache_size), np.concatenate(rows)

    def to_state(self) -> list[dict[str, Any]]:
        return [{"name": b.name, "field": b.field, "analyzer": b.analyzer_name, "terms": "\n".join(b.terms),
                 "n_terms": len(b.terms), "idf": b.idf} for b in self.blocks]

    @classmethod
    def from_state(cls, state: list[dict[str, Any]]) -> "TextEncoder":
        blocks, offset = [], 0
        for item in state:
            terms = item["terms"].split("\n") if item["n_terms"] else []
            if len(terms) != item["n_terms"]:
                raise ValueError(f"text block {item['name']!r}: {len(terms)} terms, expected {item['n_terms']}")
            if np.shape(item["idf"]) != (len(terms),):
                raise ValueError(f"text block {item['name']!r}: idf of shape {np.shape(item['idf'])} for "
                                 f"{len(terms)} terms")
            blocks.append(_Block(item["name"], item["field"], item["analyzer"], terms, item["idf"], offset))
            offset += len(terms)
        return cls(blocks)


class TextModel:
    """Two linear heads over one TF-IDF encoding: role logits and the log-length score."""

    def __init__(self, encoder: TextEncoder, classes: Sequence[str], weights: np.ndarray, bias: np.ndarray,
                 threshold: float = DEFAULT_THRESHOLD) -> None:
        # a file's arrays that disagree would fail (or mislead) at the first request instead of at load
        heads = len(classes) + 1  # the role logits and the length score
        if np.shape(weights) != (encoder.width, heads) or np.shape(bias) != (heads,):
            raise ValueError(f"text weights of shape {np.shape(weights)} and bias {np.shape(bias)} for "
                             f"{encoder.width} terms and {heads} heads")
        self.encoder, rows = encoder.by_frequency()
        self.classes = list(classes)
        weights = np.asarray(weights, dtype=np.float64) if rows is None else np.asarray(weights)[rows]
        self.weights = np.ascontiguousarray(weights, dtype=np.float64)  # (n_features, n_classes + 1)
        self.bias = np.asarray(bias, dtype=np.float64)                  # (n_classes + 1,)
        self.threshold = float(threshold)
        # not finite, a weight would make every confidence NaN (and a threshold outside [0, 1] every role one)
        if not (np.isfinite(self.weights).all() and np.isfinite(self.bias).all() and 0.0 <= self.threshold <= 1.0
                and all(np.isfinite(block.idf).all() for block in self.encoder.blocks)):
            raise ValueError("text weights, bias or idf that are not finite, or a threshold outside [0, 1]")
        self._n_classes = len(self.classes)

    def scores(self, view: RequestView) -> tuple[np.ndarray, float]:
        """(role probabilities in ``classes`` order, text length score)."""
        idx, val = self.encoder.encode(view)
        # np.take gathers rows about three times faster than fancy indexing
        raw = self.bias + val @ np.take(self.weights, idx, axis=0) if len(idx) else self.bias.copy()
        logits = raw[:self._n_classes]
        if self._n_classes:
            logits = np.exp(logits - logits.max())
            logits /= logits.sum()
        return logits, float(raw[self._n_classes])

    def classify(self, view: RequestView) -> tuple[str, float, float]:
        """(role, confidence, text length score); the role is ``other`` below the threshold."""
        probs, length_score = self.scores(view)
        if self._n_classes < 2:
            # one labelled role (one client that sends X-Agent-Role) is nothing to tell apart: its softmax is
            # 1.0 for every text, which would give that role to every request
            return "other", 0.0, length_score
        best = int(probs.argmax())
        confidence = float(probs[best])
        return (self.classes[best] if confidence >= self.threshold else "other"), confidence, length_score

    def to_state(self) -> dict[str, Any]:
        return {"encoder": self.encoder.to_state(), "classes": list(self.classes),
                "weights": self.weights.astype(np.float32), "bias": self.bias, "threshold": self.threshold}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "TextModel":
        return cls(TextEncoder.from_state(state["encoder"]), state["classes"], state["weights"], state["bias"],
                   state["threshold"])


def fit_role_head(X, labels: Sequence[str | None], params: TextParams,
                  classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic regression on the labeled rows: (coef (n_features, n_classes), intercepts)."""
    from sklearn.linear_model import LogisticRegression

    coef = np.zeros((X.shape[1], len(classes)))
    bias = np.zeros(len(classes))
    if len(classes) >= 2:
        labeled = np.array([label is not None for label in labels])
        y_role = np.array([label for label in labels if label is not None])
        clf = LogisticRegression(C=params.C, class_weight="balanced", max_iter=3000)
        clf.fit(X[labeled], y_role)
        weights, intercepts = clf.coef_, clf.intercept_
        if len(clf.classes_) == 2:
            # Two classes: scikit-learn keeps one row, the log-odds z of classes_[1]. Logits (-z/2, +z/2) give
            # the same probabilities under the softmax that scores() applies to every model.
            weights = np.vstack([-weights[0] / 2, weights[0] / 2])
            intercepts = np.array([-intercepts[0] / 2, intercepts[0] / 2])
        order = [list(clf.classes_).index(c) for c in classes]
        coef[:] = weights[order].T
        bias[:] = intercepts[order]
    return coef, bias


def fit_length_head(X, log_y: np.ndarray, weights: np.ndarray | None,
                    params: TextParams) -> tuple[np.ndarray, float]:
    """Ridge regression of log1p(output tokens) on the rows where ``log_y`` is finite."""
    rows = np.flatnonzero(np.isfinite(log_y))
    return solve_ridge(X[rows], log_y[rows], None if weights is None else weights[rows], params.alpha,
                       params.ridge_tol)


def _dot(a: np.ndarray, b: np.ndarray) -> float:
    """A dot product summed by numpy's pairwise sum, the same bits on every CPU (BLAS's ``ddot`` is not)."""
    return float(np.add.reduce(a * b))


def solve_ridge(X, y: np.ndarray, weights: np.ndarray | None, alpha: float,
                tol: float) -> tuple[np.ndarray, float]:
    """(coef, intercept) minimising Σ w (y − X coef − intercept)² + alpha |coef|² on a sparse ``X``.

    The same problem and method as scikit-learn's ``Ridge(alpha, tol)`` with its ``sparse_cg`` solver
    (implicit centering, the dual system when there are more features than rows), written out so that every
    dot product is numpy's pairwise sum and every matrix product scipy's sequential sparse one. scipy's
    conjugate gradients take their dot products from BLAS, whose kernel OpenBLAS picks by CPU, so the solution
    agreed with itself only to about 1e-9 from one CPU to another, and those last bits moved the trees' split
    thresholds (one of five CV folds grew different trees). Here it is the same to the bit everywhere; it agrees
    with scikit-learn's to the solver's tolerance (a test checks both)."""
    import scipy.sparse as sp

    X = sp.csr_matrix(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n_rows, n_features = X.shape
    w = np.ones(n_rows) if weights is None else np.asarray(weights, dtype=np.float64)
    w_sum = float(np.add.reduce(w))
    x_offset = np.asarray(X.T @ w).ravel() / w_sum
    y_offset = _dot(w, y) / w_sum
    root_w = np.sqrt(w)
    Xw = sp.csr_matrix(X.multiply(root_w[:, None]))   # rows scaled by √w
    Xw_t = Xw.T.tocsr()

    def centred(b: np.ndarray) -> np.ndarray:         # (√w-scaled X − √w x_offset) @ b
        return Xw @ b - root_w * _dot(b, x_offset)

    def centred_t(b: np.ndarray) -> np.ndarray:       # its transpose @ b
        return Xw_t @ b - x_offset * _dot(b, root_w)

    target = root_w * (y - y_offset)
    if n_features > n_rows:    # kernel form: (Xc Xcᵀ + αI) z = y, coef = Xcᵀ z
        z = _conjugate_gradients(lambda v: centred(centred_t(v)) + alpha * v, target, tol)
        coef = centred_t(z)
    else:                      # primal: (Xcᵀ Xc + αI) coef = Xcᵀ y
        coef = _conjugate_gradients(lambda v: centred_t(centred(v)) + alpha * v, centred_t(target), tol)
    return coef, y_offset - _dot(x_offset, coef)


def _conjugate_gradients(apply, b: np.ndarray, tol: float) -> np.ndarray:
    """Solve ``apply(x) = b`` for a symmetric positive definite operator, from x = 0, until the residual is at
    most ``tol`` × |b| (scipy's ``cg`` with ``rtol=tol``; at most 10 × n iterations, as there)."""
    x = np.zeros_like(b)
    residual = b.copy()
    direction = residual.copy()
    rho = _dot(residual, residual)
    stop = tol * tol * _dot(b, b)
    for _ in range(10 * len(b)):
        if rho <= stop:
            break
        q = apply(direction)
        step = rho / _dot(direction, q)
        x += step * direction
        residual -= step * q
        rho, previous = _dot(residual, residual), rho
        direction = residual + (rho / previous) * direction
    return x


def oof_length_scores(X, log_y: np.ndarray, weights: np.ndarray | None, groups: np.ndarray,
                      params: TextParams, coef: np.ndarray, bias: float) -> np.ndarray:
    """Out-of-fold (group k-fold) length scores for the rows with a finite ``log_y``; the other rows get the
    full head's score."""
    scores = X @ coef + bias
    rows = np.flatnonzero(np.isfinite(log_y))
    n_groups = len(np.unique(groups[rows]))
    if n_groups >= 3:
        from sklearn.model_selection import GroupKFold

        for train_pos, test_pos in GroupKFold(n_splits=min(params.folds, n_groups)).split(rows, groups=groups[rows]):
            train_idx, test_idx = rows[train_pos], rows[test_pos]
            fold_coef, fold_bias = fit_length_head(X[train_idx], log_y[train_idx],
                                                   None if weights is None else weights[train_idx], params)
            scores[test_idx] = X[test_idx] @ fold_coef + fold_bias
    return scores


def fit_text_model(views: Sequence[RequestView], labels: Sequence[str | None], log_y: np.ndarray,
                   weights: np.ndarray | None, groups: np.ndarray,
                   params: TextParams | None = None) -> tuple[TextModel, np.ndarray, Any]:
    """Fit the encoder and both heads.

    ``log_y`` is NaN for records whose output length is not usable (the length head ignores them).
    Returns the model, the out-of-fold text length scores (group k-fold, so the length model trains on
    scores it could not have memorised) and the TF-IDF matrix of ``views``. The matrix's columns are in the
    fitted vocabulary's order, not the model's (``TextModel`` reorders its copy by idf): use it only with heads
    fitted on it, as the out-of-fold scores and the conformal calibration do.
    """
    params = params or TextParams()
    labels = list(labels)
    encoder = TextEncoder.fit(views, params)
    X = encoder.matrix(views)
    classes = sorted({label for label in labels if label is not None})
    role_coef, role_bias = fit_role_head(X, labels, params, classes)
    length_coef, length_bias = fit_length_head(X, log_y, weights, params)
    weights_all = np.column_stack([role_coef, length_coef])
    bias_all = np.append(role_bias, length_bias)
    model = TextModel(encoder, classes, weights_all, bias_all, params.threshold)
    oof_score = oof_length_scores(X, log_y, weights, groups, params, length_coef, length_bias)
    return model, oof_score, X
