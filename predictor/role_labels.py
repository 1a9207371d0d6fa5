"""Client role labels -> agent roles, as written in ``predictor/roles.yaml`` (``labels``), and the one reader of
that file (the importers read its ``sources`` through :func:`read_roles_yaml` too).

A label is what a client sends as ``X-Agent-Role`` or ``metadata.agent_role``: a role's own name, a synonym
(``labels.synonyms``), or a persona name with a word that names a role (``labels.words``, checked in order, the
more specific job first). Role mappings are data: an operator adds a framework's labels there, not in code.

The file is read when something first needs it, never at import: a missing or broken roles.yaml is then one
:class:`RolesFileError` naming the file (and the line, where YAML gives one), which the CLI reports in one line
(exit 2), and commands that map no roles (``maestro --help``, ``serve`` without a predictor) work regardless.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from predictor.trace import ROLES

ROLES_YAML = Path(__file__).resolve().parent / "roles.yaml"


class RolesFileError(ValueError):
    """roles.yaml cannot be used: it cannot be read, is not YAML, or says something that is not a role map. An
    operator's edit, not a bug, so the message names the file, the line or the entry, and no traceback is
    shown."""


@lru_cache(maxsize=8)
def read_roles_yaml(path: str) -> dict[str, Any]:
    """``roles.yaml`` (or the file at ``path``) parsed once; :class:`RolesFileError` where it cannot be used."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle) or {}
    except OSError as exc:
        raise RolesFileError(f"{path}: cannot read the role map ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise RolesFileError(f"{path}: the role map is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f", line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).replace("\n", " ")
        raise RolesFileError(f"{path}{line}: the role map is not valid YAML ({problem})") from None
    if not isinstance(data, dict) or not isinstance(data.get("sources"), dict):
        raise RolesFileError(f"{path}: expected a top-level 'sources' mapping")
    return data


def _role(value: Any, where: str) -> str:
    if value not in ROLES:
        raise RolesFileError(f"{where}: {value!r} is not one of {', '.join(ROLES)}")
    return value


def expect_mapping(value: Any, where: str) -> dict[Any, Any]:
    """``value`` where it is a mapping (None: an empty one), else :class:`RolesFileError` naming ``where`` (an
    entry of roles.yaml written as a string or a list would otherwise fail later, as an AttributeError)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RolesFileError(f"{where}: expected a mapping, not {type(value).__name__} {value!r}")
    return value


def label_rules(path: str | Path | None = None) -> tuple[dict[str, str], tuple[tuple[str, frozenset[str]], ...]]:
    """(synonyms: label -> role, words: (role, words) in the order they are checked) from ``labels``.

    Raises :class:`RolesFileError` (naming the file and the entry) where the file or its ``labels`` cannot be
    used. :func:`predictor.features.role_label_rules` keeps the result of the first call."""
    where = str(path or ROLES_YAML)
    labels = expect_mapping(read_roles_yaml(where).get("labels"), f"{where}: labels")
    synonyms = {str(label).lower(): _role(role, f"{where}: labels.synonyms.{label}")
                for label, role in expect_mapping(labels.get("synonyms"), f"{where}: labels.synonyms").items()}
    rules = labels.get("words") or ()
    if not isinstance(rules, list):
        raise RolesFileError(f"{where}: labels.words: expected a list of {{role, words}}, not {rules!r}")
    words = []
    for index, rule in enumerate(rules):
        rule = expect_mapping(rule, f"{where}: labels.words[{index}]")
        names = rule.get("words") or ()
        if not isinstance(names, list):
            raise RolesFileError(f"{where}: labels.words[{index}].words: expected a list, not {names!r}")
        words.append((_role(rule.get("role"), f"{where}: labels.words[{index}]"),
                      frozenset(str(word).lower() for word in names)))
    return synonyms, tuple(words)
