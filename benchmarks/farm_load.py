"""Farm load: many jobs over many simulated workers through real Celery messages, Redis and PostgreSQL.

The simulated workers are kombu consumers on the real jobs queue that answer each job at once
with a plausible, correctly signed Result (a fast fake engine); several run per process, and
processes are killed with SIGKILL at random and replaced. The real collector ingests. Prints
jobs/s dispatched and ingested, and counts lost and duplicated jobs (both must be 0).

    python benchmarks/farm_load.py --jobs 10000 --workers 100 --procs 4
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import signal
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy import create_engine, func, select, text  # noqa: E402

from orchestrator import dispatch  # noqa: E402
from orchestrator.collector import Collector, collect, sweep_progress  # noqa: E402
from orchestrator.db import JobRow, ResultRow, make_engine, session_scope, upgrade  # noqa: E402
from orchestrator.sweep import SweepSpec, expand  # noqa: E402
from orchestrator.workers import add_worker  # noqa: E402
from worker.broker import JOBS_QUEUE, create_app, signed_body  # noqa: E402
from worker.contract import Envelope, Hardware, Job, ModelFacts, Result, output_sha256, summarize  # noqa: E402
from worker.settings import Settings  # noqa: E402

PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


def fake_result(job: Job, worker: str, rng: random.Random) -> Result:
    """What an honest CPU box would send: about 50 tok/s under a 200 tok/s roofline."""
    rate = rng.uniform(40, 60)
    samples = [int(job.n_tokens * 1e9 / (rate * rng.uniform(0.97, 1.03))) for _ in range(job.repetitions)]
    avg, std = summarize(job.n_tokens, samples)
    return Result(job_id=job.job_id, sweep_id=job.sweep_id, status="ok", worker=worker, model=job.model,
                  model_sha256=job.model_sha256 or "0" * 64, source_sha256=job.model_sha256 or "", quant=job.quant,
                  test=job.test, n_prompt=job.n_prompt, n_gen=job.n_gen, n_depth=job.n_depth,
                  repetitions=job.repetitions, samples_ns=samples, avg_ts=avg, stddev_ts=std,
                  output_sha256=output_sha256([[job.index]]),
                  model_facts=ModelFacts(size_bytes=100 << 20), hardware=Hardware(cpu="simulated", bandwidth_gbps=20.0))


def simulate(broker_url: str, workers: dict[str, str], seed: int) -> None:
    """One process standing in for several workers: each job is claimed, answered and acked."""
    from kombu import Exchange, Queue

    settings = Settings(broker_url=broker_url, heartbeat_s=1.0)
    app = create_app(settings)
    rng = random.Random(seed)
    names = list(workers)
    jobs_queue = Queue(JOBS_QUEUE, Exchange(JOBS_QUEUE), routing_key=JOBS_QUEUE)
    with app.connection_for_write() as conn:
        producer = conn.Producer(serializer="json")
        from worker.broker import results_exchange, results_queue

        def publish(env: Envelope) -> None:
            producer.publish(signed_body(env, workers[env.worker]), exchange=results_exchange,
                             routing_key="result", declare=[results_queue])

        last_beat = 0.0

        def on_job(body, message) -> None:
            args = body[0] if isinstance(body, list) else body.get("args", [])
            job = Job.model_validate(args[0])
            name = rng.choice(names)
            publish(Envelope(kind="started", job_id=job.job_id, worker=name))
            publish(Envelope(kind="result", job_id=job.job_id, worker=name, result=fake_result(job, name, rng)))
            message.ack()

        with conn.Consumer([jobs_queue], accept=["json"], callbacks=[on_job], prefetch_count=len(names)):
            while True:
                if time.monotonic() - last_beat > 1.0:
                    for name in names:
                        publish(Envelope(kind="heartbeat", worker=name))
                    last_beat = time.monotonic()
                try:
                    conn.drain_events(timeout=0.5)
                except TimeoutError:
                    pass


def main() -> None:
    import logging

    # Refused replays are expected here (killed workers' jobs are redone); keep the output to figures.
    logging.getLogger("tokenfarm.collector").setLevel(logging.ERROR)
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=10_000)
    ap.add_argument("--workers", type=int, default=100)
    ap.add_argument("--procs", type=int, default=4)
    ap.add_argument("--kill-every-s", type=float, default=10.0)
    ap.add_argument("--stall-s", type=float, default=15.0, help="no progress this long: resume the sweep")
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/12")
    ap.add_argument("--timeout-s", type=float, default=600)
    args = ap.parse_args()

    import redis

    redis.Redis.from_url(args.redis).flushdb()
    db_name = f"tokenfarm_load_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{db_name}"'))
    url = PG_ADMIN.rsplit("/", 1)[0] + "/" + db_name
    try:
        run(args, url)
    finally:
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)'))


def run(args, url: str) -> None:
    upgrade(url)
    engine = make_engine(url)
    settings = Settings(database_url=url, broker_url=args.redis, worker_dead_after_s=3.0, max_attempts=10)
    app = create_app(settings)
    names = [f"sim-{i:03d}" for i in range(args.workers)]
    with session_scope(engine) as s:
        tokens = {n: add_worker(s, n) for n in names}
    half = max(1, args.jobs // 2)
    spec = SweepSpec(name="farm-load", models=["smollm2-135m"], n_prompt=list(range(1, half + 1)),
                     n_gen=list(range(1, args.jobs - half + 1)), repetitions=3)
    jobs = expand(spec)

    t0 = time.perf_counter()
    with session_scope(engine) as s:
        sweep_id = dispatch.record(s, spec, jobs)
    t_record = time.perf_counter() - t0
    t0 = time.perf_counter()
    dispatch.send(app, jobs)
    t_send = time.perf_counter() - t0
    print(f"dispatched {len(jobs)} jobs: recorded in {t_record:.2f} s, sent in {t_send:.2f} s "
          f"-> {len(jobs) / (t_record + t_send):.0f} jobs/s")

    per_proc = [dict(list(tokens.items())[i::args.procs]) for i in range(args.procs)]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=simulate, args=(args.redis, w, i), daemon=True) for i, w in enumerate(per_proc)]
    for p in procs:
        p.start()
    rng = random.Random(7)
    kills = 0
    next_kill = time.monotonic() + args.kill_every_s
    last_resume = time.monotonic()
    collector = Collector(engine, batch_size=500)
    t0 = time.perf_counter()
    progress_at: list[tuple[float, int]] = []

    def done() -> bool:
        nonlocal kills, next_kill, last_resume
        now = time.monotonic()
        if now > next_kill:
            i = rng.randrange(len(procs))
            os.kill(procs[i].pid, signal.SIGKILL)
            procs[i].join()
            procs[i] = ctx.Process(target=simulate, args=(args.redis, per_proc[i], 100 + kills), daemon=True)
            procs[i].start()
            kills += 1
            next_kill = now + args.kill_every_s
        with session_scope(engine) as s:
            counts = sweep_progress(s, sweep_id)
        finished = counts.get("done", 0) + counts.get("failed", 0)
        progress_at.append((time.perf_counter() - t0, finished))
        if now - last_resume > 5.0:
            # The orchestrator's own recovery: jobs of silent workers, and jobs whose message a
            # killed process had taken but never claimed (`tokenfarm sweep resume`).
            recent = [n for t, n in progress_at if t > progress_at[-1][0] - args.stall_s]
            stalled = progress_at[-1][0] > args.stall_s and recent and recent[0] == finished
            if stalled:
                dispatch.resend_unfinished(engine, app, sweep_id, settings.worker_dead_after_s, settings.max_attempts)
            else:
                dispatch.resend_lost(engine, app, settings.worker_dead_after_s, settings.max_attempts)
            last_resume = now
        return finished >= len(jobs) or time.perf_counter() - t0 > args.timeout_s

    collect(app, collector, done, tick_s=0.2)
    elapsed = time.perf_counter() - t0
    for p in procs:
        p.kill()
    with session_scope(engine) as s:
        n_results = s.scalar(select(func.count()).select_from(ResultRow))
        n_distinct = s.scalar(select(func.count(func.distinct(ResultRow.job_id))))
        n_done = s.scalar(select(func.count()).select_from(JobRow).where(JobRow.state == "done"))
    lost = len(jobs) - n_done
    duplicated = n_results - n_distinct
    # Steady-state rate: the middle 80 % of the run, away from start-up and the tail.
    rates = [(b[1] - a[1]) / (b[0] - a[0]) for a, b in zip(progress_at, progress_at[1:]) if b[0] > a[0]]
    print(f"ingested {n_results} results in {elapsed:.1f} s -> {n_results / elapsed:.0f} jobs/s overall "
          f"(median instantaneous {statistics.median(rates) if rates else 0:.0f} jobs/s)")
    print(f"workers: {args.workers} simulated in {args.procs} processes, {kills} processes killed with SIGKILL")
    print(f"messages: {collector.counts}")
    print(f"lost: {lost}   duplicated: {duplicated}   (target: 0 and 0; ingest target >= 200 jobs/s)")


if __name__ == "__main__":
    main()
