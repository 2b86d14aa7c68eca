"""Technique jobs of the torch engine through the worker's `execute`, on SmolLM2-135M
dequantized to F32: MTP (with heads saved beside the file) and prompt lookup reproduce plain
greedy decoding token for token and fill the Result's speculation fields consistently."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("safetensors")
pytest.importorskip("llama_cpp")

from farm.contract import EngineConfig, Job  # noqa: E402
from farm.settings import Settings  # noqa: E402
from orchestrator.validation import result_problems

pytestmark = pytest.mark.integration

MODELS_DIR = Path(os.environ.get("TOKENFARM_TEST_MODELS_DIR", Path(__file__).resolve().parents[2] / ".tokenfarm" / "models"))


@pytest.fixture(scope="module")
def f32_copy(tmp_path_factory) -> Path:
    """The F32 derivation of SmolLM2, linked into a fresh folder so heads saved beside it stay there."""
    from worker.models import fetch, resolve

    f32, _ = resolve(str(fetch("smollm2-135m", MODELS_DIR)), "F32", MODELS_DIR)
    link = tmp_path_factory.mktemp("torch-techniques") / "smollm2.F32.gguf"
    link.symlink_to(Path(f32).resolve())
    return link


def job(model: Path, technique: str, **kw) -> Job:
    return Job(job_id=f"j-{technique}", sweep_id="s", index=0, model=str(model), quant="F32", engine="torch",
               technique=technique, kind="tg", n_gen=24, repetitions=1, n_warmup=0,
               prompt_category="code", n_prompts=2, config=EngineConfig(n_threads=2), **kw)


def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path, models_dir=MODELS_DIR, worker_name="test")


def test_mtp_job_without_heads_fails_with_the_fix(f32_copy, tmp_path):
    from worker.tasks import execute

    r = execute(job(f32_copy, "mtp", n_mtp=2), settings(tmp_path))
    assert r.status == "failed" and "train-mtp" in r.error


def test_mtp_and_lookup_jobs_are_lossless_and_consistent(f32_copy, tmp_path):
    import torch

    from farm.modelfiles import sha256_file
    from worker.engines.torch.gguf_loader import load_model
    from worker.engines.torch.mtp import MTPHeads, save_heads
    from worker.tasks import execute

    sha = sha256_file(f32_copy)
    base = load_model(f32_copy)
    # Untrained heads (initialised from the base's last block) propose poorly, which is the
    # harder case for losslessness: most passes reject and rewind the cache.
    heads = MTPHeads(base, 2, torch.arange(0, 4096))
    heads.init_from_base()
    save_heads(heads, f32_copy, {"base_sha256": sha})
    del base, heads

    for j in (job(f32_copy, "mtp", n_mtp=2), job(f32_copy, "lookup", n_draft=3, ngram_max=3)):
        r = execute(j, settings(tmp_path))
        assert r.status == "ok", r.error
        assert result_problems(r, j) == []
        spec = r.speculation
        assert spec.lossless is True and spec.first_mismatch == [None, None]
        assert len(spec.acceptance_by_position) >= 1 and all(0 <= a <= 1 for a in spec.acceptance_by_position)
        assert spec.speedup > 0 and len(spec.baseline_samples_ns) == j.repetitions
        assert 0 <= spec.acceptance_rate <= 1 and spec.verify_ns > 0
