"""llama.cpp's self-speculative n-gram drafters (`--spec-type ngram-simple`, `ngram-map-k`,
`ngram-map-k4v`, `ngram-cache`), the project's own code over worker/speculative.py's loop.

They do what common/ngram-map.cpp, common/ngram-cache.cpp and the impls in
common/speculative.cpp do, not what their header comments describe: the acceptance a lookup job
reports is meant to be llama.cpp's, so where native bookkeeping departs from the plain idea the
departure is kept and said where it happens. On the same tokens they draft what
llama-speculative-simple drafts, pass for pass (benchmarks/llamacpp_mtp.py compares the traces).

History `inp` is seq[:-1] and `sampled` seq[-1], as llama.cpp splits them. A drafter is called
once per target pass, first on the bare prompt (llama-speculative-simple drafts before its first
token; the loop asks because `drafts_on_prompt` is set), and its state assumes seq only grows
between calls. How many tokens of the last draft the target kept is read from how seq grew:
both acceptance rules emit, after the kept prefix, a token other than the rejected draft token.
Knows nothing of engines, jobs or files (farm/lookupcache.py reads cache files).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from farm.lookupcache import NgramCache
from worker.engines.base import EngineError

NGRAM_MODES = ("ngram-simple", "ngram-map-k", "ngram-map-k4v")

# common/ngram-map.cpp's key_map: a hash of each key n-gram -> the position it was first stored at.
HASH_SLOTS = 1 << 18  # COMMON_NGRAM_HASH_MAP_SIZE
LCG_FACTOR = 2654435761
COUNT_MAX = 16380  # COMMON_NGRAM_MAX_VALUE_COUNT: hit and value counts saturate here
N_VALUES = 4  # COMMON_NGRAM_MAX_VALUES: m-grams remembered per key


def ngram_hash(tokens: Sequence[int]) -> int:
    """ngram-map.cpp's LCG hash (32-bit arithmetic) folded onto the key map's slots."""
    h = 0
    for t in tokens:
        h = (h * LCG_FACTOR + t) & 0xFFFFFFFF
    return h % HASH_SLOTS


def accepted_of(draft: Sequence[int], seq: Sequence[int], at: int) -> int:
    """Tokens of `draft`, proposed when seq had `at` tokens, that the target kept."""
    n = 0
    while n < len(draft) and at + n < len(seq) and seq[at + n] == draft[n]:
        n += 1
    return n


@dataclass
class _Value:
    """An m-gram seen after a key (common_ngram_map_value)."""

    start: int = 0  # its position in inp; 0: the slot is unused
    n_seen: int = 0
    # Tokens the target kept of the last draft made through this value: the next draft's cap,
    # so a value whose draft was rejected outright drafts nothing more (llama.cpp's rule).
    n_accepted: int = 0


@dataclass
class _Key:
    """A key n-gram that has been drafted from (common_ngram_map_key)."""

    start: int  # the position it was found at, the first time
    n_hits: int = 0  # draft calls that found it (not its occurrences): min_hits reads this
    counted_to: int = 0  # values are counted from here on the next call, this position included
    values: list[_Value] = field(default_factory=list)


class NgramDrafter:
    """ngram-simple, ngram-map-k and ngram-map-k4v with key size n (`size_n`) and draft size m
    (`n_draft`, native's `size_m`).

    ngram-simple: the latest earlier position of the key in inp (position 0 and the current one
    never count); m tokens that followed it, none when fewer than n follow.

    ngram-map-k and -k4v find the key through a hash map of positions, as native does, with what
    follows from it:
    - a key's position is the first one stored for its hash and stays so: a key seen again drafts
      from its first stored occurrence, not its latest; only positions added since the last call
      are searched linearly (latest first) when the map has none, or holds a colliding n-gram;
    - positions within n + m + 1 tokens before the prompt's end are neither stored nor searched
      (the two ranges native scans leave them out);
    - each key keeps, per value, how many tokens its last draft had accepted, and drafts at most
      that many next time.
    ngram-map-k drafts on the first hit; native's min_hits does not apply to it.
    ngram-map-k4v counts the key's hits (draft calls that found it) against min_hits, and the
    m-grams that followed its occurrences up to the matched position (that position counted again
    on every call); it drafts only when the most frequent one was seen at least twice as often as
    all others together. Native then copies the tokens after the matched position, which need not
    be that most frequent m-gram; so does this drafter.
    """

    q = None  # proposals are deterministic
    drafts_on_prompt = True

    def __init__(self, mode: str, n_draft: int, size_n: int, min_hits: int = 1) -> None:
        if mode not in NGRAM_MODES:
            raise EngineError(f"unknown n-gram drafter {mode!r}; known: {', '.join(NGRAM_MODES)}")
        if size_n < 1 or n_draft < 1:
            raise EngineError(f"{mode} needs an n-gram size and a draft size >= 1, not {size_n} and {n_draft}")
        self.mode, self.n_draft, self.size_n, self.min_hits = mode, n_draft, size_n, max(1, min_hits)
        self._begin: int | None = None

    def start(self, prompt: Sequence[int]) -> None:
        # Native begins with the prompt less its last token, which is the first `sampled`.
        self._begin = len(prompt) - 1  # size_last_begin
        self._slots: dict[int, int] = {}  # key_map: hash -> position
        self._slots_to = 0  # key_map_last_idx: positions up to here have been offered to the map
        self._keys: list[_Key] = []
        self._last: tuple[_Value, list[int], int] | None = None  # value, draft, len(seq) when drafted

    def propose(self, seq: Sequence[int], n_max: int, sampler=None) -> list[int]:
        if self._begin is None:
            self.start(seq)
        if self._last is not None:
            value, draft, at = self._last
            value.n_accepted = accepted_of(draft, seq, at)
            self._last = None
        inp, sampled = list(seq[:-1]), seq[-1]
        if self.mode == "ngram-simple":
            draft = self._simple(inp, sampled)
        else:
            draft, value = self._map(inp, sampled)
            if value is not None:
                # Native truncates to the budget after drafting and feeds back what the target
                # kept of the truncated draft.
                self._last = (value, draft[:max(0, n_max)], len(seq))
        return draft[:n_max] if n_max > 0 else []

    def _simple(self, inp: list[int], sampled: int) -> list[int]:
        n, m, cur = self.size_n, self.n_draft, len(inp)
        if cur <= n + m + 1:
            return []
        key = [*inp[cur - n + 1:], sampled]
        j = self._scan(inp, key, cur - n - 1, 0)
        if j == 0:
            return []
        copy = min(m, cur - (j + n))
        return inp[j + n:j + n + copy] if copy >= n else []

    def _scan(self, inp: list[int], key: list[int], hi: int, lo: int) -> int:
        """The latest j in (lo, hi] where the key occurs in inp; 0 if none."""
        first, n = key[0], len(key)
        for j in range(hi, lo, -1):
            if inp[j] == first and inp[j:j + n] == key:
                return j
        return 0

    def _map(self, inp: list[int], sampled: int) -> tuple[list[int], _Value | None]:
        """The draft, and the value whose acceptance the next call records (None: no draft made)."""
        n, m, cur, begin = self.size_n, self.n_draft, len(inp), self._begin
        if cur < 2 * n + m:
            return [], None
        key = [*inp[cur - n + 1:], sampled]
        top = cur - n - m - 1  # the latest position whose key and value both lie in inp
        j = self._slots.get(ngram_hash(key), 0)
        match = j if 0 < j < top and inp[j:j + n] == key else 0
        if match == 0 and begin > n + m + 1:
            match = self._scan(inp, key, begin - n - m - 1, self._slots_to)
        if match == 0:
            match = self._scan(inp, key, top, max(begin, self._slots_to))
        # Offer the new positions to the map in the same order; the first stored keeps its slot.
        if begin > n + m + 1:
            for j in range(begin - n - m - 1, self._slots_to, -1):
                self._slots.setdefault(ngram_hash(inp[j:j + n]), j)
        for j in range(top, max(begin, self._slots_to), -1):
            self._slots.setdefault(ngram_hash(inp[j:j + n]), j)
        self._slots_to = max(top, self._slots_to)
        if match == 0:
            return [], None

        entry = next((k for k in self._keys if inp[k.start:k.start + n] == key), None)
        if entry is None:
            entry = _Key(start=match, values=[_Value(n_accepted=m) for _ in range(N_VALUES)])
            self._keys.append(entry)
        entry.n_hits = min(entry.n_hits + 1, COUNT_MAX)
        if self.mode == "ngram-map-k":
            value = entry.values[0]
            return inp[match + n:match + n + min(m, value.n_accepted)], value

        if entry.n_hits < self.min_hits:
            return [], None
        for i in range(entry.counted_to, match + 1):
            if inp[i] != key[0] or inp[i:i + n] != key:
                continue
            start = i + n
            for value in entry.values:
                if value.start == 0:
                    value.start, value.n_seen, value.n_accepted = start, 0, m
                    break
                if inp[start:start + m] == inp[value.start:value.start + m]:
                    break
            else:
                continue  # four other m-grams hold the slots: this one is not counted
            value.n_seen = min(value.n_seen + 1, COUNT_MAX)
        entry.counted_to = match
        best = 0  # the first slot of the highest count
        for v in range(1, N_VALUES):
            if entry.values[v].n_seen > entry.values[best].n_seen:
                best = v
        n_best = entry.values[best].n_seen
        n_others = sum(v.n_seen for v in entry.values) - n_best
        if n_others > 0 and n_best < 2 * n_others:
            return [], None
        value = entry.values[best]
        return inp[match + n:match + n + min(m, value.n_accepted)], value


# common/ngram-cache.cpp's thresholds per n-gram size 1..4: (fewest tokens seen after the
# n-gram, lowest percentage the drafted token must have of them). The context cache is held to
# the lax ones, the dynamic cache (earlier generations) to the strict ones.
LAX = ((2, 66), (2, 50), (1, 50), (1, 50))
STRICT = ((4, 75), (3, 66), (2, 66), (2, 66))
NGRAM_MIN, NGRAM_MAX = 1, 4  # LLAMA_NGRAM_MIN, LLAMA_NGRAM_MAX: the context's n-gram sizes
NGRAM_STATIC = 2  # LLAMA_NGRAM_STATIC: the static cache's n-gram size, held to LAX's
NATIVE_CACHE_DRAFT = 8  # the draft size common/speculative.cpp fixes for ngram-cache


def update_cache(cache: NgramCache, tokens: Sequence[int]) -> None:
    """Count, for every n-gram of 1 to 4 tokens inside `tokens`, the token that follows it."""
    for size in range(NGRAM_MIN, NGRAM_MAX + 1):
        for i in range(size, len(tokens)):
            part = cache.setdefault(tuple(tokens[i - size:i]), {})
            part[tokens[i]] = part.get(tokens[i], 0) + 1


def _best(part: dict[int, int], static: dict[int, int] | None = None) -> tuple[int, int, int]:
    """(token, its count, all counts) of a cache part; with `static`, a token the static cache
    also saw after the last two tokens weighs 100 times its static count.

    llama.cpp keeps the first of equal scores in its unordered_map's order. Without static
    weights a tie passes the thresholds only in a part of two tokens, which libstdc++ iterates
    newest first: the token first seen last wins, so insertions are read newest first here too.
    """
    token, count, score, total = -1, 0, 0, 0
    for t, c in reversed(part.items()):
        s = c * (100 * static[t] if static is not None and t in static else 1)
        if s > score:
            token, count, score = t, c, s
        total += c
    return token, count, total


def _passes(count: int, total: int, size: int, thresholds: tuple[tuple[int, int], ...]) -> bool:
    min_seen, min_percent = thresholds[size - 1]
    return total >= min_seen and 100 * count >= min_percent * total


class NgramCacheDrafter:
    """ngram-cache: the token that most often followed the longest of the last 1 to 4 tokens,
    from the context cache, else a dynamic cache (earlier generations, loaded, strict thresholds),
    else the static cache's 2-grams (a corpus), drafted one token at a time until none passes.

    A candidate from the context or dynamic cache is scored by its count times 100x its static
    count where the static cache saw it after the last two tokens (1 where it did not). As
    common/speculative.cpp does, the context cache is updated once per call with the tokens
    that arrived since the last one, counting only n-grams inside that chunk: the prompt is
    learnt whole, but a pass that emitted one token teaches it nothing, and n-grams spanning two
    passes are never counted. Neither file cache is written back (native's save flags are off).
    Native drafts 8 tokens (NATIVE_CACHE_DRAFT); here `n_draft` is the job's.
    """

    q = None  # proposals are deterministic
    drafts_on_prompt = True

    def __init__(self, n_draft: int, static: NgramCache | None = None, dynamic: NgramCache | None = None) -> None:
        if n_draft < 1:
            raise EngineError(f"ngram-cache needs a draft size >= 1, not {n_draft}")
        self.n_draft = n_draft
        self.static, self.dynamic = static or {}, dynamic or {}
        self.context: NgramCache = {}
        self._learnt: int | None = None  # tokens of seq counted into the context cache

    def start(self, prompt: Sequence[int]) -> None:
        self.context = {}
        self._learnt = 0

    def propose(self, seq: Sequence[int], n_max: int, sampler=None) -> list[int]:
        if self._learnt is None:
            self.start(seq)
        if self._learnt < len(seq):
            update_cache(self.context, list(seq[self._learnt:]))
            self._learnt = len(seq)
        draft = self.draft(seq)
        return draft[:n_max] if n_max > 0 else []

    def draft(self, seq: Sequence[int]) -> list[int]:
        if len(seq) < NGRAM_STATIC:
            return []
        text = list(seq)
        drafted: list[int] = []
        while len(drafted) < self.n_draft:
            static = self.static.get(tuple(text[-NGRAM_STATIC:]), {})
            token = self._primary(self.context, text, static, LAX)
            if token is None:
                token = self._primary(self.dynamic, text, static, STRICT)
            if token is None:
                part = self.static.get(tuple(text[-NGRAM_STATIC:]))
                if part:
                    t, count, total = _best(part)
                    if _passes(count, total, NGRAM_STATIC, LAX):
                        token = t
            if token is None:
                break
            drafted.append(token)
            text.append(token)
        return drafted

    @staticmethod
    def _primary(cache: NgramCache, text: list[int], static: dict[int, int], thresholds) -> int | None:
        """The longest n-gram whose best next token passes its size's thresholds."""
        for size in range(min(NGRAM_MAX, len(text)), NGRAM_MIN - 1, -1):
            part = cache.get(tuple(text[-size:]))
            if not part:
                continue
            token, count, total = _best(part, static)
            if _passes(count, total, size, thresholds):
                return token
        return None
