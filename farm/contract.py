"""Job and Result: the one schema that crosses the wire between orchestrator and workers.

Both sides import this module, so it stays light (pydantic only). Every output format, the
database's key columns and the collector's checks are derived from these fields. It holds the
models and the invariants a single message can check on itself; the statistics (farm/stats.py),
output hashes (farm/identity.py) and the collector's checks against a Job
(orchestrator/validation.py) live beside it. It knows nothing of Celery, SQL or any engine.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SCHEMA_VERSION = 1

# Bounds on what crosses the wire from an untrusted worker, so a message cannot grow a row or the
# collector's memory without limit: a name or reference, an error text, a list of samples or
# per-prompt figures, the model files a worker holds.
MAX_NAME_CHARS = 1000
MAX_ERROR_CHARS = 8000
MAX_LIST_ITEMS = 4096
MAX_MODELS_HELD = 4096
SHA256_CHARS = 64

Name = Annotated[str, Field(max_length=MAX_NAME_CHARS)]
Sha256 = Annotated[str, Field(max_length=SHA256_CHARS)]

# Quantizations llama.cpp's quantizer can derive without an importance matrix; names follow
# llama.cpp's `--type` spelling so sweeps read like llama-quantize command lines.
QUANTS: tuple[str, ...] = (
    "F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_1", "Q5_0",
    "Q4_K_M", "Q4_K_S", "Q4_1", "Q4_0", "IQ4_NL", "IQ4_XS", "Q3_K_L", "Q3_K_M", "Q3_K_S", "Q2_K",
)

Technique = Literal["baseline", "spec", "lookup", "mtp"]
# Prompt sets under farm/data/prompts/, chosen to stress speculation differently.
PROMPT_CATEGORIES: tuple[str, ...] = ("code", "summarisation", "qa", "rewriting", "math", "chat")
Engine = Literal["llamacpp", "torch"]
# lookup's drafters (issue 15): the project's longest match, or llama.cpp's `--spec-type` n-gram ones.
LookupMode = Literal["longest", "ngram-simple", "ngram-map-k", "ngram-map-k4v", "ngram-cache"]
# ngram-cache keys on llama.cpp's fixed 1- to 4-grams (LLAMA_NGRAM_MIN/MAX), which its jobs record as ngram_max.
NGRAM_CACHE_MAX = 4
# pg: prefill n_prompt then decode n_gen in one timed run (llama-bench's `pp512+tg128`).
TestKind = Literal["pp", "tg", "pg"]
Status = Literal["ok", "failed"]


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def format_test_name(kind: str, n_prompt: int, n_gen: int, n_depth: int) -> str:
    """llama-bench's test names (`pp512`, `tg128`, `tg128 @ d4096`), so numbers compare."""
    name = {"pp": f"pp{n_prompt}", "tg": f"tg{n_gen}", "pg": f"pp{n_prompt}+tg{n_gen}"}[kind]
    return f"{name} @ d{n_depth}" if n_depth else name


def kind_of_test(test: str) -> str:
    """The kind back from a test name: `pp512+tg128` is pg, `pp512` pp, `tg128 @ d4096` tg."""
    return "pg" if "+" in test else test[:2]


def tokens_per_run(kind: str, n_prompt: int, n_gen: int) -> int:
    """Tokens one repetition processes, as llama-bench counts them for t/s."""
    return {"pp": n_prompt, "tg": n_gen, "pg": n_prompt + n_gen}[kind]


# KV-cache element types llama.cpp's context accepts (`-ctk`/`-ctv`), in ggml's spelling.
KV_TYPES: tuple[str, ...] = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")
SPLIT_MODES: tuple[str, ...] = ("none", "layer", "row", "tensor")
# Parameters that change what a loaded model is (a new one must be loaded); the rest of
# EngineConfig only needs a new context, as llama-bench reloads.
MODEL_LEVEL_FIELDS: tuple[str, ...] = ("n_gpu_layers", "split_mode", "main_gpu", "tensor_split", "use_mmap",
                                       "n_cpu_moe", "override_tensors")


def parse_override_tensors(value: str) -> list[tuple[str, str]]:
    """llama.cpp's -ot syntax 'regex=BUFFER[,regex=BUFFER...]' as (regex, buffer type) pairs."""
    import re

    pairs = []
    for item in (s for s in value.split(",") if s.strip()):
        pattern, sep, buft = item.rpartition("=")
        if not sep or not pattern or not buft:
            raise ValueError(f"override_tensors item {item!r} is not 'regex=BUFFER'; write e.g. 'exps=CPU'")
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"override_tensors pattern {pattern!r} is not a regular expression ({exc}); "
                             "fix the pattern") from None
        pairs.append((pattern, buft))
    return pairs


# Parameters only llama.cpp has: the torch engine refuses a job that sets one (issue 17).
LLAMACPP_ONLY_FIELDS: tuple[str, ...] = ("type_k", "type_v", "n_cpu_moe", "override_tensors", "split_mode",
                                         "main_gpu", "tensor_split", "no_kv_offload", "use_mmap", "cpu_mask",
                                         "cpu_strict", "poll", "prio")


class EngineConfig(BaseModel):
    """llama-bench's parameters that change speed or memory, with llama-bench's names and spellings,
    so a llama-bench command line translates field for field."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    n_threads: int = Field(default=0, ge=0, description="0: all physical cores")
    n_batch: int = Field(default=2048, ge=1)
    n_ubatch: int = Field(default=512, ge=1)
    n_gpu_layers: int = Field(default=0, ge=-1, description="-1: every layer")
    flash_attn: Literal["on", "off", "auto"] = "off"
    type_k: str = Field(default="f16", description="KV cache K type (-ctk)")
    type_v: str = Field(default="f16", description="KV cache V type (-ctv)")
    n_cpu_moe: int = Field(default=0, ge=0, description="MoE expert tensors of the first N layers kept in host RAM")
    override_tensors: str = Field(default="", max_length=1000,
                                  description="-ot: 'regex=BUFFER[,regex=BUFFER...]'; empty: none")
    split_mode: Literal["none", "layer", "row", "tensor"] = "layer"
    main_gpu: int = Field(default=0, ge=0)
    tensor_split: tuple[float, ...] = Field(default=(), max_length=16, description="share per device; empty: even")
    no_kv_offload: bool = False
    use_mmap: bool = True
    cpu_mask: str = Field(default="0x0", max_length=130, description="hex CPU affinity mask; 0x0: no pinning")
    cpu_strict: bool = False
    poll: int = Field(default=50, ge=0, le=100, description="busy-wait level of the threadpool")
    prio: int = Field(default=0, ge=-1, le=3, description="thread priority: -1 low .. 3 realtime")
    # The torch engine's weights and activations (llama.cpp's are the file's quant); the device is
    # the worker's (its settings' torch_device), recorded in the Result's versions.
    torch_dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    @field_validator("flash_attn", mode="before")
    @classmethod
    def _flash_attn_words(cls, value):
        # Results stored before the on/off/auto spelling carry a bool; llama-bench's JSON an int.
        if isinstance(value, bool):
            return "on" if value else "off"
        if isinstance(value, int):
            return {1: "on", 0: "off", -1: "auto"}.get(value, value)
        return value

    @field_validator("type_k", "type_v")
    @classmethod
    def _known_kv_type(cls, value: str) -> str:
        if value.lower() not in KV_TYPES:
            raise ValueError(f"unknown KV cache type {value!r}; use one of {', '.join(KV_TYPES)}")
        return value.lower()

    def llamacpp_only(self) -> list[str]:
        """The llama.cpp-only parameters set away from their defaults (the torch engine has none of them)."""
        return [f for f in LLAMACPP_ONLY_FIELDS if getattr(self, f) != type(self).model_fields[f].default]

    @field_validator("override_tensors")
    @classmethod
    def _override_syntax(cls, value: str) -> str:
        parse_override_tensors(value)
        return value

    @field_validator("tensor_split")
    @classmethod
    def _shares(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if any(not x >= 0 for x in value) or (value and not any(value)):
            raise ValueError(f"tensor_split {list(value)} needs shares >= 0, at least one above 0; e.g. [3, 1]")
        return value

    @property
    def n_split_devices(self) -> int:
        """Devices tensor_split spreads the model over: llama.cpp gives share i to device i, so a
        zero between shares still names a device and trailing zeros name none."""
        shares = list(self.tensor_split)
        while shares and not shares[-1]:
            shares.pop()
        return len(shares)

    @property
    def n_gpus_named(self) -> int:
        """GPU devices the config names: tensor_split's, and main_gpu's (index k names k + 1
        devices). llama.cpp refuses split_mode none past its last device and reads main_gpu for
        row mode; in layer mode it ignores it, but a result recording main_gpu 2 from a one-GPU box
        would still claim a device it never had."""
        return max(self.n_split_devices, self.main_gpu + 1 if self.main_gpu else 0)

    def named_gpus_text(self) -> str:
        """How the config names its GPUs, for a refusal: 'tensor_split [3, 1]', 'main_gpu 2'."""
        parts = []
        if self.n_split_devices:
            parts.append("tensor_split [" + ", ".join(f"{x:g}" for x in self.tensor_split) + "]")
        if self.main_gpu:
            parts.append(f"main_gpu {self.main_gpu}")
        return " and ".join(parts)

    @property
    def flash_attn_on(self) -> bool:
        """Whether attention is fused for memory planning: auto counts as on (llama.cpp's choice where it can)."""
        return self.flash_attn != "off"

    def model_level(self) -> tuple:
        """The parameters a loaded model is keyed by: equal keys share one load."""
        return tuple(getattr(self, f) for f in MODEL_LEVEL_FIELDS)


class SourceFile(BaseModel):
    """One file of a model as its source advertises it: the worker's copy must match both figures."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=500)
    size_bytes: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class ModelSource(BaseModel):
    """Where a remote model comes from, resolved at submit: a hub repository pinned to a commit,
    or a blob of the local Ollama store. A split GGUF lists every part, first part first."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["hf", "ollama"]
    repo: str = Field(default="", max_length=200, description="hf: OWNER/REPO; ollama: NAME:TAG")
    revision: str = Field(default="", max_length=200, description="hf: the commit the files were read at")
    files: list[SourceFile] = Field(min_length=1, max_length=64)

    @property
    def size_bytes(self) -> int:
        return sum(f.size_bytes for f in self.files)


class Job(BaseModel):
    """One measurement: every sweep list collapsed to a scalar."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: int = SCHEMA_VERSION
    job_id: str
    sweep_id: str
    index: int = Field(ge=0)
    model: str = Field(description="catalogue name or path to a GGUF file")
    model_sha256: str | None = Field(default=None, description="expected sha256 of the source file")
    # hf:// and ollama:// models: the files to fetch and check, resolved by the orchestrator.
    model_source: ModelSource | None = None
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
    # Decode over a category's prompts instead of corpus text; the techniques need it, and
    # run the baseline in the same job on the same prompts to report a speedup.
    prompt_category: str | None = None
    n_prompts: int = Field(default=0, ge=0, description="prompts of the category; 0: all")
    draft_model: str | None = Field(default=None, description="spec: catalogue name or path to a GGUF file")
    draft_sha256: str | None = Field(default=None, description="expected sha256 of the draft's source file")
    draft_source: ModelSource | None = None
    draft_quant: str | None = None
    n_draft: int = Field(default=0, ge=0, le=64, description="most tokens drafted per target pass")
    p_min: float = Field(default=0.0, ge=0.0, le=1.0, description="spec, mtp: stop drafting below this top probability")
    ngram_max: int = Field(default=0, ge=0, le=16, description="lookup: longest n-gram matched")
    # lookup: which drafter (issue 15): today's longest match, or llama.cpp's n-gram drafters
    # (`--spec-type ngram-simple|ngram-map-k|ngram-map-k4v|ngram-cache`, worker/ngram.py) with
    # their key size, hit count and, for ngram-cache, native's optional cache files
    # (`--lookup-cache-static`: built from a corpus; `--lookup-cache-dynamic`: from earlier
    # generations), paths on the worker, read only, as llama.cpp's speculative decoding reads them.
    lookup_mode: LookupMode = "longest"
    ngram_size_n: int = Field(default=0, ge=0, le=64, description="ngram-simple, ngram-map-k*: key size; 0: ngram_max")
    ngram_min_hits: int = Field(default=1, ge=1, le=64, description="ngram-map-k4v: key hits before drafting")
    lookup_cache_static: str = Field(default="", max_length=MAX_NAME_CHARS, description="ngram-cache: corpus cache")
    lookup_cache_dynamic: str = Field(default="", max_length=MAX_NAME_CHARS, description="ngram-cache: earlier output")
    # mtp: the target's own trained multi-token-prediction heads propose (torch engine only).
    n_mtp: int = Field(default=0, ge=0, le=16, description="mtp: heads proposing per target pass")
    temperature: float = Field(default=0.0, ge=0.0, description="0: greedy; above: sampled speculation")
    # Set by the orchestrator at submit (farm/memory.py); the job's queue is its memory class.
    # 0: not estimated (a job recorded before routing), sent to the queue every worker consumes.
    need_bytes: int = Field(default=0, ge=0, description="estimated peak memory of the job")
    # The orchestrator's own header read (farm/memory.facts_for): the weight bytes one decode step
    # reads, which the collector's roofline check uses instead of the figures a worker reports.
    # 0: not known (a job recorded before this field).
    active_bytes: int = Field(default=0, ge=0)
    # The lease the orchestrator granted with this message: one attempt on one worker. Its
    # started and result messages echo both; anything else is refused. Empty on the stored spec.
    lease_id: str = Field(default="", max_length=36)
    attempt: int = Field(default=0, ge=0)
    # Quality pass (issue 14): besides the speed test, the quant's next-token distributions against
    # its reference's (the highest-precision file of the same model) over worker/data's text.
    quality: bool = False
    quality_n_ctx: int = Field(default=512, ge=16, le=8192, description="context of each scored chunk")
    quality_n_chunks: int = Field(default=0, ge=0, le=1024, description="chunks of the text scored; 0: all")
    # Chosen at submit (orchestrator/sweep.py reference_quant): the model's own F32/F16/BF16 file,
    # or F32 derived from a quantized one. Empty: not a quality job.
    quality_reference_quant: str = Field(default="", max_length=16)

    @model_validator(mode="after")
    def _technique_options(self) -> "Job":
        if self.prompt_category is not None and self.prompt_category not in PROMPT_CATEGORIES:
            raise ValueError(f"unknown prompt category {self.prompt_category!r}; known: {', '.join(PROMPT_CATEGORIES)}")
        if self.technique == "baseline":
            return self
        if self.kind != "tg" or self.prompt_category is None:
            raise ValueError(f"a {self.technique} job is a decode (tg) test over a prompt_category")
        if self.technique == "mtp":
            # torch: the project's trained heads beside the file; llamacpp: the file's own NextN layers.
            if self.n_mtp < 1:
                raise ValueError(f"an mtp job needs n_mtp >= 1 (tokens drafted per target pass), not {self.n_mtp}")
            if self.temperature > 0 and self.engine != "torch":
                raise ValueError("sampled speculation (temperature > 0) runs on the torch engine only")
            return self
        if self.n_draft < 1:
            raise ValueError(f"a {self.technique} job needs n_draft >= 1")
        if self.technique == "spec" and not self.draft_model:
            raise ValueError("a spec job needs a draft_model")
        if self.technique == "lookup" and self.ngram_max < 1:
            raise ValueError("a lookup job needs ngram_max >= 1")
        if self.technique == "lookup":
            self._lookup_options()
        if self.draft_quant is not None and self.draft_quant not in QUANTS:
            raise ValueError(f"unknown draft quant {self.draft_quant!r}")
        if self.temperature > 0 and self.engine != "torch":
            raise ValueError("sampled speculation (temperature > 0) runs on the torch engine only")
        return self

    def _lookup_options(self) -> None:
        """Refuse a setting the job's lookup drafter would silently ignore."""
        mode = self.lookup_mode
        if (self.lookup_cache_static or self.lookup_cache_dynamic) and mode != "ngram-cache":
            raise ValueError("lookup_cache_static and lookup_cache_dynamic apply to lookup_mode ngram-cache, "
                             f"not {mode}")
        if self.ngram_min_hits != 1 and mode != "ngram-map-k4v":
            raise ValueError(f"ngram_min_hits applies to lookup_mode ngram-map-k4v only; llama.cpp's {mode} "
                             "does not read it")
        if mode == "longest" and self.ngram_size_n:
            raise ValueError("ngram_size_n applies to llama.cpp's n-gram modes; lookup_mode longest matches up to "
                             "ngram_max tokens")
        if mode == "ngram-cache":
            if self.ngram_size_n:
                raise ValueError("ngram-cache keys on llama.cpp's fixed 1- to 4-grams: ngram_size_n does not apply")
            if self.ngram_max != NGRAM_CACHE_MAX:
                raise ValueError(f"ngram-cache keys on llama.cpp's fixed 1- to 4-grams: its ngram_max is "
                                 f"{NGRAM_CACHE_MAX}, not {self.ngram_max}")

    @model_validator(mode="after")
    def _engine_settings(self) -> "Job":
        if self.engine != "torch" and self.config.torch_dtype != "float32":
            raise ValueError("torch_dtype applies to engine torch only; llama.cpp's precision is the file's quant")
        return self

    @model_validator(mode="after")
    def _sizes_match_kind(self) -> "Job":
        if self.kind == "pp" and self.n_prompt < 1:
            raise ValueError("a pp job needs n_prompt >= 1")
        if self.kind == "tg" and self.n_gen < 1:
            raise ValueError("a tg job needs n_gen >= 1")
        if self.kind == "pg" and (self.n_prompt < 1 or self.n_gen < 1):
            raise ValueError("a pg job needs n_prompt >= 1 and n_gen >= 1")
        if self.quant not in QUANTS:
            raise ValueError(f"unknown quant {self.quant!r}")
        return self

    @property
    def test(self) -> str:
        return format_test_name(self.kind, self.n_prompt, self.n_gen, self.n_depth)

    @property
    def n_tokens(self) -> int:
        """Tokens each repetition times: the prompt for pp, the generated tokens for tg, both for pg;
        over a prompt set, the generated tokens of every prompt."""
        if self.kind == "tg" and self.prompt_category:
            return self.n_gen * self.n_prompts
        return tokens_per_run(self.kind, self.n_prompt, self.n_gen)


# Backend names as llama.cpp's registry spells them (each ggml/src/ggml-*/ backend's
# reg get_name, llama.cpp of llama-cpp-python 0.3.36), with the spellings older llama-bench files
# carry ("Metal" before the registry named it "MTL"; the AMX and Kompute backends since folded or
# removed), and the torch engine's "MPS". Case matters: llama-bench's `backends` is compared as text.
GGML_BACKENDS: tuple[str, ...] = (
    "CPU", "CUDA", "ROCm", "MUSA", "MTL", "Metal", "Vulkan", "SYCL", "OpenCL", "CANN", "BLAS", "RPC",
    "ZenDNN", "zDNN", "WebGPU", "OPENVINO", "HTP", "ET", "ggml-virtgpu", "AMX", "Kompute", "MPS",
)
# Backends that compute on the host: a box listing only these has no accelerator.
HOST_BACKENDS: tuple[str, ...] = ("CPU", "BLAS", "ZenDNN", "AMX", "RPC")


def backend_problems(backends: str) -> list[str]:
    """Why a `backends` text cannot be what a real llama.cpp or torch build reports: an unknown
    or misspelled name (the known spelling suggested), a name twice, an empty item. Empty: not
    recorded (results and llama-bench files from before the field)."""
    import difflib

    if not backends:
        return []
    problems = []
    names = backends.split(",")
    by_lower = {b.lower(): b for b in GGML_BACKENDS}
    for name in names:
        if name in GGML_BACKENDS:
            continue
        if not name.strip():
            problems.append(f"backends {backends[:100]!r} has an empty name; llama-bench joins names with ',' alone")
            continue
        near = by_lower.get(name.strip().lower()) or next(iter(difflib.get_close_matches(name, GGML_BACKENDS, 1)), "")
        hint = f" (did you mean {near!r}?)" if near else f"; known: {', '.join(GGML_BACKENDS)}"
        problems.append(f"backends names {name[:40]!r}, which no llama.cpp or torch build reports{hint}")
    repeated = sorted({n for n in names if n and names.count(n) > 1})
    if repeated:
        problems.append(f"backends {backends[:100]!r} names {', '.join(repeated)} more than once")
    return problems


def accelerators(backends: str) -> list[str]:
    """The backends of a `backends` text that compute off the host ("CUDA", "Metal"), in order."""
    return [b for b in (x.strip() for x in backends.split(",")) if b and b not in HOST_BACKENDS]


class Hardware(BaseModel):
    model_config = ConfigDict(extra="forbid")

    cpu: Annotated[str, Field(max_length=300)] = ""
    n_cpu_cores: int = 0
    ram_bytes: int = 0
    gpu: Annotated[str, Field(max_length=300)] = ""
    # llama.cpp's backends the run used, llama-bench's spelling ("CUDA", "Metal,BLAS", "CPU"): an
    # Apple GPU has no separate gpu name in older llama-bench files, only its Metal backend.
    backends: Annotated[str, Field(max_length=300)] = ""
    # GPU devices the engine can place layers on (ggml's GPU devices for llama.cpp, as its model
    # loader counts them; torch.cuda.device_count() for torch): what tensor_split is routed by.
    n_gpus: int = Field(default=0, ge=0, le=256)
    vram_bytes: int = 0
    os: Annotated[str, Field(max_length=300)] = ""
    gpu_driver: Annotated[str, Field(max_length=300)] = ""
    cuda_version: Annotated[str, Field(max_length=300)] = ""
    # STREAM-style triad, best of a few runs; 0 where not measured (see worker/hardware.py).
    host_bandwidth_gbps: float = 0.0
    device_bandwidth_gbps: float = 0.0
    # The bandwidth the decode roofline uses: the device's where there is one, else the host's.
    bandwidth_gbps: float = 0.0


class ModelFacts(BaseModel):
    model_config = ConfigDict(extra="forbid")

    arch: Annotated[str, Field(max_length=300)] = ""
    model_type: str = Field(default="", description="llama-bench's `model_type`, e.g. 'llama 135M Q4_1'")
    size_bytes: int = 0
    n_params: int = 0
    file_type: Annotated[str, Field(max_length=300)] = ""
    # Shape of the network, from the GGUF header (`<arch>.block_count`, ...).
    n_layer: int = 0
    n_head: int = 0
    n_kv_head: int = 0
    n_embd: int = 0
    head_dim: int = 0
    n_ctx_train: int = 0
    n_vocab: int = 0
    # Bytes of tensor data per ggml type: llama.cpp falls back to other types for some tensors.
    quant_mix_bytes: dict[str, int] = Field(default_factory=dict, max_length=64)
    weight_bytes: int = Field(default=0, description="all tensor data, without header and padding")
    n_expert: int = 0
    n_expert_used: int = 0
    n_params_active: int = Field(default=0, description="parameters one token passes through")
    active_bytes: int = Field(default=0, description="weight bytes one decode step reads")
    kv_bytes_per_token: int = Field(default=0, description="K and V of one context position, f16 cache")
    # `<arch>.nextn_predict_layers`: MTP layers llama.cpp drafts with (issue 15); 0: none.
    n_nextn_layers: int = 0


class Stats(BaseModel):
    """Spread of per-repetition tok/s beyond mean and stddev, so a noisy machine shows."""

    model_config = ConfigDict(extra="forbid")

    median_ts: float = 0.0
    min_ts: float = 0.0
    max_ts: float = 0.0
    ci95_low_ts: float = 0.0
    ci95_high_ts: float = 0.0
    cv: float = Field(default=0.0, description="stddev / mean of tok/s")
    noisy: bool = False


class Conditions(BaseModel):
    """How the engine ran and what the process used while it did."""

    model_config = ConfigDict(extra="forbid")

    n_threads: int = 0
    kv_type: str = "f16"
    flags: dict[str, str | int | float | bool] = Field(default_factory=dict, max_length=64)
    peak_rss_bytes: int = 0
    peak_vram_bytes: int = 0
    # The worker kept the model loaded from its previous job (load_ns is then 0: nothing loaded).
    model_reused: bool = False
    energy_per_token_j: float | None = None
    # Issue 17: llama.cpp's own allocations, split by where they live. device_bytes is this
    # process's (weights on the device + KV + compute buffers there), host_bytes the RAM beside it.
    weights_device_bytes: int = Field(default=0, ge=0)
    weights_host_bytes: int = Field(default=0, ge=0)
    kv_bytes: int = Field(default=0, ge=0)
    compute_bytes: int = Field(default=0, ge=0)
    device_bytes: int = Field(default=0, ge=0)
    host_bytes: int = Field(default=0, ge=0)
    # Time this job spent making a context for a kept model (0 when the context was kept too);
    # the model's own load time is Result.load_ns (0 when the model was kept).
    context_ns: int = Field(default=0, ge=0)


class Speculation(BaseModel):
    """What a spec or lookup job measured beyond tok/s, summed over its timed repetitions."""

    model_config = ConfigDict(extra="forbid")

    baseline_samples_ns: list[int] = Field(max_length=MAX_LIST_ITEMS, description="plain greedy decoding, same prompts, same job")
    baseline_avg_ts: float
    speedup: float = Field(description="avg_ts / baseline_avg_ts")
    n_drafted: int = Field(ge=0)
    n_accepted: int = Field(ge=0)
    n_passes: int = Field(ge=0, description="target verify passes")
    acceptance_rate: float = Field(description="n_accepted / n_drafted; 0 when nothing was drafted")
    mean_accepted_per_pass: float = Field(description="n_accepted / n_passes")
    acceptance_by_position: list[float] = Field(max_length=MAX_LIST_ITEMS, description="accepted / drafted at draft position i")
    draft_ns: int = Field(ge=0)
    verify_ns: int = Field(ge=0)
    # Losslessness: the technique's greedy tokens against the baseline's, per prompt.
    first_mismatch: list[int | None] = Field(max_length=MAX_LIST_ITEMS, description="per prompt: index of the first differing token; None: identical")
    lossless: bool
    # Per prompt, tokens_sha256 of the last repetition's tokens: the baseline's and the technique's.
    # The collector checks the losslessness claim against them (equal hashes iff no mismatch).
    baseline_sha256: list[Sha256] = Field(default_factory=list, max_length=MAX_LIST_ITEMS)
    output_sha256: list[Sha256] = Field(default_factory=list, max_length=MAX_LIST_ITEMS)

# The evaluation texts a quality block may name (worker/data/), by sha256: the collector refuses
# any other, without reading worker files; tests/unit/test_quality.py holds the shipped file to it.
EVAL_TEXTS: dict[str, str] = {"eval_text.txt": "331bf0954e741ed8e407a2601a90eb13f70ee9aa7ab21bb2e98694ed2e85e47d"}


class Quality(BaseModel):
    """The quant against its reference over a fixed text, with llama-perplexity --kl-divergence's
    definitions: per scored token, KL(reference || quant) of the next-token distributions, whether
    both put the same token on top, and each one's negative log-likelihood of the true next token."""

    model_config = ConfigDict(extra="forbid")

    reference_quant: str = Field(max_length=16)
    reference_sha256: Sha256
    text_name: Name
    text_sha256: Sha256
    n_ctx: int = Field(ge=1)
    n_chunks: int = Field(ge=1)
    n_tokens_scored: int = Field(ge=1)
    kld_mean: float = Field(ge=0.0)
    kld_median: float = Field(ge=0.0)
    kld_p99: float = Field(ge=0.0)
    kld_max: float = Field(ge=0.0)
    top1_agreement: float = Field(ge=0.0, le=1.0, description="share of scored tokens whose top token matches")
    ppl: float = Field(ge=1.0, description="perplexity of the quant on the text")
    ppl_reference: float = Field(ge=1.0)
    # Samples the statistics follow from (the collector recomputes them): one row per chunk.
    kld_chunk_means: list[float] = Field(max_length=MAX_LIST_ITEMS)
    top1_chunk: list[float] = Field(max_length=MAX_LIST_ITEMS)
    nll_chunk_means: list[float] = Field(max_length=MAX_LIST_ITEMS)
    nll_reference_chunk_means: list[float] = Field(max_length=MAX_LIST_ITEMS)
    # Per-token KLD at percentiles 0, 1, ..., 100 (linear interpolation, as llama-perplexity's):
    # median is [50], p99 [99], max [100]; the collector checks the figures against them.
    kld_percentiles: list[float] = Field(default_factory=list, max_length=101)
    # The reference's logits are cached as top-k; 0: full vocabulary. mass: mean probability kept.
    reference_top_k: int = Field(default=0, ge=0)
    reference_mass_kept: float = Field(default=1.0, ge=0.0, le=1.0)
    reference_cached: bool = Field(default=False, description="the reference pass was read from the cache")
    pass_ns: int = Field(default=0, ge=0, description="wall time of the quant's scoring pass")
    reference_ns: int = Field(default=0, ge=0, description="wall time of the reference pass (0 when cached)")


class Result(BaseModel):
    """What a worker sends back for one Job, ok or failed."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = SCHEMA_VERSION
    job_id: str
    sweep_id: str
    status: Status
    error: str = Field(default="", max_length=MAX_ERROR_CHARS)
    # The failure may not recur (a download that broke off): the orchestrator tries again later.
    transient: bool = False
    worker: Name
    # Identity of what was measured: the job's request and the file actually run.
    model: Name
    model_sha256: Sha256 = ""
    source_sha256: Sha256 = ""
    # Echoed from the job: which repository, file and commit (or Ollama blob) was measured.
    model_source: ModelSource | None = None
    model_facts: ModelFacts = ModelFacts()
    quant: str
    technique: Technique = "baseline"
    backend: Engine = "llamacpp"
    test: str
    n_prompt: int = 0
    n_gen: int = 0
    n_depth: int = 0
    repetitions: int = 0
    samples_ns: list[int] = Field(default_factory=list, max_length=MAX_LIST_ITEMS)
    avg_ts: float = 0.0
    stddev_ts: float = 0.0
    load_ns: int = 0
    # output_sha256(...) of the greedy tokens of the last repetition: the decoded tokens (pp: the
    # one token after the prompt); over a prompt set, the baseline's tokens of every prompt in
    # order. Canaries and cross-checks compare it; empty only on failed results.
    output_sha256: Sha256 = ""
    stats: Stats = Stats()
    # Time from an empty cache to the first greedy token for n_prompt tokens (pp and pg, depth 0).
    ttft_samples_ns: list[int] = Field(default_factory=list, max_length=MAX_LIST_ITEMS)
    ttft_ns: int = 0
    # pg: the decode part, timed directly; its rate is what the roofline bounds.
    decode_samples_ns: list[int] = Field(default_factory=list, max_length=MAX_LIST_ITEMS)
    decode_ts: float = 0.0
    roofline_tok_s: float = 0.0
    roofline_pct: float = 0.0
    conditions: Conditions = Conditions()
    config: EngineConfig = EngineConfig()
    hardware: Hardware = Hardware()
    versions: dict[str, Annotated[str, Field(max_length=200)]] = Field(default_factory=dict, max_length=64)
    started_at: datetime = Field(default_factory=utc_now)
    finished_at: datetime = Field(default_factory=utc_now)
    prompt_category: str | None = None
    n_prompts: int = 0
    draft_model: Name | None = None
    draft_quant: str | None = Field(default=None, max_length=16)
    draft_sha256: Sha256 = ""
    n_draft: int = 0
    p_min: float = 0.0
    ngram_max: int = 0
    lookup_mode: str = Field(default="longest", max_length=32)
    ngram_size_n: int = 0
    ngram_min_hits: int = 1
    lookup_cache_static: str = Field(default="", max_length=MAX_NAME_CHARS)
    lookup_cache_dynamic: str = Field(default="", max_length=MAX_NAME_CHARS)
    n_mtp: int = 0
    temperature: float = 0.0
    speculation: Speculation | None = None
    quality: Quality | None = None

    @classmethod
    def failed(cls, job: Job, worker: str, error: str, **extra) -> "Result":
        return cls(
            job_id=job.job_id, sweep_id=job.sweep_id, status="failed", error=error[:MAX_ERROR_CHARS], worker=worker,
            model=job.model, quant=job.quant, technique=job.technique, backend=job.engine,
            test=job.test, n_prompt=job.n_prompt, n_gen=job.n_gen, n_depth=job.n_depth,
            config=job.config, model_source=job.model_source,
            **{f: getattr(job, f) for f in TECHNIQUE_FIELDS}, **extra,
        )

# Technique options a Result echoes from its Job (the break-even map groups by them).
TECHNIQUE_FIELDS = ("prompt_category", "n_prompts", "draft_model", "draft_quant", "n_draft", "p_min", "ngram_max",
                    "lookup_mode", "ngram_size_n", "ngram_min_hits", "lookup_cache_static", "lookup_cache_dynamic",
                    "n_mtp", "temperature")


class Capabilities(BaseModel):
    """What a worker announces when it joins and with every heartbeat."""

    model_config = ConfigDict(extra="forbid")

    engines: list[Annotated[str, Field(max_length=32)]] = Field(default_factory=list, max_length=8)
    hardware: Hardware = Hardware()
    models: list[Sha256] = Field(default_factory=list, max_length=MAX_MODELS_HELD,
                                 description="sha256 of the model files it holds")
    queues: list[Name] = Field(default_factory=list, max_length=16)
    version: str = Field(default="", max_length=100)
    # Memory the worker offers jobs: all it has, or less where its owner capped it (routing by class).
    offered_ram_bytes: int = 0
    offered_vram_bytes: int = 0


class Download(BaseModel):
    """How far a job's model download has come (the job's time budget starts after it)."""

    model_config = ConfigDict(extra="forbid")

    downloaded_bytes: int = Field(ge=0)
    total_bytes: int = Field(ge=0)


class Envelope(BaseModel):
    """A message on the results queue: a worker's hello or heartbeat, a job started, its model's
    download progress, its Result, or a job it refused to run (`refused`: the seal did not prove
    the orchestrator sent it, or it expired or came again; farm/jobsign.py), with the reason.

    `signature` is an HMAC of the rest under the worker's token (farm/signing.py).
    """

    model_config = ConfigDict(extra="forbid")

    kind: Literal["hello", "heartbeat", "started", "progress", "result", "refused"]
    job_id: str = Field(default="", max_length=36)
    worker: Name
    # started and result: the lease of the Job message this answers (Job.lease_id, Job.attempt).
    lease_id: str = Field(default="", max_length=36)
    attempt: int = Field(default=0, ge=0)
    result: Result | None = None
    download: Download | None = None
    capabilities: Capabilities | None = None
    reason: str = Field(default="", max_length=2000)
    sent_at: datetime = Field(default_factory=utc_now)
    signature: str = Field(default="", max_length=256)
