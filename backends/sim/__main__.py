"""``python -m backends.sim --count N --base-port P``: serve simulated engines until interrupted.

The ``maestro sim-engines`` command wraps the same :func:`backends.sim.serve_sim_engines_forever`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib

from backends.sim.options import SimDiTOptions, SimEngineOptions
from backends.sim.runner import check_serve_counts, serve_sim_engines_forever
from gateway.cli import add_vllm_flag_arguments, vllm_flag_options
from gateway.listen import CannotListen


def main(argv: list[str] | None = None) -> None:
    defaults = SimEngineOptions()
    parser = argparse.ArgumentParser(prog="python -m backends.sim", description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1, help="simulated vLLM engines")
    parser.add_argument("--dit-count", type=int, default=0, help="simulated vLLM-Omni image engines")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--base-port", type=int, default=0, help="first port (0: ephemeral ports)")
    parser.add_argument("--model", default=defaults.model)
    parser.add_argument("--max-model-len", type=int, default=defaults.max_model_len)
    parser.add_argument("--time-scale", type=float, default=defaults.time_scale)
    parser.add_argument("--max-num-seqs", type=int, default=defaults.max_num_seqs)
    parser.add_argument("--kv-blocks", type=int, default=defaults.kv_blocks)
    parser.add_argument("--block-size", type=int, default=defaults.block_size)
    parser.add_argument("--scheduling-policy", choices=("fcfs", "priority"), default=defaults.scheduling_policy)
    parser.add_argument("--mean-output-tokens", type=int, default=defaults.mean_output_tokens)
    parser.add_argument("--wake-delay-s", type=float, default=defaults.wake_delay_s)
    parser.add_argument("--max-num-queued-reqs", type=int, default=defaults.max_num_queued_reqs)
    parser.add_argument("--max-num-queued-tokens", type=int, default=defaults.max_num_queued_tokens)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    add_vllm_flag_arguments(parser)
    args = parser.parse_args(argv)
    options = SimEngineOptions(
        model=args.model, max_model_len=args.max_model_len, time_scale=args.time_scale,
        max_num_seqs=args.max_num_seqs, kv_blocks=args.kv_blocks, block_size=args.block_size,
        scheduling_policy=args.scheduling_policy, mean_output_tokens=args.mean_output_tokens,
        wake_delay_s=args.wake_delay_s, max_num_queued_reqs=args.max_num_queued_reqs,
        max_num_queued_tokens=args.max_num_queued_tokens, seed=args.seed,
        **vllm_flag_options(args))
    try:
        options.validate()
        check_serve_counts(args.count, args.dit_count, args.base_port)
    except ValueError as exc:
        parser.error(str(exc))
    dit_options = SimDiTOptions(time_scale=args.time_scale, seed=args.seed)
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run
    with contextlib.suppress(KeyboardInterrupt):
        try:
            runner(serve_sim_engines_forever(args.count, options, args.host, args.base_port, args.dit_count,
                                             dit_options))
        except CannotListen as exc:
            parser.exit(1, f"{parser.prog}: {exc.strerror}\n")


if __name__ == "__main__":
    main()
