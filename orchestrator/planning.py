"""Planning a sweep: what expansion needs from the files and the farm, around the pure expansion.

Owns resolving each model entry to its identity (catalogue data, a derived name, a path
model's header and sha256, a hub model's files and range-read header (orchestrator/hub.py), a
model of the local Ollama store), checking ngram-cache's lookup cache files, refusing a draft
whose vocabulary differs from its target's, the memory estimate of every job (farm/memory.py),
and refusing thread counts no machine has and tensor splits over more GPUs than any worker has.
Knows the workers only through their announced Capabilities (passed in); reads no database.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from farm.contract import (
    Capabilities,
    Job,
    ModelSource,
    SourceFile,
    parse_override_tensors,
)
from farm.lookupcache import LookupCacheError, read_lookup_cache
from farm.memory import facts_for, job_active_bytes, job_need_bytes, tensor_table_for
from farm.modelfiles import (
    CATALOGUE,
    ModelError,
    catalogue_path,
    check_gguf,
    parse_moe_name,
    parse_mtp_name,
    read_facts,
    sha256_file,
    vocab_mismatch,
    vocab_texts,
)
from farm.sources import HubRef, OllamaRef, is_remote, ollama_model, parse_ref
from orchestrator.sweep import (
    MAX_JOBS,
    ModelIdentity,
    SweepError,
    SweepSpec,
    check_job_bound,
    expand,
)


def thread_refusal(n_threads: list[int], workers: dict[str, Capabilities]) -> str | None:
    """One line when a requested thread count exceeds the cores of every worker (with none known,
    this machine's): more threads than cores only time-slice them, a figure worth nothing."""
    cores = [w.hardware.n_cpu_cores for w in workers.values() if w.hardware.n_cpu_cores > 0]
    where = f"the largest registered worker has {max(cores)}" if cores else \
        f"no worker is known and this machine has {os.cpu_count() or 1}"
    limit = max(cores) if cores else (os.cpu_count() or 1)
    too_many = sorted(n for n in set(n_threads) if n > limit)
    if not too_many:
        return None
    return (f"n_threads {', '.join(map(str, too_many))} is above the cores of every machine ({where}); "
            f"use values up to {limit}, or 0 for the worker's own count")


def split_refusal(jobs: list[Job], workers: dict[str, Capabilities]) -> str | None:
    """One line when a llama.cpp job names more GPUs (tensor_split's shares, main_gpu's index)
    than any registered llama.cpp worker has (its announced n_gpus): no worker could run it, and
    each engine refuses such a config at load. With no llama.cpp worker known, nothing is refused:
    jobs wait for one that fits (routing sends them only to a worker with enough GPUs)."""
    known = {name: caps.hardware for name, caps in workers.items() if "llamacpp" in caps.engines}
    if not known:
        return None
    most = max(hw.n_gpus for hw in known.values())
    named = sorted({j.config.named_gpus_text(): j.config.n_gpus_named for j in jobs
                    if j.engine == "llamacpp" and j.config.n_gpus_named > most}.items(), key=lambda kv: (kv[1], kv[0]))
    if not named:
        return None
    shown = ", ".join(text for text, _ in named[:3])
    name, hw = max(known.items(), key=lambda kv: (kv[1].n_gpus, kv[0]))
    later = "--allow-unfit to queue these jobs for a worker with more GPUs that joins later"
    if not most:
        return (f"{shown} places the model on GPUs, but no registered llama.cpp worker has a GPU device "
                f"({name}: backends {hw.backends or 'not announced'}); leave tensor_split empty and main_gpu at 0, "
                f"or pass {later}")
    return (f"{shown} names more devices than the {most} GPUs of the largest registered llama.cpp worker "
            f"({name}: backends {hw.backends}); give at most {most} shares and a main_gpu below {most}, or pass {later}")


def plan(spec: SweepSpec, sweep_id: str | None = None, base_dir: Path = Path("."),
         models_dir: Path | None = None, max_jobs: int = MAX_JOBS) -> list[Job]:
    """The sweep's jobs, ready to record: models resolved, pairs checked, memory estimated, the
    bytes a decode step reads recorded (the collector's roofline check).

    The job-count bound is checked before any file is read, so an oversized sweep costs nothing.
    """
    check_job_bound(spec, max_jobs)
    spec = resolve_lookup_caches(spec, base_dir)
    identities = {e.name: model_identity(e.name, base_dir) for e in [*spec.draft_entries(), *spec.entries()]}
    jobs = expand(spec, identities, sweep_id=sweep_id, max_jobs=max_jobs)
    if "spec" in spec.techniques:
        drafts = [(identities[e.name].ref, None, "") for e in spec.draft_entries()]
        for e in spec.entries():
            check_pairs(identities[e.name].ref, drafts, models_dir)
    facts_cache: dict = {}
    remote = {i.ref: i.facts for i in identities.values() if i.facts is not None}
    check_levers(jobs, models_dir, facts_cache, remote)
    try:
        check_mtp_files(jobs, models_dir, remote)
        return [j.model_copy(update={"need_bytes": job_need_bytes(j, models_dir, facts_cache, remote),
                                     "active_bytes": job_active_bytes(j, models_dir, facts_cache, remote)})
                for j in jobs]
    except ModelError as exc:
        raise SweepError(f"cannot estimate the memory of a job: {exc}") from exc


def resolve_lookup_caches(spec: SweepSpec, base_dir: Path) -> SweepSpec:
    """The spec with its ngram-cache files as absolute paths, each read here once, so a missing
    file or one not in llama.cpp's n-gram cache format is refused at submit, not by every job."""
    if "lookup" not in spec.techniques or "ngram-cache" not in spec.lookup_mode:
        return spec
    update: dict[str, list[str]] = {}
    for name in ("lookup_cache_static", "lookup_cache_dynamic"):
        paths = []
        for ref in getattr(spec, name):
            path = Path(ref).expanduser() if ref else None
            if path is not None and not path.is_absolute():
                path = (base_dir / path).resolve()
            try:
                if path is not None:
                    read_lookup_cache(path)
            except OSError as exc:
                raise SweepError(f"{name} {ref[:120]!r}: cannot read the file ({exc.strerror}); give the path of a "
                                 "cache written by llama.cpp (llama-lookup-create, or llama-lookup's dynamic cache)"
                                 ) from exc
            except LookupCacheError as exc:
                raise SweepError(f"{name}: {exc}") from exc
            paths.append(str(path) if path is not None else "")
        update[name] = paths
    return spec.model_copy(update=update)


MTP_REFUSAL = "this file carries no MTP layers; use engine torch with trained heads, or an MTP build of the model"


def check_mtp_files(jobs: list[Job], models_dir: Path | None, remote: dict) -> None:
    """Refuse llama.cpp MTP jobs on a file whose header declares no NextN layers: the engine
    drafts with the file's own MTP layers, and there would be nothing to draft with."""
    from farm.memory import facts_for

    seen: dict[tuple[str, str], int] = {}
    for j in jobs:
        if j.technique != "mtp" or j.engine != "llamacpp":
            continue
        key = (j.model, j.quant)
        if key not in seen:
            seen[key] = facts_for(j.model, j.quant, models_dir, remote.get(j.model)).n_nextn_layers
        if seen[key] <= 0:
            raise SweepError(f"model {j.model} ({j.quant}), engine llamacpp, technique mtp: {MTP_REFUSAL}")


def model_identity(ref: str, base_dir: Path) -> ModelIdentity:
    """(model reference as jobs carry it, expected sha256, native quant) for a sweep entry; for a
    hub or Ollama model also its source (the files a worker fetches) and its header's facts."""
    try:
        parsed = parse_ref(ref)
        if isinstance(parsed, HubRef):
            from orchestrator import hub

            found = hub.resolve(ref, parsed)
            return ModelIdentity(found.ref, found.sha256, found.facts.file_type, found.source, found.facts)
        if isinstance(parsed, OllamaRef):
            return _ollama_identity(parsed)
    except ModelError as exc:
        raise SweepError(str(exc)) from exc
    if ref in CATALOGUE:
        entry = CATALOGUE[ref]
        return ModelIdentity(ref, entry.sha256, entry.quant)
    try:
        moe = parse_moe_name(ref)
    except ModelError as exc:
        raise SweepError(f"model {ref!r}: {exc}") from exc
    if moe is not None or parse_mtp_name(ref) is not None:
        # Derived on the worker from its catalogue parent, deterministically; the file is F32.
        return ModelIdentity(ref, None, "F32")
    try:
        path = Path(ref).expanduser()
        if not path.is_absolute():
            path = (base_dir / path).resolve()
        exists = path.exists()
        if exists:
            facts = read_facts(path)
            check_gguf(path)
            sha = sha256_file(path)
    except ModelError as exc:
        raise SweepError(f"model {ref!r}: {exc}") from exc
    except OSError as exc:
        # A name too long for the file system, a directory, no permission: one line, no traceback.
        raise SweepError(f"model {ref[:120]!r}: cannot read the file ({exc.strerror}); give a path to a "
                         ".gguf file or a catalogue name") from exc
    if not exists:
        known = ", ".join(sorted(CATALOGUE))
        raise SweepError(f"model {ref[:120]!r}: no such file ({str(path)[:200]}); give a path to a .gguf file or "
                         f"one of: {known}")
    return ModelIdentity(str(path), sha, facts.file_type)


def _ollama_identity(ref: OllamaRef) -> ModelIdentity:
    """A model pulled into this machine's Ollama store: the blob its manifest names, whose digest
    is its sha256 (so nothing is hashed). Workers find it in their own store by that digest."""
    found = ollama_model(ref)
    check_gguf(found.blob)
    facts = read_facts(found.blob)
    source = ModelSource(kind="ollama", repo=f"{ref.name}:{ref.tag}",
                         files=[SourceFile(name=found.blob.name, size_bytes=found.size_bytes, sha256=found.sha256)])
    return ModelIdentity(str(ref), found.sha256, facts.file_type, source, facts)


def _local_source(ref: str, models_dir: Path | None) -> Path | None:
    """The model's source file if this machine has it (the orchestrator need not); for an
    upcycled MoE, its parent's, whose vocabulary it keeps."""
    if is_remote(ref):
        return None  # the worker checks a remote pair, once it has both files
    moe = parse_moe_name(ref)
    if moe is not None:
        ref = moe[0]
    ref = parse_mtp_name(ref) or ref  # an MTP build keeps its parent's vocabulary too
    if ref in CATALOGUE:
        path = catalogue_path(ref, models_dir) if models_dir else None
        return path if path is not None and path.exists() else None
    return Path(ref)


def check_pairs(target: str, drafts: list[tuple[str, str | None, str]], models_dir: Path | None) -> None:
    """Refuse a draft with another vocabulary up front, from GGUF headers, where both files are here."""
    target_path = _local_source(target, models_dir)
    if target_path is None:
        return  # the worker checks the pair before measuring anyway
    target_vocab = None
    for ref in dict.fromkeys(ref for ref, _, _ in drafts):
        draft_path = _local_source(ref, models_dir)
        if draft_path is None:
            continue
        try:
            target_vocab = target_vocab or vocab_texts(target_path)
            problem = vocab_mismatch(target_vocab, vocab_texts(draft_path))
        except ModelError as exc:
            raise SweepError(f"draft {ref!r}: {exc}") from exc
        if problem:
            raise SweepError(f"draft {ref!r} cannot serve target {target!r}: {problem}")


def check_levers(jobs: list[Job], models_dir: Path | None, cache: dict, remote: dict) -> None:
    """Refuse, before anything is queued, the engine settings a model cannot take: n_cpu_moe on a
    dense model, an override_tensors pattern that matches none of its tensors (read from the file's
    tensor table where it is here; a worker refuses it otherwise)."""
    seen: set = set()
    for job in jobs:
        cfg = job.config
        key = (job.model, job.quant, cfg.n_cpu_moe > 0, cfg.override_tensors)
        if job.engine != "llamacpp" or key in seen or not (cfg.n_cpu_moe or cfg.override_tensors):
            continue
        seen.add(key)
        try:
            if (job.model, job.quant) not in cache:
                cache[(job.model, job.quant)] = facts_for(job.model, job.quant, models_dir, remote.get(job.model))
            facts = cache[(job.model, job.quant)]
            table = tensor_table_for(job.model, job.quant, models_dir) if cfg.override_tensors else None
        except ModelError as exc:
            raise SweepError(f"model {job.model!r}: {exc}") from exc
        if cfg.n_cpu_moe and facts.n_expert <= 1:
            raise SweepError(f"model {job.model!r} is dense (no experts), so n_cpu_moe {cfg.n_cpu_moe} has nothing "
                             "to keep in RAM; drop n_cpu_moe for it, or use n_gpu_layers / override_tensors")
        if table is not None:
            for pattern, _ in parse_override_tensors(cfg.override_tensors):
                if not any(re.search(pattern, name) for name, _ in table):
                    raise SweepError(f"override_tensors pattern {pattern!r} matches no tensor of {job.model!r} "
                                     f"(e.g. {table[0][0]}, {table[-1][0]}); fix the pattern")
