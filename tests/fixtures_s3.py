"""An S3 endpoint served by `moto` in server mode on 127.0.0.1, once per test session.

Clients find it the way users point at their own S3-compatible store: through
AWS_ENDPOINT_URL (boto3 and pyarrow.fs both read it) and the usual credentials
variables.
"""

import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=1)
            break
        except Exception:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError("moto server did not start")
            time.sleep(0.2)
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                            "AWS_DEFAULT_REGION", "AWS_REGION")}
    os.environ.update(AWS_ENDPOINT_URL=url, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_DEFAULT_REGION="us-east-1", AWS_REGION="us-east-1")
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_endpoint):
    """A fresh bucket; returns its name."""
    import uuid

    import boto3

    name = f"lrt-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name


class FaultProxy:
    """An HTTP proxy on 127.0.0.1 in front of the moto endpoint that fails requests the way S3 does
    under load: 500 InternalError and 503 SlowDown, each with S3's XML error body.

    Deterministic, two modes (both off at first: everything is forwarded):
    - `fail(every, burst)`: from then on, of every `every` requests the first `burst` get a fault,
      alternately 500 and 503; `methods` (e.g. {"GET"}) limits this to requests with those HTTP methods;
    - `outage(seconds)`: every request gets 503 SlowDown until that many seconds have passed (throttling).
    `faults` counts the faults sent, `requests` all requests; `log` has (time, method, path, fault status
    or None) per request.
    """

    ERRORS = ((500, "InternalError", "We encountered an internal error. Please try again."),
              (503, "SlowDown", "Please reduce your request rate."))

    def __init__(self, upstream: str):
        import http.client
        import http.server
        import threading
        import urllib.parse

        self._lock = threading.Lock()
        self.fail(every=0)
        self._down_until = 0.0
        self.requests = self.faults = 0
        self.log = []
        target = urllib.parse.urlsplit(upstream)
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect

            def log_message(self, *args):
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
                    return self.rfile.read(int(self.headers.get("Content-Length") or 0))
                data = b""
                while size := int(self.rfile.readline().split(b";")[0], 16):
                    data += self.rfile.read(size)
                    self.rfile.readline()
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return data

            def _reply(self, status: int, reason: str | None, headers: list, body: bytes) -> None:
                self.send_response(status, reason)
                for k, v in headers:
                    self.send_header(k, v)
                self.end_headers()
                if self.command != "HEAD":  # a HEAD response has headers only, as from S3
                    self.wfile.write(body)

            def _handle(self):
                body = self._body()  # read even when failing, so the connection stays usable
                fault = proxy._next_fault(self.command, self.path.split("?")[0])
                if fault is not None:
                    status, code, message = fault
                    xml = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}'
                           f"</Message><RequestId>FAULT{proxy.faults:012d}</RequestId><HostId>lrt-fault-proxy</HostId>"
                           "</Error>").encode()
                    self._reply(status, None, [("Content-Type", "application/xml"),
                                               ("Content-Length", str(len(xml)))], xml)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() != "transfer-encoding"}
                if body or self.command in ("PUT", "POST"):
                    headers["Content-Length"] = str(len(body))
                conn = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                finally:
                    conn.close()
                out = [(k, v) for k, v in resp.getheaders()
                       if k.lower() not in ("transfer-encoding", "connection", "content-length", "date", "server")]
                length = resp.getheader("Content-Length") if self.command == "HEAD" else None
                self._reply(resp.status, resp.reason, out + [("Content-Length", length or str(len(data)))], data)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def fail(self, every: int, burst: int = 1, methods: set[str] | None = None) -> None:
        with self._lock:
            self.every, self.burst, self.methods, self._counted = every, burst, methods, 0

    def outage(self, seconds: float) -> None:
        self._down_until = time.monotonic() + seconds

    def _next_fault(self, method: str, path: str):
        with self._lock:
            self.requests += 1
            fault = None
            if time.monotonic() < self._down_until:
                fault = self.ERRORS[1]
            elif self.every and (self.methods is None or method in self.methods):
                self._counted += 1
                if (self._counted - 1) % self.every < self.burst:
                    fault = self.ERRORS[self.faults % len(self.ERRORS)]
            if fault is not None:
                self.faults += 1
            self.log.append((time.monotonic(), method, path, fault and fault[0]))
            return fault

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def s3_faults(s3_endpoint, monkeypatch):
    """A FaultProxy in front of moto (forwarding everything until told to fail), with AWS_ENDPOINT_URL
    pointing at it for this test. pyarrow reads the variable whenever a filesystem is built (resolve()
    builds one per call and nothing caches them), so an object that holds a filesystem (a TokenLoader)
    goes through the proxy only if it is made after this fixture."""
    proxy = FaultProxy(s3_endpoint)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)  # pyarrow prefers it to AWS_ENDPOINT_URL
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    try:
        yield proxy
    finally:
        proxy.close()
