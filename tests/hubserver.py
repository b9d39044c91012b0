"""A local stand-in for the Hugging Face Hub: the routes huggingface_hub uses to download a model.

It serves directories (generated models) as repos, throttled so that progress can be seen, and
can cut the connection once in the middle of a file to prove that downloads resume. Requests
are recorded so that tests can check what the client asked for (a `Range` on the retry).

Routes, as the real hub answers them:
  GET  /api/models/{repo}[/revision/{rev}]     model info (sha, siblings)
  GET  /api/models/{repo}/tree/{rev}           the file listing with sizes (recursive)
  HEAD /{repo}/resolve/{rev}/{path}            ETag, X-Repo-Commit, Content-Length
  GET  /{repo}/resolve/{rev}/{path}            the bytes; `Range: bytes=N-` answers 206
An unknown repo answers 401 with `X-Error-Code: RepoNotFound`, as the hub does for missing and
private repos alike.

A hostile hub (issue 22) is the same server with `Hostile` set on a repo: an ETag or a commit
that is a path, a listed file name that is a path, a file whose body runs past its declared
length, or files that stall mid-body.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

CHUNK = 16 * 1024


@dataclass
class Hostile:
    """What a hostile hub answers for one repo (None: what the real hub would)."""

    etag: str | None = None  # sent as every file's ETag (huggingface_hub names the blob after it)
    commit: str | None = None  # sent as the commit (huggingface_hub names the snapshot after it)
    extra_listed: dict[str, int] = field(default_factory=dict)  # file names listed (with sizes) but not served
    overrun: dict[str, int] = field(default_factory=dict)  # file -> bytes its body sends beyond its declared size
    stall: set[str] = field(default_factory=set)  # files whose body stops halfway and never ends


@dataclass
class Repo:
    commit: str
    files: dict[str, bytes]
    hostile: Hostile = field(default_factory=Hostile)

    @classmethod
    def from_directory(cls, directory: Path) -> Repo:
        files = {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*"))
                 if p.is_file() and not p.name.startswith(".")}
        digest = hashlib.sha1(b"".join(hashlib.sha1(v).digest() for v in files.values())).hexdigest()
        return cls(commit=digest, files=files)


@dataclass
class Request:
    method: str
    path: str
    range: str | None


@dataclass
class FakeHub:
    """Repos by id, a byte rate for file bodies, and files whose first GET is cut halfway."""

    repos: dict[str, Repo] = field(default_factory=dict)
    bytes_per_second: float = 2 * 1024**2
    cut_once: set[str] = field(default_factory=set)
    requests: list[Request] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None

    def add(self, repo_id: str, directory: Path) -> Repo:
        self.repos[repo_id] = Repo.from_directory(Path(directory))
        return self.repos[repo_id]

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeHub:
        hub = self

        class Handler(HubHandler):
            pass

        Handler.hub = hub
        self._server = QuietServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="fake-hub", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


class QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        """A client that hangs up mid-file (a cancelled download) is expected here, not an error."""


_INFO = re.compile(r"^/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?$")
_TREE = re.compile(r"^/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?$")
_RESOLVE = re.compile(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")


class HubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub: FakeHub

    def log_message(self, format, *args):  # noqa: A002 - quiet in tests
        pass

    def do_HEAD(self):
        self._route(body=False)

    def do_GET(self):
        self._route(body=True)

    def _route(self, body: bool) -> None:
        path = self.path.split("?", 1)[0]
        self.hub.requests.append(Request(self.command, path, self.headers.get("Range")))
        if match := _TREE.match(path):
            return self._tree(match.group(1), match.group(2))
        if match := _INFO.match(path):
            return self._info(match.group(1), match.group(2))
        if match := _RESOLVE.match(path):
            return self._resolve(match.group(1), match.group(2), match.group(3), body)
        self._json(404, {"error": "not found"})

    def _repo(self, repo_id: str, revision: str | None) -> Repo | None:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            self._json(401, {"error": "Repository not found"},
                       {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"})
            return None
        if revision not in (None, "main", repo.commit, repo.hostile.commit):
            self._json(404, {"error": "Invalid rev id"}, {"X-Error-Code": "RevisionNotFound"})
            return None
        return repo

    def _info(self, repo_id: str, revision: str | None) -> None:
        if repo := self._repo(repo_id, revision):
            names = [*repo.files, *repo.hostile.extra_listed]
            self._json(200, {"id": repo_id, "modelId": repo_id, "sha": repo.hostile.commit or repo.commit,
                             "private": False, "siblings": [{"rfilename": name} for name in names]})

    def _tree(self, repo_id: str, revision: str) -> None:
        if repo := self._repo(repo_id, revision):
            listed = [{"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                      for name, data in repo.files.items()]
            listed += [{"type": "file", "path": name, "size": size, "oid": "0" * 40}
                       for name, size in repo.hostile.extra_listed.items()]
            self._json(200, listed)

    def _resolve(self, repo_id: str, revision: str, name: str, body: bool) -> None:
        repo = self._repo(repo_id, revision)
        if repo is None:
            return
        data = repo.files.get(name)
        if data is None:
            return self._json(404, {"error": "Entry not found"},
                              {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": repo.commit})
        start = 0
        if (wanted := self.headers.get("Range")) and (m := re.fullmatch(r"bytes=(\d+)-", wanted.strip())):
            start = int(m.group(1))
        hostile = repo.hostile
        self.send_response(206 if start else 200)
        self.send_header("ETag", f'"{hostile.etag or hashlib.sha256(data).hexdigest()}"')
        self.send_header("X-Repo-Commit", hostile.commit or repo.commit)
        self.send_header("Accept-Ranges", "bytes")
        if body and name in hostile.overrun:  # no length on the body: it runs until the server closes
            self.send_header("Connection", "close")
            self.close_connection = True
        else:
            self.send_header("Content-Length", str(len(data) - start))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if body and name in hostile.overrun:
            self._send_throttled(name, data + b"\0" * hostile.overrun[name])
        elif body and name in hostile.stall:
            self._send_throttled(name, data[start:][: max(1, (len(data) - start) // 2)])
            time.sleep(3600)  # never ends (the client's read timeout or a cancel must)
        elif body:
            self._send_throttled(name, data[start:])

    def _send_throttled(self, name: str, data: bytes) -> None:
        cut_at = len(data) // 2 if name in self.hub.cut_once else None
        if cut_at is not None:
            self.hub.cut_once.discard(name)
        for offset in range(0, len(data), CHUNK):
            if cut_at is not None and offset >= cut_at:
                self.close_connection = True
                self.connection.shutdown(2)  # the line drops mid-file
                return
            piece = data[offset:offset + CHUNK]
            self.wfile.write(piece)
            self.wfile.flush()
            time.sleep(len(piece) / self.hub.bytes_per_second)

    def _json(self, status: int, payload, headers: dict[str, str] | None = None) -> None:
        raw = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(raw)
