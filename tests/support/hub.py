"""A stand-in for the Hugging Face Hub on 127.0.0.1: the endpoints huggingface_hub's snapshot_download
calls (revision info, tree listing, file resolution), serving model directories, counting requests."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


@dataclass
class FakeHub:
    """Repositories by id ("org/name"), each a local directory served at every revision in `revisions`."""

    repos: dict[str, Path]
    revisions: tuple[str, ...] = ("main",)
    requests: list[str] = field(default_factory=list)
    endpoint: str = ""

    def _files(self, repo: str) -> list[Path]:
        return sorted(p for p in self.repos[repo].rglob("*") if p.is_file())

    def answer(self, method: str, path: str) -> tuple[int, dict[str, str], bytes]:
        self.requests.append(f"{method} {path}")
        parts = unquote(urlparse(path).path).strip("/").split("/")
        api = parts[:2] == ["api", "models"]
        repo = "/".join(parts[2:4] if api else parts[0:2])
        if repo not in self.repos:
            return 404, {"X-Error-Code": "RepoNotFound"}, b'{"error": "Repository not found"}'
        revision = parts[5] if api else parts[3]
        if revision not in self.revisions and revision != sha(repo):
            return 404, {"X-Error-Code": "RevisionNotFound"}, b'{"error": "Invalid rev id"}'
        root = self.repos[repo]
        if api and parts[4] == "revision":
            siblings = [{"rfilename": p.relative_to(root).as_posix()} for p in self._files(repo)]
            return 200, {}, json.dumps({"id": repo, "sha": sha(repo), "siblings": siblings}).encode()
        if api and parts[4] == "tree":
            tree = [{"type": "file", "path": p.relative_to(root).as_posix(), "size": p.stat().st_size,
                     "oid": hashlib.sha1(p.read_bytes()).hexdigest()} for p in self._files(repo)]
            return 200, {}, json.dumps(tree).encode()
        file = root / "/".join(parts[4:])  # /{repo}/resolve/{revision}/{file}
        if not file.is_file():
            return 404, {"X-Error-Code": "EntryNotFound"}, b'{"error": "Entry not found"}'
        body = file.read_bytes()
        return 200, {"X-Repo-Commit": sha(repo), "ETag": f'"{hashlib.sha1(body).hexdigest()}"'}, body


def sha(repo: str) -> str:
    return hashlib.sha1(repo.encode()).hexdigest()


@contextmanager
def serving(hub: FakeHub) -> Iterator[FakeHub]:
    """The hub on a free port of 127.0.0.1 (hub.endpoint) while the block runs."""

    class Handler(BaseHTTPRequestHandler):
        def _reply(self, send_body: bool) -> None:
            status, headers, body = hub.answer(self.command, self.path)
            self.send_response(status)
            for name, value in {"Content-Type": "application/json", "Content-Length": str(len(body)),
                                **headers}.items():
                self.send_header(name, value)
            self.end_headers()
            if send_body:
                self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            self._reply(True)

        def do_HEAD(self) -> None:  # noqa: N802
            self._reply(False)

        def log_message(self, *_: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    hub.endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
