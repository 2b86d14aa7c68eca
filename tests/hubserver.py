"""A Hugging Face hub on 127.0.0.1 for tests: the API and file routes `huggingface_hub` calls,
serving the project's own small models.

Routes: `GET /api/models/OWNER/REPO[/revision/REV]` (model info with `siblings`, their sizes and
LFS sha256 when `blobs=true`), `HEAD|GET /OWNER/REPO/resolve/REV/FILE` (with `Range`, answering
206). Errors carry the hub's `X-Error-Code` headers (RepoNotFound, RevisionNotFound,
EntryNotFound, GatedRepo) so `huggingface_hub` raises its own exceptions. Faults a test can ask
for: a file whose bytes differ from its advertised sha256 (the test gives the bytes), a download
cut off after N bytes (once), a gated repository that wants a token. Every byte sent is counted
per file, so a test can say how much of a file planning read.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class HubFile:
    path: Path  # the bytes served
    sha256: str = ""  # advertised; default: the bytes' own
    cut_after_bytes: int | None = None  # the first full download stops here, the connection dropped

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        self.sha256 = self.sha256 or sha256_of(self.path)

    @property
    def size_bytes(self) -> int:
        return self.path.stat().st_size


@dataclass
class HubRepo:
    commits: dict[str, dict[str, HubFile]]  # commit -> filename -> file
    refs: dict[str, str] = field(default_factory=dict)  # branch or tag -> commit ("main" included)
    token: str | None = None  # gated: only this bearer token may read

    def commit_of(self, revision: str) -> str | None:
        if revision in self.commits:
            return revision
        return self.refs.get(revision)


class LoopbackHub:
    """`with LoopbackHub(repos) as hub:` serves on hub.url until the block ends."""

    def __init__(self, repos: dict[str, HubRepo]) -> None:
        self.repos = repos
        self.bytes_sent: Counter[str] = Counter()  # "OWNER/REPO/FILE" -> bytes of file data sent
        self.ranges: list[tuple[str, str]] = []  # (file, Range header) of every file GET
        self._lock = threading.Lock()
        self._cut_done: set[str] = set()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> "LoopbackHub":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _error(self, status: int, code: str, message: str) -> None:
                body = json.dumps({"error": message}).encode()
                self.send_response(status)
                self.send_header("X-Error-Code", code)
                self.send_header("X-Error-Message", message)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _repo(self, repo_id: str) -> HubRepo | None:
                repo = hub.repos.get(repo_id)
                if repo is None:
                    self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
                    return None
                if repo.token is not None and self.headers.get("Authorization") != f"Bearer {repo.token}":
                    self._error(401, "GatedRepo", f"Access to model {repo_id} is restricted")
                    return None
                return repo

            def do_HEAD(self) -> None:
                self._serve()

            def do_GET(self) -> None:
                self._serve()

            def _serve(self) -> None:
                path = self.path.split("?", 1)[0]
                m = re.match(r"^/api/models/([^/]+/[^/]+)(?:/revision/(.+))?$", path)
                if m:
                    return self._info(m[1], m[2] or "main")
                m = re.match(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path)
                if m:
                    return self._file(m[1], m[2], m[3])
                self._error(404, "EntryNotFound", f"no route {path}")

            def _commit(self, repo_id: str, revision: str) -> tuple[HubRepo, str] | None:
                """The repo and the commit a revision names, or None with the hub's error sent."""
                from urllib.parse import unquote

                repo = self._repo(repo_id)
                if repo is None:
                    return None
                commit = repo.commit_of(unquote(revision))
                if commit is None:
                    self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
                    return None
                return repo, commit

            def _info(self, repo_id: str, revision: str) -> None:
                found = self._commit(repo_id, revision)
                if found is None:
                    return
                repo, commit = found
                siblings = [{"rfilename": name, "size": f.size_bytes, "blobId": f.sha256[:40],
                             "lfs": {"sha256": f.sha256, "size": f.size_bytes, "pointerSize": 134}}
                            for name, f in sorted(repo.commits[commit].items())]
                body = json.dumps({"id": repo_id, "modelId": repo_id, "sha": commit, "private": False,
                                   "gated": repo.token is not None, "siblings": siblings}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _file(self, repo_id: str, revision: str, filename: str) -> None:
                from urllib.parse import unquote

                found = self._commit(repo_id, revision)
                if found is None:
                    return
                repo, commit = found
                file = repo.commits[commit].get(unquote(filename))
                if file is None:
                    return self._error(404, "EntryNotFound", f"{filename} does not exist at {commit}")
                size = file.size_bytes
                start, end = 0, size - 1
                asked = self.headers.get("Range")
                if asked:
                    r = re.match(r"bytes=(\d+)-(\d*)$", asked)
                    if not r or int(r[1]) >= size:
                        return self._error(416, "RangeNotSatisfiable", f"bad range {asked}")
                    start, end = int(r[1]), min(size - 1, int(r[2])) if r[2] else size - 1
                self.send_response(206 if asked else 200)
                self.send_header("X-Repo-Commit", commit)
                self.send_header("ETag", f'"{file.sha256}"')
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(end - start + 1))
                if asked:
                    self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
                self.end_headers()
                if self.command == "HEAD":
                    return
                key = f"{repo_id}/{unquote(filename)}"
                with hub._lock:
                    hub.ranges.append((key, asked or ""))
                    cut = file.cut_after_bytes if file.cut_after_bytes is not None and key not in hub._cut_done \
                        and start < file.cut_after_bytes <= end else None
                    if cut is not None:
                        hub._cut_done.add(key)
                stop = end + 1 if cut is None else cut
                with file.path.open("rb") as f:
                    f.seek(start)
                    pos = start
                    while pos < stop:
                        block = f.read(min(1 << 20, stop - pos))
                        if not block:
                            break
                        try:
                            self.wfile.write(block)
                        except OSError:
                            break
                        pos += len(block)
                        with hub._lock:
                            hub.bytes_sent[key] += len(block)
                if cut is not None:
                    self.close_connection = True
                    try:
                        self.wfile.flush()
                        self.connection.shutdown(2)
                    except OSError:
                        pass

        return Handler
