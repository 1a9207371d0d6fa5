"""Predictor: role classifier, output-length quantiles, KV model, model files, metrics, online refits.

Fast tests run on synthetic, hand-written records (no third-party data). One test at the end trains and
evaluates on ``../shared/data`` (ChatDev) and is skipped when that folder is absent.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import random
import re
import string
import time
import zipfile
from pathlib import Path

import numpy as np
import orjson
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from predictor import Prediction, Predictor
from predictor.classifier import TextParams
from predictor.evaluate import (baseline_predictions, coverage, evaluate_records, fit_baselines, kendall_tau,
                                kv_saving, mae, output_cap, quantile_loss, role_metrics, run_bootstrap_intervals,
                                under_reservation)
from predictor.features import explicit_role_of, max_tokens_of, normalize_role, parse_request
from predictor.kv import KVModel, KVSpec, bytes_per_token
from predictor.length_model import (FlatForest, LengthParams, fit_length_model, fit_quantile_estimators,
                                    mondrian_offsets)
from predictor.model_file import _FILE_MODE, ModelFileError, load_state, read_plain, save_state
from predictor.online import OnlineLearner, make_record
from predictor.trace import ROLES, TraceFormatError, read_records, validate_record, write_records
from predictor.trace_buffers import FileTraceBuffer, MemoryBuffer
from predictor.train import TrainOptions, choose_upper_level, fit_state, group_of, request_of, split_records

SHARED_DATA = Path(os.environ.get("MAESTRO_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data")

# ------------------------------------------------------------------------------------------ synthetic data
# Four made-up agents: each has its own system prompt, user phrasing and output-length distribution
# (log-normal around a median that also grows with one visible cue, the requested item count).
AGENTS = {
    "planner": ("You are the planning lead of a small team. Break the goal into ordered steps and assign owners.",
                ["Plan the next milestone for {t}.", "Split {t} into {n} steps and name an owner for each."], 60),
    "coder": ("You are a careful software engineer. Reply with complete, runnable Python code in one block.",
              ["Implement {t} in Python with {n} functions.", "Write the module for {t}; include {n} unit tests."],
              500),
    "reviewer": ("You are a strict code reviewer. List defects with line references and a severity.",
                 ["Review this patch for {t}:\n```python\ndef f(x):\n    return x\n```",
                  "Find up to {n} problems in the code for {t}."], 150),
    "tool_caller": ("You can call functions. Decide which tool to call next and produce only the call.",
                    ["Look up {t} using the search tool.", "Fetch the record for {t} and update {n} fields."], 30),
}
TOPICS = ["an inventory tracker", "a chess clock", "a weather dashboard", "a budget planner", "a quiz game",
          "a markdown editor", "a habit tracker", "a recipe scaler", "a photo resizer", "a todo app"]


def synthetic_records(n_workflows: int = 40, seed: int = 0, source: str = "synthetic") -> list[dict]:
    rng = random.Random(seed)
    records = []
    for w in range(n_workflows):
        topic = rng.choice(TOPICS)
        for step, role in enumerate(["planner", "coder", "reviewer", "coder", "tool_caller", "tool_caller"]):
            system, templates, median = AGENTS[role]
            count = rng.randint(1, 6)
            user = rng.choice(templates).format(t=topic, n=count)
            body = {"model": rng.choice(["model-a", "model-b"]),
                    "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}]}
            if role == "tool_caller":
                body["tools"] = [{"type": "function", "function": {"name": "search", "parameters": {}}}]
            if rng.random() < 0.5:
                body["max_tokens"] = rng.choice([256, 1024, 2048])
            output = int(median * (1 + count / 3) * math.exp(rng.gauss(0, 0.35)))
            output = max(1, min(output, body.get("max_tokens", 10**6)))
            records.append({"request": body, "usage": {"prompt_tokens": 40 + len(user) // 4,
                                                       "completion_tokens": output},
                            "agent_role": role, "workflow": {"id": f"wf-{seed}-{w}", "step": step},
                            "source": source})
    return records


FAST = TrainOptions(text=TextParams(folds=3), length=LengthParams(max_iter=40, min_samples_leaf=10),
                    calibration_folds=3)


@pytest.fixture(scope="module")
def records() -> list[dict]:
    return synthetic_records()


@pytest.fixture(scope="module")
def state(records) -> dict:
    return fit_state(records, FAST)


@pytest.fixture(scope="module")
def predictor(state) -> Predictor:
    return Predictor.from_state(state)


def chat(system: str, user: str, **extra) -> dict:
    return {"model": "model-a", "messages": [{"role": "system", "content": system},
                                             {"role": "user", "content": user}], **extra}


# ------------------------------------------------------------------------------------------------ roles
def test_classifier_learns_the_roles(predictor):
    held_out = synthetic_records(n_workflows=5, seed=99)
    correct = sum(predictor.predict(r["request"]).role == r["agent_role"] for r in held_out)
    assert correct / len(held_out) >= 0.9


def test_explicit_role_wins_over_classifier(predictor):
    coder_body = chat(AGENTS["coder"][0], "Implement a chess clock in Python with 3 functions.")
    assert predictor.predict(coder_body).role == "coder"
    assert predictor.predict(coder_body).role_source == "classifier"

    by_header = predictor.predict(coder_body, {"X-Agent-Role": "reviewer"})
    assert (by_header.role, by_header.confidence, by_header.role_source) == ("reviewer", 1.0, "explicit")
    assert predictor.predict(coder_body, {"x-agent-role": "Reviewer"}).role == "reviewer"  # any case

    with_metadata = dict(coder_body, metadata={"agent_role": "planner"})
    assert predictor.predict(with_metadata).role == "planner"
    # the header beats metadata
    assert predictor.predict(with_metadata, {"X-Agent-Role": "tester"}).role == "tester"


def test_two_labelled_roles_train_a_two_class_classifier():
    """scikit-learn keeps one weight row for two classes; traffic labelled with two roles (an operator's own
    logs, or an online refit) must still train, and classify as well as with more roles."""
    two = [r for r in synthetic_records() if r["agent_role"] in ("coder", "planner")]
    model = Predictor.from_state(fit_state(two, FAST))
    held_out = [r for r in synthetic_records(n_workflows=5, seed=99) if r["agent_role"] in ("coder", "planner")]
    predictions = [model.predict(r["request"]) for r in held_out]
    assert all(p.role == r["agent_role"] for p, r in zip(predictions, held_out))
    assert all(0.5 <= p.confidence <= 1.0 for p in predictions)


def test_role_labels_are_normalised():
    assert normalize_role("Tool Caller") == "tool_caller"
    assert normalize_role("critic") == "reviewer"
    assert normalize_role("other") == "other"
    assert normalize_role("  ") is None and normalize_role(None) is None
    assert explicit_role_of({"metadata": {"agent_role": "Coder"}}) == "coder"
    # persona names with a word that names a role: the more specific job wins (a test engineer tests)
    for label, role in (("Code Reviewer", "reviewer"), ("code_reviewer", "reviewer"), ("Counselor", "planner"),
                        ("Software Test Engineer", "tester"), ("Chief Technology Officer", "planner"),
                        ("Programmer", "coder"), ("Product Manager", "planner"), ("WebSurfer", "researcher")):
        assert normalize_role(label) == role, label
    # a label that names no role is the client's name for its agent, not a role: nothing explicit
    assert normalize_role("something-new") is None and normalize_role("Python_Expert") is None
    assert normalize_role("x" * 100_000 + " tester") is None  # read up to the gateway's 64 characters


def test_role_label_rules_are_data(tmp_path):
    from predictor.role_labels import label_rules

    path = tmp_path / "roles.yaml"
    path.write_text("sources: {}\nlabels:\n  synonyms: {Alice: coder}\n"
                    "  words:\n    - {role: tester, words: [Test]}\n    - {role: coder, words: [engineer]}\n")
    assert label_rules(path) == ({"alice": "coder"}, (("tester", frozenset({"test"})),
                                                      ("coder", frozenset({"engineer"}))))
    wrong = tmp_path / "wrong-roles.yaml"  # (a file is read once)
    wrong.write_text("sources: {}\nlabels:\n  synonyms: {Alice: wizard}\n")
    with pytest.raises(ValueError, match="labels.synonyms.Alice: 'wizard' is not one of"):
        label_rules(wrong)


def test_role_labels_are_read_once_not_per_request(monkeypatch):
    """roles.yaml's labels are read on first use (not at import) and kept: a request never reads the file."""
    from predictor import features

    features.role_label_rules()  # the first use (a Predictor makes it when it is built)

    def read_again(*args, **kwargs):
        raise AssertionError("roles.yaml read again")

    monkeypatch.setattr(features, "label_rules", read_again)
    assert features.normalize_role("Software Test Engineer") == "tester"
    assert features.ROLE_SYNONYMS is features.role_label_rules()[0]  # the old module constants still read


def test_a_bad_roles_yaml_is_a_roles_file_error_when_first_used(tmp_path, monkeypatch):
    from predictor import features, role_labels
    from predictor.role_labels import RolesFileError

    broken = tmp_path / "roles.yaml"
    broken.write_text("sources: {}\nlabels:\n  synonyms: {a: coder\n")
    monkeypatch.setattr(role_labels, "ROLES_YAML", broken)
    features.role_label_rules.cache_clear()
    try:
        with pytest.raises(RolesFileError, match=rf"{broken}, line \d+: the role map is not valid YAML"):
            features.normalize_role("Alice")
        with pytest.raises(RolesFileError):
            Predictor.from_priors()
    finally:
        monkeypatch.undo()
        features.role_label_rules.cache_clear()
    assert features.normalize_role("Software Test Engineer") == "tester"


def test_a_label_that_names_no_role_leaves_the_role_to_the_classifier(predictor):
    body = chat(AGENTS["coder"][0], "Implement a quiz game in Python with 2 functions.")
    unlabelled = predictor.predict(body)
    for headers in ({"X-Agent-Role": "Alice"}, {"x-agent-role": "Python_Expert"}):
        named = predictor.predict(body, headers)
        assert (named.role, named.role_source, named.confidence) == (unlabelled.role, "classifier",
                                                                      unlabelled.confidence)
    # the metadata label still counts when the header's names no role
    assert predictor.predict(dict(body, metadata={"agent_role": "Code Reviewer"}),
                             {"X-Agent-Role": "Alice"}).role == "reviewer"


def test_low_confidence_gives_other(predictor):
    strict = Predictor.from_state(predictor.state)
    strict.text_model.threshold = 1.01  # nothing is ever that sure
    prediction = strict.predict(chat(AGENTS["coder"][0], "Implement a quiz game in Python with 2 functions."))
    assert prediction.role == "other" and prediction.role_source == "classifier"
    assert 0 < prediction.confidence <= 1


# ------------------------------------------------------------------------------------------------ lengths
def test_quantiles_are_ordered_and_capped(predictor, records):
    kv = KVModel({"model-a": KVSpec(131072, 16, max_model_len=2048)})
    capped = predictor.with_kv(kv)
    for record in records[:60]:
        body = record["request"]
        for p in (predictor.predict(body), capped.predict(body)):
            assert 1 <= p.p50 <= p.p90
            if "max_tokens" in body:
                assert p.p90 <= body["max_tokens"]
    tiny = chat(AGENTS["coder"][0], "Implement a todo app in Python with 6 functions.", max_tokens=7)
    p = predictor.predict(tiny)
    assert p.p50 <= p.p90 <= 7
    # the model's context bounds the output too: 2048 - prompt tokens
    long_prompt = chat(AGENTS["coder"][0], "word " * 1900 + "Implement a todo app.")
    p = capped.predict(long_prompt)
    assert p.p90 <= 2048 - p.prompt_tokens and p.p50 <= p.p90


_JSON_LEAF = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.sampled_from([10**400, -10**400])
              | st.floats(allow_nan=True) | st.text(max_size=40))
_NUMBERISH = st.sampled_from(["7", " 7 ", "+7", "-7", "--7", "¹", "٣", "7.5", "9" * 5000]) | st.text(max_size=20)
_JSON = st.recursive(_JSON_LEAF, lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=10)
_MESSAGE = st.fixed_dictionaries({}, optional={
    "role": st.sampled_from(["system", "user", "assistant", "tool", "developer", "x"]) | _JSON,
    "content": st.text(max_size=200) | _JSON, "tool_calls": _JSON, "name": _JSON})
_BODY = st.fixed_dictionaries({}, optional={
    "model": st.sampled_from(["model-a", "model-b", ""]) | _JSON, "messages": st.lists(_MESSAGE | _JSON, max_size=5)
    | _JSON, "max_tokens": _JSON | st.integers(1, 5000), "max_completion_tokens": _JSON, "tools": _JSON,
    "tool_choice": _JSON, "response_format": _JSON, "temperature": _JSON, "metadata": _JSON})
_HEADERS = st.none() | st.dictionaries(st.sampled_from(["X-Agent-Role", "x-workflow-step", "X-Workflow-Id", "Other"]),
                                       _NUMBERISH, max_size=3)


@settings(max_examples=200, deadline=None)
@given(body=_BODY, headers=_HEADERS)
@example(body={"messages": [{"role": [], "name": "0"}]}, headers=None)  # an unhashable role beside a name
@example(body={"response_format": {"type": ["json_object"]}}, headers=None)  # an unhashable format type
@example(body={"response_format": {"type": {"json_object": True}}}, headers=None)
@example(body={}, headers={"x-workflow-step": "¹"})  # str.isdigit says yes, int() says no
@example(body={}, headers={"x-workflow-step": "--7"})
@example(body={}, headers={"x-workflow-step": "9" * 5000})  # int() refuses over 4,300 digits
@example(body={"temperature": 10**400, "max_tokens": 10**400, "metadata": {"workflow_step": 10**400}},
         headers=None)  # float() overflows
def test_any_body_gets_ordered_capped_quantiles(predictor, body, headers):
    """The gateway validates bodies before predicting, but other tools call predict() on whatever they hold:
    malformed fields are ignored, never an exception, and the quantiles stay ordered and within max_tokens."""
    p = predictor.predict(body, headers)
    assert 1 <= p.p50 <= p.p90 and p.kv_bytes > 0
    cap = max_tokens_of(body)
    if cap is not None:
        assert p.p90 <= cap


def test_bodies_nested_as_deep_as_json_allows_are_predicted(predictor):
    """orjson (the gateway's parser) reads up to 1024 levels; str() of such a value passes Python's recursion
    limit, and a token estimate must not raise where the gateway accepted the body."""
    deep = "[" * 1000 + "]" * 1000
    bodies = [
        '{"messages":[{"role":"user","content":"hi"}],"tools":[{"type":"function","function":{"name":"f",'
        '"parameters":' + '{"a":' * 1000 + '{}' + '}' * 1000 + '}}]}',
        '{"messages":[{"role":"user","content":"hi"},{"role":"assistant","content":null,"tool_calls":'
        '[{"id":"1","type":"function","function":{"name":"f","arguments":' + deep + '}}]}]}',
        '{"messages":[{"role":"user","content":' + deep + '}]}',
        '{"messages":[' + deep + ']}',
    ]
    for raw in bodies:
        p = predictor.predict(orjson.loads(raw))
        assert 1 <= p.p50 <= p.p90 and p.kv_bytes > 0
    chain: list = []  # built in code: 2,000 levels whose innermost list holds the outermost (str() recurses, then
    inner = chain  # the walk that replaces it must end although no scalar is ever found)
    for _ in range(2000):
        inner.append([])
        inner = inner[0]
    inner.append(chain)
    p = predictor.predict({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None,
                                         "tool_calls": [{"function": {"name": "f", "arguments": chain}}]}]})
    assert 1 <= p.p50 <= p.p90


def test_one_labelled_role_is_nothing_to_classify_by():
    """Traffic where only one client sends X-Agent-Role trains one class, whose softmax is 1.0 for any text:
    the classifier must not give that role to every other request."""
    records = synthetic_records(20)
    for record in records:
        if record["agent_role"] != "coder":
            record["agent_role"] = None
    model = Predictor.from_state(fit_state(records, FAST))
    assert model.text_model.classes == ["coder"]
    p = model.predict(chat(AGENTS["planner"][0], "Plan the steps of a trip to Rome"))
    assert (p.role, p.confidence, p.role_source) == ("other", 0.0, "classifier")
    assert model.predict(chat("", "hi"), {"X-Agent-Role": "coder"}).role == "coder"


@pytest.mark.parametrize("role, word", [
    ("user", "last_user"), ("tool", "last_tool"), (None, "last_None"),
    ("narrator " * 100_000, "last_other"),  # a made-up role is not read into the text features, however long
    (["user"], "last_other"),
])
def test_the_last_role_word_names_only_the_chat_formats_roles(role, word):
    message = {"content": "hi"} if role is None else {"role": role, "content": "hi"}
    context = parse_request({"messages": [{"role": "system", "content": "s"}, message]}).context
    assert word in context.split() and len(context) < 100


def test_a_speaker_name_becomes_one_short_word_however_long():
    for name in ("Chief Executive Officer", "Alice-" * 600_000):  # the second: 3.6 MB, read only 256 characters
        messages = [{"role": "user", "name": name, "content": "hi"}]
        words = parse_request({"messages": messages}).context.split()
        expected = "u_" + re.sub(r"\W+", "_", name[:256].lower()).strip("_")[:40]
        assert words[0] == expected and len(words[0]) <= 42


@pytest.mark.parametrize("body, headers, says", [
    (None, None, "body must be a JSON object (a dict), not NoneType"),
    ([{"role": "user", "content": "hi"}], None, "not list"),
    ('{"messages": []}', None, "not str"),
    ({"messages": []}, "X-Agent-Role: coder", "headers must be a mapping of names to values, not str"),
])
def test_a_body_or_headers_that_are_not_mappings_are_refused_clearly(predictor, body, headers, says):
    """Fields of the wrong type count as absent, but a body that is not an object at all is the caller's mistake:
    a TypeError that names it, not an AttributeError from deep inside."""
    with pytest.raises(TypeError, match=re.escape(says)):
        predictor.predict(body, headers)
    with pytest.raises(TypeError, match=re.escape(says)):
        predictor.predict_many([body], [headers])


def test_header_keys_that_are_not_strings_name_no_header(predictor):
    """A headers dict built in code may hold keys of any type; they are skipped, not an AttributeError, and the
    header named in any case beside them is still found."""
    body = {"model": "model-a", "messages": [{"role": "user", "content": "hi"}]}
    prediction = predictor.predict(body, {1: "x", b"x-agent-role": "planner", "x-agent-role": "Code Reviewer"})
    assert prediction.role == "reviewer" and prediction.role_source == "explicit"
    assert predictor.predict(body, {None: "coder"}).role_source != "explicit"


def test_length_model_tracks_the_signal(predictor):
    planner = predictor.predict(chat(AGENTS["planner"][0], "Plan the next milestone for a chess clock."))
    coder = predictor.predict(chat(AGENTS["coder"][0], "Implement a chess clock in Python with 6 functions."))
    assert planner.p50 < coder.p50


def test_flat_forest_matches_scikit_learn():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(600, 6))
    X[rng.random(X.shape) < 0.15] = np.nan  # missing values take the learned side
    X[:, 5] = np.where(rng.random(600) < 0.5, np.nan, 1.0)  # only missing or not: splits with threshold +inf
    y = (np.nan_to_num(X[:, 0]) * 2 + np.nan_to_num(X[:, 1]) ** 2 + 3 * np.isnan(X[:, 5])
         + rng.normal(size=600))
    estimators = fit_quantile_estimators(X, y, None, (0.5, 0.9), LengthParams(max_iter=30))
    forest = FlatForest.from_estimators(estimators)
    expected = np.column_stack([e.predict(X) for e in estimators])
    np.testing.assert_allclose(forest.predict(X), expected, rtol=1e-10, atol=1e-10)
    assert np.isinf(forest.threshold).any()
    for row, want in zip(X, expected):
        np.testing.assert_allclose(forest.predict_row(row), want, rtol=1e-10, atol=1e-10)


def test_text_encoder_matches_scikit_learn(predictor, records):
    from sklearn.feature_extraction.text import TfidfVectorizer

    encoder = predictor.text_model.encoder
    views = [parse_request(r["request"]) for r in records]
    matrix = encoder.matrix(views).toarray()
    for block in encoder.blocks:
        if not block.terms:
            continue
        vectorizer = TfidfVectorizer(analyzer=block.analyzer, vocabulary=block.vocab, binary=True)
        vectorizer.idf_ = block.idf
        expected = vectorizer.transform([getattr(v, block.field) for v in views]).toarray()
        np.testing.assert_allclose(matrix[:, block.offset:block.offset + len(block.terms)], expected, atol=1e-12)


def test_the_system_prompt_memo_keeps_the_prompts_used_most_recently(predictor):
    """A prompt in steady use stays memoised while one-off prompts pass through (the memo was emptied whole)."""
    import copy

    encoder = copy.copy(predictor.text_model.encoder)
    encoder._cache = type(encoder._cache)()
    encoder.cache_size = 4
    hot = parse_request(chat("You are a Programmer. Write the code.", "go"))
    want = encoder.encode(hot)
    encoded: list[str] = []
    encode_field = encoder._encode_field
    encoder._encode_field = lambda field, text: (encoded.append(text) if field == "system" else None,
                                                 encode_field(field, text))[1]
    for i in range(20):
        encoder.encode(parse_request(chat(f"one-off system prompt number {i}", "go")))
        encoder.encode(hot)
        assert len(encoder._cache) <= 4
    assert hot.system not in encoded  # never evicted, never encoded again
    got = encoder.encode(hot)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_allclose(got[1], want[1])


_NGRAM_TEXTS = ["Review the code below and fix the bug.", "def main():\n    print('hello, world')  # greet",
                "Écris un résumé: naïve café, 東京タワー, Ünïcödé_words and snake_case_names", "a b c", "x",
                "You are a Programmer. Write main.py with a GUI. Use ```python fences```!"]


@given(st.text(alphabet=st.characters(codec="utf-8") | st.sampled_from(list(" \t\nabcéè_東京'.py")), max_size=300)
       | st.text(alphabet=string.printable, max_size=300))  # ASCII has a path of its own
@settings(max_examples=400, deadline=None)
def test_ngram_indexes_find_what_the_analyzers_find(text):
    """The integer-keyed indexes return exactly the vocabulary columns the string analyzers hit."""
    import re

    import predictor.ngram_index as ngram_index
    from predictor.features import ANALYZERS, word_tokens

    assert word_tokens(text) == re.findall(r"(?u)\b\w\w+\b", text.lower())  # scikit-learn's default pattern
    corpus = _NGRAM_TEXTS + [text[: len(text) // 2]]
    short_text_tokens = ngram_index.SHORT_TEXT_TOKENS
    try:
        for ngram_index.SHORT_TEXT_TOKENS in (0, short_text_tokens):  # the numpy path, then the usual split
            for name, index_class in (("word", ngram_index.WordNgramIndex), ("char", ngram_index.CharNgramIndex)):
                analyzer = ANALYZERS[name]
                terms = sorted({gram for doc in corpus for gram in analyzer(doc)})[::2]  # some grams left out
                expected = ngram_index.AnalyzerIndex(terms, analyzer).columns(text)
                assert index_class(terms).columns(text).tolist() == expected.tolist()
    finally:
        ngram_index.SHORT_TEXT_TOKENS = short_text_tokens


# ------------------------------------------------------------------------------------------------ KV
def test_kv_bytes_and_reservation():
    assert bytes_per_token(32, 8, 128, "bfloat16") == 131072  # Llama-3-8B
    assert bytes_per_token(80, 8, 128, "fp8") == 163840
    spec = KVSpec.from_hf_config({"num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                                  "hidden_size": 4096, "torch_dtype": "bfloat16"}, block_size=16)
    assert spec.bytes_per_token == 131072
    assert spec.tokens(100, 20) == 128 and spec.tokens(96, 0) == 96
    assert spec.reservation_bytes(100, 20) == 128 * 131072
    with pytest.raises(ValueError):
        bytes_per_token(32, 8, 128, "float13")
    kv = KVModel.from_models([{"name": "m", "kv_bytes_per_token": 1000, "max_model_len": 4096}], block_size=32)
    assert kv.spec("m").bytes_per_token == 1000 and kv.context("m") == 4096
    assert kv.spec("meta-llama/Llama-3.1-70B-Instruct").bytes_per_token == bytes_per_token(80, 8, 128)


def test_a_served_model_without_a_configured_figure_takes_its_architectures():
    """The gateway serves only configured models: one configured without kv_bytes_per_token must still get its
    architecture's figure (a 70B model holds 2.5 times an 8B one's KV per token), in the config the ledger
    reads and in the predictor's KV model alike."""
    from gateway.config import parse_config

    seventy = "meta-llama/Llama-3.1-70B-Instruct"
    models = [{"name": seventy, "max_model_len": 8192}, {"name": "house-model"},
              {"name": "Qwen/Qwen2.5-7B-Instruct", "kv_bytes_per_token": 1234}]
    config = parse_config({"models": models, "clusters": [{"name": "c", "pools": [
        {"name": "p", "models": [seventy], "engines": [{"url": "http://127.0.0.1:9"}]}]}]})
    figures = {m.name: m.kv_bytes_per_token for m in config.models}
    assert figures == {seventy: bytes_per_token(80, 8, 128), "house-model": 131072,
                       "Qwen/Qwen2.5-7B-Instruct": 1234}  # a configured figure wins
    for source in (config.models, [{"name": m["name"], "kv_bytes_per_token": m.get("kv_bytes_per_token")}
                                   for m in models]):
        kv = KVModel.from_models(source)
        assert {name: kv.spec(name).bytes_per_token for name in figures} == figures


def test_content_parts_read_as_their_text(predictor):
    """The SDK's list-of-parts content is read as its text: text parts predict exactly as the same string does,
    and an image part adds its flat token estimate to the prompt without changing what the text says."""
    from predictor.tokens import IMAGE_PART_TOKENS

    system, user = AGENTS["coder"][0], "Implement a chess clock in Python with 3 functions."
    as_string = predictor.predict(chat(system, user))
    as_parts = chat(system, user)
    as_parts["messages"][0]["content"] = [{"type": "text", "text": system}]
    as_parts["messages"][1]["content"] = [{"type": "text", "text": user}]
    assert predictor.predict(as_parts) == as_string
    as_parts["messages"][1]["content"].append({"type": "image_url", "image_url": {"url": "data:image/png;base64,A"}})
    with_image = predictor.predict(as_parts)
    assert with_image.prompt_tokens == as_string.prompt_tokens + IMAGE_PART_TOKENS
    assert with_image.role == as_string.role == "coder" and with_image.confidence == as_string.confidence
    mixed = chat(system, user)
    mixed["messages"][1]["content"] = [{"type": "text", "text": "Implement a chess clock"},
                                       "in Python with 3 functions.", 7, None]
    assert predictor.predict(mixed).role == "coder"


def test_prediction_reserves_prompt_plus_p90(predictor):
    kv = KVModel({"model-a": KVSpec(1000, 16)})
    p = predictor.with_kv(kv).predict(chat(AGENTS["planner"][0], "Plan the next milestone for a quiz game."))
    assert p.kv_tokens == -(-(p.prompt_tokens + p.p90) // 16) * 16
    assert p.kv_bytes == p.kv_tokens * 1000


def test_a_request_for_n_answers_reserves_n_outputs(predictor):
    kv = KVModel({"model-a": KVSpec(1000, 16)})
    body = chat(AGENTS["planner"][0], "Plan the next milestone for a quiz game.")
    one, three = (predictor.with_kv(kv).predict(dict(body, n=n)) for n in (1, 3))
    assert (three.p50, three.p90) == (one.p50, one.p90)  # one answer's length either way
    # each answer holds its own output and its own copy of the prompt's partial last block (kv_footprint)
    shared = (three.prompt_tokens - 1) // 16 * 16
    assert three.kv_tokens == shared + 3 * (-(-(three.prompt_tokens - shared + three.p90) // 16) * 16)
    for odd in (0, -2, 129, "3", True, 2.0):  # not an n the gateway would pass: one answer
        assert predictor.with_kv(kv).predict(dict(body, n=odd)).kv_tokens == one.kv_tokens


def test_a_negative_workflow_step_is_no_step(predictor):
    body = chat(AGENTS["coder"][0], "Implement a quiz game in Python with 2 functions.")
    without = predictor.predict(body)
    for headers, metadata in (({"X-Workflow-Step": "-1"}, None), (None, {"workflow_step": -2}),
                              (None, {"workflow_step": -2.0}), ({"X-Workflow-Step": "abc"}, None)):
        request = dict(body, metadata=metadata) if metadata else body
        assert predictor.predict(request, headers) == without
    assert predictor.predict(body, {"X-Workflow-Step": "+3"}) == predictor.predict(body, {"X-Workflow-Step": "3"})


def test_priors_until_a_model_exists():
    predictor = Predictor.from_priors({"coder": {"p50": 100, "p90": 300}}, kv=KVModel(default=KVSpec(10, 16)))
    p = predictor.predict(chat("anything", "hello"), {"X-Agent-Role": "coder"})
    assert (p.role, p.p50, p.p90, p.role_source) == ("coder", 100, 300, "explicit")
    assert p.kv_bytes == -(-(p.prompt_tokens + 300) // 16) * 16 * 10
    p = predictor.predict(chat("anything", "hello", max_tokens=50))
    assert p.role == "other" and p.p90 == 50 and p.p50 <= 50
    with pytest.raises(ValueError):
        Predictor.from_priors({"coder": {"p50": 300, "p90": 100}})


# ------------------------------------------------------------------------------------------------ files
def test_save_load_round_trip(predictor, records, tmp_path):
    path = predictor.save(tmp_path / "model.skops")
    assert path.stat().st_mode & 0o777 == _FILE_MODE  # as open() would make it, not mkstemp's 0600
    assert zipfile.is_zipfile(path) and "schema.json" in zipfile.ZipFile(path).namelist()
    loaded = Predictor.load(path)
    for record in records[:40]:
        assert loaded.predict(record["request"]) == predictor.predict(record["request"])
    assert loaded.state["features"] == loaded.assembler.names
    assert loaded.state["training"]["skops_version"]
    # the plain reader and skops itself read the same thing
    import skops.io as sio

    via_skops = sio.load(path, trusted=[])
    assert json.dumps(_listify(via_skops), sort_keys=True) == json.dumps(_listify(read_plain(path)), sort_keys=True)


def _listify(value):
    if isinstance(value, dict):
        return {k: _listify(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_listify(v) for v in value]
    if isinstance(value, np.ndarray):
        return [str(value.dtype), value.tolist()]
    return value


def test_mismatched_model_file_is_refused(state, tmp_path):
    wrong_windows = json.loads(json.dumps(state["feature_spec"]))
    wrong_windows["windows"]["system_chars"] += 1
    cases = {
        "version": dict(state, format_version=state["format_version"] + 1),
        "features": dict(state, feature_spec=wrong_windows),
        "feature list": dict(state, features=state["features"][:-1] + ["model=elsewhere"]),
        "format": dict(state, format="something-else"),
        "calibration cells": dict(state, length_model=dict(state["length_model"], offsets=np.zeros((5, 2)))),
    }
    for name, bad in cases.items():
        path = save_state(bad, tmp_path / f"{name}.skops")
        with pytest.raises(ModelFileError) as error:
            Predictor.load(path)
        assert str(path) in str(error.value)
    assert "system_chars" in _load_error(save_state(cases["features"], tmp_path / "again.skops"))
    assert "version" in _load_error(save_state(cases["version"], tmp_path / "v.skops"))
    junk = tmp_path / "junk.skops"
    junk.write_bytes(b"\x80\x04 definitely not a model")
    assert "not a skops model file" in _load_error(junk)
    assert "no such model file" in _load_error(tmp_path / "missing.skops")
    assert "is a folder, not a model file" in _load_error(tmp_path)


def _with(state: dict, path: tuple, value) -> dict:
    """A deep copy of ``state`` with the item at ``path`` (keys and indexes) replaced, or removed for None."""
    import copy

    bad = copy.deepcopy(state)
    *parents, last = path
    target = bad
    for key in parents:
        target = target[key]
    if value is None:
        del target[last]
    else:
        target[last] = value(target[last]) if callable(value) else value
    return bad


def _set_first(array, value):
    array = np.array(array)
    array[0] = value
    return array


@pytest.mark.parametrize("path, value, says", [
    (("text_model", "weights"), np.zeros((3, 3), np.float32), "text weights of shape (3, 3)"),
    (("text_model", "bias"), np.zeros(2), "bias (2,)"),
    (("text_model", "encoder", 0, "idf"), np.zeros(2), "idf of shape (2,)"),
    (("length_model", "forest", "left"), lambda a: _set_first(a, 10**6), "child index out of range"),
    (("length_model", "forest", "roots"), lambda a: _set_first(a, -1), "root index out of range"),
    (("length_model", "forest", "value"), lambda a: np.asarray(a)[:5], "tree node arrays of different shapes"),
    (("length_model", "forest", "tree_model"), lambda a: _set_first(a, 9), "tree model index out of range"),
    (("length_model", "forest", "feature"), lambda a: _set_first(a, -1), "a negative feature index"),
    (("length_model", "forest", "left"), lambda a: _set_first(a, 1), "a tree node reached twice"),  # a root
    (("length_model", "forest", "left"), lambda a: _set_first(a, 0), "half a leaf"),
    (("length_model", "forest", "depth"), 0, "but a walk of depth 0"),  # would stop inside the trees
    (("length_model", "forest", "depth"), 2_000_000, "but a walk of depth 2000000"),  # seconds a request
    (("length_model", "quantiles"), [0.5], "1 quantiles, 2 boosted models"),
    (("text_model",), None, "no text_model"),
    (("length_model",), None, "no length_model"),
    # numbers that are not finite: every request's quantiles, or every confidence, would be NaN (a 500 each)
    (("length_model", "offsets"), lambda a: np.full(np.shape(a), np.nan), "offsets that are not finite"),
    (("length_model", "forest", "value"), lambda a: _set_first(a, np.inf), "leaf values or baselines"),
    (("length_model", "forest", "baselines"), lambda a: _set_first(a, np.nan), "leaf values or baselines"),
    (("length_model", "forest", "threshold"), lambda a: _set_first(a, np.nan), "thresholds that are NaN"),
    (("text_model", "weights"), lambda a: _set_first(a, np.nan), "not finite, or a threshold outside"),
    (("text_model", "bias"), lambda a: _set_first(a, -np.inf), "not finite, or a threshold outside"),
    (("text_model", "encoder", 0, "idf"), lambda a: _set_first(a, np.nan), "not finite, or a threshold outside"),
    (("text_model", "threshold"), 1.5, "not finite, or a threshold outside [0, 1]"),
])
def test_a_model_file_whose_parts_do_not_fit_is_refused_at_load(state, tmp_path, path, value, says):
    """A damaged or edited file is refused when it is loaded, with what does not fit, not at some request with
    an IndexError (or worse, served: without its classifier every request would be "other")."""
    file = save_state(_with(state, path, value), tmp_path / "bad.skops")
    with pytest.raises(ModelFileError, match=re.escape(says)) as error:
        Predictor.load(file)
    assert str(file) in str(error.value)


def test_a_tree_that_splits_on_a_feature_the_rows_lack_is_refused(state, tmp_path):
    forest = state["length_model"]["forest"]
    internal = int(np.flatnonzero(np.asarray(forest["left"]) != np.arange(len(forest["left"])))[0])
    feature = np.array(forest["feature"])
    feature[internal] = len(state["features"])
    file = save_state(_with(state, ("length_model", "forest", "feature"), feature), tmp_path / "bad.skops")
    with pytest.raises(ModelFileError, match=f"splits on feature {len(state['features'])} of "
                                             f"{len(state['features'])}"):
        Predictor.load(file)


def test_leaves_summing_past_a_float_give_the_cap_not_an_overflow(state, tmp_path):
    """Finite leaf values whose sum is a length past any float (only an edited file): the quantiles are
    capped like any long prediction (math.expm1 raised OverflowError on every request)."""
    file = save_state(_with(state, ("length_model", "forest", "value"), lambda a: np.full(np.shape(a), 1e6)),
                      tmp_path / "huge.skops")
    prediction = Predictor.load(file).predict({"model": "m", "max_tokens": 77,
                                               "messages": [{"role": "user", "content": "hi"}]})
    assert prediction.p50 == prediction.p90 == 77


def test_offsets_are_calibrated_per_role_and_model():
    """Mondrian conformal: a (role, model) cell with enough samples gets its own shift; a thin cell keeps its
    role's; serving picks the cell from the request's role and model."""
    rng = np.random.default_rng(0)
    n = 4000
    roles = rng.integers(0, 2, n)
    models = rng.integers(0, 2, n)
    spread = np.where((roles == 1) & (models == 1), 1.0, 0.2)  # one cell is far noisier than the rest
    log_y = rng.normal(0.0, spread)
    keep = ~((roles == 0) & (models == 1) & (np.arange(n) % 100 != 0))  # cell (0, 1): a handful of samples
    log_y, roles, models = log_y[keep], roles[keep], models[keep]
    offsets = mondrian_offsets(log_y, np.zeros((len(log_y), 2)), (0.5, 0.9), roles, 2, models, 2, shrink=50.0)
    assert offsets.shape == (4, 2)
    p90 = offsets[:, 1]
    assert p90[3] > 1.0 > 0.5 > p90[2] > 0.2  # (1,1) wide; (1,0) narrow, pulled a little towards role 1
    assert abs(p90[1] - p90[0]) < 0.1  # the thin cell (0,1) stays near its role's shift
    for cell in (0, 2, 3):
        mask = roles * 2 + models == cell
        assert 0.85 <= np.mean(log_y[mask] <= p90[cell]) <= 0.97


def test_too_few_runs_to_calibrate_still_trains(records):
    """Under 3 runs (or 30 usable records) there is nothing to cross-calibrate on: the model is fitted without
    offsets instead of failing (an online buffer can hold one long workflow)."""
    two_runs = [record for record in records if record["workflow"]["id"] in ("wf-0-0", "wf-0-1")]
    assert len(two_runs) == 12
    predictor = Predictor.from_state(fit_state(two_runs, FAST))
    assert predictor.length_model.offsets.shape == (1, 2) and not predictor.length_model.offsets.any()
    prediction = predictor.predict(chat("You are a planner.", "Plan a blog."))
    assert 1 <= prediction.p50 <= prediction.p90


def test_upper_fit_level_is_the_one_that_reserves_least():
    """Each candidate is calibrated to the same 90 % per cell, then the one with the smallest weighted mean
    reservation (capped at max_tokens) is kept. Hand-checkable: actual lengths 1..100 in one cell; candidate 0.7
    predicts every length exactly, so its offset is 0 and it reserves the mean, 50.5; candidate 0.9 predicts a
    constant 10, so its offset is the 90th percentile of (actual - 10) and it reserves that for everyone."""
    actual = np.arange(1.0, 101.0)
    n = len(actual)
    strata, models = np.zeros(n, dtype=np.intp), np.zeros(n, dtype=np.intp)
    weights, caps = np.ones(n), np.full(n, np.inf)
    exact = np.column_stack([actual, actual])
    constant = np.column_stack([actual, np.full(n, 10.0)])
    level, offsets, reservation = choose_upper_level(actual, {0.7: exact, 0.9: constant}, (0.5, 0.9), strata,
                                                     models, 1, weights, caps)
    assert level == 0.7 and list(reservation) == [0.7, 0.9]
    assert reservation[0.7] == pytest.approx(50.5) and offsets[0, 1] == pytest.approx(0.0)
    expected_constant = 10.0 + np.quantile(actual - 10.0, 0.9)
    assert reservation[0.9] == pytest.approx(expected_constant, abs=1.0)
    # a cap (max_tokens) bounds what a candidate is charged; equal reservations keep the higher level
    level, _, reservation = choose_upper_level(actual, {0.7: exact, 0.9: exact}, (0.5, 0.9), strata, models, 1,
                                               weights, caps)
    assert level == 0.9 and reservation[0.7] == reservation[0.9]
    level, _, reservation = choose_upper_level(actual, {0.7: exact, 0.9: constant}, (0.5, 0.9), strata, models, 1,
                                               weights, np.full(n, 5.0))
    assert reservation == {0.7: pytest.approx((1 + 2 + 3 + 4 + 96 * 5) / 100), 0.9: 5.0} and level == 0.7


def test_training_records_the_fit_level_and_keeps_target_levels(state, records):
    assert state["training"]["fit_levels"] == [0.5, 0.9]  # the default fits p90's trees at 0.9
    assert list(state["training"]["upper_reservation"]) == ["0.9"]
    levels = (0.7, 0.8, 0.9)
    chosen = fit_state(records[:240], dataclasses.replace(FAST, upper_fit_levels=levels))
    training = chosen["training"]
    assert training["quantiles"] == [0.5, 0.9]  # what p50 / p90 mean to every caller
    assert training["fit_levels"][0] == 0.5 and training["fit_levels"][1] in levels
    reservation = training["upper_reservation"]
    assert set(reservation) == {str(level) for level in levels}
    assert min(reservation.values()) == reservation[str(training["fit_levels"][1])]
    assert chosen["length_model"]["quantiles"] == [0.5, 0.9]
    p = Predictor.from_state(chosen)
    prediction = p.predict(chat(AGENTS["coder"][0], "Implement a chess clock in Python with 3 functions."))
    assert 1 <= prediction.p50 <= prediction.p90
    # without calibration there are no offsets to lift a lower level to 0.9: the trees are fitted at 0.9
    uncalibrated = fit_state(records[:120], dataclasses.replace(FAST, calibrate=False))
    assert uncalibrated["training"]["fit_levels"] == [0.5, 0.9]
    assert uncalibrated["training"]["upper_reservation"] is None
    X, log_y = np.zeros((40, 2)), np.zeros(40)
    with pytest.raises(ValueError, match="need conformal offsets"):
        fit_length_model(X, log_y, None, (0.5, 0.9), LengthParams(max_iter=2), fit_levels=(0.5, 0.8))


STEP = {"X-Workflow-Step": "2"}


def test_predictor_uses_the_model_cell(state):
    cells = np.atleast_2d(state["length_model"]["offsets"])
    slots = state["length_model"]["model_slots"]
    assert slots == len(state["model_vocab"]) + 1
    # two blocks: requests with a workflow step, then requests without one
    assert state["length_model"]["context_blocks"] == 2 and cells.shape[0] == 2 * len(ROLES) * slots
    p = Predictor.from_state(state)
    body = chat(AGENTS["coder"][0], "Implement a chess clock in Python with 3 functions.")
    base = p.predict(body, STEP).p90
    shifted = np.array(cells)
    slot = p.assembler.model_slot("model-a")
    shifted[p.length_model.stratum(p._role_index["coder"], slot), 1] += 300.0
    p2 = Predictor.from_state(dict(state, length_model=dict(state["length_model"], offsets=shifted)))
    assert abs(p2.predict(body, STEP).p90 - (base + 300)) <= 1  # offsets are in tokens
    assert p2.predict(dict(body, model="model-b"), STEP).p90 == p.predict(dict(body, model="model-b"), STEP).p90
    assert p2.predict(body).p90 == p.predict(body).p90  # without a step: the other block


def test_requests_without_a_workflow_step_read_their_own_offsets(state):
    p = Predictor.from_state(state)
    coder, slot = p._role_index["coder"], p.assembler.model_slot("model-a")
    stepped, stepless = p.length_model.stratum(coder, slot), p.length_model.stratum(coder, slot, has_step=False)
    assert stepless == stepped + len(ROLES) * p.length_model.model_slots
    body = chat(AGENTS["coder"][0], "Implement a chess clock in Python with 3 functions.")
    shifted = np.array(state["length_model"]["offsets"])
    shifted[stepless, 1] += 300.0
    p2 = Predictor.from_state(dict(state, length_model=dict(state["length_model"], offsets=shifted)))
    assert abs(p2.predict(body).p90 - (p.predict(body).p90 + 300)) <= 1
    assert p2.predict(body, STEP).p90 == p.predict(body, STEP).p90
    # the metadata form of the step is workflow context too
    with_metadata = dict(body, metadata={"workflow_step": "2"})
    assert p2.predict(with_metadata).p90 == p.predict(with_metadata).p90 == p.predict(body, STEP).p90
    # predict_many picks the same cells
    many = p2.predict_many([body, body], [None, STEP])
    assert [m.p90 for m in many] == [p2.predict(body).p90, p2.predict(body, STEP).p90]

    # a model saved before the second block existed: one block, read by every request
    rows = len(ROLES) * p.length_model.model_slots
    old_length = {k: v for k, v in state["length_model"].items() if k != "context_blocks"}
    old = Predictor.from_state(dict(state, length_model=dict(old_length, offsets=shifted[:rows])))
    assert old.length_model.stratum(coder, slot, has_step=False) == stepped
    assert old.predict(body, STEP).p90 == p.predict(body, STEP).p90
    # a block count the file's offsets do not have is refused
    for broken in (dict(old_length, offsets=shifted[:rows], context_blocks=2),
                   dict(old_length, offsets=shifted, context_blocks=3)):
        with pytest.raises(ModelFileError, match="calibration cells"):
            Predictor.from_state(dict(state, length_model=broken))


def test_without_workflow_context_drops_only_the_workflow_metadata():
    from predictor.evaluate import without_workflow_context

    body = {"model": "m", "messages": [], "metadata": {"workflow_id": "w", "workflow_step": "3", "tenant": "a"}}
    bare = without_workflow_context(body)
    assert bare["metadata"] == {"tenant": "a"} and body["metadata"]["workflow_step"] == "3"  # a copy
    plain = {"model": "m", "messages": []}
    assert without_workflow_context(plain) is plain


def test_training_without_workflow_steps_keeps_one_block():
    records = synthetic_records(n_workflows=12, seed=4)
    for record in records:
        record["workflow"] = None
    state = fit_state(records, FAST)
    length = state["length_model"]
    assert length["context_blocks"] == 1
    assert np.atleast_2d(length["offsets"]).shape[0] == len(ROLES) * length["model_slots"]


def _load_error(path) -> str:
    with pytest.raises(ModelFileError) as error:
        load_state(path)
    return str(error.value)


class Gadget:  # not a plain type: skops saves it as an object, which the loader must refuse
    def __init__(self) -> None:
        self.x = 1


def test_untrusted_objects_are_refused(state, tmp_path):
    import skops.io as sio

    path = tmp_path / "gadget.skops"
    sio.dump(dict(state, extra=Gadget()), path)
    assert "untrusted" in _load_error(path)


# ------------------------------------------------------------------------------------------------ metrics
def test_metrics_on_a_hand_checkable_set():
    roles = role_metrics(["coder", "coder", "planner"], ["coder", "planner", "planner"])
    assert roles["accuracy"] == pytest.approx(2 / 3)
    assert roles["f1"] == {"coder": pytest.approx(2 / 3), "planner": pytest.approx(2 / 3)}
    assert roles["macro_f1"] == pytest.approx(2 / 3)
    one_class = role_metrics(["coder"] * 4, ["coder", "coder", "coder", "other"])
    assert one_class["macro_f1"] == pytest.approx(6 / 7)           # coder: 2*3 / (2*3 + 0 + 1)
    assert one_class["macro_f1_all_labels"] == pytest.approx(3 / 7)  # + other: F1 = 0
    assert mae([1, 2, 3], [2, 2, 5]) == pytest.approx(1.0)
    assert coverage([10, 10, 10, 10], [5, 10, 11, 30]) == pytest.approx(0.5)
    assert kendall_tau([1, 2, 3], [1, 3, 2]) == pytest.approx(1 / 3)
    # with ties, tau-b: 4 concordant, 0 discordant, one tie on each side: 4 / sqrt(5 * 5) (tau-c would be 0.75)
    assert kendall_tau([1, 1, 2, 3], [1, 2, 2, 3]) == pytest.approx(0.8)
    # prompts 100+100, reserved 50+150, max 400+400: 1 - 400/1000
    assert kv_saving([100, 100], [50, 150], [400, 400]) == pytest.approx(0.6)
    assert under_reservation([60, 100], [50, 150]) == pytest.approx(0.5)
    assert under_reservation([50, 150], [50, 150]) == 0.0  # an output of exactly the reservation fits in it
    # p90 of 100 against outputs 60 (40 over: 0.1 × 40) and 120 (20 under: 0.9 × 20): (4 + 18) / 2
    assert quantile_loss([100, 100], [60, 120], 0.9) == pytest.approx(11.0)
    assert quantile_loss([5, 7], [5, 7], 0.9) == 0.0
    # reserving everything covers everything but scores worse than a tight p90 that misses one call
    assert quantile_loss([4096] * 4, [90, 100, 110, 300], 0.9) > quantile_loss([120] * 4, [90, 100, 110, 300], 0.9)


def test_bootstrap_intervals_resample_whole_runs():
    # Run "x": 50 calls reserving 10 of a worst case of 100 each (saving 0.9); run "y": one call reserving 50
    # of 100 (saving 0.5). Drawing two runs with replacement gives xx (0.9, p 1/4), xy (1 - 550/5100, p 1/2)
    # and yy (0.5, p 1/4): the 95% interval is [0.5, 0.9]. Resampling calls instead would give about
    # [0.88, 0.9], as if 51 independent calls had been seen rather than two runs.
    runs = ["x"] * 50 + ["y"]
    sums = {"reserved": [10.0] * 50 + [50.0], "worst": [100.0] * 51}
    ratios = {"saving": ("reserved", "worst", True)}
    bounds = run_bootstrap_intervals(runs, sums, ratios)
    assert bounds["saving"] == [pytest.approx(0.5), pytest.approx(0.9)]
    assert run_bootstrap_intervals(runs, sums, ratios) == bounds   # seeded: the same rows, the same interval
    assert run_bootstrap_intervals(["x"] * 51, sums, ratios) == {}  # one run: nothing to resample
    # a plain ratio (not 1 - ratio): share covered, 0.5 in run "a" and 1.0 in run "b"
    covered = run_bootstrap_intervals(["a", "a", "b", "b"], {"covered": [1, 0, 1, 1], "calls": [1, 1, 1, 1]},
                                      {"coverage": ("covered", "calls", False)})
    assert covered["coverage"] == [pytest.approx(0.5), pytest.approx(1.0)]


class FixedPredictor:
    """Predicts the same thing for every request (to check evaluate_records' arithmetic by hand)."""

    def __init__(self, p50: int, p90: int, role: str, baselines: dict) -> None:
        self.p50, self.p90, self.role = p50, p90, role
        self.state = {"baselines": baselines}

    def predict(self, body, headers=None) -> Prediction:
        return Prediction(self.role, 0.9, self.p50, self.p90, 0)


def test_evaluation_report_by_hand():
    def record(role, prompt, output, max_tokens=None):
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        if max_tokens:
            body["max_tokens"] = max_tokens
        return {"request": body, "usage": {"prompt_tokens": prompt, "completion_tokens": output},
                "agent_role": role, "workflow": None, "source": "t"}

    train = [record("coder", 100, 100), record("coder", 100, 300), record("planner", 100, 20)]
    baselines = fit_baselines(train)
    assert baselines["global_mean"] == pytest.approx(140)
    assert baselines["role_mean"] == {"coder": 200, "planner": 20}
    test = [record("coder", 100, 150), record("planner", 300, 400, max_tokens=500)]
    base = baseline_predictions(baselines, test)
    assert base["role_mean"] == [200, 20]
    # AIBrix-style histogram: coder at 128 input tokens saw outputs 100 (bucket 2^7) and 300 (2^8)
    assert base["role_histogram"] == [128, 16.0] and base["role_histogram_p90"] == [256, 16.0]

    report = evaluate_records(FixedPredictor(200, 600, "coder", baselines), test, default_max_tokens=1000)
    assert report["role"]["accuracy"] == 0.5
    length, kv = report["length"], report["kv"]
    assert length["mae_p50"] == pytest.approx((50 + 200) / 2)                # p50 200 vs 150 and 400
    assert length["baselines_mae"]["role_mean"] == pytest.approx((50 + 380) / 2)
    assert length["p90_coverage"] == 1.0                                     # 600 and min(600, 500)
    # reserved: 600 (cap 1000) and 500 (cap max_tokens 500): 1 - (100+600 + 300+500) / (100+1000 + 300+500)
    assert kv["saving"] == pytest.approx(1 - 1500 / 1900, abs=1e-4)
    assert kv["under_reservation_rate"] == 0.0
    assert "intervals_95" not in report  # both test calls share one prompt, so one run: no interval


@pytest.mark.parametrize("max_tokens, default, context, prompt, cap", [
    (None, 4096, None, 100, 4096),    # the rule: a request without max_tokens takes the default
    (500, 4096, None, 100, 500),
    (None, None, None, 100, 4096),    # nothing bounds it: evaluate still needs a worst case
    (None, None, 8192, 100, 8092),    # vLLM's default: all the room the prompt leaves
    (None, 4096, 8192, 100, 4096),
    (None, 4096, 2048, 100, 1948),    # never more than the context allows
    (3000, None, 2048, 100, 1948),
    (None, None, 2048, 5000, 1),      # a prompt over the context (vLLM refuses it) reserves one token, not < 0
])
def test_output_cap(max_tokens, default, context, prompt, cap):
    assert output_cap(max_tokens, default, context, prompt) == cap


def test_served_contexts_cap_reservations_and_the_worst_case_by_hand():
    def record(model, prompt, output, max_tokens=None):
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
        if max_tokens:
            body["max_tokens"] = max_tokens
        return {"request": body, "usage": {"prompt_tokens": prompt, "completion_tokens": output},
                "agent_role": "coder", "workflow": None, "source": "t"}

    test = [record("long", 1000, 9000), record("short", 1000, 500), record("other", 1000, 500)]
    always = FixedPredictor(5000, 20000, "coder", fit_baselines(test))
    contexts = {"long": 32768, "short": 2048}
    report = evaluate_records(always, test, default_max_tokens=None, contexts=contexts)
    # caps: long 31768 (the room), short 1048 (the room), other 4096 (no context known: the default default)
    assert report["kv"]["default_max_tokens"] is None
    assert report["length"]["p90_quantile_loss"] == pytest.approx((0.1 * 11000 + 0.1 * 548 + 0.1 * 3596) / 3,
                                                                   abs=0.01)
    assert report["kv"]["saving"] == pytest.approx(1 - (21000 + 2048 + 5096) / (32768 + 2048 + 5096), abs=1e-4)
    assert report["kv"]["oracle_saving"] == pytest.approx(1 - (10000 + 1500 + 1500) / (32768 + 2048 + 5096),
                                                          abs=1e-4)
    # the p50 is capped as the p90 is: 5000, 1048, 4096 against 9000, 500, 500
    assert report["length"]["mae_p50"] == pytest.approx((4000 + 548 + 3596) / 3, abs=0.01)
    # without the contexts every request without max_tokens is capped at 4096: the long model's 20000 shrinks
    plain = evaluate_records(always, test)
    assert plain["length"]["p90_quantile_loss"] == pytest.approx((0.9 * 4904 + 0.1 * 3596 * 2) / 3, abs=0.01)
    # ... and the oracle reserves at most the cap too: 4096 of the long model's 9000
    assert plain["kv"]["oracle_saving"] == pytest.approx(1 - (5096 + 1500 + 1500) / (3 * 5096), abs=1e-4)


def test_an_output_of_exactly_the_reservation_is_no_under_reservation_in_the_intervals_either():
    def record(run, output):
        return {"request": {"model": "m", "messages": [{"role": "user", "content": run}]},
                "usage": {"prompt_tokens": 10, "completion_tokens": output}, "agent_role": "coder",
                "workflow": {"id": run, "step": 0}, "source": "t"}

    test = [record("r1", 150), record("r2", 150), record("r3", 100)]
    report = evaluate_records(FixedPredictor(100, 150, "coder", fit_baselines(test)), test)
    assert report["kv"]["under_reservation_rate"] == 0.0
    assert report["intervals_95"]["under_reservation_rate"] == [0.0, 0.0]
    assert report["intervals_95"]["p90_coverage"] == [1.0, 1.0]


def test_evaluation_hides_the_role_label_unless_roles_are_explicit():
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "metadata": {"agent_role": "coder"}}
    records = [{"request": body, "usage": {"prompt_tokens": 10, "completion_tokens": 1200}, "agent_role": "coder",
                "workflow": None, "source": "t"},
               {"request": {**body, "metadata": {}}, "usage": {"prompt_tokens": 10, "completion_tokens": 1200},
                "agent_role": "coder", "workflow": None, "source": "t"}]
    priors = Predictor.from_priors()  # knows no classifier: a request without an explicit role is "other"
    hidden = evaluate_records(priors, records)
    assert hidden["role"]["accuracy"] == 0.0 and hidden["length"]["p90_coverage"] == 0.0  # other's p90: 1,000
    explicit = evaluate_records(priors, records, explicit_roles=True)  # as the gateway served them: coder, 1,600
    assert explicit["role"]["accuracy"] == 1.0 and explicit["length"]["p90_coverage"] == 1.0


def test_split_keeps_workflows_whole():
    records = synthetic_records(n_workflows=30, seed=3)
    train, test = split_records(records, 0.2, seed=0)
    assert len(train) + len(test) == len(records) and test
    assert not {r["workflow"]["id"] for r in train} & {r["workflow"]["id"] for r in test}
    assert split_records(records, 0.2, seed=0) == (train, test)  # seeded
    # without a workflow, the prompt text is the group: the same prompt never lands on both sides
    prompt = {"request": {"messages": [{"role": "user", "content": "same"}]}, "source": "s"}
    assert group_of(prompt, 1) == group_of(dict(prompt), 2)


# ------------------------------------------------------------------------------------------------ CLI
def test_train_and_evaluate_commands(tmp_path, capsys):
    from predictor import evaluate, train

    data = tmp_path / "synthetic.jsonl.gz"
    write_records(data, synthetic_records(n_workflows=30, seed=5))
    model = tmp_path / "model.skops"
    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    assert train.main(parser.parse_args(["--data", str(data), "--out", str(model), "--max-iter", "30",
                                         "--quiet"])) == 0
    parser = argparse.ArgumentParser()
    evaluate.add_arguments(parser)
    assert evaluate.main(parser.parse_args(["--model", str(model), "--data", str(data)])) == 0
    report = json.loads(capsys.readouterr().out)
    result = report["all"]
    assert result["role"]["macro_f1"] >= 0.9
    assert set(result["length"]["baselines_mae"]) == {"global_mean", "role_mean", "role_histogram"}
    assert 0 <= result["kv"]["saving"] <= 1 and 0 <= result["kv"]["under_reservation_rate"] <= 1
    assert report["meta"]["split"] == "test" and report["by_source"]["synthetic"]["n"] == result["n"]
    assert 0 < result["kv"]["oracle_saving"] <= 1
    intervals = result["intervals_95"]  # by run: six held-out workflows
    assert intervals["runs"] == 6
    for name, point in (("kv_saving", result["kv"]["saving"]), ("p90_coverage", result["length"]["p90_coverage"]),
                        ("oracle_saving", result["kv"]["oracle_saving"])):
        low, high = intervals[name]
        assert low <= point <= high, (name, low, point, high)

    # --format markdown: the same figures, one table row per source (docs/benchmarks.md's columns)
    assert evaluate.main(parser.parse_args(["--model", str(model), "--data", str(data), "--format", "markdown"])) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("| source | n | role acc |") and table[0].count("|") == 13
    cells = {line.split(" | ")[0].strip("| "): line.strip("| ").split(" | ") for line in table[2:]}
    assert set(cells) == {"all", "synthetic"}
    assert cells["synthetic"][1] == str(result["n"])
    assert cells["synthetic"][9] == f"{100 * result['kv']['saving']:.1f}%"

    # --cv K: every record scored once by a model trained without its workflow
    assert evaluate.main(parser.parse_args(["--cv", "3", "--data", str(data)])) == 0
    cv = json.loads(capsys.readouterr().out)
    assert cv["all"]["n"] == 30 * 6 and cv["meta"]["cv_folds"] == 3
    assert cv["meta"]["upper_fit_levels"] == [0.9]
    assert evaluate.main(parser.parse_args(["--cv", "3", "--data", str(data), "--upper-fit-levels", "0.8", "0.9"])) == 0
    assert json.loads(capsys.readouterr().out)["meta"]["upper_fit_levels"] == [0.8, 0.9]
    # --no-workflow-context: the plain OpenAI body, as a client without workflow headers is served
    assert evaluate.main(parser.parse_args(["--model", str(model), "--data", str(data),
                                            "--no-workflow-context"])) == 0
    bare = json.loads(capsys.readouterr().out)
    assert bare["meta"]["workflow_context"] is False and report["meta"]["workflow_context"] is True
    assert bare["all"]["n"] == result["n"] and bare["all"]["role"] == result["role"]
    assert bare["all"]["length"]["p90_coverage"] != result["length"]["p90_coverage"] or \
        bare["all"]["kv"]["saving"] != result["kv"]["saving"]
    # fit levels are a training option: a saved model keeps its own
    assert evaluate.main(parser.parse_args(["--model", str(model), "--data", str(data),
                                            "--upper-fit-levels", "0.8"])) == 2
    assert "only applies to --cv" in capsys.readouterr().err
    # neither or both of --model / --cv is a usage error
    assert evaluate.main(parser.parse_args(["--data", str(data)])) == 2


def test_train_refuses_a_fit_level_outside_zero_one(capsys):
    from predictor import train

    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    for bad in ("1.5", "0", "high"):
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args(["--data", "x", "--out", "y", "--upper-fit-levels", "0.8", bad])
        assert exit_info.value.code == 2
        assert "strictly between 0 and 1" in capsys.readouterr().err
    assert parser.parse_args(["--data", "x", "--out", "y", "--upper-fit-levels", "0.75"]).upper_fit_levels == [0.75]



def test_train_and_evaluate_report_bad_input_in_one_line(tmp_path, capsys):
    """Missing, malformed, truncated or empty trace files and an unwritable --out: exit 2 with a message that
    names the problem, no traceback, and no model file written."""
    import gzip

    from predictor import evaluate, train

    good = tmp_path / "good.jsonl"
    write_records(good, synthetic_records(n_workflows=2, seed=3))
    truncated = tmp_path / "cut.jsonl.gz"
    truncated.write_bytes(gzip.compress(good.read_bytes())[:200])
    malformed = tmp_path / "bad.jsonl"
    malformed.write_text('{"request": {}}\n')
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    out = tmp_path / "model.skops"

    def run(module, argv):
        parser = argparse.ArgumentParser()
        module.add_arguments(parser)
        code = module.main(parser.parse_args(argv))
        return code, capsys.readouterr().err

    cases = [
        (train, ["--data", str(tmp_path / "missing.jsonl"), "--out", str(out)], "No such file"),
        (train, ["--data", str(malformed), "--out", str(out)], "bad.jsonl:1: 'request.messages' must be a list"),
        (train, ["--data", str(truncated), "--out", str(out)], "cut.jsonl.gz: not a readable gzip file"),
        (train, ["--data", str(empty), "--out", str(out)], "no training records"),
        (train, ["--data", str(good), "--out", str(tmp_path)], "is a folder"),
        (evaluate, ["--cv", "3", "--data", str(good)], "needs at least 3 runs"),
        (evaluate, ["--cv", "3", "--data", str(truncated)], "not a readable gzip file"),
    ]
    for module, argv, message in cases:
        code, err = run(module, argv)
        assert code == 2, (argv, err)
        assert message in err and "Traceback" not in err, (argv, err)
    assert not out.exists()


def test_bench_runs(predictor, tmp_path):
    from predictor.bench import run

    data = tmp_path / "requests.jsonl"
    write_records(data, synthetic_records(n_workflows=3, seed=7))
    model = predictor.save(tmp_path / "model.skops")
    result = run(str(model), [str(data)], requests=50, warmup=5)
    assert result["requests"] == 50 and result["model_bytes"] > 0
    assert result["predict_us"]["p50"] > 0 and result["load_s"] >= 0
    assert result["machine_reference_us"] > 0 and result["p50_in_references"] > 0


# ------------------------------------------------------------------------------------------------ online
def test_make_record_labels_only_explicit_roles():
    body = chat("sys", "hi", metadata={"workflow_id": "w1", "workflow_step": 3})
    record = make_record(body, {"prompt_tokens": 10, "completion_tokens": 5})
    assert record["agent_role"] is None and record["workflow"] == {"id": "w1", "step": 3}
    record = make_record(body, {"prompt_tokens": 10, "completion_tokens": 5}, {"X-Agent-Role": "coder"})
    assert record["agent_role"] == "coder"
    assert make_record(body, {"prompt_tokens": 10}) is None
    usage = {"prompt_tokens": 10, "completion_tokens": 5}
    # the step is read as predict() reads it: the header first, then metadata; anything not an integer is none
    assert make_record(body, usage, {"X-Workflow-Step": " 4 "})["workflow"]["step"] == 4
    assert make_record(body, usage, {"X-Workflow-Step": "¹"})["workflow"]["step"] == 3  # not a number: metadata's
    for odd in (float("inf"), 10**400, "9" * 5000, "²", "3.5"):
        odd_body = chat("sys", "hi", metadata={"workflow_id": "w1", "workflow_step": odd})
        assert make_record(odd_body, usage)["workflow"] == {"id": "w1", "step": None}


@pytest.mark.parametrize("headers, metadata, workflow", [
    (None, None, None),
    ({"X-Workflow-Id": "run-1", "X-Workflow-Step": "4"}, None, {"id": "run-1", "step": 4}),
    ({"X-Workflow-Id": "run-1"}, None, {"id": "run-1", "step": None}),  # no step is invented
    ({"X-Workflow-Step": "4"}, None, {"id": None, "step": 4}),          # a step without an id is kept
    (None, {"workflow_step": 2}, {"id": None, "step": 2}),
    ({"X-Workflow-Id": ""}, {"workflow_id": 7}, None),                   # neither is usable
])
def test_a_recorded_request_trains_as_it_was_served(headers, metadata, workflow, tmp_path):
    """Training reads a live record's workflow back into the view predict() had when it served the request."""
    body = chat("sys", "hi", **({"metadata": metadata} if metadata else {}))
    record = make_record(body, {"prompt_tokens": 10, "completion_tokens": 5}, headers)
    assert record["workflow"] == workflow
    write_records(tmp_path / "live.jsonl", [record])  # the trace format takes it, and reads it back
    (read,) = read_records(tmp_path / "live.jsonl")
    served, trained = parse_request(body, headers), parse_request(*request_of(read))
    assert (trained.workflow_step, trained.workflow_id) == (served.workflow_step, served.workflow_id)


@pytest.mark.parametrize("workflow", [{"id": None, "step": None}, {"id": 5, "step": 1}, {"id": "w", "step": "1"},
                                      {"id": "w", "step": True}, ["w", 1]])
def test_the_trace_format_refuses_a_workflow_it_cannot_use(workflow):
    with pytest.raises(TraceFormatError, match="'workflow' must be null or"):
        validate_record({"request": chat("s", "u"), "usage": {"prompt_tokens": 1, "completion_tokens": 1},
                         "agent_role": None, "workflow": workflow, "source": "t"})


async def test_refit_runs_off_the_event_loop_and_swaps_atomically():
    from concurrent.futures import ThreadPoolExecutor

    fitted = Predictor.from_priors({"coder": {"p50": 7, "p90": 9}})

    def slow_fit(records):
        time.sleep(0.6)  # a blocking fit: must not stall the loop
        return fitted

    learner = OnlineLearner(buffer=MemoryBuffer(maxlen=100), refit_every=5, min_records=5, fit=slow_fit,
                            executor=ThreadPoolExecutor(1))
    before = learner.predictor
    lags = []

    async def heartbeat():
        for _ in range(40):
            started = time.perf_counter()
            await asyncio.sleep(0.01)
            lags.append(time.perf_counter() - started - 0.01)

    beat = asyncio.create_task(heartbeat())
    for i in range(5):
        assert await learner.observe(chat("s", f"q{i}"), {"prompt_tokens": 5, "completion_tokens": 3})
    assert learner.refitting and learner.predictor is before  # the old model serves during the refit
    await learner.wait_refit()
    await beat
    assert learner.predictor is fitted and learner.refits == 1
    assert max(lags) < 0.2  # the loop kept ticking (a blocked loop would show a ~0.6 s gap)
    assert learner.predict(chat("s", "q"), {"X-Agent-Role": "coder"}).p50 == 7
    await learner.stop()


async def test_online_refit_trains_a_real_model(records):
    learner = OnlineLearner(buffer=MemoryBuffer(), refit_every=10_000, min_records=50)
    assert not learner.predictor.trained
    for record in records[:150]:
        await learner.add(record)
    learner.trigger()
    await learner.wait_refit()
    assert learner.predictor.trained and learner.last_error is None
    p = learner.predict(chat(AGENTS["coder"][0], "Implement a habit tracker in Python with 2 functions."))
    assert p.role == "coder" and p.p50 <= p.p90


async def test_file_buffer_is_bounded_and_survives_restart(tmp_path):
    path = tmp_path / "traces.jsonl"
    buffer = FileTraceBuffer(path, maxlen=10, flush_every=3)
    usage = {"prompt_tokens": 3}
    for i in range(35):
        await buffer.append(make_record(chat("s", "q"), dict(usage, completion_tokens=i)))
    snapshot = await buffer.snapshot()
    assert [r["usage"]["completion_tokens"] for r in snapshot] == list(range(25, 35))
    assert len(path.read_bytes().splitlines()) <= 20  # compacted to at most twice the bound
    await buffer.close()
    again = FileTraceBuffer(path, maxlen=10)
    assert [r["usage"]["completion_tokens"] for r in await again.snapshot()] == list(range(25, 35))


# ------------------------------------------------------------------------------------------------ real data
@pytest.mark.skipif(not (SHARED_DATA / "chatdev-warehouse-llm-calls").exists(),
                    reason="../shared/data/chatdev-warehouse-llm-calls is not present")
def test_chatdev_held_out_by_run(tmp_path):
    """Train on ChatDev runs, evaluate on held-out runs (reads ../shared/data; skipped when absent)."""
    from predictor.importers import iter_source
    from predictor.predictor import Predictor as P

    records = list(iter_source("chatdev", SHARED_DATA / "chatdev-warehouse-llm-calls"))
    train, test = split_records(records, 0.2, seed=0)
    predictor = P.from_state(fit_state(train), default_max_tokens=4096)
    report = evaluate_records(predictor, test)
    assert report["role"]["macro_f1"] >= 0.9
    assert report["length"]["mae_reduction_vs_role_mean"] >= 0.3
    assert 0.8 <= report["length"]["p90_coverage"] <= 0.99
    assert report["kv"]["under_reservation_rate"] <= 0.15


@pytest.mark.redis
async def test_redis_stream_buffer_is_bounded_and_shared(redis_trace_stream):
    from predictor.trace_buffers import RedisStreamBuffer

    client, key = redis_trace_stream
    writer, reader = RedisStreamBuffer(client, key, maxlen=50), RedisStreamBuffer(client, key, maxlen=50)
    for i in range(300):
        await writer.append(make_record(chat("s", "q"), {"prompt_tokens": 3, "completion_tokens": i}))
    seen = [r["usage"]["completion_tokens"] for r in await reader.snapshot()]
    assert seen == list(range(250, 300))  # the latest maxlen, in order, from another buffer object
    assert await client.xlen(key) < 300     # MAXLEN ~ trims the stream itself


def test_predict_many_matches_predict(predictor, records):
    bodies = [r["request"] for r in records[:30]]
    headers = [{"X-Agent-Role": "planner"} if i % 5 == 0 else None for i in range(30)]
    assert predictor.predict_many(bodies, headers) == [predictor.predict(b, h) for b, h in zip(bodies, headers)]


@pytest.mark.parametrize("tol, solved", [(TextParams().ridge_tol, True), (1e-4, False)])
def test_length_head_is_solved_exactly(tol, solved):
    """The ridge length head must be the ridge solution, not wherever conjugate gradients stopped: at a loose
    tolerance the stopping point depends on the CPU's BLAS kernels, and so did the trained trees."""
    import scipy.sparse as sp

    from predictor.classifier import fit_length_head

    rng = np.random.default_rng(0)
    X = sp.random(400, 300, density=0.05, random_state=1, format="csr")
    log_y = X @ rng.normal(size=300) + rng.normal(scale=0.5, size=400) + 4.0
    weights = rng.uniform(0.5, 2.0, size=400)
    params = TextParams(ridge_tol=tol)
    coef, bias = fit_length_head(X, log_y, weights, params)
    residual = log_y - (X @ coef + bias)
    # gradient of sum w (y - X b - c)^2 + alpha |b|^2 over (b, c), relative to the gradient at zero
    gradient = np.append(X.T @ (weights * residual) - params.alpha * coef, np.sum(weights * residual))
    at_zero = np.append(X.T @ (weights * log_y), np.sum(weights * log_y))
    relative = np.abs(gradient).max() / np.abs(at_zero).max()
    assert (relative < 1e-8) == solved, relative


@pytest.mark.parametrize("rows, features, weighted", [(400, 300, True), (300, 800, True), (300, 800, False)])
def test_ridge_solver_is_scikit_learns_ridge(rows, features, weighted):
    """The length head's own conjugate gradients (pairwise-summed dot products, so the same bits on every CPU)
    solve scikit-learn's Ridge problem: the primal form with fewer features than rows, the dual with more."""
    import scipy.sparse as sp
    from sklearn.linear_model import Ridge

    from predictor.classifier import solve_ridge

    rng = np.random.default_rng(rows + features)
    X = sp.random(rows, features, density=0.05, random_state=2, format="csr")
    y = X @ rng.normal(size=features) + rng.normal(scale=0.5, size=rows) + 4.0
    weights = rng.uniform(0.5, 2.0, size=rows) if weighted else None
    expected = Ridge(alpha=3.0, tol=1e-12).fit(X, y, sample_weight=weights)
    coef, intercept = solve_ridge(X, y, weights, 3.0, 1e-12)
    np.testing.assert_allclose(coef, expected.coef_, rtol=0, atol=1e-10)
    assert intercept == pytest.approx(expected.intercept_, abs=1e-10)


def _reorder_runs(records: list[dict]) -> list[dict]:
    """The same records with the runs (and the sources) in reverse order, each run's calls in their own order."""
    runs: dict[tuple, list[dict]] = {}
    for record in records:
        runs.setdefault((record["source"], record["workflow"]["id"]), []).append(record)
    return [record for key in reversed(list(runs)) for record in runs[key]]


def test_training_does_not_depend_on_record_order(records):
    """Boosting sums over rows in order, so without a canonical order the files' order leaks into the model
    (on the real traces it moved ChatDev's held-out coverage by 1.4 points); same records, same model."""
    mixed = records + synthetic_records(12, seed=1, source="other")
    forward = fit_state(mixed, FAST)
    backward = fit_state(_reorder_runs(mixed), FAST)
    assert np.array_equal(forward["length_model"]["offsets"], backward["length_model"]["offsets"])
    for key in ("value", "threshold", "feature"):
        assert np.array_equal(forward["length_model"]["forest"][key], backward["length_model"]["forest"][key])
    assert forward["priors"] == backward["priors"] and forward["baselines"] == backward["baselines"]


def test_vocabulary_cut_takes_tied_terms_alphabetically():
    """Terms tied in document frequency at the ``max_features`` cut are taken in alphabetical order.
    scikit-learn's own cut leaves ties in whatever order numpy's default sort gives, and that depends on the
    CPU's SIMD kernels: the same traces gave a different vocabulary, and model, on different machines."""
    from sklearn.feature_extraction.text import CountVectorizer, TfidfVectorizer

    from predictor.classifier import fit_vocabulary
    from predictor.features import ANALYZERS

    rng = random.Random(0)
    documents: list[list[str]] = [["alpha", "beta"] for _ in range(12)]
    for word in (f"w{i:04d}" for i in range(300)):  # in 2-4 texts: ~100 words tied at each frequency
        for document in rng.sample(documents, rng.randint(2, 4)):
            document.append(word)
    texts = [" ".join(words) for words in documents]
    params = TextParams(max_features=100, min_df=2)
    terms, idf = fit_vocabulary(texts, "word", params)

    counts = CountVectorizer(analyzer=ANALYZERS["word"], min_df=2, binary=True).fit(texts)
    frequency = dict(zip(counts.get_feature_names_out(), counts.transform(texts).getnnz(axis=0)))
    expected = sorted(sorted(frequency, key=lambda term: (-frequency[term], term))[:100])
    assert terms == expected and {"alpha", "beta", "alpha beta"} <= set(terms)
    same_terms = TfidfVectorizer(analyzer=ANALYZERS["word"], vocabulary=terms, binary=True).fit(texts)
    # scikit-learn's idf up to the last bit (np.log's AVX-512 kernel may round differently from math.log)
    np.testing.assert_allclose(idf, same_terms.idf_, rtol=4e-16, atol=0)
    scikit_cut = TfidfVectorizer(analyzer=ANALYZERS["word"], min_df=2, max_features=100, binary=True).fit(texts)
    # the same frequencies kept; only the tied terms may differ
    np.testing.assert_allclose(sorted(scikit_cut.idf_), sorted(idf), rtol=4e-16, atol=0)


def test_idf_is_the_c_librarys_log():
    """The idf weights are ln((1 + n) / (1 + df)) + 1 with math.log, whatever SIMD kernels numpy has."""
    from predictor.classifier import smooth_idf

    frequency = np.array([1, 2, 3, 7, 12, 12])
    want = [math.log(13 / (df + 1)) + 1.0 for df in frequency.tolist()]
    assert smooth_idf(frequency, 12).tolist() == want


def test_a_refusal_part_counts_as_text_in_the_prompt():
    """vLLM's chat parser puts a ``refusal`` part's text in the prompt like a text part's; counted as nothing,
    a long refusal in the history made the prompt (and the KV reservation) too small."""
    from predictor.features import content_text
    from predictor.tokens import content_tokens, estimate_tokens

    text = "I can't help with that request, because " * 40
    assert content_tokens([{"type": "refusal", "refusal": text}]) == estimate_tokens(text)
    assert content_text([{"type": "refusal", "refusal": text}]) == text
    assert content_tokens([{"type": "input_audio", "input_audio": {"data": "AAAA" * 1000, "format": "wav"}}]) == 0
    as_parts = Predictor.from_priors().predict(
        {"model": "m", "messages": [{"role": "user", "content": "hi"},
                                    {"role": "assistant", "content": [{"type": "refusal", "refusal": text}]}]})
    as_string = Predictor.from_priors().predict(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": text}]})
    assert as_parts.prompt_tokens == as_string.prompt_tokens


def test_predict_many_refuses_headers_that_do_not_match_the_bodies():
    bodies = [{"model": "m", "messages": [{"role": "user", "content": f"q{i}"}]} for i in range(3)]
    with pytest.raises(ValueError, match="3 bodies but 1 headers"):
        Predictor.from_priors().predict_many(bodies, [{"X-Agent-Role": "coder"}])
    assert len(Predictor.from_priors().predict_many(bodies, [None, None, None])) == 3


def test_p90_is_never_below_p50_when_the_quantile_models_cross(state):
    """The p50 and p90 forests are fitted apart and may cross (a trained model's raw p90 is under its p50 on
    about 0.7 % of real requests): the prediction lifts p90 to p50, so a reservation never covers less than the
    median."""
    predictor = Predictor.from_state(state)  # its own length model, changed below
    predictor.length_model.predict_tokens = lambda row, stratum=0: np.array([500.0, 300.0])
    prediction = predictor.predict(chat("You are a programmer.", "write a parser"))
    assert (prediction.p50, prediction.p90) == (500, 500)
    bounded = predictor.predict(dict(chat("You are a programmer.", "write a parser"), max_tokens=400))
    assert (bounded.p50, bounded.p90) == (400, 400)
    # a quantile between two token counts: the p50 is the nearer count, the p90 is rounded up (a reservation a
    # token short of its quantile covers less than nine requests in ten)
    predictor.length_model.predict_tokens = lambda row, stratum=0: np.array([120.4, 300.2])
    prediction = predictor.predict(chat("You are a programmer.", "write a parser"))
    assert (prediction.p50, prediction.p90) == (120, 301)


def test_huge_lists_in_a_body_are_read_up_to_a_bound_and_scaled():
    """A client may send 65,000 content parts, 87,000 tool calls or 130,000 messages within the body limit; each
    cost a Python call in the token estimate (75 ms on the event loop at 256 KiB, 1.2-1.8 s at 4 MiB). Past
    the bound the items read stand for the rest, which for identical items is the exact figure."""
    from predictor.features import BASE_FEATURES, MESSAGES_READ, parse_request
    from predictor.tokens import (ITEMS_READ, content_tokens, estimate_single_message_tokens, tool_call_tokens,
                                  unread_floor)

    class Unread(dict):  # an item past the bound: reading it fails the test
        def get(self, key, default=None):
            if key == "role":  # the messages between the first and the last read are counted by role
                return super().get(key, default)
            raise AssertionError(f"read {key!r} of an item past the bound")

    past = [Unread(type="text", text="x")] * ITEMS_READ
    assert content_tokens(["ab"] * (ITEMS_READ * 5)) == 5 * content_tokens(["ab"] * ITEMS_READ)
    read = content_tokens(["ab"] * ITEMS_READ)
    assert content_tokens(["ab"] * ITEMS_READ + past) == max(2 * read, read + unread_floor(past))
    assert tool_call_tokens({"tool_calls": [{"function": {"name": "f"}}] * ITEMS_READ + past}) > 0
    middle = [Unread(role="user", content="x")] * MESSAGES_READ
    ends = [{"role": "user", "content": "a"}] * (MESSAGES_READ // 2)
    assert parse_request({"model": "m", "messages": ends + middle + ends}).user == "a"
    text_part = {"type": "text", "text": "x"}  # one token each; its JSON's floor is 4
    assert content_tokens([text_part] * (ITEMS_READ + 1)) == ITEMS_READ + unread_floor([text_part])
    call = {"function": {"name": "f", "arguments": "{}"}}
    one = tool_call_tokens({"tool_calls": [call]})
    assert tool_call_tokens({"tool_calls": [call] * (ITEMS_READ * 3)}) == max(
        3 * ITEMS_READ * one, ITEMS_READ * one + unread_floor([call] * (ITEMS_READ * 2)))

    turns = [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello"}]
    messages = turns * (MESSAGES_READ * 2) + [{"role": "user", "content": "the last question"}]
    view = parse_request({"model": "m", "messages": messages})
    features = dict(zip(BASE_FEATURES[len(BASE_FEATURES) - len(view.numeric) - 1:], view.numeric))
    assert features["n_messages"] == len(messages)
    assert (features["n_user"], features["n_assistant"]) == (MESSAGES_READ * 2 + 1, MESSAGES_READ * 2)
    assert view.user == "the last question"
    exact = 3 + sum(estimate_single_message_tokens(m) for m in messages)  # reply priming + every message
    assert exact <= view.prompt_tokens <= 1.2 * exact  # the middle's JSON floor may read small messages high
    small = parse_request({"model": "m", "messages": turns * 8})  # within the bound: every message read
    assert small.prompt_tokens == 3 + 8 * sum(estimate_single_message_tokens(m) for m in turns)

    # bulk hidden past the bounds is not read as the items read: their size is a floor (a 3 MB part after
    # 1,024 one-letter ones was 1,025 tokens for 584,000: a tiny reservation and a place in the queue's front)
    bulk = "word " * 600_000
    assert content_tokens(["a"] * ITEMS_READ + [bulk]) >= 0.8 * (ITEMS_READ + content_tokens([bulk]))
    hidden = [{"role": "user", "content": "a"}] * (MESSAGES_READ // 2)
    view = parse_request({"model": "m", "messages": hidden + [{"role": "user", "content": bulk}] + hidden})
    assert view.prompt_tokens >= 0.8 * estimate_single_message_tokens({"role": "user", "content": bulk})
    # the latest user turn, when the last messages read hold none, is the middle's last
    tail = [{"role": "assistant", "content": "b"}] * (MESSAGES_READ // 2)
    asked = [{"role": "user", "content": "the real question"}]
    assert parse_request({"model": "m", "messages": hidden + asked + tail}).user == "the real question"
    odd = [{"role": ["not", "a", "role"], "content": "a"}] * (MESSAGES_READ + 1)  # any JSON as a role
    assert parse_request({"model": "m", "messages": odd}).prompt_tokens > MESSAGES_READ
