"""The serving hook: ``Predictor.load(path).predict(body, headers) -> Prediction``.

One call does, in order: parse the request (:mod:`predictor.features`), take the explicit role or classify
the text (:mod:`predictor.classifier`), predict output-token quantiles (:mod:`predictor.length_model`), cap
them by ``max_tokens`` and the model's context, and size the KV reservation (:mod:`predictor.kv`).
Without a trained model (``Predictor.from_priors()``), the role is the explicit one or ``other`` and the
quantiles are per-role priors.

A Predictor is immutable after construction and holds no per-call state, so it is safe to share between
threads and to swap atomically (the online learner replaces the whole object).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from predictor.classifier import TextModel
from predictor.features import FeatureAssembler, RequestView, parse_request, role_label_rules
from predictor.kv import KVModel, output_cap
from predictor.length_model import LengthModel
from predictor.trace import ROLES

# Completion-token priors per role (used until a model exists). Rough figures from public multi-agent traces
# (ChatDev role medians, tau-bench/ToolBench tool calls, AlpacaEval answers); the gateway config may override.
DEFAULT_PRIORS: dict[str, tuple[int, int]] = {
    "planner": (150, 700), "coder": (550, 1600), "reviewer": (300, 800), "tester": (250, 900),
    "tool_caller": (60, 300), "researcher": (250, 900), "writer": (450, 1300), "assistant": (350, 1000),
    "other": (250, 1000),
}
# When neither the request nor the model's context bounds the output, this is the largest reservation.
UNBOUNDED_CAP = 32768


@dataclass(frozen=True, slots=True)
class Prediction:
    role: str
    confidence: float        # 1.0 for an explicit role; the classifier's probability otherwise
    p50: int                 # predicted output tokens, median
    p90: int                 # predicted output tokens, 90th percentile (>= p50)
    kv_bytes: int            # KV reservation: prompt + n × p90 tokens in blocks (kv.kv_footprint), times bytes/token
                             # (p50 and p90 are one answer's; a request with ``n`` answers holds n outputs)
    prompt_tokens: int = 0   # estimated prompt tokens
    kv_tokens: int = 0       # tokens behind kv_bytes (block-rounded)
    role_source: str = "prior"  # "explicit" | "classifier" | "prior"


def normalize_priors(priors: Mapping[str, Any] | None) -> dict[str, tuple[int, int]]:
    """Priors from config: ``{role: {p50, p90}}`` or ``{role: [p50, p90]}``; missing roles keep defaults."""
    merged = dict(DEFAULT_PRIORS)
    for role, value in (priors or {}).items():
        if role not in ROLES:
            raise ValueError(f"priors: unknown role {role!r}; roles are {', '.join(ROLES)}")
        if isinstance(value, Mapping):
            p50, p90 = value.get("p50"), value.get("p90")
        else:
            p50, p90 = value
        if not (isinstance(p50, (int, float)) and isinstance(p90, (int, float)) and 0 < p50 <= p90):
            raise ValueError(f"priors.{role}: need 0 < p50 <= p90, got {value!r}")
        merged[role] = (int(p50), int(p90))
    return merged


def check_default_max_tokens(value: Any) -> int | None:
    """``default_max_tokens`` as given (None: no default), or ValueError: it caps every prediction of a request
    without ``max_tokens``, so 0 or a negative number would make p50 and p90 (and the KV reservation) 0 or
    negative instead of failing where it was configured."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"default_max_tokens must be a whole number >= 1 (or None), not {value!r}")
    return int(value)


class Predictor:
    """Role, output-length quantiles and KV bytes for one chat request."""

    def __init__(self, text_model: TextModel | None = None, length_model: LengthModel | None = None,
                 model_vocab: list[str] | None = None, priors: Mapping[str, Any] | None = None,
                 kv: KVModel | None = None, default_max_tokens: int | None = None,
                 state: dict[str, Any] | None = None) -> None:
        role_label_rules()  # roles.yaml's labels, read once now: a bad file fails here (RolesFileError), not a request
        self.text_model = text_model
        self.length_model = length_model
        self.assembler = FeatureAssembler(model_vocab or [])
        self.priors = normalize_priors(priors)
        self.kv = kv or KVModel()
        self.default_max_tokens = check_default_max_tokens(default_max_tokens)
        self._role_index = {role: i for i, role in enumerate(ROLES)}
        self._other = self._role_index["other"]
        self.state = state  # the saved form (model file contents), kept for save() and evaluation baselines

    # ------------------------------------------------------------------------------------------ construction
    @classmethod
    def from_priors(cls, priors: Mapping[str, Any] | None = None, kv: KVModel | None = None,
                    default_max_tokens: int | None = None) -> "Predictor":
        return cls(priors=priors, kv=kv, default_max_tokens=default_max_tokens)

    @classmethod
    def from_state(cls, state: dict[str, Any], kv: KVModel | None = None,
                   default_max_tokens: int | None = None, source: str = "model") -> "Predictor":
        """A predictor from a model file's contents (``source`` names it in errors): ModelFileError where they
        are not a model this code can use, down to arrays that do not fit together (a damaged or edited file),
        so that such a file is refused at load rather than failing at some request. A bad ``default_max_tokens``
        is the caller's mistake, not the file's: it raises a plain ValueError before the contents are looked at
        (inside the ``try`` below it would be reported as a damaged model file to retrain)."""
        from predictor.model_file import ModelFileError, check_state

        default_max_tokens = check_default_max_tokens(default_max_tokens)
        role_label_rules()  # before the try: a bad roles.yaml is not a bad model file
        check_state(state, source)
        try:
            text = TextModel.from_state(state["text_model"])
            length = LengthModel.from_state(state["length_model"])
            predictor = cls(text, length, list(state.get("model_vocab") or []), state.get("priors"), kv,
                            default_max_tokens, state)
            internal = length.forest.left != np.arange(len(length.forest.left))
            if internal.any() and length.forest.feature[internal].max() >= predictor.assembler.width:
                raise ValueError(f"a tree splits on feature {length.forest.feature[internal].max()} of "
                                 f"{predictor.assembler.width}")
        except (KeyError, IndexError, ValueError, TypeError, AttributeError) as exc:
            raise ModelFileError(f"{source}: the model file's contents do not fit together ({exc}); retrain with "
                                 "`maestro predictor train`") from None
        return predictor

    @classmethod
    def load(cls, path: str | Path, kv: KVModel | None = None,
             default_max_tokens: int | None = None) -> "Predictor":
        """Load a model file written by ``maestro predictor train`` (raises ModelFileError on a mismatch, and
        ValueError for a bad ``default_max_tokens`` before the file is read)."""
        from predictor.model_file import load_state

        default_max_tokens = check_default_max_tokens(default_max_tokens)
        return cls.from_state(load_state(path), kv, default_max_tokens, str(path))

    def save(self, path: str | Path) -> Path:
        from predictor.model_file import save_state

        if self.state is None:
            raise ValueError("this predictor has no trained model to save")
        return save_state(self.state, path)

    def with_kv(self, kv: KVModel, default_max_tokens: int | None = None) -> "Predictor":
        """The same model with another KV model (e.g. the gateway's configured models)."""
        clone = Predictor.__new__(Predictor)
        clone.__dict__.update(self.__dict__)
        clone.kv = kv
        if default_max_tokens is not None:
            clone.default_max_tokens = check_default_max_tokens(default_max_tokens)
        return clone

    @property
    def trained(self) -> bool:
        return self.length_model is not None

    # ---------------------------------------------------------------------------------------------- serving
    def role_of(self, view: RequestView) -> tuple[str, float, str, float]:
        """(role, confidence, source, text length score) for a parsed request."""
        explicit = view.explicit_role
        if self.text_model is None:
            return (explicit, 1.0, "explicit", 0.0) if explicit else ("other", 0.0, "prior", 0.0)
        if explicit:
            _, length_score = self.text_model.scores(view)
            return explicit, 1.0, "explicit", length_score
        role, confidence, length_score = self.text_model.classify(view)
        return role, confidence, "classifier", length_score

    def predict(self, body: Mapping[str, Any], headers: Mapping[str, str] | None = None) -> Prediction:
        view = parse_request(body, headers)
        role, confidence, source, length_score = self.role_of(view)
        if self.length_model is not None:
            row = self.assembler.row(view, role, length_score)
            stratum = self.length_model.stratum(self._role_index.get(role, self._other),
                                                self.assembler.model_slot(view.model),
                                                view.workflow_step is not None)
            quantiles = self.length_model.predict_tokens(row, stratum)
            p50, p90 = float(quantiles[0]), float(quantiles[-1])
        else:
            p50, p90 = self.priors.get(role, self.priors["other"])
        return self._finish(view, role, confidence, source, p50, p90)

    def _finish(self, view: RequestView, role: str, confidence: float, source: str, p50: float,
                p90: float) -> Prediction:
        spec = self.kv.spec(view.model)
        cap = output_cap(view.max_tokens, self.default_max_tokens, spec.max_model_len, view.prompt_tokens,
                         UNBOUNDED_CAP)
        low = min(max(1, int(round(min(p50, cap)))), cap)  # min first: an infinite quantile reads as the cap
        high = min(max(low, int(math.ceil(min(p90, cap)))), cap)
        tokens = spec.tokens(view.prompt_tokens, high * view.choices, view.choices)
        return Prediction(role, confidence, low, high, tokens * spec.bytes_per_token, view.prompt_tokens, tokens,
                          source)

    def predict_many(self, bodies: list[Mapping[str, Any]],
                     headers: list[Mapping[str, str] | None] | None = None) -> list[Prediction]:
        """:meth:`predict` for many requests (the length model is run on all rows at once)."""
        headers = headers or [None] * len(bodies)
        if len(headers) != len(bodies):  # zip would drop the requests past the shorter list without a word
            raise ValueError(f"predict_many: {len(bodies)} bodies but {len(headers)} headers")
        views = [parse_request(body, head) for body, head in zip(bodies, headers)]
        roles = [self.role_of(view) for view in views]
        if self.length_model is not None and views:
            X = np.vstack([self.assembler.row(view, r[0], r[3]) for view, r in zip(views, roles)])
            strata = np.array([self.length_model.stratum(self._role_index.get(r[0], self._other),
                                                         self.assembler.model_slot(view.model),
                                                         view.workflow_step is not None)
                               for view, r in zip(views, roles)], dtype=np.intp)
            quantiles = self.length_model.predict_tokens_many(X, strata)[:, [0, -1]]
        else:
            quantiles = [self.priors.get(r[0], self.priors["other"]) for r in roles]
        return [self._finish(view, r[0], r[1], r[2], float(q[0]), float(q[1]))
                for view, r, q in zip(views, roles, quantiles)]
