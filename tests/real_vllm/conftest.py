"""Fixtures for the real-vLLM stage: a real vLLM CPU server per model, with the Maestro gateway in front.

Setup (once per checkout; idempotent): ``scripts/setup_vllm.sh`` creates the vLLM venv
(``$MAESTRO_VLLM_VENV``, default ``<repo>/.venv-vllm``) and builds the test models
(``$MAESTRO_MODEL_DIR``, default ``<repo>/.cache/models``). Without them every test here FAILS with a message
saying so, unless ``MAESTRO_SKIP_REAL_VLLM=1`` (then they are skipped).

Process model: at most one vLLM process lives at a time. Each model's stack (vLLM + gateway) is a class-scoped
fixture, and ``_EngineSlot`` (session-scoped) stops whatever engine is running before starting the next one, so
tests of one model are grouped in one class and the engine starts once per test run per model.

vLLM is started the way vllm-observed.md found to work on a 2-core CPU box: ``python -m
vllm.entrypoints.openai.api_server`` pinned to one core with ``taskset`` and matching OMP binding, so that the
gateway and the test client keep the other core. The engine computes in float32 (``--dtype float32``; the
checkpoints on disk are bf16): vLLM's CPU bf16 path gives SmolLM2 wrong text ("L'Étoile, la Marseillaise, ..."
instead of "The capital of France is Paris.") on some CPUs. It did so under torch.compile on an AMD EPYC VM,
and on an Intel Xeon with AMX-BF16 also in eager mode, where float32 answers correctly. float32 keeps the
engine off the bf16 kernels on every CPU, and for models this small it costs little. ``--enforce-eager``
stays: eager mode starts in ~20 s instead of ~60 s.

Debugging knobs (environment):
  MAESTRO_REAL_VLLM_DIRECT=1   point the OpenAI client straight at vLLM (no gateway); gateway-only tests skip
  MAESTRO_VLLM_CPU=N           the core vLLM is pinned to (default 0)
  MAESTRO_VLLM_START_TIMEOUT   seconds to wait for vLLM /health (default 240)
  MAESTRO_VLLM_DTYPE           the engine's --dtype (default float32; bfloat16 reproduces the CPU bf16 problem)
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest

REPO = Path(__file__).resolve().parents[2]
VLLM_VENV = Path(os.environ.get("MAESTRO_VLLM_VENV") or REPO / ".venv-vllm")
MODEL_DIR = Path(os.environ.get("MAESTRO_MODEL_DIR") or REPO / ".cache" / "models")
VENV_MARKER = ".maestro-vllm-ready"  # written by scripts/setup_vllm.sh
MODEL_MARKER = ".maestro-built"  # written by scripts/build_test_models.py

TINY = "tiny-llama"
SMOL = "smollm2-135m"
MAX_MODEL_LEN = 2048
# One engine slot is held by the priority test's "slot freer" and the rest by long requests; see the tests.
TINY_MAX_NUM_SEQS = 4

ENGINE_START_TIMEOUT_S = float(os.environ.get("MAESTRO_VLLM_START_TIMEOUT", "240"))
ENGINE_DTYPE = os.environ.get("MAESTRO_VLLM_DTYPE", "float32")
GATEWAY_START_TIMEOUT_S = 30.0
DIRECT = os.environ.get("MAESTRO_REAL_VLLM_DIRECT") == "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).resolve().parent
    for item in items:
        if here in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.real_vllm)


# ------------------------------------------------------------------------------------------------ helpers


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """GET ``url``; returns (status, body), or (0, b"") when nothing answered."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return 0, b""


def parse_prometheus(text: str, prefix: str = "") -> dict[str, float]:
    """Sum every sample of each metric name (labels dropped), for names starting with ``prefix``."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#") or not line.startswith(prefix):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        try:
            value = float(line.rsplit(" ", 1)[1])
        except (IndexError, ValueError):
            continue
        values[name] = values.get(name, 0.0) + value
    return values


def log_tail(path: Path, lines: int = 80) -> str:
    try:
        with path.open("r", errors="replace") as handle:
            return "".join(deque(handle, maxlen=lines))
    except OSError as error:
        return f"<no log: {error}>"


def require_setup(model: str) -> Path:
    """The vLLM venv's python, after checking that setup ran; fail (or skip) with the fix otherwise."""
    python = VLLM_VENV / "bin" / "python"
    model_path = MODEL_DIR / model
    problems = []
    if not python.exists() or not (VLLM_VENV / VENV_MARKER).exists():
        problems.append(f"no complete vLLM venv at {VLLM_VENV}")
    if not (model_path / MODEL_MARKER).exists():
        problems.append(f"test model {model!r} not built at {model_path}")
    if problems:
        message = ("real-vLLM stage not set up: " + "; ".join(problems) +
                   ". Run scripts/setup_vllm.sh (idempotent, ~2 min, ~3.5 GB), or set MAESTRO_SKIP_REAL_VLLM=1 "
                   "to skip these tests.")
        if os.environ.get("MAESTRO_SKIP_REAL_VLLM") == "1":
            pytest.skip(message)
        pytest.fail(message, pytrace=False)
    return python


def _stop_process_group(proc: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM the process group we created (start_new_session), then SIGKILL what is left."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    # vLLM's EngineCore and worker processes share the group; make sure none outlives the test run.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


# ------------------------------------------------------------------------------------------------ processes


@dataclass
class VllmEngine:
    model: str
    port: int
    log_path: Path
    args: list[str]
    proc: subprocess.Popen | None = None
    started_in_s: float = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, python: Path) -> None:
        cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server",
               "--model", str(MODEL_DIR / self.model), "--served-model-name", self.model,
               "--dtype", ENGINE_DTYPE, "--max-model-len", str(MAX_MODEL_LEN), "--enforce-eager",
               "--host", "127.0.0.1", "--port", str(self.port), *self.args]
        core = os.environ.get("MAESTRO_VLLM_CPU", "0")
        taskset = shutil.which("taskset")
        if taskset:
            cmd = [taskset, "-c", core, *cmd]
        env = dict(os.environ)
        env.pop("VIRTUAL_ENV", None)
        env.update({
            "VLLM_CPU_KVCACHE_SPACE": "1",
            "VLLM_CPU_OMP_THREADS_BIND": core,
            "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "VLLM_SERVER_DEV_MODE": "1",
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
            "PYTHONUNBUFFERED": "1",
            # vLLM leaves its gloo rendezvous file (vllm_dist_*) in TMPDIR; keep it in the test's directory.
            "TMPDIR": str(self.log_path.parent),
        })
        log = self.log_path.open("wb")
        log.write(("$ " + " ".join(cmd) + "\n").encode())
        log.flush()
        t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=env, cwd=str(REPO), start_new_session=True)
        log.close()
        deadline = t0 + ENGINE_START_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                self._fail(f"vLLM ({self.model}) exited with status {self.proc.returncode} during startup")
            status, _ = http_get(self.url + "/health", timeout=2.0)
            if status == 200:
                break
            if time.monotonic() > deadline:
                self._fail(f"vLLM ({self.model}) did not answer /health within {ENGINE_START_TIMEOUT_S:.0f} s")
            time.sleep(0.5)
        self.started_in_s = time.monotonic() - t0
        print(f"\n[real_vllm] vLLM {self.model} up on {self.url} in {self.started_in_s:.1f} s (log {self.log_path})")

    def _fail(self, reason: str) -> None:
        tail = log_tail(self.log_path)
        self.stop()
        pytest.fail(f"{reason}; log {self.log_path}, last lines:\n{tail}", pytrace=False)

    def stop(self) -> None:
        if self.proc is not None:
            _stop_process_group(self.proc, grace_s=20.0)
            self.proc = None

    def metrics(self) -> dict[str, float]:
        """The engine's own ``vllm:*`` series, scraped directly (not through the gateway)."""
        status, body = http_get(self.url + "/metrics", timeout=5.0)
        assert status == 200, f"vLLM /metrics answered {status}"
        return parse_prometheus(body.decode(), "vllm:")


@dataclass
class GatewayProcess:
    port: int
    config_path: Path
    log_path: Path
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        python = REPO / ".venv" / "bin" / "python"
        if not python.exists():
            python = Path(sys.executable)
        cmd = [str(python), "-m", "gateway.cli", "serve", "--config", str(self.config_path),
               "--host", "127.0.0.1", "--port", str(self.port)]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        log = self.log_path.open("wb")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=env, cwd=str(REPO), start_new_session=True)
        log.close()
        deadline = time.monotonic() + GATEWAY_START_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                self._fail(f"gateway exited with status {self.proc.returncode} during startup")
            status, _ = http_get(self.url + "/health", timeout=1.0)
            if status == 200:
                break
            if time.monotonic() > deadline:
                self._fail(f"gateway did not answer /health with 200 within {GATEWAY_START_TIMEOUT_S:.0f} s")
            time.sleep(0.2)
        # /health is liveness only; wait until the monitor has scraped the engine and marked it up, so the
        # first test does not race the first probe.
        while time.monotonic() < deadline:
            if any(engine.get("up") for engine in self.engines()):
                return
            time.sleep(0.2)
        self._fail("gateway never reported its vLLM engine up in GET /admin/engines")

    def engines(self) -> list[dict[str, Any]]:
        import json

        status, body = http_get(self.url + "/admin/engines", timeout=2.0)
        if status != 200:
            return []
        data = json.loads(body)
        if isinstance(data, dict):
            data = data.get("data", data.get("engines", []))
        return list(data)

    def online_records(self) -> list[dict[str, Any]]:
        """The trace records online learning has written so far (the config's file buffer)."""
        import json

        path = self.config_path.parent / "online-records.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def metrics(self) -> dict[str, float]:
        """The gateway's own ``maestro_*`` Prometheus series."""
        status, body = http_get(self.url + "/metrics", timeout=5.0)
        assert status == 200, f"gateway /metrics answered {status}"
        return parse_prometheus(body.decode(), "maestro_")

    def _fail(self, reason: str) -> None:
        tail = log_tail(self.log_path)
        self.stop()
        pytest.fail(f"{reason}; config {self.config_path}, log {self.log_path}, last lines:\n{tail}", pytrace=False)

    def stop(self) -> None:
        if self.proc is not None:
            _stop_process_group(self.proc, grace_s=10.0)
            self.proc = None


def gateway_config_yaml(model: str, engine_url: str, online_records: Path) -> str:
    """Online learning is on (recording only: no refit within a test run), so every request of the suite also
    goes through the recording path, and TestTinyLlama checks what it wrote."""
    return f"""\
predictor:
  online: {{enabled: true, buffer: file, path: "{online_records}", work_dir: "{online_records.parent}",
           max_records: 1000000, min_records: 1000000, refit_interval_s: 100000}}
models:
  - name: {model}
    max_model_len: {MAX_MODEL_LEN}
    kv_bytes_per_token: 4096
clusters:
  - name: local
    pools:
      - name: real
        kind: vllm
        models: [{model}]
        engines:
          - url: {engine_url}
monitor: {{interval_s: 0.25}}
"""


@dataclass
class Stack:
    """One model served by one real vLLM engine, reached through the gateway (or directly in DIRECT mode)."""

    model: str
    engine: VllmEngine
    gateway: GatewayProcess | None
    max_num_seqs: int
    max_model_len: int = MAX_MODEL_LEN

    @property
    def base_url(self) -> str:
        return (self.gateway.url if self.gateway else self.engine.url) + "/v1"

    @property
    def vocab_size(self) -> int:
        """The model's vocabulary as vLLM reads it (config.json), for a simulated engine that mirrors this one."""
        import json

        return int(json.loads((MODEL_DIR / self.model / "config.json").read_text())["vocab_size"])

    @property
    def python(self) -> Path:
        """The python of the vLLM venv that serves this stack, to read the installed vLLM's own definitions."""
        return VLLM_VENV / "bin" / "python"

    def client(self, timeout: float = 60.0):
        import openai

        return openai.OpenAI(base_url=self.base_url, api_key="test-key", timeout=timeout, max_retries=0)

    def async_client(self, timeout: float = 60.0):
        import openai

        return openai.AsyncOpenAI(base_url=self.base_url, api_key="test-key", timeout=timeout, max_retries=0)

    def require_gateway(self) -> GatewayProcess:
        if self.gateway is None:
            pytest.skip("MAESTRO_REAL_VLLM_DIRECT=1: this test checks gateway behaviour")
        return self.gateway

    def wait_engine_idle(self, timeout: float = 10.0) -> dict[str, float]:
        """Wait until vLLM reports nothing running or waiting (left over from an earlier test)."""
        deadline = time.monotonic() + timeout
        while True:
            metrics = self.engine.metrics()
            busy = metrics.get("vllm:num_requests_running", 0) + metrics.get("vllm:num_requests_waiting", 0)
            if busy == 0:
                return metrics
            if time.monotonic() > deadline:
                raise AssertionError(f"engine still busy after {timeout} s: running/waiting = {busy}")
            time.sleep(0.05)


class _EngineSlot:
    """Holds the single live vLLM process of the test run; starting a model stops the previous one."""

    def __init__(self, tmp_root: Path) -> None:
        self.tmp_root = tmp_root
        self.current: VllmEngine | None = None

    def start(self, model: str, args: list[str]) -> VllmEngine:
        python = require_setup(model)
        self.stop()
        workdir = self.tmp_root / model
        workdir.mkdir(parents=True, exist_ok=True)
        engine = VllmEngine(model=model, port=free_port(), log_path=workdir / "vllm.log", args=args)
        self.current = engine
        engine.start(python)
        return engine

    def stop(self) -> None:
        if self.current is not None:
            self.current.stop()
            self.current = None


@pytest.fixture(scope="session")
def _engine_slot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_EngineSlot]:
    slot = _EngineSlot(tmp_path_factory.mktemp("real_vllm"))
    try:
        yield slot
    finally:
        slot.stop()


def _stack(slot: _EngineSlot, model: str, max_num_seqs: int, args: list[str]) -> Iterator[Stack]:
    engine = slot.start(model, ["--max-num-seqs", str(max_num_seqs), *args])
    gateway = None
    try:
        if not DIRECT:
            workdir = engine.log_path.parent
            config_path = workdir / "gateway.yaml"
            config_path.write_text(gateway_config_yaml(model, engine.url, workdir / "online-records.jsonl"))
            gateway = GatewayProcess(port=free_port(), config_path=config_path, log_path=workdir / "gateway.log")
            gateway.start()
        yield Stack(model=model, engine=engine, gateway=gateway, max_num_seqs=max_num_seqs)
    finally:
        if gateway is not None:
            gateway.stop()
        slot.stop()


@pytest.fixture(scope="class")
def tiny_stack(_engine_slot: _EngineSlot) -> Iterator[Stack]:
    """tiny-llama (random weights, gibberish output) with priority scheduling and 4 sequence slots."""
    yield from _stack(_engine_slot, TINY, TINY_MAX_NUM_SEQS, ["--scheduling-policy", "priority"])


@pytest.fixture(scope="class")
def smol_stack(_engine_slot: _EngineSlot) -> Iterator[Stack]:
    """SmolLM2-135M-Instruct (a real model: answers simple questions correctly), with a tool parser, as the
    simulated engines are by default (forced tool calls are written by structured outputs, JSON without optional
    whitespace so that a small model cannot fill its budget with it)."""
    yield from _stack(_engine_slot, SMOL, 4, [
        "--enable-auto-tool-choice", "--tool-call-parser", "pythonic",
        "--structured-outputs-config", '{"backend": "xgrammar", "disable_any_whitespace": true}'])
