"""A real `mlflow server` for the test session (loaded from conftest via pytest_plugins).

Design choices:
- One server per session: a new sqlite database takes 25-50 s to answer
  /health on these machines (measured), far too slow per test. Tests isolate
  themselves by experiment name instead.
- sqlite backend + `--artifacts-destination` in the session temp dir: the
  server proxies artifacts (experiments get `mlflow-artifacts:/` locations),
  the same path a remote team server uses.
- `--workers 1`: the machines have 2 cores, and one worker process also means
  one sqlite writer inside the server.
- The server runs in its own process group, so stopping it also stops any
  worker it forked; its log is kept and shown if it fails to start.

Example:
    def test_something(mlflow_server):
        from lrt_platform.tracking import Tracker
        tr = Tracker(mlflow_server, "my-test-experiment")
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

START_TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)


def start_server(root, port: int | None = None) -> tuple[subprocess.Popen, str]:
    """Start `mlflow server` on 127.0.0.1 with its database and artifacts under root; returns (process, URL)
    once it answers /health. Started again with the same root and port, it serves the same runs."""
    port = port or _free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = root / "server.log"
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{root}/mlflow.db", "--artifacts-destination", str(root / "artifacts")]
    with open(log_path, "a") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=root, start_new_session=True)
    deadline = time.time() + START_TIMEOUT_S
    while not _healthy(url):
        if proc.poll() is not None or time.time() > deadline:
            _stop(proc)
            tail = log_path.read_text()[-3000:]
            raise RuntimeError(f"mlflow server did not come up on {url} "
                               f"(exit code {proc.poll()}); its log ends with:\n{tail}")
        time.sleep(0.5)
    return proc, url


stop_server = _stop


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """The http URI of a running `mlflow server` (sqlite backend, proxied local artifacts)."""
    proc, url = start_server(tmp_path_factory.mktemp("mlflow_server"))
    try:
        yield url
    finally:
        _stop(proc)
