"""What machine a measurement ran on: a summary stored with every Result.

Reads /proc, platform facts, NVML where `pynvml` is importable, and measures memory bandwidth
with a STREAM-style triad (numpy on host RAM; torch on a CUDA device where present), once per
boot, kept in a small file keyed by the kernel's boot id. What an engine sees of the machine
(its backends and GPU devices) is enumerated by the engine (worker/engines) and only spelled
here, as llama-bench spells it, from the plain names and types handed in. It never touches an
engine and knows nothing of models.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import resource
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import numpy as np

from farm.contract import Hardware


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _proc_bytes(path: str, key: str) -> int:
    """A "Key:  N kB" line of a Linux /proc file, in bytes; 0 where there is none."""
    try:
        with open(path, encoding="ascii") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _ram_bytes() -> int:
    return _proc_bytes("/proc/meminfo", "MemTotal")


def _n_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# Per array: far beyond any last-level cache, so the triad streams from DRAM.
TRIAD_BYTES = 256 * 2**20
TRIAD_RUNS = 3


def host_bandwidth_gbps(array_bytes: int = TRIAD_BYTES, n_runs: int = TRIAD_RUNS, n_threads: int = 0) -> float:
    """STREAM triad a = b + s*c on host RAM, best of n_runs, in GB/s (1e9 bytes/s).

    numpy runs each ufunc on one core, so the arrays are split over threads (ufuncs release
    the GIL), as llama.cpp spreads decode over every core. numpy needs two passes for the
    triad (a = s*c; a += b), which move five arrays' worth of bytes; that is what is counted.
    """
    n = array_bytes // 8
    a, b, c = np.zeros(n), np.ones(n), np.full(n, 2.0)
    n_threads = n_threads or _n_cores()
    bounds = np.linspace(0, n, n_threads + 1, dtype=np.int64)
    chunks = [slice(int(lo), int(hi)) for lo, hi in zip(bounds[:-1], bounds[1:])]

    def triad(sl: slice) -> None:
        np.multiply(c[sl], 3.0, out=a[sl])
        np.add(a[sl], b[sl], out=a[sl])

    best_ns = None
    with ThreadPoolExecutor(n_threads) as pool:
        list(pool.map(triad, chunks))  # first touch: page faults are not bandwidth
        for _ in range(n_runs):
            t0 = time.perf_counter_ns()
            list(pool.map(triad, chunks))
            ns = time.perf_counter_ns() - t0
            best_ns = ns if best_ns is None else min(best_ns, ns)
    if not np.allclose(a[: min(n, 1024)], 7.0):
        raise RuntimeError("bandwidth triad computed a wrong result")
    return 5 * n * 8 / best_ns


def device_bandwidth_gbps(array_bytes: int = TRIAD_BYTES, n_runs: int = TRIAD_RUNS) -> float:
    """The same triad on the first CUDA device through torch; 0.0 without torch or CUDA."""
    if importlib.util.find_spec("torch") is None:
        return 0.0
    import torch

    if not torch.cuda.is_available():
        return 0.0
    n = array_bytes // 4
    a = torch.zeros(n, device="cuda")
    b = torch.ones(n, device="cuda")
    c = torch.full((n,), 2.0, device="cuda")
    torch.add(b, c, alpha=3.0, out=a)
    torch.cuda.synchronize()
    best_ns = None
    for _ in range(n_runs):
        t0 = time.perf_counter_ns()
        torch.add(b, c, alpha=3.0, out=a)  # one pass: reads b and c, writes a
        torch.cuda.synchronize()
        ns = time.perf_counter_ns() - t0
        best_ns = ns if best_ns is None else min(best_ns, ns)
    return 3 * n * 4 / best_ns


def _nvml_facts() -> dict:
    """GPU name, VRAM, driver and CUDA version from NVML; empty without pynvml or a GPU."""
    try:
        import pynvml
    except ImportError:
        return {}
    try:
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        name = pynvml.nvmlDeviceGetName(handle)
        cuda = pynvml.nvmlSystemGetCudaDriverVersion()
        driver = pynvml.nvmlSystemGetDriverVersion()
        return {
            "gpu": name.decode() if isinstance(name, bytes) else name,
            "vram_bytes": int(pynvml.nvmlDeviceGetMemoryInfo(handle).total),
            "gpu_driver": driver.decode() if isinstance(driver, bytes) else driver,
            "cuda_version": f"{cuda // 1000}.{cuda % 1000 // 10}",
        }
    except Exception:  # NVML present but no usable GPU: the facts are simply absent
        return {}


def gpu_energy_mj() -> int | None:
    """Total energy the first GPU used since the driver loaded (mJ), where NVML reports it."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return int(pynvml.nvmlDeviceGetTotalEnergyConsumption(pynvml.nvmlDeviceGetHandleByIndex(0)))
    except Exception:
        return None


def gpu_used_bytes() -> int:
    try:
        import pynvml

        pynvml.nvmlInit()
        return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).used)
    except Exception:
        return 0


def peak_rss_bytes() -> int:
    """Peak resident set of this process since the last reset_peak_rss (else since it started)."""
    if peak := _proc_bytes("/proc/self/status", "VmHWM"):
        return peak
    # Not Linux: the lifetime peak (ru_maxrss, KiB), which no reset can lower.
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def reset_peak_rss() -> None:
    """Start a new peak: a worker's lifetime peak would be its bandwidth probe's or an earlier
    job's, not this job's. Linux resets VmHWM on "5" written to clear_refs (4.0 and later)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        pass


def library_versions() -> dict[str, str]:
    """Versions of libraries that change what is measured, read without importing them."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("torch", "numpy", "gguf"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return out


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def bandwidth_cache_path() -> Path:
    """Per user, outside any data dir: every worker process on this boot shares one measurement."""
    override = os.environ.get("TOKENFARM_BANDWIDTH_CACHE")
    return Path(override) if override else Path(tempfile.gettempdir()) / f"tokenfarm-bandwidth-{os.getuid()}.json"


def _load_1m() -> float:
    """The 1-minute load average: other processes streaming memory only lower a triad."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("inf")


@lru_cache(maxsize=1)
def bandwidth() -> tuple[float, float]:
    """(host, device) GB/s, measured once per boot and load: the DRAM and the device do not change
    until a reboot, and a second of probing in every worker process (every test's worker) would
    add up. A figure taken under more load than now is an underestimate that would make honest
    decodes look implausible (the collector's roofline check), so a process on a quieter machine
    probes again and the file keeps the highest figure seen, with the load it was taken under.
    Without a boot id (not Linux) the figure is measured once per process."""
    boot_id, path = _boot_id(), bandwidth_cache_path()
    load_now = _load_1m()
    cached: dict = {}
    if boot_id:
        try:
            cached = json.loads(path.read_text())
            if cached.get("boot_id") != boot_id:
                cached = {}
            elif float(cached.get("load_1m", float("inf"))) <= load_now + 0.5:
                return float(cached["host_gbps"]), float(cached["device_gbps"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            cached = {}
    host_gbps, device_gbps = host_bandwidth_gbps(), device_bandwidth_gbps()
    try:
        host_gbps = max(host_gbps, float(cached.get("host_gbps", 0.0)))
        device_gbps = max(device_gbps, float(cached.get("device_gbps", 0.0)))
    except (TypeError, ValueError):
        pass
    if boot_id and host_gbps > 0:
        try:
            # Written aside then renamed, so a process starting at the same moment reads a whole file or none.
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump({"boot_id": boot_id, "host_gbps": host_gbps, "device_gbps": device_gbps,
                           "load_1m": round(load_now, 2)}, f)
            os.replace(tmp, path)
        except OSError:
            pass
    return host_gbps, device_gbps


@lru_cache(maxsize=1)
def summary() -> Hardware:
    host_gbps, device_gbps = bandwidth()
    return Hardware(
        cpu=_cpu_model(),
        n_cpu_cores=_n_cores(),
        ram_bytes=_ram_bytes(),
        os=f"{platform.system()} {platform.release()}",
        host_bandwidth_gbps=round(host_gbps, 3),
        device_bandwidth_gbps=round(device_gbps, 3),
        bandwidth_gbps=round(device_gbps or host_gbps, 3),
        **_nvml_facts(),
    )


# --- what an engine sees: backends and GPU devices -------------------------------------------

# enum ggml_backend_dev_type (ggml-backend.h)
GGML_DEVICE_CPU, GGML_DEVICE_GPU, GGML_DEVICE_IGPU, GGML_DEVICE_ACCEL, GGML_DEVICE_META = range(5)


class GgmlDevice(NamedTuple):
    """One entry of ggml's device list: its name ("CUDA0"), type, description ("NVIDIA H200") and
    the name of the backend registry it belongs to ("CUDA")."""

    name: str
    type: int
    description: str
    reg: str


class EngineDevices(NamedTuple):
    """What one engine computes on: llama-bench's `backends` text, its GPU devices, the first one's name."""

    backends: str
    n_gpus: int
    gpu: str


def ggml_backends(regs: list[tuple[str, int]]) -> str:
    """llama-bench's `backends` (test::get_backend): the registries' names in order, CPU left out,
    RPC once at the end where an RPC registry has devices; "CPU" when nothing else is there.
    regs: (name, device count) per registry."""
    names = [name for name, _ in regs if not name.startswith("RPC") and name != "CPU"]
    if any(name.startswith("RPC") and n_devices > 0 for name, n_devices in regs):
        names.append("RPC")
    return ",".join(names) or "CPU"


def ggml_gpus(devices: list[GgmlDevice]) -> list[GgmlDevice]:
    """The GPU devices llama.cpp's model loader places layers on (llama_model_load_from_file's
    device list, without RPC servers, which no worker configures): the discrete GPUs, else the
    integrated GPUs of the first backend that has one."""
    gpus = [d for d in devices if d.type == GGML_DEVICE_GPU and not d.reg.startswith("RPC")]
    if gpus:
        return gpus
    igpus = [d for d in devices if d.type == GGML_DEVICE_IGPU]
    return [d for d in igpus if d.reg == igpus[0].reg]


def ggml_devices(regs: list[tuple[str, int]], devices: list[GgmlDevice]) -> EngineDevices:
    gpus = ggml_gpus(devices)
    return EngineDevices(ggml_backends(regs), len(gpus), gpus[0].description if gpus else "")


def torch_backends(device_type: str, hip: bool) -> str:
    """The backend a torch device computes on, in llama-bench's spelling where one exists: a CUDA
    device is "CUDA", or "ROCm" on a HIP build (torch.version.hip), Apple's "MPS", else "CPU"."""
    if device_type == "cuda":
        return "ROCm" if hip else "CUDA"
    return {"mps": "MPS"}.get(device_type, "CPU")


def with_devices(hw: Hardware, devices: EngineDevices) -> Hardware:
    """The machine's summary with what the engine of a job sees; NVML's GPU name stays where it
    has one, the engine's own description fills it where NVML is absent (Metal, ROCm, no pynvml)."""
    return hw.model_copy(update={"backends": devices.backends, "n_gpus": devices.n_gpus,
                                 "gpu": hw.gpu or devices.gpu})
