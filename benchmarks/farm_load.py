"""Farm load: many jobs over many simulated workers through real Celery messages, Redis and PostgreSQL.

The simulated workers are kombu consumers on their own real queues that answer each job at once,
under the lease it came with, with a plausible, correctly signed Result (a fast fake engine) once
the job's seal passes the real worker's admission (worker/admission.py); several run per process,
and processes are killed with SIGKILL at random and replaced. The real collector ingests and the
orchestrator's scheduler leases and seals (dispatch.Upkeep, as `sweep wait` runs it). Prints jobs/s
recorded and ingested, the microseconds sealing, verifying and admitting cost per job, and counts
lost and duplicated jobs (both must be 0).

    python benchmarks/farm_load.py --jobs 10000 --workers 100 --procs 4
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Only worker-side imports at the top: the simulated workers are spawned processes that import
# this module, and a restart after a kill should cost what a worker's start costs.

from farm.broker import create_app, signed_body, worker_queue  # noqa: E402
from farm.contract import Capabilities, Envelope, Hardware, Job, ModelFacts, Result  # noqa: E402
from farm.identity import output_sha256  # noqa: E402
from farm.settings import Settings  # noqa: E402
from farm.stats import summarize  # noqa: E402

PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


def fake_result(job: Job, worker: str, rng: random.Random) -> Result:
    """What an honest CPU box would send: about 50 tok/s under a 200 tok/s roofline."""
    rate = rng.uniform(40, 60)
    samples = [int(job.n_tokens * 1e9 / (rate * rng.uniform(0.97, 1.03))) for _ in range(job.repetitions)]
    avg, std = summarize(job.n_tokens, samples)
    return Result(job_id=job.job_id, sweep_id=job.sweep_id, status="ok", worker=worker, model=job.model,
                  model_sha256=job.model_sha256 or "c" * 64, source_sha256=job.model_sha256 or "c" * 64, quant=job.quant,
                  test=job.test, n_prompt=job.n_prompt, n_gen=job.n_gen, n_depth=job.n_depth,
                  repetitions=job.repetitions, samples_ns=samples, avg_ts=avg, stddev_ts=std,
                  output_sha256=output_sha256([[job.index]]),
                  model_facts=ModelFacts(size_bytes=100 << 20), hardware=Hardware(cpu="simulated", bandwidth_gbps=20.0))


def simulate(lanes: list[tuple[str, dict[str, str]]], seed: int, heartbeat_s: float, visibility_timeout_s: float,
             jobs_public_key: str, ca_file: str = "") -> None:
    """One process standing in for several workers: each job is claimed, answered and acked.

    `lanes`: (broker URL, {worker: token}) per connection. On a plain broker one connection serves
    every worker of the process; on a confined one (ca_file given) each worker has its own, logged
    in as its own Redis user and confined to its key prefix (farm.broker.worker_app), as a real
    worker is. It behaves as a worker process does: a hello for each of its workers when it starts
    (so the collector gives back jobs a killed predecessor was running), heartbeats every
    heartbeat_s, and kombu's periodic restore of messages left unacked by killed consumers, which
    a Celery worker's event loop runs every `unacked_restore_interval`.
    """
    from contextlib import ExitStack

    from kombu import Exchange, Queue

    from farm.broker import publish_results, worker_app
    from farm.jobsign import JobRefused, load_public_key
    from worker.admission import Admission, SeenJobs

    # The real worker's gate, one per worker (a job's seal names the worker it was leased to), its
    # seen-set in memory only: a restarted process is a new worker here.
    public_key = load_public_key(jobs_public_key)
    gates = {name: Admission(public_key, name, SeenJobs(None)) for _, workers in lanes for name in workers}
    rng = random.Random(seed)

    # Every simulated worker is a 16 GiB CPU box running llama.cpp, consuming its own queue.
    def caps(name: str) -> Capabilities:
        return Capabilities(engines=["llamacpp"], offered_ram_bytes=16 << 30, queues=[worker_queue(name)],
                            hardware=Hardware(cpu="simulated", host_bandwidth_gbps=20.0, bandwidth_gbps=20.0))

    with ExitStack() as stack:
        opened = []
        for broker_url, workers in lanes:
            names = list(workers)
            settings = Settings(broker_url=broker_url, heartbeat_s=heartbeat_s, visibility_timeout_s=visibility_timeout_s,
                                broker_confined=bool(ca_file), broker_ca_file=Path(ca_file) if ca_file else None,
                                worker_name=names[0])
            conn = stack.enter_context(worker_app(settings).connection_for_write())
            producer = conn.Producer(serializer="json")
            by_queue = {worker_queue(name): name for name in names}

            def publish(env: Envelope, producer=producer, workers=workers) -> None:
                publish_results(producer, signed_body(env, workers[env.worker]))

            def on_job(body, message, by_queue=by_queue, publish=publish) -> None:
                args = body[0] if isinstance(body, list) else body.get("args", [])
                name = by_queue[message.delivery_info["routing_key"]]
                try:
                    job = gates[name].admit(args[0], args[1] if len(args) > 1 else None)
                except JobRefused as exc:
                    publish(Envelope(kind="refused", job_id=str(args[0].get("job_id", ""))[:36], worker=name,
                                     reason=exc.reason))
                    message.ack()
                    return
                lease = {"lease_id": job.lease_id, "attempt": job.attempt}
                publish(Envelope(kind="started", job_id=job.job_id, worker=name, **lease))
                publish(Envelope(kind="result", job_id=job.job_id, worker=name, result=fake_result(job, name, rng),
                                 **lease))
                message.ack()

            for name in names:
                publish(Envelope(kind="hello", worker=name, capabilities=caps(name)))
            queues = [Queue(q, Exchange(q), routing_key=q) for q in by_queue]
            consumer = stack.enter_context(conn.Consumer(queues, accept=["json"], callbacks=[on_job],
                                                         prefetch_count=len(names)))
            opened.append((conn, consumer, names, publish))
        last_beat = last_restore = time.monotonic()
        wait_s = max(0.01, 0.5 / len(opened))
        while True:
            now = time.monotonic()
            if now - last_beat > heartbeat_s:
                for _, _, names, publish in opened:
                    for name in names:
                        publish(Envelope(kind="heartbeat", worker=name))
                last_beat = now
            if now - last_restore > 2.0:
                for _, consumer, _, _ in opened:
                    consumer.channel.qos.restore_visible(num=1000, interval=1)
                last_restore = now
            for conn, _, _, _ in opened:
                try:
                    conn.drain_events(timeout=wait_s)
                except TimeoutError:
                    pass


def seal_costs(jobs: list[Job], data_dir: Path, n: int = 2000) -> tuple[float, float, float]:
    """Microseconds per job: sealing one (the orchestrator, at send), verifying its seal, and the
    worker's whole admission with its seen-set appended and fsynced to a file; median of 3 runs."""
    from farm import jobsign
    from orchestrator.keys import expires_at, signing_key
    from worker.admission import Admission, SeenJobs

    key = signing_key(data_dir)
    bodies = [job.model_dump(mode="json") for job in jobs[:n]]
    expiry = expires_at(Settings())
    runs = {"seal": [], "verify": [], "admit": []}
    for run_i in range(3):
        t0 = time.perf_counter()
        seals = [jobsign.seal(b, key, expiry) for b in bodies]
        runs["seal"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for b, s in zip(bodies, seals):
            jobsign.verify(b, s, key.public_key(), "w")
        runs["verify"].append(time.perf_counter() - t0)
        gate = Admission(key.public_key(), "w", SeenJobs(data_dir / f"seen-{run_i}.jsonl"))
        t0 = time.perf_counter()
        for b, s in zip(bodies, seals):
            gate.admit(b, s)
        runs["admit"].append(time.perf_counter() - t0)
    seal_s, verify_s, admit_s = (statistics.median(runs[k]) * 1e6 / len(bodies) for k in ("seal", "verify", "admit"))
    return seal_s, verify_s, admit_s


def service_pids(engine, redis_url: str, ca_file: str = "") -> list[int]:
    """Redis's process and the PostgreSQL backends serving this benchmark's database."""
    import redis
    from sqlalchemy import text

    with engine.connect() as c:
        backends = [pid for (pid,) in c.execute(text(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"))]
    client = redis.Redis.from_url(redis_url, **({"ssl_ca_certs": ca_file} if ca_file else {}))
    return [int(client.info("server")["process_id"]), *backends]


def cpu_s(pid: int) -> float:
    """User + system CPU seconds a live process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    import logging

    # Refused replays are expected here (killed workers' jobs are redone); keep the output to figures.
    logging.getLogger("tokenfarm.collector").setLevel(logging.ERROR)
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=10_000)
    ap.add_argument("--workers", type=int, default=100)
    ap.add_argument("--procs", type=int, default=4)
    ap.add_argument("--kill-every-s", type=float, default=10.0)
    ap.add_argument("--stall-s", type=float, default=30.0, help="no progress this long: resume the sweep")
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/13")
    ap.add_argument("--timeout-s", type=float, default=600)
    ap.add_argument("--confined", action="store_true",
                    help="a redis-server of its own on TLS only, each simulated worker its own confined Redis user")
    args = ap.parse_args()

    import redis
    from sqlalchemy import create_engine, text

    if args.confined:
        server = confined_broker(Path(tempfile.mkdtemp(prefix="tokenfarm-load-redis-")))
        args.redis, args.ca_file = server.admin_url, server.ca_file
    else:
        server, args.ca_file = None, ""
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
        if server is not None:
            server.stop()


class _Broker:
    def __init__(self, proc, admin_url: str, ca_file: str) -> None:
        self.proc, self.admin_url, self.ca_file = proc, admin_url, ca_file

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=20)


def confined_broker(root: Path) -> _Broker:
    """redis-server on 127.0.0.1 with TLS only (certificates from `tokenfarm broker certs`' code),
    the default user off and one admin user: the deployment's broker (docker-compose.yml)."""
    import socket
    import subprocess

    import redis

    from orchestrator.brokercerts import make_certs

    files = make_certs(root / "certs", ["127.0.0.1", "localhost"])
    password = uuid.uuid4().hex
    (root / "users.acl").write_text(f"user default off\nuser tf-admin on >{password} ~* &* +@all\n")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(["redis-server", "--port", "0", "--bind", "127.0.0.1", "--tls-port", str(port),
                             "--tls-cert-file", str(files.server_cert), "--tls-key-file", str(files.server_key),
                             "--tls-ca-cert-file", str(files.ca_cert), "--tls-auth-clients", "no",
                             "--aclfile", str(root / "users.acl"), "--save", "", "--dir", str(root)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"rediss://tf-admin:{password}@127.0.0.1:{port}/0"
    for _ in range(100):
        try:
            if redis.Redis.from_url(url, ssl_ca_certs=str(files.ca_cert)).ping():
                return _Broker(proc, url, str(files.ca_cert))
        except Exception:
            time.sleep(0.1)
    raise SystemExit("the TLS redis-server did not start (is redis-server built with TLS?)")


def run(args, url: str) -> None:
    from sqlalchemy import func, select

    from orchestrator import brokerusers, dispatch, lifecycle, scheduler
    from orchestrator.collector import Collector, collect
    from orchestrator.db import JobRow, ResultRow, make_engine, session_scope, upgrade
    from orchestrator.lifecycle import sweep_progress
    from orchestrator.planning import plan
    from orchestrator.sweep import SweepSpec
    from orchestrator.workers import add_worker

    upgrade(url)
    engine = make_engine(url)
    # Production liveness (heartbeat every 5 s, dead after 3 missed); a visibility timeout just
    # longer than the longest job, which for this fake engine is milliseconds.
    # Its own data dir: the orchestrator's job-signing key is made there, not in the user's.
    data_dir = Path(tempfile.mkdtemp(prefix="tokenfarm-load-"))
    settings = Settings(database_url=url, broker_url=args.redis, heartbeat_s=5.0, worker_dead_after_s=15.0,
                        visibility_timeout_s=10, max_attempts=10, data_dir=data_dir,
                        broker_confined=args.confined, broker_ca_file=Path(args.ca_file) if args.ca_file else None)
    from orchestrator.keys import public_key_text

    jobs_public_key = public_key_text(data_dir)
    app = create_app(settings)
    names = [f"sim-{i:03d}" for i in range(args.workers)]
    with session_scope(engine) as s:
        tokens = {n: add_worker(s, n) for n in names}
    # On a confined broker each worker logs in as its own Redis user, as `workers add` makes it.
    urls = {n: brokerusers.worker_broker_url(args.redis, n, brokerusers.create_user(app, n)) for n in names} \
        if args.confined else {}
    half = max(1, args.jobs // 2)
    spec = SweepSpec(name="farm-load", models=["smollm2-135m"], n_prompt=list(range(1, half + 1)),
                     n_gen=list(range(1, args.jobs - half + 1)), repetitions=3)
    jobs = plan(spec)

    t0 = time.perf_counter()
    with session_scope(engine) as s:
        sweep_id = lifecycle.record(s, spec, jobs)
    t_record = time.perf_counter() - t0
    print(f"recorded {len(jobs)} jobs in {t_record:.2f} s -> {len(jobs) / t_record:.0f} jobs/s; the scheduler "
          f"leases them as workers have room (window {scheduler.WINDOW} per worker)")
    seal_us, verify_us, admit_us = seal_costs(jobs, data_dir)
    print(f"job seals (Ed25519), per job: signing {seal_us:.0f} us (orchestrator), verifying {verify_us:.0f} us, "
          f"admitting with the seen-set on disk {admit_us:.0f} us (worker; an fsync per job)")

    per_proc = [dict(list(tokens.items())[i::args.procs]) for i in range(args.procs)]
    lanes = [[(urls[n], {n: t}) for n, t in workers.items()] if args.confined else [(args.redis, workers)]
             for workers in per_proc]
    ctx = mp.get_context("spawn")

    def spawn(i: int, seed: int):
        proc = ctx.Process(target=simulate, args=(lanes[i], seed, settings.heartbeat_s, settings.visibility_timeout_s,
                                                   jobs_public_key, str(args.ca_file)), daemon=True)
        proc.start()
        return proc

    procs = [spawn(i, i) for i in range(args.procs)]
    rng = random.Random(7)
    kills = resumes = 0
    sim_cpu_s = 0.0
    next_kill = time.monotonic() + args.kill_every_s
    last_check = time.monotonic()
    upkeep = dispatch.Upkeep(settings)  # the orchestrator's own recovery, as `sweep wait` runs it
    collector = Collector(engine, batch_size=500, max_attempts=settings.max_attempts,
                          after_batch=lambda: upkeep.maybe_run(engine, app, now=True),
                          relay=brokerusers.results_relay(settings, engine))
    services_cpu = {pid: cpu_s(pid) for pid in service_pids(engine, args.redis, str(args.ca_file))}
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    progress_at: list[tuple[float, int]] = []

    def done() -> bool:
        nonlocal kills, resumes, sim_cpu_s, next_kill, last_check
        now = time.monotonic()
        if now > next_kill:
            # A crash and a restart under the same names, as a supervised home-lab worker does.
            i = rng.randrange(len(procs))
            sim_cpu_s += cpu_s(procs[i].pid)
            os.kill(procs[i].pid, signal.SIGKILL)
            procs[i].join()
            procs[i] = spawn(i, 100 + kills)
            kills += 1
            next_kill = now + args.kill_every_s
        with session_scope(engine) as s:
            counts = sweep_progress(s, sweep_id)
        finished = counts.get("done", 0) + counts.get("failed", 0)
        progress_at.append((time.perf_counter() - t0, finished))
        upkeep.maybe_run(engine, app)
        if now - last_check > 2.0:
            recent = [n for t, n in progress_at if t > progress_at[-1][0] - args.stall_s]
            if progress_at[-1][0] > args.stall_s and recent and recent[0] == finished < len(jobs):
                # What an operator's `tokenfarm sweep resume` would do; counted, as it should not be needed.
                dispatch.resend_unfinished(engine, app, sweep_id, settings.worker_dead_after_s, settings.max_attempts)
                resumes += 1
            last_check = now
        return finished >= len(jobs) or time.perf_counter() - t0 > args.timeout_s

    collect(app, collector, done, tick_s=0.2)
    elapsed = time.perf_counter() - t0
    collector_cpu_s = time.process_time() - cpu0
    services_cpu_s = sum(cpu_s(pid) - before for pid, before in services_cpu.items() if Path(f"/proc/{pid}").exists())
    for p in procs:
        sim_cpu_s += cpu_s(p.pid)
        p.kill()
    with session_scope(engine) as s:
        n_results = s.scalar(select(func.count()).select_from(ResultRow))
        n_distinct = s.scalar(select(func.count(func.distinct(ResultRow.job_id))))
        n_done = s.scalar(select(func.count()).select_from(JobRow).where(JobRow.state == "done"))
    lost = len(jobs) - n_done
    duplicated = n_results - n_distinct
    # Rates over 5 s windows: the collector commits in batches, so shorter windows read 0 or a burst.
    marks = [progress_at[0]] if progress_at else []
    for t, n in progress_at:
        if t - marks[-1][0] >= 5.0:
            marks.append((t, n))
    windows = [(b[1] - a[1]) / (b[0] - a[0]) for a, b in zip(marks, marks[1:])]
    print(f"ingested {n_results} results in {elapsed:.1f} s -> {n_results / elapsed:.0f} jobs/s overall "
          f"(median over 5 s windows {statistics.median(windows) if windows else 0:.0f} jobs/s)")
    n = max(1, n_results)
    total_ms = 1e3 * (collector_cpu_s + sim_cpu_s + services_cpu_s) / n
    print(f"cpu per job: collector {1e3 * collector_cpu_s / n:.2f} ms, simulated workers {1e3 * sim_cpu_s / n:.2f} ms, "
          f"redis + postgres {1e3 * services_cpu_s / n:.2f} ms; total {total_ms:.2f} ms -> "
          f"{os.cpu_count()} idle cores could ingest {os.cpu_count() * 1e3 / total_ms:.0f} jobs/s")
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (above {os.cpu_count()}: other "
          f"processes shared the cores and the wall-clock figures are low)")
    print(f"broker: {'TLS, each worker its own confined Redis user' if args.confined else 'plain text, one shared user'}")
    print(f"workers: {args.workers} simulated in {args.procs} processes, {kills} processes killed with SIGKILL "
          f"and restarted; sweep resumes needed: {resumes}")
    audit = upkeep.audit
    print(f"broker audits: {audit.n_runs}, {1e3 * audit.busy_s / max(1, audit.n_runs):.0f} ms each "
          f"(wall clock, queues read whole), jobs sent again or put back: {audit.n_sent}")
    print(f"messages: {collector.counts}")
    print(f"lost: {lost}   duplicated: {duplicated}   (target: 0 and 0; ingest target >= 200 jobs/s)")
    shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
