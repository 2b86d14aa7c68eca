"""The worker's Celery task: JSON Job in, JSON Result out over the results queue.

Thin on purpose: admit the job (worker/admission.py: the orchestrator's seal, expiry, no
replay; before anything else), resolve the model file, load the engine, call the measurement core,
send the Result. Any failure becomes a failed Result with its reason, and the worker goes on.
The loaded model is kept for the next job when that job runs the same file the same way.
"""

from __future__ import annotations

import importlib.util
import logging
import platform
import statistics
import threading
import time
from pathlib import Path

from celery import Celery

from farm.broker import RUN_JOB_TASK, publish_envelope
from farm.contract import (
    TECHNIQUE_FIELDS,
    Capabilities,
    Conditions,
    Download,
    Envelope,
    Hardware,
    Job,
    Quality,
    Result,
    utc_now,
)
from farm.identity import output_sha256
from farm.jobsign import JobRefused
from farm.memory import context_size
from farm.modelfiles import CATALOGUE, ModelError, held_models, read_facts
from farm.modelfiles import model_sha256 as model_identity
from farm.settings import Settings
from farm.stats import sample_stats, summarize, tok_s
from worker import __version__, hardware
from worker.admission import Admission, AdmissionError, job_id_of
from worker.engines import Backend, EngineError, create_backend, engine_devices
from worker.fetch import Progress, downloaded_models, fetch_source
from worker.measure import Measurement, decode_context, device_share, measure, roofline_tok_s
from worker.models import resolve

log = logging.getLogger("tokenfarm.worker")
# Announced models: enough for affinity on a well-stocked box, bounded so a heartbeat stays small.
MAX_HELD_MODELS = 512


def draft_file(job: Job, settings: Settings, progress: Progress | None = None) -> Path:
    """The draft's file: its requested quant, derived if needed, else the file's own type."""
    models_dir, max_bytes = settings.effective_models_dir, max_download_bytes(settings)
    quant = job.draft_quant
    if quant is None:
        if job.draft_model in CATALOGUE:
            quant = CATALOGUE[job.draft_model].quant
        elif job.draft_source is not None:
            quant = read_facts(fetch_source(job.draft_source, models_dir, progress, max_bytes)).file_type
        else:
            quant = read_facts(Path(job.draft_model)).file_type
    return resolve(job.draft_model, quant, models_dir, job.draft_sha256, job.draft_source, progress, max_bytes)[0]


def max_download_bytes(settings: Settings) -> int | None:
    return int(settings.models_max_gb * 1e9) if settings.models_max_gb else None


def measure_over_prompts(job: Job, target, settings: Settings, model_sha256: str,
                         progress: Progress | None = None) -> tuple[object, dict]:
    """A decode test over a prompt category: baseline, and the technique if any, in one job.

    One loop for every engine and technique (worker/speculative.py): the job's technique picks
    the drafter, its temperature greedy or sampled acceptance; an engine lacking what a
    technique needs (hidden states, distributions) refuses it with an EngineError.
    """
    from worker.speculative import (
        check_vocab_pair,
        make_drafter,
        measure_prompts,
        prompt_tokens,
    )

    draft = None
    extra: dict = {}
    try:
        if job.technique == "spec":
            draft_path = draft_file(job, settings, progress)
            extra["draft_sha256"] = model_identity(draft_path)
            draft = create_backend(job.engine, job.config, settings.torch_device)
            draft.load(draft_path, job.config, context_size(job))
            # Before any measurement: a draft with another tokenizer would be measured as garbage.
            check_vocab_pair(target.token_texts(), draft.token_texts())
        prompts = prompt_tokens(target, job)
        m = measure_prompts(target, job, prompts, make_drafter(job, target, draft, model_sha256))
    finally:
        if draft is not None:
            draft.close()
    # The job's identity is the baseline's, so it compares with any run of the same prompts.
    extra.update(n_prompts=len(prompts), speculation=m.speculation, output_sha256=output_sha256(m.baseline_tokens))
    return m, extra


def backend_name(job: Job) -> str:
    """The backend a job loads: llama.cpp's MTP jobs need the file's NextN layers and an MTP context."""
    return "llamacpp-mtp" if job.engine == "llamacpp" and job.technique == "mtp" else job.engine


def quality_block(job: Job, backend: Backend, model_sha256: str, settings: Settings,
                  progress: Progress | None = None) -> Quality:
    """The quant's quality pass against its reference (worker/quality.py's definitions).

    The reference is the job's quality_reference_quant of the same model, resolved (derived if
    need be) like any quant; its pass is cached under the models folder per (file, text, context,
    chunks, engine), so only the first quant of a model pays for it. When the reference is the
    loaded file itself, the loaded engine makes the reference pass too; otherwise the reference
    is loaded beside it for the one pass and closed.
    """
    from worker import quality as q

    models_dir = settings.effective_models_dir
    ref_path, _ = resolve(job.model, job.quality_reference_quant, models_dir, job.model_sha256, job.model_source,
                          progress, max_download_bytes(settings))
    ref_sha = model_identity(ref_path)
    text = q.eval_text()
    text_sha = q.text_sha256(text)
    chunks = q.text_chunks(backend.tokenize, text, job.quality_n_ctx, job.quality_n_chunks)
    path = q.cache_path(models_dir, job.engine, ref_sha, text_sha, job.quality_n_ctx, len(chunks), q.TOP_K)
    ref = q.load_reference(path, ref_sha, text_sha)
    cached, reference_ns = ref is not None, 0
    if ref is None:
        if ref_sha == model_sha256:
            ref, reference_ns = q.reference_pass(backend.chunk_logits, chunks, job.quality_n_ctx)
        else:
            ref_backend = create_backend(job.engine, job.config, settings.torch_device)
            try:
                ref_backend.load(ref_path, job.config, context_size(job))
                ref, reference_ns = q.reference_pass(ref_backend.chunk_logits, chunks, job.quality_n_ctx)
            finally:
                ref_backend.close()
        q.save_reference(path, ref, ref_sha, text_sha)
    scores = q.score(ref, backend.chunk_logits, chunks)
    f = q.figures(scores)
    return Quality(
        reference_quant=job.quality_reference_quant, reference_sha256=ref_sha, text_name=q.TEXT_NAME,
        text_sha256=text_sha, n_ctx=job.quality_n_ctx, n_chunks=len(chunks), reference_top_k=ref.top_k,
        reference_mass_kept=min(1.0, ref.mass_kept), reference_cached=cached, pass_ns=scores.pass_ns,
        reference_ns=reference_ns, **vars(f),
    )


def engine_hardware(engine: str, torch_device: str = "auto") -> Hardware:
    """The machine as a job's engine sees it: the summary, with that engine's backends and GPUs."""
    return hardware.with_devices(hardware.summary(), engine_devices(engine, torch_device))


def hardware_for(engine: str, torch_device: str = "auto") -> Hardware:
    """engine_hardware, or the bare summary where the engine itself cannot be asked (its library
    missing or broken): a failed result still goes back with its reason, a worker still joins."""
    try:
        return engine_hardware(engine, torch_device)
    except Exception:
        return hardware.summary()


class LoadedModel:
    """The model a worker keeps loaded between jobs (model affinity), as llama-bench reuses one.

    The model is kept while consecutive jobs run the same file (by sha256) on the same engine
    with the same model-level parameters (EngineConfig.model_level(): offload, split, mmap,
    tensor overrides); a context-level change (KV types, batch sizes, threads, flash attention,
    a larger context) makes only a new context when the engine can (`new_context`). Anything
    else closes the model before loading, so two models never share the memory a job was routed
    by. A failed job drops it: after a corrupt file or an out-of-memory error the engine's state
    is not to be trusted.
    """

    def __init__(self, torch_device: str = "auto") -> None:
        self.torch_device = torch_device
        self.backend: Backend | None = None
        self._key: tuple | None = None
        self._config = None
        self._n_ctx = 0

    def acquire_timed(self, engine: str, path: Path, model_sha256: str, config,
                      n_ctx: int) -> tuple[Backend, int, int, bool]:
        """(backend, load_ns, context_ns, model_reused): the cold load of the weights and the making
        of a context, timed apart; both 0 when the loaded model and context serve as they are."""
        key = (engine, str(path), model_sha256, config.model_level())
        if self.backend is not None and key == self._key:
            if config == self._config and n_ctx <= self._n_ctx:
                return self.backend, 0, 0, True
            if hasattr(self.backend, "new_context"):
                t0 = time.perf_counter_ns()
                self.backend.new_context(config, max(n_ctx, self._n_ctx))
                self._config, self._n_ctx = config, max(n_ctx, self._n_ctx)
                return self.backend, 0, time.perf_counter_ns() - t0, True
        self.drop()
        backend = create_backend(engine, config, self.torch_device)
        if hasattr(backend, "load_model"):
            t0 = time.perf_counter_ns()
            backend.load_model(path, config)
            t1 = time.perf_counter_ns()
            backend.new_context(config, n_ctx)
            load_ns, context_ns = t1 - t0, time.perf_counter_ns() - t1
        else:
            t0 = time.perf_counter_ns()
            backend.load(path, config, n_ctx)
            load_ns, context_ns = time.perf_counter_ns() - t0, 0
        self.backend, self._key, self._config, self._n_ctx = backend, key, config, n_ctx
        return backend, load_ns, context_ns, False

    def drop(self) -> None:
        backend, self.backend, self._key, self._config, self._n_ctx = self.backend, None, None, None, 0
        if backend is not None:
            backend.close()


def execute(job: Job, settings: Settings, loaded: LoadedModel | None = None,
            progress: Progress | None = None) -> Result:
    """Run one job to a Result; never raises for a problem with the job itself.

    With `loaded`, the model stays loaded for the caller's next job; without, it is closed.
    `progress` hears how a remote model's download advances.
    """
    worker = settings.worker_name
    started = utc_now()
    base_versions = {"tokenfarm": __version__, "python": platform.python_version()}
    keep = loaded is not None
    loaded = loaded if keep else LoadedModel(settings.torch_device)
    hardware.reset_peak_rss()  # a kept model stays resident and is counted in this job's peak
    try:
        path, source_sha = resolve(job.model, job.quant, settings.effective_models_dir, job.model_sha256,
                                   job.model_source, progress, max_download_bytes(settings))
        facts = read_facts(path)
        model_sha = model_identity(path)
        backend, load_ns, context_ns, reused = loaded.acquire_timed(backend_name(job), path, model_sha, job.config,
                                                                    context_size(job))
        extra: dict = {}
        try:
            energy_before_mj = hardware.gpu_energy_mj()
            # The scenario is the job's (a prompt set, with or without a technique, or plain
            # text); the engine is never asked its name.
            if job.prompt_category:
                m, extra = measure_over_prompts(job, backend, settings, model_sha, progress)
            else:
                m = measure(backend, job)
                extra = {"output_sha256": output_sha256([m.tokens])}
            if job.quality:
                extra["quality"] = quality_block(job, backend, model_sha, settings, progress)
            energy_after_mj = hardware.gpu_energy_mj()
            versions = {**base_versions, **backend.versions(), **hardware.library_versions()}
            engine_conditions = backend.conditions()
            # The process's own device memory where the engine reports its buffers (llama.cpp
            # does, by buffer type); the whole GPU's used memory only where it cannot.
            vram = engine_conditions.get("device_bytes") if "device_bytes" in engine_conditions else None
            if vram is None:  # the torch engine on CUDA: its own allocator's peak
                vram = engine_conditions.get("flags", {}).get("cuda_max_allocated_bytes")
            conditions = Conditions(
                **engine_conditions, peak_rss_bytes=hardware.peak_rss_bytes(),
                peak_vram_bytes=hardware.gpu_used_bytes() if vram is None else vram, model_reused=reused,
                context_ns=context_ns,
                energy_per_token_j=energy_per_token_j(job, energy_before_mj, energy_after_mj),
            )
        finally:
            if not keep:
                loaded.drop()
    except (ModelError, EngineError) as exc:
        loaded.drop()
        return Result.failed(job, worker, str(exc), hardware=hardware_for(job.engine, settings.torch_device),
                             versions=base_versions, started_at=started, transient=getattr(exc, "transient", False))
    except Exception as exc:  # an engine bug must not take the worker down with it
        log.exception("job %s failed", job.job_id)
        loaded.drop()
        return Result.failed(job, worker, f"{type(exc).__name__}: {exc}",
                             hardware=hardware_for(job.engine, settings.torch_device),
                             versions=base_versions, started_at=started)
    fields = {**{f: getattr(job, f) for f in TECHNIQUE_FIELDS}, **extra}
    avg, std = summarize(job.n_tokens, m.samples_ns)
    hw = engine_hardware(job.engine, settings.torch_device)
    decode = decode_figures(job, m, facts, hw, avg, conditions.flags)
    return Result(
        job_id=job.job_id, sweep_id=job.sweep_id, status="ok", worker=worker,
        model=job.model, model_sha256=model_sha, source_sha256=source_sha, model_source=job.model_source,
        model_facts=facts,
        quant=job.quant, technique=job.technique, backend=job.engine, test=job.test,
        n_prompt=job.n_prompt, n_gen=job.n_gen, n_depth=job.n_depth, repetitions=job.repetitions,
        samples_ns=m.samples_ns, avg_ts=avg, stddev_ts=std, load_ns=load_ns, config=job.config,
        stats=sample_stats(job.n_tokens, m.samples_ns),
        ttft_samples_ns=m.ttft_samples_ns,
        ttft_ns=int(statistics.median(m.ttft_samples_ns)) if m.ttft_samples_ns else 0,
        decode_samples_ns=m.decode_samples_ns, **decode, conditions=conditions,
        hardware=hw, versions=versions, started_at=started, finished_at=utc_now(), **fields,
    )


def energy_per_token_j(job: Job, before_mj: int | None, after_mj: int | None) -> float | None:
    """GPU energy of the whole measurement (warm-up included) over every token it processed."""
    if before_mj is None or after_mj is None or after_mj <= before_mj:
        return None
    n_runs = job.n_warmup + job.repetitions
    n_tokens = n_runs * (job.n_depth + job.n_tokens)
    return (after_mj - before_mj) / 1000 / n_tokens


def decode_figures(job: Job, m: Measurement, facts, hw, avg_ts: float, flags: dict | None = None) -> dict:
    """decode_ts (pg's directly timed decode part) and the roofline bound for tg and pg.
    flags: the engine's Conditions.flags, which say where the weights really sat."""
    if job.kind == "pp":
        return {}
    decode_ts = avg_ts if job.kind == "tg" else statistics.fmean(tok_s(job.n_gen, ns) for ns in m.decode_samples_ns)
    share = device_share(job.engine, job.config.n_gpu_layers, facts.n_layer, flags or {})
    ceiling = roofline_tok_s(hw.host_bandwidth_gbps, facts.active_bytes, facts.kv_bytes_per_token, decode_context(job),
                             share, hw.device_bandwidth_gbps)
    return {"decode_ts": decode_ts, "roofline_tok_s": ceiling,
            "roofline_pct": 100 * decode_ts / ceiling if ceiling else 0.0}


def held(settings: Settings) -> list[str]:
    """sha256 of the models this box holds: its own folder's and what it downloaded from hubs
    (the orchestrator prefers a worker that has a job's model)."""
    found = held_models(settings.effective_models_dir) + downloaded_models(settings.effective_models_dir)
    return sorted(set(found))[:MAX_HELD_MODELS]


def capabilities(settings: Settings) -> Capabilities:
    """What this worker announces, the queue it will consume among it."""
    from farm.broker import worker_queue

    engines = [name for name, module in (("llamacpp", "llama_cpp"), ("torch", "torch"))
               if importlib.util.find_spec(module) is not None]
    # The GPUs announced are llama.cpp's where it is here: tensor_split, routed by n_gpus, is its alone.
    hw = hardware_for(engines[0], settings.torch_device) if engines else hardware.summary()
    caps = Capabilities(engines=engines, hardware=hw, models=held(settings),
                        version=__version__,
                        offered_ram_bytes=min(hw.ram_bytes, settings.max_ram_bytes or hw.ram_bytes),
                        offered_vram_bytes=min(hw.vram_bytes, settings.max_vram_bytes or hw.vram_bytes))
    # Only its own: the orchestrator chooses which worker runs each job (a lease it grants).
    return caps.model_copy(update={"queues": [worker_queue(settings.worker_name)]})


class Heartbeat(threading.Thread):
    """Says "alive" every heartbeat_s from its own connection, even while a measurement blocks the pool."""

    def __init__(self, app: Celery, settings: Settings, caps: Capabilities) -> None:
        super().__init__(name="tokenfarm-heartbeat", daemon=True)
        self.app, self.settings, self.caps = app, settings, caps
        self.stopped = threading.Event()

    def run(self) -> None:
        kind = "hello"
        while not self.stopped.is_set():
            try:
                # Downloads since the last beat count: a job of that model should come here next.
                self.caps = self.caps.model_copy(update={"models": held(self.settings)})
                publish_envelope(self.app, Envelope(kind=kind, worker=self.settings.worker_name, capabilities=self.caps),
                                 self.settings.worker_token)
                kind = "heartbeat"
            except Exception as exc:  # a broker outage must not kill the thread; the next beat retries
                log.warning("heartbeat failed: %s", exc)
            self.stopped.wait(self.settings.heartbeat_s)


def refuse(app: Celery, settings: Settings, job_json: object, exc: JobRefused) -> None:
    """Report a job this worker would not run: counted by the collector, never retried."""
    job_id = job_id_of(job_json)
    log.warning("refused job %s: %s", job_id or "?", exc.reason)
    publish_envelope(app, Envelope(kind="refused", job_id=job_id, worker=settings.worker_name, reason=exc.reason[:2000]),
                     settings.worker_token)


def register(app: Celery, settings: Settings, admission: Admission) -> None:
    loaded = LoadedModel(settings.torch_device)  # one per worker process: the solo pool runs one job at a time

    @app.task(name=RUN_JOB_TASK, bind=True)
    def run_job(self, job_json: object = None, seal: object = None, *extra_args, **extra_kwargs) -> None:
        # The gate comes first: until admit() returns, no file the message names is opened,
        # fetched, derived or loaded, and nothing but the refusal is sent.
        try:
            if extra_args or extra_kwargs:
                raise JobRefused("malformed", "the job message has arguments beyond the job and its seal")
            job = admission.admit(job_json, seal)
        except JobRefused as exc:
            refuse(app, settings, job_json, exc)
            return
        # Both messages echo the lease the job came with: the collector counts nothing else.
        lease = {"lease_id": job.lease_id, "attempt": job.attempt}
        publish_envelope(app, Envelope(kind="started", job_id=job.job_id, worker=settings.worker_name, **lease),
                         settings.worker_token)
        log.info("job %s: %s %s %s", job.job_id, job.model, job.quant, job.test)

        def progress(downloaded_bytes: int, total_bytes: int) -> None:
            publish_envelope(app, Envelope(kind="progress", job_id=job.job_id, worker=settings.worker_name,
                                           download=Download(downloaded_bytes=downloaded_bytes, total_bytes=total_bytes),
                                           **lease),
                             settings.worker_token)

        try:
            result = execute(job, settings, loaded, progress)
        except Exception as exc:  # a bug in building the Result must still end the job, not hang it
            log.exception("job %s: no result could be built", job.job_id)
            loaded.drop()
            result = Result.failed(job, settings.worker_name, f"internal error: {type(exc).__name__}: {exc}",
                                   hardware=hardware_for(job.engine, settings.torch_device))
        publish_envelope(app, Envelope(kind="result", job_id=job.job_id, worker=settings.worker_name, result=result,
                                       **lease), settings.worker_token)
        log.info("job %s: %s %.2f tok/s %s", job.job_id, result.status, result.avg_ts, result.error)


def start(settings: Settings, loglevel: str = "INFO") -> None:
    """Serve jobs until stopped: one measurement at a time, in this process."""
    from farm.broker import BrokerConfigError, worker_app

    if not settings.worker_token:
        raise SystemExit("error: no worker token: on the orchestrator run `tokenfarm workers add "
                         f"{settings.worker_name}` and set TOKENFARM_WORKER_TOKEN to the token it prints")
    try:
        admission = Admission.for_settings(settings)
    except AdmissionError as exc:
        raise SystemExit(f"error: {exc}")
    logging.basicConfig(level=loglevel, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        app = worker_app(settings)
    except BrokerConfigError as exc:
        raise SystemExit(f"error: {exc}")
    register(app, settings, admission)
    caps = capabilities(settings)
    log.info("serving %d queues: %s", len(caps.queues), ", ".join(caps.queues))
    Heartbeat(app, settings, caps).start()
    argv = [
        "worker", f"--hostname={settings.worker_name}@%h", f"--queues={','.join(caps.queues)}",
        # solo pool: the measurement runs in this process, with nothing else competing for cores.
        "--pool=solo", "--concurrency=1", f"--loglevel={loglevel}",
        # Gossip, mingle and heartbeat events are broadcasts to every worker; this one's
        # liveness reaches the orchestrator as signed heartbeats on the results queue.
        "--without-gossip", "--without-mingle", "--without-heartbeat",
    ]
    app.worker_main(argv)
