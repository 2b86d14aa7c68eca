"""Bad sweeps exit non-zero with one clear line, and nothing reaches the database or the broker."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.conftest import service_env, tokenfarm

pytestmark = pytest.mark.integration

CASES = {
    "syntax": ("name: x\nmodels: [smollm2-135m\n", "YAML syntax error"),
    "unknown_field": ("name: x\nmodels: [smollm2-135m]\nrepetitons: 3\n", "unknown field 'repetitons'"),
    "unknown_quant": ("name: x\nmodels: [smollm2-135m]\nquants: [Q4_9]\n", "unknown quant 'Q4_9'"),
    "missing_model": ("name: x\nmodels: [./models/absent.gguf]\n", "no such file"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_sweep_is_refused_with_one_line(tmp_path: Path, case: str):
    text, expected = CASES[case]
    sweep = tmp_path / f"{case}.yaml"
    sweep.write_text(text)
    env = service_env(tmp_path / "data")
    proc = tokenfarm(env, "sweep", "submit", str(sweep), "--wait", timeout=60)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert expected in lines[0] and str(sweep.name) in lines[0]
    # Nothing was recorded or enqueued.
    assert not (tmp_path / "data" / "tokenfarm.sqlite3").exists()
    queue = tmp_path / "data" / "broker" / "queue"
    assert not queue.exists() or not any(queue.iterdir())
