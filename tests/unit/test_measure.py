"""The measurement core against a fake backend that records what it was asked."""

import pytest

from farm.contract import Job
from worker.measure import input_tokens, measure


class FakeBackend:
    name = "fake"
    n_vocab = 1000

    def __init__(self):
        self.calls: list[tuple] = []
        self.n_past = 0

    def tokenize(self, text, add_bos=True):
        return ([1] if add_bos else []) + [10 + (ord(c) % 500) for c in text.split()[0:50] for c in c[:1]]

    def reset(self):
        self.calls.append(("reset",))
        self.n_past = 0

    def prefill(self, tokens):
        self.calls.append(("prefill", len(tokens), self.n_past))
        self.n_past += len(tokens)
        return (sum(tokens) + 1) % self.n_vocab

    def decode(self, token):
        self.calls.append(("decode", self.n_past))
        self.n_past += 1
        return (token * 7 + 3) % self.n_vocab


def job(**kw):
    base = dict(job_id="j", sweep_id="s", index=0, model="m", quant="Q8_0", repetitions=4, n_warmup=2)
    return Job(**{**base, **kw})


def test_pp_runs_warmups_then_timed_repetitions_from_an_empty_cache():
    b = FakeBackend()
    m = measure(b, job(kind="pp", n_prompt=32))
    assert len(m.samples_ns) == 4 and all(ns > 0 for ns in m.samples_ns)
    assert b.calls.count(("reset",)) == 2 + 4
    assert [c for c in b.calls if c[0] == "prefill"] == [("prefill", 32, 0)] * 6


def test_tg_decodes_n_gen_tokens_greedily_after_the_depth_context():
    b = FakeBackend()
    m = measure(b, job(kind="tg", n_gen=5, n_depth=20, repetitions=2, n_warmup=1))
    prefills = [c for c in b.calls if c[0] == "prefill"]
    decodes = [c for c in b.calls if c[0] == "decode"]
    assert prefills == [("prefill", 20, 0)] * 3  # the context, untimed, once per run
    assert len(decodes) == 5 * 3
    assert decodes[:5] == [("decode", 20 + i) for i in range(5)]
    # each decoded token feeds the next step
    assert len(m.tokens) == 5 and m.tokens[1] == (m.tokens[0] * 7 + 3) % 1000


class FeedingBackend(FakeBackend):
    """An engine that can append a token without reading its output back (llama.cpp's feed)."""

    def feed(self, token):
        self.calls.append(("feed", self.n_past, token))
        self.n_past += 1


@pytest.mark.parametrize("kind", ["tg", "pg"])
def test_timed_runs_after_the_first_feed_the_first_runs_greedy_tokens(kind):
    b = FeedingBackend()
    m = measure(b, job(kind=kind, n_prompt=6, n_gen=5, n_depth=3, repetitions=3, n_warmup=1))
    decodes = [c for c in b.calls if c[0] == "decode"]
    feeds = [c for c in b.calls if c[0] == "feed"]
    assert len(decodes) == 5 and len(feeds) == 5 * 3  # only the warm-up asks for tokens
    start = 3 + (6 if kind == "pg" else 0)
    # Each timed run feeds the warm-up's inputs at the warm-up's positions, in order.
    assert [c[1] for c in feeds[:5]] == [start + i for i in range(5)]
    chain = [(c[2]) for c in feeds[:5]]
    assert chain[1:] == m.tokens[:-1] and [(t * 7 + 3) % 1000 for t in chain] == m.tokens
    assert feeds[:5] == feeds[5:10] == feeds[10:]
    assert len(m.samples_ns) == 3 and len(m.decode_samples_ns) == 3


def test_without_a_warm_up_the_first_timed_run_decodes_and_the_rest_feed():
    b = FeedingBackend()
    m = measure(b, job(kind="tg", n_gen=4, repetitions=2, n_warmup=0))
    assert [c[0] for c in b.calls if c[0] in ("decode", "feed")] == ["decode"] * 4 + ["feed"] * 4
    assert len(m.tokens) == 4 and len(m.samples_ns) == 2


def test_pp_at_depth_prefills_the_context_before_the_timed_prompt():
    b = FakeBackend()
    measure(b, job(kind="pp", n_prompt=8, n_depth=16, repetitions=1, n_warmup=0))
    assert [c for c in b.calls if c[0] == "prefill"] == [("prefill", 16, 0), ("prefill", 8, 16)]


def test_text_inputs_start_with_bos_and_have_the_requested_length():
    b = FakeBackend()
    toks = input_tokens(b, 300, "text", seed=1)
    assert len(toks) == 300 and toks[0] == 1
    assert input_tokens(b, 10, "text", seed=1, offset=5)[0] != 1


@pytest.mark.parametrize("seed", [1, 2])
def test_random_inputs_are_seeded_and_in_vocabulary(seed):
    b = FakeBackend()
    a = input_tokens(b, 50, "random", seed)
    assert a == input_tokens(b, 50, "random", seed)
    assert all(256 <= t < 1000 for t in a)
