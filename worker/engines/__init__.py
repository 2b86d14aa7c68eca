"""Inference engines behind one Backend protocol; engine-specific code stays in its module."""

from __future__ import annotations

from worker.engines.base import Backend, EngineError
from worker.hardware import EngineDevices, torch_backends


def torch_device(asked: str = "auto") -> str:
    """The torch engine's device for a worker setting: auto is CUDA where torch sees a GPU."""
    if asked != "auto":
        return asked
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def engine_devices(engine: str, device: str = "auto") -> EngineDevices:
    """The backends and GPU devices an engine computes on, as a Result's hardware records them:
    llama.cpp's from ggml's registry (its build decides, as llama-bench reports it), torch's from
    the device the worker's setting resolves to and torch.cuda's device count."""
    if engine in ("llamacpp", "llamacpp-mtp"):
        from worker.engines.llamacpp_levers import devices

        return devices()
    if engine == "torch":
        import torch

        on = torch_device(device)
        n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        gpu = torch.cuda.get_device_name(0) if n_gpus else ""
        return EngineDevices(torch_backends(torch.device(on).type, torch.version.hip is not None), n_gpus, gpu)
    raise EngineError(f"unknown engine {engine!r}: use llamacpp or torch")


def create_backend(engine: str, config=None, device: str = "auto") -> Backend:
    """The Backend for an engine name; imports the engine only when asked (heavy imports).
    config: the job's EngineConfig, for the torch engine's precision."""
    if engine == "llamacpp":
        from worker.engines.llamacpp import LlamaCppBackend

        return LlamaCppBackend()
    if engine == "llamacpp-mtp":
        # llama.cpp with a GGUF's NextN layers loaded and its MTP context beside the target:
        # chosen by the worker for an mtp job, never named in a job.
        from worker.engines.llamacpp_mtp import LlamaCppMTPBackend

        return LlamaCppMTPBackend()
    if engine == "torch":
        from worker.engines.torch import TorchBackend

        return TorchBackend(device=torch_device(device), dtype=config.torch_dtype if config is not None else "float32")
    raise EngineError(f"unknown engine {engine!r}: use llamacpp or torch")


__all__ = ["Backend", "EngineError", "create_backend", "engine_devices"]
