"""Request features: what a gateway knows about a chat request before it runs.

One function, :func:`parse_request`, reads an OpenAI chat-completion body (plus the request headers) into a
:class:`RequestView`; everything downstream (role classifier, length model, training, evaluation, online
records) reads features from that view, so training and serving cannot drift apart. Token counts come from
:mod:`predictor.tokens`, the one character-based estimator used everywhere.

The text the models see is cut the same way at training and serving time (:data:`SYSTEM_CHARS` of the system
prompt, the head and tail of the latest user turn), which also bounds the cost of one prediction.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np
import orjson

from predictor.kv import MAX_CHOICES
from predictor.role_labels import label_rules
from predictor.tokens import (ITEMS_READ, REPLY_PRIMING, bounded_sum, estimate_completion_tokens,
                              estimate_single_message_tokens, estimate_tokens, text_of)
from predictor.trace import ROLES

# Explicit workflow context: headers first, then the OpenAI ``metadata`` object of the body.
ROLE_HEADER = "X-Agent-Role"
WORKFLOW_ID_HEADER = "X-Workflow-Id"
WORKFLOW_STEP_HEADER = "X-Workflow-Step"
ROLE_METADATA = "agent_role"
WORKFLOW_ID_METADATA = "workflow_id"
WORKFLOW_STEP_METADATA = "workflow_step"

# Text windows the text models see (characters).
SYSTEM_CHARS = 2000
USER_HEAD_CHARS = 1200
USER_TAIL_CHARS = 800
CHAR_NGRAM_CHARS = 240  # character n-grams only look at the start of each field


@cache
def role_label_rules() -> tuple[dict[str, str], tuple[tuple[str, frozenset[str]], ...]]:
    """Client role labels -> roles: (synonyms, words), data in roles.yaml's ``labels`` (predictor/role_labels.py).

    Read on first use and kept, not at import: read at import, a missing or broken roles.yaml failed every
    ``maestro`` command (``--help`` too) with a traceback; read per call, it would cost each request a file
    read. A :class:`~predictor.predictor.Predictor` calls this when it is made, so a bad file fails the load (one
    line: :class:`~predictor.role_labels.RolesFileError`), not a request. An error is not kept: the next call
    reads the file again."""
    return label_rules()


def __getattr__(name: str) -> Any:
    """``ROLE_SYNONYMS`` and ``ROLE_WORDS``, the module constants these once were, read on first use."""
    if name == "ROLE_SYNONYMS":
        return role_label_rules()[0]
    if name == "ROLE_WORDS":
        return role_label_rules()[1]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_LAST_ROLE = {"user": 0.0, "assistant": 1.0, "tool": 2.0, "function": 2.0, "system": 3.0, "developer": 3.0}
_RESPONSE_FORMAT = {"text": 0.0, "json_object": 1.0, "json_schema": 2.0}

# Numeric features of the length model, in order; the model-name one-hot columns follow them
# (``model=<name>`` for each name in the model file's vocabulary, then ``model=<other>``).
BASE_FEATURES = (
    *(f"role={r}" for r in ROLES),
    "prompt_tokens", "system_tokens", "last_user_tokens", "tools_tokens",
    "max_tokens", "n_messages", "n_user", "n_assistant", "n_tool", "workflow_step",
    "has_tools", "n_tools", "tool_choice", "response_format", "temperature",
    "last_role", "prev_assistant_tokens", "prev_assistant_tool_call",
    "user_code_fences", "user_code_chars", "user_questions", "user_lines", "system_code_fences",
    "text_length_score",
)
MODEL_OTHER = "<other>"

_LABEL_WORD = re.compile(r"[a-z0-9]+")
ROLE_LABEL_CHARS = 64  # longer labels are read up to here (the gateway's X-Agent-Role limit)


def normalize_role(value: Any) -> str | None:
    """An explicit role label as one of :data:`ROLES`: a role's name, a synonym, or a label with a word that
    names one (:func:`role_label_rules`, from roles.yaml). None for an empty label, and for one that names no
    role ("Alice", "Python_Expert"): the client gave its own name for the agent, not one of these roles, so the
    classifier decides, as it does for a request without a label (``other`` is the role only when it is said)."""
    if not isinstance(value, str):
        return None
    key = value[:ROLE_LABEL_CHARS].strip().lower().replace(" ", "_")
    if not key:
        return None
    if key in ROLES:
        return key
    synonyms, role_words = role_label_rules()
    role = synonyms.get(key) or synonyms.get(key.replace("_", ""))
    if role is not None:
        return role
    words = set(_LABEL_WORD.findall(key.replace("_", " ")))
    return next((role for role, names in role_words if words & names), None)


def header(headers: Mapping[str, str] | None, name: str) -> str | None:
    """Case-insensitive header lookup that works for plain dicts and aiohttp's CIMultiDict alike. A key that is
    not a string (a dict built in code, not an HTTP request) names no header and is skipped."""
    if not headers:
        return None
    value = headers.get(name)
    if value is None:
        lower = name.lower()
        for key, item in headers.items():
            if isinstance(key, str) and key.lower() == lower:
                return item
    return value


def content_text(content: Any) -> str:
    """The text of one message ``content`` (string, or a list of parts of which the text and refusal parts
    count, as in :func:`predictor.tokens.content_tokens`)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        if len(content) > ITEMS_READ:  # the first and the last parts: the text is cut to its head and tail
            content = content[:ITEMS_READ // 2] + content[-(ITEMS_READ // 2):]
        for part in content:
            if isinstance(part, dict):
                text = part.get("text")
                if text is None and part.get("type") == "refusal":
                    text = part.get("refusal")
                if isinstance(text, str):
                    parts.append(text)
            elif isinstance(part, str):
                parts.append(part)
        return "\n".join(parts)
    return ""


# Integers past 2**53 lose exactness as floats, and past ~1.8e308 float() raises: a feature this far out means
# nothing to the trees, so such a value counts as absent (a step, a temperature) or, for max_tokens, is clipped
# to 2**53 (still a cap that caps nothing; the cap itself is applied to the prediction as an exact integer).
_FEATURE_INT_LIMIT = 2**53
# An integer header as the gateway accepts it (gateway.api.workflow): ASCII digits only, so that str.isdigit's
# superscripts ("¹") and a long digit string (int() refuses over 4,300 digits) are not numbers here either; and
# no minus sign, as a step is never negative (the gateway refuses one).
_INTEGER_TEXT = re.compile(r"\s*\+?[0-9]{1,18}\s*")


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return math.nan
    if isinstance(value, int) and abs(value) > _FEATURE_INT_LIMIT:
        return math.nan
    return float(value)


def int_or_none(value: Any) -> int | None:
    """A workflow step (an integer >= 0) from a header or JSON value, None when it is not one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if 0 <= value <= _FEATURE_INT_LIMIT else None
    if isinstance(value, float) and value.is_integer() and 0 <= value <= _FEATURE_INT_LIMIT:
        return int(value)  # 3.0, as the gateway reads it too
    if isinstance(value, str) and _INTEGER_TEXT.fullmatch(value):
        return int(value)
    return None


def choices_of(body: Mapping[str, Any]) -> int:
    """``n``, the answers the request asks for (1 to :data:`MAX_CHOICES`; 1 where absent or not such a number)."""
    n = body.get("n")
    return n if isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= MAX_CHOICES else 1


def max_tokens_of(body: Mapping[str, Any]) -> int | None:
    """The request's output cap (``max_completion_tokens`` wins over ``max_tokens``), None when absent."""
    for key in ("max_completion_tokens", "max_tokens"):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


@dataclass(slots=True)
class RequestView:
    """A chat request reduced to what the predictor uses."""

    model: str
    system: str              # system / developer messages, joined, cut to SYSTEM_CHARS
    user: str                # latest user turn, head + tail
    context: str             # structure tokens: speaker names of recent messages, last role, tools, no system
    explicit_role: str | None
    workflow_id: str | None
    workflow_step: int | None
    max_tokens: int | None
    prompt_tokens: int       # estimated from the text (messages + tool definitions)
    numeric: list[float]     # BASE_FEATURES minus the role one-hot and the text score (filled in later)
    choices: int = 1         # ``n``: answers generated, each holding its own output's KV


def explicit_role_of(body: Mapping[str, Any], headers: Mapping[str, str] | None = None) -> str | None:
    """The caller's own role label: header ``X-Agent-Role`` first, then ``metadata.agent_role``."""
    role = normalize_role(header(headers, ROLE_HEADER))
    if role is None:
        metadata = body.get("metadata")
        if isinstance(metadata, dict):
            role = normalize_role(metadata.get(ROLE_METADATA))
    return role


def _fenced_chars(text: str) -> int:
    """Characters inside Markdown code fences (the code a reviser is likely to echo back)."""
    if "```" not in text:
        return 0
    parts = text.split("```")
    return sum(len(part) for part in parts[1::2])


_NAME_CHARS = re.compile(r"\W+")
_PREFIX = {"assistant": "a_", "user": "u_", "tool": "t_", "function": "t_", "system": "s_", "developer": "s_"}
CONTEXT_MESSAGES = 8  # speaker names are read from this many latest messages
NAME_CHARS_READ = 256  # of each name (the word keeps 40 characters of it)


def _context_tokens(messages: list[Any], has_system: bool, n_tool: int, body: Mapping[str, Any]) -> str:
    """Words that describe the conversation's shape rather than its text: who spoke recently (the OpenAI
    ``name`` of each message, prefixed by its role: ``a_`` for the calling agent's own earlier turns, ``u_``
    for peers, ``t_`` for tools), the last message's role, and whether tools or a system prompt are present."""
    words = []
    for message in messages[-CONTEXT_MESSAGES:]:
        if isinstance(message, dict):
            name = message.get("name")
            if isinstance(name, str) and name:
                role = message.get("role")
                prefix = _PREFIX.get(role, "x_") if isinstance(role, str) else "x_"
                # cut first: the name is any string the client sent, and only its start becomes a word
                words.append(prefix + _NAME_CHARS.sub("_", name[:NAME_CHARS_READ].lower()).strip("_")[:40])
    last = messages[-1] if messages and isinstance(messages[-1], dict) else {}
    last_role = last.get("role")
    # Only the roles the chat format has (and None, a message without one) name themselves: a client's
    # made-up role could be megabytes of text, read uncut into the TF-IDF words on the event loop.
    known = last_role is None or (isinstance(last_role, str) and last_role in _LAST_ROLE)
    words.append(f"last_{last_role if known else 'other'}")
    if not has_system:
        words.append("no_system")
    if n_tool:
        words.append("tool_results")
    if body.get("tools") or body.get("functions"):
        words.append("tools_offered")
    if any(isinstance(m, dict) and m.get("tool_calls") for m in messages[-CONTEXT_MESSAGES:]):
        words.append("tool_calls_made")
    return " ".join(words)


# Past this many messages, the first and the last half of them are read and the ones between counted by role,
# their tokens the mean of those read: 130,000 one-letter messages (4 MiB) cost 446 ms of the gateway's CPU, 31 ms
# on its event loop at 256 KiB. No request of the traces comes near it, so their features are unchanged.
MESSAGES_READ = 2048


def parse_request(body: Mapping[str, Any], headers: Mapping[str, str] | None = None) -> RequestView:
    """Read one OpenAI chat-completion body (and headers) into a :class:`RequestView`.

    Any field may be missing or of the wrong type (it then counts as absent); the body and headers themselves
    must be mappings, and anything else is a caller's mistake, refused with a ``TypeError`` that says so."""
    if not isinstance(body, dict) and not isinstance(body, Mapping):
        raise TypeError("a chat-completion request body must be a JSON object (a dict), "
                        f"not {type(body).__name__}")
    if headers is not None and not isinstance(headers, dict) and not isinstance(headers, Mapping):
        raise TypeError(f"request headers must be a mapping of names to values, not {type(headers).__name__}")
    messages = body.get("messages")
    if not isinstance(messages, list):
        messages = []
    metadata = body.get("metadata")
    if not isinstance(metadata, dict):
        metadata = {}

    # One pass: per-message token estimates (their sum is estimate_message_tokens(messages)) and the texts.
    system_parts: list[str] = []
    system_tokens = 0
    last_user = ""
    last_user_tokens = 0
    last_assistant = None
    last_role = math.nan
    n_user = n_assistant = n_tool = 0
    message_tokens = REPLY_PRIMING
    if len(messages) > MESSAGES_READ:
        half = MESSAGES_READ // 2
        read, skipped = messages[:half] + messages[-half:], messages[half:-half]
    else:
        read, skipped = messages, ()
    for message in read:
        if not isinstance(message, dict):
            message_tokens += estimate_single_message_tokens(message)
            continue
        tokens = estimate_single_message_tokens(message)
        message_tokens += tokens
        role = message.get("role")
        if role in ("system", "developer"):
            system_parts.append(content_text(message.get("content")))
            system_tokens += tokens
        elif role == "user":
            n_user += 1
            last_user = content_text(message.get("content"))
            last_user_tokens = tokens
        elif role == "assistant":
            n_assistant += 1
            last_assistant = message
        elif role in ("tool", "function"):
            n_tool += 1
        last_role = _LAST_ROLE.get(role, math.nan) if isinstance(role, str) else math.nan
    has_system = bool(system_parts)
    if skipped:  # the messages between the first and the last read: counted by role, their tokens the mean read
        # (not under their size: bulk may hide there)
        message_tokens = REPLY_PRIMING + bounded_sum(message_tokens - REPLY_PRIMING, len(read), skipped)
        middle_user = middle_assistant = None
        for message in skipped:
            role = message.get("role") if isinstance(message, dict) else None
            if role == "user":
                n_user += 1
                middle_user = message
            elif role == "assistant":
                n_assistant += 1
                middle_assistant = message
            elif role in ("tool", "function"):
                n_tool += 1
            elif role in ("system", "developer"):
                has_system = True
        # the latest user and assistant turns, when the last messages read hold none (a list of roles, not a set:
        # a role may be any JSON, a list too, which no set holds)
        tail_roles = [message.get("role") for message in read[len(read) // 2:] if isinstance(message, dict)]
        if middle_user is not None and "user" not in tail_roles:
            last_user = content_text(middle_user.get("content"))
            last_user_tokens = estimate_single_message_tokens(middle_user)
        if middle_assistant is not None and "assistant" not in tail_roles:
            last_assistant = middle_assistant
    context = _context_tokens(messages, has_system, n_tool, body)
    if last_assistant is None:
        prev_assistant_tokens = prev_assistant_tool_call = math.nan
    else:
        prev_assistant_tokens = float(estimate_completion_tokens(last_assistant))
        called = last_assistant.get("tool_calls") or last_assistant.get("function_call")
        prev_assistant_tool_call = 1.0 if called else 0.0
    system_full = "\n".join(system_parts)
    system = system_full[:SYSTEM_CHARS]
    if len(last_user) > USER_HEAD_CHARS + USER_TAIL_CHARS:
        user = last_user[:USER_HEAD_CHARS] + "\n" + last_user[-USER_TAIL_CHARS:]
    else:
        user = last_user

    tools = body.get("tools") or body.get("functions")
    n_tools = len(tools) if isinstance(tools, list) else 0
    tools_tokens = 0
    if n_tools:
        try:
            tools_tokens = estimate_tokens(orjson.dumps(tools).decode())
        except TypeError:  # not JSON (only possible for bodies built in code)
            tools_tokens = estimate_tokens(text_of(tools))
    tool_choice = body.get("tool_choice")
    if tool_choice is None or tool_choice == "none":
        tool_choice_code = 0.0
    elif tool_choice == "auto":
        tool_choice_code = 1.0
    else:
        tool_choice_code = 2.0
    response_format = body.get("response_format")
    if isinstance(response_format, dict):
        kind = response_format.get("type")  # any JSON: a list or an object cannot be a dict key
        response_format_code = _RESPONSE_FORMAT.get(kind, 3.0) if isinstance(kind, str) else 3.0
    else:
        response_format_code = 0.0

    prompt_tokens = message_tokens + tools_tokens
    max_tokens = max_tokens_of(body)
    step = int_or_none(header(headers, WORKFLOW_STEP_HEADER))
    if step is None:
        step = int_or_none(metadata.get(WORKFLOW_STEP_METADATA))
    workflow_id = header(headers, WORKFLOW_ID_HEADER) or metadata.get(WORKFLOW_ID_METADATA)
    model = body.get("model")

    numeric = [
        float(prompt_tokens), float(system_tokens), float(last_user_tokens),
        float(tools_tokens),
        math.nan if max_tokens is None else float(min(max_tokens, _FEATURE_INT_LIMIT)),
        float(len(messages)), float(n_user), float(n_assistant), float(n_tool),
        math.nan if step is None else float(step),
        1.0 if n_tools else 0.0, float(n_tools), tool_choice_code, response_format_code,
        _number(body.get("temperature")),
        last_role, prev_assistant_tokens, prev_assistant_tool_call,
        float(last_user.count("```")), float(_fenced_chars(last_user)), float(last_user.count("?")),
        float(last_user.count("\n") + 1 if last_user else 0),
        float(system_full.count("```")),
    ]
    return RequestView(
        model=model if isinstance(model, str) else "",
        system=system, user=user, context=context,
        explicit_role=explicit_role_of(body, headers),
        workflow_id=workflow_id if isinstance(workflow_id, str) else None,
        workflow_step=step, max_tokens=max_tokens, prompt_tokens=prompt_tokens, numeric=numeric,
        choices=choices_of(body),
    )


def feature_names(model_vocab: list[str] | tuple[str, ...]) -> list[str]:
    """The full, ordered feature list of a length model with this model-name vocabulary."""
    return [*BASE_FEATURES, *(f"model={name}" for name in model_vocab), f"model={MODEL_OTHER}"]


class FeatureAssembler:
    """Builds the length model's numeric row from a view, the chosen role and the text score."""

    def __init__(self, model_vocab: list[str] | tuple[str, ...]) -> None:
        self.model_vocab = list(model_vocab)
        self.names = feature_names(self.model_vocab)
        self._role_index = {role: i for i, role in enumerate(ROLES)}
        self._model_index = {name: i for i, name in enumerate(self.model_vocab)}
        self._n_roles = len(ROLES)
        self._n_base = len(BASE_FEATURES)
        self.width = len(self.names)

    @property
    def model_slots(self) -> int:
        """Model names with a column of their own, plus one for every other name."""
        return len(self.model_vocab) + 1

    def model_slot(self, model: str) -> int:
        return self._model_index.get(model, len(self.model_vocab))

    def row(self, view: RequestView, role: str, text_score: float, out: np.ndarray | None = None) -> np.ndarray:
        row = np.zeros(self.width) if out is None else out
        row[self._role_index.get(role, self._n_roles - 1)] = 1.0
        row[self._n_roles:self._n_base - 1] = view.numeric
        row[self._n_base - 1] = text_score
        row[self._n_base + self._model_index.get(view.model, len(self.model_vocab))] = 1.0
        return row


# ---------------------------------------------------------------------------------------------- text analysis

# scikit-learn's default token pattern is (?u)\b\w\w+\b; without the \b it finds the same tokens (a greedy run
# of word characters always ends at a boundary, and a scan only stops inside a run after a one-character word)
# and runs a third faster.
_WORD = re.compile(r"\w\w+")


def word_tokens(text: str) -> list[str]:
    """Lower-cased words of two or more word characters (scikit-learn's default token pattern)."""
    return _WORD.findall(text.lower())


def add_bigrams(tokens: list[str]) -> list[str]:
    """``tokens`` followed by their bigrams (in place)."""
    if len(tokens) > 1:
        tokens.extend(map(" ".join, zip(tokens, tokens[1:])))
    return tokens


def word_ngrams(text: str) -> list[str]:
    """Lower-cased word unigrams and bigrams (the analyzer of the word TF-IDF blocks)."""
    return add_bigrams(word_tokens(text))


def char_window(text: str) -> str:
    """The text character n-grams are read from: the first CHAR_NGRAM_CHARS characters, lower-cased,
    whitespace collapsed to one space, padded with a space on each side."""
    return " " + " ".join(text[:CHAR_NGRAM_CHARS].lower().split()) + " "


def char_ngrams(text: str) -> list[str]:
    """Character 3- and 4-grams of :func:`char_window`."""
    padded = char_window(text)
    size = len(padded)
    if size < 3:
        return []
    return [padded[i:i + 3] for i in range(size - 2)] + [padded[i:i + 4] for i in range(size - 3)]


ANALYZERS = {"word": word_ngrams, "char": char_ngrams}
# The text blocks: (name, field of RequestView, analyzer). Each block is l2-normalised on its own.
TEXT_BLOCKS = (("system_word", "system", "word"), ("user_word", "user", "word"),
               ("system_char", "system", "char"), ("context_word", "context", "word"))
