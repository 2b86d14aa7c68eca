"""Models the project builds from others: the quant ladder, Mixtral-style MoE upcycles, split sets.

Owns the MoE upcycler (a dense llama GGUF in, a llama GGUF with E experts per layer out, written
with the `gguf` package) and the names that refer to derived models in sweeps
(`smollm2-135m-moe8x2`, parsed in farm/modelfiles.py). Requantizing and caching are
worker/models.py's, which records provenance; this module never runs a model.

MoE shapes, in ggml order (ne0 first) as llama.cpp expects them:
    E: n_expert, D: n_embd, F: n_ff
    ffn_gate_exps, ffn_up_exps: (D, F, E)   ffn_down_exps: (F, D, E)   ffn_gate_inp: (D, E)
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from farm.modelfiles import ModelError, UpcycleConfig, check_gguf

_FFN = ("ffn_gate", "ffn_up", "ffn_down")


def _copy_fields(reader, writer, skip: set[str]) -> None:
    import gguf

    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in skip:
            continue
        vtype = gguf.GGUFValueType(field.types[0])
        if vtype == gguf.GGUFValueType.ARRAY:
            if len(field.types) > 2:
                raise ModelError(f"metadata {key} is a nested array, which the upcycler does not copy")
            writer.add_key_value(key, field.contents(), vtype, gguf.GGUFValueType(field.types[-1]))
        else:
            writer.add_key_value(key, field.contents(), vtype)


def _copy_metadata(reader, writer, cfg: UpcycleConfig) -> None:
    import gguf

    _copy_fields(reader, writer, {"general.architecture", "general.file_type", "llama.expert_count",
                                  "llama.expert_used_count"})
    writer.add_uint32("general.file_type", int(gguf.LlamaFileType.ALL_F32))
    writer.add_uint32("llama.expert_count", cfg.n_expert)
    writer.add_uint32("llama.expert_used_count", cfg.n_expert_used)


def _layer_and_ffn(name: str) -> tuple[int, str] | None:
    m = re.fullmatch(r"blk\.(\d+)\.(ffn_gate|ffn_up|ffn_down)\.weight", name)
    return (int(m[1]), m[2]) if m else None


def upcycle(source: Path, target: Path, cfg: UpcycleConfig) -> Path:
    """Write `source` (dense llama GGUF) as an F32 Mixtral-style MoE GGUF at `target`.

    Tensors are written one at a time, so memory holds one stacked expert tensor, not the model.
    """
    import gguf
    from gguf.quants import dequantize

    check_gguf(source)
    reader = gguf.GGUFReader(str(source), "r")
    arch = reader.fields["general.architecture"].contents()
    if arch != "llama":
        raise ModelError(f"{source} is a {arch!r} model; the upcycler builds Mixtral-style MoE from llama models only")
    if "llama.expert_count" in reader.fields:
        raise ModelError(f"{source} is already an MoE model; upcycle its dense parent instead")
    n_embd = int(reader.fields["llama.embedding_length"].contents())
    n_layer = int(reader.fields["llama.block_count"].contents())
    by_name = {t.name: t for t in reader.tensors}
    E = cfg.n_expert

    def dense(t) -> np.ndarray:
        return np.ascontiguousarray(dequantize(t.data, t.tensor_type), dtype=np.float32)

    # Output plan in the source's order, an MoE layer's tensors in place of its dense FFN.
    plan: list[tuple[str, tuple[int, ...], callable]] = []
    for t in reader.tensors:
        hit = _layer_and_ffn(t.name)
        if hit is None:
            shape = tuple(int(x) for x in reversed(t.shape))  # numpy order
            plan.append((t.name, shape, lambda t=t: dense(t)))
            continue
        layer, ffn = hit
        rows, cols = (int(x) for x in reversed(t.shape))
        plan.append((f"blk.{layer}.{ffn}_exps.weight", (E, rows, cols), lambda t=t, layer=layer, ffn=ffn: experts(t, layer, ffn)))
        if ffn == "ffn_down":
            plan.append((f"blk.{layer}.ffn_gate_inp.weight", (E, n_embd), lambda layer=layer: router(layer)))

    def experts(t, layer: int, ffn: str) -> np.ndarray:
        w = dense(t)  # (rows, cols)
        out = np.empty((E, *w.shape), dtype=np.float32)  # (E, rows, cols)
        scale = cfg.noise * float(w.std())
        for e in range(E):
            out[e] = w
            if scale:
                rng = np.random.default_rng([cfg.seed, layer, _FFN.index(ffn), e])
                out[e] += rng.normal(0.0, scale, size=w.shape).astype(np.float32)
        return out

    def router(layer: int) -> np.ndarray:
        if cfg.router == "zero":
            return np.zeros((E, n_embd), dtype=np.float32)
        rng = np.random.default_rng([cfg.seed, layer, 99])
        return rng.normal(0.0, 1.0 / np.sqrt(n_embd), size=(E, n_embd)).astype(np.float32)

    n_ffn_layers = {(_layer_and_ffn(n) or (None,))[0] for n in by_name} - {None}
    if len(n_ffn_layers) != n_layer:
        raise ModelError(f"{source} has FFN tensors for {len(n_ffn_layers)} of {n_layer} layers; cannot upcycle it")

    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    writer = gguf.GGUFWriter(str(partial), arch="llama")
    _copy_metadata(reader, writer, cfg)
    for name, shape, _ in plan:
        writer.add_tensor_info(name, shape, np.dtype(np.float32), int(np.prod(shape)) * 4)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for name, shape, make in plan:
        array = make()
        assert array.shape == shape, (name, array.shape, shape)
        writer.write_tensor_data(array)
    writer.close()
    os.replace(partial, target)
    return target


def split(source: Path, first_part: Path, n_parts: int) -> list[Path]:
    """Write `source` as a split set of about n_parts files, as llama.cpp's gguf-split does
    (`split.count`, `split.no`, `split.tensors.count` in each part; the first names the set).

    `first_part` must be named `<stem>-00001-of-<NNNNN>.gguf`; the writer names the set by its
    tensor count, so the names are returned. Tensors are copied as stored (quantized bytes untouched).
    """
    import gguf

    check_gguf(source)
    reader = gguf.GGUFReader(str(source), "r")
    n_tensors = len(reader.tensors)
    if not 1 < n_parts <= n_tensors:
        raise ModelError(f"cannot split {n_tensors} tensors into {n_parts} parts")
    per_part = -(-n_tensors // n_parts)
    stem = re.sub(r"-\d{5}-of-\d{5}\.gguf$", "", Path(first_part).name)
    base = Path(first_part).with_name(stem + ".gguf")
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(base), arch=arch, split_max_tensors=per_part)
    _copy_fields(reader, writer, {"general.architecture"})
    for t in reader.tensors:
        writer.add_tensor(t.name, t.data, raw_shape=t.data.shape, raw_dtype=gguf.GGMLQuantizationType(t.tensor_type))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    n_written = -(-n_tensors // per_part)
    return [base.with_name(f"{stem}-{i:05d}-of-{n_written:05d}.gguf") for i in range(1, n_written + 1)]
