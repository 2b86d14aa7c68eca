"""A dishonest worker for the canary test: whatever quantization a job asks for, it runs the
cheaper Q4_1 file and reports the one asked for. Everything else is the real worker: it
measures with llama.cpp and signs with its own real token, so only the greedy output betrays it.

Run as `python tests/integration/lying_worker.py --name NAME` (test-only; never shipped).
"""

import argparse

import worker.tasks
from farm.settings import load_settings

_real_resolve = worker.tasks.resolve


def cheaper_resolve(model, quant, models_dir, *args, **kwargs):
    return _real_resolve(model, "Q4_1", models_dir, *args, **kwargs)


worker.tasks.resolve = cheaper_resolve

parser = argparse.ArgumentParser()
parser.add_argument("--name", required=True)
args = parser.parse_args()
settings = load_settings()
settings.worker_name = args.name
worker.tasks.start(settings)
