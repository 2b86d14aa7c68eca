"""TorchBackend: the Backend and SpeculativeBackend protocols over the PyTorch decoder in model.py.

Owns the model, its KV cache, the position counter and device synchronisation, so that every
call returns with the device idle and a timer read after it measures the work. Sampling is
greedy, as the protocol asks. Beyond the protocol it offers the optional capabilities of
base.py: the last pass's distributions (`probs`, for sampled acceptance), its hidden states
(`last_hidden`) and MTP heads (`mtp_context`; their math is mtp.py's), which the MTP drafter
reads: the file's own NextN layer where it has one (the project's glm4moe MTP build, the head
llama.cpp drafts with), else the heads trained and saved beside the model file. It knows
nothing of jobs, repetitions, timers or drafters.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from farm.contract import EngineConfig
from worker.engines.base import EngineError
from worker.engines.torch.gguf_loader import (
    GGUFError,
    GGUFVocab,
    load_model,
    load_nextn_heads,
    nextn_layer_count,
)
from worker.engines.torch.kv_cache import KVCache
from worker.engines.torch.model import Transformer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class TorchBackend:
    name = "torch"

    def __init__(self, device: str = "cpu", dtype: str = "float32") -> None:
        if dtype not in DTYPES:
            raise EngineError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise EngineError(f"device {device!r} asked for, but torch {torch.__version__} sees no CUDA device")
        self.dtype = DTYPES[dtype]
        self._model: Transformer | None = None
        self._cache: KVCache | None = None
        self._vocab: GGUFVocab | None = None
        self._path: Path | None = None
        self._n_past = 0
        self._n_batch = 1
        self._n_threads_asked = 0
        self._last_logits: torch.Tensor | None = None  # (T, V) of the last pass, float32
        self._last_hidden: torch.Tensor | None = None  # (T, E) of the last pass
        self._nextn_heads = None  # the loaded file's NextN layer as an MTP head, read on first use
        self._n_nextn_layers: int | None = None  # from the file's header, read on first use

    @classmethod
    def from_model(cls, model: Transformer, n_ctx: int, n_batch: int = 512) -> "TorchBackend":
        """A backend over a model already in memory (tests, MTP training): no file, no tokenizer."""
        param = next(model.parameters())
        backend = cls(str(param.device), str(param.dtype).removeprefix("torch."))
        backend._model, backend._cache, backend._n_batch = model, model.new_cache(n_ctx), n_batch
        return backend

    def load(self, path: Path, config: EngineConfig, n_ctx: int) -> None:
        # Refused rather than ignored: a result recorded "q8_0 KV" that ran f16 would be a lie.
        if unknown := config.llamacpp_only():
            raise EngineError(f"the torch engine has no {', '.join(unknown)} (llama.cpp's parameters); "
                              "run these jobs with engine llamacpp or leave them at their defaults")
        # n_gpu_layers and flash_attn are llama.cpp's knobs; here the device is chosen whole
        # at construction, and attention is whatever scaled_dot_product_attention picks.
        # More threads than cores only time-slice them: capped, and the request kept in the flags.
        n_cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        self._n_threads_asked = config.n_threads if config.n_threads > n_cores else 0
        if config.n_threads:
            torch.set_num_threads(min(config.n_threads, n_cores))
        self._nextn_heads, self._n_nextn_layers = None, None
        try:
            self._model = load_model(Path(path), self.dtype, self.device)
            self._vocab = GGUFVocab(Path(path))
        except (GGUFError, OSError, ValueError) as e:
            self.close()
            raise EngineError(f"torch could not load {path}: {e}") from e
        try:
            self._cache = self._model.new_cache(n_ctx)
        except RuntimeError as e:
            # CUDA raises torch.OutOfMemoryError (a RuntimeError); the CPU allocator a plain
            # RuntimeError ("can't allocate memory"). Either way the worker must go on.
            self.close()
            raise EngineError(f"out of memory: no room for a KV cache of {n_ctx} tokens on {self.device} "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); lower the context") from e
        self._n_batch = config.n_batch
        self._n_past = 0
        self._path = Path(path)
        self._synchronize()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    @property
    def n_vocab(self) -> int:
        return self._model.config.n_vocab

    @property
    def model(self) -> Transformer:
        return self._model

    def tokenize(self, text: str, add_bos: bool = True, special: bool = False) -> list[int]:
        return self._vocab.tokenize(text, add_bos, special)

    def chat_prompt(self, user_text: str) -> str:
        """The same chat-templated prompt the llama.cpp engine builds, so both engines see one input."""
        return self._vocab.chat_prompt(user_text)

    def reset(self) -> None:
        # Stale keys and values past the position counter are never attended to, and the
        # next prefill overwrites them, so there is nothing to clear.
        self._n_past = 0

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def _forward(self, tokens: Sequence[int], all_logits: bool) -> torch.Tensor:
        """Append tokens; keep the logits (T or 1, V) and hidden states of the last chunk."""
        if self._n_past + len(tokens) > self._cache.n_ctx:
            raise EngineError(
                f"{len(tokens)} tokens at position {self._n_past} overflow the context of {self._cache.n_ctx}: raise n_ctx"
            )
        ids = torch.tensor([list(tokens)], dtype=torch.long, device=self.device)  # (1, T)
        # A verify batch must come out of one pass: its logits are needed at every position.
        step = ids.shape[1] if all_logits else self._n_batch
        hidden = []
        for start in range(0, ids.shape[1], step):
            chunk = ids[:, start:start + step]  # (1, T_chunk)
            logits, h = self._model(chunk, self._n_past, self._cache, all_logits=all_logits)  # (1, T_chunk or 1, V)
            self._n_past += chunk.shape[1]
            hidden.append(h[0])
        self._last_logits = logits[0].float()
        self._last_hidden = torch.cat(hidden) if len(hidden) > 1 else hidden[0]  # (T, E)
        return self._last_logits

    def _run(self, tokens: Sequence[int]) -> int:
        # .item() waits for the argmax, but not for work queued on other streams.
        token = int(self._forward(tokens, all_logits=False)[-1].argmax().item())
        self._synchronize()
        return token

    def prefill(self, tokens: Sequence[int]) -> int:
        if not tokens:
            raise EngineError("prefill needs at least one token")
        return self._run(tokens)

    def decode(self, token: int) -> int:
        return self._run((token,))

    def feed(self, token: int) -> None:
        """decode without the arg-max and its read-back, for a step whose next token is known."""
        self._forward((token,), all_logits=False)
        self._synchronize()

    def chunk_logits(self, tokens: Sequence[int]) -> np.ndarray:
        """Logits (T, V) after every position of tokens, from an empty cache, in one forward."""
        if not tokens:
            raise EngineError("chunk_logits needs at least one token")
        self.reset()
        logits = self._forward(tokens, all_logits=True).cpu().numpy()  # (T, V) float32
        self._synchronize()
        self.reset()
        return logits

    # What draft-and-verify decoding needs beyond plain greedy decoding (worker/speculative.py).

    @property
    def n_past(self) -> int:
        return self._n_past

    def verify(self, tokens: Sequence[int]) -> list[int]:
        """Append tokens in one pass; return the greedy next token after each of them."""
        if not tokens:
            raise EngineError("verify needs at least one token")
        predicted = self._forward(tokens, all_logits=True).argmax(-1).tolist()
        self._synchronize()
        return predicted

    def truncate(self, n_past: int) -> None:
        # The cache is written by absolute position: the next pass overwrites rejected entries.
        if not 0 <= n_past <= self._n_past:
            raise EngineError(f"cannot truncate a cache of {self._n_past} tokens to {n_past}")
        self._n_past = n_past

    def top_prob(self) -> float:
        return float(torch.softmax(self._last_logits[-1], dim=-1).max())

    def probs(self, temperature: float) -> torch.Tensor:
        """The target's sampling distribution (T, V) after each position of the last pass."""
        return torch.softmax(self._last_logits / temperature, dim=-1)

    def last_hidden(self) -> torch.Tensor:
        """Hidden states (T, E) of the last pass's positions, for drafters that read them (MTP)."""
        return self._last_hidden

    def mtp_context(self, n_mtp: int, base_sha256: str | None = None):
        """A running context of MTP heads drafting n_mtp tokens, as long as the cache: the loaded
        file's NextN layer where it has one (one head recursing past itself, as llama.cpp drafts
        with it; heads beside such a file are not read), else the first n_mtp of the heads saved
        beside the file."""
        from worker.engines.torch.mtp import MTPError, load_heads

        if self._path is None:
            raise EngineError("MTP heads live beside a model file: this backend was built from a model in memory")
        if n_mtp < 1:
            raise EngineError(f"n_mtp is {n_mtp}: draft at least one token")
        try:
            # The header once per loaded file: a technique job asks for a context per prompt.
            if self._n_nextn_layers is None:
                self._n_nextn_layers = nextn_layer_count(self._path)
            if self._nextn_heads is None and self._n_nextn_layers > 0:
                self._nextn_heads = load_nextn_heads(self._path, self._model)
            heads = (self._nextn_heads if self._nextn_heads is not None
                     else load_heads(self._model, self._path, n_mtp, base_sha256=base_sha256))
        except (MTPError, GGUFError) as exc:
            raise EngineError(str(exc)) from exc
        return heads.new_context(self._cache.n_ctx)

    def token_texts(self) -> list[bytes]:
        return self._vocab.token_texts()

    def conditions(self) -> dict:
        """Settings the engine really ran with: threads after torch's defaulting, the cache dtype."""
        flags = {"device": str(self.device), "n_batch": self._n_batch}
        if self.device.type == "cuda":
            # This process's own peak on the card since its last load (the device's used memory
            # counts every process on it): weights, KV cache and the largest activation.
            flags["cuda_max_allocated_bytes"] = int(torch.cuda.max_memory_allocated(self.device))
        if self._n_threads_asked:
            flags["n_threads_asked"] = self._n_threads_asked
        return {"n_threads": torch.get_num_threads(), "kv_type": str(self.dtype).removeprefix("torch."),
                "flags": flags}

    def versions(self) -> dict[str, str]:
        if self.device.type == "cuda":
            device = f"cuda:{torch.cuda.get_device_name(self.device)}"
            extra = {"cuda": str(torch.version.cuda)}
        else:
            device = f"cpu:{torch.backends.cpu.get_cpu_capability()}"
            extra = {"torch_threads": str(torch.get_num_threads())}
        return {"torch": torch.__version__, "device": device, "dtype": str(self.dtype).removeprefix("torch."), **extra}

    def close(self) -> None:
        self._model = None
        self._nextn_heads, self._n_nextn_layers = None, None
        self._path = None
        self._cache = None
        if self._vocab is not None:
            self._vocab.close()
            self._vocab = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
