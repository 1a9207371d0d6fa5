"""Map a pool's ``simulated:`` config block onto the simulated engines' options, and start them.

Kept apart from ``gateway.config`` so the config stays free of engine internals, and from ``backends.sim``
so the simulator does not import gateway config types.
"""

from __future__ import annotations

from gateway.config import PoolConfig


def sim_options_for(pool: PoolConfig, max_model_len: int):
    """``SimEngineOptions`` for a ``vllm`` pool, ``SimDiTOptions`` for a ``vllm-omni`` pool."""
    from backends.sim import SimDiTOptions, SimEngineOptions

    sim = pool.simulated
    assert sim is not None
    if pool.kind == "vllm-omni":
        return SimDiTOptions(model=pool.models[0], time_scale=sim.time_scale)
    return SimEngineOptions(
        model=pool.models[0],
        max_model_len=max_model_len,
        time_scale=sim.time_scale,
        max_num_seqs=sim.max_num_seqs,
        kv_blocks=sim.kv_blocks,
        block_size=sim.block_size,
        scheduling_policy=sim.scheduling_policy,
        mean_output_tokens=sim.mean_output_tokens,
        wake_delay_s=sim.wake_delay_s,
        tool_calling=sim.tool_calling,
        vocab_size=sim.vocab_size,
        max_logprobs=sim.max_logprobs,
    )


async def start_simulated_pool(pool: PoolConfig, max_model_len: int) -> list:
    """Start the pool's simulated engines in this process; return their handles (``.url``, ``.stop()``)."""
    from backends.sim import start_sim_dit_engines, start_sim_engines

    assert pool.simulated is not None
    options = sim_options_for(pool, max_model_len)
    if pool.kind == "vllm-omni":
        return await start_sim_dit_engines(pool.simulated.count, options)
    return await start_sim_engines(pool.simulated.count, options)
