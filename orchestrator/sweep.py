"""Sweep specs: a YAML file of lists, expanded into Jobs of scalars.

Pure: reads the file and GGUF headers, touches neither the broker nor the database. Jobs come
out model-major (model, then quant, then engine settings), so a worker loads each model once
and derived quantizations are made once per sweep.
"""

from __future__ import annotations

import itertools
import uuid
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from worker.contract import QUANTS, EngineConfig, Engine, Job, Technique
from worker.models import CATALOGUE, ModelError, check_gguf, read_facts, sha256_file


class SweepError(Exception):
    """A sweep cannot run; the message is one line naming the problem and the fix."""


def _check_quants(values: list[str]) -> list[str]:
    for q in values:
        if q not in QUANTS:
            raise ValueError(f"unknown quant {q!r}; known: {', '.join(QUANTS)}")
    return values


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="catalogue name or path to a .gguf file")
    quants: list[str] | None = Field(default=None, description="default: the sweep's quants, else the file's own type")

    @field_validator("quants")
    @classmethod
    def _known_quants(cls, v: list[str] | None) -> list[str] | None:
        return v if v is None else _check_quants(v)


class SweepSpec(BaseModel):
    """Every parameter is a list; the sweep is their product (as llama-bench's command line)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    models: list[str | ModelEntry] = Field(min_length=1)
    quants: list[str] | None = None
    techniques: list[Technique] = Field(default_factory=lambda: ["baseline"], min_length=1)
    engines: list[Engine] = Field(default_factory=lambda: ["llamacpp"], min_length=1)
    n_prompt: list[int] = Field(default_factory=lambda: [512])
    n_gen: list[int] = Field(default_factory=lambda: [128])
    n_depth: list[int] = Field(default_factory=lambda: [0], min_length=1)
    repetitions: int = Field(default=5, ge=1, le=1000)
    n_warmup: int = Field(default=1, ge=0, le=100)
    prompt_source: Literal["text", "random"] = "text"
    seed: int = 42
    n_threads: list[int] = Field(default_factory=lambda: [0], min_length=1)
    n_batch: list[int] = Field(default_factory=lambda: [2048], min_length=1)
    n_ubatch: list[int] = Field(default_factory=lambda: [512], min_length=1)
    n_gpu_layers: list[int] = Field(default_factory=lambda: [0], min_length=1)
    flash_attn: list[bool] = Field(default_factory=lambda: [False], min_length=1)
    # Technique options: each list multiplies only the jobs of the technique that reads it.
    n_mtp: list[int] = Field(default_factory=lambda: [2], min_length=1)
    draft_models: list[str] = Field(default_factory=list)
    draft_quant: str | None = None
    n_draft: list[int] = Field(default_factory=lambda: [4], min_length=1)
    p_min: list[float] = Field(default_factory=lambda: [0.0], min_length=1)
    ngram_max: list[int] = Field(default_factory=lambda: [3], min_length=1)
    temperature: list[float] = Field(default_factory=lambda: [0.0], min_length=1)

    @field_validator("quants")
    @classmethod
    def _known_quants(cls, v: list[str] | None) -> list[str] | None:
        return v if v is None else _check_quants(v)

    @field_validator("n_prompt", "n_gen", "n_depth", "n_threads", "n_batch", "n_ubatch")
    @classmethod
    def _non_negative(cls, v: list[int]) -> list[int]:
        if any(x < 0 for x in v):
            raise ValueError("values must be >= 0")
        return v

    def entries(self) -> list[ModelEntry]:
        return [m if isinstance(m, ModelEntry) else ModelEntry(name=m) for m in self.models]


def _format_validation(exc: ValidationError) -> str:
    errors = exc.errors()
    # A model entry is a string or a mapping: the mapping branch's complaint is the useful one.
    err = next((e for e in errors if e["type"] != "string_type"), errors[0])
    where = ".".join(str(p) for p in err["loc"] if not str(p).startswith(("str", "ModelEntry")))
    if err["type"] == "extra_forbidden":
        fields = ", ".join(SweepSpec.model_fields)
        return f"unknown field {where!r}; allowed fields: {fields}"
    if err["type"] == "missing":
        return f"missing required field {where!r}"
    msg = err["msg"].removeprefix("Value error, ")
    return f"field {where!r}: {msg}" if where else msg


def load_spec(path: Path) -> SweepSpec:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SweepError(f"{path}: cannot read the sweep file ({exc.strerror})") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise SweepError(f"{path}: {where}YAML syntax error: {problem}") from exc
    if not isinstance(data, dict):
        raise SweepError(f"{path}: a sweep is a YAML mapping with at least 'name' and 'models'")
    try:
        return SweepSpec.model_validate(data)
    except ValidationError as exc:
        raise SweepError(f"{path}: {_format_validation(exc)}") from exc


def _model_identity(ref: str, base_dir: Path) -> tuple[str, str | None, str]:
    """(model reference as jobs carry it, expected sha256, native quant) for a sweep entry."""
    if ref in CATALOGUE:
        entry = CATALOGUE[ref]
        return ref, entry.sha256, entry.quant
    path = Path(ref).expanduser()
    if not path.is_absolute():
        path = (base_dir / path).resolve()
    if not path.exists():
        known = ", ".join(sorted(CATALOGUE))
        raise SweepError(f"model {ref!r}: no such file ({path}); give a path to a .gguf file or one of: {known}")
    try:
        facts = read_facts(path)
        check_gguf(path)
    except ModelError as exc:
        raise SweepError(f"model {ref!r}: {exc}") from exc
    return str(path), sha256_file(path), facts.file_type


def _technique_options(spec: SweepSpec, technique: str, base_dir: Path) -> list[dict]:
    """The Job fields each job of a technique gets: the product of the lists it reads."""
    if technique == "baseline":
        return [{}]
    temps = spec.temperature
    if technique == "mtp":
        return [{"n_mtp": n, "temperature": t} for n in spec.n_mtp for t in temps]
    if technique == "lookup":
        return [{"ngram_max": g, "n_draft": d, "temperature": t}
                for g in spec.ngram_max for d in spec.n_draft for t in temps]
    if not spec.draft_models:
        raise SweepError("technique 'spec' needs draft_models: a list of catalogue names or GGUF paths")
    drafts = []
    for ref in spec.draft_models:
        if ref not in CATALOGUE:
            path = Path(ref).expanduser()
            path = path if path.is_absolute() else (base_dir / path).resolve()
            if not path.exists():
                raise SweepError(f"draft model {ref!r}: no such file ({path}); give a GGUF path or a catalogue name")
            ref = str(path)
        drafts.append(ref)
    return [{"draft_model": m, "draft_quant": spec.draft_quant, "n_draft": d, "p_min": p, "temperature": t}
            for m in drafts for d in spec.n_draft for p in spec.p_min for t in temps]


def expand(spec: SweepSpec, sweep_id: str | None = None, base_dir: Path = Path(".")) -> list[Job]:
    sweep_id = sweep_id or str(uuid.uuid4())
    jobs: list[Job] = []
    configs = [
        EngineConfig(n_threads=t, n_batch=b, n_ubatch=u, n_gpu_layers=g, flash_attn=fa)
        for t, b, u, g, fa in itertools.product(spec.n_threads, spec.n_batch, spec.n_ubatch,
                                                 spec.n_gpu_layers, spec.flash_attn)
    ]
    tests = [("pp", n, 0) for n in spec.n_prompt if n > 0] + [("tg", 0, n) for n in spec.n_gen if n > 0]
    if not tests:
        raise SweepError("the sweep has no tests: give n_prompt or n_gen values above 0")
    for entry in spec.entries():
        ref, sha, native = _model_identity(entry.name, base_dir)
        quants = entry.quants or spec.quants or [native]
        for quant, engine, config, technique in itertools.product(quants, spec.engines, configs, spec.techniques):
            if technique == "mtp" and engine != "torch":
                continue  # MTP heads run only in the torch engine; llama.cpp's jobs skip it
            for options in _technique_options(spec, technique, base_dir):
                for (kind, n_prompt, n_gen), n_depth in itertools.product(tests, spec.n_depth):
                    if technique != "baseline" and kind != "tg":
                        continue  # techniques speed up decoding; their prefill is the baseline's
                    jobs.append(Job(
                        job_id=str(uuid.uuid4()), sweep_id=sweep_id, index=len(jobs), model=ref,
                        model_sha256=sha, quant=quant, technique=technique, engine=engine, kind=kind,
                        n_prompt=n_prompt, n_gen=n_gen, n_depth=n_depth, repetitions=spec.repetitions,
                        n_warmup=spec.n_warmup, prompt_source=spec.prompt_source, seed=spec.seed, config=config,
                        **options,
                    ))
    return jobs
