import os

from farm.contract import Capabilities, Hardware
from orchestrator.planning import thread_refusal


def caps(n_cores: int) -> Capabilities:
    return Capabilities(hardware=Hardware(n_cpu_cores=n_cores))


def test_threads_above_every_worker_s_cores_are_refused():
    workers = {"a": caps(4), "b": caps(16)}
    assert thread_refusal([0, 4, 16], workers) is None
    problem = thread_refusal([8, 1000, 17], workers)
    assert problem.startswith("n_threads 17, 1000 is above the cores of every machine (the largest registered "
                              "worker has 16)")


def test_with_no_worker_known_this_machine_s_cores_bound_it():
    n = os.cpu_count() or 1
    assert thread_refusal([n], {}) is None
    assert f"this machine has {n}" in thread_refusal([n + 1], {"silent": caps(0)})
