"""The demo's worker: one worker process on this machine, registered and supervised for the
length of a sweep, so `tokenfarm demo` runs the whole road with no server.

Owns starting the process with its own token (never the database URL) and stopping it. Knows
nothing of sweeps; it imports no worker code (the worker runs as `python -m worker`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from sqlalchemy.engine import Engine

from orchestrator.db import session_scope
from orchestrator.workers import add_worker


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)


@contextmanager
def local_worker(engine: Engine, name: str, log_path: Path, stop_timeout_s: float = 30) -> Iterator[subprocess.Popen]:
    """A registered worker process named `name`, logging to log_path; SIGTERM (it finishes its
    job) on leaving, SIGKILL if it has not ended after stop_timeout_s."""
    with session_scope(engine) as session:
        token = add_worker(session, name, rotate=True)
    worker_env = {k: v for k, v in os.environ.items() if k != "TOKENFARM_DATABASE_URL"}
    worker_env["TOKENFARM_WORKER_TOKEN"] = token
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "worker", "--name", name], env=worker_env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    # The worker is in a session of its own (a Ctrl-C meant for the demo must not cut its job
    # short), so a demo killed with SIGTERM (`timeout`, a CI runner, `kill`) has to stop it itself:
    # Python's default for SIGTERM ends the process without running this block's finally.
    in_main = threading.current_thread() is threading.main_thread()  # only it may set handlers
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm) if in_main else None
    try:
        yield proc
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=stop_timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
