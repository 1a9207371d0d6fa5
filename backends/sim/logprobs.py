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
as there are).

A prompt's tokens (:mod:`backends.sim.prompt_tokens`) have entries where a request asks for them, as vLLM's:

* ``prompt_logprobs: k`` (and ``echo`` with a legacy completion's ``logprobs: k`` or chat's ``top_logprobs``): a
  whole answer's ``prompt_logprobs``, ``null`` for the first token and for every other ``{"<id>": {"logprob",
  "rank", "decoded_token"}}``, the prompt's token (a made-up rank below the alternatives') and ``k`` alternatives
  ranked 1..k (``completion/serving.py``, the choice's; ``chat_completion/serving.py``, the answer's);
* a legacy completion's ``echo`` with ``logprobs``: the prompt's tokens come first in ``logprobs``, the first with
  ``null`` log probability and alternatives, the others with the prompt token and its alternatives.
"""

from __future__ import annotations

from typing import Sequence

from backends.sim.prompt_tokens import EOS_TOKEN, PromptTokens, token_id

PROMPT_RANK_BELOW = 3  # a prompt token's made-up rank: this far below its k alternatives, varying with position


def token_logprob(position: int) -> float:
    """A made-up log probability for the token at ``position``: deterministic, in [-3, -0.01)."""
    return -0.01 - ((position * 2654435761) % 2990) / 1000.0


def prompt_token_logprob(position: int) -> float:
    """A prompt token's made-up log probability: below every alternative's (which are ranked above it)."""
    return token_logprob(position) - 3.0


def alternative_logprob(rank: int) -> float:
    """The made-up log probability of a prompt position's alternative of ``rank`` (1 the likeliest)."""
    return -0.05 * rank


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

    def _prompt_alternatives(self, token: str, count: int) -> list[str]:
        """``count`` filler words other than a prompt's ``token`` (its alternatives, likeliest first)."""
        return prompt_alternatives(self.words, token, count)

    def prompt_block(self, prompt: PromptTokens, count: int, offset: int) -> tuple[dict, int]:
        """The entries of an echoed prompt in a legacy completion's ``logprobs`` (``count`` alternatives each,
        vLLM's ``prompt_logprobs`` of an echo), its first ``text_offset`` at ``offset``; and the offset after
        them."""
        block: dict = {"text_offset": [], "token_logprobs": [], "tokens": [], "top_logprobs": []}
        count = len(self.words) if count < 0 else count
        for position, token in enumerate(prompt.texts):
            shown = f"token_id:{prompt.ids[position]}" if self.as_ids else token  # (a token-id prompt's own ids)
            block["text_offset"].append(offset)
            block["tokens"].append(shown)
            if position == 0:  # the first token has no log probability (nothing before it)
                block["token_logprobs"].append(None)
                block["top_logprobs"].append(None)
            else:
                logprob = prompt_token_logprob(position)
                block["token_logprobs"].append(logprob)
                top = {shown: logprob}
                for rank, word in enumerate(self._prompt_alternatives(token, count), start=1):
                    top[self._shown(word)] = alternative_logprob(rank)
                block["top_logprobs"].append(top)
            offset += len(shown)
        return block, offset


def prompt_logprobs(prompt: PromptTokens, count: int, vocab_size: int, words: Sequence[str]) -> list[dict | None]:
    """A whole answer's ``prompt_logprobs``: ``None`` for the first token, then per token its id's entry and
    ``count`` alternatives' (-1: the vocabulary, as many words as there are), keyed by token id."""
    count = len(words) if count < 0 else count
    entries: list[dict | None] = [None]
    for position in range(1, len(prompt.texts)):
        token = prompt.texts[position]
        entry = {str(prompt.ids[position]): {"logprob": prompt_token_logprob(position),
                                             "rank": count + PROMPT_RANK_BELOW + position % 7,
                                             "decoded_token": token}}
        alternatives = prompt_alternatives(words, token, count)
        for rank, word in enumerate(alternatives, start=1):
            entry.setdefault(str(token_id(word, vocab_size)),
                             {"logprob": alternative_logprob(rank), "rank": rank, "decoded_token": word})
        entries.append(entry)
    return entries


def prompt_alternatives(words: Sequence[str], token: str, count: int) -> list[str]:
    """``count`` filler words other than a prompt's ``token``, likeliest first (a few words looked at, not all:
    a long prompt asks this once a token)."""
    return [word for word in words[:count + 1] if word != token][:count]


def merge_blocks(first: dict, second: dict) -> dict:
    """Two legacy-completion ``logprobs`` blocks as one (an echoed prompt's entries, then the answer's)."""
    return {key: first[key] + second[key] for key in first}


__all__ = ["EOS_TOKEN", "LogprobsPlan", "merge_blocks", "prompt_logprobs", "token_id", "token_logprob"]
