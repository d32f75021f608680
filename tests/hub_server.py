"""A hub-shaped HTTP server on 127.0.0.1: the few endpoints huggingface_hub's snapshot_download uses."""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
from pathlib import Path
from urllib.parse import unquote, urlparse


class HubServer:
    """Serves each folder of `repos` (repo id → folder) at one commit, also reachable as `main`."""

    def __init__(self, repos: dict[str, Path], commit: str = "0123456789abcdef0123456789abcdef01234567"):
        self.commit, self.requests = commit, []
        self.repos = {repo: {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
                             if p.is_file()} for repo, folder in repos.items()}
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def __enter__(self) -> HubServer:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _revision(self, revision: str) -> bool:
        return revision in ("main", self.commit)

    def _handler(self):
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _reply(self, status: int, body: bytes, headers: dict | None = None, send_body: bool = True):
                self.send_response(status)
                for key, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
                    self.send_header(key, value)
                self.end_headers()
                if send_body:
                    self.wfile.write(body)

            def _json(self, data) -> None:
                self._reply(200, json.dumps(data).encode(), {"Content-Type": "application/json"})

            def _serve(self, send_body: bool) -> None:
                path = unquote(urlparse(self.path).path)
                hub.requests.append(f"{self.command} {path}")
                for repo_id, files in hub.repos.items():
                    if path.startswith((f"/api/models/{repo_id}/", f"/{repo_id}/resolve/")):
                        return self._serve_repo(path, repo_id, files, send_body)
                self._reply(404, b"", {"X-Error-Code": "RepoNotFound"}, send_body)

            def _serve_repo(self, path: str, repo_id: str, files: dict[str, bytes], send_body: bool) -> None:
                api = f"/api/models/{repo_id}/"
                if path.startswith(api + "revision/") and hub._revision(path[len(api + "revision/"):]):
                    return self._json({"id": repo_id, "sha": hub.commit, "siblings": [{"rfilename": f} for f in files]})
                if path.startswith(api + "tree/") and hub._revision(path[len(api + "tree/"):].split("/")[0]):
                    return self._json([{"type": "file", "path": f, "size": len(b),
                                        "oid": hashlib.sha1(b).hexdigest()} for f, b in files.items()])
                prefix = f"/{repo_id}/resolve/"
                if path.startswith(prefix):
                    revision, _, file = path[len(prefix):].partition("/")
                    if hub._revision(revision) and file in files:
                        body = files[file]
                        return self._reply(200, body, {"ETag": f'"{hashlib.sha1(body).hexdigest()}"',
                                                       "X-Repo-Commit": hub.commit}, send_body)
                    return self._reply(404, b"", {"X-Error-Code": "EntryNotFound" if hub._revision(revision)
                                                  else "RevisionNotFound"}, send_body)
                self._reply(404, b"", {"X-Error-Code": "RevisionNotFound"}, send_body)

            def do_GET(self):  # noqa: N802 - the http.server API
                self._serve(True)

            def do_HEAD(self):  # noqa: N802
                self._serve(False)

            def log_message(self, *args):
                pass

        return Handler
