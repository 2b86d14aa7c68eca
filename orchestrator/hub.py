"""Planning a hub model without downloading it: resolve `hf://` to files and read their headers.

Owns the orchestrator's side of a Hugging Face repository: the commit a revision names, the file(s)
a quant tag picks, each file's size and sha256 as the hub advertises them (the LFS oid), and the
GGUF header read by HTTP range requests — a few MB of a file that may hold 20 GB — into a sparse
copy that farm/modelfiles.py parses as if it were the file. Talks to the hub only through
`huggingface_hub` (HF_ENDPOINT and HF_TOKEN respected). Knows nothing of workers, queues or SQL;
the worker fetches the files itself (worker/fetch.py).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from farm.contract import ModelFacts, ModelSource, SourceFile
from farm.modelfiles import ModelError, combined_sha256, gguf_header_extent, read_parts_facts
from farm.sources import DEFAULT_QUANT_TAG, HubRef, pick_quant_files, quant_tags, split_parts

# The first read; a header that runs past it (a 262k-token vocabulary takes several MB) is read on
# in growing steps up to the cap, where a header that still has not ended is refused.
FIRST_READ_BYTES = 256 << 10
MAX_HEADER_BYTES = 256 << 20


@dataclass(frozen=True)
class HubModel:
    ref: str  # canonical: hf://OWNER/REPO/FIRST_FILE@COMMIT
    source: ModelSource
    sha256: str
    facts: ModelFacts
    n_header_bytes_read: int


def _endpoint() -> str | None:
    # huggingface_hub reads HF_ENDPOINT once, at import; read it per call so a process that sets
    # it later (tests, a CLI flag) is heard.
    return os.environ.get("HF_ENDPOINT") or None


def _hub_error(ref: str, exc: Exception) -> ModelError:
    from huggingface_hub import errors

    if isinstance(exc, errors.GatedRepoError) or getattr(getattr(exc, "response", None), "status_code", 0) in (401, 403):
        return ModelError(f"model {ref}: the repository is gated or private; accept its terms on the hub and set "
                          "HF_TOKEN to a token that may read it")
    if isinstance(exc, errors.RevisionNotFoundError):
        return ModelError(f"model {ref}: no such revision in the repository; name a branch, tag or commit it has")
    if isinstance(exc, errors.RemoteEntryNotFoundError):
        return ModelError(f"model {ref}: no such file in the repository; list its files on the hub")
    if isinstance(exc, errors.RepositoryNotFoundError):
        return ModelError(f"model {ref}: no such repository on {_endpoint() or 'huggingface.co'}; check OWNER/REPO")
    if isinstance(exc, errors.HfHubHTTPError):
        return ModelError(f"model {ref}: the hub answered {str(exc).splitlines()[0][:200]}; try again later",
                          transient=True)
    return ModelError(f"model {ref}: cannot reach the hub at {_endpoint() or 'huggingface.co'} "
                      f"({type(exc).__name__}: {str(exc)[:160]}); check the network or HF_ENDPOINT", transient=True)


def resolve(ref_text: str, ref: HubRef, token: str | None = None) -> HubModel:
    """The model a `hf://` reference names, pinned to a commit, with its header's facts.

    Raises ModelError (one line, naming the fix) for an unknown repository, revision, file or quant
    tag, a gated repository, a file that is not GGUF or a header that claims more than the file holds.
    """
    from huggingface_hub import HfApi

    token = token or os.environ.get("HF_TOKEN") or None
    api = HfApi(endpoint=_endpoint(), token=token)
    try:
        info = api.model_info(ref.repo, revision=ref.revision, files_metadata=True)
    except Exception as exc:
        raise _hub_error(ref_text, exc) from exc
    siblings = {s.rfilename: s for s in info.siblings or []}
    names = sorted(siblings)
    if ref.filename is not None:
        if ref.filename not in siblings:
            ggufs = [n for n in names if n.endswith(".gguf")][:8]
            raise ModelError(f"model {ref_text}: the repository has no file {ref.filename!r}; its GGUF files include "
                             f"{', '.join(ggufs) or 'none'}")
        parts = split_parts(ref.filename, names)
    else:
        tag = ref.quant_tag or DEFAULT_QUANT_TAG
        parts = pick_quant_files(names, tag)
        if not parts:
            raise ModelError(f"model {ref_text}: the repository has no GGUF file for quant {tag}; it offers "
                             f"{', '.join(quant_tags(names)) or 'no GGUF files'}")
    files = []
    for name in parts:
        sib = siblings[name]
        lfs = sib.lfs
        sha = getattr(lfs, "sha256", None) if lfs is not None else None
        size = getattr(lfs, "size", None) if lfs is not None else sib.size
        if not sha or size is None:
            raise ModelError(f"model {ref_text}: the hub advertises no sha256 for {name} (not stored with LFS); "
                             "the farm measures only files it can verify")
        files.append(SourceFile(name=name, size_bytes=int(size), sha256=sha))
    commit = info.sha or ref.revision or "main"
    source = ModelSource(kind="hf", repo=ref.repo, revision=commit, files=files)
    facts, n_read = read_remote_facts(ref_text, source, token)
    return HubModel(ref.canonical(parts[0], commit), source, combined_sha256([f.sha256 for f in files]), facts, n_read)


def read_remote_facts(ref_text: str, source: ModelSource, token: str | None = None) -> tuple[ModelFacts, int]:
    """The facts of a hub model from its files' headers alone: (facts, bytes read)."""
    with tempfile.TemporaryDirectory(prefix="tokenfarm-header-") as tmp:
        paths, n_read = [], 0
        for f in source.files:
            path = Path(tmp) / f.name.replace("/", "__")
            n_read += _read_header(ref_text, source, f, path, token)
            paths.append(path)
        facts = read_parts_facts(paths, sizes=[f.size_bytes for f in source.files])
    return facts.model_copy(update={"size_bytes": source.size_bytes}), n_read


def _read_header(ref_text: str, source: ModelSource, file: SourceFile, path: Path, token: str | None) -> int:
    """Range-read the start of `file` into a sparse copy of its full size at `path`, reading on
    (doubling) until the GGUF header ends inside what was read; returns the bytes read."""
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    url = hf_hub_url(source.repo, file.name, revision=source.revision, endpoint=_endpoint())
    headers = build_hf_headers(token=token)
    buf = bytearray()
    want = min(FIRST_READ_BYTES, file.size_bytes)
    while True:
        try:
            response = get_session().get(url, headers={**headers, "Range": f"bytes={len(buf)}-{want - 1}"},
                                         follow_redirects=True, timeout=60)
            hf_raise_for_status(response)
        except Exception as exc:
            raise _hub_error(ref_text, exc) from exc
        body = response.content
        if response.status_code == 200:
            body = body[len(buf):want]  # a server that ignores Range sends the whole file: keep the asked part
        if not body:
            raise ModelError(f"model {ref_text}: {file.name} ended after {len(buf)} of its advertised "
                             f"{file.size_bytes} bytes; the hub's copy is broken")
        buf += body
        try:
            extent = gguf_header_extent(buf)
        except ModelError as exc:
            raise ModelError(f"model {ref_text}: {file.name}: {exc}; name a .gguf file of the repository") from exc
        if extent is not None and extent <= len(buf):
            break
        if len(buf) >= file.size_bytes or len(buf) >= MAX_HEADER_BYTES:
            raise ModelError(f"model {ref_text}: {file.name}'s GGUF header does not end within {len(buf)} bytes "
                             "of the file; it is corrupt or truncated")
        want = min(file.size_bytes, MAX_HEADER_BYTES, extent if extent is not None else 2 * len(buf))
    with path.open("wb") as out:
        out.write(buf)
        out.truncate(file.size_bytes)  # sparse: the tensor data is never read, and takes no disk
    return len(buf)
