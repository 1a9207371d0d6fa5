"""The SLO classes a run is judged by: the gateway's built-in ones, or those a gateway config file defines.

A live run is judged on the client side and a simulation inside the simulator, but the targets must be the ones
the gateway schedules by: a config that adds a class (e.g. ``urgent`` in ``examples/workflow-scheduling.yaml``)
or changes a built-in one would otherwise be judged against targets the gateway never used (an unknown class had
no TTFT target and no workflow deadline, so it met its SLO by construction). ``--gateway-config FILE`` reads the
top-level ``slo_classes`` of a gateway config with the gateway's own parser (merged over the built-in classes, as
the gateway does), and a workload naming a class that the gateway would reject with 400 is refused up front.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from pathlib import Path

from gateway.core.request import DEFAULT_SLO_CLASSES, SLOClass
from loadgen.workload import Workload, WorkloadError

GATEWAY_CONFIG_HELP = ("gateway config YAML whose slo_classes (merged over the built-in interactive and batch, as "
                       "the gateway does) give the SLO targets and workflow deadlines; default: the built-in classes")


def builtin_slo_classes() -> dict[str, SLOClass]:
    """The gateway's built-in classes (``interactive``, ``batch``), a fresh copy."""
    return dict(DEFAULT_SLO_CLASSES)


def load_slo_classes(path: str | Path) -> dict[str, SLOClass]:
    """The SLO classes a gateway started with the config file ``path`` knows.

    The whole file is validated by :func:`gateway.config.load_config` (a config the gateway would refuse is not
    a description of any gateway). Raises ``ValueError`` naming the file."""
    from gateway.config import ConfigError, load_config

    try:
        config = load_config(path)
    except ConfigError as exc:
        raise ValueError(f"--gateway-config {path}: {exc}") from None
    return {c.name: SLOClass(c.name, ttft_s=c.ttft_s, tpot_s=c.tpot_s, workflow_deadline_s=c.workflow_deadline_s)
            for c in config.slo_classes}


def check_slo_class_names(names: Iterable[tuple[str, str]], known: Iterable[str]) -> None:
    """Each ``(where, class name)`` must be a known class; raise :class:`WorkloadError` naming the first that is
    not. The gateway answers a request of an unknown class with 400, so a run or a simulation of it would
    measure nothing the gateway would do."""
    known = sorted(known)
    for where, name in names:
        if name not in known:
            raise WorkloadError(f"{where}: unknown SLO class {name!r} (known: {', '.join(known)}; "
                                "--gateway-config FILE reads a gateway's own classes)")


def check_workload_slo_classes(workload: Workload, classes: Iterable[str]) -> None:
    """Every workflow's ``slo_class`` must be one of ``classes`` (see :func:`check_slo_class_names`)."""
    check_slo_class_names(((f"workflow {w.id}", w.slo_class) for w in workload.workflows), classes)


def add_gateway_config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gateway-config", metavar="FILE", help=GATEWAY_CONFIG_HELP)


def slo_classes_from_args(args: argparse.Namespace) -> dict[str, SLOClass]:
    """``--gateway-config``'s classes, else the built-in ones. Raises ``ValueError``."""
    path = getattr(args, "gateway_config", None)
    return load_slo_classes(path) if path else builtin_slo_classes()
