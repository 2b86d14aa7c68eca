"""The worker's Celery task: JSON Job in, JSON Result out over the results queue.

Thin on purpose: parse, resolve the model file, load the engine, call the measurement core,
send the Result. Any failure becomes a failed Result with its reason, and the worker goes on.
"""

from __future__ import annotations

import logging
import platform
import time

from celery import Celery
from pydantic import ValidationError

from worker import __version__, hardware
from worker.broker import RUN_JOB_TASK, publish_envelope
from worker.contract import Envelope, Job, Result, summarize, utc_now
from worker.engines import EngineError, create_backend
from worker.measure import measure
from worker.models import ModelError, read_facts, resolve, sha256_file
from worker.settings import Settings

log = logging.getLogger("tokenfarm.worker")


def context_size(job: Job) -> int:
    need = job.n_depth + max(job.n_prompt, job.n_gen) + 16
    return ((need + 255) // 256) * 256


def execute(job: Job, settings: Settings) -> Result:
    """Run one job to a Result; never raises for a problem with the job itself."""
    worker = settings.worker_name
    started = utc_now()
    base_versions = {"tokenfarm": __version__, "python": platform.python_version()}
    try:
        path, source_sha = resolve(job.model, job.quant, settings.effective_models_dir, job.model_sha256)
        facts = read_facts(path)
        model_sha = sha256_file(path)
        backend = create_backend(job.engine)
        t0 = time.perf_counter_ns()
        backend.load(path, job.config, context_size(job))
        load_ns = time.perf_counter_ns() - t0
        extra: dict = {}
        try:
            if job.engine == "torch" and job.technique != "baseline":
                from worker.engines.torch.techniques import measure_technique

                m, extra = measure_technique(backend, job, path, model_sha, settings.effective_models_dir)
            else:
                m = measure(backend, job)
            versions = {**base_versions, **backend.versions()}
        finally:
            backend.close()
    except (ModelError, EngineError) as exc:
        return Result.failed(job, worker, str(exc), hardware=hardware.summary(), versions=base_versions, started_at=started)
    except Exception as exc:  # an engine bug must not take the worker down with it
        log.exception("job %s failed", job.job_id)
        return Result.failed(job, worker, f"{type(exc).__name__}: {exc}", hardware=hardware.summary(),
                             versions=base_versions, started_at=started)
    avg, std = summarize(job.n_tokens, m.samples_ns)
    return Result(
        job_id=job.job_id, sweep_id=job.sweep_id, status="ok", worker=worker,
        model=job.model, model_sha256=model_sha, source_sha256=source_sha, model_facts=facts,
        quant=job.quant, technique=job.technique, backend=job.engine, test=job.test,
        n_prompt=job.n_prompt, n_gen=job.n_gen, n_depth=job.n_depth, repetitions=job.repetitions,
        samples_ns=m.samples_ns, avg_ts=avg, stddev_ts=std, load_ns=load_ns, config=job.config,
        hardware=hardware.summary(), versions=versions, started_at=started, finished_at=utc_now(), **extra,
    )


def register(app: Celery, settings: Settings) -> None:
    @app.task(name=RUN_JOB_TASK, bind=True)
    def run_job(self, job_json: dict) -> None:
        try:
            job = Job.model_validate(job_json)
        except ValidationError as exc:
            # Without a valid job id nothing can be reported; the orchestrator never sends this.
            log.error("refused a malformed job: %s", exc)
            return
        publish_envelope(app, Envelope(kind="started", job_id=job.job_id, worker=settings.worker_name))
        log.info("job %s: %s %s %s", job.job_id, job.model, job.quant, job.test)
        result = execute(job, settings)
        publish_envelope(app, Envelope(kind="result", job_id=job.job_id, worker=settings.worker_name, result=result))
        log.info("job %s: %s %.2f tok/s %s", job.job_id, result.status, result.avg_ts, result.error)


def start(settings: Settings, loglevel: str = "INFO") -> None:
    """Serve jobs until stopped: one measurement at a time, in this process."""
    from worker.broker import JOBS_QUEUE, create_app

    logging.basicConfig(level=loglevel, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    register(app, settings)
    argv = [
        "worker", f"--hostname={settings.worker_name}@%h", f"--queues={JOBS_QUEUE}",
        # solo pool: the measurement runs in this process, with nothing else competing for cores.
        "--pool=solo", "--concurrency=1", f"--loglevel={loglevel}",
        "--without-gossip", "--without-mingle",
    ]
    app.worker_main(argv)
