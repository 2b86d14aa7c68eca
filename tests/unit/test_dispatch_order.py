"""The embedded broker delivers a worker's leased jobs in the order they were sent (model-major)."""

from farm.broker import create_app, worker_queue
from farm.settings import Settings
from orchestrator.dispatch import send
from orchestrator.planning import plan
from orchestrator.sweep import SweepSpec


def test_jobs_sent_in_a_burst_come_out_of_the_embedded_broker_in_order(data_dir):
    app = create_app(Settings())
    jobs = plan(SweepSpec(name="order", models=["smollm2-135m"], quants=["Q4_1", "Q8_0"],
                            n_prompt=[8, 16, 32, 64], n_gen=[4, 8, 16, 32], repetitions=1))
    leased = [j.model_copy(update={"lease_id": f"lease-{i}", "attempt": 1}) for i, j in enumerate(jobs)]
    send(app, [(j, "box") for j in leased])
    received = []
    with app.connection_for_read() as conn:
        queue = conn.SimpleQueue(worker_queue("box"))
        while len(received) < len(jobs):
            message = queue.get(timeout=5)
            received.append((message.headers["id"], message.payload[0][0]["lease_id"]))
            message.ack()
        queue.close()
    # The task id is the lease's, and the message carries the lease the worker echoes.
    assert received == [(j.lease_id, j.lease_id) for j in leased]
