"""Inference engines behind one Backend protocol; engine-specific code stays in its module."""

from __future__ import annotations

from worker.engines.base import Backend, EngineError


def create_backend(engine: str) -> Backend:
    """The Backend for an engine name; imports the engine only when asked (heavy imports)."""
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

        return TorchBackend()
    raise EngineError(f"unknown engine {engine!r}: use llamacpp or torch")


__all__ = ["Backend", "EngineError", "create_backend"]
