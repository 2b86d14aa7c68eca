"""Jobs sealed by the orchestrator, so a worker runs only what the orchestrator sent, and in time.

Every job message carries, beside the Job JSON, a seal: when it expires, a random nonce, the
worker it is addressed to ("" for any worker serving its queue), the id of the key that made
it, and an Ed25519 signature over all of that together with the Job's canonical JSON
(farm/signing.py `canonical`). The orchestrator holds the private key (orchestrator/keys.py
keeps it in its data dir); a worker holds only the public key and calls `verify` before it
touches any file the job names.

Knows no broker, database or file layout. Remembering which seals a worker already ran (the
replay check) is the worker's (worker/admission.py): a seal is valid for any worker it is
addressed to until it expires, so only the receiver can tell a second delivery.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timezone

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from farm.signing import canonical

SEAL_VERSION = 1
# Signed before the content, so a signature made for anything else this key might ever sign
# cannot pass for a job seal.
_DOMAIN = b"tokenfarm job seal v1\n"
NONCE_BYTES = 16


class JobRefused(Exception):
    """A job a worker must not run. `code` is one word for counting (unsigned, other_key,
    tampered, expired, replayed, misaddressed, malformed); the message says what and why."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code

    @property
    def reason(self) -> str:
        return f"{self.code}: {self}"


@dataclass(frozen=True)
class Seal:
    """A seal that verified: what the worker keeps to recognise it again."""

    job_id: str
    nonce: str
    expires_at: datetime
    worker: str


def raw_public_bytes(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_key_text(key: Ed25519PublicKey) -> str:
    """The public key as workers are given it (TOKENFARM_JOBS_PUBLIC_KEY): base64 of its 32 bytes."""
    return base64.b64encode(raw_public_bytes(key)).decode()


def key_id(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """A short fingerprint of a key's public half, named in refusals so an operator sees which key
    a job was signed with. Remembered per key object: every seal and every check needs it."""
    known = _key_ids.get(id(key))
    if known is not None and known[0] is key:
        return known[1]
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    found = hashlib.sha256(raw_public_bytes(public)).hexdigest()[:16]
    _key_ids[id(key)] = (key, found)  # the key is kept with its id, so the id is never reused
    return found


_key_ids: dict[int, tuple[object, str]] = {}


def load_public_key(text: str) -> Ed25519PublicKey:
    """An Ed25519 public key from base64 of its 32 raw bytes or from PEM; ValueError naming the fix."""
    text = text.strip()
    fix = "set TOKENFARM_JOBS_PUBLIC_KEY to what `tokenfarm keys show` prints on the orchestrator"
    if text.startswith("-----BEGIN"):
        try:
            key = serialization.load_pem_public_key(text.encode())
        except ValueError as exc:
            raise ValueError(f"the jobs public key is not a readable PEM key ({exc}): {fix}") from None
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError(f"the jobs public key is a {type(key).__name__}, not Ed25519: {fix}")
        return key
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"the jobs public key is neither base64 nor PEM: {fix}") from None
    if len(raw) != 32:
        raise ValueError(f"the jobs public key is {len(raw)} bytes, an Ed25519 key is 32: {fix}")
    return Ed25519PublicKey.from_public_bytes(raw)


def _signed_bytes(job_json: dict, expires_at: str, nonce: str, worker: str) -> bytes:
    return _DOMAIN + canonical({"v": SEAL_VERSION, "job": job_json, "expires_at": expires_at,
                                "nonce": nonce, "worker": worker})


def seal(job_json: dict, key: Ed25519PrivateKey, expires_at: datetime, worker: str = "",
         nonce: str | None = None) -> dict:
    """The seal to send beside job_json (the Job as JSON, exactly as it goes on the wire)."""
    expires = expires_at.astimezone(timezone.utc).isoformat(timespec="milliseconds")
    nonce = nonce or secrets.token_hex(NONCE_BYTES)
    signature = key.sign(_signed_bytes(job_json, expires, nonce, worker))
    return {"v": SEAL_VERSION, "expires_at": expires, "nonce": nonce, "worker": worker,
            "key_id": key_id(key), "signature": base64.b64encode(signature).decode()}


def verify(job_json: object, job_seal: object, key: Ed25519PublicKey, worker: str,
           now: datetime | None = None) -> Seal:
    """The seal of a job this worker may run, or JobRefused saying why not.

    Checks, in order: a seal is there and well formed, it names this worker's key, its
    signature covers exactly this job and seal, it has not expired, and it is addressed to this
    worker or to any. Pure: nothing here reads a file or the job's contents beyond its bytes.
    """
    if not isinstance(job_seal, dict) or not job_seal:
        raise JobRefused("unsigned", "the job carries no seal: the orchestrator signs every job it sends")
    fields = {name: job_seal.get(name) for name in ("expires_at", "nonce", "worker", "key_id", "signature")}
    if job_seal.get("v") != SEAL_VERSION or not all(isinstance(v, str) for v in fields.values()):
        raise JobRefused("unsigned", f"the job's seal is not a version {SEAL_VERSION} seal of strings "
                                     "(expires_at, nonce, worker, key_id, signature)")
    if not isinstance(job_json, dict):
        raise JobRefused("malformed", "the job is not a JSON object")
    ours = key_id(key)
    if fields["key_id"] != ours:
        raise JobRefused("other_key", f"the job is signed with key {fields['key_id'][:16]!r}, not this farm's "
                                      f"{ours!r}: it did not come from this worker's orchestrator")
    try:
        signature = base64.b64decode(fields["signature"], validate=True)
        key.verify(signature, _signed_bytes(job_json, fields["expires_at"], fields["nonce"], fields["worker"]))
    except (binascii.Error, ValueError, InvalidSignature):
        raise JobRefused("tampered", "the job's signature does not match it: the job or its seal was "
                                     "changed after the orchestrator signed it") from None
    try:
        expires_at = datetime.fromisoformat(fields["expires_at"])
    except ValueError:
        raise JobRefused("malformed", f"the seal's expires_at {fields['expires_at'][:40]!r} is not a time") from None
    if expires_at.tzinfo is None:
        raise JobRefused("malformed", "the seal's expires_at has no time zone")
    now = now or datetime.now(timezone.utc)
    if now >= expires_at:
        raise JobRefused("expired", f"the job expired at {fields['expires_at']} ({(now - expires_at).total_seconds():.0f} s "
                                    "ago); the orchestrator sends a fresh copy of a job still queued")
    if fields["worker"] and fields["worker"] != worker:
        raise JobRefused("misaddressed", f"the job is addressed to worker {fields['worker'][:200]!r}, not {worker!r}")
    job_id = job_json.get("job_id")
    if not isinstance(job_id, str) or not job_id:
        raise JobRefused("malformed", "the signed job has no job_id")
    return Seal(job_id=job_id, nonce=fields["nonce"], expires_at=expires_at, worker=fields["worker"])
