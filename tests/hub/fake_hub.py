"""A small in-memory Hugging Face Hub for tests: the routes huggingface_hub 2.4 calls to create a
repo, commit to it and download from it, on 127.0.0.1.

Routes (as the client builds them, see huggingface_hub/hf_api.py, _commit_api.py, file_download.py):
  POST /api/repos/create                          {"name", "organization", ...} -> {"url"}; 409 if it exists
  POST /api/validate-yaml                         README.md metadata check -> {"errors": [], "warnings": []}
  POST /api/models/{repo}/branch/{branch}         new branch at the default branch's head; 409 if it exists
  POST /api/models/{repo}/preupload/{rev}         every file "regular": its bytes then come inline in the commit
  POST /api/models/{repo}/commit/{rev}            ndjson: a header line, then {"key": "file", base64 content} lines
  GET  /api/models/{repo}/revision/{rev}          {"id", "sha", "siblings"}
  GET  /api/models/{repo}/tree/{rev}              [{"type": "file", "path", "size", "oid"}]
  HEAD/GET /{repo}/resolve/{rev}/{path}           bytes with ETag, X-Repo-Commit, Content-Length; Range honoured
Errors carry the X-Error-Code header the client maps to its exception types (RepoNotFound,
RevisionNotFound, EntryNotFound); a missing or wrong token gets 401 on every route.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

TOKEN = "hf_fakeHubTokenDoNotLeak0123456789"
_GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"


@dataclass
class Repo:
    private: bool
    refs: dict[str, str]  # branch or refs/pr/N -> commit
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit -> {path: bytes}
    messages: list[str] = field(default_factory=list)


class FakeHub:
    """The server's state and its controls: ``mode`` "ok" or "drop" (close every connection unanswered),
    ``truncate_next`` (cut the next file download halfway, once)."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.mode = "ok"
        self.truncate_next = False
        self.requests: list[tuple[str, str]] = []
        self.unknown: list[str] = []
        self._lock = threading.Lock()
        self._counter = itertools.count(1)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def seed(self, repo_id: str, files: dict[str, bytes], *, branch: str = "main") -> str:
        """Create or update ``repo_id`` directly (no client involved); returns the new commit."""
        with self._lock:
            repo = self.repos.get(repo_id) or self._create(repo_id, private=False)
            return self._commit(repo, branch, files, "seed")

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return repo.commits[repo.refs.get(revision, revision)]

    def _create(self, repo_id: str, *, private: bool) -> Repo:
        repo = Repo(private=private, refs={})
        self.repos[repo_id] = repo
        self._commit(repo, "main", {".gitattributes": _GITATTRIBUTES}, "initial commit")
        return repo

    def _commit(self, repo: Repo, ref: str, files: dict[str, bytes], message: str, parent: str | None = None) -> str:
        tree = dict(repo.commits.get(parent or repo.refs.get(ref, ""), {}))
        tree.update(files)
        sha = hashlib.sha1(f"{next(self._counter)}:{message}".encode()).hexdigest()
        repo.commits[sha] = tree
        repo.refs[ref] = sha
        repo.messages.append(message)
        return sha


def _blob_id(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:  # keep pytest output clean
            pass

        def do_GET(self) -> None:
            self._route("GET")

        def do_HEAD(self) -> None:
            self._route("HEAD")

        def do_POST(self) -> None:
            self._route("POST")

        def _route(self, method: str) -> None:
            url = urlsplit(self.path)
            hub.requests.append((method, url.path))
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) if method == "POST" else b""
            if hub.mode == "drop":
                self.close_connection = True  # no status line: the client sees the connection dropped
                return
            if self.headers.get("authorization") != f"Bearer {TOKEN}":
                return self._error(401, None, "Invalid credentials in Authorization header")
            parts = url.path.split("/")[1:]  # still quoted: a revision may hold an encoded "/"
            query = parse_qs(url.query)
            with hub._lock:
                if parts[:2] == ["api", "repos"] and parts[2:] == ["create"] and method == "POST":
                    return self._create(json.loads(body))
                if parts == ["api", "validate-yaml"] and method == "POST":
                    return self._json(200, {"errors": [], "warnings": []})
                if parts[:2] == ["api", "models"] and len(parts) >= 6:
                    return self._api(method, "/".join(parts[2:4]), parts[4], unquote(parts[5]), body, query)
                if len(parts) >= 5 and parts[2] == "resolve" and method in ("GET", "HEAD"):
                    return self._resolve(method, "/".join(parts[:2]), unquote(parts[3]), unquote("/".join(parts[4:])))
            hub.unknown.append(f"{method} {url.path}")
            return self._error(404, None, "unknown route")

        def _create(self, payload: dict[str, Any]) -> None:
            repo_id = f"{payload['organization']}/{payload['name']}"
            if repo_id in hub.repos:  # the Hub's 409 still carries the url, which the client reads
                return self._json(409, {"error": "You already created this model repo", "url": f"{hub.url}/{repo_id}"},
                                  {"X-Error-Message": "You already created this model repo"})
            hub._create(repo_id, private=payload.get("visibility") == "private" or bool(payload.get("private")))
            return self._json(200, {"url": f"{hub.url}/{repo_id}"})

        def _api(self, method: str, repo_id: str, action: str, rev: str, body: bytes, query: dict[str, list[str]]) -> None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                return self._error(404, "RepoNotFound", "Repository not found")
            if action == "branch" and method == "POST":
                if rev in repo.refs:
                    return self._error(409, None, "Reference already exists")
                repo.refs[rev] = repo.refs["main"]
                return self._json(200, {})
            if action == "preupload" and method == "POST":
                files = json.loads(body)["files"]
                return self._json(200, {"files": [
                    {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None} for f in files
                ]})
            if action == "commit" and method == "POST":
                return self._commit(repo_id, repo, rev, body, create_pr="create_pr" in query)
            sha = repo.refs.get(rev, rev if rev in repo.commits else None)
            if sha is None:
                return self._error(404, "RevisionNotFound", "Invalid rev id")
            tree = repo.commits[sha]
            if action == "revision" and method == "GET":
                return self._json(200, {"id": repo_id, "sha": sha, "private": repo.private,
                                        "siblings": [{"rfilename": p} for p in sorted(tree)]})
            if action == "tree" and method == "GET":
                return self._json(200, [{"type": "file", "path": p, "size": len(c), "oid": _blob_id(c)}
                                        for p, c in sorted(tree.items())])
            hub.unknown.append(f"{method} {action}")
            return self._error(404, None, "unknown route")

        def _commit(self, repo_id: str, repo: Repo, rev: str, body: bytes, *, create_pr: bool) -> None:
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
            header = lines[0]["value"]
            files = {}
            for line in lines[1:]:
                if line["key"] != "file" or line["value"].get("encoding") != "base64":
                    return self._error(400, None, f"fake hub takes only inline files, got {line['key']}")
                files[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
            if rev not in repo.refs:
                return self._error(404, "RevisionNotFound", "Invalid rev id")
            pr_url = None
            if create_pr:
                number = sum(ref.startswith("refs/pr/") for ref in repo.refs) + 1
                sha = hub._commit(repo, f"refs/pr/{number}", files, header["summary"], parent=repo.refs[rev])
                pr_url = f"{hub.url}/{repo_id}/discussions/{number}"
            else:
                sha = hub._commit(repo, rev, files, header["summary"])
            return self._json(200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{sha}", "commitOid": sha,
                                    "pullRequestUrl": pr_url})

        def _resolve(self, method: str, repo_id: str, rev: str, path: str) -> None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                return self._error(404, "RepoNotFound", "Repository not found")
            sha = repo.refs.get(rev, rev if rev in repo.commits else None)
            if sha is None:
                return self._error(404, "RevisionNotFound", "Invalid rev id")
            content = repo.commits[sha].get(path)
            if content is None:
                return self._error(404, "EntryNotFound", "Entry not found", {"X-Repo-Commit": sha})
            start = 0
            if self.headers.get("Range", "").startswith("bytes="):
                start = int(self.headers["Range"][6:].split("-")[0])
            self.send_response(206 if start else 200)
            self.send_header("ETag", f'"{_blob_id(content)}"')
            self.send_header("X-Repo-Commit", sha)
            self.send_header("Content-Length", str(len(content) - start))
            self.end_headers()
            if method == "HEAD":
                return None
            if hub.truncate_next and len(content) > 1000:
                hub.truncate_next = False
                self.wfile.write(content[start:len(content) // 2])
                self.close_connection = True
                return None
            self.wfile.write(content[start:])
            return None

        def _json(self, status: int, value: Any, headers: dict[str, str] | None = None) -> None:
            data = json.dumps(value).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, val in (headers or {}).items():
                self.send_header(key, val)
            self.end_headers()
            if self.command != "HEAD":  # a HEAD answer has headers only, or the next response is misread
                self.wfile.write(data)

        def _error(self, status: int, code: str | None, message: str, headers: dict[str, str] | None = None) -> None:
            extra = {"X-Error-Message": message, **(headers or {})}
            if code is not None:
                extra["X-Error-Code"] = code
            self._json(status, {"error": message}, extra)

    return Handler
