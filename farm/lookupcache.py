"""llama.cpp's n-gram lookup cache files (`--lookup-cache-static`, `--lookup-cache-dynamic`):
reading, writing and checking them.

A cache maps an n-gram of one to four tokens to the counts of the tokens that followed it
(worker/ngram.py drafts from it). The orchestrator checks a sweep's files at submit and the
worker loads them, so the format lives here; this module knows nothing of drafting.

The format is llama.cpp's common_ngram_cache_save, in the machine's byte order (little-endian
on every platform llama.cpp ships): per n-gram, four int32 tokens (-1 past the n-gram's length),
an int32 number of following tokens, then that many (int32 token, int32 count) pairs.
"""

from __future__ import annotations

import sys
from array import array
from pathlib import Path

NGRAM_MAX = 4  # llama.cpp's LLAMA_NGRAM_MAX: the longest n-gram a cache entry holds
NO_TOKEN = -1  # llama.cpp's LLAMA_TOKEN_NULL, padding an n-gram shorter than NGRAM_MAX

# n-gram (without its padding) -> {token that followed it: times seen}
NgramCache = dict[tuple[int, ...], dict[int, int]]


class LookupCacheError(ValueError):
    """A file that is not an n-gram cache in llama.cpp's format."""


def _ints(path: Path) -> array:
    data = Path(path).read_bytes()
    if len(data) % 4:
        raise LookupCacheError(f"{path}: {len(data)} bytes is not a whole number of int32 values: not an n-gram cache")
    values = array("i")
    values.frombytes(data)
    if sys.byteorder != "little":
        values.byteswap()
    return values


def read_lookup_cache(path: Path) -> NgramCache:
    """The cache a file holds; a malformed file (which llama.cpp would abort on) raises
    LookupCacheError naming the first bad record."""
    path = Path(path)
    values = _ints(path)
    cache: NgramCache = {}
    i, n = 0, len(values)
    while i < n:
        record = i  # the int32 offset of this n-gram, for the error messages
        if i + NGRAM_MAX + 1 > n:
            raise LookupCacheError(f"{path}: truncated record at int32 offset {record}: not an n-gram cache")
        tokens = values[i:i + NGRAM_MAX]
        size = next((k for k, t in enumerate(tokens) if t == NO_TOKEN), NGRAM_MAX)
        if size == 0 or any(t != NO_TOKEN for t in tokens[size:]) or any(t < 0 for t in tokens[:size]):
            raise LookupCacheError(f"{path}: record at int32 offset {record} holds no valid n-gram "
                                   f"({list(tokens)}): not an n-gram cache")
        n_next = values[i + NGRAM_MAX]
        i += NGRAM_MAX + 1
        if n_next < 1 or i + 2 * n_next > n:
            raise LookupCacheError(f"{path}: record at int32 offset {record} claims {n_next} following tokens, "
                                   f"{(n - i) // 2} remain: not an n-gram cache")
        pairs = values[i:i + 2 * n_next]
        i += 2 * n_next
        part: dict[int, int] = {}
        for token, count in zip(pairs[0::2], pairs[1::2]):
            if token < 0 or count < 1:
                raise LookupCacheError(f"{path}: record at int32 offset {record} counts token {token} {count} "
                                       "times: not an n-gram cache")
            part[token] = count
        cache[tuple(tokens[:size])] = part
    return cache


def write_lookup_cache(cache: NgramCache, path: Path) -> None:
    """Save a cache in the format llama.cpp's tools load (common_ngram_cache_load)."""
    values = array("i")
    for ngram, part in cache.items():
        if not 1 <= len(ngram) <= NGRAM_MAX or not part:
            raise LookupCacheError(f"cannot save n-gram {ngram} with {len(part)} following tokens")
        values.extend([*ngram, *[NO_TOKEN] * (NGRAM_MAX - len(ngram)), len(part)])
        for token, count in part.items():
            values.extend([token, count])
    if sys.byteorder != "little":
        values.byteswap()
    Path(path).write_bytes(values.tobytes())
