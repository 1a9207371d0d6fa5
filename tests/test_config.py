"""Config validation: good files load; bad ones exit 2 with one message naming the field."""

from __future__ import annotations

import os
import logging
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
    assert config.pools()[0][1].simulated.tool_calling  # agent clients' tools are accepted
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
    (lambda c: c["clusters"][0]["pools"][0].update(simulated={"count": 1, "tool_calling": "no"}),
     "clusters[0].pools[0].simulated.tool_calling"),
    (lambda c: c.update(state={"expected_gateways": 0}), "state.expected_gateways"),
    (lambda c: (c["models"].append({"name": "m2"}), c["clusters"][0]["pools"][0].update(
        models=["m", "m2"], simulated={"count": 1})), "clusters[0].pools[0].models"),
    (lambda c: c.update(clusters="c"), "clusters"),
    (lambda c: c.update(scheduling={"maestro_order": "random"}), "scheduling.maestro_order"),
    (lambda c: c.update(server={"api_keys": ["k", ""]}), "server.api_keys[1]"),
    (lambda c: c.update(server={"cors_allowed_origins": ["https://a.example", " "]}), "server.cors_allowed_origins[1]"),
    (lambda c: c.update(server={"cors_allowed_origins": "*"}), "server.cors_allowed_origins"),
    (lambda c: c.update(predictor={"online": {"base_data": [""]}}), "predictor.online.base_data[0]"),
    (lambda c: c.update(predictor={"online": {"path": ""}}), "predictor.online.path"),
    # YAML's .nan and .inf: NaN passed every comparison (a monitor interval of NaN probed thousands of times a
    # second), infinity overflowed where a duration becomes an integer
    (lambda c: c.update(monitor={"interval_s": float("nan")}), "monitor.interval_s"),
    (lambda c: c.update(scheduling={"ledger_lease_s": float("inf")}), "scheduling.ledger_lease_s"),
    (lambda c: c.update(state={"engine_ttl_s": float("nan")}), "state.engine_ttl_s"),
    (lambda c: c["clusters"][0].update(rtt_ms=float("nan")), "clusters[0].rtt_ms"),
    (lambda c: c.update(timeouts={"total_s": float("-inf")}), "timeouts.total_s"),
    # engine URLs the gateway could never reach, or would append its paths to wrongly
    (lambda c: c["clusters"][0]["pools"][0]["engines"][0].update(url="http://[::1:8100"),
     "clusters[0].pools[0].engines[0].url"),
    (lambda c: c["clusters"][0]["pools"][0]["engines"][0].update(url="http://127.0.0.1:99999"),
     "clusters[0].pools[0].engines[0].url"),
    (lambda c: c["clusters"][0]["pools"][0]["engines"][0].update(url="http://h:80?x=1"),
     "clusters[0].pools[0].engines[0].url"),
    (lambda c: c.update(state={"redis_url": "redis://127.0.0.1:99999/0"}), "state.redis_url"),
    (lambda c: c.update(state={"redis_url": "redis://h:6379/0?socket_timeout=abc"}), "state.redis_url"),
    # two engines under one id: the registry would keep one and silently drop the other
    (lambda c: c["clusters"][0]["pools"][0].update(engines=[{"url": "http://a:1", "id": "gpu"},
                                                            {"url": "http://b:1", "id": "gpu"}]),
     "clusters[0].pools[0].engines[1].id"),
    (lambda c: c["clusters"][0]["pools"][0].update(engines=[{"url": "http://a:1"},
                                                            {"url": "http://b:1", "id": "c/p/0"}]),
     "clusters[0].pools[0].engines[1].id"),
    (lambda c: c["clusters"].append({**c["clusters"][0], "pools": [{**c["clusters"][0]["pools"][0], "name": "q",
                                                                     "engines": ["http://z:1"]}]}),
     "clusters[1].name"),
    (lambda c: c.update(server={"host": ""}), "server.host"),
    (lambda c: c.update(server={"max_inflight": 8, "max_inflight_images": 9}), "server.max_inflight_images"),
    (lambda c: c.update(server={"max_inflight_images": -1}), "server.max_inflight_images"),
    # a DiT pool's simulated engine has no KV blocks or sequence limit: the keys were accepted and did nothing
    (lambda c: c["clusters"][0]["pools"].append({"name": "d", "kind": "vllm-omni", "models": ["m"],
                                                 "simulated": {"count": 1, "kv_blocks": 64}}),
     "clusters[0].pools[1].simulated.kv_blocks"),
    # a vLLM-Omni engine serves one model and answers 400 for another: a pool of two could serve neither twice
    (lambda c: (c.update(models=[{"name": "m"}, {"name": "n"}]),
                c["clusters"][0]["pools"].append({"name": "d", "kind": "vllm-omni", "models": ["m", "n"],
                                                  "engines": ["http://d:1"]})),
     "clusters[0].pools[1].models"),
    # headers the gateway sets, that belong to one hop, carry credentials, or that vLLM would act on for the client
    (lambda c: c.update(server={"forward_headers": ["traceparent", "X-Data-Parallel-Rank"]}),
     "server.forward_headers[1]"),
    (lambda c: c.update(server={"forward_headers": ["authorization"]}), "server.forward_headers[0]"),
    (lambda c: c.update(server={"forward_headers": ["X-Request-Id"]}), "server.forward_headers[0]"),
    (lambda c: c.update(server={"forward_headers": ["X-Vllm-Priority"]}), "server.forward_headers[0]"),
    (lambda c: c.update(server={"forward_headers": ["X Bad"]}), "server.forward_headers[0]"),
    (lambda c: c.update(server={"forward_headers": "traceparent"}), "server.forward_headers"),
    (lambda c: c["clusters"][0]["pools"][0]["engines"][0].update(api_key=""),
     "clusters[0].pools[0].engines[0].api_key"),
    (lambda c: c["clusters"][0]["pools"][0]["engines"][0].update(api_key="a\nb"),  # no header can carry it
     "clusters[0].pools[0].engines[0].api_key"),
    (lambda c: c["clusters"][0]["pools"][0]["engines"][0].update(api_key="k", api_key_env="K"),
     "clusters[0].pools[0].engines[0]"),
    (lambda c: c["clusters"][0]["pools"][0].update(api_key_env="MAESTRO_TEST_SURELY_NOT_SET"),
     "clusters[0].pools[0].api_key_env"),
    # TTLs the state store keeps: past ten years Redis failed each call as if it were down
    (lambda c: c.update(scheduling={"workflow_ttl_s": 1e20}), "scheduling.workflow_ttl_s"),
    (lambda c: c.update(scheduling={"ledger_lease_s": 4e8}), "scheduling.ledger_lease_s"),
    (lambda c: c.update(state={"engine_ttl_s": 1e12}), "state.engine_ttl_s"),
])
def test_invalid_configs_name_the_field(mutate, field):
    raw = base()
    mutate(raw)
    with pytest.raises(ConfigError) as caught:
        parse_config(raw)
    assert caught.value.field_path == field
    assert field in str(caught.value)


@pytest.mark.parametrize("key", ["my-key ", " my-key", "my-key\n", "my\tkey"])
def test_a_gateway_key_no_client_could_send_is_refused(key):
    """A padded key (a YAML value copied with its space) was accepted, then every request got a 401."""
    raw = base()
    raw["server"] = {"api_keys": ["good", key]}
    with pytest.raises(ConfigError, match="so none would match") as caught:
        parse_config(raw)
    assert caught.value.field_path == "server.api_keys[1]"


@pytest.mark.parametrize("url", ["redis://:s3cret@h:99999/0", "redis://h:6379/0?password=s3cret&socket_timeout=abc",
                                 "http://h/0?password=s3cret", "redis://:s3cr/et@h:6379/0",
                                 "redis://ops:s3c?ret@h:6379/0"])
def test_a_refused_redis_url_is_named_without_its_password(url):
    raw = base()
    raw["state"] = {"redis_url": url}
    with pytest.raises(ConfigError) as caught:
        parse_config(raw)
    assert caught.value.field_path == "state.redis_url" and "s3cret" not in str(caught.value)
    assert "***" in str(caught.value)


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
    path.write_bytes("clusters: []\n# caf\xe9\n".encode("latin-1"))
    done = subprocess.run([sys.executable, "-m", "gateway.cli", "check-config", str(path)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and "not UTF-8" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    path.write_text("server:\n  port: 1\nserver:\n  port: 2\n")  # PyYAML would keep the second silently
    done = subprocess.run([sys.executable, "-m", "gateway.cli", "check-config", str(path)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and "'server' twice" in done.stderr
    done = subprocess.run([sys.executable, "-m", "gateway.cli", "--log-level", "verbose", "check-config", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "invalid choice" in done.stderr and "Traceback" not in done.stderr


def test_models_left_implicit_get_their_architectures_kv_figure():
    raw = base()
    del raw["models"]
    raw["clusters"][0]["pools"][0]["models"] = ["meta-llama/Llama-3-70B-Instruct"]
    assert parse_config(raw).model("meta-llama/Llama-3-70B-Instruct").kv_bytes_per_token == 327680


def test_an_infinite_loss_increase_still_turns_the_check_off():
    raw = base()
    raw["predictor"] = {"online": {"max_loss_increase": float("inf")}}
    assert parse_config(raw).predictor.online.max_loss_increase == float("inf")


def test_a_simulated_pool_takes_its_models_vocabulary_and_can_refuse_tool_choices():
    """A pool named after a model with another vocabulary (Qwen's 151,936) must not refuse its token ids; a plain
    ``vllm serve`` (no tool parser) refuses tool choices."""
    from gateway.simulated import sim_options_for

    raw = base()
    raw["clusters"][0]["pools"][0] = {"name": "p", "kind": "vllm", "models": ["m"], "simulated": {
        "count": 1, "tool_calling": False, "vocab_size": 151936, "max_logprobs": -1}}
    options = sim_options_for(parse_config(raw).pools()[0][1], 4096)
    assert (options.tool_calling, options.vocab_size, options.max_logprobs) == (False, 151936, -1)
    for bad in ({"vocab_size": 0}, {"max_logprobs": -2}, {"vocab_size": True}):
        raw["clusters"][0]["pools"][0]["simulated"] = {"count": 1, **bad}
        with pytest.raises(ConfigError) as caught:
            parse_config(raw)
        assert caught.value.field_path == "clusters[0].pools[0].simulated." + next(iter(bad))


def test_simulated_pool_options_are_checked_at_load():
    raw = base()
    raw["models"][0]["max_model_len"] = 100000
    raw["clusters"][0]["pools"][0] = {"name": "p", "kind": "vllm", "models": ["m"],
                                      "simulated": {"count": 1, "kv_blocks": 16}}
    with pytest.raises(ConfigError) as caught:
        parse_config(raw)
    assert caught.value.field_path == "clusters[0].pools[0].simulated"
    assert "max_model_len" in str(caught.value)


def test_check_config_refuses_what_serve_would_refuse_at_start(tmp_path):
    """The predictor's files are checked too (without creating anything): a model file that does not load, and
    online learning's folders through a file."""
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    for predictor, field in (({"model_path": str(tmp_path / "missing.skops")}, "predictor.model_path"),
                             ({"online": {"enabled": True, "work_dir": str(blocker / "work")}},
                              "predictor.online.work_dir"),
                             ({"online": {"enabled": True, "work_dir": str(tmp_path / "w"),
                                          "path": str(blocker / "records.jsonl")}}, "predictor.online.path")):
        raw = {**base(), "predictor": predictor}
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump(raw))
        done = subprocess.run([sys.executable, "-m", "gateway.cli", "check-config", str(path)], capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 2 and field in done.stderr, (predictor, done.stderr)
    assert not (tmp_path / "w").exists()  # nothing created
    assert not list(tmp_path.glob(".maestro-check-*"))  # the probe folder is removed


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs a /proc file system")
def test_check_config_tries_the_online_folders_rather_than_ask_os_access(tmp_path):
    """``os.access`` says yes to root for /proc, where serve then cannot make the folder: check-config said
    "config OK" to a config that serve refuses."""
    raw = {**base(), "predictor": {"online": {"enabled": True, "work_dir": "/proc/maestro-no-such/work"}}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    done = subprocess.run([sys.executable, "-m", "gateway.cli", "check-config", str(path)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and "predictor.online.work_dir" in done.stderr, done.stderr


def test_an_unusable_refit_path_names_its_error_once():
    from predictor.refit_command import UnusablePath

    error = UnusablePath("predictor.online.work_dir", FileNotFoundError(2, "No such file or directory", "/x/y"))
    assert str(error) == "[Errno 2] No such file or directory: '/x/y'" and error.errno == 2


def test_the_trace_stream_follows_the_state_key_prefix_unless_named():
    """Two gateways kept apart by their key prefix (prod, staging) shared one trace stream, and each trained on
    the other's traffic."""
    def online_key(state: dict, online: dict) -> str:
        return parse_config({**base(), "state": state, "predictor": {"online": online}}).predictor.online.redis_key

    assert online_key({}, {}) == "maestro:predictor:traces"
    assert online_key({"key_prefix": "staging"}, {}) == "staging:predictor:traces"
    assert online_key({"key_prefix": "staging"}, {"redis_key": "shared:traces"}) == "shared:traces"
    with pytest.raises(ConfigError, match="redis_key"):
        online_key({}, {"redis_key": ""})


def test_a_base_data_file_named_twice_is_refused(tmp_path):
    """Training refuses a file given twice, so such a config passed check-config and failed every refit."""
    data = tmp_path / "base.jsonl"
    data.write_text("")
    for second in (str(data), str(tmp_path / "." / "base.jsonl")):
        raw = {**base(), "predictor": {"online": {"base_data": [str(data), second]}}}
        with pytest.raises(ConfigError, match="base_data\\[0\\] again") as caught:
            parse_config(raw)
        assert caught.value.field_path == "predictor.online.base_data[1]"


def test_a_base_data_file_a_refit_writes_or_the_buffer_file_is_refused(tmp_path):
    """``save_path`` naming a base_data file: the first refit renamed its model over the operator's traces, and
    every later refit failed on them. The buffer's own file as base_data: the check's held-out records were in
    the fit."""
    data = tmp_path / "traces.jsonl"
    data.write_text("")
    online = {"enabled": True, "work_dir": str(tmp_path / "work"), "path": str(tmp_path / "records.jsonl")}
    for given, said in (({"save_path": str(data)}, "each refit writes"),
                        ({"path": str(data)}, "the buffer's own file")):
        raw = {**base(), "predictor": {"online": {**online, **given, "base_data": [str(data)]}}}
        with pytest.raises(ConfigError, match=said) as caught:
            parse_config(raw)
        assert caught.value.field_path == "predictor.online.base_data[0]"
    parse_config({**base(), "predictor": {"online": {**online, "base_data": [str(data)]}}})  # apart: fine


def test_online_learning_off_resolves_no_online_path(tmp_path, monkeypatch):
    """The online checks resolved the buffer path even with online learning off (the default): from a working
    folder since deleted, every config load failed with a bare FileNotFoundError."""
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    assert parse_config(base()).predictor.online.enabled is False


def test_yaml_merge_keys_work_and_a_key_given_twice_is_still_refused(tmp_path):
    """``<<: *anchor`` (one pool's settings reused by another) was refused as "invalid YAML" by the loader
    that refuses a key given twice."""
    from gateway.config import load_config

    path = tmp_path / "merge.yaml"
    path.write_text("models: [{name: m}, {name: m2}]\n"
                    "clusters:\n"
                    "  - name: c\n"
                    "    pools:\n"
                    "      - {name: p, models: [m], simulated: &sim {count: 1, kv_blocks: 1024}}\n"
                    "      - {name: q, models: [m2], simulated: {<<: *sim, count: 3}}\n")
    pools = load_config(path).clusters[0].pools
    assert (pools[1].simulated.count, pools[1].simulated.kv_blocks) == (3, 1024)
    path.write_text("server: {port: 1, <<: {host: 0.0.0.0}, port: 2}\n")
    with pytest.raises(ConfigError, match="'port' twice"):
        load_config(path)
    path.write_text("server: {<<: {port: 1, port: 2}}\n")  # inside a merged mapping too
    with pytest.raises(ConfigError, match="'port' twice"):
        load_config(path)
    # a mapping merged into another before it is built itself: the merge rewrote it in place, and its own
    # override of a merged key read as a key given twice
    import yaml

    from gateway.config import _UniqueKeyLoader

    text = "base: &base {k: 1}\na: {x: {mid: &mid {<<: *base, k: 2}}}\nb: {<<: *mid}\n"
    assert yaml.load(text, Loader=_UniqueKeyLoader) == yaml.safe_load(text)


def test_check_config_takes_the_file_as_serve_does_too():
    """``maestro check-config --config x.yaml`` (as ``serve`` takes it) was "unrecognized arguments"."""
    example = str(Path(__file__).resolve().parent.parent / "examples" / "local-sim.yaml")
    for argv in ([example], ["--config", example]):
        done = subprocess.run([sys.executable, "-m", "gateway.cli", "check-config", *argv], capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0 and done.stdout.startswith("config OK"), done.stderr
    done = subprocess.run([sys.executable, "-m", "gateway.cli", "check-config"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2 and "give one config file" in done.stderr


def test_a_value_of_the_wrong_type_is_shown_with_the_error(tmp_path):
    """"expected an integer, got str" named no value; YAML reads 8e6 as text, which nobody guesses."""
    from gateway.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text("models: [{name: m}]\nclusters: [{name: c, pools: [{name: p, models: [m], simulated: {}}]}]\n"
                    "server: {max_body_bytes: 8e6}\n")
    with pytest.raises(ConfigError, match=r"got str '8e6' \(YAML reads 8e6 as text: write 8000000\)"):
        load_config(path)


def test_the_log_level_may_follow_the_command():
    """``maestro serve --log-level DEBUG`` was "unrecognized arguments": only ``maestro --log-level DEBUG serve``
    was taken."""
    from gateway.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["serve", "--log-level", "debug"]).log_level == "DEBUG"
    assert parser.parse_args(["--log-level", "warning", "serve"]).log_level == "WARNING"
    assert parser.parse_args(["serve"]).log_level == "INFO"
    assert parser.parse_args(["check-config", "x.yaml", "--log-level", "error"]).log_level == "ERROR"


def test_an_engines_api_key_comes_from_its_pool_unless_its_own_and_is_never_shown(monkeypatch):
    monkeypatch.setenv("MAESTRO_TEST_POOL_KEY", "pool-secret")
    raw = base()
    pool = raw["clusters"][0]["pools"][0]
    pool["api_key_env"] = "MAESTRO_TEST_POOL_KEY"
    pool["engines"] = [{"url": "http://a:1"}, {"url": "http://b:1", "api_key": "own-secret"}]
    engines = parse_config(raw).clusters[0].pools[0].engines
    assert [e.api_key for e in engines] == ["pool-secret", "own-secret"]
    assert "secret" not in repr(engines)


def test_the_openai_sdks_request_log_lines_are_kept_out_below_debug(tmp_path):
    """``maestro loadgen live --client openai`` printed one httpx INFO line a request over its progress."""
    path = tmp_path / "ok.yaml"
    path.write_text(yaml.safe_dump(base()))
    script = ("import logging, sys; from gateway.cli import main; code = main(sys.argv[1:]); "
              "print(code, logging.getLogger('httpx2').getEffectiveLevel(), logging.getLogger('httpx').level)")
    for level, expected in (("INFO", logging.WARNING), ("DEBUG", logging.DEBUG)):
        done = subprocess.run([sys.executable, "-c", script, "--log-level", level, "check-config", str(path)],
                              capture_output=True, text=True, timeout=60)
        code, effective, _ = done.stdout.splitlines()[-1].split()  # after check-config's own line
        assert (int(code), int(effective)) == (0, expected), done.stderr


def test_a_gateway_key_the_sdk_cannot_send_is_warned_of():
    from gateway.config import config_warnings

    raw = base()
    raw["server"] = {"api_keys": ["plain", "clé"]}
    warnings = config_warnings(parse_config(raw))
    assert len(warnings) == 1 and warnings[0].startswith("server.api_keys[1] is not ASCII")
    assert "clé" not in warnings[0]  # (a key is no line for a log)


def test_check_config_warns_where_aging_can_never_happen(tmp_path):
    """Under maestro (or lsf) a request ages after scheduling.max_wait_s, but one that waits timeouts.total_s
    leaves with a 503 first: with max_wait_s 600 and total_s 60 two workflow requests starved for their whole
    60 s under load in an audit, and nothing said the settings defeat each other."""
    raw = base()
    raw["scheduling"] = {"queue_policy": "maestro"}
    raw["timeouts"] = {"total_s": 60}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    done = subprocess.run([sys.executable, "-m", "gateway.cli", "check-config", str(path)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and "config OK" in done.stdout
    assert "warning: scheduling.max_wait_s (600 s) is not below timeouts.total_s (60 s)" in done.stderr
    raw["scheduling"]["max_wait_s"] = 30
    path.write_text(yaml.safe_dump(raw))
    done = subprocess.run([sys.executable, "-m", "gateway.cli", "check-config", str(path)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and "warning" not in done.stderr


# ----------------------------------------------------------------------------------- the README's config table

_SECTIONS = ("server", "state", "timeouts", "monitor", "routing", "scheduling", "predictor")
# defaults the table words rather than writes as a value, with the value they stand for
_WORDED = {"4 MiB": 4 * 2**20, "host-pid": "", "none": (), "0 (half of `max_inflight`)": 0,
           "`{state.key_prefix}:predictor:traces`": "maestro:predictor:traces", "268435456 (256 MiB)": 268435456,
           "[traceparent, tracestate, X-Sim-Output-Tokens]": ("traceparent", "tracestate", "X-Sim-Output-Tokens"),
           '["*"]': ("*",), "[]": ()}


def _split_outside_brackets(text: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch in "[{" and 1 or ch in "]}" and -1 or 0
        if ch == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    parts.append(text[start:].strip())
    return parts


def _readme_defaults() -> dict[str, str]:
    """``{dotted key: default as written}`` for every key of the README's config table in a top-level section."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme.split("## Config reference", 1)[1].split("\n### ", 1)[0]
    rows = {}
    for line in table.splitlines():
        cells = line.split(" | ")
        if not line.startswith("| `") or len(cells) < 3:
            continue
        keys = [k.strip("`| ") for k in cells[0].replace(" / ", ", ").split(", ")]
        if keys[0].split(".")[0] not in _SECTIONS:
            continue
        parent = keys[0].rsplit(".", 1)[0]
        keys = [parent + k if k.startswith(".") else k for k in keys]
        keys = [k.removesuffix(".<role>") for k in keys]  # predictor.priors.<role>: the priors table
        defaults = _split_outside_brackets(cells[1]) if len(keys) > 1 else [cells[1].strip()]
        assert len(keys) == len(defaults), (line[:120], keys, defaults)
        rows.update(zip(keys, defaults))
    return rows


def _as_written(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def test_the_readmes_config_table_names_every_setting_with_its_default():
    """Every setting of the top-level sections is in the README's table with the default the code has, and the
    table names no setting the code lacks: the table is what operators configure from."""
    import dataclasses

    config = default_config()
    documented = _readme_defaults()
    fields = {}
    for section in _SECTIONS:
        stack = [(section, getattr(config, section))]
        while stack:
            prefix, obj = stack.pop()
            for field in dataclasses.fields(obj):
                value = getattr(obj, field.name)
                if dataclasses.is_dataclass(value):
                    stack.append((f"{prefix}.{field.name}", value))
                else:
                    fields[f"{prefix}.{field.name}"] = value
    assert sorted(set(fields) - set(documented)) == [], "settings the README's table does not name"
    assert sorted(set(documented) - set(fields)) == [], "README rows naming no setting"
    wrong = {}
    for key, written in documented.items():
        value = fields[key]
        if key == "predictor.priors":
            assert written == "built-in" and not value  # none configured: predictor.predictor.DEFAULT_PRIORS
            continue
        literal = _as_written(value) == written.strip('"`') or (written == '""' and value == "")
        if not (literal or (written in _WORDED and value == _WORDED[written])):
            wrong[key] = (written, value)
    assert wrong == {}, "README defaults that differ from the code's"


def test_ctrl_c_while_the_commands_load_is_one_line_and_exit_130(monkeypatch, capsys):
    """``maestro`` imports every command's module before it reads its arguments (a second or two): a Ctrl-C then
    printed a traceback, where one during a command is one line and exit 130."""
    import gateway.cli as cli

    def loading():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", loading)
    try:
        assert cli.main(["check-config", "x.yaml"]) == cli.EXIT_INTERRUPTED
    except KeyboardInterrupt:  # escaped: a traceback (and here, the end of the test run)
        pytest.fail("the Ctrl-C escaped maestro's main()")
    assert capsys.readouterr().err == "maestro: interrupted\n"
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", "import gateway.cli"], capture_output=True,
                          text=True, timeout=60)
    loaded = {line.split("|")[-1].strip() for line in done.stderr.splitlines()}
    assert "gateway.cli" in loaded and not {"asyncio", "gateway.config", "numpy"} & loaded  # imported in main
