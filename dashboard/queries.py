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

from farm.contract import EngineConfig
from farm.settings import load_settings
from orchestrator.db import JobRow, ResultRow, SweepRow
from orchestrator.ranking import Filters, Measurement, hardware_label, rank

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
                  "hardware.bandwidth_gbps", "hardware.backends", "hardware.n_gpus")
TECHNIQUE_PATHS = ("prompt_category", "n_draft", "p_min", "ngram_max", "draft_model", "draft_quant",
                   "lookup_mode",
                   "speculation.speedup", "speculation.acceptance_rate", "speculation.mean_accepted_per_pass",
                   "speculation.lossless", "speculation.first_mismatch")
QUALITY_PATHS = ("quality.kld_mean", "quality.kld_p99", "quality.top1_agreement", "quality.ppl",
                 "quality.ppl_reference")
# What a leaderboard row is besides the key columns (orchestrator/ranking.py): the model's identity
# where it has no sha256 (an import), the hardware class of each result (a farm's 4090 and 3090
# under one worker name stay two), and the engine settings; grouped by in SQL, so they never pool.
IDENTITY_PATHS = ("model_facts.model_type", "model_facts.size_bytes", "model_facts.n_params", "hardware.gpu",
                  "hardware.cpu", "hardware.backends", "config")
# One representative run's figures per group, for the memory estimate.
ROW_FACT_PATHS = ("model_facts.n_params_active", "model_facts.n_layer", "model_facts.kv_bytes_per_token")
JSON_PATHS = (MEASUREMENT_PATHS + FACT_PATHS + HARDWARE_PATHS + TECHNIQUE_PATHS + QUALITY_PATHS + IDENTITY_PATHS
              + ROW_FACT_PATHS)


def _path(dotted: str) -> tuple[str, ...]:
    return tuple(dotted.split("."))


KEY = (R.model, R.model_sha256, R.quant, R.technique, R.backend, R.worker, R.test, R.n_prompt, R.n_gen, R.n_depth)


def _identity_columns() -> list:
    return [_js(*_path(p)).label("id_" + p.rsplit(".", 1)[-1]) for p in IDENTITY_PATHS]


@st.cache_data(ttl=TTL_S, show_spinner=False)
def measurements() -> pd.DataFrame:
    """One row per (model file, quant, technique, engine, worker, test, and IDENTITY_PATHS), its ok runs pooled.

    tok/s statistics pool every run from key columns; the JSON-only figures (peak memory, TTFT,
    roofline) come from one representative run per row, so 100,000 results cost about as many
    JSON parses as there are rows here. Never touch `created_at` in these: SQLite stores it
    after the Result JSON, and reading it walks every overflow page.
    """
    identity = _identity_columns()
    stats = (
        select(*KEY, *identity, func.count().label("n_runs"), func.avg(R.avg_ts).label("avg_ts"),
               func.avg(R.avg_ts * R.avg_ts).label("avg_sq_ts"), func.avg(R.stddev_ts * R.stddev_ts).label("avg_var_ts"),
               func.max(R.job_id).label("job_id"))
        .where(R.status == "ok").group_by(*KEY, *[c.element for c in identity])
    ).subquery()
    rep = aliased(R)
    extras = list(MEASUREMENT_PATHS + ROW_FACT_PATHS)

    def build(eng: Engine) -> pd.DataFrame:
        query = (select(stats, _packed(eng, rep.result, extras).label("extras"))
                 .join(rep, rep.job_id == stats.c.job_id))
        frame = _read(eng, query)
        if frame.empty:
            return frame
        # Prefixed, so pages that join model_facts() keep their own columns of those names.
        return _unpack(frame, "extras", extras).rename(columns={p.rsplit(".", 1)[-1]: "row_" + p.rsplit(".", 1)[-1]
                                                                 for p in ROW_FACT_PATHS})
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
        texts = ("hardware.gpu", "hardware.cpu", "hardware.backends")
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
        frame["hardware"] = [hardware_label(_text(c), _text(g), _text(b)) for g, c, b in
                             zip(frame["gpu"], frame["cpu"], frame["backends"])]
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
    out = []
    for row in frame.itertuples(index=False):
        peak = _num(row.peak_vram_bytes) or _num(row.peak_rss_bytes)
        gpu, cpu, backends = _text(row.id_gpu), _text(row.id_cpu), _text(row.id_backends)
        out.append(Measurement(
            model=row.model, model_sha256=row.model_sha256, quant=row.quant, technique=row.technique,
            backend=row.backend, worker=row.worker,
            hardware=hardware_label(cpu, gpu, backends),
            test=row.test, n_prompt=row.n_prompt, n_gen=row.n_gen, n_depth=row.n_depth, avg_ts=row.avg_ts,
            stddev_ts=row.stddev_ts, n_runs=row.n_runs, size_bytes=int(_num(row.id_size_bytes) or 0),
            model_type=_text(row.id_model_type), n_params=int(_num(row.id_n_params) or 0),
            n_params_active=int(_num(row.row_n_params_active) or 0),
            peak_memory_bytes=int(peak) if peak else None, ttft_ns=_num(row.ttft_ns), gpu=gpu, backends=backends,
            config=_config(row.id_config), n_layer=int(_num(row.row_n_layer) or 0),
            kv_bytes_per_token=int(_num(row.row_kv_bytes_per_token) or 0),
        ))
    return out


def _config(stored) -> EngineConfig:
    """A stored Result's engine settings; a Result from before a field existed takes its default."""
    if not stored:
        return EngineConfig()
    try:
        return EngineConfig.model_validate(json.loads(stored) if isinstance(stored, str) else stored)
    except ValueError:
        return EngineConfig()


def _text(value) -> str:
    """A text read from JSON: empty where the Result predates the field (NULL, NaN in pandas)."""
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)


def _num(value) -> float | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return float(value)


@st.cache_data(ttl=TTL_S, show_spinner=False)
def file_quality() -> pd.DataFrame:
    """Per model file (sha256): its quality pass's figures averaged over the Results that carry one.

    Quality is a property of the file, not of the run, so any unflagged job that measured it speaks for it.
    """
    fields = list(QUALITY_PATHS)

    def build(eng: Engine) -> pd.DataFrame:
        query = (select(R.model_sha256, R.worker, *[_j(*_path(p)).label(p.rsplit(".", 1)[-1]) for p in fields])
                 .where(R.status == "ok", _j("quality", "kld_mean").is_not(None)))
        return _read(eng, query)
    frame = _frame(build)
    if frame.empty:
        return pd.DataFrame(columns=["model_sha256"] + [p.rsplit(".", 1)[-1] for p in fields])
    frame = frame[~frame["worker"].isin(flagged_workers())].drop(columns=["worker"])
    return frame.groupby("model_sha256").mean().reset_index()


@st.cache_data(ttl=TTL_S, show_spinner=False)
def leaderboard_frame(tier_gb: int | None, n_depth: int = 0, hardware_classes: tuple[str, ...] = (),
                      backends: tuple[str, ...] = (), techniques: tuple[str, ...] = ()) -> pd.DataFrame:
    """The ranking's rows, with each file's KLD and top-1 agreement beside (NaN where not measured)."""
    filters = Filters(tier_gb=tier_gb, n_depth=n_depth, hardware_classes=hardware_classes, backends=backends,
                      techniques=techniques, flagged_workers=flagged_workers())
    frame = pd.DataFrame([row.as_dict() for row in rank(measurement_objects(), filters)])
    if frame.empty:
        return frame
    quality = file_quality()[["model_sha256", "kld_mean", "kld_p99", "top1_agreement"]]
    # The file's quality from its own query; any the rows already carry would only be a partial copy.
    frame = frame.drop(columns=[c for c in quality.columns if c != "model_sha256" and c in frame])
    return frame.merge(quality, on="model_sha256", how="left")


# recommend and claims read whole Results; at most this many (by job id, a fixed sample) bound a page's memory.
MAX_ANALYSIS_RESULTS = 20_000


@st.cache_resource(ttl=TTL_S, show_spinner=False)
def analysis_results() -> tuple[list, frozenset[str]]:
    """Ok Results of unflagged workers (up to MAX_ANALYSIS_RESULTS), whole, for recommend and claims; and the flagged names.

    A resource, not data: Streamlit would otherwise pickle thousands of Results on every read.
    """
    from farm.contract import Result

    flagged = flagged_workers()

    def build(eng: Engine) -> pd.DataFrame:
        query = select(R.result).where(R.status == "ok")
        if flagged:
            query = query.where(R.worker.not_in(flagged))
        query = query.order_by(R.job_id.desc()).limit(MAX_ANALYSIS_RESULTS)
        with eng.connect() as conn:
            return pd.DataFrame({"result": list(conn.execute(query).scalars())})
    frame = _frame(build)
    if frame.empty:
        return [], flagged
    return [Result.model_validate(json.loads(d) if isinstance(d, str) else d) for d in frame["result"]], flagged


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
    # One name per drafter, so llama.cpp MTP, torch MTP, the draft model and each lookup mode
    # stand side by side on the page (issue 15): `mtp llamacpp`, `lookup ngram-simple`, `spec`.
    rows["technique"] = [
        f"mtp {b}" if t == "mtp" else f"lookup {m}" if t == "lookup" and isinstance(m, str) and m != "longest" else t
        for t, b, m in zip(rows["technique"], rows["backend"], rows.get("lookup_mode", [None] * len(rows)))]
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
