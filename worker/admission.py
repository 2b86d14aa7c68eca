"""What a job must prove before this worker touches any file it names.

A job message is admitted only if its seal verifies under the orchestrator's public key, has
not expired, is addressed to this worker or to any (farm/jobsign.py), and was not run by this
worker before: the seen-set, keyed by job id and seal nonce, is kept in memory and appended to a
file in the worker's data dir, so a restarted worker still knows what it ran. Entries leave it
when their seal expires (an expired seal is refused anyway), and it is bounded in size.

Owns the public key's lookup, the seen-set and its file. Knows nothing of Celery, engines or
model files: worker/tasks.py calls `admit` first, and only a Job it returns goes further.
"""

from __future__ import annotations

import heapq
import json
import logging
import os
import re
import threading
from datetime import datetime, timezone
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import ValidationError

from farm import jobsign
from farm.contract import Job
from farm.jobsign import JobRefused
from farm.settings import Settings

log = logging.getLogger("tokenfarm.worker.admission")

# A worker runs one measurement at a time, seconds to hours each: even a day's seals of a
# simulated farm fit. Past it the seals expiring soonest are forgotten first.
MAX_SEEN = 100_000
# The orchestrator's key file where it shares this box's data dir (orchestrator/keys.py).
SHARED_PUBLIC_KEY = Path("keys") / "jobs_ed25519.pub"


class AdmissionError(Exception):
    """The worker cannot check jobs at all (no usable public key); it must not start."""


def jobs_public_key(settings: Settings) -> Ed25519PublicKey:
    """TOKENFARM_JOBS_PUBLIC_KEY, else the orchestrator's public key file in a shared data dir."""
    text = settings.jobs_public_key
    source = "TOKENFARM_JOBS_PUBLIC_KEY"
    shared = settings.data_dir / SHARED_PUBLIC_KEY
    if not text and shared.is_file():
        text, source = shared.read_text(), str(shared)
    if not text:
        raise AdmissionError("no jobs public key: this worker could not tell the orchestrator's jobs from forged ones. "
                             "Join with the line `tokenfarm workers add NAME` prints, or set TOKENFARM_JOBS_PUBLIC_KEY "
                             "to what `tokenfarm keys show` prints on the orchestrator")
    try:
        return jobsign.load_public_key(text)
    except ValueError as exc:
        raise AdmissionError(f"{source}: {exc}") from None


def seen_path(settings: Settings) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", settings.worker_name)[:120] or "worker"
    return settings.data_dir / "worker-state" / safe / "seen_jobs.jsonl"


class SeenJobs:
    """Seals this worker admitted, until they expire: (job id, nonce) -> expiry, epoch seconds."""

    def __init__(self, path: Path | None, max_entries: int = MAX_SEEN) -> None:
        self.path = path
        self.max_entries = max_entries
        self._expiry: dict[tuple[str, str], float] = {}
        self._n_lines = 0
        self._lock = threading.Lock()
        if path is not None:
            self._load()

    def __len__(self) -> int:
        return len(self._expiry)

    def __contains__(self, key: tuple[str, str]) -> bool:
        return key in self._expiry

    def _load(self) -> None:
        now = datetime.now(timezone.utc).timestamp()
        try:
            lines = self.path.read_text().splitlines()
        except FileNotFoundError:
            lines = []
        for line in lines:
            try:
                entry = json.loads(line)
                key, expiry = (str(entry["job_id"]), str(entry["nonce"])), float(entry["expires_at"])
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by a crash mid-write
            if expiry > now:
                self._expiry[key] = expiry
        self._trim()
        self._rewrite()

    def _trim(self) -> None:
        now = datetime.now(timezone.utc).timestamp()
        for key in [k for k, expiry in self._expiry.items() if expiry <= now]:
            del self._expiry[key]
        excess = len(self._expiry) - self.max_entries
        if excess > 0:
            for key in heapq.nsmallest(excess, self._expiry, key=self._expiry.get):
                del self._expiry[key]

    def _rewrite(self) -> None:
        """The file holds only live entries again, written whole and swapped in."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with tmp.open("w") as f:
            for (job_id, nonce), expiry in self._expiry.items():
                f.write(json.dumps({"job_id": job_id, "nonce": nonce, "expires_at": expiry}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self._n_lines = len(self._expiry)

    def add(self, key: tuple[str, str], expires_at: datetime) -> None:
        """Remember a seal, on disk before the job runs: a crash mid-job must not reopen it."""
        with self._lock:
            expiry = expires_at.timestamp()
            self._expiry[key] = expiry
            if self.path is None:
                if len(self._expiry) > self.max_entries:
                    self._trim()
                return
            if self._n_lines >= 2 * self.max_entries or self._n_lines > 2 * len(self._expiry) + 1000:
                self._trim()
                self._rewrite()
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                f.write(json.dumps({"job_id": key[0], "nonce": key[1], "expires_at": expiry}) + "\n")
                f.flush()
                os.fsync(f.fileno())
            self._n_lines += 1
            if len(self._expiry) > self.max_entries:
                self._trim()


class Admission:
    """The gate in front of every job a worker process takes."""

    def __init__(self, key: Ed25519PublicKey, worker: str, seen: SeenJobs) -> None:
        self.key, self.worker, self.seen = key, worker, seen

    @classmethod
    def for_settings(cls, settings: Settings) -> "Admission":
        return cls(jobs_public_key(settings), settings.worker_name, SeenJobs(seen_path(settings)))

    def admit(self, job_json: object, job_seal: object, now: datetime | None = None) -> Job:
        """The Job to run, or JobRefused: unsigned, another key's, tampered, expired,
        misaddressed, replayed, or signed but not a valid Job. Reads no file a job names."""
        checked = jobsign.verify(job_json, job_seal, self.key, self.worker, now)
        key = (checked.job_id, checked.nonce)
        if key in self.seen:
            raise JobRefused("replayed", f"job {checked.job_id} with this seal was already taken by this worker: "
                                         "a copy of a message it ran is not run again")
        try:
            job = Job.model_validate(job_json)
        except ValidationError as exc:
            raise JobRefused("malformed", f"the signed job is not a valid Job: {exc.errors()[0]['msg']}") from None
        self.seen.add(key, checked.expires_at)
        return job


def job_id_of(job_json: object) -> str:
    """The id a refused message claims, for the report (unverified: it may be anything)."""
    job_id = job_json.get("job_id") if isinstance(job_json, dict) else None
    return job_id[:36] if isinstance(job_id, str) else ""
