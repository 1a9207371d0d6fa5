"""Micro-benchmarks for the gateway itself (``maestro bench ...``).

- :mod:`loadgen.bench.fake_upstream`: a near-zero-cost vLLM-shaped HTTP/1.1 server (raw asyncio Protocol).
- :mod:`loadgen.bench.loadclient`: a raw asyncio Protocol HTTP/1.1 load client (fixed rate and closed loop).
- :mod:`loadgen.bench.overhead`: ``maestro bench overhead``, added latency / TTFB / max req/s of the gateway.
"""
