"""``maestro`` command line: serve, sim-engines, check-config, bench.

Exit codes: 0 success (also when stopped by SIGTERM, SIGINT or SIGHUP), 1 runtime failure (an address that cannot be
bound, in one line), 2 usage or configuration error (one message naming the field), 130 a Ctrl-C during start-up,
or during any other command (``maestro: interrupted``, no traceback; import and train write their output
atomically, so nothing half-written is left).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.config import Config

EXIT_CONFIG = 2
EXIT_FAILURE = 1
EXIT_INTERRUPTED = 130  # a Ctrl-C before the signal handlers are in place, or in a command that is no server
                        # (128 + SIGINT, as shells report it)
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _load(path: str | None) -> Config:
    from gateway.config import default_config, load_config

    return load_config(path) if path else default_config()


def _install_uvloop() -> None:
    import asyncio

    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:  # uvloop is a hard dependency, but the gateway still works on asyncio's loop
        pass


def _run_server(main) -> int:
    """``asyncio.run(main)`` on uvloop; an address that cannot be bound is one line on stderr and exit 1."""
    import asyncio

    from gateway.listen import CannotListen

    _install_uvloop()
    try:
        asyncio.run(main)
    except CannotListen as exc:
        print(f"maestro: {exc.strerror}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return 0


async def _run_until_signal(start, stop, on_repeat=None) -> None:
    """Start, serve until SIGINT, SIGTERM or SIGHUP (:func:`gateway.listen.stop_signals`), then stop cleanly; a signal
    during the stop calls ``on_repeat``."""
    from gateway.listen import stop_signals

    with stop_signals(on_repeat) as stopping:
        try:
            await start()
            await stopping.wait()
        finally:
            await stop()


def cmd_serve(args: argparse.Namespace) -> int:
    from gateway.listen import MAX_PORT

    if args.port is not None and not 0 <= args.port <= MAX_PORT:
        print(f"maestro serve: --port must be from 0 to {MAX_PORT}, got {args.port}", file=sys.stderr)
        return EXIT_CONFIG
    from gateway.config import config_warnings

    config = _load(args.config)
    for warning in config_warnings(config):
        logging.getLogger("maestro.config").warning("%s", warning)
    from gateway.app import Gateway

    gateway = Gateway(config)

    async def start() -> None:
        base_url = await gateway.start(args.host, args.port)
        _freeze_startup_objects()
        up = gateway.registry.up_count()
        print(f"Maestro gateway listening on {base_url}  ({up}/{len(gateway.registry.states)} engines up, "
              f"state: {config.state.backend})", flush=True)
        key = "<one of server.api_keys>" if config.server.api_keys else "any"  # a key is no line for a log
        print(f"OpenAI SDK: OpenAI(base_url=\"{base_url}/v1\", api_key=\"{key}\")", flush=True)
        print(f"Models: {', '.join(gateway.registry.models())}", flush=True)

    return _run_server(_run_until_signal(start, gateway.stop, gateway.hurry))


def _freeze_startup_objects() -> None:
    """Take what start-up made (modules, the config, the predictor: about 70,000 objects) out of the cyclic
    collector's sight. Each full collection walked them all again: under load one came every 8-15 s and held the
    event loop 40-115 ms. Frozen objects are still freed when their last reference goes (a predictor that a refit
    replaces holds no cycle: it goes); only a cycle among them would be kept, and start-up leaves none behind
    (collected first)."""
    import gc

    gc.collect()
    gc.freeze()


def add_vllm_flag_arguments(parser: argparse.ArgumentParser) -> None:
    """The simulated engine's stand-ins for the vLLM server flags that decide what it refuses (its model's
    vocabulary, ``--max-logprobs``, a tool parser): one definition for ``maestro sim-engines`` and ``python -m
    backends.sim``. Left out, they are None and SimEngineOptions' defaults apply (:func:`vllm_flag_options`)."""
    parser.add_argument("--vocab-size", type=int,
                        help="the model's vocabulary, which bounds the token ids a request names (default 128256, "
                             "Llama 3's)")
    parser.add_argument("--max-logprobs", type=int, help="vLLM's --max-logprobs (default 20; -1: the vocabulary)")
    parser.add_argument("--no-tool-calling", dest="tool_calling", action="store_false", default=None,
                        help="refuse tool choices as a vLLM without --enable-auto-tool-choice --tool-call-parser does")


def vllm_flag_options(args: argparse.Namespace) -> dict:
    """The SimEngineOptions fields :func:`add_vllm_flag_arguments`' arguments set (those given)."""
    return {name: value for name in ("vocab_size", "max_logprobs", "tool_calling")
            if (value := getattr(args, name)) is not None}


def cmd_sim_engines(args: argparse.Namespace) -> int:
    from backends.sim import SimEngineOptions, serve_sim_engines_forever
    from backends.sim.runner import check_serve_counts, dit_options_like

    options = SimEngineOptions(model=args.model, max_model_len=args.max_model_len, time_scale=args.time_scale,
                               scheduling_policy=args.scheduling_policy, max_num_seqs=args.max_num_seqs,
                               kv_blocks=args.kv_blocks, mean_output_tokens=args.mean_output_tokens,
                               **vllm_flag_options(args))
    dit_options = dit_options_like(options, args.dit_model)
    try:
        options.validate()
        dit_options.validate()
        check_serve_counts(args.count, args.dit_count, args.base_port)
    except ValueError as exc:
        print(f"maestro sim-engines: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    return _run_server(serve_sim_engines_forever(args.count, options, args.host, args.base_port,
                                                 dit_count=args.dit_count, dit_options=dit_options))


def cmd_check_config(args: argparse.Namespace) -> int:
    from gateway.config import config_warnings, load_config
    from gateway.prediction import check_predictor_files

    path = args.config or args.config_option
    if not path or (args.config and args.config_option and args.config != args.config_option):
        print("maestro check-config: give one config file (as an argument or with --config)", file=sys.stderr)
        return 2
    config = load_config(path)
    check_predictor_files(config)  # what serve would refuse at start-up, checked without side effects
    for warning in config_warnings(config):
        print(f"warning: {warning}", file=sys.stderr)
    engines = sum(len(p.engines) + (p.simulated.count if p.simulated else 0) for _, p in config.pools())
    print(f"config OK: {len(config.clusters)} cluster(s), {len(config.pools())} pool(s), {engines} engine(s), "
          f"models: {', '.join(m.name for m in config.models)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="maestro", description="Maestro: an OpenAI-compatible gateway that "
                                     "schedules multi-agent LLM and DiT workloads across engine pools.")
    parser.add_argument("--log-level", default="INFO", type=str.upper, choices=LOG_LEVELS,
                        help="logging level (default INFO)")
    sub = parser.add_subparsers(dest="command", required=True)

    def log_level_here(command: argparse.ArgumentParser) -> None:
        """``maestro serve --log-level DEBUG`` too, not only before the command (SUPPRESS: the top level's
        value stands when it is not given here)."""
        command.add_argument("--log-level", default=argparse.SUPPRESS, type=str.upper, choices=LOG_LEVELS,
                             help="logging level (as maestro --log-level)")

    serve = sub.add_parser("serve", help="run the gateway (default: simulated engines, in-memory state)")
    serve.add_argument("--config", help="YAML config file (default: the embedded simulated setup)")
    log_level_here(serve)
    serve.add_argument("--host", help="listen address (overrides server.host)")
    serve.add_argument("--port", type=int, help="listen port (overrides server.port; 0 = any free port)")
    serve.set_defaults(func=cmd_serve)

    sim = sub.add_parser("sim-engines", help="run simulated vLLM engines that speak vLLM's HTTP surface")
    sim.add_argument("--count", type=int, default=2, help="number of LLM engines (default 2)")
    sim.add_argument("--dit-count", type=int, default=0, help="number of simulated DiT (vLLM-Omni) engines")
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--base-port", type=int, default=8100, help="first port; engine i listens on base+i")
    sim.add_argument("--model", default="maestro-sim-llama-8b", help="served model name of the LLM engines")
    sim.add_argument("--dit-model", default="maestro-sim-dit",
                     help="served model name of the DiT engines (like vLLM-Omni, they answer 400 for another)")
    sim.add_argument("--max-model-len", type=int, default=8192)
    sim.add_argument("--time-scale", type=float, default=1.0, help="run this many times faster than real time")
    sim.add_argument("--scheduling-policy", choices=("fcfs", "priority"), default="fcfs")
    sim.add_argument("--max-num-seqs", type=int, default=128)
    sim.add_argument("--kv-blocks", type=int, default=8192)
    sim.add_argument("--mean-output-tokens", type=int, default=128)
    add_vllm_flag_arguments(sim)
    log_level_here(sim)
    sim.set_defaults(func=cmd_sim_engines)

    check = sub.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("config", nargs="?", help="YAML config file")
    check.add_argument("--config", dest="config_option", metavar="CONFIG",
                       help="the same, named as serve takes it")
    log_level_here(check)
    check.set_defaults(func=cmd_check_config)

    from predictor.cli import add_predictor_commands

    add_predictor_commands(sub)

    _add_loadgen_commands(sub)

    bench = sub.add_parser("bench", help="benchmarks that print figures for docs/benchmarks.md")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    overhead = bench_sub.add_parser("overhead", help="latency and throughput the gateway adds over a direct call")
    try:
        from loadgen.bench import overhead as overhead_bench

        overhead_bench.add_arguments(overhead)
        overhead.set_defaults(func=overhead_bench.main)
    except ImportError as exc:  # pragma: no cover - only while the benchmark module is missing
        overhead.set_defaults(func=lambda _args, exc=exc: _unavailable(exc))
    predictor_parser = bench_sub.add_parser("predictor", help="time Predictor.predict() on real requests")
    from predictor import bench as predictor_bench

    predictor_bench.add_arguments(predictor_parser)
    predictor_parser.set_defaults(func=predictor_bench.main)
    return parser


def _add_loadgen_commands(sub) -> None:
    """``maestro loadgen workload|live|report|simulate|experiment``; each module owns its arguments."""
    loadgen = sub.add_parser("loadgen", help="multi-agent workloads: generate, run live, simulate, report")
    commands = loadgen.add_subparsers(dest="loadgen", required=True)
    entries = [
        ("workload", "write a maestro-workload file from templates, traces and arrival processes",
         "loadgen.workloads", "add_workload_arguments", "workload_main"),
        ("live", "run a workload against an OpenAI-compatible endpoint over HTTP",
         "loadgen.live", "add_live_arguments", "live_main"),
        ("report", "tables and plots from result files", "loadgen.report", "add_report_arguments", "report_main"),
        ("simulate", "run a workload in the discrete-event simulator (same scheduling code, virtual clock)",
         "loadgen.experiments", "add_simulate_arguments", "simulate_main"),
        ("experiment", "run a named experiment (E1..E4) and print its table",
         "loadgen.experiments", "add_experiment_arguments", "experiment_main"),
    ]
    import importlib

    for name, help_text, module_name, add_name, main_name in entries:
        parser = commands.add_parser(name, help=help_text)
        try:
            module = importlib.import_module(module_name)
            getattr(module, add_name)(parser)
            parser.set_defaults(func=getattr(module, main_name))
        except (ImportError, AttributeError) as exc:  # pragma: no cover - only while a module is missing
            parser.set_defaults(func=lambda _args, exc=exc: _unavailable(exc))


def _unavailable(exc: Exception) -> int:
    print(f"maestro: this command is unavailable: {exc}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    """The ``maestro`` command. A Ctrl-C is one line and exit 130 wherever it lands: in predictor import or
    train, loadgen, or while :func:`build_parser` imports the commands' modules (a second or two, when it printed
    a traceback). The servers map their own."""
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print("maestro: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not logging.getLogger().isEnabledFor(logging.DEBUG):
        # the openai SDK's HTTP client logs a line a request at INFO: `loadgen live --client openai` drowned its
        # progress in them (DEBUG keeps them)
        for name in ("httpx", "httpx2"):
            logging.getLogger(name).setLevel(logging.WARNING)
    from gateway.config import ConfigError
    from predictor.role_labels import RolesFileError

    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"maestro: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except RolesFileError as exc:  # predictor/roles.yaml, read when a command first maps a role
        print(f"maestro: {exc}", file=sys.stderr)
        return EXIT_CONFIG


if __name__ == "__main__":
    sys.exit(main())
