"""Every query the dashboard makes, cached with a time-to-live, returned as DataFrames.

Pages never write SQL; they call these. The database is opened read-only (SQLite `mode=ro`;
PostgreSQL sessions set to READ ONLY on connect), and the ranking logic is the orchestrator's,
shared with the CLI.

With 100,000 results a page cannot load every stored Result: queries group by the results
table's key columns in SQL and pull the few JSON fields they need as aggregates; only the
detail page reads one whole Result. Figures outside the key columns (TTFT, peak memory,
roofline, acceptance, ...) are read by JSON path into `farm.contract.Result`; every path is
listed in JSON_PATHS, which a unit test checks against the schema. A Result stored before a
field existed reads NULL there, and the pages show an empty state instead of failing.
"""

from __future__ import annotations

import json
import math
from typing import Callable

import pandas as pd
import streamlit as st
from sqlalchemy import case, create_engine, event, func, inspect, select, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import aliased

from farm.settings import load_settings
from orchestrator.db import JobRow, ResultRow, SweepRow
from orchestrator.ranking import Filters, Measurement, rank

TTL_S = 30
R = ResultRow
NOT_YET = ("no such table", "does not exist", "unable to open")


def open_readonly(url: str) -> Engine:
    """An engine that cannot change the database, whatever a page does."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database:
        return create_engine(f"sqlite:///file:{parsed.database}?mode=ro&uri=true")
    engine = create_engine(parsed, pool_pre_ping=True)
    if parsed.get_backend_name() == "postgresql":
        @event.listens_for(engine, "connect")
        def _read_only(dbapi_conn, _record):
            cur = dbapi_conn.cursor()
            cur.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
            cur.close()
            dbapi_conn.commit()
    return engine


@st.cache_resource
def engine() -> Engine:
    return open_readonly(load_settings().effective_database_url)


def _frame(build: Callable[[Engine], pd.DataFrame]) -> pd.DataFrame:
    """Run a query; a database not created yet reads as empty, so pages show what to run."""
    try:
        return build(engine())
    except Exception as exc:
        if any(s in str(exc) for s in NOT_YET):
            return pd.DataFrame()
        raise


def _j(*path: str):
    """A number inside the stored Result; NULL where this Result predates the field."""
    return R.result[path if len(path) > 1 else path[0]].as_float()


def _js(*path: str):
    return R.result[path if len(path) > 1 else path[0]].as_string()


def _packed(eng: Engine, column, paths: list[str]):
    """Several fields of a stored Result as one JSON array.

    SQLite 3.40 re-parses the whole document for every json_extract, so one call with many
    paths costs one parse instead of many; PostgreSQL builds the array from its own operators.
    """
    if eng.dialect.name == "sqlite":
        return func.json_extract(column, *[f"$.{p}" for p in paths])
    return func.json_build_array(*[column[tuple(p.split("."))] if "." in p else column[p] for p in paths])


def _unpack(frame: pd.DataFrame, column: str, paths: list[str]) -> pd.DataFrame:
    """Spread a _packed column into one column per path (named after its last part)."""
    names = [p.rsplit(".", 1)[-1] for p in paths]
    empty = [None] * len(paths)
    values = [json.loads(v) if isinstance(v, str) else (v or empty) for v in frame[column]]
    spread = pd.DataFrame(values, columns=names, index=frame.index)
    return pd.concat([frame.drop(columns=[column]), spread], axis=1)


def _read(eng: Engine, query) -> pd.DataFrame:
    """Rows straight from the driver's cursor into a DataFrame.

    SQLAlchemy's per-row processing costs as much as the query itself on ten thousand rows;
    the values read here are numbers, strings and timestamps, which need none of it.
    """
    with eng.connect() as conn:
        result = conn.execute(query)
        columns = list(result.keys())
        return pd.DataFrame.from_records(result.cursor.fetchall(), columns=columns)


# Every path into a stored Result that a query reads, dotted (`stats.median_ts`); a column is
# named after the path's last part.
MEASUREMENT_PATHS = ("conditions.peak_vram_bytes", "conditions.peak_rss_bytes", "ttft_ns", "roofline_pct",
                     "roofline_tok_s", "stats.median_ts", "stats.noisy")
FACTS = ("size_bytes", "n_params", "n_params_active", "active_bytes", "n_expert", "n_expert_used")
FACT_PATHS = ("model_facts.model_type",) + tuple(f"model_facts.{f}" for f in FACTS)
HARDWARE_PATHS = ("hardware.gpu", "hardware.cpu", "hardware.n_cpu_cores", "hardware.vram_bytes",
                  "hardware.bandwidth_gbps")
TECHNIQUE_PATHS = ("prompt_category", "n_draft", "p_min", "ngram_max", "draft_model", "draft_quant",
                   "speculation.speedup", "speculation.acceptance_rate", "speculation.mean_accepted_per_pass",
                   "speculation.lossless", "speculation.first_mismatch")
JSON_PATHS = MEASUREMENT_PATHS + FACT_PATHS + HARDWARE_PATHS + TECHNIQUE_PATHS


def _path(dotted: str) -> tuple[str, ...]:
    return tuple(dotted.split("."))


KEY = (R.model, R.model_sha256, R.quant, R.technique, R.backend, R.worker, R.test, R.n_prompt, R.n_gen, R.n_depth)


@st.cache_data(ttl=TTL_S, show_spinner=False)
def measurements() -> pd.DataFrame:
    """One row per (model file, quant, technique, engine, worker, test), its ok runs pooled.

    tok/s statistics pool every run from key columns; the JSON-only figures (peak memory, TTFT,
    roofline) come from one representative run per row, so 100,000 results cost about as many
    JSON parses as there are rows here. Never touch `created_at` in these: SQLite stores it
    after the Result JSON, and reading it walks every overflow page.
    """
    stats = (
        select(*KEY, func.count().label("n_runs"), func.avg(R.avg_ts).label("avg_ts"),
               func.avg(R.avg_ts * R.avg_ts).label("avg_sq_ts"), func.avg(R.stddev_ts * R.stddev_ts).label("avg_var_ts"),
               func.max(R.job_id).label("job_id"))
        .where(R.status == "ok").group_by(*KEY)
    ).subquery()
    rep = aliased(R)
    extras = list(MEASUREMENT_PATHS)

    def build(eng: Engine) -> pd.DataFrame:
        query = (select(stats, _packed(eng, rep.result, extras).label("extras"))
                 .join(rep, rep.job_id == stats.c.job_id))
        frame = _read(eng, query)
        return _unpack(frame, "extras", extras) if not frame.empty else frame
    frame = _frame(build)
    if frame.empty:
        return frame
    # Pooled spread: within-run variance plus the variance of run means.
    between = (frame["avg_sq_ts"] - frame["avg_ts"] ** 2).clip(lower=0)
    frame["stddev_ts"] = (frame["avg_var_ts"] + between).pow(0.5)
    return frame.drop(columns=["avg_sq_ts", "avg_var_ts"])


@st.cache_data(ttl=TTL_S, show_spinner=False)
def model_facts() -> pd.DataFrame:
    """Facts of each model file, from one stored Result per file (they do not vary by run)."""
    one_per_file = select(func.max(R.job_id)).group_by(R.model_sha256)
    text_path, *number_paths = FACT_PATHS
    query = (select(R.model_sha256, _js(*_path(text_path)).label("model_type"),
                    *[_j(*_path(p)).label(p.rsplit(".", 1)[-1]) for p in number_paths])
             .where(R.job_id.in_(one_per_file)))
    return _frame(lambda e: _read(e, query))


# What the farm knows of a worker's honesty (never its token: the dashboard has no use for it).
TRUST_COLUMNS = ("flagged", "trusted", "flag_reason", "n_rejected", "n_canary_passed", "n_canary_failed",
                 "n_crosscheck_agreed", "n_crosscheck_disagreed")


def _trust_columns(eng: Engine) -> list[str]:
    """The trust columns this database has (an older schema lacks the canary and cross-check counts)."""
    insp = inspect(eng)
    if not insp.has_table("workers"):
        return []
    have = {c["name"] for c in insp.get_columns("workers")}
    return [c for c in TRUST_COLUMNS if c in have]


@st.cache_data(ttl=TTL_S, show_spinner=False)
def workers() -> pd.DataFrame:
    """Each worker seen in results: last seen, counts, its hardware and its trust status."""
    def build(eng: Engine) -> pd.DataFrame:
        counts = _read(eng, select(
            R.worker, func.count().label("n_results"),
            func.sum(case((R.status == "failed", 1), else_=0)).label("n_failed"),
        ).group_by(R.worker))
        # Last seen from the jobs table: the collector stamps a job when its result lands, and
        # jobs rows are small, where results.created_at sits behind each Result's JSON.
        seen = _read(eng, select(JobRow.worker, func.max(JobRow.updated_at).label("last_seen"))
                     .where(JobRow.worker.is_not(None)).group_by(JobRow.worker))
        counts = counts.merge(seen, on="worker", how="left")
        latest = select(func.max(R.job_id)).group_by(R.worker)
        texts = ("hardware.gpu", "hardware.cpu")
        hw = _read(eng, select(R.worker, *[(_js if p in texts else _j)(*_path(p)).label(p.rsplit(".", 1)[-1])
                                           for p in HARDWARE_PATHS]).where(R.job_id.in_(latest)))
        frame = counts.merge(hw, on="worker", how="left")
        columns = _trust_columns(eng)
        if columns:
            with eng.connect() as conn:
                marks = pd.DataFrame(conn.execute(text(f"SELECT name AS worker, {', '.join(columns)} FROM workers")).all(),
                                     columns=["worker", *columns])
            frame = frame.merge(marks, on="worker", how="left")
        frame["trust"] = [_trust(row) for row in frame.to_dict("records")]
        frame["gpu"] = frame["gpu"].fillna("")
        frame["hardware"] = [g or f"{c} ({int(n or 0)} cores)" for g, c, n in
                             zip(frame["gpu"], frame["cpu"], frame["n_cpu_cores"])]
        return frame.sort_values("last_seen", ascending=False)
    return _frame(build)


def _trust(worker: dict) -> str:
    if pd.isna(worker.get("flagged")):
        return "unknown"  # results in the database from a worker no longer registered
    if worker["flagged"]:
        return "flagged"
    return "trusted" if worker.get("trusted") else "registered"


def flagged_workers() -> frozenset[str]:
    frame = workers()
    if frame.empty:
        return frozenset()
    return frozenset(frame.loc[frame["trust"] == "flagged", "worker"])


def measurement_objects() -> list[Measurement]:
    frame = measurements()
    if frame.empty:
        return []
    facts = model_facts().set_index("model_sha256").to_dict("index")
    hw = workers().set_index("worker").to_dict("index")
    out = []
    for row in frame.itertuples(index=False):
        f = facts.get(row.model_sha256, {})
        w = hw.get(row.worker, {})
        peak = _num(row.peak_vram_bytes) or _num(row.peak_rss_bytes)
        out.append(Measurement(
            model=row.model, model_sha256=row.model_sha256, quant=row.quant, technique=row.technique,
            backend=row.backend, worker=row.worker, hardware=w.get("hardware") or row.worker,
            test=row.test, n_prompt=row.n_prompt, n_gen=row.n_gen, n_depth=row.n_depth, avg_ts=row.avg_ts,
            stddev_ts=row.stddev_ts, n_runs=row.n_runs, size_bytes=int(_num(f.get("size_bytes")) or 0),
            model_type=f.get("model_type") or "", n_params=int(_num(f.get("n_params")) or 0),
            n_params_active=int(_num(f.get("n_params_active")) or 0),
            peak_memory_bytes=int(peak) if peak else None, ttft_ns=_num(row.ttft_ns), gpu=w.get("gpu") or "",
        ))
    return out


def _num(value) -> float | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return float(value)


@st.cache_data(ttl=TTL_S, show_spinner=False)
def leaderboard_frame(tier_gb: int | None, n_depth: int = 0, hardware_classes: tuple[str, ...] = (),
                      backends: tuple[str, ...] = (), techniques: tuple[str, ...] = ()) -> pd.DataFrame:
    filters = Filters(tier_gb=tier_gb, n_depth=n_depth, hardware_classes=hardware_classes, backends=backends,
                      techniques=techniques, flagged_workers=flagged_workers())
    return pd.DataFrame([row.as_dict() for row in rank(measurement_objects(), filters)])


@st.cache_data(ttl=TTL_S, show_spinner=False)
def techniques() -> pd.DataFrame:
    """Spec / lookup results grouped by model, category and settings, with what they buy.

    `first_divergence` is the earliest token index, over a run's prompts, at which the technique's
    greedy tokens left the baseline's (`speculation.first_mismatch`; None where all were identical).
    """
    fields = list(TECHNIQUE_PATHS)

    def build(eng: Engine) -> pd.DataFrame:
        # One row per result, fields unpacked here: grouping by JSON expressions in SQL would
        # evaluate each of them several times per row.
        query = (select(R.model, R.quant, R.technique, R.backend, R.worker, R.avg_ts,
                        _packed(eng, R.result, fields).label("fields"))
                 .where(R.status == "ok", R.technique != "baseline"))
        frame = _read(eng, query)
        return _unpack(frame, "fields", fields) if not frame.empty else frame
    rows = _frame(build)
    if rows.empty:
        return rows
    rows["prompt_category"] = rows["prompt_category"].fillna("(none)")
    rows["first_divergence"] = rows["first_mismatch"].map(_first_divergence)
    rows["n_runs"] = 1
    rows["n_lossless"] = rows["lossless"].map(lambda v: 1 if v in (True, 1) else 0)
    rows["n_lossless_known"] = rows["lossless"].notna().astype(int)
    keys = ["model", "quant", "technique", "backend", "worker", "prompt_category", "n_draft", "p_min", "ngram_max",
            "draft_model", "draft_quant"]
    return rows.groupby(keys, dropna=False).agg(
        n_runs=("n_runs", "sum"), avg_ts=("avg_ts", "mean"), speedup=("speedup", "mean"),
        acceptance_rate=("acceptance_rate", "mean"), mean_accepted_per_pass=("mean_accepted_per_pass", "mean"),
        n_lossless=("n_lossless", "sum"), n_lossless_known=("n_lossless_known", "sum"),
        first_divergence_min=("first_divergence", "min"),
    ).reset_index()


def _first_divergence(first_mismatch) -> float | None:
    """The smallest per-prompt first mismatch; None when every prompt matched or none was recorded."""
    if isinstance(first_mismatch, str):
        first_mismatch = json.loads(first_mismatch)
    found = [m for m in (first_mismatch or []) if m is not None]
    return float(min(found)) if found else None


@st.cache_data(ttl=TTL_S, show_spinner=False)
def sweeps() -> pd.DataFrame:
    """Each sweep with its jobs counted by state, newest first."""
    def build(eng: Engine) -> pd.DataFrame:
        info = _read(eng, select(SweepRow.id.label("sweep_id"), SweepRow.name, SweepRow.n_jobs, SweepRow.created_at))
        states = _read(eng, select(JobRow.sweep_id, JobRow.state, func.count().label("n"))
                       .group_by(JobRow.sweep_id, JobRow.state))
        if info.empty:
            return info
        pivot = states.pivot_table(index="sweep_id", columns="state", values="n", fill_value=0) if not states.empty \
            else pd.DataFrame(index=info["sweep_id"])
        frame = info.merge(pivot, left_on="sweep_id", right_index=True, how="left").fillna(0)
        for state in ("queued", "sent", "running", "done", "failed"):
            frame[state] = frame[state].astype(int) if state in frame else 0
        frame["progress"] = (frame["done"] + frame["failed"]) / frame["n_jobs"].clip(lower=1)
        return frame.sort_values("created_at", ascending=False)
    return _frame(build)


@st.cache_data(ttl=TTL_S, show_spinner=False)
def failures(limit: int = 500) -> pd.DataFrame:
    """The newest failed jobs with their reasons."""
    query = (select(JobRow.id.label("job_id"), SweepRow.name.label("sweep"), JobRow.worker, JobRow.error,
                    JobRow.updated_at, JobRow.attempts)
             .join(SweepRow, SweepRow.id == JobRow.sweep_id)
             .where(JobRow.state == "failed").order_by(JobRow.updated_at.desc()).limit(limit))
    return _frame(lambda e: _read(e, query))


@st.cache_data(ttl=TTL_S, show_spinner=False)
def failure_reasons() -> pd.DataFrame:
    query = (select(JobRow.error, func.count().label("n")).where(JobRow.state == "failed")
             .group_by(JobRow.error).order_by(func.count().desc()).limit(20))
    return _frame(lambda e: _read(e, query))


@st.cache_data(ttl=TTL_S, show_spinner=False)
def result_choices(model: str | None = None, test: str | None = None, limit: int = 200) -> pd.DataFrame:
    """The newest results (key columns only) for the detail page's picker."""
    query = select(R.job_id, R.model, R.quant, R.technique, R.test, R.worker, R.status, R.avg_ts, R.created_at)
    if model:
        query = query.where(R.model == model)
    if test:
        query = query.where(R.test == test)
    query = query.order_by(R.created_at.desc()).limit(limit)
    return _frame(lambda e: _read(e, query))


@st.cache_data(ttl=TTL_S, show_spinner=False)
def result_detail(job_id: str) -> dict | None:
    """One whole stored Result, every field as the worker sent it."""
    def build(eng: Engine) -> pd.DataFrame:
        with eng.connect() as conn:
            data = conn.execute(select(R.result).where(R.job_id == job_id)).scalar()
        return pd.DataFrame([{"result": data}]) if data is not None else pd.DataFrame()
    frame = _frame(build)
    return None if frame.empty else frame["result"].iloc[0]


# Issue 17: llama-bench's levers as a Result stores them, and what each run allocated.
LEVERS = ("type_k", "type_v", "n_cpu_moe", "n_gpu_layers", "flash_attn", "no_kv_offload", "use_mmap",
          "override_tensors", "n_batch", "n_ubatch", "n_threads")
LEVER_PATHS = tuple(f"config.{f}" for f in LEVERS) + (
    "conditions.kv_bytes", "conditions.device_bytes", "conditions.host_bytes", "conditions.peak_rss_bytes",
    "conditions.context_ns")


@st.cache_data(ttl=TTL_S, show_spinner=False)
def lever_runs() -> pd.DataFrame:
    """One row per ok llama.cpp result: its lever settings, tok/s, and llama.cpp's own allocations."""
    fields = list(LEVER_PATHS)

    def build(eng: Engine) -> pd.DataFrame:
        query = (select(R.model, R.quant, R.worker, R.test, R.avg_ts, _packed(eng, R.result, fields).label("fields"))
                 .where(R.status == "ok", R.backend == "llamacpp", R.technique == "baseline"))
        frame = _read(eng, query)
        return _unpack(frame, "fields", fields) if not frame.empty else frame
    return _frame(build)
