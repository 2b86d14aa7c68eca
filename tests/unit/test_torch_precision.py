"""The torch engine's precision is a sweep setting and its device the worker's: what the GPU path
needs (bf16 on CUDA) without a GPU to test it on, checked where a CPU can check it."""

import pytest

from farm.contract import EngineConfig, Job
from farm.settings import Settings
from orchestrator.planning import plan
from orchestrator.sweep import SweepSpec


def test_torch_dtype_multiplies_torch_jobs_only():
    spec = SweepSpec(name="t", models=["smollm2-135m"], quants=["F32"], engines=["llamacpp", "torch"],
                     torch_dtype=["float32", "bfloat16"], n_prompt=[8], n_gen=[])
    jobs = plan(spec, sweep_id="s")
    by_engine = {(j.engine, j.config.torch_dtype) for j in jobs}
    assert by_engine == {("llamacpp", "float32"), ("torch", "float32"), ("torch", "bfloat16")}
    assert len(jobs) == 3


def test_a_llamacpp_job_refuses_a_torch_precision():
    with pytest.raises(ValueError, match="torch_dtype applies to engine torch only"):
        Job(job_id="j", sweep_id="s", index=0, model="m", quant="F32", kind="pp", n_prompt=8,
            config=EngineConfig(torch_dtype="bfloat16"))


def test_the_torch_backend_takes_the_jobs_precision_and_the_workers_device():
    pytest.importorskip("torch")
    from worker.engines import create_backend, torch_device

    backend = create_backend("torch", EngineConfig(torch_dtype="bfloat16"), "cpu")
    assert str(backend.dtype) == "torch.bfloat16" and backend.device.type == "cpu"
    import torch

    assert torch_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert create_backend("torch").dtype == torch.float32


def test_the_workers_torch_device_setting_is_checked(monkeypatch):
    monkeypatch.setenv("TOKENFARM_TORCH_DEVICE", "cuda:1")
    assert Settings().torch_device == "cuda:1"
    monkeypatch.setenv("TOKENFARM_TORCH_DEVICE", "gpu")
    with pytest.raises(ValueError):
        Settings()
