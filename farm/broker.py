"""The Celery application both roles share: queues, JSON-only serialisation, reliability settings.

Jobs flow orchestrator -> one worker's own queue -> that worker; results flow back as plain JSON
messages on `tokenfarm.results`, which only the collector consumes. No result backend: the broker
is the only channel a worker has, so it never needs database credentials.

The orchestrator chooses the worker of every job (orchestrator/scheduler.py) and publishes it to
`tokenfarm.worker.NAME`, the one queue that worker consumes, on Redis and on the embedded broker
alike: no worker takes a job meant for another, and a worker's broker user can be confined to its
own keys.

A confined farm (`broker_confined`) gives each worker a Redis user that may touch only keys under
`tf:w:NAME:`. kombu's `global_keyprefix` puts everything the worker's transport writes there: its
own queue, its unacked hash, index and restore mutex, the queue bindings and the results list it
sends to. What else Celery would do on the broker (remote control and events over pub/sub, mingle,
gossip, heartbeat events) is switched off for it, so it needs no channel and no key outside its
prefix. The orchestrator's side of that (its Redis users, publishing into a prefix, moving each
worker's results to the collector) is orchestrator/brokerusers.py. Plain-text redis:// is refused
off loopback (farm.settings.broker_url_problem); rediss:// always checks the broker's certificate.
"""

from __future__ import annotations

import os
import re
import ssl
import time
import uuid

from celery import Celery
from kombu import Exchange, Queue
from kombu.transport import filesystem as kombu_filesystem
from kombu.transport import redis as kombu_redis
from kombu.utils.json import dumps as kombu_dumps

from farm.contract import Envelope
from farm.settings import Settings, broker_url_problem
from farm.signing import sign

RESULTS_QUEUE = "tokenfarm.results"
RUN_JOB_TASK = "tokenfarm.run_job"


def worker_queue(name: str) -> str:
    """A worker's own queue: the only one it consumes, where the orchestrator puts the jobs it
    leased to that worker."""
    return f"tokenfarm.worker.{name}"

# A worker's name becomes part of a Redis key pattern and user name: ACL glob characters
# (*?[]\\), ':' (the prefix separator) or spaces would widen or break its confinement.
CONFINED_NAME = re.compile(r"[A-Za-z0-9._-]{1,100}")


class BrokerConfigError(ValueError):
    """A broker setting that must not be used; the message names the problem and the fix."""


def check_confined_name(name: str) -> str:
    if not CONFINED_NAME.fullmatch(name):
        raise BrokerConfigError(f"worker name {name!r} cannot have a confined Redis user: use 1-100 letters, "
                                "digits, '.', '_' or '-'")
    return name


def worker_keyprefix(name: str) -> str:
    """Where a confined worker's keys live; its Redis user may touch no key outside it."""
    return f"tf:w:{check_confined_name(name)}:"


def redis_user(name: str) -> str:
    """A confined worker's Redis user name (in a URL its ':' is written %3A)."""
    return f"w:{check_confined_name(name)}"


results_exchange = Exchange("tokenfarm.results", type="direct", durable=True)
results_queue = Queue(RESULTS_QUEUE, results_exchange, routing_key="result", durable=True)


def _transport_options(settings: Settings, keyprefix: str = "") -> dict:
    if not settings.broker_is_embedded:
        return {
            **({"global_keyprefix": keyprefix} if keyprefix else {}),
            # Longer than the longest job, so a slow measurement is not redelivered while running;
            # a dead worker's job comes back sooner through the collector's liveness check (heartbeats).
            # kombu's own restore is the backstop: scanned every 10 s (its default is every 10 x 10 s),
            # so an unacked job returns at most 10 s after its visibility timeout.
            "visibility_timeout": settings.visibility_timeout_s,
            "unacked_restore_interval": 10, "unacked_restore_throttle": 1,
        }
    queue_dir = settings.broker_dir / "queue"
    control_dir = settings.broker_dir / "control"
    for d in (queue_dir, control_dir):
        d.mkdir(parents=True, exist_ok=True)
    return {
        "data_folder_in": str(queue_dir),
        "data_folder_out": str(queue_dir),
        "control_folder": str(control_dir),
    }


class _RedisChannel(kombu_redis.Channel):
    """kombu's Redis channel, holding on to its client.

    kombu builds a new redis.Redis for every command it sends outside the consuming loop (each
    publish, each ack), and building one fills a table of some 250 response callbacks: about a
    fifth of the collector's CPU per result. A client is a thin handle on the channel's connection
    pool and safe to reuse, so one is kept per channel, as kombu already does for its async client.
    """

    def _create_client(self, asynchronous=False):
        if asynchronous:
            return super()._create_client(asynchronous=True)
        client = self.__dict__.get("_sync_client")
        if client is None:
            client = self.__dict__["_sync_client"] = super()._create_client()
        return client


class RedisTransport(kombu_redis.Transport):
    Channel = _RedisChannel


class _FilesystemChannel(kombu_filesystem.Channel):
    """kombu's filesystem channel, publishing each message whole.

    kombu creates a message's file empty and then writes it; a consumer listing the folder in
    between takes the file, reads nothing, and fails to decode it (the embedded collector died on
    that once, mid-sweep, and the message was gone). The message is written under a name no
    consumer matches and renamed into place, which the filesystem does at once. The name keeps
    kombu's form (milliseconds first, zero-padded), so consumers take messages in the order sent.
    """

    def _put(self, queue, payload, **kwargs):
        # Zero-padded: consumers sort names as strings, and an unpadded count of milliseconds
        # sorts 1000001 before 999999 (seen once, the moment the clock passed a million).
        name = f"{int(round(time.monotonic() * 1000)):015d}_{uuid.uuid4()}.{queue}.msg"
        path = os.path.join(self.data_folder_out, name)
        partial = path + ".partial"
        try:
            with open(partial, "wb") as f:
                f.write(kombu_dumps(payload).encode())
            os.replace(partial, path)
        except OSError as exc:
            raise kombu_filesystem.ChannelError(f"cannot add message file {path!r}: {exc}") from exc


class FilesystemTransport(kombu_filesystem.Transport):
    Channel = _FilesystemChannel


def broker_ssl(settings: Settings) -> dict | None:
    """redis-py's TLS arguments for a rediss:// broker: the certificate is required and its host
    name checked, against the CA in broker_ca_file (the system's CAs without one)."""
    if not settings.effective_broker_url.startswith("rediss://"):
        return None
    if settings.broker_ca_file is not None and not settings.broker_ca_file.is_file():
        raise BrokerConfigError(f"TOKENFARM_BROKER_CA_FILE={settings.broker_ca_file}: no such file; copy the "
                                "broker's ca.pem from `tokenfarm broker certs` to this machine")
    options = {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_check_hostname": True}
    if settings.broker_ca_file is not None:
        options["ssl_ca_certs"] = str(settings.broker_ca_file)
    return options


def create_app(settings: Settings, keyprefix: str = "") -> Celery:
    """The Celery app of either role. keyprefix: the Redis key prefix its transport works under
    (a confined worker's own, worker_app); the orchestrator's app has none and sees every key."""
    if problem := broker_url_problem(settings.effective_broker_url):
        raise BrokerConfigError(problem)
    app = Celery("tokenfarm", broker=settings.effective_broker_url, set_as_current=False)
    app.tokenfarm_settings = settings  # the orchestrator seals jobs with its data dir's key (orchestrator/keys.py)
    if settings.effective_broker_url.startswith(("redis://", "rediss://")):
        app.conf.broker_transport = f"{__name__}:RedisTransport"
    elif settings.effective_broker_url.startswith("filesystem://"):
        app.conf.broker_transport = f"{__name__}:FilesystemTransport"
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        event_serializer="json",
        result_backend=None,
        task_ignore_result=True,
        # A job is acknowledged only once its Result is on its way: a dead worker's job comes back.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_connection_retry_on_startup=True,
        broker_transport_options=_transport_options(settings, keyprefix),
        broker_use_ssl=broker_ssl(settings),
        worker_hijack_root_logger=False,
        broker_polling_interval=0.2 if settings.broker_is_embedded else 1.0,
        # Read by the orchestrator's dispatch: a job for one worker goes inside that worker's prefix.
        tokenfarm_confined=settings.broker_confined and not settings.broker_is_embedded,
    )
    if keyprefix:
        # Remote control and events are pub/sub on channels every worker would share; the
        # orchestrator learns what it needs from heartbeats on the results queue instead.
        app.conf.update(worker_enable_remote_control=False, worker_send_task_events=False,
                        task_send_sent_event=False)
    return app


def worker_app(settings: Settings) -> Celery:
    """A worker's app: confined to its own key prefix on a confined farm."""
    confined = settings.broker_confined and not settings.broker_is_embedded
    return create_app(settings, worker_keyprefix(settings.worker_name) if confined else "")




def signed_body(envelope: Envelope, token: str) -> dict:
    body = envelope.model_dump(mode="json")
    body["signature"] = sign(body, token)
    return body


def publish_results(producer, body: dict, **options) -> None:
    """One message onto the results queue.

    Through the default exchange, which names the queue directly: on Redis a named exchange costs
    one more round trip per message (kombu reads its bindings), and a farm sends several per job.
    """
    producer.publish(body, exchange="", routing_key=RESULTS_QUEUE, serializer="json", declare=[results_queue],
                     **options)


def publish_envelope(app: Celery, envelope: Envelope, token: str) -> None:
    with app.producer_or_acquire() as producer:
        publish_results(producer, signed_body(envelope, token), retry=True,
                        retry_policy={"max_retries": 20, "interval_start": 0.5, "interval_step": 1, "interval_max": 5})


