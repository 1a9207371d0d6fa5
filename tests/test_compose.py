"""docker-compose.yml parses, every command it runs is one our CLI accepts, with configs that load, and the default
stack's commands run as processes: they serve the SDK, stop cleanly on SIGTERM and fail in one line."""

from __future__ import annotations

import os
import selectors
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import openai
import pytest
import yaml

from gateway.cli import build_parser
from gateway.config import load_config

REPO = Path(__file__).resolve().parent.parent


def test_compose_commands_exist_in_cli():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    dockerfile = (REPO / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["maestro"]' in dockerfile
    parser = build_parser()
    checked = 0
    for name, service in compose["services"].items():
        if service.get("build") != ".":
            continue  # third-party images (redis, vllm) run their own commands
        args = parser.parse_args(service["command"])  # SystemExit here = a command our CLI does not have
        assert callable(args.func), name
        if getattr(args, "config", None):
            config_path = REPO / args.config.removeprefix("/app/")
            assert load_config(config_path).clusters, config_path
        checked += 1
    assert checked >= 3


def test_compose_gateway_points_at_the_sim_engines():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    sim = compose["services"]["sim-engines"]["command"]
    count = int(sim[sim.index("--count") + 1])
    base_port = int(sim[sim.index("--base-port") + 1])
    config = load_config(REPO / "examples/compose-sim.yaml")
    urls = [e.url for _, pool in config.pools() for e in pool.engines]
    assert urls == [f"http://sim-engines:{base_port + i}" for i in range(count)]



def test_compose_vllm_engines_can_sleep_and_fit_the_gateways_context():
    """The gateway's admin sleep needs vLLM's routes (VLLM_SERVER_DEV_MODE) and ``--enable-sleep-mode`` (without it a
    sleep frees nothing); the engines' context is the one the gateway's config reserves for."""
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    config = load_config(REPO / "examples/compose-gpu.yaml")
    max_model_len = {model.name: model.max_model_len for model in config.models}
    engines = [s for s in compose["services"].values() if str(s.get("image", "")).startswith("vllm/")]
    assert engines
    for service in engines:
        command = service["command"]
        assert service["environment"]["VLLM_SERVER_DEV_MODE"] == "1"
        assert "--enable-sleep-mode" in command
        # agents send tools: a vLLM without a tool parser refuses them all (the simulated engines accept them)
        assert "--enable-auto-tool-choice" in command and command[command.index("--tool-call-parser") + 1]
        model = command[command.index("--model") + 1]
        assert int(command[command.index("--max-model-len") + 1]) == max_model_len[model]


def test_compose_gateways_on_one_redis_keep_their_states_apart():
    """Both gateways of ``--profile gpu`` share the Redis service; one key prefix would make each count the other
    among its peers and share workflow records with it."""
    sim = load_config(REPO / "examples/compose-sim.yaml").state
    gpu = load_config(REPO / "examples/compose-gpu.yaml").state
    assert sim.redis_url == gpu.redis_url
    assert sim.key_prefix != gpu.key_prefix


def test_docker_build_context_leaves_out_data_and_environments():
    """Traces imported from third-party data and models trained on them must never reach an image."""
    ignored = (REPO / ".dockerignore").read_text().split()
    for path in (".git", ".venv", "traces", "models", "maestro-online", "**/results"):
        assert path in ignored, path


# ------------------------------------------------------------------------------------------- as processes
# What `docker compose up` runs, without Docker (none runs here or in CI): the sim-engines service's command and
# the gateway's, each as its own `maestro` process, stopped with SIGTERM as `docker compose stop` does.

def _maestro(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "gateway.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO)


def _lines_until(process: subprocess.Popen, done, timeout_s: float = 30.0) -> list[str]:
    """Lines of ``process``'s stdout until ``done(lines)`` holds (fails on exit or timeout, with its stderr).
    Reads the pipe's bytes as they come: a buffered readline would sit on lines select() no longer reports."""
    lines: list[str] = []
    pending = b""
    deadline = time.monotonic() + timeout_s
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        while not done(lines):
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                pytest.fail(f"{process.args}: {lines} then {process.communicate()[1][-2000:]}")
            if selector.select(timeout=0.2):
                pending += os.read(process.stdout.fileno(), 65536)
                *complete, pending = pending.split(b"\n")
                lines.extend(line.decode() for line in complete)
    return lines


def _stop(process: subprocess.Popen) -> tuple[int, str]:
    process.send_signal(signal.SIGTERM)
    try:
        _, err = process.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail(f"{process.args} did not stop within 15 s of SIGTERM")
    return process.returncode, err


@pytest.mark.redis
def test_the_compose_stack_runs_as_processes_and_stops_on_sigterm(tmp_path):
    from tests.test_state_store import REDIS_URL, _delete_prefix, _require_redis

    _require_redis()
    prefix = f"maestro-test-{uuid.uuid4().hex}"
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    command = list(compose["services"]["sim-engines"]["command"])
    for flag, value in (("--count", "2"), ("--host", "127.0.0.1"), ("--base-port", "0")):
        command[command.index(flag) + 1] = value
    engines = _maestro(*command, "--time-scale", "20")
    gateway = None
    try:
        lines = _lines_until(engines, lambda lines: len(lines) == 2)
        urls = [line.split()[1] for line in lines]
        assert all(line.split()[0] == "vllm" and line.endswith(" maestro-sim-llama-8b") for line in lines)
        config = yaml.safe_load((REPO / "examples/compose-sim.yaml").read_text())
        config["clusters"][0]["pools"][0]["engines"] = [{"url": url} for url in urls]
        config["state"].update(redis_url=REDIS_URL, key_prefix=prefix)
        (tmp_path / "stack.yaml").write_text(yaml.safe_dump(config))
        gateway = _maestro("serve", "--config", str(tmp_path / "stack.yaml"), "--host", "127.0.0.1", "--port", "0")
        first = _lines_until(gateway, lambda lines: len(lines) == 3)
        assert "(2/2 engines up, state: redis)" in first[0] and first[2] == "Models: maestro-sim-llama-8b"
        base_url = first[0].split()[4]
        client = openai.OpenAI(base_url=base_url + "/v1", api_key="any", max_retries=0, timeout=30)
        assert [m.id for m in client.models.list().data] == ["maestro-sim-llama-8b"]
        reply = client.chat.completions.create(model="maestro-sim-llama-8b", max_tokens=5,
                                               messages=[{"role": "user", "content": "review this patch"}],
                                               extra_headers={"X-Agent-Role": "Code Reviewer"})
        assert reply.choices[0].message.content and reply.usage.completion_tokens <= 5
    finally:
        codes = [_stop(process) for process in (gateway, engines) if process is not None]
        _delete_prefix(prefix)
    for code, err in codes:
        assert code == 0 and "Traceback" not in err, err
    # a clean stop's last line (a log that ended without one could not be told from a crash)
    assert codes[0][1].rstrip().endswith("maestro.gateway: stopped"), codes[0][1][-500:]


def test_a_busy_port_or_a_bad_option_is_one_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for args in (("sim-engines", "--count", "1", "--base-port", str(port)),
                     ("serve", "--host", "127.0.0.1", "--port", str(port))):
            done = subprocess.run([sys.executable, "-m", "gateway.cli", *args], capture_output=True, text=True,
                                  cwd=REPO, timeout=60)
            assert done.returncode == 1, done.stderr
            assert f"maestro: cannot listen on 127.0.0.1:{port}:" in done.stderr and "in use" in done.stderr
            assert "Traceback" not in done.stderr and ": stopped" not in done.stderr  # no clean stop to say
    for args in (("sim-engines", "--count", "1", "--host", "no-such-host.invalid"),
                 ("serve", "--host", "no-such-host.invalid", "--port", "0")):
        done = subprocess.run([sys.executable, "-m", "gateway.cli", *args], capture_output=True, text=True,
                              cwd=REPO, timeout=60)
        assert done.returncode == 1 and "maestro: cannot listen on no-such-host.invalid:" in done.stderr
        assert "Traceback" not in done.stderr, done.stderr
    for args, says in ((("sim-engines", "--max-model-len", "-5"), "max_model_len must be a positive integer"),
                       (("sim-engines", "--count", "0"), "nothing to serve"),
                       (("sim-engines", "--count", "-1"), "--count must be >= 0"),
                       (("sim-engines", "--count", "2", "--base-port", "65535"), "no room for 2 engines"),
                       (("serve", "--port", "70000"), "--port must be from 0 to 65535")):
        done = subprocess.run([sys.executable, "-m", "gateway.cli", *args], capture_output=True,
                              text=True, cwd=REPO, timeout=60)
        assert done.returncode == 2 and says in done.stderr and "Traceback" not in done.stderr, done.stderr


@pytest.mark.parametrize("argv, says", [(["--count", "0"], "nothing to serve"),
                                        (["--dit-count", "-1"], "--dit-count must be >= 0"),
                                        (["--count", "2", "--base-port", "65535"], "no room for 2 engines")])
def test_the_sim_module_refuses_counts_and_ports_as_maestro_sim_engines(argv, says, capsys):
    """``python -m backends.sim`` shares ``maestro sim-engines``' checks (it served nothing forever on a count
    of 0, and wrapped ports past 65535)."""
    from backends.sim.__main__ import main

    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2 and says in capsys.readouterr().err


_SIGNALS_SCRIPT = """
import asyncio, os, signal
from gateway.listen import stop_signals

async def main():
    repeats = []
    with stop_signals(lambda: repeats.append(1)) as stopping:
        os.kill(os.getpid(), signal.SIGINT)
        await asyncio.wait_for(stopping.wait(), 5)
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(100):
            if len(repeats) == 2:
                break
            await asyncio.sleep(0.01)
    print("repeats", len(repeats))

asyncio.run(main())
"""


def test_a_second_stop_signal_is_heard():
    """An operator's second Ctrl-C (or a second SIGTERM) during the stop did nothing: the gateway waited out its
    whole grace, without a word. It now ends the grace (``Gateway.hurry``)."""
    done = subprocess.run([sys.executable, "-c", _SIGNALS_SCRIPT], capture_output=True, text=True, timeout=60,
                          cwd=REPO)
    assert done.returncode == 0 and done.stdout.split() == ["repeats", "2"], done.stderr


_HANGUP_SCRIPT = """
import asyncio, os, signal, sys
from gateway.listen import stop_signals

async def main():
    with stop_signals() as stopping:
        os.kill(os.getpid(), signal.SIGHUP)
        try:
            await asyncio.wait_for(stopping.wait(), 0.5)
        except TimeoutError:
            print("not stopping")
        else:
            print("stopping")

if sys.argv[1] == "ignored":
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
asyncio.run(main())
"""


@pytest.mark.parametrize("disposition, says", [("default", "stopping"), ("ignored", "not stopping")])
def test_a_hangup_stops_cleanly_unless_nohup_ignores_it(disposition, says):
    """SIGHUP (the terminal closed) ended the gateway at once: streams cut without their end, nothing drained
    or logged, exit 129. It now stops as SIGTERM does; ``nohup``'s ignored SIGHUP stays ignored."""
    done = subprocess.run([sys.executable, "-c", _HANGUP_SCRIPT, disposition], capture_output=True, text=True,
                          timeout=60, cwd=REPO)
    assert done.returncode == 0 and done.stdout.strip() == says, (done.returncode, done.stdout, done.stderr)


def test_sim_engines_serve_the_dit_model_named():
    """`maestro sim-engines --dit-count` served only maestro-sim-dit, which now answers 400 for another model: a
    pool of another name pointed at it could not be served."""
    process = _maestro("sim-engines", "--count", "1", "--dit-count", "1", "--dit-model", "my-flux",
                       "--host", "127.0.0.1", "--base-port", "0")
    try:
        lines = _lines_until(process, lambda lines: len(lines) >= 2)
    finally:
        code, err = _stop(process)
    assert lines[1].startswith("vllm-omni http://127.0.0.1:") and lines[1].endswith(" my-flux"), lines
    assert code == 0, err


_FROZEN_SCRIPT = """
import gc, sys
import gateway.cli as cli

async def serve_once(start, stop, on_repeat=None):
    await start()
    print("frozen", gc.get_freeze_count(), flush=True)
    await stop()

cli._run_until_signal = serve_once
sys.exit(cli.main(["--log-level", "WARNING", "serve", "--port", "0"]))
"""


def test_serve_takes_its_start_up_objects_out_of_the_collectors_sight():
    """A full garbage collection walked the ~70,000 objects start-up made (modules, config, predictor) every time:
    under load one came every 8-15 s and held the event loop 40-115 ms. ``serve`` freezes them once it listens
    (gc.freeze), so a full collection walks only what serving made."""
    done = subprocess.run([sys.executable, "-c", _FROZEN_SCRIPT], capture_output=True, text=True, cwd=REPO,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    frozen = int(next(line for line in done.stdout.splitlines() if line.startswith("frozen")).split()[1])
    assert frozen > 20000, done.stdout
