"""The worker registry: who may join, with which token, and what the farm knows of each.

Owns issuing and revoking tokens, the join code a new worker starts from, flagging and trusting, and the per-worker view `tokenfarm workers` prints. Verifying
messages is the collector's job; this module only manages the rows it checks against.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from farm.join import JoinCode
from farm.settings import Settings
from farm.signing import new_token
from orchestrator.db import REFUSED_JOB, RejectionRow, WorkerRow


class RegistryError(Exception):
    pass


def add_worker(session: Session, name: str, rotate: bool = False) -> str:
    """Register a worker and return its token (shown once: the database keeps it for verifying)."""
    if not name or len(name) > 200 or any(c.isspace() for c in name):
        raise RegistryError(f"invalid worker name {name!r}: use 1-200 characters without spaces")
    row = session.get(WorkerRow, name)
    if row is not None and not rotate:
        raise RegistryError(f"worker {name!r} exists: pass --rotate to issue a new token (the old one stops working)")
    token = new_token()
    if row is None:
        session.add(WorkerRow(name=name, token=token, n_done=0, n_failed=0, n_rejected=0, flagged=False))
    else:
        row.token = token
    return token


def revoke_worker(session: Session, name: str) -> None:
    """Delete a worker's token: everything it sends afterwards is refused (the collector treats a
    worker without a token as revoked). Its row and history stay; `workers add NAME --rotate`
    lets it join again with a new token."""
    row = session.get(WorkerRow, name)
    if row is None:
        raise RegistryError(f"no worker named {name!r}: list them with `tokenfarm workers`")
    row.token = ""
    # Issue 18 part 2: removing the worker's own Redis user (and closing its connection) goes here.


def worker_broker_url(settings: Settings, name: str, address: str = "") -> str:
    """The broker URL a worker joins with: `address` where the orchestrator's own URL (often a
    loopback one) is not what the worker's box can reach.

    Issue 18 part 2: the worker's own Redis user and password belong in the join code
    (farm/join.py JoinCode.broker_username / broker_password); until then every worker shares
    the URL's credentials."""
    return address or settings.effective_broker_url


def join_code(settings: Settings, name: str, token: str, broker_address: str = "", own_broker_url: str = "") -> str:
    """The code `tokenfarm worker join` takes: broker address (on a confined farm the worker's own
    Redis user, `own_broker_url`), the worker's token, the jobs public key, and the broker's CA."""
    from orchestrator.keys import public_key_text

    ca_pem = settings.broker_ca_file.read_text() if settings.broker_ca_file is not None else ""
    return JoinCode(name=name, broker_url=own_broker_url or worker_broker_url(settings, name, broker_address),
                    worker_token=token, jobs_public_key=public_key_text(settings.data_dir),
                    confined=bool(own_broker_url), ca_pem=ca_pem).encode()


def set_flag(session: Session, name: str, flagged: bool, reason: str = "") -> None:
    row = session.get(WorkerRow, name)
    if row is None:
        raise RegistryError(f"no worker named {name!r}: list them with `tokenfarm workers`")
    row.flagged, row.flag_reason = flagged, (reason or None) if flagged else None


def set_trust(session: Session, name: str, trusted: bool) -> None:
    """A trusted worker's results become canary references for its hardware class."""
    row = session.get(WorkerRow, name)
    if row is None:
        raise RegistryError(f"no worker named {name!r}: list them with `tokenfarm workers`")
    row.trusted = trusted


@dataclass
class WorkerView:
    name: str
    last_seen: datetime | None
    n_done: int
    n_failed: int
    n_rejected: int
    flagged: bool
    flag_reason: str
    last_rejection: str
    gpu: str
    cpu: str
    engines: list[str]
    trusted: bool = False
    n_canary_passed: int = 0
    n_canary_failed: int = 0
    n_crosscheck_agreed: int = 0
    n_crosscheck_disagreed: int = 0
    # Job messages it refused to run (unsigned, forged, expired, replayed): not its fault, a sign
    # that someone pushes jobs into the farm's queues.
    n_jobs_refused: int = 0
    revoked: bool = False


def list_workers(session: Session) -> list[WorkerView]:
    refusals = RejectionRow.reason.startswith(REFUSED_JOB)
    n_refused = dict(session.execute(select(RejectionRow.worker, func.count()).where(refusals)
                                     .group_by(RejectionRow.worker)).all())
    views = []
    for row in session.scalars(select(WorkerRow).order_by(WorkerRow.name)):
        last = session.scalars(select(RejectionRow.reason).where(RejectionRow.worker == row.name, ~refusals)
                               .order_by(RejectionRow.id.desc()).limit(1)).first()
        caps = row.capabilities or {}
        hw = caps.get("hardware") or {}
        views.append(WorkerView(row.name, row.last_seen, row.n_done, row.n_failed, row.n_rejected, row.flagged,
                                row.flag_reason or "", last or "", hw.get("gpu", ""), hw.get("cpu", ""),
                                caps.get("engines", []), row.trusted, row.n_canary_passed, row.n_canary_failed,
                                row.n_crosscheck_agreed, row.n_crosscheck_disagreed,
                                n_refused.get(row.name, 0), not row.token))
    return views


def flagged_names(session: Session) -> set[str]:
    return set(session.scalars(select(WorkerRow.name).where(WorkerRow.flagged.is_(True))))
