"""The orchestrator's side of a confined broker: each worker's Redis user, publishing a job into a
worker's key prefix, and moving what workers send into the one results queue the collector reads.

A confined worker (farm/broker.py) works under `tf:w:NAME:` and its Redis user `w:NAME` may touch
only keys there, with only the commands kombu's Redis transport sends for a consumer with late
acks that publishes its results (WORKER_COMMANDS); it has no pub/sub channel at all. The
orchestrator connects as an admin user that sees every key. Knows Redis and kombu's key layout,
not the database: callers hand it the worker names they know.
"""

from __future__ import annotations

import secrets
from collections import OrderedDict
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator
from urllib.parse import quote, urlsplit, urlunsplit

from celery import Celery

from farm.broker import RESULTS_QUEUE, RUN_JOB_TASK, redis_user, worker_keyprefix, worker_queue
from farm.contract import Job

# What kombu 5.7's Redis transport and redis-py send for a worker (read from kombu/transport/redis.py
# and checked against ACL LOG on a server running one, tests/integration/test_confined_broker.py):
#   consuming: BRPOP, RPOP; publishing its results: LPUSH; queue sizes: LLEN
#   queue bindings (declare, restore): SADD, SREM, SMEMBERS; purge, delete: DEL; passive declare: EXISTS
#   late acks: ZADD/ZREM of the unacked index, HSET/HGET/HDEL of the unacked hash, and on restore
#     ZRANGE plus a WATCH/MULTI/EXEC transaction that pushes back with LPUSH/RPUSH
#   the restore mutex (redis-py's Lock): SET NX PX, released by EVALSHA of a script (GET, DEL) it loads once
#   connection upkeep: PING
# Key patterns confine every one of these, EVALSHA included: Redis 7 checks the keys a script
# declares and, inside it, every key it touches against the caller's user.
WORKER_COMMANDS = (
    "brpop", "rpop", "lpush", "rpush", "llen",
    "sadd", "srem", "smembers", "del", "exists",
    "zadd", "zrem", "zrange", "hset", "hget", "hdel", "hlen",
    "watch", "unwatch", "multi", "exec", "discard",
    "set", "get", "evalsha", "script|load",
    "ping",
)
PASSWORD_BYTES = 32
# The most messages moved from one worker's results list per relay: one worker sending a flood
# cannot hold back the others' results.
RELAY_BATCH = 200


def worker_acl_rules(name: str, password: str) -> list[str]:
    """ACL SETUSER rules for a worker's user: `reset` first, so a rotation leaves nothing of the
    old user (its password, a wider rule); no channel, no command beyond WORKER_COMMANDS."""
    return ["reset", "on", f">{password}", f"~{worker_keyprefix(name)}*", "resetchannels", "-@all",
            *(f"+{c}" for c in WORKER_COMMANDS)]


def _client(app: Celery):
    """A Redis client as the orchestrator's own (admin) user, over the app's connection settings
    (TLS and its CA included): the same one kombu uses for the results queue."""
    conn = app.connection_for_write()
    return conn, conn.default_channel.client


def _save_acl(client) -> bool:
    """Write the users to the server's ACL file so a restart keeps them; False where the server
    keeps users in memory only (no aclfile, as a test's loopback Redis may run)."""
    from redis.exceptions import ResponseError

    try:
        client.execute_command("ACL", "SAVE")
        return True
    except ResponseError as exc:
        if "not configured to use an ACL file" in str(exc):
            return False
        raise


def create_user(app: Celery, name: str) -> str:
    """Create (or reset) worker NAME's Redis user with a new random password, returned once."""
    password = secrets.token_urlsafe(PASSWORD_BYTES)
    conn, client = _client(app)
    with conn:
        client.execute_command("ACL", "SETUSER", redis_user(name), *worker_acl_rules(name, password))
        _save_acl(client)
    return password


def delete_user(app: Celery, name: str) -> bool:
    """Remove worker NAME's Redis user; Redis closes every connection it has open at once.
    False when there was no such user. Its keys stay: what waits in its queue is the lifecycle's
    to send elsewhere."""
    conn, client = _client(app)
    with conn:
        n_deleted = client.execute_command("ACL", "DELUSER", redis_user(name))
        _save_acl(client)
    return bool(n_deleted)


def worker_broker_url(broker_url: str, name: str, password: str, public_address: str = "") -> str:
    """The URL a worker joins with: the broker's scheme and database, its own user and password,
    and public_address (host:port) where workers reach Redis by another name than the orchestrator."""
    parts = urlsplit(broker_url)
    address = public_address or f"{parts.hostname or '127.0.0.1'}{f':{parts.port}' if parts.port else ''}"
    netloc = f"{quote(redis_user(name), safe='')}:{quote(password, safe='')}@{address}"
    return urlunsplit((parts.scheme, netloc, parts.path or "/0", "", ""))


# Open connections by (app, key prefix), least recently used first. A TLS handshake costs some
# 20 ms here, and a connection per job sent made dispatch 44 ms a job; kept open, a send costs
# what a publish costs. Bounded, so a farm of thousands of workers holds at most this many.
MAX_OPEN_PREFIXES = 256
_open: OrderedDict[tuple[int, str], tuple[Celery, object]] = OrderedDict()


@contextmanager
def prefixed_connection(app: Celery, prefix: str) -> Iterator:
    """A kombu connection whose keys are under `prefix`, as a confined worker's transport sees
    them; kept open for the next call unless something failed while it was in use."""
    key = (id(app), prefix)
    _, conn = _open.pop(key, (app, None))
    if conn is None:
        options = {**app.conf.broker_transport_options, "global_keyprefix": prefix}
        conn = app.connection_for_write(transport_options=options)
    try:
        yield conn
    except BaseException:
        conn.release()  # it may be broken (a broker outage): the next call opens a new one
        raise
    _open[key] = (app, conn)  # the app is held so its id is not reused while the entry lives
    while len(_open) > MAX_OPEN_PREFIXES:
        _, (_, oldest) = _open.popitem(last=False)
        oldest.release()


@contextmanager
def worker_producer(app: Celery, worker: str) -> Iterator:
    """A producer for jobs meant for `worker`: inside its key prefix on a confined broker (the only
    place its Redis user can read), the app's own elsewhere. The caller publishes to
    farm.broker.worker_queue(worker) through it."""
    if not app.conf.get("tokenfarm_confined"):
        with app.producer_or_acquire() as producer:
            yield producer
        return
    with prefixed_connection(app, worker_keyprefix(worker)) as conn:
        yield app.amqp.Producer(conn)


def send_to_worker(app: Celery, jobs: Iterable[Job], worker: str, countdown_s: float = 0.0) -> None:
    """Jobs into worker's own queue (inside its key prefix on a confined broker)."""
    with worker_producer(app, worker) as producer:
        for job in jobs:
            app.send_task(RUN_JOB_TASK, args=[job.model_dump(mode="json")], task_id=job.job_id,
                          queue=worker_queue(worker), producer=producer, countdown=countdown_s or None,
                          argsrepr=f"[job {job.job_id}: {job.model} {job.quant} {job.test}]")


def relay_results(client, names: Iterable[str], batch: int = RELAY_BATCH) -> int:
    """Move what each named worker sent (its prefix's results list) onto the results queue the
    collector consumes, oldest first, up to `batch` per worker; returns how many moved.

    LMOVE is atomic: a message is in one list or the other, never lost or doubled by a crash
    between. kombu pushes on the left and pops on the right, so moving right to left keeps order.
    The message is moved as it came: the collector still checks its signature, which names the
    worker, so a worker cannot send as another through its own list.
    """
    sources = [worker_keyprefix(n) + RESULTS_QUEUE for n in names]
    if not sources:
        return 0
    with client.pipeline(transaction=False) as pipe:
        for key in sources:
            pipe.llen(key)
        lengths = pipe.execute()
    n_moved = 0
    with client.pipeline(transaction=False) as pipe:
        for key, n in zip(sources, lengths):
            for _ in range(min(int(n), batch)):
                pipe.lmove(key, RESULTS_QUEUE, "RIGHT", "LEFT")
        n_moved = sum(1 for moved in pipe.execute() if moved is not None)
    return n_moved


class ResultsRelay:
    """relay_results for the registered workers, whose names are read again every refresh_s."""

    def __init__(self, names: Callable[[], list[str]], refresh_s: float = 5.0) -> None:
        self._read_names, self.refresh_s = names, refresh_s
        self._names: list[str] = []
        self._next_read = 0.0
        self.n_moved = 0

    def __call__(self, client) -> int:
        import time

        if time.monotonic() >= self._next_read:
            self._names = [n for n in self._read_names() if _confinable(n)]
            self._next_read = time.monotonic() + self.refresh_s
        n = relay_results(client, self._names)
        self.n_moved += n
        return n


def _confinable(name: str) -> bool:
    from farm.broker import CONFINED_NAME

    return bool(CONFINED_NAME.fullmatch(name))


def registered_names(engine) -> Callable[[], list[str]]:
    """The names of the registered workers, read from the database (the caller's engine)."""
    def read() -> list[str]:
        from sqlalchemy import select

        from orchestrator.db import WorkerRow, session_scope

        with session_scope(engine) as session:
            return list(session.scalars(select(WorkerRow.name)))
    return read


def results_relay(settings, engine) -> ResultsRelay | None:
    """The collector's relay on a confined broker (settings.broker_confined); None elsewhere."""
    if not settings.broker_confined or settings.broker_is_embedded:
        return None
    return ResultsRelay(registered_names(engine))
