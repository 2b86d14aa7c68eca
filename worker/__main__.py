"""`python -m worker`: the worker's own commands, run in a worker process.

Owns: starting a worker (the default, `python -m worker [--name NAME]`), joining a farm with
the code `tokenfarm workers add` prints (`python -m worker join CODE`), fetching and deriving
model files, training MTP heads, and `run-jobs` (Job JSON lines on stdin, Result JSON lines on
stdout) for `tokenfarm canaries pin`. The orchestrator's CLI spawns these instead of importing
worker code, so torch and llama.cpp never enter its process. Knows nothing of the database.
"""

import argparse
import sys
from pathlib import Path

from farm.settings import load_settings


def _start(args) -> int:
    import os

    from farm.join import JoinError, read_env_file
    from worker.tasks import start

    if getattr(args, "env_file", None):
        try:
            os.environ.update(read_env_file(args.env_file))
        except JoinError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 3
    settings = load_settings()
    if args.name:
        settings.worker_name = args.name
    start(settings, args.loglevel)
    return 0


def _join(args) -> int:
    """Write the join code's settings to an env file (0600), then serve jobs with them."""
    import os
    from pathlib import Path

    from farm.join import JoinCode, JoinError, write_env_file

    try:
        code = JoinCode.decode(args.code)
        path = Path(args.env_file) if args.env_file else load_settings().data_dir / f"worker-{code.name}.env"
        ca_file = path.with_name(f"{path.stem}.ca.pem") if code.ca_pem else None
        if ca_file is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            ca_file.write_text(code.ca_pem)
        env = code.env(ca_file)
        write_env_file(path, env)
    except JoinError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    print(f"worker {code.name}: settings written to {path} (keep it private: it holds the worker's token). "
          f"Start it again later with: python -m worker start --env-file {path}", flush=True)
    if args.no_start:
        return 0
    os.environ.update(env)
    args.env_file, args.name = None, None
    return _start(args)


def _models(args) -> int:
    from farm.modelfiles import ModelError
    from worker.engines import EngineError
    from worker.models import fetch, moe_path, quant_ladder

    models_dir = load_settings().effective_models_dir
    try:
        if args.action == "fetch":
            for name in args.names:
                print(f"{name}: {fetch(name, models_dir)}", flush=True)
            return 0
        if args.ladder:
            for quant, path in quant_ladder(args.ladder, models_dir):
                print(f"{args.ladder} {quant}: {path}", flush=True)
        for name in args.names:
            print(f"{name}: {moe_path(name, models_dir)}", flush=True)
    except (ModelError, EngineError) as exc:
        # One line on stderr: the CLI that spawned this prints it as its refusal.
        print(str(exc), file=sys.stderr)
        return 3
    return 0


def _run_jobs(args) -> int:
    """One Result JSON line per Job JSON line, in order; the caller stores them, not this process."""
    from farm.contract import Job
    from worker.tasks import execute

    settings = load_settings()
    for line in sys.stdin:
        if line.strip():
            result = execute(Job.model_validate_json(line), settings)
            print(result.model_dump_json(), flush=True)
    return 0


def _train_mtp(args) -> int:
    import time

    from farm.modelfiles import ModelError, sha256_file
    from worker.models import resolve

    try:
        from worker.engines.torch.mtp_train import TrainConfig, train_and_save
    except ImportError as exc:
        print(f"training MTP heads needs the torch extra ({exc.name} is missing): pip install 'tokenfarm[torch]'",
              file=sys.stderr)
        return 3
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        path, _ = resolve(args.base, "F32", load_settings().effective_models_dir)
    except ModelError as exc:
        print(str(exc), file=sys.stderr)
        return 3
    cfg = TrainConfig(n_mtp=args.heads, n_chat=args.n_chat, n_code=args.n_code, n_cont=args.n_cont,
                      epochs=args.epochs, lr=args.lr, n_head_vocab=args.n_head_vocab)
    t0 = time.perf_counter()
    out, report = train_and_save(path, sha256_file(path), cfg, progress=lambda m: print(m, flush=True))
    print(f"heads: {out}")
    print(f"{report.n_requests} requests ({report.n_benchmark_prompts_dropped} dropped as benchmark prompts); "
          f"generated {report.n_train_positions + report.n_heldout_positions} positions in "
          f"{report.generate_s:.0f} s, trained in {report.train_s:.0f} s, {time.perf_counter() - t0:.0f} s in all; "
          f"final loss {report.loss_by_epoch[-1]:.3f} per head")
    for k, (acc, chain) in enumerate(zip(report.heldout_accuracy_by_head, report.heldout_chain_acceptance)):
        print(f"head {k + 1}: held-out accuracy {acc:.3f}, greedy chain reaches it {chain:.3f}")
    print(f"held-out tokens per pass if drafting were free: {report.heldout_tokens_per_pass:.2f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker", description="Serve tokenfarm measurement jobs.")
    parser.add_argument("--name", help="worker name (default: TOKENFARM_WORKER_NAME or the host name)")
    parser.add_argument("--loglevel", default="INFO")
    parser.set_defaults(run=_start)
    sub = parser.add_subparsers()
    start = sub.add_parser("start", help="serve jobs until stopped (the default)")
    start.add_argument("--name")
    start.add_argument("--loglevel", default="INFO")
    start.add_argument("--env-file", type=Path, help="TOKENFARM_* settings to start with (as `join` writes them)")
    start.set_defaults(run=_start)
    join = sub.add_parser("join", help="join a farm with the code `tokenfarm workers add NAME` printed, and start")
    join.add_argument("code")
    join.add_argument("--env-file", help="where to keep the settings (default: $TOKENFARM_DATA_DIR/worker-NAME.env)")
    join.add_argument("--no-start", action="store_true", help="only write the env file")
    join.add_argument("--loglevel", default="INFO")
    join.set_defaults(run=_join)
    models = sub.add_parser("models", help="fetch or derive model files")
    models.add_argument("action", choices=["fetch", "derive"])
    models.add_argument("names", nargs="*")
    models.add_argument("--ladder")
    models.set_defaults(run=_models)
    sub.add_parser("run-jobs", help="Job JSON lines on stdin -> Result JSON lines on stdout").set_defaults(run=_run_jobs)
    mtp = sub.add_parser("train-mtp", help="train MTP heads on a frozen base")
    mtp.add_argument("base")
    mtp.add_argument("--heads", type=int, default=2)
    mtp.add_argument("--n-chat", type=int, default=2400)
    mtp.add_argument("--n-code", type=int, default=1400)
    mtp.add_argument("--n-cont", type=int, default=128)
    mtp.add_argument("--epochs", type=int, default=6)
    mtp.add_argument("--lr", type=float, default=2e-3)
    mtp.add_argument("--n-head-vocab", type=int, default=8192)
    mtp.add_argument("--threads", type=int, default=0)
    mtp.set_defaults(run=_train_mtp)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
