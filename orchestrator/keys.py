"""The orchestrator's job-signing key: made once, kept in its data dir, used to seal every job sent.

The private key is a PEM file readable by its owner only (0600, in a 0700 folder) under
`$TOKENFARM_DATA_DIR/keys/`, never in the database: the dashboard's role reads the database, and
whoever holds this key can make every worker run anything. Its public half, beside it in
`jobs_ed25519.pub`, is what workers hold (TOKENFARM_JOBS_PUBLIC_KEY, or the join line).

Owns where the key lives, making it exactly once even when several commands start at the same
time, and the expiry a sent job gets. Sealing and verifying themselves are farm/jobsign.py's;
this module knows nothing of the broker beyond the settings a Celery app was built from.
"""

from __future__ import annotations

import os
import threading
import uuid
from datetime import datetime, timedelta
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from farm import jobsign
from farm.contract import utc_now
from farm.settings import Settings, load_settings

PRIVATE_NAME = "jobs_ed25519"
PUBLIC_NAME = "jobs_ed25519.pub"

_cache: dict[str, Ed25519PrivateKey] = {}
_lock = threading.Lock()


class SigningKeyError(Exception):
    """The key file exists but cannot be used; the message says what to do."""


def key_dir(data_dir: Path) -> Path:
    return Path(data_dir) / "keys"


def _write_new(path: Path, data: bytes, mode: int) -> bool:
    """Write data to path only if nothing is there, all at once: True if this call wrote it.

    Written whole under another name and linked into place, so a second process starting at the
    same moment either wins or reads a complete file, never half of one.
    """
    partial = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.link(partial, path)
        return True
    except FileExistsError:
        return False
    finally:
        partial.unlink(missing_ok=True)


def signing_key(data_dir: Path) -> Ed25519PrivateKey:
    """The orchestrator's private key, made on first use (`tokenfarm keys init`, `db upgrade`,
    `workers add`, or the first job sent) and read from its file after that."""
    cache_key = str(data_dir)
    known = _cache.get(cache_key)  # every job sent asks: no lock, no file system on this path
    if known is not None:
        return known
    with _lock:
        if cache_key in _cache:
            return _cache[cache_key]
        folder = key_dir(data_dir)
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = folder / PRIVATE_NAME
        if not path.exists():
            pem = Ed25519PrivateKey.generate().private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
            _write_new(path, pem, 0o600)
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (OSError, ValueError) as exc:
            raise SigningKeyError(f"cannot read the job-signing key {path} ({exc}): restore it from a backup, or move "
                            "it away and run `tokenfarm keys init` (every worker then needs the new public key)") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise SigningKeyError(f"{path} is not an Ed25519 key: move it away and run `tokenfarm keys init`")
        if path.stat().st_mode & 0o077:
            path.chmod(0o600)  # copied in with a loose mode: only its owner may read it
        public = folder / PUBLIC_NAME
        text = (jobsign.public_key_text(key.public_key()) + "\n").encode()
        if not public.exists() or public.read_bytes() != text:
            tmp = public.with_name(f".{PUBLIC_NAME}.{uuid.uuid4().hex}")
            tmp.write_bytes(text)
            os.replace(tmp, public)
        _cache[cache_key] = key
        return key


def public_key(data_dir: Path) -> Ed25519PublicKey:
    return signing_key(data_dir).public_key()


def public_key_text(data_dir: Path) -> str:
    return jobsign.public_key_text(public_key(data_dir))


def expires_at(settings: Settings, countdown_s: float = 0.0, sent_at: datetime | None = None) -> datetime:
    """When a job sent now stops being valid: after its countdown, the time it may wait in a
    queue, and the job time limit (a message redelivered after its worker died still runs)."""
    sent_at = sent_at or utc_now()
    return sent_at + timedelta(seconds=countdown_s + settings.job_queue_allowance_s + settings.job_timeout_s)


def app_settings(app) -> Settings:
    """The settings a Celery app was built from (farm/broker.py create_app keeps them on it)."""
    return getattr(app, "tokenfarm_settings", None) or load_settings()


def seal_job(app, job_json: dict, worker: str = "", countdown_s: float = 0.0) -> dict:
    """The seal for one job message sent through app (to `worker` alone, or to any worker)."""
    settings = app_settings(app)
    return jobsign.seal(job_json, signing_key(settings.data_dir), expires_at(settings, countdown_s), worker)
