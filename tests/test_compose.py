"""docker-compose.yml parses, and every command it runs is one our CLI accepts, with configs that load."""

from __future__ import annotations

from pathlib import Path

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
