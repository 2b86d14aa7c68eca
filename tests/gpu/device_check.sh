#!/usr/bin/env bash
# The GPU check: builds the CUDA engine on the GPU machine, runs the farm's road there with a real
# worker process (every technique, both engines), and leaves results, fingerprint and logs in $OUT.
#
#   bash tests/gpu/device_check.sh receive pN   # one call per part that tests/gpu/pack.py made
#   bash tests/gpu/device_check.sh run          # the check itself, <= 9 minutes on an H200
#   DRY_RUN=1 bash tests/gpu/device_check.sh run  # here, on the CPU: the same road with the CPU
#                                                  # build and venv, to find its faults before
#                                                  # device time is spent on them
#
# Stages are timed and bounded (STAGE_S), and each writes what it has before the next begins, so
# a run stopped at its limit still brings home what it measured. Nothing here downloads.
set -uo pipefail
cd "$(dirname "$0")/../.."
REPO=$PWD
RECV=${GPU_RECV:-$REPO/.gpu-recv}
PARTS=${GPU_PARTS:-$REPO/.gpu}
OUT=${OUT:-$REPO/.gpu-out}
mkdir -p "$OUT"
LOG=$OUT/device_check.log
DRY_RUN=${DRY_RUN:-0}
export REPO RECV PARTS OUT LOG DRY_RUN

say() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$LOG"; }
DEADLINE=$((SECONDS + ${CHECK_S:-540}))
stage() {  # stage NAME SECONDS CMD...: time-bounded, timed, logged; a failure is recorded, not fatal
    local name=$1 limit=$2; shift 2
    # STAGE_SCALE stretches every limit for a dry run on a slow CPU (the deadline with CHECK_S).
    limit=$((limit * ${STAGE_SCALE:-1}))
    local t0=$SECONDS left=$((DEADLINE - SECONDS - 15))
    # Every stage within the check's own deadline, so export always runs before the call's limit.
    [ "$name" != export ] && [ "$limit" -gt "$left" ] && limit=$left
    [ "$limit" -lt 5 ] && { say "stage $name skipped: the check's time is spent"; return 124; }
    say "stage $name (limit ${limit}s)"
    # A child bash that knows this script's functions: timeout runs programs, not functions.
    timeout --kill-after=10 "$limit" bash -c "$(declare -f); $*" >>"$OUT/$name.log" 2>&1
    local rc=$?
    say "stage $name: rc=$rc in $((SECONDS - t0))s"
    echo "{\"stage\": \"$name\", \"rc\": $rc, \"s\": $((SECONDS - t0))}" >>"$OUT/stages.jsonl"
    return $rc
}

receive() {
    local part=$1
    [ -d "$PARTS/$part" ] || { echo ".gpu/$part did not arrive: carry it (carry=['.gpu/$part'])" >&2; exit 2; }
    mkdir -p "$RECV"
    mv "$PARTS/$part"/* "$RECV"/
    du -sh "$RECV"
}

assemble() {  # the models and tarball back from their pieces, each checked against the manifest
    python3 - "$RECV" <<'EOF'
import hashlib, json, sys
from pathlib import Path
recv = Path(sys.argv[1])
manifest = json.loads((recv / "manifest.json").read_text())
for name, meta in manifest["files"].items():
    flat = name.replace("/", "__")
    pieces = sorted(recv.glob(f"{flat}.[0-9]*"))
    target = recv / "files" / name
    target.parent.mkdir(parents=True, exist_ok=True)
    if pieces:
        with target.open("wb") as out:
            for p in pieces:
                out.write(p.read_bytes())
        for p in pieces:
            p.unlink()
    if not target.exists():
        sys.exit(f"{name}: no piece arrived; carry every part that pack.py printed")
    h = hashlib.sha256(target.read_bytes()).hexdigest()
    if target.stat().st_size != meta["bytes"] or h != meta["sha256"]:
        sys.exit(f"{name}: {target.stat().st_size} bytes, sha256 {h[:12]}, where the manifest says "
                 f"{meta['bytes']} and {meta['sha256'][:12]}: a part is missing or was cut; pack and carry again")
print("assembled", len(manifest["files"]), "files")
EOF
}

setup_python() {
    if [ "$DRY_RUN" = 1 ]; then
        export PATH=$REPO/.venv/bin:$PATH PYTHONPATH=$REPO
        return 0
    fi
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$RECV"/files/whl/*.whl || return 1
    tar -xzf "$RECV/files/llama.cpp.tar.gz" -C "$RECV"
    export PYTHONPATH=/tmp/site:$RECV/py:$REPO
    # `tokenfarm` as the package's entry point would be: the same main.
    mkdir -p /tmp/bin
    printf '#!/bin/sh\nexec python3 -c "from orchestrator.cli import main; main()" "$@"\n' >/tmp/bin/tokenfarm
    chmod +x /tmp/bin/tokenfarm
    export PATH=/tmp/bin:$PATH
}

cublas_hints() {  # where cuBLAS is when the image's toolkit has only the compiler: torch's wheels
    ls /usr/local/cuda*/lib64/libcublas.so* >/dev/null 2>&1 && return 0
    local lib
    lib=$(python3 -c "import nvidia.cublas, pathlib; print(pathlib.Path(nvidia.cublas.__path__[0]))" 2>/dev/null) || return 0
    # FindCUDAToolkit looks for libcublas.so, the wheels ship only libcublas.so.N: link the names.
    mkdir -p "$RECV/cuda-links"
    for f in "$lib"/lib/libcublas*.so.*; do ln -sf "$f" "$RECV/cuda-links/$(basename "${f%%.so.*}").so"; done
    echo "-DCMAKE_LIBRARY_PATH=$RECV/cuda-links -DCMAKE_INCLUDE_PATH=$lib/include"
}

build_cuda() {  # libllama and libggml* for sm_90 only, pointed at by LLAMA_CPP_LIB_PATH
    # shellcheck disable=SC2046  # the hints are separate arguments
    cmake -S "$RECV/llama.cpp" -B "$RECV/build" -G Ninja $(cublas_hints) -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON \
        -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_NATIVE=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
        -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_COMMON=OFF -DLLAMA_BUILD_APP=OFF \
        && cmake --build "$RECV/build" -j "$(nproc)" --target llama
}

fingerprint() {
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.memory --format=csv >"$OUT/nvidia-smi.csv" 2>&1
    nvidia-smi -q >"$OUT/nvidia-smi-q.txt" 2>&1
    python3 -c "
import json
from worker import hardware
from worker.engines.llamacpp import LlamaCppBackend
print(json.dumps({'hardware': hardware.summary().model_dump(), 'engine': LlamaCppBackend().versions()}, indent=1))
" >"$OUT/fingerprint.json"
}

seed_models() {  # the catalogue files where the worker looks, with nothing to download
    local models=$TOKENFARM_DATA_DIR/models/catalogue
    mkdir -p "$models"
    if [ "$DRY_RUN" = 1 ]; then
        cp -n "$REPO"/.tokenfarm/models/catalogue/*.gguf "$models"/ 2>/dev/null || true
    else
        cp -n "$RECV"/files/models/*.gguf "$models"/
    fi
}

sweep() {  # one sweep through `tokenfarm demo`: a real worker process on the embedded default
    local spec=$1
    if [ "$DRY_RUN" = 1 ]; then
        # A CPU worker is refused every offloaded job at submit (routing by memory class): the dry
        # run keeps the layers on the host and the jobs otherwise the same.
        spec=$OUT/dry-$(basename "$1")
        sed -e 's/^n_gpu_layers: .*/n_gpu_layers: [0]/' "$1" >"$spec"
    fi
    tokenfarm demo --sweep "$spec" --timeout "$(($2 * ${STAGE_SCALE:-1}))"
}

export_results() {
    tokenfarm results --format jsonl >"$OUT/results.jsonl" 2>>"$LOG"
    tokenfarm results --format md >"$OUT/results.md" 2>>"$LOG"
    tokenfarm leaderboard >"$OUT/leaderboard.txt" 2>>"$LOG"
    cp -r "$TOKENFARM_DATA_DIR/logs" "$OUT/worker-logs" 2>/dev/null || true
}

run() {
    : >"$OUT/stages.jsonl"
    export TOKENFARM_DATA_DIR=${TOKENFARM_DATA_DIR:-/tmp/tokenfarm-gpu} PYTHONUNBUFFERED=1
    export TOKENFARM_CANARY_FRACTION=0 TOKENFARM_CROSSCHECK_FRACTION=0
    if [ "$DRY_RUN" != 1 ]; then
        stage assemble 30 assemble || exit 1
    fi
    setup_python || { say "python set-up failed"; exit 1; }
    if [ "$DRY_RUN" = 1 ]; then
        say "dry run: the CPU build of the venv stands in for the CUDA build"
    elif stage build_cuda 240 build_cuda; then
        export LLAMA_CPP_LIB_PATH=$RECV/build/bin
    else
        say "the CUDA build failed: the llama.cpp stages cannot prove the GPU path (see build_cuda.log)"
    fi
    seed_models
    stage fingerprint 45 fingerprint
    stage pytest_gpu 60 python3 -m pytest -q -m gpu tests/gpu -p no:cacheprovider -p no:randomly
    stage sweep_speed 120 sweep tests/gpu/gpu-speed.yaml 110
    stage sweep_spec 60 sweep tests/gpu/gpu-spec.yaml 50
    # Heads trained small: this proves the path and measures acceptance, not the best heads.
    stage train_mtp 60 tokenfarm models train-mtp smollm2-135m --heads 1 --n-chat 240 --n-code 160 --epochs 2
    stage sweep_torch 60 sweep tests/gpu/gpu-torch.yaml 50
    stage export 45 export_results
    say "done; results in $OUT"
}

case "${1:-run}" in
    receive) receive "${2:?which part: p1, p2, ...}" ;;
    assemble) assemble ;;
    run) run ;;
    *) echo "usage: $0 receive pN | assemble | run" >&2; exit 2 ;;
esac
