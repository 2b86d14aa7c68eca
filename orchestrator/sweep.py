"""Sweep specs: a YAML file of lists, expanded into Jobs of scalars.

Owns the spec's schema and bounds (load_spec reads the YAML file, nothing else) and the pure
expansion: spec and model identities in, jobs out, no file access. Jobs come out model-major
(model, then quant, then engine settings), so a worker loads each model once and derived
quantizations are made once per sweep. Resolving models (headers, sha256, vocabularies) and
estimating each job's memory are orchestrator/planning.py's.
"""

from __future__ import annotations

import itertools
import math
import uuid
from pathlib import Path
from typing import Literal, NamedTuple

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from farm.contract import (
    MODEL_LEVEL_FIELDS,
    NGRAM_CACHE_MAX,
    PROMPT_CATEGORIES,
    QUANTS,
    Engine,
    EngineConfig,
    Job,
    LookupMode,
    ModelFacts,
    ModelSource,
    Technique,
)
from farm.modelfiles import ModelError
from farm.sources import parse_ref


class ModelIdentity(NamedTuple):
    """A sweep entry as jobs carry it: the reference, the expected sha256, the file's own quant."""

    ref: str
    sha256: str | None
    native_quant: str
    source: ModelSource | None = None  # hf:// and ollama:// models: the files the worker fetches
    facts: ModelFacts | None = None  # a remote model's header facts, for the memory estimate


# EngineConfig's fields in the order the product nests them: model-level parameters outermost, so
# jobs that share a loaded model are consecutive and a worker loads it once (llama-bench's order).
ENGINE_FIELDS: tuple[str, ...] = MODEL_LEVEL_FIELDS + tuple(
    f for f in EngineConfig.model_fields if f not in MODEL_LEVEL_FIELDS)


# llama.cpp's LLAMA_MAX_DEVICES in its CUDA builds (llama_max_devices()); EngineConfig's bound.
MAX_DEVICES = 16


def parse_tensor_split(value: str | list[float] | tuple[float, ...]) -> tuple[float, ...]:
    """llama-bench's -ts spelling "3/1" (or "3,1"), or a list of shares, as a tuple of floats."""
    if isinstance(value, str):
        parts = [p for p in value.replace(",", "/").split("/") if p.strip()]
        try:
            value = [float(p) for p in parts]
        except ValueError:
            raise ValueError(f"tensor_split {value!r} is not numbers joined by '/'; write e.g. \"3/1\"") from None
    if any(not x >= 0 for x in value) or (value and not any(value)):
        raise ValueError(f"tensor_split {list(value)} needs shares >= 0, at least one above 0; e.g. [3, 1]")
    if len(value) > MAX_DEVICES:
        raise ValueError(f"tensor_split has {len(value)} shares but llama.cpp splits over at most {MAX_DEVICES} "
                         "devices; give one share per GPU")
    return tuple(float(x) for x in value)


def engine_configs(spec: SweepSpec) -> list[EngineConfig]:
    """The product of the spec's engine lists, model-level parameters varying slowest."""
    return [EngineConfig(**dict(zip(ENGINE_FIELDS, values)))
            for values in itertools.product(*(getattr(spec, f) for f in ENGINE_FIELDS))]


class SweepError(Exception):
    """A sweep cannot run; the message is one line naming the problem and the fix."""


# Bounds checked before the work they protect: the file's size before YAML parses it, the job
# count from the list lengths before the product is materialised.
MAX_SWEEP_FILE_BYTES = 1 << 20
MAX_JOBS = 10_000
MAX_NAME_CHARS = 200
MAX_MODEL_REF_CHARS = 1000


def _check_text(value: str, what: str, max_chars: int) -> str:
    """PostgreSQL refuses NUL in text, and control characters make names unreadable in tables."""
    bad = next((c for c in value if ord(c) < 32 or ord(c) == 127), None)
    if bad is not None:
        raise ValueError(f"{what} {value[:40]!r} holds the control character {bad!r}; use printable characters")
    if len(value) > max_chars:
        raise ValueError(f"{what} is {len(value)} characters long; at most {max_chars}")
    return value


def _check_quants(values: list[str]) -> list[str]:
    for q in values:
        if q not in QUANTS:
            raise ValueError(f"unknown quant {q!r}; known: {', '.join(QUANTS)}")
    return values


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="catalogue name, path to a .gguf file, hf://OWNER/REPO/FILE.gguf[@REV], "
                                  "hf://OWNER/REPO:QUANT[@REV] or ollama://NAME:TAG")
    quants: list[str] | None = Field(default=None, description="default: the sweep's quants, else the file's own type")

    @field_validator("quants")
    @classmethod
    def _known_quants(cls, v: list[str] | None) -> list[str] | None:
        return v if v is None else _check_quants(v)

    @field_validator("name")
    @classmethod
    def _printable_name(cls, v: str) -> str:
        _check_text(v, "model name", MAX_MODEL_REF_CHARS)
        try:
            parse_ref(v)  # the grammar of hf:// and ollama:// is checked with the spec
        except ModelError as exc:
            raise ValueError(str(exc)) from exc
        return v


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
    # [n_prompt, n_gen] pairs: prefill then decode in one run, llama-bench's `pp512+tg128`.
    n_pg: list[tuple[int, int]] = Field(default_factory=list)
    repetitions: int = Field(default=5, ge=1, le=1000)
    n_warmup: int = Field(default=1, ge=0, le=100)
    prompt_source: Literal["text", "random"] = "text"
    seed: int = 42
    # llama-bench's parameters, one list each with llama-bench's names (farm.contract.EngineConfig's);
    # the sweep is their product. Defaults are EngineConfig's; each value is checked by it.
    n_threads: list[int] = Field(default_factory=lambda: [0], min_length=1)
    n_batch: list[int] = Field(default_factory=lambda: [2048], min_length=1)
    n_ubatch: list[int] = Field(default_factory=lambda: [512], min_length=1)
    n_gpu_layers: list[int] = Field(default_factory=lambda: [0], min_length=1)
    flash_attn: list[Literal["on", "off", "auto"] | bool | int] = Field(default_factory=lambda: ["off"], min_length=1)
    type_k: list[str] = Field(default_factory=lambda: ["f16"], min_length=1)
    type_v: list[str] = Field(default_factory=lambda: ["f16"], min_length=1)
    n_cpu_moe: list[int] = Field(default_factory=lambda: [0], min_length=1)
    override_tensors: list[str] = Field(default_factory=lambda: [""], min_length=1)
    split_mode: list[str] = Field(default_factory=lambda: ["layer"], min_length=1)
    main_gpu: list[int] = Field(default_factory=lambda: [0], min_length=1)
    # Each value is one split: llama-bench's "3/1" or a list [3, 1]; "" or []: even.
    tensor_split: list[str | list[float] | tuple[float, ...]] = Field(default_factory=lambda: [()], min_length=1)
    no_kv_offload: list[bool] = Field(default_factory=lambda: [False], min_length=1)
    use_mmap: list[bool] = Field(default_factory=lambda: [True], min_length=1)
    cpu_mask: list[str] = Field(default_factory=lambda: ["0x0"], min_length=1)
    cpu_strict: list[bool] = Field(default_factory=lambda: [False], min_length=1)
    poll: list[int] = Field(default_factory=lambda: [50], min_length=1)
    prio: list[int] = Field(default_factory=lambda: [0], min_length=1)
    # The torch engine's precision; llama.cpp's jobs take only float32's (their precision is the quant).
    torch_dtype: list[Literal["float32", "bfloat16", "float16"]] = Field(default_factory=lambda: ["float32"], min_length=1)
    # Decode techniques (spec, lookup) run as tg tests over the prompts of each category.
    prompt_categories: list[str] | None = None
    n_prompts: int = Field(default=0, ge=0, description="prompts per category; 0: all")
    draft_models: list[str | ModelEntry] = Field(default_factory=list, description="spec: drafts, with quants")
    n_draft: list[int] = Field(default_factory=lambda: [4], min_length=1)
    p_min: list[float] = Field(default_factory=lambda: [0.0], min_length=1)
    ngram_max: list[int] = Field(default_factory=lambda: [3], min_length=1)
    # lookup: the drafters (issue 15); longest and llama.cpp's ngram-simple/-map-k/-map-k4v key on
    # ngram_max tokens, ngram-cache on its fixed 1- to 4-grams, so ngram_max does not multiply its jobs.
    lookup_mode: list[LookupMode] = Field(default_factory=lambda: ["longest"], min_length=1)
    # ngram-cache: llama.cpp's optional cache files (`--lookup-cache-static`, built from a corpus;
    # `--lookup-cache-dynamic`, from earlier generations); "" runs without one, as native does by
    # default. Paths are relative to the sweep file, checked at submit, and read by the worker at
    # the same path. Each list multiplies only the ngram-cache jobs.
    lookup_cache_static: list[str] = Field(default_factory=lambda: [""], min_length=1)
    lookup_cache_dynamic: list[str] = Field(default_factory=lambda: [""], min_length=1)

    @field_validator("name")
    @classmethod
    def _printable_sweep_name(cls, v: str) -> str:
        return _check_text(v, "sweep name", MAX_NAME_CHARS)

    @field_validator("models", "draft_models")
    @classmethod
    def _printable_models(cls, v: list) -> list:
        for m in v:
            if isinstance(m, str):
                ModelEntry._printable_name(m)
        return v

    @field_validator("prompt_categories")
    @classmethod
    def _known_categories(cls, v: list[str] | None) -> list[str] | None:
        for c in v or []:
            if c not in PROMPT_CATEGORIES:
                raise ValueError(f"unknown prompt category {c!r}; known: {', '.join(PROMPT_CATEGORIES)}")
        return v

    @field_validator("lookup_mode", "lookup_cache_static", "lookup_cache_dynamic")
    @classmethod
    def _once_each(cls, v: list[str], info) -> list[str]:
        for x in v:
            _check_text(x, info.field_name, MAX_MODEL_REF_CHARS)
        # A value listed twice would run the same jobs twice.
        return list(dict.fromkeys(v))

    @model_validator(mode="after")
    def _caches_need_ngram_cache(self) -> "SweepSpec":
        if "ngram-cache" not in self.lookup_mode:
            for name in ("lookup_cache_static", "lookup_cache_dynamic"):
                if any(getattr(self, name)):
                    raise ValueError(f"{name} is read by lookup_mode ngram-cache only; add ngram-cache to lookup_mode "
                                     f"(now {', '.join(self.lookup_mode)}) or drop {name}")
        return self

    @field_validator("n_draft", "ngram_max")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if any(x < 1 for x in v):
            raise ValueError("values must be >= 1")
        return v

    @field_validator("p_min")
    @classmethod
    def _probabilities(cls, v: list[float]) -> list[float]:
        if any(not 0.0 <= x <= 1.0 for x in v):
            raise ValueError("values must lie in [0, 1]")
        return v
    # Override the orchestrator's TOKENFARM_CANARY_FRACTION / TOKENFARM_CROSSCHECK_FRACTION.
    canary_fraction: float | None = Field(default=None, ge=0.0, le=1.0)
    crosscheck_fraction: float | None = Field(default=None, ge=0.0, le=1.0)
    # mtp: the torch engine's trained heads (`tokenfarm models train-mtp`), or on llamacpp the
    # file's own NextN layers (planning refuses a file without them); each list multiplies
    # only the jobs of the technique that reads it.
    n_mtp: list[int] = Field(default_factory=lambda: [2], min_length=1)
    # Above 0: sampled speculation (torch engine), accept-with-probability instead of greedy.
    temperature: list[float] = Field(default_factory=lambda: [0.0], min_length=1)
    # Quality pass (issue 14): KLD, top-1 agreement and perplexity against the model's reference
    # over worker/data's text, on one baseline text job per model x quant x engine x config.
    quality: bool = False
    quality_n_ctx: int = Field(default=512, ge=16, le=8192)
    quality_n_chunks: int = Field(default=0, ge=0, le=1024, description="chunks of the text scored; 0: all")

    @field_validator("quants")
    @classmethod
    def _known_quants(cls, v: list[str] | None) -> list[str] | None:
        return v if v is None else _check_quants(v)

    @field_validator("n_prompt", "n_gen", "n_depth")
    @classmethod
    def _non_negative(cls, v: list[int]) -> list[int]:
        if any(x < 0 for x in v):
            raise ValueError("values must be >= 0")
        return v

    @field_validator("tensor_split", mode="after")
    @classmethod
    def _splits(cls, v: list) -> list[tuple[float, ...]]:
        return [parse_tensor_split(x) for x in v]

    @field_validator(*ENGINE_FIELDS, mode="after")
    @classmethod
    def _engine_values(cls, v: list, info) -> list:
        """Each value as EngineConfig takes it, so a bad one is refused with the sweep, not the job."""
        out = []
        for x in v:
            try:
                out.append(getattr(EngineConfig(**{info.field_name: x}), info.field_name))
            except ValidationError as exc:
                err = exc.errors()[0]
                raise ValueError(f"{x!r}: {err['msg'].removeprefix('Value error, ')}") from None
        # A value listed twice would run the same jobs twice.
        return list(dict.fromkeys(out))

    @field_validator("n_pg")
    @classmethod
    def _positive_pairs(cls, v: list[tuple[int, int]]) -> list[tuple[int, int]]:
        if any(p < 1 or g < 1 for p, g in v):
            raise ValueError("each n_pg pair is [n_prompt, n_gen], both >= 1")
        return v

    def entries(self) -> list[ModelEntry]:
        return _unique_entries(self.models)[0]

    def draft_entries(self) -> list[ModelEntry]:
        return _unique_entries(self.draft_models)[0]

    def duplicates(self) -> list[str]:
        """One warning per model or quant listed twice; entries() keeps the first of each."""
        return _unique_entries(self.models)[1] + _unique_entries(self.draft_models)[1]


def _unique_entries(models: list[str | ModelEntry]) -> tuple[list[ModelEntry], list[str]]:
    """A model listed twice would run the same jobs twice and pool them as one: keep it once."""
    by_name: dict[str, ModelEntry] = {}
    warnings: list[str] = []
    for m in models:
        entry = m if isinstance(m, ModelEntry) else ModelEntry(name=m)
        quants = list(dict.fromkeys(entry.quants)) if entry.quants else entry.quants
        if entry.quants and len(quants) < len(entry.quants):
            warnings.append(f"model {entry.name!r} lists a quant twice; each runs once")
        if entry.name in by_name:
            warnings.append(f"model {entry.name!r} is listed twice; its jobs run once")
            kept = by_name[entry.name]
            if kept.quants is not None and quants is not None:
                kept.quants = list(dict.fromkeys(kept.quants + quants))
            continue
        by_name[entry.name] = entry.model_copy(update={"quants": quants})
    return list(by_name.values()), warnings


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


def load_spec(path: Path, max_file_bytes: int = MAX_SWEEP_FILE_BYTES) -> SweepSpec:
    path = Path(path)
    try:
        n_bytes = path.stat().st_size
        if n_bytes > max_file_bytes:
            raise SweepError(f"{str(path)[:200]}: the sweep file is {n_bytes} bytes, above the limit of "
                             f"{max_file_bytes}; split it into several sweeps")
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SweepError(f"{str(path)[:200]}: cannot read the sweep file ({exc.strerror})") from exc
    except UnicodeDecodeError as exc:
        raise SweepError(f"{str(path)[:200]}: the sweep file is not UTF-8 text ({exc.reason})") from exc
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


def technique_options(spec: SweepSpec, technique: str,
                      drafts: list[tuple[str, str | None, str, ModelSource | None]]) -> list[dict]:
    """The Job fields each technique varies over: spec by draft x n_draft x p_min, mtp by n_mtp x p_min,
    lookup by lookup_mode x ngram_max (ngram-cache: x its cache files instead) x n_draft."""
    if technique == "spec":
        return [dict(draft_model=ref, draft_sha256=sha, draft_source=source, draft_quant=quant, n_draft=n, p_min=p,
                     temperature=t)
                for ref, sha, quant, source in drafts for n in spec.n_draft for p in spec.p_min for t in spec.temperature]
    if technique == "lookup":
        return [dict(**keys, n_draft=n, temperature=t, lookup_mode=mode)
                for mode in spec.lookup_mode for keys in lookup_keys(spec, mode)
                for n in spec.n_draft for t in spec.temperature]
    if technique == "mtp":
        return [dict(n_mtp=n, p_min=p, temperature=t) for n in spec.n_mtp for p in spec.p_min for t in spec.temperature]
    return [{}]


def lookup_keys(spec: SweepSpec, mode: str) -> list[dict]:
    """What a lookup mode's jobs vary over besides n_draft: the n-gram length, or for ngram-cache
    (whose n-grams are llama.cpp's fixed 1 to 4 tokens) its cache files."""
    if mode == "ngram-cache":
        return [dict(ngram_max=NGRAM_CACHE_MAX, lookup_cache_static=st, lookup_cache_dynamic=dy)
                for st in spec.lookup_cache_static for dy in spec.lookup_cache_dynamic]
    return [dict(ngram_max=g) for g in spec.ngram_max]


# Types a reference can be in: a model whose own file is one of them is its own reference.
REFERENCE_QUANTS = ("F32", "F16", "BF16")


def reference_quant(native_quant: str) -> str:
    """The quant a model's quality is measured against: its own file where that is full
    precision (an MoE upcycle is written F32, so it is its own reference), else F32 derived by
    llama.cpp from the quantized file, which is a dequantized upcast: it carries what the
    publisher's quantization lost, so the KLD ladder measures loss beyond that file's."""
    return native_quant if native_quant in REFERENCE_QUANTS else "F32"


def count_jobs(spec: SweepSpec) -> int:
    """An upper bound on the jobs expand() makes, from the list lengths alone (nothing materialised)."""
    n_configs = math.prod(len(getattr(spec, f)) for f in ENGINE_FIELDS)
    n_pp = sum(1 for n in spec.n_prompt if n > 0) + len(spec.n_pg)
    n_tg = sum(1 for n in spec.n_gen if n > 0) * len(spec.prompt_categories or [None])
    n_draft_quants = sum(len(e.quants or spec.quants or [None]) for e in spec.draft_entries())
    per_technique = {
        "baseline": n_pp + n_tg,
        "spec": n_tg * n_draft_quants * len(spec.n_draft) * len(spec.p_min) * len(spec.temperature),
        "lookup": n_tg * sum(len(lookup_keys(spec, m)) for m in spec.lookup_mode) * len(spec.n_draft)
        * len(spec.temperature),
        "mtp": n_tg * len(spec.n_mtp) * len(spec.p_min) * len(spec.temperature),
    }
    n_per_quant = n_configs * len(spec.n_depth) * len(spec.engines) * sum(per_technique[t] for t in spec.techniques)
    return n_per_quant * sum(len(e.quants or spec.quants or [None]) for e in spec.entries())


def check_job_bound(spec: SweepSpec, max_jobs: int = MAX_JOBS) -> None:
    """Refuse a sweep whose job count, from its list lengths alone, is above max_jobs."""
    n_bound = count_jobs(spec)
    if n_bound > max_jobs:
        raise SweepError(f"the sweep would make up to {n_bound} jobs, above the limit of {max_jobs}; shorten its "
                         "lists or raise the limit with --max-jobs")


def expand(spec: SweepSpec, identities: dict[str, ModelIdentity], sweep_id: str | None = None,
           max_jobs: int = MAX_JOBS) -> list[Job]:
    """The sweep's jobs in model-major order, from the spec and each model's identity (resolved
    beforehand by orchestrator/planning.py, which reads the files); touches no file."""
    sweep_id = sweep_id or str(uuid.uuid4())
    check_job_bound(spec, max_jobs)
    jobs: list[Job] = []
    quantized_v = [t for t in spec.type_v if t not in ("f32", "f16", "bf16")]
    if quantized_v and "off" in spec.flash_attn and "llamacpp" in spec.engines:
        raise SweepError(f"type_v {quantized_v[0]} needs flash attention (llama.cpp refuses a quantized V cache "
                         "without it); use flash_attn: [on] or [auto] with it")
    configs = engine_configs(spec)
    tests = [("pp", n, 0) for n in spec.n_prompt if n > 0] + [("tg", 0, n) for n in spec.n_gen if n > 0]
    tests += [("pg", p, g) for p, g in spec.n_pg]
    if not tests:
        raise SweepError("the sweep has no tests: give n_prompt, n_gen or n_pg values above 0")
    decode_techniques = [t for t in spec.techniques if t != "baseline"]
    if decode_techniques and not (spec.prompt_categories and any(kind == "tg" for kind, _, _ in tests)):
        raise SweepError(f"technique {decode_techniques[0]!r} decodes over prompts: give prompt_categories and n_gen")
    if "spec" in spec.techniques and not spec.draft_models:
        raise SweepError("technique 'spec' needs draft_models: e.g. [{name: smollm2-135m, quants: [Q4_0]}]")
    drafts = []
    for entry in spec.draft_entries():
        d = identities[entry.name]
        drafts += [(d.ref, d.sha256, q, d.source) for q in entry.quants or [d.native_quant]]
    categories = spec.prompt_categories or [None]
    # One quality pass per model x quant x engine x config, carried by its first baseline text
    # job: a technique job decodes prompts (its losslessness is checked instead), and a second
    # pass of the same file would only repeat the first.
    quality_owners: set[tuple] = set()
    for entry in spec.entries():
        ident = identities[entry.name]
        ref, sha = ident.ref, ident.sha256
        quants = entry.quants or spec.quants or [ident.native_quant]
        for quant, engine, config, technique in itertools.product(quants, spec.engines, configs, spec.techniques):
            if engine != "torch" and config.torch_dtype != "float32":
                continue  # one llama.cpp job per setting, not one per torch precision
            if engine == "torch" and config.llamacpp_only():
                continue  # KV types, expert offload, threadpool...: llama.cpp's levers; torch runs the defaults
            for options in technique_options(spec, technique, drafts):
                for (kind, n_prompt, n_gen), n_depth in itertools.product(tests, spec.n_depth):
                    if technique != "baseline" and kind != "tg":
                        continue  # a drafter has nothing to do in a prefill test
                    for category in categories if kind == "tg" else [None]:
                        quality: dict = {}
                        owner = (entry.name, quant, engine, config)
                        if spec.quality and technique == "baseline" and category is None and owner not in quality_owners:
                            quality_owners.add(owner)
                            quality = dict(quality=True, quality_n_ctx=spec.quality_n_ctx,
                                           quality_n_chunks=spec.quality_n_chunks,
                                           quality_reference_quant=reference_quant(ident.native_quant))
                        jobs.append(Job(
                            job_id=str(uuid.uuid4()), sweep_id=sweep_id, index=len(jobs), model=ref,
                            model_sha256=sha, model_source=ident.source, quant=quant, technique=technique, engine=engine, kind=kind,
                            n_prompt=n_prompt, n_gen=n_gen, n_depth=n_depth, repetitions=spec.repetitions,
                            n_warmup=spec.n_warmup, prompt_source=spec.prompt_source, seed=spec.seed, config=config,
                            prompt_category=category, n_prompts=spec.n_prompts if category else 0, **options,
                            **quality,
                        ))
    return jobs


