"""Log probabilities the simulated engine returns (``logprobs``), in vLLM 0.32's shapes.

A simulated token has no model behind it, so its log probability is made up, deterministically: a value in
[-3, -0.01) from its position in the answer. What a client reads is vLLM's:

* chat (``logprobs: true``, ``top_logprobs: k``): ``{"content": [{"token", "logprob", "bytes", "top_logprobs":
  [k x {"token", "logprob", "bytes"}]}, ...]}``, one entry a token (``chat_completion/serving.py``
  ``_create_chat_logprobs``); the sampled token comes first among its alternatives, as a greedy one does;
* legacy completions (``logprobs: k``): ``{"text_offset", "token_logprobs", "tokens", "top_logprobs": [{token:
  logprob}, ...]}``, the sampled token and ``k - 1`` alternatives (``completion/serving.py``); a stream's offsets
  go on from chunk to chunk;
* ``return_tokens_as_token_ids``: tokens written ``token_id:<id>`` (and, as vLLM does, a chat entry's ``bytes``
  still its text's, a legacy completion's offsets counting the placeholders' characters).

An answer's end-of-sequence token (where it ends by itself) has an entry too, as in vLLM, whose token is the sim
model's ``<|eot_id|>`` (the default model is a Llama 3). The alternatives are other filler words (at most as many
as there are). Not simulated (null): ``prompt_logprobs`` and the prompt's entries of an ``echo``.
"""

from __future__ import annotations

import zlib
from typing import Sequence

EOS_TOKEN = "<|eot_id|>"


def token_logprob(position: int) -> float:
    """A made-up log probability for the token at ``position``: deterministic, in [-3, -0.01)."""
    return -0.01 - ((position * 2654435761) % 2990) / 1000.0


def token_id(token: str, vocab_size: int) -> int:
    """A stable id for a simulated token, within the vocabulary (what ``return_tokens_as_token_ids`` shows)."""
    return zlib.crc32(token.encode()) % vocab_size


class LogprobsPlan:
    """What an answer's ``logprobs`` hold: ``top`` alternatives per token (chat's ``top_logprobs``, a legacy
    completion's ``logprobs``), from the filler ``words``; tokens as their text or as ``token_id:<id>``."""

    __slots__ = ("chat", "top", "as_ids", "vocab_size", "words")

    def __init__(self, chat: bool, top: int, as_ids: bool, vocab_size: int, words: Sequence[str]) -> None:
        self.chat = chat
        self.top = min(top if top >= 0 else vocab_size, len(words))  # -1: the vocabulary; no more than the words
        self.as_ids = as_ids
        self.vocab_size = vocab_size
        self.words = words

    def _shown(self, token: str) -> str:
        return f"token_id:{token_id(token, self.vocab_size)}" if self.as_ids else token

    def _alternatives(self, token: str, position: int, count: int) -> list[tuple[str, float]]:
        """The sampled token and ``count - 1`` other words, each less likely than the one before."""
        logprob = token_logprob(position)
        found = [(token, logprob)]
        start = position % len(self.words)
        for step in range(len(self.words)):
            if len(found) >= count:
                break
            word = self.words[(start + step + 1) % len(self.words)]
            if word != token:
                found.append((word, logprob - 0.25 * len(found)))
        return found

    def chat_entries(self, tokens: Sequence[str], start: int) -> list[dict]:
        """``logprobs.content`` for the tokens at ``start, start+1, ...``."""
        entries = []
        for offset, token in enumerate(tokens):
            position = start + offset
            alternatives = self._alternatives(token, position, self.top) if self.top else ()
            entries.append({"token": self._shown(token), "logprob": token_logprob(position),
                            "bytes": list(token.encode()),
                            "top_logprobs": [{"token": (shown := self._shown(word)), "logprob": lp,
                                              "bytes": list(shown.encode())} for word, lp in alternatives]})
        return entries

    def completion_block(self, tokens: Sequence[str], start: int, offset: int) -> tuple[dict, int]:
        """A legacy completion's ``logprobs`` for the tokens at ``start, ...``, its first ``text_offset`` at
        ``offset``; and the offset after them (a stream's next chunk goes on from it)."""
        block: dict = {"text_offset": [], "token_logprobs": [], "tokens": [], "top_logprobs": []}
        for index, token in enumerate(tokens):
            position = start + index
            shown = self._shown(token)
            block["text_offset"].append(offset)
            block["token_logprobs"].append(token_logprob(position))
            block["tokens"].append(shown)
            block["top_logprobs"].append({self._shown(word): lp for word, lp in
                                          self._alternatives(token, position, max(self.top, 1))})
            offset += len(shown)
        return block, offset


__all__ = ["EOS_TOKEN", "LogprobsPlan", "token_id", "token_logprob"]
