"""The PyTorch engine: a llama-family decoder run from GGUF weights, for techniques that need
the model's insides (speculative verification, MTP heads, MoE dispatch).

model.py holds the arithmetic, kv_cache.py the cache, gguf_loader.py the file format and
tokenizer, backend.py the Backend protocol. This package is imported only by workers that
run it, so the orchestrator never pulls in torch.
"""

from worker.engines.torch.backend import TorchBackend

__all__ = ["TorchBackend"]
