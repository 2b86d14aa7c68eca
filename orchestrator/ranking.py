"""Results to a leaderboard by VRAM tier. Pure: the CLI and the dashboard both call it.

A row is one (model file, quant, technique, engine, hardware) combination; it ranks by decode
tok/s, with prefill beside it. Memory is estimated from the file size until measured peaks land.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable

from worker.contract import Result

TIERS_GB: tuple[int, ...] = (8, 12, 16, 24, 32, 48, 80)
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

    def as_dict(self) -> dict:
        return asdict(self)


def _hardware_label(r: Result) -> str:
    return r.hardware.gpu or f"{r.hardware.cpu} ({r.hardware.n_cpu_cores} cores)"


def _pick(results: list[Result], prefix: str) -> Result | None:
    """The headline test of a kind: no context depth, the largest size measured."""
    candidates = [r for r in results if r.test.startswith(prefix) and r.n_depth == 0]
    if not candidates:
        return None
    return max(candidates, key=lambda r: (r.n_prompt if prefix == "pp" else r.n_gen, r.finished_at))


def leaderboard(results: Iterable[Result], tier_gb: int | None = None) -> list[LeaderRow]:
    groups: dict[tuple, list[Result]] = {}
    for r in results:
        if r.status != "ok":
            continue
        key = (r.model_sha256, r.quant, r.technique, r.backend, _hardware_label(r))
        groups.setdefault(key, []).append(r)
    rows: list[LeaderRow] = []
    for (_, quant, technique, backend, hw), rs in groups.items():
        pp, tg = _pick(rs, "pp"), _pick(rs, "tg")
        first = rs[0]
        memory = estimated_memory_bytes(first.model_facts.size_bytes)
        rows.append(LeaderRow(
            rank=0, tier_gb=tier_for(memory), model=first.model, quant=quant, technique=technique,
            backend=backend, model_type=first.model_facts.model_type, size_bytes=first.model_facts.size_bytes,
            memory_bytes=memory, memory_estimated=True,
            pp_test=pp.test if pp else "", pp_ts=pp.avg_ts if pp else None, pp_stddev_ts=pp.stddev_ts if pp else None,
            tg_test=tg.test if tg else "", tg_ts=tg.avg_ts if tg else None, tg_stddev_ts=tg.stddev_ts if tg else None,
            n_results=len(rs), hardware=hw,
        ))
    if tier_gb is not None:
        # A model that fits a smaller card fits this one too.
        rows = [r for r in rows if r.tier_gb <= tier_gb]
    rows.sort(key=lambda r: (-(r.tg_ts or 0.0), -(r.pp_ts or 0.0), r.model, r.quant))
    for i, row in enumerate(rows, 1):
        row.rank = i
    return rows
