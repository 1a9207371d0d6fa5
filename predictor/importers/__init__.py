"""Importers: third-party agent logs -> trace records (:mod:`predictor.trace`).

``import_source(name, in_path, out_path)`` streams one source into a ``.jsonl`` / ``.jsonl.gz`` file and returns
a summary (rows read, records written, skips by reason, role counts). ``iter_source(name, in_path)`` yields the
records without writing. Sources (``SOURCES``):

==============  ==========================================  ====================================================
name            input (file, or the folder holding it)       one record per
==============  ==========================================  ====================================================
chatdev         chatdev_llm_calls.jsonl.gz                   logged ChatDev call (real token counts)
who-and-when    who_and_when_tasks.jsonl.gz                  agent message that is an LLM call, both subsets
ag2             the same file, Algorithm-Generated only      AG2 CaptainAgent expert message
magentic-one    the same file, Hand-Crafted only             Magentic-One agent / orchestrator call
tau-bench       gpt-4o-airline.json(.gz)                     assistant message (prompt = the messages before it)
toolbench       toolbench_dfs_llm_calls.jsonl.gz             logged ToolBench call
alpaca-eval     selected_models_outputs.jsonl.gz             (instruction, model) output; needs instructions.jsonl.gz
==============  ==========================================  ====================================================

Agent roles come from ``predictor/roles.yaml`` (:class:`RoleMap`), never from code. Where a source has no token
counts they are estimated with :func:`predictor.tokens.estimate_tokens` and the record carries ``"estimated": true``.
Malformed input rows are skipped and counted, never fatal (an input file that cannot be read at all, such as a
truncated ``.gz``, is: :class:`InputFormatError`). The third-party data is read in place; nothing of it is copied
into the repository.
"""

from __future__ import annotations

import fnmatch
import gzip
import importlib
import io
import itertools
import re
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from predictor.role_labels import ROLES_YAML, RolesFileError, expect_mapping, read_roles_yaml
from predictor.trace import ROLES, same_file, write_records


# name -> (module, generator function, keyword arguments). Modules are imported on first use.
_REGISTRY: dict[str, tuple[str, str, dict[str, Any]]] = {
    "chatdev": ("predictor.importers.chatdev", "iter_records", {}),
    "who-and-when": ("predictor.importers.who_and_when", "iter_records", {}),
    "ag2": ("predictor.importers.who_and_when", "iter_records", {"subset": "ag2"}),
    "magentic-one": ("predictor.importers.who_and_when", "iter_records", {"subset": "magentic-one"}),
    "tau-bench": ("predictor.importers.tau_bench", "iter_records", {}),
    "toolbench": ("predictor.importers.toolbench", "iter_records", {}),
    "alpaca-eval": ("predictor.importers.alpaca_eval", "iter_records", {}),
}
SOURCES: tuple[str, ...] = tuple(_REGISTRY)


class UnknownSourceError(KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "unknown source"


class InputNotFoundError(FileNotFoundError):
    """The input file (or the expected file inside the given folder) does not exist."""


class OutputIsInputError(ValueError):
    """OUT names the very file the import would read: writing it would replace the trace with what was made of it
    (nothing at all, where the source was wrong)."""


class InputFormatError(ValueError):
    """The input file cannot be read as what it claims to be: a truncated or corrupt ``.gz`` (a download cut short,
    a log copied while it was written), or a JSON document that is not valid JSON. Unlike a malformed row, which
    is skipped and counted, the rest of such a file cannot be trusted, so the import stops and writes nothing."""


# what gzip raises for a file that ends early or is not gzip at all
_GZIP_ERRORS = (EOFError, gzip.BadGzipFile, zlib.error)


# ---------------------------------------------------------------------------------------------- statistics

@dataclass
class ImportStats:
    """Counts an importer keeps while it streams; ``summary()`` is what ``import_source`` returns."""

    source: str
    read: int = 0                    # input rows (lines, tasks, trajectories) read
    messages: int = 0                # candidate messages looked at (multi-call rows)
    written: int = 0
    skipped: Counter = field(default_factory=Counter)
    roles: Counter = field(default_factory=Counter)
    estimated: int = 0
    tool_rendered: int = 0
    templated: int = 0

    def skip(self, reason: str, count: int = 1) -> None:
        self.skipped[reason] += count

    def emit(self, record: dict[str, Any]) -> dict[str, Any]:
        self.written += 1
        self.roles[record.get("agent_role")] += 1
        if record.get("estimated"):
            self.estimated += 1
        if (record.get("meta") or {}).get("tool_rendered_output"):
            self.tool_rendered += 1
        if (record.get("meta") or {}).get("templated_output"):
            self.templated += 1
        return record

    def summary(self) -> dict[str, Any]:
        return {
            "source": self.source, "read": self.read, "messages": self.messages, "written": self.written,
            "skipped": dict(sorted(self.skipped.items())), "skipped_total": sum(self.skipped.values()),
            "roles": {str(role): count for role, count in self.roles.most_common()},
            "estimated": self.estimated, "tool_rendered": self.tool_rendered, "templated": self.templated,
        }


# ---------------------------------------------------------------------------------------------- input helpers

def resolve_input(in_path: str | Path, candidates: tuple[str, ...]) -> Path:
    """``in_path`` itself when it is a file, else the first of ``candidates`` inside that folder."""
    path = Path(in_path)
    if path.is_file():
        return path
    if path.is_dir():
        for name in candidates:
            if (path / name).is_file():
                return path / name
        raise InputNotFoundError(f"{path}: none of {', '.join(candidates)} in this folder")
    raise InputNotFoundError(f"{path}: no such file or folder")


def open_binary(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def iter_jsonl(path: Path, stats: ImportStats) -> Iterator[dict[str, Any]]:
    """Objects of a ``.jsonl(.gz)`` file; a line that is not a JSON object is counted in ``malformed_json``.

    Raises :class:`InputFormatError` where a ``.gz`` file turns out truncated or corrupt."""
    with open_binary(path) as handle:
        try:
            for line in io.BufferedReader(handle) if isinstance(handle, gzip.GzipFile) else handle:
                line = line.strip()
                if not line:
                    continue
                stats.read += 1
                try:
                    obj = orjson.loads(line)
                except orjson.JSONDecodeError:
                    stats.skip("malformed_json")
                    continue
                if not isinstance(obj, dict):
                    stats.skip("malformed_json")
                    continue
                yield obj
        except _GZIP_ERRORS as exc:
            raise InputFormatError(f"{path}: not a readable gzip file ({exc})") from None


def load_json(path: Path) -> Any:
    """The JSON document in ``path`` (``.gz`` or not); :class:`InputFormatError` where it cannot be read."""
    with open_binary(path) as handle:
        try:
            data = handle.read()
        except _GZIP_ERRORS as exc:
            raise InputFormatError(f"{path}: not a readable gzip file ({exc})") from None
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise InputFormatError(f"{path}: not valid JSON ({exc})") from None


def text_of(value: Any) -> str | None:
    """A message text as a string (None stays None; lists of parts are joined)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = [p.get("text", "") if isinstance(p, dict) else str(p) for p in value]
        return "".join(p for p in parts if isinstance(p, str))
    return str(value)


_NAME_CHARS = re.compile(r"[^A-Za-z0-9_-]+")


def openai_name(name: str) -> str:
    """An agent name made valid for OpenAI's message ``name`` (``^[A-Za-z0-9_-]{1,64}$``)."""
    return _NAME_CHARS.sub("_", name).strip("_")[:64] or "agent"


# The largest count or index an importer takes from a row, as predictor.features bounds integer features: past
# 2**53 a number is no longer exact as a float, and a float such as 1e300 would otherwise become a 300-digit int
# that no JSON writer (orjson: 64 bits) can write. Such a value is no count; the row is malformed.
COUNT_LIMIT = 2**53

# What converting a row of an unexpected shape raises (a field of the wrong JSON type somewhere the importer did
# not check). Each importer catches these around its per-row (or per-message) conversion and counts the row as
# malformed, so one odd row never ends an import of thousands.
MALFORMED_ROW_ERRORS = (TypeError, ValueError, AttributeError)


def nonneg_int(value: Any) -> int | None:
    """A count or index from a JSON value: an integer (or integral float) from 0 to :data:`COUNT_LIMIT`, else
    None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if 0 <= value <= COUNT_LIMIT else None
    if isinstance(value, float) and value.is_integer() and 0 <= value <= COUNT_LIMIT:
        return int(value)
    return None


# ---------------------------------------------------------------------------------------------- role map

@dataclass(frozen=True)
class RoleDecision:
    """What roles.yaml says about one message: a role, or a skip reason (not an LLM call)."""

    role: str | None
    skip: str | None = None
    rule: str = "default"
    tool_rendered: bool = False
    templated: bool = False  # the logged text wraps the model's output in a template and copied text


@dataclass(frozen=True)
class _Rule:
    kind: str                        # name | glob | regex | any
    pattern: str
    matcher: Callable[[str], bool]
    content: re.Pattern | None
    role: str | None
    skip: str | None

    def matches(self, name: str, text: str | None) -> bool:
        return _selects(self.matcher, self.content, name, text)

    def label(self) -> str:
        parts = [f"{self.kind}:{self.pattern}"] if self.kind != "any" else []
        if self.content is not None:
            parts.append(f"content:{self.content.pattern}")
        return " ".join(parts)


def _selects(matcher: Callable[[str], bool], content: re.Pattern | None, name: str, text: str | None) -> bool:
    """Whether a selector (a name matcher, and a content pattern if it has one) picks the message."""
    return matcher(name) and (content is None or (text is not None and content.search(text) is not None))


def _compile(pattern: str, where: str, what: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise RolesFileError(f"{where}: invalid {what} {pattern!r} ({exc})") from None


def _rule_list(value: Any, where: str) -> list[Any]:
    """A list of rules from roles.yaml (None: none), else :class:`RolesFileError` naming ``where``."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise RolesFileError(f"{where}: expected a list of rules, not {value!r}")
    return value


# (kind, pattern, name matcher, content pattern) of one rule
_Selector = tuple[str, str, Callable[[str], bool], re.Pattern | None]


def _selector(spec: Any, where: str) -> _Selector:
    """(kind, pattern, name matcher, content pattern) of one rule of roles.yaml; :class:`RolesFileError` (a
    ValueError, which the import reports in one line) naming the rule where it is not one: a plain string, an
    invalid regular expression."""
    if not isinstance(spec, dict):
        raise RolesFileError(f"{where}: a rule is a mapping with one of name, glob, regex or content "
                             f"(and role or skip), not {spec!r}")
    content = spec.get("content")
    content_re = _compile(content, where, "content regex") if isinstance(content, str) else None
    if "name" in spec:
        exact = str(spec["name"])
        return "name", exact, (lambda n, e=exact: n == e), content_re
    if "glob" in spec:
        pattern = str(spec["glob"]).lower()
        return "glob", pattern, (lambda n, p=pattern: fnmatch.fnmatchcase(n.lower(), p)), content_re
    if "regex" in spec:
        compiled = _compile(str(spec["regex"]), where, "regex")
        return "regex", compiled.pattern, (lambda n, c=compiled: c.search(n) is not None), content_re
    if content_re is not None:
        return "any", "", (lambda n: True), content_re
    raise RolesFileError(f"{where}: a rule needs one of name, glob, regex or content")


class RoleMap:
    """The persona -> role mapping of one source, as written in ``roles.yaml``. A mistake there (an entry of the
    wrong shape, an invalid regex, a word that is no role) is a :class:`RolesFileError` naming the entry."""

    def __init__(self, source: str, spec: dict[str, Any]):
        self.source = source
        where = f"roles.yaml sources.{source}"
        spec = expect_mapping(spec, where)
        self.spec = spec
        self.phases: dict[str, str] = {str(k): self._role(v, where)
                                       for k, v in expect_mapping(spec.get("phases"), f"{where}.phases").items()}
        self.names: dict[str, str] = {str(k): self._role(v, where)
                                      for k, v in expect_mapping(spec.get("names"), f"{where}.names").items()}
        self.default: str | None = self._role(spec.get("default", "other"), where) if spec.get("default") else None
        self.rules: list[_Rule] = []
        for index, rule in enumerate(_rule_list(spec.get("rules"), f"{where}.rules")):
            kind, pattern, matcher, content = _selector(rule, f"{where}.rules[{index}]")
            role = self._role(rule["role"], where) if "role" in rule else None
            skip = str(rule["skip"]) if "skip" in rule else None
            if (role is None) == (skip is None):
                raise RolesFileError(f"{where}.rules[{index}]: give exactly one of role or skip")
            self.rules.append(_Rule(kind, pattern, matcher, content, role, skip))
        self.tool_rendered = self._selectors(spec, "tool_rendered", where)
        self.templated = self._selectors(spec, "templated_output", where)
        self.private = frozenset(str(x) for x in (spec.get("private") or ()))
        self.model: str | None = spec.get("model")

    @staticmethod
    def _selectors(spec: dict[str, Any], key: str, where: str) -> list[_Selector]:
        return [_selector(rule, f"{where}.{key}[{index}]")
                for index, rule in enumerate(_rule_list(spec.get(key), f"{where}.{key}"))]

    @staticmethod
    def _role(value: Any, where: str) -> str:
        if value not in ROLES:
            raise RolesFileError(f"{where}: {value!r} is not a role ({', '.join(ROLES)})")
        return value

    def resolve(self, name: str | None, text: str | None = None, phase: str | None = None) -> RoleDecision:
        """The role of a call by agent ``name`` (``text``: the message, for content rules; ``phase``: ChatDev)."""
        name = name or ""
        rendered, templated = (any(_selects(m, c, name, text) for _, _, m, c in selectors)
                               for selectors in (self.tool_rendered, self.templated))
        if phase is not None and phase in self.phases:
            return RoleDecision(self.phases[phase], rule=f"phase:{phase}", tool_rendered=rendered,
                                templated=templated)
        for rule in self.rules:
            if rule.matches(name, text):
                call = rule.skip is None
                return RoleDecision(rule.role, rule.skip, rule.label(), rendered and call, templated and call)
        if name in self.names:
            return RoleDecision(self.names[name], rule=f"name:{name}", tool_rendered=rendered, templated=templated)
        return RoleDecision(self.default, rule="default", tool_rendered=rendered, templated=templated)

    def role_of(self, name: str | None, phase: str | None = None) -> str | None:
        """Just the role (skips resolve to None): for callers that only have a persona label."""
        return self.resolve(name, None, phase).role


def load_role_map(source: str, path: str | Path | None = None) -> RoleMap:
    """The :class:`RoleMap` of ``source`` from ``roles.yaml`` (or ``path``); :class:`RolesFileError` (a
    ValueError: the import reports it in one line and writes nothing) where the file has no entry for it."""
    where = str(path or ROLES_YAML)
    spec = read_roles_yaml(where)["sources"].get(source)
    if spec is None:
        raise RolesFileError(f"{where}: no entry sources.{source} (the roles of the {source} importer)")
    return RoleMap(source, spec)


# ---------------------------------------------------------------------------------------------- records

def make_record(*, source: str, model: str, messages: list[dict[str, Any]], prompt_tokens: int,
                completion_tokens: int, role: str | None, workflow: dict[str, Any] | None,
                estimated: bool, meta: dict[str, Any], max_tokens: int | None = None,
                tools: list[Any] | None = None) -> dict[str, Any]:
    request: dict[str, Any] = {"model": model, "messages": messages}
    if max_tokens is not None:
        request["max_tokens"] = max_tokens
    if tools:
        request["tools"] = tools
    record: dict[str, Any] = {
        "request": request,
        "usage": {"prompt_tokens": int(prompt_tokens), "completion_tokens": int(completion_tokens)},
        "agent_role": role,
        "workflow": workflow,
        "source": source,
    }
    if estimated:
        record["estimated"] = True
    record["meta"] = meta
    return record


# ---------------------------------------------------------------------------------------------- registry

def _importer(name: str) -> tuple[Callable[..., Iterator[dict[str, Any]]], dict[str, Any]]:
    if name not in _REGISTRY:
        raise UnknownSourceError(f"unknown source {name!r}; known sources: {', '.join(SOURCES)}")
    module_name, function, kwargs = _REGISTRY[name]
    return getattr(importlib.import_module(module_name), function), kwargs


def iter_source(name: str, in_path: str | Path, stats: ImportStats | None = None,
                limit: int | None = None) -> Iterator[dict[str, Any]]:
    """Stream the records of source ``name`` read from ``in_path`` (at most ``limit``)."""
    function, kwargs = _importer(name)
    stats = stats if stats is not None else ImportStats(name)
    records = function(in_path, stats, **kwargs)
    return itertools.islice(records, limit) if limit is not None else records


def import_source(name: str, in_path: str | Path, out_path: str | Path, limit: int | None = None,
                  progress: Callable[[ImportStats], None] | None = None,
                  progress_every: int = 1000) -> dict[str, Any]:
    """Import ``in_path`` as source ``name`` into ``out_path`` (``.jsonl`` or ``.jsonl.gz``); return the summary.

    Raises :class:`UnknownSourceError` for an unknown name, :class:`InputNotFoundError` for a missing input and
    :class:`OutputIsInputError` where ``out_path`` is the input file, all before anything is written, and
    :class:`InputFormatError` for an input that turns out unreadable (a truncated ``.gz``) however far in, or
    that holds no record of this source at all (every row skipped): ``out_path`` is written whole or not at all
    (see ``write_records``).
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, not {limit}")
    function, kwargs = _importer(name)
    refuse_output_over_input(name, in_path, out_path)
    stats = ImportStats(name)
    started = time.perf_counter()
    if limit == 0:
        # The input is still opened (a missing or unreadable file is an error whatever the limit), by an importer
        # that keeps its own counts: it makes, and counts, its first record to get there, and that record is not
        # written, so the summary counts nothing (the stream below is primed with the first record, which is
        # counted: with a limit of 0 it would be a written record that never reaches OUT).
        probe = function(in_path, ImportStats(name), **kwargs)
        next(probe, None)
        probe.close()
        records: Iterator[dict[str, Any]] = iter(())
    else:
        records = function(in_path, stats, **kwargs)
    first = next(records, None)  # opens the input: a missing file fails here, before OUT is created
    if first is None and limit != 0:
        raise InputFormatError(no_records_message(name, in_path, stats))
    stream = itertools.chain([] if first is None else [first], records)
    if limit is not None:
        stream = itertools.islice(stream, limit)
    if progress is not None:
        stream = _with_progress(stream, stats, progress, progress_every)
    write_records(out_path, stream)
    summary = stats.summary()
    summary.update(input=str(in_path), output=str(out_path), seconds=round(time.perf_counter() - started, 2))
    return summary


def input_files(name: str, in_path: str | Path) -> list[Path]:
    """Every file source ``name`` reads from ``in_path``, as its module declares them (``input_files(in_path)``
    in each importer, which its ``iter_records`` reads through too: AlpacaEval reads the instructions beside
    the model outputs, not only the file IN names). Raises :class:`InputNotFoundError` where one is missing."""
    if name not in _REGISTRY:
        raise UnknownSourceError(f"unknown source {name!r}; known sources: {', '.join(SOURCES)}")
    return list(importlib.import_module(_REGISTRY[name][0]).input_files(in_path))


def refuse_output_over_input(name: str, in_path: str | Path, out_path: str | Path) -> None:
    """Raise :class:`OutputIsInputError` where ``out_path`` is any file source ``name`` would read from
    ``in_path`` (:func:`input_files`; the same file by any path or link). A missing input is left to the
    importer to report (it fails before OUT is written)."""
    out = Path(out_path)
    if not out.exists():
        return
    try:
        read = input_files(name, in_path)
    except InputNotFoundError:
        return
    for source_file in read:
        if same_file(source_file, out):
            raise OutputIsInputError(f"OUT {out} is the input file {source_file}; give another file name "
                                     "(the import would replace the file it reads)")


def no_records_message(name: str, in_path: str | Path, stats: ImportStats) -> str:
    """Why an import that made no record writes nothing: an input of another source, or one with no calls."""
    skipped = ", ".join(f"{reason} {n}" for reason, n in sorted(stats.skipped.items())) or "none"
    return (f"{in_path}: no {name} records in it ({stats.read} rows read; skipped: {skipped}); nothing written. "
            f"Is it a {name} trace? Sources: {', '.join(SOURCES)}")


def _with_progress(stream, stats: ImportStats, progress, every: int):
    for index, record in enumerate(stream, start=1):
        yield record
        if index % every == 0:
            progress(stats)
