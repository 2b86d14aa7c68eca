"""Models the project builds from others: the quant ladder and Mixtral-style MoE upcycles.

Owns the MoE upcycler (a dense llama GGUF in, a llama GGUF with E experts per layer out, written
with the `gguf` package) and the names that refer to derived models in sweeps
(`smollm2-135m-moe8x2`). Requantizing is delegated to `worker.models.resolve`, which records
provenance; this module never runs a model.

MoE shapes, in ggml order (ne0 first) as llama.cpp expects them:
    E: n_expert, D: n_embd, F: n_ff
    ffn_gate_exps, ffn_up_exps: (D, F, E)   ffn_down_exps: (F, D, E)   ffn_gate_inp: (D, E)
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from worker.models import CATALOGUE, ModelError, check_gguf, resolve, sha256_file

# The ladder the issue asks to prove measurements on, from highest fidelity down.
QUANT_LADDER = ("F32", "F16", "Q8_0", "Q4_K_M", "Q4_0", "Q2_K")

# `<parent>-moe<E>x<K>`: perturbed experts and a random router (a real MoE whose routing varies
# by token); `-copy`: identical experts and a zero router (output equals the parent's).
MOE_NAME = re.compile(r"^(?P<parent>.+)-moe(?P<n_expert>\d+)x(?P<n_used>\d+)(?P<copy>-copy)?$")

_FFN = ("ffn_gate", "ffn_up", "ffn_down")


@dataclass(frozen=True)
class UpcycleConfig:
    n_expert: int = 8
    n_expert_used: int = 2
    # Noise on each expert's weights, relative to the std of the dense weight; 0: exact copies.
    noise: float = 0.0
    router: str = "zero"  # "zero" or "random"
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.n_expert_used <= self.n_expert:
            raise ModelError(f"experts used ({self.n_expert_used}) must be between 1 and the expert count ({self.n_expert})")
        if self.router not in ("zero", "random"):
            raise ModelError(f"router {self.router!r}: use 'zero' or 'random'")
        if self.noise < 0:
            raise ModelError("noise must be >= 0")


def parse_moe_name(ref: str) -> tuple[str, UpcycleConfig] | None:
    """(parent catalogue name, how to upcycle it) for a derived MoE name; None for other names."""
    m = MOE_NAME.match(ref)
    if m is None or m["parent"] not in CATALOGUE:
        return None
    if m["copy"]:
        cfg = UpcycleConfig(int(m["n_expert"]), int(m["n_used"]))
    else:
        cfg = UpcycleConfig(int(m["n_expert"]), int(m["n_used"]), noise=0.05, router="random", seed=0)
    return m["parent"], cfg


def _copy_metadata(reader, writer, cfg: UpcycleConfig) -> None:
    import gguf

    skip = {"general.architecture", "general.file_type", "llama.expert_count", "llama.expert_used_count"}
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


def moe_path(name: str, models_dir: Path) -> Path:
    """The derived MoE file for a name like `smollm2-135m-moe8x2`, built on first use and cached."""
    parsed = parse_moe_name(name)
    if parsed is None:
        raise ModelError(f"{name!r} is not a derived MoE name: use <catalogue model>-moe<E>x<K>[-copy], e.g. smollm2-135m-moe8x2")
    parent, cfg = parsed
    dense_f32, parent_sha = resolve(parent, "F32", models_dir)
    target = Path(models_dir) / "derived" / f"{parent_sha[:16]}.{name.removeprefix(parent + '-')}.F32.gguf"
    if not target.exists():
        upcycle(dense_f32, target, cfg)
        target.with_name(target.name + ".provenance.json").write_text(json.dumps({
            "derived_by": "tokenfarm upcycle", "parent": parent, "parent_sha256": parent_sha,
            "parent_f32": str(dense_f32), "parent_f32_sha256": sha256_file(dense_f32), **asdict(cfg),
        }, indent=2))
    return target


def quant_ladder(model: str, models_dir: Path, quants: tuple[str, ...] = QUANT_LADDER) -> list[tuple[str, Path]]:
    """Every quant of the ladder for `model`, derived through resolve (which records provenance)."""
    return [(q, resolve(model, q, models_dir)[0]) for q in quants]
