"""Client role labels -> agent roles, as written in ``predictor/roles.yaml`` (``labels``), and the one reader of
that file (the importers read its ``sources`` through :func:`read_roles_yaml` too).

A label is what a client sends as ``X-Agent-Role`` or ``metadata.agent_role``: a role's own name, a synonym
(``labels.synonyms``), or a persona name with a word that names a role (``labels.words``, checked in order, the
more specific job first). Role mappings are data: an operator adds a framework's labels there, not in code.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from predictor.trace import ROLES

ROLES_YAML = Path(__file__).resolve().parent / "roles.yaml"


@lru_cache(maxsize=8)
def read_roles_yaml(path: str) -> dict[str, Any]:
    """``roles.yaml`` (or the file at ``path``) parsed once."""
    with open(path, encoding="utf-8") as handle:
        data = yaml.safe_load(handle) or {}
    if not isinstance(data, dict) or not isinstance(data.get("sources"), dict):
        raise ValueError(f"{path}: expected a top-level 'sources' mapping")
    return data


def _role(value: Any, where: str) -> str:
    if value not in ROLES:
        raise ValueError(f"roles.yaml {where}: {value!r} is not one of {', '.join(ROLES)}")
    return value


def label_rules(path: str | Path | None = None) -> tuple[dict[str, str], tuple[tuple[str, frozenset[str]], ...]]:
    """(synonyms: label -> role, words: (role, words) in the order they are checked) from ``labels``."""
    labels = read_roles_yaml(str(path or ROLES_YAML)).get("labels") or {}
    synonyms = {str(label).lower(): _role(role, f"labels.synonyms.{label}")
                for label, role in (labels.get("synonyms") or {}).items()}
    words = tuple((_role(rule.get("role"), f"labels.words[{index}]"),
                   frozenset(str(word).lower() for word in rule.get("words") or ()))
                  for index, rule in enumerate(labels.get("words") or ()))
    return synonyms, words
