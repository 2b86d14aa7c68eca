"""Results to a leaderboard by VRAM tier. Pure: the CLI and the dashboard both call it.

A row is one model x quant x technique x engine x settings x hardware class: the model by its
sha256, or for an import that has none by file name + model_type + size + n_params (model_key);
the settings are the engine parameters that differ from the defaults (settings_label); the
hardware class is the GPU and llama.cpp backend, or the CPU and its backend of a box that computed
on its host (hardware_label).
It ranks by decode tok/s at a chosen context depth, with prefill and TTFT beside it. Its tier is
the memory the run used: the measured peak where a result carries one, else estimated from the
file and the offload settings it ran with (farm.memory.run_memory_bytes, marked so).

The CLI feeds whole Results; the dashboard feeds `Measurement`s that SQL already averaged per
test, so ranking 100,000 results never loads 100,000 JSON documents. Both take one road here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Iterable

from farm.contract import EngineConfig, ModelFacts, Result, accelerators, kind_of_test
from farm.memory import TIERS_GB, run_memory_bytes

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
    model_sha256: str = ""
    tg_n_runs: int = 0
    pp_n_runs: int = 0
    ttft_ms: float | None = None
    n_params: int = 0
    n_params_active: int = 0
    n_depth: int = 0
    settings: str = ""
    # Quality against the model's reference (issue 14); None where no quality pass was measured.
    kld_mean: float | None = None
    top1_agreement: float | None = None

    def as_dict(self) -> dict:
        # Flat scalars only, so a shallow read; dataclasses.asdict deep-copies and costs
        # most of the dashboard's time on a large leaderboard.
        return {f.name: getattr(self, f.name) for f in fields(self)}


# llama.cpp renamed its Metal registry "MTL": one backend, so one class across llama-bench versions.
_LABEL_SPELLING = {"MTL": "Metal"}


def hardware_label(cpu: str, gpu: str, backends: str = "") -> str:
    """One hardware class: the GPU and its accelerator backend, so an RTX 4090 and a 3090 never
    pool and neither does a card's CUDA run with its Vulkan one; an Apple chip by its Metal backend
    where the file names no GPU; a box that computed on its host (no accelerator backend, or a GPU
    beside a CPU-only build) by its CPU and host backend, `AMD EPYC 9354 (CPU)`. Never the core
    count: a box's cores do not make another class, and the settings label shows the threads used.
    A GPU with no backends recorded (results from before the field) keeps its name alone."""
    accel = ",".join(dict.fromkeys(_LABEL_SPELLING.get(b, b) for b in accelerators(backends)))
    if accel:
        return f"{gpu or cpu or 'unknown'} ({accel})"
    if gpu and not backends:
        return gpu
    return f"{cpu or 'unknown CPU'} ({backends or 'CPU'})"


def hardware_class(gpu: str, backends: str = "") -> str:
    """The filter's coarse class: a GPU box (an accelerator backend, or a GPU named where no backends
    were recorded) or a box that computed on its CPU."""
    if backends:
        return "GPU" if accelerators(backends) else "CPU"
    return "GPU" if gpu else "CPU"


# llama-bench's column names for EngineConfig's fields, for the settings label.
SETTING_NAMES = {"n_gpu_layers": "ngl", "n_threads": "threads", "split_mode": "sm", "no_kv_offload": "nkvo",
                 "flash_attn": "fa", "tensor_split": "ts", "override_tensors": "ot", "use_mmap": "mmap"}
_DEFAULTS = EngineConfig()


def settings_label(config: EngineConfig) -> str:
    """The engine parameters a run changed from the defaults, `ngl=99 fa=on type_k=q8_0`: a leaderboard
    row is one setting, so a Q8_0 KV cache or experts in host RAM never average with the defaults."""
    parts = []
    for name in type(config).model_fields:
        value = getattr(config, name)
        if value != getattr(_DEFAULTS, name):
            if isinstance(value, tuple):
                value = "/".join(f"{x:g}" for x in value)
            parts.append(f"{SETTING_NAMES.get(name, name)}={int(value) if isinstance(value, bool) else value}")
    return " ".join(parts)


def model_key(model: str, sha256: str, model_type: str, size_bytes: int, n_params: int) -> str:
    """A model's identity: its sha256, else (a llama-bench import hashes nothing) its file name with
    llama.cpp's description, size and parameter count, so two models never merge into one row."""
    if sha256:
        return sha256
    return f"{model.replace(chr(92), '/').rsplit('/', 1)[-1]}|{model_type}|{size_bytes}|{n_params}"


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
    backends: str = ""
    config: EngineConfig = _DEFAULTS
    # From the model's header where a result carries it: what the memory estimate needs.
    n_layer: int = 0
    kv_bytes_per_token: int = 0

    @property
    def model_key(self) -> str:
        return model_key(self.model, self.model_sha256, self.model_type, self.size_bytes, self.n_params)

    def estimated_memory(self) -> int:
        """Peak memory of the run from its file and offload settings, for runs that measured none."""
        facts = ModelFacts(size_bytes=self.size_bytes, n_params=self.n_params, n_params_active=self.n_params_active,
                           n_layer=self.n_layer, kv_bytes_per_token=self.kv_bytes_per_token)
        n_ctx = self.n_depth + self.n_prompt + self.n_gen
        return run_memory_bytes(facts, self.config, n_ctx, hardware_class(self.gpu, self.backends) == "GPU")[0]
    kld_mean: float | None = None
    top1_agreement: float | None = None


def from_result(r: Result) -> Measurement:
    facts = r.model_facts
    # 0 means not measured: the GPU's peak where the run used one, else the process's.
    peak = r.conditions.peak_vram_bytes or r.conditions.peak_rss_bytes or None
    return Measurement(
        model=r.model, model_sha256=r.model_sha256, quant=r.quant, technique=r.technique, backend=r.backend,
        worker=r.worker, hardware=hardware_label(r.hardware.cpu, r.hardware.gpu, r.hardware.backends),
        test=r.test, n_prompt=r.n_prompt, n_gen=r.n_gen,
        n_depth=r.n_depth, avg_ts=r.avg_ts, stddev_ts=r.stddev_ts, size_bytes=facts.size_bytes,
        model_type=facts.model_type, n_params=facts.n_params, n_params_active=facts.n_params_active,
        peak_memory_bytes=peak, ttft_ns=r.ttft_ns or None, gpu=r.hardware.gpu, backends=r.hardware.backends,
        config=r.config, n_layer=facts.n_layer, kv_bytes_per_token=facts.kv_bytes_per_token,
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
        if filters.hardware_classes and hardware_class(m.gpu, m.backends) not in filters.hardware_classes:
            continue
        if filters.backends and m.backend not in filters.backends:
            continue
        key = (m.model_key, m.quant, m.technique, m.backend, settings_label(m.config), m.hardware)
        groups.setdefault(key, []).append(m)
    rows: list[LeaderRow] = []
    for (model, quant, technique, backend, settings, hw), ms in groups.items():
        if filters.techniques and technique not in filters.techniques:
            continue  # filtered here, not above, so a technique row can still borrow its baseline's prefill
        tg = _pick_measurement(ms, "tg", filters.n_depth)
        if filters.n_depth and tg is None:
            continue  # nothing measured at the depth asked for
        # Techniques change decode only: a spec/lookup/MTP row shows its baseline's prefill.
        pp = _pick_measurement(ms, "pp", 0) or _pick_measurement(
            groups.get((model, quant, "baseline", backend, settings, hw), []), "pp", 0)
        first = ms[0]
        peaks = [m.peak_memory_bytes for m in ms if m.peak_memory_bytes]
        size = max(m.size_bytes for m in ms)
        memory = max(peaks) if peaks else max(m.estimated_memory() for m in ms)
        ttfts = [m.ttft_ns for m in ([pp] if pp and pp.ttft_ns else ms) if m.ttft_ns]
        # Quality is the file's, whatever the test or technique: the mean of its passes, or the
        # baseline's where a technique row has none (speculation is lossless).
        graded = [m for m in ms if m.kld_mean is not None] or [
            m for m in groups.get((model, quant, "baseline", backend, settings, hw), []) if m.kld_mean is not None]
        rows.append(LeaderRow(
            rank=0, tier_gb=tier_for(memory), model=first.model, quant=quant, technique=technique,
            backend=backend, model_type=first.model_type, size_bytes=size,
            memory_bytes=memory, memory_estimated=not peaks,
            pp_test=pp.test if pp else "", pp_ts=pp.avg_ts if pp else None, pp_stddev_ts=pp.stddev_ts if pp else None,
            tg_test=tg.test if tg else "", tg_ts=tg.avg_ts if tg else None, tg_stddev_ts=tg.stddev_ts if tg else None,
            n_results=sum(m.n_runs for m in ms), hardware=hw,
            worker=", ".join(sorted({m.worker for m in ms})), model_sha256=first.model_sha256,
            tg_n_runs=tg.n_runs if tg else 0, pp_n_runs=pp.n_runs if pp else 0,
            ttft_ms=min(ttfts) / 1e6 if ttfts else None,
            n_params=max(m.n_params for m in ms), n_params_active=max(m.n_params_active for m in ms),
            n_depth=filters.n_depth, settings=settings,
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
