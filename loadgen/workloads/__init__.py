"""Workload generation: multi-agent workflow templates, interactive calls, trace replay, arrival processes.

- :mod:`loadgen.workloads.builder` -- ``build_workload(spec) -> Workload`` and :class:`WorkloadSpec`
- :mod:`loadgen.workloads.templates` -- built-in templates (``loadgen/templates/*.json``, hand-chosen counts)
- :mod:`loadgen.workloads.traces` -- templates derived at run time from ChatDev, AG2, Magentic-One, tau-bench
- :mod:`loadgen.workloads.replay` -- Azure 2023 and Mooncake timestamps and token counts
- :mod:`loadgen.workloads.arrivals` -- Poisson, Gamma (ServeGen CVs), ServeGen multi-client, constant
- :mod:`loadgen.workloads.cli` -- ``maestro loadgen workload`` (``add_workload_arguments`` / ``workload_main``)

The third-party data is read in place (``$MAESTRO_DATA_DIR`` or ``<repo>/../shared/data``); nothing of it is
stored in the repository or in this package.
"""

from loadgen.workloads.arrivals import ARRIVALS, generate_arrivals, servegen_gamma_cv
from loadgen.workloads.builder import (SpecError, WorkloadSpec, build_workload, reference_path_s, template_names,
                                       template_stats)
from loadgen.workloads.cli import add_workload_arguments, workload_main
from loadgen.workloads.data import DataUnavailable, data_dir
from loadgen.workloads.replay import REPLAYS, replay_requests
from loadgen.workloads.templates import builtin_names
from loadgen.workloads.traces import TRACE_SOURCES

__all__ = [
    "ARRIVALS",
    "DataUnavailable",
    "REPLAYS",
    "SpecError",
    "TRACE_SOURCES",
    "WorkloadSpec",
    "add_workload_arguments",
    "build_workload",
    "builtin_names",
    "data_dir",
    "generate_arrivals",
    "reference_path_s",
    "replay_requests",
    "servegen_gamma_cv",
    "template_names",
    "template_stats",
    "workload_main",
]
