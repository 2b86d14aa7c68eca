"""What the orchestrator alone reads and repairs on the broker: results a dead collector held,
the job messages Redis holds (waiting or taken), and putting taken messages back or dropping them.

Workers never run this: it reads every queue, which a worker's own broker user may not do. It
knows the broker's layout (kombu's Redis keys), not the database.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Iterator

from celery import Celery

from farm.broker import RESULTS_QUEUE, RUN_JOB_TASK, results_queue


def restore_stale_results(conn, older_than_s: float) -> int:
    """Put back on the results queue what a collector took and never acknowledged, older than
    older_than_s: it died between taking a batch and committing it. Returns how many.

    kombu restores unacknowledged messages only after the visibility timeout (an hour, for the
    jobs' sake) and only for all queues at once; results are handled within a second, so a
    result held this long has no live holder. Redis only: the embedded broker has no such state.
    """
    channel = conn.default_channel
    qos = channel.qos
    if not hasattr(qos, "unacked_index_key"):
        return 0
    client = channel._create_client()
    n_restored = 0
    for tag in client.zrangebyscore(qos.unacked_index_key, 0, time.time() - older_than_s):
        raw = client.hget(qos.unacked_key, tag)
        if raw is None:
            continue
        _message, _exchange, routing_key = json.loads(raw)
        if routing_key in (RESULTS_QUEUE, results_queue.routing_key):
            qos.restore_by_tag(tag, client)
            n_restored += 1
    return n_restored


def n_results_waiting(app: Celery) -> int | None:
    """How many messages wait on the results queue for a collector; None where the broker cannot
    say. Counts without taking any: Redis LLEN of the queue's lists, or the embedded broker's
    message files, which kombu counts the same way it finds them."""
    try:
        with app.connection_for_read() as conn:
            return int(conn.default_channel._size(RESULTS_QUEUE))
    except Exception:  # a count for a warning: a broker that cannot give one leaves it out
        return None


@dataclass(frozen=True)
class HeldJob:
    """A job's message as the broker holds it: waiting in a queue, or taken by a consumer and
    not yet acknowledged (`taken_at` set)."""

    queue: str
    taken_at: float | None = None  # unix time a consumer took it
    eta: float | None = None  # unix time before which it must not run (a retry sent with a countdown)
    tag: str = ""  # the delivery tag of a taken message, to put it back


def _held_job(message: object, queue: str, taken_at: float | None = None, tag: str = "") -> tuple[str, HeldJob] | None:
    """(job id, HeldJob) of a kombu message that carries a job; None for anything else."""
    headers = message.get("headers") if isinstance(message, dict) else None
    if not isinstance(headers, dict) or headers.get("task") != RUN_JOB_TASK or not headers.get("id"):
        return None
    eta = headers.get("eta")
    try:
        eta_unix = datetime.fromisoformat(eta).timestamp() if eta else None
    except (TypeError, ValueError):
        eta_unix = None
    return str(headers["id"]), HeldJob(queue, taken_at, eta_unix, tag)


@dataclass(frozen=True)
class BrokerSnapshot:
    """The job messages a broker holds, each copy, by job id; and how many results were waiting
    for a collector just after they were read (while any wait, the database lags the broker)."""

    jobs: dict[str, list[HeldJob]]
    n_results_waiting: int


def broker_snapshot(app: Celery) -> BrokerSnapshot | None:
    """What the broker holds now; None where it cannot say (the embedded broker keeps no record
    of what a consumer took).

    The queues are read before the taken set: kombu moves a message from a queue to the taken
    set, so in that order a message in motion is seen at least once. It can still be missed
    moving back (kombu's own restore); callers confirm an absence with a second look. The results
    queue is counted last: a worker sends "started" before it acknowledges its job, so a job gone
    from both sets was announced in a message now waiting, taken by a collector, or stored.
    Reads every waiting message whole (Redis has no cheaper way to list a queue's ids), about
    2.6 kB a job: call it every few seconds, not in a loop.
    """
    if not str(app.conf.broker_url).startswith(("redis://", "rediss://")):
        return None
    held: dict[str, list[HeldJob]] = {}
    results_keys = []
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        client = channel.client
        # The shared queues, then each confined worker's keys under its prefix (farm/broker.py):
        # the admin user reads them all.
        lists = [("", key) for key in client.scan_iter(match="tokenfarm.*", _type="list")]
        lists += [(_prefix_of(key), key) for key in client.scan_iter(match=f"{CONFINED_PREFIX}*", _type="list")]
        for prefix, key in lists:
            name = (key.decode() if isinstance(key, bytes) else key)[len(prefix):]
            queue = name.split(channel.sep)[0]  # kombu's priority levels are lists named queue + sep + level
            if queue == RESULTS_QUEUE:
                results_keys.append(key)
                continue
            for start in range(0, client.llen(key), 1000):
                for payload in client.lrange(key, start, start + 999):
                    try:
                        found = _held_job(json.loads(payload), queue)
                    except ValueError:
                        continue
                    if found:
                        held.setdefault(found[0], []).append(found[1])
        prefixes = [""] + sorted({_prefix_of(key) for key in client.scan_iter(
            match=f"{CONFINED_PREFIX}*:{channel.unacked_key}", _type="hash")})
        for prefix in prefixes:
            taken_at = {(t.decode() if isinstance(t, bytes) else t): score for t, score in
                        client.zrange(prefix + channel.unacked_index_key, 0, -1, withscores=True)}
            for tag, raw in client.hgetall(prefix + channel.unacked_key).items():
                tag = tag.decode() if isinstance(tag, bytes) else tag
                try:
                    message, _exchange, routing_key = json.loads(raw)
                except (ValueError, TypeError):
                    continue
                if found := _held_job(message, str(routing_key), taken_at.get(tag, 0.0), prefix + tag):
                    held.setdefault(found[0], []).append(found[1])
        n_results = sum(client.llen(key) for key in results_keys)
    return BrokerSnapshot(held, n_results)


# Where confined workers' keys are (farm.broker.worker_keyprefix); a name holds no ':'.
CONFINED_PREFIX = "tf:w:"


def _prefix_of(key) -> str:
    """The confined worker's prefix a key is under: tf:w:NAME: of tf:w:NAME:rest."""
    name = key.decode() if isinstance(key, bytes) else key
    return ":".join(name.split(":", 3)[:3]) + ":"


def _split_tag(tag: str) -> tuple[str, str]:
    """(key prefix, kombu delivery tag) of a HeldJob tag: kombu's tags are uuids, without ':'."""
    prefix, _, bare = tag.rpartition(":")
    return (prefix + ":" if prefix else ""), bare


def put_back(app: Celery, tags: list[str]) -> None:
    """Return taken, unacknowledged messages to their queues (kombu's own restore, by tag), each
    through a channel under the key prefix it was taken in."""
    from orchestrator.brokerusers import prefixed_connection

    by_prefix: dict[str, list[str]] = {}
    for tag in tags:
        prefix, bare = _split_tag(tag)
        by_prefix.setdefault(prefix, []).append(bare)
    for prefix, bare_tags in by_prefix.items():
        with prefixed_connection(app, prefix) as conn:
            channel = conn.default_channel
            for tag in bare_tags:
                channel.qos.restore_by_tag(tag, channel.client)


def drop_taken(app: Celery, tags: list[str]) -> None:
    """Acknowledge taken messages on behalf of a holder that is gone: kombu forgets them."""
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        with channel.client.pipeline() as pipe:
            for tag in tags:
                prefix, bare = _split_tag(tag)
                pipe.zrem(prefix + channel.unacked_index_key, bare).hdel(prefix + channel.unacked_key, bare)
            pipe.execute()


@contextmanager
def results_consumer(app: Celery, on_message, prefetch_count: int = 50) -> Iterator:
    """A connection consuming the results queue; yields it so the caller drives drain_events.

    `on_message` gets each message undecoded: kombu decoding a pickle or malformed text itself
    would raise out of drain_events, leave the message unacknowledged, and do so again after
    every restart."""
    with app.connection_for_read() as conn:
        with conn.Consumer([results_queue], accept=["json"], on_message=on_message, prefetch_count=prefetch_count):
            yield conn
