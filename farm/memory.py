"""The memory a job needs, and the memory classes jobs are routed by.

Owns the estimate, in bytes, of what one job holds at its peak (weights, the KV cache at the
job's context, a draft model or MTP heads, the engine's compute buffers, the runtime itself, a
margin) and the ladder of memory classes a worker serves. The orchestrator makes the estimate
at submit time: from the GGUF header where the file to run is at hand, else from the catalogue's
recorded shape and the quant's bits per weight. Pure arithmetic apart from reading headers; it
knows nothing of Celery, the database, or any engine's code (only the sizes engines allocate).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from farm.contract import Capabilities, EngineConfig, Job, ModelFacts

GIB = 1 << 30
# The leaderboard's VRAM tiers (GB): a row's tier is the smallest that fits it.
TIERS_GB: tuple[int, ...] = (8, 12, 16, 24, 32, 48, 80)
# Routing needs the small end (home-lab cards and boards under 8 GB) and the large end (RAM boxes,
# 96-141 GB cards) that the leaderboard folds into its first and last tiers.
CLASSES_GB: tuple[int, ...] = (1, 2, 4, 6, *TIERS_GB, 128, 256, 512)
# A box serves a class if it offers this much less than the class's nominal size: a "24 GB" card
# reports 23.99 GiB, an 80 GB H100 79.6 GiB, a 16 GB machine ~15.5 GiB of MemTotal. The margin in
# the estimate is what pays for it.
CLASS_SLACK = 0.05

MemoryKind = Literal["ram", "vram"]

# Bits per weight of llama.cpp's quant presets, the mixes included (K-quant presets keep some
# tensors, e.g. attn_v and ffn_down, a step up). Used only before a derived file exists.
BITS_PER_WEIGHT: dict[str, float] = {
    "F32": 32.0, "F16": 16.0, "BF16": 16.0, "Q8_0": 8.5, "Q6_K": 6.5625,
    "Q5_K_M": 5.7, "Q5_K_S": 5.55, "Q5_1": 6.0, "Q5_0": 5.5,
    "Q4_K_M": 4.9, "Q4_K_S": 4.6, "Q4_1": 5.0, "Q4_0": 4.5, "IQ4_NL": 4.5, "IQ4_XS": 4.25,
    "Q3_K_L": 4.3, "Q3_K_M": 3.9, "Q3_K_S": 3.5, "Q2_K": 3.0,
}
# K-quants need rows that are multiples of 256; narrower models (SmolLM2's 576) fall back to
# 32-wide types for most tensors, which llama.cpp picks a step up (Q4_K -> Q5_0, Q2_K -> Q4_0 ...).
FALLBACK_BITS_PER_WEIGHT: dict[str, float] = {
    "Q6_K": 8.5, "Q5_K_M": 6.5, "Q5_K_S": 6.0, "Q4_K_M": 6.0, "Q4_K_S": 5.5, "IQ4_XS": 5.0,
    "Q3_K_L": 5.5, "Q3_K_M": 5.0, "Q3_K_S": 4.5, "Q2_K": 4.5,
}
# The token embedding stays at Q8_0 or above in every preset below 8 bits (SmolLM2: Q8_0 from
# Q2_K to Q6_K); counting it so keeps the estimate an upper bound for small models, where it is
# a fifth of the parameters.
EMBEDDING_BITS_PER_WEIGHT = 8.5
K_QUANT_ROW = 256

# What the process itself holds before any model: Python, the worker's libraries and the engine
# (measured: see tests/integration/test_memory.py), and on a GPU the CUDA context and cuBLAS
# workspace (not measured on this farm's CI; a common figure).
RUNTIME_BYTES: dict[tuple[MemoryKind, str], int] = {
    ("ram", "llamacpp"): 128 << 20,
    ("ram", "torch"): 640 << 20,
    ("vram", "llamacpp"): 640 << 20,
    ("vram", "torch"): 640 << 20,
}
# The worker reads a model's GGUF header before loading it (worker/models.read_facts), and gguf-py
# holds small arrays for every vocabulary entry and merge meanwhile: measured 3.4 KiB per token for
# SmolLM2 (49k tokens, with merges), 2.7 KiB for Gemma 3 (262k). A host-RAM peak of its own, before
# the weights are read; for a small model with a large vocabulary it is the job's peak.
HEADER_BYTES_PER_TOKEN = 3584
# On top of every allocation the estimate counts: allocator slack, graph nodes, fragmentation.
MARGIN = 0.15


# The memories each engine's jobs can be bound by. The torch engine's device is the worker's
# setting (TOKENFARM_TORCH_DEVICE), unknown at submit, and it dequantizes every tensor in host
# memory before placing it, so its jobs are routed by host RAM whatever n_gpu_layers says.
ENGINE_MEMORY: dict[str, tuple[MemoryKind, ...]] = {"llamacpp": ("vram", "ram"), "torch": ("ram",)}


def memory_kind(job: Job) -> MemoryKind:
    """The memory that bounds a job: VRAM when llama.cpp offloads layers, host RAM otherwise."""
    return "vram" if job.engine == "llamacpp" and job.config.n_gpu_layers != 0 else "ram"


def context_size(job: Job) -> int:
    """The context the worker creates for a job, in tokens (a multiple of 256)."""
    need = job.n_depth + (job.n_prompt + job.n_gen if job.kind == "pg" else max(job.n_prompt, job.n_gen)) + 16
    if job.prompt_category:
        from farm.prompts import load_prompts

        # A token is at least one byte of text; 256 more for the chat template's markers.
        longest = max(len(t.encode("utf-8")) for t in load_prompts(job.prompt_category, job.n_prompts))
        need = longest + 256 + job.n_gen + max(job.n_draft, job.n_mtp) + 16
    if job.quality:  # the quality pass evaluates chunks of quality_n_ctx in the same context
        need = max(need, job.quality_n_ctx)
    return ((need + 255) // 256) * 256


def kv_bytes_per_token(facts: ModelFacts, bytes_per_element: float) -> int:
    """K and V of one position over every layer; facts carry it for llama.cpp's f16 cache."""
    return int(facts.kv_bytes_per_token * bytes_per_element // 2)


# Bytes per element of ggml's KV cache types (block bytes / block size): llama.cpp's -ctk/-ctv.
KV_BYTES_PER_ELEMENT: dict[str, float] = {
    "f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32, "q4_1": 20 / 32,
    "iq4_nl": 18 / 32, "q5_0": 22 / 32, "q5_1": 24 / 32,
}


def kv_cache_bytes(facts: ModelFacts, type_k: str, type_v: str, n_ctx: int) -> int:
    """The KV cache of n_ctx positions with K and V in their own types (each is half of the f16 figure)."""
    half_f16 = facts.kv_bytes_per_token / 2  # K (or V) of one position over every layer, f16
    return int(n_ctx * half_f16 / 2 * (KV_BYTES_PER_ELEMENT[type_k] + KV_BYTES_PER_ELEMENT[type_v]))


def expert_bytes_per_layer(facts: ModelFacts) -> int:
    """Weight bytes of one layer's experts (the tensors --n-cpu-moe keeps in host RAM).

    From the header facts alone: a decode step reads the dense part and n_expert_used of the
    n_expert experts (active_bytes), so the experts are (all - active) * n / (n - used).
    """
    if facts.n_expert <= 1 or facts.n_expert_used >= facts.n_expert or not facts.active_bytes:
        return 0
    experts = (facts.weight_bytes - facts.active_bytes) * facts.n_expert / (facts.n_expert - facts.n_expert_used)
    return int(experts / max(1, facts.n_layer))


@dataclass(frozen=True)
class MemoryEstimate:
    """Where one model's allocations of a job live, before margin and runtime."""

    weights_device_bytes: int = 0
    weights_host_bytes: int = 0
    kv_device_bytes: int = 0
    kv_host_bytes: int = 0
    compute_bytes: int = 0

    @property
    def device_bytes(self) -> int:
        # llama.cpp's compute buffer sits on the device that runs the layers (host compute too, small).
        return self.weights_device_bytes + self.kv_device_bytes + (self.compute_bytes if self.weights_device_bytes else 0)

    @property
    def host_bytes(self) -> int:
        return self.weights_host_bytes + self.kv_host_bytes + (0 if self.weights_device_bytes else self.compute_bytes)

    def __add__(self, other: MemoryEstimate) -> MemoryEstimate:
        return MemoryEstimate(*(getattr(self, f) + getattr(other, f) for f in self.__dataclass_fields__))


def llamacpp_placement(job: Job, facts: ModelFacts, n_ctx: int, override_host_bytes: int = 0) -> MemoryEstimate:
    """llama.cpp's placement of one model: n_gpu_layers of the layers (weights and their KV) on the
    device, minus the experts of the first n_cpu_moe layers and the tensors -ot sends to the CPU
    (override_host_bytes, from the tensor table where the planner has it); the KV cache in its
    type_k/type_v, on the host with no_kv_offload; compute for one micro-batch."""
    cfg = job.config
    weights, kv = facts.weight_bytes, kv_cache_bytes(facts, cfg.type_k, cfg.type_v, n_ctx)
    n_tokens = min(cfg.n_ubatch, cfg.n_batch, n_ctx)
    compute = _compute_bytes(facts, n_tokens, n_ctx, cfg.flash_attn_on)
    if memory_kind(job) == "ram":
        return MemoryEstimate(weights_host_bytes=weights, kv_host_bytes=kv, compute_bytes=compute)
    n_layer = max(1, facts.n_layer)
    n_offloaded = n_layer if cfg.n_gpu_layers < 0 or cfg.n_gpu_layers >= n_layer else cfg.n_gpu_layers
    share = n_offloaded / n_layer
    device = int(weights * share)
    # --n-cpu-moe counts layers from the first; offloaded layers are the last n_gpu_layers.
    first_offloaded = n_layer - n_offloaded
    moe_layers_on_device = max(0, min(cfg.n_cpu_moe, n_layer) - first_offloaded)
    moved = moe_layers_on_device * expert_bytes_per_layer(facts) + min(override_host_bytes, device)
    device = max(0, device - moved)
    kv_device = 0 if cfg.no_kv_offload else int(kv * share)
    return MemoryEstimate(weights_device_bytes=device, weights_host_bytes=weights - device,
                          kv_device_bytes=kv_device, kv_host_bytes=kv - kv_device, compute_bytes=compute)


def _compute_bytes(facts: ModelFacts, n_tokens: int, n_ctx: int, flash_attn: bool) -> int:
    """The largest activations of one forward pass over n_tokens, in f32.

    Logits over the vocabulary, the attention scores (unless flash attention tiles them), and a
    few hidden-width buffers; llama.cpp's graph allocator reuses the rest between layers.
    """
    n_ff = 4 * facts.n_embd  # not in the header facts; the usual ratio, and a few buffers of it
    scores = 0 if flash_attn else facts.n_head * n_ctx
    return 4 * n_tokens * (facts.n_vocab + scores + 2 * n_ff + 4 * facts.n_embd)


def _layer_params(facts: ModelFacts) -> int:
    embeddings = facts.n_vocab * facts.n_embd
    return max(0, facts.n_params - embeddings) // max(1, facts.n_layer)


def estimate_need_bytes(job: Job, facts: ModelFacts, draft_facts: ModelFacts | None = None,
                        reference_facts: ModelFacts | None = None, override_host_bytes: int = 0) -> int:
    """Bytes of the bounding memory (memory_kind) a job needs at its peak.

    llama.cpp's share is llamacpp_placement's: on a GPU job only what lands on the device
    (experts kept on the host by n_cpu_moe, tensors sent there by override_tensors, a KV cache
    kept there by no_kv_offload are RAM's); the KV cache in its own type_k/type_v.

    llama.cpp: the file's tensor data (memory-mapped, resident once read), an f16 KV cache at
    the job's context (sliding-window layers counted whole), compute buffers for one
    micro-batch; in host RAM, at least what reading the header takes. torch: every tensor dequantized to
    f32 while the file is still mapped, an f32 cache (a second one for a technique, which
    allocates its own), compute for one n_batch chunk. A spec job adds its draft the same way;
    an mtp job its heads (one block and a 2D -> D projection each, f32; none on torch over a file
    with NextN layers, whose one head is among its tensors). Partial offload puts
    n_gpu_layers / n_layer of the weights and cache on the device.
    """
    kind = memory_kind(job)
    n_ctx = context_size(job)
    torch = job.engine == "torch"

    def model_bytes(f: ModelFacts, override_bytes: int = 0) -> int:
        if not torch:
            placed = llamacpp_placement(job, f, n_ctx, override_bytes)
            return placed.device_bytes if kind == "vram" else placed.host_bytes
        # f32 tensors (plain F.linear: no prepacked second copy), the mapped file.
        weights = 4 * f.n_params + f.weight_bytes
        kv = kv_bytes_per_token(f, 4) * n_ctx * (2 if job.technique != "baseline" else 1)
        n_tokens = min(job.config.n_batch, n_ctx)
        return weights + kv + _compute_bytes(f, n_tokens, n_ctx, False)

    total = model_bytes(facts, override_host_bytes)
    if job.technique == "spec" and draft_facts is not None:
        total += model_bytes(draft_facts)
    if job.technique == "mtp" and not (torch and facts.n_nextn_layers):
        # Heads beside the file; the torch engine drafts with a file's own NextN layer where it
        # has one, one head at any n_mtp, whose weights model_bytes counted with the file's.
        total += 4 * job.n_mtp * (_layer_params(facts) + 2 * facts.n_embd * facts.n_embd)
    if job.quality:
        # A chunk's logits at every position: the engine's output buffer, the copy the pass
        # scores, and its float64 log-softmax of the scored half; the reference loaded beside
        # the quant for its one pass when it is another file (worker/tasks.quality_block).
        total += 4 * job.quality_n_ctx * facts.n_vocab * 3
        if reference_facts is not None and job.quality_reference_quant != job.quant:
            total += model_bytes(reference_facts)
    if kind == "ram":
        total = max(total, HEADER_BYTES_PER_TOKEN * facts.n_vocab)
    return int(total * (1 + MARGIN)) + RUNTIME_BYTES[(kind, job.engine)]


def scaled_to_quant(facts: ModelFacts, quant: str) -> ModelFacts:
    """Facts of `facts`' model requantized to `quant`, before the derived file exists."""
    bits = BITS_PER_WEIGHT[quant]
    if facts.n_embd % K_QUANT_ROW:
        bits = FALLBACK_BITS_PER_WEIGHT.get(quant, bits)
    n_embedding = min(facts.n_params, facts.n_vocab * facts.n_embd)
    weight_bytes = math.ceil((n_embedding * max(bits, EMBEDDING_BITS_PER_WEIGHT)
                              + (facts.n_params - n_embedding) * bits) / 8)
    # The bytes a decode step reads shrink with the weights (an MoE's share of them stays its share).
    active_bytes = math.ceil(facts.active_bytes * weight_bytes / facts.weight_bytes) if facts.weight_bytes else 0
    return facts.model_copy(update={"weight_bytes": weight_bytes, "size_bytes": weight_bytes, "file_type": quant,
                                    "active_bytes": active_bytes})


def upcycled(parent: ModelFacts, n_ff: int, n_expert: int, n_expert_used: int = 2) -> ModelFacts:
    """Facts of a Mixtral-style F32 upcycle (worker/derive.py) of a dense parent."""
    ffn = 3 * parent.n_embd * n_ff * parent.n_layer
    router = n_expert * parent.n_embd * parent.n_layer
    n_params = parent.n_params + (n_expert - 1) * ffn + router
    n_active = parent.n_params + (n_expert_used - 1) * ffn + router
    return parent.model_copy(update={"n_params": n_params, "weight_bytes": 4 * n_params, "size_bytes": 4 * n_params,
                                     "file_type": "F32", "n_expert": n_expert, "n_expert_used": n_expert_used,
                                     "n_params_active": n_active, "active_bytes": 4 * n_active})


def facts_for(ref: str, quant: str, models_dir: Path | None, known: ModelFacts | None = None) -> ModelFacts:
    """The facts of the file a worker will run for (ref, quant), from whatever is at hand here.

    The file itself where this machine has it (a path model, a fetched catalogue model, a
    derived quant already made); else its source's header scaled to the quant; else the
    catalogue's recorded shape. Raises ModelError for an unknown name or a broken file.
    """
    from farm.modelfiles import (
        CATALOGUE,
        ModelError,
        catalogue_path,
        derived_path,
        parse_moe_name,
        parse_mtp_name,
        read_facts,
        sha256_file,
    )

    if known is not None:  # a remote model's header, read by the planner
        return known if known.file_type == quant else scaled_to_quant(known, quant)
    source: Path | None
    if ref in CATALOGUE:
        path = catalogue_path(ref, models_dir) if models_dir else None
        source = path if path is not None and path.exists() else None
        source_sha = CATALOGUE[ref].sha256
        fallback = CATALOGUE[ref].facts()
    elif (moe := parse_moe_name(ref)) is not None:
        parent, cfg = moe
        source, source_sha = None, ""
        if models_dir:
            name = f"{CATALOGUE[parent].sha256[:16]}.{ref.removeprefix(parent + '-')}.F32.gguf"
            path = Path(models_dir) / "derived" / name
            source = path if path.exists() else None
        fallback = upcycled(CATALOGUE[parent].facts(), CATALOGUE[parent].n_ff, cfg.n_expert, cfg.n_expert_used)
    elif (mtp_parent := parse_mtp_name(ref)) is not None:
        # The parent's shape plus one NextN block (about one layer's weights), as F32.
        source, source_sha = None, ""
        if models_dir:
            built = sorted((Path(models_dir) / "derived").glob(f"{CATALOGUE[mtp_parent].sha256[:16]}.mtp-*.F32.gguf"))
            source = built[-1] if built else None
        parent = CATALOGUE[mtp_parent].facts()
        fallback = scaled_to_quant(parent, "F32").model_copy(update={
            "arch": "glm4moe", "n_nextn_layers": 1, "n_layer": parent.n_layer + 1})
    else:
        source, source_sha, fallback = Path(ref).expanduser(), "", None
        if not source.exists():
            raise ModelError(f"model file {source} does not exist")
    if source is None:
        return fallback if fallback.file_type == quant else scaled_to_quant(fallback, quant)
    facts = read_facts(source)
    if facts.file_type == quant:
        return facts
    if models_dir:
        derived = derived_path(source_sha or sha256_file(source), quant, models_dir)
        if derived.exists():
            return read_facts(derived)
    return scaled_to_quant(facts, quant)


def tensor_table_for(ref: str, quant: str, models_dir: Path | None) -> list[tuple[str, int]] | None:
    """(name, bytes) of each tensor of the file a worker will run for (ref, quant), from a file at
    hand here: the file itself, else its source (same names; bytes scaled by the quant's bits);
    None when no file is here (a remote model, a catalogue model not fetched)."""
    import gguf

    from farm.modelfiles import (
        CATALOGUE,
        _tensor_table,
        catalogue_path,
        derived_path,
        parse_moe_name,
        read_facts,
    )

    candidates: list[Path] = []
    if ref in CATALOGUE:
        if models_dir:
            candidates.append(catalogue_path(ref, models_dir))
            candidates.insert(0, derived_path(CATALOGUE[ref].sha256, quant, models_dir))
    elif (moe := parse_moe_name(ref)) is not None:
        if models_dir:
            parent = moe[0]
            candidates.append(Path(models_dir) / "derived" / f"{CATALOGUE[parent].sha256[:16]}."
                              f"{ref.removeprefix(parent + '-')}.F32.gguf")
    else:
        candidates.append(Path(ref).expanduser())
    path = next((c for c in candidates if c.exists()), None)
    if path is None:
        return None
    table = [(name, n_bytes) for name, _, _, n_bytes, _ in _tensor_table(gguf.GGUFReader(path))]
    facts = read_facts(path)
    if facts.file_type != quant and facts.weight_bytes:
        ratio = BITS_PER_WEIGHT.get(quant, 32.0) / BITS_PER_WEIGHT.get(facts.file_type, 32.0)
        table = [(name, int(n * ratio)) for name, n in table]
    return table


def job_need_bytes(job: Job, models_dir: Path | None, cache: dict | None = None,
                   known: dict[str, ModelFacts] | None = None) -> int:
    """estimate_need_bytes with the facts found by facts_for; `cache` spares re-reading headers;
    `known`: facts of remote models by reference, read from their headers at planning."""
    cache = {} if cache is None else cache
    known = known or {}

    def facts(ref: str, quant: str) -> ModelFacts:
        if (ref, quant) not in cache:
            cache[(ref, quant)] = facts_for(ref, quant, models_dir, known.get(ref))
        return cache[(ref, quant)]

    draft = None
    if job.technique == "spec" and job.draft_model:
        from farm.modelfiles import CATALOGUE, read_facts

        quant = job.draft_quant
        if quant is None:
            quant = CATALOGUE[job.draft_model].quant if job.draft_model in CATALOGUE else \
                known[job.draft_model].file_type if job.draft_model in known else \
                read_facts(Path(job.draft_model)).file_type
        draft = facts(job.draft_model, quant)
    reference = facts(job.model, job.quality_reference_quant) if job.quality and job.quality_reference_quant else None
    return estimate_need_bytes(job, facts(job.model, job.quant), draft, reference,
                               override_host_bytes(job, models_dir, cache))


def override_host_bytes(job: Job, models_dir: Path | None, cache: dict | None = None) -> int:
    """Bytes of the tensors job.config.override_tensors sends to a CPU buffer (0 when no file is at
    hand to read their names from: the estimate then keeps them on the device, an upper bound)."""
    from farm.contract import parse_override_tensors

    pairs = [(p, b) for p, b in parse_override_tensors(job.config.override_tensors) if b.upper().startswith("CPU")]
    if not pairs or job.engine != "llamacpp":
        return 0
    cache = {} if cache is None else cache
    key = ("tensors", job.model, job.quant)
    if key not in cache:
        cache[key] = tensor_table_for(job.model, job.quant, models_dir)
    table = cache[key] or []
    return sum(n for name, n in table if any(re.search(p, name) for p, _ in pairs))


def job_active_bytes(job: Job, models_dir: Path | None, cache: dict | None = None,
                     known: dict[str, ModelFacts] | None = None) -> int:
    """Weight bytes one decode step of the job's model reads, from the orchestrator's own read of
    the file's header (facts_for): what the collector's roofline check divides bandwidth by."""
    cache = {} if cache is None else cache
    if (job.model, job.quant) not in cache:
        cache[(job.model, job.quant)] = facts_for(job.model, job.quant, models_dir, (known or {}).get(job.model))
    facts = cache[(job.model, job.quant)]
    return facts.active_bytes or facts.weight_bytes or facts.size_bytes


def class_gb(need_bytes: int) -> int | None:
    """The smallest class that holds need_bytes; None above the largest."""
    for gb in CLASSES_GB:
        if need_bytes <= gb * GIB:
            return gb
    return None


def served_classes_gb(offered_bytes: int) -> tuple[int, ...]:
    """Every class a box offering this much memory can take jobs of."""
    return tuple(gb for gb in CLASSES_GB if offered_bytes >= gb * GIB * (1 - CLASS_SLACK))


def offered_bytes(caps: Capabilities, kind: MemoryKind) -> int:
    """What a worker offers jobs of a memory kind (its own cap, else all it has)."""
    if kind == "vram":
        return caps.offered_vram_bytes or caps.hardware.vram_bytes
    return caps.offered_ram_bytes or caps.hardware.ram_bytes


def fits(caps: Capabilities, job: Job) -> bool:
    """Whether a worker can take this job: its engine, its GPUs for a tensor_split or main_gpu, its memory class."""
    if job.engine not in caps.engines:
        return False
    if job.config.n_gpus_named > caps.hardware.n_gpus:
        return False  # its engine would refuse the split or the main GPU at load
    if not job.need_bytes:
        return True  # never estimated: any worker with its engine may try
    need = class_gb(job.need_bytes)
    return need is not None and need in served_classes_gb(offered_bytes(caps, memory_kind(job)))


# Bits per element of the KV cache types (ggml's block sizes: q8_0 is 34 bytes per 32 values).
KV_TYPE_BITS: dict[str, float] = {"f32": 32.0, "f16": 16.0, "bf16": 16.0, "q8_0": 8.5, "q4_0": 4.5, "q4_1": 5.0,
                                  "iq4_nl": 4.5, "q5_0": 5.5, "q5_1": 6.0}
# Decoder depth by parameter count, for files whose header was never read here (llama-bench
# imports carry only model_type, size and n_params): what partial offload's share is taken over.
_TYPICAL_N_LAYER: tuple[tuple[float, int], ...] = ((0.6e9, 30), (2e9, 28), (4.5e9, 36), (9e9, 32), (15e9, 40),
                                                   (40e9, 48), (80e9, 80))


def typical_n_layer(n_params: int) -> int:
    for limit, n_layer in _TYPICAL_N_LAYER:
        if n_params <= limit:
            return n_layer
    return 96


def expert_share(facts: ModelFacts) -> float:
    """The share of an MoE's weights in its expert tensors; 0 for a dense model.

    A token passes through the shared weights and n_expert_used experts, so the parameters it does
    not pass through are experts: 1 - active/total, a lower bound on the expert share.
    """
    if not facts.n_params or not facts.n_params_active or facts.n_params_active >= facts.n_params:
        return 0.0
    return 1.0 - facts.n_params_active / facts.n_params


def run_memory_bytes(facts: ModelFacts, config: EngineConfig, n_ctx: int, on_device: bool) -> tuple[int, MemoryKind]:
    """(bytes, memory) a finished run held at its peak, estimated for runs that measured none.

    The memory is the device's where llama.cpp offloaded layers (`on_device` and n_gpu_layers != 0),
    else host RAM. On the device: the offloaded layers' share of the weights (n_gpu_layers of
    n_layer), less the expert tensors of the first n_cpu_moe layers (or all experts, for an -ot
    pattern sending `exps` to the CPU), the KV cache of its types unless no_kv_offload keeps it
    in host RAM, and the compute buffers of one micro-batch; then MARGIN and the runtime.
    """
    weights = facts.weight_bytes or facts.size_bytes
    bits_kv = KV_TYPE_BITS.get(config.type_k, 16.0) + KV_TYPE_BITS.get(config.type_v, 16.0)
    kv = int(facts.kv_bytes_per_token * n_ctx * bits_kv / 32)
    compute = _compute_bytes(facts, min(config.n_ubatch, config.n_batch, n_ctx), n_ctx, config.flash_attn_on)
    if not on_device or config.n_gpu_layers == 0:
        return int((weights + kv + compute) * (1 + MARGIN)) + RUNTIME_BYTES[("ram", "llamacpp")], "ram"
    n_layer = facts.n_layer or typical_n_layer(facts.n_params)
    share = 1.0 if config.n_gpu_layers < 0 or config.n_gpu_layers >= n_layer else config.n_gpu_layers / n_layer
    experts = expert_share(facts)
    if experts and re.search(r"exps[^=,]*=CPU", config.override_tensors, re.IGNORECASE):
        host_experts = experts
    else:
        host_experts = experts * min(config.n_cpu_moe, n_layer) / n_layer
    device_weights = weights * max(0.0, share - host_experts)
    device_kv = 0 if config.no_kv_offload else kv * share
    total = device_weights + device_kv + compute
    return int(total * (1 + MARGIN)) + RUNTIME_BYTES[("vram", "llamacpp")], "vram"
