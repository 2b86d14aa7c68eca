"""What should I run on this hardware? Results to a short ranked table. Pure: the CLI and the dashboard both call it.

It owns the answer to "which model x quant x technique gives the most useful tokens per second
in this much memory": the leaderboard's rows (orchestrator/ranking.py, reused, never redone)
narrowed to what fits the memory asked for, joined with each file's quality block (KLD and top-1
agreement against its reference) and with what the technique bought (speedup, acceptance,
losslessness), and a plain statement of how much data stands behind the table.

It does not know where Results come from (the caller loads them and names the flagged workers)
and it does not measure quality: a file whose Results carry no quality block reads "quality not
measured", and a `min_agreement` asked for then excludes it, saying so.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from farm.contract import Result
from orchestrator.ranking import (
    Filters,
    LeaderRow,
    from_result,
    hardware_class,
    hardware_label,
    rank,
    tier_for,
)

_GIB = 1 << 30
Workload = Literal["chat", "code"]
# Which prompt categories of a spec / lookup / MTP run speak for a workload: acceptance depends
# on how predictable the text is, so a code run says little about chat and the reverse.
WORKLOAD_CATEGORIES: dict[str, tuple[str, ...]] = {
    "chat": ("chat", "qa", "rewriting", "summarisation"),
    "code": ("code", "math"),
}
# Below these the table is a first look, not an answer: one worker's box may be an outlier.
THIN_RESULTS = 10
THIN_WORKERS = 2


@dataclass(frozen=True)
class FileQuality:
    """One model file's quality, pooled over the Results that measured it."""

    kld_mean: float
    kld_p99: float
    top1_agreement: float
    ppl: float
    ppl_reference: float
    reference_quant: str
    n_results: int


@dataclass
class Recommendation:
    rank: int
    model: str
    quant: str
    technique: str
    how: str  # what gives the speed, in words
    backend: str
    hardware: str
    tg_test: str
    tg_ts: float | None
    tg_stddev_ts: float | None
    pp_ts: float | None
    memory_bytes: int
    memory_estimated: bool
    memory_limit_bytes: int
    fits: str  # "VRAM" or "RAM"
    quality: FileQuality | None
    n_results: int
    workers: str

    @property
    def quality_text(self) -> str:
        if self.quality is None:
            return "quality not measured"
        q = self.quality
        return f"KLD {q.kld_mean:.4f}, top-1 {q.top1_agreement:.1%} vs {q.reference_quant}"


@dataclass
class RecommendReport:
    vram_gb: float
    ram_gb: float | None
    workload: str
    min_agreement: float | None
    rows: list[Recommendation]
    n_results: int  # ok Results from unflagged workers behind the rows that fit
    n_workers: int
    n_excluded_quality: int = 0
    n_flagged_results: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def thin(self) -> bool:
        return self.n_results < THIN_RESULTS or self.n_workers < THIN_WORKERS

    def data_statement(self) -> str:
        where = f"{self.vram_gb:g} GB VRAM" + (f" / {self.ram_gb:g} GB RAM" if self.ram_gb else "")
        head = (f"{self.n_results} result{'s' if self.n_results != 1 else ''} from {self.n_workers} "
                f"worker{'s' if self.n_workers != 1 else ''} fit {where}")
        if not self.rows:
            return f"no data: {head}; measure something that fits, e.g. tokenfarm sweep submit examples/demo.yaml --wait"
        if self.thin:
            return (f"thin data: {head} (wanted at least {THIN_RESULTS} results from {THIN_WORKERS} workers); "
                    "treat this ranking as a first look")
        return head


def file_quality(results: Iterable[Result]) -> dict[str, FileQuality]:
    """Quality per model file (sha256): a property of the file, so any job that measured it speaks for it."""
    by_file: dict[str, list] = {}
    for r in results:
        if r.quality is not None:
            by_file.setdefault(r.model_sha256, []).append(r.quality)
    out = {}
    for sha, qs in by_file.items():
        out[sha] = FileQuality(
            kld_mean=statistics.fmean(q.kld_mean for q in qs), kld_p99=statistics.fmean(q.kld_p99 for q in qs),
            top1_agreement=statistics.fmean(q.top1_agreement for q in qs), ppl=statistics.fmean(q.ppl for q in qs),
            ppl_reference=statistics.fmean(q.ppl_reference for q in qs), reference_quant=qs[0].reference_quant,
            n_results=len(qs))
    return out


def technique_text(quant: str, technique: str, results: list[Result]) -> str:
    """'Q4_K_M + spec with smollm2-135m Q4_0 draft: 1.70x at 0.78 acceptance, lossless'."""
    if technique == "baseline":
        return f"{quant}, plain decoding"
    spec = [r.speculation for r in results if r.speculation is not None]
    if technique == "spec":
        drafts = sorted({f"{r.draft_model or '?'} {r.draft_quant or ''}".strip() for r in results})
        head = f"{quant} + spec with {', '.join(drafts)} draft"
    elif technique == "mtp":
        head = f"{quant} + MTP ({max((r.n_mtp for r in results), default=0)} heads)"
    else:
        head = f"{quant} + prompt lookup (n-gram {max((r.ngram_max for r in results), default=0)})"
    if not spec:
        return head
    speedup = statistics.fmean(s.speedup for s in spec)
    acceptance = statistics.fmean(s.acceptance_rate for s in spec)
    n_lossy = sum(not s.lossless for s in spec)
    loss = "lossless" if n_lossy == 0 else f"diverged from plain decoding in {n_lossy} of {len(spec)} runs"
    return f"{head}: {speedup:.2f}x at {acceptance:.2f} acceptance, {loss}"


def _key(r: Result) -> tuple:
    # ranking groups by (file, quant, technique, engine, hardware label); the same key here.
    return (r.model_sha256, r.quant, r.technique, r.backend, hardware_label(r.hardware.cpu, r.hardware.gpu,
                                                                            r.hardware.backends))


def _same_class(r: Result, vram_gb: float, ram_gb: float | None) -> bool:
    """A GPU of the VRAM asked for's tier, or (with ram_gb) a CPU-only box with no more RAM than that."""
    if r.hardware.gpu:
        return bool(r.hardware.vram_bytes) and tier_for(r.hardware.vram_bytes) == tier_for(int(vram_gb * _GIB))
    return bool(ram_gb) and 0 < r.hardware.ram_bytes <= int(ram_gb * _GIB * 1.05)


def _class_words(vram_gb: float, ram_gb: float | None) -> str:
    tier = tier_for(int(vram_gb * _GIB))
    return f"GPUs of the {tier} GB tier" + (f", CPU-only boxes up to {ram_gb:g} GB RAM" if ram_gb else "")


def _for_workload(results: list[Result], workload: str) -> list[Result]:
    """Baseline tests as they are; technique runs only over the workload's prompt categories."""
    categories = WORKLOAD_CATEGORIES[workload]
    return [r for r in results if r.technique == "baseline" or r.prompt_category in categories]


def recommend(results: Iterable[Result], vram_gb: float, ram_gb: float | None = None, workload: str = "chat",
              min_agreement: float | None = None, flagged_workers: frozenset[str] | set[str] = frozenset(),
              top_n: int = 10) -> RecommendReport:
    """The best model x quant x technique that fits `vram_gb` (or, measured on a CPU-only box, `ram_gb`)."""
    if workload not in WORKLOAD_CATEGORIES:
        raise ValueError(f"unknown workload {workload!r}; use one of {', '.join(WORKLOAD_CATEGORIES)}")
    if vram_gb <= 0:
        raise ValueError(f"vram must be a positive number of GB, got {vram_gb:g}")
    every = [r for r in results if r.status == "ok"]
    n_flagged = sum(r.worker in flagged_workers for r in every)
    ok = [r for r in every if r.worker not in flagged_workers]
    quality = file_quality(ok)
    chosen = _for_workload(ok, workload)
    notes = []
    own = [r for r in chosen if _same_class(r, vram_gb, ram_gb)]
    if own:
        # Speed is the box's bandwidth's: a 3060 owner learns little from an H100's figures.
        chosen = own
        notes.append(f"speeds measured on boxes of this class ({_class_words(vram_gb, ram_gb)})")
    elif chosen:
        notes.append(f"no box of this class ({_class_words(vram_gb, ram_gb)}) measured these: "
                     "speeds come from the hardware named in each row")
    if len(chosen) < len(ok):
        notes.append(f"{len(ok) - len(chosen)} technique runs over other prompt categories than "
                     f"{workload} ({', '.join(WORKLOAD_CATEGORIES[workload])}) left out")
    by_key: dict[tuple, list[Result]] = {}
    for r in chosen:
        by_key.setdefault(_key(r), []).append(r)
    rows: list[LeaderRow] = rank((from_result(r) for r in chosen), Filters(flagged_workers=frozenset(flagged_workers)))
    vram_limit = int(vram_gb * _GIB)
    ram_limit = int(ram_gb * _GIB) if ram_gb else 0
    picked: list[Recommendation] = []
    n_excluded = 0
    behind: list[Result] = []
    for row in rows:
        group = by_key.get((row.model_sha256, row.quant, row.technique, row.backend, row.hardware), [])
        if row.tg_ts is None:
            continue  # a recommendation is about decode speed; a file with only prefill says nothing yet
        if row.memory_bytes <= vram_limit:
            fits, limit = "VRAM", vram_limit
        elif ram_limit and row.memory_bytes <= ram_limit and (
                not group or hardware_class(group[0].hardware.gpu, group[0].hardware.backends) == "CPU"):
            fits, limit = "RAM", ram_limit
        else:
            continue
        q = quality.get(row.model_sha256)
        behind.extend(group)
        if min_agreement is not None and (q is None or q.top1_agreement < min_agreement):
            n_excluded += 1
            continue
        picked.append(Recommendation(
            rank=0, model=row.model, quant=row.quant, technique=row.technique,
            how=technique_text(row.quant, row.technique, group), backend=row.backend, hardware=row.hardware,
            tg_test=row.tg_test, tg_ts=row.tg_ts, tg_stddev_ts=row.tg_stddev_ts, pp_ts=row.pp_ts,
            memory_bytes=row.memory_bytes, memory_estimated=row.memory_estimated, memory_limit_bytes=limit,
            fits=fits, quality=q, n_results=row.n_results, workers=row.worker))
    if min_agreement is not None and n_excluded:
        notes.append(f"{n_excluded} combinations left out: top-1 agreement below {min_agreement:.0%} "
                     "or quality not measured")
    if not quality and picked:
        notes.append("quality not measured for any file here: run a sweep with `quality: true` to rank by it")
    picked = picked[:top_n]
    for i, rec in enumerate(picked, 1):
        rec.rank = i
    return RecommendReport(vram_gb=vram_gb, ram_gb=ram_gb, workload=workload, min_agreement=min_agreement,
                           rows=picked, n_results=len(behind), n_workers=len({r.worker for r in behind}),
                           n_excluded_quality=n_excluded, n_flagged_results=n_flagged, notes=notes)



def pareto_front(points: list[tuple[float, float]]) -> list[bool]:
    """For (decode tok/s, KLD) points: True where no other point is at least as fast and as faithful, and better in one.

    One sweep from the fastest down (n log n: a tier may hold thousands of points).
    """
    order = sorted(range(len(points)), key=lambda i: (-points[i][0], points[i][1]))
    front = [False] * len(points)
    best_faster = math.inf  # the lowest KLD among strictly faster points
    k = 0
    while k < len(order):
        ts = points[order[k]][0]
        end = k
        while end < len(order) and points[order[end]][0] == ts:
            end += 1
        group = order[k:end]
        lowest = points[group[0]][1]  # sorted: the first of a speed is its most faithful
        for i in group:
            front[i] = points[i][1] == lowest and lowest < best_faster
        best_faster = min(best_faster, lowest)
        k += len(group)
    return front
