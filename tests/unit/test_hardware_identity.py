"""What a Result says it ran on (issue 17): ggml's backends and GPU devices in llama-bench's
spelling, the hardware class a leaderboard row is keyed by, the backend names the collector
accepts, tensor_split held to the GPUs a worker has (submit, routing, collector), and a
llama-bench record of a file on this machine taking that file's sha256."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
from sqlalchemy import select

from farm.broker import signed_body
from farm.contract import (
    GGML_BACKENDS,
    Capabilities,
    EngineConfig,
    Envelope,
    Hardware,
    Job,
    Result,
    backend_problems,
)
from farm.identity import output_sha256
from farm.memory import GIB, fits
from farm.modelfiles import model_sha256, read_facts
from farm.stats import summarize
from orchestrator import lifecycle
from orchestrator.collector import ingest
from orchestrator.db import JobRow, RejectionRow, ResultRow, WorkerRow, session_scope
from orchestrator.llamabench import header_disagreement, import_text, local_identity
from orchestrator.planning import plan, split_refusal
from orchestrator.ranking import hardware_class, hardware_label, leaderboard
from orchestrator.scheduler import Slot, assign
from orchestrator.sweep import SweepSpec
from orchestrator.workers import add_worker
from tests.results_factory import result as make_result
from worker.hardware import (
    GGML_DEVICE_ACCEL,
    GGML_DEVICE_CPU,
    GGML_DEVICE_GPU,
    GGML_DEVICE_IGPU,
    EngineDevices,
    GgmlDevice,
    ggml_backends,
    ggml_devices,
    torch_backends,
    with_devices,
)

CPU_DEV = GgmlDevice("CPU", GGML_DEVICE_CPU, "AMD EPYC 9354", "CPU")


# --- ggml's registry in llama-bench's spelling --------------------------------------------------

def test_backends_are_spelled_as_llama_bench_spells_them():
    assert ggml_backends([("CPU", 1)]) == "CPU"
    assert ggml_backends([("CUDA", 2), ("CPU", 1)]) == "CUDA"
    assert ggml_backends([("MTL", 1), ("BLAS", 1), ("CPU", 1)]) == "MTL,BLAS"
    # An RPC registry counts only once it has servers (devices), and always comes last.
    assert ggml_backends([("RPC", 0), ("CPU", 1)]) == "CPU"
    assert ggml_backends([("RPC", 2), ("Vulkan", 1), ("CPU", 1)]) == "Vulkan,RPC"


def test_gpu_devices_are_the_ones_llama_cpp_places_layers_on():
    h200 = GgmlDevice("CUDA0", GGML_DEVICE_GPU, "NVIDIA H200", "CUDA")
    second = GgmlDevice("CUDA1", GGML_DEVICE_GPU, "NVIDIA H200", "CUDA")
    igpu = GgmlDevice("Vulkan0", GGML_DEVICE_IGPU, "AMD Radeon 780M", "Vulkan")
    blas = GgmlDevice("BLAS", GGML_DEVICE_ACCEL, "OpenBLAS", "BLAS")
    rpc = GgmlDevice("RPC0", GGML_DEVICE_GPU, "remote", "RPC")
    assert ggml_devices([("CPU", 1)], [CPU_DEV]) == EngineDevices("CPU", 0, "")
    assert ggml_devices([("CUDA", 2), ("CPU", 1)], [h200, second, CPU_DEV]) == EngineDevices("CUDA", 2, "NVIDIA H200")
    # An accelerator beside the CPU (BLAS) is no GPU; an iGPU counts only where no discrete GPU is.
    assert ggml_devices([("BLAS", 1), ("CPU", 1)], [CPU_DEV, blas]).n_gpus == 0
    assert ggml_devices([("Vulkan", 1), ("CPU", 1)], [igpu, CPU_DEV]).n_gpus == 1
    assert ggml_devices([("CUDA", 1), ("Vulkan", 1), ("CPU", 1)], [h200, igpu, CPU_DEV]).n_gpus == 1
    assert ggml_devices([("CUDA", 1), ("RPC", 1), ("CPU", 1)], [h200, rpc, CPU_DEV]).n_gpus == 1


def test_the_gpu_name_comes_from_nvml_else_from_the_engine():
    nvml = Hardware(cpu="x", gpu="NVIDIA GeForce RTX 4090")
    on_cuda = with_devices(nvml, EngineDevices("CUDA", 1, "NVIDIA GeForce RTX 4090 (ggml)"))
    assert (on_cuda.gpu, on_cuda.backends, on_cuda.n_gpus) == ("NVIDIA GeForce RTX 4090", "CUDA", 1)
    metal = with_devices(Hardware(cpu="Apple M2 Max"), EngineDevices("MTL,BLAS", 1, "Apple M2 Max"))
    assert (metal.gpu, metal.backends) == ("Apple M2 Max", "MTL,BLAS")


def test_torch_names_its_backend_by_the_device_it_runs_on():
    assert torch_backends("cuda", hip=False) == "CUDA"
    assert torch_backends("cuda", hip=True) == "ROCm"
    assert torch_backends("mps", hip=False) == "MPS"
    assert torch_backends("cpu", hip=False) == "CPU"


# --- the hardware class of a leaderboard row ----------------------------------------------------

def test_a_cpu_only_box_is_its_cpu_and_backend_whatever_its_core_count():
    assert hardware_label("AMD EPYC 9354", "", "CPU") == "AMD EPYC 9354 (CPU)"
    assert hardware_label("AMD EPYC 9354", "", "") == "AMD EPYC 9354 (CPU)"  # before backends were recorded
    assert hardware_label("Intel Core i7-1260P", "", "BLAS") == "Intel Core i7-1260P (BLAS)"
    # Two boxes of the same CPU, one with its cores capped, are one row.
    r8, r32 = (make_result("a", hardware=Hardware(cpu="AMD EPYC 9354", n_cpu_cores=n, backends="CPU"))
               for n in (8, 32))
    rows = leaderboard([r8, r32])
    assert len(rows) == 1 and rows[0].hardware == "AMD EPYC 9354 (CPU)" and rows[0].n_results == 2


def test_a_gpu_is_its_name_and_accelerator_and_apple_its_chip_and_metal():
    assert hardware_label("AMD Ryzen 9", "NVIDIA GeForce RTX 4090", "CUDA") == "NVIDIA GeForce RTX 4090 (CUDA)"
    assert hardware_label("AMD Ryzen 9", "NVIDIA GeForce RTX 4090", "Vulkan") == "NVIDIA GeForce RTX 4090 (Vulkan)"
    # Older llama-bench: no GPU name, "Metal"; newer: the chip as GPU and "MTL". One class.
    assert hardware_label("Apple M2 Max", "", "Metal,BLAS") == "Apple M2 Max (Metal)"
    assert hardware_label("Apple M2 Max", "Apple M2 Max", "MTL,BLAS") == "Apple M2 Max (Metal)"
    # A GPU box whose llama.cpp build is CPU-only computed on its CPU.
    assert hardware_label("AMD Ryzen 9", "NVIDIA GeForce RTX 4090", "CPU") == "AMD Ryzen 9 (CPU)"
    assert hardware_class("NVIDIA GeForce RTX 4090", "CPU") == "CPU"
    assert hardware_class("", "Metal,BLAS") == "GPU"


# --- backend names the collector accepts --------------------------------------------------------

def test_backend_names_are_checked_against_llama_cpps_own():
    for ok in ("", "CPU", "CUDA", "Metal,BLAS", "MTL,BLAS", "Vulkan,RPC", "ROCm", "MPS"):
        assert backend_problems(ok) == [], ok
    assert all(backend_problems(name) == [] for name in GGML_BACKENDS)
    assert "did you mean 'CUDA'" in backend_problems("Cuda")[0]
    assert "did you mean 'Vulkan'" in backend_problems("Vulcan")[0]
    assert "known: CPU, CUDA" in backend_problems("QuantumGPU")[0]
    assert "more than once" in " ".join(backend_problems("CUDA,CUDA"))
    assert "empty name" in backend_problems("CUDA,,BLAS")[0]


@pytest.fixture
def tokens(engine):
    with session_scope(engine) as s:
        return {"w1": add_worker(s, "w1")}


def _leased(engine, config: EngineConfig = EngineConfig()) -> Job:
    spec = SweepSpec(name="hw", models=["smollm2-135m"], n_prompt=[16], n_gen=[], repetitions=2)
    job = plan(spec)[0].model_copy(update={"config": config})
    with session_scope(engine) as s:
        lifecycle.record(s, spec, [job])
        return lifecycle.lease(s.get(JobRow, job.job_id), "w1")


def _answer(job: Job, hardware: Hardware) -> Result:
    samples = [1_000_000, 1_200_000]
    avg, std = summarize(job.n_tokens, samples)
    return Result(job_id=job.job_id, sweep_id=job.sweep_id, status="ok", worker="w1", model=job.model,
                  model_sha256="c" * 64, source_sha256=job.model_sha256, quant=job.quant, test=job.test,
                  n_prompt=job.n_prompt, repetitions=job.repetitions, samples_ns=samples, avg_ts=avg,
                  stddev_ts=std, output_sha256=output_sha256([[1]]), config=job.config, hardware=hardware)


def _send(engine, tokens, job: Job, result: Result):
    body = signed_body(Envelope(kind="result", job_id=job.job_id, worker="w1", result=result,
                                lease_id=job.lease_id, attempt=job.attempt), tokens["w1"])
    with session_scope(engine) as s:
        return ingest(s, body)


def test_the_collector_refuses_forged_backends_and_stores_nothing(engine, tokens):
    for forged, said in (("Cuda", "did you mean 'CUDA'"), ("CUDA,CUDA", "more than once"),
                         ("TPUv9", "no llama.cpp or torch build reports")):
        job = _leased(engine)
        outcome = _send(engine, tokens, job, _answer(job, Hardware(cpu="x", backends=forged)))
        assert outcome.action == "rejected" and said in outcome.reason and "hardware.backends" in outcome.reason
    with session_scope(engine) as s:
        assert s.scalars(select(ResultRow)).all() == []
        assert len(s.scalars(select(RejectionRow)).all()) == 3
    honest = _leased(engine)
    assert _send(engine, tokens, honest, _answer(honest, Hardware(cpu="x", backends="CPU"))).action == "stored"


def test_the_collector_refuses_a_split_over_more_gpus_than_the_run_had(engine, tokens):
    job = _leased(engine, EngineConfig(tensor_split=(1, 1)))
    outcome = _send(engine, tokens, job, _answer(job, Hardware(cpu="x", backends="CPU", n_gpus=0)))
    assert outcome.action == "rejected" and "tensor_split [1, 1] places the model on 2 devices" in outcome.reason
    gpus = _leased(engine)
    lie = _send(engine, tokens, gpus, _answer(gpus, Hardware(cpu="x", backends="CPU", n_gpus=2)))
    assert lie.action == "rejected" and "name no GPU backend" in lie.reason
    two = _leased(engine, EngineConfig(tensor_split=(1, 1)))
    ok = _send(engine, tokens, two, _answer(two, Hardware(cpu="x", gpu="H200", backends="CUDA", n_gpus=2)))
    assert ok.action == "stored", ok.reason
    # main_gpu 1 names a second device: a one-GPU run cannot have used it.
    second = _leased(engine, EngineConfig(main_gpu=1, split_mode="none"))
    one = _send(engine, tokens, second, _answer(second, Hardware(cpu="x", gpu="H200", backends="CUDA", n_gpus=1)))
    assert one.action == "rejected" and "main_gpu 1 places the model on 2 devices" in one.reason


def _announce(engine, tokens, kind: str, hardware: Hardware, engines=("llamacpp",)):
    caps = Capabilities(engines=list(engines), hardware=hardware, offered_ram_bytes=8 * GIB)
    body = signed_body(Envelope(kind=kind, worker="w1", capabilities=caps), tokens["w1"])
    with session_scope(engine) as s:
        return ingest(s, body)


def _announced(engine) -> dict | None:
    with session_scope(engine) as s:
        return s.scalars(select(WorkerRow).where(WorkerRow.name == "w1")).one().capabilities


def test_the_collector_keeps_no_announcement_whose_hardware_no_build_reports(engine, tokens):
    honest = Hardware(cpu="x", gpu="RTX 4090", backends="CUDA", n_gpus=1)
    assert _announce(engine, tokens, "hello", honest).action == "hello"
    assert _announced(engine)["hardware"]["backends"] == "CUDA"
    for forged, said in ((Hardware(cpu="x", backends="Cuda", n_gpus=1), "did you mean 'CUDA'"),
                         (Hardware(cpu="x", backends="CPU", n_gpus=4), "name no GPU backend")):
        outcome = _announce(engine, tokens, "heartbeat", forged)
        assert outcome.action == "rejected" and said in outcome.reason, outcome
        assert outcome.reason.startswith("heartbeat not kept: capabilities.hardware.")
        # Routing still sees the last announcement that passed, not the forged one.
        assert _announced(engine)["hardware"] == honest.model_dump(mode="json")
    # A torch-only worker's GPUs are torch's: its backends are checked, its n_gpus not held to ggml's.
    torch_gpus = Hardware(cpu="x", backends="CPU", n_gpus=2)
    assert _announce(engine, tokens, "heartbeat", torch_gpus, engines=("torch",)).action == "heartbeat"
    with session_scope(engine) as s:
        assert len(s.scalars(select(RejectionRow)).all()) == 2


# --- tensor_split: refused at submit, routed by GPUs --------------------------------------------

def test_split_devices_ignore_trailing_zeros_only():
    assert EngineConfig().n_split_devices == 0
    assert EngineConfig(tensor_split=(1, 1)).n_split_devices == 2
    assert EngineConfig(tensor_split=(3, 1, 0, 0)).n_split_devices == 2
    assert EngineConfig(tensor_split=(1, 0, 1)).n_split_devices == 3  # share i is device i's


def _caps(n_gpus: int, backends: str, engines=("llamacpp",)) -> Capabilities:
    return Capabilities(engines=list(engines), offered_ram_bytes=64 * GIB,
                        hardware=Hardware(cpu="x", backends=backends, n_gpus=n_gpus))


def _split_job(i: int, shares: tuple[float, ...]) -> Job:
    return Job(job_id=f"j{i}", sweep_id="s", index=i, model="smollm2-135m", quant="Q4_1", kind="pp", n_prompt=16,
               config=EngineConfig(tensor_split=shares))


def test_a_split_no_worker_has_the_gpus_for_is_refused_with_the_fix():
    jobs = [_split_job(0, (1, 1)), _split_job(1, ())]
    line = split_refusal(jobs, {"box": _caps(0, "CPU")})
    assert line is not None and "\n" not in line
    assert "tensor_split [1, 1]" in line and "no registered llama.cpp worker has a GPU" in line
    assert "backends CPU" in line and "leave tensor_split empty" in line
    fewer = split_refusal([_split_job(0, (1, 1, 1))], {"duo": _caps(2, "CUDA")})
    assert "give at most 2 shares" in fewer and "duo" in fewer
    assert split_refusal(jobs, {"duo": _caps(2, "CUDA")}) is None
    assert split_refusal(jobs, {}) is None  # nobody known yet: queued for a worker that fits
    # A torch-only worker's GPUs cannot take a llama.cpp split.
    assert split_refusal(jobs, {"t": _caps(4, "CUDA", ("torch",))}) is None
    assert split_refusal(jobs, {"t": _caps(4, "CUDA", ("torch",)), "box": _caps(0, "CPU")}) is not None


def test_main_gpu_names_a_device_that_submit_and_routing_hold_to_the_gpus_workers_have():
    assert EngineConfig().n_gpus_named == 0
    assert EngineConfig(main_gpu=2).n_gpus_named == 3
    assert EngineConfig(main_gpu=1, tensor_split=(1, 1, 1)).n_gpus_named == 3
    assert EngineConfig(main_gpu=1, tensor_split=(1, 1, 1)).named_gpus_text() == "tensor_split [1, 1, 1] and main_gpu 1"
    second = Job(job_id="m", sweep_id="s", index=0, model="smollm2-135m", quant="Q4_1", kind="pp", n_prompt=16,
                 config=EngineConfig(split_mode="none", main_gpu=1))
    line = split_refusal([second], {"one": _caps(1, "CUDA")})
    assert line is not None and "main_gpu 1" in line and "main_gpu below 1" in line and "one" in line
    assert "leave tensor_split empty and main_gpu at 0" in split_refusal([second], {"cpu": _caps(0, "CPU")})
    assert split_refusal([second], {"duo": _caps(2, "CUDA")}) is None
    assert not fits(_caps(1, "CUDA"), second) and fits(_caps(2, "CUDA"), second)


def test_routing_sends_a_split_only_to_a_worker_with_enough_gpus():
    split, plain = _split_job(0, (1, 1)), _split_job(1, ())
    assert not fits(_caps(0, "CPU"), split) and not fits(_caps(1, "CUDA"), split) and fits(_caps(2, "CUDA"), split)
    slots = [Slot("cpu", _caps(0, "CPU")), Slot("one", _caps(1, "CUDA")), Slot("duo", _caps(2, "CUDA"))]
    chosen = dict((j.job_id, w) for j, w in assign([(split, None), (plain, None)], slots))
    assert chosen["j0"] == "duo" and chosen["j1"] in ("cpu", "one")
    assert assign([(split, None)], slots[:2]) == []


# --- a llama-bench record of a file on this machine ---------------------------------------------

def _tiny_gguf(path):
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_file_type(0)  # ALL_F32
    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    w.add_tensor("blk.0.attn_q.weight", np.ones((4, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _record(path, **changes) -> dict:
    samples = [2_000_000, 2_100_000]
    avg, std = summarize(16, samples)
    # llama-bench's own description of an F32 file: its size label guessed, "all F32".
    rec = {"build_commit": "0c1e570", "build_number": 1, "cpu_info": "AMD EPYC", "gpu_info": "", "backends": "CPU",
           "model_filename": str(path), "model_type": "llama ?B all F32", "model_size": 192, "model_n_params": 48,
           "n_threads": 2, "n_gpu_layers": 0, "n_prompt": 16, "n_gen": 0, "n_depth": 0,
           "test_time": "2026-12-02T19:26:36Z", "avg_ts": avg, "stddev_ts": std, "samples_ns": samples}
    return {**rec, **changes}


def test_a_record_of_a_local_file_takes_its_sha256_only_where_the_header_agrees(tmp_path):
    path = _tiny_gguf(tmp_path / "tiny.gguf")
    facts = read_facts(path)
    assert (facts.weight_bytes, facts.n_params) == (192, 48)  # what the record says, from the header
    assert header_disagreement(_record(path), facts) is None
    assert local_identity(_record(path)) == (model_sha256(path), facts)
    for changes in ({"model_n_params": 49}, {"model_size": 448}, {"model_type": "llama ?B Q4_0"},
                    {"model_type": "qwen3 ?B all F32"}):
        assert local_identity(_record(path, **changes)) is None, changes
    assert local_identity(_record(path, model_filename="tiny.gguf")) is None  # relative: another machine's
    assert local_identity(_record(tmp_path / "gone.gguf")) is None
    (tmp_path / "not.gguf").write_bytes(b"not a model")
    assert local_identity(_record(tmp_path / "not.gguf", model_size=11)) is None


def test_an_imported_record_joins_the_native_rows_of_the_same_file(engine, tmp_path):
    path = _tiny_gguf(tmp_path / "tiny.gguf")
    sha = model_sha256(path)
    text = "\n".join(json.dumps(r) for r in (_record(path), _record(tmp_path / "gone.gguf")))
    with session_scope(engine) as s:
        assert import_text(s, text, "box", "bench.jsonl") == (2, 0)
    with session_scope(engine) as s:
        stored = {row.result["model"]: Result.model_validate(row.result) for row in s.scalars(select(ResultRow))}
    here, gone = stored[str(path)], stored[str(tmp_path / "gone.gguf")]
    assert here.model_sha256 == sha == here.source_sha256 and gone.model_sha256 == ""
    # The file's header gives the memory estimate its shape; the record's own words stay as they came.
    header = read_facts(path)
    assert (here.model_facts.n_layer, here.model_facts.kv_bytes_per_token) == (header.n_layer,
                                                                              header.kv_bytes_per_token)
    assert here.model_facts.n_layer > 0 and gone.model_facts.n_layer == 0
    assert (here.model_facts.model_type, here.model_facts.size_bytes) == ("llama ?B all F32", 192)
    # A native run of the same file under its catalogue-style name, same settings and box: one row.
    native = here.model_copy(update={"job_id": "native", "model": "tiny", "worker": "w1"})
    rows = leaderboard([here, native, gone])
    assert len(rows) == 2
    joined = next(r for r in rows if r.model_sha256 == sha)
    assert joined.n_results == 2 and joined.worker == "box, w1"
