"""A demo stopped with SIGTERM (as `timeout`, a CI runner or the GPU check stop it) stops its
worker too: the worker runs in a session of its own, so nothing else would."""

import os
import signal
import subprocess
import sys
import time

from tests.conftest import REPO

SCRIPT = """
import sys, time
from pathlib import Path
from orchestrator.db import make_engine, upgrade
from orchestrator.demo import local_worker
url = sys.argv[1]
upgrade(url)
with local_worker(make_engine(url), "stopped-demo", Path(sys.argv[2]), stop_timeout_s=20) as proc:
    print(proc.pid, flush=True)
    time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie has ended; only its parent has not reaped it
        return f.read().split()[2] != "Z"


def test_sigterm_to_the_demo_stops_its_worker(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENFARM_DATA_DIR": str(tmp_path)}
    demo = subprocess.Popen([sys.executable, "-c", SCRIPT, f"sqlite:///{tmp_path / 'db.sqlite3'}",
                             str(tmp_path / "worker.log")], env=env, stdout=subprocess.PIPE, text=True)
    try:
        worker_pid = int(demo.stdout.readline())
        assert _alive(worker_pid)
        demo.send_signal(signal.SIGTERM)
        assert demo.wait(timeout=60) == 128 + signal.SIGTERM
        deadline = time.monotonic() + 30
        while _alive(worker_pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(worker_pid), "the worker outlived the demo that started it"
    finally:
        demo.kill()
