"""A loopback stand-in for the Hugging Face Hub: the few routes huggingface_hub 2.x uses to resolve and download.

    GET  /api/models/{org}/{name}/revision/{rev}   model_info (siblings with blobId, size, lfs.sha256 when ?blobs=...)
    HEAD /{org}/{name}/resolve/{rev}/{file}        X-Repo-Commit, ETag (X-Linked-Etag / X-Linked-Size for LFS files)
    GET  /{org}/{name}/resolve/{rev}/{file}        the body (Range "bytes=N-" honoured)
    (a dataset repo: /api/datasets/... and /datasets/{org}/{name}/resolve/..., served from the same repos)

Errors carry X-Error-Code as the Hub's do (RepoNotFound, RevisionNotFound, EntryNotFound, GatedRepo), which is what
huggingface_hub turns into its typed errors. Listens on 127.0.0.1 (a free port), one thread per request, started and
stopped by the test; `requests` counts what it served."""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin")


class HubStub:
    """repos: {repo_id: {revision: directory}}; each revision becomes a commit (sha1 of repo + revision + contents).
    corrupt: {(repo_id, filename)}: bodies served with one byte flipped (headers still announce the true hashes).
    gated: repo ids answered 401 GatedRepo unless the request carries `Authorization: Bearer <token>`."""

    def __init__(self, repos: dict[str, dict[str, Path]]):
        self.repos: dict[str, dict] = {}
        self.corrupt: set[tuple[str, str]] = set()
        self.gated: set[str] = set()
        self.token = "hf_stub_token"
        self.requests: list[str] = []
        for repo, revs in repos.items():
            self.add_repo(repo, revs)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def add_repo(self, repo: str, revs: dict[str, Path]) -> None:
        entry = self.repos.setdefault(repo, {"refs": {}, "commits": {}})
        for rev, d in revs.items():
            files = {p.name: p.read_bytes() for p in sorted(Path(d).iterdir()) if p.is_file()}
            h = hashlib.sha1(f"{repo}@{rev}".encode())
            for name, data in files.items():
                h.update(name.encode() + hashlib.sha256(data).digest())
            entry["refs"][rev] = h.hexdigest()
            entry["commits"][h.hexdigest()] = files

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
        return False

    def commit(self, repo: str, rev: str) -> str:
        return self.repos[repo]["refs"][rev]

    def _lookup(self, repo: str, rev: str, auth: str | None = None):
        """-> (status, error code, commit, files)"""
        if repo not in self.repos:
            return 404, "RepoNotFound", None, None
        if repo in self.gated and auth != f"Bearer {self.token}":
            return 401, "GatedRepo", None, None
        entry = self.repos[repo]
        commit = entry["refs"].get(rev, rev if rev in entry["commits"] else None)
        if commit is None:
            return 404, "RevisionNotFound", None, None
        return 200, None, commit, entry["commits"][commit]

    def _handler(self):
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _send(self, status, headers, body=b"", head=False):
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, str(v))
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def _error(self, status, code, head, commit=None):
                h = {"X-Error-Code": code, "X-Error-Message": f"{code} (stub)", "Content-Type": "application/json"}
                if commit:
                    h["X-Repo-Commit"] = commit
                self._send(status, h, json.dumps({"error": code}).encode(), head)

            def _route(self, head: bool):
                path = urlsplit(self.path).path
                stub.requests.append(f"{self.command} {path}")
                m = re.fullmatch(r"/api/(?:models|datasets)/([^/]+/[^/]+)/revision/(.+)", path)
                if m:
                    return self._model_info(unquote(m.group(1)), unquote(m.group(2)), head)
                m = re.fullmatch(r"/(?:datasets/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
                if m:
                    return self._resolve(unquote(m.group(1)), unquote(m.group(2)), unquote(m.group(3)), head)
                self._error(404, "EntryNotFound", head)

            def _model_info(self, repo, rev, head):
                status, code, commit, files = stub._lookup(repo, rev, self.headers.get("Authorization"))
                if status != 200:
                    return self._error(status, code, head)
                siblings = []
                for name, data in files.items():
                    s = {"rfilename": name, "size": len(data), "blobId": _git_sha1(data)}
                    if name.endswith(LFS_SUFFIXES):
                        s["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
                    siblings.append(s)
                cfg = json.loads(files["config.json"]) if "config.json" in files else {}
                body = {
                    "id": repo,
                    "sha": commit,
                    "private": False,
                    "siblings": siblings,
                    "config": {"model_type": cfg.get("model_type")},
                }
                self._send(200, {"Content-Type": "application/json"}, json.dumps(body).encode(), head)

            def _resolve(self, repo, rev, name, head):
                status, code, commit, files = stub._lookup(repo, rev, self.headers.get("Authorization"))
                if status != 200:
                    return self._error(status, code, head)
                if name not in files:
                    return self._error(404, "EntryNotFound", head, commit)
                data = files[name]
                lfs = name.endswith(LFS_SUFFIXES)
                etag = hashlib.sha256(data).hexdigest() if lfs else _git_sha1(data)
                headers = {"X-Repo-Commit": commit, "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}
                if lfs:
                    headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": len(data)})
                if (repo, name) in stub.corrupt:
                    data = bytes([data[0] ^ 0xFF]) + data[1:]
                rng = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
                if rng and not head:
                    return self._send(206, headers, data[int(rng.group(1)) :])
                self._send(200, headers, data, head)

            def do_HEAD(self):
                self._route(head=True)

            def do_GET(self):
                self._route(head=False)

        return Handler


def _git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
