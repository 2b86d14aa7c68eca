"""The quality pass: a quant's next-token distributions against its reference's over a fixed text.

Definitions are llama-perplexity --kl-divergence's, so figures compare with the tables users read:
the text (worker/data/eval_text.txt) is tokenized once without BOS and cut into chunks of n_ctx
tokens, the first token of each chunk replaced by BOS where the vocabulary adds one; each chunk
is evaluated from an empty cache and only its second half is scored (positions n_ctx//2 ..
n_ctx-2, each predicting the next token), so every scored token has at least n_ctx//2 of context.
Per scored token:
    KLD   = sum_i p_ref(i) * (log p_ref(i) - log p_q(i))   (natural log, nats)
    same top: argmax of the quant's logits == argmax of the reference's
    nll   = -log p(true next token), for both; ppl = exp(mean nll)
KLD median and 99th percentile are over all scored tokens, interpolated linearly.

The reference is kept as its top-k log-probabilities per scored position (k = TOP_K by default),
plus its nll of the true token and its argmax, both from the full distribution. The quant's KLD
is computed over k + 1 bins: the reference's top-k tokens, and the rest of the vocabulary lumped
into one tail bin on both sides (mass 1 - sum of the top-k probabilities). That is the KL
divergence of the two distributions coarsened to those bins: never above the full-vocabulary
figure (the data processing inequality), equal to it when the reference keeps all its mass in the
top-k, and exactly 0 for a model against itself. `reference_mass_kept` says how much mass the
top-k held (llama-perplexity itself drops reference tokens below e^-16).

Pure: numpy and a Backend's `chunk_logits`, nothing of jobs, files' origins or Celery. The cache
of reference passes (one compressed .npz per reference file, text, context, chunks, k and engine)
lives here too, because its layout is this module's.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

TEXT_NAME = "eval_text.txt"
TOP_K = 512
# Probabilities below this are 0 in float64 exp; a tail bin this empty is taken as empty.
_TINY = 1e-300


def eval_text() -> str:
    return resources.files("worker").joinpath(f"data/{TEXT_NAME}").read_text(encoding="utf-8")


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def chunk_tokens(tokens: Sequence[int], n_ctx: int, n_chunks: int = 0, bos: int | None = None) -> list[list[int]]:
    """Whole chunks of n_ctx tokens (a short tail is dropped, as llama-perplexity does); at most
    n_chunks of them (0: all); each one's first token replaced by bos where there is one."""
    n_avail = len(tokens) // n_ctx
    if n_avail < 1:
        raise ValueError(f"the text has {len(tokens)} tokens, fewer than one chunk of {n_ctx}: lower quality_n_ctx")
    if n_chunks > n_avail:
        raise ValueError(f"the text holds {n_avail} chunks of {n_ctx} tokens, not the {n_chunks} asked for: "
                         "lower quality_n_chunks (0: all of them) or quality_n_ctx")
    n = n_chunks or n_avail
    chunks = [list(tokens[c * n_ctx:(c + 1) * n_ctx]) for c in range(n)]
    if bos is not None:
        for c in chunks:
            c[0] = bos
    return chunks


def scored_range(n_ctx: int) -> tuple[int, int]:
    """Rows of a chunk's logits that are scored: [first, n_ctx - 1), each predicting row + 1."""
    return n_ctx // 2, n_ctx - 1


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-probabilities (T, V) as float32, computed in float64.

    Reference and quant go through this one function, so equal logits give bit-equal log-probs
    and a model against itself scores exactly 0."""
    x = logits.astype(np.float64)
    x -= x.max(axis=1, keepdims=True)
    x -= np.log(np.exp(x).sum(axis=1, keepdims=True))
    return x.astype(np.float32)


@dataclass
class Reference:
    """The reference's side of every scored position, chunk-major: (N, k) top-k, (N,) the rest."""

    top_ids: np.ndarray  # (N, k) int32, by falling probability
    top_logp: np.ndarray  # (N, k) float32
    argmax: np.ndarray  # (N,) int32, from the full logits
    nll: np.ndarray  # (N,) float64, of the true next token, from the full distribution
    targets: np.ndarray  # (N,) int32: the true next tokens (a cached pass is checked against them)
    n_ctx: int
    n_chunks: int

    @property
    def top_k(self) -> int:
        return int(self.top_ids.shape[1])

    @property
    def mass_kept(self) -> float:
        return float(np.exp(self.top_logp.astype(np.float64)).sum(axis=1).mean())


def targets_of(chunks: Sequence[Sequence[int]], n_ctx: int) -> np.ndarray:
    first, last = scored_range(n_ctx)
    return np.array([t for c in chunks for t in c[first + 1:last + 1]], dtype=np.int32)


def reference_from_logits(chunk_logits: Callable[[list[int]], np.ndarray], chunks: Sequence[Sequence[int]],
                          n_ctx: int, top_k: int = TOP_K) -> Reference:
    """The reference pass: each chunk's logits (T, V) reduced to its scored rows' top-k."""
    first, last = scored_range(n_ctx)
    ids, logp, argmax, nll = [], [], [], []
    for chunk in chunks:
        rows = np.asarray(chunk_logits(list(chunk)))[first:last]  # (S, V)
        lp = log_softmax(rows)
        k = min(top_k, lp.shape[1])
        part = np.argpartition(-lp, k - 1, axis=1)[:, :k]  # (S, k), unordered
        order = np.argsort(-np.take_along_axis(lp, part, axis=1), axis=1, kind="stable")
        top = np.take_along_axis(part, order, axis=1)
        ids.append(top.astype(np.int32))
        logp.append(np.take_along_axis(lp, top, axis=1))
        argmax.append(rows.argmax(axis=1).astype(np.int32))
        tgt = np.asarray(chunk[first + 1:last + 1])
        nll.append(-lp[np.arange(len(tgt)), tgt].astype(np.float64))
    return Reference(np.concatenate(ids), np.concatenate(logp), np.concatenate(argmax), np.concatenate(nll),
                     targets_of(chunks, n_ctx), n_ctx, len(chunks))


@dataclass
class Scores:
    """Per scored token, chunk-major: what the statistics and the samples are computed from."""

    kld: np.ndarray  # (N,) float64
    same_top: np.ndarray  # (N,) bool
    nll: np.ndarray  # (N,) float64
    nll_reference: np.ndarray  # (N,) float64
    n_chunks: int
    pass_ns: int = 0

    @property
    def per_chunk(self) -> int:
        return len(self.kld) // self.n_chunks


def kld_rows(ref_ids: np.ndarray, ref_logp: np.ndarray, lq: np.ndarray) -> np.ndarray:
    """KL(ref || q) per row over the ref's top-k tokens and one tail bin; lq: the quant's (S, V) log-probs."""
    p = np.exp(ref_logp.astype(np.float64))  # (S, k)
    lq_top = np.take_along_axis(lq, ref_ids, axis=1)  # (S, k) float32, bit-equal to ref_logp for a self-test
    kl = (p * (ref_logp.astype(np.float64) - lq_top.astype(np.float64))).sum(axis=1)
    tail_ref = np.clip(1.0 - p.sum(axis=1), 0.0, 1.0)
    tail_q = np.clip(1.0 - np.exp(lq_top.astype(np.float64)).sum(axis=1), _TINY, 1.0)
    has_tail = tail_ref > _TINY
    kl[has_tail] += tail_ref[has_tail] * (np.log(tail_ref[has_tail]) - np.log(tail_q[has_tail]))
    # Rounding can leave a hair below 0 for near-equal distributions; KL itself never is.
    return np.maximum(kl, 0.0)


def score(reference: Reference, chunk_logits: Callable[[list[int]], np.ndarray],
          chunks: Sequence[Sequence[int]]) -> Scores:
    """The quant's pass over the same chunks, scored against the reference."""
    n_ctx = reference.n_ctx
    if len(chunks) != reference.n_chunks or not np.array_equal(targets_of(chunks, n_ctx), reference.targets):
        raise ValueError("the reference pass was made over other tokens than this pass: "
                         "the two models do not share a tokenizer, or the cache is stale")
    first, last = scored_range(n_ctx)
    n = last - first
    kld, same, nll = [], [], []
    t0 = time.perf_counter_ns()
    for c, chunk in enumerate(chunks):
        rows = np.asarray(chunk_logits(list(chunk)))[first:last]  # (S, V)
        lq = log_softmax(rows)
        sl = slice(c * n, (c + 1) * n)
        kld.append(kld_rows(reference.top_ids[sl], reference.top_logp[sl], lq))
        same.append(rows.argmax(axis=1) == reference.argmax[sl])
        tgt = reference.targets[sl]
        nll.append(-lq[np.arange(n), tgt].astype(np.float64))
    return Scores(np.concatenate(kld), np.concatenate(same), np.concatenate(nll), reference.nll.copy(),
                  len(chunks), time.perf_counter_ns() - t0)


@dataclass
class Figures:
    """The statistics of a Quality block, and the per-chunk samples they follow from."""

    n_tokens_scored: int
    kld_mean: float
    kld_median: float
    kld_p99: float
    kld_max: float
    top1_agreement: float
    ppl: float
    ppl_reference: float
    kld_chunk_means: list[float] = field(default_factory=list)
    top1_chunk: list[float] = field(default_factory=list)
    nll_chunk_means: list[float] = field(default_factory=list)
    nll_reference_chunk_means: list[float] = field(default_factory=list)
    kld_percentiles: list[float] = field(default_factory=list)


def figures(s: Scores) -> Figures:
    by_chunk = lambda a: a.reshape(s.n_chunks, -1).mean(axis=1).tolist()
    pct = np.percentile(s.kld, np.arange(101), method="linear")
    return Figures(
        n_tokens_scored=len(s.kld), kld_mean=float(s.kld.mean()), kld_median=float(pct[50]),
        kld_p99=float(pct[99]), kld_max=float(s.kld.max()), top1_agreement=float(s.same_top.mean()),
        ppl=float(np.exp(s.nll.mean())), ppl_reference=float(np.exp(s.nll_reference.mean())),
        kld_chunk_means=by_chunk(s.kld), top1_chunk=by_chunk(s.same_top.astype(np.float64)),
        nll_chunk_means=by_chunk(s.nll), nll_reference_chunk_means=by_chunk(s.nll_reference),
        kld_percentiles=pct.tolist(),
    )


# The cache of reference passes, under the worker's models folder.

def cache_path(models_dir: Path, engine: str, reference_sha256: str, text_sha: str, n_ctx: int, n_chunks: int,
               top_k: int) -> Path:
    """One file per (reference file, text, context, chunks, k, engine): each engine is scored
    against its own reference pass, so the figure is the quant's loss, not the engines' difference."""
    name = f"{reference_sha256[:16]}.{text_sha[:12]}.{engine}.c{n_ctx}.n{n_chunks}.k{top_k}.npz"
    return Path(models_dir) / "quality" / name


def save_reference(path: Path, ref: Reference, reference_sha256: str, text_sha: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial.npz")
    np.savez_compressed(partial, top_ids=ref.top_ids, top_logp=ref.top_logp, argmax=ref.argmax, nll=ref.nll,
                        targets=ref.targets, meta=np.array([reference_sha256, text_sha, str(ref.n_ctx),
                                                            str(ref.n_chunks)]))
    os.replace(partial, path)  # atomic: a worker killed mid-write leaves no half cache


def load_reference(path: Path, reference_sha256: str, text_sha: str) -> Reference | None:
    """The cached pass, or None when absent, unreadable or made for another file or text."""
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = [str(x) for x in z["meta"]]
            if meta[:2] != [reference_sha256, text_sha]:
                return None
            return Reference(z["top_ids"], z["top_logp"], z["argmax"], z["nll"], z["targets"], int(meta[2]),
                             int(meta[3]))
    except (OSError, KeyError, ValueError, IndexError):
        return None


def text_chunks(tokenize: Callable[..., list[int]], text: str, n_ctx: int, n_chunks: int = 0) -> list[list[int]]:
    """The text's chunks through an engine's tokenizer (both engines share llama.cpp's)."""
    bos = tokenize("", add_bos=True)
    return chunk_tokens(tokenize(text, add_bos=False), n_ctx, n_chunks, bos[0] if bos else None)


def reference_pass(chunk_logits: Callable[[list[int]], np.ndarray], chunks: Sequence[Sequence[int]], n_ctx: int,
                   top_k: int = TOP_K) -> tuple[Reference, int]:
    """(reference, wall ns) of a reference pass."""
    t0 = time.perf_counter_ns()
    ref = reference_from_logits(chunk_logits, chunks, n_ctx, top_k)
    return ref, time.perf_counter_ns() - t0
