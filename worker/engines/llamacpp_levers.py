"""What llama-cpp-python does not bind of llama.cpp's levers, bound here with ctypes.

Owns: ggml's backend registry and device list as llama-bench reads them (`backends`, the GPU
devices, their descriptions); tensor buffer-type overrides (`-ot`, `--n-cpu-moe`) as the NULL-terminated array of
llama_model_tensor_buft_override that llama_model_params takes; the ggml CPU threadpool
(`--cpu-mask`, `--cpu-strict`, `--poll`, `--prio`) attached to a context; and a capture of
llama.cpp's log while a model or context is made, because the buffer sizes and KV types it
prints are the only read-back of them that a C caller gets (llama_memory_breakdown is C++).
Binds against the libraries llama_cpp itself loaded (same handles, never a second copy); knows
nothing of jobs or timers.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import re
from collections.abc import Iterator
from pathlib import Path

import llama_cpp
import llama_cpp._logger

from farm.contract import EngineConfig, parse_override_tensors
from worker.engines.base import EngineError
from worker.hardware import EngineDevices, GgmlDevice, ggml_devices

_LIB_DIR = Path(llama_cpp.__file__).parent / "lib"


def _lib(name: str) -> ctypes.CDLL:
    # The same file llama_cpp loaded through libllama's dependencies: dlopen returns that handle.
    return ctypes.CDLL(str(_LIB_DIR / name), mode=ctypes.RTLD_GLOBAL)


_base = _lib("libggml-base.so")
_ggml = _lib("libggml.so")
_cpu = _lib("libggml-cpu.so")

_base.ggml_backend_dev_buffer_type.argtypes = [ctypes.c_void_p]
_base.ggml_backend_dev_buffer_type.restype = ctypes.c_void_p
_base.ggml_backend_buft_name.argtypes = [ctypes.c_void_p]
_base.ggml_backend_buft_name.restype = ctypes.c_char_p
_base.ggml_backend_cpu_buffer_type.argtypes = []
_base.ggml_backend_cpu_buffer_type.restype = ctypes.c_void_p
_ggml.ggml_backend_dev_count.argtypes = []
_ggml.ggml_backend_dev_count.restype = ctypes.c_size_t
_ggml.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
_ggml.ggml_backend_dev_get.restype = ctypes.c_void_p
_ggml.ggml_backend_reg_count.argtypes = []
_ggml.ggml_backend_reg_count.restype = ctypes.c_size_t
_ggml.ggml_backend_reg_get.argtypes = [ctypes.c_size_t]
_ggml.ggml_backend_reg_get.restype = ctypes.c_void_p
_ggml.ggml_backend_load_all.argtypes = []
_ggml.ggml_backend_load_all.restype = None
_base.ggml_backend_reg_name.argtypes = [ctypes.c_void_p]
_base.ggml_backend_reg_name.restype = ctypes.c_char_p
_base.ggml_backend_reg_dev_count.argtypes = [ctypes.c_void_p]
_base.ggml_backend_reg_dev_count.restype = ctypes.c_size_t
_base.ggml_backend_dev_name.argtypes = [ctypes.c_void_p]
_base.ggml_backend_dev_name.restype = ctypes.c_char_p
_base.ggml_backend_dev_description.argtypes = [ctypes.c_void_p]
_base.ggml_backend_dev_description.restype = ctypes.c_char_p
_base.ggml_backend_dev_type.argtypes = [ctypes.c_void_p]
_base.ggml_backend_dev_type.restype = ctypes.c_int
_base.ggml_backend_dev_backend_reg.argtypes = [ctypes.c_void_p]
_base.ggml_backend_dev_backend_reg.restype = ctypes.c_void_p


def _text(value: bytes | None) -> str:
    return (value or b"").decode("utf-8", errors="replace")


@functools.lru_cache(maxsize=1)
def devices() -> EngineDevices:
    """This build's backends in llama-bench's spelling and the GPU devices its model loader uses,
    read from ggml's registry as llama-bench reads it (get_backend, get_gpu_info). Read once: the
    registry is fixed for the life of the process, and every job's Result and every load ask."""
    if not _ggml.ggml_backend_reg_count():
        _ggml.ggml_backend_load_all()  # a build with dynamically loaded backends, as llama.cpp loads them
    regs = []
    for i in range(_ggml.ggml_backend_reg_count()):
        reg = _ggml.ggml_backend_reg_get(i)
        regs.append((_text(_base.ggml_backend_reg_name(reg)), int(_base.ggml_backend_reg_dev_count(reg))))
    found = []
    for i in range(_ggml.ggml_backend_dev_count()):
        dev = _ggml.ggml_backend_dev_get(i)
        found.append(GgmlDevice(_text(_base.ggml_backend_dev_name(dev)), int(_base.ggml_backend_dev_type(dev)),
                                _text(_base.ggml_backend_dev_description(dev)),
                                _text(_base.ggml_backend_reg_name(_base.ggml_backend_dev_backend_reg(dev)))))
    return ggml_devices(regs, found)


def split_refusal(config: EngineConfig, found: EngineDevices) -> str | None:
    """One line when the config names more GPUs (tensor_split's shares, main_gpu's index) than this
    build has; None when it fits."""
    if config.n_gpus_named <= found.n_gpus:
        return None
    if not found.n_gpus:
        fix = " and ".join((["leave tensor_split empty"] if config.n_split_devices else []) +
                           (["leave main_gpu at 0"] if config.main_gpu else []))
        return f"this llama.cpp build has no GPU device (backends {found.backends}); {fix}"
    plural = "s" if found.n_gpus > 1 else ""
    if config.n_split_devices > found.n_gpus:
        return (f"tensor_split names {config.n_split_devices} devices but this llama.cpp build has {found.n_gpus} "
                f"GPU device{plural} (backends {found.backends}); give at most {found.n_gpus} share{plural}")
    return (f"main_gpu {config.main_gpu} names device {config.main_gpu} but this llama.cpp build has {found.n_gpus} "
            f"GPU device{plural} (backends {found.backends}, numbered from 0); give main_gpu below {found.n_gpus}")

GGML_MAX_N_THREADS = 512  # ggml.h; the size of ggml_threadpool_params.cpumask


class ThreadpoolParams(ctypes.Structure):
    """ggml.h's struct ggml_threadpool_params."""

    _fields_ = [
        ("cpumask", ctypes.c_bool * GGML_MAX_N_THREADS),
        ("n_threads", ctypes.c_int),
        ("prio", ctypes.c_int),
        ("poll", ctypes.c_uint32),
        ("strict_cpu", ctypes.c_bool),
        ("paused", ctypes.c_bool),
    ]


class TensorBuftOverride(ctypes.Structure):
    """llama.h's struct llama_model_tensor_buft_override."""

    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


_base.ggml_threadpool_params_init.argtypes = [ctypes.POINTER(ThreadpoolParams), ctypes.c_int]
_base.ggml_threadpool_params_init.restype = None
_cpu.ggml_threadpool_new.argtypes = [ctypes.POINTER(ThreadpoolParams)]
_cpu.ggml_threadpool_new.restype = ctypes.c_void_p
_cpu.ggml_threadpool_free.argtypes = [ctypes.c_void_p]
_cpu.ggml_threadpool_free.restype = None
_llama = llama_cpp.llama_cpp._lib
_llama.llama_attach_threadpool.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
_llama.llama_attach_threadpool.restype = None
_llama.llama_detach_threadpool.argtypes = [ctypes.c_void_p]
_llama.llama_detach_threadpool.restype = None

# ggml's type ids for the KV cache types of farm.contract.KV_TYPES.
GGML_TYPES: dict[str, int] = {
    "f32": llama_cpp.GGML_TYPE_F32, "f16": llama_cpp.GGML_TYPE_F16, "bf16": 30,
    "q8_0": llama_cpp.GGML_TYPE_Q8_0, "q4_0": llama_cpp.GGML_TYPE_Q4_0, "q4_1": llama_cpp.GGML_TYPE_Q4_1,
    "iq4_nl": 20, "q5_0": llama_cpp.GGML_TYPE_Q5_0, "q5_1": llama_cpp.GGML_TYPE_Q5_1,
}
SPLIT_MODES = {"none": llama_cpp.LLAMA_SPLIT_MODE_NONE, "layer": llama_cpp.LLAMA_SPLIT_MODE_LAYER,
               "row": llama_cpp.LLAMA_SPLIT_MODE_ROW, "tensor": getattr(llama_cpp, "LLAMA_SPLIT_MODE_TENSOR", 3)}
PRIOS = {-1: -1, 0: 0, 1: 1, 2: 2, 3: 3}  # enum ggml_sched_priority: low, normal, medium, high, realtime

# llama.cpp's --n-cpu-moe: the expert tensors of layer i (common.h's LLM_FFN_EXPS_REGEX).
EXPERT_TENSOR_REGEX = r"\.ffn_(up|down|gate|gate_up)_(ch|)exps"


def n_cpu_moe_patterns(n_cpu_moe: int) -> list[str]:
    """The patterns --n-cpu-moe N adds: the experts of the first N layers, kept in host memory."""
    return [rf"blk\.{i}{EXPERT_TENSOR_REGEX}" for i in range(n_cpu_moe)]


def buffer_types() -> dict[str, int]:
    """Each device's buffer type by its name ('CPU', 'CUDA0', ...), as llama.cpp's -ot looks them up."""
    found = {}
    for i in range(_ggml.ggml_backend_dev_count()):
        buft = _base.ggml_backend_dev_buffer_type(_ggml.ggml_backend_dev_get(i))
        if buft:
            found[_base.ggml_backend_buft_name(buft).decode()] = buft
    return found


class Overrides:
    """A NULL-terminated llama_model_tensor_buft_override array; keep it alive while the model loads."""

    def __init__(self, override_tensors: str, n_cpu_moe: int) -> None:
        pairs = parse_override_tensors(override_tensors)
        bufts = buffer_types()
        for _, name in pairs:
            if name not in bufts:
                raise EngineError(f"override_tensors names the buffer type {name!r}, which this build lacks; "
                                  f"use one of {', '.join(bufts)}")
        # --n-cpu-moe's overrides come after -ot's, as llama.cpp's argument parser appends them.
        entries = [(p, bufts[b]) for p, b in pairs]
        entries += [(p, _base.ggml_backend_cpu_buffer_type()) for p in n_cpu_moe_patterns(n_cpu_moe)]
        self.patterns = [p for p, _ in entries]
        self._strings = [p.encode() for p in self.patterns]
        self.array = (TensorBuftOverride * (len(entries) + 1))()
        for i, (s, (_, buft)) in enumerate(zip(self._strings, entries)):
            self.array[i].pattern, self.array[i].buft = s, buft
        self.array[len(entries)].pattern, self.array[len(entries)].buft = None, None

    def __bool__(self) -> bool:
        return bool(self.patterns)

    def pointer(self) -> int:
        return ctypes.addressof(self.array)


def parse_cpu_mask(mask: str) -> list[bool]:
    """llama.cpp's hex --cpu-mask (lowest bit: CPU 0) as ggml's cpumask array of bools."""
    text = mask.lower().removeprefix("0x")
    try:
        value = int(text or "0", 16)
    except ValueError:
        raise EngineError(f"cpu_mask {mask!r} is not hexadecimal; write e.g. '0x3' for CPUs 0 and 1") from None
    if value >> GGML_MAX_N_THREADS:
        raise EngineError(f"cpu_mask {mask!r} names CPUs above {GGML_MAX_N_THREADS - 1}")
    return [bool(value >> i & 1) for i in range(GGML_MAX_N_THREADS)]


class Threadpool:
    """A ggml CPU threadpool built as llama-bench builds it; see shared_threadpool for who owns it."""

    def __init__(self, n_threads: int, cpu_mask: str, cpu_strict: bool, poll: int, prio: int) -> None:
        params = ThreadpoolParams()
        _base.ggml_threadpool_params_init(ctypes.byref(params), n_threads)
        mask = parse_cpu_mask(cpu_mask)
        for i, bit in enumerate(mask):
            params.cpumask[i] = bit
        params.strict_cpu, params.poll, params.prio = cpu_strict, poll, PRIOS[prio]
        self.params = params
        self.handle = _cpu.ggml_threadpool_new(ctypes.byref(params))
        if not self.handle:
            raise EngineError(f"ggml could not start a threadpool of {n_threads} threads with cpu_mask {cpu_mask}, "
                              f"prio {prio}; lower prio (realtime needs privileges) or fix the mask")

    def attach(self, ctx) -> None:
        _llama.llama_attach_threadpool(ctx, self.handle, self.handle)

    def detach(self, ctx) -> None:
        _llama.llama_detach_threadpool(ctx)

    def free(self, ctx=None) -> None:
        if self.handle:
            if ctx:
                self.detach(ctx)
            _cpu.ggml_threadpool_free(self.handle)
            self.handle = None


# One pool per setting for the whole process, shared by every context that asks for it. Every
# context gets one, as llama-bench attaches one: without it ggml's CPU backend starts and joins a
# disposable pool in every graph, a cost paid by each decode step. Shared, not one per context,
# because speculative decoding runs a draft (or MTP) context and the target's in turn: two pools
# would each keep polling threads on the same cores while the other computes.
_pools: dict[tuple, list] = {}  # key -> [Threadpool, n_contexts]


def shared_threadpool(n_threads: int, cpu_mask: str, cpu_strict: bool, poll: int, prio: int) -> Threadpool:
    key = (n_threads, cpu_mask.lower(), cpu_strict, poll, prio)
    entry = _pools.get(key)
    if entry is None:
        entry = _pools[key] = [Threadpool(n_threads, cpu_mask, cpu_strict, poll, prio), 0]
    entry[1] += 1
    return entry[0]


def release_threadpool(pool: Threadpool, ctx) -> None:
    """Detach pool from ctx (before ctx is freed); the last context to let go frees the pool."""
    pool.detach(ctx)
    for key, entry in list(_pools.items()):
        if entry[0] is pool:
            entry[1] -= 1
            if entry[1] <= 0:
                pool.free()
                del _pools[key]
            return
    pool.free()


def n_shared_threadpools() -> int:
    return len(_pools)


# --- llama.cpp's own report of what it allocated, read from its log ------------------------------

_captured: list[str] | None = None
_last_level = 0


@llama_cpp.llama_log_callback
def _log_callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    global _last_level
    if _captured is not None:
        _captured.append(text.decode("utf-8", errors="replace"))
    # Everything else as llama_cpp's own callback would (it filters by its logger's level).
    if level != 5:
        _last_level = level
    llama_cpp._logger.llama_log_callback(level, text, user_data)


llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))


@contextlib.contextmanager
def captured_log() -> Iterator[list[str]]:
    """llama.cpp's log lines (debug included) while the block runs; one capture at a time."""
    global _captured
    lines: list[str] = []
    _captured = lines
    try:
        yield lines
    finally:
        _captured = None


_MIB = 1024 * 1024
_MODEL_BUFFER = re.compile(r"\b(\S+) model buffer size\s*=\s*([\d.]+) MiB")
_KV_SIZE = re.compile(r"K \((\w+)\):\s*([\d.]+) MiB, V \((\w+)\):\s*([\d.]+) MiB")
_COMPUTE = re.compile(r"\b(\S+) compute buffer size\s*=\s*([\d.]+) MiB")
_KV_BUFFER = re.compile(r"\b(\S+) KV buffer size\s*=\s*([\d.]+) MiB")
_OVERRIDDEN = re.compile(r"tensor (\S+) \((\d+) MiB \S+\) buffer type overridden to (\S+)")


def model_report(lines: list[str]) -> dict:
    """Model buffers by buffer type (bytes, to llama.cpp's printed 0.01 MiB) and the tensors overridden."""
    text = "".join(lines)
    buffers: dict[str, int] = {}
    for name, mib in _MODEL_BUFFER.findall(text):
        buffers[name] = buffers.get(name, 0) + int(float(mib) * _MIB)
    # llama.cpp prints each override twice (loader and model); a dict keeps each tensor once.
    overridden = {t: (int(mib) * _MIB, b) for t, mib, b in _OVERRIDDEN.findall(text)}
    return {"model_buffers": buffers, "overridden": overridden,
            "overridden_bytes": sum(n for n, _ in overridden.values())}


def context_report(lines: list[str]) -> dict:
    """KV cache types and bytes, KV and compute buffers by buffer type, as llama.cpp printed them."""
    text = "".join(lines)
    out: dict = {}
    kv = _KV_SIZE.findall(text)
    if kv:
        out["type_k"], out["type_v"] = kv[0][0], kv[0][2]
        out["kv_k_bytes"] = sum(int(float(k) * _MIB) for _, k, _, _ in kv)
        out["kv_v_bytes"] = sum(int(float(v) * _MIB) for _, _, _, v in kv)
    out["kv_buffers"] = {n: int(float(m) * _MIB) for n, m in _KV_BUFFER.findall(text)}
    out["compute_buffers"] = {n: int(float(m) * _MIB) for n, m in _COMPUTE.findall(text)}
    # The graph llama.cpp reserved uses the fused attention op: flash attention on as it decided
    # (auto resolves here), not as it was asked.
    out["flash_attn_used"] = "FLASH_ATTN_EXT" in text
    return out
