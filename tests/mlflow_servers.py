"""A real `mlflow server` a test can stop and start again, and a proxy that cuts it off for a span of steps."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from pipelines.ray_runtime import free_port

LOG_BATCH = "/api/2.0/mlflow/runs/log-batch"


def wait_until_healthy(uri: str, process: subprocess.Popen, log: Path, timeout: float) -> None:
    """Return once the MLflow server at `uri` answers /health; RuntimeError with its log's tail if it exits first."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2)
            return
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not start: {log.read_text()[-3000:]}") from None
            time.sleep(0.5)


class MlflowServer:
    """`mlflow server` on 127.0.0.1 with a SQLite store; `stop` and `start` keep the port and the store."""

    def __init__(self, root: Path):
        self.root, self.port = root, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        self.log = None

    def start(self, timeout: float = 120) -> None:
        # Its own session: `stop` ends the server and its workers by their group id, nothing else.
        self.log = open(self.root / "server.log", "ab")
        self.process = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--artifacts-destination", str(self.root / "artifacts"), "--workers", "1"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_until_healthy(self.uri, self.process, self.root / "server.log", timeout)
            # Ready is answering the API: /health answers before the worker opens its store, and that first store
            # request took over 10 s on a loaded machine, beyond the one try a test under way gives its client.
            urllib.request.urlopen(f"{self.uri}/api/2.0/mlflow/experiments/search?max_results=1", timeout=timeout)
        except RuntimeError:
            self.stop()
            raise

    def stop(self) -> None:
        """End the server; returns once its port refuses connections."""
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:  # a loaded machine: the workers' graceful shutdown can take minutes
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.process = None
        self.log.close()
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                time.sleep(0.2)  # a worker of the group still holds the socket
            except OSError:
                return


class OutageProxy:
    """An HTTP proxy to `upstream` that drops every request, unanswered, while MLflow is "down".

    It goes down at the first metrics request whose newest step is `down_at` and up again at the first
    whose newest step is `up_at`: the outage spans steps, not seconds, so the test does not race training.
    With `down_on`, it goes down for good at the first request whose path starts with it. Without them, a test
    sets `down` itself.
    """

    def __init__(self, upstream: str, down_at: int | None = None, up_at: int | None = None,
                 down_on: str | None = None):
        self.upstream = upstream.split("://", 1)[1]
        self.down_at, self.up_at, self.down_on = down_at, up_at, down_on
        self.down = False
        self.dropped: list[str] = []  # "METHOD path" of each request dropped
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.path.startswith(LOG_BATCH) and proxy.down_at is not None:
                    steps = [int(m["step"]) for m in json.loads(body).get("metrics", [])]
                    if steps and max(steps) >= proxy.up_at:
                        proxy.down = False
                    elif steps and max(steps) >= proxy.down_at:
                        proxy.down = True
                if proxy.down_on is not None and self.path.startswith(proxy.down_on):
                    proxy.down = True
                if proxy.down:
                    proxy.dropped.append(f"{self.command} {self.path.split('?')[0]}")
                    self.close_connection = True  # as a crashed server: the connection ends, no reply
                    return
                connection = http.client.HTTPConnection(proxy.upstream, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                connection.request(self.command, self.path, body=body, headers=headers)
                reply = connection.getresponse()
                content = reply.read()
                self.send_response(reply.status)
                for key, value in reply.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)
                connection.close()

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.uri = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
