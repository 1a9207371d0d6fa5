"""The simulated model's words: one ASCII word with a leading space per token, from an endless fixed sequence.

So an answer's text splits into exactly its completion tokens (``len(text.split()) == usage.completion_tokens``)
and every delta of a stream is valid UTF-8. Rotations of the sequence are built once, so a stretch of any length is
repeated rotations and a slice, not a join of words, on the hot path.
"""

from __future__ import annotations

WORDS = (" lorem", " ipsum", " dolor", " sit", " amet", " consectetur", " adipiscing", " elit", " sed", " do",
         " eiusmod", " tempor", " incididunt", " ut", " labore", " et", " dolore", " magna", " aliqua",
         " enim")
_NW = len(WORDS)
_ROT = tuple("".join(WORDS[(s + k) % _NW] for k in range(_NW)) for s in range(_NW))
_ROT_OFF = tuple(tuple(sum(len(WORDS[(s + k) % _NW]) for k in range(j)) for j in range(_NW + 1))
                 for s in range(_NW))


def filler_text(start: int, count: int) -> str:
    """Words ``start .. start+count-1`` of the endless filler sequence (one word per token)."""
    if count <= 0:
        return ""
    s = start % _NW
    full, rest = divmod(count, _NW)
    text = _ROT[s][:_ROT_OFF[s][rest]]
    return _ROT[s] * full + text if full else text
