"""`python -m worker [--name NAME]`: start a worker without the orchestrator's extras installed."""

import argparse

from farm.settings import load_settings
from worker.tasks import start

parser = argparse.ArgumentParser(prog="python -m worker", description="Serve tokenfarm measurement jobs.")
parser.add_argument("--name", help="worker name (default: TOKENFARM_WORKER_NAME or the host name)")
parser.add_argument("--loglevel", default="INFO")
args = parser.parse_args()
settings = load_settings()
if args.name:
    settings.worker_name = args.name
start(settings, args.loglevel)
