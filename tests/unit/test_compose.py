"""docker-compose.yml is valid against the Compose specification and keeps its promises."""

import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import REPO

COMPOSE = REPO / "docker-compose.yml"


def test_compose_file_validates_against_the_compose_spec():
    exe = shutil.which("check-jsonschema") or str(Path(sys.executable).parent / "check-jsonschema")
    proc = subprocess.run([exe, "--builtin-schema", "vendor.compose-spec", str(COMPOSE)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_workers_never_get_database_credentials_and_have_a_gpu():
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    assert {"redis", "postgres", "migrate", "collector", "worker", "dashboard"} <= set(services)
    worker = services["worker"]
    assert not any("DATABASE" in key for key in worker.get("environment", {}))
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]


def test_redis_has_a_password_and_the_dashboard_reads_with_a_read_only_role():
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    assert "--requirepass" in services["redis"]["command"]
    assert "tokenfarm_ro:" in services["dashboard"]["environment"]["TOKENFARM_DATABASE_URL"]
    init = (REPO / "deploy" / "postgres" / "10-dashboard-readonly.sh").read_text()
    assert "default_transaction_read_only = on" in init and "GRANT SELECT" in init
    assert "INSERT" not in init and "ALL PRIVILEGES" not in init
