"""The embedded broker delivers a sweep's jobs in the order they were sent (model-major)."""

from farm.broker import JOBS_QUEUE, create_app
from farm.settings import Settings
from orchestrator.dispatch import send
from orchestrator.planning import plan
from orchestrator.sweep import SweepSpec


def test_jobs_sent_in_a_burst_come_out_of_the_embedded_broker_in_order(data_dir):
    app = create_app(Settings())
    jobs = plan(SweepSpec(name="order", models=["smollm2-135m"], quants=["Q4_1", "Q8_0"],
                            n_prompt=[8, 16, 32, 64], n_gen=[4, 8, 16, 32], repetitions=1))
    send(app, jobs)
    received = []
    with app.connection_for_read() as conn:
        queue = conn.SimpleQueue(JOBS_QUEUE)
        while len(received) < len(jobs):
            message = queue.get(timeout=5)
            received.append(message.headers["id"])
            message.ack()
        queue.close()
    assert received == [j.job_id for j in jobs]
