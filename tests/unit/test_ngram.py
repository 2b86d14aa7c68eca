"""llama.cpp's n-gram drafters (worker/ngram.py) on hand-made token sequences: the rules where
native's bookkeeping departs from the plain idea, each in a case that would fail without it.

Sequences are fed as the loop feeds them: first the bare prompt (native drafts before its first
token), then the prompt and what was generated; how many tokens of a draft the target kept is
read from how the sequence grew.
"""

from __future__ import annotations

import pytest

from farm.lookupcache import LookupCacheError, read_lookup_cache, write_lookup_cache
from worker.engines.base import EngineError
from worker.ngram import NgramCacheDrafter, NgramDrafter, ngram_hash
from worker.speculative import greedy, speculative

from .test_speculative import FakeBackend

FILLER = [20, 21, 22, 23, 24, 25, 26]


def drafter(mode: str, prompt: list[int], n: int = 2, m: int = 2, min_hits: int = 1) -> NgramDrafter:
    d = NgramDrafter(mode, n_draft=m, size_n=n, min_hits=min_hits)
    d.start(prompt)
    d.propose(prompt, 99)
    return d


# ngram-simple


def test_simple_copies_what_followed_the_latest_earlier_key_never_position_0():
    seq = [1, 2, 3, 7, 8, 9, 10, 5, 2, 3, 4, 4, 6, 6, 0, 0, 0, 1, 2, 3]
    # The key (1, 2, 3) occurs earlier only at position 0, which llama.cpp never matches.
    assert NgramDrafter("ngram-simple", n_draft=3, size_n=3).propose(seq, 8) == []
    # (2, 3): the latest earlier occurrence is at 8, followed by 4, 4, 6 (not 1's 7, 8, 9).
    assert NgramDrafter("ngram-simple", n_draft=3, size_n=2).propose(seq, 8) == [4, 4, 6]
    assert NgramDrafter("ngram-simple", n_draft=3, size_n=2).propose(seq[:6], 8) == []  # history <= n + m + 1


def test_simple_truncates_to_the_budget_after_the_n_following_rule():
    # (5, 6, 7) at 2 with 1, 2, 3 after it: with one token of budget left native still drafts
    # (it truncates the m-gram), where checking n tokens after the truncation would refuse.
    seq = [9, 9, 5, 6, 7, 1, 2, 3, 4, 9, 9, 5, 6, 7]
    assert NgramDrafter("ngram-simple", n_draft=3, size_n=3).propose(seq, 1) == [1]
    # The latest match (4, 5, 4 at 8) has one token after it, fewer than n: no draft, and the
    # older match at 1 (followed by 1, 9, 9) is not looked for.
    seq = [7, 4, 5, 4, 1, 9, 9, 9, 4, 5, 4, 5, 4]
    assert NgramDrafter("ngram-simple", n_draft=3, size_n=3).propose(seq, 8) == []


# ngram-map-k


PROMPT = [9, 5, 6, 1, 1, *FILLER]  # 12 tokens: n-grams at positions 1..6 are stored, 7..11 never


def test_map_k_drafts_on_the_first_hit_whatever_min_hits():
    d = drafter("ngram-map-k", PROMPT, min_hits=5)
    assert d.propose(PROMPT + [5], 8) == []
    assert d.propose(PROMPT + [5, 6], 8) == [1, 1]


def test_map_k_drafts_from_the_first_stored_position_not_the_latest():
    seq = PROMPT + [5, 6, 3, 3, 30, 31, 32, 33, 5, 6]
    d = drafter("ngram-map-k", PROMPT)
    assert d.propose(seq, 8) == [1, 1]  # (5, 6) at 1, stored from the prompt
    assert NgramDrafter("ngram-simple", 2, 2).propose(seq, 8) == [3, 3]  # the latest, at 12


def test_map_k_drafts_at_most_what_the_keys_last_draft_had_accepted():
    d = drafter("ngram-map-k", PROMPT)
    assert d.propose(PROMPT + [5, 6], 8) == [1, 1]
    assert d.propose(PROMPT + [5, 6, 1, 9], 8) == []  # kept 1 of [1, 1]; (1, 9) is unknown
    assert d.propose(PROMPT + [5, 6, 1, 9, 5, 6], 8) == [1]
    assert d.propose(PROMPT + [5, 6, 1, 9, 5, 6, 4], 8) == []  # kept none of [1]
    seq = PROMPT + [5, 6, 1, 9, 5, 6, 4, 5, 6]
    assert d.propose(seq, 8) == []  # the key is found, but its value drafts nothing any more
    assert NgramDrafter("ngram-simple", 2, 2).propose(seq, 8) == [4, 5]


def test_map_k_never_sees_a_key_just_before_the_prompts_end():
    prompt = [9, 10, 11, 12, 13, 14, 15, 40, 41, 42, 43, 44]
    d = drafter("ngram-map-k", prompt)
    # (40, 41) at 7 lies within n + m + 1 tokens of the prompt's end: neither stored nor searched.
    assert d.propose(prompt + [40, 41], 8) == []
    assert NgramDrafter("ngram-simple", 2, 2).propose(prompt + [40, 41], 8) == [42, 43]


def test_the_key_map_hash_is_llamacpps_lcg():
    # Which keys collide decides what native finds; these values are common_ngram_map_hash's,
    # printed by the C++ (uint32_t hash = hash * 2654435761UL + token, then % 2^18).
    assert ngram_hash([5, 6]) == 90235
    assert ngram_hash([5, 6, 49151, 12]) == 186614


# ngram-map-k4v: (5, 6) occurs at 1, 5, 9 and 13, followed by the m-grams named.


def k4v_prompt(*values: tuple[int, int]) -> list[int]:
    return [9, *[t for v in values for t in (5, 6, *v)], *FILLER]


def test_k4v_drafts_when_the_most_frequent_value_is_twice_all_others():
    prompt = k4v_prompt((1, 1), (2, 2), (1, 1), (1, 1))
    assert drafter("ngram-map-k4v", prompt).propose(prompt + [5, 6], 8) == [1, 1]  # 3 against 1


def test_k4v_refuses_an_even_split_until_recounting_the_match_tips_it():
    prompt = k4v_prompt((1, 1), (2, 2), (1, 1), (2, 2))
    d = drafter("ngram-map-k4v", prompt)
    # The key is found at 13 (the first position stored for it): 2 against 2, no draft.
    assert d.propose(prompt + [5, 6], 8) == []
    # Native counts the value at the matched position again on every call: 3 against 2 ...
    assert d.propose(prompt + [5, 6, 7, 5, 6], 8) == []
    # ... then 4 against 2.
    assert d.propose(prompt + [5, 6, 7, 5, 6, 7, 5, 6], 8) == [2, 2]


def test_k4v_copies_what_follows_the_match_even_when_another_value_is_more_frequent():
    prompt = k4v_prompt((1, 1), (1, 1), (1, 1), (2, 2))
    # (1, 1) was seen 3 times, (2, 2) once: a draft is made, of what follows position 13.
    assert drafter("ngram-map-k4v", prompt).propose(prompt + [5, 6], 8) == [2, 2]


def test_k4v_min_hits_counts_calls_that_found_the_key_not_its_occurrences():
    prompt = k4v_prompt((1, 1), (2, 2), (1, 1), (1, 1))
    d = drafter("ngram-map-k4v", prompt, min_hits=2)
    assert d.propose(prompt + [5, 6], 8) == []  # four occurrences, one hit
    assert d.propose(prompt + [5, 6, 7, 5, 6], 8) == [1, 1]


def test_ngram_drafters_refuse_nonsense_settings():
    with pytest.raises(EngineError, match="unknown n-gram drafter"):
        NgramDrafter("ngram-mod", 4, 3)
    with pytest.raises(EngineError, match=">= 1"):
        NgramDrafter("ngram-simple", 4, 0)
    with pytest.raises(EngineError, match=">= 1"):
        NgramCacheDrafter(0)


# ngram-cache


def cache_draft(seq: list[int], n_draft: int = 1, **caches) -> list[int]:
    d = NgramCacheDrafter(n_draft, **caches)
    d.start(seq)
    return d.propose(seq, 99)


def test_cache_1gram_needs_two_samples_and_66_percent():
    # After 5: 7 twice, 8 once: 67 % of 3.
    assert cache_draft([5, 7, 5, 7, 5, 8, 5]) == [7]
    # After 5: 7 once, 8 once: 50 %, below the 1-gram's 66 %; no longer n-gram knows more.
    assert cache_draft([5, 7, 5, 8, 5]) == []


def test_cache_2gram_passes_a_tie_and_takes_the_token_first_seen_last():
    # After (3, 5): 7 once, 8 once: 50 % passes the 2-gram's threshold; llama.cpp's
    # unordered_map yields the later of the two first (checked against libstdc++).
    assert cache_draft([3, 5, 7, 3, 5, 8, 3, 5]) == [8]


def test_cache_drafts_on_from_its_own_draft_longest_ngram_first():
    # (4, 5, 6, 4) -> 5, then (5, 6, 4, 5) -> 6 over the draft so far, then (6, 4, 5, 6) -> 4.
    assert cache_draft([4, 5, 6, 4, 5, 6, 4], n_draft=3) == [5, 6, 4]


def test_cache_learns_only_ngrams_inside_each_new_chunk():
    d = NgramCacheDrafter(4)
    d.start([1, 2, 3])
    d.propose([1, 2, 3], 4)
    assert (2,) in d.context and (3,) not in d.context
    d.propose([1, 2, 3, 9], 4)  # a pass that emitted one token: nothing to count in it
    assert (3,) not in d.context
    d.propose([1, 2, 3, 9, 1, 2], 4)  # (9, 1) spans two chunks: not counted; (1, 2) is, again
    assert (9,) not in d.context and d.context[(1,)] == {2: 2}


def test_dynamic_cache_is_held_to_the_strict_thresholds():
    seq = [30, 31, 7]
    assert cache_draft(seq, dynamic={(7,): {8: 3}}) == []  # 3 samples: the strict 1-gram needs 4
    assert cache_draft(seq, dynamic={(7,): {8: 4}}) == [8]
    assert cache_draft(seq, dynamic={(7,): {8: 3, 9: 1}}) == [8]  # 4 samples, 75 %


def test_static_cache_weighs_candidates_and_drafts_alone_on_2grams():
    seq = [1, 2, 3, 1, 2, 4, 1, 2]
    assert cache_draft(seq) == [4]  # the tie, without the static cache
    assert cache_draft(seq, static={(1, 2): {3: 5}}) == [3]  # the corpus saw 3 after (1, 2)
    assert cache_draft([30, 1, 2], static={(1, 2): {3: 2, 4: 1}}) == [3]  # 67 % of 3 >= 50 %
    assert cache_draft([30, 1, 2], static={(1, 2): {3: 1}}) == []  # one sample: the static needs 2


def test_cache_files_round_trip_in_llamacpps_format(tmp_path):
    cache = {(1,): {2: 3, 4: 1}, (1, 2): {3: 1}, (5, 6, 7, 8): {9: 2}}
    path = tmp_path / "static.bin"
    write_lookup_cache(cache, path)
    # Per n-gram: 4 padded tokens, the count of followers, then (token, count) pairs; int32 each.
    assert path.stat().st_size == 4 * ((5 + 4) + (5 + 2) + (5 + 2))
    assert read_lookup_cache(path) == cache
    write_lookup_cache({}, path)
    assert read_lookup_cache(path) == {}


@pytest.mark.parametrize("data, problem", [
    (b"\x01\x00\x00", "whole number of int32"),
    ((1).to_bytes(4, "little") * 4, "truncated record"),
    (b"".join(t.to_bytes(4, "little", signed=True) for t in (-1, 5, -1, -1, 1, 2, 1)), "no valid n-gram"),
    (b"".join(t.to_bytes(4, "little", signed=True) for t in (5, -1, -1, -1, 3, 2, 1)), "claims 3 following"),
    (b"".join(t.to_bytes(4, "little", signed=True) for t in (5, -1, -1, -1, 1, 2, 0)), "counts token 2 0 times"),
])
def test_malformed_cache_files_are_named_not_loaded(tmp_path, data, problem):
    path = tmp_path / "bad.bin"
    path.write_bytes(data)
    with pytest.raises(LookupCacheError, match=problem):
        read_lookup_cache(path)


# the loop


def test_a_draft_from_the_bare_prompt_is_verified_with_the_prompts_last_token():
    target = FakeBackend()
    prompt = [1, 5, 9, 14, 3, 5, 9, 22, 5, 9]  # (5, 9) ends the prompt and occurs twice before it
    base = greedy(target, prompt, 12)
    seen: list[int] = []

    class Recording(NgramDrafter):
        def propose(self, seq, n_max, sampler=None):
            seen.append(len(seq))
            return super().propose(seq, n_max, sampler)

    run = speculative(target, Recording("ngram-map-k", n_draft=2, size_n=2), prompt, 12)
    assert run.tokens == base.tokens
    assert seen[0] == len(prompt)  # called on the bare prompt, before any token
    assert run.drafted_at[0] >= 1
