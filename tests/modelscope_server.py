"""A local HTTP server that answers the ModelScope API calls the ``modelscope`` package makes.

ModelScope cannot be reached from the test machines, so the fetch step is tested through the real
client (``modelscope_hub``, which ``modelscope`` 1.40 delegates to) against this stand-in, found by
reading that client. It answers, as ModelScope's legacy ``/api/v1`` surface does:

* ``GET /api/v1/models/{owner}/{name}``: repository info (the client's ``get_repo_info``);
* ``GET /api/v1/models/{owner}/{name}/revisions``: branches and tags (``RevisionMap``);
* ``GET /api/v1/models/{owner}/{name}/repo/files?Revision=&Recursive=&Root=``: the file listing,
  ``{"Code": 200, "Data": {"Files": [{"Path", "Name", "Size", "Sha256", "Type", ...}]}}``;
* ``GET``/``HEAD /api/v1/models/{owner}/{name}/repo?Revision=&FilePath=``: a file's bytes, with
  ``Range`` answered by ``206`` and ``Content-Range``, as the client resumes ``.incomplete`` files;
* ``GET /api/v1/repos/internalAccelerationInfo``: 404 (no Alibaba Cloud region here: the client
  probes it for its intra-cloud routing and goes on without one).

Unknown repositories and revisions answer 404 with a ``Code``/``Message`` body, which the client
turns into ``NotExistError``; a private repository (``token=``) answers 401 without
``Authorization: Bearer <token>``. ``cut(path, after_bytes)`` drops the connection half-way
through the next download of ``path``; ``corrupt(path)`` serves bytes that fail the listed sha256.
Every request is recorded (method, path, query, Range, Authorization) for assertions.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import json
import re
import threading
import urllib.parse
from pathlib import Path
from typing import Any

_BLOCK = 1 << 20


@dataclasses.dataclass(frozen=True)
class Blob:
    path: Path
    size: int
    sha256: str


@dataclasses.dataclass
class Repo:
    files: dict[str, Blob]
    revisions: tuple[str, ...]
    commit: str
    token: str | None = None
    extra_names: tuple[str, ...] = ()
    """Names listed with no content behind them: what a hostile hub may list (``../x``, ``/abs``)."""


@dataclasses.dataclass(frozen=True)
class Seen:
    method: str
    path: str
    query: dict[str, str]
    range: str | None
    authorization: str | None


def _blob(path: Path) -> Blob:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_BLOCK):
            digest.update(block)
    return Blob(path, path.stat().st_size, digest.hexdigest())


class FakeModelScope:
    """``with FakeModelScope() as ms:``; ``ms.url`` is the endpoint for ``spec.source.modelscope``.

    ``host`` is loopback unless pods in their own network namespace must reach it."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.repos: dict[str, Repo] = {}
        self.seen: list[Seen] = []
        self._cuts: dict[str, int] = {}
        self._corrupt: set[str] = set()
        self._lock = threading.Lock()
        self._server = http.server.ThreadingHTTPServer((host, 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def __enter__(self) -> FakeModelScope:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def add_repo(
        self, repo_id: str, folder: Path, *, token: str | None = None,
        revisions: tuple[str, ...] = ("master",), extra_names: tuple[str, ...] = (),
    ) -> Repo:  # fmt: skip
        """Serve every file under ``folder`` as ``repo_id`` at each of ``revisions``."""
        files = {
            p.relative_to(folder).as_posix(): _blob(p)
            for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.relative_to(folder).as_posix().startswith(".")
        }
        commit = hashlib.sha1(json.dumps({k: v.sha256 for k, v in files.items()}).encode()).hexdigest()
        repo = Repo(files, revisions, commit, token, extra_names)
        self.repos[repo_id] = repo
        return repo

    def cut(self, path: str, after_bytes: int) -> None:
        """Drop the connection after ``after_bytes`` body bytes on the next download of ``path``."""
        with self._lock:
            self._cuts[path] = after_bytes

    def corrupt(self, path: str, on: bool = True) -> None:
        """Serve ``path`` with its first bytes flipped (same size, wrong sha256), or stop."""
        (self._corrupt.add if on else self._corrupt.discard)(path)

    def downloads(self, name: str) -> list[Seen]:
        """The file requests (GET) made for ``name``."""
        return [s for s in self.seen
                if s.method == "GET" and s.path.endswith("/repo") and s.query.get("FilePath") == name]

    def _take_cut(self, path: str) -> int | None:
        with self._lock:
            return self._cuts.pop(path, None)


def _handler(ms: FakeModelScope) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            self._serve(body=True)

        def do_HEAD(self) -> None:
            self._serve(body=False)

        def _json(self, data: Any, status: int = 200) -> None:
            blob = json.dumps(data).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(blob)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(blob)

        def _fail(self, status: int, message: str) -> None:
            self._json({"Code": status, "Message": message, "RequestId": "stand-in", "Success": False}, status)

        def _ok(self, data: Any) -> None:
            self._json({"Code": 200, "Data": data, "Message": "success", "RequestId": "stand-in", "Success": True})

        def _serve(self, *, body: bool) -> None:
            split = urllib.parse.urlsplit(self.path)
            query = {k: v[-1] for k, v in urllib.parse.parse_qs(split.query).items()}
            path = urllib.parse.unquote(split.path)
            auth = self.headers.get("Authorization")
            ms.seen.append(Seen(self.command, path, query, self.headers.get("Range"), auth))
            m = re.fullmatch(r"/api/v1/models/([^/]+/[^/]+)(/revisions|/repo/files|/repo)?", path)
            if m is None:
                self._fail(404, f"no route for {path}")
                return
            repo = self._repo(m[1])
            if repo is None:
                return
            if m[2] is None:
                self._ok({"Path": m[1].split("/")[0], "Name": m[1].split("/")[1], "Id": 1, "Visibility": 5})
            elif m[2] == "/revisions":
                branches = [{"Revision": r, "CreatedAt": 0} for r in repo.revisions]
                self._ok({"RevisionMap": {"Branches": branches, "Tags": []}})
            elif self._revision(repo, query.get("Revision", "master")):
                if m[2] == "/repo/files":
                    self._files(repo, query.get("Root") or "")
                else:
                    self._file(repo, query.get("FilePath", ""), body=body)

        def _repo(self, repo_id: str) -> Repo | None:
            repo = ms.repos.get(repo_id)
            if repo is None:
                self._fail(404, f"model {repo_id} does not exist")
                return None
            if repo.token and self.headers.get("Authorization") != f"Bearer {repo.token}":
                self._fail(401, "login required: this model is private")
                return None
            return repo

        def _revision(self, repo: Repo, revision: str) -> bool:
            if revision in (*repo.revisions, repo.commit):
                return True
            self._fail(404, f"revision {revision} does not exist")
            return False

        def _files(self, repo: Repo, root: str) -> None:
            entries = [
                {"Name": name.rsplit("/", 1)[-1], "Path": name, "Size": blob.size, "Sha256": blob.sha256,
                 "Type": "blob", "Revision": repo.commit, "IsLFS": blob.size > 1 << 16}
                for name, blob in repo.files.items() if name.startswith(root.strip("/"))
            ]  # fmt: skip
            entries += [{"Name": n, "Path": n, "Size": 1, "Sha256": "0" * 64, "Type": "blob"} for n in repo.extra_names]
            self._ok({"Files": entries})

        def _file(self, repo: Repo, name: str, *, body: bool) -> None:
            blob = repo.files.get(name)
            if blob is None:
                self._fail(404, f"file {name} does not exist")
                return
            start = 0
            if rng := self.headers.get("Range"):
                m = re.fullmatch(r"bytes=(\d+)-", rng.strip())
                if m is None or int(m[1]) >= blob.size:
                    self._fail(416, f"cannot serve range {rng}")
                    return
                start = int(m[1])
            self.send_response(206 if start else 200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(blob.size - start))
            if start:
                self.send_header("Content-Range", f"bytes {start}-{blob.size - 1}/{blob.size}")
            self.end_headers()
            if body:
                self._body(blob, name, start)

        def _body(self, blob: Blob, name: str, start: int) -> None:
            cut = ms._take_cut(name)
            sent = 0
            with blob.path.open("rb") as f:
                f.seek(start)
                while block := f.read(_BLOCK):
                    if name in ms._corrupt and sent == 0 and start == 0:
                        block = bytes(b ^ 0xFF for b in block[:16]) + block[16:]
                    if cut is not None and sent + len(block) >= cut:
                        self.wfile.write(block[: max(cut - sent, 0)])
                        self.wfile.flush()
                        self.close_connection = True
                        self.connection.shutdown(2)  # the client sees a truncated body
                        return
                    self.wfile.write(block)
                    sent += len(block)

    return Handler
