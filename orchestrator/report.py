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

from orchestrator.llamabench import to_record
from orchestrator.ranking import LeaderRow
from worker.contract import Result

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
        head = "| model | size | quant | technique | backend | test | t/s | worker | status |"
        lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
        for r in results:
            size = f"{r.model_facts.size_bytes / 2**20:.1f} MiB" if r.model_facts.size_bytes else ""
            speed = ts_cell(r.avg_ts, r.stddev_ts) if r.status == "ok" else ""
            status = r.status if r.status == "ok" else f"failed: {r.error}"
            lines.append(f"| {r.model} | {size} | {r.quant} | {r.technique} | {r.backend} | {r.test} "
                         f"| {speed} | {r.worker} | {status} |")
        return "\n".join(lines) + "\n"
    raise ValueError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")


LEADER_COLUMNS = ("#", "tier", "model", "quant", "technique", "engine", "MiB", "prefill", "t/s", "decode", "t/s")


def leader_cells(row: LeaderRow) -> list[str]:
    return [
        str(row.rank), f"{row.tier_gb} GB", row.model, row.quant, row.technique, row.backend,
        f"{row.size_bytes / 2**20:.1f}",
        row.pp_test, ts_cell(row.pp_ts, row.pp_stddev_ts),
        row.tg_test, ts_cell(row.tg_ts, row.tg_stddev_ts),
    ]
