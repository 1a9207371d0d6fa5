"""Shared state behind one interface: in-memory (embedded default) or Redis (several gateways/clusters)."""

from gateway.state.base import StateStore, StateUnavailable

__all__ = ["StateStore", "StateUnavailable", "make_state_store"]


def make_state_store(config) -> StateStore:  # config: gateway.config.StateConfig
    """Build the store the config names. Imports lazily so the memory default never loads redis."""
    if config.backend == "redis":
        from gateway.state.redis import RedisStateStore

        return RedisStateStore(config.redis_url, key_prefix=config.key_prefix, timeout_s=config.redis_timeout_s,
                               max_connections=config.redis_max_connections, max_workflows=config.max_workflows)
    from gateway.state.memory import MemoryStateStore

    return MemoryStateStore(max_workflows=config.max_workflows)
