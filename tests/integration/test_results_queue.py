"""The results queue on real Redis: what a stopped collector held comes back, and only results."""

from __future__ import annotations

import pytest
import redis
from kombu import Queue

from farm.broker import RESULTS_QUEUE, create_app, publish_envelope, worker_queue
from farm.contract import Envelope
from farm.settings import Settings
from orchestrator.broker_audit import restore_stale_results

pytestmark = pytest.mark.integration

JOBS_QUEUE = worker_queue("w1")


def test_results_a_stopped_collector_held_come_back_and_running_jobs_stay_put(redis_url):
    app = create_app(Settings(broker_url=redis_url))
    publish_envelope(app, Envelope(kind="heartbeat", worker="w1"), "t" * 64)
    app.send_task("tokenfarm.run_job", args=[{}], queue=JOBS_QUEUE)
    # A collector takes a result and a worker takes a job; neither acknowledges. A synchronous
    # get, not a consumer: a consumer's BRPOP may still be pending on the server and would take
    # the restored result straight back.
    dead = app.connection_for_read()
    held = [Queue(name).bind(dead.channel()).get(no_ack=False, accept=["json"])
            for name in (RESULTS_QUEUE, JOBS_QUEUE)]
    assert all(message is not None for message in held)
    lists = redis.Redis.from_url(redis_url)
    with app.connection_for_read() as conn:
        assert restore_stale_results(conn, older_than_s=3600) == 0  # too young to be a dead holder's
        assert lists.llen(RESULTS_QUEUE) == 0
        assert restore_stale_results(conn, older_than_s=0) == 1  # the result, not the running job
    assert lists.llen(RESULTS_QUEUE) == 1 and lists.llen(JOBS_QUEUE) == 0
    assert lists.hlen("unacked") == 1  # the job's message, still held by its worker
    dead.close()
