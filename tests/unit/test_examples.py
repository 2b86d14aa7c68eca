"""Every sweep under examples/ loads; the home-lab one names real models by hub repository."""

from pathlib import Path

import pytest

from farm.sources import HubRef, parse_ref
from orchestrator.sweep import count_jobs, load_spec

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_each_example_sweep_loads(path):
    spec = load_spec(path)
    assert spec.entries() and count_jobs(spec) > 0


def test_the_24gb_example_names_hub_models_with_quants():
    spec = load_spec(next(p for p in EXAMPLES if p.name == "homelab-24gb.yaml"))
    refs = [parse_ref(e.name) for e in spec.entries()]
    assert all(isinstance(r, HubRef) for r in refs)
    repos = {r.repo for r in refs}
    assert {"unsloth/Qwen3.6-35B-A3B-GGUF", "unsloth/gemma-4-26B-A4B-it-GGUF", "ggml-org/gpt-oss-20b-GGUF"} <= repos
    assert all(r.quant_tag or r.filename for r in refs)
