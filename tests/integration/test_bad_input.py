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
    "nul_in_name": ('name: "a\\0b"\nmodels: [smollm2-135m]\n', "control character"),
    "nul_in_model": ('name: x\nmodels: ["smollm2\\0"]\n', "control character"),
    "too_many_jobs": ("name: x\nmodels: [smollm2-135m]\nn_prompt: [" + ", ".join(map(str, range(1, 101)))
                      + "]\nn_threads: [" + ", ".join(map(str, range(1, 201))) + "]\n", "--max-jobs"),
    "mtp_on_llamacpp": ("name: x\nmodels: [smollm2-135m]\nn_gen: [8]\ntechniques: [mtp]\nprompt_categories: [qa]\n",
                        "this file carries no MTP layers; use engine torch"),
    "long_model_path": ("name: x\nmodels: [./" + "m" * 300 + ".gguf]\n", "File name too long"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_sweep_is_refused_with_one_line(tmp_path: Path, case: str):
    text, expected = CASES[case]
    sweep = tmp_path / f"{case}.yaml"
    sweep.write_text(text)
    env = service_env(tmp_path / "data")
    proc = tokenfarm(env, "sweep", "submit", str(sweep), "--wait", timeout=60)
    assert proc.returncode == 3, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert expected in lines[0] and str(sweep.name) in lines[0]
    # Nothing was recorded or enqueued.
    assert not (tmp_path / "data" / "tokenfarm.sqlite3").exists()
    queue = tmp_path / "data" / "broker" / "queue"
    assert not queue.exists() or not any(queue.iterdir())


def test_a_sweep_file_above_the_size_limit_is_refused_unread(tmp_path: Path):
    sweep = tmp_path / "huge.yaml"
    sweep.write_text("name: x\nmodels: [smollm2-135m]\nn_gen: [" + ", ".join(["8"] * 400_000) + "]\n")
    env = service_env(tmp_path / "data")
    proc = tokenfarm(env, "sweep", "submit", str(sweep), timeout=60)
    assert proc.returncode == 3 and "above the limit of 1048576" in proc.stderr, proc.stderr
    assert len([line for line in proc.stderr.splitlines() if line.strip()]) == 1


def test_a_300_character_sweep_file_name_is_one_line(tmp_path: Path):
    env = service_env(tmp_path / "data")
    proc = tokenfarm(env, "sweep", "submit", str(tmp_path / ("s" * 300 + ".yaml")), timeout=60)
    assert proc.returncode == 3 and "File name too long" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_a_raised_job_limit_lets_a_big_sweep_through_to_the_next_check(tmp_path: Path):
    sweep = tmp_path / "big.yaml"
    sweep.write_text("name: x\nmodels: [smollm2-135m]\nn_prompt: [1, 2, 3]\nn_gen: []\nn_threads: [1, 2]\n")
    env = service_env(tmp_path / "data")
    refused = tokenfarm(env, "sweep", "submit", str(sweep), "--max-jobs", "5", timeout=60)
    assert refused.returncode == 3 and "6 jobs, above the limit of 5" in refused.stderr, refused.stderr
    # Past the limit, the next refusal is the schema's: nothing was migrated behind the user's back.
    behind = tokenfarm(env, "sweep", "submit", str(sweep), "--max-jobs", "6", timeout=60)
    assert behind.returncode == 3 and "run `tokenfarm db upgrade`" in behind.stderr, behind.stderr
    assert not (tmp_path / "data" / "tokenfarm.sqlite3").exists()


def test_read_only_commands_on_a_fresh_database_say_upgrade_and_write_nothing(tmp_path: Path):
    env = service_env(tmp_path / "data")
    for args in (["status"], ["results"], ["leaderboard"], ["workers"], ["canaries", "list"], ["recommend", "--vram", "8"],
                 ["claims"]):
        proc = tokenfarm(env, *args, timeout=60)
        assert proc.returncode == 3 and "the database schema is behind: run `tokenfarm db upgrade`" in proc.stderr, args
    assert not (tmp_path / "data" / "tokenfarm.sqlite3").exists()
    assert tokenfarm(env, "db", "upgrade", timeout=60).returncode == 0
    assert tokenfarm(env, "status", timeout=60).returncode == 0


def test_usage_errors_keep_click_s_code_and_help_lists_the_exit_codes(tmp_path: Path):
    env = service_env(tmp_path / "data")
    assert tokenfarm(env, "results", "--format", "xml", timeout=60).returncode == 2
    helped = tokenfarm(env, "--help", timeout=60)
    text = " ".join(helped.stdout.split())  # Rich wraps the epilog to the terminal's width
    assert helped.returncode == 0 and "3 refused input" in text and "1 a sweep ended with failed jobs" in text, text


def test_threads_above_every_machine_s_cores_are_refused_and_nothing_recorded(tmp_path: Path):
    from sqlalchemy import create_engine, text

    from tests.integration.conftest import at_head

    env = at_head(service_env(tmp_path / "data"))
    sweep = tmp_path / "threads.yaml"
    sweep.write_text("name: x\nmodels: [smollm2-135m]\nn_prompt: [8]\nn_gen: []\nn_threads: [1000]\n")
    proc = tokenfarm(env, "sweep", "submit", str(sweep), timeout=60)
    assert proc.returncode == 3 and "n_threads 1000 is above the cores of every machine" in proc.stderr, proc.stderr
    engine = create_engine(f"sqlite:///{tmp_path / 'data' / 'tokenfarm.sqlite3'}")
    with engine.connect() as c:
        assert c.execute(text("SELECT count(*) FROM jobs")).scalar() == 0
    engine.dispose()
