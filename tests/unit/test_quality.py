"""The quality core (worker/quality.py): llama-perplexity --kl-divergence's figures from logits."""

import math

import numpy as np
import pytest

from farm.contract import EVAL_TEXTS
from worker.quality import (
    TEXT_NAME,
    TOP_K,
    cache_path,
    chunk_tokens,
    eval_text,
    figures,
    load_reference,
    reference_from_logits,
    save_reference,
    score,
    text_sha256,
)


def random_model(n_vocab: int, seed: int, scale: float = 3.0):
    """A deterministic 'model': logits (T, V) from a table indexed by each token, so equal
    tokens give equal logits, as a real model's equal inputs do."""
    table = np.random.default_rng(seed).normal(0.0, scale, size=(n_vocab, n_vocab)).astype(np.float32)
    return lambda tokens: table[np.asarray(tokens)]


def table_model(rows: dict[int, list[float]], n_vocab: int):
    """Logits = log of the given probabilities at the scored row; uniform elsewhere."""
    def logits(tokens):
        out = np.zeros((len(tokens), n_vocab), dtype=np.float32)
        for i, p in rows.items():
            out[i] = np.log(np.asarray(p, dtype=np.float64))
        return out
    return logits


def test_a_model_against_itself_scores_exactly_zero_and_full_agreement():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 300, size=5 * 64 + 17).tolist()
    chunks = chunk_tokens(tokens, 64, bos=1)
    model = random_model(300, seed=1)
    f = figures(score(reference_from_logits(model, chunks, 64, top_k=16), model, chunks))
    assert f.kld_mean == 0.0 and f.kld_max == 0.0 and f.kld_p99 == 0.0
    assert f.top1_agreement == 1.0
    assert f.ppl == f.ppl_reference
    assert f.n_tokens_scored == 5 * (64 - 1 - 32)


def test_hand_computed_kld_full_vocabulary():
    # n_ctx 4 scores row 2 only, predicting token 3 of the chunk (here token 1).
    chunks = [[0, 1, 2, 1]]
    ref = reference_from_logits(table_model({2: [0.5, 0.25, 0.25]}, 3), chunks, 4, top_k=3)
    f = figures(score(ref, table_model({2: [0.25, 0.5, 0.25]}, 3), chunks))
    # KL = 0.5 ln(0.5/0.25) + 0.25 ln(0.25/0.5) + 0.25 ln 1 = 0.25 ln 2
    assert f.kld_mean == pytest.approx(0.25 * math.log(2), rel=1e-6)
    assert f.top1_agreement == 0.0  # reference's top is token 0, the quant's token 1
    assert f.ppl_reference == pytest.approx(4.0, rel=1e-6)  # p_ref(1) = 0.25
    assert f.ppl == pytest.approx(2.0, rel=1e-6)  # p_q(1) = 0.5
    assert ref.mass_kept == pytest.approx(1.0)


def test_hand_computed_kld_with_the_tail_in_one_bin():
    chunks = [[0, 1, 2, 1]]
    ref = reference_from_logits(table_model({2: [0.5, 0.25, 0.25]}, 3), chunks, 4, top_k=1)
    f = figures(score(ref, table_model({2: [0.25, 0.5, 0.25]}, 3), chunks))
    # bins {0} and {1, 2}: ref (0.5, 0.5), quant (0.25, 0.75): 0.5 ln 2 + 0.5 ln(2/3) = 0.5 ln(4/3)
    assert f.kld_mean == pytest.approx(0.5 * math.log(4 / 3), rel=1e-6)
    assert f.kld_mean < 0.25 * math.log(2)  # coarsening never raises the divergence
    assert ref.mass_kept == pytest.approx(0.5)
    assert f.ppl_reference == pytest.approx(4.0, rel=1e-6)  # nll from the full distribution, not the top-k


def test_statistics_follow_from_the_chunk_samples():
    rng = np.random.default_rng(3)
    tokens = rng.integers(0, 200, size=4 * 32).tolist()
    chunks = chunk_tokens(tokens, 32)
    f = figures(score(reference_from_logits(random_model(200, 4), chunks, 32), random_model(200, 5, 2.5), chunks))
    assert f.kld_mean > 0 and 0.0 <= f.top1_agreement < 1.0
    assert f.kld_mean == pytest.approx(np.mean(f.kld_chunk_means), rel=1e-9)
    assert f.top1_agreement == pytest.approx(np.mean(f.top1_chunk), rel=1e-9)
    assert f.ppl == pytest.approx(math.exp(np.mean(f.nll_chunk_means)), rel=1e-9)
    assert f.kld_median == f.kld_percentiles[50] and f.kld_max == f.kld_percentiles[100]
    assert f.kld_percentiles == sorted(f.kld_percentiles)


def test_chunks_drop_the_tail_take_a_limit_and_start_with_bos():
    chunks = chunk_tokens(list(range(10, 110)), 30, bos=1)
    assert len(chunks) == 3 and all(len(c) == 30 and c[0] == 1 for c in chunks)
    assert chunks[1][1:] == list(range(41, 70))
    assert len(chunk_tokens(list(range(100)), 30, n_chunks=2)) == 2
    with pytest.raises(ValueError, match="lower quality_n_ctx"):
        chunk_tokens(list(range(10)), 30)
    with pytest.raises(ValueError, match="lower quality_n_chunks"):
        chunk_tokens(list(range(100)), 30, n_chunks=4)


def test_a_reference_of_other_tokens_is_refused():
    model = random_model(50, 0)
    ref = reference_from_logits(model, [[1, 2, 3, 4, 5, 6, 7, 8]], 8)
    with pytest.raises(ValueError, match="other tokens"):
        score(ref, model, [[1, 2, 3, 4, 5, 6, 7, 9]])


def test_the_cache_round_trips_and_refuses_another_file(tmp_path):
    chunks = chunk_tokens(np.random.default_rng(1).integers(0, 300, 3 * 64).tolist(), 64)
    model = random_model(300, 2)
    ref = reference_from_logits(model, chunks, 64)
    path = cache_path(tmp_path, "llamacpp", "a" * 64, "b" * 64, 64, 3, TOP_K)
    save_reference(path, ref, "a" * 64, "b" * 64)
    back = load_reference(path, "a" * 64, "b" * 64)
    assert back is not None and np.array_equal(back.top_logp, ref.top_logp) and back.n_chunks == 3
    assert figures(score(back, model, chunks)).kld_max == 0.0
    assert load_reference(path, "c" * 64, "b" * 64) is None
    assert load_reference(tmp_path / "missing.npz", "a" * 64, "b" * 64) is None


def test_the_evaluation_text_is_shipped_and_long_enough():
    text = eval_text()
    assert len(text.split()) > 2500
    # The collector knows the text by this digest (farm/contract.py): editing the file needs a new entry.
    assert text_sha256(text) == EVAL_TEXTS[TEXT_NAME]
