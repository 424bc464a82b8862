"""A local HTTP server that answers enough of the Hugging Face hub API for ``snapshot_download``.

Hugging Face cannot be reached from the test machines, and the fetch step must still be tested
through the real client (``huggingface_hub`` honours ``HF_ENDPOINT``/``endpoint=``). This server
implements what the client calls, as the hub does it:

* ``GET /api/models/{repo}/revision/{rev}[?blobs=true]``: model info with ``sha`` and ``siblings``
  (size and, for LFS files, ``lfs.sha256``);
* ``GET /api/models/{repo}/tree/{rev}?recursive=...``: the file listing ``snapshot_download`` uses;
* ``HEAD``/``GET /{repo}/resolve/{rev}/{path}``: ``X-Repo-Commit``, ``ETag`` (the sha256 for LFS
  files, the git blob id otherwise, as the hub does), ``Content-Length``, and ``Range`` requests
  answered with ``206``;
* unknown repositories and revisions answer 404 with ``X-Error-Code: RepoNotFound`` /
  ``RevisionNotFound``, the headers the client turns into its typed errors.

Failure injection: ``fail(path, after_bytes, times)`` makes the next ``times`` downloads of
``path`` send full headers, then ``after_bytes`` bytes of the body, then drop the connection, a
network failure half-way through a file. ``corrupt(path)`` serves different bytes than the
listed sha256. Every request is recorded (method, path, Range, Authorization) for assertions.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import json
import re
import threading
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

LFS_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt")
_CHUNK = 1 << 20


@dataclasses.dataclass
class HubFile:
    path: Path
    size: int
    sha256: str
    git_oid: str
    lfs: bool


@dataclasses.dataclass
class HubRepo:
    """One repository with one commit; ``branches`` maps names (``main``) to that commit."""

    files: dict[str, HubFile]
    commit: str
    branches: tuple[str, ...] = ("main",)
    token: str | None = None
    """When set, requests must carry ``Authorization: Bearer <token>`` (a private repo)."""
    echo_authorization: bool = False
    """Answer every file download with 400 and an error that quotes the request's
    ``Authorization`` header, as some proxies and mirrors do: a token must not reach a user from it."""
    extra_names: tuple[str, ...] = ()
    """File names listed in the model info with no content behind them: names a hostile hub may
    send (``../../etc/x``, ``/abs``), which a client must refuse before it writes anything."""


@dataclasses.dataclass(frozen=True)
class Request:
    method: str
    path: str
    range: str | None
    authorization: str | None


def _describe(path: Path) -> HubFile:
    h = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
            size += len(block)
    git = hashlib.sha1(f"blob {size}\0".encode())
    with path.open("rb") as f:
        while block := f.read(_CHUNK):
            git.update(block)
    return HubFile(path, size, h.hexdigest(), git.hexdigest(), path.name.endswith(LFS_SUFFIXES))


class FakeHub:
    """Start with ``with FakeHub() as hub:``; ``hub.url`` is the endpoint.

    ``host`` is loopback unless pods in their own network namespaces must reach it (the real
    node's pods: its address, ``realnode.NODE_IP``, which exists only on this machine).
    """

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.repos: dict[str, HubRepo] = {}
        self.requests: list[Request] = []
        self._failures: dict[str, list[int]] = {}
        self._corrupt: set[str] = set()
        self._outages: dict[str, int] = {}
        self._lock = threading.Lock()
        self._server = http.server.ThreadingHTTPServer((host, 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    # ------------------------------------------------------------ setup

    def add_repo(
        self,
        repo_id: str,
        folder: Path,
        *,
        token: str | None = None,
        branches: tuple[str, ...] = ("main",),
        echo_authorization: bool = False,
        extra_names: tuple[str, ...] = (),
    ) -> HubRepo:
        """Serve every file under ``folder`` (recursively) as ``repo_id``."""
        files = {
            p.relative_to(folder).as_posix(): _describe(p)
            for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.relative_to(folder).as_posix().startswith(".")
        }
        commit = hashlib.sha1(json.dumps({k: v.sha256 for k, v in files.items()}).encode()).hexdigest()
        repo = HubRepo(files, commit, branches, token, echo_authorization, extra_names)
        self.repos[repo_id] = repo
        return repo

    def fail(self, path: str, after_bytes: int, times: int = 1) -> None:
        """Drop the connection after ``after_bytes`` body bytes on the next ``times`` GETs of ``path``."""
        with self._lock:
            self._failures[path] = [after_bytes] * times

    def corrupt(self, path: str, on: bool = True) -> None:
        """Serve flipped bytes for ``path`` (same size, wrong sha256), or stop doing so."""
        if on:
            self._corrupt.add(path)
        else:
            self._corrupt.discard(path)

    def outage(self, path: str, times: int = 1) -> None:
        """Answer the next ``times`` GETs of ``path`` with 503, as an overloaded hub does (after any
        pending ``fail`` cuts have happened)."""
        with self._lock:
            self._outages[path] = times

    # ------------------------------------------------------------ serving

    def _take_outage(self, path: str) -> bool:
        with self._lock:
            if self._outages.get(path, 0) > 0:
                self._outages[path] -= 1
                return True
        return False

    def _take_failure(self, path: str) -> int | None:
        with self._lock:
            queue = self._failures.get(path)
            if queue:
                return queue.pop(0)
        return None

    def _handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # quiet test output
                pass

            def _record(self) -> None:
                hub.requests.append(
                    Request(
                        self.command,
                        urllib.parse.urlsplit(self.path).path,
                        self.headers.get("Range"),
                        self.headers.get("Authorization"),
                    )
                )

            def do_HEAD(self) -> None:
                self._record()
                self._route(body=False)

            def do_GET(self) -> None:
                self._record()
                self._route(body=True)

            # -------------------------------------------------- helpers

            def _send_json(self, data: Any, status: int = 200) -> None:
                blob = json.dumps(data).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(blob)))
                self.end_headers()
                self.wfile.write(blob)

            def _error(self, status: int, code: str | None, message: str) -> None:
                blob = json.dumps({"error": message}).encode()
                self.send_response(status)
                if code:
                    self.send_header("X-Error-Code", code)
                self.send_header("X-Error-Message", message)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(blob)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(blob)

            def _repo(self, repo_id: str, revision: str) -> HubRepo | None:
                repo = hub.repos.get(repo_id)
                if repo is None or (repo.token and self.headers.get("Authorization") != f"Bearer {repo.token}"):
                    self._error(404, "RepoNotFound", "Repository not found")
                    return None
                if revision not in (*repo.branches, repo.commit):
                    self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
                    return None
                return repo

            def _route(self, *, body: bool) -> None:
                path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
                m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/revision/(.+)", path)
                if m:
                    return self._info(m[1], m[2])
                m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?", path)
                if m:
                    return self._tree(m[1], m[2])
                m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
                if m:
                    return self._resolve(m[1], m[2], m[3], body=body)
                self._error(404, None, f"no route for {path}")
                return None

            def _info(self, repo_id: str, revision: str) -> None:
                repo = self._repo(repo_id, revision)
                if repo is None:
                    return
                siblings: list[dict[str, Any]] = [
                    {"rfilename": n, "size": 1, "blobId": "0" * 40} for n in repo.extra_names
                ]
                for name, f in repo.files.items():
                    entry: dict[str, Any] = {"rfilename": name, "size": f.size, "blobId": f.git_oid}
                    if f.lfs:
                        entry["lfs"] = {"size": f.size, "sha256": f.sha256, "pointerSize": 134}
                    siblings.append(entry)
                self._send_json(
                    {
                        "id": repo_id,
                        "modelId": repo_id,
                        "sha": repo.commit,
                        "private": bool(repo.token),
                        "siblings": siblings,
                        "tags": [],
                        "downloads": 0,
                        "likes": 0,
                    }
                )

            def _tree(self, repo_id: str, revision: str) -> None:
                repo = self._repo(repo_id, revision)
                if repo is None:
                    return
                entries = []
                for name, f in repo.files.items():
                    entry: dict[str, Any] = {"type": "file", "path": name, "size": f.size, "oid": f.git_oid}
                    if f.lfs:
                        entry["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": 134}
                    entries.append(entry)
                self._send_json(entries)

            def _no_file(self, repo: HubRepo, repo_id: str, name: str) -> None:
                if repo.echo_authorization:
                    seen = self.headers.get("Authorization", "")
                    self._error(400, None, f"bad request: cannot use credentials 'Authorization: {seen}'")
                else:
                    self._error(404, "EntryNotFound", f"{name} does not exist in {repo_id}")

            def _resolve(self, repo_id: str, revision: str, name: str, *, body: bool) -> None:
                repo = self._repo(repo_id, revision)
                if repo is None:
                    return
                f = repo.files.get(name)
                if f is None or repo.echo_authorization:
                    self._no_file(repo, repo_id, name)
                    return
                if body and not hub._failures.get(name) and hub._take_outage(name):
                    self._error(503, None, "Service Unavailable")
                    return
                start = 0
                rng = self.headers.get("Range")
                if rng:
                    m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())
                    if m is None or int(m[1]) >= f.size:
                        self._error(416, None, f"bad range {rng}")
                        return
                    start = int(m[1])
                length = f.size - start
                self.send_response(206 if start else 200)
                self.send_header("X-Repo-Commit", repo.commit)
                self.send_header("ETag", f'"{f.sha256 if f.lfs else f.git_oid}"')
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(length))
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{f.size - 1}/{f.size}")
                self.end_headers()
                if not body:
                    return
                cut = hub._take_failure(name)
                sent = 0
                for block in _read(f.path, start, name in hub._corrupt):
                    if cut is not None and sent + len(block) >= cut:
                        self.wfile.write(block[: max(cut - sent, 0)])
                        self.wfile.flush()
                        self.close_connection = True
                        # Abort the TCP stream mid-body: the client sees a truncated response.
                        self.connection.shutdown(2)
                        return
                    self.wfile.write(block)
                    sent += len(block)

        return Handler


def _read(path: Path, start: int, corrupt: bool) -> Iterator[bytes]:
    with path.open("rb") as f:
        f.seek(start)
        while block := f.read(_CHUNK):
            yield bytes(b ^ 0xFF for b in block[:16]) + block[16:] if corrupt else block
