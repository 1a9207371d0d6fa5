"""Vocabulary lookup of a text's n-grams with integer keys instead of n-gram strings.

The TF-IDF blocks are binary: what one prediction needs from a text is the set of vocabulary columns whose
n-gram occurs in it. Building every n-gram as a Python string and hashing it was half the time of a prediction
on a long prompt. These indexes give the same set of columns (a test checks it against the analyzers of
:mod:`predictor.features` and scikit-learn) while most of the work runs in numpy:

- words: each token is mapped to a small integer once (one dict lookup per token, no bigram strings; 0 when no
  term has it), and a bigram is the pair of its tokens' integers read as one number, looked up by binary search
  in the sorted keys of the vocabulary's bigrams. An ASCII text (most prompts) is split without the regular
  expression: one ``bytes.translate`` lower-cases it and blanks every byte that is not a word character, and
  ``bytes.split`` cuts it (a quarter to a third of the regex's time); single-character words, which the token
  pattern skips, map to -1 and are dropped;
- characters: each character is mapped to its index in the vocabulary's alphabet (0 when no term has it; one
  table lookup by code point), and a 3- or 4-gram is that sequence of digits read as one base-(alphabet + 1)
  number; a window with an unknown character has a zero digit, which no vocabulary key has, so it cannot match.

The analyzers themselves (:func:`predictor.features.word_ngrams`, :func:`~predictor.features.char_ngrams`)
stay the definition: scikit-learn fits the vocabulary with them.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from itertools import repeat

import numpy as np

from predictor.features import ANALYZERS, add_bigrams, char_window, word_ngrams, word_tokens

_NO_COLUMNS = np.zeros(0, dtype=np.intp)
# Below this many words, building the n-gram strings and looking them up costs less than the numpy calls.
SHORT_TEXT_TOKENS = 48
# ASCII bytes as the word tokenizer sees them: A-Z lower-cased, other word characters ([a-z0-9_], what ``\w``
# matches in ASCII) kept, everything else a space.
_ASCII_WORD_CHARS = (string.ascii_lowercase + string.digits + "_").encode("ascii")
_ASCII_WORDS = bytes(i + 32 if 65 <= i <= 90 else i if i in _ASCII_WORD_CHARS else 32 for i in range(256))
# A character table indexed by code point is used when the alphabet's largest code point is below this.
MAX_TABLE_CODE_POINT = 1 << 16


def _sorted_keys(keys: list[int], columns: list[int]) -> tuple[np.ndarray, np.ndarray]:
    keys_arr = np.array(keys, dtype=np.int64)
    order = np.argsort(keys_arr, kind="stable")
    return keys_arr[order], np.array(columns, dtype=np.intp)[order]


def _distinct(columns: np.ndarray) -> np.ndarray:
    """Sorted distinct values (``np.unique`` is several times slower on a few hundred values)."""
    columns.sort()
    if len(columns) < 2:
        return columns
    keep = np.empty(len(columns), dtype=bool)
    keep[0] = True
    np.not_equal(columns[1:], columns[:-1], out=keep[1:])
    return columns[keep]


def _lookup(sorted_keys: np.ndarray, columns: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """The columns of those ``keys`` that are in ``sorted_keys`` (in no particular order).

    The keys are sorted first: numpy's binary search starts each key where the previous one ended when they
    increase, so consecutive searches read nearby memory. Measured on whole cold predict() calls (paired, the
    requests split at random between the two versions): about 20 us less per call (3 %), the sort included."""
    if not keys.size or not sorted_keys.size:
        return _NO_COLUMNS
    keys = np.sort(keys)
    position = np.searchsorted(sorted_keys, keys)
    np.minimum(position, len(sorted_keys) - 1, out=position)
    return columns[position[sorted_keys[position] == keys]]


class WordNgramIndex:
    """Columns of the word unigrams and bigrams (:func:`predictor.features.word_ngrams`) of a text."""

    def __init__(self, terms: Sequence[str]) -> None:
        self._token_id: dict[str, int] = {}  # from 1: 0 is a token no term has
        unigram_columns: list[int] = [-1]
        pairs: list[tuple[int, int, int]] = []

        def token_id(token: str) -> int:
            index = self._token_id.get(token)
            if index is None:
                index = self._token_id[token] = len(unigram_columns)
                unigram_columns.append(-1)
            return index

        for column, term in enumerate(terms):
            first, space, second = term.partition(" ")
            if space:
                pairs.append((token_id(first), token_id(second), column))
            else:
                unigram_columns[token_id(term)] = column
        # A bigram is its two ids as the digits of a base-(tokens + 1) number; with an unknown token (digit 0)
        # it cannot equal a vocabulary key, whose digits are all >= 1.
        self._base = len(unigram_columns)
        self._unigram_columns = np.array(unigram_columns, dtype=np.intp)
        self._bigram_keys, self._bigram_columns = _sorted_keys(
            [a * self._base + b for a, b, _ in pairs], [column for _, _, column in pairs])
        self._get = self._token_id.get
        # The same ids keyed by the ASCII bytes of a token, with the single-character words at -1.
        ascii_ids = {token.encode("ascii"): index for token, index in self._token_id.items() if token.isascii()}
        ascii_ids.update((bytes([char]), -1) for char in _ASCII_WORD_CHARS)
        self._get_ascii = ascii_ids.get
        self._plain = AnalyzerIndex(terms, word_ngrams)

    def columns(self, text: str) -> np.ndarray:
        """Sorted, distinct vocabulary columns of the n-grams of ``text``."""
        if text.isascii():
            words = text.encode("ascii").translate(_ASCII_WORDS).split()
            if len(words) >= SHORT_TEXT_TOKENS:
                ids = np.fromiter(map(self._get_ascii, words, repeat(0)), dtype=np.int64, count=len(words))
                return self._columns_of_ids(ids[ids >= 0])
        tokens = word_tokens(text)
        if len(tokens) < SHORT_TEXT_TOKENS:
            return self._plain.lookup(add_bigrams(tokens)) if tokens else _NO_COLUMNS
        return self._columns_of_ids(np.fromiter(map(self._get, tokens, repeat(0)), dtype=np.int64,
                                                count=len(tokens)))

    def _columns_of_ids(self, ids: np.ndarray) -> np.ndarray:
        found = self._unigram_columns[ids]
        found = found[found >= 0]
        if len(ids) > 1 and self._bigram_keys.size:
            keys = ids[:-1] * self._base + ids[1:]
            found = np.concatenate((found, _lookup(self._bigram_keys, self._bigram_columns, keys)))
        return _distinct(found)


class CharNgramIndex:
    """Columns of the character 3- and 4-grams (:func:`predictor.features.char_ngrams`) of a text."""

    def __init__(self, terms: Sequence[str]) -> None:
        alphabet = sorted({char for term in terms for char in term})
        self._base = len(alphabet) + 1
        if self._base ** 4 >= 2 ** 63:
            raise OverflowError(f"an alphabet of {len(alphabet)} characters is too large for 64-bit 4-gram keys")
        digit = {char: i + 1 for i, char in enumerate(alphabet)}  # 0: a character no term has
        self._codes = np.array([ord(char) for char in alphabet], dtype=np.uint32)
        # digit by code point; the last entry is 0, and np.take(..., mode="clip") sends larger code points there
        self._digit_table = None
        if alphabet and ord(alphabet[-1]) < MAX_TABLE_CODE_POINT:
            self._digit_table = np.zeros(ord(alphabet[-1]) + 2, dtype=np.int64)
            self._digit_table[self._codes] = np.arange(1, len(alphabet) + 1)
        keys: dict[int, tuple[list[int], list[int]]] = {3: ([], []), 4: ([], [])}
        for column, term in enumerate(terms):
            if len(term) not in keys:
                raise ValueError(f"character n-gram {term!r} is not 3 or 4 characters long")
            key = 0
            for char in term:
                key = key * self._base + digit[char]
            keys[len(term)][0].append(key)
            keys[len(term)][1].append(column)
        self._keys3, self._columns3 = _sorted_keys(*keys[3])
        self._keys4, self._columns4 = _sorted_keys(*keys[4])

    def columns(self, text: str) -> np.ndarray:
        """Sorted, distinct vocabulary columns of the n-grams of ``text``."""
        window = char_window(text)
        if len(window) < 3 or not self._codes.size:
            return _NO_COLUMNS
        if self._digit_table is not None:
            codes = (np.frombuffer(window.encode("ascii"), dtype=np.uint8) if window.isascii()
                     else np.frombuffer(window.encode("utf-32-le", "surrogatepass"), dtype=np.uint32))
            digits = np.take(self._digit_table, codes, mode="clip")
        else:
            codes = np.frombuffer(window.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
            position = np.searchsorted(self._codes, codes)
            np.minimum(position, len(self._codes) - 1, out=position)
            digits = np.where(self._codes[position] == codes, position + 1, 0).astype(np.int64)
        base = self._base
        keys3 = (digits[:-2] * base + digits[1:-1]) * base + digits[2:]
        found = _lookup(self._keys3, self._columns3, keys3)
        if len(digits) > 3:
            keys4 = keys3[:-1] * base + digits[3:]
            found = np.concatenate((found, _lookup(self._keys4, self._columns4, keys4)))
        return _distinct(found)


class AnalyzerIndex:
    """Any analyzer, the plain way: build its n-gram strings and look them up (the fallback)."""

    def __init__(self, terms: Sequence[str], analyzer) -> None:
        self._vocab = {term: i for i, term in enumerate(terms)}
        self._keys = self._vocab.keys()
        self._analyzer = analyzer

    def columns(self, text: str) -> np.ndarray:
        return self.lookup(self._analyzer(text))

    def lookup(self, grams: list[str]) -> np.ndarray:
        hits = self._keys & grams  # a list: no set of all n-grams is built
        if not hits:
            return _NO_COLUMNS
        found = np.fromiter(map(self._vocab.__getitem__, hits), dtype=np.intp, count=len(hits))
        found.sort()
        return found


def ngram_index(analyzer: str, terms: Sequence[str]) -> WordNgramIndex | CharNgramIndex | AnalyzerIndex:
    """The fastest exact index for a block's analyzer and vocabulary."""
    if analyzer == "word":
        return WordNgramIndex(terms)
    if analyzer == "char":
        try:
            return CharNgramIndex(terms)
        except OverflowError:  # an alphabet too large for 64-bit 4-gram keys
            pass
    return AnalyzerIndex(terms, ANALYZERS[analyzer])
