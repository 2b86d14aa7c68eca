"""Inference engines behind one Backend protocol; engine-specific code stays in its module."""

from __future__ import annotations

from worker.engines.base import Backend, EngineError


def create_backend(engine: str) -> Backend:
    """The Backend for an engine name; imports the engine only when asked (heavy imports)."""
    if engine == "llamacpp":
        from worker.engines.llamacpp import LlamaCppBackend

        return LlamaCppBackend()
    raise EngineError(f"unknown engine {engine!r}: this worker has llamacpp")


__all__ = ["Backend", "EngineError", "create_backend"]
