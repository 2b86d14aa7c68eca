"""Printers: results and leaderboards as Markdown, CSV, JSON and JSONL, all from the schema's fields.

Field names follow llama-bench where the concept is the same (n_prompt, n_gen, n_depth,
avg_ts, stddev_ts, samples_ns); JSON and JSONL records carry llama-bench's whole field set
first (orchestrator/llamabench.py), so tools written for llama-bench output read ours.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Iterable

from farm.contract import Result
from orchestrator.llamabench import to_record
from orchestrator.ranking import LeaderRow

FORMATS = ("md", "csv", "json", "jsonl")


def _flat(r: Result) -> dict:
    """One level of keys: nested models joined by '.', lists as JSON text."""
    out: dict = {}
    for key, value in r.model_dump(mode="json").items():
        if isinstance(value, dict):
            for sub, v in value.items():
                out[f"{key}.{sub}"] = json.dumps(v) if isinstance(v, (list, dict)) else v
        elif isinstance(value, list):
            out[key] = json.dumps(value)
        else:
            out[key] = value
    return out


def ts_cell(avg: float | None, std: float | None) -> str:
    return "" if avg is None else f"{avg:.2f} ± {std or 0.0:.2f}"


def render_results(results: Iterable[Result], fmt: str) -> str:
    results = list(results)
    if fmt == "json":
        return json.dumps([to_record(r) for r in results], indent=2)
    if fmt == "jsonl":
        return "".join(json.dumps(to_record(r)) + "\n" for r in results)
    if fmt == "csv":
        rows = [_flat(r) for r in results]
        fields = list(dict.fromkeys(k for row in rows for k in row))
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return buf.getvalue()
    if fmt == "md":
        return render_markdown(results)
    raise ValueError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")


# llama-bench's markdown printer: the fields it may show between backend and test, in its order, with
# its column names and its defaults; a field is shown when a result differs from the default or
# the results differ among themselves (n_threads: also on a CPU backend, where it sets the speed).
MD_FIELDS: tuple[tuple[str, str, object], ...] = (
    ("n_gpu_layers", "ngl", None), ("n_cpu_moe", "n_cpu_moe", 0), ("n_threads", "threads", None),
    ("cpu_mask", "cpu_mask", "0x0"), ("cpu_strict", "cpu_strict", False), ("poll", "poll", 50),
    ("n_batch", "n_batch", 2048), ("n_ubatch", "n_ubatch", 512), ("type_k", "type_k", "f16"),
    ("type_v", "type_v", "f16"), ("main_gpu", "main_gpu", 0), ("split_mode", "sm", "layer"),
    ("no_kv_offload", "nkvo", False), ("flash_attn", "fa", -1), ("devices", "dev", "auto"),
    ("tensor_split", "ts", "0.00"), ("tensor_buft_overrides", "ot", "none"), ("load_mode", "lm", "mmap"),
)
_NUMERIC = {"kld", "top1", "ppl", "n_gpu_layers", "n_cpu_moe", "n_threads", "poll", "n_batch", "n_ubatch", "main_gpu", "flash_attn",
            "cpu_strict", "no_kv_offload", "size", "params", "t/s"}


def _cpu_backend(backends: str) -> bool:
    return any(b in backends for b in ("CPU", "BLAS", "ZenDNN"))


def _md_value(value) -> str:
    return str(int(value)) if isinstance(value, bool) else str(value)


def render_markdown(results: list[Result]) -> str:
    """llama-bench's markdown table (model, size, params, backend, its varying or non-default
    parameters, test, t/s), printed from the llama-bench records the JSON formats write, then the
    file, worker, and where present technique and failure columns of ours."""
    records = [to_record(r) for r in results]
    columns: list[tuple[str, str]] = [("model", "model"), ("size", "size"), ("params", "params"),
                                      ("backend", "backend")]
    for name, title, default in MD_FIELDS:
        values = {_md_value(rec[name]) for rec in records}
        if name == "n_gpu_layers":
            show = not all(_cpu_backend(rec["backends"]) for rec in records)
        elif name == "n_threads":
            show = len(values) > 1 or any(_cpu_backend(rec["backends"]) for rec in records)
        else:
            show = len(values) > 1 or values - {_md_value(default)} != set()
        if show:
            columns.append((name, title))
    columns += [("test", "test"), ("t/s", "t/s")]
    # Quality columns only where some result measured it (issue 14), so plain sweeps read as before.
    if any(r.quality is not None for r in results):
        columns += [("kld", "KLD"), ("top1", "top-1"), ("ppl", "ppl")]
    columns += [("file", "file"), ("worker", "worker")]
    if any(r.technique != "baseline" for r in results):
        columns.append(("technique", "technique"))
    if any(r.status != "ok" for r in results):
        columns.append(("status", "status"))

    def cell(r: Result, rec: dict, name: str) -> str:
        if name == "model":
            return rec["model_type"] or r.model
        if name == "size":
            size = rec["model_size"]
            return f"{size / 2**20:.2f} MiB" if size < 2**30 else f"{size / 2**30:.2f} GiB"
        if name == "params":
            n = rec["model_n_params"]
            return f"{n / 1e6:.2f} M" if n < 1e9 else f"{n / 1e9:.2f} B"
        if name == "backend":
            return rec["backends"]
        if name == "test":
            return r.test
        if name == "t/s":
            return ts_cell(r.avg_ts, r.stddev_ts) if r.status == "ok" else ""
        if name in ("kld", "top1", "ppl"):
            q = r.quality
            return "" if q is None else {"kld": f"{q.kld_mean:.5f}", "top1": f"{q.top1_agreement:.4f}",
                                         "ppl": f"{q.ppl:.3f}"}[name]
        if name == "file":
            return r.model
        if name == "worker":
            return r.worker
        if name == "technique":
            return r.technique
        if name == "status":
            return r.status if r.status == "ok" else f"failed: {r.error}"
        return _md_value(rec[name])

    table = [[cell(r, rec, name) for name, _ in columns] for r, rec in zip(results, records)]
    widths = [max([len(title)] + [len(row[i]) for row in table]) for i, (_, title) in enumerate(columns)]
    right = [name in _NUMERIC for name, _ in columns]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right)) + " |"

    rule = "| " + " | ".join("-" * (w - 1) + (":" if r else "-") for w, r in zip(widths, right)) + " |"
    return "\n".join([line([t for _, t in columns]), rule, *(line(row) for row in table)]) + "\n"


LEADER_COLUMNS = ("#", "tier", "model", "quant", "technique", "engine", "settings", "hardware", "MiB", "prefill", "t/s",
                  "decode", "t/s", "KLD", "top-1")


def leader_cells(row: LeaderRow) -> list[str]:
    return [
        str(row.rank), f"{row.tier_gb} GB" + ("" if row.memory_estimated else " (measured)"), row.model, row.quant,
        row.technique, row.backend, row.settings or "defaults", row.hardware, f"{row.size_bytes / 2**20:.1f}",
        row.pp_test, ts_cell(row.pp_ts, row.pp_stddev_ts),
        row.tg_test, ts_cell(row.tg_ts, row.tg_stddev_ts),
        "" if row.kld_mean is None else f"{row.kld_mean:.4f}",
        "" if row.top1_agreement is None else f"{row.top1_agreement:.3f}",
    ]


BREAK_EVEN_HEAD = ("target", "draft", "n_draft", "p_min", "ngram_max", "category", "jobs", "tok/s", "baseline tok/s",
                   "speedup", "acceptance", "accepted/pass", "draft ms", "verify ms", "lossless")


def lookup_name(r: Result) -> str:
    """A lookup result's drafter, so each mode (and ngram-cache with each cache file) is its own row."""
    if r.lookup_mode == "longest":
        return "(lookup)"
    files = [f"{kind} {Path(p).name}" for kind, p in (("static", r.lookup_cache_static),
                                                      ("dynamic", r.lookup_cache_dynamic)) if p]
    return f"(lookup {r.lookup_mode}{', ' if files else ''}{', '.join(files)})"


def break_even_rows(results: Iterable[Result]) -> list[list[str]]:
    """Speedup next to acceptance, grouped by pair x n_draft x p_min x category: which settings pay."""
    groups: dict[tuple, list[Result]] = {}
    for r in results:
        if r.status != "ok" or r.speculation is None:
            continue
        draft = f"{r.draft_model} {r.draft_quant}" if r.draft_model else lookup_name(r)
        key = (f"{r.model} {r.quant}", draft, r.n_draft, r.p_min, r.ngram_max, r.prompt_category or "")
        groups.setdefault(key, []).append(r)
    rows = []
    for key, rs in sorted(groups.items(), key=lambda kv: tuple(str(k) for k in kv[0])):
        n = len(rs)
        s = [r.speculation for r in rs]
        drafted, accepted, passes = sum(x.n_drafted for x in s), sum(x.n_accepted for x in s), sum(x.n_passes for x in s)
        mismatches = [m for x in s for m in x.first_mismatch]
        n_lossy = sum(m is not None for m in mismatches)
        earliest = min((m for m in mismatches if m is not None), default=None)
        lossless = "yes" if not n_lossy else f"no: {n_lossy}/{len(mismatches)} prompts, first at token {earliest}"
        rows.append([
            key[0], key[1], str(key[2]), f"{key[3]:g}", str(key[4] or ""), key[5], str(n),
            f"{sum(r.avg_ts for r in rs) / n:.2f}", f"{sum(x.baseline_avg_ts for x in s) / n:.2f}",
            f"{sum(x.speedup for x in s) / n:.2f}x", f"{accepted / drafted if drafted else 0.0:.2f}",
            f"{accepted / passes if passes else 0.0:.2f}",
            f"{sum(x.draft_ns for x in s) / n / 1e6:.0f}", f"{sum(x.verify_ns for x in s) / n / 1e6:.0f}", lossless,
        ])
    return rows


def render_break_even(results: Iterable[Result]) -> str:
    rows = break_even_rows(results)
    lines = ["| " + " | ".join(BREAK_EVEN_HEAD) + " |", "|" + "---|" * len(BREAK_EVEN_HEAD)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
