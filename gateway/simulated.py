"""Map a pool's ``simulated:`` config block onto the simulated engines' options.

Kept apart from ``gateway.config`` so the config stays free of engine internals, and from ``backends.sim``
so the simulator does not import gateway config types.
"""

from __future__ import annotations

from gateway.config import Config, PoolConfig


def sim_options_for(config: Config, pool: PoolConfig):
    from backends.sim import SimEngineOptions

    sim = pool.simulated
    assert sim is not None
    model = pool.models[0]
    model_config = config.model(model)
    return SimEngineOptions(
        model=model,
        max_model_len=model_config.max_model_len if model_config else 4096,
        time_scale=sim.time_scale,
        max_num_seqs=sim.max_num_seqs,
        kv_blocks=sim.kv_blocks,
        block_size=sim.block_size,
        scheduling_policy=sim.scheduling_policy,
        mean_output_tokens=sim.mean_output_tokens,
        wake_delay_s=sim.wake_delay_s,
    )
