"""Job and Result: the one schema that crosses the wire between orchestrator and workers.

Both sides import this module, so it stays light (pydantic only). Every output format, the
database's key columns and the collector's checks are derived from these fields. It knows
nothing of Celery, SQL or any engine.
"""

from __future__ import annotations

import math
import statistics
from datetime import datetime, timezone
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

SCHEMA_VERSION = 1

# Quantizations llama.cpp's quantizer can derive without an importance matrix; names follow
# llama.cpp's `--type` spelling so sweeps read like llama-quantize command lines.
QUANTS: tuple[str, ...] = (
    "F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_1", "Q5_0",
    "Q4_K_M", "Q4_K_S", "Q4_1", "Q4_0", "IQ4_NL", "IQ4_XS", "Q3_K_L", "Q3_K_M", "Q3_K_S", "Q2_K",
)

Technique = Literal["baseline", "spec", "lookup", "mtp"]
Engine = Literal["llamacpp", "torch"]
TestKind = Literal["pp", "tg"]
Status = Literal["ok", "failed"]


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def format_test_name(kind: str, n_prompt: int, n_gen: int, n_depth: int) -> str:
    """llama-bench's test names (`pp512`, `tg128`, `tg128 @ d4096`), so numbers compare."""
    name = f"pp{n_prompt}" if kind == "pp" else f"tg{n_gen}"
    return f"{name} @ d{n_depth}" if n_depth else name


class EngineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    n_threads: int = Field(default=0, ge=0, description="0: all physical cores")
    n_batch: int = Field(default=2048, ge=1)
    n_ubatch: int = Field(default=512, ge=1)
    n_gpu_layers: int = Field(default=0, ge=-1, description="-1: every layer")
    flash_attn: bool = False


class Job(BaseModel):
    """One measurement: every sweep list collapsed to a scalar."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: int = SCHEMA_VERSION
    job_id: str
    sweep_id: str
    index: int = Field(ge=0)
    model: str = Field(description="catalogue name or path to a GGUF file")
    model_sha256: str | None = Field(default=None, description="expected sha256 of the source file")
    quant: str
    technique: Technique = "baseline"
    engine: Engine = "llamacpp"
    kind: TestKind
    n_prompt: int = Field(default=0, ge=0)
    n_gen: int = Field(default=0, ge=0)
    n_depth: int = Field(default=0, ge=0)
    repetitions: int = Field(default=5, ge=1, le=1000)
    n_warmup: int = Field(default=1, ge=0, le=100)
    prompt_source: Literal["text", "random"] = "text"
    seed: int = 42
    config: EngineConfig = EngineConfig()
    # Techniques beyond baseline (spec: a draft model; lookup: n-grams of the text so far;
    # mtp: trained multi-token-prediction heads of the target itself).
    draft_model: str | None = Field(default=None, description="spec: catalogue name or path to a GGUF file")
    draft_quant: str | None = None
    n_draft: int = Field(default=0, ge=0, le=64, description="spec/lookup: most tokens drafted per target pass")
    p_min: float = Field(default=0.0, ge=0.0, le=1.0, description="spec: stop drafting below this top probability")
    ngram_max: int = Field(default=0, ge=0, le=64, description="lookup: longest n-gram matched")
    n_mtp: int = Field(default=0, ge=0, le=16, description="mtp: heads proposing per target pass")
    prompt_category: str = ""
    temperature: float = Field(default=0.0, ge=0.0, description="0: greedy; above: sampled speculation")

    @model_validator(mode="after")
    def _sizes_match_kind(self) -> "Job":
        if self.kind == "pp" and self.n_prompt < 1:
            raise ValueError("a pp job needs n_prompt >= 1")
        if self.kind == "tg" and self.n_gen < 1:
            raise ValueError("a tg job needs n_gen >= 1")
        if self.quant not in QUANTS:
            raise ValueError(f"unknown quant {self.quant!r}")
        return self

    @model_validator(mode="after")
    def _technique_options(self) -> "Job":
        if self.technique == "mtp" and (self.n_mtp < 1 or self.engine != "torch"):
            raise ValueError("an mtp job needs n_mtp >= 1 and engine torch (llama.cpp runs no MTP heads here)")
        if self.technique in ("spec", "lookup") and self.n_draft < 1:
            raise ValueError(f"a {self.technique} job needs n_draft >= 1")
        if self.technique == "spec" and not self.draft_model:
            raise ValueError("a spec job needs a draft_model")
        if self.technique == "lookup" and self.ngram_max < 1:
            raise ValueError("a lookup job needs ngram_max >= 1")
        if self.technique != "baseline" and self.kind != "tg":
            raise ValueError(f"{self.technique} speeds up decoding: give it tg tests only")
        if self.draft_quant is not None and self.draft_quant not in QUANTS:
            raise ValueError(f"unknown draft quant {self.draft_quant!r}")
        return self

    @property
    def test(self) -> str:
        return format_test_name(self.kind, self.n_prompt, self.n_gen, self.n_depth)

    @property
    def n_tokens(self) -> int:
        """Tokens each repetition times: the prompt for pp, the generated tokens for tg."""
        return self.n_prompt if self.kind == "pp" else self.n_gen


class Hardware(BaseModel):
    model_config = ConfigDict(extra="forbid")

    cpu: str = ""
    n_cpu_cores: int = 0
    ram_bytes: int = 0
    gpu: str = ""
    vram_bytes: int = 0
    os: str = ""


class ModelFacts(BaseModel):
    model_config = ConfigDict(extra="forbid")

    arch: str = ""
    model_type: str = Field(default="", description="llama-bench's `model_type`, e.g. 'llama 135M Q4_1'")
    size_bytes: int = 0
    n_params: int = 0
    file_type: str = ""


def tok_s(n_tokens: int, ns: int) -> float:
    return n_tokens * 1e9 / ns


def summarize(n_tokens: int, samples_ns: list[int]) -> tuple[float, float]:
    """Mean and sample stddev of per-repetition tok/s, as llama-bench's avg_ts / stddev_ts."""
    rates = [tok_s(n_tokens, ns) for ns in samples_ns]
    mean = statistics.fmean(rates)
    std = statistics.stdev(rates) if len(rates) > 1 else 0.0
    return mean, std


class Result(BaseModel):
    """What a worker sends back for one Job, ok or failed."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = SCHEMA_VERSION
    job_id: str
    sweep_id: str
    status: Status
    error: str = ""
    worker: str
    # Identity of what was measured: the job's request and the file actually run.
    model: str
    model_sha256: str = ""
    source_sha256: str = ""
    model_facts: ModelFacts = ModelFacts()
    quant: str
    technique: Technique = "baseline"
    backend: Engine = "llamacpp"
    test: str
    n_prompt: int = 0
    n_gen: int = 0
    n_depth: int = 0
    repetitions: int = 0
    samples_ns: list[int] = Field(default_factory=list)
    avg_ts: float = 0.0
    stddev_ts: float = 0.0
    load_ns: int = 0
    config: EngineConfig = EngineConfig()
    # Speculation and MTP, measured against a baseline run in the same job (None: baseline).
    speedup: float | None = None
    acceptance_rate: float | None = None
    mean_accepted_len: float | None = None
    acceptance_by_position: list[float] = Field(default_factory=list)
    lossless: bool | None = None
    first_divergence: int | None = None
    draft_ns: int = 0
    verify_ns: int = 0
    draft_sha256: str = ""
    hardware: Hardware = Hardware()
    versions: dict[str, str] = Field(default_factory=dict)
    started_at: datetime = Field(default_factory=utc_now)
    finished_at: datetime = Field(default_factory=utc_now)

    @classmethod
    def failed(cls, job: Job, worker: str, error: str, **extra) -> "Result":
        return cls(
            job_id=job.job_id, sweep_id=job.sweep_id, status="failed", error=error, worker=worker,
            model=job.model, quant=job.quant, technique=job.technique, backend=job.engine,
            test=job.test, n_prompt=job.n_prompt, n_gen=job.n_gen, n_depth=job.n_depth,
            config=job.config, **extra,
        )

    def inconsistencies(self, job: Job | None = None) -> list[str]:
        """Why this Result cannot be what it claims; empty when it is self-consistent.

        A worker is untrusted, so the collector recomputes what can be recomputed.
        """
        problems: list[str] = []
        if job is not None:
            for field in ("job_id", "sweep_id", "model", "quant", "technique", "test",
                          "n_prompt", "n_gen", "n_depth"):
                want = job.test if field == "test" else getattr(job, field)
                if getattr(self, field) != want:
                    problems.append(f"{field} is {getattr(self, field)!r}, the job asked for {want!r}")
            if self.backend != job.engine:
                problems.append(f"backend is {self.backend!r}, the job asked for {job.engine!r}")
            if job.model_sha256 and self.source_sha256 and self.source_sha256 != job.model_sha256:
                problems.append("source_sha256 differs from the job's model_sha256")
        if self.status == "failed":
            if not self.error:
                problems.append("a failed result must say why")
            return problems
        if job is not None and self.repetitions != job.repetitions:
            problems.append(f"repetitions is {self.repetitions}, the job asked for {job.repetitions}")
        if len(self.samples_ns) != self.repetitions:
            problems.append(f"{len(self.samples_ns)} samples for {self.repetitions} repetitions")
        if any(ns <= 0 for ns in self.samples_ns):
            problems.append("a sample is not a positive duration")
        if problems or not self.samples_ns:
            return problems or ["no samples"]
        n_tokens = self.n_prompt if self.test.startswith("pp") else self.n_gen
        mean, std = summarize(n_tokens, self.samples_ns)
        if not math.isclose(mean, self.avg_ts, rel_tol=1e-6):
            problems.append(f"avg_ts {self.avg_ts:.6g} does not match the samples ({mean:.6g})")
        if not math.isclose(std, self.stddev_ts, rel_tol=1e-6, abs_tol=1e-9):
            problems.append(f"stddev_ts {self.stddev_ts:.6g} does not match the samples ({std:.6g})")
        if not self.model_sha256:
            problems.append("model_sha256 is missing")
        return problems


class Envelope(BaseModel):
    """A message on the results queue: a job started, or its Result."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["started", "result"]
    job_id: str
    worker: str
    result: Result | None = None
