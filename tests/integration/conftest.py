"""Real services and real models: PostgreSQL and Redis on 127.0.0.1, SmolLM2 from PyPI, worker processes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests.conftest import REPO

MODELS_DIR = Path(os.environ.get("TOKENFARM_TEST_MODELS_DIR", REPO / ".tokenfarm" / "models"))
PG_ADMIN_URL = os.environ.get("TOKENFARM_TEST_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
REDIS_TEST_URL = os.environ.get("TOKENFARM_TEST_REDIS_URL", "redis://127.0.0.1:6379/14")
TOKENFARM = str(Path(sys.executable).parent / "tokenfarm")



@pytest.fixture(scope="session")
def smollm2() -> Path:
    from worker.models import fetch

    return fetch("smollm2-135m", MODELS_DIR)


@pytest.fixture(scope="session")
def mtp_models(smollm2, tmp_path_factory) -> dict[str, Path]:
    """A models folder of its own (heads beside its F32 must not reach other tests), with
    SmolLM2's F32, a head for it and the MTP build (`smollm2-135m-mtp`) resolved through the job
    road. The head is trained for about a minute (self-distilled on 40 requests, mtp_train.py):
    its proposals are accepted a fifth of the time or so, so both engines' acceptance is compared
    on more than zeros. Its output norm's weight is then spread away from 1 (x e^(0.5 N(0,1))),
    so feeding the NextN block its normalised output, as llama.cpp's recursion does, and feeding
    it the raw output draft differently past position 1 (test_torch_glm4moe.py tells them apart)."""
    import torch

    from worker.engines.torch.gguf_loader import GGUFVocab, load_model
    from worker.engines.torch.mtp import heads_path, save_heads
    from worker.engines.torch.mtp_train import TrainConfig, train_heads
    from worker.models import resolve

    root = tmp_path_factory.mktemp("mtp-models")
    (root / "catalogue").mkdir()
    for f in Path(smollm2).parent.glob(Path(smollm2).name + "*"):
        target = root / "catalogue" / f.name
        if f.name.endswith(".gguf"):
            target.symlink_to(f)
        else:
            shutil.copy(f, target)
    f32, _ = resolve("smollm2-135m", "F32", root)
    base = load_model(f32)
    vocab = GGUFVocab(f32)
    try:
        heads, _ = train_heads(base, vocab, TrainConfig(n_mtp=1, n_chat=24, n_code=16, n_cont=48, epochs=12,
                                                        n_head_vocab=0, lr=4e-3))
    finally:
        vocab.close()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        w = heads.heads[0].out_norm.weight
        w.mul_(torch.exp(0.5 * torch.randn(w.shape, generator=generator)))
    save_heads(heads, f32, {"base_sha256": ""})
    assert heads_path(f32).exists()
    mtp_f32, _ = resolve("smollm2-135m-mtp", "F32", root)
    return {"root": root, "f32": f32, "mtp": mtp_f32}


def xdist_index() -> int:
    """0 without xdist, N for xdist's worker gwN: what keeps parallel test workers apart."""
    name = os.environ.get("PYTEST_XDIST_WORKER", "")
    return int(name.removeprefix("gw")) if name.startswith("gw") else 0


def _db_url(name: str) -> str:
    return PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"


@contextmanager
def _database(template: str | None = None):
    from sqlalchemy import create_engine, text

    name = f"tokenfarm_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else "")))
    try:
        yield name
    finally:
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="session")
def pg_template():
    """A database migrated to head once per session: each test's copy is a file copy on the server,
    which costs milliseconds where an Alembic run costs seconds."""
    from orchestrator.db import upgrade

    with _database() as name:
        upgrade(_db_url(name))
        yield name


@pytest.fixture
def pg_url(pg_template):
    """A fresh PostgreSQL database at the schema's head, copied from the session's template."""
    with _database(template=pg_template) as name:
        yield _db_url(name)


@pytest.fixture
def pg_empty_url():
    """A fresh PostgreSQL database with no schema, for the tests of migrating one."""
    with _database() as name:
        yield _db_url(name)


def redis_test_url() -> str:
    """TOKENFARM_TEST_REDIS_URL names the first database; xdist worker gwN takes that number + N."""
    parts = urlsplit(REDIS_TEST_URL)
    base = int(parts.path.strip("/") or 0)
    return urlunsplit(parts._replace(path=f"/{base + xdist_index()}"))


@pytest.fixture
def redis_url():
    import redis

    url = redis_test_url()
    client = redis.Redis.from_url(url)
    client.flushdb()  # only this test worker's own database
    yield url
    client.flushdb()
    client.close()


def service_env(data_dir: Path, database_url: str = "", broker_url: str = "") -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENFARM_")}
    env.update(TOKENFARM_DATA_DIR=str(data_dir), TOKENFARM_MODELS_DIR=str(MODELS_DIR))
    # No extra check jobs unless a test asks for them (tests/integration/test_checks.py does),
    # so the other tests can count their jobs.
    env.update(TOKENFARM_CANARY_FRACTION="0", TOKENFARM_CROSSCHECK_FRACTION="0")
    if database_url:
        env["TOKENFARM_DATABASE_URL"] = database_url
    if broker_url:
        env["TOKENFARM_BROKER_URL"] = broker_url
    return env


def tokenfarm(env: dict[str, str], *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([TOKENFARM, *args], env=env, capture_output=True, text=True, timeout=timeout)


def at_head(env: dict[str, str]) -> dict[str, str]:
    """The env's database migrated: only `tokenfarm db upgrade` migrates, every other command checks."""
    proc = tokenfarm(env, "db", "upgrade", timeout=120)
    assert proc.returncode == 0, proc.stderr
    return env


def register_worker(env: dict[str, str], name: str) -> str:
    return enrol_worker(env, name)[0]


def enrol_worker(env: dict[str, str], name: str) -> tuple[str, str]:
    """(token, broker URL for the worker): on a confined farm (TOKENFARM_BROKER_CONFINED=1) its
    own Redis user's URL, which `workers add --quiet` prints after the token; else the env's."""
    proc = tokenfarm(env, "workers", "add", name, "--rotate", "--quiet", timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.split()
    return lines[0], lines[1] if len(lines) > 1 else env.get("TOKENFARM_BROKER_URL", "")


@contextmanager
def worker_process(env: dict[str, str], name: str, log_path: Path, entry: list[str] | None = None):
    """A real worker process with its own token; a worker never gets the database URL.
    entry: what to run instead of `python -m worker` (a test's dishonest worker)."""
    token, broker_url = enrol_worker(env, name)
    worker_env = {k: v for k, v in env.items() if k != "TOKENFARM_DATABASE_URL"}
    worker_env["TOKENFARM_WORKER_TOKEN"] = token
    if broker_url:
        worker_env["TOKENFARM_BROKER_URL"] = broker_url
    with log_path.open("ab") as log:
        proc = subprocess.Popen([sys.executable, *(entry or ["-m", "worker"]), "--name", name], env=worker_env,
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        stop_process(proc)


def stop_process(proc: subprocess.Popen, timeout_s: float = 30) -> None:
    """SIGTERM (a worker finishes its job, a server closes), then SIGKILL if it does not end in time."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def wait_until(predicate, timeout: float, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ConfinedRedis:
    """A redis-server of the test's own: TLS only, on loopback, users from an ACL file."""

    tls_port: int
    ca_file: Path
    admin_url: str  # the orchestrator's user: every key and command
    proc: subprocess.Popen | None
    argv: list[str]
    log_path: Path

    def worker_url(self, name: str, password: str) -> str:
        return f"rediss://w%3A{name}:{password}@127.0.0.1:{self.tls_port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(self.argv, stdout=self.log_path.open("ab"), stderr=subprocess.STDOUT)

        def ready() -> bool:
            if self.proc.poll() is not None:
                pytest.fail(f"redis-server with TLS did not start (built without TLS?): {self.log_path.read_text()[-2000:]}")
            try:
                return self.client().ping()
            except Exception:
                return False

        assert wait_until(ready, 20)

    def restart(self, down_s: float = 4.0, empty: bool = False) -> None:
        """Down for down_s, then up again with what it had: its append-only file and its ACL file
        (the workers' users, saved there by `workers add`). empty: every message forgotten (the
        append-only file removed), the users kept."""
        try:
            self.client().shutdown(nosave=empty)
        except Exception:  # redis-py reports the connection the shutdown closed
            pass
        self.proc.wait(timeout=20)
        if empty:
            data_dir = Path(self.argv[self.argv.index("--dir") + 1])
            shutil.rmtree(data_dir / "appendonlydir", ignore_errors=True)
        time.sleep(down_s)
        self.start()

    def client(self, url: str | None = None, **kw):
        import redis

        return redis.Redis.from_url(url or self.admin_url, ssl_ca_certs=str(self.ca_file), ssl_cert_reqs="required",
                                    ssl_check_hostname=True, **kw)


@pytest.fixture
def confined_redis(tmp_path):
    """`redis-server --port 0 --tls-port Q --aclfile ...` on 127.0.0.1, with certificates from
    `tokenfarm broker certs`' own code: the default user off, one admin user, no plain-text port."""
    from orchestrator.brokercerts import make_certs

    version = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout
    if "v=" not in version or int(version.split("v=")[1].split(".")[0]) < 7:
        pytest.skip(f"needs redis-server 7 or later (scripts checked against ACLs): {version.strip()}")
    root = tmp_path / "confined-redis"
    files = make_certs(root / "certs", ["127.0.0.1", "localhost"])
    admin_password = uuid.uuid4().hex
    acl = root / "users.acl"
    acl.write_text(f"user default off\nuser tf-admin on >{admin_password} ~* &* +@all\n")
    port = free_port()
    argv = ["redis-server", "--port", "0", "--bind", "127.0.0.1", "--tls-port", str(port),
            "--tls-cert-file", str(files.server_cert), "--tls-key-file", str(files.server_key),
            "--tls-ca-cert-file", str(files.ca_cert), "--tls-auth-clients", "no", "--aclfile", str(acl),
            "--save", "", "--appendonly", "yes", "--dir", str(root)]
    server = ConfinedRedis(port, files.ca_cert, f"rediss://tf-admin:{admin_password}@127.0.0.1:{port}/0", None,
                           argv, root / "redis.log")
    server.start()
    yield server
    stop_process(server.proc)
