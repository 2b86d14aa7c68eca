"""The GPU check (tests/gpu/device_check.sh) checked where a CPU can check it: its sweeps ask for
what the GPU run must cover, its payload fits the device's carry, and what is cut into parts
comes back whole (or is refused when a part is missing)."""

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "tests" / "gpu"))
import pack  # noqa: E402

CHECK = REPO / "tests" / "gpu" / "device_check.sh"


def test_the_script_parses():
    subprocess.run(["bash", "-n", str(CHECK)], check=True)


def test_the_sweeps_cover_what_the_gpu_run_must_measure():
    from orchestrator.sweep import count_jobs, load_spec

    specs = {p.stem: load_spec(p) for p in (REPO / "tests" / "gpu").glob("gpu-*.yaml")}
    assert set(specs) == {"gpu-speed", "gpu-spec", "gpu-torch"}
    speed = specs["gpu-speed"]
    assert -1 in speed.n_gpu_layers and any(n > 0 for n in speed.n_gpu_layers)  # full and partial offload
    assert 512 in speed.n_prompt and 128 in speed.n_gen and 4096 in speed.n_depth
    names = {e.name for e in speed.entries()}
    assert {"smollm2-135m", "gemma3-270m", "smollm2-135m-moe8x2"} <= names
    assert {q for e in speed.entries() if e.name != "smollm2-135m-moe8x2" for q in e.quants} == {"F16", "Q8_0", "Q4_K_M"}
    assert {"spec", "lookup"} <= set(specs["gpu-spec"].techniques)
    torch_spec = specs["gpu-torch"]
    assert torch_spec.engines == ["torch"] and "mtp" in torch_spec.techniques and "bfloat16" in torch_spec.torch_dtype
    # Sized for minutes on one GPU, not hours.
    assert sum(count_jobs(s) for s in specs.values()) <= 120


def test_parts_fit_the_carry_and_cover_every_byte():
    sizes = {"a": 3 * pack.PART_BYTES + 5, "b": 10, "c": pack.PART_BYTES - 10, "empty": 0}
    parts = pack.plan_parts(sizes)
    assert all(sum(n for _, _, n in p) <= pack.PART_BYTES for p in parts)
    for name, size in sizes.items():
        pieces = sorted((o, n) for p in parts for f, o, n in p if f == name)
        assert sum(n for _, n in pieces) == size
        assert all(o1 + n1 == o2 for (o1, n1), (o2, _) in zip(pieces, pieces[1:]))  # contiguous, no overlap
    assert len(parts) == -(-sum(sizes.values()) // pack.PART_BYTES)  # no part left half empty but the last


def _pack_small(tmp_path, part_bytes):
    files = {"models__m.gguf": tmp_path / "m.gguf", "whl__x.whl": tmp_path / "x.whl"}
    files["models__m.gguf"].write_bytes(bytes(range(256)) * 40)
    files["whl__x.whl"].write_bytes(b"wheel" * 7)
    sizes = {n: p.stat().st_size for n, p in files.items()}
    parts = pack.plan_parts(sizes, part_bytes)
    out = tmp_path / "parts"
    pack.write_parts(files, parts, out)
    manifest = {"files": {n.replace("__", "/"): {"bytes": sizes[n], "sha256": pack._sha256(p)} for n, p in files.items()}}
    (out / "p1" / "manifest.json").write_text(json.dumps(manifest))
    return out, len(parts), files


def _check(tmp_path, *args):
    env = {"PATH": "/usr/bin:/bin", "GPU_RECV": str(tmp_path / "recv"), "GPU_PARTS": str(tmp_path / "parts"),
           "OUT": str(tmp_path / "out")}
    return subprocess.run(["bash", str(CHECK), *args], env=env, capture_output=True, text=True)


def test_received_parts_are_put_back_together_and_checked(tmp_path):
    _, n_parts, files = _pack_small(tmp_path, part_bytes=4000)
    assert n_parts == 3
    for i in range(1, n_parts + 1):
        assert _check(tmp_path, "receive", f"p{i}").returncode == 0
    done = _check(tmp_path, "assemble")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "recv" / "files" / "models" / "m.gguf").read_bytes() == files["models__m.gguf"].read_bytes()


@pytest.mark.parametrize("missing", ["p2", "p3"])
def test_a_missing_part_is_refused_by_name(tmp_path, missing):
    _, n_parts, _ = _pack_small(tmp_path, part_bytes=4000)
    for i in range(1, n_parts + 1):
        if f"p{i}" != missing:
            _check(tmp_path, "receive", f"p{i}")
    done = _check(tmp_path, "assemble")
    assert done.returncode != 0
    assert "models/m.gguf" in done.stderr and "a part is missing" in done.stderr
