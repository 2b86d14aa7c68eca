"""Where a model lives, as a sweep names it: `hf://` repositories, the local Ollama store, folders.

Owns the grammar of model references (`hf://OWNER/REPO/FILE.gguf[@REV]`, `hf://OWNER/REPO:QUANT[@REV]`,
`ollama://NAME:TAG`), the rule that picks a repository's file for a quant tag (as `llama-server -hf`
does), split GGUFs (`…-00001-of-00003.gguf` are one model), the identity of a split model, and reading
the Ollama store's manifests. It never talks to a network (orchestrator/hub.py reads a hub, the worker
fetches) and imports neither side.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from farm.identity import is_sha256
from farm.modelfiles import SPLIT_NAME, ModelError, split_names

HF_SCHEME = "hf://"
OLLAMA_SCHEME = "ollama://"
# llama-server -hf picks Q4_K_M when no tag is given; so do we.
DEFAULT_QUANT_TAG = "Q4_K_M"
_REPO_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,199}$")
_QUANT_TAG = re.compile(r"^[A-Za-z0-9_.-]{1,40}$")


@dataclass(frozen=True)
class HubRef:
    """`hf://OWNER/REPO/FILE.gguf@REV` (filename given) or `hf://OWNER/REPO:QUANT@REV` (quant tag)."""

    repo: str
    filename: str | None = None
    quant_tag: str | None = None
    revision: str | None = None

    def canonical(self, filename: str, commit: str) -> str:
        """The reference jobs carry: one file (a split model's first part), pinned to a commit."""
        return f"{HF_SCHEME}{self.repo}/{filename}@{commit}"


@dataclass(frozen=True)
class OllamaRef:
    """`ollama://NAME:TAG`; NAME may carry a namespace (`user/name`) or a registry host."""

    name: str
    tag: str

    def __str__(self) -> str:
        return f"{OLLAMA_SCHEME}{self.name}:{self.tag}"


def is_remote(ref: str) -> bool:
    return ref.startswith((HF_SCHEME, OLLAMA_SCHEME))


def parse_ref(ref: str) -> HubRef | OllamaRef | None:
    """The source a reference names; None for a catalogue name, a derived name or a path.

    Raises ModelError with the expected form when a `hf://` or `ollama://` reference is malformed.
    """
    if ref.startswith(HF_SCHEME):
        return _parse_hub(ref)
    if ref.startswith(OLLAMA_SCHEME):
        return _parse_ollama(ref)
    return None


def _parse_hub(ref: str) -> HubRef:
    form = "use hf://OWNER/REPO/FILE.gguf[@REVISION] or hf://OWNER/REPO:QUANT[@REVISION]"
    body = ref[len(HF_SCHEME):]
    revision = None
    if "@" in body:
        body, revision = body.rsplit("@", 1)
        if not _REVISION.match(revision):
            raise ModelError(f"model {ref!r}: revision {revision!r} is not a branch, tag or commit; {form}")
    parts = body.split("/")
    if len(parts) < 2:
        raise ModelError(f"model {ref!r} names no repository; {form}")
    owner, name = parts[0], parts[1]
    quant_tag = None
    if len(parts) == 2 and ":" in name:
        name, quant_tag = name.split(":", 1)
        if not _QUANT_TAG.match(quant_tag):
            raise ModelError(f"model {ref!r}: {quant_tag!r} is not a quant tag such as Q4_K_M; {form}")
    for part in (owner, name):
        if not _REPO_PART.match(part):
            raise ModelError(f"model {ref!r}: {part!r} is not a valid repository owner or name; {form}")
    filename = "/".join(parts[2:]) or None
    if filename is not None:
        if not filename.endswith(".gguf") or any(p in ("", ".", "..") for p in parts[2:]):
            raise ModelError(f"model {ref!r}: {filename!r} is not a .gguf file in the repository; {form}")
    return HubRef(f"{owner}/{name}", filename, quant_tag, revision)


def _parse_ollama(ref: str) -> OllamaRef:
    body = ref[len(OLLAMA_SCHEME):]
    name, _, tag = body.rpartition(":") if ":" in body.split("/")[-1] else (body, "", "latest")
    if not name or not re.match(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,199}$", name) or ".." in name \
            or not re.match(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$", tag):
        raise ModelError(f"model {ref!r} is not an Ollama model name; use ollama://NAME:TAG, e.g. ollama://qwen3:8b")
    return OllamaRef(name, tag)


def split_parts(filename: str, all_files: list[str]) -> list[str]:
    """Every part of the split model `filename` belongs to, in order ([filename] if it is not split).

    Raises ModelError when a part is missing, so a partial set is never planned or fetched.
    """
    folder, _, base = filename.rpartition("/")
    parts = [f"{folder}/{n}" if folder else n for n in split_names(base)]
    missing = [p for p in parts if p not in all_files]
    if missing:
        raise ModelError(f"split model {filename}: part {missing[0]} is missing from the repository; "
                         "name a complete model")
    return parts


def pick_quant_files(filenames: list[str], quant_tag: str) -> list[str]:
    """The repository's files for a quant tag: a GGUF whose name carries the tag (case-insensitive,
    at a word boundary so Q4_K does not take Q4_K_M), a whole file before a split one, the first
    split part standing for its model. [] when none carries it. Projector files (mmproj) are never
    the model."""
    tag = quant_tag.lower()
    pattern = re.compile(rf"(^|[^a-z0-9]){re.escape(tag)}([^a-z0-9_]|$)")
    candidates = []
    for f in sorted(filenames):
        base = f.rsplit("/", 1)[-1].lower()
        if not base.endswith(".gguf") or "mmproj" in base:
            continue
        if not pattern.search(base.removesuffix(".gguf")):
            continue
        m = SPLIT_NAME.match(f.rsplit("/", 1)[-1])
        if m is not None and int(m["no"]) != 1:
            continue
        candidates.append(f)
    candidates.sort(key=lambda f: (SPLIT_NAME.match(f.rsplit("/", 1)[-1]) is not None, f.count("/"), f))
    return split_parts(candidates[0], filenames) if candidates else []


def quant_tags(filenames: list[str]) -> list[str]:
    """The quant tags a repository offers, for the message when the asked one is absent."""
    found = set()
    for f in filenames:
        base = f.rsplit("/", 1)[-1]
        if not base.endswith(".gguf") or "mmproj" in base.lower():
            continue
        m = re.search(r"(?i)(?:^|[-_.])((?:IQ|Q)\d[A-Z0-9_]*|BF16|F16|F32|MXFP4(?:_MOE)?)(?:[-.]|$)",
                      SPLIT_NAME.sub(r"\g<stem>.gguf", base).removesuffix(".gguf"))
        if m:
            found.add(m.group(1).upper())
    return sorted(found)


def hub_cache_dir() -> Path:
    """The Hugging Face cache, read from the environment now (huggingface_hub reads it once, at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = Path(os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface")
    return home.expanduser() / "hub"


# --- the Ollama store -------------------------------------------------------------------------

OLLAMA_MODEL_MEDIA = "application/vnd.ollama.image.model"
OLLAMA_REGISTRY = "registry.ollama.ai"


def ollama_store() -> Path:
    """Where Ollama keeps models: $OLLAMA_MODELS, else ~/.ollama/models."""
    return Path(os.environ.get("OLLAMA_MODELS") or Path.home() / ".ollama" / "models").expanduser()


def _manifest_path(ref: OllamaRef, store: Path) -> Path:
    parts = ref.name.split("/")
    if len(parts) == 1:
        parts = [OLLAMA_REGISTRY, "library", *parts]
    elif "." not in parts[0] and ":" not in parts[0]:
        parts = [OLLAMA_REGISTRY, *parts]
    return store / "manifests" / Path(*parts) / ref.tag


@dataclass(frozen=True)
class OllamaModel:
    ref: OllamaRef
    blob: Path
    sha256: str
    size_bytes: int


def ollama_model(ref: OllamaRef, store: Path | None = None) -> OllamaModel:
    """The GGUF blob a pulled model's manifest names (its digest is the blob's sha256).

    Reads the store only; Ollama itself is never run. Raises ModelError naming `ollama pull` when
    the model is not in the store.
    """
    store = store or ollama_store()
    path = _manifest_path(ref, store)
    if not path.is_file():
        where = f"the Ollama store at {store}" if store.is_dir() else f"{store} (no Ollama store there; set OLLAMA_MODELS)"
        raise ModelError(f"model {ref} is not pulled into {where}; run `ollama pull {ref.name}:{ref.tag}`")
    try:
        manifest = json.loads(path.read_text())
        layer = next(la for la in manifest["layers"] if la.get("mediaType") == OLLAMA_MODEL_MEDIA)
        digest, size = str(layer["digest"]), int(layer["size"])
    except (OSError, ValueError, KeyError, TypeError, StopIteration) as exc:
        raise ModelError(f"model {ref}: its manifest {path} names no model layer ({exc!r}); "
                         f"run `ollama pull {ref.name}:{ref.tag}` again") from exc
    algo, _, hexdigest = digest.partition(":")
    if algo != "sha256" or not is_sha256(hexdigest) or set(hexdigest) == {"0"}:
        raise ModelError(f"model {ref}: its manifest's digest {digest!r} is not a sha256")
    blob = store / "blobs" / f"sha256-{hexdigest}"
    if not blob.is_file():
        raise ModelError(f"model {ref}: its blob {blob} is missing from the store; run `ollama pull {ref.name}:{ref.tag}`")
    if blob.stat().st_size != size:
        raise ModelError(f"model {ref}: blob {blob} holds {blob.stat().st_size} bytes, its manifest says {size}; "
                         f"run `ollama pull {ref.name}:{ref.tag}` again")
    return OllamaModel(ref, blob, hexdigest, size)


def ollama_models(store: Path | None = None) -> list[OllamaModel]:
    """Every model pulled into the store whose manifest names a GGUF layer."""
    store = store or ollama_store()
    root = store / "manifests"
    found = []
    if not root.is_dir():
        return found
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).parts
        if len(rel) < 3:
            continue
        host, *name_parts, tag = rel
        if host == OLLAMA_REGISTRY and name_parts[:1] == ["library"]:
            name_parts = name_parts[1:]
        elif host == OLLAMA_REGISTRY:
            pass
        else:
            name_parts = [host, *name_parts]
        try:
            found.append(ollama_model(OllamaRef("/".join(name_parts), tag), store))
        except ModelError:
            continue
    return found
