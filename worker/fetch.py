"""Fetching a job's remote model onto this box: the Hugging Face cache, the local Ollama store.

Owns downloading a hub model's files into the Hugging Face cache layout through `huggingface_hub`
(HF_HOME / HF_HUB_CACHE respected, so what llama.cpp, LM Studio or transformers already fetched
is reused), resuming a broken download, checking every file against the sha256 the orchestrator
read from the hub, quarantining a file that does not match, the free-disk check before a
download, reporting progress, and the TOKENFARM_MODELS_MAX_GB bound with least-recently-used
eviction of what this project downloaded (a ledger in the models folder; nothing else is ever
deleted). It does not derive, load or measure (worker/models.py, worker/tasks.py).
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Callable

from farm.contract import ModelSource, SourceFile
from farm.modelfiles import SPLIT_NAME, ModelError, combined_sha256, sha256_file
from farm.sources import hub_cache_dir, ollama_store

# (downloaded_bytes, total_bytes) of the job's files; called from a watcher thread, about once a second.
Progress = Callable[[int, int], None]
# Room kept free beyond the files: llama.cpp's mmap, sidecars, the next job's logs.
DISK_MARGIN_BYTES = 1 << 30
LEDGER = "downloads.json"


def fetch_source(source: ModelSource, models_dir: Path, progress: Progress | None = None,
                 max_bytes: int | None = None) -> Path:
    """The local path of a remote model (a split set's first part), verified against its sha256."""
    if source.kind == "ollama":
        return _ollama_blob(source)
    return _fetch_hub(source, Path(models_dir), progress, max_bytes)


def _ollama_blob(source: ModelSource) -> Path:
    (file,) = source.files
    blob = ollama_store() / "blobs" / f"sha256-{file.sha256}"
    if not blob.is_file():
        raise ModelError(f"model {source.repo} is not pulled on this worker (no blob {blob}); run "
                         f"`ollama pull {source.repo}` here, or set OLLAMA_MODELS to the store that has it")
    _verify(blob, file, f"ollama://{source.repo}")
    return blob


def _verify(path: Path, file: SourceFile, what: str, quarantine: Path | None = None) -> None:
    size = path.stat().st_size
    got = sha256_file(path) if size == file.size_bytes else ""
    if got == file.sha256:
        return
    why = (f"holds {size} bytes, the source advertises {file.size_bytes}" if size != file.size_bytes
           else f"has sha256 {got}, the source advertises {file.sha256}")
    where = ""
    if quarantine is not None:
        quarantine.mkdir(parents=True, exist_ok=True)
        target = quarantine / f"{file.sha256[:16]}.{Path(file.name).name}"
        shutil.move(str(path.resolve()), target)
        path.unlink(missing_ok=True)  # the snapshot's link, now dangling
        for sidecar in path.parent.glob(f"{path.name}.*.json"):
            sidecar.unlink(missing_ok=True)
        where = f"; moved to {target}, never measured"
    raise ModelError(f"{what}: {file.name} {why}: the download is corrupt or the repository changed{where}; "
                     "submit the sweep again to re-read the hub")


def _fetch_hub(source: ModelSource, models_dir: Path, progress: Progress | None, max_bytes: int | None) -> Path:
    from huggingface_hub import try_to_load_from_cache

    cache = hub_cache_dir()
    what = f"hf://{source.repo}@{source.revision[:12]}"
    paths: list[Path | None] = []
    for f in source.files:
        cached = try_to_load_from_cache(source.repo, f.name, revision=source.revision, cache_dir=str(cache))
        paths.append(Path(cached) if isinstance(cached, str) else None)
    missing = [f for f, p in zip(source.files, paths) if p is None]
    ledger = Ledger(models_dir / LEDGER)
    if missing:
        need = sum(f.size_bytes for f in missing)
        keep = {(source.repo, f.name, source.revision) for f in source.files}
        if max_bytes is not None:
            ledger.make_room(need, max_bytes, keep)
        cache.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(cache).free
        if free < need + DISK_MARGIN_BYTES:
            raise ModelError(f"{what}: not enough disk for the download: {need / 1e9:.1f} GB needed (+1 GB kept "
                             f"free), {free / 1e9:.1f} GB free under {cache}; free space, or set HF_HUB_CACHE "
                             "to a larger disk")
        with _Watcher(cache, source, progress):
            for i, f in enumerate(source.files):
                if paths[i] is None:
                    paths[i] = _download(source, f, cache, what)
                    ledger.add(source.repo, f.name, source.revision, paths[i], f.size_bytes, f.sha256)
    quarantine = models_dir / "quarantine"
    for f, p in zip(source.files, paths):
        _verify(p, f, what, quarantine)
        ledger.touch(source.repo, f.name, source.revision)
    return paths[0]


def _download(source: ModelSource, file: SourceFile, cache: Path, what: str) -> Path:
    from huggingface_hub import errors, hf_hub_download

    token = os.environ.get("HF_TOKEN") or None
    try:
        return Path(hf_hub_download(source.repo, file.name, revision=source.revision, cache_dir=str(cache),
                                    token=token, endpoint=os.environ.get("HF_ENDPOINT") or None))
    except errors.GatedRepoError as exc:
        raise ModelError(f"{what}: the repository is gated or private and this worker may not read it; accept "
                         "its terms on the hub and set HF_TOKEN on this worker") from exc
    except (errors.RepositoryNotFoundError, errors.RevisionNotFoundError, errors.RemoteEntryNotFoundError) as exc:
        status = getattr(getattr(exc, "response", None), "status_code", 0)
        if status in (401, 403):
            raise ModelError(f"{what}: the hub refused this worker ({status}); set HF_TOKEN on this worker to a "
                             "token that may read the repository") from exc
        raise ModelError(f"{what}: {file.name} is gone from the hub ({type(exc).__name__}); submit the sweep "
                         "again to re-read the repository") from exc
    except OSError as exc:
        if getattr(exc, "errno", None) == 28:  # ENOSPC
            raise ModelError(f"{what}: the disk filled up during the download of {file.name}; free space, or "
                             "set HF_HUB_CACHE to a larger disk") from exc
        raise ModelError(f"{what}: the download of {file.name} broke off ({type(exc).__name__}: "
                         f"{str(exc)[:160]}); it resumes on the next attempt", transient=True) from exc
    except Exception as exc:  # network errors of huggingface_hub's HTTP client
        raise ModelError(f"{what}: the download of {file.name} broke off ({type(exc).__name__}: "
                         f"{str(exc)[:160]}); it resumes on the next attempt", transient=True) from exc


class _Watcher:
    """Reports download progress from the sizes of the cache's partial files, once a second:
    the download itself runs inside huggingface_hub, which this need not know."""

    def __init__(self, cache: Path, source: ModelSource, progress: Progress | None, every_s: float = 1.0) -> None:
        self.progress, self.every_s = progress, every_s
        folder = cache / f"models--{source.repo.replace('/', '--')}" / "blobs"
        self.files = [(folder / f.sha256, folder / f"{f.sha256}.incomplete", f.size_bytes) for f in source.files]
        self.total = sum(size for *_, size in self.files)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="download-progress")

    def downloaded_bytes(self) -> int:
        n = 0
        for blob, partial, size in self.files:
            if blob.exists():
                n += size
            elif partial.exists():
                n += partial.stat().st_size
        return n

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self._report()

    def _report(self) -> None:
        try:
            self.progress(self.downloaded_bytes(), self.total)
        except Exception:  # a lost progress message must not break the download
            pass

    def __enter__(self) -> "_Watcher":
        if self.progress is not None:
            self._report()
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self._stop.set()
            self._thread.join(timeout=5)
            self._report()


def downloaded_models(models_dir: Path) -> list[str]:
    """sha256 of every model this project downloaded and still holds: each file's, and a whole
    split set's identity (farm.modelfiles.combined_sha256), which is what its jobs carry."""
    held = [e for e in Ledger(Path(models_dir) / LEDGER)._load() if e.get("sha256") and Path(e["path"]).exists()]
    found = [e["sha256"] for e in held]
    sets: dict[tuple, dict[int, str]] = {}
    for e in held:
        m = SPLIT_NAME.match(Path(e["name"]).name)
        if m is not None:
            sets.setdefault((e["repo"], e["revision"], m["stem"], int(m["count"])), {})[int(m["no"])] = e["sha256"]
    for (*_, count), parts in sets.items():
        if sorted(parts) == list(range(1, count + 1)):
            found.append(combined_sha256([parts[i] for i in range(1, count + 1)]))
    return found


class Ledger:
    """What this project downloaded into the shared cache, with when each was last used: the only
    files TOKENFARM_MODELS_MAX_GB may evict."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _load(self) -> list[dict]:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return []

    def _save(self, entries: list[dict]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(self.path.name + ".partial")
        partial.write_text(json.dumps(entries, indent=1))
        os.replace(partial, self.path)

    def add(self, repo: str, name: str, revision: str, path: Path, size_bytes: int, sha256: str) -> None:
        entries = [e for e in self._load() if (e["repo"], e["name"], e["revision"]) != (repo, name, revision)]
        entries.append({"repo": repo, "name": name, "revision": revision, "path": str(path), "sha256": sha256,
                        "blob": str(Path(path).resolve()), "size_bytes": size_bytes, "used_at": time.time()})
        self._save(entries)

    def touch(self, repo: str, name: str, revision: str) -> None:
        entries = self._load()
        for e in entries:
            if (e["repo"], e["name"], e["revision"]) == (repo, name, revision):
                e["used_at"] = time.time()
                self._save(entries)
                return

    def make_room(self, need_bytes: int, max_bytes: int, keep: set[tuple[str, str, str]]) -> list[str]:
        """Evict least-recently-used downloads until need_bytes more fit under max_bytes; returns
        what was evicted. Raises ModelError when the model alone is over the bound."""
        if need_bytes > max_bytes:
            raise ModelError(f"the model needs {need_bytes / 1e9:.1f} GB, above TOKENFARM_MODELS_MAX_GB "
                             f"({max_bytes / 1e9:.1f} GB); raise the bound for this worker")
        entries = sorted(self._load(), key=lambda e: e["used_at"])
        held = sum(e["size_bytes"] for e in entries)
        evicted = []
        for e in list(entries):
            if held + need_bytes <= max_bytes:
                break
            if (e["repo"], e["name"], e["revision"]) in keep:
                continue
            for p in (Path(e["blob"]), Path(e["path"])):
                p.unlink(missing_ok=True)
            for sidecar in Path(e["path"]).parent.glob(f"{Path(e['path']).name}.*.json"):
                sidecar.unlink(missing_ok=True)
            entries.remove(e)
            held -= e["size_bytes"]
            evicted.append(f"{e['repo']}/{e['name']}")
        self._save(entries)
        return evicted
