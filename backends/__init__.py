"""Engine adapters (vLLM, vLLM-Omni), simulated engines, and node-side tooling."""
