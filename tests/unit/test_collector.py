"""The collector against a real (embedded) SQLite database after Alembic's upgrade."""

import copy

import pytest
from sqlalchemy import func, select

from farm.broker import signed_body
from farm.contract import Capabilities, Envelope, Hardware, ModelFacts, Result, utc_now
from farm.identity import output_sha256
from farm.stats import summarize
from orchestrator.collector import ingest
from orchestrator.db import (
    RESULT_KEY_COLUMNS,
    JobRow,
    as_utc,
    RejectionRow,
    ResultRow,
    WorkerRow,
    session_scope,
)
from orchestrator import lifecycle
from orchestrator.lifecycle import record, requeue_lost
from orchestrator.planning import plan
from orchestrator.sweep import SweepSpec
from orchestrator.workers import add_worker, flagged_names, list_workers, set_flag


@pytest.fixture
def tokens(engine):
    with session_scope(engine) as s:
        return {name: add_worker(s, name) for name in ("w1", "w2")}


@pytest.fixture
def jobs(engine, tokens):
    spec = SweepSpec(name="t", models=["smollm2-135m"], n_prompt=[16], n_gen=[4], repetitions=2)
    jobs = plan(spec)
    with session_scope(engine) as s:
        record(s, spec, jobs)
    return jobs


def result_for(job, **update):
    samples = [1_000_000, 1_200_000]
    avg, std = summarize(job.n_tokens, samples)
    r = Result(job_id=job.job_id, sweep_id=job.sweep_id, status="ok", worker="w1", model=job.model,
               model_sha256="c" * 64, source_sha256=job.model_sha256, quant=job.quant, test=job.test,
               n_prompt=job.n_prompt, n_gen=job.n_gen, n_depth=job.n_depth, repetitions=job.repetitions,
               samples_ns=samples, avg_ts=avg, stddev_ts=std, output_sha256=output_sha256([[1, 2, 3, 4]]))
    return r.model_copy(update=update)


TOKENS: dict[str, str] = {}


@pytest.fixture(autouse=True)
def _remember_tokens(request):
    TOKENS.clear()
    if "tokens" in request.fixturenames:
        TOKENS.update(request.getfixturevalue("tokens"))


def lease(engine, job, worker="w1"):
    """The orchestrator grants the job to `worker` (as the scheduler does); the Job message sent."""
    with session_scope(engine) as s:
        return lifecycle.lease(s.get(JobRow, job.job_id), worker)


def envelope(result, worker="w1", token=None, kind="result", leased=None):
    """A worker's signed message; `leased`: the Job message it answers (its lease echoed)."""
    lease_fields = {"lease_id": leased.lease_id, "attempt": leased.attempt} if leased is not None else {}
    env = Envelope(kind=kind, job_id=result.job_id, worker=worker, result=result if kind == "result" else None,
                   **lease_fields)
    return signed_body(env, token or TOKENS[worker])


def test_result_stored_once_and_key_columns_agree_with_the_json(engine, jobs):
    job = jobs[0]
    sent = lease(engine, job)
    with session_scope(engine) as s:
        assert ingest(s, envelope(result_for(job), kind="started", leased=sent)).action == "started"
    with session_scope(engine) as s:
        assert s.get(JobRow, job.job_id).state == "running"
    body = envelope(result_for(job), leased=sent)
    with session_scope(engine) as s:
        assert ingest(s, body).action == "stored"
    # The same signed message again (a collector stopped between commit and ack): no harm, no blame.
    with session_scope(engine) as s:
        assert ingest(s, body).action == "duplicate"
    # Another result for the stored job is a replay, refused and counted.
    with session_scope(engine) as s:
        replay = ingest(s, envelope(result_for(job, samples_ns=[1_100_000, 1_300_000],
                                               **dict(zip(("avg_ts", "stddev_ts"), summarize(job.n_tokens, [1_100_000, 1_300_000])))),
                                    leased=sent))
        assert replay.action == "rejected" and "replay" in replay.reason
    with session_scope(engine) as s:
        assert s.get(WorkerRow, "w1").n_rejected == 1
    with session_scope(engine) as s:
        assert s.scalar(select(func.count()).select_from(ResultRow)) == 1
        row = s.get(ResultRow, job.job_id)
        for col in RESULT_KEY_COLUMNS:
            assert getattr(row, col) == row.result[col], col
        assert s.get(JobRow, job.job_id).state == "done"


def test_a_forged_result_is_rejected_and_the_job_keeps_its_state(engine, jobs):
    job = jobs[1]
    sent = lease(engine, job)
    with session_scope(engine) as s:
        out = ingest(s, envelope(result_for(job, avg_ts=123456.0), leased=sent))
    assert out.action == "rejected" and "avg_ts" in out.reason
    with session_scope(engine) as s:
        assert s.get(ResultRow, job.job_id) is None
        row = s.get(JobRow, job.job_id)
        assert (row.state, row.error, row.lease_id) == ("sent", None, sent.lease_id)


def test_unknown_job_and_malformed_messages_are_rejected(engine, jobs):
    other = result_for(jobs[0], job_id="not-a-job")
    with session_scope(engine) as s:
        assert ingest(s, envelope(other)).action == "rejected"
        assert ingest(s, {"kind": "result", "job_id": 3, "worker": "w1"}).action == "rejected"
        assert ingest(s, "pickle?").action == "rejected"


def test_result_from_a_worker_other_than_the_sender_is_rejected(engine, jobs):
    sent = lease(engine, jobs[0], "w2")
    with session_scope(engine) as s:
        out = ingest(s, envelope(result_for(jobs[0]), worker="w2", leased=sent))
    assert out.action == "rejected" and "claims worker" in out.reason


def test_forgeries_are_refused_logged_and_counted(engine, jobs):
    """The forgery suite: every kind of lie a worker could tell is refused with its reason."""
    job = jobs[0]
    good = result_for(job)
    # w1 joined announcing 1 GB/s: about 10 tok/s for this model, whatever its results say.
    hello = Envelope(kind="hello", worker="w1", capabilities=Capabilities(
        engines=["llamacpp"], hardware=Hardware(host_bandwidth_gbps=1.0, bandwidth_gbps=1.0)))
    with session_scope(engine) as s:
        ingest(s, signed_body(hello, TOKENS["w1"]))
    sent, other = lease(engine, job), lease(engine, jobs[1])
    forged = {
        "bad signature": dict(envelope(good, leased=sent), signature="0" * 64),
        "unsigned": {k: v for k, v in envelope(good, leased=sent).items() if k != "signature"},
        "another worker's signature": envelope(good, worker="w1", token=TOKENS["w2"], leased=sent),
        "unknown worker": signed_body(Envelope(kind="result", job_id=job.job_id, worker="ghost",
                                               result=good.model_copy(update={"worker": "ghost"})), "x" * 64),
        "impossible tok/s": envelope(result_for(jobs[1], hardware=Hardware(bandwidth_gbps=1000.0),
                                                model_facts=ModelFacts(size_bytes=100 << 20)), leased=other),
        "mismatched sha256": envelope(result_for(job, source_sha256="f" * 64), leased=sent),
    }
    reasons = {}
    for what, body in forged.items():
        with session_scope(engine) as s:
            out = ingest(s, body)
        assert out.action == "rejected", what
        reasons[what] = out.reason
    assert "bad signature" in reasons["bad signature"] and "bad signature" in reasons["unsigned"]
    assert "bad signature" in reasons["another worker's signature"]
    assert "unknown worker" in reasons["unknown worker"]
    assert "memory-bandwidth limit" in reasons["impossible tok/s"]
    assert "sha256" in reasons["mismatched sha256"]
    with session_scope(engine) as s:
        assert s.scalar(select(func.count()).select_from(ResultRow)) == 0
        assert s.scalar(select(func.count()).select_from(RejectionRow)) == len(forged)
        view = {v.name: v for v in list_workers(s)}
        # The ghost is nobody: its refusal is logged but no worker row is made for a name that has no token.
        assert "ghost" not in view
        # Only what w1's own signature proves it sent counts against it: the two lies it signed,
        # not the three messages anyone could have written under its name.
        assert view["w1"].n_rejected == 2
        assert "sha256" in view["w1"].last_rejection  # the last lie told in w1's name
        assert view["w2"].n_rejected == 0  # w2's token was stolen, w2 told no lie
        # A refused message changes no job.
        assert {r.state for r in s.scalars(select(JobRow).where(JobRow.id.in_([job.job_id, jobs[1].job_id])))} == {"sent"}


def test_a_job_leased_to_one_worker_refuses_another_workers_started_and_result(engine, jobs):
    job = jobs[0]
    sent = lease(engine, job)
    with session_scope(engine) as s:
        # w2 read the lease off the broker: a lease is granted to a worker, not to whoever echoes it.
        assert ingest(s, envelope(result_for(job), worker="w2", kind="started", leased=sent)).action == "rejected"
        out = ingest(s, envelope(result_for(job, worker="w2"), worker="w2", leased=sent))
    assert out.action == "rejected" and "leased to worker 'w1'" in out.reason
    with session_scope(engine) as s:
        assert s.get(JobRow, job.job_id).state == "sent"
        assert s.get(WorkerRow, "w2").n_rejected == 2
    with session_scope(engine) as s:
        assert ingest(s, envelope(result_for(job), kind="started", leased=sent)).action == "started"
        assert ingest(s, envelope(result_for(job), leased=sent)).action == "stored"
    with session_scope(engine) as s:
        assert s.get(WorkerRow, "w1").n_rejected == 0


def test_heartbeats_record_capabilities_and_silent_workers_lose_their_jobs(engine, jobs):
    job = jobs[0]
    caps = Capabilities(engines=["llamacpp"], hardware=Hardware(cpu="test cpu"))
    sent = lease(engine, job)
    with session_scope(engine) as s:
        assert ingest(s, signed_body(Envelope(kind="hello", worker="w1", capabilities=caps), TOKENS["w1"])).action == "hello"
        assert ingest(s, envelope(result_for(job), kind="started", leased=sent)).action == "started"
    with session_scope(engine) as s:
        assert s.get(WorkerRow, "w1").capabilities["hardware"]["cpu"] == "test cpu"
        assert requeue_lost(s, dead_after_s=60, max_attempts=3) == 0  # w1 was just seen
    with session_scope(engine) as s:
        assert requeue_lost(s, dead_after_s=0, max_attempts=3) == 1
        row = s.get(JobRow, job.job_id)
        assert (row.state, row.lease_id) == ("queued", None)
    # The freed lease is over: w1's late result for it is refused, and not held against it.
    with session_scope(engine) as s:
        assert ingest(s, envelope(result_for(job), leased=sent)).action == "rejected"
        assert s.get(JobRow, job.job_id).state == "queued"
    # A poison job that keeps killing its workers fails for good after max_attempts.
    for _ in range(2):
        again = lease(engine, job)
        with session_scope(engine) as s:
            ingest(s, envelope(result_for(job), kind="started", leased=again))
        with session_scope(engine) as s:
            requeue_lost(s, dead_after_s=0, max_attempts=3)
    with session_scope(engine) as s:
        row = s.get(JobRow, job.job_id)
        assert row.state == "failed" and "gave up after 3 attempts" in row.error


def test_flagged_workers_are_listed(engine, tokens):
    with session_scope(engine) as s:
        set_flag(s, "w2", True, "failed a canary")
    with session_scope(engine) as s:
        assert flagged_names(s) == {"w2"}


def test_a_failed_result_marks_the_job_failed(engine, jobs):
    job = jobs[0]
    failed = Result.failed(job, "w1", "x.gguf is not a GGUF file")
    with session_scope(engine) as s:
        # Not from the worker the job was sent to: refused, the job untouched.
        assert ingest(s, envelope(failed)).action == "rejected"
        assert s.get(JobRow, job.job_id).state == "queued"
    sent = lease(engine, job)
    with session_scope(engine) as s:
        assert ingest(s, envelope(failed, leased=sent)).action == "stored"
    with session_scope(engine) as s:
        row = s.get(JobRow, job.job_id)
        assert (row.state, row.error) == ("failed", "x.gguf is not a GGUF file")


def test_a_transient_failure_is_retried_with_growing_delay_then_fails_for_good(engine, jobs):
    job = jobs[0]
    delays = []
    for attempt in (1, 2, 3):
        sent = lease(engine, job)
        assert sent.attempt == attempt
        with session_scope(engine) as s:
            ingest(s, envelope(result_for(job), kind="started", leased=sent), max_attempts=3)
            failed = Result.failed(job, "w1", "could not download smollm2-135m from PyPI", transient=True)
            out = ingest(s, envelope(failed, leased=sent), max_attempts=3)
        if attempt < 3:
            assert out.action == "retry" and out.job_id == job.job_id
            with session_scope(engine) as s:
                row = s.get(JobRow, job.job_id)
                assert row.state == "queued"
                delays.append((as_utc(row.not_before) - utc_now()).total_seconds())
        else:
            assert out.action == "stored"
    assert delays == sorted(delays) and delays[0] < delays[1]
    with session_scope(engine) as s:
        assert s.get(JobRow, job.job_id).state == "failed"


def test_a_job_past_its_time_limit_is_requeued_even_if_its_worker_is_alive(engine, jobs):
    job = jobs[0]
    sent = lease(engine, job)
    hello = signed_body(Envelope(kind="hello", worker="w1"), TOKENS["w1"])
    with session_scope(engine) as s:
        ingest(s, hello)
    with session_scope(engine) as s:
        ingest(s, envelope(result_for(job), kind="started", leased=sent))
    with session_scope(engine) as s:
        assert requeue_lost(s, dead_after_s=600, max_attempts=3, job_timeout_s=3600) == 0
    with session_scope(engine) as s:
        assert requeue_lost(s, dead_after_s=600, max_attempts=3, job_timeout_s=0) == 1
        assert s.get(JobRow, job.job_id).state == "queued"


def test_a_restarted_worker_gives_back_the_job_its_previous_process_was_running(engine, jobs):
    job = jobs[0]
    sent = lease(engine, job)
    with session_scope(engine) as s:
        assert ingest(s, envelope(result_for(job), kind="started", leased=sent)).action == "started"
    hello = signed_body(Envelope(kind="hello", worker="w1"), TOKENS["w1"])
    with session_scope(engine) as s:
        assert ingest(s, hello).action == "hello"
    with session_scope(engine) as s:
        assert s.get(JobRow, job.job_id).state == "queued"
    # Started after the hello: the new process's own job is left alone.
    again = lease(engine, job)
    with session_scope(engine) as s:
        ingest(s, envelope(result_for(job), kind="started", leased=again))
    with session_scope(engine) as s:
        assert ingest(s, hello).action == "hello"
        assert s.get(JobRow, job.job_id).state == "running"


def test_a_batch_reads_its_rows_once_and_stores_each_result_once(engine, jobs):
    from orchestrator.collector import preload

    sent = {j.job_id: lease(engine, j) for j in jobs}
    bodies = [envelope(result_for(j), kind=k, leased=sent[j.job_id]) for j in jobs for k in ("started", "result")]
    # The queue gives the very same message again inside one batch (a collector stopped before it acked).
    bodies.append(copy.deepcopy(bodies[1]))
    with session_scope(engine) as s:
        known = preload(s, bodies)
        actions = [ingest(s, b, known=known).action for b in bodies]
    assert actions[:-1] == ["started", "stored"] * len(jobs)
    # The copy is recognised as the same result, not taken for a forgery: nobody is blamed for it.
    assert actions[-1] == "duplicate"
    with session_scope(engine) as s:
        assert s.scalar(select(func.count()).select_from(ResultRow)) == len(jobs)
        assert s.scalar(select(func.count()).select_from(ResultRow).where(ResultRow.job_id == jobs[0].job_id)) == 1
        assert s.scalar(select(func.count()).select_from(RejectionRow)) == 0
        assert all(v.n_rejected == 0 for v in list_workers(s))
        assert s.get(JobRow, jobs[0].job_id).state == "done"


def test_a_message_is_bounded_before_it_is_parsed_and_only_json_is_decoded():
    from orchestrator.collector import MAX_MESSAGE_BYTES, Undecodable, decode

    import json

    million_hashes = json.dumps({"kind": "heartbeat", "worker": "w1", "capabilities": {"models": ["a" * 64] * 1_000_000}})
    big = decode(million_hashes.encode(), "application/json")
    assert isinstance(big, Undecodable) and big.size_bytes > MAX_MESSAGE_BYTES and "above the" in big.reason
    assert len(big.head) == 4096  # what is kept of it is bounded too
    assert "not JSON" in decode(b'{"kind": "res', "application/json").reason
    assert "application/x-python-serialize" in decode(b"\x80\x04K\x01.", "application/x-python-serialize").reason
    assert "compressed" in decode(b"x\x9c", "application/json", compressed=True).reason
    assert decode(b'{"worker": "w1"}', "application/json") == {"worker": "w1"}


def test_a_dead_letter_is_kept_and_counted_against_nobody(engine, tokens):
    from orchestrator.collector import decode
    from orchestrator.db import DeadLetterRow

    with session_scope(engine) as s:
        out = ingest(s, decode(b"\x80\x04junk", "application/x-python-serialize"), size_bytes=6)
    assert out.action == "dead letter"
    with session_scope(engine) as s:
        (letter,) = s.scalars(select(DeadLetterRow)).all()
        (rejection,) = s.scalars(select(RejectionRow)).all()
        assert letter.head == b"\x80\x04junk" and letter.size_bytes == 6
        assert rejection.size_bytes == 6 and "dead letters" in rejection.reason
        assert all(v.n_rejected == 0 for v in list_workers(s))


def test_a_heartbeat_over_the_schemas_bounds_is_refused_and_stores_nothing(engine, tokens):
    caps = Capabilities.model_construct(engines=["llamacpp"], hardware=Hardware(), models=["a" * 64] * 5000,
                                        queues=[], version="", offered_ram_bytes=0, offered_vram_bytes=0)
    body = signed_body(Envelope(kind="heartbeat", worker="w1", capabilities=caps), TOKENS["w1"])
    with session_scope(engine) as s:
        out = ingest(s, body)
    assert out.action == "rejected" and "capabilities.models" in out.reason
    with session_scope(engine) as s:
        w1 = s.get(WorkerRow, "w1")
        assert w1.capabilities is None and w1.n_rejected == 1  # its own signature proves it sent it


def test_the_roofline_uses_the_bandwidth_held_from_the_first_hello_and_the_jobs_own_bytes(engine, jobs):
    tg = next(j for j in jobs if j.kind == "tg")
    assert tg.active_bytes > 0

    def hello(gbps):
        hw = Hardware(host_bandwidth_gbps=gbps, bandwidth_gbps=gbps)
        with session_scope(engine) as s:
            ingest(s, signed_body(Envelope(kind="hello", worker="w1", capabilities=Capabilities(
                engines=["llamacpp"], hardware=hw)), TOKENS["w1"]))

    hello(0.0)  # announcing nothing: judged against its class's bound
    with session_scope(engine) as s:
        assert s.get(WorkerRow, "w1").host_bandwidth_gbps is None
    hello(2.0)
    hello(500.0)  # cannot raise what was held
    with session_scope(engine) as s:
        assert s.get(WorkerRow, "w1").host_bandwidth_gbps == 2.0
    roofline_ts = 2.0e9 / tg.active_bytes
    sent = lease(engine, tg)

    def decode_at(rate_ts, **update):
        samples = [int(tg.n_tokens * 1e9 / rate_ts)] * tg.repetitions
        avg, std = summarize(tg.n_tokens, samples)
        return result_for(tg, samples_ns=samples, avg_ts=avg, stddev_ts=std, decode_ts=avg, **update)

    lies = [decode_at(10 * 1.5 * roofline_ts, roofline_tok_s=1e9), decode_at(10 * 1.5 * roofline_ts, roofline_tok_s=0.0,
                                                                            model_facts=ModelFacts(size_bytes=1))]
    for lie in lies:
        with session_scope(engine) as s:
            out = ingest(s, envelope(lie, leased=sent))
        assert out.action == "rejected" and "memory-bandwidth limit" in out.reason
    with session_scope(engine) as s:
        assert ingest(s, envelope(decode_at(roofline_ts), leased=sent)).action == "stored"


@pytest.mark.parametrize("bad", ["", "0" * 64, "not-a-hash", "C" * 64])
def test_every_sha256_a_result_carries_must_be_a_digest(engine, jobs, bad):
    job = jobs[0]
    sent = lease(engine, job)
    for field in ("model_sha256", "source_sha256"):
        with session_scope(engine) as s:
            out = ingest(s, envelope(result_for(job, **{field: bad}), leased=sent))
        assert out.action == "rejected" and "sha256" in out.reason, (field, bad)
    with session_scope(engine) as s:
        assert s.get(JobRow, job.job_id).state == "sent"
