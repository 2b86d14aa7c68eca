"""llama-bench interchange: our Results as llama-bench JSON records, and llama-bench output as Results.

Field names are llama-bench's where the concept is the same (`model_type`, `avg_ts`,
`samples_ns`, `build_commit`, ...), so tools written for llama-bench read our exports and
community numbers join our database. Parsing is pure; `import_text` stores through the collector's
path (`store_import`, a trusted import) in a session the caller opens, after `local_identity`
gives a record whose model file is on this machine that file's sha256 (so its rows join the
farm's own rows of the file). It knows nothing of workers or brokers.
"""

from __future__ import annotations

import hashlib
import json
import re
import statistics
import uuid
from datetime import datetime
from pathlib import Path

from sqlalchemy.orm import Session

from farm.contract import (
    Conditions,
    EngineConfig,
    Hardware,
    Job,
    ModelFacts,
    Result,
    format_test_name,
    tokens_per_run,
    utc_now,
)
from farm.modelfiles import ModelError, model_sha256, read_facts
from farm.stats import sample_stats, summarize, tok_s
from orchestrator.db import SweepRow

# Namespace for ids of imported rows: the same line imported twice gets the same job id.
IMPORT_NAMESPACE = uuid.UUID("6f1d0c52-4a3e-4d0b-9d7e-1b7f3c9a2e51")


class LlamaBenchError(ValueError):
    """A llama-bench file cannot be imported; the message names the line and the problem."""


# llama-bench's JSON fields in its own order (tools/llama-bench get_fields(), with the raw samples
# its JSON printer adds). `use_mmap` is the older builds' spelling of `load_mode`; both are written.
FIELDS: tuple[str, ...] = (
    "build_commit", "build_number", "cpu_info", "gpu_info", "backends", "model_filename", "model_type",
    "model_size", "model_n_params", "n_batch", "n_ubatch", "n_threads", "cpu_mask", "cpu_strict", "poll",
    "type_k", "type_v", "n_gpu_layers", "n_cpu_moe", "split_mode", "main_gpu", "no_kv_offload", "flash_attn",
    "devices", "tensor_split", "tensor_buft_overrides", "load_mode", "use_mmap", "lazy_mode", "embeddings",
    "no_op_offload", "no_host", "repack", "fit_target", "fit_min_ctx", "n_prompt", "n_gen", "n_depth",
    "test_time", "avg_ns", "stddev_ns", "avg_ts", "stddev_ts", "samples_ns", "samples_ts",
)
# llama-bench fields EngineConfig has no place for: kept in conditions.flags under their own
# names on import, so an export gives them back unchanged.
PASSTHROUGH: tuple[str, ...] = ("devices", "lazy_mode", "embeddings", "no_op_offload", "no_host", "repack",
                                "fit_target", "fit_min_ctx")
_FA_INT = {"on": 1, "off": 0, "auto": -1}


def tensor_split_text(split: tuple[float, ...]) -> str:
    """llama-bench's spelling: shares to two decimals joined by '/', "0.00" for an even split."""
    return "/".join(f"{x:.2f}" for x in split) if split else "0.00"


def parse_tensor_split(text: str) -> tuple[float, ...]:
    shares = tuple(float(x) for x in str(text).split("/") if x.strip())
    return () if not any(shares) else shares


def overrides_text(override_tensors: str) -> str:
    """Our -ot spelling (comma-separated, as llama.cpp's -ot parses) as llama-bench prints it."""
    parts = [p.strip() for p in override_tensors.split(",") if p.strip()]
    return ";".join(parts) if parts else "none"


def parse_overrides(text: str) -> str:
    parts = [p.strip() for p in str(text).split(";") if p.strip() and p.strip() != "none"]
    return ",".join(parts)


def to_record(r: Result) -> dict:
    """A Result under llama-bench's field names first, then every field of ours that is not one of them."""
    rates = [tok_s(tokens_per_run(_kind(r.n_prompt, r.n_gen), r.n_prompt, r.n_gen), ns) for ns in r.samples_ns]
    c, flags = r.config, r.conditions.flags
    record = {
        "build_commit": r.versions.get("llama_cpp_build_commit", r.versions.get("llama_cpp", "")),
        "build_number": int(r.versions.get("llama_cpp_build_number", 0) or 0),
        "cpu_info": r.hardware.cpu,
        "gpu_info": r.hardware.gpu,
        "backends": r.hardware.backends or ("CUDA" if r.hardware.gpu and c.n_gpu_layers else "CPU"),
        "model_filename": r.model,
        "model_type": r.model_facts.model_type,
        "model_size": r.model_facts.size_bytes,
        "model_n_params": r.model_facts.n_params,
        "n_batch": c.n_batch,
        "n_ubatch": c.n_ubatch,
        "n_threads": r.conditions.n_threads or c.n_threads,
        "cpu_mask": c.cpu_mask,
        "cpu_strict": c.cpu_strict,
        "poll": c.poll,
        "type_k": c.type_k,
        "type_v": c.type_v,
        "n_gpu_layers": c.n_gpu_layers,
        "n_cpu_moe": c.n_cpu_moe,
        "split_mode": c.split_mode,
        "main_gpu": c.main_gpu,
        "no_kv_offload": c.no_kv_offload,
        "flash_attn": _FA_INT[c.flash_attn],
        "devices": flags.get("devices", "auto"),
        "tensor_split": tensor_split_text(c.tensor_split),
        "tensor_buft_overrides": overrides_text(c.override_tensors),
        "load_mode": flags.get("load_mode", "mmap" if c.use_mmap else "none"),
        "use_mmap": c.use_mmap,
        "lazy_mode": flags.get("lazy_mode", "off"),
        "embeddings": flags.get("embeddings", False),
        "no_op_offload": flags.get("no_op_offload", 0),
        "no_host": flags.get("no_host", False),
        "repack": flags.get("repack", True),
        "fit_target": flags.get("fit_target", 0),
        "fit_min_ctx": flags.get("fit_min_ctx", 0),
        "n_prompt": r.n_prompt,
        "n_gen": r.n_gen,
        "n_depth": r.n_depth,
        "test_time": r.started_at.isoformat().replace("+00:00", "Z"),
        "avg_ns": int(statistics.fmean(r.samples_ns)) if r.samples_ns else 0,
        "stddev_ns": int(statistics.stdev(r.samples_ns)) if len(r.samples_ns) > 1 else 0,
        "avg_ts": r.avg_ts,
        "stddev_ts": r.stddev_ts,
        "samples_ns": list(r.samples_ns),
        "samples_ts": rates,
    }
    for key, value in r.model_dump(mode="json").items():
        record.setdefault(key, value)
    return record


def _kind(n_prompt: int, n_gen: int) -> str:
    if n_prompt and n_gen:
        return "pg"
    return "pp" if n_prompt else "tg"


_TYPE = re.compile(r"\b(I?Q\d\w*|[BF]F?\d+|F\d+)(?: - (Small|Medium|Large))?")


def quant_from_model_type(model_type: str) -> str:
    """`llama 7B Q4_K - Medium` -> `Q4_K_M`: llama.cpp's description back to its --type spelling."""
    for m in _TYPE.finditer(model_type):
        name = m[1]
        if not re.fullmatch(r"\d+(\.\d+)?[BMK]", name):
            return f"{name}_{m[2][0]}" if m[2] else name
    return "unknown"


def parse(text: str) -> list[tuple[int, dict]]:
    """(line number, record) for a llama-bench JSON array or JSONL file; raises on a broken line."""
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise LlamaBenchError(f"line {exc.lineno}: not valid JSON ({exc.msg}); fix or remove that record") from exc
        # Records of an array are numbered by the line they start on, for error messages.
        starts = [i + 1 for i, line in enumerate(text.splitlines()) if line.strip().startswith("{")]
        lines = starts if len(starts) == len(data) else list(range(1, len(data) + 1))
        return list(zip(lines, data))
    records = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((n, json.loads(line)))
        except json.JSONDecodeError as exc:
            raise LlamaBenchError(f"line {n}: not valid JSON ({exc.msg}); fix or remove that line") from exc
    return records


def machine_of(record: dict) -> str:
    """The machine a record names: its CPU and GPU (one name where they are the same chip, as on Apple)."""
    names = [str(record.get(k) or "").strip() for k in ("cpu_info", "gpu_info")]
    return " + ".join(dict.fromkeys(n for n in names if n))


def _flag(value) -> bool:
    return value if isinstance(value, bool) else bool(int(value))


def _config(record: dict) -> EngineConfig:
    """EngineConfig from llama-bench's fields; what a record leaves out takes llama-bench's default."""
    use_mmap = record.get("use_mmap")
    if use_mmap is None:
        use_mmap = record.get("load_mode", "mmap") != "none"
    return EngineConfig(
        n_threads=max(0, int(record.get("n_threads", 0))), n_batch=max(1, int(record.get("n_batch", 2048))),
        n_ubatch=max(1, int(record.get("n_ubatch", 512))), n_gpu_layers=max(-1, int(record.get("n_gpu_layers", 0))),
        flash_attn=record.get("flash_attn", "off"),
        type_k=str(record.get("type_k", "f16")), type_v=str(record.get("type_v", "f16")),
        n_cpu_moe=int(record.get("n_cpu_moe", 0)),
        override_tensors=parse_overrides(record.get("tensor_buft_overrides", "none")),
        split_mode=str(record.get("split_mode", "layer")), main_gpu=int(record.get("main_gpu", 0)),
        tensor_split=parse_tensor_split(record.get("tensor_split", "0.00")),
        no_kv_offload=_flag(record.get("no_kv_offload", False)), use_mmap=_flag(use_mmap),
        cpu_mask=str(record.get("cpu_mask", "0x0")), cpu_strict=_flag(record.get("cpu_strict", False)),
        poll=int(record.get("poll", 50)),
    )


def _first_error(exc: Exception) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        e = errors()[0]
        return f"{'.'.join(map(str, e['loc']))}: {e['msg']}"
    return str(exc)


_MOE_SIZE = re.compile(r"\b(\d+(?:\.\d+)?)B\.A(\d+(?:\.\d+)?)B\b")


def _facts(record: dict, model_type: str, quant: str) -> ModelFacts:
    """What a record says of its model; an MoE's active share from llama.cpp's `30B.A3B` size label."""
    n_params = int(record.get("model_n_params", 0))
    active = 0
    if (m := _MOE_SIZE.search(model_type)) and float(m[1]) > 0:
        active = int(n_params * float(m[2]) / float(m[1]))
    return ModelFacts(model_type=model_type, size_bytes=int(record.get("model_size", 0)), n_params=n_params,
                      n_params_active=active, file_type=quant)


def to_result(record: dict, line: int, machine: str, sweep_id: str) -> tuple[Result, dict]:
    """(Result, job spec) for one llama-bench record; raises LlamaBenchError naming the line."""
    if not isinstance(record, dict):
        raise LlamaBenchError(f"line {line}: a llama-bench record is a JSON object")
    try:
        n_prompt, n_gen = int(record["n_prompt"]), int(record["n_gen"])
        n_depth = int(record.get("n_depth", 0))
        samples_ns = [int(ns) for ns in record["samples_ns"]]
        avg_ts = float(record["avg_ts"])
    except KeyError as exc:
        raise LlamaBenchError(f"line {line}: missing field {exc.args[0]!r}; is this llama-bench -o json/jsonl output?") from exc
    except (TypeError, ValueError) as exc:
        raise LlamaBenchError(f"line {line}: a field has the wrong type ({exc})") from exc
    if n_prompt < 0 or n_gen < 0 or n_depth < 0 or (n_prompt == 0 and n_gen == 0):
        raise LlamaBenchError(f"line {line}: n_prompt and n_gen must be >= 0 and not both 0")
    if not samples_ns or any(ns <= 0 for ns in samples_ns):
        raise LlamaBenchError(f"line {line}: samples_ns must be a non-empty list of positive durations")
    kind = _kind(n_prompt, n_gen)
    n_tokens = tokens_per_run(kind, n_prompt, n_gen)
    avg, std = summarize(n_tokens, samples_ns)
    if abs(avg - avg_ts) > 0.01 * avg:
        raise LlamaBenchError(f"line {line}: avg_ts {avg_ts:.4g} does not match samples_ns ({avg:.4g} t/s)")
    machine = machine or machine_of(record)
    if not machine:
        raise LlamaBenchError(f"line {line}: cpu_info and gpu_info are empty; name the machine with --machine NAME")
    job_id = str(uuid.uuid5(IMPORT_NAMESPACE, machine + "\n" + json.dumps(record, sort_keys=True)))
    model = str(record.get("model_filename") or record.get("model_type") or "unknown")
    model_type = str(record.get("model_type", ""))
    quant = quant_from_model_type(model_type)
    try:
        config = _config(record)
    except (TypeError, ValueError) as exc:
        raise LlamaBenchError(f"line {line}: a setting is out of range ({_first_error(exc)})") from exc
    flags = {k: record[k] for k in PASSTHROUGH if isinstance(record.get(k), (str, int, float, bool))}
    load_mode = record.get("load_mode")
    if isinstance(load_mode, str) and load_mode not in ("mmap", "none"):
        flags["load_mode"] = load_mode  # auto, mlock, dio: kept as written, use_mmap says what it maps
    try:
        when = datetime.fromisoformat(str(record["test_time"]).replace("Z", "+00:00"))
    except (KeyError, ValueError):
        when = utc_now()
    result = Result(
        job_id=job_id, sweep_id=sweep_id, status="ok", worker=machine, model=model, quant=quant,
        test=format_test_name(kind, n_prompt, n_gen, n_depth), n_prompt=n_prompt, n_gen=n_gen, n_depth=n_depth,
        repetitions=len(samples_ns), samples_ns=samples_ns, avg_ts=avg, stddev_ts=std,
        stats=sample_stats(n_tokens, samples_ns), decode_ts=avg if kind == "tg" else 0.0,
        model_facts=_facts(record, model_type, quant),
        config=config, conditions=Conditions(n_threads=config.n_threads, kv_type=config.type_k, flags=flags),
        hardware=Hardware(cpu=str(record.get("cpu_info", "")), gpu=str(record.get("gpu_info", "")),
                          backends=str(record.get("backends", ""))),
        versions={"imported_from": "llama-bench", "llama_cpp_build_commit": str(record.get("build_commit", "")),
                  "llama_cpp_build_number": str(record.get("build_number", ""))},
        started_at=when, finished_at=when,
    )
    spec = {"schema_version": 1, "job_id": job_id, "sweep_id": sweep_id, "index": 0, "model": model,
            "model_sha256": None, "quant": quant, "technique": "baseline", "engine": "llamacpp", "kind": kind,
            "n_prompt": n_prompt, "n_gen": n_gen, "n_depth": n_depth, "repetitions": len(samples_ns),
            "n_warmup": 0, "prompt_source": "random", "seed": 0, "config": config.model_dump()}
    return result, spec


def header_disagreement(record: dict, facts: ModelFacts) -> str | None:
    """Where a record and the GGUF header of the file it names disagree; None when they agree on
    everything llama-bench records of the model. llama-bench's model_type guesses the size label
    from the layer count (SmolLM2 135M reads "llama 256M Q4_1"), so of it only the architecture and
    the file type are compared; its model_size is llama_model_size, the tensor bytes (weight_bytes)."""
    model_type = str(record.get("model_type", ""))
    arch = model_type.split(" ", 1)[0]
    checks = (("architecture", arch, facts.arch), ("file type", quant_from_model_type(model_type), facts.file_type),
              ("model_size", int(record.get("model_size", -1)), facts.weight_bytes),
              ("model_n_params", int(record.get("model_n_params", -1)), facts.n_params))
    for what, theirs, ours in checks:
        if theirs != ours:
            return f"{what} {theirs!r} in the record, {ours!r} in the file"
    return None


def local_identity(record: dict, cache: dict[str, tuple[str, ModelFacts] | None] | None = None
                   ) -> tuple[str, ModelFacts] | None:
    """The sha256 identity and header facts (farm.modelfiles.model_sha256, as workers compute it) of the model file a
    record names, where model_filename is an absolute path to a file here whose header agrees with
    the record (the facts give the import's memory estimate the file's real layer count and KV
    bytes per token, which a llama-bench record does not carry); None otherwise (a relative name, another machine's path, another file under the
    same name), and the import keeps llama-bench's name + type + size + params identity.
    `cache`: answers by path, so a file's records are hashed and compared once per import."""
    name = str(record.get("model_filename") or "")
    path = Path(name)
    if not path.is_absolute():
        return None
    key = f"{name}\n{record.get('model_type')}\n{record.get('model_size')}\n{record.get('model_n_params')}"
    if cache is not None and key in cache:
        return cache[key]
    found = None
    try:
        if path.is_file():
            facts = read_facts(path)
            if header_disagreement(record, facts) is None:
                found = (model_sha256(path), facts)
    except (ModelError, OSError, TypeError, ValueError):
        found = None  # unreadable or not a model: the record's own identity stands
    if cache is not None:
        cache[key] = found
    return found


def import_text(session: Session, text: str, machine: str | None, source_name: str) -> tuple[int, int]:
    """Store every record of a llama-bench file as results of `machine`; returns (stored, already present).

    Without `machine`, each record's own cpu_info/gpu_info name it (machine_of), so one file
    from several boxes stays several machines. A record whose model file is here, by the absolute
    path it names and with a header that agrees, takes that file's sha256 (local_identity). Each
    goes through the collector's storing path as a trusted import (validated against its job,
    stored once per job id). Every line is checked before the caller commits, so a broken file
    stores nothing.
    """
    if machine is not None and not machine.strip():
        raise LlamaBenchError("--machine must name the machine the numbers come from (or leave it out)")
    from orchestrator.collector import TrustedImport, store_import

    digest = hashlib.sha256(text.encode()).hexdigest()
    sweep_id = str(uuid.uuid5(IMPORT_NAMESPACE, f"sweep\n{machine or ''}\n{digest}"))
    records = parse(text)
    converted = [(line, *to_result(rec, line, machine or "", sweep_id)) for line, rec in records]
    hashed: dict[str, tuple[str, ModelFacts] | None] = {}
    for i, (line, result, spec) in enumerate(converted):
        if found := local_identity(records[i][1], hashed):
            sha, facts = found
            # llama-bench's own description stays (the round trip prints it back as it came).
            facts = facts.model_copy(update={"model_type": result.model_facts.model_type,
                                             "size_bytes": result.model_facts.size_bytes})
            converted[i] = (line, result.model_copy(update={"model_sha256": sha, "source_sha256": sha,
                                                            "model_facts": facts}),
                            {**spec, "model_sha256": sha})
    if not converted:
        raise LlamaBenchError(f"{source_name} holds no llama-bench records")
    machines = sorted({result.worker for _, result, _ in converted})
    if session.get(SweepRow, sweep_id) is None:
        label = machine or ", ".join(machines)
        session.add(SweepRow(id=sweep_id, name=f"import {label}: {source_name}"[:200],
                             spec={"imported_from": "llama-bench", "file": source_name, "machine": label,
                                   "sha256": digest}, n_jobs=len(converted)))
        session.flush()
    stored = present = 0
    for index, (line, result, spec) in enumerate(converted):
        source = TrustedImport("llama-bench", source_name, result.worker)
        outcome = store_import(session, result, Job.model_validate({**spec, "index": index}), source)
        if outcome.action == "rejected":
            # Raised inside the caller's transaction: nothing of the file is committed.
            raise LlamaBenchError(f"line {line}: {outcome.reason}")
        stored += outcome.action == "stored"
        present += outcome.action == "duplicate"
    return stored, present
