"""Model files: skops archives (no pickle) of plain dicts, lists, strings, numbers and numpy arrays.

A file carries its format version and the *feature specification* of the code that wrote it (feature names,
text blocks and windows, and a fingerprint of the token estimator). Loading refuses a file whose version or
specification differs from the running code's, with a message saying what differs, instead of silently
predicting from features computed another way.

Reading does not need skops itself: for files made only of those plain types (all files this code writes),
:func:`read_plain` walks the archive's ``schema.json`` and loads the ``.npy`` members with
``allow_pickle=False``, constructing nothing but dicts, lists, JSON scalars and arrays. That keeps a model
load in a few milliseconds instead of the ~1 s that importing skops (and scikit-learn) costs a fresh
process. Any other file goes through ``skops.io.load`` with no extra trusted types.
"""

from __future__ import annotations

import io
import json
import zipfile
import zlib
from pathlib import Path
from typing import Any

from predictor import features
from predictor.tokens import estimate_message_tokens, estimate_tokens
from predictor.trace import PLAIN_FILE_MODE

FORMAT = "maestro-predictor"
FORMAT_VERSION = 2  # 2: conformal offsets in tokens (1: in log1p space; same arrays, other meaning)


_FILE_MODE = PLAIN_FILE_MODE  # (the name tests and older callers import)

# Fixed probes of the token estimator: if it changes, prompt-token features change meaning.
_TOKEN_PROBES = ("", "hello", "The quick brown fox jumps over the lazy dog. " * 7, "def f(x):\n    return x ** 2\n",
                 "数据 " * 11)


class ModelFileError(ValueError):
    """The file is not a usable predictor model for this code (wrong format, version or features)."""


def feature_spec() -> dict[str, Any]:
    """What the running code computes as features; must equal the spec stored in a model file."""
    return {
        "base_features": list(features.BASE_FEATURES),
        "text_blocks": [list(block) for block in features.TEXT_BLOCKS],
        "windows": {"system_chars": features.SYSTEM_CHARS, "user_head_chars": features.USER_HEAD_CHARS,
                    "user_tail_chars": features.USER_TAIL_CHARS, "char_ngram_chars": features.CHAR_NGRAM_CHARS},
        "token_probes": [estimate_tokens(text) for text in _TOKEN_PROBES]
                        + [estimate_message_tokens([{"role": "user", "content": _TOKEN_PROBES[2]}])],
    }


def _diff(expected: Any, found: Any, path: str = "") -> str | None:
    if isinstance(expected, dict) and isinstance(found, dict):
        for key in sorted(set(expected) | set(found)):
            if key not in found:
                return f"{path}{key}: missing in the file"
            if key not in expected:
                return f"{path}{key}: unknown to this code"
            difference = _diff(expected[key], found[key], f"{path}{key}.")
            if difference:
                return difference
        return None
    if isinstance(expected, (list, tuple)) and isinstance(found, (list, tuple)):
        if len(expected) != len(found):
            return f"{path.rstrip('.') or 'the list'}: {len(found)} entries in the file, {len(expected)} in this code"
        for index, (a, b) in enumerate(zip(expected, found)):
            difference = _diff(a, b, f"{path}{index}.")
            if difference:
                return difference
        return None
    if expected != found:
        return f"{path.rstrip('.')}: file has {found!r}, this code has {expected!r}"
    return None


def check_state(state: Any, source: str = "model") -> dict[str, Any]:
    """Raise :class:`ModelFileError` unless ``state`` is a predictor model this code can use."""
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ModelFileError(f"{source}: not a Maestro predictor model file")
    version = state.get("format_version")
    if version != FORMAT_VERSION:
        raise ModelFileError(f"{source}: model format version {version!r}, this code reads version "
                             f"{FORMAT_VERSION}; retrain with `maestro predictor train`")
    difference = _diff(feature_spec(), state.get("feature_spec"))
    if difference:
        raise ModelFileError(f"{source}: the model's features do not match this code ({difference}); "
                             "retrain with `maestro predictor train`")
    for part in ("text_model", "length_model"):  # without one it would serve priors or "other" unannounced
        if not isinstance(state.get(part), dict):
            raise ModelFileError(f"{source}: the model file has no {part}; retrain with `maestro predictor train`")
    vocab = state.get("model_vocab") or []
    expected = features.feature_names(vocab)
    if state.get("features") != expected:
        raise ModelFileError(f"{source}: the model's feature list does not match this code "
                             f"({_diff(expected, state.get('features'))}); retrain the model")
    _check_offsets(state["length_model"], len(vocab) + 1, source)
    return state


def _check_offsets(length_state: Any, model_slots: int, source: str) -> None:
    """Calibration cells must be one per role (older files) or one per (role, model slot), in one block, or in
    two where requests without a workflow step have their own (``context_blocks``, see LengthModel)."""
    import numpy as np

    from predictor.trace import ROLES

    slots = length_state.get("model_slots", 1) if isinstance(length_state, dict) else None
    blocks = length_state.get("context_blocks", 1) if isinstance(length_state, dict) else None
    offsets = np.atleast_2d(length_state.get("offsets")) if isinstance(length_state, dict) else None
    if (slots not in (1, model_slots) or blocks not in (1, 2) or offsets is None
            or offsets.shape[0] not in (1, blocks * len(ROLES) * slots)):
        raise ModelFileError(f"{source}: the length model's calibration cells do not match its roles and model "
                             "names; retrain with `maestro predictor train`")


def save_state(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` with skops, atomically (:func:`~predictor.trace.write_bytes_atomically`: the archive is
    built in memory, about a megabyte, then written beside ``path`` and renamed over it, readable by other users
    such as a gateway container or CI)."""
    import skops.io as sio

    from predictor.trace import write_bytes_atomically

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    archive = io.BytesIO()
    sio.dump(state, archive, compression=zipfile.ZIP_DEFLATED, compresslevel=6)
    write_bytes_atomically(path, (archive.getvalue(),))
    return path


SKOPS_PROTOCOL = 2  # the skops archive protocol read_plain understands
MAX_UNPACKED_BYTES = 256 * 2**20  # a model file's members unpacked (ours: a few MB; the issue caps files at 20 MB)


class _NotPlain(Exception):
    pass


def read_plain(path: str | Path) -> Any:
    """Read a skops archive made only of dicts (str keys), lists, JSON scalars and numpy arrays.

    Raises ``_NotPlain`` for anything else (another protocol, other node types), so the caller can fall back
    to ``skops.io.load``; raises ``zipfile.BadZipFile`` / ``KeyError`` / ``ValueError`` for files that are not
    skops archives, including a ``schema.json`` that is JSON but not the shape skops writes (a list or a string
    at the top, a dict node whose content is not an object): every node is a JSON object.
    """
    import numpy as np

    with zipfile.ZipFile(path) as archive:
        # zipfile reads no member past the size its entry declares, so counting declared sizes bounds what a
        # small file (a zip bomb) can make us hold, the members named more than once in its schema counted each
        # time they are read; the largest models written are a few MB
        unpacked = sum(member.file_size for member in archive.infolist())
        if unpacked > MAX_UNPACKED_BYTES:
            raise ValueError(f"its members unpack to more than any model's {MAX_UNPACKED_BYTES:,} bytes")
        unpacked = 0

        def read(name: str) -> bytes:
            nonlocal unpacked
            unpacked += archive.getinfo(name).file_size
            if unpacked > MAX_UNPACKED_BYTES:
                raise ValueError(f"its members unpack to more than any model's {MAX_UNPACKED_BYTES:,} bytes")
            return archive.read(name)

        schema = json.loads(read("schema.json"))
        if not isinstance(schema, dict):
            kind = {list: "list", str: "string", bool: "boolean", int: "number", float: "number"}.get(
                type(schema), "null")
            raise ValueError(f"schema.json holds a JSON {kind}, not an object")
        if schema.get("protocol") != SKOPS_PROTOCOL:
            raise _NotPlain(f"skops protocol {schema.get('protocol')!r}")

        def build(node: Any) -> Any:
            loader = node.get("__loader__") if isinstance(node, dict) else None
            if loader == "JsonNode" and node.get("is_json", True):
                return json.loads(node["content"])
            if loader == "ListNode" and node.get("__class__") == "list":
                return [build(child) for child in node["content"]]
            if loader == "DictNode" and node.get("__class__") == "dict":
                key_types = node["key_types"]["content"]
                if any(t.get("__loader__") != "TypeNode" or t.get("__class__") != "str" for t in key_types):
                    raise _NotPlain("dict with non-string keys")
                return {key: build(child) for key, child in node["content"].items()}
            if loader == "NdArrayNode" and node.get("type") == "numpy":
                return np.load(io.BytesIO(read(node["file"])), allow_pickle=False)
            raise _NotPlain(f"node {loader!r} ({node.get('__module__') if isinstance(node, dict) else node!r})")

        try:
            return build(schema)
        except (AttributeError, TypeError) as exc:  # a node field of the wrong JSON type
            raise ValueError(f"schema.json has a malformed node ({exc})") from None


def load_state(path: str | Path) -> dict[str, Any]:
    """Read and check a model file; only plain types and numpy arrays are trusted."""
    path = Path(path)
    if path.is_dir():
        raise ModelFileError(f"{path} is a folder, not a model file")
    if not path.is_file():
        raise ModelFileError(f"{path}: no such model file")
    try:
        state = read_plain(path)
    except _NotPlain:
        state = _skops_load(path)
    except (zipfile.BadZipFile, KeyError, ValueError, OSError, EOFError, zlib.error, NotImplementedError,
            RecursionError) as exc:
        # zlib / EOF: a damaged member; NotImplementedError: a compression method zipfile does not know;
        # RecursionError: a schema.json nested deeper than json (or build) can follow
        raise ModelFileError(f"{path}: not a skops model file ({exc})") from None
    return check_state(state, str(path))


def _skops_load(path: Path) -> Any:
    import skops.io as sio

    try:
        untrusted = sio.get_untrusted_types(file=path)
    except Exception as exc:  # not a skops archive
        raise ModelFileError(f"{path}: not a skops model file ({exc})") from None
    if untrusted:
        raise ModelFileError(f"{path}: refusing to load untrusted types {untrusted}")
    try:
        return sio.load(path, trusted=[])
    except Exception as exc:
        raise ModelFileError(f"{path}: cannot read the model file ({exc})") from None
