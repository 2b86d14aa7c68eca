"""What the torch engine takes from a GGUF file: hyper-parameters, weights and the tokenizer.

Owns the mapping from GGUF metadata keys and tensor names (llama architecture, dense or
Mixtral-style MoE) to `ModelConfig` and the `Transformer`'s parameters, and the way back from
the project's MTP build (worker/mtp_export.py's `glm4moe` file: a dense llama trunk and one
NextN layer) to that Transformer and to mtp.py's head. Every difference the export bridges is
undone exactly: Q and K rows permuted back for adjacent-pair RoPE, glm's post-attention norm
read as llama's FFN pre-norm, the NextN projection's [embedding; hidden] columns swapped back to
mtp.py's [hidden; embedding], and its one routed and one shared expert concatenated by
intermediate units back into one dense SwiGLU FFN (with one expert and softmax gating its weight
is exactly 1, so the two halves sum to it). A glm4moe file of any other form (MoE trunk layers,
Q/K/V biases, Q/K norms, partial or multi-section rotary, more than one NextN layer) is refused
with the reason: it is another model, and reading it as llama's would compute something else.

Weights are dequantized to float32 with the `gguf` package and then cast, so a Q4_1 file runs
in torch with exactly the values llama.cpp dequantizes, though not with llama.cpp's quantized
dot products. The tokenizer is the file's own, run by llama.cpp with the vocabulary alone loaded,
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
from worker.engines.torch.mtp import MTPHeads

SUPPORTED_ARCHS = ("llama", "glm4moe")

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
# A glm4moe trunk layer's tensors under their llama names (the reverse of mtp_export's map); the
# FFN's pre-norm is glm's post-attention norm.
_GLM_TRUNK_NAMES = {
    "attn_norm.weight": "attn_norm.weight",
    "attn_q.weight": "attn_q.weight",
    "attn_k.weight": "attn_k.weight",
    "attn_v.weight": "attn_v.weight",
    "attn_output.weight": "attn_output.weight",
    "post_attention_norm.weight": "ffn_norm.weight",
    "ffn_gate.weight": "ffn_gate.weight",
    "ffn_up.weight": "ffn_up.weight",
    "ffn_down.weight": "ffn_down.weight",
}
# What glm4moe has and llama's decoder has not; named in the refusal.
_GLM_EXTRAS = re.compile(r"blk\.\d+\.(attn_(q|k|v|qkv|output)\.bias|attn_(q|k)_norm\.weight|attn_qkv\.weight)")
# The NextN block's tensors -> mtp.py's MTPHead parameters; the FFN and the projection are
# rebuilt (load_nextn_heads), the router is read by no one: one expert under softmax weighs 1.
_NEXTN_NAMES = {
    "nextn.hnorm.weight": "hidden_norm.weight",
    "nextn.enorm.weight": "embd_norm.weight",
    "attn_norm.weight": "block.attn_norm.weight",
    "attn_q.weight": "block.attn.wq.weight",
    "attn_k.weight": "block.attn.wk.weight",
    "attn_v.weight": "block.attn.wv.weight",
    "attn_output.weight": "block.attn.wo.weight",
    "post_attention_norm.weight": "block.ffn_norm.weight",
    "nextn.shared_head_norm.weight": "out_norm.weight",
}
_NEXTN_FFN = ("ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_down_exps.weight",
              "ffn_gate_shexp.weight", "ffn_up_shexp.weight", "ffn_down_shexp.weight")
_NEXTN_ROUTER = ("ffn_gate_inp.weight", "exp_probs_b.bias")
# llama.cpp's expert gating functions under which one expert's weight is exactly 1: softmax over
# its logits (1), or softmax over the chosen experts' weights (3). Its default (0) is sigmoid.
_UNIT_GATING = (1, 3)


class GGUFError(Exception):
    """The file is not a model this engine can run; the message says why."""


def _field(reader: gguf.GGUFReader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        if default is None:
            raise GGUFError(f"GGUF metadata lacks {key!r}")
        return default
    return field.contents()


def glm4moe_trunk(reader: gguf.GGUFReader) -> int:
    """The trunk's layer count of a glm4moe file that is a llama decoder in glm4moe's names (the
    form worker/mtp_export.py writes), after refusing every way a glm4moe file can differ."""
    p = "glm4moe."
    n_all = int(_field(reader, p + "block_count"))
    n_nextn = int(_field(reader, p + "nextn_predict_layers", 0))
    n_trunk = n_all - n_nextn
    n_dense = int(_field(reader, p + "leading_dense_block_count", 0))
    form = "the torch engine reads a glm4moe file only in the form of the project's MTP export (worker/mtp_export.py)"
    if n_dense < n_trunk:
        raise GGUFError(f"this glm4moe file has {n_trunk - n_dense} MoE trunk layer(s) (leading_dense_block_count "
                        f"{n_dense} of {n_trunk} trunk layers) with routed and shared experts; {form}: every trunk "
                        "layer dense")
    extras = sorted({m.group(1) for t in reader.tensors if (m := _GLM_EXTRAS.fullmatch(t.name))})
    if extras:
        what = "Q/K norms" if all(e.endswith("_norm.weight") for e in extras) else "Q/K/V biases or fused QKV"
        raise GGUFError(f"this glm4moe file has {what} ({', '.join(extras)}), which llama's decoder has not; {form}")
    n_embd = int(_field(reader, p + "embedding_length"))
    head_dim = int(_field(reader, p + "attention.key_length", n_embd // int(_field(reader, p + "attention.head_count"))))
    n_rot = int(_field(reader, p + "rope.dimension_count", head_dim))
    if n_rot != head_dim:
        raise GGUFError(f"this glm4moe file rotates {n_rot} of {head_dim} dimensions per head (partial rotary, as "
                        f"GLM-4.5); {form}: full rotary")
    sections = reader.fields.get(p + "rope.dimension_sections")
    if sections is not None and sum(int(x) > 0 for x in sections.contents()[:2]) == 2:
        raise GGUFError(f"this glm4moe file uses multi-section rotary (rope.dimension_sections); {form}")
    return n_trunk


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

    if arch == "glm4moe":
        # The trunk alone: its layers dense, the experts in the header are the NextN block's.
        n_layer, n_expert = glm4moe_trunk(reader), 0
    else:
        n_layer, n_expert = int(_field(reader, f"{arch}.block_count")), int(_field(reader, f"{arch}.expert_count", 0))
    return ModelConfig(
        n_layer=n_layer,
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


def nextn_layer_count(path: Path) -> int:
    """NextN (MTP) layers the file's header declares; 0 for a file without them."""
    reader = gguf.GGUFReader(str(path))
    arch = _field(reader, "general.architecture")
    return int(_field(reader, f"{arch}.nextn_predict_layers", 0))


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


def permute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """The GGUF converter's Q/K row permutation, (n_head * head_dim, n_in): within each head the two
    halves NeoX RoPE rotates (glm4moe's) become the adjacent pairs this engine's RoPE rotates.
    The inverse of worker/mtp_export.unpermute_rope: the same scores, exactly."""
    rows, cols = w.shape
    head_dim = rows // n_head
    return w.reshape(n_head, 2, head_dim // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _glm_tensors(reader: gguf.GGUFReader, config: ModelConfig) -> dict[str, np.ndarray | object]:
    """A glm4moe file's trunk tensors under llama's names; Q and K re-permuted (numpy arrays), the
    rest as the file's tensors. The NextN block (index config.n_layer on) is load_nextn_heads'."""
    out: dict[str, object] = {}
    for t in reader.tensors:
        m = _LAYER_RE.fullmatch(t.name)
        if m is None:
            out[t.name] = t
            continue
        layer, rest = int(m.group(1)), m.group(2)
        if layer >= config.n_layer:
            continue
        name = f"blk.{layer}.{_GLM_TRUNK_NAMES.get(rest, rest)}"
        if rest == "attn_q.weight":
            out[name] = permute_rope(_to_numpy(t), config.n_head)
        elif rest == "attn_k.weight":
            out[name] = permute_rope(_to_numpy(t), config.n_kv_head)
        elif rest in _GLM_TRUNK_NAMES:
            out[name] = t
        else:
            raise GGUFError(f"tensor {t.name!r} has no place in a glm4moe trunk of llama's form; the torch engine "
                            "would ignore it and compute something else")
    return out


def load_model(path: Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> Transformer:
    """Build the Transformer of a GGUF file with its weights dequantized and cast to dtype."""
    reader = gguf.GGUFReader(str(path))
    config = read_config(reader)
    glm = _field(reader, "general.architecture") == "glm4moe"
    tensors = _glm_tensors(reader, config) if glm else {t.name: t for t in reader.tensors}
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
        value = torch.from_numpy(tensor if isinstance(tensor, np.ndarray) else _to_numpy(tensor))
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


def load_nextn_heads(path: Path, base: Transformer) -> MTPHeads:
    """The file's one NextN layer as an MTP head over `base` (its trunk, from load_model), drafting
    as llama.cpp drafts with it: one head, recursing past the first position (MTPHeads' recursive).

    Undoes worker/mtp_export.py exactly: the projection's columns swapped back to [hidden;
    embedding], Q and K re-permuted, the routed expert's and the shared expert's units
    concatenated into one dense FFN. Refused with the reason: another glm4moe form (see
    glm4moe_trunk), several NextN layers, a router that weighs its expert other than exactly 1,
    a NextN embedding or output of its own (mtp.py's head shares the base's)."""
    reader = gguf.GGUFReader(str(path))
    arch = _field(reader, "general.architecture")
    if arch != "glm4moe":
        raise GGUFError(f"a {arch!r} file has no NextN layers the torch engine reads (glm4moe MTP builds only)")
    n_trunk = glm4moe_trunk(reader)
    p = "glm4moe."
    n_nextn = int(_field(reader, p + "nextn_predict_layers", 0))
    if n_nextn != 1:
        raise GGUFError(f"this file has {n_nextn} NextN layers; the torch engine drafts as llama.cpp's glm4moe does, "
                        "with exactly one (llama.cpp asserts it)")
    n_expert, n_used = int(_field(reader, p + "expert_count", 0)), int(_field(reader, p + "expert_used_count", 0))
    gating = int(_field(reader, p + "expert_gating_func", 0))
    scale = float(_field(reader, p + "expert_weights_scale", 0.0))
    if (n_expert, n_used) != (1, 1) or gating not in _UNIT_GATING or scale not in (0.0, 1.0):
        raise GGUFError(f"this file's NextN MoE routes to {n_used} of {n_expert} experts (gating function {gating}, "
                        f"weight scale {scale}); the torch engine's head is one dense FFN, which the MoE equals only "
                        "with one expert weighted exactly 1 (softmax gating, scale 1), as worker/mtp_export.py writes it")
    prefix = f"blk.{n_trunk}."
    tensors = {t.name.removeprefix(prefix): t for t in reader.tensors if t.name.startswith(prefix)}
    own = sorted(n for n in ("nextn.embed_tokens.weight", "nextn.shared_head_head.weight") if n in tensors)
    if own:
        raise GGUFError(f"this file's NextN layer has its own {', '.join(own)}; the torch engine's head shares the "
                        "trunk's embedding and output (the project's MTP export writes neither)")
    known = {*_NEXTN_NAMES, *_NEXTN_FFN, *_NEXTN_ROUTER, "nextn.eh_proj.weight"}
    unknown = sorted(set(tensors) - known)
    if unknown:
        raise GGUFError(f"this file's NextN layer has tensors the torch engine's head has no place for "
                        f"({', '.join(prefix + n for n in unknown[:3])})")
    # llama.cpp normalises the NextN output with the model's final norm where the layer has none of its own.
    required = [n for n in (*_NEXTN_NAMES, *_NEXTN_FFN, "nextn.eh_proj.weight") if n != "nextn.shared_head_norm.weight"]
    missing = [prefix + n for n in required if n not in tensors]
    if missing:
        raise GGUFError(f"this file's NextN layer lacks {', '.join(missing[:3])}: a broken export; export it again")

    c = base.config
    E = c.n_embd
    arr = {n: _to_numpy(t) for n, t in tensors.items() if n not in _NEXTN_ROUTER}
    state = {param: torch.from_numpy(arr[n]) for n, param in _NEXTN_NAMES.items() if n in arr}
    if "out_norm.weight" not in state:
        state["out_norm.weight"] = base.norm.weight.detach().float().cpu().clone()
    state["block.attn.wq.weight"] = torch.from_numpy(permute_rope(arr["attn_q.weight"], c.n_head))
    state["block.attn.wk.weight"] = torch.from_numpy(permute_rope(arr["attn_k.weight"], c.n_kv_head))
    eh = arr["nextn.eh_proj.weight"]  # (E, 2E) over llama.cpp's [embedding; hidden]
    if eh.shape != (E, 2 * E):
        raise GGUFError(f"the NextN projection is {eh.shape}, not ({E}, {2 * E})")
    state["proj.weight"] = torch.from_numpy(np.concatenate((eh[:, E:], eh[:, :E]), axis=1))
    # Routed expert (1, F_r, E) / (1, E, F_r) and shared expert (F_s, E) / (E, F_s): the first
    # F_r units and the rest of one dense FFN.
    gate = np.concatenate((arr["ffn_gate_exps.weight"][0], arr["ffn_gate_shexp.weight"]), axis=0)
    up = np.concatenate((arr["ffn_up_exps.weight"][0], arr["ffn_up_shexp.weight"]), axis=0)
    down = np.concatenate((arr["ffn_down_exps.weight"][0], arr["ffn_down_shexp.weight"]), axis=1)
    if gate.shape != (c.n_ff, E) or up.shape != (c.n_ff, E) or down.shape != (E, c.n_ff):
        raise GGUFError(f"the NextN experts add up to an FFN of width {gate.shape[0]}, not the trunk's {c.n_ff}: "
                        "the torch engine's head is a block of the trunk's shape")
    state.update({"block.ffn.w_gate.weight": torch.from_numpy(gate), "block.ffn.w_up.weight": torch.from_numpy(up),
                  "block.ffn.w_down.weight": torch.from_numpy(down)})

    heads = MTPHeads(base, 1, recursive=True)
    try:
        heads.heads[0].load_state_dict(state, strict=True)
    except RuntimeError as exc:  # a shape that differs from the trunk's
        raise GGUFError(f"the NextN layer does not fit the trunk: {str(exc).splitlines()[-1].strip()}") from exc
    w = base.tok_embd.weight
    return heads.to(device=w.device, dtype=w.dtype).eval()


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
