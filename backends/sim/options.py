"""Operator-facing knobs of the simulated engines (mirrors ``gateway.config.SimulatedEngines`` plus a few more)."""

from __future__ import annotations

from dataclasses import dataclass

SCHEDULING_POLICIES = ("fcfs", "priority")
DEFAULT_SIM_MODEL = "maestro-sim-llama-8b"  # same default name as gateway.config.DEFAULT_MODEL
DEFAULT_SIM_DIT_MODEL = "maestro-sim-dit"


@dataclass(frozen=True)
class SimEngineOptions:
    """One simulated vLLM engine (all engines started together share these; ``seed`` is offset per engine).

    Times are engine (GPU) seconds; every wait is divided by ``time_scale`` (10 = ten times faster than real).
    """

    model: str = DEFAULT_SIM_MODEL
    max_model_len: int = 8192
    time_scale: float = 1.0
    max_num_seqs: int = 128
    kv_blocks: int = 8192
    block_size: int = 16
    scheduling_policy: str = "fcfs"  # "fcfs" | "priority" (vLLM --scheduling-policy)
    mean_output_tokens: int = 128  # mean of the lognormal output-length draw
    output_tokens_sigma: float = 0.8  # sigma of that lognormal (log space)
    wake_delay_s: float = 2.0  # engine seconds from POST /wake_up to awake
    seed: int = 0
    max_num_batched_tokens: int = 8192  # token budget per iteration (chunked prefill), vLLM's flag
    max_num_queued_reqs: int = 0  # >0: answer 503 "busy" beyond this many unfinished requests (vLLM's flag)
    max_num_queued_tokens: int = 0  # >0: answer 503 while this many prompt tokens await their first token (ditto)
    cost_scale: float = 1.0  # multiply every cost-model time (e.g. 2.0 = a GPU half as fast)
    calibration_dir: str | None = None  # None: $MAESTRO_CALIBRATION_DIR or ../shared/data/calibration
    # The model's vocabulary (config.json's vocab_size), against which vLLM checks the token ids a request names
    # (logit_bias, stop_token_ids, allowed_token_ids, a token-id prompt); 128256 is Llama 3 8B's, as the
    # default model's name says. vLLM's --max-logprobs (default 20; -1: the vocabulary size) bounds logprobs.
    vocab_size: int = 128256
    max_logprobs: int = 20
    # Tool choices accepted, as a vLLM started with --enable-auto-tool-choice --tool-call-parser accepts them (the
    # deployment multi-agent clients need; the answer is still text: tool calls are not simulated). False answers
    # every tool choice but "none" with the 400 of a plain `vllm serve` (which the real-vLLM stage runs).
    tool_calling: bool = True

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field."""
        for name in ("max_model_len", "max_num_seqs", "kv_blocks", "block_size", "mean_output_tokens",
                     "max_num_batched_tokens", "vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not self.time_scale > 0:
            raise ValueError(f"time_scale must be > 0, got {self.time_scale!r}")
        if not self.cost_scale > 0:
            raise ValueError(f"cost_scale must be > 0, got {self.cost_scale!r}")
        if self.wake_delay_s < 0:
            raise ValueError(f"wake_delay_s must be >= 0, got {self.wake_delay_s!r}")
        if self.output_tokens_sigma < 0:
            raise ValueError(f"output_tokens_sigma must be >= 0, got {self.output_tokens_sigma!r}")
        if not isinstance(self.max_logprobs, int) or isinstance(self.max_logprobs, bool) or self.max_logprobs < -1:
            raise ValueError(f"max_logprobs must be an integer >= -1, got {self.max_logprobs!r}")
        for name in ("max_num_queued_reqs", "max_num_queued_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        if self.scheduling_policy not in SCHEDULING_POLICIES:
            raise ValueError(f"scheduling_policy must be one of {SCHEDULING_POLICIES}, "
                             f"got {self.scheduling_policy!r}")
        if self.kv_blocks * self.block_size < self.max_model_len:
            # vLLM refuses to start when one max-length sequence does not fit in the KV cache
            raise ValueError(f"kv_blocks * block_size ({self.kv_blocks * self.block_size} tokens) must hold "
                             f"one max_model_len ({self.max_model_len}) sequence")
        if not self.model:
            raise ValueError("model must be a non-empty string")


@dataclass(frozen=True)
class SimDiTOptions:
    """One simulated vLLM-Omni DiT (image) engine. Requests run one at a time, ``n`` images as one batch."""

    model: str = DEFAULT_SIM_DIT_MODEL
    time_scale: float = 1.0
    dit_profile: str = "dit_xl_2"  # calibration model: "dit_xl_2" | "dit_3b"
    default_size: str = "1024x1024"
    default_steps: int = 50
    parallel_degree: int = 1  # GPUs per request (sequence parallel)
    scaling_efficiency: float = 0.9  # per doubling of parallel_degree; not from the data
    max_size: int = 4096  # largest width/height accepted
    seed: int = 0
    cost_scale: float = 1.0
    calibration_dir: str | None = None

    def validate(self) -> None:
        if not self.time_scale > 0:
            raise ValueError(f"time_scale must be > 0, got {self.time_scale!r}")
        if self.parallel_degree < 1:
            raise ValueError(f"parallel_degree must be >= 1, got {self.parallel_degree!r}")
        if self.dit_profile not in ("dit_xl_2", "dit_3b"):  # backends.sim.cost_model.DIT_PROFILES
            raise ValueError(f"dit_profile must be 'dit_xl_2' or 'dit_3b', got {self.dit_profile!r}")
        if not 0 < self.scaling_efficiency <= 1:
            raise ValueError(f"scaling_efficiency must be in (0, 1], got {self.scaling_efficiency!r}")
        if self.default_steps < 1:
            raise ValueError(f"default_steps must be >= 1, got {self.default_steps!r}")
        if not self.model:
            raise ValueError("model must be a non-empty string")
