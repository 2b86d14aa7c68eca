"""The collector holds against a registered stranger: the real `tokenfarm collector` on Redis and
PostgreSQL, an honest worker and a malicious one with its own valid token, both played by the
test through the broker exactly as a worker process speaks (the Job messages taken from their own
queues, signed envelopes published to the results queue).

Each case asserts that the message was refused or moved aside, that the collector is still
running, that the honest worker's results are stored and that its record stays clean.
"""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path

import pytest
import redis
from sqlalchemy import create_engine, func, select

from farm.broker import RESULTS_QUEUE, create_app, publish_envelope, results_queue, worker_queue
from farm.contract import Capabilities, Envelope, Hardware, Job, Result
from farm.identity import output_sha256
from farm.memory import GIB
from farm.settings import Settings
from farm.stats import summarize
from orchestrator.db import DeadLetterRow, JobRow, RejectionRow, ResultRow, WorkerRow, session_scope
from orchestrator.lifecycle import record
from orchestrator.planning import plan
from orchestrator.sweep import SweepSpec
from tests.integration.conftest import TOKENFARM, register_worker, service_env, stop_process, wait_until

pytestmark = pytest.mark.integration

HONEST_GBPS = 10.0  # what each worker's hello announces; the collector holds the first figure


class Farm:
    def __init__(self, tmp_path: Path, pg_url: str, redis_url: str) -> None:
        self.env = service_env(tmp_path / "data", database_url=pg_url, broker_url=redis_url)
        self.env.update(TOKENFARM_HEARTBEAT_S="1", TOKENFARM_WORKER_DEAD_AFTER_S="60")
        self.log_path = tmp_path / "collector.log"
        self.engine = create_engine(pg_url)
        self.app = create_app(Settings(broker_url=redis_url))
        self.redis = redis.Redis.from_url(redis_url)
        self.tokens = {name: register_worker(self.env, name) for name in ("honest", "mallory")}
        spec = SweepSpec(name="trust", models=["smollm2-135m"], n_prompt=[], n_gen=[4, 6, 8, 10, 12, 14],
                         repetitions=2)
        self.jobs = plan(spec)
        with session_scope(self.engine) as s:
            record(s, spec, self.jobs)
        self.collector: subprocess.Popen | None = None

    def start_collector(self) -> None:
        with self.log_path.open("ab") as log:
            self.collector = subprocess.Popen([TOKENFARM, "collector"], env=self.env, stdout=log,
                                              stderr=subprocess.STDOUT)

    def alive(self) -> bool:
        return self.collector is not None and self.collector.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def hello(self, name: str, gbps: float = HONEST_GBPS, models: list[str] | None = None) -> None:
        hw = Hardware(cpu="Test CPU", n_cpu_cores=2, ram_bytes=16 * GIB, host_bandwidth_gbps=gbps, bandwidth_gbps=gbps)
        fields = dict(engines=["llamacpp"], hardware=hw, queues=[worker_queue(name)])
        # A forger builds what it likes: past the schema's own bounds, unvalidated.
        capabilities = Capabilities(**fields) if models is None else Capabilities.model_construct(**fields, models=models)
        publish_envelope(self.app, Envelope(kind="hello", worker=name, capabilities=capabilities), self.tokens[name])

    def publish_raw(self, body, **options) -> None:
        with self.app.producer_or_acquire() as producer:
            producer.publish(body, exchange="", routing_key=RESULTS_QUEUE, declare=[results_queue], **options)

    def take_jobs(self, name: str, n: int) -> list[Job]:
        """What a worker takes from its own queue: the Job messages, with their leases."""
        jobs: list[Job] = []

        def took() -> bool:
            while (item := self.redis.rpop(worker_queue(name))) is not None:
                body = json.loads(base64.b64decode(json.loads(item)["body"]))
                jobs.append(Job.model_validate(body[0][0]))
            return len(jobs) >= n

        assert wait_until(took, timeout=30), f"{name} was sent {len(jobs)} of {n} jobs; collector log:\n{self.log()}"
        return jobs

    def send(self, name: str, kind: str, job: Job, result: Result | None = None, token: str | None = None,
             lease: Job | None = None) -> None:
        lease = lease or job
        env = Envelope(kind=kind, job_id=job.job_id, worker=name, result=result, lease_id=lease.lease_id,
                       attempt=lease.attempt)
        publish_envelope(self.app, env, token or self.tokens[name])

    def row(self, job_id: str) -> JobRow:
        with session_scope(self.engine) as s:
            return s.get(JobRow, job_id)

    def worker(self, name: str) -> WorkerRow:
        with session_scope(self.engine) as s:
            return s.get(WorkerRow, name)

    def n_rejections(self) -> int:
        with session_scope(self.engine) as s:
            return s.scalar(select(func.count()).select_from(RejectionRow))

    def settled(self, n_rejections: int) -> bool:
        """The collector took in everything sent so far: n_rejections refusals kept, queue empty."""
        return wait_until(lambda: self.n_rejections() >= n_rejections and not self.redis.llen(RESULTS_QUEUE),
                          timeout=30)


def result_for(job: Job, worker: str, rate_ts: float = 20.0, **update) -> Result:
    samples = [int(job.n_tokens * 1e9 / rate_ts)] * job.repetitions
    avg, std = summarize(job.n_tokens, samples)
    r = Result(job_id=job.job_id, sweep_id=job.sweep_id, status="ok", worker=worker, model=job.model,
               model_sha256="c" * 64, source_sha256=job.model_sha256, quant=job.quant, test=job.test,
               n_prompt=job.n_prompt, n_gen=job.n_gen, n_depth=job.n_depth, repetitions=job.repetitions,
               samples_ns=samples, avg_ts=avg, stddev_ts=std, decode_ts=avg, output_sha256=output_sha256([[1, 2]]))
    return r.model_copy(update=update)


@pytest.fixture
def farm(tmp_path, pg_url, redis_url):
    f = Farm(tmp_path, pg_url, redis_url)
    f.start_collector()
    f.hello("honest")
    f.hello("mallory")
    yield f
    if f.collector is not None:
        stop_process(f.collector)
    f.engine.dispose()


def assert_honest_clean_and_stored(farm: Farm, honest_jobs: list[Job]) -> None:
    for job in honest_jobs:
        farm.send("honest", "started", job)
        farm.send("honest", "result", job, result_for(job, "honest"))
    assert wait_until(lambda: all(farm.row(j.job_id).state == "done" for j in honest_jobs), timeout=30), farm.log()
    with session_scope(farm.engine) as s:
        stored = {r.job_id: r.worker for r in s.scalars(select(ResultRow))}
    assert all(stored.get(j.job_id) == "honest" for j in honest_jobs)
    assert farm.worker("honest").n_rejected == 0
    assert farm.alive(), farm.log()


def test_messages_that_are_not_json_are_moved_aside_and_a_restart_does_not_die_on_them(farm):
    honest_jobs = farm.take_jobs("honest", 2)
    farm.publish_raw({"kind": "result", "worker": "honest", "pickled": True}, serializer="pickle")
    farm.publish_raw(b'{"kind": "result", "worker": "hon', content_type="application/json", content_encoding="utf-8")
    farm.publish_raw("hello there", content_type="text/plain", content_encoding="utf-8")
    # Not even a kombu message: pushed raw onto the results queue's list.
    farm.redis.lpush(RESULTS_QUEUE, b"\x80\x04garbage")
    assert farm.settled(4), farm.log()
    with session_scope(farm.engine) as s:
        letters = list(s.scalars(select(DeadLetterRow).order_by(DeadLetterRow.id)))
        rejections = list(s.scalars(select(RejectionRow).order_by(RejectionRow.id)))
    reasons = " | ".join(d.reason for d in letters)
    assert len(letters) == 4, reasons
    assert "application/x-python-serialize" in reasons and "not JSON" in reasons and "text/plain" in reasons
    assert "not a broker message" in reasons
    assert all(r.reason.startswith("moved to dead letters") for r in rejections)
    assert {r.size_bytes for r in rejections if "text/plain" in r.reason} == {len("hello there")}
    assert farm.alive(), farm.log()
    # A restart finds nothing left to die on.
    stop_process(farm.collector)
    farm.start_collector()
    assert_honest_clean_and_stored(farm, honest_jobs)
    assert farm.n_rejections() == 4


def test_only_the_leaseholder_of_the_current_attempt_is_heard(farm):
    honest_jobs = farm.take_jobs("honest", 2)
    mallory_jobs = farm.take_jobs("mallory", 2)
    target = honest_jobs[0]
    queued = next(j for j in farm.jobs if j.job_id not in {x.job_id for x in honest_jobs + mallory_jobs})
    # Mallory read honest's job (lease and all) off the broker and claims it.
    farm.send("mallory", "started", target)
    farm.send("mallory", "result", target, result_for(target, "mallory"))
    # A failure for a job never sent to anyone: today it would fail the job for good.
    farm.send("mallory", "result", queued, Result.failed(queued, "mallory", "no such file"),
              lease=queued.model_copy(update={"lease_id": mallory_jobs[0].lease_id, "attempt": 1}))
    # A stale attempt of its own job, and an attempt it invents.
    own = mallory_jobs[0]
    farm.send("mallory", "result", own, result_for(own, "mallory"), lease=own.model_copy(update={"attempt": 2}))
    assert farm.settled(4), farm.log()
    assert farm.row(target.job_id).state == "sent" and farm.row(target.job_id).worker == "honest"
    assert farm.row(queued.job_id).state == "queued"
    assert farm.row(own.job_id).state == "sent"
    with session_scope(farm.engine) as s:
        reasons = [r.reason for r in s.scalars(select(RejectionRow).where(RejectionRow.worker == "mallory"))]
        assert s.scalar(select(func.count()).select_from(ResultRow)) == 0
    assert sum("leased to worker 'honest'" in r for r in reasons) == 2
    assert any("not leased to any worker" in r for r in reasons) and any("stale or unknown lease" in r for r in reasons)
    assert farm.worker("mallory").n_rejected == 4
    assert_honest_clean_and_stored(farm, honest_jobs)


def test_a_refused_result_changes_no_job_and_decode_is_judged_against_held_figures(farm):
    honest_jobs = farm.take_jobs("honest", 2)
    mallory_jobs = farm.take_jobs("mallory", 2)
    # Mallory tries to raise the bandwidth it is judged by: the first hello's figure holds.
    farm.hello("mallory", gbps=100_000.0)
    job = mallory_jobs[0]
    assert job.active_bytes > 0  # the orchestrator's own header read travels with the job
    plausible_ts = HONEST_GBPS * 1e9 / job.active_bytes
    fast = 10 * 1.5 * plausible_ts
    lies = [result_for(job, "mallory", rate_ts=fast, roofline_tok_s=1e9, hardware=Hardware(bandwidth_gbps=1e5)),
            result_for(job, "mallory", rate_ts=fast, roofline_tok_s=0.0),
            result_for(job, "mallory", model_sha256=""),
            result_for(job, "mallory", model_sha256="0" * 64),
            result_for(job, "mallory", model_sha256="not-a-hash"),
            result_for(job, "mallory", source_sha256="")]
    farm.send("mallory", "started", job)
    for lie in lies:
        farm.send("mallory", "result", job, lie)
    assert farm.settled(len(lies)), farm.log()
    with session_scope(farm.engine) as s:
        reasons = [r.reason for r in s.scalars(select(RejectionRow).where(RejectionRow.job_id == job.job_id)
                                               .order_by(RejectionRow.id))]
    assert len(reasons) == len(lies)
    assert all("memory-bandwidth limit" in r for r in reasons[:2]), reasons
    assert all("sha256" in r for r in reasons[2:]), reasons
    row = farm.row(job.job_id)
    assert (row.state, row.error) == ("running", None)  # refused, so nothing about the job changed
    assert farm.worker("mallory").host_bandwidth_gbps == HONEST_GBPS
    assert farm.worker("mallory").n_rejected == len(lies)
    # An honest figure on the same job is stored.
    farm.send("mallory", "result", job, result_for(job, "mallory", rate_ts=plausible_ts))
    assert wait_until(lambda: farm.row(job.job_id).state == "done", timeout=30), farm.log()
    assert_honest_clean_and_stored(farm, honest_jobs)


def test_oversized_messages_are_refused_and_forgeries_under_an_honest_name_are_not_counted(farm):
    honest_jobs = farm.take_jobs("honest", 2)
    # 100,000 model hashes: 6.6 MB, refused before it is parsed.
    farm.hello("mallory", models=[f"{i:064x}" for i in range(100_000)])
    # 5,000: under the message bound, over the schema's bound on a list.
    farm.hello("mallory", models=[f"{i:064x}" for i in range(5_000)])
    # Under honest's name, signed with mallory's token: refused, and nothing proves honest sent it.
    farm.send("honest", "result", honest_jobs[0], result_for(honest_jobs[0], "honest", rate_ts=1e6),
              token=farm.tokens["mallory"])
    assert farm.settled(3), farm.log()
    with session_scope(farm.engine) as s:
        rejections = list(s.scalars(select(RejectionRow).order_by(RejectionRow.id)))
        letters = list(s.scalars(select(DeadLetterRow)))
    big, listed, forged = rejections
    assert "above the 1048576 bytes" in big.reason and big.size_bytes > 6_000_000 and len(letters) == 1
    assert "capabilities.models" in listed.reason and listed.worker == "mallory"
    assert "bad signature" in forged.reason and forged.worker == "honest"
    assert len((farm.worker("mallory").capabilities or {}).get("models", [])) == 0
    assert farm.worker("mallory").n_rejected == 1  # its own signed, oversized list
    assert farm.row(honest_jobs[0].job_id).state == "sent"
    assert_honest_clean_and_stored(farm, honest_jobs)


def test_a_job_is_leased_to_a_worker_that_joins_later(farm, tmp_path):
    """Jobs no live worker has room for stay queued in the database, not in the broker."""
    first = farm.take_jobs("honest", 2) + farm.take_jobs("mallory", 2)
    with session_scope(farm.engine) as s:
        states = dict(s.execute(select(JobRow.id, JobRow.state)).all())
    assert list(states.values()).count("queued") == len(farm.jobs) - 4
    # The two left wait in the database: no queue in the broker holds a job.
    assert [k for k in farm.redis.scan_iter("tokenfarm.*", _type="list") if k != RESULTS_QUEUE.encode()] == []
    farm.tokens["late"] = register_worker(farm.env, "late")
    farm.hello("late")
    late = farm.take_jobs("late", 2)
    assert {j.job_id for j in late}.isdisjoint({j.job_id for j in first})
    assert all(farm.row(j.job_id).worker == "late" for j in late)
    assert farm.alive(), farm.log()
