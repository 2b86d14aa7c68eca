"""The torch engine on CUDA against itself on the CPU, on SmolLM2-135M (skipped without CUDA).

float32 on CUDA must reproduce the CPU's greedy tokens for 16 tokens of a prompt whose
continuation has wide margins (llama.cpp's Q4_1 kernels and float32 agree on it for 32).
bfloat16 rounds every activation and leaves that prompt after 4 tokens even on the CPU, so
it is held to the first tokens of a prompt it follows on the CPU for 16.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from farm.contract import EngineConfig  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

MODELS_DIR = Path(os.environ.get("TOKENFARM_TEST_MODELS_DIR", Path(__file__).resolve().parents[2] / ".tokenfarm" / "models"))
PROMPT_F32 = "Once upon a time, there was a little"
PROMPT_BF16 = "The capital of France is"
N_GEN = 16
N_GEN_BF16 = 4


def greedy(device: str, dtype: str, path: Path, prompt: str, n_gen: int) -> tuple[list[int], dict[str, str]]:
    from worker.engines.torch import TorchBackend

    backend = TorchBackend(device=device, dtype=dtype)
    backend.load(path, EngineConfig(), 128)
    try:
        out = [backend.prefill(backend.tokenize(prompt))]
        while len(out) < n_gen:
            out.append(backend.decode(out[-1]))
        return out, backend.versions()
    finally:
        backend.close()


@pytest.fixture(scope="module")
def smollm2() -> Path:
    from worker.models import fetch

    return fetch("smollm2-135m", MODELS_DIR)


def test_cuda_float32_equals_cpu(smollm2):
    tokens, versions = greedy("cuda", "float32", smollm2, PROMPT_F32, N_GEN)
    assert versions["device"].startswith("cuda:")
    assert tokens == greedy("cpu", "float32", smollm2, PROMPT_F32, N_GEN)[0]


def test_cuda_bfloat16_starts_like_cpu(smollm2):
    tokens, versions = greedy("cuda", "bfloat16", smollm2, PROMPT_BF16, N_GEN_BF16)
    assert versions["dtype"] == "bfloat16"
    assert tokens == greedy("cpu", "float32", smollm2, PROMPT_BF16, N_GEN_BF16)[0]


def test_cuda_timers_see_finished_work_and_peak_memory_is_the_processes(smollm2):
    """A wall-clock timer read after a backend call must cover the GPU's work (each call returns with
    the device idle), and the reported peak is at least the weights this process put there."""
    import time

    from worker.engines.torch import TorchBackend

    backend = TorchBackend(device="cuda", dtype="bfloat16")
    backend.load(smollm2, EngineConfig(), 256)
    try:
        tokens = backend.tokenize("The quick brown fox jumps over the lazy dog. " * 4)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        t0 = time.perf_counter_ns()
        backend.prefill(tokens)
        wall_ms = (time.perf_counter_ns() - t0) / 1e6
        end.record()
        end.synchronize()
        assert wall_ms >= 0.9 * start.elapsed_time(end)
        weights = sum(p.numel() * p.element_size() for p in backend.model.parameters())
        assert backend.conditions()["flags"]["cuda_max_allocated_bytes"] >= weights
    finally:
        backend.close()


def test_llamacpp_offloads_to_cuda_and_decodes_like_the_cpu(smollm2):
    llama_cpp = pytest.importorskip("llama_cpp")
    if not llama_cpp.llama_supports_gpu_offload():
        pytest.skip("this llama.cpp build has no GPU backend (LLAMA_CPP_LIB_PATH names the CUDA build)")
    from worker.engines.llamacpp import LlamaCppBackend

    def run(n_gpu_layers: int) -> tuple[list[int], dict]:
        backend = LlamaCppBackend()
        backend.load(smollm2, EngineConfig(n_gpu_layers=n_gpu_layers), 128)
        try:
            out = [backend.prefill(backend.tokenize(PROMPT_F32))]
            while len(out) < 8:
                out.append(backend.decode(out[-1]))
            return out, backend.conditions()
        finally:
            backend.close()

    gpu_tokens, conditions = run(-1)
    assert conditions["flags"]["gpu_offload"] is True
    assert gpu_tokens == run(0)[0]
