"""docker-compose.yml's own commands, run outside Docker (no engine here): broker-init's script,
Redis's command line, migrate, worker-enrol, the worker from its join folder and the collector,
each with its compose environment and its volumes as folders. The worker registers over TLS
with the user enrolment made for it, takes a job from its own queue and its result is stored.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from sqlalchemy import create_engine, select

from orchestrator.db import ResultRow, WorkerRow, session_scope
from tests.conftest import REPO
from tests.integration.conftest import MODELS_DIR, free_port, stop_process, wait_until

pytestmark = pytest.mark.integration

SWEEP = "name: compose\nmodels: [smollm2-135m]\nn_prompt: [16]\nn_gen: [4]\nrepetitions: 1\nn_warmup: 0\n"


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR:?error} and $$, as `docker compose config` does."""
    def one(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m.group(1), m.group(2), m.group(3)
        value = env.get(name, "")
        if op == ":?" and not value:
            raise AssertionError(f"compose needs {name}: {arg}")
        return value or (arg if op == ":-" else "")

    return re.sub(r"\$\$|\$\{([A-Z_]+)(?:(:-|:\?)([^}]*))?\}", one, text)


class Services:
    """The compose services, their paths mapped: each named volume is a folder under root."""

    def __init__(self, root: Path, dotenv: dict[str, str], host_of: dict[str, str]) -> None:
        self.root, self.host_of = root, host_of
        self.spec = yaml.safe_load(interpolate((REPO / "docker-compose.yml").read_text(), dotenv))["services"]

    def _mounts(self, service: str) -> list[tuple[str, Path]]:
        mounts = []
        for volume in self.spec[service].get("volumes", []):
            name, target = volume.split(":")[:2]
            (self.root / name).mkdir(parents=True, exist_ok=True)
            mounts.append((target, self.root / name))
        return sorted(mounts, key=lambda m: -len(m[0]))

    def map(self, service: str, text: str) -> str:
        for target, folder in self._mounts(service):
            text = re.sub(rf"(?<![\w/]){re.escape(target)}(?=[/\s\"']|$)", str(folder), text)
        for compose_host, real in self.host_of.items():
            text = text.replace(compose_host, real)
        return text

    def env(self, service: str, base: dict[str, str]) -> dict[str, str]:
        env = dict(base)
        env.update({k: self.map(service, str(v)) for k, v in (self.spec[service].get("environment") or {}).items()})
        return env

    def argv(self, service: str) -> list[str]:
        s = self.spec[service]
        # The tokenfarm image's entrypoint is `tokenfarm`; another image's command is whole.
        ours = s.get("image", "").startswith("tokenfarm")
        entry = s.get("entrypoint") or ([str(Path(sys.executable).parent / "tokenfarm")] if ours else [])
        return [*entry, *(self.map(service, str(a)) for a in s["command"])]


def test_the_compose_services_bring_up_a_farm_whose_worker_registers_and_its_result_is_stored(
        tmp_path, pg_url, smollm2):
    if os.geteuid() != 0:
        pytest.skip("broker-init chowns the server's key to Redis's user, which takes root")
    port = free_port()
    dotenv = {"POSTGRES_PASSWORD": "pg", "DASHBOARD_DB_PASSWORD": "ro", "REDIS_ADMIN_PASSWORD": "admin0pw",
              "TOKENFARM_BROKER_PUBLIC_HOST": "localhost", "TOKENFARM_BROKER_PORT": str(port)}
    services = Services(tmp_path / "volumes", dotenv, {"@redis:6380": f"@localhost:{port}"})
    base = {k: v for k, v in os.environ.items() if not k.startswith("TOKENFARM_")}
    base.update(PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", TOKENFARM_MODELS_DIR=str(MODELS_DIR),
                TOKENFARM_CANARY_FRACTION="0", TOKENFARM_CROSSCHECK_FRACTION="0")

    def run(service: str, **extra) -> subprocess.CompletedProcess:
        env = {**services.env(service, base), **extra}
        proc = subprocess.run(services.argv(service), env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"{service}: {proc.stdout}{proc.stderr}"
        return proc

    run("broker-init")
    redis_argv = services.argv("redis")
    redis_argv[redis_argv.index("--tls-port") + 1] = str(port)  # the published port, on loopback
    redis_argv += ["--bind", "127.0.0.1", "--dir", str(tmp_path / "volumes" / "redis-data")]
    (tmp_path / "volumes" / "redis-data").mkdir(exist_ok=True)
    redis = subprocess.Popen(redis_argv, stdout=(tmp_path / "redis.log").open("wb"), stderr=subprocess.STDOUT)
    procs = []
    try:
        health = services.spec["redis"]["healthcheck"]["test"][1]
        health = services.map("redis", health).replace("-p 6380", f"-p {port}")
        assert wait_until(lambda: subprocess.run(["sh", "-c", health], env={**base, **dotenv}).returncode == 0, 20), \
            (tmp_path / "redis.log").read_text()
        db = {"TOKENFARM_DATABASE_URL": pg_url}  # the test's database stands in for the postgres service
        run("migrate", **db)
        run("worker-enrol", **db)
        join_env = (tmp_path / "volumes" / "worker-join" / "worker.env").read_text()
        assert "TOKENFARM_BROKER_URL='rediss://w%3Agpu-worker:" in join_env and "DATABASE" not in join_env
        assert "admin0pw" not in join_env
        worker_env = {**services.env("worker", base), "TOKENFARM_DATA_DIR": str(tmp_path / "worker-data")}
        worker_log = (tmp_path / "worker.log").open("wb")
        procs.append(subprocess.Popen(services.argv("worker"), env=worker_env, stdout=worker_log,
                                      stderr=subprocess.STDOUT))
        collector_env = {**services.env("collector", base), **db}
        procs.append(subprocess.Popen(services.argv("collector"), env=collector_env,
                                      stdout=(tmp_path / "collector.log").open("wb"), stderr=subprocess.STDOUT))
        engine = create_engine(pg_url)

        def registered() -> bool:
            with session_scope(engine) as s:
                row = s.get(WorkerRow, "gpu-worker")
                return row is not None and row.capabilities is not None

        assert wait_until(registered, 60), (tmp_path / "worker.log").read_text()[-3000:]
        job_ids = send_sweep(collector_env, tmp_path)

        def stored() -> bool:
            with session_scope(engine) as s:
                return sorted(s.scalars(select(ResultRow.job_id))) == sorted(job_ids)

        assert wait_until(stored, 180), (tmp_path / "worker.log").read_text()[-3000:] + \
            (tmp_path / "collector.log").read_text()[-3000:]
        with session_scope(engine) as s:
            assert {(r.worker, r.status) for r in s.scalars(select(ResultRow))} == {("gpu-worker", "ok")}
        engine.dispose()
    finally:
        for proc in procs:
            stop_process(proc)
        stop_process(redis)


def send_sweep(env: dict[str, str], tmp_path: Path) -> list[str]:
    """The sweep's jobs recorded and sent to gpu-worker's own queue, as the orchestrator's
    scheduler will (this branch's `sweep submit` still routes by memory class)."""
    from farm.broker import create_app
    from farm.settings import Settings
    from orchestrator import dispatch, lifecycle
    from orchestrator.planning import plan
    from orchestrator.sweep import load_spec

    path = tmp_path / "compose.yaml"
    path.write_text(SWEEP)
    spec = load_spec(path)
    jobs = plan(spec, base_dir=tmp_path, models_dir=MODELS_DIR)
    settings = Settings(database_url=env["TOKENFARM_DATABASE_URL"], broker_url=env["TOKENFARM_BROKER_URL"],
                        broker_ca_file=Path(env["TOKENFARM_BROKER_CA_FILE"]), broker_confined=True,
                        data_dir=tmp_path / "orchestrator-data")
    engine = create_engine(settings.database_url)
    with session_scope(engine) as session:
        lifecycle.record(session, spec, jobs)
    engine.dispose()
    app = create_app(settings)
    for job in jobs:
        dispatch.send_to_worker(app, job, "gpu-worker")
    return [j.job_id for j in jobs]
