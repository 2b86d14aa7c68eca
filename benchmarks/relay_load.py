"""What a confined broker adds per result: the orchestrator moving each worker's results list onto
the collector's queue (orchestrator/brokerusers.relay_results), and TLS on every connection.

Fills the results lists of N workers (under tf:w:NAME:) with result-sized messages, then times
relays until all are moved, on a Redis of its own choosing (plain or TLS). Prints messages/s and
microseconds per message; compare with the collector's ingestion rate (benchmarks/farm_load.py).

    python benchmarks/relay_load.py --url redis://127.0.0.1:6379/15 --workers 100 --per-worker 100
    python benchmarks/relay_load.py --url 'rediss://tf-admin:PW@127.0.0.1:6380/0' --ca ca.pem
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import redis  # noqa: E402

from farm.broker import RESULTS_QUEUE, worker_keyprefix  # noqa: E402
from orchestrator.brokerusers import RELAY_BATCH, relay_results  # noqa: E402

MESSAGE_BYTES = 2600  # about a signed Result inside kombu's envelope


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="a Redis database this may empty")
    parser.add_argument("--ca", help="the CA of a rediss:// server")
    parser.add_argument("--workers", type=int, default=100)
    parser.add_argument("--per-worker", type=int, default=100)
    args = parser.parse_args()
    tls = {"ssl_ca_certs": args.ca, "ssl_cert_reqs": "required"} if args.url.startswith("rediss://") else {}
    client = redis.Redis.from_url(args.url, **tls)
    names = [f"bench-{i}" for i in range(args.workers)]
    client.delete(RESULTS_QUEUE, *(worker_keyprefix(n) + RESULTS_QUEUE for n in names))
    payload = b"x" * MESSAGE_BYTES
    with client.pipeline(transaction=False) as pipe:
        for n in names:
            for _ in range(args.per_worker):
                pipe.lpush(worker_keyprefix(n) + RESULTS_QUEUE, payload)
        pipe.execute()
    n_total = args.workers * args.per_worker
    started = time.perf_counter()
    n_moved, n_relays = 0, 0
    while n_moved < n_total:
        n_moved += relay_results(client, names)
        n_relays += 1
    took_s = time.perf_counter() - started
    assert client.llen(RESULTS_QUEUE) == n_total
    client.delete(RESULTS_QUEUE)
    # What the collector pays every tick when nothing waits: one LLEN per worker, pipelined.
    idle_started = time.perf_counter()
    for _ in range(20):
        relay_results(client, names)
    idle_ms = (time.perf_counter() - idle_started) / 20 * 1000
    print(f"{n_total} messages from {args.workers} workers moved in {n_relays} relays "
          f"(at most {RELAY_BATCH} per worker each) in {took_s:.2f} s: {n_total / took_s:,.0f} messages/s, "
          f"{1e6 * took_s / n_total:.1f} us per message ({'TLS' if tls else 'plain'}); "
          f"a relay with nothing waiting: {idle_ms:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
