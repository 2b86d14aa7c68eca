"""Results to a leaderboard by VRAM tier. Pure: the CLI and the dashboard both call it.

A row is one (model file, quant, technique, engine, hardware) combination; it ranks by decode
tok/s at a chosen context depth, with prefill and TTFT beside it. Memory is the measured peak
where a result carries one, else estimated from the file size (and marked so).

The CLI feeds whole Results; the dashboard feeds `Measurement`s that SQL already averaged per
test, so ranking 100,000 results never loads 100,000 JSON documents. Both take one road here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Iterable

from farm.contract import Result, kind_of_test
from farm.memory import TIERS_GB

_GIB = 1 << 30
# Room for the KV cache, compute buffers and the runtime beside the weights.
_OVERHEAD_BYTES = 512 << 20
_OVERHEAD_FRACTION = 0.10


def estimated_memory_bytes(size_bytes: int) -> int:
    return int(size_bytes * (1 + _OVERHEAD_FRACTION)) + _OVERHEAD_BYTES


def tier_for(memory_bytes: int) -> int:
    """Smallest tier (GB) that fits; 80 stands for "80 GB and above"."""
    for tier in TIERS_GB:
        if memory_bytes <= tier * _GIB:
            return tier
    return TIERS_GB[-1]


@dataclass
class LeaderRow:
    rank: int
    tier_gb: int
    model: str
    quant: str
    technique: str
    backend: str
    model_type: str
    size_bytes: int
    memory_bytes: int
    memory_estimated: bool
    pp_test: str
    pp_ts: float | None
    pp_stddev_ts: float | None
    tg_test: str
    tg_ts: float | None
    tg_stddev_ts: float | None
    n_results: int
    hardware: str
    worker: str = ""
    tg_n_runs: int = 0
    pp_n_runs: int = 0
    ttft_ms: float | None = None
    n_params: int = 0
    n_params_active: int = 0
    n_depth: int = 0
    # Quality against the model's reference (issue 14); None where no quality pass was measured.
    kld_mean: float | None = None
    top1_agreement: float | None = None

    def as_dict(self) -> dict:
        # Flat scalars only, so a shallow read; dataclasses.asdict deep-copies and costs
        # most of the dashboard's time on a large leaderboard.
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _hardware_label(r: Result) -> str:
    return r.hardware.gpu or f"{r.hardware.cpu} ({r.hardware.n_cpu_cores} cores)"


def hardware_class(gpu: str) -> str:
    """The filter's coarse class: a GPU box or a CPU-only box."""
    return "GPU" if gpu else "CPU"


@dataclass(frozen=True)
class Measurement:
    """One test of one combination on one worker, its runs already pooled (by SQL or from Results).

    `stddev_ts` is the pooled spread of per-repetition tok/s over every run, `n_runs` the number
    of Results behind it. Peak memory is None where no run measured it.
    """

    model: str
    model_sha256: str
    quant: str
    technique: str
    backend: str
    worker: str
    hardware: str
    test: str
    n_prompt: int
    n_gen: int
    n_depth: int
    avg_ts: float
    stddev_ts: float
    n_runs: int = 1
    size_bytes: int = 0
    model_type: str = ""
    n_params: int = 0
    n_params_active: int = 0
    peak_memory_bytes: int | None = None
    ttft_ns: float | None = None
    gpu: str = ""
    kld_mean: float | None = None
    top1_agreement: float | None = None


def from_result(r: Result) -> Measurement:
    facts = r.model_facts
    # 0 means not measured: the GPU's peak where the run used one, else the process's.
    peak = r.conditions.peak_vram_bytes or r.conditions.peak_rss_bytes or None
    return Measurement(
        model=r.model, model_sha256=r.model_sha256, quant=r.quant, technique=r.technique, backend=r.backend,
        worker=r.worker, hardware=_hardware_label(r), test=r.test, n_prompt=r.n_prompt, n_gen=r.n_gen,
        n_depth=r.n_depth, avg_ts=r.avg_ts, stddev_ts=r.stddev_ts, size_bytes=facts.size_bytes,
        model_type=facts.model_type, n_params=facts.n_params, n_params_active=facts.n_params_active,
        peak_memory_bytes=peak, ttft_ns=r.ttft_ns or None, gpu=r.hardware.gpu,
        kld_mean=r.quality.kld_mean if r.quality else None,
        top1_agreement=r.quality.top1_agreement if r.quality else None,
    )


def pool(ms: list[Measurement]) -> Measurement:
    """Several measurements of one test as one: run-weighted mean, spread within and between runs."""
    if len(ms) == 1:
        return ms[0]
    n = sum(m.n_runs for m in ms)
    mean = sum(m.avg_ts * m.n_runs for m in ms) / n
    within = sum(m.stddev_ts ** 2 * m.n_runs for m in ms) / n
    between = sum((m.avg_ts - mean) ** 2 * m.n_runs for m in ms) / n
    peaks = [m.peak_memory_bytes for m in ms if m.peak_memory_bytes]
    ttfts = [m.ttft_ns for m in ms if m.ttft_ns]
    return replace(ms[0], avg_ts=mean, stddev_ts=math.sqrt(within + between), n_runs=n,
                   peak_memory_bytes=max(peaks) if peaks else None,
                   ttft_ns=sum(ttfts) / len(ttfts) if ttfts else None)


def _pick_measurement(ms: list[Measurement], kind: str, n_depth: int) -> Measurement | None:
    """The headline test of a kind at a depth: the largest size measured, its runs pooled."""
    # By the test's kind, not its prefix: llama-bench's pg tests read `pp512+tg128`.
    candidates = [m for m in ms if kind_of_test(m.test) == kind and m.n_depth == n_depth]
    if not candidates:
        return None
    size = max(m.n_prompt if kind == "pp" else m.n_gen for m in candidates)
    return pool([m for m in candidates if (m.n_prompt if kind == "pp" else m.n_gen) == size])


@dataclass(frozen=True)
class Filters:
    """What the leaderboard may be narrowed to; an empty tuple means no restriction."""

    tier_gb: int | None = None
    n_depth: int = 0
    hardware_classes: tuple[str, ...] = ()
    backends: tuple[str, ...] = ()
    techniques: tuple[str, ...] = ()
    flagged_workers: frozenset[str] = field(default_factory=frozenset)


def rank(measurements: Iterable[Measurement], filters: Filters = Filters()) -> list[LeaderRow]:
    groups: dict[tuple, list[Measurement]] = {}
    for m in measurements:
        # A flagged worker's numbers are kept in the database but never rank.
        if m.worker in filters.flagged_workers:
            continue
        if filters.hardware_classes and hardware_class(m.gpu) not in filters.hardware_classes:
            continue
        if filters.backends and m.backend not in filters.backends:
            continue
        groups.setdefault((m.model_sha256, m.quant, m.technique, m.backend, m.hardware), []).append(m)
    rows: list[LeaderRow] = []
    for (sha, quant, technique, backend, hw), ms in groups.items():
        if filters.techniques and technique not in filters.techniques:
            continue  # filtered here, not above, so a technique row can still borrow its baseline's prefill
        tg = _pick_measurement(ms, "tg", filters.n_depth)
        if filters.n_depth and tg is None:
            continue  # nothing measured at the depth asked for
        # Techniques change decode only: a spec/lookup/MTP row shows its baseline's prefill.
        pp = _pick_measurement(ms, "pp", 0) or _pick_measurement(
            groups.get((sha, quant, "baseline", backend, hw), []), "pp", 0)
        first = ms[0]
        peaks = [m.peak_memory_bytes for m in ms if m.peak_memory_bytes]
        size = max(m.size_bytes for m in ms)
        memory = max(peaks) if peaks else estimated_memory_bytes(size)
        ttfts = [m.ttft_ns for m in ([pp] if pp and pp.ttft_ns else ms) if m.ttft_ns]
        # Quality is the file's, whatever the test or technique: the mean of its passes, or the
        # baseline's where a technique row has none (speculation is lossless).
        graded = [m for m in ms if m.kld_mean is not None] or [
            m for m in groups.get((sha, quant, "baseline", backend, hw), []) if m.kld_mean is not None]
        rows.append(LeaderRow(
            rank=0, tier_gb=tier_for(memory), model=first.model, quant=quant, technique=technique,
            backend=backend, model_type=first.model_type, size_bytes=size,
            memory_bytes=memory, memory_estimated=not peaks,
            pp_test=pp.test if pp else "", pp_ts=pp.avg_ts if pp else None, pp_stddev_ts=pp.stddev_ts if pp else None,
            tg_test=tg.test if tg else "", tg_ts=tg.avg_ts if tg else None, tg_stddev_ts=tg.stddev_ts if tg else None,
            n_results=sum(m.n_runs for m in ms), hardware=hw,
            worker=", ".join(sorted({m.worker for m in ms})),
            tg_n_runs=tg.n_runs if tg else 0, pp_n_runs=pp.n_runs if pp else 0,
            ttft_ms=min(ttfts) / 1e6 if ttfts else None,
            n_params=max(m.n_params for m in ms), n_params_active=max(m.n_params_active for m in ms),
            n_depth=filters.n_depth,
            kld_mean=sum(m.kld_mean for m in graded) / len(graded) if graded else None,
            top1_agreement=sum(m.top1_agreement for m in graded) / len(graded) if graded else None,
        ))
    if filters.tier_gb is not None:
        # A model that fits a smaller card fits this one too.
        rows = [r for r in rows if r.tier_gb <= filters.tier_gb]
    rows.sort(key=lambda r: (-(r.tg_ts or 0.0), -(r.pp_ts or 0.0), r.model, r.quant))
    for i, row in enumerate(rows, 1):
        row.rank = i
    return rows


def leaderboard(results: Iterable[Result], tier_gb: int | None = None) -> list[LeaderRow]:
    return rank((from_result(r) for r in results if r.status == "ok"), Filters(tier_gb=tier_gb))
