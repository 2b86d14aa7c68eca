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


def test_the_dashboard_reads_with_a_read_only_role():
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    assert "tokenfarm_ro:" in services["dashboard"]["environment"]["TOKENFARM_DATABASE_URL"]
    init = (REPO / "deploy" / "postgres" / "10-dashboard-readonly.sh").read_text()
    assert "default_transaction_read_only = on" in init and "GRANT SELECT" in init
    assert "INSERT" not in init and "ALL PRIVILEGES" not in init


def _flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_redis_speaks_tls_only_and_its_users_come_from_an_acl_file_with_the_default_user_off():
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    redis = services["redis"]["command"]
    assert _flag(redis, "--port") == "0"  # no plain-text port, not even inside the compose network
    tls_port = _flag(redis, "--tls-port")
    assert [p.rsplit(":", 1)[1] for p in services["redis"]["ports"]] == [tls_port]
    assert {"--tls-cert-file", "--tls-key-file", "--aclfile"} <= set(redis) and "--requirepass" not in redis
    init = services["broker-init"]["command"][0]
    assert "tokenfarm broker certs /certs" in init and "--host redis" in init
    assert "user default off" in init and "user tf-admin on" in init
    assert services["redis"]["depends_on"]["broker-init"]["condition"] == "service_completed_successfully"


def test_orchestrator_services_use_their_own_admin_user_over_checked_tls():
    from farm.settings import broker_url_problem

    services = yaml.safe_load(COMPOSE.read_text())["services"]
    for name in ("collector", "worker-enrol"):
        env = services[name]["environment"]
        assert env["TOKENFARM_BROKER_URL"].startswith("rediss://tf-admin:"), name
        assert env["TOKENFARM_BROKER_CA_FILE"] == "/ca/ca.pem" and "broker-ca:/ca:ro" in services[name]["volumes"]
        assert env["TOKENFARM_BROKER_CONFINED"] == "1"
    # Every broker URL in the file would pass the settings' own check.
    text = COMPOSE.read_text()
    for line in text.splitlines():
        if "TOKENFARM_BROKER_URL:" in line:
            assert broker_url_problem(line.split(":", 1)[1].strip().replace("${REDIS_ADMIN_PASSWORD}", "pw")) is None


def test_the_worker_starts_from_its_join_folder_with_no_admin_secret_and_no_server_key():
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    worker, enrol = services["worker"], services["worker-enrol"]
    assert enrol["command"][:2] == ["workers", "add"] and "--env-file" in enrol["command"]
    join = _flag(enrol["command"], "--env-file")
    assert ". " + join in " ".join(worker["command"]) and "tokenfarm worker start" in " ".join(worker["command"])
    assert worker["depends_on"]["worker-enrol"]["condition"] == "service_completed_successfully"
    # The join folder read-only; neither the CA's and server's keys nor the admin password.
    assert "worker-join:/join:ro" in worker["volumes"]
    assert not any(v.startswith(("broker-certs", "broker-ca", "redis-acl")) for v in worker["volumes"])
    assert "REDIS" not in yaml.safe_dump(worker) and "DATABASE" not in yaml.safe_dump(worker)


def test_the_compose_worker_builds_the_cuda_engine_the_way_the_gpu_check_does():
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    args = services["worker"]["build"]["args"]
    assert "-DGGML_CUDA=ON" in args["LLAMA_CMAKE_ARGS"]
    assert "90" in args["CUDA_ARCHITECTURES"].split("}")[0].split(":-")[-1].split(";")  # the H200 it was proven on
    assert "torch" in args["EXTRAS"].split(",")
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "-DCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCHITECTURES}" in dockerfile and '".[${EXTRAS}]"' in dockerfile
    check = (REPO / "tests" / "gpu" / "device_check.sh").read_text()
    assert "-DGGML_CUDA=ON" in check and "-DCMAKE_CUDA_ARCHITECTURES=90" in check
