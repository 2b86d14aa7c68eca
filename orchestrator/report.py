"""Printers: results and leaderboards as Markdown, CSV, JSON and JSONL, all from the schema's fields.

Field names follow llama-bench where the concept is the same (n_prompt, n_gen, n_depth,
avg_ts, stddev_ts, samples_ns); JSON and JSONL records carry llama-bench's whole field set
first (orchestrator/llamabench.py), so tools written for llama-bench output read ours.
"""

from __future__ import annotations

import csv
import io
import json
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
        # Quality columns only where some result measured it (issue 14), so plain sweeps read as before.
        graded = any(r.quality is not None for r in results)
        head = "| model | size | quant | technique | backend | test | t/s |"
        head += " KLD | top-1 | ppl |" if graded else ""
        head += " worker | status |"
        lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
        for r in results:
            size = f"{r.model_facts.size_bytes / 2**20:.1f} MiB" if r.model_facts.size_bytes else ""
            speed = ts_cell(r.avg_ts, r.stddev_ts) if r.status == "ok" else ""
            status = r.status if r.status == "ok" else f"failed: {r.error}"
            quality = ""
            if graded:
                q = r.quality
                quality = f" {q.kld_mean:.5f} | {q.top1_agreement:.4f} | {q.ppl:.3f} |" if q else " | | |"
            lines.append(f"| {r.model} | {size} | {r.quant} | {r.technique} | {r.backend} | {r.test} "
                         f"| {speed} |{quality} {r.worker} | {status} |")
        return "\n".join(lines) + "\n"
    raise ValueError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")


LEADER_COLUMNS = ("#", "tier", "model", "quant", "technique", "engine", "MiB", "prefill", "t/s", "decode", "t/s",
                  "KLD", "top-1")


def leader_cells(row: LeaderRow) -> list[str]:
    return [
        str(row.rank), f"{row.tier_gb} GB", row.model, row.quant, row.technique, row.backend,
        f"{row.size_bytes / 2**20:.1f}",
        row.pp_test, ts_cell(row.pp_ts, row.pp_stddev_ts),
        row.tg_test, ts_cell(row.tg_ts, row.tg_stddev_ts),
        "" if row.kld_mean is None else f"{row.kld_mean:.4f}",
        "" if row.top1_agreement is None else f"{row.top1_agreement:.3f}",
    ]


BREAK_EVEN_HEAD = ("target", "draft", "n_draft", "p_min", "ngram_max", "category", "jobs", "tok/s", "baseline tok/s",
                   "speedup", "acceptance", "accepted/pass", "draft ms", "verify ms", "lossless")


def break_even_rows(results: Iterable[Result]) -> list[list[str]]:
    """Speedup next to acceptance, grouped by pair x n_draft x p_min x category: which settings pay."""
    groups: dict[tuple, list[Result]] = {}
    for r in results:
        if r.status != "ok" or r.speculation is None:
            continue
        draft = f"{r.draft_model} {r.draft_quant}" if r.draft_model else "(lookup)"
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
