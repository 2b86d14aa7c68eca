"""What machine a measurement ran on: a summary stored with every Result.

Reads /proc and platform facts only; it never touches an engine.
"""

from __future__ import annotations

import os
import platform
from functools import lru_cache

from worker.contract import Hardware


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_bytes() -> int:
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@lru_cache(maxsize=1)
def summary() -> Hardware:
    n_cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 0)
    return Hardware(
        cpu=_cpu_model(),
        n_cpu_cores=n_cores,
        ram_bytes=_ram_bytes(),
        os=f"{platform.system()} {platform.release()}",
    )
