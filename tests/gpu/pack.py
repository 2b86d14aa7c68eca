"""Packs what the GPU check needs into parts that each fit one device call's carry.

The GPU machine reaches nothing outside itself and a call carries at most 64 MiB (working tree
included), while the check needs more: the vendored llama.cpp sources (to build the CUDA engine
there), the worker's Python dependencies that the machine's image lacks (as wheels for its
Python 3.12), llama-cpp-python's pure-Python part, and the models (SmolLM2 alone is 98 MB). So
the payload is cut into parts of at most PART_BYTES; each is carried by one call that runs
`tests/gpu/device_check.sh receive`, which moves it into an ignored folder that later calls on
the same warm machine still find; the last call runs the check, which reassembles the models
and verifies every file against the manifest's sha256 before anything runs.

Run here, from the repository root:
    python tests/gpu/pack.py [--models smollm2-135m,gemma3-270m] [--dry-run]
It prints the calls to make, in order. `--dry-run` writes nothing and only sizes the parts
(the unit tests use it).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / ".gpu"
# Below the 64 MiB carry limit, leaving room for the tracked tree and the untracked files.
PART_BYTES = 56 * 2**20
LLAMA_CPP_VERSION = "0.3.36"
SDIST_DIR = Path("/work/scratch") / f"llama_cpp_python-{LLAMA_CPP_VERSION}"
# What the image of the GPU machine lacks (its python3 has torch, numpy, pyyaml, typer, rich,
# huggingface_hub, requests, jinja2, pytest): pinned to what this project's venv runs.
WHEELS = (
    "celery==5.7.0", "kombu==5.7.0", "billiard==4.3.2", "vine==5.1.0", "amqp==5.4.2", "click-didyoumean==0.3.1",
    "click-plugins==1.1.1.2", "click-repl==0.4.1", "prompt_toolkit==3.0.53", "wcwidth==0.9.4", "tzlocal==5.4.5",
    "redis==8.1.0", "pydantic==2.14.4", "pydantic_core==2.50.5", "annotated-types==0.8.0",
    "typing-inspection==0.4.5", "pydantic-settings==2.16.3", "python-dotenv==1.2.4", "gguf==0.19.0",
    "SQLAlchemy==2.1.9", "greenlet==3.5.6", "alembic==1.20.1", "Mako==1.4.3", "cryptography==50.0.2",
    "cffi==2.1.1", "pycparser==3.12", "diskcache==5.6.3",
)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux_2_34_x86_64", "manylinux1_x86_64")
# ggml's backends other than the CPU's and CUDA's are never built there: left out of the carry.
GGML_BACKENDS_LEFT_OUT = ("ggml-vulkan", "ggml-sycl", "ggml-metal", "ggml-opencl", "ggml-cann", "ggml-musa",
                          "ggml-hip", "ggml-kompute", "ggml-webgpu", "ggml-zdnn", "ggml-rpc", "ggml-blas",
                          "ggml-hexagon", "ggml-openvino", "ggml-zendnn", "ggml-virtgpu")
LLAMA_CPP_PARTS = ("CMakeLists.txt", "cmake", "ggml", "src", "include", "common", "vendor", "LICENSE")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
    parts = Path(info.name).parts
    if any(p in GGML_BACKENDS_LEFT_OUT for p in parts) or any(p in (".git", "build") for p in parts):
        return None
    return info


def source_tarball(dest: Path) -> Path:
    """The vendored llama.cpp without the backends the check never builds, as .tar.gz."""
    src = SDIST_DIR / "vendor" / "llama.cpp"
    if not src.is_dir():
        sys.exit(f"{src} is missing: download llama-cpp-python {LLAMA_CPP_VERSION}'s sdist and unpack it in "
                 f"{SDIST_DIR.parent} (pip download --no-deps --no-binary :all: llama-cpp-python=={LLAMA_CPP_VERSION})")
    out = dest / "llama.cpp.tar.gz"
    with tarfile.open(out, "w:gz") as tar:
        for name in LLAMA_CPP_PARTS:
            if (src / name).exists():
                tar.add(src / name, arcname=f"llama.cpp/{name}", filter=_keep)
        # llama-cpp-python's pure-Python part: it loads libllama from LLAMA_CPP_LIB_PATH.
        tar.add(SDIST_DIR / "llama_cpp", arcname="py/llama_cpp", filter=_keep)
    return out


def wheels(dest: Path) -> list[Path]:
    whl = dest / "whl"
    whl.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
           "--implementation", "cp", "-d", str(whl)]
    for p in PLATFORMS:
        cmd += ["--platform", p]
    subprocess.run(cmd + ["--platform", "any", *WHEELS], check=True)
    return sorted(whl.glob("*.whl"))


def model_files(names: list[str], models_dir: Path) -> list[Path]:
    from farm.modelfiles import catalogue_path

    files = []
    for name in names:
        path = catalogue_path(name, models_dir)
        if not path.exists():
            sys.exit(f"{path} is missing: fetch it first (tokenfarm models fetch {name})")
        files.append(path)
    return files


def plan_parts(sizes: dict[str, int], part_bytes: int = PART_BYTES) -> list[list[tuple[str, int, int]]]:
    """Cut the files (name → bytes) into parts of at most part_bytes: each part a list of
    (name, offset, length) pieces, a file that does not fit split across consecutive parts."""
    parts: list[list[tuple[str, int, int]]] = [[]]
    room = part_bytes
    for name, size in sizes.items():
        offset = 0
        while offset < size or (size == 0 and offset == 0):
            if room == 0:
                parts.append([])
                room = part_bytes
            n = min(room, size - offset)
            parts[-1].append((name, offset, n))
            offset += n
            room -= n
            if size == 0:
                break
    return parts


def write_parts(files: dict[str, Path], parts: list[list[tuple[str, int, int]]], dest: Path) -> None:
    for i, pieces in enumerate(parts, 1):
        pdir = dest / f"p{i}"
        pdir.mkdir(parents=True, exist_ok=True)
        for name, offset, length in pieces:
            with files[name].open("rb") as src, (pdir / f"{name}.{offset:012d}").open("wb") as out:
                src.seek(offset)
                out.write(src.read(length))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m")
    ap.add_argument("--models-dir", type=Path, default=REPO / ".tokenfarm" / "models")
    ap.add_argument("--dry-run", action="store_true", help="only size the parts")
    args = ap.parse_args(argv)
    names = [n for n in args.models.split(",") if n]
    models = model_files(names, args.models_dir)
    staging = OUT / "staging"
    if not args.dry_run:
        shutil.rmtree(OUT, ignore_errors=True)
        staging.mkdir(parents=True)
        carried = {"llama.cpp.tar.gz": source_tarball(staging)}
        carried.update({f"whl/{p.name}": p for p in wheels(staging)})
    else:
        carried = {}
    carried.update({f"models/{p.name}": p for p in models})
    sizes = {name: p.stat().st_size for name, p in carried.items()}
    parts = plan_parts(sizes)
    manifest = {"files": {name: {"bytes": sizes[name], "sha256": _sha256(p)} for name, p in carried.items()},
                "n_parts": len(parts), "models": names}
    print(f"{len(parts)} parts, {sum(sizes.values()) / 2**20:.0f} MiB in all")
    if args.dry_run:
        print(json.dumps({"n_parts": len(parts), "bytes": sum(sizes.values())}))
        return 0
    flat = {name.replace("/", "__"): p for name, p in carried.items()}
    write_parts(flat, [[(n.replace("/", "__"), o, ln) for n, o, ln in piece] for piece in parts], OUT)
    (OUT / "p1" / "manifest.json").write_text(json.dumps(manifest, indent=1))
    shutil.rmtree(staging)
    print("Then, on the device tool, in order (one call each; the machine stays warm between them):")
    for i in range(1, len(parts) + 1):
        print(f"  run(command='bash tests/gpu/device_check.sh receive p{i}', carry=['.gpu/p{i}'], timeout_s=60)")
    print("  run(command='bash tests/gpu/device_check.sh run', timeout_s=560)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
