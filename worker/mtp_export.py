"""An MTP build of a llama model: its weights and the project's trained MTP head as one GGUF
that llama.cpp runs with draft-MTP (`smollm2-135m-mtp`).

No MTP-trained model small enough for this machine ships in a package, so the project makes
one: a dense llama GGUF (SmolLM2-135M) and the first head of mtp.py's DeepSeek-V3-form heads
(trained by mtp_train.py, saved beside the base) are written as a `glm4moe` file whose last
block is a NextN layer (`glm4moe.nextn_predict_layers = 1`).

Why glm4moe. Of the architectures the vendored llama.cpp runs draft-MTP for, glm4moe's trunk
is llama's decoder exactly when configured so: pre-norm RMSNorm blocks, attention whose Q/K/V
biases and Q/K norms are optional (absent here), full rotary (rope.dimension_count = head_dim),
SwiGLU FFNs, a final RMSNorm and an output that falls back to the token embedding (SmolLM2's
tied output), and every trunk layer dense when leading_dense_block_count equals the trunk's
layer count. Its NextN graph is the DeepSeek-V3 form mtp.py trains: RMSNorm the target's final
normalised hidden state and the next token's embedding, project their concatenation, one
decoder block attending over the head's own earlier positions, a norm, the shared output. The
others do not fit: deepseek2/32 need MLA attention, qwen35/qwen3next hybrid linear attention,
mimo2 and step35 sliding-window layouts, nemotron-h Mamba layers.

Three differences are bridged, each exactly:
- RoPE: glm4moe rotates NeoX halves where llama GGUFs rotate adjacent pairs, having had their Q
  and K rows permuted by the converter; the permutation is undone, which gives the same scores.
- The NextN block's FFN must be an MoE (its graph asserts a router). The head's dense SwiGLU
  FFN of width F is split by intermediate units into one routed expert (the first F/2 units)
  and one shared expert (the rest): with one expert and softmax gating its weight is exactly 1,
  and the two halves sum to the dense FFN.
- The concatenation order: llama.cpp concatenates [embedding; hidden], mtp.py [hidden;
  embedding]; the projection's columns are swapped.

Recursion is the file's, not mtp.py's chain: this llama.cpp's glm4moe runs one NextN block
(asserted), and drafts past the first token by feeding that block its own normalised output,
where mtp.py chains separately trained heads on the un-normalised output. The torch engine
reads this file back (worker/engines/torch/gguf_loader.py undoes every difference above) and
drafts with its one head the way llama.cpp does (mtp.py's recursive head), so on this file both
engines compute the same thing at every draft position (benchmarks/llamacpp_mtp.py's
cross-check); the torch engine's chained heads beside the parent are another drafter.

It owns the export and its checks; training is mtp_train.py's, caching and provenance
worker/models.py's. It never runs a model.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from farm.modelfiles import ModelError, check_gguf

ARCH = "glm4moe"
# Keys of the llama header that the glm4moe header carries under its own prefix.
_SHAPE_KEYS = ("context_length", "embedding_length", "feed_forward_length", "attention.head_count",
               "attention.head_count_kv", "attention.layer_norm_rms_epsilon", "rope.freq_base",
               "attention.key_length", "attention.value_length", "vocab_size")
# llama block tensor -> glm4moe block tensor (the FFN's pre-norm is glm's post-attention norm).
_BLOCK_NAMES = {"attn_norm": "attn_norm", "attn_q": "attn_q", "attn_k": "attn_k", "attn_v": "attn_v",
                "attn_output": "attn_output", "ffn_norm": "post_attention_norm",
                "ffn_gate": "ffn_gate", "ffn_up": "ffn_up", "ffn_down": "ffn_down"}
# mtp.py head parameter -> the llama block tensor it plays the part of.
_HEAD_BLOCK = {"attn_norm.weight": "attn_norm", "attn.wq.weight": "attn_q", "attn.wk.weight": "attn_k",
               "attn.wv.weight": "attn_v", "attn.wo.weight": "attn_output", "ffn_norm.weight": "ffn_norm",
               "ffn.w_gate.weight": "ffn_gate", "ffn.w_up.weight": "ffn_up", "ffn.w_down.weight": "ffn_down"}


def unpermute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo the GGUF converter's Q/K row permutation, (n_head * head_dim, n_in): within each head
    the rows interleaved for adjacent-pair RoPE go back to the two halves NeoX RoPE rotates."""
    rows, cols = w.shape
    head_dim = rows // n_head
    return w.reshape(n_head, head_dim // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _copy_fields(reader, writer, skip_prefixes: tuple[str, ...]) -> None:
    import gguf

    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key.startswith(skip_prefixes):
            continue
        vtype = gguf.GGUFValueType(field.types[0])
        if vtype == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(key, field.contents(), vtype, gguf.GGUFValueType(field.types[-1]))
        else:
            writer.add_key_value(key, field.contents(), vtype)


def read_head(heads_file: Path, n_embd: int) -> dict[str, np.ndarray]:
    """Head 1 of an mtp.py heads file as float32 numpy arrays, named as in MTPHead; a whole-
    vocabulary head only (a head restricted to a drafting vocabulary has no NextN equivalent:
    llama.cpp's NextN output scores every token)."""
    from safetensors import safe_open

    if not Path(heads_file).exists():
        raise ModelError(f"no MTP heads at {heads_file}: train them first with "
                         "`tokenfarm models train-mtp <base> --heads 1 --n-head-vocab 0`")
    with safe_open(str(heads_file), framework="pt") as f:
        names = list(f.keys())
        if "vocab" in names:
            raise ModelError(f"{heads_file} holds heads restricted to a drafting vocabulary; a NextN layer "
                             "scores the whole vocabulary: train with --n-head-vocab 0")
        head = {n[2:]: f.get_tensor(n).float().numpy() for n in names if n.startswith("0.")}
    need = ["hidden_norm.weight", "embd_norm.weight", "proj.weight", "out_norm.weight",
            *(f"block.{k}" for k in _HEAD_BLOCK)]
    missing = [n for n in need if n not in head]
    if missing:
        raise ModelError(f"{heads_file} lacks head tensors {', '.join(missing[:4])}: it is not a dense "
                         "DeepSeek-V3-form head of this project; train it again")
    if head["proj.weight"].shape != (n_embd, 2 * n_embd):
        raise ModelError(f"{heads_file}'s projection is {head['proj.weight'].shape}, not ({n_embd}, {2 * n_embd}): "
                         "the heads were trained for another model")
    return head


def export_mtp(base: Path, heads_file: Path, target: Path) -> Path:
    """Write the F32 glm4moe MTP GGUF of a dense llama GGUF and its trained head at `target`."""
    import gguf
    from gguf.quants import dequantize

    check_gguf(base)
    reader = gguf.GGUFReader(str(base), "r")
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ModelError(f"{base} is a {arch!r} model; the MTP export maps llama models onto glm4moe only")
    if _field(reader, "llama.expert_count"):
        raise ModelError(f"{base} is an MoE model; the MTP export maps dense llama models only")
    n_layer = int(_field(reader, "llama.block_count"))
    n_embd = int(_field(reader, "llama.embedding_length"))
    n_ff = int(_field(reader, "llama.feed_forward_length"))
    n_head = int(_field(reader, "llama.attention.head_count"))
    n_kv_head = int(_field(reader, "llama.attention.head_count_kv", n_head))
    head_dim = int(_field(reader, "llama.attention.key_length", n_embd // n_head))
    n_rot = int(_field(reader, "llama.rope.dimension_count", head_dim))
    if n_rot != head_dim:
        raise ModelError(f"{base} rotates {n_rot} of {head_dim} dimensions per head; the export assumes full RoPE")
    if n_ff % 2:
        raise ModelError(f"{base}'s FFN width {n_ff} is odd; it cannot be split into routed and shared halves")
    if _field(reader, "llama.rope.scaling.type", "none") not in ("none",):
        raise ModelError(f"{base} uses RoPE scaling, which the MTP export does not carry over")
    head = read_head(heads_file, n_embd)
    tensors = {t.name: t for t in reader.tensors}
    unknown = [n for n in tensors if n not in ("token_embd.weight", "output_norm.weight", "output.weight")
               and not any(n == f"blk.{i}.{k}.weight" for i in range(n_layer) for k in _BLOCK_NAMES)]
    if unknown:
        raise ModelError(f"{base} has tensors the llama→glm4moe map does not know ({', '.join(unknown[:3])})")

    def dense(name: str) -> np.ndarray:
        t = tensors[name]
        arr = dequantize(t.data, t.tensor_type)
        return np.ascontiguousarray(arr.reshape(tuple(int(d) for d in reversed(t.shape))), dtype=np.float32)

    def qk(kind: str, w: np.ndarray) -> np.ndarray:
        if kind == "attn_q":
            return unpermute_rope(w, n_head)
        if kind == "attn_k":
            return unpermute_rope(w, n_kv_head)
        return w

    # Output plan, numpy order (rows, cols); tensors are made one at a time when written.
    plan: list[tuple[str, callable]] = [("token_embd.weight", lambda: dense("token_embd.weight")),
                                        ("output_norm.weight", lambda: dense("output_norm.weight"))]
    if "output.weight" in tensors:
        plan.append(("output.weight", lambda: dense("output.weight")))
    for i in range(n_layer):
        for src, dst in _BLOCK_NAMES.items():
            plan.append((f"blk.{i}.{dst}.weight", lambda i=i, src=src: qk(src, dense(f"blk.{i}.{src}.weight"))))

    n = n_layer  # the NextN block's index: right after the trunk
    h = {kind: head[f"block.{p}"] for p, kind in _HEAD_BLOCK.items()}
    half = n_ff // 2
    proj = head["proj.weight"]  # (E, 2E) over [hidden; embedding]
    plan += [
        (f"blk.{n}.attn_norm.weight", lambda: h["attn_norm"]),
        (f"blk.{n}.attn_q.weight", lambda: qk("attn_q", h["attn_q"])),
        (f"blk.{n}.attn_k.weight", lambda: qk("attn_k", h["attn_k"])),
        (f"blk.{n}.attn_v.weight", lambda: h["attn_v"]),
        (f"blk.{n}.attn_output.weight", lambda: h["attn_output"]),
        (f"blk.{n}.post_attention_norm.weight", lambda: h["ffn_norm"]),
        # One routed expert holding the first half of the FFN's units, (1, F/2, E) and (1, E, F/2).
        (f"blk.{n}.ffn_gate_inp.weight", lambda: np.zeros((1, n_embd), np.float32)),
        (f"blk.{n}.exp_probs_b.bias", lambda: np.zeros((1,), np.float32)),
        (f"blk.{n}.ffn_gate_exps.weight", lambda: h["ffn_gate"][None, :half]),
        (f"blk.{n}.ffn_up_exps.weight", lambda: h["ffn_up"][None, :half]),
        (f"blk.{n}.ffn_down_exps.weight", lambda: h["ffn_down"][None, :, :half]),
        # The shared expert: the other half.
        (f"blk.{n}.ffn_gate_shexp.weight", lambda: h["ffn_gate"][half:]),
        (f"blk.{n}.ffn_up_shexp.weight", lambda: h["ffn_up"][half:]),
        (f"blk.{n}.ffn_down_shexp.weight", lambda: h["ffn_down"][:, half:]),
        (f"blk.{n}.nextn.eh_proj.weight", lambda: np.concatenate((proj[:, n_embd:], proj[:, :n_embd]), axis=1)),
        (f"blk.{n}.nextn.enorm.weight", lambda: head["embd_norm.weight"]),
        (f"blk.{n}.nextn.hnorm.weight", lambda: head["hidden_norm.weight"]),
        (f"blk.{n}.nextn.shared_head_norm.weight", lambda: head["out_norm.weight"]),
    ]

    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    writer = gguf.GGUFWriter(str(partial), arch=ARCH)
    _copy_fields(reader, writer, ("general.architecture", "general.file_type", "llama."))
    writer.add_uint32("general.file_type", int(gguf.LlamaFileType.ALL_F32))
    for key in _SHAPE_KEYS:
        f = reader.fields.get(f"llama.{key}")
        if f is not None:
            writer.add_key_value(f"{ARCH}.{key}", f.contents(), gguf.GGUFValueType(f.types[0]))
    p = f"{ARCH}."
    writer.add_uint32(p + "block_count", n_layer + 1)
    writer.add_uint32(p + "nextn_predict_layers", 1)
    # Every trunk layer dense; the NextN block (index n_layer) is MoE, as its graph requires.
    writer.add_uint32(p + "leading_dense_block_count", n_layer)
    writer.add_uint32(p + "rope.dimension_count", head_dim)
    writer.add_uint32(p + "expert_count", 1)
    writer.add_uint32(p + "expert_used_count", 1)
    writer.add_uint32(p + "expert_shared_count", 1)
    writer.add_uint32(p + "expert_feed_forward_length", half)
    writer.add_uint32(p + "expert_gating_func", 1)  # softmax: one expert's weight is exactly 1
    writer.add_bool(p + "expert_weights_norm", False)
    writer.add_float32(p + "expert_weights_scale", 1.0)
    arrays = []
    for name, make in plan:
        arr = np.ascontiguousarray(make(), dtype=np.float32)
        arrays.append(arr.shape)
        writer.add_tensor_info(name, arr.shape, np.dtype(np.float32), arr.nbytes)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for (name, make), shape in zip(plan, arrays):
        arr = np.ascontiguousarray(make(), dtype=np.float32)
        assert arr.shape == shape, (name, arr.shape, shape)
        writer.write_tensor_data(arr)
    writer.close()
    os.replace(partial, target)
    return target
