"""Admission policies as named plugins: how many KV tokens a request reserves before it may start.

``none``        reserve nothing: every request goes straight to an engine, which queues and preempts itself.
``max_tokens``  worst case: prompt + max_tokens (what engines assume; the baseline the paper compares with).
``predicted``   prompt + predicted p90 output; the reservation grows while tokens stream if the request
                outlives it, and is settled on the actual count when it ends.
Reservations are rounded up to whole KV blocks, as the engine allocates them, and count what vLLM holds for a
request with several answers (``n``, or a legacy completion's batch of prompts): see :func:`kv_footprint`.
"""

from __future__ import annotations

from gateway.core.request import SchedRequest
from predictor.kv import kv_footprint

ADMISSION_POLICIES = ("none", "max_tokens", "predicted")


def reservation_tokens(policy: str, request: SchedRequest, block_size: int = 16) -> int:
    """Tokens to reserve for ``request`` under ``policy`` (0 for ``none``)."""
    if policy == "none":
        return 0
    if policy == "max_tokens":
        output = request.max_tokens
    elif policy == "predicted":
        output = min(request.pred_p90, request.max_tokens)
    else:
        raise ValueError(f"unknown admission policy {policy!r}; known: {', '.join(ADMISSION_POLICIES)}")
    return kv_footprint(request.prompt_tokens, max(request.sequences, output), block_size, request.prompts,
                        request.sequences)


def grown_reservation(request: SchedRequest, generated_tokens: int, block_size: int = 16,
                      step_tokens: int = 256) -> int | None:
    """The new reservation once a streaming request has outgrown its own (None while it still fits).

    Grows in chunks of ``step_tokens`` (not per token) so a long overrun costs a few ledger calls, not
    thousands; never beyond prompt + max_tokens (for several answers, their :func:`kv_footprint`, with the
    tokens generated so far taken as spread evenly over them)."""
    prompt, prompts, sequences = request.prompt_tokens, request.prompts, request.sequences
    # one answer outgrows its reservation by its tokens themselves (a reservation capped at an engine's grant may
    # be no whole number of blocks); several, by their blocks
    needed = (prompt + generated_tokens if sequences <= 1
              else kv_footprint(prompt, generated_tokens, block_size, prompts, sequences))
    if needed <= request.reserved_tokens:
        return None
    cap = kv_footprint(prompt, request.max_tokens, block_size, prompts, sequences)
    return min(cap, kv_footprint(prompt, generated_tokens + step_tokens, block_size, prompts, sequences))
