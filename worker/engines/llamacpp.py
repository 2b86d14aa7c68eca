"""The llama.cpp engine, through llama-cpp-python's low-level API.

Low-level on purpose: the high-level `Llama` object copies logits and adds bookkeeping to
every step, which would be measured as if it were llama.cpp. This module owns contexts,
batches, the KV cache and the quantizer; it knows nothing of jobs or timers.
"""

from __future__ import annotations

import ctypes
import logging
import os
from pathlib import Path
from typing import Sequence

import llama_cpp
import llama_cpp._logger
import numpy as np

from farm.contract import EngineConfig
import worker.engines.llamacpp_levers as levers
from worker.engines.base import EngineError

# llama.cpp's load chatter would bury the worker's own log.
llama_cpp._logger.logger.setLevel(logging.ERROR)
_backend_ready = False


def _init_backend() -> None:
    global _backend_ready
    if not _backend_ready:
        llama_cpp.llama_backend_init()
        _backend_ready = True


def default_n_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def ftype_for(quant: str) -> int:
    prefix = "ALL" if quant == "F32" else "MOSTLY"
    value = getattr(llama_cpp, f"LLAMA_FTYPE_{prefix}_{quant}", None)
    if value is None:
        raise EngineError(f"llama.cpp {llama_cpp.__version__} cannot quantize to {quant}")
    return int(value)


def quantize(source: Path, target: Path, quant: str, n_threads: int = 0) -> None:
    """Write `source` re-quantized to `quant` at `target` with llama.cpp's own quantizer."""
    _init_backend()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype_for(quant)
    # Catalogue models ship already quantized; deriving other types from them is requantizing.
    params.allow_requantize = True
    params.nthread = n_threads or default_n_threads()
    rc = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    if rc != 0 or not Path(target).exists():
        raise EngineError(f"llama.cpp could not quantize {source} to {quant} (code {rc})")


def tokenize_with(vocab, text: str, add_bos: bool, special: bool) -> list[int]:
    """llama.cpp's tokenizer for a loaded vocabulary (also the torch engine's, so prompts match)."""
    data = text.encode("utf-8")
    n_max = len(data) + 8
    buf = (llama_cpp.llama_token * n_max)()
    n = llama_cpp.llama_tokenize(vocab, data, len(data), buf, n_max, add_bos, special)
    if n < 0:  # -n is the size needed
        n_max = -n
        buf = (llama_cpp.llama_token * n_max)()
        n = llama_cpp.llama_tokenize(vocab, data, len(data), buf, n_max, add_bos, special)
    return list(buf[:n])


def chat_prompt_with(model, user_text: str) -> str:
    """user_text as one user turn in the model's own chat template; the text itself without one."""
    tmpl = llama_cpp.llama_model_chat_template(model, None)
    if not tmpl:
        return user_text
    content = user_text.encode("utf-8")
    msg = (llama_cpp.llama_chat_message * 1)()
    msg[0].role, msg[0].content = b"user", content
    size = len(content) + 1024
    buf = ctypes.create_string_buffer(size)
    n = llama_cpp.llama_chat_apply_template(tmpl, msg, 1, True, buf, size)
    if n < 0:
        return user_text  # a template llama.cpp's built-in matcher does not know
    if n > size:
        buf = ctypes.create_string_buffer(n + 1)
        n = llama_cpp.llama_chat_apply_template(tmpl, msg, 1, True, buf, n + 1)
    return buf.raw[:n].decode("utf-8", errors="replace")


def _is_host_buffer(name: str) -> bool:
    """llama.cpp's host buffer types: CPU, CPU_Mapped, CPU_REPACK, and pinned memory like CUDA_Host."""
    return name.startswith("CPU") or name.endswith("_Host")


class LlamaCppBackend:
    name = "llamacpp"

    def __init__(self) -> None:
        self._model = None
        self._ctx = None
        self._batch = None
        self._threadpool = None
        self._sampler = None
        self._n_past = 0
        self._model_conditions: dict = {}
        self._conditions: dict = {}

    def load(self, path: Path, config: EngineConfig, n_ctx: int) -> None:
        self.load_model(path, config)
        self.new_context(config, n_ctx)

    def load_model(self, path: Path, config: EngineConfig) -> None:
        """The weights, placed by the model-level parameters (farm.contract.MODEL_LEVEL_FIELDS)."""
        _init_backend()
        self.close()
        mparams = self._model_params()
        mparams.n_gpu_layers = 999 if config.n_gpu_layers < 0 else config.n_gpu_layers
        mparams.split_mode = levers.SPLIT_MODES[config.split_mode]
        mparams.main_gpu = config.main_gpu
        # This llama.cpp spells use_mmap as a load mode (llama-bench -lm none, default auto);
        # on, it keeps llama.cpp's own choice (AUTO maps the file where it can).
        mparams.load_mode = llama_cpp.LLAMA_LOAD_MODE_AUTO if config.use_mmap else llama_cpp.LLAMA_LOAD_MODE_NONE
        # Refused, not ignored: llama.cpp drops the shares of devices it lacks, and a result
        # recorded "ts=1/1" that ran on one device (or on the CPU) would be a lie.
        if problem := levers.split_refusal(config, levers.devices()):
            raise EngineError(problem)
        n_max = int(llama_cpp.llama_max_devices())
        if len(config.tensor_split) > n_max:
            raise EngineError(f"tensor_split has {len(config.tensor_split)} shares but this llama.cpp build "
                              f"handles at most {n_max} devices; give at most {n_max}")
        split = (ctypes.c_float * n_max)(*config.tensor_split)
        mparams.tensor_split = split
        try:
            overrides = levers.Overrides(config.override_tensors, config.n_cpu_moe)
        except ValueError as exc:
            raise EngineError(str(exc)) from None
        if overrides:
            mparams.tensor_buft_overrides = overrides.pointer()
        with levers.captured_log() as lines:
            model = llama_cpp.llama_model_load_from_file(str(path).encode(), mparams)
        if not model:
            raise EngineError(f"llama.cpp could not load {path}: the file is corrupt, its architecture is unsupported, "
                              "or its weights do not fit in memory")
        self._model = model
        self._path = Path(path)
        self._model_config = config
        report = levers.model_report(lines)
        if overrides and not report["overridden"]:
            self.close()
            raise EngineError(f"override_tensors/n_cpu_moe matched no tensor of {Path(path).name} "
                              f"(patterns {', '.join(overrides.patterns)[:200]}); fix the pattern")
        buffers = report["model_buffers"]
        self._model_conditions = {
            "weights_host_bytes": sum(b for n, b in buffers.items() if _is_host_buffer(n)),
            "weights_device_bytes": sum(b for n, b in buffers.items() if not _is_host_buffer(n)),
            "flags": {
                "n_gpu_layers": int(mparams.n_gpu_layers), "split_mode": config.split_mode,
                "main_gpu": config.main_gpu, "tensor_split": "/".join(f"{x:g}" for x in config.tensor_split),
                "use_mmap": config.use_mmap,
                # llama-bench's own name for the mode (llama_load_mode_name), as its JSON writes it.
                "load_mode": "auto" if config.use_mmap else "none",
                "n_cpu_moe": config.n_cpu_moe, "override_tensors": config.override_tensors,
                "n_tensors_overridden": len(report["overridden"]),
                # Bytes of the tensors an override placed (to the MiB llama.cpp prints per tensor):
                # on a GPU build, weights moved to host RAM; on a CPU build, into a plain CPU buffer.
                "overridden_bytes": report["overridden_bytes"],
                "model_size_bytes": int(llama_cpp.llama_model_size(model)),
                **{f"weights_{n}_bytes": b for n, b in buffers.items()},
                "gpu_offload": bool(llama_cpp.llama_supports_gpu_offload()),
            },
        }
        self._vocab = llama_cpp.llama_model_get_vocab(model)
        self._n_vocab = int(llama_cpp.llama_vocab_n_tokens(self._vocab))

    def new_context(self, config: EngineConfig, n_ctx: int) -> None:
        """A context for the loaded model with the context-level parameters (KV types, batches, threads,
        flash attention, threadpool); the old one is freed. The model must have been loaded with a
        config of the same model_level()."""
        if not self._model:
            raise EngineError("no model loaded: call load_model first")
        if config.model_level() != self._model_config.model_level():
            raise EngineError("the loaded model was placed with other model-level parameters; load it again")
        self._free_context()
        # More threads than cores only time-slice them: capped, and the request kept in the flags.
        n_threads = min(config.n_threads, default_n_threads()) if config.n_threads else default_n_threads()
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = n_ctx
        self._n_ctx_asked = n_ctx
        self._n_batch = min(config.n_batch, n_ctx)
        cparams.n_batch = self._n_batch
        cparams.n_ubatch = min(config.n_ubatch, self._n_batch)
        cparams.n_threads = n_threads
        cparams.n_threads_batch = n_threads
        cparams.flash_attn_type = {
            "on": llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED, "off": llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED,
            "auto": llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO,
        }[config.flash_attn]
        cparams.type_k = levers.GGML_TYPES[config.type_k]
        cparams.type_v = levers.GGML_TYPES[config.type_v]
        cparams.offload_kqv = not config.no_kv_offload
        cparams.no_perf = True
        with levers.captured_log() as lines:
            ctx = llama_cpp.llama_init_from_model(self._model, cparams)
        if not ctx:
            text = "".join(lines)
            if "quantized V cache" in text or "V cache quantization requires flash_attn" in text:
                raise EngineError(f"llama.cpp refused type_v {config.type_v} without flash attention; "
                                  "set flash_attn: on (or auto) for a quantized V cache")
            raise EngineError(f"out of memory: llama.cpp could not allocate a context of {n_ctx} tokens "
                              f"(KV cache and compute buffers) for {self._path}; lower the context")
        self._ctx = ctx
        report = levers.context_report(lines)
        # A persistent threadpool, as llama-bench attaches (levers.shared_threadpool says why shared).
        self._threadpool = levers.shared_threadpool(n_threads, config.cpu_mask, config.cpu_strict, config.poll,
                                                    config.prio)
        self._threadpool.attach(ctx)
        self._mem = llama_cpp.llama_get_memory(ctx)
        self._batch = llama_cpp.llama_batch_init(self._n_batch, 0, 1)
        n_b = self._n_batch
        self._batch_token = np.ctypeslib.as_array(self._batch.token, shape=(n_b,))
        self._batch_pos = np.ctypeslib.as_array(self._batch.pos, shape=(n_b,))
        self._batch_logits = np.ctypeslib.as_array(self._batch.logits, shape=(n_b,))
        np.ctypeslib.as_array(self._batch.n_seq_id, shape=(n_b,))[:] = 1
        for i in range(n_b):  # one sequence: every position's seq id is 0, set once per context
            self._batch.seq_id[i][0] = 0
        # A one-token batch filled once: a decode step sets its token and position, nothing else.
        self._step = llama_cpp.llama_batch_init(1, 0, 1)
        self._step.n_tokens, self._step.n_seq_id[0], self._step.seq_id[0][0], self._step.logits[0] = 1, 1, 0, True
        # Greedy argmax in C, as llama.cpp's own tools sample: no logits copied into Python per step.
        # Inside a chain, whose candidate buffer is kept: a bare greedy sampler allocates and
        # fills a fresh n_vocab array every call (68 us against 48 us a step on SmolLM2).
        self._sampler = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        llama_cpp.llama_sampler_chain_add(self._sampler, llama_cpp.llama_sampler_init_greedy())
        self._n_past = 0
        kv_buffers, compute = report.get("kv_buffers", {}), report.get("compute_buffers", {})
        type_k, type_v = report.get("type_k", config.type_k), report.get("type_v", config.type_v)
        flags = dict(self._model_conditions["flags"])
        flags.update({
            "n_ctx": int(llama_cpp.llama_n_ctx(ctx)), "n_batch": int(llama_cpp.llama_n_batch(ctx)),
            "n_ubatch": int(llama_cpp.llama_n_ubatch(ctx)), "flash_attn": config.flash_attn,
            "flash_attn_used": report["flash_attn_used"],
            "type_k": type_k, "type_v": type_v, "no_kv_offload": config.no_kv_offload,
            "kv_k_bytes": report.get("kv_k_bytes", 0), "kv_v_bytes": report.get("kv_v_bytes", 0),
            "cpu_mask": config.cpu_mask, "cpu_strict": config.cpu_strict, "poll": config.poll, "prio": config.prio,
            "threadpool": self._threadpool is not None,
        })
        if config.n_threads > n_threads:
            flags["n_threads_asked"] = config.n_threads
        host = self._model_conditions["weights_host_bytes"]
        device = self._model_conditions["weights_device_bytes"]
        for buffers in (kv_buffers, compute):
            host += sum(b for n, b in buffers.items() if _is_host_buffer(n))
            device += sum(b for n, b in buffers.items() if not _is_host_buffer(n))
        self._conditions = {
            "n_threads": int(llama_cpp.llama_n_threads(ctx)), "kv_type": type_k if type_k == type_v else f"{type_k}/{type_v}", "flags": flags,
            "weights_host_bytes": self._model_conditions["weights_host_bytes"],
            "weights_device_bytes": self._model_conditions["weights_device_bytes"],
            "kv_bytes": sum(kv_buffers.values()), "compute_bytes": sum(compute.values()),
            # llama.cpp's own allocations, split by where they live: the process's device memory
            # (not the whole GPU's) and the host memory it needs beside it.
            "device_bytes": device, "host_bytes": host,
        }

    def state_size(self) -> int:
        """llama_state_get_size: the bytes a saved state would take (the used KV cells among them)."""
        return int(llama_cpp.llama_state_get_size(self._ctx))

    def _model_params(self):
        return llama_cpp.llama_model_default_params()

    # Hooks for a subclass that keeps what each decode call produces (llamacpp_mtp's hidden states).
    def _before_call(self) -> None:
        pass

    def _after_chunk(self, n_tokens: int, last_chunk: bool) -> None:
        pass

    @property
    def n_vocab(self) -> int:
        return self._n_vocab

    def tokenize(self, text: str, add_bos: bool = True, special: bool = False) -> list[int]:
        """special: parse control tokens written in the text (a chat template's markers)."""
        return tokenize_with(self._vocab, text, add_bos, special)

    def reset(self) -> None:
        llama_cpp.llama_memory_clear(self._mem, True)
        self._n_past = 0

    def _decode(self, tokens: Sequence[int], all_logits: bool = False) -> int:
        batch = self._batch
        if all_logits and len(tokens) > self._n_batch:
            raise EngineError(f"cannot verify {len(tokens)} tokens in one batch of {self._n_batch}: raise n_batch")
        if self._n_past + len(tokens) > self._n_ctx_asked:
            # llama.cpp may pad its cache past the context asked for; the job's context is the contract.
            raise EngineError(f"{self._n_past + len(tokens)} positions (prompt, tokens and drafts) do not fit the "
                              f"context of {self._n_ctx_asked}: raise n_ctx")
        self._before_call()
        for start in range(0, len(tokens), self._n_batch):
            chunk = tokens[start:start + self._n_batch]
            n = len(chunk)
            # Whole columns written through numpy views of the batch, not token by token through ctypes.
            self._batch_token[:n] = chunk
            self._batch_pos[:n] = np.arange(self._n_past, self._n_past + n, dtype=np.int32)
            self._batch_logits[:n] = all_logits
            last_chunk = start + self._n_batch >= len(tokens)
            if last_chunk:
                self._batch_logits[n - 1] = True
            batch.n_tokens = n
            rc = llama_cpp.llama_decode(self._ctx, batch)
            if rc != 0:
                raise EngineError(f"llama_decode failed with code {rc} at position {self._n_past}: context full or out of memory")
            self._n_past += n
            self._after_chunk(n, last_chunk)
        # Decode may return before the backend finishes; timers must see finished work (sampling
        # reads the logits, which synchronises).
        return int(llama_cpp.llama_sampler_sample(self._sampler, self._ctx, -1))

    # What speculative decoding needs beyond plain greedy decoding (worker/speculative.py).

    @property
    def n_past(self) -> int:
        """Tokens in the KV cache: the position the next token is written at."""
        return self._n_past

    def verify(self, tokens: Sequence[int]) -> list[int]:
        """Append tokens in one batch; return the greedy next token after each of them."""
        if not tokens:
            raise EngineError("verify needs at least one token")
        self._decode(tokens, all_logits=True)
        # Every position asked for logits, so the output rows are the batch positions in order.
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits(self._ctx), shape=(len(tokens), self._n_vocab))
        return [int(t) for t in logits.argmax(axis=1)]

    def truncate(self, n_past: int) -> None:
        """Forget KV entries at positions >= n_past (the tokens a verifier rejected)."""
        if not 0 <= n_past <= self._n_past:
            raise EngineError(f"cannot truncate a cache of {self._n_past} tokens to {n_past}")
        if n_past < self._n_past:
            if not llama_cpp.llama_memory_seq_rm(self._mem, 0, n_past, -1):
                raise EngineError("llama.cpp refused to remove KV entries (a recurrent model cannot roll back)")
            self._n_past = n_past

    def top_prob(self) -> float:
        """Softmax probability of the greedy token after the last decoded position."""
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self._ctx, -1), shape=(self._n_vocab,))
        top = float(logits.max())
        return 1.0 / float(np.exp(logits.astype(np.float64) - top).sum())

    def token_texts(self) -> list[bytes]:
        """Every token's text, by id: two models can share KV-free token streams only if these agree."""
        return [llama_cpp.llama_vocab_get_text(self._vocab, i) or b"" for i in range(self._n_vocab)]

    def chat_prompt(self, user_text: str) -> str:
        """user_text as one user turn in the model's own chat template; the text itself without one."""
        return chat_prompt_with(self._model, user_text)

    def chunk_logits(self, tokens: Sequence[int]) -> np.ndarray:
        """Logits (T, V) after every position of tokens, evaluated from an empty cache.

        In batches of n_batch, each asking for every position's logits; the cache carries the
        chunk across batches, so a row sees every token before it, as one batch would."""
        if not tokens:
            raise EngineError("chunk_logits needs at least one token")
        self.reset()
        out = np.empty((len(tokens), self._n_vocab), dtype=np.float32)
        for start in range(0, len(tokens), self._n_batch):
            part = tokens[start:start + self._n_batch]
            self._decode(part, all_logits=True)
            out[start:start + len(part)] = np.ctypeslib.as_array(llama_cpp.llama_get_logits(self._ctx),
                                                                 shape=(len(part), self._n_vocab))
        self.reset()
        return out

    def prefill(self, tokens: Sequence[int]) -> int:
        if not tokens:
            raise EngineError("prefill needs at least one token")
        return self._decode(tokens)

    def _append(self, token: int) -> None:
        step = self._step
        step.token[0], step.pos[0] = token, self._n_past
        rc = llama_cpp.llama_decode(self._ctx, step)
        if rc != 0:
            raise EngineError(f"llama_decode failed with code {rc} at position {self._n_past}: context full or out of memory")
        self._n_past += 1

    def decode(self, token: int) -> int:
        self._append(token)
        # Sampling reads the logits, which waits for the backend: the step is finished when it returns.
        return int(llama_cpp.llama_sampler_sample(self._sampler, self._ctx, -1))

    def feed(self, token: int) -> None:
        """decode without reading the output: what llama-bench's timed step does (decode, then
        wait for the backend), for a test whose next token is already known."""
        self._append(token)
        llama_cpp.llama_synchronize(self._ctx)

    def conditions(self) -> dict:
        """Settings the context really ran with (thread count after defaulting, KV cache type)."""
        return dict(self._conditions)

    def versions(self) -> dict[str, str]:
        return {
            "llama_cpp_python": llama_cpp.__version__,
            "llama_cpp": llama_cpp.llama_version().decode() if callable(llama_cpp.llama_version) else str(llama_cpp.llama_version),
            "llama_cpp_system": llama_cpp.llama_print_system_info().decode().strip(),
        }

    def _free_context(self) -> None:
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            llama_cpp.llama_batch_free(self._step)
            self._batch = None
        if self._sampler:
            llama_cpp.llama_sampler_free(self._sampler)
            self._sampler = None
        if self._threadpool is not None:
            levers.release_threadpool(self._threadpool, self._ctx)
            self._threadpool = None
        if self._ctx:
            llama_cpp.llama_free(self._ctx)
            self._ctx = None

    def close(self) -> None:
        self._free_context()
        if self._model:
            llama_cpp.llama_model_free(self._model)
            self._model = None
