"""Where the third-party data lives: read in place at run time, never copied into the repository.

The folder is ``$MAESTRO_DATA_DIR`` when set, else ``<repo>/../shared/data``. Every loader asks for its dataset
through :func:`dataset_path`, which raises :class:`DataUnavailable` (a ``FileNotFoundError``) with a message
that names the folder and the variable, so a CLI can print it and a test can skip with it.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DATA_ENV = "MAESTRO_DATA_DIR"

# dataset folder names (as in ../shared/data)
CHATDEV = "chatdev-warehouse-llm-calls"
WHO_AND_WHEN = "who-and-when-mas-logs"
TAU_BENCH = "tau-bench-historical-trajectories"
AZURE_2023 = "azure-llm-inference-2023"
MOONCAKE = "mooncake-fast25-traces"
SERVEGEN = "servegen-client-arrival-params"


class DataUnavailable(FileNotFoundError):
    """A dataset the generator needs is not there; the message says where it was looked for."""


def data_dir() -> Path:
    env = os.environ.get(DATA_ENV)
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data"


def dataset_path(name: str, *files: str) -> Path:
    """The folder of dataset ``name`` (or, with ``files``, the first of them that exists inside it)."""
    folder = data_dir() / name
    if not folder.is_dir():
        raise DataUnavailable(f"dataset {name!r} not found: {folder} does not exist "
                              f"(set {DATA_ENV} to the folder holding the shared data)")
    if not files:
        return folder
    for file in files:
        if (folder / file).is_file():
            return folder / file
    raise DataUnavailable(f"dataset {name!r}: none of {', '.join(files)} in {folder}")


def available(name: str, *files: str) -> bool:
    try:
        dataset_path(name, *files)
    except DataUnavailable:
        return False
    return True
