"""Planning a sweep against the farm it will run on: checks that need to know the workers.

Owns: refusing thread counts no machine has. Knows the workers only through their announced
Capabilities (passed in); reads no database and no model file itself.
"""

from __future__ import annotations

import os

from farm.contract import Capabilities


def thread_refusal(n_threads: list[int], workers: dict[str, Capabilities]) -> str | None:
    """One line when a requested thread count exceeds the cores of every worker (with none known,
    this machine's): more threads than cores only time-slice them, a figure worth nothing."""
    cores = [w.hardware.n_cpu_cores for w in workers.values() if w.hardware.n_cpu_cores > 0]
    where = f"the largest registered worker has {max(cores)}" if cores else \
        f"no worker is known and this machine has {os.cpu_count() or 1}"
    limit = max(cores) if cores else (os.cpu_count() or 1)
    too_many = sorted(n for n in set(n_threads) if n > limit)
    if not too_many:
        return None
    return (f"n_threads {', '.join(map(str, too_many))} is above the cores of every machine ({where}); "
            f"use values up to {limit}, or 0 for the worker's own count")
