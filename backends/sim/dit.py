"""A simulated vLLM-Omni DiT (diffusion) engine: ``POST /v1/images/generations`` with calibrated step times.

Request and response follow vLLM-Omni's ``entrypoints/openai/protocol/images.py``: the body has ``prompt``
(required), ``model``, ``n`` (1..10), ``size`` ("WIDTHxHEIGHT"), ``response_format`` ("b64_json" or "file"),
``num_inference_steps`` (1..200), ``seed`` and further diffusion knobs (accepted, ignored). The answer is
``{"created", "data": [{"b64_json", "url": null, "revised_prompt": null}], "output_format": "png", "size"}``,
or for ``response_format="file"`` the PNG (a zip of ``image_<i>.png`` for n > 1) as an attachment. A ``model``
other than the served one is a 400 ("Model mismatch: ..."), as vLLM-Omni answers since its PR #2805 (2026-04; it
had warned and served its own model before); ``/health`` answers ``{"status": "healthy"}``. The diffusion knobs
are checked as its request model declares them (``guidance_scale`` and ``true_cfg_scale`` numbers in 0..20,
``seed`` an integer, the text fields strings, ``vae_use_slicing``/``vae_use_tiling`` booleans, ``lora`` and
``extra_params`` objects, ``use_system_prompt`` one of its names), and otherwise ignored.

Deviations from vLLM-Omni: images are always PNG (``output_format`` is reported as "png" whatever was asked;
vLLM-Omni also writes jpeg and webp); ``layers`` is not checked (a layered model's range); sizes are limited to
``max_size`` per side (vLLM-Omni has an opt-in total-pixel cap instead), and a malformed size gets a
pydantic-style error where vLLM-Omni answers its own 400.

Requests run one at a time in arrival order (``n`` images as one batch). Each takes
``num_inference_steps * cost_model.dit_step_s(W, H, n, parallel_degree=..., profile=...) / time_scale``
seconds. The images are valid PNGs of the requested size, a single flat colour picked from the prompt, built
with ``zlib`` + ``struct`` (no PIL) in an executor and cached.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import io
import logging
import struct
import time
import uuid
import zipfile
import zlib
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from backends.sim.cost_model import EngineCostModel
from backends.sim.metrics import ENGINE_INDEX, REQUEST_LATENCY_BUCKETS
from backends.sim.options import SimDiTOptions
from backends.sim.request_parsing import check_bool, check_float, check_int, check_range, check_str, read_json_body
from backends.sim.responses import (error_response, field_error, json_not_found, not_an_object_response,
                                    pydantic_error_response)
from backends.vllm_names import (
    COUNTER_REQUEST_SUCCESS,
    GAUGE_REQUESTS_RUNNING,
    GAUGE_REQUESTS_WAITING,
    HIST_E2E,
    LABEL_ENGINE,
    LABEL_MODEL,
)

log = logging.getLogger(__name__)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PALETTE = ((70, 130, 180), (205, 92, 92), (60, 179, 113), (238, 232, 170), (147, 112, 219), (244, 164, 96),
            (72, 209, 204), (188, 143, 143))


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


@functools.lru_cache(maxsize=32)
def make_png(width: int, height: int, rgb: tuple[int, int, int] = _PALETTE[0]) -> bytes:
    """A valid 8-bit RGB PNG of one flat colour (filter type 0 on every row)."""
    row = b"\x00" + bytes(rgb) * width
    idat = zlib.compress(row * height, 6)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return PNG_SIGNATURE + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


class SimDiTEngine:
    """FIFO, one request at a time; counts and metrics for the gateway's monitor."""

    def __init__(self, options: SimDiTOptions, cost_model: EngineCostModel | None = None) -> None:
        options.validate()
        self.options = options
        self.cost = cost_model or EngineCostModel(options.calibration_dir, scale=options.cost_scale)
        self.num_running = 0
        self.num_waiting = 0
        self.completed = 0
        self._lock = asyncio.Lock()
        self.registry = CollectorRegistry(auto_describe=True)
        names = (LABEL_ENGINE, LABEL_MODEL)
        values = (ENGINE_INDEX, options.model)
        Gauge(GAUGE_REQUESTS_RUNNING, "Number of requests in model execution batches.", names,
              registry=self.registry).labels(*values).set_function(lambda: float(self.num_running))
        Gauge(GAUGE_REQUESTS_WAITING, "Number of requests waiting to be processed.", names,
              registry=self.registry).labels(*values).set_function(lambda: float(self.num_waiting))
        self._success = Counter(COUNTER_REQUEST_SUCCESS, "Count of successfully processed requests.",
                                names + ("finished_reason",), registry=self.registry).labels(*values, "stop")
        self._e2e = Histogram(HIST_E2E, "Histogram of e2e request latency in seconds.", names,
                              buckets=REQUEST_LATENCY_BUCKETS, registry=self.registry).labels(*values)

    def request_seconds(self, width: int, height: int, n: int, steps: int) -> float:
        """Engine seconds for one request (all steps), before ``time_scale``."""
        o = self.options
        return steps * self.cost.dit_step_s(width, height, n, parallel_degree=o.parallel_degree,
                                            scaling_efficiency=o.scaling_efficiency, profile=o.dit_profile)

    async def generate(self, width: int, height: int, n: int, steps: int) -> float:
        """Wait for the engine, then for the denoising time; returns engine seconds spent computing."""
        start = time.monotonic()
        self.num_waiting += 1
        waiting = True
        try:
            async with self._lock:
                self.num_waiting -= 1
                waiting = False
                self.num_running += 1
                try:
                    seconds = self.request_seconds(width, height, n, steps)
                    await asyncio.sleep(seconds / self.options.time_scale)
                finally:
                    self.num_running -= 1
        finally:
            if waiting:
                self.num_waiting -= 1
        self.completed += 1
        self._success.inc()
        self._e2e.observe(time.monotonic() - start)
        return seconds


def _object(body: dict, key: str, errors: list[dict]) -> None:
    value = body.get(key)
    if value is not None and not isinstance(value, dict):
        errors.append(field_error("dict_type", f"body.{key}", "Input should be a valid dictionary", value))


_SYSTEM_PROMPT_TYPES = [None, "dynamic", "en_vanilla", "en_recaption", "en_think_recaption", "en_unified", "custom"]


def _system_prompt_type(body: dict, errors: list[dict]) -> None:
    kind = check_str(body, "use_system_prompt", errors)
    if kind not in _SYSTEM_PROMPT_TYPES:
        errors.append(field_error("value_error", "body.use_system_prompt", f"Value error, Invalid use_system_prompt "
                                  f"type: {kind}. Must be one of: {_SYSTEM_PROMPT_TYPES[1:] + [None]}", kind))


def validate_request(body: dict, default_size: str, max_size: int) -> tuple[list[dict], dict[str, Any]]:
    """vLLM-Omni's ``ImageGenerationRequest`` checks in pydantic lax mode, its errors in the order it declares
    the fields (vLLM's 400 names the first one's ``loc`` as ``param``); and the values the engine uses."""
    errors: list[dict] = []
    if "prompt" not in body:
        errors.append(field_error("missing", "body.prompt", "Field required", body))
    elif not isinstance(body["prompt"], str):
        errors.append(field_error("string_type", "body.prompt", "Input should be a valid string", body["prompt"]))
    check_str(body, "bot_task", errors)
    check_str(body, "model", errors)
    n = check_int(body, "n", errors, optional=False, default=1)
    check_range(errors, "n", n, body.get("n"), 1, 10)
    size = _parse_size(body.get("size"), default_size, max_size)
    if size is None:
        errors.append(field_error("value_error", "body.size", "Value error, size must be in format 'WIDTHxHEIGHT' "
                                  "(e.g., '1024x1024')", body.get("size")))
    response_format = body.get("response_format", "b64_json")
    if response_format not in ("b64_json", "url", "file"):  # the enum, null included, is a type error
        errors.append(field_error("enum", "body.response_format", "Input should be 'b64_json', 'url' or 'file'",
                                  response_format))
    elif response_format == "url":
        errors.append(field_error("value_error", "body.response_format", "Value error, Only 'b64_json' or 'file' "
                                  f"response format is supported, got: {response_format}", response_format))
    for key in ("user", "negative_prompt", "system_prompt"):
        check_str(body, key, errors)
    _system_prompt_type(body, errors)
    steps = check_int(body, "num_inference_steps", errors, optional=True, default=None)
    check_range(errors, "num_inference_steps", steps, body.get("num_inference_steps"), 1, 200)
    for key in ("guidance_scale", "true_cfg_scale"):
        check_range(errors, key, check_float(body, key, errors), body.get(key), 0.0, 20.0)
    check_float(body, "flow_shift", errors)
    _object(body, "extra_params", errors)
    check_bool(body, "infer_align_image_size", errors, optional=True, default=None)
    check_int(body, "seed", errors, optional=True, default=None)
    check_str(body, "generator_device", errors)
    _object(body, "lora", errors)
    for key in ("vae_use_slicing", "vae_use_tiling"):
        check_bool(body, key, errors, optional=True, default=None)
    check_str(body, "output_format", errors)
    return errors, {"n": n or 1, "size": size, "steps": steps, "response_format": response_format}


def _parse_size(size: Any, default: str, max_size: int) -> tuple[int, int] | None:
    text = default if size is None else size
    if not isinstance(text, str) or "x" not in text:
        return None
    w_text, _, h_text = text.lower().partition("x")
    try:
        width, height = int(w_text), int(h_text)
    except ValueError:
        return None
    if not (0 < width <= max_size and 0 < height <= max_size):
        return None
    return width, height


def _file_response(png: bytes, n: int) -> web.Response:
    """vLLM-Omni's ImageGenerationResponse.stream_response: one PNG, or a zip of ``image_<i>.png`` for n > 1, as
    an attachment."""
    if n == 1:
        body, content_type, name = png, "image/png", f"image_{uuid.uuid4().hex[:8]}.png"
    else:
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            for index in range(n):
                archive.writestr(f"image_{index}.png", png)
        body, content_type, name = buffer.getvalue(), "application/zip", f"images_{uuid.uuid4().hex[:8]}.zip"
    return web.Response(body=body, content_type=content_type,
                        headers={"Content-Disposition": f'attachment; filename="{name}"'})


class SimDiTServer:
    def __init__(self, engine: SimDiTEngine) -> None:
        self.engine = engine
        self.options = engine.options
        self.created = int(time.time())

    def build_app(self) -> web.Application:
        app = web.Application(client_max_size=16 * 1024 * 1024, middlewares=[json_not_found])
        app.router.add_post("/v1/images/generations", self.images_generations)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics)
        return app

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(body=b'{"status":"healthy"}', content_type="application/json")  # vLLM-Omni's

    async def models(self, request: web.Request) -> web.Response:
        model = self.options.model
        card = {"id": model, "object": "model", "created": self.created, "owned_by": "vllm-omni", "root": model,
                "parent": None, "max_model_len": None, "permission": []}
        return web.Response(body=orjson.dumps({"object": "list", "data": [card]}), content_type="application/json")

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.engine.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def images_generations(self, request: web.Request) -> web.Response:
        body = await read_json_body(request)  # vLLM-Omni's route has vLLM's validate_json_request, as vLLM's
        if isinstance(body, web.Response):
            return body
        if not isinstance(body, dict):
            return not_an_object_response(body)
        o = self.options
        errors, values = validate_request(body, o.default_size, o.max_size)
        if errors:
            return pydantic_error_response(errors)
        model = body.get("model")
        if model is not None and model != o.model:  # vLLM's HTTPException handler: type is the status phrase
            return error_response(f"Model mismatch: request specifies '{model}' but server is running '{o.model}'.",
                                  "Bad Request", 400)
        prompt, size, n, steps = body["prompt"], values["size"], values["n"], values["steps"]
        response_format = values["response_format"]
        width, height = size
        await self.engine.generate(width, height, n, steps or o.default_steps)
        rgb = _PALETTE[zlib.crc32(prompt.encode("utf-8", "replace")) % len(_PALETTE)]
        png = await asyncio.get_running_loop().run_in_executor(None, make_png, width, height, rgb)
        if response_format == "file":
            return _file_response(png, n)
        b64 = base64.b64encode(png).decode("ascii")
        payload = {"created": int(time.time()),
                   "data": [{"b64_json": b64, "url": None, "revised_prompt": None} for _ in range(n)],
                   "output_format": "png", "size": f"{width}x{height}"}
        return web.Response(body=orjson.dumps(payload), content_type="application/json")
