"""Config validation: good files load; bad ones exit 2 with one message naming the field."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gateway.config import ConfigError, default_config, load_config, parse_config

REPO = Path(__file__).resolve().parent.parent


def base() -> dict:
    return {"models": [{"name": "m", "max_model_len": 2048}],
            "clusters": [{"name": "c", "pools": [{"name": "p", "kind": "vllm", "models": ["m"],
                                                  "engines": [{"url": "http://127.0.0.1:8100"}]}]}]}


def test_examples_and_default_load():
    for path in sorted((REPO / "examples").glob("*.yaml")):
        config = load_config(path)
        assert config.clusters, path
    config = default_config()
    assert config.pools()[0][1].simulated is not None
    assert config.state.backend == "memory"


def test_defaults_fill_in():
    config = parse_config(base())
    assert config.monitor.interval_s == 0.25
    assert config.routing.policy == "least_loaded"
    assert config.model("m").max_model_len == 2048


@pytest.mark.parametrize("mutate, field", [
    (lambda c: c.pop("clusters"), "clusters"),
    (lambda c: c.update(clusters=[]), "clusters"),
    (lambda c: c["clusters"][0]["pools"][0].update(kind="tgi"), "clusters[0].pools[0].kind"),
    (lambda c: c["clusters"][0]["pools"][0]["engines"][0].update(url="ftp://x"),
     "clusters[0].pools[0].engines[0].url"),
    (lambda c: c["clusters"][0]["pools"][0]["engines"][0].update(url="http://h:1/v1"),
     "clusters[0].pools[0].engines[0].url"),
    (lambda c: c["clusters"][0]["pools"][0].update(models=["unknown"]), "clusters[0].pools[0].models[0]"),
    (lambda c: c["clusters"][0]["pools"][0].update(engines=[]), "clusters[0].pools[0].engines"),
    (lambda c: c["models"].append({"name": " "}), "models[1].name"),  # no client can ask for these by name
    (lambda c: c["models"].append({"name": "a\x00b"}), "models[1].name"),
    (lambda c: c["models"][0].update(max_model_len=-5), "models[0].max_model_len"),
    (lambda c: c["models"][0].update(max_model_len="big"), "models[0].max_model_len"),
    (lambda c: c.update(server={"port": 70000}), "server.port"),
    (lambda c: c.update(server={"prot": 1}), "server.prot"),
    (lambda c: c.update(state={"backend": "etcd"}), "state.backend"),
    (lambda c: c.update(state={"redis_url": "http://x"}), "state.redis_url"),
    (lambda c: c.update(timeouts={"connect_s": 0}), "timeouts.connect_s"),
    (lambda c: c.update(monitor={"interval_s": True}), "monitor.interval_s"),
    (lambda c: c.update(routing={"policy": "magic"}), "routing.policy"),
    (lambda c: c.update(bogus=1), "bogus"),
    (lambda c: c["clusters"][0]["pools"].append(dict(c["clusters"][0]["pools"][0])), "clusters[0].pools[1].name"),
    (lambda c: c["clusters"][0]["pools"].append({**c["clusters"][0]["pools"][0], "name": "q"}),
     "clusters[0].pools[1].engines[0].url"),  # one engine in two pools would be scheduled twice over
    (lambda c: c["models"].append({"name": "m"}), "models[1].name"),
    (lambda c: c["clusters"][0].update(pools=[]), "clusters[0].pools"),
    (lambda c: c["clusters"][0]["pools"][0].update(models=[]), "clusters[0].pools[0].models"),
    (lambda c: c["clusters"][0]["pools"][0].update(models=[""]), "clusters[0].pools[0].models[0]"),
    (lambda c: c["clusters"][0]["pools"][0].update(simulated={"count": 1, "scheduling_policy": "lifo"}),
     "clusters[0].pools[0].simulated.scheduling_policy"),
    (lambda c: (c["models"].append({"name": "m2"}), c["clusters"][0]["pools"][0].update(
        models=["m", "m2"], simulated={"count": 1})), "clusters[0].pools[0].models"),
    (lambda c: c.update(clusters="c"), "clusters"),
    (lambda c: c.update(scheduling={"maestro_order": "random"}), "scheduling.maestro_order"),
    (lambda c: c.update(server={"api_keys": ["k", ""]}), "server.api_keys[1]"),
    (lambda c: c.update(predictor={"online": {"base_data": [""]}}), "predictor.online.base_data[0]"),
    (lambda c: c.update(predictor={"online": {"path": ""}}), "predictor.online.path"),
])
def test_invalid_configs_name_the_field(mutate, field):
    raw = base()
    mutate(raw)
    with pytest.raises(ConfigError) as caught:
        parse_config(raw)
    assert caught.value.field_path == field
    assert field in str(caught.value)


def test_cli_exits_2_with_one_message(tmp_path):
    raw = base()
    raw["clusters"][0]["pools"][0]["kind"] = "tgi"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    for command in (["serve", "--config", str(path)], ["check-config", str(path)]):
        done = subprocess.run([sys.executable, "-m", "gateway.cli", *command], capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 2
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "clusters[0].pools[0].kind" in lines[0]
    path.write_text("clusters: [unclosed")
    done = subprocess.run([sys.executable, "-m", "gateway.cli", "check-config", str(path)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and "invalid YAML" in done.stderr
    done = subprocess.run([sys.executable, "-m", "gateway.cli", "check-config", str(tmp_path / "missing.yaml")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "cannot read" in done.stderr


def test_simulated_pool_options_are_checked_at_load():
    raw = base()
    raw["models"][0]["max_model_len"] = 100000
    raw["clusters"][0]["pools"][0] = {"name": "p", "kind": "vllm", "models": ["m"],
                                      "simulated": {"count": 1, "kv_blocks": 16}}
    with pytest.raises(ConfigError) as caught:
        parse_config(raw)
    assert caught.value.field_path == "clusters[0].pools[0].simulated"
    assert "max_model_len" in str(caught.value)
