"""llama-bench interchange: our Results as llama-bench JSON records, and llama-bench output as Results.

Field names are llama-bench's where the concept is the same (`model_type`, `avg_ts`,
`samples_ns`, `build_commit`, ...), so tools written for llama-bench read our exports and
community numbers join our database. Parsing is pure; `import_text` stores through the collector's
path (`store_import`, a trusted import) in a session the caller opens. It knows nothing of
workers or brokers.
"""

from __future__ import annotations

import hashlib
import json
import re
import statistics
import uuid
from datetime import datetime

from sqlalchemy.orm import Session

from farm.contract import (
    EngineConfig,
    Hardware,
    Job,
    ModelFacts,
    Result,
    format_test_name,
    tokens_per_run,
    utc_now,
)
from farm.stats import sample_stats, summarize, tok_s
from orchestrator.db import SweepRow

# Namespace for ids of imported rows: the same line imported twice gets the same job id.
IMPORT_NAMESPACE = uuid.UUID("6f1d0c52-4a3e-4d0b-9d7e-1b7f3c9a2e51")


class LlamaBenchError(ValueError):
    """A llama-bench file cannot be imported; the message names the line and the problem."""


def to_record(r: Result) -> dict:
    """A Result under llama-bench's field names first, then every field of ours that is not one of them."""
    rates = [tok_s(tokens_per_run(_kind(r.n_prompt, r.n_gen), r.n_prompt, r.n_gen), ns) for ns in r.samples_ns]
    record = {
        "build_commit": r.versions.get("llama_cpp_build_commit", r.versions.get("llama_cpp", "")),
        "build_number": int(r.versions.get("llama_cpp_build_number", 0) or 0),
        "cpu_info": r.hardware.cpu,
        "gpu_info": r.hardware.gpu,
        "model_filename": r.model,
        "model_type": r.model_facts.model_type,
        "model_size": r.model_facts.size_bytes,
        "model_n_params": r.model_facts.n_params,
        "n_batch": r.config.n_batch,
        "n_ubatch": r.config.n_ubatch,
        "n_threads": r.conditions.n_threads or r.config.n_threads,
        "type_k": r.conditions.kv_type,
        "type_v": r.conditions.kv_type,
        "n_gpu_layers": r.config.n_gpu_layers,
        "flash_attn": {"on": 1, "off": 0, "auto": -1}[r.config.flash_attn],
        "n_prompt": r.n_prompt,
        "n_gen": r.n_gen,
        "n_depth": r.n_depth,
        "test_time": r.started_at.isoformat(),
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
    job_id = str(uuid.uuid5(IMPORT_NAMESPACE, machine + "\n" + json.dumps(record, sort_keys=True)))
    model = str(record.get("model_filename") or record.get("model_type") or "unknown")
    quant = quant_from_model_type(str(record.get("model_type", "")))
    fa = record.get("flash_attn", False)
    config = EngineConfig(
        n_threads=max(0, int(record.get("n_threads", 0))), n_batch=max(1, int(record.get("n_batch", 2048))),
        n_ubatch=max(1, int(record.get("n_ubatch", 512))), n_gpu_layers=max(-1, int(record.get("n_gpu_layers", 0))),
        flash_attn=fa if isinstance(fa, bool) or fa in ("on", "off", "auto") else int(fa),
    )
    try:
        when = datetime.fromisoformat(str(record["test_time"]).replace("Z", "+00:00"))
    except (KeyError, ValueError):
        when = utc_now()
    result = Result(
        job_id=job_id, sweep_id=sweep_id, status="ok", worker=machine, model=model, quant=quant,
        test=format_test_name(kind, n_prompt, n_gen, n_depth), n_prompt=n_prompt, n_gen=n_gen, n_depth=n_depth,
        repetitions=len(samples_ns), samples_ns=samples_ns, avg_ts=avg, stddev_ts=std,
        stats=sample_stats(n_tokens, samples_ns), decode_ts=avg if kind == "tg" else 0.0,
        model_facts=ModelFacts(model_type=str(record.get("model_type", "")), size_bytes=int(record.get("model_size", 0)),
                               n_params=int(record.get("model_n_params", 0)), file_type=quant),
        config=config,
        hardware=Hardware(cpu=str(record.get("cpu_info", "")), gpu=str(record.get("gpu_info", ""))),
        versions={"imported_from": "llama-bench", "llama_cpp_build_commit": str(record.get("build_commit", "")),
                  "llama_cpp_build_number": str(record.get("build_number", ""))},
        started_at=when, finished_at=when,
    )
    spec = {"schema_version": 1, "job_id": job_id, "sweep_id": sweep_id, "index": 0, "model": model,
            "model_sha256": None, "quant": quant, "technique": "baseline", "engine": "llamacpp", "kind": kind,
            "n_prompt": n_prompt, "n_gen": n_gen, "n_depth": n_depth, "repetitions": len(samples_ns),
            "n_warmup": 0, "prompt_source": "random", "seed": 0, "config": config.model_dump()}
    return result, spec


def import_text(session: Session, text: str, machine: str, source_name: str) -> tuple[int, int]:
    """Store every record of a llama-bench file as results of `machine`; returns (stored, already present).

    Each goes through the collector's storing path as a trusted import (validated against its
    job, stored once per job id). Every line is checked before the caller commits, so a broken
    file stores nothing.
    """
    if not machine.strip():
        raise LlamaBenchError("--machine must name the machine the numbers come from")
    from orchestrator.collector import TrustedImport, store_import

    digest = hashlib.sha256(text.encode()).hexdigest()
    sweep_id = str(uuid.uuid5(IMPORT_NAMESPACE, f"sweep\n{machine}\n{digest}"))
    records = parse(text)
    converted = [(line, *to_result(rec, line, machine, sweep_id)) for line, rec in records]
    if not converted:
        raise LlamaBenchError(f"{source_name} holds no llama-bench records")
    if session.get(SweepRow, sweep_id) is None:
        session.add(SweepRow(id=sweep_id, name=f"import {machine}: {source_name}"[:200],
                             spec={"imported_from": "llama-bench", "file": source_name, "machine": machine,
                                   "sha256": digest}, n_jobs=len(converted)))
        session.flush()
    source = TrustedImport("llama-bench", source_name, machine)
    stored = present = 0
    for index, (line, result, spec) in enumerate(converted):
        outcome = store_import(session, result, Job.model_validate({**spec, "index": index}), source)
        if outcome.action == "rejected":
            # Raised inside the caller's transaction: nothing of the file is committed.
            raise LlamaBenchError(f"line {line}: {outcome.reason}")
        stored += outcome.action == "stored"
        present += outcome.action == "duplicate"
    return stored, present
