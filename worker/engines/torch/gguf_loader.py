"""What the torch engine takes from a GGUF file: hyper-parameters, weights and the tokenizer.

Owns the mapping from GGUF metadata keys and tensor names (llama architecture, dense or
Mixtral-style MoE) to `ModelConfig` and the `Transformer`'s parameters. Weights are
dequantized to float32 with the `gguf` package and then cast, so a Q4_1 file runs in torch
with exactly the values llama.cpp dequantizes, though not with llama.cpp's quantized dot
products. The tokenizer is the file's own, run by llama.cpp with the vocabulary alone loaded,
so both engines see the same token ids. It knows nothing of KV caches, timers or devices
beyond where to put the tensors.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf.quants import dequantize

from worker.engines.torch.model import ModelConfig, Transformer

SUPPORTED_ARCHS = ("llama",)

# GGUF tensor name -> Transformer parameter name; {n} is the layer.
_GLOBAL_NAMES = {
    "token_embd.weight": "tok_embd.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "attn_norm.weight",
    "attn_q.weight": "attn.wq.weight",
    "attn_k.weight": "attn.wk.weight",
    "attn_v.weight": "attn.wv.weight",
    "attn_output.weight": "attn.wo.weight",
    "ffn_norm.weight": "ffn_norm.weight",
    "ffn_gate.weight": "ffn.w_gate.weight",
    "ffn_up.weight": "ffn.w_up.weight",
    "ffn_down.weight": "ffn.w_down.weight",
    "ffn_gate_inp.weight": "ffn.router.weight",
    "ffn_gate_exps.weight": "ffn.w_gate",
    "ffn_up_exps.weight": "ffn.w_up",
    "ffn_down_exps.weight": "ffn.w_down",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(.+)")


class GGUFError(Exception):
    """The file is not a model this engine can run; the message says why."""


def _field(reader: gguf.GGUFReader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        if default is None:
            raise GGUFError(f"GGUF metadata lacks {key!r}")
        return default
    return field.contents()


def read_config(reader: gguf.GGUFReader) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise GGUFError(f"architecture {arch!r} is not supported by the torch engine (only {', '.join(SUPPORTED_ARCHS)})")
    n_head = int(_field(reader, f"{arch}.attention.head_count"))
    n_embd = int(_field(reader, f"{arch}.embedding_length"))
    head_dim = int(_field(reader, f"{arch}.attention.key_length", n_embd // n_head))

    scaling = _field(reader, f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", "linear"):
        raise GGUFError(f"RoPE scaling {scaling!r} is not supported by the torch engine (none or linear)")
    factor = float(_field(reader, f"{arch}.rope.scaling.factor", 0.0)) if scaling == "linear" else 0.0

    vocab_size = reader.fields.get(f"{arch}.vocab_size")
    n_vocab = int(vocab_size.contents()) if vocab_size is not None else len(_field(reader, "tokenizer.ggml.tokens"))

    n_expert = int(_field(reader, f"{arch}.expert_count", 0))
    return ModelConfig(
        n_layer=int(_field(reader, f"{arch}.block_count")),
        n_embd=n_embd,
        n_head=n_head,
        n_kv_head=int(_field(reader, f"{arch}.attention.head_count_kv", n_head)),
        n_ff=int(_field(reader, f"{arch}.feed_forward_length")),  # per expert in a Mixtral
        n_vocab=n_vocab,
        head_dim=head_dim,
        n_rot=int(_field(reader, f"{arch}.rope.dimension_count", head_dim)),
        rope_base=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        rope_freq_scale=1.0 / factor if factor else 1.0,
        norm_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon")),
        n_expert=n_expert,
        n_expert_used=int(_field(reader, f"{arch}.expert_used_count", 0)) if n_expert else 0,
        n_ctx_train=int(_field(reader, f"{arch}.context_length", 0)),
    )


def _param_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _LAYER_RE.fullmatch(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"blocks.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    return None


def _to_numpy(tensor) -> np.ndarray:
    """The tensor dequantized to float32, in numpy order (GGUF's dimensions reversed)."""
    arr = dequantize(tensor.data, tensor.tensor_type)
    shape = tuple(int(d) for d in reversed(tensor.shape))
    # F32 comes back as a read-only view of the memory map; torch wants to own its memory.
    return np.array(arr.reshape(shape), dtype=np.float32, copy=True)


def load_model(path: Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> Transformer:
    """Build the Transformer of a GGUF file with its weights dequantized and cast to dtype."""
    reader = gguf.GGUFReader(str(path))
    config = read_config(reader)
    tensors = {t.name: t for t in reader.tensors}
    tied = "output.weight" not in tensors
    freq_factors = torch.from_numpy(_to_numpy(tensors["rope_freqs.weight"])) if "rope_freqs.weight" in tensors else None
    if config.n_expert and "blk.0.ffn_gate_exps.weight" not in tensors:
        raise GGUFError("MoE experts stored one tensor per expert (old Mixtral GGUF) are not supported; re-convert the model")

    with torch.device("meta"):
        model = Transformer(config, tied_output=tied, freq_factors=freq_factors)
    expected = dict(model.named_parameters(remove_duplicate=False))
    state: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if name == "rope_freqs.weight":
            continue
        param = _param_name(name)
        if param is None or param not in expected:
            raise GGUFError(f"tensor {name!r} has no place in a {'MoE ' if config.n_expert else ''}llama model; the torch engine would ignore it and compute something else")
        value = torch.from_numpy(_to_numpy(tensor))
        if value.shape != expected[param].shape:
            raise GGUFError(f"tensor {name!r} has shape {tuple(value.shape)}, expected {tuple(expected[param].shape)}")
        state[param] = value.to(device=device, dtype=dtype)
    if tied:
        state["output.weight"] = state["tok_embd.weight"]
    missing = sorted(set(expected) - set(state))
    if missing:
        raise GGUFError(f"the file lacks tensors for {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    model.load_state_dict(state, strict=True, assign=True)
    if tied:
        # assign=True gives each module its own Parameter; share one, as the file does.
        model.output.weight = model.tok_embd.weight
    return model.eval()


class GGUFVocab:
    """The GGUF's tokenizer, run by llama.cpp with only the vocabulary loaded (no weights)."""

    def __init__(self, path: Path) -> None:
        import llama_cpp
        import llama_cpp._logger

        self._llama_cpp = llama_cpp
        # llama.cpp's load chatter would bury the worker's own log.
        llama_cpp._logger.logger.setLevel(logging.ERROR)
        llama_cpp.llama_backend_init()  # idempotent; the llama.cpp engine may have done it already
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        self._model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not self._model:
            raise GGUFError(f"llama.cpp could not read the tokenizer of {path}")
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        self.n_tokens = int(llama_cpp.llama_vocab_n_tokens(self._vocab))

    def tokenize(self, text: str, add_bos: bool = True, special: bool = False) -> list[int]:
        from worker.engines.llamacpp import tokenize_with

        return tokenize_with(self._vocab, text, add_bos, special)

    def chat_prompt(self, user_text: str) -> str:
        from worker.engines.llamacpp import chat_prompt_with

        return chat_prompt_with(self._model, user_text)

    def token_texts(self) -> list[bytes]:
        """Every token's text, by id, as the llama.cpp engine reports it (the draft-pair check)."""
        return [self._llama_cpp.llama_vocab_get_text(self._vocab, i) or b"" for i in range(self.n_tokens)]

    def close(self) -> None:
        if self._model:
            self._llama_cpp.llama_model_free(self._model)
            self._model = None
