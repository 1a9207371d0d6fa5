"""Simulated engines that speak vLLM's (and vLLM-Omni's) HTTP surface, driven by a calibrated cost model.

* :mod:`backends.sim.cost_model` -- :class:`EngineCostModel`, pure functions fitted on
  ``../shared/data/calibration`` at construction (shared with the discrete-event simulator).
* :mod:`backends.sim.engine` -- the continuous-batching scheduler (KV blocks, fcfs/priority, preemption, sleep).
* :mod:`backends.sim.server` -- the aiohttp app (routes, metrics, sleep endpoints); its module docstring lists
  the behaviours and the documented deviations, including the load-generator hint header ``X-Sim-Output-Tokens``.
  The request's fields are read in :mod:`backends.sim.request_parsing` and checked in
  :mod:`backends.sim.request_checks`; answers and their SSE bytes are built in :mod:`backends.sim.answers`, error
  bodies in :mod:`backends.sim.responses`.
* :mod:`backends.sim.dit` -- a simulated vLLM-Omni image engine (``/v1/images/generations``).
* :mod:`backends.sim.runner` -- start many engines in one process.
"""

from backends.sim.cost_model import EngineCostModel, default_calibration_dir
from backends.sim.dit import SimDiTEngine, make_png
from backends.sim.engine import EngineBusy, SimEngine, SimRequest
from backends.sim.options import SimDiTOptions, SimEngineOptions
from backends.sim.runner import (
    SimDiTHandle,
    SimEngineHandle,
    SimHandle,
    serve_sim_engines_forever,
    start_sim_dit_engines,
    start_sim_engines,
)
from backends.sim.filler import filler_text
from backends.sim.server import HINT_HEADER

__all__ = [
    "EngineBusy",
    "EngineCostModel",
    "HINT_HEADER",
    "SimDiTEngine",
    "SimDiTHandle",
    "SimDiTOptions",
    "SimEngine",
    "SimEngineHandle",
    "SimEngineOptions",
    "SimHandle",
    "SimRequest",
    "default_calibration_dir",
    "filler_text",
    "make_png",
    "serve_sim_engines_forever",
    "start_sim_dit_engines",
    "start_sim_engines",
]
