"""The one settings object, read from TOKENFARM_* environment variables.

Both roles read it: the orchestrator uses every field, a worker only the broker, its own name,
token and folders, and the orchestrator's public key for jobs (it never reads `database_url`,
and a worker box need not set it).
"""

from __future__ import annotations

import ipaddress
import os
import socket
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def default_data_dir() -> Path:
    # XDG data dir, so a newcomer's embedded database and broker survive a reboot.
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "tokenfarm"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TOKENFARM_", extra="ignore")

    data_dir: Path = Field(default_factory=default_data_dir)
    # Empty means the embedded default: a SQLite file / kombu's filesystem transport under data_dir.
    database_url: str = ""
    broker_url: str = ""
    # The CA that signed the broker's TLS certificate (`tokenfarm broker certs`): with a rediss://
    # URL the broker's certificate and host name are checked against it, never skipped.
    broker_ca_file: Path | None = None
    # Each worker's Redis keys under its own prefix (farm.broker.worker_keyprefix), reached with its
    # own Redis user that may touch nothing else (orchestrator/brokerusers.py). Both roles set it.
    broker_confined: bool = False
    # Orchestrator only: host:port workers reach the broker by, for the URL `workers add` prints,
    # where it differs from broker_url's (a compose service name, a published port).
    broker_public_address: str = ""
    worker_name: str = Field(default_factory=socket.gethostname)
    # The worker's secret from `tokenfarm workers add NAME`; it signs every message the worker sends.
    worker_token: str = ""
    # Worker only. The orchestrator's public key for jobs (base64 of its 32 bytes, or PEM): a job
    # whose seal it does not verify is refused before any file is touched (farm/jobsign.py).
    # Empty: the key in data_dir/keys, where the orchestrator shares this box's data dir.
    jobs_public_key: str = ""
    # Orchestrator only. How long a sent job may wait in its queue before workers refuse it as
    # expired, on top of its countdown and job_timeout_s; a queued job refused so is sent again.
    job_queue_allowance_s: float = Field(default=86400.0, gt=0)
    heartbeat_s: float = Field(default=5.0, gt=0)
    # A worker silent this long is presumed dead and its running jobs go back to the queue.
    worker_dead_after_s: float = Field(default=30.0, gt=0)
    # Redis redelivers an unacknowledged job after this long (the backstop behind liveness).
    visibility_timeout_s: float = Field(default=3600.0, gt=0)
    # A job running longer than this is presumed hung (its worker may still send heartbeats).
    job_timeout_s: float = Field(default=3600.0, gt=0)
    # Attempts before a job that keeps killing workers is failed for good.
    max_attempts: int = Field(default=3, ge=1)
    # Orchestrator only. Canaries: copies of a sweep's jobs whose greedy output is known, at least
    # one per model when above 0. Cross-checks: copies re-run on a second worker of the same
    # hardware class, at least one per sweep when above 0, agreeing within crosscheck_tolerance
    # (relative tok/s difference). A sweep file's canary_fraction / crosscheck_fraction win.
    canary_fraction: float = Field(default=0.05, ge=0.0, le=1.0)
    crosscheck_fraction: float = Field(default=0.05, ge=0.0, le=1.0)
    crosscheck_tolerance: float = Field(default=0.25, gt=0.0)
    # Memory a worker offers jobs (0: all the box has); jobs are routed to workers by what they
    # offer, so an owner sharing the box can keep some for themselves.
    max_ram_bytes: int = Field(default=0, ge=0)
    max_vram_bytes: int = Field(default=0, ge=0)
    # Worker only. The torch engine's device: auto takes CUDA where torch sees it, else the CPU.
    torch_device: str = Field(default="auto", pattern=r"^(auto|cpu|cuda(:[0-9]+)?)$")
    # Where derived models (quantizations) and fetched catalogue models are cached.
    models_dir: Path | None = None
    # Bound on what this worker downloads from hubs (GB; 0: none): least recently used goes first.
    models_max_gb: float = Field(default=0.0, ge=0.0)

    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.data_dir / 'tokenfarm.sqlite3'}"

    @property
    def effective_broker_url(self) -> str:
        return self.broker_url or "filesystem://"

    @property
    def broker_is_embedded(self) -> bool:
        return self.effective_broker_url.startswith("filesystem://")

    @property
    def broker_dir(self) -> Path:
        return self.data_dir / "broker"

    @property
    def effective_models_dir(self) -> Path:
        return self.models_dir or (self.data_dir / "models")


LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}


def is_loopback(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def broker_url_problem(url: str) -> str | None:
    """Why a broker URL must not be used, or None. Plain redis:// sends the password and every
    job and result in clear text, so it is for this machine only; anything farther needs TLS."""
    parts = urlsplit(url)
    if parts.scheme != "redis":
        return None
    host = parts.hostname or "localhost"
    if is_loopback(host):
        return None
    return (f"plain-text broker URL to {host}: redis:// is allowed only on loopback; use "
            f"rediss://{host}:PORT with TOKENFARM_BROKER_CA_FILE set to the CA from `tokenfarm broker certs`")


def load_settings() -> Settings:
    return Settings()
