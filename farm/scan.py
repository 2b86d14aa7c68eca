"""The GGUF models already on this box, wherever home-lab tools keep them.

Owns finding them: the Ollama store (manifests name blobs by digest), LM Studio's models folder,
the Hugging Face cache (snapshots link to blobs named by sha256), and any folder given. Each comes
with the reference a sweep uses for it (`ollama://NAME:TAG`, `hf://OWNER/REPO/FILE@COMMIT`, or its
path), its header facts and its sha256 — taken from the store's own digest where it has one, else
hashed once and remembered beside the file. Never writes into another tool's store; never downloads.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from farm.modelfiles import (
    SPLIT_NAME,
    ModelError,
    combined_sha256,
    model_sha256,
    read_facts,
    read_parts_facts,
    split_set,
)
from farm.sources import hub_cache_dir, ollama_models, ollama_store


@dataclass(frozen=True)
class Found:
    ref: str  # what a sweep names it by
    where: str  # "ollama", "lmstudio", "hf-cache" or "folder"
    path: Path
    facts: object  # farm.contract.ModelFacts
    sha256: str
    size_bytes: int


def lmstudio_dirs() -> list[Path]:
    """LM Studio's models folders: $LMSTUDIO_MODELS, ~/.lmstudio/models, and the pre-0.3 location."""
    dirs = [Path(os.environ["LMSTUDIO_MODELS"])] if os.environ.get("LMSTUDIO_MODELS") else []
    return [*dirs, Path.home() / ".lmstudio" / "models", Path.home() / ".cache" / "lm-studio" / "models"]


def scan(folders: list[Path] | None = None, defaults: bool = True) -> tuple[list[Found], list[str]]:
    """(models found, one line per file that could not be read). `defaults`: also look in the
    Ollama store, LM Studio's folders and the Hugging Face cache."""
    found: list[Found] = []
    problems: list[str] = []
    seen: set[Path] = set()
    if defaults:
        for m in ollama_models(ollama_store()):
            seen.add(m.blob.resolve())
            try:
                facts = read_parts_facts([m.blob])  # not remembered: nothing is written into Ollama's store
            except ModelError as exc:
                problems.append(f"{m.ref}: {exc}")
                continue
            found.append(Found(str(m.ref), "ollama", m.blob, facts, m.sha256, m.size_bytes))
        found += _hub_cache(hub_cache_dir(), seen, problems)
        for d in lmstudio_dirs():
            found += _folder(d, "lmstudio", seen, problems)
    for d in folders or []:
        found += _folder(Path(d).expanduser(), "folder", seen, problems)
    return found, problems


def _first_parts(paths: list[Path]) -> list[Path]:
    """GGUF files that stand for a model: a whole file, or a split set's first part."""
    keep = []
    for p in paths:
        m = SPLIT_NAME.match(p.name)
        if m is None or int(m["no"]) == 1:
            keep.append(p)
    return keep


def _hub_cache(cache: Path, seen: set[Path], problems: list[str]) -> list[Found]:
    found = []
    if not cache.is_dir():
        return found
    for repo_dir in sorted(cache.glob("models--*--*")):
        repo = repo_dir.name.removeprefix("models--").replace("--", "/", 1)
        for snap in sorted((repo_dir / "snapshots").glob("*")):
            for path in _first_parts(sorted(snap.rglob("*.gguf"))):
                if not path.exists():
                    continue  # a link whose blob is gone (or still downloading)
                name = path.relative_to(snap).as_posix()
                try:
                    parts = split_set(path)
                    facts = read_parts_facts(parts)  # not remembered: nothing is written into the cache
                except ModelError as exc:
                    problems.append(f"hf://{repo}/{name}: {exc}")
                    continue
                for p in parts:
                    seen.add(p.resolve())
                # An LFS file's blob is named by its sha256: nothing to hash.
                shas = [p.resolve().name for p in parts]
                sha = combined_sha256(shas) if all(len(s) == 64 for s in shas) else model_sha256(path)
                found.append(Found(f"hf://{repo}/{name}@{snap.name}", "hf-cache", path, facts, sha,
                                   sum(p.stat().st_size for p in parts)))
    return found


def _folder(folder: Path, where: str, seen: set[Path], problems: list[str]) -> list[Found]:
    found = []
    if not folder.is_dir():
        return found
    for path in _first_parts(sorted(folder.rglob("*.gguf"))):
        if path.resolve() in seen or not path.is_file():
            continue
        try:
            parts = split_set(path)
            facts = read_facts(path)
            sha = model_sha256(path)
        except (ModelError, OSError) as exc:
            problems.append(f"{path}: {exc}")
            continue
        for p in parts:
            seen.add(p.resolve())
        found.append(Found(str(path), where, path, facts, sha, sum(p.stat().st_size for p in parts)))
    return found
